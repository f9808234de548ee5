//! Extraction of service continuations: every state box read over the
//! backdoor, every record validated (seqlock, CRC32C), and the newest
//! complete record of each session kept.
//!
//! Each state box is read in three steps, every one in pipelined batches:
//! a census of every slot's seq word (empty slots are never copied), a
//! copy of every written slot immediately followed by its seq word again,
//! and rounds of the same for the slots that moved. A slot's copy and its
//! re-check are one batch entry apart, so the agent reads them
//! microseconds apart and a live guest rarely rewrites a slot in between;
//! a slot still moving after [`MAX_RETRIES`] rounds is reported torn. A
//! record whose CRC fails is reported as corrupt and never used.

use backdoor_abi::record::{validate, ReadOutcome, Record};
use backdoor_abi::{SboxHeader, LINE, LINE_LEN, SBOX_MAGIC};
use backdoor_proto::wire::{BatchEntry, MAX_BATCH, MAX_READ};
use backdoor_proto::{Client, ClientError, PublicDescriptor};
use serde::{Deserialize, Serialize};

/// How many times a moving slot is re-read before it is reported torn.
pub const MAX_RETRIES: u32 = 8;
/// Most bytes one batch asks for: small enough that batches pipeline
/// (the agent reads the next while this side opens the last).
const BATCH_BYTES: u64 = 256 << 10;
/// Batches in flight.
const DEPTH: usize = 4;

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
    // The connection's descriptor (WELCOME's, or its last DESCRIBE): a
    // stale one only makes the agent refuse the reads (old generation).
    let d: PublicDescriptor = client.descriptor().clone();
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
    let mut sessions: Vec<Session> = Vec::new();
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
        let slots = Slots {
            hook: h.id,
            base,
            size: hdr.slot_size,
        };
        let count = u64::from(hdr.slot_count);
        let written = slots.census(client, count)?;
        summary.slots += count;
        summary.empty += count - written.len() as u64;
        let box_done = done;
        let outcomes = slots.read(client, &written, &mut |n| {
            done = box_done + n * size;
            progress(done, total);
        })?;
        for (i, outcome) in written.into_iter().zip(outcomes) {
            classify(
                outcome,
                &h.name,
                i,
                service,
                &mut summary,
                &mut problems,
                &mut sessions,
            );
        }
        done = box_done + h.len;
        progress(done, total);
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
        sessions: newest_of_each(sessions),
        problems,
    })
}

/// The slots of one state box, and how to read them over the backdoor.
#[derive(Debug, Clone, Copy)]
pub struct Slots {
    /// The state-box hook.
    pub hook: u32,
    /// Offset of slot 0 in the hook.
    pub base: u64,
    /// Bytes per slot.
    pub size: u32,
}

impl Slots {
    fn at(&self, slot: u64) -> u64 {
        self.base + slot * u64::from(self.size)
    }

    /// The slots of the first `count` whose seq word is not zero.
    pub fn census(&self, client: &mut Client, count: u64) -> Result<Vec<u64>, ClientError> {
        let entries = (0..count).map(|i| {
            [BatchEntry {
                hook: self.hook,
                offset: self.at(i),
                len: 8,
            }]
        });
        let bytes = client.read_batches(&batches(entries), DEPTH)?.concat();
        Ok(bytes
            .chunks_exact(8)
            .zip(0..)
            .filter(|(w, _)| w.iter().any(|&b| b != 0))
            .map(|(_, i)| i)
            .collect())
    }

