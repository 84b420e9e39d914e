//! The reference path (`kernels/head_ref.cu` + cuBLAS): normalized f32 copies of x
//! and W, the B x C cosine matrix from one SGEMM, per-row margin and softmax
//! kernels, and for the backward the B x C logit gradient and two more SGEMMs.
//! Simple on purpose: the baseline of the benchmarks and a second oracle on the
//! device.
//!
//! Sub-centers (SPEC 5b): with K per class W has C*K rows, and every matrix above is
//! B x C*K (the GEMMs and the normalization of W run on W's rows unchanged); the margin,
//! softmax and gradient kernels take each class's max over its K columns, the forward
//! writes the target's dominant sub-center k*_iy, and the backward puts each class's
//! gradient on its arg-max column only. The only path of the CUDA head that takes K > 1.

use super::plan;
use super::scratch::{Scratch, Slot};
use super::{ForwardJob, ForwardLaunched, GradDtype, GradTensor, Grads, HeadForward, Inputs, Upstream};
use crate::cuda::args::{NormbackArgs, RefGradArgs, RefMarginArgs, RefNormalizeArgs, RefSoftmaxArgs};
use crate::cuda::gemm_plan::head_gemms;
use crate::cuda::launch::DevPtr;
use crate::cuda::{Device, DeviceElem, Tensor};
use crate::error::Result;
use crate::shape::HeadShape;

/// xh = v / max(||v||, eps) in f32 `[rows, d]`, and the inverse norms `[rows]`; rows whose
/// label in `labels` is negative (x's ignored rows, which may hold anything) get zeros.
fn normalize<T: DeviceElem>(
    dev: &Device,
    v: &Tensor<T>,
    labels: Option<&Tensor<i32>>,
) -> Result<(Tensor<f32>, Tensor<f32>)> {
    let (rows, d) = (v.shape()[0], v.shape()[1]);
    // SAFETY (both): ref_normalize writes every element (one warp per row, every column).
    let vh = unsafe { Tensor::<f32>::uninit(dev, &[rows, d]) }?;
    let inv = unsafe { Tensor::<f32>::uninit(dev, &[rows]) }?;
    let l = plan::ref_normalize(
        T::DTYPE,
        rows,
        d,
        RefNormalizeArgs {
            x: v.ptr(),
            xh: vh.ptr(),
            inv: inv.ptr(),
            labels: labels.map_or(DevPtr::NULL, |l| l.ptr()),
            ..Default::default()
        },
    );
    // SAFETY: v holds rows*d T, vh rows*d f32, inv rows f32 (distinct allocations); one warp
    // per row covers every row once.
    unsafe { dev.launch(&l) }?;
    Ok((vh, inv))
}

/// The reference forward: every per-row output and the reduced loss (on the device).
pub(super) fn forward<T: DeviceElem>(
    dev: &Device,
    inp: &Inputs<'_, T>,
    job: ForwardJob<'_>,
    scratch: &mut Scratch,
) -> Result<ForwardLaunched> {
    let (shape, p, k) = (inp.shape, inp.p, inp.k);
    // Zeroed: the margin and softmax kernels skip the ignored rows.
    let mut out = HeadForward::alloc_zeroed(dev, shape, job.n_valid)?;
    // SAFETY: ref_margin writes k_iy for every row (0 for the ignored ones).
    let k_iy = unsafe { Tensor::<u32>::uninit(dev, &[shape.b]) }?;
    let (xh, _inv_x) = normalize(dev, inp.x, Some(inp.labels))?;
    let (wh, _inv_w) = normalize(dev, inp.w, None)?;
    let cos = cos_gemm(dev, &xh, &wh, w_rows(shape, k))?;
    let margin = plan::ref_margin(
        T::DTYPE,
        shape,
        k,
        RefMarginArgs {
            x: inp.x.ptr(),
            w: inp.w.ptr(),
            labels: inp.labels.ptr(),
            sigma: job.sigma.ptr(),
            p,
            c_iy: out.c_iy.ptr(),
            t: out.t.ptr(),
            alpha: out.alpha.ptr(),
            dt: out.dt.ptr(),
            k_iy: k_iy.ptr(),
            ..Default::default()
        },
    );
    let softmax = plan::ref_softmax(
        shape,
        k,
        RefSoftmaxArgs {
            cos: cos.ptr(),
            labels: inp.labels.ptr(),
            t: out.t.ptr(),
            p,
            lse: out.lse.ptr(),
            loss: out.row_loss.ptr(),
            ..Default::default()
        },
    );
    let total = scratch.take(dev, Slot::Total, &[1])?;
    let reduce = job.reduce(&out, &total);
    // SAFETY: x is [B, D], w [C*K, D] (k = K, HeadOn::check); labels, c_iy, t, alpha, dt,
    // k_iy, lse, loss hold B entries and sigma C whenever the cloud is on; labels are < C, so
    // the target's rows y*K .. y*K + K-1 lie in W; cos is [B, C*K]; every output is a distinct
    // allocation; one thread per row (margin), one block per row (softmax), one block (reduce).
    unsafe { dev.run(&[margin, softmax, reduce]) }?;
    out.k_iy = Some(k_iy);
    Ok(ForwardLaunched { out, total, inv: None, deferred_reduce: None })
}

/// The shape of the products over W's rows: B, C*K, D (`shape` counts classes).
fn w_rows(shape: HeadShape, k: usize) -> HeadShape {
    HeadShape { c: shape.c * k, ..shape }
}

