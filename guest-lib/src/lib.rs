//! `backdoor-guest`: the Rust guest library over `/dev/backdoor` (the
//! Linux driver `backdoor.ko`), mirroring `guest-driver/include/backdoor_uapi.h`.
//!
//! - [`Counter`]: a progress counter in the progress box; [`Counter::bump`]
//!   is one store into the mapped box (no syscall, no VM exit); IDLE tells
//!   monitors "no work, not hung"; dropped counters are retired.
//! - [`ServiceArea`]: a service's state-box slots, kept by the driver
//!   across crashes; records are written and read with the docs/abi.md
//!   seqlock + CRC32C protocol (the `backdoor-abi` code), and a restarted
//!   instance finds its sessions with [`ServiceArea::scan`].
//! - [`Inbox`]: sessions a repair monitor delivered with `bdctl resume`.
//!
//! The same types run over a host file laid out like guest memory
//! ([`Device::host`]): the only difference is who answers the requests
//! (the driver, or the file's own bookkeeping); mapping, bumping, record
//! writing and reading are one code path. That is how services are tested
//! on hosts that cannot run a Linux guest.
//!
//! In a guest:
//!
//! ```no_run
//! use backdoor_guest::{Counter, Device, Level, ServiceArea};
//!
//! let dev = Device::open()?; // "… is backdoor.ko loaded?" if it is missing
//! let app = Counter::alloc(&dev, "myapp", 1000, Level::Application)?;
//! let area = ServiceArea::open(&dev, "myapp", 8, true)?;
//! area.write(0, 42, 1, 1, b"cart=3")?;
//! app.bump();
//! # Ok::<(), backdoor_guest::Error>(())
//! ```
//!
//! On a host (this example runs as a doctest):
//!
//! ```
//! use backdoor_guest::{Counter, Device, HostConfig, Level, ServiceArea};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("state");
//! {
//!     let dev = Device::host(&path, &HostConfig::default())?;
//!     let c = Counter::alloc(&dev, "myapp", 1000, Level::Application)?;
//!     c.bump();
//!     let area = ServiceArea::open(&dev, "myapp", 4, true)?;
//!     assert!(area.created());
//!     area.write(0, 42, 1, 1, b"cart=3")?;
//!     area.write(1, 42, 2, 2, b"cart=4")?; // the other slot of the pair
//! } // the "process" ends; the state file keeps the area
//! let dev = Device::host(&path, &HostConfig::default())?;
//! let area = ServiceArea::open(&dev, "myapp", 4, false)?;
//! let scan = area.scan();
//! assert_eq!(scan.newest.len(), 1);
//! assert_eq!(scan.newest[0].record.version, 2);
//! assert_eq!(scan.newest[0].record.payload, b"cart=4");
//! # Ok::<(), backdoor_guest::Error>(())
//! ```

mod counter;
mod device;
mod error;
pub mod host;
mod inbox;
mod mapping;
mod service;
pub mod uapi;

pub use backdoor_abi::record::{Corruption, ReadOutcome, Record};
pub use backdoor_abi::Level;
pub use counter::Counter;
pub use device::Device;
pub use error::Error;
pub use host::{HostConfig, HostLayout};
pub use inbox::{FenceBook, Handover, Inbox, DOORBELL_OFFSET, RECORDS_OFFSET};
pub use service::{Found, Problem, Scan, ServiceArea, READ_RETRIES};
