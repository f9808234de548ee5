//! Section 5: extraction. Time to the first valid session and to all N
//! sessions over the backdoor (bdctl's extraction), against what a
//! dump-guest-memory-style tool leaves you with (pause the VM, dump all
//! guest RAM, resume, and scan the dump for records), and against QEMU
//! holding the same RAM (`stop` + `dump-guest-memory`, `pmemsave`, `xp`).

use std::io::Read;
use std::time::{Duration, Instant};

use backdoor_abi::record::{validate, ReadOutcome};
use backdoor_abi::{SboxHeader, LINE, SBOX_MAGIC};
use bdctl::extract::{Slots, Summary};
use bdvmm_tests::Vm;
use serde_json::json;

use crate::plot::{self, Series};
use crate::qemu::{self, Qemu};
use crate::report::{Figure, Section};
use crate::stats::Dist;
use crate::vm::{numbers_after, reader as connect, Served};
use crate::Ctx;

/// Over the backdoor, from nothing: connect, find the state box, read and
/// validate its first record (bdctl's seqlock read: the slot, then its
/// seq again, in one batch). Returns ms.
fn first_session_ms(addr: std::net::SocketAddr) -> f64 {
    let t = Instant::now();
    let mut c = connect(addr);
    first_session_on(&mut c);
    t.elapsed().as_secs_f64() * 1e3
}

/// The first valid session over a connection already open. Returns ms.
fn first_session_on(c: &mut backdoor_agent::Client) -> f64 {
    let t = Instant::now();
    let h = c
        .descriptor()
        .hooks
        .iter()
        .find(|h| h.kind == "state_box")
        .cloned()
        .expect("a state box");
    let raw = c.read(h.id, 0, 64).expect("state-box header");
    let hdr = SboxHeader::from_bytes(&raw.try_into().expect("64 bytes"));
    let slots = Slots {
        hook: h.id,
        base: u64::from(hdr.header_size),
        size: hdr.slot_size,
    };
    let outcome = slots
        .read(c, &[0], &mut |_| {})
        .expect("read the first slot")
        .remove(0);
    assert!(
        matches!(outcome, ReadOutcome::Complete { .. }),
        "first slot is not a valid record: {outcome:?}"
    );
    t.elapsed().as_secs_f64() * 1e3
}

/// Over the backdoor, from nothing: connect and run bdctl's extraction.
/// Returns ms and the extraction's counts.
fn all_sessions_ms(addr: std::net::SocketAddr, want: usize) -> (f64, Summary) {
    let t = Instant::now();
    let mut c = connect(addr);
    let (_, summary) = all_sessions_on(&mut c, want);
    (t.elapsed().as_secs_f64() * 1e3, summary)
}

/// bdctl's extraction over a connection already open (as `bdctl watch`
/// extracts a hang it saw, over the connection it polled on).
fn all_sessions_on(c: &mut backdoor_agent::Client, want: usize) -> (f64, Summary) {
    let t = Instant::now();
    let x = bdctl::extract::extract(c, None, &mut |_, _| {}).expect("extract");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(x.summary.corrupt, 0, "no record is corrupt");
    assert_eq!(
        x.sessions.len() as u64 + x.summary.torn,
        want as u64,
        "extraction found every session (or reported its slot torn)"
    );
    (ms, x.summary)
}

/// A live guest: bench_sessions rewrites every session over and over
/// while `reps` extractions run. (ms each, summed counts, rewrites of
/// each session per second).
fn live_extractions(served: &mut Served, want: usize, reps: usize) -> (Vec<f64>, Summary, f64) {
    served.vm.send_console("c");
    served
        .vm
        .wait_line("bench-sessions: churning", Duration::from_secs(30));
    let t = Instant::now();
    let (mut times, mut sum) = (Vec::new(), Summary::default());
    for _ in 0..reps {
        let (ms, s) = all_sessions_ms(served.addr, want);
        times.push(ms);
        sum.accepted += s.accepted;
        sum.retried += s.retried;
        sum.torn += s.torn;
    }
    served.vm.send_console("s");
    let still = served
        .vm
        .wait_line("bench-sessions: still", Duration::from_secs(30));
    let secs = t.elapsed().as_secs_f64();
    let version = numbers_after(&still, "bench-sessions: still")
        .first()
        .copied()
        .unwrap_or(1);
    // Version 1 was written before the churn began.
    (times, sum, (version - 1) as f64 / secs)
}

