//! The parts of the Linux guest driver (guest-driver/) that run in user
//! space: the driver's own bookkeeping (guest-driver/lib/backdoor_pool.c:
//! counter pages, service slot runs, name checks), the application header
//! guest-driver/include/backdoor_app.h (its record reader and writer against
//! the Rust ones), and the example program, compiled and run without the
//! driver. The module itself needs a Linux guest: `make module` builds it.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use backdoor_abi::record::{encode, read_slot, LocalSlot, ReadOutcome};
use backdoor_abi::{Counter, CounterState, Level, LINE, PBOX_MAGIC};
use proptest::prelude::*;

const PAGE: u32 = 4096;
const EFULL: c_int = -2;
const EINVAL: c_int = -1;
const DRIVER: u64 = u64::MAX;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CPage {
    owner: u64,
    released: u64,
    used: u32,
    reserved: u32,
}

#[repr(C)]
struct CPool {
    pages: *mut CPage,
    npages: u32,
    page_size: u32,
    clock: u64,
}

#[repr(C)]
struct SPool {
    used: *mut u8,
    nslots: u32,
}

/// `struct bd_ioc_info` (guest-driver/include/backdoor_uapi.h).
#[repr(C)]
#[derive(Default)]
struct IocInfo {
    words: [u32; 10],
    inbox_mmap_offset: u64,
    inbox_slot_size: u32,
    reserved: [u32; 3],
}

/// A record header buffer, aligned as `struct bd_record`.
#[repr(C, align(8))]
struct RecHdr([u8; 64]);

