//! The backdoor agent: it plays the RDMA NIC's part, serving one-sided
//! remote access to a guest's sealed hooks with no guest CPU at all.
//! It runs inside bdvmm on its own threads, or as a separate process that
//! holds the guest-RAM memfd and outlives the VMM (`vmm_link`).

pub mod access;
pub mod auth;
pub mod channel;
pub mod client;
pub mod descriptor;
pub mod doctor;
pub mod guest_mem;
pub mod handshake;
pub mod peer;
pub mod server;
#[cfg(feature = "verbs")]
pub mod verbs;
#[cfg(feature = "verbs")]
pub mod verbs_client;
pub mod vmm_link;
pub mod wire;

pub use client::{Client, ClientError, RemoteSlot};
pub use descriptor::{
    DescriptorSource, PublicDescriptor, PushedDescriptor, PushedVcpus, VcpuSource,
};
pub use guest_mem::{GuestMemory, RamRange};
pub use server::Agent;
pub use wire::{ErrorCode, Role};
