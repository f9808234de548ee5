//! Two ways into a guest kernel's memory over the backdoor, neither using
//! the guest's CPU:
//!
//! - [`DriverView`]: the read-only hooks `backdoor.ko` published at load
//!   time: `vmcoreinfo` (the kernel's vmcoreinfo note) and `kva:<address>`
//!   regions named by the kernel virtual address they start at (the printk
//!   ring buffer and what holds it). Any read-role monitor can use it.
//! - [`ForensicView`]: the VMM's view of all guest RAM (`ram@<address>`
//!   hooks, forensic key only), with kernel virtual addresses translated
//!   here: kernel-image addresses by the image's offset, others by walking
//!   the kernel's own page tables.

use backdoor_proto::{Client, ClientError};

use super::kallsyms;
use super::le::u64_at;
use super::printk::{KernelMemory, MAX_COUNT_BITS};
use super::vmcoreinfo::Vmcoreinfo;

/// Where the kernel's half of the address space starts.
pub const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// The kernel image's virtual base (`__START_KERNEL_map`).
pub const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// The image's virtual window: 1 GiB from [`KERNEL_MAP`] (modules follow).
pub const KERNEL_MAP_END: u64 = 0xffff_ffff_c000_0000;
/// The largest read the agent answers; longer ones are split.
const CHUNK: u64 = backdoor_proto::wire::MAX_READ as u64;

fn read_hook(c: &mut Client, hook: u32, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::with_capacity(len);
    let chunk = u32::try_from(CHUNK).unwrap_or(u32::MAX);
    c.read_bulk(hook, offset, len as u64, chunk, 4, |b| {
        out.extend_from_slice(b)
    })?;
    Ok(out)
}

/// A hook covering `[start, start + len)` of some address space.
#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    len: u64,
    hook: u32,
}

fn covering(regions: &[Region], at: u64, len: u64) -> Option<(u32, u64)> {
    regions
        .iter()
        .find(|r| at >= r.start && at.checked_add(len).is_some_and(|e| e <= r.start + r.len))
        .map(|r| (r.hook, at - r.start))
}

/// The driver's published hooks.
#[derive(Debug)]
pub struct DriverView<'a> {
    client: &'a mut Client,
    vmcoreinfo: u32,
    regions: Vec<Region>,
}

impl<'a> DriverView<'a> {
    /// The view, if the guest's driver published its kernel hooks.
    pub fn new(client: &'a mut Client) -> Option<Self> {
        let d = client.descriptor();
        let kernel = d.hooks.iter().filter(|h| h.kind == "kernel");
        let mut vmcoreinfo = None;
        let mut regions = Vec::new();
        for h in kernel {
            if h.name == "vmcoreinfo" {
                vmcoreinfo = Some(h.id);
            } else if let Some(va) = h
                .name
                .strip_prefix("kva:")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
            {
                regions.push(Region {
                    start: va,
                    len: h.len,
                    hook: h.id,
                });
            }
        }
        Some(Self {
            vmcoreinfo: vmcoreinfo?,
            regions,
            client,
        })
    }

    /// The kernel's vmcoreinfo, from its hook.
    pub fn vmcoreinfo(&mut self) -> Result<Vmcoreinfo, String> {
        let b = read_hook(self.client, self.vmcoreinfo, 0, 4096)
            .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
        Vmcoreinfo::from_note(&b).map_err(|e| backdoor_abi::ErrorChain(&e).to_string())
    }
}

impl KernelMemory for DriverView<'_> {
    fn read(&mut self, va: u64, len: usize) -> Result<Vec<u8>, String> {
        let (hook, off) = covering(&self.regions, va, len as u64).ok_or_else(|| {
            format!("{len} bytes at {va:#x} lie in no region the guest's driver published")
        })?;
        read_hook(self.client, hook, off, len).map_err(|e| backdoor_abi::ErrorChain(&e).to_string())
    }
}

/// How kernel virtual addresses become guest-physical ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct Translation {
    /// PA = VA - image_delta inside the kernel image's window.
    pub image_delta: u64,
    /// The physical address of the kernel's top-level page table
    /// (`init_top_pgt`), for every other address.
    pub top_pgt: Option<u64>,
    /// Five-level paging.
    pub l5: bool,
    /// Bits of a page-table entry that are not address (the SME C-bit).
    pub sme_mask: u64,
}

/// What [`ForensicView::scan`] found, by guest-physical address.
#[derive(Debug, Default)]
pub struct RamScan {
    /// Bytes read.
    pub bytes: u64,
    /// The release its `Linux version` banner names.
    pub release: Option<String>,
    /// The first vmcoreinfo note that names `prb`.
    pub vmcoreinfo: Option<(u64, Vmcoreinfo)>,
    /// Where BTF headers start.
    pub btf: Vec<u64>,
    /// Where kallsyms' token table may be (its digits).
    pub kallsyms: Vec<u64>,
    /// Possible ring-buffer heads, with their first [`RING_COPY`] bytes.
    pub rings: Vec<(u64, Vec<u8>)>,
}

