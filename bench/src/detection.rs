//! Section 4: hang-detection latency for several (deadline, interval)
//! pairs, and how many guests × counters one monitor thread polls at
//! 1 kHz. Baseline for both: one 8-byte READ round trip, same run.
//!
//! A real guest (`bench_detect.c`, under bdvmm) bumps a counter about
//! every millisecond until the host tells it to stop; bdctl's own poller
//! and judge report the hang. Capacity is measured on fake guests (an
//! agent over a memfd), where only the monitor's cost matters.

use std::time::{Duration, Instant};

use backdoor_abi::HookKind;
use backdoor_agent::Client;
use bdctl::judge::{Judge, Verdict};
use bdctl::poll;
use serde_json::json;

use crate::plot::Series;
use crate::remote_reads::met;
use crate::report::{Figure, Section};
use crate::stats::Dist;
use crate::vm::{reader, Served};
use crate::Ctx;
use bdvmm_tests::fake_guest::{self, hook};

const PAIRS: [(u32, u64); 3] = [(100, 10), (100, 50), (500, 100)];

/// One trial on the real guest: ms from the host's stop command (the
/// guest's last bump is within about a millisecond of it) to bdctl's
/// HUNG verdict, or `None` if the verdict came before the command (the
/// guest's vCPU got no CPU for a whole deadline: a loaded machine; the
/// monitor's verdict was right by what it saw).
fn detect_once(
    served: &mut Served,
    c: &mut Client,
    interval: u64,
    run_for: Duration,
) -> Option<f64> {
    let mut judge = Judge::new();
    let start = Instant::now();
    let mut next = start;
    let mut stopped: Option<Instant> = None;
    let detected = loop {
        if stopped.is_none() && start.elapsed() >= run_for {
            served.vm.send_console("h");
            stopped = Some(Instant::now());
        }
        let obs = poll::observe(c).map_err(|e| backdoor_abi::ErrorChain(&e).to_string());
        judge.observe(Instant::now(), obs.as_ref().map_err(Clone::clone));
        if let Some(Verdict::Hung { .. }) = judge.verdict() {
            break Instant::now();
        }
        next += Duration::from_millis(interval);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    };
    served.vm.send_console("r");
    // Bumping again before the next trial's judge starts.
    std::thread::sleep(Duration::from_millis(20));
    stopped.map(|t| detected.duration_since(t).as_secs_f64() * 1e3)
}

/// Polls per second one thread sustains over `conns` connections to `addr`.
pub(crate) fn capacity(addr: std::net::SocketAddr, conns: usize, window: Duration) -> f64 {
    let mut targets: Vec<Client> = (0..conns).map(|_| fake_guest::connect(addr)).collect();
    let mut judges: Vec<Judge> = (0..conns).map(|_| Judge::new()).collect();
    let t = Instant::now();
    let mut polls = 0u64;
    while t.elapsed() < window {
        for (c, j) in targets.iter_mut().zip(&mut judges) {
            let obs =
                poll::observe_counters(c).map_err(|e| backdoor_abi::ErrorChain(&e).to_string());
            j.observe(Instant::now(), obs.as_ref().map_err(Clone::clone));
            polls += 1;
        }
    }
    polls as f64 / t.elapsed().as_secs_f64()
}

