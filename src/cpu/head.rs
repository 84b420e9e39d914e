//! Fast CPU margin head: SPEC sections 3-4 with f32 storage.
//!
//! Twin of `src/oracle/head.rs` (the f64 truth) and of the CUDA head. Plan:
//! 1. normalize rows of x and W (norms accumulated in f64);
//! 2. cosines `C = xh . wh^T` [B, C] with one threaded sgemm;
//! 3. per row, in parallel (rayon): the target cosine recomputed in f64 from the
//!    raw x_i and W_y, the target-logit math (theta, cloud, margin, region, dt)
//!    and the row's log-sum-exp in f64 (the oracle's own [`target_logit`],
//!    [`cloud_alpha`] and [`row_loss`]), then the logit gradient row `dc` `[C]`
//!    stored as f32 with the target column kept aside in f64;
//! 4. `dxh = dc . wh`, `dwh = dc^T . xh` (two sgemms over the non-target
//!    columns), the normalization backward per row, then the target terms
//!    added in f64. This is dx in SPEC section 4's attention form: the first
//!    sgemm is O_i - (ls/C)(S - wh_y) with the target column left out, and the
//!    target term's p_iy - 1 goes through expm1.
//!
//! Why the target column is handled in f64: near theta = 0 the factor
//! dt = m1 sin(phi) / sin(theta) is huge while the normalization backward
//! removes almost all of dc_iy * wh_y (wh_y is nearly parallel to xh_i); in f32
//! that cancellation loses the result, so the projected target direction
//! `wh_y - xh_i (xh_i . wh_y)` (and its twin for dW) is formed in f64.
//!
//! Sub-centers (SPEC 5b, K > 1): the cosines of every sub-center [B, C*K] come from the
//! one sgemm, each class keeps its closest (ties to the lowest k), and the backward
//! scatters dc into [B, C*K] at the arg-max before the two sgemms; K = 1 runs exactly
//! the code it ran before sub-centers existed.
//!
//! Bitwise deterministic: every parallel task owns whole rows; the batch loss is
//! summed sequentially in row order; the sgemms reduce each element in a fixed
//! order. Materializes the B x C cosines (fine for the CPU sizes this serves).

use crate::check::check_finite;
use crate::config::{HeadConfig, Reduction};
use crate::cpu::gemm::sgemm;
use crate::error::{Error, Result};
use crate::oracle::head::{
    check_shard_problem, check_shard_rows, cloud_alpha, row_loss, shard_sums, target_logit, NORM_EPS,
};
use crate::shape::HeadShape;
use crate::shard::{ClassShard, ShardPartials};
use rayon::prelude::*;

/// One head call (the same type the oracle takes, so tests feed both the same problem).
pub use crate::oracle::head::HeadProblem;

/// Upstream gradient of the reduced loss.
#[derive(Clone, Copy, Debug)]
pub enum Upstream<'a> {
    /// dL/dL = g for `mean` and `sum`.
    Scalar(f32),
    /// One g_i per row, for reduction `none`.
    PerRow(&'a [f32]),
}

/// Per-row outputs of the forward pass (SPEC section 3), `[B]` each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadRows {
    /// loss_i (0 for ignored rows).
    pub loss: Vec<f32>,
    /// lse_i (0 for ignored rows).
    pub lse: Vec<f32>,
    /// c_iy, the clamped target cosine (0 for ignored rows).
    pub c_iy: Vec<f32>,
    /// t_i, the margin-transformed target cosine.
    pub t: Vec<f32>,
    /// alpha_i, the cloud perturbation actually used.
    pub alpha: Vec<f32>,
    /// k*_iy, the target's dominant sub-center (SPEC 5b; 0 with K = 1 and for ignored rows).
    pub k_iy: Vec<u32>,
}

/// Forward result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadForward {
    /// Reduced loss: mean or sum over valid rows (for `none`: the sum of the rows).
    pub loss: f64,
    /// Per-row values.
    pub rows: HeadRows,
    /// Number of non-ignored rows.
    pub n_valid: usize,
}

/// Gradients with respect to the stored inputs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadGrads {
    /// dL/dx [B, D].
    pub dx: Vec<f32>,
    /// dL/dW [C*K, D] (K sub-centers per class, SPEC 5b; [C, D] for K = 1).
    pub dw: Vec<f32>,
}

