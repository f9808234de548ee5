//! `bdctl dmesg` and `bdctl evidence`: a guest kernel's log and an
//! evidence bundle, read over the backdoor with no guest CPU.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use backdoor_proto::Role;

use crate::cli::{DmesgArgs, EvidenceArgs, KernelArgs};
use crate::evidence::{self, EvidenceOptions};
use crate::kernel::btf::Btf;
use crate::kernel::symbols::Symbols;
use crate::kernel::{kernel_log, reread, KernelFiles};
use crate::Error;

/// Largest System.map or vmlinux read (Debian's vmlinux is about 65 MB).
const MAX_FILE: u64 = 512 << 20;

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::Usage(format!("{what} {}: {e}", path.display())))?
        .len();
    if len > MAX_FILE {
        return Err(Error::Usage(format!(
            "{what} {} is larger than {MAX_FILE} bytes",
            path.display()
        )));
    }
    std::fs::read(path).map_err(|e| Error::Usage(format!("{what} {}: {e}", path.display())))
}

/// The System.map and BTF an operator gave.
pub fn kernel_files(k: &KernelArgs) -> Result<KernelFiles, Error> {
    let system_map = match &k.system_map {
        Some(p) => {
            let text = read_file(p, "System.map")?;
            let map = Symbols::from_system_map(&String::from_utf8_lossy(&text));
            // Debian's linux-image packages ship a one-line placeholder
            // (the real map is in the -dbg package): say so, not "no symbol".
            if map.address("_text").is_none() {
                return Err(Error::Usage(format!(
                    "{} is not a kernel's System.map (it names no _text){}",
                    p.display(),
                    if String::from_utf8_lossy(&text).contains("real System.map is in") {
                        ": it is the placeholder Debian ships; the real one is in the kernel's -dbg package"
                    } else {
                        ""
                    }
                )));
            }
            Some(map)
        }
        None => None,
    };
    let btf = match &k.vmlinux {
        Some(p) => Some(
            Btf::from_vmlinux(&read_file(p, "vmlinux")?)
                .map_err(|e| Error::Usage(format!("{}: {e}", p.display())))?,
        ),
        None => None,
    };
    Ok(KernelFiles {
        system_map,
        btf,
        scan_all_ram: k.scan_all_ram,
    })
}

/// What `evidence` and `watch --evidence-dir` take bundles with.
pub fn evidence_options(k: &KernelArgs, lines: usize) -> Result<EvidenceOptions, Error> {
    let module = match &k.module {
        Some(p) => Some(
            Symbols::from_module(&read_file(p, "module")?)
                .ok_or_else(|| Error::Usage(format!("{} has no symbol table", p.display())))?,
        ),
        None => None,
    };
    Ok(EvidenceOptions {
        files: kernel_files(k)?,
        module,
        lines,
        forensic: k.forensic,
    })
}

/// `bdctl dmesg`.
pub fn dmesg(a: &DmesgArgs) -> Result<(), Error> {
    let files = kernel_files(&a.k)?;
    let role = if a.k.forensic {
        Role::Forensic
    } else {
        Role::Read
    };
    let mut c = a.t.target()?.connect(role, a.t.timeout())?;
    let k = kernel_log(&mut c, &files).map_err(|e| Error::Other(e.to_string()))?;
    eprintln!(
        "bdctl: {} records via the {} (layout from {}), found through {}{}",
        k.log.records.len(),
        if k.via == "driver" {
            "guest's driver"
        } else {
            "forensic view"
        },
        k.layout_from,
        k.found,
        if k.log.unusable > 0 {
            format!("; unusable descriptors: {}", k.log.unusable)
        } else {
            String::new()
        }
    );
    for d in &k.log.damage {
        eprintln!("bdctl: damage: {d}");
    }
    let mut log = k.log;
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    loop {
        let mut out = std::io::stdout().lock();
        for r in log.records.iter().filter(|r| !seen.contains(&r.seq)) {
            if a.t.json {
                let _ = writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
            } else {
                for line in r.lines() {
                    let _ = writeln!(out, "{line}");
                }
            }
        }
        let _ = out.flush();
        // Only the newest lap is kept: a bounded set, not every seq ever.
        seen = log.records.iter().map(|r| r.seq).collect();
        if !a.follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(a.follow_interval_ms.max(50)));
        // The ring stays where it was found: read it again, not look again.
        log = reread(&mut c, &k.ring).map_err(|e| Error::Other(e.to_string()))?;
    }
}

/// `bdctl evidence`.
pub fn evidence(a: &EvidenceArgs) -> Result<(), Error> {
    let mut opts = evidence_options(&a.k, a.lines)?;
    let bundle = evidence::capture(&a.t.target()?, None, &mut opts, a.t.timeout());
    evidence::write_file(&a.out, &bundle).map_err(Error::Other)?;
    let errors = bundle["errors"].as_object().map_or(0, serde_json::Map::len);
    eprintln!(
        "bdctl: evidence of {} written to {} in {:.0} ms{}",
        a.t.target,
        a.out.display(),
        bundle["timings_ms"]["total"].as_f64().unwrap_or(0.0),
        if errors > 0 {
            format!(" ({errors} parts failed: see its \"errors\")")
        } else {
            String::new()
        }
    );
    Ok(())
}
