//! The backdoor ABI, version 1: the contract in docs/abi.md, mirrored bit
//! for bit by `guest-driver/include/backdoor_abi.h`.
//!
//! Structures are `#[repr(C)]` with explicit padding so their layout can be
//! checked against the C header. They are read from and written as bytes
//! with zerocopy, whose derives prove at compile time that every byte
//! pattern is a valid value (every field is an integer or a byte array:
//! codes such as a counter's state stay raw integers, decoded by checked
//! accessors), which is what bytes that come from a guest need.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub mod descriptor;
pub mod record;

/// Size of a page: hooks are page-granular.
pub const PAGE_SIZE: u64 = 4096;
/// ABI version this crate implements.
pub const ABI_VERSION: u32 = 1;

/// Device identification: "BDOR" in memory order.
pub const DEV_MAGIC: u32 = 0x524f_4442;
/// Size of the device's MMIO register block.
pub const DEV_MMIO_SIZE: u64 = 4096;
/// Most hooks a guest may register.
pub const MAX_HOOKS: u32 = 32;
/// Largest hook, in pages (1 GiB).
pub const MAX_HOOK_PAGES: u32 = 262_144;

/// Device register offsets.
pub mod reg {
    /// Magic, [`super::DEV_MAGIC`].
    pub const MAGIC: u64 = 0x00;
    /// ABI version.
    pub const VERSION: u64 = 0x04;
    /// Feature bits offered.
    pub const FEATURES: u64 = 0x08;
    /// Status bits.
    pub const STATUS: u64 = 0x0c;
    /// Generation, new on every guest reset.
    pub const GENERATION: u64 = 0x10;
    /// Commands refused after the seal.
    pub const TAMPER_COUNT: u64 = 0x14;
    /// Hooks registered.
    pub const HOOK_COUNT: u64 = 0x18;
    /// [`super::MAX_HOOKS`].
    pub const MAX_HOOKS: u64 = 0x1c;
    /// Descriptor address, low half.
    pub const DESC_ADDR_LO: u64 = 0x20;
    /// Descriptor address, high half.
    pub const DESC_ADDR_HI: u64 = 0x24;
    /// Hook id argument / result.
    pub const HOOK_ID: u64 = 0x28;
    /// Command doorbell.
    pub const COMMAND: u64 = 0x2c;
    /// Result of the last command.
    pub const RESULT: u64 = 0x30;
    /// [`super::MAX_HOOK_PAGES`].
    pub const MAX_HOOK_PAGES: u64 = 0x34;
}

/// Feature bit: the table can be sealed.
pub const FEATURE_SEAL: u32 = 1 << 0;
/// Feature bit: REPAIR hooks (remote writes) are supported.
pub const FEATURE_REPAIR: u32 = 1 << 1;
/// Status bit: the table is sealed.
pub const STATUS_SEALED: u32 = 1 << 0;

/// Command codes written to [`reg::COMMAND`].
pub mod cmd {
    /// Add a hook from the descriptor at DESC_ADDR.
    pub const REGISTER: u32 = 1;
    /// Remove hook HOOK_ID.
    pub const UNREGISTER: u32 = 2;
    /// Change a hook's range and permissions.
    pub const UPDATE: u32 = 3;
    /// Fix the table until the next reset.
    pub const SEAL: u32 = 4;
}

/// Why the device refused a command (the RESULT register).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u32)]
pub enum HookError {
    /// The table is sealed.
    #[error("the hook table is sealed")]
    Sealed = 1,
    /// Address or length not page-aligned.
    #[error("address or length is not 4-KiB aligned")]
    Align = 2,
    /// Empty, or not inside one guest RAM range.
    #[error("the range is empty or not inside guest RAM")]
    Range = 3,
    /// Overlaps another hook.
    #[error("the range overlaps another hook")]
    Overlap = 4,
    /// Too many hooks.
    #[error("too many hooks")]
    TooMany = 5,
    /// Hook too large.
    #[error("the hook is larger than the maximum")]
    TooLarge = 6,
    /// Unknown kind.
    #[error("unknown hook kind")]
    Kind = 7,
    /// Permissions not allowed for the kind.
    #[error("permissions not allowed for this kind")]
    Perms = 8,
    /// Bad or duplicate name.
    #[error("the name is empty, not printable ASCII, not NUL-padded, or already used")]
    Name = 9,
    /// Bad descriptor address or reserved fields.
    #[error("the descriptor is misaligned, outside guest RAM, or has non-zero reserved fields")]
    Desc = 10,
    /// No such hook.
    #[error("no hook with that id")]
    NoHook = 11,
    /// Unknown command.
    #[error("unknown command")]
    Command = 12,
}

