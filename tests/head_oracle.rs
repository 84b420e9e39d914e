//! The CPU oracle head (SPEC sections 3 and 4) against hand-computed values and
//! central finite differences of its own forward.
//!
//! Gradient checks run in f64 on inputs built so that each row's target angle
//! (hence its target-logit region) is known, with a scale small enough that the
//! target column's softmax gradient is not negligible (asserted), so a wrong
//! dt_i cannot hide.

use featcloud::config::{CloudMode, Fallback, HeadConfig, MarginGrad, Reduction};
use featcloud::error::Error;
use featcloud::oracle::head::{
    backward, backward_f64, dx_attention_form_f64, forward, forward_f64, target_angles, ForwardOutput,
    Gradients, HeadProblem, HeadProblemF64, Region, Upstream,
};
use featcloud::oracle::philox::cloud_normal;
use featcloud::shape::HeadShape;
use std::f64::consts::PI;

// ---------------------------------------------------------------- helpers

/// splitmix64: a tiny deterministic generator so the tests need no RNG crate.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Owned inputs of one head call.
#[derive(Clone, Debug)]
struct Case {
    shape: HeadShape,
    x: Vec<f64>,
    w: Vec<f64>,
    labels: Vec<i32>,
    sigma: Vec<f32>,
    seed: u64,
    step: u64,
}

impl Case {
    fn p64(&self) -> HeadProblemF64<'_> {
        let Case { shape, x, w, labels, sigma, seed, step } = self;
        HeadProblemF64 { shape: *shape, x, w, labels, sigma_cloud: sigma, seed: *seed, step: *step }
    }
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|a| a * a).sum::<f64>().sqrt()
}

/// Random W (row norms in [0.5, 2]); row i of x makes angle `angles[i]` with
/// W_{y_i} (norm in [0.5, 3]); rows with a negative label get random features.
fn build_case(c: usize, d: usize, labels: &[i32], angles: &[f64], seed: u64) -> Case {
    assert!(d >= 2 && labels.len() == angles.len());
    let b = labels.len();
    let mut rng = Rng(seed);
    let mut w = vec![0.0; c * d];
    for j in 0..c {
        let row: Vec<f64> = (0..d).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let scale = rng.uniform(0.5, 2.0) / norm(&row);
        for k in 0..d {
            w[j * d + k] = row[k] * scale;
        }
    }
    let mut x = vec![0.0; b * d];
    for i in 0..b {
        let r = rng.uniform(0.5, 3.0);
        let mut u: Vec<f64> = (0..d).map(|_| rng.uniform(-1.0, 1.0)).collect();
        if labels[i] >= 0 {
            let y = labels[i] as usize;
            let wy: Vec<f64> =
                w[y * d..(y + 1) * d].iter().map(|a| a / norm(&w[y * d..(y + 1) * d])).collect();
            let proj: f64 = u.iter().zip(&wy).map(|(a, b)| a * b).sum();
            for k in 0..d {
                u[k] -= proj * wy[k];
            }
            let nu = norm(&u);
            let th = angles[i];
            for k in 0..d {
                x[i * d + k] = r * (th.cos() * wy[k] + th.sin() * u[k] / nu);
            }
        } else {
            for k in 0..d {
                x[i * d + k] = r * u[k];
            }
        }
    }
    Case {
        shape: HeadShape { b, c, d },
        x,
        w,
        labels: labels.to_vec(),
        sigma: vec![0.0; c],
        seed: 11,
        step: 5,
    }
}

/// The scalar whose gradient `backward_f64` returns for upstream `g`.
fn objective(cfg: &HeadConfig, case: &Case, g: &[f64]) -> f64 {
    let out = forward_f64(cfg, &case.p64()).expect("forward");
    match cfg.reduction {
        Reduction::None => out.rows.loss.iter().zip(g).map(|(l, gi)| l * gi).sum(),
        Reduction::Mean | Reduction::Sum => g[0] * out.loss,
    }
}

fn upstream<'a>(cfg: &HeadConfig, g: &'a [f64]) -> Upstream<'a> {
    match cfg.reduction {
        Reduction::None => Upstream::PerRow(g),
        Reduction::Mean | Reduction::Sum => Upstream::Scalar(g[0]),
    }
}

/// Central differences of `f` over every entry of x and of W.
fn finite_differences(case: &Case, f: &dyn Fn(&Case) -> f64) -> Gradients {
    let h = 1e-6;
    let mut fd = Gradients { dx: vec![0.0; case.x.len()], dw: vec![0.0; case.w.len()] };
    for k in 0..case.x.len() {
        let mut plus = case.clone();
        plus.x[k] += h;
        let mut minus = case.clone();
        minus.x[k] -= h;
        fd.dx[k] = (f(&plus) - f(&minus)) / (2.0 * h);
    }
    for k in 0..case.w.len() {
        let mut plus = case.clone();
        plus.w[k] += h;
        let mut minus = case.clone();
        minus.w[k] -= h;
        fd.dw[k] = (f(&plus) - f(&minus)) / (2.0 * h);
    }
    fd
}

/// Max |a - b| <= tol * max |a|, with the worst index in the message.
fn assert_close_rel(what: &str, analytic: &[f64], reference: &[f64], tol: f64) {
    let scale = analytic.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1e-6, "{what}: gradient is (nearly) zero, the check would test nothing");
    let (mut worst, mut at) = (0.0f64, 0);
    for (k, (a, r)) in analytic.iter().zip(reference).enumerate() {
        if (a - r).abs() > worst {
            worst = (a - r).abs();
            at = k;
        }
    }
    assert!(
        worst <= tol * scale,
        "{what}: max abs error {worst:e} at {at} (analytic {}, reference {}), max |grad| {scale:e}",
        analytic[at],
        reference[at]
    );
}

/// Every valid row's target column must carry gradient, or a wrong dt_i would pass.
fn assert_target_gradient_live(cfg: &HeadConfig, out: &ForwardOutput, c: usize) {
    let s = cfg.s as f64;
    let ls = cfg.label_smoothing as f64;
    for (i, r) in out.rows.region.iter().enumerate() {
        if *r == Region::Ignored {
            continue;
        }
        let p_y = (s * out.rows.t[i] - out.rows.lse[i]).exp();
        let q_y = 1.0 - ls + ls / c as f64;
        assert!((p_y - q_y).abs() > 1e-3, "row {i}: p_y - q_y = {} is too small to test dt", p_y - q_y);
    }
}

/// Gradcheck of backward_f64 against central differences of forward_f64.
fn gradcheck(cfg: &HeadConfig, case: &Case, g: &[f64]) -> ForwardOutput {
    let out = forward_f64(cfg, &case.p64()).expect("forward");
    assert_target_gradient_live(cfg, &out, case.shape.c);
    let an = backward_f64(cfg, &case.p64(), upstream(cfg, g)).expect("backward");
    let fd = finite_differences(case, &|cs| objective(cfg, cs, g));
    assert_close_rel("dx", &an.dx, &fd.dx, 1e-6);
    assert_close_rel("dW", &an.dw, &fd.dw, 1e-6);
    out
}

