//! The kernel files an operator gives `dmesg`, `evidence` and `watch
//! --evidence-dir` (System.map, vmlinux for BTF, the module), bounded.

use std::path::Path;

use crate::cli::KernelArgs;
use crate::evidence::EvidenceOptions;
use crate::kernel::btf::Btf;
use crate::kernel::symbols::Symbols;
use crate::kernel::KernelFiles;
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
