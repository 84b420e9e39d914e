//! The CUDA head checked against the CPU oracle (SPEC section 8): problem
//! generation, error measures and `featcloud smoke`'s [`smoke`].
//!
//! Problems are adversarial on purpose: most rows sit near their class weight
//! (peaked logits, not flat ones), one row points away from it (the linear
//! fallback), one lies within ~0.05 rad of it (saturated when m2 < 0), labels 0 and C-1
//! occur, and every fifth row can be ignored. Inputs are rounded to the device
//! dtype before the oracle sees them.

use super::{FusedKernels, FusedTuning, GradDtype, GradTensor, HeadOn, HeadPath, HeadUpstream};
use crate::config::{CloudMode, Fallback, HeadConfig, MarginGrad, Reduction};
use crate::cuda::{Device, DeviceElem, SmokeLine, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::oracle::head::{self as oracle, ForwardOutput, Gradients, HeadProblem, Upstream};
use crate::shape::HeadShape;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One head call's host inputs (already rounded to the device dtype).
#[derive(Clone, Debug)]
pub struct Problem {
    /// B, C, D.
    pub shape: HeadShape,
    /// Storage dtype the values were rounded to.
    pub dtype: DType,
    /// x [B, D].
    pub x: Vec<f32>,
    /// W [C*K, D] (K = the configuration's `subcenters`; class j's sub-center k is row j*K + k).
    pub w: Vec<f32>,
    /// y `[B]`.
    pub labels: Vec<i32>,
    /// sigma_cloud `[C]`.
    pub sigma: Vec<f32>,
    /// Per-row upstream gradient `[B]` (used with `Reduction::None`).
    pub row_g: Vec<f32>,
    /// Philox seed.
    pub seed: u64,
    /// Philox step.
    pub step: u64,
}

/// Builds a problem at `shape` (see the module docs); `ignore` marks every fifth row ignored.
pub fn make_problem(shape: HeadShape, dtype: DType, ignore: bool, seed: u64) -> Problem {
    let HeadShape { b, c, d } = shape;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w: Vec<f32> = (0..c * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut labels: Vec<i32> = (0..b).map(|_| rng.random_range(0..c as i32)).collect();
    if b > 2 {
        labels[2] = 0;
    }
    if b > 3 {
        labels[3] = c as i32 - 1;
    }
    let mut x = vec![0.0f32; b * d];
    for i in 0..b {
        let y = labels[i] as usize;
        let wy = &w[y * d..(y + 1) * d];
        let xi = &mut x[i * d..(i + 1) * d];
        match i {
            // Opposite the class weight: theta ~ pi, the linear-fallback region.
            0 if b > 1 => xi.iter_mut().zip(wy).for_each(|(a, &v)| *a = -v),
            // Close to the class weight: theta ~ 0.05 (saturated when m2 < 0).
            1 => {
                for (k, v) in xi.iter_mut().enumerate() {
                    *v = wy[k] + 0.05 * rng.random_range(-1.0f32..1.0);
                }
            }
            _ => {
                let a: f32 = rng.random_range(0.0..1.5);
                for (k, v) in xi.iter_mut().enumerate() {
                    *v = a * wy[k] + rng.random_range(-1.0f32..1.0);
                }
            }
        }
    }
    if ignore {
        for i in (4..b).step_by(5) {
            labels[i] = -1;
        }
    }
    let sigma: Vec<f32> =
        (0..c).map(|j| if j % 3 == 0 { 0.0 } else { rng.random_range(0.0f32..0.3) }).collect();
    let row_g: Vec<f32> = (0..b).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Problem {
        shape,
        dtype,
        x: x.into_iter().map(|v| dtype.round(v)).collect(),
        w: w.into_iter().map(|v| dtype.round(v)).collect(),
        labels,
        sigma,
        row_g,
        seed: seed ^ 0x5eed,
        step: 3,
    }
}

/// A problem with `k` sub-centers per class (SPEC 5b; W `[C*K, D]`): [`make_problem`] over
/// the C*K rows of W as if each were a class, then row i's label is its row's class (row / K),
/// so that each x row lies near one sub-center of its class, picked at random (not always k =
/// 0), and sigma_cloud keeps C entries. `k` = 1 is [`make_problem`].
pub fn make_problem_subcenters(shape: HeadShape, k: usize, dtype: DType, ignore: bool, seed: u64) -> Problem {
    let mut p = make_problem(HeadShape { c: shape.c * k, ..shape }, dtype, ignore, seed);
    p.shape = shape;
    for y in p.labels.iter_mut().filter(|y| **y >= 0) {
        *y /= k as i32;
    }
    p.sigma.truncate(shape.c);
    p
}

/// Tolerances of SPEC section 8 for a storage dtype: (loss and lse relative, gradient
/// max-abs relative to max |gradient|).
pub fn tolerances(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-4),
        DType::BF16 | DType::F16 => (2e-3, 1e-2),
    }
}

