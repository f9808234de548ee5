//! Test-guest helpers on top of the end-to-end harness (`bdvmm_tests::Vm`).

use std::path::PathBuf;
use std::time::Duration;

use bdvmm_tests::Vm;

/// Every exit KVM handed to bdvmm so far, all reasons and vCPUs summed
/// (bdvmm's control socket, `exits`).
pub fn total_exits(vm: &Vm) -> u64 {
    let reply = vm.api("exits");
    reply["exits"]
        .as_array()
        .map(|vcpus| {
            vcpus
                .iter()
                .filter_map(|v| v.as_object())
                .flat_map(|o| o.iter().filter(|(k, _)| *k != "vcpu"))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// The numbers after `prefix` on the console line that starts with it.
pub fn numbers_after(console: &str, prefix: &str) -> Vec<u64> {
    console
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|r| {
            r.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A ring-3 test guest named "bench" whose backdoor bdvmm's in-process
/// agent serves on loopback, with the harness's keys.
#[derive(Debug)]
pub struct Served {
    /// The VM.
    pub vm: Vm,
    /// Where monitors connect.
    pub addr: std::net::SocketAddr,
    /// The key file.
    pub keys: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    /// Starts `guest` with `mem` of RAM and waits for `ready` on its console
    /// (the line is returned).
    pub fn start(guest: &str, mem: &str, ready: &str) -> (Self, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let keys = bdvmm_tests::keys::write_file(dir.path());
        let keys_s = keys.to_str().expect("utf-8 path").to_owned();
        let mut vm = Vm::test_guest(
            guest,
            3,
            &[
                "--mem",
                mem,
                "--name",
                "bench",
                "--backdoor-listen",
                "127.0.0.1:0",
                "--backdoor-keys",
                &keys_s,
            ],
        );
        let line = vm.wait_line(ready, Duration::from_secs(60));
        let addr = agent_addr(&vm);
        (
            Self {
                vm,
                addr,
                keys,
                _dir: dir,
            },
            line,
        )
    }
}

/// A read-role connection to a [`Served`] guest's agent.
pub fn reader(addr: std::net::SocketAddr) -> backdoor_agent::Client {
    backdoor_agent::Client::connect(
        addr,
        "bench",
        backdoor_agent::Role::Read,
        &bdvmm_tests::keys::READ,
        Duration::from_secs(5),
    )
    .expect("connect to the agent")
}

/// The agent address of a VM started with `--backdoor-listen`.
pub fn agent_addr(vm: &Vm) -> std::net::SocketAddr {
    vm.agent_addr()
        .parse()
        .expect("bdvmm's agent address is an address")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_from_the_prefixed_line() {
        let c = "x 1\nbench: samples pet 5 6 7\nbench: samples hb 9\n";
        assert_eq!(numbers_after(c, "bench: samples pet"), vec![5, 6, 7]);
        assert!(numbers_after(c, "nope").is_empty());
    }
}
