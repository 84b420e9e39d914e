// head_ref.cu — the reference (unfused) CUDA path of the margin head (SPEC 3, 4, 5b, 7.3).
//
// Simple on purpose: it materializes the B x CK cosine and gradient matrices in
// f32 and leaves the three products to cuBLAS SGEMM (src/cuda/head/reference.rs), where
// CK = C*K rows of W (K sub-centers per class, SPEC 5b; class j's sub-center k is row j*K + k):
//   ref_normalize_fwd_<T>  x [rows, D] (T)   -> xh [rows, D] f32, inv [rows]
//   cuBLAS                 cos [B, CK] = xh . wh^T                     (f32)
//   ref_margin_fwd_<T>     target: c_iy (f64 from x, W; with K > 1 the max over the target's
//                          K sub-centers, k_iy its lowest arg-max), t_i, alpha_i, dt_i per row
//   ref_softmax_fwd_f32    lse_i and loss_i per row (online max / sum-exp over the C classes,
//                          a non-target class's cosine the max of its K columns)
//   head_reduce_fwd_f32    the reduced loss (fixed order; also used by the fused path)
//   ref_grad_bwd_f32       dc [B, CK] (SPEC 4; with K > 1 each class's gradient on its
//                          arg-max column only, the target's on column y*K + k_iy, 0 elsewhere)
//   cuBLAS                 dxh = dc . wh,  dwh = dc^T . xh                  (f32)
//   head_normback_bwd_<T>  dx = (dxh - xh (xh . dxh)) * inv   (also the fused path's
//                          combine of its dx partials; writes T, or f32: _f32out_<T>)
// K = 1 runs the same arithmetic as before sub-centers existed (a max over one column is that
// column), so its results are bitwise those of the plain head.
// Every reduction is a fixed shuffle tree or a fixed sequential loop, so two runs
// give the same bits (cuBLAS SGEMM is deterministic for a fixed stream and shape).
// Every entry point takes one argument struct from args.cuh (named next to each kernel),
// whose fields document shapes, directions and which pointers may be null.
// Names: <op>_<pass>[_<tile>]_<dtype> (README, Contributing); the one variant here is f32out.
#include "common.cuh"
#include "head.cuh"
#include "args.cuh"

// ---- normalize --------------------------------------------------------------------
// One warp per row, 8 rows per 256-thread block; grid = ceil(rows / 8).
// labels (may be null): a row with a negative label is ignored (SPEC 2) and may hold anything,
// NaN included; it gets zeros, so that the cuBLAS products (where its coefficients are 0, and
// 0 * NaN = NaN) never see its values.
template <typename T>
__device__ __forceinline__ void ref_normalize(const T* __restrict__ x, float* __restrict__ xh,
                                              float* __restrict__ inv, const int* __restrict__ labels, int rows, int d) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;  // whole warp leaves together: no shuffle below is split
    if (labels && labels[row] < 0) {
        for (int k = lane; k < d; k += WARP_SIZE) xh[(size_t)row * d + k] = 0.0f;
        if (lane == 0) inv[row] = 0.0f;
        return;
    }
    const T* xr = x + (size_t)row * d;
    const float r = 1.0f / fmaxf(sqrtf(warp_row_sumsq(xr, d)), FC_EPS_NORM);
    float* out = xh + (size_t)row * d;
    for (int k = lane; k < d; k += WARP_SIZE) out[k] = to_f32(xr[k]) * r;
    if (lane == 0) inv[row] = r;
}

// RefNormalizeArgs<T>: x [rows, d] in; xh [rows, d] out; inv [rows] out; labels [rows] or null.
// No aliasing.
FC_DTYPES(ref_normalize_fwd, (256), RefNormalizeArgs, ref_normalize<T>(a.x, a.xh, a.inv, a.labels, a.rows, a.d))

// ---- margin + cloud on the target column ---------------------------------------------
// One thread per row; grid = ceil(B / 256). Ignored rows (label < 0) write zeros.
// c_iy is recomputed in f64 from x and W (head.cuh: target_cos says why) instead of
// read from the f32 cos matrix; with K > 1 sub-centers it is the max of the K f64 cosines
// of rows y*K .. y*K + K-1 of W, and k_iy the lowest k reaching it (SPEC 5b). A NaN cosine
// wins the max and stays (nan_max below), so a NaN in any of the target's rows reaches the
// loss, the non-finite flag (SPEC 2).
// x [B, D], w [C*K, D] (T); labels [B]; sigma [C] (unread when the cloud is off);
// c_iy, t, alpha, dt [B] out; k_iy [B] out (0 for ignored rows).
template <typename T>
__device__ __forceinline__ void ref_margin(const T* __restrict__ x, const T* __restrict__ w, const int* __restrict__ labels,
                                           const float* __restrict__ sigma, const HeadParams& p, float* __restrict__ c_iy,
                                           float* __restrict__ t, float* __restrict__ alpha, float* __restrict__ dt,
                                           u32* __restrict__ k_iy, int B, int D, int K) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B) return;
    const int y = labels[i];
    if (y < 0) {
        c_iy[i] = 0.0f;
        t[i] = 0.0f;
        alpha[i] = 0.0f;
        dt[i] = 0.0f;
        k_iy[i] = 0u;
        return;
    }
    const T* xi = x + (size_t)i * D;
    const T* wy = w + (size_t)y * K * D;
    double c = target_cos(xi, wy, D);
    int kb = 0;
    for (int k = 1; k < K; ++k) {
        const double ck = target_cos(xi, wy + (size_t)k * D, D);
        if (nan_max_takes(ck, c)) {
            c = ck;
            kb = k;
        }
    }
    k_iy[i] = (u32)kb;  // stored before target_logit: nothing of the loop stays live across its calls
    const TargetLogit tl = target_logit(p, c, p.cloud != 0 ? sigma[y] : 0.0f, (u32)i);
    c_iy[i] = tl.c;
    t[i] = tl.t;
    alpha[i] = tl.alpha;
    dt[i] = tl.dt;
}

