//! `.npy` labels: the bytes `load_npy_labels` parses, then `load_dataset`'s path
//! (`dataset_from_bytes`, which checks the labels' range) with features of matching length.
use featcloud::data::{dataset_from_bytes, npy_labels_from_bytes};
use std::path::Path;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let path = Path::new("labels.npy");
        if let Ok(y) = npy_labels_from_bytes(data, path) {
            if y.len() <= 4096 {
                let features = features_npy(y.len());
                let nc = [None, Some(1), Some(7)][data.len() % 3];
                if let Ok(ds) = dataset_from_bytes(Path::new("features.npy"), &features, path, data, nc) {
                    assert_eq!(ds.n, y.len());
                    assert!(ds.labels.iter().zip(&y).all(|(&a, &b)| a as i64 == b));
                    assert!(ds.labels.iter().all(|&l| l >= 0 && (l as usize) < ds.num_classes));
                }
            }
        }
    });
}

/// A NumPy 1.0 `.npy` of `[n, 1]` f32 features, all 0.5.
fn features_npy(n: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, 1), }}\n");
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    for _ in 0..n {
        out.extend_from_slice(&0.5f32.to_le_bytes());
    }
    out
}
