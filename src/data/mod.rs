//! Labelled feature sets for training and evaluating the head: an in-memory
//! [`Dataset`], the [`Splits`] a benchmark is made of, a seeded long-tailed synthetic
//! generator ([`synthetic`]) and loaders for `.npy` / `.safetensors` files ([`files`]).

pub mod files;
pub mod synthetic;

use crate::check::check_finite;
use crate::error::{Error, Result};

pub use files::{
    dataset_from_bytes, load_dataset, load_npy_features, load_npy_labels, load_safetensors,
    npy_features_from_bytes, npy_labels_from_bytes, safetensors_from_bytes, save_npy_f32, save_npy_i64,
    split_fraction, split_fraction_rows,
};
pub use synthetic::{generate, SyntheticConfig};

/// Features with one class label per row.
///
/// Invariants (checked by [`Dataset::new`]): `features.len() == n * f`, `labels.len() == n`,
/// every label in `[0, num_classes)`, every feature finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Features [n, f], row-major.
    pub features: Vec<f32>,
    /// Labels `[n]`, each in `[0, num_classes)`.
    pub labels: Vec<i32>,
    /// Number of rows.
    pub n: usize,
    /// Feature dimension.
    pub f: usize,
    /// Number of classes (labels may leave some classes empty).
    pub num_classes: usize,
}

impl Dataset {
    /// Builds a dataset, checking lengths, the label range and that every feature is finite.
    /// `n` is `labels.len()`; zero rows are allowed, `f == 0` or `num_classes == 0` are not.
    pub fn new(features: Vec<f32>, labels: Vec<i32>, f: usize, num_classes: usize) -> Result<Self> {
        if f == 0 {
            return Err(Error::Empty("dataset feature dimension f = 0".into()));
        }
        if num_classes == 0 {
            return Err(Error::Empty("dataset num_classes = 0".into()));
        }
        let n = labels.len();
        if n.checked_mul(f) != Some(features.len()) {
            return Err(Error::Shape(format!(
                "features has {} values, expected n*f = {n}*{f} for {n} labels",
                features.len()
            )));
        }
        if let Some(row) = labels.iter().position(|&y| y < 0 || y as usize >= num_classes) {
            return Err(Error::LabelOutOfRange { row, label: labels[row] as i64, classes: num_classes });
        }
        check_finite("features", &features)?;
        Ok(Dataset { features, labels, n, f, num_classes })
    }

    /// Number of rows of each class, `[num_classes]`.
    pub fn class_counts(&self) -> Vec<u64> {
        let mut counts = vec![0u64; self.num_classes];
        for &y in &self.labels {
            counts[y as usize] += 1;
        }
        counts
    }

    /// Features of row `i` (`[f]`). Panics if `i >= n`, like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.f..(i + 1) * self.f]
    }

    /// The rows `idx` (in that order, repeats allowed), same `f` and `num_classes`.
    /// Panics if an index is `>= n`, like slice indexing.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(idx.len() * self.f);
        let mut labels = Vec::with_capacity(idx.len());
        for &i in idx {
            features.extend_from_slice(self.row(i));
            labels.push(self.labels[i]);
        }
        Dataset { features, labels, n: idx.len(), f: self.f, num_classes: self.num_classes }
    }
}

/// A benchmark: long-tailed training set, class-balanced test set over the same classes,
/// and optionally an open-set of classes never seen in training.
#[derive(Clone, Debug, PartialEq)]
pub struct Splits {
    /// Training rows (long-tailed).
    pub train: Dataset,
    /// Test rows over the training classes (same label space as `train`).
    pub test: Dataset,
    /// Held-out classes for retrieval / verification, with their own labels `0..K`
    /// (unrelated to the training labels).
    pub open_set: Option<Dataset>,
}
