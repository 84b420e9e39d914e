//! Safe row-major f32 GEMM on the CPU: `matrixmultiply`'s threaded sgemm reached
//! through `ndarray::linalg::general_mat_mul` (so no `unsafe` here).
//!
//! Determinism: matrixmultiply splits the work over output tiles only; every
//! output element is reduced over k by one thread in a fixed blocking order, so
//! the result is bitwise identical run after run whatever the thread count.

use crate::error::{Error, Result};
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

/// `C = alpha * op(A) * op(B) + beta * C`, all row-major.
///
/// - `a`: `[m, k]` (or `[k, m]` when `trans_a`), in;
/// - `b`: `[k, n]` (or `[n, k]` when `trans_b`), in;
/// - `c`: `[m, n]`, in/out (only read when `beta != 0`); may not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) -> Result<()> {
    if a.len() != m * k || b.len() != k * n || c.len() != m * n {
        return Err(Error::Shape(format!(
            "gemm m={m} n={n} k={k}: A has {}, B has {}, C has {} elements",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // matrixmultiply handles k = 0, but be explicit: C = beta * C.
        c.iter_mut().for_each(|v| *v = if beta == 0.0 { 0.0 } else { *v * beta });
        return Ok(());
    }
    let shape_err = |e: ndarray::ShapeError| Error::Shape(format!("gemm view: {e}"));
    let av = if trans_a {
        ArrayView2::from_shape((k, m), a).map_err(shape_err)?.reversed_axes()
    } else {
        ArrayView2::from_shape((m, k), a).map_err(shape_err)?
    };
    let bv = if trans_b {
        ArrayView2::from_shape((n, k), b).map_err(shape_err)?.reversed_axes()
    } else {
        ArrayView2::from_shape((k, n), b).map_err(shape_err)?
    };
    let mut cv = ArrayViewMut2::from_shape((m, n), c).map_err(shape_err)?;
    if beta == 0.0 {
        // general_mat_mul reads C even when beta is 0 (0 * NaN = NaN); clear it first.
        cv.fill(0.0);
    }
    general_mat_mul(alpha, &av, &bv, beta, &mut cv);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_all_transposes() {
        let (m, n, k) = (5, 3, 7);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let mut c = vec![1.0f32; m * n];
                sgemm(ta, tb, m, n, k, 2.0, &a, &b, 0.5, &mut c).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let mut s = 0.0f64;
                        for p in 0..k {
                            let av = if ta { a[p * m + i] } else { a[i * k + p] };
                            let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                            s += av as f64 * bv as f64;
                        }
                        let want = 2.0 * s + 0.5;
                        assert!((c[i * n + j] as f64 - want).abs() < 1e-4, "{ta} {tb}");
                    }
                }
            }
        }
    }
}
