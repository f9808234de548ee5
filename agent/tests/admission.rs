//! The agent against hostile networks (docs/wire.md "The encrypted
//! channel" and "Admission"): a relay between monitor and agent that
//! alters, replays or injects records gets nothing accepted and changes no
//! guest byte, and sees no guest byte in the clear; strangers holding sockets open, trickling bytes
//! or claiming huge frames neither lock a monitor out nor keep their
//! sockets past the handshake deadline; an idle monitor gives its slot
//! back.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use backdoor_agent::channel::{Initiator, AEAD_TAG};
use backdoor_agent::wire::{read_msg, write_msg, Msg, WireError, HEADER_LEN, VERSION};
use backdoor_agent::{ClientError, ErrorCode, Role};
use common::{client, fake_guest, pattern, serve, PROGRESS, REPAIR};

/// What a relay does to the frames of one direction: given the frame's
/// index, the frames seen so far and the frame, what to send instead.
type Tamper = Box<dyn Fn(usize, &[Vec<u8>], Vec<u8>) -> Vec<u8> + Send>;

fn pass() -> Tamper {
    Box::new(|_, _, f| f)
}

/// Reads one cleartext handshake frame (HELLO, ACCEPT) from `r`.
fn frame(r: &mut TcpStream) -> Option<Vec<u8>> {
    let mut f = vec![0u8; HEADER_LEN];
    r.read_exact(&mut f).ok()?;
    let len = u32::from_le_bytes(f[12..16].try_into().unwrap()) as usize;
    f.resize(HEADER_LEN + len, 0);
    r.read_exact(&mut f[HEADER_LEN..]).ok()?;
    Some(f)
}

/// Reads one encrypted record (its 2-byte length and ciphertext); every
/// small frame is one record.
fn record(r: &mut TcpStream) -> Option<Vec<u8>> {
    let mut f = vec![0u8; 2];
    r.read_exact(&mut f).ok()?;
    let len = usize::from(u16::from_le_bytes([f[0], f[1]]));
    f.resize(2 + len, 0);
    r.read_exact(&mut f[2..]).ok()?;
    Some(f)
}

/// Relays the handshake frame, then every record, through `tamper`
/// (index 0 is the handshake frame, 1 the first record).
fn relay_direction(mut from: TcpStream, mut to: TcpStream, tamper: Tamper) {
    let mut seen = Vec::new();
    while let Some(f) = if seen.is_empty() {
        frame(&mut from)
    } else {
        record(&mut from)
    } {
        let out = tamper(seen.len(), &seen, f.clone());
        seen.push(f);
        if to.write_all(&out).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A relay on its own port in front of `agent`, for one connection.
fn relay(agent: SocketAddr, requests: Tamper, replies: Tamper) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let (monitor, _) = l.accept().unwrap();
        let upstream = TcpStream::connect(agent).unwrap();
        let (m2, u2) = (monitor.try_clone().unwrap(), upstream.try_clone().unwrap());
        thread::spawn(move || relay_direction(m2, u2, requests));
        relay_direction(upstream, monitor, replies);
    });
    addr
}

fn is_integrity(e: &ClientError) -> bool {
    matches!(e, ClientError::Wire(WireError::Integrity))
}