/// One row whose gradient nearly cancels (SPEC 8's f32 floor is about such rows): C class
/// weights spread evenly around a circle in the first two coordinates (angles 2 pi (j + jitter
/// u_j) / C, norms in [0.5, 2], the other D - 2 coordinates 0.01 N(0, 1)), x of norm
/// `x_norm` at a random angle on that circle, labelled with the class opposite it (the
/// fallback region for ArcFace). The softmax then spreads over the classes on both sides of
/// x, whose tangential parts cancel while their radial parts add up to about s: the case of
/// issue 13 (B = 1, D = 2, C = 1000, clamp fallback) and its neighbours. f32 storage.
pub fn cancellation_problem(c: usize, d: usize, jitter: f64, x_norm: f64, seed: u64) -> Problem {
    assert!(d >= 2 && c >= 1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tau = 2.0 * std::f64::consts::PI;
    let mut w = vec![0.0f32; c * d];
    for j in 0..c {
        let a = tau * (j as f64 + jitter * rng.random::<f64>()) / c as f64;
        let m = rng.random_range(0.5..2.0);
        w[j * d] = (m * a.cos()) as f32;
        w[j * d + 1] = (m * a.sin()) as f32;
        for k in 2..d {
            // Box-Muller, one normal per draw (rand's core has no normal distribution).
            let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
            w[j * d + k] = (0.01 * (-2.0 * u1.ln()).sqrt() * (tau * u2).cos()) as f32;
        }
    }
    let phi = tau * rng.random::<f64>();
    let mut x = vec![0.0f32; d];
    (x[0], x[1]) = ((x_norm * phi.cos()) as f32, (x_norm * phi.sin()) as f32);
    let y = ((phi / tau + 0.5) * c as f64).round() as usize % c;
    Problem {
        shape: HeadShape { b: 1, c, d },
        dtype: DType::F32,
        x,
        w,
        labels: vec![y as i32],
        sigma: vec![0.0; c],
        row_g: vec![1.0],
        seed,
        step: 0,
    }
}

/// SPEC 8's f32 rounding floor, as a fraction of the size of the terms a gradient row sums:
/// 2^-18 = 64 units of f32 rounding (2^-24). The measured worst is about 6 units (the
/// cancellation tests in `tests/head_cpu.rs` and `tests/head_emu.rs`).
pub const F32_FLOOR: f64 = 1.0 / 262_144.0;

/// Per-row absolute floors of SPEC 8's f32 gradient tolerance, `(dx [B], dW [C])`; all zero
/// for 16-bit storage. A gradient row is a sum of terms whose sizes add up to
///   dx_i: s w_i (sum_j (p_ij + q_ij) + |p_iy - 1 + ls - ls/C| |dt_i|) / max(||x_i||, eps),
///   dW_j: s sum_i w_i (p_ij + q_ij + [y_i = j] |p_iy - 1 + ls - ls/C| |dt_i|) / max(||W_j||, eps),
/// (w_i the row's upstream weight, q_ij the label-smoothed target), and the normalization
/// backward then removes the part along the row's own direction. Where the terms' radial parts
/// cancel there (p concentrated on classes near x_i, or dt_i large at a target row opposite
/// its class weight), what is left can be far smaller than the terms, while f32 rounding of the
/// terms (their cosines, the normalized rows, the running sum) leaves errors of order
/// 2^-24 times their size. No f32 summation order avoids that; the floor is F32_FLOOR times
/// the sizes above.
///
/// With K sub-centers per class (SPEC 5b) class j's terms are those of its dominant sub-center
/// (the lowest k of the largest cosine), and dW's floors are per row of W (`[C*K]`).
pub fn f32_floors(cfg: &HeadConfig, p: &Problem, fo: &ForwardOutput) -> (Vec<f64>, Vec<f64>) {
    let HeadShape { b, c, d } = p.shape;
    let kk = cfg.subcenters as usize;
    if p.dtype != DType::F32 {
        return (vec![0.0; b], vec![0.0; c * kk]);
    }
    let norm = |v: &[f32]| v.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt().max(oracle::NORM_EPS);
    let (s, ls) = (cfg.s as f64, cfg.label_smoothing as f64);
    let n_valid = p.labels.iter().filter(|&&y| y >= 0).count().max(1);
    let wh: Vec<Vec<f64>> = (0..c * kk)
        .map(|j| {
            let r = &p.w[j * d..(j + 1) * d];
            let n = norm(r);
            r.iter().map(|&a| a as f64 / n).collect()
        })
        .collect();
    let (mut fx, mut mass) = (vec![0.0; b], vec![0.0; c * kk]);
    for (i, f) in fx.iter_mut().enumerate() {
        let Ok(y) = usize::try_from(p.labels[i]) else { continue };
        let wi = match cfg.reduction {
            Reduction::Mean => 1.0 / n_valid as f64,
            Reduction::Sum => 1.0,
            Reduction::None => (p.row_g[i] as f64).abs(),
        };
        let xr = &p.x[i * d..(i + 1) * d];
        let nx = norm(xr);
        let dt = oracle::target_logit(cfg, fo.rows.c_iy[i], fo.rows.alpha[i]).dt.abs();
        let py = (s * fo.rows.t[i] - fo.rows.lse[i]).exp();
        let target = (py - 1.0 + ls - ls / c as f64).abs() * dt;
        let mut sum = 0.0;
        for (j, subs) in wh.chunks(kk).enumerate() {
            // The class's dominant sub-center (SPEC 5b; K = 1: its one row).
            let (mut cos, mut kj) = (f64::NEG_INFINITY, 0);
            for (k, whk) in subs.iter().enumerate() {
                let ck: f64 = xr.iter().zip(whk).map(|(&a, w)| a as f64 * w).sum::<f64>() / nx;
                if ck > cos {
                    (cos, kj) = (ck, k);
                }
            }
            if j == y {
                kj = fo.rows.k_iy[i] as usize;
            }
            let pq = if j == y {
                target
            } else {
                (s * cos.clamp(-1.0, 1.0) - fo.rows.lse[i]).exp() + ls / c as f64
            };
            sum += pq;
            mass[j * kk + kj] += wi * pq;
        }
        *f = F32_FLOOR * s * wi * sum / nx;
    }
    let fw = (0..c * kk).map(|j| F32_FLOOR * s * mass[j] / norm(&p.w[j * d..(j + 1) * d])).collect();
    (fx, fw)
}

/// Host copies of one CUDA head call's outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceResult {
    /// Reduced loss.
    pub loss: f32,
    /// loss_i, lse_i, c_iy, t_i, alpha_i `[B]`.
    pub rows: [Vec<f32>; 5],
    /// k*_iy `[B]`, the target's dominant sub-center (SPEC 5b; zeros from the fused path).
    pub k_iy: Vec<u32>,
    /// dx [B, D] as f32.
    pub dx: Vec<f32>,
    /// dW [C*K, D] as f32.
    pub dw: Vec<f32>,
}

