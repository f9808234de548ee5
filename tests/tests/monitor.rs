//! bdctl against the shop service guest (images/guests/svc.c): hang
//! detection in time, idle never hung, unreachable never hung (a cut
//! network path in a network namespace), reboots, extraction from paused,
//! hung, halted and VMM-less guests, and corrupt records skipped.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backdoor_agent::{Client, ErrorCode, Role};
use bdvmm_tests::netns::Netns;
use bdvmm_tests::shop::{
    assert_three_consistent_sessions, bdctl, bdctl_bin, extract, shop, Watch, T,
};
use bdvmm_tests::{exit, keys, repo_root, AgentProcess, Vm};

/// The svc guest's OS-level counter deadline (its "kernel" counter).
const KERNEL_DEADLINE_MS: u64 = 500;

#[test]
fn a_hang_is_detected_within_the_deadline_plus_two_intervals() {
    let s = shop(&[]);
    let w = Watch::start(
        &s.target(),
        &s.keys,
        &["--interval-ms", "50", "--exit-on-hang"],
    );
    w.verdict("healthy", T);
    std::thread::sleep(Duration::from_millis(300));
    let hung_at = Instant::now();
    s.control(1);
    let (seen, e) = w.verdict("hung", T);
    assert_eq!(
        (e["level"].as_str(), e["counter"].as_str()),
        (Some("os"), Some("kernel")),
        "{e}"
    );
    let latency = seen.duration_since(hung_at);
    // deadline + 2 intervals, plus generous slack for a loaded CI machine.
    assert!(
        latency < Duration::from_millis(KERNEL_DEADLINE_MS + 2 * 50 + 1500),
        "detected after {latency:?}"
    );
    assert!(
        latency >= Duration::from_millis(KERNEL_DEADLINE_MS - 100),
        "too early to be a real judgement: {latency:?}"
    );
    let mut w = w;
    assert_eq!(
        w.child.wait().unwrap().code(),
        Some(3),
        "--exit-on-hang exits 3"
    );
}

