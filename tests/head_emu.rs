//! The margin head (`CudaHead`, reference and fused paths) against the f64 oracle: the
//! fused shape and dispatcher sweep, the reference path, determinism in every block and
//! thread order, zero and tiny rows, and the narrowing conversions of the 16-bit gradients.
//!
//! On the CPU-emulated device (cargo feature `emu`); what that shows and cannot show:
//! `tests/common/mod.rs`. Without the `emu` feature every test prints why and returns.

#[macro_use]
mod common;

use common::*;
use featcloud::config::{CloudMode, Fallback, HeadConfig, Reduction};
use featcloud::cuda::head::verify::{oracle_outputs, tolerances, Problem};
use featcloud::cuda::head::{
    attn_row_split_tiles, attn_supported, backward_cols_for, backward_grid_for, forward_tile_for,
    fused_vectorized, FusedKernels, FusedTuning, GradDtype, HeadOn, HeadPath, HeadUpstream,
};
use featcloud::cuda::{Device, DeviceElem, EmuOrder, Tensor};
use featcloud::dtype::DType;
use featcloud::oracle::head::{self as oracle, ForwardOutput, Gradients, Region};
use featcloud::shape::HeadShape;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---- margin head ----------------------------------------------------------------------------

/// One head call's inputs, already rounded to the storage dtype (the same type the CUDA
/// head's own checks use, so the oracle is reached the same way).
type Prob = Problem;

/// Random x, W; row 0 aligned with its target (theta ~ 0), row 1 opposite it
/// (theta ~ pi: phi > pi), every third row from 2 ignored, labels 0 and C-1 present,
/// a few more rows near their target (with sigma = 1 the cloud pushes some to phi < 0).
fn case(rng: &mut ChaCha8Rng, sh: HeadShape, dtype: DType, sigma: f32) -> Prob {
    let HeadShape { b, c, d } = sh;
    let mut w = randn(rng, c * d, 1.0);
    let mut x = randn(rng, b * d, 1.0);
    if d == 1 {
        // |v| in [0.5, 1]: with D = 1 every exact gradient is 0 and the rounding residue
        // scales with 1/|v|; tiny norms are the zero-row test's business.
        for v in x.iter_mut().chain(w.iter_mut()) {
            *v = v.signum() * (0.5 + 0.5 * v.abs());
        }
    }
    let labels: Vec<i32> = (0..b)
        .map(|i| match i {
            0 => (c - 1) as i32,
            1 => 0,
            _ if i % 3 == 2 => -1,
            _ => rng.random_range(0..c as i32),
        })
        .collect();
    for i in 0..b {
        let y = labels[i];
        if y < 0 {
            continue;
        }
        let y = y as usize;
        let f = match i {
            1 => -1.5,
            _ if i == 0 || i % 4 == 0 => 2.0,
            _ => continue,
        };
        for k in 0..d {
            x[i * d + k] = f * w[y * d + k] + if i == 0 { 0.0 } else { 0.01 * x[i * d + k] };
        }
    }
    let row_g = randn(rng, b, 1.0);
    Prob {
        shape: sh,
        dtype,
        x: x.into_iter().map(|v| dtype.round(v)).collect(),
        w: w.into_iter().map(|v| dtype.round(v)).collect(),
        labels,
        sigma: vec![sigma; c],
        row_g,
        seed: 0x1234_5678_9abc_def0,
        step: 77,
    }
}

/// The oracle's forward and backward of `p` (upstream as `run_head` passes it).
fn oracle_of(cfg: &HeadConfig, p: &Prob) -> (ForwardOutput, Gradients) {
    oracle_outputs(cfg, p).unwrap()
}

/// The fused path's launch choices for one call, as `HeadOn` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FusedPlan {
    kernels: FusedKernels,
    fwd: (usize, usize),
    cols: usize,
    /// (G, S)
    grid: (usize, usize),
    /// The cp.async kernels rather than the element-load ones: what fused.rs picks from
    /// the tuning and D (emulated allocations are 256-byte aligned). Not observed: the
    /// device counters do not say which entry point ran.
    vec: bool,
}

/// Host copies of one `forward_backward`.
struct HeadRun {
    loss: f32,
    /// loss_i, lse_i, c_iy, t_i, alpha_i, dt_i
    rows: [Vec<f32>; 6],
    /// k*_iy (SPEC 5b; zeros from the fused path)
    k_iy: Vec<u32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
    launches: u64,
    plan: FusedPlan,
    /// The attention-form backward's row splits (grid.y) the head ran with.
    attn_row_splits: usize,
}

impl HeadRun {
    /// Every output's bits (gradients widened to f32: injective but for NaN payloads).
    fn bits(&self) -> Vec<u32> {
        let mut v = vec![self.loss.to_bits()];
        for r in self.rows.iter().chain([&self.dx, &self.dw]) {
            v.extend(bits(r));
        }
        v
    }
}

/// `CudaHead::forward_backward` of `path` with `tuning` on `dev`: the upstream is
/// `p.row_g` per row for `Reduction::None`, else Scalar(1).
fn run_head_dt(
    dev: &Device,
    path: HeadPath,
    cfg: &HeadConfig,
    tuning: FusedTuning,
    p: &Prob,
    grad: GradDtype,
) -> HeadRun {
    let head = HeadOn::new(dev, *cfg, path).unwrap().with_tuning(tuning);
    with_dtype!(p.dtype, T => run_head::<T>(&head, tuning, p, grad))
}

/// [`run_head_dt`] at storage type `T` (= `p.dtype`).
fn run_head<T: DeviceElem>(
    head: &HeadOn<&Device>,
    tuning: FusedTuning,
    p: &Prob,
    grad: GradDtype,
) -> HeadRun {
    assert_eq!(T::DTYPE, p.dtype);
    let (dev, path) = (head.device(), head.path());
    let HeadShape { b, c, d } = p.shape;
    let x = Tensor::<T>::from_f32(dev, &p.x, &[b, d]).unwrap();
    // W [C*K, D] with K sub-centers per class (SPEC 5b).
    let w = Tensor::<T>::from_f32(dev, &p.w, &[c * head.config().subcenters as usize, d]).unwrap();
    let sigma = Tensor::from_host(dev, &p.sigma, &[c]).unwrap();
    let row_g = Tensor::from_host(dev, &p.row_g, &[b]).unwrap();
    let up = match head.config().reduction {
        Reduction::None => HeadUpstream::PerRow(&row_g),
        _ => HeadUpstream::Scalar(1.0),
    };
    let before = dev.counters();
    let (fwd, g) = head
        .forward_backward(&x, &w, &p.labels, &sigma, p.seed, p.step, up, grad)
        .unwrap_or_else(|e| panic!("{} {} B={b} C={c} D={d} {tuning:?}: {e}", path.name(), T::NAME));
    let launches = (dev.counters() - before).launches;
    let host = |t: &Tensor<f32>| t.to_host(dev).unwrap();
    HeadRun {
        loss: fwd.loss,
        rows: [
            host(&fwd.row_loss),
            host(&fwd.lse),
            host(&fwd.c_iy),
            host(&fwd.t),
            host(&fwd.alpha),
            host(fwd.dt()),
        ],
        k_iy: fwd.k_iy_to_host(dev).unwrap(),
        dx: g.dx.to_f32_host(dev).unwrap(),
        dw: g.dw.to_f32_host(dev).unwrap(),
        launches,
        attn_row_splits: head.attention_row_splits(p.shape, T::DTYPE).0,
        plan: FusedPlan {
            kernels: head.fused_kernels(p.shape, T::DTYPE).unwrap(),
            fwd: head.forward_tile(p.shape),
            cols: head.backward_cols(p.shape),
            grid: head.backward_grid(p.shape),
            vec: !tuning.scalar_loads && fused_vectorized(T::DTYPE, d),
        },
    }
}

/// An explicit fused plan: forward tile, backward class tile, G, S, element loads.
fn tuning(fwd: (usize, usize), cols: usize, g: usize, s: usize, scalar: bool) -> FusedTuning {
    FusedTuning {
        forward_tile: Some(fwd),
        backward_cols: Some(cols),
        backward_ctas: Some(g),
        row_splits: Some(s),
        scalar_loads: scalar,
        kernels: Some(FusedKernels::Tiles),
        class_splits: None,
        attn_row_splits: None,
    }
}

/// The kernels the dispatcher picks for `dt` at feature size `d` on `dev`.
fn default_kernels(dev: &Device, dt: DType, d: usize) -> FusedKernels {
    if attn_supported(dt, d, dev.info().max_smem_per_block) {
        FusedKernels::Attention
    } else {
        FusedKernels::Tiles
    }
}

