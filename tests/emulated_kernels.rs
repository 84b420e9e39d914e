//! The real host code of `src/cuda` (row norms, `ClassStats`, `CudaBackend`, `CudaHead`
//! on both paths) on the CPU-emulated device, checked against the f64 CPU oracle, the CPU
//! backend and the `half` crate. No GPU needed.
//!
//! What runs: `Device::emulated` (cargo feature `emu`; build.rs compiles emu/device.cpp and
//! every kernels/*.cu with the host C++ compiler). Every launch is built by the same
//! planning code and goes through the same `Device::launch` as on a GPU, so the grids,
//! blocks, dynamic shared memory, argument structs, scratch reuse and dispatcher choices
//! tested here are the ones that ship; only the executor differs. The emulator runs the
//! kernels' threads as cooperative fibers with the `FC_EMU` branches of the inline PTX
//! (cvt, mma.sync, ldmatrix, cp.async), fills fresh allocations, shared memory and
//! in-flight cp.async destinations with 0xFF (NaN in every float dtype), so an element
//! read before it is written shows, and checks guard zones around every buffer after each
//! launch. cuBLAS is a host GemmEx stand-in (f32 accumulation), so the reference path
//! runs end to end. The dispatcher sees an H200's 132 SMs unless a test says otherwise;
//! `FusedTuning` sweeps the other configurations it may pick.
//!
//! What it cannot show: inter-block concurrency and memory ordering (blocks run one at a
//! time); the tensor cores' accumulation order and rounding (the emulated mma sums in f64
//! and rounds once); libdevice's math (glibc's expf, logf, acosf here); FMA contraction:
//! the emulator is built with -ffp-contract=off while NVRTC contracts (--fmad=true), so
//! bitwise claims between DIFFERENT kernels or code paths (the narrowing checks below,
//! which compare the 16-bit gradient kernels with their f32-output twins) hold in the
//! emulator only. Bitwise claims for the same kernel and plan in any block and thread
//! order (the determinism checks) do carry over: a result that depends on the order is a
//! race on any device.
//!
//! Emulated launches are serialized by one process-wide lock, so the suite's run time is
//! the sum of its emulator time (about 30 s in release). Without the `emu` feature every
//! test prints why and returns.

use featcloud::config::{CenterMode, CloudMode, Fallback, HeadConfig, Reduction, Split, StatsConfig};
use featcloud::cpu::CpuBackend;
use featcloud::cuda::backend::{CudaBackend, Precision};
use featcloud::cuda::head::verify::tolerances;
use featcloud::cuda::head::{
    backward_cols_for, backward_grid_for, forward_tile_for, fused_vectorized, FusedTuning, GradDtype, HeadOn,
    HeadPath, HeadUpstream,
};
use featcloud::cuda::stats::ClassStats;
use featcloud::cuda::{emu, norms, Device, DeviceElem, EmuOrder, Tensor};
use featcloud::dtype::DType;
use featcloud::engine::backend::{Activation, Backend, Gemm, OptimStep};
use featcloud::engine::optim::{OptimizerConfig, OptimizerKind};
use featcloud::oracle::head::{self as oracle, ForwardOutput, Gradients, HeadProblem, Region, Upstream};
use featcloud::shape::HeadShape;
use featcloud::stats::{StatsState as OracleStats, StatsState as StatsSnapshot};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

// ---- device and helpers ---------------------------------------------------------------------

/// An H200's SM count: what the dispatcher sees on the default emulated device.
const H200_SMS: i32 = 132;
const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// The emulated device with an H200's SM count, or `None` (with a message) when the crate
/// was built without the `emu` feature.
fn emulated() -> Option<Arc<Device>> {
    emulated_with(H200_SMS)
}

fn emulated_with(sm_count: i32) -> Option<Arc<Device>> {
    if !emu::AVAILABLE {
        eprintln!("SKIP emulated_kernels: {} (run with `--features emu`)", emu::NOT_BUILT);
        return None;
    }
    let dev = featcloud::cuda::test_emulated_device(sm_count);
    assert!(dev.is_some(), "the emulated device opens when the emu feature is built");
    dev
}

