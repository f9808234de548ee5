//! A guest kernel's evidence read with no guest CPU: its log (the printk
//! ring buffer) and the names of the code its vCPUs are in.
//!
//! How the log is found (docs/kernel-evidence.md):
//! - through the hooks `backdoor.ko` published: the kernel's vmcoreinfo
//!   names `prb` and the ring's layout; the ring's memory is in `kva:`
//!   hooks;
//! - through the VMM's forensic view of all RAM (forensic key): a vCPU's
//!   page tables (CR3, from the VMM's report) say where the kernel image
//!   is; a scan of the image alone finds its BTF (the ring's layout) and
//!   the ring buffer by its shape. Without usable page tables, a scan of
//!   all RAM finds the vmcoreinfo note, or the static ring. No symbols are
//!   needed.

pub mod btf;
pub mod kallsyms;
pub mod layout;
pub mod le;
pub mod memory;
pub mod printk;
pub mod symbols;
pub mod vmcoreinfo;

use backdoor_proto::Client;

use layout::PrintkLayout;
use memory::{
    DriverView, ForensicView, Image, Pointers, RamScan, Translation, KERNEL_HALF, KERNEL_MAP,
    KERNEL_MAP_END,
};
use printk::{KernelMemory, Log};
use symbols::Symbols;
use vmcoreinfo::Vmcoreinfo;

/// What an operator can add from the guest kernel's package.
#[derive(Debug, Default)]
pub struct KernelFiles {
    /// `System.map-<release>` (names the kernel code at each RIP).
    pub system_map: Option<Symbols>,
    /// BTF from the kernel's vmlinux.
    pub btf: Option<btf::Btf>,
    /// Scan all RAM, not the image the page tables show (for page tables
    /// the guest may have scribbled on).
    pub scan_all_ram: bool,
}

/// Where a log was found: enough to read it again without looking again
/// (`dmesg --follow`).
#[derive(Debug, Clone)]
pub struct RingAt {
    rb: u64,
    layout: PrintkLayout,
    /// The forensic view's translation; None: the driver's hooks.
    forensic: Option<Translation>,
}

/// The log, and how it was found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelLog {
    /// The records and the damage report.
    pub log: Log,
    /// `driver` or `forensic`.
    pub via: &'static str,
    /// Where the layout came from: `vmcoreinfo` or `btf`.
    pub layout_from: &'static str,
    /// The kernel release, where vmcoreinfo says it.
    pub release: Option<String>,
    /// The KASLR offset of the kernel's virtual addresses, where
    /// vmcoreinfo says it.
    pub kaslr_offset: Option<u64>,
    /// Where the kernel image's mapping starts (`_text`), where its page
    /// tables were read.
    pub image_start: Option<u64>,
    /// How the ring was found, in words.
    pub found: String,
    /// Where the scan saw what may be kallsyms' token table (physical).
    #[serde(skip)]
    pub kallsyms_hints: Vec<u64>,
    /// Where it is.
    #[serde(skip)]
    pub ring: RingAt,
}

/// The kernel's own symbols (kallsyms), decoded from its image in RAM
/// through the forensic view, where the scan that found `log` saw its
/// token table; checked against the page tables (`_text` is where the
/// image's mapping starts) or, without them, `linux_banner`'s text.
/// Returns the symbols and how they were checked.
pub fn kernel_symbols(c: &mut Client, log: &KernelLog) -> Result<(Symbols, String), String> {
    if !c.descriptor().hooks.iter().any(|h| h.kind == "forensic") {
        return Err("kernel symbols are read through the forensic view (--forensic)".into());
    }
    // A log read through the driver's hooks saw no image: find it now.
    let vcpus = if log.ring.forensic.is_none() {
        c.vcpus().ok()
    } else {
        None
    };
    let mut view = ForensicView::new(c).ok_or("this connection has no forensic view")?;
    let (hints, image_start) = match log.ring.forensic {
        Some(tr) => {
            view.tr = tr;
            (log.kallsyms_hints.clone(), log.image_start)
        }
        None => {
            let image = page_table_roots(vcpus.as_ref())
                .into_iter()
                .find_map(|(root, l5)| view.image_by_page_tables(root, l5).ok())
                .ok_or("no vCPU's page tables map the kernel image")?;
            let scan = view.scan(&image.runs, Pointers::Kernel)?;
            (scan.kallsyms, Some(image.start))
        }
    };
    let mut why = String::from("the scan saw no kallsyms token table");
    for &pa in &hints {
        let Some((start, len)) =
            view.ram_around(pa, kallsyms::SEARCH_BEFORE, kallsyms::SEARCH_AFTER)
        else {
            continue;
        };
        let w = view.read_phys(
            start,
            usize::try_from(len).map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?,
        )?;
        let list = match kallsyms::decode(&w, usize::try_from(pa - start).unwrap_or(0)) {
            Ok(l) => l,
            Err(e) => {
                why = format!("kallsyms at physical {pa:#x}: {e}");
                continue;
            }
        };
        let syms = Symbols::from_list(list);
        let checked = match (image_start, syms.address("_text")) {
            (Some(start), Some(text)) if start == text => {
                "_text is where the page tables map the image".to_owned()
            }
            (Some(start), text) => {
                why = format!("kallsyms at physical {pa:#x} puts _text at {text:#x?}, the page tables at {start:#x}");
                continue;
            }
            (None, _) => {
                let banner = syms
                    .address("linux_banner")
                    .ok_or("kallsyms names no linux_banner")?;
                if view.read(banner, 14).ok().as_deref() != Some(b"Linux version ") {
                    why = format!(
                        "kallsyms at physical {pa:#x}: linux_banner at {banner:#x} holds no banner"
                    );
                    continue;
                }
                "linux_banner holds the banner".to_owned()
            }
        };
        let how = format!("kallsyms in guest RAM, {} symbols ({checked})", syms.len());
        return Ok((syms, how));
    }
    Err(why)
}

