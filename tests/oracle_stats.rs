//! The oracle's LEAP statistics (SPEC section 5) on batches whose angles are known analytically.
//!
//! Features of a class are placed symmetrically around an axis, so the batch
//! mean (hence the center) is that axis exactly, and each feature's angle to it
//! is known. The expected angles are taken from the f32 features as stored
//! (acos of the axis component over the norm), so the checks can be tight.

use featcloud::config::{CenterMode, CloudMode, HeadConfig, Split, StatsConfig};
use featcloud::error::Error;
use featcloud::oracle::head::{forward_f64, target_angles, HeadProblemF64};
use featcloud::shape::HeadShape;
use featcloud::stats::StatsState;

const D: usize = 3;

/// A feature at angle `a` from axis `axis` (0, 1 or 2), tilted toward axis `toward`
/// with sign `sign`, scaled by `r`.
fn feat(axis: usize, toward: usize, sign: f64, a: f64, r: f64) -> [f32; D] {
    let mut v = [0.0f32; D];
    v[axis] = (r * a.cos()) as f32;
    v[toward] = (sign * r * a.sin()) as f32;
    v
}

/// Angle of the stored f32 feature to unit axis `axis`, in f64.
fn angle_to_axis(v: &[f32; D], axis: usize) -> f64 {
    let n = v.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>().sqrt();
    (v[axis] as f64 / n).clamp(-1.0, 1.0).acos()
}

fn moments(angles: &[f64]) -> (f64, f64) {
    let n = angles.len() as f64;
    (angles.iter().sum::<f64>() / n, angles.iter().map(|a| a * a).sum::<f64>() / n)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * (1.0 + b.abs())
}

fn assert_vec_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g, *w), "{what}[{k}]: got {g}, want {w} (all: {got:?} vs {want:?})");
    }
}

/// Batch 1 for C = 4 classes:
/// - class 0: angles 0.2, 0.2, 0.6, 0.6 around e0 (var 0.04);
/// - class 1: angles 0.1, 0.1, 0.3, 0.3 around e1 (var 0.01);
/// - class 2: one sample (var 0); class 3: absent;
/// - two ignored rows with junk features.
struct Batch {
    x: Vec<f32>,
    labels: Vec<i32>,
    /// Expected per-class angles (from the stored f32 features).
    angles: Vec<Vec<f64>>,
}

fn batch1() -> Batch {
    let rows: Vec<(i32, [f32; D], usize)> = vec![
        (0, feat(0, 1, 1.0, 0.2, 2.0), 0),
        (1, feat(1, 0, 1.0, 0.1, 1.5), 1),
        (-1, [5.0, -7.0, 0.25], 0),
        (0, feat(0, 1, -1.0, 0.2, 2.0), 0),
        (0, feat(0, 2, 1.0, 0.6, 0.5), 0),
        (2, [0.3, -1.2, 2.0], 0),
        (1, feat(1, 0, -1.0, 0.1, 1.5), 1),
        (1, feat(1, 2, 1.0, 0.3, 3.0), 1),
        (0, feat(0, 2, -1.0, 0.6, 0.5), 0),
        (-3, [0.0, 0.0, 1.0], 0),
        (1, feat(1, 2, -1.0, 0.3, 3.0), 1),
    ];
    let mut angles = vec![Vec::new(); 4];
    for (y, v, axis) in &rows {
        if *y == 0 || *y == 1 {
            angles[*y as usize].push(angle_to_axis(v, *axis));
        }
    }
    angles[2].push(0.0);
    Batch {
        x: rows.iter().flat_map(|(_, v, _)| v.iter().copied()).collect(),
        labels: rows.iter().map(|(y, _, _)| *y).collect(),
        angles,
    }
}

fn stats_cfg(split: Split, warmup_steps: u64, class_counts: Option<Vec<u64>>) -> StatsConfig {
    StatsConfig { beta: 0.9, center: CenterMode::Ema, split, warmup_steps, class_counts }
}

