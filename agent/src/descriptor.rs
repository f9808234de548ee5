//! Where the agent gets the hook table from (the VMM's live table, or the
//! last one a VMM pushed); what it tells monitors about it is
//! `backdoor_proto::descriptor::PublicDescriptor`.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use backdoor_dev::{BackdoorShared, Descriptor};

pub use backdoor_proto::descriptor::{PublicDescriptor, PublicHook};

/// Where the agent reads the current hook table.
pub trait DescriptorSource: Send + Sync {
    /// The current table (shared: every request reads it, none copies it).
    fn descriptor(&self) -> Arc<Descriptor>;
    /// The tamper count now (it can be newer than the table's).
    fn tamper_count(&self) -> u32 {
        self.descriptor().tamper_count
    }
    /// Whether the VMM that owns the guest is still there.
    fn vmm_alive(&self) -> bool;
    /// Waits up to `timeout` for a table other than `seen`; returns the
    /// current one (what revokes a rebooted guest's RDMA regions at once).
    fn wait_change(&self, seen: &Arc<Descriptor>, timeout: Duration) -> Arc<Descriptor> {
        let _ = seen;
        std::thread::sleep(timeout);
        self.descriptor()
    }
}

/// In-process agent: the VMM's live table, read without the device's lock.
impl DescriptorSource for BackdoorShared {
    fn descriptor(&self) -> Arc<Descriptor> {
        self.published()
    }
    fn wait_change(&self, seen: &Arc<Descriptor>, timeout: Duration) -> Arc<Descriptor> {
        self.wait_published(seen, timeout)
    }
    fn tamper_count(&self) -> u32 {
        BackdoorShared::tamper_count(self)
    }
    fn vmm_alive(&self) -> bool {
        true
    }
}

/// Separate agent: the last table the VMM pushed, kept after it dies.
#[derive(Debug)]
pub struct PushedDescriptor {
    state: Mutex<(Arc<Descriptor>, bool)>,
    changed: Condvar,
}

impl PushedDescriptor {
    /// Starts with `d`, VMM connected.
    pub fn new(d: Descriptor) -> Self {
        Self {
            state: Mutex::new((Arc::new(d), true)),
            changed: Condvar::new(),
        }
    }

    /// A newer table from the VMM.
    pub fn update(&self, d: Descriptor) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = Arc::new(d);
        self.changed.notify_all();
    }

    /// The VMM went away; the last table stays in force.
    pub fn vmm_gone(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 = false;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for the table to reach `generation`, for tests and tools.
    pub fn wait_generation(&self, generation: u32, timeout: Duration) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.0.generation != generation)
            .unwrap_or_else(|p| p.into_inner());
        s.0.generation == generation
    }
}

impl DescriptorSource for PushedDescriptor {
    fn descriptor(&self) -> Arc<Descriptor> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }
    fn vmm_alive(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1
    }
    fn wait_change(&self, seen: &Arc<Descriptor>, timeout: Duration) -> Arc<Descriptor> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| Arc::ptr_eq(&s.0, seen))
            .unwrap_or_else(|p| p.into_inner());
        s.0.clone()
    }
}

/// Where the VMM says the guest's vCPUs are (bdvmm's `vcpus`: registers as
/// of each vCPU's last exit, or of a kick).
pub trait VcpuSource: Send + Sync {
    /// The report as JSON (`{"vcpus": [...], ...}`), or None if the VMM
    /// gave none.
    fn vcpus(&self) -> Option<serde_json::Value>;

    /// How much CPU the host gave each vCPU thread, read now from the
    /// host's /proc (never from guest memory): `{"vcpus": [...]}` of
    /// [`crate::sched::ThreadSched`], or None if unknown.
    fn sched(&self) -> Option<serde_json::Value> {
        None
    }
}

/// The last vCPU report a separate VMM pushed over the link, and when.
#[derive(Debug, Default)]
pub struct PushedVcpus {
    last: Mutex<Option<(serde_json::Value, std::time::Instant)>>,
    /// The VMM's process (0: unknown or gone), whose vCPU threads the
    /// agent reads itself: a stopped or dead VMM pushes nothing.
    vmm_pid: std::sync::atomic::AtomicU32,
}

impl PushedVcpus {
    /// Reports of the VMM process `pid`.
    pub fn of_pid(pid: u32) -> Self {
        Self {
            last: Mutex::default(),
            vmm_pid: pid.into(),
        }
    }

    /// The VMM's link closed: its pid may be another process's soon.
    pub fn vmm_gone(&self) {
        self.vmm_pid.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Replaces the report.
    pub fn update(&self, v: serde_json::Value) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((v, std::time::Instant::now()));
    }
}

impl VcpuSource for PushedVcpus {
    fn vcpus(&self) -> Option<serde_json::Value> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (v, at) = last.as_ref()?;
        let mut v = v.clone();
        // Pushed every few hundred milliseconds, without a kick: say how old.
        v["age_ms"] =
            serde_json::json!(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX));
        Some(v)
    }

    fn sched(&self) -> Option<serde_json::Value> {
        // Read from the host, not from what the VMM pushed: a VMM that is
        // stopped or dead pushes nothing.
        let pid = self.vmm_pid.load(std::sync::atomic::Ordering::Relaxed);
        (pid != 0).then(|| crate::sched::report(pid, &crate::sched::vcpu_threads(pid)))
    }
}
