//! Section 1: the guest-side cost of one liveness report. A ring-3 test
//! guest (images/guests/bench_report.c) times, with the TSC, a progress
//! counter bump (one store), a watchdog pet (one port write to bdvmm's
//! i6300esb-style watchdog) and a serial heartbeat line; bdvmm's exit
//! counters are read between the guest's phases.

use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use backdoor_agent::Client;
use serde_json::json;

use crate::plot::Series;
use crate::report::{Figure, Section};
use crate::stats::Dist;
use crate::vm::{numbers_after, total_exits, Served};
use crate::Ctx;

const PHASES: [&str; 5] = ["bump", "single", "pet", "heartbeat", "end"];
/// The first counter's value in the guest's progress box (docs/abi.md
/// section 2: a 64-byte header, then 64-byte counters, value first).
const COUNTER_OFFSET: u64 = 64;

/// The guest's counter, read over the backdoor.
struct Counter {
    client: Client,
    hook: u32,
}

impl Counter {
    fn connect(addr: std::net::SocketAddr) -> Self {
        let client = crate::vm::reader(addr);
        let hook = client
            .descriptor()
            .hook("progress")
            .expect("a progress box")
            .id;
        Self { client, hook }
    }

    fn read(&mut self) -> u64 {
        let raw = self
            .client
            .read(self.hook, COUNTER_OFFSET, 8)
            .expect("read the counter");
        u64::from_le_bytes(raw.try_into().expect("8 bytes"))
    }
}

/// Polls the guest's counter over the backdoor, back to back, until
/// `stop`; returns the number of polls.
fn poll_counter(addr: std::net::SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut counter = Counter::connect(addr);
        let mut polls = 0;
        while !stop.load(Ordering::Relaxed) {
            counter.read();
            polls += 1;
        }
        polls
    })
}
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
         8-byte store into a registered progress box), 3000 single bumps each timed alone \
         while a monitor reads the counter over the backdoor back to back, with and without \
         an mfence after the store (and as many empty timings, the timer's own cost), 2000 \
         watchdog pets (one 32-bit port \
         write to bdvmm's i6300esb-style watchdog, `vmm/src/devices/watchdog.rs`), and 500 \
         serial heartbeat lines (`hb NNNNNN\\n`, 10 bytes to the 8250 UART). bdvmm's exit \
         counters (control socket `exits`) are read at the guest's phase markers, each \
         followed by ~0.2 s of exit-free spinning; exits per report = exits in the phase, \
         less the next marker line's bytes, ÷ reports. At the end the counter is read over \
         the backdoor and compared with the bumps the guest made.",
    );
    let (mut served, _) = Served::start("bench_report", "64M", "bench-report: phase bump");
    let vm = &mut served.vm;
    let mut snaps = Vec::new();
    let mut marker_len = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut poller = None;
    for p in PHASES {
        let line = vm.wait_line(&format!("bench-report: phase {p}"), T);
        snaps.push(total_exits(vm));
        marker_len.push(line.len() as u64 + 1);
        match p {
            // The single bumps meet a monitor reading their cache line.
            "single" => poller = Some(poll_counter(served.addr, stop.clone())),
            "pet" => stop.store(true, Ordering::Relaxed),
            _ => {}
        }
    }
    let polls = poller.map_or(0, |p| p.join().expect("the poller"));
    // What the backdoor says the guest bumped, against what it did.
    let over_backdoor = Counter::connect(served.addr).read();
    let vm = &mut served.vm;
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
    let single = ns("single", 1.0);
    let timer = ns("empty", 1.0);
    let fenced = ns("fenced", 1.0);
    let fence = ns("fence", 1.0);
    let bumps_made = bump.n as u64 * per_sample + (single.n + fenced.n) as u64;
    let exits_per = |i: usize, n: u64| -> f64 {
        snaps[i + 1]
            .saturating_sub(snaps[i])
            .saturating_sub(marker_len[i + 1]) as f64
            / n as f64
    };
    let bump_exits = exits_per(0, bump.n as u64 * per_sample);
    let single_exits = exits_per(1, (single.n + fenced.n) as u64);
    let pet_exits = exits_per(2, pet.n as u64);
    let hb_exits = exits_per(3, hb.n as u64);
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
            Figure::plain(name, d.mean, "ns", text(d, exits))
                .against("counter bump", bump.mean, format!("{:.3} ns", bump.mean))
                .headline(),
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
    )
    .headline()];
    // One bump alone, the timer's own cost (an empty timing's p50, with
    // the same fence) taken off: as the guest pays it (the store goes to
    // the store buffer), and until it is visible (the monitor's core
    // holds the line: the store must take it back).
    let less = |d: &Dist, t: &Dist| ((d.p50 - t.p50).max(0.0), (d.p99 - t.p50).max(0.0));
    let (one_p50, one_p99) = less(&single, &timer);
    let (vis_p50, vis_p99) = less(&fenced, &fence);
    sec.figures.push(
        Figure::plain(
            "one progress-counter bump alone, until visible (+ mfence), a monitor polling its line: p99",
            vis_p99,
            "ns",
            format!(
                "p99 {vis_p99:.1} ns, p50 {vis_p50:.1} ns (an mfence alone, {:.1} ns, taken off); \
                 {single_exits:.3} exits/bump; {polls} polls meanwhile",
                fence.p50
            ),
        )
        .against("watchdog pet", pet.p99, format!("p99 {:.0} ns", pet.p99))
        .headline(),
    );
    sec.notes.push(format!(
        "One bump alone as the guest pays it (no fence: the store waits in the store buffer \
         while the line comes back from the monitor's core): p50 {one_p50:.1} ns, p99 \
         {one_p99:.1} ns beyond the timer's own {:.1} ns.",
        timer.p50
    ));
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
    // A watchdog is petted about once a second: the cost per second of
    // reporting at that rate, and at a busy service's 1 kHz.
    let per_s = |ns: f64, hz: f64| ns * hz / 1e9 * 100.0;
    sec.notes.push(format!(
        "Reporting once a second (a watchdog's rate), one bump alone costs at most p99 \
         {vis_p99:.0} ns per second (until visible), {:.1e} % of a core; the pet costs {:.1} µs \
         per second, {:.4} %. At 1 kHz: {:.1e} % against {:.2} %. Either is small at a watchdog's rate; what the bump buys is \
         no exit, so reporting a thousand times a second, per thread or per session, stays \
         free.",
        per_s(vis_p99, 1.0),
        pet.p50 / 1e3,
        per_s(pet.p50, 1.0),
        per_s(vis_p99, 1000.0),
        per_s(pet.p50, 1000.0)
    ));
    sec.notes.push(format!(
        "The counter over the backdoor after the run: {over_backdoor}; bumps the guest made: \
         {bumps_made} ({}).",
        if over_backdoor == bumps_made {
            "equal"
        } else {
            "NOT equal"
        }
    ));
    assert_eq!(
        over_backdoor, bumps_made,
        "the backdoor saw every bump the guest made"
    );
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
        "single_bump_ns": single, "timer_ns": timer, "fenced_bump_ns": fenced,
        "fence_ns": fence, "polls_during_single": polls,
        "counter_over_backdoor": over_backdoor, "bumps_made": bumps_made,
        "exits_per_report": {"bump": bump_exits, "single": single_exits, "pet": pet_exits,
            "heartbeat": hb_exits},
        "exit_snapshots": snaps,
    });
    sec
}