/// Checks the moments after batch 1 and returns (var_0, var_1).
fn check_batch1_moments(st: &StatsState, b: &Batch) -> (f64, f64) {
    let (mu0, v0) = moments(&b.angles[0]);
    let (mu1, v1) = moments(&b.angles[1]);
    // The analytic values the f32 features approximate.
    assert!((mu0 - 0.4).abs() < 1e-6 && (v0 - 0.2).abs() < 1e-6);
    assert!((mu1 - 0.2).abs() < 1e-6 && (v1 - 0.05).abs() < 1e-6);
    assert_vec_close("mu", &st.mu[..2], &[mu0, mu1]);
    assert_vec_close("v", &st.v[..2], &[v0, v1]);
    // One sample: its own direction is the center, angle ~0.
    assert!(st.mu[2].abs() < 1e-7, "single-sample mu {}", st.mu[2]);
    assert_eq!((st.mu[3], st.v[3]), (0.0, 0.0));
    assert_eq!(st.n, vec![4, 4, 1, 0]);
    assert_eq!(st.initialized, vec![true, true, true, false]);
    assert_eq!(st.updates, 1);
    assert_vec_close("center 0", &st.centers[0..3], &[1.0, 0.0, 0.0]);
    assert_vec_close("center 1", &st.centers[3..6], &[0.0, 1.0, 0.0]);
    let n2 = (0.09f64 + 1.44 + 4.0).sqrt();
    let c2: Vec<f64> = [0.3f32, -1.2, 2.0].iter().map(|&a| a as f64 / n2).collect();
    for (got, want) in st.centers[6..9].iter().zip(&c2) {
        assert!((got - want).abs() < 1e-7, "center 2: {got} vs {want}");
    }
    assert!(st.centers[9..12].iter().all(|&a| a == 0.0));
    let var = st.variances();
    let (var0, var1) = (v0 - mu0 * mu0, v1 - mu1 * mu1);
    assert_vec_close("var", &var, &[var0, var1, 0.0, 0.0]);
    assert!((var0 - 0.04).abs() < 1e-6 && (var1 - 0.01).abs() < 1e-6);
    (var0, var1)
}

#[test]
fn threshold_split_with_running_counts() {
    let b = batch1();
    let mut st = StatsState::new(4, D, stats_cfg(Split::Threshold(4), 1, None)).expect("new");
    assert_eq!(st.cloud_sigma(), vec![0.0; 4], "warm-up: no update yet");
    st.update(&b.x, &b.labels).expect("update");
    let (var0, var1) = check_batch1_moments(&st, &b);
    // Head = initialized classes with n_k >= 4 (the boundary counts as head): classes 0 and 1.
    let var_h = (var0 + var1) / 2.0;
    assert!(close(st.head_variance().expect("head"), var_h));
    // Tail classes: 2 (var 0) and 3 (never seen, var 0); head classes get 0.
    assert_vec_close("sigma", &st.cloud_sigma(), &[0.0, 0.0, var_h.sqrt(), var_h.sqrt()]);
}

#[test]
fn threshold_split_with_dataset_counts() {
    let b = batch1();
    let counts = vec![500, 20, 5, 1000];
    let mut st = StatsState::new(4, D, stats_cfg(Split::Threshold(100), 0, Some(counts))).expect("new");
    st.update(&b.x, &b.labels).expect("update");
    let (var0, var1) = check_batch1_moments(&st, &b);
    // Head = initialized with N_k >= 100: class 0 only (class 3 is not initialized yet).
    assert!(close(st.head_variance().expect("head"), var0));
    let want = [0.0, (var0 - var1).sqrt(), var0.sqrt(), 0.0];
    assert_vec_close("sigma", &st.cloud_sigma(), &want);
}

#[test]
fn adaptive_split_with_and_without_counts() {
    let b = batch1();
    let mut st = StatsState::new(4, D, stats_cfg(Split::Adaptive, 0, None)).expect("new");
    st.update(&b.x, &b.labels).expect("update");
    let (var0, var1) = check_batch1_moments(&st, &b);
    let var_h = (4.0 * var0 + 4.0 * var1 + 1.0 * 0.0) / 9.0;
    assert!(close(st.head_variance().expect("head"), var_h));
    let want = [0.0, (var_h - var1).sqrt(), var_h.sqrt(), var_h.sqrt()];
    assert_vec_close("sigma", &st.cloud_sigma(), &want);

    let counts = vec![500, 20, 5, 1000];
    let mut st = StatsState::new(4, D, stats_cfg(Split::Adaptive, 0, Some(counts))).expect("new");
    st.update(&b.x, &b.labels).expect("update");
    let var_h = (500.0 * var0 + 20.0 * var1 + 5.0 * 0.0) / 525.0;
    assert!(close(st.head_variance().expect("head"), var_h));
    let want = [0.0, (var_h - var1).sqrt(), var_h.sqrt(), var_h.sqrt()];
    assert_vec_close("sigma", &st.cloud_sigma(), &want);
}