#[link(name = "backdoor_guest", kind = "static")]
extern "C" {
    fn bd_name_check(field: *const c_char, size: u32) -> c_int;
    fn bd_counter_setup(
        c: *mut c_void,
        id: u32,
        name: *const c_char,
        deadline_ms: u32,
        level: u8,
        owner: u32,
    ) -> c_int;
    fn bd_pbox_init(mem: *mut c_void, bytes: u64) -> c_int;
    fn bd_cpool_init(p: *mut CPool, pages: *mut CPage, npages: u32, page_size: u32) -> c_int;
    fn bd_cpool_page_first(p: *const CPool, page: u32) -> u32;
    fn bd_cpool_page_counters(p: *const CPool, page: u32) -> u32;
    fn bd_cpool_slot_page(p: *const CPool, slot: u32) -> c_int;
    fn bd_cpool_slot_offset(slot: u32) -> u64;
    fn bd_cpool_alloc(p: *mut CPool, owner: u64, slot: *mut u32, claimed: *mut c_int) -> c_int;
    fn bd_cpool_owns_slot(p: *const CPool, owner: u64, slot: u32) -> c_int;
    fn bd_cpool_owns_page(p: *const CPool, owner: u64, page: u32) -> c_int;
    fn bd_cpool_next_page(p: *const CPool, owner: u64, from: u32) -> c_int;
    fn bd_cpool_put(p: *mut CPool, page: u32) -> c_int;
    fn bd_cpool_app_counters(p: *const CPool) -> u32;
    fn bd_cpool_free_counters(p: *const CPool) -> u32;
    fn bd_spool_init(s: *mut SPool, used: *mut u8, nslots: u32);
    fn bd_spool_alloc(s: *mut SPool, n: u32, first: *mut u32) -> c_int;
    fn bd_spool_free(s: *mut SPool, first: u32, n: u32) -> c_int;
    fn bd_spool_free_count(s: *const SPool) -> u32;
    fn bd_test_app_read_slot(
        slot: *const c_void,
        slot_size: u32,
        hdr: *mut RecHdr,
        payload: *mut c_void,
        cap: u32,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn bd_test_app_slot_write(
        base: *mut c_void,
        count: u32,
        slot_size: u32,
        service: *const c_char,
        i: u32,
        session_id: u64,
        version: u64,
        stage: u32,
        payload: *const c_void,
        len: u32,
    ) -> c_int;
    fn bd_test_app_info(path: *const c_char, info: *mut IocInfo) -> c_int;
}

/// A counter-page pool over owned storage (boxed: the pool points into it).
struct Pool {
    pool: Box<CPool>,
    _pages: Vec<CPage>,
}

impl Pool {
    fn new(npages: u32) -> Self {
        let mut pages = vec![CPage::default(); npages as usize];
        let mut pool = Box::new(CPool {
            pages: std::ptr::null_mut(),
            npages: 0,
            page_size: 0,
            clock: 0,
        });
        // SAFETY: `pages` has npages entries and outlives the pool (both in Self).
        let r = unsafe { bd_cpool_init(&mut *pool, pages.as_mut_ptr(), npages, PAGE) };
        assert_eq!(r, 0);
        Self {
            pool,
            _pages: pages,
        }
    }
    fn p(&self) -> *const CPool {
        &*self.pool
    }
    fn alloc(&mut self, owner: u64) -> Result<(u32, bool), c_int> {
        let (mut slot, mut claimed) = (0u32, 0 as c_int);
        // SAFETY: the pool is initialised; out-pointers are live locals.
        let r = unsafe { bd_cpool_alloc(&mut *self.pool, owner, &mut slot, &mut claimed) };
        if r == 0 {
            Ok((slot, claimed != 0))
        } else {
            Err(r)
        }
    }
    fn page_of(&self, slot: u32) -> c_int {
        // SAFETY: initialised pool.
        unsafe { bd_cpool_slot_page(self.p(), slot) }
    }
    fn owns(&self, owner: u64, slot: u32) -> bool {
        // SAFETY: initialised pool.
        unsafe { bd_cpool_owns_slot(self.p(), owner, slot) != 0 }
    }
    fn put(&mut self, page: u32) -> c_int {
        // SAFETY: initialised pool.
        unsafe { bd_cpool_put(&mut *self.pool, page) }
    }
    fn free_counters(&self) -> u32 {
        // SAFETY: initialised pool.
        unsafe { bd_cpool_free_counters(self.p()) }
    }
    /// What the driver does when a file is released.
    fn release(&mut self, owner: u64) -> Vec<u32> {
        let mut freed = Vec::new();
        // SAFETY: initialised pool.
        let mut page = unsafe { bd_cpool_next_page(self.p(), owner, 1) };
        while let Ok(pg) = u32::try_from(page) {
            assert_eq!(self.put(pg), 0);
            freed.push(pg);
            // SAFETY: initialised pool.
            page = unsafe { bd_cpool_next_page(self.p(), owner, pg + 1) };
        }
        freed
    }
}

struct Slots {
    pool: Box<SPool>,
    _used: Vec<u8>,
}

impl Slots {
    fn new(n: u32) -> Self {
        let mut used = vec![0xffu8; n as usize];
        let mut pool = Box::new(SPool {
            used: std::ptr::null_mut(),
            nslots: 0,
        });
        // SAFETY: `used` has n entries and lives as long as the pool.
        unsafe { bd_spool_init(&mut *pool, used.as_mut_ptr(), n) };
        Self { pool, _used: used }
    }
    fn alloc(&mut self, n: u32) -> Result<u32, c_int> {
        let mut first = 0u32;
        // SAFETY: initialised pool, live out-pointer.
        let r = unsafe { bd_spool_alloc(&mut *self.pool, n, &mut first) };
        if r == 0 {
            Ok(first)
        } else {
            Err(r)
        }
    }
    fn free(&mut self, first: u32, n: u32) -> c_int {
        // SAFETY: initialised pool.
        unsafe { bd_spool_free(&mut *self.pool, first, n) }
    }
    fn free_count(&self) -> u32 {
        // SAFETY: initialised pool.
        unsafe { bd_spool_free_count(&*self.pool) }
    }
}

fn field<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut f = [0u8; N];
    f[..s.len()].copy_from_slice(s);
    f
}

fn name_ok<const N: usize>(f: &[u8; N]) -> c_int {
    // SAFETY: f is N readable bytes.
    unsafe { bd_name_check(f.as_ptr().cast(), u32::try_from(N).unwrap()) }
}

