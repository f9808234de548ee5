//! bdctl over RDMA verbs: the same watch, extraction and resume as over
//! the soft transport, with the data path on an RC queue pair that the
//! agent's NIC serves (Soft-RoCE in the lab: tests/lab/lab.sh). Needs an
//! RDMA device, and bdvmm and bdctl built with `--features verbs` (the
//! lab's are); elsewhere it says SKIP.

use std::time::Duration;

use bdvmm_tests::shop::{assert_three_consistent_sessions, bdctl, shop, Shop, Watch, T};
use bdvmm_tests::Vm;

fn rdma_device() -> Option<String> {
    std::fs::read_dir("/sys/class/infiniband")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
}

/// `bdctl status` of the shop over `transport`; a failure shows bdvmm's log.
fn status(s: &Shop, transport: &str) -> serde_json::Value {
    let (code, out, err) = bdctl(&[
        "status",
        &s.target(),
        "--key-file",
        s.keys.to_str().unwrap(),
        "--json",
        "--transport",
        transport,
    ]);
    assert_eq!(
        code,
        Some(0),
        "{out}{err}\n--- bdvmm stderr ---\n{}",
        s.vm.stderr()
    );
    serde_json::from_str(&out).unwrap()
}

fn extract(target: &str, keys: &str, transport: &str, out: &std::path::Path) -> serde_json::Value {
    let (code, _, err) = bdctl(&[
        "extract",
        target,
        "--key-file",
        keys,
        "--transport",
        transport,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

#[test]
fn bdctl_watches_extracts_and_resumes_over_verbs() {
    if rdma_device().is_none() {
        bdvmm_tests::skip(
            "bdctl_watches_extracts_and_resumes_over_verbs",
            "no RDMA device (/sys/class/infiniband is empty); `make lab` runs it against \
             Soft-RoCE (docs/rdma.md)",
        );
        return;
    }
    let s = shop(&[]);
    let target = s.target();
    let keys = s.keys.to_str().unwrap().to_owned();

    let st = status(&s, "verbs");
    assert_eq!(st["transport"], "verbs", "{st}");
    assert!(
        st["descriptor"]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b == "verbs"),
        "{st}"
    );
    // auto prefers verbs when the agent offers them.
    assert_eq!(status(&s, "auto")["transport"], "verbs");
    assert_eq!(status(&s, "soft")["transport"], "soft");

    // The same verdicts over verbs: healthy, then hung at OS level.
    let w = Watch::start(
        &target,
        &s.keys,
        &["--interval-ms", "100", "--transport", "verbs"],
    );
    w.verdict("healthy", T);
    s.control(1); // hang: ring 0, interrupts off, spinning
    let (_, e) = w.verdict("hung", T);
    assert_eq!(
        (e["level"].as_str(), e["counter"].as_str()),
        (Some("os"), Some("kernel")),
        "{e}"
    );
    drop(w);

    // Reading over verbs costs the guest nothing: with it paused (no guest
    // CPU at all), extraction works and the guest takes no exit.
    assert_eq!(s.vm.api("pause")["ok"], true);
    let exits_before: u64 = ["io_in", "io_out", "mmio_read", "mmio_write", "hlt"]
        .iter()
        .map(|r| s.vm.exits(r))
        .sum();
    let dir = tempfile::tempdir().unwrap();
    let over_verbs = extract(&target, &keys, "verbs", &dir.path().join("verbs.json"));
    let over_soft = extract(&target, &keys, "soft", &dir.path().join("soft.json"));
    for _ in 0..20 {
        let (code, out, err) = bdctl(&[
            "read",
            &target,
            "--key-file",
            &keys,
            "--transport",
            "verbs",
            "progress",
            "0",
            "4096",
        ]);
        assert_eq!(code, Some(0), "{out}{err}");
    }
    let exits_after: u64 = ["io_in", "io_out", "mmio_read", "mmio_write", "hlt"]
        .iter()
        .map(|r| s.vm.exits(r))
        .sum();
    assert_eq!(
        exits_before, exits_after,
        "reads over verbs made the guest exit"
    );
    assert_three_consistent_sessions(&over_verbs);
    assert_eq!(
        over_verbs["sessions"], over_soft["sessions"],
        "verbs and soft extract the same sessions"
    );
    assert_eq!(over_verbs["summary"], over_soft["summary"]);

    // A fresh instance takes the sessions over, the inbox written with
    // RDMA WRITEs (repair role).
    let mut fresh = Vm::test_guest(
        "svc",
        0,
        &[
            "--vcpus",
            "2",
            "--name",
            "shop2",
            "--backdoor-listen",
            "127.0.0.1:0",
            "--backdoor-keys",
            &keys,
        ],
    );
    fresh.wait_line("fresh instance", T);
    let addr2 = fresh.api("status")["agent_addr"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, out, err) = bdctl(&[
        "resume",
        &format!("shop2@{addr2}"),
        "--key-file",
        &keys,
        "--transport",
        "verbs",
        "--from",
        dir.path().join("verbs.json").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    for session in over_verbs["sessions"].as_array().unwrap() {
        let (id, stage) = (&session["session_id"], &session["stage"]);
        fresh.wait_line(&format!("resumed session {id} at stage {stage} "), T);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fresh.api("status")["state"], "running");
}