/// Checks one fused run against the oracle at SPEC 8's tolerances; the per-row outputs of
/// ignored rows must be exactly 0 (the fused path allocates them uninitialized: NaN here).
fn check_fused(what: &str, cfg: &HeadConfig, p: &Prob, fo: &ForwardOutput, go: &Gradients, r: &HeadRun) {
    let (tol_loss, tol_grad) = tolerances(p.dtype);
    let HeadShape { b, c, d } = p.shape;
    let e_loss = rel(r.loss, fo.loss);
    let (mut e_lse, mut e_t) = (0.0f64, 0.0f64);
    let [row_loss, lse, c_iy, t, alpha, dt] = &r.rows;
    for i in 0..b {
        if p.labels[i] >= 0 {
            e_lse = e_lse.max(rel(lse[i], fo.rows.lse[i]));
            e_t = e_t.max((t[i] as f64 - fo.rows.t[i]).abs());
            assert!((c_iy[i] as f64 - fo.rows.c_iy[i]).abs() <= 1e-6, "{what}: c_iy row {i}");
            assert!((alpha[i] as f64 - fo.rows.alpha[i]).abs() <= 1e-6, "{what}: alpha row {i}");
            assert!(dt[i].is_finite(), "{what}: dt row {i}");
        } else {
            let got = [row_loss[i], lse[i], c_iy[i], t[i], alpha[i], dt[i]];
            assert_eq!(got, [0.0; 6], "{what}: ignored row {i}");
        }
    }
    let (edx, mdx, idx) = max_err(&r.dx, &go.dx);
    let (edw, mdw, idw) = max_err(&r.dw, &go.dw);
    println!(
        "{what} B={b} C={c} D={d}: loss rel {e_loss:.1e}, lse rel {e_lse:.1e}, t abs {e_t:.1e}, \
         dx err {edx:.1e} (max {mdx:.1e}), dw err {edw:.1e} (max {mdw:.1e})"
    );
    assert!(e_loss <= tol_loss, "{what}: loss rel err {e_loss:e}");
    assert!(e_lse <= tol_loss, "{what}: lse rel err {e_lse:e}");
    // D = 1: every exact gradient is 0 (the normalization's projection removes the only
    // direction), and f32 rounding of u = x * inv leaves |g| |1 - u^2| inv <= 8 eps |g| inv.
    // With D = 1 every cosine is +-1, so the target sits at the acos clamp where
    // dt = m1 sin(phi) / sin(theta) reaches m1 / sqrt(2 ACOS_CLAMP) (~2.2e3), |g| <= s (dt + 1)
    // and inv <= 2 here (|v| >= 0.5). SPEC 8's relative-to-max bound is replaced by that.
    let floor = if d == 1 {
        let dt_max = cfg.m1 as f64 / (2.0 * oracle::ACOS_CLAMP).sqrt();
        8.0 * f32::EPSILON as f64 * cfg.s as f64 * (dt_max + 1.0) * 2.0
    } else {
        0.0
    };
    assert!(
        edx <= tol_grad * mdx + floor,
        "{what}: dx abs err {edx:e} at {idx} (row {}), max |dx| {mdx:e}",
        idx / d
    );
    assert!(
        edw <= tol_grad * mdw + floor,
        "{what}: dw abs err {edw:e} at {idw} (class {}), max |dw| {mdw:e}",
        idw / d
    );
}

/// The fused path over the shape sweep: B 1..200, C 1..300, D 1..2048, every forward tile,
/// both backward class tiles, G from 1 to 5 (multi-tile CTAs), S up to 4, vector and
/// scalar loads, ignored rows, labels 0 and C-1, all three target-logit regions; each shape
/// with the sweep's explicit tuning and with the dispatcher's own choice for 132 and 4 SMs.
#[test]
fn fused_head_matches_oracle() {
    let Some(dev) = emulated() else { return };
    let dev4 = emulated_with(4).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let base = HeadConfig { cloud: CloudMode::Off, ..Default::default() };
    let cloud = HeadConfig { cloud: CloudMode::Symmetric, label_smoothing: 0.1, ..Default::default() };
    // (B, C, D, config, sigma, (forward tile (rows, classes), backward class tile, G, S))
    type Shape<'a> = (usize, usize, usize, &'a HeadConfig, f32, ((usize, usize), usize, usize, usize));
    let (t128, r64, t64) = ((128, 128), (64, 128), (64, 64));
    let shapes: &[Shape] = &[
        (1, 1, 8, &base, 0.0, (t64, 64, 1, 1)),
        (5, 7, 1, &base, 0.0, (t128, 128, 1, 1)),
        (13, 93, 13, &cloud, 1.0, (t128, 64, 2, 1)),
        (33, 300, 64, &cloud, 1.0, (t64, 128, 2, 1)),
        (131, 3, 16, &base, 0.0, (r64, 128, 1, 3)),
        (9, 130, 96, &cloud, 0.3, (t128, 64, 3, 1)),
        (17, 150, 512, &cloud, 0.3, (r64, 128, 2, 1)),
        (3, 5, 2048, &cloud, 0.3, (t64, 64, 1, 1)),
        (70, 260, 24, &cloud, 0.5, (t64, 64, 3, 2)),
        (200, 130, 40, &cloud, 0.5, (t128, 128, 2, 4)),
    ];
    for dt in DTYPES {
        let mut regions: Vec<Region> = Vec::new();
        for &(b, c, d, cfg, sig, (fwd, cols, g, s)) in shapes {
            let sh = HeadShape { b, c, d };
            let p = case(&mut rng, sh, dt, sig);
            let (fo, go) = oracle_of(cfg, &p);
            regions.extend(fo.rows.region.iter().copied());
            let vec_ok = fused_vectorized(dt, d);
            for scalar in [false, true] {
                if !scalar && !vec_ok {
                    continue;
                }
                let t = tuning(fwd, cols, g, s, scalar);
                let r = run_head_dt(&dev, HeadPath::Fused, cfg, t, &p, GradDtype::Input);
                let want = FusedPlan { kernels: FusedKernels::Tiles, fwd, cols, grid: (g, s), vec: !scalar };
                assert_eq!(r.plan, want, "the tuning was not applied as asked");
                assert_eq!(r.launches, 7 + (s > 1) as u64, "launches of the fused forward_backward");
                check_fused(&format!("fused {} {:?}", dt.name(), r.plan), cfg, &p, &fo, &go, &r);
            }
            // The dispatcher's own choice, on an H200 and on a 4-SM part.
            for (sm, dv) in [(H200_SMS as usize, &dev), (4, &dev4)] {
                let r = run_head_dt(dv, HeadPath::Fused, cfg, FusedTuning::default(), &p, GradDtype::Input);
                let want = FusedPlan {
                    kernels: default_kernels(dv, dt, d),
                    fwd: forward_tile_for(sh, sm),
                    cols: backward_cols_for(sh, sm),
                    grid: backward_grid_for(sh, sm),
                    vec: vec_ok,
                };
                assert_eq!(r.plan, want, "HeadOn's dispatcher disagrees with the plan functions at {sm} SMs");
                check_fused(&format!("fused {} {sm} SMs {:?}", dt.name(), r.plan), cfg, &p, &fo, &go, &r);
            }
        }
        for region in [Region::Regular, Region::Fallback, Region::Saturated, Region::Ignored] {
            assert!(regions.contains(&region), "{}: the sweep never reaches {region:?}", dt.name());
        }
    }
}

/// The attention-form kernels' tuning: element loads if `scalar`, the shape's class splits
/// or `class_splits`, the shape's backward row splits or `row_splits`.
fn attention_tuning(scalar: bool, class_splits: Option<usize>, row_splits: Option<usize>) -> FusedTuning {
    FusedTuning {
        kernels: Some(FusedKernels::Attention),
        scalar_loads: scalar,
        class_splits,
        attn_row_splits: row_splits,
        ..Default::default()
    }
}

/// One forward_backward on the attention-form kernels ([`attention_tuning`]), asserting they
/// ran, with the row splits asked (clamped to the x row tiles), and took 3 launches.
fn run_attention(
    dev: &Device,
    cfg: &HeadConfig,
    p: &Prob,
    (scalar, class_splits, row_splits): (bool, Option<usize>, Option<usize>),
    grad: GradDtype,
) -> HeadRun {
    let t = attention_tuning(scalar, class_splits, row_splits);
    let r = run_head_dt(dev, HeadPath::Fused, cfg, t, p, grad);
    assert_eq!(r.plan.kernels, FusedKernels::Attention);
    if let Some(n) = row_splits {
        assert_eq!(r.attn_row_splits, attn_row_split_tiles(p.shape, n).0);
    }
    assert_eq!(r.launches, 3, "launches of the attention-form forward_backward");
    r
}

/// The attention sweeps' launch variants (scalar, class splits, row splits): the shape's own
/// plan; up to 3 backward row splits (the last CTA of a class tile sums the splits' dW
/// partials) with element loads, and up to 2 with cp.async loads; one class split and one row
/// split, where every forward CTA streams all class tiles (the online rescaling across
/// tiles) and every backward CTA all rows.
const ATTENTION_VARIANTS: [(bool, Option<usize>, Option<usize>); 4] =
    [(false, None, None), (true, None, Some(3)), (false, None, Some(2)), (false, Some(1), Some(1))];

/// The attention sweeps' option sets: plain ArcFace; the cloud with label smoothing; the
/// one-sided cloud with the clamp fallback and per-row weights (Reduction::None);
/// straight-through with label smoothing and Reduction::Sum.
fn attention_option_sets() -> [HeadConfig; 4] {
    [
        HeadConfig { cloud: CloudMode::Off, ..Default::default() },
        HeadConfig { cloud: CloudMode::Symmetric, label_smoothing: 0.1, ..Default::default() },
        HeadConfig {
            cloud: CloudMode::OneSided,
            fallback: Fallback::Clamp,
            reduction: Reduction::None,
            ..Default::default()
        },
        HeadConfig {
            margin_grad: featcloud::config::MarginGrad::StraightThrough,
            reduction: Reduction::Sum,
            label_smoothing: 0.2,
            ..Default::default()
        },
    ]
}

/// The attention-form kernels (`kernels/head_attn.cu`) against the oracle, every dtype:
/// B = 1, odd B, several row tiles; C = 1, C below the 32-class tile, C with a remainder and
/// many class splits; D = 1, 8, 13 and 129 (element loads), 64, 128 (the d128 kernels), 512;
/// ignored rows, labels 0 and C - 1, every target-logit region; the cloud, label smoothing,
/// the clamp fallback, straight-through, Reduction::None with per-row weights; gradients in
/// the storage dtype and in f32; both load paths. One forward_backward is 3 launches.
#[test]
fn attention_kernels_match_oracle() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let [base, cloud, clamp, st] = attention_option_sets();
    let shapes: &[(usize, usize, usize, &HeadConfig, f32)] = &[
        (1, 1, 8, &base, 0.0),
        (5, 7, 1, &base, 0.0),
        (13, 93, 13, &cloud, 1.0),
        (33, 300, 64, &cloud, 1.0),
        (131, 3, 16, &clamp, 0.5),
        (70, 1000, 128, &st, 0.0),
        (9, 130, 129, &cloud, 0.3),
        (17, 150, 512, &clamp, 0.3),
        (66, 45, 200, &st, 0.0),
    ];
    let mut regions: Vec<Region> = Vec::new();
    for dt in DTYPES {
        for (k, &(b, c, d, cfg, sig)) in shapes.iter().enumerate() {
            let sh = HeadShape { b, c, d };
            let p = case(&mut rng, sh, dt, sig);
            let (fo, go) = oracle_of(cfg, &p);
            regions.extend(fo.rows.region.iter().copied());
            for v in ATTENTION_VARIANTS {
                if !v.0 && !fused_vectorized(dt, d) {
                    continue;
                }
                let grad = if k % 3 == 1 { GradDtype::F32 } else { GradDtype::Input };
                let r = run_attention(&dev, cfg, &p, v, grad);
                check_fused(
                    &format!(
                        "attention {} B={b} C={c} D={d} (scalar, class splits, row splits) {v:?}, {} row splits",
                        dt.name(),
                        r.attn_row_splits
                    ),
                    cfg,
                    &p,
                    &fo,
                    &go,
                    &r,
                );
            }
        }
    }
    for region in [Region::Regular, Region::Fallback, Region::Saturated, Region::Ignored] {
        assert!(regions.contains(&region), "the sweep never reaches {region:?}");
    }
}

