//! The library over a host file: what it writes is what docs/abi.md says a
//! monitor will read (checked with `backdoor-abi`'s own decoders on the
//! raw file bytes), and every failure is an error, never a panic.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use backdoor_abi::{Counter as AbiCounter, CounterState, LINE};
use backdoor_guest::{
    Counter, Device, Error, HostConfig, Inbox, Level, Problem, ReadOutcome, ServiceArea,
};

fn state(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("state")
}

fn raw(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

fn poke(path: &Path, off: u64, data: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(data, off)
        .unwrap();
}

fn abi_counter(path: &Path, dev: &Device, id: u32) -> AbiCounter {
    let l = dev.host_layout().unwrap();
    let b = raw(path, l.pbox_offset + u64::from(id) * LINE as u64, LINE);
    AbiCounter::from_bytes(b.as_slice().try_into().unwrap())
}

#[test]
fn counters_are_abi_counters_that_bump_idle_and_retire() {
    let dir = tempfile::tempdir().unwrap();
    let p = state(&dir);
    let dev = Device::host(&p, &HostConfig::default()).unwrap();
    let c = Counter::alloc(&dev, "shop", 750, Level::Application).unwrap();
    let s = Counter::alloc_owned(&dev, "session-7", 2000, Level::Session, 7).unwrap();
    assert_ne!(c.id(), s.id());
    for _ in 0..5 {
        c.bump();
    }
    let seen = abi_counter(&p, &dev, c.id());
    assert_eq!(seen.value, 5);
    assert_eq!(seen.id, c.id());
    assert_eq!(seen.deadline_ms, 750);
    assert_eq!(seen.state(), Some(CounterState::Active));
    assert_eq!(seen.level(), Some(Level::Application));
    assert_eq!(seen.owner, std::process::id());
    assert_eq!(backdoor_abi::decode_name(&seen.name), Some("shop"));
    assert_eq!(abi_counter(&p, &dev, s.id()).owner, 7);

    s.idle().unwrap();
    assert!(s.is_idle());
    assert_eq!(
        abi_counter(&p, &dev, s.id()).state(),
        Some(CounterState::Idle)
    );
    s.active().unwrap();
    assert_eq!(
        abi_counter(&p, &dev, s.id()).state(),
        Some(CounterState::Active)
    );
    let (cid, sid) = (c.id(), s.id());
    drop(s);
    assert_eq!(
        abi_counter(&p, &dev, sid).state(),
        Some(CounterState::Retired)
    );
    assert_eq!(
        abi_counter(&p, &dev, cid).state(),
        Some(CounterState::Active)
    );
    let info = dev.info().unwrap();
    assert_eq!(info.counters_free, info.counters_total - 1);
}

#[test]
fn bad_counter_requests_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::host(state(&dir), &HostConfig::default()).unwrap();
    for (name, deadline, level) in [
        ("", 100, Level::Session),
        ("tab\there", 100, Level::Session),
        (
            "a-name-much-longer-than-thirty-two-bytes",
            100,
            Level::Session,
        ),
        ("ok", 0, Level::Session),
        ("ok", 100, Level::Os),
    ] {
        let e = Counter::alloc(&dev, name, deadline, level).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{name:?}: {e}");
    }
    let dev2 = {
        let dir = tempfile::tempdir().unwrap();
        let cfg = HostConfig {
            counters: 2,
            ..HostConfig::default()
        };
        (Device::host(state(&dir), &cfg).unwrap(), dir)
    };
    let _a = Counter::alloc(&dev2.0, "a", 10, Level::Session).unwrap();
    let _b = Counter::alloc(&dev2.0, "b", 10, Level::Session).unwrap();
    assert!(matches!(
        Counter::alloc(&dev2.0, "c", 10, Level::Session),
        Err(Error::NoSpace(_))
    ));
}

#[test]
fn an_area_outlives_its_process_and_has_one_holder_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let p = state(&dir);
    let leftover;
    {
        let dev = Device::host(&p, &HostConfig::default()).unwrap();
        leftover = Counter::alloc(&dev, "crashed", 100, Level::Session)
            .unwrap()
            .id();
        let area = ServiceArea::open(&dev, "kv", 6, true).unwrap();
        assert!(area.created());
        assert_eq!((area.slot_count(), area.slot_size()), (6, 4096));
        assert!(matches!(
            Device::host(&p, &HostConfig::default()),
            Err(Error::Host(backdoor_guest::host::HostError::Locked { .. }))
        ));
        assert!(matches!(
            ServiceArea::open(&dev, "kv", 6, true),
            Err(Error::Busy(_))
        ));
        area.write(4, 99, 3, 2, b"state v3").unwrap();
        assert!(matches!(
            area.write(6, 99, 3, 2, b"x"),
            Err(Error::BadSlot { slot: 6, count: 6 })
        ));
        assert!(matches!(
            area.write(0, 99, 3, 2, &vec![0; 4033]),
            Err(Error::TooLarge {
                len: 4033,
                max: 4032
            })
        ));
        area.write(0, 99, 4, 3, &vec![7; 4032]).unwrap();
    }
    // A holder that crashed leaves its counter ACTIVE in the file.
    let l = Device::host(&p, &HostConfig::default())
        .unwrap()
        .host_layout()
        .unwrap();
    poke(
        &p,
        l.pbox_offset + u64::from(leftover) * LINE as u64 + 16,
        &[CounterState::Active as u8],
    );
    let dev = Device::host(&p, &HostConfig::default()).unwrap();
    // The previous holder is gone: its counters were retired on open.
    let crashed = abi_counter(&p, &dev, leftover);
    assert_eq!(crashed.state(), Some(CounterState::Retired));
    assert!(matches!(
        ServiceArea::open(&dev, "other", 1, false),
        Err(Error::NoService(_))
    ));
    let area = ServiceArea::open(&dev, "kv", 100, true).unwrap();
    assert!(!area.created());
    assert_eq!(area.slot_count(), 6, "an existing area keeps its size");
    let scan = area.scan();
    assert_eq!(scan.newest.len(), 1);
    assert_eq!(scan.newest[0].slot, 0);
    assert_eq!(scan.newest[0].record.version, 4);
    assert_eq!(scan.complete.len(), 2);
    area.clear(0).unwrap();
    assert_eq!(area.read(0).unwrap(), ReadOutcome::Empty);
    assert_eq!(area.scan().newest[0].record.version, 3);
    area.delete().unwrap();
    let area = ServiceArea::open(&dev, "kv", 2, true).unwrap();
    assert!(area.created());
    assert!(
        area.scan().complete.is_empty(),
        "a deleted area's records are gone"
    );
}

