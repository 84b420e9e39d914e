//! The margin head on the GPU (SPEC sections 3, 4, 7): the reference path
//! (`kernels/head_ref.cu` + cuBLAS) and the fused path (`kernels/head_fused.cu`).
//!
//! [`CudaHead`] checks every shape and label on the host before the first
//! launch, then queues the kernels of the chosen [`HeadPath`] on the device's
//! stream. The loss comes back to the host (one 4-byte copy); the per-row
//! outputs and the gradients stay on the device.
//!
//! ```no_run
//! # use featcloud::cuda::{Device, Tensor, head::{CudaHead, HeadPath, GradDtype, HeadUpstream}};
//! # fn main() -> featcloud::Result<()> {
//! let dev = Device::new(0)?;
//! let head = CudaHead::new(dev.clone(), featcloud::HeadConfig::arcface(), HeadPath::Fused)?;
//! let (b, c, d) = (4, 10, 16);
//! let x = Tensor::<half::bf16>::from_f32(&dev, &vec![0.1; b * d], &[b, d])?;
//! let w = Tensor::<half::bf16>::from_f32(&dev, &vec![0.2; c * d], &[c, d])?;
//! let sigma = Tensor::<f32>::zeros(&dev, &[c])?;
//! let labels = [0, 3, 9, -1];
//! let (fwd, grads) = head.forward_backward(&x, &w, &labels, &sigma, 7, 0, HeadUpstream::Scalar(1.0), GradDtype::Input)?;
//! println!("loss {} over {} rows", fwd.loss, fwd.n_valid);
//! # let _ = grads; Ok(()) }
//! ```
//!
//! Workspace: [`CudaHead::workspace_bytes`] tells how many bytes of scratch a
//! call allocates besides its outputs. The reference path materializes the
//! B x C cosine and gradient matrices; the fused path never does.

pub mod verify;

use super::gemm_plan::{head_gemms, ColGemm};
use super::kernels::{head_fused as kf, head_ref as kr};
use super::{cuda_err, Device, DeviceElem, Kernel, Tensor};
use crate::check::{check_head_inputs, HeadShape};
use crate::config::{CloudMode, DType, Fallback, HeadConfig, MarginGrad, Reduction};
use crate::error::{Error, Result};
use cudarc::cublas::{sys as blas_sys, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use std::ops::Deref;
use std::sync::Arc;

/// Which implementation of the head runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HeadPath {
    /// Unfused: normalization, cuBLAS SGEMMs on f32 normalized copies, B x C
    /// logits in memory. Simple; the baseline and a GPU-side oracle.
    Reference,
    /// Fused tiles: tensor cores (bf16/f16) or exact SIMT (f32), no B x C buffer.
    #[default]
    Fused,
}

impl HeadPath {
    /// Both paths, for tests and benches.
    pub const ALL: [HeadPath; 2] = [HeadPath::Reference, HeadPath::Fused];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            HeadPath::Reference => "reference",
            HeadPath::Fused => "fused",
        }
    }
}

/// The dtype the gradients are written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GradDtype {
    /// The storage dtype of x and W.
    #[default]
    Input,
    /// f32, whatever the storage dtype.
    F32,
}

/// Upstream gradient of the backward pass (see [`crate::oracle::Upstream`]).
#[derive(Clone, Copy, Debug)]
pub enum HeadUpstream<'a> {
    /// d loss for `Reduction::Mean` / `Reduction::Sum` (1.0 for a plain loss).
    Scalar(f32),
    /// d loss_i `[B]` on the device, for `Reduction::None`.
    PerRow(&'a Tensor<f32>),
}

/// Kernel parameters; mirrors `struct HeadParams` in `kernels/head.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct HeadParams {
    s: f32,
    m1: f32,
    m2: f32,
    m3: f32,
    ls: f32,
    ls_over_c: f32,
    cloud: i32,
    fallback: i32,
    margin_grad: i32,
    _pad: i32,
    seed: u64,
    step: u64,
}
const _: () = assert!(std::mem::size_of::<HeadParams>() == 56);
// SAFETY: plain-old-data with the layout of the CUDA struct (asserted on both sides).
unsafe impl DeviceRepr for HeadParams {}

/// Result of a forward pass. Per-row tensors have B entries (0 for ignored rows).
#[derive(Debug)]
pub struct HeadForward {
    /// The reduced loss (mean over valid rows, their sum, or for `Reduction::None`
    /// the sum of the row losses), on the host.
    pub loss: f32,
    /// Rows with a non-negative label.
    pub n_valid: usize,
    /// loss_i `[B]`.
    pub row_loss: Tensor<f32>,
    /// lse_i `[B]`.
    pub lse: Tensor<f32>,
    /// Target cosine c_iy `[B]`.
    pub c_iy: Tensor<f32>,
    /// Margin-transformed target t_i `[B]`.
    pub t: Tensor<f32>,
    /// Cloud perturbation alpha_i `[B]`.
    pub alpha: Tensor<f32>,
    /// dt_i / dc_iy [B], kept for the backward.
    dt: Tensor<f32>,
    shape: HeadShape,
}

impl HeadForward {
    /// The shape the forward ran at.
    pub fn shape(&self) -> HeadShape {
        self.shape
    }

    /// dt_i (the backward's target-logit derivative) `[B]`.
    pub fn dt(&self) -> &Tensor<f32> {
        &self.dt
    }
}

/// A forward whose kernels are queued but whose loss is not read back yet.
struct ForwardLaunched {
    out: HeadForward,
    /// The reduced loss, on the device.
    total: Tensor<f32>,
    /// The fused path's inverse norms (x, W), for a backward of the same inputs.
    inv: Option<(Tensor<f32>, Tensor<f32>)>,
}

impl ForwardLaunched {
    /// Reads the loss back (waits for the queued work) and returns the forward.
    fn finish(mut self, dev: &Device) -> Result<HeadForward> {
        self.out.loss = self.total.to_host(dev)?[0];
        Ok(self.out)
    }
}

/// A gradient tensor in the dtype that was asked for.
///
/// f32 storage always gives [`GradTensor::F32`] (its input dtype is f32).
#[derive(Debug)]
pub enum GradTensor<T: DeviceElem> {
    /// In the storage dtype.
    Input(Tensor<T>),
    /// In f32.
    F32(Tensor<f32>),
}