/// The bf16 D <= 2048 attention-form kernels (`attn_*_d2048_*`: 16 resident rows, one T
/// buffer, the S product split over K between 4 warp groups) against the oracle: D = 513 and
/// 600 (just past the d512 kernels), 1024, 1100 (element loads: D % 8 != 0) and 2048; B below
/// the 16 rows and several row tiles; C below one class tile and several class tiles, with
/// the shape's class splits and one split (the online rescaling over every class tile);
/// ignored rows, the cloud, label smoothing, the clamp fallback, straight-through; gradients
/// in bf16 and in f32.
#[test]
fn attention_d2048_kernels_match_oracle() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(2048);
    let [base, cloud, clamp, st] = attention_option_sets();
    let shapes: &[(usize, usize, usize, &HeadConfig, f32)] = &[
        (3, 5, 2048, &base, 0.0),
        (17, 150, 600, &clamp, 0.3),
        (33, 70, 1024, &cloud, 1.0),
        (9, 40, 1100, &st, 0.0),
        (5, 33, 513, &cloud, 0.5),
    ];
    let dt = DType::BF16;
    for (k, &(b, c, d, cfg, sig)) in shapes.iter().enumerate() {
        let sh = HeadShape { b, c, d };
        let p = case(&mut rng, sh, dt, sig);
        let (fo, go) = oracle_of(cfg, &p);
        for v in ATTENTION_VARIANTS.into_iter().chain([(true, Some(1), Some(2))]) {
            let (scalar, class_splits, row_splits) = v;
            if !scalar && !fused_vectorized(dt, d) {
                continue;
            }
            let grad = if k % 2 == 1 { GradDtype::F32 } else { GradDtype::Input };
            let r = run_attention(&dev, cfg, &p, v, grad);
            check_fused(
                &format!("attention bf16 B={b} C={c} D={d} {v:?}, {} row splits", r.attn_row_splits),
                cfg,
                &p,
                &fo,
                &go,
                &r,
            );
            // The split-K reduction's order is fixed: the same bits in other block and
            // thread orders (a missing barrier would show here).
            if k == 2 {
                for (blocks, threads) in
                    [(EmuOrder::Descending, EmuOrder::Random(5)), (EmuOrder::Random(9), EmuOrder::Descending)]
                {
                    dev.set_emu_order(blocks, threads);
                    let o = run_attention(&dev, cfg, &p, v, grad);
                    dev.set_emu_order(EmuOrder::Ascending, EmuOrder::Ascending);
                    assert!(
                        r.bits() == o.bits(),
                        "D={d} scalar={scalar} splits={class_splits:?} row splits={row_splits:?}: results depend on the order ({blocks:?}, {threads:?})"
                    );
                }
            }
        }
    }
}

/// Where the attention-form kernels do not apply (D > 512 outside bf16, D > 2048) the
/// dispatcher takes the tiles, and asking for the attention form there is an error, not a
/// wrong result.
#[test]
fn attention_kernels_refuse_what_they_do_not_handle() {
    let Some(dev) = emulated() else { return };
    let head = HeadOn::new(&*dev, HeadConfig::default(), HeadPath::Fused).unwrap();
    let forced = HeadOn::new(&*dev, HeadConfig::default(), HeadPath::Fused)
        .unwrap()
        .with_tuning(FusedTuning { kernels: Some(FusedKernels::Attention), ..Default::default() });
    for (dt, d) in
        [(DType::F16, 513), (DType::F32, 513), (DType::F32, 2048), (DType::F16, 2048), (DType::BF16, 2049)]
    {
        let sh = HeadShape { b: 4, c: 10, d };
        assert_eq!(head.fused_kernels(sh, dt).unwrap(), FusedKernels::Tiles, "{} D={d}", dt.name());
        let e = forced.fused_kernels(sh, dt).unwrap_err().to_string();
        assert!(e.contains("attention-form") && e.contains(&format!("D = {d}")), "{e}");
    }
    for (dt, d) in
        [(DType::F32, 1), (DType::BF16, 512), (DType::F16, 64), (DType::BF16, 513), (DType::BF16, 2048)]
    {
        let sh = HeadShape { b: 4, c: 10, d };
        assert_eq!(head.fused_kernels(sh, dt).unwrap(), FusedKernels::Attention, "{} D={d}", dt.name());
    }
}

/// Shapes where the dispatcher for 132 SMs picks grids the small sweep does not: many
/// class tiles (G = 16) and row splits (S = 4, 5), 128- and 64-class backward tiles.
#[test]
fn fused_head_h200_dispatch_matches_oracle() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let cfg = HeadConfig { cloud: CloudMode::Symmetric, ..Default::default() };
    for (dt, b, c, d) in [
        (DType::F32, 256usize, 1000usize, 32usize),
        (DType::BF16, 300, 2000, 16),
        (DType::F16, 256, 1000, 32),
    ] {
        let sh = HeadShape { b, c, d };
        let p = case(&mut rng, sh, dt, 0.4);
        let (fo, go) = oracle_of(&cfg, &p);
        let r = run_head_dt(&dev, HeadPath::Fused, &cfg, FusedTuning::default(), &p, GradDtype::Input);
        let sm = H200_SMS as usize;
        let want = FusedPlan {
            kernels: default_kernels(&dev, dt, d),
            fwd: forward_tile_for(sh, sm),
            cols: backward_cols_for(sh, sm),
            grid: backward_grid_for(sh, sm),
            vec: fused_vectorized(dt, d),
        };
        assert_eq!(r.plan, want);
        assert!(
            r.plan.grid.0 > 1 && r.plan.grid.1 > 1,
            "{:?}: no longer a multi-CTA, row-split grid",
            r.plan
        );
        check_fused(&format!("fused {} 132 SMs {:?}", dt.name(), r.plan), &cfg, &p, &fo, &go, &r);
    }
}

/// The reference path end to end (ref_normalize, the GEMM stand-in, ref_margin,
/// ref_softmax, head_reduce, ref_grad, normback): Reduction::None with a per-row upstream,
/// gradients in the input dtype.
#[test]
fn ref_head_matches_oracle() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let cfg = HeadConfig {
        cloud: CloudMode::OneSided,
        reduction: Reduction::None,
        label_smoothing: 0.05,
        fallback: Fallback::Clamp,
        ..Default::default()
    };
    for dt in DTYPES {
        let (tol_loss, tol_grad) = tolerances(dt);
        for (b, c, d) in [(1usize, 1usize, 8usize), (7, 93, 13), (19, 300, 64)] {
            let mut p = case(&mut rng, HeadShape { b, c, d }, dt, 0.8);
            (p.seed, p.step) = (99, 3);
            let (fo, go) = oracle_of(&cfg, &p);
            let r =
                run_head_dt(&dev, HeadPath::Reference, &cfg, FusedTuning::default(), &p, GradDtype::Input);
            let [row_loss, lse, c_iy, _, alpha, _] = &r.rows;
            let (mut e_lse, mut e_loss) = (0.0f64, 0.0f64);
            for i in 0..b {
                if p.labels[i] >= 0 {
                    e_lse = e_lse.max(rel(lse[i], fo.rows.lse[i]));
                    // a row loss can be 0 exactly (C = 1): relative to max(|loss|, 1)
                    e_loss = e_loss
                        .max((row_loss[i] as f64 - fo.rows.loss[i]).abs() / fo.rows.loss[i].abs().max(1.0));
                    assert!((c_iy[i] as f64 - fo.rows.c_iy[i]).abs() <= 1e-6, "c_iy row {i}");
                    assert!((alpha[i] as f64 - fo.rows.alpha[i]).abs() <= 1e-6, "alpha row {i}");
                }
            }
            let e_tot = (r.loss as f64 - fo.loss).abs() / fo.loss.abs().max(1.0);
            let (edx, mdx, idx) = max_err(&r.dx, &go.dx);
            let (edw, mdw, idw) = max_err(&r.dw, &go.dw);
            println!(
                "ref {} B={b} C={c} D={d}: loss err/max(|loss|,1) {e_tot:.1e} (rows {e_loss:.1e}), lse rel {e_lse:.1e}, \
                 dx {:.1e} of max, dw {:.1e} of max",
                dt.name(),
                edx / mdx.max(1e-30),
                edw / mdw.max(1e-30)
            );
            assert!(e_tot <= tol_loss && e_loss <= tol_loss && e_lse <= tol_loss, "loss / lse");
            assert!(edx <= tol_grad * mdx, "dx: abs err {edx:e} at {idx}, max |dx| {mdx:e}");
            assert!(edw <= tol_grad * mdw, "dw: abs err {edw:e} at {idw}, max |dw| {mdw:e}");
        }
    }
}

