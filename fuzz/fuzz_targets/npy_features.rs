//! `.npy` features: the bytes `load_npy_features` parses, then `load_dataset`'s path
//! (`dataset_from_bytes`) with those features and a labels file of matching length.
use featcloud::data::{dataset_from_bytes, npy_features_from_bytes};
use std::path::Path;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let path = Path::new("features.npy");
        if let Ok((x, n, f)) = npy_features_from_bytes(data, path) {
            assert_eq!(Some(x.len()), n.checked_mul(f), "{} values for shape [{n}, {f}]", x.len());
            if n <= 4096 {
                let labels = labels_npy(n);
                if let Ok(ds) = dataset_from_bytes(path, data, Path::new("labels.npy"), &labels, None) {
                    assert_eq!((ds.n, ds.f, ds.num_classes), (n, f, n));
                    assert_eq!(ds.features, x);
                }
            }
        }
    });
}

/// A NumPy 1.0 `.npy` of the i64 labels `0, 1, ..., n - 1`.
fn labels_npy(n: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<i8', 'fortran_order': False, 'shape': ({n},), }}\n");
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    for i in 0..n as i64 {
        out.extend_from_slice(&i.to_le_bytes());
    }
    out
}
