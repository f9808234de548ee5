//! Cluster mode (docs/cluster.md): monitors that share their targets
//! through etcd. Targets are registered in etcd; each monitor joins with a
//! lease; every target is owned by exactly one live monitor (balanced by
//! [`assign::plan`], made exclusive by an owner key under the owner's
//! lease); a hang opens an incident by transaction so one monitor acts;
//! and a monitor that cannot renew its lease stops acting.
//!
//! Keys, under the prefix (default `/backdoor/`):
//! - `targets/<name>`: a [`TargetRecord`] (JSON), put by `bdctl targets add`.
//! - `monitors/<id>`: a [`MemberRecord`], under the monitor's lease.
//! - `owners/<name>`: the owning monitor's id, under its lease.
//! - `incidents/<name>/<generation>`: an [`incident::Incident`]; kept.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, TxnOp};
use serde::{Deserialize, Serialize};

use crate::target::{Target, TargetError, Transport};
use crate::watch::lock;

pub mod assign;
pub mod etcd;
pub mod incident;

pub use etcd::{Etcd, EtcdError};

/// How a monitor joins its cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// etcd endpoints (http://host:port).
    pub endpoints: Vec<String>,
    /// Key prefix.
    pub prefix: String,
    /// This monitor's id (unique in the cluster).
    pub id: String,
    /// The lease's time to live: how long a dead or cut-off monitor's
    /// targets wait for another owner.
    pub ttl: Duration,
}

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/backdoor/";

/// A registered target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRecord {
    /// NAME@HOST:PORT of its agent.
    pub target: String,
    /// The key file, as a path on every monitor's host (keys are not put
    /// in etcd).
    pub key_file: PathBuf,
    /// Its data path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// Where its sessions go on a hang.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<ResumeRecord>,
}

/// Where a target's sessions are handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRecord {
    /// NAME@HOST:PORT of the receiving instance's agent.
    pub target: String,
    /// Its key file (with a repair key).
    pub key_file: PathBuf,
    /// Its inbox hook.
    pub hook: String,
    /// Its inbox slot size.
    pub slot_size: u32,
    /// Only this service's sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// Whether `name` can name a cluster target: 1 to 32 bytes of
/// `[A-Za-z0-9._-]`. It is a path segment of etcd keys (a '/' would let
/// one target's keys alias another's) and the source a receiver books
/// fencing tokens by (32 bytes in the inbox: a longer name would share its
/// book with every name of the same first 32 bytes).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= backdoor_abi::inbox::SOURCE_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "target name {name:?}: a cluster target's name is 1 to {} bytes of letters, digits, '.', '_' and '-'",
            backdoor_abi::inbox::SOURCE_LEN
        ))
    }
}

impl TargetRecord {
    /// The target's name (before the @).
    pub fn name(&self) -> &str {
        self.target.split_once('@').map_or("", |(n, _)| n)
    }

    /// The watch job it describes (key files are read here).
    pub fn job(&self) -> Result<crate::watch::Job, TargetError> {
        let target = Target::parse(&self.target, &self.key_file)?
            .with_transport(self.transport.unwrap_or_default(), None);
        let resume = match &self.resume {
            Some(r) => Some(crate::watch::ResumeJob {
                to: Target::parse(&r.target, &r.key_file)?,
                plan: crate::handover::Plan {
                    hook: r.hook.clone(),
                    slot_size: r.slot_size,
                    service: r.service.clone(),
                    token: 0,
                    source: target.name.clone(),
                },
            }),
            None => None,
        };
        Ok(crate::watch::Job { target, resume })
    }
}

/// What a monitor says of itself in `monitors/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Its id.
    pub id: String,
    /// Its host name and pid.
    pub host: String,
    /// Its pid.
    pub pid: u32,
    /// Its lease (hex, as etcdctl prints it).
    pub lease: String,
}

/// What the ownership loop tells the watch.
#[derive(Debug)]
pub enum Change {
    /// Watch this target (claimed for this monitor).
    Own(Box<crate::watch::Job>),
    /// Stop watching it (released, moved, or removed).
    Release(String),
}

