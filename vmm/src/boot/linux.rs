//! Loading a Linux kernel (bzImage or ELF vmlinux) with the 64-bit boot
//! protocol: kernel, initrd, command line and the zero page with its e820 map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::{Cmdline, Error as CmdlineError};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// "HdrS": the boot protocol header magic at offset 0x202 of a bzImage.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// The boot_flag value at offset 0x1fe.
pub const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader` for a boot loader without an assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// `loadflags` bit: the heap_end_ptr field is valid.
const CAN_USE_HEAP: u8 = 0x80;
/// Default highest initrd address when the kernel does not say (protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors while loading a Linux guest.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}")]
    KernelFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is neither a bzImage nor an ELF vmlinux.
    #[error("{0} is not a Linux kernel: it is neither a bzImage (no \"HdrS\" boot header) nor an ELF vmlinux")]
    NotAKernel(PathBuf),
    /// The loader rejected the image.
    #[error("cannot load kernel {path}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}")]
    InitrdFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low RAM.
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest RAM: only {room} bytes are free \
         between the kernel's end ({kernel_end:#x}) and {limit:#x}; give the guest more --mem"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        room: u64,
        kernel_end: u64,
        limit: u64,
    },
    /// The command line is too long or holds what it may not.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// linux-loader could not write the zero page.
    #[error("cannot write the zero page into guest memory: {0}")]
    ZeroPage(String),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    GuestWrite {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// What the vCPU set-up needs to know after the kernel is loaded.
#[derive(Debug, Clone, Copy)]
pub struct LinuxEntry {
    /// 64-bit entry point (guest-physical).
    pub entry: u64,
    /// The zero page, passed in RSI.
    pub zero_page: u64,
}

/// The kind of kernel image, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage with a boot protocol header.
    BzImage,
    /// An ELF vmlinux.
    Elf,
}

/// Recognizes a kernel image by its magic numbers.
pub fn detect_format(file: &mut File) -> std::io::Result<Option<KernelFormat>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = read_up_to(file, &mut head)?;
    file.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    if n >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]) == HDRS_MAGIC
    {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads kernel, initrd and command line, and writes the zero page.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LinuxEntry, LinuxBootError> {
    let kernel_err = |source| LinuxBootError::KernelFile {
        path: kernel.to_owned(),
        source,
    };
    let mut file = File::open(kernel).map_err(kernel_err)?;
    let format = detect_format(&mut file)
        .map_err(kernel_err)?
        .ok_or_else(|| LinuxBootError::NotAKernel(kernel.to_owned()))?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let load_err = |source| LinuxBootError::Load {
        path: kernel.to_owned(),
        source,
    };
    let loaded = match format {
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, himem).map_err(load_err)?,
        KernelFormat::Elf => Elf::load(mem, None, &mut file, himem).map_err(load_err)?,
    };
    let entry = match format {
        KernelFormat::BzImage => loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        KernelFormat::Elf => loaded.kernel_load.0,
    };

    let cmdline = kernel_cmdline(cmdline, loaded.setup_header.as_ref())?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cmdline)
        .map_err(|e| LinuxBootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| LinuxBootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();

    let low_ram_end = mem_size.min(layout::MMIO_GAP_START);
    let initrd_placed = match initrd {
        Some(path) => Some(load_initrd(
            mem,
            path,
            loaded.kernel_end,
            low_ram_end,
            loaded.setup_header.as_ref(),
        )?),
        None => None,
    };

    let params = build_boot_params(loaded.setup_header, cmdline_len, initrd_placed, mem_size);
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| LinuxBootError::ZeroPage(e.to_string()))?;
    Ok(LinuxEntry {
        entry,
        zero_page: layout::ZERO_PAGE_ADDR,
    })
}

/// The command line as linux-loader builds it: printable ASCII only, and
/// no longer than the kernel's own limit when it states one (protocol
/// 2.06 and later) or than the room bdvmm gives it.
fn kernel_cmdline(text: &str, hdr: Option<&setup_header>) -> Result<Cmdline, LinuxBootError> {
    let limit = hdr
        .map(|h| h.cmdline_size as usize)
        .filter(|&n| n > 0)
        .unwrap_or(layout::CMDLINE_MAX - 1)
        .min(layout::CMDLINE_MAX - 1);
    let mut cmdline =
        Cmdline::new(limit + 1).map_err(|e| LinuxBootError::Cmdline(e.to_string()))?;
    cmdline.insert_str(text).map_err(|e| {
        LinuxBootError::Cmdline(match e {
            CmdlineError::TooLarge => {
                format!("it is {} bytes long; the limit is {limit}", text.len())
            }
            CmdlineError::InvalidAscii => {
                "it may hold only printable ASCII characters (no NUL, tab or newline)".into()
            }
            e => e.to_string(),
        })
    })?;
    Ok(cmdline)
}

/// Where an initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest-physical address (page-aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Chooses the highest page-aligned address for an initrd of `size` bytes
/// that stays above the kernel and below both RAM's end and the kernel's
/// `initrd_addr_max`, as boot loaders conventionally do.
pub fn place_initrd(size: u64, kernel_end: u64, low_ram_end: u64, addr_max: u64) -> Option<u64> {
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let start = limit.checked_sub(size)? & !0xfff;
    (start >= kernel_end.next_multiple_of(0x1000)).then_some(start)
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    low_ram_end: u64,
    hdr: Option<&setup_header>,
) -> Result<InitrdPlacement, LinuxBootError> {
    let file_err = |source| LinuxBootError::InitrdFile {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    let size = file.metadata().map_err(file_err)?.len();
    let addr_max = hdr
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let addr = place_initrd(size, kernel_end, low_ram_end, addr_max).ok_or_else(|| {
        LinuxBootError::InitrdTooLarge {
            path: path.to_owned(),
            size,
            room: limit.saturating_sub(kernel_end),
            kernel_end,
            limit,
        }
    })?;
    let len = usize::try_from(size).map_err(|_| LinuxBootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        room: 0,
        kernel_end,
        limit,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| LinuxBootError::GuestWrite {
            what: "the initrd",
            source,
        })?;
    Ok(InitrdPlacement { addr, size })
}

/// The e820 map bdvmm reports for `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, layout::EBDA_START, E820_RAM),
        entry(
            layout::EBDA_START,
            layout::HIMEM_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for (start, len) in crate::layout::ram_ranges(mem_size) {
        let (start, len) = if start == 0 {
            (layout::HIMEM_START, len - layout::HIMEM_START)
        } else {
            (start, len)
        };
        map.push(entry(start, len, E820_RAM));
    }
    map
}

