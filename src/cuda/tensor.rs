//! Typed device tensors: a cudarc buffer plus a row-major shape.

use super::{cuda_err, Device};
use crate::config::DType;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

/// An element type the kernels take: f32, bf16 or f16 storage.
pub trait DeviceElem: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + Unpin + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// Narrows from f32 with round-to-nearest-even (what the kernels do).
    fn from_f32(v: f32) -> Self;
}

impl DeviceElem for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl DeviceElem for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

impl DeviceElem for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// A row-major device tensor of `T`.
#[derive(Debug)]
pub struct Tensor<T: DeviceElem> {
    buf: CudaSlice<T>,
    shape: Vec<usize>,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<T: DeviceElem> Tensor<T> {
    /// Copies `data` (row-major, `shape`) to the device.
    pub fn from_host(dev: &Device, data: &[T], shape: &[usize]) -> Result<Self> {
        if data.len() != numel(shape) {
            return Err(Error::Shape(format!("{} elements for shape {shape:?}", data.len())));
        }
        let buf = dev.stream().clone_htod(data).map_err(cuda_err("host-to-device copy"))?;
        Ok(Self { buf, shape: shape.to_vec() })
    }

    /// Rounds f32 host data to `T` and copies it to the device.
    pub fn from_f32(dev: &Device, data: &[f32], shape: &[usize]) -> Result<Self> {
        let v: Vec<T> = data.iter().map(|&x| T::from_f32(x)).collect();
        Self::from_host(dev, &v, shape)
    }

    /// A zero-filled tensor.
    pub fn zeros(dev: &Device, shape: &[usize]) -> Result<Self> {
        let buf = dev.stream().alloc_zeros::<T>(numel(shape).max(1)).map_err(cuda_err("allocation"))?;
        Ok(Self { buf, shape: shape.to_vec() })
    }

    /// A tensor whose contents are left uninitialized (no memset pass over it).
    ///
    /// # Safety
    /// Every element must be written (by a kernel on this device's stream) before
    /// anything reads it; until then its contents are arbitrary bits.
    pub unsafe fn uninit(dev: &Device, shape: &[usize]) -> Result<Self> {
        // SAFETY: the caller promises to write every element before it is read.
        let buf = unsafe { dev.stream().alloc::<T>(numel(shape).max(1)) }.map_err(cuda_err("allocation"))?;
        Ok(Self { buf, shape: shape.to_vec() })
    }

    /// Wraps an existing buffer (its length must be at least the shape's size).
    pub fn from_slice(buf: CudaSlice<T>, shape: &[usize]) -> Result<Self> {
        if buf.len() < numel(shape) {
            return Err(Error::Shape(format!("buffer of {} for shape {shape:?}", buf.len())));
        }
        Ok(Self { buf, shape: shape.to_vec() })
    }

    /// Copies the tensor back to the host.
    pub fn to_host(&self, dev: &Device) -> Result<Vec<T>> {
        let mut v = dev.stream().clone_dtoh(&self.buf).map_err(cuda_err("device-to-host copy"))?;
        v.truncate(self.len());
        Ok(v)
    }

    /// Copies the tensor back to the host as f32.
    pub fn to_f32_host(&self, dev: &Device) -> Result<Vec<f32>> {
        Ok(self.to_host(dev)?.into_iter().map(T::to_f32).collect())
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        numel(&self.shape)
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Storage dtype.
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }

    /// The underlying buffer.
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.buf
    }

    /// The underlying buffer, mutable.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.buf
    }
}
