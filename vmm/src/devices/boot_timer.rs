//! Boot timer (after Firecracker's): records the host CLOCK_MONOTONIC time
//! of the guest's first write, so a benchmark can measure how long bdvmm
//! takes to reach the guest's first instruction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// I/O port of the device.
pub const PORT: u16 = 0xf5;
/// Ports it decodes.
pub const LEN: u16 = 1;

/// Nanoseconds of CLOCK_MONOTONIC, comparable across processes.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // CLOCK_MONOTONIC is never negative.
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// The boot timer. `first_write_ns` is 0 until the guest writes.
#[derive(Debug)]
pub struct BootTimer {
    first_write_ns: Arc<AtomicU64>,
    vmm_start_ns: u64,
}

impl BootTimer {
    /// A timer that stores the first write's time into `first_write_ns`.
    pub fn new(first_write_ns: Arc<AtomicU64>, vmm_start_ns: u64) -> Self {
        Self {
            first_write_ns,
            vmm_start_ns,
        }
    }
}

impl MutDevicePio for BootTimer {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, _data: &[u8]) {
        let now = monotonic_ns();
        if self
            .first_write_ns
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!(
                monotonic_ns = now,
                "boot-timer: guest reached its first instruction {} µs after bdvmm started",
                now.saturating_sub(self.vmm_start_ns) / 1000
            );
        }
    }
}
