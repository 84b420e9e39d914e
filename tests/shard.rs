//! Class-parallel heads (SPEC 5c, `src/shard.rs`): W split by class into shards, each
//! shard's partials combined, each shard's backward given the combined lse, equal the whole
//! head. The oracle's shards against the oracle's whole head at 1e-12 (the same f64 math in
//! another order); the CPU backend's shards against the oracle at SPEC 8's f32 tolerances.
//! Partitions include one-class shards and shards that hold no label of the batch.

use featcloud::cpu::head as cpu;
use featcloud::oracle::head::{self as oracle, HeadProblem, HeadProblemF64};
use featcloud::shape::HeadShape;
use featcloud::shard::{combine, ClassShard, ShardPartials};
use featcloud::{CloudMode, Error, Fallback, HeadConfig, MarginGrad, Reduction};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Case {
    shape: HeadShape,
    x: Vec<f32>,
    w: Vec<f32>,
    labels: Vec<i32>,
    sigma: Vec<f32>,
}

/// A random case of `c` classes with `k` sub-centers; every 4th row ignored (and NaN).
fn case(b: usize, c: usize, k: usize, d: usize, seed: u64) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x: Vec<f32> = (0..b * d).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    let w: Vec<f32> = (0..c * k * d).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    let mut labels: Vec<i32> = (0..b).map(|_| rng.random_range(0..c as i32)).collect();
    for i in (3..b).step_by(4) {
        labels[i] = -1;
        x[i * d] = f32::NAN;
    }
    // Row 0 on its target's first sub-center (theta ~ 0), row 1 against it (theta ~ pi).
    for (i, sign) in [(0, 2.0f32), (1, -1.0)].into_iter().take(b) {
        let y = labels[i] as usize * k;
        for j in 0..d {
            x[i * d + j] = sign * w[y * d + j];
        }
    }
    let sigma = (0..c).map(|_| rng.random::<f32>() * 0.4).collect();
    Case { shape: HeadShape { b, c, d }, x, w, labels, sigma }
}

fn configs() -> Vec<(&'static str, HeadConfig)> {
    let base = HeadConfig::default();
    vec![
        ("arcface", base),
        ("cosface", HeadConfig::cosface()),
        ("cloud off", HeadConfig { cloud: CloudMode::Off, ..base }),
        ("label smoothing", HeadConfig { label_smoothing: 0.1, ..base }),
        ("none", HeadConfig { reduction: Reduction::None, ..base }),
        ("sum", HeadConfig { reduction: Reduction::Sum, ..base }),
        (
            "straight-through, no fallback",
            HeadConfig { margin_grad: MarginGrad::StraightThrough, fallback: Fallback::None, ..base },
        ),
        ("K = 3", HeadConfig { subcenters: 3, ..base }),
        ("K = 2, label smoothing", HeadConfig { subcenters: 2, label_smoothing: 0.2, ..base }),
    ]
}

/// Partitions of `c` classes into shards: (first, count) each.
fn partitions(c: usize) -> Vec<Vec<(usize, usize)>> {
    let mut out = vec![vec![(0, c)]];
    if c >= 2 {
        out.push(vec![(0, c / 2), (c / 2, c - c / 2)]);
        out.push(vec![(0, 1), (1, c - 1)]);
    }
    if c >= 3 {
        let a = c / 3;
        out.push(vec![(0, a.max(1)), (a.max(1), c - a.max(1) - 1), (c - 1, 1)]);
    }
    out
}

/// Row weights w_i of SPEC 4 for the reduction, upstream 1.5 (or g_i for none).
fn weights(cfg: &HeadConfig, labels: &[i32]) -> Vec<f64> {
    let n = labels.iter().filter(|&&y| y >= 0).count().max(1) as f64;
    (0..labels.len())
        .map(|i| match cfg.reduction {
            Reduction::Mean => 1.5 / n,
            Reduction::Sum => 1.5,
            Reduction::None => 0.5 + (i % 3) as f64 * 0.25,
        })
        .collect()
}