/// Runs `$body` with `$T` the storage type of `$dt`.
macro_rules! with_dtype {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
        }
    };
}

fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// max |got - want|, max |want| (finite entries) and the index of the worst difference;
/// panics where finiteness differs.
fn max_err<G: Copy + Into<f64>>(got: &[G], want: &[f64]) -> (f64, f64, usize) {
    assert_eq!(got.len(), want.len());
    let (mut e, mut m, mut at) = (0.0f64, 0.0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g: f64 = g.into();
        assert_eq!(g.is_finite(), w.is_finite(), "finiteness differs at {i}: {g} vs {w}");
        if w.is_finite() {
            if (g - w).abs() > e {
                (e, at) = ((g - w).abs(), i);
            }
            m = m.max(w.abs());
        }
    }
    (e, m, at)
}

fn rel(got: f32, want: f64) -> f64 {
    (got as f64 - want).abs() / want.abs().max(1e-30)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|a| a.to_bits()).collect()
}

// ---- row norms ------------------------------------------------------------------------------

/// `norms::row_norms` (norm and inverse norm) and `norms::inv_norms` (null norm output)
/// against f64, a zero row included (inv = 1 / 1e-12).
#[test]
fn row_norms_match_f64() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for dt in DTYPES {
        for (rows, d) in [(1usize, 1usize), (13, 8), (9, 13), (17, 64), (40, 300)] {
            let mut x: Vec<f32> = randn(&mut rng, rows * d, 3.0).into_iter().map(|v| dt.round(v)).collect();
            x[..d].fill(0.0);
            let (norm, inv, inv_only) = with_dtype!(dt, T => {
                let t = Tensor::<T>::from_f32(&dev, &x, &[rows, d]).unwrap();
                let (n, i) = norms::row_norms(&dev, &t).unwrap();
                let i2 = norms::inv_norms(&dev, &t).unwrap();
                (n.to_host(&dev).unwrap(), i.to_host(&dev).unwrap(), i2.to_host(&dev).unwrap())
            });
            let mut worst: f64 = 0.0;
            for i in 0..rows {
                let want = x[i * d..(i + 1) * d].iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
                let winv = 1.0 / want.max(1e-12);
                worst = worst.max((norm[i] as f64 - want).abs() / want.max(1e-30));
                worst = worst.max((inv[i] as f64 - winv).abs() / winv);
            }
            println!("row_norms {} rows={rows} d={d}: max rel err {worst:.2e}", dt.name());
            assert!(worst <= 2e-6, "{} rows={rows} d={d}: rel err {worst}", dt.name());
            assert_eq!(bits(&inv_only), bits(&inv), "{}: inv differs with norm = null", dt.name());
        }
    }
}

// ---- dtype conversions (common.cuh's to_f32 / from_f32) -------------------------------------

/// Widening to f32 through `row_norms_<T>` at D = 1: x^2 is exact in f32 for every f16 and
/// for every bf16 with |x| in [2^-63, 2^64), and the sqrt of an exact square is exact, so
/// norm == |widen(x)| bitwise (bf16 subnormals are left out: their squares underflow).
/// Returns the count of values checked.
fn check_widening<T: DeviceElem + std::fmt::Debug>(dev: &Device, v: &[T]) -> usize {
    let n = v.len();
    let t = Tensor::<T>::from_host(dev, v, &[n, 1]).unwrap();
    let (norm, inv) = norms::row_norms(dev, &t).unwrap();
    let (norm, inv) = (norm.to_host(dev).unwrap(), inv.to_host(dev).unwrap());
    for i in 0..n {
        let w = T::to_f32(v[i]);
        if w.is_nan() {
            assert!(norm[i].is_nan(), "{}: NaN {:?} widened to {}", T::NAME, v[i], norm[i]);
        } else {
            assert_eq!(
                norm[i].to_bits(),
                w.abs().to_bits(),
                "{}: {:?} widened to {:e}",
                T::NAME,
                v[i],
                norm[i]
            );
        }
        // fmaxf and f32::max both return the non-NaN operand.
        assert_eq!(
            inv[i].to_bits(),
            (1.0f32 / norm[i].max(1e-12)).to_bits(),
            "{}: inv of {:?}",
            T::NAME,
            v[i]
        );
    }
    n
}

