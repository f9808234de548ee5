//! What can go wrong talking to /dev/backdoor (or its host-file stand-in).

use std::path::PathBuf;

use crate::host::HostError;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device node does not exist.
    #[error("{} does not exist: is backdoor.ko loaded?", path.display())]
    Missing {
        /// The path tried.
        path: PathBuf,
    },
    /// The device node exists but could not be opened.
    #[error("cannot open {}", path.display())]
    Open {
        /// The path tried.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An ioctl the driver refused.
    #[error("{op} failed: {errno}")]
    Ioctl {
        /// Which request.
        op: &'static str,
        /// The driver's answer.
        errno: nix::Error,
    },
    /// mmap failed.
    #[error("cannot map {what}: {errno}")]
    Map {
        /// Which region.
        what: &'static str,
        /// Why.
        errno: nix::Error,
    },
    /// Another open file holds the service (another instance runs).
    #[error("service {0:?} is held by another open file: is another instance running?")]
    Busy(String),
    /// The service's area was created by another user (EACCES).
    #[error("service {0:?} belongs to another user: only its creator may open it")]
    NotOwner(String),
    /// No free counter or slots.
    #[error("no room: {0}")]
    NoSpace(String),
    /// SVC_OPEN without create, and no such area.
    #[error("there is no service area named {0:?}")]
    NoService(String),
    /// A bad argument (name, deadline, level...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The driver (or host file) answered something unusable.
    #[error("unusable answer from the driver: {0}")]
    Driver(String),
    /// A slot index outside the area.
    #[error("slot {slot} is outside the area's {count} slots")]
    BadSlot {
        /// The index asked for.
        slot: u32,
        /// Slots in the area.
        count: u32,
    },
    /// A payload larger than a slot holds.
    #[error("a {len}-byte payload does not fit a slot (at most {max} bytes)")]
    TooLarge {
        /// Payload bytes.
        len: usize,
        /// What fits.
        max: usize,
    },
    /// The host-file backing.
    #[error(transparent)]
    Host(#[from] HostError),
}

/// Checks a name is 1..=`max` printable ASCII bytes and NUL-pads it.
pub(crate) fn encode_checked<const N: usize>(what: &str, name: &str) -> Result<[u8; N], Error> {
    if name.is_empty() || name.len() > N || !name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(Error::Invalid(format!(
            "{what} {name:?} must be 1 to {N} printable ASCII characters"
        )));
    }
    Ok(backdoor_abi::encode_name::<N>(name))
}
