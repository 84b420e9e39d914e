// common.cuh — device-only helpers shared by every featcloud kernel.
//
// NVRTC compiles this without a CUDA toolkit install, so nothing here includes
// a host or toolkit header: bf16/f16 are carried as raw 16-bit patterns and
// converted with PTX `cvt`, fixed-width integers come from the built-in
// compiler types, and the math functions are NVRTC's built-in device
// functions (sqrtf, logf, cosf, acosf, ...).
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;

// Raw storage types. Kernels take `const bf16_t*` / `const f16_t*` arguments;
// the Rust side passes `half::bf16` / `half::f16` buffers with the same bits.
struct __align__(2) bf16_t { u16 bits; };
struct __align__(2) f16_t { u16 bits; };

#define FC_EPS_NORM 1e-12f
#define FC_PI 3.14159265358979323846f
#define WARP_SIZE 32
// No <math.h> under NVRTC without a toolkit: spell infinity by its bits.
#define FC_INF __int_as_float(0x7f800000)

// Dynamic shared memory, declared at block scope as `FC_DYN_SMEM(name);`: a 16-byte
// aligned `unsigned char` array of the launch's dynamic smem size. C++ has no block-scope
// declaration that is both `extern` and `static`, so under the CPU emulator (FC_EMU) the
// name is a pointer to the emulator's per-launch buffer (emu/cuda_emu.h), poisoned with
// 0xFF at every block start and followed by an unmapped page.
#ifdef FC_EMU
#define FC_DYN_SMEM(name) unsigned char* const name = fc_emu_dyn_smem()
#else
#define FC_DYN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// ---- entry points -----------------------------------------------------------
// Every kernel file stamps its `extern "C"` entry points from device templates, one line each:
//   FC_DTYPES(name, (bounds), Args, body)     name_f32, name_bf16, name_f16 with T = float,
//                                             bf16_t, f16_t
//   FC_ENTRY(name, TYPE, (bounds), Args, body) one entry point with T = TYPE
// Each takes `const Args<T> a` (kernels/args.cuh), has `__launch_bounds__ bounds` and runs
// `body;`, which may use `a` and `T`. build/scan.rs reads these lines (names, the first launch
// bound, the argument struct), so a stamp starts its line and is not itself inside a macro; an
// entry point whose argument struct is not `Args<T>` is written out as `extern "C" __global__ ...`.
#define FC_ENTRY(name, TYPE, bounds, Args, ...) \
    extern "C" __global__ void __launch_bounds__ bounds name(const Args<TYPE> a) { using T = TYPE; __VA_ARGS__; }
#define FC_DTYPES(name, bounds, Args, ...)                 \
    FC_ENTRY(name##_f32, float, bounds, Args, __VA_ARGS__)   \
    FC_ENTRY(name##_bf16, bf16_t, bounds, Args, __VA_ARGS__) \
    FC_ENTRY(name##_f16, f16_t, bounds, Args, __VA_ARGS__)

// ---- dtype conversion -------------------------------------------------------

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) {
    // bf16 is the top half of an f32: exact widening.
    return __uint_as_float(((u32)v.bits) << 16);
}
__device__ __forceinline__ float to_f32(f16_t v) {
    float f;
#ifdef FC_EMU
    f = fc_emu_f16_to_f32(v.bits);
#else
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
#endif
    return f;
}

// Round-to-nearest-even narrowing, the same rounding `half` uses on the host: one PTX cvt on
// the device, the emulator's model of that instruction under FC_EMU.
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
#ifdef FC_EMU
#define FC_FROM_F32(T, ptx, emu_cvt) \
    template <> __device__ __forceinline__ T from_f32<T>(float v) { T r; r.bits = emu_cvt(v); return r; }
#else
#define FC_FROM_F32(T, ptx, emu_cvt) \
    template <> __device__ __forceinline__ T from_f32<T>(float v) { \
        T r; \
        asm("cvt.rn." ptx ".f32 %0, %1;" : "=h"(r.bits) : "f"(v)); \
        return r; \
    }
#endif
FC_FROM_F32(bf16_t, "bf16", fc_emu_f32_to_bf16)
FC_FROM_F32(f16_t, "f16", fc_emu_f32_to_f16)
#undef FC_FROM_F32

// ---- reductions ---------------------------------------------------------------
// Fixed shuffle trees: the result is the same bits run after run (SPEC 4).

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum (MAX = false) or max (MAX = true); every thread gets the result.
// `scratch` holds >= 32 floats. The leading __syncthreads protects `scratch` when the
// helper is called twice in a row.
template <bool MAX> __device__ __forceinline__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int nwarps = (blockDim.x + WARP_SIZE - 1) / WARP_SIZE;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : (MAX ? -FC_INF : 0.0f);
    return MAX ? warp_max(v) : warp_sum(v);
}
__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce<false>(v, scratch); }
__device__ __forceinline__ float block_max(float v, float* scratch) { return block_reduce<true>(v, scratch); }

