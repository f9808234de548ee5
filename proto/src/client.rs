//! The monitor side of the protocol: connect, run the Noise handshake
//! (which the agent finishes only if it holds the key), then one-sided
//! operations on hooks by id.
//!
//! The operations travel over the authenticated TCP connection (the soft
//! data path) or, once [`Client::attach_verbs`] connected an RDMA queue
//! pair, as one-sided RDMA work requests that the agent's NIC serves (the
//! verbs data path). DESCRIBE and the handshake always use TCP.

use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::channel::{Channel, HandshakeError, Initiator};
use crate::descriptor::PublicDescriptor;
use crate::wire::{self, read_msg_bounded, write_msg, BatchEntry, ErrorCode, Msg, Role, WireError};

/// Errors seen by a monitor.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Network or framing trouble: the backdoor cannot be read right now.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The agent refused the request.
    #[error("refused ({code:?}): {message}")]
    Refused {
        /// Why.
        code: ErrorCode,
        /// The agent's sentence.
        message: String,
    },
    /// The agent could not prove it holds the key: it is not the real agent.
    #[error("the agent failed to prove it knows the key: not trusting it")]
    AgentNotAuthentic,
    /// The handshake could not run on this side (no randomness).
    #[error("cannot start a handshake: {0}")]
    Handshake(String),
    /// The agent answered with something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The verbs data path failed or refused (boxed: a verbs error can
    /// carry a client error of its own).
    #[cfg(feature = "verbs")]
    #[error("RDMA verbs")]
    Verbs(#[source] Box<crate::verbs::VerbsError>),
}

#[cfg(feature = "verbs")]
impl From<crate::verbs::VerbsError> for ClientError {
    fn from(e: crate::verbs::VerbsError) -> Self {
        match e {
            crate::verbs::VerbsError::Client(c) => c,
            other => Self::Verbs(Box::new(other)),
        }
    }
}

impl ClientError {
    /// The refusal code, if the agent refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether this means "the backdoor could not be reached" (as opposed to a refusal).
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Wire(_) => true,
            // A failed or lost work request: the queue pair is gone, like
            // a dropped connection. (Out-of-bounds and permission refusals
            // are the monitor's own checks, not reachability.)
            #[cfg(feature = "verbs")]
            Self::Verbs(v) => matches!(
                **v,
                crate::verbs::VerbsError::Completion { .. }
                    | crate::verbs::VerbsError::Timeout(_)
                    | crate::verbs::VerbsError::Broken
                    | crate::verbs::VerbsError::Verb { .. }
            ),
            _ => false,
        }
    }
}

/// An authenticated connection to an agent.
#[derive(Debug)]
pub struct Client {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    /// Encrypts what this client sends, opens what the agent sends.
    channel: Channel,
    next_id: u32,
    descriptor: PublicDescriptor,
    busy_poll: crate::wire::BusyPoll,
    /// The agent answered SCHED with UNSUPPORTED (it serves no VMM): not
    /// asked again on this connection.
    no_sched: bool,
    #[cfg(feature = "verbs")]
    verbs: Option<Verbs>,
}

/// The verbs data path of a client, and the device it was opened on.
#[cfg(feature = "verbs")]
#[derive(Debug)]
struct Verbs {
    qp: crate::verbs_client::VerbsClient,
    device: Option<String>,
}

fn handshake_error(e: HandshakeError) -> ClientError {
    match e {
        HandshakeError::NotAuthentic => ClientError::AgentNotAuthentic,
        HandshakeError::Noise(e) => ClientError::Handshake(e.to_string()),
    }
}

/// Default time a client spins for a reply before blocking (its own CPU).
pub const DEFAULT_CLIENT_BUSY_POLL: Duration = Duration::from_micros(200);

