//! Admitting monitors: the handshake (HELLO → ACCEPT, Noise NNpsk0 in
//! `backdoor_proto::channel`) without I/O, and the gate that runs every pending
//! handshake on one epoll thread (event-manager) under hostile clients.
//!
//! What a client that holds no key can take is bounded: a pending
//! handshake costs one socket and a few hundred bytes, never a thread;
//! HELLO may carry at most [`PREAUTH_MAX_PAYLOAD`] bytes; the
//! whole handshake must finish within its deadline however slowly the
//! bytes trickle in; at most [`MAX_PENDING`] handshakes wait at once
//! ([`MAX_PENDING_PER_SOURCE`] from one address), and a new arrival
//! beyond that takes the place of the oldest, so no number of idle
//! sockets keeps a monitor out. Slots for authenticated monitors are
//! counted apart (see `server.rs`). Refusals are counted and logged as a
//! summary at most every [`LOG_EVERY`], never one line each.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::timerfd::TimerFd;

use crate::auth;
use crate::channel::{self, Channel, HandshakeError};
use crate::wire::{read_msg_bounded, write_msg, ErrorCode, Msg, Role, WireError, HEADER_LEN};

/// The largest payload HELLO may carry: with the longest VM name and
/// the Noise message it is 115 bytes.
pub const PREAUTH_MAX_PAYLOAD: u32 = 128;
/// How long a client has for the whole handshake.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// Most handshakes pending at once.
pub const MAX_PENDING: usize = 4096;
/// Most handshakes pending from one IP address.
pub const MAX_PENDING_PER_SOURCE: usize = 1024;
/// Shortest gap between two summary lines about refused handshakes.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Who may connect, and with which keys: what the handshake needs of the
/// agent.
pub trait KeyRing {
    /// The VM this agent serves.
    fn vm(&self) -> &str;
    /// The key of `role`, if that role is enabled.
    fn key(&self, role: Role) -> Option<Vec<u8>>;
}

impl<T: KeyRing + ?Sized> KeyRing for std::sync::Arc<T> {
    fn vm(&self) -> &str {
        (**self).vm()
    }
    fn key(&self, role: Role) -> Option<Vec<u8>> {
        (**self).key(role)
    }
}

/// A monitor that proved it holds the key of `role`.
#[derive(Debug)]
pub struct Admitted {
    /// Its role.
    pub role: Role,
    /// The connection's encrypted channel (every later frame).
    pub channel: Channel,
}

/// What the agent does with a HELLO.
#[derive(Debug)]
pub enum Step {
    /// Send this ACCEPT, then serve the monitor.
    Admit(Msg, Box<Admitted>),
    /// Send this refusal and close.
    Refuse(Msg, Refused),
}

/// Why a handshake was refused (for the summary counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not the frame the handshake expected.
    Protocol,
    /// A wrong key, an unknown VM or a disabled role.
    Auth,
    /// The agent could not run the handshake (no randomness).
    Internal,
}

/// Answers a client's first frame.
pub fn hello(keys: &dyn KeyRing, msg: Msg) -> Step {
    let Msg::Hello { vm, role, noise } = msg else {
        return Step::Refuse(
            error(ErrorCode::BadRequest, "expected HELLO"),
            Refused::Protocol,
        );
    };
    let key = if vm == keys.vm() {
        keys.key(role)
    } else {
        None
    };
    // An unknown VM or role runs the handshake with a random key, so it
    // fails as a wrong key does: a prober learns nothing it should not.
    let key = match key {
        Some(k) => k,
        None => match auth::random_key() {
            Ok(k) => k.to_vec(),
            Err(_) => return internal(),
        },
    };
    match channel::respond(&key, &vm, role, &noise) {
        Ok((channel, accept)) => Step::Admit(
            Msg::Accept { noise: accept },
            Box::new(Admitted { role, channel }),
        ),
        Err(HandshakeError::NotAuthentic) => Step::Refuse(
            error(
                ErrorCode::AuthFailed,
                "authentication failed: not the key of this role of this VM",
            ),
            Refused::Auth,
        ),
        Err(HandshakeError::Noise(e)) => {
            tracing::debug!("agent: noise handshake: {}", backdoor_abi::ErrorChain(&e));
            internal()
        }
    }
}

