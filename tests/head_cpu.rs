//! The CPU backend's head (`src/cpu/head.rs`) against the f64 oracle
//! (`src/oracle/head.rs`) at the SPEC section 8 f32 tolerances: loss and lse
//! relative error <= 1e-5, gradients max abs error <= 1e-4 * max |gradient|.
//! Adversarial shapes (B = 1, odd B, C = 1, D = 1, 8, 13, 512), ignored rows,
//! rows in each target-logit region, every option; bad inputs are errors.

use featcloud::cpu::head::{self, HeadProblem, Upstream};
use featcloud::oracle::head::{self as oracle, Region};
use featcloud::shape::HeadShape;
use featcloud::{CloudMode, Fallback, HeadConfig, MarginGrad, Reduction};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone)]
struct Case {
    shape: HeadShape,
    x: Vec<f32>,
    w: Vec<f32>,
    labels: Vec<i32>,
    sigma: Vec<f32>,
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Random case; every 5th row ignored when `ignore`; rows 0/1/2 (when B allows) are
/// pushed to theta ~ 0 (x = W_y), theta ~ pi (x = -W_y), and peaked logits.
fn case(b: usize, c: usize, d: usize, seed: u64, ignore: bool) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w: Vec<f32> = (0..c * d).map(|_| normal(&mut rng) * 0.7).collect();
    let mut x: Vec<f32> = (0..b * d).map(|_| normal(&mut rng) * 2.0).collect();
    let mut labels: Vec<i32> = (0..b).map(|_| rng.random_range(0..c as i32)).collect();
    if ignore {
        for (i, y) in labels.iter_mut().enumerate() {
            if i % 5 == 4 {
                *y = -1;
            }
        }
    }
    for i in 0..b.min(3) {
        let y = labels[i].max(0) as usize;
        for k in 0..d {
            let wv = w[y * d + k];
            x[i * d + k] = match i {
                0 => 3.0 * wv,
                1 => -0.5 * wv,
                _ => x[i * d + k] * 0.05 + wv,
            };
        }
    }
    let sigma: Vec<f32> = (0..c).map(|_| rng.random::<f32>() * 0.6).collect();
    Case { shape: HeadShape { b, c, d }, x, w, labels, sigma }
}

/// The call both the CPU backend and the oracle take (`cpu::head::HeadProblem` is the
/// oracle's type).
fn problem(k: &Case, step: u64) -> HeadProblem<'_> {
    HeadProblem { shape: k.shape, x: &k.x, w: &k.w, labels: &k.labels, sigma_cloud: &k.sigma, seed: 42, step }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-6)
}

fn check_grad(name: &str, got: &[f32], want: &[f64], ctx: &str) {
    let max = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs();
        if e > worst {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= 1e-4 * max + 1e-7,
        "{ctx}: {name} max abs err {worst:.3e} at {at} (got {}, want {}), max |grad| {max:.3e}",
        got[at],
        want[at]
    );
}

