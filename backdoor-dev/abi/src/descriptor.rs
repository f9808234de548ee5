//! What the backdoor publishes about a guest's hooks: the table the
//! device validated, as the VMM, the agent and the control socket pass it
//! on. Here (not in the device model) so that everything that only reads
//! it, the wire protocol and monitors included, needs nothing else.

use serde::{Deserialize, Serialize};

use crate::HookKind;

/// One registered hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    /// Id the device assigned (1-based, never reused within a generation).
    pub id: u32,
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it holds.
    #[serde(serialize_with = "kind_name", deserialize_with = "kind_from_name")]
    pub kind: HookKind,
    /// `PERM_*` bits.
    pub perms: u32,
    /// Unique name.
    pub name: String,
}

fn kind_name<S: serde::Serializer>(k: &HookKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.name())
}

fn kind_from_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HookKind, D::Error> {
    let name = String::deserialize(d)?;
    HookKind::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .ok_or_else(|| serde::de::Error::custom(format!("unknown hook kind {name:?}")))
}

/// The hook table of one generation, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Changes on every guest reset.
    pub generation: u32,
    /// Whether the table is sealed.
    pub sealed: bool,
    /// Commands refused after the seal.
    pub tamper_count: u32,
    /// Registered hooks.
    pub hooks: Vec<Hook>,
}