/// Reads the log again where it was found.
pub fn reread(c: &mut Client, at: &RingAt) -> Result<Log, KernelError> {
    let mut driver;
    let mut forensic;
    let mem: &mut dyn KernelMemory = match at.forensic {
        None => {
            driver =
                DriverView::new(c).ok_or_else(|| missing("the driver's kernel hooks are gone"))?;
            &mut driver
        }
        Some(tr) => {
            forensic = ForensicView::new(c).ok_or(KernelError::NoWayIn)?;
            forensic.tr = tr;
            &mut forensic
        }
    };
    Ok(printk::read_log(mem, at.rb, &at.layout)?)
}

/// Why there is no log.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Neither way in is open.
    #[error(
        "no way into the guest kernel's memory: its driver published no kernel hooks \
         (backdoor.ko not loaded, or loaded with kernel_log=0), and this connection has no \
         forensic view (give --forensic with a key file holding the forensic key)"
    )]
    NoWayIn,
    /// Something needed is missing or unreadable.
    #[error("{0}")]
    Missing(String),
    /// The ring buffer could not be decoded at all.
    #[error(transparent)]
    Printk(#[from] printk::PrintkError),
}

fn missing(e: impl std::fmt::Display) -> KernelError {
    KernelError::Missing(e.to_string())
}

fn word(mem: &mut dyn KernelMemory, va: u64) -> Result<u64, KernelError> {
    let b = mem.read(va, 8).map_err(missing)?;
    Ok(u64::from_le_bytes(
        b.try_into().map_err(|_| missing("short read"))?,
    ))
}

/// Reads the kernel log of the target behind `c`, by whichever way in
/// this connection has.
pub fn kernel_log(c: &mut Client, files: &KernelFiles) -> Result<KernelLog, KernelError> {
    if let Some(mut view) = DriverView::new(c) {
        let v = view
            .vmcoreinfo()
            .map_err(|e| missing(format!("the driver's vmcoreinfo: {e}")))?;
        return from_vmcoreinfo(
            &mut view,
            &v,
            "driver",
            None,
            "vmcoreinfo from the driver's hook".into(),
        );
    }
    if !c.descriptor().hooks.iter().any(|h| h.kind == "forensic") {
        return Err(KernelError::NoWayIn);
    }
    // Where the vCPUs' page tables are (the VMM's report; none from an
    // agent that has no VMM report): the way to the image.
    let vcpus = c.vcpus().ok();
    let Some(mut view) = ForensicView::new(c) else {
        return Err(KernelError::NoWayIn);
    };
    forensic(&mut view, vcpus.as_ref(), files)
}

