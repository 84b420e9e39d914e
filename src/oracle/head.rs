//! The margin head with the LEAP feature cloud as plain f64 loops (SPEC sections 3 and 4).
//!
//! This is the truth that the CPU backend and both CUDA paths are checked
//! against, so it favours the obvious over the fast: every row and class is a
//! loop, every sum is an f64 sum in index order, and the code follows the SPEC
//! line by line (the SPEC's names are used for the variables). Inputs given as
//! f32 ([`HeadProblem`]) are widened to f64 before any arithmetic; the f64
//! entry points ([`forward_f64`], [`backward_f64`]) exist so that finite
//! differences of the forward can check the backward.
//!
//! Conventions that the SPEC leaves to the implementation:
//! - `Reduction::None`: [`ForwardOutput::loss`] is the sum of the row losses
//!   (the per-row losses are in [`RowOutputs::loss`]); the backward takes
//!   [`Upstream::PerRow`].
//! - `Reduction::Mean` with no valid row: the loss is 0 and every gradient is 0.
//! - eps_i is drawn with the row index `i` as counter, whether or not other rows
//!   are ignored, so ignoring a row never changes another row's cloud.
//! - With `CloudMode::Off`, `sigma_cloud` may be empty (or have C entries, unused).

use crate::check::{check_finite, check_finite_rows, check_head_inputs_of, check_sigma};
use crate::config::{CloudMode, Fallback, HeadConfig, MarginGrad, Reduction};
use crate::error::{Error, Result};
use crate::oracle::philox::cloud_normal;
use crate::shape::HeadShape;
use crate::shard::{ClassShard, ShardPartials};
use std::f64::consts::PI;

/// Floor on vector norms before dividing (SPEC section 3: `max(||v||, 1e-12)`).
pub const NORM_EPS: f64 = 1e-12;

/// How far inside [-1, 1] the target cosine is clamped before `acos` (SPEC section 3).
pub const ACOS_CLAMP: f64 = 1e-7;

/// One head call with inputs x and W of element type `F`: f32 ([`HeadProblem`]) as the
/// GPU paths receive them, or f64 ([`HeadProblemF64`]) for gradient checks.
#[derive(Clone, Copy, Debug)]
pub struct HeadProblemOf<'a, F> {
    /// Dimensions B, C, D.
    pub shape: HeadShape,
    /// Features x `[B, D]`, row-major.
    pub x: &'a [F],
    /// Class weights W `[C, D]`, row-major.
    pub w: &'a [F],
    /// Labels y `[B]` in [0, C); negative marks an ignored row.
    pub labels: &'a [i32],
    /// Per-class cloud std `[C]` in radians, finite and >= 0 (may be empty when the cloud is off).
    pub sigma_cloud: &'a [f32],
    /// RNG seed (Philox key).
    pub seed: u64,
    /// Training step (high half of the Philox counter).
    pub step: u64,
}

/// One head call with f32 inputs, as the GPU paths and the CPU backend receive them.
pub type HeadProblem<'a> = HeadProblemOf<'a, f32>;

/// One head call with f64 features and weights, for gradient checks.
pub type HeadProblemF64<'a> = HeadProblemOf<'a, f64>;

impl<'a, F> HeadProblemOf<'a, F> {
    /// The same call with other features and weights (of the same shapes).
    pub fn with_inputs<G>(&self, x: &'a [G], w: &'a [G]) -> HeadProblemOf<'a, G> {
        HeadProblemOf {
            shape: self.shape,
            x,
            w,
            labels: self.labels,
            sigma_cloud: self.sigma_cloud,
            seed: self.seed,
            step: self.step,
        }
    }
}

