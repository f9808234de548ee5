//! Sessions from elsewhere: a `bdctl extract --out` file (read with the
//! fields of bdctl's `Extraction`/`Session`, monitor/src/extract.rs), or
//! the driver's inbox, filled by `bdctl resume`. Each record is checked
//! like one of our own (payload format, stage) before it is adopted.

use std::path::Path;

use backdoor_abi::inbox::Admit;
use backdoor_guest::{FenceBook, Inbox, Problem, Record};
use serde::Deserialize;

use crate::store::{Adopted, Store};

/// The part of `bdctl extract`'s output bdkv needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Extraction {
    /// The VM the sessions came from.
    pub vm: String,
    /// Its generation then.
    pub generation: u32,
    /// The newest complete record of each session.
    pub sessions: Vec<ExtractedSession>,
}

/// One extracted session (bdctl's `Session`, without its location fields).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ExtractedSession {
    /// Service name.
    pub service: String,
    /// Session id.
    pub session_id: u64,
    /// Record version.
    pub version: u64,
    /// Stage.
    pub stage: u32,
    /// The payload, hex.
    pub payload_hex: String,
}

/// Why an extraction file cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Unreadable.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not bdctl's JSON.
    #[error("{path} is not a bdctl extraction")]
    Json {
        /// The file.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    hex::decode(s).ok()
}

impl Extraction {
    /// Reads and parses an extraction file.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| FileError::Json {
            path: path.display().to_string(),
            source,
        })
    }

    /// The sessions as records; a session with bad hex is reported by id.
    pub fn records(&self) -> Vec<Result<Record, (u64, String)>> {
        self.sessions
            .iter()
            .map(|s| {
                decode_hex(&s.payload_hex)
                    .map(|payload| Record {
                        seq: 0,
                        session_id: s.session_id,
                        service: s.service.clone(),
                        version: s.version,
                        stage: s.stage,
                        payload,
                    })
                    .ok_or((s.session_id, "payload_hex is not hex".to_owned()))
            })
            .collect()
    }
}

/// Counts of one adoption pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// New sessions.
    pub new: usize,
    /// Newer versions of sessions held.
    pub updated: usize,
    /// Already held at this version or newer.
    pub current: usize,
    /// Other services' records (skipped, not an error).
    pub foreign: usize,
    /// Refused (each logged with its reason).
    pub rejected: usize,
    /// Hand-overs refused whole: older than one already taken from the
    /// same source (a monitor that lost its incident, delivering late).
    pub fenced: usize,
}

/// Adopts `records` into `store`, logging each refusal with its reason.
pub fn adopt_all(
    store: &mut Store,
    origin: &str,
    records: impl IntoIterator<Item = Result<Record, (u64, String)>>,
) -> Report {
    let mut r = Report::default();
    for rec in records {
        let rec = match rec {
            Ok(rec) => rec,
            Err((id, why)) => {
                tracing::warn!("{origin}: session {id} not adopted: {why}");
                r.rejected += 1;
                continue;
            }
        };
        if rec.service != store.service() {
            r.foreign += 1;
            continue;
        }
        match store.adopt(&rec) {
            Ok(Adopted::New) => {
                tracing::info!(
                    "{origin}: adopted session {} at version {}",
                    rec.session_id,
                    rec.version
                );
                r.new += 1;
            }
            Ok(Adopted::Updated) => {
                tracing::info!(
                    "{origin}: session {} updated to version {}",
                    rec.session_id,
                    rec.version
                );
                r.updated += 1;
            }
            Ok(Adopted::AlreadyCurrent) => r.current += 1,
            Err(e) => {
                tracing::warn!(
                    "{origin}: session {} not adopted: {e}",
                    rec.session_id,
                    e = backdoor_abi::ErrorChain(&e)
                );
                r.rejected += 1;
            }
        }
    }
    r
}

/// Adopts the sessions of an extraction file.
pub fn from_file(store: &mut Store, path: &Path) -> Result<Report, FileError> {
    let x = Extraction::load(path)?;
    let origin = format!(
        "{} (from {} generation {})",
        path.display(),
        x.vm,
        x.generation
    );
    Ok(adopt_all(store, &origin, x.records()))
}

/// Adopts what the inbox holds for the store's service (idempotent: a
/// session already held at that version is left alone), unless the
/// hand-over is older than one `fences` says was taken from its source.
pub fn from_inbox(store: &mut Store, inbox: &Inbox, fences: &mut FenceBook) -> Report {
    if let Some(h) = inbox.handover() {
        if let Admit::Stale { took } = fences.admit(&h) {
            tracing::warn!(
                "inbox: refused the hand-over from {:?}: its fencing token {} is older than {took}, already taken from it",
                h.source,
                h.token
            );
            return Report {
                fenced: 1,
                ..Report::default()
            };
        }
    }
    let scan = inbox.scan(store.service());
    let mut report = adopt_all(
        store,
        "inbox",
        scan.newest.into_iter().map(|f| Ok(f.record)),
    );
    for (k, p) in scan.problems {
        match p {
            Problem::ForeignService(_) => report.foreign += 1,
            Problem::Torn => {
                tracing::warn!("inbox slot {k}: a record still being written, not adopted");
                report.rejected += 1;
            }
            Problem::Corrupt(c) => {
                tracing::warn!("inbox slot {k}: corrupt record ({c:?}), not adopted");
                report.rejected += 1;
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_decoding_rejects_what_is_not_hex() {
        assert_eq!(decode_hex("00ff41"), Some(vec![0, 255, 0x41]));
        assert_eq!(decode_hex(""), Some(vec![]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex("é0"), None);
    }
}
