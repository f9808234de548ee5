//! The portable guest-side C (guest-driver/lib/backdoor_guest.c), run in
//! user space: what it writes is exactly what the Rust readers (the
//! agent's and the monitor's) accept, and a concurrent reader never
//! accepts a record the C writer is in the middle of writing.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use backdoor_abi::record::{read_slot, LocalSlot, ReadOutcome, Record};
use backdoor_abi::{
    Counter, CounterState, Level, PboxHeader, SboxHeader, LINE, PBOX_MAGIC, SBOX_MAGIC,
};
use proptest::prelude::*;

#[link(name = "backdoor_guest", kind = "static")]
extern "C" {
    fn bd_crc32c(crc: u32, buf: *const c_void, len: u64) -> u32;
    fn bd_pbox_init(mem: *mut c_void, bytes: u64) -> c_int;
    fn bd_counter_alloc(
        pbox: *mut c_void,
        name: *const c_char,
        deadline_ms: u32,
        level: u8,
        owner: u32,
    ) -> *mut c_void;
    fn bd_counter_idle(c: *mut c_void);
    fn bd_counter_active(c: *mut c_void);
    fn bd_counter_retire(c: *mut c_void);
    fn bd_test_bump(c: *mut c_void);
    fn bd_sbox_init(mem: *mut c_void, bytes: u64, slot_size: u32) -> c_int;
    fn bd_sbox_init_at(mem: *mut c_void, bytes: u64, slot_size: u32, header_size: u32) -> c_int;
    fn bd_sbox_slot(sbox: *mut c_void, i: u32) -> *mut c_void;
    #[allow(clippy::too_many_arguments)]
    fn bd_record_write(
        sbox: *mut c_void,
        slot: u32,
        service: *const c_char,
        session_id: u64,
        version: u64,
        stage: u32,
        payload: *const c_void,
        len: u32,
    ) -> c_int;
}

/// 8-byte aligned memory shared with the C code, readable as atomics.
struct Region(Vec<AtomicU64>);

impl Region {
    fn new(bytes: usize) -> Self {
        Self((0..bytes / 8).map(|_| AtomicU64::new(0)).collect())
    }
    fn ptr(&self) -> *mut c_void {
        self.0.as_ptr().cast_mut().cast()
    }
    fn line(&self, off: usize) -> [u8; LINE] {
        let mut b = [0u8; LINE];
        for (chunk, w) in b.chunks_exact_mut(8).zip(&self.0[off / 8..]) {
            chunk.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        b
    }
    fn slot(&self, box_off: usize, i: usize, slot_size: usize) -> LocalSlot<'_> {
        let start = (box_off + LINE + i * slot_size) / 8;
        LocalSlot::new(&self.0[start..start + slot_size / 8])
    }
}

fn write_record(
    r: &Region,
    slot: u32,
    service: &str,
    session: u64,
    version: u64,
    stage: u32,
    payload: &[u8],
) -> c_int {
    let svc = CString::new(service).unwrap();
    // SAFETY: r was set up by bd_sbox_init; the payload pointer/len describe a live slice.
    unsafe {
        bd_record_write(
            r.ptr(),
            slot,
            svc.as_ptr(),
            session,
            version,
            stage,
            payload.as_ptr().cast(),
            u32::try_from(payload.len()).unwrap(),
        )
    }
}

#[test]
fn crc32c_has_the_standard_check_value() {
    // SAFETY: a valid 9-byte buffer.
    let crc = unsafe { bd_crc32c(0, b"123456789".as_ptr().cast(), 9) };
    assert_eq!(crc, 0xe306_9283);
}

proptest! {
    #[test]
    fn c_crc32c_equals_the_rust_crate(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        // SAFETY: data is a live buffer of the given length.
        let c = unsafe { bd_crc32c(0, data.as_ptr().cast(), data.len() as u64) };
        prop_assert_eq!(c, crc32c::crc32c(&data));
    }

    #[test]
    fn records_the_c_writer_writes_are_what_the_rust_reader_reads(
        service in "[a-z][a-z0-9_-]{0,14}",
        session in any::<u64>(),
        version in any::<u64>(),
        stage in any::<u32>(),
        payload in proptest::collection::vec(any::<u8>(), 0..=448),
        slot in 0u32..4,
    ) {
        let r = Region::new(64 + 4 * 512);
        // SAFETY: r is 2112 writable, 8-aligned bytes.
        prop_assert_eq!(unsafe { bd_sbox_init(r.ptr(), 64 + 4 * 512, 512) }, 4);
        prop_assert_eq!(write_record(&r, slot, &service, session, version, stage, &payload), 0);
        let got = read_slot(&r.slot(0, slot as usize, 512), 0);
        let want = Record { seq: 2, session_id: session, service, version, stage, payload };
        prop_assert_eq!(got, ReadOutcome::Complete { record: want, retries: 0 });
    }
}

