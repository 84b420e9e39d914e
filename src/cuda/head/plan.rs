//! The head's planning: what the dispatcher picks (tiles, grids, row splits) at a
//! shape on a GPU with a given SM count, the scratch that needs, and one pure
//! function per kernel that turns shape + options + those choices into a
//! [`Launch`] (kernel constant, grid, block, shared memory, argument struct).
//! Nothing here touches a device: `tests/head_plans.rs` checks the launches on the
//! host, and the reference and fused paths (`head/reference.rs`, `head/fused.rs`) execute them.

use super::{GradDtype, HeadPath, Workspace};
use crate::cuda::args::{
    AttnBwdArgs, AttnCombineArgs, AttnFwdArgs, FusedBwdArgs, FusedCombineArgs, FusedFwdArgs, HeadReduceArgs,
    NormbackArgs, RefGradArgs, RefMarginArgs, RefNormalizeArgs, RefSoftmaxArgs,
};
use crate::cuda::kernels::{head_attn as ka, head_fused as kf, head_ref as kr};
use crate::cuda::Kernel;
use crate::cuda::Launch;
use crate::error::{Error, Result};
use crate::shape::HeadShape;
use crate::DType;

/// The fused forward's tiles (rows, classes), largest first: `fused_fwd_r128c128_*`,
/// `fused_fwd_r64c128_*` and `fused_fwd_r64c64_*` in `kernels/head_fused.cu`.
pub const FORWARD_TILES: [(usize, usize); 3] = [(128, 128), (64, 128), (64, 64)];
/// The smallest forward tile's rows (the grid-size check assumes it).
pub(super) const FWD_BM_SMALL: usize = 64;
/// Fused backward tile: rows, and classes (`fused_bwd_c128_*`; `fused_bwd_c64_*` take 64).
pub(super) const BWD_BM: usize = 64;
pub(super) const BWD_BN: usize = 128;
pub(super) const BWD_BN_SMALL: usize = 64;
/// The fused backward's dx partials may use this much memory before G shrinks.
const DXP_BUDGET: usize = 512 << 20;
/// The fused backward's dW partials (row splits S > 1) may use this much memory.
const DWP_BUDGET: usize = 256 << 20;

/// Dynamic shared memory of the fused backward with class tiles of `cols`
/// (`bwd_smem_bytes<T, BN>` in the .cu file, which asserts these values).
fn bwd_smem_bytes(dtype: DType, cols: usize) -> u32 {
    match (dtype, cols == BWD_BN_SMALL) {
        (DType::F32, false) => 98_304,
        (DType::BF16 | DType::F16, false) => 65_536,
        (DType::F32, true) => 88_064,
        (DType::BF16 | DType::F16, true) => 55_296,
    }
}

/// G, the fused backward's CTA count: one per class tile up to one per SM (its
/// ~180 registers x 256 threads allow one CTA per SM), and fewer when G * B * D f32
/// dx partials would pass 512 MiB.
pub(super) fn bwd_groups(shape: HeadShape, sm_count: usize, cols: usize) -> usize {
    let n_ct = shape.c.div_ceil(cols);
    let per_group = shape.b * shape.d * 4;
    let by_mem = (DXP_BUDGET / per_group.max(1)).max(1);
    n_ct.min(sm_count.max(1)).min(by_mem).max(1)
}

/// S, the fused backward's row splits: 1 while the G class-tile CTAs fill at least half
/// the GPU; else enough splits of the row tiles to fill it (at most one per row tile),
/// as long as the S x C x D f32 dW partials stay within 256 MiB.
pub(super) fn bwd_row_splits(shape: HeadShape, sm_count: usize, g: usize) -> usize {
    let (sm, g) = (sm_count.max(1), g.max(1));
    if 2 * g >= sm {
        return 1;
    }
    let n_rt = shape.b.div_ceil(BWD_BM);
    let by_mem = DWP_BUDGET / (shape.c * shape.d * 4).max(1);
    (sm / g).min(n_rt).min(by_mem).max(1)
}

/// The fused forward's tile at `shape` on a GPU with `sm_count` SMs (what the
/// dispatcher picks without tuning overrides; usable without a device): the largest
/// of [`FORWARD_TILES`] whose grid keeps at least half the SMs busy, never 128 rows
/// for a batch of at most 64; the smallest when none does.
pub fn forward_tile_for(shape: HeadShape, sm_count: usize) -> (usize, usize) {
    let half = sm_count.max(1).div_ceil(2);
    FORWARD_TILES
        .into_iter()
        .filter(|&(rows, _)| rows == FWD_BM_SMALL || shape.b > FWD_BM_SMALL)
        .find(|&(rows, cols)| shape.c.div_ceil(cols) * shape.b.div_ceil(rows) >= half)
        .unwrap_or(FORWARD_TILES[2])
}

