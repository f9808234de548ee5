//! Command-line interface: clap definitions and their translation into a
//! validated [`VmConfig`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::boot::cpu::Ring;
use crate::config::{self, ConfigError, GuestConfig, VmConfig, DEFAULT_CMDLINE};

/// backdoor-vmm's virtual machine monitor.
#[derive(Debug, Parser)]
#[command(name = "bdvmm", version, about, long_about = None)]
pub struct Cli {
    /// Log level for bdvmm's own messages (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest and run it until it stops.
    Run(Box<RunArgs>),
    /// Send one request to a running bdvmm's control socket and print the reply.
    Ctl(CtlArgs),
    /// Run the backdoor agent as a process of its own: it receives a
    /// VMM's guest-RAM memfd and keeps serving it after the VMM dies.
    Agent(AgentArgs),
}

/// `bdvmm agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Unix socket on which a `bdvmm run --agent-sock` connects.
    #[arg(long, value_name = "PATH")]
    pub vmm_sock: PathBuf,
    /// Address monitors connect to (e.g. 0.0.0.0:7700).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Key file: TOML with `read = "<hex>"` and optionally `repair = "<hex>"`.
    #[arg(long, value_name = "PATH")]
    pub keys: PathBuf,
    /// Microseconds the agent spins for a monitor's next request before
    /// blocking (lower latency for back-to-back reads; 0 never spins).
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub busy_poll_us: u64,
}

/// `bdvmm ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The control socket given to `bdvmm run --api-sock`.
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// The request.
    #[arg(value_enum)]
    pub cmd: CtlCommand,
}

/// Requests `bdvmm ctl` can send (docs/api.md).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CtlCommand {
    /// VM state, configuration and exit counts.
    Status,
    /// Park every vCPU.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Stop the VM.
    Stop,
    /// Per-vCPU exit counts.
    Exits,
    /// The backdoor's generation, seal, tamper count and hooks.
    Backdoor,
    /// Where each vCPU is: RIP, RSP, CR3, RFLAGS.IF, CPL, halted.
    Vcpus,
}

impl CtlCommand {
    /// The protocol's name for the request.
    pub fn name(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Stop => "stop",
            Self::Exits => "exits",
            Self::Backdoor => "backdoor",
            Self::Vcpus => "vcpus",
        }
    }
}

/// Starting privilege level of a test guest.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RingArg {
    /// Ring 0 (kernel mode).
    #[value(name = "0")]
    Zero,
    /// Ring 3 (user mode).
    #[value(name = "3")]
    Three,
}

/// `bdvmm run`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("guest").required(true).args(["kernel", "test_guest"])))]
pub struct RunArgs {
    /// Linux kernel to boot (bzImage or ELF vmlinux).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", requires = "kernel", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Freestanding test guest (static ELF linked at a fixed address).
    #[arg(long, value_name = "PATH")]
    pub test_guest: Option<PathBuf>,
    /// Privilege level a test guest starts in.
    #[arg(long, value_enum, default_value = "0", requires = "test_guest")]
    pub ring: RingArg,
    /// Guest RAM (e.g. 512M, 2G).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = config::parse_size)]
    pub mem: u64,
    /// Back guest RAM with 2-MiB huge pages.
    #[arg(long)]
    pub hugepages: bool,
    /// Number of vCPUs (one host thread each).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,
    /// Also write the serial console to this file.
    #[arg(long, value_name = "PATH")]
    pub console_log: Option<PathBuf>,
    /// Serve the JSON control protocol on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Append the VM's events to this file, one JSON object per line
    /// (boots, hooks, seal, tamper, pause/resume, resets, stop: docs/events.md).
    #[arg(long, value_name = "PATH")]
    pub events: Option<PathBuf>,
    /// What a guest reset (or triple fault) does: exit (status 11 or 12),
    /// or reboot in place with a new backdoor generation.
    #[arg(long, value_enum, default_value = "exit")]
    pub on_reset: crate::vmm::OnReset,
    /// The VM's name: monitors authenticate against it.
    #[arg(long, value_name = "NAME", default_value = "guest")]
    pub name: String,
    /// Serve the backdoor to monitors from this process, on this address (e.g. 127.0.0.1:7700).
    #[arg(
        long,
        value_name = "ADDR",
        requires = "backdoor_keys",
        conflicts_with = "agent_sock"
    )]
    pub backdoor_listen: Option<String>,
    /// Key file for --backdoor-listen: TOML with `read = "<hex>"`, optionally `repair = "<hex>"`.
    #[arg(long, value_name = "PATH", requires = "backdoor_listen")]
    pub backdoor_keys: Option<PathBuf>,
    /// Hand guest RAM to a separate `bdvmm agent` listening on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub agent_sock: Option<PathBuf>,
    /// Microseconds the in-process agent spins for a monitor's next request
    /// before blocking (0 never spins: no CPU taken from vCPUs).
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub backdoor_busy_poll_us: u64,
}

impl TryFrom<RunArgs> for VmConfig {
    type Error = ConfigError;

    fn try_from(a: RunArgs) -> Result<Self, ConfigError> {
        config::validate_mem(a.mem, a.hugepages, config::host_memory_bytes())?;
        config::validate_name(&a.name)?;
        let vcpus = config::validate_vcpus(a.vcpus)?;
        let guest = match (a.kernel, a.test_guest) {
            (Some(kernel), _) => GuestConfig::Linux {
                kernel,
                initrd: a.initrd,
                cmdline: a.cmdline,
            },
            (None, Some(path)) => GuestConfig::TestGuest {
                path,
                ring: match a.ring {
                    RingArg::Zero => Ring::Zero,
                    RingArg::Three => Ring::Three,
                },
            },
            (None, None) => return Err(ConfigError::NoGuest),
        };
        Ok(VmConfig {
            guest,
            mem_bytes: a.mem,
            hugepages: a.hugepages,
            vcpus,
            console_log: a.console_log,
            api_sock: a.api_sock,
            events: a.events,
            on_reset: a.on_reset,
            name: a.name,
            backdoor_listen: a.backdoor_listen.zip(a.backdoor_keys),
            agent_sock: a.agent_sock,
            agent_busy_poll: std::time::Duration::from_micros(a.backdoor_busy_poll_us),
        })
    }
}
