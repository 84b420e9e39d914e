// head_attn.cu — the fused head in the attention form (SPEC 4, "dx in the attention form"):
// the forward computes dx, the backward computes only dW. Three launches per forward+backward
// (tiles, combine, backward; the backward's block 0 also reduces the loss), no memsets, no
// partial sums in global memory besides the forward's [n_cs][B][D] O partials and, only where
// the backward splits its rows (small C), its [row splits][C*K][D] dW partials (in the same
// scratch) and one self-resetting counter per class tile. For D <= 512 (the face shapes),
// every dtype, and D <= 2048 (re-ID, LT) in bf16, where the device has the shared memory;
// src/cuda/head/plan.rs routes every other case to the tiles path (head_fused.cu).
//
// Both tile kernels have one skeleton: a CTA keeps RM rows of one operand resident in shared
// memory (R, all of D padded to DP) and streams BT-row tiles of the other (T) through a
// cp.async double buffer (a single buffer in f32). Per streamed tile:
//   S = R . T^T                 (RM x BT raw products, K = DP; inverse norms applied after)
//   E = f(S)                    (RM x BT, the storage dtype (bf16 in the f16 forward), in smem)
//   ACC += E . T                (RM x DP, f32, in registers: 128 per thread at DP = 512)
// so T is read once from L2 per CTA and feeds both products.
//
// Forward (attn_fwd_d<DP>[_scalar]_<T>): R = x rows (64; 32 in f32; 16 at DP = 2048), T = W class tiles of 32.
//   Grid (row tiles, class splits): blockIdx.x (fastest) is the row tile, so the CTAs of one
//   class split run together and read each W tile from HBM once. The split count is fixed by the
//   shape (plan::attn_splits), never by the device, so every GPU running the same compiled code
//   gives the same bits.
//   E = exp(z - m) * inv_w with FlashAttention-2's online rescaling (m, l per row), the target
//   column left out of E (its term is added in f32 by the combine, through expm1). The W norms
//   come from the tiles as they land (no norms pass); inv_x / inv_w are written for the combine
//   and the backward. Out per (split, row): (m, l, sum z) and O = sum_{j != y} exp(z - m) wh_j.
// Combine (attn_combine_fwd_d<DP>_<T>, a warp per row, a block at DP = 2048): merges the splits in order into lse and
//   loss, and the row's dx for a unit row weight (u, SPEC 4's attention form and the
//   normalization backward); the backward scales u by the row's upstream weight.
// Backward (attn_bwd_d<DP>[_scalar]_<T>): R = W rows (a class tile of 64; 32 in f32; 16 at DP = 2048), T = x row
//   tiles of 32; E = dc * inv_x (SPEC 4; lse, t, dt from the forward); ACC = dwh of the class
//   tile over every row, then the normalization backward in the epilogue and one store of dW.
//   Grid (class tiles, row splits): with few class tiles (small C) the rows are split
//   (plan::attn_bwd_row_splits, fixed by the shape) and the last CTA of a class tile to
//   finish sums the splits' partials in split order (attn_bwd_sum_splits) before the epilogue.
//   Each CTA also writes dx = w_i u_i for rows (its linear block index)*8 + warp, step 8 x CTAs.
// Every output element has one writer and a fixed summation order: bitwise deterministic in any
// block order (the row splits' one atomic only elects which CTA sums; the order is fixed).
//
// DP = 2048 (bf16): 16 resident rows, one T buffer, and the S product split over K between 4
// warp groups (AttnCfg says how); the rest is the same skeleton.
//
// Sub-centers (SPEC 5b; args.k = K >= 1 rows of W per class, class j's sub-center k at row
// j K + k): c_ij = max_k c_ijk, ties to the lowest k. The W tiles are class-aligned: a
// streamed forward tile holds CPT = floor(BT / K) whole classes (TW = CPT K rows, the rest of
// the BT rows masked), a resident backward tile floor(RM / K) classes, so a class's K columns
// are always in one tile. The prologue takes the target's K f64 cosines and keeps the max
// (k*_iy, written to args.k_iy); in the tile the target class's other columns get z = -inf,
// so the row maximum is the max over the columns as before. One shared-memory pass (s_z) then
// lets every thread see its class's K values, and only each class's arg-max column
// (kept_column: the lowest k reaching the max of the K f32 z values) enters l, sum z and
// E, so O sums p_ij wh_j(k*_ij), each class once. The combine takes the target's row
// y K + k*_iy; the backward recomputes the same z, keeps dc on the same columns (the target's
// k*_iy from the forward), and writes dW rows of sub-centers no row picks as 0. Label
// smoothing with K > 1 is refused on the host (its swh term would depend on the row). K = 1
// runs the arithmetic it ran before (no s_z pass, every column its class's arg-max).
//
// Names: <op>_<pass>_d<DP>[_scalar]_<dtype>: DP = 128 for D <= 128, 512 for D <= 512, 2048 for
// D <= 2048 (bf16 only); `_scalar`
// takes any D and alignment with element loads.
// Hot kernels (must not spill, tests/resources.rs): attn_fwd_*, attn_bwd_*
#include "common.cuh"
#include "head.cuh"
#include "args.cuh"
#include "mma.cuh"
#include "tile.cuh"

#define ATTN_THREADS 256

// Per-dtype shape of the skeleton. RM: resident rows; BT: streamed rows per step; STAGES: T
// buffers; PAD: row pitch pad in elements (16-bit: pitch DP + 8 halves = 4 words mod 32, so
// the 8 row addresses of an ldmatrix phase hit distinct banks); SWM x SWN: the warp grid of the
// S product. The ACC product uses a 2 x 4 warp grid (rows x D).
// AWM x AWN: the warp grid of the ACC product (rows x D). KS: the S product's split-K
// warp groups: warp w computes S fragment w % (SWM SWN) over the K range (w / (SWM SWN)) of
// DP / KS columns; the KS - 1 upper groups' partials go through shared memory and group 0 adds
// them in order (ks = 1, 2, ...) and runs the S epilogue alone (KS = 1: no reduction).
// DP = 2048 (bf16 only): 16 resident rows, one T buffer (198,656 bytes), S = 16 x 32 as 2
// fragments of 16 x 16, each over 4 K quarters; ACC 1 x 8 warps of 16 x 256 (128 registers).
template <typename T, int DP> struct AttnCfg {
    static constexpr int RM = 64, BT = 32, STAGES = 2, PAD = 8, SWM = 4, SWN = 2, AWM = 2, AWN = 4, KS = 1;
};
template <int DP> struct AttnCfg<float, DP> {
    static constexpr int RM = 32, BT = 32, STAGES = 1, PAD = 4, SWM = 2, SWN = 4, AWM = 2, AWN = 4, KS = 1;
};
template <> struct AttnCfg<bf16_t, 2048> {
    static constexpr int RM = 16, BT = 32, STAGES = 1, PAD = 8, SWM = 1, SWN = 2, AWM = 1, AWN = 8, KS = 4;
};

