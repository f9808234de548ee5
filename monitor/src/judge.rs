//! Hang detection: every counter judged against its deadline by the
//! monitor's own clock (never the guest's), and the verdict for a target.
//!
//! A counter is hung when it is ACTIVE and its value has not changed for
//! longer than its deadline. IDLE counters are never hung, and "idle" is a
//! verdict only when counters say so: a guest with nothing left to judge
//! (a new generation that registers no counter within the grace period,
//! a progress box that disappears) is "lost", and a progress box whose
//! header goes bad after it was seen good is "corrupt"; until a generation
//! shows its first counter it is "starting". A backdoor that cannot be
//! read is "unreachable", never "hung". A new generation means the guest
//! rebooted; a growing tamper count means it tried to change its sealed
//! backdoor.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backdoor_abi::{Counter, CounterState, Level};
use backdoor_proto::sched::ThreadSched;
use serde::Serialize;

/// One counter as polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterObs {
    /// Progress-box hook name.
    pub hook: String,
    /// Its slot in the box (0-based): where it lives, which the guest
    /// cannot fake (its `id` it can).
    pub slot: u32,
    /// Whether it claimed the OS level from memory applications write
    /// (its level is then APPLICATION here).
    pub claimed_os: bool,
    /// The counter.
    pub counter: Counter,
}

impl CounterObs {
    /// The counter's name.
    pub fn name(&self) -> String {
        backdoor_abi::decode_name(&self.counter.name)
            .unwrap_or("?")
            .to_owned()
    }
}

/// One progress box as polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxObs {
    /// Its hook's name.
    pub hook: String,
    /// Why its header is unusable (its counters were not read), if it is.
    pub problem: Option<String>,
}

/// What one poll saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Backdoor generation.
    pub generation: u32,
    /// Tamper counter.
    pub tamper_count: u32,
    /// Whether the guest sealed its hooks.
    pub sealed: bool,
    /// Every progress box the descriptor lists.
    pub boxes: Vec<BoxObs>,
    /// Every used counter of every usable progress box.
    pub counters: Vec<CounterObs>,
    /// The host's view of each vCPU thread at this poll (`SCHED`), if
    /// the agent gives it.
    pub sched: Option<Arc<Vec<ThreadSched>>>,
}

/// The level of a hang, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HangLevel {
    /// The guest kernel stopped.
    Os,
    /// An application stopped.
    Application,
    /// One session stopped.
    Session,
}

impl HangLevel {
    fn from_level(l: Option<Level>) -> Self {
        match l {
            Some(Level::Os) => Self::Os,
            Some(Level::Session) => Self::Session,
            _ => Self::Application,
        }
    }
}

/// A counter that stalled past its deadline, and where it lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stall {
    /// Its level.
    pub level: HangLevel,
    /// Its name.
    pub counter: String,
    /// How long it has not moved, by the monitor's clock.
    pub stalled_ms: u64,
    /// Its deadline.
    pub deadline_ms: u32,
    /// Where it lives: its progress box and slot.
    pub hook: String,
    /// Its slot in that box.
    pub slot: u32,
    /// Its owner as the guest wrote it (a pid, a CPU, a session number).
    pub owner: u32,
}

impl Stall {
    /// The same counter at the same level (its growing stall is no news).
    fn same(&self, o: &Self) -> bool {
        (self.level, &self.hook, self.slot) == (o.level, &o.hook, o.slot)
    }
}

