//! The VM's run state, shared by the vCPU threads, the devices and the
//! event loop: run / pause / stop requests, and why the VM stopped.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum VmExit {
    /// The guest wrote `status` to the debug-exit port (or KVM reported a power-off).
    PowerOff { status: u32 },
    /// The guest asked for a reset (i8042 0xfe, or a KVM reset event).
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8 },
    /// KVM could not run a vCPU: internal error, failed entry, unknown exit.
    KvmError { vcpu: u8, detail: String },
    /// bdvmm received SIGINT or SIGTERM.
    Signal { signal: i32 },
    /// The control socket asked bdvmm to stop.
    ApiStop,
}

/// What the vCPUs are asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Run guest code.
    Running,
    /// Park outside KVM_RUN until resumed.
    Paused,
    /// Leave the vCPU loop for good.
    Stopping,
}

#[derive(Debug)]
struct State {
    desired: RunState,
    alive: usize,
    parked: usize,
    exit: Option<VmExit>,
}

/// Errors from lifecycle requests.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LifecycleError {
    /// The VM is already stopping.
    #[error("the VM is stopping")]
    Stopping,
    /// Not every vCPU parked in time.
    #[error("only {parked} of {alive} vCPUs paused within {timeout_ms} ms")]
    PauseTimeout {
        parked: usize,
        alive: usize,
        timeout_ms: u128,
    },
}

/// Shared run state. vCPU threads call [`Lifecycle::vcpu_gate`] before every
/// KVM_RUN; everyone else requests changes and kicks the vCPUs.
#[derive(Debug)]
pub struct Lifecycle {
    state: Mutex<State>,
    changed: Condvar,
    exit_evt: EventFd,
    kicker: Kicker,
    started: Instant,
}

/// Makes every vCPU thread leave KVM_RUN.
pub struct Kicker(pub Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Kicker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kicker")
    }
}