/// Which branch of the target logit (SPEC section 3) a row took.
///
/// With `Fallback::Clamp` this is where phi_i was before clamping; with `Fallback::None`
/// where phi_i is (the formula is the regular one everywhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Region {
    /// 0 <= phi_i <= pi: t_i = cos(phi_i) - m3.
    Regular,
    /// phi_i > pi: linear fallback (or clamped to pi).
    Fallback,
    /// phi_i < 0: t_i = 1 - m3 (or clamped to 0, the same value).
    Saturated,
    /// Negative label: no loss, no gradient.
    Ignored,
}

/// Per-row results of the forward pass, each of length B (0 for ignored rows).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowOutputs {
    /// loss_i (before the reduction).
    pub loss: Vec<f64>,
    /// lse_i = log sum_j exp(z_ij).
    pub lse: Vec<f64>,
    /// Target cosine c_iy (clamped to [-1, 1]).
    pub c_iy: Vec<f64>,
    /// Margin-transformed target cosine t_i (z_iy = s * t_i).
    pub t: Vec<f64>,
    /// Cloud perturbation alpha_i actually applied.
    pub alpha: Vec<f64>,
    /// Branch taken by the target logit.
    pub region: Vec<Region>,
    /// k*_iy, the target's dominant sub-center (SPEC 5b; 0 with K = 1 and for ignored rows).
    pub k_iy: Vec<u32>,
}

/// Result of [`forward`] / [`forward_f64`].
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardOutput {
    /// Reduced loss: mean over valid rows (0 if none), their sum, or for
    /// `Reduction::None` the sum of the row losses.
    pub loss: f64,
    /// Per-row outputs.
    pub rows: RowOutputs,
    /// Number of rows with a non-negative label.
    pub n_valid: usize,
}

/// Upstream gradient of the backward pass.
#[derive(Clone, Copy, Debug)]
pub enum Upstream<'a> {
    /// dLoss for `Reduction::Mean` and `Reduction::Sum` (1 for a plain loss).
    Scalar(f64),
    /// d loss_i `[B]` for `Reduction::None`; all finite, entries of ignored rows are otherwise unused.
    PerRow(&'a [f64]),
}

/// Gradients of the head with respect to its inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    /// dx `[B, D]`, row-major.
    pub dx: Vec<f64>,
    /// dW `[C, D]`, row-major.
    pub dw: Vec<f64>,
}

/// theta_i = acos(clamp(c_iy, -1 + 1e-7, 1 - 1e-7)) for each row (SPEC section 3).
///
/// This is the angle that `CenterMode::ClassWeight` statistics consume
/// ([`crate::stats::StatsState::update_from_angles`]).
pub fn target_angles(rows: &RowOutputs) -> Vec<f64> {
    rows.c_iy.iter().map(|&c| target_angle(c)).collect()
}

fn target_angle(c_iy: f64) -> f64 {
    c_iy.clamp(-1.0 + ACOS_CLAMP, 1.0 - ACOS_CLAMP).acos()
}

/// Loss and per-row outputs for f32 inputs (SPEC section 3).
pub fn forward(cfg: &HeadConfig, p: &HeadProblem) -> Result<ForwardOutput> {
    check_problem(cfg, p)?;
    let (x, w) = (widen(p.x), widen(p.w));
    Ok(reduce(cfg, &evaluate(cfg, &p.with_inputs(&x, &w), None)))
}

/// Gradients dx and dW for f32 inputs (SPEC section 4).
pub fn backward(cfg: &HeadConfig, p: &HeadProblem, g: Upstream) -> Result<Gradients> {
    check_problem(cfg, p)?;
    check_upstream(cfg, p.shape, g)?;
    let (x, w) = (widen(p.x), widen(p.w));
    Ok(whole_gradients(cfg, &evaluate(cfg, &p.with_inputs(&x, &w), None), g))
}

/// Loss and per-row outputs for f64 features and weights (SPEC section 3).
pub fn forward_f64(cfg: &HeadConfig, p: &HeadProblemF64) -> Result<ForwardOutput> {
    check_problem_f64(cfg, p)?;
    Ok(reduce(cfg, &evaluate(cfg, p, None)))
}