impl<T: DeviceElem> GradTensor<T> {
    /// Copies the gradient to the host as f32.
    pub fn to_f32_host(&self, dev: &Device) -> Result<Vec<f32>> {
        match self {
            GradTensor::Input(t) => t.to_f32_host(dev),
            GradTensor::F32(t) => t.to_f32_host(dev),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            GradTensor::Input(t) => t.shape(),
            GradTensor::F32(t) => t.shape(),
        }
    }
}

/// dx [B, D] and dW [C, D].
#[derive(Debug)]
pub struct Grads<T: DeviceElem> {
    /// d loss / d x.
    pub dx: GradTensor<T>,
    /// d loss / d W.
    pub dw: GradTensor<T>,
}

/// Bytes of scratch one call allocates besides its outputs (see [`CudaHead::workspace`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Workspace {
    /// Forward scratch.
    pub forward: usize,
    /// Backward scratch.
    pub backward: usize,
}

/// The fused forward's tiles (rows, classes), largest first: `fused_fwd_*`,
/// `fused_rows64_fwd_*` and `fused_tile64_fwd_*` in `kernels/head_fused.cu`.
pub const FORWARD_TILES: [(usize, usize); 3] = [(128, 128), (64, 128), (64, 64)];
/// The smallest forward tile's rows (the grid-size check assumes it).
const FWD_BM_SMALL: usize = 64;
/// Fused backward tile: rows, and classes (`fused_bwd_*`; `fused_cols64_bwd_*` take 64).
const BWD_BM: usize = 64;
const BWD_BN: usize = 128;
const BWD_BN_SMALL: usize = 64;
const THREADS: u32 = 256;
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
fn bwd_groups(shape: HeadShape, sm_count: usize, cols: usize) -> usize {
    let n_ct = shape.c.div_ceil(cols);
    let per_group = shape.b * shape.d * 4;
    let by_mem = (DXP_BUDGET / per_group.max(1)).max(1);
    n_ct.min(sm_count.max(1)).min(by_mem).max(1)
}

