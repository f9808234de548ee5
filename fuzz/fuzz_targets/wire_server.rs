//! The agent's side of the wire: the real handshake (HELLO decoding and
//! the Noise handshake) and the real request path (frame decoding, then
//! `Agent::dispatch`: generation, hook, bounds, role, permissions) on
//! guest RAM. Invariants: nothing panics; authentication never succeeds
//! without the key; a read-role session changes no guest byte, and a
//! repair session changes only bytes of the writable REPAIR hook; a reply
//! is never larger than the protocol allows.
#![no_main]

use std::sync::{Arc, OnceLock};

use backdoor_agent::wire::{read_msg, write_msg, Msg, WireError, MAX_PAYLOAD};
use backdoor_agent::{Agent, GuestMemory, Role};
use bdvmm_fuzz::{agent, snapshot, writable, RAM_LEN};
use libfuzzer_sys::fuzz_target;

fn fixture() -> &'static (Arc<GuestMemory>, Arc<Agent>) {
    static F: OnceLock<(Arc<GuestMemory>, Arc<Agent>)> = OnceLock::new();
    F.get_or_init(|| {
        let (mem, agent) = agent();
        assert!(mem.write(0, pattern()));
        (mem, agent)
    })
}

fuzz_target!(|data: &[u8]| {
    let (mem, agent) = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // The handshake, fed raw bytes: the fuzzer cannot make a Noise
        // message under the key, so a success would be an authentication
        // bypass.
        let mut r = rest;
        let mut w = Vec::new();
        if let Ok(admitted) = agent.authenticate(&mut r, &mut w) {
            assert!(admitted.is_none(), "authenticated without the key");
        }
        return;
    }
    let role = if mode & 2 == 0 {
        Role::Read
    } else {
        Role::Repair
    };
    // Known contents, so a change anywhere is visible (restored only when
    // an input changed them: rewriting 128 KiB per run halves the speed).
    let before = pattern();
    let mut r = rest;
    // The server's request loop after each frame's record opened (the
    // fuzzer cannot encrypt under the key: what it reaches here is what a
    // monitor holding the key could send): a malformed or oversized frame
    // ends it.
    loop {
        let msg = match read_msg(&mut r) {
            Ok((_, m)) => m,
            Err(WireError::Io(_) | WireError::TimedOut) => break,
            Err(WireError::Malformed(_) | WireError::TooLarge(_) | WireError::Integrity) => break,
        };
        let expected_len = match &msg {
            Msg::Read { len, .. } => Some(*len as usize),
            Msg::ReadBatch { entries, .. } => Some(entries.iter().map(|e| e.len as usize).sum()),
            _ => None,
        };
        let reply = agent
            .dispatch(role, msg)
            .unwrap_or_else(|(code, message)| Msg::Error { code, message });
        match (&reply, expected_len) {
            (Msg::ReadOk(b) | Msg::ReadBatchOk(b), Some(n)) => assert_eq!(b.len(), n),
            (Msg::ReadOk(_) | Msg::ReadBatchOk(_), None) => panic!("read reply to a non-read"),
            _ => {}
        }
        let mut out = Vec::new();
        write_msg(&mut out, 0, &reply).expect("every reply fits a frame");
        assert!(out.len() <= 16 + MAX_PAYLOAD as usize);
    }
    let after = snapshot(mem);
    if after != *before {
        for (gpa, (a, b)) in (0u64..).zip(before.iter().zip(&after)) {
            if a != b {
                assert!(
                    role == Role::Repair && writable(gpa),
                    "{role:?} changed guest byte {gpa:#x} outside a writable hook"
                );
            }
        }
        assert!(mem.write(0, before));
    }
});

fn pattern() -> &'static Vec<u8> {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| (0..RAM_LEN).map(|i| (i * 7 + 3) as u8).collect())
}
