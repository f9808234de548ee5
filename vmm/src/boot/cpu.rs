//! Per-vCPU architectural state at boot: CPUID, MSRs, FPU, LAPIC, and the
//! registers for the 64-bit entry of a Linux kernel or a test guest.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{self, KERNEL_CS, KERNEL_DS, TSS_SEL, USER_CS, USER_DS};
use super::paging::{self, IdentityMap};
use crate::layout;

/// Errors while setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("cannot set vCPU {vcpu} {what}")]
    Ioctl {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error(
        "KVM accepted only {set} of {total} boot MSRs on vCPU {vcpu} (first refused: {refused:#x})"
    )]
    Msrs {
        vcpu: u8,
        set: usize,
        total: usize,
        refused: u32,
    },
    /// Writing boot tables into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    GuestWrite {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// Privilege level at which a test guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Ring {
    /// Kernel mode (emulated on PVM hosts, about 1 µs per instruction).
    Zero,
    /// User mode (native speed on PVM hosts).
    Three,
}

/// How a vCPU enters the guest.
#[derive(Debug, Clone, Copy)]
pub enum Entry {
    /// Linux 64-bit boot protocol: RSI points at the zero page. Only the
    /// boot vCPU runs; the others wait for INIT/SIPI from the kernel.
    Linux {
        /// 64-bit entry point.
        rip: u64,
        /// The zero page.
        zero_page: u64,
    },
    /// Test guest: every vCPU starts at `rip` with RDI = index,
    /// RSI = vCPU count, RDX = RAM size, RCX = backdoor device base.
    TestGuest {
        /// ELF entry point.
        rip: u64,
        /// Starting privilege level.
        ring: Ring,
        /// Guest RAM in bytes.
        ram: u64,
        /// Backdoor device base (RCX), 0 if none.
        backdoor: u64,
    },
}

const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const RFLAGS_RESERVED: u64 = 1 << 1;
/// RFLAGS.IOPL = 3: ring-3 code may use every port without consulting the
/// TSS I/O bitmap.
const RFLAGS_IOPL3: u64 = 3 << 12;

/// Writes the GDT, TSS and identity-map page tables, shared by all vCPUs.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let write = |what, bytes: &[u8], addr| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| CpuError::GuestWrite { what, source })
    };
    let table = gdt::gdt_table(layout::TSS_BASE);
    write("the GDT", &gdt::gdt_bytes(&table), layout::GDT_ADDR)?;
    // A TSS whose I/O permission bitmap allows every port: ring-3 test
    // guests need port I/O, and PVM hosts do not honour RFLAGS.IOPL.
    let mut tss = vec![0u8; gdt::TSS_SIZE as usize];
    tss[102..104].copy_from_slice(&gdt::TSS_IOMAP_BASE.to_le_bytes());
    // The bitmap must be followed by one all-ones byte.
    tss[gdt::TSS_SIZE as usize - 1] = 0xff;
    write("the TSS", &tss, layout::TSS_ADDR)?;
    let map = IdentityMap::new();
    write(
        "the PML4",
        &paging::page_bytes(&map.pml4),
        layout::PML4_ADDR,
    )?;
    write(
        "the PDPT",
        &paging::page_bytes(&map.pdpt),
        layout::PDPT_ADDR,
    )?;
    for (i, pd) in map.pds.iter().enumerate() {
        write(
            "a page directory",
            &paging::page_bytes(pd),
            layout::PD_ADDR + i as u64 * 0x1000,
        )?;
    }
    Ok(())
}

/// The long-mode special registers for `ring`.
pub fn long_mode_sregs(mut sregs: kvm_sregs, ring: Ring) -> kvm_sregs {
    let table = gdt::gdt_table(layout::TSS_BASE);
    let (cs_sel, ds_sel) = match ring {
        Ring::Zero => (KERNEL_CS, KERNEL_DS),
        Ring::Three => (USER_CS, USER_DS),
    };
    let cs = gdt::kvm_segment(table[usize::from(cs_sel >> 3)], cs_sel);
    let ds = gdt::kvm_segment(table[usize::from(ds_sel >> 3)], ds_sel);
    sregs.cs = cs;
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = gdt::kvm_segment(table[usize::from(TSS_SEL >> 3)], TSS_SEL);
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = gdt::GDT_LIMIT;
    // No IDT: an exception in a test guest is a triple fault, reported as such.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at entry.
pub fn entry_regs(entry: Entry, vcpu: u8, nvcpus: u8) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match entry {
        Entry::Linux { rip, zero_page } => {
            regs.rip = rip;
            regs.rsi = zero_page;
            regs.rsp = layout::BOOT_STACK_TOP;
            regs.rbp = layout::BOOT_STACK_TOP;
        }
        Entry::TestGuest {
            rip,
            ram,
            backdoor,
            ring,
        } => {
            // Ring-3 test guests need port I/O. Hardware and nested SVM
            // honour IOPL; PVM ignores it and uses the TSS I/O bitmap
            // (write_boot_tables), which QEMU's emulated SVM in turn
            // refuses because the TSS it is given is marked busy. Both
            // together work on all three.
            if ring == Ring::Three {
                regs.rflags |= RFLAGS_IOPL3;
            }
            regs.rip = rip;
            regs.rdi = u64::from(vcpu);
            regs.rsi = u64::from(nvcpus);
            regs.rdx = ram;
            regs.rcx = backdoor;
        }
    }
    regs
}