impl HookError {
    /// The code the device reports.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The ABI name (`E_SEALED`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Sealed => "E_SEALED",
            Self::Align => "E_ALIGN",
            Self::Range => "E_RANGE",
            Self::Overlap => "E_OVERLAP",
            Self::TooMany => "E_TOO_MANY",
            Self::TooLarge => "E_TOO_LARGE",
            Self::Kind => "E_KIND",
            Self::Perms => "E_PERMS",
            Self::Name => "E_NAME",
            Self::Desc => "E_DESC",
            Self::NoHook => "E_NO_HOOK",
            Self::Command => "E_COMMAND",
        }
    }
}

/// What a hook holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum HookKind {
    /// Liveness counters.
    ProgressBox = 1,
    /// Service-continuation records.
    StateBox = 2,
    /// A region an authorised monitor may write.
    Repair = 3,
    /// Kernel memory the guest's driver publishes read-only for forensics:
    /// the kernel's vmcoreinfo note and its printk ring buffer.
    Kernel = 4,
    /// The VMM's own read-only view of guest RAM, for monitors holding the
    /// forensic key. Never registered by a guest: [`HookKind::from_u32`]
    /// does not decode it.
    Forensic = 0x1000,
}

impl HookKind {
    /// Every kind, guest-registrable or not.
    pub const ALL: [Self; 5] = [
        Self::ProgressBox,
        Self::StateBox,
        Self::Repair,
        Self::Kernel,
        Self::Forensic,
    ];

    /// Decodes a guest descriptor's kind field (only the kinds a guest may
    /// register).
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::ProgressBox),
            2 => Some(Self::StateBox),
            3 => Some(Self::Repair),
            4 => Some(Self::Kernel),
            _ => None,
        }
    }

    /// Lower-case name for people and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::ProgressBox => "progress_box",
            Self::StateBox => "state_box",
            Self::Repair => "repair",
            Self::Kernel => "kernel",
            Self::Forensic => "forensic",
        }
    }
}

/// Remote read permission.
pub const PERM_READ: u32 = 1 << 0;
/// Remote write permission.
pub const PERM_WRITE: u32 = 1 << 1;
/// Remote atomics permission.
pub const PERM_ATOMIC: u32 = 1 << 2;
/// Every permission bit ABI v1 defines.
pub const PERM_ALL: u32 = PERM_READ | PERM_WRITE | PERM_ATOMIC;

/// Whether `perms` is allowed for `kind` (docs/abi.md).
pub fn perms_valid(kind: HookKind, perms: u32) -> bool {
    match kind {
        HookKind::ProgressBox | HookKind::StateBox | HookKind::Kernel | HookKind::Forensic => {
            perms == PERM_READ
        }
        HookKind::Repair => perms & !PERM_ALL == 0 && perms & PERM_READ != 0,
    }
}

/// Decodes a NUL-padded printable-ASCII name; `None` if it is not one.
pub fn decode_name(raw: &[u8]) -> Option<&str> {
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let (name, pad) = raw.split_at(len);
    let printable = name.iter().all(|b| (0x20..0x7f).contains(b));
    (len > 0 && printable && pad.iter().all(|&b| b == 0))
        .then(|| std::str::from_utf8(name).ok())
        .flatten()
}

/// Encodes `name` NUL-padded into `N` bytes (truncating if too long).
pub fn encode_name<const N: usize>(name: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let n = name.len().min(N);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// A hook descriptor as the guest writes it (64 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct HookDesc {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// [`HookKind`] code.
    pub kind: u32,
    /// `PERM_*` bits.
    pub perms: u32,
    /// UPDATE: the hook to change; REGISTER: 0.
    pub id: u32,
    /// Must be 0.
    pub reserved: u32,
    /// NUL-padded name.
    pub name: [u8; 32],
}

impl HookDesc {
    /// Size in bytes.
    pub const SIZE: usize = 64;

    /// Decodes a descriptor.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        zerocopy::transmute!(*b)
    }

    /// Encodes a descriptor.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        zerocopy::transmute!(*self)
    }
}

/// Progress-box magic: "BDPB".
pub const PBOX_MAGIC: u32 = 0x4250_4442;
/// State-box magic: "BDSB".
pub const SBOX_MAGIC: u32 = 0x4253_4442;
/// Size of box headers, counters and record headers.
pub const LINE: usize = 64;
/// [`LINE`] as a read length.
pub const LINE_LEN: u32 = 64;

