//! The model's learnable tensors by name: the embedding MLP
//! `x [B, F] -> h = relu(x W1^T + b1) [B, H] -> e = h W2^T + b2 [B, D]` and the
//! head W [C, D] (`[C, K, D]` with K sub-centers per class, SPEC 5b), each with its gradient and optimizer state on the backend.
//!
//! The names (`mlp.w1`, `mlp.b1`, `mlp.w2`, `mlp.b2`, `head.w`) are the tensor
//! names of checkpoints; [`Model::params`] lists them in that fixed order.

use crate::engine::backend::{Activation, Backend, Gemm};
use crate::error::Result;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One learnable tensor with its gradient and optimizer state.
pub struct Param<B: Backend> {
    /// Checkpoint name, e.g. `mlp.w1`.
    pub name: &'static str,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Current value.
    pub value: B::Buf,
    /// Gradient of the last step.
    pub grad: B::Buf,
    /// [`crate::engine::OptimizerKind::state_count`] optimizer buffers.
    pub state: Vec<B::Buf>,
    /// Whether weight decay applies (not to biases).
    pub decay: bool,
}

impl<B: Backend> Param<B> {
    fn new(
        be: &B,
        name: &'static str,
        shape: Vec<usize>,
        value: &[f32],
        decay: bool,
        states: usize,
    ) -> Result<Self> {
        let state = (0..states).map(|_| be.zeros(value.len())).collect::<Result<Vec<_>>>()?;
        Ok(Self { name, shape, value: be.upload(value)?, grad: be.zeros(value.len())?, state, decay })
    }
}

/// The MLP and the head, each parameter a named field.
pub struct Model<B: Backend> {
    /// `mlp.w1` `[H, F]`.
    pub w1: Param<B>,
    /// `mlp.b1` `[H]`.
    pub b1: Param<B>,
    /// `mlp.w2` `[D, H]`.
    pub w2: Param<B>,
    /// `mlp.b2` `[D]`.
    pub b2: Param<B>,
    /// `head.w` `[C, D]`, or `[C, K, D]` with K sub-centers per class.
    pub head: Param<B>,
}

/// Normal draws (Box-Muller on ChaCha8) with standard deviation `std`, for the weight init.
fn normals(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

impl<B: Backend> Model<B> {
    /// A seeded init for inputs of width `f`, hidden width `h`, embeddings of
    /// dimension `d` and `c` classes (He init for W1, 1/sqrt(H) for W2, unit
    /// normal for the head, zero biases), with `states` optimizer buffers each.
    /// The head has `k` sub-centers per class (rows j*K .. j*K + K - 1 for class j).
    pub fn new(
        be: &B,
        rng: &mut ChaCha8Rng,
        [f, h, d, c]: [usize; 4],
        k: usize,
        states: usize,
    ) -> Result<Self> {
        // Draw order W1, W2, head: the init of a seed must not change (and with K = 1 the
        // head draws exactly the C*D values it always did).
        let w1 = normals(rng, h * f, (2.0 / f as f64).sqrt());
        let w2 = normals(rng, d * h, (1.0 / h as f64).sqrt());
        let head = normals(rng, c * k * d, 1.0);
        Ok(Self {
            w1: Param::new(be, "mlp.w1", vec![h, f], &w1, true, states)?,
            b1: Param::new(be, "mlp.b1", vec![h], &vec![0.0; h], false, states)?,
            w2: Param::new(be, "mlp.w2", vec![d, h], &w2, true, states)?,
            b2: Param::new(be, "mlp.b2", vec![d], &vec![0.0; d], false, states)?,
            head: Param::new(be, "head.w", crate::shape::subcenter_shape(c, k, d), &head, true, states)?,
        })
    }

    /// Every parameter, in checkpoint order (`mlp.w1`, `mlp.b1`, `mlp.w2`, `mlp.b2`, `head.w`).
    pub fn params(&self) -> [&Param<B>; 5] {
        [&self.w1, &self.b1, &self.w2, &self.b2, &self.head]
    }

    /// Every parameter, mutable, in the order of [`Model::params`].
    pub fn params_mut(&mut self) -> [&mut Param<B>; 5] {
        [&mut self.w1, &mut self.b1, &mut self.w2, &mut self.b2, &mut self.head]
    }

    /// MLP forward of `x` [rows, F]: returns (h [rows, H], e [rows, D]).
    pub fn mlp_forward(&self, be: &B, x: &B::Buf, rows: usize) -> Result<(B::Buf, B::Buf)> {
        let (h, f) = (self.w1.shape[0], self.w1.shape[1]);
        let d = self.w2.shape[0];
        let mut hid = be.zeros(rows * h)?;
        let g1 = Gemm { trans_a: false, trans_b: true, m: rows, n: h, k: f, alpha: 1.0, beta: 0.0 };
        be.gemm(g1, x, &self.w1.value, &mut hid)?;
        be.bias_act_forward(&mut hid, &self.b1.value, Activation::Relu)?;
        let mut emb = be.zeros(rows * d)?;
        let g2 = Gemm { trans_a: false, trans_b: true, m: rows, n: d, k: h, alpha: 1.0, beta: 0.0 };
        be.gemm(g2, &hid, &self.w2.value, &mut emb)?;
        be.bias_act_forward(&mut emb, &self.b2.value, Activation::Identity)?;
        Ok((hid, emb))
    }

    /// MLP backward: from the embedding gradient `demb` [rows, D] (overwritten),
    /// the forward's `x`, `hid` and `emb`, writes the gradients of W1, b1, W2, b2.
    pub fn mlp_backward(
        &mut self,
        be: &B,
        x: &B::Buf,
        hid: &B::Buf,
        emb: &B::Buf,
        demb: &mut B::Buf,
        rows: usize,
    ) -> Result<()> {
        let (h, f) = (self.w1.shape[0], self.w1.shape[1]);
        let d = self.w2.shape[0];
        be.bias_act_backward(demb, emb, &mut self.b2.grad, Activation::Identity)?;
        let gw2 = Gemm { trans_a: true, trans_b: false, m: d, n: h, k: rows, alpha: 1.0, beta: 0.0 };
        be.gemm(gw2, demb, hid, &mut self.w2.grad)?;
        let mut dhid = be.zeros(rows * h)?;
        let gh = Gemm { trans_a: false, trans_b: false, m: rows, n: h, k: d, alpha: 1.0, beta: 0.0 };
        be.gemm(gh, demb, &self.w2.value, &mut dhid)?;
        be.bias_act_backward(&mut dhid, hid, &mut self.b1.grad, Activation::Relu)?;
        let gw1 = Gemm { trans_a: true, trans_b: false, m: h, n: f, k: rows, alpha: 1.0, beta: 0.0 };
        be.gemm(gw1, &dhid, x, &mut self.w1.grad)
    }
}