/// cos [B, R] = xh [B, D] . wh [R, D]^T (cuBLAS SGEMM), R = `shape.c` rows of W.
fn cos_gemm(dev: &Device, xh: &Tensor<f32>, wh: &Tensor<f32>, shape: HeadShape) -> Result<Tensor<f32>> {
    // SAFETY: beta = 0: cuBLAS writes every element of C without reading it.
    let mut cos = unsafe { Tensor::<f32>::uninit(dev, &[shape.b, shape.c]) }?;
    dev.gemm(&head_gemms(shape)[0], wh, xh, &mut cos, 1.0, 0.0, "reference cos GEMM")?;
    Ok(cos)
}

/// The reference backward: dc [B, C], then dxh = dc wh and dwh = dc^T xh (SGEMM), then
/// the normalization backward of each.
pub(super) fn backward<T: DeviceElem>(
    dev: &Device,
    inp: &Inputs<'_, T>,
    fwd: &HeadForward,
    up: Upstream<'_>,
    grad_dtype: GradDtype,
) -> Result<Grads<T>> {
    let (shape, p, k) = (inp.shape, inp.p, inp.k);
    let rows = w_rows(shape, k);
    // C*K columns: W's rows (`c` here counts them, not the classes).
    let HeadShape { b, c, d } = rows;
    let k_iy = match (&fwd.k_iy, k) {
        (Some(t), _) => t.ptr(),
        (None, 1) => DevPtr::NULL,
        (None, _) => {
            return Err(crate::error::Error::InvalidConfig(format!(
                "head.subcenters = {k}: the backward needs the target sub-centers of a reference-path forward"
            )))
        }
    };
    let (xh, inv_x) = normalize(dev, inp.x, Some(inp.labels))?;
    let (wh, inv_w) = normalize(dev, inp.w, None)?;
    let cos = cos_gemm(dev, &xh, &wh, rows)?;
    // SAFETY: ref_grad_bwd_f32 writes every (i, col) of dc (grid covers C*K x B, bounds-checked).
    let dc = unsafe { Tensor::<f32>::uninit(dev, &[b * c]) }?;
    let grad = plan::ref_grad(
        shape,
        k,
        RefGradArgs {
            cos: cos.ptr(),
            labels: inp.labels.ptr(),
            t: fwd.t.ptr(),
            dt: fwd.dt.ptr(),
            lse: fwd.lse.ptr(),
            k_iy,
            row_g: up.row_g.map_or(crate::cuda::DevPtr::NULL, |g| g.ptr()),
            g_scale: up.g_scale,
            p,
            dc: dc.ptr(),
            ..Default::default()
        },
    );
    // SAFETY: cos and dc are [B, C*K] (B <= 65535 checked: grid.y), labels, t, dt, lse,
    // k_iy (or null, K = 1 only: not read then; else values < K from ref_margin) and row_g
    // (or null) hold B entries; dc is a fresh allocation.
    unsafe { dev.launch(&grad) }?;
    drop(cos);
    let [_, dx_plan, dw_plan] = head_gemms(rows);
    // SAFETY (both): beta = 0, cuBLAS writes every element.
    let mut dxh = unsafe { Tensor::<f32>::uninit(dev, &[b * d]) }?;
    let mut dwh = unsafe { Tensor::<f32>::uninit(dev, &[c * d]) }?;
    dev.gemm(&dx_plan, &wh, &dc, &mut dxh, 1.0, 0.0, "reference dx GEMM")?;
    dev.gemm(&dw_plan, &xh, &dc, &mut dwh, 1.0, 0.0, "reference dW GEMM")?;
    let dx = normback(dev, &dxh, 1, inp.x, &inv_x, Some(inp.labels), grad_dtype, b, d)?;
    let dw = normback(dev, &dwh, 1, inp.w, &inv_w, None, grad_dtype, c, d)?;
    Ok(Grads { dx, dw })
}

/// out = (g - u (u . g)) * inv with g the sum of `nparts` f32 partials `[nparts, rows, d]`
/// of the gradient of the normalized rows of `v`; in f32 or the storage dtype. Rows whose label
/// in `labels` is negative (x's ignored rows) get zeros.
#[allow(clippy::too_many_arguments)]
pub(super) fn normback<T: DeviceElem>(
    dev: &Device,
    parts: &Tensor<f32>,
    nparts: usize,
    v: &Tensor<T>,
    inv: &Tensor<f32>,
    labels: Option<&Tensor<i32>>,
    grad_dtype: GradDtype,
    rows: usize,
    d: usize,
) -> Result<GradTensor<T>> {
    let out_f32 = grad_dtype == GradDtype::F32 || T::DTYPE == crate::dtype::DType::F32;
    let out = if out_f32 {
        // SAFETY: the kernel writes every element (one warp per row, every column).
        GradTensor::F32(unsafe { Tensor::<f32>::uninit(dev, &[rows, d]) }?)
    } else {
        // SAFETY: as above.
        GradTensor::Input(unsafe { Tensor::<T>::uninit(dev, &[rows, d]) }?)
    };
    let out_ptr = match &out {
        GradTensor::F32(t) => t.ptr(),
        GradTensor::Input(t) => t.ptr(),
    };
    let args = NormbackArgs {
        parts: parts.ptr(),
        x: v.ptr(),
        inv: inv.ptr(),
        out: out_ptr,
        labels: labels.map_or(DevPtr::NULL, |l| l.ptr()),
        ..Default::default()
    };
    let l = plan::normback(T::DTYPE, out_f32, rows, d, nparts, args);
    // SAFETY: parts holds nparts*rows*d f32, v rows*d T, inv rows f32, out rows*d in the
    // kernel's output dtype (the kernel is picked by T and out_f32 together); distinct buffers.
    unsafe { dev.launch(&l) }?;
    Ok(out)
}
