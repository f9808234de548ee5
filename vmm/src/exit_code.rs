//! bdvmm's process exit status: documented, stable, one value per outcome.

use std::process::ExitCode;

use crate::lifecycle::VmExit;

/// Everything that keeps a bdvmm command from doing its job, each mapped
/// to its exit status ([`MainError::exit`]); `main` prints it once.
#[derive(Debug, thiserror::Error)]
pub enum MainError {
    /// The command line describes no VM bdvmm can build.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The VM could not be built or run.
    #[error(transparent)]
    Vmm(#[from] crate::vmm::VmmError),
    /// `bdvmm agent` could not serve.
    #[error(transparent)]
    Agent(#[from] crate::agent_process::AgentProcessError),
    /// `bdvmm ctl` got no reply.
    #[error("{0}")]
    Control(String),
    /// `bdvmm ctl` got a reply that says the request failed (printed already).
    #[error("the VMM refused the request")]
    Refused,
}

impl MainError {
    /// The exit status this error gives.
    pub fn exit(&self) -> BdvmmExit {
        BdvmmExit::Error
    }
}

/// Every exit status bdvmm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BdvmmExit {
    /// The guest powered off with status 0, or the control socket said stop.
    Ok = 0,
    /// bdvmm could not build or run the VM (configuration, KVM, files).
    Error = 1,
    /// Command-line usage error (clap's convention).
    Usage = 2,
    /// The guest powered off with a non-zero status (a failing test guest).
    GuestFailed = 10,
    /// A vCPU triple-faulted.
    TripleFault = 11,
    /// The guest asked for a reset; bdvmm does not reboot guests.
    Reset = 12,
    /// KVM could not run the guest (internal error, failed entry, unknown exit).
    KvmError = 13,
    /// Stopped by SIGINT (128 + 2, the shell convention).
    Interrupted = 130,
    /// Stopped by SIGTERM (128 + 15).
    Terminated = 143,
}

impl From<&VmExit> for BdvmmExit {
    fn from(e: &VmExit) -> Self {
        match e {
            VmExit::PowerOff { status: 0 } | VmExit::ApiStop => Self::Ok,
            VmExit::PowerOff { .. } => Self::GuestFailed,
            VmExit::TripleFault { .. } => Self::TripleFault,
            VmExit::Reset => Self::Reset,
            VmExit::KvmError { .. } => Self::KvmError,
            VmExit::Signal { signal } if *signal == libc::SIGINT => Self::Interrupted,
            VmExit::Signal { .. } => Self::Terminated,
        }
    }
}

impl From<BdvmmExit> for ExitCode {
    fn from(e: BdvmmExit) -> Self {
        ExitCode::from(e as u8)
    }
}