#[test]
fn names_from_user_space_must_be_printable_and_nul_padded() {
    assert_eq!(name_ok(&field::<32>(b"kernel")), 6);
    assert_eq!(name_ok(&[b'a'; 32]), 32, "a full field needs no NUL");
    assert_eq!(name_ok(&field::<16>(b"shop cart ~!")), 12);
    assert_eq!(name_ok(&[0u8; 32]), -1, "empty");
    assert_eq!(name_ok(&field::<32>(b"bad\nname")), -1, "control character");
    assert_eq!(name_ok(&field::<32>(b"caf\xc3\xa9")), -1, "not ASCII");
    let mut hidden = field::<16>(b"shop");
    hidden[10] = b'x';
    assert_eq!(name_ok(&hidden), -1, "bytes hidden after the NUL");
}

#[test]
fn counter_setup_publishes_a_counter_the_monitor_reads() {
    let words: Vec<AtomicU64> = (0..8).map(|_| AtomicU64::new(u64::MAX)).collect();
    let c = words.as_ptr().cast_mut().cast::<c_void>();
    let name = field::<32>(b"session-7");
    // SAFETY: c is 64 writable, 8-aligned bytes; name is a 32-byte field.
    let r = unsafe { bd_counter_setup(c, 64, name.as_ptr().cast(), 2000, 3, 4242) };
    assert_eq!(r, 0);
    let mut b = [0u8; LINE];
    for (chunk, w) in b.chunks_exact_mut(8).zip(&words) {
        chunk.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
    }
    let got = Counter::from_bytes(&b);
    assert_eq!(got.value, 0, "a reused slot starts from zero");
    assert_eq!((got.id, got.deadline_ms, got.owner), (64, 2000, 4242));
    assert_eq!(got.state(), Some(CounterState::Active));
    assert_eq!(got.level(), Some(Level::Session));
    assert_eq!(backdoor_abi::decode_name(&got.name), Some("session-7"));
    assert_eq!((got.reserved0, got.reserved1), (0, 0));

    let bad = field::<32>(b"x\x01");
    for (id, name, deadline, level) in [
        (0, &name, 1000, 2),
        (1, &name, 0, 2),
        (1, &name, 1000, 0),
        (1, &name, 1000, 4),
        (1, &bad, 1000, 2),
    ] {
        words[0].store(77, Ordering::Relaxed);
        // SAFETY: as above.
        let r = unsafe { bd_counter_setup(c, id, name.as_ptr().cast(), deadline, level, 1) };
        assert_eq!(r, -1, "id {id} deadline {deadline} level {level}");
        assert_eq!(words[0].load(Ordering::Relaxed), 77, "refused: untouched");
    }
}

#[test]
fn counter_pages_hold_whole_counters_and_page_zero_is_the_drivers() {
    let p = Pool::new(64);
    // SAFETY: every call below only reads the initialised pool.
    unsafe {
        assert_eq!(bd_cpool_page_first(p.p(), 0), 0);
        assert_eq!(
            bd_cpool_page_counters(p.p(), 0),
            63,
            "the header takes a line"
        );
        assert_eq!(bd_cpool_page_first(p.p(), 1), 63);
        assert_eq!(bd_cpool_page_counters(p.p(), 1), 64);
        assert_eq!(bd_cpool_page_counters(p.p(), 64), 0, "past the box");
        for page in 1..64u32 {
            let first = bd_cpool_page_first(p.p(), page);
            assert_eq!(bd_cpool_slot_offset(first), u64::from(page * PAGE));
            let last = first + bd_cpool_page_counters(p.p(), page) - 1;
            assert_eq!(
                bd_cpool_slot_offset(last) + LINE as u64,
                u64::from((page + 1) * PAGE),
                "page {page} ends with a whole counter"
            );
            assert_eq!(bd_cpool_slot_page(p.p(), first), page as c_int);
            assert_eq!(bd_cpool_slot_page(p.p(), last), page as c_int);
        }
        assert_eq!(bd_cpool_slot_page(p.p(), 62), 0);
        assert_eq!(bd_cpool_slot_page(p.p(), 64 * 64 - 1), -1);
        assert_eq!(bd_cpool_app_counters(p.p()), 63 * 64);
        assert_eq!(bd_cpool_free_counters(p.p()), 63 * 64);
        assert_eq!(
            bd_cpool_owns_page(p.p(), DRIVER, 0),
            0,
            "page 0 is never mappable"
        );
    }
    let mut bad = Pool::new(2);
    assert_eq!(bad.alloc(0), Err(EINVAL), "owner 0 means free");
    assert_eq!(bad.alloc(DRIVER), Err(EINVAL));
    assert_eq!(bad.put(0), EINVAL, "page 0 is never handed out");
    assert_eq!(bad.put(1), EINVAL, "not held");
    let mut pages = [CPage::default(); 4];
    let mut pool = CPool {
        pages: std::ptr::null_mut(),
        npages: 0,
        page_size: 0,
        clock: 0,
    };
    for (n, size) in [(1u32, PAGE), (4, 64), (4, 100)] {
        // SAFETY: pages has 4 entries, n <= 4.
        let r = unsafe { bd_cpool_init(&mut pool, pages.as_mut_ptr(), n, size) };
        assert_eq!(r, EINVAL, "{n} pages of {size} bytes");
    }
}

