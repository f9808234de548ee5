//! `bdctl extract`: the service continuations of a (hung) guest.

use std::io::IsTerminal;

use backdoor_proto::Role;

use super::connect;
use crate::cli::ExtractArgs;
use crate::extract::{self, Extraction};
use crate::Error;

/// `bdctl extract`.
pub fn run(a: &ExtractArgs) -> Result<Extraction, Error> {
    let mut c = connect(&a.t, Role::Read)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message("extracting");
        b
    });
    let x = extract::extract(&mut c, a.service.as_deref(), &mut |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let text = serde_json::to_string_pretty(&x).map_err(|e| Error::Other(e.to_string()))?;
    match &a.out {
        Some(p) => std::fs::write(p, text + "\n")
            .map_err(|e| Error::Other(format!("{}: {e}", p.display())))?,
        None => println!("{text}"),
    }
    if let Some(dir) = &a.raw {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Other(format!("{}: {e}", dir.display())))?;
        for s in &x.sessions {
            let p = dir.join(format!("{}-{}.bin", s.service, s.session_id));
            std::fs::write(&p, s.payload().unwrap_or_default())
                .map_err(|e| Error::Other(format!("{}: {e}", p.display())))?;
        }
    }
    let s = &x.summary;
    eprintln!(
        "bdctl: extracted {} sessions from {} (generation {}): {} slots, {} records accepted ({} after re-reading torn copies), {} torn, {} corrupt, {} empty",
        x.sessions.len(), x.vm, x.generation, s.slots, s.accepted, s.retried, s.torn, s.corrupt, s.empty
    );
    for p in &x.problems {
        eprintln!(
            "bdctl: {} slot {}: {} ({})",
            p.hook,
            p.slot.map_or("-".into(), |s| s.to_string()),
            p.kind,
            p.detail
        );
    }
    Ok(x)
}
