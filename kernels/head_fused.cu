// head_fused.cu — the fused CUDA path of the margin head (SPEC 3, 4, 7.4).
//
// Forward (fused_fwd_<tile>_<dtype>, then fused_combine_fwd_f32, then head_reduce_fwd_f32 in head_ref.cu):
//   one CTA per (class tile of BN, row tile of BM), BM x BN = 128 x 128, 64 x 128 or 64 x 64;
//   grid = (ceil(C/BN), ceil(B/BM)), 256 threads.
//   The raw products x_i . W_j come from tensor cores (bf16/f16: mma.sync m16n8k16, f32
//   accumulation) or exact SIMT FMAs (f32 storage); the epilogue multiplies by the
//   inverse norms (no normalized copy of x or W exists), clamps to [-1, 1], applies the
//   margin and the cloud to the target element (one warp per row computes t_i from an
//   f64 c_iy; Philox in-kernel draws the oracle's eps_i), and folds each row's 128 logits into a partial
//   (max, sum exp, sum z) written to part[3][n_ct][B]. The combine kernel merges a row's
//   n_ct partials in class-tile order: lse_i and loss_i. Extra memory: 3 * B * n_ct floats.
//
// Backward (fused_bwd_<tile>_<dtype>, then head_normback_bwd_* from head_ref.cu for dx):
//   G x S CTAs (G <= n_ct, S <= n_rt), class tiles of BN = 128 or 64 (fused_bwd_c128_*, fused_bwd_c64_*);
//   CTA (g, s) owns the class tiles ct = g, g + G, ...
//   and, for each, walks the row tiles of 64 rt = s, s + S, ... in order (S > 1 only when
//   there are too few class tiles to fill the GPU). Per (row tile, class tile) it recomputes the cosine tile
//   (same mainloop), forms dc in registers (SPEC 4: p from the stored lse_i, the target
//   from the stored t_i and dt_i), stores two scaled copies in smem (dc * inv_w for dx,
//   dc * inv_x for dW, in the storage dtype for the tensor cores; f16 moves the powers of two of the
//   inverse norms onto the W / x chunks and scales operand rows / columns by powers of
//   two, see split_pow2 and f16_operand_scale), then
//     dxp[g][rows, :]  (+)= (dc * inv_w) . W[classes, :]    (64 x D, d-chunks of BD)
//     dwh[classes, :]  (+)= (dc * inv_x)^T . x[rows, :]      (BN x D, f32)
//   with plain stores / read-modify-writes: CTA g is the only writer of dxp[g] and of the
//   dwh rows of its class tile, and within the CTA every element has one owner thread, so
//   there are no atomics and the summation order is fixed (bitwise deterministic). With
//   S = 1, when a class tile has seen every row, the same CTA turns its dwh rows into dW
//   (the normalization backward) and writes them; dwh lives in the f32 dW itself when dW
//   is f32, else in a per-CTA scratch slice [BN][D]. With S > 1 each split s writes its
//   partial dwh to slice s of [S][C][D], and head_normback sums the S slices in order and
//   finishes dW. The dx combine sums dxp over g = 0..G-1 in order. Extra memory:
//   G * B * D floats (+ G * BN * D floats of dwh scratch when dW is written in 16 bits,
//   or S * C * D with S > 1, which the host allows only while C is small), never O(B * C).
//
// VEC kernels move 16-byte chunks with cp.async and need D % 8 == 0 (16-bit) or
// D % 4 == 0 (f32); the *_scalar_<dtype> kernels take any D with element loads (the
// dispatcher routes there; tests cover both).
//
// Every entry point takes one argument struct from args.cuh: FusedFwdArgs<T>, FusedCombineArgs,
// FusedBwdArgs<T>; their fields document shapes, directions and which pointers may be null.
//
// Names: <op>_<pass>[_<tile>]_<dtype> (README, Contributing); the tile is r<rows>c<classes>
// for the forward, c<classes> for the backward (64 rows), then `_scalar` for element loads.
// Hot kernels (must not spill, tests/resources.rs): fused_fwd_*, fused_bwd_*
#include "common.cuh"
#include "head.cuh"
#include "args.cuh"
#include "mma.cuh"
#include "tile.cuh"

#define BWD_BM 64
#define NTHREADS 256