/// Ignored rows may hold anything (SPEC 2): NaN, +-inf and the dtype's largest finite value
/// in the x rows of ignored labels change nothing. On every path (reference, tiles, attention)
/// and dtype the outputs match the oracle of the same batch at SPEC 8's tolerances (the CPU
/// tests show that oracle equals the batch without those rows, bitwise), the ignored rows' dx
/// is exactly 0 and every output is finite. Without the zeroing, 0 * NaN in the dW products
/// put NaN into every dW entry.
#[test]
fn ignored_rows_may_hold_anything() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let cfg = HeadConfig { label_smoothing: 0.1, cloud: CloudMode::OneSided, ..Default::default() };
    let max_smem = dev.info().max_smem_per_block;
    for (dt, (b, c, d)) in DTYPES
        .iter()
        .map(|&dt| (dt, (40usize, 50usize, 64usize)))
        .chain([(DType::BF16, (20, 40, 600)), (DType::F32, (20, 40, 600))])
    {
        let mut p = case(&mut rng, HeadShape { b, c, d }, dt, 0.5);
        let big = dt.round(if dt == DType::F16 { 65504.0 } else { 3.0e38 });
        let ignored: Vec<usize> = (0..b).filter(|&i| p.labels[i] < 0).collect();
        for (n, &i) in ignored.iter().enumerate() {
            let row = &mut p.x[i * d..(i + 1) * d];
            match n % 4 {
                0 => row.fill(f32::NAN),
                1 => (row[0], row[d - 1]) = (f32::INFINITY, f32::NEG_INFINITY),
                2 => row.fill(big),
                _ => row[d / 2] = f32::NAN,
            }
        }
        let (fo, go) = oracle_of(&cfg, &p);
        let mut paths = vec![
            (HeadPath::Reference, FusedTuning::default()),
            (HeadPath::Fused, FusedTuning { kernels: Some(FusedKernels::Tiles), ..Default::default() }),
        ];
        if attn_supported(dt, d, max_smem) {
            paths.push((
                HeadPath::Fused,
                FusedTuning { kernels: Some(FusedKernels::Attention), ..Default::default() },
            ));
        }
        for (path, tuning) in paths {
            let what = format!("{} {:?} {} (poisoned ignored rows)", path.name(), tuning.kernels, dt.name());
            let r = run_head_dt(&dev, path, &cfg, tuning, &p, GradDtype::Input);
            assert!(r.loss.is_finite(), "{what}: loss {}", r.loss);
            assert!(r.dw.iter().all(|v| v.is_finite()), "{what}: non-finite dW");
            assert!(r.dx.iter().all(|v| v.is_finite()), "{what}: non-finite dx");
            for &i in &ignored {
                assert!(r.dx[i * d..(i + 1) * d].iter().all(|&v| v == 0.0), "{what}: dx of ignored row {i}");
            }
            check_fused(&what, &cfg, &p, &fo, &go, &r);
        }
    }
}

/// The non-finite policy on the device (SPEC 2): a NaN or infinity in a valid row of x or in
/// W makes the loss non-finite, and the head then names the first such value (x's valid rows
/// first, then W) as `Error::NonFinite`, on every path and dtype. Also where the bad value only
/// reaches target columns, which go through the f64 target logit: C = 1, and B = 1 with the NaN
/// in the target's class weight; and a NaN block of W rows filling a whole class split.
#[test]
fn non_finite_inputs_are_named() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let cfg = HeadConfig::default();
    for dt in DTYPES {
        for (b, c, d) in [(20usize, 30usize, 16usize), (6, 1, 16), (1, 30, 16), (20, 300, 16)] {
            let clean = case(&mut rng, HeadShape { b, c, d }, dt, 0.5);
            let valid = (0..b).rev().find(|&i| clean.labels[i] >= 0).unwrap();
            let mut poisoned = Vec::new();
            if b > 1 {
                let mut in_x = clean.clone();
                in_x.x[valid * d + 5] = f32::NAN;
                poisoned.push((in_x, "x", valid * d + 5));
            }
            // The class weight of a valid row's label (the only target column when B = 1).
            let j = clean.labels[valid] as usize;
            let mut in_w = clean.clone();
            in_w.w[j * d + 2] = if b == 1 { f32::NAN } else { f32::INFINITY };
            poisoned.push((in_w, "W", j * d + 2));
            if c >= 64 {
                // A whole class tile of W that no valid row targets (one class split of the
                // attention forward: its partial has max -inf and a NaN sum, which the merge
                // must keep, as no target logit carries the NaN).
                let free = (0..c / 32)
                    .find(|&t| !clean.labels.iter().any(|&y| y >= 0 && (y as usize) / 32 == t))
                    .expect("a class tile no row targets");
                let mut block = clean.clone();
                block.w[free * 32 * d..(free + 1) * 32 * d].fill(f32::NAN);
                poisoned.push((block, "W", free * 32 * d));
            }
            for (path, kernels) in [
                (HeadPath::Reference, None),
                (HeadPath::Fused, Some(FusedKernels::Tiles)),
                (HeadPath::Fused, Some(FusedKernels::Attention)),
            ] {
                let head = HeadOn::new(&*dev, cfg, path)
                    .unwrap()
                    .with_tuning(FusedTuning { kernels, ..Default::default() });
                for (p, what, index) in &poisoned {
                    let err = with_dtype!(dt, T => {
                        let x = Tensor::<T>::from_f32(&dev, &p.x, &[b, d]).unwrap();
                        let w = Tensor::<T>::from_f32(&dev, &p.w, &[c, d]).unwrap();
                        let sigma = Tensor::from_host(&dev, &p.sigma, &[c]).unwrap();
                        head.forward_backward(&x, &w, &p.labels, &sigma, 1, 2, HeadUpstream::Scalar(1.0), GradDtype::Input)
                            .err()
                    });
                    let msg = err.map(|e| e.to_string()).unwrap_or_default();
                    assert_eq!(
                        msg,
                        format!("non-finite value in {what} at index {index}"),
                        "{} {kernels:?} {} B={b} C={c}",
                        path.name(),
                        dt.name()
                    );
                }
            }
        }
    }
}

/// Issue 13's f32 precision case and its neighbours (`verify::cancellation_problem`) through
/// the three f32 CUDA paths (reference, tiles, attention): every gradient within SPEC 8's f32
/// tolerance with its rounding floor, and some of them only with it.
#[test]
fn f32_cancellation_stays_within_the_floor() {
    use featcloud::cuda::head::verify::{
        cancellation_problem, compare_with_oracle, run_device_with, RunOptions,
    };
    let Some(dev) = emulated() else { return };
    let gt = tolerances(DType::F32).1;
    let mut worst_without = 0.0f64;
    for (c, d, seed) in [(1000usize, 2usize, 1u64), (1000, 2, 2), (300, 3, 3), (100, 8, 4), (1000, 2, 5)] {
        let p = cancellation_problem(
            c,
            d,
            [0.0, 1e-3, 0.3][seed as usize % 3],
            10f64.powf(seed as f64 / 2.0 - 1.0),
            seed,
        );
        for fallback in Fallback::ALL {
            let cfg = HeadConfig { cloud: CloudMode::Off, fallback, ..Default::default() };
            let (fo, go) = oracle_of(&cfg, &p);
            for (path, kernels) in [
                (HeadPath::Reference, None),
                (HeadPath::Fused, Some(FusedKernels::Tiles)),
                (HeadPath::Fused, Some(FusedKernels::Attention)),
            ] {
                let opts = RunOptions { tuning: FusedTuning { kernels, ..Default::default() }, pad: 0 };
                let r = run_device_with(&dev, path, &cfg, &p, GradDtype::Input, opts).unwrap();
                let cmp = compare_with_oracle(&cfg, &p, &r).unwrap();
                let (edx, mdx, _) = max_err(&r.dx, &go.dx);
                let rel = edx / mdx;
                println!(
                    "{} {kernels:?} C={c} D={d} seed={seed} {fallback:?}: dx err {edx:.1e} = {rel:.1e} of max; with the floor {:.2} of the tolerance",
                    path.name(),
                    cmp.dx_rel.max(cmp.dw_rel) / gt
                );
                assert!(
                    cmp.passed(DType::F32),
                    "{} {kernels:?} C={c} D={d} seed={seed} {fallback:?}: {cmp:?}",
                    path.name()
                );
                assert!(fo.loss.is_finite());
                worst_without = worst_without.max(rel / gt);
            }
        }
    }
    assert!(worst_without > 1.0, "no case needed the floor ({worst_without:.2} of the tolerance without it)");
}

/// The same call in other block and thread orders gives the same bits: any difference is a
/// race (a missing __syncthreads, a shared-memory overlap, a CTA reading another's output).
/// Three fused tile configurations (both forward row tiles and the 64 x 64 tile, both load
/// paths, G x S = 3 x 2 and 5 x 2, several class tiles per CTA), the attention-form kernels
/// (both load paths; 70 x 260 is 3 row tiles in f32, 2 in bf16, with 9 class splits of one
/// class tile), and the reference path.
#[test]
fn fused_head_is_deterministic() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let cfg = HeadConfig { cloud: CloudMode::Symmetric, ..Default::default() };
    let sh = HeadShape { b: 70, c: 260, d: 32 };
    let orders = [
        (EmuOrder::Ascending, EmuOrder::Ascending),
        (EmuOrder::Descending, EmuOrder::Descending),
        (EmuOrder::Random(3), EmuOrder::Random(12345)),
        (EmuOrder::Descending, EmuOrder::Random(7)),
        (EmuOrder::Random(11), EmuOrder::Ascending),
    ];
    let configs: [(HeadPath, FusedTuning); 8] = [
        (HeadPath::Fused, tuning((128, 128), 128, 3, 2, false)),
        (HeadPath::Fused, tuning((64, 128), 64, 3, 2, true)),
        (HeadPath::Fused, tuning((64, 64), 64, 5, 2, false)),
        (HeadPath::Fused, attention_tuning(false, None, None)),
        (HeadPath::Fused, attention_tuning(true, None, None)),
        (HeadPath::Fused, attention_tuning(false, Some(2), None)),
        // 3 row splits of one row tile: which CTA of a class tile sums the partials depends
        // on the block order; the sum's order and so the bits do not.
        (HeadPath::Fused, attention_tuning(false, None, Some(3))),
        (HeadPath::Reference, FusedTuning::default()),
    ];
    for dt in DTYPES {
        let p = case(&mut rng, sh, dt, 0.5);
        for (path, t) in configs {
            dev.set_emu_order(EmuOrder::Ascending, EmuOrder::Ascending);
            let a = run_head_dt(&dev, path, &cfg, t, &p, GradDtype::Input);
            assert!(a.bits().iter().all(|&u| !f32::from_bits(u).is_nan()), "{}: NaN output", dt.name());
            for (blocks, threads) in orders {
                dev.set_emu_order(blocks, threads);
                let o = run_head_dt(&dev, path, &cfg, t, &p, GradDtype::Input);
                assert!(
                    a.bits() == o.bits(),
                    "{} {} {t:?}: results depend on the order (blocks {blocks:?}, threads {threads:?})",
                    dt.name(),
                    path.name()
                );
            }
            println!(
                "{} {} {:?}: bitwise equal in {} block/thread orders",
                dt.name(),
                path.name(),
                if path == HeadPath::Fused { Some(a.plan) } else { None },
                orders.len() + 1
            );
        }
    }
    dev.set_emu_order(EmuOrder::Ascending, EmuOrder::Ascending);
}