/// Per-row scalars kept between the target math and the gradient.
#[derive(Clone, Copy, Default)]
struct RowOut {
    loss: f64,
    lse: f64,
    c_iy: f64,
    t: f64,
    alpha: f64,
    /// dt_i (SPEC section 4), 0 for ignored rows.
    dt: f64,
    /// dc_iy, the target column of the logit gradient (backward only).
    dc_target: f64,
    /// k*_iy, the target's dominant sub-center.
    k_iy: u32,
    valid: bool,
    /// The row's target column in this shard (SPEC 5c; always the label for the whole head).
    target: Option<usize>,
    /// A proper shard's sums over its logits: max, sum of exp(z - max), sum (SPEC 5c).
    sums: (f64, f64, f64),
}

/// Normalized rows (f32) and their norms (f64, before the eps clamp) of `v` [rows, d].
fn normalize_rows(v: &[f32], d: usize) -> (Vec<f32>, Vec<f64>) {
    let rows = v.len() / d;
    let mut vh = vec![0.0f32; v.len()];
    let mut norms = vec![0.0f64; rows];
    vh.par_chunks_mut(d).zip(norms.par_iter_mut()).zip(v.par_chunks(d)).for_each(|((out, n), row)| {
        let sq: f64 = row.iter().map(|&a| a as f64 * a as f64).sum();
        *n = sq.sqrt();
        let inv = 1.0 / n.max(NORM_EPS);
        for (o, &a) in out.iter_mut().zip(row) {
            *o = (a as f64 * inv) as f32;
        }
    });
    (vh, norms)
}

/// Backward through `vh = v / max(||v||, eps)`, row by row, in place on `g` [rows, d].
///
/// Not the oracle's `project_out`: this one works on f32 rows in place and multiplies
/// by the inverse norm, and the backend's bits depend on that rounding.
fn normalize_backward(g: &mut [f32], vh: &[f32], norms: &[f64], d: usize) {
    g.par_chunks_mut(d).zip(vh.par_chunks(d)).zip(norms.par_iter()).for_each(|((gr, hr), &n)| {
        let dot: f64 = gr.iter().zip(hr).map(|(&a, &b)| a as f64 * b as f64).sum();
        let inv = 1.0 / n.max(NORM_EPS);
        for (gv, &hv) in gr.iter_mut().zip(hr) {
            *gv = ((*gv as f64 - hv as f64 * dot) * inv) as f32;
        }
    });
}

/// Shared forward; returns the outputs plus what the backward needs.
struct Fwd {
    rows: Vec<RowOut>,
    /// Cosines [B, C] (each class's closest sub-center's), overwritten by the logit
    /// gradient in the backward.
    cos: Vec<f32>,
    /// Sub-centers per class K (SPEC 5b).
    k: usize,
    /// k*_ij [B, C]: the sub-center each class cosine came from (empty for K = 1).
    kstar: Vec<u32>,
    xh: Vec<f32>,
    nx: Vec<f64>,
    /// W-hat [C*K, D] (class j's sub-center k is row j*K + k), its norms [C*K].
    wh: Vec<f32>,
    nw: Vec<f64>,
}

impl Fwd {
    /// The W row (of the C*K) that row i's class-j cosine came from.
    fn w_row(&self, c: usize, i: usize, j: usize) -> usize {
        w_row(self.k, &self.kstar, c, i, j)
    }
}

/// The W row (of the C*K) that row i's class-j cosine came from, given K and k*.
fn w_row(k: usize, kstar: &[u32], c: usize, i: usize, j: usize) -> usize {
    if k == 1 {
        j
    } else {
        j * k + kstar[i * c + j] as usize
    }
}