#[test]
fn cvt_widening_bitwise() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // f16: every pattern with exponent field 0 (zeros, subnormals) or 31 (infinities, NaNs),
    // and random others (the emulator's cvt.f32.f16).
    let mut h: Vec<u16> = (0..0x400u16).chain(0x7c00..0x8000).flat_map(|b| [b, b | 0x8000]).collect();
    h.extend((0..4096).map(|_| rng.random::<u16>()));
    let hv: Vec<f16> = h.into_iter().map(f16::from_bits).collect();
    // bf16: zeros, infinities, NaNs, and random values with exponent field 64..=190.
    let mut b: Vec<u16> = vec![0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0x7f81, 0xffff];
    b.extend((0..4096).map(|_| (rng.random::<u16>() & 0x807f) | (rng.random_range(64u16..=190) << 7)));
    let bv: Vec<bf16> = b.into_iter().map(bf16::from_bits).collect();
    let nh = check_widening(&dev, &hv);
    let nb = check_widening(&dev, &bv);
    println!("cvt widening: {nh} f16 and {nb} bf16 values bitwise equal to half's (NaN: NaN)");
}

/// Narrowing f32 -> bf16 / f16 in the gradient kernels: the 16-bit gradient kernels
/// (`head_normback_bwd_<T>`, the fused backward's in-kernel dW) and their f32-output twins
/// (`head_normback32_bwd_<T>`, the fused backward's f32 dW) compute the same f32 value, so
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
            let tuning = FusedTuning { row_splits: Some(splits), ..Default::default() };
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

/// True when f32 `w` lies exactly halfway between two neighbours of `dt` (16-bit).
fn is_tie(w: f32, dt: DType) -> bool {
    if !w.is_finite() || w == 0.0 {
        return false;
    }
    let e = ((w.to_bits() >> 23) & 0xff) as i32 - 127; // f32 subnormals: -127, below both ranges
    let quantum = match dt {
        DType::F16 => 2f64.powi(e.max(-14) - 10),
        _ => 2f64.powi(e.max(-126) - 7),
    };
    (w.abs() as f64 / quantum).fract() == 0.5
}

// ---- LEAP statistics ------------------------------------------------------------------------

/// Host copy of a `ClassStats`: centers, mu, v, n, init, sigma, var_h.
#[derive(PartialEq, Debug)]
struct StatsHost {
    centers: Vec<u64>,
    mu: Vec<u64>,
    v: Vec<u64>,
    n: Vec<u64>,
    init: Vec<bool>,
    sigma: Vec<u32>,
    var_h: Option<u32>,
}

fn stats_host(dev: &Device, s: &mut ClassStats) -> (StatsHost, StatsSnapshot, Vec<f32>, Option<f32>) {
    let sigma = s.cloud_sigma(dev).unwrap().to_host(dev).unwrap();
    let var_h = s.head_variance(dev).unwrap();
    let snap = s.snapshot(dev).unwrap();
    let b64 = |v: &[f64]| v.iter().map(|a| a.to_bits()).collect::<Vec<u64>>();
    let host = StatsHost {
        centers: b64(&snap.centers),
        mu: b64(&snap.mu),
        v: b64(&snap.v),
        n: snap.n.clone(),
        init: snap.initialized.clone(),
        sigma: bits(&sigma),
        var_h: var_h.map(f32::to_bits),
    };
    (host, snap, sigma, var_h)
}