/// A zero feature row (inv = 1e12: f16 operands saturate instead of overflowing) and a
/// zero class row, with Reduction::None and a per-row upstream (the kernels' row_g path).
/// Gradients in f32 (GradDtype::F32, the head_normback_bwd_f32out_* kernels): the zero row's exact
/// dx is ~1e12 |g|, which no 16-bit output can hold.
#[test]
fn fused_head_zero_rows_and_per_row_upstream() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let cfg = HeadConfig { cloud: CloudMode::Off, reduction: Reduction::None, ..Default::default() };
    let sh = HeadShape { b: 10, c: 20, d: 16 };
    let mut p0 = case(&mut rng, sh, DType::F32, 0.0);
    p0.x[3 * 16..4 * 16].fill(0.0);
    p0.labels[3] = 5;
    p0.w[7 * 16..8 * 16].fill(0.0);
    (p0.seed, p0.step) = (1, 2);
    for dt in DTYPES {
        let tol_grad = tolerances(dt).1;
        let p = Prob {
            dtype: dt,
            x: p0.x.iter().map(|&v| dt.round(v)).collect(),
            w: p0.w.iter().map(|&v| dt.round(v)).collect(),
            ..p0.clone()
        };
        let (fo, go) = oracle_of(&cfg, &p);
        for scalar in [false, true] {
            let r = run_head_dt(
                &dev,
                HeadPath::Fused,
                &cfg,
                tuning((128, 128), 64, 1, 1, scalar),
                &p,
                GradDtype::F32,
            );
            let e_loss = (r.loss as f64 - fo.loss).abs() / fo.loss.abs().max(1.0);
            let (edx, mdx, idx) = max_err(&r.dx, &go.dx);
            let (edw, mdw, idw) = max_err(&r.dw, &go.dw);
            println!(
                "fused {} {} zero rows, per-row upstream: loss err {e_loss:.1e}, dx {:.1e} of max, dw {:.1e} of max",
                dt.name(),
                if scalar { "scalar" } else { "vec" },
                edx / mdx,
                edw / mdw
            );
            assert!(e_loss <= 1e-5, "loss err {e_loss:e}");
            assert!(edx <= tol_grad * mdx, "dx: abs err {edx:e} at {idx}, max |dx| {mdx:e}");
            assert!(edw <= tol_grad * mdw, "dw: abs err {edw:e} at {idw}, max |dw| {mdw:e}");
        }
    }
}

/// Class rows of zero and of tiny norm, which no row has as its label: dW_j = dwh_j * inv_w
/// with inv_w up to 1e12 and dwh_j = sum_i dc_ij xh_i built from probabilities ~1e-14, so
/// the whole of dW_j lives in values far below f16's range. The f16 path scales its
/// operands per row / column by powers of two (kernels/head_fused.cu, f16_operand_scale);
/// without that it returned dW_j = 0 where the oracle gives ~1e2..1e3. Every dtype, both
/// gradient dtypes, one and several backward CTAs and row splits.
#[test]
fn fused_zero_and_tiny_class_rows() {
    let Some(dev) = emulated() else { return };
    let cfg = HeadConfig { cloud: CloudMode::Off, ..Default::default() };
    let sh = HeadShape { b: 70, c: 300, d: 16 };
    for dt in DTYPES {
        for (grad, t) in [
            (GradDtype::Input, tuning((128, 128), 128, 1, 1, false)),
            (GradDtype::F32, tuning((64, 128), 64, 2, 1, false)),
            (GradDtype::Input, tuning((64, 64), 64, 1, 2, false)),
            (GradDtype::F32, tuning((128, 128), 128, 3, 2, false)),
        ] {
            let mut rng = ChaCha8Rng::seed_from_u64(10);
            let mut p = case(&mut rng, sh, DType::F32, 0.0);
            p.w[7 * 16..8 * 16].fill(0.0);
            p.w[139 * 16..140 * 16].iter_mut().for_each(|v| *v *= 1e-3);
            for y in p.labels.iter_mut() {
                if *y == 7 || *y == 139 {
                    *y = 8;
                }
            }
            (p.seed, p.step, p.dtype) = (1, 2, dt);
            p.x.iter_mut().chain(p.w.iter_mut()).for_each(|v| *v = dt.round(*v));
            let (_, go) = oracle_of(&cfg, &p);
            let r = run_head_dt(&dev, HeadPath::Fused, &cfg, t, &p, grad);
            let tol = tolerances(dt).1;
            let (edw, mdw, idw) = max_err(&r.dw, &go.dw);
            let (edx, mdx, idx) = max_err(&r.dx, &go.dx);
            let amax = |v: &[f64]| v.iter().map(|v| v.abs()).fold(0.0, f64::max);
            let famax = |v: &[f32]| v.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            println!(
                "{} {grad:?} {:?}: max |dW| zero row {:.3e} (got {:.3e}), tiny row {:.3e} (got {:.3e}), \
                 all rows {mdw:.3e}; err {:.1e} of max",
                dt.name(),
                r.plan,
                amax(&go.dw[7 * 16..8 * 16]),
                famax(&r.dw[7 * 16..8 * 16]),
                amax(&go.dw[139 * 16..140 * 16]),
                famax(&r.dw[139 * 16..140 * 16]),
                edw / mdw
            );
            let what = format!("{} {grad:?} {:?}", dt.name(), r.plan);
            assert!(edw <= tol * mdw, "{what}: dW err {edw:e} at {idw}, max |dW| {mdw:e}");
            assert!(edx <= tol * mdx, "{what}: dx err {edx:e} at {idx}, max |dx| {mdx:e}");
            // Those two rows are small next to the largest dW, so hold each to the
            // tolerance relative to its own size (an underflowed row is 100% off).
            for row in [7, 139] {
                let (e, m, at) = max_err(&r.dw[row * 16..(row + 1) * 16], &go.dw[row * 16..(row + 1) * 16]);
                assert!(m > 0.0 && e <= tol * m, "{what}: dW row {row} err {e:e} at column {at}, max {m:e}");
            }
        }
    }
}

/// Narrowing f32 -> bf16 / f16 in the gradient kernels: the 16-bit gradient kernels
/// (`head_normback_bwd_<T>`, the fused backward's in-kernel dW) and their f32-output twins
/// (`head_normback_bwd_f32out_<T>`, the fused backward's f32 dW) compute the same f32 value, so
/// every 16-bit gradient must equal `half`'s rounding of the f32 one. A per-row upstream from
/// 2^-40 to 2^14 drives f16 results into overflow, subnormals and underflow. Exact ties
/// occur only by chance (a few per run, counted in the output): no kernel narrows f32
/// values of our choosing to f16, so there is no targeted f16 tie check; the bf16 cast
/// test below has targeted bf16 ties. Bitwise only in the emulator: two different kernels
/// (see the file header).
#[test]
fn cvt_narrowing_matches_half() {
    let Some(dev) = emulated() else { return };
    let cfg = HeadConfig { cloud: CloudMode::Off, reduction: Reduction::None, ..Default::default() };
    let sh = HeadShape { b: 131, c: 300, d: 64 };
    for dt in [DType::BF16, DType::F16] {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut p = case(&mut rng, sh, dt, 0.0);
        p.row_g = (0..sh.b)
            .map(|i| {
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                sign * (1.0 + rng.random::<f32>()) * 2f32.powi(-40 + (i as i32 * 7) % 55)
            })
            .collect();
        // one row split (16-bit dW finished in the fused kernel) and three (dW through normback)
        for splits in [1usize, 3] {
            let tuning = FusedTuning {
                row_splits: Some(splits),
                kernels: Some(FusedKernels::Tiles),
                ..Default::default()
            };
            let n16 = run_head_dt(&dev, HeadPath::Fused, &cfg, tuning, &p, GradDtype::Input);
            let n32 = run_head_dt(&dev, HeadPath::Fused, &cfg, tuning, &p, GradDtype::F32);
            assert_eq!(n16.plan.grid.1, splits);
            let (mut overflow, mut subnormal, mut flushed, mut ties, mut total) = (0, 0, 0, 0, 0);
            for (name, got, wide) in [("dx", &n16.dx, &n32.dx), ("dW", &n16.dw, &n32.dw)] {
                for (i, (&g, &w)) in got.iter().zip(wide.iter()).enumerate() {
                    assert!(w.is_finite(), "{} S={splits}: f32 {name}[{i}] = {w}", dt.name());
                    let want = dt.round(w);
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "{} S={splits}: {name}[{i}]: f32 {w:e} ({:#010x}) narrowed to {g:e}, half gives {want:e}",
                        dt.name(),
                        w.to_bits()
                    );
                    total += 1;
                    ties += is_tie(w, dt) as usize;
                    if want.is_infinite() {
                        overflow += 1;
                    } else if want == 0.0 && w != 0.0 {
                        flushed += 1;
                    } else if dt == DType::F16 && want != 0.0 && want.abs() < 2f32.powi(-14) {
                        subnormal += 1;
                    }
                }
            }
            println!(
                "{} S={splits}: {total} gradients bitwise half's rounding of the f32 kernel's \
                 ({overflow} overflow to inf, {subnormal} subnormal, {flushed} flushed to 0, {ties} exact ties)",
                dt.name()
            );
            if dt == DType::F16 {
                assert!(
                    overflow > 0 && subnormal > 0 && flushed > 0,
                    "f16: the upstream no longer reaches every range"
                );
            }
        }
    }
}

