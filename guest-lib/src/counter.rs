//! Progress counters: the driver gives the counter a slot in the progress
//! box and its page to map, so a bump is a store into the box, with no
//! syscall and no VM exit. State changes (ACTIVE/IDLE) and retiring go
//! through the driver, which owns the box's metadata.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use backdoor_abi::{CounterState, Level, LINE};

use crate::device::{Backing, Device};
use crate::error::encode_checked;
use crate::mapping::Mapping;
use crate::uapi::{BdIocCounter, BD_NAME_LEN};
use crate::Error;

/// The driver maps counters a page at a time.
const PAGE: usize = 4096;

/// A progress counter this process owns; retired when dropped.
///
/// Bump it from one thread at a time: a bump is a plain load and store
/// (no locked instruction), so two threads bumping at once could lose a
/// bump. Give each thread its own counter, or share one behind a mutex.
#[derive(Debug)]
pub struct Counter {
    backing: Arc<Backing>,
    map: Mapping,
    offset: usize,
    id: u32,
    idle: AtomicBool,
}

impl Counter {
    /// Allocates an ACTIVE counter: `name` (1 to 32 printable ASCII
    /// characters), bumped at least every `deadline_ms` while active, at
    /// `level` (APPLICATION or SESSION; the OS counter is the driver's).
    pub fn alloc(dev: &Device, name: &str, deadline_ms: u32, level: Level) -> Result<Self, Error> {
        Self::alloc_owned(dev, name, deadline_ms, level, 0)
    }

    /// As [`Counter::alloc`], with an explicit owner id (0: this process).
    pub fn alloc_owned(
        dev: &Device,
        name: &str,
        deadline_ms: u32,
        level: Level,
        owner: u32,
    ) -> Result<Self, Error> {
        let name = encode_checked::<BD_NAME_LEN>("counter name", name)?;
        if deadline_ms == 0 {
            return Err(Error::Invalid(
                "a counter's deadline must be positive".into(),
            ));
        }
        if level == Level::Os {
            return Err(Error::Invalid(
                "the OS-level counter is the driver's; applications use APPLICATION or SESSION"
                    .into(),
            ));
        }
        let mut req = BdIocCounter {
            name,
            deadline_ms,
            level: level as u8,
            reserved0: [0; 3],
            owner,
            id: 0,
            mmap_offset: 0,
            offset_in_map: 0,
            reserved1: 0,
        };
        let backing = dev.backing.clone();
        backing.counter_alloc(&mut req)?;
        let offset = req.offset_in_map as usize;
        if offset % LINE != 0 || offset + LINE > PAGE {
            let _ = backing.counter_free(req.id);
            return Err(Error::Driver(format!(
                "counter {} at offset {offset} of its page",
                req.id
            )));
        }
        let map = match backing.map("a counter page", req.mmap_offset, PAGE, true) {
            Ok(m) => m,
            Err(e) => {
                let _ = backing.counter_free(req.id);
                return Err(e);
            }
        };
        Ok(Self {
            backing,
            map,
            offset,
            id: req.id,
            idle: AtomicBool::new(false),
        })
    }

    fn value_word(&self) -> &AtomicU64 {
        self.map.word(self.offset).expect("checked at allocation")
    }

    /// The id monitors see.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// One bump: a relaxed 8-byte store of value + 1 (the owner is the
    /// only writer, so no read-modify-write instruction is needed).
    #[inline]
    pub fn bump(&self) {
        let w = self.value_word();
        w.store(w.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    /// The current value.
    pub fn value(&self) -> u64 {
        self.value_word().load(Ordering::Relaxed)
    }

    /// No work for now: monitors never call an IDLE counter hung.
    pub fn idle(&self) -> Result<(), Error> {
        self.set(CounterState::Idle)
    }

    /// Work again: the deadline applies.
    pub fn active(&self) -> Result<(), Error> {
        self.set(CounterState::Active)
    }

    /// Whether the counter is IDLE (as this process last set it).
    pub fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Relaxed)
    }

    fn set(&self, state: CounterState) -> Result<(), Error> {
        let idle = state == CounterState::Idle;
        if self.idle.load(Ordering::Relaxed) == idle {
            return Ok(());
        }
        // Bump before going idle, and on waking, so the last value seen
        // while ACTIVE is never stale.
        self.bump();
        self.backing.counter_state(self.id, state as u32)?;
        self.idle.store(idle, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        // The driver retires it anyway when the file closes.
        let _ = self.backing.counter_free(self.id);
    }
}
