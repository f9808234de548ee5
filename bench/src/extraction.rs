//! Section 5: extraction. Time to the first valid session and to all N
//! sessions over the backdoor (bdctl's extraction), against what a
//! dump-guest-memory-style tool leaves you with (pause the VM, dump all
//! guest RAM, resume, and scan the dump for records), and against QEMU
//! holding the same RAM (`stop` + `dump-guest-memory`, `pmemsave`, `xp`).

use std::io::Read;
use std::time::{Duration, Instant};

use backdoor_abi::record::{read_slot, validate, ReadOutcome};
use backdoor_abi::{SboxHeader, LINE, SBOX_MAGIC};
use backdoor_agent::{Client, RemoteSlot, Role};
use bdvmm_tests::Vm;
use serde_json::json;

use crate::qemu::{self, Qemu};
use crate::report::{Figure, Section};
use crate::stats::Dist;
use crate::vm::{numbers_after, Served};
use crate::Ctx;

fn connect(addr: std::net::SocketAddr) -> Client {
    Client::connect(
        addr,
        "bench",
        Role::Read,
        &bdvmm_tests::keys::READ,
        Duration::from_secs(5),
    )
    .expect("connect to the agent")
}

/// Over the backdoor, from nothing: connect, find the state box, read and
/// validate its first record. Returns ms.
fn first_session_ms(addr: std::net::SocketAddr) -> f64 {
    let t = Instant::now();
    let mut c = connect(addr);
    let h = c
        .descriptor()
        .hooks
        .iter()
        .find(|h| h.kind == "state_box")
        .cloned()
        .expect("a state box");
    let raw = c.read(h.id, 0, 64).expect("state-box header");
    let hdr = SboxHeader::from_bytes(&raw.try_into().expect("64 bytes"));
    let slot = RemoteSlot::new(&mut c, h.id, u64::from(hdr.header_size), hdr.slot_size);
    let outcome = read_slot(&slot, bdctl::extract::MAX_RETRIES);
    assert!(
        matches!(outcome, ReadOutcome::Complete { .. }),
        "first slot is not a valid record: {outcome:?}"
    );
    t.elapsed().as_secs_f64() * 1e3
}