/// The guest-RAM memfd of bdvmm process `pid` (the one of `len` bytes).
fn ram_file(pid: u32, len: u64) -> std::fs::File {
    let dir = format!("/proc/{pid}/fd");
    for e in std::fs::read_dir(&dir).expect("list bdvmm's fds").flatten() {
        let is_memfd =
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:"));
        if !is_memfd {
            continue;
        }
        if let Ok(f) = std::fs::File::open(e.path()) {
            if f.metadata().is_ok_and(|m| m.len() == len) {
                return f;
            }
        }
    }
    panic!("no guest-RAM memfd of {len} bytes in {dir}");
}

/// A scan of RAM for state boxes (their magic, at 64-byte alignment)
/// that validates every slot, fed as the RAM arrives. It is told the
/// ABI's magic and layout, so it is the fastest a dump-based tool could be.
struct Scan {
    t0: Instant,
    /// Where the scan goes on.
    next: usize,
    /// ms from `t0` to the first valid record.
    first: Option<f64>,
    found: usize,
}

impl Scan {
    fn new(t0: Instant) -> Self {
        Self {
            t0,
            next: 0,
            first: None,
            found: 0,
        }
    }

    /// Scans on through `ram[..have]`; a box not yet whole there waits
    /// for the next call.
    fn feed(&mut self, ram: &[u8], have: usize) {
        let magic = SBOX_MAGIC.to_le_bytes();
        while self.next + LINE <= have {
            let off = self.next;
            if ram[off..off + 4] != magic {
                self.next += LINE;
                continue;
            }
            let hdr = SboxHeader::from_bytes(ram[off..off + LINE].try_into().expect("64 bytes"));
            let (base, size) = (off + usize::from(hdr.header_size), hdr.slot_size as usize);
            let end = base + hdr.slot_count as usize * size;
            if size < 128 || !size.is_power_of_two() || end > ram.len() {
                self.next += LINE;
                continue;
            }
            if end > have {
                return;
            }
            for slot in ram[base..end].chunks_exact(size) {
                let seq = u64::from_le_bytes(slot[..8].try_into().expect("8 bytes"));
                if seq != 0 && seq % 2 == 0 && validate(slot, seq).is_ok() {
                    self.found += 1;
                    let t0 = self.t0;
                    self.first
                        .get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            self.next = end.next_multiple_of(LINE);
        }
    }
}

/// Scans a whole RAM dump: (ms to the first valid record, ms to the end,
/// records found).
fn scan(dump: &[u8], t0: Instant) -> (f64, f64, usize) {
    let mut s = Scan::new(t0);
    s.feed(dump, dump.len());
    let all = t0.elapsed().as_secs_f64() * 1e3;
    (s.first.unwrap_or(all), all, s.found)
}

/// Bytes read from the memfd between scans.
const STREAM_CHUNK: usize = 2 << 20;

/// Baseline: pause, then read guest RAM in chunks, scanning each as it
/// arrives (the first record is found as soon as its box has been read),
/// then resume. (first ms, all ms, ms spent reading).
fn dump_and_scan(vm: &Vm, ram: u64, want: usize, dump: &mut [u8]) -> (f64, f64, f64) {
    let mut file = ram_file(vm.pid(), ram);
    let t0 = Instant::now();
    assert_eq!(vm.api("pause")["ok"], true, "pause the VM");
    let mut scan = Scan::new(t0);
    let mut reading = Duration::ZERO;
    let mut have = 0;
    while have < dump.len() {
        let n = STREAM_CHUNK.min(dump.len() - have);
        let t = Instant::now();
        file.read_exact(&mut dump[have..have + n])
            .expect("read guest RAM");
        reading += t.elapsed();
        have += n;
        scan.feed(dump, have);
    }
    assert_eq!(vm.api("resume")["ok"], true, "resume the VM");
    let all = t0.elapsed().as_secs_f64() * 1e3;
    assert_eq!(scan.found, want, "the scan found every session");
    (scan.first.unwrap_or(all), all, reading.as_secs_f64() * 1e3)
}

/// Pause after each dump before the next measurement, bdctl's and
/// QEMU's alike: a dump pauses the guest and streams its whole RAM, and
/// what that leaves behind (a resumed vCPU, a cold page cache) is the
/// dump's cost, not the next figure's.
const SETTLE: Duration = Duration::from_millis(50);

/// Runs section 5.
pub fn run(ctx: &Ctx) -> Section {
    // As bdctl's main does for every command (undone at the end).
    backdoor_agent::latency::prefer_short_slices();
    let sec = measure(ctx);
    backdoor_agent::latency::default_slices();
    sec
}

fn measure(ctx: &Ctx) -> Section {
    let (mem, mib, reps) = if ctx.quick {
        ("256M", 256u64, 2)
    } else {
        ("1G", 1024, 10)
    };
    let small = if ctx.quick { 100 } else { 1000 };
    let (mut served, want) = sessions_guest(mem);
    let addr = served.addr;
    let mut sec = Section::new(
        5,
        "extraction",
        "Extraction: sessions out of a guest",
        &format!(
            "A ring-3 guest (`bench_sessions.c`, {mib} MiB of RAM) keeps {want} session records \
             in a sealed 1-MiB state box (4096 slots of 256 B) and 64 MiB of pseudo-random heap. \
             Backdoor: from a new connection, the first valid session (DESCRIBE via WELCOME, \
             state-box header, the slot and its seq again in one batch) and all sessions \
             (`bdctl extract`'s code: a census of the slots' seq words, then every written slot \
             followed by its seq again, in pipelined batches, CRC32C), from a new connection \
             and over one already open (as `bdctl watch` extracts). Baseline, what a \
             dump-based tool can do at best: pause the VM, read guest RAM from bdvmm's memfd \
             (local, no network) in chunks, scanning each for state boxes and validating their \
             records as it arrives, resume. Against QEMU, the peer users run: a microvm whose \
             RAM holds the same bytes, driven over QMP: `stop` + `dump-guest-memory` to tmpfs + \
             cont, then the same scan of the dump; `pmemsave` of the whole state box (its \
             address known) + validation; `pmemsave` of its first 4 KiB + the first record's \
             validation, each from a new QMP connection (greeting and `qmp_capabilities` \
             first) and over one already open, as bdctl is timed; and small reads (8 B, 4 KiB) over persistent connections: bdctl's READ \
             against `pmemsave` and HMP `xp`, {small} calls each. Live: the guest rewrites every \
             session over and over while bdctl extracts. {reps} repetitions of each extraction."
        ),
    );
    let (mut first, mut all, mut held, mut held_first) = (vec![], vec![], vec![], vec![]);
    let mut watching = connect(addr);
    let (mut d_first, mut d_all, mut d_dump) = (vec![], vec![], vec![]);
    // The dump's buffer is allocated and faulted in once, outside the timing.
    let mut dump = vec![1u8; usize::try_from(mib << 20).expect("RAM fits in memory")];
    for _ in 0..reps {
        first.push(first_session_ms(addr));
        all.push(all_sessions_ms(addr, want).0);
        held.push(all_sessions_on(&mut watching, want).0);
        held_first.push(first_session_on(&mut watching));
        let (f, a, d) = dump_and_scan(&served.vm, mib << 20, want, &mut dump);
        d_first.push(f);
        d_all.push(a);
        d_dump.push(d);
        std::thread::sleep(SETTLE);
    }
    drop(watching);
    let q = against_qemu(ctx, addr, &dump, want, reps, &mut sec);
    let (live, churn, rewrites) = live_extractions(&mut served, want, reps);
    let _ = served.vm.api("stop");
    drop(served);
    // What the guest really wrote (its heap once went unwritten: the
    // compiler dropped stores nothing in the guest read).
    let written_mib = dump
        .chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as f64
        / 256.0;
    let (first, all) = (Dist::new(first), Dist::new(all));
    let (d_first, d_all, d_dump) = (Dist::new(d_first), Dist::new(d_all), Dist::new(d_dump));
    let ms = |d: &Dist| format!("p50 {:.2} ms (min {:.2}, max {:.2})", d.p50, d.min, d.max);
    let (held, held_first) = (Dist::new(held), Dist::new(held_first));
    let qemu_figures = q.figures(&[&first, &held_first, &all, &held], want);
    sec.figures = vec![
        Figure::plain("backdoor: first valid session", first.p50, "ms", ms(&first)).against(
            "dump + scan to the first record",
            d_first.p50,
            ms(&d_first),
        ),
        Figure::plain(
            &format!("backdoor: all {want} sessions"),
            all.p50,
            "ms",
            ms(&all),
        )
        .against("dump + full scan", d_all.p50, ms(&d_all)),
    ];
    sec.figures.extend(qemu_figures);
    let live = Dist::new(live);
    sec.figures.push(
        Figure::plain(
            &format!(
                "backdoor: all {want} sessions of a live guest (each rewritten {rewrites:.0} times/s)"
            ),
            live.p50,
            "ms",
            ms(&live),
        )
        .against(
            &format!("backdoor: all {want} sessions, the guest still"),
            all.p50,
            ms(&all),
        )
        .headline(),
    );
    sec.notes.push(format!(
        "Live extraction: while the guest rewrote all {want} sessions over and over, {reps} \
         extractions accepted {} records, {} of them only after a re-read (the slot moved \
         between its copy and its seq re-check), and reported {} slots torn (still moving after \
         {} re-reads); none corrupt, every session there or its slot reported.",
        churn.accepted,
        churn.retried,
        churn.torn,
        bdctl::extract::MAX_RETRIES
    ));
    sec.notes.push(format!(
        "Of the baseline, reading the RAM alone took p50 {:.1} ms; it was read locally from \
         bdvmm's memfd in {} MiB chunks, each scanned as it arrived (the first record is found \
         as soon as its box is in), which is generous to it: a dump shipped to another host \
         would add {mib} MiB of transfer, and a real guest's RAM is not mostly zeros.",
        d_dump.p50,
        STREAM_CHUNK >> 20
    ));
    sec.notes.push(
        "The backdoor needs no pause: the guest ran throughout (a hung guest reads the same)."
            .into(),
    );
    sec.notes.push(format!(
        "From a new connection the first session is mostly the connection's set-up: a Noise \
         handshake (NNpsk0: an ephemeral X25519 key and one exchange each side) on the \
         agent's handshake thread, which then hands the connection to a monitor thread kept \
         from an earlier one, on a machine whose other core the guest's spinning vCPU holds \
         (p50 {:.2} ms, min {:.2} ms); over a connection already open it took p50 {:.2} ms.",
        first.p50, first.min, held_first.p50
    ));
    sec.notes.push(format!(
        "Guest RAM as the host's dump saw it: {written_mib:.1} MiB of non-zero pages \
         (the guest writes its 64-MiB heap and its 1-MiB state box: {}).",
        if written_mib >= 65.0 {
            "as described"
        } else {
            "NOT as described"
        }
    ));
    // Extraction against guest RAM size: the same guest and the same
    // records in more RAM, fewer repetitions.
    let mut scaling = vec![SizePoint::new(mib, &first, &all, &d_first, &d_all, &q)];
    drop(dump);
    // Quick mode (under a minute in all) measures one size only.
    let sizes: &[u64] = if ctx.quick { &[] } else { &[2048, 4096] };
    for &size in sizes {
        match size_run(ctx, size, 3) {
            Ok((p, qemu_err)) => {
                scaling.push(p);
                if let Some(e) = qemu_err {
                    sec.notes
                        .push(format!("QEMU not measured on the {size} MiB guest: {e}"));
                }
            }
            Err(e) => sec
                .notes
                .push(format!("{size} MiB guest not measured: {e}")),
        }
    }
    scaling_plot(ctx, &mut sec, &scaling);
    small_reads_plot(ctx, &mut sec, &q);
    sec.details = json!({"sessions": want, "guest_ram_mib": mib, "by_ram_size": scaling,
        "backdoor_first_ms": first, "backdoor_all_ms": all, "backdoor_all_held_ms": held,
        "backdoor_first_held_ms": held_first,
        "dump_first_ms": d_first, "dump_all_ms": d_all, "dump_only_ms": d_dump,
        "nonzero_ram_mib": written_mib, "qemu": q.details(),
        "live_all_ms": live, "live_rewrites_per_s": rewrites, "live_accepted": churn.accepted,
        "live_retried": churn.retried, "live_torn": churn.torn});
    sec
}

/// One guest RAM size's p50s (ms), for the plot against size.
#[derive(Debug, Clone, serde::Serialize)]
struct SizePoint {
    mib: u64,
    backdoor_first: f64,
    backdoor_all: f64,
    dump_first: f64,
    dump_all: f64,
    qemu_dump_all: Option<f64>,
    qemu_pmemsave_box: Option<f64>,
}

impl SizePoint {
    fn new(mib: u64, first: &Dist, all: &Dist, d_first: &Dist, d_all: &Dist, q: &QemuRun) -> Self {
        Self {
            mib,
            backdoor_first: first.p50,
            backdoor_all: all.p50,
            dump_first: d_first.p50,
            dump_all: d_all.p50,
            qemu_dump_all: dist_or_none(&q.dump_all).map(|d| d.p50),
            qemu_pmemsave_box: dist_or_none(&q.pmem_box).map(|d| d.p50),
        }
    }
}

/// The bench_sessions guest with `mem` of RAM, and how many sessions it
/// says it keeps.
fn sessions_guest(mem: &str) -> (Served, usize) {
    let (served, line) = Served::start("bench_sessions", mem, "bench-sessions: ready");
    let want = numbers_after(&line, "bench-sessions: ready")
        .first()
        .and_then(|&n| usize::try_from(n).ok())
        .unwrap_or(0);
    (served, want)
}

/// The extractions (no small reads, no live guest) on a guest of `mib`
/// MiB; and why the QEMU side was not measured, if it was not.
fn size_run(ctx: &Ctx, mib: u64, reps: usize) -> Result<(SizePoint, Option<String>), String> {
    let (served, want) = sessions_guest(&format!("{mib}M"));
    let mut dump = vec![1u8; usize::try_from(mib << 20).map_err(|e| e.to_string())?];
    let (mut first, mut all, mut d_first, mut d_all) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        first.push(first_session_ms(served.addr));
        all.push(all_sessions_ms(served.addr, want).0);
        let (f, a, _) = dump_and_scan(&served.vm, mib << 20, want, &mut dump);
        d_first.push(f);
        d_all.push(a);
        std::thread::sleep(SETTLE);
    }
    let _ = served.vm.api("stop");
    let mut q = QemuRun::default();
    let qemu_err = qemu_runs(ctx, served.addr, &dump, want, reps, &mut q, false).err();
    if qemu_err.is_some() {
        // Half a run's samples would be a figure of another method.
        q = QemuRun::default();
    }
    let d = |v: Vec<f64>| Dist::new(v);
    let point = SizePoint::new(mib, &d(first), &d(all), &d(d_first), &d(d_all), &q);
    Ok((point, qemu_err))
}

/// Extraction time against guest RAM size, every path.
fn scaling_plot(ctx: &Ctx, sec: &mut Section, points: &[SizePoint]) {
    let gib = |p: &SizePoint| p.mib as f64 / 1024.0;
    let line = |f: &dyn Fn(&SizePoint) -> Option<f64>| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter_map(|p| Some((gib(p), f(p)?)))
            .collect()
    };
    let lines = [
        ("bdctl: first session", line(&|p| Some(p.backdoor_first))),
        ("bdctl: all sessions", line(&|p| Some(p.backdoor_all))),
        (
            "pause + stream RAM + scan: all",
            line(&|p| Some(p.dump_all)),
        ),
        (
            "QEMU stop + dump-guest-memory + scan",
            line(&|p| p.qemu_dump_all),
        ),
        (
            "QEMU pmemsave of the box (address known)",
            line(&|p| p.qemu_pmemsave_box),
        ),
    ];
    let series: Vec<plot::Line> = lines
        .iter()
        .filter(|(_, pts)| !pts.is_empty())
        .map(|(label, points)| plot::Line { label, points })
        .collect();
    let file = "extraction_by_ram.svg";
    match plot::lines(
        &ctx.out.join("plots").join(file),
        "Extraction time against guest RAM size (p50)",
        "guest RAM (GiB)",
        "time (ms, log)",
        &series,
    ) {
        Ok(()) => sec.plots.push(format!("plots/{file}")),
        Err(e) => sec.notes.push(format!("no plot: {e}")),
    }
    let sizes: Vec<String> = points.iter().map(|p| format!("{} MiB", p.mib)).collect();
    sec.notes.push(format!(
        "Against guest RAM size ({}; the larger sizes 3 repetitions each): bdctl's all \
         sessions p50 {} ms; QEMU's stop + dump + scan {} ms.",
        sizes.join(", "),
        points
            .iter()
            .map(|p| format!("{:.2}", p.backdoor_all))
            .collect::<Vec<_>>()
            .join(" / "),
        points
            .iter()
            .map(|p| p.qemu_dump_all.map_or("n/a".into(), |v| format!("{v:.0}")))
            .collect::<Vec<_>>()
            .join(" / ")
    ));
}