// The forward's ACC operand type. f16 storage: S runs on f16 operands (exact products), but E
// and a bf16 copy of the W tile feed O: E = p * inv_w needs f32's range (1e12 for a zero row,
// tiny probabilities), which f16 lacks and bf16 has; rounding the copy costs 2^-9 relative per
// element of O, within SPEC 8's 16-bit tolerance (the target term, where cancellation happens,
// is added in f32 from the f16 row). The backward cannot round x so (a target row nearly
// parallel to its class weight leaves the rounding in dW after the projection, times dt) and
// scales its f16 operands by powers of two instead (attn_bwd).
template <typename T> struct AccOp { using type = T; };
template <> struct AccOp<f16_t> { using type = bf16_t; };
template <typename T> struct IsHalf { static constexpr bool value = false; };
template <> struct IsHalf<f16_t> { static constexpr bool value = true; };

// Dynamic shared memory of both tile kernels: R [RM][DP + PAD], STAGES x T [BT][DP + PAD],
// E [RM][BT + PAD], and for f16 the bf16 copy of the streamed tile [BT][DP + PAD]
// (src/cuda/head/plan.rs: attn_smem_bytes states the same numbers).
template <typename T, int DP> __host__ __device__ constexpr int attn_smem_bytes() {
    using C = AttnCfg<T, DP>;
    return ((C::RM + (C::STAGES + (IsHalf<T>::value ? 1 : 0)) * C::BT) * (DP + C::PAD) + C::RM * (C::BT + C::PAD)) *
           (int)sizeof(T);
}
static_assert(attn_smem_bytes<bf16_t, 512>() == 138240, "keep src/cuda/head/plan.rs in sync");
static_assert(attn_smem_bytes<bf16_t, 128>() == 39936, "keep src/cuda/head/plan.rs in sync");
static_assert(attn_smem_bytes<float, 512>() == 136704, "keep src/cuda/head/plan.rs in sync");
static_assert(attn_smem_bytes<float, 128>() == 38400, "keep src/cuda/head/plan.rs in sync");
static_assert(attn_smem_bytes<f16_t, 512>() == 171520, "keep src/cuda/head/plan.rs in sync");
static_assert(attn_smem_bytes<bf16_t, 2048>() == 198656, "keep src/cuda/head/plan.rs in sync");

// f16: the bf16 copy of the streamed tile for the ACC product (see AccOp). Whole tile, any
// thread mapping: the caller's next __syncthreads publishes it.
template <typename T, int BT, int DP>
__device__ __forceinline__ const typename AccOp<T>::type* acc_operand(const T* cur, typename AccOp<T>::type* copy, int pitch) {
    if constexpr (IsHalf<T>::value) {
        for (int e = threadIdx.x; e < BT * DP; e += ATTN_THREADS) {
            const int r = e / DP, k = e % DP;
            copy[r * pitch + k] = from_f32<bf16_t>(to_f32(cur[r * pitch + k]));
        }
        return copy;
    } else {
        return cur;
    }
}

// load_tile of ROWS x DP (zero past D and nrows); DP = 2048 in a rolled loop over 256-column
// chunks: the unrolled 16-byte copies of a whole 2048-wide tile keep their addresses live
// across the main loop and spill (ptxas, sm_90).
template <typename T, bool VEC, int ROWS, int DP, int NT>
__device__ __forceinline__ void attn_load(T* s, int pitch, const T* __restrict__ g, int r0, int nrows, int ncols) {
    if constexpr (DP > 512) {
        constexpr int CH = 256;
#pragma unroll 1
        for (int k0 = 0; k0 < DP; k0 += CH) load_tile<T, VEC, ROWS, CH, NT>(s + k0, pitch, g, r0, nrows, k0, ncols);
    } else {
        load_tile<T, VEC, ROWS, DP, NT>(s, pitch, g, r0, nrows, 0, ncols);
    }
}

// out[r] = 1 / max(|row r|, eps) for the ROWS rows of a shared-memory tile (zero beyond D, so
// the padding adds nothing). NT / ROWS consecutive threads per row, each a strided partial sum,
// then a fixed xor tree: the same bits in every CTA that loads the same row.
template <typename T, int ROWS, int DP>
__device__ __forceinline__ void tile_inv_norms(const T* s, int pitch, float* out) {
    constexpr int TPR = ATTN_THREADS / ROWS;
    static_assert(TPR * ROWS == ATTN_THREADS && TPR <= WARP_SIZE, "whole rows per warp");
    const int r = threadIdx.x / TPR, k0 = threadIdx.x % TPR;
    float acc = 0.0f;
    for (int k = k0; k < DP; k += TPR) {
        const float v = to_f32(s[r * pitch + k]);
        acc = fmaf(v, v, acc);
    }
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (k0 == 0) out[r] = 1.0f / fmaxf(sqrtf(acc), FC_EPS_NORM);
}

// S = R . T^T for one warp (K = DP: the caller offsets sR and sT to its K range), in k-chunks of 64 under a rolled loop: unrolling all of
// DP lets the compiler hoist fragment loads of the whole product next to the 128 registers of
// O and spill (ptxas, sm_90).
template <typename T, int MI, int NI, int DP>
__device__ __forceinline__ void s_product(float (&acc)[MI][NI][4], const T* sR, int pitch, int m0, const T* sT, int n0) {
    zero_acc(acc);
#pragma unroll 1
    for (int k0 = 0; k0 < DP; k0 += 64) warp_gemm<T, MI, NI, 64, false, false>(acc, sR + k0, pitch, m0, sT + k0, pitch, n0);
}

// ACC += E . T for one warp: E stored [m][k] (pitch pe), T stored [k][n] (pitch pt), K = BT.
// The same products as warp_gemm<T, MI, NI, K, false, true>, but with the k-steps rolled and
// each 16-column B fragment used as soon as it is loaded, so only a dozen operand registers
// live next to the 128 of ACC (the unrolled form spills on sm_90). f32 runs warp_gemm's SIMT loop.
template <typename T, int MI, int NI, int K>
__device__ __forceinline__ void acc_product(float (&acc)[MI][NI][4], const T* sE, int pe, int m0, const T* sT, int pt, int n0) {
    if constexpr (IsF32<T>::value) {
        warp_gemm<T, MI, NI, K, false, true>(acc, sE, pe, m0, sT, pt, n0);
    } else {
        static_assert(NI % 2 == 0 && K % 16 == 0, "mma tiles: NI even, K a multiple of 16");
        const int lane = threadIdx.x % WARP_SIZE;
#pragma unroll 1
        for (int k0 = 0; k0 < K; k0 += 16) {
            u32 a[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) ldmatrix_x4(a[mi], sE + (m0 + mi * 16 + (lane & 15)) * pe + k0 + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < NI / 2; ++np) {
                // Stored [k][n]: matrices (k, n), (k + 8, n), (k, n + 8), (k + 8, n + 8) (as warp_gemm).
                u32 r[4];
                ldmatrix_x4_trans(r, sT + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * pt + n0 + np * 16 + (lane >> 4) * 8);
                const u32 b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    mma_16816<T>(acc[mi][2 * np], a[mi], b0);
                    mma_16816<T>(acc[mi][2 * np + 1], a[mi], b1);
                }
            }
        }
    }
}

