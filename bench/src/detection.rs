//! Section 4: hang-detection latency for several (deadline, interval)
//! pairs, and how many guests × counters one monitor thread polls at
//! 1 kHz. Baseline for both: one 8-byte READ round trip, same run.
//!
//! A stand-in guest thread bumps a counter in fake guest RAM every
//! millisecond, then stops; bdctl's own poller and judge report the hang.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backdoor_abi::HookKind;
use backdoor_agent::{Client, GuestMemory};
use bdctl::judge::{Judge, Verdict};
use bdctl::poll;
use serde_json::json;

use crate::plot::Series;
use crate::remote_reads::met;
use crate::report::{Figure, Section};
use crate::stats::Dist;
use crate::Ctx;
use bdvmm_tests::fake_guest::{self, hook};

const PAIRS: [(u32, u64); 3] = [(100, 10), (100, 50), (500, 100)];

/// One trial: milliseconds from the guest's last bump to bdctl's "hung"
/// verdict, or `None` if the verdict came while the stand-in was still
/// meant to bump (its thread got no CPU for a whole deadline: a loaded
/// machine; the monitor's verdict was right by what it saw).
fn detect_once(
    mem: &Arc<GuestMemory>,
    c: &mut Client,
    interval: u64,
    run_for: Duration,
) -> Option<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let last_bump = Arc::new(Mutex::new(Instant::now()));
    let guest = {
        let (mem, stop, last_bump) = (mem.clone(), stop.clone(), last_bump.clone());
        std::thread::spawn(move || {
            let mut v = 0u64;
            while !stop.load(Ordering::Relaxed) {
                v += 1;
                mem.write(64, &v.to_le_bytes());
                *last_bump.lock().expect("lock") = Instant::now();
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let mut judge = Judge::new();
    let start = Instant::now();
    let mut next = start;
    let detected = loop {
        if !stop.load(Ordering::Relaxed) && start.elapsed() >= run_for {
            stop.store(true, Ordering::Relaxed);
        }
        let obs = poll::observe(c).map_err(|e| backdoor_abi::ErrorChain(&e).to_string());
        judge.observe(Instant::now(), obs.as_ref().map_err(Clone::clone));
        if let Some(Verdict::Hung { .. }) = judge.verdict() {
            if !stop.load(Ordering::Relaxed) {
                stop.store(true, Ordering::Relaxed);
                guest.join().expect("guest thread");
                return None;
            }
            break Instant::now();
        }
        next += Duration::from_millis(interval);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    };
    stop.store(true, Ordering::Relaxed);
    guest.join().expect("guest thread");
    let stopped = *last_bump.lock().expect("lock");
    Some(detected.duration_since(stopped).as_secs_f64() * 1e3)
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
            "Detection: a stand-in guest thread bumps one counter in fake guest RAM every 1 ms \
             and stops after a varying 150–250 ms; bdctl's poller (`poll::observe`: DESCRIBE + \
             counter READs) and judge run at the given interval against a real agent on \
             loopback; latency is last bump → HUNG verdict, {trials} trials per pair, against \
             the bound deadline + 2 × interval. Capacity: one monitor thread polls (one \
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

    let mut dists = Vec::new();
    let mut starved_total = 0u64;
    for (deadline, interval) in PAIRS {
        fake_guest::write_progress_box(&mem, 1, deadline);
        // A trial whose stand-in was starved does not count; try again,
        // a bounded number of times.
        let (mut lat, mut starved) = (Vec::new(), 0u64);
        for t in 0..trials * 4 {
            if lat.len() as u64 == trials {
                break;
            }
            let run_for = Duration::from_millis(150 + (t * 37) % 100);
            match detect_once(&mem, &mut c, interval, run_for) {
                Some(ms) => lat.push(ms),
                None => starved += 1,
            }
        }
        starved_total += starved;
        if starved > 0 {
            sec.notes.push(format!(
                "deadline {deadline} ms / interval {interval} ms: {starved} trial(s) discarded: \
                 judged hung while the stand-in should still have been bumping (its thread got \
                 no CPU for a whole deadline; the machine was loaded)."
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
            ),
        );
        sec.notes.push(format!(
            "deadline {deadline} ms / interval {interval} ms: every detection within the bound: {}.",
            met(d.max <= bound)
        ));
        dists.push(((deadline, interval), d));
    }

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
        sec.figures.push(
            Figure::plain(
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
            .against("one 8-B READ", rtt.p50, rtt_text.clone()),
        );
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
        "Hang detection latency (last bump → HUNG)",
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
