//! A training loop of a user's own that drives the CUDA margin head through the
//! public API: a tiny linear encoder and the class weights live on the host as
//! f32 master copies, the head runs on the GPU in bf16, and plain SGD updates
//! both from the gradients the head returns.
//!
//! Data: a synthetic long-tailed set (class k has about 120 / (k + 1) samples),
//! 16-dimensional inputs projected to 32-dimensional features. Tail classes get
//! a fixed feature cloud after a short warm-up, as LEAP's statistics would give.
//!
//! `cargo run --release --example custom_trainer`. On a machine without a GPU
//! it says so and exits with status 0. With `FEATCLOUD_DEVICE=emu` (and the `emu`
//! feature) the same code runs on the CPU-emulated device, as `scripts/test.sh` does.

use featcloud::cuda::head::{CudaHead, GradDtype, HeadPath, HeadUpstream};
use featcloud::cuda::{Device, Tensor};
use featcloud::HeadConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const D_IN: usize = 16;
const D: usize = 32;
const C: usize = 10;
const BATCH: usize = 64;
const STEPS: u64 = 200;
const LR: f32 = 0.05;

/// The encoder: features = inputs [n, D_IN] . enc [D_IN, D].
fn encode(enc: &[f32], inputs: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n * D];
    for i in 0..n {
        for k in 0..D_IN {
            let a = inputs[i * D_IN + k];
            for j in 0..D {
                out[i * D + j] += a * enc[k * D + j];
            }
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let dev = match Device::from_env(0) {
        Ok(d) => d,
        Err(e) => {
            println!("custom_trainer needs a CUDA GPU and none is usable here ({e}); nothing to do.");
            return Ok(());
        }
    };
    if !featcloud::cuda::kernels::KERNELS_BUILT && !dev.is_emulated() {
        println!("featcloud was built without its CUDA kernels (no NVRTC at build time); nothing to do.");
        return Ok(());
    }
    println!("device: {} ({})", dev.info().name, dev.info().code);

    // Long-tailed synthetic data: a random prototype per class plus noise.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let protos: Vec<f32> = (0..C * D_IN).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let mut inputs = Vec::new();
    let mut labels = Vec::new();
    for k in 0..C {
        for _ in 0..(120 / (k + 1)).max(3) {
            inputs.extend((0..D_IN).map(|j| protos[k * D_IN + j] + 0.4 * rng.random_range(-1.0f32..1.0)));
            labels.push(k as i32);
        }
    }
    let n = labels.len();

    // Parameters (host f32 masters).
    let mut enc: Vec<f32> = (0..D_IN * D).map(|_| rng.random_range(-0.3f32..0.3)).collect();
    let mut w: Vec<f32> = (0..C * D).map(|_| rng.random_range(-1.0f32..1.0)).collect();

    let cfg = HeadConfig { s: 16.0, m2: 0.2, ..HeadConfig::arcface() };
    let head = CudaHead::new(dev.clone(), cfg, HeadPath::Fused)?;
    let tail_sigma: Vec<f32> = (0..C).map(|k| if k >= 6 { 0.1 } else { 0.0 }).collect();

    let mut losses = Vec::new();
    for step in 0..STEPS {
        // A batch: sample indices, encode on the host.
        let idx: Vec<usize> = (0..BATCH).map(|_| rng.random_range(0..n)).collect();
        let xin: Vec<f32> =
            idx.iter().flat_map(|&i| inputs[i * D_IN..(i + 1) * D_IN].iter().copied()).collect();
        let y: Vec<i32> = idx.iter().map(|&i| labels[i]).collect();
        let feats = encode(&enc, &xin, BATCH);

        // The head on the GPU, in bf16; gradients back in f32.
        let x_dev = Tensor::<half::bf16>::from_f32(&dev, &feats, &[BATCH, D])?;
        let w_dev = Tensor::<half::bf16>::from_f32(&dev, &w, &[C, D])?;
        let sigma = if step < 20 { vec![0.0; C] } else { tail_sigma.clone() };
        let sigma_dev = Tensor::<f32>::from_f32(&dev, &sigma, &[C])?;
        let (fwd, grads) = head.forward_backward(
            &x_dev,
            &w_dev,
            &y,
            &sigma_dev,
            42,
            step,
            HeadUpstream::Scalar(1.0),
            GradDtype::F32,
        )?;
        let dx = grads.dx.to_f32_host(&dev)?;
        let dw = grads.dw.to_f32_host(&dev)?;

        // SGD: W directly, the encoder through dx (d enc = xin^T . dx).
        for (p, g) in w.iter_mut().zip(&dw) {
            *p -= LR * g;
        }
        for k in 0..D_IN {
            for j in 0..D {
                let g: f32 = (0..BATCH).map(|i| xin[i * D_IN + k] * dx[i * D + j]).sum();
                enc[k * D + j] -= LR * g;
            }
        }
        losses.push(fwd.loss);
        if step % 20 == 0 || step + 1 == STEPS {
            println!("step {step:4}  loss {:.4}  ({} rows)", fwd.loss, fwd.n_valid);
        }
    }

    // The loop must have learned something: the last 20 steps' mean loss below the first 20's.
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (first, last) = (mean(&losses[..20]), mean(&losses[losses.len() - 20..]));
    println!("mean loss: first 20 steps {first:.4}, last 20 {last:.4}");
    if last.partial_cmp(&first) != Some(std::cmp::Ordering::Less) {
        anyhow::bail!("the loss did not decrease ({first} -> {last})");
    }

    // Accuracy per class by cosine nearest class weight.
    let feats = encode(&enc, &inputs, n);
    let mut correct = [(0usize, 0usize); C];
    for i in 0..n {
        let f = &feats[i * D..(i + 1) * D];
        let best = (0..C)
            .map(|k| {
                let wk = &w[k * D..(k + 1) * D];
                let dot: f32 = f.iter().zip(wk).map(|(a, b)| a * b).sum();
                dot / wk.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12)
            })
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |m, (k, v)| if v > m.1 { (k, v) } else { m });
        let y = labels[i] as usize;
        correct[y].1 += 1;
        if best.0 == y {
            correct[y].0 += 1;
        }
    }
    for (k, (ok, tot)) in correct.iter().enumerate() {
        println!("class {k}: {ok}/{tot} correct");
    }
    Ok(())
}
