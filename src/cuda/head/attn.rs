//! The fused path's attention-form kernels (`kernels/head_attn.cu`): the forward computes
//! lse, the loss and dx for a unit row weight (SPEC 4's attention form), the backward
//! only dW, from the forward's saved state, and scales dx by the upstream weights.
//!
//! Sub-centers (SPEC 5b): with K > 1 the kernels take W `[C*K, D]` in class-aligned tiles,
//! the forward writes [`HeadForward::k_iy`] and the backward reads it back; dW is `[C*K, D]`.
//!
//! Launches per call (checked by `tests/head_emu.rs` and `tests/head_plans.rs` through the
//! device counters): forward 3 (tiles, combine, loss reduction); backward 1; forward_backward
//! 3 (the backward's first block does the loss reduction). No memsets; the scratch is kept
//! between calls: the forward's split partials, and where the backward splits its rows
//! (small C, [`plan::attn_bwd_row_splits`]) its dW partials in the same buffer and one
//! counter per class tile, zeroed when allocated and left 0 by every launch.

use super::fused::vectorized;
use super::plan;
use super::scratch::{Scratch, Slot};
use super::{ForwardJob, ForwardLaunched, GradDtype, GradTensor, Grads, HeadForward, Inputs, Upstream};
use crate::cuda::args::{AttnBwdArgs, AttnCombineArgs, AttnFwdArgs};
use crate::cuda::{Device, DeviceElem, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::shape::HeadShape;

/// What the attention-form forward leaves for its backward (device tensors).
#[derive(Debug)]
pub(super) struct AttnSaved {
    /// dx of each row for a unit row weight `[B, D]` (0 for ignored rows).
    pub u: Tensor<f32>,
    /// Inverse norms of x `[B]`, as the forward's tiles computed them.
    pub inv_x: Tensor<f32>,
    /// Inverse norms of W's rows `[C*K]`.
    pub inv_w: Tensor<f32>,
}

/// The attention-form forward over `splits` class splits of `per` class tiles: every per-row
/// output, the reduced loss (on the device, unless `defer_reduce` leaves it to the backward)
/// and the saved state of [`AttnSaved`]. `bwd_row_splits`: the backward's row splits, which
/// size the partials buffer the two passes share ([`plan::attn_partials_len`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<T: DeviceElem>(
    dev: &Device,
    inp: &Inputs<'_, T>,
    job: ForwardJob<'_>,
    (splits, per): (usize, usize),
    bwd_row_splits: usize,
    scalar: bool,
    defer_reduce: bool,
    scratch: &mut Scratch,
) -> Result<ForwardLaunched> {
    let (shape, p, k) = (inp.shape, inp.p, inp.k);
    let HeadShape { b, c, d } = shape;
    // SAFETY: attn_fwd writes c_iy, t, alpha, dt (and with K > 1 k_iy) of the valid rows and
    // attn_combine_fwd every per-row element (the ignored rows' too) and every element of u;
    // the split-0 CTAs write inv_x for every row, the row-tile-0 CTAs inv_w for every W row.
    let mut out = unsafe { HeadForward::alloc_uninit(dev, shape, job.n_valid) }?;
    let saved = unsafe {
        AttnSaved {
            u: Tensor::uninit(dev, &[b, d])?,
            inv_x: Tensor::uninit(dev, &[b])?,
            inv_w: Tensor::uninit(dev, &[c * k])?,
        }
    };
    // SAFETY: as c_iy above (attn_fwd's valid rows, attn_combine_fwd's ignored rows).
    out.k_iy = if k > 1 { Some(unsafe { Tensor::<u32>::uninit(dev, &[b]) }?) } else { None };
    let k_iy = out.k_iy.as_ref().map_or(crate::cuda::DevPtr::NULL, |t| t.ptr());
    // The tiles write part and opart for every (split, row < B), and swh for every (split,
    // column < D) when ls > 0, the only case in which the combine reads it.
    let part = scratch.take(dev, Slot::Part, &[3 * splits * b])?;
    let opart =
        scratch.take(dev, Slot::Opart, &[plan::attn_partials_len(shape, k, splits, bwd_row_splits)])?;
    let swh = scratch.take(dev, Slot::Swh, &[splits * d])?;
    let total = scratch.take(dev, Slot::Total, &[1])?;
    let tiles = plan::attn_fwd(
        T::DTYPE,
        shape,
        k,
        (splits, per),
        vectorized(inp.x, inp.w, d, scalar),
        AttnFwdArgs {
            x: inp.x.ptr(),
            w: inp.w.ptr(),
            labels: inp.labels.ptr(),
            sigma: job.sigma.ptr(),
            inv_x: saved.inv_x.ptr(),
            inv_w: saved.inv_w.ptr(),
            part: part.ptr(),
            opart: opart.ptr(),
            swh: swh.ptr(),
            c_iy: out.c_iy.ptr(),
            t: out.t.ptr(),
            alpha: out.alpha.ptr(),
            dt: out.dt.ptr(),
            k_iy,
            p,
            ..Default::default()
        },
    )?;
    let combine = plan::attn_combine(
        T::DTYPE,
        shape,
        k,
        splits,
        AttnCombineArgs {
            x: inp.x.ptr(),
            w: inp.w.ptr(),
            labels: inp.labels.ptr(),
            inv_x: saved.inv_x.ptr(),
            inv_w: saved.inv_w.ptr(),
            part: part.ptr(),
            opart: opart.ptr(),
            swh: swh.ptr(),
            t: out.t.ptr(),
            lse: out.lse.ptr(),
            loss: out.row_loss.ptr(),
            c_iy: out.c_iy.ptr(),
            alpha: out.alpha.ptr(),
            dt: out.dt.ptr(),
            u: saved.u.ptr(),
            k_iy,
            p,
            ..Default::default()
        },
    )?;
    let reduce = (!defer_reduce).then(|| job.reduce(&out, &total));
    // SAFETY: x [B, D], w [C*K, D] (the cp.async kernels only when D and both base addresses
    // allow 16-byte chunks, checked in `vectorized`), labels/outputs [B] (k_iy [B] or null
    // with K = 1), sigma [C] (unread when the cloud is off), inv_w [C*K], part [3, splits, B],
    // opart [splits, B, D], swh [splits, D] and u [B, D] with splits = the tile kernel's
    // grid.y (plan::attn_splits_k, used by both); labels < C (HeadOn::check); D and K within
    // the kernels' limits (plan::attn_fwd refuses others); every output a distinct buffer;
    // the dynamic shared memory is the kernel's (plan::attn_smem_bytes).
    unsafe { dev.run(&[Some(tiles), Some(combine), reduce].into_iter().flatten().collect::<Vec<_>>()) }?;
    scratch.put(Slot::Part, part);
    scratch.put(Slot::Opart, opart);
    scratch.put(Slot::Swh, swh);
    out.attn = Some(saved);
    Ok(ForwardLaunched { out, total, inv: None, deferred_reduce: defer_reduce.then_some(job.scale) })
}

