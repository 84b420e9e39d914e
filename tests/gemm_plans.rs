//! The cuBLAS call plans of `featcloud::cuda::gemm_plan` (used by the reference head,
//! the CUDA training backend and the benchmark's 3-GEMM floor), checked on the host:
//! `ColGemm::eval_host` models cublasGemmEx's column-major semantics (anchored by a
//! hand-computed case) and every plan must reproduce the row-major product it stands for.
//! The CPU backend's `cpu::gemm::sgemm` is held to the same row-major product.

use featcloud::cpu::gemm::sgemm;
use featcloud::cuda::gemm_plan::{head_gemms, ColGemm};
use featcloud::shape::HeadShape;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Row-major `op(A) op(B)`: A stored [m, k] (or [k, m] when ta), B [k, n] (or [n, k] when tb).
fn row_major_product(a: &[f64], b: &[f64], ta: bool, tb: bool, m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for l in 0..k {
                let av = if ta { a[l * m + i] } else { a[i * k + l] };
                let bv = if tb { b[j * k + l] } else { b[l * n + j] };
                s += av * bv;
            }
            c[i * n + j] = s;
        }
    }
    c
}

/// Small integers: every product and sum is exact, so equality is exact.
fn ints(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-4..=4) as f64).collect()
}

#[test]
fn eval_host_matches_a_hand_computed_column_major_product() {
    // Column-major A [2, 3] = [[1, 3, 5], [2, 4, 6]], B [3, 2] = [[1, 0], [0, 1], [1, 1]].
    let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0];
    let p = ColGemm { trans_a: false, trans_b: false, m: 2, n: 2, k: 3, lda: 2, ldb: 3, ldc: 2 };
    let mut c = [0.0; 4];
    p.eval_host(&a, &b, &mut c);
    // C = [[1 + 5, 3 + 5], [2 + 6, 4 + 6]], stored column by column.
    assert_eq!(c, [6.0, 8.0, 8.0, 10.0]);
    // The same A stored transposed (column-major [3, 2], lda 3) and used with op T gives
    // the same C.
    let at = [1.0, 3.0, 5.0, 2.0, 4.0, 6.0];
    let pt = ColGemm { trans_a: true, lda: 3, ..p };
    let mut ct = [0.0; 4];
    pt.eval_host(&at, &b, &mut ct);
    assert_eq!(ct, c);
}

#[test]
fn row_major_plans_compute_the_row_major_product() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..200 {
        let (m, n, k) = (rng.random_range(1..9), rng.random_range(1..9), rng.random_range(1..9));
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a = ints(&mut rng, m * k);
            let b = ints(&mut rng, k * n);
            let want = row_major_product(&a, &b, ta, tb, m, n, k);
            let p = ColGemm::row_major(ta, tb, m, n, k);
            p.check(b.len(), a.len(), m * n).unwrap();
            assert_eq!((p.a_len(), p.b_len(), p.c_len()), (k * n, m * k, m * n), "{p:?}");
            let mut got = vec![f64::NAN; m * n];
            p.eval_host(&b, &a, &mut got); // the swap: cuBLAS gets (B, A)
            assert_eq!(got, want, "ta {ta} tb {tb} m {m} n {n} k {k}: {p:?}");
        }
    }
}

#[test]
fn head_gemms_compute_logits_dx_and_dw() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (b, c, d) in [(1, 1, 1), (3, 5, 2), (7, 2, 9), (4, 13, 6)] {
        let x = ints(&mut rng, b * d);
        let w = ints(&mut rng, c * d);
        let g = ints(&mut rng, b * c);
        let [pl, px, pw] = head_gemms(HeadShape { b, c, d });
        let run = |p: ColGemm, a_cm: &[f64], b_cm: &[f64], len: usize| {
            p.check(a_cm.len(), b_cm.len(), len).unwrap();
            let mut out = vec![f64::NAN; len];
            p.eval_host(a_cm, b_cm, &mut out);
            out
        };
        // logits [B, C] = x W^T, called with (W, x).
        let logits = run(pl, &w, &x, b * c);
        for i in 0..b {
            for j in 0..c {
                let s: f64 = (0..d).map(|k| x[i * d + k] * w[j * d + k]).sum();
                assert_eq!(logits[i * c + j], s);
            }
        }
        // dx [B, D] = g W, called with (W, g).
        let dx = run(px, &w, &g, b * d);
        for i in 0..b {
            for k in 0..d {
                let s: f64 = (0..c).map(|j| g[i * c + j] * w[j * d + k]).sum();
                assert_eq!(dx[i * d + k], s);
            }
        }
        // dW [C, D] = g^T x, called with (x, g).
        let dw = run(pw, &x, &g, c * d);
        for j in 0..c {
            for k in 0..d {
                let s: f64 = (0..b).map(|i| g[i * c + j] * x[i * d + k]).sum();
                assert_eq!(dw[j * d + k], s);
            }
        }
    }
}

#[test]
fn check_rejects_bad_plans_and_small_buffers() {
    let p = ColGemm::row_major(false, true, 4, 5, 6);
    assert!(p.check(p.a_len(), p.b_len(), p.c_len()).is_ok());
    assert!(p.check(p.a_len() - 1, p.b_len(), p.c_len()).is_err());
    assert!(p.check(p.a_len(), p.b_len() - 1, p.c_len()).is_err());
    assert!(p.check(p.a_len(), p.b_len(), p.c_len() - 1).is_err());
    assert!(ColGemm::row_major(false, false, 0, 5, 6).check(0, 30, 0).is_err());
    assert!(ColGemm { lda: 1, ..p }.check(usize::MAX, usize::MAX, usize::MAX).is_err());
    let huge = ColGemm::row_major(false, false, 1, 1 << 31, 1);
    assert!(huge.check(usize::MAX, usize::MAX, usize::MAX).is_err());
}

/// `cpu::gemm::sgemm` (alpha, beta, every transpose) against the f64 row-major product.
#[test]
fn sgemm_matches_naive_all_transposes() {
    let (m, n, k) = (5, 3, 7);
    let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
    let (a64, b64): (Vec<f64>, Vec<f64>) =
        (a.iter().map(|&v| v as f64).collect(), b.iter().map(|&v| v as f64).collect());
    for ta in [false, true] {
        for tb in [false, true] {
            let mut c = vec![1.0f32; m * n];
            sgemm(ta, tb, m, n, k, 2.0, &a, &b, 0.5, &mut c).unwrap();
            let want = row_major_product(&a64, &b64, ta, tb, m, n, k);
            for (got, s) in c.iter().zip(want) {
                assert!((*got as f64 - (2.0 * s + 0.5)).abs() < 1e-4, "{ta} {tb}");
            }
        }
    }
}
