//! The monitor's side of the wire: replies decoded by the real frame
//! decoder and by the real `Client` talking to a scripted agent whose
//! frames after the (genuine) handshake are fuzzer-chosen (and encrypted). Invariants:
//! nothing panics; a decoded frame re-encodes to one that decodes to the
//! same message and is never larger than the limit; a Client call that
//! succeeds returns exactly what was asked (a READ of n bytes gives n
//! bytes, a batch gives each entry its length, a bulk read delivers every
//! byte in order); a Client never hangs on a bad peer.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::sync::OnceLock;
use std::time::Duration;

use backdoor_agent::channel;
use backdoor_agent::wire::{
    read_msg, write_msg, BatchEntry, Msg, HEADER_LEN, MAX_BATCH, MAX_NAME, MAX_PAYLOAD, MAX_WRITE,
};
use backdoor_agent::{Client, Role};
use bdvmm_fuzz::{READ_KEY, VM};
use libfuzzer_sys::fuzz_target;

fn check_decoded(m: &Msg) {
    match m {
        Msg::Hello { vm, .. } => assert!(vm.len() <= MAX_NAME),
        Msg::Write { data, .. } => assert!(data.len() <= MAX_WRITE as usize),
        Msg::ReadBatch { entries, .. } => assert!(entries.len() <= MAX_BATCH as usize),
        Msg::Error { message, .. } => assert!(message.len() <= 4096),
        _ => {}
    }
    let mut buf = Vec::new();
    write_msg(&mut buf, 9, m).expect("a decoded message re-encodes");
    assert!(buf.len() <= 16 + MAX_PAYLOAD as usize);
    let (id, back) = read_msg(&mut buf.as_slice()).expect("re-encoded frame decodes");
    assert_eq!((id, &back), (9, m));
}

/// One connection of the scripted agent: a genuine handshake, then
/// `script` split into frames and encrypted, then end of stream.
fn scripted_agent(listener: &TcpListener, script: Vec<u8>) {
    let Ok((mut s, _)) = listener.accept() else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let Ok((_, Msg::Hello { vm, role, noise })) = read_msg(&mut s) else {
        return;
    };
    let Ok((mut channel, accept)) = channel::respond(&READ_KEY, &vm, role, &noise) else {
        return;
    };
    if write_msg(&mut s, 0, &Msg::Accept { noise: accept }).is_err() {
        return;
    }
    // The script's frames go out encrypted as the real agent's would, so
    // the fuzzer reaches the client's decoding, not only its record
    // check; bytes that do not make a whole frame go out as they are.
    let mut rest = script.as_slice();
    while rest.len() >= HEADER_LEN {
        let len = u32::from_le_bytes(rest[12..16].try_into().unwrap()) as usize;
        let end = (HEADER_LEN + len).min(rest.len());
        if channel.send_raw(&mut s, &rest[..end]).is_err() {
            return;
        }
        rest = &rest[end..];
    }
    let _ = s.write_all(rest);
    let _ = s.shutdown(Shutdown::Write);
    // Drain the client's requests so it never blocks writing them.
    let mut sink = [0u8; 4096];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("bind"))
}

fn word(ops: &[u8], i: usize) -> u64 {
    u64::from(ops.get(i).copied().unwrap_or(0))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Raw decoding of a reply stream, as the client's reader sees it.
        let mut r = rest;
        while let Ok((_, m)) = read_msg(&mut r) {
            check_decoded(&m);
        }
        // Every message type's payload decoder on the same bytes.
        for kind in 0..=20u8 {
            if let Ok(m) = Msg::decode(kind, rest) {
                check_decoded(&m);
            }
        }
        return;
    }
    // The real Client against a scripted agent: ops come first (16 bytes).
    let (ops, script) = rest.split_at(rest.len().min(16));
    let l = listener();
    let addr = l.local_addr().unwrap();
    let script = script.to_vec();
    let server = std::thread::spawn(move || scripted_agent(listener(), script));
    let client = Client::connect(addr, VM, Role::Read, &READ_KEY, Duration::from_secs(2));
    if let Ok(mut c) = client {
        c.set_busy_poll(Duration::ZERO);
        for (i, &op) in ops.iter().enumerate() {
            let hook = u32::from(op >> 4);
            let len = u32::try_from(word(ops, i + 1) * 8 + 1).unwrap();
            let ok = match op % 6 {
                0 => c.describe().is_ok(),
                1 => match c.read(hook, 0, len) {
                    Ok(b) => {
                        assert_eq!(b.len(), len as usize);
                        true
                    }
                    Err(_) => false,
                },
                2 => {
                    let entries: Vec<BatchEntry> = (0..=word(ops, i + 1) % 5)
                        .map(|k| BatchEntry {
                            hook,
                            offset: k * 8,
                            len: u32::try_from(k + 1).unwrap(),
                        })
                        .collect();
                    match c.read_batch(&entries) {
                        Ok(parts) => {
                            assert_eq!(parts.len(), entries.len());
                            for (p, e) in parts.iter().zip(&entries) {
                                assert_eq!(p.len(), e.len as usize);
                            }
                            true
                        }
                        Err(_) => false,
                    }
                }
                3 => {
                    let total = u64::from(len) * 3;
                    let mut got = 0u64;
                    let r = c.read_bulk(hook, 0, total, len, 2, |b| got += b.len() as u64);
                    if r.is_ok() {
                        assert_eq!(got, total);
                    }
                    r.is_ok()
                }
                4 => c.cas(hook, 8, 1, 2).is_ok(),
                _ => c.write(hook, 0, &[7; 9]).is_ok(),
            };
            if !ok {
                break;
            }
        }
    }
    server.join().unwrap();
});