fn cfg_with(base: HeadConfig, s: f32) -> HeadConfig {
    HeadConfig { s, cloud: CloudMode::Off, ..base }
}

fn assert_regions(out: &ForwardOutput, expected: &[Region]) {
    assert_eq!(out.rows.region, expected);
}

/// [`gradcheck`] with a unit upstream, then [`assert_regions`]: the regions are what
/// makes each gradient check test the branch it is named for.
fn gradcheck_regions(cfg: &HeadConfig, case: &Case, expected: &[Region]) -> ForwardOutput {
    let out = gradcheck(cfg, case, &[1.0]);
    assert_regions(&out, expected);
    out
}

use Region::{Fallback as Fb, Ignored as Ig, Regular as Rg, Saturated as Sat};

// ---------------------------------------------------------------- hand-computed values

/// C = 2, D = 2: x at angle theta_x, W_0 = (2, 0), W_1 = 0.5 (cos psi, sin psi), label 0.
fn two_class(theta_x: f64, psi: f64) -> Case {
    Case {
        shape: HeadShape { b: 1, c: 2, d: 2 },
        x: vec![3.0 * theta_x.cos(), 3.0 * theta_x.sin()],
        w: vec![2.0, 0.0, 0.5 * psi.cos(), 0.5 * psi.sin()],
        labels: vec![0],
        sigma: vec![0.0, 0.0],
        seed: 7,
        step: 3,
    }
}

