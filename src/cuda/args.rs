//! The argument structs of every kernel entry point.
//!
//! Each `extern "C" __global__` entry point in `kernels/*.cu` takes exactly one
//! parameter, by value: one of the structs of `kernels/args.cuh`. This module
//! mirrors that header field for field (same names, same order, same sizes and
//! offsets), plus [`HeadParams`] from `kernels/head.cuh`. A [`super::Launch`]
//! carries one of these structs as the kernel's argument.
//!
//! Layout rules, shared with the header (asserted on both sides with the same numbers):
//! - fields in this order: pointers ([`DevPtr`], 8 bytes), then 8-byte scalars (`i64`,
//!   `u64`, [`HeadParams`]), then 4-byte scalars (`i32`, `f32`, [`OptimParams`]), then
//!   explicit padding (`_pad0`, always 0) so that the size is a multiple of 8;
//! - no implicit padding anywhere (`bytemuck::Pod` rejects it at compile time);
//! - the size and the offsets of the first scalar and of the last field are
//!   const-asserted here and `static_assert`ed in the header;
//! - structs that are templates on the storage dtype in CUDA (`RowNormsArgs<T>`) are
//!   not generic here: every pointer is a [`DevPtr`], 8 bytes whatever it points to;
//! - an optional pointer is a field that may be [`DevPtr::NULL`] (said so on the field).
//!
//! C types map to `int` -> `i32`, `float` -> `f32`, `long long` -> `i64`,
//! `u64` -> `u64`, `u32` -> `u32`, `T*` -> [`DevPtr`]. Shapes use B rows (batch),
//! C classes, D feature dimension. `Default` gives null pointers and zeros.

use super::launch::{DevPtr, KernelArgs};
use crate::config::{CloudMode, Fallback, HeadConfig, MarginGrad};

// ---- head.cuh ---------------------------------------------------------------------------

/// Margin-head parameters; mirrors `struct HeadParams` in `kernels/head.cuh` (56 bytes).
///
/// Encoded from a [`HeadConfig`] in one place, [`HeadParams::new`] (the head, its
/// tests and the emulator's checks all call it), so a new option is one field and one
/// line here and one field in `head.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct HeadParams {
    /// Logit scale s.
    pub s: f32,
    /// Multiplicative angular margin m1.
    pub m1: f32,
    /// Additive angular margin m2.
    pub m2: f32,
    /// Additive cosine margin m3.
    pub m3: f32,
    /// Label smoothing.
    pub ls: f32,
    /// Label smoothing over C (`ls / C`).
    pub ls_over_c: f32,
    /// Feature cloud: 0 off, 1 symmetric, 2 one-sided.
    pub cloud: i32,
    /// Fallback where the margin passes pi: 0 linear, 1 clamp.
    pub fallback: i32,
    /// Margin gradient: 0 exact, 1 straight-through.
    pub margin_grad: i32,
    /// Explicit padding before the 8-byte fields; always 0.
    pub _pad: i32,
    /// Philox key of the cloud noise.
    pub seed: u64,
    /// Philox counter (training step) of the cloud noise.
    pub step: u64,
}

impl HeadParams {
    /// The kernel argument block of `cfg` for `num_classes` classes with Philox (seed, step).
    pub fn new(cfg: &HeadConfig, num_classes: usize, seed: u64, step: u64) -> Self {
        Self {
            s: cfg.s,
            m1: cfg.m1,
            m2: cfg.m2,
            m3: cfg.m3,
            ls: cfg.label_smoothing,
            ls_over_c: cfg.label_smoothing / num_classes as f32,
            cloud: match cfg.cloud {
                CloudMode::Off => 0,
                CloudMode::Symmetric => 1,
                CloudMode::OneSided => 2,
            },
            fallback: match cfg.fallback {
                Fallback::Linear => 0,
                Fallback::Clamp => 1,
                Fallback::None => 2,
            },
            margin_grad: match cfg.margin_grad {
                MarginGrad::Exact => 0,
                MarginGrad::StraightThrough => 1,
            },
            seed,
            step,
            ..Self::default()
        }
    }
}
const _: () = assert!(std::mem::size_of::<HeadParams>() == 56);
const _: () = assert!(std::mem::offset_of!(HeadParams, cloud) == 24);
const _: () = assert!(std::mem::offset_of!(HeadParams, seed) == 40);
const _: () = assert!(std::mem::offset_of!(HeadParams, step) == 48);

// ---- norms.cu ---------------------------------------------------------------------------

