// selftest.cu — kernels that make each check of the emulator fire (negative controls) or
// show what it models (positive controls). Compiled only into the emulated device
// (emu/device.cpp, FC_EMU), never by NVRTC; launched by name through fc_emu_launch like
// any kernel. Each takes one argument struct, laid out like kernels/args.cuh (pointers,
// then 4-byte fields, padded to a multiple of 8 bytes; sizes static_asserted).
//
// What a test should see is written next to each kernel: "error" means fc_emu_launch
// returns nonzero and its message contains the quoted words; POISON is 0xFFFFFFFF.
#pragma once
#include "common.cuh"
#include "mma.cuh"

#ifndef FC_EMU
#error "emu/selftest.cu is only for the emulator (FC_EMU)"
#endif

// ---- cp.async ---------------------------------------------------------------------------------
// Launch: grid (1,1,1), block (n,1,1) with n <= 64, no dynamic smem.
// src [8n] u32 in: thread t copies src[4t..4t+4) into its chunk of A and src[4n+4t..) into
// its chunk of B (16 bytes each, src_bytes of them read, the rest zero-filled).
// out [8n] u32 out: what thread t read from its A chunk (out[4t..]) and B chunk (out[4n+4t..]).
// "data(x)" below is src's chunk with words past src_bytes / 4 zeroed (src_bytes = 16: src).
struct EmuSelftestCpAsyncArgs {
    const u32* src;
    u32* out;
    u32 mode;
    u32 src_bytes;  // 0..16
};
static_assert(sizeof(EmuSelftestCpAsyncArgs) == 24, "EmuSelftestCpAsyncArgs: 24 bytes");

enum : u32 {
    EMU_CP_READ_BEFORE_WAIT = 0,  // cp A, commit, read A -> out A, wait<0>, read A -> out B.
                                  //   ok; out A = POISON, out B = data(A)
    EMU_CP_WAIT_GROUP = 1,        // cp A, commit, cp B, commit, wait<1>, read both, wait<0>.
                                  //   ok; out A = data(A), out B = POISON (B's group still in flight)
    EMU_CP_UNCOMMITTED = 2,       // cp A, wait<0> (no commit), read A -> out A, commit, wait<0>, read A -> out B.
                                  //   ok; out A = POISON (a wait retires committed groups only), out B = data(A)
    EMU_CP_EXIT_PENDING = 3,      // cp A, commit, return.           error "exited", "cp.async"
    EMU_CP_STORE_IN_FLIGHT = 4,   // cp A, commit, store to A, wait. error "written while the copy was in flight"
    EMU_CP_SOURCE_CHANGED = 5,    // cp A, commit, store to src, wait (writes src).  error "source", "changed"
    EMU_CP_MISALIGNED = 6,        // cp to A + 4 bytes.              error "not 16-byte aligned"
    EMU_CP_NOT_SHARED = 7,        // cp to a local array.            error "not in shared memory"
};

extern "C" __global__ void emu_selftest_cp_async(const EmuSelftestCpAsyncArgs a) {
    __shared__ __align__(16) u32 s_a[64 * 4], s_b[64 * 4];
    const int t = threadIdx.x, n = blockDim.x;
    if (n > 64) fc_emu_fail("emu_selftest_cp_async: blockDim.x must be <= 64");
    u32* ca = s_a + 4 * t;
    u32* cb = s_b + 4 * t;
    const u32* sa = a.src + 4 * t;
    const u32* sb = a.src + 4 * n + 4 * t;
    u32* oa = a.out + 4 * t;
    u32* ob = a.out + 4 * n + 4 * t;
    auto read = [](u32* o, const u32* c) {
        for (int k = 0; k < 4; ++k) o[k] = c[k];
    };
    // Each case spells out its own issue / commit / wait sequence: the sequence is what it tests.
    switch (a.mode) {
        case EMU_CP_READ_BEFORE_WAIT:
            cp_async_16(ca, sa, (int)a.src_bytes);
            cp_async_commit();
            read(oa, ca);
            cp_async_wait<0>();
            read(ob, ca);
            break;
        case EMU_CP_WAIT_GROUP:
            cp_async_16(ca, sa, (int)a.src_bytes);
            cp_async_commit();
            cp_async_16(cb, sb, (int)a.src_bytes);
            cp_async_commit();
            cp_async_wait<1>();
            read(oa, ca);
            read(ob, cb);
            cp_async_wait<0>();
            break;
        case EMU_CP_UNCOMMITTED:
            cp_async_16(ca, sa, (int)a.src_bytes);
            cp_async_wait<0>();
            read(oa, ca);
            cp_async_commit();
            cp_async_wait<0>();
            read(ob, ca);
            break;
        case EMU_CP_EXIT_PENDING:
            cp_async_16(ca, sa, (int)a.src_bytes);
            cp_async_commit();
            return;
        case EMU_CP_STORE_IN_FLIGHT:
            cp_async_16(ca, sa, (int)a.src_bytes);
            cp_async_commit();
            ca[0] = 0;
            cp_async_wait<0>();
            break;
        case EMU_CP_SOURCE_CHANGED:
            cp_async_16(ca, sa, 16);
            cp_async_commit();
            const_cast<u32*>(sa)[0] ^= 1u;
            cp_async_wait<0>();
            break;
        case EMU_CP_MISALIGNED:
            cp_async_16(ca + 1, sa, (int)a.src_bytes);
            cp_async_commit();
            cp_async_wait<0>();
            break;
        case EMU_CP_NOT_SHARED: {
            __align__(16) u32 local[4];
            cp_async_16(local, sa, (int)a.src_bytes);
            cp_async_commit();
            cp_async_wait<0>();
            oa[0] = local[0];
            break;
        }
        default: fc_emu_fail("emu_selftest_cp_async: unknown mode %u", a.mode);
    }
}

