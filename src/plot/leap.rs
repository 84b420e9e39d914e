//! The figures of `featcloud figure`: LEAP's motivating experiment as three scatter panels
//! of 2-D embeddings, and the angular distributions of head and tail classes.

use std::path::Path;

use plotters::prelude::*;

use super::{draw_err, ensure_font, png_path, PALETTE8};
use crate::error::Result;
use crate::io::write_atomic_with;

/// Size of the protocol figure (four panels side by side: the three settings and a zoom
/// on the cloud), pixels.
pub const PROTOCOL_SIZE: (u32, u32) = (2000, 560);
/// Size of the angular-distribution figure (two panels side by side), pixels.
pub const ANGLES_SIZE: (u32, u32) = (1500, 620);

/// The feature cloud drawn around one tail feature: the feature and its cloud draws, in
/// the panel's 2-D coordinates.
#[derive(Clone, Debug)]
pub struct CloudMarks {
    /// The tail feature the cloud is drawn around.
    pub anchor: [f64; 2],
    /// Where the cloud moves it, one point per draw.
    pub samples: Vec<[f64; 2]>,
    /// Legend text (e.g. the class and its cloud std).
    pub label: String,
}

/// One panel of the protocol figure.
#[derive(Clone, Debug)]
pub struct ScatterPanel<'a> {
    /// Panel caption.
    pub title: String,
    /// Projected embeddings `[n]`.
    pub points: &'a [[f64; 2]],
    /// Class of each point, `0..classes`.
    pub classes: &'a [usize],
    /// Per class: drawn as a tail class (triangles) rather than a head class (circles).
    pub tail: &'a [bool],
    /// The cloud around a tail feature (panel c).
    pub cloud: Option<CloudMarks>,
    /// The share of variance of the two axes, for the axis labels.
    pub explained: Option<[f64; 2]>,
    /// Show the classes in this panel's legend (one panel is enough: colors are the same
    /// in every panel; the cloud, when drawn, is always in its panel's legend).
    pub class_legend: bool,
}

/// The protocol figure: one scatter panel per setting, colors per class, tail classes as
/// triangles, the cloud (if any) as hollow rings around its anchor. Written atomically.
pub fn protocol_figure(path: &Path, panels: &[ScatterPanel], title: &str) -> Result<()> {
    png_path(path)?;
    ensure_font()?;
    // One range for every panel would squeeze the panels whose spread is small; each panel
    // gets its own (the axes are each model's own principal axes anyway).
    write_atomic_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, PROTOCOL_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(path, &e))?;
        let root = root.titled(title, ("sans-serif", 26)).map_err(|e| draw_err(path, &e))?;
        for (panel, area) in panels.iter().zip(root.split_evenly((1, panels.len().max(1)))) {
            let mut all: Vec<[f64; 2]> = panel.points.to_vec();
            if let Some(c) = &panel.cloud {
                all.push(c.anchor);
                all.extend(&c.samples);
            }
            let (xr, yr) = (padded(all.iter().map(|p| p[0])), padded(all.iter().map(|p| p[1])));
            // Enough decimals that ticks of a zoomed-in panel stay distinct.
            let decimals = |r: &std::ops::Range<f64>| {
                ((-(r.end - r.start).log10()).floor() as i64 + 2).clamp(2, 6) as usize
            };
            let (xd, yd) = (decimals(&xr), decimals(&yr));
            let mut chart = ChartBuilder::on(&area)
                .caption(&panel.title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .build_cartesian_2d(xr, yr)
                .map_err(|e| draw_err(path, &e))?;
            chart
                .configure_mesh()
                .x_desc(axis_desc(1, panel.explained.map(|e| e[0])))
                .y_desc(axis_desc(2, panel.explained.map(|e| e[1])))
                .axis_desc_style(("sans-serif", 16))
                .label_style(("sans-serif", 13))
                .x_labels(6)
                .y_labels(6)
                .x_label_formatter(&|x| format!("{x:.xd$}"))
                .y_label_formatter(&|y| format!("{y:.yd$}"))
                .light_line_style(RGBColor(244, 244, 244))
                .draw()
                .map_err(|e| draw_err(path, &e))?;
            let ncls = panel.tail.len();
            for k in 0..ncls {
                let color = PALETTE8[k % PALETTE8.len()];
                let pts = panel.points.iter().zip(panel.classes).filter(|(_, &c)| c == k).map(|(p, _)| *p);
                let name = format!("class {k}{}", if panel.tail[k] { " (tail)" } else { "" });
                if panel.tail[k] {
                    let style = color.filled();
                    let drawn = chart
                        .draw_series(pts.map(|p| TriangleMarker::new((p[0], p[1]), 7, style)))
                        .map_err(|e| draw_err(path, &e))?;
                    if panel.class_legend {
                        drawn
                            .label(name)
                            .legend(move |(x, y)| TriangleMarker::new((x + 8, y), 6, color.filled()));
                    }
                } else {
                    let style = color.mix(0.55).filled();
                    let drawn = chart
                        .draw_series(pts.map(|p| Circle::new((p[0], p[1]), 3, style)))
                        .map_err(|e| draw_err(path, &e))?;
                    if panel.class_legend {
                        drawn.label(name).legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
                    }
                }
            }
            if let Some(c) = &panel.cloud {
                // The draws as small dots joined to their feature, so that a narrow cloud
                // still shows as a star around the cross.
                let a = c.anchor;
                let spokes = c
                    .samples
                    .iter()
                    .map(|p| PathElement::new(vec![(a[0], a[1]), (p[0], p[1])], BLACK.mix(0.3)));
                chart.draw_series(spokes).map_err(|e| draw_err(path, &e))?;
                chart
                    .draw_series(c.samples.iter().map(|p| Circle::new((p[0], p[1]), 2, BLACK.filled())))
                    .map_err(|e| draw_err(path, &e))?
                    .label(c.label.as_str())
                    .legend(move |(x, y)| Circle::new((x + 8, y), 3, BLACK.filled()));
                chart
                    .draw_series(std::iter::once(Cross::new((a[0], a[1]), 5, BLACK.stroke_width(2))))
                    .map_err(|e| draw_err(path, &e))?;
            }
            if panel.class_legend || panel.cloud.is_some() {
                chart
                    .configure_series_labels()
                    .position(emptiest_corner(&all))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 13))
                    .draw()
                    .map_err(|e| draw_err(path, &e))?;
            }
        }
        root.present().map_err(|e| draw_err(path, &e))
    })
}