// acc rows times f(row), in the ACC warp layout (row m0 + 16 mi + g + 8 h): the online
// softmax's rescale in the forward, the f16 class scales in the backward.
template <int MI, int NI, typename F>
__device__ __forceinline__ void scale_acc_rows(float (&acc)[MI][NI][4], int m0, F f) {
    const int g = (threadIdx.x % WARP_SIZE) >> 2;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float sc = f(m0 + mi * 16 + g + 8 * h);
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                acc[mi][ni][2 * h] *= sc;
                acc[mi][ni][2 * h + 1] *= sc;
            }
        }
}

// Split-K (Cfg::KS > 1): warps of group ks > 0 put their partial S into red[ks - 1] (RM x BT,
// f32), and after the barrier the group-0 warps add them in the order ks = 1, 2, ... (the
// same bits in any warp schedule). Every thread reaches the __syncthreads; KS = 1: nothing.
template <int KS, int RM, int BT, int MI, int NI>
__device__ __forceinline__ void s_split_k_reduce(float (&acc)[MI][NI][4], float* red, int ks, int m0, int n0) {
    if constexpr (KS > 1) {
        const int lane = threadIdx.x % WARP_SIZE, g = lane >> 2, q = lane & 3;
        if (ks > 0) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                    for (int r = 0; r < 4; ++r)
                        red[((ks - 1) * RM + m0 + mi * 16 + g + 8 * (r >> 1)) * BT + n0 + ni * 8 + 2 * q + (r & 1)] = acc[mi][ni][r];
        }
        __syncthreads();
        if (ks == 0) {
#pragma unroll 1
            for (int k = 0; k < KS - 1; ++k)
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                        for (int r = 0; r < 4; ++r)
                            acc[mi][ni][r] += red[(k * RM + m0 + mi * 16 + g + 8 * (r >> 1)) * BT + n0 + ni * 8 + 2 * q + (r & 1)];
        }
    }
}

// The largest of N per-warp partials of row r, parts[k * stride + r] for k = 0..N-1.
template <int N> __device__ __forceinline__ float max_of_parts(const float* parts, int stride, int r) {
    float m = parts[r];
#pragma unroll
    for (int k = 1; k < N; ++k) m = fmaxf(m, parts[k * stride + r]);
    return m;
}

// Sub-centers (SPEC 5b): whether column cl, class jl's sub-center cl - jl K, is the one that
// class counts through. zs: the K values of the row's class group at zs[jl K ..] (a z row of
// the forward, a cosine-logit row of the backward). The target class: its k*_iy (from the
// forward's f64 cosines); another class: the lowest k reaching the max of its K f32 values (a
// NaN wins and stays, as ref_head's class_cos), so near-ties may differ from the f64 oracle.
__device__ __forceinline__ bool kept_column(const float* zs, int jl, int cl, int K, bool target, int kt) {
    const int k = cl - jl * K;
    if (target) return k == kt;
    const float* r = zs + jl * K;
    float m = r[0];
    int kb = 0;
    for (int kk = 1; kk < K; ++kk) {
        if (nan_max_takes(r[kk], m)) {
            m = r[kk];
            kb = kk;
        }
    }
    return kb == k;
}

