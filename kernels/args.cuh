// args.cuh — the argument structs of every kernel entry point.
//
// Each `extern "C" __global__` entry point in kernels/*.cu takes exactly one
// parameter: one of these structs, by value. src/cuda/args.rs mirrors every
// struct field for field (same names, same order, same sizes and offsets,
// asserted on both sides), so a launch is one typed value on the host and an
// argument-order bug is a compile error instead of silent garbage.
//
// Layout rules (the Rust side derives bytemuck::Pod, which rejects padding):
//   - fields in this order: pointers (8 bytes), then 8-byte scalars (long long,
//     u64, HeadParams), then 4-byte scalars (int, float, OptimParams), then
//     explicit padding (`int _padN`) so that sizeof is a multiple of 8;
//   - no implicit padding anywhere; each struct's size and the offsets of its
//     first scalar and its last field are static_asserted below (FC_ASSERT_LAYOUT) and
//     const-asserted in args.rs with the same numbers;
//   - a struct whose pointers depend on the storage dtype is a template on it
//     (RowNormsArgs<T>); every pointer is 8 bytes, so the layout does not depend
//     on T, and the Rust mirror (DevPtr fields) is not generic;
//   - optional pointers are fields that may be null (said so on the field), never
//     placeholder arguments.
// Shapes use B rows (batch), C classes, D feature dimension. Nothing here includes
// a host header: NVRTC compiles it without a CUDA toolkit.
#pragma once
#include "head.cuh"  // HeadParams (mirrored in src/cuda/args.rs), u64, bf16_t, f16_t

// offsetof as a constant expression without <cstddef>: NVRTC (an EDG front end with no
// host headers) has neither offsetof nor __builtin_offsetof but folds __INTADDR__;
// g++ / clang (the FC_EMU build) have __builtin_offsetof.
#ifdef __CUDACC_RTC__
#define FC_OFFSETOF(type, field) __INTADDR__(&((type*)0)->field)
#else
#define FC_OFFSETOF(type, field) __builtin_offsetof(type, field)
#endif

