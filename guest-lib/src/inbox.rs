//! The inbox: a REPAIR hook a repair monitor fills with `bdctl resume`
//! (it claims the fence word at offset 16 with its fencing token, writes
//! the source name at 24 and records in slots from offset 64, then the
//! doorbell at offset 8, last). Mapped read-only: the application only
//! adopts what was delivered, and refuses a hand-over older than one it
//! took from the same source ([`FenceBook`]).

use std::sync::atomic::Ordering;

use backdoor_abi::record::{read_slot, LocalSlot, ReadOutcome};
use backdoor_abi::LINE;

use crate::device::Device;
use crate::service::{scan_outcomes, Scan, READ_RETRIES};
use crate::Error;

/// Offset of the doorbell: records delivered so far.
pub const DOORBELL_OFFSET: usize = backdoor_abi::inbox::DOORBELL;
/// Offset of the first record slot.
pub const RECORDS_OFFSET: usize = backdoor_abi::inbox::RECORDS;

/// Who delivered the inbox's hand-over, and under which fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// The claim's fencing token (0: unclaimed, an inbox filled by a
    /// monitor older than the fence).
    pub token: u64,
    /// The source (the hung target's name).
    pub source: String,
}

/// The newest fencing token taken from each source, so that a monitor
/// that lost its incident and delivers late is refused.
#[derive(Debug, Default, Clone)]
pub struct FenceBook {
    newest: std::collections::BTreeMap<String, u64>,
}

impl FenceBook {
    /// Whether to take `h`; a hand-over taken is booked.
    pub fn admit(&mut self, h: &Handover) -> backdoor_abi::inbox::Admit {
        let verdict = backdoor_abi::inbox::admit(h.token, self.newest.get(&h.source).copied());
        if verdict == backdoor_abi::inbox::Admit::Take {
            self.newest.insert(h.source.clone(), h.token);
        }
        verdict
    }
}

/// The driver's inbox, mapped read-only.
#[derive(Debug)]
pub struct Inbox {
    map: crate::mapping::Mapping,
    slot_size: u32,
    capacity: u32,
}

impl Inbox {
    /// Maps the inbox; `None` if the driver has none.
    pub fn map(dev: &Device) -> Result<Option<Self>, Error> {
        let info = dev.info()?;
        if info.inbox_len == 0 {
            return Ok(None);
        }
        let size = info.inbox_slot_size;
        let len = info.inbox_len as usize;
        if size < 128 || size % 8 != 0 || len < RECORDS_OFFSET + size as usize {
            return Err(Error::Driver(format!(
                "inbox of {len} bytes with {size}-byte slots"
            )));
        }
        let map = dev
            .backing
            .map("the inbox", info.inbox_mmap_offset, len, false)?;
        let capacity = u32::try_from((len - RECORDS_OFFSET) / size as usize).unwrap_or(u32::MAX);
        Ok(Some(Self {
            map,
            slot_size: size,
            capacity,
        }))
    }

    /// Records the monitor says it delivered (acquire: the records were
    /// written before the doorbell).
    pub fn delivered(&self) -> u64 {
        self.map
            .word(DOORBELL_OFFSET)
            .map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// The hand-over's source and token, once the doorbell rang.
    pub fn handover(&self) -> Option<Handover> {
        if self.delivered() == 0 {
            return None;
        }
        let token = self
            .map
            .word(backdoor_abi::inbox::FENCE)
            .map_or(0, |w| w.load(Ordering::Acquire));
        let mut raw = Vec::with_capacity(backdoor_abi::inbox::SOURCE_LEN);
        for k in 0..backdoor_abi::inbox::SOURCE_LEN / 8 {
            let w = self
                .map
                .word(backdoor_abi::inbox::SOURCE + 8 * k)
                .map_or(0, |w| w.load(Ordering::Acquire));
            raw.extend_from_slice(&w.to_le_bytes());
        }
        Some(Handover {
            token,
            source: backdoor_abi::inbox::decode_source(&raw),
        })
    }

    /// Record slots.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Bytes per record slot (what `bdctl resume --slot-size` must say).
    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    /// Reads delivered slot `k`.
    pub fn read(&self, k: u32) -> ReadOutcome {
        let size = self.slot_size as usize;
        match self.map.words(RECORDS_OFFSET + k as usize * size, size) {
            Some(words) if k < self.capacity => read_slot(&LocalSlot::new(words), READ_RETRIES),
            _ => ReadOutcome::Empty,
        }
    }

    /// The delivered records of `service` (the newest per session), and
    /// the delivered slots that could not be used. A doorbell beyond the
    /// capacity is clamped: the rest was never stored.
    pub fn scan(&self, service: &str) -> Scan {
        let n = u32::try_from(self.delivered().min(u64::from(self.capacity))).unwrap_or(0);
        scan_outcomes(service, (0..n).map(|k| (k, self.read(k))))
    }
}

const _: () = assert!(RECORDS_OFFSET == LINE);
