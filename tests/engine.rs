//! The training engine on the CPU backend: a short run lowers the loss, the same
//! seed gives bitwise identical weights, checkpoint + resume continues exactly,
//! the backend's operations match the oracle / naive loops, bad checkpoints and
//! mismatched data are errors.

use featcloud::cpu::CpuBackend;
use featcloud::data::{generate, Dataset, SyntheticConfig};
use featcloud::engine::{
    Activation, Backend, Checkpoint, Gemm, HeadBatch, OptimStep, OptimizerConfig, OptimizerKind, TrainConfig,
    Trainer,
};
use featcloud::oracle::head as oracle;
use featcloud::shape::HeadShape;
use featcloud::stats::StatsState;
use featcloud::{CenterMode, CloudMode, HeadConfig, Split, StatsConfig};

fn data() -> Dataset {
    let cfg = SyntheticConfig {
        num_classes: 12,
        input_dim: 16,
        max_per_class: 60,
        imbalance: 20.0,
        test_per_class: 4,
        open_classes: 0,
        seed: 3,
        ..SyntheticConfig::default()
    };
    generate(&cfg).unwrap().train
}

fn config(cloud: CloudMode, kind: OptimizerKind) -> TrainConfig {
    TrainConfig {
        seed: 11,
        epochs: 4,
        batch_size: 32,
        hidden: 32,
        embed_dim: 8,
        head: HeadConfig { s: 16.0, cloud, ..HeadConfig::default() },
        stats: StatsConfig { warmup_steps: 5, split: Split::Threshold(20), ..StatsConfig::default() },
        optim: OptimizerConfig {
            kind,
            lr: if kind == OptimizerKind::Sgd { 0.05 } else { 0.003 },
            warmup_steps: 5,
            ..OptimizerConfig::default()
        },
        ..TrainConfig::default()
    }
}

fn bits(t: &Trainer<CpuBackend>) -> Vec<(String, Vec<u32>)> {
    t.parameters()
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.data.iter().map(|v| v.to_bits()).collect()))
        .collect()
}

#[test]
fn short_run_lowers_the_loss_and_turns_the_cloud_on() {
    let ds = data();
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, config(CloudMode::Symmetric, OptimizerKind::Sgd), &ds).unwrap();
    let mut losses = Vec::new();
    let mut max_sigma = 0.0f32;
    let total = t.total_steps();
    t.run(&ds, total, |i| {
        losses.push(i.loss);
        max_sigma = max_sigma.max(i.max_sigma);
    })
    .unwrap();
    assert_eq!(losses.len() as u64, total);
    let head: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let tail: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(tail < 0.8 * head, "loss did not drop: first {head:.4}, last {tail:.4}");
    assert!(max_sigma > 0.0, "the cloud never turned on");
}

#[test]
fn same_seed_gives_bitwise_identical_training() {
    let ds = data();
    let be = CpuBackend::new();
    for kind in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
        let run = || {
            let mut t = Trainer::new(&be, config(CloudMode::Symmetric, kind), &ds).unwrap();
            let total = t.total_steps();
            t.run(&ds, total, |_| {}).unwrap();
            bits(&t)
        };
        assert_eq!(run(), run(), "{kind:?}");
    }
    // A different seed gives different weights.
    let mut a = Trainer::new(&be, config(CloudMode::Off, OptimizerKind::Sgd), &ds).unwrap();
    let mut b =
        Trainer::new(&be, TrainConfig { seed: 12, ..config(CloudMode::Off, OptimizerKind::Sgd) }, &ds)
            .unwrap();
    a.run(&ds, 3, |_| {}).unwrap();
    b.run(&ds, 3, |_| {}).unwrap();
    assert_ne!(bits(&a), bits(&b));
}

