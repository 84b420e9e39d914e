//! Class-parallel heads (SPEC section 5c): W split by class over ranks, each rank computing
//! per-row partials over its own classes, the partials combined into the loss, and the
//! backward run per shard given the combined log-sum-exp.
//!
//! This module holds what every implementation shares: which classes a shard owns
//! ([`ClassShard`]), the partials ([`ShardPartials`]) and their combine ([`combine`], the
//! order-fixed f64 form the Python all-reduce follows), and PartialFC's negative-class
//! sample ([`sample_classes`]). The per-shard forward and backward are
//! `oracle::head::shard_forward_f64` / `shard_backward_f64` (the truth) and
//! `cpu::head::shard_forward` / `shard_backward` (f32 storage).

use crate::config::Reduction;
use crate::error::{Error, Result};
use crate::oracle::philox::philox4x32_10;

/// The classes one shard holds: global classes `first .. first + c` of `total`, where `c` is
/// the shard's own class count (its W has `c * K` rows). Labels stay global (in
/// `[0, total)`); a row whose label another shard holds has no target column here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassShard {
    /// The global index of the shard's first class.
    pub first: usize,
    /// The number of classes over all shards (C of the whole head).
    pub total: usize,
}

impl ClassShard {
    /// The whole head as one shard: classes `0 .. c` of `c`.
    pub fn whole(c: usize) -> Self {
        ClassShard { first: 0, total: c }
    }

    /// Checks that a shard of `c` classes starting at `first` lies inside `total` (an empty
    /// shard is refused by the shape check that follows, as `Error::Empty`).
    pub fn check(&self, c: usize) -> Result<()> {
        if self.first.checked_add(c).is_none_or(|end| end > self.total) {
            return Err(Error::Shape(format!(
                "a shard of {c} classes from class {} does not fit in {} classes",
                self.first, self.total
            )));
        }
        Ok(())
    }

    /// The shard-local column of global label `y` (a valid label), if this shard of `c`
    /// classes holds it.
    pub fn local(&self, y: usize, c: usize) -> Option<usize> {
        y.checked_sub(self.first).filter(|&j| j < c)
    }
}

/// One shard's per-row partials (SPEC 5c), `[B]` each; every entry is 0 for an ignored row.
/// The target fields are those of the shard that holds the row's label and 0 on the others,
/// so that their sum over shards is the owner's value exactly.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardPartials {
    /// m_i = max_j z_ij over the shard's classes.
    pub max: Vec<f64>,
    /// l_i = sum_j exp(z_ij - m_i) over the shard's classes.
    pub sum_exp: Vec<f64>,
    /// sum_j z_ij over the shard's classes (read only with label smoothing).
    pub sum_z: Vec<f64>,
    /// z_iy = s t_i.
    pub z_y: Vec<f64>,
    /// c_iy, the clamped target cosine.
    pub c_iy: Vec<f64>,
    /// t_i, the margin-transformed target cosine.
    pub t: Vec<f64>,
    /// alpha_i, the cloud perturbation used.
    pub alpha: Vec<f64>,
    /// k*_iy, the target's dominant sub-center.
    pub k_iy: Vec<u32>,
}

impl ShardPartials {
    /// All-zero partials of `b` rows.
    pub fn zeros(b: usize) -> Self {
        ShardPartials {
            max: vec![0.0; b],
            sum_exp: vec![0.0; b],
            sum_z: vec![0.0; b],
            z_y: vec![0.0; b],
            c_iy: vec![0.0; b],
            t: vec![0.0; b],
            alpha: vec![0.0; b],
            k_iy: vec![0; b],
        }
    }
}

/// The whole head's per-row results from every shard's partials (SPEC 5c).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Combined {
    /// The reduced loss (mean over valid rows, their sum, or for `none` their sum).
    pub loss: f64,
    /// loss_i, 0 for ignored rows.
    pub row_loss: Vec<f64>,
    /// lse_i, the log-sum-exp over all classes, 0 for ignored rows.
    pub lse: Vec<f64>,
    /// The target outputs summed over shards (each is its owner's), for the rows' report.
    pub target: ShardPartials,
    /// Rows with a label >= 0.
    pub n_valid: usize,
}

