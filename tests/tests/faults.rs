//! The fault-injection matrix (docs/RELIABILITY.md): each test injects
//! one fault into a watched shop guest (images/guests/svc.c) and checks
//! the monitor's verdict and that nothing the guest had committed is lost
//! (every session extracted at the stage its counter says it committed,
//! consistent with its own arithmetic). Cells covered elsewhere: a cut
//! network path and corrupt records (monitor.rs), malformed frames
//! (agent.rs). `make faults FAULT_RUNS=N` repeats this file N times.

use std::path::Path;
use std::time::Duration;

use backdoor_agent::{Client, ClientError, ErrorCode, Role};
use bdvmm_tests::shop::{
    assert_nothing_lost, bdctl, cmd, control, extract, session_counters, shop,
    wait_sessions_advance, Watch, T,
};
use bdvmm_tests::{exit, free_port, keys, AgentProcess, Vm};

const WATCH: [&str; 4] = ["--interval-ms", "50", "--timeout-ms", "500"];

/// Extracts from `addr` and checks it against the guest's counters (the
/// guest must be stopped: paused, hung, or without a VMM).
fn extract_and_check(addr: &str, keys: &Path, dir: &Path) -> serde_json::Value {
    let committed = session_counters(addr);
    let (x, _) = extract(&format!("shop1@{addr}"), keys, &dir.join("x.json"));
    assert_nothing_lost(&x, &committed);
    x
}

fn assert_hung_os(e: &serde_json::Value) {
    assert_eq!(
        (e["level"].as_str(), e["counter"].as_str()),
        (Some("os"), Some("kernel")),
        "{e}"
    );
}

#[test]
fn paused_spinning_and_halted_guests_are_hung_at_os_level_and_lose_nothing() {
    for (mode, command) in [
        ("paused", 0),
        ("spinning", cmd::SPIN),
        ("halted", cmd::HALT),
    ] {
        let mut s = shop(&[]);
        let w = Watch::start(&s.target(), &s.keys, &WATCH);
        w.verdict("healthy", T);
        wait_sessions_advance(&s.addr);
        if command == 0 {
            assert_eq!(s.vm.api("pause")["ok"], true);
        } else {
            s.control(command);
            s.vm.wait_line("svc: hanging with interrupts off", T);
        }
        let (_, e) = w.verdict("hung", T);
        assert_hung_os(&e);
        let x = extract_and_check(&s.addr, &s.keys, s.dir.path());
        assert_eq!(x["summary"]["corrupt"], 0, "{mode}: {x}");
        // A pause can freeze the guest in the middle of a record write: that
        // slot is torn, and its session comes from the previous version.
        // A hang in svc's loop happens between writes.
        let torn_max = if command == 0 { 1 } else { 0 };
        assert!(
            x["summary"]["torn"].as_u64().unwrap() <= torn_max,
            "{mode}: {x}"
        );
    }
}

/// svc under a separate `bdvmm agent` on `listen`.
fn shop_with_agent(dir: &Path, keys: &Path, listen: &str, extra: &[&str]) -> (AgentProcess, Vm) {
    let agent = AgentProcess::start_on(dir, keys, listen);
    let sock = agent.vmm_sock.to_str().unwrap().to_owned();
    let mut args = vec!["--name", "shop1", "--agent-sock", &sock];
    args.extend_from_slice(extra);
    let mut vm = Vm::test_guest("svc", 0, &args);
    vm.wait_line("svc: serving sessions", T);
    (agent, vm)
}