/// Compares forward and backward of the CPU head with the oracle for one config.
fn compare(cfg: &HeadConfig, k: &Case, step: u64, ctx: &str) -> Vec<Region> {
    let p = problem(k, step);
    let gw: Vec<f32> = (0..k.shape.b).map(|i| 0.5 + (i % 3) as f32 * 0.25).collect();
    let gw64: Vec<f64> = gw.iter().map(|&v| v as f64).collect();
    let (up, oup) = match cfg.reduction {
        Reduction::None => (Upstream::PerRow(&gw), oracle::Upstream::PerRow(&gw64)),
        _ => (Upstream::Scalar(1.5), oracle::Upstream::Scalar(1.5)),
    };
    let (f, g) = head::forward_backward(cfg, &p, up).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let want = oracle::forward(cfg, &p).unwrap();
    let wg = oracle::backward(cfg, &p, oup).unwrap();
    assert_eq!(f.n_valid, want.n_valid, "{ctx}");
    assert!(rel(f.loss, want.loss) <= 1e-5, "{ctx}: loss {} vs {}", f.loss, want.loss);
    for i in 0..k.shape.b {
        if k.labels[i] < 0 {
            continue;
        }
        assert!(rel(f.rows.lse[i] as f64, want.rows.lse[i]) <= 1e-5, "{ctx}: lse[{i}]");
        assert!(
            rel(f.rows.loss[i] as f64, want.rows.loss[i]) <= 1e-5
                || (f.rows.loss[i] as f64 - want.rows.loss[i]).abs() < 1e-5,
            "{ctx}: loss[{i}] {} vs {}",
            f.rows.loss[i],
            want.rows.loss[i]
        );
        assert!((f.rows.c_iy[i] as f64 - want.rows.c_iy[i]).abs() < 1e-6, "{ctx}: c_iy[{i}]");
        assert!((f.rows.alpha[i] as f64 - want.rows.alpha[i]).abs() < 1e-6, "{ctx}: alpha[{i}]");
        // The target's dominant sub-center (SPEC 5b; random data has no ties).
        assert_eq!(f.rows.k_iy[i], want.rows.k_iy[i], "{ctx}: k_iy[{i}]");
    }
    check_grad("dx", &g.dx, &wg.dx, ctx);
    check_grad("dw", &g.dw, &wg.dw, ctx);
    // Forward-only agrees with the fused pass bitwise.
    assert_eq!(head::forward(cfg, &p).unwrap(), f, "{ctx}: forward vs forward_backward");
    want.rows.region
}

fn configs() -> Vec<(&'static str, HeadConfig)> {
    let base = HeadConfig::default();
    vec![
        ("arcface", base),
        ("cosface", HeadConfig::cosface()),
        ("combined", HeadConfig::combined()),
        ("cloud off", HeadConfig { cloud: CloudMode::Off, ..base }),
        ("one-sided", HeadConfig { cloud: CloudMode::OneSided, ..base }),
        ("sum", HeadConfig { reduction: Reduction::Sum, ..base }),
        ("none", HeadConfig { reduction: Reduction::None, ..base }),
        ("label smoothing", HeadConfig { label_smoothing: 0.1, ..base }),
        ("straight-through", HeadConfig { margin_grad: MarginGrad::StraightThrough, ..base }),
        ("clamp", HeadConfig { fallback: Fallback::Clamp, ..base }),
        ("negative m2", HeadConfig { m2: -0.3, s: 30.0, ..base }),
        ("m1 = 1.35", HeadConfig { m1: 1.35, m2: 0.0, ..base }),
    ]
}

#[test]
fn matches_oracle_over_shapes_and_options() {
    let shapes = [
        (1, 5, 8),
        (7, 3, 13),
        (1, 1, 1),
        (5, 1, 4),
        (9, 4, 1),
        (6, 10, 8),
        (33, 17, 13),
        (4, 6, 512),
        (21, 93, 16),
    ];
    for (si, &(b, c, d)) in shapes.iter().enumerate() {
        for (name, cfg) in configs() {
            let k = case(b, c, d, 100 + si as u64, b > 4);
            compare(&cfg, &k, si as u64, &format!("B={b} C={c} D={d} {name}"));
        }
    }
}

#[test]
fn hits_every_target_region() {
    let mut seen = std::collections::HashSet::new();
    for (name, cfg) in configs() {
        for fallback in Fallback::ALL {
            let cfg = HeadConfig { fallback, ..cfg };
            let k = case(12, 7, 8, 7, true);
            for r in compare(&cfg, &k, 3, &format!("regions {name} {fallback:?}")) {
                seen.insert(format!("{r:?}"));
            }
        }
    }
    for r in ["Regular", "Fallback", "Saturated", "Ignored"] {
        assert!(seen.contains(r), "no row in region {r}: {seen:?}");
    }
}