/// The emulated devices of the determinism checks: block and thread orders other than
/// ascending (`devs[0]`).
fn reordered_devices() -> Vec<Arc<Device>> {
    let orders = [(EmuOrder::Descending, EmuOrder::Random(99)), (EmuOrder::Random(5), EmuOrder::Descending)];
    orders
        .into_iter()
        .map(|(b, t)| {
            let d = Device::emulated(H200_SMS).unwrap();
            d.set_emu_order(b, t);
            d
        })
        .collect()
}

/// Three EMA updates (`ClassStats::update`: row_norms + stats_update_<T>) and the cloud
/// (stats_reduce_f32 + stats_cloud_f32) against the oracle after each, and bitwise equal
/// on devices running blocks and threads in other orders.
fn stats_case<T: DeviceElem>(devs: &[Arc<Device>], rng: &mut ChaCha8Rng, c: usize, d: usize, split: Split) {
    let cfg = StatsConfig { beta: 0.9, center: CenterMode::Ema, split, warmup_steps: 1, class_counts: None };
    let mut oracle = OracleStats::new(c, d, cfg.clone()).unwrap();
    let mut stats: Vec<ClassStats> =
        devs.iter().map(|dev| ClassStats::new(dev, c, d, cfg.clone()).unwrap()).collect();
    let mut worst = [0.0f64; 5];
    for step in 0..3 {
        let b = [1usize, 11, 20][step];
        let labels: Vec<i32> = (0..b)
            .map(|i| match i % 5 {
                0 => (c - 1) as i32,
                1 => 0,
                2 => -1,
                _ => rng.random_range(0..c as i32),
            })
            .collect();
        let mut x = randn(rng, b * d, 2.0);
        // rows of one class clustered around a direction, so angles are moderate
        for i in 0..b {
            if labels[i] >= 0 {
                x[i * d + (labels[i] as usize % d)] += 3.0;
            }
        }
        let xs: Vec<f32> = x.iter().map(|&v| T::DTYPE.round(v)).collect();
        oracle.update(&xs, &labels).unwrap();
        type Host = (StatsHost, StatsSnapshot, Vec<f32>, Option<f32>);
        let mut first: Option<Host> = None;
        for (dev, s) in devs.iter().zip(stats.iter_mut()) {
            let xt = Tensor::<T>::from_f32(dev, &xs, &[b, d]).unwrap();
            s.update(dev, &xt, &labels).unwrap();
            let (host, snap, sigma, var_h) = stats_host(dev, s);
            match &first {
                None => first = Some((host, snap, sigma, var_h)),
                Some((h0, ..)) => assert!(
                    *h0 == host,
                    "{} C={c} D={d} step {step}: statistics depend on the block / thread order",
                    T::NAME
                ),
            }
        }
        let (_, snap, sigma, var_h) = first.unwrap();
        let wc = max_err(&snap.centers, &oracle.centers).0;
        let wmu = max_err(&snap.mu, &oracle.mu).0;
        let wv = max_err(&snap.v, &oracle.v).0;
        assert_eq!(snap.n, oracle.n, "{} C={c} D={d}: counts", T::NAME);
        assert_eq!(snap.initialized, oracle.initialized, "{} C={c} D={d}: init flags", T::NAME);
        let ws = max_err(&sigma, &oracle.cloud_sigma()).0;
        let hv = oracle.head_variance();
        assert_eq!(var_h.is_some(), hv.is_some(), "{} C={c} D={d}: head class existence", T::NAME);
        let wh = (var_h.unwrap_or(0.0) as f64 - hv.unwrap_or(0.0)).abs();
        for (k, e) in [wc, wmu, wv, ws, wh].into_iter().enumerate() {
            worst[k] = worst[k].max(e);
        }
    }
    println!(
        "stats {} C={c} D={d} {split:?}: max abs err centers {:.1e} mu {:.1e} v {:.1e} sigma {:.1e} var_h {:.1e}; \
         bitwise equal in {} block/thread orders",
        T::NAME,
        worst[0],
        worst[1],
        worst[2],
        worst[3],
        worst[4],
        devs.len()
    );
    assert!(worst[0] <= 2e-6, "centers");
    assert!(worst[1] <= 2e-5 && worst[2] <= 5e-5, "moments");
    assert!(worst[4] <= 5e-5, "var_h");
    assert!(worst[3] <= 2e-3, "sigma");
}