#[test]
fn each_file_gets_whole_pages_and_its_counters_stay_on_them() {
    let mut p = Pool::new(4);
    let (a, b) = (1u64, 2u64);
    let (first, claimed) = p.alloc(a).unwrap();
    assert_eq!(
        (first, claimed),
        (63, true),
        "a's first counter claims page 1"
    );
    let (s, claimed) = p.alloc(b).unwrap();
    assert_eq!((s, claimed), (127, true), "b gets a page of its own");
    let mut a_slots = vec![first];
    for _ in 0..63 {
        let (s, claimed) = p.alloc(a).unwrap();
        assert!(!claimed);
        a_slots.push(s);
    }
    assert_eq!(
        a_slots,
        (63..127).collect::<Vec<_>>(),
        "a fills its page in order"
    );
    let (s, claimed) = p.alloc(a).unwrap();
    assert_eq!(
        (s, claimed),
        (191, true),
        "the 65th counter claims another page"
    );
    assert_eq!(p.alloc(3), Err(EFULL), "no page left for a third file");
    assert_eq!(
        p.free_counters(),
        63 + 63,
        "what a and b may still allocate"
    );

    for &s in &a_slots {
        assert!(p.owns(a, s) && !p.owns(b, s), "slot {s}");
    }
    assert!(
        p.owns(b, 127) && !p.owns(b, 128),
        "handed out, not merely on b's page"
    );
    assert!(!p.owns(a, 0), "the driver's counter");

    assert_eq!(p.release(a), vec![1, 3]);
    assert_eq!(p.release(a), Vec::<u32>::new(), "released once");
    assert!(!p.owns(a, 63));
    // Page 1 was released before page 3: it is reused first.
    let (s, claimed) = p.alloc(4).unwrap();
    assert_eq!((s, claimed), (63, true));
    let (s, _) = p.alloc(5).unwrap();
    assert_eq!(s, 191);
}

#[test]
fn a_page_never_used_goes_before_a_recently_retired_one() {
    let mut p = Pool::new(4);
    p.alloc(1).unwrap();
    assert_eq!(p.release(1), vec![1]);
    // Pages 2 and 3 were never used: a monitor that just saw page 1's
    // counters retire does not see the slots reused yet.
    assert_eq!(p.alloc(2).unwrap().0, 127);
    assert_eq!(p.alloc(3).unwrap().0, 191);
    assert_eq!(p.alloc(4).unwrap().0, 63);
}

