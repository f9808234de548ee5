//! Distribution plots (CDFs) as SVG, with plotters' SVG backend only: it
//! writes text as SVG text, so no font or image library is needed.

use std::path::Path;

use plotters::prelude::*;

/// One named distribution, sorted ascending.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    /// Legend label.
    pub label: &'a str,
    /// Sorted samples.
    pub sorted: &'a [f64],
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Error of a plot.
#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {detail}")]
pub struct PlotError {
    path: String,
    detail: String,
}

/// Draws the empirical CDFs of `series` into the SVG file `path`; a log
/// x axis when the values span more than two decades.
pub fn cdf(path: &Path, title: &str, x_label: &str, series: &[Series]) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let values = series.iter().flat_map(|s| s.sorted.iter().copied());
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return Err(err(&"no positive samples"));
    }
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let points = |s: &Series| -> Vec<(f64, f64)> {
        let n = s.sorted.len() as f64;
        s.sorted
            .iter()
            .enumerate()
            .map(|(i, &v)| (v, (i + 1) as f64 / n))
            .collect()
    };
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc("fraction of samples ≤ x")
                .draw()
                .map_err(|e| err(&e))?;
            for (i, s) in series.iter().enumerate() {
                let c = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(points(s), c.stroke_width(2)))
                    .map_err(|e| err(&e))?
                    .label(s.label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    if hi / lo > 100.0 {
        draw!(builder
            .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0.0..1.0)
            .map_err(|e| err(&e))?);
    } else {
        let pad = (hi - lo).max(hi * 0.01) * 0.05;
        draw!(builder
            .build_cartesian_2d((lo - pad).max(0.0)..hi + pad, 0.0..1.0)
            .map_err(|e| err(&e))?);
    }
    root.present().map_err(|e| err(&e))
}

/// One named line of (x, y) points.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// Legend label.
    pub label: &'a str,
    /// Points, by ascending x.
    pub points: &'a [(f64, f64)],
}

/// Draws `lines` into the SVG file `path`, y on a log axis (the paths
/// compared differ by orders of magnitude).
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[Line],
) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let all = || lines.iter().flat_map(|l| l.points.iter().copied());
    let (x_hi, y_lo, y_hi) = all()
        .filter(|(_, y)| y.is_finite() && *y > 0.0)
        .fold((0f64, f64::MAX, f64::MIN), |(xh, lo, hi), (x, y)| {
            (xh.max(x), lo.min(y), hi.max(y))
        });
    if y_lo > y_hi {
        return Err(err(&"no positive points"));
    }
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_hi * 1.05, (y_lo * 0.7..y_hi * 1.4).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, l) in lines.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(l.points.to_vec(), c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(l.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        chart
            .draw_series(l.points.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