/// Gradients dx and dW for f64 features and weights (SPEC section 4).
pub fn backward_f64(cfg: &HeadConfig, p: &HeadProblemF64, g: Upstream) -> Result<Gradients> {
    check_problem_f64(cfg, p)?;
    check_upstream(cfg, p.shape, g)?;
    Ok(whole_gradients(cfg, &evaluate(cfg, p, None), g))
}

/// One shard's partials (SPEC 5c) for f64 features and the shard's weights: `p.shape.c` and
/// `p.w` are the shard's classes (`p.sigma_cloud` too), `p.labels` the global labels.
pub fn shard_forward_f64(cfg: &HeadConfig, p: &HeadProblemF64, shard: ClassShard) -> Result<ShardPartials> {
    check_shard_problem_f64(cfg, p, shard)?;
    Ok(evaluate(cfg, p, Some(shard)).partials)
}

/// One shard's gradients (SPEC 5c): dx's part from this shard's classes (the whole head's dx
/// is the sum over shards) and dW of its classes, given every row's combined `lse` `[B]` and
/// upstream weight `weight` `[B]` (w_i of SPEC 4: g / N_valid, g or g_i; read only for valid
/// rows).
pub fn shard_backward_f64(
    cfg: &HeadConfig,
    p: &HeadProblemF64,
    shard: ClassShard,
    lse: &[f64],
    weight: &[f64],
) -> Result<Gradients> {
    check_shard_problem_f64(cfg, p, shard)?;
    check_shard_rows(p.shape.b, lse, weight, p.labels)?;
    let ev = evaluate(cfg, p, Some(shard));
    Ok(gradients(cfg, &ev, |i| weight[i], lse, shard.total))
}

/// The whole head as one shard.
fn whole<F>(p: &HeadProblemOf<F>) -> ClassShard {
    ClassShard::whole(p.shape.c)
}

/// Checks a shard backward's per-row inputs: `[B]` each, finite on valid rows.
pub(crate) fn check_shard_rows(b: usize, lse: &[f64], weight: &[f64], labels: &[i32]) -> Result<()> {
    for (what, v) in [("lse", lse), ("row weights", weight)] {
        if v.len() != b {
            return Err(Error::Shape(format!("{what} has {} entries, expected B = {b}", v.len())));
        }
        if let Some(index) = (0..b).find(|&i| labels[i] >= 0 && !v[i].is_finite()) {
            return Err(Error::NonFinite { what: what.to_string(), index });
        }
    }
    Ok(())
}

/// dx in the attention form (SPEC section 4, "dx in the attention form"), the form a
/// fused kernel computes in its forward: with O_i = sum_{j != y_i} p_ij wh_j (an
/// attention output with K = V = W-hat, the target column left out) and S = sum_j wh_j,
///
/// dxh_i = w s [O_i - (ls/C) (S - wh_y) + (expm1(z_iy - lse_i) + ls - ls/C) dt_i wh_y],
///
/// then the normalization backward. Equal to [`backward_f64`]'s dx up to rounding; the
/// target term goes through expm1 so that p_iy -> 1 late in training loses nothing.
pub fn dx_attention_form_f64(cfg: &HeadConfig, p: &HeadProblemF64, g: Upstream) -> Result<Vec<f64>> {
    check_problem_f64(cfg, p)?;
    check_upstream(cfg, p.shape, g)?;
    let ev = evaluate(cfg, p, None);
    let HeadShape { b, c, d } = ev.shape;
    let s = cfg.s as f64;
    let ls = cfg.label_smoothing as f64;
    let ls_c = ls / c as f64;
    // Row i's W-hat row for class j: its arg-max sub-center (SPEC 5b; K = 1: row j).
    let wh_of = |i: usize, j: usize| {
        let r = j * ev.k + ev.kstar[i * c + j];
        &ev.wh[r * d..(r + 1) * d]
    };
    let mut dx = vec![0.0; b * d];
    for i in 0..b {
        let Ok(y) = usize::try_from(ev.labels[i]) else {
            continue; // ignored rows: dx = 0
        };
        // S = sum_j wh_j, with sub-centers the ones row i picked.
        let mut sum_wh = vec![0.0; d];
        for j in 0..c {
            for (acc, v) in sum_wh.iter_mut().zip(wh_of(i, j)) {
                *acc += v;
            }
        }
        let wi = row_weight(cfg, g, ev.n_valid, i);
        let lse = ev.rows.lse[i];
        let mut o = vec![0.0; d];
        for j in (0..c).filter(|&j| j != y) {
            let pij = (ev.z[i * c + j] - lse).exp();
            for (acc, v) in o.iter_mut().zip(wh_of(i, j)) {
                *acc += pij * v;
            }
        }
        let target = ((ev.z[i * c + y] - lse).exp_m1() + ls - ls_c) * ev.dt[i];
        let why = wh_of(i, y);
        let gh: Vec<f64> =
            (0..d).map(|k| wi * s * (o[k] - ls_c * (sum_wh[k] - why[k]) + target * why[k])).collect();
        project_out(&ev.xh[i * d..(i + 1) * d], &gh, ev.nx[i], &mut dx[i * d..(i + 1) * d]);
    }
    Ok(dx)
}

