//! The control socket: a Unix stream socket speaking newline-delimited JSON.
//! This module owns parsing and the socket; the VM side is [`VmControl`].
//!
//! Requests are one JSON object per line, `{"cmd": "status"}`; every reply
//! is one line, `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
//! See docs/api.md for the fields.

use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};

use crate::bus::Io;
use crate::exit_counters::{ExitCounters, ExitCounts};
use crate::lifecycle::{Lifecycle, RunState, VmExit};

/// Longest request line accepted; a longer one closes the connection.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// Most connections served at once; more are refused.
pub const MAX_CONNECTIONS: usize = 64;
/// How long `pause` waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `vcpus` waits for every vCPU to report where it is.
pub const LOCATE_TIMEOUT: Duration = Duration::from_millis(500);

/// A request, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// VM state, configuration and exit counts.
    Status,
    /// Park every vCPU outside KVM_RUN.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Stop the VM; bdvmm exits with status 0.
    Stop,
    /// Per-vCPU exit counts only.
    Exits,
    /// The backdoor's published state: generation, seal, tamper count, hooks.
    Backdoor,
    /// Where each vCPU is: registers as of a kick (or its last exit).
    Vcpus,
}

/// The request as it travels: exactly one field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    cmd: String,
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    const EXPECTED: &str = "expected a JSON object like {\"cmd\":\"status\"} with cmd one of status, pause, resume, stop, exits, backdoor, vcpus";
    let wire: WireRequest =
        serde_json::from_slice(line).map_err(|e| format!("bad request ({e}); {EXPECTED}"))?;
    match wire.cmd.as_str() {
        "status" => Ok(Request::Status),
        "pause" => Ok(Request::Pause),
        "resume" => Ok(Request::Resume),
        "stop" => Ok(Request::Stop),
        "exits" => Ok(Request::Exits),
        "backdoor" => Ok(Request::Backdoor),
        "vcpus" => Ok(Request::Vcpus),
        other => Err(format!("unknown command {other:?}; {EXPECTED}")),
    }
}

/// Exit counts of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuExits {
    /// vCPU index.
    pub vcpu: u8,
    /// Counts by reason.
    #[serde(flatten)]
    pub counts: ExitCounts,
}

/// The reply to `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// running, paused or stopping.
    pub state: String,
    /// bdvmm's process id.
    pub pid: u32,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// What the guest is (kernel or test guest path).
    pub guest: String,
    /// Milliseconds since bdvmm started.
    pub uptime_ms: u64,
    /// CLOCK_MONOTONIC ns of the guest's first boot-timer write, if any.
    pub boot_timer_ns: Option<u64>,
    /// Port accesses that hit no device.
    pub unhandled_pio: u64,
    /// MMIO accesses that hit no device.
    pub unhandled_mmio: u64,
    /// Per-vCPU exit counts.
    pub exits: Vec<VcpuExits>,
    /// Which boot of the guest this is.
    pub boots: u32,
    /// The backdoor's generation (changes on every guest reset).
    pub generation: u32,
    /// Where the in-process backdoor agent listens, if it runs.
    pub agent_addr: Option<String>,
}

/// Where one vCPU is, in a `vcpus` reply.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum VcpuReport {
    /// Its registers, as of a kick (`fresh`) or of its last exit.
    Located {
        /// The registers.
        #[serde(flatten)]
        at: crate::vcpu::Location,
        /// Whether they were taken for this request.
        fresh: bool,
        /// Its host thread (0 before it started): what `SCHED` reads.
        tid: i32,
    },
    /// A vCPU that has not exited yet.
    Unknown {
        /// vCPU index.
        vcpu: u8,
        /// Always false.
        fresh: bool,
        /// Its host thread (0 before it started).
        tid: i32,
    },
}

/// The reply to `vcpus`.
#[derive(Debug, Clone, Serialize)]
pub struct VcpusReply {
    /// running, paused or stopping.
    pub state: &'static str,
    /// One per vCPU, by index.
    pub vcpus: Vec<VcpuReport>,
}

