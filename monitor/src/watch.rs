//! `bdctl watch`: polls every target's progress boxes at a fixed interval,
//! judges them by the monitor's clock, reports verdict changes (live table,
//! JSON lines, Prometheus metrics) and runs actions on a hang.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backdoor_proto::{Client, Role};
use serde_json::json;

use crate::cluster::{Change, Cluster, ClusterOptions};
use crate::judge::{Event, Judge, Observation, Stall, Verdict};
use crate::metrics::{self, Exposition};
use crate::poll;
use crate::target::Target;

/// How `bdctl watch` runs.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Poll interval.
    pub interval: Duration,
    /// Connect and reply timeout per target.
    pub timeout: Duration,
    /// How long a generation may show no counter before it is lost.
    pub grace: Duration,
    /// One JSON event per line instead of the table.
    pub json: bool,
    /// Serve Prometheus metrics here.
    pub metrics: Option<String>,
    /// Run this shell command on every hang (event in its environment).
    pub on_hang: Option<String>,
    /// Extract the hung guest's sessions into this directory.
    pub extract_on_hang: Option<PathBuf>,
    /// Stop after this many rounds.
    pub count: Option<u64>,
    /// Exit (status 3) once a hang has been reported (and its actions finished).
    pub exit_on_hang: bool,
    /// Write an evidence bundle here on a hang, before any action.
    pub evidence_dir: Option<PathBuf>,
    /// Where the kernel is, for the bundles.
    pub kernel: crate::cli::KernelArgs,
    /// Share the targets with other monitors through etcd.
    pub cluster: Option<ClusterOptions>,
}

/// A target to watch, and where its sessions go on a hang.
#[derive(Debug, Clone)]
pub struct Job {
    /// The target.
    pub target: Target,
    /// Its receiver (cluster mode).
    pub resume: Option<ResumeJob>,
}

/// Where a hung target's sessions are handed over.
#[derive(Debug, Clone)]
pub struct ResumeJob {
    /// The receiving instance (repair key).
    pub to: Target,
    /// Its inbox; the token is the incident's.
    pub plan: crate::handover::Plan,
}

/// How often a target's descriptor (generation, tamper count) is re-read
/// between counter polls; a reboot is noticed sooner, through the
/// STALE_GENERATION refusal of the next counter read.
const DESCRIBE_EVERY: Duration = Duration::from_millis(250);

/// A target as its poller holds it.
struct Watched {
    target: Target,
    client: Option<Client>,
    /// The data path of the last connection, once said.
    transport: Option<&'static str>,
    described: Option<Instant>,
    judge: Judge,
}

/// What `watch` ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The round count ran out.
    Done,
    /// A hang was seen and `exit_on_hang` was set.
    Hang,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Longest wait between two connection attempts to an unreachable target.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);

/// Polls this far apart do not spin for their replies: a reply a few µs
/// sooner is worth nothing at such intervals, and a hundred targets'
/// pollers spinning 200 µs a request cost a core (bench section 9).
const SPIN_ONLY_BELOW: Duration = Duration::from_millis(10);

/// What the main thread (output, metrics, the table, exit) sees of one
/// target; its poller thread keeps it up to date.
#[derive(Debug, Default, Clone)]
pub(crate) struct View {
    pub verdict: Option<Verdict>,
    last: Option<Observation>,
    events: BTreeMap<&'static str, u64>,
    poll_seconds: f64,
}

/// What pollers, action threads and the cluster tell the main thread.
pub(crate) enum Report {
    /// An event of a target, ready to print; `actions`: whether it
    /// started hang actions (an [`Report::ActionsFinished`] will follow).
    Event {
        v: serde_json::Value,
        hang: bool,
        actions: bool,
    },
    /// An event of a hang's actions.
    Action(serde_json::Value),
    /// A hang's actions are over.
    ActionsFinished,
    /// A poller finished its `--count` polls.
    Finished,
    /// The cluster gave this monitor a target, or took one away.
    Cluster(Change),
}

