//! PNG figures of the long-tail diagnosis, drawn with `plotters` into a bitmap.
//!
//! Text is rendered with DejaVu Sans, embedded in the binary (crate `dejavu`) and handed
//! to plotters' pure-Rust `ab_glyph` renderer, so no system font, fontconfig or freetype
//! is needed. Files are written atomically ([`crate::io::write_atomic_with`]).

use std::path::Path;
use std::sync::OnceLock;

pub mod leap;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};
use crate::io::write_atomic_with;

/// Size of the figures, pixels.
pub const FIGURE_SIZE: (u32, u32) = (960, 640);

/// Series and class colors, in order (colorblind-safe: Okabe-Ito's blue, orange, bluish
/// green, reddish purple, sky blue and vermillion, then Tol's wine and a grey; black is
/// left for marks that are not a class, like the feature cloud). More classes than eight
/// repeat the colors.
pub(crate) const PALETTE8: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(136, 34, 85),
    RGBColor(120, 120, 120),
];

/// A drawing failure as an error about `path`.
pub(crate) fn draw_err(path: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::io(path, format!("drawing the plot failed: {e}"))
}

/// Refuses a figure path that does not end in `.png` (the encoder picks the format from it).
pub(crate) fn png_path(path: &Path) -> Result<()> {
    if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        return Err(Error::InvalidConfig(format!("plot path {} must end in .png", path.display())));
    }
    Ok(())
}

/// Tick positions of a log axis over `lo..hi`: 1, 2 and 5 times every power of ten, so
/// that every decade (those below 10 included) is labelled and no two labels crowd.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powi(lo.max(1e-9).log10().floor() as i32);
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = m * decade;
            if t >= lo && t <= hi {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// One class in [`angular_std_vs_size`]: its training count, and its angular std as the
/// mean over seeds with the lowest and highest seed (all three equal for one seed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpreadPoint {
    /// Training samples of the class.
    pub count: u64,
    /// Mean angular std over the seeds, radians.
    pub mean: f64,
    /// Lowest over the seeds.
    pub lo: f64,
    /// Highest over the seeds.
    pub hi: f64,
}

/// Per class, the mean and the range over seeds of `(count, std)` points, one list per
/// seed with the classes in the same order (as [`crate::engine::report::EvalReport::spread_points`]
/// gives them). A class whose std is not finite in any seed is left out; a seed where it is
/// not finite does not count for it.
pub fn spread_over_seeds(runs: &[Vec<(u64, f64)>]) -> Vec<SpreadPoint> {
    // Lists of other lengths cannot be paired class by class: only the classes every list has.
    let classes = runs.iter().map(|r| r.len()).min().unwrap_or(0);
    (0..classes)
        .filter_map(|k| {
            let v: Vec<f64> = runs.iter().map(|r| r[k].1).filter(|x| x.is_finite()).collect();
            if v.is_empty() {
                return None;
            }
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            Some(SpreadPoint { count: runs[0][k].0, mean, lo, hi })
        })
        .collect()
}

/// Registers the embedded font under plotters' default family (`sans-serif`) once.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        let bytes = dejavu::sans::regular();
        [FontStyle::Normal, FontStyle::Bold, FontStyle::Italic, FontStyle::Oblique]
            .into_iter()
            .all(|style| plotters::style::register_font("sans-serif", style, bytes).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig("the embedded DejaVu Sans font could not be loaded".into()))
    }
}

/// Scatter plot of per-class angular std (y, radians) against training class size (x, log
/// scale with ticks at 1, 2, 5 times every decade), one color per series (e.g.
/// `("baseline", points)`, `("LEAP", points)`), each class at its mean over seeds with a
/// vertical bar over the seeds' range, the head/tail threshold as a dashed line when given,
/// axis labels, a legend and `title`. Points whose count is 0 or whose mean is not finite
/// are skipped (they cannot be placed on a log axis). Written atomically to `path`, which
/// must end in `.png`; a missing directory gives [`Error::Io`].
pub fn angular_std_vs_size(
    path: &Path,
    series: &[(&str, &[SpreadPoint])],
    head_threshold: Option<u64>,
    title: &str,
) -> Result<()> {
    png_path(path)?;
    ensure_font()?;
    let usable = |p: &&SpreadPoint| p.count > 0 && p.mean.is_finite();
    let all = || series.iter().flat_map(|(_, pts)| pts.iter().filter(usable));
    let (mut x_lo, mut x_hi) = all().fold((u64::MAX, 0u64), |(lo, hi), p| (lo.min(p.count), hi.max(p.count)));
    if x_lo > x_hi {
        (x_lo, x_hi) = (1, 1000);
    }
    // Pad a margin so the extreme points do not sit on the frame.
    let (xa, xb) = (x_lo as f64 / 1.5, x_hi as f64 * 1.5);
    let top = |p: &SpreadPoint| if p.hi.is_finite() { p.hi.max(p.mean) } else { p.mean };
    let bottom = |p: &SpreadPoint| if p.lo.is_finite() { p.lo.min(p.mean) } else { p.mean };
    let y_max = all().map(top).fold(0.0f64, f64::max);
    let y_min = all().map(bottom).fold(0.0f64, f64::min);
    let y_range = y_min * 1.1..if y_max > 0.0 { y_max * 1.15 } else { 1.0 };

    write_atomic_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, FIGURE_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(path, &e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(18)
            .x_label_area_size(56)
            .y_label_area_size(76)
            .build_cartesian_2d((xa..xb).log_scale().with_key_points(log_ticks(xa, xb)), y_range.clone())
            .map_err(|e| draw_err(path, &e))?;
        chart
            .configure_mesh()
            .x_desc("training samples in the class (log scale)")
            .y_desc("angular std to class center (rad)")
            .axis_desc_style(("sans-serif", 20))
            .label_style(("sans-serif", 16))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .light_line_style(RGBColor(244, 244, 244))
            .draw()
            .map_err(|e| draw_err(path, &e))?;
        if let Some(t) = head_threshold.filter(|&t| (t as f64) > xa && (t as f64) < xb) {
            let line = [(t as f64, y_range.start), (t as f64, y_range.end)];
            let style = RGBColor(90, 90, 90).stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(line, 6, 5, style))
                .map_err(|e| draw_err(path, &e))?
                .label(format!("head/tail threshold ({t} samples)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        for (s, (name, pts)) in series.iter().enumerate() {
            let color = PALETTE8[s % PALETTE8.len()];
            let bars = pts.iter().filter(usable).filter(|p| p.hi > p.lo).map(|p| {
                PathElement::new(
                    vec![(p.count as f64, p.lo), (p.count as f64, p.hi)],
                    color.mix(0.35).stroke_width(2),
                )
            });
            chart.draw_series(bars).map_err(|e| draw_err(path, &e))?;
            let style = color.mix(0.75).filled();
            chart
                .draw_series(
                    pts.iter().filter(usable).map(|p| Circle::new((p.count as f64, p.mean), 4, style)),
                )
                .map_err(|e| draw_err(path, &e))?
                .label(*name)
                .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
        }
        if !series.is_empty() || head_threshold.is_some() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font(("sans-serif", 18))
                .draw()
                .map_err(|e| draw_err(path, &e))?;
        }
        root.present().map_err(|e| draw_err(path, &e))
    })
}
