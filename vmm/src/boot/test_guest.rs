//! Loading a freestanding test guest: a static ELF64 linked at a fixed
//! guest-physical address (kvm-unit-tests style), entered in 64-bit mode.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// Errors while loading a test guest.
#[derive(Debug, thiserror::Error)]
pub enum TestGuestError {
    /// The file cannot be read.
    #[error("cannot read test guest {path}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The loader rejected the file.
    #[error("{path} is not a loadable x86-64 test guest ELF")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    /// A segment lies outside guest RAM below the MMIO gap.
    #[error(
        "test guest {path} has a segment at {start:#x}..{end:#x}, outside guest RAM \
         (test guests must load between {min:#x} and {max:#x}; raise --mem or relink)"
    )]
    SegmentOutsideRam {
        path: PathBuf,
        start: u64,
        end: u64,
        min: u64,
        max: u64,
    },
}

/// Loads the guest's PT_LOAD segments at their physical addresses and
/// returns the entry point. Memory past each segment's file data (bss)
/// must read as zero: a fresh memfd already does, so it is only cleared
/// when `reused` (a reboot into RAM the previous boot wrote).
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    reused: bool,
) -> Result<u64, TestGuestError> {
    let file_err = |source| TestGuestError::File {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    let ram_end = mem_size.min(layout::MMIO_GAP_START);
    let bss = check_segments(&mut file, ram_end).map_err(|e| match e {
        SegmentCheck::Io(source) => TestGuestError::File {
            path: path.to_owned(),
            source,
        },
        SegmentCheck::Outside(start, end) => TestGuestError::SegmentOutsideRam {
            path: path.to_owned(),
            start,
            end,
            min: layout::HIMEM_START,
            max: ram_end,
        },
    })?;
    let loaded = Elf::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|source| TestGuestError::Load {
        path: path.to_owned(),
        source,
    })?;
    if reused {
        let zeros = vec![0u8; 64 * 1024];
        for (start, len) in bss {
            let mut off = 0u64;
            while off < len {
                let n = usize::try_from(len - off).map_or(zeros.len(), |r| r.min(zeros.len()));
                // Inside RAM: check_segments verified every segment is.
                let _ = mem.write_slice(&zeros[..n], GuestAddress(start + off));
                off += n as u64;
            }
        }
    }
    Ok(loaded.kernel_load.0)
}

enum SegmentCheck {
    Io(std::io::Error),
    Outside(u64, u64),
}

/// Every PT_LOAD segment, bss included, must fit in low RAM above 1 MiB
/// (the loader itself checks only the file-backed part). Returns the bss
/// ranges (start, len) to clear.
fn check_segments(file: &mut File, ram_end: u64) -> Result<Vec<(u64, u64)>, SegmentCheck> {
    let mut bss = Vec::new();
    let mut ehdr = Elf64_Ehdr::default();
    file.seek(SeekFrom::Start(0)).map_err(SegmentCheck::Io)?;
    if file.read_exact(ehdr.as_mut_slice()).is_err() {
        // Too short to be an ELF: let the loader give its precise error.
        return Ok(bss);
    }
    if ehdr.e_ident[..4] != *b"\x7fELF" || usize::from(ehdr.e_phentsize) != size_of::<Elf64_Phdr>()
    {
        return Ok(bss);
    }
    for i in 0..u64::from(ehdr.e_phnum) {
        let mut ph = Elf64_Phdr::default();
        let off = ehdr
            .e_phoff
            .saturating_add(i * size_of::<Elf64_Phdr>() as u64);
        file.seek(SeekFrom::Start(off)).map_err(SegmentCheck::Io)?;
        if file.read_exact(ph.as_mut_slice()).is_err() {
            return Ok(bss);
        }
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        let end = ph.p_paddr.saturating_add(ph.p_memsz);
        if ph.p_paddr < layout::HIMEM_START || end > ram_end {
            return Err(SegmentCheck::Outside(ph.p_paddr, end));
        }
        if ph.p_memsz > ph.p_filesz {
            bss.push((ph.p_paddr + ph.p_filesz, ph.p_memsz - ph.p_filesz));
        }
    }
    file.seek(SeekFrom::Start(0)).map_err(SegmentCheck::Io)?;
    Ok(bss)
}
