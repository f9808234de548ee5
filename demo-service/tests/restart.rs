//! The crash/restart path: bdkv is SIGKILLed mid-work and restarted on the
//! same state file; every committed command survives with its version, a
//! record torn mid-write falls back to the previous version, corrupt
//! records are reported and skipped, and bad requests never stop it.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use backdoor_guest::{Device, HostConfig, HostLayout, ServiceArea};
use common::{hello, version, Server};

/// The slot (index in the service's area) holding session `id`'s newest
/// record, and that slot's byte offset in the state file.
fn newest_slot(state: &Path, id: u64) -> (u32, u64, u64) {
    let dev = Device::host(state, &HostConfig::default()).unwrap();
    let area = ServiceArea::open(&dev, "bdkv", 1, false).unwrap();
    let f = area
        .scan()
        .newest
        .into_iter()
        .find(|f| f.record.session_id == id)
        .expect("the session has a record");
    let l = dev.host_layout().unwrap();
    let at = l.sbox_offset + 4096 + u64::from(area.first_slot() + f.slot) * u64::from(l.slot_size);
    (f.slot, at, f.record.version)
}

fn poke(state: &Path, at: u64, data: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(state)
        .unwrap()
        .write_all_at(data, at)
        .unwrap();
}

#[test]
fn every_committed_set_survives_a_sigkill_mid_work_with_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = Server::start(&state, &[]);
    // Four clients write as fast as they can; each remembers the last SET
    // the server acknowledged (committed: its record was written first).
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let mut c = server.connect();
            std::thread::spawn(move || {
                let id = hello(&mut c);
                let mut acked: Option<(u32, u64)> = None;
                for j in 0u32.. {
                    match c.ok(&format!("SET k{} v{j}", j % 20)) {
                        Ok(r) => acked = Some((j, version(&r))),
                        Err(_) => break, // the server died under us
                    }
                }
                (id, acked.expect("at least one SET was acknowledged"))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Kill it while the clients are still sending: each finds out from a
    // failed request.
    server.kill9();
    let sessions: Vec<(u64, (u32, u64))> = workers.into_iter().map(|w| w.join().unwrap()).collect();

    let server = Server::start(&state, &[]);
    server.wait_log("4 sessions resumed");
    for (id, (j, v)) in sessions {
        let mut c = server.connect();
        let r = c.ok(&format!("RESUME {id}")).unwrap();
        let got: u64 = r.split(' ').nth(3).unwrap().parse().unwrap();
        // Version 1 is HELLO, and each SET adds one: SET number j is
        // version j + 2. One more SET may have been written whose OK
        // never reached the client; nothing acknowledged may be missing.
        assert_eq!(v, u64::from(j) + 2);
        assert!(
            got == v || got == v + 1,
            "session {id}: acked {v}, resumed {got}"
        );
        let last = if got == v { j } else { j + 1 };
        for jj in last.saturating_sub(19)..=last {
            assert_eq!(
                c.ok(&format!("GET k{}", jj % 20)).unwrap(),
                format!("v{jj}"),
                "session {id} key k{}",
                jj % 20
            );
        }
        // It goes on from there.
        assert_eq!(version(&c.ok("SET after restart").unwrap()), got + 1);
    }
}

#[test]
fn a_record_torn_mid_write_falls_back_to_the_previous_version() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = Server::start(&state, &[]);
    let mut c = server.connect();
    let id = hello(&mut c);
    assert_eq!(version(&c.ok("SET a 1").unwrap()), 2);
    assert_eq!(version(&c.ok("SET b 2").unwrap()), 3);
    server.kill9();

    // The write of version 3 "died" mid-way: its slot's seq is odd.
    let (slot, at, v) = newest_slot(&state, id);
    assert_eq!(v, 3);
    poke(&state, at, &5u64.to_le_bytes());

    let server = Server::start(&state, &[]);
    server.wait_log(&format!("slot {slot}: torn record"));
    let mut c = server.connect();
    assert_eq!(
        c.ok(&format!("RESUME {id}")).unwrap(),
        format!("session {id} version 2 keys 1")
    );
    assert_eq!(c.ok("GET a").unwrap(), "1");
    assert_eq!(c.request("GET b").unwrap(), vec!["ERR no key b"]);
    // The next version goes into the torn slot; the good one is kept.
    assert_eq!(version(&c.ok("SET c 3").unwrap()), 3);
    server.kill9();
    let (slot2, _, v2) = newest_slot(&state, id);
    assert_eq!((slot2, v2), (slot, 3));
    let server = Server::start(&state, &[]);
    let mut c = server.connect();
    c.ok(&format!("RESUME {id}")).unwrap();
    assert_eq!(c.request("LIST").unwrap(), vec!["OK 2", "a 1", "c 3"]);
}

#[test]
fn corrupt_records_are_reported_and_skipped_and_other_sessions_resume() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = Server::start(&state, &[]);
    let (mut c1, mut c2) = (server.connect(), server.connect());
    let (bad, good) = (hello(&mut c1), hello(&mut c2));
    c1.ok("SET x 1").unwrap();
    c2.ok("SET y 2").unwrap();
    server.kill9();
    // Both of the bad session's records get scribbled on (CRC fails).
    let (slot, at, _) = newest_slot(&state, bad);
    let other = if slot % 2 == 0 { at + 4096 } else { at - 4096 };
    poke(&state, at + 64, b"Z");
    poke(&state, other + 64, b"Z");
    let server = Server::start(&state, &[]);
    server.wait_log("corrupt record");
    server.wait_log("1 sessions resumed");
    let mut c = server.connect();
    assert_eq!(
        c.request(&format!("RESUME {bad}")).unwrap(),
        vec![format!("ERR no session {bad}")]
    );
    assert!(c.ok(&format!("RESUME {good}")).is_ok());
    assert_eq!(c.ok("GET y").unwrap(), "2");
}

