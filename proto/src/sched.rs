//! The `SCHED` report (docs/wire.md): the host's view of each vCPU thread,
//! which the agent reads from the host's /proc and a monitor judges by.

use serde::{Deserialize, Serialize};

/// One vCPU thread as the host scheduler saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadSched {
    /// The vCPU's index.
    pub vcpu: u8,
    /// Its host thread id.
    pub tid: i32,
    /// `/proc` state letter: R running or runnable, S sleeping (a halted
    /// vCPU waits in KVM), D, T stopped (SIGSTOP), t traced, Z, X;
    /// "gone" if the thread no longer exists.
    pub state: String,
    /// Nanoseconds it ran on a CPU, since it started.
    pub run_ns: u64,
    /// Nanoseconds it was runnable but waited for a CPU.
    pub wait_ns: u64,
}

/// A `SCHED` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedReport {
    /// One entry per vCPU thread.
    pub vcpus: Vec<ThreadSched>,
}
