//! Building and running a VM. [`Vmm::new`] reads like the boot sequence:
//! KVM → guest RAM → VM → devices → guest image → vCPUs; [`Vmm::run`]
//! starts the vCPUs and runs the event loop until the VM stops.

use std::fs::File;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use std::net::TcpListener;

use backdoor_abi::ErrorChain;
use backdoor_agent::auth::{KeyFile, Keys};
use backdoor_agent::vmm_link;
use backdoor_agent::{Agent, DescriptorSource, GuestMemory, RamRange};
use backdoor_dev::{BackdoorDevice, BackdoorShared};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_device::MutDevicePio;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiError, ApiServer, VmControl};
use crate::boot::cpu::{self, CpuError, Entry};
use crate::boot::linux::{self, LinuxBootError};
use crate::boot::mptable::{self, MpTableError};
use crate::boot::test_guest::{self, TestGuestError};
use crate::bus::{BusError, Io};
use crate::config::{GuestConfig, VmConfig};
use crate::devices::serial::ConsoleInput;
use crate::devices::{backdoor, boot_timer, debug_exit, i8042, serial, watchdog};
use crate::event_loop::{self, EventLoopError};
use crate::events::{BackdoorWatcher, Event, EventStream};
use crate::exit_counters::{ExitCounters, ExitCounts};
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
    #[error("cannot {what}")]
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
    /// The MP table of a Linux guest.
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    /// Device wiring.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The control socket.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The console log file.
    #[error("cannot create console log {path}")]
    ConsoleLog {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// An eventfd or thread could not be created.
    #[error("cannot {what}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The event stream file.
    #[error("cannot open the event stream {path}")]
    Events {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The backdoor agent could not start.
    #[error("backdoor agent: {0}")]
    Agent(String),
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Os { what, source }
}

fn vm_ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::VmIoctl { what, source }
}

/// What a guest reset does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnReset {
    /// bdvmm exits with status 12 (like Firecracker).
    #[default]
    Exit,
    /// bdvmm reboots the guest in place: same RAM memfd (so the backdoor
    /// keeps serving it), a fresh KVM VM, the image reloaded, a new
    /// backdoor generation.
    Reboot,
}

/// The VMM: guest RAM and the backdoor outlive each boot of the guest.
#[derive(Debug)]
pub struct Vmm {
    config: VmConfig,
    kvm: Kvm,
    ram: GuestRam,
    backdoor: Arc<BackdoorShared>,
    vmm_start_ns: u64,
    agent_addr: Option<String>,
    /// The running machine's vCPUs, for the agents' VCPUS (read-only).
    vcpus: Arc<VcpuReporter>,
    /// `--events`.
    events: Arc<EventStream>,
}

/// Where the current machine's vCPUs are, for the backdoor agents: each
/// boot puts its control here. The in-process agent asks for a fresh report
/// (a kick); what is pushed to a separate agent is as of each vCPU's last
/// exit, costing the guest nothing.
#[derive(Debug, Default)]
pub struct VcpuReporter {
    current: std::sync::Mutex<Option<Arc<VmControl>>>,
    fresh: bool,
}

impl VcpuReporter {
    fn set(&self, control: Option<Arc<VmControl>>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = control;
    }

    /// The same machine, reported without kicks.
    fn last_exits(self: &Arc<Self>) -> Arc<dyn backdoor_agent::VcpuSource> {
        Arc::new(LastExits(self.clone()))
    }
}

impl VcpuReporter {
    /// The running machine's control, if a boot is running.
    fn control(&self) -> Option<Arc<VmControl>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current VM's vCPUs, kicked for fresh registers if `fresh`.
    fn report(&self, fresh: bool) -> Option<serde_json::Value> {
        let control = self.control()?;
        let reply = crate::api::Reply::Vcpus(control.vcpus_report(fresh));
        serde_json::to_value(reply.line()).ok()
    }
}

impl backdoor_agent::VcpuSource for VcpuReporter {
    fn vcpus(&self) -> Option<serde_json::Value> {
        self.report(self.fresh)
    }

    fn sched(&self) -> Option<serde_json::Value> {
        Some(self.control()?.sched())
    }
}

#[derive(Debug)]
struct LastExits(Arc<VcpuReporter>);

impl backdoor_agent::VcpuSource for LastExits {
    fn vcpus(&self) -> Option<serde_json::Value> {
        self.0.report(false)
    }
}

