//! Datasets: the synthetic long-tailed generator, `.npy` / `.safetensors` loading (and
//! its error paths), stratified splits, and atomic writes.

use std::fs;
use std::path::{Path, PathBuf};

use featcloud::data::files::{FEATURES_KEY, LABELS_KEY};
use featcloud::data::synthetic::class_count;
use featcloud::data::{
    generate, load_dataset, load_npy_features, load_npy_labels, load_safetensors, save_npy_f32, save_npy_i64,
    split_fraction, Dataset, SyntheticConfig,
};
use featcloud::io::{write_atomic, write_atomic_with};
use featcloud::Error;
use safetensors::Dtype;

// ---------------------------------------------------------------------------------------
// Synthetic generator

#[test]
fn synthetic_counts_decay_as_configured() {
    let cfg = SyntheticConfig::default();
    let s = generate(&cfg).unwrap();
    let counts = s.train.class_counts();
    assert_eq!(counts.len(), 100);
    assert_eq!(counts[0], 300, "class 0 is the head");
    assert_eq!(counts[99], 3, "tail = max / imbalance");
    for (k, &count) in counts.iter().enumerate() {
        let expected = (300.0 * 100f64.powf(-(k as f64) / 99.0)).round().max(2.0) as u64;
        assert_eq!(count, expected, "class {k}");
        assert_eq!(count as usize, class_count(&cfg, k));
    }
    assert!(counts.windows(2).all(|w| w[0] >= w[1]), "counts are non-increasing");
    assert_eq!(s.train.n as u64, counts.iter().sum::<u64>());
    assert_eq!((s.train.f, s.train.num_classes), (64, 100));

    // The floor of 2 samples applies to extreme imbalance.
    let steep = SyntheticConfig { imbalance: 1000.0, max_per_class: 100, ..cfg };
    let counts = generate(&steep).unwrap().train.class_counts();
    assert_eq!(counts[99], 2);
    assert!(counts.iter().all(|&c| c >= 2));
}

#[test]
fn synthetic_test_is_balanced_and_open_set_is_separate() {
    let cfg = SyntheticConfig::default();
    let s = generate(&cfg).unwrap();
    assert_eq!(s.test.class_counts(), vec![20; 100]);
    assert_eq!((s.test.f, s.test.num_classes), (64, 100));

    let open = s.open_set.as_ref().expect("open set");
    assert_eq!(open.num_classes, 20);
    assert_eq!(open.class_counts(), vec![20; 20], "open-set labels are 0..K, balanced");
    assert_eq!(open.f, 64);
    // Open-set classes are new classes: each class mean is away from every training
    // class mean (compared with the test split's class means).
    let means = |ds: &Dataset| {
        let mut m = vec![vec![0f64; ds.f]; ds.num_classes];
        for i in 0..ds.n {
            for (a, &x) in m[ds.labels[i] as usize].iter_mut().zip(ds.row(i)) {
                *a += x as f64;
            }
        }
        let counts = ds.class_counts();
        for (row, &c) in m.iter_mut().zip(&counts) {
            row.iter_mut().for_each(|v| *v /= c as f64);
        }
        m
    };
    let (mt, mo) = (means(&s.test), means(open));
    for (k, o) in mo.iter().enumerate() {
        let nearest = mt
            .iter()
            .map(|t| t.iter().zip(o).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt())
            .fold(f64::INFINITY, f64::min);
        assert!(nearest > 0.05, "open class {k} coincides with a training class (distance {nearest})");
    }

    let none = generate(&SyntheticConfig { open_classes: 0, ..cfg }).unwrap();
    assert!(none.open_set.is_none());
}