/// S, the fused backward's row splits: 1 while the G class-tile CTAs fill at least half
/// the GPU; else enough splits of the row tiles to fill it (at most one per row tile),
/// as long as the S x C x D f32 dW partials stay within 256 MiB.
fn bwd_row_splits(shape: HeadShape, sm_count: usize, g: usize) -> usize {
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

/// Scratch bytes of `path` at `shape` on a GPU with `sm_count` SMs (what
/// [`HeadOn::workspace`] reports; usable without a device).
pub fn workspace_for(
    path: HeadPath,
    shape: HeadShape,
    dtype: DType,
    grad: GradDtype,
    sm_count: usize,
) -> Workspace {
    let (g, s) = backward_grid_for(shape, sm_count);
    let plan = Plan {
        fwd_cols: forward_tile_for(shape, sm_count).1,
        bwd_cols: backward_cols_for(shape, sm_count),
        g,
        s,
    };
    workspace_with_groups(path, shape, dtype, grad, plan)
}

/// The fused path's launch choices that size its scratch.
struct Plan {
    /// Classes per forward tile.
    fwd_cols: usize,
    /// Classes per backward tile.
    bwd_cols: usize,
    /// Backward CTAs per row split.
    g: usize,
    /// Backward row splits.
    s: usize,
}

/// [`workspace_for`] with the fused path's launch choices given.
fn workspace_with_groups(
    path: HeadPath,
    shape: HeadShape,
    dtype: DType,
    grad: GradDtype,
    plan: Plan,
) -> Workspace {
    let Plan { fwd_cols, bwd_cols, g, s: splits } = plan;
    let HeadShape { b, c, d } = shape;
    let f = 4;
    match path {
        HeadPath::Reference => Workspace {
            // xh, wh, inverse norms, cos, labels, dt
            forward: (b * d + c * d + b + c + b * c + 2 * b) * f,
            // xh, wh, inverse norms, cos, dc, dxh, dwh, labels
            backward: (2 * b * d + 2 * c * d + b + c + 2 * b * c + b) * f,
        },
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

/// The margin head on one device, holding the device through `D` (an
/// `Arc<Device>` for [`CudaHead`], a plain `&Device` for short-lived checks).
#[derive(Debug)]
pub struct HeadOn<D: Deref<Target = Device>> {
    dev: D,
    cfg: HeadConfig,
    path: HeadPath,
    tuning: FusedTuning,
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
}

/// The margin head owning a handle to its device: what trainers keep.
pub type CudaHead = HeadOn<Arc<Device>>;

/// Every head path x dtype x a few option sets at small sizes against the CPU
/// oracle (`featcloud smoke`); see [`verify::smoke`].
pub fn smoke(dev: &Device) -> Result<Vec<super::SmokeLine>> {
    verify::smoke(dev)
}

fn blas_err(context: &'static str) -> impl FnOnce(cudarc::cublas::result::CublasError) -> Error {
    move |e| Error::Cublas { context: context.into(), message: e.to_string() }
}

fn i32_dim(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Shape(format!("{name} = {v} exceeds i32 indexing")))
}

fn grid1(n: usize, per_block: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(per_block) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl<D: Deref<Target = Device>> HeadOn<D> {
    /// A head with options `cfg` (validated here) running `path` on `dev`.
    pub fn new(dev: D, cfg: HeadConfig, path: HeadPath) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { dev, cfg, path, tuning: FusedTuning::default() })
    }

    /// The same head with the fused dispatcher's choices overridden (tests, benches).
    pub fn with_tuning(mut self, tuning: FusedTuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The options.
    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// The path.
    pub fn path(&self) -> HeadPath {
        self.path
    }

    /// The fused backward's class tile (64 or 128).
    fn bwd_cols(&self, shape: HeadShape) -> usize {
        match self.tuning.backward_cols {
            Some(c @ (BWD_BN | BWD_BN_SMALL)) => c,
            _ => backward_cols_for(shape, self.dev.info().sm_count.max(1) as usize),
        }
    }

    /// The fused backward's grid: G CTAs per row split (and dx partial buffers) and S
    /// row splits.
    fn bwd_grid(&self, shape: HeadShape) -> (usize, usize) {
        let sm = self.dev.info().sm_count.max(1) as usize;
        let cols = self.bwd_cols(shape);
        let g = match self.tuning.backward_ctas {
            Some(g) => g.clamp(1, shape.c.div_ceil(cols)),
            None => bwd_groups(shape, sm, cols),
        };
        let s = match self.tuning.row_splits {
            Some(s) => s.clamp(1, shape.b.div_ceil(BWD_BM)),
            None => bwd_row_splits(shape, sm, g),
        };
        (g, s)
    }

    /// The fused forward's tile (rows, classes) at `shape`, one of [`FORWARD_TILES`].
    pub fn forward_tile(&self, shape: HeadShape) -> (usize, usize) {
        match self.tuning.forward_tile {
            Some(t) if FORWARD_TILES.contains(&t) => t,
            _ => forward_tile_for(shape, self.dev.info().sm_count.max(1) as usize),
        }
    }

    /// The fused backward's launch grid at `shape`: (G CTAs over the class tiles, S row
    /// splits), as the dispatcher (or the tuning) picks it.
    pub fn backward_grid(&self, shape: HeadShape) -> (usize, usize) {
        self.bwd_grid(shape)
    }

    /// The fused backward's class tile at `shape` (64 or 128).
    pub fn backward_cols(&self, shape: HeadShape) -> usize {
        self.bwd_cols(shape)
    }

    /// Scratch bytes (beyond inputs and outputs) of a forward and of a backward
    /// writing gradients in `grad` at `shape` with storage `dtype`.
    pub fn workspace(&self, shape: HeadShape, dtype: DType, grad: GradDtype) -> Workspace {
        let (g, s) = self.bwd_grid(shape);
        let plan = Plan { fwd_cols: self.forward_tile(shape).1, bwd_cols: self.bwd_cols(shape), g, s };
        workspace_with_groups(self.path, shape, dtype, grad, plan)
    }

    /// Peak scratch bytes of [`CudaHead::forward_backward`] with gradients in the
    /// input dtype (the larger case), known before the call is made.
    pub fn workspace_bytes(&self, shape: HeadShape, dtype: DType) -> usize {
        let w = self.workspace(shape, dtype, GradDtype::Input);
        w.forward.max(w.backward)
    }

    fn params(&self, shape: HeadShape, seed: u64, step: u64) -> HeadParams {
        let c = &self.cfg;
        HeadParams {
            s: c.s,
            m1: c.m1,
            m2: c.m2,
            m3: c.m3,
            ls: c.label_smoothing,
            ls_over_c: c.label_smoothing / shape.c as f32,
            cloud: match c.cloud {
                CloudMode::Off => 0,
                CloudMode::Symmetric => 1,
                CloudMode::OneSided => 2,
            },
            fallback: match c.fallback {
                Fallback::Linear => 0,
                Fallback::Clamp => 1,
            },
            margin_grad: match c.margin_grad {
                MarginGrad::Exact => 0,
                MarginGrad::StraightThrough => 1,
            },
            _pad: 0,
            seed,
            step,
        }
    }

    /// Checks x [B, D], W [C, D], labels [B] and sigma_cloud [C] (any length when the
    /// cloud is off) before anything is launched.
    fn check<T: DeviceElem>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        labels: &[i32],
        sigma: &Tensor<f32>,
    ) -> Result<HeadShape> {
        let (&[b, d], &[c, d2]) = (x.shape(), w.shape()) else {
            return Err(Error::Shape(format!(
                "x must be [B, D] and W [C, D], got {:?} and {:?}",
                x.shape(),
                w.shape()
            )));
        };
        if d != d2 {
            return Err(Error::Shape(format!("x has D = {d} but W has D = {d2}")));
        }
        let shape = HeadShape { b, c, d };
        let sigma_len = if self.cfg.cloud == CloudMode::Off { None } else { Some(sigma.len()) };
        check_head_inputs(shape, x.len(), w.len(), labels, sigma_len)?;
        i32_dim("B", b)?;
        i32_dim("C", c)?;
        i32_dim("D", d)?;
        if self.path == HeadPath::Reference {
            i32_dim("B*C", b * c)?;
            if b > 65_535 {
                return Err(Error::Shape(format!("the reference path supports B <= 65535, got {b}")));
            }
        }
        if shape.b.div_ceil(FWD_BM_SMALL) > 65_535 {
            return Err(Error::Shape(format!("B = {b} is too large for the fused grid")));
        }
        Ok(shape)
    }

    fn upload_labels(&self, labels: &[i32]) -> Result<CudaSlice<i32>> {
        self.dev.stream().clone_htod(labels).map_err(cuda_err("labels host-to-device copy"))
    }

    /// Forward pass (SPEC 3): loss and per-row outputs.
    ///
    /// x `[B, D]` and W `[C, D]` in the storage dtype, labels `[B]` on the host (negative =
    /// ignored, >= C is an error), sigma_cloud `[C]` f32 on the device, Philox (seed, step).
    pub fn forward<T: DeviceElem>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        labels: &[i32],
        sigma_cloud: &Tensor<f32>,
        seed: u64,
        step: u64,
    ) -> Result<HeadForward> {
        let shape = self.check(x, w, labels, sigma_cloud)?;
        let dl = self.upload_labels(labels)?;
        let launched = self.forward_impl(x, w, labels, &dl, sigma_cloud, shape, seed, step)?;
        launched.finish(&self.dev)
    }

    /// Backward pass (SPEC 4) from a forward of the same inputs.
    ///
    /// `upstream` must be [`HeadUpstream::Scalar`] for mean/sum and
    /// [`HeadUpstream::PerRow`] for `Reduction::None`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: DeviceElem>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        labels: &[i32],
        sigma_cloud: &Tensor<f32>,
        fwd: &HeadForward,
        upstream: HeadUpstream,
        grad_dtype: GradDtype,
    ) -> Result<Grads<T>> {
        let shape = self.check(x, w, labels, sigma_cloud)?;
        if fwd.shape != shape {
            return Err(Error::Shape(format!(
                "forward ran at {:?}, backward called at {shape:?}",
                fwd.shape
            )));
        }
        self.check_upstream(shape, upstream)?;
        let dl = self.upload_labels(labels)?;
        self.backward_impl(x, w, labels, &dl, fwd, None, shape, upstream, grad_dtype)
    }

    /// Forward and backward in one call: what a training step needs.
    ///
    /// Same arguments as [`CudaHead::forward`] plus the upstream gradient and the
    /// gradient dtype; returns the forward outputs and (dx, dW).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward<T: DeviceElem>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        labels: &[i32],
        sigma_cloud: &Tensor<f32>,
        seed: u64,
        step: u64,
        upstream: HeadUpstream,
        grad_dtype: GradDtype,
    ) -> Result<(HeadForward, Grads<T>)> {
        let shape = self.check(x, w, labels, sigma_cloud)?;
        self.check_upstream(shape, upstream)?;
        let dl = self.upload_labels(labels)?;
        let launched = self.forward_impl(x, w, labels, &dl, sigma_cloud, shape, seed, step)?;
        // The backward reuses the forward's inverse norms (same x and W) and is queued
        // before the loss is read back, so the device runs both without a host round trip.
        let inv = launched.inv.as_ref().map(|(a, b)| (a, b));
        let grads = self.backward_impl(x, w, labels, &dl, &launched.out, inv, shape, upstream, grad_dtype)?;
        Ok((launched.finish(&self.dev)?, grads))
    }

    fn check_upstream(&self, shape: HeadShape, up: HeadUpstream) -> Result<()> {
        match (self.cfg.reduction, up) {
            (Reduction::None, HeadUpstream::PerRow(g)) if g.len() == shape.b => Ok(()),
            (Reduction::None, HeadUpstream::PerRow(g)) => Err(Error::Shape(format!(
                "per-row upstream has {} entries, expected B = {}",
                g.len(),
                shape.b
            ))),
            (Reduction::None, HeadUpstream::Scalar(_)) => {
                Err(Error::InvalidConfig("reduction none needs HeadUpstream::PerRow".into()))
            }
            (_, HeadUpstream::PerRow(_)) => {
                Err(Error::InvalidConfig("reductions mean and sum take HeadUpstream::Scalar".into()))
            }
            (_, HeadUpstream::Scalar(g)) if !g.is_finite() => {
                Err(Error::NonFinite { what: "upstream gradient".into(), index: 0 })
            }
            _ => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_impl<T: DeviceElem>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        labels: &[i32],
        dl: &CudaSlice<i32>,
        sigma: &Tensor<f32>,
        shape: HeadShape,
        seed: u64,
        step: u64,
    ) -> Result<ForwardLaunched> {
        let dev = &*self.dev;
        let b = shape.b;
        let p = self.params(shape, seed, step);
        // The fused path writes every per-row output (fused_combine_fwd_f32 zeroes the
        // ignored rows), so it skips the memsets; the reference path starts from zeros.
        let fused = self.path == HeadPath::Fused;
        let z = |n: usize| {
            if fused {
                // SAFETY: fused_fwd + fused_combine_fwd_f32 write every element (see above).
                unsafe { Tensor::<f32>::uninit(dev, &[n]) }
            } else {
                Tensor::<f32>::zeros(dev, &[n])
            }
        };
        let mut inv = None;
        let mut out = HeadForward {
            loss: 0.0,
            n_valid: labels.iter().filter(|&&y| y >= 0).count(),
            row_loss: z(b)?,
            lse: z(b)?,
            c_iy: z(b)?,
            t: z(b)?,
            alpha: z(b)?,
            dt: z(b)?,
            shape,
        };
        match self.path {
            HeadPath::Reference => {
                let (xh, _inv_x) = ref_normalize(dev, x)?;
                let (wh, _inv_w) = ref_normalize(dev, w)?;
                let cos = cos_gemm(dev, &xh, &wh, shape)?;
                ref_margin(dev, x, w, dl, sigma, p, &mut out, shape)?;
                ref_softmax(dev, &cos, dl, p, &mut out, shape)?;
            }
            HeadPath::Fused => {
                let inv_x = inv_norms(dev, x)?;
                let inv_w = inv_norms(dev, w)?;
                let tile = self.forward_tile(shape);
                let n_ct = shape.c.div_ceil(tile.1);
                // SAFETY: fused_fwd writes part[k][ct][r] for every class tile ct and row r < B.
                let mut part = unsafe { Tensor::<f32>::uninit(dev, &[3 * n_ct * b]) }?;
                fused_fwd(
                    dev,
                    x,
                    w,
                    &inv_x,
                    &inv_w,
                    dl,
                    sigma,
                    p,
                    &mut part,
                    &mut out,
                    shape,
                    tile,
                    self.tuning.scalar_loads,
                )?;
                fused_combine(dev, &part, n_ct, dl, p, &mut out, shape)?;
                inv = Some((inv_x, inv_w));
            }
        }
        let scale = match self.cfg.reduction {
            Reduction::Mean if out.n_valid == 0 => 0.0,
            Reduction::Mean => 1.0 / out.n_valid as f32,
            Reduction::Sum | Reduction::None => 1.0,
        };
        // SAFETY: head_reduce_fwd_f32 always writes its one output element.
        let mut total = unsafe { Tensor::<f32>::uninit(dev, &[1]) }?;
        reduce_loss(dev, &out.row_loss, scale, &mut total)?;
        Ok(ForwardLaunched { out, total, inv })
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_impl<T: DeviceElem>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        labels: &[i32],
        dl: &CudaSlice<i32>,
        fwd: &HeadForward,
        inv: Option<(&Tensor<f32>, &Tensor<f32>)>,
        shape: HeadShape,
        up: HeadUpstream,
        grad_dtype: GradDtype,
    ) -> Result<Grads<T>> {
        let dev = &*self.dev;
        let HeadShape { b, c, d } = shape;
        let p = self.params(shape, 0, 0);
        let n_valid = labels.iter().filter(|&&y| y >= 0).count();
        let (g_scale, row_g) = match up {
            HeadUpstream::Scalar(g) => match self.cfg.reduction {
                Reduction::Mean if n_valid == 0 => (0.0, None),
                Reduction::Mean => (g / n_valid as f32, None),
                _ => (g, None),
            },
            HeadUpstream::PerRow(t) => (1.0, Some(t)),
        };
        match self.path {
            HeadPath::Reference => {
                let (xh, inv_x) = ref_normalize(dev, x)?;
                let (wh, inv_w) = ref_normalize(dev, w)?;
                let cos = cos_gemm(dev, &xh, &wh, shape)?;
                let mut dc = Tensor::<f32>::zeros(dev, &[b * c])?;
                ref_grad(dev, &cos, dl, fwd, row_g, g_scale, p, &mut dc, shape)?;
                drop(cos);
                let mut dxh = Tensor::<f32>::zeros(dev, &[b * d])?;
                let mut dwh = Tensor::<f32>::zeros(dev, &[c * d])?;
                grad_gemms(dev, &dc, &xh, &wh, &mut dxh, &mut dwh, shape)?;
                let dx = normback(dev, &mut dxh, 1, x, &inv_x, grad_dtype, b, d)?;
                let dw = normback(dev, &mut dwh, 1, w, &inv_w, grad_dtype, c, d)?;
                Ok(Grads { dx, dw })
            }
            HeadPath::Fused => {
                let computed;
                let (inv_x, inv_w) = match inv {
                    Some(pair) => pair,
                    None => {
                        computed = (inv_norms(dev, x)?, inv_norms(dev, w)?);
                        (&computed.0, &computed.1)
                    }
                };
                let (groups, splits) = self.bwd_grid(shape);
                let cols = self.bwd_cols(shape);
                let grid = (cols, groups, splits);
                // SAFETY: fused_bwd writes every element of dxp (groups <= class tiles: each
                // CTA stores its partial on its first class tile) and of dW (each class row
                // once, by the CTA that owns its tile) or of the dW partials (each split
                // stores its slice on its first row tile); the scratch is written before read.
                let mut dxp = unsafe { Tensor::<f32>::uninit(dev, &[groups * b * d]) }?;
                let scalar = self.tuning.scalar_loads;
                let mut bwd = |out: FusedDw<'_, T>| {
                    fused_bwd(
                        dev, x, w, inv_x, inv_w, dl, fwd, row_g, g_scale, p, &mut dxp, out, grid, shape,
                        scalar,
                    )
                };
                let dw = if splits > 1 {
                    // SAFETY: as above.
                    let mut dwp = unsafe { Tensor::<f32>::uninit(dev, &[splits * c * d]) }?;
                    bwd(FusedDw::Partials(&mut dwp))?;
                    normback(dev, &mut dwp, splits, w, inv_w, grad_dtype, c, d)?
                } else if grad_dtype == GradDtype::F32 || T::DTYPE == DType::F32 {
                    // SAFETY: as above.
                    let mut dw = unsafe { Tensor::<f32>::uninit(dev, &[c, d]) }?;
                    bwd(FusedDw::F32(&mut dw))?;
                    GradTensor::F32(dw)
                } else {
                    // SAFETY: as above.
                    let mut acc = unsafe { Tensor::<f32>::uninit(dev, &[groups * cols * d]) }?;
                    // SAFETY: as above.
                    let mut dw = unsafe { Tensor::<T>::uninit(dev, &[c, d]) }?;
                    bwd(FusedDw::Input { acc: &mut acc, dw: &mut dw })?;
                    GradTensor::Input(dw)
                };
                let dx = normback(dev, &mut dxp, groups, x, inv_x, grad_dtype, b, d)?;
                Ok(Grads { dx, dw })
            }
        }
    }
}

