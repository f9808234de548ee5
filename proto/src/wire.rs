//! Wire protocol v3 between remote monitors and the agent: the control
//! channel (hello, the Noise handshake, descriptor) and the soft
//! backend's one-sided operations. docs/wire.md describes it for people.
//!
//! Every frame is a 16-byte header then a payload of at most
//! [`MAX_PAYLOAD`] bytes. HELLO and the agent's answer travel in the
//! clear; every later frame travels encrypted (`channel.rs`). Decoding
//! never trusts a length: every field is bounds-checked and a bad frame
//! is an error, never a panic.

use std::io::{self, Read, Write};

/// "BDW1" in memory order.
pub const MAGIC: u32 = 0x3157_4442;
/// Protocol version: 3 encrypts every frame after the handshake (Noise).
pub const VERSION: u8 = 3;
/// Header bytes.
pub const HEADER_LEN: usize = 16;
/// Largest READ, and largest total of one READ_BATCH.
pub const MAX_READ: u32 = 1 << 20;
/// Largest WRITE payload.
pub const MAX_WRITE: u32 = 64 << 10;
/// Most entries in one READ_BATCH.
pub const MAX_BATCH: u32 = 1024;
/// Largest frame payload accepted (a READ reply of MAX_READ plus slack).
pub const MAX_PAYLOAD: u32 = MAX_READ + 4096;
/// Longest VM name.
pub const MAX_NAME: usize = 64;
/// Longest Noise handshake message HELLO or ACCEPT may carry.
pub const MAX_HANDSHAKE_MSG: usize = 64;
/// Longest ERROR message text.
pub const MAX_ERROR_TEXT: u16 = 4096;
/// Largest payload of the agent's answer to HELLO, read before the agent
/// is authenticated: an ERROR (code, length) with the longest text
/// (ACCEPT is smaller).
pub const MAX_HELLO_REPLY: u32 = 4 + MAX_ERROR_TEXT as u32;

/// Errors decoding or exchanging frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Socket error (including a peer that went away).
    #[error("connection error: {0}")]
    Io(io::Error),
    /// No reply (or request) within the socket's timeout.
    #[error("timed out waiting for the other side")]
    TimedOut,
    /// Not a frame of this protocol.
    #[error("bad frame: {0}")]
    Malformed(String),
    /// A frame larger than the protocol allows (or than the handshake needs).
    #[error("frame of {0} bytes is larger than allowed here")]
    TooLarge(u32),
    /// A frame that does not open under the connection's keys: altered,
    /// replayed, reordered, dropped or injected between monitor and agent.
    /// The connection is unusable.
    #[error(
        "a frame failed its integrity check (altered, replayed, reordered or injected on the way)"
    )]
    Integrity,
}

impl From<io::Error> for WireError {
    /// A socket timeout is its own error, so that it says "timed out"
    /// rather than "Resource temporarily unavailable".
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::TimedOut,
            _ => Self::Io(e),
        }
    }
}

fn malformed<T>(what: impl Into<String>) -> Result<T, WireError> {
    Err(WireError::Malformed(what.into()))
}

/// Error codes carried by [`Msg::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Malformed or unexpected request.
    BadRequest = 1,
    /// Authentication failed.
    AuthFailed = 2,
    /// The role or the hook's permissions do not allow it.
    Forbidden = 3,
    /// No such hook.
    NoHook = 4,
    /// Offset/length outside the hook.
    OutOfBounds = 5,
    /// Longer than the protocol allows.
    TooLarge = 6,
    /// Atomics need 8-byte aligned offsets.
    Unaligned = 7,
    /// The guest rebooted: the request names an old generation.
    StaleGeneration = 8,
    /// Not supported by this agent (e.g. verbs without a device).
    Unsupported = 9,
    /// The agent failed internally.
    Internal = 10,
    /// Too many connections.
    Busy = 11,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<Self> {
        use ErrorCode::*;
        [
            BadRequest,
            AuthFailed,
            Forbidden,
            NoHook,
            OutOfBounds,
            TooLarge,
            Unaligned,
            StaleGeneration,
            Unsupported,
            Internal,
            Busy,
        ]
        .into_iter()
        .find(|c| *c as u16 == v)
    }
}