/// The fused backward's default class tile at `shape` on a GPU with `sm_count` SMs:
/// 128, or 64 when 128-class tiles (with row splits) would keep fewer than a quarter
/// of the SMs busy (usable without a device).
pub fn backward_cols_for(shape: HeadShape, sm_count: usize) -> usize {
    let g = bwd_groups(shape, sm_count, BWD_BN);
    let busy = g * bwd_row_splits(shape, sm_count, g);
    if 4 * busy < sm_count.max(1) {
        BWD_BN_SMALL
    } else {
        BWD_BN
    }
}

/// The fused backward's default grid (G, S) at `shape` on a GPU with `sm_count` SMs,
/// with the class tile of [`backward_cols_for`] (what the dispatcher picks without
/// tuning overrides; usable without a device).
pub fn backward_grid_for(shape: HeadShape, sm_count: usize) -> (usize, usize) {
    let g = bwd_groups(shape, sm_count, backward_cols_for(shape, sm_count));
    (g, bwd_row_splits(shape, sm_count, g))
}

/// Scratch bytes of `path` at `shape` on a GPU with `sm_count` SMs and sm_90's shared memory (what
/// [`super::HeadOn::workspace`] reports; usable without a device).
pub fn workspace_for(
    path: HeadPath,
    shape: HeadShape,
    dtype: DType,
    grad: GradDtype,
    sm_count: usize,
) -> Workspace {
    let (g, s) = backward_grid_for(shape, sm_count);
    let kernels = if attn_supported(dtype, shape.d, SM90_MAX_SMEM) {
        FusedKernels::Attention
    } else {
        FusedKernels::Tiles
    };
    let plan = Plan {
        kernels,
        class_splits: attn_splits(dtype, shape).0,
        attn_row_splits: attn_bwd_row_splits(dtype, shape, 1).0,
        fwd_cols: forward_tile_for(shape, sm_count).1,
        bwd_cols: backward_cols_for(shape, sm_count),
        g,
        s,
        k: 1,
    };
    workspace_with_groups(path, shape, dtype, grad, plan)
}

/// The fused path's launch choices that size its scratch.
pub(super) struct Plan {
    /// Which kernel set runs.
    pub(super) kernels: FusedKernels,
    /// The attention-form forward's class splits.
    pub(super) class_splits: usize,
    /// The attention-form backward's row splits.
    pub(super) attn_row_splits: usize,
    /// Classes per forward tile.
    pub(super) fwd_cols: usize,
    /// Classes per backward tile.
    pub(super) bwd_cols: usize,
    /// Backward CTAs per row split.
    pub(super) g: usize,
    /// Backward row splits.
    pub(super) s: usize,
    /// Sub-centers per class (W has C*K rows; the attention form only).
    pub(super) k: usize,
}

/// [`workspace_for`] with the fused path's launch choices given.
pub(super) fn workspace_with_groups(
    path: HeadPath,
    shape: HeadShape,
    dtype: DType,
    grad: GradDtype,
    plan: Plan,
) -> Workspace {
    let Plan { kernels, class_splits: n_cs, attn_row_splits: n_rs, fwd_cols, bwd_cols, g, s: splits, k } =
        plan;
    let HeadShape { b, c, d } = shape;
    let f = 4;
    match path {
        HeadPath::Reference => Workspace {
            // xh, wh, inverse norms, cos, labels, dt
            forward: (b * d + c * d + b + c + b * c + 2 * b) * f,
            // xh, wh, inverse norms, cos, dc, dxh, dwh, labels
            backward: (2 * b * d + 2 * c * d + b + c + 2 * b * c + b) * f,
        },
        HeadPath::Fused if kernels == FusedKernels::Attention => {
            // The O partials and, with row splits, the backward's dW partials share one buffer
            // (attn_partials_len; attn_bwd_row_splits keeps both within one budget); with row
            // splits the backward also keeps one u32 counter per class tile.
            let partials = attn_partials_len(shape, k, n_cs, n_rs);
            let counters = if n_rs > 1 { attn_bwd_class_tiles(dtype, shape, k) } else { 0 };
            Workspace {
                // split partials (part, the shared partials, swh), the saved dx for unit
                // weights and inverse norms (of W's C*K rows), labels; the backward the labels,
                // and with row splits the shared partials and the counters (k*_iy, B u32 with
                // K > 1, is an output like c_iy)
                forward: (3 * n_cs * b + partials + n_cs * d + b * d + b + c * k + b) * f,
                backward: (b + if n_rs > 1 { partials + counters } else { 0 }) * f,
            }
        }
        HeadPath::Fused => {
            let n_ct = c.div_ceil(fwd_cols);
            // Row splits keep S partial dW sums; otherwise a 16-bit dW accumulates one class
            // tile per CTA in f32 scratch, an f32 dW in place.
            let dwacc = if splits > 1 {
                splits * c * d
            } else if grad == GradDtype::F32 || dtype == DType::F32 {
                0
            } else {
                g * bwd_cols * d
            };
            Workspace {
                // norms and inverse norms, partials, labels, dt
                forward: (2 * b + 2 * c + 3 * n_ct * b + 2 * b) * f,
                // norms and inverse norms, dx partials, dW accumulators, labels
                backward: (2 * b + 2 * c + g * b * d + dwacc + b) * f,
            }
        }
    }
}

