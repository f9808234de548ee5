//! A host file that stands in for /dev/backdoor: it is laid out like the
//! guest memory the driver registers (a progress box, a state box with a
//! page-sized header and page-sized slots, an inbox), answers the same
//! requests with the same structures, and hands out file offsets to map.
//! Services run on the host with it, and a backdoor agent can serve the
//! same file to `bdctl` exactly as it serves a guest's RAM.
//!
//! Page 0 is this stand-in's own bookkeeping (the driver keeps that in
//! kernel memory): the layout and the service table.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use backdoor_abi::{CounterState, Level, LINE, PAGE_SIZE, PBOX_MAGIC, SBOX_MAGIC};
use nix::fcntl::{Flock, FlockArg};

use crate::mapping::Mapping;
use crate::uapi::{BdIocCounter, BdIocCounterState, BdIocInfo, BdIocSvc, BD_SVC_CREATE};
use crate::Error;

const PAGE: usize = 4096;
const PAGE_U32: u32 = 4096;
const PAGE_U16: u16 = 4096;
const LINE_U16: u16 = 64;
const MAGIC: u64 = u64::from_le_bytes(*b"BDGHOST1");
const VERSION: u32 = 1;
const TABLE: usize = 128;
const ENTRY: usize = 32;
const MAX_SERVICES: usize = 32;

/// Errors of the host-file stand-in.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The file could not be created, opened or sized.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the file.
    #[error("{} is in use by another process (one instance per state file)", path.display())]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a backing file, or its layout is inconsistent.
    #[error("{} is not a usable backdoor state file: {why}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A layout that cannot be built.
    #[error("bad host layout: {0}")]
    Config(String),
}

/// The shape of a new host file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostConfig {
    /// Progress counters.
    pub counters: u32,
    /// State-box slots.
    pub slots: u32,
    /// Bytes per slot: a multiple of the page size, as the driver's.
    pub slot_size: u32,
    /// Inbox record slots (0: no inbox).
    pub inbox_slots: u32,
    /// Bytes per inbox slot (at least 128, a multiple of 8).
    pub inbox_slot_size: u32,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            counters: 127,
            slots: 64,
            slot_size: 4096,
            inbox_slots: 16,
            inbox_slot_size: 4096,
        }
    }
}

/// Where a host file keeps each box (byte ranges of the file), for
/// serving it as guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLayout {
    /// Progress box offset.
    pub pbox_offset: u64,
    /// Progress box bytes.
    pub pbox_len: u64,
    /// State box offset (its header page, then the slots).
    pub sbox_offset: u64,
    /// State box bytes.
    pub sbox_len: u64,
    /// Inbox offset.
    pub inbox_offset: u64,
    /// Inbox bytes (0: none).
    pub inbox_len: u64,
    /// State-box slots.
    pub slot_count: u32,
    /// Bytes per state-box slot.
    pub slot_size: u32,
    /// Bytes per inbox slot.
    pub inbox_slot_size: u32,
    /// Progress counters.
    pub counters: u32,
    /// Total file length.
    pub file_len: u64,
}

impl HostLayout {
    /// Reads the layout of an existing host file without taking its lock:
    /// for observers (a test's stand-in VMM serving the file to monitors)
    /// while a service holds it.
    pub fn read(path: &Path) -> Result<Self, HostError> {
        let corrupt = |why: String| HostError::Corrupt {
            path: path.to_owned(),
            why,
        };
        let io = |source| HostError::Io {
            path: path.to_owned(),
            source,
        };
        let f = File::open(path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        let mut b = [0u8; 88];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0)
            .map_err(|e| corrupt(format!("cannot read its layout: {e}")))?;
        Self::decode(&b, len).map_err(corrupt)
    }

