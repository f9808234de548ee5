//! Per-vCPU counts of the exits KVM hands to bdvmm, by reason.
//!
//! Exits that KVM handles in the kernel (HLT with an in-kernel irqchip,
//! interrupts, page faults) never reach user space and are not counted here.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! exit_counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters, updated by one vCPU thread and read by anyone.
        #[derive(Debug, Default)]
        pub struct ExitCounters { $($(#[$doc])* pub $name: AtomicU64,)* }

        /// A point-in-time copy of [`ExitCounters`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
        pub struct ExitCounts { $($(#[$doc])* pub $name: u64,)* }

        impl ExitCounters {
            /// Reads every counter.
            pub fn snapshot(&self) -> ExitCounts {
                ExitCounts { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl ExitCounts {
            /// Sum of all reasons.
            pub fn total(&self) -> u64 { 0 $(+ self.$name)* }

            /// Adds `other`'s counts to these.
            pub fn add(&mut self, other: &Self) { $(self.$name += other.$name;)* }
        }
    };
}

exit_counters! {
    /// Port reads (`in`).
    io_in,
    /// Port writes (`out`).
    io_out,
    /// MMIO reads outside guest RAM.
    mmio_read,
    /// MMIO writes outside guest RAM.
    mmio_write,
    /// HLT handed to user space (only without an in-kernel irqchip).
    hlt,
    /// Triple faults.
    shutdown,
    /// KVM system events (power-off, reset, crash).
    system_event,
    /// KVM_RUN interrupted by a signal (pause, stop): bdvmm's own kicks.
    interrupted,
    /// Internal errors, failed entries and exits bdvmm does not handle.
    error,
}

impl ExitCounters {
    /// Adds one to `c`.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}