#[test]
fn a_reply_altered_or_replayed_on_the_way_is_refused_by_the_monitor() {
    let g = fake_guest();
    let agent = serve(common::agent(g.mem.clone()));
    let want = pattern()[..8].to_vec();
    // Reply 0 is ACCEPT; 1 is WELCOME; 2 the first READ_OK.
    let flip: Tamper = Box::new(|i, _, mut f| {
        if i == 2 {
            f[2] ^= 1;
        }
        f
    });
    let mut c = client(relay(agent, pass(), flip), Role::Read);
    let e = c.read(PROGRESS.0, 0, 8).unwrap_err();
    assert!(is_integrity(&e), "a flipped byte got through: {e:?}");

    // The second READ_OK replaced by the first, byte for byte.
    let replay: Tamper = Box::new(|i, seen, f| if i == 3 { seen[2].clone() } else { f });
    let mut c = client(relay(agent, pass(), replay), Role::Read);
    assert_eq!(c.read(PROGRESS.0, 0, 8).unwrap(), want);
    let e = c.read(PROGRESS.0, 0, 8).unwrap_err();
    assert!(is_integrity(&e), "a replayed reply got through: {e:?}");

    // The WELCOME itself (the descriptor) altered: refused at connect.
    let forge: Tamper = Box::new(|i, _, mut f| {
        if i == 1 {
            let n = f.len() - AEAD_TAG - 1;
            f[n] ^= 0x20;
        }
        f
    });
    let key = backdoor_agent::auth::decode_hex(common::READ_KEY).unwrap();
    let e = backdoor_agent::Client::connect(
        relay(agent, pass(), forge),
        "vm1",
        Role::Read,
        &key,
        common::TIMEOUT,
    )
    .unwrap_err();
    assert!(is_integrity(&e), "an altered descriptor got through: {e:?}");

    // A relay that only listens sees no guest byte: not the descriptor's
    // hook names, not the bytes a READ returns.
    let heard = Arc::new(Mutex::new(Vec::new()));
    let tap: Tamper = {
        let heard = heard.clone();
        Box::new(move |_, _, f| {
            heard.lock().unwrap().extend_from_slice(&f);
            f
        })
    };
    let mut c = client(relay(agent, pass(), tap), Role::Read);
    let secret = c.read(PROGRESS.0, 0, 64).unwrap();
    assert_eq!(secret, pattern()[..64]);
    drop(c);
    thread::sleep(Duration::from_millis(100));
    let heard = heard.lock().unwrap();
    assert!(
        !heard
            .windows(16)
            .any(|w| secret.windows(16).any(|s| s == w)),
        "guest bytes crossed the relay in the clear"
    );
    assert!(
        !heard.windows(8).any(|w| w == b"progress"),
        "the descriptor crossed the relay in the clear"
    );
}

#[test]
fn a_write_replayed_or_forged_on_the_way_changes_no_guest_byte() {
    let g = fake_guest();
    let agent = serve(common::agent(g.mem.clone()));
    let at = REPAIR.1 + 16;
    // Requests 1 and 2 are two WRITEs; request 3 (a READ) is replaced by
    // request 1 again: the old value would come back if it were accepted.
    let replay: Tamper = Box::new(|i, seen, f| if i == 3 { seen[1].clone() } else { f });
    let mut c = client(relay(agent, replay, pass()), Role::Repair);
    c.write(REPAIR.0, 16, b"AAAAAAAA").unwrap();
    c.write(REPAIR.0, 16, b"BBBBBBBB").unwrap();
    assert!(
        c.read(REPAIR.0, 16, 8).is_err(),
        "the agent answered a replayed WRITE"
    );
    let mut now = [0u8; 8];
    assert!(g.mem.read(at, &mut now));
    assert_eq!(&now, b"BBBBBBBB", "a replayed WRITE landed");

    // A WRITE made up by the relay, as a record it cannot encrypt, in
    // place of the monitor's READ.
    let forged = {
        let mut f = vec![0u8; 2];
        write_msg(
            &mut f,
            9,
            &Msg::Write {
                generation: 3,
                hook: REPAIR.0,
                offset: 16,
                data: b"EVILEVIL".to_vec(),
            },
        )
        .unwrap();
        f.extend_from_slice(&[0u8; AEAD_TAG]);
        let len = u16::try_from(f.len() - 2).unwrap();
        f[..2].copy_from_slice(&len.to_le_bytes());
        f
    };
    let inject: Tamper = Box::new(move |i, _, f| if i == 1 { forged.clone() } else { f });
    let mut c = client(relay(agent, inject, pass()), Role::Repair);
    assert!(
        c.read(REPAIR.0, 16, 8).is_err(),
        "the agent answered a forged WRITE"
    );
    assert!(g.mem.read(at, &mut now));
    assert_eq!(&now, b"BBBBBBBB", "a forged WRITE landed");
    // The agent itself is unharmed: a direct monitor reads on.
    let mut direct = client(agent, Role::Read);
    assert_eq!(direct.read(REPAIR.0, 16, 8).unwrap(), b"BBBBBBBB");
}

