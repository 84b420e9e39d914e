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
//!
//! Sub-centers (SPEC 5b, `head.subcenters` = K > 1): W is `[C*K, D]`. The reference path
//! takes any K (B x C*K matrices); the fused path takes K > 1 in its attention-form kernels
//! (class-aligned tiles, each class counted once through its arg-max sub-center) without
//! label smoothing, and refuses it where those kernels do not apply ([`HeadOn::fused_kernels`]).
//! [`HeadForward::k_iy`] reports each row's dominant target sub-center.

mod attn;
mod fused;
pub mod plan;
mod reference;
mod scratch;
pub mod verify;

pub use plan::{
    attn_row_split_tiles, attn_supported, backward_cols_for, backward_grid_for, forward_tile_for,
    fused_vectorized, workspace_for, FusedKernels, FusedTuning, FORWARD_TILES,
};

use super::args::{HeadParams, HeadReduceArgs};
use super::{Device, DeviceElem, Launch, Tensor};
use crate::check::check_head_inputs;
use crate::config::{CloudMode, HeadConfig, Reduction};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::HeadShape;
use plan::{backward_cols_for as bwd_cols_for, Plan, BWD_BM, BWD_BN, BWD_BN_SMALL, FWD_BM_SMALL};
use scratch::{Scratch, Slot};
use std::ops::Deref;
use std::sync::{Arc, Mutex};

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
    /// k*_iy `[B]`, the target's dominant sub-center (SPEC 5b; 0 for ignored rows): written by
    /// the reference path (any K) and the attention-form kernels (K > 1); `None` from the
    /// fused path with K = 1 (all 0).
    k_iy: Option<Tensor<u32>>,
    shape: HeadShape,
    /// What the attention-form kernels keep for their backward (dx for unit row weights,
    /// the inverse norms); `None` from the other kernels.
    attn: Option<attn::AttnSaved>,
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

    /// k*_iy `[B]` on the device, the target's dominant sub-center (SPEC 5b; 0 for ignored
    /// rows), as the reference path (any K) and the fused path (K > 1) write it; `None` from the
    /// fused path with one center per class (there every k*_iy is 0).
    pub fn k_iy(&self) -> Option<&Tensor<u32>> {
        self.k_iy.as_ref()
    }

    /// k*_iy `[B]` on the host (zeros from the fused path, see [`HeadForward::k_iy`]).
    pub fn k_iy_to_host(&self, dev: &Device) -> Result<Vec<u32>> {
        match &self.k_iy {
            Some(t) if self.shape.b > 0 => t.to_host(dev),
            _ => Ok(vec![0; self.shape.b]),
        }
    }
}

impl HeadForward {
    /// Per-row outputs at `shape` from `make` (one call per tensor), loss not read yet.
    fn alloc_with(shape: HeadShape, n_valid: usize, make: impl Fn() -> Result<Tensor<f32>>) -> Result<Self> {
        Ok(HeadForward {
            loss: 0.0,
            n_valid,
            row_loss: make()?,
            lse: make()?,
            c_iy: make()?,
            t: make()?,
            alpha: make()?,
            dt: make()?,
            k_iy: None,
            shape,
            attn: None,
        })
    }

    /// Zero-filled per-row outputs.
    fn alloc_zeroed(dev: &Device, shape: HeadShape, n_valid: usize) -> Result<Self> {
        Self::alloc_with(shape, n_valid, || Tensor::zeros(dev, &[shape.b]))
    }

    /// Per-row outputs left uninitialized.
    ///
    /// # Safety
    /// The caller's kernels must write every element of every tensor before it is read.
    unsafe fn alloc_uninit(dev: &Device, shape: HeadShape, n_valid: usize) -> Result<Self> {
        // SAFETY: forwarded from the caller.
        Self::alloc_with(shape, n_valid, || unsafe { Tensor::uninit(dev, &[shape.b]) })
    }
}

/// A forward whose kernels are queued but whose loss is not read back yet.
struct ForwardLaunched {
    out: HeadForward,
    /// The reduced loss, on the device.
    total: Tensor<f32>,
    /// The fused path's inverse norms (x, W), for a backward of the same inputs.
    inv: Option<(Tensor<f32>, Tensor<f32>)>,
    /// `Some(scale)` when the loss reduction into `total` was left to the backward queued
    /// in the same call (the attention-form backward does it in its first block, which
    /// saves a launch); `scale` is the reduction's factor.
    deferred_reduce: Option<f32>,
}