#[test]
fn state_box_header_and_bad_writes() {
    let r = Region::new(64 + 8 * 256);
    // SAFETY: r is large enough for 8 slots of 256 bytes.
    assert_eq!(unsafe { bd_sbox_init(r.ptr(), 64 + 8 * 256, 256) }, 8);
    let h = SboxHeader::from_bytes(&r.line(0));
    assert_eq!(
        (h.magic, h.version, h.header_size, h.slot_count, h.slot_size),
        (SBOX_MAGIC, 1, 64, 8, 256)
    );
    // SAFETY: slot 3 exists.
    let slot3 = unsafe { bd_sbox_slot(r.ptr(), 3) };
    assert_eq!(slot3 as usize - r.ptr() as usize, 64 + 3 * 256);
    assert!(
        write_record(&r, 0, "svc", 1, 1, 0, &[0; 193]) < 0,
        "payload larger than the slot"
    );
    assert!(
        write_record(&r, 8, "svc", 1, 1, 0, b"x") < 0,
        "slot out of range"
    );
    assert!(write_record(&r, 0, "", 1, 1, 0, b"x") < 0, "empty service");
    assert!(
        write_record(&r, 0, "bad\tname", 1, 1, 0, b"x") < 0,
        "unprintable service"
    );
    assert_eq!(
        read_slot(&r.slot(0, 0, 256), 0),
        ReadOutcome::Empty,
        "refused writes leave the slot untouched"
    );
    // SAFETY: the buffer is too small for a header and one 128-byte slot.
    assert!(unsafe { bd_sbox_init(r.ptr(), 100, 128) } < 0);
    // SAFETY: as above; 100 is not a power of two.
    assert!(unsafe { bd_sbox_init(r.ptr(), 4096, 100) } < 0);
}

#[test]
fn a_page_padded_header_puts_every_slot_on_its_own_pages() {
    // The Linux driver's layout: one page of header, slots of one page, so
    // it can map one service's slots alone into that service.
    let r = Region::new(4096 * 4);
    // SAFETY: r holds 4 pages.
    assert_eq!(unsafe { bd_sbox_init_at(r.ptr(), 4096 * 4, 4096, 4096) }, 3);
    let h = SboxHeader::from_bytes(&r.line(0));
    assert_eq!((h.header_size, h.slot_count, h.slot_size), (4096, 3, 4096));
    // SAFETY: slot 2 exists.
    let slot2 = unsafe { bd_sbox_slot(r.ptr(), 2) };
    assert_eq!(slot2 as usize - r.ptr() as usize, 3 * 4096);
    assert_eq!(write_record(&r, 2, "kv", 7, 1, 3, b"hello"), 0);
    // slot() counts from the end of a 64-byte header.
    match read_slot(&r.slot(4096 - LINE, 2, 4096), 0) {
        ReadOutcome::Complete { record, .. } => assert_eq!(record.payload, b"hello"),
        other => panic!("{other:?}"),
    }
    for bad in [0, 32, 100, 0x1_0000] {
        // SAFETY: r holds 4 pages; a bad header size is refused before any write.
        let rc = unsafe { bd_sbox_init_at(r.ptr(), 4096 * 4, 4096, bad) };
        assert!(rc < 0, "{bad}");
    }
}

