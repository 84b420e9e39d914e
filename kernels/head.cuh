// head.cuh — the margin head's per-row math, shared by head_ref.cu and head_fused*.cu.
//
// HeadParams mirrors `HeadParams` in src/cuda/args.rs (#[repr(C)], 56 bytes, size and
// offsets asserted on both sides; kernels get it as a field of their args.cuh struct).
// target_logit() is SPEC section 3's target branch and section 4's dt_i, in f64, in the
// same order as src/oracle/head.rs.
#pragma once
#include "common.cuh"

struct HeadParams {
    float s;         // logit scale
    float m1, m2, m3;
    float ls;        // label smoothing
    float ls_over_c; // ls / C
    int cloud;       // 0 off, 1 symmetric, 2 one-sided
    int fallback;    // 0 linear, 1 clamp, 2 none (cos(phi) - m3 for every phi)
    int margin_grad; // 0 exact, 1 straight-through
    int _pad;
    u64 seed, step;
};
static_assert(sizeof(HeadParams) == 56, "HeadParams layout must match src/cuda/args.rs");

struct TargetLogit {
    float c;     // c_iy, clamped to [-1, 1]
    float t;     // t_i (z_iy = s * t_i)
    float dt;    // dt_i / dc_iy as the backward uses it
    float alpha; // cloud perturbation actually applied
};

// eps_i of SPEC 6 from the same Philox words as common.cuh's cloud_normal, with the
// Box-Muller step in f64 as the oracle's cloud_normal does it (one call per row).
__device__ __forceinline__ double cloud_normal_f64(u64 seed, u64 step, u32 row) {
    philox_u4 ctr = {row, 0u, (u32)(step & 0xffffffffu), (u32)(step >> 32)};
    const philox_u4 r = philox4x32_10(ctr, (u32)(seed & 0xffffffffu), (u32)(seed >> 32));
    const double two_m32 = 2.3283064365386962890625e-10;  // 2^-32
    const double u1 = ((double)r.x + 1.0) * two_m32;
    const double u2 = (double)r.y * two_m32;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * 3.141592653589793 * u2);
}

// c_iy = xh_i . wh_y recomputed by one thread in f64 from the stored rows. Why: theta =
// acos(c) has slope 1/sin(theta), so near theta = 0 (or pi) the f32 tile cosine's last
// few ulps would move t_i by 1e-4 and lse by more than SPEC 8's 1e-5; in f64 the target
// matches the oracle to rounding. Costs 3 D FMAs per row, once per forward.
// v clamped to [lo, hi], a NaN kept (fmin / fmax would turn it into a bound and so hide a NaN
// or infinity of x or W from the loss, the head's non-finite flag, SPEC 2): Rust's clamp.
__device__ __forceinline__ double clamp_keep_nan(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }

template <typename T>
__device__ __forceinline__ double target_cos(const T* __restrict__ xr, const T* __restrict__ wr, int d) {
    double xx = 0.0, ww = 0.0, xw = 0.0;
    for (int k = 0; k < d; ++k) {
        const double a = to_f32(xr[k]), b = to_f32(wr[k]);
        xx = fma(a, a, xx);
        ww = fma(b, b, ww);
        xw = fma(a, b, xw);
    }
    const double c = xw / (fmax(sqrt(xx), 1e-12) * fmax(sqrt(ww), 1e-12));
    return clamp_keep_nan(c, -1.0, 1.0);
}

// The same f64 cosine computed by a whole warp (lanes stride over d, then a fixed xor
// tree), for kernels where one thread scanning a row would stall its CTA. Every lane
// returns the result; call with all 32 lanes.
template <typename T>
__device__ __forceinline__ double target_cos_warp(const T* __restrict__ xr, const T* __restrict__ wr, int d, int lane) {
    double xx = 0.0, ww = 0.0, xw = 0.0;
    for (int k = lane; k < d; k += WARP_SIZE) {
        const double a = to_f32(xr[k]), b = to_f32(wr[k]);
        xx = fma(a, a, xx);
        ww = fma(b, b, ww);
        xw = fma(a, b, xw);
    }
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) {
        xx += __shfl_xor_sync(0xffffffffu, xx, o);
        ww += __shfl_xor_sync(0xffffffffu, ww, o);
        xw += __shfl_xor_sync(0xffffffffu, xw, o);
    }
    const double c = xw / (fmax(sqrt(xx), 1e-12) * fmax(sqrt(ww), 1e-12));
    return clamp_keep_nan(c, -1.0, 1.0);
}