/// A target's state after a poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "lowercase")]
pub enum Verdict {
    /// Every active counter moves within its deadline.
    Healthy,
    /// Every counter says it is idle (or retired): nothing is due.
    Idle,
    /// This generation has shown no counter yet (a guest still booting);
    /// past the grace period this is `Lost`.
    Starting {
        /// How long it has been waited for, by the monitor's clock.
        waited_ms: u64,
    },
    /// Nothing is left to judge the guest by: a progress box seen this
    /// generation disappeared, its counters are all gone, or a generation
    /// registered no counter within the grace period (a guest that
    /// rebooted and hung before its driver loaded). Acted on as a hang.
    Lost {
        /// What was lost.
        reason: String,
    },
    /// A progress box seen good this generation has an unusable header
    /// now (a wild write): its counters cannot be judged. Acted on as a hang.
    Corrupt {
        /// The box's hook.
        hook: String,
        /// What is wrong with its header.
        reason: String,
    },
    /// A counter stalled past its deadline.
    Hung {
        /// The stalled counter (the most severe level, the longest stall).
        #[serde(flatten)]
        stall: Stall,
        /// Whether it claimed the OS level it was not believed.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        claimed_os: bool,
    },
    /// A counter stalled past its deadline, but its vCPUs waited for a
    /// host CPU more than they ran and ran less than the deadline: the
    /// host starved the guest, it did not hang. Not acted on.
    Starved {
        /// The stalled counter.
        #[serde(flatten)]
        stall: Stall,
        /// The most any vCPU thread ran in the stall.
        ran_ms: u64,
        /// The most any vCPU thread waited for a CPU in the stall.
        waited_ms: u64,
        /// `ran_ms` per thousand of the stall.
        cpu_permille: u64,
    },
    /// A counter stalled past its deadline while the host has the vCPU
    /// threads stopped (SIGSTOP, a debugger): not a guest hang. Not acted on.
    #[serde(rename = "stalled_by_host")]
    StalledByHost {
        /// The counter.
        counter: String,
        /// How long it has not moved.
        stalled_ms: u64,
        /// The vCPUs whose threads are stopped.
        stopped_vcpus: Vec<u8>,
    },
    /// The backdoor itself could not be read.
    Unreachable {
        /// Why.
        reason: String,
    },
}

impl Verdict {
    /// Whether this verdict runs the hang actions (and opens an incident).
    pub fn calls_for_action(&self) -> bool {
        matches!(
            self,
            Verdict::Hung { .. } | Verdict::Lost { .. } | Verdict::Corrupt { .. }
        )
    }

    /// Every name [`Verdict::name`] gives.
    pub const NAMES: &'static [&'static str] = &[
        "healthy",
        "idle",
        "starting",
        "lost",
        "corrupt",
        "hung",
        "starved",
        "stalled_by_host",
        "unreachable",
    ];

    /// Short name for tables and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Idle => "idle",
            Self::Starting { .. } => "starting",
            Self::Lost { .. } => "lost",
            Self::Corrupt { .. } => "corrupt",
            Self::Hung { .. } => "hung",
            Self::Starved { .. } => "starved",
            Self::StalledByHost { .. } => "stalled_by_host",
            Self::Unreachable { .. } => "unreachable",
        }
    }

    /// Whether two verdicts are the same situation (a hang's growing
    /// stall time is not a new situation).
    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Hung { stall: a, .. }, Self::Hung { stall: b, .. })
            | (Self::Starved { stall: a, .. }, Self::Starved { stall: b, .. }) => a.same(b),
            (Self::Unreachable { .. }, Self::Unreachable { .. }) => true,
            (Self::Corrupt { hook: a, .. }, Self::Corrupt { hook: b, .. }) => a == b,
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

/// Something worth telling: a verdict change or a one-off fact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// The verdict changed.
    Verdict {
        /// The new verdict.
        #[serde(flatten)]
        verdict: Verdict,
        /// The generation it applies to (none while unreachable).
        generation: Option<u32>,
    },
    /// The generation changed: the guest rebooted.
    Rebooted {
        /// Previous generation.
        from: u32,
        /// New generation.
        to: u32,
    },
    /// The tamper counter grew.
    Tampered {
        /// Previous count.
        from: u32,
        /// New count.
        to: u32,
    },
}

#[derive(Debug, Clone)]
struct Track {
    value: u64,
    state: u8,
    changed_at: Instant,
    /// The host's view of the vCPUs when the value last changed.
    sched_at_change: Option<Arc<Vec<ThreadSched>>>,
}

/// The host's view of every vCPU thread at one poll.
type Sched = Arc<Vec<ThreadSched>>;

/// What the host did with the vCPUs during a stall.
#[derive(Debug, PartialEq, Eq)]
enum HostView {
    /// Nothing says the guest lacked CPU: a stall is a hang.
    Ran,
    /// The vCPUs waited for a CPU more than they ran, and ran less than
    /// the deadline.
    Starved { ran_ns: u64, waited_ns: u64 },
    /// These vCPU threads are stopped by the host.
    Stopped(Vec<u8>),
}