/// The corner of the points' bounding box with the fewest points near it (within the
/// outer 40% of each axis): where a legend hides the least.
fn emptiest_corner(points: &[[f64; 2]]) -> SeriesLabelPosition {
    let (xr, yr) = (padded(points.iter().map(|p| p[0])), padded(points.iter().map(|p| p[1])));
    let near = |v: f64, r: &std::ops::Range<f64>, high: bool| {
        let t = (v - r.start) / (r.end - r.start);
        if high {
            t > 0.6
        } else {
            t < 0.4
        }
    };
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let count = |&(_, right, up): &(SeriesLabelPosition, bool, bool)| {
        points.iter().filter(|p| near(p[0], &xr, right) && near(p[1], &yr, up)).count()
    };
    let best = corners.iter().min_by_key(|c| count(c)).expect("four corners");
    match best.0 {
        SeriesLabelPosition::UpperRight => SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::UpperLeft => SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::LowerRight => SeriesLabelPosition::LowerRight,
        _ => SeriesLabelPosition::LowerLeft,
    }
}

/// One group's angles in a histogram panel, with the normal fitted to them.
#[derive(Clone, Debug)]
pub struct AngleGroup<'a> {
    /// Legend name.
    pub name: String,
    /// Angles to the class center, radians.
    pub angles: &'a [f64],
    /// Fitted N(mean, std^2) drawn as a curve (the group's mean and population std).
    pub fit: (f64, f64),
}

/// One panel of the angular-distribution figure.
#[derive(Clone, Debug)]
pub struct AnglePanel<'a> {
    /// Panel caption.
    pub title: String,
    /// Head and tail groups, drawn as normalized histograms with their fitted normals.
    pub groups: Vec<AngleGroup<'a>>,
    /// A normal drawn dashed without a histogram: `(legend, mean, std)` (the tail with its
    /// cloud: N(mu_t, sigma_t^2 + sigma_cloud^2)).
    pub extra_curve: Option<(String, f64, f64)>,
    /// Text lines in the panel's corner (the statistics module's estimates).
    pub notes: Vec<String>,
}

