// cuda_emu.h — a small CPU emulation of the CUDA execution model, so that g++
// (C++17) can compile and run the unmodified kernels/*.cu when FC_EMU is defined.
//
// Model: blocks run one after another; the threads of a block are cooperative
// fibers (ucontext) on one OS thread, scheduled round-robin. __syncthreads()
// and warp collectives are barriers: a fiber parks until every non-exited
// thread of its block (or warp) has arrived. Static __shared__ variables become
// function-local statics (one block at a time, so "per block"); dynamic shared
// memory is one global buffer, filled with 0xFF (NaN pattern) before every block.
// Checks: a warp collective with a partial mask or with exited lanes, lanes of a
// warp arriving at different collective counts (divergent collectives), a block
// deadlock (threads split between barriers), and misaligned cp.async / ldmatrix
// addresses abort the harness with a message.
//
// Not modelled: inter-block concurrency, the memory model, asynchrony of
// cp.async (copies are synchronous), tensor-core accumulation order (mma sums
// exact products in f64 and rounds once), the device math library's ulp errors
// (glibc's expf/logf/... are used).
#pragma once
#ifndef FC_EMU
#error "cuda_emu.h is only for FC_EMU builds"
#endif

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

[[noreturn]] inline void fc_emu_fail(const char* msg) {
    fprintf(stderr, "cuda_emu: %s (block %u,%u,%u thread %u,%u,%u)\n", msg, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
            threadIdx.y, threadIdx.z);
    fflush(stderr);
    abort();
}

// ---- fiber scheduler ---------------------------------------------------------------------