// ---- forward ------------------------------------------------------------------------------
template <typename T, bool VEC, int DP> __device__ __forceinline__ void attn_fwd(const AttnFwdArgs<T>& a) {
    using Cfg = AttnCfg<T, DP>;
    constexpr int RM = Cfg::RM, BT = Cfg::BT, P = DP + Cfg::PAD, EP = BT + Cfg::PAD;
    constexpr int SWN = Cfg::SWN, SMI = RM / Cfg::SWM / 16, SNI = BT / SWN / 8;
    constexpr int AWN = Cfg::AWN, AMI = RM / Cfg::AWM / 16, ANI = DP / AWN / 8;
    constexpr int KS = Cfg::KS, SW = Cfg::SWM * SWN, KL = DP / KS;
    static_assert(SW * KS * WARP_SIZE == ATTN_THREADS && Cfg::AWM * AWN * WARP_SIZE == ATTN_THREADS, "8 warps");
    static_assert(KL % 64 == 0, "whole k-chunks per split-K group");
    constexpr int NT = ATTN_THREADS, NSW = (DP + NT - 1) / NT;
    FC_DYN_SMEM(dyn);
    using A = typename AccOp<T>::type;
    T* sR = reinterpret_cast<T*>(dyn);
    T* sT = sR + RM * P;
    A* sE = reinterpret_cast<A*>(sT + Cfg::STAGES * BT * P);
    A* sC = sE + RM * EP;  // f16 only: the bf16 copy of the streamed tile
    __shared__ float s_invx[RM], s_invw[BT], s_zt[RM], s_m[RM], s_l[RM], s_sz[RM], s_scale[RM];
    __shared__ float s_pmax[SWN][RM], s_pl[SWN][RM], s_psz[SWN][RM];
    __shared__ float s_red[KS > 1 ? KS - 1 : 1][KS > 1 ? RM : 1][KS > 1 ? BT : 1];  // split-K partials
    __shared__ float s_z[RM][BT];  // K > 1: the tile's z, for each class's arg-max column
    __shared__ int s_y[RM], s_kt[RM];

    const HeadParams& p = a.p;
    const int B = a.b, C = a.c, D = a.d, K = a.k;
    const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
    const int g = lane >> 2, q = lane & 3;
    const int r0 = blockIdx.x * RM, split = blockIdx.y;
    // Class-aligned tiles (SPEC 5b): a W tile holds CPT whole classes, TW = CPT K rows (the
    // rest masked), so that each class's arg-max is taken inside one tile. K = 1: BT classes.
    const int CPT = BT / K, TW = CPT * K, CK = C * K;
    const int n_ct = ceil_div(C, CPT);
    const int ct_begin = split * a.tiles_per_split, ct_end = min(n_ct, ct_begin + a.tiles_per_split);
    const int cb = ct_begin * CPT, ce = min(C, ct_end * CPT);  // this split's classes
    // S warp: fragment swarp, K range ks (warp-uniform); only group ks = 0 runs the S epilogue.
    const int swarp = KS == 1 ? warp : warp % SW, ks = KS == 1 ? 0 : warp / SW;
    const bool s_owner = KS == 1 || ks == 0;
    const int sm0 = (swarp / SWN) * (RM / Cfg::SWM), sn0 = (swarp % SWN) * (BT / SWN);
    const int am0 = (warp / AWN) * (RM / Cfg::AWM), an0 = (warp % AWN) * (DP / AWN);
    const bool ls_on = p.ls != 0.0f, first_rt = blockIdx.x == 0;

    attn_load<T, VEC, RM, DP, NT>(sR, P, a.x, r0, B, D);
    if (ct_begin < ct_end) attn_load<T, VEC, BT, DP, NT>(sT, P, a.w, cb * K, CK, D);
    cp_async_commit();
    if (tid < RM) {
        const int r = r0 + tid;
        s_y[tid] = r < B ? a.labels[r] : -1;
        s_kt[tid] = 0;
        s_m[tid] = -FC_INF;
        s_l[tid] = 0.0f;
        s_sz[tid] = 0.0f;
        s_zt[tid] = 0.0f;
    }
    __syncthreads();
    // Rows whose target class is in this split: c_iy in f64 from global x and W (head.cuh:
    // target_cos says why), t_i from lane 0. Warp-uniform branch: the shuffles are whole.
    // K > 1: the max of the target's K f64 cosines, k*_iy the lowest k reaching it (a NaN wins
    // and stays, as ref_margin), kept in s_kt for the tiles and written for the combine.
    for (int rl = warp; rl < RM; rl += NT / WARP_SIZE) {
        const int y = s_y[rl], r = r0 + rl;
        if (y >= cb && y < ce) {
            const T* xr = a.x + (size_t)r * D;
            const T* wy = a.w + (size_t)y * K * D;
            double c = target_cos_warp(xr, wy, D, lane);
            int kb = 0;
            for (int k = 1; k < K; ++k) {
                const double ck = target_cos_warp(xr, wy + (size_t)k * D, D, lane);
                if (nan_max_takes(ck, c)) {
                    c = ck;
                    kb = k;
                }
            }
            if (lane == 0) {
                s_kt[rl] = kb;
                if (a.k_iy) a.k_iy[r] = (u32)kb;
                const TargetLogit tl = target_logit(p, c, p.cloud != 0 ? a.sigma[y] : 0.0f, (u32)r);
                a.c_iy[r] = tl.c;
                a.t[r] = tl.t;
                a.alpha[r] = tl.alpha;
                a.dt[r] = tl.dt;
                s_zt[rl] = p.s * tl.t;
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // R and the first T tile landed; s_zt written
    tile_inv_norms<T, RM, DP>(sR, P, s_invx);
    __syncthreads();  // s_invx for every warp (also when a split had no class tile)

    float acc[AMI][ANI][4];
    zero_acc(acc);
    float sw[NSW];  // this thread's columns of sum wh_j (row-tile-0 CTAs, ls > 0)
#pragma unroll
    for (int k = 0; k < NSW; ++k) sw[k] = 0.0f;

    for (int ct = ct_begin; ct < ct_end; ++ct) {
        const int c0 = ct * CPT, w0 = c0 * K;  // the tile's first class and W row
        T* cur = sT + (Cfg::STAGES == 2 ? ((ct - ct_begin) & 1) : 0) * BT * P;
        if (Cfg::STAGES == 2 && ct + 1 < ct_end) {
            // The other buffer was last read in the previous iteration, which ended with __syncthreads.
            attn_load<T, VEC, BT, DP, NT>(sT + ((ct + 1 - ct_begin) & 1) * BT * P, P, a.w, w0 + TW, CK, D);
        }
        cp_async_commit();
        tile_inv_norms<T, BT, DP>(cur, P, s_invw);
        __syncthreads();  // s_invw (and, on the first tile, s_invx) visible
        if (first_rt && tid < TW && w0 + tid < CK) a.inv_w[w0 + tid] = s_invw[tid];
        if (first_rt && ls_on) {  // K = 1 only (the host refuses ls > 0 with K > 1)
#pragma unroll
            for (int k = 0; k < NSW; ++k) {
                const int col = tid + k * NT;
                if (col < DP)
                    for (int r = 0; r < BT && c0 + r < C; ++r) sw[k] = fmaf(to_f32(cur[r * P + col]), s_invw[r], sw[k]);
            }
        }

        float sacc[SMI][SNI][4];
        s_product<T, SMI, SNI, KL>(sacc, sR + ks * KL, P, sm0, cur + ks * KL, sn0);
        s_split_k_reduce<KS, RM, BT>(sacc, &s_red[0][0][0], ks, sm0, sn0);
        const A* accT = acc_operand<T, BT, DP>(cur, sC, P);

        // z in place of the products (-inf past C and past the tile's TW rows), then each row's
        // maximum over the tile. K > 1: column cl is class c0 + cl / K's sub-center cl % K; the
        // target class's columns other than k*_iy get -inf (the margin acts on k*_iy's only),
        // and z goes to s_z for the arg-max pass (published by the next __syncthreads).
        if (s_owner) {
#pragma unroll
        for (int mi = 0; mi < SMI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int rl = sm0 + mi * 16 + g + 8 * h;
                const int y = s_y[rl];
                float mx = -FC_INF;
#pragma unroll
                for (int ni = 0; ni < SNI; ++ni)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int cl = sn0 + ni * 8 + 2 * q + e, jl = cl / K, j = c0 + jl;
                        float z = -FC_INF;
                        if (cl < TW && j < C) {
                            const float c = clamp_cos(sacc[mi][ni][2 * h + e] * s_invx[rl] * s_invw[cl]);
                            z = j != y ? p.s * c : (cl - jl * K == s_kt[rl] ? s_zt[rl] : -FC_INF);
                        }
                        sacc[mi][ni][2 * h + e] = z;
                        if (K > 1) s_z[rl][cl] = z;
                        mx = fmaxf(mx, z);
                    }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                if (q == 0) s_pmax[swarp % SWN][rl] = mx;
            }
        }
        __syncthreads();
        if (tid < RM) {
            const float mo = s_m[tid], mn = fmaxf(mo, max_of_parts<SWN>(&s_pmax[0][0], RM, tid));
            s_scale[tid] = mo == -FC_INF ? 0.0f : expf(mo - mn);
            s_m[tid] = mn;
        }
        __syncthreads();
        // E = exp(z - m) * inv_w (0 for the target column and past C); the row sums of
        // exp(z - m) (target included) and of z. K > 1: only each class's arg-max column
        // counts (kept_column: the target's k*_iy, another class's lowest arg-max of its K z),
        // so l, sum z and O see each class once, through its dominant sub-center.
        if (s_owner) {
#pragma unroll
        for (int mi = 0; mi < SMI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int rl = sm0 + mi * 16 + g + 8 * h;
                const int y = s_y[rl];
                const float m = s_m[rl];
                float lp = 0.0f, lz = 0.0f;
#pragma unroll
                for (int ni = 0; ni < SNI; ++ni)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int cl = sn0 + ni * 8 + 2 * q + e, jl = cl / K, j = c0 + jl;
                        const float z = sacc[mi][ni][2 * h + e];
                        const bool keep = cl < TW && j < C && (K == 1 || kept_column(&s_z[rl][0], jl, cl, K, j == y, s_kt[rl]));
                        float pe = 0.0f;
                        if (keep) {
                            pe = expf(z - m);
                            lp += pe;
                            lz += z;
                        }
                        sE[rl * EP + cl] = from_f32<A>(keep && j != y ? pe * s_invw[cl] : 0.0f);
                    }
                lp += __shfl_xor_sync(0xffffffffu, lp, 1);
                lp += __shfl_xor_sync(0xffffffffu, lp, 2);
                lz += __shfl_xor_sync(0xffffffffu, lz, 1);
                lz += __shfl_xor_sync(0xffffffffu, lz, 2);
                if (q == 0) {
                    s_pl[swarp % SWN][rl] = lp;
                    s_psz[swarp % SWN][rl] = lz;
                }
            }
        }
        // Rescale O to the new row maxima (s_scale was published by the last __syncthreads).
        scale_acc_rows(acc, am0, [&](int r) { return s_scale[r]; });
        __syncthreads();  // E and the row sums visible
        if (tid < RM) {
            float l = s_l[tid] * s_scale[tid], z = s_sz[tid];
#pragma unroll
            for (int k = 0; k < SWN; ++k) {
                l += s_pl[k][tid];
                z += s_psz[k][tid];
            }
            s_l[tid] = l;
            s_sz[tid] = z;
        }
        acc_product<A, AMI, ANI, BT>(acc, sE, EP, am0, accT, P, an0);
        if (Cfg::STAGES == 1) {
            __syncthreads();  // everyone is done with the one buffer
            if (ct + 1 < ct_end) attn_load<T, VEC, BT, DP, NT>(sT, P, a.w, w0 + TW, CK, D);
            cp_async_commit();
        }
        cp_async_wait<0>();
        __syncthreads();  // the next tile landed; E, s_pmax, s_pl free
    }

    if (tid < RM) {
        const int r = r0 + tid;
        if (r < B) {
            const int ns = gridDim.y;
            a.part[(size_t)split * B + r] = s_m[tid];
            a.part[((size_t)ns + split) * B + r] = s_l[tid];
            a.part[((size_t)2 * ns + split) * B + r] = s_sz[tid];
            if (split == 0) a.inv_x[r] = s_invx[tid];
        }
    }
    if (first_rt && ls_on) {
#pragma unroll
        for (int k = 0; k < NSW; ++k) {
            const int col = tid + k * NT;
            if (col < D) a.swh[(size_t)split * D + col] = sw[k];
        }
    }
    float* o = a.opart + (size_t)split * B * D;
#pragma unroll
    for (int mi = 0; mi < AMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < ANI; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = r0 + am0 + mi * 16 + g + 8 * (r >> 1);
                const int col = an0 + ni * 8 + 2 * q + (r & 1);
                if (row < B && col < D) o[(size_t)row * D + col] = acc[mi][ni][r];
            }
}

// Entry points: AttnFwdArgs<T> (args.cuh); grid (ceil(B / RM), class splits), dynamic smem
// attn_smem_bytes<T, DP>(). One CTA per SM (launch bounds (256, 1)): O takes 128 registers.
FC_DTYPES(attn_fwd_d512, (ATTN_THREADS, 1), AttnFwdArgs, attn_fwd<T, true, 512>(a))
FC_DTYPES(attn_fwd_d512_scalar, (ATTN_THREADS, 1), AttnFwdArgs, attn_fwd<T, false, 512>(a))
FC_DTYPES(attn_fwd_d128, (ATTN_THREADS, 1), AttnFwdArgs, attn_fwd<T, true, 128>(a))
FC_DTYPES(attn_fwd_d128_scalar, (ATTN_THREADS, 1), AttnFwdArgs, attn_fwd<T, false, 128>(a))
// D <= 2048: bf16 only (f16's bf16 copy of the tile does not fit, nor do f32's operands).
FC_ENTRY(attn_fwd_d2048_bf16, bf16_t, (ATTN_THREADS, 1), AttnFwdArgs, attn_fwd<T, true, 2048>(a))
FC_ENTRY(attn_fwd_d2048_scalar_bf16, bf16_t, (ATTN_THREADS, 1), AttnFwdArgs, attn_fwd<T, false, 2048>(a))

// ---- combine ------------------------------------------------------------------------------
// One group of WPR warps per row: one warp (8 rows per block) for D <= 512, the whole block
// for D <= 2048, so that re-ID's 64 rows run on 64 SMs and not 8. Merges the row's n_cs split
// partials in split order (lane k takes splits k, k + 32, ..., then a fixed xor tree; every
// warp of the group does the same merge and every lane ends with lane 0's bits), writes lse
// and loss, then u_i, the row's dx for a unit row weight (SPEC 4):
//   dxh = s [ O / l - (ls / C)(S - wh_y) + (expm1(z_y - lse) + ls - ls / C) dt wh_y ]
//   u   = (dxh - xh (xh . dxh)) * inv_x
// with O = sum_k exp(m_k - M) O_k over the splits and S = sum_k swh_k. The group holds dxh in
// registers (DP / (32 WPR) per lane: 16 at DP = 512, 8 at DP = 2048); xh . dxh is each warp's
// xor tree, then (WPR > 1) the warps' sums added in warp order through shared memory.
// Sub-centers (K > 1): wh_y is the target's dominant sub-center's row, y K + k*_iy; ls = 0
// (the host refuses ls > 0 with K > 1: S would depend on the row's arg-max sub-centers).
// Ignored rows: zeros everywhere (k*_iy too).
#define ATTN_DMAX 2048
template <typename T, int DP> __device__ __forceinline__ void attn_combine(const AttnCombineArgs<T>& a) {
    constexpr int WPR = DP > 512 ? ATTN_THREADS / WARP_SIZE : 1;
    constexpr int NT = WPR * WARP_SIZE;  // threads per row
    constexpr int KL = DP / NT;
    static_assert(DP <= ATTN_DMAX && DP % NT == 0, "attn_combine: DP");
    __shared__ float s_dot[WPR];
    const HeadParams& p = a.p;
    const int B = a.b, D = a.d, ns = a.n_cs;
    const int i = blockIdx.x * (ATTN_THREADS / NT) + threadIdx.x / NT;
    const int t = threadIdx.x % NT, lane = threadIdx.x % WARP_SIZE;
    if (i >= B) return;  // the whole group leaves
    const int y = a.labels[i];
    float* u = a.u + (size_t)i * D;
    if (y < 0) {
        if (t == 0) {
            a.lse[i] = 0.0f;
            a.loss[i] = 0.0f;
            a.c_iy[i] = 0.0f;
            a.t[i] = 0.0f;
            a.alpha[i] = 0.0f;
            a.dt[i] = 0.0f;
            if (a.k_iy) a.k_iy[i] = 0u;
        }
        for (int k = t; k < D; k += NT) u[k] = 0.0f;
        return;
    }
    LseAcc acc = lse_empty();
    for (int k = lane; k < ns; k += WARP_SIZE) {
        const LseAcc b = {a.part[(size_t)k * B + i], a.part[((size_t)ns + k) * B + i], a.part[((size_t)2 * ns + k) * B + i]};
        lse_combine(acc, b);
    }
    acc = warp_lse(acc);
    // Lane 0's merge for every lane: the xor tree's pairs compute a*x + b*y and b*y + a*x,
    // which NVRTC may contract into FMAs differently, so lanes could differ in the last bit.
    // (The warps of a group run the same instructions on the same data: the same bits.)
    acc.m = __shfl_sync(0xffffffffu, acc.m, 0);
    acc.s = __shfl_sync(0xffffffffu, acc.s, 0);
    acc.sz = __shfl_sync(0xffffffffu, acc.sz, 0);
    const float lse = acc.m + logf(acc.s);
    const float zy = p.s * a.t[i];
    if (t == 0) {
        a.lse[i] = lse;
        a.loss[i] = row_loss(p, acc, zy);
    }
    float o[KL];
#pragma unroll
    for (int k = 0; k < KL; ++k) o[k] = 0.0f;
    for (int sp = 0; sp < ns; ++sp) {
        const float f = expf(a.part[(size_t)sp * B + i] - acc.m);
        const float* op = a.opart + ((size_t)sp * B + i) * D;
#pragma unroll
        for (int k = 0; k < KL; ++k) {
            const int col = t + k * NT;
            if (col < D) o[k] = fmaf(f, op[col], o[k]);
        }
    }
    // The target's W row: its dominant sub-center y K + k*_iy (SPEC 5b; K = 1: row y).
    const int wrow = a.k_iy ? y * a.k + (int)a.k_iy[i] : y;
    const float inv_l = 1.0f / acc.s, ix = a.inv_x[i], iwy = a.inv_w[wrow];
    const float tc = (expm1f(zy - lse) + p.ls - p.ls_over_c) * a.dt[i];
    const T* xr = a.x + (size_t)i * D;
    const T* wy = a.w + (size_t)wrow * D;
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < KL; ++k) {
        const int col = t + k * NT;
        if (col < D) {
            const float why = to_f32(wy[col]) * iwy;
            float v = o[k] * inv_l + tc * why;
            if (p.ls != 0.0f) {
                float sum = 0.0f;
                for (int sp = 0; sp < ns; ++sp) sum += a.swh[(size_t)sp * D + col];
                v -= p.ls_over_c * (sum - why);
            }
            o[k] = p.s * v;
            dot = fmaf(to_f32(xr[col]) * ix, o[k], dot);
        }
    }
    dot = warp_sum(dot);
    if (WPR > 1) {
        if (lane == 0) s_dot[t / WARP_SIZE] = dot;
        __syncthreads();
        dot = 0.0f;
#pragma unroll
        for (int w = 0; w < WPR; ++w) dot += s_dot[w];
    }
#pragma unroll
    for (int k = 0; k < KL; ++k) {
        const int col = t + k * NT;
        if (col < D) u[col] = (o[k] - to_f32(xr[col]) * ix * dot) * ix;
    }
}
// Entry points: AttnCombineArgs<T>; d512 (D <= 512): grid ceil(B / 8) blocks of 256, a warp
// per row; d2048 (D <= 2048, bf16 only like the tile kernels): grid B blocks of 256, a block
// per row.
FC_DTYPES(attn_combine_fwd_d512, (ATTN_THREADS), AttnCombineArgs, attn_combine<T, 512>(a))
FC_ENTRY(attn_combine_fwd_d2048_bf16, bf16_t, (ATTN_THREADS), AttnCombineArgs, attn_combine<T, 2048>(a))

