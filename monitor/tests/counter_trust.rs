//! What bdctl believes of guest-written counters (docs/abi.md "Progress
//! box"): a counter claims its level itself, so the OS level is believed
//! only of slots in memory no application can write; and the verdict
//! names where the counter lives (box, slot) and its owner.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backdoor_abi::{CounterState, HookKind, Level, LINE, PBOX_MAGIC, PERM_READ};
use backdoor_agent::auth::Keys;
use backdoor_agent::{guest_mem, Agent, GuestMemory, PushedDescriptor, RamRange};
use backdoor_dev::{Descriptor, Hook};

const KEY: &str = "00112233445566778899aabbccddeeff";
const BOX_LEN: u64 = 16 << 10;

/// Where counter `slot` goes, and its bytes.
fn counter(slot: u32, name: &str, level: Level, deadline_ms: u32, owner: u32) -> (u64, [u8; LINE]) {
    let mut c = [0u8; LINE];
    c[0..8].copy_from_slice(&1u64.to_le_bytes());
    c[8..12].copy_from_slice(&(slot + 1).to_le_bytes());
    c[12..16].copy_from_slice(&deadline_ms.to_le_bytes());
    c[16] = CounterState::Active as u8;
    c[17] = level as u8;
    c[20..24].copy_from_slice(&owner.to_le_bytes());
    c[24..24 + name.len()].copy_from_slice(name.as_bytes());
    (u64::from(slot + 1) * LINE as u64, c)
}

/// A driver-style progress box: page 0 (header and slots 0-62) is the
/// kernel's, the rest belongs to applications. Slot 0 is the kernel's
/// counter (a long deadline: it is never judged hung here); slot 63, in
/// an application's page, claims the OS level and never moves.
fn serve_box(mem: &Arc<GuestMemory>) -> std::net::SocketAddr {
    let mut h = [0u8; LINE];
    h[0..4].copy_from_slice(&PBOX_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&1u16.to_le_bytes());
    h[6..8].copy_from_slice(&64u16.to_le_bytes());
    h[8..12].copy_from_slice(&u32::try_from(BOX_LEN / 64 - 1).unwrap().to_le_bytes());
    h[12..16].copy_from_slice(&64u32.to_le_bytes());
    h[16..20].copy_from_slice(&63u32.to_le_bytes());
    assert!(mem.write(0, &h));
    for (at, c) in [
        counter(0, "kernel", Level::Os, 600_000, 0),
        counter(63, "impostor", Level::Os, 200, 4242),
    ] {
        assert!(mem.write(at, &c));
    }
    let desc = Descriptor {
        generation: 1,
        sealed: true,
        tamper_count: 0,
        hooks: vec![Hook {
            id: 1,
            gpa: 0,
            len: BOX_LEN,
            kind: HookKind::ProgressBox,
            perms: PERM_READ,
            name: "progress".into(),
        }],
    };
    let keys = Keys::parse(&format!("read = \"{KEY}\""), "test").unwrap();
    let agent = Agent::new(
        "vm1".into(),
        keys,
        mem.clone(),
        Arc::new(PushedDescriptor::new(desc)),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    Arc::new(agent).serve(l).unwrap();
    addr
}

#[test]
fn an_application_counter_claiming_the_os_level_is_judged_at_its_true_level() {
    let mem = Arc::new(
        GuestMemory::map(
            guest_mem::memfd(c"trust-test", BOX_LEN).unwrap(),
            vec![RamRange {
                guest_addr: 0,
                len: BOX_LEN,
                file_offset: 0,
            }],
        )
        .unwrap(),
    );
    let addr = serve_box(&mem);
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, format!("read = \"{KEY}\"\n")).unwrap();
    let mut watch = Command::new(env!("CARGO_BIN_EXE_bdctl"))
        .args(["watch", "--json", "--interval-ms", "50", "--key-file"])
        .arg(&keys)
        .arg(format!("vm1@{addr}"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(watch.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut hung = None;
    for line in out.lines().map_while(Result::ok) {
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        if e["event"] == "verdict" && e["verdict"] == "hung" {
            hung = Some(e);
            break;
        }
        assert!(Instant::now() < deadline, "no hung verdict");
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let e = hung.expect("bdctl watch ended without a verdict");
    assert_eq!(
        (
            e["level"].as_str(),
            e["counter"].as_str(),
            e["hook"].as_str(),
            e["slot"].as_u64(),
            e["owner"].as_u64(),
            e["claimed_os"].as_bool()
        ),
        (
            Some("application"),
            Some("impostor"),
            Some("progress"),
            Some(63),
            Some(4242),
            Some(true)
        ),
        "{e}"
    );
}