impl Client {
    /// Connects and authenticates as `role` of `vm` with `key`. `timeout`
    /// bounds the connect and every later reply.
    pub fn connect(
        addr: impl ToSocketAddrs,
        vm: &str,
        role: Role,
        key: &[u8],
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let mut last = None;
        let mut stream = None;
        for a in addr.to_socket_addrs().map_err(WireError::from)? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| {
            WireError::Io(last.unwrap_or_else(|| std::io::Error::other("no address")))
        })?;
        stream.set_nodelay(true).map_err(WireError::from)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(WireError::from)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(WireError::from)?;
        let mut r = BufReader::new(stream.try_clone().map_err(WireError::from)?);
        let mut w = BufWriter::new(stream);

        let (handshake, noise) = Initiator::start(key, vm, role).map_err(handshake_error)?;
        write_msg(
            &mut w,
            0,
            &Msg::Hello {
                vm: vm.to_owned(),
                role,
                noise,
            },
        )?;
        w.flush().map_err(WireError::from)?;
        // The answer comes in the clear: an ACCEPT opens only if the agent
        // holds the key; a refusal could be forged, but can do no more
        // than cutting the connection does.
        let mut channel = match read_msg_bounded(&mut r, wire::MAX_HELLO_REPLY)?.1 {
            Msg::Accept { noise } => handshake.finish(&noise).map_err(handshake_error)?,
            Msg::Error { code, message } => return Err(ClientError::Refused { code, message }),
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected ACCEPT, got {other:?}"
                )))
            }
        };
        let descriptor = match channel.recv(&mut r)?.1 {
            Msg::Welcome(json) => parse_descriptor(&json)?,
            Msg::Error { code, message } => return Err(ClientError::Refused { code, message }),
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected WELCOME, got {other:?}"
                )))
            }
        };
        Ok(Self {
            r,
            w,
            channel,
            next_id: 1,
            descriptor,
            busy_poll: crate::wire::BusyPoll::new(DEFAULT_CLIENT_BUSY_POLL),
            no_sched: false,
            #[cfg(feature = "verbs")]
            verbs: None,
        })
    }

    /// Moves reads, writes and atomics onto RDMA verbs: connects a queue
    /// pair on `device` (or the first RDMA device) to the agent's, over
    /// this authenticated connection. Hooks the agent lists no region for
    /// keep using TCP. A reboot (a new generation at the next
    /// [`Client::describe`]) connects a new queue pair to the new regions.
    #[cfg(feature = "verbs")]
    pub fn attach_verbs(&mut self, device: Option<&str>) -> Result<(), ClientError> {
        self.verbs = None;
        let qp = crate::verbs_client::VerbsClient::connect(self, device)?;
        self.verbs = Some(Verbs {
            qp,
            device: device.map(str::to_owned),
        });
        Ok(())
    }

    /// "verbs" once a queue pair carries the operations, else "soft".
    pub fn data_path(&self) -> &'static str {
        #[cfg(feature = "verbs")]
        if self.verbs.is_some() {
            return "verbs";
        }
        "soft"
    }

    /// The queue pair for `hook`, if the verbs data path serves it under
    /// the current generation.
    #[cfg(feature = "verbs")]
    fn verbs_for(&mut self, hook: u32) -> Option<&mut crate::verbs_client::VerbsClient> {
        let generation = self.descriptor.generation;
        self.verbs
            .as_mut()
            .map(|v| &mut v.qp)
            .filter(|qp| qp.info().generation == generation && qp.region(hook).is_some())
    }

    /// How long to spin for each reply before blocking (0 disables).
    pub fn set_busy_poll(&mut self, window: Duration) {
        self.busy_poll = crate::wire::BusyPoll::new(window);
    }

    /// The descriptor as of the last WELCOME/DESCRIBE.
    pub fn descriptor(&self) -> &PublicDescriptor {
        &self.descriptor
    }

    fn call(&mut self, msg: &Msg) -> Result<Msg, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.channel.send(&mut self.w, id, msg)?;
        self.w.flush().map_err(WireError::from)?;
        if self.r.buffer().is_empty() {
            self.busy_poll
                .wait(std::os::fd::AsRawFd::as_raw_fd(self.r.get_ref()));
        }
        let (rid, reply) = self.channel.recv(&mut self.r)?;
        if let Msg::Error { code, message } = reply {
            return Err(ClientError::Refused { code, message });
        }
        if rid != id {
            return Err(ClientError::Protocol(format!(
                "reply {rid} to request {id}"
            )));
        }
        Ok(reply)
    }

    /// Fetches the current descriptor (new generation after a reboot, tamper count).
    pub fn describe(&mut self) -> Result<&PublicDescriptor, ClientError> {
        match self.call(&Msg::Describe)? {
            Msg::Descriptor(json) => {
                self.descriptor = parse_descriptor(&json)?;
                #[cfg(feature = "verbs")]
                self.follow_generation()?;
                Ok(&self.descriptor)
            }
            other => Err(unexpected(other)),
        }
    }

    /// After a reboot the old regions are revoked: connect a new queue
    /// pair to the new generation's.
    #[cfg(feature = "verbs")]
    fn follow_generation(&mut self) -> Result<(), ClientError> {
        let stale = self
            .verbs
            .as_ref()
            .filter(|v| v.qp.info().generation != self.descriptor.generation)
            .map(|v| v.device.clone());
        match stale {
            Some(device) => self.attach_verbs(device.as_deref()),
            None => Ok(()),
        }
    }

    /// Reads `len` bytes at `offset` of hook `hook`.
    pub fn read(&mut self, hook: u32, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        #[cfg(feature = "verbs")]
        if let Some(qp) = self.verbs_for(hook) {
            return Ok(qp.read(hook, offset, len as usize)?);
        }
        let generation = self.descriptor.generation;
        match self.call(&Msg::Read {
            generation,
            hook,
            offset,
            len,
        })? {
            Msg::ReadOk(b) if b.len() == len as usize => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    /// Reads `len` bytes of a hook with up to `depth` READs of at most
    /// `chunk` bytes in flight, calling `sink` with each chunk in order.
    /// Used for bulk extraction of large state boxes.
    pub fn read_bulk(
        &mut self,
        hook: u32,
        offset: u64,
        len: u64,
        chunk: u32,
        depth: usize,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<(), ClientError> {
        let chunk = u64::from(chunk.clamp(1, crate::wire::MAX_READ));
        #[cfg(feature = "verbs")]
        if let Some(qp) = self.verbs_for(hook) {
            // One READ per chunk; the NIC does the copying.
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(chunk);
                sink(&qp.read(hook, offset + at, usize::try_from(n).unwrap_or(usize::MAX))?);
                at += n;
            }
            return Ok(());
        }
        let generation = self.descriptor.generation;
        let reqs = (0..len.div_ceil(chunk)).map(|i| {
            let n = (len - i * chunk).min(chunk);
            let req = Msg::Read {
                generation,
                hook,
                offset: offset + i * chunk,
                len: u32::try_from(n).unwrap_or(u32::MAX),
            };
            (req, n)
        });
        self.pipeline(reqs, depth, |b| sink(&b))
    }

    /// Reads many batches with up to `depth` of them in flight; returns
    /// each batch's bytes, its entries' back to back, in order. The agent
    /// serves a connection's requests one after another, so an entry is
    /// read after every entry before it, in this batch or an earlier one.
    pub fn read_batches(
        &mut self,
        batches: &[Vec<BatchEntry>],
        depth: usize,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        #[cfg(feature = "verbs")]
        if let Some(first) = batches.first().and_then(|b| b.first()) {
            let one_hook = batches.iter().flatten().all(|e| e.hook == first.hook);
            if self.verbs_for(first.hook).is_some() && one_hook {
                // Queue pairs chain their READs already: batch by batch.
                return batches
                    .iter()
                    .map(|b| Ok(self.read_batch(b)?.concat()))
                    .collect();
            }
        }
        let generation = self.descriptor.generation;
        let reqs = batches.iter().map(|entries| {
            let total: u64 = entries.iter().map(|e| u64::from(e.len)).sum();
            let req = Msg::ReadBatch {
                generation,
                entries: entries.clone(),
            };
            (req, total)
        });
        let mut out = Vec::with_capacity(batches.len());
        self.pipeline(reqs, depth, |b| out.push(b))?;
        Ok(out)
    }

    /// Sends `reqs` (each with the length its reply must have) with up
    /// to `depth` in flight, and gives `sink` each reply's bytes in order.
    fn pipeline(
        &mut self,
        mut reqs: impl Iterator<Item = (Msg, u64)>,
        depth: usize,
        mut sink: impl FnMut(Vec<u8>),
    ) -> Result<(), ClientError> {
        let mut in_flight = std::collections::VecDeque::new();
        loop {
            while in_flight.len() < depth.max(1) {
                let Some((req, n)) = reqs.next() else { break };
                let id = self.next_id;
                self.next_id = self.next_id.wrapping_add(1);
                self.channel.send(&mut self.w, id, &req)?;
                in_flight.push_back((id, matches!(req, Msg::ReadBatch { .. }), n));
            }
            self.w.flush().map_err(WireError::from)?;
            let Some((id, batch, n)) = in_flight.pop_front() else {
                return Ok(());
            };
            let (rid, reply) = self.channel.recv(&mut self.r)?;
            match reply {
                Msg::ReadOk(b) if !batch && rid == id && b.len() as u64 == n => sink(b),
                Msg::ReadBatchOk(b) if batch && rid == id && b.len() as u64 == n => sink(b),
                Msg::Error { code, message } => return Err(ClientError::Refused { code, message }),
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Reads many ranges in one round trip; returns their bytes in order.
    pub fn read_batch(&mut self, entries: &[BatchEntry]) -> Result<Vec<Vec<u8>>, ClientError> {
        #[cfg(feature = "verbs")]
        if let Some(first) = entries.first() {
            let one_hook = entries.iter().all(|e| e.hook == first.hook);
            if let Some(qp) = self.verbs_for(first.hook).filter(|_| one_hook) {
                let reqs: Vec<_> = entries
                    .iter()
                    .map(|e| (e.hook, e.offset, e.len as usize))
                    .collect();
                return Ok(qp.read_batch(&reqs)?);
            }
        }
        let generation = self.descriptor.generation;
        let bytes = match self.call(&Msg::ReadBatch {
            generation,
            entries: entries.to_vec(),
        })? {
            Msg::ReadBatchOk(b) => b,
            other => return Err(unexpected(other)),
        };
        let total: usize = entries.iter().map(|e| e.len as usize).sum();
        if bytes.len() != total {
            return Err(ClientError::Protocol(format!(
                "batch reply of {} bytes, expected {total}",
                bytes.len()
            )));
        }
        let mut out = Vec::with_capacity(entries.len());
        let mut at = 0;
        for e in entries {
            out.push(bytes[at..at + e.len as usize].to_vec());
            at += e.len as usize;
        }
        Ok(out)
    }

    /// Writes `data` at `offset` of a REPAIR hook (repair role only).
    pub fn write(&mut self, hook: u32, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        #[cfg(feature = "verbs")]
        if let Some(qp) = self.verbs_for(hook) {
            return Ok(qp.write(hook, offset, data)?);
        }
        let generation = self.descriptor.generation;
        match self.call(&Msg::Write {
            generation,
            hook,
            offset,
            data: data.to_vec(),
        })? {
            Msg::WriteOk => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Compare-and-swap; returns the word's previous value.
    pub fn cas(
        &mut self,
        hook: u32,
        offset: u64,
        expected: u64,
        new: u64,
    ) -> Result<u64, ClientError> {
        #[cfg(feature = "verbs")]
        if let Some(qp) = self.verbs_for(hook) {
            return Ok(qp.cas(hook, offset, expected, new)?);
        }
        let generation = self.descriptor.generation;
        match self.call(&Msg::Cas {
            generation,
            hook,
            offset,
            expected,
            new,
        })? {
            Msg::AtomicOk(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Fetch-and-add; returns the word's previous value.
    pub fn faa(&mut self, hook: u32, offset: u64, add: u64) -> Result<u64, ClientError> {
        #[cfg(feature = "verbs")]
        if let Some(qp) = self.verbs_for(hook) {
            return Ok(qp.faa(hook, offset, add)?);
        }
        let generation = self.descriptor.generation;
        match self.call(&Msg::Faa {
            generation,
            hook,
            offset,
            add,
        })? {
            Msg::AtomicOk(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Where the VMM says the guest's vCPUs are (its JSON report).
    pub fn vcpus(&mut self) -> Result<serde_json::Value, ClientError> {
        match self.call(&Msg::Vcpus)? {
            Msg::VcpusInfo(json) => serde_json::from_slice(&json)
                .map_err(|e| ClientError::Protocol(format!("bad vCPU report: {e}"))),
            other => Err(unexpected(other)),
        }
    }

    /// How much CPU the host gave each vCPU thread, and in what state each
    /// is (`{"vcpus": [{"vcpu", "tid", "state", "run_ns", "wait_ns"}]}`).
    pub fn sched(&mut self) -> Result<crate::sched::SchedReport, ClientError> {
        match self.call(&Msg::Sched)? {
            Msg::SchedInfo(json) => serde_json::from_slice(&json)
                .map_err(|e| ClientError::Protocol(format!("bad scheduling report: {e}"))),
            other => Err(unexpected(other)),
        }
    }

    /// [`Client::sched`], or None without asking an agent that does not
    /// serve it (its descriptor says so, or it said UNSUPPORTED once).
    pub fn sched_if_served(&mut self) -> Result<Option<crate::sched::SchedReport>, ClientError> {
        if self.no_sched || !self.descriptor.sched {
            return Ok(None);
        }
        match self.sched() {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.code() == Some(ErrorCode::Unsupported) => {
                self.no_sched = true;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends a raw message and returns the raw reply (for tools and tests of the agent's checks).
    pub fn raw(&mut self, msg: &Msg) -> Result<Msg, ClientError> {
        self.call(msg)
    }
}

fn parse_descriptor(json: &[u8]) -> Result<PublicDescriptor, ClientError> {
    serde_json::from_slice(json).map_err(|e| ClientError::Protocol(format!("bad descriptor: {e}")))
}

fn unexpected(m: Msg) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {m:?}"))
}

/// A state-box slot read through the agent, for the lock-free record
/// reader: `seq` is one atomic 8-byte READ, the slot one READ.
#[derive(Debug)]
pub struct RemoteSlot<'a> {
    client: std::cell::RefCell<&'a mut Client>,
    hook: u32,
    offset: u64,
    size: u32,
    error: std::cell::RefCell<Option<ClientError>>,
}

impl<'a> RemoteSlot<'a> {
    /// Slot of `size` bytes at `offset` in state-box hook `hook`.
    pub fn new(client: &'a mut Client, hook: u32, offset: u64, size: u32) -> Self {
        Self {
            client: std::cell::RefCell::new(client),
            hook,
            offset,
            size,
            error: std::cell::RefCell::new(None),
        }
    }

    /// The first error met while reading, if any: then the outcome says
    /// "torn", but the truth is that the backdoor could not be read.
    pub fn take_error(&self) -> Option<ClientError> {
        self.error.borrow_mut().take()
    }

    fn note(&self, e: ClientError) {
        self.error.borrow_mut().get_or_insert(e);
    }
}

impl backdoor_abi::record::SlotSource for RemoteSlot<'_> {
    fn slot_size(&self) -> usize {
        self.size as usize
    }

    fn load_seq(&self) -> u64 {
        match self.client.borrow_mut().read(self.hook, self.offset, 8) {
            Ok(b) => u64::from_le_bytes(b.try_into().unwrap_or([0xff; 8])),
            Err(e) => {
                self.note(e);
                1 // odd: never accepted
            }
        }
    }

    fn copy_slot(&self, buf: &mut [u8]) {
        match self
            .client
            .borrow_mut()
            .read(self.hook, self.offset, self.size)
        {
            Ok(b) if b.len() == buf.len() => buf.copy_from_slice(&b),
            Ok(_) => self.note(ClientError::Protocol("short slot read".into())),
            Err(e) => self.note(e),
        }
    }
}