/// `row_norms_fwd_<T>`: norms and inverse norms of the rows of x.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowNormsArgs {
    /// `[rows, d]` T in.
    pub x: DevPtr,
    /// `[rows]` f32 out: `||x_r||`; may be null.
    pub norm: DevPtr,
    /// `[rows]` f32 out: `1 / max(||x_r||, 1e-12)`; may be null.
    pub inv: DevPtr,
    /// Rows of x.
    pub rows: i32,
    /// Row length.
    pub d: i32,
}
const _: () = assert!(std::mem::size_of::<RowNormsArgs>() == 32);
const _: () = assert!(std::mem::offset_of!(RowNormsArgs, rows) == 24);
const _: () = assert!(std::mem::offset_of!(RowNormsArgs, d) == 28);
// SAFETY: #[repr(C)], Pod, and the layout of `RowNormsArgs<T>` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for RowNormsArgs {}

// ---- stats.cu ---------------------------------------------------------------------------

/// `stats_update_<T>`: one CTA per segment updates its class's (or, with sub-centers, its
/// (class, sub-center) key's) center, and either the class's moments or the rows' angles.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StatsUpdateArgs {
    /// `[B, D]` T in; only the rows listed in seg are read.
    pub x: DevPtr,
    /// `[B]` f32 in: `1 / max(||x_i||, 1e-12)`.
    pub inv: DevPtr,
    /// `[2 num_seg + 1 + R]` i32 in: the packed segments (ids unique: classes in `[0, C)`, or
    /// keys `y*K + k` in `[0, C*K)`).
    pub seg: DevPtr,
    /// `[C*K, D]` f32 in/out: unit EMA centers, one per sub-center.
    pub centers: DevPtr,
    /// `[C]` f32 in/out: EMA mean angle (not touched when `ang` is set).
    pub mu: DevPtr,
    /// `[C]` f32 in/out: EMA mean squared angle (not touched when `ang` is set).
    pub v: DevPtr,
    /// `[C]` u64 in/out: samples seen (not touched when `ang` is set).
    pub n: DevPtr,
    /// `[C]` u32 in/out: 0/1, class seen (only read when `ang` is set).
    pub init: DevPtr,
    /// `[B]` f32 out, may be null: each listed row's angle, for `stats_angles_f32` (K > 1).
    pub ang: DevPtr,
    /// S, the number of segments (= grid).
    pub num_seg: i32,
    /// D.
    pub d: i32,
    /// EMA factor.
    pub beta: f32,
    /// K, sub-centers per class (>= 1).
    pub k: i32,
}
const _: () = assert!(std::mem::size_of::<StatsUpdateArgs>() == 88);
const _: () = assert!(std::mem::offset_of!(StatsUpdateArgs, num_seg) == 72);
const _: () = assert!(std::mem::offset_of!(StatsUpdateArgs, k) == 84);
// SAFETY: #[repr(C)], Pod, and the layout of `StatsUpdateArgs<T>` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for StatsUpdateArgs {}

/// `stats_angles_f32`: one thread per segment updates its class's moments from angles.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StatsAnglesArgs {
    /// `[B]` f32 in: theta_i (`is_cos = 0`) or the clamped target cosine (`is_cos = 1`).
    pub ang: DevPtr,
    /// `[2 num_seg + 1 + R]` i32 in: the packed segments.
    pub seg: DevPtr,
    /// `[C]` f32 in/out.
    pub mu: DevPtr,
    /// `[C]` f32 in/out.
    pub v: DevPtr,
    /// `[C]` u64 in/out.
    pub n: DevPtr,
    /// `[C]` u32 in/out.
    pub init: DevPtr,
    /// S, the number of segments.
    pub num_seg: i32,
    /// 0: ang holds angles, 1: cosines.
    pub is_cos: i32,
    /// EMA factor.
    pub beta: f32,
    /// Explicit padding; always 0.
    pub _pad0: i32,
}
const _: () = assert!(std::mem::size_of::<StatsAnglesArgs>() == 64);
const _: () = assert!(std::mem::offset_of!(StatsAnglesArgs, num_seg) == 48);
const _: () = assert!(std::mem::offset_of!(StatsAnglesArgs, _pad0) == 60);
// SAFETY: #[repr(C)], Pod, and the layout of `StatsAnglesArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for StatsAnglesArgs {}

/// `stats_reduce_f32`: per-block partial sums of the head variance.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StatsReduceArgs {
    /// `[C]` f32 in.
    pub mu: DevPtr,
    /// `[C]` f32 in.
    pub v: DevPtr,
    /// `[C]` u32 in.
    pub init: DevPtr,
    /// `[C]` u64 in: the dataset's N_k or the running n_k.
    pub counts: DevPtr,
    /// `[2P]` f32 out: (sum w_k var_k, sum w_k) of block b at 2b, 2b+1.
    pub partial: DevPtr,
    /// Head threshold T.
    pub thresh: u64,
    /// C.
    pub c: i32,
    /// Classes per block.
    pub chunk: i32,
    /// 0 threshold weights, 1 adaptive (w_k = N_k).
    pub adaptive: i32,
    /// Explicit padding; always 0.
    pub _pad0: i32,
}
const _: () = assert!(std::mem::size_of::<StatsReduceArgs>() == 64);
const _: () = assert!(std::mem::offset_of!(StatsReduceArgs, thresh) == 40);
const _: () = assert!(std::mem::offset_of!(StatsReduceArgs, _pad0) == 60);
// SAFETY: #[repr(C)], Pod, and the layout of `StatsReduceArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for StatsReduceArgs {}