/// A running poller.
struct Poller {
    view: Arc<Mutex<View>>,
    stop: Arc<AtomicBool>,
}

/// Runs the watch: one poller thread per target, each on its own clock
/// (a slow or unreachable target delays nobody else's polls), and this
/// thread printing their events, serving metrics and drawing the table.
/// In cluster mode the targets are those the cluster gives this monitor.
pub fn watch(jobs: Vec<Job>, opts: &WatchOptions) -> std::io::Result<WatchEnd> {
    raise_fd_limit();
    let exposition = Exposition::default();
    if let Some(addr) = &opts.metrics {
        let bound = metrics::serve(addr, exposition.clone())?;
        eprintln!("bdctl: metrics on http://{bound}/metrics");
    }
    let table = !opts.json && std::io::stdout().is_terminal();
    let (tx, rx) = mpsc::channel::<Report>();
    let cluster = match &opts.cluster {
        Some(co) => {
            let ctx = Mutex::new(tx.clone());
            let c = Cluster::start(
                co,
                Box::new(move |c| lock(&ctx).send(Report::Cluster(c)).is_ok()),
            )
            .map_err(|e| std::io::Error::other(backdoor_abi::ErrorChain(&e).to_string()))?;
            eprintln!("bdctl: cluster: joined as {}", co.id);
            Some(c)
        }
        None => None,
    };
    let mut pollers: BTreeMap<String, Poller> = BTreeMap::new();
    let start = |job: Job, pollers: &mut BTreeMap<String, Poller>| -> std::io::Result<()> {
        let view = Arc::new(Mutex::new(View::default()));
        let stop = Arc::new(AtomicBool::new(false));
        pollers.insert(
            job.target.name.clone(),
            Poller {
                view: view.clone(),
                stop: stop.clone(),
            },
        );
        let (opts, tx, cluster) = (opts.clone(), tx.clone(), cluster.clone());
        std::thread::Builder::new()
            .name("bdctl-poll".into())
            .spawn(move || poll_loop(job, &opts, &view, &stop, &tx, cluster))?;
        Ok(())
    };
    for job in jobs {
        start(job, &mut pollers)?;
    }
    // Signed: an action's report may arrive before the event that started it.
    let mut pending_actions: i64 = 0;
    let mut finished = 0usize;
    let mut hang_seen = false;
    let mut recent: Vec<String> = Vec::new();
    let tick = opts
        .interval
        .clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut last_draw = Instant::now() - Duration::from_secs(1);
    let mut last_metrics = Instant::now() - tick;
    loop {
        match rx.recv_timeout(tick) {
            Ok(Report::Event { v, hang, actions }) => {
                hang_seen |= hang;
                pending_actions += i64::from(actions);
                emit(&v, opts.json, table, &mut recent);
            }
            Ok(Report::Action(v)) => emit(&v, opts.json, table, &mut recent),
            Ok(Report::ActionsFinished) => pending_actions -= 1,
            Ok(Report::Finished) => finished += 1,
            Ok(Report::Cluster(change)) => {
                let (name, what) = match &change {
                    Change::Own(job) => (job.target.name.clone(), "owned"),
                    Change::Release(name) => (name.clone(), "released"),
                };
                // A target given again (its record changed) restarts.
                if let Some(old) = pollers.remove(&name) {
                    old.stop.store(true, Ordering::Relaxed);
                }
                if let Change::Own(job) = change {
                    start(*job, &mut pollers)?;
                }
                let v = json!({"event": what, "target": name, "ts_unix_ms": now_ms()});
                emit(&v, opts.json, table, &mut recent);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Unreachable: this thread holds a sender (`tx`).
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(WatchEnd::Done),
        }
        let snapshot = || -> Vec<(String, View)> {
            pollers
                .iter()
                .map(|(n, p)| (n.clone(), lock(&p.view).clone()))
                .collect()
        };
        // Once a tick at most, not once per report: every target's view
        // is copied for it.
        let metrics_due = opts.metrics.is_some() && last_metrics.elapsed() >= tick;
        let table_due = table && last_draw.elapsed() >= Duration::from_millis(250);
        if metrics_due || table_due {
            let now = snapshot();
            if metrics_due {
                exposition.set(render_metrics(&now));
                last_metrics = Instant::now();
            }
            if table_due {
                draw_table(&now, &recent);
                last_draw = Instant::now();
            }
        }
        if opts.exit_on_hang && hang_seen && pending_actions <= 0 {
            // The hang's actions (extraction, commands) have finished.
            if table {
                draw_table(&snapshot(), &recent);
            }
            return Ok(WatchEnd::Hang);
        }
        let counted_out = opts.count.is_some() && cluster.is_none() && finished == pollers.len();
        if counted_out && !(opts.exit_on_hang && hang_seen) && pending_actions <= 0 {
            return Ok(WatchEnd::Done);
        }
    }
}

/// Every target holds a connection (a cluster monitor, as many as the
/// cluster gives it): a thousand pass the usual soft limit of 1024 open
/// files, so the soft limit goes up to the hard one, as far as the host
/// allows.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One target's poller: polls at the interval by its own clock (backing
/// off its connection attempts while it is unreachable), judges, reports
/// the events and starts the hang actions; ends when `stop` is set.
fn poll_loop(
    job: Job,
    opts: &WatchOptions,
    view: &Arc<Mutex<View>>,
    stop: &Arc<AtomicBool>,
    tx: &mpsc::Sender<Report>,
    cluster: Option<Arc<Cluster>>,
) {
    let mut w = Watched {
        target: job.target.clone(),
        client: None,
        transport: None,
        described: None,
        judge: Judge::with_grace(opts.grace),
    };
    let mut polls = 0u64;
    let mut next = Instant::now();
    let mut backoff = opts.interval;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let result = poll_target(&mut w, opts.timeout, opts.interval);
        let poll_seconds = t.elapsed().as_secs_f64();
        let now = Instant::now();
        let unreachable = result.is_err() && w.client.is_none();
        let events = w.judge.observe(now, result.as_ref().map_err(Clone::clone));
        {
            let mut v = lock(view);
            v.poll_seconds = poll_seconds;
            v.verdict = w.judge.verdict().cloned();
            if let Ok(o) = result {
                v.last = Some(o);
            }
            for e in &events {
                *v.events.entry(event_name(e)).or_default() += 1;
            }
        }
        for e in events {
            let mut v = serde_json::to_value(&e).unwrap_or_default();
            v["ts_unix_ms"] = json!(now_ms());
            v["target"] = json!(w.target.name);
            let hang = matches!(&e, Event::Verdict { verdict, .. } if verdict.calls_for_action());
            let actions = hang && crate::actions::wanted(opts, cluster.is_some());
            if actions {
                // The extraction takes the connection this watch holds:
                // a hung guest's agent may have no slot for a new one
                // (the next poll connects again).
                let held = if opts.extract_on_hang.is_some() || job.resume.is_some() {
                    w.described = None;
                    w.client.take()
                } else {
                    None
                };
                crate::actions::start(crate::actions::Hang {
                    job: job.clone(),
                    event: v.clone(),
                    opts: opts.clone(),
                    tx: tx.clone(),
                    held,
                    cluster: cluster.clone(),
                    stop: stop.clone(),
                    view: view.clone(),
                });
            }
            if tx.send(Report::Event { v, hang, actions }).is_err() {
                return;
            }
        }
        polls += 1;
        if opts.count.is_some_and(|c| polls >= c) {
            let _ = tx.send(Report::Finished);
            return;
        }
        // An unreachable target is tried less and less often (up to
        // MAX_CONNECT_BACKOFF); a reachable one at every interval.
        let wait = if unreachable {
            backoff = (backoff * 2).min(MAX_CONNECT_BACKOFF.max(opts.interval));
            backoff
        } else {
            backoff = opts.interval;
            opts.interval
        };
        next += wait;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now; // fell behind: do not try to catch up in a burst
        }
    }
}

