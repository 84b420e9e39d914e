//! LEAP class statistics (`cuda::stats::ClassStats`, `kernels/stats.cu`) against the f64
//! oracle and the statistics file, in several block and thread orders.
//!
//! On the CPU-emulated device (cargo feature `emu`); what that shows and cannot show:
//! `tests/common/mod.rs`. Without the `emu` feature every test prints why and returns.

#[macro_use]
mod common;

use common::*;
use featcloud::config::{CenterMode, Split, StatsConfig};
use featcloud::cuda::stats::ClassStats;
use featcloud::cuda::{Device, DeviceElem, EmuOrder, Tensor};
use featcloud::stats::StatsState;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

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

fn stats_host(dev: &Device, s: &mut ClassStats) -> (StatsHost, StatsState, Vec<f32>, Option<f32>) {
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

/// The emulated devices of the determinism checks: the default one (`devs[0]`, ascending
/// orders) and two running blocks and threads in other orders; `None` without `emu`.
fn devices_in_several_orders() -> Option<Vec<Arc<Device>>> {
    let orders = [(EmuOrder::Descending, EmuOrder::Random(99)), (EmuOrder::Random(5), EmuOrder::Descending)];
    let reordered = orders.into_iter().map(|(b, t)| {
        let d = Device::emulated(H200_SMS).unwrap();
        d.set_emu_order(b, t);
        d
    });
    Some(std::iter::once(emulated()?).chain(reordered).collect())
}

/// Three EMA updates (`ClassStats::update`: row_norms + stats_update_<T>) and the cloud
/// (stats_reduce_f32 + stats_cloud_f32) against the oracle after each, and bitwise equal
/// on devices running blocks and threads in other orders.
fn stats_case<T: DeviceElem>(devs: &[Arc<Device>], rng: &mut ChaCha8Rng, c: usize, d: usize, split: Split) {
    let cfg = StatsConfig { beta: 0.9, center: CenterMode::Ema, split, warmup_steps: 1, class_counts: None };
    let mut oracle = StatsState::new(c, d, cfg.clone()).unwrap();
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
        type Host = (StatsHost, StatsState, Vec<f32>, Option<f32>);
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
    assert_stats_errors(&format!("{} C={c} D={d} {split:?}", T::NAME), worst, devs.len());
}

/// Prints and checks the worst absolute errors against the oracle over a sweep: centers,
/// mu, v, sigma_cloud and var_h, in that order (`orders`: the block / thread orders every
/// result was bitwise equal in).
fn assert_stats_errors(what: &str, worst: [f64; 5], orders: usize) {
    println!(
        "stats {what}: max abs err centers {:.1e} mu {:.1e} v {:.1e} sigma {:.1e} var_h {:.1e}; \
         bitwise equal in {orders} block/thread orders",
        worst[0], worst[1], worst[2], worst[3], worst[4]
    );
    assert!(worst[0] <= 2e-6, "{what}: centers");
    assert!(worst[1] <= 2e-5 && worst[2] <= 5e-5, "{what}: moments");
    assert!(worst[4] <= 5e-5, "{what}: var_h");
    assert!(worst[3] <= 2e-3, "{what}: sigma");
}

#[test]
fn stats_update_and_cloud_match_oracle() {
    let Some(devs) = devices_in_several_orders() else { return };
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
    let Some(devs) = devices_in_several_orders() else { return };
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
        let mut oracle = StatsState::new(c, 4, cfg.clone()).unwrap();
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

// ---- sub-centers (SPEC 5b) ---------------------------------------------------------------------

/// Long-tailed labels with ignored rows (`synthetic_batch`) and each valid row's target
/// sub-center k*_iy drawn from 0..K-1, so that sub-center K-1 is never picked and its center
/// stays zero; ignored rows get an out-of-range k*_iy, which must not be read.
fn subcenter_batch<T: DeviceElem>(
    rng: &mut ChaCha8Rng,
    step: u64,
    b: usize,
    c: usize,
    k: usize,
    d: usize,
) -> (Vec<f32>, Vec<i32>, Vec<u32>) {
    let (x, labels) = featcloud::cuda::stats::synthetic_batch(500 + step, b, c, d, T::DTYPE);
    let k_iy = labels
        .iter()
        .map(|&y| if y < 0 { 1000 } else { rng.random_range(0..(k - 1).max(1)) as u32 })
        .collect();
    (x, labels, k_iy)
}

/// EMA statistics with K sub-centers per class (`ClassStats::update_subcenters`: stats_update
/// over (class, sub-center) keys writing the rows' angles, then stats_angles folding them into
/// the class moments) against `StatsState::update_subcenters` after every step: centers
/// [C, K, D] (never-picked sub-centers exactly zero on both), mu, v, exact counts and flags,
/// sigma and var_h; bitwise equal in three block / thread orders; a statistics file round trip
/// and an import of the oracle's state continue with the same results.
#[test]
fn stats_subcenters_match_oracle() {
    let Some(devs) = devices_in_several_orders() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let dir = tempfile::tempdir().unwrap();
    for dt in [featcloud::dtype::DType::F32, featcloud::dtype::DType::BF16] {
        for (c, k, d, split) in [
            (1usize, 2usize, 1usize, Split::Adaptive),
            (5, 3, 13, Split::Threshold(3)),
            (40, 4, 64, Split::Adaptive),
            (300, 2, 8, Split::Threshold(2)),
        ] {
            with_dtype!(dt, T => subcenter_case::<T>(&devs, &mut rng, c, k, d, split, dir.path()));
        }
    }
}

fn subcenter_case<T: DeviceElem>(
    devs: &[Arc<Device>],
    rng: &mut ChaCha8Rng,
    c: usize,
    k: usize,
    d: usize,
    split: Split,
    dir: &std::path::Path,
) {
    let cfg = StatsConfig { beta: 0.9, center: CenterMode::Ema, split, warmup_steps: 1, class_counts: None };
    let mut oracle = StatsState::with_subcenters(c, k, d, cfg.clone()).unwrap();
    let mut stats: Vec<ClassStats> =
        devs.iter().map(|dev| ClassStats::with_subcenters(dev, c, k, d, cfg.clone()).unwrap()).collect();
    let what = format!("{} C={c} K={k} D={d} {split:?}", T::NAME);
    let mut worst = [0.0f64; 5];
    for step in 0..4u64 {
        let b = [1usize, 17, 64, 40][step as usize];
        let (x, labels, k_iy) = subcenter_batch::<T>(rng, step, b, c, k, d);
        oracle.update_subcenters(&x, &labels, &k_iy).unwrap();
        let mut first: Option<(StatsHost, StatsState, Vec<f32>, Option<f32>)> = None;
        for (dev, s) in devs.iter().zip(stats.iter_mut()) {
            let xt = Tensor::<T>::from_f32(dev, &x, &[b, d]).unwrap();
            s.update_subcenters(dev, &xt, &labels, &k_iy).unwrap();
            let got = stats_host(dev, s);
            match &first {
                None => first = Some(got),
                Some((h0, ..)) => {
                    assert!(*h0 == got.0, "{what} step {step}: depends on the block / thread order")
                }
            }
        }
        let (_, snap, sigma, var_h) = first.unwrap();
        assert_eq!((snap.subcenters, snap.centers.len()), (k, c * k * d), "{what}: centers [C, K, D]");
        assert_eq!(snap.n, oracle.n, "{what} step {step}: counts");
        assert_eq!(snap.initialized, oracle.initialized, "{what} step {step}: init flags");
        let hv = oracle.head_variance();
        assert_eq!(var_h.is_some(), hv.is_some(), "{what}: head class existence");
        let errs = [
            max_err(&snap.centers, &oracle.centers).0,
            max_err(&snap.mu, &oracle.mu).0,
            max_err(&snap.v, &oracle.v).0,
            max_err(&sigma, &oracle.cloud_sigma()).0,
            (var_h.unwrap_or(0.0) as f64 - hv.unwrap_or(0.0)).abs(),
        ];
        for (w, e) in worst.iter_mut().zip(errs) {
            *w = w.max(e);
        }
        // A sub-center no row picked holds zeros on both sides (k = K-1 is never drawn).
        if k > 1 {
            for y in 0..c {
                let row = (y * k + k - 1) * d;
                assert!(
                    snap.centers[row..row + d].iter().all(|&v| v == 0.0),
                    "{what}: class {y} sub-center {}",
                    k - 1
                );
            }
        }
    }
    assert_stats_errors(&what, worst, devs.len());

    // A statistics file round trip keeps K and every bit; a reloaded state and the oracle's
    // state imported on the device take one more step like the original.
    let dev = &devs[0];
    let path = dir.join(format!("{}_{c}_{k}_{d}.safetensors", T::NAME));
    stats[0].save(dev, &path).unwrap();
    let mut loaded = ClassStats::load(dev, &path).unwrap();
    assert_eq!(loaded.subcenters(), k, "{what}: K after a load");
    assert!(stats_host(dev, &mut loaded).0 == stats_host(dev, &mut stats[0]).0, "{what}: file round trip");
    let mut imported = ClassStats::from_snapshot(dev, &oracle).unwrap();
    let (x, labels, k_iy) = subcenter_batch::<T>(rng, 9, 33, c, k, d);
    let xt = Tensor::<T>::from_f32(dev, &x, &[33, d]).unwrap();
    for s in [&mut stats[0], &mut loaded, &mut imported] {
        s.update_subcenters(dev, &xt, &labels, &k_iy).unwrap();
    }
    assert!(stats_host(dev, &mut loaded).0 == stats_host(dev, &mut stats[0]).0, "{what}: step after a load");
    oracle.update_subcenters(&x, &labels, &k_iy).unwrap();
    let snap = imported.snapshot(dev).unwrap();
    assert!(max_err(&snap.centers, &oracle.centers).0 <= 2e-6, "{what}: step after an import");
    assert!(max_err(&snap.mu, &oracle.mu).0 <= 2e-5, "{what}: step after an import (mu)");
}

/// With K = 1, `update_subcenters` is `update` (same launches, same bits), and the sub-center
/// path refuses what it cannot take: a valid row's k*_iy >= K, a k*_iy of the wrong length and
/// `update` without k*_iy at K > 1 are errors that change nothing; K = 0 or above the maximum
/// is refused at construction.
#[test]
fn stats_subcenters_k1_and_bad_inputs() {
    let Some(dev) = emulated() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    let cfg = StatsConfig { warmup_steps: 0, split: Split::Adaptive, ..StatsConfig::default() };
    let (c, d) = (30usize, 12usize);
    let mut plain = ClassStats::new(&dev, c, d, cfg.clone()).unwrap();
    let mut k1 = ClassStats::with_subcenters(&dev, c, 1, d, cfg.clone()).unwrap();
    for step in 0..3 {
        let (x, labels, _) = subcenter_batch::<f32>(&mut rng, step, 50, c, 2, d);
        let zeros: Vec<u32> = labels.iter().map(|&y| if y < 0 { 7 } else { 0 }).collect();
        let xt = Tensor::<f32>::from_host(&dev, &x, &[50, d]).unwrap();
        plain.update(&dev, &xt, &labels).unwrap();
        k1.update_subcenters(&dev, &xt, &labels, &zeros).unwrap();
        assert!(stats_host(&dev, &mut plain).0 == stats_host(&dev, &mut k1).0, "K = 1 step {step}");
    }

    let k = 3;
    let mut s = ClassStats::with_subcenters(&dev, c, k, d, cfg.clone()).unwrap();
    let (x, labels, mut k_iy) = subcenter_batch::<f32>(&mut rng, 5, 50, c, k, d);
    let xt = Tensor::<f32>::from_host(&dev, &x, &[50, d]).unwrap();
    let before = stats_host(&dev, &mut s).0;
    let valid = labels.iter().position(|&y| y >= 0).unwrap();
    k_iy[valid] = k as u32;
    let e = s.update_subcenters(&dev, &xt, &labels, &k_iy).unwrap_err().to_string();
    assert!(e.contains(&format!("row {valid}")) && e.contains("sub-center"), "{e}");
    let e = s.update_subcenters(&dev, &xt, &labels, &k_iy[1..]).unwrap_err().to_string();
    assert!(e.contains("k_iy"), "{e}");
    let e = s.update(&dev, &xt, &labels).unwrap_err().to_string();
    assert!(e.contains("update_subcenters"), "{e}");
    let mut bad_label = labels.clone();
    bad_label[valid] = c as i32;
    k_iy[valid] = 0;
    assert!(matches!(
        s.update_subcenters(&dev, &xt, &bad_label, &k_iy),
        Err(featcloud::Error::LabelOutOfRange { .. })
    ));
    assert!(stats_host(&dev, &mut s).0 == before, "a refused update changed the state");
    assert_eq!(s.updates(), 0);
    for bad_k in [0, featcloud::config::MAX_SUBCENTERS as usize + 1] {
        assert!(ClassStats::with_subcenters(&dev, c, bad_k, d, cfg.clone()).is_err(), "K = {bad_k}");
    }
}
