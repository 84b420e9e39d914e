//! Measurement tools for `featcloud bench`: CUDA-event timing with the L2
//! flushed between repetitions, the memory pool's high-water mark (measured
//! extra device memory), the cuBLAS GEMMs that set the floor and the peak, and
//! the SPEC section 9 shapes ([`SHAPES`]) that the CLI and `benches/head.rs` run.

use super::gemm_plan::{head_gemms, ColGemm};
use super::{cuda_err, Device, DeviceElem, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::HeadShape;
use cudarc::cublas::sys as cb;
use cudarc::driver::{sys as cu, CudaSlice, DevicePtr, DevicePtrMut};
use serde::Serialize;
use std::ffi::c_void;

/// Bytes written between timed repetitions to evict the L2 (larger than any current L2).
pub const L2_FLUSH_BYTES: usize = 256 << 20;

/// Times GPU work with CUDA events, flushing the L2 before each repetition.
pub struct Timer<'a> {
    dev: &'a Device,
    flush: CudaSlice<u8>,
}

/// Median, min and max of the repetitions, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Timing {
    /// Median over the repetitions.
    pub median_ms: f64,
    /// Fastest repetition.
    pub min_ms: f64,
    /// Slowest repetition.
    pub max_ms: f64,
    /// Number of timed repetitions.
    pub reps: usize,
}

impl<'a> Timer<'a> {
    /// Allocates the flush buffer.
    pub fn new(dev: &'a Device) -> Result<Self> {
        let flush = dev.stream()?.alloc_zeros::<u8>(L2_FLUSH_BYTES).map_err(cuda_err("L2 flush buffer"))?;
        Ok(Self { dev, flush })
    }

