//! Opening /dev/kvm with errors a person can act on, and checking the
//! capabilities bdvmm relies on.

use std::io;

use kvm_ioctls::{Cap, Kvm};

/// The KVM API version every modern kernel reports.
pub const KVM_API_VERSION: i32 = 12;

/// Errors while opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// No /dev/kvm.
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable nested virtualization for this VM)")]
    Missing,
    /// /dev/kvm exists but may not be opened.
    #[error("permission denied opening /dev/kvm: add your user to the group that owns it (usually `kvm`) or run bdvmm as root")]
    Permission,
    /// Other open failure.
    #[error("cannot open /dev/kvm: {0}")]
    Open(io::Error),
    /// The kernel speaks another KVM API.
    #[error("KVM API version {0} is not supported (bdvmm needs {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A needed capability is missing.
    #[error("KVM on this host lacks {0}, which bdvmm needs")]
    MissingCap(&'static str),
}

/// Capabilities bdvmm cannot work without, with their names.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (
        Cap::Irqchip,
        "KVM_CAP_IRQCHIP (in-kernel interrupt controller)",
    ),
    (Cap::Pit2, "KVM_CAP_PIT2 (in-kernel timer)"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (
        Cap::ImmediateExit,
        "KVM_CAP_IMMEDIATE_EXIT (needed to pause vCPUs reliably)",
    ),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
];

/// Opens /dev/kvm and checks the API version and required capabilities.
pub fn open() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::Permission,
        _ => KvmError::Open(io::Error::from_raw_os_error(e.errno())),
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// How the host runs guests, from /proc/cpuinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Virtualization {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
    /// Neither flag: KVM is PVM (or another software scheme); guest ring 0 is emulated.
    Software,
}

/// Reads the CPU flags to tell hardware from software virtualization.
pub fn host_virtualization() -> Virtualization {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    if has("vmx") {
        Virtualization::Vmx
    } else if has("svm") {
        Virtualization::Svm
    } else {
        Virtualization::Software
    }
}