// ---- forward tile ---------------------------------------------------------------------
// x [B, D], w [C, D] (T); inv_x [B], inv_w [C]; labels [B]; sigma [C] (unread when the cloud
// is off). Out: part [3][n_ct][B] (max, sum exp, sum z); for valid rows, in the one CTA
// that holds column y_i: c_iy, t, alpha, dt [B]. Nothing aliases.
template <typename T, bool VEC, int BM, int BN>
__device__ __forceinline__ void fused_fwd(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ inv_x,
                                          const float* __restrict__ inv_w, const int* __restrict__ labels,
                                          const float* __restrict__ sigma, const HeadParams& p, float* __restrict__ part,
                                          float* __restrict__ c_iy, float* __restrict__ t_out, float* __restrict__ alpha_out,
                                          float* __restrict__ dt_out, int B, int C, int D) {
    constexpr int WM = 2, WN = 4;
    constexpr int MI = BM / WM / 16, NI = BN / WN / 8;  // (2 or 4) x (2 or 4) mma tiles per warp
    constexpr int P = TileCfg<T>::PITCH;
    static_assert(BM + BN <= NTHREADS, "the prologue gives each thread at most one row or class");
    static_assert(WN * BM * sizeof(LseAcc) <= 2 * (BM + BN) * P * sizeof(T), "pass 2 reuses the stages");
    __shared__ __align__(16) unsigned char smem[2 * (BM + BN) * P * sizeof(T)];
    __shared__ float s_invx[BM], s_invw[BN], s_zt[BM];
    __shared__ int s_y[BM];
    T* sA = reinterpret_cast<T*>(smem);
    T* sB = sA + 2 * BM * P;

    const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
    const int g = lane >> 2, q = lane & 3;
    const int wm = warp / WN, wn = warp % WN;
    const int n_ct = gridDim.x, ct = blockIdx.x, r0 = blockIdx.y * BM, c0 = ct * BN;

    if (tid < BM) {
        const int r = r0 + tid;
        s_invx[tid] = r < B ? inv_x[r] : 0.0f;
        s_y[tid] = r < B ? labels[r] : -1;
    } else if (tid < BM + BN) {
        const int j = c0 + tid - BM;
        s_invw[tid - BM] = j < C ? inv_w[j] : 0.0f;
    }
    // (published by the mainloop's first __syncthreads)

    float acc[MI][NI][4];
    cos_mainloop<T, VEC, BM, BN, WM, WN, NTHREADS>(acc, sA, sB, x, w, r0, B, c0, C, D);

    // Rows whose target class lies in this tile: warp w takes rows w, w+8, ... and computes
    // c_iy in f64 from x and W (head.cuh: target_cos says why; the tile's f32 value is not
    // used), then lane 0 forms t_i. The branch is warp-uniform, so the shuffles are whole.
    for (int rl = warp; rl < BM; rl += NTHREADS / WARP_SIZE) {
        const int y = s_y[rl], r = r0 + rl;
        if (y >= c0 && y < c0 + BN) {  // y >= 0 and in this tile, hence r < B
            const double c = target_cos_warp(x + (size_t)r * D, w + (size_t)y * D, D, lane);
            if (lane == 0) {
                const TargetLogit tl = target_logit(p, c, p.cloud != 0 ? sigma[y] : 0.0f, (u32)r);
                c_iy[r] = tl.c;
                t_out[r] = tl.t;
                alpha_out[r] = tl.alpha;
                dt_out[r] = tl.dt;
                s_zt[rl] = p.s * tl.t;
            }
        }
    }
    __syncthreads();

    // Pass 2: per-thread online softmax over its 8 classes of each of its 8 rows, then the
    // 4 lanes of a quad (xor 1, 2), then the WN warps that share the rows (smem, in order).
    LseAcc* red = reinterpret_cast<LseAcc*>(smem);  // [WN][BM]; the stages are free now
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int rl = wm * (BM / WM) + mi * 16 + g + 8 * h;
            const int yl = s_y[rl] - c0;
            const float sx = s_invx[rl];
            LseAcc a = lse_empty();
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int cl = wn * (BN / WN) + ni * 8 + 2 * q + e;
                    if (c0 + cl < C) {
                        const float c = clamp_cos(acc[mi][ni][2 * h + e] * sx * s_invw[cl]);
                        lse_add(a, cl == yl ? s_zt[rl] : p.s * c);
                    }
                }
            a = lse_shfl_xor(a, 1);
            a = lse_shfl_xor(a, 2);
            if (q == 0) red[wn * BM + rl] = a;
        }
    __syncthreads();
    if (tid < BM) {
        const int r = r0 + tid;
        if (r < B) {
            LseAcc a = red[tid];
#pragma unroll
            for (int k = 1; k < WN; ++k) lse_combine(a, red[k * BM + tid]);
            part[(size_t)ct * B + r] = a.m;
            part[((size_t)n_ct + ct) * B + r] = a.s;
            part[((size_t)2 * n_ct + ct) * B + r] = a.sz;
        }
    }
}

