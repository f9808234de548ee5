//! The backdoor device on bdvmm's MMIO bus: an adapter from the bus to
//! `backdoor_dev::BackdoorDevice`, and its window onto guest RAM.

use backdoor_dev::{BackdoorDevice, GuestReader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

/// Base of the register block: the first page of the MMIO gap, below 3 GiB.
pub const MMIO_BASE: u64 = crate::layout::MMIO_GAP_START;
/// Size of the register block.
pub const MMIO_SIZE: u64 = backdoor_abi::DEV_MMIO_SIZE;
/// Interrupt announced to the guest (reserved in ABI v1, never raised).
pub const IRQ: u32 = 5;

/// How Linux learns where the device is, in virtio-mmio's notation.
pub fn cmdline_param() -> String {
    format!("backdoor.dev={}K@{MMIO_BASE:#x}:{IRQ}", MMIO_SIZE / 1024)
}

/// Guest RAM as the device sees it: bounds-checked reads only.
#[derive(Debug)]
pub struct GuestRam(pub GuestMemoryMmap);

impl GuestReader for GuestRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        // read_slice fails (never panics) on any address not wholly in RAM.
        self.0.read_slice(buf, GuestAddress(gpa)).is_ok()
    }
}

/// The bus-facing device.
#[derive(Debug)]
pub struct BackdoorMmio(pub BackdoorDevice);

impl MutDeviceMmio for BackdoorMmio {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.0.write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_matches_the_abi_example() {
        assert_eq!(cmdline_param(), "backdoor.dev=4K@0xb0000000:5");
    }

    #[test]
    fn reads_outside_ram_fail_instead_of_panicking() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let ram = GuestRam(mem);
        let mut buf = [0u8; 64];
        assert!(ram.read(0x1000, &mut buf));
        assert!(!ram.read((1 << 20) - 32, &mut buf));
        assert!(!ram.read(u64::MAX - 8, &mut buf));
    }
}