/// Judges the host's share in a stall of `stalled` of a counter with
/// `deadline` from the vCPU threads as they were when it last moved
/// (`before`) and now.
fn host_view(
    before: Option<&[ThreadSched]>,
    now: Option<&[ThreadSched]>,
    deadline: Duration,
    stalled: Duration,
) -> HostView {
    let Some(now) = now else {
        return HostView::Ran;
    };
    let stopped: Vec<u8> = now
        .iter()
        .filter(|t| t.state == "T" || t.state == "t")
        .map(|t| t.vcpu)
        .collect();
    if !stopped.is_empty() {
        return HostView::Stopped(stopped);
    }
    let Some(before) = before else {
        return HostView::Ran;
    };
    let (mut ran, mut waited) = (0u64, 0u64);
    // The kernel adds a wait to `wait_ns` only when the wait ends: a
    // thread still waiting shows as runnable (R) with no new run time.
    let mut runnable = false;
    for t in now {
        // The same thread then and now (a new boot has new threads).
        if let Some(b) = before.iter().find(|b| b.vcpu == t.vcpu && b.tid == t.tid) {
            ran = ran.max(t.run_ns.saturating_sub(b.run_ns));
            waited = waited.max(t.wait_ns.saturating_sub(b.wait_ns));
            runnable |= t.state == "R";
        }
    }
    // Starved: it barely ran (under a tenth of the stall, and less than
    // a deadline) because it waited for a CPU (or is waiting still,
    // runnable). A guest the host merely slows (a loaded host gives it a
    // quarter of a CPU) still ran more than that: a stall is then a hang,
    // as is any stall after a whole deadline of CPU, however slowly the
    // host gave it. A halted vCPU sleeps: it neither runs nor waits, and
    // is stuck.
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let barely_ran = ran < ns(deadline) && ran.saturating_mul(10) < ns(stalled);
    if barely_ran && (waited > ran || runnable) {
        HostView::Starved {
            ran_ns: ran,
            waited_ns: waited,
        }
    } else {
        HostView::Ran
    }
}

/// How long a generation may take to show its first counter before it is
/// judged lost, unless told otherwise (a Linux guest boots and loads its
/// driver well within this; `bdctl watch --grace-ms`).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);

/// The running judgement of one target.
#[derive(Debug)]
pub struct Judge {
    grace: Duration,
    /// When this generation was first seen (or seen again after an
    /// unreachable spell).
    since: Option<Instant>,
    /// Progress boxes seen with a good header this generation.
    good_boxes: HashSet<String>,
    /// Whether this generation has shown a counter.
    counted: bool,
    generation: Option<u32>,
    tamper: Option<u32>,
    /// Stall tracks by (progress box, slot): where a counter lives, not
    /// the id the guest wrote (two counters with one id stay apart).
    tracks: HashMap<(String, u32), Track>,
    verdict: Option<Verdict>,
    /// Set after an unreachable spell: stall clocks restart, since nothing
    /// is known about progress while the backdoor could not be read.
    restart_clocks: bool,
}

impl Default for Judge {
    fn default() -> Self {
        Self::with_grace(DEFAULT_GRACE)
    }
}

impl Judge {
    /// A judge that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A judge that waits `grace` for a generation's first counter.
    pub fn with_grace(grace: Duration) -> Self {
        Self {
            grace,
            since: None,
            good_boxes: HashSet::new(),
            counted: false,
            generation: None,
            tamper: None,
            tracks: HashMap::new(),
            verdict: None,
            restart_clocks: false,
        }
    }

    /// The current verdict.
    pub fn verdict(&self) -> Option<&Verdict> {
        self.verdict.as_ref()
    }