/// Progress-box header (64 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PboxHeader {
    /// [`PBOX_MAGIC`].
    pub magic: u32,
    /// 1.
    pub version: u16,
    /// 64.
    pub header_size: u16,
    /// Counter slots after the header.
    pub capacity: u32,
    /// 64.
    pub counter_size: u32,
    /// Counter slots `0..kernel_slots` live in memory only the guest
    /// kernel writes (a driver's page 0); only they may claim the OS
    /// level. 0: the whole box is the kernel's (no application maps it).
    pub kernel_slots: u32,
    /// Zero.
    pub reserved: [u8; 44],
}

impl PboxHeader {
    /// Decodes a header (reserved bytes are ignored: read as zero).
    pub fn from_bytes(b: &[u8; LINE]) -> Self {
        let h: Self = zerocopy::transmute!(*b);
        Self {
            reserved: [0; 44],
            ..h
        }
    }
}

/// Counter states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CounterState {
    /// Slot unused.
    Free = 0,
    /// Owner promises bumps within the deadline.
    Active = 1,
    /// No work: never judged hung.
    Idle = 2,
    /// Owner is gone.
    Retired = 3,
}

/// What a counter watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Level {
    /// The guest kernel.
    Os = 1,
    /// An application.
    Application = 2,
    /// One session of a service.
    Session = 3,
}

/// A progress counter (64 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Counter {
    /// Liveness count; only increases.
    pub value: u64,
    /// Slot index + 1; 0 = never used.
    pub id: u32,
    /// Promised bump interval while ACTIVE.
    pub deadline_ms: u32,
    /// [`CounterState`] code.
    pub state: u8,
    /// [`Level`] code.
    pub level: u8,
    /// Zero.
    pub reserved0: u16,
    /// Owner id.
    pub owner: u32,
    /// NUL-padded name.
    pub name: [u8; 32],
    /// Zero.
    pub reserved1: u64,
}

impl Counter {
    /// Decodes a counter.
    pub fn from_bytes(b: &[u8; LINE]) -> Self {
        zerocopy::transmute!(*b)
    }

    /// The decoded state, if valid.
    pub fn state(&self) -> Option<CounterState> {
        match self.state {
            0 => Some(CounterState::Free),
            1 => Some(CounterState::Active),
            2 => Some(CounterState::Idle),
            3 => Some(CounterState::Retired),
            _ => None,
        }
    }

    /// The decoded level, if valid.
    pub fn level(&self) -> Option<Level> {
        match self.level {
            1 => Some(Level::Os),
            2 => Some(Level::Application),
            3 => Some(Level::Session),
            _ => None,
        }
    }
}

/// State-box header (64 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SboxHeader {
    /// [`SBOX_MAGIC`].
    pub magic: u32,
    /// 1.
    pub version: u16,
    /// 64.
    pub header_size: u16,
    /// Slots after the header.
    pub slot_count: u32,
    /// Bytes per slot (power of two, >= 128).
    pub slot_size: u32,
    /// Zero.
    pub reserved: [u8; 48],
}

impl SboxHeader {
    /// Decodes a header (reserved bytes are ignored: read as zero).
    pub fn from_bytes(b: &[u8; LINE]) -> Self {
        let h: Self = zerocopy::transmute!(*b);
        Self {
            reserved: [0; 48],
            ..h
        }
    }
}

/// A service-continuation record header (64 bytes; the payload follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RecordHeader {
    /// Seqlock: odd while written; 0 = never written.
    pub seq: u64,
    /// Session this record continues.
    pub session_id: u64,
    /// NUL-padded service name.
    pub service: [u8; 16],
    /// The session's record version.
    pub version: u64,
    /// Service-defined stage.
    pub stage: u32,
    /// Payload bytes.
    pub payload_len: u32,
    /// CRC32C over bytes 8..48, then the payload.
    pub crc32c: u32,
    /// Zero.
    pub reserved: [u8; 12],
}

impl RecordHeader {
    /// Decodes a record header (reserved bytes are ignored: read as zero).
    pub fn from_bytes(b: &[u8; LINE]) -> Self {
        let h: Self = zerocopy::transmute!(*b);
        Self {
            reserved: [0; 12],
            ..h
        }
    }
}

// The ABI is little-endian and these structures are read and written as
// native memory (zerocopy): hosts and guests are x86-64.
const _: () = assert!(cfg!(target_endian = "little"));

