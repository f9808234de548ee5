//! Section 2: monitoring overhead on guest work. A CPU-bound and a
//! memory-bound ring-3 test guest report work done per ~0.1 s of TSC
//! time; the guest runs with no monitor, with `bdctl watch` polling it at
//! 1 kHz, and with a monitor thread polling as fast as it can, in
//! alternating windows.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use backdoor_agent::{Client, Role};
use bdctl::judge::Judge;
use bdctl::poll;
use serde_json::json;

use crate::report::{Figure, Section};
use crate::stats::Dist;
use crate::vm::Served;
use crate::{affinity, Ctx};

/// The monitor configurations compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Monitor {
    None,
    Khz,
    Max,
}

impl Monitor {
    fn name(self) -> &'static str {
        match self {
            Monitor::None => "no monitor",
            Monitor::Khz => "bdctl watch at 1 kHz",
            Monitor::Max => "monitor at maximum rate",
        }
    }
}

/// A running monitor of one configuration.
enum Running {
    None,
    Bdctl(Child),
    Thread(Arc<AtomicBool>, JoinHandle<()>),
}

fn start(
    m: Monitor,
    ctx: &Ctx,
    target: &str,
    keys: &std::path::Path,
    addr: std::net::SocketAddr,
    polls: &Arc<AtomicU64>,
) -> Running {
    match m {
        Monitor::None => Running::None,
        Monitor::Khz => Running::Bdctl(
            Command::new(ctx.bdctl_bin())
                .args([
                    "watch",
                    target,
                    "--interval-ms",
                    "1",
                    "--json",
                    "--key-file",
                ])
                .arg(keys)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start bdctl watch"),
        ),
        Monitor::Max => {
            let stop = Arc::new(AtomicBool::new(false));
            let (s, polls) = (stop.clone(), polls.clone());
            let key = bdvmm_tests::keys::READ;
            let h = std::thread::spawn(move || {
                let mut c =
                    Client::connect(addr, "bench", Role::Read, &key, Duration::from_secs(5))
                        .expect("connect monitor");
                let mut judge = Judge::new();
                while !s.load(Ordering::Relaxed) {
                    let obs = poll::observe_counters(&mut c)
                        .map_err(|e| backdoor_abi::ErrorChain(&e).to_string());
                    judge.observe(
                        std::time::Instant::now(),
                        obs.as_ref().map_err(Clone::clone),
                    );
                    polls.fetch_add(1, Ordering::Relaxed);
                }
            });
            Running::Thread(stop, h)
        }
    }
}

fn stop(r: Running) {
    match r {
        Running::None => {}
        Running::Bdctl(mut c) => {
            let _ = c.kill();
            let _ = c.wait();
        }
        Running::Thread(s, h) => {
            s.store(true, Ordering::Relaxed);
            let _ = h.join();
        }
    }
}

/// (units, cycles) of every complete interval line in `text`.
fn intervals(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("bench-work: units "))
        .filter_map(|r| {
            let mut w = r.split_whitespace();
            let units = w.next()?.parse().ok()?;
            let cycles = w.nth(1)?.parse().ok()?;
            Some((units, cycles))
        })
        .collect()
}

/// Pins the guest's vCPU thread to the first allowed CPU and every other
/// thread of bdvmm and of this process (so also the monitors started
/// from now on) to the rest. Returns the CPUs allowed before, to restore.
fn pin_all(vm_pid: u32) -> Result<Vec<usize>, String> {
    let all = affinity::current().map_err(|e| format!("sched_getaffinity: {e}"))?;
    let [vcpu_cpu, rest @ ..] = all.as_slice() else {
        return Err("no CPU allowed".into());
    };
    if rest.is_empty() {
        return Err("one CPU only: nothing to pin the monitor to".into());
    }
    match affinity::pin_vm(vm_pid, *vcpu_cpu, rest) {
        Ok(0) => return Err("bdvmm has no vcpu thread".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("pinning bdvmm's threads: {e}")),
    }
    affinity::pin_vm(std::process::id(), *vcpu_cpu, rest)
        .map_err(|e| format!("pinning bdbench's threads: {e}"))?;
    Ok(all)
}

/// Throughput samples (units per second) of each configuration, and the
/// maximum-rate monitor's polls per second.
type Measured = (Vec<(Monitor, Vec<f64>)>, f64);

