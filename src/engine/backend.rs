//! The operations the training engine needs from a compute backend.
//!
//! One engine ([`crate::engine::Trainer`]) runs on any implementation: the CPU
//! backend ([`crate::cpu::CpuBackend`]) implements it today; a CUDA backend
//! implements the same trait with cuBLAS GEMMs, this crate's head and
//! statistics kernels and a fused optimizer kernel. Tensors live in the
//! backend's memory as [`Backend::Buf`] (flat, row-major, f32 master copies);
//! labels and small per-step scalars cross as host slices.

use crate::config::{HeadConfig, StatsConfig};
use crate::engine::optim::{OptimizerConfig, OptimizerKind};
use crate::error::{Error, Result};
use crate::shape::HeadShape;
use crate::stats::StatsState;

/// Elementwise activation after a bias add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// y = x + b.
    Identity,
    /// y = max(x + b, 0).
    Relu,
}

/// `C = alpha * op(A) op(B) + beta * C` on row-major buffers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// Use A^T (A stored [k, m]).
    pub trans_a: bool,
    /// Use B^T (B stored [n, k]).
    pub trans_b: bool,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Reduction length.
    pub k: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old C (0: C is overwritten).
    pub beta: f32,
}

/// What the head's fused forward+backward returns to the host each step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadStep {
    /// Reduced loss of the batch.
    pub loss: f64,
    /// Non-ignored rows.
    pub n_valid: usize,
    /// Clamped target cosines c_iy `[B]` (feed the class-weight statistics).
    pub c_iy: Vec<f32>,
    /// The target's dominant sub-center k*_iy `[B]` (SPEC 5b; all 0 with one center per
    /// class): the EMA statistics measure row i from center (y_i, k*_iy).
    pub k_iy: Vec<u32>,
}

/// The inputs of one head step: `x [B, D]`, `w [C*K, D]` (K sub-centers per class), `labels [B]` (negative:
/// ignored row), `sigma_cloud [C]`, and the cloud RNG's (seed, step).
pub struct HeadBatch<'a, Buf> {
    /// B, C, D.
    pub shape: HeadShape,
    /// Embeddings `[B, D]`.
    pub x: &'a Buf,
    /// Class weights `[C*K, D]` (class j's sub-center k is row j*K + k; K = 1: `[C, D]`).
    pub w: &'a Buf,
    /// Labels `[B]`.
    pub labels: &'a [i32],
    /// Cloud std per class `[C]`.
    pub sigma_cloud: &'a Buf,
    /// RNG seed of the run.
    pub seed: u64,
    /// Step (RNG counter).
    pub step: u64,
}

/// Errors unless two buffers that must match have the same element count.
pub fn same_len(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::Shape(format!("{what}: {a} vs {b} elements")));
    }
    Ok(())
}

/// Rows of a `[rows, cols]` buffer of `len` elements (error if `len` is not a multiple).
pub fn rows_of(what: &str, len: usize, cols: usize) -> Result<usize> {
    if cols == 0 || len % cols != 0 {
        return Err(Error::Shape(format!("{what}: {len} elements is not a multiple of {cols} columns")));
    }
    Ok(len / cols)
}

/// Per-step hyper-parameters of the optimizer (the schedule's output).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimStep {
    /// Learning rate this step.
    pub lr: f32,
    /// Decoupled (AdamW) or L2 (SGD) weight decay for this tensor (0 for biases).
    pub weight_decay: f32,
    /// 1-based count of optimizer steps (Adam bias correction).
    pub t: u64,
}

/// A compute backend for the engine. Every method validates shapes and returns
/// `Err` rather than panicking; all results must be bitwise reproducible for
/// the same inputs on the same device.
pub trait Backend {
    /// A flat f32 tensor in the backend's memory.
    type Buf;
    /// Per-class LEAP statistics in the backend's memory.
    type Stats;