#[test]
fn second_update_is_an_ema_with_the_updated_center() {
    let b = batch1();
    let mut st = StatsState::new(4, D, stats_cfg(Split::Threshold(3), 0, None)).expect("new");
    st.update(&b.x, &b.labels).expect("update");
    let (mu0, v0) = (st.mu[0], st.v[0]);
    let (mu1, v1, mu2, v2) = (st.mu[1], st.v[1], st.mu[2], st.v[2]);

    // Batch 2: class 0 gets one feature along e1; class 3 appears for the first
    // time with angles +-0.5 around e2; classes 1 and 2 are absent.
    let f3a = feat(2, 0, 1.0, 0.5, 1.0);
    let f3b = feat(2, 0, -1.0, 0.5, 4.0);
    let x: Vec<f32> = [[0.0, 2.0, 0.0], f3a, [9.0, 9.0, 9.0], f3b].concat();
    st.update(&x, &[0, 3, -1, 3]).expect("update");

    let beta = 0.9f32 as f64;
    // Center: normalize(beta * e0 + (1 - beta) * e1); the angle of e1 is taken to it.
    let nc = (beta * beta + (1.0 - beta) * (1.0 - beta)).sqrt();
    assert_vec_close("center 0", &st.centers[0..3], &[beta / nc, (1.0 - beta) / nc, 0.0]);
    let a = ((1.0 - beta) / nc).acos();
    assert!(a < std::f64::consts::FRAC_PI_2 - 0.05, "the old center would give pi/2");
    assert!(close(st.mu[0], beta * mu0 + (1.0 - beta) * a));
    assert!(close(st.v[0], beta * v0 + (1.0 - beta) * a * a));
    // New class: the batch moments, not an EMA from zero.
    let (mu3, v3) = moments(&[angle_to_axis(&f3a, 2), angle_to_axis(&f3b, 2)]);
    assert!((mu3 - 0.5).abs() < 1e-6);
    assert!(close(st.mu[3], mu3) && close(st.v[3], v3));
    assert_vec_close("center 3", &st.centers[9..12], &[0.0, 0.0, 1.0]);
    // Absent classes untouched.
    assert_eq!((st.mu[1], st.v[1], st.mu[2], st.v[2]), (mu1, v1, mu2, v2));
    assert_eq!(st.n, vec![5, 4, 1, 2]);
    assert_eq!(st.initialized, vec![true; 4]);
    assert_eq!(st.updates, 2);
}

#[test]
fn warm_up_and_missing_head_give_zero_sigma() {
    let b = batch1();
    let mut st = StatsState::new(4, D, stats_cfg(Split::Threshold(3), 2, None)).expect("new");
    st.update(&b.x, &b.labels).expect("update");
    assert!(st.head_variance().is_some());
    assert_eq!(st.cloud_sigma(), vec![0.0; 4], "updates = 1 < warmup 2");
    st.update(&b.x, &b.labels).expect("update");
    assert!(st.cloud_sigma().iter().any(|&s| s > 0.0), "updates = 2: warm-up over");

    // No class reaches T = 10: no head, no cloud.
    let mut st = StatsState::new(4, D, stats_cfg(Split::Threshold(10), 0, None)).expect("new");
    st.update(&b.x, &b.labels).expect("update");
    assert_eq!(st.head_variance(), None);
    assert_eq!(st.cloud_sigma(), vec![0.0; 4]);

    // Nothing seen yet: no head in either mode.
    for split in [Split::Adaptive, Split::Threshold(1)] {
        let st = StatsState::new(4, D, stats_cfg(split, 0, None)).expect("new");
        assert_eq!(st.head_variance(), None);
        assert_eq!(st.cloud_sigma(), vec![0.0; 4]);
    }

    // A batch of ignored rows still counts as a step but changes no class.
    let mut st = StatsState::new(4, D, stats_cfg(Split::Adaptive, 0, None)).expect("new");
    st.update(&[1.0, 2.0, 3.0], &[-1]).expect("update");
    assert_eq!((st.updates, st.n.clone()), (1, vec![0; 4]));
    assert_eq!(st.initialized, vec![false; 4]);
}

