//! Service continuations: a service's area of state-box slots, written
//! with the seqlock + CRC32C record protocol of docs/abi.md (the
//! `backdoor-abi` writer and reader, over the mapped slots' words).
//! The area outlives the process; a restarted instance that opens the
//! same name reads its sessions back with [`ServiceArea::scan`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use backdoor_abi::record::{read_slot, write_slot, Corruption, LocalSlot, ReadOutcome, Record};
use backdoor_abi::LINE;

use crate::device::{Backing, Device};
use crate::error::encode_checked;
use crate::mapping::Mapping;
use crate::uapi::{BdIocSvc, BD_SERVICE_LEN, BD_SVC_CREATE};
use crate::Error;

/// How many times a slot that moves while read is re-read.
pub const READ_RETRIES: u32 = 8;

/// A service's slots, mapped into this process.
///
/// One writer per slot: [`ServiceArea::write`] takes `&self` so that
/// threads can share the area, but two threads must never write the same
/// slot at once (serialise per session, as `bdkv` does with a mutex).
#[derive(Debug)]
pub struct ServiceArea {
    backing: Arc<Backing>,
    map: Mapping,
    name: String,
    slot_count: u32,
    slot_size: u32,
    first_slot: u32,
    created: bool,
}

/// A slot that holds something unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Still mid-write after every re-read (the writer died mid-write).
    Torn,
    /// Complete per the seqlock but invalid: never used.
    Corrupt(Corruption),
    /// A complete record of another service.
    ForeignService(String),
}

/// The newest complete record of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The slot it is in.
    pub slot: u32,
    /// The record.
    pub record: Record,
}

/// What a scan of slots found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Per session, the newest complete record (by session id).
    pub newest: Vec<Found>,
    /// Every complete record of the service (older versions included).
    pub complete: Vec<Found>,
    /// Slots that could not be used, with why.
    pub problems: Vec<(u32, Problem)>,
}

/// Folds slot outcomes into a [`Scan`] for `service`.
pub(crate) fn scan_outcomes(
    service: &str,
    outcomes: impl Iterator<Item = (u32, ReadOutcome)>,
) -> Scan {
    let mut scan = Scan::default();
    let mut newest: BTreeMap<u64, Found> = BTreeMap::new();
    for (slot, out) in outcomes {
        match out {
            ReadOutcome::Empty => {}
            ReadOutcome::Torn => scan.problems.push((slot, Problem::Torn)),
            ReadOutcome::Corrupt(c) => scan.problems.push((slot, Problem::Corrupt(c))),
            ReadOutcome::Complete { record, .. } if record.service != service => scan
                .problems
                .push((slot, Problem::ForeignService(record.service))),
            ReadOutcome::Complete { record, .. } => {
                let f = Found { slot, record };
                scan.complete.push(f.clone());
                if newest
                    .get(&f.record.session_id)
                    .is_none_or(|n| f.record.version > n.record.version)
                {
                    newest.insert(f.record.session_id, f);
                }
            }
        }
    }
    scan.newest = newest.into_values().collect();
    scan
}

impl ServiceArea {
    /// Opens the area of service `name` (1 to 16 printable ASCII
    /// characters); with `create`, makes it with `slots` slots if missing.
    /// One open file holds a service at a time ([`Error::Busy`]).
    pub fn open(dev: &Device, name: &str, slots: u32, create: bool) -> Result<Self, Error> {
        let service = encode_checked::<BD_SERVICE_LEN>("service name", name)?;
        let mut req = BdIocSvc {
            service,
            slots,
            flags: if create { BD_SVC_CREATE } else { 0 },
            slot_count: 0,
            slot_size: 0,
            first_slot: 0,
            created: 0,
            mmap_offset: 0,
        };
        let backing = dev.backing.clone();
        backing.svc_open(name, &mut req)?;
        let bytes = u64::from(req.slot_count) * u64::from(req.slot_size);
        let usable = req.slot_count > 0
            && req.slot_size >= 128
            && req.slot_size % 8 == 0
            && usize::try_from(bytes).is_ok();
        if !usable {
            backing.svc_release(name);
            return Err(Error::Driver(format!(
                "service area of {} slots of {} bytes",
                req.slot_count, req.slot_size
            )));
        }
        let map = backing
            .map(
                "the service area",
                req.mmap_offset,
                usize::try_from(bytes).unwrap_or(0),
                true,
            )
            .inspect_err(|_| backing.svc_release(name))?;
        Ok(Self {
            backing,
            map,
            name: name.to_owned(),
            slot_count: req.slot_count,
            slot_size: req.slot_size,
            first_slot: req.first_slot,
            created: req.created != 0,
        })
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Slots in the area.
    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    /// The largest payload a record can carry.
    pub fn max_payload(&self) -> usize {
        self.slot_size as usize - LINE
    }

    /// The area's first slot in the state box (where monitors see it).
    pub fn first_slot(&self) -> u32 {
        self.first_slot
    }

    /// Whether opening created the area (no earlier instance left state).
    pub fn created(&self) -> bool {
        self.created
    }

    fn slot_words(&self, slot: u32) -> Result<&[AtomicU64], Error> {
        if slot >= self.slot_count {
            return Err(Error::BadSlot {
                slot,
                count: self.slot_count,
            });
        }
        let size = self.slot_size as usize;
        self.map
            .words(slot as usize * size, size)
            .ok_or(Error::BadSlot {
                slot,
                count: self.slot_count,
            })
    }

    /// Writes a record into `slot` with the seqlock protocol (seq odd,
    /// fields, CRC, seq even). A process that dies mid-write leaves the
    /// slot torn, so keep two slots per session and alternate.
    pub fn write(
        &self,
        slot: u32,
        session_id: u64,
        version: u64,
        stage: u32,
        payload: &[u8],
    ) -> Result<(), Error> {
        let words = self.slot_words(slot)?;
        if payload.len() > self.max_payload() {
            return Err(Error::TooLarge {
                len: payload.len(),
                max: self.max_payload(),
            });
        }
        if write_slot(words, &self.name, session_id, version, stage, payload) {
            Ok(())
        } else {
            Err(Error::TooLarge {
                len: payload.len(),
                max: self.max_payload(),
            })
        }
    }

    /// Empties `slot`: readers see it as never written.
    pub fn clear(&self, slot: u32) -> Result<(), Error> {
        self.slot_words(slot)?[0].store(0, Ordering::Release);
        Ok(())
    }

    /// Reads `slot` with the seqlock protocol.
    pub fn read(&self, slot: u32) -> Result<ReadOutcome, Error> {
        Ok(read_slot(
            &LocalSlot::new(self.slot_words(slot)?),
            READ_RETRIES,
        ))
    }

    /// Every slot's outcome, in slot order.
    pub fn records(&self) -> impl Iterator<Item = (u32, ReadOutcome)> + '_ {
        (0..self.slot_count).filter_map(|s| self.read(s).ok().map(|o| (s, o)))
    }

    /// The sessions to resume: the newest complete record of each, and
    /// the slots that could not be used.
    pub fn scan(&self) -> Scan {
        scan_outcomes(&self.name, self.records())
    }

    /// Gives the area back to the driver: its sessions end for good.
    pub fn delete(self) -> Result<(), Error> {
        self.backing.svc_delete(&self.name)
    }
}

impl Drop for ServiceArea {
    fn drop(&mut self) {
        self.backing.svc_release(&self.name);
    }
}
