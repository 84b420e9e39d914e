//! Row norms (`kernels/norms.cu` through `cuda::norms`) against f64, and the widening
//! conversions of `common.cuh` (to_f32) seen through them.
//!
//! On the CPU-emulated device (cargo feature `emu`); what that shows and cannot show:
//! `tests/common/mod.rs`. Without the `emu` feature every test prints why and returns.

#[macro_use]
mod common;

use common::*;
use featcloud::cuda::{norms, Device, DeviceElem, Tensor};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
