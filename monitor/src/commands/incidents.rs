//! `bdctl incidents`: a cluster's incidents and the steps taken on each.

use crate::cli::IncidentsArgs;
use crate::cluster::incident;
use crate::Error;

/// `bdctl incidents`.
pub fn run(a: &IncidentsArgs) -> Result<(), Error> {
    let list = incident::list(&a.etcd.connect()?)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&list).map_err(|e| Error::Other(e.to_string()))?
        );
        return Ok(());
    }
    for i in &list {
        println!(
            "{} generation {}: {:?}, acted on by {} (fencing token {})",
            i.target, i.generation, i.state, i.monitor, i.token
        );
        for s in &i.steps {
            println!(
                "  {} {} (token {}) {}",
                s.monitor, s.step, s.token, s.detail
            );
        }
    }
    Ok(())
}