/// The small reads' latency CDFs, bdctl against QEMU.
fn small_reads_plot(ctx: &Ctx, sec: &mut Section, q: &QemuRun) {
    let Some(s) = q
        .small
        .iter()
        .map(|v| dist_or_none(v).map(|d| d.sorted))
        .collect::<Option<Vec<_>>>()
    else {
        return;
    };
    let labels = [
        "bdctl READ 8 B",
        "QEMU pmemsave 8 B",
        "QEMU HMP xp 8 B",
        "bdctl READ 4 KiB",
        "QEMU pmemsave 4 KiB",
    ];
    let series: Vec<Series> = labels
        .iter()
        .zip(&s)
        .map(|(label, sorted)| Series { label, sorted })
        .collect();
    ctx.cdf_plot(
        sec,
        "small_reads_vs_qemu_cdf.svg",
        "Small reads of a guest: bdctl (authenticated, over TCP) vs QEMU (local QMP)",
        "latency (µs)",
        &series,
    );
}

/// Where the first state box lies in `ram`: (offset, bytes).
fn find_box(ram: &[u8]) -> Option<(usize, usize)> {
    let magic = SBOX_MAGIC.to_le_bytes();
    (0..ram.len().saturating_sub(LINE))
        .step_by(LINE)
        .filter(|&off| ram[off..off + 4] == magic)
        .find_map(|off| {
            let hdr = SboxHeader::from_bytes(ram[off..off + LINE].try_into().ok()?);
            let len =
                usize::from(hdr.header_size) + hdr.slot_count as usize * hdr.slot_size as usize;
            (hdr.slot_size >= 128 && off + len <= ram.len()).then_some((off, len))
        })
}

