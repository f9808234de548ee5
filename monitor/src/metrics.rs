//! Prometheus metrics over HTTP (`bdctl watch --metrics ADDR`): after each
//! round the watch loop fills a fresh [`Round`] (prometheus-client's
//! registry, so the exposition format is the library's, not ours) and
//! encodes it; a small server thread answers `GET /metrics` with the
//! latest encoding, one bounded request at a time. A fresh registry per
//! round means a counter that disappeared from the guest disappears from
//! the metrics too.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format (what `curl` and
/// `promtool check metrics` read), for clients that do not ask for
/// OpenMetrics.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The latest exposition text.
#[derive(Debug, Default, Clone)]
pub struct Exposition(Arc<Mutex<String>>);

impl Exposition {
    /// Replaces the text.
    pub fn set(&self, text: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = text;
    }

    fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The most a request (line and headers) may take, in bytes and in time:
/// one connection at a time is served, so a client that trickles or never
/// ends its request holds the endpoint for at most this long, and no
/// connection costs more than one small buffer (an HTTP library would
/// start a thread per connection, which any peer could multiply).
const MAX_REQUEST: usize = 8192;
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

/// Serves `exposition` on `addr` from a thread; returns the bound address.
pub fn serve(addr: &str, exposition: Exposition) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("bdctl-metrics".into())
        .spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let Some(request) = read_request(&mut stream) else {
                    continue;
                };
                let (status, content_type, body) = if request.starts_with(b"GET /metrics ") {
                    // As Prometheus's own clients do: OpenMetrics to whoever
                    // asks for it (a Prometheus server does), else the text format.
                    if asks_for_openmetrics(&request) {
                        ("200 OK", OPENMETRICS, exposition.get())
                    } else {
                        ("200 OK", PROMETHEUS_TEXT, prometheus_text(&exposition.get()))
                    }
                } else {
                    ("404 Not Found", "text/plain", "try GET /metrics\n".to_owned())
                };
                let _ = stream.set_write_timeout(Some(REQUEST_DEADLINE));
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(bound)
}

/// Reads a request up to the blank line that ends its headers, within
/// [`MAX_REQUEST`] bytes and [`REQUEST_DEADLINE`]; None if it does not end.
fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() || buf.len() >= MAX_REQUEST {
            return None;
        }
        stream.set_read_timeout(Some(left)).ok()?;
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(buf)
}

/// Whether a request's Accept header names OpenMetrics.
fn asks_for_openmetrics(request: &[u8]) -> bool {
    String::from_utf8_lossy(request).lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("accept:") && l.contains("application/openmetrics-text")
    })
}

/// The OpenMetrics exposition prometheus-client writes, in the Prometheus
/// text format: a counter's HELP and TYPE name its `_total` samples (in
/// OpenMetrics they name the family), and no `# EOF` or `# UNIT`.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                let meta = format!("{p}{name}{total} {tail}");
                out.push_str(meta.trim_end());
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    target: String,
    verdict: String,
}

/// A counter is where it lives (hook and slot: two counters may share a
/// name, as a Linux guest's per-CPU "kernel" counters do), with its name,
/// owner and level.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabels {
    /// The target.
    pub target: String,
    /// Its progress box.
    pub hook: String,
    /// Its slot in the box.
    pub slot: u32,
    /// Its name.
    pub counter: String,
    /// Its owner as the guest wrote it (a pid, a CPU, a session).
    pub owner: u32,
    /// os, application or session (as judged: an OS claim outside the
    /// kernel's slots reads application).
    pub level: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    target: String,
    event: String,
}

/// One round's metrics.
#[derive(Debug)]
pub struct Round {
    registry: Registry,
    up: Family<TargetLabels, Gauge>,
    verdict: Family<VerdictLabels, Gauge>,
    generation: Family<TargetLabels, Gauge>,
    tampered: Family<TargetLabels, Gauge>,
    counter: Family<CounterLabels, Gauge<u64, AtomicU64>>,
    counter_active: Family<CounterLabels, Gauge>,
    events: Family<EventLabels, Counter>,
    poll_seconds: Family<TargetLabels, Gauge<f64, AtomicU64>>,
}

impl Default for Round {
    fn default() -> Self {
        Self::new()
    }
}

