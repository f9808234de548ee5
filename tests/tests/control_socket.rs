//! The control socket: status, pause/resume, stop, exit counters that move
//! exactly as the guest's actions predict, and bad requests.

use std::thread::sleep;
use std::time::Duration;

use bdvmm_tests::{exit, Vm};

const T: Duration = Duration::from_secs(30);

fn ticks(console: &str) -> usize {
    console.matches("tick ").count()
}

#[test]
fn pause_stops_guest_progress_and_resume_restarts_it() {
    let mut vm = Vm::test_guest("ticker", 3, &["--vcpus", "2"]);
    vm.wait_console("tick 3\n", T);
    let reply = vm.api("pause");
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(vm.api("status")["state"], "paused");
    let (console_at_pause, out_at_pause) = (vm.console(), vm.exits("io_out"));
    sleep(Duration::from_millis(400));
    // The ticker prints about every 10 ms: 400 ms without a byte means paused.
    assert_eq!(vm.console(), console_at_pause, "guest printed while paused");
    assert_eq!(
        vm.exits("io_out"),
        out_at_pause,
        "guest exited while paused"
    );

    assert_eq!(vm.api("resume")["ok"], true);
    assert_eq!(vm.api("status")["state"], "running");
    let next = format!("tick {}\n", ticks(&console_at_pause) + 3);
    vm.wait_console(&next, T);
    assert!(
        vm.exits("interrupted") >= 2,
        "pausing kicks every vCPU out of KVM_RUN"
    );
    let told: Vec<_> = vm
        .events()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .filter(|e| e == "paused" || e == "resumed")
        .collect();
    assert_eq!(told, ["paused", "resumed"]);
}

#[test]
fn exit_counters_match_the_guests_actions_exactly() {
    let mut vm = Vm::test_guest("exits", 3, &[]);
    vm.wait_console("exits: done\n", T);
    // One `out` per console byte, plus the workload's 1000 outs, 300 ins,
    // 200 MMIO reads and 100 MMIO writes. Nothing else exits.
    let st = vm.api("status");
    let e = &st["exits"][0];
    let console_bytes = vm.console().len() as u64;
    assert_eq!(
        console_bytes,
        ("exits: start\n".len() + "exits: done\n".len()) as u64
    );
    assert_eq!(e["io_out"], 1000 + console_bytes, "{st}");
    assert_eq!(e["io_in"], 300, "{st}");
    assert_eq!(e["mmio_read"], 200, "{st}");
    assert_eq!(e["mmio_write"], 100, "{st}");
    assert_eq!(st["unhandled_pio"], 1300, "port 0x80 has no device: {st}");
    assert_eq!(st["unhandled_mmio"], 300, "{st}");

    // The guest now computes natively in ring 3: no exits at all.
    sleep(Duration::from_millis(300));
    let later = vm.api("status");
    assert_eq!(
        later["exits"], st["exits"],
        "ring-3 computation must not exit"
    );

    assert_eq!(vm.api("stop")["ok"], true);
    assert_eq!(vm.wait_exit(T), Some(exit::OK));
}

#[test]
fn status_describes_the_vm() {
    let mut vm = Vm::test_guest("ticker", 3, &["--vcpus", "2", "--mem", "128M"]);
    vm.wait_console("tick 0\n", T);
    let st = vm.api("status");
    assert_eq!(st["ok"], true);
    assert_eq!(st["state"], "running");
    assert_eq!(st["vcpus"], 2);
    assert_eq!(st["mem_bytes"], 128u64 << 20);
    assert_eq!(st["pid"], vm.pid());
    assert!(st["guest"].as_str().unwrap().ends_with("ticker.elf"));
    assert_eq!(st["exits"].as_array().unwrap().len(), 2);
    assert!(
        st["boot_timer_ns"].is_null(),
        "ticker never touches the boot timer"
    );
}

#[test]
fn bad_requests_get_errors_and_the_vm_keeps_running() {
    let mut vm = Vm::test_guest("ticker", 3, &[]);
    vm.wait_console("tick 0\n", T);
    for bad in [
        &b"hello"[..],
        br#"{"cmd":"reboot"}"#,
        b"{}",
        br#"{"cmd":1}"#,
        b"\xff\xff",
    ] {
        let reply: serde_json::Value = serde_json::from_str(&vm.api_raw(bad)).unwrap();
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(
            reply["error"]
                .as_str()
                .unwrap()
                .contains("expected a JSON object"),
            "{reply}"
        );
    }
    let huge = vec![b'x'; 10_000];
    assert!(
        vm.api_raw(&huge).contains("longer than"),
        "oversized requests are refused"
    );
    assert_eq!(vm.api("status")["state"], "running");
    assert_eq!(vm.api("stop")["ok"], true);
    assert_eq!(vm.wait_exit(T), Some(exit::OK));
}

