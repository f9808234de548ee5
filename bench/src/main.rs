//! `bdbench`: runs the benchmark suite and writes BENCHMARKS.md,
//! benchmarks.json and plots (see README, "Benchmarks").

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bdbench::machine::Machine;
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
}

fn main() -> ExitCode {
    let args = Args::parse();
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
        let t = Instant::now();
        match std::panic::catch_unwind(|| f(&ctx)) {
            Ok(sec) => {
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
    let report = Report {
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
    report.write(&out).map_err(write_err)?;
    if failed.is_empty() {
        Ok(out)
    } else {
        Err(BenchError::Failed(failed.join("; ")))
    }
}