impl Vmm {
    /// Opens KVM and creates guest RAM and the backdoor's shared state.
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        let vmm_start_ns = boot_timer::monotonic_ns();
        let kvm = kvm::open()?;
        let ram = GuestRam::new(config.mem_bytes, config.hugepages)?;
        let events = match &config.events {
            Some(path) => EventStream::open(path).map_err(|source| VmmError::Events {
                path: path.clone(),
                source,
            })?,
            None => EventStream::default(),
        };
        let mut vmm = Self {
            config,
            kvm,
            ram,
            backdoor: BackdoorShared::new(random_generation()),
            vmm_start_ns,
            agent_addr: None,
            vcpus: Arc::new(VcpuReporter {
                current: std::sync::Mutex::new(None),
                fresh: true,
            }),
            events: Arc::new(events),
        };
        vmm.start_agent()?;
        Ok(vmm)
    }

    fn agent_ranges(&self) -> Vec<RamRange> {
        self.ram
            .ranges()
            .iter()
            .map(|r| RamRange {
                guest_addr: r.guest_addr,
                len: r.len,
                file_offset: r.file_offset,
            })
            .collect()
    }

    /// Serves the backdoor from this process's threads, or hands guest RAM
    /// to a separate agent, as configured.
    fn start_agent(&mut self) -> Result<(), VmmError> {
        let agent_err =
            |e: &(dyn std::error::Error + 'static)| VmmError::Agent(ErrorChain(e).to_string());
        if let Some((addr, keys)) = &self.config.backdoor_listen {
            let key_file = KeyFile::load(keys).map_err(|e| agent_err(&e))?;
            let memfd = self
                .ram
                .memfd()
                .try_clone()
                .map_err(os("duplicate the guest RAM memfd"))?;
            let mem =
                Arc::new(GuestMemory::map(memfd, self.agent_ranges()).map_err(|e| agent_err(&e))?);
            let listener = TcpListener::bind(addr)
                .map_err(|e| VmmError::Agent(format!("cannot listen on {addr}: {e}")))?;
            let bound = listener
                .local_addr()
                .map_err(|e| agent_err(&e))?
                .to_string();
            let source: Arc<dyn DescriptorSource> = self.backdoor.clone();
            let keys = Keys::clone(&key_file.current());
            let agent = Agent::new(self.config.name.clone(), keys, mem.clone(), source.clone())
                .with_key_file(key_file)
                .with_busy_poll(self.config.agent_busy_poll)
                .with_vcpus(self.vcpus.clone());
            let agent = Arc::new(crate::agent_process::with_verbs(agent, mem, &source));
            agent.serve(listener).map_err(|e| agent_err(&e))?;
            eprintln!(
                "bdvmm: backdoor agent for {} listening on {bound}",
                self.config.name
            );
            self.agent_addr = Some(bound);
        }
        if let Some(path) = &self.config.agent_sock {
            let hello = vmm_link::Hello {
                vm: self.config.name.clone(),
                ranges: self.agent_ranges(),
                descriptor: self.backdoor.snapshot(),
            };
            vmm_link::connect_and_publish(
                path,
                self.ram.memfd(),
                &hello,
                self.backdoor.clone(),
                Some(self.vcpus.last_exits()),
            )
            .map_err(|e| {
                VmmError::Agent(format!(
                    "cannot hand guest RAM to the agent at {}: {}",
                    path.display(),
                    ErrorChain(&e)
                ))
            })?;
        }
        Ok(())
    }

    /// Guest RAM (and its memfd), for components that serve it.
    pub fn guest_ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The backdoor's hook table and counters.
    pub fn backdoor(&self) -> &Arc<BackdoorShared> {
        &self.backdoor
    }

    /// Boots the guest and runs it until it stops (rebooting it on reset
    /// if asked to), and returns why it stopped.
    pub fn run(self) -> Result<VmExit, VmmError> {
        let _watcher = BackdoorWatcher::start(self.events.clone(), self.backdoor.clone())
            .map_err(os("start the event stream's backdoor watcher"))?;
        let mut boots = 1;
        loop {
            let machine = Machine::build(&self, boots)?;
            let control = machine.control.clone();
            self.events.emit(&Event::Boot {
                boot: boots,
                generation: self.backdoor.snapshot().generation,
                vcpus: self.config.vcpus,
                guest: control.guest.clone(),
            });
            self.vcpus.set(Some(control.clone()));
            let outcome = machine.run(self.config.api_sock.as_deref());
            self.vcpus.set(None);
            let Stopped { why, vcpus_left } = outcome?;
            let exits = control.exit_totals();
            let reset = matches!(why, VmExit::Reset | VmExit::TripleFault { .. });
            if reset {
                let reboot = self.config.on_reset == OnReset::Reboot && !vcpus_left;
                self.events.emit(&Event::Reset {
                    why: why.clone(),
                    action: if reboot { "reboot" } else { "stop" },
                    vcpus_stuck: vcpus_left,
                    exits,
                });
            }
            if !(reset && self.config.on_reset == OnReset::Reboot) {
                self.stopped(&why, exits);
                return Ok(why);
            }
            if vcpus_left {
                // A new boot would start vCPUs on RAM the old ones may still
                // write: the guest's reset ends the run instead.
                eprintln!("bdvmm: guest reset ({}), but its vCPU threads did not stop within {} s: not rebooting", exit_name(&why), VCPU_STOP_TIMEOUT.as_secs());
                self.stopped(&why, exits);
                return Ok(why);
            }
            let generation = self.backdoor.reset();
            boots += 1;
            eprintln!("bdvmm: guest reset ({}); rebooting, boot {boots}, backdoor generation {generation}", exit_name(&why));
        }
    }
}

