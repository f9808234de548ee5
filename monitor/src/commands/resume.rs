//! `bdctl resume`: hands extracted sessions to a healthy instance's inbox.

use backdoor_proto::Role;

use super::{connect, hook_id};
use crate::cli::ResumeArgs;
use crate::extract::Extraction;
use crate::Error;

/// `bdctl resume`: writes each session's record into the target's inbox,
/// then the doorbell (last, so the guest never sees a half-filled inbox).
pub fn run(a: &ResumeArgs) -> Result<usize, Error> {
    let text = std::fs::read_to_string(&a.from)
        .map_err(|e| Error::Other(format!("{}: {e}", a.from.display())))?;
    let x: Extraction = serde_json::from_str(&text).map_err(|e| {
        Error::Usage(format!(
            "{} is not a bdctl extraction: {e}",
            a.from.display()
        ))
    })?;
    let sessions: Vec<_> = x
        .sessions
        .iter()
        .filter(|s| a.service.as_deref().is_none_or(|svc| svc == s.service))
        .collect();
    let mut c = connect(&a.t, Role::Repair)?;
    let id = hook_id(&c, &a.hook)?;
    let hook_len = c
        .descriptor()
        .hooks
        .iter()
        .find(|h| h.id == id)
        .map_or(0, |h| h.len);
    let capacity = hook_len.saturating_sub(a.inbox_offset) / u64::from(a.slot_size.max(1));
    if sessions.len() as u64 > capacity {
        return Err(Error::Usage(format!(
            "{} sessions do not fit the inbox's {capacity} slots",
            sessions.len()
        )));
    }
    let doorbell = u64::from_le_bytes(
        c.read(id, a.doorbell_offset, 8)?
            .try_into()
            .unwrap_or([0; 8]),
    );
    if doorbell != 0 {
        return Err(Error::Usage(format!(
            "the inbox of {} already holds {doorbell} records; hand-offs go to a fresh instance",
            x.vm
        )));
    }
    for (k, s) in sessions.iter().enumerate() {
        let payload = s.payload().ok_or_else(|| {
            Error::Usage(format!("session {} has a bad payload_hex", s.session_id))
        })?;
        let rec = backdoor_abi::record::encode(
            &s.service,
            s.session_id,
            s.version,
            s.stage,
            &payload,
            a.slot_size as usize,
        )
        .ok_or_else(|| {
            Error::Usage(format!(
                "session {}'s payload does not fit a {}-byte slot",
                s.session_id, a.slot_size
            ))
        })?;
        c.write(id, a.inbox_offset + k as u64 * u64::from(a.slot_size), &rec)?;
    }
    c.write(
        id,
        a.doorbell_offset,
        &(sessions.len() as u64).to_le_bytes(),
    )?;
    println!(
        "bdctl: handed {} sessions from {} (generation {}) to {}",
        sessions.len(),
        x.vm,
        x.generation,
        a.t.target
    );
    Ok(sessions.len())
}
