//! Typed device tensors: a device buffer (GPU memory through cudarc, or host
//! memory on the emulated device) plus a row-major shape.

use super::emu::EmuBuf;
use super::launch::DevPtr;
use super::{cuda_err, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
use std::panic::Location;

/// A plain element type that device buffers hold (floats, labels, counters).
pub trait DeviceCopy:
    bytemuck::Pod + DeviceRepr + ValidAsZeroBits + Default + Send + Sync + Unpin + 'static
{
    /// Name in messages ("f32", "i32", ...).
    const NAME: &'static str;
}

macro_rules! device_copy {
    ($($t:ty => $n:literal),*) => {$(impl DeviceCopy for $t { const NAME: &'static str = $n; })*};
}
device_copy!(f32 => "f32", i32 => "i32", u32 => "u32", u16 => "u16", u64 => "u64", u8 => "u8", half::bf16 => "bf16", half::f16 => "f16");

/// An element type the kernels take as storage: f32, bf16 or f16.
pub trait DeviceElem: DeviceCopy {
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

/// The 16-bit storage types: `half`'s conversions are exact widening and
/// round-to-nearest-even narrowing, as the kernels' (checked by `emu_selftest_cvt`).
macro_rules! half_elem {
    ($($t:ty => $dtype:ident),*) => {$(
        impl DeviceElem for $t {
            const DTYPE: DType = DType::$dtype;
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
        }
    )*};
}
half_elem!(half::bf16 => BF16, half::f16 => F16);

/// Where a tensor's elements live.
#[derive(Debug)]
enum Storage<T: DeviceCopy> {
    Cuda(CudaSlice<T>),
    Emu(EmuBuf),
}

/// A row-major device tensor of `T`.
#[derive(Debug)]
pub struct Tensor<T: DeviceCopy> {
    buf: Storage<T>,
    shape: Vec<usize>,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<T: DeviceCopy> Tensor<T> {
    #[track_caller]
    fn alloc(dev: &Device, shape: &[usize], zeroed: bool) -> Result<Self> {
        let n = numel(shape).max(1);
        let buf = match dev.emu_state() {
            Some(emu) => Storage::Emu(emu.alloc(
                n * std::mem::size_of::<T>(),
                zeroed,
                format!("{shape:?} {}", T::NAME),
                Location::caller(),
            )?),
            None => {
                let stream = dev.stream()?;
                Storage::Cuda(if zeroed {
                    stream.alloc_zeros::<T>(n).map_err(cuda_err("allocation"))?
                } else {
                    // SAFETY: callers of `uninit` promise to write before reading; `from_host`
                    // writes every element right away.
                    unsafe { stream.alloc::<T>(n) }.map_err(cuda_err("allocation"))?
                })
            }
        };
        dev.counters.allocation();
        Ok(Self { buf, shape: shape.to_vec() })
    }

    /// Copies `data` (row-major, `shape`) to the device.
    #[track_caller]
    pub fn from_host(dev: &Device, data: &[T], shape: &[usize]) -> Result<Self> {
        if data.len() != numel(shape) {
            return Err(Error::Shape(format!("{} elements for shape {shape:?}", data.len())));
        }
        let mut t = Self::alloc(dev, shape, false)?;
        t.copy_from_host(dev, data)?;
        Ok(t)
    }

    /// A zero-filled tensor.
    #[track_caller]
    pub fn zeros(dev: &Device, shape: &[usize]) -> Result<Self> {
        Self::alloc(dev, shape, true)
    }

    /// A tensor whose contents are left uninitialized (no memset pass over it). On the
    /// emulated device they are 0xFF bytes (NaN in every float dtype), so a kernel that
    /// reads an element nobody wrote gives NaN there.
    ///
    /// # Safety
    /// Every element must be written (by a kernel on this device's stream) before
    /// anything reads it; until then its contents are arbitrary bits.
    #[track_caller]
    pub unsafe fn uninit(dev: &Device, shape: &[usize]) -> Result<Self> {
        Self::alloc(dev, shape, false)
    }

    /// Overwrites the first `data.len()` elements with `data` (host to device).
    pub fn copy_from_host(&mut self, dev: &Device, data: &[T]) -> Result<()> {
        let Some(s) = self.upload_target(dev, data, true)? else { return Ok(()) };
        dev.stream()?
            .memcpy_htod(data, &mut s.slice_mut(..data.len()))
            .map_err(cuda_err("host-to-device copy"))
    }

    /// The shared start of every upload of `data` into `self[..data.len()]`: checks that
    /// it fits and counts it; on the emulated device (host memory already) it is one
    /// plain copy, done here. Returns the GPU slice to copy into, `None` when done.
    fn upload_target(
        &mut self,
        dev: &Device,
        data: &[T],
        pageable: bool,
    ) -> Result<Option<&mut CudaSlice<T>>> {
        if data.len() > self.len().max(1) {
            return Err(Error::Shape(format!("{} elements into a tensor of {}", data.len(), self.len())));
        }
        if data.is_empty() {
            return Ok(None);
        }
        dev.counters.htod();
        if pageable {
            dev.counters.htod_pageable();
        }
        match &mut self.buf {
            Storage::Emu(b) => {
                b.bytes_mut()[..std::mem::size_of_val(data)].copy_from_slice(bytemuck::cast_slice(data));
                Ok(None)
            }
            Storage::Cuda(s) => Ok(Some(s)),
        }
    }

    /// `self[..n] = src[..n]` on the device, n = `src.len()` (at most `self.len()`).
    pub fn copy_from(&mut self, dev: &Device, src: &Tensor<T>) -> Result<()> {
        self.copy_from_part(dev, src, src.len())
    }

    /// `self[..n] = src[..n]` on the device (n at most either length).
    pub fn copy_from_part(&mut self, dev: &Device, src: &Tensor<T>, n: usize) -> Result<()> {
        if n > self.len() || n > src.len() {
            return Err(Error::Shape(format!("device copy of {n} elements into {}", self.len())));
        }
        if n == 0 {
            return Ok(());
        }
        match (&mut self.buf, &src.buf) {
            (Storage::Emu(d), Storage::Emu(s)) => {
                let bytes = n * std::mem::size_of::<T>();
                d.bytes_mut()[..bytes].copy_from_slice(&s.bytes()[..bytes]);
                Ok(())
            }
            (Storage::Cuda(d), Storage::Cuda(s)) => dev
                .stream()?
                .memcpy_dtod(&s.slice(..n), &mut d.slice_mut(..n))
                .map_err(cuda_err("device copy")),
            _ => Err(Error::Shape("device copy between an emulated and a real device".into())),
        }
    }

    /// On the emulated device, refills the buffer with the uninitialized pattern (0xFF:
    /// NaN), so that reused scratch shows a kernel that stops writing part of it just as
    /// a fresh allocation would. Nothing on a GPU.
    pub(crate) fn poison_if_emulated(&mut self) {
        if let Storage::Emu(b) = &mut self.buf {
            b.bytes_mut().fill(super::emu::UNINIT_BYTE);
        }
    }

    /// Sets every element to zero.
    pub fn fill_zero(&mut self, dev: &Device) -> Result<()> {
        match &mut self.buf {
            Storage::Emu(b) => {
                b.bytes_mut().fill(0);
                Ok(())
            }
            Storage::Cuda(s) => dev.stream()?.memset_zeros(s).map_err(cuda_err("memset")),
        }
    }

    /// Copies the tensor back to the host (waits for the queued work).
    pub fn to_host(&self, dev: &Device) -> Result<Vec<T>> {
        dev.counters.dtoh();
        let n = self.len();
        match &self.buf {
            Storage::Emu(b) => Ok(bytemuck::pod_collect_to_vec(&b.bytes()[..n * std::mem::size_of::<T>()])),
            Storage::Cuda(s) => {
                let mut v = dev.stream()?.clone_dtoh(s).map_err(cuda_err("device-to-host copy"))?;
                v.truncate(n);
                Ok(v)
            }
        }
    }

    /// The device address of the first element, for a kernel's argument struct.
    pub fn ptr(&self) -> DevPtr {
        match &self.buf {
            Storage::Emu(b) => DevPtr(b.addr() as u64),
            Storage::Cuda(s) => {
                // Event tracking is off on featcloud's contexts (one stream), so the guard
                // returned with the pointer records nothing.
                let (p, _sync) = s.device_ptr(s.stream());
                DevPtr(p)
            }
        }
    }

    /// Elements the allocation holds (at least `len()`, and at least 1).
    pub fn capacity(&self) -> usize {
        match &self.buf {
            Storage::Emu(b) => b.bytes().len() / std::mem::size_of::<T>(),
            Storage::Cuda(s) => s.len(),
        }
    }

    /// The same buffer with another shape of the same or fewer elements.
    pub fn reshaped(mut self, shape: &[usize]) -> Result<Self> {
        let cap = self.capacity();
        if numel(shape) > cap {
            return Err(Error::Shape(format!("buffer of {cap} for shape {shape:?}")));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The cudarc buffer, for GPU-only code (benchmarks); an error on the emulated device.
    pub fn cuda_slice(&self) -> Result<&CudaSlice<T>> {
        match &self.buf {
            Storage::Cuda(s) => Ok(s),
            Storage::Emu(_) => Err(Error::Emulator {
                kernel: "cuda_slice".into(),
                message: "this tensor lives on the emulated device, not a GPU".into(),
            }),
        }
    }

    /// The cudarc buffer, writable, for GPU-only code; an error on the emulated device.
    pub fn cuda_slice_mut(&mut self) -> Result<&mut CudaSlice<T>> {
        match &mut self.buf {
            Storage::Cuda(s) => Ok(s),
            Storage::Emu(_) => Err(Error::Emulator {
                kernel: "cuda_slice_mut".into(),
                message: "this tensor lives on the emulated device, not a GPU".into(),
            }),
        }
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
}

impl<T: DeviceElem> Tensor<T> {
    /// Rounds f32 host data to `T` and copies it to the device.
    #[track_caller]
    pub fn from_f32(dev: &Device, data: &[f32], shape: &[usize]) -> Result<Self> {
        let v: Vec<T> = data.iter().map(|&x| T::from_f32(x)).collect();
        Self::from_host(dev, &v, shape)
    }

    /// Copies the tensor back to the host as f32.
    pub fn to_f32_host(&self, dev: &Device) -> Result<Vec<f32>> {
        Ok(self.to_host(dev)?.into_iter().map(T::to_f32).collect())
    }

    /// Storage dtype.
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }
}

/// Page-locked host memory kept for repeated uploads (a GPU copies from it with DMA,
/// without the driver's staging copy of pageable memory); plain host memory on the
/// emulated device. Grown on demand.
#[derive(Debug, Default)]
pub struct Staging<T: DeviceCopy> {
    pinned: Option<PinnedHostSlice<T>>,
    /// Recorded after each copy from `pinned`: the host waits on it before writing
    /// `pinned` again (or freeing it), since the copy runs asynchronously on the stream.
    /// (cudarc's own event in the pinned slice is recorded only in its multi-stream mode,
    /// which featcloud's one-stream contexts do not use.)
    copied: Option<CudaEvent>,
}

impl<T: DeviceCopy> Staging<T> {
    /// `dst[..data.len()] = data` through the staging buffer (one host-to-device copy).
    pub fn upload(&mut self, dev: &Device, data: &[T], dst: &mut Tensor<T>) -> Result<()> {
        let n = data.len();
        let Some(s) = dst.upload_target(dev, data, false)? else { return Ok(()) };
        // The previous copy from the pinned buffer must have finished before the
        // host overwrites (or frees) it.
        if let Some(e) = &self.copied {
            e.synchronize().map_err(cuda_err("waiting for the previous upload"))?;
        }
        // Exactly n: a pinned slice is copied whole (B is the same every step).
        if self.pinned.as_ref().is_none_or(|p| p.len() != n) {
            self.pinned = None;
            // SAFETY: written below before the copy reads it.
            let p = unsafe { dev.context()?.alloc_pinned::<T>(n) }.map_err(cuda_err("pinned allocation"))?;
            self.pinned = Some(p);
        }
        let pinned = self.pinned.as_mut().expect("allocated above");
        pinned.as_mut_slice().map_err(cuda_err("pinned buffer"))?.copy_from_slice(data);
        let stream = dev.stream()?;
        stream.memcpy_htod(pinned, &mut s.slice_mut(..n)).map_err(cuda_err("host-to-device copy"))?;
        if self.copied.is_none() {
            self.copied = Some(dev.context()?.new_event(None).map_err(cuda_err("event"))?);
        }
        let event = self.copied.as_ref().expect("created above");
        event.record(stream).map_err(cuda_err("event record"))
    }
}
