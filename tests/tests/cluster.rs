//! Cluster mode against a real etcd: three monitors share a dozen targets
//! (balanced, each owned by one), a dead monitor's targets are owned
//! again within its lease, a hang is recovered by exactly one monitor
//! (one incident, one extraction, one hand-over), and a monitor cut off
//! (a network namespace whose link goes down) while it holds a hang's
//! incident is fenced off: the receiver refuses its late hand-over.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bdvmm_tests::etcd::Etcd;
use bdvmm_tests::fake_guest::{self, Healthy};
use bdvmm_tests::netns::Netns;
use bdvmm_tests::shop::{bdctl, bdctl_bin, control, Watch, T};
use bdvmm_tests::{keys, Vm};

const TTL_MS: u64 = 2000;

fn etcd_or_skip(test: &str) -> bool {
    if bdvmm_tests::etcd::binary().is_none() {
        bdvmm_tests::skip(test, "etcd is not installed (tools/deps.sh ensure test)");
        return false;
    }
    true
}

/// `bdctl targets ls --json`: target name -> owner (None: unowned).
fn owners(etcd: &str) -> BTreeMap<String, Option<String>> {
    let (code, out, err) = bdctl(&["targets", "ls", "--json", "--etcd", etcd]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["owner"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn incidents(etcd: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = bdctl(&["incidents", "--json", "--etcd", etcd]);
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Waits until `pred` holds of the owners; returns them.
fn wait_owners(
    etcd: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&BTreeMap<String, Option<String>>) -> bool,
) -> BTreeMap<String, Option<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let o = owners(etcd);
        if pred(&o) {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {timeout:?}: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn loads(o: &BTreeMap<String, Option<String>>) -> BTreeMap<String, usize> {
    let mut l = BTreeMap::new();
    for m in o.values().flatten() {
        *l.entry(m.clone()).or_default() += 1;
    }
    l
}

fn monitor(cmd_prefix: &[&str], etcd: &str, id: &str, env: &[(&str, &Path)]) -> Watch {
    let mut cmd = match cmd_prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bdctl_bin());
            c
        }
        None => Command::new(bdctl_bin()),
    };
    cmd.args(["watch", "--json", "--etcd", etcd, "--monitor-id", id])
        .args(["--lease-ttl-ms", &TTL_MS.to_string()])
        .args([
            "--interval-ms",
            "100",
            "--timeout-ms",
            "500",
            "--grace-ms",
            "60000",
        ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Watch::spawn(cmd)
}

fn svc(name: &str, listen: &str, keys: &Path, vcpus: &str, ready: &str) -> (Vm, String) {
    let mut vm = Vm::test_guest(
        "svc",
        0,
        &[
            "--name",
            name,
            "--vcpus",
            vcpus,
            "--backdoor-listen",
            listen,
            "--backdoor-keys",
            keys.to_str().unwrap(),
        ],
    );
    vm.wait_line(ready, T);
    let addr = vm.api("status")["agent_addr"].as_str().unwrap().to_owned();
    (vm, addr)
}

#[test]
fn three_monitors_share_a_dozen_targets_recover_a_hang_once_and_take_over_a_dead_ones() {
    if !etcd_or_skip(
        "three_monitors_share_a_dozen_targets_recover_a_hang_once_and_take_over_a_dead_ones",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start("127.0.0.1");
    let fake_keys = fake_guest::write_key_file(dir.path());
    let shop_keys = keys::write_file(dir.path());
    // Eleven healthy targets without a VM, and the shop, a real guest.
    let fakes: Vec<(String, Healthy)> = (0..11)
        .map(|i| {
            let name = format!("t{i:02}");
            let h = Healthy::start(&name, "127.0.0.1:0", 1000, Duration::from_millis(20));
            (name, h)
        })
        .collect();
    let (shop_vm, shop_addr) = svc(
        "shop1",
        "127.0.0.1:0",
        &shop_keys,
        "1",
        "svc: serving sessions",
    );
    let (mut spare, spare_addr) = svc(
        "spare",
        "127.0.0.1:0",
        &shop_keys,
        "2",
        "svc: fresh instance",
    );
    let mut add = vec![
        "targets".to_owned(),
        "add".into(),
        "--etcd".into(),
        etcd.url.clone(),
    ];
    add.extend(["--key-file".into(), fake_keys.display().to_string()]);
    add.extend(fakes.iter().map(|(n, h)| format!("{n}@{}", h.addr)));
    let args: Vec<&str> = add.iter().map(String::as_str).collect();
    let (code, _, err) = bdctl(&args);
    assert_eq!(code, Some(0), "{err}");
    let shop_target = format!("shop1@{shop_addr}");
    let spare_target = format!("spare@{spare_addr}");
    let (code, _, err) = bdctl(&[
        "targets",
        "add",
        "--etcd",
        &etcd.url,
        &shop_target,
        "--key-file",
        shop_keys.to_str().unwrap(),
        "--resume-to",
        &spare_target,
        "--resume-hook",
        "control",
        "--resume-slot-size",
        "256",
    ]);
    assert_eq!(code, Some(0), "{err}");

    let mut mons: BTreeMap<String, Watch> = ["m0", "m1", "m2"]
        .iter()
        .map(|id| (id.to_string(), monitor(&[], &etcd.url, id, &[])))
        .collect();
    // Balanced: 12 targets, 4 each, every one owned.
    let o = wait_owners(&etcd.url, "12 targets owned 4 by each monitor", T, |o| {
        o.len() == 12
            && o.values().all(Option::is_some)
            && loads(o).values().all(|n| *n == 4)
            && loads(o).len() == 3
    });
    let shop_owner = o["shop1"].clone().unwrap();
    mons[&shop_owner].verdict("healthy", T);

    // A hang: exactly one monitor opens the incident, extracts and hands over.
    control(&shop_addr, bdvmm_tests::shop::cmd::SPIN);
    let (_, e) = mons[&shop_owner].wait("the hand-over", T, |e| {
        e["event"] == "resumed" || e["event"] == "action_failed"
    });
    assert_eq!(e["event"], "resumed", "{e}");
    assert_eq!(e["to"], "spare");
    let token = e["token"].as_u64().unwrap();
    spare.wait_line(
        &format!("svc: took the hand-over from shop1 under fencing token {token}"),
        T,
    );
    mons[&shop_owner].wait("the incident's end", T, |e| {
        e["event"] == "incident" && e["state"] == "done"
    });
    let list = incidents(&etcd.url);
    assert_eq!(list.len(), 1, "{list:?}");
    let inc = &list[0];
    assert_eq!(inc["target"], "shop1");
    assert_eq!(inc["state"], "done");
    assert_eq!(inc["monitor"], shop_owner.as_str());
    assert_eq!(inc["token"], token);
    let steps: Vec<&str> = inc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["opened", "extracted", "resuming", "resumed", "done"],
        "{inc}"
    );
    // Nobody else acted (while the monitors joined, shop1 may have been
    // another's for a moment, healthy then).
    let acting = [
        "incident",
        "evidence",
        "extracted",
        "resuming",
        "resumed",
        "fenced",
        "action_failed",
    ];
    for (id, w) in &mons {
        if *id != shop_owner {
            let seen = w.collect(Duration::from_millis(200));
            let acted: Vec<_> = seen
                .iter()
                .filter(|e| e["target"] == "shop1")
                .filter(|e| {
                    acting.contains(&e["event"].as_str().unwrap_or(""))
                        || (e["event"] == "verdict"
                            && ["hung", "lost", "corrupt"]
                                .contains(&e["verdict"].as_str().unwrap_or("")))
                })
                .collect();
            assert!(acted.is_empty(), "{id}: {acted:?}");
        }
    }

    // The shop's owner dies: its four targets are owned again within the
    // lease (plus a round of the survivors' loops), by the two others.
    let dead = shop_owner.clone();
    let w = mons.remove(&dead).unwrap();
    let killed = Instant::now();
    drop(w); // SIGKILL
    let o = wait_owners(
        &etcd.url,
        "the dead monitor's targets owned again",
        T,
        |o| {
            o.values().all(|m| m.as_ref().is_some_and(|m| *m != dead))
                && loads(o).values().all(|n| *n == 6)
        },
    );
    let took = killed.elapsed();
    eprintln!(
        "cluster: a dead monitor's targets owned again after {took:?} (lease TTL {TTL_MS} ms)"
    );
    // A bound a loaded machine keeps: the TTL, the survivors' rounds, and
    // bdctl's own start-up for each `targets ls` here.
    assert!(took < Duration::from_millis(TTL_MS * 5), "{took:?}");
    // The new owner of the still-hung shop finds its incident done, and
    // does not recover it again.
    let new_owner = o["shop1"].clone().unwrap();
    let (_, e) = mons[&new_owner].wait("the new owner's view of the incident", T, |e| {
        e["target"] == "shop1" && e["event"] == "incident"
    });
    assert_eq!(e["state"], "taken", "{e}");
    assert_eq!(e["by"], dead.as_str());
    assert_eq!(incidents(&etcd.url).len(), 1);
    let console = spare.console();
    assert_eq!(
        console.matches("svc: took the hand-over").count(),
        1,
        "{console}"
    );
    drop(shop_vm);
}

#[test]
fn a_monitor_cut_off_while_it_holds_a_hangs_incident_is_fenced_off() {
    const TEST: &str = "a_monitor_cut_off_while_it_holds_a_hangs_incident_is_fenced_off";
    if !etcd_or_skip(TEST) {
        return;
    }
    let Some(net) = Netns::create("bdc", 214).and_then(Netns::with_shared_address) else {
        bdvmm_tests::skip(
            TEST,
            "cannot create a network namespace with a veth link here (needs root and iproute2)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(net.shared_ip());
    let k = keys::write_file(dir.path());
    let listen = format!("{}:0", net.shared_ip());
    let (shop_vm, shop_addr) = svc("shop1", &listen, &k, "1", "svc: serving sessions");
    let (mut spare, spare_addr) = svc("spare", &listen, &k, "2", "svc: fresh instance");
    let (code, _, err) = bdctl(&[
        "targets",
        "add",
        "--etcd",
        &etcd.url,
        &format!("shop1@{shop_addr}"),
        "--key-file",
        k.to_str().unwrap(),
        "--resume-to",
        &format!("spare@{spare_addr}"),
        "--resume-hook",
        "control",
    ]);
    assert_eq!(code, Some(0), "{err}");
    // Monitor "cut" runs in the namespace and stops (as a paused monitor
    // would) after its last check, before claiming the receiver's inbox.
    let hold = dir.path().join("hold");
    std::fs::write(&hold, b"").unwrap();
    let ns_exec = ["ip", "netns", "exec", net.name.as_str()];
    let cut = monitor(
        &ns_exec,
        &etcd.url,
        "cut",
        &[("BDCTL_HOLD_BEFORE_CLAIM", &hold)],
    );
    wait_owners(&etcd.url, "shop1 owned by the first monitor", T, |o| {
        o["shop1"].as_deref() == Some("cut")
    });
    cut.verdict("healthy", T);
    // The second monitor joins; with one target the plan may give it
    // shop1, so it joins only once the hang's incident is open.
    control(&shop_addr, bdvmm_tests::shop::cmd::SPIN);
    let (_, e) = cut.wait("the cut monitor's incident", T, |e| {
        e["event"] == "incident" && e["state"] == "acting"
    });
    let first_token = e["token"].as_u64().unwrap();
    cut.wait("the cut monitor at its hand-over", T, |e| {
        e["event"] == "resuming"
    });
    net.link(false);
    let other = monitor(&[], &etcd.url, "other", &[]);
    // Its lease gone, "cut" loses shop1; "other" takes the incident over
    // and hands the sessions over under a newer token.
    let (_, e) = other.wait("the take-over's hand-over", T, |e| {
        e["event"] == "resumed" || e["event"] == "action_failed"
    });
    assert_eq!(e["event"], "resumed", "{e}");
    let second_token = e["token"].as_u64().unwrap();
    assert!(
        second_token > first_token,
        "{first_token} then {second_token}"
    );
    spare.wait_line(
        &format!("svc: took the hand-over from shop1 under fencing token {second_token}"),
        T,
    );
    other.wait("the incident's end", T, |e| {
        e["event"] == "incident" && e["state"] == "done"
    });
    // Back on the network and let go, the cut monitor delivers late: the
    // receiver refuses it by its token, and the monitor learns it lost.
    net.link(true);
    std::fs::remove_file(&hold).unwrap();
    // The monitor cannot tell a refused hand-over from a taken one: the
    // inbox takes its records either way, and the receiver judges them.
    let (_, e) = cut.wait("the cut monitor's late hand-over", T, |e| {
        ["resumed", "fenced", "action_failed"].contains(&e["event"].as_str().unwrap_or(""))
    });
    assert_eq!(e["event"], "resumed", "{e}");
    spare.wait_line(
        &format!(
            "svc: refused the hand-over from shop1: fencing token {first_token} is older than {second_token}"
        ),
        T,
    );
    let (_, e) = cut.wait("the cut monitor's loss", T, |e| {
        e["event"] == "incident" && e["state"] == "lost"
    });
    assert!(e["reason"].as_str().unwrap().contains("other"), "{e}");
    let console = spare.console();
    assert_eq!(
        console.matches("svc: took the hand-over").count(),
        1,
        "{console}"
    );
    let list = incidents(&etcd.url);
    assert_eq!(list.len(), 1, "{list:?}");
    let inc = &list[0];
    assert_eq!(inc["monitor"], "other");
    assert_eq!(inc["state"], "done");
    let by: Vec<(String, String)> = inc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["monitor"].as_str().unwrap().into(),
                s["step"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(by.contains(&("cut".into(), "resuming".into())), "{by:?}");
    assert!(
        by.contains(&("other".into(), "taken_over".into())),
        "{by:?}"
    );
    assert!(!by.contains(&("cut".into(), "resumed".into())), "{by:?}");
    drop(shop_vm);
}
