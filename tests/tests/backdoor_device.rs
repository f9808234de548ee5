//! The backdoor device with real guests: hooks, seal, tamper counting,
//! validation error codes, reset to a new generation, and the fast path
//! (a million counter bumps) costing the guest no exits at all.

use std::thread::sleep;
use std::time::Duration;

use bdvmm_tests::{exit, Vm};

const T: Duration = Duration::from_secs(60);

fn assert_all_passed(vm: &Vm) {
    let console = vm.console();
    assert!(
        !console.contains("FAIL:"),
        "a guest check failed:\n{console}"
    );
    assert!(
        console.contains(" 0 unexpected failures"),
        "no passing summary:\n{console}"
    );
}

#[test]
fn a_sealed_table_refuses_every_change_and_counts_each_attempt() {
    let mut vm = Vm::test_guest("bd_seal", 3, &[]);
    vm.wait_line("bd-seal: done", T);
    assert_all_passed(&vm);
    // The guest made exactly six attempts after the seal; the VMM's own
    // view (what monitors will read) agrees, and the table is intact.
    let bd = vm.api("backdoor");
    assert_eq!(bd["ok"], true);
    assert_eq!(bd["sealed"], true, "{bd}");
    assert_eq!(bd["tamper_count"], 6, "{bd}");
    let hooks = bd["hooks"].as_array().unwrap();
    let summary: Vec<(String, String, u64, u64)> = hooks
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_owned(),
                h["kind"].as_str().unwrap().to_owned(),
                h["len"].as_u64().unwrap(),
                h["perms"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("progress".into(), "progress_box".into(), 8192, 1),
            ("state".into(), "state_box".into(), 16384, 1),
            ("repair".into(), "repair".into(), 4096, 7),
        ],
        "shrink, remap and permission changes after the seal left no trace"
    );
    // The event stream tells the same story: each hook registered, one
    // seal, and the refused commands counted (sampled, not one line each).
    let tamper = vm.wait_event(T, |e| e["event"] == "tamper" && e["tamper_count"] == 6);
    let events = vm.events();
    let registered: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "hook_registered")
        .map(|e| (e["name"].as_str().unwrap(), e["generation"].clone()))
        .collect();
    assert_eq!(
        registered,
        ["progress", "state", "repair"].map(|n| (n, bd["generation"].clone())),
        "{events:#?}"
    );
    let sealed: Vec<_> = events.iter().filter(|e| e["event"] == "sealed").collect();
    assert_eq!(sealed.len(), 1, "{events:#?}");
    assert_eq!(sealed[0]["hooks"], 3);
    assert_eq!(tamper["generation"], bd["generation"]);
    let printed: u64 = vm
        .console()
        .lines()
        .find_map(|l| l.strip_prefix("bd-seal: generation "))
        .and_then(|g| g.trim().parse().ok())
        .expect("guest printed its generation");
    assert_eq!(
        bd["generation"], printed,
        "guest and VMM see the same generation"
    );
    assert_eq!(vm.api("status")["generation"], printed);
    assert_eq!(vm.api("stop")["ok"], true);
    assert_eq!(vm.wait_exit(T), Some(exit::OK));
}

#[test]
fn invalid_hook_tables_get_the_documented_error_codes() {
    let mut vm = Vm::test_guest("bd_invalid", 3, &[]);
    assert_eq!(
        vm.wait_exit(T),
        Some(exit::OK),
        "{}\n{}",
        vm.console(),
        vm.stderr()
    );
    assert_all_passed(&vm);
    for code in [
        "E_ALIGN",
        "E_RANGE",
        "E_TOO_LARGE",
        "E_KIND",
        "E_PERMS",
        "E_NAME",
        "E_OVERLAP",
        "E_DESC",
        "E_NO_HOOK",
        "E_COMMAND",
        "E_TOO_MANY",
    ] {
        assert!(
            vm.console().contains(code),
            "no check of {code}:\n{}",
            vm.console()
        );
    }
}

