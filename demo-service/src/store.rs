//! The sessions and their continuations. Each session owns a pair of
//! slots in the service area and writes every new version into the slot
//! that does not hold its newest complete one, so a crash mid-write
//! leaves the previous version intact (docs/abi.md). A record is written
//! after every mutating command, before the client hears `OK`.

use std::collections::BTreeMap;

use backdoor_guest::{Counter, Device, Level, Problem, Record, ServiceArea};

use crate::payload::{PayloadError, State};

/// Why a request on the store failed (the text is the client's `ERR`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Unknown session.
    #[error("no session {0}")]
    NoSession(u64),
    /// Another connection has it.
    #[error("session {0} is attached to another connection")]
    InUse(u64),
    /// Every slot pair is taken.
    #[error("server full: all {0} sessions are in use")]
    Full(usize),
    /// The new state would not fit a slot.
    #[error("the session's state would be {len} bytes, over the {max}-byte limit of a slot; nothing was changed")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// What fits.
        max: usize,
    },
    /// DEL of a missing key.
    #[error("no key {0}")]
    NoKey(String),
    /// The record could not be written.
    #[error("cannot save the session")]
    Save(#[from] backdoor_guest::Error),
}

/// Why a record was not adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// Another service's record.
    #[error("it belongs to service {0:?}")]
    Foreign(String),
    /// The payload is not a continuation.
    #[error("its payload is not a bdkv continuation")]
    Payload(#[from] PayloadError),
    /// Header and payload disagree.
    #[error(
        "its stage {stage} does not match the {applied} commands its payload says were applied"
    )]
    Inconsistent {
        /// Header stage.
        stage: u32,
        /// Payload count.
        applied: u32,
    },
    /// A store-level failure.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What adopting a record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopted {
    /// A session this instance did not have.
    New,
    /// A newer version of a session it had.
    Updated,
    /// It already had this version or a newer one.
    AlreadyCurrent,
}

/// One session.
#[derive(Debug)]
struct Session {
    state: State,
    version: u64,
    pair: usize,
    /// The slot holding the newest complete version.
    newest: Option<u32>,
    attached: bool,
    counter: Option<Counter>,
}

/// What `INFO` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    /// Record version.
    pub version: u64,
    /// Commands applied.
    pub applied: u32,
    /// Keys.
    pub keys: usize,
    /// Payload bytes.
    pub bytes: usize,
    /// Payload limit.
    pub max: usize,
}

/// Every session of this instance.
#[derive(Debug)]
pub struct Store {
    dev: Device,
    area: ServiceArea,
    sessions: BTreeMap<u64, Session>,
    pairs: Vec<Option<u64>>,
    session_deadline_ms: u32,
}

/// A mutating command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Set a key.
    Set(String, String),
    /// Delete a key.
    Del(String),
}

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source (an odd initramfs): time and pid still differ
        // between instances, and collisions are checked by the caller.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = (u64::try_from(t & u128::from(u64::MAX)).unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(40))
        .to_le_bytes();
    }
    // 48 bits: easy to type, still unlikely to collide across instances.
    u64::from_le_bytes(b) & 0xffff_ffff_ffff
}

impl Store {
    /// Opens (or creates, with room for `max_sessions`) the service's area
    /// and resumes every session found in it: the crash/restart path.
    /// Returns the store and one line per slot or session it could not use.
    pub fn open(
        dev: Device,
        service: &str,
        max_sessions: u32,
        session_deadline_ms: u32,
    ) -> Result<(Self, Vec<String>), backdoor_guest::Error> {
        let area = ServiceArea::open(&dev, service, max_sessions.saturating_mul(2), true)?;
        let pairs = vec![None; area.slot_count() as usize / 2];
        let mut store = Self {
            dev,
            area,
            sessions: BTreeMap::new(),
            pairs,
            session_deadline_ms,
        };
        let scan = store.area.scan();
        let mut notes: Vec<String> = scan
            .problems
            .iter()
            .map(|(slot, p)| match p {
                Problem::Torn => {
                    format!("slot {slot}: torn record (a write that never finished), ignored")
                }
                Problem::Corrupt(c) => format!("slot {slot}: corrupt record ({c:?}), ignored"),
                Problem::ForeignService(s) => {
                    format!("slot {slot}: a record of service {s:?}, ignored")
                }
            })
            .collect();
        for f in &scan.newest {
            if let Err(e) = store.resume_own(f.slot, &f.record) {
                notes.push(format!(
                    "slot {}: session {} not resumed: {e}",
                    f.slot,
                    f.record.session_id,
                    e = backdoor_abi::ErrorChain(&e)
                ));
            }
        }
        Ok((store, notes))
    }

