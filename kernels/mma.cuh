// mma.cuh — tensor-core and async-copy primitives as inline PTX (sm_80+).
//
// NVRTC has no <mma.h> or <cuda_pipeline.h> here, so the handful of
// instructions the head kernels need are spelled out:
//   - mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32
//   - ldmatrix.sync.aligned.m8n8.x4{,.trans}.shared.b16
//   - cp.async.cg.shared.global (16 bytes, zero-fill beyond src_size)
//
// Fragment layout of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"),
// with g = lane / 4 and q = lane % 4:
//   A (16x16, row):  a0 = A[g][2q..2q+1],   a1 = A[g+8][2q..],
//                    a2 = A[g][2q+8..],     a3 = A[g+8][2q+8..]
//   B (16x8, col):   b0 = B[2q..2q+1][g],   b1 = B[2q+8..2q+9][g]
//   C (16x8, f32):   c0,c1 = C[g][2q], C[g][2q+1];  c2,c3 = C[g+8][2q], C[g+8][2q+1]
// Every kernel in the head keeps its f32 accumulators in this C layout, also
// the exact-f32 SIMT kernels, so one epilogue serves every dtype.
#pragma once
#include "common.cuh"

// ---- mma.sync -------------------------------------------------------------------

// d += A * B for one 16x8x16 tile; T selects bf16 or f16 operands.
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]);

// The two specializations differ only in the operand type, which the PTX spells in a string
// literal (and the emulator takes as a flag), hence a macro.
#ifdef FC_EMU
#define FC_MMA_16816(T, ptx_type, is_bf16)                                                                  \
    template <> __device__ __forceinline__ void mma_16816<T>(float(&d)[4], const u32(&a)[4], const u32(&b)[2]) { \
        fc_emu_mma_16816<is_bf16>(d, a, b);                                                                 \
    }
#else
#define FC_MMA_16816(T, ptx_type, is_bf16)                                                                  \
    template <> __device__ __forceinline__ void mma_16816<T>(float(&d)[4], const u32(&a)[4], const u32(&b)[2]) { \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ptx_type "." ptx_type ".f32 "                \
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                  \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                       \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));                  \
    }
#endif
FC_MMA_16816(bf16_t, "bf16", true)
FC_MMA_16816(f16_t, "f16", false)
#undef FC_MMA_16816

// ---- ldmatrix ---------------------------------------------------------------------

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// Four 8x8 b16 matrices; lane l supplies the row address of matrix l / 8, row l % 8.
// ldmatrix_x4: lane l receives row l/4, columns 2(l%4)..+1 of each matrix.
// ldmatrix_x4_trans: lane l receives column l/4, rows 2(l%4)..+1 of each stored matrix.
// (A macro: the `.trans` qualifier is part of the PTX string literal.)
#ifdef FC_EMU
#define FC_LDMATRIX_X4(name, trans_ptx, trans) \
    __device__ __forceinline__ void name(u32(&r)[4], const void* row_ptr) { fc_emu_ldmatrix_x4(r, row_ptr, trans); }
#else
#define FC_LDMATRIX_X4(name, trans_ptx, trans)                                                    \
    __device__ __forceinline__ void name(u32(&r)[4], const void* row_ptr) {                       \
        asm volatile("ldmatrix.sync.aligned.m8n8.x4" trans_ptx ".shared.b16 {%0, %1, %2, %3}, [%4];\n" \
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                             \
                     : "r"(smem_addr(row_ptr)));                                                 \
    }
#endif
FC_LDMATRIX_X4(ldmatrix_x4, "", false)
FC_LDMATRIX_X4(ldmatrix_x4_trans, ".trans", true)
#undef FC_LDMATRIX_X4

// ---- cp.async -----------------------------------------------------------------------

// Copies 16 bytes global -> shared; bytes past `src_bytes` (0..16) are zero-filled
// and not read, so a tail chunk or an out-of-range row costs no stray load.
// Both addresses must be 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#ifdef FC_EMU
    fc_emu_cp_async_16(smem, gmem, src_bytes);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(src_bytes));
#endif
}

#ifdef FC_EMU
__device__ __forceinline__ void cp_async_commit() { fc_emu_cp_async_commit(); }
#else
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
#endif

// Waits until at most N committed groups are still in flight (this thread's copies).
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifdef FC_EMU
    fc_emu_cp_async_wait_group(N);  // the copies of the older groups land only here
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---- packing ------------------------------------------------------------------------

// Two f32 -> one b32 of two 16-bit T values (lo in the low half), round to nearest even.
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi) {
    const T a = from_f32<T>(lo), b = from_f32<T>(hi);
    return (u32)a.bits | ((u32)b.bits << 16);
}