    /// Takes one poll's result (at the monitor's time `now`) and returns
    /// what changed.
    pub fn observe(&mut self, now: Instant, poll: Result<&Observation, String>) -> Vec<Event> {
        let mut events = Vec::new();
        let mut rebooted = false;
        let verdict = match poll {
            Err(reason) => {
                self.restart_clocks = true;
                Verdict::Unreachable { reason }
            }
            Ok(obs) => {
                if let Some(g) = self.generation.filter(|&g| g != obs.generation) {
                    events.push(Event::Rebooted {
                        from: g,
                        to: obs.generation,
                    });
                    self.tracks.clear();
                    self.tamper = None;
                    self.since = None;
                    self.good_boxes.clear();
                    self.counted = false;
                    rebooted = true;
                }
                self.generation = Some(obs.generation);
                if let Some(t) = self.tamper.filter(|&t| obs.tamper_count > t) {
                    events.push(Event::Tampered {
                        from: t,
                        to: obs.tamper_count,
                    });
                }
                self.tamper = Some(obs.tamper_count);
                self.judge(now, obs)
            }
        };
        // A new generation's verdict is always announced, even where it
        // equals the last one: it is about another boot of the guest.
        let changed = rebooted || self.verdict.as_ref().is_none_or(|v| !v.same(&verdict));
        if changed {
            let generation = (!matches!(verdict, Verdict::Unreachable { .. }))
                .then_some(self.generation)
                .flatten();
            events.push(Event::Verdict {
                verdict: verdict.clone(),
                generation,
            });
        }
        self.verdict = Some(verdict);
        events
    }

