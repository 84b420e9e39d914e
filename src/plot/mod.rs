//! PNG figures of the long-tail diagnosis, drawn with `plotters` into a bitmap.
//!
//! Text is rendered with DejaVu Sans, embedded in the binary (crate `dejavu`) and handed
//! to plotters' pure-Rust `ab_glyph` renderer, so no system font, fontconfig or freetype
//! is needed. Files are written atomically ([`crate::io::write_atomic_with`]).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};
use crate::io::write_atomic_with;

/// Size of the figures, pixels.
pub const FIGURE_SIZE: (u32, u32) = (960, 640);

/// Series colors, in order (colorblind-safe: blue, orange, green, purple, ...).
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 97, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
];

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
/// scale), one color per series (e.g. `("baseline", points)`, `("LEAP", points)`), with axis
/// labels, a legend and `title`. Points whose size is 0 or whose std is not finite are
/// skipped (they cannot be placed on a log axis). Written atomically to `path`, which must
/// end in `.png`; a missing directory gives [`Error::Io`].
pub fn angular_std_vs_size(path: &Path, series: &[(&str, &[(u64, f64)])], title: &str) -> Result<()> {
    if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        return Err(Error::InvalidConfig(format!("plot path {} must end in .png", path.display())));
    }
    ensure_font()?;
    let usable = |&&(x, y): &&(u64, f64)| x > 0 && y.is_finite();
    let all = || series.iter().flat_map(|(_, pts)| pts.iter().filter(usable));
    let (mut x_lo, mut x_hi) = all().fold((u64::MAX, 0u64), |(lo, hi), &(x, _)| (lo.min(x), hi.max(x)));
    if x_lo > x_hi {
        (x_lo, x_hi) = (1, 1000);
    }
    // Pad a decade-friendly margin so the extreme points do not sit on the frame.
    let x_range = (x_lo as f64 / 1.5)..(x_hi as f64 * 1.5);
    let y_max = all().map(|&(_, y)| y).fold(0.0f64, f64::max);
    let y_min = all().map(|&(_, y)| y).fold(0.0f64, f64::min);
    let y_range = y_min * 1.1..if y_max > 0.0 { y_max * 1.15 } else { 1.0 };

    write_atomic_with(path, |tmp| {
        let draw_err = |e: &dyn std::fmt::Display| Error::io(path, format!("drawing the plot failed: {e}"));
        let root = BitMapBackend::new(tmp, FIGURE_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 26))
            .margin(18)
            .x_label_area_size(56)
            .y_label_area_size(76)
            .build_cartesian_2d(x_range.clone().log_scale(), y_range.clone())
            .map_err(|e| draw_err(&e))?;
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
            .map_err(|e| draw_err(&e))?;
        for (s, (name, pts)) in series.iter().enumerate() {
            let color = PALETTE[s % PALETTE.len()];
            let style = color.mix(0.7).filled();
            chart
                .draw_series(pts.iter().filter(usable).map(|&(x, y)| Circle::new((x as f64, y), 4, style)))
                .map_err(|e| draw_err(&e))?
                .label(*name)
                .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font(("sans-serif", 18))
                .draw()
                .map_err(|e| draw_err(&e))?;
        }
        root.present().map_err(|e| draw_err(&e))
    })
}