fn log_sum_exp2(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// Checks loss, lse, c_iy, t and alpha of the single row against explicit formulas.
fn check_hand(cfg: &HeadConfig, case: &Case, c_y: f64, c_other: f64, t: f64, alpha: f64, region: Region) {
    let s = cfg.s as f64;
    let ls = cfg.label_smoothing as f64;
    let (z0, z1) = (s * t, s * c_other);
    let lse = log_sum_exp2(z0, z1);
    let loss = lse - (1.0 - ls) * z0 - (ls / 2.0) * (z0 + z1);
    let out = forward_f64(cfg, &case.p64()).expect("forward");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * (1.0 + b.abs());
    assert!(close(out.loss, loss), "loss {} vs hand {loss}", out.loss);
    assert!(close(out.rows.loss[0], loss));
    assert!(close(out.rows.lse[0], lse), "lse {} vs hand {lse}", out.rows.lse[0]);
    assert!(close(out.rows.c_iy[0], c_y), "c_iy {} vs hand {c_y}", out.rows.c_iy[0]);
    assert!(close(out.rows.t[0], t), "t {} vs hand {t}", out.rows.t[0]);
    assert!(close(out.rows.alpha[0], alpha), "alpha {} vs hand {alpha}", out.rows.alpha[0]);
    assert_eq!(out.rows.region[0], region);
    assert_eq!(out.n_valid, 1);
}

#[test]
fn hand_arcface_regular() {
    let cfg = cfg_with(HeadConfig::arcface(), 64.0);
    let (th, psi) = (PI / 3.0, 2.5);
    let t = (PI / 3.0 + 0.5).cos();
    check_hand(&cfg, &two_class(th, psi), 0.5, (psi - th).cos(), t, 0.0, Rg);
}

#[test]
fn hand_cosface_and_combined() {
    let (th, psi): (f64, f64) = (1.1, -0.4);
    let cos = cfg_with(HeadConfig::cosface(), 64.0);
    check_hand(&cos, &two_class(th, psi), th.cos(), (psi - th).cos(), th.cos() - 0.35f32 as f64, 0.0, Rg);
    let comb = cfg_with(HeadConfig::combined(), 30.0);
    let t = (th + 0.3f32 as f64).cos() - 0.2f32 as f64;
    check_hand(&comb, &two_class(th, psi), th.cos(), (psi - th).cos(), t, 0.0, Rg);
    let sphere = HeadConfig { m1: 1.5, m2: 0.0, ..cfg_with(HeadConfig::arcface(), 16.0) };
    check_hand(&sphere, &two_class(th, psi), th.cos(), (psi - th).cos(), (1.5 * th).cos(), 0.0, Rg);
}

#[test]
fn hand_linear_fallback_and_clamp() {
    // theta + m2 = 2.9 + 0.5 > pi.
    let (th, psi): (f64, f64) = (2.9, 1.0);
    let lin = cfg_with(HeadConfig::arcface(), 64.0);
    let t = th.cos() - 0.5 * 0.5f64.sin();
    check_hand(&lin, &two_class(th, psi), th.cos(), (psi - th).cos(), t, 0.0, Fb);
    let clamp = HeadConfig { fallback: Fallback::Clamp, ..lin };
    check_hand(&clamp, &two_class(th, psi), th.cos(), (psi - th).cos(), -1.0, 0.0, Fb);
    // With m3 the fallback also subtracts m3.
    let comb = HeadConfig { m2: 0.5, m3: 0.25, ..lin };
    let t = th.cos() - 0.25 - 0.5 * 0.5f64.sin();
    check_hand(&comb, &two_class(th, psi), th.cos(), (psi - th).cos(), t, 0.0, Fb);
}

#[test]
fn hand_fallback_none_is_the_raw_formula() {
    // Past pi: t = cos(theta + m2) - m3, no branch (theta + m2 = 3.4).
    let (th, psi): (f64, f64) = (2.9, 1.0);
    let none = HeadConfig { fallback: Fallback::None, m3: 0.25, ..cfg_with(HeadConfig::arcface(), 64.0) };
    check_hand(&none, &two_class(th, psi), th.cos(), (psi - th).cos(), (th + 0.5).cos() - 0.25, 0.0, Fb);
    // Below 0: m2 = -0.75, theta = 0.5, t = cos(-0.25) - m3, where the others give 1 - m3.
    let (th, psi): (f64, f64) = (0.5, 2.0);
    let none = HeadConfig { m2: -0.75, m3: 0.125, ..none };
    check_hand(&none, &two_class(th, psi), th.cos(), (psi - th).cos(), (-0.25f64).cos() - 0.125, 0.0, Sat);
    // And the exact derivative everywhere: dt = m1 sin(phi) / sin(theta), negative past pi.
    let tl = featcloud::oracle::head::target_logit(&HeadConfig { m3: 0.0, ..none }, 2.9f64.cos(), 0.75 + 0.5);
    let phi: f64 = 2.9 + 0.5;
    assert!((tl.dt - phi.sin() / 2.9f64.sin()).abs() < 1e-12 && tl.dt < 0.0, "dt {}", tl.dt);
}

#[test]
fn hand_saturated() {
    // m2 = -0.75 and theta = 0.5: phi = -0.25 < 0, so t = 1 - m3.
    let (th, psi): (f64, f64) = (0.5, 2.0);
    let cfg = HeadConfig { m2: -0.75, m3: 0.125, ..cfg_with(HeadConfig::arcface(), 64.0) };
    check_hand(&cfg, &two_class(th, psi), th.cos(), (psi - th).cos(), 1.0 - 0.125, 0.0, Sat);
    let clamp = HeadConfig { fallback: Fallback::Clamp, ..cfg };
    check_hand(&clamp, &two_class(th, psi), th.cos(), (psi - th).cos(), 1.0 - 0.125, 0.0, Sat);
}

#[test]
fn hand_label_smoothing() {
    let (th, psi): (f64, f64) = (0.8, 2.2);
    let cfg = HeadConfig { label_smoothing: 0.1, ..cfg_with(HeadConfig::arcface(), 64.0) };
    check_hand(&cfg, &two_class(th, psi), th.cos(), (psi - th).cos(), (th + 0.5).cos(), 0.0, Rg);
}

#[test]
fn hand_cloud_alpha_is_sigma_times_eps() {
    let (th, psi): (f64, f64) = (1.0, 2.5);
    let mut case = two_class(th, psi);
    case.sigma = vec![0.25, 3.0];
    let eps = cloud_normal(case.seed, case.step, 0);
    assert!(eps.abs() > 0.05, "pick another seed: eps = {eps}");
    let sym = HeadConfig { cloud: CloudMode::Symmetric, ..cfg_with(HeadConfig::arcface(), 64.0) };
    let alpha = 0.25 * eps;
    check_hand(&sym, &case, th.cos(), (psi - th).cos(), (th + 0.5 + alpha).cos(), alpha, Rg);
    let one = HeadConfig { cloud: CloudMode::OneSided, ..sym };
    let alpha = 0.25 * eps.abs();
    check_hand(&one, &case, th.cos(), (psi - th).cos(), (th + 0.5 + alpha).cos(), alpha, Rg);
    // sigma of the target class is used, not of another one; off means alpha = 0.
    case.sigma = vec![0.0, 3.0];
    check_hand(&sym, &case, th.cos(), (psi - th).cos(), (th + 0.5).cos(), 0.0, Rg);
    check_hand(
        &cfg_with(HeadConfig::arcface(), 64.0),
        &case,
        th.cos(),
        (psi - th).cos(),
        (th + 0.5).cos(),
        0.0,
        Rg,
    );
}

#[test]
fn hand_f32_inputs() {
    // The f32 entry point widens its inputs: the expected values use the rounded inputs' angles.
    let x = [1.5f32, 2.25];
    let w = [2.0f32, 0.0, -0.3, 0.4];
    let th = (x[1] as f64).atan2(x[0] as f64);
    let psi = (w[3] as f64).atan2(w[2] as f64);
    let cfg = cfg_with(HeadConfig::arcface(), 64.0);
    let p = HeadProblem {
        shape: HeadShape { b: 1, c: 2, d: 2 },
        x: &x,
        w: &w,
        labels: &[0],
        sigma_cloud: &[],
        seed: 0,
        step: 0,
    };
    let out = forward(&cfg, &p).expect("forward");
    let (z0, z1) = (64.0 * (th + 0.5).cos(), 64.0 * (psi - th).cos());
    let loss = log_sum_exp2(z0, z1) - z0;
    assert!((out.loss - loss).abs() <= 1e-12 * loss.abs(), "{} vs {loss}", out.loss);
}

/// d loss / d x for the C = 2, D = 2 case, from the angle: x moves along (-sin, cos) / r.
fn hand_dx_two_class(cfg: &HeadConfig, th: f64, psi: f64, straight_through: bool) -> [f64; 2] {
    let s = cfg.s as f64;
    let m = cfg.m2 as f64;
    let t = (th + m).cos();
    let c1 = (psi - th).cos();
    let (z0, z1) = (s * t, s * c1);
    let lse = log_sum_exp2(z0, z1);
    let (p0, p1) = ((z0 - lse).exp(), (z1 - lse).exp());
    // d t / d theta: exact -sin(theta + m); straight-through uses d c_0 / d theta = -sin(theta).
    let dt_dth = if straight_through { -th.sin() } else { -(th + m).sin() };
    let dl_dth = s * (p0 - 1.0) * dt_dth + s * p1 * (psi - th).sin();
    let r = 3.0;
    [dl_dth * -th.sin() / r, dl_dth * th.cos() / r]
}

#[test]
fn hand_gradient_exact_and_straight_through() {
    let (th, psi): (f64, f64) = (1.2, 2.0);
    let case = two_class(th, psi);
    for (mode, st) in [(MarginGrad::Exact, false), (MarginGrad::StraightThrough, true)] {
        let cfg = HeadConfig { margin_grad: mode, ..cfg_with(HeadConfig::arcface(), 16.0) };
        let g = backward_f64(&cfg, &case.p64(), Upstream::Scalar(1.0)).expect("backward");
        let hand = hand_dx_two_class(&cfg, th, psi, st);
        for k in 0..2 {
            assert!(
                (g.dx[k] - hand[k]).abs() <= 1e-12 * (1.0 + hand[k].abs()),
                "{mode:?} dx {:?} hand {hand:?}",
                g.dx
            );
        }
    }
}

// ---------------------------------------------------------------- gradient checks per region

#[test]
fn gradcheck_regular_rows_arcface() {
    let cfg = cfg_with(HeadConfig::arcface(), 16.0);
    let case = build_case(5, 6, &[0, 3, 1, 3], &[0.3, 1.0, 1.7, 2.4], 1);
    gradcheck_regions(&cfg, &case, &[Rg, Rg, Rg, Rg]);
}

#[test]
fn gradcheck_regular_rows_default_scale() {
    let cfg = cfg_with(HeadConfig::arcface(), 64.0);
    let case = build_case(4, 5, &[1, 2, 0], &[1.2, 1.4, 1.3], 2);
    gradcheck_regions(&cfg, &case, &[Rg, Rg, Rg]);
}

#[test]
fn gradcheck_linear_fallback_rows() {
    let cfg = cfg_with(HeadConfig::arcface(), 16.0);
    let case = build_case(4, 5, &[0, 1, 2, 1], &[2.75, 2.9, 3.05, 1.0], 3);
    gradcheck_regions(&cfg, &case, &[Fb, Fb, Fb, Rg]);
}

#[test]
fn gradcheck_saturated_rows() {
    let cfg = HeadConfig { m2: -0.8, ..cfg_with(HeadConfig::arcface(), 4.0) };
    let case = build_case(4, 5, &[0, 1, 2, 3], &[0.2, 0.5, 0.7, 1.5], 4);
    gradcheck_regions(&cfg, &case, &[Sat, Sat, Sat, Rg]);
}

#[test]
fn gradcheck_clamp_fallback() {
    let cfg = HeadConfig { fallback: Fallback::Clamp, ..cfg_with(HeadConfig::arcface(), 16.0) };
    let case = build_case(4, 5, &[0, 1, 2, 1], &[2.75, 2.9, 3.05, 1.0], 5);
    gradcheck_regions(&cfg, &case, &[Fb, Fb, Fb, Rg]);
    let sat = HeadConfig { m2: -0.8, s: 4.0, ..cfg };
    let case = build_case(4, 5, &[0, 1, 2, 3], &[0.2, 0.5, 0.7, 1.5], 6);
    gradcheck_regions(&sat, &case, &[Sat, Sat, Sat, Rg]);
}

#[test]
fn gradcheck_cosface_combined_and_m1() {
    let case = build_case(6, 7, &[0, 5, 2, 2, 4], &[0.4, 1.1, 1.9, 2.6, 3.0], 7);
    gradcheck(&cfg_with(HeadConfig::cosface(), 8.0), &case, &[1.0]);
    gradcheck_regions(&cfg_with(HeadConfig::combined(), 8.0), &case, &[Rg, Rg, Rg, Rg, Fb]);
    let m1 = HeadConfig { m1: 1.35, m2: 0.1, ..cfg_with(HeadConfig::arcface(), 8.0) };
    gradcheck_regions(&m1, &case, &[Rg, Rg, Rg, Fb, Fb]);
}

#[test]
fn gradcheck_label_smoothing() {
    let cfg = HeadConfig { label_smoothing: 0.2, ..cfg_with(HeadConfig::arcface(), 16.0) };
    let case = build_case(5, 6, &[0, 1, 4, 2], &[0.6, 1.4, 2.9, 2.0], 8);
    gradcheck_regions(&cfg, &case, &[Rg, Rg, Fb, Rg]);
}

#[test]
fn gradcheck_ignored_rows() {
    let cfg = cfg_with(HeadConfig::arcface(), 16.0);
    let case = build_case(4, 5, &[0, -1, 2, -7, 1], &[0.9, 0.0, 2.9, 0.0, 1.6], 9);
    let out = gradcheck_regions(&cfg, &case, &[Rg, Ig, Fb, Ig, Rg]);
    assert_eq!(out.n_valid, 3);
    for i in [1, 3] {
        assert_eq!(out.rows.loss[i], 0.0);
        assert_eq!(out.rows.lse[i], 0.0);
        assert_eq!(out.rows.c_iy[i], 0.0);
        assert_eq!(out.rows.t[i], 0.0);
        assert_eq!(out.rows.alpha[i], 0.0);
    }
    let mean = (out.rows.loss[0] + out.rows.loss[2] + out.rows.loss[4]) / 3.0;
    assert!((out.loss - mean).abs() <= 1e-14 * mean.abs());
    let g = backward_f64(&cfg, &case.p64(), Upstream::Scalar(1.0)).expect("backward");
    let d = case.shape.d;
    assert!(g.dx[d..2 * d].iter().chain(&g.dx[3 * d..4 * d]).all(|&v| v == 0.0));
}

#[test]
fn gradcheck_reductions() {
    let case = build_case(5, 4, &[0, 1, -1, 4, 2], &[0.7, 2.95, 0.0, 1.3, 2.2], 10);
    let base = cfg_with(HeadConfig::arcface(), 16.0);
    let mean = HeadConfig { reduction: Reduction::Mean, ..base };
    let sum = HeadConfig { reduction: Reduction::Sum, ..base };
    let none = HeadConfig { reduction: Reduction::None, ..base };
    let om = gradcheck(&mean, &case, &[0.7]);
    let os = gradcheck(&sum, &case, &[-1.3]);
    let on = gradcheck(&none, &case, &[0.5, -2.0, 9.0, 1.25, 3.0]);
    assert_eq!(om.n_valid, 4);
    assert!((om.loss * 4.0 - os.loss).abs() <= 1e-12 * os.loss.abs());
    // Reduction::None reports the sum of the row losses as the scalar.
    assert_eq!(on.loss.to_bits(), os.loss.to_bits());
    assert_eq!(on.rows, os.rows);
    // Mean = Sum / N_valid for the gradients too.
    let gm = backward_f64(&mean, &case.p64(), Upstream::Scalar(1.0)).expect("mean");
    let gs = backward_f64(&sum, &case.p64(), Upstream::Scalar(0.25)).expect("sum");
    for (a, b) in gm.dx.iter().chain(&gm.dw).zip(gs.dx.iter().chain(&gs.dw)) {
        assert!((a - b).abs() <= 1e-14 * (1.0 + b.abs()));
    }
}

/// Finds rows whose eps_i has the wanted sign and size, so a cloud row lands in a chosen region.
fn row_with_eps(seed: u64, step: u64, start: u64, pred: impl Fn(f64) -> bool) -> u64 {
    (start..10_000).find(|&i| pred(cloud_normal(seed, step, i))).expect("no such row")
}

#[test]
fn gradcheck_cloud_symmetric_and_one_sided() {
    for mode in [CloudMode::Symmetric, CloudMode::OneSided] {
        let cfg = HeadConfig { cloud: mode, ..cfg_with(HeadConfig::arcface(), 16.0) };
        // Target phi per row; theta is chosen from it once alpha is known.
        let labels = [0, 1, 2, 1, 3];
        let phis = [1.6, 0.9, 2.2, 3.35, 1.2];
        let mut case = build_case(4, 5, &labels, &[1.0; 5], 12);
        case.sigma = vec![0.2, 0.1, 0.3, 0.05];
        let alphas: Vec<f64> = (0..5)
            .map(|i| {
                let eps = cloud_normal(case.seed, case.step, i as u64);
                let e = if mode == CloudMode::OneSided { eps.abs() } else { eps };
                case.sigma[labels[i] as usize] as f64 * e
            })
            .collect();
        let angles: Vec<f64> = (0..5).map(|i| phis[i] - 0.5 - alphas[i]).collect();
        assert!(angles.iter().all(|&a| a > 0.05 && a < PI - 0.05), "{angles:?}");
        let mut built = build_case(4, 5, &labels, &angles, 12);
        built.sigma = case.sigma.clone();
        let out = gradcheck_regions(&cfg, &built, &[Rg, Rg, Rg, Fb, Rg]);
        for (i, &alpha) in alphas.iter().enumerate() {
            assert!((out.rows.alpha[i] - alpha).abs() <= 1e-15, "row {i}");
            assert!(alpha != 0.0);
        }
    }
}

#[test]
fn cloud_can_saturate_and_ignored_rows_keep_the_counter() {
    let cfg = HeadConfig { cloud: CloudMode::Symmetric, ..cfg_with(HeadConfig::arcface(), 4.0) };
    let (seed, step) = (11, 5);
    // Row r draws eps < -1.2: with sigma 1, alpha < -1.2 and theta = -0.2 - 0.5 - alpha > 0.5.
    let r = row_with_eps(seed, step, 1, |e| e < -1.2) as usize;
    let eps_r = cloud_normal(seed, step, r as u64);
    let mut labels = vec![-1; r + 2];
    let mut angles = vec![0.0; r + 2];
    labels[r] = 0;
    angles[r] = -0.2 - 0.5 - eps_r;
    labels[r + 1] = 1;
    angles[r + 1] = 1.0;
    let mut case = build_case(3, 4, &labels, &angles, 13);
    case.sigma = vec![1.0, 0.1, 0.0];
    let out = gradcheck(&cfg, &case, &[1.0]);
    assert_eq!(out.rows.region[r], Sat);
    assert_eq!(out.rows.region[r + 1], Rg);
    assert_eq!(out.n_valid, 2);
    assert_eq!(out.rows.alpha[r], eps_r);
    // Un-ignoring row 0 does not change the draws of rows r and r + 1.
    let mut more = case.clone();
    more.labels[0] = 2;
    let out2 = forward_f64(&cfg, &more.p64()).expect("forward");
    assert_eq!(out2.rows.alpha[r].to_bits(), out.rows.alpha[r].to_bits());
    assert_eq!(out2.rows.alpha[r + 1].to_bits(), out.rows.alpha[r + 1].to_bits());
    // A different step draws a different cloud.
    more.step += 1;
    let out3 = forward_f64(&cfg, &more.p64()).expect("forward");
    assert_ne!(out3.rows.alpha[r], out.rows.alpha[r]);
}

// ---------------------------------------------------------------- straight-through

/// The straight-through gradient is the exact gradient of a surrogate loss whose
/// target logit is s * (c_iy + k_i), with k_i = t_i - c_iy frozen at the
/// evaluation point (the margin and cloud shift the logit, the gradient flows as
/// if t_i = c_iy). This re-implements that surrogate independently of the oracle.
fn surrogate_loss(cfg: &HeadConfig, case: &Case, k: &[f64]) -> f64 {
    let HeadShape { b, c, d } = case.shape;
    let s = cfg.s as f64;
    let ls = cfg.label_smoothing as f64;
    let (mut total, mut n) = (0.0, 0.0);
    for (i, (&label, &ki)) in case.labels.iter().zip(k).enumerate().take(b) {
        if label < 0 {
            continue;
        }
        let y = label as usize;
        let xi = &case.x[i * d..(i + 1) * d];
        let z: Vec<f64> = (0..c)
            .map(|j| {
                let wj = &case.w[j * d..(j + 1) * d];
                let cos = xi.iter().zip(wj).map(|(a, b)| a * b).sum::<f64>() / (norm(xi) * norm(wj));
                if j == y {
                    s * (cos + ki)
                } else {
                    s * cos
                }
            })
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        total += lse - (1.0 - ls) * z[y] - ls / c as f64 * z.iter().sum::<f64>();
        n += 1.0;
    }
    total / n
}

#[test]
fn straight_through_is_the_gradient_with_t_replaced_by_c() {
    for (fallback, m2, angles) in [
        (Fallback::Linear, 0.5f32, [0.4, 1.3, 2.9, 3.0]),
        (Fallback::Clamp, 0.5, [0.4, 1.3, 2.9, 3.0]),
        (Fallback::Linear, -0.8, [0.2, 0.5, 1.9, 1.2]),
    ] {
        let cfg = HeadConfig {
            margin_grad: MarginGrad::StraightThrough,
            fallback,
            m2,
            label_smoothing: 0.1,
            ..cfg_with(HeadConfig::combined(), 16.0)
        };
        let case = build_case(4, 5, &[0, 1, 2, 3], &angles, 14);
        let out = forward_f64(&cfg, &case.p64()).expect("forward");
        assert_target_gradient_live(&cfg, &out, 4);
        let k: Vec<f64> = (0..4).map(|i| out.rows.t[i] - out.rows.c_iy[i]).collect();
        // The surrogate reproduces the forward at the evaluation point.
        assert!((surrogate_loss(&cfg, &case, &k) - out.loss).abs() <= 1e-12 * out.loss.abs());
        let an = backward_f64(&cfg, &case.p64(), Upstream::Scalar(1.0)).expect("backward");
        let fd = finite_differences(&case, &|cs| surrogate_loss(&cfg, cs, &k));
        assert_close_rel("dx (straight-through)", &an.dx, &fd.dx, 1e-6);
        assert_close_rel("dW (straight-through)", &an.dw, &fd.dw, 1e-6);
        // And it is not the exact gradient (the margin changes dt in every region here).
        let exact = HeadConfig { margin_grad: MarginGrad::Exact, ..cfg };
        let ge = backward_f64(&exact, &case.p64(), Upstream::Scalar(1.0)).expect("backward");
        let diff = an.dx.iter().zip(&ge.dx).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff > 1e-3, "{fallback:?}, m2 {m2}: straight-through equals exact");
    }
}