/// The upstream weight w of row i (SPEC section 4): g / N_valid (mean), g (sum), g_i (none).
fn row_weight(cfg: &HeadConfig, g: Upstream, n_valid: usize, i: usize) -> f64 {
    match (cfg.reduction, g) {
        (Reduction::Mean, Upstream::Scalar(g)) => g / n_valid as f64,
        (_, Upstream::Scalar(g)) => g,
        (_, Upstream::PerRow(gs)) => gs[i],
    }
}

/// Every precondition of an f32 head call (SPEC section 2): the options, the shapes, the
/// labels, sigma_cloud, finite x and W. The CPU backend checks its calls with it too.
pub(crate) fn check_problem(cfg: &HeadConfig, p: &HeadProblem) -> Result<()> {
    check_shard_problem(cfg, p, whole(p))
}

/// [`check_problem`] for one shard of a class-parallel head (SPEC 5c): the labels are global.
pub(crate) fn check_shard_problem(cfg: &HeadConfig, p: &HeadProblem, shard: ClassShard) -> Result<()> {
    shard.check(p.shape.c)?;
    validate(cfg, p.shape, p.x.len(), p.w.len(), p.labels, p.sigma_cloud, shard.total)?;
    check_finite_rows("x", p.x, p.shape.d, p.labels)?;
    check_finite("W", p.w)
}

fn check_problem_f64(cfg: &HeadConfig, p: &HeadProblemF64) -> Result<()> {
    check_shard_problem_f64(cfg, p, whole(p))
}

fn check_shard_problem_f64(cfg: &HeadConfig, p: &HeadProblemF64, shard: ClassShard) -> Result<()> {
    shard.check(p.shape.c)?;
    validate(cfg, p.shape, p.x.len(), p.w.len(), p.labels, p.sigma_cloud, shard.total)?;
    check_finite_rows("x", p.x, p.shape.d, p.labels)?;
    check_finite_f64("W", p.w)
}

fn validate(
    cfg: &HeadConfig,
    shape: HeadShape,
    x_len: usize,
    w_len: usize,
    labels: &[i32],
    sigma: &[f32],
    label_classes: usize,
) -> Result<()> {
    cfg.validate()?;
    // The cloud std is only read when the cloud is on, so it may be omitted then.
    let sigma_len = if cfg.cloud == CloudMode::Off && sigma.is_empty() { None } else { Some(sigma.len()) };
    check_head_inputs_of(shape, cfg.subcenters as usize, x_len, w_len, labels, sigma_len, label_classes)?;
    check_sigma(sigma)
}

fn check_finite_f64(what: &str, v: &[f64]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFinite { what: what.to_string(), index }),
        None => Ok(()),
    }
}