/// Whether `bytes` (a state box's start) hold a valid first record.
fn first_record_valid(bytes: &[u8]) -> bool {
    let Some(hdr) = bytes
        .get(..LINE)
        .and_then(|h| h.try_into().ok())
        .map(SboxHeader::from_bytes)
    else {
        return false;
    };
    let base = usize::from(hdr.header_size);
    let Some(slot) = bytes.get(base..base + hdr.slot_size as usize) else {
        return false;
    };
    let seq = u64::from_le_bytes(slot[..8].try_into().expect("8 bytes"));
    seq != 0 && seq % 2 == 0 && validate(slot, seq).is_ok()
}

/// What the QEMU side measured (ms), or why it did not run.
#[derive(Default)]
struct QemuRun {
    version: String,
    skipped: Option<String>,
    dump_first: Vec<f64>,
    dump_all: Vec<f64>,
    /// Over the QMP connection already open.
    pmem_box: Vec<f64>,
    pmem_first: Vec<f64>,
    /// Each from a new QMP connection.
    pmem_box_new: Vec<f64>,
    pmem_first_new: Vec<f64>,
    /// Small reads, µs: (bdctl 8 B, pmemsave 8 B, xp 8 B, bdctl 4 KiB, pmemsave 4 KiB).
    small: [Vec<f64>; 5],
}