#[test]
fn single_sample_class_has_zero_variance() {
    let mut st = StatsState::new(2, D, stats_cfg(Split::Adaptive, 0, None)).expect("new");
    st.update(&[0.3, -0.7, 0.2], &[1]).expect("update");
    assert_eq!(st.variances(), vec![0.0, 0.0]);
    assert!(st.mu[1].abs() < 1e-7);
    // The only initialized class has var 0, so var_h = 0 and nobody gets a cloud.
    assert_eq!(st.head_variance(), Some(0.0));
    assert_eq!(st.cloud_sigma(), vec![0.0, 0.0]);
}

#[test]
fn class_weight_center_uses_the_forward_angles() {
    let cfg = StatsConfig { center: CenterMode::ClassWeight, ..stats_cfg(Split::Threshold(2), 0, None) };
    let mut st = StatsState::new(3, D, cfg).expect("new");
    assert!(st.centers.is_empty());
    st.update_from_angles(&[0, 0, 1, -1], &[0.3, 0.5, 1.0, f64::NAN]).expect("update");
    assert_vec_close("mu", &st.mu, &[0.4, 1.0, 0.0]);
    assert_vec_close("v", &st.v, &[0.17, 1.0, 0.0]);
    assert_vec_close("var", &st.variances(), &[0.17 - 0.16, 0.0, 0.0]);
    assert_eq!(st.n, vec![2, 1, 0]);
    let var_h: f64 = 0.17 - 0.16;
    assert_vec_close("sigma", &st.cloud_sigma(), &[0.0, var_h.sqrt(), var_h.sqrt()]);
    st.update_from_angles(&[0], &[0.7]).expect("update");
    let beta = 0.9f32 as f64;
    assert!(close(st.mu[0], beta * 0.4 + (1.0 - beta) * 0.7));
    assert!(close(st.v[0], beta * 0.17 + (1.0 - beta) * 0.49));
    assert_eq!(st.updates, 2);
}

#[test]
fn class_weight_angles_from_the_head_forward() {
    // Rows at angles 0.4 and 0.8 to W_0, and 1.1 to W_1 (W rows are e0 and e1).
    let x =
        [0.4f64.cos(), 0.4f64.sin(), 0.0, 0.8f64.cos(), 0.0, 0.8f64.sin(), 1.1f64.sin(), 1.1f64.cos(), 0.0];
    let w = [2.0, 0.0, 0.0, 0.0, 0.5, 0.0];
    let labels = [0, 0, 1];
    let p = HeadProblemF64 {
        shape: HeadShape { b: 3, c: 2, d: 3 },
        x: &x,
        w: &w,
        labels: &labels,
        sigma_cloud: &[],
        seed: 0,
        step: 0,
    };
    let out =
        forward_f64(&HeadConfig { cloud: CloudMode::Off, ..HeadConfig::default() }, &p).expect("forward");
    let cfg = StatsConfig { center: CenterMode::ClassWeight, ..stats_cfg(Split::Adaptive, 0, None) };
    let mut st = StatsState::new(2, 3, cfg).expect("new");
    st.update_from_angles(&labels, &target_angles(&out.rows)).expect("update");
    assert!((st.mu[0] - 0.6).abs() < 1e-12 && (st.variances()[0] - 0.04).abs() < 1e-12);
    assert!((st.mu[1] - 1.1).abs() < 1e-12);
}

#[test]
fn wrong_update_for_the_center_mode_is_an_error() {
    let mut ema = StatsState::new(2, D, StatsConfig::default()).expect("new");
    assert!(matches!(ema.update_from_angles(&[0], &[0.5]), Err(Error::InvalidConfig(_))));
    let cw = StatsConfig { center: CenterMode::ClassWeight, ..StatsConfig::default() };
    let mut cw = StatsState::new(2, D, cw).expect("new");
    assert!(matches!(cw.update(&[1.0, 0.0, 0.0], &[0]), Err(Error::InvalidConfig(_))));
    assert_eq!((ema.updates, cw.updates), (0, 0));
}

