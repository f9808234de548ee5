//! The i8042 keyboard controller, as far as guests use it here: to reset
//! the machine (command 0xfe on the command port). vm-superio's
//! `I8042Device` decodes the ports; its reset trigger asks the lifecycle
//! for a reset exit.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::lifecycle::{Lifecycle, VmExit};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// First port of the controller (data port 0x60; command/status is 0x64).
pub const PORT: u16 = 0x60;
/// Ports 0x60..=0x64.
pub const LEN: u16 = 5;

/// Turns the controller's reset line into a reset of the VM.
#[derive(Debug)]
pub struct ResetLine(Arc<Lifecycle>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_exit(VmExit::Reset);
        Ok(())
    }
}

/// The i8042 on the port bus.
#[derive(Debug)]
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    /// A controller that resets `lifecycle`.
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self(I8042Device::new(ResetLine(lifecycle)))
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, no keyboard data.
        let value = u8::try_from(offset).map_or(0, |o| self.0.read(o));
        data.fill(value);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            let Ok(()) = self.0.write(offset, value);
        }
    }
}