impl Lifecycle {
    /// `kicker` must make every vCPU thread leave KVM_RUN promptly.
    pub fn new(exit_evt: EventFd, kicker: Box<dyn Fn() + Send + Sync>) -> Self {
        Self {
            state: Mutex::new(State {
                desired: RunState::Running,
                alive: 0,
                parked: 0,
                exit: None,
            }),
            changed: Condvar::new(),
            exit_evt,
            kicker: Kicker(kicker),
            started: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking vCPU thread must not take the whole VMM down with a
        // poisoned lock: the state stays consistent under every update.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The event loop watches this fd to learn that the VM must stop.
    pub fn exit_event(&self) -> &EventFd {
        &self.exit_evt
    }

    /// When the VMM started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records why the VM stops (first caller wins) and stops the vCPUs.
    pub fn request_exit(&self, why: VmExit) {
        let mut s = self.lock();
        if s.exit.is_none() {
            s.exit = Some(why);
        }
        s.desired = RunState::Stopping;
        self.changed.notify_all();
        drop(s);
        // An eventfd write only fails if the counter would overflow: then it is already signalled.
        let _ = self.exit_evt.write(1);
        (self.kicker.0)();
    }

    /// Why the VM stopped, once it has.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.lock().exit.clone()
    }

    /// What the vCPUs are asked to do now.
    pub fn run_state(&self) -> RunState {
        self.lock().desired
    }

    /// Called once by each vCPU thread when it starts.
    pub fn vcpu_started(&self) {
        self.lock().alive += 1;
    }

    /// Called once by each vCPU thread when it leaves its loop.
    pub fn vcpu_exited(&self) {
        let mut s = self.lock();
        s.alive -= 1;
        self.changed.notify_all();
    }

    /// Blocks while the VM is paused. Returns false when the vCPU must stop.
    pub fn vcpu_gate(&self) -> bool {
        let mut s = self.lock();
        if s.desired == RunState::Paused {
            s.parked += 1;
            self.changed.notify_all();
            while s.desired == RunState::Paused {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.parked -= 1;
        }
        s.desired == RunState::Running
    }

    /// Pauses every vCPU and waits until all are parked outside KVM_RUN.
    pub fn pause(&self, timeout: Duration) -> Result<(), LifecycleError> {
        let mut s = self.lock();
        match s.desired {
            RunState::Stopping => return Err(LifecycleError::Stopping),
            RunState::Paused if s.parked == s.alive => return Ok(()),
            _ => s.desired = RunState::Paused,
        }
        drop(s);
        (self.kicker.0)();
        let s = self.lock();
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| {
                s.parked < s.alive && s.desired == RunState::Paused
            })
            .unwrap_or_else(|p| p.into_inner());
        match s.desired {
            RunState::Stopping => Err(LifecycleError::Stopping),
            _ if s.parked < s.alive => Err(LifecycleError::PauseTimeout {
                parked: s.parked,
                alive: s.alive,
                timeout_ms: timeout.as_millis(),
            }),
            _ => Ok(()),
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), LifecycleError> {
        let mut s = self.lock();
        if s.desired == RunState::Stopping {
            return Err(LifecycleError::Stopping);
        }
        s.desired = RunState::Running;
        self.changed.notify_all();
        Ok(())
    }

    /// Makes every vCPU leave KVM_RUN once (it then goes on running).
    pub fn kick_all(&self) {
        (self.kicker.0)();
    }

    /// Waits until every vCPU thread has left its loop, kicking them meanwhile.
    pub fn wait_vcpus_exited(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.lock();
            if s.alive == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            let (s, _) = self
                .changed
                .wait_timeout(s, wait)
                .unwrap_or_else(|p| p.into_inner());
            drop(s);
            // Re-kick: a vCPU may have been between its gate check and KVM_RUN.
            (self.kicker.0)();
        }
    }
}

/// A lifecycle with a fresh exit eventfd and no vCPUs to kick, for device tests.
#[cfg(test)]
pub(crate) fn for_tests() -> std::sync::Arc<Lifecycle> {
    std::sync::Arc::new(Lifecycle::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        Box::new(|| {}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::for_tests as lifecycle;

    #[test]
    fn first_exit_reason_wins_and_signals_the_event() {
        let l = lifecycle();
        l.request_exit(VmExit::TripleFault { vcpu: 1 });
        l.request_exit(VmExit::ApiStop);
        assert_eq!(l.exit_reason(), Some(VmExit::TripleFault { vcpu: 1 }));
        assert_eq!(l.exit_event().read().unwrap(), 2);
        assert_eq!(l.run_state(), RunState::Stopping);
    }

    #[test]
    fn pause_waits_for_every_vcpu_to_park_and_resume_releases_them() {
        let l = lifecycle();
        let mut threads = Vec::new();
        for _ in 0..3 {
            l.vcpu_started();
        }
        for _ in 0..3 {
            let l = l.clone();
            threads.push(std::thread::spawn(move || {
                let mut rounds = 0u64;
                while l.vcpu_gate() {
                    rounds += 1;
                    std::thread::yield_now();
                }
                l.vcpu_exited();
                rounds
            }));
        }
        l.pause(Duration::from_secs(5)).unwrap();
        assert_eq!(l.lock().parked, 3);
        l.resume().unwrap();
        l.request_exit(VmExit::ApiStop);
        assert!(l.wait_vcpus_exited(Duration::from_secs(5)));
        for t in threads {
            t.join().unwrap();
        }
        assert!(l.resume().is_err());
    }

    #[test]
    fn pause_times_out_when_a_vcpu_never_reaches_its_gate() {
        let l = lifecycle();
        l.vcpu_started();
        let err = l.pause(Duration::from_millis(50)).unwrap_err();
        assert!(matches!(
            err,
            LifecycleError::PauseTimeout {
                parked: 0,
                alive: 1,
                ..
            }
        ));
    }
}
