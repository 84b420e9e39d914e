// train_ops.cu — the small kernels of the training engine's CUDA backend
// (src/cuda/backend.rs); the GEMMs go to cuBLAS, the head and the statistics to
// their own files. Every op here has a CPU twin in src/cpu/mod.rs and matches it:
//
//   bias_act_fwd_f32   y[r, c] = act(y[r, c] + bias[c])              (elementwise)
//   bias_act_bwd_f32   dy[r, c] = 0 where act = relu and y[r, c] <= 0;
//                      dbias[c] = sum_r dy[r, c]                      (column sums)
//   cast_fwd_bf16      out[i] = bf16(x[i]), round to nearest even      (elementwise)
//   sgd_step_f32       g' = g + wd p;  m = mom m + g';  p = p - lr m
//   adamw_step_f32     m = b1 m + (1 - b1) g;  v = b2 v + ((1 - b2) g) g;
//                      u = (m / c1) / (sqrt(v / c2) + eps);  p = p - lr (u + wd p)
//                      with c1 = 1 - b1^t, c2 = 1 - b2^t computed on the host.
//
// Bitwise agreement with the CPU. build/nvrtc.rs compiles with --fmad=true, which would
// let the compiler contract a*b + c into one fma (one rounding instead of two) and
// so differ from Rust, which never contracts. The optimizer and bias kernels
// therefore spell every operation with an explicit round-to-nearest intrinsic
// (__fmul_rn, __fadd_rn, ...), which are never contracted: each element gets the
// same IEEE operations in the same order as the Rust loop, so the updated
// parameters and optimizer state are bitwise the CPU's for the same inputs.
//
// Determinism: the elementwise kernels have one writer per element. The column
// sums of bias_act_bwd_f32 accumulate in f64 (as the CPU does) over a fixed
// stripe of rows per thread, then combine the stripes in a fixed order through
// shared memory: no atomics, the same bits run after run (the order differs from
// the CPU's plain row order, so agreement with the CPU is to f64 rounding only).
//
// Launch geometry:
//   elementwise kernels: 1-D blocks of TRAIN_THREADS, grid-stride loop over n
//     (any grid size covers n; the host caps the grid).
//   bias_act_bwd_f32: blocks of (BIAS_COLS, BIAS_STRIPES) = (32, 8) threads,
//     grid = ceil(cols / 32); block b owns columns [32 b, 32 b + 32).
//
// Names: <op>_<pass>_<dtype> (README, Contributing), pass `fwd`/`bwd` for the layer ops and
// `step` for the optimizers.
#include "common.cuh"
#include "args.cuh"

#define TRAIN_THREADS 256
#define BIAS_COLS 32
#define BIAS_STRIPES 8
static_assert(BIAS_COLS * BIAS_STRIPES == TRAIN_THREADS, "bias backward block must be 256 threads");

// Optimizer hyper-parameters (OptimParams) and every entry point's argument struct live in
// args.cuh, mirrored in src/cuda/args.rs.

// First element and stride of a grid-stride loop, in 64-bit (n may pass 2^31).
__device__ __forceinline__ long long gs_start() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long gs_stride() {
    return (long long)gridDim.x * blockDim.x;
}

// y [rows, cols] in/out (row-major, n = rows * cols elements); bias [cols] in.
// act: 0 = identity, 1 = relu. y and bias must not alias.
// Element i is (r, c) = (i / cols, i % cols), so its bias is bias[i % cols].
// Entry point: BiasActFwdArgs (args.cuh).
__device__ __forceinline__ void bias_act_fwd(
    float* __restrict__ y, const float* __restrict__ bias, long long n, int cols, int act) {
    for (long long i = gs_start(); i < n; i += gs_stride()) {
        const float z = __fadd_rn(y[i], bias[i % cols]);
        // A NaN passes through (fmaxf would turn it into 0 and hide it from the head's
        // non-finite check); the same expression as the CPU backend's, so the two agree on
        // every input (-0 becomes +0 in both).
        y[i] = act && !(z > 0.0f || z != z) ? 0.0f : z;
    }
}
extern "C" __global__ void __launch_bounds__(256) bias_act_fwd_f32(const BiasActFwdArgs a) {
    bias_act_fwd(a.y, a.bias, a.n, a.cols, a.act);
}