#[test]
fn bad_config_and_inputs_are_errors() {
    let base = StatsConfig::default();
    for cfg in [
        StatsConfig { beta: 1.0, ..base.clone() },
        StatsConfig { beta: -0.1, ..base.clone() },
        StatsConfig { beta: f32::NAN, ..base.clone() },
        StatsConfig { split: Split::Threshold(0), ..base.clone() },
        StatsConfig { class_counts: Some(vec![1, 2]), ..base.clone() },
    ] {
        assert!(matches!(StatsState::new(3, D, cfg), Err(Error::InvalidConfig(_))));
    }
    assert!(matches!(StatsState::new(0, D, base.clone()), Err(Error::Empty(_))));
    assert!(matches!(StatsState::new(3, 0, base.clone()), Err(Error::Empty(_))));

    let mut st = StatsState::new(3, D, base.clone()).expect("new");
    assert!(matches!(st.update(&[1.0, 0.0], &[0]), Err(Error::Shape(_))));
    assert!(matches!(st.update(&[1.0, 0.0, 0.0], &[3]), Err(Error::LabelOutOfRange { label: 3, .. })));
    assert!(matches!(st.update(&[1.0, f32::NAN, 0.0], &[0]), Err(Error::NonFinite { index: 1, .. })));
    assert_eq!(st.updates, 0, "failed updates change nothing");
    assert_eq!(st.initialized, vec![false; 3]);

    let cw = StatsConfig { center: CenterMode::ClassWeight, ..base };
    let mut st = StatsState::new(3, D, cw).expect("new");
    assert!(matches!(st.update_from_angles(&[0, 1], &[0.5]), Err(Error::Shape(_))));
    assert!(matches!(st.update_from_angles(&[0, 5], &[0.5, 0.5]), Err(Error::LabelOutOfRange { .. })));
    assert!(matches!(
        st.update_from_angles(&[0, 1], &[0.5, f64::INFINITY]),
        Err(Error::NonFinite { index: 1, .. })
    ));
    assert_eq!(st.updates, 0);
}

// ---- sub-centers (SPEC 5b) -------------------------------------------------------------------

/// Class 0 with K = 2: rows on sub-center 0 sit at angles 0.2, 0.2 around e0, rows on
/// sub-center 1 at 0.1, 0.3 around e1 (tilted toward e2 with opposite signs, so each group's
/// mean is its axis); class 1 has one row on sub-center 1; class 2 is absent (its centers
/// stay zero). Each row is measured from its own sub-center's center, and the class's one
/// EMA step takes all its angles.
#[test]
fn subcenters_measure_each_row_from_its_own_center() {
    let rows: Vec<(i32, u32, [f32; D])> = vec![
        (0, 0, feat(0, 1, 1.0, 0.2, 1.0)),
        (0, 1, feat(1, 2, 1.0, 0.1, 2.0)),
        (-1, 7, [f32::NAN; D]), // ignored: neither its features nor its k_iy are read
        (0, 0, feat(0, 1, -1.0, 0.2, 0.5)),
        (1, 1, feat(2, 0, 1.0, 0.4, 1.0)),
        (0, 1, feat(1, 2, -1.0, 0.1, 1.0)),
    ];
    let x: Vec<f32> = rows.iter().flat_map(|r| r.2).collect();
    let labels: Vec<i32> = rows.iter().map(|r| r.0).collect();
    let k_iy: Vec<u32> = rows.iter().map(|r| r.1).collect();
    let cfg = stats_cfg(Split::Adaptive, 0, None);
    let mut st = StatsState::with_subcenters(3, 2, D, cfg).unwrap();
    st.update_subcenters(&x, &labels, &k_iy).unwrap();

    // Centers [C, K, D]: class 0 -> (e0, e1); class 1 -> (0, the one row's direction); class 2 -> zeros.
    let unit = |v: [f32; D]| {
        let n = v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
        v.map(|a| a as f64 / n).to_vec()
    };
    let c = |st: &StatsState, j: usize, k: usize| st.centers[(j * 2 + k) * D..(j * 2 + k + 1) * D].to_vec();
    assert_vec_close("class 0 sub-center 0", &c(&st, 0, 0), &[1.0, 0.0, 0.0]);
    assert_vec_close("class 0 sub-center 1", &c(&st, 0, 1), &[0.0, 1.0, 0.0]);
    assert_eq!(c(&st, 1, 0), vec![0.0; D], "a sub-center no row picked keeps zeros");
    assert_vec_close("class 1 sub-center 1", &c(&st, 1, 1), &unit(rows[4].2));
    assert!(st.centers[2 * 2 * D..].iter().all(|&v| v == 0.0), "absent class");

    // Class 0's angles: each from its own sub-center (not from a class-wide mean).
    let a0 = [
        angle_to_axis(&rows[0].2, 0),
        angle_to_axis(&rows[1].2, 1),
        angle_to_axis(&rows[3].2, 0),
        angle_to_axis(&rows[5].2, 1),
    ];
    let (mu0, v0) = moments(&a0);
    assert!(close(st.mu[0], mu0) && close(st.v[0], v0), "class 0 moments {} {}", st.mu[0], st.v[0]);
    assert!(st.mu[1].abs() < 1e-7, "class 1: one row, angle 0 to its own center");
    assert_eq!(st.n, vec![4, 1, 0]);
    assert_eq!(st.initialized, vec![true, true, false]);

    // Second batch: class 1's sub-center 0 is picked for the first time while the class is
    // initialized: the EMA branch on a zero center gives normalize(mbar) (SPEC 5b).
    let x2: Vec<f32> = feat(0, 1, 1.0, 0.0, 3.0).to_vec();
    st.update_subcenters(&x2, &[1], &[0]).unwrap();
    assert_vec_close("class 1 sub-center 0 after its first row", &c(&st, 1, 0), &[1.0, 0.0, 0.0]);
    assert_vec_close("class 1 sub-center 1 untouched", &c(&st, 1, 1), &unit(rows[4].2));
    let beta = st.cfg.beta as f64;
    assert!(close(st.mu[1], beta * 0.0 + (1.0 - beta) * 0.0) && st.n[1] == 2);
}

