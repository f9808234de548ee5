//! The part of the i8042 keyboard controller guests use to reset the
//! machine: command 0xfe (pulse the reset line) on the command port.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::lifecycle::{Lifecycle, VmExit};

/// First port of the controller (data port 0x60; command/status is 0x64).
pub const PORT: u16 = 0x60;
/// Ports 0x60..=0x64.
pub const LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET: u8 = 0xfe;

/// The reset-only i8042.
#[derive(Debug)]
pub struct I8042 {
    lifecycle: Arc<Lifecycle>,
}

impl I8042 {
    /// A controller that resets `lifecycle`.
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self { lifecycle }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, no keyboard data.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET) {
            self.lifecycle.request_exit(VmExit::Reset);
        }
    }
}