/// Roles a monitor authenticates as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Role {
    /// May read progress boxes and state boxes (any readable hook).
    Read = 1,
    /// May also write and use atomics on REPAIR hooks.
    Repair = 2,
    /// May read what the read role may, and the VMM's forensic view of
    /// all guest RAM (a separate key: docs/wire.md).
    Forensic = 3,
}

impl Role {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Read),
            2 => Some(Self::Repair),
            3 => Some(Self::Forensic),
            _ => None,
        }
    }

    /// Name used in key files and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Repair => "repair",
            Self::Forensic => "forensic",
        }
    }
}

/// One range of a READ_BATCH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEntry {
    /// Hook id.
    pub hook: u32,
    /// Offset in the hook.
    pub offset: u64,
    /// Bytes.
    pub len: u32,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Client → agent, in the clear: who I am, what I want to be, and
    /// the first Noise handshake message (`channel.rs`).
    Hello {
        /// The VM to monitor.
        vm: String,
        /// Requested role.
        role: Role,
        /// Noise `-> psk, e`: opens only under the role's key.
        noise: Vec<u8>,
    },
    /// Agent → client, in the clear: the second Noise handshake message
    /// (`<- e, ee`), which opens only if the agent holds the key.
    Accept {
        /// Noise `<- e, ee`.
        noise: Vec<u8>,
    },
    /// Agent → client, the first encrypted frame: the descriptor as JSON.
    Welcome(Vec<u8>),
    /// Either way: a refused request (the connection stays usable unless said otherwise).
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// For people.
        message: String,
    },
    /// Client → agent: send the current descriptor.
    Describe,
    /// Agent → client: the descriptor as JSON.
    Descriptor(Vec<u8>),
    /// Read `len` bytes at `offset` of a hook.
    Read {
        /// The generation the client believes current.
        generation: u32,
        /// Hook id.
        hook: u32,
        /// Offset in the hook.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// The bytes read.
    ReadOk(Vec<u8>),
    /// Write bytes at `offset` of a REPAIR hook.
    Write {
        /// Believed generation.
        generation: u32,
        /// Hook id.
        hook: u32,
        /// Offset in the hook.
        offset: u64,
        /// Bytes to write.
        data: Vec<u8>,
    },
    /// Write done.
    WriteOk,
    /// Compare-and-swap an aligned 8-byte word.
    Cas {
        /// Believed generation.
        generation: u32,
        /// Hook id.
        hook: u32,
        /// Offset (8-aligned).
        offset: u64,
        /// Expected value.
        expected: u64,
        /// New value.
        new: u64,
    },
    /// Fetch-and-add an aligned 8-byte word.
    Faa {
        /// Believed generation.
        generation: u32,
        /// Hook id.
        hook: u32,
        /// Offset (8-aligned).
        offset: u64,
        /// Addend (wrapping).
        add: u64,
    },
    /// The word's previous value.
    AtomicOk(u64),
    /// Read many ranges in one round trip.
    ReadBatch {
        /// Believed generation.
        generation: u32,
        /// The ranges.
        entries: Vec<BatchEntry>,
    },
    /// The ranges' bytes, concatenated in order.
    ReadBatchOk(Vec<u8>),
    /// Client → agent: verbs endpoint (JSON).
    VerbsConnect(Vec<u8>),
    /// Agent → client: verbs endpoint and regions (JSON).
    VerbsInfo(Vec<u8>),
    /// Client → agent: where the guest's vCPUs are.
    Vcpus,
    /// Agent → client: the VMM's report of each vCPU (JSON, docs/wire.md).
    VcpusInfo(Vec<u8>),
    /// Client → agent: how much CPU the host gave each vCPU thread.
    Sched,
    /// Agent → client: the host's view of each vCPU thread (JSON, docs/wire.md).
    SchedInfo(Vec<u8>),
}

impl Msg {
    pub(crate) fn kind(&self) -> u8 {
        match self {
            Self::Hello { .. } => 1,
            Self::Accept { .. } => 2,
            Self::Welcome(_) => 4,
            Self::Error { .. } => 5,
            Self::Describe => 6,
            Self::Descriptor(_) => 7,
            Self::Read { .. } => 8,
            Self::ReadOk(_) => 9,
            Self::Write { .. } => 10,
            Self::WriteOk => 11,
            Self::Cas { .. } => 12,
            Self::Faa { .. } => 13,
            Self::AtomicOk(_) => 14,
            Self::ReadBatch { .. } => 15,
            Self::ReadBatchOk(_) => 16,
            Self::VerbsConnect(_) => 17,
            Self::VerbsInfo(_) => 18,
            Self::Vcpus => 19,
            Self::VcpusInfo(_) => 20,
            Self::Sched => 21,
            Self::SchedInfo(_) => 22,
        }
    }