#[test]
fn synthetic_is_deterministic_per_seed() {
    let small = SyntheticConfig {
        num_classes: 10,
        max_per_class: 40,
        open_classes: 3,
        seed: 7,
        ..Default::default()
    };
    let a = generate(&small).unwrap();
    let b = generate(&small).unwrap();
    let bits = |d: &Dataset| d.features.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.train), bits(&b.train));
    assert_eq!(bits(&a.test), bits(&b.test));
    assert_eq!(bits(a.open_set.as_ref().unwrap()), bits(b.open_set.as_ref().unwrap()));
    assert_eq!(a, b);

    let c = generate(&SyntheticConfig { seed: 8, ..small.clone() }).unwrap();
    assert_ne!(bits(&a.train), bits(&c.train));
    assert_ne!(bits(&a.test), bits(&c.test));

    // The test and open splits do not depend on the training counts.
    let d = generate(&SyntheticConfig { imbalance: 3.0, max_per_class: 17, ..small }).unwrap();
    assert_eq!(a.test, d.test);
    assert_eq!(a.open_set, d.open_set);
    assert_ne!(a.train, d.train);
}

/// The point of the benchmark: with a long-tailed training set, tail classes are clearly
/// harder than head classes. Measured with a nearest-class-mean classifier on the raw
/// inputs (means from the training split), which is biased toward no class.
#[test]
fn synthetic_tail_classes_are_harder() {
    let s = generate(&SyntheticConfig::default()).unwrap();
    let (train, test) = (&s.train, &s.test);
    let mut means = vec![0f64; train.num_classes * train.f];
    let counts = train.class_counts();
    for i in 0..train.n {
        let y = train.labels[i] as usize;
        for (m, &x) in means[y * train.f..(y + 1) * train.f].iter_mut().zip(train.row(i)) {
            *m += x as f64 / counts[y] as f64;
        }
    }
    let (mut hits, mut total) = ([0usize; 2], [0usize; 2]);
    for i in 0..test.n {
        let x = test.row(i);
        let pred = (0..train.num_classes)
            .map(|k| {
                let d: f64 = means[k * test.f..(k + 1) * test.f]
                    .iter()
                    .zip(x)
                    .map(|(m, &v)| (m - v as f64).powi(2))
                    .sum();
                (d, k)
            })
            .fold((f64::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a })
            .1;
        let y = test.labels[i] as usize;
        let g = usize::from(counts[y] < 20);
        total[g] += 1;
        hits[g] += usize::from(pred == y);
    }
    let head = hits[0] as f64 / total[0] as f64;
    let few = hits[1] as f64 / total[1] as f64;
    assert!(head > 0.6, "classes are learnable: head accuracy {head}");
    assert!(head - few > 0.05, "tail must be clearly harder: head {head:.3}, few-shot {few:.3}");
}

#[test]
fn synthetic_rejects_bad_configs() {
    for cfg in [
        SyntheticConfig { num_classes: 0, ..Default::default() },
        SyntheticConfig { input_dim: 0, ..Default::default() },
        SyntheticConfig { latent_dim: 1, ..Default::default() },
        SyntheticConfig { max_per_class: 1, ..Default::default() },
        SyntheticConfig { imbalance: 0.5, ..Default::default() },
        SyntheticConfig { imbalance: f64::NAN, ..Default::default() },
        SyntheticConfig { test_per_class: 0, ..Default::default() },
        SyntheticConfig { open_per_class: 1, ..Default::default() },
    ] {
        assert!(matches!(generate(&cfg), Err(Error::InvalidConfig(_))), "{cfg:?}");
    }
    // A single class is a valid (if boring) benchmark.
    let one = generate(&SyntheticConfig { num_classes: 1, open_classes: 0, ..Default::default() }).unwrap();
    assert_eq!(one.train.class_counts(), vec![300]);
}

// ---------------------------------------------------------------------------------------
// Dataset