#[test]
fn bitwise_deterministic_across_thread_counts() {
    let k = case(64, 37, 24, 9, true);
    let p = problem(&k, 5);
    let cfg = HeadConfig::default();
    let a = head::forward_backward(&cfg, &p, Upstream::Scalar(1.0)).unwrap();
    let b = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| head::forward_backward(&cfg, &p, Upstream::Scalar(1.0)).unwrap());
    assert_eq!(a, b);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.1.dx), bits(&b.1.dx));
    assert_eq!(a.0.loss.to_bits(), b.0.loss.to_bits());
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = HeadConfig::default();
    let k = case(4, 3, 5, 1, false);
    let run = |x: &[f32], w: &[f32], labels: &[i32], sigma: &[f32], shape: HeadShape, up: Upstream| {
        let p = HeadProblem { shape, x, w, labels, sigma_cloud: sigma, seed: 0, step: 0 };
        head::forward_backward(&cfg, &p, up)
    };
    let one = Upstream::Scalar(1.0);
    assert!(run(&k.x, &k.w, &[0, 1, 3, 0], &k.sigma, k.shape, one).is_err(), "label >= C");
    let mut xn = k.x.clone();
    xn[3] = f32::NAN;
    assert!(run(&xn, &k.w, &k.labels, &k.sigma, k.shape, one).is_err(), "NaN in x");
    assert!(run(&k.x[1..], &k.w, &k.labels, &k.sigma, k.shape, one).is_err(), "x too short");
    assert!(run(&k.x, &k.w, &k.labels, &[0.1, -0.2, 0.0], k.shape, one).is_err(), "negative sigma");
    assert!(run(&k.x, &k.w, &k.labels, &k.sigma[..2], k.shape, one).is_err(), "sigma length");
    let g = [1.0f32; 4];
    assert!(
        run(&k.x, &k.w, &k.labels, &k.sigma, k.shape, Upstream::PerRow(&g)).is_err(),
        "per-row with mean"
    );
    let empty = HeadShape { b: 0, c: 3, d: 5 };
    assert!(run(&[], &k.w, &[], &k.sigma, empty, one).is_err(), "B = 0");
    let bad_cfg = HeadConfig { label_smoothing: 1.0, ..cfg };
    let p = HeadProblem {
        shape: k.shape,
        x: &k.x,
        w: &k.w,
        labels: &k.labels,
        sigma_cloud: &k.sigma,
        seed: 0,
        step: 0,
    };
    assert!(head::forward(&bad_cfg, &p).is_err(), "ls = 1");
}

