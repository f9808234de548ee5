//! One thread per vCPU: KVM_RUN in a loop, exits dispatched onto the buses,
//! pause/stop through the shared [`Lifecycle`], and a signal to kick a vCPU
//! out of KVM_RUN.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::bus::Bus;
use crate::exit_counters::ExitCounters;
use crate::lifecycle::{Lifecycle, VmExit};

/// KVM system-event types (include/uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// The real-time signal (offset from SIGRTMIN) used to kick vCPU threads.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Setting immediate_exit closes the race where the signal lands just
    // before KVM_RUN: the next KVM_RUN then returns EINTR at once.
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer targets this thread's mapped kvm_run, which
        // outlives the vCPU loop that set it (it is cleared before the fd drops).
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Installs the kick handler; call once before starting vCPU threads.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(
        vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET,
        kick_handler,
    )
}

/// What a vCPU thread needs.
#[derive(Debug)]
pub struct VcpuContext {
    /// vCPU index.
    pub index: u8,
    /// Port bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Shared run state.
    pub lifecycle: Arc<Lifecycle>,
    /// This vCPU's exit counters.
    pub counters: Arc<ExitCounters>,
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    /// The thread; its result is unused (exits are reported via the lifecycle).
    pub thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Interrupts KVM_RUN on this vCPU's thread.
    pub fn kick(&self) {
        // ESRCH only: the thread already ended, which is what a kick wants.
        let _ = self
            .thread
            .kill(vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET);
    }
}

/// Starts the vCPU's thread.
pub fn spawn(fd: VcpuFd, ctx: VcpuContext) -> std::io::Result<VcpuHandle> {
    ctx.lifecycle.vcpu_started();
    let lifecycle = ctx.lifecycle.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{}", ctx.index))
        .spawn(move || run_loop(fd, ctx));
    match thread {
        Ok(thread) => Ok(VcpuHandle { thread }),
        Err(e) => {
            lifecycle.vcpu_exited();
            Err(e)
        }
    }
}

fn run_loop(mut fd: VcpuFd, ctx: VcpuContext) {
    let run: *mut kvm_run = fd.get_kvm_run();
    // SAFETY: `run` points at this vCPU's kvm_run mapping, valid while `fd` lives.
    let flag = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
    IMMEDIATE_EXIT.with(|c| c.set(flag));
    while ctx.lifecycle.vcpu_gate() {
        if let Some(why) = run_once(&mut fd, &ctx) {
            ctx.lifecycle.request_exit(why);
            break;
        }
    }
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    ctx.lifecycle.vcpu_exited();
}

/// Runs the vCPU until its next exit; returns a reason if the VM must stop.
fn run_once(fd: &mut VcpuFd, ctx: &VcpuContext) -> Option<VmExit> {
    let c = &ctx.counters;
    let vcpu = ctx.index;
    match fd.run() {
        Ok(VcpuExit::IoOut(port, data)) => {
            ExitCounters::bump(&c.io_out);
            ctx.pio.write(u64::from(port), data);
            None
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            ExitCounters::bump(&c.io_in);
            ctx.pio.read(u64::from(port), data);
            None
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            ExitCounters::bump(&c.mmio_read);
            ctx.mmio.read(addr, data);
            None
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            ExitCounters::bump(&c.mmio_write);
            ctx.mmio.write(addr, data);
            None
        }
        Ok(VcpuExit::Hlt) => {
            ExitCounters::bump(&c.hlt);
            None
        }
        Ok(VcpuExit::Shutdown) => {
            ExitCounters::bump(&c.shutdown);
            eprintln!(
                "bdvmm: vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN)\n{}",
                dump(fd)
            );
            Some(VmExit::TripleFault { vcpu })
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => {
            ExitCounters::bump(&c.system_event);
            match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(VmExit::PowerOff { status: 0 }),
                KVM_SYSTEM_EVENT_RESET => Some(VmExit::Reset),
                other => Some(kvm_error(fd, vcpu, format!("system event {other}"))),
            }
        }
        Ok(VcpuExit::InternalError) => {
            ExitCounters::bump(&c.error);
            // SAFETY: KVM filled the `internal` union member for this exit reason.
            let internal = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal };
            let n = (internal.ndata as usize).min(internal.data.len());
            let data: Vec<String> = internal.data[..n]
                .iter()
                .map(|d| format!("{d:#x}"))
                .collect();
            let what = match internal.suberror {
                1 => "emulation failure",
                2 => "simultaneous exceptions",
                3 => "delivery event failure",
                _ => "internal error",
            };
            Some(kvm_error(
                fd,
                vcpu,
                format!(
                    "KVM internal error: {what} (suberror {}) data [{}]",
                    internal.suberror,
                    data.join(" ")
                ),
            ))
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => {
            ExitCounters::bump(&c.error);
            Some(kvm_error(
                fd,
                vcpu,
                format!("KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}"),
            ))
        }
        Ok(other) => {
            ExitCounters::bump(&c.error);
            let what = format!("unhandled KVM exit {other:?}");
            Some(kvm_error(fd, vcpu, what))
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            ExitCounters::bump(&c.interrupted);
            fd.set_kvm_immediate_exit(0);
            None
        }
        Err(e) => {
            ExitCounters::bump(&c.error);
            Some(kvm_error(fd, vcpu, format!("KVM_RUN failed: {e}")))
        }
    }
}

fn kvm_error(fd: &VcpuFd, vcpu: u8, detail: String) -> VmExit {
    eprintln!("bdvmm: vCPU {vcpu}: {detail}\n{}", dump(fd));
    VmExit::KvmError { vcpu, detail }
}

/// The vCPU's registers in QEMU's `info registers` layout.
pub fn dump(fd: &VcpuFd) -> String {
    let mut s = String::new();
    let (Ok(r), Ok(sr)) = (fd.get_regs(), fd.get_sregs()) else {
        return "(registers unavailable)".into();
    };
    let _ = writeln!(
        s,
        "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}",
        r.rax, r.rbx, r.rcx, r.rdx
    );
    let _ = writeln!(
        s,
        "RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}",
        r.rsi, r.rdi, r.rbp, r.rsp
    );
    let _ = writeln!(
        s,
        "R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}",
        r.r8, r.r9, r.r10, r.r11
    );
    let _ = writeln!(
        s,
        "R12={:016x} R13={:016x} R14={:016x} R15={:016x}",
        r.r12, r.r13, r.r14, r.r15
    );
    let _ = writeln!(
        s,
        "RIP={:016x} RFL={:08x} CPL={}",
        r.rip, r.rflags, sr.cs.dpl
    );
    for (name, seg) in [
        ("ES", sr.es),
        ("CS", sr.cs),
        ("SS", sr.ss),
        ("DS", sr.ds),
        ("FS", sr.fs),
        ("GS", sr.gs),
        ("TR", sr.tr),
    ] {
        let _ = writeln!(
            s,
            "{name} ={:04x} {:016x} {:08x} type={:x} dpl={} l={} db={}",
            seg.selector, seg.base, seg.limit, seg.type_, seg.dpl, seg.l, seg.db
        );
    }
    let _ = writeln!(s, "GDT=     {:016x} {:08x}", sr.gdt.base, sr.gdt.limit);
    let _ = writeln!(s, "IDT=     {:016x} {:08x}", sr.idt.base, sr.idt.limit);
    let _ = write!(
        s,
        "CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x} EFER={:016x}",
        sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer
    );
    s
}