/// Whether this monitor holds its lease, by its own clock: the lease is
/// taken as lost a moment before etcd would drop it.
#[derive(Debug, Default)]
pub struct Standing {
    /// The lease taken (until etcd says it expired) and until when it is
    /// surely held.
    inner: Mutex<Option<(i64, Instant)>>,
}

impl Standing {
    /// The lease, while held.
    pub fn lease(&self) -> Option<i64> {
        lock(&self.inner)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(l, _)| l)
    }

    /// The lease taken, held or not: the one to renew.
    fn taken(&self) -> Option<i64> {
        lock(&self.inner).map(|(l, _)| l)
    }

    fn set(&self, v: Option<(i64, Instant)>) {
        *lock(&self.inner) = v;
    }
}

/// A monitor's membership in its cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The connection.
    pub etcd: Etcd,
    /// This monitor's id.
    pub id: String,
    /// Its lease, while held.
    pub standing: Standing,
    ttl: Duration,
    /// Set when etcd said the lease expired (the next round says so).
    expired: AtomicBool,
    /// Why the last keep-alive failed (None: it did not).
    keep_error: Mutex<Option<String>>,
}

/// One round of the ownership loop every this part of the TTL.
const TICKS_PER_TTL: u32 = 4;

/// Claims per transaction: a compare and a put each, well below etcd's
/// default `--max-txn-ops` (128 of either in one transaction).
const CLAIMS_PER_TXN: usize = 50;

impl Cluster {
    /// Connects and starts the membership and ownership loop, which sends
    /// [`Change`]s to `changes` and stops when `changes` is dropped.
    pub fn start(
        opts: &ClusterOptions,
        changes: Box<dyn Fn(Change) -> bool + Send>,
    ) -> Result<Arc<Self>, EtcdError> {
        let etcd = Etcd::connect(&opts.endpoints, &opts.prefix, opts.ttl / 2)?;
        let me = Arc::new(Self {
            etcd,
            id: opts.id.clone(),
            standing: Standing::default(),
            ttl: opts.ttl,
            expired: AtomicBool::new(false),
            keep_error: Mutex::new(None),
        });
        let c = me.clone();
        std::thread::Builder::new()
            .name("bdctl-cluster".into())
            .spawn(move || c.run(&*changes))
            .map_err(EtcdError::Runtime)?;
        Ok(me)
    }

    fn tick(&self) -> Duration {
        (self.ttl / TICKS_PER_TTL).max(Duration::from_millis(50))
    }

