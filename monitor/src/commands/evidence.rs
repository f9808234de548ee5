//! `bdctl evidence`: an evidence bundle of a (hung) guest, on demand.
use super::kernel_files::evidence_options;
use crate::cli::EvidenceArgs;
use crate::evidence;
use crate::Error;

/// `bdctl evidence`.
pub fn run(a: &EvidenceArgs) -> Result<(), Error> {
    let mut opts = evidence_options(&a.k, a.lines)?;
    let bundle = evidence::capture(&a.t.target()?, None, &mut opts, a.t.timeout());
    evidence::write_file(&a.out, &bundle).map_err(Error::Other)?;
    let errors = bundle["errors"].as_object().map_or(0, serde_json::Map::len);
    eprintln!(
        "bdctl: evidence of {} written to {} in {:.0} ms{}",
        a.t.target,
        a.out.display(),
        bundle["timings_ms"]["total"].as_f64().unwrap_or(0.0),
        if errors > 0 {
            format!(" ({errors} parts failed: see its \"errors\")")
        } else {
            String::new()
        }
    );
    Ok(())
}
