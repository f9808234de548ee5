//! Hang detection: every counter judged against its deadline by the
//! monitor's own clock (never the guest's), and the verdict for a target.
//!
//! A counter is hung when it is ACTIVE and its value has not changed for
//! longer than its deadline. IDLE counters are never hung. A backdoor that
//! cannot be read is "unreachable", never "hung". A new generation means
//! the guest rebooted; a growing tamper count means it tried to change its
//! sealed backdoor.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use backdoor_abi::{Counter, CounterState, Level};
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

/// What one poll saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Backdoor generation.
    pub generation: u32,
    /// Tamper counter.
    pub tamper_count: u32,
    /// Whether the guest sealed its hooks.
    pub sealed: bool,
    /// Every used counter of every progress box.
    pub counters: Vec<CounterObs>,
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

/// A target's state after a poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "lowercase")]
pub enum Verdict {
    /// Every active counter moves within its deadline.
    Healthy,
    /// Nothing to judge: every counter is idle (or retired).
    Idle,
    /// A counter stalled past its deadline.
    Hung {
        /// The most severe hung level.
        level: HangLevel,
        /// The counter that shows it.
        counter: String,
        /// How long it has not moved, by the monitor's clock.
        stalled_ms: u64,
        /// Its deadline.
        deadline_ms: u32,
        /// Where the counter lives: its progress box and slot.
        hook: String,
        /// Its slot in that box.
        slot: u32,
        /// Its owner as the guest wrote it (a pid, a session number).
        owner: u32,
        /// Whether it claimed the OS level it was not believed.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        claimed_os: bool,
    },
    /// The backdoor itself could not be read.
    Unreachable {
        /// Why.
        reason: String,
    },
}

impl Verdict {
    /// Short name for tables and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Idle => "idle",
            Self::Hung { .. } => "hung",
            Self::Unreachable { .. } => "unreachable",
        }
    }

    /// Whether two verdicts are the same situation (a hang's growing
    /// stall time is not a new situation).
    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (
                Self::Hung {
                    level: a,
                    hook: h1,
                    slot: s1,
                    ..
                },
                Self::Hung {
                    level: b,
                    hook: h2,
                    slot: s2,
                    ..
                },
            ) => a == b && h1 == h2 && s1 == s2,
            (Self::Unreachable { .. }, Self::Unreachable { .. }) => true,
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

#[derive(Debug, Clone, Copy)]
struct Track {
    value: u64,
    state: u8,
    changed_at: Instant,
}

/// The running judgement of one target.
#[derive(Debug, Default)]
pub struct Judge {
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

impl Judge {
    /// A judge that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
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
        let mut worst: Option<(HangLevel, u64, &CounterObs)> = None;
        let mut any_active = false;
        for c in &obs.counters {
            let key = (c.hook.clone(), c.slot);
            let state = c.counter.state;
            let t = self.tracks.entry(key).or_insert(Track {
                value: c.counter.value,
                state,
                changed_at: now,
            });
            // A change of value, or a return from idle, restarts the stall clock.
            if t.value != c.counter.value || t.state != state || restart {
                *t = Track {
                    value: c.counter.value,
                    state,
                    changed_at: now,
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
                    worst = Some((level, stalled_ms, c));
                }
            }
        }
        match worst {
            Some((level, stalled_ms, c)) => Verdict::Hung {
                level,
                counter: c.name(),
                stalled_ms,
                deadline_ms: c.counter.deadline_ms,
                hook: c.hook.clone(),
                slot: c.slot,
                owner: c.counter.owner,
                claimed_os: c.claimed_os,
            },
            None if any_active => Verdict::Healthy,
            None => Verdict::Idle,
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
            counters,
        }
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
                level: HangLevel::Os,
                counter: "kernel".into(),
                stalled_ms: 110,
                deadline_ms: 100,
                hook: "progress".into(),
                slot: 0,
                owner: 0,
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
                level: HangLevel::Application,
                ..
            })
        ));
        let ev = j.observe(t0 + Duration::from_millis(60), Ok(&obs(1, 0, cs)));
        assert!(
            matches!(verdict_of(&ev), Some(Verdict::Hung { level: HangLevel::Os, counter, .. }) if counter == "kernel")
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
            matches!(verdict_of(&ev), Some(Verdict::Hung { counter, slot: 1, owner: 77, .. }) if counter == "worker"),
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