// ---------------------------------------------------------------- f32 path, determinism, helpers

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&a| a as f32).collect()
}

#[test]
fn f32_entry_points_equal_f64_on_widened_inputs_and_are_deterministic() {
    let mut case = build_case(7, 9, &[0, 6, -1, 3, 3, 2], &[0.5, 1.5, 0.0, 2.8, 3.0, 1.1], 15);
    case.sigma = vec![0.1, 0.2, 0.0, 0.4, 0.0, 0.0, 0.3];
    let x32 = to_f32(&case.x);
    let w32 = to_f32(&case.w);
    let p32 = HeadProblem {
        shape: case.shape,
        x: &x32,
        w: &w32,
        labels: &case.labels,
        sigma_cloud: &case.sigma,
        seed: 99,
        step: 1 << 40,
    };
    let xw: Vec<f64> = x32.iter().map(|&a| a as f64).collect();
    let ww: Vec<f64> = w32.iter().map(|&a| a as f64).collect();
    let p64 = HeadProblemF64 { x: &xw, w: &ww, ..case.p64() };
    let p64 = HeadProblemF64 { seed: 99, step: 1 << 40, ..p64 };
    let cfg = HeadConfig { label_smoothing: 0.05, ..HeadConfig::default() };
    let a = forward(&cfg, &p32).expect("forward");
    let b = forward(&cfg, &p32).expect("forward");
    let c = forward_f64(&cfg, &p64).expect("forward");
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    assert_eq!(a.loss.to_bits(), c.loss.to_bits());
    assert_eq!(a.rows, b.rows);
    assert_eq!(a.rows, c.rows);
    let ga = backward(&cfg, &p32, Upstream::Scalar(1.0)).expect("backward");
    let gb = backward(&cfg, &p32, Upstream::Scalar(1.0)).expect("backward");
    let gc = backward_f64(&cfg, &p64, Upstream::Scalar(1.0)).expect("backward");
    let bits = |g: &Gradients| g.dx.iter().chain(&g.dw).map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&ga), bits(&gb));
    assert_eq!(bits(&ga), bits(&gc));
}

