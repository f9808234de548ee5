//! Session recovery across instances, through bdctl's own code: an
//! instance dies; `bdctl extract` reads its state box over the backdoor
//! (an agent serving its state file as guest memory); a fresh instance
//! adopts the sessions from the extraction file (`--resume-from`) or from
//! its inbox after `bdctl resume` (`--inbox`), with their ids, contents
//! and versions.

mod common;

use bdkv::adopt::Extraction;
use common::{bdctl, serve_file, Server};

/// Starts an instance, loads `n` sessions of `m` SETs, kills it, and
/// extracts its sessions with bdctl into `<dir>/sessions.json`.
fn crashed_instance_extracted(dir: &std::path::Path, n: u32, m: u32) -> (String, String) {
    let state = dir.join("a.state");
    let server = Server::start(&state, &[]);
    let mut expect = Vec::new();
    bdkv::client::load(server.addr, n, m, &mut expect).unwrap();
    server.kill9();
    let a = serve_file("vmA", &state, dir);
    let out = dir.join("sessions.json");
    bdctl(&[
        "extract",
        &a.target,
        "--key-file",
        a.key_file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    (
        String::from_utf8(expect).unwrap(),
        out.to_str().unwrap().to_owned(),
    )
}

fn check(server: &Server, expect: &str) -> usize {
    let mut out = Vec::new();
    bdkv::client::check(server.addr, expect.as_bytes(), &mut out).unwrap()
}

#[test]
fn sessions_of_a_dead_instance_resume_elsewhere_from_a_bdctl_extraction() {
    let dir = tempfile::tempdir().unwrap();
    let (expect, json) = crashed_instance_extracted(dir.path(), 3, 4);
    // bdctl's file, as bdctl wrote it, read with both sides' types.
    let text = std::fs::read_to_string(&json).unwrap();
    let theirs: bdctl::extract::Extraction = serde_json::from_str(&text).unwrap();
    let ours: Extraction = serde_json::from_str(&text).unwrap();
    assert_eq!(theirs.sessions.len(), 3);
    assert_eq!(ours.sessions.len(), 3);
    assert_eq!(theirs.summary.corrupt + theirs.summary.torn, 0);
    assert!(theirs.sessions[0]
        .payload_text
        .as_deref()
        .unwrap()
        .starts_with("bdkv/1 applied=4 keys=4\n"));

    let b = Server::start(&dir.path().join("b.state"), &["--resume-from", &json]);
    b.wait_log("3 sessions adopted");
    assert_eq!(check(&b, &expect), 3);
    // The adopted sessions are B's own now: they survive B's crash too.
    let mut c = b.connect();
    let id = expect.split(' ').next().unwrap();
    c.ok(&format!("RESUME {id}")).unwrap();
    assert_eq!(common::version(&c.ok("SET more 1").unwrap()), 6);
    b.kill9();
    let b = Server::start(&dir.path().join("b.state"), &["--resume-from", &json]);
    b.wait_log("0 sessions adopted, 0 updated, 3 already held");
    let mut c = b.connect();
    assert_eq!(
        c.ok(&format!("RESUME {id}")).unwrap(),
        format!("session {id} version 6 keys 5")
    );
}

#[test]
fn sessions_arrive_through_the_inbox_with_bdctl_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (expect, json) = crashed_instance_extracted(dir.path(), 2, 3);
    let state = dir.path().join("c.state");
    let c = Server::start(&state, &["--inbox"]);
    c.wait_log("0 delivered");
    let served = serve_file("vmC", &state, dir.path());
    bdctl(&[
        "resume",
        &served.target,
        "--key-file",
        served.key_file.to_str().unwrap(),
        "--from",
        &json,
        "--hook",
        "inbox",
        "--slot-size",
        &served.layout.inbox_slot_size.to_string(),
    ])
    .unwrap();
    // The running instance sees the doorbell and adopts them.
    c.wait_log("inbox: doorbell 2: 2 new");
    assert_eq!(check(&c, &expect), 2);
    // A second hand-off into the same inbox is refused by bdctl: the
    // inbox is claimed by the first (a driver's inbox takes one).
    let again = bdctl(&[
        "resume",
        &served.target,
        "--key-file",
        served.key_file.to_str().unwrap(),
        "--from",
        &json,
        "--hook",
        "inbox",
        "--slot-size",
        "4096",
    ]);
    assert!(again
        .unwrap_err()
        .to_string()
        .contains("fenced off: the inbox is claimed by fencing token 1"));
    // Restarted, it finds them in its own area (and the inbox again: no-op).
    c.kill9();
    let c = Server::start(&state, &["--inbox"]);
    c.wait_log("2 sessions resumed from its own area");
    assert_eq!(check(&c, &expect), 2);
}

#[test]
fn bad_hand_off_files_and_records_are_reported_and_the_server_still_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (expect, json) = crashed_instance_extracted(dir.path(), 1, 2);
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{ this is not json").unwrap();
    let missing = dir.path().join("missing.json");
    // A real extraction, with records that must not be adopted added.
    let mut x: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let good = x["sessions"][0].clone();
    let variant = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let sessions = x["sessions"].as_array_mut().unwrap();
    sessions.push(variant(&|s| {
        s["session_id"] = 1001.into();
        s["payload_hex"] = "zz".into();
    }));
    sessions.push(variant(&|s| {
        s["session_id"] = 1002.into();
        s["payload_hex"] = hex("items=3 total=6").into();
    }));
    sessions.push(variant(&|s| {
        s["session_id"] = 1003.into();
        s["stage"] = 99.into();
    }));
    sessions.push(variant(&|s| {
        s["session_id"] = 1004.into();
        s["service"] = "shop".into();
    }));
    let mixed = dir.path().join("mixed.json");
    std::fs::write(&mixed, x.to_string()).unwrap();

    let s = Server::start(
        &dir.path().join("d.state"),
        &[
            "--resume-from",
            garbage.to_str().unwrap(),
            "--resume-from",
            missing.to_str().unwrap(),
            "--resume-from",
            mixed.to_str().unwrap(),
        ],
    );
    let log = s.wait_log("1 sessions adopted");
    for want in [
        "garbage.json is not a bdctl extraction",
        "cannot read",
        "session 1001 not adopted: payload_hex is not hex",
        "session 1002 not adopted: its payload is not a bdkv continuation",
        "session 1003 not adopted: its stage 99 does not match",
        "3 rejected, 1 of other services",
    ] {
        assert!(log.contains(want), "no {want:?} in:\n{log}");
    }
    assert_eq!(check(&s, &expect), 1);
    let mut c = s.connect();
    assert_eq!(
        c.request("RESUME 1002").unwrap(),
        vec!["ERR no session 1002"]
    );
}

/// bdkv reads bdctl's output with its own serde types: every field it
/// needs must exist in bdctl's `Session`, with the same meaning.
#[test]
fn the_extraction_types_match_bdctls() {
    let theirs = bdctl::extract::Extraction {
        vm: "vm9".into(),
        generation: 7,
        sealed: true,
        summary: bdctl::extract::Summary::default(),
        sessions: vec![bdctl::extract::Session {
            service: "bdkv".into(),
            session_id: u64::MAX - 1,
            version: 1 << 40,
            stage: 3,
            payload_hex: "6869".into(),
            payload_text: Some("hi".into()),
            hook: "sessions".into(),
            slot: 5,
        }],
        problems: vec![],
    };
    let ours: Extraction = serde_json::from_value(serde_json::to_value(&theirs).unwrap()).unwrap();
    assert_eq!((ours.vm.as_str(), ours.generation), ("vm9", 7));
    let s = &ours.sessions[0];
    assert_eq!(
        (
            s.service.as_str(),
            s.session_id,
            s.version,
            s.stage,
            s.payload_hex.as_str()
        ),
        ("bdkv", u64::MAX - 1, 1 << 40, 3, "6869")
    );
    let rec = ours.records().remove(0).unwrap();
    assert_eq!(rec.payload, b"hi");
}