/// Overrides of the fused path's dispatcher, so tests and benches can sweep every
/// configuration it may pick. The defaults are what the dispatcher chooses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FusedTuning {
    /// Backward CTA count G (clamped to [1, number of class tiles]); `None`: one per
    /// class tile up to one per SM, fewer when the dx partials would pass 512 MiB.
    pub backward_ctas: Option<usize>,
    /// Backward class tile, 64 or 128 (other values are ignored); `None`: see
    /// [`backward_cols_for`].
    pub backward_cols: Option<usize>,
    /// Backward row splits S (clamped to [1, number of row tiles of 64]); `None`: 1
    /// unless G leaves more than half the SMs idle, then enough to fill them (dW
    /// partials within 256 MiB).
    pub row_splits: Option<usize>,
    /// Forward tile (rows, classes), one of [`FORWARD_TILES`] (other values are
    /// ignored); `None`: see [`forward_tile_for`].
    pub forward_tile: Option<(usize, usize)>,
    /// Use the element-load kernels even when D allows 16-byte cp.async.
    pub scalar_loads: bool,
    /// Which fused kernels run; `None`: [`FusedKernels::Attention`] where
    /// [`attn_supported`] holds, else [`FusedKernels::Tiles`]. Asking for the attention
    /// kernels where they do not apply is an error.
    pub kernels: Option<FusedKernels>,
    /// The attention-form forward's class splits (see [`attn_split_tiles`]); `None`:
    /// [`attn_splits`]. Fewer splits give each CTA several class tiles (the online
    /// rescaling across tiles); a different count regroups the sums (equal within
    /// tolerance, not bitwise).
    pub class_splits: Option<usize>,
    /// The attention-form backward's row splits (see [`attn_row_split_tiles`]); `None`:
    /// [`attn_bwd_row_splits`]. A different count regroups dW's sums (equal within
    /// tolerance, not bitwise).
    pub attn_row_splits: Option<usize>,
}

/// The two kernel sets of the fused path (serialized as [`FusedKernels::name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FusedKernels {
    /// `kernels/head_fused.cu`: forward tiles with (max, sum exp) partials; the backward
    /// recomputes the tiles for dx partials and dW. Every dtype and D.
    Tiles,
    /// `kernels/head_attn.cu`: dx in the forward (attention form), a dW-only backward.
    /// Every dtype, D <= 512 (see [`attn_supported`]).
    Attention,
}

/// Threads per block of every head kernel.
pub const THREADS: u32 = 256;
/// Rows per block of the one-warp-per-row kernels (8 warps of 256 threads).
const WARP_ROWS: usize = 8;

fn warp_rows(rows: usize) -> usize {
    rows.div_ceil(WARP_ROWS)
}

/// `ref_normalize_fwd_*`: xh = v / |v| in f32 and the inverse norms (one warp per row).
pub fn ref_normalize(dtype: DType, rows: usize, d: usize, mut a: RefNormalizeArgs) -> Launch {
    a.rows = rows as i32;
    a.d = d as i32;
    Launch::linear(kr::REF_NORMALIZE_FWD[dtype], warp_rows(rows), THREADS, &a)
}

/// `ref_margin_fwd_*`: the target logit per row (one thread per row), from the max over the
/// target's `k` sub-centers (SPEC 5b; `k` = 1: its one row).
pub fn ref_margin(dtype: DType, shape: HeadShape, k: usize, mut a: RefMarginArgs) -> Launch {
    a.b = shape.b as i32;
    a.d = shape.d as i32;
    a.k = k as i32;
    Launch::linear(kr::REF_MARGIN_FWD[dtype], shape.b.div_ceil(THREADS as usize), THREADS, &a)
}

/// `ref_softmax_fwd_f32`: lse and loss per row (one block per row of the B x C*K cosines;
/// `shape.c` classes of `k` sub-centers each).
pub fn ref_softmax(shape: HeadShape, k: usize, mut a: RefSoftmaxArgs) -> Launch {
    a.c = shape.c as i32;
    a.k = k as i32;
    Launch::linear(kr::REF_SOFTMAX_FWD_F32, shape.b, THREADS, &a)
}