#[test]
fn a_slot_torn_mid_write_falls_back_to_the_other_slot_and_corruption_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = state(&dir);
    let dev = Device::host(&p, &HostConfig::default()).unwrap();
    let area = ServiceArea::open(&dev, "kv", 4, true).unwrap();
    area.write(0, 5, 1, 1, b"v1").unwrap();
    area.write(1, 5, 2, 2, b"v2").unwrap();
    area.write(2, 6, 1, 1, b"other").unwrap();
    let l = dev.host_layout().unwrap();
    let slot = |s: u64| l.sbox_offset + 4096 + s * 4096;
    // Session 5's newest write dies mid-way: seq odd.
    poke(&p, slot(1), &3u64.to_le_bytes());
    // Session 6's only record is scribbled on: its CRC fails.
    poke(&p, slot(2) + 64, b"X");
    let scan = area.scan();
    assert_eq!(scan.newest.len(), 1);
    assert_eq!(scan.newest[0].record.session_id, 5);
    assert_eq!(scan.newest[0].record.version, 1);
    assert_eq!(scan.newest[0].record.payload, b"v1");
    assert_eq!(scan.problems.len(), 2);
    assert_eq!(scan.problems[0], (1, Problem::Torn));
    assert!(matches!(scan.problems[1], (2, Problem::Corrupt(_))));
}

#[test]
fn the_inbox_lists_what_the_doorbell_says_was_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let p = state(&dir);
    let cfg = HostConfig {
        inbox_slots: 4,
        inbox_slot_size: 512,
        ..HostConfig::default()
    };
    let dev = Device::host(&p, &cfg).unwrap();
    let inbox = Inbox::map(&dev).unwrap().expect("an inbox");
    // The inbox is whole pages: (4096 - 64) / 512 slots.
    assert_eq!((inbox.capacity(), inbox.slot_size()), (7, 512));
    assert_eq!(inbox.delivered(), 0);
    assert!(inbox.scan("kv").newest.is_empty());
    let l = dev.host_layout().unwrap();
    let recs = [
        backdoor_abi::record::encode("kv", 11, 4, 3, b"a", 512).unwrap(),
        backdoor_abi::record::encode("shop", 12, 1, 1, b"b", 512).unwrap(),
        backdoor_abi::record::encode("kv", 13, 2, 1, b"c", 512).unwrap(),
    ];
    for (k, r) in recs.iter().enumerate() {
        poke(&p, l.inbox_offset + 64 + 512 * k as u64, r);
    }
    // Only two delivered so far: the third is not looked at.
    poke(&p, l.inbox_offset + 8, &2u64.to_le_bytes());
    let scan = inbox.scan("kv");
    assert_eq!(scan.newest.len(), 1);
    assert_eq!(scan.newest[0].record.session_id, 11);
    assert_eq!(
        scan.problems,
        vec![(1, Problem::ForeignService("shop".into()))]
    );
    // A doorbell beyond the capacity is clamped.
    poke(&p, l.inbox_offset + 8, &1000u64.to_le_bytes());
    assert_eq!(inbox.scan("kv").newest.len(), 2);
    let none = HostConfig {
        inbox_slots: 0,
        ..HostConfig::default()
    };
    let d2 = tempfile::tempdir().unwrap();
    assert!(Inbox::map(&Device::host(state(&d2), &none).unwrap())
        .unwrap()
        .is_none());
}

#[test]
fn a_missing_device_or_a_bad_state_file_is_a_clear_error() {
    let e = Device::open_path("/nonexistent/backdoor").unwrap_err();
    assert!(e.to_string().contains("is backdoor.ko loaded?"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let p = state(&dir);
    std::fs::write(&p, vec![0x41u8; 8192]).unwrap();
    let e = Device::host(&p, &HostConfig::default()).unwrap_err();
    assert!(
        e.to_string().contains("not a usable backdoor state file"),
        "{e}"
    );
    // A valid file, truncated.
    std::fs::remove_file(&p).unwrap();
    drop(Device::host(&p, &HostConfig::default()).unwrap());
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(3 * 4096).unwrap();
    let e = Device::host(&p, &HostConfig::default()).unwrap_err();
    assert!(e.to_string().contains("the layout needs"), "{e}");
    let bad = HostConfig {
        slot_size: 1000,
        ..HostConfig::default()
    };
    let e = Device::host(dir.path().join("new"), &bad).unwrap_err();
    assert!(e.to_string().contains("multiple of the page size"), "{e}");
}