#[test]
fn a_blackholed_target_delays_nobody_elses_detection() {
    let s = shop(&[]);
    // Accepts connections (the kernel's backlog) and never answers: every
    // poll of it waits out the whole 30 s timeout. It comes first, so
    // polled one after the other, shop1 would wait 30 s for each poll.
    let dark = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dark_target = format!("dark@{}", dark.local_addr().unwrap());
    let started = Instant::now();
    let w = Watch::start(
        &dark_target,
        &s.keys,
        &["--interval-ms", "50", "--timeout-ms", "30000", &s.target()],
    );
    let shop1 =
        |v: &'static str| move |e: &serde_json::Value| e["target"] == "shop1" && e["verdict"] == v;
    let (healthy, _) = w.wait("shop1 healthy", T, shop1("healthy"));
    // Margins a loaded machine keeps, far under the dark target's 30 s.
    let first = healthy.duration_since(started);
    assert!(
        first < Duration::from_secs(15),
        "shop1 first judged after {first:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let hung_at = Instant::now();
    s.control(1);
    let (seen, e) = w.wait("shop1 hung", T, shop1("hung"));
    assert_eq!(e["level"], "os", "{e}");
    let latency = seen.duration_since(hung_at);
    assert!(
        latency < Duration::from_secs(15),
        "detected after {latency:?}"
    );
    drop(dark);
}

/// A shop guest and a healthy `bdctl watch` of it that extracts on a hang
/// (into the shop's scratch directory).
fn shop_watched_with_extract_on_hang() -> (bdvmm_tests::shop::Shop, Watch) {
    let s = shop(&[]);
    let out = s.dir.path().join("extracted");
    let w = Watch::start(
        &s.target(),
        &s.keys,
        &[
            "--interval-ms",
            "50",
            "--extract-on-hang",
            out.to_str().unwrap(),
        ],
    );
    w.verdict("healthy", T);
    (s, w)
}

/// The extraction an `extracted` event names.
fn extracted_file(e: &serde_json::Value) -> serde_json::Value {
    let file = e["file"]
        .as_str()
        .unwrap_or_else(|| panic!("no file in {e}"));
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

#[test]
fn extract_on_hang_succeeds_over_the_watchs_own_connection_when_no_slot_is_free() {
    let (s, w) = shop_watched_with_extract_on_hang();
    // The watch holds one of the agent's 64 slots; a repair connection to
    // trigger the hang and 62 idle monitors take all the others.
    let connect = |role, key: &[u8]| Client::connect(s.addr.as_str(), "shop1", role, key, T);
    let mut control = connect(Role::Repair, &keys::REPAIR).unwrap();
    let id = control.descriptor().hook("control").unwrap().id;
    let fillers: Vec<Client> = (0..62)
        .map(|_| connect(Role::Read, &keys::READ).unwrap())
        .collect();
    let busy = connect(Role::Read, &keys::READ).unwrap_err();
    assert_eq!(busy.code(), Some(ErrorCode::Busy), "{busy}");
    control.write(id, 0, &1u64.to_le_bytes()).unwrap();
    let (_, e) = w.wait("extracted", T, |e| {
        e["event"] == "extracted" || e["event"] == "action_failed"
    });
    assert_eq!(e["event"], "extracted", "{e}");
    assert_eq!(e["attempts"], 1, "not over the held connection: {e}");
    assert_three_consistent_sessions(&extracted_file(&e));
    drop(fillers);
}

#[test]
fn under_a_thousand_trickling_strangers_status_answers_and_a_hang_is_still_extracted() {
    const STRANGERS: usize = 1000;
    bdvmm_tests::raise_open_files(4 * STRANGERS as u64);
    let (s, w) = shop_watched_with_extract_on_hang();
    // Strangers that hold sockets and trickle a byte each every 200 ms,
    // connecting again whenever the agent cuts one off.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (addr, stop) = (s.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let connect = || std::net::TcpStream::connect(&addr).expect("a stranger connects");
            let mut socks: Vec<_> = (0..STRANGERS).map(|_| connect()).collect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for sock in &mut socks {
                    if std::io::Write::write(sock, &[0x42]).is_err() {
                        *sock = connect();
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let (code, out_text, err) = bdctl(&[
        "status",
        &s.target(),
        "--key-file",
        s.keys.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out_text}{err}");
    eprintln!(
        "flood: bdctl status under {STRANGERS} trickling strangers took {:?}",
        t.elapsed()
    );
    s.control(1);
    let (_, e) = w.wait("extracted", T, |e| {
        assert!(
            !(e["event"] == "verdict" && e["verdict"] == "unreachable"),
            "the watch lost the guest to the strangers: {e}"
        );
        e["event"] == "extracted" || e["event"] == "action_failed"
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    assert_eq!(e["event"], "extracted", "{e}");
    assert_three_consistent_sessions(&extracted_file(&e));
}

#[test]
fn idle_counters_are_never_reported_hung() {
    let s = shop(&[]);
    let w = Watch::start(&s.target(), &s.keys, &["--interval-ms", "50"]);
    w.verdict("healthy", T);
    // session-4 is IDLE with a 2 s deadline and never moves: 4 s of watching.
    let events = w.collect(Duration::from_secs(4));
    assert!(events.iter().all(|e| e["verdict"] != "hung"), "{events:?}");
    let (code, out, err) = bdctl(&[
        "status",
        &s.target(),
        "--key-file",
        s.keys.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines()
            .any(|l| l.contains("session-4") && l.contains("idle")),
        "{out}"
    );
}

#[test]
fn a_guest_reset_is_reported_as_rebooted_and_watching_goes_on() {
    let s = shop(&["--on-reset", "reboot"]);
    let w = Watch::start(&s.target(), &s.keys, &["--interval-ms", "50"]);
    let (_, first) = w.verdict("healthy", T);
    s.control(3);
    let (_, r) = w.wait("rebooted", T, |e| e["event"] == "rebooted");
    assert_eq!(r["from"], first["generation"]);
    assert_ne!(r["to"], r["from"]);
    // The rebooted service registers its backdoor again and is judged healthy in its new generation.
    let (_, again) = w.wait("healthy after reboot", T, |e| {
        e["verdict"] == "healthy" && e["generation"] == r["to"]
    });
    assert_eq!(again["generation"], r["to"]);
}

#[test]
fn extraction_works_from_paused_hung_and_halted_guests() {
    for (mode, cmd) in [("paused", 0u64), ("hung", 1), ("halted", 2)] {
        let mut s = shop(&[]);
        std::thread::sleep(Duration::from_millis(500)); // let the sessions advance
        if cmd == 0 {
            assert_eq!(s.vm.api("pause")["ok"], true);
        } else {
            s.control(cmd);
            s.vm.wait_line("svc: hanging with interrupts off", T);
        }
        let before = s.vm.api("exits");
        let out = s.dir.path().join("x.json");
        let (x, summary) = extract(&s.target(), &s.keys, &out);
        assert_three_consistent_sessions(&x);
        assert_eq!(x["summary"]["corrupt"], 0, "{mode}: {summary}");
        assert_eq!(x["summary"]["torn"], 0, "{mode}: {summary}");
        assert!(
            summary.contains("extracted 3 sessions from shop1"),
            "{mode}: {summary}"
        );
        assert_eq!(
            s.vm.api("exits"),
            before,
            "{mode}: extraction cost the guest exits"
        );
    }
}

#[test]
fn extraction_works_after_the_vmm_was_sigkilled() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file(dir.path());
    let agent = AgentProcess::start(dir.path(), &k);
    let sock = agent.vmm_sock.to_str().unwrap().to_owned();
    let mut vm = Vm::test_guest("svc", 0, &["--name", "shop1", "--agent-sock", &sock]);
    vm.wait_line("svc: serving sessions", T);
    std::thread::sleep(Duration::from_millis(500));
    vm.signal(libc::SIGKILL);
    assert_eq!(vm.wait_exit(T), None);
    let (x, _) = extract(
        &format!("shop1@{}", agent.addr),
        &k,
        &dir.path().join("x.json"),
    );
    assert_three_consistent_sessions(&x);
}

#[test]
fn corrupt_records_are_reported_and_skipped_and_the_rest_extracted() {
    let s = shop(&[]);
    std::thread::sleep(Duration::from_millis(300));
    s.control(4); // the guest scribbles over session 2's newest record
    let mut vm = s.vm;
    vm.wait_line("svc: scribbled over session 2", T);
    let out = s.dir.path().join("x.json");
    let (code, _, err) = bdctl(&[
        "extract",
        &format!("shop1@{}", s.addr),
        "--key-file",
        s.keys.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let x: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(x["summary"]["corrupt"], 1, "{err}");
    assert!(err.contains("corrupt"), "{err}");
    // Session 2 survives through its previous, intact version (double-buffered slots).
    assert_three_consistent_sessions(&x);
    assert_eq!(vm.api("stop")["ok"], true);
    assert_eq!(vm.wait_exit(T), Some(exit::OK));
}

#[test]
fn a_cut_network_path_is_unreachable_never_hung_and_watching_resumes() {
    let Some(ns) = Netns::create("bdt", 213) else {
        bdvmm_tests::skip(
            "a_cut_network_path_is_unreachable_never_hung_and_watching_resumes",
            "cannot create a network namespace with a veth link here (needs root and iproute2)",
        );
        return;
    };
    // The guest's host lives in the namespace; the monitor stays outside.
    let dir = tempfile::tempdir().unwrap();
    let k = keys::write_file(dir.path());
    let guest = bdvmm_tests::guest("svc");
    let addr = format!("{}:7790", ns.ns_ip());
    let sock = dir.path().join("api.sock");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(bdvmm_tests::bdvmm_bin())
        .args([
            "run",
            "--test-guest",
            guest.to_str().unwrap(),
            "--ring",
            "0",
            "--mem",
            "64M",
            "--name",
            "shop1",
            "--backdoor-listen",
            &addr,
            "--backdoor-keys",
            k.to_str().unwrap(),
            "--api-sock",
        ])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let w = Watch::start(
        &format!("shop1@{addr}"),
        &k,
        &["--interval-ms", "50", "--timeout-ms", "300"],
    );
    w.verdict("healthy", T);
    ns.link(false);
    let (_, e) = w.verdict("unreachable", T);
    assert!(e["reason"].is_string());
    // Two seconds without a path (longer than the kernel counter's deadline): never "hung".
    let during = w.collect(Duration::from_secs(2));
    assert!(during.iter().all(|e| e["verdict"] != "hung"), "{during:?}");
    ns.link(true);
    w.verdict("healthy", T);
    let _ = child.kill();
    let _ = child.wait();
    let _ = repo_root();
}

#[test]
fn config_file_metrics_and_on_hang_command_work_together() {
    let s = shop(&[]);
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("hang-event.json");
    let config = dir.path().join("watch.toml");
    std::fs::write(
        &config,
        format!(
            "interval_ms = 50\ntimeout_ms = 500\nkey_file = \"{}\"\nmetrics = \"127.0.0.1:0\"\non_hang = \"printf '%s' \\\"$BDCTL_EVENT\\\" > {}\"\n[[targets]]\ntarget = \"{}\"\n",
            s.keys.display(),
            marker.display(),
            s.target()
        ),
    )
    .unwrap();
    let mut child = Command::new(bdctl_bin())
        .args(["watch", "--json", "--exit-on-hang", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The metrics address is announced on stderr.
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let url = line
        .split("http://")
        .nth(1)
        .expect("metrics announcement")
        .trim()
        .to_owned();
    let (host, _) = url.split_once('/').unwrap();
    let scrape = || {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(host).unwrap();
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        body
    };
    let deadline = Instant::now() + T;
    while !scrape().contains("bdctl_target_verdict{target=\"shop1\",verdict=\"healthy\"} 1") {
        assert!(
            Instant::now() < deadline,
            "never healthy in metrics:\n{}",
            scrape()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = scrape();
    assert!(
        body.contains(
            "bdctl_progress_value{target=\"shop1\",hook=\"progress\",slot=\"0\",counter=\"kernel\",owner=\"0\",level=\"os\"}"
        ),
        "{body}"
    );
    // Real Prometheus tooling accepts it: families grouped, names by the
    // conventions, every series unique.
    let exposition = body.split_once("\r\n\r\n").expect("an HTTP reply").1;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package: tools/deps.sh ensure test)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), exposition.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {checked:?}\n{exposition}"
    );
    assert!(
        body.contains("bdctl_target_up{target=\"shop1\"} 1"),
        "{body}"
    );
    s.control(1);
    assert_eq!(child.wait().unwrap().code(), Some(3));
    let event: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&marker).expect("on-hang command ran"))
            .unwrap();
    assert_eq!(
        (
            event["verdict"].as_str(),
            event["level"].as_str(),
            event["target"].as_str()
        ),
        (Some("hung"), Some("os"), Some("shop1"))
    );
}

/// A live guest: bench_sessions rewrites all 1,024 of its sessions over
/// and over (every pass raises each version by one, and each payload's
/// cart digit follows its version) while bdctl extracts them.
#[test]
fn a_guest_rewriting_every_session_is_extracted_whole_while_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys::write_file(dir.path());
    let mut vm = Vm::test_guest(
        "bench_sessions",
        3,
        &[
            "--mem",
            "128M",
            "--name",
            "bench",
            "--backdoor-listen",
            "127.0.0.1:0",
            "--backdoor-keys",
            keys.to_str().unwrap(),
        ],
    );
    vm.wait_line("bench-sessions: ready", T);
    let addr = vm.agent_addr();
    vm.send_console("c");
    vm.wait_line("bench-sessions: churning", T);
    let (mut accepted, mut slots, mut newest) = (0, 0, Vec::new());
    for round in 0..5 {
        let (x, summary) = extract(
            &format!("bench@{addr}"),
            &keys,
            &dir.path().join(format!("x{round}.json")),
        );
        let s = &x["summary"];
        assert_eq!(s["corrupt"], 0, "{summary}");
        let sessions = x["sessions"].as_array().unwrap();
        // Every session is there, or its slot is reported torn: none lost.
        assert_eq!(
            sessions.len() as u64 + s["torn"].as_u64().unwrap(),
            1024,
            "{summary}"
        );
        for r in sessions {
            let (id, version) = (
                r["session_id"].as_u64().unwrap(),
                r["version"].as_u64().unwrap(),
            );
            let text = r["payload_text"].as_str().unwrap();
            let cart = (id - 1 + version) % 7;
            assert!(
                text.starts_with(&format!("session-{:04}: cart={cart}", id - 1)),
                "session {id} version {version} holds another version's payload: {text}"
            );
        }
        accepted += s["accepted"].as_u64().unwrap();
        slots += 1024;
        newest.push(
            sessions
                .iter()
                .map(|r| r["version"].as_u64().unwrap())
                .max(),
        );
    }
    vm.send_console("s");
    let still = vm.wait_line("bench-sessions: still", T);
    let last: u64 = still.split_whitespace().last().unwrap().parse().unwrap();
    // The guest wrote throughout: later extractions saw newer versions,
    // and none saw a version the guest had not yet written.
    assert!(newest.windows(2).all(|w| w[0] < w[1]), "{newest:?}");
    assert!(
        newest.iter().all(|v| v.unwrap() <= last),
        "{newest:?} > {last}"
    );
    // Torn is an honest answer for a slot rewritten at every look, but a
    // live guest must not make extraction fail: nearly all are read.
    assert!(accepted * 100 >= slots * 99, "{accepted} of {slots}");
    // Once it is still, one extraction has every session at the last version.
    let (x, summary) = extract(
        &format!("bench@{addr}"),
        &keys,
        &dir.path().join("still.json"),
    );
    let sessions = x["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1024, "{summary}");
    assert!(sessions.iter().all(|r| r["version"] == last), "{summary}");
}
