//! Port-I/O and MMIO dispatch on vm-device's `IoManager`: a vCPU's access
//! goes to the device that owns the address. An access that hits no device
//! is counted and logged once per address, never an error: guests (Linux
//! above all) probe freely.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

/// A device that could not be put on its bus.
#[derive(Debug, thiserror::Error)]
#[error("{name} at {base:#x}+{len:#x} cannot go on the {bus} bus")]
pub struct BusError {
    /// The device.
    pub name: &'static str,
    /// "pio" or "mmio".
    pub bus: &'static str,
    /// Its first address.
    pub base: u64,
    /// How many addresses it decodes.
    pub len: u64,
    /// Why (an empty or overflowing range, or an overlap).
    #[source]
    pub source: vm_device::bus::Error,
}

/// Only the first few unhandled addresses are logged, so a probing guest cannot flood the log.
const MAX_LOGGED_UNHANDLED: usize = 32;

/// Accesses that hit no device, per bus.
#[derive(Debug, Default)]
struct Unhandled {
    count: AtomicU64,
    logged: Mutex<HashSet<u64>>,
}

impl Unhandled {
    fn note(&self, bus: &str, addr: u64, op: &str) {
        self.count.fetch_add(1, Ordering::Relaxed);
        // Nothing kept under this lock can be left inconsistent by a panic.
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.len() < MAX_LOGGED_UNHANDLED && logged.insert(addr) {
            tracing::debug!("{bus} {op} at {addr:#x} hits no device");
        }
    }
}

/// Both buses of the machine.
pub struct Io {
    manager: IoManager,
    pio_unhandled: Unhandled,
    mmio_unhandled: Unhandled,
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io")
            .field("pio_unhandled", &self.pio_unhandled())
            .field("mmio_unhandled", &self.mmio_unhandled())
            .finish_non_exhaustive()
    }
}

impl Default for Io {
    fn default() -> Self {
        Self::new()
    }
}

impl Io {
    /// No devices yet.
    pub fn new() -> Self {
        Self {
            manager: IoManager::new(),
            pio_unhandled: Unhandled::default(),
            mmio_unhandled: Unhandled::default(),
        }
    }

    /// Puts `device` on the port bus at `[base, base + len)`.
    pub fn add_pio(
        &mut self,
        name: &'static str,
        base: u16,
        len: u16,
        device: Arc<dyn DevicePio + Send + Sync>,
    ) -> Result<(), BusError> {
        let error = |source| BusError {
            name,
            bus: "pio",
            base: u64::from(base),
            len: u64::from(len),
            source,
        };
        let range = PioRange::new(PioAddress(base), len).map_err(error)?;
        self.manager.register_pio(range, device).map_err(error)
    }

    /// Puts `device` on the MMIO bus at `[base, base + len)`.
    pub fn add_mmio(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<(), BusError> {
        let error = |source| BusError {
            name,
            bus: "mmio",
            base,
            len,
            source,
        };
        let range = MmioRange::new(MmioAddress(base), len).map_err(error)?;
        self.manager.register_mmio(range, device).map_err(error)
    }

    /// A port read. The device at the access's first port takes the whole
    /// access (an `inl` from a one-port device still reaches it); a port
    /// nobody owns reads as all ones, like a floating bus.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match self.manager.pio_device(PioAddress(port)) {
            Some((range, dev)) => dev.pio_read(range.base(), port - range.base().0, data),
            None => {
                data.fill(0xff);
                self.pio_unhandled.note("pio", u64::from(port), "read");
            }
        }
    }

    /// A port write, routed as [`Io::pio_read`]; unowned ports drop it.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match self.manager.pio_device(PioAddress(port)) {
            Some((range, dev)) => dev.pio_write(range.base(), port - range.base().0, data),
            None => self.pio_unhandled.note("pio", u64::from(port), "write"),
        }
    }

    /// An MMIO read: the access must lie wholly inside one device's range;
    /// anything else reads as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.manager.mmio_read(MmioAddress(addr), data).is_err() {
            data.fill(0xff);
            self.mmio_unhandled.note("mmio", addr, "read");
        }
    }

    /// An MMIO write, routed as [`Io::mmio_read`]; anything else is dropped.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.manager.mmio_write(MmioAddress(addr), data).is_err() {
            self.mmio_unhandled.note("mmio", addr, "write");
        }
    }

    /// How many port accesses hit no device.
    pub fn pio_unhandled(&self) -> u64 {
        self.pio_unhandled.count.load(Ordering::Relaxed)
    }

    /// How many MMIO accesses hit no device.
    pub fn mmio_unhandled(&self) -> u64 {
        self.mmio_unhandled.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use vm_device::bus::{MmioAddressOffset, PioAddressOffset};
    use vm_device::{MutDeviceMmio, MutDevicePio};

    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl MutDevicePio for Recorder {
        fn pio_read(&mut self, _: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xff));
        }
        fn pio_write(&mut self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
            self.0.push((u64::from(offset), data.to_vec()));
        }
    }
    impl MutDeviceMmio for Recorder {
        fn mmio_read(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xff));
        }
        fn mmio_write(&mut self, _: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn accesses_route_by_range_with_device_relative_offsets() {
        let dev = recorder();
        let mut io = Io::new();
        io.add_pio("rec", 0x3f8, 8, dev.clone()).unwrap();
        io.pio_write(0x3f9, &[7]);
        let mut b = [0u8; 1];
        io.pio_read(0x3fd, &mut b);
        assert_eq!(b, [5]);
        assert_eq!(dev.lock().unwrap().0, vec![(1, vec![7])]);
    }

    #[test]
    fn unowned_and_straddling_accesses_float_and_are_counted() {
        let mut io = Io::new();
        io.add_mmio("rec", 0x10, 4, recorder()).unwrap();
        let mut b = [0u8; 4];
        io.mmio_read(0x20, &mut b);
        assert_eq!(b, [0xff; 4]);
        io.mmio_read(0x12, &mut b); // 0x12..0x16 crosses the device's end
        assert_eq!(b, [0xff; 4]);
        io.mmio_write(0x0, &[1]);
        io.pio_read(0x80, &mut b[..1]);
        assert_eq!((io.mmio_unhandled(), io.pio_unhandled()), (3, 1));
    }

    #[test]
    fn a_wide_port_access_belongs_to_the_device_at_its_first_port() {
        let dev = recorder();
        let mut io = Io::new();
        io.add_pio("one-port", 0xf4, 1, dev.clone()).unwrap();
        io.add_pio("next", 0xf5, 1, recorder()).unwrap();
        io.pio_write(0xf4, &[1, 0, 0, 0]);
        assert_eq!(dev.lock().unwrap().0, vec![(0, vec![1, 0, 0, 0])]);
        assert_eq!(io.pio_unhandled(), 0);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut io = Io::new();
        io.add_mmio("a", 0x1000, 0x100, recorder()).unwrap();
        assert!(io.add_mmio("b", 0x10ff, 1, recorder()).is_err());
        assert!(io.add_mmio("c", 0xf01, 0x100, recorder()).is_err());
        assert!(io.add_mmio("d", 0x1100, 0x100, recorder()).is_ok());
        let e = io.add_pio("e", 0x0, 0, recorder()).unwrap_err();
        assert_eq!(e.source, vm_device::bus::Error::InvalidRange);
        assert!(io.add_pio("f", 0xffff, 2, recorder()).is_err());
    }
}