// Entry points: RefMarginArgs<T> (args.cuh); see ref_margin for every argument.
FC_DTYPES(ref_margin_fwd, (256), RefMarginArgs,
          ref_margin<T>(a.x, a.w, a.labels, a.sigma, a.p, a.c_iy, a.t, a.alpha, a.dt, a.k_iy, a.b, a.d, a.k))

// Class j's cosine in row `row` of the [B, C*K] cosine matrix: the max over its K sub-center
// columns (SPEC 5b), and in *kj the lowest column k reaching it; a NaN wins and stays. K = 1:
// row[j] itself, untouched.
__device__ __forceinline__ float class_cos(const float* __restrict__ row, int j, int K, int* kj) {
    const float* r = row + (size_t)j * K;
    float m = r[0];
    int kb = 0;
    for (int k = 1; k < K; ++k) {
        if (nan_max_takes(r[k], m)) {
            m = r[k];
            kb = k;
        }
    }
    *kj = kb;
    return m;
}

// ---- softmax cross-entropy ---------------------------------------------------------------
// One 256-thread block per row (grid = B). Thread k folds z_ij for j = k, k+256, ...
// into an online (max, sum-exp, sum z), then a fixed warp tree and a fixed pass
// over the 8 warp results in smem.
// With K > 1 a non-target class's cosine is the max of its K columns (class_cos).
// cos [B, C*K], labels [B], t [B] in; lse [B], loss [B] out (0 for ignored rows).
// Entry point: RefSoftmaxArgs (args.cuh).
__device__ __forceinline__ void ref_softmax(const float* __restrict__ cos, const int* __restrict__ labels,
                                            const float* __restrict__ t, HeadParams p, float* __restrict__ lse,
                                            float* __restrict__ loss, int C, int K) {
    __shared__ LseAcc warp_acc[8];
    const int i = blockIdx.x;
    const int y = labels[i];  // uniform across the block
    if (y < 0) {
        if (threadIdx.x == 0) {
            lse[i] = 0.0f;
            loss[i] = 0.0f;
        }
        return;
    }
    const float zy = p.s * t[i];
    const float* row = cos + (size_t)i * C * K;
    LseAcc a = lse_empty();
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        int kj;
        const float z = (j == y) ? zy : p.s * clamp_cos(class_cos(row, j, K, &kj));
        lse_add(a, z);
    }
    a = warp_lse(a);
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    if (lane == 0) warp_acc[warp] = a;
    __syncthreads();
    if (threadIdx.x == 0) {
        LseAcc r = warp_acc[0];
        for (int w = 1; w < (int)(blockDim.x / WARP_SIZE); ++w) lse_combine(r, warp_acc[w]);
        lse[i] = r.m + logf(r.s);
        loss[i] = row_loss(p, r, zy);
    }
}
extern "C" __global__ void __launch_bounds__(256) ref_softmax_fwd_f32(const RefSoftmaxArgs a) {
    ref_softmax(a.cos, a.labels, a.t, a.p, a.lse, a.loss, a.c, a.k);
}

// ---- reduced loss (shared with the fused path; head_reduce in head.cuh) ----------------------
// Entry point: HeadReduceArgs (args.cuh).
extern "C" __global__ void __launch_bounds__(256) head_reduce_fwd_f32(const HeadReduceArgs a) {
    head_reduce(a.loss_rows, a.b, a.scale, a.out);
}