fn check_upstream(cfg: &HeadConfig, shape: HeadShape, g: Upstream) -> Result<()> {
    match (cfg.reduction, g) {
        (Reduction::None, Upstream::PerRow(gs)) => {
            if gs.len() != shape.b {
                return Err(Error::Shape(format!(
                    "per-row upstream gradient has {} entries, expected B = {}",
                    gs.len(),
                    shape.b
                )));
            }
            check_finite_f64("upstream gradient", gs)
        }
        (Reduction::None, Upstream::Scalar(_)) => Err(Error::InvalidConfig(
            "reduction none needs a per-row upstream gradient (Upstream::PerRow)".into(),
        )),
        (_, Upstream::PerRow(_)) => Err(Error::InvalidConfig(
            "reductions mean and sum take a scalar upstream gradient (Upstream::Scalar)".into(),
        )),
        (_, Upstream::Scalar(g)) => check_finite_f64("upstream gradient", &[g]),
    }
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// Unit rows of an `[n, d]` matrix and their norms: v / max(||v||, eps).
fn normalize_rows(v: &[f64], n: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut unit = vec![0.0; n * d];
    let mut norms = vec![0.0; n];
    for r in 0..n {
        let row = &v[r * d..(r + 1) * d];
        let norm = row.iter().map(|a| a * a).sum::<f64>().sqrt();
        let denom = norm.max(NORM_EPS);
        for k in 0..d {
            unit[r * d + k] = row[k] / denom;
        }
        norms[r] = norm;
    }
    (unit, norms)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| p * q).sum()
}

/// Everything the forward computes, kept for the backward.
struct Evaluation {
    shape: HeadShape,
    /// Sub-centers per class K (SPEC 5b).
    k: usize,
    labels: Vec<i32>,
    /// xh `[B, D]`, ||x_i|| `[B]`.
    xh: Vec<f64>,
    nx: Vec<f64>,
    /// wh `[C*K, D]`, ||W_jk|| `[C*K]` (class j's sub-center k is row j*K + k).
    wh: Vec<f64>,
    nw: Vec<f64>,
    /// Logits z `[B, C]` (target column already margin-transformed).
    z: Vec<f64>,
    /// k*_ij `[B, C]`: the sub-center each row's class cosine comes from (0 for ignored rows).
    kstar: Vec<usize>,
    /// dt_i / dc_iy as the backward uses it (SPEC section 4), 0 for ignored rows.
    dt: Vec<f64>,
    /// Each row's target column in this shard (None: ignored, or held by another shard).
    target: Vec<Option<usize>>,
    /// The shard's partials (SPEC 5c); with the whole head only the target fields are read.
    partials: ShardPartials,
    rows: RowOutputs,
    n_valid: usize,
}

/// The target logit of one valid row (SPEC sections 3 and 4), from [`target_logit`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TargetLogit {
    /// Margin-transformed target cosine t_i (z_iy = s * t_i).
    pub t: f64,
    /// The branch taken.
    pub region: Region,
    /// dt_i / dc_iy as the backward uses it (1 with `MarginGrad::StraightThrough`).
    pub dt: f64,
}

