//! The main thread's event loop (event-manager): SIGINT/SIGTERM, the VM's
//! exit event and the control socket. It runs until the VM has an exit reason.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use crate::lifecycle::{Lifecycle, VmExit};

/// The eventfd the signal handler writes to (-1 until installed).
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
/// That eventfd, open for the whole process: every boot's loop (one per
/// reboot) watches the same one, so the handler never writes into a
/// number that a later file reused, and a signal that arrives between two
/// boots stops the next one.
static SIGNAL_EVT: OnceLock<EventFd> = OnceLock::new();
/// The last termination signal received.
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_termination_signal(
    sig: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    LAST_SIGNAL.store(sig, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; the buffer is a local array.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll or eventfd set-up failed.
    #[error("event loop set-up failed: {0}")]
    Setup(String),
}

/// Turns termination signals into a VM exit.
struct SignalWatcher {
    evt: &'static EventFd,
    lifecycle: Arc<Lifecycle>,
}

impl MutEventSubscriber for SignalWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.evt, EventSet::IN));
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.evt.read();
        let signal = LAST_SIGNAL.load(Ordering::SeqCst);
        eprintln!("bdvmm: received signal {signal}, stopping the VM");
        self.lifecycle.request_exit(VmExit::Signal { signal });
    }
}

/// Wakes the loop when the VM must stop (the check happens in [`run`]).
struct ExitWatcher {
    lifecycle: Arc<Lifecycle>,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.lifecycle.exit_event(), EventSet::IN));
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.lifecycle.exit_event().read();
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The process's signal eventfd, with the handlers installed on first use.
fn signal_event() -> Result<&'static EventFd, String> {
    if let Some(evt) = SIGNAL_EVT.get() {
        return Ok(evt);
    }
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("signal eventfd: {e}"))?;
    // Only the main thread gets here; a lost race would keep the first.
    let _ = SIGNAL_EVT.set(evt);
    let evt = SIGNAL_EVT.get().ok_or("signal eventfd: not set")?;
    SIGNAL_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, on_termination_signal)
            .map_err(|e| format!("signal handler: {e}"))?;
    }
    Ok(evt)
}

/// Runs until the VM has an exit reason, then returns it.
pub fn run(lifecycle: Arc<Lifecycle>, extra: Vec<Subscriber>) -> Result<VmExit, EventLoopError> {
    let setup = |e: &dyn std::fmt::Debug| EventLoopError::Setup(format!("{e:?}"));
    let mut em: EventManager<Subscriber> = EventManager::new().map_err(|e| setup(&e))?;
    let sig_evt = signal_event().map_err(EventLoopError::Setup)?;
    em.add_subscriber(Arc::new(Mutex::new(SignalWatcher {
        evt: sig_evt,
        lifecycle: lifecycle.clone(),
    })));
    em.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
        lifecycle: lifecycle.clone(),
    })));
    for s in extra {
        em.add_subscriber(s);
    }
    loop {
        if let Some(why) = lifecycle.exit_reason() {
            return Ok(why);
        }
        if let Err(e) = em.run_with_timeout(1000) {
            // A signal interrupting epoll_wait is expected; anything else is not.
            if !matches!(&e, event_manager::Error::Epoll(err) if err.errno() == libc::EINTR) {
                return Err(setup(&e));
            }
        }
    }
}