#[test]
fn a_guest_whose_vmm_is_sigkilled_or_that_triple_faults_is_hung_and_loses_nothing() {
    for fault in ["vmm-sigkill", "triple-fault"] {
        let dir = tempfile::tempdir().unwrap();
        let k = keys::write_file(dir.path());
        let (agent, mut vm) = shop_with_agent(dir.path(), &k, "127.0.0.1:0", &[]);
        let w = Watch::start(&format!("shop1@{}", agent.addr), &k, &WATCH);
        w.verdict("healthy", T);
        wait_sessions_advance(&agent.addr);
        if fault == "vmm-sigkill" {
            vm.signal(libc::SIGKILL);
            assert_eq!(vm.wait_exit(T), None, "killed by a signal");
        } else {
            control(&agent.addr, cmd::TRIPLE_FAULT);
            assert_eq!(vm.wait_exit(T), Some(exit::TRIPLE_FAULT), "{}", vm.stderr());
        }
        // The agent still serves the guest's memory; nothing runs it any more.
        let (_, e) = w.verdict("hung", T);
        assert_hung_os(&e);
        let mut c =
            Client::connect(agent.addr.as_str(), "shop1", Role::Read, &keys::READ, T).unwrap();
        let deadline = std::time::Instant::now() + T;
        while c.describe().unwrap().vmm_alive {
            assert!(
                std::time::Instant::now() < deadline,
                "{fault}: vmm_alive stays true"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        extract_and_check(&agent.addr, &k, dir.path());
    }
}

#[test]
fn a_restarted_agent_serves_the_same_guest_and_watching_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file(dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let (agent, mut vm) = shop_with_agent(dir.path(), &k, &listen, &[]);
    let w = Watch::start(&format!("shop1@{listen}"), &k, &WATCH);
    let (_, first) = w.verdict("healthy", T);
    agent.kill();
    let (_, e) = w.verdict("unreachable", T);
    assert!(e["reason"].is_string(), "{e}");
    // Longer than the kernel counter's deadline without an agent: never "hung".
    let during = w.collect(Duration::from_secs(2));
    assert!(during.iter().all(|e| e["verdict"] != "hung"), "{during:?}");
    // A new agent on the same sockets: bdvmm hands it guest RAM again.
    let agent = AgentProcess::start_on(dir.path(), &k, &listen);
    let (_, again) = w.verdict("healthy", T);
    assert_eq!(again["generation"], first["generation"], "the same boot");
    wait_sessions_advance(&listen);
    // bdvmm says so (its log line may trail the agent's first answer).
    let deadline = std::time::Instant::now() + T;
    while !vm.stderr().contains("agent link re-established") {
        assert!(std::time::Instant::now() < deadline, "{}", vm.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    control(&listen, cmd::SPIN);
    vm.wait_line("svc: hanging with interrupts off", T);
    let (_, e) = w.verdict("hung", T);
    assert_hung_os(&e);
    extract_and_check(&listen, &k, dir.path());
    drop(agent);
}

#[test]
fn a_restarted_monitor_judges_afresh_and_still_detects_the_hang() {
    let mut s = shop(&[]);
    let first = Watch::start(&s.target(), &s.keys, &WATCH);
    first.verdict("healthy", T);
    drop(first); // SIGKILLed mid-watch
    let second = Watch::start(&s.target(), &s.keys, &WATCH);
    let (_, e) = second.wait("first verdict", T, |e| e["event"] == "verdict");
    assert_eq!(
        e["verdict"], "healthy",
        "no false alarm after a restart: {e}"
    );
    wait_sessions_advance(&s.addr);
    s.control(cmd::SPIN);
    s.vm.wait_line("svc: hanging with interrupts off", T);
    let (_, e) = second.verdict("hung", T);
    assert_hung_os(&e);
    extract_and_check(&s.addr, &s.keys, s.dir.path());
}

#[test]
fn a_guest_reset_mid_watch_gives_stale_generation_never_old_data() {
    let s = shop(&["--on-reset", "reboot"]);
    let w = Watch::start(&s.target(), &s.keys, &WATCH);
    let (_, first) = w.verdict("healthy", T);
    let mut old = Client::connect(s.addr.as_str(), "shop1", Role::Read, &keys::READ, T).unwrap();
    let progress = old.descriptor().hook("progress").unwrap().id;
    s.control(cmd::RESET);
    let (_, r) = w.wait("rebooted", T, |e| e["event"] == "rebooted");
    assert_eq!(r["from"], first["generation"]);
    // A monitor still on the old generation is refused, never served the new boot's bytes.
    let e = old.read(progress, 0, 64).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::StaleGeneration), "{e}");
    assert_eq!(
        serde_json::json!(old.describe().unwrap().generation),
        r["to"]
    );
    w.wait("healthy after reboot", T, |e| {
        e["verdict"] == "healthy" && e["generation"] == r["to"]
    });
    // The new boot's sessions advance before the guest is stopped.
    wait_sessions_advance(&s.addr);
    assert_eq!(s.vm.api("pause")["ok"], true);
    let x = extract_and_check(&s.addr, &s.keys, s.dir.path());
    assert_eq!(x["generation"], r["to"]);
}

#[test]
fn a_record_torn_mid_write_is_reported_and_its_previous_version_extracted() {
    let mut s = shop(&[]);
    let w = Watch::start(&s.target(), &s.keys, &WATCH);
    w.verdict("healthy", T);
    wait_sessions_advance(&s.addr);
    s.control(cmd::TEAR);
    s.vm.wait_line("svc: died writing session 1's next record", T);
    // Session 1's writer is gone: its counter stops, the rest go on.
    let (_, e) = w.verdict("hung", T);
    assert_eq!(
        (e["level"].as_str(), e["counter"].as_str()),
        (Some("session"), Some("session-1")),
        "{e}"
    );
    assert_eq!(s.vm.api("pause")["ok"], true);
    let x = extract_and_check(&s.addr, &s.keys, s.dir.path());
    assert_eq!(x["summary"]["torn"], 1, "{x}");
    assert_eq!(x["summary"]["corrupt"], 0, "{x}");
    let torn: Vec<_> = x["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == "torn")
        .collect();
    assert_eq!(torn.len(), 1, "{x}");
}

#[test]
fn a_flood_of_tamper_attempts_is_counted_with_a_bounded_log() {
    let mut s = shop(&[]);
    let before = s.vm.stderr().len();
    s.control(cmd::TAMPER_FLOOD);
    s.vm.wait_line("svc: tamper flood refused: 100000", T);
    let mut c = Client::connect(s.addr.as_str(), "shop1", Role::Read, &keys::READ, T).unwrap();
    assert_eq!(c.describe().unwrap().tamper_count, 100_000);
    assert_eq!(s.vm.api("backdoor")["tamper_count"], 100_000);
    // One summary line per 10 s at most (a line each was 100,000 lines).
    let grown = s.vm.stderr().len() - before;
    assert!(
        grown < 4096,
        "bdvmm logged {grown} bytes for 100,000 refused commands:\n{}",
        &s.vm.stderr()[before..]
    );
    // The event stream samples the count: it reaches 100,000 in a few
    // lines, not 100,000 of them.
    s.vm.wait_event(T, |e| {
        e["event"] == "tamper" && e["tamper_count"] == 100_000
    });
    let tamper =
        s.vm.events()
            .iter()
            .filter(|e| e["event"] == "tamper")
            .count();
    assert!(
        tamper < 1000,
        "{tamper} tamper events for 100,000 refused commands"
    );
}

#[test]
fn tamper_attempts_after_the_seal_are_refused_counted_and_reported() {
    let mut s = shop(&[]);
    let w = Watch::start(&s.target(), &s.keys, &WATCH);
    w.verdict("healthy", T);
    let mut c = Client::connect(s.addr.as_str(), "shop1", Role::Read, &keys::READ, T).unwrap();
    let before = c.descriptor().hooks.clone();
    s.control(cmd::TAMPER);
    s.vm.wait_line("svc: tamper attempts refused: 4 of 4", T);
    let (_, e) = w.wait("tampered", T, |e| e["event"] == "tampered");
    assert_eq!(
        (e["from"].as_u64(), e["to"].as_u64()),
        (Some(0), Some(4)),
        "{e}"
    );
    let d = c.describe().unwrap().clone();
    assert_eq!((d.sealed, d.tamper_count), (true, 4));
    assert_eq!(d.hooks, before, "the sealed table did not change");
    assert_eq!(s.vm.api("backdoor")["tamper_count"], 4);
    // Tampering is reported, and the guest, still running, is not hung.
    let after = w.collect(Duration::from_secs(1));
    assert!(after.iter().all(|e| e["verdict"] != "hung"), "{after:?}");
    assert_eq!(s.vm.api("pause")["ok"], true);
    extract_and_check(&s.addr, &s.keys, s.dir.path());
}

#[test]
fn wrong_keys_are_refused_and_the_target_is_unreachable_never_hung() {
    let s = shop(&[]);
    let wrong = s.dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        "read = \"ffeeddccbbaa99887766554433221100\"\nrepair = \"00112233445566778899aabbccddeeff\"\n",
    )
    .unwrap();
    let (code, _, err) = bdctl(&["status", &s.target(), "--key-file", wrong.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("authentication failed: not the key"), "{err}");
    let (code, _, err) = bdctl(&[
        "write",
        &s.target(),
        "--key-file",
        wrong.to_str().unwrap(),
        "control",
        "0",
        "0100000000000000",
    ]);
    assert_eq!(code, Some(1), "{err}");
    let w = Watch::start(&s.target(), &wrong, &WATCH);
    let (_, e) = w.verdict("unreachable", T);
    assert!(
        e["reason"].as_str().unwrap().contains("not the key"),
        "the reason names the key problem: {e}"
    );
    let during = w.collect(Duration::from_secs(1));
    assert!(during.iter().all(|e| e["verdict"] != "hung"), "{during:?}");
    // The guest never saw the wrong-key write: it is still serving.
    assert_eq!(s.vm.api("pause")["ok"], true);
    extract_and_check(&s.addr, &s.keys, s.dir.path());
}

#[test]
fn a_read_monitor_cannot_write_cas_or_faa_and_the_guest_never_notices() {
    let s = shop(&[]);
    let w = Watch::start(&s.target(), &s.keys, &WATCH);
    w.verdict("healthy", T);
    let mut r = Client::connect(s.addr.as_str(), "shop1", Role::Read, &keys::READ, T).unwrap();
    let control_hook = r.descriptor().hook("control").unwrap().id;
    // Each would hang the guest (command 1) if it got through.
    let refused = |res: Result<u64, ClientError>| {
        assert_eq!(res.unwrap_err().code(), Some(ErrorCode::Forbidden));
    };
    assert_eq!(
        r.write(control_hook, 0, &cmd::SPIN.to_le_bytes())
            .unwrap_err()
            .code(),
        Some(ErrorCode::Forbidden)
    );
    refused(r.cas(control_hook, 0, 0, cmd::SPIN));
    refused(r.faa(control_hook, 0, cmd::SPIN));
    // bdctl with a key file that holds only the read key cannot even try.
    let read_only = s.dir.path().join("read-only.toml");
    std::fs::write(&read_only, "read = \"000102030405060708090a0b0c0d0e0f\"\n").unwrap();
    let (code, _, err) = bdctl(&[
        "cas",
        &s.target(),
        "--key-file",
        read_only.to_str().unwrap(),
        "control",
        "0",
        "0",
        "1",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no repair key"), "{err}");
    assert_eq!(
        r.read(control_hook, 0, 8).unwrap(),
        0u64.to_le_bytes(),
        "the control word is untouched"
    );
    let after = w.collect(Duration::from_secs(1));
    assert!(after.iter().all(|e| e["verdict"] != "hung"), "{after:?}");
    assert!(!s.vm.console().contains("hanging"), "{}", s.vm.console());
    assert_eq!(s.vm.api("pause")["ok"], true);
    extract_and_check(&s.addr, &s.keys, s.dir.path());
}

#[test]
fn a_progress_box_scribbled_after_being_seen_is_corrupt_never_idle() {
    let s = shop(&[]);
    let hook_cmd = std::env::temp_dir().join(format!("bd-corrupt-{}", std::process::id()));
    let on_hang = format!("echo \"$BDCTL_EVENT\" > {}", hook_cmd.display());
    let mut args = WATCH.to_vec();
    args.extend(["--on-hang", &on_hang]);
    let w = Watch::start(&s.target(), &s.keys, &args);
    w.verdict("healthy", T);
    s.control(cmd::SCRIBBLE_PBOX);
    let (_, e) = w.verdict("corrupt", T);
    assert_eq!(e["hook"], "progress", "{e}");
    assert!(
        e["reason"].as_str().unwrap_or("").contains("bad magic"),
        "{e}"
    );
    // --on-hang acts on it as on a hang.
    let deadline = std::time::Instant::now() + T;
    while !hook_cmd.exists() {
        assert!(std::time::Instant::now() < deadline, "--on-hang never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    let told = std::fs::read_to_string(&hook_cmd).unwrap();
    let _ = std::fs::remove_file(&hook_cmd);
    assert!(told.contains("\"verdict\":\"corrupt\""), "{told}");
}

#[test]
fn a_guest_that_reboots_and_never_registers_is_lost_never_idle() {
    let mut s = shop(&["--on-reset", "reboot"]);
    let mut args = WATCH.to_vec();
    args.extend(["--grace-ms", "2000"]);
    let w = Watch::start(&s.target(), &s.keys, &args);
    let (_, first) = w.verdict("healthy", T);
    s.control(cmd::MUTE_RESET);
    s.vm.wait_line("svc: mute boot: registering nothing", T);
    let (_, r) = w.wait("rebooted", T, |e| e["event"] == "rebooted");
    assert_eq!(r["from"], first["generation"]);
    // The new boot is given its grace, then called lost: never idle.
    let (_, starting) = w.verdict("starting", T);
    assert_eq!(starting["generation"], r["to"]);
    let (_, lost) = w.verdict("lost", T);
    assert_eq!(lost["generation"], r["to"]);
    assert!(
        lost["reason"]
            .as_str()
            .unwrap_or("")
            .contains("showed no counter within 2000 ms"),
        "{lost}"
    );
    let seen = w.collect(Duration::from_millis(300));
    assert!(
        !seen.iter().any(|e| e["verdict"] == "idle"),
        "a lost guest was called idle: {seen:?}"
    );
}

/// A CPU hog pinned to CPU 0 next to vCPU thread `tid`, which is pinned
/// there too and put in SCHED_IDLE: the host starves it (it runs a few
/// milliseconds now and then, with gaps of a second and more).
struct Starver(std::process::Child);

/// Runs a scheduling tool (util-linux) that must succeed.
fn sched_tool(tool: &str, args: &[&str]) {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(out.status.success(), "{tool} {args:?}: {out:?}");
}

impl Starver {
    fn start(tid: i64) -> Self {
        let tid = tid.to_string();
        sched_tool("taskset", &["-p", "-c", "0", &tid]);
        sched_tool("chrt", &["--idle", "-p", "0", &tid]);
        let hog = std::process::Command::new("taskset")
            .args(["-c", "0", "sh", "-c", "while :; do :; done"])
            .spawn()
            .expect("start the CPU hog");
        Self(hog)
    }
}

impl Starver {
    /// Eases off: the thread back in SCHED_OTHER at nice 10, next to the
    /// hog (a tenth of the CPU or so: throttled, no longer starved).
    fn ease(tid: i64) {
        let tid = tid.to_string();
        sched_tool("chrt", &["--other", "-p", "0", &tid]);
        sched_tool("renice", &["-n", "10", "-p", &tid]);
    }
}

impl Drop for Starver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vcpu0_tid(vm: &Vm) -> i64 {
    let v = vm.api("vcpus");
    v["vcpus"][0]["tid"]
        .as_i64()
        .filter(|&t| t > 0)
        .unwrap_or_else(|| panic!("no vCPU thread id in {v}"))
}

#[test]
fn a_guest_the_host_starves_is_starved_never_hung_and_a_real_hang_is_still_hung() {
    let s = shop(&[]);
    let w = Watch::start(&s.target(), &s.keys, &WATCH);
    w.verdict("healthy", T);
    let tid = vcpu0_tid(&s.vm);
    let starver = Starver::start(tid);
    let (_, e) = w.verdict("starved", T);
    // It ran less than its deadline, and under a tenth of the stall.
    assert!(e["ran_ms"].as_u64() < e["deadline_ms"].as_u64(), "{e}");
    assert!(e["cpu_permille"].as_u64() < Some(100), "{e}");
    // A while of it: the guest is slow, not hung.
    let seen = w.collect(Duration::from_secs(3));
    assert!(
        !seen.iter().any(|e| e["verdict"] == "hung"),
        "a starved guest was judged hung: {seen:?}"
    );
    // Throttled to a share of the CPU it can live with, then hung for
    // real: once its vCPU has had a whole deadline of CPU without moving
    // the counter, it is hung, throttled or not.
    Starver::ease(tid);
    w.verdict("healthy", T);
    s.control(cmd::SPIN);
    let (_, e) = w.verdict("hung", T);
    assert_hung_os(&e);
    drop(starver);
}

#[test]
fn a_vmm_the_host_stopped_is_stalled_by_host_never_hung() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file(dir.path());
    let (agent, vm) = shop_with_agent(dir.path(), &k, "127.0.0.1:0", &[]);
    let w = Watch::start(&format!("shop1@{}", agent.addr), &k, &WATCH);
    w.verdict("healthy", T);
    vm.signal(libc::SIGSTOP);
    let (_, e) = w.verdict("stalled_by_host", T);
    assert_eq!(e["stopped_vcpus"], serde_json::json!([0]), "{e}");
    let seen = w.collect(Duration::from_secs(2));
    vm.signal(libc::SIGCONT);
    assert!(
        !seen.iter().any(|e| e["verdict"] == "hung"),
        "a stopped VMM's guest was judged hung: {seen:?}"
    );
    w.verdict("healthy", T);
    drop(agent);
}