/// The driver's progress box, simulated: what a file can map (its pages)
/// holds exactly its counters, and the monitor's parser sees every one.
#[test]
fn a_driver_laid_out_box_reads_back_as_the_monitor_parses_it() {
    const NPAGES: u32 = 4;
    let words: Vec<AtomicU64> = (0..(NPAGES * PAGE / 8))
        .map(|_| AtomicU64::new(0))
        .collect();
    let mem = words.as_ptr().cast_mut().cast::<c_void>();
    // SAFETY: mem is NPAGES pages of 8-aligned memory.
    let cap = unsafe { bd_pbox_init(mem, u64::from(NPAGES * PAGE)) };
    assert_eq!(cap, (NPAGES * PAGE / 64 - 1) as c_int);
    let mut p = Pool::new(NPAGES);
    let kernel = field::<32>(b"kernel");
    // SAFETY: slot 0 is inside the box.
    unsafe {
        let c = mem.cast::<u8>().add(64).cast();
        assert_eq!(
            bd_counter_setup(c, 1, kernel.as_ptr().cast(), 1000, 1, 0),
            0
        );
    }
    let mut mine = Vec::new();
    for (owner, n) in [(10u64, 3u32), (11, 70)] {
        for k in 0..n {
            let (slot, _) = p.alloc(owner).unwrap();
            let name = field::<32>(format!("o{owner}-{k}").as_bytes());
            // SAFETY: the pool only hands out slots inside the box.
            let r = unsafe {
                let c = mem
                    .cast::<u8>()
                    .add(usize::try_from(bd_cpool_slot_offset(slot)).unwrap())
                    .cast();
                let owner = u32::try_from(owner).unwrap();
                bd_counter_setup(c, slot + 1, name.as_ptr().cast(), 500, 2, owner)
            };
            assert_eq!(r, 0);
            mine.push((owner, slot));
        }
    }
    let line = |off: usize| -> [u8; LINE] {
        let mut b = [0u8; LINE];
        for (chunk, w) in b.chunks_exact_mut(8).zip(&words[off / 8..]) {
            chunk.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        b
    };
    assert_eq!(
        u32::from_le_bytes(line(0)[0..4].try_into().unwrap()),
        PBOX_MAGIC
    );
    // As monitor/src/poll.rs: every line after the header, FREE skipped.
    let seen: Vec<Counter> = (0..usize::try_from(cap).unwrap())
        .map(|i| Counter::from_bytes(&line(LINE + i * LINE)))
        .filter(|c| c.id != 0 && c.state() != Some(CounterState::Free))
        .collect();
    assert_eq!(seen.len(), 1 + 3 + 70);
    assert_eq!(seen[0].level(), Some(Level::Os));
    for c in &seen[1..] {
        let slot = c.id - 1;
        let owner = u64::from(c.owner);
        assert!(
            mine.contains(&(owner, slot)),
            "counter {} is someone's",
            c.id
        );
        // The pages a file may map contain only its own counters.
        let page = u32::try_from(p.page_of(slot)).unwrap();
        assert!(page > 0);
        // SAFETY: initialised pool.
        let owns = unsafe { bd_cpool_owns_page(p.p(), owner, page) };
        assert_eq!(owns, 1);
    }
}

#[test]
fn service_areas_take_the_tightest_run_and_give_it_back_whole() {
    let mut s = Slots::new(16);
    assert_eq!(s.free_count(), 16, "init clears the map");
    assert_eq!(s.alloc(0), Err(EINVAL));
    assert_eq!(s.alloc(17), Err(EFULL));
    assert_eq!(s.alloc(4), Ok(0));
    assert_eq!(s.alloc(2), Ok(4));
    assert_eq!(s.alloc(4), Ok(6));
    assert_eq!(s.free(4, 2), 0);
    // Free runs: [4,6) of 2 and [10,16) of 6; 2 slots go in the hole.
    assert_eq!(s.alloc(2), Ok(4));
    assert_eq!(s.alloc(7), Err(EFULL), "6 free, but not 7 in a row");
    assert_eq!(s.free(10, 1), EINVAL, "not in use: nothing freed");
    assert_eq!(s.free(15, 2), EINVAL, "past the end");
    assert_eq!(s.free(u32::MAX, 2), EINVAL, "no overflow");
    assert_eq!(s.free_count(), 6);
    assert_eq!(s.free(0, 4), 0);
    assert_eq!(s.free(0, 4), EINVAL, "freed twice");
    assert_eq!(s.free_count(), 10);
}

proptest! {
    /// Any sequence of creates and deletes: areas never overlap, the free
    /// count is exact, and a request fails only if no free run fits.
    #[test]
    fn service_areas_never_overlap(ops in proptest::collection::vec((any::<bool>(), 1u32..9, any::<u8>()), 1..200)) {
        let mut s = Slots::new(32);
        let mut areas: Vec<(u32, u32)> = Vec::new();
        for (create, n, pick) in ops {
            if create || areas.is_empty() {
                let mut used = [false; 32];
                for &(f, c) in &areas {
                    for i in f..f + c { used[i as usize] = true; }
                }
                let fits = used.windows(n as usize).any(|w| w.iter().all(|u| !u));
                match s.alloc(n) {
                    Ok(f) => {
                        prop_assert!(fits);
                        prop_assert!(f + n <= 32);
                        for i in f..f + n { prop_assert!(!used[i as usize], "slot {} given twice", i); }
                        areas.push((f, n));
                    }
                    Err(e) => { prop_assert_eq!(e, EFULL); prop_assert!(!fits); }
                }
            } else {
                let (f, c) = areas.remove(pick as usize % areas.len());
                prop_assert_eq!(s.free(f, c), 0);
            }
            let used: u32 = areas.iter().map(|a| a.1).sum();
            prop_assert_eq!(s.free_count(), 32 - used);
        }
    }
}

// ---- backdoor_app.h ---------------------------------------------------------

fn slot_words(bytes: &[u8]) -> Vec<AtomicU64> {
    bytes
        .chunks_exact(8)
        .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap())))
        .collect()
}

