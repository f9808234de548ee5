//! Guest RAM: one memfd, mapped shared, so that other components (the
//! backdoor agent, an RDMA registration) can map the very same pages.

use std::fs::File;
use std::io;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout;

/// Size of a huge page used with `--hugepages`.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Smallest guest bdvmm will build: boot structures plus a test guest at 2 MiB.
pub const MIN_MEM_BYTES: u64 = 4 << 20;

/// Errors while creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The sealed guest-RAM memfd could not be created or sized.
    #[error("cannot create a sealed guest RAM memfd of {size} bytes")]
    Memfd { size: u64, source: io::Error },
    /// Not enough free huge pages for the requested size.
    #[error(
        "--hugepages needs {needed} free 2-MiB huge pages but this host has {free} \
         (reserve them with `sysctl vm.nr_hugepages={needed}` or drop --hugepages)"
    )]
    NotEnoughHugePages { needed: u64, free: u64 },
    /// mmap of the memfd failed.
    #[error("cannot map {size} bytes of guest RAM{hint}")]
    Map {
        size: u64,
        hint: &'static str,
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the region layout (an internal bug if it ever happens).
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
}

/// One contiguous range of guest RAM and where it lives in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RamRange {
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the range inside the memfd.
    pub file_offset: u64,
}

/// Guest RAM and the memfd behind it.
#[derive(Debug)]
pub struct GuestRam {
    memfd: File,
    ranges: Vec<RamRange>,
    mem: GuestMemoryMmap,
    host_addrs: Vec<u64>,
    size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM laid out by [`layout::ram_ranges`].
    pub fn new(size: u64, hugepages: bool) -> Result<Self, MemoryError> {
        if hugepages {
            check_free_huge_pages(size)?;
        }
        let memfd = create_memfd(size, hugepages)?;
        let mut ranges = Vec::new();
        let mut regions = Vec::new();
        let mut host_addrs = Vec::new();
        let mut file_offset = 0;
        for (guest_addr, len) in layout::ram_ranges(size) {
            let fo = FileOffset::new(
                memfd
                    .try_clone()
                    .map_err(|e| MemoryError::Layout(e.to_string()))?,
                file_offset,
            );
            let len_usize = usize::try_from(len).map_err(|e| MemoryError::Layout(e.to_string()))?;
            // Hugetlb mappings must not be MAP_NORESERVE: without the
            // reservation a missing huge page is a SIGBUS at first touch
            // instead of a clean error here.
            let flags = if hugepages {
                libc::MAP_SHARED
            } else {
                libc::MAP_SHARED | libc::MAP_NORESERVE
            };
            let region = MmapRegionBuilder::new(len_usize)
                .with_file_offset(fo)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .build()
                .map_err(|source| MemoryError::Map {
                    size: len,
                    hint: if hugepages { " on huge pages" } else { "" },
                    source,
                })?;
            host_addrs.push(region.as_ptr() as u64);
            let region = GuestRegionMmap::new(region, GuestAddress(guest_addr))
                .ok_or_else(|| MemoryError::Layout(format!("region at {guest_addr:#x}")))?;
            regions.push(region);
            ranges.push(RamRange {
                guest_addr,
                len,
                file_offset,
            });
            file_offset += len;
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(Self {
            memfd,
            ranges,
            mem,
            host_addrs,
            size,
        })
    }

    /// Where range `i` of [`GuestRam::ranges`] is mapped in this process.
    pub fn host_address(&self, i: usize) -> Option<u64> {
        self.host_addrs.get(i).copied()
    }

    /// The guest memory, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The memfd holding all of guest RAM; map it `MAP_SHARED` to see the guest's bytes.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Guest RAM ranges and their memfd offsets.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

fn create_memfd(size: u64, hugepages: bool) -> Result<File, MemoryError> {
    backdoor_agent::guest_mem::sealed_memfd(c"bdvmm-guest-ram", size, hugepages)
        .map_err(|source| MemoryError::Memfd { size, source })
}

fn check_free_huge_pages(size: u64) -> Result<(), MemoryError> {
    let needed = size.div_ceil(HUGE_PAGE_SIZE);
    let free = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if free < needed {
        return Err(MemoryError::NotEnoughHugePages { needed, free });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestMemoryBackend};

    use super::*;

    #[test]
    fn ram_is_visible_through_a_second_mapping_of_the_memfd() {
        let ram = GuestRam::new(8 << 20, false).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x12_3450))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.memfd().read_exact_at(&mut buf, 0x12_3450).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert_eq!(ram.memory().num_regions(), 1);
    }

    #[test]
    fn memfd_size_is_sealed() {
        let ram = GuestRam::new(8 << 20, false).unwrap();
        assert!(ram.memfd().set_len(4 << 20).is_err());
        assert!(ram.memfd().set_len(16 << 20).is_err());
    }

    #[test]
    fn a_hugetlb_memfd_is_sealed_too() {
        // Creating and sizing it needs no reserved huge page (none are
        // reserved here); only touching its memory would.
        let f = create_memfd(4 << 20, true).unwrap();
        use backdoor_agent::guest_mem::SealFlag as S;
        let seals = backdoor_agent::guest_mem::seals(&f).unwrap();
        assert!(seals.contains(S::F_SEAL_SHRINK | S::F_SEAL_GROW | S::F_SEAL_SEAL));
        assert!(f.set_len(2 << 20).is_err(), "a sealed hugetlb memfd shrank");
    }

    #[test]
    fn ranges_above_the_gap_continue_in_the_file() {
        let ram = GuestRam::new(layout::MMIO_GAP_START + (64 << 20), false).unwrap();
        let r = ram.ranges();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].guest_addr, layout::HIGH_RAM_START);
        assert_eq!(r[1].file_offset, layout::MMIO_GAP_START);
        assert_eq!(r[1].len, 64 << 20);
    }

    #[test]
    fn hugepages_without_reserved_pages_is_a_clear_error() {
        let free =
            std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
        if free >= 4 {
            let why = format!(
                "this host has {free} free huge pages, so the error path cannot be exercised"
            );
            // Where skips are failures (CI, the lab), this one is too.
            assert!(
                std::env::var_os("BDVMM_REQUIRE_LAB").is_none_or(|v| v != "1"),
                "{why}, and BDVMM_REQUIRE_LAB=1 makes a skip a failure"
            );
            eprintln!("SKIP: hugepages_without_reserved_pages_is_a_clear_error: {why}");
            return;
        }
        let err = GuestRam::new(8 << 20, true).unwrap_err();
        assert!(err.to_string().contains("vm.nr_hugepages"), "{err}");
    }
}
