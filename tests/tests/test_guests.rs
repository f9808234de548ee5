//! Freestanding test guests under bdvmm: console, power-off status,
//! multi-vCPU start, triple fault, reset, signals.

use std::time::Duration;

use bdvmm_tests::{exit, Vm};

const T: Duration = Duration::from_secs(30);

#[test]
fn hello_prints_and_powers_off_in_ring_3() {
    let mut vm = Vm::test_guest("hello", 3, &[]);
    assert_eq!(vm.wait_exit(T), Some(exit::OK), "{}", vm.stderr());
    assert_eq!(vm.console(), "hello: ring 3, vcpu 0 of 1, ram 64 MiB\n");
}

#[test]
fn hello_prints_and_powers_off_in_ring_0() {
    let mut vm = Vm::test_guest("hello", 0, &["--mem", "96M"]);
    assert_eq!(vm.wait_exit(T), Some(exit::OK), "{}", vm.stderr());
    assert_eq!(vm.console(), "hello: ring 0, vcpu 0 of 1, ram 96 MiB\n");
}

#[test]
fn every_vcpu_reports_in() {
    for vcpus in [2, 4] {
        let n = vcpus.to_string();
        let mut vm = Vm::test_guest("smp", 3, &["--vcpus", &n]);
        assert_eq!(vm.wait_exit(T), Some(exit::OK), "{}", vm.stderr());
        let console = vm.console();
        for i in 0..vcpus {
            assert!(
                console.contains(&format!("smp: vcpu {i} reporting\n")),
                "{console}"
            );
        }
        assert!(
            console.ends_with(&format!("smp: all {vcpus} vcpus reported\n")),
            "{console}"
        );
    }
}

#[test]
fn triple_fault_is_reported_with_registers_and_a_nonzero_status() {
    for ring in [3, 0] {
        let mut vm = Vm::test_guest("triple_fault", ring, &[]);
        assert_eq!(vm.wait_exit(T), Some(exit::TRIPLE_FAULT));
        assert_eq!(vm.console(), "triple-fault: about to fault\n");
        let err = vm.stderr();
        assert!(err.contains("vCPU 0 triple-faulted"), "{err}");
        assert!(
            err.contains("RIP=0000000000200"),
            "register dump names the faulting RIP: {err}"
        );
        assert!(err.contains(&format!("CPL={ring}")), "{err}");
    }
}

#[test]
fn i8042_reset_stops_the_vm_with_the_reset_status() {
    let mut vm = Vm::test_guest("reset", 3, &[]);
    assert_eq!(vm.wait_exit(T), Some(exit::RESET));
    assert_eq!(vm.console(), "reset: requesting i8042 reset\n");
}

#[test]
fn a_failing_guest_status_fails_bdvmm() {
    let mut vm = Vm::test_guest("fail", 3, &[]);
    assert_eq!(vm.wait_exit(T), Some(exit::GUEST_FAILED));
    assert!(vm.console().contains("FAIL: deliberate failure"));
    assert!(
        vm.stderr().contains(r#""reason":"power_off","status":1"#),
        "{}",
        vm.stderr()
    );
}

#[test]
fn console_input_reaches_the_guest_whole_and_in_order() {
    // Longer than the UART's 64-byte FIFO, so bdvmm must hold the rest
    // back and refill as the guest reads.
    let long: String = (0..200u8).map(|i| char::from(b'a' + i % 26)).collect();
    for ring in [3, 0] {
        let mut vm = Vm::test_guest("echo", ring, &[]);
        vm.wait_console("echo: ready\n", T);
        vm.send_console("hello bdvmm\n");
        vm.send_console(&format!("{long}\nquit\n"));
        assert_eq!(vm.wait_exit(T), Some(exit::OK), "{}", vm.stderr());
        assert_eq!(
            vm.console(),
            format!("echo: ready\necho: hello bdvmm\necho: {long}\n"),
            "ring {ring}"
        );
    }
}

#[test]
fn console_log_receives_the_same_bytes_as_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let mut vm = Vm::test_guest(
        "smp",
        3,
        &["--vcpus", "2", "--console-log", log.to_str().unwrap()],
    );
    assert_eq!(vm.wait_exit(T), Some(exit::OK));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), vm.console());
}

#[test]
fn sigterm_and_sigint_stop_a_running_guest() {
    for (sig, code) in [
        (libc::SIGTERM, exit::TERMINATED),
        (libc::SIGINT, exit::INTERRUPTED),
    ] {
        let mut vm = Vm::test_guest("ticker", 3, &["--vcpus", "2"]);
        vm.wait_console("tick 1\n", T);
        vm.signal(sig);
        assert_eq!(vm.wait_exit(T), Some(code));
        assert!(
            vm.stderr().contains(&format!("received signal {sig}")),
            "{}",
            vm.stderr()
        );
    }
}

#[test]
fn a_guest_spinning_in_ring_0_with_interrupts_off_can_still_be_stopped() {
    // exits' vCPU 1 spins forever; in ring 0 every spin is emulated with IF=0.
    let mut vm = Vm::test_guest("exits", 0, &["--vcpus", "2"]);
    vm.wait_console("exits: done\n", T);
    vm.signal(libc::SIGTERM);
    assert_eq!(vm.wait_exit(T), Some(exit::TERMINATED));
}