// ---- logit gradient ------------------------------------------------------------------------
// Grid (ceil(C*K / 256), B), 256 threads: one element (i, col) per thread, col = j*K + k.
//   w_i = g_scale * (row_g ? row_g[i] : 1)             (0 for ignored rows)
//   dc_ij = w_i * s * (p_ij - q_ij) * (j == y_i ? dt_i : 1)
// on class j's arg-max column only (SPEC 5b: the target's k_iy from the forward, another
// class's lowest arg-max of its K cosines, as ref_softmax took it), 0 on its other columns.
// K = 1: every column is its class's arg-max, and k_iy is not read.
// cos [B, C*K], labels, t, dt, lse [B], k_iy [B] (may be null when K = 1), row_g [B] or null
// in; dc [B, C*K] out.
// Entry point: RefGradArgs (args.cuh).
__device__ __forceinline__ void ref_grad(const float* __restrict__ cos, const int* __restrict__ labels,
                                         const float* __restrict__ t, const float* __restrict__ dt,
                                         const float* __restrict__ lse, const u32* __restrict__ k_iy,
                                         const float* __restrict__ row_g, float g_scale, HeadParams p,
                                         float* __restrict__ dc, int C, int K) {
    const int i = blockIdx.y;
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int CK = C * K;
    if (col >= CK) return;
    const int j = col / K, k = col - j * K;
    const int y = labels[i];
    float out = 0.0f;
    if (y >= 0) {
        const bool tgt = (j == y);
        const float* row = cos + (size_t)i * CK;
        int kj = 0;
        const float cj = (K == 1) ? row[col] : class_cos(row, j, K, &kj);
        if (K > 1 && tgt) kj = (int)k_iy[i];
        if (k == kj) {
            const float w = g_scale * (row_g ? row_g[i] : 1.0f);
            const float z = tgt ? p.s * t[i] : p.s * clamp_cos(cj);
            const float pr = expf(z - lse[i]);
            const float q = (tgt ? 1.0f - p.ls : 0.0f) + p.ls_over_c;
            out = w * p.s * (pr - q);
            if (tgt) out *= dt[i];
        }
    }
    dc[(size_t)i * CK + col] = out;
}
extern "C" __global__ void __launch_bounds__(256) ref_grad_bwd_f32(const RefGradArgs a) {
    ref_grad(a.cos, a.labels, a.t, a.dt, a.lse, a.k_iy, a.row_g, a.g_scale, a.p, a.dc, a.c, a.k);
}

// ---- normalization backward (and the fused path's dx combine) ------------------------------
// One warp per row, 8 rows per block; grid = ceil(rows / 8).
//   g_r = sum_{p < nparts} parts[p * part_stride + r * d + k]   (fixed order p = 0, 1, ...)
//   u_r = x_r * inv_r,  out_r = (g_r - u_r (u_r . g_r)) * inv_r
// Pass 1 stores g_r back into parts[0] (each element by the thread that read it),
// pass 2 reads it once more and writes out; out == null writes the result over
// parts[0] in place (only for TO = float: the fused path's f32 dW).
// parts [nparts, rows, d] f32 in/out; x [rows, d] (T); inv [rows]; out [rows, d] (TO) or null;
// labels [rows] or null: a row with a negative label (an ignored row of x, which may hold
// anything, SPEC 2) gets zeros without reading x.
template <typename T, typename TO>
__device__ __forceinline__ void normback(float* parts, int nparts, long long part_stride, const T* __restrict__ x,
                                         const float* __restrict__ inv, TO* out, const int* __restrict__ labels, int rows,
                                         int d) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;
    if (labels && labels[row] < 0) {
        TO* o = (out ? out : reinterpret_cast<TO*>(parts)) + (size_t)row * d;
        for (int k = lane; k < d; k += WARP_SIZE) o[k] = from_f32<TO>(0.0f);
        return;
    }
    const float r = inv[row];
    const T* xr = x + (size_t)row * d;
    float* g0 = parts + (size_t)row * d;
    float dot = 0.0f;
    for (int k = lane; k < d; k += WARP_SIZE) {
        float g = g0[k];
        for (int q = 1; q < nparts; ++q) g += g0[(size_t)q * part_stride + k];
        if (nparts > 1) g0[k] = g;
        dot = fmaf(to_f32(xr[k]) * r, g, dot);
    }
    dot = warp_sum(dot);
    TO* o = (out ? out : reinterpret_cast<TO*>(parts)) + (size_t)row * d;
    for (int k = lane; k < d; k += WARP_SIZE) {
        const float u = to_f32(xr[k]) * r;
        o[k] = from_f32<TO>((g0[k] - u * dot) * r);
    }
}

// NormbackArgs<T, TO>: parts [nparts, rows, d] f32; x [rows, d]; inv [rows]; out [rows, d] or
// null (f32 only: in place); labels [rows] or null. head_normback_bwd_<T> writes T (TO = T); the f32out variants write
// an f32 dW from 16-bit storage (spelled out: their argument struct is not Args<T>).
#define NORMBACK_PASS a.parts, a.nparts, a.part_stride, a.x, a.inv, a.out, a.labels, a.rows, a.d
FC_DTYPES(head_normback_bwd, (256), NormbackArgs, normback<T, T>(NORMBACK_PASS))
extern "C" __global__ void __launch_bounds__(256) head_normback_bwd_f32out_bf16(const NormbackArgs<bf16_t, float> a) {
    normback<bf16_t, float>(NORMBACK_PASS);
}
extern "C" __global__ void __launch_bounds__(256) head_normback_bwd_f32out_f16(const NormbackArgs<f16_t, float> a) {
    normback<f16_t, float>(NORMBACK_PASS);
}