/// `ref_grad_bwd_f32`: dc [B, C*K] (grid: column blocks of the C*K sub-center columns x rows).
pub fn ref_grad(shape: HeadShape, k: usize, mut a: RefGradArgs) -> Launch {
    a.c = shape.c as i32;
    a.k = k as i32;
    let grid = [(shape.c * k).div_ceil(THREADS as usize) as u32, shape.b as u32, 1];
    Launch::new(kr::REF_GRAD_BWD_F32, grid, [THREADS, 1, 1], 0, &a)
}

/// `head_reduce_fwd_f32`: total = scale * sum of the B row losses (one block).
pub fn head_reduce(b: usize, mut a: HeadReduceArgs) -> Launch {
    a.b = b as i32;
    Launch::linear(kr::HEAD_REDUCE_FWD_F32, 1, THREADS, &a)
}

/// `head_normback_*`: out = (g - u (u . g)) * inv with g the sum of `nparts` partials
/// (one warp per row); `out_f32` picks the f32-output variant (`_f32out_`) for 16-bit storage.
pub fn normback(
    dtype: DType,
    out_f32: bool,
    rows: usize,
    d: usize,
    nparts: usize,
    mut a: NormbackArgs,
) -> Launch {
    a.nparts = nparts as i32;
    a.part_stride = (rows * d) as i64;
    a.rows = rows as i32;
    a.d = d as i32;
    // f32 storage writes f32 either way, so the f32-output variants exist for 16 bits only.
    let k = match (dtype, out_f32) {
        (DType::BF16, true) => kr::HEAD_NORMBACK_BWD_F32OUT_BF16,
        (DType::F16, true) => kr::HEAD_NORMBACK_BWD_F32OUT_F16,
        _ => kr::HEAD_NORMBACK_BWD[dtype],
    };
    Launch::linear(k, warp_rows(rows), THREADS, &a)
}

/// Whether the `fused_*` kernels with 16-byte cp.async can run at D, else `fused_*_scalar_*`.
pub fn fused_vectorized(dtype: DType, d: usize) -> bool {
    d % (16 / dtype.size()) == 0
}

/// `fused_fwd_*`: (max, sumexp, sum z) partials per (row, class tile) and the target
/// logit per row; grid = class tiles x row tiles of `tile` (rows, classes). `vec`: the
/// cp.async kernels (D a chunk multiple and 16-byte aligned bases).
pub fn fused_fwd(
    dtype: DType,
    shape: HeadShape,
    tile: (usize, usize),
    vec: bool,
    mut a: FusedFwdArgs,
) -> Result<Launch> {
    let family = match (tile, vec) {
        ((128, 128), true) => kf::FUSED_FWD_R128C128,
        ((128, 128), false) => kf::FUSED_FWD_R128C128_SCALAR,
        ((64, 128), true) => kf::FUSED_FWD_R64C128,
        ((64, 128), false) => kf::FUSED_FWD_R64C128_SCALAR,
        ((64, 64), true) => kf::FUSED_FWD_R64C64,
        ((64, 64), false) => kf::FUSED_FWD_R64C64_SCALAR,
        ((rows, cols), _) => {
            return Err(Error::InvalidConfig(format!("no fused forward kernel for a {rows} x {cols} tile")))
        }
    };
    let k = family[dtype];
    a.b = shape.b as i32;
    a.c = shape.c as i32;
    a.d = shape.d as i32;
    let grid = [shape.c.div_ceil(tile.1) as u32, shape.b.div_ceil(tile.0) as u32, 1];
    Ok(Launch::new(k, grid, [THREADS, 1, 1], 0, &a))
}

/// `fused_combine_fwd_f32`: merges the `n_ct` class-tile partials of each row (one warp
/// per row) and writes every per-row output, ignored rows included.
pub fn fused_combine(b: usize, n_ct: usize, mut a: FusedCombineArgs) -> Launch {
    a.n_ct = n_ct as i32;
    a.b = b as i32;
    Launch::linear(kf::FUSED_COMBINE_FWD_F32, warp_rows(b), THREADS, &a)
}