    /// Takes back a session found in this instance's own area.
    fn resume_own(&mut self, slot: u32, r: &Record) -> Result<(), AdoptError> {
        let state = Self::check(r)?;
        let pair = slot as usize / 2;
        if self.pairs.get(pair).is_some_and(Option::is_none) {
            self.pairs[pair] = Some(r.session_id);
            let counter = self.counter(r.session_id);
            self.sessions.insert(
                r.session_id,
                Session {
                    state,
                    version: r.version,
                    pair,
                    newest: Some(slot),
                    attached: false,
                    counter,
                },
            );
            Ok(())
        } else {
            // Not where this instance would have put it: give it a pair.
            self.adopt(r).map(|_| ())
        }
    }

    fn check(r: &Record) -> Result<State, AdoptError> {
        let state = State::decode(&r.payload)?;
        if state.applied != r.stage {
            return Err(AdoptError::Inconsistent {
                stage: r.stage,
                applied: state.applied,
            });
        }
        Ok(state)
    }

    fn counter(&self, id: u64) -> Option<Counter> {
        let owner = u32::try_from(id & 0xffff_ffff).unwrap_or(0);
        match Counter::alloc_owned(
            &self.dev,
            &format!("bdkv-{id}"),
            self.session_deadline_ms,
            Level::Session,
            owner,
        ) {
            Ok(c) => {
                // No client yet: idle, never "hung".
                if let Err(e) = c.idle() {
                    tracing::warn!(
                        "session {id}: cannot mark its counter idle: {e}",
                        e = backdoor_abi::ErrorChain(&e)
                    );
                }
                Some(c)
            }
            Err(e) => {
                tracing::warn!(
                    "session {id}: no progress counter: {e}",
                    e = backdoor_abi::ErrorChain(&e)
                );
                None
            }
        }
    }

    fn free_pair(&mut self, id: u64) -> Result<usize, StoreError> {
        let pair = self
            .pairs
            .iter()
            .position(Option::is_none)
            .ok_or(StoreError::Full(self.pairs.len()))?;
        // Stale records of an earlier owner must not resurface on restart.
        for slot in [2 * pair, 2 * pair + 1] {
            self.area.clear(u32::try_from(slot).unwrap_or(u32::MAX))?;
        }
        self.pairs[pair] = Some(id);
        Ok(pair)
    }

    /// Writes session `id`'s current version into the slot of its pair
    /// that does not hold its newest complete record.
    fn save(&mut self, id: u64) -> Result<(), StoreError> {
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(StoreError::NoSession(id))?;
        let first = u32::try_from(2 * s.pair).unwrap_or(u32::MAX);
        let target = if s.newest == Some(first) {
            first + 1
        } else {
            first
        };
        self.area
            .write(target, id, s.version, s.state.applied, &s.state.encode())?;
        s.newest = Some(target);
        if let Some(c) = &s.counter {
            c.bump();
        }
        Ok(())
    }

    /// A new session, attached to the caller.
    pub fn create(&mut self) -> Result<u64, StoreError> {
        let mut id = random_id();
        while id == 0 || self.sessions.contains_key(&id) {
            id = random_id();
        }
        let pair = self.free_pair(id)?;
        let counter = self.counter(id);
        self.sessions.insert(
            id,
            Session {
                state: State::default(),
                version: 1,
                pair,
                newest: None,
                attached: true,
                counter,
            },
        );
        if let Err(e) = self.save(id) {
            self.sessions.remove(&id);
            self.pairs[pair] = None;
            return Err(e);
        }
        Ok(id)
    }

    /// Attaches a connection to session `id`.
    pub fn attach(&mut self, id: u64) -> Result<Info, StoreError> {
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(StoreError::NoSession(id))?;
        if s.attached {
            return Err(StoreError::InUse(id));
        }
        s.attached = true;
        self.info(id)
    }

