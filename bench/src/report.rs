//! The report: sections of figures, each with the baseline measured in the
//! same run and their ratio, rendered as Markdown and as JSON.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::machine::Machine;

/// A baseline measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// What it is.
    pub name: String,
    /// Its result, formatted.
    pub result: String,
    /// Its value in the figure's unit.
    pub value: f64,
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The result, formatted (with percentiles where they matter).
    pub result: String,
    /// The headline value.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// The baseline, if this figure has one.
    pub baseline: Option<Baseline>,
    /// value / baseline value.
    pub ratio: Option<f64>,
}

impl Figure {
    /// A figure without a baseline of its own.
    pub fn plain(name: &str, value: f64, unit: &str, result: String) -> Self {
        Self {
            name: name.into(),
            result,
            value,
            unit: unit.into(),
            baseline: None,
            ratio: None,
        }
    }

    /// Adds the baseline and the ratio value / baseline.
    pub fn against(mut self, name: &str, value: f64, result: String) -> Self {
        self.ratio = Some(self.value / value);
        self.baseline = Some(Baseline {
            name: name.into(),
            result,
            value,
        });
        self
    }
}

/// One section.
#[derive(Debug, Clone, Serialize)]
pub struct Section {
    /// 1..=6, as in the issue.
    pub number: u8,
    /// Short name (also the JSON key and the `--only` name).
    pub key: String,
    /// Title.
    pub title: String,
    /// How it was measured.
    pub method: String,
    /// The figures.
    pub figures: Vec<Figure>,
    /// Observations, caveats, targets met or not.
    pub notes: Vec<String>,
    /// Plot files, relative to the report.
    pub plots: Vec<String>,
    /// Raw summaries for the JSON.
    pub details: serde_json::Value,
}

impl Section {
    /// An empty section.
    pub fn new(number: u8, key: &str, title: &str, method: &str) -> Self {
        Self {
            number,
            key: key.into(),
            title: title.into(),
            method: method.into(),
            figures: Vec::new(),
            notes: Vec::new(),
            plots: Vec::new(),
            details: serde_json::Value::Null,
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// Quick mode (fewer samples, shorter windows).
    pub quick: bool,
    /// The command that produced it.
    pub command: String,
    /// Seconds since the Unix epoch at the start.
    pub started_unix: u64,
    /// Wall time of the whole suite.
    pub duration_s: f64,
    /// The sections, in order.
    pub sections: Vec<Section>,
}

/// Formats a ratio with sensible precision.
pub fn ratio_text(r: f64) -> String {
    if !r.is_finite() {
        "n/a".into()
    } else if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 10.0 {
        format!("{r:.1}x")
    } else if r >= 0.1 {
        format!("{r:.3}x")
    } else {
        // Far below 1: the inverse reads better (1/455 = 455 times less).
        format!("{r:.2e}x (1/{:.0})", 1.0 / r)
    }
}

impl Report {
    /// Renders the Markdown report.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(s, "# backdoor-vmm benchmarks\n");
        let _ = writeln!(
            s,
            "Produced by `{}` in {:.0} s{}. Every figure below was measured in the same run as its \
             baseline; the ratio is figure / baseline. Raw numbers: [benchmarks.json](benchmarks.json).\n",
            self.command,
            self.duration_s,
            if self.quick {
                " in QUICK mode (few samples: indicative only)"
            } else {
                ""
            }
        );
        let _ = writeln!(s, "## Machine\n");
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| CPU | {} |", m.cpu);
        let _ = writeln!(s, "| cores | {} |", m.cores);
        let _ = writeln!(s, "| memory | {} MiB |", m.mem_mib);
        let _ = writeln!(s, "| kernel | {} |", m.kernel);
        let _ = writeln!(s, "| KVM | {} |", m.kvm);
        let _ = writeln!(s, "| TSC | {:.3} GHz (measured) |\n", m.tsc_ghz);
        for sec in &self.sections {
            let _ = writeln!(s, "## {}. {}\n", sec.number, sec.title);
            let _ = writeln!(s, "{}\n", sec.method);
            if !sec.figures.is_empty() {
                let _ = writeln!(
                    s,
                    "| figure | result | baseline (same run) | ratio |\n|---|---|---|---|"
                );
            }
            for f in &sec.figures {
                let (b, r) = match (&f.baseline, f.ratio) {
                    (Some(b), Some(r)) => (format!("{}: {}", b.name, b.result), ratio_text(r)),
                    _ => ("".into(), "".into()),
                };
                let _ = writeln!(s, "| {} | {} | {} | {} |", f.name, f.result, b, r);
            }
            s.push('\n');
            for n in &sec.notes {
                let _ = writeln!(s, "- {n}");
            }
            if !sec.notes.is_empty() {
                s.push('\n');
            }
            for p in &sec.plots {
                let _ = writeln!(s, "![{p}]({p})\n");
            }
        }
        s
    }

    /// Writes BENCHMARKS.md and benchmarks.json into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join("BENCHMARKS.md"), self.markdown())?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("benchmarks.json"), json + "\n")
    }
}
