//! Summaries of samples: nearest-rank percentiles, mean, spread.

use serde::Serialize;

/// Nearest-rank percentile of sorted samples, `pct` in 0..=100.
pub fn percentile(sorted: &[f64], pct: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) * pct).div_ceil(100)]
}

/// The summary of one distribution, as the report and JSON give it.
#[derive(Debug, Clone, Serialize)]
pub struct Dist {
    /// Samples.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub stddev: f64,
    /// The samples, sorted (for plots; left out of the JSON).
    #[serde(skip)]
    pub sorted: Vec<f64>,
}

impl Dist {
    /// Summarises `samples` (any order).
    pub fn new(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let mean = samples.iter().sum::<f64>() / n.max(1) as f64;
        let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>()
            / n.saturating_sub(1).max(1) as f64;
        Self {
            n,
            min: samples.first().copied().unwrap_or(f64::NAN),
            p50: percentile(&samples, 50),
            p99: percentile(&samples, 99),
            max: samples.last().copied().unwrap_or(f64::NAN),
            mean,
            stddev: var.sqrt(),
            sorted: samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let d = Dist::new((1..=100).rev().map(f64::from).collect());
        assert_eq!((d.min, d.p50, d.p99, d.max), (1.0, 51.0, 100.0, 100.0));
        assert!((d.mean - 50.5).abs() < 1e-9);
    }
}