/// Whether the agent has closed `s` (end of file, or a reset).
fn closed_by_agent(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {} // a refusal frame before the close
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn a_thousand_trickling_strangers_neither_lock_a_monitor_out_nor_outlive_the_deadline() {
    const STRANGERS: usize = 1000;
    const DEADLINE: Duration = Duration::from_secs(2);
    let files = backdoor_agent::handshake::raise_open_file_limit();
    assert!(files >= 4 * STRANGERS as u64, "{files} open files allowed");
    let g = fake_guest();
    let agent = serve(common::agent(g.mem.clone()).with_handshake_deadline(DEADLINE));
    let strangers: Vec<TcpStream> = (0..STRANGERS)
        .map(|_| TcpStream::connect(agent).unwrap())
        .collect();
    let stop = Arc::new(Mutex::new(false));
    // One byte of a HELLO header per stranger every 200 ms: a whole
    // header would take 3.2 s, past the deadline.
    let trickle = {
        let socks: Vec<TcpStream> = strangers.iter().map(|s| s.try_clone().unwrap()).collect();
        let stop = stop.clone();
        thread::spawn(move || {
            let header = [
                0x42u8, 0x44, 0x57, 0x31, VERSION, 1, 0, 0, 0, 0, 0, 0, 99, 0, 0, 0,
            ];
            for b in header.iter().cycle() {
                if *stop.lock().unwrap() {
                    break;
                }
                for mut s in &socks {
                    let _ = s.write(&[*b]);
                }
                thread::sleep(Duration::from_millis(200));
            }
        })
    };
    // Meanwhile monitors come and go as usual.
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let mut c = client(agent, Role::Read);
        assert_eq!(c.read(PROGRESS.0, 0, 8).unwrap(), pattern()[..8]);
        worst = worst.max(t.elapsed());
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("admission: the slowest of 10 monitor connects + reads under {STRANGERS} trickling strangers: {worst:?}");
    // Past the deadline every stranger has been cut off.
    let deadline = Instant::now() + DEADLINE * 5;
    let mut open: Vec<TcpStream> = strangers;
    while !open.is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        open.retain_mut(|s| !closed_by_agent(s));
    }
    *stop.lock().unwrap() = true;
    trickle.join().unwrap();
    assert!(
        open.is_empty(),
        "{} of {STRANGERS} strangers still connected {:?} after the handshake deadline",
        open.len(),
        DEADLINE * 5
    );
}

