//! The VM's configuration, validated, and the parsing of sizes like `512M`.

use std::path::PathBuf;

use crate::boot::cpu::Ring;
use crate::memory::{HUGE_PAGE_SIZE, MIN_MEM_BYTES};

/// Most vCPUs bdvmm starts (APIC IDs fit in a byte; test guests size stacks for 64).
pub const MAX_VCPUS: u8 = 64;
/// Default Linux command line: serial console (early console too, so that
/// early boot is visible even where Linux cannot finish booting), reset
/// through the keyboard controller.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1";

/// Errors in the configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Memory size 0.
    #[error("--mem must not be zero")]
    ZeroMemory,
    /// Below the minimum.
    #[error("--mem {0} is too small: bdvmm needs at least 4 MiB")]
    TooSmall(String),
    /// More than the host has.
    #[error("--mem {asked} is larger than this host's {host} MiB of physical memory")]
    TooLarge { asked: String, host: u64 },
    /// Not a multiple of the page size.
    #[error("--mem {size} is not a multiple of {unit}")]
    Unaligned { size: String, unit: &'static str },
    /// Bad VM name.
    #[error("--name {0:?} must be 1 to 64 characters from A-Z a-z 0-9 - _ .")]
    Name(String),
    /// Neither a kernel nor a test guest.
    #[error("nothing to boot: give --kernel or --test-guest")]
    NoGuest,
    /// Bad vCPU count.
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, not {0}")]
    Vcpus(u32),
}

/// The guest to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestConfig {
    /// A Linux kernel with the 64-bit boot protocol.
    Linux {
        /// bzImage or ELF vmlinux.
        kernel: PathBuf,
        /// Optional initramfs.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// A freestanding ELF test guest.
    TestGuest {
        /// The ELF.
        path: PathBuf,
        /// Starting privilege level.
        ring: Ring,
    },
}

/// A validated VM configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// What to boot.
    pub guest: GuestConfig,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Back guest RAM with 2-MiB huge pages.
    pub hugepages: bool,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Copy of the console output.
    pub console_log: Option<PathBuf>,
    /// Control socket path.
    pub api_sock: Option<PathBuf>,
    /// Event stream file.
    pub events: Option<PathBuf>,
    /// What a guest reset does.
    pub on_reset: crate::vmm::OnReset,
    /// The VM's name.
    pub name: String,
    /// In-process agent: (listen address, key file).
    pub backdoor_listen: Option<(String, PathBuf)>,
    /// Separate agent's Unix socket.
    pub agent_sock: Option<PathBuf>,
    /// In-process agent's busy-poll window.
    pub agent_busy_poll: std::time::Duration,
}

/// VM names are what monitors authenticate against: short and printable.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Name(name.to_owned()))
    }
}

/// Parses `4096`, `64K`, `512M`, `2G`, `1T` (binary units, optional `iB`/`B`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("'{s}' is not a size (use e.g. 512M or 2G)"));
    }
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "'{s}' has an unknown unit '{unit}' (use K, M, G or T)"
            ))
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is too large a number"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Checks a memory size against bdvmm's and the host's limits.
pub fn validate_mem(bytes: u64, hugepages: bool, host_bytes: u64) -> Result<(), ConfigError> {
    let shown = human_size(bytes);
    if bytes == 0 {
        return Err(ConfigError::ZeroMemory);
    }
    if bytes < MIN_MEM_BYTES {
        return Err(ConfigError::TooSmall(shown));
    }
    if bytes > host_bytes {
        return Err(ConfigError::TooLarge {
            asked: shown,
            host: host_bytes >> 20,
        });
    }
    if hugepages && bytes % HUGE_PAGE_SIZE != 0 {
        return Err(ConfigError::Unaligned {
            size: shown,
            unit: "2 MiB (the huge page size)",
        });
    }
    if bytes % 4096 != 0 {
        return Err(ConfigError::Unaligned {
            size: shown,
            unit: "4 KiB (the page size)",
        });
    }
    Ok(())
}

/// Checks the vCPU count.
pub fn validate_vcpus(n: u32) -> Result<u8, ConfigError> {
    u8::try_from(n)
        .ok()
        .filter(|&v| (1..=MAX_VCPUS).contains(&v))
        .ok_or(ConfigError::Vcpus(n))
}

/// Physical memory of this host in bytes.
pub fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(pages).unwrap_or(0) * u64::try_from(page).unwrap_or(4096)
}

/// `536870912` → `512M`.
pub fn human_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn non_sizes_are_refused_with_a_hint() {
        for bad in [
            "",
            "M",
            "12X",
            "-1G",
            "1.5G",
            "99999999999999999999",
            "99999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("lots").unwrap_err().contains("512M"));
    }

    #[test]
    fn memory_limits() {
        let host = 24u64 << 30;
        assert_eq!(validate_mem(0, false, host), Err(ConfigError::ZeroMemory));
        assert!(matches!(
            validate_mem(1 << 20, false, host),
            Err(ConfigError::TooSmall(_))
        ));
        assert!(matches!(
            validate_mem(64 << 30, false, host),
            Err(ConfigError::TooLarge { .. })
        ));
        assert!(matches!(
            validate_mem((512 << 20) + 512, false, host),
            Err(ConfigError::Unaligned { .. })
        ));
        assert!(matches!(
            validate_mem((512 << 20) + 4096, true, host),
            Err(ConfigError::Unaligned { .. })
        ));
        assert_eq!(validate_mem(512 << 20, true, host), Ok(()));
    }

    #[test]
    fn vcpu_limits() {
        assert_eq!(validate_vcpus(2), Ok(2));
        assert!(validate_vcpus(0).is_err());
        assert!(validate_vcpus(65).is_err());
        assert!(validate_vcpus(300).is_err());
    }
}