    fn judge(&mut self, now: Instant, obs: &Observation) -> Verdict {
        let restart = std::mem::take(&mut self.restart_clocks);
        if restart {
            self.since = None;
        }
        let since = *self.since.get_or_insert(now);
        for b in obs.boxes.iter().filter(|b| b.problem.is_none()) {
            self.good_boxes.insert(b.hook.clone());
        }
        let corrupt = obs
            .boxes
            .iter()
            .find(|b| b.problem.is_some() && self.good_boxes.contains(&b.hook));
        let mut gone: Vec<_> = self
            .good_boxes
            .iter()
            .filter(|h| !obs.boxes.iter().any(|b| &b.hook == *h))
            .collect();
        gone.sort();
        self.counted |= !obs.counters.is_empty();
        let mut worst: Option<(HangLevel, u64, &CounterObs, Option<Sched>)> = None;
        let mut any_active = false;
        for c in &obs.counters {
            let key = (c.hook.clone(), c.slot);
            let state = c.counter.state;
            let t = self.tracks.entry(key).or_insert_with(|| Track {
                value: c.counter.value,
                state,
                changed_at: now,
                sched_at_change: obs.sched.clone(),
            });
            // A change of value, or a return from idle, restarts the stall clock.
            if t.value != c.counter.value || t.state != state || restart {
                *t = Track {
                    value: c.counter.value,
                    state,
                    changed_at: now,
                    sched_at_change: obs.sched.clone(),
                };
            }
            if c.counter.state() != Some(CounterState::Active) {
                continue;
            }
            any_active = true;
            let stalled = now.saturating_duration_since(t.changed_at);
            if stalled > Duration::from_millis(u64::from(c.counter.deadline_ms)) {
                let level = HangLevel::from_level(c.counter.level());
                // Rounded up: it is strictly past the deadline, and should read so.
                let stalled_ms =
                    u64::try_from(stalled.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
                if worst
                    .as_ref()
                    .is_none_or(|w| level < w.0 || (level == w.0 && stalled_ms > w.1))
                {
                    worst = Some((level, stalled_ms, c, t.sched_at_change.clone()));
                }
            }
        }
        match worst {
            Some((level, stalled_ms, c, before)) => {
                let deadline = Duration::from_millis(u64::from(c.counter.deadline_ms));
                let now_sched = obs.sched.as_deref().map(Vec::as_slice);
                let view = host_view(
                    before.as_deref().map(Vec::as_slice),
                    now_sched,
                    deadline,
                    Duration::from_millis(stalled_ms),
                );
                let stall = Stall {
                    level,
                    counter: c.name(),
                    stalled_ms,
                    deadline_ms: c.counter.deadline_ms,
                    hook: c.hook.clone(),
                    slot: c.slot,
                    owner: c.counter.owner,
                };
                match view {
                    HostView::Stopped(stopped_vcpus) => Verdict::StalledByHost {
                        counter: c.name(),
                        stalled_ms,
                        stopped_vcpus,
                    },
                    HostView::Starved { ran_ns, waited_ns } => Verdict::Starved {
                        stall,
                        ran_ms: ran_ns / 1_000_000,
                        waited_ms: waited_ns / 1_000_000,
                        cpu_permille: (ran_ns / 1_000).saturating_div(stalled_ms.max(1)),
                    },
                    HostView::Ran => Verdict::Hung {
                        stall,
                        claimed_os: c.claimed_os,
                    },
                }
            }
            None => {
                if let Some(b) = corrupt {
                    Verdict::Corrupt {
                        hook: b.hook.clone(),
                        reason: b.problem.clone().unwrap_or_default(),
                    }
                } else if let Some(h) = gone.first() {
                    Verdict::Lost {
                        reason: format!("progress box {h} disappeared"),
                    }
                } else if any_active {
                    Verdict::Healthy
                } else if !obs.counters.is_empty() {
                    Verdict::Idle
                } else if self.counted {
                    Verdict::Lost {
                        reason: "every counter of this generation is gone".into(),
                    }
                } else {
                    let waited = now.saturating_duration_since(since);
                    if waited < self.grace {
                        Verdict::Starting {
                            waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                        }
                    } else {
                        Verdict::Lost {
                            reason: format!(
                                "generation {} showed no counter within {} ms",
                                obs.generation,
                                self.grace.as_millis()
                            ),
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use backdoor_abi::encode_name;

    use super::*;

    fn counter(
        id: u32,
        name: &str,
        value: u64,
        state: CounterState,
        level: Level,
        deadline_ms: u32,
    ) -> CounterObs {
        CounterObs {
            hook: "progress".into(),
            slot: id.saturating_sub(1),
            claimed_os: false,
            counter: Counter {
                value,
                id,
                deadline_ms,
                state: state as u8,
                level: level as u8,
                reserved0: 0,
                owner: 0,
                name: encode_name(name),
                reserved1: 0,
            },
        }
    }

    fn obs(generation: u32, tamper: u32, counters: Vec<CounterObs>) -> Observation {
        Observation {
            generation,
            tamper_count: tamper,
            sealed: true,
            boxes: vec![BoxObs {
                hook: "progress".into(),
                problem: None,
            }],
            counters,
            sched: None,
        }
    }

    fn thread(vcpu: u8, state: &str, run_ms: u64, wait_ms: u64) -> ThreadSched {
        ThreadSched {
            vcpu,
            tid: 100 + i32::from(vcpu),
            state: state.into(),
            run_ns: run_ms * 1_000_000,
            wait_ns: wait_ms * 1_000_000,
        }
    }

    #[test]
    fn the_host_view_tells_starved_from_stuck_and_stopped() {
        let d = Duration::from_millis(500);
        let stall = Duration::from_millis(1000);
        let at = |run, wait| vec![thread(0, "R", run, wait), thread(1, "S", 10, 0)];
        let before = at(1000, 0);
        // Spinning with a CPU to itself: ran the whole stall.
        assert_eq!(
            host_view(Some(&before), Some(&at(2000, 5)), d, stall),
            HostView::Ran
        );
        // Waited for a CPU more than it ran, and ran under the deadline.
        assert_eq!(
            host_view(Some(&before), Some(&at(1030, 900)), d, stall),
            HostView::Starved {
                ran_ns: 30_000_000,
                waited_ns: 900_000_000
            }
        );
        // Throttled, but it has had a deadline of CPU by now: stuck.
        assert_eq!(
            host_view(Some(&before), Some(&at(1600, 9000)), d, stall),
            HostView::Ran
        );
        // Halted: asleep in KVM, it neither ran nor waited.
        let halted = vec![thread(0, "S", 1000, 0), thread(1, "S", 10, 0)];
        assert_eq!(
            host_view(Some(&before), Some(&halted), d, stall),
            HostView::Ran
        );
        // Runnable and still waiting (the kernel counts a wait when it
        // ends): it has not run in the stall.
        assert_eq!(
            host_view(Some(&before), Some(&at(1000, 0)), d, stall),
            HostView::Starved {
                ran_ns: 0,
                waited_ns: 0
            }
        );
        // SIGSTOP.
        let stopped = vec![thread(0, "T", 1000, 0), thread(1, "T", 10, 0)];
        assert_eq!(
            host_view(Some(&before), Some(&stopped), d, stall),
            HostView::Stopped(vec![0, 1])
        );
        // No report: nothing is known, a stall is a hang as before.
        assert_eq!(host_view(None, None, d, stall), HostView::Ran);
        // New threads (a reboot): not compared with the old ones.
        let mut rebooted = at(5, 900);
        rebooted[0].tid = 999;
        assert_eq!(
            host_view(Some(&before), Some(&rebooted), d, stall),
            HostView::Ran
        );
    }

    #[test]
    fn a_starved_guest_is_starved_and_a_stopped_one_stalled_by_host_never_hung() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let c = vec![counter(
            1,
            "kernel",
            7,
            CounterState::Active,
            Level::Os,
            500,
        )];
        let with = |threads: Vec<ThreadSched>| Observation {
            sched: Some(Arc::new(threads)),
            ..obs(1, 0, c.clone())
        };
        let mut j = Judge::new();
        assert_eq!(
            verdict_of(&j.observe(at(0), Ok(&with(vec![thread(0, "R", 100, 0)])))),
            Some(&Verdict::Healthy)
        );
        let ev = j.observe(at(800), Ok(&with(vec![thread(0, "R", 110, 700)])));
        assert!(
            matches!(
                verdict_of(&ev),
                Some(Verdict::Starved {
                    ran_ms: 10,
                    waited_ms: 700,
                    cpu_permille: 12,
                    ..
                })
            ),
            "{ev:?}"
        );
        let ev = j.observe(at(900), Ok(&with(vec![thread(0, "T", 110, 700)])));
        assert!(
            matches!(verdict_of(&ev), Some(Verdict::StalledByHost { stopped_vcpus, .. }) if stopped_vcpus == &[0]),
            "{ev:?}"
        );
        // Continued, and now it has run more than a deadline without moving.
        let ev = j.observe(at(3000), Ok(&with(vec![thread(0, "R", 900, 2000)])));
        assert!(
            matches!(verdict_of(&ev), Some(Verdict::Hung { .. })),
            "{ev:?}"
        );
    }

    fn verdict_of(events: &[Event]) -> Option<&Verdict> {
        events.iter().find_map(|e| match e {
            Event::Verdict { verdict, .. } => Some(verdict),
            _ => None,
        })
    }

    #[test]
    fn a_counter_that_stops_past_its_deadline_is_hung_by_the_monitors_clock() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut j = Judge::new();
        let c = |v| {
            vec![counter(
                1,
                "kernel",
                v,
                CounterState::Active,
                Level::Os,
                100,
            )]
        };
        assert_eq!(
            verdict_of(&j.observe(t0, Ok(&obs(7, 0, c(1))))),
            Some(&Verdict::Healthy)
        );
        assert!(
            j.observe(ms(50), Ok(&obs(7, 0, c(2)))).is_empty(),
            "still healthy: no event"
        );
        assert!(
            j.observe(ms(140), Ok(&obs(7, 0, c(2)))).is_empty(),
            "90 ms stalled < 100 ms"
        );
        let ev = j.observe(ms(160), Ok(&obs(7, 0, c(2))));
        assert_eq!(
            verdict_of(&ev),
            Some(&Verdict::Hung {
                stall: Stall {
                    level: HangLevel::Os,
                    counter: "kernel".into(),
                    stalled_ms: 110,
                    deadline_ms: 100,
                    hook: "progress".into(),
                    slot: 0,
                    owner: 0,
                },
                claimed_os: false,
            })
        );
        assert!(
            j.observe(ms(300), Ok(&obs(7, 0, c(2)))).is_empty(),
            "a longer stall is the same hang"
        );
        assert_eq!(
            verdict_of(&j.observe(ms(310), Ok(&obs(7, 0, c(3))))),
            Some(&Verdict::Healthy)
        );
    }

    #[test]
    fn a_generation_with_no_counter_is_starting_then_lost_never_idle() {
        let t0 = Instant::now();
        let mut j = Judge::with_grace(Duration::from_secs(5));
        let empty = Observation {
            boxes: Vec::new(),
            ..obs(1, 0, Vec::new())
        };
        assert!(matches!(
            verdict_of(&j.observe(t0, Ok(&empty))),
            Some(Verdict::Starting { .. })
        ));
        // Still waiting: no new event.
        assert!(j
            .observe(t0 + Duration::from_secs(4), Ok(&empty))
            .is_empty());
        let ev = j.observe(t0 + Duration::from_secs(6), Ok(&empty));
        assert!(
            matches!(verdict_of(&ev), Some(Verdict::Lost { reason }) if reason.contains("no counter within 5000 ms")),
            "{ev:?}"
        );
        // A reboot starts a new wait; its first counter makes it healthy.
        let ev = j.observe(t0 + Duration::from_secs(7), Ok(&obs(2, 0, Vec::new())));
        assert!(
            matches!(verdict_of(&ev), Some(Verdict::Starting { .. })),
            "{ev:?}"
        );
        let c = vec![counter(
            1,
            "kernel",
            1,
            CounterState::Active,
            Level::Os,
            1000,
        )];
        let ev = j.observe(t0 + Duration::from_secs(8), Ok(&obs(2, 0, c)));
        assert_eq!(verdict_of(&ev), Some(&Verdict::Healthy));
    }

    #[test]
    fn a_box_that_goes_bad_or_away_after_being_seen_is_corrupt_or_lost() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_millis(s);
        let c = |v| {
            vec![counter(
                1,
                "kernel",
                v,
                CounterState::Active,
                Level::Os,
                1000,
            )]
        };
        let mut j = Judge::new();
        assert_eq!(
            verdict_of(&j.observe(at(0), Ok(&obs(1, 0, c(1))))),
            Some(&Verdict::Healthy)
        );
        let scribbled = Observation {
            boxes: vec![BoxObs {
                hook: "progress".into(),
                problem: Some("bad magic 0x00000000".into()),
            }],
            ..obs(1, 0, Vec::new())
        };
        let ev = j.observe(at(100), Ok(&scribbled));
        assert_eq!(
            verdict_of(&ev),
            Some(&Verdict::Corrupt {
                hook: "progress".into(),
                reason: "bad magic 0x00000000".into()
            })
        );
        let gone = Observation {
            boxes: Vec::new(),
            ..obs(1, 0, Vec::new())
        };
        let ev = j.observe(at(200), Ok(&gone));
        assert!(
            matches!(verdict_of(&ev), Some(Verdict::Lost { reason }) if reason == "progress box progress disappeared"),
            "{ev:?}"
        );
        // A box bad from the start is not "corrupt" (never seen good): the
        // generation is starting, and lost if it never shows a counter.
        let mut j = Judge::with_grace(Duration::from_secs(1));
        assert!(matches!(
            verdict_of(&j.observe(at(0), Ok(&scribbled))),
            Some(Verdict::Starting { .. })
        ));
        assert!(matches!(
            verdict_of(&j.observe(at(1500), Ok(&scribbled))),
            Some(Verdict::Lost { .. })
        ));
    }

    #[test]
    fn counters_that_all_go_away_leave_the_guest_lost() {
        let t0 = Instant::now();
        let mut j = Judge::new();
        let c = vec![counter(
            1,
            "app",
            1,
            CounterState::Active,
            Level::Application,
            1000,
        )];
        assert_eq!(
            verdict_of(&j.observe(t0, Ok(&obs(1, 0, c)))),
            Some(&Verdict::Healthy)
        );
        let ev = j.observe(t0 + Duration::from_millis(100), Ok(&obs(1, 0, Vec::new())));
        assert!(
            matches!(verdict_of(&ev), Some(Verdict::Lost { .. })),
            "{ev:?}"
        );
    }

    #[test]
    fn idle_counters_are_never_hung() {
        let t0 = Instant::now();
        let mut j = Judge::new();
        let idle = vec![counter(
            1,
            "svc",
            5,
            CounterState::Idle,
            Level::Application,
            10,
        )];
        assert_eq!(
            verdict_of(&j.observe(t0, Ok(&obs(1, 0, idle.clone())))),
            Some(&Verdict::Idle)
        );
        assert!(j
            .observe(t0 + Duration::from_secs(60), Ok(&obs(1, 0, idle)))
            .is_empty());
        // Back to active: the idle time does not count against it.
        let active = vec![counter(
            1,
            "svc",
            5,
            CounterState::Active,
            Level::Application,
            10,
        )];
        assert_eq!(
            verdict_of(&j.observe(t0 + Duration::from_secs(61), Ok(&obs(1, 0, active)))),
            Some(&Verdict::Healthy)
        );
    }

    #[test]
    fn the_most_severe_level_wins() {
        let t0 = Instant::now();
        let mut j = Judge::new();
        let cs = vec![
            counter(1, "session-9", 1, CounterState::Active, Level::Session, 10),
            counter(2, "kernel", 1, CounterState::Active, Level::Os, 50),
            counter(3, "shop", 1, CounterState::Active, Level::Application, 10),
        ];
        j.observe(t0, Ok(&obs(1, 0, cs.clone())));
        let ev = j.observe(t0 + Duration::from_millis(20), Ok(&obs(1, 0, cs.clone())));
        assert!(matches!(
            verdict_of(&ev),
            Some(Verdict::Hung {
                stall: Stall {
                    level: HangLevel::Application,
                    ..
                },
                ..
            })
        ));
        let ev = j.observe(t0 + Duration::from_millis(60), Ok(&obs(1, 0, cs)));
        assert!(
            matches!(verdict_of(&ev), Some(Verdict::Hung { stall: Stall { level: HangLevel::Os, counter, .. }, .. }) if counter == "kernel")
        );
    }

    #[test]
    fn two_counters_with_one_id_are_judged_apart_by_where_they_live() {
        let t0 = Instant::now();
        let mut j = Judge::new();
        // Slot 5 copies slot 1's id and keeps moving; slot 1 stops.
        let at = |v: u64, w: u64| {
            let mut a = counter(2, "worker", v, CounterState::Active, Level::Application, 50);
            let mut b = counter(2, "decoy", w, CounterState::Active, Level::Application, 50);
            (a.slot, b.slot) = (1, 5);
            a.counter.owner = 77;
            b.counter.owner = 99;
            vec![a, b]
        };
        j.observe(t0, Ok(&obs(1, 0, at(1, 1))));
        j.observe(t0 + Duration::from_millis(40), Ok(&obs(1, 0, at(1, 2))));
        let ev = j.observe(t0 + Duration::from_millis(80), Ok(&obs(1, 0, at(1, 3))));
        assert!(
            matches!(verdict_of(&ev), Some(Verdict::Hung { stall: Stall { counter, slot: 1, owner: 77, .. }, .. }) if counter == "worker"),
            "{ev:?}"
        );
    }

    #[test]
    fn an_unreadable_backdoor_is_unreachable_never_hung_and_clocks_restart_after() {
        let t0 = Instant::now();
        let mut j = Judge::new();
        let c = vec![counter(
            1,
            "kernel",
            1,
            CounterState::Active,
            Level::Os,
            100,
        )];
        j.observe(t0, Ok(&obs(1, 0, c.clone())));
        let ev = j.observe(
            t0 + Duration::from_secs(5),
            Err("connection refused".into()),
        );
        assert_eq!(
            verdict_of(&ev),
            Some(&Verdict::Unreachable {
                reason: "connection refused".into()
            })
        );
        // Reachable again after 10 s with the same value: not hung on the spot.
        let ev = j.observe(t0 + Duration::from_secs(10), Ok(&obs(1, 0, c.clone())));
        assert_eq!(verdict_of(&ev), Some(&Verdict::Healthy));
        let ev = j.observe(t0 + Duration::from_millis(10_200), Ok(&obs(1, 0, c)));
        assert!(
            matches!(verdict_of(&ev), Some(Verdict::Hung { .. })),
            "then judged normally"
        );
    }

    #[test]
    fn reboots_and_tampering_are_reported_once() {
        let t0 = Instant::now();
        let mut j = Judge::new();
        let c = vec![counter(
            1,
            "kernel",
            1,
            CounterState::Active,
            Level::Os,
            1000,
        )];
        j.observe(t0, Ok(&obs(1, 0, c.clone())));
        let ev = j.observe(t0, Ok(&obs(1, 2, c.clone())));
        assert_eq!(ev, vec![Event::Tampered { from: 0, to: 2 }]);
        assert!(j.observe(t0, Ok(&obs(1, 2, c.clone()))).is_empty());
        let ev = j.observe(t0, Ok(&obs(2, 0, c)));
        assert_eq!(ev[0], Event::Rebooted { from: 1, to: 2 });
        assert!(
            matches!(
                ev.get(1),
                Some(Event::Verdict {
                    generation: Some(2),
                    ..
                })
            ),
            "the new boot's verdict is announced even where it is unchanged: {ev:?}"
        );
    }
}
