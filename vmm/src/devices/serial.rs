//! COM1: a 16550A-compatible UART (vm-superio) whose output goes to
//! stdout and, optionally, a console log file, and whose input is bdvmm's
//! standard input; its interrupt is an irqfd.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// COM1's first port.
pub const PORT: u16 = 0x3f8;
/// COM1 decodes eight ports.
pub const LEN: u16 = 8;
/// COM1's ISA interrupt line.
pub const IRQ: u32 = 4;

/// Raises the UART's interrupt by signalling the irqfd KVM listens on.
#[derive(Debug)]
pub struct IrqfdTrigger(pub EventFd);

impl Trigger for IrqfdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console bytes go: stdout, and a log file if asked for.
#[derive(Debug)]
pub struct ConsoleOut {
    stdout: io::Stdout,
    log: Option<File>,
}

impl ConsoleOut {
    /// Console to stdout plus `log`.
    pub fn new(log: Option<File>) -> Self {
        Self {
            stdout: io::stdout(),
            log,
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Unbuffered on purpose: whoever watches the console (a person, a
        // test) sees each byte as soon as the guest writes it.
        let mut out = self.stdout.lock();
        out.write_all(buf)?;
        out.flush()?;
        if let Some(log) = &mut self.log {
            log.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stdout.flush()
    }
}

/// Console input waiting for room in the UART's 64-byte receive FIFO.
/// What a guest that never reads its console would leave queued beyond
/// this is dropped (and counted), so input cannot grow bdvmm's memory.
pub const INPUT_QUEUE_MAX: usize = 64 * 1024;

/// The COM1 device on the port bus.
pub struct SerialDevice {
    uart: Serial<IrqfdTrigger, NoEvents, ConsoleOut>,
    write_errors: u64,
    input: VecDeque<u8>,
    dropped_input: u64,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("write_errors", &self.write_errors)
            .field("queued_input", &self.input.len())
            .field("dropped_input", &self.dropped_input)
            .finish()
    }
}

impl SerialDevice {
    /// A UART that interrupts through `irq` and prints to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        Self {
            uart: Serial::new(IrqfdTrigger(irq), out),
            write_errors: 0,
            input: VecDeque::new(),
            dropped_input: 0,
        }
    }

    /// Queues bytes for the guest to receive; they enter the FIFO as it
    /// drains.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        let room = INPUT_QUEUE_MAX - self.input.len();
        let (kept, dropped) = bytes.split_at(bytes.len().min(room));
        self.input.extend(kept);
        if !dropped.is_empty() {
            if self.dropped_input == 0 {
                tracing::warn!("the guest does not read its console: dropping console input");
            }
            self.dropped_input += dropped.len() as u64;
        }
        self.refill();
    }

    /// Bytes of console input dropped because the guest did not read them.
    pub fn dropped_input(&self) -> u64 {
        self.dropped_input
    }

    /// Moves queued input into the receive FIFO, as far as it has room.
    fn refill(&mut self) {
        let n = self.uart.fifo_capacity().min(self.input.len());
        if n == 0 {
            return;
        }
        let chunk: Vec<u8> = self.input.drain(..n).collect();
        // Fails only if the interrupt cannot be raised; the bytes are in
        // the FIFO either way and the guest's next poll finds them.
        let _ = self.uart.enqueue_raw_bytes(&chunk);
    }
}

impl MutDevicePio for SerialDevice {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        let Ok(offset) = u8::try_from(offset) else {
            data[0] = 0xff;
            return;
        };
        data[0] = self.uart.read(offset);
        // Reading the receive buffer made room in the FIFO.
        if offset == 0 && !self.input.is_empty() {
            self.refill();
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let (1, Ok(offset)) = (data.len(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(offset, data[0]) {
            // A closed stdout must not stop the guest; say so once.
            if self.write_errors == 0 {
                tracing::warn!("serial console output failed: {e:?}");
            }
            self.write_errors += 1;
        }
    }
}

/// Feeds bdvmm's standard input to COM1, as Firecracker does: whatever is
/// written to bdvmm's stdin (a terminal, a pipe) the guest reads from its
/// serial console. Stdin that cannot be polled (a regular file,
/// `/dev/null`) gives no console input.
pub struct ConsoleInput {
    com1: Arc<Mutex<SerialDevice>>,
}

impl std::fmt::Debug for ConsoleInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleInput").finish_non_exhaustive()
    }
}

impl ConsoleInput {
    /// Console input from fd 0.
    pub fn stdin(com1: Arc<Mutex<SerialDevice>>) -> Self {
        Self { com1 }
    }
}

/// fd 0, borrowed for epoll and read.
fn stdin_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 0 stays open for the life of the process (bdvmm never
    // closes it).
    unsafe { BorrowedFd::borrow_raw(0) }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        let fd = stdin_fd();
        if let Err(e) = ops.add(Events::new(&fd, EventSet::IN)) {
            tracing::debug!("stdin cannot be polled ({e:?}): no console input");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = stdin_fd();
        let mut buf = [0u8; 4096];
        // One read per readiness event: epoll said it will not block, and
        // stdin's open file is shared with the parent, so it stays blocking.
        // SAFETY: buf is a valid, writable buffer of buf.len() bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Err(_)
                if matches!(
                    io::Error::last_os_error().raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN)
                ) => {}
            Ok(0) | Err(_) => {
                // End of input, or an error that would repeat: stop polling.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                let mut com1 = self.com1.lock().unwrap_or_else(|p| p.into_inner());
                com1.queue_input(&buf[..n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: PioAddress = PioAddress(PORT);

    fn com1() -> SerialDevice {
        SerialDevice::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOut::new(None),
        )
    }

    /// Reads what the guest would: LSR data-ready, then RBR, until empty.
    fn drain(dev: &mut SerialDevice) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = [0u8];
        loop {
            dev.pio_read(BASE, 5, &mut b);
            if b[0] & 1 == 0 {
                return out;
            }
            dev.pio_read(BASE, 0, &mut b);
            out.push(b[0]);
        }
    }

    #[test]
    fn input_longer_than_the_fifo_arrives_whole_and_in_order() {
        let mut dev = com1();
        let input: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        dev.queue_input(&input[..300]);
        dev.queue_input(&input[300..]);
        assert_eq!(drain(&mut dev), input);
        assert_eq!(dev.dropped_input(), 0);
    }

    #[test]
    fn a_guest_that_never_reads_bounds_what_bdvmm_keeps() {
        let mut dev = com1();
        let input: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        dev.queue_input(&input);
        assert_eq!(dev.dropped_input(), (100_000 - INPUT_QUEUE_MAX) as u64);
        assert_eq!(
            drain(&mut dev),
            &input[..INPUT_QUEUE_MAX],
            "the oldest input is kept"
        );
    }
}