/// Fills the zero page: the kernel's own setup header (bzImage) or a
/// minimal valid one (vmlinux), our loader fields, and the e820 map.
///
/// The protocol's fields are 32-bit; every value stored in them is below
/// 4 GiB by construction (layout constants, a command line under 2 KiB, an
/// initrd placed below the MMIO gap, at most 128 e820 entries).
#[allow(clippy::cast_possible_truncation)]
pub fn build_boot_params(
    kernel_hdr: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    mem_size: u64,
) -> boot_params {
    let mut p = boot_params::default();
    if let Some(hdr) = kernel_hdr {
        p.hdr = hdr;
    } else {
        p.hdr.boot_flag = BOOT_FLAG;
        p.hdr.header = HDRS_MAGIC;
        p.hdr.kernel_alignment = 0x0100_0000;
    }
    p.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    p.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    p.hdr.loadflags |= CAN_USE_HEAP;
    // The heap ends where the boot stack region starts, as a 16-bit offset
    // from the real-mode segment (0 here): only early real-mode code uses it.
    p.hdr.heap_end_ptr = (layout::BOOT_STACK_TOP - 0x200) as u16;
    if let Some(rd) = initrd {
        p.hdr.ramdisk_image = rd.addr as u32;
        p.hdr.ramdisk_size = rd.size as u32;
    }
    let map = e820_map(mem_size);
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    p.e820_entries = map.len() as u8;
    p
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    // Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
    #[test]
    fn zero_page_layout_matches_the_boot_protocol() {
        assert_eq!(size_of::<boot_params>(), 4096);
        assert_eq!(offset_of!(boot_params, e820_entries), 0x1e8);
        assert_eq!(offset_of!(boot_params, hdr), 0x1f1);
        assert_eq!(offset_of!(boot_params, e820_table), 0x2d0);
        assert_eq!(0x1f1 + offset_of!(setup_header, boot_flag), 0x1fe);
        assert_eq!(0x1f1 + offset_of!(setup_header, header), 0x202);
        assert_eq!(0x1f1 + offset_of!(setup_header, type_of_loader), 0x210);
        assert_eq!(0x1f1 + offset_of!(setup_header, ramdisk_image), 0x218);
        assert_eq!(0x1f1 + offset_of!(setup_header, cmd_line_ptr), 0x228);
        assert_eq!(0x1f1 + offset_of!(setup_header, cmdline_size), 0x238);
        assert_eq!(size_of::<boot_e820_entry>(), 20);
    }

    #[test]
    fn vmlinux_gets_a_valid_minimal_header() {
        let p = build_boot_params(None, 12, None, 512 << 20);
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(u64::from(hdr.cmd_line_ptr), layout::CMDLINE_ADDR);
        assert_eq!({ hdr.cmdline_size }, 12);
        assert_eq!({ hdr.ramdisk_image }, 0);
    }

    #[test]
    fn e820_covers_exactly_the_guest_ram() {
        let mem = 512u64 << 20;
        let p = build_boot_params(None, 0, None, mem);
        let n = p.e820_entries as usize;
        let table = p.e820_table;
        let entries: Vec<_> = table[..n]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        assert_eq!(
            entries,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, mem - 0x100000, E820_RAM),
            ]
        );
        let ram: u64 = entries
            .iter()
            .filter(|e| e.2 == E820_RAM)
            .map(|e| e.1)
            .sum();
        assert_eq!(ram, mem - (0x100000 - 0x9fc00));
    }

    #[test]
    fn e820_skips_the_mmio_gap_for_large_guests() {
        let map = e820_map(4 << 30);
        let last = map.last().unwrap();
        assert_eq!(
            ({ last.addr }, { last.size }),
            (1 << 32, (4 << 30) - layout::MMIO_GAP_START)
        );
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= layout::MMIO_GAP_START || e.addr >= 1 << 32));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let addr = place_initrd(10_000, 0x200_0000, 512 << 20, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 10_000 <= 512 << 20);
        assert!(addr > (512 << 20) - 16384);
        // Respects initrd_addr_max below the end of RAM.
        let addr = place_initrd(4096, 0x200_0000, 2 << 30, 0x37ff_ffff).unwrap();
        assert_eq!(addr, 0x3800_0000 - 4096);
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        assert_eq!(
            place_initrd(64 << 20, 0x200_0000, 64 << 20, DEFAULT_INITRD_ADDR_MAX),
            None
        );
        assert_eq!(
            place_initrd(u64::MAX, 0, 64 << 20, DEFAULT_INITRD_ADDR_MAX),
            None
        );
    }

    #[test]
    fn command_line_limits_are_enforced() {
        let c = kernel_cmdline("console=ttyS0 bdvmm.test=1", None).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().as_bytes_with_nul(),
            b"console=ttyS0 bdvmm.test=1\0"
        );
        let long = kernel_cmdline(&"x".repeat(3000), None).unwrap_err();
        assert!(long.to_string().contains("3000 bytes long"), "{long}");
        for bad in ["a\0b", "a\tb", "caf\u{e9}"] {
            assert!(kernel_cmdline(bad, None).is_err(), "{bad:?}");
        }
        // The kernel's own, smaller limit wins.
        let hdr = setup_header {
            cmdline_size: 16,
            ..Default::default()
        };
        assert!(kernel_cmdline(&"y".repeat(16), Some(&hdr)).is_ok());
        assert!(kernel_cmdline(&"y".repeat(17), Some(&hdr)).is_err());
    }
}