#[test]
fn resume_continues_exactly() {
    let ds = data();
    let be = CpuBackend::new();
    let dir = tempfile::tempdir().unwrap();
    for (cloud, kind, center, subcenters) in [
        (CloudMode::Symmetric, OptimizerKind::Sgd, CenterMode::Ema, 1),
        (CloudMode::OneSided, OptimizerKind::AdamW, CenterMode::ClassWeight, 1),
        // Sub-centers (SPEC 5b): [C, K, D] head and EMA centers through the checkpoint.
        (CloudMode::Symmetric, OptimizerKind::Sgd, CenterMode::Ema, 3),
        (CloudMode::Symmetric, OptimizerKind::AdamW, CenterMode::ClassWeight, 2),
    ] {
        let mut cfg = config(cloud, kind);
        cfg.stats.center = center;
        cfg.head.subcenters = subcenters;
        let mut straight = Trainer::new(&be, cfg.clone(), &ds).unwrap();
        let total = straight.total_steps();
        straight.run(&ds, total, |_| {}).unwrap();

        let mut first = Trainer::new(&be, cfg.clone(), &ds).unwrap();
        let k = total / 2 + 1;
        first.run(&ds, k, |_| {}).unwrap();
        let path = dir.path().join("ck.safetensors");
        first.to_checkpoint().unwrap().save(&path).unwrap();
        let ck = Checkpoint::load(&path).unwrap();
        assert!(ck == first.to_checkpoint().unwrap(), "checkpoint round trip");
        let head = ck.params.iter().find(|p| p.name == "head.w").unwrap();
        let (c, d) = (ds.num_classes, cfg.embed_dim);
        let sc = subcenters as usize;
        let want: Vec<usize> = if sc == 1 { vec![c, d] } else { vec![c, sc, d] };
        assert_eq!(head.shape, want, "head.w shape with K = {sc}");
        assert_eq!(ck.stats.subcenters, sc);
        if center == CenterMode::Ema {
            assert_eq!(ck.stats.centers.len(), c * sc * d);
        }
        assert_eq!(ck.step, k);
        let mut resumed = Trainer::from_checkpoint(&be, &ck, &ds).unwrap();
        resumed.run(&ds, total, |_| {}).unwrap();
        assert!(bits(&straight) == bits(&resumed), "{cloud:?} {kind:?}: resumed weights differ");
        assert!(
            straight.to_checkpoint().unwrap().stats == resumed.to_checkpoint().unwrap().stats,
            "class statistics differ"
        );
    }
}

#[test]
fn bad_checkpoints_and_mismatched_data_are_errors() {
    let ds = data();
    let be = CpuBackend::new();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&be, config(CloudMode::Symmetric, OptimizerKind::Sgd), &ds).unwrap();
    t.run(&ds, 3, |_| {}).unwrap();
    let bytes = t.to_checkpoint().unwrap().to_bytes().unwrap();

    let missing = dir.path().join("nope.safetensors");
    let e = Checkpoint::load(&missing).unwrap_err().to_string();
    assert!(e.contains("nope.safetensors"), "{e}");

    for (name, data) in [
        ("garbage.safetensors", b"definitely not a checkpoint".to_vec()),
        ("truncated.safetensors", bytes[..bytes.len() / 2].to_vec()),
        ("empty.safetensors", Vec::new()),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        let e = Checkpoint::load(&p).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
    // A valid safetensors file that is not a featcloud checkpoint.
    let p = dir.path().join("foreign.safetensors");
    let raw = [0u8; 8];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &raw).unwrap();
    std::fs::write(&p, safetensors::serialize([("x", view)], None).unwrap()).unwrap();
    assert!(Checkpoint::load(&p).is_err());

    // A tensor whose shape does not fit its data cannot be serialized, and the error says so.
    let mut broken = t.to_checkpoint().unwrap();
    broken.params[0].shape.push(2);
    let name = broken.params[0].name.clone();
    match broken.save(&dir.path().join("broken.safetensors")) {
        Err(e @ featcloud::Error::Serialize { .. }) => {
            assert!(e.to_string().contains(&format!("checkpoint tensor '{name}'")), "{e}")
        }
        other => panic!("expected a serialization error, got {other:?}"),
    }
    assert!(!dir.path().join("broken.safetensors").exists(), "a failed save left a file");

    // Other data than the checkpoint was trained on.
    let ck = t.to_checkpoint().unwrap();
    let mut other = ds.clone();
    other.features[0] += 1.0;
    assert!(Trainer::from_checkpoint(&be, &ck, &other).is_err());
    let fewer = ds.subset(&(0..ds.n - 1).collect::<Vec<_>>());
    assert!(Trainer::from_checkpoint(&be, &ck, &fewer).is_err());
    assert!(t.run(&other, 5, |_| {}).is_err(), "run() checks the data too");
}