/// The forward of the whole head (`shard` None), or of one shard (SPEC 5c): then the rows
/// hold its partials instead of the loss.
fn forward_impl(cfg: &HeadConfig, p: &HeadProblem, shard: Option<ClassShard>) -> Result<Fwd> {
    let is_whole = shard.is_none();
    let shard = shard.unwrap_or(ClassShard::whole(p.shape.c));
    // The oracle's checks: the same preconditions and the same errors.
    check_shard_problem(cfg, p, shard)?;
    let HeadShape { b, c, d } = p.shape;
    let (mut xh, mut nx) = normalize_rows(p.x, d);
    // Ignored rows may hold anything, NaN included (SPEC 2); their logit gradients are 0, but
    // 0 * NaN = NaN inside the dW product, so their normalized rows are zeroed (and their norms
    // set to 1 so that the normalization backward of their zero gradient stays 0).
    for (i, _) in p.labels.iter().enumerate().filter(|(_, &y)| y < 0) {
        xh[i * d..(i + 1) * d].fill(0.0);
        nx[i] = 1.0;
    }
    let (wh, nw) = normalize_rows(p.w, d);
    let k = cfg.subcenters as usize;
    let mut cos = vec![0.0f32; b * c];
    let mut kstar = Vec::new();
    if k == 1 {
        sgemm(false, true, b, c, d, 1.0, &xh, &wh, 0.0, &mut cos)?;
    } else {
        // Every sub-center's cosine [B, C*K], then each class's closest (SPEC 5b; ties to
        // the lowest k).
        let mut all = vec![0.0f32; b * c * k];
        sgemm(false, true, b, c * k, d, 1.0, &xh, &wh, 0.0, &mut all)?;
        kstar = vec![0u32; b * c];
        cos.par_chunks_mut(c).zip(kstar.par_chunks_mut(c)).zip(all.par_chunks(c * k)).for_each(
            |((row, ks), a)| {
                for j in 0..c {
                    let (mut best, mut at) = (a[j * k], 0);
                    for kk in 1..k {
                        if a[j * k + kk] > best {
                            (best, at) = (a[j * k + kk], kk);
                        }
                    }
                    row[j] = best;
                    ks[j] = at as u32;
                }
            },
        );
    }

    let s = cfg.s as f64;
    let ls = cfg.label_smoothing as f64;
    let rows: Vec<RowOut> = cos
        .par_chunks_mut(c)
        .enumerate()
        .map(|(i, row)| {
            row.iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0));
            let Ok(y) = usize::try_from(p.labels[i]) else {
                return RowOut::default();
            };
            let Some(y) = shard.local(y, c) else {
                // Another shard holds the label: only the sums over this shard's logits.
                return RowOut {
                    valid: true,
                    sums: shard_sums(|j| s * row[j] as f64, c),
                    ..Default::default()
                };
            };
            // f64 target cosine from the raw inputs (see the module docs), against the
            // target's closest sub-center.
            let ry = w_row(k, &kstar, c, i, y);
            let dot: f64 = p.x[i * d..(i + 1) * d]
                .iter()
                .zip(&p.w[ry * d..(ry + 1) * d])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            let c_iy = (dot / (nx[i].max(NORM_EPS) * nw[ry].max(NORM_EPS))).clamp(-1.0, 1.0);
            // The target logit and the row loss are the oracle's own f64 functions.
            let alpha = cloud_alpha(cfg, p.sigma_cloud, y, p.seed, p.step, i);
            let target = target_logit(cfg, c_iy, alpha);
            let (t, dt) = (target.t, target.dt);
            let z_y = s * t;
            let z = |j| if j == y { z_y } else { s * row[j] as f64 };
            let ((loss, lse), sums) = if is_whole {
                (row_loss(z, c, y, ls), (0.0, 0.0, 0.0))
            } else {
                ((0.0, 0.0), shard_sums(z, c))
            };
            let k_iy = (ry - y * k) as u32;
            RowOut { loss, lse, c_iy, t, alpha, dt, dc_target: 0.0, k_iy, valid: true, target: Some(y), sums }
        })
        .collect();
    Ok(Fwd { rows, cos, k, kstar, xh, nx, wh, nw })
}

fn pack(cfg: &HeadConfig, rows: &[RowOut]) -> HeadForward {
    let n_valid = rows.iter().filter(|r| r.valid).count();
    // Sequential in row order: the reduction never depends on the thread count.
    let sum: f64 = rows.iter().filter(|r| r.valid).map(|r| r.loss).sum();
    let loss = match cfg.reduction {
        Reduction::Mean if n_valid > 0 => sum / n_valid as f64,
        Reduction::Mean => 0.0,
        Reduction::Sum | Reduction::None => sum,
    };
    let col = |f: fn(&RowOut) -> f64| rows.iter().map(|r| f(r) as f32).collect::<Vec<f32>>();
    HeadForward {
        loss,
        rows: HeadRows {
            loss: col(|r| r.loss),
            lse: col(|r| r.lse),
            c_iy: col(|r| r.c_iy),
            t: col(|r| r.t),
            alpha: col(|r| r.alpha),
            k_iy: rows.iter().map(|r| r.k_iy).collect(),
        },
        n_valid,
    }
}

/// `v / max(||v||, eps)` in f64 with the norm `n` already known.
fn unit64(v: &[f32], n: f64) -> Vec<f64> {
    let inv = 1.0 / n.max(NORM_EPS);
    v.iter().map(|&a| a as f64 * inv).collect()
}

