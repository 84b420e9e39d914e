//! Evaluation of learned embeddings on long-tailed data.
//!
//! - [`closed_set`]: top-1 accuracy of the cosine classifier, overall and per shot group
//!   (many / medium / few-shot classes by training count, the usual long-tailed split).
//! - [`open_set`]: retrieval and verification on classes never seen in training: Rank-1,
//!   mAP and TPR at FPR = 1e-3.
//! - [`subcenter_outliers`]: the samples far from their class's dominant sub-center
//!   (Sub-center ArcFace's cleaning step, SPEC 5b), for `featcloud clean`.
//! - [`angular_spread`]: the per-class angular std that LEAP equalizes between head and
//!   tail classes (SPEC.md section 5), the quantity the paper's diagnosis rests on.
//!
//! All computation is in f64; embeddings are compared by cosine, so their norms do not
//! matter (a zero vector is treated as having cosine 0 with everything).

pub mod projection;
use rayon::prelude::*;

use crate::check::check_finite;
use crate::error::{Error, Result};

/// Classes with at least this many training samples are many-shot.
pub const MANY_SHOT_MIN: u64 = 100;
/// Classes with fewer than this many training samples are few-shot; between this and
/// [`MANY_SHOT_MIN`] they are medium-shot.
pub const FEW_SHOT_BELOW: u64 = 20;

/// The three shot groups of the long-tailed literature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShotGroup {
    /// `>= 100` training samples.
    Many,
    /// `20..=99` training samples.
    Medium,
    /// `< 20` training samples.
    Few,
}

/// The shot group of a class with `train_count` training samples.
pub fn shot_group(train_count: u64) -> ShotGroup {
    if train_count >= MANY_SHOT_MIN {
        ShotGroup::Many
    } else if train_count >= FEW_SHOT_BELOW {
        ShotGroup::Medium
    } else {
        ShotGroup::Few
    }
}

/// Top-1 accuracy overall and per shot group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShotMetrics {
    /// Accuracy over all evaluated samples (NaN when there are none).
    pub overall: f64,
    /// Accuracy over the samples of many-shot classes (NaN when there are none).
    pub many: f64,
    /// Accuracy over the samples of medium-shot classes (NaN when there are none).
    pub medium: f64,
    /// Accuracy over the samples of few-shot classes (NaN when there are none).
    pub few: f64,
    /// Number of many-shot classes (by training count, whether or not they have samples here).
    pub n_many: usize,
    /// Number of medium-shot classes.
    pub n_medium: usize,
    /// Number of few-shot classes.
    pub n_few: usize,
}

/// Closed-set top-1 accuracy of the cosine classifier.
///
/// `emb` [n, d] embeddings, `labels` `[n]` in `[0, c)`, `w` `[c*k, d]` class weights (or
/// class centers) with `k` sub-centers per class (SPEC 5b; `k` = 1: `[c, d]`),
/// `train_counts` `[c]` training samples per class. Sample `i` is predicted as
/// [`predict`] does. Each group's accuracy is
/// averaged over its samples, not over classes. A group ([`shot_group`]) with no samples
/// here gets NaN; `n_*` count the classes of each group, so a group with no classes has
/// `n = 0` and NaN accuracy.
pub fn closed_set(
    emb: &[f32],
    labels: &[i32],
    d: usize,
    w: &[f32],
    c: usize,
    k: usize,
    train_counts: &[u64],
) -> Result<ShotMetrics> {
    let n = check_emb(emb, labels, d)?;
    check_w("closed_set", w, c, k, d)?;
    if train_counts.len() != c {
        return Err(Error::Shape(format!(
            "train_counts has {} entries, expected C = {c}",
            train_counts.len()
        )));
    }
    check_class_labels(labels, c)?;

    let pred = predict(emb, d, w, c, k)?;
    let correct: Vec<bool> = pred.iter().zip(labels).map(|(&p, &y)| p == y as usize).collect();

    // [hits, samples] per group: many, medium, few.
    let mut tally = [[0usize; 2]; 3];
    for (i, &ok) in correct.iter().enumerate() {
        let g = group_index(shot_group(train_counts[labels[i] as usize]));
        tally[g][0] += ok as usize;
        tally[g][1] += 1;
    }
    let mut classes = [0usize; 3];
    for &t in train_counts {
        classes[group_index(shot_group(t))] += 1;
    }
    let acc = |[hits, total]: [usize; 2]| if total == 0 { f64::NAN } else { hits as f64 / total as f64 };
    let hits: usize = tally.iter().map(|t| t[0]).sum();
    Ok(ShotMetrics {
        overall: acc([hits, n]),
        many: acc(tally[0]),
        medium: acc(tally[1]),
        few: acc(tally[2]),
        n_many: classes[0],
        n_medium: classes[1],
        n_few: classes[2],
    })
}

