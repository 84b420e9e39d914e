//! The training engine's [`Backend`] on one GPU (`kernels/train_ops.cu` + cuBLAS +
//! the head and statistics kernels). The CPU twin is [`crate::cpu::CpuBackend`];
//! every operation here computes what the CPU one does (see its docs) and
//! `tests/backend_cuda.rs` holds each against it.
//!
//! - GEMMs: cuBLAS `cublasGemmEx`, row-major operands mapped onto column-major
//!   (see [`CudaBackend::gemm`]); f32 in and out with [`Precision::F32`], bf16
//!   copies of both operands with f32 output and f32 accumulation with
//!   [`Precision::Bf16`];
//! - bias + activation, the f32 -> bf16 cast and the optimizers: `train_ops.cu`
//!   (the optimizer updates are bitwise the CPU's: see the kernel file's header);
//! - the margin head: [`crate::cuda::head::CudaHead`] (fused path by default) in
//!   f32 or on bf16 copies of the f32 master embeddings and class weights, with
//!   f32 gradients either way; with sub-centers (SPEC 5b) on the fused path's attention
//!   form where it takes them, else on the reference path ([`CudaBackend::head_path_for`]);
//! - class statistics: [`ClassStats`], converted to and from the host
//!   [`StatsState`] for checkpoints.
//!
//! Mixed precision ([`Precision::Bf16`], the default): every buffer the engine
//! holds (parameters, gradients, optimizer state, activations) is f32; only the
//! operands of the GEMMs and of the head are rounded to bf16, into temporary
//! copies made right before each product. The master weights never lose
//! precision to the copies.
//!
//! Determinism: every launch goes to the device's one stream; cuBLAS gives the
//! same bits run after run on the same GPU model (its default, atomics-free
//! mode), the head and the statistics are deterministic by design (SPEC 4, 5), and
//! the kernels here use no atomics. Two runs with the same inputs are bitwise equal.
//!
//! ```no_run
//! # use featcloud::cuda::{Device, backend::{CudaBackend, Precision}};
//! # use featcloud::engine::Backend;
//! # fn main() -> featcloud::Result<()> {
//! let be = CudaBackend::new(Device::new(0)?, Precision::Bf16)?;
//! let x = be.upload(&[1.0, -2.0, 3.0, -4.0])?;
//! assert_eq!(be.download(&x)?, vec![1.0, -2.0, 3.0, -4.0]);
//! # Ok(()) }
//! ```

use super::args::{AdamwStepArgs, BiasActBwdArgs, BiasActFwdArgs, CastArgs, OptimParams, SgdStepArgs};
use super::gemm_plan::ColGemm;
use super::head::{CudaHead, GradDtype, GradTensor, HeadPath, HeadUpstream};
use super::kernels::{self, train_ops as k};
use super::stats::ClassStats;
use super::{Device, DeviceElem, Launch, Tensor};
use crate::config::{HeadConfig, Reduction, StatsConfig};
use crate::engine::backend::{rows_of, same_len, Activation, Backend, Gemm, HeadBatch, HeadStep, OptimStep};
use crate::engine::optim::{OptimizerConfig, OptimizerKind};
use crate::error::{Error, Result};
use crate::shape::HeadShape;
use crate::stats::StatsState;
use std::sync::{Arc, Mutex};

/// Threads per block of every `train_ops.cu` kernel.
const THREADS: u32 = 256;
/// Columns and row stripes per block of `bias_act_bwd_f32` (32 x 8 = 256 threads).
const BIAS_COLS: u32 = 32;
const BIAS_STRIPES: u32 = 8;
/// Most blocks of an elementwise launch; the kernels' grid-stride loops cover the rest.
const MAX_BLOCKS: usize = 1 << 16;

/// Storage precision of the GEMM and head operands (also the `--precision` option).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Precision {
    /// bf16 copies of the f32 master tensors for the GEMMs and the head (tensor
    /// cores), f32 accumulation and f32 results.
    #[default]
    Bf16,
    /// f32 everywhere (exact SIMT head tiles, FP32 cuBLAS without TF32).
    F32,
}

impl Precision {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
        }
    }
}

/// Class statistics of the CUDA backend: [`ClassStats`] behind a lock, because
/// computing the cloud refreshes a cache inside it while the engine holds the
/// statistics by shared reference.
#[derive(Debug)]
pub struct CudaStats {
    inner: Mutex<ClassStats>,
}

