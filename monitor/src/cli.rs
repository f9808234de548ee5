//! Command line and configuration file. Every watch option can come from
//! a TOML file (`--config`); flags override it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::target::{Target, TargetError, Transport};
use crate::watch::WatchOptions;

/// backdoor-vmm's remote monitor.
#[derive(Debug, Parser)]
#[command(name = "bdctl", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch guests' progress counters and report hangs.
    Watch(WatchArgs),
    /// Extract a guest's service continuations (newest complete record per session).
    Extract(ExtractArgs),
    /// Hand extracted sessions to another instance through its inbox (a REPAIR hook).
    Resume(ResumeArgs),
    /// Show a guest's backdoor: generation, tamper count, hooks, counters.
    Status(OneTarget),
    /// Read bytes of a hook.
    Read(ReadArgs),
    /// Write bytes into a REPAIR hook (repair key).
    Write(WriteArgs),
    /// Compare-and-swap an aligned 8-byte word of a REPAIR hook (repair key).
    Cas(CasArgs),
    /// Say which backends work on this host (and, with a target, whether it answers).
    Doctor(DoctorArgs),
    /// Print a guest kernel's log, read from its memory with no guest CPU.
    Dmesg(DmesgArgs),
    /// Write an evidence bundle of a guest: counters, sessions, kernel log, vCPUs.
    Evidence(EvidenceArgs),
    /// Register, remove and list a cluster's targets in etcd.
    #[command(subcommand)]
    Targets(TargetsCommand),
    /// List a cluster's incidents (who acted on each hang, and how).
    Incidents(IncidentsArgs),
}

/// Where the cluster is.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (e.g. http://10.0.0.2:2379).
    #[arg(
        long = "etcd",
        value_name = "URLS",
        value_delimiter = ',',
        required = true
    )]
    pub endpoints: Vec<String>,
    /// The cluster's key prefix in etcd.
    #[arg(long, value_name = "PREFIX", default_value = crate::cluster::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// etcd request timeout, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub etcd_timeout_ms: u64,
}

impl EtcdArgs {
    /// Connects.
    pub fn connect(&self) -> Result<crate::cluster::Etcd, crate::cluster::EtcdError> {
        crate::cluster::Etcd::connect(
            &self.endpoints,
            &self.etcd_prefix,
            Duration::from_millis(self.etcd_timeout_ms.max(1)),
        )
    }
}

/// `bdctl targets`.
#[derive(Debug, Subcommand)]
pub enum TargetsCommand {
    /// Register a target (or replace its record).
    Add(TargetsAddArgs),
    /// Remove a target (its owner stops watching it).
    Rm {
        /// The cluster.
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Target names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List the targets, their owners and open incidents.
    Ls {
        /// The cluster.
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `bdctl targets add`.
#[derive(Debug, Args)]
pub struct TargetsAddArgs {
    /// The cluster.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// NAME@HOST:PORT of each guest's agent.
    pub targets: Vec<String>,
    /// Register the [[targets]] of this watch configuration file too.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Key file for the targets given here (a path every monitor's host has).
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Their data path.
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    /// On a hang, hand the sessions to this instance (NAME@HOST:PORT).
    #[arg(long, value_name = "TARGET")]
    pub resume_to: Option<String>,
    /// The receiver's key file (with a repair key; default: --key-file).
    #[arg(long, value_name = "PATH", requires = "resume_to")]
    pub resume_key_file: Option<PathBuf>,
    /// The receiver's inbox hook.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "control",
        requires = "resume_to"
    )]
    pub resume_hook: String,
    /// The receiver's inbox slot size.
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 256,
        requires = "resume_to"
    )]
    pub resume_slot_size: u32,
    /// Only this service's sessions.
    #[arg(long, value_name = "NAME", requires = "resume_to")]
    pub resume_service: Option<String>,
}

/// `bdctl incidents`.
#[derive(Debug, Args)]
pub struct IncidentsArgs {
    /// The cluster.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Print JSON (one array).
    #[arg(long)]
    pub json: bool,
}