// An f16 operand from f32, saturating at +-65504 (the scaling keeps values below 2^15; this
// is the last guard: inf times a zero would put NaN into a whole product).
__device__ __forceinline__ f16_t to_operand_f16(float v) { return from_f32<f16_t>(fminf(fmaxf(v, -65504.0f), 65504.0f)); }

// ---- backward -----------------------------------------------------------------------------
// Row splits (gridDim.y > 1, small C: enough CTAs for the SMs): each CTA of class tile
// blockIdx.x holds dW-hat over its split's rows only. It stores that partial to
// dwpart[blockIdx.y] (W rows w0 .. w0 + TW, columns < D), fences, and counts itself in
// counters[blockIdx.x]; the CTA that counts last (atomicInc wraps the count back to 0 for
// the next launch: no memset) reads every split's partial from L2 and sums them in split
// order 0, 1, ..., its own included, so the sum and dW do not depend on which CTA came last.
// Returns whether this CTA is the last (it then holds the whole dW-hat in acc and runs the
// epilogue); the others return from the kernel. acc is whole per row (cl) and column (col):
// elements past TW, CK or D are never stored and come back 0 (as with one split, where the
// zero-padded x columns and masked rows leave them 0).
// Everything but acc is recomputed from the kernel parameters (constant memory) and the
// thread index: the d512 bf16 kernel has no register to spare for it.
template <int RM, int AWM, int AWN, int DP, int MI, int NI, typename A>
__device__ __forceinline__ bool attn_bwd_sum_splits(float (&acc)[MI][NI][4], const A& a) {
    __shared__ int s_last;
    const int lane = threadIdx.x % WARP_SIZE, g = lane >> 2, q = lane & 3, warp = threadIdx.x / WARP_SIZE;
    const int am0 = (warp / AWN) * (RM / AWM), an0 = (warp % AWN) * (DP / AWN);
    const int K = a.k, TW = RM / K * K, w0 = blockIdx.x * TW, CK = a.c * K, D = a.d;
    float* dwpart = a.dwpart;
    const size_t stride = (size_t)CK * D;
    // Element (mi, ni, 2h + e) is W row w0 + am0 + mi*16 + g + 8h, column c0 + ni*8 + e: one
    // row pointer per (mi, h) and immediate offsets, so that no per-element address stays live
    // across the hand-off (128 of them spill at DP = 2048).
    const int c0 = an0 + 2 * q;
    float* mine = dwpart + blockIdx.y * stride;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int cl = am0 + mi * 16 + g + 8 * h;
            if (cl >= TW || w0 + cl >= CK) continue;
            float* row = mine + (size_t)(w0 + cl) * D + c0;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (c0 + ni * 8 + e < D) row[ni * 8 + e] = acc[mi][ni][2 * h + e];
        }
    __threadfence();  // this CTA's partial visible device-wide before it counts itself
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicInc(&a.counters[blockIdx.x], gridDim.y - 1) == gridDim.y - 1;
    __syncthreads();
    if (!s_last) return false;
    __threadfence();  // the other splits' partials, counted before this CTA, are visible
    zero_acc(acc);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int cl = am0 + mi * 16 + g + 8 * h;
            if (cl >= TW || w0 + cl >= CK) continue;
            const float* row = dwpart + (size_t)(w0 + cl) * D + c0;