/// Ignored rows may hold anything (SPEC 2), on both CPU paths: NaN, +-inf and f32::MAX in
/// the x rows of ignored labels give bitwise the outputs of the same batch without those rows
/// (cloud off: the cloud's noise is keyed by the row index, so removing rows moves it) and of
/// the same batch with those rows zeroed (cloud on). Before the fix both paths refused the
/// batch ("non-finite value in x"). A NaN in a valid row is still an error naming its index.
#[test]
fn ignored_rows_may_hold_anything() {
    let (b, c, d) = (23, 17, 9);
    let clean = case(b, c, d, 5, true);
    let ignored: Vec<usize> = (0..b).filter(|&i| clean.labels[i] < 0).collect();
    assert!(ignored.len() >= 4);
    let mut poisoned = clean.clone();
    for (n, &i) in ignored.iter().enumerate() {
        let row = &mut poisoned.x[i * d..(i + 1) * d];
        match n % 4 {
            0 => row.fill(f32::NAN),
            1 => (row[0], row[d - 1]) = (f32::INFINITY, f32::NEG_INFINITY),
            2 => row.fill(f32::MAX),
            _ => row[d / 2] = f32::NAN,
        }
    }
    let mut zeroed = clean.clone();
    for &i in &ignored {
        zeroed.x[i * d..(i + 1) * d].fill(0.0);
    }
    let keep: Vec<usize> = (0..b).filter(|&i| clean.labels[i] >= 0).collect();
    let removed = Case {
        shape: HeadShape { b: keep.len(), c, d },
        x: keep.iter().flat_map(|&i| clean.x[i * d..(i + 1) * d].to_vec()).collect(),
        labels: keep.iter().map(|&i| clean.labels[i]).collect(),
        ..clean.clone()
    };
    let up = Upstream::Scalar(1.3);
    let rows_of = |dx: &[f32]| -> Vec<u32> {
        keep.iter().flat_map(|&i| dx[i * d..(i + 1) * d].to_vec()).map(f32::to_bits).collect()
    };
    let rows_of64 = |dx: &[f64]| -> Vec<u64> {
        keep.iter().flat_map(|&i| dx[i * d..(i + 1) * d].to_vec()).map(f64::to_bits).collect()
    };
    let bits = |v: &[f32]| -> Vec<u32> { v.iter().map(|a| a.to_bits()).collect() };
    let bits64 = |v: &[f64]| -> Vec<u64> { v.iter().map(|a| a.to_bits()).collect() };
    for cloud in [CloudMode::Off, CloudMode::OneSided] {
        let cfg = HeadConfig { cloud, label_smoothing: 0.1, fallback: Fallback::Clamp, ..Default::default() };
        let reference = if cloud == CloudMode::Off { &removed } else { &zeroed };
        let compact = cloud == CloudMode::Off;
        // The CPU backend.
        let (f, g) = head::forward_backward(&cfg, &problem(&poisoned, 3), up).unwrap();
        let (rf, rg) = head::forward_backward(&cfg, &problem(reference, 3), up).unwrap();
        assert_eq!(f.loss.to_bits(), rf.loss.to_bits(), "cpu {cloud:?}: loss");
        assert_eq!(bits(&g.dw), bits(&rg.dw), "cpu {cloud:?}: dW");
        if compact {
            assert_eq!(rows_of(&g.dx), bits(&rg.dx), "cpu {cloud:?}: dx of the valid rows");
        } else {
            assert_eq!(bits(&g.dx), bits(&rg.dx), "cpu {cloud:?}: dx");
        }
        for &i in &ignored {
            assert!(
                g.dx[i * d..(i + 1) * d].iter().all(|&v| v == 0.0),
                "cpu {cloud:?}: dx of ignored row {i}"
            );
        }
        // The oracle.
        let f = oracle::forward(&cfg, &problem(&poisoned, 3)).unwrap();
        let rf = oracle::forward(&cfg, &problem(reference, 3)).unwrap();
        assert_eq!(f.loss.to_bits(), rf.loss.to_bits(), "oracle {cloud:?}: loss");
        let g = oracle::backward(&cfg, &problem(&poisoned, 3), oracle::Upstream::Scalar(1.3)).unwrap();
        let rg = oracle::backward(&cfg, &problem(reference, 3), oracle::Upstream::Scalar(1.3)).unwrap();
        assert_eq!(bits64(&g.dw), bits64(&rg.dw), "oracle {cloud:?}: dW");
        if compact {
            assert_eq!(rows_of64(&g.dx), bits64(&rg.dx), "oracle {cloud:?}: dx of the valid rows");
        } else {
            assert_eq!(bits64(&g.dx), bits64(&rg.dx), "oracle {cloud:?}: dx");
        }
    }
    // A non-finite value in a valid row is still refused, with its flat index.
    let mut bad = clean.clone();
    let row = keep[1];
    bad.x[row * d + 2] = f32::NAN;
    let cfg = HeadConfig::default();
    let err = head::forward(&cfg, &problem(&bad, 0)).unwrap_err().to_string();
    assert_eq!(err, format!("non-finite value in x at index {}", row * d + 2));
    let err = oracle::forward(&cfg, &problem(&bad, 0)).unwrap_err().to_string();
    assert_eq!(err, format!("non-finite value in x at index {}", row * d + 2));
}