    fn build(c: &HostConfig) -> Result<Self, HostError> {
        let page = PAGE_SIZE;
        if c.counters == 0 || c.slots == 0 {
            return Err(HostError::Config(
                "counters and slots must be positive".into(),
            ));
        }
        if c.slot_size == 0 || u64::from(c.slot_size) % page != 0 {
            return Err(HostError::Config(format!(
                "slot size {} is not a multiple of the page size",
                c.slot_size
            )));
        }
        if c.inbox_slots > 0 && (c.inbox_slot_size < 128 || c.inbox_slot_size % 8 != 0) {
            return Err(HostError::Config(format!(
                "inbox slot size {} must be at least 128 and a multiple of 8",
                c.inbox_slot_size
            )));
        }
        let pages = |bytes: u64| bytes.div_ceil(page) * page;
        let pbox_len = pages((u64::from(c.counters) + 1) * LINE as u64);
        let sbox_len = page + u64::from(c.slots) * u64::from(c.slot_size);
        let inbox_len = if c.inbox_slots == 0 {
            0
        } else {
            pages(LINE as u64 + u64::from(c.inbox_slots) * u64::from(c.inbox_slot_size))
        };
        if u32::try_from(inbox_len).is_err() || sbox_len > 1 << 30 {
            return Err(HostError::Config("the boxes are too large".into()));
        }
        let pbox_offset = page;
        let sbox_offset = pbox_offset + pbox_len;
        let inbox_offset = sbox_offset + sbox_len;
        Ok(Self {
            pbox_offset,
            pbox_len,
            sbox_offset,
            sbox_len,
            inbox_offset,
            inbox_len,
            slot_count: c.slots,
            slot_size: c.slot_size,
            inbox_slot_size: c.inbox_slot_size,
            counters: c.counters,
            file_len: inbox_offset + inbox_len,
        })
    }