impl ForwardLaunched {
    /// Reads the loss back (waits for the queued work), returns the scratch it held
    /// and the forward.
    fn finish(mut self, dev: &Device, scratch: &mut Scratch) -> Result<HeadForward> {
        self.out.loss = self.total.to_host(dev)?[0];
        scratch.put(Slot::Total, self.total);
        if let Some((ix, iw)) = self.inv {
            scratch.put(Slot::InvX, ix);
            scratch.put(Slot::InvW, iw);
        }
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

/// The margin head on one device, holding the device through `D` (an
/// `Arc<Device>` for [`CudaHead`], a plain `&Device` for short-lived checks).
#[derive(Debug)]
pub struct HeadOn<D: Deref<Target = Device>> {
    dev: D,
    cfg: HeadConfig,
    path: HeadPath,
    tuning: FusedTuning,
    /// Scratch kept between calls (labels, inverse norms, partials).
    scratch: Mutex<Scratch>,
}

/// The margin head owning a handle to its device: what trainers keep.
pub type CudaHead = HeadOn<Arc<Device>>;

/// Every head path x dtype x a few option sets at small sizes against the CPU
/// oracle (`featcloud smoke`); see [`verify::smoke`].
pub fn smoke(dev: &Device) -> Result<Vec<super::SmokeLine>> {
    verify::smoke(dev)
}

inventory::submit! { super::SmokeCheck { family: "head", run: smoke } }

/// Whether the fused path takes `k` sub-centers per class (SPEC 5b) for storage `dtype` and
/// feature size `d` on a device allowing `max_smem` bytes of shared memory per block: K = 1
/// always; K > 1 where the attention-form kernels run ([`attn_supported`]) and a resident
/// tile holds a whole class (K <= 16 at D > 512, K <= 32 elsewhere). Label smoothing is a
/// separate condition ([`HeadOn::new`] refuses it with K > 1 on the fused path).
pub fn fused_takes_subcenters(dtype: DType, d: usize, k: usize, max_smem: u32) -> bool {
    k == 1
        || (attn_supported(dtype, d, max_smem)
            && (1..=plan::attn_rows(dtype, plan::attn_dp(d)).min(plan::ATTN_BT)).contains(&k))
}

fn i32_dim(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Shape(format!("{name} = {v} exceeds i32 indexing")))
}

impl<D: Deref<Target = Device> + Clone> HeadOn<D> {
    /// The same head (device, options, path, tuning) with none of the scratch this one
    /// keeps between calls (benchmarks: to measure what a first call allocates).
    pub fn without_scratch(&self) -> Self {
        Self {
            dev: self.dev.clone(),
            cfg: self.cfg,
            path: self.path,
            tuning: self.tuning,
            scratch: Mutex::new(Scratch::default()),
        }
    }
}

impl<D: Deref<Target = Device>> HeadOn<D> {
    /// A head with options `cfg` (validated here) running `path` on `dev`.
    pub fn new(dev: D, cfg: HeadConfig, path: HeadPath) -> Result<Self> {
        cfg.validate()?;
        if cfg.subcenters != 1 && path == HeadPath::Fused && cfg.label_smoothing != 0.0 {
            // The attention form's label-smoothing term sums wh_j over the classes once for all
            // rows; with sub-centers it would be each row's own arg-max rows (SPEC 5b).
            return Err(Error::InvalidConfig(format!(
                "head.subcenters = {} with head.label_smoothing = {}: the fused CUDA head takes \
                 sub-centers without label smoothing only; run it on the reference path \
                 (HeadPath::Reference)",
                cfg.subcenters, cfg.label_smoothing
            )));
        }
        Ok(Self { dev, cfg, path, tuning: FusedTuning::default(), scratch: Mutex::new(Scratch::default()) })
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
            _ => bwd_cols_for(shape, self.dev.info().sm_count.max(1) as usize),
        }
    }

