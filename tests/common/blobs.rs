//! A small long-tailed data set of Gaussian-ish blobs, for the suites that run the
//! `featcloud` binary on `.npy` files (`#[path = "common/blobs.rs"] mod blobs;`).

// Each suite uses a part of it.
#![allow(dead_code)]

use featcloud::data::{save_npy_f32, save_npy_i64};
use std::path::{Path, PathBuf};

/// `counts[k]` rows of class k, `f` features: feature j has mean 2 in the classes with
/// j % C == k and 0 elsewhere, plus uniform noise in [-0.5, 0.5) from an LCG seeded with
/// `seed`. Returns the features `[N, f]` row-major and the labels.
pub fn blobs(counts: &[usize], f: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let c = counts.len();
    let mut state = seed;
    let mut rnd = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
    };
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (k, &count) in counts.iter().enumerate() {
        for _ in 0..count {
            x.extend((0..f).map(|j| if j % c == k { 2.0 } else { 0.0 } + rnd()));
            y.push(k as i64);
        }
    }
    (x, y)
}

/// [`blobs`] written to `dir/x.npy` and `dir/y.npy`; returns their paths.
pub fn write_blobs(dir: &Path, counts: &[usize], f: usize, seed: u64) -> (PathBuf, PathBuf) {
    let (x, y) = blobs(counts, f, seed);
    let (xp, yp) = (dir.join("x.npy"), dir.join("y.npy"));
    save_npy_f32(&xp, &x, &[y.len(), f]).unwrap();
    save_npy_i64(&yp, &y).unwrap();
    (xp, yp)
}