#[test]
fn stats_update_and_cloud_match_oracle() {
    let Some(dev) = emulated() else { return };
    let mut devs = vec![dev];
    devs.extend(reordered_devices());
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for dt in DTYPES {
        for (c, d, split) in [
            (1usize, 1usize, Split::Adaptive),
            (5, 13, Split::Threshold(3)),
            (7, 64, Split::Adaptive),
            (300, 8, Split::Threshold(2)),
        ] {
            with_dtype!(dt, T => stats_case::<T>(&devs, &mut rng, c, d, split));
        }
    }
}

/// `ClassStats::update_from_angles` and `update_from_cos` (stats_angles_f32) with more than
/// 256 segments (two blocks), against the oracle and across block / thread orders.
#[test]
fn stats_angles_match_oracle() {
    let Some(dev) = emulated() else { return };
    let mut devs = vec![dev];
    devs.extend(reordered_devices());
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let c = 300usize;
    let cfg = StatsConfig {
        beta: 0.9,
        center: CenterMode::ClassWeight,
        split: Split::Adaptive,
        warmup_steps: 0,
        class_counts: None,
    };
    for is_cos in [false, true] {
        let mut oracle = OracleStats::new(c, 4, cfg.clone()).unwrap();
        let mut stats: Vec<ClassStats> =
            devs.iter().map(|dev| ClassStats::new(dev, c, 4, cfg.clone()).unwrap()).collect();
        for step in 0..2 {
            let b = 600 + step;
            let labels: Vec<i32> =
                (0..b).map(|i| if i % 7 == 3 { -1 } else { rng.random_range(0..c as i32) }).collect();
            let mut ang: Vec<f32> = (0..b)
                .map(|_| if is_cos { rng.random::<f32>() * 2.0 - 1.0 } else { rng.random::<f32>() * 3.0 })
                .collect();
            if is_cos {
                ang[0] = 1.0;
                ang[1] = -1.0;
            }
            let theta: Vec<f64> = ang
                .iter()
                .map(|&a| if is_cos { (a as f64).clamp(-1.0 + 1e-7, 1.0 - 1e-7).acos() } else { a as f64 })
                .collect();
            oracle.update_from_angles(&labels, &theta).unwrap();
            let mut first: Option<StatsHost> = None;
            for (k, (dev, s)) in devs.iter().zip(stats.iter_mut()).enumerate() {
                let t = Tensor::from_host(dev, &ang, &[b]).unwrap();
                if is_cos {
                    s.update_from_cos(dev, &labels, &t).unwrap();
                } else {
                    s.update_from_angles(dev, &labels, &t).unwrap();
                }
                let (host, snap, ..) = stats_host(dev, s);
                if k == 0 {
                    let (emu_mu, emu_v) = (max_err(&snap.mu, &oracle.mu).0, max_err(&snap.v, &oracle.v).0);
                    println!(
                        "stats_angles is_cos={is_cos} step={step}: max abs err mu {emu_mu:.1e} v {emu_v:.1e}"
                    );
                    assert!(emu_mu <= 2e-6 && emu_v <= 1e-5, "mu {emu_mu:e}, v {emu_v:e}");
                    assert_eq!(snap.n, oracle.n);
                    assert_eq!(snap.initialized, oracle.initialized);
                    first = Some(host);
                } else {
                    assert!(
                        first.as_ref() == Some(&host),
                        "is_cos={is_cos} step {step}: depends on the order"
                    );
                }
            }
        }
    }
}

// ---- training-engine ops (CudaBackend vs CpuBackend) ----------------------------------------