#[test]
fn a_concurrent_reader_never_accepts_a_record_the_c_writer_is_writing() {
    let r = Arc::new(Region::new(64 + 512));
    // SAFETY: one slot of 512 bytes after the header.
    assert_eq!(unsafe { bd_sbox_init(r.ptr(), 64 + 512, 512) }, 1);
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (r, done) = (r.clone(), done.clone());
        std::thread::spawn(move || {
            for v in 1..=300_000u64 {
                let b = (v % 251) as u8;
                assert_eq!(
                    write_record(&r, 0, "kv", 7, v, (v % 13) as u32, &[b; 300]),
                    0
                );
            }
            done.store(true, Ordering::Release);
        })
    };
    let (mut complete, mut torn) = (0u64, 0u64);
    let mut last = 0;
    while !done.load(Ordering::Acquire) {
        match read_slot(&r.slot(0, 0, 512), 3) {
            ReadOutcome::Complete { record, .. } => {
                let b = (record.version % 251) as u8;
                assert!(
                    record.payload.iter().all(|&x| x == b),
                    "torn payload accepted at version {}",
                    record.version
                );
                assert_eq!(record.stage, (record.version % 13) as u32);
                assert!(record.version >= last, "versions went backwards");
                last = record.version;
                complete += 1;
            }
            ReadOutcome::Torn | ReadOutcome::Empty => torn += 1,
            ReadOutcome::Corrupt(c) => panic!("seqlock passed a copy that fails validation: {c:?}"),
        }
    }
    writer.join().unwrap();
    assert!(
        complete > 100,
        "too few complete reads ({complete} complete, {torn} torn) to mean anything"
    );
    eprintln!("concurrent reads: {complete} complete, {torn} torn and retried/reported");
}

#[test]
fn counters_allocate_bump_and_change_state_as_the_monitor_reads_them() {
    let r = Region::new(8192);
    // SAFETY: 8 KiB of writable memory.
    let cap = unsafe { bd_pbox_init(r.ptr(), 8192) };
    assert_eq!(cap, (8192 - 64) / 64);
    let h = PboxHeader::from_bytes(&r.line(0));
    assert_eq!((h.magic, h.capacity, h.counter_size), (PBOX_MAGIC, 127, 64));
    let name = CString::new("http-worker").unwrap();
    // SAFETY: the box was initialised above; name is NUL-terminated.
    let c0 =
        unsafe { bd_counter_alloc(r.ptr(), name.as_ptr(), 500, Level::Application as u8, 4242) };
    // SAFETY: as above.
    let c1 = unsafe { bd_counter_alloc(r.ptr(), name.as_ptr(), 100, Level::Session as u8, 1) };
    assert!(!c0.is_null() && !c1.is_null());
    for _ in 0..1000 {
        // SAFETY: c0 points at a live counter.
        unsafe { bd_test_bump(c0) };
    }
    // SAFETY: c0 and c1 point at live counters.
    unsafe {
        bd_counter_idle(c1);
    }
    let k0 = Counter::from_bytes(&r.line(64));
    let k1 = Counter::from_bytes(&r.line(128));
    assert_eq!(
        (k0.value, k0.id, k0.deadline_ms, k0.owner),
        (1000, 1, 500, 4242)
    );
    assert_eq!(
        (k0.state(), k0.level()),
        (Some(CounterState::Active), Some(Level::Application))
    );
    assert_eq!(backdoor_abi::decode_name(&k0.name), Some("http-worker"));
    assert_eq!((k1.id, k1.state()), (2, Some(CounterState::Idle)));
    // SAFETY: live counters.
    unsafe {
        bd_counter_active(c1);
        bd_counter_retire(c0);
    }
    assert_eq!(
        Counter::from_bytes(&r.line(128)).state(),
        Some(CounterState::Active)
    );
    assert_eq!(
        Counter::from_bytes(&r.line(64)).state(),
        Some(CounterState::Retired)
    );
    assert_eq!(
        Counter::from_bytes(&r.line(64)).value,
        1000,
        "retiring keeps the last value"
    );
}

#[test]
fn a_full_progress_box_refuses_more_counters() {
    let r = Region::new(64 + 2 * 64);
    // SAFETY: room for exactly two counters.
    assert_eq!(unsafe { bd_pbox_init(r.ptr(), 64 + 2 * 64) }, 2);
    let name = CString::new("c").unwrap();
    for _ in 0..2 {
        // SAFETY: initialised box.
        assert!(!unsafe { bd_counter_alloc(r.ptr(), name.as_ptr(), 10, 1, 0) }.is_null());
    }
    // SAFETY: initialised box.
    assert!(unsafe { bd_counter_alloc(r.ptr(), name.as_ptr(), 10, 1, 0) }.is_null());
}
