//! What `bdctl watch` does about a hang (or a lost or corrupt guest), on
//! a thread of its own: in cluster mode, first open the incident (so one
//! monitor acts); then an evidence bundle, the `--on-hang` command beside
//! the extraction, and the hand-over of the sessions to the target's
//! receiver under the incident's fencing token. Each step is recorded in
//! the incident; a monitor that lost it stops at its next step.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use backdoor_proto::{Client, Role};
use serde_json::{json, Value};

use crate::cluster::incident::{self, Held, IncidentError, Opened, State};
use crate::cluster::Cluster;
use crate::extract;
use crate::handover::{self, HandoverError};
use crate::target::Target;
use crate::watch::{now_ms, Job, Report, View, WatchOptions};

/// Everything one hang's actions need.
pub(crate) struct Hang {
    pub job: Job,
    pub event: Value,
    pub opts: WatchOptions,
    pub tx: mpsc::Sender<Report>,
    /// The watch's own connection, for the extraction.
    pub held: Option<Client>,
    pub cluster: Option<Arc<Cluster>>,
    /// Set when the target is no longer this monitor's to watch.
    pub stop: Arc<AtomicBool>,
    pub view: Arc<Mutex<View>>,
}

/// Whether a hang of `job` has anything to do.
pub(crate) fn wanted(opts: &WatchOptions, cluster: bool) -> bool {
    cluster
        || opts.evidence_dir.is_some()
        || opts.on_hang.is_some()
        || opts.extract_on_hang.is_some()
}

/// A fault-injection hook for the fencing test (docs/cluster.md): while
/// the file this names exists, a hand-over waits after its last check and
/// before its claim, as a monitor paused there would.
const HOLD_BEFORE_CLAIM: &str = "BDCTL_HOLD_BEFORE_CLAIM";

/// Connections tried to a receiver before its hand-over fails, after
/// 250, 500, 1000 and 2000 ms (about 4 s of back-off in all).
const CONNECT_ATTEMPTS: u32 = 5;
const CONNECT_FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Starts the actions; the thread sends [`Report::Action`]s and, last,
/// [`Report::ActionsFinished`].
pub(crate) fn start(h: Hang) {
    std::thread::spawn(move || {
        let tx = h.tx.clone();
        run(h);
        let _ = tx.send(Report::ActionsFinished);
    });
}