fn cuda_backend(dev: &Arc<Device>, precision: Precision) -> CudaBackend {
    CudaBackend::new(dev.clone(), precision).unwrap_or_else(|e| {
        panic!("CudaBackend::new on the emulated device: {e} (src/cuda/backend.rs: CudaBackend::new)")
    })
}

#[test]
fn bias_act_matches_cpu_backend() {
    let Some(dev) = emulated() else { return };
    let be = cuda_backend(&dev, Precision::F32);
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (rows, cols) in [(1usize, 1usize), (7, 13), (19, 45), (3, 70), (40, 300)] {
        for act in [Activation::Identity, Activation::Relu] {
            let y0 = randn(&mut rng, rows * cols, 2.0);
            let bias = randn(&mut rng, cols, 1.0);
            let dy0 = randn(&mut rng, rows * cols, 1.0);
            // dbias starts as garbage on both sides: it is overwritten, not accumulated
            let db0 = randn(&mut rng, cols, 5.0);
            let mut want = y0.clone();
            cpu.bias_act_forward(&mut want, &bias, act).unwrap();
            let (mut dy_want, mut db_want) = (dy0.clone(), db0.clone());
            cpu.bias_act_backward(&mut dy_want, &want, &mut db_want, act).unwrap();

            let (mut y, b) = (be.upload(&y0).unwrap(), be.upload(&bias).unwrap());
            be.bias_act_forward(&mut y, &b, act).unwrap();
            let (mut dy, mut db) = (be.upload(&dy0).unwrap(), be.upload(&db0).unwrap());
            be.bias_act_backward(&mut dy, &y, &mut db, act).unwrap();
            let what = format!("{rows}x{cols} {act:?}");
            assert_eq!(bits(&be.download(&y).unwrap()), bits(&want), "bias_act_fwd {what}");
            assert_eq!(bits(&be.download(&dy).unwrap()), bits(&dy_want), "bias_act_bwd dy {what}");
            let ulps = be
                .download(&db)
                .unwrap()
                .iter()
                .zip(&db_want)
                .map(|(a, b)| (a.to_bits() as i64 - b.to_bits() as i64).abs())
                .max()
                .unwrap();
            println!("bias_act {what}: fwd and dy bitwise equal, dbias max {ulps} ulp");
            assert!(ulps <= 1, "{what}: dbias differs by {ulps} ulp");
        }
    }
}

/// f32 -> bf16 rounding of `cast_fwd_bf16` (common.cuh's from_f32<bf16_t>), through the
/// backend's bf16 GEMM: C [n, 1] = bf16(x) [n, 1] . bf16(1) [1, 1] with k = 1 is one exact
/// product per element, so C holds the cast values (zeros lose their sign in the f32 sum).
#[test]
fn cast_bf16_matches_half() {
    let Some(dev) = emulated() else { return };
    let be = cuda_backend(&dev, Precision::Bf16);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut x: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-45,
        f32::from_bits(0x3f80_8000), // tie -> even (down)
        f32::from_bits(0x3f81_8000), // tie -> even (up)
        f32::from_bits(0x7f7f_8000), // rounds to inf
        f32::NAN,
    ];
    // exact ties at many exponents, and their neighbours
    x.extend((0..64).flat_map(|k| {
        let t = ((1 + 3 * k) << 23) | ((k & 0x7f) << 16) | 0x8000; // exponent field 1..190
        [f32::from_bits(t), f32::from_bits(t + 1), f32::from_bits(t - 1), -f32::from_bits(t)]
    }));
    x.extend(randn(&mut rng, 600, 100.0));
    x.extend((0..256).map(|_| f32::from_bits(rng.random::<u32>())));
    let n = x.len();
    let a = be.upload(&x).unwrap();
    let one = be.upload(&[1.0]).unwrap();
    let mut c = be.zeros(n).unwrap();
    let g = Gemm { trans_a: false, trans_b: false, m: n, n: 1, k: 1, alpha: 1.0, beta: 0.0 };
    be.gemm(g, &a, &one, &mut c).unwrap();
    let got = be.download(&c).unwrap();
    for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
        let w = bf16::from_f32(v).to_f32();
        if w.is_nan() {
            assert!(g.is_nan(), "cast {i}: NaN");
        } else if w == 0.0 {
            assert_eq!(g, 0.0, "cast {i}: {v:e}");
        } else {
            assert_eq!(g.to_bits(), w.to_bits(), "cast {i}: {v:e} ({:#010x})", v.to_bits());
        }
    }
    println!("cast_fwd_bf16: {n} values bitwise equal to half::bf16::from_f32 (NaN: NaN)");
}