impl Vmm {
    fn stopped(&self, why: &VmExit, exits: ExitCounts) {
        self.events.emit(&Event::Stop {
            why: why.clone(),
            exit_status: crate::exit_code::BdvmmExit::from(why) as u8,
            exits,
        });
    }
}

fn exit_name(why: &VmExit) -> &'static str {
    match why {
        VmExit::TripleFault { .. } => "triple fault",
        _ => "reset request",
    }
}

/// A random, non-zero starting generation, so that generations from two
/// runs of bdvmm are unlikely to be confused by a monitor.
fn random_generation() -> u32 {
    let mut b = [0u8; 4];
    let g = if getrandom::fill(&mut b).is_ok() {
        u32::from_ne_bytes(b)
    } else {
        // Fall back on the clock: uniqueness across runs is all that matters.
        (boot_timer::monotonic_ns() & 0xffff_ffff) as u32
    };
    g.max(1)
}

/// One boot of the guest: a KVM VM, its devices and vCPUs.
#[derive(Debug)]
struct Machine {
    // Field order is drop order: vCPU fds go before the VM fd.
    vcpu_fds: Vec<VcpuFd>,
    // Never used after set-up, but it must stay open while vCPUs run.
    _vm: VmFd,
    lifecycle: Arc<Lifecycle>,
    control: Arc<VmControl>,
    handles: Arc<OnceLock<Vec<VcpuHandle>>>,
    // Registered so a guest driver may bind a handler; ABI v1 never raises it.
    _backdoor_irq: EventFd,
    /// COM1, which bdvmm's standard input feeds.
    com1: Arc<Mutex<serial::SerialDevice>>,
    /// KVM copies each exit's registers into kvm_run (KVM_CAP_SYNC_REGS).
    sync_regs: bool,
}

impl Machine {
    /// Builds the VM around `vmm`'s RAM: VM → devices → guest image → vCPUs.
    fn build(vmm: &Vmm, boots: u32) -> Result<Self, VmmError> {
        let config = &vmm.config;
        let ram = &vmm.ram;
        let linux = matches!(config.guest, GuestConfig::Linux { .. });
        let vm = create_vm(&vmm.kvm, ram, linux)?;

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
        let Devices {
            io,
            backdoor_irq,
            com1,
        } = add_devices(&vm, vmm, &lifecycle, &boot_timer_ns)?;

        let mem = ram.memory();
        let entry = match &config.guest {
            GuestConfig::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let cmdline = format!("{cmdline} {}", backdoor::cmdline_param());
                let e = linux::load(mem, ram.size(), kernel, initrd.as_deref(), &cmdline)?;
                mptable::write(mem, config.vcpus)?;
                Entry::Linux {
                    rip: e.entry,
                    zero_page: e.zero_page,
                }
            }
            GuestConfig::TestGuest { path, ring } => Entry::TestGuest {
                rip: test_guest::load(mem, ram.size(), path, boots > 1)?,
                ring: *ring,
                ram: ram.size(),
                backdoor: backdoor::MMIO_BASE,
            },
        };
        cpu::write_boot_tables(mem)?;