/// The address range of `symbol` in an ELF file (nm's view).
fn symbol_range(elf: &std::path::Path, symbol: &str) -> std::ops::Range<u64> {
    let out = std::process::Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(elf)
        .output()
        .expect("run nm");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(3) == Some(symbol))
        .unwrap_or_else(|| panic!("no {symbol} in {}:\n{text}", elf.display()));
    let w: Vec<&str> = line.split_whitespace().collect();
    let start = u64::from_str_radix(w[0], 16).unwrap();
    start..start + u64::from_str_radix(w[1], 16).unwrap()
}

#[test]
fn vcpus_tells_where_a_hung_guest_spins_or_halts_with_interrupts_off() {
    // svc (ring 0) hangs on a command: cli, then pause in a loop (1) or hlt (2).
    let main = symbol_range(&bdvmm_tests::guest("svc"), "main");
    for (how, halted) in [(1u64, false), (2, true)] {
        let mut s = bdvmm_tests::shop::shop(&[]);
        let running = s.vm.api("vcpus");
        assert_eq!(running["ok"], true, "{running}");
        assert_eq!(
            running["vcpus"][0]["interrupts_enabled"], false,
            "{running}"
        );
        s.control(how);
        s.vm.wait_line("svc: hanging with interrupts off", T);
        sleep(Duration::from_millis(200));
        let mut rips = Vec::new();
        for _ in 0..3 {
            let r = s.vm.api("vcpus");
            let v = &r["vcpus"][0];
            assert_eq!(
                (
                    v["fresh"].as_bool(),
                    v["cpl"].as_u64(),
                    v["interrupts_enabled"].as_bool()
                ),
                (Some(true), Some(0), Some(false)),
                "{r}"
            );
            assert_eq!(v["halted"].as_bool(), Some(halted), "{r}");
            let rip = v["rip"].as_u64().unwrap();
            assert!(
                main.contains(&rip),
                "RIP {rip:#x} outside svc's main {main:x?}: {r}"
            );
            rips.push(rip);
        }
        // Stuck in the same few instructions: spinning, or at the hlt.
        let spread = rips.iter().max().unwrap() - rips.iter().min().unwrap();
        assert!(spread < 16, "RIPs {rips:x?}");
    }
    // A paused VM: where it parked is where it is, and it stays put.
    let mut vm = Vm::test_guest("ticker", 3, &[]);
    vm.wait_console("tick 2\n", T);
    assert_eq!(vm.api("pause")["ok"], true);
    let a = vm.api("vcpus");
    let b = vm.api("vcpus");
    assert_eq!(a["state"], "paused");
    assert_eq!(a["vcpus"][0]["rip"], b["vcpus"][0]["rip"], "{a} {b}");
    assert_eq!(a["vcpus"][0]["cpl"], 3, "{a}");
}

/// Runs Debian's `python3 -c SCRIPT ARG` as uid/gid 65534 (nobody): its
/// stdout (not a python3 on PATH: it may live where nobody cannot reach).
fn as_nobody(script: &str, arg: &std::path::Path) -> String {
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(arg)
        .output()
        .expect("run setpriv (util-linux)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn another_users_process_cannot_drive_the_vm_even_where_the_socket_lets_it_in() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bdvmm_tests::skip(
            "another_users_process_cannot_drive_the_vm_even_where_the_socket_lets_it_in",
            "it must run as root to start a process of another user",
        );
        return;
    }
    let mut vm = Vm::test_guest("ticker", 3, &[]);
    vm.wait_console("tick 3\n", T);
    // Filesystem permissions that would let anyone in.
    let sock = vm.dir().join("api.sock");
    std::fs::set_permissions(vm.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let reply = as_nobody(
        "import socket, sys\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.connect(sys.argv[1])\n\
         try:\n    s.sendall(b'{\"cmd\":\"pause\"}\\n')\n    print(repr(s.recv(4096)))\n\
         except OSError as e:\n    print('closed', e.errno)\n",
        &sock,
    );
    assert!(
        reply.trim() == "b''" || reply.starts_with("closed"),
        "nobody got an answer: {reply}"
    );
    assert_eq!(vm.api("status")["state"], "running", "nobody paused the VM");
}