fn optimizer_case(be: &CudaBackend, cpu: &CpuBackend, kind: OptimizerKind, n: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let opt = OptimizerConfig {
        kind,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        ..Default::default()
    };
    let hp = OptimStep { lr: 0.03, weight_decay: 0.02, t: 3 };
    let p0 = randn(&mut rng, n, 1.0);
    let g = randn(&mut rng, n, 0.5);
    let state0: Vec<Vec<f32>> =
        (0..kind.state_count()).map(|_| randn(&mut rng, n, 0.1).iter().map(|v| v.abs()).collect()).collect();
    let (mut p, mut state) = (p0.clone(), state0.clone());
    cpu.optimizer_step(&opt, hp, &mut p, &g, &mut state).unwrap();
    let mut pd = be.upload(&p0).unwrap();
    let gd = be.upload(&g).unwrap();
    let mut sd: Vec<Tensor<f32>> = state0.iter().map(|s| be.upload(s).unwrap()).collect();
    be.optimizer_step(&opt, hp, &mut pd, &gd, &mut sd).unwrap();
    assert!(
        bits(&be.download(&pd).unwrap()) == bits(&p),
        "{kind:?} n={n}: params differ from the CPU backend"
    );
    for (k, s) in state.iter().enumerate() {
        assert!(bits(&be.download(&sd[k]).unwrap()) == bits(s), "{kind:?} n={n}: state {k} differs");
    }
    println!("{kind:?}: params and state bitwise equal to the CPU backend ({n} elements)");
}

#[test]
fn optimizers_match_cpu_backend() {
    let Some(dev) = emulated() else { return };
    let be = cuda_backend(&dev, Precision::F32);
    let cpu = CpuBackend::new();
    for (i, kind) in [OptimizerKind::Sgd, OptimizerKind::AdamW].into_iter().enumerate() {
        for n in [1usize, 777] {
            optimizer_case(&be, &cpu, kind, n, 6 + i as u64);
        }
    }
}

/// The backend caps elementwise grids at 2^16 blocks of 256 threads; past 2^24 elements
/// the kernels' grid-stride loops take a second lap. One such launch (about 5 s here).
#[test]
fn optimizer_grid_stride_matches_cpu_backend() {
    let Some(dev) = emulated() else { return };
    let be = cuda_backend(&dev, Precision::F32);
    optimizer_case(&be, &CpuBackend::new(), OptimizerKind::Sgd, (1 << 24) + 777, 16);
}

// ---- margin head ----------------------------------------------------------------------------

/// One head call's inputs, already rounded to the storage dtype.
#[derive(Clone)]
struct Prob {
    shape: HeadShape,
    dtype: DType,
    x: Vec<f32>,
    w: Vec<f32>,
    labels: Vec<i32>,
    sigma: Vec<f32>,
    /// The per-row upstream, used with `Reduction::None`.
    row_g: Vec<f32>,
    seed: u64,
    step: u64,
}

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
    let hp = HeadProblem {
        shape: p.shape,
        x: &p.x,
        w: &p.w,
        labels: &p.labels,
        sigma_cloud: &p.sigma,
        seed: p.seed,
        step: p.step,
    };
    let up64: Vec<f64> = p.row_g.iter().map(|&g| g as f64).collect();
    let up = match cfg.reduction {
        Reduction::None => Upstream::PerRow(&up64),
        _ => Upstream::Scalar(1.0),
    };
    (oracle::forward(cfg, &hp).unwrap(), oracle::backward(cfg, &hp, up).unwrap())
}