        let max = vmm.kvm.get_max_vcpus();
        if usize::from(config.vcpus) > max {
            return Err(VmmError::TooManyVcpus {
                asked: config.vcpus,
                max,
            });
        }
        let base_cpuid = vmm
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(vm_ioctl("read the supported CPUID"))?;
        let mut vcpu_fds = Vec::new();
        let mut counters = Vec::new();
        let mut locations = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(vm_ioctl("create a vCPU"))?;
            cpu::configure(&fd, i, config.vcpus, &base_cpuid, entry)?;
            vcpu_fds.push(fd);
            counters.push(Arc::new(ExitCounters::default()));
            locations.push(Arc::new(vcpu::VcpuLocation::default()));
        }

        let control = Arc::new(VmControl {
            lifecycle: lifecycle.clone(),
            events: vmm.events.clone(),
            counters,
            locations,
            io: Arc::new(io),
            mem_bytes: ram.size(),
            guest: match &config.guest {
                GuestConfig::Linux { kernel, .. } => format!("linux:{}", kernel.display()),
                GuestConfig::TestGuest { path, .. } => format!("test-guest:{}", path.display()),
            },
            boot_timer_ns,
            backdoor: vmm.backdoor.clone(),
            boots,
            agent_addr: vmm.agent_addr.clone(),
        });
        Ok(Self {
            vcpu_fds,
            _vm: vm,
            lifecycle,
            control,
            handles,
            _backdoor_irq: backdoor_irq,
            com1,
            sync_regs: vmm.kvm.check_extension(kvm_ioctls::Cap::SyncRegs),
        })
    }

    /// Runs this boot until the VM has an exit reason.
    fn run(mut self, api_sock: Option<&std::path::Path>) -> Result<Stopped, VmmError> {
        let mut extra: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>> = Vec::new();
        extra.push(Arc::new(Mutex::new(ConsoleInput::stdin(self.com1.clone()))));
        if let Some(path) = api_sock {
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
                io: self.control.io.clone(),
                lifecycle: self.lifecycle.clone(),
                counters: self.control.counters[i].clone(),
                sync_regs: self.sync_regs,
                location: self.control.locations[i].clone(),
            };
            handles.push(vcpu::spawn(fd, ctx).map_err(os("start a vCPU thread"))?);
        }
        let _ = self.handles.set(handles);
        let result = event_loop::run(self.lifecycle.clone(), extra);
        if let Err(e) = &result {
            self.lifecycle.request_exit(VmExit::KvmError {
                vcpu: 0,
                detail: ErrorChain(e).to_string(),
            });
        }
        let vcpus_left = !self.lifecycle.wait_vcpus_exited(VCPU_STOP_TIMEOUT);
        if vcpus_left {
            tracing::warn!(
                "vCPU threads did not leave KVM_RUN within {} s",
                VCPU_STOP_TIMEOUT.as_secs()
            );
        }
        Ok(Stopped {
            why: result?,
            vcpus_left,
        })
    }
}

/// How one boot ended.
#[derive(Debug)]
struct Stopped {
    /// Why the VM stopped.
    why: VmExit,
    /// Whether vCPU threads were still in KVM_RUN after the stop timeout.
    vcpus_left: bool,
}

/// Creates the VM. Guest RAM is registered before the irqchip and PIT:
/// their I/O-bus registrations start an SRCU grace period, and a memory
/// slot added during it waits for it (5–10 ms on PVM; 0.3 ms before).
/// The PIT is created for Linux only, which calibrates its timers with it;
/// test guests never program it, and tearing it down costs 13–16 ms at
/// exit (two synchronous I/O-bus unregistrations).
fn create_vm(kvm: &Kvm, ram: &GuestRam, pit: bool) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(vm_ioctl("create the VM"))?;
    vm.set_tss_address(usize::try_from(layout::KVM_TSS_ADDR).expect("64-bit host"))
        .map_err(vm_ioctl("set the TSS address"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(vm_ioctl("set the identity-map address"))?;
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
    vm.create_irq_chip()
        .map_err(vm_ioctl("create the in-kernel irqchip"))?;
    if pit {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(vm_ioctl("create the in-kernel PIT"))?;
    }
    Ok(vm)
}

/// The buses, and what must live as long as the machine.
struct Devices {
    io: Io,
    backdoor_irq: EventFd,
    com1: Arc<Mutex<serial::SerialDevice>>,
}

/// Puts every device of the machine on its bus, one `add_*` per device.
fn add_devices(
    vm: &VmFd,
    vmm: &Vmm,
    lifecycle: &Arc<Lifecycle>,
    boot_timer_ns: &Arc<AtomicU64>,
) -> Result<Devices, VmmError> {
    let mut b = DeviceBuilder { vm, io: Io::new() };
    let com1 = b.add_serial(vmm.config.console_log.as_deref())?;
    b.add_i8042(lifecycle)?;
    b.add_debug_exit(lifecycle)?;
    b.add_boot_timer(boot_timer_ns, vmm.vmm_start_ns)?;
    b.add_watchdog(lifecycle)?;
    let backdoor_irq = b.add_backdoor(vmm)?;
    Ok(Devices {
        io: b.io,
        backdoor_irq,
        com1,
    })
}

/// The buses while devices are added to them.
struct DeviceBuilder<'a> {
    vm: &'a VmFd,
    io: Io,
}