/// `fused_bwd_*`: dx partials per CTA and dW (or its partials) over the grid
/// G x S = (`groups`, `splits`) with class tiles of `cols`.
pub fn fused_bwd(
    dtype: DType,
    shape: HeadShape,
    (cols, groups, splits): (usize, usize, usize),
    vec: bool,
    mut a: FusedBwdArgs,
) -> Result<Launch> {
    let family = match (cols, vec) {
        (BWD_BN, true) => kf::FUSED_BWD_C128,
        (BWD_BN, false) => kf::FUSED_BWD_C128_SCALAR,
        (BWD_BN_SMALL, true) => kf::FUSED_BWD_C64,
        (BWD_BN_SMALL, false) => kf::FUSED_BWD_C64_SCALAR,
        _ => return Err(Error::InvalidConfig(format!("no fused backward kernel for {cols}-class tiles"))),
    };
    let k = family[dtype];
    a.b = shape.b as i32;
    a.c = shape.c as i32;
    a.d = shape.d as i32;
    let grid = [groups as u32, splits as u32, 1];
    Ok(Launch::new(k, grid, [THREADS, 1, 1], bwd_smem_bytes(dtype, cols), &a))
}

impl FusedKernels {
    /// Short name: "attention" (`kernels/head_attn.cu`) or "tiles" (`kernels/head_fused.cu`).
    pub fn name(self) -> &'static str {
        match self {
            FusedKernels::Attention => "attention",
            FusedKernels::Tiles => "tiles",
        }
    }
}

// ---- the attention-form kernels (kernels/head_attn.cu) ------------------------------------

/// The largest D the attention-form kernels take (their O accumulator holds all of D).
pub const ATTN_DMAX: usize = 2048;
/// Rows of the streamed operand per step (W classes in the forward, x rows in the backward).
pub const ATTN_BT: usize = 32;
/// The forward's class splits aim at this many CTAs: a constant, not the device's SM count,
/// so that the summation order (and every output bit) is the same on every GPU.
pub const ATTN_TARGET_CTAS: usize = 256;

/// Whether the attention-form kernels handle feature size `d` in storage `dtype` on a device
/// allowing `max_smem` bytes of shared memory per block: D <= [`ATTN_DMAX`] (D > 512: bf16
/// only) and the kernel's shared memory. The D = 512 kernels need 134 KiB (f32), 135 KiB
/// (bf16), 168 KiB (f16) plus up to 12 KiB static: sm_90 (227 KiB) runs all three, sm_80 (163 KiB)
/// f32 and bf16 (f16 takes the tiles), sm_86 and sm_89 (99 KiB) only the D <= 128 kernels.
/// The bf16 D = 2048 kernels need 194 KiB plus up to 12 KiB static: sm_90 only.
pub fn attn_supported(dtype: DType, d: usize, max_smem: u32) -> bool {
    let dp = attn_dp(d);
    (1..=ATTN_DMAX).contains(&d)
        && (dp <= ATTN_DMAX_ALL || dtype == DType::BF16)
        && attn_smem_bytes(dtype, dp) + ATTN_STATIC_SMEM <= max_smem
}

/// The largest D the attention-form kernels take in every dtype (beyond it: bf16 only).
pub const ATTN_DMAX_ALL: usize = 512;

/// Shared memory one block may use on sm_90 after opting in (CUDA programming guide).
pub const SM90_MAX_SMEM: u32 = 232_448;

/// Upper bound of the kernels' static shared memory (ptxas reports at most 11,904 bytes): a
/// few per-row arrays (4 KiB), the sub-centers' z tile (RM x BT f32: 8 KiB at 64 resident
/// rows, 2 KiB at 16), and at DP = 2048 the split-K partials (3 x 16 x 32 f32, 6 KiB): 12 KiB
/// either way.
const ATTN_STATIC_SMEM: u32 = 12_288;

/// Rows a CTA keeps resident (`AttnCfg<T, DP>::RM`): x rows in the forward, W rows in the
/// backward.
pub fn attn_rows(dtype: DType, dp: usize) -> usize {
    if dp > ATTN_DMAX_ALL {
        16
    } else if dtype == DType::F32 {
        32
    } else {
        64
    }
}

/// The padded D of the kernel that takes `d` (`attn_*_d128_*`, `attn_*_d512_*` or
/// `attn_*_d2048_*`).
pub fn attn_dp(d: usize) -> usize {
    if d <= 128 {
        128
    } else if d <= ATTN_DMAX_ALL {
        ATTN_DMAX_ALL
    } else {
        ATTN_DMAX
    }
}

/// Dynamic shared memory of `attn_fwd_*` / `attn_bwd_*` (`attn_smem_bytes<T, DP>` in the .cu
/// file, which asserts these values): R [RM][DP + pad], T stages [BT][DP + pad], E [RM][BT + pad],
/// and for f16 a bf16 copy of the streamed tile (one more [BT][DP + pad]). DP = 2048 (bf16):
/// one stage.
pub fn attn_smem_bytes(dtype: DType, dp: usize) -> u32 {
    let (stages, pad, e) = match dtype {
        DType::F32 => (1, 4, 4),
        DType::BF16 if dp > ATTN_DMAX_ALL => (1, 8, 2),
        DType::BF16 => (2, 8, 2),
        DType::F16 => (3, 8, 2), // two stages and the bf16 copy of the streamed tile
    };
    let rm = attn_rows(dtype, dp);
    (((rm + stages * ATTN_BT) * (dp + pad) + rm * (ATTN_BT + pad)) * e) as u32
}