#[test]
fn a_guest_reset_gives_a_new_generation_and_an_empty_unsealed_table() {
    let mut vm = Vm::test_guest("bd_reset", 3, &["--on-reset", "reboot"]);
    assert_eq!(
        vm.wait_exit(T),
        Some(exit::OK),
        "{}\n{}",
        vm.console(),
        vm.stderr()
    );
    assert_all_passed(&vm);
    let console = vm.console();
    let g1: u64 = console
        .lines()
        .find_map(|l| l.strip_prefix("bd-reset: boot 1 generation "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no boot 1 line:\n{console}"));
    let boot2 = console
        .lines()
        .find(|l| l.starts_with("bd-reset: boot 2 generation "))
        .unwrap_or_else(|| panic!("no boot 2 line:\n{console}"));
    assert!(boot2.ends_with(&format!("(was {g1})")), "{boot2}");
    let g2: u64 = boot2
        .strip_prefix("bd-reset: boot 2 generation ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("bad boot 2 line {boot2:?}"));
    // bdvmm's events: boot 1, its reset and the reboot it chose, boot 2 at
    // the new generation, and a clean stop with the exits it counted.
    let events = vm.events();
    let story: Vec<_> = events
        .iter()
        .filter(|e| ["boot", "reset", "stop"].contains(&e["event"].as_str().unwrap_or("")))
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_owned(),
                e["generation"].as_u64().or(e["boot"].as_u64()),
                e["action"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(story.len(), 4, "{events:#?}");
    assert_eq!(story[0].0, "boot");
    assert_eq!(story[1], ("reset".into(), None, Some("reboot".into())));
    assert_eq!(story[2], ("boot".into(), Some(g2), None));
    assert_eq!(story[3].0, "stop");
    let boots: Vec<_> = events.iter().filter(|e| e["event"] == "boot").collect();
    assert_eq!(
        (boots[0]["boot"].as_u64(), boots[0]["generation"].as_u64()),
        (Some(1), Some(g1))
    );
    assert_eq!(boots[1]["boot"], 2);
    let stop = events.last().unwrap();
    assert_eq!(
        (
            stop["event"].as_str(),
            stop["reason"].as_str(),
            stop["exit_status"].as_u64()
        ),
        (Some("stop"), Some("power_off"), Some(0)),
        "{stop}"
    );
    assert!(stop["exits"]["io_out"].as_u64() > Some(0), "{stop}");
}

#[test]
fn without_reboot_a_reset_still_ends_the_vm() {
    let mut vm = Vm::test_guest("bd_reset", 3, &[]);
    assert_eq!(vm.wait_exit(T), Some(exit::RESET));
    let events = vm.events();
    let told: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "reset" || e["event"] == "stop")
        .map(|e| {
            (
                e["event"].as_str().unwrap(),
                e["reason"].as_str().unwrap(),
                e["action"]
                    .as_str()
                    .or(e["exit_status"].as_u64().map(|_| "-")),
            )
        })
        .collect();
    assert_eq!(
        told,
        [
            ("reset", "reset", Some("stop")),
            ("stop", "reset", Some("-"))
        ],
        "{events:#?}"
    );
    assert_eq!(events.last().unwrap()["exit_status"], exit::RESET);
}

#[test]
fn a_million_counter_bumps_cost_the_guest_no_exits() {
    let mut vm = Vm::test_guest("bd_bump", 3, &[]);
    let mmio_line = vm.wait_line("bd-bump: mmio ", T);
    let guest_mmio: u64 = mmio_line
        .trim_start_matches("bd-bump: mmio ")
        .trim()
        .parse()
        .unwrap();
    let console = vm.console();
    assert!(
        console.contains("bd-bump: done 250000 250000 250000 250000"),
        "{console}"
    );
    let st = vm.api("status");
    let e = &st["exits"][0];
    // Every exit is accounted for by a console byte or a device-register
    // access the guest counted itself: the 10^6 bumps added none.
    assert_eq!(e["io_out"], console.len() as u64, "{st}");
    assert_eq!(
        e["mmio_read"].as_u64().unwrap() + e["mmio_write"].as_u64().unwrap(),
        guest_mmio,
        "{st}"
    );
    assert_eq!(e["io_in"], 0, "{st}");
    sleep(Duration::from_millis(200));
    assert_eq!(
        vm.api("status")["exits"],
        st["exits"],
        "a spinning ring-3 guest makes no exits"
    );
    assert_eq!(vm.api("stop")["ok"], true);
    assert_eq!(vm.wait_exit(T), Some(exit::OK));
}
