//! Section 5: extraction. Time to the first valid session and to all N
//! sessions over the backdoor (bdctl's extraction), against what a
//! dump-guest-memory-style tool leaves you with: pause the VM, dump all
//! guest RAM, resume, and scan the dump for records.

use std::io::Read;
use std::time::{Duration, Instant};

use backdoor_abi::record::{read_slot, validate, ReadOutcome};
use backdoor_abi::{SboxHeader, LINE, SBOX_MAGIC};
use backdoor_agent::{Client, RemoteSlot, Role};
use bdvmm_tests::Vm;
use serde_json::json;

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
             {reps} repetitions of each."
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
    let _ = vm.api("stop");
    let (first, all) = (Dist::new(first), Dist::new(all));
    let (d_first, d_all, d_dump) = (Dist::new(d_first), Dist::new(d_all), Dist::new(d_dump));
    let ms = |d: &Dist| format!("p50 {:.2} ms (min {:.2}, max {:.2})", d.p50, d.min, d.max);
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
    sec.details = json!({"sessions": want, "guest_ram_mib": mib,
        "backdoor_first_ms": first, "backdoor_all_ms": all,
        "dump_first_ms": d_first, "dump_all_ms": d_all, "dump_only_ms": d_dump});
    sec
}
