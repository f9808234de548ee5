//! The seams between crates that the design relies on: the monitor links
//! the protocol (backdoor-proto) and the ABI, never the device model or
//! the agent, with or without the verbs data path (docs/ARCHITECTURE.md).

use std::process::Command;

/// bdctl's normal (non-dev) dependency closure, one package per line.
fn bdctl_dependencies(features: &[&str]) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root).args([
        "tree",
        "--offline",
        "-p",
        "bdctl",
        "-e",
        "normal",
        "--prefix",
        "none",
    ]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = cmd.output().expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn the_monitor_links_the_protocol_and_not_the_device_model_or_the_agent() {
    for features in [&[][..], &["bdctl/verbs"][..]] {
        let tree = bdctl_dependencies(features);
        let names: Vec<&str> = tree
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(names.contains(&"backdoor-proto"), "{features:?}: {tree}");
        assert!(names.contains(&"backdoor-abi"), "{features:?}: {tree}");
        for forbidden in ["backdoor-dev", "backdoor-agent", "bdvmm"] {
            assert!(
                !names.contains(&forbidden),
                "{features:?}: bdctl links {forbidden}:\n{tree}"
            );
        }
    }
}
