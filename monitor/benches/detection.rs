//! Monitor benchmark: (1) detection latency: a stand-in guest thread bumps
//! a counter every millisecond, then stops; bdctl's poller and judge report
//! the hang; the time from the last bump to the verdict, for several
//! (deadline, interval) pairs, against the bound deadline + 2 × interval.
//! (2) capacity: how many targets × counters one monitor thread polls at
//! 1 kHz. Baseline for both: one 8-byte READ round trip, in the same run.
//! The agent runs in this process on the machine's other core.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backdoor_abi::{CounterState, HookKind, Level, LINE, PBOX_MAGIC, PERM_READ};
use backdoor_agent::auth::Keys;
use backdoor_agent::{
    guest_mem, Agent, Client, DescriptorSource, GuestMemory, PushedDescriptor, RamRange, Role,
};
use backdoor_dev::{Descriptor, Hook};
use bdctl::judge::{Judge, Verdict};
use bdctl::poll;

const KEY: [u8; 16] = *b"bench-key-16byte";

fn percentile(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) * p).div_ceil(100)]
}

/// Writes a progress box with `n` ACTIVE OS-level counters of deadline `deadline_ms`.
fn write_box(mem: &GuestMemory, n: u32, deadline_ms: u32) {
    let mut h = [0u8; LINE];
    h[0..4].copy_from_slice(&PBOX_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&1u16.to_le_bytes());
    h[6..8].copy_from_slice(&64u16.to_le_bytes());
    h[8..12].copy_from_slice(&n.to_le_bytes());
    h[12..16].copy_from_slice(&64u32.to_le_bytes());
    assert!(mem.write(0, &h));
    for i in 0..n {
        let mut c = [0u8; LINE];
        c[8..12].copy_from_slice(&(i + 1).to_le_bytes());
        c[12..16].copy_from_slice(&deadline_ms.to_le_bytes());
        c[16] = CounterState::Active as u8;
        c[17] = Level::Os as u8;
        c[24..24 + 4].copy_from_slice(format!("c{i:03}").as_bytes());
        assert!(mem.write(u64::from(i + 1) * LINE as u64, &c));
    }
}