/// Combines the partials of shards that together hold all `total` classes (SPEC 5c), in f64
/// and in shard order: M_i = max_r m_ri, lse_i = M_i + ln sum_r l_ri exp(m_ri - M_i),
/// loss_i = lse_i - (1 - ls) z_iy - (ls / total) sum_r sum_z_ri.
///
/// `labels` are the global labels (negative: ignored). Callers that exchange partials
/// between processes (the Python all-reduce) compute the same formula with their
/// reductions' order.
pub fn combine(
    parts: &[ShardPartials],
    labels: &[i32],
    total: usize,
    ls: f64,
    reduction: Reduction,
) -> Result<Combined> {
    let b = labels.len();
    if parts.is_empty() || parts.iter().any(|p| p.max.len() != b || p.sum_exp.len() != b) {
        return Err(Error::Shape(format!("combine needs one or more shards' partials of B = {b} rows")));
    }
    let mut out = Combined {
        target: ShardPartials::zeros(b),
        row_loss: vec![0.0; b],
        lse: vec![0.0; b],
        ..Default::default()
    };
    for i in (0..b).filter(|&i| labels[i] >= 0) {
        out.n_valid += 1;
        let m = parts.iter().map(|p| p.max[i]).fold(f64::NEG_INFINITY, f64::max);
        let l: f64 = parts.iter().map(|p| p.sum_exp[i] * (p.max[i] - m).exp()).sum();
        let sum_z: f64 = parts.iter().map(|p| p.sum_z[i]).sum();
        let t = &mut out.target;
        for p in parts {
            t.z_y[i] += p.z_y[i];
            t.c_iy[i] += p.c_iy[i];
            t.t[i] += p.t[i];
            t.alpha[i] += p.alpha[i];
            t.k_iy[i] += p.k_iy[i];
        }
        let lse = m + l.ln();
        out.lse[i] = lse;
        out.row_loss[i] = if ls == 0.0 {
            lse - t.z_y[i]
        } else {
            lse - (1.0 - ls) * t.z_y[i] - (ls / total as f64) * sum_z
        };
    }
    let sum: f64 = out.row_loss.iter().sum();
    out.loss = match reduction {
        Reduction::Mean if out.n_valid > 0 => sum / out.n_valid as f64,
        Reduction::Mean => 0.0,
        Reduction::Sum | Reduction::None => sum,
    };
    Ok(out)
}