    /// The fused backward's grid: G CTAs per row split (and dx partial buffers) and S
    /// row splits.
    fn bwd_grid(&self, shape: HeadShape) -> (usize, usize) {
        let sm = self.dev.info().sm_count.max(1) as usize;
        let cols = self.bwd_cols(shape);
        let g = match self.tuning.backward_ctas {
            Some(g) => g.clamp(1, shape.c.div_ceil(cols)),
            None => plan::bwd_groups(shape, sm, cols),
        };
        let s = match self.tuning.row_splits {
            Some(s) => s.clamp(1, shape.b.div_ceil(BWD_BM)),
            None => plan::bwd_row_splits(shape, sm, g),
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

    /// The fused path's kernel set at `shape` for storage `dtype`: the tuning's, else the
    /// attention-form kernels where [`attn_supported`] holds on this device, else the tiles.
    /// Asking for the attention form where it does not apply is an error, and so is K > 1
    /// sub-centers (SPEC 5b) anywhere but in the attention form ([`fused_takes_subcenters`]).
    pub fn fused_kernels(&self, shape: HeadShape, dtype: DType) -> Result<FusedKernels> {
        let ok = attn_supported(dtype, shape.d, self.dev.info().max_smem_per_block);
        let k = self.subcenters();
        if k > 1
            && (!fused_takes_subcenters(dtype, shape.d, k, self.dev.info().max_smem_per_block)
                || self.tuning.kernels == Some(FusedKernels::Tiles))
        {
            return Err(Error::InvalidConfig(format!(
                "head.subcenters = {k}: the fused CUDA head takes sub-centers in its attention-form \
                 kernels only, which do not run {} with D = {} on this device (or were not asked for); \
                 run it on the reference path (HeadPath::Reference)",
                dtype.name(),
                shape.d
            )));
        }
        match self.tuning.kernels {
            Some(FusedKernels::Attention) if !ok => Err(Error::InvalidConfig(format!(
                "the attention-form kernels take D <= {} ({} in bf16) and {} bytes of shared memory; got {} with D = {} on a device with {}",
                plan::ATTN_DMAX_ALL,
                plan::ATTN_DMAX,
                plan::attn_smem_bytes(dtype, plan::attn_dp(shape.d)),
                dtype.name(),
                shape.d,
                self.dev.info().max_smem_per_block
            ))),
            Some(k) => Ok(k),
            None if ok => Ok(FusedKernels::Attention),
            None => Ok(FusedKernels::Tiles),
        }
    }

    /// The attention-form forward's (class splits, class tiles per split) at `shape`, as
    /// the dispatcher (or the tuning) picks them.
    pub fn attention_splits(&self, shape: HeadShape, dtype: DType) -> (usize, usize) {
        let k = self.subcenters();
        match self.tuning.class_splits {
            Some(n) => plan::attn_split_tiles_k(shape, k, n),
            None => plan::attn_splits_k(dtype, shape, k),
        }
    }

    /// The attention-form backward's (row splits, x row tiles per split) at `shape`, as the
    /// dispatcher (or the tuning) picks them.
    pub fn attention_row_splits(&self, shape: HeadShape, dtype: DType) -> (usize, usize) {
        match self.tuning.attn_row_splits {
            Some(n) => plan::attn_row_split_tiles(shape, n),
            None => plan::attn_bwd_row_splits(dtype, shape, self.subcenters()),
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
        if self.path == HeadPath::Reference {
            // The reference path's buffers scale with W's C*K rows (SPEC 5b).
            let rows = HeadShape { c: shape.c * self.subcenters(), ..shape };
            return workspace_for(self.path, rows, dtype, grad, 1);
        }
        let (g, s) = self.bwd_grid(shape);
        let kernels = self.fused_kernels(shape, dtype).unwrap_or(FusedKernels::Tiles);
        let plan = Plan {
            kernels,
            class_splits: self.attention_splits(shape, dtype).0,
            attn_row_splits: self.attention_row_splits(shape, dtype).0,
            fwd_cols: self.forward_tile(shape).1,
            bwd_cols: self.bwd_cols(shape),
            g,
            s,
            k: self.subcenters(),
        };
        plan::workspace_with_groups(self.path, shape, dtype, grad, plan)
    }

    /// Peak scratch bytes of [`CudaHead::forward_backward`] with gradients in the
    /// input dtype (the larger case), known before the call is made.
    pub fn workspace_bytes(&self, shape: HeadShape, dtype: DType) -> usize {
        let w = self.workspace(shape, dtype, GradDtype::Input);
        w.forward.max(w.backward)
    }

    fn params(&self, shape: HeadShape, seed: u64, step: u64) -> HeadParams {
        HeadParams::new(&self.cfg, shape.c, seed, step)
    }

    /// K, the sub-centers per class (`head.subcenters`, SPEC 5b).
    fn subcenters(&self) -> usize {
        self.cfg.subcenters as usize
    }

    /// Checks x [B, D], W [C*K, D] (K = `head.subcenters`), labels [B] and sigma_cloud [C]
    /// (any length when the cloud is off) before anything is launched; the shape it returns
    /// counts classes (C), not W's rows.
    fn check<T: DeviceElem>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        labels: &[i32],
        sigma: &Tensor<f32>,
    ) -> Result<HeadShape> {
        let k = self.subcenters();
        let (&[b, d], &[wrows, d2]) = (x.shape(), w.shape()) else {
            return Err(Error::Shape(format!(
                "x must be [B, D] and W [C*K, D] (K = head.subcenters = {k}), got {:?} and {:?}",
                x.shape(),
                w.shape()
            )));
        };
        if d != d2 {
            return Err(Error::Shape(format!("x has D = {d} but W has D = {d2}")));
        }
        if wrows % k != 0 {
            return Err(Error::Shape(format!(
                "W has {wrows} rows, not a multiple of K = head.subcenters = {k} (W is [C*K, D], SPEC 5b)"
            )));
        }
        let c = wrows / k;
        let shape = HeadShape { b, c, d };
        let sigma_len = if self.cfg.cloud == CloudMode::Off { None } else { Some(sigma.len()) };
        check_head_inputs(shape, k, x.len(), w.len(), labels, sigma_len)?;
        i32_dim("B", b)?;
        i32_dim("C", c)?;
        i32_dim("D", d)?;
        i32_dim("C*K", wrows)?;
        if self.path == HeadPath::Reference {
            i32_dim("B*C*K", b * wrows)?;
            if b > 65_535 {
                return Err(Error::Shape(format!("the reference path supports B <= 65535, got {b}")));
            }
        }
        if shape.b.div_ceil(FWD_BM_SMALL) > 65_535 {
            return Err(Error::Shape(format!("B = {b} is too large for the fused grid")));
        }
        Ok(shape)
    }

    /// The scratch, locked for one call (a panic in another call leaves it usable:
    /// every buffer in it is written before it is read).
    fn scratch(&self) -> std::sync::MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|p| p.into_inner())
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
        self.call(x, w, labels, sigma_cloud, None, None, |shape, dl, scratch| {
            let launched =
                self.forward_impl(x, w, labels, dl, sigma_cloud, shape, seed, step, false, scratch)?;
            let out = launched.finish(&self.dev, scratch)?;
            self.check_loss(x, w, labels, out.loss)?;
            Ok(out)
        })
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
        self.call(x, w, labels, sigma_cloud, Some(fwd.shape), Some(upstream), |shape, dl, scratch| {
            self.backward_impl(x, w, labels, dl, fwd, None, shape, upstream, grad_dtype, scratch)
        })
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
        self.call(x, w, labels, sigma_cloud, None, Some(upstream), |shape, dl, scratch| {
            let launched =
                self.forward_impl(x, w, labels, dl, sigma_cloud, shape, seed, step, true, scratch)?;
            // The backward reuses the forward's inverse norms (same x and W), may finish its
            // loss reduction, and is queued before the loss is read back, so the device runs
            // both without a host round trip.
            let out = &launched.out;
            let grads = self.backward_impl(
                x,
                w,
                labels,
                dl,
                out,
                Some(&launched),
                shape,
                upstream,
                grad_dtype,
                scratch,
            )?;
            let out = launched.finish(&self.dev, scratch)?;
            self.check_loss(x, w, labels, out.loss)?;
            Ok((out, grads))
        })
    }