#[test]
fn dataset_checks_and_accessors() {
    let ds = Dataset::new(vec![0., 1., 2., 3., 4., 5.], vec![1, 0, 1], 2, 3).unwrap();
    assert_eq!(ds.n, 3);
    assert_eq!(ds.class_counts(), vec![1, 2, 0]);
    assert_eq!(ds.row(2), &[4., 5.]);
    let sub = ds.subset(&[2, 0]);
    assert_eq!(sub.features, vec![4., 5., 0., 1.]);
    assert_eq!(sub.labels, vec![1, 1]);
    assert_eq!((sub.n, sub.f, sub.num_classes), (2, 2, 3));

    assert!(matches!(Dataset::new(vec![0.; 5], vec![0, 0, 0], 2, 1), Err(Error::Shape(_))));
    assert!(matches!(
        Dataset::new(vec![0.; 4], vec![0, 3], 2, 3),
        Err(Error::LabelOutOfRange { row: 1, label: 3, classes: 3 })
    ));
    assert!(matches!(
        Dataset::new(vec![0.; 4], vec![-1, 0], 2, 3),
        Err(Error::LabelOutOfRange { row: 0, .. })
    ));
    assert!(matches!(
        Dataset::new(vec![0., f32::NAN, 0., 0.], vec![0, 0], 2, 1),
        Err(Error::NonFinite { index: 1, .. })
    ));
    assert!(matches!(Dataset::new(vec![], vec![], 0, 1), Err(Error::Empty(_))));
    assert!(Dataset::new(vec![], vec![], 4, 2).is_ok(), "zero rows is a valid (empty) dataset");
}

// ---------------------------------------------------------------------------------------
// .npy

/// An `.npy` file with an arbitrary header dict and data, for malformed-file tests.
fn raw_npy(header_dict: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header_dict.to_string();
    let pad = (64 - (10 + h.len() + 1) % 64) % 64;
    h.push_str(&" ".repeat(pad));
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

/// The error is a Format error whose message names the file.
fn assert_format_err<T: std::fmt::Debug>(r: featcloud::Result<T>, path: &Path, needle: &str) {
    match r {
        Err(e @ Error::Format { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "error does not name the file: {msg}");
            assert!(msg.to_lowercase().contains(&needle.to_lowercase()), "expected '{needle}' in: {msg}");
        }
        other => panic!("expected a Format error mentioning '{needle}', got {other:?}"),
    }
}

#[test]
fn npy_roundtrip_f32_and_i64() {
    let dir = tempfile::tempdir().unwrap();
    let x: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
    let px = dir.path().join("x.npy");
    save_npy_f32(&px, &x, &[4, 3]).unwrap();
    let bytes = fs::read(&px).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + hlen) % 64, 0, "data is 64-byte aligned as NumPy writes it");
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), }"), "{header}");
    assert_eq!(load_npy_features(&px).unwrap(), (x.clone(), 4, 3));

    let y = vec![0i64, 5, -1, i64::MAX];
    let py = dir.path().join("y.npy");
    save_npy_i64(&py, &y).unwrap();
    assert!(String::from_utf8_lossy(&fs::read(&py).unwrap())
        .contains("{'descr': '<i8', 'fortran_order': False, 'shape': (4,), }"));
    assert_eq!(load_npy_labels(&py).unwrap(), y);

    assert!(matches!(save_npy_f32(&px, &x, &[5, 3]), Err(Error::Shape(_))));
}