fn upstream<'a>(cfg: &HeadConfig, w: &'a [f64]) -> oracle::Upstream<'a> {
    match cfg.reduction {
        Reduction::None => oracle::Upstream::PerRow(w),
        _ => oracle::Upstream::Scalar(1.5),
    }
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, a| m.max(a.abs()))
}

/// The error of `got` against `want`, relative to max |want|.
fn rel_err(got: impl IntoIterator<Item = f64>, want: &[f64]) -> f64 {
    let e = got.into_iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    e / max_abs(want).max(1e-300)
}

/// Every row output of the combine against the whole head's, within `tol` relative.
fn check_combined(ctx: &str, got: &featcloud::shard::Combined, want: &oracle::ForwardOutput, tol: f64) {
    let close = |a: f64, b: f64| (a - b).abs() <= tol * b.abs().max(1.0);
    assert!(close(got.loss, want.loss), "{ctx}: loss {} vs {}", got.loss, want.loss);
    assert_eq!(got.n_valid, want.n_valid, "{ctx}");
    let r = &want.rows;
    for i in 0..r.lse.len() {
        assert!(close(got.lse[i], r.lse[i]), "{ctx}: lse[{i}] {} vs {}", got.lse[i], r.lse[i]);
        assert!(close(got.row_loss[i], r.loss[i]), "{ctx}: loss[{i}] {} vs {}", got.row_loss[i], r.loss[i]);
        let t = &got.target;
        assert!(
            close(t.c_iy[i], r.c_iy[i]) && close(t.t[i], r.t[i]) && close(t.alpha[i], r.alpha[i]),
            "{ctx}: row {i}"
        );
        assert_eq!(t.k_iy[i], r.k_iy[i], "{ctx}: k_iy[{i}]");
    }
}

/// The slices of one shard: its W rows and sigma entries.
fn shard_of<'a, F>(
    p: &HeadProblemOf<'a, F>,
    k: usize,
    first: usize,
    n: usize,
    w: &'a [F],
) -> HeadProblemOf<'a, F> {
    let d = p.shape.d;
    HeadProblemOf {
        shape: HeadShape { c: n, ..p.shape },
        w: &w[first * k * d..(first + n) * k * d],
        sigma_cloud: &p.sigma_cloud[first..first + n],
        ..*p
    }
}

use featcloud::oracle::head::HeadProblemOf;