#define FUSED_FWD_PASS a.x, a.w, a.inv_x, a.inv_w, a.labels, a.sigma, a.p, a.part, a.c_iy, a.t, a.alpha, a.dt, a.b, a.c, a.d

// Entry points: FusedFwdArgs<T> (args.cuh), x [B, D], w [C, D]; see fused_fwd for every argument.
// Tiles (rows x classes): fused_fwd_r128c128_*, fused_fwd_r64c128_*, fused_fwd_r64c64_*;
// grid = (ceil(C / classes), ceil(B / rows)). The smaller tiles are for batches of at most 64
// rows and for grids that would leave most of the GPU idle (src/cuda/head/plan.rs picks).
FC_DTYPES(fused_fwd_r128c128, (NTHREADS), FusedFwdArgs, fused_fwd<T, true, 128, 128>(FUSED_FWD_PASS))
FC_DTYPES(fused_fwd_r128c128_scalar, (NTHREADS), FusedFwdArgs, fused_fwd<T, false, 128, 128>(FUSED_FWD_PASS))
FC_DTYPES(fused_fwd_r64c128, (NTHREADS), FusedFwdArgs, fused_fwd<T, true, 64, 128>(FUSED_FWD_PASS))
FC_DTYPES(fused_fwd_r64c128_scalar, (NTHREADS), FusedFwdArgs, fused_fwd<T, false, 64, 128>(FUSED_FWD_PASS))
FC_DTYPES(fused_fwd_r64c64, (NTHREADS), FusedFwdArgs, fused_fwd<T, true, 64, 64>(FUSED_FWD_PASS))
FC_DTYPES(fused_fwd_r64c64_scalar, (NTHREADS), FusedFwdArgs, fused_fwd<T, false, 64, 64>(FUSED_FWD_PASS))

// ---- forward combine --------------------------------------------------------------------------
// One warp per row, 8 rows per 256-thread block; grid = ceil(B / 8). Lane k merges the
// partials of class tiles k, k+32, ... in order, then a fixed xor tree merges the lanes.
// part [3][n_ct][B], labels [B], t [B] in; lse [B], loss [B] out. For ignored rows it
// writes 0 to lse, loss and to c_iy, t, alpha, dt (which fused_fwd writes only for valid
// rows), so after it every per-row output is written and none needs zeroing.
// Entry point: FusedCombineArgs (args.cuh).
__device__ __forceinline__ void fused_combine(const float* __restrict__ part, int n_ct, const int* __restrict__ labels,
                                              float* __restrict__ t, HeadParams p, float* __restrict__ lse,
                                              float* __restrict__ loss, float* __restrict__ c_iy, float* __restrict__ alpha,
                                              float* __restrict__ dt, int B) {
    const int i = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (i >= B) return;  // the whole warp leaves: no shuffle is split
    const int y = labels[i];
    if (y < 0) {
        if (lane == 0) {
            lse[i] = 0.0f;
            loss[i] = 0.0f;
            c_iy[i] = 0.0f;
            t[i] = 0.0f;
            alpha[i] = 0.0f;
            dt[i] = 0.0f;
        }
        return;
    }
    LseAcc a = lse_empty();
    for (int k = lane; k < n_ct; k += WARP_SIZE) {
        const LseAcc b = {part[(size_t)k * B + i], part[((size_t)n_ct + k) * B + i], part[((size_t)2 * n_ct + k) * B + i]};
        lse_combine(a, b);
    }
    a = warp_lse(a);
    if (lane == 0) {
        lse[i] = a.m + logf(a.s);
        loss[i] = row_loss(p, a, p.s * t[i]);
    }
}
extern "C" __global__ void __launch_bounds__(256) fused_combine_fwd_f32(const FusedCombineArgs a) {
    fused_combine(a.part, a.n_ct, a.labels, a.t, a.p, a.lse, a.loss, a.c_iy, a.alpha, a.dt, a.b);
}