#[test]
fn npy_reads_other_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let halves: Vec<u8> =
        [1.5f32, -2.0, 0.25, 8.0].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
    let p = write(
        dir.path(),
        "h.npy",
        &raw_npy("{'descr': '<f2', 'fortran_order': False, 'shape': (2, 2), }", &halves),
    );
    assert_eq!(load_npy_features(&p).unwrap(), (vec![1.5, -2.0, 0.25, 8.0], 2, 2));

    let f64s: Vec<u8> = [1.0f64, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = write(
        dir.path(),
        "d.npy",
        &raw_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }", &f64s),
    );
    assert_eq!(load_npy_features(&p).unwrap(), (vec![1.0, 2.0], 1, 2));

    let p = write(
        dir.path(),
        "u1.npy",
        &raw_npy("{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }", &[7, 0, 255]),
    );
    assert_eq!(load_npy_labels(&p).unwrap(), vec![7, 0, 255]);

    let i4: Vec<u8> = [3i32, -4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = write(
        dir.path(),
        "i4.npy",
        &raw_npy("{'descr': '<i4', 'fortran_order': False, 'shape': (2, 1), }", &i4),
    );
    assert_eq!(load_npy_labels(&p).unwrap(), vec![3, -4], "[N, 1] labels are accepted");

    let be: Vec<u8> = [3i32, 70000].iter().flat_map(|v| v.to_be_bytes()).collect();
    let p = write(
        dir.path(),
        "be.npy",
        &raw_npy("{'descr': '>i4', 'fortran_order': False, 'shape': (2,), }", &be),
    );
    assert_eq!(load_npy_labels(&p).unwrap(), vec![3, 70000]);

    let i2: Vec<u8> = [-2i16, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = write(
        dir.path(),
        "i2.npy",
        &raw_npy("{'descr': '<i2', 'fortran_order': False, 'shape': (2,), }", &i2),
    );
    assert_eq!(load_npy_labels(&p).unwrap(), vec![-2, 9]);
}

#[test]
fn npy_malformed_files_are_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f4x4: Vec<u8> = [1f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let good = raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", &f4x4);

    let p = write(d, "magic.npy", b"PK\x03\x04 this is a zip");
    assert_format_err(load_npy_features(&p), &p, "magic");
    let p = write(d, "empty.npy", b"");
    assert_format_err(load_npy_features(&p), &p, "magic");
    let p = write(d, "trunc_header.npy", &good[..30]);
    assert_format_err(load_npy_features(&p), &p, "truncated");
    let p = write(d, "trunc_data.npy", &good[..good.len() - 3]);
    assert_format_err(load_npy_features(&p), &p, "truncated");
    let mut long = good.clone();
    long.push(0);
    let p = write(d, "trailing.npy", &long);
    assert_format_err(load_npy_features(&p), &p, "trailing");
    // (file, header, read as labels?, what the error must say). Float labels and
    // integer features are refused rather than silently converted.
    let headers = [
        ("fortran.npy", "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", false, "fortran"),
        (
            "complex.npy",
            "{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }",
            false,
            "unsupported dtype",
        ),
        ("rank1.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", false, "2-D"),
        ("rank3.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 2), }", false, "2-D"),
        ("float_labels.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", true, "integer"),
        ("int_feats.npy", "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 2), }", false, "floating"),
        ("labels2d.npy", "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 2), }", true, "1-D"),
        ("noshape.npy", "{'descr': '<f4', 'fortran_order': False, }", false, "shape"),
    ];
    for (name, header, labels, needle) in headers {
        let p = write(d, name, &raw_npy(header, &f4x4));
        if labels {
            assert_format_err(load_npy_labels(&p), &p, needle);
        } else {
            assert_format_err(load_npy_features(&p), &p, needle);
        }
    }
    let p = write(d, "version9.npy", b"\x93NUMPY\x09\x00\x10\x00{}");
    assert_format_err(load_npy_features(&p), &p, "version");
    let p = write(
        d,
        "huge.npy",
        &raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }", &[]),
    );
    assert_format_err(load_npy_features(&p), &p, "too large");

    let missing = d.join("missing.npy");
    assert!(matches!(load_npy_features(&missing), Err(Error::Io { .. })));
}

// ---------------------------------------------------------------------------------------
// load_dataset

