//! Soft-backend benchmark on loopback: 8-byte READ latency, 4-KiB READ
//! latency, one batched READ of 64 counters, and bulk READ throughput of a
//! 256-MiB state box. Baselines measured in the same run: a raw TCP
//! 8-byte echo round trip (the network floor) and a local memcpy of the
//! same 256 MiB (the memory floor).
//! Targets (issue 4): small READ p50 under 30 µs, bulk over 1 GB/s.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backdoor_abi::{HookKind, PERM_READ};
use backdoor_agent::auth::Keys;
use backdoor_agent::wire::BatchEntry;
use backdoor_agent::{
    Agent, Client, DescriptorSource, GuestMemory, PushedDescriptor, RamRange, Role,
};
use backdoor_dev::{Descriptor, Hook};

const KEY: [u8; 16] = *b"0123456789abcdef";
const BULK: u64 = 256 << 20;

fn hex(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |p: usize| v[((v.len() - 1) * p).div_ceil(100)];
    (at(50), at(99))
}

fn main() {
    // Fake guest RAM: a memfd with a 64-KiB progress box and a 256-MiB state box.
    let fd =
        nix::sys::memfd::memfd_create(c"bench-ram", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .unwrap();
    let file = std::fs::File::from(fd);
    let ram = BULK + (1 << 20);
    file.set_len(ram).unwrap();
    let mem = Arc::new(
        GuestMemory::map(
            file,
            vec![RamRange {
                guest_addr: 0,
                len: ram,
                file_offset: 0,
            }],
        )
        .unwrap(),
    );
    // Touch the pages so the benchmark measures copying, not first-touch faults.
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..ram).step_by(1 << 20) {
        assert!(mem.write(off, &chunk));
    }
    let hook = |id, gpa, len, kind, name: &str| Hook {
        id,
        gpa,
        len,
        kind,
        perms: PERM_READ,
        name: name.into(),
    };
    let desc = Descriptor {
        generation: 1,
        sealed: true,
        tamper_count: 0,
        hooks: vec![
            hook(1, 0, 64 << 10, HookKind::ProgressBox, "progress"),
            hook(2, 1 << 20, BULK, HookKind::StateBox, "state"),
        ],
    };
    let keys = Keys::parse(&format!("read = \"{}\"", hex(&KEY)), "bench").unwrap();
    let source: Arc<dyn DescriptorSource> = Arc::new(PushedDescriptor::new(desc));
    let agent = Arc::new(Agent::new("bench".into(), keys, mem.clone(), source));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    agent.serve(listener).unwrap();
    let mut c = Client::connect(addr, "bench", Role::Read, &KEY, Duration::from_secs(5)).unwrap();

    let echo = echo_baseline(5000, false);
    let echo_spin = echo_baseline(5000, true);
    let time = |c: &mut Client, n: usize, f: &dyn Fn(&mut Client)| -> Vec<f64> {
        for _ in 0..n / 10 {
            f(c);
        }
        (0..n)
            .map(|_| {
                let t = Instant::now();
                f(c);
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect()
    };
    let small = time(&mut c, 20_000, &|c| {
        c.read(1, 64, 8).unwrap();
    });
    let page = time(&mut c, 5_000, &|c| {
        c.read(2, 4096, 4096).unwrap();
    });
    let entries: Vec<BatchEntry> = (1..=64)
        .map(|i| BatchEntry {
            hook: 1,
            offset: 64 * i,
            len: 8,
        })
        .collect();
    let batch = time(&mut c, 5_000, &|c| {
        c.read_batch(&entries).unwrap();
    });

    let t = Instant::now();
    let mut total = 0u64;
    c.read_bulk(2, 0, BULK, 1 << 20, 4, |b| total += b.len() as u64)
        .unwrap();
    assert_eq!(total, BULK);
    let bulk_gbs = total as f64 / t.elapsed().as_secs_f64() / 1e9;
    let mut dst = vec![0u8; 1 << 20];
    let t = Instant::now();
    for off in (0..BULK).step_by(1 << 20) {
        assert!(mem.read((1 << 20) + off, &mut dst));
    }
    let memcpy_gbs = BULK as f64 / t.elapsed().as_secs_f64() / 1e9;

    let (e50, e99) = percentiles(echo);
    let (es50, es99) = percentiles(echo_spin);
    let (s50, s99) = percentiles(small);
    let (p50, p99) = percentiles(page);
    let (b50, b99) = percentiles(batch);
    println!("soft backend on loopback (one monitor connection)");
    println!("baseline: raw TCP 8-byte echo, blocking   p50 {e50:>7.1} µs  p99 {e99:>7.1} µs");
    println!("baseline: raw TCP 8-byte echo, busy-poll  p50 {es50:>7.1} µs  p99 {es99:>7.1} µs");
    println!("READ 8 B (one counter)                    p50 {s50:>7.1} µs  p99 {s99:>7.1} µs   {:.2}x the busy-poll echo", s50 / es50);
    println!("READ 4 KiB                                p50 {p50:>7.1} µs  p99 {p99:>7.1} µs   {:.2}x the busy-poll echo", p50 / es50);
    println!("READ_BATCH of 64 counters (one trip)      p50 {b50:>7.1} µs  p99 {b99:>7.1} µs   {:.2}x one 8-B READ", b50 / s50);
    println!("bulk READ of a 256-MiB state box          {bulk_gbs:>7.2} GB/s   baseline local copy {memcpy_gbs:.2} GB/s ({:.2}x)", bulk_gbs / memcpy_gbs);
    println!(
        "targets: small READ p50 < 30 µs: {}; bulk > 1 GB/s: {}",
        if s50 < 30.0 { "met" } else { "NOT met" },
        if bulk_gbs > 1.0 { "met" } else { "NOT met" }
    );
}

/// Round trips of 8 bytes over a plain loopback TCP connection, both ends
/// blocking, or both ends busy-polling (the floor the agent's own busy-poll aims at).
fn echo_baseline(n: usize, spin: bool) -> Vec<f64> {
    use backdoor_agent::wire::spin_until_readable;
    use std::os::fd::AsRawFd;
    let window = if spin {
        Duration::from_millis(5)
    } else {
        Duration::ZERO
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 8];
        loop {
            spin_until_readable(s.as_raw_fd(), window);
            if s.read_exact(&mut b).is_err() {
                break;
            }
            if s.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut b = [0u8; 8];
    (0..n)
        .map(|_| {
            let t = Instant::now();
            s.write_all(&b).unwrap();
            spin_until_readable(s.as_raw_fd(), window);
            s.read_exact(&mut b).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}
