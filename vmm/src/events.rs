//! bdvmm's event stream (`--events FILE`): one JSON object per line, for
//! tools and tests to follow what the VM does without scraping the console
//! or bdvmm's log (docs/events.md lists the events and their fields).
//!
//! What the guest drives (its hooks, seal, refused commands) is sampled
//! from the backdoor's published table by one watcher thread and written
//! within a budget, so a guest looping on its device cannot fill the disk:
//! past [`GUEST_EVENTS_PER_SECOND`], events are counted and reported as one
//! `suppressed` line when the budget refills.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backdoor_dev::{BackdoorShared, Descriptor};
use serde::Serialize;

use crate::exit_counters::ExitCounts;
use crate::lifecycle::VmExit;

/// Most guest-driven events written per second (the rest are counted).
pub const GUEST_EVENTS_PER_SECOND: u32 = 100;
/// How often the watcher looks at the tamper count, which changes without
/// a table change.
const TAMPER_POLL: Duration = Duration::from_millis(500);

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A boot of the guest starts (1, then one more per reboot).
    Boot {
        boot: u32,
        generation: u32,
        vcpus: u8,
        guest: String,
    },
    /// The guest registered a hook.
    HookRegistered {
        generation: u32,
        id: u32,
        name: String,
        kind: String,
        gpa: u64,
        len: u64,
        perms: u32,
    },
    /// A hook went away (unregistered before the seal).
    HookUnregistered {
        generation: u32,
        id: u32,
        name: String,
    },
    /// The guest sealed its hooks.
    Sealed { generation: u32, hooks: usize },
    /// The guest's commands after the seal were refused (the count so far
    /// this generation; one line per sample, not per command).
    Tamper { generation: u32, tamper_count: u32 },
    /// Guest-driven events over the budget, not written one by one.
    Suppressed { events: u64 },
    /// The control socket paused the vCPUs.
    Paused,
    /// The control socket resumed them.
    Resumed,
    /// The guest reset (a reset request or a triple fault): `action` is
    /// what bdvmm does about it ("reboot", "stop", or "stop" with
    /// `vcpus_stuck` when a vCPU thread did not stop in time).
    Reset {
        #[serde(flatten)]
        why: VmExit,
        action: &'static str,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        vcpus_stuck: bool,
        exits: ExitCounts,
    },
    /// bdvmm stops: why, the exit status it will return, and the exits
    /// of the last boot by kind (all vCPUs together).
    Stop {
        #[serde(flatten)]
        why: VmExit,
        exit_status: u8,
        exits: ExitCounts,
    },
}

/// Where events go; a stream without a file drops them.
#[derive(Debug, Default)]
pub struct EventStream {
    file: Option<Mutex<File>>,
}

impl EventStream {
    /// Events appended to `path` (created if missing).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            file: Some(Mutex::new(file)),
        })
    }

    /// Writes `event` as one line with its wall-clock time.
    pub fn emit(&self, event: &Event) {
        let Some(file) = &self.file else { return };
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(event) else {
            return;
        };
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut line = serde_json::Map::new();
        line.insert("ts_unix_ms".into(), ts.into());
        line.extend(fields);
        let mut text = serde_json::Value::Object(line).to_string();
        text.push('\n');
        // One write per line, so a reader never sees half of one; a full
        // disk loses events, never the VM.
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(text.as_bytes()) {
            tracing::debug!("events: cannot write: {e}");
        }
    }

    /// Whether events go anywhere.
    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }
}

/// What the guest changed between two looks at its backdoor.
fn backdoor_changes(before: &Descriptor, now: &Descriptor) -> Vec<Event> {
    let generation = now.generation;
    let same_boot = before.generation == now.generation;
    let mut out = Vec::new();
    if same_boot {
        for h in &before.hooks {
            if !now.hooks.iter().any(|n| n.id == h.id) {
                out.push(Event::HookUnregistered {
                    generation,
                    id: h.id,
                    name: h.name.clone(),
                });
            }
        }
    }
    for h in &now.hooks {
        let known = same_boot && before.hooks.iter().any(|b| b.id == h.id);
        if !known {
            out.push(Event::HookRegistered {
                generation,
                id: h.id,
                name: h.name.clone(),
                kind: h.kind.name().to_owned(),
                gpa: h.gpa,
                len: h.len,
                perms: h.perms,
            });
        }
    }
    if now.sealed && !(same_boot && before.sealed) {
        out.push(Event::Sealed {
            generation,
            hooks: now.hooks.len(),
        });
    }
    out
}

/// A budget of guest-driven events per second.
#[derive(Debug)]
struct Budget {
    window: Instant,
    written: u32,
    suppressed: u64,
}

impl Budget {
    fn new() -> Self {
        Self {
            window: Instant::now(),
            written: 0,
            suppressed: 0,
        }
    }

