//! The byte-level parsers (what the fuzz targets in fuzz/ call) are the path loaders'
//! own code: on valid files and on broken ones, `load_*(path)` gives exactly what
//! `*_from_bytes(read(path), path)` gives, result or error message.

use featcloud::data::files::{FEATURES_KEY, LABELS_KEY};
use featcloud::data::{
    dataset_from_bytes, load_dataset, load_npy_features, load_npy_labels, load_safetensors,
    npy_features_from_bytes, npy_labels_from_bytes, safetensors_from_bytes, save_npy_f32, save_npy_i64,
};
use featcloud::engine::Checkpoint;
use featcloud::{CenterMode, StatsConfig, StatsState};
use safetensors::{tensor::TensorView, Dtype};
use std::fmt::Debug;
use std::fs;
use std::path::{Path, PathBuf};

/// Both results are equal: the same value, or errors with the same message.
fn same<T: PartialEq + Debug>(a: featcloud::Result<T>, b: featcloud::Result<T>) {
    match (a, b) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("path loader gave {a:?}, byte parser gave {b:?}"),
    }
}

/// `good`, and a few broken variants of it (truncated, one byte changed, extended),
/// written to `dir` as `stem.<i>.<ext>`.
fn variants(dir: &Path, stem: &str, ext: &str, good: &[u8]) -> Vec<PathBuf> {
    let mut flipped = good.to_vec();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x5a;
    let mut header_flipped = good.to_vec();
    header_flipped[9] ^= 0x01;
    let mut long = good.to_vec();
    long.extend_from_slice(b"\0\0\0\0");
    let all =
        [good.to_vec(), good[..good.len() - 1].to_vec(), good[..12].to_vec(), flipped, header_flipped, long];
    all.iter()
        .enumerate()
        .map(|(i, bytes)| {
            let p = dir.join(format!("{stem}.{i}.{ext}"));
            fs::write(&p, bytes).unwrap();
            p
        })
        .collect()
}

#[test]
fn npy_loaders_are_the_byte_parsers() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    save_npy_f32(&x, &[0.5, -1.0, 2.0, 4.0, 8.0, 1e-3], &[3, 2]).unwrap();
    let y = dir.path().join("y.npy");
    save_npy_i64(&y, &[2, 0, 1]).unwrap();
    let (mut ok_x, mut ok_y) = (0, 0);
    for p in variants(dir.path(), "x", "npy", &fs::read(&x).unwrap()) {
        let bytes = fs::read(&p).unwrap();
        ok_x += load_npy_features(&p).is_ok() as usize;
        same(load_npy_features(&p), npy_features_from_bytes(&bytes, &p));
        same(load_npy_labels(&p), npy_labels_from_bytes(&bytes, &p));
        same(load_dataset(&p, &y, None), dataset_from_bytes(&p, &bytes, &y, &fs::read(&y).unwrap(), None));
    }
    for p in variants(dir.path(), "y", "npy", &fs::read(&y).unwrap()) {
        let bytes = fs::read(&p).unwrap();
        ok_y += load_npy_labels(&p).is_ok() as usize;
        same(load_npy_labels(&p), npy_labels_from_bytes(&bytes, &p));
        same(
            load_dataset(&x, &p, Some(3)),
            dataset_from_bytes(&x, &fs::read(&x).unwrap(), &p, &bytes, Some(3)),
        );
    }
    // The unchanged file parses; the truncated, short and extended ones do not.
    assert!((1..=3).contains(&ok_x) && (1..=3).contains(&ok_y), "{ok_x} {ok_y}");
    assert_eq!(npy_features_from_bytes(&fs::read(&x).unwrap(), &x).unwrap().1, 3);
}

#[test]
fn safetensors_loaders_are_the_byte_parsers() {
    let dir = tempfile::tempdir().unwrap();
    let x: Vec<u8> = [0.5f32, -1.0, 2.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let y: Vec<u8> = [1i64, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (FEATURES_KEY.to_string(), TensorView::new(Dtype::F32, vec![2, 2], &x).unwrap()),
        (LABELS_KEY.to_string(), TensorView::new(Dtype::I64, vec![2], &y).unwrap()),
    ];
    let good = safetensors::serialize(views, None).unwrap();
    let npy_y = dir.path().join("y.npy");
    save_npy_i64(&npy_y, &[1, 0]).unwrap();
    let mut ok = 0;
    for p in variants(dir.path(), "d", "safetensors", &good) {
        let bytes = fs::read(&p).unwrap();
        ok += load_safetensors(&p, FEATURES_KEY, LABELS_KEY).is_ok() as usize;
        same(
            load_safetensors(&p, FEATURES_KEY, LABELS_KEY),
            safetensors_from_bytes(&bytes, &p, FEATURES_KEY, LABELS_KEY),
        );
        same(load_dataset(&p, &p, None), dataset_from_bytes(&p, &bytes, &p, &bytes, None));
        let ny = fs::read(&npy_y).unwrap();
        same(load_dataset(&p, &npy_y, None), dataset_from_bytes(&p, &bytes, &npy_y, &ny, None));
    }
    assert!(ok >= 1, "the unchanged file loads");
}

#[test]
fn statsfile_and_checkpoint_loaders_are_the_byte_parsers() {
    let dir = tempfile::tempdir().unwrap();
    let mut s =
        StatsState::new(2, 3, StatsConfig { center: CenterMode::Ema, ..StatsConfig::default() }).unwrap();
    s.centers = vec![1.0, 0.0, 0.0, 0.0, 0.6, 0.8];
    s.mu = vec![0.5, 0.0];
    s.v = vec![0.3, 0.0];
    s.n = vec![4, 0];
    s.initialized = vec![true, false];
    let mut ok = 0;
    for p in variants(dir.path(), "s", "safetensors", &s.to_bytes().unwrap()) {
        let bytes = fs::read(&p).unwrap();
        ok += StatsState::load(&p).is_ok() as usize;
        // `from_bytes` names the source `<memory>`; the rest of the message is the same.
        let from_bytes = StatsState::from_bytes(&bytes).map_err(|e| {
            featcloud::Error::InvalidConfig(e.to_string().replace("<memory>", &p.display().to_string()))
        });
        let load = StatsState::load(&p).map_err(|e| featcloud::Error::InvalidConfig(e.to_string()));
        same(load, from_bytes);
        // A statistics file is no checkpoint, whatever its bytes.
        let e = Checkpoint::load(&p).unwrap_err().to_string();
        let b = Checkpoint::from_bytes(&bytes).unwrap_err().to_string();
        assert_eq!(e, b.replace("<memory>", &p.display().to_string()));
    }
    assert!(ok >= 1, "the unchanged file loads");
}
