//! The agent's own shared mapping of guest RAM (the VMM's memfd), and
//! one-sided access to it: reads copy with aligned 8-byte atomic loads, so
//! a counter is never torn; atomics are real atomics on the guest's words.
//! No vCPU is involved in any of it.
//!
//! The mapping is vm-memory's, as in bdvmm: one `MAP_SHARED` region per
//! RAM range at its offset in the memfd. The copies are ours: vm-memory's
//! `Bytes` chooses its own access widths, and a counter must be read in
//! one 8-byte load.

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use serde::{Deserialize, Serialize};
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

/// One contiguous range of guest RAM and where it lives in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Bytes.
    pub len: u64,
    /// Offset in the memfd.
    pub file_offset: u64,
}

/// Errors mapping guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// A range lies outside the memfd.
    #[error("RAM range at {guest_addr:#x} (+{len:#x}) lies outside the {file_len}-byte memfd")]
    Range {
        guest_addr: u64,
        len: u64,
        file_len: u64,
    },
    /// mmap failed.
    #[error("cannot map guest RAM")]
    Mmap(#[from] MmapRegionError),
    /// The ranges do not make one guest memory (empty, or overlapping).
    #[error("guest RAM ranges do not fit together: {0}")]
    Layout(String),
    /// fstat or dup failed.
    #[error("cannot inspect the guest RAM memfd: {0}")]
    Stat(std::io::Error),
}

/// Guest RAM mapped `MAP_SHARED` from the VMM's memfd.
#[derive(Debug)]
pub struct GuestMemory {
    mem: GuestMemoryMmap,
    ranges: Vec<RamRange>,
}

impl GuestMemory {
    /// Maps every range of the memfd and checks each lies inside it.
    pub fn map(memfd: File, ranges: Vec<RamRange>) -> Result<Self, MapError> {
        let file_len = memfd.metadata().map_err(MapError::Stat)?.len();
        let mut regions = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let outside = MapError::Range {
                guest_addr: r.guest_addr,
                len: r.len,
                file_len,
            };
            if r.len == 0
                || r.file_offset
                    .checked_add(r.len)
                    .is_none_or(|end| end > file_len)
            {
                return Err(outside);
            }
            let len = usize::try_from(r.len).map_err(|_| outside)?;
            let file = memfd.try_clone().map_err(MapError::Stat)?;
            // No MAP_NORESERVE: on a hugetlb memfd a missing page would be
            // a SIGBUS in the agent instead of an error here.
            let region = MmapRegionBuilder::new(len)
                .with_file_offset(FileOffset::new(file, r.file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED)
                .build()?;
            regions.push(
                GuestRegionMmap::new(region, GuestAddress(r.guest_addr)).ok_or_else(|| {
                    MapError::Layout(format!("a range at {:#x} wraps around", r.guest_addr))
                })?,
            );
        }
        let mem =
            GuestMemoryMmap::from_regions(regions).map_err(|e| MapError::Layout(e.to_string()))?;
        Ok(Self { mem, ranges })
    }

    /// The guest's RAM ranges.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// The host address of `[gpa, gpa + len)` if it lies inside one RAM range.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let start = GuestAddress(gpa);
        let region = self.mem.find_region(start)?;
        let offset = start.checked_offset_from(region.start_addr())?;
        if offset.checked_add(len)? > region.len() {
            return None;
        }
        region.get_host_address(MemoryRegionAddress(offset)).ok()
    }

    /// Copies guest bytes at `gpa` into `buf`; every aligned 8-byte word is
    /// one atomic load. False if the range is not in RAM.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(p) = self.host_ptr(gpa, buf.len() as u64) else {
            return false;
        };
        let start = p as usize;
        // Bytes up to the first aligned word, the words, the bytes after.
        let head = start.wrapping_neg() % 8;
        let head = head.min(buf.len());
        let (lead, rest) = buf.split_at_mut(head);
        let (body, tail) = rest.split_at_mut(rest.len() / 8 * 8);
        let byte = |at: usize| {
            // SAFETY: in bounds; byte atomics have no alignment needs.
            unsafe { &*(at as *const AtomicU8) }.load(Ordering::Acquire)
        };
        for (i, b) in lead.iter_mut().enumerate() {
            *b = byte(start + i);
        }
        // One loop over a slice, no index checks: this copy is most of the
        // agent's time in a bulk read. (A read shorter than its lead has
        // no aligned start: no words.)
        let words: &[AtomicU64] = if body.is_empty() {
            &[]
        } else {
            // SAFETY: in bounds and 8-aligned; shared memory is only
            // accessed atomically.
            unsafe {
                std::slice::from_raw_parts((start + head) as *const AtomicU64, body.len() / 8)
            }
        };
        for (out, w) in body.chunks_exact_mut(8).zip(words) {
            out.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        let tail_at = start + head + body.len();
        for (i, b) in tail.iter_mut().enumerate() {
            *b = byte(tail_at + i);
        }
        true
    }

    /// Writes `data` at `gpa` (aligned words as single atomic stores).
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        let Some(p) = self.host_ptr(gpa, data.len() as u64) else {
            return false;
        };
        let mut i = 0;
        while i < data.len() {
            let addr = p as usize + i;
            if addr % 8 == 0 && data.len() - i >= 8 {
                let w = u64::from_le_bytes(data[i..i + 8].try_into().expect("8 bytes"));
                // SAFETY: in bounds and 8-aligned.
                unsafe { &*(addr as *const AtomicU64) }.store(w, Ordering::Release);
                i += 8;
            } else {
                // SAFETY: in bounds.
                unsafe { &*(addr as *const AtomicU8) }.store(data[i], Ordering::Release);
                i += 1;
            }
        }
        true
    }

    fn word(&self, gpa: u64) -> Option<&AtomicU64> {
        if gpa % 8 != 0 {
            return None;
        }
        let p = self.host_ptr(gpa, 8)?;
        // SAFETY: in bounds, 8-aligned (the mapping is page-aligned), shared memory.
        Some(unsafe { &*(p as *const AtomicU64) })
    }

    /// Compare-and-swap of the aligned word at `gpa`; returns the old value.
    pub fn cas(&self, gpa: u64, expected: u64, new: u64) -> Option<u64> {
        let w = self.word(gpa)?;
        Some(
            match w.compare_exchange(expected, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            },
        )
    }

    /// Fetch-and-add of the aligned word at `gpa`; returns the old value.
    pub fn faa(&self, gpa: u64, add: u64) -> Option<u64> {
        Some(self.word(gpa)?.fetch_add(add, Ordering::SeqCst))
    }
}