#[test]
fn invalid_configs_are_errors() {
    let ds = data();
    let be = CpuBackend::new();
    let base = config(CloudMode::Symmetric, OptimizerKind::Sgd);
    let bad = [
        TrainConfig { batch_size: 0, ..base.clone() },
        TrainConfig { epochs: 0, ..base.clone() },
        TrainConfig { hidden: 0, ..base.clone() },
        TrainConfig { optim: OptimizerConfig { lr: f32::NAN, ..base.optim.clone() }, ..base.clone() },
        TrainConfig { head: HeadConfig { s: -1.0, ..base.head }, ..base.clone() },
        TrainConfig { stats: StatsConfig { beta: 1.5, ..base.stats.clone() }, ..base.clone() },
    ];
    for cfg in bad {
        assert!(Trainer::new(&be, cfg.clone(), &ds).is_err(), "{cfg:?}");
    }
}

fn rand_vec(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) as f32 / u32::MAX as f32) - 0.5)
        .collect()
}

#[test]
fn backend_ops_match_naive_loops_and_the_oracle() {
    let be = CpuBackend::new();
    // gemm, all transposes.
    let (m, n, k) = (7, 5, 9);
    let a = rand_vec(m * k, 1);
    let b = rand_vec(k * n, 2);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let mut c = rand_vec(m * n, 3);
        let c0 = c.clone();
        be.gemm(Gemm { trans_a: ta, trans_b: tb, m, n, k, alpha: 1.5, beta: 0.5 }, &a, &b, &mut c).unwrap();
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| {
                        let av = if ta { a[p * m + i] } else { a[i * k + p] };
                        let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                        av as f64 * bv as f64
                    })
                    .sum();
                let want = 1.5 * s + 0.5 * c0[i * n + j] as f64;
                assert!((c[i * n + j] as f64 - want).abs() < 1e-5);
            }
        }
    }
    let mut c = vec![0.0; 3];
    assert!(be
        .gemm(Gemm { trans_a: false, trans_b: false, m, n, k, alpha: 1.0, beta: 0.0 }, &a, &b, &mut c)
        .is_err());

    // bias + relu forward and backward.
    let (rows, cols) = (6, 70);
    let bias = rand_vec(cols, 4);
    let x = rand_vec(rows * cols, 5);
    let mut y = x.clone();
    be.bias_act_forward(&mut y, &bias, Activation::Relu).unwrap();
    let mut dy = rand_vec(rows * cols, 6);
    let dy0 = dy.clone();
    let mut db = vec![0.0; cols];
    be.bias_act_backward(&mut dy, &y, &mut db, Activation::Relu).unwrap();
    for j in 0..cols {
        let mut s = 0.0f64;
        for i in 0..rows {
            let z = x[i * cols + j] + bias[j];
            assert_eq!(y[i * cols + j], z.max(0.0));
            let g = if z > 0.0 { dy0[i * cols + j] } else { 0.0 };
            assert_eq!(dy[i * cols + j], g);
            s += g as f64;
        }
        assert!((db[j] as f64 - s).abs() < 1e-6);
    }

    // Optimizers against their formulas.
    let p0 = rand_vec(10, 7);
    let g = rand_vec(10, 8);
    let sgd = OptimizerConfig { kind: OptimizerKind::Sgd, momentum: 0.9, ..OptimizerConfig::default() };
    let mut p = p0.clone();
    let mut st = vec![vec![0.1f32; 10]];
    be.optimizer_step(&sgd, OptimStep { lr: 0.5, weight_decay: 0.01, t: 1 }, &mut p, &g, &mut st).unwrap();
    for i in 0..10 {
        let m = 0.9 * 0.1 + (g[i] + 0.01 * p0[i]);
        assert!((st[0][i] - m).abs() < 1e-6 && (p[i] - (p0[i] - 0.5 * m)).abs() < 1e-6);
    }
    let adam = OptimizerConfig { kind: OptimizerKind::AdamW, ..OptimizerConfig::default() };
    let mut p = p0.clone();
    let mut st = vec![vec![0.0f32; 10], vec![0.0f32; 10]];
    be.optimizer_step(&adam, OptimStep { lr: 0.01, weight_decay: 0.1, t: 1 }, &mut p, &g, &mut st).unwrap();
    for i in 0..10 {
        // First Adam step: m_hat = g, v_hat = g^2, update = sign(g) (up to eps).
        let want = p0[i] - 0.01 * (g[i] / (g[i].abs() + 1e-8) + 0.1 * p0[i]);
        assert!((p[i] - want).abs() < 1e-5, "{i}: {} vs {want}", p[i]);
    }
    assert!(be
        .optimizer_step(&adam, OptimStep { lr: 0.01, weight_decay: 0.0, t: 1 }, &mut p, &g, &mut st[..1])
        .is_err());

    // Head against the oracle through the Backend trait.
    let shape = HeadShape { b: 9, c: 6, d: 13 };
    let x = rand_vec(shape.b * shape.d, 9);
    let w = rand_vec(shape.c * shape.d, 10);
    let labels = vec![0, 5, 2, -1, 3, 3, 1, 4, 0];
    let sigma = vec![0.1, 0.0, 0.3, 0.2, 0.05, 0.4];
    let cfg = HeadConfig::default();
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    let batch = HeadBatch { shape, x: &x, w: &w, labels: &labels, sigma_cloud: &sigma, seed: 5, step: 77 };
    let out = be.head_forward_backward(&cfg, batch, &mut dx, &mut dw).unwrap();
    let p =
        oracle::HeadProblem { shape, x: &x, w: &w, labels: &labels, sigma_cloud: &sigma, seed: 5, step: 77 };
    let want = oracle::forward(&cfg, &p).unwrap();
    let grads = oracle::backward(&cfg, &p, oracle::Upstream::Scalar(1.0)).unwrap();
    assert!((out.loss - want.loss).abs() <= 1e-5 * want.loss.abs());
    assert_eq!(out.n_valid, 8);
    let max = grads.dx.iter().chain(&grads.dw).fold(0.0f64, |m, v| m.max(v.abs()));
    for (got, want) in dx.iter().zip(&grads.dx).chain(dw.iter().zip(&grads.dw)) {
        assert!((*got as f64 - want).abs() <= 1e-4 * max);
    }

    // Statistics through the trait == the oracle's statistics.
    for center in [CenterMode::Ema, CenterMode::ClassWeight] {
        let scfg = StatsConfig {
            warmup_steps: 1,
            split: Split::Threshold(2),
            center,
            class_counts: None,
            ..StatsConfig::default()
        };
        let mut s = be.stats_new(shape.c, 1, shape.d, &scfg).unwrap();
        let mut o = StatsState::new(shape.c, shape.d, scfg.clone()).unwrap();
        for step in 0..3 {
            be.stats_update(&mut s, &x, &labels, &out).unwrap();
            match center {
                CenterMode::Ema => o.update(&x, &labels).unwrap(),
                CenterMode::ClassWeight => {
                    o.update_from_angles(&labels, &oracle::target_angles(&want.rows)).unwrap()
                }
            }
            let mut sig = vec![0.0; shape.c];
            be.stats_cloud_sigma(&s, &mut sig).unwrap();
            for (a, b) in sig.iter().zip(o.cloud_sigma()) {
                assert!((*a as f64 - b).abs() < 1e-5, "{center:?} step {step}");
            }
        }
        let st = be.stats_export(&s).unwrap();
        let back = be.stats_import(&st).unwrap();
        assert_eq!(be.stats_export(&back).unwrap(), st);
    }
}