    /// Encodes the payload (without the header).
    pub fn payload(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Self::Hello { vm, role, noise } => {
                p.push(*role as u8);
                put_str(&mut p, vm);
                p.extend_from_slice(noise);
            }
            Self::Accept { noise } => p.extend_from_slice(noise),
            Self::Welcome(b)
            | Self::Descriptor(b)
            | Self::ReadOk(b)
            | Self::ReadBatchOk(b)
            | Self::VerbsConnect(b)
            | Self::VerbsInfo(b)
            | Self::VcpusInfo(b)
            | Self::SchedInfo(b) => p.extend_from_slice(b),
            Self::Error { code, message } => {
                p.extend_from_slice(&(*code as u16).to_le_bytes());
                put_str(&mut p, message);
            }
            Self::Describe | Self::WriteOk | Self::Vcpus | Self::Sched => {}
            Self::Read {
                generation,
                hook,
                offset,
                len,
            } => {
                p.extend_from_slice(&generation.to_le_bytes());
                p.extend_from_slice(&hook.to_le_bytes());
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
            }
            Self::Write {
                generation,
                hook,
                offset,
                data,
            } => {
                p.extend_from_slice(&generation.to_le_bytes());
                p.extend_from_slice(&hook.to_le_bytes());
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(data);
            }
            Self::Cas {
                generation,
                hook,
                offset,
                expected,
                new,
            } => {
                p.extend_from_slice(&generation.to_le_bytes());
                p.extend_from_slice(&hook.to_le_bytes());
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&expected.to_le_bytes());
                p.extend_from_slice(&new.to_le_bytes());
            }
            Self::Faa {
                generation,
                hook,
                offset,
                add,
            } => {
                p.extend_from_slice(&generation.to_le_bytes());
                p.extend_from_slice(&hook.to_le_bytes());
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&add.to_le_bytes());
            }
            Self::AtomicOk(v) => p.extend_from_slice(&v.to_le_bytes()),
            Self::ReadBatch {
                generation,
                entries,
            } => {
                p.extend_from_slice(&generation.to_le_bytes());
                p.extend_from_slice(
                    &u32::try_from(entries.len())
                        .unwrap_or(u32::MAX)
                        .to_le_bytes(),
                );
                for e in entries {
                    p.extend_from_slice(&e.hook.to_le_bytes());
                    p.extend_from_slice(&e.len.to_le_bytes());
                    p.extend_from_slice(&e.offset.to_le_bytes());
                }
            }
        }
        p
    }

    /// Decodes a payload of frame type `kind`, taking ownership so that
    /// bulk data (READ replies) is moved, not copied.
    pub fn decode_owned(kind: u8, payload: Vec<u8>) -> Result<Self, WireError> {
        Ok(match kind {
            9 => Self::ReadOk(payload),
            16 => Self::ReadBatchOk(payload),
            _ => return Self::decode(kind, &payload),
        })
    }

    /// Decodes a payload of frame type `kind`.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor(payload);
        let msg = match kind {
            1 => {
                let role = c.u8()?;
                let role = Role::from_u8(role)
                    .ok_or_else(|| WireError::Malformed(format!("unknown role {role}")))?;
                let vm = c.string(MAX_NAME)?;
                Self::Hello {
                    vm,
                    role,
                    noise: c.handshake_msg()?,
                }
            }
            2 => Self::Accept {
                noise: c.handshake_msg()?,
            },
            4 => Self::Welcome(c.rest()),
            5 => {
                let code = c.u16()?;
                let code = ErrorCode::from_u16(code).unwrap_or(ErrorCode::Internal);
                Self::Error {
                    code,
                    message: c.string(usize::from(MAX_ERROR_TEXT))?,
                }
            }
            6 => Self::Describe,
            7 => Self::Descriptor(c.rest()),
            8 => Self::Read {
                generation: c.u32()?,
                hook: c.u32()?,
                offset: c.u64()?,
                len: c.u32()?,
            },
            9 => Self::ReadOk(c.rest()),
            10 => {
                let (generation, hook, offset) = (c.u32()?, c.u32()?, c.u64()?);
                let data = c.rest();
                if data.len() > MAX_WRITE as usize {
                    return malformed(format!("write of {} bytes exceeds {MAX_WRITE}", data.len()));
                }
                Self::Write {
                    generation,
                    hook,
                    offset,
                    data,
                }
            }
            11 => Self::WriteOk,
            12 => Self::Cas {
                generation: c.u32()?,
                hook: c.u32()?,
                offset: c.u64()?,
                expected: c.u64()?,
                new: c.u64()?,
            },
            13 => Self::Faa {
                generation: c.u32()?,
                hook: c.u32()?,
                offset: c.u64()?,
                add: c.u64()?,
            },
            14 => Self::AtomicOk(c.u64()?),
            15 => {
                let generation = c.u32()?;
                let n = c.u32()?;
                if n > MAX_BATCH {
                    return malformed(format!("batch of {n} entries exceeds {MAX_BATCH}"));
                }
                let mut entries = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let hook = c.u32()?;
                    let len = c.u32()?;
                    let offset = c.u64()?;
                    entries.push(BatchEntry { hook, offset, len });
                }
                Self::ReadBatch {
                    generation,
                    entries,
                }
            }
            16 => Self::ReadBatchOk(c.rest()),
            17 => Self::VerbsConnect(c.rest()),
            18 => Self::VerbsInfo(c.rest()),
            19 => Self::Vcpus,
            20 => Self::VcpusInfo(c.rest()),
            21 => Self::Sched,
            22 => Self::SchedInfo(c.rest()),
            other => return malformed(format!("unknown message type {other}")),
        };
        if !c.0.is_empty() {
            return malformed(format!("{} trailing bytes", c.0.len()));
        }
        Ok(msg)
    }
}

