//! Section 6: bdvmm's start-up time (process spawn to the guest's first
//! instruction) and resident memory beyond guest RAM. Baseline, same run:
//! spawning `bdvmm --version` to its exit (the cost of starting the
//! process at all).
//!
//! The guest (`first_insn.elf`) writes the boot-timer port as its very
//! first instruction; bdvmm records CLOCK_MONOTONIC at that exit.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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

/// How long after its first console byte a VMM's memory is sampled:
/// long enough for the threads it starts after boot to exist.
const SETTLE: Duration = Duration::from_millis(100);

/// Spawns `cmd` (stdout piped) and waits for the first byte on its
/// stdout: (the child, ms from just before the spawn to that byte).
fn spawn_to_first_byte(cmd: &mut Command) -> Result<(Child, f64), String> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let mut byte = [0u8; 1];
    let got = child.stdout.as_mut().map(|o| o.read(&mut byte));
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if !matches!(got, Some(Ok(1))) {
        let _ = child.kill();
        let _ = child.wait();
        return Err("the guest never wrote its console".into());
    }
    Ok((child, ms))
}

/// Sends a byte to the console of `child`, whose guest then writes its
/// exit port: ms from the send until the VMM is reaped.
fn key_to_reaped(child: &mut Child) -> Result<f64, String> {
    let t0 = Instant::now();
    let sent = child.stdin.take().map(|mut i| i.write_all(b"q"));
    if !matches!(sent, Some(Ok(()))) {
        let _ = child.kill();
        let _ = child.wait();
        return Err("the VMM's console input is closed".into());
    }
    let deadline = t0 + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return Ok(t0.elapsed().as_secs_f64() * 1e3),
            Ok(None) if Instant::now() < deadline => sleep(Duration::from_micros(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the guest did not exit on its console key".into());
            }
        }
    }
}

/// One bdvmm run.
struct BdvmmRun {
    /// ms to the first instruction by the boot-timer stamp.
    first_ms: f64,
    /// ms to the guest's first console byte.
    byte_ms: f64,
    /// MiB resident beyond guest RAM.
    extra_mib: f64,
    /// ms from a console key (the guest then exits) to the reaped VMM.
    exit_ms: f64,
}

fn run_once(mem: &str) -> BdvmmRun {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("api.sock");
    let g = guest("first_insn");
    let t0 = monotonic_ns();
    let (mut child, byte_ms) = spawn_to_first_byte(
        Command::new(bdvmm_bin())
            .args(["run", "--test-guest"])
            .arg(&g)
            .args(["--ring", "3", "--mem", mem, "--api-sock"])
            .arg(&sock),
    )
    .expect("bdvmm's guest reaches its console");
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
    sleep(SETTLE);
    let (rss, shmem) = rss_kib(child.id());
    let exit_ms = key_to_reaped(&mut child).expect("bdvmm's guest exits on its key");
    BdvmmRun {
        first_ms: first.saturating_sub(t0) as f64 / 1e6,
        byte_ms,
        extra_mib: rss.saturating_sub(shmem) as f64 / 1024.0,
        exit_ms,
    }
}

/// The firmware's first act at the reset vector, the equivalent of
/// first_insn's: a byte to COM1 (`mov al, 'X'; mov dx, 0x3f8; out dx, al`).
const COM1_BYTE: [u8; 6] = [0xb0, b'X', 0xba, 0xf8, 0x03, 0xee];

/// One QEMU run (`-M microvm -accel kvm -nodefaults -no-user-config`,
/// RAM in a memfd like bdvmm's, isa-debug-exit at bdvmm's port): (ms from
/// the spawn to the firmware's console byte, MiB resident beyond guest
/// RAM, ms from a console key to the reaped QEMU).
fn qemu_once(
    bin: &std::path::Path,
    fw: &std::path::Path,
    mib: u64,
) -> Result<(f64, f64, f64), String> {
    let ram_object = format!("memory-backend-memfd,id=ram,size={mib}M");
    let (mut child, ms) =
        spawn_to_first_byte(crate::qemu::microvm(bin, mib, &ram_object, fw).args([
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=1",
        ]))?;
    sleep(SETTLE);
    let (rss, shmem) = rss_kib(child.id());
    let exit_ms = key_to_reaped(&mut child)?;
    Ok((ms, rss.saturating_sub(shmem) as f64 / 1024.0, exit_ms))
}

/// QEMU, when installed, with the firmware its runs boot.
struct Peer {
    bin: PathBuf,
    version: String,
    firmware: PathBuf,
    _dir: tempfile::TempDir,
}