#[test]
fn load_dataset_from_npy_pair_checks_labels_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let px = d.join("x.npy");
    save_npy_f32(&px, &x, &[4, 2]).unwrap();
    let py = d.join("y.npy");
    save_npy_i64(&py, &[0, 2, 2, 1]).unwrap();

    let ds = load_dataset(&px, &py, None).unwrap();
    assert_eq!((ds.n, ds.f, ds.num_classes), (4, 2, 3), "num_classes defaults to max + 1");
    assert_eq!(ds.labels, vec![0, 2, 2, 1]);
    assert_eq!(ds.features, x);
    assert_eq!(load_dataset(&px, &py, Some(10)).unwrap().num_classes, 10);

    assert_format_err(load_dataset(&px, &py, Some(2)), &py, "out of range");
    let neg = d.join("neg.npy");
    save_npy_i64(&neg, &[0, -1, 2, 1]).unwrap();
    assert_format_err(load_dataset(&px, &neg, None), &neg, "negative");
    let short = d.join("short.npy");
    save_npy_i64(&short, &[0, 1, 2]).unwrap();
    assert_format_err(load_dataset(&px, &short, None), &short, "3 labels");
    let nan = d.join("nan.npy");
    let mut xn = x.clone();
    xn[5] = f32::NAN;
    save_npy_f32(&nan, &xn, &[4, 2]).unwrap();
    assert_format_err(load_dataset(&nan, &py, None), &nan, "row 2, column 1");
}

fn safetensors_file(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, dt, shape, data)| {
            (n.to_string(), safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap())
        })
        .collect();
    fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn load_dataset_from_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x16: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let y: Vec<u8> = [1i32, 0, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = d.join("data.safetensors");
    safetensors_file(
        &p,
        vec![
            (FEATURES_KEY, Dtype::F16, vec![3, 2], x16.clone()),
            (LABELS_KEY, Dtype::I32, vec![3], y.clone()),
        ],
    );

    let (feat, n, f, labels) = load_safetensors(&p, FEATURES_KEY, LABELS_KEY).unwrap();
    assert_eq!((n, f), (3, 2));
    assert_eq!(feat, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(labels, vec![1, 0, 1]);
    let ds = load_dataset(&p, &p, None).unwrap();
    assert_eq!((ds.n, ds.f, ds.num_classes), (3, 2, 2));
    assert_eq!(ds.labels, vec![1, 0, 1]);

    // Features from safetensors, labels from .npy.
    let py = d.join("y.npy");
    save_npy_i64(&py, &[0, 0, 3]).unwrap();
    assert_eq!(load_dataset(&p, &py, None).unwrap().num_classes, 4);

    // A missing key lists what is there.
    assert_format_err(load_safetensors(&p, "emb", LABELS_KEY), &p, "tensors present: features, labels");
    let bad = d.join("bad.safetensors");
    safetensors_file(
        &bad,
        vec![(FEATURES_KEY, Dtype::I32, vec![3], y.clone()), (LABELS_KEY, Dtype::I32, vec![3], y)],
    );
    assert_format_err(load_dataset(&bad, &bad, None), &bad, "floating point");
    let junk = write(d, "junk.safetensors", b"\x05\x00\x00\x00\x00\x00\x00\x00{}");
    assert_format_err(load_dataset(&junk, &junk, None), &junk, "not a safetensors file");
}

// ---------------------------------------------------------------------------------------
// split_fraction

#[test]
fn split_fraction_is_stratified_and_deterministic() {
    let counts = [10usize, 5, 3, 1];
    let mut labels = Vec::new();
    for (k, &c) in counts.iter().enumerate() {
        labels.extend(vec![k as i32; c]);
    }
    labels.reverse(); // order must not matter
    let n = labels.len();
    let ds = Dataset::new((0..n * 2).map(|i| i as f32).collect(), labels, 2, 4).unwrap();

    let (train, test) = split_fraction(&ds, 0.3, 42).unwrap();
    // round(n_k * 0.3), at least one training row per class: 3, 2 (1.5 rounds up), 1, 0.
    assert_eq!(test.class_counts(), vec![3, 2, 1, 0]);
    assert_eq!(train.class_counts(), vec![7, 3, 2, 1]);
    assert_eq!(train.n + test.n, n);
    // Every row lands in exactly one side (features are unique row ids).
    let mut ids: Vec<f32> = train.features.iter().chain(&test.features).step_by(2).copied().collect();
    ids.sort_by(f32::total_cmp);
    assert_eq!(ids, (0..n).map(|i| (2 * i) as f32).collect::<Vec<_>>());

    let again = split_fraction(&ds, 0.3, 42).unwrap();
    assert_eq!((&train, &test), (&again.0, &again.1));
    let other = (0..20).map(|s| split_fraction(&ds, 0.3, s).unwrap()).any(|(_, t)| t != test);
    assert!(other, "the seed changes which rows are held out");

    for bad in [0.0, 1.0, -0.1, f64::NAN] {
        assert!(matches!(split_fraction(&ds, bad, 0), Err(Error::InvalidConfig(_))));
    }
}

// ---------------------------------------------------------------------------------------
// Atomic writes

fn dir_entries(d: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn write_atomic_replaces_and_leaves_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.bin");
    write_atomic(&p, b"first").unwrap();
    write_atomic(&p, b"second").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"second");
    assert_eq!(dir_entries(dir.path()), vec!["out.bin"]);

    let missing = dir.path().join("no_such_dir").join("out.bin");
    assert!(matches!(write_atomic(&missing, b"x"), Err(Error::Io { .. })));
    assert_eq!(dir_entries(dir.path()), vec!["out.bin"]);
}