// ---- shared memory poison ------------------------------------------------------------------------
// Launch: grid (G,1,1) with G >= 2, block (32,1,1); dynamic smem >= 4 bytes when mode != 0.
// EmuSelftestOutModeArgs (below), mode = read_dyn.
// out [5G] u32 out: per block b, what thread 0 saw BEFORE anything in this block wrote it:
//   out[5b + 0] a static __shared__ u32 in the kernel,
//   out[5b + 1] the bits of element 3 of a static __shared__ float[4],
//   out[5b + 2] a static __shared__ u32 in a template helper, instantiation <1>,
//   out[5b + 3] the same helper, instantiation <2> (a distinct variable),
//   out[5b + 4] dynamic smem word 0 (FC_DYN_SMEM) when mode != 0, else 0.
// Every block then writes all of them (so a variable that persisted across blocks would
// show block b-1's value in block b). Expect all POISON (word 4: POISON if mode != 0) for
// every block, in every block order.
// The argument struct of the selftests that take an output buffer and a mode.
struct EmuSelftestOutModeArgs {
    u32* out;
    u32 mode;
    u32 _pad0;
};
static_assert(sizeof(EmuSelftestOutModeArgs) == 16, "EmuSelftestOutModeArgs: 16 bytes");

template <int K> __device__ __forceinline__ u32* emu_selftest_tmpl_word() {
    __shared__ u32 s_word;
    return &s_word;
}

extern "C" __global__ void emu_selftest_smem_poison(const EmuSelftestOutModeArgs a) {
    __shared__ u32 s_word;
    __shared__ float s_f[4];
    FC_DYN_SMEM(dyn_smem);
    u32* dyn = reinterpret_cast<u32*>(dyn_smem);
    u32* o = a.out + 5 * blockIdx.x;
    if (threadIdx.x == 0) {
        o[0] = s_word;
        o[1] = __float_as_uint(s_f[3]);
        o[2] = *emu_selftest_tmpl_word<1>();
        o[3] = *emu_selftest_tmpl_word<2>();
        o[4] = a.mode ? dyn[0] : 0u;
        s_word = 0x1000u + blockIdx.x;
        for (int k = 0; k < 4; ++k) s_f[k] = (float)blockIdx.x;
        *emu_selftest_tmpl_word<1>() = 0x2000u + blockIdx.x;
        *emu_selftest_tmpl_word<2>() = 0x3000u + blockIdx.x;
        if (a.mode) dyn[0] = 0x4000u + blockIdx.x;
    }
    __syncthreads();
}

// The address of one static __shared__ variable: device.cpp checks that the symbol-table
// scan found it (so a build in which the scan finds nothing fails loudly).
__device__ inline u32* emu_selftest_smem_anchor() {
    __shared__ u32 s_anchor;
    return &s_anchor;
}

// ---- __syncthreads call sites ----------------------------------------------------------------------
// Launch: grid (1,1,1), block (n,1,1) with n >= 2. out [n] u32.
//   mode 0: every thread at one __syncthreads, then out[t] = t + 1.     ok
//   mode 1: even threads at one __syncthreads, odd threads at another.
//           error "__syncthreads() reached from two call sites", naming selftest.cu twice
extern "C" __global__ void emu_selftest_sync_sites(const EmuSelftestOutModeArgs a) {
    const int t = threadIdx.x;
    if (a.mode == 0) {
        __syncthreads();
    } else if (t % 2 == 0) {
        __syncthreads();  // site 1
    } else {
        __syncthreads();  // site 2
    }
    a.out[t] = (u32)t + 1;
}