impl DeviceBuilder<'_> {
    /// An irqfd routed to GSI `gsi`; the errors name the step that failed.
    fn irqfd(
        &self,
        gsi: u32,
        create: &'static str,
        register: &'static str,
    ) -> Result<EventFd, VmmError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os(create))?;
        self.vm
            .register_irqfd(&irq, gsi)
            .map_err(vm_ioctl(register))?;
        Ok(irq)
    }

    /// COM1, the guest's console (copied into `log` if given).
    fn add_serial(
        &mut self,
        log: Option<&std::path::Path>,
    ) -> Result<Arc<Mutex<serial::SerialDevice>>, VmmError> {
        let log = match log {
            Some(path) => Some(File::create(path).map_err(|source| VmmError::ConsoleLog {
                path: path.to_owned(),
                source,
            })?),
            None => None,
        };
        let irq = self.irqfd(
            serial::IRQ,
            "create the serial irqfd",
            "register the serial irqfd",
        )?;
        let com1 = Arc::new(Mutex::new(serial::SerialDevice::new(
            irq,
            serial::ConsoleOut::new(log),
        )));
        self.io
            .add_pio("com1", serial::PORT, serial::LEN, com1.clone())?;
        Ok(com1)
    }

    /// Puts `device` on the port bus at `port..port + len`.
    fn add_ports(
        &mut self,
        name: &'static str,
        port: u16,
        len: u16,
        device: impl MutDevicePio + Send + 'static,
    ) -> Result<(), VmmError> {
        self.io
            .add_pio(name, port, len, Arc::new(Mutex::new(device)))?;
        Ok(())
    }

    /// The i8042's reset line (how Linux reboots).
    fn add_i8042(&mut self, lifecycle: &Arc<Lifecycle>) -> Result<(), VmmError> {
        let dev = i8042::I8042::new(lifecycle.clone());
        self.add_ports("i8042", i8042::PORT, i8042::LEN, dev)
    }

    /// The port test guests power off through, with a status.
    fn add_debug_exit(&mut self, lifecycle: &Arc<Lifecycle>) -> Result<(), VmmError> {
        let dev = debug_exit::DebugExit::new(lifecycle.clone());
        self.add_ports("debug-exit", debug_exit::PORT, debug_exit::LEN, dev)
    }

    /// The port a guest marks its first instruction with (start-up time).
    fn add_boot_timer(&mut self, ns: &Arc<AtomicU64>, vmm_start_ns: u64) -> Result<(), VmmError> {
        let dev = boot_timer::BootTimer::new(ns.clone(), vmm_start_ns);
        self.add_ports("boot-timer", boot_timer::PORT, boot_timer::LEN, dev)
    }

    /// The watchdog port (the baseline liveness report of the benchmarks).
    fn add_watchdog(&mut self, lifecycle: &Arc<Lifecycle>) -> Result<(), VmmError> {
        let dev = watchdog::Watchdog::new(lifecycle.clone());
        self.add_ports("watchdog", watchdog::PORT, watchdog::LEN, dev)
    }

    /// The backdoor device's registers; returns its (reserved) irqfd.
    fn add_backdoor(&mut self, vmm: &Vmm) -> Result<EventFd, VmmError> {
        let irq = self.irqfd(
            backdoor::IRQ,
            "create the backdoor irqfd",
            "register the backdoor irqfd",
        )?;
        let ram_ranges = vmm
            .ram
            .ranges()
            .iter()
            .map(|r| (r.guest_addr, r.len))
            .collect();
        let device = BackdoorDevice::new(
            vmm.backdoor.clone(),
            Box::new(backdoor::GuestRam(vmm.ram.memory().clone())),
            ram_ranges,
        );
        self.io.add_mmio(
            "backdoor",
            backdoor::MMIO_BASE,
            backdoor::MMIO_SIZE,
            Arc::new(Mutex::new(backdoor::BackdoorMmio(device))),
        )?;
        Ok(irq)
    }
}
