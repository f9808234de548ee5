//! Extraction of service continuations: every state box read over the
//! backdoor, every record validated (seqlock, CRC32C), and the newest
//! complete record of each session kept.
//!
//! Each state box is bulk-copied with pipelined READs, then every slot's
//! seq word is read again (batched): a slot whose seq is odd or moved is
//! re-read alone with the seqlock protocol, a bounded number of times.
//! A record whose CRC fails is reported as corrupt and never used.

use std::collections::BTreeMap;

use backdoor_abi::record::{read_slot, validate, ReadOutcome, Record};
use backdoor_abi::{SboxHeader, LINE, LINE_LEN, SBOX_MAGIC};
use backdoor_proto::wire::{BatchEntry, MAX_BATCH, MAX_READ};
use backdoor_proto::{Client, ClientError, PublicDescriptor, RemoteSlot};
use serde::{Deserialize, Serialize};

/// How many times a moving slot is re-read before it is reported torn.
pub const MAX_RETRIES: u32 = 8;

/// Counts for the summary line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Slots examined.
    pub slots: u64,
    /// Never written.
    pub empty: u64,
    /// Complete and valid.
    pub accepted: u64,
    /// Of those, how many needed re-reading because they were being written.
    pub retried: u64,
    /// Still mid-write after every retry.
    pub torn: u64,
    /// Complete per the seqlock but invalid (CRC, length, name): never used.
    pub corrupt: u64,
}

/// One extracted session: the newest complete record for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Service name.
    pub service: String,
    /// Session id.
    pub session_id: u64,
    /// Record version.
    pub version: u64,
    /// Service-defined stage.
    pub stage: u32,
    /// Payload as hex (always).
    pub payload_hex: String,
    /// Payload as text, when it is printable UTF-8 (trailing NULs dropped).
    pub payload_text: Option<String>,
    /// State-box hook it came from.
    pub hook: String,
    /// Slot index.
    pub slot: u64,
}

impl Session {
    /// The payload bytes.
    pub fn payload(&self) -> Option<Vec<u8>> {
        backdoor_proto::auth::decode_hex(&self.payload_hex)
    }
}

/// A slot that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Hook name.
    pub hook: String,
    /// Slot index (none for a problem with the whole box).
    pub slot: Option<u64>,
    /// "torn", "corrupt" or "bad_box".
    pub kind: String,
    /// Details.
    pub detail: String,
}

/// The result of `bdctl extract`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extraction {
    /// The VM.
    pub vm: String,
    /// Its generation at extraction time.
    pub generation: u32,
    /// Whether its hooks were sealed.
    pub sealed: bool,
    /// Counts.
    pub summary: Summary,
    /// Newest complete record per (service, session), sorted.
    pub sessions: Vec<Session>,
    /// Slots and boxes that could not be used.
    pub problems: Vec<Problem>,
}

