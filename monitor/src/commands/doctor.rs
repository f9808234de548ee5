//! `bdctl doctor`: which transports work here, and whether a target answers.

use std::time::Duration;

use backdoor_proto::Role;

use crate::cli::DoctorArgs;
use crate::target::Target;
use crate::Error;

/// `bdctl doctor`.
pub fn run(a: &DoctorArgs) -> Result<(), Error> {
    for b in backdoor_proto::doctor::backends() {
        println!(
            "{:<6} {:<10} {}",
            b.name,
            if b.usable { "usable" } else { "unusable" },
            b.detail
        );
    }
    if let Some(spec) = &a.target {
        let keys = a
            .key_file
            .as_deref()
            .ok_or_else(|| Error::Usage("give --key-file with a target".into()))?;
        let t = Target::parse(spec, keys)?;
        let start = std::time::Instant::now();
        let c = t.connect(Role::Read, Duration::from_secs(2))?;
        let d = c.descriptor();
        println!(
            "target {}: reachable and authenticated in {:.1} ms; generation {}, sealed {}, {} hooks, backends {}",
            t.name,
            start.elapsed().as_secs_f64() * 1e3,
            d.generation,
            d.sealed,
            d.hooks.len(),
            d.backends.join(",")
        );
    }
    Ok(())
}
