//! `bdbench`: runs the benchmark suite and writes BENCHMARKS.md,
//! benchmarks.json and plots (see README, "Benchmarks").

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bdbench::machine::{busy_percent, Machine};
use bdbench::report::{Report, Section};
use bdbench::{check_binaries, BenchError, Ctx, SECTIONS};
use clap::Parser;

/// backdoor-vmm's benchmark suite.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Output directory (default: results/ at the repository root).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Quick mode: few samples, about a minute (also BDBENCH_QUICK=1).
    #[arg(long)]
    quick: bool,
    /// Run only these sections (comma-separated keys, e.g. remote_reads,detection).
    #[arg(long, value_delimiter = ',', value_name = "KEYS")]
    only: Vec<String>,
    /// Run nothing: rewrite README.md's benchmark table from
    /// results/benchmarks.json (every run into results/ does this too;
    /// one with --only replaces just those sections there).
    #[arg(long, conflicts_with_all = ["only", "quick", "out"])]
    readme: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.readme {
        let json = bdvmm_tests::repo_root().join("results/benchmarks.json");
        return match load_report(&json).and_then(|r| write_readme(&r)) {
            Ok(p) => {
                eprintln!("bdbench: wrote the table in {}", p.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bdbench: {}", backdoor_abi::ErrorChain(&e));
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(out) => {
            eprintln!("bdbench: wrote {}", out.join("BENCHMARKS.md").display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bdbench: {}", backdoor_abi::ErrorChain(&e));
            ExitCode::FAILURE
        }
    }
}

fn readme_error(path: &std::path::Path, detail: String) -> BenchError {
    BenchError::Readme {
        path: path.display().to_string(),
        detail,
    }
}

/// A report as written to `json` (a benchmarks.json).
fn load_report(json: &std::path::Path) -> Result<Report, BenchError> {
    let text = std::fs::read_to_string(json).map_err(|e| readme_error(json, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| readme_error(json, e.to_string()))
}

/// Rewrites README.md's benchmark table from `report` (what
/// results/benchmarks.json holds).
fn write_readme(report: &Report) -> Result<PathBuf, BenchError> {
    let readme = bdvmm_tests::repo_root().join("README.md");
    let fail = |p: &PathBuf, detail: String| readme_error(p, detail);
    let old = std::fs::read_to_string(&readme).map_err(|e| fail(&readme, e.to_string()))?;
    let new = report
        .splice_readme(&old)
        .ok_or_else(|| fail(&readme, "no benchmark-table markers".into()))?;
    std::fs::write(&readme, new).map_err(|e| fail(&readme, e.to_string()))?;
    Ok(readme)
}

fn run(args: &Args) -> Result<PathBuf, BenchError> {
    let quick = args.quick || std::env::var("BDBENCH_QUICK").is_ok_and(|v| v == "1");
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
        .unwrap_or_default();
    check_binaries(&bin_dir)?;
    if std::env::var_os("BDVMM_BIN").is_none() {
        // The harness finds bdvmm through this; ours sits next to bdbench.
        std::env::set_var("BDVMM_BIN", bin_dir.join("bdvmm"));
    }
    for k in &args.only {
        if !SECTIONS.iter().any(|(key, _)| key == k) {
            return Err(BenchError::UnknownSection(k.clone()));
        }
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| bdvmm_tests::repo_root().join("results"));
    let write_err = |source| BenchError::Write {
        dir: out.display().to_string(),
        source,
    };
    std::fs::create_dir_all(out.join("plots")).map_err(write_err)?;
    let started = Instant::now();
    let ctx = Ctx {
        quick,
        out: out.clone(),
        machine: Machine::describe(),
        bin_dir,
    };
    eprintln!(
        "bdbench: {} ({} cores, KVM {}){}",
        ctx.machine.cpu,
        ctx.machine.cores,
        ctx.machine.kvm,
        if quick { ", quick mode" } else { "" }
    );
    let mut sections: Vec<Section> = Vec::new();
    let mut failed = Vec::new();
    for (key, f) in SECTIONS {
        if !args.only.is_empty() && !args.only.iter().any(|k| k == key) {
            continue;
        }
        eprintln!("bdbench: section {key} ...");
        let busy = busy_percent(Duration::from_millis(if quick { 200 } else { 1000 }));
        let t = Instant::now();
        match std::panic::catch_unwind(|| f(&ctx)) {
            Ok(mut sec) => {
                sec.busy_before_pct = busy;
                for fig in &sec.figures {
                    eprintln!("  {}: {}", fig.name, fig.result);
                }
                eprintln!("  ({:.1} s)", t.elapsed().as_secs_f64());
                sections.push(sec);
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                failed.push(format!("{key}: {msg}"));
            }
        }
    }
    let mut command = String::from("bdbench");
    if quick {
        command.push_str(" --quick");
    }
    if !args.only.is_empty() {
        command.push_str(" --only ");
        command.push_str(&args.only.join(","));
    }
    let mut report = Report {
        machine: ctx.machine.clone(),
        quick,
        command,
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(started.elapsed().as_secs()),
        duration_s: started.elapsed().as_secs_f64(),
        sections,
    };
    // Some sections re-run into results/: the others stay as they were.
    let into_results = !quick && args.out.is_none();
    if into_results && !args.only.is_empty() {
        if let Some(old) = load_report(&out.join("benchmarks.json"))
            .ok()
            .filter(|old| !old.quick)
        {
            report = old.merged_with(report);
        }
    }
    report.write(&out).map_err(write_err)?;
    if into_results && failed.is_empty() {
        write_readme(&report)?;
    }
    if failed.is_empty() {
        Ok(out)
    } else {
        Err(BenchError::Failed(failed.join("; ")))
    }
}
