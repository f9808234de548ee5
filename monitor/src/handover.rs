//! Handing extracted sessions to a healthy instance through its inbox
//! (docs/abi.md, "The inbox"): claim the inbox by compare-and-swap of its
//! fence word from 0 to the hand-over's fencing token, write the source
//! name and the records, ring the doorbell last.
//!
//! The claim is what makes a hand-over happen once: of two monitors
//! racing for one inbox, one swaps and the other is told who holds it. The
//! receiver's own check (it refuses a token older than one it took from
//! the same source) covers the inbox it freed and a late monitor claimed.

use backdoor_abi::inbox;
use backdoor_proto::{Client, ClientError};

use crate::extract::Extraction;

/// Where and how to hand sessions over.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The REPAIR hook holding the inbox.
    pub hook: String,
    /// Bytes per inbox slot (the receiver's `inbox_slot_size`).
    pub slot_size: u32,
    /// Only this service's sessions.
    pub service: Option<String>,
    /// The fencing token (a cluster incident's etcd revision; 1 by hand).
    pub token: u64,
    /// The source's name as the receiver books it (the hung target).
    pub source: String,
}

/// Why a hand-over did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The receiver has no such hook.
    #[error("the receiver has no hook {0:?}")]
    NoHook(String),
    /// More sessions than slots.
    #[error("{sessions} sessions do not fit the inbox's {capacity} slots")]
    TooMany {
        /// Sessions to hand over.
        sessions: usize,
        /// Inbox slots.
        capacity: u64,
    },
    /// A session cannot be encoded into a slot.
    #[error("session {0}: {1}")]
    Record(u64, String),
    /// The token is 0 (the unclaimed value).
    #[error("a fencing token must be at least 1")]
    ZeroToken,
    /// The inbox already holds a hand-over of a newer or equal token.
    #[error("fenced off: the inbox is claimed by fencing token {held} (from {holder:?}), not older than this hand-over's {mine}")]
    Fenced {
        /// The claim's token.
        held: u64,
        /// Who claimed it.
        holder: String,
        /// Ours.
        mine: u64,
    },
    /// The inbox holds an older hand-over the receiver has not freed.
    #[error("the inbox still holds the hand-over of fencing token {held} (from {holder:?}); the receiver has not taken it")]
    Busy {
        /// The claim's token.
        held: u64,
        /// Who claimed it.
        holder: String,
    },
    /// The receiver could not be reached.
    #[error("connecting to the receiver: {0}")]
    Connect(String),
    /// The agent refused or failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// What was handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Records written (and rung).
    pub sessions: usize,
    /// The token they went under.
    pub token: u64,
}

/// Hands the sessions of `x` to the instance `c` is connected to (a REPAIR
/// connection).
pub fn hand_over(c: &mut Client, x: &Extraction, plan: &Plan) -> Result<Delivered, HandoverError> {
    if plan.token == 0 {
        return Err(HandoverError::ZeroToken);
    }
    let sessions: Vec<_> = x
        .sessions
        .iter()
        .filter(|s| plan.service.as_deref().is_none_or(|svc| svc == s.service))
        .collect();
    let hook = crate::commands::find_hook(c, &plan.hook)
        .cloned()
        .ok_or_else(|| HandoverError::NoHook(plan.hook.clone()))?;
    let capacity =
        hook.len.saturating_sub(inbox::RECORDS as u64) / u64::from(plan.slot_size.max(1));
    if sessions.len() as u64 > capacity {
        return Err(HandoverError::TooMany {
            sessions: sessions.len(),
            capacity,
        });
    }
    // Encode everything before claiming: a claim is not given back.
    let mut records = Vec::with_capacity(sessions.len());
    for s in &sessions {
        let payload = s
            .payload()
            .ok_or_else(|| HandoverError::Record(s.session_id, "a bad payload_hex".into()))?;
        let rec = backdoor_abi::record::encode(
            &s.service,
            s.session_id,
            s.version,
            s.stage,
            &payload,
            plan.slot_size as usize,
        )
        .ok_or_else(|| {
            HandoverError::Record(
                s.session_id,
                format!("its payload does not fit a {}-byte slot", plan.slot_size),
            )
        })?;
        records.push(rec);
    }
    let held = c.cas(hook.id, inbox::FENCE as u64, 0, plan.token)?;
    if held != 0 {
        let holder = c
            .read(
                hook.id,
                inbox::SOURCE as u64,
                u32::try_from(inbox::SOURCE_LEN).unwrap_or(32),
            )
            .map(|raw| inbox::decode_source(&raw))
            .unwrap_or_default();
        return Err(if held >= plan.token {
            HandoverError::Fenced {
                held,
                holder,
                mine: plan.token,
            }
        } else {
            HandoverError::Busy { held, holder }
        });
    }
    c.write(
        hook.id,
        inbox::SOURCE as u64,
        &inbox::encode_source(&plan.source),
    )?;
    for (k, rec) in records.iter().enumerate() {
        let at = inbox::RECORDS as u64 + k as u64 * u64::from(plan.slot_size);
        c.write(hook.id, at, rec)?;
    }
    // Last: the receiver reads the records only once it sees the doorbell.
    c.write(
        hook.id,
        inbox::DOORBELL as u64,
        &(records.len() as u64).to_le_bytes(),
    )?;
    Ok(Delivered {
        sessions: records.len(),
        token: plan.token,
    })
}
