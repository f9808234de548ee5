//! Watchdog timer in the manner of QEMU's i6300esb: the guest arms it with
//! a timeout and must pet it again before the timeout runs out, or the VM
//! is reset (i6300esb's default action). Every pet is a port write, so
//! every pet is a VM exit: this is how VMs detect hangs today, and the
//! benchmark suite compares its guest-side cost with a progress counter.
//!
//! Protocol (one port, any width up to 4 bytes, little-endian):
//! write `ms > 0`: arm (or re-arm) with a timeout of `ms` and pet;
//! write 0: disarm. A read returns the armed timeout in ms (0: disarmed).
//! A real i6300esb pet is three MMIO writes (two unlock writes, then the
//! reload); this device needs one, the cheapest a device-based pet can be.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::lifecycle::{Lifecycle, RunState, VmExit};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// I/O port of the device (free in bdvmm's port map, next to the boot timer).
pub const PORT: u16 = 0xf6;
/// Ports it decodes.
pub const LEN: u16 = 1;
/// How often the expiry thread looks at the deadline.
const TICK: Duration = Duration::from_millis(5);

#[derive(Debug)]
struct State {
    timeout: Option<Duration>,
    deadline: Instant,
    pets: u64,
}

/// The watchdog device.
#[derive(Debug)]
pub struct Watchdog {
    state: Arc<Mutex<State>>,
    lifecycle: Arc<Lifecycle>,
    thread_started: bool,
}

impl Watchdog {
    /// A disarmed watchdog that resets `lifecycle`'s VM when it expires.
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                timeout: None,
                deadline: Instant::now(),
                pets: 0,
            })),
            lifecycle,
            thread_started: false,
        }
    }

    /// How many times the guest has petted (armed writes).
    pub fn pets(&self) -> u64 {
        lock(&self.state).pets
    }

    fn start_expiry_thread(&mut self) {
        if self.thread_started {
            return;
        }
        self.thread_started = true;
        // Only guests that arm the watchdog pay for its thread.
        let state = Arc::downgrade(&self.state);
        let lifecycle = self.lifecycle.clone();
        let spawned = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || expiry_loop(&state, &lifecycle));
        if let Err(e) = spawned {
            tracing::error!("watchdog: cannot start its timer thread: {e}");
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resets the VM once the armed deadline passes; ends with the machine.
fn expiry_loop(state: &Weak<Mutex<State>>, lifecycle: &Lifecycle) {
    loop {
        std::thread::sleep(TICK);
        let Some(state) = state.upgrade() else { return };
        let mut s = lock(&state);
        match lifecycle.run_state() {
            RunState::Stopping => return,
            // A paused guest cannot pet: its time does not run (as in QEMU).
            RunState::Paused => {
                if let Some(t) = s.timeout {
                    s.deadline = Instant::now() + t;
                }
            }
            RunState::Running => {
                if let Some(t) = s.timeout {
                    if Instant::now() >= s.deadline {
                        s.timeout = None;
                        drop(s);
                        tracing::warn!(
                            "watchdog: not petted for {} ms: resetting the VM",
                            t.as_millis()
                        );
                        lifecycle.request_exit(VmExit::Reset);
                        return;
                    }
                }
            }
        }
    }
}

impl MutDevicePio for Watchdog {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        let ms = lock(&self.state)
            .timeout
            .map_or(0, |t| u32::try_from(t.as_millis()).unwrap_or(u32::MAX));
        let bytes = ms.to_le_bytes();
        for (d, b) in data
            .iter_mut()
            .zip(bytes.iter().chain(std::iter::repeat(&0)))
        {
            *d = *b;
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let mut raw = [0u8; 4];
        let n = data.len().min(4);
        raw[..n].copy_from_slice(&data[..n]);
        let ms = u32::from_le_bytes(raw);
        let mut s = lock(&self.state);
        if ms == 0 {
            s.timeout = None;
            return;
        }
        let t = Duration::from_millis(u64::from(ms));
        s.timeout = Some(t);
        s.deadline = Instant::now() + t;
        s.pets += 1;
        drop(s);
        self.start_expiry_thread();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::for_tests as lifecycle;

    const BASE: PioAddress = PioAddress(PORT);

    #[test]
    fn petting_keeps_the_vm_alive_and_silence_resets_it() {
        let lc = lifecycle();
        let mut wd = Watchdog::new(lc.clone());
        let mut timeout = [0u8; 4];
        wd.pio_read(BASE, 0, &mut timeout);
        assert_eq!(u32::from_le_bytes(timeout), 0, "starts disarmed");
        for _ in 0..10 {
            wd.pio_write(BASE, 0, &60u32.to_le_bytes());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(wd.pets(), 10);
        assert_eq!(lc.exit_reason(), None, "petted in time");
        wd.pio_read(BASE, 0, &mut timeout);
        assert_eq!(u32::from_le_bytes(timeout), 60);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(lc.exit_reason(), Some(VmExit::Reset));
    }

    #[test]
    fn a_disarmed_watchdog_never_fires() {
        let lc = lifecycle();
        let mut wd = Watchdog::new(lc.clone());
        wd.pio_write(BASE, 0, &[30]);
        wd.pio_write(BASE, 0, &[0]);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(lc.exit_reason(), None);
        assert_eq!(wd.pets(), 1);
    }
}