    /// Runs `f` `warmup` times, then `reps` times with the L2 flushed before each and
    /// an event pair around each; returns the statistics.
    pub fn time(&mut self, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
        for _ in 0..warmup {
            f()?;
        }
        let ctx = self.dev.context()?;
        let stream = self.dev.stream()?;
        let flags = Some(cu::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            stream.memset_zeros(&mut self.flush).map_err(cuda_err("L2 flush"))?;
            let start = ctx.new_event(flags).map_err(cuda_err("event"))?;
            let end = ctx.new_event(flags).map_err(cuda_err("event"))?;
            start.record(stream).map_err(cuda_err("event record"))?;
            f()?;
            end.record(stream).map_err(cuda_err("event record"))?;
            end.synchronize().map_err(cuda_err("event sync"))?;
            times.push(start.elapsed_ms(&end).map_err(cuda_err("elapsed"))? as f64);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let n = times.len();
        let median = if n % 2 == 1 { times[n / 2] } else { 0.5 * (times[n / 2 - 1] + times[n / 2]) };
        Ok(Timing { median_ms: median, min_ms: times[0], max_ms: times[n - 1], reps: n })
    }
}

/// Peak device memory that `f` allocated from the stream-ordered pool (which every
/// cudarc allocation on this device uses), above what was in use before it ran.
pub fn measure_extra_memory(dev: &Device, f: impl FnOnce() -> Result<()>) -> Result<usize> {
    dev.stream()?; // a GPU only: the emulated device has no memory pool
    dev.synchronize()?;
    let mut pool: cu::CUmemoryPool = std::ptr::null_mut();
    let ordinal = dev.info().ordinal as cu::CUdevice;
    // SAFETY: queries the device's default pool into a valid out-pointer.
    unsafe { cu::cuDeviceGetDefaultMemPool(&mut pool, ordinal) }
        .result()
        .map_err(cuda_err("default pool"))?;
    let attr = |a: cu::CUmemPool_attribute| -> Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: USED_MEM_* attributes are u64 (cuuint64_t) values.
        unsafe { cu::cuMemPoolGetAttribute(pool, a, &mut v as *mut u64 as *mut c_void) }
            .result()
            .map_err(cuda_err("pool attribute"))?;
        Ok(v)
    };
    let before = attr(cu::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
    let mut zero: u64 = 0;
    // SAFETY: resetting the high-water mark takes a u64 zero.
    unsafe {
        cu::cuMemPoolSetAttribute(
            pool,
            cu::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            &mut zero as *mut u64 as *mut c_void,
        )
    }
    .result()
    .map_err(cuda_err("pool reset"))?;
    f()?;
    dev.synchronize()?;
    let high = attr(cu::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
    Ok(high.saturating_sub(before) as usize)
}

fn data_type(dtype: DType) -> cb::cudaDataType {
    match dtype {
        DType::F32 => cb::cudaDataType::CUDA_R_32F,
        DType::BF16 => cb::cudaDataType::CUDA_R_16BF,
        DType::F16 => cb::cudaDataType::CUDA_R_16F,
    }
}

/// One column-major GEMM `C = op(A) op(B)` (see [`ColGemm`]) with f32 accumulation,
/// all operands of dtype T.
pub fn gemm<T: DeviceElem>(
    dev: &Device,
    plan: ColGemm,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
    c: &mut CudaSlice<T>,
) -> Result<()> {
    let op = |t| if t { cb::cublasOperation_t::CUBLAS_OP_T } else { cb::cublasOperation_t::CUBLAS_OP_N };
    plan.check(a.len(), b.len(), c.len())?;
    let [m, n, k, lda, ldb, ldc] = plan.ints();
    let blas = dev.cublas()?;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let dt = data_type(T::DTYPE);
    let stream = dev.stream()?;
    let (pa, _ga) = a.device_ptr(stream);
    let (pb, _gb) = b.device_ptr(stream);
    let (pc, _gc) = c.device_ptr_mut(stream);
    // SAFETY: plan.check above: every dimension positive and within int, leading dimensions
    // at least the stored rows, and a, b, c hold at least the elements the plan touches;
    // pointers are live device buffers on the handle's stream; alpha/beta are f32 as
    // CUBLAS_COMPUTE_32F requires.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op(plan.trans_a),
            op(plan.trans_b),
            m,
            n,
            k,
            &alpha as *const f32 as *const c_void,
            pa as *const c_void,
            dt,
            lda,
            pb as *const c_void,
            dt,
            ldb,
            &beta as *const f32 as *const c_void,
            pc as *mut c_void,
            dt,
            ldc,
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::Cublas { context: format!("gemm m={m} n={n} k={k}"), message: e.to_string() })
}

/// Buffers for the three B x D x C products of a head's forward and backward.
pub struct ThreeGemm<T: DeviceElem> {
    x: Tensor<T>,
    w: Tensor<T>,
    logits: Tensor<T>,
    dx: Tensor<T>,
    dw: Tensor<T>,
    b: usize,
    c: usize,
    d: usize,
}

impl<T: DeviceElem> ThreeGemm<T> {
    /// Allocates random-ish inputs and the outputs for shape (B, D, C).
    pub fn new(dev: &Device, b: usize, d: usize, c: usize) -> Result<Self> {
        let fill = |n: usize, salt: usize| -> Vec<f32> {
            (0..n).map(|i| (((i * 2654435761 + salt) % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect()
        };
        Ok(Self {
            x: Tensor::from_f32(dev, &fill(b * d, 1), &[b, d])?,
            w: Tensor::from_f32(dev, &fill(c * d, 2), &[c, d])?,
            logits: Tensor::zeros(dev, &[b, c])?,
            dx: Tensor::zeros(dev, &[b, d])?,
            dw: Tensor::zeros(dev, &[c, d])?,
            b,
            c,
            d,
        })
    }

    /// logits = X W^T, dX = G W, dW = G^T X (G = the logits buffer), row-major,
    /// i.e. exactly the GEMM work of one fwd+bwd and nothing else.
    pub fn run(&mut self, dev: &Device) -> Result<()> {
        let (b, c, d) = (self.b, self.c, self.d);
        // The head's three products, mapped onto column-major calls by head_gemms.
        let [logits, dx, dw] = head_gemms(HeadShape { b, c, d });
        gemm(dev, logits, self.w.cuda_slice()?, self.x.cuda_slice()?, self.logits.cuda_slice_mut()?)?;
        gemm(dev, dx, self.w.cuda_slice()?, self.logits.cuda_slice()?, self.dx.cuda_slice_mut()?)?;
        gemm(dev, dw, self.x.cuda_slice()?, self.logits.cuda_slice()?, self.dw.cuda_slice_mut()?)?;
        Ok(())
    }
}

/// Square n x n x n GEMM throughput in TFLOP/s (2 n^3 / time), the chip's measured peak.
pub fn gemm_peak_tflops<T: DeviceElem>(
    dev: &Device,
    n: usize,
    warmup: usize,
    reps: usize,
) -> Result<(f64, Timing)> {
    let a = Tensor::<T>::from_f32(dev, &vec![0.01; n * n], &[n, n])?;
    let bm = Tensor::<T>::from_f32(dev, &vec![0.02; n * n], &[n, n])?;
    let mut cm = Tensor::<T>::zeros(dev, &[n, n])?;
    let mut timer = Timer::new(dev)?;
    let t = timer.time(warmup, reps, || {
        gemm(
            dev,
            ColGemm::row_major(false, false, n, n, n),
            a.cuda_slice()?,
            bm.cuda_slice()?,
            cm.cuda_slice_mut()?,
        )
    })?;
    Ok((2.0 * (n as f64).powi(3) / (t.median_ms * 1e-3) / 1e12, t))
}

/// One SPEC section 9 shape with its peers' numbers from the SPEC table.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BenchShape {
    /// Short name.
    pub name: &'static str,
    /// Rows.
    pub b: usize,
    /// Embedding dimension.
    pub d: usize,
    /// Classes.
    pub c: usize,
    /// torch.compile ms per fwd+bwd (SPEC table, H200, bf16).
    pub torch_compile_ms: f64,
    /// Cut Cross-Entropy extra MiB (SPEC table).
    pub cce_mib: f64,
    /// Launch-bound shape (target 20x torch.compile instead of 2x).
    pub small: bool,
}

/// The SPEC section 9 shapes.
pub const SHAPES: [BenchShape; 5] = [
    BenchShape { name: "reid", b: 64, d: 2048, c: 751, torch_compile_ms: 1.12, cce_mib: 15.0, small: true },
    BenchShape { name: "lt", b: 512, d: 2048, c: 1000, torch_compile_ms: 1.13, cce_mib: 22.0, small: true },
    BenchShape {
        name: "face-93k",
        b: 512,
        d: 512,
        c: 93431,
        torch_compile_ms: 1.54,
        cce_mib: 461.0,
        small: false,
    },
    BenchShape {
        name: "face-360k",
        b: 1024,
        d: 512,
        c: 360232,
        torch_compile_ms: 5.87,
        cce_mib: 1762.0,
        small: false,
    },
    BenchShape {
        name: "face-1m",
        b: 2048,
        d: 512,
        c: 1_000_000,
        torch_compile_ms: 30.1,
        cce_mib: 4889.0,
        small: false,
    },
];