    /// Starts a new second if this one is over, telling what the last
    /// one did not write.
    fn tick(&mut self, events: &EventStream) {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.written = 0;
            if self.suppressed > 0 {
                events.emit(&Event::Suppressed {
                    events: std::mem::take(&mut self.suppressed),
                });
            }
        }
    }

    /// Writes `e` if the budget allows, else counts it.
    fn emit(&mut self, events: &EventStream, e: &Event) {
        self.tick(events);
        if self.written < GUEST_EVENTS_PER_SECOND {
            self.written += 1;
            events.emit(e);
        } else {
            self.suppressed += 1;
        }
    }
}

/// The thread that turns the backdoor's changes into events.
#[derive(Debug)]
pub struct BackdoorWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BackdoorWatcher {
    /// Watches `backdoor` until dropped (nothing when `events` goes nowhere).
    pub fn start(events: Arc<EventStream>, backdoor: Arc<BackdoorShared>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        if !events.enabled() {
            return Ok(Self { stop, thread: None });
        }
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bd-events".into())
            .spawn(move || watch(&events, &backdoor, &flag))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for BackdoorWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(events: &EventStream, backdoor: &BackdoorShared, stop: &AtomicBool) {
    let mut budget = Budget::new();
    let (mut version, mut seen) = backdoor.wait_change(u64::MAX, Duration::ZERO);
    let mut tamper = 0;
    // What the guest did before the watcher started is news too.
    let nothing = Descriptor {
        generation: 0,
        sealed: false,
        tamper_count: 0,
        hooks: Vec::new(),
    };
    for e in backdoor_changes(&nothing, &seen) {
        budget.emit(events, &e);
    }
    while !stop.load(Ordering::Relaxed) {
        let (v, now) = backdoor.wait_change(version, TAMPER_POLL);
        if v != version {
            for e in backdoor_changes(&seen, &now) {
                budget.emit(events, &e);
            }
            if now.generation != seen.generation {
                tamper = 0;
            }
            version = v;
            seen = now;
        }
        // What went over the budget is told within a second or so.
        budget.tick(events);
        let t = backdoor.tamper_count();
        if t > tamper {
            tamper = t;
            budget.emit(
                events,
                &Event::Tamper {
                    generation: seen.generation,
                    tamper_count: t,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use backdoor_abi::descriptor::Hook;
    use backdoor_abi::HookKind;

    use super::*;

    fn hook(id: u32, name: &str) -> Hook {
        Hook {
            id,
            gpa: 0x1000 * u64::from(id),
            len: 4096,
            kind: HookKind::ProgressBox,
            perms: 1,
            name: name.into(),
        }
    }

    fn desc(generation: u32, sealed: bool, hooks: Vec<Hook>) -> Descriptor {
        Descriptor {
            generation,
            sealed,
            tamper_count: 0,
            hooks,
        }
    }

    #[test]
    fn registrations_removals_and_the_seal_are_told_once() {
        let a = desc(7, false, vec![hook(1, "p"), hook(2, "s")]);
        let b = desc(7, true, vec![hook(1, "p"), hook(3, "i")]);
        let names: Vec<_> = backdoor_changes(&a, &b)
            .iter()
            .map(|e| serde_json::to_value(e).unwrap()["event"].clone())
            .collect();
        assert_eq!(
            names,
            ["hook_unregistered", "hook_registered", "sealed"].map(serde_json::Value::from)
        );
        assert!(backdoor_changes(&b, &b).is_empty());
    }

    #[test]
    fn a_new_generation_is_a_fresh_table() {
        let a = desc(7, true, vec![hook(1, "p")]);
        let b = desc(8, true, vec![hook(1, "p")]);
        let e = backdoor_changes(&a, &b);
        assert!(
            matches!(
                &e[..],
                [
                    Event::HookRegistered { generation: 8, .. },
                    Event::Sealed { .. }
                ]
            ),
            "{e:?}"
        );
    }

    #[test]
    fn events_over_the_budget_are_counted_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let events = EventStream::open(&path).unwrap();
        let mut budget = Budget::new();
        for _ in 0..10 * GUEST_EVENTS_PER_SECOND {
            budget.emit(&events, &Event::Paused);
        }
        budget.window -= Duration::from_secs(1);
        budget.emit(&events, &Event::Resumed);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), GUEST_EVENTS_PER_SECOND as usize + 2);
        let s = &lines[GUEST_EVENTS_PER_SECOND as usize];
        assert_eq!(
            (s["event"].as_str(), s["events"].as_u64()),
            (
                Some("suppressed"),
                Some(9 * u64::from(GUEST_EVENTS_PER_SECOND))
            )
        );
        assert!(lines.iter().all(|l| l["ts_unix_ms"].as_u64() > Some(0)));
    }
}
