//! Incidents: a hang (or lost, or corrupt) verdict of one target
//! generation, recovered by exactly one monitor. The owner opens
//! `incidents/<target>/<generation>` by a transaction that also checks it
//! owns the target under its live lease; each step it takes is written
//! the same way, compared against the incident's last revision, so a
//! monitor that lost the incident (cut off, its target moved) learns it
//! at its next step. A new owner takes an unfinished incident over; the
//! revision of the write that gave a monitor the incident is its fencing
//! token, carried into the receiver's inbox.

use etcd_client::{Compare, CompareOp, TxnOp};
use serde::{Deserialize, Serialize};

use super::{Cluster, Etcd, EtcdError};

/// Where an incident stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Opened; recovery under way.
    Open,
    /// Recovery finished (each step says how it went).
    Done,
}

/// One thing a monitor did for an incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Who.
    pub monitor: String,
    /// Under which fencing token.
    pub token: u64,
    /// What: opened, taken_over, evidence, extracted, action, resuming,
    /// resumed, resume_failed, extract_failed, ...
    pub step: String,
    /// Its details (file, sessions, error...).
    #[serde(default)]
    pub detail: serde_json::Value,
    /// When (Unix ms, the monitor's clock).
    pub at_unix_ms: u64,
}

/// The incident record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// The target.
    pub target: String,
    /// Its generation.
    pub generation: u64,
    /// The verdict event that opened it.
    pub verdict: serde_json::Value,
    /// The monitor acting on it now.
    pub monitor: String,
    /// That monitor's fencing token.
    pub token: u64,
    /// Open or done.
    pub state: State,
    /// Every step, in order, by every monitor that acted.
    pub steps: Vec<Step>,
}

/// Errors of incidents.
#[derive(Debug, thiserror::Error)]
pub enum IncidentError {
    /// This monitor does not hold its lease (cut off from etcd).
    #[error("this monitor does not hold its lease")]
    NoLease,
    /// The target is not this monitor's.
    #[error("target {0} is not owned by this monitor")]
    NotOwner(String),
    /// Another monitor has the incident now.
    #[error("the incident was taken over by {by} (fencing token {token})")]
    Lost {
        /// Who has it.
        by: String,
        /// Under which token.
        token: u64,
    },
    /// etcd.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// What opening an incident found.
#[derive(Debug)]
pub enum Opened {
    /// This monitor acts on it.
    Mine(Held),
    /// Someone acts or acted on it already.
    Taken(Incident),
}

/// An incident this monitor acts on.
#[derive(Debug)]
pub struct Held {
    key: String,
    mod_revision: i64,
    /// The record as last written.
    pub incident: Incident,
}

impl Held {
    /// The fencing token.
    pub fn token(&self) -> u64 {
        self.incident.token
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn parse(etcd: &Etcd, kv: &super::etcd::Kv) -> Result<Incident, EtcdError> {
    serde_json::from_slice(&kv.value).map_err(|e| EtcdError::Value {
        key: etcd.key(&kv.key),
        detail: e.to_string(),
    })
}

/// The key of an incident.
pub fn key(target: &str, generation: u64) -> String {
    format!("incidents/{target}/{generation}")
}

/// Opens (or takes over) the incident of `target` generation `generation`
/// for the verdict `event`.
pub fn open(
    c: &Cluster,
    target: &str,
    generation: u64,
    event: &serde_json::Value,
) -> Result<Opened, IncidentError> {
    let own = c.owner_compares(target).ok_or(IncidentError::NoLease)?;
    let rel = key(target, generation);
    let full = c.etcd.key(&rel);
    let fresh = Incident {
        target: target.to_owned(),
        generation,
        verdict: event.clone(),
        monitor: c.id.clone(),
        token: 0,
        state: State::Open,
        steps: Vec::new(),
    };
    let mut when = vec![Compare::create_revision(full.clone(), CompareOp::Equal, 0)];
    when.extend(own.iter().cloned());
    let r = c.etcd.txn(
        when,
        vec![TxnOp::put(full.clone(), to_json(&fresh), None)],
        vec![
            TxnOp::get(full.clone(), None),
            TxnOp::get(c.etcd.key(&format!("owners/{target}")), None),
        ],
    )?;
    if r.succeeded() {
        let token = token_of(Etcd::revision(&r));
        let held = Held {
            key: rel,
            mod_revision: Etcd::revision(&r),
            incident: fresh,
        };
        return held.claimed(c, token, "opened", serde_json::Value::Null);
    }
    let got = c.etcd.got(&r);
    let owner = got
        .iter()
        .find(|kv| kv.key == format!("owners/{target}"))
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
    let Some(existing) = got.iter().find(|kv| kv.key == rel) else {
        return Err(IncidentError::NotOwner(format!(
            "{target} (owner: {})",
            owner.as_deref().unwrap_or("none")
        )));
    };
    let incident = parse(&c.etcd, existing)?;
    if owner.as_deref() != Some(c.id.as_str())
        || incident.state == State::Done
        || incident.monitor == c.id
    {
        return Ok(Opened::Taken(incident));
    }
    // Unfinished, and its monitor no longer owns the target: dead, cut
    // off, or the target moved. The owner takes it over.
    let by = incident.monitor.clone();
    let mut taken = incident.clone();
    taken.monitor = c.id.clone();
    let revision = match replace(c, &rel, existing.mod_revision, own, &taken)? {
        Ok(revision) => revision,
        Err(Some(now)) => return Ok(Opened::Taken(parse(&c.etcd, &now)?)),
        Err(None) => return Err(IncidentError::NotOwner(target.to_owned())),
    };
    let token = token_of(revision);
    let held = Held {
        key: rel,
        mod_revision: revision,
        incident: taken,
    };
    held.claimed(c, token, "taken_over", serde_json::json!({ "from": by }))
}

/// Writes `value` over the incident at `rel` if it is still at
/// `mod_revision` and `own` holds: Ok(the write's revision), or Err(the
/// record as it is now, if there is one).
fn replace(
    c: &Cluster,
    rel: &str,
    mod_revision: i64,
    own: Vec<Compare>,
    value: &Incident,
) -> Result<Result<i64, Option<super::etcd::Kv>>, IncidentError> {
    let full = c.etcd.key(rel);
    let mut when = vec![Compare::mod_revision(
        full.clone(),
        CompareOp::Equal,
        mod_revision,
    )];
    when.extend(own);
    let r = c.etcd.txn(
        when,
        vec![TxnOp::put(full.clone(), to_json(value), None)],
        vec![TxnOp::get(full, None)],
    )?;
    if r.succeeded() {
        return Ok(Ok(Etcd::revision(&r)));
    }
    Ok(Err(c.etcd.got(&r).into_iter().next()))
}

fn token_of(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0).max(1)
}

fn to_json(i: &Incident) -> Vec<u8> {
    serde_json::to_vec(i).unwrap_or_default()
}

impl Held {
    fn claimed(
        mut self,
        c: &Cluster,
        token: u64,
        step: &str,
        detail: serde_json::Value,
    ) -> Result<Opened, IncidentError> {
        self.incident.token = token;
        self.step(c, step, detail, State::Open)?;
        Ok(Opened::Mine(self))
    }