fn dtype_kernel(dtype: DType, f32k: Kernel, bf16k: Kernel, f16k: Kernel) -> Kernel {
    match dtype {
        DType::F32 => f32k,
        DType::BF16 => bf16k,
        DType::F16 => f16k,
    }
}

/// Inverse row norms 1 / max(||v||, 1e-12) (`kernels/norms.cu`).
fn inv_norms<T: DeviceElem>(dev: &Device, v: &Tensor<T>) -> Result<Tensor<f32>> {
    Ok(super::norms::row_norms(dev, v)?.1)
}

/// xh = v / max(||v||, eps) as f32, and the inverse norms.
fn ref_normalize<T: DeviceElem>(dev: &Device, v: &Tensor<T>) -> Result<(Tensor<f32>, Tensor<f32>)> {
    let (rows, d) = (v.shape()[0], v.shape()[1]);
    let mut vh = Tensor::<f32>::zeros(dev, &[rows, d])?;
    let mut inv = Tensor::<f32>::zeros(dev, &[rows])?;
    let f = dev.function(dtype_kernel(
        T::DTYPE,
        kr::REF_NORMALIZE_FWD_F32,
        kr::REF_NORMALIZE_FWD_BF16,
        kr::REF_NORMALIZE_FWD_F16,
    ))?;
    let (rows_i, d_i) = (rows as i32, d as i32);
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(v.slice()).arg(vh.slice_mut()).arg(inv.slice_mut()).arg(&rows_i).arg(&d_i);
    // SAFETY: v holds rows*d T, vh rows*d f32, inv rows f32 (allocated above, no aliasing);
    // one warp per row, 8 rows per block covers every row once.
    unsafe { bld.launch(grid1(rows, 8)) }.map_err(cuda_err("head_ref::ref_normalize"))?;
    Ok((vh, inv))
}