/// Adds the target-column terms of the backward in f64:
/// dx_i += dc_iy (wh_y - xh_i (xh_i . wh_y)) / max(nx_i, eps) and
/// dW_y += sum_i dc_iy (xh_i - wh_y (wh_y . xh_i)) / max(nw_y, eps).
fn add_target_terms(p: &HeadProblem, f: &Fwd, dx: &mut [f32], dw: &mut [f32]) {
    let HeadShape { c, d, .. } = p.shape;
    let (rows, nx, nw) = (&f.rows, &f.nx, &f.nw);
    let proj = |a: &[f64], b: &[f64]| -> Vec<f64> {
        let dot: f64 = a.iter().zip(b).map(|(u, v)| u * v).sum();
        b.iter().zip(a).map(|(bv, av)| bv - av * dot).collect()
    };
    dx.par_chunks_mut(d).enumerate().for_each(|(i, out)| {
        let r = &rows[i];
        if !r.valid || r.dc_target == 0.0 {
            return;
        }
        let ry = f.w_row(c, i, r.target.expect("a row with a target term has a target column"));
        let xh = unit64(&p.x[i * d..(i + 1) * d], nx[i]);
        let wh = unit64(&p.w[ry * d..(ry + 1) * d], nw[ry]);
        let scale = r.dc_target / nx[i].max(NORM_EPS);
        for (o, v) in out.iter_mut().zip(proj(&xh, &wh)) {
            *o = (*o as f64 + scale * v) as f32;
        }
    });
    // Rows by the W row (sub-center) their target cosine came from.
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); c * f.k];
    for (i, r) in rows.iter().enumerate() {
        if let (Some(y), true) = (r.target, r.dc_target != 0.0) {
            by_class[f.w_row(c, i, y)].push(i);
        }
    }
    dw.par_chunks_mut(d).zip(by_class.par_iter()).enumerate().for_each(|(k, (out, members))| {
        if members.is_empty() {
            return;
        }
        let wh = unit64(&p.w[k * d..(k + 1) * d], nw[k]);
        let mut acc = vec![0.0f64; d];
        for &i in members {
            let xh = unit64(&p.x[i * d..(i + 1) * d], nx[i]);
            for (a, v) in acc.iter_mut().zip(proj(&wh, &xh)) {
                *a += rows[i].dc_target * v;
            }
        }
        let inv = 1.0 / nw[k].max(NORM_EPS);
        for (o, a) in out.iter_mut().zip(acc) {
            *o = (*o as f64 + a * inv) as f32;
        }
    });
}

/// Forward only: the loss and the per-row outputs.
pub fn forward(cfg: &HeadConfig, p: &HeadProblem) -> Result<HeadForward> {
    let f = forward_impl(cfg, p, None)?;
    Ok(pack(cfg, &f.rows))
}

/// One shard's partials (SPEC 5c): `p.shape.c`, `p.w` and `p.sigma_cloud` are the shard's
/// classes, `p.labels` the global labels.
pub fn shard_forward(cfg: &HeadConfig, p: &HeadProblem, shard: ClassShard) -> Result<ShardPartials> {
    let f = forward_impl(cfg, p, Some(shard))?;
    let mut out = ShardPartials::zeros(p.shape.b);
    let s = cfg.s as f64;
    for (i, r) in f.rows.iter().enumerate().filter(|(_, r)| r.valid) {
        (out.max[i], out.sum_exp[i], out.sum_z[i]) = r.sums;
        if r.target.is_some() {
            (out.z_y[i], out.c_iy[i], out.t[i], out.alpha[i], out.k_iy[i]) =
                (s * r.t, r.c_iy, r.t, r.alpha, r.k_iy);
        }
    }
    Ok(out)
}

/// One shard's gradients (SPEC 5c): its part of dx (the head's dx is the sum over shards)
/// and the dW of its classes, given the combined `lse` `[B]` and the upstream weights
/// `weight` `[B]` (w_i of SPEC 4; read only for valid rows).
pub fn shard_backward(
    cfg: &HeadConfig,
    p: &HeadProblem,
    shard: ClassShard,
    lse: &[f64],
    weight: &[f64],
) -> Result<HeadGrads> {
    let mut f = forward_impl(cfg, p, Some(shard))?;
    check_shard_rows(p.shape.b, lse, weight, p.labels)?;
    for (i, r) in f.rows.iter_mut().enumerate() {
        r.lse = lse[i];
    }
    gradients(cfg, p, f, |i| weight[i], shard.total)
}