#[test]
fn a_stranger_claiming_a_large_frame_is_refused_before_anything_is_allocated() {
    let g = fake_guest();
    let agent = serve(common::agent(g.mem.clone()));
    let mut s = TcpStream::connect(agent).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // A HELLO header claiming 1 MiB: refused at the header (the deadline
    // is 5 s: a reply within 3 s was not a timeout).
    let mut h = vec![0x42u8, 0x44, 0x57, 0x31, VERSION, 1, 0, 0, 0, 0, 0, 0];
    h.extend_from_slice(&(1u32 << 20).to_le_bytes());
    s.write_all(&h).unwrap();
    match read_msg(&mut s) {
        Ok((_, Msg::Error { code, .. })) => assert_eq!(code, ErrorCode::BadRequest),
        other => panic!("expected BAD_REQUEST, got {other:?}"),
    }
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "not closed");
    // A HELLO followed by anything before ACCEPT (here a huge frame's
    // header): the same, even with the right key.
    let key = backdoor_agent::auth::decode_hex(common::READ_KEY).unwrap();
    let (_, noise) = Initiator::start(&key, "vm1", Role::Read).unwrap();
    let mut s = TcpStream::connect(agent).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut hello = Vec::new();
    write_msg(
        &mut hello,
        0,
        &Msg::Hello {
            vm: "vm1".into(),
            role: Role::Read,
            noise,
        },
    )
    .unwrap();
    hello.extend_from_slice(&[0xff, 0xff]);
    s.write_all(&hello).unwrap();
    assert!(matches!(
        read_msg(&mut s),
        Ok((
            _,
            Msg::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        ))
    ));
    // A stranger's HELLO under a key it made up: refused at once.
    let (_, noise) = Initiator::start(b"made-up-key-16-b", "vm1", Role::Read).unwrap();
    let mut s = TcpStream::connect(agent).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    write_msg(
        &mut s,
        0,
        &Msg::Hello {
            vm: "vm1".into(),
            role: Role::Read,
            noise,
        },
    )
    .unwrap();
    assert!(matches!(
        read_msg(&mut s),
        Ok((
            _,
            Msg::Error {
                code: ErrorCode::AuthFailed,
                ..
            }
        ))
    ));
}

#[test]
fn an_idle_monitor_is_closed_and_its_slot_goes_to_the_next() {
    const IDLE: Duration = Duration::from_secs(1);
    let g = fake_guest();
    let agent = serve(
        common::agent(g.mem.clone())
            .with_max_connections(1)
            .with_idle_timeout(IDLE),
    );
    let mut first = client(agent, Role::Read);
    assert!(first.read(PROGRESS.0, 0, 8).is_ok());
    let key = backdoor_agent::auth::decode_hex(common::READ_KEY).unwrap();
    let busy = backdoor_agent::Client::connect(agent, "vm1", Role::Read, &key, common::TIMEOUT)
        .unwrap_err();
    assert_eq!(busy.code(), Some(ErrorCode::Busy), "{busy}");
    thread::sleep(IDLE * 3);
    assert!(
        first.read(PROGRESS.0, 0, 8).is_err(),
        "an idle monitor kept its connection"
    );
    let mut next = client(agent, Role::Read);
    assert_eq!(next.read(PROGRESS.0, 0, 8).unwrap(), pattern()[..8]);
}

#[test]
fn keys_rotate_without_restarting_the_agent() {
    let dir = std::env::temp_dir().join(format!("bd-rotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.toml");
    std::fs::write(&path, format!("read = \"{}\"\n", common::READ_KEY)).unwrap();
    let g = fake_guest();
    let agent = serve(
        common::agent(g.mem.clone())
            .with_key_file(backdoor_agent::auth::KeyFile::load(&path).unwrap()),
    );
    let mut before = client(agent, Role::Read);
    // The operator writes a new key file (in place of the old: rename).
    const NEW: &str = "0123456789abcdef0123456789abcdef";
    let tmp = dir.join("keys.toml.new");
    std::fs::write(&tmp, format!("read = \"{NEW}\"\n")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let connect = |hex: &str| {
        let key = backdoor_agent::auth::decode_hex(hex).unwrap();
        backdoor_agent::Client::connect(agent, "vm1", Role::Read, &key, common::TIMEOUT)
    };
    let old = connect(common::READ_KEY).unwrap_err();
    assert_eq!(old.code(), Some(ErrorCode::AuthFailed), "{old:?}");
    let mut after = connect(NEW).unwrap();
    assert_eq!(after.read(PROGRESS.0, 0, 8).unwrap(), pattern()[..8]);
    // A connection made with the old key keeps working.
    assert_eq!(before.read(PROGRESS.0, 0, 8).unwrap(), pattern()[..8]);
    // A broken file leaves the keys in force.
    std::fs::write(&path, "read = \"not hex\"\n").unwrap();
    assert!(connect(NEW).is_ok(), "a bad key file took the keys away");
    let _ = std::fs::remove_dir_all(&dir);
}