    /// The non-finite policy on the device (SPEC 2): the loss, read back anyway, is the flag, as
    /// a NaN or infinity in a valid row of x or in W reaches it; only when it is not finite are
    /// x and W copied back to name the first non-finite value ([`Error::NonFinite`]: x's valid
    /// rows, then W; ignored rows may hold anything). Both finite: the loss itself overflowed.
    fn check_loss<T: DeviceElem>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        labels: &[i32],
        loss: f32,
    ) -> Result<()> {
        if loss.is_finite() {
            return Ok(());
        }
        let d = x.shape()[1];
        crate::check::check_finite_rows("x", &x.to_f32_host(&self.dev)?, d, labels)?;
        crate::check::check_finite("W", &w.to_f32_host(&self.dev)?)?;
        Err(Error::NonFinite { what: "the loss (x and W are finite)".into(), index: 0 })
    }

    /// What every public call does around its launches: checks the inputs (for a
    /// backward also the forward's shape, then the upstream) before anything is
    /// launched, uploads the labels into the locked scratch, runs `body` with the
    /// checked shape, the device labels and the scratch, and puts the labels buffer
    /// back for the next call.
    #[allow(clippy::too_many_arguments)]
    fn call<T: DeviceElem, R>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        labels: &[i32],
        sigma_cloud: &Tensor<f32>,
        forward_shape: Option<HeadShape>,
        upstream: Option<HeadUpstream>,
        body: impl FnOnce(HeadShape, &Tensor<i32>, &mut Scratch) -> Result<R>,
    ) -> Result<R> {
        let shape = self.check(x, w, labels, sigma_cloud)?;
        if let Some(fs) = forward_shape.filter(|&fs| fs != shape) {
            return Err(Error::Shape(format!("forward ran at {fs}, backward called at {shape}")));
        }
        if let Some(up) = upstream {
            self.check_upstream(shape, up)?;
        }
        let mut scratch = self.scratch();
        let dl = scratch.labels(&self.dev, labels)?;
        let r = body(shape, &dl, &mut scratch)?;
        scratch.put_labels(dl);
        Ok(r)
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
        dl: &Tensor<i32>,
        sigma: &Tensor<f32>,
        shape: HeadShape,
        seed: u64,
        step: u64,
        defer_reduce: bool,
        scratch: &mut Scratch,
    ) -> Result<ForwardLaunched> {
        let n_valid = labels.iter().filter(|&&y| y >= 0).count();
        let scale = match self.cfg.reduction {
            Reduction::Mean if n_valid == 0 => 0.0,
            Reduction::Mean => 1.0 / n_valid as f32,
            Reduction::Sum | Reduction::None => 1.0,
        };
        let inputs =
            Inputs { x, w, labels: dl, shape, k: self.subcenters(), p: self.params(shape, seed, step) };
        let job = ForwardJob { sigma, n_valid, scale };
        match self.path {
            HeadPath::Reference => reference::forward(&self.dev, &inputs, job, scratch),
            HeadPath::Fused => match self.fused_kernels(shape, T::DTYPE)? {
                FusedKernels::Attention => {
                    let splits = self.attention_splits(shape, T::DTYPE);
                    attn::forward(
                        &self.dev,
                        &inputs,
                        job,
                        splits,
                        self.attention_row_splits(shape, T::DTYPE).0,
                        self.tuning.scalar_loads,
                        defer_reduce,
                        scratch,
                    )
                }
                FusedKernels::Tiles => {
                    let choice =
                        fused::FwdChoice { tile: self.forward_tile(shape), scalar: self.tuning.scalar_loads };
                    fused::forward(&self.dev, &inputs, job, choice, scratch)
                }
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_impl<T: DeviceElem>(
        &self,
        x: &Tensor<T>,
        w: &Tensor<T>,
        labels: &[i32],
        dl: &Tensor<i32>,
        fwd: &HeadForward,
        same_call: Option<&ForwardLaunched>,
        shape: HeadShape,
        up: HeadUpstream,
        grad_dtype: GradDtype,
        scratch: &mut Scratch,
    ) -> Result<Grads<T>> {
        let inv = same_call.and_then(|l| l.inv.as_ref().map(|(a, b)| (a, b)));
        let mut deferred = same_call.and_then(|l| l.deferred_reduce.map(|scale| (scale, &l.total)));
        let n_valid = labels.iter().filter(|&&y| y >= 0).count();
        let (g_scale, row_g) = match up {
            HeadUpstream::Scalar(g) => match self.cfg.reduction {
                Reduction::Mean if n_valid == 0 => (0.0, None),
                Reduction::Mean => (g / n_valid as f32, None),
                _ => (g, None),
            },
            HeadUpstream::PerRow(t) => (1.0, Some(t)),
        };
        // The backward draws no cloud noise: Philox (0, 0) is never read.
        let inputs = Inputs { x, w, labels: dl, shape, k: self.subcenters(), p: self.params(shape, 0, 0) };
        let up = Upstream { row_g, g_scale };
        let attention = self.path == HeadPath::Fused
            && fwd.attn.is_some()
            && self.fused_kernels(shape, T::DTYPE)? == FusedKernels::Attention;
        if !attention {
            if let Some((scale, total)) = deferred.take() {
                // Only the attention-form backward reduces the loss; none follows here.
                // SAFETY: row_loss [B] from the forward, total [1]; head_reduce writes total.
                unsafe { self.dev.launch(&reduce_launch(fwd, total, scale)) }?;
            }
        }
        match self.path {
            HeadPath::Reference => reference::backward(&self.dev, &inputs, fwd, up, grad_dtype),
            // A forward of the attention-form kernels left dx for unit weights: only dW is left.
            // (A forward from another path or kernel set has no such state; the tiles finish it.)
            HeadPath::Fused if attention => {
                let saved = fwd.attn.as_ref().expect("checked by the guard");
                let reduce = deferred.map(|(scale, total)| (scale, total.ptr()));
                let choice = attn::BwdChoice {
                    row_splits: self.attention_row_splits(shape, T::DTYPE),
                    class_splits: self.attention_splits(shape, T::DTYPE).0,
                    scalar: self.tuning.scalar_loads,
                };
                attn::backward(&self.dev, &inputs, fwd, saved, up, grad_dtype, choice, reduce, scratch)
            }
            HeadPath::Fused => {
                let (groups, splits) = self.bwd_grid(shape);
                let choice = fused::BwdChoice {
                    cols: self.bwd_cols(shape),
                    groups,
                    splits,
                    scalar: self.tuning.scalar_loads,
                };
                fused::backward(&self.dev, &inputs, fwd, inv, up, grad_dtype, choice, scratch)
            }
        }
    }
}

/// The device inputs of one head call, checked ([`HeadOn::check`]), and its kernel
/// parameters.
struct Inputs<'a, T: DeviceElem> {
    x: &'a Tensor<T>,
    w: &'a Tensor<T>,
    labels: &'a Tensor<i32>,
    /// B, C (classes), D; W has C*K rows.
    shape: HeadShape,
    /// K, sub-centers per class (1 on the fused tiles kernels).
    k: usize,
    p: HeadParams,
}

/// What a forward needs besides its [`Inputs`].
#[derive(Clone, Copy)]
struct ForwardJob<'a> {
    /// sigma_cloud `[C]` (unread when the cloud is off).
    sigma: &'a Tensor<f32>,
    /// Rows with a non-negative label.
    n_valid: usize,
    /// The factor the summed row losses are multiplied by (1 / n_valid for the mean).
    scale: f32,
}

impl ForwardJob<'_> {
    /// `head_reduce_fwd_f32`: the reduced loss of `out`'s row losses into `total` `[1]`
    /// (the last launch of either path's forward; it always writes its one element).
    fn reduce(&self, out: &HeadForward, total: &Tensor<f32>) -> Launch {
        reduce_launch(out, total, self.scale)
    }
}

/// `head_reduce_fwd_f32` of `out`'s row losses times `scale` into `total` `[1]`.
fn reduce_launch(out: &HeadForward, total: &Tensor<f32>, scale: f32) -> Launch {
    plan::head_reduce(
        out.shape.b,
        HeadReduceArgs { loss_rows: out.row_loss.ptr(), out: total.ptr(), scale, ..Default::default() },
    )
}

/// The backward's upstream gradient as the kernels take it: a scale and optional
/// per-row weights.
#[derive(Clone, Copy)]
struct Upstream<'a> {
    row_g: Option<&'a Tensor<f32>>,
    g_scale: f32,
}
