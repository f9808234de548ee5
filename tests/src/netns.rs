//! A network namespace joined to this one by a veth pair, removed on drop:
//! taking the link down cuts the namespace off, and nobody else (the
//! tests of unreachable targets and of a monitor cut off from etcd).

use std::process::Command;

/// The namespace and its link.
#[derive(Debug)]
pub struct Netns {
    /// The namespace's name (for `ip netns exec`).
    pub name: String,
    host_if: String,
    /// The link's /24, as "10.A.B".
    subnet: String,
    /// An address on this namespace's loopback that the other side
    /// reaches through the link.
    shared: Option<String>,
}

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    /// Creates `tagN` (N from this process's id) with the link on
    /// 10.`octet`.x.0/24: this side .1, the namespace .2. `None` where
    /// namespaces cannot be made (not root, no iproute2).
    pub fn create(tag: &str, octet: u8) -> Option<Self> {
        let id = std::process::id() % 250;
        let name = format!("{tag}{id}");
        let host_if = format!("{tag}h{id}");
        let ns_if = format!("{tag}g{id}");
        let subnet = format!("10.{octet}.{id}");
        let _ = sh(&format!(
            "ip netns del {name} 2>/dev/null; ip link del {host_if} 2>/dev/null"
        ));
        let me = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            subnet: subnet.clone(),
            shared: None,
        };
        let ok = sh(&format!("ip netns add {name}"))
            && sh(&format!("ip link add {host_if} type veth peer name {ns_if}"))
            && sh(&format!("ip link set {ns_if} netns {name}"))
            && sh(&format!("ip addr add {subnet}.1/24 dev {host_if} && ip link set {host_if} up"))
            && sh(&format!(
                "ip -n {name} addr add {subnet}.2/24 dev {ns_if} && ip -n {name} link set {ns_if} up && ip -n {name} link set lo up"
            ));
        ok.then_some(me)
    }

    /// Adds an address on this side's loopback, routed to from the
    /// namespace through the link: servers here bound to it are reached
    /// from the namespace only while the link is up, and from here always.
    pub fn with_shared_address(mut self) -> Option<Self> {
        let ip = format!("{}.100", self.subnet);
        let _ = sh(&format!("ip addr del {ip}/32 dev lo 2>/dev/null"));
        let ok = sh(&format!("ip addr add {ip}/32 dev lo"))
            && sh(&format!(
                "ip -n {} route add default via {}.1",
                self.name, self.subnet
            ));
        self.shared = Some(ip);
        ok.then_some(self)
    }

    /// The namespace's address on the link.
    pub fn ns_ip(&self) -> String {
        format!("{}.2", self.subnet)
    }

    /// The shared address ([`Netns::with_shared_address`]).
    pub fn shared_ip(&self) -> &str {
        self.shared.as_deref().expect("with_shared_address first")
    }

    /// Takes the link down or up again.
    pub fn link(&self, up: bool) {
        let st = Command::new("ip")
            .args(["link", "set", &self.host_if, if up { "up" } else { "down" }])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip link set {} failed", self.host_if);
        if up {
            // Neighbours that failed while the link was down would answer
            // "no route to host" until they are probed again.
            let _ = Command::new("ip")
                .args(["-n", &self.name, "neigh", "flush", "all"])
                .status();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if let Some(ip) = &self.shared {
            let _ = Command::new("ip")
                .args(["addr", "del", &format!("{ip}/32"), "dev", "lo"])
                .status();
        }
    }
}