fn dist_or_none(v: &[f64]) -> Option<Dist> {
    (!v.is_empty()).then(|| Dist::new(v.to_vec()))
}

impl QemuRun {
    /// `mine`: first session and all sessions, each from a new connection
    /// and over one already open.
    fn figures(&self, mine: &[&Dist; 4], want: usize) -> Vec<Figure> {
        let [first, held_first, all, held] = *mine;
        let mut out = Vec::new();
        let q = format!("QEMU {}", self.version);
        let ms = |d: &Dist| format!("p50 {:.2} ms (min {:.2}, max {:.2})", d.p50, d.min, d.max);
        let us = |d: &Dist| format!("p50 {:.1} µs, p99 {:.1} µs", d.p50, d.p99);
        // The README shows all but the second small-read baseline (xp).
        let mut vs = |name: &str, mine: &Dist, base: &str, theirs: &[f64], unit: &'static str| {
            let fmt = |d: &Dist| if unit == "µs" { us(d) } else { ms(d) };
            if let Some(d) = dist_or_none(theirs) {
                let f = Figure::plain(name, mine.p50, unit, fmt(mine)).against(
                    &format!("{q}: {base}"),
                    d.p50,
                    fmt(&d),
                );
                out.push(if base.starts_with("HMP") {
                    f
                } else {
                    f.headline()
                });
            }
        };
        vs(
            "backdoor: first valid session",
            first,
            "stop + dump-guest-memory to tmpfs + scan to the first record",
            &self.dump_first,
            "ms",
        );
        vs(
            "backdoor: first valid session",
            first,
            "pmemsave of 4 KiB at the box's known address + validate, new QMP connection",
            &self.pmem_first_new,
            "ms",
        );
        vs(
            "backdoor: first valid session, connection already open (as bdctl watch)",
            held_first,
            "pmemsave of 4 KiB at the box's known address + validate, QMP connection already open",
            &self.pmem_first,
            "ms",
        );
        vs(
            &format!("backdoor: all {want} sessions"),
            all,
            "stop + dump-guest-memory to tmpfs + full scan",
            &self.dump_all,
            "ms",
        );
        vs(
            &format!("backdoor: all {want} sessions"),
            all,
            "pmemsave of the whole state box + validate, new QMP connection",
            &self.pmem_box_new,
            "ms",
        );
        vs(
            &format!("backdoor: all {want} sessions, connection already open (as bdctl watch)"),
            held,
            "pmemsave of the whole state box + validate, QMP connection already open",
            &self.pmem_box,
            "ms",
        );
        if let Some(b8) = dist_or_none(&self.small[0]) {
            vs(
                "READ 8 B, persistent connection",
                &b8,
                "pmemsave of 8 B (QMP)",
                &self.small[1],
                "µs",
            );
            vs(
                "READ 8 B, persistent connection",
                &b8,
                "HMP xp /1gx (QMP human-monitor-command)",
                &self.small[2],
                "µs",
            );
        }
        if let Some(b4k) = dist_or_none(&self.small[3]) {
            vs(
                "READ 4 KiB, persistent connection",
                &b4k,
                "pmemsave of 4 KiB (QMP)",
                &self.small[4],
                "µs",
            );
        }
        out
    }

    fn details(&self) -> serde_json::Value {
        json!({"version": self.version, "skipped": self.skipped,
            "dump_first_ms": dist_or_none(&self.dump_first), "dump_all_ms": dist_or_none(&self.dump_all),
            "pmemsave_box_ms": dist_or_none(&self.pmem_box), "pmemsave_4k_first_ms": dist_or_none(&self.pmem_first),
            "pmemsave_box_new_qmp_ms": dist_or_none(&self.pmem_box_new),
            "pmemsave_4k_first_new_qmp_ms": dist_or_none(&self.pmem_first_new),
            "read8_us": dist_or_none(&self.small[0]), "pmemsave8_us": dist_or_none(&self.small[1]),
            "xp8_us": dist_or_none(&self.small[2]), "read4k_us": dist_or_none(&self.small[3]),
            "pmemsave4k_us": dist_or_none(&self.small[4])})
    }
}