#[test]
fn zero_valid_rows() {
    let case = build_case(3, 4, &[-1, -1], &[0.0, 0.0], 16);
    for reduction in [Reduction::Mean, Reduction::Sum] {
        let cfg = HeadConfig { reduction, ..cfg_with(HeadConfig::arcface(), 64.0) };
        let out = forward_f64(&cfg, &case.p64()).expect("forward");
        assert_eq!((out.loss, out.n_valid), (0.0, 0));
        let g = backward_f64(&cfg, &case.p64(), Upstream::Scalar(1.0)).expect("backward");
        assert!(g.dx.iter().chain(&g.dw).all(|&v| v == 0.0));
    }
}

#[test]
fn target_angles_are_acos_of_clamped_target_cosine() {
    let case = build_case(3, 4, &[0, 2, -1], &[0.7, 2.1, 0.0], 17);
    let out = forward_f64(&cfg_with(HeadConfig::arcface(), 64.0), &case.p64()).expect("forward");
    let th = target_angles(&out.rows);
    assert!((th[0] - 0.7).abs() < 1e-12 && (th[1] - 2.1).abs() < 1e-12, "{th:?}");
}

// ---------------------------------------------------------------- bad input

fn small32() -> (Vec<f32>, Vec<f32>, Vec<i32>, Vec<f32>) {
    (
        vec![0.5, -1.0, 2.0, 0.25, 1.0, 1.0],
        vec![1.0, 0.0, 0.0, 1.0, 0.5, 0.5],
        vec![0, 1],
        vec![0.1, 0.2, 0.0],
    )
}