/// The classes of shard `first .. first + c` that PartialFC's negative-class sampling keeps
/// at step `step` (SPEC 5c), as global class indices: every class that labels a row of the
/// batch (`labels`, global; negatives ignored), in increasing order, then the
/// `max(n - positives, 0)` other classes of the shard with the smallest scores
/// u_j = r0 / 2^32, r0 the first Philox word of counter (j, 1, step low, step high) under
/// key `seed` (ties to the lower j), in increasing order; n = ceil(rate c - 1e-9), at least
/// 1 (the 1e-9: a product that rounds just above a whole number, as 0.07 * 100, keeps that
/// number). `rate` 1 keeps every class in order. The same (labels, shard, rate, seed, step) give the same classes in any process.
pub fn sample_classes(
    labels: &[i32],
    first: usize,
    c: usize,
    rate: f64,
    seed: u64,
    step: u64,
) -> Result<Vec<usize>> {
    if !(rate > 0.0 && rate <= 1.0) {
        return Err(Error::InvalidConfig(format!("the sampling rate must be in (0, 1], got {rate}")));
    }
    if rate == 1.0 {
        return Ok((first..first + c).collect());
    }
    let mut positive = vec![false; c];
    for &y in labels {
        if let Some(j) = usize::try_from(y).ok().and_then(|y| y.checked_sub(first)).filter(|&j| j < c) {
            positive[j] = true;
        }
    }
    let mut kept: Vec<usize> = (0..c).filter(|&j| positive[j]).map(|j| first + j).collect();
    let want = ((rate * c as f64 - 1e-9).ceil().max(1.0) as usize).min(c);
    if want > kept.len() {
        let key = [seed as u32, (seed >> 32) as u32];
        let mut negatives: Vec<(u32, usize)> = (0..c)
            .filter(|&j| !positive[j])
            .map(|j| {
                let g = first + j;
                (philox4x32_10([g as u32, 1, step as u32, (step >> 32) as u32], key)[0], g)
            })
            .collect();
        let n = want - kept.len();
        negatives.select_nth_unstable(n - 1);
        let mut chosen: Vec<usize> = negatives[..n].iter().map(|&(_, g)| g).collect();
        chosen.sort_unstable();
        kept.extend(chosen);
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_columns_and_bounds() {
        let s = ClassShard { first: 3, total: 10 };
        assert_eq!(s.local(3, 4), Some(0));
        assert_eq!(s.local(6, 4), Some(3));
        assert_eq!(s.local(7, 4), None);
        assert_eq!(s.local(2, 4), None);
        assert!(s.check(7).is_ok());
        assert!(s.check(8).is_err());
        assert!(ClassShard { first: usize::MAX, total: 10 }.check(1).is_err());
        assert!(ClassShard::whole(5).check(5).is_ok() && ClassShard::whole(5).check(6).is_err());
    }

    #[test]
    fn sample_keeps_positives_first_and_is_a_function_of_its_inputs() {
        let labels = [12, -1, 15, 12, 3, 40];
        let a = sample_classes(&labels, 10, 20, 0.3, 7, 5).unwrap();
        // ceil(0.3 * 20) = 6 classes: the positives 12 and 15, then 4 negatives in order.
        assert_eq!(a.len(), 6);
        assert_eq!(&a[..2], &[12, 15]);
        assert!(a[2..].windows(2).all(|w| w[0] < w[1]));
        assert!(a[2..].iter().all(|&g| (10..30).contains(&g) && g != 12 && g != 15));
        assert_eq!(a, sample_classes(&labels, 10, 20, 0.3, 7, 5).unwrap());
        // Another step or seed draws other negatives (the positives stay).
        let b = sample_classes(&labels, 10, 20, 0.3, 7, 6).unwrap();
        let c = sample_classes(&labels, 10, 20, 0.3, 8, 5).unwrap();
        assert!(b != a && c != a && b[..2] == a[..2] && c[..2] == a[..2]);
        // More positives than the rate asks for: all of them, no negative.
        assert_eq!(sample_classes(&labels, 10, 20, 0.05, 7, 5).unwrap(), vec![12, 15]);
        // The count is the whole number the rate names, though 0.07 * 100 rounds above 7.
        assert!(std::hint::black_box(0.07f64) * 100.0 > 7.0);
        assert_eq!(sample_classes(&[], 0, 100, 0.07, 1, 1).unwrap().len(), 7);
        assert_eq!(sample_classes(&[], 0, 50, 0.14, 1, 1).unwrap().len(), 7);
        assert_eq!(sample_classes(&[], 0, 50, 0.001, 1, 1).unwrap().len(), 1);
        // Rate 1: every class in order.
        assert_eq!(sample_classes(&labels, 10, 4, 1.0, 7, 5).unwrap(), vec![10, 11, 12, 13]);
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(sample_classes(&labels, 0, 4, bad, 0, 0).is_err());
        }
    }

    #[test]
    fn sampled_negatives_are_the_smallest_scores() {
        // The rule itself, against a full sort of every negative's score.
        let (first, c, seed, step) = (100, 50, 3, 9);
        let kept = sample_classes(&[], first, c, 0.2, seed, step).unwrap();
        let mut all: Vec<(u32, usize)> = (first..first + c)
            .map(|g| (philox4x32_10([g as u32, 1, step as u32, 0], [seed as u32, 0])[0], g))
            .collect();
        all.sort_unstable();
        let mut want: Vec<usize> = all[..10].iter().map(|&(_, g)| g).collect();
        want.sort_unstable();
        assert_eq!(kept, want);
    }
}