fn c_read(words: &[AtomicU64], cap: u32) -> (c_int, RecHdr, Vec<u8>) {
    let mut hdr = RecHdr([0; 64]);
    let mut payload = vec![0u8; cap as usize];
    // SAFETY: words is a live, 8-aligned slot; hdr and payload are writable.
    let r = unsafe {
        bd_test_app_read_slot(
            words.as_ptr().cast(),
            u32::try_from(words.len() * 8).unwrap(),
            &mut hdr,
            payload.as_mut_ptr().cast(),
            cap,
        )
    };
    (r, hdr, payload)
}

#[test]
fn the_app_reader_reads_what_the_rust_writer_wrote_and_rejects_the_rest() {
    const SLOT: usize = 4096;
    let rec = encode("shop", 42, 9, 3, b"items=3 total=126", SLOT).unwrap();
    let w = slot_words(&rec);
    let (r, hdr, payload) = c_read(&w, 4032);
    assert_eq!(r, 0, "BD_APP_RECORD");
    assert_eq!(u64::from_le_bytes(hdr.0[8..16].try_into().unwrap()), 42);
    assert_eq!(&hdr.0[16..21], b"shop\0");
    assert_eq!(u64::from_le_bytes(hdr.0[32..40].try_into().unwrap()), 9);
    assert_eq!(u32::from_le_bytes(hdr.0[40..44].try_into().unwrap()), 3);
    assert_eq!(&payload[..17], b"items=3 total=126");

    assert_eq!(
        c_read(&w, 16).0,
        -libc::ENOSPC,
        "payload larger than the buffer"
    );
    assert_eq!(c_read(&slot_words(&[0u8; SLOT]), 64).0, 1, "BD_APP_EMPTY");

    let mut torn = rec.clone();
    torn[0] = 3;
    assert_eq!(
        c_read(&slot_words(&torn), 4032).0,
        2,
        "odd seq: BD_APP_TORN"
    );

    let mut bad = rec.clone();
    bad[70] ^= 1;
    assert_eq!(
        c_read(&slot_words(&bad), 4032).0,
        3,
        "bad CRC: BD_APP_CORRUPT"
    );
    let mut long = rec.clone();
    long[44..48].copy_from_slice(&4033u32.to_le_bytes());
    assert_eq!(
        c_read(&slot_words(&long), 4096).0,
        3,
        "payload_len past the slot"
    );

    let mut hdr = RecHdr([0; 64]);
    // SAFETY: the reader rejects the arguments before touching memory.
    let r =
        unsafe { bd_test_app_read_slot(std::ptr::null(), 4096, &mut hdr, std::ptr::null_mut(), 0) };
    assert_eq!(r, -libc::EINVAL);
    // SAFETY: as above (slot size below the minimum).
    let r =
        unsafe { bd_test_app_read_slot(w.as_ptr().cast(), 64, &mut hdr, std::ptr::null_mut(), 0) };
    assert_eq!(r, -libc::EINVAL);
}