/// `stats_cloud_f32`: the head variance and sigma_cloud per class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StatsCloudArgs {
    /// `[2P]` f32 in: from `stats_reduce_f32`.
    pub partial: DevPtr,
    /// `[C]` f32 in.
    pub mu: DevPtr,
    /// `[C]` f32 in.
    pub v: DevPtr,
    /// `[C]` u32 in.
    pub init: DevPtr,
    /// `[C]` u64 in.
    pub counts: DevPtr,
    /// `[C]` f32 out.
    pub sigma: DevPtr,
    /// `[2]` f32 out (block 0): var_h, sum w_k.
    pub head: DevPtr,
    /// Head threshold T.
    pub thresh: u64,
    /// P, the number of partials.
    pub num_partial: i32,
    /// C.
    pub c: i32,
    /// 0 threshold weights, 1 adaptive.
    pub adaptive: i32,
    /// 1 once updates >= warm-up steps.
    pub warm: i32,
}
const _: () = assert!(std::mem::size_of::<StatsCloudArgs>() == 80);
const _: () = assert!(std::mem::offset_of!(StatsCloudArgs, thresh) == 56);
const _: () = assert!(std::mem::offset_of!(StatsCloudArgs, warm) == 76);
// SAFETY: #[repr(C)], Pod, and the layout of `StatsCloudArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for StatsCloudArgs {}

// ---- train_ops.cu -----------------------------------------------------------------------

/// `bias_act_fwd_f32`: `y = act(y + bias)` in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BiasActFwdArgs {
    /// `[rows, cols]` f32 in/out; does not alias bias.
    pub y: DevPtr,
    /// `[cols]` f32 in.
    pub bias: DevPtr,
    /// `rows * cols`.
    pub n: i64,
    /// Columns.
    pub cols: i32,
    /// 0 identity, 1 relu.
    pub act: i32,
}
const _: () = assert!(std::mem::size_of::<BiasActFwdArgs>() == 32);
const _: () = assert!(std::mem::offset_of!(BiasActFwdArgs, n) == 16);
const _: () = assert!(std::mem::offset_of!(BiasActFwdArgs, act) == 28);
// SAFETY: #[repr(C)], Pod, and the layout of `BiasActFwdArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for BiasActFwdArgs {}

/// `bias_act_bwd_f32`: relu mask of dy in place and the bias gradient.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BiasActBwdArgs {
    /// `[rows, cols]` f32 in/out: masked in place (relu).
    pub dy: DevPtr,
    /// `[rows, cols]` f32 in: the forward's activation output.
    pub y: DevPtr,
    /// `[cols]` f32 out.
    pub dbias: DevPtr,
    /// Rows.
    pub rows: i32,
    /// Columns.
    pub cols: i32,
    /// 0 identity, 1 relu.
    pub act: i32,
    /// Explicit padding; always 0.
    pub _pad0: i32,
}
const _: () = assert!(std::mem::size_of::<BiasActBwdArgs>() == 40);
const _: () = assert!(std::mem::offset_of!(BiasActBwdArgs, rows) == 24);
const _: () = assert!(std::mem::offset_of!(BiasActBwdArgs, _pad0) == 36);
// SAFETY: #[repr(C)], Pod, and the layout of `BiasActBwdArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for BiasActBwdArgs {}

/// `cast_fwd_bf16`: f32 to bf16, round to nearest even.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CastArgs {
    /// `[n]` f32 in.
    pub x: DevPtr,
    /// `[n]` bf16 out; does not alias x.
    pub out: DevPtr,
    /// Elements.
    pub n: i64,
}
const _: () = assert!(std::mem::size_of::<CastArgs>() == 24);
const _: () = assert!(std::mem::offset_of!(CastArgs, n) == 16);
// SAFETY: #[repr(C)], Pod, and the layout of `CastArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for CastArgs {}

/// Optimizer hyper-parameters of one step; mirrors `struct OptimParams` in
/// `kernels/args.cuh` (40 bytes). SGD reads lr, wd, momentum; AdamW all but momentum.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct OptimParams {
    /// Learning rate.
    pub lr: f32,
    /// Weight decay (0 for biases).
    pub wd: f32,
    /// SGD heavy-ball momentum.
    pub momentum: f32,
    /// Adam beta1.
    pub b1: f32,
    /// `1 - beta1`, rounded on the host as the CPU rounds it.
    pub one_minus_b1: f32,
    /// Adam beta2.
    pub b2: f32,
    /// `1 - beta2`.
    pub one_minus_b2: f32,
    /// Bias correction `1 - beta1^t`.
    pub c1: f32,
    /// Bias correction `1 - beta2^t`.
    pub c2: f32,
    /// Adam epsilon.
    pub eps: f32,
}
const _: () = assert!(std::mem::size_of::<OptimParams>() == 40);
const _: () = assert!(std::mem::offset_of!(OptimParams, eps) == 36);