    /// The connection left; the session stays, idle.
    pub fn detach(&mut self, id: u64) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.attached = false;
        }
        self.set_idle(id, true);
    }

    /// Marks the session's counter idle (waiting for its client) or active.
    pub fn set_idle(&self, id: u64, idle: bool) {
        if let Some(c) = self.sessions.get(&id).and_then(|s| s.counter.as_ref()) {
            let r = if idle { c.idle() } else { c.active() };
            if let Err(e) = r {
                tracing::warn!(
                    "session {id}: counter state: {e}",
                    e = backdoor_abi::ErrorChain(&e)
                );
            }
        }
    }

    /// Applies a mutation, writes the new version, returns it.
    pub fn apply(&mut self, id: u64, m: Mutation) -> Result<u64, StoreError> {
        let max = self.area.max_payload();
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(StoreError::NoSession(id))?;
        let mut next = s.state.clone();
        match m {
            Mutation::Set(k, v) => {
                next.map.insert(k, v);
            }
            Mutation::Del(k) => {
                next.map.remove(&k).ok_or(StoreError::NoKey(k))?;
            }
        }
        next.applied = next.applied.saturating_add(1);
        let len = next.encoded_len();
        if len > max {
            return Err(StoreError::TooLarge { len, max });
        }
        let previous = std::mem::replace(&mut s.state, next);
        s.version += 1;
        if let Err(e) = self.save(id) {
            let s = self
                .sessions
                .get_mut(&id)
                .ok_or(StoreError::NoSession(id))?;
            s.state = previous;
            s.version -= 1;
            return Err(e);
        }
        Ok(self.sessions.get(&id).map_or(0, |s| s.version))
    }

    /// A key's value.
    pub fn get(&self, id: u64, key: &str) -> Result<Option<String>, StoreError> {
        let s = self.sessions.get(&id).ok_or(StoreError::NoSession(id))?;
        Ok(s.state.map.get(key).cloned())
    }

    /// Every key and value.
    pub fn list(&self, id: u64) -> Result<Vec<(String, String)>, StoreError> {
        let s = self.sessions.get(&id).ok_or(StoreError::NoSession(id))?;
        Ok(s.state
            .map
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    /// The session's numbers.
    pub fn info(&self, id: u64) -> Result<Info, StoreError> {
        let s = self.sessions.get(&id).ok_or(StoreError::NoSession(id))?;
        Ok(Info {
            version: s.version,
            applied: s.state.applied,
            keys: s.state.map.len(),
            bytes: s.state.encoded_len(),
            max: self.area.max_payload(),
        })
    }

    /// Ends session `id`: its records are cleared (older first, so a crash
    /// in between leaves the newest, not a stale one) and its pair freed.
    pub fn end(&mut self, id: u64) -> Result<(), StoreError> {
        let s = self.sessions.get(&id).ok_or(StoreError::NoSession(id))?;
        let first = u32::try_from(2 * s.pair).unwrap_or(u32::MAX);
        let order = if s.newest == Some(first) {
            [first + 1, first]
        } else {
            [first, first + 1]
        };
        for slot in order {
            self.area.clear(slot)?;
        }
        let pair = s.pair;
        self.pairs[pair] = None;
        self.sessions.remove(&id);
        Ok(())
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        self.area.name()
    }

    /// Adopts a session record from another instance (an extraction or
    /// the inbox), keeping its id, contents and version.
    pub fn adopt(&mut self, r: &Record) -> Result<Adopted, AdoptError> {
        if r.service != self.area.name() {
            return Err(AdoptError::Foreign(r.service.clone()));
        }
        let state = Self::check(r)?;
        if let Some(s) = self.sessions.get_mut(&r.session_id) {
            if s.version >= r.version {
                return Ok(Adopted::AlreadyCurrent);
            }
            if s.attached {
                return Err(StoreError::InUse(r.session_id).into());
            }
            let previous = (std::mem::replace(&mut s.state, state), s.version);
            s.version = r.version;
            if let Err(e) = self.save(r.session_id) {
                if let Some(s) = self.sessions.get_mut(&r.session_id) {
                    (s.state, s.version) = previous;
                }
                return Err(e.into());
            }
            return Ok(Adopted::Updated);
        }
        let pair = self.free_pair(r.session_id)?;
        let counter = self.counter(r.session_id);
        self.sessions.insert(
            r.session_id,
            Session {
                state,
                version: r.version,
                pair,
                newest: None,
                attached: false,
                counter,
            },
        );
        if let Err(e) = self.save(r.session_id) {
            self.sessions.remove(&r.session_id);
            self.pairs[pair] = None;
            return Err(e.into());
        }
        Ok(Adopted::New)
    }
}
