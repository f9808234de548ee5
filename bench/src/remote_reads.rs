//! Section 3: remote reads over the soft backend on loopback: 8-B, 4-KiB
//! and batched counter READ latencies and bulk throughput, against a raw
//! TCP echo (blocking and busy-polling) and a local copy, in the same run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use backdoor_abi::HookKind;
use backdoor_agent::wire::{spin_until_readable, BatchEntry};
use serde_json::json;

use crate::frame_crypto;
use crate::plot::Series;
use crate::report::{Figure, Section};
use crate::stats::Dist;
use crate::Ctx;
use bdvmm_tests::fake_guest::{self, hook};

/// Round trips of 8 bytes over a plain loopback TCP connection, both ends
/// blocking, or both ends busy-polling (the floor the agent's busy-poll aims at).
pub fn echo_baseline_us(n: usize, spin: bool) -> Vec<f64> {
    let window = if spin {
        Duration::from_millis(5)
    } else {
        Duration::ZERO
    };
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("address");
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut b = [0u8; 8];
        loop {
            spin_until_readable(s.as_raw_fd(), window);
            if s.read_exact(&mut b).is_err() || s.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let mut b = [0u8; 8];
    fake_guest::time_us(n, || {
        s.write_all(&b).expect("echo write");
        spin_until_readable(s.as_raw_fd(), window);
        s.read_exact(&mut b).expect("echo read");
    })
}

fn lat(d: &Dist) -> String {
    format!("p50 {:.1} µs, p99 {:.1} µs", d.p50, d.p99)
}

/// Runs section 3.
pub fn run(ctx: &Ctx) -> Section {
    let bulk: u64 = if ctx.quick { 64 << 20 } else { 256 << 20 };
    let (n_small, n_big) = if ctx.quick {
        (2000, 500)
    } else {
        (20_000, 5000)
    };
    let mut sec = Section::new(
        3,
        "remote_reads",
        "Remote reads (soft backend, loopback)",
        &format!(
            "A real agent serves fake guest RAM (a memfd with a 64-KiB progress box and a {} MiB \
             state box) on loopback; one monitor connection times {n_small} 8-B READs, {n_big} \
             4-KiB READs, {n_big} READ_BATCHes of 64 counters, and one bulk READ of the whole \
             state box (1-MiB pipelined READs, 4 in flight). Baselines, same run: an 8-byte \
             round trip over plain loopback TCP (blocking, and busy-polling like the agent) and a \
             local copy of the same bytes.",
            bulk >> 20
        ),
    );
    let mem = fake_guest::ram(bulk + (1 << 20));
    let addr = fake_guest::serve(
        mem.clone(),
        vec![
            hook(1, 0, 64 << 10, HookKind::ProgressBox, "progress"),
            hook(2, 1 << 20, bulk, HookKind::StateBox, "state"),
        ],
        None,
    );
    let mut c = fake_guest::connect(addr);
    let echo = Dist::new(echo_baseline_us(n_big, false));
    let echo_spin = Dist::new(echo_baseline_us(n_big, true));
    let small = Dist::new(fake_guest::read_rtt_us(&mut c, n_small));
    let page = Dist::new(fake_guest::time_us(n_big, || {
        c.read(2, 4096, 4096).expect("READ 4 KiB");
    }));
    let entries: Vec<BatchEntry> = (1..=64)
        .map(|i| BatchEntry {
            hook: 1,
            offset: 64 * i,
            len: 8,
        })
        .collect();
    let batch = Dist::new(fake_guest::time_us(n_big, || {
        c.read_batch(&entries).expect("READ_BATCH");
    }));
    let t = Instant::now();
    let mut total = 0u64;
    c.read_bulk(2, 0, bulk, 1 << 20, 4, |b| total += b.len() as u64)
        .expect("bulk READ");
    assert_eq!(total, bulk);
    let bulk_gbs = total as f64 / t.elapsed().as_secs_f64() / 1e9;
    let mut dst = vec![0u8; 1 << 20];
    let t = Instant::now();
    for off in (0..bulk).step_by(1 << 20) {
        assert!(mem.read((1 << 20) + off, &mut dst));
    }
    let copy_gbs = bulk as f64 / t.elapsed().as_secs_f64() / 1e9;

    // The cost of the encryption: the same request loop, sealed and plain.
    let hooks = vec![
        hook(1, 0, 64 << 10, HookKind::ProgressBox, "progress"),
        hook(2, 1 << 20, bulk, HookKind::StateBox, "state"),
    ];
    let crypto_agent = std::sync::Arc::new(fake_guest::agent(mem.clone(), hooks, None));
    let mut plain = frame_crypto::Loop::start(crypto_agent.clone(), false);
    let mut sealed = frame_crypto::Loop::start(crypto_agent, true);
    // Interleaved in ten rounds, so that a noisy neighbour weighs on both.
    let (mut plain_us, mut sealed_us) = (Vec::new(), Vec::new());
    let (mut plain_s, mut sealed_s) = (0f64, 0f64);
    for _ in 0..10 {
        plain_us.extend(fake_guest::time_us(n_small / 10, || {
            plain.read(1, 1, 64, 8);
        }));
        sealed_us.extend(fake_guest::time_us(n_small / 10, || {
            sealed.read(1, 1, 64, 8);
        }));
        plain_s += bulk as f64 / 10.0 / plain.bulk_gbs(1, 2, bulk / 10) / 1e9;
        sealed_s += bulk as f64 / 10.0 / sealed.bulk_gbs(1, 2, bulk / 10) / 1e9;
    }
    let (plain_small, sealed_small) = (Dist::new(plain_us), Dist::new(sealed_us));
    let seal_gbs = frame_crypto::seal_open_gbs(64);
    let (plain_gbs, sealed_gbs) = (bulk as f64 / plain_s / 1e9, bulk as f64 / sealed_s / 1e9);

    let spin_name = "8-B TCP echo, busy-poll";
    sec.figures = vec![
        Figure::plain("READ 8 B (one counter)", small.p50, "µs", lat(&small))
            .against(spin_name, echo_spin.p50, lat(&echo_spin))
            .headline(),
        Figure::plain("READ 8 B (one counter)", small.p50, "µs", lat(&small)).against(
            "8-B TCP echo, blocking",
            echo.p50,
            lat(&echo),
        ),
        Figure::plain("READ 4 KiB", page.p50, "µs", lat(&page))
            .against(spin_name, echo_spin.p50, lat(&echo_spin))
            .headline(),
        Figure::plain(
            "READ_BATCH of 64 counters (one round trip)",
            batch.p50,
            "µs",
            lat(&batch),
        )
        .against(
            "64 × one 8-B READ",
            64.0 * small.p50,
            format!("{:.0} µs", 64.0 * small.p50),
        )
        .headline(),
        Figure::plain(
            &format!("bulk READ of a {}-MiB state box", bulk >> 20),
            bulk_gbs,
            "GB/s",
            format!("{bulk_gbs:.2} GB/s"),
        )
        .against("local copy", copy_gbs, format!("{copy_gbs:.2} GB/s"))
        .headline(),
        Figure::plain(
            "READ 8 B, every frame encrypted (request loop)",
            sealed_small.p50,
            "µs",
            lat(&sealed_small),
        )
        .against(
            "the same loop, frames plain",
            plain_small.p50,
            lat(&plain_small),
        ),
        Figure::plain(
            &format!(
                "bulk READ of {} MiB, every frame encrypted (request loop)",
                bulk >> 20
            ),
            sealed_gbs,
            "GB/s",
            format!("{sealed_gbs:.2} GB/s"),
        )
        .against(
            "the same loop, frames plain",
            plain_gbs,
            format!("{plain_gbs:.2} GB/s"),
        ),
        Figure::plain(
            "sealing and opening a 1-MiB reply (AES-256-GCM, one core)",
            seal_gbs,
            "GB/s",
            format!("{seal_gbs:.2} GB/s"),
        )
        .against("local copy", copy_gbs, format!("{copy_gbs:.2} GB/s")),
    ];
    let devs = crate::rdma::devices();
    sec.notes
        .push("RDMA verbs: section 7 (measured in the lab, against ib_read_lat).".into());
    sec.notes.push(format!(
        "Targets (issue 4): small READ p50 under 30 µs: {}; bulk over 1 GB/s: {}.",
        met(small.p50 < 30.0),
        met(bulk_gbs > 1.0)
    ));
    sec.notes.push(format!(
        "Encryption (issue 14; Noise NNpsk0, AES-256-GCM on every frame, docs/wire.md): one \
         request loop over the agent's dispatch, run encrypted and plain in this process. \
         Small READ p50 within 15 % of plain: {} ({:+.1} %); bulk within 25 %: {} ({:+.1} %). \
         On loopback both ends run on this machine's cores (the agent seals, the client \
         opens), so bulk pays the cipher twice on shared CPUs; across hosts each end does its \
         own half.",
        met(sealed_small.p50 <= plain_small.p50 * 1.15),
        (sealed_small.p50 / plain_small.p50 - 1.0) * 100.0,
        met(sealed_gbs >= plain_gbs * 0.75),
        (sealed_gbs / plain_gbs - 1.0) * 100.0,
    ));
    ctx.cdf_plot(
        &mut sec,
        "remote_reads_cdf.svg",
        "Remote READ latency (soft backend, loopback)",
        "round-trip latency (µs)",
        &[
            Series {
                label: "READ 8 B",
                sorted: &small.sorted,
            },
            Series {
                label: "READ 4 KiB",
                sorted: &page.sorted,
            },
            Series {
                label: "READ_BATCH 64 counters",
                sorted: &batch.sorted,
            },
            Series {
                label: "TCP echo busy-poll (baseline)",
                sorted: &echo_spin.sorted,
            },
            Series {
                label: "TCP echo blocking (baseline)",
                sorted: &echo.sorted,
            },
        ],
    );
    sec.details = json!({
        "read_8b_us": small, "read_4k_us": page, "read_batch64_us": batch,
        "echo_blocking_us": echo, "echo_busy_poll_us": echo_spin,
        "bulk_gbs": bulk_gbs, "bulk_bytes": bulk, "local_copy_gbs": copy_gbs,
        "loop_plain_read_8b_us": plain_small, "loop_encrypted_read_8b_us": sealed_small,
        "loop_plain_bulk_gbs": plain_gbs, "loop_encrypted_bulk_gbs": sealed_gbs,
        "seal_open_1mib_gbs": seal_gbs,
        "rdma_devices": devs,
    });
    sec
}

/// "met" or "NOT met".
pub fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}