#[test]
fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut server = Server::start(&state, &[]);
    let mut c = server.connect();
    let err = |c: &mut bdkv::client::Connection, line: &str| c.request(line).unwrap().remove(0);
    assert!(err(&mut c, "FROB").starts_with("ERR unknown command \"FROB\""));
    assert_eq!(
        err(&mut c, "SET a 1"),
        "ERR no session: send HELLO or RESUME <id> first"
    );
    assert_eq!(err(&mut c, "RESUME 12345"), "ERR no session 12345");
    assert!(err(&mut c, "RESUME banana").starts_with("ERR usage: RESUME"));
    let id = hello(&mut c);
    assert_eq!(err(&mut c, "HELLO"), format!("ERR already in session {id}"));
    assert!(err(&mut c, "SET bad\u{1}key v").starts_with("ERR bad key"));
    // Values are bounded by the slot: 4096 - 64 bytes of payload.
    let big = "x".repeat(2000);
    assert_eq!(version(&c.ok(&format!("SET big1 {big}")).unwrap()), 2);
    let e = err(&mut c, &format!("SET big2 {big}"));
    assert!(
        e.starts_with("ERR the session's state would be") && e.contains("over the 4032-byte limit"),
        "{e}"
    );
    assert!(c.ok("INFO").unwrap().contains("version 2 applied 1 keys 1"));
    assert!(err(&mut c, &format!("SET big3 {}", "y".repeat(3000))).starts_with("ERR bad value"));
    assert!(err(&mut c, &"z".repeat(10_000)).starts_with("ERR line too long"));
    assert_eq!(err(&mut c, "DEL nothing"), "ERR no key nothing");
    // Another connection cannot take an attached session.
    let mut c2 = server.connect();
    assert_eq!(
        err(&mut c2, &format!("RESUME {id}")),
        format!("ERR session {id} is attached to another connection")
    );
    // Raw garbage: not UTF-8, then a connection dropped mid-line.
    {
        let mut raw = std::net::TcpStream::connect(server.addr).unwrap();
        raw.write_all(b"\xff\xfe\n").unwrap();
        let mut buf = [0u8; 64];
        let n = raw.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ERR the request is not UTF-8\n");
        raw.write_all(b"SET half").unwrap();
    }
    assert_eq!(c.ok("PING").unwrap(), "pong");
    assert_eq!(c.ok("QUIT").unwrap(), "bye");
    // Detached, it can be resumed elsewhere, and END removes it for good.
    assert!(c2.ok(&format!("RESUME {id}")).is_ok());
    assert_eq!(c2.ok("END").unwrap(), format!("ended {id}"));
    let mut c3 = server.connect();
    assert_eq!(
        err(&mut c3, &format!("RESUME {id}")),
        format!("ERR no session {id}")
    );
    assert!(server.alive());
    server.kill9();
    let server = Server::start(&state, &[]);
    server.wait_log("0 sessions resumed");
}

#[test]
fn a_second_instance_on_the_same_state_is_refused_and_a_bad_state_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _server = Server::start(&state, &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bdkv"))
        .args(["serve", "--listen", "127.0.0.1:0", "--state-file"])
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");

    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![7u8; 10_000]).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bdkv"))
        .args(["serve", "--listen", "127.0.0.1:0", "--state-file"])
        .arg(&junk)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a usable backdoor state file"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bdkv"))
        .args(["serve", "--device", "/nonexistent/backdoor"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is backdoor.ko loaded?"), "{err}");
}

#[test]
fn counters_show_a_ticking_application_and_idle_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = Server::start(&state, &["--app-deadline-ms", "100"]);
    let mut c = server.connect();
    let id = hello(&mut c);
    c.ok("SET a 1").unwrap();
    let served = common::serve_file("kv1", &state, dir.path());
    let observe = || {
        let t = bdctl::target::Target::parse(&served.target, &served.key_file).unwrap();
        let mut client = t
            .connect(backdoor_agent::Role::Read, Duration::from_secs(2))
            .unwrap();
        bdctl::poll::observe(&mut client).unwrap().counters
    };
    let find = |cs: &[bdctl::judge::CounterObs], name: &str| {
        cs.iter()
            .find(|c| c.name() == name)
            .map(|c| c.counter)
            .unwrap_or_else(|| panic!("no counter {name}"))
    };
    let before = observe();
    let app = find(&before, "bdkv");
    assert_eq!(app.level(), Some(backdoor_abi::Level::Application));
    assert_eq!(app.state(), Some(backdoor_abi::CounterState::Active));
    assert_eq!(app.deadline_ms, 100);
    std::thread::sleep(Duration::from_millis(200));
    let after = observe();
    assert!(
        find(&after, "bdkv").value > app.value,
        "the main loop ticks"
    );
    // The client waits: its session's counter is IDLE, never "hung".
    let s = find(&after, &format!("bdkv-{id}"));
    assert_eq!(s.level(), Some(backdoor_abi::Level::Session));
    assert_eq!(s.state(), Some(backdoor_abi::CounterState::Idle));
    assert!(s.value > 0);
    let _ = HostLayout::read(&state).unwrap();
}
