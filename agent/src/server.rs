//! The agent's TCP server: admits monitors (`handshake.rs`: one thread
//! for every pending handshake) and serves the soft backend's one-sided
//! operations to each authenticated one on a thread of its own (and hands
//! out RDMA endpoints when the verbs backend is available). Every frame
//! after the handshake is encrypted (`backdoor_proto::channel`); a bad request gets
//! an error reply or a closed connection, and never affects the guest or
//! other monitors.

use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use backdoor_dev::Descriptor;

use crate::access::{authorize, Op, Refusal};
use crate::auth::{KeyFile, Keys};
use crate::channel::Channel;
use crate::descriptor::{DescriptorSource, PublicDescriptor, VcpuSource};
use crate::guest_mem::GuestMemory;
use crate::handshake::{self, Admit, Admitted, Gate, KeyRing, HANDSHAKE_DEADLINE};
use crate::wire::{BusyPoll, ErrorCode, Msg, Role, WireError, MAX_READ};

/// Default bound on concurrent authenticated monitors (clients still in
/// their handshake are bounded apart, in `handshake.rs`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default time an authenticated monitor may stay silent before the agent
/// closes its connection and frees its slot.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default busy-poll window after each reply (see [`Agent::with_busy_poll`]).
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);

/// The RDMA side of the agent, when a device exists (see `verbs.rs`).
pub trait VerbsService: Send + Sync {
    /// Sets up an RC queue pair and MRs of its own for an authenticated
    /// monitor; returns the agent's endpoint and the monitor's regions, as
    /// JSON, and the lease that keeps them (dropped with the connection).
    fn connect(
        &self,
        role: Role,
        desc: &backdoor_dev::Descriptor,
        client_endpoint: &[u8],
    ) -> Result<(Vec<u8>, VerbsLease), Refusal>;
}

/// What keeps a monitor's RDMA resources alive: held by its connection,
/// dropped (queue pair destroyed, MRs deregistered) when it ends.
pub type VerbsLease = Box<dyn std::any::Any + Send>;

