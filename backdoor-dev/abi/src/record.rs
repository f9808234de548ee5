//! Service-continuation records: the seqlock + CRC32C protocol of
//! docs/abi.md section 3. The reader never writes and never locks; it
//! retries a torn copy a bounded number of times and never accepts a
//! record whose CRC fails.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use crate::{decode_name, encode_name, RecordHeader, LINE};

/// Where a record's bytes come from: guest RAM mapped locally, or a
/// remote backend. Implementations must read `seq` as one atomic 8-byte
/// load, and may copy the rest with any (tearing) granularity.
pub trait SlotSource {
    /// The slot's size in bytes.
    fn slot_size(&self) -> usize;
    /// Reads the seq word (offset 0) atomically, with acquire ordering.
    fn load_seq(&self) -> u64;
    /// Copies the whole slot into `buf` (`buf.len() == slot_size()`).
    fn copy_slot(&self, buf: &mut [u8]);
}

/// A complete, CRC-checked record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The seqlock value it was read at.
    pub seq: u64,
    /// Session id.
    pub session_id: u64,
    /// Service name.
    pub service: String,
    /// The session's record version.
    pub version: u64,
    /// Service-defined stage.
    pub stage: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Why a record was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// `payload_len` larger than the slot allows.
    PayloadTooLong {
        /// Claimed length.
        len: u32,
        /// What fits.
        max: u32,
    },
    /// The CRC32C does not match.
    BadCrc {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// The service name is not printable ASCII.
    BadService,
    /// The slot is shorter than a record header (a caller's bad slot size).
    SlotTooSmall {
        /// The slot's length.
        len: usize,
    },
}

/// The outcome of reading one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Never written.
    Empty,
    /// A complete record (`retries` torn copies were discarded first).
    Complete {
        /// The record.
        record: Record,
        /// Torn copies discarded before this one.
        retries: u32,
    },
    /// Still being written (or torn) after every retry.
    Torn,
    /// Complete per the seqlock, but invalid: never use it.
    Corrupt(Corruption),
}

/// CRC32C over a record's covered bytes: header bytes 8..48, then the payload.
pub fn record_crc(slot: &[u8], payload_len: usize) -> u32 {
    let crc = crc32c::crc32c(&slot[8..48]);
    crc32c::crc32c_append(crc, &slot[LINE..LINE + payload_len])
}

/// Reads one slot with the seqlock protocol, retrying torn copies up to `max_retries` times.
pub fn read_slot(src: &impl SlotSource, max_retries: u32) -> ReadOutcome {
    let size = src.slot_size();
    let mut buf = vec![0u8; size];
    let mut retries = 0;
    loop {
        let s1 = src.load_seq();
        if s1 == 0 {
            return ReadOutcome::Empty;
        }
        if s1 % 2 == 0 {
            src.copy_slot(&mut buf);
            fence(Ordering::Acquire);
            if src.load_seq() == s1 {
                return validate(&buf, s1)
                    .map(|record| ReadOutcome::Complete { record, retries })
                    .unwrap_or_else(ReadOutcome::Corrupt);
            }
        }
        if retries >= max_retries {
            return ReadOutcome::Torn;
        }
        retries += 1;
        std::hint::spin_loop();
    }
}

/// Validates a copy of a slot taken at seqlock value `seq` (already known
/// even and unchanged across the copy): payload bound, CRC, service name.
pub fn validate(buf: &[u8], seq: u64) -> Result<Record, Corruption> {
    // Found by fuzz/records: a slot shorter than the header used to panic.
    let Some(head) = buf.first_chunk::<LINE>() else {
        return Err(Corruption::SlotTooSmall { len: buf.len() });
    };
    let hdr = RecordHeader::from_bytes(head);
    let max = u32::try_from(buf.len() - LINE).unwrap_or(u32::MAX);
    if hdr.payload_len > max {
        return Err(Corruption::PayloadTooLong {
            len: hdr.payload_len,
            max,
        });
    }
    let len = hdr.payload_len as usize;
    let computed = record_crc(buf, len);
    if computed != hdr.crc32c {
        return Err(Corruption::BadCrc {
            stored: hdr.crc32c,
            computed,
        });
    }
    let service = decode_name(&hdr.service).ok_or(Corruption::BadService)?;
    Ok(Record {
        seq,
        session_id: hdr.session_id,
        service: service.to_owned(),
        version: hdr.version,
        stage: hdr.stage,
        payload: buf[LINE..LINE + len].to_vec(),
    })
}

