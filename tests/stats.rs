//! LEAP class statistics (SPEC section 5): host-side bucketing, configuration checks,
//! the safetensors state file and the summary on the CPU; the device kernels
//! (`kernels/stats.cu`) against the CPU oracle when a GPU is present.

use featcloud::config::{CenterMode, Split, StatsConfig};
use featcloud::cuda::stats::{
    bucket_labels, check_config, compare_with_oracle, smoke, synthetic_batch, ClassStats, STATS_TOLERANCE,
};
use featcloud::cuda::{kernels, test_device, Device, DeviceElem, Tensor};
use featcloud::dtype::DType;
use featcloud::stats::{Precision, StatsState};
use featcloud::statsfile::FORMAT;
use featcloud::Error;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;

fn cfg(split: Split, warmup_steps: u64) -> StatsConfig {
    StatsConfig { split, warmup_steps, ..StatsConfig::default() }
}

/// An oracle after a few long-tailed batches.
fn trained_oracle(c: usize, d: usize, cfg: StatsConfig, steps: u64) -> StatsState {
    let mut o = StatsState::new(c, d, cfg).unwrap();
    for s in 0..steps {
        let (x, labels) = synthetic_batch(s, 64, c, d, DType::F32);
        match o.cfg.center {
            CenterMode::Ema => o.update(&x, &labels).unwrap(),
            CenterMode::ClassWeight => {
                let theta: Vec<f64> = x.iter().map(|v| (v.clamp(-1.0, 1.0) as f64).acos()).collect();
                o.update_from_angles(&labels, &theta[..labels.len()]).unwrap()
            }
        }
    }
    o
}

// ---- CPU: bucketing ----------------------------------------------------------------------

#[test]
fn bucket_labels_groups_rows_by_ascending_class() {
    let labels = [5, 2, -1, 5, 0, 2, 5, -7, 9];
    let s = bucket_labels(&labels, 10).unwrap();
    assert_eq!(s.classes, vec![0, 2, 5, 9]);
    assert_eq!(s.starts, vec![0, 1, 3, 6, 7]);
    assert_eq!(s.rows, vec![4, 1, 5, 0, 3, 6, 8]);
    assert_eq!(s.len(), 4);
    assert_eq!(s.packed(), vec![0, 2, 5, 9, 0, 1, 3, 6, 7, 4, 1, 5, 0, 3, 6, 8]);
}

#[test]
fn bucket_labels_handles_empty_and_ignored_batches() {
    for labels in [&[][..], &[-1, -1, -3][..]] {
        let s = bucket_labels(labels, 3).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.starts, vec![0]);
        assert!(s.rows.is_empty());
    }
}

#[test]
fn bucket_labels_rejects_labels_out_of_range() {
    let err = bucket_labels(&[0, 3, 1], 3).unwrap_err();
    assert!(matches!(err, Error::LabelOutOfRange { row: 1, label: 3, classes: 3 }), "{err}");
}

#[test]
fn bucket_labels_matches_a_naive_grouping() {
    let (_, labels) = synthetic_batch(7, 500, 37, 1, DType::F32);
    let s = bucket_labels(&labels, 37).unwrap();
    let mut expect_classes = Vec::new();
    let mut expect_rows = Vec::new();
    for k in 0..37 {
        let rows: Vec<i32> = (0..labels.len() as i32).filter(|&i| labels[i as usize] == k).collect();
        if !rows.is_empty() {
            expect_classes.push(k);
            expect_rows.extend(rows);
        }
    }
    assert_eq!(s.classes, expect_classes);
    assert_eq!(s.rows, expect_rows);
    for (seg, &k) in s.classes.iter().enumerate() {
        let (a, b) = (s.starts[seg] as usize, s.starts[seg + 1] as usize);
        assert!(a < b, "empty segment");
        assert!(s.rows[a..b].iter().all(|&i| labels[i as usize] == k));
    }
}

// ---- CPU: configuration --------------------------------------------------------------------

#[test]
fn bad_configuration_is_an_error() {
    let ok = StatsConfig::default();
    assert!(check_config(10, 8, &ok).is_ok());
    for beta in [-0.1, 1.0, 1.5, f32::NAN] {
        let c = StatsConfig { beta, ..ok.clone() };
        assert!(matches!(check_config(10, 8, &c), Err(Error::InvalidConfig(_))), "beta {beta}");
        assert!(StatsState::new(10, 8, c).is_err());
    }
    assert!(check_config(10, 8, &StatsConfig { beta: 0.0, ..ok.clone() }).is_ok());
    let t0 = StatsConfig { split: Split::Threshold(0), ..ok.clone() };
    assert!(matches!(check_config(10, 8, &t0), Err(Error::InvalidConfig(_))));
    let counts = StatsConfig { class_counts: Some(vec![1; 9]), ..ok.clone() };
    assert!(matches!(check_config(10, 8, &counts), Err(Error::InvalidConfig(_))));
    assert!(check_config(9, 8, &counts).is_ok());
    assert!(matches!(check_config(0, 8, &ok), Err(Error::Empty(_))));
    assert!(matches!(check_config(10, 0, &ok), Err(Error::Empty(_))));
    assert!(matches!(check_config((1 << 30) + 1, 1, &ok), Err(Error::Shape(_))));
}