fn agent_for(mem: Arc<GuestMemory>, len: u64) -> std::net::SocketAddr {
    let desc = Descriptor {
        generation: 1,
        sealed: true,
        tamper_count: 0,
        hooks: vec![Hook {
            id: 1,
            gpa: 0,
            len,
            kind: HookKind::ProgressBox,
            perms: PERM_READ,
            name: "progress".into(),
        }],
    };
    let keys = Keys::parse(
        &format!(
            "read = \"{}\"",
            KEY.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
        "bench",
    )
    .unwrap();
    let source: Arc<dyn DescriptorSource> = Arc::new(PushedDescriptor::new(desc));
    let agent = Arc::new(Agent::new("bench".into(), keys, mem, source));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    agent.serve(l).unwrap();
    addr
}

fn main() {
    let len = 64 << 10;
    let mem = Arc::new(
        GuestMemory::map(
            guest_mem::memfd(c"bench", len).unwrap(),
            vec![RamRange {
                guest_addr: 0,
                len,
                file_offset: 0,
            }],
        )
        .unwrap(),
    );
    let addr = agent_for(mem.clone(), len);
    let mut c = Client::connect(addr, "bench", Role::Read, &KEY, Duration::from_secs(5)).unwrap();

    let mut rtt: Vec<f64> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            c.read(1, 64, 8).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let read_us = percentile(&mut rtt, 50);
    println!("baseline: one 8-byte READ round trip p50 {read_us:.1} µs");

    println!("\ndetection latency (last bump to verdict), 20 trials per pair:");
    for (deadline, interval) in [(100u32, 10u64), (100, 50), (500, 100)] {
        // One live counter: the only one that can stall.
        write_box(&mem, 1, deadline);
        let mut lat = Vec::new();
        for trial in 0..20u64 {
            let stop = Arc::new(AtomicBool::new(false));
            let last_bump = Arc::new(std::sync::Mutex::new(Instant::now()));
            let guest = {
                let (mem, stop, last_bump) = (mem.clone(), stop.clone(), last_bump.clone());
                std::thread::spawn(move || {
                    let mut v = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        v += 1;
                        mem.write(64, &v.to_le_bytes());
                        *last_bump.lock().unwrap() = Instant::now();
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            };
            let mut judge = Judge::new();
            // Run healthy for a varying while, so the stop falls anywhere within an interval.
            let run_for = Duration::from_millis(150 + (trial * 37) % 100);
            let start = Instant::now();
            let mut next = start;
            let detected = loop {
                if !stop.load(Ordering::Relaxed) && start.elapsed() >= run_for {
                    stop.store(true, Ordering::Relaxed);
                }
                let obs = poll::observe(&mut c).map_err(|e| e.to_string());
                judge.observe(Instant::now(), obs.as_ref().map_err(Clone::clone));
                if let Some(Verdict::Hung { .. }) = judge.verdict() {
                    assert!(
                        stop.load(Ordering::Relaxed),
                        "judged hung while the counter was still moving"
                    );
                    break Instant::now();
                }
                next += Duration::from_millis(interval);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            };
            stop.store(true, Ordering::Relaxed);
            guest.join().unwrap();
            let stopped = *last_bump.lock().unwrap();
            lat.push(detected.duration_since(stopped).as_secs_f64() * 1e3);
        }
        let bound = f64::from(deadline) + 2.0 * interval as f64;
        let max = lat.iter().copied().fold(0.0, f64::max);
        let (p50, p99) = (percentile(&mut lat, 50), percentile(&mut lat, 99));
        println!(
            "  deadline {deadline:>4} ms, interval {interval:>3} ms: p50 {p50:>6.1} ms  p99 {p99:>6.1} ms  max {max:>6.1} ms   bound {bound:.0} ms: {}",
            if max <= bound { "met" } else { "NOT met" }
        );
    }

    println!("\ncapacity: one monitor thread polling counters (one READ per poll, as bdctl watch does between descriptor refreshes)");
    println!("  (the agent serves from this same 2-core machine: its threads compete with the monitor for CPU)");
    for (conns, counters, spin) in [
        (1usize, 64u32, true),
        (8, 64, true),
        (8, 64, false),
        (8, 16, false),
    ] {
        write_box(&mem, counters, 1000);
        let agent_addr = if spin {
            addr
        } else {
            agent_nospin(mem.clone(), len)
        };
        let mut targets: Vec<Client> = (0..conns)
            .map(|_| {
                Client::connect(
                    agent_addr,
                    "bench",
                    Role::Read,
                    &KEY,
                    Duration::from_secs(5),
                )
                .unwrap()
            })
            .collect();
        let mut judges: Vec<Judge> = (0..conns).map(|_| Judge::new()).collect();
        let t = Instant::now();
        let mut polls = 0u64;
        while t.elapsed() < Duration::from_secs(2) {
            for (c, j) in targets.iter_mut().zip(&mut judges) {
                let obs = poll::observe_counters(c).map_err(|e| e.to_string());
                j.observe(Instant::now(), obs.as_ref().map_err(Clone::clone));
                polls += 1;
            }
        }
        let per_sec = polls as f64 / t.elapsed().as_secs_f64();
        let poll_us = 1e6 / per_sec;
        println!(
            "  {conns} connection(s), {counters:>2} counters, agent busy-poll {}: {per_sec:>7.0} polls/s ({poll_us:>6.1} µs, {:>4.1}x one 8-B READ) -> {:>3.0} guests x {counters} = {:>5.0} counters at 1 kHz",
            if spin { "on " } else { "off" },
            poll_us / read_us,
            per_sec / 1000.0,
            per_sec / 1000.0 * f64::from(counters)
        );
    }
}

fn agent_nospin(mem: Arc<GuestMemory>, len: u64) -> std::net::SocketAddr {
    let desc = Descriptor {
        generation: 1,
        sealed: true,
        tamper_count: 0,
        hooks: vec![Hook {
            id: 1,
            gpa: 0,
            len,
            kind: HookKind::ProgressBox,
            perms: PERM_READ,
            name: "progress".into(),
        }],
    };
    let keys = Keys::parse(
        &format!(
            "read = \"{}\"",
            KEY.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
        "bench",
    )
    .unwrap();
    let source: Arc<dyn DescriptorSource> = Arc::new(PushedDescriptor::new(desc));
    let agent =
        Arc::new(Agent::new("bench".into(), keys, mem, source).with_busy_poll(Duration::ZERO));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    agent.serve(l).unwrap();
    addr
}