/// The cosine classifier's class for each embedding of `emb` `[n, d]`: `argmax_j cos(emb_i,
/// w_j)` over the `c` classes of `w` `[c*k, d]`, the lowest `j` among exact ties (what
/// [`closed_set`] scores). With `k` sub-centers per class (SPEC 5b) a class's cosine is
/// its closest sub-center's, `max_k cos(emb_i, w_jk)`; the arg-max over all `c*k` rows,
/// lowest row first, is the same class, because class j's rows come before class j+1's.
pub fn predict(emb: &[f32], d: usize, w: &[f32], c: usize, k: usize) -> Result<Vec<usize>> {
    if d == 0 {
        return Err(Error::Empty("embedding dimension D = 0".into()));
    }
    if emb.len() % d != 0 {
        return Err(Error::Shape(format!("embeddings have {} values, not a multiple of D = {d}", emb.len())));
    }
    check_w("predict", w, c, k, d)?;
    check_finite("embeddings", emb)?;
    let wh: Vec<f64> = w.chunks(d).flat_map(unit_f64).collect();
    Ok((0..emb.len() / d)
        .into_par_iter()
        .map(|i| {
            let x = &emb[i * d..(i + 1) * d];
            let mut best = (f64::NEG_INFINITY, 0usize);
            for (j, wj) in wh.chunks(d).enumerate() {
                let s: f64 = wj.iter().zip(x).map(|(a, &b)| a * b as f64).sum();
                if s > best.0 {
                    best = (s, j);
                }
            }
            best.1 / k
        })
        .collect())
}

/// Errors unless `w` holds `c*k` finite rows of `d` with `c` >= 1 classes and `k` >= 1
/// sub-centers per class (`caller` names the function in the errors).
fn check_w(caller: &str, w: &[f32], c: usize, k: usize, d: usize) -> Result<()> {
    if c == 0 {
        return Err(Error::Empty(format!("{caller}: C = 0 classes")));
    }
    if k == 0 {
        return Err(Error::Empty("W needs at least one sub-center per class (K = 0)".into()));
    }
    if w.len() != c * k * d {
        return Err(Error::Shape(match k {
            1 => format!("W has {} values, expected C*D = {c}*{d}", w.len()),
            _ => format!("W has {} values, expected C*K*D = {c}*{k}*{d}", w.len()),
        }));
    }
    check_finite("W", w)
}

/// A sample [`subcenter_outliers`] reports.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Outlier {
    /// Row of `emb`.
    pub row: usize,
    /// Its label.
    pub label: i32,
    /// Its angle to its class's dominant sub-center, in degrees.
    pub angle_deg: f64,
    /// The sub-center closest to it (which may be a non-dominant one of its class).
    pub closest_subcenter: usize,
}

/// The result of [`subcenter_outliers`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OutlierReport {
    /// Per class: its dominant sub-center (0 for a class with no samples).
    pub dominant: Vec<usize>,
    /// Per class: how many of its samples are closest to each sub-center, `[C][K]`.
    pub subcenter_counts: Vec<Vec<usize>>,
    /// The samples farther than the threshold from their class's dominant sub-center,
    /// in row order.
    pub outliers: Vec<Outlier>,
}

