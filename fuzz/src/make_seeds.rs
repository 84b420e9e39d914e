//! Writes the seed corpus of every fuzz target: small valid files, made with featcloud's
//! own writers where it has one (`save_npy_*`, `Checkpoint::save`, `StatsState::save`)
//! and by hand for the variants it reads but never writes (other dtypes, byte orders,
//! `.npy` versions 2.0 and 3.0, safetensors data files).
//!
//! Usage: `make_seeds OUT_DIR`; writes `OUT_DIR/<target>/<name>`.

use featcloud::config::{CenterMode, CloudMode, HeadConfig, Split, StatsConfig};
use featcloud::cpu::CpuBackend;
use featcloud::data::{generate, save_npy_f32, save_npy_i64, SyntheticConfig};
use featcloud::engine::{NonFinitePolicy, OptimizerConfig, OptimizerKind, TrainConfig, Trainer};
use featcloud::StatsState;
use safetensors::{tensor::TensorView, Dtype};
use std::fs;
use std::path::Path;

fn main() {
    let out = std::env::args().nth(1).expect("usage: make_seeds OUT_DIR");
    let out = Path::new(&out);
    let dir = |t: &str| {
        let d = out.join(t);
        fs::create_dir_all(&d).unwrap();
        d
    };

    // .npy features: f32 (the crate's writer), f16, big-endian f64, versions 2.0 and 3.0.
    let d = dir("npy_features");
    save_npy_f32(&d.join("f4.npy"), &[0.5, -1.0, 2.0, 0.25, 3.0, -0.125], &[3, 2]).unwrap();
    let f2: Vec<u8> =
        [1.5f32, -2.0, 0.25, 8.0].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
    fs::write(d.join("f2.npy"), npy(1, "<f2", "(2, 2)", &f2)).unwrap();
    let f8: Vec<u8> = [1.0f64, -2.5, 1e-3].iter().flat_map(|v| v.to_be_bytes()).collect();
    fs::write(d.join("f8_be.npy"), npy(1, ">f8", "(1, 3)", &f8)).unwrap();
    let f4: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(d.join("f4_v2.npy"), npy(2, "<f4", "(2, 1)", &f4)).unwrap();
    fs::write(d.join("f4_v3.npy"), npy(3, "<f4", "(1, 2)", &f4)).unwrap();

    // .npy labels: i64 (the crate's writer), u1, big-endian i4 [N, 1], i2, version 2.0.
    let d = dir("npy_labels");
    save_npy_i64(&d.join("i8.npy"), &[0, 2, 1, 2]).unwrap();
    fs::write(d.join("u1.npy"), npy(1, "|u1", "(3,)", &[1, 0, 2])).unwrap();
    let be: Vec<u8> = [3i32, 0].iter().flat_map(|v| v.to_be_bytes()).collect();
    fs::write(d.join("i4_be_n1.npy"), npy(1, ">i4", "(2, 1)", &be)).unwrap();
    let i2: Vec<u8> = [1i16, 0, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(d.join("i2.npy"), npy(1, "<i2", "(3,)", &i2)).unwrap();
    let u8s: Vec<u8> = [0u64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
    fs::write(d.join("u8_v2.npy"), npy(2, "<u8", "(2,)", &u8s)).unwrap();

    // .safetensors data files: features and labels in several dtypes.
    let d = dir("safetensors_data");
    let x32: Vec<u8> = [0.5f32, -1.0, 2.0, 0.25].iter().flat_map(|v| v.to_le_bytes()).collect();
    let y64: Vec<u8> = [0i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
    st(
        &d.join("f32_i64.safetensors"),
        &[("features", Dtype::F32, &[2, 2], &x32), ("labels", Dtype::I64, &[2], &y64)],
    );
    let x16: Vec<u8> =
        [1.0f32, 2.0, 3.0].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
    let y32: Vec<u8> = [2i32, 0, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
    st(
        &d.join("f16_i32.safetensors"),
        &[("features", Dtype::F16, &[3, 1], &x16), ("labels", Dtype::I32, &[3, 1], &y32)],
    );
    let xb: Vec<u8> = [1.0f32, -1.0].iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
    st(
        &d.join("bf16_u8.safetensors"),
        &[("features", Dtype::BF16, &[1, 2], &xb), ("labels", Dtype::U8, &[1], &[4])],
    );
    let x64: Vec<u8> = [0.125f64, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let yu: Vec<u8> = [1u16, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    st(
        &d.join("f64_u16.safetensors"),
        &[("features", Dtype::F64, &[2, 1], &x64), ("labels", Dtype::U16, &[2], &yu)],
    );

    // Checkpoints: a few steps of a tiny run on the CPU backend (SGD, EMA centers; AdamW,
    // class-weight centers).
    let d = dir("checkpoint");
    let data = generate(&SyntheticConfig {
        num_classes: 3,
        input_dim: 3,
        max_per_class: 6,
        imbalance: 2.0,
        test_per_class: 1,
        open_classes: 0,
        seed: 1,
        ..SyntheticConfig::default()
    })
    .unwrap()
    .train;
    let be = CpuBackend::new();
    for (name, kind, center) in [
        ("sgd_ema", OptimizerKind::Sgd, CenterMode::Ema),
        ("adamw_cw", OptimizerKind::AdamW, CenterMode::ClassWeight),
    ] {
        let cfg = TrainConfig {
            seed: 5,
            epochs: 1,
            batch_size: 4,
            hidden: 4,
            embed_dim: 2,
            head: HeadConfig { s: 8.0, cloud: CloudMode::Symmetric, ..HeadConfig::default() },
            stats: StatsConfig {
                warmup_steps: 1,
                center,
                split: Split::Threshold(3),
                ..StatsConfig::default()
            },
            optim: OptimizerConfig { kind, ..OptimizerConfig::default() },
            // Both policies in the corpus (the field is part of a checkpoint's config).
            on_nonfinite: if kind == OptimizerKind::Sgd {
                NonFinitePolicy::Error
            } else {
                NonFinitePolicy::SkipStep
            },
        };
        let mut t = Trainer::new(&be, cfg, &data).unwrap();
        t.run(&data, 2, |_| {}).unwrap();
        t.to_checkpoint().unwrap().save(&d.join(format!("{name}.safetensors"))).unwrap();
    }

    // Statistics files: f64 with EMA centers, f32 with class-weight centers and class counts.
    let d = dir("statsfile");
    let mut s =
        StatsState::new(3, 2, StatsConfig { center: CenterMode::Ema, ..StatsConfig::default() }).unwrap();
    s.centers = vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8];
    s.mu = vec![0.5, 0.0, 1.25];
    s.v = vec![0.3, 0.0, 1.6];
    s.n = vec![4, 0, 9];
    s.initialized = vec![true, false, true];
    s.updates = 3;
    s.save(&d.join("ema_f64.safetensors")).unwrap();
    let cfg = StatsConfig {
        center: CenterMode::ClassWeight,
        split: Split::Threshold(2),
        class_counts: Some(vec![5, 1]),
        ..StatsConfig::default()
    };
    let mut s = StatsState::new(2, 4, cfg).unwrap();
    s.mu = vec![0.75, 0.0];
    s.v = vec![0.5625, 0.0];
    s.n = vec![2, 0];
    s.initialized = vec![true, false];
    s.updates = 1;
    s.precision = featcloud::stats::Precision::F32;
    s.save(&d.join("class_weight_f32.safetensors")).unwrap();

    check(out);
}

/// Every seed loads with the loader its target fuzzes: the corpus starts from valid files.
fn check(out: &Path) {
    use featcloud::data::{load_npy_features, load_npy_labels, load_safetensors};
    use featcloud::engine::Checkpoint;
    for (target, load) in [
        ("npy_features", (|p| load_npy_features(p).map(drop)) as fn(&Path) -> featcloud::Result<()>),
        ("npy_labels", |p| load_npy_labels(p).map(drop)),
        ("safetensors_data", |p| load_safetensors(p, "features", "labels").map(drop)),
        ("checkpoint", |p| Checkpoint::load(p).map(drop)),
        ("statsfile", |p| StatsState::load(p).map(drop)),
    ] {
        for e in fs::read_dir(out.join(target)).unwrap() {
            let p = e.unwrap().path();
            if let Err(e) = load(&p) {
                panic!("seed {} does not load: {e}", p.display());
            }
        }
    }
}

/// An `.npy` file of format `major`.0 with `descr`, C order, `shape` (a Python tuple) and `data`.
fn npy(major: u8, descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let prefix = if major == 1 { 10 } else { 12 };
    dict.push_str(&" ".repeat((64 - (prefix + dict.len() + 1) % 64) % 64));
    dict.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend_from_slice(&[major, 0]);
    if major == 1 {
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A safetensors file of `(name, dtype, shape, bytes)` tensors.
fn st(path: &Path, tensors: &[(&str, Dtype, &[usize], &[u8])]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|&(n, dt, s, b)| (n.to_string(), TensorView::new(dt, s.to_vec(), b).unwrap()))
        .collect();
    fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}