fn run(mut h: Hang) {
    let name = h.job.target.name.clone();
    let say = |mut v: Value| {
        v["target"] = json!(name);
        v["ts_unix_ms"] = json!(now_ms());
        let _ = h.tx.send(Report::Action(v));
    };
    let generation = h.event["generation"].as_u64().unwrap_or(0);
    let mut inc = match &h.cluster {
        Some(c) => match open_incident(c, &h, generation, &say) {
            Some(held) => Some(held),
            None => return,
        },
        None => None,
    };
    let token = inc.as_ref().map(Held::token);
    if let Some(t) = token {
        h.event["incident_token"] = json!(t);
    }
    // Records a step; false once the incident is no longer this monitor's.
    let mut record = |step: &str, detail: Value| -> bool {
        let (Some(held), Some(c)) = (inc.as_mut(), h.cluster.as_deref()) else {
            return true;
        };
        match held.step(c, step, detail, State::Open) {
            Ok(()) => true,
            Err(e) => {
                say(
                    json!({"event": "incident", "state": "lost", "generation": generation,
                           "reason": backdoor_abi::ErrorChain(&e).to_string()}),
                );
                false
            }
        }
    };
    if let Some(dir) = &h.opts.evidence_dir {
        let v = match capture_evidence(&h.job.target, &h.event, dir, &h.opts) {
            Ok(file) => {
                h.event["evidence"] = json!(file.display().to_string());
                json!({"event": "evidence", "file": file.display().to_string()})
            }
            Err(e) => json!({"event": "action_failed", "error": e}),
        };
        say(v.clone());
        if !record("evidence", v) {
            return;
        }
    }
    let on_hang = h.opts.on_hang.clone().map(|cmd| {
        let (event, target) = (h.event.clone(), h.job.target.clone());
        std::thread::spawn(move || run_command(&cmd, &event, &target))
    });
    let resume = h
        .cluster
        .is_some()
        .then_some(h.job.resume.as_ref())
        .flatten();
    let mut extraction = None;
    if h.opts.extract_on_hang.is_some() || resume.is_some() {
        let v = match extract_with_retries(
            &h.job.target,
            h.opts.extract_on_hang.as_deref(),
            h.opts.timeout,
            h.held.take(),
        ) {
            Ok((file, x, attempts)) => {
                let v = json!({
                    "event": "extracted", "file": file.as_ref().map(|f| f.display().to_string()),
                    "sessions": x.sessions.len(), "accepted": x.summary.accepted, "torn": x.summary.torn,
                    "corrupt": x.summary.corrupt, "generation": x.generation, "attempts": attempts,
                });
                extraction = Some(x);
                v
            }
            Err(e) => json!({"event": "action_failed", "error": e}),
        };
        say(v.clone());
        if !record("extracted", v) {
            return;
        }
    }
    if let Some(t) = on_hang {
        let v = t.join().unwrap_or_else(
            |_| json!({"event": "action_failed", "error": "the on-hang thread panicked"}),
        );
        say(v.clone());
        if !record("action", v) {
            return;
        }
    }
    if let (Some(r), Some(x), Some(token)) = (resume, &extraction, token) {
        if !record("resuming", json!({"to": r.to.name})) {
            return;
        }
        say(json!({"event": "resuming", "to": r.to.name, "token": token}));
        hold_before_claim();
        let v = match resume_to(r, x, token, h.opts.timeout) {
            Ok(d) => {
                json!({"event": "resumed", "to": r.to.name, "sessions": d.sessions, "token": d.token})
            }
            Err(e @ HandoverError::Fenced { .. }) => {
                json!({"event": "fenced", "to": r.to.name, "token": token,
                                                            "reason": backdoor_abi::ErrorChain(&e).to_string()})
            }
            Err(e) => json!({"event": "action_failed", "to": r.to.name,
                             "error": backdoor_abi::ErrorChain(&e).to_string()}),
        };
        say(v.clone());
        let step = v["event"].as_str().unwrap_or("resume").to_owned();
        if !record(&step, v) {
            return;
        }
    }
    if let (Some(held), Some(c)) = (inc.as_mut(), h.cluster.as_deref()) {
        match held.step(c, "done", Value::Null, State::Done) {
            Ok(()) => say(
                json!({"event": "incident", "state": "done", "generation": generation,
                                 "token": held.token()}),
            ),
            Err(e) => say(
                json!({"event": "incident", "state": "lost", "generation": generation,
                                 "reason": backdoor_abi::ErrorChain(&e).to_string()}),
            ),
        }
    }
}