/// Sub-center ArcFace's cleaning step (SPEC 5b): for each class j, its dominant
/// sub-center is the one that most of its samples are closest to (ties: the lowest k);
/// a sample of class j is an outlier when its angle to class j's dominant sub-center
/// exceeds `max_angle_deg` degrees.
///
/// `emb` `[n, d]` embeddings, `labels` `[n]` in `[0, c)`, `w` `[c*k, d]` the head's
/// weights with `k` sub-centers per class (class j's sub-center s is row j*k + s; with
/// `k` = 1 every sample's dominant sub-center is its class weight). Cosines in f64,
/// clamped to [-1, 1]; a sample's closest sub-center is the lowest k among ties.
pub fn subcenter_outliers(
    emb: &[f32],
    labels: &[i32],
    d: usize,
    w: &[f32],
    c: usize,
    k: usize,
    max_angle_deg: f64,
) -> Result<OutlierReport> {
    let n = check_emb(emb, labels, d)?;
    check_w("subcenter_outliers", w, c, k, d)?;
    check_class_labels(labels, c)?;
    if !(max_angle_deg.is_finite() && (0.0..=180.0).contains(&max_angle_deg)) {
        return Err(Error::InvalidConfig(format!(
            "the outlier angle must be in [0, 180] degrees, got {max_angle_deg}"
        )));
    }
    let wh: Vec<Vec<f64>> = w.chunks(d).map(unit_f64).collect();
    // Per row: the cosine to each of its class's sub-centers.
    let cos: Vec<Vec<f64>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let x = unit_f64(&emb[i * d..(i + 1) * d]);
            let y = labels[i] as usize;
            (0..k)
                .map(|s| wh[y * k + s].iter().zip(&x).map(|(a, b)| a * b).sum::<f64>().clamp(-1.0, 1.0))
                .collect()
        })
        .collect();
    let closest: Vec<usize> =
        cos.iter().map(|row| (1..k).fold(0, |best, s| if row[s] > row[best] { s } else { best })).collect();
    let mut subcenter_counts = vec![vec![0usize; k]; c];
    for (i, &s) in closest.iter().enumerate() {
        subcenter_counts[labels[i] as usize][s] += 1;
    }
    let dominant: Vec<usize> = subcenter_counts
        .iter()
        .map(|counts| (1..k).fold(0, |best, s| if counts[s] > counts[best] { s } else { best }))
        .collect();
    let outliers = (0..n)
        .filter_map(|i| {
            let y = labels[i] as usize;
            let angle_deg = cos[i][dominant[y]].acos().to_degrees();
            (angle_deg > max_angle_deg).then_some(Outlier {
                row: i,
                label: labels[i],
                angle_deg,
                closest_subcenter: closest[i],
            })
        })
        .collect();
    Ok(OutlierReport { dominant, subcenter_counts, outliers })
}

/// Retrieval and verification quality on an open set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetrievalMetrics {
    /// Fraction of queries whose nearest other sample has the same label.
    pub rank1: f64,
    /// Mean average precision over queries.
    pub map: f64,
    /// True accept rate at a false accept rate of at most 1e-3 (see [`open_set`]).
    pub tpr_at_fpr_1e3: f64,
}

