//! `bdctl extract`'s parsing of state boxes, end to end: guest-chosen
//! bytes in a state box (header and slots), served by the real agent over
//! loopback TCP, extracted by the real monitor code. Invariants: nothing
//! panics and extraction succeeds (a bad box is a reported problem, not
//! an error); the summary adds up; every extracted session is a record
//! that validates from the bytes in guest RAM, and it is the newest valid
//! version of its (service, session).
#![no_main]

use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use backdoor_abi::record::validate;
use backdoor_abi::{SboxHeader, LINE};
use backdoor_agent::{Agent, Client, GuestMemory, Role};
use bdvmm_fuzz::{agent, READ_KEY, VM};
use libfuzzer_sys::fuzz_target;

/// The "sessions" state box of the fixture table.
const BOX_GPA: u64 = 0x1_0000;
const BOX_LEN: usize = 0x1_0000;

struct Fixture {
    mem: Arc<GuestMemory>,
    _agent: Arc<Agent>,
    addr: std::net::SocketAddr,
    client: Mutex<Option<Client>>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (mem, agent) = agent();
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().unwrap();
        agent.clone().serve(l).expect("serve");
        Fixture {
            mem,
            _agent: agent,
            addr,
            client: Mutex::new(None),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut image = vec![0u8; BOX_LEN];
    let n = data.len().min(BOX_LEN);
    image[..n].copy_from_slice(&data[..n]);
    assert!(f.mem.write(BOX_GPA, &image));
    let mut slot = f.client.lock().unwrap();
    if slot.is_none() {
        *slot = Some(
            Client::connect(f.addr, VM, Role::Read, &READ_KEY, Duration::from_secs(10))
                .expect("connect to the in-process agent"),
        );
    }
    let c = slot.as_mut().unwrap();
    let x = match bdctl::extract::extract(c, None, &mut |_, _| {}) {
        Ok(x) => x,
        Err(e) => panic!("extraction of a still guest failed: {e}"),
    };
    let s = x.summary;
    assert_eq!(s.slots, s.empty + s.accepted + s.torn + s.corrupt, "{s:?}");
    assert_eq!(s.retried, 0, "nothing moves: nothing needs a re-read");
    let hdr = SboxHeader::from_bytes(image[..LINE].try_into().unwrap());
    for sess in &x.sessions {
        if sess.hook != "sessions" {
            continue; // the other (all-zero) state box holds nothing
        }
        let size = hdr.slot_size as usize;
        let at = usize::from(hdr.header_size) + usize::try_from(sess.slot).unwrap() * size;
        let bytes = &image[at..at + size];
        let seq = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let r = validate(bytes, seq).expect("an extracted session validates from guest RAM");
        assert_eq!(
            (r.session_id, r.version, r.stage, r.service.as_str()),
            (
                sess.session_id,
                sess.version,
                sess.stage,
                sess.service.as_str()
            )
        );
        assert_eq!(sess.payload().unwrap(), r.payload);
        // The newest valid version of that session.
        for i in 0..u64::from(hdr.slot_count) {
            let at = usize::from(hdr.header_size) + usize::try_from(i).unwrap() * size;
            let b = &image[at..at + size];
            let seq = u64::from_le_bytes(b[..8].try_into().unwrap());
            if seq == 0 || seq % 2 == 1 {
                continue;
            }
            if let Ok(o) = validate(b, seq) {
                if o.service == r.service && o.session_id == r.session_id {
                    assert!(o.version <= r.version, "an older version was kept");
                }
            }
        }
    }
});
