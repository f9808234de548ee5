//! `bdctl resume`: hands extracted sessions to a healthy instance's inbox.

use backdoor_proto::Role;

use super::connect;
use crate::cli::ResumeArgs;
use crate::extract::Extraction;
use crate::handover::{self, Plan};
use crate::Error;

/// `bdctl resume`: claims the target's inbox with the fencing token, then
/// writes the source, each session's record and the doorbell (last, so
/// the receiver never sees a half-filled inbox).
pub fn run(a: &ResumeArgs) -> Result<usize, Error> {
    let text = std::fs::read_to_string(&a.from)
        .map_err(|e| Error::Other(format!("{}: {e}", a.from.display())))?;
    let x: Extraction = serde_json::from_str(&text).map_err(|e| {
        Error::Usage(format!(
            "{} is not a bdctl extraction: {e}",
            a.from.display()
        ))
    })?;
    let plan = Plan {
        hook: a.hook.clone(),
        slot_size: a.slot_size,
        service: a.service.clone(),
        token: a.fence_token,
        source: a.source.clone().unwrap_or_else(|| x.vm.clone()),
    };
    let mut c = connect(&a.t, Role::Repair)?;
    let done = handover::hand_over(&mut c, &x, &plan)?;
    println!(
        "bdctl: handed {} sessions from {} (generation {}) to {} under fencing token {}",
        done.sessions, x.vm, x.generation, a.t.target, done.token
    );
    Ok(done.sessions)
}