/// A NaN feature reaches the head through the MLP (`Dataset::new` refuses one, but an MLP
/// can produce one): with `NonFinitePolicy::Error` the run stops with an error naming the
/// step and the head's input, having applied nothing of that step (the weights equal a clean
/// run's up to it, bitwise); with `SkipStep` that step and every later batch holding the row
/// are left out, each leaving the weights exactly as they were, and the run finishes finite.
#[test]
fn non_finite_steps_stop_or_are_skipped() {
    use featcloud::engine::NonFinitePolicy;
    let clean = data();
    let mut bad = clean.clone();
    let row = 17;
    bad.features[row * bad.f + 3] = f32::NAN;
    let be = CpuBackend::new();
    let cfg = TrainConfig { epochs: 2, ..config(CloudMode::Symmetric, OptimizerKind::AdamW) };

    let mut t = Trainer::new(&be, cfg.clone(), &bad).unwrap();
    let err = t.run(&bad, u64::MAX, |_| {}).unwrap_err();
    let featcloud::Error::NonFiniteStep { step, cause } = &err else { panic!("{err}") };
    let step = *step;
    assert!(matches!(**cause, featcloud::Error::NonFinite { ref what, .. } if what == "x"), "{cause}");
    assert_eq!(err.to_string().matches("non-finite value").count(), 1, "the cause once: {err}");
    assert!(
        err.to_string().starts_with(&format!("training step {step}: non-finite value in x at index ")),
        "{err}"
    );
    assert_eq!(t.step(), step, "the failed step was not counted");
    let mut reference = Trainer::new(&be, cfg.clone(), &clean).unwrap();
    reference.run(&clean, step, |_| {}).unwrap();
    assert_eq!(bits(&t), bits(&reference), "nothing of the failed step was applied");

    let skip = TrainConfig { on_nonfinite: NonFinitePolicy::SkipStep, ..cfg };
    let mut t = Trainer::new(&be, skip, &bad).unwrap();
    t.run(&bad, step, |_| {}).unwrap();
    let before = bits(&t);
    let info = t.train_step(&bad).unwrap();
    assert!(info.skipped && info.loss.is_nan() && info.step == step);
    assert_eq!(bits(&t), before, "a skipped step changes no weight");
    let mut skipped = vec![step];
    t.run(&bad, u64::MAX, |i| {
        if i.skipped {
            skipped.push(i.step)
        }
    })
    .unwrap();
    assert_eq!(t.step(), t.total_steps());
    assert_eq!(t.skipped_steps() as usize, skipped.len());
    assert_eq!(skipped.len(), 2, "one batch per epoch holds the row: {skipped:?}");
    assert!(t.parameters().unwrap().iter().all(|p| p.data.iter().all(|v| v.is_finite())));
}