fn poll_target(
    w: &mut Watched,
    timeout: Duration,
    interval: Duration,
) -> Result<Observation, String> {
    if w.client.is_none() {
        let (mut c, why_soft) = w
            .target
            .connect_explained(Role::Read, timeout)
            .map_err(|e| backdoor_abi::ErrorChain(&e).to_string())?;
        // Said when it changes, not on every reconnect.
        if w.transport != Some(c.data_path()) {
            let why = why_soft
                .map(|w| format!(" (not verbs: {w})"))
                .unwrap_or_default();
            eprintln!(
                "bdctl: {}: reading over {}{why}",
                w.target.name,
                c.data_path()
            );
            w.transport = Some(c.data_path());
        }
        if interval >= SPIN_ONLY_BELOW {
            c.set_busy_poll(Duration::ZERO);
        }
        w.client = Some(c);
        w.described = Some(Instant::now()); // WELCOME carried the descriptor
    }
    let client = w.client.as_mut().expect("just connected");
    let stale = w.described.is_none_or(|t| t.elapsed() >= DESCRIBE_EVERY);
    let result = if stale {
        w.described = Some(Instant::now());
        poll::observe(client)
    } else {
        match poll::observe_counters(client) {
            Err(e) if e.code() == Some(backdoor_proto::ErrorCode::StaleGeneration) => {
                w.described = Some(Instant::now());
                poll::observe(client)
            }
            other => other,
        }
    };
    result.map_err(|e| {
        w.client = None;
        backdoor_abi::ErrorChain(&e).to_string()
    })
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::Verdict { verdict, .. } => verdict.name(),
        Event::Rebooted { .. } => "rebooted",
        Event::Tampered { .. } => "tampered",
    }
}

