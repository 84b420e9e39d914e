// tile.cuh — shared-memory tiles and warp-level GEMMs for the fused head kernels.
//
// Every warp GEMM here leaves its f32 accumulators in the m16n8k16 C layout
// (see mma.cuh): acc[mi][ni][r] holds C[m0 + 16 mi + g + 8 (r / 2)][n0 + 8 ni + 2 q + r % 2]
// with g = lane / 4, q = lane % 4. For bf16/f16 it issues mma.sync; for f32 it
// runs the same ownership as exact SIMT FMAs (k in ascending order, so the f32
// path is bit-reproducible and as accurate as a plain dot product).
#pragma once
#include "common.cuh"
#include "mma.cuh"

// Per-dtype tile constants (elements). 16-byte rows keep cp.async and ldmatrix aligned;
// the pads make the 8 row addresses of each ldmatrix phase (and the SIMT loads) hit
// distinct banks: pitch 40 halves = 20 words, 20 r mod 32 = {0,20,8,28,16,4,24,12}.
template <typename T> struct TileCfg;
template <> struct TileCfg<bf16_t> {
    static constexpr int BK = 32;      // mainloop k per stage
    static constexpr int PITCH = 40;   // mainloop smem row pitch
    static constexpr int BD = 64;      // backward d-chunk
    static constexpr int CPITCH = 72;  // backward chunk pitch (36 words: 4 r mod 32)
    static constexpr int DPITCH = 136; // backward dC tile pitch (68 words: 4 r mod 32)
};
template <> struct TileCfg<f16_t> : TileCfg<bf16_t> {};
template <> struct TileCfg<float> {
    static constexpr int BK = 16;
    static constexpr int PITCH = 20;
    static constexpr int BD = 32;
    static constexpr int CPITCH = 36;
    static constexpr int DPITCH = 132;
};

template <typename T> struct IsF32 { static constexpr bool value = false; };
template <> struct IsF32<float> { static constexpr bool value = true; };

// Copies rows [r0, r0 + ROWS) x cols [k0, k0 + COLS) of a row-major [nrows, ncols]
// matrix g into smem s[ROWS][pitch], zero-filling whatever lies outside the matrix.
// VEC: 16-byte cp.async chunks; requires ncols % (16 / sizeof(T)) == 0 (a chunk is
// then wholly inside or wholly outside) and a 16-byte aligned base; the caller
// commits and waits. !VEC: plain element loads and smem stores (any ncols).
template <typename T, bool VEC, int ROWS, int COLS, int NT>
__device__ __forceinline__ void load_tile(T* s, int pitch, const T* __restrict__ g, int r0, int nrows, int k0, int ncols) {
    if constexpr (VEC) {
        constexpr int EPC = 16 / (int)sizeof(T);
        constexpr int CPR = COLS / EPC;  // chunks per row
        constexpr int N = ROWS * CPR;
        static_assert(COLS % EPC == 0 && N % NT == 0, "tile must split evenly into 16-byte chunks");
#pragma unroll
        for (int it = 0; it < N / NT; ++it) {
            const int c = (int)threadIdx.x + it * NT;
            const int r = c / CPR, kc = (c % CPR) * EPC;
            const int gr = r0 + r, gk = k0 + kc;
            const bool ok = gr < nrows && gk < ncols;
            const T* src = ok ? g + (size_t)gr * ncols + gk : g;  // not read when !ok
            cp_async_16(s + r * pitch + kc, src, ok ? 16 : 0);
        }
    } else {
        constexpr int N = ROWS * COLS;
        for (int e = threadIdx.x; e < N; e += NT) {
            const int r = e / COLS, kc = e % COLS;
            const int gr = r0 + r, gk = k0 + kc;
            s[r * pitch + kc] = (gr < nrows && gk < ncols) ? g[(size_t)gr * ncols + gk] : T{};
        }
    }
}