impl CudaStats {
    /// Runs `f` on the device statistics.
    pub fn with<R>(&self, f: impl FnOnce(&mut ClassStats) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

/// The engine's backend on one GPU. Buffers are flat f32 [`Tensor`]s (only their
/// length matters; see [`Backend::len`]).
#[derive(Debug)]
pub struct CudaBackend {
    dev: Arc<Device>,
    precision: Precision,
    head_path: HeadPath,
    /// The head of the last step and its options: kept so that its scratch (labels,
    /// partials, pinned upload buffer) is reused step after step.
    head: Mutex<Option<(HeadConfig, CudaHead)>>,
}

impl Clone for CudaBackend {
    /// The same backend with its own (empty) head cache.
    fn clone(&self) -> Self {
        Self {
            dev: self.dev.clone(),
            precision: self.precision,
            head_path: self.head_path,
            head: Mutex::new(None),
        }
    }
}

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Shape(format!("{what} = {v} exceeds i32 indexing")))
}

/// A 1-D grid for a grid-stride kernel over `n` > 0 elements.
fn blocks_1d(n: usize) -> usize {
    n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS)
}

/// The head's gradient in f32 (the backend always asks for [`GradDtype::F32`]).
fn f32_grad<T: DeviceElem>(g: GradTensor<T>, what: &str) -> Result<Tensor<f32>> {
    match g {
        GradTensor::F32(t) => Ok(t),
        GradTensor::Input(_) => {
            Err(Error::Shape(format!("head returned {what} in the storage dtype, f32 was asked")))
        }
    }
}

impl CudaBackend {
    /// A backend on `dev` computing GEMMs and the head in `precision`.
    ///
    /// Errors: [`Error::KernelsNotBuilt`] when the crate was built without NVRTC,
    /// [`Error::Cublas`] when cuBLAS cannot be loaded, so that a caller choosing a
    /// backend automatically can fall back to the CPU.
    pub fn new(dev: Arc<Device>, precision: Precision) -> Result<Self> {
        if !kernels::KERNELS_BUILT && !dev.is_emulated() {
            return Err(Error::KernelsNotBuilt);
        }
        if !dev.is_emulated() {
            dev.cublas()?; // the emulated device has its GEMM stand-in
        }
        Ok(Self { dev, precision, head_path: HeadPath::Fused, head: Mutex::new(None) })
    }

    /// The same backend running the head on `path` (default [`HeadPath::Fused`]). A head with
    /// sub-centers (`head.subcenters` > 1, SPEC 5b) runs on the fused path only where its
    /// attention-form kernels take them, else on [`HeadPath::Reference`] (see
    /// [`CudaBackend::head_path_for`]).
    pub fn with_head_path(mut self, path: HeadPath) -> Self {
        self.head_path = path;
        self
    }