/// Over the backdoor, from nothing: connect and run bdctl's extraction.
fn all_sessions_ms(addr: std::net::SocketAddr, want: usize) -> f64 {
    let t = Instant::now();
    let mut c = connect(addr);
    let x = bdctl::extract::extract(&mut c, None, &mut |_, _| {}).expect("extract");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(x.sessions.len(), want, "extraction found every session");
    ms
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

/// Scans a RAM dump for state boxes (their magic, at 64-byte alignment)
/// and validates every slot: (ms to the first valid record, ms to the end,
/// records found). The scan is told the ABI's magic and layout, so it is
/// the fastest a dump-based tool could be.
fn scan(dump: &[u8], t0: Instant) -> (f64, f64, usize) {
    let mut first = None;
    let mut found = 0;
    let magic = SBOX_MAGIC.to_le_bytes();
    let mut off = 0;
    while off + LINE <= dump.len() {
        if dump[off..off + 4] != magic {
            off += LINE;
            continue;
        }
        let hdr = SboxHeader::from_bytes(dump[off..off + LINE].try_into().expect("64 bytes"));
        let (base, size) = (off + usize::from(hdr.header_size), hdr.slot_size as usize);
        let end = base + hdr.slot_count as usize * size;
        if size < 128 || !size.is_power_of_two() || end > dump.len() {
            off += LINE;
            continue;
        }
        for slot in dump[base..end].chunks_exact(size) {
            let seq = u64::from_le_bytes(slot[..8].try_into().expect("8 bytes"));
            if seq != 0 && seq % 2 == 0 && validate(slot, seq).is_ok() {
                found += 1;
                first.get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        off = end.next_multiple_of(LINE);
    }
    let all = t0.elapsed().as_secs_f64() * 1e3;
    (first.unwrap_or(all), all, found)
}

/// Baseline: pause, dump all guest RAM, resume, scan. (first ms, all ms, dump ms).
fn dump_and_scan(vm: &Vm, ram: u64, want: usize, dump: &mut [u8]) -> (f64, f64, f64) {
    let mut file = ram_file(vm.pid(), ram);
    let t0 = Instant::now();
    assert_eq!(vm.api("pause")["ok"], true, "pause the VM");
    file.read_exact(dump).expect("dump guest RAM");
    assert_eq!(vm.api("resume")["ok"], true, "resume the VM");
    let dump_ms = t0.elapsed().as_secs_f64() * 1e3;
    let (first, all, found) = scan(dump, t0);
    assert_eq!(found, want, "the scan found every session");
    (first, all, dump_ms)
}

/// Runs section 5.
pub fn run(ctx: &Ctx) -> Section {
    let (mem, mib, reps) = if ctx.quick {
        ("256M", 256u64, 2)
    } else {
        ("1G", 1024, 10)
    };
    let small = if ctx.quick { 100 } else { 1000 };
    let (served, line) = Served::start("bench_sessions", mem, "bench-sessions: ready");
    let want = numbers_after(&line, "bench-sessions: ready")
        .first()
        .and_then(|&n| usize::try_from(n).ok())
        .unwrap_or(0);
    let (vm, addr) = (&served.vm, served.addr);
    let mut sec = Section::new(
        5,
        "extraction",
        "Extraction: sessions out of a guest",
        &format!(
            "A ring-3 guest (`bench_sessions.c`, {mib} MiB of RAM) keeps {want} session records \
             in a sealed 1-MiB state box (4096 slots of 256 B) and 64 MiB of pseudo-random heap. \
             Backdoor: from a new connection, the first valid session (DESCRIBE via WELCOME, \
             state-box header, one seqlock slot read) and all sessions (`bdctl extract`'s code: \
             bulk copy, batched seq re-check, CRC32C). Baseline, what dump-guest-memory leaves \
             you with: pause the VM, read all {mib} MiB of guest RAM from bdvmm's memfd (local, \
             no network), resume, then scan the dump for state boxes and validate their records. \
             Against QEMU, the peer users run: a microvm whose RAM holds the same bytes, driven \
             over QMP: `stop` + `dump-guest-memory` to tmpfs + cont, then the same scan of the \
             dump; `pmemsave` of the whole state box (its address known) + validation; \
             `pmemsave` of its first 4 KiB + the first record's validation; and small reads \
             (8 B, 4 KiB) over persistent connections: bdctl's READ against `pmemsave` and HMP \
             `xp`, {small} calls each. {reps} repetitions of each extraction."
        ),
    );
    let (mut first, mut all) = (vec![], vec![]);
    let (mut d_first, mut d_all, mut d_dump) = (vec![], vec![], vec![]);
    // The dump's buffer is allocated and faulted in once, outside the timing.
    let mut dump = vec![1u8; usize::try_from(mib << 20).expect("RAM fits in memory")];
    for _ in 0..reps {
        first.push(first_session_ms(addr));
        all.push(all_sessions_ms(addr, want));
        let (f, a, d) = dump_and_scan(vm, mib << 20, want, &mut dump);
        d_first.push(f);
        d_all.push(a);
        d_dump.push(d);
    }
    let q = against_qemu(ctx, addr, &dump, want, reps, &mut sec);
    let _ = vm.api("stop");
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
    let qemu_figures = q.figures(&first, &all, want);
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
    sec.notes.push(format!(
        "Of the baseline, the pause + RAM dump alone took p50 {:.1} ms; the dump was read \
         locally from bdvmm's memfd, which is generous to it: a dump shipped to another host \
         would add {mib} MiB of transfer, and a real guest's RAM is not mostly zeros.",
        d_dump.p50
    ));
    sec.notes.push(
        "The backdoor needs no pause: the guest ran throughout (a hung guest reads the same)."
            .into(),
    );
    sec.notes.push(format!(
        "Guest RAM as the host's dump saw it: {written_mib:.1} MiB of non-zero pages \
         (the guest writes its 64-MiB heap and its 1-MiB state box: {}).",
        if written_mib >= 65.0 {
            "as described"
        } else {
            "NOT as described"
        }
    ));
    sec.details = json!({"sessions": want, "guest_ram_mib": mib,
        "backdoor_first_ms": first, "backdoor_all_ms": all,
        "dump_first_ms": d_first, "dump_all_ms": d_all, "dump_only_ms": d_dump,
        "nonzero_ram_mib": written_mib, "qemu": q.details()});
    sec
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
    pmem_box: Vec<f64>,
    pmem_first: Vec<f64>,
    /// Small reads, µs: (bdctl 8 B, pmemsave 8 B, xp 8 B, bdctl 4 KiB, pmemsave 4 KiB).
    small: [Vec<f64>; 5],
}

fn dist_or_none(v: &[f64]) -> Option<Dist> {
    (!v.is_empty()).then(|| Dist::new(v.to_vec()))
}

impl QemuRun {
    fn figures(&self, first: &Dist, all: &Dist, want: usize) -> Vec<Figure> {
        let mut out = Vec::new();
        let q = format!("QEMU {}", self.version);
        let ms = |d: &Dist| format!("p50 {:.2} ms (min {:.2}, max {:.2})", d.p50, d.min, d.max);
        let us = |d: &Dist| format!("p50 {:.1} µs, p99 {:.1} µs", d.p50, d.p99);
        let mut vs =
            |name: &str, mine: &Dist, base: &str, theirs: &[f64], fmt: &dyn Fn(&Dist) -> String| {
                if let Some(d) = dist_or_none(theirs) {
                    out.push(
                        Figure::plain(
                            name,
                            mine.p50,
                            if fmt(mine).contains("µs") {
                                "µs"
                            } else {
                                "ms"
                            },
                            fmt(mine),
                        )
                        .against(&format!("{q}: {base}"), d.p50, fmt(&d)),
                    );
                }
            };
        vs(
            "backdoor: first valid session",
            first,
            "stop + dump-guest-memory to tmpfs + scan to the first record",
            &self.dump_first,
            &ms,
        );
        vs(
            "backdoor: first valid session",
            first,
            "pmemsave of 4 KiB at the box's known address + validate",
            &self.pmem_first,
            &ms,
        );
        vs(
            &format!("backdoor: all {want} sessions"),
            all,
            "stop + dump-guest-memory to tmpfs + full scan",
            &self.dump_all,
            &ms,
        );
        vs(
            &format!("backdoor: all {want} sessions"),
            all,
            "pmemsave of the whole state box + validate",
            &self.pmem_box,
            &ms,
        );
        if let Some(b8) = dist_or_none(&self.small[0]) {
            vs(
                "READ 8 B, persistent connection",
                &b8,
                "pmemsave of 8 B (QMP)",
                &self.small[1],
                &us,
            );
            vs(
                "READ 8 B, persistent connection",
                &b8,
                "HMP xp /1gx (QMP human-monitor-command)",
                &self.small[2],
                &us,
            );
        }
        if let Some(b4k) = dist_or_none(&self.small[3]) {
            vs(
                "READ 4 KiB, persistent connection",
                &b4k,
                "pmemsave of 4 KiB (QMP)",
                &self.small[4],
                &us,
            );
        }
        out
    }

    fn details(&self) -> serde_json::Value {
        json!({"version": self.version, "skipped": self.skipped,
            "dump_first_ms": dist_or_none(&self.dump_first), "dump_all_ms": dist_or_none(&self.dump_all),
            "pmemsave_box_ms": dist_or_none(&self.pmem_box), "pmemsave_4k_first_ms": dist_or_none(&self.pmem_first),
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
    match qemu_runs(ctx, addr, ram, want, reps, &mut r) {
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

        let t0 = Instant::now();
        vm.qmp.pmemsave(gpa, len as u64, &out)?;
        read_into(&out, &mut buf)?;
        let (_, a, found) = scan(&buf, t0);
        if found != want {
            return Err(format!(
                "pmemsave of the box held {found} of {want} sessions"
            ));
        }
        r.pmem_box.push(a);

        let t0 = Instant::now();
        vm.qmp.pmemsave(gpa, 4096, &out)?;
        read_into(&out, &mut buf)?;
        if !first_record_valid(&buf) {
            return Err("pmemsave of the box's first 4 KiB held no valid first record".into());
        }
        r.pmem_first.push(t0.elapsed().as_secs_f64() * 1e3);
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