fn run32(cfg: &HeadConfig, shape: HeadShape, x: &[f32], w: &[f32], labels: &[i32], sigma: &[f32]) -> Error {
    let p = HeadProblem { shape, x, w, labels, sigma_cloud: sigma, seed: 1, step: 2 };
    let fwd = forward(cfg, &p).expect_err("forward must reject");
    let bwd = backward(cfg, &p, Upstream::Scalar(1.0)).expect_err("backward must reject");
    assert_eq!(format!("{fwd}"), format!("{bwd}"));
    fwd
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = HeadConfig::default();
    let shape = HeadShape { b: 2, c: 3, d: 3 };
    let (x, w, labels, sigma) = small32();
    let w9: Vec<f32> = (0..9).map(|k| k as f32 * 0.1 + 0.1).collect();

    assert!(matches!(
        run32(&cfg, shape, &x, &w9, &[0, 3], &sigma),
        Error::LabelOutOfRange { row: 1, label: 3, classes: 3 }
    ));
    assert!(matches!(run32(&cfg, shape, &x[..5], &w9, &labels, &sigma), Error::Shape(_)));
    assert!(matches!(run32(&cfg, shape, &x, &w, &labels, &sigma), Error::Shape(_)));
    assert!(matches!(run32(&cfg, shape, &x, &w9, &[0], &sigma), Error::Shape(_)));
    assert!(matches!(run32(&cfg, shape, &x, &w9, &labels, &sigma[..2]), Error::Shape(_)));
    assert!(matches!(run32(&cfg, HeadShape { b: 0, ..shape }, &[], &w9, &[], &sigma), Error::Empty(_)));
    assert!(matches!(run32(&cfg, HeadShape { c: 0, ..shape }, &x, &[], &labels, &[]), Error::Empty(_)));
    assert!(matches!(run32(&cfg, HeadShape { d: 0, ..shape }, &[], &[], &labels, &sigma), Error::Empty(_)));

    let mut xn = x.clone();
    xn[4] = f32::NAN;
    assert!(
        matches!(run32(&cfg, shape, &xn, &w9, &labels, &sigma), Error::NonFinite { ref what, index: 4 } if what == "x")
    );
    let mut wn = w9.clone();
    wn[7] = f32::INFINITY;
    assert!(
        matches!(run32(&cfg, shape, &x, &wn, &labels, &sigma), Error::NonFinite { ref what, index: 7 } if what == "W")
    );
    assert!(matches!(
        run32(&cfg, shape, &x, &w9, &labels, &[0.1, f32::NAN, 0.0]),
        Error::NonFinite { ref what, index: 1 } if what == "sigma_cloud"
    ));
    assert!(matches!(run32(&cfg, shape, &x, &w9, &labels, &[0.1, -0.2, 0.0]), Error::InvalidConfig(_)));

    for bad in [
        HeadConfig { label_smoothing: 1.0, ..cfg },
        HeadConfig { label_smoothing: -0.1, ..cfg },
        HeadConfig { s: 0.0, ..cfg },
        HeadConfig { m2: f32::NAN, ..cfg },
    ] {
        assert!(matches!(run32(&bad, shape, &x, &w9, &labels, &sigma), Error::InvalidConfig(_)));
    }

    // The cloud std may be omitted only when the cloud is off.
    let off = HeadConfig { cloud: CloudMode::Off, ..cfg };
    let p = HeadProblem { shape, x: &x, w: &w9, labels: &labels, sigma_cloud: &[], seed: 0, step: 0 };
    assert!(forward(&off, &p).is_ok());
    assert!(matches!(forward(&cfg, &p), Err(Error::Shape(_))));

    // f64 entry points check finiteness too.
    let x64: Vec<f64> = vec![0.5, f64::NAN, 2.0, 0.25, 1.0, 1.0];
    let w64: Vec<f64> = w9.iter().map(|&a| a as f64).collect();
    let p64 =
        HeadProblemF64 { shape, x: &x64, w: &w64, labels: &labels, sigma_cloud: &sigma, seed: 0, step: 0 };
    assert!(matches!(forward_f64(&cfg, &p64), Err(Error::NonFinite { index: 1, .. })));
    assert!(matches!(
        backward_f64(&cfg, &p64, Upstream::Scalar(1.0)),
        Err(Error::NonFinite { index: 1, .. })
    ));
}

#[test]
fn upstream_must_match_the_reduction() {
    let (x, _, labels, sigma) = small32();
    let w9: Vec<f32> = (0..9).map(|k| k as f32 * 0.1 + 0.1).collect();
    let shape = HeadShape { b: 2, c: 3, d: 3 };
    let p = HeadProblem { shape, x: &x, w: &w9, labels: &labels, sigma_cloud: &sigma, seed: 0, step: 0 };
    let none = HeadConfig { reduction: Reduction::None, ..HeadConfig::default() };
    let mean = HeadConfig::default();
    assert!(matches!(backward(&none, &p, Upstream::Scalar(1.0)), Err(Error::InvalidConfig(_))));
    assert!(matches!(backward(&mean, &p, Upstream::PerRow(&[1.0, 1.0])), Err(Error::InvalidConfig(_))));
    assert!(matches!(backward(&none, &p, Upstream::PerRow(&[1.0])), Err(Error::Shape(_))));
    assert!(matches!(backward(&none, &p, Upstream::PerRow(&[1.0, f64::NAN])), Err(Error::NonFinite { .. })));
    assert!(matches!(backward(&mean, &p, Upstream::Scalar(f64::INFINITY)), Err(Error::NonFinite { .. })));
    assert!(backward(&none, &p, Upstream::PerRow(&[1.0, 2.0])).is_ok());
}

// ---------------------------------------------------------------- dx in the attention form

