//! The record validator (docs/abi.md section 3) on guest-chosen slot
//! bytes: `validate` directly and `read_slot` through a local slot.
//! Invariants: nothing panics, whatever the slot's length; an accepted
//! record's CRC matches, its payload fits the slot, and re-encoding it
//! gives a slot that validates to the same record.
#![no_main]

use std::sync::atomic::AtomicU64;

use backdoor_abi::record::{encode, read_slot, record_crc, validate, LocalSlot, ReadOutcome};
use backdoor_abi::LINE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let seq = 2;
    if let Ok(r) = validate(data, seq) {
        assert!(data.len() >= LINE);
        assert!(r.payload.len() <= data.len() - LINE);
        let stored = u32::from_le_bytes(data[48..52].try_into().unwrap());
        assert_eq!(record_crc(data, r.payload.len()), stored);
        let again = encode(
            &r.service,
            r.session_id,
            r.version,
            r.stage,
            &r.payload,
            data.len(),
        )
        .expect("an accepted record fits its own slot");
        assert_eq!(validate(&again, seq), Ok(r));
    }
    // The same bytes as a slot of atomic words, read with the seqlock protocol.
    let words: Vec<AtomicU64> = data
        .chunks_exact(8)
        .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap())))
        .collect();
    if words.is_empty() {
        return;
    }
    let slot = LocalSlot::new(&words);
    let bytes: Vec<u8> = data[..words.len() * 8].to_vec();
    let s = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    match read_slot(&slot, 2) {
        ReadOutcome::Empty => assert_eq!(s, 0),
        ReadOutcome::Torn => assert_eq!(s % 2, 1, "a still slot is never torn"),
        ReadOutcome::Complete { record, retries } => {
            assert_eq!(retries, 0);
            assert_eq!(validate(&bytes, s), Ok(record));
        }
        ReadOutcome::Corrupt(c) => assert_eq!(validate(&bytes, s), Err(c)),
    }
});