#pragma unroll 1
            for (unsigned sp = 0; sp < gridDim.y; ++sp, row += stride)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                    for (int e = 0; e < 2; ++e)  // __ldcg: from L2, never a stale L1 line
                        if (c0 + ni * 8 + e < D) acc[mi][ni][2 * h + e] += __ldcg(row + ni * 8 + e);
        }
    return true;
}

template <typename T, bool VEC, int DP> __device__ __forceinline__ void attn_bwd(const AttnBwdArgs<T>& a) {
    using Cfg = AttnCfg<T, DP>;
    constexpr int RM = Cfg::RM, BT = Cfg::BT, P = DP + Cfg::PAD, EP = BT + Cfg::PAD;
    constexpr int SWN = Cfg::SWN, SMI = RM / Cfg::SWM / 16, SNI = BT / SWN / 8;
    constexpr int AWN = Cfg::AWN, AMI = RM / Cfg::AWM / 16, ANI = DP / AWN / 8;
    constexpr int KS = Cfg::KS, SW = Cfg::SWM * SWN, KL = DP / KS;
    static_assert(SW * KS * WARP_SIZE == ATTN_THREADS && Cfg::AWM * AWN * WARP_SIZE == ATTN_THREADS, "8 warps");
    static_assert(KL % 64 == 0, "whole k-chunks per split-K group");
    constexpr int NT = ATTN_THREADS;
    FC_DYN_SMEM(dyn);
    // f16: E = dc * frac_x * 2^k_j with inv_x = frac_x * 2^e_i (split_pow2) and a running
    // power of two k_j per class putting the class's largest |dc * frac_x| so far into
    // [2^14, 2^15) (when it grows, the class's ACC row is rescaled by the exact power of two);
    // the x rows feed ACC from a copy scaled by 2^e_i (exact except for elements below 2^-14
    // of the row's norm, which become f16 subnormals: an absolute error of at most 2^-25 of
    // the normalized row, far below bf16's 2^-9). So no operand leaves f16's range and x is
    // not rounded to a coarser type; the epilogue multiplies ACC back by 2^-k_j.
    constexpr bool SCALED = IsHalf<T>::value;
    T* sR = reinterpret_cast<T*>(dyn);
    T* sT = sR + RM * P;
    T* sE = sT + Cfg::STAGES * BT * P;
    T* sC = sE + RM * EP;  // f16 only: the scaled copy of the x tile
    __shared__ float s_invw[RM], s_invx[BT], s_lse[BT], s_zt[BT], s_dt[BT], s_wt[BT];
    __shared__ float s_dot[AWN][RM];
    __shared__ float s_z[BT][RM];  // K > 1: each row's cosine logits of the tile, for the arg-max
    __shared__ int s_kt[BT];
    __shared__ float s_red[KS > 1 ? KS - 1 : 1][KS > 1 ? RM : 1][KS > 1 ? BT : 1];  // split-K partials
    __shared__ int s_y[BT];
    __shared__ float s_xfr[SCALED ? BT : 1], s_xpow[SCALED ? BT : 1];
    __shared__ float s_cmax[SCALED ? SWN : 1][SCALED ? RM : 1], s_cls[SCALED ? RM : 1], s_resc[SCALED ? RM : 1];

    const HeadParams& p = a.p;
    const int B = a.b, C = a.c, D = a.d, K = a.k;
    const int tid = threadIdx.x, lane = tid % WARP_SIZE, warp = tid / WARP_SIZE;
    const int g = lane >> 2, q = lane & 3;
    // Class-aligned tiles as in the forward: CPR whole classes, TW = CPR K resident W rows
    // starting at row w0 (the rest masked). K = 1: RM classes.
    const int CPR = RM / K, TW = CPR * K, CK = C * K;
    const int j0 = blockIdx.x * CPR, w0 = j0 * K, n_rt = ceil_div(B, BT);
    // Row split blockIdx.y: n_it x row tiles from blockIdx.y * rtiles_per_split (the host
    // makes none empty). The first is recomputed where needed rather than kept live (the d512
    // kernels have no register to spare).
    const int n_it = min(n_rt, (int)(blockIdx.y + 1) * a.rtiles_per_split) - (int)blockIdx.y * a.rtiles_per_split;
    const int bid = blockIdx.y * gridDim.x + blockIdx.x, nblocks = gridDim.x * gridDim.y;
    // S warp: fragment swarp, K range ks (warp-uniform); only group ks = 0 runs the S epilogue.
    const int swarp = KS == 1 ? warp : warp % SW, ks = KS == 1 ? 0 : warp / SW;
    const bool s_owner = KS == 1 || ks == 0;
    const int sm0 = (swarp / SWN) * (RM / Cfg::SWM), sn0 = (swarp % SWN) * (BT / SWN);
    const int am0 = (warp / AWN) * (RM / Cfg::AWM), an0 = (warp % AWN) * (DP / AWN);

    attn_load<T, VEC, RM, DP, NT>(sR, P, a.w, w0, CK, D);
    attn_load<T, VEC, BT, DP, NT>(sT, P, a.x, (int)blockIdx.y * a.rtiles_per_split * BT, B, D);
    cp_async_commit();

    // The forward's reduced loss (forward_backward queues no head_reduce launch): block 0.
    if (a.total && bid == 0) head_reduce(a.loss_rows, B, a.loss_scale, a.total);
    // dx = w_i u_i for this CTA's rows (while the first tiles are in flight).
    for (int i = bid * (NT / WARP_SIZE) + warp; i < B; i += nblocks * (NT / WARP_SIZE)) {
        const float wt = a.labels[i] >= 0 ? a.g_scale * (a.row_g ? a.row_g[i] : 1.0f) : 0.0f;
        const float* ur = a.u + (size_t)i * D;
        for (int k = lane; k < D; k += WARP_SIZE) {
            const float v = wt * ur[k];
            if (a.dx32) a.dx32[(size_t)i * D + k] = v;
            else a.dx[(size_t)i * D + k] = from_f32<T>(v);
        }
    }
    if (tid < RM) {
        s_invw[tid] = tid < TW && w0 + tid < CK ? a.inv_w[w0 + tid] : 0.0f;
        if constexpr (SCALED) s_cls[tid] = __int_as_float((127 + 64) << 23);  // 2^64: no value seen yet
    }

    float acc[AMI][ANI][4];
    zero_acc(acc);
    for (int it = 0; it < n_it; ++it) {
        const int r0 = ((int)blockIdx.y * a.rtiles_per_split + it) * BT;
        T* cur = sT + (Cfg::STAGES == 2 ? (it & 1) : 0) * BT * P;
        if (tid < BT) {
            const int r = r0 + tid;
            const int y = r < B ? a.labels[r] : -1;
            s_y[tid] = y;
            s_invx[tid] = y >= 0 ? a.inv_x[r] : 0.0f;
            s_lse[tid] = y >= 0 ? a.lse[r] : 0.0f;
            s_zt[tid] = y >= 0 ? p.s * a.t[r] : 0.0f;
            s_dt[tid] = y >= 0 ? a.dt[r] : 0.0f;
            s_wt[tid] = y >= 0 ? a.g_scale * (a.row_g ? a.row_g[r] : 1.0f) : 0.0f;
            s_kt[tid] = y >= 0 && a.k_iy ? (int)a.k_iy[r] : 0;
            if constexpr (SCALED) split_pow2(s_invx[tid], s_xfr[tid], s_xpow[tid]);
        }
        cp_async_wait<0>();
        __syncthreads();  // this row tile landed; the s_* rows visible
        zero_ignored_rows<T, BT, DP, NT>(cur, P, s_y);  // E's zeros would not cancel their NaN
        if (Cfg::STAGES == 2 && it + 1 < n_it) {
            // The other buffer was last read in the previous iteration, which ended with __syncthreads.
            attn_load<T, VEC, BT, DP, NT>(sT + ((it + 1) & 1) * BT * P, P, a.x, r0 + BT, B, D);
        }
        cp_async_commit();

        float sacc[SMI][SNI][4];
        s_product<T, SMI, SNI, KL>(sacc, sR + ks * KL, P, sm0, cur + ks * KL, sn0);
        s_split_k_reduce<KS, RM, BT>(sacc, &s_red[0][0][0], ks, sm0, sn0);
        // E[class][row] = dc * inv_x (SPEC 4; 0 for ignored rows, rows >= B, classes >= C); f16:
        // dc * frac_x here, the class scale below.
        static_assert(!(SCALED && KS > 1), "split-K: the f16 class scaling is not split");
        if (K > 1) {
            // Sub-centers: each (row, W row)'s cosine logit s c into s_z, so that every thread
            // sees the K values of its class (spread over lanes and warps) and keeps the
            // gradient on the class's arg-max row only, the forward's choice (kept_column,
            // the same c as the forward computed).
            if (s_owner) {
#pragma unroll
                for (int mi = 0; mi < SMI; ++mi)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int cl = sm0 + mi * 16 + g + 8 * h;
#pragma unroll
                        for (int ni = 0; ni < SNI; ++ni)
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                const int rl = sn0 + ni * 8 + 2 * q + e;
                                s_z[rl][cl] = p.s * clamp_cos(sacc[mi][ni][2 * h + e] * s_invx[rl] * s_invw[cl]);
                            }
                    }
            }
            __syncthreads();  // s_z visible (K is the same in every thread)
        }
        if (s_owner) {
#pragma unroll
        for (int mi = 0; mi < SMI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int cl = sm0 + mi * 16 + g + 8 * h, jl = cl / K, j = j0 + jl;
#pragma unroll
                for (int ni = 0; ni < SNI; ++ni)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int rl = sn0 + ni * 8 + 2 * q + e;
                        const int y = s_y[rl];
                        float dc = 0.0f;
                        if (y >= 0 && cl < TW && j < C && (K == 1 || kept_column(&s_z[rl][0], jl, cl, K, j == y, s_kt[rl]))) {
                            const bool tgt = j == y;
                            // The forward's order of the two factors (the same rounding of c).
                            const float c = clamp_cos(sacc[mi][ni][2 * h + e] * s_invx[rl] * s_invw[cl]);
                            const float z = tgt ? s_zt[rl] : p.s * c;
                            const float pr = expf(z - s_lse[rl]);
                            const float qq = (tgt ? 1.0f - p.ls : 0.0f) + p.ls_over_c;
                            dc = s_wt[rl] * p.s * (pr - qq);
                            if (tgt) dc *= s_dt[rl];
                        }
                        if constexpr (SCALED) sacc[mi][ni][2 * h + e] = dc * s_xfr[rl];
                        else sE[cl * EP + rl] = from_f32<T>(dc * s_invx[rl]);
                    }
            }
        }
        if constexpr (SCALED) {
            // Each class's largest |dc * frac_x| in this row tile: the quad, then the SWN warps.
#pragma unroll
            for (int mi = 0; mi < SMI; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float m = 0.0f;
#pragma unroll
                    for (int ni = 0; ni < SNI; ++ni) m = fmaxf(m, fmaxf(fabsf(sacc[mi][ni][2 * h]), fabsf(sacc[mi][ni][2 * h + 1])));
                    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
                    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
                    if (q == 0) s_cmax[swarp % SWN][sm0 + mi * 16 + g + 8 * h] = m;
                }
            for (int e = tid; e < BT * DP; e += NT) {  // the x copy with rows scaled by 2^e_i
                const int r = e / DP, k = e % DP;
                sC[r * P + k] = from_f32<T>(to_f32(cur[r * P + k]) * s_xpow[r]);
            }
            __syncthreads();
            if (tid < RM) {
                const float m = max_of_parts<SWN>(&s_cmax[0][0], RM, tid);
                const float old = s_cls[tid];
                const float now = m > 0.0f ? fminf(old, f16_operand_scale(m).s) : old;
                s_resc[tid] = now / old;  // a power of two <= 1: exact
                s_cls[tid] = now;
            }
            __syncthreads();
#pragma unroll
            for (int mi = 0; mi < SMI; ++mi)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int cl = sm0 + mi * 16 + g + 8 * h;
                    const float sc = s_cls[cl];
#pragma unroll
                    for (int ni = 0; ni < SNI; ++ni)
#pragma unroll
                        for (int e = 0; e < 2; ++e)
                            sE[cl * EP + sn0 + ni * 8 + 2 * q + e] = to_operand_f16(sacc[mi][ni][2 * h + e] * sc);
                }
            scale_acc_rows(acc, am0, [&](int r) { return s_resc[r]; });
        }
        __syncthreads();  // E visible
        acc_product<T, AMI, ANI, BT>(acc, sE, EP, am0, SCALED ? sC : cur, P, an0);
        __syncthreads();  // E, the s_* rows and (one stage) the buffer are free
        if (Cfg::STAGES == 1 && it + 1 < n_it) {
            attn_load<T, VEC, BT, DP, NT>(sT, P, a.x, r0 + BT, B, D);
            cp_async_commit();
        }
    }

    if constexpr (SCALED) scale_acc_rows(acc, am0, [&](int r) { return 1.0f / s_cls[r]; });  // 2^-k: exact
    if (gridDim.y > 1 && !attn_bwd_sum_splits<RM, Cfg::AWM, AWN, DP>(acc, a)) return;
    // dW = (dwh - wh (wh . dwh)) * inv_w (SPEC 4): the dot over D from the register tiles (quad,
    // then the 4 warps of a row band, in order), wh from the resident W rows.
