//! bdvmm start-up benchmark: time from `bdvmm run` to the guest's first
//! instruction, and bdvmm's resident memory beyond guest RAM.
//!
//! The guest (`first_insn.elf`) writes the boot-timer port as its very
//! first instruction; bdvmm records CLOCK_MONOTONIC at that exit, and this
//! benchmark compares it with CLOCK_MONOTONIC taken just before spawning.
//! Baseline, measured in the same run: spawning `bdvmm --version` to its
//! exit (the cost of starting the process at all).
//! Targets (issue 2): under 10 ms to the first instruction, under 10 MiB
//! beyond guest RAM.

use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use bdvmm_tests::{bdvmm_bin, guest};

const RUNS: usize = 30;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills our timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Nearest-rank percentile, `pct` in 0..=100.
fn percentile(sorted: &[f64], pct: usize) -> f64 {
    sorted[((sorted.len() - 1) * pct).div_ceil(100)]
}

fn summary(name: &str, mut v: Vec<f64>, unit: &str) -> f64 {
    v.sort_by(f64::total_cmp);
    let p50 = percentile(&v, 50);
    println!(
        "{name:<44} min {:>8.2} {unit}  p50 {:>8.2} {unit}  p99 {:>8.2} {unit}",
        v[0],
        p50,
        percentile(&v, 99)
    );
    p50
}

/// (VmRSS, RssShmem) in KiB from /proc/PID/status.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssShmem:"))
}

/// One run: returns (ns to first instruction, KiB resident beyond guest RAM).
fn run_once(mem: &str) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let g = guest("first_insn");
    let t0 = monotonic_ns();
    let mut child = Command::new(bdvmm_bin())
        .args([
            "run",
            "--test-guest",
            g.to_str().unwrap(),
            "--ring",
            "3",
            "--mem",
            mem,
            "--api-sock",
        ])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start bdvmm");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(st) = bdvmm::api::request(&sock, "status") {
            if st["boot_timer_ns"].is_u64() {
                break st;
            }
        }
        assert!(
            Instant::now() < deadline,
            "guest never reached its first instruction"
        );
        sleep(Duration::from_millis(1));
    };
    let first = status["boot_timer_ns"].as_u64().unwrap();
    let (rss, shmem) = rss_kib(child.id());
    let _ = bdvmm::api::request(&sock, "stop");
    let _ = child.wait();
    ((first - t0) as f64, rss - shmem)
}

fn baseline_spawn_ns() -> f64 {
    let t0 = Instant::now();
    let st = Command::new(bdvmm_bin())
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    t0.elapsed().as_nanos() as f64
}

fn main() {
    println!("bdvmm start-up ({RUNS} runs each, ring-3 guest, 1 vCPU)");
    let mut starts = Vec::new();
    let mut extra = Vec::new();
    let mut base = Vec::new();
    let mut extra_2g = Vec::new();
    for _ in 0..RUNS {
        base.push(baseline_spawn_ns() / 1e6);
        let (ns, kib) = run_once("512M");
        starts.push(ns / 1e6);
        extra.push(kib as f64 / 1024.0);
        extra_2g.push(run_once("2G").1 as f64 / 1024.0);
    }
    let b = summary("baseline: spawn `bdvmm --version` to exit", base, "ms");
    let s = summary("spawn to guest's first instruction", starts, "ms");
    let m = summary("RSS beyond guest RAM (512 MiB guest)", extra, "MiB");
    let m2 = summary("RSS beyond guest RAM (2 GiB guest)", extra_2g, "MiB");
    println!(
        "ratio first-instruction / process-spawn baseline: {:.2}x",
        s / b
    );
    println!(
        "ratio RSS beyond RAM, 2 GiB guest / 512 MiB guest: {:.2}x",
        m2 / m
    );
    println!(
        "targets: first instruction < 10 ms: {}; RSS beyond RAM < 10 MiB: {}",
        if s < 10.0 { "met" } else { "NOT met" },
        if m < 10.0 && m2 < 10.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}
