//! Row L2 norms on the device (`kernels/norms.cu`).

use super::kernels::norms as k;
use super::{cuda_err, Device, DeviceElem, Kernel, Tensor};
use crate::config::DType;
use crate::error::{Error, Result};
use cudarc::driver::{LaunchConfig, PushKernelArg};

const WARPS_PER_BLOCK: u32 = 8;

fn kernel_for(dtype: DType) -> Kernel {
    match dtype {
        DType::F32 => k::ROW_NORMS_F32,
        DType::BF16 => k::ROW_NORMS_BF16,
        DType::F16 => k::ROW_NORMS_F16,
    }
}

/// Norms and inverse norms (1 / max(norm, 1e-12)) of the rows of a 2-D tensor.
pub fn row_norms<T: DeviceElem>(dev: &Device, x: &Tensor<T>) -> Result<(Tensor<f32>, Tensor<f32>)> {
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
    let mut norm = Tensor::<f32>::zeros(dev, &[rows])?;
    let mut inv = Tensor::<f32>::zeros(dev, &[rows])?;
    let f = dev.function(kernel_for(T::DTYPE))?;
    let cfg = LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(WARPS_PER_BLOCK), 1, 1),
        block_dim: (WARPS_PER_BLOCK * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, d_i) = (rows as i32, d as i32);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x.slice()).arg(norm.slice_mut()).arg(inv.slice_mut()).arg(&rows_i).arg(&d_i);
    // SAFETY: x holds rows*d elements of T (checked by Tensor's shape), norm and inv
    // hold `rows` f32 each and do not alias x; the grid covers every row once.
    unsafe { b.launch(cfg) }.map_err(cuda_err("norms::row_norms"))?;
    Ok((norm, inv))
}
