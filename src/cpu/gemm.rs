//! Safe row-major f32 GEMM on the CPU: `matrixmultiply`'s threaded sgemm reached
//! through `ndarray::linalg::general_mat_mul` (so no `unsafe` here).
//!
//! Determinism: matrixmultiply splits the work over output tiles only; every
//! output element is reduced over k by one thread in a fixed blocking order, so
//! the result is bitwise identical run after run whatever the thread count.
//!
//! Checked against a naive product in `tests/gemm_plans.rs`, next to the cuBLAS plans.

use crate::error::{Error, Result};
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

/// Errors unless A, B and C hold `m*k`, `k*n` and `m*n` elements (either layout has
/// the same count); the CPU and CUDA training backends check their GEMMs with it.
pub fn check_gemm_lens(m: usize, n: usize, k: usize, a: usize, b: usize, c: usize) -> Result<()> {
    if a != m * k || b != k * n || c != m * n {
        return Err(Error::Shape(format!(
            "gemm m={m} n={n} k={k}: A has {a}, B has {b}, C has {c} elements"
        )));
    }
    Ok(())
}

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
    check_gemm_lens(m, n, k, a.len(), b.len(), c.len())?;
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