/// The forward's class splits at `shape` with one center per class: [`attn_splits_k`] with K = 1.
pub fn attn_splits(dtype: DType, shape: HeadShape) -> (usize, usize) {
    attn_splits_k(dtype, shape, 1)
}

/// The forward's class splits at `shape` with `k` sub-centers per class: (splits, class tiles
/// of [`attn_tile_classes`] per split), so that row tiles x splits reaches
/// [`ATTN_TARGET_CTAS`] where the classes and [`ATTN_OPART_BUDGET`] allow, and no split is
/// empty. A function of the shape and K only.
pub fn attn_splits_k(dtype: DType, shape: HeadShape, k: usize) -> (usize, usize) {
    let n_rt = shape.b.div_ceil(attn_rows(dtype, attn_dp(shape.d)));
    let budget = ATTN_OPART_BUDGET.max(shape.c * k * shape.d * dtype.size());
    let by_memory = (budget / (shape.b * shape.d * 4).max(1)).max(1);
    attn_split_tiles_k(shape, k, ATTN_TARGET_CTAS.div_ceil(n_rt).min(by_memory))
}

/// Classes in one streamed W tile of the forward with `k` sub-centers per class: the tiles are
/// class-aligned (SPEC 5b), floor([`ATTN_BT`] / K) whole classes, K times that W rows.
pub fn attn_tile_classes(k: usize) -> usize {
    ATTN_BT / k.max(1)
}

/// Classes in one resident W tile of the backward (a CTA) with `k` sub-centers per class:
/// floor([`attn_rows`] / K) whole classes.
pub fn attn_bwd_classes(dtype: DType, d: usize, k: usize) -> usize {
    attn_rows(dtype, attn_dp(d)) / k.max(1)
}

/// The forward's O partials (`[splits][B][D]` f32) stay within this many bytes, or W's size
/// where W is larger (a head that holds W can hold scratch of its size), where one split allows
/// it. Fewer splits mean fewer CTAs; at the SPEC 9 shapes the cap binds on LT only (8 splits
/// become 4, 256 CTAs in two waves of one per SM become 128 in one: no slower in the model),
/// where it keeps the extra memory below Cut Cross-Entropy's 22 MiB.
pub const ATTN_OPART_BUDGET: usize = 16 << 20;

/// (splits, class tiles per split) for about `want` class splits with one center per class:
/// [`attn_split_tiles_k`] with K = 1.
pub fn attn_split_tiles(shape: HeadShape, want: usize) -> (usize, usize) {
    attn_split_tiles_k(shape, 1, want)
}

/// (splits, class tiles per split) for about `want` class splits with `k` sub-centers per class
/// (clamped to [1, class tiles]; every split gets the same number of tiles but the last, none
/// is empty).
pub fn attn_split_tiles_k(shape: HeadShape, k: usize, want: usize) -> (usize, usize) {
    let n_ct = shape.c.div_ceil(attn_tile_classes(k));
    let per = n_ct.div_ceil(want.clamp(1, n_ct));
    (n_ct.div_ceil(per), per)
}

/// K as the attention-form kernels take it: 1..=[`crate::config::MAX_SUBCENTERS`], at most the
/// rows of a resident tile (16 at D > 512), so that a tile holds a whole class.
fn attn_check_k(dtype: DType, d: usize, k: usize) -> Result<i32> {
    if k == 0 || k > attn_rows(dtype, attn_dp(d)).min(ATTN_BT) {
        return Err(Error::InvalidConfig(format!(
            "the attention-form kernels take 1 to {} sub-centers per class here, got {k}",
            attn_rows(dtype, attn_dp(d)).min(ATTN_BT)
        )));
    }
    Ok(k as i32)
}