// The layout checks of one struct: its size and the offsets of its first scalar and its last
// field (the same numbers are const-asserted next to its mirror in src/cuda/args.rs).
#define FC_ASSERT_LAYOUT(S, size, first, first_offset, last, last_offset)                              \
    static_assert(sizeof(S) == size, #S " layout must match src/cuda/args.rs");                         \
    static_assert(FC_OFFSETOF(S, first) == first_offset, #S " layout must match src/cuda/args.rs"); \
    static_assert(FC_OFFSETOF(S, last) == last_offset, #S " layout must match src/cuda/args.rs")

// HeadParams stays in head.cuh; its layout is asserted here as well (args.rs mirrors it).
static_assert(FC_OFFSETOF(HeadParams, cloud) == 24, "HeadParams layout must match src/cuda/args.rs");
static_assert(FC_OFFSETOF(HeadParams, seed) == 40, "HeadParams layout must match src/cuda/args.rs");
static_assert(FC_OFFSETOF(HeadParams, step) == 48, "HeadParams layout must match src/cuda/args.rs");

// ---- norms.cu -----------------------------------------------------------------------------

// row_norms_fwd_<T>
template <typename T>
struct RowNormsArgs {
    const T* x;   // [rows, d] in
    float* norm;  // [rows] out: ||x_r||; may be null
    float* inv;   // [rows] out: 1 / max(||x_r||, 1e-12); may be null
    int rows;
    int d;
};
FC_ASSERT_LAYOUT(RowNormsArgs<float>, 32, rows, 24, d, 28);

// ---- stats.cu -----------------------------------------------------------------------------
// seg (stats_update_<T>, stats_angles_f32): [2 num_seg + 1 + R] i32 segments, see stats.cu's header;
// ids unique and in [0, C) (stats_update with K > 1: keys in [0, C*K)). No pointer of a stats
// struct aliases another.

// stats_update_<T>
template <typename T>
struct StatsUpdateArgs {
    const T* x;         // [B, D] in; only the rows listed in seg are read
    const float* inv;   // [B] in: 1 / max(||x_i||, 1e-12) (row_norms)
    const int* seg;     // [2 num_seg + 1 + R] in; segment ids are keys y*K + k (K = 1: classes)
    float* centers;     // [C*K, D] in/out: unit EMA centers, one per sub-center
    float* mu;          // [C] in/out: EMA mean angle (not touched when ang is set)
    float* v;           // [C] in/out: EMA mean squared angle (not touched when ang is set)
    u64* n;             // [C] in/out: samples seen (not touched when ang is set)
    u32* init;          // [C] in/out: 0/1, class seen (only read when ang is set)
    float* ang;         // [B] out, may be null: each listed row's angle a_i, for stats_angles (K > 1)
    int num_seg;        // S, segments (= grid)
    int d;              // D
    float beta;         // EMA factor
    int k;              // K, sub-centers per class (>= 1)
};
FC_ASSERT_LAYOUT(StatsUpdateArgs<float>, 88, num_seg, 72, k, 84);

// stats_angles_f32
struct StatsAnglesArgs {
    const float* ang;  // [B] in: theta_i (is_cos = 0) or the clamped target cosine (is_cos = 1)
    const int* seg;    // [2 num_seg + 1 + R] in
    float* mu;         // [C] in/out
    float* v;          // [C] in/out
    u64* n;            // [C] in/out
    u32* init;         // [C] in/out
    int num_seg;       // S
    int is_cos;        // 0: ang holds angles, 1: cosines
    float beta;        // EMA factor
    int _pad0;
};
FC_ASSERT_LAYOUT(StatsAnglesArgs, 64, num_seg, 48, _pad0, 60);

// stats_reduce_f32
struct StatsReduceArgs {
    const float* mu;     // [C] in
    const float* v;      // [C] in
    const u32* init;     // [C] in
    const u64* counts;   // [C] in: the dataset's N_k or the running n_k
    float* partial;      // [2P] out: (sum w_k var_k, sum w_k) of block b at 2b, 2b+1
    u64 thresh;          // head threshold T
    int c;               // C
    int chunk;           // classes per block
    int adaptive;        // 0 threshold weights, 1 adaptive (w_k = N_k)
    int _pad0;
};
FC_ASSERT_LAYOUT(StatsReduceArgs, 64, thresh, 40, _pad0, 60);

// stats_cloud_f32
struct StatsCloudArgs {
    const float* partial;  // [2P] in: from stats_reduce_f32
    const float* mu;       // [C] in
    const float* v;        // [C] in
    const u32* init;       // [C] in
    const u64* counts;     // [C] in
    float* sigma;          // [C] out
    float* head;           // [2] out (block 0): var_h, sum w_k
    u64 thresh;            // head threshold T
    int num_partial;       // P
    int c;                 // C
    int adaptive;          // 0 threshold weights, 1 adaptive
    int warm;              // updates >= warm-up steps
};
FC_ASSERT_LAYOUT(StatsCloudArgs, 80, thresh, 56, warm, 76);

// ---- train_ops.cu -------------------------------------------------------------------------

// bias_act_fwd_f32
struct BiasActFwdArgs {
    float* y;           // [rows, cols] in/out; does not alias bias
    const float* bias;  // [cols] in
    long long n;        // rows * cols
    int cols;
    int act;            // 0 identity, 1 relu
};
FC_ASSERT_LAYOUT(BiasActFwdArgs, 32, n, 16, act, 28);

// bias_act_bwd_f32
struct BiasActBwdArgs {
    float* dy;       // [rows, cols] in/out: masked in place (relu)
    const float* y;  // [rows, cols] in: the forward's activation output
    float* dbias;    // [cols] out
    int rows;
    int cols;
    int act;         // 0 identity, 1 relu
    int _pad0;
};
FC_ASSERT_LAYOUT(BiasActBwdArgs, 40, rows, 24, _pad0, 36);

// cast_fwd_bf16
struct CastArgs {
    const float* x;  // [n] in
    bf16_t* out;     // [n] out (round to nearest even); does not alias x
    long long n;
};
static_assert(sizeof(CastArgs) == 24, "CastArgs layout must match src/cuda/args.rs");
static_assert(FC_OFFSETOF(CastArgs, n) == 16, "CastArgs layout must match src/cuda/args.rs");

// Optimizer hyper-parameters of one step (all f32, 40 bytes, 4-byte aligned).
// SGD reads lr, wd, momentum; AdamW reads everything but momentum.
struct OptimParams {
    float lr;
    float wd;            // weight decay (0 for biases)
    float momentum;      // SGD heavy-ball momentum
    float b1;            // Adam beta1
    float one_minus_b1;  // 1 - beta1, rounded on the host as the CPU rounds it
    float b2;            // Adam beta2
    float one_minus_b2;  // 1 - beta2
    float c1;            // bias correction 1 - beta1^t
    float c2;            // bias correction 1 - beta2^t
    float eps;           // Adam epsilon
};
static_assert(sizeof(OptimParams) == 40, "OptimParams layout must match src/cuda/args.rs");
static_assert(FC_OFFSETOF(OptimParams, eps) == 36, "OptimParams layout must match src/cuda/args.rs");

// sgd_step_f32
struct SgdStepArgs {
    float* p;        // [n] in/out: parameter
    const float* g;  // [n] in: gradient
    float* m;        // [n] in/out: momentum buffer
    long long n;
    OptimParams hp;
};
FC_ASSERT_LAYOUT(SgdStepArgs, 72, n, 24, hp, 32);

// adamw_step_f32
struct AdamwStepArgs {
    float* p;        // [n] in/out: parameter
    const float* g;  // [n] in: gradient
    float* m;        // [n] in/out: first moment
    float* v;        // [n] in/out: second moment
    long long n;
    OptimParams hp;
};
FC_ASSERT_LAYOUT(AdamwStepArgs, 80, n, 32, hp, 40);

// ---- head_ref.cu --------------------------------------------------------------------------

// ref_normalize_fwd_<T>
template <typename T>
struct RefNormalizeArgs {
    const T* x;         // [rows, d] in
    float* xh;          // [rows, d] out: x_r / max(||x_r||, 1e-12)
    float* inv;         // [rows] out
    const int* labels;  // [rows] in, may be null: rows with a negative label (ignored rows of x,
                        // which may hold anything, SPEC 2) get zeros in xh and inv
    int rows;
    int d;
};
FC_ASSERT_LAYOUT(RefNormalizeArgs<float>, 40, labels, 24, d, 36);

// ref_margin_fwd_<T>
template <typename T>
struct RefMarginArgs {
    const T* x;           // [B, D] in
    const T* w;           // [C*K, D] in (class j's sub-center k is row j*K + k)
    const int* labels;    // [B] in (< 0: ignored row)
    const float* sigma;   // [C] in: sigma_cloud (unread when the cloud is off)
    float* c_iy;          // [B] out: the target's dominant sub-center's cosine
    float* t;             // [B] out
    float* alpha;         // [B] out
    float* dt;            // [B] out
    u32* k_iy;            // [B] out: the target's dominant sub-center k*_iy (0 for ignored rows)
    HeadParams p;
    int b;                // B
    int d;                // D
    int k;                // K, sub-centers per class (>= 1)
    int _pad0;
};
FC_ASSERT_LAYOUT(RefMarginArgs<float>, 144, p, 72, _pad0, 140);

// ref_softmax_fwd_f32
struct RefSoftmaxArgs {
    const float* cos;     // [B, C*K] in
    const int* labels;    // [B] in
    const float* t;       // [B] in
    float* lse;           // [B] out (0 for ignored rows)
    float* loss;          // [B] out (0 for ignored rows)
    HeadParams p;
    int c;                // C (classes)
    int k;                // K, sub-centers per class (>= 1)
};
FC_ASSERT_LAYOUT(RefSoftmaxArgs, 104, p, 40, k, 100);

// head_reduce_fwd_f32 (shared with the fused path)
struct HeadReduceArgs {
    const float* loss_rows;  // [B] in (0 for ignored rows)
    float* out;              // [1] out: scale * sum
    int b;                   // B
    float scale;
};
FC_ASSERT_LAYOUT(HeadReduceArgs, 24, b, 16, scale, 20);

// ref_grad_bwd_f32
struct RefGradArgs {
    const float* cos;     // [B, C*K] in
    const int* labels;    // [B] in
    const float* t;       // [B] in
    const float* dt;      // [B] in
    const float* lse;     // [B] in
    const u32* k_iy;      // [B] in: the forward's target sub-centers; may be null when K = 1
    const float* row_g;   // [B] in: per-row upstream gradient; may be null (all 1)
    float* dc;            // [B, C*K] out
    HeadParams p;
    float g_scale;        // multiplies row_g (1 / N_valid for a mean)
    int c;                // C (classes)
    int k;                // K, sub-centers per class (>= 1)
    int _pad0;
};
FC_ASSERT_LAYOUT(RefGradArgs, 136, p, 64, _pad0, 132);

// head_normback_bwd_<T> (TO = T), head_normback_bwd_f32out_<T> (TO = float)
template <typename T, typename TO = T>
struct NormbackArgs {
    float* parts;           // [nparts, rows, d] f32 in/out: parts[0] gets the sum of the parts
    const T* x;             // [rows, d] in
    const float* inv;       // [rows] in
    TO* out;                // [rows, d] out; may be null only for TO = float: result over parts[0]
    const int* labels;      // [rows] in, may be null: rows with a negative label (ignored rows of x,
                            // which may hold anything) get zeros without reading x
    long long part_stride;  // elements between parts (>= rows * d)
    int nparts;
    int rows;
    int d;
    int _pad0;
};
FC_ASSERT_LAYOUT(NormbackArgs<float>, 64, labels, 32, _pad0, 60);

// ---- head_fused.cu ------------------------------------------------------------------------
// Nothing in a fused struct aliases another of its pointers.

// fused_fwd_<tile>[_scalar]_<T>
template <typename T>
struct FusedFwdArgs {
    const T* x;            // [B, D] in
    const T* w;            // [C, D] in
    const float* inv_x;    // [B] in
    const float* inv_w;    // [C] in
    const int* labels;     // [B] in (< 0: ignored row)
    const float* sigma;    // [C] in: sigma_cloud (unread when the cloud is off)
    float* part;           // [3][n_ct][B] out: (max, sum exp, sum z) per class tile
    float* c_iy;           // [B] out, valid rows only (fused_combine_fwd_f32 zeroes the rest)
    float* t;              // [B] out, valid rows only
    float* alpha;          // [B] out, valid rows only
    float* dt;             // [B] out, valid rows only
    HeadParams p;
    int b;                 // B
    int c;                 // C
    int d;                 // D
    int _pad0;
};
FC_ASSERT_LAYOUT(FusedFwdArgs<float>, 160, p, 88, _pad0, 156);

// fused_combine_fwd_f32
struct FusedCombineArgs {
    const float* part;   // [3][n_ct][B] in (from fused_fwd)
    const int* labels;   // [B] in
    float* t;            // [B] in (valid rows) / out (0 for ignored rows)
    float* lse;          // [B] out
    float* loss;         // [B] out
    float* c_iy;         // [B] out for ignored rows (0)
    float* alpha;        // [B] out for ignored rows (0)
    float* dt;           // [B] out for ignored rows (0)
    HeadParams p;
    int n_ct;            // class tiles of the forward
    int b;               // B
};
FC_ASSERT_LAYOUT(FusedCombineArgs, 128, p, 64, b, 124);

// fused_bwd_<tile>[_scalar]_<T>
template <typename T>
struct FusedBwdArgs {
    const T* x;            // [B, D] in
    const T* w;            // [C, D] in
    const float* inv_x;    // [B] in
    const float* inv_w;    // [C] in
    const int* labels;     // [B] in
    const float* t;        // [B] in (forward)
    const float* dt;       // [B] in (forward)
    const float* lse;      // [B] in (forward)
    const float* row_g;    // [B] in: per-row upstream gradient; may be null (all 1)
    float* dxp;            // [G][B][D] out: dx partials
    float* dwacc;          // [G][BN][D] f32 scratch, used only when dwp and dw32 are null; else may be null
    T* dw;                 // [C, D] out in T, written only when dwp and dw32 are null; else may be null
    float* dw32;           // [C, D] out in f32 (dwh accumulates in place), used when dwp is null; may be null
    float* dwp;            // [S][C][D] out: S partial dwh slices (head_normback finishes dW); may be null (S == 1)
    HeadParams p;
    float g_scale;         // multiplies row_g (1 / N_valid for a mean)
    int b;                 // B
    int c;                 // C
    int d;                 // D
};
FC_ASSERT_LAYOUT(FusedBwdArgs<float>, 184, p, 112, d, 180);

// attn_fwd_d<DP>[_scalar]_<T> (kernels/head_attn.cu): grid (row tiles, class splits)
template <typename T>
struct AttnFwdArgs {
    const T* x;            // [B, D] in
    const T* w;            // [C*K, D] in (class j sub-center k: row j*K + k)
    const int* labels;     // [B] in (< 0: ignored row)
    const float* sigma;    // [C] in: sigma_cloud (unread when the cloud is off)
    float* inv_x;          // [B] out: 1 / max(|x_i|, eps), written by the split-0 CTAs
    float* inv_w;          // [C*K] out: 1 / max(|w_j|, eps) per W row, written by the row-tile-0 CTAs
    float* part;           // [3][n_cs][B] out: (max, sum exp, sum z) per class split
    float* opart;          // [n_cs][B][D] out: sum_{j != y} exp(z_ij - max) wh_j per class split
    float* swh;            // [n_cs][D] out: sum of the split's wh_j (written only when ls > 0)
    float* c_iy;           // [B] out, valid rows only (attn_combine_fwd zeroes the rest)
    float* t;              // [B] out, valid rows only
    float* alpha;          // [B] out, valid rows only
    float* dt;             // [B] out, valid rows only
    u32* k_iy;             // [B] out, valid rows only: k*_iy (SPEC 5b); null when K = 1
    HeadParams p;
    int b;                 // B
    int c;                 // C (classes; W has C*K rows)
    int d;                 // D
    int tiles_per_split;   // class tiles per split; split s has tiles [s * tps, (s + 1) * tps)
    int k;                 // K, sub-centers per class (>= 1)
    int _pad0;
};
FC_ASSERT_LAYOUT(AttnFwdArgs<float>, 192, p, 112, _pad0, 188);

// attn_combine_fwd_<T>: one warp per row
template <typename T>
struct AttnCombineArgs {
    const T* x;            // [B, D] in
    const T* w;            // [C*K, D] in (the target rows)
    const int* labels;     // [B] in
    const float* inv_x;    // [B] in (attn_fwd)
    const float* inv_w;    // [C*K] in (attn_fwd)
    const float* part;     // [3][n_cs][B] in
    const float* opart;    // [n_cs][B][D] in
    const float* swh;      // [n_cs][D] in (read only when ls > 0)
    float* t;              // [B] in (valid rows) / out (0 for ignored rows)
    float* lse;            // [B] out
    float* loss;           // [B] out
    float* c_iy;           // [B] out for ignored rows (0)
    float* alpha;          // [B] out for ignored rows (0)
    float* dt;             // [B] out for ignored rows (0)
    float* u;              // [B, D] out: dx of row i for a unit row weight (0 for ignored rows)
    u32* k_iy;             // [B] in (valid rows, attn_fwd) / out (0 for ignored rows); null when K = 1
    HeadParams p;
    int n_cs;              // class splits of the forward
    int b;                 // B
    int c;                 // C (classes)
    int d;                 // D
    int k;                 // K, sub-centers per class (>= 1)
    int _pad0;
};
FC_ASSERT_LAYOUT(AttnCombineArgs<float>, 208, p, 128, _pad0, 204);

// attn_bwd_d<DP>[_scalar]_<T>: one CTA per (class tile, row split)
template <typename T>
struct AttnBwdArgs {
    const T* x;            // [B, D] in
    const T* w;            // [C*K, D] in (class j sub-center k: row j*K + k)
    const int* labels;     // [B] in
    const float* inv_x;    // [B] in (attn_fwd)
    const float* inv_w;    // [C*K] in (attn_fwd)
    const float* t;        // [B] in (forward)
    const float* dt;       // [B] in (forward)
    const float* lse;      // [B] in (forward)
    const float* row_g;    // [B] in: per-row upstream gradient; may be null (all 1)
    const float* u;        // [B, D] in: attn_combine_fwd's dx for a unit row weight
    const float* loss_rows; // [B] in: the forward's row losses (read only when total is set)
    T* dx;                 // [B, D] out in T; null when dx32 is set
    float* dx32;           // [B, D] out in f32; null when dx is set
    T* dw;                 // [C*K, D] out in T; null when dw32 is set
    float* dw32;           // [C*K, D] out in f32; null when dw is set
    float* total;          // [1] out: loss_scale * sum of loss_rows (block 0; head_reduce); may be null
    const u32* k_iy;       // [B] in (forward): k*_iy; null when K = 1
    float* dwpart;         // [gridDim.y, C*K, D] scratch: each row split's dW-hat partial; unread when gridDim.y = 1
    u32* counters;         // [gridDim.x] in/out: 0 on entry, left 0 (each class tile's count of finished splits); unread when gridDim.y = 1
    HeadParams p;
    float g_scale;         // multiplies row_g (1 / N_valid for a mean)
    float loss_scale;      // the forward's reduction factor (1 / N_valid for a mean)
    int b;                 // B
    int c;                 // C (classes; W and dW have C*K rows)
    int d;                 // D
    int k;                 // K, sub-centers per class (>= 1)
    int rtiles_per_split;  // x row tiles (of BT rows) per row split (blockIdx.y); the last split may have fewer
    int _pad0;
};
FC_ASSERT_LAYOUT(AttnBwdArgs<float>, 240, p, 152, _pad0, 236);