    fn encode(&self) -> [u8; 88] {
        let mut b = [0u8; 88];
        b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&PAGE_U32.to_le_bytes());
        for (i, v) in [
            self.pbox_offset,
            self.pbox_len,
            self.sbox_offset,
            self.sbox_len,
            self.inbox_offset,
            self.inbox_len,
        ]
        .iter()
        .enumerate()
        {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        for (i, v) in [
            self.slot_size,
            self.slot_count,
            self.inbox_slot_size,
            1, // generation
            self.counters,
        ]
        .iter()
        .enumerate()
        {
            b[64 + 4 * i..68 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8; 88], file_len: u64) -> Result<Self, String> {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        if u64_at(0) != MAGIC {
            return Err("no BDGHOST1 magic".into());
        }
        if u32_at(8) != VERSION || u32_at(12) != PAGE_U32 {
            return Err(format!(
                "layout version {} / page {} not supported",
                u32_at(8),
                u32_at(12)
            ));
        }
        let counters = u32_at(80);
        let config = HostConfig {
            counters,
            slots: u32_at(68),
            slot_size: u32_at(64),
            inbox_slots: 0,
            inbox_slot_size: u32_at(72),
        };
        let inbox_len = u64_at(56);
        let inbox_slots = if inbox_len == 0 {
            0
        } else {
            u32::try_from(
                inbox_len.saturating_sub(LINE as u64) / u64::from(config.inbox_slot_size.max(1)),
            )
            .map_err(|_| "inbox too large".to_owned())?
        };
        let expect = Self::build(&HostConfig {
            inbox_slots,
            ..config
        })
        .map_err(|e| e.to_string())?;
        let got = Self {
            pbox_offset: u64_at(16),
            pbox_len: u64_at(24),
            sbox_offset: u64_at(32),
            sbox_len: u64_at(40),
            inbox_offset: u64_at(48),
            inbox_len,
            file_len,
            ..expect
        };
        if got != (Self { file_len, ..expect }) {
            return Err("the recorded layout is inconsistent".into());
        }
        if expect.file_len > file_len {
            return Err(format!(
                "{file_len} bytes, the layout needs {}",
                expect.file_len
            ));
        }
        Ok(got)
    }
}

/// A host file playing the driver's part.
#[derive(Debug)]
pub(crate) struct HostFile {
    file: Flock<File>,
    path: PathBuf,
    layout: HostLayout,
    map: Mapping,
    held: Mutex<Option<String>>,
}

fn off(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl HostFile {
    pub(crate) fn open(path: &Path, config: &HostConfig) -> Result<Self, Error> {
        let io = |source| HostError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let file =
            Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| HostError::Locked {
                path: path.to_owned(),
            })?;
        let len = file.metadata().map_err(io)?.len();
        let corrupt = |why: String| HostError::Corrupt {
            path: path.to_owned(),
            why,
        };
        let fresh = len == 0;
        let layout = if fresh {
            let l = HostLayout::build(config)?;
            file.set_len(l.file_len).map_err(io)?;
            l
        } else {
            if len < PAGE as u64 {
                return Err(corrupt(format!("only {len} bytes")).into());
            }
            let head = Mapping::map(file.as_fd(), 0, PAGE, false).map_err(|errno| Error::Map {
                what: "the state file",
                errno,
            })?;
            let mut b = [0u8; 88];
            head.read_bytes(0, &mut b);
            HostLayout::decode(&b, len).map_err(corrupt)?
        };
        let map = Mapping::map(file.as_fd(), 0, off(layout.file_len), true).map_err(|errno| {
            Error::Map {
                what: "the state file",
                errno,
            }
        })?;
        let host = Self {
            file,
            path: path.to_owned(),
            layout,
            map,
            held: Mutex::new(None),
        };
        if fresh {
            host.format();
        } else {
            host.check_boxes().map_err(corrupt)?;
            host.retire_orphans();
        }
        Ok(host)
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn layout(&self) -> HostLayout {
        self.layout
    }

    /// Writes page 0 and the two box headers of a new file.
    fn format(&self) {
        let l = &self.layout;
        self.map.write_bytes(0, &l.encode());
        let mut h = [0u8; LINE];
        h[0..4].copy_from_slice(&PBOX_MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&1u16.to_le_bytes());
        h[6..8].copy_from_slice(&LINE_U16.to_le_bytes());
        h[8..12].copy_from_slice(&l.counters.to_le_bytes());
        h[12..16].copy_from_slice(&backdoor_abi::LINE_LEN.to_le_bytes());
        self.map.write_bytes(off(l.pbox_offset), &h);
        let mut h = [0u8; LINE];
        h[0..4].copy_from_slice(&SBOX_MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&1u16.to_le_bytes());
        // The driver pads the header to a page so slots are page-aligned.
        h[6..8].copy_from_slice(&PAGE_U16.to_le_bytes());
        h[8..12].copy_from_slice(&l.slot_count.to_le_bytes());
        h[12..16].copy_from_slice(&l.slot_size.to_le_bytes());
        self.map.write_bytes(off(l.sbox_offset), &h);
    }

    fn check_boxes(&self) -> Result<(), String> {
        let l = &self.layout;
        let mut h = [0u8; LINE];
        self.map.read_bytes(off(l.pbox_offset), &mut h);
        let u32_at =
            |h: &[u8; LINE], o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4"));
        if u32_at(&h, 0) != PBOX_MAGIC || u32_at(&h, 8) != l.counters {
            return Err("the progress box header is damaged".into());
        }
        self.map.read_bytes(off(l.sbox_offset), &mut h);
        if u32_at(&h, 0) != SBOX_MAGIC
            || u32_at(&h, 8) != l.slot_count
            || u32_at(&h, 12) != l.slot_size
        {
            return Err("the state box header is damaged".into());
        }
        let mut end_prev = 0u32;
        let mut areas: Vec<(u32, u32)> = self.entries().map(|(_, _, f, c)| (f, c)).collect();
        areas.sort_unstable();
        for (first, count) in areas {
            if first < end_prev || first.checked_add(count).is_none_or(|e| e > l.slot_count) {
                return Err("the service table is damaged".into());
            }
            end_prev = first + count;
        }
        Ok(())
    }

    /// Counters a previous holder left ACTIVE or IDLE: it has exited (we
    /// hold the lock), so retire them, as the driver does on release.
    fn retire_orphans(&self) {
        for i in 0..self.layout.counters {
            let w = self.counter_word(i, 2);
            let v = w.load(Ordering::Relaxed);
            let state = v & 0xff;
            if state == CounterState::Active as u64 || state == CounterState::Idle as u64 {
                w.store(
                    (v & !0xff) | CounterState::Retired as u64,
                    Ordering::Release,
                );
            }
        }
    }

    /// Word `w` (0..8) of counter `i`.
    fn counter_word(&self, i: u32, w: usize) -> &std::sync::atomic::AtomicU64 {
        let at = off(self.layout.pbox_offset) + LINE * (1 + i as usize) + 8 * w;
        self.map.word(at).expect("counter inside the progress box")
    }

    fn counter_index(&self, id: u32) -> Result<u32, Error> {
        let unknown = || Error::Invalid(format!("counter {id} is not allocated"));
        if id == 0 || id > self.layout.counters {
            return Err(unknown());
        }
        let state = self.counter_word(id - 1, 2).load(Ordering::Relaxed) & 0xff;
        if state == CounterState::Active as u64 || state == CounterState::Idle as u64 {
            Ok(id - 1)
        } else {
            Err(unknown())
        }
    }

    fn free_counters(&self) -> u32 {
        let n = (0..self.layout.counters)
            .filter(|&i| {
                let s = self.counter_word(i, 2).load(Ordering::Relaxed) & 0xff;
                s == CounterState::Free as u64 || s == CounterState::Retired as u64
            })
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The service table: (index, name bytes, first slot, slot count).
    fn entries(&self) -> impl Iterator<Item = (usize, [u8; 16], u32, u32)> + '_ {
        (0..MAX_SERVICES).filter_map(|k| {
            let mut e = [0u8; ENTRY];
            self.map.read_bytes(TABLE + k * ENTRY, &mut e);
            let mut name = [0u8; 16];
            name.copy_from_slice(&e[..16]);
            let first = u32::from_le_bytes(e[16..20].try_into().expect("4"));
            let count = u32::from_le_bytes(e[20..24].try_into().expect("4"));
            (name[0] != 0).then_some((k, name, first, count))
        })
    }

    pub(crate) fn info(&self) -> BdIocInfo {
        let l = &self.layout;
        let used: u32 = self.entries().map(|(_, _, _, c)| c).sum();
        BdIocInfo {
            abi_version: backdoor_abi::ABI_VERSION,
            generation: 1,
            sealed: 0,
            counters_total: l.counters,
            counters_free: self.free_counters(),
            slots_total: l.slot_count,
            slots_free: l.slot_count.saturating_sub(used),
            slot_size: l.slot_size,
            os_counter_id: 0,
            inbox_len: u32::try_from(l.inbox_len).unwrap_or(0),
            inbox_mmap_offset: l.inbox_offset,
            inbox_slot_size: l.inbox_slot_size,
            reserved: [0; 3],
        }
    }

    pub(crate) fn counter_alloc(&self, req: &mut BdIocCounter) -> Result<(), Error> {
        // The checks the driver makes.
        if backdoor_abi::decode_name(&req.name).is_none() {
            return Err(Error::Invalid("counter name".into()));
        }
        if req.deadline_ms == 0 {
            return Err(Error::Invalid(
                "a counter's deadline must be positive".into(),
            ));
        }
        if req.level != Level::Application as u8 && req.level != Level::Session as u8 {
            return Err(Error::Invalid(format!(
                "level {} (applications get APPLICATION or SESSION counters)",
                req.level
            )));
        }
        let _held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let i = (0..self.layout.counters)
            .find(|&i| {
                let s = self.counter_word(i, 2).load(Ordering::Relaxed) & 0xff;
                s == CounterState::Free as u64 || s == CounterState::Retired as u64
            })
            .ok_or_else(|| Error::NoSpace("no free progress counter".into()))?;
        let id = i + 1;
        let owner = if req.owner == 0 {
            std::process::id()
        } else {
            req.owner
        };
        // Everything but the state first, the state last (release), so a
        // monitor never sees an ACTIVE counter with a stale name or deadline.
        self.counter_word(i, 1).store(
            u64::from(id) | u64::from(req.deadline_ms) << 32,
            Ordering::Relaxed,
        );
        for (w, chunk) in req.name.chunks_exact(8).enumerate() {
            self.counter_word(i, 3 + w).store(
                u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
        self.counter_word(i, 7).store(0, Ordering::Relaxed);
        self.counter_word(i, 2).store(
            CounterState::Active as u64 | u64::from(req.level) << 8 | u64::from(owner) << 32,
            Ordering::Release,
        );
        let at = self.layout.pbox_offset + (LINE as u64) * (1 + u64::from(i));
        req.id = id;
        req.mmap_offset = at / PAGE_SIZE * PAGE_SIZE;
        req.offset_in_map = u32::try_from(at % PAGE_SIZE).unwrap_or(0);
        Ok(())
    }

    fn set_state(&self, id: u32, state: CounterState) -> Result<(), Error> {
        let i = self.counter_index(id)?;
        let w = self.counter_word(i, 2);
        let v = w.load(Ordering::Relaxed);
        w.store((v & !0xff) | state as u64, Ordering::Release);
        Ok(())
    }

    pub(crate) fn counter_state(&self, req: BdIocCounterState) -> Result<(), Error> {
        let state = match req.state {
            s if s == CounterState::Active as u32 => CounterState::Active,
            s if s == CounterState::Idle as u32 => CounterState::Idle,
            s => return Err(Error::Invalid(format!("counter state {s}"))),
        };
        self.set_state(req.id, state)
    }

    pub(crate) fn counter_free(&self, id: u32) -> Result<(), Error> {
        self.set_state(id, CounterState::Retired)
    }

    fn slot_offset(&self, slot: u32) -> u64 {
        self.layout.sbox_offset + PAGE_SIZE + u64::from(slot) * u64::from(self.layout.slot_size)
    }

    /// Empties slots `[first, first + count)`: seq 0 first, so a reader
    /// never takes the old bytes for a record.
    fn wipe(&self, first: u32, count: u32) {
        let size = self.layout.slot_size as usize;
        for s in first..first.saturating_add(count) {
            if let Some(words) = self.map.words(off(self.slot_offset(s)), size) {
                words[0].store(0, Ordering::Release);
                for w in &words[1..] {
                    w.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    pub(crate) fn svc_open(&self, name: &str, req: &mut BdIocSvc) -> Result<(), Error> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.as_deref() {
            return Err(if h == name {
                Error::Busy(name.to_owned())
            } else {
                Error::Invalid(format!("this file already holds service {h:?}"))
            });
        }
        let found = self.entries().find(|(_, n, _, _)| *n == req.service);
        let (first, count, created) = match found {
            Some((_, _, first, count)) => (first, count, false),
            None if req.flags & BD_SVC_CREATE == 0 => return Err(Error::NoService(name.into())),
            None if req.slots == 0 => {
                return Err(Error::Invalid("a new area needs at least one slot".into()))
            }
            None => {
                let mut areas: Vec<(u32, u32)> =
                    self.entries().map(|(_, _, f, c)| (f, c)).collect();
                areas.sort_unstable();
                let mut start = 0u32;
                for (f, c) in areas {
                    if f.saturating_sub(start) >= req.slots {
                        break;
                    }
                    start = f + c;
                }
                if self.layout.slot_count - start.min(self.layout.slot_count) < req.slots {
                    return Err(Error::NoSpace(format!(
                        "no {} free state-box slots in a row",
                        req.slots
                    )));
                }
                let k = (0..MAX_SERVICES)
                    .find(|&k| {
                        let mut e = [0u8; 8];
                        self.map.read_bytes(TABLE + k * ENTRY, &mut e);
                        e[0] == 0
                    })
                    .ok_or_else(|| Error::NoSpace("the service table is full".into()))?;
                self.wipe(start, req.slots);
                let mut e = [0u8; ENTRY];
                e[..16].copy_from_slice(&req.service);
                e[16..20].copy_from_slice(&start.to_le_bytes());
                e[20..24].copy_from_slice(&req.slots.to_le_bytes());
                self.map.write_bytes(TABLE + k * ENTRY, &e);
                (start, req.slots, true)
            }
        };
        *held = Some(name.to_owned());
        req.slot_count = count;
        req.slot_size = self.layout.slot_size;
        req.first_slot = first;
        req.created = u32::from(created);
        req.mmap_offset = self.slot_offset(first);
        Ok(())
    }

    pub(crate) fn svc_delete(&self, name: &str) -> Result<(), Error> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.as_deref() != Some(name) {
            return Err(Error::Invalid(format!("service {name:?} is not held")));
        }
        let want = backdoor_abi::encode_name::<16>(name);
        if let Some((k, _, first, count)) = self.entries().find(|(_, n, _, _)| *n == want) {
            self.wipe(first, count);
            self.map.write_bytes(TABLE + k * ENTRY, &[0u8; ENTRY]);
        }
        *held = None;
        Ok(())
    }

    pub(crate) fn svc_release(&self, name: &str) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.as_deref() == Some(name) {
            *held = None;
        }
    }
}