// ---- f16 operand scaling (head_fused.cu explains why f16 needs it) ----
// f16_operand_scale(amax): a power of two 2^k putting amax into [2^14, 2^15) and its inverse.
// k is clamped to [-64, 64]; an all-zero (or non-finite) vector gets 1. bf16 and f32 have
// f32's range and keep the plain operands.
struct Pow2 {
    float s, inv;
};
__device__ __forceinline__ Pow2 f16_operand_scale(float amax) {
    if (!(amax > 0.0f) || amax > 3.0e38f) return {1.0f, 1.0f};
    const int e = (__float_as_int(amax) >> 23) & 0xff;  // amax in [2^(e-127), 2^(e-126)); e = 0: below
    const int k = min(max(141 - e, -64), 64);            // amax * 2^k in [2^14, 2^15)
    return {__int_as_float((127 + k) << 23), __int_as_float((127 - k) << 23)};
}

// inv = frac * pow, pow = 2^e, frac in [1, 2) (both exact); inv == 0 gives frac 0, pow 1.
__device__ __forceinline__ void split_pow2(float inv, float& frac, float& pow) {
    const int bits = __float_as_int(inv), e = (bits >> 23) & 0xff;
    if (e == 0 || e == 0xff) {
        frac = inv;
        pow = 1.0f;
    } else {
        pow = __int_as_float(e << 23);
        frac = __int_as_float((bits & 0x807fffff) | (127 << 23));
    }
}

// Zeroes the rows r of s[ROWS][pitch] (COLS columns) whose label y[r] is negative (ignored
// rows, and rows past B), then a barrier if it zeroed any. An ignored row may hold anything,
// NaN or inf included (SPEC 2): its coefficients in a product are 0, but 0 * NaN is NaN inside
// the product, so the operand row itself must be zero. y is in shared memory (every thread
// reads the same values: the barrier is uniform); the caller's barrier made s and y visible.
template <typename T, int ROWS, int COLS, int NT>
__device__ __forceinline__ void zero_ignored_rows(T* s, int pitch, const int* y) {
    bool any = false;
    for (int r = 0; r < ROWS; ++r) {
        if (y[r] >= 0) continue;
        any = true;
        for (int k = threadIdx.x; k < COLS; k += NT) s[r * pitch + k] = from_f32<T>(0.0f);
    }
    if (any) __syncthreads();
}

// Zeroes a warp's accumulator fragments (fully unrolled: they stay in registers).
template <int MI, int NI> __device__ __forceinline__ void zero_acc(float (&acc)[MI][NI][4]) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;
}

// acc += A[m0.., 0..KLEN) * B[0..KLEN, n0..] for one warp.
// A is stored [m][k] (AT = false) or [k][m] (AT = true) with pitch pa;
// B is stored [n][k] (BT = false) or [k][n] (BT = true) with pitch pb.
template <typename T, int MI, int NI, int KLEN, bool AT, bool BT>
__device__ __forceinline__ void warp_gemm(float (&acc)[MI][NI][4], const T* sA, int pa, int m0, const T* sB, int pb, int n0) {
    const int lane = threadIdx.x % WARP_SIZE;
    if constexpr (IsF32<T>::value) {
        const int g = lane >> 2, q = lane & 3;
#pragma unroll 4
        for (int k = 0; k < KLEN; ++k) {
            float a[MI][2], b[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int m = m0 + mi * 16 + g + 8 * h;
                    a[mi][h] = AT ? sA[k * pa + m] : sA[m * pa + k];
                }
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int n = n0 + ni * 8 + 2 * q + e;
                    b[ni][e] = BT ? sB[k * pb + n] : sB[n * pb + k];
                }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                    for (int r = 0; r < 4; ++r) acc[mi][ni][r] = fmaf(a[mi][r >> 1], b[ni][r & 1], acc[mi][ni][r]);
        }
    } else {
        static_assert(NI % 2 == 0 && KLEN % 16 == 0, "mma tiles: NI even, KLEN a multiple of 16");
#pragma unroll
        for (int k0 = 0; k0 < KLEN; k0 += 16) {
            u32 a[MI][4], b[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                const int mb = m0 + mi * 16;
                if (AT) {
                    // Stored [k][m]: matrix j = lane / 8 covers (k + 8 (j / 2), m + 8 (j % 2)) -> a0..a3.
                    ldmatrix_x4_trans(a[mi], sA + (k0 + (lane & 7) + ((lane >> 4) << 3)) * pa + mb + ((lane >> 3) & 1) * 8);
                } else {
                    // Stored [m][k]: lanes 0-15 rows m..m+15 at k, lanes 16-31 the same rows at k + 8.
                    ldmatrix_x4(a[mi], sA + (mb + (lane & 15)) * pa + k0 + (lane >> 4) * 8);
                }
            }
#pragma unroll
            for (int np = 0; np < NI / 2; ++np) {
                const int nb = n0 + np * 16;
                u32 r[4];
                if (BT) {
                    // Stored [k][n]: matrices (k, n), (k + 8, n), (k, n + 8), (k + 8, n + 8).
                    ldmatrix_x4_trans(r, sB + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * pb + nb + (lane >> 4) * 8);
                } else {
                    // Stored [n][k]: matrices (n, k), (n, k + 8), (n + 8, k), (n + 8, k + 8).
                    ldmatrix_x4(r, sB + (nb + (lane & 7) + ((lane >> 4) << 3)) * pb + k0 + ((lane >> 3) & 1) * 8);
                }
                b[2 * np][0] = r[0];
                b[2 * np][1] = r[1];
                b[2 * np + 1][0] = r[2];
                b[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) mma_16816<T>(acc[mi][ni], a[mi], b[ni]);
        }
    }
}