fn put_str(p: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    p.extend_from_slice(&u16::try_from(b.len()).unwrap_or(u16::MAX).to_le_bytes());
    p.extend_from_slice(b);
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        if self.0.len() < n {
            return malformed(format!(
                "truncated: wanted {n} more bytes, have {}",
                self.0.len()
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }
    fn string(&mut self, max: usize) -> Result<String, WireError> {
        let n = usize::from(self.u16()?);
        if n > max {
            return malformed(format!("string of {n} bytes exceeds {max}"));
        }
        String::from_utf8(self.take(n)?.to_vec()).or_else(|_| malformed("string is not UTF-8"))
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0).to_vec()
    }
    fn handshake_msg(&mut self) -> Result<Vec<u8>, WireError> {
        if self.0.len() > MAX_HANDSHAKE_MSG {
            return malformed(format!(
                "handshake message of {} bytes exceeds {MAX_HANDSHAKE_MSG}",
                self.0.len()
            ));
        }
        Ok(self.rest())
    }
}

/// The payload bytes of `msg`: bulk replies straight from their buffer,
/// not re-encoded.
pub(crate) fn payload_bytes(msg: &Msg) -> std::borrow::Cow<'_, [u8]> {
    match msg {
        Msg::ReadOk(b) | Msg::ReadBatchOk(b) => std::borrow::Cow::Borrowed(b),
        _ => std::borrow::Cow::Owned(msg.payload()),
    }
}

/// The header of a frame of `kind` carrying `len` payload bytes.
pub(crate) fn header(kind: u8, request_id: u32, len: usize) -> Result<[u8; HEADER_LEN], WireError> {
    let len = u32::try_from(len).map_err(|_| WireError::TooLarge(u32::MAX))?;
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = VERSION;
    h[5] = kind;
    h[8..12].copy_from_slice(&request_id.to_le_bytes());
    h[12..16].copy_from_slice(&len.to_le_bytes());
    Ok(h)
}

/// Writes one frame.
pub fn write_msg(w: &mut impl Write, request_id: u32, msg: &Msg) -> Result<(), WireError> {
    let payload = payload_bytes(msg);
    w.write_all(&header(msg.kind(), request_id, payload.len())?)?;
    w.write_all(&payload)?;
    Ok(())
}