/// Open-set retrieval (Rank-1, mAP) and verification (TPR at FPR <= 1e-3).
///
/// `emb` [n, d], `labels` `[n]` (identities; compared for equality only), `n >= 2`.
///
/// Retrieval: each sample in turn is a query against all the other samples, ranked by
/// descending cosine (exact ties by ascending index). Queries with no other sample of
/// their label are skipped (their AP is undefined); Rank-1 is the fraction of the remaining
/// queries whose top-ranked sample shares the label, and mAP the mean over them of
/// `AP = (1/R) * sum over relevant ranks k of precision@k` (R = relevant samples). Both are
/// NaN if no query has a relevant sample.
///
/// Verification: every unordered pair `i < j` is genuine (same label) or impostor. With
/// `m` impostor pairs, `k = floor(1e-3 * m)` false accepts are allowed; the threshold `t`
/// is the `(k+1)`-th highest impostor cosine, and a pair is accepted when its cosine is
/// strictly greater than `t`. At most `k` impostors are then accepted (fewer on ties), so
/// FPR <= 1e-3 holds exactly; TPR is the fraction of genuine pairs accepted. With fewer
/// than 1000 impostor pairs `k = 0`: `t` is the highest impostor cosine, i.e. TPR at zero
/// false accepts, the strictest reading. NaN if there are no genuine or no impostor pairs.
pub fn open_set(emb: &[f32], labels: &[i32], d: usize) -> Result<RetrievalMetrics> {
    let n = check_emb(emb, labels, d)?;
    if n < 2 {
        return Err(Error::Empty(format!("open_set needs at least 2 samples, got {n}")));
    }
    let xh: Vec<f64> = emb.chunks(d).flat_map(unit_f64).collect();
    let dot = |i: usize, j: usize| -> f64 {
        xh[i * d..(i + 1) * d].iter().zip(&xh[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum()
    };

    struct PerQuery {
        /// (hit at rank 1, AP) when the query has a relevant sample.
        retrieval: Option<(bool, f64)>,
        genuine: Vec<f64>,
        impostor: Vec<f64>,
    }
    let per: Vec<PerQuery> = (0..n)
        .into_par_iter()
        .map(|i| {
            let mut ranked: Vec<(f64, usize)> = (0..n).filter(|&j| j != i).map(|j| (dot(i, j), j)).collect();
            let (mut genuine, mut impostor) = (Vec::new(), Vec::new());
            for &(s, j) in &ranked {
                if j > i {
                    if labels[j] == labels[i] {
                        genuine.push(s);
                    } else {
                        impostor.push(s);
                    }
                }
            }
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut hits = 0usize;
            let mut ap = 0.0;
            for (rank, &(_, j)) in ranked.iter().enumerate() {
                if labels[j] == labels[i] {
                    hits += 1;
                    ap += hits as f64 / (rank + 1) as f64;
                }
            }
            let retrieval = (hits > 0).then(|| (labels[ranked[0].1] == labels[i], ap / hits as f64));
            PerQuery { retrieval, genuine, impostor }
        })
        .collect();

    let valid: Vec<(bool, f64)> = per.iter().filter_map(|q| q.retrieval).collect();
    let (rank1, map) = if valid.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        let m = valid.len() as f64;
        (valid.iter().filter(|q| q.0).count() as f64 / m, valid.iter().map(|q| q.1).sum::<f64>() / m)
    };
    let genuine: Vec<f64> = per.iter().flat_map(|q| q.genuine.iter().copied()).collect();
    let impostor: Vec<f64> = per.into_iter().flat_map(|q| q.impostor).collect();
    Ok(RetrievalMetrics { rank1, map, tpr_at_fpr_1e3: tpr_at_fpr(&genuine, impostor, 1e-3) })
}

/// TPR at FPR <= `fpr` with the threshold rule documented on [`open_set`].
fn tpr_at_fpr(genuine: &[f64], mut impostor: Vec<f64>, fpr: f64) -> f64 {
    if genuine.is_empty() || impostor.is_empty() {
        return f64::NAN;
    }
    let k = (fpr * impostor.len() as f64).floor() as usize;
    impostor.sort_by(|a, b| b.total_cmp(a));
    let t = impostor[k.min(impostor.len() - 1)];
    genuine.iter().filter(|&&g| g > t).count() as f64 / genuine.len() as f64
}

/// Per-class angular spread of embeddings, and its head / tail means.
#[derive(Clone, Debug, PartialEq)]
pub struct SpreadStats {
    /// `[C]` std of the angles of each class's samples to their class mean direction, radians;
    /// NaN for classes with fewer than 2 samples (or a mean of zero length).
    pub per_class_std: Vec<f64>,
    /// Unweighted mean of the finite `per_class_std` over head classes (NaN if none).
    pub head_mean: f64,
    /// Unweighted mean of the finite `per_class_std` over tail classes (NaN if none).
    pub tail_mean: f64,
}

/// Angular spread per class (the statistic of SPEC.md section 5, computed exactly over a
/// whole set rather than as a running average).
///
/// `emb` [n, d], `labels` `[n]` in `[0, c)`, `train_counts` `[c]`. For each class: normalize
/// its embeddings, take the normalized mean of those unit vectors as the center, the angles
/// `a_i = acos(clamp(xh_i . center, -1, 1))`, and their population std
/// `sqrt(max(mean a^2 - (mean a)^2, 0))` (divided by the count, not count - 1, like
/// `var_k` in SPEC.md section 5; computed in two passes for accuracy). Head classes are
/// those with `train_counts[k] >= head_threshold`, the rest are tail.
pub fn angular_spread(
    emb: &[f32],
    labels: &[i32],
    d: usize,
    c: usize,
    train_counts: &[u64],
    head_threshold: u64,
) -> Result<SpreadStats> {
    check_emb(emb, labels, d)?;
    if c == 0 {
        return Err(Error::Empty("angular_spread: C = 0 classes".into()));
    }
    if train_counts.len() != c {
        return Err(Error::Shape(format!(
            "train_counts has {} entries, expected C = {c}",
            train_counts.len()
        )));
    }
    check_class_labels(labels, c)?;

    let per_class_std: Vec<f64> = class_angles(emb, labels, d, c)?
        .into_iter()
        .map(|angles| {
            if angles.is_empty() {
                return f64::NAN;
            }
            let m = angles.len() as f64;
            let mean = angles.iter().sum::<f64>() / m;
            (angles.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / m).max(0.0).sqrt()
        })
        .collect();

    let mean_where = |head: bool| {
        let v: Vec<f64> = per_class_std
            .iter()
            .zip(train_counts)
            .filter(|&(s, &t)| s.is_finite() && (t >= head_threshold) == head)
            .map(|(s, _)| *s)
            .collect();
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let head_mean = mean_where(true);
    let tail_mean = mean_where(false);
    Ok(SpreadStats { per_class_std, head_mean, tail_mean })
}

/// Per class of `0..c`, the angles (radians) of its embeddings to the class's mean
/// direction, in row order: each embedding normalized, the center the normalized mean of
/// the class's unit vectors, `a_i = acos(clamp(xh_i . center, -1, 1))`. Empty for a class
/// with fewer than 2 samples or a mean of zero length. [`angular_spread`] is their std.
pub fn class_angles(emb: &[f32], labels: &[i32], d: usize, c: usize) -> Result<Vec<Vec<f64>>> {
    check_emb(emb, labels, d)?;
    check_class_labels(labels, c)?;
    let xh: Vec<f64> = emb.chunks(d).flat_map(unit_f64).collect();
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); c];
    for (i, &y) in labels.iter().enumerate() {
        rows[y as usize].push(i);
    }
    Ok(rows
        .par_iter()
        .map(|idx| {
            if idx.len() < 2 {
                return Vec::new();
            }
            let mut center = vec![0.0; d];
            for &i in idx {
                center.iter_mut().zip(&xh[i * d..(i + 1) * d]).for_each(|(c, x)| *c += x);
            }
            let norm = center.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm < 1e-12 {
                return Vec::new();
            }
            idx.iter()
                .map(|&i| {
                    let cos: f64 =
                        center.iter().zip(&xh[i * d..(i + 1) * d]).map(|(c, x)| c * x).sum::<f64>() / norm;
                    cos.clamp(-1.0, 1.0).acos()
                })
                .collect()
        })
        .collect())
}