// The cosine mainloop: acc = x[r0 .. r0+BM) . w[c0 .. c0+BN)^T over all of D (raw,
// un-normalized products; the caller applies the inverse norms). Warps form a
// WM x WN grid; warp (wm, wn) owns rows wm*BM/WM.. and classes wn*BN/WN...
// Two smem stages (sA: 2 x BM x PITCH, sB: 2 x BN x PITCH), cp.async double buffering:
// while stage kt is multiplied, stage kt+1 is in flight. Starts and ends with every
// thread past a __syncthreads, so smem written before the call is visible inside and
// the stage buffers are free for reuse after it.
template <typename T, bool VEC, int BM, int BN, int WM, int WN, int NT>
__device__ __forceinline__ void cos_mainloop(float (&acc)[BM / WM / 16][BN / WN / 8][4], T* sA, T* sB, const T* __restrict__ x,
                                             const T* __restrict__ w, int r0, int B, int c0, int C, int D) {
    constexpr int BK = TileCfg<T>::BK, P = TileCfg<T>::PITCH;
    constexpr int MI = BM / WM / 16, NI = BN / WN / 8;
    static_assert(WM * WN * WARP_SIZE == NT, "one warp per warp tile");
    const int warp = threadIdx.x / WARP_SIZE;
    const int m0 = (warp / WN) * (BM / WM), n0 = (warp % WN) * (BN / WN);
    zero_acc(acc);
    const int nk = ceil_div(D, BK);
    load_tile<T, VEC, BM, BK, NT>(sA, P, x, r0, B, 0, D);
    load_tile<T, VEC, BN, BK, NT>(sB, P, w, c0, C, 0, D);
    cp_async_commit();
    for (int kt = 0; kt < nk; ++kt) {
        if (kt + 1 < nk) {
            // Stage (kt+1)&1 was last read in iteration kt-1, which ended with __syncthreads.
            const int st = (kt + 1) & 1;
            load_tile<T, VEC, BM, BK, NT>(sA + st * BM * P, P, x, r0, B, (kt + 1) * BK, D);
            load_tile<T, VEC, BN, BK, NT>(sB + st * BN * P, P, w, c0, C, (kt + 1) * BK, D);
        }
        cp_async_commit();  // possibly empty: keeps "all but the newest group" = stage kt
        cp_async_wait<1>();
        __syncthreads();  // stage kt (and plain smem stores of !VEC) visible to every warp
        const int st = kt & 1;
        warp_gemm<T, MI, NI, BK, false, false>(acc, sA + st * BM * P, P, m0, sB + st * BN * P, P, n0);
        __syncthreads();  // every warp done with stage kt before it is refilled
    }
    cp_async_wait<0>();
}