namespace fc_emu {

enum State { RUN, AT_BLOCK, AT_WARP, DONE };

struct Fiber {
    ucontext_t ctx;
    char* stack = nullptr;
    State state = RUN;
    uint3 tidx{};
    unsigned long long ncoll = 0;  // warp collectives passed (divergence check)
};

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr int MAX_THREADS = 1024;
constexpr size_t DYN_SMEM_BYTES = 228 * 1024;

struct Sched {
    ucontext_t main_ctx;
    // Order in which runnable fibers are resumed: 0 ascending, 1 descending, 2 a fresh
    // pseudo-random permutation every pass (seeded). Set from FC_EMU_SCHED by the harness;
    // a kernel whose results depend on it has an intra-block race.
    int order = 0;
    unsigned long long rng = 0x9E3779B97F4A7C15ull;
    std::vector<int> perm;
    std::vector<Fiber> f;
    int cur = -1;
    int n = 0;
    const std::function<void()>* body = nullptr;
};
inline Sched g;
// Per-lane exchange slots for warp collectives: [warp][lane][word].
inline unsigned long long xchg[MAX_THREADS / 32][32][16];

inline void yield() {
    Fiber& me = g.f[g.cur];
    swapcontext(&me.ctx, &g.main_ctx);
}

inline void fiber_entry() {
    (*g.body)();
    g.f[g.cur].state = DONE;
    swapcontext(&g.f[g.cur].ctx, &g.main_ctx);
}

inline int lane_id() { return (int)((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32); }
inline int linear_tid() { return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

// Parks this fiber until every non-exited lane of its warp arrives.
inline void warp_sync(unsigned mask) {
    if (mask != 0xffffffffu) fc_emu_fail("warp collective with a partial mask is not emulated");
    Fiber& me = g.f[g.cur];
    me.state = AT_WARP;
    me.ncoll++;
    yield();
}

inline void run_block() {
    const int n = g.n;
    g.perm.resize(n);
    for (;;) {
        for (int t = 0; t < n; ++t) g.perm[t] = g.order == 1 ? n - 1 - t : t;
        if (g.order == 2)
            for (int t = n - 1; t > 0; --t) {  // Fisher-Yates with xorshift64
                g.rng ^= g.rng << 13;
                g.rng ^= g.rng >> 7;
                g.rng ^= g.rng << 17;
                const int j = (int)(g.rng % (unsigned long long)(t + 1));
                const int tmp = g.perm[t];
                g.perm[t] = g.perm[j];
                g.perm[j] = tmp;
            }
        for (int i = 0; i < n; ++i) {
            const int t = g.perm[i];
            if (g.f[t].state != RUN) continue;
            g.cur = t;
            threadIdx = g.f[t].tidx;
            swapcontext(&g.main_ctx, &g.f[t].ctx);
        }
        bool all_done = true, released = false;
        for (int t = 0; t < n; ++t) all_done &= g.f[t].state == DONE;
        if (all_done) return;
        for (int w0 = 0; w0 < n; w0 += 32) {
            const int w1 = w0 + 32 < n ? w0 + 32 : n;
            int waiting = 0, live = 0, done = 0;
            unsigned long long nc = 0;
            bool same = true;
            for (int t = w0; t < w1; ++t) {
                if (g.f[t].state == DONE) { ++done; continue; }
                ++live;
                if (g.f[t].state == AT_WARP) {
                    if (waiting == 0) nc = g.f[t].ncoll;
                    same &= g.f[t].ncoll == nc;
                    ++waiting;
                }
            }
            if (live > 0 && waiting == live) {
                if (done > 0 || w1 - w0 < 32) {
                    threadIdx = g.f[w0].tidx;
                    fc_emu_fail("warp collective with exited (or missing) lanes");
                }
                if (!same) {
                    threadIdx = g.f[w0].tidx;
                    fc_emu_fail("lanes of a warp met at different collectives (divergence)");
                }
                for (int t = w0; t < w1; ++t) g.f[t].state = RUN;
                released = true;
            }
        }
        if (released) continue;
        bool all_block = true;
        for (int t = 0; t < n; ++t) all_block &= (g.f[t].state == DONE || g.f[t].state == AT_BLOCK);
        if (all_block) {
            for (int t = 0; t < n; ++t)
                if (g.f[t].state == AT_BLOCK) g.f[t].state = RUN;
            continue;
        }
        fc_emu_fail("deadlock: threads of the block wait at different barriers");
    }
}

alignas(256) inline unsigned char dyn_smem_buf[DYN_SMEM_BYTES];

inline void run_grid(dim3 grid, dim3 block, size_t dyn_smem, const std::function<void()>& body) {
    const int n = (int)(block.x * block.y * block.z);
    if (n <= 0 || n > MAX_THREADS) fc_emu_fail("bad block size");
    if (dyn_smem > DYN_SMEM_BYTES) fc_emu_fail("dynamic shared memory too large");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) fc_emu_fail("empty grid");
    g.f.resize(n);
    g.n = n;
    g.body = &body;
    gridDim = grid;
    blockDim = block;
    for (int t = 0; t < n; ++t)
        if (!g.f[t].stack) g.f[t].stack = static_cast<char*>(malloc(STACK_BYTES));
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = uint3{bx, by, bz};
                memset(dyn_smem_buf, 0xff, dyn_smem);
                for (int t = 0; t < n; ++t) {
                    Fiber& f = g.f[t];
                    f.state = RUN;
                    f.ncoll = 0;
                    f.tidx = uint3{(unsigned)t % block.x, ((unsigned)t / block.x) % block.y, (unsigned)t / (block.x * block.y)};
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack;
                    f.ctx.uc_stack.ss_size = STACK_BYTES;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, fiber_entry, 0);
                }
                run_block();
            }
    g.cur = -1;
}

}  // namespace fc_emu

// kernel<<<grid, block, dyn_smem>>>(args...)
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dyn_smem, A... args) {
    static_assert(sizeof...(P) == sizeof...(A), "argument count");
    const std::function<void()> body = [&]() { kernel(static_cast<P>(args)...); };
    fc_emu::run_grid(grid, block, dyn_smem, body);
}