/// A `[rows, d]` gradient in the asked dtype, uninitialized, and its two kernel pointers
/// (storage dtype, f32): exactly one is non-null.
///
/// # Safety
/// The kernel must write every element before it is read.
unsafe fn grad_out<T: DeviceElem>(
    dev: &Device,
    f32_grads: bool,
    rows: usize,
    d: usize,
) -> Result<GradTensor<T>> {
    // SAFETY: forwarded from the caller.
    Ok(if f32_grads {
        GradTensor::F32(unsafe { Tensor::uninit(dev, &[rows, d]) }?)
    } else {
        GradTensor::Input(unsafe { Tensor::uninit(dev, &[rows, d]) }?)
    })
}

fn grad_ptrs<T: DeviceElem>(g: &GradTensor<T>) -> (crate::cuda::DevPtr, crate::cuda::DevPtr) {
    match g {
        GradTensor::Input(t) => (t.ptr(), crate::cuda::DevPtr::NULL),
        GradTensor::F32(t) => (crate::cuda::DevPtr::NULL, t.ptr()),
    }
}

/// The attention-form backward's launch choices.
pub(super) struct BwdChoice {
    /// (row splits, x row tiles per split): [`plan::attn_bwd_row_splits`] or the tuning's.
    pub row_splits: (usize, usize),
    /// The forward's class splits (with the row splits, they size the shared partials buffer).
    pub class_splits: usize,
    /// Element loads even where 16-byte cp.async would do.
    pub scalar: bool,
}