/// A slot in memory this process maps (the agent's view of guest RAM, or a test buffer).
#[derive(Debug)]
pub struct LocalSlot<'a> {
    words: &'a [AtomicU64],
}

impl<'a> LocalSlot<'a> {
    /// A slot over `words` (its size is `8 * words.len()`).
    pub fn new(words: &'a [AtomicU64]) -> Self {
        Self { words }
    }
}

impl SlotSource for LocalSlot<'_> {
    fn slot_size(&self) -> usize {
        self.words.len() * 8
    }

    fn load_seq(&self) -> u64 {
        self.words[0].load(Ordering::Acquire)
    }

    fn copy_slot(&self, buf: &mut [u8]) {
        // Relaxed atomic loads: the writer may be storing concurrently, and
        // the seqlock check afterwards decides whether the copy is usable.
        for (chunk, w) in buf.chunks_exact_mut(8).zip(self.words) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
    }
}

/// Encodes a complete record (seq 2: written once, even) into a slot of
/// `slot_size` bytes, for handing sessions to another instance.
pub fn encode(
    service: &str,
    session_id: u64,
    version: u64,
    stage: u32,
    payload: &[u8],
    slot_size: usize,
) -> Option<Vec<u8>> {
    if slot_size < LINE || payload.len() > slot_size - LINE {
        return None;
    }
    let mut b = vec![0u8; slot_size];
    b[0..8].copy_from_slice(&2u64.to_le_bytes());
    b[8..16].copy_from_slice(&session_id.to_le_bytes());
    b[16..32].copy_from_slice(&encode_name::<16>(service));
    b[32..40].copy_from_slice(&version.to_le_bytes());
    b[40..44].copy_from_slice(&stage.to_le_bytes());
    b[44..48].copy_from_slice(&u32::try_from(payload.len()).ok()?.to_le_bytes());
    b[LINE..LINE + payload.len()].copy_from_slice(payload);
    let crc = record_crc(&b, payload.len());
    b[48..52].copy_from_slice(&crc.to_le_bytes());
    Some(b)
}