/// Reads one frame's header and payload; `max` bounds the payload (a
/// frame from a peer not yet authenticated gets far less than
/// [`MAX_PAYLOAD`]).
fn read_frame(r: &mut impl Read, max: u32) -> Result<([u8; HEADER_LEN], Vec<u8>), WireError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    let mut payload = vec![0u8; check_header(&h, max)?];
    r.read_exact(&mut payload)?;
    Ok((h, payload))
}

/// Checks a frame header whose payload may be at most `max`; returns the
/// payload length it announces.
pub(crate) fn check_header(h: &[u8; HEADER_LEN], max: u32) -> Result<usize, WireError> {
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return malformed(format!("bad magic {magic:#x}"));
    }
    if h[4] != VERSION {
        return malformed(format!(
            "protocol version {} (this side speaks {VERSION})",
            h[4]
        ));
    }
    let len = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    if len > max {
        return Err(WireError::TooLarge(len));
    }
    Ok(len as usize)
}

pub(crate) fn decode_frame(
    h: &[u8; HEADER_LEN],
    payload: Vec<u8>,
) -> Result<(u32, Msg), WireError> {
    let request_id = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    Ok((request_id, Msg::decode_owned(h[5], payload)?))
}

/// Reads one frame: (request id, message).
pub fn read_msg(r: &mut impl Read) -> Result<(u32, Msg), WireError> {
    read_msg_bounded(r, MAX_PAYLOAD)
}

/// Reads one frame whose payload may be at most `max` bytes.
pub fn read_msg_bounded(r: &mut impl Read, max: u32) -> Result<(u32, Msg), WireError> {
    let (h, payload) = read_frame(r, max)?;
    decode_frame(&h, payload)
}