/// The attention form of dx (O = sum_{j != y} p_ij wh_j, the target term through expm1;
/// the fused v2 kernels' form) equals the dc form within 1e-12 of max |dx| in every
/// region: each margin, theta + m > pi fallback (linear and clamp), saturated, the
/// antipodal row with m2 < 0, both clouds, label smoothing, ignored rows, every
/// reduction, C = 1, near-parallel rows and p_iy -> 1.
#[test]
fn dx_attention_form_equals_the_dc_form_in_every_region() {
    let pi = PI;
    let cases = [
        build_case(6, 5, &[0, 3, 1, 3], &[0.3, 1.0, 1.7, 2.4], 1),
        build_case(5, 5, &[0, 1, 2, 1], &[2.75, 2.9, 3.05, 1.0], 3),
        build_case(5, 4, &[0, -1, 2, -1, 4], &[0.4, 0.0, pi, 0.0, 1e-6], 7),
        build_case(1, 3, &[0, 0, -1], &[0.5, 2.0, 0.0], 9),
        build_case(40, 8, &[3, 7, 3], &[0.05, 0.02, 0.0], 13),
        build_case(9, 16, &[8, 0, 4, 2], &[pi, 1e-7, 1.5, 3.1], 17),
    ];
    let margins = [
        HeadConfig::arcface(),
        HeadConfig::cosface(),
        HeadConfig::combined(),
        HeadConfig { m1: 1.35, m2: 0.0, ..HeadConfig::default() },
        HeadConfig { m2: -0.3, ..HeadConfig::default() },
        HeadConfig { m2: -0.8, ..HeadConfig::default() },
    ];
    let mut checked = 0;
    let mut worst = 0.0f64;
    let mut regions = std::collections::BTreeSet::new();
    for (k, case) in cases.iter().enumerate() {
        let sigma: Vec<f32> = (0..case.shape.c).map(|j| 0.05 + 0.01 * j as f32).collect();
        let case = Case { sigma, ..case.clone() };
        let g_rows: Vec<f64> = (0..case.shape.b).map(|i| 0.5 + 0.25 * i as f64).collect();
        for base in margins {
            for cloud in [CloudMode::Off, CloudMode::Symmetric, CloudMode::OneSided] {
                for fallback in Fallback::ALL {
                    for margin_grad in [MarginGrad::Exact, MarginGrad::StraightThrough] {
                        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                            for (s, label_smoothing) in [(64.0, 0.0), (30.0, 0.1), (4.0, 0.3)] {
                                let cfg = HeadConfig {
                                    s,
                                    cloud,
                                    fallback,
                                    margin_grad,
                                    reduction,
                                    label_smoothing,
                                    ..base
                                };
                                let g = if reduction == Reduction::None { &g_rows[..] } else { &[0.7][..] };
                                let fwd = forward_f64(&cfg, &case.p64()).unwrap();
                                regions.extend(fwd.rows.region.iter().map(|r| format!("{r:?}")));
                                let dc_form = backward_f64(&cfg, &case.p64(), upstream(&cfg, g)).unwrap().dx;
                                let o_form =
                                    dx_attention_form_f64(&cfg, &case.p64(), upstream(&cfg, g)).unwrap();
                                let fwd = forward_f64(&cfg, &case.p64()).unwrap();
                                regions.extend(fwd.rows.region.iter().map(|r| format!("{r:?}")));
                                // The size of the terms summed into a row's dx: w s (1 + ls) / ||x_i||
                                // (each p_ij, ls/C and |wh_j| at most 1), or max |dx| if larger.
                                let terms = (0..case.shape.b)
                                    .filter(|&i| case.labels[i] >= 0)
                                    .map(|i| {
                                        let d = case.shape.d;
                                        let w = match reduction {
                                            Reduction::Mean => 0.7 / fwd.n_valid as f64,
                                            Reduction::Sum => 0.7,
                                            Reduction::None => g_rows[i],
                                        };
                                        w * s as f64 * (1.0 + label_smoothing as f64)
                                            / norm(&case.x[i * d..(i + 1) * d])
                                    })
                                    .fold(0.0f64, f64::max);
                                let scale = dc_form.iter().fold(terms, |m, v| m.max(v.abs())).max(1e-300);
                                let err = o_form
                                    .iter()
                                    .zip(&dc_form)
                                    .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
                                worst = worst.max(err / scale);
                                assert!(
                                    err <= 1e-12 * scale,
                                    "case {k}, {cfg:?}: |dx_O - dx| = {err:.3e} (max |dx| {scale:.3e})"
                                );
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    assert_eq!(checked, 6 * 6 * 3 * Fallback::ALL.len() * 2 * 3 * 3);
    println!("worst |dx_O - dx| / scale over {checked} configurations: {worst:.3e}");
    let all: Vec<&str> = regions.iter().map(String::as_str).collect();
    assert_eq!(all, ["Fallback", "Ignored", "Regular", "Saturated"], "regions covered");
}

// ---------------------------------------------------------------- sub-centers (SPEC 5b)

/// B rows, C classes of K sub-centers each, D features: W `[C, K, D]` with row norms in
/// [0.5, 2], x rows with norms in [0.5, 3], labels random with row 1 ignored.
fn subcenter_case(b: usize, c: usize, k: usize, d: usize, seed: u64) -> Case {
    let mut rng = Rng(seed);
    let mut rows = |n: usize, lo: f64, hi: f64| -> Vec<f64> {
        (0..n)
            .flat_map(|_| {
                let v: Vec<f64> = (0..d).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let scale = rng.uniform(lo, hi) / norm(&v);
                v.into_iter().map(move |a| a * scale).collect::<Vec<_>>()
            })
            .collect()
    };
    let w = rows(c * k, 0.5, 2.0);
    let x = rows(b, 0.5, 3.0);
    let mut labels: Vec<i32> = (0..b).map(|i| ((i * 7 + seed as usize) % c) as i32).collect();
    labels[1] = -1;
    Case { shape: HeadShape { b, c, d }, x, w, labels, sigma: vec![0.15; c], seed: 3, step: 9 }
}

/// Per (valid row, class): the best and second-best sub-center cosine, and the arg-max.
fn subcenter_cosines(case: &Case, k: usize) -> Vec<(usize, usize, usize, f64)> {
    let HeadShape { b, c, d } = case.shape;
    let unit = |v: &[f64]| v.iter().map(|a| a / norm(v)).collect::<Vec<_>>();
    let mut out = Vec::new();
    for i in (0..b).filter(|&i| case.labels[i] >= 0) {
        let xi = unit(&case.x[i * d..(i + 1) * d]);
        for j in 0..c {
            let mut cos: Vec<(f64, usize)> = (0..k)
                .map(|kk| {
                    let r = j * k + kk;
                    let wr = unit(&case.w[r * d..(r + 1) * d]);
                    (xi.iter().zip(&wr).map(|(a, b)| a * b).sum::<f64>(), kk)
                })
                .collect();
            cos.sort_by(|a, b| b.0.total_cmp(&a.0));
            let gap = if k > 1 { cos[0].0 - cos[1].0 } else { f64::INFINITY };
            out.push((i, j, cos[0].1, gap));
        }
    }
    out
}

/// K = 2 with both sub-centers of every class equal to K = 1's W_j: the same forward and dx
/// bit for bit, sub-center 0's dW is K = 1's dW_j (a tie goes to the lowest k), and
/// sub-center 1, which no row picks, gets exactly 0. With K = 1 the oracle runs the same
/// arithmetic as before sub-centers existed (SPEC 5b: K = 1 is today's head).
#[test]
fn subcenters_duplicated_equal_one_center() {
    let (b, c, d) = (6, 5, 7);
    let one = subcenter_case(b, c, 1, d, 21);
    let mut two = one.clone();
    two.w = (0..c).flat_map(|j| [&one.w[j * d..(j + 1) * d], &one.w[j * d..(j + 1) * d]].concat()).collect();
    let cfg1 = HeadConfig { label_smoothing: 0.1, ..cfg_with(HeadConfig::arcface(), 8.0) };
    let cfg2 = HeadConfig { subcenters: 2, ..cfg1 };
    let (f1, f2) = (forward_f64(&cfg1, &one.p64()).unwrap(), forward_f64(&cfg2, &two.p64()).unwrap());
    assert_eq!(f1.loss.to_bits(), f2.loss.to_bits());
    assert_eq!(f1.rows.lse, f2.rows.lse);
    assert_eq!(f1.rows.c_iy, f2.rows.c_iy);
    let up = Upstream::Scalar(1.0);
    let (g1, g2) =
        (backward_f64(&cfg1, &one.p64(), up).unwrap(), backward_f64(&cfg2, &two.p64(), up).unwrap());
    assert_eq!(g1.dx, g2.dx);
    for j in 0..c {
        assert_eq!(g2.dw[(2 * j) * d..(2 * j + 1) * d], g1.dw[j * d..(j + 1) * d], "class {j}, sub-center 0");
        assert!(g2.dw[(2 * j + 1) * d..(2 * j + 2) * d].iter().all(|&v| v == 0.0), "class {j}, sub-center 1");
    }
}

/// K = 2, 3, 4 against central differences of the forward, away from ties (asserted), with
/// the cloud, label smoothing and an ignored row; the attention form of dx agrees; a
/// sub-center that no row picks for its class gets exactly zero gradient.
#[test]
fn subcenters_gradcheck_away_from_ties() {
    let mut unpicked_checked = 0;
    for (k, seed) in [(2usize, 31u64), (3, 32), (4, 33)] {
        let mut case = subcenter_case(7, 4, k, 6, seed);
        // Class 0's last sub-center points away from every row (minus their mean
        // direction), so that some sub-center is nobody's closest.
        let d = case.shape.d;
        let mut away = vec![0.0; d];
        for i in 0..case.shape.b {
            let xi = &case.x[i * d..(i + 1) * d];
            away.iter_mut().zip(xi).for_each(|(a, v)| *a -= v / norm(xi));
        }
        case.w[(k - 1) * d..k * d].copy_from_slice(&away);
        let picks = subcenter_cosines(&case, k);
        let gap = picks.iter().map(|p| p.3).fold(f64::INFINITY, f64::min);
        assert!(gap > 1e-4, "K = {k}: a near tie ({gap:e}) would make the finite differences meaningless");
        for base in [HeadConfig::arcface(), HeadConfig::cosface()] {
            let cfg = HeadConfig { subcenters: k as u32, label_smoothing: 0.1, s: 6.0, ..base };
            let g = [0.8];
            let an = backward_f64(&cfg, &case.p64(), upstream(&cfg, &g)).unwrap();
            let fd = finite_differences(&case, &|cs| objective(&cfg, cs, &g));
            assert_close_rel(&format!("K = {k} dx"), &an.dx, &fd.dx, 1e-6);
            assert_close_rel(&format!("K = {k} dW"), &an.dw, &fd.dw, 1e-6);
            let o_form = dx_attention_form_f64(&cfg, &case.p64(), upstream(&cfg, &g)).unwrap();
            assert_close_rel(&format!("K = {k} attention-form dx"), &o_form, &an.dx, 1e-12);
            // Sub-centers never the arg-max of any row: zero rows of dW, bit for bit.
            for r in 0..case.shape.c * k {
                if !picks.iter().any(|&(_, j, kk, _)| j * k + kk == r) {
                    assert!(an.dw[r * d..(r + 1) * d].iter().all(|&v| v == 0.0), "K = {k}: row {r}");
                    unpicked_checked += 1;
                }
            }
        }
    }
    assert!(unpicked_checked > 0, "no sub-center was left unpicked: the zero-gradient check tested nothing");
}

/// The closest sub-center decides the class cosine: a row made to lie on class 0's
/// sub-center 2 has c_iy = 1 (clamped), whatever the other sub-centers are.
#[test]
fn subcenters_take_the_closest_center() {
    let mut case = subcenter_case(3, 2, 3, 5, 41);
    let d = 5;
    case.labels = vec![0, -1, 1];
    let target = case.w[2 * d..3 * d].to_vec(); // class 0, sub-center 2
    case.x[..d].copy_from_slice(&target.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
    let cfg = HeadConfig { subcenters: 3, ..cfg_with(HeadConfig::arcface(), 8.0) };
    let out = forward_f64(&cfg, &case.p64()).unwrap();
    assert!((out.rows.c_iy[0] - 1.0).abs() < 1e-12, "{}", out.rows.c_iy[0]);
}

/// Bad sub-center input is an error: W of the K = 1 length for K = 3, K out of range.
#[test]
fn subcenters_bad_input_is_an_error() {
    let case = subcenter_case(3, 2, 1, 4, 51);
    let cfg = HeadConfig { subcenters: 3, ..HeadConfig::default() };
    let r = forward_f64(&cfg, &case.p64());
    assert!(matches!(&r, Err(Error::Shape(m)) if m.contains("expected C*K*D = 2*3*4")), "{r:?}");
    for k in [0, 17] {
        let cfg = HeadConfig { subcenters: k, ..HeadConfig::default() };
        let r = forward_f64(&cfg, &case.p64());
        assert!(matches!(&r, Err(Error::InvalidConfig(m)) if m.contains("head.subcenters")), "{r:?}");
    }
    let three = subcenter_case(3, 2, 3, 4, 52);
    let (x, w) = (to_f32(&three.x), to_f32(&three.w));
    let p = HeadProblem {
        shape: three.shape,
        x: &x,
        w: &w,
        labels: &three.labels,
        sigma_cloud: &three.sigma,
        seed: 1,
        step: 0,
    };
    let cfg = HeadConfig { subcenters: 3, ..HeadConfig::default() };
    assert!(forward(&cfg, &p).is_ok(), "the oracle takes K = 3");
    assert!(featcloud::cpu::head::forward(&cfg, &p).is_ok(), "the CPU backend takes K = 3");
}
