//! The training-engine ops of `CudaBackend` (`kernels/train_ops.cu`: bias + activation,
//! the bf16 cast, the optimizers) against the CPU backend and the `half` crate.
//!
//! On the CPU-emulated device (cargo feature `emu`); what that shows and cannot show:
//! `tests/common/mod.rs`. Without the `emu` feature every test prints why and returns.

#[macro_use]
mod common;

use common::*;
use featcloud::cpu::CpuBackend;
use featcloud::cuda::backend::{CudaBackend, Precision};
use featcloud::cuda::{Device, Tensor};
use featcloud::engine::backend::{Activation, Backend, Gemm, OptimStep};
use featcloud::engine::optim::{OptimizerConfig, OptimizerKind};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

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