#pragma unroll
    for (int mi = 0; mi < AMI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int cl = am0 + mi * 16 + g + 8 * h;
            float d = 0.0f;
#pragma unroll
            for (int ni = 0; ni < ANI; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) d = fmaf(acc[mi][ni][2 * h + e], to_f32(sR[cl * P + an0 + ni * 8 + 2 * q + e]), d);
            d += __shfl_xor_sync(0xffffffffu, d, 1);
            d += __shfl_xor_sync(0xffffffffu, d, 2);
            if (q == 0) s_dot[warp % AWN][cl] = d;
        }
    __syncthreads();
#pragma unroll
    for (int mi = 0; mi < AMI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int cl = am0 + mi * 16 + g + 8 * h, j = w0 + cl;  // j: the W row
            if (cl >= TW || j >= CK) continue;
            const float iw = s_invw[cl];
            float dot = 0.0f;
#pragma unroll
            for (int k = 0; k < AWN; ++k) dot += s_dot[k][cl];
            dot *= iw;
#pragma unroll
            for (int ni = 0; ni < ANI; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = an0 + ni * 8 + 2 * q + e;
                    if (col >= D) continue;
                    const float v = (acc[mi][ni][2 * h + e] - to_f32(sR[cl * P + col]) * iw * dot) * iw;
                    if (a.dw32) a.dw32[(size_t)j * D + col] = v;
                    else a.dw[(size_t)j * D + col] = from_f32<T>(v);
                }
        }
}

// Entry points: AttnBwdArgs<T>; grid (class tiles of floor(RM / K) classes, row splits of
// rtiles_per_split x row tiles), dynamic smem attn_smem_bytes<T, DP>().
FC_DTYPES(attn_bwd_d512, (ATTN_THREADS, 1), AttnBwdArgs, attn_bwd<T, true, 512>(a))
FC_DTYPES(attn_bwd_d512_scalar, (ATTN_THREADS, 1), AttnBwdArgs, attn_bwd<T, false, 512>(a))
FC_DTYPES(attn_bwd_d128, (ATTN_THREADS, 1), AttnBwdArgs, attn_bwd<T, true, 128>(a))
FC_DTYPES(attn_bwd_d128_scalar, (ATTN_THREADS, 1), AttnBwdArgs, attn_bwd<T, false, 128>(a))
FC_ENTRY(attn_bwd_d2048_bf16, bf16_t, (ATTN_THREADS, 1), AttnBwdArgs, attn_bwd<T, true, 2048>(a))
FC_ENTRY(attn_bwd_d2048_scalar_bf16, bf16_t, (ATTN_THREADS, 1), AttnBwdArgs, attn_bwd<T, false, 2048>(a))