/// Runs forward+backward of `path` on `p` and copies everything back.
pub fn run_device(
    dev: &Device,
    path: HeadPath,
    cfg: &HeadConfig,
    p: &Problem,
    grad: GradDtype,
) -> Result<DeviceResult> {
    run_device_with(dev, path, cfg, p, grad, RunOptions::default())
}

/// How [`run_device_with`] departs from a plain [`run_device`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// The fused dispatcher's choices overridden.
    pub tuning: FusedTuning,
    /// Every input buffer followed by `pad` NaNs that a correct kernel never reads (a
    /// stray read turns the outputs non-finite).
    pub pad: usize,
}

/// As [`run_device`] with the tuning and the NaN padding of `opts`.
pub fn run_device_with(
    dev: &Device,
    path: HeadPath,
    cfg: &HeadConfig,
    p: &Problem,
    grad: GradDtype,
    opts: RunOptions,
) -> Result<DeviceResult> {
    let head = HeadOn::new(dev, *cfg, path)?.with_tuning(opts.tuning);
    match p.dtype {
        DType::F32 => run_typed::<f32>(&head, p, grad, opts.pad),
        DType::BF16 => run_typed::<half::bf16>(&head, p, grad, opts.pad),
        DType::F16 => run_typed::<half::f16>(&head, p, grad, opts.pad),
    }
}