/// K = 1 with update_subcenters (all k_iy = 0) is `update`, bit for bit; `update` refuses
/// K > 1 (it would silently put every row on sub-center 0), and a k_iy outside 0..K, a
/// k_iy list of the wrong length and sub-center counts outside 1..=16 are errors.
#[test]
fn subcenter_updates_reduce_to_k1_and_check_their_inputs() {
    let b = batch1();
    let cfg = stats_cfg(Split::Adaptive, 0, None);
    let mut plain = StatsState::new(4, D, cfg.clone()).unwrap();
    let mut via_k = StatsState::with_subcenters(4, 1, D, cfg.clone()).unwrap();
    plain.update(&b.x, &b.labels).unwrap();
    via_k.update_subcenters(&b.x, &b.labels, &vec![0; b.labels.len()]).unwrap();
    assert_eq!(plain, via_k);

    let mut k3 = StatsState::with_subcenters(4, 3, D, cfg.clone()).unwrap();
    assert!(matches!(k3.update(&b.x, &b.labels), Err(Error::InvalidConfig(m)) if m.contains("sub-centers")));
    let mut bad = vec![0u32; b.labels.len()];
    bad[0] = 3;
    assert!(
        matches!(k3.update_subcenters(&b.x, &b.labels, &bad), Err(Error::InvalidConfig(m)) if m.contains("row 0"))
    );
    assert!(matches!(k3.update_subcenters(&b.x, &b.labels, &bad[1..]), Err(Error::Shape(_))));
    assert_eq!(k3.updates, 0, "a refused update changes nothing");
    for k in [0, 17] {
        assert!(StatsState::with_subcenters(4, k, D, cfg.clone()).is_err(), "K = {k}");
    }
}

/// Statistics files: K > 1 round-trips with its [C, K, D] centers; a K = 1 file carries no
/// `subcenters` entry, so it is byte for byte what it was before sub-centers existed.
#[test]
fn subcenter_statistics_files_round_trip() {
    let b = batch1();
    let cfg = stats_cfg(Split::Adaptive, 0, None);
    let mut k2 = StatsState::with_subcenters(4, 2, D, cfg.clone()).unwrap();
    let k_iy: Vec<u32> = (0..b.labels.len() as u32).map(|i| i % 2).collect();
    k2.update_subcenters(&b.x, &b.labels, &k_iy).unwrap();
    let bytes = k2.to_bytes().unwrap();
    assert_eq!(StatsState::from_bytes(&bytes).unwrap(), k2);
    let text = String::from_utf8_lossy(&bytes[..200.min(bytes.len())]).to_string();
    assert!(String::from_utf8_lossy(&bytes).contains("\"subcenters\""), "K = 2 is stored: {text}");

    let mut k1 = StatsState::new(4, D, cfg).unwrap();
    k1.update(&b.x, &b.labels).unwrap();
    let bytes1 = k1.to_bytes().unwrap();
    assert!(!String::from_utf8_lossy(&bytes1).contains("subcenters"));
    assert_eq!(StatsState::from_bytes(&bytes1).unwrap(), k1);
}