// SPEC 3's target branch and SPEC 4's dt_i in f64 (once per row), in the oracle's order.
// c: the clamped target cosine; sigma: sigma_cloud[y_i]; row: i (Philox counter).
__device__ __forceinline__ TargetLogit target_logit(const HeadParams& p, double c, float sigma, u32 row) {
    const double PI = 3.141592653589793;
    double alpha = 0.0;
    if (p.cloud != 0) {
        const double eps = cloud_normal_f64(p.seed, p.step, row);
        alpha = (double)sigma * (p.cloud == 2 ? fabs(eps) : eps);
    }
    const double m1 = p.m1, m3 = p.m3;
    const double cc = clamp_keep_nan(c, -1.0 + 1e-7, 1.0 - 1e-7);
    const double theta = acos(cc);
    const double delta = (double)p.m2 + alpha;
    const double phi = m1 * theta + delta;
    double t, dt;
    // fallback none (2) takes the regular formula for every phi; a NaN phi takes it too.
    if (phi > PI && p.fallback != 2) {
        if (p.fallback == 0) {
            t = c - m3 - delta * sin(delta);
            dt = 1.0;
        } else {
            t = cos(PI) - m3;
            dt = 0.0;
        }
    } else if (phi < 0.0 && p.fallback != 2) {
        t = 1.0 - m3;
        dt = 0.0;
    } else {
        t = cos(phi) - m3;
        dt = m1 * sin(phi) / sqrt((1.0 - cc) * (1.0 + cc));
    }
    if (p.margin_grad == 1) dt = 1.0;
    TargetLogit r;
    r.c = (float)c;
    r.t = (float)t;
    r.dt = (float)dt;
    r.alpha = (float)alpha;
    return r;
}

// Whether a running max m gives way to v, for the max over a class's sub-centers (SPEC 5b):
// v > m, so an equal later v does not take it (ties go to the lowest k), or v NaN while m is
// not: a NaN takes the max and keeps it, so that a NaN of x or W reaches the loss (SPEC 2's
// non-finite flag) as it does with one center per class.
template <typename F>
__device__ __forceinline__ bool nan_max_takes(F v, F m) { return v > m || (v != v && m == m); }

// A cosine clamped to [-1, 1] that keeps a NaN (fminf / fmaxf would turn it into -1 and so
// hide a NaN or infinity of x or W from the loss, the head's non-finite flag, SPEC 2): Rust's
// f32::clamp, which the CPU backend uses.
__device__ __forceinline__ float clamp_cos(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// Online softmax state of a set of logits: max m, s = sum exp(z - m), sz = sum z.
struct LseAcc {
    float m, s, sz;
};

__device__ __forceinline__ LseAcc lse_empty() { return LseAcc{-FC_INF, 0.0f, 0.0f}; }

__device__ __forceinline__ void lse_add(LseAcc& a, float z) {
    if (!(z <= a.m)) {  // z > m, and a NaN z (which then makes m and s NaN: SPEC 2's flag)
        a.s = a.s * expf(a.m - z) + 1.0f;  // expf(-inf) = 0 on the first element
        a.m = z;
    } else {
        a.s += expf(z - a.m);
    }
    a.sz += z;
}

__device__ __forceinline__ void lse_combine(LseAcc& a, const LseAcc& b) {
    lse_merge(a.m, a.s, b.m, b.s);
    a.sz += b.sz;
}

// Merges across the lanes of a warp whose lane bit is in [lo_mask, 16]; a fixed
// xor tree, so the result is the same bits every run.
__device__ __forceinline__ LseAcc lse_shfl_xor(LseAcc a, int offset) {
    LseAcc b;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, offset);
    b.s = __shfl_xor_sync(0xffffffffu, a.s, offset);
    b.sz = __shfl_xor_sync(0xffffffffu, a.sz, offset);
    lse_combine(a, b);
    return a;
}

__device__ __forceinline__ LseAcc warp_lse(LseAcc a) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) a = lse_shfl_xor(a, o);
    return a;
}

// The reduced loss, by one 256-thread block: thread k sums rows k, k+256, ... in order, then
// block_sum. loss_rows [B] in (0 for ignored rows); out [1] = scale * sum. head_reduce_fwd_f32
// (head_ref.cu) and the attention-form backward (head_attn.cu) call it: the same bits.
__device__ __forceinline__ void head_reduce(const float* __restrict__ loss_rows, int B, float scale, float* __restrict__ out) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < B; i += blockDim.x) acc += loss_rows[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = acc * scale;
}

// Row loss from its combined state (SPEC 3). ls = 0: (m - z_y) + log(s), which
// keeps the digits of a small loss instead of subtracting two large numbers. ls > 0:
// (1 - ls)(m - z_y) + (ls m - (ls / C) sum z) + log(s), the same sum grouped so that
// each large logit is first subtracted from its like (at C = 1 both groups are exactly
// 0; the ungrouped m - (1 - ls) z_y - (ls / C) sum z left ~1e-8 of f32 rounding there).
__device__ __forceinline__ float row_loss(const HeadParams& p, const LseAcc& a, float zy) {
    if (p.ls == 0.0f) return (a.m - zy) + logf(a.s);
    return ((1.0f - p.ls) * (a.m - zy) + (p.ls * a.m - p.ls_over_c * a.sz)) + logf(a.s);
}