// ---- backward tile ----------------------------------------------------------------------------
// x [B, D], w [C, D] (T); inv_x [B], inv_w [C]; labels, t, dt, lse [B] from the forward;
// row_g [B] per-row upstream (null: 1); g_scale multiplies it (1/N_valid for mean).
// Grid (G, S): CTA (g, s) takes the class tiles g, g + G, ... and, of each, the row tiles
// s, s + S, ... (S > 1 spreads a few class tiles over more SMs; it needs dwp).
// Out: dxp [G][B][D] f32 dx partials (every element written; no zeroing needed), and dW:
//   dwp != null:  S partial sums of dwh, dwp [S][C][D] f32 (slice s from CTAs (., s)); the
//                 caller sums them and applies the normalization backward (head_normback);
//   else, finished in this kernel (SPEC 4's normalization backward included), S == 1:
//   dw32 != null: dW in f32 [C, D]; each CTA accumulates its class rows in place;
//   dw32 == null: dW in T into dw [C, D]; the class tile being worked on accumulates in
//                 f32 in this CTA's slice of dwacc [G][BN][D] (scratch, no zeroing).
// Dynamic smem: bwd_smem_bytes<T, BN>() (BN = 128: 65,536 for 16-bit, 98,304 for f32).
template <typename T, int BN> __host__ __device__ constexpr int bwd_smem_bytes() {
    return (2 * (BWD_BM + BN) * TileCfg<T>::PITCH + 2 * BWD_BM * TileCfg<T>::DPITCH) * (int)sizeof(T);
}
static_assert(bwd_smem_bytes<bf16_t, 128>() == 65536, "keep src/cuda/head.rs in sync");
static_assert(bwd_smem_bytes<float, 128>() == 98304, "keep src/cuda/head.rs in sync");
static_assert(bwd_smem_bytes<bf16_t, 64>() == 55296, "keep src/cuda/head.rs in sync");
static_assert(bwd_smem_bytes<float, 64>() == 88064, "keep src/cuda/head.rs in sync");

// dc * (inverse norm) as a tensor-core operand. f16 saturates at +-65504 instead of rounding
// to inf (inf times a zero row's zeros would put NaN into a whole tile); with the power-of-two
// scaling below the saturation is only a last guard. bf16 and f32 have the range of f32.
template <typename T> __device__ __forceinline__ T to_operand(float v) { return from_f32<T>(v); }
template <> __device__ __forceinline__ f16_t to_operand<f16_t>(float v) {
    return from_f32<f16_t>(fminf(fmaxf(v, -65504.0f), 65504.0f));
}

template <typename T> struct IsF16 { static constexpr bool value = false; };
template <> struct IsF16<f16_t> { static constexpr bool value = true; };

// f16 has 5 exponent bits, too few for dc * inv_x (1e-13 for a class the rows rule out,
// times a tiny probability; a zero class row then multiplies its dW by inv_w = 1e12) or
// dc * inv_w (1e12 times a moderate dc for a zero class row). So in the f16 kernels:
//  - each inverse norm is split as inv = frac * 2^e, frac in [1, 2); the W / x chunk rows
//    are multiplied by 2^e in smem, which is exact (|result| <= 1 once a row is scaled by
//    about its inverse norm; only elements below 2^-24 of the row's norm lose bits), and the
//    operand carries dc * frac instead of dc * inv, so a zero or tiny row no longer puts a
//    huge factor into the operand (nor rounds W or x: the projection in the normalization
//    backward cancels most of a near-aligned row, and per-element rounding of a normalized
//    copy would survive it);
//  - each row of the dx operand and each column of the dW operand gets its own power of
//    two 2^k putting its largest |dc * frac| into [2^14, 2^15); every output row of a
//    product uses exactly one such scale and is multiplied back (exactly) by 2^-k.
// (f16_operand_scale and split_pow2 are in tile.cuh, shared with head_attn.cu.)