// ---- barriers and warp collectives ---------------------------------------------------------

inline void __syncthreads() {
    fc_emu::g.f[fc_emu::g.cur].state = fc_emu::AT_BLOCK;
    fc_emu::yield();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { fc_emu::warp_sync(mask); }

template <typename T> T fc_emu_shfl(unsigned mask, T v, int src_of_lane_xor, bool is_xor) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a 4/8-byte value");
    const int tid = fc_emu::linear_tid(), lane = tid % 32, w = tid / 32;
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(T));
    fc_emu::xchg[w][lane][0] = bits;
    fc_emu::warp_sync(mask);
    const int src = (is_xor ? (lane ^ src_of_lane_xor) : src_of_lane_xor) & 31;
    bits = fc_emu::xchg[w][src][0];
    fc_emu::warp_sync(mask);
    T r;
    memcpy(&r, &bits, sizeof(T));
    return r;
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask) { return fc_emu_shfl(mask, v, lane_mask, true); }
template <typename T> T __shfl_sync(unsigned mask, T v, int src) { return fc_emu_shfl(mask, v, src, false); }

// ---- intrinsics -----------------------------------------------------------------------------

inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
// Compiled with -ffp-contract=off: each is one IEEE round-to-nearest operation.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long __cvta_generic_to_shared(const void* p) { return (unsigned long long)(uintptr_t)p; }

// ---- PTX emulation helpers (used by the FC_EMU branches of kernels/*.cuh) ---------------------

