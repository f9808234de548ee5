//! The backdoor device's MMIO register file (docs/abi.md section 1).
//! It knows nothing of the VM's lifecycle: the VMM routes 32-bit accesses
//! here and calls [`BackdoorShared::reset`] when the guest resets.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use backdoor_abi::{
    cmd, reg, HookDesc, HookError, ABI_VERSION, DEV_MAGIC, FEATURE_REPAIR, FEATURE_SEAL, MAX_HOOKS,
    MAX_HOOK_PAGES, STATUS_SEALED,
};

use crate::hooks::HookTable;

/// Reads guest memory for the device (descriptors live in guest RAM).
pub trait GuestReader: Send {
    /// Fills `buf` from guest-physical `gpa`; false if not wholly in RAM.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool;
}

pub use backdoor_abi::descriptor::Descriptor;

/// Shortest gap between two log lines about refused commands after seal.
pub const TAMPER_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct State {
    generation: u32,
    tamper: u32,
    /// When the last tamper line was logged, and the count then.
    tamper_logged: Option<Instant>,
    tamper_at_log: u32,
    table: HookTable,
    /// Bumped on every change, so a publisher can wait for the next one.
    version: u64,
}

/// The hook table and counters, shared between the device (guest side)
/// and whoever serves the backdoor (agent side). Lives in VMM memory: the
/// guest can only reach it through the device's commands.
#[derive(Debug)]
pub struct BackdoorShared {
    state: Mutex<State>,
    changed: Condvar,
    /// The table as of its last change, for readers that must not take
    /// `state` (which the vCPU's MMIO path holds): a remote READ clones
    /// this Arc, not the table.
    published: RwLock<Arc<Descriptor>>,
    /// The tamper count, readable without `state` (it changes without
    /// the table: refused commands are no table changes).
    tamper: AtomicU32,
}

impl BackdoorShared {
    /// A fresh, unsealed table at `generation` (0 is replaced by 1).
    pub fn new(generation: u32) -> Arc<Self> {
        let state = State {
            generation: generation.max(1),
            tamper: 0,
            tamper_logged: None,
            tamper_at_log: 0,
            table: HookTable::default(),
            version: 0,
        };
        Arc::new(Self {
            published: RwLock::new(Arc::new(describe(&state))),
            state: Mutex::new(state),
            changed: Condvar::new(),
            tamper: AtomicU32::new(0),
        })
    }

    /// The table as of its last change (its tamper count may be older
    /// than [`BackdoorShared::tamper_count`]'s).
    pub fn published(&self) -> Arc<Descriptor> {
        self.published
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits up to `timeout` for a table other than `seen` to be
    /// published, and returns the current one.
    pub fn wait_published(&self, seen: &Arc<Descriptor>, timeout: Duration) -> Arc<Descriptor> {
        let s = self.lock();
        let _unchanged = self
            .changed
            .wait_timeout_while(s, timeout, |_| Arc::ptr_eq(&self.published(), seen))
            .unwrap_or_else(|p| p.into_inner());
        self.published()
    }

    /// Commands refused after the seal, now.
    pub fn tamper_count(&self) -> u32 {
        self.tamper.load(Ordering::Relaxed)
    }

    /// Waits until the published state differs from version `seen` (or
    /// `timeout` passes) and returns the current version and state.
    pub fn wait_change(&self, seen: u64, timeout: Duration) -> (u64, Descriptor) {
        let s = self.lock();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.version == seen)
            .unwrap_or_else(|p| p.into_inner());
        (s.version, describe(&s))
    }

    fn changed(&self, s: &mut State) {
        s.version += 1;
        *self
            .published
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(describe(s));
        self.tamper.store(s.tamper, Ordering::Relaxed);
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A consistent copy of everything published.
    pub fn snapshot(&self) -> Descriptor {
        describe(&self.lock())
    }

    /// Guest reset: a new generation (never 0) and an empty, unsealed table.
    pub fn reset(&self) -> u32 {
        let mut s = self.lock();
        s.generation = match s.generation.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        s.tamper = 0;
        s.tamper_at_log = 0;
        s.table = HookTable::default();
        self.changed(&mut s);
        s.generation
    }
}

fn describe(s: &State) -> Descriptor {
    Descriptor {
        generation: s.generation,
        sealed: s.table.sealed(),
        tamper_count: s.tamper,
        hooks: s.table.hooks().to_vec(),
    }
}

/// The device: registers plus a reference to the shared table.
pub struct BackdoorDevice {
    shared: Arc<BackdoorShared>,
    mem: Box<dyn GuestReader>,
    ram: Vec<(u64, u64)>,
    desc_addr: u64,
    hook_id: u32,
    result: u32,
}

impl std::fmt::Debug for BackdoorDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackdoorDevice")
            .field("desc_addr", &self.desc_addr)
            .field("hook_id", &self.hook_id)
            .field("result", &self.result)
            .finish()
    }
}

