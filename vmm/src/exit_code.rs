//! bdvmm's process exit status: documented, stable, one value per outcome.

use std::process::ExitCode;

use crate::lifecycle::VmExit;

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
