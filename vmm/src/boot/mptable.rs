//! The Intel MultiProcessor Specification (1.4) table that tells Linux
//! where its interrupt controllers are and how many CPUs it has.
//!
//! Without it (and without ACPI) Linux finds no IO-APIC, falls back to
//! "virtual wire" mode, gets no timer or serial interrupts past
//! `Calibrating delay loop`, and boots with `smpboot: SMP disabled`.
//!
//! Why an MP table and not ACPI: it is the smallest table set that gives a
//! Linux guest its LAPICs, the IO-APIC and the ISA interrupt routing, with
//! no AML and no FADT describing power-management hardware bdvmm does not
//! have; Firecracker booted Linux with exactly this for years. What it
//! cannot say (PCI, power buttons, sleep states) bdvmm does not offer.
//!
//! Layout, written at [`crate::layout::MPTABLE_ADDR`] (the start of the EBDA,
//! the first place Linux's `smp_scan_config` looks): the 16-byte floating
//! pointer, then the configuration table header and its entries: one
//! processor per vCPU, the ISA bus, the IO-APIC, ISA IRQs 0–15 on IO-APIC
//! pins 0–15 (KVM's default GSI routing), ExtINT on LINT0 and NMI on LINT1.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where KVM's in-kernel LAPICs are mapped.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Where KVM's in-kernel IO-APIC is mapped.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// ISA interrupts routed through the IO-APIC, one pin each.
pub const ISA_IRQS: u8 = 16;
/// The LAPIC version KVM's in-kernel LAPIC reports.
const LAPIC_VERSION: u8 = 0x14;
/// The IO-APIC version KVM's in-kernel IO-APIC reports.
const IOAPIC_VERSION: u8 = 0x11;
/// MP specification revision 1.4.
const SPEC_REV: u8 = 4;

const FLOATING_POINTER_LEN: u32 = 16;
const HEADER_LEN: usize = 44;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOT_PROCESSOR: u8 = 1 << 1;
/// Family 6, model 0, stepping 0: Linux reads only the flags below.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Polarity and trigger "conform to the bus": edge, active high on ISA.
const INT_FLAGS_CONFORMING: u16 = 0;
const ISA_BUS_ID: u8 = 0;
/// "All local APICs" as a destination.
const ALL_LAPICS: u8 = 0xff;

/// Errors while writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// The table format has one byte for an APIC ID.
    #[error("an MP table describes at most 254 CPUs, not {0}")]
    TooManyCpus(u8),
    /// The guest's RAM does not hold the table.
    #[error("cannot write the MP table into guest memory")]
    GuestWrite(#[source] vm_memory::GuestMemoryError),
}

/// The IO-APIC's ID: after every LAPIC ID, as on real machines.
pub fn ioapic_id(ncpus: u8) -> u8 {
    ncpus
}

/// An I/O or local interrupt assignment entry: ISA interrupt `source_irq`
/// (local: unused) goes to pin `pin` of APIC `dest`.
fn interrupt(entry: u8, kind: u8, source_irq: u8, dest: u8, pin: u8) -> [u8; 8] {
    let [f0, f1] = INT_FLAGS_CONFORMING.to_le_bytes();
    [entry, kind, f0, f1, ISA_BUS_ID, source_irq, dest, pin]
}

/// Sets the checksum byte at `at` so that the bytes of `s` sum to 0.
fn checksum(s: &mut [u8], at: usize) {
    s[at] = 0;
    let sum = s.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    s[at] = sum.wrapping_neg();
}

/// The table's bytes for `ncpus` CPUs, to be placed at guest address `at`.
pub fn build(ncpus: u8, at: u32) -> Result<Vec<u8>, MpTableError> {
    if ncpus == 0 || ncpus > 254 {
        return Err(MpTableError::TooManyCpus(ncpus));
    }
    let ioapic = ioapic_id(ncpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..ncpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        entries.extend_from_slice(&interrupt(
            ENTRY_IO_INTERRUPT,
            INT_VECTORED,
            irq,
            ioapic,
            irq,
        ));
        count += 1;
    }
    for (kind, lint) in [(INT_EXTINT, 0), (INT_NMI, 1)] {
        entries.extend_from_slice(&interrupt(ENTRY_LOCAL_INTERRUPT, kind, 0, ALL_LAPICS, lint));
        count += 1;
    }

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&u16::try_from(table_len).unwrap_or(u16::MAX).to_le_bytes());
    header.extend_from_slice(&[SPEC_REV, 0]);
    header.extend_from_slice(b"BDVMM   ");
    header.extend_from_slice(b"backdoor-vmm");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // no extended table
    header.extend_from_slice(&entries);
    checksum(&mut header, 7);

    let table_at = at + FLOATING_POINTER_LEN;
    let mut out = Vec::with_capacity(16 + table_len);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_at.to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    checksum(&mut out, 10);
    out.extend_from_slice(&header);
    Ok(out)
}