/// How to find and decode a guest kernel's memory (docs/kernel-evidence.md).
#[derive(Debug, Clone, Args, Default)]
pub struct KernelArgs {
    /// Read through the VMM's forensic view of all guest RAM (needs the
    /// key file's `forensic` key): for a guest without backdoor.ko.
    #[arg(long)]
    pub forensic: bool,
    /// The guest kernel's System.map, to name kernel code at each vCPU's
    /// RIP (Debian's is in its linux-image-*-dbg package).
    #[arg(long, value_name = "PATH")]
    pub system_map: Option<PathBuf>,
    /// The guest kernel's vmlinux (ELF, with its BTF): the log's layout
    /// when guest RAM holds no BTF (a kernel built without it).
    #[arg(long, value_name = "PATH")]
    pub vmlinux: Option<PathBuf>,
    /// With --forensic: find the kernel by scanning all RAM, not through a
    /// vCPU's page tables (tables the guest may have scribbled on).
    #[arg(long, requires = "forensic")]
    pub scan_all_ram: bool,
    /// backdoor.ko as loaded in the guest, to name code in it.
    #[arg(long, value_name = "PATH")]
    pub module: Option<PathBuf>,
}

/// `bdctl dmesg`.
#[derive(Debug, Args)]
pub struct DmesgArgs {
    /// The target.
    #[command(flatten)]
    pub t: OneTarget,
    /// Where the kernel is.
    #[command(flatten)]
    pub k: KernelArgs,
    /// Keep reading and print new lines as the kernel writes them.
    #[arg(long)]
    pub follow: bool,
    /// How often --follow reads, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub follow_interval_ms: u64,
}

/// `bdctl evidence`.
#[derive(Debug, Args)]
pub struct EvidenceArgs {
    /// The target.
    #[command(flatten)]
    pub t: OneTarget,
    /// Where the kernel is.
    #[command(flatten)]
    pub k: KernelArgs,
    /// Kernel log lines kept (the newest).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub lines: usize,
    /// The bundle's file (JSON).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// A target and its keys.
#[derive(Debug, Args)]
pub struct OneTarget {
    /// NAME@HOST:PORT of the guest's agent.
    pub target: String,
    /// Key file (TOML: read = "<hex>", repair = "<hex>").
    #[arg(long, value_name = "PATH")]
    pub key_file: PathBuf,
    /// Connect and reply timeout, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// How to read the guest's memory: auto (verbs where the agent offers
    /// them and this host has an RDMA device), soft or verbs.
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    pub transport: Transport,
    /// The local RDMA device for verbs (default: the first).
    #[arg(long, value_name = "NAME")]
    pub rdma_device: Option<String>,
}

impl OneTarget {
    /// The parsed target.
    pub fn target(&self) -> Result<Target, TargetError> {
        Ok(Target::parse(&self.target, &self.key_file)?
            .with_transport(self.transport, self.rdma_device.clone()))
    }