fn attn_kernel(dtype: DType, d: usize, vec: bool, fwd: bool) -> Result<Kernel> {
    if attn_dp(d) > ATTN_DMAX_ALL {
        return match (dtype, fwd, vec) {
            (DType::BF16, true, true) => Ok(ka::ATTN_FWD_D2048_BF16),
            (DType::BF16, true, false) => Ok(ka::ATTN_FWD_D2048_SCALAR_BF16),
            (DType::BF16, false, true) => Ok(ka::ATTN_BWD_D2048_BF16),
            (DType::BF16, false, false) => Ok(ka::ATTN_BWD_D2048_SCALAR_BF16),
            _ => Err(Error::InvalidConfig(format!(
                "the attention-form kernels take D <= {ATTN_DMAX_ALL} in {}, got {d}",
                dtype.name()
            ))),
        };
    }
    let family = match (fwd, attn_dp(d) == ATTN_DMAX_ALL, vec) {
        (true, true, true) => ka::ATTN_FWD_D512,
        (true, true, false) => ka::ATTN_FWD_D512_SCALAR,
        (true, false, true) => ka::ATTN_FWD_D128,
        (true, false, false) => ka::ATTN_FWD_D128_SCALAR,
        (false, true, true) => ka::ATTN_BWD_D512,
        (false, true, false) => ka::ATTN_BWD_D512_SCALAR,
        (false, false, true) => ka::ATTN_BWD_D128,
        (false, false, false) => ka::ATTN_BWD_D128_SCALAR,
    };
    Ok(family[dtype])
}

fn attn_check_d(d: usize) -> Result<()> {
    if (1..=ATTN_DMAX).contains(&d) {
        Ok(())
    } else {
        Err(Error::InvalidConfig(format!("the attention-form kernels take D <= {ATTN_DMAX}, got {d}")))
    }
}

/// `attn_fwd_*`: grid (row tiles, `splits`), `per` class tiles per split ([`attn_splits_k`]
/// or [`attn_split_tiles_k`]) of [`attn_tile_classes`]`(k)` classes, `k` sub-centers each.
pub fn attn_fwd(
    dtype: DType,
    shape: HeadShape,
    k: usize,
    (splits, per): (usize, usize),
    vec: bool,
    mut a: AttnFwdArgs,
) -> Result<Launch> {
    attn_check_d(shape.d)?;
    a.k = attn_check_k(dtype, shape.d, k)?;
    let n_ct = shape.c.div_ceil(attn_tile_classes(k));
    if splits == 0 || per == 0 || (splits - 1) * per >= n_ct || splits * per < n_ct {
        return Err(Error::InvalidConfig(format!(
            "{splits} class splits of {per} tiles do not cover C = {}",
            shape.c
        )));
    }
    let kernel = attn_kernel(dtype, shape.d, vec, true)?;
    a.b = shape.b as i32;
    a.c = shape.c as i32;
    a.d = shape.d as i32;
    a.tiles_per_split = per as i32;
    let grid = [shape.b.div_ceil(attn_rows(dtype, attn_dp(shape.d))) as u32, splits as u32, 1];
    Ok(Launch::new(kernel, grid, [THREADS, 1, 1], attn_smem_bytes(dtype, attn_dp(shape.d)), &a))
}

/// `attn_combine_fwd_d512_*` (one warp per row) or `attn_combine_fwd_d2048_bf16` (one block
/// per row, so that few rows still fill the device) over the forward's `splits`; `k`
/// sub-centers per class.
pub fn attn_combine(
    dtype: DType,
    shape: HeadShape,
    k: usize,
    splits: usize,
    mut a: AttnCombineArgs,
) -> Result<Launch> {
    attn_check_d(shape.d)?;
    a.k = attn_check_k(dtype, shape.d, k)?;
    a.n_cs = splits as i32;
    a.b = shape.b as i32;
    a.c = shape.c as i32;
    a.d = shape.d as i32;
    if attn_dp(shape.d) <= ATTN_DMAX_ALL {
        return Ok(Launch::linear(ka::ATTN_COMBINE_FWD_D512[dtype], warp_rows(shape.b), THREADS, &a));
    }
    match dtype {
        DType::BF16 => Ok(Launch::linear(ka::ATTN_COMBINE_FWD_D2048_BF16, shape.b, THREADS, &a)),
        _ => Err(Error::InvalidConfig(format!(
            "the attention-form kernels take D <= {ATTN_DMAX_ALL} in {}, got {}",
            dtype.name(),
            shape.d
        ))),
    }
}

/// f32 elements of the attention form's shared partials buffer (the forward's O partials
/// `[class splits][B][D]`, and with more than one backward row split the backward's dW
/// partials `[row splits][C*K][D]`): both passes take it at this one size, so that it is kept
/// between calls (on the emulated device, reused only at its exact size) and its bytes are
/// counted once.
pub fn attn_partials_len(shape: HeadShape, k: usize, class_splits: usize, row_splits: usize) -> usize {
    let dwpart = if row_splits > 1 { row_splits * shape.c * k * shape.d } else { 0 };
    (class_splits * shape.b * shape.d).max(dwpart)
}

