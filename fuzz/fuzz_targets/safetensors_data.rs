//! `.safetensors` data files: `load_safetensors` (features and labels in one file) and
//! `load_dataset`'s two paths (one file holding both; features and labels read from
//! separate files), all on the fuzzed bytes.
use featcloud::data::files::{FEATURES_KEY, LABELS_KEY};
use featcloud::data::{dataset_from_bytes, safetensors_from_bytes};
use std::path::Path;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let path = Path::new("data.safetensors");
        let both = safetensors_from_bytes(data, path, FEATURES_KEY, LABELS_KEY);
        if let Ok((x, n, f, y)) = &both {
            assert_eq!(Some(x.len()), n.checked_mul(*f));
            assert_eq!(y.len(), *n);
        }
        // One file for both (the same path twice).
        let one = dataset_from_bytes(path, data, path, data, None);
        if let Ok(ds) = &one {
            let (x, _, _, _) = both.as_ref().expect("load_dataset accepted what load_safetensors refused");
            assert_eq!(&ds.features, x);
        }
        // Features and labels as two files (here with the same content).
        let other = Path::new("labels.safetensors");
        let two = dataset_from_bytes(path, data, other, data, Some(5));
        if let Ok(ds) = two {
            assert!(ds.labels.iter().all(|&l| (0..5).contains(&l)));
        }
    });
}