/// Forward and backward in one pass (the training path).
pub fn forward_backward(cfg: &HeadConfig, p: &HeadProblem, up: Upstream) -> Result<(HeadForward, HeadGrads)> {
    if let Upstream::PerRow(g) = up {
        if cfg.reduction != Reduction::None {
            return Err(Error::InvalidConfig("a per-row upstream gradient needs reduction none".into()));
        }
        if g.len() != p.shape.b {
            return Err(Error::Shape(format!(
                "upstream has {} entries, expected B = {}",
                g.len(),
                p.shape.b
            )));
        }
        check_finite("upstream", g)?;
    }
    if let Upstream::Scalar(g) = up {
        if cfg.reduction == Reduction::None {
            return Err(Error::InvalidConfig("reduction none needs a per-row upstream gradient".into()));
        }
        check_finite("upstream", &[g])?;
    }
    let f = forward_impl(cfg, p, None)?;
    let out = pack(cfg, &f.rows);
    let row_w = |i: usize| -> f64 {
        match (up, cfg.reduction) {
            (Upstream::PerRow(g), _) => g[i] as f64,
            (Upstream::Scalar(g), Reduction::Mean) => g as f64 / out.n_valid.max(1) as f64,
            (Upstream::Scalar(g), _) => g as f64,
        }
    };
    let grads = gradients(cfg, p, f, row_w, p.shape.c)?;
    Ok((out, grads))
}

/// The backward of an evaluated shard (the whole head, or SPEC 5c's shard) with row weights
/// `row_w(i)`, each row's `lse` already in `f.rows`, and `total` classes in the whole head.
fn gradients(
    cfg: &HeadConfig,
    p: &HeadProblem,
    mut f: Fwd,
    row_w: impl Fn(usize) -> f64 + Sync,
    total: usize,
) -> Result<HeadGrads> {
    let HeadShape { b, c, d } = p.shape;
    let s = cfg.s as f64;
    let ls = cfg.label_smoothing as f64;
    // Logit gradient dc [B, C] written over the cosines; the target column is
    // kept in f64 (`dc_target`) and zeroed in the matrix. The oracle's dc loop has the
    // same math but a materialized f64 row and another rounding order of q_y, so it
    // stays a separate loop.
    f.cos.par_chunks_mut(c).zip(f.rows.par_iter_mut()).enumerate().for_each(|(i, (row, r))| {
        if !r.valid {
            row.iter_mut().for_each(|v| *v = 0.0);
            return;
        }
        let y = r.target;
        let ws = row_w(i) * s;
        let q_off = ls / total as f64;
        for (j, v) in row.iter_mut().enumerate() {
            let z = if Some(j) == y { s * r.t } else { s * *v as f64 };
            let pj = (z - r.lse).exp();
            if Some(j) == y {
                // p_iy - 1 through expm1: no cancellation as p_iy -> 1 (SPEC 4, attention form).
                r.dc_target = ws * ((z - r.lse).exp_m1() + ls - q_off) * r.dt;
                *v = 0.0;
            } else {
                *v = (ws * (pj - q_off)) as f32;
            }
        }
    });
    // With K > 1 each dc_ij goes to the sub-center its cosine came from: dc [B, C*K].
    let k = f.k;
    let dc = if k == 1 {
        std::mem::take(&mut f.cos)
    } else {
        let mut wide = vec![0.0f32; b * c * k];
        wide.par_chunks_mut(c * k).zip(f.cos.par_chunks(c)).enumerate().for_each(|(i, (w, row))| {
            for (j, &v) in row.iter().enumerate() {
                w[j * k + f.kstar[i * c + j] as usize] = v;
            }
        });
        wide
    };
    let mut dx = vec![0.0f32; b * d];
    let mut dw = vec![0.0f32; c * k * d];
    sgemm(false, false, b, d, c * k, 1.0, &dc, &f.wh, 0.0, &mut dx)?;
    sgemm(true, false, c * k, d, b, 1.0, &dc, &f.xh, 0.0, &mut dw)?;
    normalize_backward(&mut dx, &f.xh, &f.nx, d);
    normalize_backward(&mut dw, &f.wh, &f.nw, d);
    add_target_terms(p, &f, &mut dx, &mut dw);
    Ok(HeadGrads { dx, dw })
}