/// The attention-form backward: dW from one launch over (class tiles, row splits), dx =
/// w_i u_i, and with `reduce = Some((scale, total))` the forward's deferred loss reduction
/// into `total`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: DeviceElem>(
    dev: &Device,
    inp: &Inputs<'_, T>,
    fwd: &HeadForward,
    saved: &AttnSaved,
    up: Upstream<'_>,
    grad_dtype: GradDtype,
    choice: BwdChoice,
    reduce: Option<(f32, crate::cuda::DevPtr)>,
    scratch: &mut Scratch,
) -> Result<Grads<T>> {
    let BwdChoice { row_splits, class_splits, scalar } = choice;
    let (shape, p, k) = (inp.shape, inp.p, inp.k);
    let HeadShape { b, c, d } = shape;
    let f32_grads = grad_dtype == GradDtype::F32 || T::DTYPE == DType::F32;
    // SAFETY: attn_bwd writes every element of dx (rows i < B over the grid-stride loop of
    // its >= 1 CTAs) and of dW (each W row by the CTA of its class tile, every column < D).
    let (dx, dw) =
        unsafe { (grad_out::<T>(dev, f32_grads, b, d)?, grad_out::<T>(dev, f32_grads, c * k, d)?) };
    let k_iy = match (&fwd.k_iy, k) {
        (_, 1) => crate::cuda::DevPtr::NULL,
        (Some(t), _) => t.ptr(),
        (None, _) => {
            return Err(crate::error::Error::InvalidConfig(
                "a forward with one center per class cannot feed a backward with sub-centers".into(),
            ))
        }
    };
    let ((dxp, dx32), (dwp, dw32)) = (grad_ptrs(&dx), grad_ptrs(&dw));
    // Row splits: each split's CTAs write their dW partials for every (W row, column < D)
    // before any CTA reads them (the last of a class tile, after the counter says all wrote).
    let split = row_splits.0 > 1;
    let len = plan::attn_partials_len(shape, k, class_splits, row_splits.0);
    let dwpart = if split { Some(scratch.take(dev, Slot::Opart, &[len])?) } else { None };
    let counters = if split {
        Some(scratch.take_counters(dev, plan::attn_bwd_class_tiles(T::DTYPE, shape, k))?)
    } else {
        None
    };
    let l = plan::attn_bwd(
        T::DTYPE,
        shape,
        k,
        row_splits,
        vectorized(inp.x, inp.w, d, scalar),
        AttnBwdArgs {
            x: inp.x.ptr(),
            w: inp.w.ptr(),
            labels: inp.labels.ptr(),
            inv_x: saved.inv_x.ptr(),
            inv_w: saved.inv_w.ptr(),
            t: fwd.t.ptr(),
            dt: fwd.dt.ptr(),
            lse: fwd.lse.ptr(),
            row_g: up.row_g.map_or(crate::cuda::DevPtr::NULL, |g| g.ptr()),
            u: saved.u.ptr(),
            loss_rows: fwd.row_loss.ptr(),
            total: reduce.map_or(crate::cuda::DevPtr::NULL, |r| r.1),
            loss_scale: reduce.map_or(0.0, |r| r.0),
            k_iy,
            dwpart: dwpart.as_ref().map_or(crate::cuda::DevPtr::NULL, |t| t.ptr()),
            counters: counters.as_ref().map_or(crate::cuda::DevPtr::NULL, |t| t.ptr()),
            dx: dxp,
            dx32,
            dw: dwp,
            dw32,
            p,
            g_scale: up.g_scale,
            ..Default::default()
        },
    )?;
    // SAFETY: x [B, D], w [C*K, D] (cp.async kernels only when allowed, see `vectorized`),
    // per-row inputs [B] from a forward at this shape (HeadOn::call checks it; k_iy [B] when
    // K > 1, checked above), inv_w [C*K], u [B, D]; exactly one of dx / dx32 and one of
    // dw / dw32 non-null, each [B, D] / [C*K, D]
    // in its dtype; all distinct buffers; the dynamic shared memory is the kernel's; total,
    // when set, is the forward's [1] loss buffer and row_loss its [B] row losses; with row
    // splits (grid.y > 1) dwpart holds at least [grid.y, C*K, D] f32 (attn_partials_len) and
    // counters [grid.x] u32, all 0.
    let launched = unsafe { dev.launch(&l) };
    if let Some(t) = dwpart {
        scratch.put(Slot::Opart, t);
    }
    if let (Some(t), Ok(())) = (counters, &launched) {
        scratch.put_counters(t);
    }
    launched?;
    Ok(Grads { dx, dw })
}