/// `sgd_step_f32`: one SGD-with-momentum step.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SgdStepArgs {
    /// `[n]` f32 in/out: parameter.
    pub p: DevPtr,
    /// `[n]` f32 in: gradient.
    pub g: DevPtr,
    /// `[n]` f32 in/out: momentum buffer.
    pub m: DevPtr,
    /// Elements.
    pub n: i64,
    /// Hyper-parameters.
    pub hp: OptimParams,
}
const _: () = assert!(std::mem::size_of::<SgdStepArgs>() == 72);
const _: () = assert!(std::mem::offset_of!(SgdStepArgs, n) == 24);
const _: () = assert!(std::mem::offset_of!(SgdStepArgs, hp) == 32);
// SAFETY: #[repr(C)], Pod, and the layout of `SgdStepArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for SgdStepArgs {}

/// `adamw_step_f32`: one AdamW step.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamwStepArgs {
    /// `[n]` f32 in/out: parameter.
    pub p: DevPtr,
    /// `[n]` f32 in: gradient.
    pub g: DevPtr,
    /// `[n]` f32 in/out: first moment.
    pub m: DevPtr,
    /// `[n]` f32 in/out: second moment.
    pub v: DevPtr,
    /// Elements.
    pub n: i64,
    /// Hyper-parameters.
    pub hp: OptimParams,
}
const _: () = assert!(std::mem::size_of::<AdamwStepArgs>() == 80);
const _: () = assert!(std::mem::offset_of!(AdamwStepArgs, n) == 32);
const _: () = assert!(std::mem::offset_of!(AdamwStepArgs, hp) == 40);
// SAFETY: #[repr(C)], Pod, and the layout of `AdamwStepArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for AdamwStepArgs {}

// ---- head_ref.cu ------------------------------------------------------------------------

/// `ref_normalize_fwd_<T>`: f32 normalized rows and inverse norms.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RefNormalizeArgs {
    /// `[rows, d]` T in.
    pub x: DevPtr,
    /// `[rows, d]` f32 out: `x_r / max(||x_r||, 1e-12)`.
    pub xh: DevPtr,
    /// `[rows]` f32 out.
    pub inv: DevPtr,
    /// `[rows]` i32 in, may be null: rows with a negative label (ignored rows of x, which may
    /// hold anything) get zeros in `xh` and `inv`.
    pub labels: DevPtr,
    /// Rows.
    pub rows: i32,
    /// Row length.
    pub d: i32,
}
const _: () = assert!(std::mem::size_of::<RefNormalizeArgs>() == 40);
const _: () = assert!(std::mem::offset_of!(RefNormalizeArgs, labels) == 24);
const _: () = assert!(std::mem::offset_of!(RefNormalizeArgs, d) == 36);
// SAFETY: #[repr(C)], Pod, and the layout of `RefNormalizeArgs<T>` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for RefNormalizeArgs {}

/// `ref_margin_fwd_<T>`: margin and cloud on the target column, one thread per row; with K
/// sub-centers per class the target's cosine is the max over its K rows (SPEC 5b).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RefMarginArgs {
    /// `[B, D]` T in.
    pub x: DevPtr,
    /// `[C*K, D]` T in (class j's sub-center k is row j*K + k).
    pub w: DevPtr,
    /// `[B]` i32 in (< 0: ignored row).
    pub labels: DevPtr,
    /// `[C]` f32 in: sigma_cloud (unread when the cloud is off).
    pub sigma: DevPtr,
    /// `[B]` f32 out: the target's dominant sub-center's cosine.
    pub c_iy: DevPtr,
    /// `[B]` f32 out.
    pub t: DevPtr,
    /// `[B]` f32 out.
    pub alpha: DevPtr,
    /// `[B]` f32 out.
    pub dt: DevPtr,
    /// `[B]` u32 out: the target's dominant sub-center k*_iy (0 for ignored rows).
    pub k_iy: DevPtr,
    /// Head parameters.
    pub p: HeadParams,
    /// B.
    pub b: i32,
    /// D.
    pub d: i32,
    /// K, sub-centers per class (>= 1).
    pub k: i32,
    /// Explicit padding; always 0.
    pub _pad0: i32,
}
const _: () = assert!(std::mem::size_of::<RefMarginArgs>() == 144);
const _: () = assert!(std::mem::offset_of!(RefMarginArgs, p) == 72);
const _: () = assert!(std::mem::offset_of!(RefMarginArgs, _pad0) == 140);
// SAFETY: #[repr(C)], Pod, and the layout of `RefMarginArgs<T>` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for RefMarginArgs {}