// ---- CPU: state file ---------------------------------------------------------------------------

#[test]
fn oracle_state_round_trips_through_bytes_and_files() {
    let counts: Vec<u64> = (0..23).map(|k| 200 / (k + 1)).collect();
    for cfg in [
        cfg(Split::Threshold(5), 2),
        cfg(Split::Adaptive, 0),
        StatsConfig { class_counts: Some(counts.clone()), ..cfg(Split::Threshold(20), 1) },
        StatsConfig { center: CenterMode::ClassWeight, ..cfg(Split::Adaptive, 3) },
    ] {
        let o = trained_oracle(23, 6, cfg, 4);
        let snap = o.clone();
        assert_eq!(snap.precision, Precision::F64);
        let back = StatsState::from_bytes(&snap.to_bytes().unwrap()).unwrap();
        assert_eq!(back, snap);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.safetensors");
        snap.save(&path).unwrap();
        let loaded = StatsState::load(&path).unwrap();
        assert_eq!(loaded, snap);
        // A run resumed from the file continues bitwise like the uninterrupted one.
        let mut resumed = loaded.clone();
        let mut original = o.clone();
        assert_eq!(resumed, original);
        let (x, labels) = synthetic_batch(99, 64, 23, 6, DType::F32);
        match original.cfg.center {
            CenterMode::Ema => {
                original.update(&x, &labels).unwrap();
                resumed.update(&x, &labels).unwrap();
            }
            CenterMode::ClassWeight => {
                let theta: Vec<f64> = (0..64).map(|i| 0.5 + i as f64 * 0.01).collect();
                original.update_from_angles(&labels, &theta).unwrap();
                resumed.update_from_angles(&labels, &theta).unwrap();
            }
        }
        assert_eq!(resumed, original);
        assert_eq!(
            resumed.cloud_sigma().iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
            original.cloud_sigma().iter().map(|s| s.to_bits()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn f32_state_is_saved_as_f32_and_round_trips_exactly() {
    let o = trained_oracle(11, 5, cfg(Split::Threshold(3), 0), 3);
    let mut snap = o.clone();
    snap.precision = Precision::F32;
    for v in [&mut snap.mu, &mut snap.v, &mut snap.centers] {
        for x in v.iter_mut() {
            *x = *x as f32 as f64;
        }
    }
    let bytes = snap.to_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for name in ["mu", "v", "centers"] {
        assert_eq!(st.tensor(name).unwrap().dtype(), Dtype::F32, "{name}");
    }
    assert_eq!(st.tensor("n").unwrap().dtype(), Dtype::U64);
    assert_eq!(st.tensor("initialized").unwrap().dtype(), Dtype::U8);
    assert_eq!(st.tensor("centers").unwrap().shape(), &[11, 5]);
    assert_eq!(StatsState::from_bytes(&bytes).unwrap(), snap);
}

#[test]
fn class_weight_state_has_no_centers_tensor() {
    let o =
        trained_oracle(9, 4, StatsConfig { center: CenterMode::ClassWeight, ..StatsConfig::default() }, 2);
    let bytes = o.to_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(!st.names().contains(&"centers"));
    assert!(!st.names().contains(&"class_counts"));
}

/// Writes a file from parts, so that each piece can be broken on purpose.
fn handmade(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)], meta: &[(&str, String)]) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, dt, shape, b)| (n.to_string(), TensorView::new(*dt, shape.clone(), b).unwrap()))
        .collect();
    let meta: HashMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