fn padded<T: DeviceElem>(dev: &Device, v: &[f32], shape: &[usize], pad: usize) -> Result<Tensor<T>> {
    let mut host: Vec<T> = v.iter().map(|&a| T::from_f32(a)).collect();
    host.resize(host.len() + pad, T::from_f32(f32::NAN));
    Tensor::from_host(dev, &host, &[host.len()])?.reshaped(shape)
}

fn run_typed<T: DeviceElem>(
    head: &HeadOn<&Device>,
    p: &Problem,
    grad: GradDtype,
    pad: usize,
) -> Result<DeviceResult> {
    let HeadShape { b, c, d } = p.shape;
    let dev = head.device();
    let x = padded::<T>(dev, &p.x, &[b, d], pad)?;
    // W [C*K, D] with K sub-centers per class (SPEC 5b).
    let w = padded::<T>(dev, &p.w, &[c * head.config().subcenters as usize, d], pad)?;
    let sigma = padded::<f32>(dev, &p.sigma, &[c], pad)?;
    let row_g = padded::<f32>(dev, &p.row_g, &[b], pad)?;
    let up = match head.config().reduction {
        Reduction::None => HeadUpstream::PerRow(&row_g),
        _ => HeadUpstream::Scalar(1.0),
    };
    let (fwd, grads) = head.forward_backward(&x, &w, &p.labels, &sigma, p.seed, p.step, up, grad)?;
    let host = |t: &Tensor<f32>| t.to_host(dev);
    let dx = grads.dx.to_f32_host(dev)?;
    let dw = grads.dw.to_f32_host(dev)?;
    if grad == GradDtype::F32 {
        debug_assert!(matches!(grads.dx, GradTensor::F32(_)));
    }
    Ok(DeviceResult {
        loss: fwd.loss,
        rows: [host(&fwd.row_loss)?, host(&fwd.lse)?, host(&fwd.c_iy)?, host(&fwd.t)?, host(&fwd.alpha)?],
        k_iy: fwd.k_iy_to_host(dev)?,
        dx,
        dw,
    })
}

/// Errors of a device result against the oracle, each normalised as SPEC 8 does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Comparison {
    /// |loss - loss_o| / max(|loss_o|, 1e-3).
    pub loss_rel: f64,
    /// max_i |lse_i - lse_o,i| / max(|lse_o,i|, 1), also over the row losses.
    pub lse_rel: f64,
    /// max abs error of c_iy, t_i and alpha_i.
    pub row_abs: f64,
    /// max |dx - dx_o| / (max |dx_o| + floor / tolerance), the floor of the element's row
    /// ([`f32_floors`]; 0 for 16-bit storage): <= the tolerance exactly when every error is
    /// within tolerance * max |dx_o| + its row's floor.
    pub dx_rel: f64,
    /// The same for dW.
    pub dw_rel: f64,
    /// Every device output is finite.
    pub finite: bool,
    /// k*_iy equals the oracle's on every row (SPEC 5b; both 0 with K = 1).
    pub k_iy_equal: bool,
}

impl Comparison {
    /// Worst forward error relative to its tolerance (<= 1 passes).
    pub fn forward_ratio(&self, dtype: DType) -> f64 {
        let (lt, _) = tolerances(dtype);
        (self.loss_rel / lt).max(self.lse_rel / lt).max(self.row_abs / lt.max(1e-4))
    }

    /// Worst gradient error relative to its tolerance (<= 1 passes).
    pub fn backward_ratio(&self, dtype: DType) -> f64 {
        let (_, gt) = tolerances(dtype);
        self.dx_rel.max(self.dw_rel) / gt
    }

    /// Both within tolerance and all outputs finite.
    pub fn passed(&self, dtype: DType) -> bool {
        self.finite
            && self.k_iy_equal
            && self.forward_ratio(dtype) <= 1.0
            && self.backward_ratio(dtype) <= 1.0
    }
}

fn max_abs(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(0.0, |m, a| if a.is_nan() { f64::INFINITY } else { m.max(a.abs()) })
}

