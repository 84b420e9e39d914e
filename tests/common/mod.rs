//! Helpers shared by the emulated-device suites (`*_emu.rs`): the device, the dtype
//! dispatch macro, random inputs and error measures. Each test binary includes this
//! module (`mod common;`) and uses a part of it.
//!
//! Those suites run the real host code of `src/cuda` (row norms, `ClassStats`,
//! `CudaBackend`, `CudaHead` on both paths) on the CPU-emulated device, checked against the f64 CPU oracle, the CPU
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
//! bitwise claims between DIFFERENT kernels or code paths (the narrowing checks of head_emu.rs,
//! which compare the 16-bit gradient kernels with their f32-output twins) hold in the
//! emulator only. Bitwise claims for the same kernel and plan in any block and thread
//! order (the determinism checks) do carry over: a result that depends on the order is a
//! race on any device.
//!
//! Emulated launches are serialized by one process-wide lock, so the suite's run time is
//! the sum of its emulator time (about 30 s in release). Without the `emu` feature every
//! test prints why and returns.

// Each test binary uses a part of these helpers; the rest would warn as dead there.
#![allow(dead_code, unused_macros)]

use featcloud::cuda::{emu, Device};
use featcloud::dtype::DType;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

// ---- device and helpers ---------------------------------------------------------------------

/// An H200's SM count: what the dispatcher sees on the default emulated device.
pub const H200_SMS: i32 = 132;
pub const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// The emulated device with an H200's SM count, or `None` (with a message) when the crate
/// was built without the `emu` feature.
pub fn emulated() -> Option<Arc<Device>> {
    emulated_with(H200_SMS)
}

pub fn emulated_with(sm_count: i32) -> Option<Arc<Device>> {
    if !emu::AVAILABLE {
        eprintln!("SKIP {}: {} (run with `--features emu`)", env!("CARGO_CRATE_NAME"), emu::NOT_BUILT);
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
            featcloud::dtype::DType::F32 => {
                type $T = f32;
                $body
            }
            featcloud::dtype::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            featcloud::dtype::DType::F16 => {
                type $T = half::f16;
                $body
            }
        }
    };
}

pub fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// max |got - want|, max |want| (finite entries) and the index of the worst difference;
/// panics where finiteness differs.
pub fn max_err<G: Copy + Into<f64>>(got: &[G], want: &[f64]) -> (f64, f64, usize) {
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

pub fn rel(got: f32, want: f64) -> f64 {
    (got as f64 - want).abs() / want.abs().max(1e-30)
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|a| a.to_bits()).collect()
}

/// True when f32 `w` lies exactly halfway between two neighbours of `dt` (16-bit).
pub fn is_tie(w: f32, dt: DType) -> bool {
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
