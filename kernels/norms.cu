// norms.cu — row L2 norms and inverse norms (SPEC section 3).
//
//   norm[r] = ||x_r||_2,   inv[r] = 1 / max(norm[r], 1e-12)
//
// The fused head folds inv into its epilogue instead of materializing a
// normalized copy; the reference path and the statistics use it directly.
// Launch: one warp per row, 8 warps (256 threads) per block, grid = ceil(rows / 8).
// Accumulation is f32 in a fixed lane order, then a fixed shuffle tree, so the
// result is bitwise reproducible.
// Names: <op>_<pass>_<dtype> (README, Contributing): row_norms_fwd_<dtype>.
#include "common.cuh"
#include "args.cuh"

template <typename T>
__device__ __forceinline__ void row_norms(const T* __restrict__ x, float* __restrict__ norm,
                                          float* __restrict__ inv, int rows, int d) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (row >= rows) return;
    const float acc = warp_row_sumsq(x + (size_t)row * d, d);
    if (lane == 0) {
        const float n = sqrtf(acc);
        if (norm) norm[row] = n;
        if (inv) inv[row] = 1.0f / fmaxf(n, FC_EPS_NORM);
    }
}

// Entry points take RowNormsArgs (args.cuh): x [rows, d] in; norm, inv [rows] out, each may
// be null. No aliasing.
FC_DTYPES(row_norms_fwd, (256), RowNormsArgs, row_norms<T>(a.x, a.norm, a.inv, a.rows, a.d))
