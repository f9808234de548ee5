//! Runs the whole suite in quick mode into a temporary directory and
//! checks the report: both files, the machine, every section, each with
//! measured numbers and at least one ratio against its baseline (or, for
//! the RDMA section on a host without a device, a note saying so), and
//! every linked plot. No figure is judged: a loaded machine gives worse
//! numbers, never a failure.

use std::path::Path;
use std::process::Command;

fn bin_dir() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_bdbench"))
        .parent()
        .expect("target directory")
}

#[test]
fn quick_suite_writes_a_complete_report() {
    for b in ["bdvmm", "bdctl"] {
        assert!(
            bin_dir().join(b).exists(),
            "{b} is missing next to bdbench: `cargo build -p bdvmm -p bdctl` first (`make test` does)"
        );
    }
    let out = tempfile::tempdir().expect("temp dir");
    let run = Command::new(env!("CARGO_BIN_EXE_bdbench"))
        .args(["--quick", "--out"])
        .arg(out.path())
        .output()
        .expect("run bdbench");
    assert!(
        run.status.success(),
        "bdbench failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let md = std::fs::read_to_string(out.path().join("BENCHMARKS.md")).expect("BENCHMARKS.md");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("benchmarks.json")).expect("benchmarks.json"),
    )
    .expect("valid JSON");

    let m = &json["machine"];
    let cpu = m["cpu"].as_str().expect("CPU model");
    assert!(
        !cpu.is_empty() && md.contains(cpu),
        "the report names the CPU"
    );
    let kvm = m["kvm"].as_str().expect("KVM kind");
    assert!(kvm.starts_with("hardware") || kvm.starts_with("software (PVM"));
    assert!(md.contains(kvm), "the report says how KVM runs");
    assert!(m["cores"].as_u64().is_some_and(|c| c >= 1));
    assert_eq!(json["quick"], true);

    let sections = json["sections"].as_array().expect("sections");
    let keys: Vec<&str> = sections.iter().filter_map(|s| s["key"].as_str()).collect();
    assert_eq!(
        keys,
        [
            "report_cost",
            "overhead",
            "remote_reads",
            "detection",
            "extraction",
            "startup",
            "rdma",
            "kernel_log",
            "cluster",
            "linux_detection"
        ]
    );
    for (i, s) in sections.iter().enumerate() {
        let key = keys[i];
        assert_eq!(s["number"].as_u64(), Some(i as u64 + 1));
        let title = s["title"].as_str().expect("title");
        assert!(
            md.contains(&format!("## {}. {title}", i + 1)),
            "{key} in the Markdown"
        );
        let figures = s["figures"].as_array().expect("figures");
        if matches!(key, "rdma" | "linux_detection") && figures.is_empty() {
            // No RDMA device, or no VMX/SVM, here (the lab measures them):
            // the report says so.
            let notes = s["notes"].as_array().expect("notes");
            assert!(
                notes
                    .iter()
                    .any(|n| n.as_str().is_some_and(|n| n.starts_with("Not measured"))),
                "{s}"
            );
            continue;
        }
        assert!(!figures.is_empty(), "{key} has figures");
        for f in figures {
            let v = f["value"].as_f64().expect("numeric value");
            assert!(v.is_finite() && v >= 0.0, "{key}: {f}");
            assert!(
                md.contains(f["result"].as_str().expect("result")),
                "{key}: figure in the Markdown"
            );
        }
        let ratios: Vec<f64> = figures
            .iter()
            .filter_map(|f| f["ratio"].as_f64())
            .filter(|r| r.is_finite() && *r > 0.0)
            .collect();
        assert!(
            !ratios.is_empty(),
            "{key} gives a ratio against a same-run baseline"
        );
        assert!(figures
            .iter()
            .all(|f| f["ratio"].is_null() || f["baseline"]["name"].is_string()));
        for p in s["plots"].as_array().expect("plots") {
            let p = p.as_str().expect("plot path");
            assert!(md.contains(&format!("]({p})")), "{p} is linked");
            let svg = std::fs::read_to_string(out.path().join(p)).expect("plot file");
            assert!(
                svg.starts_with("<svg") && svg.contains("<polyline"),
                "{p} is an SVG with lines"
            );
        }
    }
    for key in ["remote_reads", "detection"] {
        let s = sections.iter().find(|s| s["key"] == key).expect("section");
        assert!(
            !s["plots"].as_array().expect("plots").is_empty(),
            "{key} has a distribution plot"
        );
    }
    assert!(
        md.contains("RDMA verbs:"),
        "the verbs backend is accounted for"
    );
}