// ---- warp collectives and ldmatrix -------------------------------------------------------------------
// Launch: grid (1,1,1), block (64,1,1). out [128] u32.
//   0 ok: out[t] = sum of the lane ids of t's warp (496, a __shfl_xor_sync tree),
//         out[64 + t] = 3 (__shfl_sync broadcast of lane 3).
//   1 error "mask 0x0000ffff", "only full-warp masks":   __shfl_xor_sync with a half mask
//   2 error "exited lanes":                    lanes >= 16 return, the rest shuffle
//   3 error "different warp collectives":      even lanes __shfl_xor_sync, odd lanes __syncwarp
//   4 error "deadlock":                        lanes < 16 __syncthreads, lanes >= 16 __syncwarp
//   5 error "not 16-byte aligned":             ldmatrix on a row address 4 bytes off
//   6 error "not in shared memory":            ldmatrix on a local array
//   7 ok: ldmatrix_x4 (no .trans) of an 8 x 32 u16 smem tile whose element (row, col) holds
//         e = 32 row + col, matrix j = columns 8j..8j+7. With e0 = 32 (lane / 4) + 2 (lane % 4):
//         out[t] = e0 | (e0 + 1) << 16 (matrix 0), out[64 + t] = (e0 + 8) | (e0 + 9) << 16 (matrix 1).
extern "C" __global__ void emu_selftest_warp(const EmuSelftestOutModeArgs a) {
    __shared__ __align__(16) u16 s_tile[8 * 32];  // 8 rows of 32 u16 (64 bytes per row)
    const int t = threadIdx.x, lane = t % 32;
    for (int e = t; e < 8 * 32; e += blockDim.x) s_tile[e] = (u16)e;
    __syncthreads();
    switch (a.mode) {
        case 0: {
            u32 v = (u32)lane;
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            a.out[t] = v;
            a.out[64 + t] = __shfl_sync(0xffffffffu, (u32)lane, 3);
            break;
        }
        case 1: a.out[t] = __shfl_xor_sync(0x0000ffffu, (u32)lane, 1); break;
        case 2:
            if (lane >= 16) return;
            a.out[t] = __shfl_xor_sync(0xffffffffu, (u32)lane, 1);
            break;
        case 3:
            if (lane % 2 == 0) a.out[t] = __shfl_xor_sync(0xffffffffu, (u32)lane, 1);
            else __syncwarp();
            break;
        case 4:
            if (lane < 16) __syncthreads();
            else __syncwarp();
            break;
        case 5: {
            u32 r[4];
            ldmatrix_x4(r, reinterpret_cast<const char*>(s_tile) + 64 * (lane % 8) + 4);
            a.out[t] = r[0];
            break;
        }
        case 6: {
            __align__(16) u16 local[8] = {};
            u32 r[4];
            ldmatrix_x4(r, local);
            a.out[t] = r[0];
            break;
        }
        case 7: {
            // Matrix j = columns 8j..8j+7 of the 8 rows; lane l gives row l % 8 of matrix l / 8.
            u32 r[4];
            ldmatrix_x4(r, s_tile + 32 * (lane % 8) + 8 * (lane / 8));
            a.out[t] = r[0];       // (row lane / 4, cols 2 (lane % 4), +1) of matrix 0
            a.out[64 + t] = r[1];  // the same of matrix 1
            break;
        }
        default: fc_emu_fail("emu_selftest_warp: unknown mode %u", a.mode);
    }
}

// ---- block and thread order -----------------------------------------------------------------------------
// Launch: any grid, block (n,1,1). block_seq [G] u32 out, last_writer [G] u32 out,
// counter [1] u32 in/out (set it to 0 first); G = grid.x * grid.y * grid.z, block b =
// x + grid.x (y + grid.y z).
//   block_seq[b] = the position of block b in the run order (thread 0 does (*counter)++,
//     which is a race on a GPU and exact here: blocks run one at a time).
//     Block order 0: block_seq[b] = b; 1: G - 1 - b; 2: a permutation of 0..G-1, the same
//     for the same seed and grid.
//   last_writer[b] = the last thread of block b to store its index into a static __shared__
//     u32 before a __syncthreads (an intra-block race by design). Thread order 0: n - 1;
//     1: 0; 2: depends on the seed.
struct EmuSelftestOrderArgs {
    u32* block_seq;
    u32* last_writer;
    u32* counter;
};
static_assert(sizeof(EmuSelftestOrderArgs) == 24, "EmuSelftestOrderArgs: 24 bytes");

extern "C" __global__ void emu_selftest_order(const EmuSelftestOrderArgs a) {
    __shared__ u32 s_last;
    const u32 b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) a.block_seq[b] = (*a.counter)++;
    s_last = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) a.last_writer[b] = s_last;
}

// ---- dtype conversions ------------------------------------------------------------------------
// common.cuh's from_f32<f16_t / bf16_t> (round to nearest even; the FC_EMU branch of cvt.rn)
// and to_f32 on chosen values: no shipping kernel narrows arbitrary f32 inputs to f16.
// Launch: grid (ceil(n / 256)), block (256). x [n] f32 in; h [2n] u16 out (f16 bits, then
// bf16 bits); back [2n] f32 out (each widened again). Expect: bitwise what the `half` crate
// gives (NaN for NaN).
struct EmuSelftestCvtArgs {
    const float* x;
    u16* h;
    float* back;
    int n;
    int _pad0;
};
static_assert(sizeof(EmuSelftestCvtArgs) == 32, "EmuSelftestCvtArgs: 32 bytes");

extern "C" __global__ void emu_selftest_cvt(const EmuSelftestCvtArgs a) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= a.n) return;
    const f16_t hf = from_f32<f16_t>(a.x[i]);
    const bf16_t hb = from_f32<bf16_t>(a.x[i]);
    a.h[i] = hf.bits;
    a.h[a.n + i] = hb.bits;
    a.back[i] = to_f32(hf);
    a.back[a.n + i] = to_f32(hb);
}