    /// The timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// `bdctl watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// NAME@HOST:PORT of each guest's agent.
    pub targets: Vec<String>,
    /// TOML configuration (targets, keys, interval, actions).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Key file for targets given on the command line.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Poll interval in milliseconds.
    #[arg(long, value_name = "MS")]
    pub interval_ms: Option<u64>,
    /// Connect/reply timeout per target in milliseconds.
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u64>,
    /// How long a guest generation may take to show its first progress
    /// counter before it is judged lost (default 60000: a booting Linux
    /// guest loads its driver well within it).
    #[arg(long, value_name = "MS")]
    pub grace_ms: Option<u64>,
    /// One JSON event per line.
    #[arg(long)]
    pub json: bool,
    /// Serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Shell command to run on a hang (or a lost or corrupt guest); the event is in $BDCTL_EVENT.
    #[arg(long, value_name = "CMD")]
    pub on_hang: Option<String>,
    /// Extract the hung guest's sessions into DIR (over the watch's own
    /// connection, then up to 4 new ones with backoff).
    #[arg(long, value_name = "DIR")]
    pub extract_on_hang: Option<PathBuf>,
    /// Stop after N polling rounds.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Exit with status 3 once a hang has been reported and its actions are done.
    #[arg(long)]
    pub exit_on_hang: bool,
    /// How to read the guests' memory: auto, soft or verbs.
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    /// The local RDMA device for verbs (default: the first).
    #[arg(long, value_name = "NAME")]
    pub rdma_device: Option<String>,
    /// On a hang, write an evidence bundle into DIR before any action runs.
    #[arg(long, value_name = "DIR")]
    pub evidence_dir: Option<PathBuf>,
    /// Where the kernel is, for the bundles.
    #[command(flatten)]
    pub k: KernelArgs,
    /// Cluster mode: watch the targets registered in etcd at these
    /// endpoints (comma-separated) that the cluster gives this monitor.
    #[arg(long = "etcd", value_name = "URLS", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The cluster's key prefix in etcd.
    #[arg(long, value_name = "PREFIX", default_value = crate::cluster::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// This monitor's id in the cluster (default: HOSTNAME-PID).
    #[arg(long, value_name = "ID")]
    pub monitor_id: Option<String>,
    /// The monitor's lease in etcd, in milliseconds (whole seconds): how
    /// long the targets of a dead or cut-off monitor wait for a new owner.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub lease_ttl_ms: u64,
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Poll interval.
    pub interval_ms: Option<u64>,
    /// Timeout per target.
    pub timeout_ms: Option<u64>,
    /// Grace for a generation's first counter.
    pub grace_ms: Option<u64>,
    /// Default key file for targets.
    pub key_file: Option<PathBuf>,
    /// On-hang command.
    pub on_hang: Option<String>,
    /// On-hang extraction directory.
    pub extract_on_hang: Option<PathBuf>,
    /// Metrics address.
    pub metrics: Option<String>,
    /// Default transport for targets.
    pub transport: Option<Transport>,
    /// Local RDMA device for verbs.
    pub rdma_device: Option<String>,
    /// On-hang evidence directory.
    pub evidence_dir: Option<PathBuf>,
    /// Targets.
    #[serde(default)]
    pub targets: Vec<ConfigTarget>,
}

/// One target in the configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigTarget {
    /// NAME@HOST:PORT.
    pub target: String,
    /// Its own key file (else the file's default).
    pub key_file: Option<PathBuf>,
    /// Its own transport (else the default).
    pub transport: Option<Transport>,
}

/// Errors assembling the watch configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable or invalid TOML.
    #[error("config {path}: {detail}")]
    File { path: String, detail: String },
    /// A target or key problem.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Nothing to watch, or no keys.
    #[error("{0}")]
    Missing(String),
    /// Bad value.
    #[error("{0}")]
    Value(String),
}