/// Every reply of the control socket; on the wire it is one JSON object
/// with `ok` ([`ReplyLine`]).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// `status`.
    Status(Box<Status>),
    /// `exits`.
    Exits {
        /// Per-vCPU exit counts.
        exits: Vec<VcpuExits>,
    },
    /// `backdoor`: the published hook table and counters.
    Backdoor(backdoor_dev::Descriptor),
    /// `vcpus`.
    Vcpus(VcpusReply),
    /// `pause`, `resume`, `stop`: the state the VM is now in.
    State {
        /// running, paused or stopping.
        state: &'static str,
    },
    /// A refused or failed request.
    Error {
        /// For people.
        error: String,
    },
}

impl Reply {
    /// A refusal.
    pub fn error(e: impl std::fmt::Display) -> Self {
        Self::Error {
            error: e.to_string(),
        }
    }

    /// The reply as it travels.
    pub fn line(&self) -> ReplyLine<'_> {
        ReplyLine {
            ok: !matches!(self, Self::Error { .. }),
            reply: self,
        }
    }
}

/// A reply on the wire: `{"ok": true, ...}` or `{"ok": false, "error": ...}`.
#[derive(Debug, Serialize)]
pub struct ReplyLine<'a> {
    /// Whether the request was carried out.
    pub ok: bool,
    /// The rest.
    #[serde(flatten)]
    pub reply: &'a Reply,
}

/// What the control socket can see and do to the VM.
#[derive(Debug)]
pub struct VmControl {
    /// Shared run state.
    pub lifecycle: Arc<Lifecycle>,
    /// Where pause and resume are told.
    pub events: Arc<crate::events::EventStream>,
    /// One set of counters per vCPU, by index.
    pub counters: Vec<Arc<ExitCounters>>,
    /// Where each vCPU was at its last exit, by index.
    pub locations: Vec<Arc<crate::vcpu::VcpuLocation>>,
    /// The buses (for their unhandled counts).
    pub io: Arc<Io>,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Description of the guest.
    pub guest: String,
    /// Boot-timer value (0 = not yet).
    pub boot_timer_ns: Arc<AtomicU64>,
    /// The backdoor's shared state.
    pub backdoor: Arc<backdoor_dev::BackdoorShared>,
    /// Which boot of the guest this is (1 = first; more after reboots).
    pub boots: u32,
    /// Where the in-process backdoor agent listens, if it runs.
    pub agent_addr: Option<String>,
}

impl VmControl {
    /// The host's view of each vCPU thread (run and wait time, state).
    pub fn sched(&self) -> serde_json::Value {
        let tids: Vec<_> = (0u8..)
            .zip(&self.locations)
            .map(|(i, l)| (i, l.tid()))
            .collect();
        backdoor_agent::sched::report(std::process::id(), &tids)
    }

    /// Every vCPU's exits added up, by kind.
    pub fn exit_totals(&self) -> ExitCounts {
        let mut sum = ExitCounts::default();
        for c in &self.counters {
            sum.add(&c.snapshot());
        }
        sum
    }

    fn exits(&self) -> Vec<VcpuExits> {
        self.counters
            .iter()
            .enumerate()
            .map(|(i, c)| VcpuExits {
                vcpu: u8::try_from(i).unwrap_or(u8::MAX),
                counts: c.snapshot(),
            })
            .collect()
    }