/// The page-table roots of the reported vCPUs, those in the kernel first:
/// (CR3 without its PCID bits, five-level paging). With page-table
/// isolation a vCPU in user mode has the user half of a pair of tables
/// (the odd page): its kernel half is tried first.
fn page_table_roots(vcpus: Option<&serde_json::Value>) -> Vec<(u64, bool)> {
    const LA57: u64 = 1 << 12;
    let mut cpus: Vec<&serde_json::Value> = vcpus
        .and_then(|v| v["vcpus"].as_array())
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    cpus.sort_by_key(|c| c["cpl"].as_u64() != Some(0));
    let mut roots = Vec::new();
    for c in cpus {
        let Some(cr3) = c["cr3"].as_u64() else {
            continue;
        };
        let l5 = c["cr4"].as_u64().is_some_and(|cr4| cr4 & LA57 != 0);
        let root = cr3 & 0x000f_ffff_ffff_f000;
        for r in [root & !0x1fff, root] {
            if !roots.contains(&(r, l5)) {
                roots.push((r, l5));
            }
        }
    }
    roots
}

/// The log through the forensic view: the image through a vCPU's page
/// tables and a scan of the image alone; failing that, a scan of all RAM
/// (for vmcoreinfo's note, or the static ring by its shape).
fn forensic(
    view: &mut ForensicView,
    vcpus: Option<&serde_json::Value>,
    files: &KernelFiles,
) -> Result<KernelLog, KernelError> {
    let mut why = None;
    let roots = if files.scan_all_ram {
        Vec::new()
    } else {
        page_table_roots(vcpus)
    };
    for (root, l5) in roots {
        let Ok(image) = view.image_by_page_tables(root, l5) else {
            continue;
        };
        if image.runs.is_empty() {
            continue;
        }
        let scan = view.scan(&image.runs, Pointers::Kernel).map_err(missing)?;
        match from_scan(view, &scan, files, Some(&image)) {
            Ok(log) => return Ok(log),
            Err(e) => why = Some(e),
        }
        break;
    }
    view.tr = Translation::default();
    let ram = view.all_ram();
    let scan = view.scan(&ram, Pointers::Image).map_err(missing)?;
    if let Some((pa, v)) = &scan.vmcoreinfo {
        view.use_vmcoreinfo(v).map_err(missing)?;
        let tr = Some(view.tr);
        let found = format!(
            "the vmcoreinfo note at physical {pa:#x}, by a scan of all {} MiB of RAM",
            scan.bytes >> 20
        );
        return from_vmcoreinfo(view, v, "forensic", tr, found);
    }
    from_scan(view, &scan, files, None).map_err(|e| match why {
        Some(first) => missing(format!("{first}; and in all of RAM: {e}")),
        None => e,
    })
}

fn from_vmcoreinfo(
    mem: &mut dyn KernelMemory,
    v: &Vmcoreinfo,
    via: &'static str,
    forensic: Option<Translation>,
    found: String,
) -> Result<KernelLog, KernelError> {
    let layout = PrintkLayout::from_vmcoreinfo(v).map_err(missing)?;
    let prb = v
        .symbol("prb")
        .ok_or_else(|| missing("vmcoreinfo names no prb"))?;
    let rb = word(mem, prb)?;
    Ok(KernelLog {
        log: printk::read_log(mem, rb, &layout)?,
        via,
        layout_from: "vmcoreinfo",
        release: v.osrelease().map(str::to_owned),
        kaslr_offset: v.kernel_offset(),
        image_start: None,
        found,
        kallsyms_hints: Vec::new(),
        ring: RingAt {
            rb,
            layout,
            forensic,
        },
    })
}

/// The kernel image is mapped in 2-MiB units: its virtual and physical
/// addresses differ by a multiple of this.
const IMAGE_ALIGN: u64 = 2 << 20;
/// How far from its `descs` array a ring's own header may lie: the static
/// ring and its arrays are defined together (printk.c, `DEFINE_PRINTKRB`).
const NEAR_STEPS: i64 = 4;
/// Largest BTF taken from guest RAM (Debian 6.1's is 4.2 MiB).
const MAX_BTF: u64 = 64 << 20;