/// See [`Comparison::dx_rel`]: rows of `d` elements, `floors` per row (already divided by the
/// gradient tolerance).
fn grad_rel(dev: &[f32], o: &[f64], d: usize, floors: &[f64]) -> f64 {
    let scale = max_abs(o.iter().copied());
    max_abs(dev.iter().zip(o).enumerate().map(|(k, (&a, &b))| {
        let den = scale + floors[k / d.max(1)];
        let err = a as f64 - b;
        if den == 0.0 {
            err
        } else {
            err / den
        }
    }))
}

impl Problem {
    /// The same call as the oracle (and the CPU backend) takes it.
    pub fn head_problem(&self) -> HeadProblem<'_> {
        HeadProblem {
            shape: self.shape,
            x: &self.x,
            w: &self.w,
            labels: &self.labels,
            sigma_cloud: &self.sigma,
            seed: self.seed,
            step: self.step,
        }
    }
}

/// The oracle's forward and backward of `p` with the upstream the device runs get:
/// `p.row_g` per row for `Reduction::None`, else 1.
pub fn oracle_outputs(cfg: &HeadConfig, p: &Problem) -> Result<(ForwardOutput, Gradients)> {
    let hp = p.head_problem();
    let row_g: Vec<f64> = p.row_g.iter().map(|&g| g as f64).collect();
    let up = match cfg.reduction {
        Reduction::None => Upstream::PerRow(&row_g),
        _ => Upstream::Scalar(1.0),
    };
    Ok((oracle::forward(cfg, &hp)?, oracle::backward(cfg, &hp, up)?))
}

/// Compares a device result with the oracle for `cfg` and `p`.
pub fn compare_with_oracle(cfg: &HeadConfig, p: &Problem, r: &DeviceResult) -> Result<Comparison> {
    let (fo, go) = oracle_outputs(cfg, p)?;
    let finite = r.loss.is_finite()
        && r.rows.iter().all(|v| v.iter().all(|a| a.is_finite()))
        && r.dx.iter().all(|a| a.is_finite())
        && r.dw.iter().all(|a| a.is_finite());
    let loss_rel = (r.loss as f64 - fo.loss).abs() / fo.loss.abs().max(1e-3);
    let gt = tolerances(p.dtype).1;
    let (fx, fw) = f32_floors(cfg, p, &fo);
    let (fx, fw): (Vec<f64>, Vec<f64>) =
        (fx.iter().map(|f| f / gt).collect(), fw.iter().map(|f| f / gt).collect());
    let o = &fo.rows;
    let lse_rel = max_abs((0..p.shape.b).flat_map(|i| {
        let den = o.lse[i].abs().max(1.0);
        [(r.rows[1][i] as f64 - o.lse[i]) / den, (r.rows[0][i] as f64 - o.loss[i]) / den]
    }));
    let row_abs = max_abs((0..p.shape.b).flat_map(|i| {
        [r.rows[2][i] as f64 - o.c_iy[i], r.rows[3][i] as f64 - o.t[i], r.rows[4][i] as f64 - o.alpha[i]]
    }));
    Ok(Comparison {
        loss_rel: if loss_rel.is_nan() { f64::INFINITY } else { loss_rel },
        lse_rel,
        row_abs,
        dx_rel: grad_rel(&r.dx, &go.dx, p.shape.d, &fx),
        dw_rel: grad_rel(&r.dw, &go.dw, p.shape.d, &fw),
        finite,
        k_iy_equal: r.k_iy == o.k_iy,
    })
}

/// Largest relative difference between two device results (fused vs reference at
/// sizes the CPU oracle cannot reach): (forward, gradients) normalised as [`Comparison`].
pub fn compare_results(a: &DeviceResult, b: &DeviceResult) -> (f64, f64) {
    let fl = (a.loss as f64 - b.loss as f64).abs() / (b.loss as f64).abs().max(1e-3);
    let lse = max_abs(
        a.rows[1].iter().zip(&b.rows[1]).map(|(&u, &v)| (u as f64 - v as f64) / (v as f64).abs().max(1.0)),
    );
    let rel = |x: &[f32], y: &[f32]| {
        let yy: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        grad_rel(x, &yy, 1, &vec![0.0; yy.len()])
    };
    (fl.max(lse), rel(&a.dx, &b.dx).max(rel(&a.dw, &b.dw)))
}