    /// Where each vCPU is: with `fresh`, after a kick that makes every
    /// running vCPU report now (up to [`LOCATE_TIMEOUT`]); without, as of
    /// each one's last exit (no cost to the guest at all).
    pub fn vcpus_report(&self, fresh: bool) -> VcpusReply {
        // A paused vCPU is parked outside KVM_RUN: where it parked is
        // where it is.
        let wait = match self.lifecycle.run_state() {
            RunState::Running if fresh => LOCATE_TIMEOUT,
            _ => Duration::ZERO,
        };
        let located = if fresh {
            crate::vcpu::locate(&self.locations, || self.lifecycle.kick_all(), wait)
        } else {
            self.locations.iter().map(|l| (l.last(), false)).collect()
        };
        let vcpus = located
            .into_iter()
            .zip(&self.locations)
            .enumerate()
            .map(|(i, ((loc, fresh), l))| match loc {
                Some(at) => VcpuReport::Located {
                    at,
                    fresh,
                    tid: l.tid(),
                },
                None => VcpuReport::Unknown {
                    vcpu: u8::try_from(i).unwrap_or(u8::MAX),
                    fresh: false,
                    tid: l.tid(),
                },
            })
            .collect();
        VcpusReply {
            state: self.state_name(),
            vcpus,
        }
    }

    fn state_name(&self) -> &'static str {
        match self.lifecycle.run_state() {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopping => "stopping",
        }
    }

    /// Carries out one request and builds its reply.
    pub fn handle(&self, req: Request) -> Reply {
        match req {
            Request::Status => Reply::Status(Box::new(Status {
                state: self.state_name().into(),
                pid: std::process::id(),
                vcpus: u8::try_from(self.counters.len()).unwrap_or(u8::MAX),
                mem_bytes: self.mem_bytes,
                guest: self.guest.clone(),
                uptime_ms: u64::try_from(self.lifecycle.started().elapsed().as_millis())
                    .unwrap_or(u64::MAX),
                boot_timer_ns: Some(self.boot_timer_ns.load(Ordering::Relaxed)).filter(|&t| t != 0),
                unhandled_pio: self.io.pio_unhandled(),
                unhandled_mmio: self.io.mmio_unhandled(),
                exits: self.exits(),
                boots: self.boots,
                generation: self.backdoor.snapshot().generation,
                agent_addr: self.agent_addr.clone(),
            })),
            Request::Exits => Reply::Exits {
                exits: self.exits(),
            },
            Request::Backdoor => Reply::Backdoor(self.backdoor.snapshot()),
            Request::Vcpus => Reply::Vcpus(self.vcpus_report(true)),
            Request::Pause => match self.lifecycle.pause(PAUSE_TIMEOUT) {
                Ok(()) => {
                    self.events.emit(&crate::events::Event::Paused);
                    Reply::State { state: "paused" }
                }
                Err(e) => Reply::error(e),
            },
            Request::Resume => match self.lifecycle.resume() {
                Ok(()) => {
                    self.events.emit(&crate::events::Event::Resumed);
                    Reply::State { state: "running" }
                }
                Err(e) => Reply::error(e),
            },
            Request::Stop => {
                self.lifecycle.request_exit(VmExit::ApiStop);
                Reply::State { state: "stopping" }
            }
        }
    }
}

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another live process serves this path.
    #[error("control socket {0} is in use by another process")]
    InUse(PathBuf),
    /// bind/listen failed.
    #[error("cannot listen on control socket {path}")]
    Bind { path: PathBuf, source: io::Error },
}

struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The control-socket subscriber of the event loop.
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<RawFd, Connection>,
    control: Arc<VmControl>,
    /// Connections refused for their peer's user (logged at powers of two).
    refused_peers: u64,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .field("conns", &self.conns.len())
            .finish()
    }
}