/// Extracts every state box of the connected target. `service` keeps only
/// that service's sessions; `progress` is told (done, total) bytes.
pub fn extract(
    client: &mut Client,
    service: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Extraction, ClientError> {
    let d: PublicDescriptor = client.describe()?.clone();
    let boxes: Vec<_> = d
        .hooks
        .iter()
        .filter(|h| h.kind == "state_box")
        .cloned()
        .collect();
    let total: u64 = boxes.iter().map(|h| h.len).sum();
    let mut done = 0u64;
    let mut summary = Summary::default();
    let mut problems = Vec::new();
    let mut newest: BTreeMap<(String, u64), Session> = BTreeMap::new();
    for h in &boxes {
        let hdr = SboxHeader::from_bytes(
            &client
                .read(h.id, 0, LINE_LEN)?
                .try_into()
                .unwrap_or([0; LINE]),
        );
        let size = u64::from(hdr.slot_size);
        // Slot 0 starts at header_size: 64, or padded (to a page, by the Linux driver).
        let base = u64::from(hdr.header_size);
        let valid = hdr.magic == SBOX_MAGIC
            && base >= LINE as u64
            && base % LINE as u64 == 0
            && size >= 128
            && size.is_power_of_two()
            && size <= u64::from(MAX_READ)
            && base + u64::from(hdr.slot_count) * size <= h.len;
        if !valid {
            problems.push(Problem {
                hook: h.name.clone(),
                slot: None,
                kind: "bad_box".into(),
                detail: format!(
                    "state-box header is invalid (magic {:#x}, slot size {}, {} slots)",
                    hdr.magic, hdr.slot_size, hdr.slot_count
                ),
            });
            continue;
        }
        let count = u64::from(hdr.slot_count);
        let mut copy = Vec::with_capacity(usize::try_from(count * size).unwrap_or(0));
        // Chunks hold whole slots, so a slot's seq is copied before its body.
        let chunk = u32::try_from((u64::from(MAX_READ) / size) * size).unwrap_or(MAX_READ);
        client.read_bulk(h.id, base, count * size, chunk, 4, |b| {
            copy.extend_from_slice(b);
            done += b.len() as u64;
            progress(done, total);
        })?;
        for first in (0..count).step_by(MAX_BATCH as usize) {
            let last = (first + u64::from(MAX_BATCH)).min(count);
            let entries: Vec<BatchEntry> = (first..last)
                .map(|i| BatchEntry {
                    hook: h.id,
                    offset: base + i * size,
                    len: 8,
                })
                .collect();
            let seqs = client.read_batch(&entries)?;
            for (i, s2) in (first..last).zip(seqs) {
                let at = usize::try_from(i * size).unwrap_or(usize::MAX);
                let slot = &copy[at..at + usize::try_from(size).unwrap_or(usize::MAX)];
                let s1 = u64::from_le_bytes(slot[..8].try_into().expect("8 bytes"));
                let s2 = u64::from_le_bytes(s2.try_into().unwrap_or([0xff; 8]));
                summary.slots += 1;
                let outcome = if s1 == 0 && s2 == 0 {
                    ReadOutcome::Empty
                } else if s1 == s2 && s1 % 2 == 0 {
                    match validate(slot, s1) {
                        Ok(record) => ReadOutcome::Complete { record, retries: 0 },
                        Err(c) => ReadOutcome::Corrupt(c),
                    }
                } else {
                    // It moved (or was mid-write): read it alone with the seqlock protocol.
                    let rs = RemoteSlot::new(client, h.id, base + i * size, hdr.slot_size);
                    let out = match read_slot(&rs, MAX_RETRIES) {
                        ReadOutcome::Complete { record, retries } => ReadOutcome::Complete {
                            record,
                            retries: retries + 1,
                        },
                        other => other,
                    };
                    if let Some(e) = rs.take_error() {
                        return Err(e);
                    }
                    out
                };
                classify(
                    outcome,
                    &h.name,
                    i,
                    service,
                    &mut summary,
                    &mut problems,
                    &mut newest,
                );
            }
        }
    }
    // Each READ was checked against the generation (soft), or went to a
    // region the agent revokes on reset (verbs): a reboot during the copy
    // shows here, and then nothing of it is trusted.
    let now = client.describe()?.generation;
    if now != d.generation {
        return Err(ClientError::Protocol(format!(
            "the guest rebooted during the extraction (generation {} -> {now}): not using it",
            d.generation
        )));
    }
    Ok(Extraction {
        vm: d.vm,
        generation: d.generation,
        sealed: d.sealed,
        summary,
        sessions: newest.into_values().collect(),
        problems,
    })
}

fn classify(
    outcome: ReadOutcome,
    hook: &str,
    slot: u64,
    service: Option<&str>,
    summary: &mut Summary,
    problems: &mut Vec<Problem>,
    newest: &mut BTreeMap<(String, u64), Session>,
) {
    match outcome {
        ReadOutcome::Empty => summary.empty += 1,
        ReadOutcome::Torn => {
            summary.torn += 1;
            problems.push(Problem {
                hook: hook.into(),
                slot: Some(slot),
                kind: "torn".into(),
                detail: format!("still being written after {MAX_RETRIES} re-reads"),
            });
        }
        ReadOutcome::Corrupt(c) => {
            summary.corrupt += 1;
            problems.push(Problem {
                hook: hook.into(),
                slot: Some(slot),
                kind: "corrupt".into(),
                detail: format!("{c:?}"),
            });
        }
        ReadOutcome::Complete { record, retries } => {
            summary.accepted += 1;
            if retries > 0 {
                summary.retried += 1;
            }
            if service.is_some_and(|s| s != record.service) {
                return;
            }
            let key = (record.service.clone(), record.session_id);
            if newest.get(&key).is_none_or(|s| record.version > s.version) {
                newest.insert(key, session(record, hook, slot));
            }
        }
    }
}

fn session(r: Record, hook: &str, slot: u64) -> Session {
    let text = std::str::from_utf8(&r.payload)
        .ok()
        .map(|t| t.trim_end_matches('\0'))
        .filter(|t| t.chars().all(|c| !c.is_control() || c == '\n' || c == '\t'))
        .map(str::to_owned);
    Session {
        service: r.service,
        session_id: r.session_id,
        version: r.version,
        stage: r.stage,
        payload_hex: r.payload.iter().map(|b| format!("{b:02x}")).collect(),
        payload_text: text,
        hook: hook.into(),
        slot,
    }
}