/// Histograms (densities) of angles per group with fitted normals, one panel per model, on
/// a common axis (`x_desc` says what the values are): symmetric around 0 when some value is
/// negative (deviations), else from 0. Written atomically.
pub fn angle_histograms(path: &Path, panels: &[AnglePanel], x_desc: &str, title: &str) -> Result<()> {
    png_path(path)?;
    ensure_font()?;
    let values = || panels.iter().flat_map(|p| p.groups.iter().flat_map(|g| g.angles.iter().copied()));
    let biggest = values().filter(|a| a.is_finite()).fold(0.0f64, |m, a| m.max(a.abs()));
    let x_hi = if biggest > 0.0 { biggest * 1.15 } else { 1.0 };
    let x_lo = if values().any(|a| a < 0.0) { -x_hi } else { 0.0 };
    const BINS: usize = 24;
    let width = (x_hi - x_lo) / BINS as f64;
    let density = |angles: &[f64]| {
        let mut h = vec![0.0; BINS];
        let n = angles.iter().filter(|a| a.is_finite()).count().max(1) as f64;
        for &a in angles.iter().filter(|a| a.is_finite()) {
            h[(((a - x_lo) / width) as usize).min(BINS - 1)] += 1.0 / (n * width);
        }
        h
    };
    let normal = |x: f64, m: f64, s: f64| {
        if s > 0.0 {
            (-(x - m).powi(2) / (2.0 * s * s)).exp() / (s * (2.0 * std::f64::consts::PI).sqrt())
        } else {
            0.0
        }
    };
    let curve = |m: f64, s: f64| {
        (0..=300).map(move |i| x_lo + i as f64 * (x_hi - x_lo) / 300.0).map(move |x| (x, normal(x, m, s)))
    };
    let y_hi = panels
        .iter()
        .flat_map(|p| {
            let hist = p.groups.iter().flat_map(|g| density(g.angles));
            let fits = p.groups.iter().map(|g| normal(g.fit.0, g.fit.0, g.fit.1));
            let extra = p.extra_curve.iter().map(|&(_, m, s)| normal(m, m, s));
            hist.chain(fits).chain(extra).collect::<Vec<_>>()
        })
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        * 1.1;
    let y_hi = if y_hi > 0.0 { y_hi } else { 1.0 };

    write_atomic_with(path, |tmp| {
        let root = BitMapBackend::new(tmp, ANGLES_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(path, &e))?;
        let root = root.titled(title, ("sans-serif", 26)).map_err(|e| draw_err(path, &e))?;
        for (panel, area) in panels.iter().zip(root.split_evenly((1, panels.len().max(1)))) {
            let mut chart = ChartBuilder::on(&area)
                .caption(&panel.title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(44)
                .y_label_area_size(56)
                .build_cartesian_2d(x_lo..x_hi, 0.0..y_hi)
                .map_err(|e| draw_err(path, &e))?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc("density")
                .axis_desc_style(("sans-serif", 16))
                .label_style(("sans-serif", 13))
                .x_label_formatter(&|x| format!("{x:.2}"))
                .y_label_formatter(&|y| format!("{y:.1}"))
                .light_line_style(RGBColor(244, 244, 244))
                .draw()
                .map_err(|e| draw_err(path, &e))?;
            for (g, group) in panel.groups.iter().enumerate() {
                let color = PALETTE8[g % PALETTE8.len()];
                let bars = density(group.angles).into_iter().enumerate().map(|(i, h)| {
                    let x0 = x_lo + i as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, h)], color.mix(0.35).filled())
                });
                chart.draw_series(bars).map_err(|e| draw_err(path, &e))?;
                let (m, s) = group.fit;
                chart
                    .draw_series(LineSeries::new(curve(m, s), color.stroke_width(3)))
                    .map_err(|e| draw_err(path, &e))?
                    .label(format!("{}: N({}, {s:.3}^2)", group.name, fmt3(m)))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3)));
            }
            if let Some((name, m, s)) = &panel.extra_curve {
                let (m, s) = (*m, *s);
                let color = PALETTE8[panel.groups.len() % PALETTE8.len()];
                let dashed = DashedLineSeries::new(curve(m, s), 8, 6, color.stroke_width(3));
                chart
                    .draw_series(dashed)
                    .map_err(|e| draw_err(path, &e))?
                    .label(format!("{name}: N({}, {s:.3}^2)", fmt3(m)))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(|e| draw_err(path, &e))?;
            for (i, line) in panel.notes.iter().enumerate() {
                let at = (80, 48 + 20 * i as i32);
                area.draw(&Text::new(line.as_str(), at, ("sans-serif", 15)))
                    .map_err(|e| draw_err(path, &e))?;
            }
        }
        root.present().map_err(|e| draw_err(path, &e))
    })
}

/// "principal axis 1 (34% of the variance)".
fn axis_desc(k: usize, share: Option<f64>) -> String {
    match share {
        Some(f) => format!("principal axis {k} ({:.0}% of the variance)", 100.0 * f),
        None => format!("principal axis {k}"),
    }
}

/// `v` with 3 decimals, without the sign of a value that rounds to zero (`-0.000`).
fn fmt3(v: f64) -> String {
    let r = (v * 1000.0).round() / 1000.0;
    format!("{:.3}", if r == 0.0 { 0.0 } else { r })
}

/// `lo..hi` of `v` with 6% padding (a unit range around a single value).
fn padded(v: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = v
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    if lo >= hi || !lo.is_finite() {
        let c = if lo.is_finite() { lo } else { 0.0 };
        return c - 0.5..c + 0.5;
    }
    let pad = 0.06 * (hi - lo);
    lo - pad..hi + pad
}