/// Everything a connection needs.
pub struct Agent {
    vm: String,
    keys: Keys,
    /// Where the keys come from when they can rotate (read again on change).
    key_file: Option<KeyFile>,
    mem: Arc<GuestMemory>,
    source: Arc<dyn DescriptorSource>,
    verbs: Option<Arc<dyn VerbsService>>,
    vcpus: Option<Arc<dyn VcpuSource>>,
    max_connections: usize,
    connections: AtomicUsize,
    /// The monitors' threads, kept for the next connection.
    workers: Arc<crate::workers::Workers>,
    busy_poll: Duration,
    idle_timeout: Duration,
    handshake_deadline: Duration,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("vm", &self.vm)
            .field("connections", &self.connections.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent for `vm` serving `mem` within the hooks `source` publishes.
    pub fn new(
        vm: String,
        keys: Keys,
        mem: Arc<GuestMemory>,
        source: Arc<dyn DescriptorSource>,
    ) -> Self {
        Self {
            vm,
            keys,
            key_file: None,
            mem,
            source,
            verbs: None,
            vcpus: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            connections: AtomicUsize::new(0),
            workers: Arc::default(),
            busy_poll: DEFAULT_BUSY_POLL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            handshake_deadline: HANDSHAKE_DEADLINE,
        }
    }

    /// Takes its keys from `file` from now on, reading it again whenever
    /// it changes: keys rotate without a restart (new connections use the
    /// new keys; authenticated ones keep theirs).
    pub fn with_key_file(mut self, file: KeyFile) -> Self {
        self.key_file = Some(file);
        self
    }

    /// Closes an authenticated monitor silent for `idle`.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// Gives each client `deadline` for its whole handshake.
    pub fn with_handshake_deadline(mut self, deadline: Duration) -> Self {
        self.handshake_deadline = deadline;
        self
    }

    /// After each reply, spin up to `window` for the monitor's next request
    /// before blocking (0 disables). Saves a thread wake-up per request in
    /// back-to-back chains; costs at most `window` of host CPU per burst.
    pub fn with_busy_poll(mut self, window: Duration) -> Self {
        self.busy_poll = window;
        self
    }

    /// Offers RDMA verbs too.
    pub fn with_verbs(mut self, verbs: Arc<dyn VerbsService>) -> Self {
        self.verbs = Some(verbs);
        self
    }

    /// Answers VCPUS from `vcpus` (the VMM's report of its vCPUs).
    pub fn with_vcpus(mut self, vcpus: Arc<dyn VcpuSource>) -> Self {
        self.vcpus = Some(vcpus);
        self
    }

    /// Bounds concurrent authenticated monitors.
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    fn backends(&self) -> Vec<String> {
        let mut b = vec!["soft".to_owned()];
        if self.verbs.is_some() {
            b.push("verbs".to_owned());
        }
        b
    }

    /// Accepts monitors on `listener` on a thread of its own: every
    /// pending handshake on that one thread (`handshake.rs`), each
    /// authenticated monitor on a thread of its own.
    pub fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<JoinHandle<()>> {
        let gate =
            Gate::new(listener, self.clone(), self.clone())?.with_deadline(self.handshake_deadline);
        std::thread::Builder::new()
            .name("bd-agent".into())
            .spawn(move || {
                // Handshakes are short bursts on wake-up: they should
                // preempt a vCPU rather than wait out its slice.
                backdoor_proto::latency::prefer_short_slices();
                if let Err(e) = gate.run() {
                    tracing::error!(
                        "agent: the accept loop stopped: {}",
                        backdoor_abi::ErrorChain(&e)
                    );
                }
            })
    }

    /// The handshake over blocking byte streams (see
    /// [`handshake::authenticate`]); public so the fuzz targets in `fuzz/`
    /// drive the real handshake without a socket.
    pub fn authenticate(
        &self,
        r: &mut impl std::io::Read,
        w: &mut impl Write,
    ) -> Result<Option<Admitted>, WireError> {
        handshake::authenticate(self, r, w)
    }

    /// Serves one authenticated monitor until it leaves, goes idle past
    /// the idle timeout, or sends a frame that fails its check.
    /// `unsent` is what the gate could not yet send of ACCEPT and WELCOME.
    fn serve_monitor(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        role: Role,
        mut channel: Channel,
        unsent: &[u8],
    ) -> Result<(), WireError> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(self.idle_timeout))?;
        stream.set_write_timeout(Some(self.idle_timeout))?;
        let mut r = BufReader::new(stream.try_clone()?);
        let mut w = BufWriter::new(stream.try_clone()?);
        tracing::info!(%peer, role = role.name(), "agent: monitor authenticated");
        w.write_all(unsent)?;
        w.flush()?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        // This connection's RDMA queue pair and MRs: gone when it ends.
        let mut lease: Option<VerbsLease> = None;
        let mut spin = BusyPoll::new(self.busy_poll);
        loop {
            if r.buffer().is_empty() {
                spin.wait(fd);
            }
            let (id, msg) = match channel.recv(&mut r) {
                Ok(m) => m,
                Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(())
                }
                Err(WireError::TimedOut) => {
                    tracing::info!(%peer, "agent: closing a monitor idle for {:?}", self.idle_timeout);
                    return Ok(());
                }
                Err(e @ WireError::Integrity) => {
                    // Someone between monitor and agent changed, replayed
                    // or injected a frame: nothing of it is acted on.
                    tracing::warn!(%peer, "agent: {e}; closing the connection");
                    return Err(e);
                }
                Err(e @ (WireError::Malformed(_) | WireError::TooLarge(_))) => {
                    tracing::warn!(%peer, "agent: malformed request, closing: {e}");
                    let _ = channel.send(&mut w, 0, &error(ErrorCode::BadRequest, e.to_string()));
                    let _ = w.flush();
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            let reply = self.dispatch_holding(role, msg, &mut lease).unwrap_or_else(
                |(code, message)| {
                    tracing::debug!(%peer, role = role.name(), ?code, "agent: refused: {message}");
                    error(code, message)
                },
            );
            channel.send(&mut w, id, &reply)?;
            w.flush()?;
        }
    }

    /// The hooks `role` sees: the guest's, and for the forensic role also
    /// the VMM's read-only view of each RAM range (`ram@<guest address>`),
    /// which no guest can register, see or change.
    fn view(&self, role: Role) -> Arc<Descriptor> {
        let d = self.source.descriptor();
        if role != Role::Forensic {
            return d;
        }
        let mut d = Descriptor::clone(&d);
        d.hooks.extend(forensic_hooks(self.mem.ranges()));
        Arc::new(d)
    }