/// `ref_softmax_fwd_f32`: lse and loss per row from the cosine matrix (a class's cosine the
/// max over its K sub-center columns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RefSoftmaxArgs {
    /// `[B, C*K]` f32 in.
    pub cos: DevPtr,
    /// `[B]` i32 in.
    pub labels: DevPtr,
    /// `[B]` f32 in.
    pub t: DevPtr,
    /// `[B]` f32 out (0 for ignored rows).
    pub lse: DevPtr,
    /// `[B]` f32 out (0 for ignored rows).
    pub loss: DevPtr,
    /// Head parameters.
    pub p: HeadParams,
    /// C (classes).
    pub c: i32,
    /// K, sub-centers per class (>= 1).
    pub k: i32,
}
const _: () = assert!(std::mem::size_of::<RefSoftmaxArgs>() == 104);
const _: () = assert!(std::mem::offset_of!(RefSoftmaxArgs, p) == 40);
const _: () = assert!(std::mem::offset_of!(RefSoftmaxArgs, k) == 100);
// SAFETY: #[repr(C)], Pod, and the layout of `RefSoftmaxArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for RefSoftmaxArgs {}

/// `head_reduce_fwd_f32` (reference and fused paths): the reduced loss.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct HeadReduceArgs {
    /// `[B]` f32 in (0 for ignored rows).
    pub loss_rows: DevPtr,
    /// `[1]` f32 out: `scale * sum`.
    pub out: DevPtr,
    /// B.
    pub b: i32,
    /// Multiplies the sum.
    pub scale: f32,
}
const _: () = assert!(std::mem::size_of::<HeadReduceArgs>() == 24);
const _: () = assert!(std::mem::offset_of!(HeadReduceArgs, b) == 16);
const _: () = assert!(std::mem::offset_of!(HeadReduceArgs, scale) == 20);
// SAFETY: #[repr(C)], Pod, and the layout of `HeadReduceArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for HeadReduceArgs {}

/// `ref_grad_bwd_f32`: the logit gradient dc `[B, C*K]` (each class's on its arg-max
/// sub-center column only, SPEC 5b).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RefGradArgs {
    /// `[B, C*K]` f32 in.
    pub cos: DevPtr,
    /// `[B]` i32 in.
    pub labels: DevPtr,
    /// `[B]` f32 in.
    pub t: DevPtr,
    /// `[B]` f32 in.
    pub dt: DevPtr,
    /// `[B]` f32 in.
    pub lse: DevPtr,
    /// `[B]` u32 in: the forward's target sub-centers k*_iy; may be null when K = 1.
    pub k_iy: DevPtr,
    /// `[B]` f32 in: per-row upstream gradient; may be null (all 1).
    pub row_g: DevPtr,
    /// `[B, C*K]` f32 out.
    pub dc: DevPtr,
    /// Head parameters.
    pub p: HeadParams,
    /// Multiplies row_g (1 / N_valid for a mean).
    pub g_scale: f32,
    /// C (classes).
    pub c: i32,
    /// K, sub-centers per class (>= 1).
    pub k: i32,
    /// Explicit padding; always 0.
    pub _pad0: i32,
}
const _: () = assert!(std::mem::size_of::<RefGradArgs>() == 136);
const _: () = assert!(std::mem::offset_of!(RefGradArgs, p) == 64);
const _: () = assert!(std::mem::offset_of!(RefGradArgs, _pad0) == 132);
// SAFETY: #[repr(C)], Pod, and the layout of `RefGradArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for RefGradArgs {}

/// `head_normback_bwd_<T>` (out in T) and `head_normback_bwd_f32out_<T>` (out in f32): sum of
/// the parts, then the normalization backward.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NormbackArgs {
    /// `[nparts, rows, d]` f32 in/out: `parts[0]` receives the sum of the parts.
    pub parts: DevPtr,
    /// `[rows, d]` T in.
    pub x: DevPtr,
    /// `[rows]` f32 in.
    pub inv: DevPtr,
    /// `[rows, d]` out (T or f32); may be null only for an f32 output: result over `parts[0]`.
    pub out: DevPtr,
    /// `[rows]` i32 in, may be null: rows with a negative label (ignored rows of x, which may
    /// hold anything) get zeros without reading x.
    pub labels: DevPtr,
    /// Elements between parts (>= rows * d).
    pub part_stride: i64,
    /// Number of parts.
    pub nparts: i32,
    /// Rows.
    pub rows: i32,
    /// Row length.
    pub d: i32,
    /// Explicit padding; always 0.
    pub _pad0: i32,
}
const _: () = assert!(std::mem::size_of::<NormbackArgs>() == 64);
const _: () = assert!(std::mem::offset_of!(NormbackArgs, labels) == 32);
const _: () = assert!(std::mem::offset_of!(NormbackArgs, _pad0) == 60);
// SAFETY: #[repr(C)], Pod, and the layout of `NormbackArgs<T, TO>` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for NormbackArgs {}

