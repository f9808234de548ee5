//! The boot GDT and TSS, and the KVM segment registers derived from them.
//!
//! Selector layout follows the Linux boot protocol (`__BOOT_CS` = 0x10,
//! `__BOOT_DS` = 0x18) and adds flat ring-3 segments, in SYSRET order, for
//! test guests that start in user mode.

use kvm_bindings::kvm_segment;

/// Kernel 64-bit code selector (`__BOOT_CS`).
pub const KERNEL_CS: u16 = 0x10;
/// Kernel data selector (`__BOOT_DS`).
pub const KERNEL_DS: u16 = 0x18;
/// User data selector, RPL 3.
pub const USER_DS: u16 = 0x20 | 3;
/// User 64-bit code selector, RPL 3.
pub const USER_CS: u16 = 0x28 | 3;
/// 64-bit TSS selector (a 16-byte descriptor spanning entries 6 and 7).
pub const TSS_SEL: u16 = 0x30;
/// Offset of the I/O permission bitmap inside the TSS (right after the 104-byte TSS proper).
pub const TSS_IOMAP_BASE: u16 = 104;
/// TSS proper, a 65536-bit I/O bitmap, and the all-ones byte that must end it.
pub const TSS_SIZE: u32 = 104 + 8192 + 1;
/// The TSS segment limit.
pub const TSS_LIMIT: u32 = TSS_SIZE - 1;

/// GDTR limit of the eight-entry table.
pub const GDT_LIMIT: u16 = 8 * 8 - 1;

/// Encodes one 8-byte segment descriptor.
pub fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0xffff)
}

/// The eight GDT words bdvmm writes at [`crate::layout::GDT_ADDR`].
pub fn gdt_table(tss_base: u32) -> [u64; 8] {
    [
        0,
        0,
        descriptor(0xa09b, 0, 0xfffff), // kernel code: 64-bit, DPL 0
        descriptor(0xc093, 0, 0xfffff), // kernel data, DPL 0
        descriptor(0xc0f3, 0, 0xfffff), // user data, DPL 3
        descriptor(0xa0fb, 0, 0xfffff), // user code: 64-bit, DPL 3
        descriptor(0x008b, tss_base, TSS_LIMIT), // busy 64-bit TSS
        0,                              // TSS base bits 63:32
    ]
}

/// Converts a descriptor into the form KVM's `kvm_sregs` wants.
pub fn kvm_segment(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    // 20 bits, so the cast is lossless.
    #[allow(clippy::cast_possible_truncation)]
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = bit(55);
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = bit(47);
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Serializes the GDT to bytes, little-endian.
pub fn gdt_bytes(table: &[u64; 8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    for (chunk, word) in out.chunks_exact_mut(8).zip(table) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_code_descriptor_matches_the_reference_encoding() {
        // The flat 64-bit code descriptor used by every x86-64 boot loader.
        assert_eq!(descriptor(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn segments_decode_to_what_long_mode_needs() {
        let t = gdt_table(0x1000);
        let cs = kvm_segment(t[2], KERNEL_CS);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ucs = kvm_segment(t[5], USER_CS);
        assert_eq!((ucs.l, ucs.dpl, ucs.selector & 3), (1, 3, 3));
        let uds = kvm_segment(t[4], USER_DS);
        assert_eq!((uds.dpl, uds.type_), (3, 3));
        let tss = kvm_segment(t[6], TSS_SEL);
        assert_eq!(
            (tss.base, tss.limit, tss.type_, tss.s),
            (0x1000, TSS_LIMIT, 0xb, 0)
        );
    }

    #[test]
    fn selectors_index_the_right_entries() {
        let t = gdt_table(0);
        assert_eq!(
            t[usize::from(KERNEL_CS >> 3)] >> 53 & 1,
            1,
            "CS is 64-bit code"
        );
        assert_eq!(
            t[usize::from(USER_CS >> 3)] >> 45 & 3,
            3,
            "user CS is DPL 3"
        );
        assert_eq!(
            t[usize::from(USER_DS >> 3)] >> 45 & 3,
            3,
            "user DS is DPL 3"
        );
    }
}