// ---- sub-centers (SPEC 5b): the reference path and the fused attention form -----------------------

/// The option sets of the sub-center checks: ArcFace with the one-sided cloud, label smoothing
/// and the mean; the combined margin without cloud, with a per-row upstream, the clamp fallback
/// and the straight-through margin gradient.
fn subcenter_configs(k: u32) -> [(&'static str, HeadConfig); 2] {
    [
        (
            "arcface one_sided ls=0.1 mean",
            HeadConfig {
                subcenters: k,
                cloud: CloudMode::OneSided,
                label_smoothing: 0.1,
                ..HeadConfig::arcface()
            },
        ),
        (
            "combined off none clamp straight_through",
            HeadConfig {
                subcenters: k,
                cloud: CloudMode::Off,
                reduction: Reduction::None,
                fallback: Fallback::Clamp,
                margin_grad: featcloud::config::MarginGrad::StraightThrough,
                ..HeadConfig::combined()
            },
        ),
    ]
}

/// The reference path with K = 2, 3, 4 sub-centers per class against the f64 oracle at SPEC 8's
/// tolerances (f32 with its rounding floor; bf16, f16), every per-row output, k*_iy exactly, dx
/// and dW [C*K, D]; B = 1 and C = 1, C*K not a multiple of 8 or 32, more than 256 columns (two
/// column blocks of ref_grad), odd D, ignored rows poisoned with NaN. x rows lie near a random
/// sub-center of their class, so rows pick sub-centers other than 0; a sub-center that no row
/// picks as its class's max gets a dW row of exact zeros, as in the oracle.
#[test]
fn subcenter_reference_head_matches_oracle() {
    use featcloud::cuda::head::verify::{compare_with_oracle, make_problem_subcenters, run_device};
    let Some(dev) = emulated() else { return };
    let (mut picked, mut zero_rows) = (0usize, 0usize);
    for k in [2usize, 3, 4] {
        for dt in DTYPES {
            for (n, (b, c, d)) in
                [(1usize, 1usize, 8usize), (7, 5, 13), (33, 11, 9), (19, 37, 64), (9, 90, 16)]
                    .into_iter()
                    .enumerate()
            {
                for (name, cfg) in subcenter_configs(k as u32) {
                    let shape = HeadShape { b, c, d };
                    let mut p = make_problem_subcenters(shape, k, dt, true, 100 + n as u64 * 7 + k as u64);
                    for i in (0..b).filter(|&i| p.labels[i] < 0) {
                        p.x[i * d..(i + 1) * d].fill(f32::NAN);
                    }
                    let what = format!("{name} K={k} {} B={b} C={c} D={d}", dt.name());
                    let r = run_device(&dev, HeadPath::Reference, &cfg, &p, GradDtype::Input)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let cmp = compare_with_oracle(&cfg, &p, &r).unwrap();
                    let (_, go) = oracle_of(&cfg, &p);
                    println!(
                        "{what}: forward {:.2} and gradients {:.2} of the tolerance, k_iy equal {}",
                        cmp.forward_ratio(dt),
                        cmp.backward_ratio(dt),
                        cmp.k_iy_equal
                    );
                    assert!(cmp.k_iy_equal, "{what}: k_iy {:?}", r.k_iy);
                    assert!(cmp.passed(dt), "{what}: {cmp:?}");
                    assert_eq!(r.dw.len(), c * k * d, "{what}: dW is [C*K, D]");
                    for i in (0..b).filter(|&i| p.labels[i] < 0) {
                        assert_eq!(r.k_iy[i], 0, "{what}: k_iy of ignored row {i}");
                        assert!(
                            r.dx[i * d..(i + 1) * d].iter().all(|&v| v == 0.0),
                            "{what}: dx of ignored row {i}"
                        );
                    }
                    picked += r.k_iy.iter().filter(|&&v| v > 0).count();
                    for row in 0..c * k {
                        if go.dw[row * d..(row + 1) * d].iter().all(|&v| v == 0.0) {
                            zero_rows += 1;
                            assert!(
                                r.dw[row * d..(row + 1) * d].iter().all(|&v| v == 0.0),
                                "{what}: dW row {row} (a sub-center no row picks) is not 0"
                            );
                        }
                    }
                }
            }
        }
    }
    println!("{picked} target rows picked a sub-center k > 0; {zero_rows} dW rows of unpicked sub-centers exactly 0");
    assert!(picked > 50 && zero_rows > 10, "the sweep no longer exercises the sub-center choice");
}

/// K sub-centers that all equal their class's one row (W's class rows repeated K times) give
/// the plain head's results (SPEC 5b: ties go to the lowest k, so k*_iy = 0 everywhere): every
/// forward output bit for bit, dx equal, dW of sub-center 0 equal to the plain dW and the other
/// sub-centers' rows exactly 0. Equal, not only close, on the emulated device: the cosine and
/// gradient GEMMs over the repeated rows add the same products in the same order plus exact
/// zeros (cuBLAS on a GPU may block a C*K-column product differently).
#[test]
fn subcenter_duplicates_equal_the_plain_head() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let plain = HeadConfig { cloud: CloudMode::Symmetric, label_smoothing: 0.05, ..HeadConfig::arcface() };
    for dt in DTYPES {
        let p1 = case(&mut rng, HeadShape { b: 21, c: 37, d: 24 }, dt, 0.4);
        let d = p1.shape.d;
        let r1 =
            run_head_dt(&dev, HeadPath::Reference, &plain, FusedTuning::default(), &p1, GradDtype::Input);
        for k in [2usize, 3, 4] {
            let mut pk = p1.clone();
            pk.w = p1.w.chunks(d).flat_map(|row| row.repeat(k)).collect();
            let cfg = HeadConfig { subcenters: k as u32, ..plain };
            let rk =
                run_head_dt(&dev, HeadPath::Reference, &cfg, FusedTuning::default(), &pk, GradDtype::Input);
            let what = format!("{} K={k}", dt.name());
            assert_eq!(rk.loss.to_bits(), r1.loss.to_bits(), "{what}: loss");
            for (n, (a, b)) in rk.rows.iter().zip(&r1.rows).enumerate() {
                assert_eq!(bits(a), bits(b), "{what}: per-row output {n}");
            }
            assert!(rk.k_iy.iter().all(|&v| v == 0), "{what}: k_iy {:?}", rk.k_iy);
            assert_eq!(rk.dx, r1.dx, "{what}: dx");
            for (j, plain_row) in r1.dw.chunks(d).enumerate() {
                let rows = &rk.dw[j * k * d..(j + 1) * k * d];
                assert_eq!(&rows[..d], plain_row, "{what}: dW of class {j}'s sub-center 0");
                assert!(rows[d..].iter().all(|&v| v == 0.0), "{what}: dW of class {j}'s other sub-centers");
            }
        }
    }
}

/// forward() then backward() (k*_iy kept in the HeadForward) gives the bits of
/// forward_backward() with sub-centers, and K = 1 on the reference path reports k*_iy = 0.
#[test]
fn subcenter_forward_then_backward_equals_forward_backward() {
    use featcloud::cuda::head::verify::make_problem_subcenters;
    let Some(dev) = emulated() else { return };
    for k in [1usize, 3] {
        let cfg = HeadConfig { subcenters: k as u32, ..HeadConfig::arcface() };
        let p = make_problem_subcenters(HeadShape { b: 13, c: 20, d: 16 }, k, DType::F32, true, 5);
        let head = HeadOn::new(&*dev, cfg, HeadPath::Reference).unwrap();
        let x = Tensor::<f32>::from_host(&dev, &p.x, &[13, 16]).unwrap();
        let w = Tensor::<f32>::from_host(&dev, &p.w, &[20 * k, 16]).unwrap();
        let sigma = Tensor::from_host(&dev, &p.sigma, &[20]).unwrap();
        let up = HeadUpstream::Scalar(1.0);
        let (f1, g1) = head.forward_backward(&x, &w, &p.labels, &sigma, 3, 4, up, GradDtype::Input).unwrap();
        let f2 = head.forward(&x, &w, &p.labels, &sigma, 3, 4).unwrap();
        let g2 = head.backward(&x, &w, &p.labels, &sigma, &f2, up, GradDtype::Input).unwrap();
        assert_eq!(f1.loss.to_bits(), f2.loss.to_bits(), "K={k}: loss");
        let (k1, k2) = (f1.k_iy_to_host(&dev).unwrap(), f2.k_iy_to_host(&dev).unwrap());
        assert_eq!(k1, k2, "K={k}: k_iy");
        assert_eq!(k1.iter().any(|&v| v > 0), k > 1, "K={k}: k_iy {k1:?}");
        for (a, b) in [(&g1.dx, &g2.dx), (&g1.dw, &g2.dw)] {
            assert_eq!(bits(&a.to_f32_host(&dev).unwrap()), bits(&b.to_f32_host(&dev).unwrap()), "K={k}");
        }
    }
}

/// Sub-centers on the fused path with label smoothing, with the tiles kernels asked for, or at
/// a D the attention-form kernels do not take are refused with an error that names the option
/// and the path that takes them; bad shapes and labels with sub-centers are errors before any
/// launch: W rows not a multiple of K, a label >= C (C = W's rows / K, even where row y*K
/// would still be in W), sigma_cloud with C*K entries; and a NaN in a target's other
/// sub-center row reaches the loss and is named (the max over sub-centers keeps a NaN).
#[test]
fn subcenter_bad_inputs_are_errors() {
    let Some(dev) = emulated() else { return };
    let cfg = HeadConfig { subcenters: 3, ..HeadConfig::arcface() };
    let smoothed = HeadConfig { label_smoothing: 0.1, ..cfg };
    let msg =
        HeadOn::new(&*dev, smoothed, HeadPath::Fused).expect_err("fused refuses K > 1 with ls").to_string();
    assert!(msg.contains("head.subcenters") && msg.contains("HeadPath::Reference"), "{msg}");
    let fused = HeadOn::new(&*dev, cfg, HeadPath::Fused).unwrap();
    let tiles = HeadOn::new(&*dev, cfg, HeadPath::Fused)
        .unwrap()
        .with_tuning(FusedTuning { kernels: Some(FusedKernels::Tiles), ..Default::default() });
    for (head, d, dtype) in [(&fused, 600, DType::F32), (&fused, 4096, DType::BF16), (&tiles, 16, DType::F32)]
    {
        let msg = head
            .fused_kernels(HeadShape { b: 4, c: 5, d }, dtype)
            .expect_err("no tiles with K > 1")
            .to_string();
        assert!(msg.contains("head.subcenters") && msg.contains("HeadPath::Reference"), "{msg}");
        let (x, w) =
            (Tensor::<f32>::zeros(&dev, &[4, d]).unwrap(), Tensor::<f32>::zeros(&dev, &[15, d]).unwrap());
        if dtype == DType::F32 {
            let e = head
                .forward(&x, &w, &[0, 1, 2, 3], &Tensor::zeros(&dev, &[5]).unwrap(), 1, 1)
                .expect_err("the call is refused too")
                .to_string();
            assert!(e.contains("head.subcenters"), "{e}");
        }
    }
    let head = HeadOn::new(&*dev, cfg, HeadPath::Reference).unwrap();
    let (b, c, d, k) = (5usize, 4usize, 8usize, 3usize);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let xs = randn(&mut rng, b * d, 1.0);
    let ws = randn(&mut rng, c * k * d, 1.0);
    let x = Tensor::<f32>::from_host(&dev, &xs, &[b, d]).unwrap();
    let labels = vec![0, 3, -1, 2, 1];
    let sigma = Tensor::<f32>::zeros(&dev, &[c]).unwrap();
    let call = |w: &[f32], rows: usize, labels: &[i32], sigma: &Tensor<f32>| {
        let w = Tensor::<f32>::from_host(&dev, w, &[rows, d]).unwrap();
        head.forward_backward(&x, &w, labels, sigma, 1, 1, HeadUpstream::Scalar(1.0), GradDtype::Input)
            .map(|(f, _)| f.loss)
    };
    assert!(call(&ws, c * k, &labels, &sigma).unwrap().is_finite());
    let e = call(&ws[..(c * k - 1) * d], c * k - 1, &labels, &sigma).unwrap_err().to_string();
    assert!(e.contains("multiple of K"), "{e}");
    let e = call(&ws, c * k, &[0, 4, -1, 2, 1], &sigma).unwrap_err();
    assert!(matches!(e, featcloud::Error::LabelOutOfRange { row: 1, label: 4, classes: 4 }), "{e}");
    let e =
        call(&ws, c * k, &labels, &Tensor::<f32>::zeros(&dev, &[c * k]).unwrap()).unwrap_err().to_string();
    assert!(e.contains("sigma_cloud"), "{e}");
    // Class 3 (row 1's target): NaN in its sub-center 1, never the first one the max sees.
    let mut bad = ws.clone();
    let index = (3 * k + 1) * d + 2;
    bad[index] = f32::NAN;
    let e = call(&bad, c * k, &labels, &sigma).unwrap_err().to_string();
    assert_eq!(e, format!("non-finite value in W at index {index}"));
    // The same NaN in a class no row targets reaches the loss through the softmax's max.
    let e = call(&bad, c * k, &[0, 2, -1, 2, 1], &sigma).unwrap_err().to_string();
    assert_eq!(e, format!("non-finite value in W at index {index}"));
}

/// Fallback `none` (SPEC 3: cos(phi) - m3 for every phi, the peers' formula) on the reference
/// path and both fused kernel sets, every dtype, against the oracle, with rows past pi (the
/// opposite row) and below 0 (m2 < 0 with the cloud): the kernels take the regular formula
/// there. The same rows under the linear fallback give other target logits (asserted), so a
/// kernel that ignored the option would fail.
#[test]
fn fallback_none_matches_oracle_on_every_path() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(33);
    // Past pi: the opposite row with the cloud off; below 0: m2 < 0 and the cloud (sigma 1).
    let cfgs = [
        (HeadConfig { fallback: Fallback::None, cloud: CloudMode::Off, ..Default::default() }, 0.0),
        (HeadConfig { fallback: Fallback::None, m2: -0.4, m3: 0.1, ..Default::default() }, 1.0),
    ];
    let mut regions: Vec<Region> = Vec::new();
    for dt in DTYPES {
        for (cfg, sigma) in &cfgs {
            let p = case(&mut rng, HeadShape { b: 37, c: 75, d: 64 }, dt, *sigma);
            let (fo, go) = oracle_of(cfg, &p);
            regions.extend(fo.rows.region.iter().copied());
            let linear = oracle_of(&HeadConfig { fallback: Fallback::Linear, ..*cfg }, &p).0;
            let moved = fo.rows.t.iter().zip(&linear.rows.t).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(moved > 1e-2, "no row leaves [0, pi] (max |t_none - t_linear| = {moved:e})");
            for (path, kernels) in [
                (HeadPath::Reference, None),
                (HeadPath::Fused, Some(FusedKernels::Tiles)),
                (HeadPath::Fused, Some(FusedKernels::Attention)),
            ] {
                let t = FusedTuning { kernels, ..Default::default() };
                let r = run_head_dt(&dev, path, cfg, t, &p, GradDtype::Input);
                check_fused(
                    &format!("fallback none {} {} {kernels:?}", dt.name(), path.name()),
                    cfg,
                    &p,
                    &fo,
                    &go,
                    &r,
                );
            }
        }
    }
    for region in [Region::Fallback, Region::Saturated] {
        assert!(regions.contains(&region), "the sweep never reaches {region:?}");
    }
}

/// A sub-center problem ([`make_problem_subcenters`]) whose row 0 lies opposite every
/// sub-center of its class (they are made near-equal), so that its target angle reaches the
/// fallback region (theta + m2 > pi) also with K > 1.
fn subcenter_problem(shape: HeadShape, k: usize, dt: DType, seed: u64) -> Prob {
    use featcloud::cuda::head::verify::make_problem_subcenters;
    let mut p = make_problem_subcenters(shape, k, dt, true, seed);
    let d = shape.d;
    if shape.b > 1 && p.labels[0] >= 0 {
        let y = p.labels[0] as usize;
        let base: Vec<f32> = p.x[..d].iter().map(|v| -v).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xfa11);
        for kk in 0..k {
            for (e, &v) in base.iter().enumerate() {
                let jitter = if kk == 0 { 0.0 } else { 0.02 * rng.random_range(-1.0f32..1.0) };
                p.w[(y * k + kk) * d + e] = dt.round(v + jitter);
            }
        }
    }
    p
}