// ---- head_fused.cu ----------------------------------------------------------------------

/// `fused_fwd_{r128c128,r64c128,r64c64}[_scalar]_<T>`: the fused forward tile. No pointer
/// aliases another. (Its target-logit fields repeat [`RefMarginArgs`]' on purpose: each
/// struct mirrors its own CUDA struct field for field.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FusedFwdArgs {
    /// `[B, D]` T in.
    pub x: DevPtr,
    /// `[C, D]` T in.
    pub w: DevPtr,
    /// `[B]` f32 in.
    pub inv_x: DevPtr,
    /// `[C]` f32 in.
    pub inv_w: DevPtr,
    /// `[B]` i32 in (< 0: ignored row).
    pub labels: DevPtr,
    /// `[C]` f32 in: sigma_cloud (unread when the cloud is off).
    pub sigma: DevPtr,
    /// `[3, n_ct, B]` f32 out: (max, sum exp, sum z) per class tile.
    pub part: DevPtr,
    /// `[B]` f32 out, valid rows only (`fused_combine_fwd_f32` zeroes the rest).
    pub c_iy: DevPtr,
    /// `[B]` f32 out, valid rows only.
    pub t: DevPtr,
    /// `[B]` f32 out, valid rows only.
    pub alpha: DevPtr,
    /// `[B]` f32 out, valid rows only.
    pub dt: DevPtr,
    /// Head parameters.
    pub p: HeadParams,
    /// B.
    pub b: i32,
    /// C.
    pub c: i32,
    /// D.
    pub d: i32,
    /// Explicit padding; always 0.
    pub _pad0: i32,
}
const _: () = assert!(std::mem::size_of::<FusedFwdArgs>() == 160);
const _: () = assert!(std::mem::offset_of!(FusedFwdArgs, p) == 88);
const _: () = assert!(std::mem::offset_of!(FusedFwdArgs, _pad0) == 156);
// SAFETY: #[repr(C)], Pod, and the layout of `FusedFwdArgs<T>` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for FusedFwdArgs {}

/// `fused_combine_fwd_f32`: merges a row's class-tile partials into lse and loss.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FusedCombineArgs {
    /// `[3, n_ct, B]` f32 in (from the fused forward tile).
    pub part: DevPtr,
    /// `[B]` i32 in.
    pub labels: DevPtr,
    /// `[B]` f32 in (valid rows) / out (0 for ignored rows).
    pub t: DevPtr,
    /// `[B]` f32 out.
    pub lse: DevPtr,
    /// `[B]` f32 out.
    pub loss: DevPtr,
    /// `[B]` f32 out for ignored rows (0).
    pub c_iy: DevPtr,
    /// `[B]` f32 out for ignored rows (0).
    pub alpha: DevPtr,
    /// `[B]` f32 out for ignored rows (0).
    pub dt: DevPtr,
    /// Head parameters.
    pub p: HeadParams,
    /// Class tiles of the forward (n_ct).
    pub n_ct: i32,
    /// B.
    pub b: i32,
}
const _: () = assert!(std::mem::size_of::<FusedCombineArgs>() == 128);
const _: () = assert!(std::mem::offset_of!(FusedCombineArgs, p) == 64);
const _: () = assert!(std::mem::offset_of!(FusedCombineArgs, b) == 124);
// SAFETY: #[repr(C)], Pod, and the layout of `FusedCombineArgs` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for FusedCombineArgs {}