impl Round {
    /// An empty round with every family registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let up = Family::default();
        let verdict = Family::default();
        let generation = Family::default();
        let tampered = Family::default();
        let counter = Family::default();
        let counter_active = Family::default();
        let events = Family::default();
        let poll_seconds = Family::default();
        registry.register(
            "bdctl_target_up",
            "Whether the target's backdoor could be read at the last poll",
            up.clone(),
        );
        registry.register(
            "bdctl_target_verdict",
            "The target's verdict (1 for the current one)",
            verdict.clone(),
        );
        registry.register(
            "bdctl_target_generation",
            "Backdoor generation (changes on guest reset)",
            generation.clone(),
        );
        registry.register(
            "bdctl_target_refused_commands",
            "Commands the guest's device refused after the seal (its tamper count)",
            tampered.clone(),
        );
        registry.register(
            "bdctl_progress_value",
            "A progress counter's value (retired counters are not shown)",
            counter.clone(),
        );
        registry.register(
            "bdctl_progress_active",
            "Whether a progress counter is active (1) or idle (0)",
            counter_active.clone(),
        );
        registry.register("bdctl_events", "Events reported, by kind", events.clone());
        registry.register(
            "bdctl_poll_duration_seconds",
            "How long the last poll of a target took",
            poll_seconds.clone(),
        );
        Self {
            registry,
            up,
            verdict,
            generation,
            tampered,
            counter,
            counter_active,
            events,
            poll_seconds,
        }
    }

    /// A target's reachability, verdict (one of `verdicts` is `current`)
    /// and last poll's duration.
    pub fn target(
        &self,
        target: &str,
        up: bool,
        verdicts: &[&str],
        current: Option<&str>,
        poll_seconds: f64,
    ) {
        let t = TargetLabels {
            target: target.to_owned(),
        };
        self.up.get_or_create(&t).set(i64::from(up));
        for v in verdicts {
            self.verdict
                .get_or_create(&VerdictLabels {
                    target: target.to_owned(),
                    verdict: (*v).to_owned(),
                })
                .set(i64::from(current == Some(*v)));
        }
        self.poll_seconds.get_or_create(&t).set(poll_seconds);
    }

    /// What the last poll of a target read: its generation and tamper count.
    pub fn backdoor(&self, target: &str, generation: u32, tamper_count: u32) {
        let t = TargetLabels {
            target: target.to_owned(),
        };
        self.generation.get_or_create(&t).set(i64::from(generation));
        self.tampered.get_or_create(&t).set(i64::from(tamper_count));
    }

    /// A progress counter's value and whether it is active.
    pub fn counter(&self, labels: &CounterLabels, value: u64, active: bool) {
        self.counter.get_or_create(labels).set(value);
        self.counter_active
            .get_or_create(labels)
            .set(i64::from(active));
    }

    /// How many events of a kind a target has had.
    pub fn events(&self, target: &str, event: &str, n: u64) {
        self.events
            .get_or_create(&EventLabels {
                target: target.to_owned(),
                event: event.to_owned(),
            })
            .inc_by(n);
    }

    /// The round in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(addr: std::net::SocketAddr) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        body
    }

    #[test]
    fn a_client_that_never_ends_its_request_holds_nothing_for_long() {
        let e = Exposition::default();
        e.set("bdctl_target_up{target=\"t\"} 1\n# EOF\n".into());
        let addr = serve("127.0.0.1:0", e).unwrap();
        // One client stalls mid-request, another floods bytes with no end:
        // the endpoint drops each within its bounds and serves the next.
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled.write_all(b"GET /met").unwrap();
        let mut flood = TcpStream::connect(addr).unwrap();
        let junk = vec![b'x'; 4 * MAX_REQUEST];
        let _ = flood.write_all(&junk);
        let body = scrape(addr);
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.contains("bdctl_target_up{target=\"t\"} 1"), "{body}");
        let mut rest = Vec::new();
        let _ = flood.read_to_end(&mut rest);
        assert!(rest.is_empty(), "the flood was answered");
        let mut other = TcpStream::connect(addr).unwrap();
        other.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        other.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    }

    #[test]
    fn a_round_encodes_every_family_with_its_labels_escaped() {
        let r = Round::new();
        r.target("vm\"1", true, &["healthy", "hung"], Some("healthy"), 0.25);
        r.backdoor("vm\"1", 7, 2);
        let kernel = |slot, owner| CounterLabels {
            target: "vm\"1".into(),
            hook: "progress".into(),
            slot,
            counter: "kernel".into(),
            owner,
            level: "os".into(),
        };
        r.counter(&kernel(0, 0), u64::MAX, true);
        r.counter(&kernel(1, 1), 5, false);
        r.events("vm\"1", "hung", 2);
        let text = r.encode();
        for line in [
            r#"bdctl_target_up{target="vm\"1"} 1"#,
            r#"bdctl_target_verdict{target="vm\"1",verdict="healthy"} 1"#,
            r#"bdctl_target_verdict{target="vm\"1",verdict="hung"} 0"#,
            r#"bdctl_target_generation{target="vm\"1"} 7"#,
            r#"bdctl_target_refused_commands{target="vm\"1"} 2"#,
            r#"bdctl_progress_value{target="vm\"1",hook="progress",slot="0",counter="kernel",owner="0",level="os"} 18446744073709551615"#,
            r#"bdctl_progress_value{target="vm\"1",hook="progress",slot="1",counter="kernel",owner="1",level="os"} 5"#,
            r#"bdctl_progress_active{target="vm\"1",hook="progress",slot="1",counter="kernel",owner="1",level="os"} 0"#,
            r#"bdctl_events_total{target="vm\"1",event="hung"} 2"#,
            r#"bdctl_poll_duration_seconds{target="vm\"1"} 0.25"#,
            "# TYPE bdctl_events counter",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        let plain = prometheus_text(&text);
        for line in [
            "# HELP bdctl_events_total Events reported, by kind.",
            "# TYPE bdctl_events_total counter",
            r#"bdctl_events_total{target="vm\"1",event="hung"} 2"#,
            "# TYPE bdctl_target_up gauge",
        ] {
            assert!(plain.lines().any(|l| l == line), "no {line:?} in\n{plain}");
        }
        assert!(!plain.contains("# EOF"), "{plain}");
    }
}
