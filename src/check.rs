//! Input validation shared by every implementation, run before any work or launch.

use crate::error::{Error, Result};
use crate::shape::HeadShape;

/// Checks the lengths of x, W (`[C, K, D]` with `subcenters` = K, SPEC 5b), labels and
/// sigma_cloud against `shape`, and the label range. Negative labels (ignored rows) are
/// allowed.
pub fn check_head_inputs(
    shape: HeadShape,
    subcenters: usize,
    x_len: usize,
    w_len: usize,
    labels: &[i32],
    sigma_cloud_len: Option<usize>,
) -> Result<()> {
    check_head_inputs_of(shape, subcenters, x_len, w_len, labels, sigma_cloud_len, shape.c)
}

/// [`check_head_inputs`] for a shard of a class-parallel head (SPEC 5c): W and sigma_cloud
/// hold the shard's `shape.c` classes, while the labels are global, in `[0, label_classes)`.
pub fn check_head_inputs_of(
    shape: HeadShape,
    subcenters: usize,
    x_len: usize,
    w_len: usize,
    labels: &[i32],
    sigma_cloud_len: Option<usize>,
    label_classes: usize,
) -> Result<()> {
    shape.check_nonempty()?;
    let HeadShape { b, c, d } = shape;
    if x_len != b * d {
        return Err(Error::Shape(format!("x has {x_len} elements, expected B*D = {b}*{d}")));
    }
    if subcenters == 1 && w_len != c * d {
        return Err(Error::Shape(format!("W has {w_len} elements, expected C*D = {c}*{d}")));
    }
    if subcenters != 1 && w_len != c * subcenters * d {
        return Err(Error::Shape(format!(
            "W has {w_len} elements, expected C*K*D = {c}*{subcenters}*{d} (K sub-centers per class)"
        )));
    }
    if labels.len() != b {
        return Err(Error::Shape(format!("labels has {} entries, expected B = {b}", labels.len())));
    }
    if let Some(n) = sigma_cloud_len {
        if n != c {
            return Err(Error::Shape(format!("sigma_cloud has {n} entries, expected C = {c}")));
        }
    }
    check_labels(labels, label_classes)
}

/// Every label must be < C; negative labels mark ignored rows.
pub fn check_labels(labels: &[i32], c: usize) -> Result<()> {
    for (row, &y) in labels.iter().enumerate() {
        if y >= 0 && y as usize >= c {
            return Err(Error::LabelOutOfRange { row, label: y as i64, classes: c });
        }
    }
    Ok(())
}

/// First non-finite value in `v`, as an error naming `what`.
pub fn check_finite(what: &str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFinite { what: what.to_string(), index }),
        None => Ok(()),
    }
}

/// First non-finite value of `x` `[B, d]` in a row whose label is not negative, as an error
/// naming `what` and the flat index. Ignored rows (label < 0) may hold anything (SPEC 2):
/// padding rows are never read into a result, so they are not checked either.
pub fn check_finite_rows<F: Copy + Into<f64>>(what: &str, x: &[F], d: usize, labels: &[i32]) -> Result<()> {
    let bad = x
        .chunks(d.max(1))
        .zip(labels)
        .enumerate()
        .filter(|(_, (_, &y))| y >= 0)
        .find_map(|(i, (row, _))| row.iter().position(|&v| !v.into().is_finite()).map(|k| i * d + k));
    match bad {
        Some(index) => Err(Error::NonFinite { what: what.to_string(), index }),
        None => Ok(()),
    }
}

/// sigma_cloud must be finite and non-negative.
pub fn check_sigma(sigma: &[f32]) -> Result<()> {
    check_finite("sigma_cloud", sigma)?;
    if let Some(i) = sigma.iter().position(|&s| s < 0.0) {
        return Err(Error::InvalidConfig(format!("sigma_cloud[{i}] = {} is negative", sigma[i])));
    }
    Ok(())
}
