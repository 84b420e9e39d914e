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