/// Spins for up to `window` until `fd` has data to read (or is closed),
/// without blocking. Returns whether data arrived in time. Waking a
/// blocked thread costs tens of microseconds on virtualised hosts; a
/// short spin after each reply keeps request/reply chains at the network's
/// real latency, at a bounded CPU cost.
pub fn spin_until_readable(fd: std::os::fd::RawFd, window: std::time::Duration) -> bool {
    if window.is_zero() {
        return false;
    }
    let deadline = std::time::Instant::now() + window;
    let mut byte = 0u8;
    loop {
        // SAFETY: a one-byte peek into a local buffer on a socket we own.
        let n = unsafe {
            libc::recv(
                fd,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return true; // data, or an orderly close the blocking read will report
        }
        let err = std::io::Error::last_os_error().raw_os_error();
        if err != Some(libc::EAGAIN) && err != Some(libc::EINTR) {
            return true; // an error the blocking read will report
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// Most waits skipped after spins that did not pay.
const MAX_BACKOFF: u32 = 64;

/// A busy-poll window that stops spinning where spinning does not pay.
///
/// A spin pays when the peer answers on another core within the window.
/// Where there is no free core (the peer shares this one, behind a
/// spinning vCPU), the spin only holds the core the answer needs: every
/// spin then runs out its whole window. So each spin that runs out skips
/// the spin of the next 1, 2, 4 ... 64 waits (they block at once), and
/// the first spin that pays ends the back-off. Yielding the core inside
/// the spin instead loses a whole scheduler slice (milliseconds) to any
/// CPU hog that shares it.
#[derive(Debug, Clone)]
pub struct BusyPoll {
    window: std::time::Duration,
    skip: u32,
    backoff: u32,
}

impl BusyPoll {
    /// Spins of up to `window` (zero: never spin).
    pub fn new(window: std::time::Duration) -> Self {
        Self {
            window,
            skip: 0,
            backoff: 0,
        }
    }

    /// Spins until `fd` is readable, unless backing off; returns whether
    /// data arrived during the spin.
    pub fn wait(&mut self, fd: std::os::fd::RawFd) -> bool {
        if self.window.is_zero() {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        if spin_until_readable(fd, self.window) {
            self.backoff = 0;
            true
        } else {
            self.backoff = (self.backoff * 2).clamp(1, MAX_BACKOFF);
            self.skip = self.backoff;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Msg) {
        let mut buf = Vec::new();
        write_msg(&mut buf, 77, &m).unwrap();
        let (id, back) = read_msg(&mut buf.as_slice()).unwrap();
        assert_eq!((id, back), (77, m));
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(Msg::Hello {
            vm: "vm1".into(),
            role: Role::Repair,
            noise: vec![7; 48],
        });
        round_trip(Msg::Accept { noise: vec![1; 48] });
        round_trip(Msg::Error {
            code: ErrorCode::OutOfBounds,
            message: "offset 9 is past the hook".into(),
        });
        round_trip(Msg::Read {
            generation: 5,
            hook: 2,
            offset: 64,
            len: 8,
        });
        round_trip(Msg::Write {
            generation: 5,
            hook: 3,
            offset: 0,
            data: vec![1, 2, 3],
        });
        round_trip(Msg::Cas {
            generation: 1,
            hook: 3,
            offset: 8,
            expected: 1,
            new: 2,
        });
        round_trip(Msg::Faa {
            generation: 1,
            hook: 3,
            offset: 8,
            add: u64::MAX,
        });
        round_trip(Msg::ReadBatch {
            generation: 9,
            entries: vec![
                BatchEntry {
                    hook: 1,
                    offset: 64,
                    len: 8
                };
                3
            ],
        });
        round_trip(Msg::ReadOk(vec![9; 100]));
        round_trip(Msg::Describe);
        round_trip(Msg::WriteOk);
        round_trip(Msg::AtomicOk(42));
    }

    #[test]
    fn a_socket_timeout_says_timed_out() {
        let e = WireError::from(io::Error::from(io::ErrorKind::WouldBlock));
        assert!(matches!(e, WireError::TimedOut));
        assert!(e.to_string().contains("timed out"), "{e}");
        let e = WireError::from(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(matches!(e, WireError::Io(_)), "{e}");
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let mut good = Vec::new();
        write_msg(
            &mut good,
            1,
            &Msg::Read {
                generation: 1,
                hook: 1,
                offset: 0,
                len: 8,
            },
        )
        .unwrap();
        // Every truncation of a valid frame fails cleanly.
        for n in 0..good.len() {
            assert!(read_msg(&mut &good[..n]).is_err(), "truncated at {n}");
        }
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        assert!(matches!(
            read_msg(&mut bad_magic.as_slice()),
            Err(WireError::Malformed(_))
        ));
        let mut huge = good.clone();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_msg(&mut huge.as_slice()),
            Err(WireError::TooLarge(_))
        ));
        let mut unknown = good.clone();
        unknown[5] = 200;
        assert!(read_msg(&mut unknown.as_slice()).is_err());
        // A batch claiming more entries than allowed is refused before allocating.
        let mut batch = 0u32.to_le_bytes().to_vec();
        batch.extend_from_slice(&(MAX_BATCH + 1).to_le_bytes());
        assert!(Msg::decode(15, &batch).is_err());
        // Trailing garbage is refused.
        let mut trailing = Msg::Describe.payload();
        trailing.push(0);
        assert!(Msg::decode(6, &trailing).is_err());
        assert!(Msg::decode(1, &[9]).is_err(), "unknown role");
        assert!(
            Msg::decode(2, &[0; MAX_HANDSHAKE_MSG + 1]).is_err(),
            "an oversized handshake message"
        );
    }

    /// A spin that runs out makes the next waits block at once (1, then
    /// 2, then 4 of them), and a spin that pays ends the back-off.
    #[test]
    fn busy_poll_backs_off_after_spins_that_run_out_and_recovers() {
        use std::io::Write as _;
        use std::os::fd::AsRawFd;
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = rx.as_raw_fd();
        let mut spin = BusyPoll::new(std::time::Duration::from_millis(1));
        // Nothing to read: runs out, then skips one wait.
        assert!(!spin.wait(fd));
        tx.write_all(b"x").unwrap();
        assert!(!spin.wait(fd), "skipped although data was there");
        assert!(spin.wait(fd), "spins again after the skip");
        assert!(spin.wait(fd), "no back-off after a spin that paid");
        // Runs out twice in a row: skips 1, then 2.
        let (_tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = rx.as_raw_fd();
        let mut spin = BusyPoll::new(std::time::Duration::from_millis(1));
        let pattern: Vec<bool> = (0..6).map(|_| spin.wait(fd)).collect();
        assert_eq!(pattern, [false; 6]);
        assert_eq!(
            (spin.backoff, spin.skip),
            (4, 4),
            "ran out at waits 1, 3 and 6"
        );
        // A zero window never spins.
        assert!(!BusyPoll::new(std::time::Duration::ZERO).wait(fd));
    }
}