    /// Reads `slots` with the seqlock protocol, all of them at once: each
    /// slot's copy (its seq word first) then its seq word again, in one
    /// stream of batches, and again for the slots that moved, at most
    /// [`MAX_RETRIES`] more times. `copied` is told how many slots have
    /// been copied once. One outcome per slot, in order.
    pub fn read(
        &self,
        client: &mut Client,
        slots: &[u64],
        copied: &mut dyn FnMut(u64),
    ) -> Result<Vec<ReadOutcome>, ClientError> {
        let size = self.size as usize;
        let mut outcomes = vec![ReadOutcome::Torn; slots.len()];
        let mut pending: Vec<usize> = (0..slots.len()).collect();
        for round in 0..=MAX_RETRIES {
            if pending.is_empty() {
                break;
            }
            let entries = pending.iter().map(|&k| {
                let at = self.at(slots[k]);
                [
                    BatchEntry {
                        hook: self.hook,
                        offset: at,
                        len: self.size,
                    },
                    BatchEntry {
                        hook: self.hook,
                        offset: at,
                        len: 8,
                    },
                ]
            });
            // Batches hold whole pairs: each reply is read where it lies.
            let replies = client.read_batches(&batches(entries), DEPTH)?;
            let pairs = replies.iter().flat_map(|b| b.chunks_exact(size + 8));
            let mut moved = Vec::new();
            for (&k, pair) in pending.iter().zip(pairs) {
                let (slot, after) = pair.split_at(size);
                let s1 = u64::from_le_bytes(slot[..8].try_into().expect("8 bytes"));
                let s2 = u64::from_le_bytes(after.try_into().expect("8 bytes"));
                outcomes[k] = if s1 == 0 && s2 == 0 {
                    ReadOutcome::Empty
                } else if s1 == s2 && s1 % 2 == 0 {
                    match validate(slot, s1) {
                        Ok(record) => ReadOutcome::Complete {
                            record,
                            retries: round,
                        },
                        Err(c) => ReadOutcome::Corrupt(c),
                    }
                } else {
                    moved.push(k);
                    continue;
                };
            }
            if round == 0 {
                copied(slots.len() as u64);
            }
            pending = moved;
        }
        Ok(outcomes)
    }
}

/// `units` (groups of entries that must share a batch: a slot and its
/// seq re-check) cut into batches the agent accepts (at most
/// [`MAX_BATCH`] entries and [`BATCH_BYTES`] bytes; a unit larger than
/// that alone).
fn batches<const N: usize>(units: impl Iterator<Item = [BatchEntry; N]>) -> Vec<Vec<BatchEntry>> {
    let mut out: Vec<Vec<BatchEntry>> = Vec::new();
    let mut bytes = 0u64;
    for unit in units {
        let len: u64 = unit.iter().map(|e| u64::from(e.len)).sum();
        let full = out
            .last()
            .is_none_or(|b| b.len() + N > MAX_BATCH as usize || bytes + len > BATCH_BYTES);
        if full {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += len;
        out.last_mut().expect("a batch").extend(unit);
    }
    out
}

fn classify(
    outcome: ReadOutcome,
    hook: &str,
    slot: u64,
    service: Option<&str>,
    summary: &mut Summary,
    problems: &mut Vec<Problem>,
    sessions: &mut Vec<Session>,
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
            sessions.push(session(record, hook, slot));
        }
    }
}

/// The newest record of each (service, session), sorted by them; of
/// records of the same version, the first read. A sort, not a map keyed
/// by owned names: no allocation per record.
fn newest_of_each(mut sessions: Vec<Session>) -> Vec<Session> {
    sessions.sort_by(|a, b| {
        (&a.service, a.session_id)
            .cmp(&(&b.service, b.session_id))
            .then(b.version.cmp(&a.version))
    });
    sessions.dedup_by(|later, kept| {
        later.service == kept.service && later.session_id == kept.session_id
    });
    sessions
}

/// Lower-case hex, written a byte at a time (`hex::encode` collects
/// chars one by one: most of an extraction's CPU once went there).
fn to_hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex::encode_to_slice(bytes, &mut out).expect("twice the length");
    String::from_utf8(out).expect("hex is ASCII")
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
        payload_hex: to_hex(&r.payload),
        payload_text: text,
        hook: hook.into(),
        slot,
    }
}