/// One cuBLAS SGEMM of the reference path (alpha 1, beta 0) along `plan`, with the
/// column-major operands (a, b) as [`ColGemm::row_major`] hands them over.
fn sgemm(
    dev: &Device,
    plan: ColGemm,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    c: &mut Tensor<f32>,
    what: &'static str,
) -> Result<()> {
    plan.check(a.len(), b.len(), c.len())?;
    let op = |t: bool| {
        if t {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let [m, n, k, lda, ldb, ldc] = plan.ints();
    let cfg = GemmConfig {
        transa: op(plan.trans_a),
        transb: op(plan.trans_b),
        m,
        n,
        k,
        alpha: 1.0f32,
        lda,
        ldb,
        beta: 0.0f32,
        ldc,
    };
    let blas = dev.cublas()?;
    // SAFETY: plan.check above: positive dimensions within int, leading dimensions at least
    // the stored rows, and a, b, c hold at least the elements the plan touches; c is a
    // distinct allocation from a and b.
    unsafe { blas.gemm(cfg, a.slice(), b.slice(), c.slice_mut()) }.map_err(blas_err(what))
}

/// cos [B, C] = xh [B, D] . wh [C, D]^T (cuBLAS SGEMM).
fn cos_gemm(dev: &Device, xh: &Tensor<f32>, wh: &Tensor<f32>, shape: HeadShape) -> Result<Tensor<f32>> {
    let mut cos = Tensor::<f32>::zeros(dev, &[shape.b, shape.c])?;
    sgemm(dev, head_gemms(shape)[0], wh, xh, &mut cos, "reference cos GEMM")?;
    Ok(cos)
}

/// dxh [B, D] = dc [B, C] . wh [C, D];  dwh [C, D] = dc^T . xh [B, D] (cuBLAS SGEMM).
fn grad_gemms(
    dev: &Device,
    dc: &Tensor<f32>,
    xh: &Tensor<f32>,
    wh: &Tensor<f32>,
    dxh: &mut Tensor<f32>,
    dwh: &mut Tensor<f32>,
    shape: HeadShape,
) -> Result<()> {
    let [_, dx, dw] = head_gemms(shape);
    sgemm(dev, dx, wh, dc, dxh, "reference dx GEMM")?;
    sgemm(dev, dw, xh, dc, dwh, "reference dW GEMM")
}

#[allow(clippy::too_many_arguments)]
fn ref_margin<T: DeviceElem>(
    dev: &Device,
    x: &Tensor<T>,
    w: &Tensor<T>,
    dl: &CudaSlice<i32>,
    sigma: &Tensor<f32>,
    p: HeadParams,
    out: &mut HeadForward,
    shape: HeadShape,
) -> Result<()> {
    let f = dev.function(dtype_kernel(
        T::DTYPE,
        kr::REF_MARGIN_FWD_F32,
        kr::REF_MARGIN_FWD_BF16,
        kr::REF_MARGIN_FWD_F16,
    ))?;
    let (b, d) = (shape.b as i32, shape.d as i32);
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(x.slice())
        .arg(w.slice())
        .arg(dl)
        .arg(sigma.slice())
        .arg(&p)
        .arg(out.c_iy.slice_mut())
        .arg(out.t.slice_mut())
        .arg(out.alpha.slice_mut())
        .arg(out.dt.slice_mut())
        .arg(&b)
        .arg(&d);
    // SAFETY: x is [B, D], w [C, D]; labels, c_iy, t, alpha, dt hold B entries; sigma holds
    // C entries whenever the cloud is on (checked); labels were checked to be < C.
    unsafe { bld.launch(grid1(shape.b, THREADS as usize)) }.map_err(cuda_err("head_ref::ref_margin_fwd"))?;
    Ok(())
}

fn ref_softmax(
    dev: &Device,
    cos: &Tensor<f32>,
    dl: &CudaSlice<i32>,
    p: HeadParams,
    out: &mut HeadForward,
    shape: HeadShape,
) -> Result<()> {
    let f = dev.function(kr::REF_SOFTMAX_FWD_F32)?;
    let c = shape.c as i32;
    let cfg =
        LaunchConfig { grid_dim: (shape.b as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(cos.slice())
        .arg(dl)
        .arg(out.t.slice())
        .arg(&p)
        .arg(out.lse.slice_mut())
        .arg(out.row_loss.slice_mut())
        .arg(&c);
    // SAFETY: one block per row of the [B, C] cos matrix; labels, t, lse, loss hold B entries.
    unsafe { bld.launch(cfg) }.map_err(cuda_err("head_ref::ref_softmax_fwd_f32"))?;
    Ok(())
}

fn reduce_loss(dev: &Device, rows: &Tensor<f32>, scale: f32, out: &mut Tensor<f32>) -> Result<()> {
    let f = dev.function(kr::HEAD_REDUCE_FWD_F32)?;
    let b = rows.len() as i32;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(rows.slice()).arg(&b).arg(&scale).arg(out.slice_mut());
    // SAFETY: rows holds B floats, out one float; a single block reads them all.
    unsafe { bld.launch(cfg) }.map_err(cuda_err("head_ref::head_reduce_fwd_f32"))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn ref_grad(
    dev: &Device,
    cos: &Tensor<f32>,
    dl: &CudaSlice<i32>,
    fwd: &HeadForward,
    row_g: Option<&Tensor<f32>>,
    g_scale: f32,
    p: HeadParams,
    dc: &mut Tensor<f32>,
    shape: HeadShape,
) -> Result<()> {
    let f = dev.function(kr::REF_GRAD_BWD_F32)?;
    let c = shape.c as i32;
    let null: u64 = 0;
    let cfg = LaunchConfig {
        grid_dim: (shape.c.div_ceil(THREADS as usize) as u32, shape.b as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(cos.slice()).arg(dl).arg(fwd.t.slice()).arg(fwd.dt.slice()).arg(fwd.lse.slice());
    match row_g {
        Some(g) => bld.arg(g.slice()),
        None => bld.arg(&null),
    };
    bld.arg(&g_scale).arg(&p).arg(dc.slice_mut()).arg(&c);
    // SAFETY: cos and dc are [B, C] (grid.y = B <= 65535 checked, grid.x covers C with a
    // bounds check); labels, t, dt, lse and row_g (or null) hold B entries.
    unsafe { bld.launch(cfg) }.map_err(cuda_err("head_ref::ref_grad_bwd_f32"))?;
    Ok(())
}

fn normback_kernel(dtype: DType, out_f32: bool) -> Kernel {
    match (dtype, out_f32) {
        (DType::F32, _) => kr::HEAD_NORMBACK_BWD_F32,
        (DType::BF16, false) => kr::HEAD_NORMBACK_BWD_BF16,
        (DType::F16, false) => kr::HEAD_NORMBACK_BWD_F16,
        (DType::BF16, true) => kr::HEAD_NORMBACK32_BWD_BF16,
        (DType::F16, true) => kr::HEAD_NORMBACK32_BWD_F16,
    }
}

/// out = (g - u (u . g)) * inv with g = sum of `nparts` partials [nparts, rows, d].
#[allow(clippy::too_many_arguments)]
fn normback<T: DeviceElem>(
    dev: &Device,
    parts: &mut Tensor<f32>,
    nparts: usize,
    v: &Tensor<T>,
    inv: &Tensor<f32>,
    grad_dtype: GradDtype,
    rows: usize,
    d: usize,
) -> Result<GradTensor<T>> {
    let out_f32 = grad_dtype == GradDtype::F32 || T::DTYPE == DType::F32;
    let f = dev.function(normback_kernel(T::DTYPE, out_f32))?;
    let (np, stride, rows_i, d_i) = (nparts as i32, (rows * d) as i64, rows as i32, d as i32);
    if out_f32 {
        // SAFETY: the kernel writes every element (one warp per row, every column).
        let mut out = unsafe { Tensor::<f32>::uninit(dev, &[rows, d]) }?;
        let mut bld = dev.stream().launch_builder(&f);
        bld.arg(parts.slice_mut()).arg(&np).arg(&stride).arg(v.slice()).arg(inv.slice()).arg(out.slice_mut());
        bld.arg(&rows_i).arg(&d_i);
        // SAFETY: parts holds nparts*rows*d f32, v rows*d T, inv rows, out rows*d f32 (distinct
        // buffers); one warp per row.
        unsafe { bld.launch(grid1(rows, 8)) }.map_err(cuda_err("head_ref::head_normback (f32 out)"))?;
        Ok(GradTensor::F32(out))
    } else {
        // SAFETY: as above.
        let mut out = unsafe { Tensor::<T>::uninit(dev, &[rows, d]) }?;
        let mut bld = dev.stream().launch_builder(&f);
        bld.arg(parts.slice_mut()).arg(&np).arg(&stride).arg(v.slice()).arg(inv.slice()).arg(out.slice_mut());
        bld.arg(&rows_i).arg(&d_i);
        // SAFETY: as above with out in T; the kernel's TO matches T (kernel picked by T::DTYPE).
        unsafe { bld.launch(grid1(rows, 8)) }.map_err(cuda_err("head_ref::head_normback (input dtype)"))?;
        Ok(GradTensor::Input(out))
    }
}

/// Whether `fused_*` (16-byte cp.async) can run, else `fused_scalar_*`.
pub fn fused_vectorized(dtype: DType, d: usize) -> bool {
    d % (16 / dtype.size()) == 0
}

/// Whether `t` starts on a 16-byte boundary, which cp.async needs besides a chunk-multiple D.
/// cudarc's own allocations always do; a buffer wrapped with `upgrade_device_ptr` (an
/// offset into a larger allocation) need not, and then the element-load kernels run.
fn aligned16<T: DeviceElem>(dev: &Device, t: &Tensor<T>) -> bool {
    let (ptr, _sync) = t.slice().device_ptr(dev.stream());
    ptr % 16 == 0
}

/// The VEC (cp.async) kernels only when D and both base addresses allow 16-byte chunks.
fn use_vectorized<T: DeviceElem>(dev: &Device, x: &Tensor<T>, w: &Tensor<T>, d: usize, scalar: bool) -> bool {
    !scalar && fused_vectorized(T::DTYPE, d) && aligned16(dev, x) && aligned16(dev, w)
}

#[allow(clippy::too_many_arguments)]
fn fused_fwd<T: DeviceElem>(
    dev: &Device,
    x: &Tensor<T>,
    w: &Tensor<T>,
    inv_x: &Tensor<f32>,
    inv_w: &Tensor<f32>,
    dl: &CudaSlice<i32>,
    sigma: &Tensor<f32>,
    p: HeadParams,
    part: &mut Tensor<f32>,
    out: &mut HeadForward,
    shape: HeadShape,
    (rows, cols): (usize, usize),
    scalar: bool,
) -> Result<()> {
    use kf::*;
    let vec = use_vectorized(dev, x, w, shape.d, scalar);
    let k = match ((rows, cols), vec) {
        ((128, 128), true) => dtype_kernel(T::DTYPE, FUSED_FWD_F32, FUSED_FWD_BF16, FUSED_FWD_F16),
        ((128, 128), false) => {
            dtype_kernel(T::DTYPE, FUSED_SCALAR_FWD_F32, FUSED_SCALAR_FWD_BF16, FUSED_SCALAR_FWD_F16)
        }
        ((64, 128), true) => {
            dtype_kernel(T::DTYPE, FUSED_ROWS64_FWD_F32, FUSED_ROWS64_FWD_BF16, FUSED_ROWS64_FWD_F16)
        }
        ((64, 128), false) => dtype_kernel(
            T::DTYPE,
            FUSED_ROWS64_SCALAR_FWD_F32,
            FUSED_ROWS64_SCALAR_FWD_BF16,
            FUSED_ROWS64_SCALAR_FWD_F16,
        ),
        ((64, 64), true) => {
            dtype_kernel(T::DTYPE, FUSED_TILE64_FWD_F32, FUSED_TILE64_FWD_BF16, FUSED_TILE64_FWD_F16)
        }
        ((64, 64), false) => dtype_kernel(
            T::DTYPE,
            FUSED_TILE64_SCALAR_FWD_F32,
            FUSED_TILE64_SCALAR_FWD_BF16,
            FUSED_TILE64_SCALAR_FWD_F16,
        ),
        _ => return Err(Error::InvalidConfig(format!("no fused forward kernel for a {rows} x {cols} tile"))),
    };
    let f = dev.function(k)?;
    let (b, c, d) = (shape.b as i32, shape.c as i32, shape.d as i32);
    let cfg = LaunchConfig {
        grid_dim: (shape.c.div_ceil(cols) as u32, shape.b.div_ceil(rows) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(x.slice())
        .arg(w.slice())
        .arg(inv_x.slice())
        .arg(inv_w.slice())
        .arg(dl)
        .arg(sigma.slice())
        .arg(&p);
    bld.arg(part.slice_mut())
        .arg(out.c_iy.slice_mut())
        .arg(out.t.slice_mut())
        .arg(out.alpha.slice_mut())
        .arg(out.dt.slice_mut());
    bld.arg(&b).arg(&c).arg(&d);
    // SAFETY: x [B, D], w [C, D] (the VEC kernel only when D is a multiple of the 16-byte
    // chunk and both base addresses are 16-byte aligned, checked above), inv_x/labels/outputs
    // [B], inv_w/sigma [C] (sigma unread when the cloud is off), part [3, n_ct, B] with n_ct = grid.x;
    // the grid covers C and B with the kernel's own tile (cols x rows, matched above); every
    // load is bounds-checked or zero-filled in the kernel; no output aliases an input.
    unsafe { bld.launch(cfg) }.map_err(cuda_err("head_fused::fused_fwd"))?;
    Ok(())
}

fn fused_combine(
    dev: &Device,
    part: &Tensor<f32>,
    n_ct: usize,
    dl: &CudaSlice<i32>,
    p: HeadParams,
    out: &mut HeadForward,
    shape: HeadShape,
) -> Result<()> {
    let f = dev.function(kf::FUSED_COMBINE_FWD_F32)?;
    let (n_ct_i, b) = (n_ct as i32, shape.b as i32);
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(part.slice()).arg(&n_ct_i).arg(dl).arg(out.t.slice_mut()).arg(&p);
    bld.arg(out.lse.slice_mut()).arg(out.row_loss.slice_mut());
    bld.arg(out.c_iy.slice_mut()).arg(out.alpha.slice_mut()).arg(out.dt.slice_mut()).arg(&b);
    // SAFETY: part is [3, n_ct, B]; labels, t, lse, loss, c_iy, alpha, dt hold B entries
    // (distinct buffers); one warp per row.
    unsafe { bld.launch(grid1(shape.b, 8)) }.map_err(cuda_err("head_fused::fused_combine_fwd_f32"))?;
    Ok(())
}

/// Where the fused backward finishes dW.
enum FusedDw<'a, T: DeviceElem> {
    /// S partial f32 sums of dwh ([S * C * D], S = the grid's row splits); the caller
    /// finishes dW.
    Partials(&'a mut Tensor<f32>),
    /// In f32, accumulated in place ([C, D]).
    F32(&'a mut Tensor<f32>),
    /// In the storage dtype ([C, D]), via f32 scratch of one class tile per CTA
    /// ([groups * class tile * D]).
    Input { acc: &'a mut Tensor<f32>, dw: &'a mut Tensor<T> },
}

#[allow(clippy::too_many_arguments)]
fn fused_bwd<T: DeviceElem>(
    dev: &Device,
    x: &Tensor<T>,
    w: &Tensor<T>,
    inv_x: &Tensor<f32>,
    inv_w: &Tensor<f32>,
    dl: &CudaSlice<i32>,
    fwd: &HeadForward,
    row_g: Option<&Tensor<f32>>,
    g_scale: f32,
    p: HeadParams,
    dxp: &mut Tensor<f32>,
    out: FusedDw<'_, T>,
    (cols, groups, splits): (usize, usize, usize),
    shape: HeadShape,
    scalar: bool,
) -> Result<()> {
    use kf::*;
    let vec = use_vectorized(dev, x, w, shape.d, scalar);
    let k = match (cols, vec) {
        (BWD_BN, true) => dtype_kernel(T::DTYPE, FUSED_BWD_F32, FUSED_BWD_BF16, FUSED_BWD_F16),
        (BWD_BN, false) => {
            dtype_kernel(T::DTYPE, FUSED_SCALAR_BWD_F32, FUSED_SCALAR_BWD_BF16, FUSED_SCALAR_BWD_F16)
        }
        (BWD_BN_SMALL, true) => {
            dtype_kernel(T::DTYPE, FUSED_COLS64_BWD_F32, FUSED_COLS64_BWD_BF16, FUSED_COLS64_BWD_F16)
        }
        (BWD_BN_SMALL, false) => dtype_kernel(
            T::DTYPE,
            FUSED_COLS64_SCALAR_BWD_F32,
            FUSED_COLS64_SCALAR_BWD_BF16,
            FUSED_COLS64_SCALAR_BWD_F16,
        ),
        _ => return Err(Error::InvalidConfig(format!("no fused backward kernel for {cols}-class tiles"))),
    };
    let f = dev.function(k)?;
    let smem = bwd_smem_bytes(T::DTYPE, cols);
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(cuda_err("head_fused::fused_bwd shared-memory opt-in"))?;
    let (b, c, d) = (shape.b as i32, shape.c as i32, shape.d as i32);
    let null: u64 = 0;
    debug_assert!(splits == 1 || matches!(out, FusedDw::Partials(_)));
    let cfg = LaunchConfig {
        grid_dim: (groups as u32, splits as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem,
    };
    let mut bld = dev.stream().launch_builder(&f);
    bld.arg(x.slice()).arg(w.slice()).arg(inv_x.slice()).arg(inv_w.slice()).arg(dl);
    bld.arg(fwd.t.slice()).arg(fwd.dt.slice()).arg(fwd.lse.slice());
    match row_g {
        Some(g) => bld.arg(g.slice()),
        None => bld.arg(&null),
    };
    bld.arg(&g_scale).arg(&p).arg(dxp.slice_mut());
    match out {
        FusedDw::Partials(dwp) => bld.arg(&null).arg(&null).arg(&null).arg(dwp.slice_mut()),
        FusedDw::F32(dw) => bld.arg(&null).arg(&null).arg(dw.slice_mut()).arg(&null),
        FusedDw::Input { acc, dw } => bld.arg(acc.slice_mut()).arg(dw.slice_mut()).arg(&null).arg(&null),
    };
    bld.arg(&b).arg(&c).arg(&d);
    // SAFETY: x [B, D], w [C, D] (the VEC kernel only when D and both base addresses allow
    // 16-byte chunks, checked above), per-row inputs [B], inv_w [C]; dxp holds groups*B*D f32;
    // exactly one dW destination: S*C*D f32 partials (splits > 1 only with these), f32 [C, D],
    // or T [C, D] with groups*BWD_BN*D f32 of scratch; all distinct buffers; groups <= class
    // tiles and splits <= row tiles (bwd_grid clamps); CTA (g, s) writes only its rows of
    // dxp[g], its scratch slice, its partial slice and the dW rows of its class tiles; the
    // dynamic smem size is the one the kernel was written for.
    unsafe { bld.launch(cfg) }.map_err(cuda_err("head_fused::fused_bwd"))?;
    Ok(())
}
