//! One thread per vCPU: KVM_RUN in a loop, exits dispatched onto the buses,
//! pause/stop through the shared [`Lifecycle`], and a signal to kick a vCPU
//! out of KVM_RUN.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::bus::Io;
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
    /// The port and MMIO buses.
    pub io: Arc<Io>,
    /// Shared run state.
    pub lifecycle: Arc<Lifecycle>,
    /// This vCPU's exit counters.
    pub counters: Arc<ExitCounters>,
    /// Whether KVM can copy registers into kvm_run on exit (KVM_CAP_SYNC_REGS).
    pub sync_regs: bool,
    /// Where this vCPU was at its last exit, for the control socket.
    pub location: Arc<VcpuLocation>,
}

/// Where a vCPU was, as of one exit from KVM_RUN (an I/O exit, or a kick).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Location {
    /// vCPU index.
    pub vcpu: u8,
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// RFLAGS.IF: whether it takes interrupts.
    pub interrupts_enabled: bool,
    /// Page-table root.
    pub cr3: u64,
    /// CR4 (LA57 says how many levels the page tables have).
    pub cr4: u64,
    /// Privilege level (CS.DPL).
    pub cpl: u8,
    /// Whether KVM had it halted (waiting for an interrupt); known only
    /// for a location taken on request.
    pub halted: Option<bool>,
    /// Exits from KVM_RUN so far, this one included.
    pub exits: u64,
}

/// A vCPU's latest [`Location`], written by its thread after every exit,
/// and the one it gave when last asked (with its MP state).
#[derive(Debug, Default)]
pub struct VcpuLocation {
    /// The vCPU thread's id, once it runs.
    tid: std::sync::atomic::AtomicI32,
    last: Mutex<Option<Location>>,
    answer: Mutex<Option<Location>>,
    /// Exit count of the latest answer.
    answered: AtomicU64,
    /// Set by a reader: the next exit answers, MP state included.
    wanted: AtomicBool,
}

impl VcpuLocation {
    /// The vCPU's host thread id (0 before it started).
    pub fn tid(&self) -> i32 {
        self.tid.load(Ordering::Relaxed)
    }

