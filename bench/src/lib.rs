//! bdbench: backdoor-vmm's benchmark suite. Ten sections (issue 7; the
//! seventh, RDMA verbs, and the tenth, hang detection of a Linux guest, run
//! in the lab; the ninth, cluster monitoring, issue 15), each figure
//! measured in the same
//! run as its baseline and given as a ratio;
//! the result is `BENCHMARKS.md`, `benchmarks.json` and SVG plots.

pub mod affinity;
pub mod cluster;
pub mod detection;
pub mod extraction;
pub mod frame_crypto;
pub mod kernel_log;
pub mod linux_detection;
pub mod machine;
pub mod overhead;
pub mod plot;
pub mod qemu;
pub mod rdma;
pub mod remote_reads;
pub mod report;
pub mod report_cost;
pub mod startup;
pub mod stats;
pub mod vm;

use std::path::{Path, PathBuf};

use machine::Machine;
use report::Section;

/// What every section needs.
#[derive(Debug)]
pub struct Ctx {
    /// Fewer samples and shorter windows (about a minute in all).
    pub quick: bool,
    /// Where the report goes; plots go under `plots/` in it.
    pub out: PathBuf,
    /// The machine, described once.
    pub machine: Machine,
    /// Directory holding the `bdvmm` and `bdctl` binaries.
    pub bin_dir: PathBuf,
}

impl Ctx {
    /// Draws the CDFs of `series` into plots/`file` and links the plot
    /// from the section (or notes why there is none).
    pub fn cdf_plot(
        &self,
        sec: &mut Section,
        file: &str,
        title: &str,
        x_label: &str,
        series: &[plot::Series],
    ) {
        let path = self.out.join("plots").join(file);
        match plot::cdf(&path, title, x_label, series) {
            Ok(()) => sec.plots.push(format!("plots/{file}")),
            Err(e) => sec.notes.push(format!("no plot: {e}")),
        }
    }

    /// The `bdctl` binary next to bdbench.
    pub fn bdctl_bin(&self) -> PathBuf {
        self.bin_dir.join("bdctl")
    }
}

/// A section of the suite: its key and how to run it.
pub type SectionFn = fn(&Ctx) -> Section;

/// The sections, in order.
pub const SECTIONS: [(&str, SectionFn); 10] = [
    ("report_cost", report_cost::run),
    ("overhead", overhead::run),
    ("remote_reads", remote_reads::run),
    ("detection", detection::run),
    ("extraction", extraction::run),
    ("startup", startup::run),
    ("rdma", rdma::run),
    ("kernel_log", kernel_log::run),
    ("cluster", cluster::run),
    ("linux_detection", linux_detection::run),
];

/// Errors of the suite as a whole.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A binary the suite drives is missing.
    #[error("{0} is missing: build it first (`make bench` does: cargo build --release -p bdvmm -p bdctl -p bdbench)")]
    MissingBinary(String),
    /// Unknown section name.
    #[error("unknown section {0:?} (known: report_cost, overhead, remote_reads, detection, extraction, startup, rdma, kernel_log, cluster)")]
    UnknownSection(String),
    /// Writing the report.
    #[error("writing the report into {dir}")]
    Write {
        /// The output directory.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
    /// README.md's table could not be rewritten from the results.
    #[error("{path}: {detail}")]
    Readme {
        /// The file at fault.
        path: String,
        /// Why.
        detail: String,
    },
    /// Sections that panicked (their messages).
    #[error("sections failed: {0}")]
    Failed(String),
}

/// Checks the binaries the suite needs exist in `bin_dir`.
pub fn check_binaries(bin_dir: &Path) -> Result<(), BenchError> {
    for b in ["bdvmm", "bdctl"] {
        let p = bin_dir.join(b);
        if !p.exists() {
            return Err(BenchError::MissingBinary(p.display().to_string()));
        }
    }
    Ok(())
}
