//! Row L2 norms on the device (`kernels/norms.cu`).

use super::args::RowNormsArgs;
use super::kernels::norms as k;
use super::{DevPtr, Device, DeviceElem, Kernel, Launch, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Rows per block: one warp per row, 8 warps.
const WARPS_PER_BLOCK: usize = 8;

fn kernel_for(dtype: DType) -> Kernel {
    match dtype {
        DType::F32 => k::ROW_NORMS_F32,
        DType::BF16 => k::ROW_NORMS_BF16,
        DType::F16 => k::ROW_NORMS_F16,
    }
}

/// The launch computing the norms and/or inverse norms of `rows` rows of `d`
/// elements of `dtype` at `x` (either output may be [`DevPtr::NULL`]).
pub fn row_norms_launch(dtype: DType, rows: usize, d: usize, x: DevPtr, norm: DevPtr, inv: DevPtr) -> Launch {
    let a = RowNormsArgs { x, norm, inv, rows: rows as i32, d: d as i32 };
    Launch::linear(kernel_for(dtype), rows.div_ceil(WARPS_PER_BLOCK), (WARPS_PER_BLOCK * 32) as u32, &a)
}

fn rows_d<T: DeviceElem>(x: &Tensor<T>) -> Result<(usize, usize)> {
    let [rows, d] = x.shape() else {
        return Err(Error::Shape(format!("row_norms wants a 2-D tensor, got {:?}", x.shape())));
    };
    let (rows, d) = (*rows, *d);
    if rows == 0 || d == 0 {
        return Err(Error::Empty(format!("row_norms of shape [{rows}, {d}]")));
    }
    if rows > i32::MAX as usize || d > i32::MAX as usize {
        return Err(Error::Shape(format!("row_norms shape [{rows}, {d}] exceeds i32 indexing")));
    }
    Ok((rows, d))
}

/// Norms and inverse norms (1 / max(norm, 1e-12)) of the rows of a 2-D tensor.
pub fn row_norms<T: DeviceElem>(dev: &Device, x: &Tensor<T>) -> Result<(Tensor<f32>, Tensor<f32>)> {
    let (rows, d) = rows_d(x)?;
    // SAFETY (both): row_norms writes both outputs for every row.
    let norm = unsafe { Tensor::<f32>::uninit(dev, &[rows]) }?;
    let inv = unsafe { Tensor::<f32>::uninit(dev, &[rows]) }?;
    let l = row_norms_launch(T::DTYPE, rows, d, x.ptr(), norm.ptr(), inv.ptr());
    // SAFETY: x holds rows*d elements of T (its shape), norm and inv hold `rows` f32 each
    // and do not alias x; the grid covers every row once.
    unsafe { dev.launch(&l) }?;
    Ok((norm, inv))
}

/// Inverse norms only (the norm output is null: not written).
pub fn inv_norms<T: DeviceElem>(dev: &Device, x: &Tensor<T>) -> Result<Tensor<f32>> {
    let (rows, d) = rows_d(x)?;
    // SAFETY: row_norms writes inv for every row.
    let inv = unsafe { Tensor::<f32>::uninit(dev, &[rows]) }?;
    let l = row_norms_launch(T::DTYPE, rows, d, x.ptr(), DevPtr::NULL, inv.ptr());
    // SAFETY: as in row_norms; the kernel skips a null norm pointer.
    unsafe { dev.launch(&l) }?;
    Ok(inv)
}