/// `(train count, angular std)` for every class with a finite std (a scatter of class size
/// against spread; [`crate::engine::report::EvalReport::spread_points`] keeps every class,
/// as [`crate::plot::spread_over_seeds`] needs).
pub fn spread_points(stats: &SpreadStats, train_counts: &[u64]) -> Vec<(u64, f64)> {
    stats
        .per_class_std
        .iter()
        .zip(train_counts)
        .filter(|(s, _)| s.is_finite())
        .map(|(&s, &t)| (t, s))
        .collect()
}

fn group_index(g: ShotGroup) -> usize {
    match g {
        ShotGroup::Many => 0,
        ShotGroup::Medium => 1,
        ShotGroup::Few => 2,
    }
}

/// Checks `emb` [n, d] against `labels` `[n]` and finiteness; returns n.
fn check_emb(emb: &[f32], labels: &[i32], d: usize) -> Result<usize> {
    if d == 0 {
        return Err(Error::Empty("embedding dimension D = 0".into()));
    }
    let n = labels.len();
    if emb.len() != n * d {
        return Err(Error::Shape(format!("embeddings have {} values, expected n*D = {n}*{d}", emb.len())));
    }
    check_finite("embeddings", emb)?;
    Ok(n)
}

/// Labels must be in `[0, c)` (no ignored rows in evaluation).
fn check_class_labels(labels: &[i32], c: usize) -> Result<()> {
    match labels.iter().position(|&y| y < 0 || y as usize >= c) {
        Some(row) => Err(Error::LabelOutOfRange { row, label: labels[row] as i64, classes: c }),
        None => Ok(()),
    }
}

/// `v / max(|v|, 1e-12)` in f64.
fn unit_f64(v: &[f32]) -> Vec<f64> {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt().max(1e-12);
    v.iter().map(|&x| x as f64 / norm).collect()
}