fn emit(v: &serde_json::Value, json: bool, table: bool, recent: &mut Vec<String>) {
    if json {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
        return;
    }
    let line = human(v);
    if table {
        recent.push(line);
        if recent.len() > 8 {
            recent.remove(0);
        }
    } else {
        println!("{line}");
    }
}

/// One event as a sentence.
pub fn human(v: &serde_json::Value) -> String {
    let target = v["target"].as_str().unwrap_or("?");
    let what = match v["event"].as_str().unwrap_or("") {
        "verdict" => match v["verdict"].as_str().unwrap_or("") {
            "hung" => format!(
                "HUNG ({} level): counter {} has not moved for {} ms (deadline {} ms)",
                v["level"].as_str().unwrap_or("?"),
                v["counter"].as_str().unwrap_or("?"),
                v["stalled_ms"],
                v["deadline_ms"]
            ),
            "unreachable" => format!(
                "UNREACHABLE: {} (not judged hung)",
                v["reason"].as_str().unwrap_or("?")
            ),
            other => format!("{} (generation {})", other.to_uppercase(), v["generation"]),
        },
        "rebooted" => format!("REBOOTED: generation {} -> {}", v["from"], v["to"]),
        "tampered" => format!(
            "TAMPERED: the guest tried to change its sealed backdoor (tamper count {} -> {})",
            v["from"], v["to"]
        ),
        "extracted" => format!(
            "extracted {} sessions to {} ({} accepted, {} torn, {} corrupt)",
            v["sessions"],
            v["file"].as_str().unwrap_or("?"),
            v["accepted"],
            v["torn"],
            v["corrupt"]
        ),
        "action" => format!("on-hang command exited with {}", v["status"]),
        "action_failed" => format!("action failed: {}", v["error"].as_str().unwrap_or("?")),
        other => other.to_owned(),
    };
    format!(
        "{} {target}: {what}",
        clock(v["ts_unix_ms"].as_u64().unwrap_or(0))
    )
}