// s[ROWS][pitch] *= pow[row] in place (a power of two: exact), then a barrier; the caller's
// barrier before it made the loaded chunk visible.
template <typename T, int ROWS, int COLS, int NT>
__device__ __forceinline__ void scale_chunk_rows(T* s, int pitch, const float* pow) {
    for (int e = threadIdx.x; e < ROWS * COLS; e += NT) {
        const int r = e / COLS, k = e % COLS;
        s[r * pitch + k] = from_f32<T>(to_f32(s[r * pitch + k]) * pow[r]);
    }
    __syncthreads();
}

template <typename T, bool VEC, int BN>
__device__ __forceinline__ void fused_bwd(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ inv_x,
                                          const float* __restrict__ inv_w, const int* __restrict__ labels,
                                          const float* __restrict__ t, const float* __restrict__ dt, const float* __restrict__ lse,
                                          const float* __restrict__ row_g, float g_scale, const HeadParams& p,
                                          float* __restrict__ dxp, float* __restrict__ dwacc, T* __restrict__ dw,
                                          float* __restrict__ dw32, float* __restrict__ dwp, int B, int C, int D) {
    constexpr int BM = BWD_BM, WM = 2, WN = 4;
    constexpr int MI = BM / WM / 16, NI = BN / WN / 8;  // 2 x (4 or 2)
    constexpr int P = TileCfg<T>::PITCH, BD = TileCfg<T>::BD, CP = TileCfg<T>::CPITCH, DP = TileCfg<T>::DPITCH;
    constexpr bool SCALED = IsF16<T>::value;
    static_assert(BM + BN <= NTHREADS, "the prologue gives each thread at most one row or class");
    // dx product: 64 rows x BD, warps 2 x 4 -> warp tile 32 x BD/4.
    constexpr int XMI = BM / 2 / 16, XNI = BD / 4 / 8;
    // dW product: 128 classes x BD, warps 4 x 2 -> warp tile 32 x BD/2.
    constexpr int WMI = BN / 4 / 16, WNI = BD / 2 / 8;
    static_assert(BN * CP <= 2 * (BM + BN) * P && BM * CP <= 2 * (BM + BN) * P, "chunk fits the stage buffers");

    FC_DYN_SMEM(dyn_smem);  // common.cuh: extern __shared__ under NVRTC, the emulator's buffer under FC_EMU
    T* sA = reinterpret_cast<T*>(dyn_smem);
    T* sB = sA + 2 * BM * P;
    T* sChunk = sA;                    // aliases the stages: used only between mainloops
    T* sDx = sA + 2 * (BM + BN) * P;   // [BM][DP]: dc * inv_w
    T* sDw = sDx + BM * DP;            // [BM][DP]: dc * inv_x
    __shared__ float s_invw[BN], s_invx[BM], s_lse[BM], s_zt[BM], s_dt[BM], s_w[BM];
    __shared__ int s_y[BM];
    // f16 only (SCALED): inverse norms split as frac * pow; per-warp maxima of the operands,
    // then the inverse scales of the dx rows / dW columns.
    __shared__ float s_wfr[SCALED ? BN : 1], s_wpow[SCALED ? BN : 1], s_xfr[SCALED ? BM : 1], s_xpow[SCALED ? BM : 1];
    __shared__ float s_rmax[SCALED ? WN * BM : 1], s_cmax[SCALED ? WM * BN : 1];
    __shared__ float s_rinv[SCALED ? BM : 1], s_cinv[SCALED ? BN : 1];

    const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
    const int g = lane >> 2, q = lane & 3;
    const int wm = warp / WN, wn = warp % WN;
    const int G = gridDim.x, S = gridDim.y, split = blockIdx.y;
    const int n_ct = ceil_div(C, BN), n_rt = ceil_div(B, BM);
    float* my_dxp = dxp + (size_t)blockIdx.x * B * D;
    // The host launches G <= n_ct and S <= n_rt; should it not, the partials these CTAs own
    // are still written (as zeros), so no reader ever sees uninitialized memory.
    if ((int)blockIdx.x >= n_ct) {
        if (split == 0)
            for (size_t k = tid; k < (size_t)B * D; k += NTHREADS) my_dxp[k] = 0.0f;
        return;
    }
    if (split >= n_rt) {
        for (int ct = blockIdx.x; ct < n_ct; ct += G)
            for (size_t k = tid; k < (size_t)min(BN, C - ct * BN) * D; k += NTHREADS)
                dwp[(size_t)split * C * D + (size_t)ct * BN * D + k] = 0.0f;
        return;
    }

    for (int ct = blockIdx.x; ct < n_ct; ct += G) {
        const int c0 = ct * BN;
        const bool first_ct = ct == (int)blockIdx.x;  // dxp[g] is stored, not added to
        float* acc_w = dwp    ? dwp + (size_t)split * C * D + (size_t)c0 * D  // [BN][D]
                       : dw32 ? dw32 + (size_t)c0 * D
                              : dwacc + (size_t)blockIdx.x * BN * D;
        for (int rt = split; rt < n_rt; rt += S) {
            const int r0 = rt * BM;
            // The previous iteration ended with __syncthreads: the s_* arrays are free.
            if (tid < BN) {
                const int j = c0 + tid;
                s_invw[tid] = j < C ? inv_w[j] : 0.0f;
                if constexpr (SCALED) split_pow2(s_invw[tid], s_wfr[tid], s_wpow[tid]);
            } else if (tid < BN + BM) {
                const int rl = tid - BN, r = r0 + rl;
                const int y = r < B ? labels[r] : -1;
                s_y[rl] = y;
                s_invx[rl] = y >= 0 ? inv_x[r] : 0.0f;
                if constexpr (SCALED) split_pow2(s_invx[rl], s_xfr[rl], s_xpow[rl]);
                s_lse[rl] = y >= 0 ? lse[r] : 0.0f;
                s_zt[rl] = y >= 0 ? p.s * t[r] : 0.0f;
                s_dt[rl] = y >= 0 ? dt[r] : 0.0f;
                s_w[rl] = y >= 0 ? g_scale * (row_g ? row_g[r] : 1.0f) : 0.0f;
            }
            float acc[MI][NI][4];
            cos_mainloop<T, VEC, BM, BN, WM, WN, NTHREADS>(acc, sA, sB, x, w, r0, B, c0, C, D);

            // dc for every element of the tile, in place of the cosines (0 for ignored rows,
            // rows >= B, classes >= C).
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int rl = wm * (BM / WM) + mi * 16 + g + 8 * h;
                    const int y = s_y[rl];
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int cl = wn * (BN / WN) + ni * 8 + 2 * q + e;
                            float dc = 0.0f;
                            if (y >= 0 && c0 + cl < C) {
                                const bool tgt = (c0 + cl == y);
                                const float c = clamp_cos(acc[mi][ni][2 * h + e] * s_invx[rl] * s_invw[cl]);
                                const float z = tgt ? s_zt[rl] : p.s * c;
                                const float pr = expf(z - s_lse[rl]);
                                const float qq = (tgt ? 1.0f - p.ls : 0.0f) + p.ls_over_c;
                                dc = s_w[rl] * p.s * (pr - qq);
                                if (tgt) dc *= s_dt[rl];
                            }
                            acc[mi][ni][2 * h + e] = dc;
                        }
                }
            if constexpr (SCALED) {
                // Row maxima of |dc * frac_w| (over the quad, then the WN warps of these rows) and
                // column maxima of |dc * frac_x| (over the 8 row groups, then the WM warps).
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int rl = wm * (BM / WM) + mi * 16 + g + 8 * h;
                        float m = 0.0f;
#pragma unroll
                        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                            for (int e = 0; e < 2; ++e)
                                m = fmaxf(m, fabsf(acc[mi][ni][2 * h + e] * s_wfr[wn * (BN / WN) + ni * 8 + 2 * q + e]));
                        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
                        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
                        if (q == 0) s_rmax[wn * BM + rl] = m;
                    }
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int cl = wn * (BN / WN) + ni * 8 + 2 * q + e;
                        float m = 0.0f;
#pragma unroll
                        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                            for (int h = 0; h < 2; ++h)
                                m = fmaxf(m, fabsf(acc[mi][ni][2 * h + e] * s_xfr[wm * (BM / WM) + mi * 16 + g + 8 * h]));
                        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
                        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
                        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
                        if (g == 0) s_cmax[wm * BN + cl] = m;
                    }
                __syncthreads();
                if (tid < BM) {
                    float m = s_rmax[tid];
#pragma unroll
                    for (int k = 1; k < WN; ++k) m = fmaxf(m, s_rmax[k * BM + tid]);
                    s_rinv[tid] = f16_operand_scale(m).inv;
                } else if (tid < BM + BN) {
                    const int cl = tid - BM;
                    float m = s_cmax[cl];
#pragma unroll
                    for (int k = 1; k < WM; ++k) m = fmaxf(m, s_cmax[k * BN + cl]);
                    s_cinv[cl] = f16_operand_scale(m).inv;
                }
                // (published, with sDx / sDw, by the __syncthreads after the first chunk load)
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int rl = wm * (BM / WM) + mi * 16 + g + 8 * h;
                    float rs = 1.0f;
                    if constexpr (SCALED) {
                        float m = s_rmax[rl];
#pragma unroll
                        for (int k = 1; k < WN; ++k) m = fmaxf(m, s_rmax[k * BM + rl]);
                        rs = f16_operand_scale(m).s;
                    }
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int cl = wn * (BN / WN) + ni * 8 + 2 * q + e;
                            float cs = 1.0f;
                            if constexpr (SCALED) {
                                float m = s_cmax[cl];
#pragma unroll
                                for (int k = 1; k < WM; ++k) m = fmaxf(m, s_cmax[k * BN + cl]);
                                cs = f16_operand_scale(m).s;
                            }
                            const float dc = acc[mi][ni][2 * h + e];
                            if constexpr (SCALED) {
                                sDx[rl * DP + cl] = to_operand<T>(dc * s_wfr[cl] * rs);
                                sDw[rl * DP + cl] = to_operand<T>(dc * s_xfr[rl] * cs);
                            } else {
                                sDx[rl * DP + cl] = to_operand<T>(dc * s_invw[cl]);
                                sDw[rl * DP + cl] = to_operand<T>(dc * s_invx[rl]);
                            }
                        }
                }
            // (the first __syncthreads below, after the chunk load, publishes sDx / sDw)

            // The dx and dW halves below have the same shape (load a chunk, one warp GEMM, a guarded
            // store) but different tiles, operand layouts, scales and first-write rules: spelled out.
            // dxp[g][r0.., d0..] (+)= sDx[64 x 128] . W[c0.., d0..]   (K = the 128 classes)
            for (int d0 = 0; d0 < D; d0 += BD) {
                load_tile<T, VEC, BN, BD, NTHREADS>(sChunk, CP, w, c0, C, d0, D);
                cp_async_commit();
                cp_async_wait<0>();
                __syncthreads();
                if constexpr (SCALED) scale_chunk_rows<T, BN, BD, NTHREADS>(sChunk, CP, s_wpow);
                float ax[XMI][XNI][4];
                zero_acc(ax);
                const int m0 = (warp / 4) * (BM / 2), n0 = (warp % 4) * (BD / 4);
                warp_gemm<T, XMI, XNI, BN, false, true>(ax, sDx, DP, m0, sChunk, CP, n0);
#pragma unroll
                for (int mi = 0; mi < XMI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < XNI; ++ni)
#pragma unroll
                        for (int r = 0; r < 4; ++r) {
                            const int rl = m0 + mi * 16 + g + 8 * (r >> 1);
                            const int row = r0 + rl;
                            const int col = d0 + n0 + ni * 8 + 2 * q + (r & 1);
                            float v = ax[mi][ni][r];
                            if constexpr (SCALED) v *= s_rinv[rl];
                            if (row < B && col < D) {
                                float* o = my_dxp + (size_t)row * D + col;
                                if (first_ct) *o = v;  // never read before written
                                else *o += v;
                            }
                        }
                __syncthreads();  // sChunk is refilled next
            }

            // acc_w[classes, d0..] (+)= sDw^T[128 x 64] . x[r0.., d0..]   (K = the 64 rows)
            for (int d0 = 0; d0 < D; d0 += BD) {
                load_tile<T, VEC, BM, BD, NTHREADS>(sChunk, CP, x, r0, B, d0, D);
                cp_async_commit();
                cp_async_wait<0>();
                __syncthreads();
                zero_ignored_rows<T, BM, BD, NTHREADS>(sChunk, CP, s_y);
                if constexpr (SCALED) scale_chunk_rows<T, BM, BD, NTHREADS>(sChunk, CP, s_xpow);
                float aw[WMI][WNI][4];
                zero_acc(aw);
                const int m0 = (warp / 2) * (BN / 4), n0 = (warp % 2) * (BD / 2);
                warp_gemm<T, WMI, WNI, BM, true, true>(aw, sDw, DP, m0, sChunk, CP, n0);
#pragma unroll
                for (int mi = 0; mi < WMI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < WNI; ++ni)
#pragma unroll
                        for (int r = 0; r < 4; ++r) {
                            const int cl = m0 + mi * 16 + g + 8 * (r >> 1);
                            const int col = d0 + n0 + ni * 8 + 2 * q + (r & 1);
                            float v = aw[mi][ni][r];
                            if constexpr (SCALED) v *= s_cinv[cl];
                            if (c0 + cl < C && col < D) {
                                float* o = acc_w + (size_t)cl * D + col;
                                if (rt == split) *o = v;  // this CTA's first row tile
                                else *o += v;
                            }
                        }
                __syncthreads();  // sChunk, sDx, sDw and s_* are rewritten next
            }
        }

        if (dwp) continue;  // partials: the caller finishes dW
        // dW of the class tile (SPEC 4): u = w * inv_w, dW = (dwh - u (u . dwh)) * inv_w, one
        // warp per class row, the same arithmetic as head_ref.cu's normback. acc_w was written by
        // other threads of this CTA before the last __syncthreads; the next class tile's first
        // writes to it come after its mainloop's __syncthreads.
        for (int cl = warp; cl < BN && c0 + cl < C; cl += NTHREADS / WARP_SIZE) {
            const int cls = c0 + cl;
            const float r = inv_w[cls];
            const T* wr = w + (size_t)cls * D;
            const float* a = acc_w + (size_t)cl * D;
            float dot = 0.0f;
            for (int k = lane; k < D; k += WARP_SIZE) dot = fmaf(to_f32(wr[k]) * r, a[k], dot);
            dot = warp_sum(dot);
            if (dw32) {
                float* o = dw32 + (size_t)cls * D;  // == a: each lane rewrites the elements it read
                for (int k = lane; k < D; k += WARP_SIZE) o[k] = (a[k] - to_f32(wr[k]) * r * dot) * r;
            } else {
                T* o = dw + (size_t)cls * D;
                for (int k = lane; k < D; k += WARP_SIZE) o[k] = from_f32<T>((a[k] - to_f32(wr[k]) * r * dot) * r);
            }
        }
    }
}

