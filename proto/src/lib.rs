//! The backdoor's wire protocol and the monitor's side of it: frames
//! (`wire`), the encrypted channel (`channel`, Noise), keys (`auth`), the
//! public descriptor, and the client that monitors use over the soft
//! transport or RDMA verbs. Monitors (bdctl) link this crate alone; the
//! agent links it too, so both ends share one definition of every frame.
//! docs/wire.md describes the protocol for people.

pub mod auth;
pub mod channel;
pub mod client;
pub mod descriptor;
pub mod doctor;
pub mod latency;
pub mod sched;
#[cfg(feature = "verbs")]
pub mod verbs;
#[cfg(feature = "verbs")]
pub mod verbs_client;
pub mod wire;

pub use client::{Client, ClientError, RemoteSlot};
pub use descriptor::{PublicDescriptor, PublicHook};
pub use wire::{ErrorCode, Role};
