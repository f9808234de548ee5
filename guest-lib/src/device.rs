//! The device: /dev/backdoor, or a host file that stands in for it.
//! Both answer the same requests with the same structures (`uapi`), and
//! both hand out file offsets that the shared code maps: counters,
//! service areas and the inbox are one code path whichever backs them.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::host::{HostConfig, HostFile, HostLayout};
use crate::mapping::Mapping;
use crate::uapi::{
    ioctl, BdIocCounter, BdIocCounterState, BdIocInfo, BdIocSvc, BACKDOOR_DEVICE_PATH,
};
use crate::Error;

/// An open /dev/backdoor (or host stand-in). Cloning shares the open
/// file; the driver ties counters and the service hold to that file, so
/// they are released when the last clone, counter and area are gone.
#[derive(Debug, Clone)]
pub struct Device {
    pub(crate) backing: Arc<Backing>,
}

/// What answers the requests.
#[derive(Debug)]
pub(crate) enum Backing {
    /// The kernel driver.
    Kernel {
        /// The open device node.
        file: File,
        /// Its path, for messages.
        path: PathBuf,
    },
    /// A host file laid out like guest memory (tests, host runs).
    Host(HostFile),
}

impl Device {
    /// Opens [`BACKDOOR_DEVICE_PATH`].
    pub fn open() -> Result<Self, Error> {
        Self::open_path(BACKDOOR_DEVICE_PATH)
    }

    /// Opens the device node at `path`.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_owned();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    Error::Missing { path: path.clone() }
                } else {
                    Error::Open {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
        Ok(Self {
            backing: Arc::new(Backing::Kernel { file, path }),
        })
    }

    /// Opens the host file at `path` as a device, creating it with
    /// `config`'s layout if it does not exist (an existing file keeps its
    /// own layout). The file is locked: one process at a time, as the
    /// driver allows one holder per service.
    pub fn host(path: impl AsRef<Path>, config: &HostConfig) -> Result<Self, Error> {
        Ok(Self {
            backing: Arc::new(Backing::Host(HostFile::open(path.as_ref(), config)?)),
        })
    }

    /// Where a host file keeps its boxes (None for the kernel device).
    pub fn host_layout(&self) -> Option<HostLayout> {
        match &*self.backing {
            Backing::Kernel { .. } => None,
            Backing::Host(h) => Some(h.layout()),
        }
    }

    /// What answers: the device node's path, or the host file's.
    pub fn describe(&self) -> String {
        self.backing.describe()
    }

    /// What the driver set up.
    pub fn info(&self) -> Result<BdIocInfo, Error> {
        self.backing.info()
    }
}

fn ioctl_err(op: &'static str) -> impl FnOnce(nix::Error) -> Error {
    move |errno| Error::Ioctl { op, errno }
}

impl Backing {
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Kernel { file, .. } => file.as_fd(),
            Self::Host(h) => h.fd(),
        }
    }

    pub(crate) fn map(
        &self,
        what: &'static str,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> Result<Mapping, Error> {
        Mapping::map(self.fd(), offset, len, writable).map_err(|errno| Error::Map { what, errno })
    }

    pub(crate) fn info(&self) -> Result<BdIocInfo, Error> {
        match self {
            Self::Kernel { file, .. } => {
                let mut info = BdIocInfo::default();
                // SAFETY: `info` is a valid, writable BdIocInfo for the
                // duration of the call; the request number matches its size.
                unsafe { ioctl::info(file.as_raw_fd(), &mut info) }
                    .map_err(ioctl_err("BD_IOC_INFO"))?;
                Ok(info)
            }
            Self::Host(h) => Ok(h.info()),
        }
    }

    pub(crate) fn counter_alloc(&self, req: &mut BdIocCounter) -> Result<(), Error> {
        match self {
            Self::Kernel { file, .. } => {
                // SAFETY: `req` is a valid BdIocCounter the driver reads and fills.
                unsafe { ioctl::counter_alloc(file.as_raw_fd(), req) }.map_err(|e| match e {
                    nix::Error::ENOSPC => Error::NoSpace("no free progress counter".into()),
                    nix::Error::EINVAL => Error::Invalid(
                        "the driver refused the counter (name, deadline or level)".into(),
                    ),
                    errno => Error::Ioctl {
                        op: "BD_IOC_COUNTER_ALLOC",
                        errno,
                    },
                })?;
                Ok(())
            }
            Self::Host(h) => h.counter_alloc(req),
        }
    }

    pub(crate) fn counter_state(&self, id: u32, state: u32) -> Result<(), Error> {
        let req = BdIocCounterState { id, state };
        match self {
            Self::Kernel { file, .. } => {
                // SAFETY: `req` is a valid BdIocCounterState the driver only reads.
                unsafe { ioctl::counter_state(file.as_raw_fd(), &req) }
                    .map_err(ioctl_err("BD_IOC_COUNTER_STATE"))?;
                Ok(())
            }
            Self::Host(h) => h.counter_state(req),
        }
    }

    pub(crate) fn counter_free(&self, id: u32) -> Result<(), Error> {
        let req = BdIocCounterState { id, state: 0 };
        match self {
            Self::Kernel { file, .. } => {
                // SAFETY: `req` is a valid BdIocCounterState the driver only reads.
                unsafe { ioctl::counter_free(file.as_raw_fd(), &req) }
                    .map_err(ioctl_err("BD_IOC_COUNTER_FREE"))?;
                Ok(())
            }
            Self::Host(h) => h.counter_free(id),
        }
    }

    pub(crate) fn svc_open(&self, name: &str, req: &mut BdIocSvc) -> Result<(), Error> {
        match self {
            Self::Kernel { file, .. } => {
                // SAFETY: `req` is a valid BdIocSvc the driver reads and fills.
                unsafe { ioctl::svc_open(file.as_raw_fd(), req) }.map_err(|e| match e {
                    nix::Error::EBUSY => Error::Busy(name.to_owned()),
                    nix::Error::EACCES => Error::NotOwner(name.to_owned()),
                    nix::Error::ENOENT => Error::NoService(name.to_owned()),
                    nix::Error::ENOSPC => {
                        Error::NoSpace(format!("no {} free state-box slots", req.slots))
                    }
                    errno => Error::Ioctl {
                        op: "BD_IOC_SVC_OPEN",
                        errno,
                    },
                })?;
                Ok(())
            }
            Self::Host(h) => h.svc_open(name, req),
        }
    }

    pub(crate) fn svc_delete(&self, name: &str) -> Result<(), Error> {
        match self {
            Self::Kernel { file, .. } => {
                // SAFETY: a request without argument on our own open file.
                unsafe { ioctl::svc_delete(file.as_raw_fd()) }
                    .map_err(ioctl_err("BD_IOC_SVC_DELETE"))?;
                Ok(())
            }
            Self::Host(h) => h.svc_delete(name),
        }
    }

    /// The kernel keeps the hold until the file closes; the host stand-in
    /// lets it go with the area.
    pub(crate) fn svc_release(&self, name: &str) {
        if let Self::Host(h) = self {
            h.svc_release(name);
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Kernel { path, .. } => path.display().to_string(),
            Self::Host(h) => format!("host file {}", h.path().display()),
        }
    }
}