// Sum of squares of one row xr[0, d), computed by a whole warp: each lane strides
// by 32 in a fixed order, then the fixed shuffle tree; every lane gets the sum.
template <typename T>
__device__ __forceinline__ float warp_row_sumsq(const T* __restrict__ xr, int d) {
    const int lane = threadIdx.x % WARP_SIZE;
    float acc = 0.0f;
    for (int k = lane; k < d; k += WARP_SIZE) {
        const float v = to_f32(xr[k]);
        acc = fmaf(v, v, acc);
    }
    return warp_sum(acc);
}

// Merge two online-softmax partials (m, s) where s = sum exp(z - m). An empty partial is
// (-inf, 0); a NaN in either (a NaN logit, SPEC 2's non-finite flag) survives the merge, so a
// NaN of x or W reaches the loss instead of being dropped with an "empty" partial. Finite
// partials merge exactly as without the NaN cases (a non-empty partial has s >= 1).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    if (m2 == -FC_INF && s2 == 0.0f) return;
    if (m == -FC_INF && s == 0.0f) { m = m2; s = s2; return; }
    const float mn = fmaxf(m, m2);
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

// ---- Philox4x32-10 and the cloud normal (SPEC section 6) -----------------------

struct philox_u4 { u32 x, y, z, w; };

__device__ __forceinline__ philox_u4 philox4x32_10(philox_u4 ctr, u32 k0, u32 k1) {
    const u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const u32 W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const u32 hi0 = __umulhi(M0, ctr.x), lo0 = M0 * ctr.x;
        const u32 hi1 = __umulhi(M1, ctr.z), lo1 = M1 * ctr.z;
        ctr = philox_u4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
        k0 += W0;
        k1 += W1;
    }
    return ctr;
}

// eps_i for row `row` at (seed, step): Box-Muller on the first two outputs.
// f32 arithmetic in exactly the order of the oracle's `box_muller_f32`:
//   ln_u1 = logf((r0 + 1) * 2^-32)            when r0 <  2^31
//         = log1pf(-(~r0) * 2^-32)            when r0 >= 2^31 (1 - u1 exactly, so
//                                              ln u1 keeps its precision near 1)
//   eps   = sqrtf(-2 ln_u1) * cosf(6.2831855f * (r1 * 2^-32))
// Needs fast-math off (build/nvrtc.rs does not pass --use_fast_math).
__device__ __forceinline__ float box_muller_f32(u32 r0, u32 r1) {
    const float two_m32 = 2.3283064365386963e-10f;  // 2^-32
    const float ln_u1 = (r0 < 0x80000000u) ? logf(((float)r0 + 1.0f) * two_m32)
                                           : log1pf(-((float)(~r0) * two_m32));
    return sqrtf(-2.0f * ln_u1) * cosf(6.2831855f * ((float)r1 * two_m32));
}

__device__ __forceinline__ float cloud_normal(u64 seed, u64 step, u32 row) {
    philox_u4 ctr = {row, 0u, (u32)(step & 0xffffffffu), (u32)(step >> 32)};
    const philox_u4 r = philox4x32_10(ctr, (u32)(seed & 0xffffffffu), (u32)(seed >> 32));
    return box_muller_f32(r.x, r.y);
}

// ---- misc ------------------------------------------------------------------------

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }
