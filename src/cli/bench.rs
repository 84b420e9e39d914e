//! `featcloud bench`: forward+backward of the fused path, the reference path
//! and the bare cuBLAS 3-GEMM time, side by side in one process, with the
//! device's measured tensor-core peak, on the SPEC section 9 shapes.
//!
//! Timing: CUDA events around each repetition, warm-up first, the L2 flushed
//! before every repetition, median of N. Memory: the stream-ordered pool's
//! high-water mark during one call, above what was in use before it (inputs
//! excluded; outputs dx, dW and every workspace included). Each path's result
//! is checked against the reference path before anything is timed. Each row also
//! shows the roofline model's prediction (`src/cuda/perf_model.rs`, docs/PERF.md);
//! `--model` prints only the model's per-kernel table and needs no GPU.
//!
//! Sub-centers (SPEC 5b): a second table times K = 3 beside K = 1 on the face shapes, on
//! the fused path (its attention-form kernels, what the CUDA backend runs K > 1 on) and on
//! the reference path, after checking on each that K = 3 with every class's sub-centers equal
//! gives K = 1's loss.

use crate::config::HeadConfig;
use crate::cuda::bench::{
    gemm_peak_tflops, measure_extra_memory, BenchShape, ThreeGemm, Timer, Timing, SHAPES,
};
use crate::cuda::head::{plan, CudaHead, FusedKernels, FusedTuning, GradDtype, HeadPath, HeadUpstream};
use crate::cuda::perf_model::{self, DeviceModel, PathModel};
use crate::cuda::{Device, DeviceElem, Tensor};
use crate::dtype::DType;
use crate::shape::HeadShape;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `featcloud bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A subset that runs in under a minute: re-ID, LT and the two smaller face shapes, bf16, fewer repetitions.
    #[arg(long)]
    pub quick: bool,
    /// Write the results as JSON to this file (atomically).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Timed repetitions per measurement (median reported).
    #[arg(long, default_value_t = 20)]
    pub reps: usize,
    /// Only shapes whose name contains this (reid, lt, face-93k, face-360k, face-1m).
    #[arg(long)]
    pub only: Option<String>,
    /// Print the roofline model's predictions (docs/PERF.md) for the H200 instead of
    /// timing anything; needs no GPU. With --json, writes them as JSON.
    #[arg(long)]
    pub model: bool,
}

/// Timing and memory of one path.
#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    /// Event timing.
    pub timing: Timing,
    /// TFLOP/s counting 6*B*C*D per fwd+bwd.
    pub tflops: f64,
    /// Measured extra device memory of one call, MiB.
    pub extra_mib: f64,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// The shape.
    pub shape: BenchShape,
    /// Storage dtype.
    pub dtype: String,
    /// Fused path.
    pub fused: PathResult,
    /// Reference path.
    pub reference: PathResult,
    /// The roofline model's prediction for the fused path on this device, ms (docs/PERF.md).
    pub predicted_fused_ms: f64,
    /// The roofline model's prediction for the reference path on this device, ms.
    pub predicted_reference_ms: f64,
    /// The three GEMMs alone.
    pub cublas_3gemm: PathResult,
    /// Fused vs reference: max normalized error of (loss, dx, dW) and the tolerance.
    pub fused_vs_reference_err: f64,
    /// Tolerance used for that check.
    pub tolerance: f64,
    /// Fused TFLOP/s as a fraction of the measured peak for this dtype.
    pub fraction_of_peak: f64,
    /// reference ms / fused ms.
    pub speedup_vs_reference: f64,
    /// fused ms / 3-GEMM ms.
    pub ratio_vs_3gemm: f64,
    /// The tensor-core limit 6BCD/peak, times 1.5 (SPEC target for face shapes), ms.
    pub target_limit_ms: Option<f64>,
    /// torch.compile ms / 2 (or / 20 on launch-bound shapes): the SPEC target, ms.
    pub target_peer_ms: f64,
    /// Cut Cross-Entropy's extra MiB (memory target).
    pub target_mib: f64,
    /// The fused path's kernel set at this shape (the dispatcher's choice).
    pub fused_kernels: FusedKernels,
    /// The attention-form forward's (class splits, class tiles per split).
    pub attention_splits: (usize, usize),
    /// Where the fused path runs the attention form: the tiles kernels measured too.
    pub fused_tiles: Option<PathResult>,
    /// The model's prediction for [`BenchRow::fused_tiles`], ms.
    pub predicted_tiles_ms: Option<f64>,
    /// The tiles' forward tile (rows, classes).
    pub fused_forward_tile: (usize, usize),
    /// The fused backward's class tile (64 or 128).
    pub fused_backward_cols: usize,
    /// The fused backward's grid (G class-tile CTAs, S row splits).
    pub fused_backward_grid: (usize, usize),
    /// Where the dispatcher split the rows (S > 1; the tiles' backward grid.1, or the
    /// attention form's backward row splits): the fused path re-timed with fewer splits
    /// (halving for the tiles, 1 for the attention form), (S, median ms, extra MiB), so the
    /// speed / memory trade is on record.
    pub row_split_sweep: Vec<(usize, f64, f64)>,
}

/// K sub-centers beside K = 1 on one shape and path (SPEC 5b).
#[derive(Debug, Clone, Serialize)]
pub struct SubcenterRow {
    /// The shape (C classes).
    pub shape: BenchShape,
    /// Storage dtype.
    pub dtype: String,
    /// Sub-centers per class of the second measurement.
    pub k: usize,
    /// The head path both were timed on.
    pub path: String,
    /// K = 1.
    pub k1: PathResult,
    /// K sub-centers (W of C*K rows).
    pub kk: PathResult,
    /// kk / k1 time: close to K when the GEMMs dominate (they do K times the work).
    pub time_ratio: f64,
    /// kk / k1 extra memory (the B x C*K matrices of the reference path grow K times).
    pub memory_ratio: f64,
    /// |loss(K with equal sub-centers) - loss(K = 1)| / |loss(K = 1)|, checked before timing.
    pub duplicate_loss_err: f64,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Device name.
    pub device: String,
    /// Measured peak, TFLOP/s, per dtype (n^3 cuBLAS GEMM).
    pub peak_tflops: Vec<(String, f64, usize)>,
    /// Rows.
    pub rows: Vec<BenchRow>,
    /// Sub-centers beside K = 1 (face shapes).
    pub subcenters: Vec<SubcenterRow>,
}

fn flops(s: &BenchShape) -> f64 {
    6.0 * s.b as f64 * s.c as f64 * s.d as f64
}

/// Deterministic pseudo-random host data in [-1, 1) (fast for 10^8 elements).
fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32) / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

struct Inputs<T: DeviceElem> {
    x: Tensor<T>,
    w: Tensor<T>,
    labels: Vec<i32>,
    sigma: Tensor<f32>,
}

fn inputs<T: DeviceElem>(dev: &Device, s: &BenchShape) -> anyhow::Result<Inputs<T>> {
    let labels: Vec<i32> =
        fill(s.b, 3).iter().map(|v| (((v + 1.0) * 0.5 * s.c as f32) as i32).min(s.c as i32 - 1)).collect();
    let sigma: Vec<f32> = (0..s.c).map(|k| if k % 3 == 0 { 0.1 } else { 0.0 }).collect();
    Ok(Inputs {
        x: Tensor::from_f32(dev, &fill(s.b * s.d, 1), &[s.b, s.d])?,
        w: Tensor::from_f32(dev, &fill(s.c * s.d, 2), &[s.c, s.d])?,
        labels,
        sigma: Tensor::from_f32(dev, &sigma, &[s.c])?,
    })
}

/// Max |a - b| / max |b| (0 when b is all zero).
fn rel_max_err(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
    let err = a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    if scale > 0.0 {
        err / scale
    } else {
        err
    }
}

/// Times `call` on `head` (warm-up, then `reps` repetitions) and measures the extra memory
/// of one call on a copy of `head` with empty scratch, so that the figure includes the
/// scratch a trainer's head keeps between calls (the timed head already holds its own).
fn measure_head(
    timer: &mut Timer<'_>,
    dev: &Device,
    s: &BenchShape,
    warm: usize,
    reps: usize,
    head: &CudaHead,
    call: impl Fn(&CudaHead) -> crate::Result<()>,
) -> anyhow::Result<PathResult> {
    let timing = timer.time(warm, reps, || call(head))?;
    let fresh = head.without_scratch();
    let extra = measure_extra_memory(dev, || call(&fresh))?;
    Ok(PathResult {
        tflops: flops(s) / (timing.median_ms * 1e-3) / 1e12,
        timing,
        extra_mib: extra as f64 / (1 << 20) as f64,
    })
}

fn bench_shape<T: DeviceElem>(
    dev: &Arc<Device>,
    s: &BenchShape,
    reps: usize,
    peak: f64,
) -> anyhow::Result<BenchRow> {
    let cfg = HeadConfig::default();
    let inp = inputs::<T>(dev, s)?;
    let fused = CudaHead::new(dev.clone(), cfg, HeadPath::Fused)?;
    let reference = CudaHead::new(dev.clone(), cfg, HeadPath::Reference)?;
    let run = |h: &CudaHead| {
        h.forward_backward(
            &inp.x,
            &inp.w,
            &inp.labels,
            &inp.sigma,
            7,
            11,
            HeadUpstream::Scalar(1.0),
            GradDtype::Input,
        )
    };

    // Correctness first: fused against reference on these very inputs.
    let (rf, rg) = run(&reference)?;
    let (ff, fg) = run(&fused)?;
    let loss_err = ((ff.loss - rf.loss) as f64).abs() / (rf.loss as f64).abs().max(1e-30);
    let dx_err = rel_max_err(&fg.dx.to_f32_host(dev)?, &rg.dx.to_f32_host(dev)?);
    let dw_err = rel_max_err(&fg.dw.to_f32_host(dev)?, &rg.dw.to_f32_host(dev)?);
    let (tol_loss, tol_grad) = if T::DTYPE == DType::F32 { (1e-5, 1e-4) } else { (2e-3, 1e-2) };
    let err = (loss_err / tol_loss).max(dx_err / tol_grad).max(dw_err / tol_grad);
    drop((rf, rg, ff, fg));
    if err > 1.0 {
        anyhow::bail!(
            "{} {}: fused disagrees with reference (loss rel {loss_err:.2e}, dx {dx_err:.2e}, dW {dw_err:.2e}); not timing it",
            s.name,
            T::DTYPE.name()
        );
    }

    let mut timer = Timer::new(dev)?;
    let warm = 3;
    let mut measure = |h: &CudaHead| measure_head(&mut timer, dev, s, warm, reps, h, |h| run(h).map(|_| ()));
    let f = measure(&fused)?;
    let shape = HeadShape { b: s.b, c: s.c, d: s.d };
    let grid = fused.backward_grid(shape);
    let kernels = fused.fused_kernels(shape, T::DTYPE)?;
    // Where the attention form runs, the tiles too: the old kernels beside the new, in one run.
    let tiles_head = CudaHead::new(dev.clone(), cfg, HeadPath::Fused)?
        .with_tuning(FusedTuning { kernels: Some(FusedKernels::Tiles), ..FusedTuning::default() });
    let fused_tiles = if kernels == FusedKernels::Attention { Some(measure(&tiles_head)?) } else { None };
    let mut row_split_sweep = vec![];
    // The tiles kernels' row splits (the attention form's, `attn_row_splits`, are swept below).
    if kernels == FusedKernels::Tiles && grid.1 > 1 {
        row_split_sweep.push((grid.1, f.timing.median_ms, f.extra_mib));
        let mut fewer = grid.1 / 2;
        while fewer >= 1 {
            let tuning = FusedTuning {
                row_splits: Some(fewer),
                kernels: Some(FusedKernels::Tiles),
                ..FusedTuning::default()
            };
            let h = CudaHead::new(dev.clone(), cfg, HeadPath::Fused)?.with_tuning(tuning);
            let m = measure(&h)?;
            row_split_sweep.push((fewer, m.timing.median_ms, m.extra_mib));
            fewer /= 2;
        }
    }
    // The attention form's backward row splits (small C, `plan::attn_bwd_row_splits`): the
    // dispatcher's count against one split, so the first GPU run tests the model's choice.
    let attn_splits = fused.attention_row_splits(shape, T::DTYPE).0;
    if kernels == FusedKernels::Attention && attn_splits > 1 {
        row_split_sweep.push((attn_splits, f.timing.median_ms, f.extra_mib));
        let tuning = FusedTuning { attn_row_splits: Some(1), ..FusedTuning::default() };
        let m = measure(&CudaHead::new(dev.clone(), cfg, HeadPath::Fused)?.with_tuning(tuning))?;
        row_split_sweep.push((1, m.timing.median_ms, m.extra_mib));
    }
    let r = measure(&reference)?;
    let mut g3 = ThreeGemm::<T>::new(dev, s.b, s.d, s.c)?;
    let timing = timer.time(warm, reps, || g3.run(dev))?;
    let extra = measure_extra_memory(dev, || g3.run(dev))?;
    let g = PathResult {
        tflops: flops(s) / (timing.median_ms * 1e-3) / 1e12,
        timing,
        extra_mib: extra as f64 / (1 << 20) as f64,
    };
    // The model with this device's SM count and, for bf16, the peak measured in this run.
    let mut model_dev = DeviceModel {
        sms: dev.info().sm_count.max(1) as usize,
        max_smem_per_block: dev.info().max_smem_per_block,
        ..DeviceModel::h200()
    };
    if T::DTYPE != DType::F32 {
        model_dev.bf16_peak_tflops = peak;
    }
    Ok(BenchRow {
        fused_kernels: kernels,
        attention_splits: fused.attention_splits(shape, T::DTYPE),
        predicted_tiles_ms: fused_tiles
            .as_ref()
            .map(|_| perf_model::tiles(shape, T::DTYPE, &model_dev).total_ms()),
        fused_tiles,
        predicted_fused_ms: perf_model::fused(shape, T::DTYPE, &model_dev).total_ms(),
        predicted_reference_ms: perf_model::reference(shape, T::DTYPE, &model_dev).total_ms(),
        shape: *s,
        dtype: T::DTYPE.name().into(),
        fraction_of_peak: f.tflops / peak,
        speedup_vs_reference: r.timing.median_ms / f.timing.median_ms,
        ratio_vs_3gemm: f.timing.median_ms / g.timing.median_ms,
        target_limit_ms: (!s.small).then(|| 1.5 * flops(s) / (peak * 1e12) * 1e3),
        target_peer_ms: s.torch_compile_ms / if s.small { 20.0 } else { 2.0 },
        target_mib: s.cce_mib,
        fused_forward_tile: fused.forward_tile(HeadShape { b: s.b, c: s.c, d: s.d }),
        fused_backward_cols: fused.backward_cols(HeadShape { b: s.b, c: s.c, d: s.d }),
        fused_backward_grid: grid,
        row_split_sweep,
        fused_vs_reference_err: err,
        tolerance: 1.0,
        fused: f,
        reference: r,
        cublas_3gemm: g,
    })
}

/// The sub-center count the bench times beside K = 1 (the and the paper's K).
pub const BENCH_K: usize = 3;

/// The paths the sub-center table times: the fused one (the attention-form kernels, which
/// the CUDA backend runs K > 1 on without label smoothing) and the reference one.
pub const SUBCENTER_PATHS: [HeadPath; 2] = [HeadPath::Fused, HeadPath::Reference];

/// The two heads the sub-center bench compares (K = 1 and K = [`BENCH_K`], both on one
/// path) and one set of inputs for both.
struct SubcenterHeads<T: DeviceElem> {
    plain: CudaHead,
    sub: CudaHead,
    inp: Inputs<T>,
}

impl<T: DeviceElem> SubcenterHeads<T> {
    fn new(dev: &Arc<Device>, s: &BenchShape, path: HeadPath) -> anyhow::Result<Self> {
        let sub_cfg = HeadConfig { subcenters: BENCH_K as u32, ..HeadConfig::default() };
        Ok(Self {
            plain: CudaHead::new(dev.clone(), HeadConfig::default(), path)?,
            sub: CudaHead::new(dev.clone(), sub_cfg, path)?,
            inp: inputs::<T>(dev, s)?,
        })
    }

    /// See [`subcenter_duplicate_check`].
    fn duplicate_check(&self, dev: &Device, s: &BenchShape) -> anyhow::Result<f64> {
        let k = BENCH_K;
        let w1 = fill(s.c * s.d, 2);
        let dup: Vec<f32> =
            w1.chunks(s.d).flat_map(|row| std::iter::repeat_n(row, k).flatten().copied()).collect();
        let wdup = Tensor::<T>::from_f32(dev, &dup, &[s.c * k, s.d])?;
        drop(dup);
        let inp = &self.inp;
        let loss = |h: &CudaHead, w: &Tensor<T>| -> anyhow::Result<f64> {
            Ok(h.forward(&inp.x, w, &inp.labels, &inp.sigma, 7, 11)?.loss as f64)
        };
        let (l1, lk) = (loss(&self.plain, &inp.w)?, loss(&self.sub, &wdup)?);
        let err = (lk - l1).abs() / l1.abs().max(1e-30);
        let tol = if T::DTYPE == DType::F32 { 1e-5 } else { 2e-3 };
        if err.is_nan() || err > tol {
            anyhow::bail!(
                "{} K={k}: equal sub-centers give loss {lk} vs K = 1 {l1} (rel {err:.2e}); not timing it",
                s.name
            );
        }
        Ok(err)
    }
}

/// The bench's correctness check before it times sub-centers: the loss of the K =
/// [`BENCH_K`] head whose sub-centers all equal the K = 1 head's class rows, relative to
/// K = 1's (SPEC 5b: equal sub-centers are the plain head), on shape `s` and `path`; an
/// error past the SPEC 8 loss tolerance of `T`. Runs on the emulated device too.
pub fn subcenter_duplicate_check<T: DeviceElem>(
    dev: &Arc<Device>,
    s: &BenchShape,
    path: HeadPath,
) -> anyhow::Result<f64> {
    SubcenterHeads::<T>::new(dev, s, path)?.duplicate_check(dev, s)
}

/// K = [`BENCH_K`] sub-centers beside K = 1 on shape `s`, both on `path`, after
/// [`subcenter_duplicate_check`]. Needs a GPU (CUDA events).
pub fn bench_subcenters<T: DeviceElem>(
    dev: &Arc<Device>,
    s: &BenchShape,
    path: HeadPath,
    reps: usize,
) -> anyhow::Result<SubcenterRow> {
    let k = BENCH_K;
    let heads = SubcenterHeads::<T>::new(dev, s, path)?;
    let err = heads.duplicate_check(dev, s)?;
    let SubcenterHeads { plain, sub, inp } = &heads;
    let run = |h: &CudaHead, w: &Tensor<T>| {
        h.forward_backward(
            &inp.x,
            w,
            &inp.labels,
            &inp.sigma,
            7,
            11,
            HeadUpstream::Scalar(1.0),
            GradDtype::Input,
        )
    };
    // Timing with independent sub-centers (the arg-max moves between them).
    let wk = Tensor::<T>::from_f32(dev, &fill(s.c * k * s.d, 5), &[s.c * k, s.d])?;
    let mut timer = Timer::new(dev)?;
    let mut measure =
        |h: &CudaHead, w: &Tensor<T>| measure_head(&mut timer, dev, s, 3, reps, h, |h| run(h, w).map(|_| ()));
    let k1 = measure(plain, &inp.w)?;
    let kk = measure(sub, &wk)?;
    Ok(SubcenterRow {
        shape: *s,
        dtype: T::DTYPE.name().into(),
        k,
        path: path.name().into(),
        time_ratio: kk.timing.median_ms / k1.timing.median_ms,
        memory_ratio: kk.extra_mib / k1.extra_mib.max(1e-9),
        k1,
        kk,
        duplicate_loss_err: err,
    })
}

fn print_row(r: &BenchRow) {
    let s = &r.shape;
    println!(
        "{:<10} {:<5} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8.1} {:>6.1}% {:>8.2}x {:>7.2}x {:>9.1} {:>9.1}",
        s.name,
        r.dtype,
        r.fused.timing.median_ms,
        r.predicted_fused_ms,
        r.reference.timing.median_ms,
        r.predicted_reference_ms,
        r.cublas_3gemm.timing.median_ms,
        r.fused.tflops,
        100.0 * r.fraction_of_peak,
        r.speedup_vs_reference,
        r.ratio_vs_3gemm,
        r.fused.extra_mib,
        r.reference.extra_mib,
    );
    let mut goals = vec![];
    let fm = r.fused.timing.median_ms;
    if let Some(lim) = r.target_limit_ms {
        goals.push(format!("1.5x TC limit {lim:.3} ms: {}", verdict(fm, lim)));
    }
    goals.push(format!(
        "{}x torch.compile ({:.3} ms): {}",
        if s.small { 20 } else { 2 },
        r.target_peer_ms,
        verdict(fm, r.target_peer_ms)
    ));
    goals.push(format!(
        "memory < CCE {:.0} MiB: {}",
        r.target_mib,
        if r.fused.extra_mib < r.target_mib {
            "met".to_string()
        } else {
            format!("missed ({:.0} MiB)", r.fused.extra_mib)
        }
    ));
    println!("{:<16} targets: {}", "", goals.join("; "));
    match (r.fused_kernels, &r.fused_tiles) {
        (FusedKernels::Attention, tiles) => {
            let (splits, per) = r.attention_splits;
            let old = match (tiles, r.predicted_tiles_ms) {
                (Some(t), Some(p)) => {
                    format!("; the tiles kernels: {:.3} ms (predicted {p:.3})", t.timing.median_ms)
                }
                _ => String::new(),
            };
            println!("{:<16} fused: attention form, {splits} class splits of {per} tiles{old}", "");
        }
        (FusedKernels::Tiles, _) => {
            let (g, sp) = r.fused_backward_grid;
            println!(
                "{:<16} fused: tiles, forward tile {} x {}, backward {}-class tiles on a {g} x {sp} grid",
                "", r.fused_forward_tile.0, r.fused_forward_tile.1, r.fused_backward_cols
            );
        }
    }
    if !r.row_split_sweep.is_empty() {
        let runs: Vec<String> =
            r.row_split_sweep.iter().map(|(s, ms, mib)| format!("S={s} {ms:.3} ms {mib:.1} MiB")).collect();
        println!("{:<16} fused row splits: {}", "", runs.join(", "));
    }
}

fn verdict(got: f64, target: f64) -> String {
    if got <= target {
        "met".into()
    } else {
        format!("missed by {:.2}x", got / target)
    }
}

/// The model's predictions for one SPEC 9 shape (bf16).
#[derive(Debug, Clone, Serialize)]
pub struct ModelRow {
    /// The shape.
    pub shape: BenchShape,
    /// Fused path, per kernel: the kernel set the dispatcher runs (`fused.kernel_set`).
    pub fused: PathModel,
    /// The tiles kernels at this shape where the fused path runs the attention form instead
    /// (for comparison; `None` where the tiles are what runs).
    pub tiles: Option<PathModel>,
    /// Reference path, per kernel.
    pub reference: PathModel,
    /// 6*B*C*D.
    pub three_gemm_flops: f64,
    /// 6*B*C*D / bf16 peak, ms.
    pub tensor_limit_ms: f64,
}

/// What `featcloud bench --model --json` writes.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    /// The device the predictions are for.
    pub device: DeviceModel,
    /// One entry per shape.
    pub rows: Vec<ModelRow>,
}

/// Prints `p`'s kernels, each row labelled `label`.
fn print_path(p: &PathModel, label: &str) {
    for k in &p.kernels {
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        println!(
            "  {:<9} {:<34} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>4} {:>5} {:<8} {:>8.4}",
            label,
            k.name,
            k.traffic.flops / 1e9,
            k.traffic.hbm_bytes / 1e6,
            k.traffic.l2_bytes / 1e6,
            opt(k.grid.map(|g| g.ctas)),
            opt(k.grid.map(|g| u64::from(g.ctas_per_sm))),
            opt(k.grid.map(|g| g.waves)),
            k.time.bound.name(),
            k.time.predicted_ms
        );
    }
}

/// Why the fused path does not run the attention form at `shape` (`plan::attn_supported`).
fn no_attention_reason(shape: HeadShape, dtype: DType, dev: &DeviceModel) -> String {
    if shape.d > plan::ATTN_DMAX {
        format!("the attention form takes D <= {}", plan::ATTN_DMAX)
    } else if shape.d > plan::ATTN_DMAX_ALL && dtype != DType::BF16 {
        format!("the attention form takes D <= {} in {}", plan::ATTN_DMAX_ALL, dtype.name())
    } else {
        format!(
            "the attention form needs more than {} bytes of shared memory per block",
            dev.max_smem_per_block
        )
    }
}

/// `featcloud bench --model`: the roofline predictions for every SPEC 9 shape, no GPU needed.
fn run_model(args: &Args) -> anyhow::Result<()> {
    let dev = DeviceModel::h200();
    println!(
        "roofline model (PREDICTIONS, not measurements; docs/PERF.md): {} SMs, HBM {} TB/s, L2 {} TB/s / {} MiB, \
         bf16 {} TFLOP/s x {} (mma.sync), f32 {} TFLOP/s, launch {} us",
        dev.sms,
        dev.hbm_tbs,
        dev.l2_tbs,
        dev.l2_bytes / (1u64 << 20) as f64,
        dev.bf16_peak_tflops,
        dev.mma_efficiency,
        dev.f32_peak_tflops,
        dev.launch_us
    );
    if perf_model::resources("fused_bwd_c128_bf16", dev.arch).is_none() {
        println!("(no ptxas table for sm_{}: built without NVRTC; 255 registers assumed)", dev.arch);
    }
    let mut rows = vec![];
    for s in SHAPES.iter().filter(|s| args.only.as_deref().is_none_or(|o| s.name.contains(o))) {
        let shape = HeadShape { b: s.b, c: s.c, d: s.d };
        let fused = perf_model::fused(shape, DType::BF16, &dev);
        let row = ModelRow {
            shape: *s,
            tiles: (fused.kernel_set != Some(FusedKernels::Tiles))
                .then(|| perf_model::tiles(shape, DType::BF16, &dev)),
            fused,
            reference: perf_model::reference(shape, DType::BF16, &dev),
            three_gemm_flops: perf_model::three_gemm_flops(shape),
            tensor_limit_ms: perf_model::tensor_limit_ms(shape, &dev),
        };
        println!("\n{} (B {}, D {}, C {}), bf16", s.name, s.b, s.d, s.c);
        println!(
            "  {:<9} {:<34} {:>9} {:>9} {:>9} {:>7} {:>4} {:>5} {:<8} {:>8}",
            "path", "kernel", "GFLOP", "HBM MB", "L2 MB", "CTAs", "/SM", "waves", "bound", "pred ms"
        );
        print_path(&row.fused, row.fused.path);
        if let Some(t) = &row.tiles {
            print_path(t, "tiles");
        }
        print_path(&row.reference, row.reference.path);
        let target = s.torch_compile_ms / if s.small { 20.0 } else { 2.0 };
        let limit = (!s.small).then(|| format!(", 1.5x tensor limit {:.3} ms", 1.5 * row.tensor_limit_ms));
        let set = row.fused.kernel_set.map_or("?", FusedKernels::name);
        let uses = match &row.tiles {
            Some(t) => format!(
                "{set} kernels, kernels/head_attn.cu; the tiles kernels, rows \"tiles\": {:.3} ms",
                t.total_ms()
            ),
            None => format!(
                "{set} kernels, kernels/head_fused.cu: {}",
                no_attention_reason(shape, DType::BF16, &dev)
            ),
        };
        println!(
            "  fused total {:.3} ms predicted ({uses}), reference {:.3} ms predicted; torch.compile {:.2} ms (SPEC 9), \
             target {:.3} ms ({}x){}",
            row.fused.total_ms(),
            row.reference.total_ms(),
            s.torch_compile_ms,
            target,
            if s.small { 20 } else { 2 },
            limit.unwrap_or_default()
        );
        println!(
            "  3-GEMM floor: 6*B*C*D = {:.2} GFLOP, / {} TFLOP/s = {:.4} ms; fused mma FLOPs {:.2} GFLOP ({:.2}x)",
            row.three_gemm_flops / 1e9,
            dev.bf16_peak_tflops,
            row.tensor_limit_ms,
            row.fused.flops() / 1e9,
            row.fused.flops() / row.three_gemm_flops
        );
        rows.push(row);
    }
    if let Some(path) = &args.json {
        crate::io::write_atomic(
            path,
            serde_json::to_string_pretty(&ModelReport { device: dev, rows })?.as_bytes(),
        )?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// Runs `featcloud bench` (with `--model`, the predictions only). Without a GPU it says so
/// and exits 0.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.model {
        return run_model(args);
    }
    let dev = match Device::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!("featcloud bench needs a CUDA GPU and found none ({e}).");
            println!("Nothing was timed. The CPU backend is benchmarked by `cargo bench` instead.");
            return Ok(());
        }
    };
    let reps = if args.quick { args.reps.min(5) } else { args.reps };
    println!("device: {} ({})", dev.info().name, dev.info().code);
    let peak_n = if args.quick { 4096 } else { 8192 };
    let (bf16_peak, _) = gemm_peak_tflops::<half::bf16>(&dev, peak_n, 2, reps.min(10))?;
    let mut peaks = vec![("bf16".to_string(), bf16_peak, peak_n)];
    println!("measured peak: bf16 {bf16_peak:.1} TFLOP/s (cuBLAS {peak_n}^3)");
    let f32_peak = if args.quick {
        None
    } else {
        let (p, _) = gemm_peak_tflops::<f32>(&dev, peak_n, 2, reps.min(10))?;
        peaks.push(("f32".to_string(), p, peak_n));
        println!("measured peak: f32 {p:.1} TFLOP/s (cuBLAS {peak_n}^3)");
        Some(p)
    };
    println!(
        "\n{:<10} {:<5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7} {:>9} {:>8} {:>9} {:>9}",
        "shape",
        "dtype",
        "fused ms",
        "predicted",
        "ref ms",
        "predicted",
        "3gemm ms",
        "TFLOP/s",
        "%peak",
        "vs ref",
        "vs 3gemm",
        "fused MiB",
        "ref MiB"
    );
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for s in SHAPES.iter() {
        if args.quick && !matches!(s.name, "reid" | "lt" | "face-93k" | "face-360k") {
            continue;
        }
        if args.only.as_deref().is_some_and(|o| !s.name.contains(o)) {
            continue;
        }
        let mut dtypes = vec![DType::BF16];
        if !args.quick && s.c < 1_000_000 && f32_peak.is_some() {
            dtypes.push(DType::F32);
        }
        for dt in dtypes {
            let res = match dt {
                DType::F32 => bench_shape::<f32>(&dev, s, reps, f32_peak.unwrap_or(bf16_peak)),
                _ => bench_shape::<half::bf16>(&dev, s, reps, bf16_peak),
            };
            match res {
                Ok(r) => {
                    print_row(&r);
                    rows.push(r);
                }
                Err(e) => {
                    println!("{:<10} {:<5} ERROR: {e}", s.name, dt.name());
                    failures.push(format!("{} {}: {e}", s.name, dt.name()));
                }
            }
        }
    }
    println!(
        "\nsub-centers (SPEC 5b): K = {BENCH_K} beside K = 1, bf16, on the fused path (what the CUDA backend \
         runs K > 1 on) and the reference path"
    );
    println!(
        "{:<10} {:<9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7}",
        "shape", "path", "K=1 ms", "K=3 ms", "ratio", "K=1 MiB", "K=3 MiB", "ratio"
    );
    let mut subcenters = Vec::new();
    for s in SHAPES.iter().filter(|s| s.name.starts_with("face")) {
        if (args.quick && s.name != "face-93k") || args.only.as_deref().is_some_and(|o| !s.name.contains(o)) {
            continue;
        }
        for path in SUBCENTER_PATHS {
            match bench_subcenters::<half::bf16>(&dev, s, path, reps) {
                Ok(r) => {
                    println!(
                        "{:<10} {:<9} {:>9.3} {:>9.3} {:>6.2}x {:>9.1} {:>9.1} {:>6.2}x",
                        s.name,
                        r.path,
                        r.k1.timing.median_ms,
                        r.kk.timing.median_ms,
                        r.time_ratio,
                        r.k1.extra_mib,
                        r.kk.extra_mib,
                        r.memory_ratio
                    );
                    subcenters.push(r);
                }
                Err(e) => {
                    println!("{:<10} {:<9} K={BENCH_K}  ERROR: {e}", s.name, path.name());
                    failures.push(format!("{} {} K={BENCH_K}: {e}", s.name, path.name()));
                }
            }
        }
    }
    let report = BenchReport { device: dev.info().name.clone(), peak_tflops: peaks, rows, subcenters };
    if let Some(path) = &args.json {
        crate::io::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("\nwrote {}", path.display());
    }
    if !failures.is_empty() {
        anyhow::bail!("{} shape(s) failed: {}", failures.len(), failures.join(" | "));
    }
    Ok(())
}