    fn publish(&self, loc: Location, answers: bool) {
        let lock = |m: &'_ Mutex<Option<Location>>| {
            *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(loc)
        };
        lock(&self.last);
        if answers {
            lock(&self.answer);
            self.answered.store(loc.exits, Ordering::Release);
        }
    }

    /// The latest location, if the vCPU ever left KVM_RUN.
    pub fn last(&self) -> Option<Location> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn answer(&self) -> Option<Location> {
        *self.answer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every vCPU's location as of now: asks each for a fresh one (a kick
/// makes it leave KVM_RUN at once, whether it spins, halts or runs), and
/// waits up to `timeout`. A vCPU that did not answer in time keeps its
/// last location, marked `fresh: false`.
pub fn locate(
    locations: &[Arc<VcpuLocation>],
    kick_all: impl Fn(),
    timeout: Duration,
) -> Vec<(Option<Location>, bool)> {
    let before: Vec<u64> = locations
        .iter()
        .map(|l| {
            let b = l.answered.load(Ordering::Acquire);
            l.wanted.store(true, Ordering::Release);
            b
        })
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        kick_all();
        let fresh: Vec<bool> = locations
            .iter()
            .zip(&before)
            .map(|(l, &b)| l.answered.load(Ordering::Acquire) > b)
            .collect();
        if fresh.iter().all(|&f| f) || Instant::now() >= deadline {
            return locations
                .iter()
                .zip(fresh)
                .map(|(l, f)| (if f { l.answer() } else { l.last() }, f))
                .collect();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
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

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// A vCPU's registers as of one exit.
#[derive(Debug, Clone, Copy)]
struct Registers {
    regs: kvm_regs,
    sregs: kvm_sregs,
}

fn run_loop(mut fd: VcpuFd, ctx: VcpuContext) {
    ctx.location
        .tid
        .store(backdoor_agent::sched::gettid(), Ordering::Relaxed);
    let run: *mut kvm_run = fd.get_kvm_run();
    // SAFETY: `run` points at this vCPU's kvm_run mapping, valid while `fd` lives.
    let flag = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
    IMMEDIATE_EXIT.with(|c| c.set(flag));
    // KVM copies the registers into kvm_run on every exit (no extra
    // ioctl); the loop keeps the last copy, because on AMD SVM a triple
    // fault resets the vCPU before bdvmm can read what faulted.
    let sync = ctx.sync_regs;
    if sync {
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
    }
    let mut last_exit = None;
    let mut exits = 0u64;
    while ctx.lifecycle.vcpu_gate() {
        if let Some(why) = run_once(&mut fd, &ctx, last_exit.as_ref()) {
            ctx.lifecycle.request_exit(why);
            break;
        }
        exits += 1;
        if sync {
            let r = fd.sync_regs();
            last_exit = Some(Registers {
                regs: r.regs,
                sregs: r.sregs,
            });
            let answers = ctx.location.wanted.swap(false, Ordering::AcqRel);
            let halted = answers
                .then(|| fd.get_mp_state().ok())
                .flatten()
                .map(|m| m.mp_state == kvm_bindings::KVM_MP_STATE_HALTED);
            ctx.location.publish(
                Location {
                    vcpu: ctx.index,
                    rip: r.regs.rip,
                    rsp: r.regs.rsp,
                    rflags: r.regs.rflags,
                    interrupts_enabled: r.regs.rflags & RFLAGS_IF != 0,
                    cr3: r.sregs.cr3,
                    cr4: r.sregs.cr4,
                    cpl: r.sregs.cs.dpl,
                    halted,
                    exits,
                },
                answers,
            );
        }
    }
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    ctx.lifecycle.vcpu_exited();
}

/// Runs the vCPU until its next exit; returns a reason if the VM must stop.
fn run_once(fd: &mut VcpuFd, ctx: &VcpuContext, last_exit: Option<&Registers>) -> Option<VmExit> {
    let c = &ctx.counters;
    let vcpu = ctx.index;
    match fd.run() {
        Ok(VcpuExit::IoOut(port, data)) => {
            ExitCounters::bump(&c.io_out);
            ctx.io.pio_write(port, data);
            None
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            ExitCounters::bump(&c.io_in);
            ctx.io.pio_read(port, data);
            None
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            ExitCounters::bump(&c.mmio_read);
            ctx.io.mmio_read(addr, data);
            None
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            ExitCounters::bump(&c.mmio_write);
            ctx.io.mmio_write(addr, data);
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
                triple_fault_report(fd, last_exit)
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
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(sr)) => format_registers(&r, &sr),
        _ => "(registers unavailable)".into(),
    }
}

/// Whether these are the registers of a vCPU just out of reset (CS:IP at
/// the reset vector, paging off): what KVM on AMD SVM leaves after a
/// shutdown, because the VMCB is undefined after one.
fn is_reset_state(r: &kvm_regs, sr: &kvm_sregs) -> bool {
    r.rip == 0xfff0 && sr.cs.base == 0xffff_0000 && sr.cr0 & 1 << 31 == 0
}

/// The triple-fault report: the registers KVM has now, or, where KVM reset
/// the vCPU on shutdown, those of its last exit before the fault.
fn triple_fault_report(fd: &VcpuFd, last_exit: Option<&Registers>) -> String {
    let (Ok(r), Ok(sr)) = (fd.get_regs(), fd.get_sregs()) else {
        return "(registers unavailable)".into();
    };
    match last_exit {
        Some(last) if is_reset_state(&r, &sr) => format!(
            "KVM reset this vCPU on shutdown (as it does on AMD SVM); its registers at its \
             last exit before the fault:\n{}",
            format_registers(&last.regs, &last.sregs)
        ),
        _ => format_registers(&r, &sr),
    }
}

/// Registers in QEMU's `info registers` layout.
fn format_registers(r: &kvm_regs, sr: &kvm_sregs) -> String {
    let mut s = String::new();
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