/// A fresh memfd of `len` bytes: stand-in guest RAM for tests and benchmarks.
pub fn memfd(name: &std::ffi::CStr, len: u64) -> std::io::Result<File> {
    sealed_memfd(name, len, false)
}

/// A memfd of `len` bytes (2-MiB huge pages if `huge`) whose size is
/// sealed: no process sharing it can shrink it under another's mapping
/// (which would SIGBUS the VMM or the agent), and an agent refuses a
/// memfd without F_SEAL_SHRINK. Hugetlbfs memfds take seals too (Linux
/// 4.16 and later). bdvmm's guest RAM is one.
pub fn sealed_memfd(name: &std::ffi::CStr, len: u64, huge: bool) -> std::io::Result<File> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::MemFdCreateFlag as F;
    use std::os::fd::AsRawFd;
    let mut flags = F::MFD_CLOEXEC | F::MFD_ALLOW_SEALING;
    if huge {
        flags |= F::MFD_HUGETLB | F::MFD_HUGE_2MB;
    }
    let f = File::from(nix::sys::memfd::memfd_create(name, flags)?);
    f.set_len(len)?;
    fcntl(
        f.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(f)
}

pub use nix::fcntl::SealFlag;

/// The seals of a memfd (what [`sealed_memfd`] adds, and what an agent
/// checks of one it receives).
pub fn seals(f: &File) -> std::io::Result<SealFlag> {
    use std::os::fd::AsRawFd;
    let bits = nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GET_SEALS)?;
    Ok(SealFlag::from_bits_truncate(bits))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;

    use super::*;

    /// A memfd-backed "guest" of `len` bytes with one RAM range at `gpa`.
    pub(crate) fn fake_ram(gpa: u64, len: u64) -> (File, GuestMemory) {
        let fd = nix::sys::memfd::memfd_create(
            c"test-ram",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        let mut f = File::from(fd);
        f.set_len(len).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"hello").unwrap();
        let m = GuestMemory::map(
            f.try_clone().unwrap(),
            vec![RamRange {
                guest_addr: gpa,
                len,
                file_offset: 0,
            }],
        )
        .unwrap();
        (f, m)
    }

    #[test]
    fn reads_and_writes_see_the_same_bytes_as_the_file() {
        let (f, m) = fake_ram(0x10_0000, 1 << 20);
        let mut buf = [0u8; 5];
        assert!(m.read(0x10_0000, &mut buf));
        assert_eq!(&buf, b"hello");
        assert!(m.write(0x10_0003, b"p!xyz12345"));
        let mut back = [0u8; 13];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"help!xyz12345");
        assert!(!m.read(0x0f_ffff, &mut buf), "below RAM");
        assert!(!m.read(0x20_0000 - 2, &mut buf), "crosses the end");
        assert!(!m.read(u64::MAX - 2, &mut buf), "overflow");
    }

    #[test]
    fn a_read_at_any_offset_and_length_returns_the_files_bytes() {
        let (f, m) = fake_ram(0x10_0000, 4096);
        let bytes: Vec<u8> = (0..64u8).map(|b| b.wrapping_mul(37) ^ 0x5a).collect();
        f.write_all_at(&bytes, 0).unwrap();
        for at in 0..24 {
            for len in 0..40 {
                let mut buf = vec![0xeeu8; len];
                assert!(m.read(0x10_0000 + at as u64, &mut buf));
                assert_eq!(buf, bytes[at..at + len], "{len} bytes at +{at}");
            }
        }
    }

    #[test]
    fn atomics_need_aligned_words() {
        let (_f, m) = fake_ram(0, 4096);
        assert_eq!(m.faa(8, 5), Some(0));
        assert_eq!(m.cas(8, 5, 9), Some(5));
        assert_eq!(
            m.cas(8, 5, 1),
            Some(9),
            "failed CAS returns the current value"
        );
        assert_eq!(m.faa(12, 1), None);
        assert_eq!(m.faa(4096, 1), None);
    }

    #[test]
    fn ranges_outside_the_memfd_are_refused() {
        let (f, _) = fake_ram(0, 4096);
        let err = GuestMemory::map(
            f,
            vec![RamRange {
                guest_addr: 0,
                len: 8192,
                file_offset: 0,
            }],
        )
        .unwrap_err();
        assert!(err.to_string().contains("outside"));
    }
}