fn internal() -> Step {
    Step::Refuse(
        error(ErrorCode::Internal, "the agent cannot run a handshake now"),
        Refused::Internal,
    )
}

fn error(code: ErrorCode, message: &str) -> Msg {
    Msg::Error {
        code,
        message: message.to_owned(),
    }
}

/// The handshake over blocking byte streams (the fuzz targets drive it
/// without a socket): the admitted monitor, or None after a refusal.
pub fn authenticate(
    keys: &dyn KeyRing,
    r: &mut impl Read,
    w: &mut impl Write,
) -> Result<Option<Admitted>, WireError> {
    let (_, msg) = read_msg_bounded(r, PREAUTH_MAX_PAYLOAD)?;
    let (reply, admitted) = match hello(keys, msg) {
        Step::Admit(m, a) => (m, Some(*a)),
        Step::Refuse(m, _) => (m, None),
    };
    write_msg(w, 0, &reply)?;
    w.flush()?;
    Ok(admitted)
}

/// Where the gate sends an admitted monitor: its own connection thread.
pub trait Admit: Send {
    /// Takes over `stream` (still non-blocking) for `admitted`. `accept`
    /// is the ACCEPT frame, not yet sent: the admitter sends it with the
    /// first encrypted frame (WELCOME) in one write, so the monitor wakes
    /// once for both, and never blocks the gate doing so.
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr, admitted: Admitted, accept: Vec<u8>);
}

/// A handshake in progress on a non-blocking socket.
struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    buf: Vec<u8>,
}

/// Counts of what the gate refused since its last summary line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GateCounts {
    /// Wrong keys, unknown VMs, disabled roles.
    pub auth_failed: u64,
    /// Frames that were not the expected ones, or too large.
    pub malformed: u64,
    /// Handshakes that did not finish within the deadline.
    pub timed_out: u64,
    /// Pending handshakes dropped to make room for newer ones.
    pub evicted: u64,
    /// Accepts that found the process out of file descriptors.
    pub no_fds: u64,
    /// Other failed accepts.
    pub accept_failed: u64,
    /// Handshakes the agent could not run (no randomness).
    pub internal: u64,
}

impl GateCounts {
    fn any(&self) -> bool {
        *self != Self::default()
    }
}

/// The listener and every pending handshake: one event-manager
/// subscriber on one thread.
pub struct Gate<K, A> {
    listener: TcpListener,
    /// Whether the listener is in the epoll set (out of fds, it is not).
    listening: bool,
    tick: TimerFd,
    keys: K,
    admit: A,
    deadline: Duration,
    pending: HashMap<u32, Pending>,
    /// Arrival order (fd, arrival number) for eviction of the oldest;
    /// entries whose handshake already ended are skipped.
    order: VecDeque<(u32, u64)>,
    arrivals: HashMap<u32, u64>,
    per_source: HashMap<IpAddr, usize>,
    next_arrival: u64,
    counts: GateCounts,
    total: GateCounts,
    last_log: Instant,
}

impl<K, A> std::fmt::Debug for Gate<K, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("pending", &self.pending.len())
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

/// The listener's event data (socket fds are their own data).
const LISTENER: u32 = u32::MAX;
/// The sweep timer's event data.
const TICK: u32 = u32::MAX - 1;
/// How often deadlines are checked.
const TICK_EVERY: Duration = Duration::from_millis(250);