/// The QEMU baselines: a microvm whose RAM holds `ram` (the bdvmm guest's
/// RAM as just dumped: the same records at the same addresses).
fn against_qemu(
    ctx: &Ctx,
    addr: std::net::SocketAddr,
    ram: &[u8],
    want: usize,
    reps: usize,
    sec: &mut Section,
) -> QemuRun {
    let mut r = QemuRun::default();
    match qemu_runs(ctx, addr, ram, want, reps, &mut r, true) {
        Ok(()) => sec.notes.push(format!(
            "QEMU {} (`-M microvm -accel kvm`, the same machine, the same run): its guest RAM is a \
             shared file on tmpfs holding the bdvmm guest's RAM byte for byte, so the records lie \
             at the same guest addresses; its firmware only halts. QMP over a local Unix socket, \
             unauthenticated, output files on tmpfs; bdctl's reads are authenticated and \
             encrypted, over TCP (loopback here), and need no pause.",
            r.version
        )),
        Err(e) => {
            sec.notes.push(format!("QEMU baselines not measured: {e}"));
            r.skipped = Some(e);
        }
    }
    r
}

fn qemu_runs(
    ctx: &Ctx,
    addr: std::net::SocketAddr,
    ram: &[u8],
    want: usize,
    reps: usize,
    r: &mut QemuRun,
    small_reads: bool,
) -> Result<(), String> {
    let (off, len) = find_box(ram).ok_or("no state box in the guest's RAM")?;
    let gpa = off as u64;
    let mut vm = Qemu::start(ram)?;
    r.version = vm.version();
    let mut buf: Vec<u8> = Vec::new();
    let read_into = |path: &std::path::Path, buf: &mut Vec<u8>| -> Result<(), String> {
        buf.clear();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(buf))
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let out = vm.dir.path().join("pmem");
    for _ in 0..reps {
        let t0 = Instant::now();
        let dump = vm.stop_dump_cont()?;
        read_into(&dump, &mut buf)?;
        // A scan of every RAM segment of the dump, in file order.
        let (mut first, mut found) = (None, 0);
        for (_, seg) in qemu::elf_loads(&buf) {
            let (f, _, n) = scan(seg, t0);
            if n > 0 {
                first.get_or_insert(f);
            }
            found += n;
        }
        if found != want {
            return Err(format!("QEMU's dump held {found} of {want} sessions"));
        }
        r.dump_all.push(t0.elapsed().as_secs_f64() * 1e3);
        r.dump_first.push(first.unwrap_or_default());
        std::thread::sleep(SETTLE);

        // The box, then its first 4 KiB, each over the QMP connection
        // already open and from a new one (as `bdctl extract` is timed).
        for (whole, fresh) in [(true, false), (true, true), (false, false), (false, true)] {
            let t0 = Instant::now();
            let mut opened;
            let qmp = if fresh {
                opened = vm.fresh_qmp()?;
                &mut opened
            } else {
                &mut vm.qmp
            };
            qmp.pmemsave(gpa, if whole { len as u64 } else { 4096 }, &out)?;
            read_into(&out, &mut buf)?;
            let ms = if whole {
                let (_, a, found) = scan(&buf, t0);
                if found != want {
                    return Err(format!(
                        "pmemsave of the box held {found} of {want} sessions"
                    ));
                }
                a
            } else if first_record_valid(&buf) {
                t0.elapsed().as_secs_f64() * 1e3
            } else {
                return Err("pmemsave of the box's first 4 KiB held no valid first record".into());
            };
            match (whole, fresh) {
                (true, false) => r.pmem_box.push(ms),
                (true, true) => r.pmem_box_new.push(ms),
                (false, false) => r.pmem_first.push(ms),
                (false, true) => r.pmem_first_new.push(ms),
            }
        }
    }
    if !small_reads {
        return Ok(());
    }
    // Small reads, each side over a persistent connection (as many as
    // the section's method says).
    let n = if ctx.quick { 100 } else { 1000 };
    let mut c = connect(addr);
    let hook = c
        .descriptor()
        .hooks
        .iter()
        .find(|h| h.kind == "state_box")
        .map(|h| h.id)
        .ok_or("the bdvmm guest has no state box")?;
    // fake_guest::time_us's timing, stopped by the first error.
    let time_us = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<Vec<f64>, String> {
        let mut failed = None;
        let times = bdvmm_tests::fake_guest::time_us(n, || {
            if failed.is_none() {
                failed = f().err();
            }
        });
        failed.map_or(Ok(times), Err)
    };
    r.small[0] = time_us(&mut || c.read(hook, 64, 8).map(|_| ()).map_err(|e| e.to_string()))?;
    let xp = format!("xp /1gx {:#x}", gpa + 64);
    r.small[1] = time_us(&mut || {
        vm.qmp.pmemsave(gpa + 64, 8, &out)?;
        read_into(&out, &mut buf)
    })?;
    r.small[2] = time_us(&mut || vm.qmp.hmp(&xp).map(|_| ()))?;
    r.small[3] = time_us(&mut || c.read(hook, 0, 4096).map(|_| ()).map_err(|e| e.to_string()))?;
    r.small[4] = time_us(&mut || {
        vm.qmp.pmemsave(gpa, 4096, &out)?;
        read_into(&out, &mut buf)
    })?;
    Ok(())
}