/// The fused path's launch choices for one call, as `HeadOn` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FusedPlan {
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
    dx: Vec<f32>,
    dw: Vec<f32>,
    launches: u64,
    plan: FusedPlan,
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
fn run_head<T: DeviceElem>(
    dev: &Device,
    path: HeadPath,
    cfg: &HeadConfig,
    tuning: FusedTuning,
    p: &Prob,
    grad: GradDtype,
) -> HeadRun {
    assert_eq!(T::DTYPE, p.dtype);
    let HeadShape { b, c, d } = p.shape;
    let head = HeadOn::new(dev, *cfg, path).unwrap().with_tuning(tuning);
    let x = Tensor::<T>::from_f32(dev, &p.x, &[b, d]).unwrap();
    let w = Tensor::<T>::from_f32(dev, &p.w, &[c, d]).unwrap();
    let sigma = Tensor::from_host(dev, &p.sigma, &[c]).unwrap();
    let row_g = Tensor::from_host(dev, &p.row_g, &[b]).unwrap();
    let up = match cfg.reduction {
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
        dx: g.dx.to_f32_host(dev).unwrap(),
        dw: g.dw.to_f32_host(dev).unwrap(),
        launches,
        plan: FusedPlan {
            fwd: head.forward_tile(p.shape),
            cols: head.backward_cols(p.shape),
            grid: head.backward_grid(p.shape),
            vec: !tuning.scalar_loads && fused_vectorized(T::DTYPE, d),
        },
    }
}

fn run_head_dt(
    dev: &Device,
    path: HeadPath,
    cfg: &HeadConfig,
    tuning: FusedTuning,
    p: &Prob,
    grad: GradDtype,
) -> HeadRun {
    with_dtype!(p.dtype, T => run_head::<T>(dev, path, cfg, tuning, p, grad))
}

/// An explicit fused plan: forward tile, backward class tile, G, S, element loads.
fn tuning(fwd: (usize, usize), cols: usize, g: usize, s: usize, scalar: bool) -> FusedTuning {
    FusedTuning {
        forward_tile: Some(fwd),
        backward_cols: Some(cols),
        backward_ctas: Some(g),
        row_splits: Some(s),
        scalar_loads: scalar,
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
                let want = FusedPlan { fwd, cols, grid: (g, s), vec: !scalar };
                assert_eq!(r.plan, want, "the tuning was not applied as asked");
                assert_eq!(r.launches, 7 + (s > 1) as u64, "launches of the fused forward_backward");
                check_fused(&format!("fused {} {:?}", dt.name(), r.plan), cfg, &p, &fo, &go, &r);
            }
            // The dispatcher's own choice, on an H200 and on a 4-SM part.
            for (sm, dv) in [(H200_SMS as usize, &dev), (4, &dev4)] {
                let r = run_head_dt(dv, HeadPath::Fused, cfg, FusedTuning::default(), &p, GradDtype::Input);
                let want = FusedPlan {
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

/// The same call in other block and thread orders gives the same bits: any difference is a
/// race (a missing __syncthreads, a shared-memory overlap, a CTA reading another's output).
/// Three fused tile configurations (both forward row tiles and the 64 x 64 tile, both load
/// paths, G x S = 3 x 2 and 5 x 2, several class tiles per CTA), and the reference path.
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
    let configs: [(HeadPath, FusedTuning); 4] = [
        (HeadPath::Fused, tuning((128, 128), 128, 3, 2, false)),
        (HeadPath::Fused, tuning((64, 128), 64, 3, 2, true)),
        (HeadPath::Fused, tuning((64, 64), 64, 5, 2, false)),
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
/// Gradients in f32 (GradDtype::F32, the head_normback32_* kernels): the zero row's exact
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
