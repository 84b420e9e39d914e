//! Criterion benches of the head, forward + backward.
//!
//! With a GPU: fused vs reference path per SPEC section 9 shape (bf16), so
//! regressions show in criterion's reports (`featcloud bench` is the
//! side-by-side table with the cuBLAS floor and the peak). Without a GPU it
//! says so and benches the CPU backend against the CPU oracle instead.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use featcloud::cuda::bench::SHAPES;
use featcloud::cuda::head::{CudaHead, GradDtype, HeadPath, HeadUpstream};
use featcloud::cuda::{Device, Tensor};
use featcloud::shape::HeadShape;
use featcloud::{cpu, oracle, HeadConfig};
use std::time::Duration;

fn fill(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5
        })
        .collect()
}

fn gpu(c: &mut Criterion, dev: std::sync::Arc<Device>) {
    let cfg = HeadConfig::default();
    let mut group = c.benchmark_group("head_fwd_bwd_bf16");
    group.sample_size(20).measurement_time(Duration::from_secs(3));
    for s in SHAPES.iter().filter(|s| s.c <= 360_232) {
        let x = Tensor::<half::bf16>::from_f32(&dev, &fill(s.b * s.d, 1), &[s.b, s.d]).unwrap();
        let w = Tensor::<half::bf16>::from_f32(&dev, &fill(s.c * s.d, 2), &[s.c, s.d]).unwrap();
        let labels: Vec<i32> = (0..s.b).map(|i| ((i * 7919) % s.c) as i32).collect();
        let sigma = Tensor::<f32>::from_f32(&dev, &vec![0.05; s.c], &[s.c]).unwrap();
        for path in HeadPath::ALL {
            let head = CudaHead::new(dev.clone(), cfg, path).unwrap();
            group.bench_with_input(BenchmarkId::new(path.name(), s.name), &(), |bch, _| {
                bch.iter(|| {
                    head.forward_backward(
                        &x,
                        &w,
                        &labels,
                        &sigma,
                        1,
                        2,
                        HeadUpstream::Scalar(1.0),
                        GradDtype::Input,
                    )
                    .unwrap();
                    dev.synchronize().unwrap();
                })
            });
        }
    }
    group.finish();
}

fn cpu_vs_oracle(c: &mut Criterion) {
    let cfg = HeadConfig::default();
    let mut group = c.benchmark_group("head_fwd_bwd_cpu");
    group.sample_size(10).measurement_time(Duration::from_secs(3));
    for &(b, d, cl) in &[(256usize, 128usize, 100usize), (64, 512, 1000)] {
        let shape = HeadShape { b, c: cl, d };
        let (x, w) = (fill(b * d, 1), fill(cl * d, 2));
        let labels: Vec<i32> = (0..b).map(|i| (i % cl) as i32).collect();
        let sigma = vec![0.05f32; cl];
        let name = format!("{b}x{d}x{cl}");
        // One problem for both: the CPU backend takes the oracle's input type.
        let p = oracle::head::HeadProblem {
            shape,
            x: &x,
            w: &w,
            labels: &labels,
            sigma_cloud: &sigma,
            seed: 1,
            step: 2,
        };
        group.bench_function(BenchmarkId::new("cpu_backend", &name), |bch| {
            bch.iter(|| cpu::head::forward_backward(&cfg, &p, cpu::head::Upstream::Scalar(1.0)).unwrap())
        });
        group.bench_function(BenchmarkId::new("oracle", &name), |bch| {
            bch.iter(|| {
                oracle::head::forward(&cfg, &p).unwrap();
                oracle::head::backward(&cfg, &p, oracle::head::Upstream::Scalar(1.0)).unwrap()
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    match Device::new(0) {
        Ok(dev) if featcloud::cuda::kernels::KERNELS_BUILT => gpu(c, dev),
        Ok(_) => println!("no CUDA kernels in this build: benching the CPU backend against the oracle"),
        Err(e) => println!("no GPU ({e}): benching the CPU backend against the oracle instead"),
    }
    cpu_vs_oracle(c);
}

criterion_group!(head, benches);
criterion_main!(head);
