//! CPU backend: the engine's [`Backend`] on host memory, with a threaded sgemm
//! (matrixmultiply through ndarray) and rayon for everything row-parallel.
//!
//! - [`head`]: the fast margin head (checked against [`crate::oracle::head`]);
//! - [`gemm`]: safe row-major sgemm;
//! - statistics: [`StatsState`] with the oracle's f64 rules (C x D is small);
//! - bias/ReLU and the optimizers: elementwise loops here.
//!
//! Every operation is bitwise deterministic for a given input, independent of
//! the number of threads (no order-dependent parallel reductions).

pub mod gemm;
pub mod head;

use crate::config::{CenterMode, HeadConfig, StatsConfig};
use crate::engine::backend::{rows_of, same_len, Activation, Backend, Gemm, HeadBatch, HeadStep, OptimStep};
use crate::engine::optim::{OptimizerConfig, OptimizerKind};
use crate::error::Result;
use crate::stats::StatsState;
use rayon::prelude::*;

/// Elements per parallel task in elementwise loops (fixed: results never depend on it).
const CHUNK: usize = 4096;

/// The CPU backend (host `Vec<f32>` buffers).
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    /// A CPU backend using rayon's global pool.
    pub fn new() -> Self {
        CpuBackend
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Stats = StatsState;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn write(&self, buf: &mut Vec<f32>, host: &[f32]) -> Result<()> {
        same_len("write", buf.len(), host.len())?;
        buf.copy_from_slice(host);
        Ok(())
    }

    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn gemm(&self, g: Gemm, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>) -> Result<()> {
        gemm::sgemm(g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, a, b, g.beta, c)
    }

    fn bias_act_forward(&self, y: &mut Vec<f32>, bias: &Vec<f32>, act: Activation) -> Result<()> {
        let cols = bias.len();
        rows_of("bias_act_forward y", y.len(), cols)?;
        y.par_chunks_mut(cols).for_each(|row| {
            for (v, &b) in row.iter_mut().zip(bias.iter()) {
                let z = *v + b;
                *v = match act {
                    Activation::Identity => z,
                    // A NaN passes through (f32::max would turn it into 0 and hide it from
                    // the head's non-finite check); kernels/train_ops.cu has the same expression.
                    Activation::Relu if z > 0.0 || z.is_nan() => z,
                    Activation::Relu => 0.0,
                };
            }
        });
        Ok(())
    }

    fn bias_act_backward(
        &self,
        dy: &mut Vec<f32>,
        y: &Vec<f32>,
        dbias: &mut Vec<f32>,
        act: Activation,
    ) -> Result<()> {
        let cols = dbias.len();
        same_len("bias_act_backward dy/y", dy.len(), y.len())?;
        rows_of("bias_act_backward dy", dy.len(), cols)?;
        if act == Activation::Relu {
            dy.par_chunks_mut(CHUNK).zip(y.par_chunks(CHUNK)).for_each(|(d, yv)| {
                for (g, &o) in d.iter_mut().zip(yv) {
                    if o <= 0.0 {
                        *g = 0.0;
                    }
                }
            });
        }
        // Column sums in row order, f64 accumulation, one task per column block.
        let dyr: &[f32] = dy;
        dbias.par_chunks_mut(64).enumerate().for_each(|(blk, out)| {
            let c0 = blk * 64;
            let mut acc = vec![0.0f64; out.len()];
            for row in dyr.chunks(cols) {
                for (a, &g) in acc.iter_mut().zip(&row[c0..c0 + out.len()]) {
                    *a += g as f64;
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o = a as f32;
            }
        });
        Ok(())
    }

    fn head_forward_backward(
        &self,
        cfg: &HeadConfig,
        batch: HeadBatch<'_, Vec<f32>>,
        dx: &mut Vec<f32>,
        dw: &mut Vec<f32>,
    ) -> Result<HeadStep> {
        let HeadBatch { shape, x, w, labels, sigma_cloud, seed, step } = batch;
        let p = head::HeadProblem { shape, x, w, labels, sigma_cloud, seed, step };
        let ones;
        let up = if cfg.reduction == crate::config::Reduction::None {
            ones = vec![1.0f32; shape.b];
            head::Upstream::PerRow(&ones)
        } else {
            head::Upstream::Scalar(1.0)
        };
        let (fwd, grads) = head::forward_backward(cfg, &p, up)?;
        same_len("head dx", dx.len(), grads.dx.len())?;
        same_len("head dw", dw.len(), grads.dw.len())?;
        *dx = grads.dx;
        *dw = grads.dw;
        Ok(HeadStep { loss: fwd.loss, n_valid: fwd.n_valid, c_iy: fwd.rows.c_iy, k_iy: fwd.rows.k_iy })
    }

    fn stats_new(&self, c: usize, subcenters: usize, d: usize, cfg: &StatsConfig) -> Result<StatsState> {
        StatsState::with_subcenters(c, subcenters, d, cfg.clone())
    }

    fn stats_cloud_sigma(&self, stats: &StatsState, out: &mut Vec<f32>) -> Result<()> {
        let sigma = stats.cloud_sigma();
        same_len("cloud sigma", out.len(), sigma.len())?;
        for (o, s) in out.iter_mut().zip(sigma) {
            *o = s as f32;
        }
        Ok(())
    }

    fn stats_update(
        &self,
        stats: &mut StatsState,
        x: &Vec<f32>,
        labels: &[i32],
        head: &HeadStep,
    ) -> Result<()> {
        match stats.cfg.center {
            CenterMode::Ema => stats.update_subcenters(x, labels, &head.k_iy),
            CenterMode::ClassWeight => {
                let theta: Vec<f64> =
                    head.c_iy.iter().map(|&c| (c as f64).clamp(-1.0 + 1e-7, 1.0 - 1e-7).acos()).collect();
                stats.update_from_angles(labels, &theta)
            }
        }
    }

    fn stats_export(&self, stats: &StatsState) -> Result<StatsState> {
        Ok(stats.clone())
    }

    fn stats_import(&self, state: &StatsState) -> Result<StatsState> {
        state.validate()?;
        Ok(state.clone())
    }

    fn optimizer_step(
        &self,
        opt: &OptimizerConfig,
        hp: OptimStep,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        state: &mut [Vec<f32>],
    ) -> Result<()> {
        self.check_optimizer(opt, param, grad, state)?;
        let (lr, wd) = (hp.lr, hp.weight_decay);
        match opt.kind {
            OptimizerKind::Sgd => {
                let mom = opt.momentum;
                let buf = &mut state[0];
                param
                    .par_chunks_mut(CHUNK)
                    .zip(grad.par_chunks(CHUNK))
                    .zip(buf.par_chunks_mut(CHUNK))
                    .for_each(|((p, g), m)| {
                        for ((p, &g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
                            let g = g + wd * *p;
                            *m = mom * *m + g;
                            *p -= lr * *m;
                        }
                    });
            }
            OptimizerKind::AdamW => {
                let (b1, b2, eps) = (opt.beta1, opt.beta2, opt.eps);
                let t = hp.t.max(1) as i32;
                let c1 = 1.0 - b1.powi(t);
                let c2 = 1.0 - b2.powi(t);
                let (ms, vs) = state.split_at_mut(1);
                param
                    .par_chunks_mut(CHUNK)
                    .zip(grad.par_chunks(CHUNK))
                    .zip(ms[0].par_chunks_mut(CHUNK))
                    .zip(vs[0].par_chunks_mut(CHUNK))
                    .for_each(|(((p, g), m), v)| {
                        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                            *m = b1 * *m + (1.0 - b1) * g;
                            *v = b2 * *v + (1.0 - b2) * g * g;
                            let upd = (*m / c1) / ((*v / c2).sqrt() + eps);
                            *p -= lr * (upd + wd * *p);
                        }
                    });
            }
        }
        Ok(())
    }
}