impl<K: KeyRing + Send, A: Admit> Gate<K, A> {
    /// A gate for `listener` that hands admitted monitors to `admit`.
    pub fn new(listener: TcpListener, keys: K, admit: A) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let mut tick = TimerFd::new()?;
        tick.reset(TICK_EVERY, Some(TICK_EVERY))?;
        raise_open_file_limit();
        Ok(Self {
            listener,
            listening: true,
            tick,
            keys,
            admit,
            deadline: HANDSHAKE_DEADLINE,
            pending: HashMap::new(),
            order: VecDeque::new(),
            arrivals: HashMap::new(),
            per_source: HashMap::new(),
            next_arrival: 0,
            counts: GateCounts::default(),
            total: GateCounts::default(),
            last_log: Instant::now(),
        })
    }

    /// Gives each client `deadline` for its whole handshake.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Runs the gate on the calling thread, forever.
    pub fn run(self) -> io::Result<()>
    where
        K: 'static,
        A: 'static,
    {
        let mut events: EventManager<Self> =
            EventManager::new().map_err(|e| io::Error::other(format!("{e:?}")))?;
        events.add_subscriber(self);
        loop {
            events
                .run()
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
        }
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.start(stream, peer, ops),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Out of fds: the oldest pending handshake makes room;
                    // with none to drop, stop accepting until the next tick
                    // rather than spin on a listener that stays readable.
                    self.counts.no_fds += 1;
                    if self.pending.is_empty() {
                        let _ =
                            ops.remove(Events::with_data(&self.listener, LISTENER, EventSet::IN));
                        self.listening = false;
                        return;
                    }
                    self.evict_oldest(None, ops);
                }
                Err(e) => {
                    self.counts.accept_failed += 1;
                    tracing::debug!("agent: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn start(&mut self, stream: TcpStream, peer: SocketAddr, ops: &mut EventOps) {
        if stream.set_nonblocking(true).is_err() || stream.set_nodelay(true).is_err() {
            return;
        }
        let from_source = self.per_source.get(&peer.ip()).copied().unwrap_or(0);
        if from_source >= MAX_PENDING_PER_SOURCE {
            self.evict_oldest(Some(peer.ip()), ops);
        } else if self.pending.len() >= MAX_PENDING {
            self.evict_oldest(None, ops);
        }
        let fd = fd_key(&stream);
        if ops
            .add(Events::with_data(
                &stream,
                fd,
                EventSet::IN | EventSet::READ_HANG_UP,
            ))
            .is_err()
        {
            return;
        }
        let n = self.next_arrival;
        self.next_arrival += 1;
        self.order.push_back((fd, n));
        self.arrivals.insert(fd, n);
        *self.per_source.entry(peer.ip()).or_default() += 1;
        self.pending.insert(
            fd,
            Pending {
                stream,
                peer,
                deadline: Instant::now() + self.deadline,
                buf: Vec::new(),
            },
        );
    }

    /// Drops the oldest pending handshake (from `source`, if given).
    fn evict_oldest(&mut self, source: Option<IpAddr>, ops: &mut EventOps) {
        let mut kept = VecDeque::new();
        let mut victim = None;
        while let Some((fd, n)) = self.order.pop_front() {
            if self.arrivals.get(&fd) != Some(&n) {
                continue; // that handshake already ended
            }
            let matches =
                source.is_none_or(|ip| self.pending.get(&fd).is_some_and(|p| p.peer.ip() == ip));
            if matches {
                victim = Some(fd);
                break;
            }
            kept.push_back((fd, n));
        }
        while let Some(e) = kept.pop_back() {
            self.order.push_front(e);
        }
        if let Some(fd) = victim {
            self.counts.evicted += 1;
            self.end(fd, ops);
        }
    }

    /// Forgets a pending handshake (closing its socket unless `keep`).
    fn take(&mut self, fd: u32, ops: &mut EventOps) -> Option<Pending> {
        let p = self.pending.remove(&fd)?;
        self.arrivals.remove(&fd);
        let _ = ops.remove(Events::with_data(
            &p.stream,
            fd,
            EventSet::IN | EventSet::READ_HANG_UP,
        ));
        if let Some(n) = self.per_source.get_mut(&p.peer.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&p.peer.ip());
            }
        }
        Some(p)
    }

    fn end(&mut self, fd: u32, ops: &mut EventOps) {
        drop(self.take(fd, ops));
    }

    /// Reads what `fd` has and advances its handshake.
    fn readable(&mut self, fd: u32, ops: &mut EventOps) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; HEADER_LEN + PREAUTH_MAX_PAYLOAD as usize];
        let n = match p.stream.read(&mut chunk) {
            Ok(0) => return self.end(fd, ops),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return
            }
            Err(_) => return self.end(fd, ops),
        };
        p.buf.extend_from_slice(&chunk[..n]);
        let need = match frame_len(&p.buf) {
            Ok(Some(need)) => need,
            Ok(None) => return, // more bytes to come
            Err(()) => return self.refuse_malformed(fd, ops),
        };
        let msg = match read_msg_bounded(&mut &p.buf[..need], PREAUTH_MAX_PAYLOAD) {
            // The client waits for ACCEPT: nothing may follow HELLO.
            Ok((_, m)) if p.buf.len() == need => m,
            _ => return self.refuse_malformed(fd, ops),
        };
        match hello(&self.keys, msg) {
            Step::Admit(accept, admitted) => {
                let Some(p) = self.take(fd, ops) else {
                    return;
                };
                let mut frame = Vec::new();
                if write_msg(&mut frame, 0, &accept).is_ok() {
                    self.admit.admit(p.stream, p.peer, *admitted, frame);
                }
            }
            Step::Refuse(m, why) => {
                match why {
                    Refused::Auth => self.counts.auth_failed += 1,
                    Refused::Protocol => self.counts.malformed += 1,
                    Refused::Internal => self.counts.internal += 1,
                }
                self.refuse(fd, &m, ops);
            }
        }
    }

    fn refuse_malformed(&mut self, fd: u32, ops: &mut EventOps) {
        self.counts.malformed += 1;
        self.refuse(
            fd,
            &error(ErrorCode::BadRequest, "bad handshake frame"),
            ops,
        );
    }

    fn refuse(&mut self, fd: u32, m: &Msg, ops: &mut EventOps) {
        if let Some(mut p) = self.take(fd, ops) {
            send_now(&mut p.stream, m);
        }
    }

    /// Ends the handshakes past their deadline, and logs the summary.
    fn sweep(&mut self, now: Instant, ops: &mut EventOps) {
        let expired: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in expired {
            self.counts.timed_out += 1;
            self.end(fd, ops);
        }
        if !self.listening
            && ops
                .add(Events::with_data(&self.listener, LISTENER, EventSet::IN))
                .is_ok()
        {
            self.listening = true;
        }
        // The arrival queue only ever holds live handshakes and a bounded
        // backlog of ended ones; compact it when the backlog dominates.
        if self.order.len() > 2 * self.pending.len() + 64 {
            let arrivals = &self.arrivals;
            self.order.retain(|(fd, n)| arrivals.get(fd) == Some(n));
        }
        if self.counts.any() && now.duration_since(self.last_log) >= LOG_EVERY {
            let c = self.counts;
            tracing::warn!(
                auth_failed = c.auth_failed,
                malformed = c.malformed,
                timed_out = c.timed_out,
                evicted = c.evicted,
                out_of_fds = c.no_fds,
                accept_failed = c.accept_failed,
                internal = c.internal,
                pending = self.pending.len(),
                "agent: handshakes refused in the last {} s",
                now.duration_since(self.last_log).as_secs()
            );
            self.total.auth_failed += c.auth_failed;
            self.total.malformed += c.malformed;
            self.total.timed_out += c.timed_out;
            self.total.evicted += c.evicted;
            self.total.no_fds += c.no_fds;
            self.total.accept_failed += c.accept_failed;
            self.total.internal += c.internal;
            self.counts = GateCounts::default();
            self.last_log = now;
        }
    }
}