/// Reads and parses a configuration file.
pub fn load_config(path: &Path) -> Result<ConfigFile, ConfigError> {
    let err = |detail: String| ConfigError::File {
        path: path.display().to_string(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    toml::from_str(&text).map_err(|e| err(e.message().to_owned()))
}

impl WatchArgs {
    /// Merges flags over the config file into targets and options.
    pub fn resolve(&self) -> Result<(Vec<crate::watch::Job>, WatchOptions), ConfigError> {
        let file = match &self.config {
            Some(p) => load_config(p)?,
            None => ConfigFile::default(),
        };
        let base = self
            .config
            .as_deref()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        let rel = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let default_keys = self
            .key_file
            .clone()
            .or_else(|| file.key_file.as_deref().map(rel));
        let transport = self.transport.or(file.transport).unwrap_or_default();
        let device = self.rdma_device.clone().or(file.rdma_device.clone());
        let mut targets = Vec::new();
        for t in &file.targets {
            let keys = t
                .key_file
                .as_deref()
                .map(rel)
                .or_else(|| default_keys.clone())
                .ok_or_else(|| {
                    ConfigError::Missing(format!(
                        "no key file for target {} (set key_file)",
                        t.target
                    ))
                })?;
            let tr = self.transport.or(t.transport).unwrap_or(transport);
            targets.push(Target::parse(&t.target, &keys)?.with_transport(tr, device.clone()));
        }
        for t in &self.targets {
            let keys = default_keys.clone().ok_or_else(|| {
                ConfigError::Missing("give --key-file (or key_file in --config)".into())
            })?;
            targets.push(Target::parse(t, &keys)?.with_transport(transport, device.clone()));
        }
        let cluster = self.cluster()?;
        if cluster.is_some() && !targets.is_empty() {
            return Err(ConfigError::Value(
                "with --etcd the targets come from the cluster: register them with `bdctl targets add`".into(),
            ));
        }
        if targets.is_empty() && cluster.is_none() {
            return Err(ConfigError::Missing(
                "no targets: give NAME@HOST:PORT or a --config with [[targets]]".into(),
            ));
        }
        let interval_ms = self.interval_ms.or(file.interval_ms).unwrap_or(100);
        let timeout_ms = self.timeout_ms.or(file.timeout_ms).unwrap_or(500);
        if interval_ms == 0 || timeout_ms == 0 {
            return Err(ConfigError::Value(
                "interval and timeout must be at least 1 ms".into(),
            ));
        }
        let grace = self
            .grace_ms
            .or(file.grace_ms)
            .map_or(crate::judge::DEFAULT_GRACE, Duration::from_millis);
        let opts = WatchOptions {
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
            grace,
            json: self.json,
            metrics: self.metrics.clone().or(file.metrics),
            on_hang: self.on_hang.clone().or(file.on_hang),
            extract_on_hang: self
                .extract_on_hang
                .clone()
                .or(file.extract_on_hang.as_deref().map(rel)),
            count: self.count,
            exit_on_hang: self.exit_on_hang,
            evidence_dir: self
                .evidence_dir
                .clone()
                .or(file.evidence_dir.as_deref().map(rel)),
            kernel: self.k.clone(),
            cluster,
        };
        let jobs = targets
            .into_iter()
            .map(|target| crate::watch::Job {
                target,
                resume: None,
            })
            .collect();
        Ok((jobs, opts))
    }

    fn cluster(&self) -> Result<Option<crate::cluster::ClusterOptions>, ConfigError> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        let secs = self.lease_ttl_ms.div_ceil(1000);
        if secs < 2 {
            return Err(ConfigError::Value(
                "--lease-ttl-ms must be at least 2000 (etcd leases are whole seconds, and the lease is renewed four times per TTL)".into(),
            ));
        }
        let id = self.monitor_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "bdctl".into());
            format!("{host}-{}", std::process::id())
        });
        if id.is_empty() || id.contains('/') {
            return Err(ConfigError::Value(format!(
                "monitor id {id:?} must be non-empty and without '/'"
            )));
        }
        Ok(Some(crate::cluster::ClusterOptions {
            endpoints: self.etcd.clone(),
            prefix: self.etcd_prefix.clone(),
            id,
            ttl: Duration::from_secs(secs),
        }))
    }
}

/// `bdctl extract`.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// The target.
    #[command(flatten)]
    pub t: OneTarget,
    /// Only this service's sessions.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// Write the JSON here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also write each session's raw payload to DIR/<service>-<session>.bin.
    #[arg(long, value_name = "DIR")]
    pub raw: Option<PathBuf>,
}

/// `bdctl resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The instance that takes the sessions over.
    #[command(flatten)]
    pub t: OneTarget,
    /// An extraction (from `bdctl extract --out`).
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// Only this service's sessions.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// The REPAIR hook holding the inbox.
    #[arg(long, value_name = "NAME", default_value = "control")]
    pub hook: String,
    /// Inbox slot size.
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub slot_size: u32,
    /// The hand-over's fencing token: the receiver refuses one older than
    /// a hand-over it took from the same source (a cluster incident uses
    /// its etcd revision).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub fence_token: u64,
    /// The source's name as the receiver books it (default: the extraction's guest).
    #[arg(long, value_name = "NAME")]
    pub source: Option<String>,
}

/// `bdctl read`.
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// The target.
    #[command(flatten)]
    pub t: OneTarget,
    /// Hook name or id.
    pub hook: String,
    /// Offset in the hook.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
}

/// `bdctl write`.
#[derive(Debug, Args)]
pub struct WriteArgs {
    /// The target.
    #[command(flatten)]
    pub t: OneTarget,
    /// Hook name or id.
    pub hook: String,
    /// Offset in the hook.
    pub offset: u64,
    /// Bytes, as hex.
    pub hex: String,
}

/// `bdctl cas`.
#[derive(Debug, Args)]
pub struct CasArgs {
    /// The target.
    #[command(flatten)]
    pub t: OneTarget,
    /// Hook name or id.
    pub hook: String,
    /// Offset (8-byte aligned).
    pub offset: u64,
    /// Expected value.
    pub expected: u64,
    /// New value.
    pub new: u64,
}

/// `bdctl doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Also try to reach and authenticate to this target.
    pub target: Option<String>,
    /// Key file for the target.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
}
