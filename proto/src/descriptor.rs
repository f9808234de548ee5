//! What the agent tells an authenticated monitor about the guest: the
//! public descriptor, with no guest addresses.

use backdoor_abi::descriptor::Descriptor;
use serde::{Deserialize, Serialize};

use crate::wire::Role;

/// A hook as monitors see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicHook {
    /// Hook id.
    pub id: u32,
    /// `progress_box`, `state_box` or `repair`.
    pub kind: String,
    /// The guest's name for it.
    pub name: String,
    /// Bytes.
    pub len: u64,
    /// `PERM_*` bits.
    pub perms: u32,
}

/// The descriptor sent at WELCOME and on DESCRIBE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicDescriptor {
    /// The VM's name.
    pub vm: String,
    /// Changes on every guest reset.
    pub generation: u32,
    /// Whether the guest sealed its hooks.
    pub sealed: bool,
    /// Commands the device refused after the seal.
    pub tamper_count: u32,
    /// The role this connection has.
    pub role: Role,
    /// Backends this agent offers (`soft`, and `verbs` where a device exists).
    pub backends: Vec<String>,
    /// The hooks.
    pub hooks: Vec<PublicHook>,
    /// Whether the VMM is still connected (false once a separate agent outlives it).
    pub vmm_alive: bool,
    /// Whether the agent answers SCHED (it serves a VMM's vCPUs; absent,
    /// as from an agent that predates SCHED, reads false).
    #[serde(default)]
    pub sched: bool,
}

impl PublicDescriptor {
    /// The public view of `d`.
    pub fn new(
        vm: &str,
        d: &Descriptor,
        role: Role,
        backends: Vec<String>,
        vmm_alive: bool,
    ) -> Self {
        Self {
            vm: vm.to_owned(),
            generation: d.generation,
            sealed: d.sealed,
            tamper_count: d.tamper_count,
            role,
            backends,
            hooks: d
                .hooks
                .iter()
                .map(|h| PublicHook {
                    id: h.id,
                    kind: h.kind.name().to_owned(),
                    name: h.name.clone(),
                    len: h.len,
                    perms: h.perms,
                })
                .collect(),
            vmm_alive,
            sched: false,
        }
    }

    /// The hook called `name`.
    pub fn hook(&self, name: &str) -> Option<&PublicHook> {
        self.hooks.iter().find(|h| h.name == name)
    }
}