    /// Records a step, if this monitor still has the incident (its lease
    /// held, the target its own, nobody else's write since its last).
    pub fn step(
        &mut self,
        c: &Cluster,
        step: &str,
        detail: serde_json::Value,
        state: State,
    ) -> Result<(), IncidentError> {
        let Some(own) = c.owner_compares(&self.incident.target) else {
            return Err(self.lost_without_lease(c));
        };
        let mut next = self.incident.clone();
        next.state = state;
        next.steps.push(Step {
            monitor: c.id.clone(),
            token: self.incident.token,
            step: step.to_owned(),
            detail,
            at_unix_ms: now_ms(),
        });
        match replace(c, &self.key, self.mod_revision, own, &next)? {
            Ok(revision) => {
                self.mod_revision = revision;
                self.incident = next;
                Ok(())
            }
            Err(now) => {
                let (by, token) = now
                    .and_then(|kv| parse(&c.etcd, &kv).ok())
                    .map_or((String::from("?"), 0), |i| (i.monitor, i.token));
                // Same record, same writer: only the ownership compare failed.
                if by == c.id && token == self.incident.token {
                    return Err(IncidentError::NotOwner(self.incident.target.clone()));
                }
                Err(IncidentError::Lost { by, token })
            }
        }
    }

    /// Why a monitor without its lease cannot go on: the incident's new
    /// holder if etcd answers a plain read (which needs no lease), else
    /// only that the lease is gone.
    fn lost_without_lease(&self, c: &Cluster) -> IncidentError {
        let now = c
            .etcd
            .get(&self.key)
            .ok()
            .flatten()
            .and_then(|kv| parse(&c.etcd, &kv).ok());
        match now {
            Some(i) if i.monitor != c.id || i.token != self.incident.token => IncidentError::Lost {
                by: i.monitor,
                token: i.token,
            },
            _ => IncidentError::NoLease,
        }
    }
}

/// Every incident (for `bdctl incidents`).
pub fn list(etcd: &Etcd) -> Result<Vec<Incident>, EtcdError> {
    etcd.list("incidents/")?
        .iter()
        .map(|kv| parse(etcd, kv))
        .collect()
}