/// Issue 13's f32 precision case and its neighbours (`verify::cancellation_problem`: B = 1,
/// classes evenly around a circle, the row opposite its class, D = 2, 3, 8, C = 100 to 3000,
/// both fallbacks, |x| from 0.1 to 100): the CPU backend's gradients stay within SPEC 8's f32
/// tolerance with its rounding floor (`verify::f32_floors`). The floor is needed (without it
/// many of these fail 1e-4 of max |dx|: the row's dx nearly cancels) and not slack (the worst
/// error beyond 1e-4 of max is more than 1/64 of the floor).
#[test]
fn f32_cancellation_stays_within_the_floor() {
    use featcloud::cuda::head::verify::{cancellation_problem, f32_floors};
    let (mut n, mut without_floor, mut worst) = (0, 0, 0.0f64);
    for c in [100usize, 1000, 3000] {
        for d in [2usize, 3, 8] {
            for seed in 0..8u64 {
                let jitter = [0.0, 1e-3, 0.3][seed as usize % 3];
                let x_norm = 10f64.powf(-1.0 + 3.0 * seed as f64 / 7.0);
                let p = cancellation_problem(c, d, jitter, x_norm, seed + 10 * c as u64);
                for fallback in Fallback::ALL {
                    let cfg = HeadConfig { cloud: CloudMode::Off, fallback, ..Default::default() };
                    let hp = p.head_problem();
                    let fo = oracle::forward(&cfg, &hp).unwrap();
                    let go = oracle::backward(&cfg, &hp, oracle::Upstream::Scalar(1.0)).unwrap();
                    let (_, g) = head::forward_backward(&cfg, &hp, Upstream::Scalar(1.0)).unwrap();
                    let (fx, fw) = f32_floors(&cfg, &p, &fo);
                    for (got, want, floors) in [(&g.dx, &go.dx, &fx), (&g.dw, &go.dw, &fw)] {
                        let max = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                        for (k, (&a, &b)) in got.iter().zip(want.iter()).enumerate() {
                            let err = (a as f64 - b).abs();
                            let floor = floors[k / d];
                            assert!(
                                err <= 1e-4 * max + floor,
                                "C={c} D={d} seed={seed} {fallback:?}: err {err:e} > 1e-4 * {max:e} + {floor:e}"
                            );
                            if err > 1e-4 * max {
                                without_floor += 1;
                                worst = worst.max((err - 1e-4 * max) / floor);
                            }
                        }
                    }
                    n += 1;
                }
            }
        }
    }
    println!("{n} cases: {without_floor} gradient elements need the floor; worst excess {worst:.3} of it");
    assert!(without_floor > 0, "the family no longer cancels: it tests nothing");
    assert!(worst > 1.0 / 64.0, "the floor is far above every error ({worst:e} of it)");
}

/// Sub-centers (SPEC 5b): K = 2, 3, 4 against the oracle at the same tolerances, over the
/// option sets, with rows at theta ~ 0 and ~ pi to one of their class's sub-centers.
#[test]
fn subcenters_match_oracle() {
    let mut picked = std::collections::BTreeSet::new();
    for (si, &(b, c, d)) in [(1, 5, 8), (7, 3, 13), (33, 17, 13), (4, 6, 512), (21, 9, 16)].iter().enumerate()
    {
        for k in [2usize, 3, 4] {
            // A case over C*K rows of W, then each label mapped to its class: rows 0..2 lie
            // on (or against) one sub-center of their class.
            let mut kc = case(b, c * k, d, 300 + si as u64 * 7 + k as u64, b > 4);
            kc.labels.iter_mut().filter(|y| **y >= 0).for_each(|y| *y /= k as i32);
            kc.shape = HeadShape { b, c, d };
            kc.sigma.truncate(c);
            for (name, cfg) in configs() {
                let cfg = HeadConfig { subcenters: k as u32, ..cfg };
                compare(&cfg, &kc, si as u64, &format!("B={b} C={c} K={k} D={d} {name}"));
                let p = problem(&kc, si as u64);
                picked.extend(oracle::forward(&cfg, &p).unwrap().rows.k_iy.iter().copied());
            }
        }
    }
    // The k_iy checks above compare more than zeros: targets land on every sub-center.
    assert!((0..4).all(|k| picked.contains(&k)), "target sub-centers seen: {picked:?}");
}
