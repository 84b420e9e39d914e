//! 2-D pictures of embeddings: a PCA projection of unit-normalized embeddings, and the
//! feature cloud drawn the way the head applies it (a rotation of the feature's angle to
//! its class weight).

use crate::error::{Error, Result};
use nalgebra::{DMatrix, SymmetricEigen};

/// A fitted 2-D PCA of unit-normalized embeddings: `project` maps any D-vector (normalized
/// first) to the plane of the two leading principal axes.
#[derive(Clone, Debug, PartialEq)]
pub struct Pca2 {
    /// Mean of the normalized embeddings the PCA was fitted on `[D]`.
    pub mean: Vec<f64>,
    /// The two leading principal axes `[2][D]`, unit length, each with its largest
    /// component positive (so the picture does not flip between runs or machines).
    pub axes: [Vec<f64>; 2],
    /// Fraction of the total variance each axis explains.
    pub explained: [f64; 2],
}

impl Pca2 {
    /// Fits the PCA on `emb` `[n, d]` (rows normalized to unit length first; zero rows stay
    /// zero). Deterministic: the covariance is summed in row order and decomposed with
    /// nalgebra's symmetric eigensolver. Needs n >= 2 and d >= 2.
    pub fn fit(emb: &[f32], d: usize) -> Result<Self> {
        if d < 2 || emb.len() % d != 0 || emb.len() / d < 2 {
            return Err(Error::Shape(format!(
                "PCA needs at least 2 embeddings of dimension >= 2, got {} values for D = {d}",
                emb.len()
            )));
        }
        if let Some(i) = emb.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: "embeddings".into(), index: i });
        }
        let n = emb.len() / d;
        let rows: Vec<Vec<f64>> = emb.chunks(d).map(unit).collect();
        let mut mean = vec![0.0; d];
        for r in &rows {
            mean.iter_mut().zip(r).for_each(|(m, v)| *m += v / n as f64);
        }
        let mut cov = DMatrix::<f64>::zeros(d, d);
        for r in &rows {
            let c: Vec<f64> = r.iter().zip(&mean).map(|(v, m)| v - m).collect();
            for i in 0..d {
                for j in 0..d {
                    cov[(i, j)] += c[i] * c[j] / n as f64;
                }
            }
        }
        let eig = SymmetricEigen::new(cov);
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]).then(a.cmp(&b)));
        let total: f64 = eig.eigenvalues.iter().map(|v| v.max(0.0)).sum();
        let axis = |k: usize| {
            let mut v: Vec<f64> = eig.eigenvectors.column(order[k]).iter().copied().collect();
            let big = v.iter().copied().fold(0.0f64, |a, x| if x.abs() > a.abs() { x } else { a });
            if big < 0.0 {
                v.iter_mut().for_each(|x| *x = -*x);
            }
            v
        };
        let share = |k: usize| if total > 0.0 { eig.eigenvalues[order[k]].max(0.0) / total } else { 0.0 };
        Ok(Pca2 { mean, axes: [axis(0), axis(1)], explained: [share(0), share(1)] })
    }

    /// The 2-D coordinates of `v` (normalized first).
    pub fn project(&self, v: &[f64]) -> [f64; 2] {
        let u = unit_f64(v);
        let c: Vec<f64> = u.iter().zip(&self.mean).map(|(a, m)| a - m).collect();
        let dot = |axis: &[f64]| axis.iter().zip(&c).map(|(a, b)| a * b).sum::<f64>();
        [dot(&self.axes[0]), dot(&self.axes[1])]
    }

    /// [`Pca2::project`] of every row of `emb` `[n, d]`.
    pub fn project_rows(&self, emb: &[f32]) -> Vec<[f64; 2]> {
        emb.chunks(self.mean.len()).map(|r| self.project(&unit(r))).collect()
    }
}

/// `x` rotated in the plane of `x` and `w` so that its angle to `w` grows by `alpha`
/// radians (shrinks for negative `alpha`), at unit length: where the head's feature cloud
/// moves a feature when it draws `alpha` (the target angle `theta + alpha`, SPEC 3).
/// `None` when `x` and `w` are parallel (no plane) or either is zero.
pub fn rotate_away(x: &[f64], w: &[f64], alpha: f64) -> Option<Vec<f64>> {
    let (xh, wh) = (unit_f64(x), unit_f64(w));
    let cos: f64 = xh.iter().zip(&wh).map(|(a, b)| a * b).sum();
    // u: the unit direction in the plane, orthogonal to w, on x's side.
    let u: Vec<f64> = xh.iter().zip(&wh).map(|(a, b)| a - cos * b).collect();
    let un = u.iter().map(|v| v * v).sum::<f64>().sqrt();
    if un < 1e-12 || xh.iter().all(|&v| v == 0.0) || wh.iter().all(|&v| v == 0.0) {
        return None;
    }
    let theta = cos.clamp(-1.0, 1.0).acos() + alpha;
    Some(wh.iter().zip(&u).map(|(b, a)| theta.cos() * b + theta.sin() * a / un).collect())
}

fn unit(v: &[f32]) -> Vec<f64> {
    unit_f64(&v.iter().map(|&x| x as f64).collect::<Vec<_>>())
}

fn unit_f64(v: &[f64]) -> Vec<f64> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if n > 0.0 {
        v.iter().map(|x| x / n).collect()
    } else {
        v.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pca_finds_the_plane_of_planar_data() {
        // Points on a tilted great circle plus a little noise-free offset: all variance in 2 axes.
        let d = 5;
        let (a, b) = ([1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0, 0.0]);
        let emb: Vec<f32> = (0..40)
            .flat_map(|i| {
                let t = i as f64 * 0.15;
                (0..d).map(move |k| (t.cos() * a[k] + t.sin() * b[k]) as f32)
            })
            .collect();
        let p = Pca2::fit(&emb, d).unwrap();
        assert!((p.explained[0] + p.explained[1] - 1.0).abs() < 1e-9, "{:?}", p.explained);
        assert!(p.axes[0][4].abs() < 1e-9 && p.axes[1][4].abs() < 1e-9);
        // Deterministic, and the same result for the same data.
        assert_eq!(p, Pca2::fit(&emb, d).unwrap());
    }

    #[test]
    fn rotation_moves_the_angle_by_alpha() {
        let (x, w) = ([0.3, 0.9, -0.2], [1.0, 0.1, 0.4]);
        let angle = |u: &[f64]| {
            let (uh, wh) = (unit_f64(u), unit_f64(&w));
            uh.iter().zip(&wh).map(|(a, b)| a * b).sum::<f64>().acos()
        };
        for alpha in [-0.3, 0.0, 0.2, 0.7] {
            let r = rotate_away(&x, &w, alpha).unwrap();
            assert!((angle(&r) - angle(&x) - alpha).abs() < 1e-12, "alpha {alpha}");
            assert!((r.iter().map(|v| v * v).sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert!(rotate_away(&w, &w, 0.1).is_none());
    }
}