#define FUSED_BWD_PASS                                                                                                  \
    a.x, a.w, a.inv_x, a.inv_w, a.labels, a.t, a.dt, a.lse, a.row_g, a.g_scale, a.p, a.dxp, a.dwacc, a.dw, a.dw32, a.dwp, \
        a.b, a.c, a.d

// Entry points: FusedBwdArgs<T> (args.cuh); see fused_bwd. dxp, dwacc, dw, dw32 and dwp never alias
// each other or the inputs.
// Class tiles of 128 (fused_bwd_c128_*) or 64 (fused_bwd_c64_*: twice the CTAs where there are
// too few class tiles to fill the GPU); dynamic smem bwd_smem_bytes<T, BN>().
// One CTA per SM (launch bounds (256, 1)): the mainloop needs ~180 registers per thread.
FC_DTYPES(fused_bwd_c128, (NTHREADS, 1), FusedBwdArgs, fused_bwd<T, true, 128>(FUSED_BWD_PASS))
FC_DTYPES(fused_bwd_c128_scalar, (NTHREADS, 1), FusedBwdArgs, fused_bwd<T, false, 128>(FUSED_BWD_PASS))
FC_DTYPES(fused_bwd_c64, (NTHREADS, 1), FusedBwdArgs, fused_bwd<T, true, 64>(FUSED_BWD_PASS))
FC_DTYPES(fused_bwd_c64_scalar, (NTHREADS, 1), FusedBwdArgs, fused_bwd<T, false, 64>(FUSED_BWD_PASS))