/// The release after `Linux version `: printable, up to the next space.
fn release(after: &[u8]) -> Option<String> {
    let end = after.iter().take(64).position(|&b| b == b' ')?;
    let r = &after[..end];
    (!r.is_empty() && r.iter().all(|b| b.is_ascii_graphic()))
        .then(|| String::from_utf8_lossy(r).into_owned())
}

/// A BTF header: magic 0xeb9f, version 1, no flags, 24 bytes long.
const BTF_HEADER: [u8; 8] = [0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
/// How far a chunk is read past its end for the scan's patterns.
const SCAN_OVERLAP: u64 = 256;
/// Bytes kept of each possible ring head (its whole header is shorter).
pub const RING_COPY: usize = 256;
/// Most matches of each kind kept: a guest can fill its RAM with them.
const MAX_FOUND: usize = 1 << 14;

/// Which kernel pointers a ring head found by the scan may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointers {
    /// Only into the kernel image: all that translates without the page
    /// tables (the static ring).
    Image,
    /// Anywhere in the kernel's half (the page tables are known: a ring
    /// in the direct map, as `log_buf_len=` makes, translates too).
    Kernel,
}

/// Whether `b` starts like a `struct printk_ringbuffer` (every kernel since
/// 5.10 begins it with `desc_ring.count_bits`, then the `descs` and `infos`
/// pointers): a plausible number of descriptor bits, zero padding, and two
/// distinct, aligned kernel pointers.
fn is_ring_head(b: &[u8], scope: Pointers) -> bool {
    let Some(h) = b.get(..24) else {
        return false;
    };
    let word = |i: usize| u64_at(h, i).unwrap_or_default();
    let bits = word(0);
    let (descs, infos) = (word(8), word(16));
    let ok = |p: u64| {
        p % 8 == 0
            && match scope {
                Pointers::Image => (KERNEL_MAP..KERNEL_MAP_END).contains(&p),
                Pointers::Kernel => p >= KERNEL_HALF,
            }
    };
    (4..=u64::from(MAX_COUNT_BITS)).contains(&bits) && ok(descs) && ok(infos) && descs != infos
}

/// The kernel image as its page tables map it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The virtual address its mapping starts at (`_text`: the kernel
    /// unmaps what lies before it, head64.c).
    pub start: u64,
    /// Virtual minus physical address, the same for all of the image.
    pub delta: u64,
    /// The physical runs it occupies: (address, length).
    pub runs: Vec<(u64, u64)>,
    /// The page-table root it was found through.
    pub top_pgt: u64,
    /// Five-level paging.
    pub l5: bool,
}

/// Most of the image's virtual window mapped by 4-KiB pages that are
/// walked (the rest of the image is 2-MiB pages).
const MAX_PAGE_TABLES: usize = 64;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
const PTE_PRESENT: u64 = 1;
const PTE_HUGE: u64 = 1 << 7;
const MIB2: u64 = 2 << 20;

/// Most page-table reads one translation may make.
const WALK_LEVELS: usize = 5;

/// All guest RAM through the VMM's forensic hooks.
#[derive(Debug)]
pub struct ForensicView<'a> {
    client: &'a mut Client,
    ram: Vec<Region>,
    /// How virtual addresses translate (set once known).
    pub tr: Translation,
}

impl<'a> ForensicView<'a> {
    /// The view, if this connection has the forensic role's hooks.
    pub fn new(client: &'a mut Client) -> Option<Self> {
        let ram: Vec<Region> = client
            .descriptor()
            .hooks
            .iter()
            .filter(|h| h.kind == "forensic")
            .filter_map(|h| {
                Some(Region {
                    start: u64::from_str_radix(h.name.strip_prefix("ram@")?, 16).ok()?,
                    len: h.len,
                    hook: h.id,
                })
            })
            .collect();
        (!ram.is_empty()).then_some(Self {
            client,
            ram,
            tr: Translation::default(),
        })
    }

    /// `len` bytes at guest-physical `pa`.
    pub fn read_phys(&mut self, pa: u64, len: usize) -> Result<Vec<u8>, String> {
        let (hook, off) = covering(&self.ram, pa, len as u64)
            .ok_or_else(|| format!("{len} bytes at physical {pa:#x} are not guest RAM"))?;
        read_hook(self.client, hook, off, len).map_err(|e| backdoor_abi::ErrorChain(&e).to_string())
    }

