//! What the numbers were measured on: CPU, cores, kernel, and whether KVM
//! runs guests in hardware (VMX/SVM) or in software (PVM).

use serde::{Deserialize, Serialize};

use bdvmm::kvm::{host_virtualization, Virtualization};

/// The machine, as the report describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model name from /proc/cpuinfo.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
    /// "hardware (VMX)", "hardware (SVM)" or "software (PVM: ...)".
    pub kvm: String,
    /// Total memory in MiB.
    pub mem_mib: u64,
    /// TSC frequency measured against CLOCK_MONOTONIC, in GHz.
    pub tsc_ghz: f64,
}

impl Machine {
    /// Looks at this machine (and measures its TSC for 200 ms).
    pub fn describe() -> Self {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = info
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|r| r.split_once(':'))
            .map_or_else(|| "unknown".into(), |(_, v)| v.trim().to_owned());
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned());
        let kvm = match host_virtualization() {
            Virtualization::Vmx => "hardware (VMX)".into(),
            Virtualization::Svm => "hardware (SVM)".into(),
            Virtualization::Software => {
                "software (PVM: no VMX/SVM; guest ring 3 runs natively, guest ring 0 is emulated)"
                    .into()
            }
        };
        let mem_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib / 1024);
        Self {
            cpu,
            cores,
            kernel,
            kvm,
            mem_mib,
            tsc_ghz: tsc_ghz(),
        }
    }

    /// Whether KVM runs in hardware.
    pub fn hardware_kvm(&self) -> bool {
        self.kvm.starts_with("hardware")
    }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86-64 (user-mode reads are allowed by Linux).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per nanosecond. Guests under KVM see the host's TSC rate, so
/// this converts the test guests' TSC deltas to time.
fn tsc_ghz() -> f64 {
    let (t0, c0) = (std::time::Instant::now(), rdtsc());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (c1, dt) = (rdtsc(), t0.elapsed());
    c1.wrapping_sub(c0) as f64 / dt.as_nanos() as f64
}

/// Of all cores, the percentage busy over `window` (/proc/stat: all but
/// idle and iowait). Measured while bdbench runs nothing, it is the load
/// other work puts on the machine.
pub fn busy_percent(window: std::time::Duration) -> Option<f64> {
    let sample = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let times: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        let idle = times.get(3)? + times.get(4).copied().unwrap_or(0);
        Some((times.iter().take(8).sum(), idle))
    };
    let (t0, i0) = sample()?;
    std::thread::sleep(window);
    let (t1, i1) = sample()?;
    let total = t1.checked_sub(t0).filter(|&t| t > 0)?;
    Some(100.0 * total.saturating_sub(i1.saturating_sub(i0)) as f64 / total as f64)
}
