//! Port-I/O and MMIO buses: route a vCPU's access to the device that owns
//! the address. An access that hits no device is counted and logged once
//! per address, never an error: guests (Linux above all) probe freely.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    /// Fills `data` for a read at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while adding a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a device already on the bus.
    #[error("{name} at {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        name: &'static str,
        base: u64,
        len: u64,
    },
    /// Zero-length range.
    #[error("{name} has an empty address range")]
    Empty { name: &'static str },
}

struct Entry {
    len: u64,
    name: &'static str,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// How an access wider than one unit is matched to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// Port I/O: the device at the access's first port takes the whole
    /// access (an `outl` to a one-port device still reaches it).
    ByStart,
    /// MMIO: the access must lie wholly inside the device's range.
    Contained,
}

/// One address space (ports or MMIO).
pub struct Bus {
    kind: &'static str,
    width: Width,
    devices: BTreeMap<u64, Entry>,
    unhandled: AtomicU64,
    logged: Mutex<std::collections::HashSet<u64>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self
            .devices
            .iter()
            .map(|(b, e)| (b, e.len, e.name))
            .collect();
        f.debug_struct("Bus")
            .field("kind", &self.kind)
            .field("devices", &names)
            .finish()
    }
}

/// Only the first few unhandled addresses are logged, so a probing guest cannot flood the log.
const MAX_LOGGED_UNHANDLED: usize = 32;

impl Bus {
    /// An empty bus; `kind` names it in logs ("pio", "mmio").
    pub fn new(kind: &'static str, width: Width) -> Self {
        Self {
            kind,
            width,
            devices: BTreeMap::new(),
            unhandled: AtomicU64::new(0),
            logged: Mutex::new(Default::default()),
        }
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { name });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { name, base, len })?;
        let before = self.devices.range(..end).next_back();
        if before.is_some_and(|(b, e)| b + e.len > base) {
            return Err(BusError::Overlap { name, base, len });
        }
        self.devices.insert(base, Entry { len, name, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let (base, e) = self.devices.range(..=addr).next_back()?;
        let off = addr - base;
        let fits = match self.width {
            Width::ByStart => off < e.len,
            Width::Contained => off + size as u64 <= e.len,
        };
        fits.then_some((e, off))
    }

    /// Routes a read; unowned addresses read as all ones, like a floating bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((e, off)) => lock(&e.device).read(off, data),
            None => {
                data.fill(0xff);
                self.note_unhandled(addr, "read");
            }
        }
    }

    /// Routes a write; unowned addresses drop it.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr, data.len()) {
            Some((e, off)) => lock(&e.device).write(off, data),
            None => self.note_unhandled(addr, "write"),
        }
    }

    /// How many accesses hit no device.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    fn note_unhandled(&self, addr: u64, op: &str) {
        self.unhandled.fetch_add(1, Ordering::Relaxed);
        let mut logged = lock(&self.logged);
        if logged.len() < MAX_LOGGED_UNHANDLED && logged.insert(addr) {
            tracing::debug!("{} {op} at {addr:#x} hits no device", self.kind);
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Devices keep no invariants across a panic worth dying for.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xff));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_route_by_range_with_device_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new("pio", Width::ByStart);
        bus.insert("rec", 0x3f8, 8, dev.clone()).unwrap();
        bus.write(0x3f9, &[7]);
        let mut b = [0u8; 1];
        bus.read(0x3fd, &mut b);
        assert_eq!(b, [5]);
        assert_eq!(dev.lock().unwrap().0, vec![(1, vec![7])]);
    }

    #[test]
    fn unowned_and_straddling_accesses_float_and_are_counted() {
        let mut bus = Bus::new("mmio", Width::Contained);
        bus.insert("rec", 0x10, 4, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut b = [0u8; 4];
        bus.read(0x20, &mut b);
        assert_eq!(b, [0xff; 4]);
        bus.read(0x12, &mut b); // 0x12..0x16 crosses the device's end
        assert_eq!(b, [0xff; 4]);
        bus.write(0x0, &[1]);
        assert_eq!(bus.unhandled(), 3);
    }

    #[test]
    fn a_wide_port_access_belongs_to_the_device_at_its_first_port() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new("pio", Width::ByStart);
        bus.insert("one-port", 0xf4, 1, dev.clone()).unwrap();
        bus.insert("next", 0xf5, 1, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        bus.write(0xf4, &[1, 0, 0, 0]);
        assert_eq!(dev.lock().unwrap().0, vec![(0, vec![1, 0, 0, 0])]);
        assert_eq!(bus.unhandled(), 0);
    }

    #[test]
    fn overlapping_devices_are_refused() {
        let mut bus = Bus::new("mmio", Width::Contained);
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert("a", 0x1000, 0x100, d()).unwrap();
        assert!(bus.insert("b", 0x10ff, 1, d()).is_err());
        assert!(bus.insert("c", 0xf01, 0x100, d()).is_err());
        assert!(bus.insert("d", 0x1100, 0x100, d()).is_ok());
        assert!(bus.insert("e", 0x0, 0, d()).is_err());
    }
}
