//! COM1: a 16550A-compatible UART (vm-superio) whose output goes to
//! stdout and, optionally, a console log file; its interrupt is an irqfd.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1's first port.
pub const PORT: u16 = 0x3f8;
/// COM1 decodes eight ports.
pub const LEN: u64 = 8;
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

/// The COM1 device on the port bus.
pub struct SerialDevice {
    uart: Serial<IrqfdTrigger, NoEvents, ConsoleOut>,
    write_errors: u64,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("write_errors", &self.write_errors)
            .finish()
    }
}

impl SerialDevice {
    /// A UART that interrupts through `irq` and prints to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        Self {
            uart: Serial::new(IrqfdTrigger(irq), out),
            write_errors: 0,
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        let Ok(offset) = u8::try_from(offset) else {
            data[0] = 0xff;
            return;
        };
        data[0] = self.uart.read(offset);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
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