    fn phys_word(&mut self, pa: u64) -> Result<u64, String> {
        let b = self.read_phys(pa, 8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "short read")?))
    }

    /// The guest-physical address of kernel virtual address `va`.
    pub fn translate(&mut self, va: u64) -> Result<u64, String> {
        if (KERNEL_MAP..KERNEL_MAP_END).contains(&va) {
            return Ok(va.wrapping_sub(self.tr.image_delta));
        }
        let top = self.tr.top_pgt.ok_or_else(|| {
            format!("{va:#x} is outside the kernel image and the page tables are unknown")
        })?;
        let levels: &[u32] = if self.tr.l5 {
            &[48, 39, 30, 21, 12]
        } else {
            &[39, 30, 21, 12]
        };
        let addr_mask = 0x000f_ffff_ffff_f000 & !self.tr.sme_mask;
        let mut table = top;
        for (k, &shift) in levels.iter().enumerate().take(WALK_LEVELS) {
            let e = self.phys_word(table + ((va >> shift) & 511) * 8)?;
            if e & 1 == 0 {
                return Err(format!(
                    "{va:#x} is not mapped (level {} entry {e:#x})",
                    levels.len() - k
                ));
            }
            let huge = e & (1 << 7) != 0 && (shift == 30 || shift == 21);
            if huge || shift == 12 {
                let page = (1u64 << shift) - 1;
                return Ok((e & addr_mask & !page) | (va & page));
            }
            table = e & addr_mask;
        }
        Err(format!("{va:#x}: page walk did not end"))
    }

    /// Sets the translation from vmcoreinfo (`phys_base`, `init_top_pgt`).
    pub fn use_vmcoreinfo(&mut self, v: &Vmcoreinfo) -> Result<(), String> {
        let phys_base = v
            .number("phys_base")
            .ok_or("vmcoreinfo has no NUMBER(phys_base)")?;
        #[allow(clippy::cast_sign_loss)]
        let phys_base = phys_base as u64;
        self.tr.image_delta = KERNEL_MAP.wrapping_sub(phys_base);
        self.tr.l5 = v.number("pgtable_l5_enabled") == Some(1);
        #[allow(clippy::cast_sign_loss)]
        let sme = v.number("sme_mask").unwrap_or(0) as u64;
        self.tr.sme_mask = sme;
        self.tr.top_pgt = v
            .symbol("init_top_pgt")
            .map(|va| va.wrapping_sub(self.tr.image_delta));
        Ok(())
    }

    /// The guest RAM from `before` bytes below `pa` to `after` above it,
    /// clipped to the RAM range holding `pa`: (address, length).
    pub fn ram_around(&self, pa: u64, before: u64, after: u64) -> Option<(u64, u64)> {
        let r = self
            .ram
            .iter()
            .find(|r| (r.start..r.start + r.len).contains(&pa))?;
        let start = pa.saturating_sub(before).max(r.start);
        let end = pa.saturating_add(after).min(r.start + r.len);
        Some((start, end - start))
    }

    /// Every guest RAM range, as (address, length): what [`Self::scan`]
    /// covers when the kernel image could not be found.
    pub fn all_ram(&self) -> Vec<(u64, u64)> {
        self.ram.iter().map(|r| (r.start, r.len)).collect()
    }

    /// One pass over the physical `runs` (the kernel image, or all RAM)
    /// for what a kernel leaves in memory that needs no symbols to find:
    /// its `Linux version` banner, its vmcoreinfo note (a page-aligned ELF
    /// note, once set up; it lies outside the image), BTF headers (the
    /// image's `.BTF`), and structures shaped like the head of a printk
    /// ring buffer (`printk_rb_static`, or `printk_rb_dynamic`).
    pub fn scan(&mut self, runs: &[(u64, u64)], scope: Pointers) -> Result<RamScan, String> {
        const NOTE: &[u8] = b"VMCOREINFO\0";
        const BANNER: &[u8] = b"Linux version ";
        let mut found = RamScan::default();
        for &(start, len) in runs {
            let end = start + len;
            let mut at = start;
            while at < end {
                let n = usize::try_from((end - at).min(CHUNK))
                    .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
                // A little past the chunk, so that nothing straddling its end
                // is missed; matches are taken only where they start inside.
                let with = (end - at).min(CHUNK + SCAN_OVERLAP);
                let chunk = self.read_phys(
                    at,
                    usize::try_from(with).map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?,
                )?;
                let pa = |i: usize| at + i as u64;
                found.bytes += n as u64;
                for (i, page) in chunk[..n].chunks(4096).enumerate() {
                    if found.vmcoreinfo.is_none()
                        && page.get(..4) == Some(&11u32.to_le_bytes())
                        && page.get(12..23) == Some(NOTE)
                    {
                        if let Ok(v) = Vmcoreinfo::from_note(page) {
                            if v.symbol("prb").is_some() {
                                found.vmcoreinfo = Some((pa(4096 * i), v));
                            }
                        }
                    }
                }
                if found.release.is_none() {
                    found.release = memchr::memmem::find_iter(&chunk, BANNER)
                        .take_while(|&i| i < n)
                        .find_map(|i| release(&chunk[i + BANNER.len()..]));
                }
                let btf_at = memchr::memmem::find_iter(&chunk, &BTF_HEADER)
                    .take_while(|&i| i < n)
                    .take(MAX_FOUND - found.btf.len());
                found.btf.extend(btf_at.map(pa));
                let digits_at = memchr::memmem::find_iter(&chunk, kallsyms::DIGITS)
                    .take_while(|&i| i < n)
                    .take(MAX_FOUND - found.kallsyms.len());
                found.kallsyms.extend(digits_at.map(pa));
                for i in (0..n).step_by(8) {
                    // The first byte alone rules out most words, cheaply.
                    let bits = u32::from(chunk[i]);
                    if (4..=MAX_COUNT_BITS).contains(&bits)
                        && found.rings.len() < MAX_FOUND
                        && is_ring_head(&chunk[i..], scope)
                    {
                        let copy = &chunk[i..(i + RING_COPY).min(chunk.len())];
                        found.rings.push((pa(i), copy.to_vec()));
                    }
                }
                at += n as u64;
            }
        }
        Ok(found)
    }

    /// Finds the kernel image through the page tables at `cr3` (a vCPU's,
    /// as the VMM reported it): the page directory of the image's window
    /// (`level2_kernel_pgt`) maps exactly the image, at one offset. Sets
    /// the translation to use it; a few page-sized reads.
    pub fn image_by_page_tables(&mut self, cr3: u64, l5: bool) -> Result<Image, String> {
        let top = cr3 & PTE_ADDR;
        let mut table = top;
        let path: &[u64] = if l5 { &[511, 511, 510] } else { &[511, 510] };
        for &i in path {
            let e = self.phys_word(table + i * 8)?;
            if e & PTE_PRESENT == 0 || e & PTE_HUGE != 0 {
                return Err(format!(
                    "the page tables at {top:#x} do not map the kernel image's window (entry {e:#x})"
                ));
            }
            table = e & PTE_ADDR;
        }
        let pd = self.read_phys(table, 4096)?;
        let entry = |b: &[u8], i: usize| u64_at(b, i * 8).unwrap_or_default();
        let mut maps: Vec<(u64, u64, u64)> = Vec::new();
        let mut tables = 0;
        for i in 0..512 {
            let e = entry(&pd, i);
            let va = KERNEL_MAP + (i as u64) * MIB2;
            if e & PTE_PRESENT == 0 {
                continue;
            }
            if e & PTE_HUGE != 0 {
                maps.push((va, e & PTE_ADDR & !(MIB2 - 1), MIB2));
                continue;
            }
            tables += 1;
            if tables > MAX_PAGE_TABLES {
                return Err(format!(
                    "more than {MAX_PAGE_TABLES} page tables in the kernel image's window"
                ));
            }
            let pt = self.read_phys(e & PTE_ADDR, 4096)?;
            for j in 0..512 {
                let p = entry(&pt, j);
                if p & PTE_PRESENT != 0 {
                    maps.push((va + (j as u64) * 4096, p & PTE_ADDR, 4096));
                }
            }
        }
        let &(start, first_pa, _) = maps.first().ok_or_else(|| {
            format!("the page tables at {top:#x} map nothing of the kernel image's window")
        })?;
        let delta = start.wrapping_sub(first_pa);
        // The image is one linear mapping; a page elsewhere (a fixmap, a
        // guest's scribble) is not part of it.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (va, pa, len) in maps {
            if va.wrapping_sub(pa) != delta || covering(&self.ram, pa, len).is_none() {
                continue;
            }
            match runs.last_mut() {
                Some((s, l)) if *s + *l == pa => *l += len,
                _ => runs.push((pa, len)),
            }
        }
        self.tr = Translation {
            image_delta: delta,
            top_pgt: Some(top),
            l5,
            sme_mask: 0,
        };
        Ok(Image {
            start,
            delta,
            runs,
            top_pgt: top,
            l5,
        })
    }
}

impl KernelMemory for ForensicView<'_> {
    fn read(&mut self, va: u64, len: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(len);
        let mut at = va;
        let end = va.checked_add(len as u64).ok_or("address overflow")?;
        while at < end {
            // Inside the image the mapping is linear; elsewhere page by page.
            let step = if (KERNEL_MAP..KERNEL_MAP_END).contains(&at) {
                end.min(KERNEL_MAP_END) - at
            } else {
                (end - at).min(4096 - (at & 4095))
            };
            let pa = self.translate(at)?;
            out.extend(self.read_phys(
                pa,
                usize::try_from(step).map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?,
            )?);
            at += step;
        }
        Ok(out)
    }
}
