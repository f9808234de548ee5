//! The boot identity map: PML4 → one PDPT → 2-MiB pages.
//!
//! 1-GiB pages would need fewer tables, but PVM hosts hide PDPE1GB and a
//! guest using them triple-faults on its first instruction.

use crate::layout::{IDENTITY_MAP_GIB, PDPT_ADDR, PD_ADDR};

/// Present.
pub const PTE_P: u64 = 1 << 0;
/// Writable.
pub const PTE_RW: u64 = 1 << 1;
/// User-accessible: needed so ring-3 test guests can use the map.
pub const PTE_US: u64 = 1 << 2;
/// Page size: in a page directory, a 2-MiB page.
pub const PTE_PS: u64 = 1 << 7;

const ENTRIES: usize = 512;
const TWO_MIB: u64 = 2 << 20;

/// The page-table pages of the identity map, each 4 KiB.
#[derive(Debug)]
pub struct IdentityMap {
    /// PML4 (one entry used).
    pub pml4: [u64; ENTRIES],
    /// PDPT (one entry per mapped GiB).
    pub pdpt: [u64; ENTRIES],
    /// Page directories, one per mapped GiB.
    pub pds: Vec<[u64; ENTRIES]>,
}

impl IdentityMap {
    /// Builds a map of the first [`IDENTITY_MAP_GIB`] GiB.
    pub fn new() -> Self {
        let flags = PTE_P | PTE_RW | PTE_US;
        let mut pml4 = [0; ENTRIES];
        pml4[0] = PDPT_ADDR | flags;
        let mut pdpt = [0; ENTRIES];
        let mut pds = Vec::new();
        for (gib, entry) in (0..IDENTITY_MAP_GIB).zip(pdpt.iter_mut()) {
            *entry = (PD_ADDR + gib * 0x1000) | flags;
            let mut pd = [0; ENTRIES];
            for (i, e) in pd.iter_mut().enumerate() {
                *e = ((gib << 30) + i as u64 * TWO_MIB) | flags | PTE_PS;
            }
            pds.push(pd);
        }
        Self { pml4, pdpt, pds }
    }

    /// Translates an address the way the MMU would walk these tables.
    pub fn translate(&self, va: u64) -> Option<u64> {
        let l4 = self.pml4[((va >> 39) & 0x1ff) as usize];
        if l4 & PTE_P == 0 || l4 & !0xfff != PDPT_ADDR {
            return None;
        }
        let l3 = self.pdpt[((va >> 30) & 0x1ff) as usize];
        if l3 & PTE_P == 0 {
            return None;
        }
        let index = usize::try_from(((l3 & !0xfff).checked_sub(PD_ADDR)?) / 0x1000).ok()?;
        let pd = self.pds.get(index)?;
        let l2 = pd[((va >> 21) & 0x1ff) as usize];
        if l2 & PTE_P == 0 || l2 & PTE_PS == 0 {
            return None;
        }
        Some((l2 & !(TWO_MIB - 1) & 0x000f_ffff_ffff_f000) | (va & (TWO_MIB - 1)))
    }
}

impl Default for IdentityMap {
    fn default() -> Self {
        Self::new()
    }
}

/// Serializes one table page, little-endian.
pub fn page_bytes(table: &[u64; ENTRIES]) -> Vec<u8> {
    table.iter().flat_map(|e| e.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mapped_address_maps_to_itself() {
        let m = IdentityMap::new();
        for va in [
            0,
            0x1000,
            0x20_0000,
            0x1234_5678,
            0xb000_0000,
            0xd000_0000,
            0xffff_fff8,
        ] {
            assert_eq!(m.translate(va), Some(va), "{va:#x}");
        }
        assert_eq!(m.translate(4 << 30), None, "beyond the map");
    }

    #[test]
    fn entries_use_2mib_pages_and_never_1gib_pages() {
        let m = IdentityMap::new();
        assert_eq!(m.pds.len(), 4);
        for e in m.pdpt.iter().filter(|e| **e & PTE_P != 0) {
            assert_eq!(e & PTE_PS, 0, "a 1-GiB page would triple-fault on PVM");
        }
        // The documented encoding of a 2-MiB PDE: address | PS | U/S | RW | P.
        assert_eq!(m.pds[0][1], 0x20_0000 | 0x87);
        assert_eq!(m.pds[3][511], 0xffe0_0000 | 0x87);
        assert_eq!(m.pml4[0], PDPT_ADDR | 0x7);
    }
}