/// `SkipStep` only skips while the model is finite: from weights holding a NaN every step
/// would be skipped and the run end on a NaN checkpoint, so the step is an error naming them.
#[test]
fn skip_step_refuses_non_finite_weights() {
    use featcloud::engine::NonFinitePolicy;
    let ds = data();
    let be = CpuBackend::new();
    let cfg =
        TrainConfig { on_nonfinite: NonFinitePolicy::SkipStep, ..config(CloudMode::Off, OptimizerKind::Sgd) };
    let mut ck = Trainer::new(&be, cfg, &ds).unwrap().to_checkpoint().unwrap();
    let head = ck.params.iter_mut().find(|t| t.name.contains("head")).expect("a head tensor");
    head.data[5] = f32::NAN;
    let name = head.name.clone();
    let mut t = Trainer::from_checkpoint(&be, &ck, &ds).unwrap();
    let err = t.train_step(&ds).unwrap_err().to_string();
    assert!(
        err.starts_with("training step 0: non-finite value in the model's weights ('") && err.contains(&name),
        "{err}"
    );
    assert_eq!(t.step(), 0);
}

/// Sub-centers train (SPEC 5b): with K = 3 the loss falls, more than one sub-center of some
/// class ends up used by the statistics (their EMA centers are no longer all zero), and a
/// K = 3 run differs from K = 1 (the option is not ignored).
#[test]
fn subcenters_train_and_use_several_centers() {
    let ds = data();
    let be = CpuBackend::new();
    let mut cfg = config(CloudMode::Symmetric, OptimizerKind::Sgd);
    cfg.head.subcenters = 3;
    let mut t = Trainer::new(&be, cfg.clone(), &ds).unwrap();
    let total = t.total_steps();
    let mut losses = Vec::new();
    t.run(&ds, total, |i| losses.push(i.loss)).unwrap();
    let n = losses.len() / 4;
    let (first, last) = (losses[..n].iter().sum::<f64>(), losses[losses.len() - n..].iter().sum::<f64>());
    assert!(last < first * 0.8, "loss {first} -> {last}");
    let ck = t.to_checkpoint().unwrap();
    let d = cfg.embed_dim;
    let used = |j: usize| {
        (0..3)
            .filter(|&k| ck.stats.centers[(j * 3 + k) * d..(j * 3 + k + 1) * d].iter().any(|&v| v != 0.0))
            .count()
    };
    assert!((0..ds.num_classes).any(|j| used(j) > 1), "no class has more than one used sub-center");
    let mut k1 = Trainer::new(&be, config(CloudMode::Symmetric, OptimizerKind::Sgd), &ds).unwrap();
    k1.run(&ds, total, |_| {}).unwrap();
    assert!(bits(&k1) != bits(&t));
}