/// Writes a record into a slot of atomic words with the writer protocol
/// (for host-side services and tests; guests use the C implementation).
/// Returns false if the payload does not fit.
pub fn write_slot(
    words: &[AtomicU64],
    service: &str,
    session_id: u64,
    version: u64,
    stage: u32,
    payload: &[u8],
) -> bool {
    let size = words.len() * 8;
    if size < LINE || payload.len() > size - LINE {
        return false;
    }
    let mut bytes = vec![0u8; LINE + payload.len().next_multiple_of(8)];
    bytes[8..16].copy_from_slice(&session_id.to_le_bytes());
    bytes[16..32].copy_from_slice(&encode_name::<16>(service));
    bytes[32..40].copy_from_slice(&version.to_le_bytes());
    bytes[40..44].copy_from_slice(&stage.to_le_bytes());
    bytes[44..48].copy_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    bytes[LINE..LINE + payload.len()].copy_from_slice(payload);
    let crc = record_crc(&bytes, payload.len());
    bytes[48..52].copy_from_slice(&crc.to_le_bytes());

    let seq = words[0].load(Ordering::Relaxed);
    words[0].store(seq.wrapping_add(1) | 1, Ordering::Relaxed);
    fence(Ordering::Release);
    for (w, chunk) in words[1..].iter().zip(bytes[8..].chunks_exact(8)) {
        w.store(
            u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
            Ordering::Relaxed,
        );
    }
    fence(Ordering::Release);
    words[0].store((seq.wrapping_add(1) | 1).wrapping_add(1), Ordering::Release);
    true
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    fn slot(words: usize) -> Vec<AtomicU64> {
        (0..words).map(|_| AtomicU64::new(0)).collect()
    }

    /// Regression (fuzz/records, crash-da39a3ee): slots shorter than a
    /// record header are corrupt, not a panic, directly and through the
    /// seqlock reader.
    #[test]
    fn slots_shorter_than_a_header_are_corrupt_not_a_panic() {
        for len in [0usize, 1, 8, 63] {
            assert_eq!(
                validate(&vec![0u8; len], 2),
                Err(Corruption::SlotTooSmall { len })
            );
        }
        let s = slot(7); // 56 bytes, even seq
        s[0].store(2, Ordering::SeqCst);
        assert_eq!(
            read_slot(&LocalSlot::new(&s), 1),
            ReadOutcome::Corrupt(Corruption::SlotTooSmall { len: 56 })
        );
    }

    #[test]
    fn empty_slot_reads_empty() {
        let s = slot(32);
        assert_eq!(read_slot(&LocalSlot::new(&s), 3), ReadOutcome::Empty);
    }

    #[test]
    fn a_slot_left_mid_write_is_torn_never_complete() {
        let s = slot(32);
        assert!(write_slot(&s, "kv", 1, 1, 0, b"abc"));
        s[0].fetch_add(1, Ordering::SeqCst); // writer died mid-write
        assert_eq!(read_slot(&LocalSlot::new(&s), 5), ReadOutcome::Torn);
    }

    #[test]
    fn a_scribbled_record_is_corrupt() {
        let s = slot(32);
        assert!(write_slot(&s, "kv", 9, 3, 2, b"session state"));
        s[9].fetch_xor(1 << 8, Ordering::SeqCst); // one payload bit flips
        assert!(matches!(
            read_slot(&LocalSlot::new(&s), 1),
            ReadOutcome::Corrupt(Corruption::BadCrc { .. })
        ));
        let s = slot(32);
        assert!(write_slot(&s, "kv", 9, 3, 2, b"x"));
        s[5].store(u64::from(u32::MAX) << 32, Ordering::SeqCst); // payload_len huge
        assert!(matches!(
            read_slot(&LocalSlot::new(&s), 1),
            ReadOutcome::Corrupt(Corruption::PayloadTooLong { .. })
        ));
    }

    proptest! {
        #[test]
        fn records_round_trip(session in any::<u64>(), version in any::<u64>(), stage in any::<u32>(),
                              payload in proptest::collection::vec(any::<u8>(), 0..448),
                              service in "[a-z][a-z0-9-]{0,15}") {
            let s = slot(64);
            prop_assert!(write_slot(&s, &service, session, version, stage, &payload));
            let got = read_slot(&LocalSlot::new(&s), 0);
            let expected = Record { seq: 2, session_id: session, service, version, stage, payload };
            prop_assert_eq!(got, ReadOutcome::Complete { record: expected, retries: 0 });
        }

        #[test]
        fn any_single_bit_flip_in_checked_bytes_is_caught(
            payload in proptest::collection::vec(any::<u8>(), 1..200),
            pick in any::<proptest::sample::Index>(),
        ) {
            let s = slot(64);
            prop_assert!(write_slot(&s, "svc", 1, 1, 1, &payload));
            // Checked: header bytes 8..52 (fields and the CRC itself) and the payload.
            let bits: Vec<usize> = (8 * 8..52 * 8).chain(64 * 8..(64 + payload.len()) * 8).collect();
            let bit = bits[pick.index(bits.len())];
            s[bit / 64].fetch_xor(1 << (bit % 64), Ordering::SeqCst);
            let out = read_slot(&LocalSlot::new(&s), 0);
            prop_assert!(matches!(out, ReadOutcome::Corrupt(_)), "bit {bit} flipped and still {out:?}");
        }
    }

    #[test]
    fn a_concurrent_reader_never_accepts_a_torn_record() {
        // Every record's payload is 200 copies of one byte derived from its
        // version: a torn copy would mix bytes and (almost surely) fail the
        // CRC; the seqlock must reject it before that.
        let s: Arc<Vec<AtomicU64>> = Arc::new(slot(64));
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || {
                for v in 1..=200_000u64 {
                    let b = (v % 251) as u8;
                    write_slot(&s, "svc", 42, v, (v % 7) as u32, &[b; 200]);
                }
            })
        };
        let (mut complete, mut torn) = (0u64, 0u64);
        let mut last_version = 0;
        while !writer.is_finished() {
            match read_slot(&LocalSlot::new(&s), 2) {
                ReadOutcome::Complete { record, .. } => {
                    let b = (record.version % 251) as u8;
                    assert!(
                        record.payload.iter().all(|&x| x == b),
                        "torn payload accepted"
                    );
                    assert_eq!(record.stage, (record.version % 7) as u32);
                    assert!(record.version >= last_version, "versions go backwards");
                    last_version = record.version;
                    complete += 1;
                }
                ReadOutcome::Torn | ReadOutcome::Empty => torn += 1,
                ReadOutcome::Corrupt(c) => {
                    panic!("a complete-looking copy failed validation: {c:?}")
                }
            }
        }
        writer.join().unwrap();
        assert!(
            complete > 0,
            "reader never saw a complete record ({torn} torn)"
        );
    }
}