/// The option sets of the fused sub-center checks (label smoothing 0: the fused path refuses
/// it with K > 1): ArcFace with the one-sided cloud and the mean; CosFace with the symmetric
/// cloud and the sum; the combined margin without cloud, with a per-row upstream, the clamp
/// fallback and the straight-through margin gradient.
fn fused_subcenter_configs(k: u32) -> [(&'static str, HeadConfig); 3] {
    [
        (
            "arcface one_sided mean",
            HeadConfig { subcenters: k, cloud: CloudMode::OneSided, ..HeadConfig::arcface() },
        ),
        (
            "cosface symmetric sum",
            HeadConfig {
                subcenters: k,
                cloud: CloudMode::Symmetric,
                reduction: Reduction::Sum,
                ..HeadConfig::cosface()
            },
        ),
        // The same as the reference checks' second set (no label smoothing there either).
        subcenter_configs(k)[1],
    ]
}

/// The fused path's attention-form kernels with K = 1, 2, 3, 4 sub-centers per class against
/// the f64 oracle at SPEC 8's tolerances in f32, bf16 and f16 (bf16 also at D = 2048, its
/// other kernel family), every per-row output, k*_iy exactly (the target's arg-max is taken
/// from f64 cosines, as the oracle's), dx and dW [C*K, D]; B = 1, C = 1, B not a multiple of
/// the row tile (32 in f32, 64 in 16 bits), C not a multiple of the class tiles (floor(32 / K)
/// classes streamed, floor(RM / K) resident), odd D (element loads), ignored rows poisoned
/// with NaN, both margins, a row in the fallback region, the cloud on and off, and the
/// class splits the dispatcher picks as well as a single split (several class tiles per CTA:
/// the online rescaling across class-aligned tiles), and backward row splits. Unpicked
/// sub-centers get dW rows of exact zeros.
#[test]
fn subcenter_fused_head_matches_oracle() {
    use featcloud::cuda::head::verify::{compare_with_oracle, run_device_with, RunOptions};
    let Some(dev) = emulated() else { return };
    let (mut picked, mut zero_rows, mut fallback, mut runs) = (0usize, 0usize, 0usize, 0usize);
    let shapes = [(1usize, 1usize, 8usize), (7, 5, 13), (33, 11, 9), (70, 37, 64), (9, 90, 16), (3, 1, 24)];
    for k in [1usize, 2, 3, 4] {
        for dt in DTYPES {
            let wide = (dt == DType::BF16).then_some((5usize, 9usize, 2048usize));
            for (n, (b, c, d)) in shapes.into_iter().chain(wide).enumerate() {
                for (ci, (name, cfg)) in fused_subcenter_configs(k as u32).into_iter().enumerate() {
                    let shape = HeadShape { b, c, d };
                    let mut p = subcenter_problem(shape, k, dt, 300 + n as u64 * 7 + k as u64);
                    for i in (0..b).filter(|&i| p.labels[i] < 0) {
                        p.x[i * d..(i + 1) * d].fill(f32::NAN);
                    }
                    // One split (every class tile in one CTA) on the first option set, the
                    // dispatcher's on the others; on the others also up to 3 backward row
                    // splits (B = 33 and 70: 2 and 3 row tiles), whose partials the last CTA
                    // of each class-aligned tile sums.
                    let class_splits = (ci == 0).then_some(1);
                    let row_splits = (ci != 0).then_some(3);
                    let tuning = FusedTuning {
                        kernels: Some(FusedKernels::Attention),
                        class_splits,
                        attn_row_splits: row_splits,
                        ..Default::default()
                    };
                    let what = format!(
                        "{name} K={k} {} B={b} C={c} D={d} splits {class_splits:?} row splits {row_splits:?}",
                        dt.name()
                    );
                    let r = run_device_with(
                        &dev,
                        HeadPath::Fused,
                        &cfg,
                        &p,
                        GradDtype::Input,
                        RunOptions { tuning, pad: 64 },
                    )
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let cmp = compare_with_oracle(&cfg, &p, &r).unwrap();
                    let (fo, go) = oracle_of(&cfg, &p);
                    println!(
                        "{what}: forward {:.2} and gradients {:.2} of the tolerance, k_iy equal {}",
                        cmp.forward_ratio(dt),
                        cmp.backward_ratio(dt),
                        cmp.k_iy_equal
                    );
                    assert!(cmp.k_iy_equal, "{what}: k_iy {:?} oracle {:?}", r.k_iy, fo.rows.k_iy);
                    assert!(cmp.passed(dt), "{what}: {cmp:?}");
                    assert_eq!(r.dw.len(), c * k * d, "{what}: dW is [C*K, D]");
                    for i in (0..b).filter(|&i| p.labels[i] < 0) {
                        assert_eq!(r.k_iy[i], 0, "{what}: k_iy of ignored row {i}");
                        assert!(
                            r.dx[i * d..(i + 1) * d].iter().all(|&v| v == 0.0),
                            "{what}: dx of ignored row {i}"
                        );
                    }
                    fallback += fo.rows.region.iter().filter(|&&g| g == Region::Fallback).count();
                    picked += r.k_iy.iter().filter(|&&v| v > 0).count();
                    for row in 0..c * k {
                        if go.dw[row * d..(row + 1) * d].iter().all(|&v| v == 0.0) {
                            zero_rows += 1;
                            assert!(
                                r.dw[row * d..(row + 1) * d].iter().all(|&v| v == 0.0),
                                "{what}: dW row {row} (a sub-center no row picks) is not 0"
                            );
                        }
                    }
                    runs += 1;
                }
            }
        }
    }
    println!(
        "{runs} runs; {picked} target rows picked a sub-center k > 0; {zero_rows} dW rows of unpicked \
         sub-centers exactly 0; {fallback} rows in the fallback region"
    );
    assert!(
        picked > 100 && zero_rows > 20 && fallback > 20,
        "the sweep no longer exercises the sub-center choice"
    );
}

/// K sub-centers that all equal their class's one row give the fused K = 1 head's results up to
/// the regrouping of the class sums (the class-aligned tiles of floor(32 / K) classes group the
/// classes differently from K = 1's tiles of 32, so the softmax sums are added in another
/// order: not bitwise): every target output (c_iy, t, alpha, dt; from the same f64 cosines)
/// bit for bit, k*_iy = 0 everywhere (ties to the lowest k), the loss and lse within 4 f32
/// units, dx and dW of sub-center 0 within 1e-5 of the largest element (f32; 16-bit rounding
/// of E in bf16 and f16 only at 1e-2, SPEC 8), the other sub-centers' dW rows exactly 0.
#[test]
fn subcenter_fused_duplicates_equal_the_plain_head() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    let plain = HeadConfig { cloud: CloudMode::Symmetric, ..HeadConfig::arcface() };
    let attention = FusedTuning { kernels: Some(FusedKernels::Attention), ..Default::default() };
    for dt in DTYPES {
        let p1 = case(&mut rng, HeadShape { b: 71, c: 37, d: 24 }, dt, 0.4);
        let d = p1.shape.d;
        let r1 = run_head_dt(&dev, HeadPath::Fused, &plain, attention, &p1, GradDtype::F32);
        for k in [2usize, 3, 4] {
            let mut pk = p1.clone();
            pk.w = p1.w.chunks(d).flat_map(|row| row.repeat(k)).collect();
            let cfg = HeadConfig { subcenters: k as u32, ..plain };
            let rk = run_head_dt(&dev, HeadPath::Fused, &cfg, attention, &pk, GradDtype::F32);
            let what = format!("{} K={k}", dt.name());
            assert_eq!(rk.plan.kernels, FusedKernels::Attention, "{what}");
            for n in 2..6 {
                assert_eq!(bits(&rk.rows[n]), bits(&r1.rows[n]), "{what}: per-row output {n}");
            }
            assert!(rk.k_iy.iter().all(|&v| v == 0), "{what}: k_iy {:?}", rk.k_iy);
            let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulps(rk.loss, r1.loss) <= 4, "{what}: loss {} vs {}", rk.loss, r1.loss);
            for n in 0..2 {
                for (a, b) in rk.rows[n].iter().zip(&r1.rows[n]) {
                    assert!(
                        ulps(*a, *b) <= 4 || (a - b).abs() <= 1e-6,
                        "{what}: per-row output {n}: {a} vs {b}"
                    );
                }
            }
            let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
            let close = |a: &[f32], b: &[f32], name: &str| {
                let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let err = a.iter().zip(b).fold(0.0f32, |m, (u, v)| m.max((u - v).abs()));
                println!("{what}: {name} max error {:.2e} of max {scale:.2e}", err);
                assert!(err <= tol * scale, "{what}: {name} max error {err} of max {scale}");
            };
            close(&rk.dx, &r1.dx, "dx");
            let dw0: Vec<f32> = rk.dw.chunks(k * d).flat_map(|rows| rows[..d].to_vec()).collect();
            close(&dw0, &r1.dw, "dW of sub-center 0");
            for (j, rows) in rk.dw.chunks(k * d).enumerate() {
                assert!(rows[d..].iter().all(|&v| v == 0.0), "{what}: dW of class {j}'s other sub-centers");
            }
        }
    }
}

/// The fused head with sub-centers is bitwise deterministic in every block and thread order
/// (ascending, descending, seeded random) on the emulated device, with the dispatcher's class
/// splits and with two, with cp.async and element loads; forward() then backward() (k*_iy
/// kept in the HeadForward) gives forward_backward()'s bits.
#[test]
fn subcenter_fused_head_is_deterministic() {
    let Some(dev) = emulated() else { return };
    let orders = [
        (EmuOrder::Descending, EmuOrder::Descending),
        (EmuOrder::Random(3), EmuOrder::Random(12345)),
        (EmuOrder::Random(11), EmuOrder::Ascending),
    ];
    for (k, dt) in [(3usize, DType::F32), (2, DType::BF16), (4, DType::F16), (3, DType::BF16)] {
        let p = subcenter_problem(HeadShape { b: 70, c: 45, d: 32 }, k, dt, 17 + k as u64);
        let cfg = HeadConfig { subcenters: k as u32, cloud: CloudMode::Symmetric, ..HeadConfig::arcface() };
        for t in [attention_tuning(false, None, None), attention_tuning(true, Some(2), Some(3))] {
            dev.set_emu_order(EmuOrder::Ascending, EmuOrder::Ascending);
            let a = run_head_dt(&dev, HeadPath::Fused, &cfg, t, &p, GradDtype::Input);
            assert!(a.bits().iter().all(|&u| !f32::from_bits(u).is_nan()), "{}: NaN output", dt.name());
            assert!(a.k_iy.iter().any(|&v| v > 0), "K={k}: no row picked a sub-center k > 0");
            for (blocks, threads) in orders {
                dev.set_emu_order(blocks, threads);
                let o = run_head_dt(&dev, HeadPath::Fused, &cfg, t, &p, GradDtype::Input);
                assert!(
                    a.bits() == o.bits() && a.k_iy == o.k_iy,
                    "{} K={k} {t:?}: results depend on the order (blocks {blocks:?}, threads {threads:?})",
                    dt.name()
                );
            }
            println!("{} K={k} {t:?}: bitwise equal in {} block/thread orders", dt.name(), orders.len() + 1);
        }
        dev.set_emu_order(EmuOrder::Ascending, EmuOrder::Ascending);
        with_dtype!(dt, T => {
            let head = HeadOn::new(&*dev, cfg, HeadPath::Fused).unwrap();
            let HeadShape { b, c, d } = p.shape;
            let x = Tensor::<T>::from_f32(&dev, &p.x, &[b, d]).unwrap();
            let w = Tensor::<T>::from_f32(&dev, &p.w, &[c * k, d]).unwrap();
            let sigma = Tensor::from_host(&dev, &p.sigma, &[c]).unwrap();
            let up = HeadUpstream::Scalar(1.0);
            let (f1, g1) = head.forward_backward(&x, &w, &p.labels, &sigma, 3, 4, up, GradDtype::F32).unwrap();
            let f2 = head.forward(&x, &w, &p.labels, &sigma, 3, 4).unwrap();
            let g2 = head.backward(&x, &w, &p.labels, &sigma, &f2, up, GradDtype::F32).unwrap();
            assert_eq!(f1.loss.to_bits(), f2.loss.to_bits(), "K={k}: loss");
            assert_eq!(f1.k_iy_to_host(&dev).unwrap(), f2.k_iy_to_host(&dev).unwrap(), "K={k}: k_iy");
            for (a, b) in [(&g1.dx, &g2.dx), (&g1.dw, &g2.dw)] {
                assert_eq!(bits(&a.to_f32_host(&dev).unwrap()), bits(&b.to_f32_host(&dev).unwrap()), "K={k}");
            }
        });
    }
}