/// Measures one workload; with `pinned`, the vCPU has a core to itself.
fn measure(ctx: &Ctx, workload: &str, pinned: bool) -> Result<Measured, String> {
    let (served, _) = Served::start(workload, "256M", "bench-work: ready");
    let (vm, addr, keys) = (&served.vm, served.addr, &served.keys);
    let restore = if pinned {
        Some(pin_all(vm.pid())?)
    } else {
        None
    };
    let target = format!("bench@{addr}");
    let (rounds, window, settle) = if ctx.quick {
        (1, Duration::from_millis(700), Duration::from_millis(200))
    } else {
        (3, Duration::from_secs(8), Duration::from_millis(500))
    };
    // Warm-up: first touches of the buffer, caches, frequency.
    std::thread::sleep(settle * 3);
    let polls = Arc::new(AtomicU64::new(0));
    let mut max_time = 0.0;
    let configs = [Monitor::None, Monitor::Khz, Monitor::Max];
    let mut out: Vec<(Monitor, Vec<f64>)> = configs.iter().map(|&m| (m, Vec::new())).collect();
    for _ in 0..rounds {
        for (m, samples) in &mut out {
            let running = start(*m, ctx, &target, keys, addr, &polls);
            // Let the interval in progress at the switch finish first.
            std::thread::sleep(settle);
            let from = vm.console().len();
            std::thread::sleep(window);
            let text = vm.console();
            stop(running);
            if *m == Monitor::Max {
                max_time += window.as_secs_f64() + settle.as_secs_f64();
            }
            let chunk = &text[from..];
            // Drop the partial first line; keep whole lines only.
            let chunk = &chunk[chunk.find('\n').map_or(chunk.len(), |i| i + 1)..];
            let chunk = &chunk[..chunk.rfind('\n').map_or(0, |i| i + 1)];
            let ghz = ctx.machine.tsc_ghz;
            samples.extend(
                intervals(chunk)
                    .into_iter()
                    .map(|(u, c)| u as f64 / (c as f64 / ghz / 1e9)),
            );
        }
    }
    let _ = vm.api("stop");
    if let Some(all) = restore {
        affinity::pin_vm(std::process::id(), all[0], &all)
            .map_err(|e| format!("restoring bdbench's CPUs: {e}"))?;
    }
    let max_rate = polls.load(Ordering::Relaxed) as f64 / max_time.max(1e-9);
    Ok((out, max_rate))
}

/// Runs section 2.
pub fn run(ctx: &Ctx) -> Section {
    let mut sec = Section::new(
        2,
        "overhead",
        "Monitoring overhead on guest work",
        &format!(
            "Two ring-3 test guests with one vCPU and a sealed progress box (bumped after every \
             work chunk): `bench_cpu` (integer hashing in registers) and `bench_mem` (strided \
             read-modify-write over 128 MiB, 4× the LLC). Each prints the work done in every \
             ~0.1-s TSC interval. The backdoor is served by bdvmm's in-process agent. Three \
             configurations alternate in windows of {} ({} round(s)): no monitor; `bdctl watch \
             --interval-ms 1` (a real bdctl process, 1 kHz); and a monitor thread in bdbench \
             polling the counters back to back (bdctl's poll + judge, maximum rate). Throughput \
             = mean of the interval rates; the difference is against no monitor, with its \
             standard error. Each workload runs twice: with the host scheduler placing \
             threads freely, and with the vCPU thread pinned alone to one core and everything \
             else (bdvmm's other threads and agent, the monitor, bdbench) on the others, the way \
             hosts that sell vCPUs place them.",
            if ctx.quick { "0.7 s" } else { "8 s" },
            if ctx.quick { 1 } else { 3 }
        ),
    );
    let mut details = Vec::new();
    let runs = [
        ("bench_cpu", "CPU-bound", false),
        ("bench_mem", "memory-bound", false),
        ("bench_cpu", "CPU-bound, vCPU pinned", true),
        ("bench_mem", "memory-bound, vCPU pinned", true),
    ];
    for (workload, label, pinned) in runs {
        let (results, max_rate) = match measure(ctx, workload, pinned) {
            Ok(r) => r,
            Err(e) => {
                sec.notes.push(format!("{label}: not measured: {e}."));
                continue;
            }
        };
        let base = Dist::new(results[0].1.clone());
        let base_text = format!("{:.4e} units/s (n={})", base.mean, base.n);
        let mut det =
            json!({"workload": workload, "pinned": pinned, "max_rate_polls_per_s": max_rate});
        det["none"] = json!(base);
        for (m, samples) in results.iter().skip(1) {
            let d = Dist::new(samples.clone());
            let diff = (d.mean / base.mean - 1.0) * 100.0;
            let se = 100.0
                * ((d.stddev / d.mean).powi(2) / d.n.max(1) as f64
                    + (base.stddev / base.mean).powi(2) / base.n.max(1) as f64)
                    .sqrt();
            let extra = if *m == Monitor::Max {
                format!(" (monitor reached {max_rate:.0} polls/s)")
            } else {
                String::new()
            };
            sec.figures.push(
                Figure::plain(
                    &format!("{label}: {}", m.name()),
                    d.mean,
                    "units/s",
                    format!(
                        "{:.4e} units/s (n={}); {diff:+.2} % ± {se:.2} %{extra}",
                        d.mean, d.n
                    ),
                )
                .against("no monitor", base.mean, base_text.clone()),
            );
            if *m == Monitor::Khz {
                let last = sec.figures.len() - 1;
                sec.figures[last].headline = true;
            }
            sec.notes.push(format!(
                "{label}, {}: {diff:+.2} % ± {se:.2} % → under 0.5 %: {}.",
                m.name(),
                if diff.abs() < 0.5 { "yes" } else { "no" }
            ));
            det[if *m == Monitor::Khz { "khz" } else { "max" }] =
                json!({"dist": d, "diff_pct": diff, "stderr_pct": se});
        }
        details.push(det);
    }
    if ctx.machine.cores <= 2 {
        sec.notes.push(format!(
            "This machine has {} cores: the guest's vCPU thread keeps one busy, and the monitor, \
             the agent's connection thread (which busy-polls for the next request) and bdbench \
             share the other, so at the maximum rate monitor and guest compete for CPU. That is \
             a property of this machine (monitor and guest on one small host), not of the design: \
             in deployment the monitor runs on another host and the agent reads guest RAM without \
             any guest CPU.",
            ctx.machine.cores
        ));
    }
    sec.details = json!(details);
    sec
}