#[test]
fn corrupt_state_files_are_rejected() {
    let o = trained_oracle(4, 3, cfg(Split::Threshold(2), 0), 2);
    let snap = o.clone();
    let f64s = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let u64s = |v: &[u64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let init: Vec<u8> = snap.initialized.iter().map(|&b| b as u8).collect();
    let config = serde_json::to_string(&snap.cfg).unwrap();
    let good_tensors = || {
        vec![
            ("mu", Dtype::F64, vec![4], f64s(&snap.mu)),
            ("v", Dtype::F64, vec![4], f64s(&snap.v)),
            ("n", Dtype::U64, vec![4], u64s(&snap.n)),
            ("initialized", Dtype::U8, vec![4], init.clone()),
            ("centers", Dtype::F64, vec![4, 3], f64s(&snap.centers)),
        ]
    };
    let good_meta = || {
        vec![
            ("format", FORMAT.to_string()),
            ("config", config.clone()),
            ("c", "4".to_string()),
            ("d", "3".to_string()),
            ("updates", snap.updates.to_string()),
        ]
    };
    assert_eq!(StatsState::from_bytes(&handmade(&good_tensors(), &good_meta())).unwrap(), snap);

    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    cases.push(("not safetensors", b"hello world, not a file".to_vec()));
    let mut m = good_meta();
    m[0].1 = "something-else".into();
    cases.push(("format tag", handmade(&good_tensors(), &m)));
    let mut m = good_meta();
    m.remove(4);
    cases.push(("missing updates", handmade(&good_tensors(), &m)));
    let mut m = good_meta();
    m[2].1 = "5".into();
    cases.push(("C mismatch", handmade(&good_tensors(), &m)));
    let mut t = good_tensors();
    t.remove(4);
    cases.push(("missing centers", handmade(&t, &good_meta())));
    let mut t = good_tensors();
    t[4].2 = vec![3, 4];
    cases.push(("centers shape", handmade(&t, &good_meta())));
    let mut t = good_tensors();
    t[3].3[0] = 7;
    cases.push(("initialized not 0/1", handmade(&t, &good_meta())));
    let mut t = good_tensors();
    t[2] = ("n", Dtype::F64, vec![4], f64s(&[1.0; 4]));
    cases.push(("n dtype", handmade(&t, &good_meta())));
    let mut t = good_tensors();
    t[0] = ("mu", Dtype::F32, vec![4], vec![0u8; 16]);
    cases.push(("mixed float dtypes", handmade(&t, &good_meta())));
    let mut t = good_tensors();
    t[1].3 = f64s(&[f64::NAN, 0.0, 0.0, 0.0]);
    cases.push(("non-finite v", handmade(&t, &good_meta())));
    let mut t = good_tensors();
    t[2].3 = u64s(&[0, 0, 0, 0]);
    cases.push(("initialized without samples", handmade(&t, &good_meta())));
    let mut t = good_tensors();
    t.push(("class_counts", Dtype::U64, vec![3], u64s(&[1, 2, 3])));
    cases.push(("class_counts length", handmade(&t, &good_meta())));
    let mut m = good_meta();
    m[1].1 = serde_json::to_string(&StatsConfig { beta: 1.5, ..snap.cfg.clone() }).unwrap();
    cases.push(("beta out of range", handmade(&good_tensors(), &m)));
    for (what, bytes) in cases {
        match StatsState::from_bytes(&bytes) {
            Err(Error::Format { .. }) => {}
            other => panic!("{what}: expected a format error, got {other:?}"),
        }
    }
    let missing = std::path::Path::new("/nonexistent/featcloud/stats.safetensors");
    assert!(matches!(StatsState::load(missing), Err(Error::Io { .. })));
}

// ---- CPU: summary -------------------------------------------------------------------------------

#[test]
fn summary_reports_the_oracle_cloud_and_head_tail_split() {
    let o = trained_oracle(30, 8, cfg(Split::Threshold(4), 2), 5);
    let s = o.summary().unwrap();
    let sigma = o.cloud_sigma();
    assert!(s.warm);
    assert_eq!(s.updates, 5);
    assert_eq!(s.head_variance, o.head_variance());
    assert!(s.head_variance.is_some(), "the synthetic head classes reach T = 4");
    assert_eq!(s.head.classes + s.tail.classes, 30);
    for (k, cs) in s.classes.iter().enumerate() {
        assert_eq!(cs.class, k);
        assert_eq!(cs.cloud_std, sigma[k]);
        assert_eq!(cs.seen, o.n[k]);
        assert_eq!(cs.head, o.initialized[k] && o.n[k] >= 4);
        assert_eq!(cs.angular_std, o.variances()[k].sqrt());
        if cs.head {
            assert_eq!(cs.cloud_std, 0.0, "head classes get no cloud in threshold mode");
        }
    }
    assert_eq!(s.head.samples + s.tail.samples, o.n.iter().sum::<u64>());
    let var_h = s.head_variance.unwrap();
    assert!((s.head.mean_angular_std.powi(2) - var_h).abs() < var_h, "head std and var_h agree roughly");
    assert!(s.tail.max_cloud_std > 0.0);

    let cold = trained_oracle(30, 8, cfg(Split::Threshold(4), 10), 5);
    let s = cold.summary().unwrap();
    assert!(!s.warm);
    assert!(s.classes.iter().all(|c| c.cloud_std == 0.0));

    let adaptive = trained_oracle(30, 8, cfg(Split::Adaptive, 0), 5);
    let s = adaptive.summary().unwrap();
    let var_h = adaptive.head_variance().unwrap();
    for cs in &s.classes {
        assert_eq!(cs.head, cs.initialized && cs.angular_std.powi(2) >= var_h);
        if cs.head {
            assert_eq!(cs.cloud_std, 0.0);
        }
    }
}

// ---- CPU: build products ---------------------------------------------------------------------------

#[test]
fn stats_kernels_are_embedded_and_do_not_spill() {
    if !kernels::KERNELS_BUILT {
        eprintln!("skipped: built without NVRTC");
        return;
    }
    let names = [
        "stats_update_f32",
        "stats_update_bf16",
        "stats_update_f16",
        "stats_angles_f32",
        "stats_reduce_f32",
        "stats_cloud_f32",
    ];
    for &arch in kernels::CUBIN_ARCHS {
        for name in names {
            let r = kernels::RESOURCES
                .iter()
                .find(|r| r.module == "stats" && r.kernel == name && r.arch == arch)
                .unwrap_or_else(|| panic!("{name} sm_{arch} missing from RESOURCES"));
            assert!(r.hot, "{name} should be marked hot");
            assert_eq!((r.spill_stores, r.spill_loads, r.stack_bytes), (0, 0, 0), "{name} sm_{arch}: {r:?}");
        }
    }
}

#[test]
fn synthetic_batches_are_deterministic_and_rounded() {
    let a = synthetic_batch(3, 50, 10, 7, DType::BF16);
    assert_eq!(a, synthetic_batch(3, 50, 10, 7, DType::BF16));
    assert!(a.0.iter().all(|&v| DType::BF16.round(v) == v));
    assert_eq!(*a.1.last().unwrap(), 9);
}

// ---- GPU: against the oracle --------------------------------------------------------------------------

/// Runs `steps` batches through both, checking sigma (before each update, the training
/// order) and the full state after each update.
fn run_ema<T: DeviceElem>(dev: &Device, c: usize, d: usize, b: usize, cfg: StatsConfig, steps: u64) {
    let mut gpu = ClassStats::new(dev, c, d, cfg.clone()).unwrap();
    let mut oracle = StatsState::new(c, d, cfg.clone()).unwrap();
    for step in 0..steps {
        let sigma = gpu.cloud_sigma(dev).unwrap().to_host(dev).unwrap();
        if step < cfg.warmup_steps {
            assert!(sigma.iter().all(|&s| s == 0.0), "step {step}: warm-up must give zero sigma");
        }
        let (x, labels) = synthetic_batch(17 * step + c as u64, b, c, d, T::DTYPE);
        gpu.update(dev, &Tensor::<T>::from_f32(dev, &x, &[b, d]).unwrap(), &labels).unwrap();
        oracle.update(&x, &labels).unwrap();
        let e = compare_with_oracle(dev, &mut gpu, &oracle).unwrap();
        assert!(
            e.passes(STATS_TOLERANCE),
            "{} C={c} D={d} B={b} {:?} step {step}: {e:?}",
            T::DTYPE.name(),
            cfg.split
        );
    }
}

#[test]
fn gpu_ema_update_matches_oracle_every_dtype_and_split() {
    let Some(dev) = test_device() else { return };
    for split in [Split::Threshold(5), Split::Adaptive] {
        let cfg = cfg(split, 3);
        run_ema::<f32>(&dev, 29, 70, 101, cfg.clone(), 7);
        run_ema::<half::bf16>(&dev, 29, 70, 101, cfg.clone(), 7);
        run_ema::<half::f16>(&dev, 29, 70, 101, cfg, 7);
    }
}

#[test]
fn gpu_ema_update_shapes_and_partitions() {
    let Some(dev) = test_device() else { return };
    // D = 1; D = 513 (three dims per thread, last partial); C > 1024 (several cloud blocks)
    // and C > 4096 (several reduce partials); B = 1; dataset class counts.
    run_ema::<f32>(&dev, 7, 1, 33, cfg(Split::Threshold(3), 0), 3);
    run_ema::<f32>(&dev, 13, 513, 40, cfg(Split::Adaptive, 1), 3);
    run_ema::<f32>(&dev, 5000, 8, 3000, cfg(Split::Threshold(2), 0), 3);
    run_ema::<half::bf16>(&dev, 9000, 4, 4000, cfg(Split::Adaptive, 0), 2);
    run_ema::<f32>(&dev, 3, 16, 1, cfg(Split::Threshold(1), 0), 4);
    let counts: Vec<u64> = (0..50).map(|k| 1000 / (k + 1)).collect();
    run_ema::<f32>(
        &dev,
        50,
        24,
        80,
        StatsConfig { class_counts: Some(counts), ..cfg(Split::Threshold(40), 1) },
        4,
    );
}

#[test]
fn gpu_first_seen_classes_single_samples_and_ignored_rows() {
    let Some(dev) = test_device() else { return };
    let (c, d) = (10, 5);
    let cfg = cfg(Split::Threshold(3), 0);
    let mut gpu = ClassStats::new(&dev, c, d, cfg.clone()).unwrap();
    let mut oracle = StatsState::new(c, d, cfg).unwrap();
    let batches: [&[i32]; 5] = [&[4, 4, 4, 7, -1], &[4, 2, -1, -1, 4], &[-1, -1], &[9, 4, 4, 7, 0], &[]];
    for (s, labels) in batches.iter().enumerate() {
        let (x, _) = synthetic_batch(s as u64, labels.len().max(1), c, d, DType::F32);
        let x = &x[..labels.len() * d];
        if labels.is_empty() {
            // An empty batch still counts as a step; the device needs no tensor for it.
            let t = Tensor::<f32>::zeros(&dev, &[0, d]).unwrap();
            gpu.update(&dev, &t, labels).unwrap();
        } else {
            gpu.update(&dev, &Tensor::<f32>::from_host(&dev, x, &[labels.len(), d]).unwrap(), labels)
                .unwrap();
        }
        oracle.update(x, labels).unwrap();
        let e = compare_with_oracle(&dev, &mut gpu, &oracle).unwrap();
        assert!(e.passes(STATS_TOLERANCE), "batch {s}: {e:?}");
    }
    // Class 7 was seen once per batch: a one-sample class has angle ~ 0 and variance 0.
    let snap = gpu.snapshot(&dev).unwrap();
    assert!(snap.mu[9].abs() < 1e-5, "single sample angle {}", snap.mu[9]);
}

#[test]
fn gpu_no_head_class_gives_zero_sigma() {
    let Some(dev) = test_device() else { return };
    let mut gpu = ClassStats::new(&dev, 20, 6, cfg(Split::Threshold(1_000_000), 0)).unwrap();
    let (x, labels) = synthetic_batch(1, 64, 20, 6, DType::F32);
    gpu.update(&dev, &Tensor::<f32>::from_host(&dev, &x, &[64, 6]).unwrap(), &labels).unwrap();
    assert_eq!(gpu.head_variance(&dev).unwrap(), None);
    assert!(gpu.cloud_sigma(&dev).unwrap().to_host(&dev).unwrap().iter().all(|&s| s == 0.0));
}

#[test]
fn gpu_class_weight_update_from_cos_and_angles_matches_oracle() {
    let Some(dev) = test_device() else { return };
    for split in [Split::Threshold(4), Split::Adaptive] {
        let cfg = StatsConfig { center: CenterMode::ClassWeight, ..cfg(split, 2) };
        let (c, b) = (300, 257);
        let mut from_cos = ClassStats::new(&dev, c, 16, cfg.clone()).unwrap();
        let mut from_theta = ClassStats::new(&dev, c, 16, cfg.clone()).unwrap();
        assert!(from_cos.centers().is_none(), "class_weight allocates no [C, D] state");
        let mut oracle = StatsState::new(c, 16, cfg).unwrap();
        for step in 0..5 {
            let (x, labels) = synthetic_batch(50 + step, b, c, 1, DType::F32);
            // Include the clamp edges: exactly +-1 and beyond the 1e-7 band.
            let mut cos: Vec<f32> = x.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
            cos[0] = 1.0;
            cos[1] = -1.0;
            let theta: Vec<f64> =
                cos.iter().map(|&c| (c as f64).clamp(-1.0 + 1e-7, 1.0 - 1e-7).acos()).collect();
            let theta32: Vec<f32> = theta.iter().map(|&t| t as f32).collect();
            from_cos.update_from_cos(&dev, &labels, &Tensor::from_host(&dev, &cos, &[b]).unwrap()).unwrap();
            from_theta
                .update_from_angles(&dev, &labels, &Tensor::from_host(&dev, &theta32, &[b]).unwrap())
                .unwrap();
            let theta_rounded: Vec<f64> = theta32.iter().map(|&t| t as f64).collect();
            oracle.update_from_angles(&labels, &theta_rounded).unwrap();
            for gpu in [&mut from_cos, &mut from_theta] {
                let e = compare_with_oracle(&dev, gpu, &oracle).unwrap();
                assert!(e.passes(STATS_TOLERANCE), "{split:?} step {step}: {e:?}");
            }
        }
    }
}

#[test]
fn gpu_wrong_mode_shape_or_label_is_an_error() {
    let Some(dev) = test_device() else { return };
    let mut ema = ClassStats::new(&dev, 5, 4, StatsConfig::default()).unwrap();
    let theta = Tensor::<f32>::zeros(&dev, &[2]).unwrap();
    assert!(matches!(ema.update_from_angles(&dev, &[0, 1], &theta), Err(Error::InvalidConfig(_))));
    let x = Tensor::<f32>::zeros(&dev, &[2, 3]).unwrap();
    assert!(matches!(ema.update(&dev, &x, &[0, 1]), Err(Error::Shape(_))));
    let x = Tensor::<f32>::zeros(&dev, &[2, 4]).unwrap();
    assert!(matches!(ema.update(&dev, &x, &[0, 5]), Err(Error::LabelOutOfRange { .. })));
    assert_eq!(ema.updates(), 0, "failed updates do not count");
    let mut cw = ClassStats::new(
        &dev,
        5,
        4,
        StatsConfig { center: CenterMode::ClassWeight, ..StatsConfig::default() },
    )
    .unwrap();
    assert!(matches!(cw.update(&dev, &x, &[0, 1]), Err(Error::InvalidConfig(_))));
    assert!(matches!(cw.update_from_cos(&dev, &[0, 1, 2], &theta), Err(Error::Shape(_))));
    assert!(ClassStats::new(&dev, 5, 4, StatsConfig { beta: 1.0, ..StatsConfig::default() }).is_err());
}

fn bits(dev: &Device, s: &mut ClassStats) -> Vec<u32> {
    let mut out: Vec<u32> =
        s.cloud_sigma(dev).unwrap().to_host(dev).unwrap().iter().map(|v| v.to_bits()).collect();
    let snap = s.snapshot(dev).unwrap();
    out.extend(snap.centers.iter().chain(&snap.mu).chain(&snap.v).map(|&v| (v as f32).to_bits()));
    out.extend(snap.n.iter().map(|&n| n as u32));
    out
}

#[test]
fn gpu_update_and_cloud_are_bitwise_deterministic() {
    let Some(dev) = test_device() else { return };
    let run = || {
        let mut s = ClassStats::new(&dev, 5000, 33, cfg(Split::Adaptive, 0)).unwrap();
        for step in 0..3 {
            let (x, labels) = synthetic_batch(step, 2048, 5000, 33, DType::BF16);
            s.update(&dev, &Tensor::<half::bf16>::from_f32(&dev, &x, &[2048, 33]).unwrap(), &labels).unwrap();
        }
        bits(&dev, &mut s)
    };
    let first = run();
    for _ in 0..3 {
        assert!(run() == first, "two runs differ");
    }
}

#[test]
fn gpu_state_save_load_round_trip_resumes_exactly() {
    let Some(dev) = test_device() else { return };
    let dir = tempfile::tempdir().unwrap();
    for cfg in [
        cfg(Split::Threshold(4), 2),
        StatsConfig { center: CenterMode::ClassWeight, ..cfg(Split::Adaptive, 1) },
    ] {
        let (c, d, b) = (40, 12, 90);
        let mut a = ClassStats::new(&dev, c, d, cfg.clone()).unwrap();
        let step = |s: &mut ClassStats, i: u64| {
            let (x, labels) = synthetic_batch(i, b, c, d, DType::F32);
            match cfg.center {
                CenterMode::Ema => {
                    s.update(&dev, &Tensor::<f32>::from_host(&dev, &x, &[b, d]).unwrap(), &labels)
                }
                CenterMode::ClassWeight => {
                    let cos: Vec<f32> = x[..b].iter().map(|v| v.clamp(-1.0, 1.0)).collect();
                    s.update_from_cos(&dev, &labels, &Tensor::from_host(&dev, &cos, &[b]).unwrap())
                }
            }
            .unwrap()
        };
        for i in 0..3 {
            step(&mut a, i);
        }
        let path = dir.path().join(format!("{:?}.safetensors", cfg.center));
        a.save(&dev, &path).unwrap();
        let mut r = ClassStats::load(&dev, &path).unwrap();
        assert_eq!(r.updates(), a.updates());
        assert_eq!(bits(&dev, &mut r), bits(&dev, &mut a));
        for i in 3..5 {
            step(&mut a, i);
            step(&mut r, i);
        }
        assert_eq!(bits(&dev, &mut r), bits(&dev, &mut a), "resumed run differs");
        // The CPU side reads the device's file too.
        let o = StatsState::load(&path).unwrap();
        assert_eq!(o.updates, 3);
    }
}

#[test]
fn gpu_summary_matches_the_oracle_summary() {
    let Some(dev) = test_device() else { return };
    let cfg = cfg(Split::Threshold(4), 1);
    let (c, d, b) = (30, 8, 64);
    let mut gpu = ClassStats::new(&dev, c, d, cfg.clone()).unwrap();
    let mut oracle = StatsState::new(c, d, cfg).unwrap();
    for s in 0..4 {
        let (x, labels) = synthetic_batch(s, b, c, d, DType::F32);
        gpu.update(&dev, &Tensor::<f32>::from_host(&dev, &x, &[b, d]).unwrap(), &labels).unwrap();
        oracle.update(&x, &labels).unwrap();
    }
    let g = gpu.summary(&dev).unwrap();
    let o = oracle.summary().unwrap();
    assert_eq!(
        (g.head.classes, g.tail.classes, g.warm, g.updates),
        (o.head.classes, o.tail.classes, o.warm, o.updates)
    );
    for (a, b) in g.classes.iter().zip(&o.classes) {
        assert_eq!((a.seen, a.head, a.initialized), (b.seen, b.head, b.initialized));
        assert!((a.mean_angle - b.mean_angle).abs() < STATS_TOLERANCE, "{a:?} vs {b:?}");
        assert!((a.cloud_std.powi(2) - b.cloud_std.powi(2)).abs() < STATS_TOLERANCE, "{a:?} vs {b:?}");
    }
}

#[test]
fn gpu_smoke_lines_pass() {
    let Some(dev) = test_device() else { return };
    let lines = smoke(&dev).unwrap();
    assert!(lines.len() >= 6);
    for l in &lines {
        assert!(l.passed, "{l:?}");
    }
}

// ---- CPU: the kernels' f32 arithmetic against the f64 oracle ----------------------------------------

/// How the f32 model measures the angle between a normalized row and its center.
#[derive(Clone, Copy)]
enum AngleFormula {
    /// 2 atan2(||xh - c||, ||xh + c||), what `stats_update` does.
    Kahan,
    /// acos(clamp(xh . c)), the SPEC's formula evaluated naively in f32.
    Acos,
}

/// An f32 model of `kernels/stats.cu` (same formulas and fmas, sequential sums in
/// place of the block trees): it shows that the f32 state can meet
/// [`STATS_TOLERANCE`] against the f64 oracle, independent of any GPU.
struct F32Model {
    cfg: StatsConfig,
    c: usize,
    d: usize,
    centers: Vec<f32>,
    mu: Vec<f32>,
    v: Vec<f32>,
    n: Vec<u64>,
    init: Vec<bool>,
    updates: u64,
}

impl F32Model {
    fn new(c: usize, d: usize, cfg: StatsConfig) -> Self {
        Self {
            cfg,
            c,
            d,
            centers: vec![0.0; c * d],
            mu: vec![0.0; c],
            v: vec![0.0; c],
            n: vec![0; c],
            init: vec![false; c],
            updates: 0,
        }
    }

    fn update(&mut self, x: &[f32], labels: &[i32], formula: AngleFormula) {
        let (d, beta) = (self.d, self.cfg.beta);
        let inv: Vec<f32> = x
            .chunks(d)
            .map(|r| 1.0 / r.iter().fold(0.0f32, |a, &v| v.mul_add(v, a)).sqrt().max(1e-12))
            .collect();
        let seg = bucket_labels(labels, self.c).unwrap();
        for s in 0..seg.len() {
            let k = seg.classes[s] as usize;
            let rows = &seg.rows[seg.starts[s] as usize..seg.starts[s + 1] as usize];
            let cnt = rows.len() as f32;
            let ck = &mut self.centers[k * d..(k + 1) * d];
            let mut ss = 0.0f32;
            for j in 0..d {
                let acc = rows.iter().fold(0.0f32, |a, &i| x[i as usize * d + j].mul_add(inv[i as usize], a));
                let mbar = acc / cnt;
                let b = if self.init[k] { beta.mul_add(ck[j], (1.0 - beta) * mbar) } else { mbar };
                ck[j] = b;
                ss = b.mul_add(b, ss);
            }
            let rn = 1.0 / ss.sqrt().max(1e-12);
            ck.iter_mut().for_each(|c| *c *= rn);
            let (mut sa, mut sa2) = (0.0f32, 0.0f32);
            for &i in rows {
                let xi = &x[i as usize * d..(i as usize + 1) * d];
                let ri = inv[i as usize];
                let a = match formula {
                    AngleFormula::Kahan => {
                        let (mut dm, mut dp) = (0.0f32, 0.0f32);
                        for (&xv, &c) in xi.iter().zip(ck.iter()) {
                            let xh = xv * ri;
                            dm = (xh - c).mul_add(xh - c, dm);
                            dp = (xh + c).mul_add(xh + c, dp);
                        }
                        2.0 * dm.sqrt().atan2(dp.sqrt())
                    }
                    AngleFormula::Acos => {
                        let dot =
                            xi.iter().zip(ck.iter()).fold(0.0f32, |a, (&xv, &c)| (xv * ri).mul_add(c, a));
                        dot.clamp(-1.0, 1.0).acos()
                    }
                };
                sa += a;
                sa2 = a.mul_add(a, sa2);
            }
            let (ma, ma2) = (sa / cnt, sa2 / cnt);
            if self.init[k] {
                self.mu[k] = beta.mul_add(self.mu[k], (1.0 - beta) * ma);
                self.v[k] = beta.mul_add(self.v[k], (1.0 - beta) * ma2);
            } else {
                self.mu[k] = ma;
                self.v[k] = ma2;
                self.init[k] = true;
            }
            self.n[k] += rows.len() as u64;
        }
        self.updates += 1;
    }

    /// (sigma [C], var_h) as stats_reduce + stats_cloud compute them.
    fn cloud(&self) -> (Vec<f32>, Option<f32>) {
        let counts = self.cfg.class_counts.clone().unwrap_or_else(|| self.n.clone());
        let var: Vec<f32> = (0..self.c)
            .map(|k| if self.init[k] { (-self.mu[k]).mul_add(self.mu[k], self.v[k]).max(0.0) } else { 0.0 })
            .collect();
        let (mut num, mut den) = (0.0f32, 0.0f32);
        for k in 0..self.c {
            let w = match (self.init[k], self.cfg.split) {
                (false, _) => 0.0,
                (true, Split::Adaptive) => counts[k] as f32,
                (true, Split::Threshold(t)) => (counts[k] >= t) as u8 as f32,
            };
            num = w.mul_add(var[k], num);
            den += w;
        }
        let var_h = (den > 0.0).then(|| num / den);
        let active = self.updates >= self.cfg.warmup_steps && var_h.is_some();
        let sigma = (0..self.c)
            .map(|k| {
                let cloud = match self.cfg.split {
                    Split::Adaptive => true,
                    Split::Threshold(t) => counts[k] < t,
                };
                if active && cloud {
                    (var_h.unwrap() - var[k]).max(0.0).sqrt()
                } else {
                    0.0
                }
            })
            .collect();
        (sigma, var_h)
    }

    /// Worst |diff| of centers, mu, v (seen classes), sigma^2 and var_h against the oracle.
    fn error(&self, o: &StatsState) -> f64 {
        assert_eq!((&self.n, &self.init, self.updates), (&o.n, &o.initialized, o.updates));
        let mut e = 0.0f64;
        for (a, b) in self.centers.iter().zip(&o.centers) {
            e = e.max((*a as f64 - b).abs());
        }
        for k in (0..self.c).filter(|&k| self.init[k]) {
            e = e.max((self.mu[k] as f64 - o.mu[k]).abs()).max((self.v[k] as f64 - o.v[k]).abs());
        }
        let (sigma, var_h) = self.cloud();
        for (a, b) in sigma.iter().zip(o.cloud_sigma()) {
            e = e.max(((*a as f64).powi(2) - b * b).abs());
        }
        match (var_h, o.head_variance()) {
            (Some(a), Some(b)) => e.max((a as f64 - b).abs()),
            (None, None) => e,
            _ => f64::INFINITY,
        }
    }
}

#[test]
fn kernel_f32_arithmetic_meets_the_tolerance_against_the_oracle() {
    for (c, d, b, split) in [
        (29, 70, 101, Split::Threshold(5)),
        (29, 70, 101, Split::Adaptive),
        (13, 513, 40, Split::Adaptive),
        (7, 1, 33, Split::Threshold(3)),
    ] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let cfg = cfg(split, 2);
            let mut model = F32Model::new(c, d, cfg.clone());
            let mut oracle = StatsState::new(c, d, cfg).unwrap();
            let mut worst = 0.0f64;
            for step in 0..8 {
                let (x, labels) = synthetic_batch(step, b, c, d, dtype);
                model.update(&x, &labels, AngleFormula::Kahan);
                oracle.update(&x, &labels).unwrap();
                worst = worst.max(model.error(&oracle));
            }
            eprintln!("f32 model C={c} D={d} {split:?} {}: worst {worst:.2e}", dtype.name());
            // Ten times inside the tolerance: room for the kernels' different summation order.
            assert!(worst <= STATS_TOLERANCE / 10.0, "C={c} D={d} {split:?} {}: {worst:e}", dtype.name());
        }
    }
}

