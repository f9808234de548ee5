//! Section 1: the guest-side cost of one liveness report. A ring-3 test
//! guest (images/guests/bench_report.c) times, with the TSC, a progress
//! counter bump (one store), a watchdog pet (one port write to bdvmm's
//! i6300esb-style watchdog) and a serial heartbeat line; bdvmm's exit
//! counters are read between the guest's phases.

use std::time::Duration;

use bdvmm_tests::Vm;
use serde_json::json;

use crate::plot::Series;
use crate::report::{Figure, Section};
use crate::stats::Dist;
use crate::vm::{numbers_after, total_exits};
use crate::Ctx;

const PHASES: [&str; 4] = ["bump", "pet", "heartbeat", "end"];
const T: Duration = Duration::from_secs(60);

/// Runs section 1.
pub fn run(ctx: &Ctx) -> Section {
    let mut sec = Section::new(
        1,
        "report_cost",
        "Guest-side cost of one liveness report",
        "A ring-3 test guest (`images/guests/bench_report.c`, 1 vCPU, interrupts off) times \
         each report with RDTSC (lfence-ordered), converted to ns with the TSC rate measured \
         on the host: 1000 samples of 10 000 progress-counter bumps (the backdoor's way: one \
         8-byte store into a registered progress box), 2000 watchdog pets (one 32-bit port \
         write to bdvmm's i6300esb-style watchdog, `vmm/src/devices/watchdog.rs`), and 500 \
         serial heartbeat lines (`hb NNNNNN\\n`, 10 bytes to the 8250 UART). bdvmm's exit \
         counters (control socket `exits`) are read at the guest's phase markers, each \
         followed by ~0.2 s of exit-free spinning; exits per report = exits in the phase, \
         less the next marker line's bytes, ÷ reports.",
    );
    let mut vm = Vm::test_guest("bench_report", 3, &["--mem", "64M"]);
    let mut snaps = Vec::new();
    let mut marker_len = Vec::new();
    for p in PHASES {
        let line = vm.wait_line(&format!("bench-report: phase {p}"), T);
        snaps.push(total_exits(&vm));
        marker_len.push(line.len() as u64 + 1);
    }
    vm.wait_line("bench-report: done", T);
    let console = vm.console();
    let ghz = ctx.machine.tsc_ghz;
    let per_sample = numbers_after(&console, "bench-report: bumps-per-sample")
        .first()
        .copied()
        .unwrap_or(1);
    let per = per_sample as f64;
    let ns = |name: &str, div: f64| -> Dist {
        let s = numbers_after(&console, &format!("bench-report: samples {name}"));
        assert!(!s.is_empty(), "guest printed no {name} samples");
        Dist::new(s.into_iter().map(|c| c as f64 / ghz / div).collect())
    };
    let bump = ns("bump", per);
    let pet = ns("pet", 1.0);
    let hb = ns("heartbeat", 1.0);
    let exits_per = |i: usize, n: u64| -> f64 {
        snaps[i + 1]
            .saturating_sub(snaps[i])
            .saturating_sub(marker_len[i + 1]) as f64
            / n as f64
    };
    let bump_exits = exits_per(0, bump.n as u64 * per_sample);
    let pet_exits = exits_per(1, pet.n as u64);
    let hb_exits = exits_per(2, hb.n as u64);
    let text = |d: &Dist, exits: f64| {
        format!(
            "mean {:.2} ns, p50 {:.2} ns, p99 {:.2} ns; {exits:.3} exits/report",
            d.mean, d.p50, d.p99
        )
    };
    let bump_text = format!(
        "mean {:.3} ns, p50 {:.3} ns, p99 {:.3} ns; {bump_exits:.6} exits/report",
        bump.mean, bump.p50, bump.p99
    );
    let vs_bump = |name: &str, d: &Dist, exits: f64| {
        [
            Figure::plain(name, d.mean, "ns", text(d, exits)).against(
                "counter bump",
                bump.mean,
                format!("{:.3} ns", bump.mean),
            ),
            Figure::plain(
                &format!("VM exits per {name}"),
                exits,
                "exits",
                format!("{exits:.3}"),
            )
            .against("per counter bump", bump_exits, format!("{bump_exits:.6}")),
        ]
    };
    sec.figures = vec![Figure::plain(
        "progress-counter bump (one store)",
        bump.mean,
        "ns",
        bump_text,
    )];
    sec.figures.extend(vs_bump(
        "watchdog pet (one port write, i6300esb-style)",
        &pet,
        pet_exits,
    ));
    sec.figures.extend(vs_bump(
        "serial heartbeat line (10 bytes to the 8250)",
        &hb,
        hb_exits,
    ));
    sec.notes.push(format!(
        "A bump costs the guest {:.2} TSC cycles here (a load, an add and a store, in a loop), \
         with no exit: ratios against it are in the tens of thousands and more. The exit ratios \
         have no finite value (0 exits per bump: n/a).",
        bump.mean * ghz
    ));
    sec.notes.push(
        "A real i6300esb pet is three MMIO writes (two unlock writes, then the reload), so \
         three exits; this device's single write is the cheapest any device-based pet can be."
            .into(),
    );
    if !ctx.machine.hardware_kvm() {
        sec.notes.push(
            "On this PVM host an exit to user space costs tens of microseconds; with hardware \
             KVM it is a few microseconds, so the pet and heartbeat figures would be smaller \
             there, and still thousands of times a bump."
                .into(),
        );
    }
    ctx.cdf_plot(
        &mut sec,
        "report_cost_cdf.svg",
        "Guest-side cost of one liveness report (ring 3)",
        "ns per report (log)",
        &[
            Series {
                label: "counter bump (per bump, 10 000-bump samples)",
                sorted: &bump.sorted,
            },
            Series {
                label: "watchdog pet",
                sorted: &pet.sorted,
            },
            Series {
                label: "serial heartbeat line",
                sorted: &hb.sorted,
            },
        ],
    );
    sec.details = json!({
        "tsc_ghz": ghz,
        "bump_ns": bump, "pet_ns": pet, "heartbeat_ns": hb,
        "exits_per_report": {"bump": bump_exits, "pet": pet_exits, "heartbeat": hb_exits},
        "exit_snapshots": snaps,
    });
    sec
}
