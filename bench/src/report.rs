//! The report: sections of figures, each with the baseline measured in the
//! same run and their ratio, rendered as Markdown and as JSON.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::machine::Machine;

/// A baseline measured in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    /// What it is.
    pub name: String,
    /// Its result, formatted.
    pub result: String,
    /// Its value in the figure's unit.
    pub value: f64,
}

/// One measured figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// One of the figures the README's table shows.
    #[serde(default)]
    pub headline: bool,
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
            headline: false,
        }
    }

    /// Its table cells after the result: the baseline and the ratio
    /// (empty without a baseline).
    fn baseline_cells(&self) -> (String, String) {
        match (&self.baseline, self.ratio) {
            (Some(b), Some(r)) => (format!("{}: {}", b.name, b.result), ratio_text(r)),
            _ => (String::new(), String::new()),
        }
    }

    /// Marks it for the README's table.
    pub fn headline(mut self) -> Self {
        self.headline = true;
        self
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Of all cores, the percentage other work kept busy just before the
    /// section ran (see [`crate::machine::busy_percent`]).
    #[serde(default)]
    pub busy_before_pct: Option<f64>,
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
            busy_before_pct: None,
        }
    }

    /// How busy the machine was before the section, in words.
    pub fn load_text(&self) -> String {
        match self.busy_before_pct {
            Some(p) if p < QUIET_PCT => format!("quiet ({p:.0} % busy)"),
            Some(p) => format!("busy: {p:.0} % of the cores in use by other work"),
            None => "not measured".into(),
        }
    }
}

/// Below this share of all cores busy with other work, a machine is
/// called quiet.
pub const QUIET_PCT: f64 = 10.0;

/// Marks the README's generated table.
pub const README_BEGIN: &str = "<!-- bdbench:table:begin (generated from results/benchmarks.json by `bdbench --readme`; do not edit) -->";
/// Ends it.
pub const README_END: &str = "<!-- bdbench:table:end -->";

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    } else if r == 0.0 {
        "0x".into()
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
            let _ = writeln!(s, "Machine before this section: {}.\n", sec.load_text());
            if !sec.figures.is_empty() {
                let _ = writeln!(
                    s,
                    "| figure | result | baseline (same run) | ratio |\n|---|---|---|---|"
                );
            }
            for f in &sec.figures {
                let (b, r) = f.baseline_cells();
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

    /// The README's table: every headline figure, and where and when it
    /// was measured.
    pub fn readme_table(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Measured by `{}` on {} in {:.0} s{}: {}, {} cores, {} MiB, kernel {}, KVM {}. \
             Each row's baseline ran in the same run; the last column says how busy other \
             work kept the machine just before its section (quiet: under {QUIET_PCT:.0} %).\n",
            self.command,
            utc_date(self.started_unix),
            self.duration_s,
            if self.quick {
                " (QUICK mode: few samples, indicative only)"
            } else {
                ""
            },
            m.cpu,
            m.cores,
            m.mem_mib,
            m.kernel,
            m.kvm
        );
        let _ = writeln!(
            s,
            "| § | figure | result | baseline, same run | ratio | machine |\n|---|---|---|---|---|---|"
        );
        for sec in &self.sections {
            for f in sec.figures.iter().filter(|f| f.headline) {
                let (b, r) = f.baseline_cells();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {b} | {r} | {} |",
                    sec.number,
                    f.name,
                    f.result,
                    sec.load_text()
                );
            }
        }
        s
    }

    /// `readme` with the text between its table markers replaced by
    /// [`Report::readme_table`]; None if the markers are missing.
    pub fn splice_readme(&self, readme: &str) -> Option<String> {
        let begin = readme.find(README_BEGIN)? + README_BEGIN.len();
        let end = begin + readme[begin..].find(README_END)?;
        Some(format!(
            "{}\n{}{}",
            &readme[..begin],
            self.readme_table(),
            &readme[end..]
        ))
    }

    /// This report with `newer`'s sections in place of its own of the same
    /// key (the rest kept, in section order), and `newer`'s machine.
    pub fn merged_with(mut self, newer: Report) -> Report {
        for sec in newer.sections {
            match self.sections.iter_mut().find(|s| s.key == sec.key) {
                Some(old) => *old = sec,
                None => self.sections.push(sec),
            }
        }
        self.sections.sort_by_key(|s| s.number);
        Report {
            machine: newer.machine,
            quick: self.quick,
            command: format!("{}, then {}", self.command, newer.command),
            started_unix: self.started_unix,
            duration_s: self.duration_s + newer.duration_s,
            sections: self.sections,
        }
    }

    /// Writes BENCHMARKS.md and benchmarks.json into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::write(dir.join("BENCHMARKS.md"), self.markdown())?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("benchmarks.json"), json + "\n")
    }
}

/// YYYY-MM-DD of a Unix time, UTC (the civil-from-days algorithm).
pub fn utc_date(unix: u64) -> String {
    let days = i64::try_from(unix / 86_400).unwrap_or(0) + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_796_256_000), "2026-12-03");
    }

    /// The README's table is what results/benchmarks.json says, never
    /// typed by hand: `bdbench --readme` (and every full run) writes it.
    #[test]
    fn the_readme_table_is_generated_from_the_results() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let json = std::fs::read_to_string(root.join("results/benchmarks.json")).unwrap();
        let report: Report = serde_json::from_str(&json).unwrap();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let generated = report
            .splice_readme(&readme)
            .expect("README.md has the table markers");
        assert!(
            generated == readme,
            "README.md's benchmark table differs from results/benchmarks.json: run `bdbench --readme`"
        );
        assert!(
            report
                .sections
                .iter()
                .flat_map(|s| &s.figures)
                .any(|f| f.headline),
            "no headline figures"
        );
    }
}