/// The log from what a scan found: the layout from BTF (the operator's
/// vmlinux, else the image's own `.BTF` in RAM), the ring one of the
/// scan's candidates that is live (two small reads each), decoded whole;
/// the one with the most records is the log. With the image known, its
/// offset translates; without it (no page tables: a static ring only), the
/// image's offset is one of a few 2-MiB multiples near the ring's `descs`
/// pointer, and each is tried.
fn from_scan(
    view: &mut ForensicView,
    scan: &RamScan,
    files: &KernelFiles,
    image: Option<&Image>,
) -> Result<KernelLog, KernelError> {
    let (layout, layout_from) = match &files.btf {
        Some(b) => (PrintkLayout::from_btf(b).map_err(missing)?, "btf"),
        None => (layout_from_ram_btf(view, &scan.btf)?, "btf in guest RAM"),
    };
    let dr = layout.rb_desc_ring;
    if (
        dr + layout.dr_count_bits,
        dr + layout.dr_descs,
        dr + layout.dr_infos,
    ) != (0, 8, 16)
    {
        return Err(missing(
            "this kernel's printk_ringbuffer does not begin with count_bits, descs and infos: \
             the scan for its ring does not apply",
        ));
    }
    let tr = layout.rb_text_data_ring;
    let mut best: Option<(printk::Log, u64, u64)> = None;
    let mut live = 0usize;
    for (pa, head) in &scan.rings {
        let (Some(count_bits), Some(descs), Some(size_bits), Some(data)) = (
            le::u32_at(head, 0usize),
            le::u64_at(head, 8usize),
            le::u32_at(head, tr + layout.data_size_bits),
            le::u64_at(head, tr + layout.data_data),
        ) else {
            continue;
        };
        // A ring keeps about 2^5 bytes of text per descriptor (PRB_AVGBITS).
        if !(count_bits..=count_bits.saturating_add(10)).contains(&size_bits) || data < KERNEL_HALF
        {
            continue;
        }
        let deltas: Vec<u64> = match image {
            Some(i) => vec![i.delta],
            None => {
                let guess = descs.wrapping_sub(*pa) & !(IMAGE_ALIGN - 1);
                (-NEAR_STEPS..=NEAR_STEPS)
                    .map(|k| guess.wrapping_add_signed(k * IMAGE_ALIGN as i64))
                    .collect()
            }
        };
        for delta in deltas {
            let va = pa.wrapping_add(delta);
            if !(KERNEL_MAP..KERNEL_MAP_END).contains(&va) {
                continue;
            }
            view.tr.image_delta = delta;
            if !printk::head_is_live(view, va, &layout) {
                continue;
            }
            live += 1;
            if let Ok(log) = printk::read_log(view, va, &layout) {
                if best
                    .as_ref()
                    .is_none_or(|b| b.0.records.len() < log.records.len())
                {
                    best = Some((log, delta, va));
                }
            }
        }
    }
    let Some((log, delta, rb_va)) = best else {
        return Err(missing(format!(
            "no printk ring buffer in the {} bytes scanned: {} look-alike headers, {live} live, none decoded{}",
            scan.bytes,
            scan.rings.len(),
            if image.is_some() { "" } else { " (and no vmcoreinfo note: the kernel had not set it up)" }
        )));
    };
    view.tr.image_delta = delta;
    let found = match image {
        Some(i) => format!(
            "the page tables at {:#x} ({} MiB of kernel image scanned)",
            i.top_pgt,
            scan.bytes >> 20
        ),
        None => format!("a scan of all {} MiB of RAM", scan.bytes >> 20),
    };
    Ok(KernelLog {
        log,
        via: "forensic",
        layout_from,
        release: scan.release.clone(),
        kaslr_offset: None,
        image_start: image.map(|i| i.start),
        found,
        kallsyms_hints: scan.kallsyms.clone(),
        ring: RingAt {
            rb: rb_va,
            layout,
            forensic: Some(view.tr),
        },
    })
}

/// The printk layout from the first BTF in guest RAM that describes it
/// (the kernel image's own `.BTF`; a module's split BTF does not).
fn layout_from_ram_btf(view: &mut ForensicView, at: &[u64]) -> Result<PrintkLayout, KernelError> {
    let mut why = String::from("there is no BTF in guest RAM");
    for &pa in at {
        let Ok(h) = view.read_phys(pa, 24) else {
            continue;
        };
        let f = |i: usize| u64::from(le::u32_at(&h, i).unwrap_or_default());
        let len = 24 + (f(8) + f(12)).max(f(16) + f(20));
        if len > MAX_BTF {
            continue;
        }
        let Ok(b) = view.read_phys(pa, usize::try_from(len).unwrap_or(usize::MAX)) else {
            continue;
        };
        match btf::Btf::parse(&b)
            .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())
            .and_then(|b| {
                PrintkLayout::from_btf(&b).map_err(|e| backdoor_abi::ErrorChain(&e).to_string())
            }) {
            Ok(l) => return Ok(l),
            Err(e) => why = format!("the BTF at physical {pa:#x}: {e}"),
        }
    }
    Err(missing(format!(
        "the guest kernel has no vmcoreinfo yet (it died early) and {why}: give its vmlinux (--vmlinux) for the ring buffer's layout"
    )))
}