    /// Human-readable name, e.g. `cpu (2 threads)`.
    fn name(&self) -> String;
    /// A zero-filled buffer of `len` elements.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// Copies host data into a new buffer.
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    /// Overwrites `buf` with `host` (same length).
    fn write(&self, buf: &mut Self::Buf, host: &[f32]) -> Result<()>;
    /// Copies a buffer back to the host.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Number of elements of a buffer.
    fn len(&self, buf: &Self::Buf) -> usize;

    /// `c = alpha * op(a) op(b) + beta * c` (see [`Gemm`]).
    fn gemm(&self, g: Gemm, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf) -> Result<()>;
    /// In place on `y` [rows, bias.len()]: `y = act(y + bias)`.
    fn bias_act_forward(&self, y: &mut Self::Buf, bias: &Self::Buf, act: Activation) -> Result<()>;
    /// Backward of [`Backend::bias_act_forward`]: given the activation output `y`
    /// and `dy` [rows, cols], masks `dy` in place to the pre-activation gradient
    /// and writes `dbias` `[cols]` = its column sums.
    fn bias_act_backward(
        &self,
        dy: &mut Self::Buf,
        y: &Self::Buf,
        dbias: &mut Self::Buf,
        act: Activation,
    ) -> Result<()>;

    /// Margin head forward and backward (SPEC sections 3-4) of `batch` with
    /// upstream gradient 1: writes `dx` [B, D] and `dw` [C*K, D] (K sub-centers per class).
    fn head_forward_backward(
        &self,
        cfg: &HeadConfig,
        batch: HeadBatch<'_, Self::Buf>,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
    ) -> Result<HeadStep>;

    /// Fresh class statistics for C classes of `subcenters` sub-centers each and dimension D.
    fn stats_new(&self, c: usize, subcenters: usize, d: usize, cfg: &StatsConfig) -> Result<Self::Stats>;
    /// sigma_cloud `[C]` from the current statistics (zeros during the warm-up).
    fn stats_cloud_sigma(&self, stats: &Self::Stats, out: &mut Self::Buf) -> Result<()>;
    /// One statistics update with this batch (SPEC sections 5 and 5b): from the
    /// detached embeddings `x` [B, D] and the head's target sub-centers `head.k_iy`
    /// (EMA centers), or from its target cosines `head.c_iy` (class-weight centers).
    fn stats_update(
        &self,
        stats: &mut Self::Stats,
        x: &Self::Buf,
        labels: &[i32],
        head: &HeadStep,
    ) -> Result<()>;
    /// Host copy of the statistics (configuration included).
    fn stats_export(&self, stats: &Self::Stats) -> Result<StatsState>;
    /// Statistics restored from a host copy (with the copy's configuration).
    fn stats_import(&self, state: &StatsState) -> Result<Self::Stats>;

    /// Checks the buffers of [`Backend::optimizer_step`]: `grad` and each of the
    /// [`OptimizerKind::state_count`] `state` buffers as long as `param`.
    fn check_optimizer(
        &self,
        opt: &OptimizerConfig,
        param: &Self::Buf,
        grad: &Self::Buf,
        state: &[Self::Buf],
    ) -> Result<()> {
        let n = self.len(param);
        same_len("optimizer param/grad", n, self.len(grad))?;
        if state.len() != opt.kind.state_count() {
            return Err(Error::Shape(format!(
                "optimizer state: {} buffers, expected {}",
                state.len(),
                opt.kind.state_count()
            )));
        }
        state.iter().try_for_each(|s| same_len("optimizer state", self.len(s), n))
    }

    /// One optimizer step on `param` with gradient `grad`; `state` holds
    /// [`OptimizerKind::state_count`] buffers of the parameter's length.
    fn optimizer_step(
        &self,
        opt: &OptimizerConfig,
        hp: OptimStep,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        state: &mut [Self::Buf],
    ) -> Result<()>;
}

impl OptimizerKind {
    /// Number of state buffers per parameter (momentum; or Adam's m and v).
    pub fn state_count(self) -> usize {
        match self {
            OptimizerKind::Sgd => 1,
            OptimizerKind::AdamW => 2,
        }
    }
}