    fn public_descriptor(&self, role: Role) -> Vec<u8> {
        let mut d = Descriptor::clone(&self.view(role));
        d.tamper_count = self.source.tamper_count();
        let public = PublicDescriptor {
            sched: self.vcpus.is_some(),
            ..PublicDescriptor::new(&self.vm, &d, role, self.backends(), self.source.vmm_alive())
        };
        serde_json::to_vec(&public).unwrap_or_default()
    }

    /// Answers one request of a monitor authenticated as `role`: the reply,
    /// or the refusal to send as ERROR. Every check of docs/wire.md runs
    /// here; public so the fuzz targets drive it without a socket (a
    /// VERBS_CONNECT's queue pair then lives only as long as the call).
    pub fn dispatch(&self, role: Role, msg: Msg) -> Result<Msg, Refusal> {
        self.dispatch_holding(role, msg, &mut None)
    }

    /// As [`Agent::dispatch`]; a VERBS_CONNECT's lease goes to `lease`
    /// (replacing the connection's previous one).
    fn dispatch_holding(
        &self,
        role: Role,
        msg: Msg,
        lease: &mut Option<VerbsLease>,
    ) -> Result<Msg, Refusal> {
        let internal = |what: &str| {
            (
                ErrorCode::Internal,
                format!("{what} failed inside guest RAM bounds"),
            )
        };
        match msg {
            Msg::Describe => Ok(Msg::Descriptor(self.public_descriptor(role))),
            Msg::Read {
                generation,
                hook,
                offset,
                len,
            } => {
                let d = self.view(role);
                let gpa = authorize(&d, role, generation, hook, offset, u64::from(len), Op::Read)?;
                let mut buf = vec![0u8; len as usize];
                if !self.mem.read(gpa, &mut buf) {
                    return Err(internal("read"));
                }
                Ok(Msg::ReadOk(buf))
            }
            Msg::ReadBatch {
                generation,
                entries,
            } => {
                let d = self.view(role);
                let total: u64 = entries.iter().map(|e| u64::from(e.len)).sum();
                if total > u64::from(MAX_READ) {
                    return Err((
                        ErrorCode::TooLarge,
                        format!("batch of {total} bytes exceeds {MAX_READ}"),
                    ));
                }
                let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
                for e in &entries {
                    let gpa = authorize(
                        &d,
                        role,
                        generation,
                        e.hook,
                        e.offset,
                        u64::from(e.len),
                        Op::Read,
                    )?;
                    let start = out.len();
                    out.resize(start + e.len as usize, 0);
                    if !self.mem.read(gpa, &mut out[start..]) {
                        return Err(internal("read"));
                    }
                }
                Ok(Msg::ReadBatchOk(out))
            }
            Msg::Write {
                generation,
                hook,
                offset,
                data,
            } => {
                let d = self.view(role);
                let gpa = authorize(
                    &d,
                    role,
                    generation,
                    hook,
                    offset,
                    data.len() as u64,
                    Op::Write,
                )?;
                if !self.mem.write(gpa, &data) {
                    return Err(internal("write"));
                }
                Ok(Msg::WriteOk)
            }
            Msg::Cas {
                generation,
                hook,
                offset,
                expected,
                new,
            } => {
                let d = self.view(role);
                let gpa = authorize(&d, role, generation, hook, offset, 8, Op::Atomic)?;
                self.mem
                    .cas(gpa, expected, new)
                    .map(Msg::AtomicOk)
                    .ok_or_else(|| internal("compare-and-swap"))
            }
            Msg::Faa {
                generation,
                hook,
                offset,
                add,
            } => {
                let d = self.view(role);
                let gpa = authorize(&d, role, generation, hook, offset, 8, Op::Atomic)?;
                self.mem
                    .faa(gpa, add)
                    .map(Msg::AtomicOk)
                    .ok_or_else(|| internal("fetch-and-add"))
            }
            Msg::Vcpus => match self.vcpus.as_ref().and_then(|v| v.vcpus()) {
                Some(v) => Ok(Msg::VcpusInfo(serde_json::to_vec(&v).unwrap_or_default())),
                None => Err((
                    ErrorCode::Unsupported,
                    "the VMM reports no vCPUs to this agent".into(),
                )),
            },
            Msg::Sched => match self.vcpus.as_ref().and_then(|v| v.sched()) {
                Some(v) => Ok(Msg::SchedInfo(serde_json::to_vec(&v).unwrap_or_default())),
                None => Err((
                    ErrorCode::Unsupported,
                    "the VMM reports no vCPU threads to this agent".into(),
                )),
            },
            Msg::VerbsConnect(endpoint) => match &self.verbs {
                Some(v) => {
                    *lease = None;
                    let (info, held) = v.connect(role, &self.source.descriptor(), &endpoint)?;
                    *lease = Some(held);
                    Ok(Msg::VerbsInfo(info))
                }
                None => Err((
                    ErrorCode::Unsupported,
                    "this agent has no RDMA device; use the soft backend".into(),
                )),
            },
            other => Err((
                ErrorCode::BadRequest,
                format!("unexpected message {:?}", std::mem::discriminant(&other)),
            )),
        }
    }
}