impl ApiServer {
    /// Binds `path`, replacing a stale socket left by a dead bdvmm.
    pub fn bind(path: &Path, control: Arc<VmControl>) -> Result<Self, ApiError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ApiError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            path: path.to_owned(),
            listener,
            conns: HashMap::new(),
            control,
            refused_peers: 0,
        })
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = backdoor_agent::peer::check_same_user(&stream) {
                        // Control of the VM is for its own user (or root).
                        self.refused_peers += 1;
                        if self.refused_peers.is_power_of_two() {
                            tracing::warn!(
                                refused = self.refused_peers,
                                "control socket: refusing a connection: {e}"
                            );
                        }
                        continue;
                    }
                    if self.conns.len() >= MAX_CONNECTIONS {
                        tracing::warn!(
                            "control socket: refusing a connection beyond {MAX_CONNECTIONS}"
                        );
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if ops
                        .add(Events::new(&stream, EventSet::IN | EventSet::READ_HANG_UP))
                        .is_ok()
                    {
                        self.conns.insert(
                            fd,
                            Connection {
                                stream,
                                buf: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads what is available and answers every complete line. Returns
    /// false when the connection must be closed.
    fn serve(&mut self, fd: RawFd) -> bool {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return false;
        };
        let mut chunk = [0u8; 1024];
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        let too_long = Reply::error(format!(
            "request longer than {MAX_REQUEST_BYTES} bytes; closing"
        ));
        while let Some(nl) = conn.buf.iter().position(|&b| b == b'\n') {
            if nl > MAX_REQUEST_BYTES {
                write_reply(&conn.stream, &too_long);
                return false;
            }
            let line: Vec<u8> = conn.buf.drain(..=nl).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let reply = match parse_request(line) {
                Ok(req) => self.control.handle(req),
                Err(e) => Reply::error(e),
            };
            if !write_reply(&conn.stream, &reply) {
                return false;
            }
        }
        if conn.buf.len() > MAX_REQUEST_BYTES {
            write_reply(&conn.stream, &too_long);
            return false;
        }
        true
    }
}

fn write_reply(mut stream: &UnixStream, reply: &Reply) -> bool {
    let Ok(mut bytes) = serde_json::to_vec(&reply.line()) else {
        return false;
    };
    bytes.push(b'\n');
    // Replies are small; a client that stops reading for a second is dropped
    // rather than allowed to stall the event loop.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let ok = stream.write_all(&bytes).is_ok();
    let _ = stream.set_nonblocking(true);
    ok
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("control socket: cannot watch the listener: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept_all(ops);
            return;
        }
        let keep = !events.event_set().contains(EventSet::HANG_UP) && self.serve(fd);
        if !keep {
            if let Some(conn) = self.conns.remove(&fd) {
                let _ = ops.remove(Events::empty(&conn.stream));
            }
        }
    }
}

/// How long a client waits for a reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest reply a client reads (the largest, `vcpus` of many vCPUs,
/// is far smaller).
const MAX_REPLY_BYTES: u64 = 4 << 20;

/// Client side: sends `{"cmd": cmd}` to the socket at `path` and returns the reply.
pub fn request(path: &Path, cmd: &str) -> Result<serde_json::Value, String> {
    let mut stream = UnixStream::connect(path)
        .map_err(|e| format!("cannot connect to control socket {}: {e}", path.display()))?;
    let io = |e: io::Error| {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            format!(
                "control socket {}: timed out after {} s waiting for a reply",
                path.display(),
                REPLY_TIMEOUT.as_secs()
            )
        } else {
            format!("control socket {}: {e}", path.display())
        }
    };
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
    stream
        .write_all(format!("{{\"cmd\":\"{cmd}\"}}\n").as_bytes())
        .map_err(io)?;
    // One line, and no more than a reply can be: a peer that never sends
    // a newline cannot make the client buffer without end.
    let mut reply = String::new();
    io::BufReader::new(stream)
        .take(MAX_REPLY_BYTES)
        .read_line(&mut reply)
        .map_err(io)?;
    serde_json::from_str(&reply).map_err(|e| format!("bad reply from {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_request(br#"{"cmd":"pause"}"#), Ok(Request::Pause));
        assert_eq!(parse_request(br#" {"cmd" : "exits"} "#), Ok(Request::Exits));
        for bad in [
            &br#"{"cmd":"reboot"}"#[..],
            b"status",
            b"{}",
            br#"{"cmd":"stop","x":1}"#,
            b"\xff\xfe",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(
                e.contains("status, pause, resume, stop, exits, backdoor"),
                "{e}"
            );
        }
    }
}
