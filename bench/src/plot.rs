//! The PNG of `flotilla-bench sim --plot`: latency distributions as CDFs
//! (share of samples at or below each latency, latency on a log scale), one
//! panel for placements and failover, one for the API's list calls.
//!
//! Drawn by plotters' bitmap backend; its text needs a TrueType font, read at
//! run time from Debian's fonts-dejavu-core (see README.md).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Where Debian's fonts-dejavu-core puts its sans-serif font.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws the CDFs of `left` (placement, failover) and `right` (API calls).
pub fn latencies(
    path: &Path,
    title: &str,
    left: &[(String, Vec<Duration>)],
    right: &[(String, Vec<Duration>)],
) -> Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (apt-get install fonts-dejavu-core)"))?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let root = BitMapBackend::new(path, (1400, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let root = root
        .titled(title, ("sans-serif", 24))
        .map_err(|e| anyhow!("{e}"))?;
    let (a, b) = root.split_horizontally(700);
    panel(&a, "placement and failover", left)?;
    panel(&b, "API while loaded", right)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    series: &[(String, Vec<Duration>)],
) -> Result<()> {
    let all = series.iter().flat_map(|(_, s)| s.iter());
    let max_ms = all.map(|d| d.as_secs_f64() * 1e3).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((0.1f64..max_ms).log_scale(), 0f64..1f64)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log)")
        .y_desc("share of samples ≤ x")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (name, samples)) in series.iter().enumerate() {
        let mut ms: Vec<f64> = samples
            .iter()
            .map(|d| (d.as_secs_f64() * 1e3).max(0.1))
            .collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len().max(1) as f64;
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                ms.iter().enumerate().map(|(k, x)| (*x, (k + 1) as f64 / n)),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(format!("{name} (n={})", samples.len()))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