/// Runs section 4.
pub fn run(ctx: &Ctx) -> Section {
    let trials: u64 = if ctx.quick { 3 } else { 20 };
    let window = Duration::from_millis(if ctx.quick { 300 } else { 2000 });
    let mut sec = Section::new(
        4,
        "detection",
        "Hang detection latency and monitor capacity",
        &format!(
            "Detection: a ring-3 guest under bdvmm (`bench_detect.c`) bumps one \
             application-level counter about every 1 ms, with the pair's deadline; after a \
             varying 150–250 ms the host tells it (a byte on its console, read at each bump) to \
             stop bumping while it keeps running; bdctl's poller (`poll::observe`: DESCRIBE + \
             counter READs) and judge run at the given interval against bdvmm's agent on \
             loopback; latency is the stop command → HUNG verdict (the last bump is within \
             about 1 ms of the command), {trials} trials per pair, against the bound deadline + \
             2 × interval. Capacity: one monitor thread polls (one \
             counter READ per poll, as `bdctl watch` does between descriptor refreshes) as fast \
             as it can for {:.1} s; guests at 1 kHz = polls/s ÷ 1000. Baseline: one 8-B READ \
             round trip, same run.",
            window.as_secs_f64()
        ),
    );
    let len = 64 << 10;
    let mem = fake_guest::ram(len);
    let hooks = || vec![hook(1, 0, len, HookKind::ProgressBox, "progress")];
    let addr = fake_guest::serve(mem.clone(), hooks(), None);
    let mut c = fake_guest::connect(addr);
    let rtt = Dist::new(fake_guest::read_rtt_us(&mut c, 2000));
    let rtt_text = format!("p50 {:.1} µs", rtt.p50);
    let (mut served, _) = Served::start("bench_detect", "64M", "bench-detect: ready");
    let mut guest = reader(served.addr);

    let mut dists = Vec::new();
    let mut starved_total = 0u64;
    for (deadline, interval) in PAIRS {
        served.vm.send_console(&format!("d{deadline}\n"));
        std::thread::sleep(Duration::from_millis(50));
        // A trial whose stand-in was starved does not count; try again,
        // a bounded number of times.
        let (mut lat, mut starved) = (Vec::new(), 0u64);
        for t in 0..trials * 4 {
            if lat.len() as u64 == trials {
                break;
            }
            let run_for = Duration::from_millis(150 + (t * 37) % 100);
            match detect_once(&mut served, &mut guest, interval, run_for) {
                Some(ms) => lat.push(ms),
                None => starved += 1,
            }
        }
        starved_total += starved;
        if starved > 0 {
            sec.notes.push(format!(
                "deadline {deadline} ms / interval {interval} ms: {starved} trial(s) discarded: \
                 judged hung while the guest should still have been bumping (its vCPU got no \
                 CPU for a whole deadline; the machine was loaded)."
            ));
        }
        if lat.is_empty() {
            continue;
        }
        let d = Dist::new(lat);
        let bound = f64::from(deadline) + 2.0 * interval as f64;
        sec.figures.push(
            Figure::plain(
                &format!("detection, deadline {deadline} ms, interval {interval} ms"),
                d.p99,
                "ms",
                format!(
                    "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                    d.p50, d.p99, d.max
                ),
            )
            .against(
                "bound deadline + 2 × interval",
                bound,
                format!("{bound:.0} ms"),
            )
            .headline(),
        );
        sec.notes.push(format!(
            "deadline {deadline} ms / interval {interval} ms: every detection within the bound: {}.",
            met(d.max <= bound)
        ));
        dists.push(((deadline, interval), d));
    }

    // The guest spins on a core of its own: gone before the capacity runs.
    let _ = served.vm.api("stop");
    drop((guest, served));
    let nospin = fake_guest::serve(mem.clone(), hooks(), Some(Duration::ZERO));
    let mut cap = Vec::new();
    for (conns, counters, spin) in [
        (1usize, 64u32, true),
        (8, 64, true),
        (8, 64, false),
        (8, 16, false),
    ] {
        fake_guest::write_progress_box(&mem, counters, 1000);
        let per_sec = capacity(if spin { addr } else { nospin }, conns, window);
        let poll_us = 1e6 / per_sec;
        let guests = per_sec / 1000.0;
        let fig = Figure::plain(
                &format!(
                    "one monitor thread, {conns} connection(s), {counters} counters/guest, agent busy-poll {}",
                    if spin { "on" } else { "off" }
                ),
                poll_us,
                "µs",
                format!(
                    "{per_sec:.0} polls/s ({poll_us:.1} µs/poll) → {guests:.0} guests × {counters} = {:.0} counters at 1 kHz",
                    guests * f64::from(counters)
                ),
            )
            .against("one 8-B READ", rtt.p50, rtt_text.clone());
        // The README shows the agent as it ships (busy-poll on), one
        // connection and eight.
        sec.figures.push(if spin && counters == 64 {
            fig.headline()
        } else {
            fig
        });
        cap.push(json!({"connections": conns, "counters": counters, "agent_busy_poll": spin,
            "polls_per_s": per_sec, "guests_at_1khz": guests, "counters_at_1khz": guests * f64::from(counters)}));
    }
    sec.notes.push(format!(
        "The agent serves from this same {}-core machine: its threads compete with the monitor \
         thread for CPU, so capacity per monitor core is a lower bound of what a dedicated \
         monitor host would reach.",
        ctx.machine.cores
    ));
    let labels: Vec<String> = dists
        .iter()
        .map(|((d, i), _)| format!("deadline {d} ms, interval {i} ms"))
        .collect();
    let series: Vec<Series> = dists
        .iter()
        .zip(&labels)
        .map(|((_, d), l)| Series {
            label: l,
            sorted: &d.sorted,
        })
        .collect();
    ctx.cdf_plot(
        &mut sec,
        "detection_cdf.svg",
        "Hang detection latency, a real guest (stop command → HUNG)",
        "latency (ms)",
        &series,
    );
    sec.details = json!({
        "read_rtt_us": rtt,
        "detection_ms": dists.iter().map(|((d, i), dist)| json!({"deadline_ms": d, "interval_ms": i, "latency": dist})).collect::<Vec<_>>(),
        "capacity": cap,
        "starved_trials": starved_total,
    });
    sec
}