/// Target logit t_i, its region and dt_i / dc_iy for one valid row with target cosine
/// `c_iy` and cloud perturbation `alpha` (SPEC sections 3 and 4), all in f64.
///
/// The one definition of the margin formula on the host: the CPU backend calls it too,
/// so a new margin option is added here (and in `kernels/head.cuh` for the GPU).
pub fn target_logit(cfg: &HeadConfig, c_iy: f64, alpha: f64) -> TargetLogit {
    let (m1, m2, m3) = (cfg.m1 as f64, cfg.m2 as f64, cfg.m3 as f64);
    let cc = c_iy.clamp(-1.0 + ACOS_CLAMP, 1.0 - ACOS_CLAMP);
    let theta = cc.acos();
    let delta = m2 + alpha;
    let phi = m1 * theta + delta;
    let region = if phi > PI {
        Region::Fallback
    } else if phi < 0.0 {
        Region::Saturated
    } else {
        Region::Regular
    };
    // d cos(m1 acos(c) + delta) / dc = m1 sin(phi) / sqrt(1 - c^2), with c the clamped cosine.
    let regular_dt = m1 * phi.sin() / (1.0 - cc * cc).sqrt();
    // `region` is one of the three phi branches here; Ignored only completes the match.
    let (t, exact_dt) = match (cfg.fallback, region) {
        (_, Region::Regular) => (phi.cos() - m3, regular_dt),
        (Fallback::Linear, Region::Fallback) => (c_iy - m3 - delta * delta.sin(), 1.0),
        (Fallback::Linear, Region::Saturated | Region::Ignored) => (1.0 - m3, 0.0),
        (Fallback::Clamp, _) => (phi.clamp(0.0, PI).cos() - m3, 0.0),
        (Fallback::None, _) => (phi.cos() - m3, regular_dt),
    };
    let dt = match cfg.margin_grad {
        MarginGrad::Exact => exact_dt,
        MarginGrad::StraightThrough => 1.0,
    };
    TargetLogit { t, region, dt }
}

/// The cloud perturbation alpha_i of row `row` with label `y` (SPEC sections 3 and 6):
/// 0 with the cloud off (`sigma_cloud` unread), else sigma_y eps_i or sigma_y |eps_i|
/// with eps_i drawn from Philox (seed, step, row).
pub fn cloud_alpha(cfg: &HeadConfig, sigma_cloud: &[f32], y: usize, seed: u64, step: u64, row: usize) -> f64 {
    match cfg.cloud {
        CloudMode::Off => 0.0,
        CloudMode::Symmetric => sigma_cloud[y] as f64 * cloud_normal(seed, step, row as u64),
        CloudMode::OneSided => sigma_cloud[y] as f64 * cloud_normal(seed, step, row as u64).abs(),
    }
}

/// (loss_i, lse_i) of one valid row from its logits `z(j)`, j < C, with label `y` and
/// label smoothing `ls` (SPEC section 3); every sum in index order, in f64.
pub fn row_loss(z: impl Fn(usize) -> f64, c: usize, y: usize, ls: f64) -> (f64, f64) {
    let zmax = (0..c).map(&z).fold(f64::NEG_INFINITY, f64::max);
    let lse = zmax + (0..c).map(|j| (z(j) - zmax).exp()).sum::<f64>().ln();
    let loss = if ls == 0.0 {
        lse - z(y)
    } else {
        lse - (1.0 - ls) * z(y) - (ls / c as f64) * (0..c).map(&z).sum::<f64>()
    };
    (loss, lse)
}

/// The forward of the whole head (`shard` None), or of one shard (SPEC 5c): then the rows'
/// partials instead of the loss.
fn evaluate(cfg: &HeadConfig, p: &HeadProblemF64, shard: Option<ClassShard>) -> Evaluation {
    let HeadShape { b, c, d } = p.shape;
    let k = cfg.subcenters as usize;
    let s = cfg.s as f64;
    let ls = cfg.label_smoothing as f64;
    let (mut xh, mut nx) = normalize_rows(p.x, b, d);
    // W is [C, K, D]: class j's sub-centers are rows j*K .. j*K + K - 1 (SPEC 5b).
    let (wh, nw) = normalize_rows(p.w, c * k, d);
    // Ignored rows may hold anything, NaN included (SPEC 2): they enter as zero rows of unit
    // norm, so that their zero logit gradients give exact zeros in every sum (0 * NaN = NaN).
    for (i, _) in p.labels.iter().enumerate().filter(|(_, &y)| y < 0) {
        xh[i * d..(i + 1) * d].fill(0.0);
        nx[i] = 1.0;
    }

    let mut z = vec![0.0; b * c];
    let mut kstar = vec![0usize; b * c];
    let mut dt = vec![0.0; b];
    let mut target = vec![None; b];
    let mut partials = ShardPartials::zeros(b);
    let is_whole = shard.is_none();
    let shard = shard.unwrap_or(ClassShard::whole(c));
    let mut rows = RowOutputs {
        loss: vec![0.0; b],
        lse: vec![0.0; b],
        c_iy: vec![0.0; b],
        t: vec![0.0; b],
        alpha: vec![0.0; b],
        region: vec![Region::Ignored; b],
        k_iy: vec![0; b],
    };
    let mut n_valid = 0;
    for i in 0..b {
        let Ok(y_global) = usize::try_from(p.labels[i]) else {
            continue; // ignored row: everything stays 0
        };
        n_valid += 1;
        let xi = &xh[i * d..(i + 1) * d];
        // c_ij: the closest sub-center's cosine, the lowest k among ties (K = 1: row j).
        let cos: Vec<f64> = (0..c)
            .map(|j| {
                let mut best = (f64::NEG_INFINITY, 0);
                for kk in 0..k {
                    let r = j * k + kk;
                    let cjk = dot(xi, &wh[r * d..(r + 1) * d]).clamp(-1.0, 1.0);
                    if cjk > best.0 {
                        best = (cjk, kk);
                    }
                }
                kstar[i * c + j] = best.1;
                best.0
            })
            .collect();
        for j in 0..c {
            z[i * c + j] = s * cos[j];
        }
        // The target column, where this shard holds the label (always for the whole head).
        let Some(y) = shard.local(y_global, c) else {
            let zi = &z[i * c..(i + 1) * c];
            (partials.max[i], partials.sum_exp[i], partials.sum_z[i]) = shard_sums(|j| zi[j], c);
            continue;
        };
        target[i] = Some(y);
        let c_iy = cos[y];

        let alpha = cloud_alpha(cfg, p.sigma_cloud, y, p.seed, p.step, i);
        let TargetLogit { t, region, dt: dti } = target_logit(cfg, c_iy, alpha);
        z[i * c + y] = s * t;
        let zi = &z[i * c..(i + 1) * c];
        if is_whole {
            (rows.loss[i], rows.lse[i]) = row_loss(|j| zi[j], c, y, ls);
        } else {
            (partials.max[i], partials.sum_exp[i], partials.sum_z[i]) = shard_sums(|j| zi[j], c);
        }
        (partials.z_y[i], partials.c_iy[i], partials.t[i], partials.alpha[i]) = (s * t, c_iy, t, alpha);
        partials.k_iy[i] = kstar[i * c + y] as u32;

        rows.c_iy[i] = c_iy;
        rows.k_iy[i] = kstar[i * c + y] as u32;
        rows.t[i] = t;
        rows.alpha[i] = alpha;
        rows.region[i] = region;
        dt[i] = dti;
    }
    Evaluation {
        shape: p.shape,
        k,
        labels: p.labels.to_vec(),
        xh,
        nx,
        wh,
        nw,
        z,
        kstar,
        dt,
        target,
        partials,
        rows,
        n_valid,
    }
}

/// (max_j z(j), sum_j exp(z(j) - max), sum_j z(j)) over one row's `c` logits of a shard
/// (SPEC 5c), in f64 and index order; the CPU backend calls it too, as it does [`row_loss`].
pub fn shard_sums(z: impl Fn(usize) -> f64, c: usize) -> (f64, f64, f64) {
    let m = (0..c).map(&z).fold(f64::NEG_INFINITY, f64::max);
    (m, (0..c).map(|j| (z(j) - m).exp()).sum(), (0..c).map(&z).sum())
}

fn reduce(cfg: &HeadConfig, ev: &Evaluation) -> ForwardOutput {
    let total: f64 = ev.rows.loss.iter().sum();
    let loss = match cfg.reduction {
        Reduction::Mean if ev.n_valid == 0 => 0.0,
        Reduction::Mean => total / ev.n_valid as f64,
        Reduction::Sum | Reduction::None => total,
    };
    ForwardOutput { loss, rows: ev.rows.clone(), n_valid: ev.n_valid }
}