const _: () = {
    assert!(size_of::<HookDesc>() == HookDesc::SIZE);
    assert!(size_of::<PboxHeader>() == LINE);
    assert!(size_of::<Counter>() == LINE);
    assert!(size_of::<SboxHeader>() == LINE);
    assert!(size_of::<RecordHeader>() == LINE);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_printable_and_nul_padded() {
        assert_eq!(decode_name(b"progress\0\0\0\0"), Some("progress"));
        assert_eq!(decode_name(b"full"), Some("full"));
        assert_eq!(decode_name(b"\0\0\0"), None);
        assert_eq!(decode_name(b"a\x07b\0"), None);
        assert_eq!(decode_name(b"ab\0c"), None, "garbage after the NUL");
        assert_eq!(decode_name(&encode_name::<8>("x")), Some("x"));
    }

    #[test]
    fn permissions_by_kind() {
        assert!(perms_valid(HookKind::ProgressBox, PERM_READ));
        assert!(!perms_valid(HookKind::ProgressBox, PERM_READ | PERM_WRITE));
        assert!(!perms_valid(HookKind::StateBox, 0));
        assert!(perms_valid(HookKind::Repair, PERM_ALL));
        assert!(!perms_valid(HookKind::Repair, PERM_WRITE));
        assert!(!perms_valid(HookKind::Repair, PERM_READ | 1 << 5));
    }

    #[test]
    fn descriptors_round_trip() {
        let d = HookDesc {
            gpa: 0x20_0000,
            len: 0x2000,
            kind: 1,
            perms: 1,
            id: 7,
            reserved: 0,
            name: encode_name("progress"),
        };
        assert_eq!(HookDesc::from_bytes(&d.to_bytes()), d);
    }

    #[test]
    fn error_codes_match_the_abi() {
        assert_eq!(HookError::Sealed.code(), 1);
        assert_eq!(HookError::Command.code(), 12);
        assert_eq!(HookError::TooMany.name(), "E_TOO_MANY");
    }
}

/// Displays an error with every source under it, "outer: inner: innermost".
///
/// Error types here follow the Rust API guidelines: a message says what
/// failed and leaves the cause to `source()`, so whoever shows an error to
/// a person (a command's last words, a log line, a JSON reason) shows the
/// chain with this. Every crate of the project links this one.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod error_chain_tests {
    use super::ErrorChain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read key file k")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_shows_each_cause_once() {
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "No such file or directory",
        ));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "cannot read key file k: No such file or directory"
        );
    }
}

/// The inbox: a REPAIR hook a repair monitor fills with a hand-over
/// (`bdctl resume`), laid out as below (docs/abi.md, "The inbox"). One
/// hand-over at a time: the monitor claims the inbox by a compare-and-swap
/// of the fence word from 0 to its fencing token, writes the source and
/// the records, and rings the doorbell last. A receiver that can write
/// its inbox clears the doorbell, then the fence word, once it has taken
/// the hand-over; one that cannot (a driver's read-only inbox) takes one
/// hand-over per inbox.
pub mod inbox {
    /// u64: records delivered (written last).
    pub const DOORBELL: usize = 8;
    /// u64: the fencing token of the hand-over that claimed the inbox
    /// (0: unclaimed). A cluster incident's etcd revision; 1 for a hand-over
    /// made by hand.
    pub const FENCE: usize = 16;
    /// The source's name (the hung target), NUL-padded.
    pub const SOURCE: usize = 24;
    /// Bytes of [`SOURCE`].
    pub const SOURCE_LEN: usize = 32;
    /// The first record slot.
    pub const RECORDS: usize = 64;

    /// The source name as stored: at most [`SOURCE_LEN`] bytes, NUL-padded.
    pub fn encode_source(name: &str) -> [u8; SOURCE_LEN] {
        let mut out = [0u8; SOURCE_LEN];
        let n = name.len().min(SOURCE_LEN);
        out[..n].copy_from_slice(&name.as_bytes()[..n]);
        out
    }

    /// The source name read back (up to its first NUL; lossy UTF-8: the
    /// bytes are whatever the monitor wrote).
    pub fn decode_source(raw: &[u8]) -> String {
        let raw = &raw[..raw.len().min(SOURCE_LEN)];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        String::from_utf8_lossy(&raw[..end]).into_owned()
    }

    /// What a receiver does with a hand-over, given the newest token it
    /// took from the same source before.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Admit {
        /// Newer than anything taken from this source: take it.
        Take,
        /// Older than a hand-over already taken from this source: a monitor
        /// that lost its incident delivered late. Refuse it.
        Stale {
            /// The newest token taken from the source.
            took: u64,
        },
    }

    /// The fencing rule: a token equal to the newest taken is the same
    /// hand-over seen again (taking it again is idempotent: records are
    /// adopted by version); an older one is refused.
    pub fn admit(token: u64, newest_taken: Option<u64>) -> Admit {
        match newest_taken {
            Some(took) if token < took => Admit::Stale { took },
            _ => Admit::Take,
        }
    }
}