/// Writes the table for `ncpus` CPUs at [`crate::layout::MPTABLE_ADDR`].
pub fn write(mem: &GuestMemoryMmap, ncpus: u8) -> Result<(), MpTableError> {
    let at = crate::layout::MPTABLE_ADDR;
    let bytes = build(ncpus, u32::try_from(at).unwrap_or(u32::MAX))?;
    mem.write_slice(&bytes, GuestAddress(at))
        .map_err(MpTableError::GuestWrite)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(s: &[u8]) -> u8 {
        s.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u16_at(s: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([s[o], s[o + 1]])
    }

    fn u32_at(s: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(s[o..o + 4].try_into().unwrap())
    }

    /// Walks the table as Linux's `smp_read_mpc` does: (type, bytes) per entry.
    fn entries(t: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut o = HEADER_LEN;
        while o < t.len() {
            let len = if t[o] == ENTRY_PROCESSOR { 20 } else { 8 };
            out.push((t[o], &t[o..o + len]));
            o += len;
        }
        out
    }

    #[test]
    fn floating_pointer_and_table_checksum_to_zero_and_point_at_each_other() {
        let at = 0x9fc00;
        let b = build(2, at).unwrap();
        let (fp, table) = b.split_at(16);
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(u32_at(fp, 4), at + 16, "physical address of the table");
        assert_eq!((fp[8], fp[9]), (1, SPEC_REV), "16 bytes long, revision 1.4");
        assert_eq!(fp[11], 0, "feature byte 1 = 0: a table is present");
        assert_eq!(sum(fp), 0);
        assert_eq!(&table[..4], b"PCMP");
        assert_eq!(usize::from(u16_at(table, 4)), table.len());
        assert_eq!(sum(table), 0);
        assert_eq!(u32_at(table, 36), LAPIC_ADDR);
        assert_eq!(
            usize::from(u16_at(table, 34)),
            entries(table).len(),
            "entry count"
        );
    }

    #[test]
    fn every_cpu_is_listed_once_with_the_first_as_boot_processor() {
        for n in [1u8, 2, 4, 64] {
            let b = build(n, 0x9fc00).unwrap();
            let cpus: Vec<_> = entries(&b[16..])
                .into_iter()
                .filter(|(t, _)| *t == ENTRY_PROCESSOR)
                .map(|(_, e)| (e[1], e[3]))
                .collect();
            let want: Vec<_> = (0..n).map(|i| (i, if i == 0 { 3 } else { 1 })).collect();
            assert_eq!(cpus, want);
        }
    }

    #[test]
    fn isa_irqs_reach_the_ioapic_pin_of_the_same_number_and_lint_pins_are_wired() {
        let b = build(2, 0x9fc00).unwrap();
        let e = entries(&b[16..]);
        let ioapic: Vec<_> = e.iter().filter(|(t, _)| *t == ENTRY_IOAPIC).collect();
        assert_eq!(ioapic.len(), 1);
        let io = ioapic[0].1;
        assert_eq!((io[1], io[3], u32_at(io, 4)), (2, 1, IOAPIC_ADDR));
        let routes: Vec<_> = e
            .iter()
            .filter(|(t, _)| *t == ENTRY_IO_INTERRUPT)
            .map(|(_, x)| (x[5], x[6], x[7]))
            .collect();
        assert_eq!(routes, (0..16).map(|i| (i, 2, i)).collect::<Vec<_>>());
        let lints: Vec<_> = e
            .iter()
            .filter(|(t, _)| *t == ENTRY_LOCAL_INTERRUPT)
            .map(|(_, x)| (x[1], x[6], x[7]))
            .collect();
        assert_eq!(
            lints,
            [(INT_EXTINT, ALL_LAPICS, 0), (INT_NMI, ALL_LAPICS, 1)]
        );
        let buses: Vec<_> = e.iter().filter(|(t, _)| *t == ENTRY_BUS).collect();
        assert_eq!(&buses[0].1[2..8], b"ISA   ");
    }

    #[test]
    fn cpu_counts_the_format_cannot_hold_are_refused() {
        assert!(matches!(build(0, 0), Err(MpTableError::TooManyCpus(0))));
        assert!(matches!(build(255, 0), Err(MpTableError::TooManyCpus(255))));
        assert!(build(254, 0x9fc00).unwrap().len() < 0x400 * 8);
    }

    #[test]
    fn the_table_fits_in_the_ebda_for_every_vcpu_count_bdvmm_allows() {
        let b = build(254, 0x9fc00).unwrap();
        let ebda = crate::layout::HIMEM_START - crate::layout::MPTABLE_ADDR;
        assert!((b.len() as u64) < ebda, "{} bytes", b.len());
    }
}
