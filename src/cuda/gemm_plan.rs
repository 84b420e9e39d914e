//! How each row-major product of this crate becomes one column-major cuBLAS call.
//!
//! cuBLAS is column-major: `C = op(A) op(B)` with `C` `[m, n]` stored column by
//! column (leading dimension `ldc`). A row-major `[r, c]` matrix has the bytes of a
//! column-major `[c, r]` one, so the row-major `C = op(A) op(B)` is computed as the
//! column-major `C^T = op(B)^T op(A)^T`, with the operands handed over as (B, A).
//! Every GEMM call site (the reference head, the CUDA training backend and the
//! benchmark's 3-GEMM floor) takes its shape and leading dimensions from a
//! [`ColGemm`] built here, and [`ColGemm::eval_host`] is a host model of what
//! cuBLAS does with one, so the index bookkeeping is tested without a GPU
//! (`tests/gemm_plans.rs`).

use crate::error::{Error, Result};
use crate::shape::HeadShape;

/// One column-major GEMM, `C [m, n] = op(A) op(B)`, as `cublasGemmEx` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColGemm {
    /// op(A) = A^T (A stored `[k, m]` column-major, else `[m, k]`).
    pub trans_a: bool,
    /// op(B) = B^T (B stored `[n, k]` column-major, else `[k, n]`).
    pub trans_b: bool,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Reduction length.
    pub k: usize,
    /// Leading dimension of A.
    pub lda: usize,
    /// Leading dimension of B.
    pub ldb: usize,
    /// Leading dimension of C.
    pub ldc: usize,
}

impl ColGemm {
    /// The column-major call computing the row-major `C [m, n] = op(A) op(B)`, where
    /// A is stored row-major `[m, k]` (or `[k, m]` when `trans_a`) and B `[k, n]` (or
    /// `[n, k]` when `trans_b`). Pass the operands to cuBLAS as (B, A): the returned
    /// plan's A is the row-major B and its B the row-major A.
    pub fn row_major(trans_a: bool, trans_b: bool, m: usize, n: usize, k: usize) -> Self {
        Self {
            // Row-major B [k, n] is column-major B^T [n, k] (ld n): used as is. Stored
            // [n, k] it is column-major [k, n] (ld k): transposed.
            trans_a: trans_b,
            lda: if trans_b { k } else { n },
            // Row-major A [m, k] is column-major A^T [k, m] (ld k); stored [k, m] it is
            // column-major [m, k] (ld m), transposed.
            trans_b: trans_a,
            ldb: if trans_a { m } else { k },
            m: n,
            n: m,
            k,
            ldc: n,
        }
    }

    /// Elements A must hold.
    pub fn a_len(&self) -> usize {
        self.lda * if self.trans_a { self.m } else { self.k }
    }

    /// Elements B must hold.
    pub fn b_len(&self) -> usize {
        self.ldb * if self.trans_b { self.k } else { self.n }
    }

    /// Elements C must hold.
    pub fn c_len(&self) -> usize {
        self.ldc * self.n
    }

    /// Checks the plan is well formed (positive sizes, leading dimensions at least
    /// the stored rows, everything within cuBLAS's `int`) and that buffers of
    /// `a`, `b`, `c` elements are large enough.
    pub fn check(&self, a: usize, b: usize, c: usize) -> Result<()> {
        let rows_a = if self.trans_a { self.k } else { self.m };
        let rows_b = if self.trans_b { self.n } else { self.k };
        let fits = |v: usize| v <= i32::MAX as usize;
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return Err(Error::Shape(format!("GEMM with an empty dimension: {self:?}")));
        }
        if self.lda < rows_a || self.ldb < rows_b || self.ldc < self.m {
            return Err(Error::Shape(format!("GEMM leading dimension below the rows: {self:?}")));
        }
        if ![self.m, self.n, self.k, self.lda, self.ldb, self.ldc].into_iter().all(fits) {
            return Err(Error::Shape(format!("GEMM dimension beyond cuBLAS's int range: {self:?}")));
        }
        if a < self.a_len() || b < self.b_len() || c < self.c_len() {
            return Err(Error::Shape(format!(
                "GEMM operands too small: {a}, {b}, {c} elements for {} , {}, {} ({self:?})",
                self.a_len(),
                self.b_len(),
                self.c_len()
            )));
        }
        Ok(())
    }

    /// What cuBLAS computes for this plan (alpha = 1, beta = 0), on the host in f64:
    /// `C[i + j ldc] = sum_l op(A)(i, l) op(B)(l, j)` with
    /// `op(A)(i, l) = A[i + l lda]` (or `A[l + i lda]` transposed) and likewise for B.
    pub fn eval_host(&self, a: &[f64], b: &[f64], c: &mut [f64]) {
        for j in 0..self.n {
            for i in 0..self.m {
                let mut s = 0.0;
                for l in 0..self.k {
                    let av = if self.trans_a { a[l + i * self.lda] } else { a[i + l * self.lda] };
                    let bv = if self.trans_b { b[j + l * self.ldb] } else { b[l + j * self.ldb] };
                    s += av * bv;
                }
                c[i + j * self.ldc] = s;
            }
        }
    }

    /// The cuBLAS `int` arguments (m, n, k, lda, ldb, ldc); call after [`ColGemm::check`].
    pub fn ints(&self) -> [i32; 6] {
        [self.m, self.n, self.k, self.lda, self.ldb, self.ldc].map(|v| v as i32)
    }
}

/// The three row-major products of one head forward+backward, each with the
/// row-major operands to pass as (its A, its B) after the swap of
/// [`ColGemm::row_major`]:
/// - `logits [B, C] = x [B, D] . W [C, D]^T`: call with (W, x);
/// - `dx [B, D] = g [B, C] . W [C, D]`: call with (W, g);
/// - `dW [C, D] = g [B, C]^T . x [B, D]`: call with (x, g).
pub fn head_gemms(shape: HeadShape) -> [ColGemm; 3] {
    let HeadShape { b, c, d } = shape;
    [
        ColGemm::row_major(false, true, b, c, d),
        ColGemm::row_major(false, false, b, d, c),
        ColGemm::row_major(true, false, c, d, b),
    ]
}