#[test]
fn write_atomic_with_cleans_up_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fig.png");
    write_atomic(&p, b"old").unwrap();

    // A writer that fails half way: the partial temp file is removed, the old file stays.
    let r = write_atomic_with(&p, |tmp| {
        assert_eq!(tmp.extension().unwrap(), "png", "the temp file keeps the extension");
        assert_eq!(tmp.parent(), p.parent(), "the temp file is in the same directory");
        fs::write(tmp, b"partial").unwrap();
        Err(Error::InvalidConfig("writer failed".into()))
    });
    assert!(matches!(r, Err(Error::InvalidConfig(_))));
    assert_eq!(fs::read(&p).unwrap(), b"old");
    assert_eq!(dir_entries(dir.path()), vec!["fig.png"]);

    // A writer that succeeds without writing is an error, not an empty file.
    assert!(matches!(write_atomic_with(&p, |_| Ok(())), Err(Error::Io { .. })));
    assert_eq!(fs::read(&p).unwrap(), b"old");

    write_atomic_with(&p, |tmp| fs::write(tmp, b"new").map_err(|e| Error::io(tmp, e))).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"new");
    assert_eq!(dir_entries(dir.path()), vec!["fig.png"]);
}

/// `label_noise`: round(p N) training labels move to another class, each uniformly among
/// the other C - 1; the features, the test split and the open set are the clean data's bits;
/// the same seed gives the same noise; out-of-range fractions are errors.
#[test]
fn label_noise_reassigns_that_fraction_of_training_labels() {
    let base = SyntheticConfig {
        num_classes: 12,
        max_per_class: 60,
        imbalance: 10.0,
        test_per_class: 5,
        open_classes: 3,
        open_per_class: 4,
        seed: 9,
        ..Default::default()
    };
    let clean = generate(&base).unwrap();
    let noisy_cfg = SyntheticConfig { label_noise: 0.2, ..base.clone() };
    let noisy = generate(&noisy_cfg).unwrap();
    assert_eq!(clean.train.features, noisy.train.features);
    assert_eq!(clean.test, noisy.test);
    assert_eq!(clean.open_set, noisy.open_set);
    let moved: Vec<usize> =
        (0..clean.train.n).filter(|&i| clean.train.labels[i] != noisy.train.labels[i]).collect();
    assert_eq!(moved.len(), (0.2 * clean.train.n as f64).round() as usize);
    assert!(moved.iter().all(|&i| (0..12).contains(&noisy.train.labels[i])));
    // The moved labels land on several classes, not one.
    let mut targets: Vec<i32> = moved.iter().map(|&i| noisy.train.labels[i]).collect();
    targets.sort();
    targets.dedup();
    assert!(targets.len() >= 6, "{targets:?}");
    assert_eq!(generate(&noisy_cfg).unwrap(), noisy, "the same seed, the same noise");
    for bad in [1.0, -0.1, f64::NAN] {
        assert!(generate(&SyntheticConfig { label_noise: bad, ..base.clone() }).is_err(), "{bad}");
    }
}