impl BackdoorDevice {
    /// A device over `shared`, reading descriptors through `mem`; `ram`
    /// lists the guest RAM ranges (start, len) hooks must lie in.
    pub fn new(
        shared: Arc<BackdoorShared>,
        mem: Box<dyn GuestReader>,
        ram: Vec<(u64, u64)>,
    ) -> Self {
        Self {
            shared,
            mem,
            ram,
            desc_addr: 0,
            hook_id: 0,
            result: 0,
        }
    }

    /// A 32-bit register read; anything else reads all ones.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if data.len() == 4 && offset % 4 == 0 {
            self.reg(offset)
        } else {
            None
        };
        match value {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => data.fill(0xff),
        }
    }

    fn reg(&self, offset: u64) -> Option<u32> {
        let s = self.shared.lock();
        Some(match offset {
            reg::MAGIC => DEV_MAGIC,
            reg::VERSION => ABI_VERSION,
            reg::FEATURES => FEATURE_SEAL | FEATURE_REPAIR,
            reg::STATUS => {
                if s.table.sealed() {
                    STATUS_SEALED
                } else {
                    0
                }
            }
            reg::GENERATION => s.generation,
            reg::TAMPER_COUNT => s.tamper,
            reg::HOOK_COUNT => u32::try_from(s.table.hooks().len()).unwrap_or(u32::MAX),
            reg::MAX_HOOKS => MAX_HOOKS,
            reg::DESC_ADDR_LO => (self.desc_addr & 0xffff_ffff) as u32,
            reg::DESC_ADDR_HI => (self.desc_addr >> 32) as u32,
            reg::HOOK_ID => self.hook_id,
            reg::RESULT => self.result,
            reg::MAX_HOOK_PAGES => MAX_HOOK_PAGES,
            _ => return None,
        })
    }

    /// A 32-bit register write; anything else is ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            reg::DESC_ADDR_LO => self.desc_addr = (self.desc_addr & !0xffff_ffff) | u64::from(v),
            reg::DESC_ADDR_HI => {
                self.desc_addr = (self.desc_addr & 0xffff_ffff) | (u64::from(v) << 32)
            }
            reg::HOOK_ID => self.hook_id = v,
            reg::COMMAND => {
                self.result = match self.command(v) {
                    Ok(()) => 0,
                    Err(e) => e.code(),
                }
            }
            _ => {}
        }
    }

    fn descriptor(&self) -> Result<HookDesc, HookError> {
        let mut buf = [0u8; HookDesc::SIZE];
        if self.desc_addr % 8 != 0 || !self.mem.read(self.desc_addr, &mut buf) {
            return Err(HookError::Desc);
        }
        Ok(HookDesc::from_bytes(&buf))
    }

    fn command(&mut self, code: u32) -> Result<(), HookError> {
        let mut s = self.shared.lock();
        if s.table.sealed() {
            // Every command after the seal is an attempt to change a table
            // the guest promised to leave alone: refuse and count it. The
            // guest can repeat it as fast as it exits, so it is neither a
            // table change (no version bump, no push to a separate agent:
            // the count travels with the next periodic update) nor a log
            // line each: one summary per TAMPER_LOG_EVERY at most.
            s.tamper = s.tamper.saturating_add(1);
            self.shared.tamper.store(s.tamper, Ordering::Relaxed);
            let now = Instant::now();
            if s.tamper_logged
                .is_none_or(|t| now.duration_since(t) >= TAMPER_LOG_EVERY)
            {
                tracing::warn!(
                    command = code,
                    tamper_count = s.tamper,
                    refused_since_last_line = s.tamper - s.tamper_at_log,
                    "backdoor: commands after seal refused"
                );
                s.tamper_logged = Some(now);
                s.tamper_at_log = s.tamper;
            }
            return Err(HookError::Sealed);
        }
        let result = match code {
            cmd::REGISTER => self
                .descriptor()
                .and_then(|d| s.table.register(&d, &self.ram))
                .map(|id| self.hook_id = id),
            cmd::UNREGISTER => s.table.unregister(self.hook_id),
            cmd::UPDATE => self
                .descriptor()
                .and_then(|d| s.table.update(&d, &self.ram)),
            cmd::SEAL => s.table.seal(),
            _ => Err(HookError::Command),
        };
        if result.is_ok() {
            self.shared.changed(&mut s);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use backdoor_abi::{encode_name, HookKind, PERM_READ};

    use super::*;

    /// Guest RAM as a plain buffer.
    struct Ram(Vec<u8>);
    impl GuestReader for Ram {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let Ok(start) = usize::try_from(gpa) else {
                return false;
            };
            let Some(end) = start.checked_add(buf.len()) else {
                return false;
            };
            match self.0.get(start..end) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    fn device_with_desc(at: u64, d: &HookDesc) -> (BackdoorDevice, Arc<BackdoorShared>) {
        let mut ram = vec![0u8; 1 << 20];
        let at = usize::try_from(at).unwrap();
        ram[at..at + 64].copy_from_slice(&d.to_bytes());
        let shared = BackdoorShared::new(7);
        let dev = BackdoorDevice::new(shared.clone(), Box::new(Ram(ram)), vec![(0, 1 << 20)]);
        (dev, shared)
    }

    fn w(dev: &mut BackdoorDevice, off: u64, v: u32) {
        dev.write(off, &v.to_le_bytes());
    }

    fn r(dev: &mut BackdoorDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn hook_desc() -> HookDesc {
        HookDesc {
            gpa: 0x8_0000,
            len: 0x1000,
            kind: HookKind::ProgressBox as u32,
            perms: PERM_READ,
            id: 0,
            reserved: 0,
            name: encode_name("progress"),
        }
    }

    #[test]
    fn register_seal_and_tamper_through_registers() {
        let (mut dev, shared) = device_with_desc(0x1000, &hook_desc());
        assert_eq!(r(&mut dev, reg::MAGIC), DEV_MAGIC);
        assert_eq!(r(&mut dev, reg::GENERATION), 7);
        w(&mut dev, reg::DESC_ADDR_LO, 0x1000);
        w(&mut dev, reg::COMMAND, cmd::REGISTER);
        assert_eq!(r(&mut dev, reg::RESULT), 0);
        assert_eq!(r(&mut dev, reg::HOOK_ID), 1);
        w(&mut dev, reg::COMMAND, cmd::SEAL);
        assert_eq!(r(&mut dev, reg::STATUS), STATUS_SEALED);
        let (sealed_version, _) = shared.wait_change(u64::MAX, Duration::ZERO);
        for c in [cmd::REGISTER, cmd::UNREGISTER, cmd::UPDATE, cmd::SEAL, 77] {
            w(&mut dev, reg::COMMAND, c);
            assert_eq!(r(&mut dev, reg::RESULT), HookError::Sealed.code());
        }
        assert_eq!(r(&mut dev, reg::TAMPER_COUNT), 5);
        // Refused commands are counted, not published as table changes.
        let (version, d) = shared.wait_change(sealed_version, Duration::ZERO);
        assert_eq!((version, d.tamper_count), (sealed_version, 5));
        let d = shared.snapshot();
        assert_eq!(
            (d.generation, d.sealed, d.tamper_count, d.hooks.len()),
            (7, true, 5, 1)
        );
    }

    #[test]
    fn reset_gives_a_new_generation_and_an_empty_open_table() {
        let (mut dev, shared) = device_with_desc(0x1000, &hook_desc());
        w(&mut dev, reg::DESC_ADDR_LO, 0x1000);
        w(&mut dev, reg::COMMAND, cmd::REGISTER);
        w(&mut dev, reg::COMMAND, cmd::SEAL);
        w(&mut dev, reg::COMMAND, cmd::SEAL);
        assert_eq!(shared.reset(), 8);
        assert_eq!(r(&mut dev, reg::GENERATION), 8);
        assert_eq!(
            (
                r(&mut dev, reg::STATUS),
                r(&mut dev, reg::HOOK_COUNT),
                r(&mut dev, reg::TAMPER_COUNT)
            ),
            (0, 0, 0)
        );
        let wrap = BackdoorShared::new(u32::MAX);
        assert_eq!(wrap.reset(), 1, "generation 0 is never used");
    }

    #[test]
    fn bad_descriptor_addresses_and_odd_accesses_never_fail_the_device() {
        let (mut dev, _) = device_with_desc(0x1000, &hook_desc());
        for addr in [0x1004u64, 0xf_fff8, u64::MAX - 7] {
            w(&mut dev, reg::DESC_ADDR_LO, (addr & 0xffff_ffff) as u32);
            w(&mut dev, reg::DESC_ADDR_HI, (addr >> 32) as u32);
            w(&mut dev, reg::COMMAND, cmd::REGISTER);
            assert_eq!(
                r(&mut dev, reg::RESULT),
                HookError::Desc.code(),
                "{addr:#x}"
            );
        }
        let mut b1 = [0u8; 1];
        dev.read(reg::MAGIC, &mut b1);
        assert_eq!(b1, [0xff]);
        let mut b8 = [0u8; 8];
        dev.read(reg::MAGIC, &mut b8);
        assert_eq!(b8, [0xff; 8]);
        dev.read(0x2, &mut [0u8; 4]);
        dev.write(reg::COMMAND, &[1]); // wrong width: ignored
        dev.write(0xffc, &[1, 2, 3, 4]);
        assert_eq!(
            r(&mut dev, 0xff0),
            u32::MAX,
            "unknown register reads all ones"
        );
        w(&mut dev, reg::COMMAND, 99);
        assert_eq!(r(&mut dev, reg::RESULT), HookError::Command.code());
    }
}