// dy [rows, cols] in/out: masked in place to the pre-activation gradient (relu);
// y [rows, cols] in: the activation output of the forward; dbias [cols] out.
// act: 0 = identity (dy unchanged), 1 = relu. No argument aliases another.
//
// Thread (tx, ty) of block b owns column c = 32 b + tx and rows ty, ty + 8, ty + 16, ...:
// a warp (fixed ty) reads 32 consecutive columns of one row (coalesced). Its f64
// partial goes to part[ty][tx]; thread (tx, 0) then adds part[0..8][tx] in order.
// Entry point: BiasActBwdArgs (args.cuh).
__device__ __forceinline__ void bias_act_bwd(
    float* __restrict__ dy, const float* __restrict__ y, float* __restrict__ dbias, int rows, int cols, int act) {
    __shared__ double part[BIAS_STRIPES][BIAS_COLS];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int c = blockIdx.x * BIAS_COLS + tx;
    double acc = 0.0;
    if (c < cols) {
        for (int r = ty; r < rows; r += BIAS_STRIPES) {
            const size_t idx = (size_t)r * cols + c;
            float g = dy[idx];
            // Same test as the CPU (`y <= 0`): a NaN activation keeps its gradient.
            if (act && y[idx] <= 0.0f) {
                g = 0.0f;
                dy[idx] = 0.0f;
            }
            acc += (double)g;
        }
    }
    part[ty][tx] = acc;
    // Every thread reaches this barrier (the column guard above does not return early).
    __syncthreads();
    if (ty == 0 && c < cols) {
        double s = part[0][tx];
#pragma unroll
        for (int k = 1; k < BIAS_STRIPES; ++k) s += part[k][tx];
        dbias[c] = (float)s;
    }
}
extern "C" __global__ void __launch_bounds__(256) bias_act_bwd_f32(const BiasActBwdArgs a) {
    bias_act_bwd(a.dy, a.y, a.dbias, a.rows, a.cols, a.act);
}

// x [n] f32 in; out [n] bf16 out (round to nearest even, as half::bf16::from_f32).
// Entry point: CastArgs (args.cuh).
__device__ __forceinline__ void cast_fwd(const float* __restrict__ x, bf16_t* __restrict__ out, long long n) {
    for (long long i = gs_start(); i < n; i += gs_stride()) out[i] = from_f32<bf16_t>(x[i]);
}
extern "C" __global__ void __launch_bounds__(256) cast_fwd_bf16(const CastArgs a) { cast_fwd(a.x, a.out, a.n); }

// p [n] in/out parameter; g [n] in gradient; m [n] in/out momentum buffer. No aliasing.
// Entry point: SgdStepArgs (args.cuh).
__device__ __forceinline__ void sgd_step(
    float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, long long n, OptimParams hp) {
    for (long long i = gs_start(); i < n; i += gs_stride()) {
        const float pi = p[i];
        // CPU: g = g + wd * p; m = mom * m + g; p -= lr * m (each op rounded once).
        const float gi = __fadd_rn(g[i], __fmul_rn(hp.wd, pi));
        const float mi = __fadd_rn(__fmul_rn(hp.momentum, m[i]), gi);
        m[i] = mi;
        p[i] = __fsub_rn(pi, __fmul_rn(hp.lr, mi));
    }
}
extern "C" __global__ void __launch_bounds__(256) sgd_step_f32(const SgdStepArgs a) { sgd_step(a.p, a.g, a.m, a.n, a.hp); }

// p [n] in/out parameter; g [n] in gradient; m, v [n] in/out Adam moments. No aliasing.
// Entry point: AdamwStepArgs (args.cuh).
__device__ __forceinline__ void adamw_step(
    float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
    long long n, OptimParams hp) {
    for (long long i = gs_start(); i < n; i += gs_stride()) {
        const float pi = p[i], gi = g[i];
        // CPU: m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g * g (left to right).
        const float mi = __fadd_rn(__fmul_rn(hp.b1, m[i]), __fmul_rn(hp.one_minus_b1, gi));
        const float vi = __fadd_rn(__fmul_rn(hp.b2, v[i]), __fmul_rn(__fmul_rn(hp.one_minus_b2, gi), gi));
        m[i] = mi;
        v[i] = vi;
        // CPU: upd = (m / c1) / ((v / c2).sqrt() + eps); p -= lr * (upd + wd * p).
        const float upd = __fdiv_rn(__fdiv_rn(mi, hp.c1), __fadd_rn(__fsqrt_rn(__fdiv_rn(vi, hp.c2)), hp.eps));
        p[i] = __fsub_rn(pi, __fmul_rn(hp.lr, __fadd_rn(upd, __fmul_rn(hp.wd, pi))));
    }
}
extern "C" __global__ void __launch_bounds__(256) adamw_step_f32(const AdamwStepArgs a) {
    adamw_step(a.p, a.g, a.m, a.v, a.n, a.hp);
}