    /// The ownership loop, with the lease kept alive beside it: a round
    /// of a monitor with many targets to claim can outlast the TTL.
    fn run(&self, changes: &dyn Fn(Change) -> bool) {
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let keeper = std::thread::Builder::new()
                .name("bdctl-lease".into())
                .spawn_scoped(s, || self.keep_lease(&done));
            if let Err(e) = keeper {
                eprintln!("bdctl: cluster: cannot start the lease's keep-alive: {e}");
                return;
            }
            self.own(changes);
            done.store(true, Ordering::Relaxed);
        });
    }

    /// Renews the lease every tick; etcd's answer says until when it is
    /// held (less a tick: act only while surely held).
    fn keep_lease(&self, done: &AtomicBool) {
        while !done.load(Ordering::Relaxed) {
            if let Some(l) = self.standing.taken() {
                let sent = Instant::now();
                match self.etcd.keep_alive(l) {
                    Ok(0) => {
                        // Expired: its keys (membership, owners) are gone.
                        self.standing.set(None);
                        self.expired.store(true, Ordering::Relaxed);
                        *lock(&self.keep_error) = None;
                    }
                    Ok(left) => {
                        let left = Duration::from_secs(u64::try_from(left).unwrap_or(0));
                        self.standing.set(Some((
                            l,
                            sent + left.min(self.ttl).saturating_sub(self.tick()),
                        )));
                        *lock(&self.keep_error) = None;
                    }
                    // The standing runs out by its own clock.
                    Err(e) => {
                        *lock(&self.keep_error) = Some(backdoor_abi::ErrorChain(&e).to_string())
                    }
                }
            }
            std::thread::sleep(self.tick());
        }
    }

    /// The ownership rounds, until the watch ends.
    fn own(&self, changes: &dyn Fn(Change) -> bool) {
        // Target name -> the record it is watched with.
        let mut watched: BTreeMap<String, TargetRecord> = BTreeMap::new();
        let mut said = String::new();
        loop {
            let round = self.round(&mut watched, changes);
            let now = match &round {
                Ok(()) => String::new(),
                Err(e) => backdoor_abi::ErrorChain(e).to_string(),
            };
            // Said when it changes: a cut-off monitor would say it each tick.
            if now != said {
                if now.is_empty() {
                    eprintln!("bdctl: cluster: member {} holds its lease again", self.id);
                } else {
                    eprintln!("bdctl: cluster: {now}; not acting until the lease is held again");
                }
                said = now;
            }
            if matches!(round, Err(RoundError::Closed)) {
                return;
            }
            std::thread::sleep(self.tick());
        }
    }

    /// Takes a lease if it holds none, then claims and releases targets.
    fn round(
        &self,
        watched: &mut BTreeMap<String, TargetRecord>,
        changes: &dyn Fn(Change) -> bool,
    ) -> Result<(), RoundError> {
        let send = |c: Change| {
            if changes(c) {
                Ok(())
            } else {
                Err(RoundError::Closed)
            }
        };
        if self.expired.swap(false, Ordering::Relaxed) {
            return Err(RoundError::Expired);
        }
        if let Some(e) = lock(&self.keep_error).clone() {
            if self.standing.lease().is_none() {
                return Err(RoundError::KeepAlive(e));
            }
        }
        let sent = Instant::now();
        let l = match self.standing.taken() {
            Some(l) => l,
            None => {
                let l = self.etcd.grant(self.ttl)?;
                let rec = MemberRecord {
                    id: self.id.clone(),
                    host: hostname(),
                    pid: std::process::id(),
                    lease: format!("{l:x}"),
                };
                let v = serde_json::to_vec(&rec).unwrap_or_default();
                self.etcd
                    .put(&format!("monitors/{}", self.id), v, Some(l))?;
                self.standing
                    .set(Some((l, sent + self.ttl.saturating_sub(self.tick()))));
                l
            }
        };
        let members: Vec<String> = self
            .etcd
            .list("monitors/")?
            .into_iter()
            .filter_map(|kv| kv.key.strip_prefix("monitors/").map(str::to_owned))
            .collect();
        let mut records = BTreeMap::new();
        for kv in self.etcd.list("targets/")? {
            let Some(name) = kv.key.strip_prefix("targets/") else {
                continue;
            };
            match serde_json::from_slice::<TargetRecord>(&kv.value) {
                Ok(r) if r.name() == name && check_name(name).is_ok() => {
                    records.insert(name.to_owned(), r);
                }
                Ok(_) | Err(_) => {} // `bdctl targets ls` names bad records
            }
        }
        let owners: BTreeMap<String, (String, i64)> = self
            .etcd
            .list("owners/")?
            .into_iter()
            .filter_map(|kv| {
                let name = kv.key.strip_prefix("owners/")?.to_owned();
                Some((
                    name,
                    (String::from_utf8_lossy(&kv.value).into_owned(), kv.lease),
                ))
            })
            .collect();
        let names: Vec<&str> = records.keys().map(String::as_str).collect();
        let mons: Vec<&str> = members.iter().map(String::as_str).collect();
        let plan = assign::plan(&names, &mons);
        let free: Vec<&str> = records
            .keys()
            .map(String::as_str)
            .filter(|n| plan.get(n) == Some(&self.id.as_str()) && !owners.contains_key(*n))
            .collect();
        let claimed = self.claim_all(&free, l)?;
        for (name, rec) in &records {
            let mine = plan.get(name.as_str()) == Some(&self.id.as_str());
            let held = owners
                .get(name)
                .is_some_and(|(m, ol)| *m == self.id && *ol == l);
            if held && !mine {
                self.release(name, l)?;
                if watched.remove(name).is_some() {
                    send(Change::Release(name.clone()))?;
                }
                continue;
            }
            let ours = held || claimed.contains(name.as_str());
            if ours && watched.get(name) != Some(rec) {
                match rec.job() {
                    Ok(job) => {
                        if watched.insert(name.clone(), rec.clone()).is_some() {
                            send(Change::Release(name.clone()))?;
                        }
                        send(Change::Own(Box::new(job)))?;
                    }
                    Err(e) => {
                        eprintln!(
                            "bdctl: cluster: target {name}: {}; not watched",
                            backdoor_abi::ErrorChain(&e)
                        );
                        self.release(name, l)?;
                    }
                }
            } else if !ours && watched.remove(name).is_some() {
                send(Change::Release(name.clone()))?;
            }
        }
        let gone: Vec<String> = watched
            .keys()
            .filter(|n| !records.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            watched.remove(&name);
            self.release(&name, l)?;
            send(Change::Release(name))?;
        }
        Ok(())
    }

    /// Claims the free targets `names`, a transaction per
    /// [`CLAIMS_PER_TXN`] (a take-over of hundreds is a few round trips,
    /// not hundreds), one by one in a batch that found one of its keys
    /// taken; returns those claimed.
    fn claim_all<'a>(
        &self,
        names: &[&'a str],
        l: i64,
    ) -> Result<std::collections::BTreeSet<&'a str>, EtcdError> {
        let mut claimed = std::collections::BTreeSet::new();
        for batch in names.chunks(CLAIMS_PER_TXN) {
            if self.claim(batch, l)? {
                claimed.extend(batch);
                continue;
            }
            for name in batch {
                if self.claim(&[name], l)? {
                    claimed.insert(*name);
                }
            }
        }
        Ok(claimed)
    }

    /// Creates `owners/<name>` of every name under lease `l`, if nobody
    /// holds any of them.
    fn claim(&self, names: &[&str], l: i64) -> Result<bool, EtcdError> {
        let keys: Vec<String> = names
            .iter()
            .map(|n| self.etcd.key(&format!("owners/{n}")))
            .collect();
        let r = self.etcd.txn(
            keys.iter()
                .map(|k| Compare::create_revision(k.clone(), CompareOp::Equal, 0))
                .collect(),
            keys.into_iter()
                .map(|k| TxnOp::put(k, self.id.clone(), Some(PutOptions::new().with_lease(l))))
                .collect(),
            vec![],
        )?;
        Ok(r.succeeded())
    }

    /// Deletes `owners/<name>` if this monitor holds it under lease `l`.
    fn release(&self, name: &str, l: i64) -> Result<(), EtcdError> {
        let key = self.etcd.key(&format!("owners/{name}"));
        self.etcd.txn(
            vec![
                Compare::value(key.clone(), CompareOp::Equal, self.id.clone()),
                Compare::lease(key.clone(), CompareOp::Equal, l),
            ],
            vec![TxnOp::delete(key, None)],
            vec![],
        )?;
        Ok(())
    }

    /// The compares that hold while this monitor owns `name` under its
    /// current lease; `None` while it does not hold its lease.
    pub fn owner_compares(&self, name: &str) -> Option<Vec<Compare>> {
        let l = self.standing.lease()?;
        let key = self.etcd.key(&format!("owners/{name}"));
        Some(vec![
            Compare::value(key.clone(), CompareOp::Equal, self.id.clone()),
            Compare::lease(key, CompareOp::Equal, l),
        ])
    }
}

/// Why a round of the ownership loop stopped.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("the lease expired (cut off from etcd for longer than its TTL)")]
    Expired,
    #[error("renewing the lease: {0}")]
    KeepAlive(String),
    #[error("the watch has ended")]
    Closed,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::check_name;

    #[test]
    fn a_target_name_is_one_key_segment_and_fits_the_inbox_source() {
        for ok in ["shop1", "web-3.eu_west", &"a".repeat(32)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "../x", "x y", "é", &"a".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
