//! The backdoor agent: it plays the RDMA NIC's part, serving one-sided
//! remote access to a guest's sealed hooks with no guest CPU at all.
//! It runs inside bdvmm on its own threads, or as a separate process that
//! holds the guest-RAM memfd and outlives the VMM (`vmm_link`).

pub mod access;
pub mod descriptor;
pub mod guest_mem;
pub mod handshake;
pub mod peer;
pub mod sched;
pub mod server;
#[cfg(feature = "verbs")]
pub mod verbs;
pub mod vmm_link;
pub mod workers;

// The protocol and the client live in backdoor-proto (what monitors link);
// the agent serves the same frames.
#[cfg(feature = "verbs")]
pub use backdoor_proto::verbs_client;
pub use backdoor_proto::{auth, channel, client, doctor, latency, wire};
pub use client::{Client, ClientError, RemoteSlot};
pub use descriptor::{
    DescriptorSource, PublicDescriptor, PushedDescriptor, PushedVcpus, VcpuSource,
};
pub use guest_mem::{GuestMemory, RamRange};
pub use server::Agent;
pub use wire::{ErrorCode, Role};
