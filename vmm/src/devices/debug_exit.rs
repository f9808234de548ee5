//! Debug-exit port (like QEMU's isa-debug-exit): a write powers the VM off
//! with the written value as the guest's status. Test guests end this way.

use std::sync::Arc;

use crate::lifecycle::{Lifecycle, VmExit};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// I/O port of the device.
pub const PORT: u16 = 0xf4;
/// Ports it decodes (wider writes at this port reach it whole).
pub const LEN: u16 = 1;

/// The debug-exit device.
#[derive(Debug)]
pub struct DebugExit {
    lifecycle: Arc<Lifecycle>,
}

impl DebugExit {
    /// A device that stops `lifecycle` when written.
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self { lifecycle }
    }
}

impl MutDevicePio for DebugExit {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset != 0 {
            tracing::debug!("debug-exit: ignored write at offset {offset}");
            return;
        }
        let mut raw = [0u8; 4];
        let n = data.len().min(4);
        raw[..n].copy_from_slice(&data[..n]);
        let status = u32::from_le_bytes(raw);
        self.lifecycle.request_exit(VmExit::PowerOff { status });
    }
}
