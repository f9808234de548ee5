//! Section 6: bdvmm's start-up time (process spawn to the guest's first
//! instruction) and resident memory beyond guest RAM. Baseline, same run:
//! spawning `bdvmm --version` to its exit (the cost of starting the
//! process at all).
//!
//! The guest (`first_insn.elf`) writes the boot-timer port as its very
//! first instruction; bdvmm records CLOCK_MONOTONIC at that exit.

use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use bdvmm::devices::boot_timer::monotonic_ns;
use bdvmm_tests::{bdvmm_bin, guest};
use serde_json::json;

use crate::plot::Series;
use crate::remote_reads::met;
use crate::report::{Figure, Section};
use crate::stats::Dist;
use crate::Ctx;

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

/// One run: (ms to the first instruction, MiB resident beyond guest RAM).
fn run_once(mem: &str) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("api.sock");
    let g = guest("first_insn");
    let t0 = monotonic_ns();
    let mut child = Command::new(bdvmm_bin())
        .args(["run", "--test-guest"])
        .arg(&g)
        .args(["--ring", "3", "--mem", mem, "--api-sock"])
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
    let first = status["boot_timer_ns"].as_u64().unwrap_or(t0);
    let (rss, shmem) = rss_kib(child.id());
    let _ = bdvmm::api::request(&sock, "stop");
    let _ = child.wait();
    (
        first.saturating_sub(t0) as f64 / 1e6,
        rss.saturating_sub(shmem) as f64 / 1024.0,
    )
}

fn spawn_ms() -> f64 {
    let t0 = Instant::now();
    let st = Command::new(bdvmm_bin())
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .expect("run bdvmm --version");
    assert!(st.success());
    t0.elapsed().as_secs_f64() * 1e3
}

/// Runs section 6.
pub fn run(ctx: &Ctx) -> Section {
    let runs = if ctx.quick { 5 } else { 30 };
    let mut sec = Section::new(
        6,
        "startup",
        "bdvmm start-up time and memory overhead",
        &format!(
            "{runs} runs each, interleaved: `bdvmm run` of a ring-3 guest whose first instruction \
             writes the boot-timer port (bdvmm stamps CLOCK_MONOTONIC there), timed from just \
             before the spawn; bdvmm's resident memory beyond guest RAM (VmRSS − RssShmem) while \
             the guest runs, for 512-MiB and 2-GiB guests. Baseline, same run: spawning \
             `bdvmm --version` to its exit."
        ),
    );
    let (mut base, mut start, mut extra, mut extra_2g) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        base.push(spawn_ms());
        let (ms, mib) = run_once("512M");
        start.push(ms);
        extra.push(mib);
        extra_2g.push(run_once("2G").1);
    }
    let (base, start) = (Dist::new(base), Dist::new(start));
    let (extra, extra_2g) = (Dist::new(extra), Dist::new(extra_2g));
    let ms = |d: &Dist| format!("p50 {:.2} ms, p99 {:.2} ms", d.p50, d.p99);
    sec.figures = vec![
        Figure::plain(
            "`bdvmm run` to the guest's first instruction",
            start.p50,
            "ms",
            ms(&start),
        )
        .against("spawn `bdvmm --version` to exit", base.p50, ms(&base)),
        Figure::plain(
            "RSS beyond guest RAM, 2-GiB guest",
            extra_2g.p50,
            "MiB",
            format!("{:.1} MiB (p50)", extra_2g.p50),
        )
        .against(
            "512-MiB guest",
            extra.p50,
            format!("{:.1} MiB (p50)", extra.p50),
        ),
    ];
    sec.notes.push(format!(
        "Targets (issue 2): first instruction under 10 ms: {}; under 10 MiB beyond guest RAM: {}.",
        met(start.p50 < 10.0),
        met(extra.p50 < 10.0 && extra_2g.p50 < 10.0)
    ));
    ctx.cdf_plot(
        &mut sec,
        "startup_cdf.svg",
        "bdvmm start-up",
        "time (ms)",
        &[
            Series {
                label: "spawn to guest's first instruction",
                sorted: &start.sorted,
            },
            Series {
                label: "spawn `bdvmm --version` to exit (baseline)",
                sorted: &base.sorted,
            },
        ],
    );
    sec.details = json!({"first_instruction_ms": start, "spawn_baseline_ms": base,
        "rss_beyond_ram_mib_512m": extra, "rss_beyond_ram_mib_2g": extra_2g});
    sec
}
