//! The fused path (`kernels/head_fused.cu`): inverse norms, then tiles of
//! x-hat W-hat^T on tensor cores (bf16/f16) or exact SIMT (f32) with the margin,
//! the cloud and an online softmax in the epilogue, (max, sumexp) partials per
//! (row, class tile) merged in a fixed order; the backward recomputes the tiles,
//! keeps dx partials per CTA and finishes dW in the kernel. Never B x C.
//!
//! Launches per call (checked by `tests/head_emu.rs` through the device counters):
//! forward 5 (two row norms, tiles, combine, reduce); backward 2, or 3 with row
//! splits (tiles, dx normback, dW normback), plus two row norms when the forward's
//! inverse norms are not passed in.

use super::plan;
use super::reference::normback;
use super::scratch::{Scratch, Slot};
use super::{ForwardJob, ForwardLaunched, GradDtype, GradTensor, Grads, HeadForward, Inputs, Upstream};
use crate::cuda::args::{FusedBwdArgs, FusedCombineArgs, FusedFwdArgs};
use crate::cuda::{DevPtr, Device, DeviceElem, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::shape::HeadShape;

/// The forward's launch choices.
#[derive(Clone, Copy, Debug)]
pub(super) struct FwdChoice {
    /// (rows, classes) of a tile.
    pub tile: (usize, usize),
    /// Element loads even when 16-byte cp.async would do.
    pub scalar: bool,
}

/// The backward's launch choices.
#[derive(Clone, Copy, Debug)]
pub(super) struct BwdChoice {
    /// Classes per tile (64 or 128).
    pub cols: usize,
    /// CTAs per row split (G).
    pub groups: usize,
    /// Row splits (S).
    pub splits: usize,
    /// Element loads even when 16-byte cp.async would do.
    pub scalar: bool,
}

/// The cp.async kernels need D a multiple of the 16-byte chunk and both base
/// addresses 16-byte aligned (device allocations are 256-byte aligned; a tensor
/// wrapped at an offset need not be).
pub(super) fn vectorized<T: DeviceElem>(x: &Tensor<T>, w: &Tensor<T>, d: usize, scalar: bool) -> bool {
    !scalar && plan::fused_vectorized(T::DTYPE, d) && x.ptr().0 % 16 == 0 && w.ptr().0 % 16 == 0
}

/// Inverse row norms `[rows]` of v (`kernels/norms.cu`) into the scratch of `slot`.
fn inv_norms<T: DeviceElem>(
    dev: &Device,
    v: &Tensor<T>,
    scratch: &mut Scratch,
    slot: Slot,
) -> Result<Tensor<f32>> {
    let (rows, d) = (v.shape()[0], v.shape()[1]);
    let inv = scratch.take(dev, slot, &[rows])?;
    let l = crate::cuda::norms::row_norms_launch(T::DTYPE, rows, d, v.ptr(), DevPtr::NULL, inv.ptr());
    // SAFETY: v holds rows*d T (its shape), inv holds rows f32 and does not alias it; the
    // kernel writes inv for every row and skips the null norm output.
    unsafe { dev.launch(&l) }?;
    Ok(inv)
}

/// The fused forward: every per-row output and the reduced loss (on the device), and
/// the inverse norms for a backward of the same inputs.
pub(super) fn forward<T: DeviceElem>(
    dev: &Device,
    inp: &Inputs<'_, T>,
    job: ForwardJob<'_>,
    choice: FwdChoice,
    scratch: &mut Scratch,
) -> Result<ForwardLaunched> {
    let (shape, p) = (inp.shape, inp.p);
    let b = shape.b;
    // SAFETY: fused_fwd + fused_combine_fwd_f32 write every per-row element (the combine
    // writes the ignored rows), so none of these needs zeroing.
    let out = unsafe { HeadForward::alloc_uninit(dev, shape, job.n_valid) }?;
    let inv_x = inv_norms(dev, inp.x, scratch, Slot::InvX)?;
    let inv_w = inv_norms(dev, inp.w, scratch, Slot::InvW)?;
    let n_ct = shape.c.div_ceil(choice.tile.1);
    // fused_fwd writes part[k][ct][r] for every class tile ct and row r < B before the
    // combine reads it; head_reduce_fwd_f32 always writes its one output element.
    let part = scratch.take(dev, Slot::Part, &[3 * n_ct * b])?;
    let total = scratch.take(dev, Slot::Total, &[1])?;
    let tiles = plan::fused_fwd(
        T::DTYPE,
        shape,
        choice.tile,
        vectorized(inp.x, inp.w, shape.d, choice.scalar),
        FusedFwdArgs {
            x: inp.x.ptr(),
            w: inp.w.ptr(),
            inv_x: inv_x.ptr(),
            inv_w: inv_w.ptr(),
            labels: inp.labels.ptr(),
            sigma: job.sigma.ptr(),
            p,
            part: part.ptr(),
            c_iy: out.c_iy.ptr(),
            t: out.t.ptr(),
            alpha: out.alpha.ptr(),
            dt: out.dt.ptr(),
            ..Default::default()
        },
    )?;
    let combine = plan::fused_combine(
        b,
        n_ct,
        FusedCombineArgs {
            part: part.ptr(),
            labels: inp.labels.ptr(),
            t: out.t.ptr(),
            p,
            lse: out.lse.ptr(),
            loss: out.row_loss.ptr(),
            c_iy: out.c_iy.ptr(),
            alpha: out.alpha.ptr(),
            dt: out.dt.ptr(),
            ..Default::default()
        },
    );
    let reduce = job.reduce(&out, &total);
    // SAFETY: x [B, D], w [C, D] (the cp.async kernels only when D and both base addresses
    // allow 16-byte chunks, checked in `vectorized`), inv_x/labels/outputs [B], inv_w/sigma
    // [C] (sigma unread when the cloud is off), part [3, n_ct, B] with n_ct = grid.x of the
    // tile kernel (same tile); labels < C (HeadOn::check); every output a distinct buffer.
    unsafe { dev.run(&[tiles, combine, reduce]) }?;
    scratch.put(Slot::Part, part);
    Ok(ForwardLaunched { out, total, inv: Some((inv_x, inv_w)), deferred_reduce: None })
}

/// Where the fused backward finishes dW.
enum DwDest<T: DeviceElem> {
    /// S partial f32 sums `[S, C, D]` (row splits); `head_normback` finishes dW.
    Partials(Tensor<f32>),
    /// f32 dW `[C, D]`, accumulated in place.
    F32(Tensor<f32>),
    /// 16-bit dW `[C, D]` via f32 scratch of one class tile per CTA `[G, cols, D]`.
    Input { acc: Tensor<f32>, dw: Tensor<T> },
}

/// The fused backward: dx and dW in the asked dtype.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: DeviceElem>(
    dev: &Device,
    inp: &Inputs<'_, T>,
    fwd: &HeadForward,
    inv: Option<(&Tensor<f32>, &Tensor<f32>)>,
    up: Upstream<'_>,
    grad_dtype: GradDtype,
    choice: BwdChoice,
    scratch: &mut Scratch,
) -> Result<Grads<T>> {
    let (shape, p) = (inp.shape, inp.p);
    let HeadShape { b, c, d } = shape;
    let computed = match inv {
        Some(_) => None,
        None => {
            Some((inv_norms(dev, inp.x, scratch, Slot::InvX)?, inv_norms(dev, inp.w, scratch, Slot::InvW)?))
        }
    };
    let (inv_x, inv_w) = match (inv, &computed) {
        (Some(pair), _) => pair,
        (None, Some((ix, iw))) => (ix, iw),
        (None, None) => unreachable!("computed above when not passed in"),
    };
    let BwdChoice { cols, groups, splits, scalar } = choice;
    // SAFETY (every uninit below): fused_bwd writes every element of dxp (groups <= class
    // tiles: each CTA stores its partial on its first class tile) and of dW (each class
    // row once, by the CTA that owns its tile) or of the dW partials (each split stores
    // its slice on its first row tile); its f32 scratch is written before it is read.
    let dxp = scratch.take(dev, Slot::Dxp, &[groups * b * d])?;
    let f32_dw = grad_dtype == GradDtype::F32 || T::DTYPE == DType::F32;
    let null = DevPtr::NULL;
    let dest = if splits > 1 {
        DwDest::Partials(scratch.take(dev, Slot::Dw, &[splits * c * d])?)
    } else if f32_dw {
        DwDest::F32(unsafe { Tensor::<f32>::uninit(dev, &[c, d]) }?)
    } else {
        DwDest::Input {
            acc: scratch.take(dev, Slot::Dw, &[groups * cols * d])?,
            dw: unsafe { Tensor::<T>::uninit(dev, &[c, d]) }?,
        }
    };
    // (dwacc, dw, dw32, dwp): exactly one destination is non-null.
    let (dwacc, dw, dw32, dwp) = match &dest {
        DwDest::Partials(t) => (null, null, null, t.ptr()),
        DwDest::F32(t) => (null, null, t.ptr(), null),
        DwDest::Input { acc, dw } => (acc.ptr(), dw.ptr(), null, null),
    };
    let tiles = plan::fused_bwd(
        T::DTYPE,
        shape,
        (cols, groups, splits),
        vectorized(inp.x, inp.w, d, scalar),
        FusedBwdArgs {
            x: inp.x.ptr(),
            w: inp.w.ptr(),
            inv_x: inv_x.ptr(),
            inv_w: inv_w.ptr(),
            labels: inp.labels.ptr(),
            t: fwd.t.ptr(),
            dt: fwd.dt.ptr(),
            lse: fwd.lse.ptr(),
            row_g: up.row_g.map_or(null, |g| g.ptr()),
            g_scale: up.g_scale,
            p,
            dxp: dxp.ptr(),
            dwacc,
            dw,
            dw32,
            dwp,
            ..Default::default()
        },
    )?;
    // SAFETY: x [B, D], w [C, D] (cp.async kernels only when allowed, see `vectorized`),
    // per-row inputs [B], inv_w [C]; dxp holds groups*B*D f32; exactly one dW destination:
    // S*C*D f32 partials (only with splits > 1), f32 [C, D], or T [C, D] with
    // groups*cols*D f32 of scratch; all distinct buffers; groups <= class tiles and
    // splits <= row tiles (HeadOn::bwd_grid clamps); the dynamic shared memory is the
    // size the kernel was written for (plan::fused_bwd).
    unsafe { dev.launch(&tiles) }?;
    let dw = match dest {
        DwDest::Partials(dwp) => {
            let dw = normback(dev, &dwp, splits, inp.w, inv_w, None, grad_dtype, c, d)?;
            scratch.put(Slot::Dw, dwp);
            dw
        }
        DwDest::F32(dw) => GradTensor::F32(dw),
        DwDest::Input { acc, dw } => {
            scratch.put(Slot::Dw, acc);
            GradTensor::Input(dw)
        }
    };
    let dx = normback(dev, &dxp, groups, inp.x, inv_x, Some(inp.labels), grad_dtype, b, d)?;
    scratch.put(Slot::Dxp, dxp);
    if let Some((ix, iw)) = computed {
        scratch.put(Slot::InvX, ix);
        scratch.put(Slot::InvW, iw);
    }
    Ok(Grads { dx, dw })
}