#[test]
fn the_app_writer_writes_records_the_rust_reader_accepts() {
    const SLOT: u32 = 4096;
    let area: Vec<AtomicU64> = (0..(2 * SLOT / 8)).map(|_| AtomicU64::new(0)).collect();
    let svc = CString::new("shop").unwrap();
    let write = |i: u32, version: u64, payload: &[u8]| -> c_int {
        // SAFETY: area is 2 slots of live, 8-aligned memory; payload is live.
        unsafe {
            bd_test_app_slot_write(
                area.as_ptr().cast_mut().cast(),
                2,
                SLOT,
                svc.as_ptr(),
                i,
                7,
                version,
                5,
                payload.as_ptr().cast(),
                u32::try_from(payload.len()).unwrap(),
            )
        }
    };
    assert_eq!(write(1, 2, b"total=15"), 0);
    let slot = &area[(SLOT / 8) as usize..];
    match read_slot(&LocalSlot::new(slot), 4) {
        ReadOutcome::Complete { record, .. } => {
            assert_eq!(record.service, "shop");
            assert_eq!((record.session_id, record.version, record.stage), (7, 2, 5));
            assert_eq!(record.payload, b"total=15");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        read_slot(&LocalSlot::new(&area[..(SLOT / 8) as usize]), 4),
        ReadOutcome::Empty
    );
    assert_eq!(write(2, 3, b"x"), -libc::ERANGE, "slot past the area");
    assert_eq!(write(0, 3, &vec![0u8; 4033]), -libc::E2BIG);
    assert_eq!(
        read_slot(&LocalSlot::new(&area[..(SLOT / 8) as usize]), 4),
        ReadOutcome::Empty
    );
}

#[test]
fn without_the_driver_an_application_gets_a_clear_errno() {
    let mut info = IocInfo::default();
    let missing = CString::new("/nonexistent/backdoor").unwrap();
    // SAFETY: a valid path and a writable bd_ioc_info.
    let r = unsafe { bd_test_app_info(missing.as_ptr(), &mut info) };
    assert_eq!(r, -libc::ENOENT);
    let null = CString::new("/dev/null").unwrap();
    // SAFETY: as above.
    let r = unsafe { bd_test_app_info(null.as_ptr(), &mut info) };
    assert_eq!(r, -libc::ENOTTY);
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The documented example compiles warning-free as C11 and fails cleanly
/// where there is no driver (running it for real needs a Linux guest with
/// backdoor.ko loaded).
#[test]
fn the_example_program_compiles_and_explains_a_missing_driver() {
    let root = repo();
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("counter_and_service");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args([
            "-std=c11",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wpedantic",
        ])
        .arg("-I")
        .arg(root.join("guest-driver/include"))
        .arg("-o")
        .arg(&exe)
        .arg(root.join("guest-driver/examples/counter_and_service.c"))
        .arg(root.join("guest-driver/lib/backdoor_guest.c"))
        .output()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(
        out.status.success(),
        "{cc} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "warnings:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (dev, says) in [
        ("/nonexistent/backdoor", "is backdoor.ko loaded?"),
        ("/dev/null", "is not the backdoor driver"),
    ] {
        let run = Command::new(&exe)
            .env("BACKDOOR_DEV", dev)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{dev}: {err}");
        assert!(err.contains(says), "{dev}: {err}");
    }
}