    /// The head path a step with options `cfg` at `shape` runs: the backend's, except that
    /// sub-centers (K > 1, SPEC 5b) leave the fused path for [`HeadPath::Reference`] where the
    /// fused path does not take them: with label smoothing, or where its attention-form
    /// kernels do not run (D, the storage dtype, the device's shared memory:
    /// [`crate::cuda::head::fused_takes_subcenters`]).
    pub fn head_path_for(&self, cfg: &HeadConfig, shape: HeadShape) -> HeadPath {
        let k = cfg.subcenters as usize;
        let dtype = match self.precision {
            Precision::F32 => crate::DType::F32,
            Precision::Bf16 => crate::DType::BF16,
        };
        let fused_takes = cfg.label_smoothing == 0.0
            && crate::cuda::head::fused_takes_subcenters(
                dtype,
                shape.d,
                k,
                self.dev.info().max_smem_per_block,
            );
        if k > 1 && self.head_path == HeadPath::Fused && !fused_takes {
            HeadPath::Reference
        } else {
            self.head_path
        }
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// The operand precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The head path.
    pub fn head_path(&self) -> HeadPath {
        self.head_path
    }

    /// An f32 tensor of `shape` holding `host` (zeros when empty: no zero-byte copy).
    fn tensor_from_host(&self, host: &[f32], shape: &[usize]) -> Result<Tensor<f32>> {
        if host.is_empty() {
            return Tensor::zeros(&self.dev, shape);
        }
        Tensor::from_host(&self.dev, host, shape)
    }

    /// A device copy of the first `numel(shape)` elements of `src`, with `shape`
    /// (the head and the statistics check shapes; engine buffers are flat).
    fn shaped_copy(&self, src: &Tensor<f32>, shape: &[usize]) -> Result<Tensor<f32>> {
        let n: usize = shape.iter().product();
        same_len("reshape", src.len(), n)?;
        if n == 0 {
            return Tensor::zeros(&self.dev, shape);
        }
        // SAFETY: copy_from writes all n elements right away.
        let mut t = unsafe { Tensor::uninit(&self.dev, shape) }?;
        t.copy_from_part(&self.dev, src, n)?;
        Ok(t)
    }

    /// `dst[..n] = src[..n]` on the device (n = both lengths, checked).
    fn copy_into(&self, src: &Tensor<f32>, dst: &mut Tensor<f32>) -> Result<()> {
        let n = src.len();
        same_len("device copy", dst.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        dst.copy_from(&self.dev, src)
    }

    /// bf16 copy of `x` with `shape` (round to nearest even), via `cast_fwd_bf16`.
    fn to_bf16(&self, x: &Tensor<f32>, shape: &[usize]) -> Result<Tensor<half::bf16>> {
        let n: usize = shape.iter().product();
        same_len("bf16 cast", x.len(), n)?;
        let out = Tensor::<half::bf16>::zeros(&self.dev, shape)?;
        if n == 0 {
            return Ok(out);
        }
        let l = Launch::linear(
            k::CAST_FWD_BF16,
            blocks_1d(n),
            THREADS,
            &CastArgs { x: x.ptr(), out: out.ptr(), n: n as i64 },
        );
        // SAFETY: x holds >= n f32 and out >= n bf16 (both shapes checked above); they are
        // distinct allocations; the grid-stride loop touches indices [0, n) only.
        unsafe { self.dev.launch(&l) }?;
        Ok(out)
    }

    /// One `cublasGemmEx`: row-major `c [m, n] = alpha op(a) op(b) + beta c` with
    /// `a`, `b` of dtype `T` (f32 or bf16), `c` f32, f32 accumulation. m, n, k > 0.
    fn blas_gemm<T: DeviceElem>(
        &self,
        g: Gemm,
        a: &Tensor<T>,
        b: &Tensor<T>,
        c: &mut Tensor<f32>,
    ) -> Result<()> {
        let (m, n, kk) = (g.m, g.n, g.k);
        // Row-major C = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T: cuBLAS gets
        // (b, a) in that order (gemm_plan.rs).
        let plan = ColGemm::row_major(g.trans_a, g.trans_b, m, n, kk);
        self.dev.gemm(&plan, b, a, c, g.alpha, g.beta, &format!("backend gemm m={m} n={n} k={kk}"))
    }
}

impl Backend for CudaBackend {
    type Buf = Tensor<f32>;
    type Stats = CudaStats;

    fn name(&self) -> String {
        // Sub-centers (SPEC 5b) run on the fused attention-form kernels where those take them.
        let sub = if self.head_path == HeadPath::Fused {
            "; sub-centers fused where the attention form takes them, else reference"
        } else {
            ""
        };
        format!(
            "cuda ({}, {}, {} head{sub})",
            self.dev.info().name,
            self.precision.name(),
            self.head_path.name()
        )
    }

    fn zeros(&self, len: usize) -> Result<Tensor<f32>> {
        Tensor::zeros(&self.dev, &[len])
    }

    fn upload(&self, host: &[f32]) -> Result<Tensor<f32>> {
        self.tensor_from_host(host, &[host.len()])
    }

    fn write(&self, buf: &mut Tensor<f32>, host: &[f32]) -> Result<()> {
        same_len("write", buf.len(), host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        buf.copy_from_host(&self.dev, host)
    }

    fn download(&self, buf: &Tensor<f32>) -> Result<Vec<f32>> {
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        buf.to_host(&self.dev)
    }

    fn len(&self, buf: &Tensor<f32>) -> usize {
        buf.len()
    }

    /// Row-major GEMM through cuBLAS. f32: FP32 GEMM (no TF32). bf16: both
    /// operands rounded to bf16 copies, f32 accumulation, f32 `c`. `beta = 0`
    /// never reads `c` (cuBLAS semantics, as the CPU clears it first); k = 0 gives
    /// `c = beta * c` as on the CPU.
    fn gemm(&self, g: Gemm, a: &Tensor<f32>, b: &Tensor<f32>, c: &mut Tensor<f32>) -> Result<()> {
        let (m, n, kk) = (g.m, g.n, g.k);
        crate::cpu::gemm::check_gemm_lens(m, n, kk, a.len(), b.len(), c.len())?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if kk == 0 {
            // Degenerate; done on the host with the CPU's exact rule.
            let v: Vec<f32> =
                self.download(c)?.into_iter().map(|v| if g.beta == 0.0 { 0.0 } else { v * g.beta }).collect();
            return self.write(c, &v);
        }
        match self.precision {
            Precision::F32 => self.blas_gemm(g, a, b, c),
            Precision::Bf16 => {
                let a16 = self.to_bf16(a, &[a.len()])?;
                let b16 = self.to_bf16(b, &[b.len()])?;
                self.blas_gemm(g, &a16, &b16, c)
            }
        }
    }

    fn bias_act_forward(&self, y: &mut Tensor<f32>, bias: &Tensor<f32>, act: Activation) -> Result<()> {
        let cols = bias.len();
        rows_of("bias_act_forward y", y.len(), cols)?;
        let n = y.len();
        if n == 0 {
            return Ok(());
        }
        let args = BiasActFwdArgs {
            y: y.ptr(),
            bias: bias.ptr(),
            n: n as i64,
            cols: i32_of("bias columns", cols)?,
            act: (act == Activation::Relu) as i32,
        };
        let l = Launch::linear(k::BIAS_ACT_FWD_F32, blocks_1d(n), THREADS, &args);
        // SAFETY: y holds n = rows * cols f32 and bias cols f32 (checked above), separate
        // allocations (one is &mut); the kernel reads bias[i % cols] and writes y[i], i < n.
        unsafe { self.dev.launch(&l) }
    }

    fn bias_act_backward(
        &self,
        dy: &mut Tensor<f32>,
        y: &Tensor<f32>,
        dbias: &mut Tensor<f32>,
        act: Activation,
    ) -> Result<()> {
        let cols = dbias.len();
        same_len("bias_act_backward dy/y", dy.len(), y.len())?;
        let rows = rows_of("bias_act_backward dy", dy.len(), cols)?;
        let args = BiasActBwdArgs {
            dy: dy.ptr(),
            y: y.ptr(),
            dbias: dbias.ptr(),
            rows: i32_of("bias rows", rows)?,
            cols: i32_of("bias columns", cols)?,
            act: (act == Activation::Relu) as i32,
            ..Default::default()
        };
        let grid = [(cols as u32).div_ceil(BIAS_COLS), 1, 1];
        let l = Launch::new(k::BIAS_ACT_BWD_F32, grid, [BIAS_COLS, BIAS_STRIPES, 1], 0, &args);
        // SAFETY: dy and y hold rows * cols f32, dbias cols f32 (checked above; cols > 0 so
        // the grid is non-empty); three distinct allocations (two are &mut). Block x writes
        // dbias[32x .. 32x + 32) clipped to cols and the dy entries of those columns only.
        unsafe { self.dev.launch(&l) }
    }

    fn head_forward_backward(
        &self,
        cfg: &HeadConfig,
        batch: HeadBatch<'_, Tensor<f32>>,
        dx: &mut Tensor<f32>,
        dw: &mut Tensor<f32>,
    ) -> Result<HeadStep> {
        let HeadBatch { shape: HeadShape { b, c, d }, x, w, labels, sigma_cloud, seed, step } = batch;
        // W holds K sub-center rows per class (SPEC 5b): [C*K, D].
        let ck = c * cfg.subcenters as usize;
        same_len("head x", x.len(), b * d)?;
        same_len("head w", w.len(), ck * d)?;
        same_len("head dx", dx.len(), b * d)?;
        same_len("head dw", dw.len(), ck * d)?;
        let path = self.head_path_for(cfg, HeadShape { b, c, d });
        let mut kept = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if kept.as_ref().is_none_or(|(c, h)| c != cfg || h.path() != path) {
            *kept = Some((*cfg, CudaHead::new(self.dev.clone(), *cfg, path)?));
        }
        let head = &kept.as_ref().expect("set above").1;
        // Reduction none: d loss / d loss_i = 1 per row, as the CPU backend passes.
        let ones;
        let up = if cfg.reduction == Reduction::None {
            ones = self.tensor_from_host(&vec![1.0f32; b], &[b])?;
            HeadUpstream::PerRow(&ones)
        } else {
            HeadUpstream::Scalar(1.0)
        };
        let (fwd, gdx, gdw) = match self.precision {
            Precision::F32 => {
                let (xs, ws) = (self.shaped_copy(x, &[b, d])?, self.shaped_copy(w, &[ck, d])?);
                let (fwd, g) =
                    head.forward_backward(&xs, &ws, labels, sigma_cloud, seed, step, up, GradDtype::F32)?;
                (fwd, f32_grad(g.dx, "dx")?, f32_grad(g.dw, "dW")?)
            }
            Precision::Bf16 => {
                let (xs, ws) = (self.to_bf16(x, &[b, d])?, self.to_bf16(w, &[ck, d])?);
                let (fwd, g) =
                    head.forward_backward(&xs, &ws, labels, sigma_cloud, seed, step, up, GradDtype::F32)?;
                (fwd, f32_grad(g.dx, "dx")?, f32_grad(g.dw, "dW")?)
            }
        };
        same_len("head dx result", gdx.len(), b * d)?;
        same_len("head dW result", gdw.len(), ck * d)?;
        let c_iy = if b == 0 { Vec::new() } else { fwd.c_iy.to_host(&self.dev)? };
        let k_iy = fwd.k_iy_to_host(&self.dev)?;
        // The head's fresh f32 gradients become the engine's buffers (same lengths).
        *dx = gdx;
        *dw = gdw;
        Ok(HeadStep { loss: fwd.loss as f64, n_valid: fwd.n_valid, c_iy, k_iy })
    }

    fn stats_new(&self, c: usize, subcenters: usize, d: usize, cfg: &StatsConfig) -> Result<CudaStats> {
        Ok(CudaStats {
            inner: Mutex::new(ClassStats::with_subcenters(&self.dev, c, subcenters, d, cfg.clone())?),
        })
    }

    fn stats_cloud_sigma(&self, stats: &CudaStats, out: &mut Tensor<f32>) -> Result<()> {
        stats.with(|s| {
            let sigma = s.cloud_sigma(&self.dev)?;
            self.copy_into(sigma, out)
        })
    }

    fn stats_update(
        &self,
        stats: &mut CudaStats,
        x: &Tensor<f32>,
        labels: &[i32],
        head: &HeadStep,
    ) -> Result<()> {
        let c_iy = &head.c_iy;
        stats.with(|s| match s.config().center {
            crate::config::CenterMode::Ema => {
                let xs = self.shaped_copy(x, &[labels.len(), s.dim()])?;
                s.update_subcenters(&self.dev, &xs, labels, &head.k_iy)
            }
            crate::config::CenterMode::ClassWeight => {
                same_len("stats update c_iy/labels", c_iy.len(), labels.len())?;
                let t = self.tensor_from_host(c_iy, &[c_iy.len()])?;
                s.update_from_cos(&self.dev, labels, &t)
            }
        })
    }

    fn stats_export(&self, stats: &CudaStats) -> Result<StatsState> {
        stats.with(|s| s.snapshot(&self.dev))
    }

    fn stats_import(&self, state: &StatsState) -> Result<CudaStats> {
        // Values may come from the CPU's f64 state; from_snapshot rounds them to f32.
        Ok(CudaStats { inner: Mutex::new(ClassStats::from_snapshot(&self.dev, state)?) })
    }

    fn optimizer_step(
        &self,
        opt: &OptimizerConfig,
        hp: OptimStep,
        param: &mut Tensor<f32>,
        grad: &Tensor<f32>,
        state: &mut [Tensor<f32>],
    ) -> Result<()> {
        self.check_optimizer(opt, param, grad, state)?;
        let n = param.len();
        if n == 0 {
            return Ok(());
        }
        // Host-side scalars computed exactly as the CPU backend computes them.
        let t = hp.t.max(1) as i32;
        let p = OptimParams {
            lr: hp.lr,
            wd: hp.weight_decay,
            momentum: opt.momentum,
            b1: opt.beta1,
            one_minus_b1: 1.0 - opt.beta1,
            b2: opt.beta2,
            one_minus_b2: 1.0 - opt.beta2,
            c1: 1.0 - opt.beta1.powi(t),
            c2: 1.0 - opt.beta2.powi(t),
            eps: opt.eps,
        };
        let n_i = n as i64;
        let l = match opt.kind {
            OptimizerKind::Sgd => Launch::linear(
                k::SGD_STEP_F32,
                blocks_1d(n),
                THREADS,
                &SgdStepArgs { p: param.ptr(), g: grad.ptr(), m: state[0].ptr(), n: n_i, hp: p },
            ),
            OptimizerKind::AdamW => Launch::linear(
                k::ADAMW_STEP_F32,
                blocks_1d(n),
                THREADS,
                &AdamwStepArgs {
                    p: param.ptr(),
                    g: grad.ptr(),
                    m: state[0].ptr(),
                    v: state[1].ptr(),
                    n: n_i,
                    hp: p,
                },
            ),
        };
        // SAFETY: param, grad and the state buffers (momentum, or m and v) hold n f32 each
        // (checked by check_optimizer) and are distinct allocations (param and state are
        // &mut); the grid-stride loops touch indices [0, n) only.
        unsafe { self.dev.launch(&l) }
    }
}
