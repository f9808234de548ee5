//! `bdctl dmesg`: a guest kernel's log, read over the backdoor with no
//! guest CPU.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use super::kernel_files::kernel_files;
use crate::cli::DmesgArgs;
use crate::kernel::{kernel_log, reread};
use crate::Error;
use backdoor_proto::Role;

/// `bdctl dmesg`.
pub fn run(a: &DmesgArgs) -> Result<(), Error> {
    let files = kernel_files(&a.k)?;
    let role = if a.k.forensic {
        Role::Forensic
    } else {
        Role::Read
    };
    let mut c = a.t.target()?.connect(role, a.t.timeout())?;
    let k = kernel_log(&mut c, &files)
        .map_err(|e| Error::Other(backdoor_abi::ErrorChain(&e).to_string()))?;
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
        log = reread(&mut c, &k.ring)
            .map_err(|e| Error::Other(backdoor_abi::ErrorChain(&e).to_string()))?;
    }
}