impl Peer {
    fn find() -> Result<Self, String> {
        let bin = crate::qemu::binary()
            .ok_or("qemu-system-x86_64 is not installed (tools/deps.sh ensure lab)")?;
        let out = Command::new(&bin)
            .arg("--version")
            .output()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let version = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(3)
            .unwrap_or("?")
            .to_owned();
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let firmware = dir.path().join("fw.bin");
        std::fs::write(
            &firmware,
            crate::qemu::firmware(&COM1_BYTE, crate::qemu::EXIT_ON_KEY),
        )
        .map_err(|e| e.to_string())?;
        Ok(Self {
            bin,
            version,
            firmware,
            _dir: dir,
        })
    }
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
    let (mut console, mut exit) = (vec![], vec![]);
    let qemu = Peer::find();
    let (mut q_console, mut q_extra, mut q_extra_2g, mut q_exit) = (vec![], vec![], vec![], vec![]);
    let mut q_err = qemu.as_ref().err().cloned();
    for _ in 0..runs {
        base.push(spawn_ms());
        let r = run_once("512M");
        start.push(r.first_ms);
        console.push(r.byte_ms);
        extra.push(r.extra_mib);
        exit.push(r.exit_ms);
        extra_2g.push(run_once("2G").extra_mib);
        if let (Ok(q), None) = (&qemu, &q_err) {
            let both = qemu_once(&q.bin, &q.firmware, 512).and_then(|(ms, mib, exit_ms)| {
                Ok((ms, mib, exit_ms, qemu_once(&q.bin, &q.firmware, 2048)?.1))
            });
            match both {
                Ok((ms, mib, exit_ms, mib_2g)) => {
                    q_console.push(ms);
                    q_extra.push(mib);
                    q_exit.push(exit_ms);
                    q_extra_2g.push(mib_2g);
                }
                Err(e) => q_err = Some(e),
            }
        }
    }
    let (base, start, console) = (Dist::new(base), Dist::new(start), Dist::new(console));
    let (extra, extra_2g, exit) = (Dist::new(extra), Dist::new(extra_2g), Dist::new(exit));
    let ms = |d: &Dist| format!("p50 {:.2} ms, p99 {:.2} ms", d.p50, d.p99);
    let mib = |d: &Dist| format!("{:.1} MiB (p50)", d.p50);
    sec.figures = vec![
        Figure::plain(
            "`bdvmm run` to the guest's first instruction",
            start.p50,
            "ms",
            ms(&start),
        )
        .against("spawn `bdvmm --version` to exit", base.p50, ms(&base))
        .headline(),
        Figure::plain(
            "RSS beyond guest RAM, 2-GiB guest",
            extra_2g.p50,
            "MiB",
            mib(&extra_2g),
        )
        .against("512-MiB guest", extra.p50, mib(&extra)),
    ];
    let mut q_dists = json!(null);
    match (&qemu, q_err) {
        (Ok(q), None) => {
            let (qc, qe, qe2, qx) = (
                Dist::new(q_console),
                Dist::new(q_extra),
                Dist::new(q_extra_2g),
                Dist::new(q_exit),
            );
            let name = format!("QEMU {} microvm", q.version);
            sec.figures.push(
                Figure::plain(
                    "bdvmm: spawn to the guest's first console byte",
                    console.p50,
                    "ms",
                    ms(&console),
                )
                .against(
                    &format!("{name}: spawn to the firmware's first console byte"),
                    qc.p50,
                    ms(&qc),
                )
                .headline(),
            );
            for (size, mine, theirs) in [("512-MiB", &extra, &qe), ("2-GiB", &extra_2g, &qe2)] {
                sec.figures.push(
                    Figure::plain(
                        &format!("bdvmm: RSS beyond guest RAM, {size} guest"),
                        mine.p50,
                        "MiB",
                        mib(mine),
                    )
                    .against(&format!("{name}, {size} guest"), theirs.p50, mib(theirs))
                    .headline(),
                );
            }
            sec.figures.push(
                Figure::plain(
                    "bdvmm: console key to reaped (the guest writes its exit port)",
                    exit.p50,
                    "ms",
                    ms(&exit),
                )
                .against(&format!("{name}, isa-debug-exit"), qx.p50, ms(&qx)),
            );
            sec.notes.push(format!(
                "Against {name} (`-M microvm,memory-backend=ram -accel kvm -nodefaults \
                 -no-user-config -display none -serial stdio`, guest RAM a memfd as bdvmm's), \
                 interleaved with bdvmm's runs: its firmware's first act at the reset vector is a \
                 byte to COM1, as first_insn's first console byte follows its boot-timer write; \
                 both timed from just before the spawn to the byte on the VMM's stdout. Memory is \
                 VmRSS − RssShmem {} ms after that byte. Then a byte on each VMM's stdin: both \
                 guests poll COM1's line status and write port 0xf4 when it arrives (bdvmm's \
                 debug-exit, QEMU's `-device isa-debug-exit,iobase=0xf4`), timed from the write \
                 to the VMM reaped. bdvmm registers guest RAM before its irqchip (a slot added \
                 while the irqchip's I/O-bus grace period runs waits 5–10 ms for it) and creates \
                 the in-kernel PIT only for Linux (its teardown costs 13–16 ms at exit).",
                SETTLE.as_millis()
            ));
            sec.notes.push(format!(
                "Goals (issue 18): start-up under 1/5 of microvm's: {}; memory under 1/10 of \
                 microvm's: {}.",
                met(console.p50 < qc.p50 / 5.0),
                met(extra.p50 < qe.p50 / 10.0 && extra_2g.p50 < qe2.p50 / 10.0)
            ));
            q_dists = json!({"version": q.version, "console_ms": qc, "exit_ms": qx,
                "rss_beyond_ram_mib_512m": qe, "rss_beyond_ram_mib_2g": qe2});
        }
        // q_err holds why whenever QEMU was not found.
        (_, e) => sec.notes.push(format!(
            "QEMU baseline not measured: {}",
            e.unwrap_or_default()
        )),
    }
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
        "console_byte_ms": console, "rss_beyond_ram_mib_512m": extra,
        "rss_beyond_ram_mib_2g": extra_2g, "exit_ms": exit, "qemu": q_dists});
    sec
}