impl<K: KeyRing + Send, A: Admit> MutEventSubscriber for Gate<K, A> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.listener, LISTENER, EventSet::IN)) {
            tracing::error!("agent: cannot poll the listening socket: {e:?}");
        }
        if let Err(e) = ops.add(Events::with_data(&self.tick, TICK, EventSet::IN)) {
            tracing::error!("agent: cannot poll the handshake timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.data();
        if fd == LISTENER {
            return self.accept_all(ops);
        }
        if fd == TICK {
            let _ = self.tick.wait();
            return self.sweep(Instant::now(), ops);
        }
        if events.event_set().contains(EventSet::IN) {
            self.readable(fd, ops);
        }
        if events
            .event_set()
            .intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
            && self.pending.contains_key(&fd)
        {
            self.end(fd, ops);
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit
/// (best effort) and returns the limit now in force; the gate does so at
/// start, so that a flood of pending handshakes meets [`MAX_PENDING`]
/// before it meets the fd limit.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

fn fd_key(s: &TcpStream) -> u32 {
    // fds are small non-negative integers, far below TICK.
    u32::try_from(s.as_raw_fd()).unwrap_or(TICK - 1)
}

/// The length of the first whole frame in `buf`: None if incomplete,
/// Err if its header already says it is not a handshake frame.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, ()> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[12..16].try_into().map_err(|_| ())?);
    if len > PREAUTH_MAX_PAYLOAD {
        return Err(());
    }
    let need = HEADER_LEN + len as usize;
    Ok((buf.len() >= need).then_some(need))
}

/// Writes a small frame to a fresh non-blocking socket: it fits the
/// socket's buffer, and a client that does not read it is not waited for.
fn send_now(s: &mut TcpStream, m: &Msg) -> bool {
    let mut frame = Vec::new();
    write_msg(&mut frame, 0, m).is_ok() && s.write_all(&frame).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OneKey;
    impl KeyRing for OneKey {
        fn vm(&self) -> &str {
            "vm1"
        }
        fn key(&self, role: Role) -> Option<Vec<u8>> {
            (role == Role::Read).then(|| b"read-key-16-byte".to_vec())
        }
    }

    /// Runs a handshake as a monitor with `key` would, for `vm` and `role`.
    fn attempt(vm: &str, role: Role, key: &[u8]) -> Step {
        let (_, noise) = channel::Initiator::start(key, vm, role).unwrap();
        hello(
            &OneKey,
            Msg::Hello {
                vm: vm.into(),
                role,
                noise,
            },
        )
    }

    #[test]
    fn only_the_right_key_for_the_right_vm_and_role_is_admitted() {
        assert!(matches!(
            attempt("vm1", Role::Read, b"read-key-16-byte"),
            Step::Admit(Msg::Accept { .. }, a) if a.role == Role::Read
        ));
        for (vm, role, key) in [
            ("vm1", Role::Read, &b"wrong-key-16-byt"[..]),
            ("vm2", Role::Read, b"read-key-16-byte"),
            ("vm1", Role::Repair, b"read-key-16-byte"),
        ] {
            assert!(
                matches!(attempt(vm, role, key), Step::Refuse(_, Refused::Auth)),
                "{vm} {role:?}"
            );
        }
        assert!(matches!(
            hello(&OneKey, Msg::Describe),
            Step::Refuse(_, Refused::Protocol)
        ));
    }

    #[test]
    fn a_handshake_frame_may_not_claim_more_than_a_hello_needs() {
        let mut hello = Vec::new();
        write_msg(
            &mut hello,
            0,
            &Msg::Hello {
                vm: "v".repeat(crate::wire::MAX_NAME),
                role: Role::Read,
                noise: vec![0; channel::HANDSHAKE_MSG_LEN],
            },
        )
        .unwrap();
        assert!(hello.len() <= HEADER_LEN + PREAUTH_MAX_PAYLOAD as usize);
        assert_eq!(frame_len(&hello), Ok(Some(hello.len())));
        assert_eq!(frame_len(&hello[..HEADER_LEN + 3]), Ok(None));
        let mut big = hello[..HEADER_LEN].to_vec();
        big[12..16].copy_from_slice(&(PREAUTH_MAX_PAYLOAD + 1).to_le_bytes());
        assert_eq!(frame_len(&big), Err(()));
    }
}