/// `fused_bwd_{c128,c64}[_scalar]_<T>`: the fused backward tile. No pointer
/// aliases another.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FusedBwdArgs {
    /// `[B, D]` T in.
    pub x: DevPtr,
    /// `[C, D]` T in.
    pub w: DevPtr,
    /// `[B]` f32 in.
    pub inv_x: DevPtr,
    /// `[C]` f32 in.
    pub inv_w: DevPtr,
    /// `[B]` i32 in.
    pub labels: DevPtr,
    /// `[B]` f32 in (forward).
    pub t: DevPtr,
    /// `[B]` f32 in (forward).
    pub dt: DevPtr,
    /// `[B]` f32 in (forward).
    pub lse: DevPtr,
    /// `[B]` f32 in: per-row upstream gradient; may be null (all 1).
    pub row_g: DevPtr,
    /// `[G, B, D]` f32 out: dx partials.
    pub dxp: DevPtr,
    /// `[G, BN, D]` f32 scratch, used only when dwp and dw32 are null; else may be null.
    pub dwacc: DevPtr,
    /// `[C, D]` T out, written only when dwp and dw32 are null; else may be null.
    pub dw: DevPtr,
    /// `[C, D]` f32 out (dwh accumulates in place), used when dwp is null; may be null.
    pub dw32: DevPtr,
    /// `[S, C, D]` f32 out: S partial dwh slices (head_normback finishes dW); may be null (S == 1).
    pub dwp: DevPtr,
    /// Head parameters.
    pub p: HeadParams,
    /// Multiplies row_g (1 / N_valid for a mean).
    pub g_scale: f32,
    /// B.
    pub b: i32,
    /// C.
    pub c: i32,
    /// D.
    pub d: i32,
}
const _: () = assert!(std::mem::size_of::<FusedBwdArgs>() == 184);
const _: () = assert!(std::mem::offset_of!(FusedBwdArgs, p) == 112);
const _: () = assert!(std::mem::offset_of!(FusedBwdArgs, d) == 180);
// SAFETY: #[repr(C)], Pod, and the layout of `FusedBwdArgs<T>` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for FusedBwdArgs {}

/// `attn_fwd_d{128,512}[_scalar]_<T>` (`kernels/head_attn.cu`): the attention-form forward
/// tile over grid (row tiles, class splits). No pointer aliases another.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttnFwdArgs {
    /// `[B, D]` T in.
    pub x: DevPtr,
    /// `[C*K, D]` T in (class j's sub-center k: row j*K + k).
    pub w: DevPtr,
    /// `[B]` i32 in (< 0: ignored row).
    pub labels: DevPtr,
    /// `[C]` f32 in: sigma_cloud (unread when the cloud is off).
    pub sigma: DevPtr,
    /// `[B]` f32 out: inverse norms of x (written by the split-0 CTAs).
    pub inv_x: DevPtr,
    /// `[C*K]` f32 out: inverse norms of W's rows (written by the row-tile-0 CTAs).
    pub inv_w: DevPtr,
    /// `[3, n_cs, B]` f32 out: (max, sum exp, sum z) per class split.
    pub part: DevPtr,
    /// `[n_cs, B, D]` f32 out: the attention output of each class split.
    pub opart: DevPtr,
    /// `[n_cs, D]` f32 out: the sum of each split's normalized W rows (only when ls > 0).
    pub swh: DevPtr,
    /// `[B]` f32 out, valid rows only (`attn_combine_fwd_*` zeroes the rest).
    pub c_iy: DevPtr,
    /// `[B]` f32 out, valid rows only.
    pub t: DevPtr,
    /// `[B]` f32 out, valid rows only.
    pub alpha: DevPtr,
    /// `[B]` f32 out, valid rows only.
    pub dt: DevPtr,
    /// `[B]` u32 out, valid rows only: k*_iy (SPEC 5b); null when K = 1.
    pub k_iy: DevPtr,
    /// Head parameters.
    pub p: HeadParams,
    /// B.
    pub b: i32,
    /// C (classes; W has C*K rows).
    pub c: i32,
    /// D.
    pub d: i32,
    /// Class tiles per split.
    pub tiles_per_split: i32,
    /// K, sub-centers per class (>= 1).
    pub k: i32,
    /// Padding (the struct's size a multiple of 8).
    pub _pad0: i32,
}
const _: () = assert!(std::mem::size_of::<AttnFwdArgs>() == 192);
const _: () = assert!(std::mem::offset_of!(AttnFwdArgs, p) == 112);
const _: () = assert!(std::mem::offset_of!(AttnFwdArgs, _pad0) == 188);
// SAFETY: #[repr(C)], Pod, and the layout of `AttnFwdArgs<T>` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for AttnFwdArgs {}