// cvt.rn.bf16.f32: round to nearest even; NaN -> canonical 0x7fff.
inline unsigned short fc_emu_f32_to_bf16(float v) {
    const unsigned x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float fc_emu_bf16_to_f32(unsigned short h) { return __uint_as_float((unsigned)h << 16); }

// cvt.rn.f16.f32: round to nearest even, overflow to inf; NaN -> canonical 0x7fff.
inline unsigned short fc_emu_f32_to_f16(float v) {
    const unsigned x = __float_as_uint(v);
    const unsigned sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fff;
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520: inf (also inf itself)
    if (ax < 0x38800000u) {                                           // below 2^-14: subnormal or zero
        const float m = nearbyintf(__uint_as_float(ax) * 16777216.0f);  // units of 2^-24, RNE
        return (unsigned short)(sign | (unsigned)m);
    }
    unsigned r = ax - 0x38000000u;
    r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
    return (unsigned short)(sign | r);
}
inline float fc_emu_f16_to_f32(unsigned short h) {
    const unsigned sign = ((unsigned)h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        const float v = (float)m * 5.9604644775390625e-8f;  // 2^-24, exact
        return sign ? -v : v;
    }
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d = A * B + c over the warp, fragments
// per the PTX ISA (g = lane / 4, q = lane % 4):
//   a0 = A[g][2q..], a1 = A[g+8][2q..], a2 = A[g][2q+8..], a3 = A[g+8][2q+8..]
//   b0 = B[2q..2q+1][g], b1 = B[2q+8..2q+9][g];  d0,d1 = D[g][2q..], d2,d3 = D[g+8][2q..]
// Products of 16-bit values are exact in f64; the 16 products and c are summed in f64 and
// rounded once (the hardware's internal order and truncation are not modelled).
template <bool BF16>
inline void fc_emu_mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    const int tid = fc_emu::linear_tid(), lane = tid % 32, w = tid / 32;
    unsigned long long* me = fc_emu::xchg[w][lane];
    for (int i = 0; i < 4; ++i) me[i] = a[i];
    me[4] = b[0];
    me[5] = b[1];
    fc_emu::warp_sync(0xffffffffu);
    auto cvt = [](unsigned h) -> double { return BF16 ? (double)fc_emu_bf16_to_f32((unsigned short)h) : (double)fc_emu_f16_to_f32((unsigned short)h); };
    auto A = [&](int r, int k) -> double {
        const int src = (r & 7) * 4 + ((k & 7) >> 1), reg = (r >> 3) + 2 * (k >> 3);
        const unsigned v = (unsigned)fc_emu::xchg[w][src][reg];
        return cvt((k & 1) ? (v >> 16) : (v & 0xffffu));
    };
    auto Bm = [&](int k, int n) -> double {
        const int src = n * 4 + ((k & 7) >> 1), reg = 4 + (k >> 3);
        const unsigned v = (unsigned)fc_emu::xchg[w][src][reg];
        return cvt((k & 1) ? (v >> 16) : (v & 0xffffu));
    };
    const int gq = lane >> 2, q = lane & 3;
    float out[4];
    for (int r = 0; r < 4; ++r) {
        const int row = gq + 8 * (r >> 1), col = 2 * q + (r & 1);
        double s = (double)d[r];
        for (int k = 0; k < 16; ++k) s += A(row, k) * Bm(k, col);
        out[r] = (float)s;
    }
    fc_emu::warp_sync(0xffffffffu);
    for (int r = 0; r < 4; ++r) d[r] = out[r];
}

// ldmatrix.sync.aligned.m8n8.x4{,.trans}.shared.b16: lane l supplies the address of row l % 8
// of matrix l / 8 (16 bytes, 16-byte aligned). Without .trans lane l receives, for each
// matrix j, elements (row l / 4, cols 2 (l % 4), +1); with .trans elements (rows 2 (l % 4), +1;
// col l / 4).
inline void fc_emu_ldmatrix_x4(unsigned (&r)[4], const void* row_ptr, bool trans) {
    if ((uintptr_t)row_ptr % 16 != 0) fc_emu_fail("ldmatrix row address not 16-byte aligned");
    const int tid = fc_emu::linear_tid(), lane = tid % 32, w = tid / 32;
    fc_emu::xchg[w][lane][0] = (unsigned long long)(uintptr_t)row_ptr;
    fc_emu::warp_sync(0xffffffffu);
    unsigned out[4];
    for (int j = 0; j < 4; ++j) {
        unsigned short lo, hi;
        if (!trans) {
            const unsigned char* row = (const unsigned char*)(uintptr_t)fc_emu::xchg[w][8 * j + lane / 4][0];
            memcpy(&lo, row + 4 * (lane % 4), 2);
            memcpy(&hi, row + 4 * (lane % 4) + 2, 2);
        } else {
            const unsigned char* r0 = (const unsigned char*)(uintptr_t)fc_emu::xchg[w][8 * j + 2 * (lane % 4)][0];
            const unsigned char* r1 = (const unsigned char*)(uintptr_t)fc_emu::xchg[w][8 * j + 2 * (lane % 4) + 1][0];
            memcpy(&lo, r0 + 2 * (lane / 4), 2);
            memcpy(&hi, r1 + 2 * (lane / 4), 2);
        }
        out[j] = (unsigned)lo | ((unsigned)hi << 16);
    }
    fc_emu::warp_sync(0xffffffffu);
    for (int j = 0; j < 4; ++j) r[j] = out[j];
}

// cp.async.cg.shared.global [smem], [gmem], 16, src_bytes: synchronous copy + zero fill.
inline void fc_emu_cp_async_16(void* smem, const void* gmem, int src_bytes) {
    if ((uintptr_t)smem % 16 != 0) fc_emu_fail("cp.async shared address not 16-byte aligned");
    if (src_bytes < 0 || src_bytes > 16) fc_emu_fail("cp.async src size out of range");
    if (src_bytes > 0 && (uintptr_t)gmem % 16 != 0) fc_emu_fail("cp.async global address not 16-byte aligned");
    if (src_bytes > 0) memcpy(smem, gmem, (size_t)src_bytes);
    memset((char*)smem + src_bytes, 0, (size_t)(16 - src_bytes));
}