/// Named option sets the checks sweep.
pub fn option_sets() -> Vec<(&'static str, HeadConfig)> {
    vec![
        ("arcface symmetric mean", HeadConfig::arcface()),
        (
            "cosface one_sided sum ls=0.1",
            HeadConfig {
                cloud: CloudMode::OneSided,
                reduction: Reduction::Sum,
                label_smoothing: 0.1,
                ..HeadConfig::cosface()
            },
        ),
        (
            "combined off none clamp straight_through",
            HeadConfig {
                cloud: CloudMode::Off,
                reduction: Reduction::None,
                fallback: Fallback::Clamp,
                margin_grad: MarginGrad::StraightThrough,
                ..HeadConfig::combined()
            },
        ),
        (
            "saturated m2=-0.3 s=30",
            HeadConfig { m2: -0.3, s: 30.0, cloud: CloudMode::Off, ..HeadConfig::arcface() },
        ),
    ]
}

/// Every head path (the fused one with each kernel set) x dtype x option set at small sizes
/// (plus a D that routes to the scalar fallback kernels) against the CPU oracle: one line
/// for the forward and one for the gradients of each.
pub fn smoke(dev: &Device) -> Result<Vec<SmokeLine>> {
    let mut lines = Vec::new();
    let shapes = [HeadShape { b: 37, c: 300, d: 64 }, HeadShape { b: 5, c: 129, d: 13 }];
    // The reference path and each kernel set of the fused path (both apply at D <= 512).
    let kernel_sets = [
        ("reference", HeadPath::Reference, None),
        ("fused_tiles", HeadPath::Fused, Some(FusedKernels::Tiles)),
        ("fused_attention", HeadPath::Fused, Some(FusedKernels::Attention)),
    ];
    for (label, path, kernels) in kernel_sets {
        let opts = RunOptions { tuning: FusedTuning { kernels, ..FusedTuning::default() }, pad: 0 };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (name, cfg) in option_sets() {
                for (k, &shape) in shapes.iter().enumerate() {
                    if k == 1 && name != "arcface symmetric mean" {
                        continue;
                    }
                    let p = make_problem(shape, dtype, true, 17 + k as u64);
                    let r = run_device_with(dev, path, &cfg, &p, GradDtype::Input, opts)?;
                    let what = format!("{name}; B={} C={} D={}", shape.b, shape.c, shape.d);
                    lines.extend(smoke_pair(label, &cfg, &p, &r, what)?);
                }
            }
        }
    }
    // Sub-centers (SPEC 5b), on the reference path and on the fused attention form (where
    // this device runs it: D = 64 needs the D <= 128 kernels' shared memory).
    let shape = HeadShape { b: 37, c: 100, d: 64 };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let cfg = HeadConfig { subcenters: 3, ..HeadConfig::arcface() };
        let p = make_problem_subcenters(shape, 3, dtype, true, 23);
        let what = format!("arcface symmetric mean subcenters=3; B={} C={} D={}", shape.b, shape.c, shape.d);
        let r = run_device(dev, HeadPath::Reference, &cfg, &p, GradDtype::Input)?;
        lines.extend(smoke_pair("reference", &cfg, &p, &r, what.clone())?);
        if super::fused_takes_subcenters(dtype, shape.d, 3, dev.info().max_smem_per_block) {
            let r = run_device(dev, HeadPath::Fused, &cfg, &p, GradDtype::Input)?;
            lines.extend(smoke_pair("fused_attention", &cfg, &p, &r, what)?);
        }
    }
    Ok(lines)
}

/// The forward and gradient lines of one device result against the oracle.
fn smoke_pair(
    label: &str,
    cfg: &HeadConfig,
    p: &Problem,
    r: &DeviceResult,
    what: String,
) -> Result<[SmokeLine; 2]> {
    let dtype = p.dtype;
    let cmp = compare_with_oracle(cfg, p, r)?;
    let (lt, gt) = tolerances(dtype);
    let fr = cmp.forward_ratio(dtype) * lt;
    let br = cmp.backward_ratio(dtype) * gt;
    Ok([
        SmokeLine {
            kernel: format!("head_{label} fwd"),
            dtype: dtype.name().into(),
            options: what.clone(),
            max_err: fr,
            tolerance: lt,
            passed: cmp.finite && cmp.k_iy_equal && fr <= lt,
        },
        SmokeLine {
            kernel: format!("head_{label} bwd"),
            dtype: dtype.name().into(),
            options: what,
            max_err: br,
            tolerance: gt,
            passed: cmp.finite && br <= gt,
        },
    ])
}