#[test]
fn kahan_angle_keeps_single_sample_classes_exact_where_f32_acos_does_not() {
    // A new class with one sample: its center is the sample, the true angle is 0.
    let d = 64;
    let (x, _) = synthetic_batch(5, 1, 1, d, DType::F32);
    let mut worst = [0.0f64; 2];
    for (slot, formula) in [AngleFormula::Kahan, AngleFormula::Acos].into_iter().enumerate() {
        for shift in 0..32 {
            let xs: Vec<f32> =
                x.iter().enumerate().map(|(j, v)| v + ((j + shift) % 7) as f32 * 0.01).collect();
            let mut m = F32Model::new(1, d, cfg(Split::Adaptive, 0));
            m.update(&xs, &[0], formula);
            worst[slot] = worst[slot].max(m.mu[0] as f64);
        }
    }
    eprintln!("single-sample angle: Kahan {:.2e}, f32 acos {:.2e}", worst[0], worst[1]);
    assert!(worst[0] < 1e-6, "Kahan: {:e}", worst[0]);
    assert!(worst[1] > STATS_TOLERANCE, "f32 acos unexpectedly accurate: {:e}", worst[1]);
}

/// The same state gives the same file bytes every time: the header's keys are written in
/// sorted order (the safetensors crate writes its metadata from a `HashMap`, whose order
/// differs from map to map, so two saves of one state differed before).
#[test]
fn saved_bytes_are_deterministic() {
    let cfg = StatsConfig { class_counts: Some(vec![3, 1, 4, 1, 5]), ..StatsConfig::default() };
    let s = StatsState::new(5, 3, cfg).unwrap();
    let first = s.to_bytes().unwrap();
    for _ in 0..8 {
        assert!(s.to_bytes().unwrap() == first, "two saves of one state gave different bytes");
    }
}