/// The MSRs every vCPU starts with (as a BIOS would leave them).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    const IA32_TSC: u32 = 0x10;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(IA32_SYSENTER_CS, 0),
        e(IA32_SYSENTER_ESP, 0),
        e(IA32_SYSENTER_EIP, 0),
        e(STAR, 0),
        e(CSTAR, 0),
        e(KERNEL_GS_BASE, 0),
        e(SYSCALL_MASK, 0),
        e(LSTAR, 0),
        e(IA32_TSC, 0),
        e(IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
}

/// Adapts the host's supported CPUID to one vCPU: its APIC ID and the
/// vCPU count, and the hypervisor bit.
pub fn vcpu_cpuid(base: &CpuId, vcpu: u8, nvcpus: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(vcpu) << 24) | (u32::from(nvcpus) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if nvcpus > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                }
            }
            0xb | 0x1f => e.edx = u32::from(vcpu),
            _ => {}
        }
    }
    cpuid
}

/// Applies CPUID, MSRs, FPU, LAPIC LINT pins and registers to one vCPU.
pub fn configure(
    fd: &VcpuFd,
    vcpu: u8,
    nvcpus: u8,
    base_cpuid: &CpuId,
    entry: Entry,
) -> Result<(), CpuError> {
    let ioctl = |what| move |source| CpuError::Ioctl { vcpu, what, source };
    fd.set_cpuid2(&vcpu_cpuid(base_cpuid, vcpu, nvcpus))
        .map_err(ioctl("CPUID"))?;
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).expect("boot MSR list is small");
    let set = fd.set_msrs(&msrs).map_err(ioctl("MSRs"))?;
    if set != entries.len() {
        return Err(CpuError::Msrs {
            vcpu,
            set,
            total: entries.len(),
            refused: entries[set].index,
        });
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(ioctl("FPU"))?;
    set_lint(fd).map_err(ioctl("LAPIC"))?;

    let runs_now = match entry {
        Entry::Linux { .. } => vcpu == 0,
        Entry::TestGuest { .. } => true,
    };
    if runs_now {
        let ring = match entry {
            Entry::Linux { .. } => Ring::Zero,
            Entry::TestGuest { ring, .. } => ring,
        };
        let sregs = fd.get_sregs().map_err(ioctl("special registers"))?;
        fd.set_sregs(&long_mode_sregs(sregs, ring))
            .map_err(ioctl("special registers"))?;
        fd.set_regs(&entry_regs(entry, vcpu, nvcpus))
            .map_err(ioctl("registers"))?;
        if vcpu != 0 {
            // Application processors would otherwise wait for INIT/SIPI.
            fd.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(ioctl("MP state"))?;
        }
    }
    Ok(())
}

/// Local APIC LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as a BIOS would.
fn set_lint(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DM_EXTINT: u32 = 0x700;
    const DM_NMI: u32 = 0x400;
    let mut lapic = fd.get_lapic()?;
    let mut set = |off: usize, mode: u32| {
        let mut raw = [0u8; 4];
        for (b, r) in raw.iter_mut().zip(&lapic.regs[off..off + 4]) {
            *b = r.to_ne_bytes()[0];
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | mode;
        for (r, b) in lapic.regs[off..off + 4].iter_mut().zip(v.to_le_bytes()) {
            *r = std::os::raw::c_char::from_ne_bytes([b]);
        }
    };
    set(APIC_LVT0, DM_EXTINT);
    set(APIC_LVT1, DM_NMI);
    fd.set_lapic(&lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring3_entry_uses_user_selectors() {
        let s = long_mode_sregs(kvm_sregs::default(), Ring::Three);
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (USER_CS, 3, 1));
        assert_eq!((s.ss.selector, s.ss.dpl), (USER_DS, 3));
        let r = entry_regs(
            Entry::TestGuest {
                rip: 0x20_0000,
                ring: Ring::Three,
                ram: 64 << 20,
                backdoor: 0xb000_0000,
            },
            2,
            4,
        );
        assert_eq!(
            (r.rip, r.rdi, r.rsi, r.rdx, r.rcx),
            (0x20_0000, 2, 4, 64 << 20, 0xb000_0000)
        );
        assert_eq!(
            r.rflags,
            2 | 3 << 12,
            "interrupts off; port access from IOPL 3 (and the TSS bitmap, for PVM)"
        );
    }

    #[test]
    fn ring0_test_guests_and_linux_get_no_iopl() {
        for entry in [
            Entry::TestGuest {
                rip: 0x20_0000,
                ring: Ring::Zero,
                ram: 64 << 20,
                backdoor: 0,
            },
            Entry::Linux {
                rip: 0x100_0000,
                zero_page: 0x7000,
            },
        ] {
            assert_eq!(entry_regs(entry, 0, 1).rflags, 2, "{entry:?}");
        }
    }

    #[test]
    fn long_mode_is_enabled_with_paging_on_our_tables() {
        let s = long_mode_sregs(kvm_sregs::default(), Ring::Zero);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.cr3, layout::PML4_ADDR);
        assert_eq!(
            (s.cs.selector, s.ds.selector),
            (0x10, 0x18),
            "Linux __BOOT_CS/__BOOT_DS"
        );
    }

    #[test]
    fn linux_entry_passes_the_zero_page_in_rsi() {
        let r = entry_regs(
            Entry::Linux {
                rip: 0x100200,
                zero_page: 0x7000,
            },
            0,
            1,
        );
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100200, 0x7000, 2));
    }
}
