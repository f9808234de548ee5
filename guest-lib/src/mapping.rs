//! A shared mapping (of /dev/backdoor or of a host file) seen only as
//! 8-byte atomic words: other parties (the driver, remote monitors, a
//! restarted instance) read the same pages concurrently, so no Rust
//! reference to plain bytes of it is ever made.

use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// `MAP_SHARED` memory, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is shared memory reached only through atomics; the
// pointer stays valid on every thread until drop.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset` (page-aligned), shared.
    pub(crate) fn map(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> Result<Self, nix::Error> {
        let nz = NonZeroUsize::new(len).ok_or(nix::Error::EINVAL)?;
        let off = i64::try_from(offset).map_err(|_| nix::Error::EINVAL)?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh shared mapping chosen by the kernel; it aliases no
        // Rust object, and this crate only touches it through atomics.
        let base = unsafe { mmap(None, nz, prot, MapFlags::MAP_SHARED, fd, off)? };
        Ok(Self {
            base: base.cast(),
            len,
        })
    }

    /// The words of `[off, off + len)`, if that range is 8-aligned and inside.
    pub(crate) fn words(&self, off: usize, len: usize) -> Option<&[AtomicU64]> {
        let end = off.checked_add(len)?;
        if off % 8 != 0 || len % 8 != 0 || end > self.len {
            return None;
        }
        // SAFETY: the range is inside the mapping, 8-aligned (the base is
        // page-aligned) and lives as long as `self`; AtomicU64 has the
        // layout of u64 and tolerates concurrent access by other parties.
        // On read-only mappings only loads are done (plain `mov` on x86-64,
        // which std documents as fine for read-only memory at this size).
        Some(unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(off).cast::<AtomicU64>(), len / 8)
        })
    }

    /// The word at `off`.
    pub(crate) fn word(&self, off: usize) -> Option<&AtomicU64> {
        self.words(off, 8).map(|w| &w[0])
    }

    /// Copies `buf.len()` bytes (a multiple of 8) from `off` with relaxed loads.
    pub(crate) fn read_bytes(&self, off: usize, buf: &mut [u8]) -> bool {
        let Some(words) = self.words(off, buf.len()) else {
            return false;
        };
        for (chunk, w) in buf.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        true
    }

    /// Stores `data` (a multiple of 8 bytes) at `off` with relaxed stores.
    pub(crate) fn write_bytes(&self, off: usize, data: &[u8]) -> bool {
        let Some(words) = self.words(off, data.len()) else {
            return false;
        };
        for (chunk, w) in data.chunks_exact(8).zip(words) {
            w.store(
                u64::from_le_bytes(chunk.try_into().expect("8 bytes")),
                Ordering::Relaxed,
            );
        }
        true
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned, and no
        // reference into the mapping outlives `self`.
        let _ = unsafe { munmap(self.base.cast(), self.len) };
    }
}