/// HH:MM:SS.mmm (UTC) of a Unix time in milliseconds.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

fn draw_table(watched: &[(String, View)], recent: &[String]) {
    let mut s = String::from("\x1b[H\x1b[2J");
    let _ = writeln!(
        s,
        "{:<16} {:<12} {:>10} {:>6} {:>7}  DETAIL",
        "TARGET", "STATE", "GENERATION", "TAMPER", "POLL"
    );
    for (name, w) in watched {
        let v = w.verdict.as_ref();
        let detail = match v {
            Some(Verdict::Hung {
                stall:
                    Stall {
                        level,
                        counter,
                        stalled_ms,
                        deadline_ms,
                        hook,
                        slot,
                        ..
                    },
                ..
            }) => format!(
                "{level:?} counter {counter} ({hook} slot {slot}) stalled {stalled_ms} ms > {deadline_ms} ms"
            ),
            Some(Verdict::Unreachable { reason } | Verdict::Lost { reason }) => reason.clone(),
            Some(Verdict::Corrupt { hook, reason }) => format!("progress box {hook}: {reason}"),
            Some(Verdict::Starting { waited_ms }) => format!("no counter yet ({waited_ms} ms)"),
            Some(Verdict::Starved {
                stall: Stall {
                    counter,
                    stalled_ms,
                    ..
                },
                ran_ms,
                waited_ms,
                ..
            }) => format!(
                "counter {counter} stalled {stalled_ms} ms; its vCPUs ran {ran_ms} ms and waited {waited_ms} ms for a host CPU"
            ),
            Some(Verdict::StalledByHost {
                counter,
                stalled_ms,
                stopped_vcpus,
            }) => format!(
                "counter {counter} stalled {stalled_ms} ms; the host stopped vCPU threads {stopped_vcpus:?}"
            ),
            _ => w
                .last
                .as_ref()
                .map(|o| format!("{} counters", o.counters.len()))
                .unwrap_or_default(),
        };
        let (generation, tamper) = w.last.as_ref().map_or((String::new(), String::new()), |o| {
            (o.generation.to_string(), o.tamper_count.to_string())
        });
        let _ = writeln!(
            s,
            "{:<16} {:<12} {:>10} {:>6} {:>5.1}ms  {}",
            name,
            v.map_or("?", Verdict::name),
            generation,
            tamper,
            w.poll_seconds * 1e3,
            detail
        );
    }
    let _ = writeln!(s, "\nrecent events:");
    for l in recent {
        let _ = writeln!(s, "  {l}");
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

fn render_metrics(watched: &[(String, View)]) -> String {
    let round = metrics::Round::new();
    for (name, w) in watched {
        let verdict = w.verdict.as_ref();
        let up = !matches!(verdict, Some(Verdict::Unreachable { .. }) | None);
        round.target(
            name,
            up,
            Verdict::NAMES,
            verdict.map(|v| v.name()),
            w.poll_seconds,
        );
        if let Some(o) = &w.last {
            round.backdoor(name, o.generation, o.tamper_count);
            for c in &o.counters {
                let state = c.counter.state();
                if state == Some(backdoor_abi::CounterState::Retired) {
                    continue;
                }
                let labels = metrics::CounterLabels {
                    target: name.clone(),
                    hook: c.hook.clone(),
                    slot: c.slot,
                    counter: c.name(),
                    owner: c.counter.owner,
                    level: crate::poll::level_name(c),
                };
                round.counter(
                    &labels,
                    c.counter.value,
                    state == Some(backdoor_abi::CounterState::Active),
                );
            }
        }
        for (k, n) in &w.events {
            round.events(name, k, *n);
        }
    }
    round.encode()
}