/// Runs problem `p` shard by shard over partition `part` through one implementation
/// (`forward`: a shard's partials; `backward`: its (dx part, dW) widened to f64), combines,
/// and checks against the whole head's oracle outputs `want` and `wg`: the rows within `tol`
/// relative, dx summed over shards and dW concatenated within `gtol` of their max. Ignored
/// rows (NaN-filled) get exactly 0 from every shard.
#[allow(clippy::too_many_arguments)]
fn check_partition<F: Copy>(
    ctx: &str,
    cfg: &HeadConfig,
    p: &HeadProblemOf<F>,
    part: &[(usize, usize)],
    forward: impl Fn(&HeadProblemOf<F>, ClassShard) -> ShardPartials,
    backward: impl Fn(&HeadProblemOf<F>, ClassShard, &[f64], &[f64]) -> (Vec<f64>, Vec<f64>),
    (want, wg): (&oracle::ForwardOutput, &oracle::Gradients),
    (tol, gtol): (f64, f64),
) {
    let HeadShape { b, c, d } = p.shape;
    let k = cfg.subcenters as usize;
    let shard = |first| ClassShard { first, total: c };
    let parts: Vec<ShardPartials> =
        part.iter().map(|&(first, n)| forward(&shard_of(p, k, first, n, p.w), shard(first))).collect();
    let got = combine(&parts, p.labels, c, cfg.label_smoothing as f64, cfg.reduction).unwrap();
    check_combined(ctx, &got, want, tol);
    let wt = weights(cfg, p.labels);
    let mut dx = vec![0.0; b * d];
    let mut dw = Vec::new();
    for &(first, n) in part {
        let (gx, gw) = backward(&shard_of(p, k, first, n, p.w), shard(first), &got.lse, &wt);
        for i in (0..b).filter(|&i| p.labels[i] < 0) {
            assert!(gx[i * d..(i + 1) * d].iter().all(|&v| v == 0.0), "{ctx}: ignored row {i}");
        }
        dx.iter_mut().zip(&gx).for_each(|(a, v)| *a += v);
        dw.extend(gw);
    }
    let (ex, ew) = (rel_err(dx.iter().copied(), &wg.dx), rel_err(dw.iter().copied(), &wg.dw));
    assert!(ex <= gtol && ew <= gtol, "{ctx}: dx {ex:e}, dW {ew:e}");
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

#[test]
fn oracle_shards_combine_to_the_whole_head() {
    let mut runs = 0;
    for (si, &(b, c, d)) in [(1, 1, 3), (9, 2, 5), (13, 7, 8), (6, 11, 1), (17, 12, 16)].iter().enumerate() {
        for (name, cfg) in configs() {
            let kc = case(b, c, cfg.subcenters as usize, d, 10 + si as u64);
            let (x, w) = (widen(&kc.x), widen(&kc.w));
            let p = HeadProblemF64 {
                shape: kc.shape,
                x: &x,
                w: &w,
                labels: &kc.labels,
                sigma_cloud: &kc.sigma,
                seed: 5,
                step: 3,
            };
            let want = oracle::forward_f64(&cfg, &p).unwrap();
            let wg = oracle::backward_f64(&cfg, &p, upstream(&cfg, &weights(&cfg, &kc.labels))).unwrap();
            for part in partitions(c) {
                check_partition(
                    &format!("B={b} C={c} D={d} {name} shards {part:?}"),
                    &cfg,
                    &p,
                    &part,
                    |sp, sh| oracle::shard_forward_f64(&cfg, sp, sh).unwrap(),
                    |sp, sh, lse, wt| {
                        let g = oracle::shard_backward_f64(&cfg, sp, sh, lse, wt).unwrap();
                        (g.dx, g.dw)
                    },
                    (&want, &wg),
                    (1e-12, 1e-12),
                );
                runs += 1;
            }
        }
    }
    assert!(runs > 100, "{runs} runs");
}

#[test]
fn cpu_shards_match_the_oracle_within_spec_tolerances() {
    for (si, &(b, c, d)) in [(1, 1, 3), (9, 2, 5), (13, 7, 8), (33, 20, 13), (5, 9, 512)].iter().enumerate() {
        for (name, cfg) in configs() {
            let kc = case(b, c, cfg.subcenters as usize, d, 50 + si as u64);
            let p = HeadProblem {
                shape: kc.shape,
                x: &kc.x,
                w: &kc.w,
                labels: &kc.labels,
                sigma_cloud: &kc.sigma,
                seed: 5,
                step: 3,
            };
            let want = oracle::forward(&cfg, &p).unwrap();
            let wg = oracle::backward(&cfg, &p, upstream(&cfg, &weights(&cfg, &kc.labels))).unwrap();
            for part in partitions(c) {
                check_partition(
                    &format!("B={b} C={c} D={d} {name} shards {part:?}"),
                    &cfg,
                    &p,
                    &part,
                    |sp, sh| cpu::shard_forward(&cfg, sp, sh).unwrap(),
                    |sp, sh, lse, wt| {
                        let g = cpu::shard_backward(&cfg, sp, sh, lse, wt).unwrap();
                        (widen(&g.dx), widen(&g.dw))
                    },
                    (&want, &wg),
                    (1e-5, 1e-4),
                );
            }
        }
    }
}

/// One shard holding every class is the whole head: the CPU backend's own forward and
/// backward, bit for bit (the combine of one shard is its lse, summed in the same order).
#[test]
fn the_whole_head_as_one_shard_is_bitwise_the_head() {
    for (name, cfg) in configs() {
        let k = cfg.subcenters as usize;
        let kc = case(11, 6, k, 7, 77);
        let p = HeadProblem {
            shape: kc.shape,
            x: &kc.x,
            w: &kc.w,
            labels: &kc.labels,
            sigma_cloud: &kc.sigma,
            seed: 5,
            step: 3,
        };
        let wt = weights(&cfg, &kc.labels);
        let part = cpu::shard_forward(&cfg, &p, ClassShard::whole(6)).unwrap();
        let got = combine(&[part], &kc.labels, 6, cfg.label_smoothing as f64, cfg.reduction).unwrap();
        let up: Vec<f32> = wt.iter().map(|&v| v as f32).collect();
        let cu = match cfg.reduction {
            Reduction::None => cpu::Upstream::PerRow(&up),
            _ => cpu::Upstream::Scalar(1.5),
        };
        let (f, g) = cpu::forward_backward(&cfg, &p, cu).unwrap();
        assert_eq!(f.n_valid, 9);
        assert_eq!(got.loss.to_bits(), f.loss.to_bits(), "{name}: loss");
        assert_eq!(got.lse.iter().map(|&v| v as f32).collect::<Vec<_>>(), f.rows.lse, "{name}: lse");
        let gs = cpu::shard_backward(&cfg, &p, ClassShard::whole(6), &got.lse, &wt).unwrap();
        assert!(gs == g, "{name}: gradients");
    }
}

#[test]
fn bad_shards_are_errors() {
    let cfg = HeadConfig::default();
    let kc = case(4, 6, 1, 3, 1);
    let p = HeadProblem {
        shape: kc.shape,
        x: &kc.x,
        w: &kc.w,
        labels: &kc.labels,
        sigma_cloud: &kc.sigma,
        seed: 0,
        step: 0,
    };
    let sub = shard_of(&p, 1, 2, 3, &kc.w);
    // The shard does not fit in the head.
    assert!(matches!(
        cpu::shard_forward(&cfg, &sub, ClassShard { first: 4, total: 6 }),
        Err(Error::Shape(_))
    ));
    // An empty shard.
    let empty = HeadProblemOf { shape: HeadShape { c: 0, ..sub.shape }, w: &[], sigma_cloud: &[], ..sub };
    assert!(matches!(
        cpu::shard_forward(&cfg, &empty, ClassShard { first: 2, total: 6 }),
        Err(Error::Empty(_))
    ));
    // A label beyond the whole head's classes.
    let labels = [0, 6, 1, 2];
    let bad = HeadProblemOf { labels: &labels, ..sub };
    assert!(matches!(
        cpu::shard_forward(&cfg, &bad, ClassShard { first: 2, total: 6 }),
        Err(Error::LabelOutOfRange { row: 1, .. })
    ));
    // The combined rows: wrong length, non-finite on a valid row.
    let s = ClassShard { first: 2, total: 6 };
    let ok = [1.0; 4];
    assert!(matches!(cpu::shard_backward(&cfg, &sub, s, &ok[..3], &ok), Err(Error::Shape(_))));
    let nan_lse = [1.0, f64::NAN, 1.0, 1.0];
    assert!(matches!(
        cpu::shard_backward(&cfg, &sub, s, &nan_lse, &ok),
        Err(Error::NonFinite { index: 1, .. })
    ));
    // ... but a NaN on an ignored row (row 3) is never read.
    let ignored_nan = [1.0, 1.0, 1.0, f64::NAN];
    assert!(cpu::shard_backward(&cfg, &sub, s, &ignored_nan, &ok).is_ok());
    assert!(combine(&[], &kc.labels, 6, 0.0, Reduction::Mean).is_err());
}
