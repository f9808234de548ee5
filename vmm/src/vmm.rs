//! Building and running a VM. [`Vmm::new`] reads like the boot sequence:
//! KVM → guest RAM → VM → devices → guest image → vCPUs; [`Vmm::run`]
//! starts the vCPUs and runs the event loop until the VM stops.

use std::fs::File;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiError, ApiServer, VmControl};
use crate::boot::cpu::{self, CpuError, Entry};
use crate::boot::linux::{self, LinuxBootError};
use crate::boot::test_guest::{self, TestGuestError};
use crate::bus::{Bus, BusError, Width};
use crate::config::{GuestConfig, VmConfig};
use crate::devices::{boot_timer, debug_exit, i8042, serial};
use crate::event_loop::{self, EventLoopError};
use crate::exit_counters::ExitCounters;
use crate::kvm::{self, KvmError};
use crate::layout;
use crate::lifecycle::{Lifecycle, VmExit};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{self, VcpuContext, VcpuHandle};

/// How long bdvmm waits for vCPU threads to leave KVM_RUN when stopping.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Opening KVM.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A VM-level KVM ioctl.
    #[error("cannot {what}: {source}")]
    VmIoctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// More vCPUs than KVM allows.
    #[error("KVM on this host allows at most {max} vCPUs, not {asked}")]
    TooManyVcpus { asked: u8, max: usize },
    /// Linux loading.
    #[error(transparent)]
    Linux(#[from] LinuxBootError),
    /// Test-guest loading.
    #[error(transparent)]
    TestGuest(#[from] TestGuestError),
    /// vCPU set-up.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// Device wiring.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The control socket.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The console log file.
    #[error("cannot create console log {path}: {source}")]
    ConsoleLog {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// An eventfd or thread could not be created.
    #[error("cannot {what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Os { what, source }
}

fn vm_ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::VmIoctl { what, source }
}

/// A built VM, ready to run.
#[derive(Debug)]
pub struct Vmm {
    // Field order is drop order: vCPU fds go before the VM fd and guest RAM.
    vcpu_fds: Vec<VcpuFd>,
    // Never used after set-up, but it must stay open while vCPUs run.
    _vm: VmFd,
    ram: GuestRam,
    lifecycle: Arc<Lifecycle>,
    control: Arc<VmControl>,
    config: VmConfig,
    handles: Arc<OnceLock<Vec<VcpuHandle>>>,
}

impl Vmm {
    /// Builds the VM described by `config`.
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        let vmm_start_ns = boot_timer::monotonic_ns();
        let kvm = kvm::open()?;
        let ram = GuestRam::new(config.mem_bytes, config.hugepages)?;
        let vm = create_vm(&kvm, &ram)?;

        let handles: Arc<OnceLock<Vec<VcpuHandle>>> = Arc::new(OnceLock::new());
        let kick_targets = handles.clone();
        let lifecycle = Arc::new(Lifecycle::new(
            EventFd::new(libc::EFD_NONBLOCK).map_err(os("create the exit eventfd"))?,
            Box::new(move || {
                for h in kick_targets.get().into_iter().flatten() {
                    h.kick();
                }
            }),
        ));

        let boot_timer_ns = Arc::new(AtomicU64::new(0));
        let (pio, mmio) = add_devices(&vm, &config, &lifecycle, &boot_timer_ns, vmm_start_ns)?;

        let mem = ram.memory();
        let entry = match &config.guest {
            GuestConfig::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let e = linux::load(mem, ram.size(), kernel, initrd.as_deref(), cmdline)?;
                Entry::Linux {
                    rip: e.entry,
                    zero_page: e.zero_page,
                }
            }
            GuestConfig::TestGuest { path, ring } => Entry::TestGuest {
                rip: test_guest::load(mem, ram.size(), path)?,
                ring: *ring,
                ram: ram.size(),
            },
        };
        cpu::write_boot_tables(mem)?;

        let max = kvm.get_max_vcpus();
        if usize::from(config.vcpus) > max {
            return Err(VmmError::TooManyVcpus {
                asked: config.vcpus,
                max,
            });
        }
        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(vm_ioctl("read the supported CPUID"))?;
        let mut vcpu_fds = Vec::new();
        let mut counters = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(vm_ioctl("create a vCPU"))?;
            cpu::configure(&fd, i, config.vcpus, &base_cpuid, entry)?;
            vcpu_fds.push(fd);
            counters.push(Arc::new(ExitCounters::default()));
        }

        let control = Arc::new(VmControl {
            lifecycle: lifecycle.clone(),
            counters,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            mem_bytes: ram.size(),
            guest: match &config.guest {
                GuestConfig::Linux { kernel, .. } => format!("linux:{}", kernel.display()),
                GuestConfig::TestGuest { path, .. } => format!("test-guest:{}", path.display()),
            },
            boot_timer_ns,
        });
        Ok(Self {
            vcpu_fds,
            _vm: vm,
            ram,
            lifecycle,
            control,
            config,
            handles,
        })
    }

    /// Guest RAM (and its memfd), for components that serve it.
    pub fn guest_ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Runs the VM until it stops and returns why.
    pub fn run(mut self) -> Result<VmExit, VmmError> {
        let mut extra: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>> = Vec::new();
        if let Some(path) = &self.config.api_sock {
            extra.push(Arc::new(Mutex::new(ApiServer::bind(
                path,
                self.control.clone(),
            )?)));
        }
        vcpu::install_kick_handler().map_err(|e| VmmError::Os {
            what: "install the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let mut handles = Vec::new();
        for (i, fd) in self.vcpu_fds.drain(..).enumerate() {
            let ctx = VcpuContext {
                index: u8::try_from(i).expect("at most MAX_VCPUS vCPUs"),
                pio: self.control.pio.clone(),
                mmio: self.control.mmio.clone(),
                lifecycle: self.lifecycle.clone(),
                counters: self.control.counters[i].clone(),
            };
            handles.push(vcpu::spawn(fd, ctx).map_err(os("start a vCPU thread"))?);
        }
        let _ = self.handles.set(handles);
        let result = event_loop::run(self.lifecycle.clone(), extra);
        if let Err(e) = &result {
            self.lifecycle.request_exit(VmExit::KvmError {
                vcpu: 0,
                detail: e.to_string(),
            });
        }
        if !self.lifecycle.wait_vcpus_exited(VCPU_STOP_TIMEOUT) {
            tracing::warn!(
                "vCPU threads did not leave KVM_RUN within {} s; exiting anyway",
                VCPU_STOP_TIMEOUT.as_secs()
            );
        }
        Ok(result?)
    }
}

fn create_vm(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(vm_ioctl("create the VM"))?;
    vm.set_tss_address(usize::try_from(layout::KVM_TSS_ADDR).expect("64-bit host"))
        .map_err(vm_ioctl("set the TSS address"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(vm_ioctl("set the identity-map address"))?;
    vm.create_irq_chip()
        .map_err(vm_ioctl("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(vm_ioctl("create the in-kernel PIT"))?;
    for (slot, range) in ram.ranges().iter().enumerate() {
        let host = ram
            .host_address(slot)
            .ok_or_else(|| VmmError::Memory(MemoryError::Layout("unmapped RAM range".into())))?;
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).expect("at most two RAM slots"),
            guest_phys_addr: range.guest_addr,
            memory_size: range.len,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: the region maps memory owned by `ram`, which outlives the VM fd
        // (Vmm drops its VmFd before its GuestRam).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(vm_ioctl("register guest RAM with KVM"))?;
    }
    Ok(vm)
}

fn add_devices(
    vm: &VmFd,
    config: &VmConfig,
    lifecycle: &Arc<Lifecycle>,
    boot_timer_ns: &Arc<AtomicU64>,
    vmm_start_ns: u64,
) -> Result<(Bus, Bus), VmmError> {
    let mut pio = Bus::new("pio", Width::ByStart);
    let mmio = Bus::new("mmio", Width::Contained);

    let log = match &config.console_log {
        Some(path) => Some(File::create(path).map_err(|source| VmmError::ConsoleLog {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os("create the serial irqfd"))?;
    vm.register_irqfd(&irq, serial::IRQ)
        .map_err(vm_ioctl("register the serial irqfd"))?;
    let com1 = serial::SerialDevice::new(irq, serial::ConsoleOut::new(log));
    pio.insert(
        "com1",
        u64::from(serial::PORT),
        serial::LEN,
        Arc::new(Mutex::new(com1)),
    )?;
    pio.insert(
        "i8042",
        u64::from(i8042::PORT),
        i8042::LEN,
        Arc::new(Mutex::new(i8042::I8042::new(lifecycle.clone()))),
    )?;
    pio.insert(
        "debug-exit",
        u64::from(debug_exit::PORT),
        debug_exit::LEN,
        Arc::new(Mutex::new(debug_exit::DebugExit::new(lifecycle.clone()))),
    )?;
    pio.insert(
        "boot-timer",
        u64::from(boot_timer::PORT),
        boot_timer::LEN,
        Arc::new(Mutex::new(boot_timer::BootTimer::new(
            boot_timer_ns.clone(),
            vmm_start_ns,
        ))),
    )?;
    Ok((pio, mmio))
}