/// Opens the incident, retrying while this monitor cannot (cut off from
/// etcd, or not yet the owner) and the target is still its own and still
/// hung; `None` if another monitor has it or the chance passed.
fn open_incident(c: &Cluster, h: &Hang, generation: u64, say: &dyn Fn(Value)) -> Option<Held> {
    let mut waiting_said = false;
    loop {
        let why = match incident::open(c, &h.job.target.name, generation, &h.event) {
            Ok(Opened::Mine(held)) => {
                say(
                    json!({"event": "incident", "state": "acting", "generation": generation,
                           "token": held.token(), "monitor": c.id}),
                );
                return Some(held);
            }
            Ok(Opened::Taken(i)) => {
                say(
                    json!({"event": "incident", "state": "taken", "generation": generation,
                           "by": i.monitor, "token": i.token}),
                );
                return None;
            }
            Err(e) => e,
        };
        let still = !h.stop.load(Ordering::Relaxed)
            && crate::watch::lock(&h.view)
                .verdict
                .as_ref()
                .is_some_and(crate::judge::Verdict::calls_for_action);
        let reason = backdoor_abi::ErrorChain(&why).to_string();
        if !still {
            say(
                json!({"event": "incident", "state": "not_acting", "generation": generation,
                       "reason": reason}),
            );
            return None;
        }
        if !waiting_said || matches!(why, IncidentError::Lost { .. }) {
            say(
                json!({"event": "incident", "state": "waiting", "generation": generation,
                       "reason": reason}),
            );
            waiting_said = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn hold_before_claim() {
    let Some(path) = std::env::var_os(HOLD_BEFORE_CLAIM) else {
        return;
    };
    let path = PathBuf::from(path);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn resume_to(
    r: &crate::watch::ResumeJob,
    x: &extract::Extraction,
    token: u64,
    timeout: Duration,
) -> Result<handover::Delivered, HandoverError> {
    // Nothing is claimed before the connection, so a refused or
    // unroutable connect is retried a few times (a receiver restarting,
    // a route coming back) before the hand-over is given up.
    let (mut c, _) = with_retries(CONNECT_ATTEMPTS, CONNECT_FIRST_BACKOFF, || {
        r.to.connect(Role::Repair, timeout.max(Duration::from_secs(2)))
            .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())
    })
    .map_err(|last| {
        HandoverError::Connect(format!("{last} (after {CONNECT_ATTEMPTS} attempts)"))
    })?;
    let mut plan = r.plan.clone();
    plan.token = token;
    handover::hand_over(&mut c, x, &plan)
}

fn run_command(cmd: &str, event: &Value, target: &Target) -> Value {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("BDCTL_EVENT", event.to_string())
        .env("BDCTL_TARGET", &target.name)
        .env("BDCTL_ADDR", &target.addr)
        .env("BDCTL_LEVEL", event["level"].as_str().unwrap_or(""))
        .env("BDCTL_COUNTER", event["counter"].as_str().unwrap_or(""))
        .env("BDCTL_EVIDENCE", event["evidence"].as_str().unwrap_or(""))
        .env(
            "BDCTL_INCIDENT_TOKEN",
            event["incident_token"]
                .as_u64()
                .map(|t| t.to_string())
                .unwrap_or_default(),
        )
        .status();
    match status {
        Ok(s) => json!({"event": "action", "status": s.code()}),
        Err(e) => {
            json!({"event": "action_failed", "error": backdoor_abi::ErrorChain(&e).to_string()})
        }
    }
}

fn capture_evidence(
    target: &Target,
    event: &Value,
    dir: &Path,
    opts: &WatchOptions,
) -> Result<PathBuf, String> {
    let mut eo = crate::commands::kernel_files::evidence_options(&opts.kernel, 200)
        .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
    let bundle = crate::evidence::capture(target, Some(event), &mut eo, opts.timeout);
    crate::evidence::write_bundle(dir, &target.name, &bundle)
}

/// Extraction attempts after a hang, the first over the watch's own
/// connection, then on new ones after 100, 200, 400 and 800 ms.
const EXTRACT_ATTEMPTS: u32 = 5;
const EXTRACT_FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Extracts (over `held` first), into `dir` if given; returns the file,
/// the extraction and how many attempts it took.
fn extract_with_retries(
    target: &Target,
    dir: Option<&Path>,
    timeout: Duration,
    mut held: Option<Client>,
) -> Result<(Option<PathBuf>, extract::Extraction, u32), String> {
    let (x, attempts) = with_retries(EXTRACT_ATTEMPTS, EXTRACT_FIRST_BACKOFF, || {
        let mut c = match held.take() {
            Some(c) => c,
            None => target
                .connect(Role::Read, timeout.max(Duration::from_secs(2)))
                .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?,
        };
        extract::extract(&mut c, None, &mut |_, _| {})
            .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())
    })
    .map_err(|last| format!("extraction failed {EXTRACT_ATTEMPTS} times, last: {last}"))?;
    let file = match dir {
        Some(d) => Some(write_extraction(d, &target.name, &x)?),
        None => None,
    };
    Ok((file, x, attempts))
}

/// Tries `f` up to `attempts` times, waiting `first`, then twice as long
/// each time, between tries: its value and the try that gave it, or the
/// last error.
fn with_retries<T>(
    attempts: u32,
    first: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<(T, u32), String> {
    let mut backoff = first;
    let mut last = String::new();
    for attempt in 1..=attempts {
        if attempt > 1 {
            std::thread::sleep(backoff);
            backoff *= 2;
        }
        match f() {
            Ok(v) => return Ok((v, attempt)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn write_extraction(dir: &Path, name: &str, x: &extract::Extraction) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let file = dir.join(format!("{name}-g{}-{}.json", x.generation, now_ms()));
    let text =
        serde_json::to_string_pretty(x).map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
    std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(file)
}
