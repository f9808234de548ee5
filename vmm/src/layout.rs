//! The guest-physical memory map that bdvmm builds for every x86-64 guest.
//!
//! Everything bdvmm writes for booting lives below 1 MiB, so a test guest
//! linked at 2 MiB and a Linux kernel loaded at 1 MiB never overlap it.

/// Global descriptor table (8 entries, the last one a 16-byte TSS descriptor).
pub const GDT_ADDR: u64 = 0x500;
/// Task-state segment referenced by the GDT, with its 8-KiB I/O bitmap.
pub const TSS_ADDR: u64 = TSS_BASE as u64;
/// The TSS address as a descriptor base (descriptors hold 32-bit bases here).
pub const TSS_BASE: u32 = 0x1000;
/// Linux boot protocol "zero page" (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for a Linux kernel (grows down, below the page tables).
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Page-map level 4 of the boot identity map.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of [`IDENTITY_MAP_GIB`] page directories (2-MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// The boot identity map covers this many GiB, always with 2-MiB pages:
/// PVM hosts do not support 1-GiB guest pages.
pub const IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line (NUL-terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line bdvmm accepts, NUL included (Linux's x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the Extended BIOS Data Area: conventional memory ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table (boot/mptable.rs): at the start of the EBDA, the first
/// place Linux's `smp_scan_config` looks. The EBDA is reserved in the e820
/// map, so the kernel keeps it.
pub const MPTABLE_ADDR: u64 = EBDA_START;
/// Start of high memory, where a bzImage's protected-mode code is loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap. Guest RAM above this address is moved to
/// [`HIGH_RAM_START`]. The gap holds bdvmm's own MMIO devices (from here on,
/// below 3 GiB) and the IOAPIC/LAPIC windows near 4 GiB.
pub const MMIO_GAP_START: u64 = 0xb000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where RAM that did not fit below the gap continues.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;

/// KVM needs three pages for the real-mode TSS on Intel hosts; keep them in the gap.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page for unrestricted-guest-less Intel hosts, in the gap.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// The RAM ranges (guest address, length) for a guest of `mem_bytes`.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (HIGH_RAM_START, mem_bytes - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_get_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_guests_skip_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
        assert_eq!(r.iter().map(|(_, l)| l).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let pd_end = PD_ADDR + IDENTITY_MAP_GIB * 0x1000;
        let mut areas = [
            (GDT_ADDR, GDT_ADDR + 64),
            (TSS_ADDR, TSS_ADDR + crate::boot::gdt::TSS_SIZE as u64),
            (ZERO_PAGE_ADDR, ZERO_PAGE_ADDR + 0x1000),
            (PML4_ADDR, PML4_ADDR + 0x1000),
            (PDPT_ADDR, PDPT_ADDR + 0x1000),
            (PD_ADDR, pd_end),
            (CMDLINE_ADDR, CMDLINE_ADDR + CMDLINE_MAX as u64),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
        assert!(areas.last().unwrap().1 <= EBDA_START);
    }
}