/// `attn_combine_fwd_d512_<T>` / `attn_combine_fwd_d2048_bf16`: merges a row's class-split partials into lse, loss and the
/// row's dx for a unit row weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttnCombineArgs {
    /// `[B, D]` T in.
    pub x: DevPtr,
    /// `[C*K, D]` T in (class j's sub-center k: row j*K + k).
    pub w: DevPtr,
    /// `[B]` i32 in.
    pub labels: DevPtr,
    /// `[B]` f32 in.
    pub inv_x: DevPtr,
    /// `[C*K]` f32 in.
    pub inv_w: DevPtr,
    /// `[3, n_cs, B]` f32 in.
    pub part: DevPtr,
    /// `[n_cs, B, D]` f32 in.
    pub opart: DevPtr,
    /// `[n_cs, D]` f32 in (read only when ls > 0).
    pub swh: DevPtr,
    /// `[B]` f32 in (valid rows) / out (0 for ignored rows).
    pub t: DevPtr,
    /// `[B]` f32 out.
    pub lse: DevPtr,
    /// `[B]` f32 out.
    pub loss: DevPtr,
    /// `[B]` f32 out for ignored rows (0).
    pub c_iy: DevPtr,
    /// `[B]` f32 out for ignored rows (0).
    pub alpha: DevPtr,
    /// `[B]` f32 out for ignored rows (0).
    pub dt: DevPtr,
    /// `[B, D]` f32 out: dx of each row for a unit row weight.
    pub u: DevPtr,
    /// `[B]` u32 in (valid rows, from `attn_fwd_*`) / out (0 for ignored rows): k*_iy; null
    /// when K = 1.
    pub k_iy: DevPtr,
    /// Head parameters.
    pub p: HeadParams,
    /// Class splits of the forward.
    pub n_cs: i32,
    /// B.
    pub b: i32,
    /// C (classes).
    pub c: i32,
    /// D.
    pub d: i32,
    /// K, sub-centers per class (>= 1).
    pub k: i32,
    /// Padding (the struct's size a multiple of 8).
    pub _pad0: i32,
}
const _: () = assert!(std::mem::size_of::<AttnCombineArgs>() == 208);
const _: () = assert!(std::mem::offset_of!(AttnCombineArgs, p) == 128);
const _: () = assert!(std::mem::offset_of!(AttnCombineArgs, _pad0) == 204);
// SAFETY: #[repr(C)], Pod, and the layout of `AttnCombineArgs<T>` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for AttnCombineArgs {}

/// `attn_bwd_d{128,512,2048}[_scalar]_<T>`: dW of one class tile per CTA column (its row
/// splits summed by the last of them), and dx from the combine's unit-weight rows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttnBwdArgs {
    /// `[B, D]` T in.
    pub x: DevPtr,
    /// `[C*K, D]` T in (class j's sub-center k: row j*K + k).
    pub w: DevPtr,
    /// `[B]` i32 in.
    pub labels: DevPtr,
    /// `[B]` f32 in.
    pub inv_x: DevPtr,
    /// `[C*K]` f32 in.
    pub inv_w: DevPtr,
    /// `[B]` f32 in (forward).
    pub t: DevPtr,
    /// `[B]` f32 in (forward).
    pub dt: DevPtr,
    /// `[B]` f32 in (forward).
    pub lse: DevPtr,
    /// `[B]` f32 in: per-row upstream gradient; may be null (all 1).
    pub row_g: DevPtr,
    /// `[B, D]` f32 in: the combine's dx for a unit row weight.
    pub u: DevPtr,
    /// `[B]` f32 in: the forward's row losses (read only when `total` is set).
    pub loss_rows: DevPtr,
    /// `[B, D]` T out; null when `dx32` is set.
    pub dx: DevPtr,
    /// `[B, D]` f32 out; null when `dx` is set.
    pub dx32: DevPtr,
    /// `[C*K, D]` T out; null when `dw32` is set.
    pub dw: DevPtr,
    /// `[C*K, D]` f32 out; null when `dw` is set.
    pub dw32: DevPtr,
    /// `[1]` f32 out: `loss_scale` times the sum of `loss_rows` (the forward's reduced loss,
    /// computed by block 0 with `head_reduce`); may be null.
    pub total: DevPtr,
    /// `[B]` u32 in (forward): k*_iy; null when K = 1.
    pub k_iy: DevPtr,
    /// `[row splits, C*K, D]` f32 scratch: each row split's dW-hat partial; unread with one
    /// row split.
    pub dwpart: DevPtr,
    /// `[class tiles]` u32 in/out: 0 on entry and left 0 (each class tile counts its finished
    /// row splits); unread with one row split.
    pub counters: DevPtr,
    /// Head parameters.
    pub p: HeadParams,
    /// Multiplies row_g (1 / N_valid for a mean).
    pub g_scale: f32,
    /// The forward's reduction factor (1 / N_valid for a mean).
    pub loss_scale: f32,
    /// B.
    pub b: i32,
    /// C (classes; W and dW have C*K rows).
    pub c: i32,
    /// D.
    pub d: i32,
    /// K, sub-centers per class (>= 1).
    pub k: i32,
    /// x row tiles (of [`crate::cuda::head::plan::ATTN_BT`] rows) per row split (grid.y);
    /// the last split may have fewer.
    pub rtiles_per_split: i32,
    /// Padding (0).
    pub _pad0: i32,
}
const _: () = assert!(std::mem::size_of::<AttnBwdArgs>() == 240);
const _: () = assert!(std::mem::offset_of!(AttnBwdArgs, p) == 152);
const _: () = assert!(std::mem::offset_of!(AttnBwdArgs, _pad0) == 236);
// SAFETY: #[repr(C)], Pod, and the layout of `AttnBwdArgs<T>` in kernels/args.cuh
// (size and offsets asserted above and there).
unsafe impl KernelArgs for AttnBwdArgs {}