/// The whole head's gradients for upstream `g`.
fn whole_gradients(cfg: &HeadConfig, ev: &Evaluation, g: Upstream) -> Gradients {
    gradients(cfg, ev, |i| row_weight(cfg, g, ev.n_valid, i), &ev.rows.lse, ev.shape.c)
}

/// The gradients of the evaluated shard (the whole head, or SPEC 5c's shard) with row
/// weights `weight(i)`, log-sum-exps `lse` `[B]` and `total` classes in the whole head.
fn gradients(
    cfg: &HeadConfig,
    ev: &Evaluation,
    weight: impl Fn(usize) -> f64,
    lse: &[f64],
    total: usize,
) -> Gradients {
    let HeadShape { b, c, d } = ev.shape;
    let s = cfg.s as f64;
    let ls = cfg.label_smoothing as f64;

    // dc [B, C] (SPEC section 4); ignored rows stay 0.
    let mut dc = vec![0.0; b * c];
    for i in (0..b).filter(|&i| ev.labels[i] >= 0) {
        let y = ev.target[i];
        let wi = weight(i);
        let lse = lse[i];
        for j in 0..c {
            let p = (ev.z[i * c + j] - lse).exp();
            let q = if Some(j) == y { 1.0 - ls + ls / total as f64 } else { ls / total as f64 };
            let mut dcij = wi * s * (p - q);
            if Some(j) == y {
                dcij *= ev.dt[i];
            }
            dc[i * c + j] = dcij;
        }
    }

    // dx from dc's rows against the arg-max sub-centers' W-hat rows, dW (one row per
    // sub-center) from dc's columns against x-hat, each sub-center taking only the rows
    // that picked it (SPEC 5b; with K = 1 every row picks row j).
    let k = ev.k;
    let dx = input_grad(b, c, d, |i, j| (dc[i * c + j], j * k + ev.kstar[i * c + j]), &ev.wh, &ev.xh, &ev.nx);
    let dw = input_grad(
        c * k,
        b,
        d,
        |r, i| {
            let (j, kk) = (r / k, r % k);
            (if ev.kstar[i * c + j] == kk { dc[i * c + j] } else { 0.0 }, i)
        },
        &ev.xh,
        &ev.wh,
        &ev.nw,
    );
    Gradients { dx, dw }
}

/// The gradient of one input's `n` rows: row r of its unit rows `unit` `[n, D]` gets
/// sum_k g_rk other_{o_rk} for k in 0..m in index order, where `g(r, k)` = (g_rk, o_rk)
/// names the row of `other` `[.., D]` the term takes, then the normalization backward
/// with its norm.
fn input_grad(
    n: usize,
    m: usize,
    d: usize,
    g: impl Fn(usize, usize) -> (f64, usize),
    other: &[f64],
    unit: &[f64],
    norms: &[f64],
) -> Vec<f64> {
    let mut out = vec![0.0; n * d];
    for r in 0..n {
        let mut gh = vec![0.0; d];
        for k in 0..m {
            let (grk, o) = g(r, k);
            for (acc, v) in gh.iter_mut().zip(&other[o * d..(o + 1) * d]) {
                *acc += grk * v;
            }
        }
        project_out(&unit[r * d..(r + 1) * d], &gh, norms[r], &mut out[r * d..(r + 1) * d]);
    }
    out
}

/// Backward of v -> v / max(||v||, eps): out = (g - u (u . g)) / max(||v||, eps), u = unit vector.
fn project_out(u: &[f64], g: &[f64], norm: f64, out: &mut [f64]) {
    let ug = dot(u, g);
    let denom = norm.max(NORM_EPS);
    for k in 0..u.len() {
        out[k] = (g[k] - u[k] * ug) / denom;
    }
}