/// Hook ids from here up are the VMM's forensic view, one per RAM range.
pub const FORENSIC_HOOK_BASE: u32 = 0xffff_ff00;

/// The forensic hooks over `ranges`.
pub fn forensic_hooks(ranges: &[crate::RamRange]) -> impl Iterator<Item = backdoor_dev::Hook> + '_ {
    (FORENSIC_HOOK_BASE..)
        .zip(ranges)
        .map(|(id, r)| backdoor_dev::Hook {
            id,
            gpa: r.guest_addr,
            len: r.len,
            kind: backdoor_abi::HookKind::Forensic,
            perms: backdoor_abi::PERM_READ,
            name: format!("ram@{:x}", r.guest_addr),
        })
}

fn error(code: ErrorCode, message: String) -> Msg {
    Msg::Error { code, message }
}

/// The agent's keys as the handshake sees them (the gate holds an
/// `Arc<Agent>`, which handshake.rs makes a key ring too).
impl KeyRing for Agent {
    fn vm(&self) -> &str {
        &self.vm
    }
    /// The key of `role` now in force.
    fn key(&self, role: Role) -> Option<Vec<u8>> {
        match &self.key_file {
            Some(f) => f.current().key(role),
            None => self.keys.key(role),
        }
    }
}

impl Admit for Arc<Agent> {
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr, admitted: Admitted, accept: Vec<u8>) {
        let Admitted { role, mut channel } = admitted;
        let full = self.connections.fetch_add(1, Ordering::SeqCst) >= self.max_connections;
        // Past ACCEPT, so a refusal is encrypted like any reply.
        let first = if full {
            tracing::warn!(%peer, "agent: refusing a monitor beyond {} connections", self.max_connections);
            error(ErrorCode::Busy, "too many monitors connected".into())
        } else {
            Msg::Welcome(self.public_descriptor(role))
        };
        let mut greeting = accept;
        let sent = channel
            .send(&mut greeting, 0, &first)
            .ok()
            .and_then(|()| write_some(&stream, &greeting));
        let (Some(sent), false) = (sent, full) else {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            return;
        };
        // What a full send buffer left is sent by the monitor's thread,
        // which may block: the gate never does.
        greeting.drain(..sent);
        let agent = self.clone();
        let spawned = self.workers.run(
            "bd-monitor",
            Box::new(move || {
                match agent.serve_monitor(stream, peer, role, channel, &greeting) {
                    Ok(()) => tracing::debug!(%peer, "agent: monitor left"),
                    Err(e) => {
                        tracing::info!(%peer, "agent: connection closed: {}", backdoor_abi::ErrorChain(&e))
                    }
                }
                agent.connections.fetch_sub(1, Ordering::SeqCst);
            }),
        );
        if spawned.is_err() {
            self.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Writes what a non-blocking `stream` takes now of `bytes`: how much, or
/// None if the connection failed.
fn write_some(mut stream: &TcpStream, bytes: &[u8]) -> Option<usize> {
    let mut sent = 0;
    while sent < bytes.len() {
        match stream.write(&bytes[sent..]) {
            Ok(0) => return None,
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return None,
        }
    }
    Some(sent)
}