/// The attention-form backward aims at this many CTAs (class tiles x row splits) where the
/// class tiles alone leave SMs idle: about one wave of its one-CTA-per-SM kernels on an H200
/// (132 SMs). A constant, not the device's SM count, so that the split (and every output bit)
/// is the same on every GPU.
pub const ATTN_BWD_TARGET_CTAS: usize = 128;

/// The attention-form backward's class tiles at `shape` with `k` sub-centers per class: one
/// CTA column each ([`attn_bwd_classes`] classes).
pub fn attn_bwd_class_tiles(dtype: DType, shape: HeadShape, k: usize) -> usize {
    shape.c.div_ceil(attn_bwd_classes(dtype, shape.d, k.max(1)))
}

/// The attention-form backward's row splits at `shape` with `k` sub-centers per class:
/// (splits, x row tiles of [`ATTN_BT`] rows per split). Splitting the rows gives a small C
/// more CTAs, but every CTA then stores its dW-hat partial (RM x D f32) and the last CTA of a
/// class tile reads all of them back, so the split count n is the one (the smallest of
/// equals) that minimizes the busiest CTA's global bytes per column of D, (row tiles of its
/// split) x BT x (storage bytes) + (n > 1: (1 + n) x RM x 4), among those with class tiles x
/// n within [`ATTN_BWD_TARGET_CTAS`] and the dW partials (`[n][C*K][D]` f32, in the forward's
/// O partials' scratch) within [`ATTN_OPART_BUDGET`] or W's bytes. So one split wherever the
/// class tiles reach the target (every face shape: nothing changes there) or the rows are
/// few (re-ID's 64), two at LT (512 x 2048 x 1000 in bf16: 126 CTAs). A function of the
/// shape, the dtype and K only.
pub fn attn_bwd_row_splits(dtype: DType, shape: HeadShape, k: usize) -> (usize, usize) {
    let n_cb = attn_bwd_class_tiles(dtype, shape, k).max(1);
    let budget = ATTN_OPART_BUDGET.max(shape.c * k * shape.d * dtype.size());
    let by_memory = budget / (shape.c * k * shape.d * 4).max(1);
    let most = (ATTN_BWD_TARGET_CTAS / n_cb).min(by_memory).max(1);
    let rm = attn_rows(dtype, attn_dp(shape.d));
    let busiest = |n: usize| {
        let (n, per) = attn_row_split_tiles(shape, n);
        per * ATTN_BT * dtype.size() + if n > 1 { (1 + n) * rm * 4 } else { 0 }
    };
    let best = (1..=most.min(shape.b.div_ceil(ATTN_BT))).min_by_key(|&n| (busiest(n), n)).unwrap_or(1);
    attn_row_split_tiles(shape, best)
}

/// (splits, row tiles per split) for about `want` row splits of the backward (clamped to
/// [1, row tiles]; every split gets the same number of row tiles but the last, none is empty).
pub fn attn_row_split_tiles(shape: HeadShape, want: usize) -> (usize, usize) {
    let n_rt = shape.b.div_ceil(ATTN_BT).max(1);
    let per = n_rt.div_ceil(want.clamp(1, n_rt));
    (n_rt.div_ceil(per), per)
}

/// `attn_bwd_*`: grid (class tiles of [`attn_bwd_classes`] classes, `k` sub-centers each;
/// `splits` row splits of `per` row tiles: [`attn_bwd_row_splits`] or [`attn_row_split_tiles`]).
/// With more than one split the caller passes `dwpart` (`[splits, C*K, D]` f32) and `counters`
/// (`[class tiles]` u32, all 0).
pub fn attn_bwd(
    dtype: DType,
    shape: HeadShape,
    k: usize,
    (splits, per): (usize, usize),
    vec: bool,
    mut a: AttnBwdArgs,
) -> Result<Launch> {
    attn_check_d(shape.d)?;
    a.k = attn_check_k(dtype, shape.d, k)?;
    let n_rt = shape.b.div_ceil(ATTN_BT).max(1);
    if splits == 0 || per == 0 || (splits - 1) * per >= n_rt || splits * per < n_rt {
        return Err(Error::InvalidConfig(format!(
            "{splits} row splits of {per} row tiles do not cover B = {}",
            shape.b
        )));
    }
    let kernel = attn_kernel(dtype, shape.d, vec, false)?;
    a.b = shape.b as i32;
    a.c = shape.c as i32;
    a.d = shape.d as i32;
    a.rtiles_per_split = per as i32;
    let grid = [attn_bwd_class_tiles(dtype, shape, k) as u32, splits as u32, 1];
    Ok(Launch::new(kernel, grid, [THREADS, 1, 1], attn_smem_bytes(dtype, attn_dp(shape.d)), &a))
}
