//! The roofline model (`src/cuda/perf_model.rs`, docs/PERF.md): hand-computed anchors, FLOP
//! formulas, occupancy against the ptxas table, monotonicity in C, the 3-GEMM floor.
//! Everything here is a prediction; no GPU is needed.

use featcloud::cuda::bench::SHAPES;
use featcloud::cuda::head::plan;
use featcloud::cuda::perf_model::{self, Bound, DeviceModel, GridModel, KernelModel, PathModel};
use featcloud::{DType, HeadShape};

fn h200() -> DeviceModel {
    DeviceModel::h200()
}

fn kernel<'a>(p: &'a PathModel, prefix: &str) -> &'a KernelModel {
    p.kernels.iter().find(|k| k.name.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in {p:?}"))
}

fn shape(b: usize, c: usize, d: usize) -> HeadShape {
    HeadShape { b, c, d }
}

/// B = 64, C = 128, D = 64, bf16 on 132 SMs, by hand:
/// - forward tile: B <= 64 allows only 64-row tiles; 64 x 128 gives 1 CTA and 64 x 64 gives
///   2, both below half the SMs (66), so the smallest, 64 x 64: grid 2 x 1 = 2 CTAs;
///   FLOPs 2 * 64 * 128 * 64 = 1,048,576 (D = 64 is a multiple of the k-step 32);
///   HBM: x 64*64*2 = 8,192; W + inv_w 128*(64*2 + 4) = 16,896 (fits in L2: read once);
///   inv_x + labels 2*64*4 = 512; the target rows' W rows 64*64*2 = 8,192; partials
///   3*2*64*4 = 1,536; per-row outputs 4*64*4 = 1,024; total 36,352 bytes.
/// - backward: 128-class tiles give G = 1, S = 1 (one row tile), 1 busy SM < 132/4, so
///   64-class tiles: G = 2, S = 1, 2 CTAs; FLOPs per (row tile, class tile) pair
///   2*64*64*64 (recompute) + 2 * 2*64*64*64 (dx, dW) = 1,572,864, two pairs: 3,145,728 = 6BCD.
#[test]
fn hand_computed_anchor() {
    let s = shape(64, 128, 64);
    let p = perf_model::fused(s, DType::BF16, &h200());
    let f = kernel(&p, "fused_fwd_r64c64_bf16");
    assert_eq!(f.grid.map(|g| g.ctas), Some(2));
    assert_eq!(f.traffic.flops, 1_048_576.0);
    assert_eq!(f.traffic.hbm_bytes, 36_352.0);
    let b = kernel(&p, "fused_bwd_c64_bf16");
    assert_eq!(b.grid.map(|g| g.ctas), Some(2));
    assert_eq!(b.traffic.flops, 3_145_728.0);
    // Forward + backward = 8BCD here: the backward recomputes the cosines (2BCD on top of 6BCD).
    assert_eq!(p.flops(), 8.0 * 64.0 * 128.0 * 64.0);
    // Two CTAs on 132 SMs: under-filled, and the launch (4 us) dwarfs microseconds of work.
    assert!(matches!(f.time.bound, Bound::Launch | Bound::Latency), "{f:?}");
}

/// The fused path's FLOPs: 2 * Bp * Cp * Dk (forward, padded to its tile) plus, per backward
/// (row tile, class tile) pair, the recomputed tile and the dx and dW products, padded to
/// 64 rows, the class tile and the d-chunk; that is 8BCD when every dimension is a multiple.
#[test]
fn fused_flops_formula() {
    let dev = h200();
    for s in SHAPES.iter().map(|s| shape(s.b, s.c, s.d)).chain([shape(256, 1024, 512), shape(33, 1000, 40)]) {
        let p = perf_model::fused(s, DType::BF16, &dev);
        let (bm, bn) = plan::forward_tile_for(s, dev.sms);
        let cols = plan::backward_cols_for(s, dev.sms);
        let pad = |v: usize, t: usize| (v.div_ceil(t) * t) as f64;
        let fwd = 2.0 * pad(s.b, bm) * pad(s.c, bn) * pad(s.d, 32);
        let bwd = 2.0 * pad(s.b, 64) * pad(s.c, cols) * (pad(s.d, 32) + 2.0 * pad(s.d, 64));
        assert_eq!(p.flops(), fwd + bwd, "{s:?}");
        let bcd = (s.b * s.c * s.d) as f64;
        assert!(p.flops() >= 8.0 * bcd, "{s:?}");
        if s.b % 128 == 0 && s.c % 128 == 0 && s.d % 64 == 0 {
            assert_eq!(p.flops(), 8.0 * bcd, "{s:?}");
        }
        // The reference path runs four B x C x D GEMMs (its backward recomputes the cosines).
        assert_eq!(perf_model::reference(s, DType::BF16, &dev).flops(), 8.0 * bcd, "{s:?}");
    }
}

/// One forward+backward launches what `head/fused.rs` says: two row norms, the tiles, the
/// combine, the reduce; the backward tiles, a dW normback with row splits, the dx normback.
#[test]
fn fused_launch_list() {
    let dev = h200();
    for s in SHAPES.iter().map(|s| shape(s.b, s.c, s.d)) {
        let p = perf_model::fused(s, DType::BF16, &dev);
        let (_, splits) = plan::backward_grid_for(s, dev.sms);
        assert_eq!(p.kernels.len(), 7 + usize::from(splits > 1), "{s:?}");
        let (g, sp) = plan::backward_grid_for(s, dev.sms);
        assert_eq!(kernel(&p, "fused_bwd_").grid.map(|g| g.ctas), Some((g * sp) as u64));
    }
}

/// Occupancy from the ptxas table, recomputed here: registers rounded to 256 per warp, 8 warps;
/// shared memory plus 1 KiB reserved per CTA; 2048 threads; 32 CTAs. Waves = ceil(CTAs /
/// (132 x that)). The backward's ~175 registers x 256 threads allow one CTA per SM, as its
/// launch bounds (256, 1) say.
#[test]
fn occupancy_matches_ptxas_table() {
    let dev = h200();
    let mut checked = 0;
    for s in SHAPES.iter().map(|s| shape(s.b, s.c, s.d)) {
        let p = perf_model::fused(s, DType::BF16, &dev);
        for k in &p.kernels {
            let Some(GridModel { ctas, ctas_per_sm: occ, waves, registers }) = k.grid else {
                panic!("{} has no grid", k.name)
            };
            assert_eq!(waves, ctas.div_ceil(132 * occ as u64), "{}", k.name);
            let Some(r) = perf_model::resources(&k.name, 90) else { continue };
            assert_eq!(registers, Some(r.registers), "{}", k.name);
            let per_warp = (r.registers * 32).div_ceil(256) * 256;
            let smem = r.shared_bytes
                + if k.name.starts_with("fused_bwd_c128") {
                    65_536
                } else if k.name.starts_with("fused_bwd_c64") {
                    55_296
                } else {
                    0
                };
            let want = (65_536 / (per_warp * 8)).min((228 << 10) / (smem + 1024)).min(8).min(32);
            assert_eq!(occ, want, "{}", k.name);
            if k.name.starts_with("fused_bwd_") {
                assert_eq!(occ, 1, "{} with {} registers", k.name, r.registers);
            }
            checked += 1;
        }
    }
    // Without NVRTC the table is empty and the model assumes 255 registers: one CTA per SM
    // for a 256-thread block.
    if checked == 0 {
        assert_eq!(dev.ctas_per_sm(256, 255, 0), 1);
    }
}

/// More classes never predict less time (B, D fixed) once the grids fill the GPU (C at least
/// 132 backward class tiles of 128), for both paths, over a sweep that crosses the dispatcher's
/// tile and grid changes; and never fewer FLOPs at any C. (Below that, more classes can
/// predict less time, as on the hardware: with one CTA per class tile, a second class tile
/// splits the work of a latency-bound single CTA in two.)
#[test]
fn more_classes_never_faster() {
    let dev = h200();
    for (b, d) in [(64, 2048), (512, 512), (1024, 512), (2048, 512)] {
        let mut last = (0.0, 0.0, 0.0);
        let mut c = 1;
        while c <= 2_000_000 {
            let s = shape(b, c, d);
            let (f, r) =
                (perf_model::fused(s, DType::BF16, &dev), perf_model::reference(s, DType::BF16, &dev));
            assert!(f.flops() >= last.2, "fused FLOPs B {b} D {d} C {c}");
            if c >= 132 * 128 {
                assert!(
                    f.total_ms() >= last.0 * (1.0 - 1e-12),
                    "fused B {b} D {d} C {c}: {} < {}",
                    f.total_ms(),
                    last.0
                );
                assert!(r.total_ms() >= last.1 * (1.0 - 1e-12), "reference B {b} D {d} C {c}");
            }
            last = (f.total_ms(), r.total_ms(), f.flops());
            c = c * 9 / 8 + 1;
        }
    }
}

/// Each kernel's prediction is max(compute, hbm, l2, latency) + launch, and the bound names
/// the largest term.
#[test]
fn prediction_is_the_roofline() {
    let dev = h200();
    for s in SHAPES.iter().map(|s| shape(s.b, s.c, s.d)) {
        for p in [perf_model::fused(s, DType::BF16, &dev), perf_model::reference(s, DType::BF16, &dev)] {
            for k in &p.kernels {
                let (t, w) = (&k.time, &k.traffic);
                let body = t.terms.compute_ms.max(t.terms.hbm_ms).max(t.terms.l2_ms).max(t.terms.latency_ms);
                assert_eq!(body, t.terms.body_ms());
                assert!((t.predicted_ms - (body + dev.launch_us * 1e-3)).abs() < 1e-12, "{k:?}");
                let top = match t.bound {
                    Bound::Compute => t.terms.compute_ms,
                    Bound::Memory => t.terms.hbm_ms,
                    Bound::L2 => t.terms.l2_ms,
                    Bound::Latency => t.terms.latency_ms,
                    Bound::Launch => t.launch_ms,
                };
                assert!((top - body.max(t.launch_ms)).abs() < 1e-12, "{k:?}");
                assert!(w.hbm_bytes <= w.l2_bytes + 1e-6, "HBM traffic passes through L2: {k:?}");
                // compute = FLOPs / rate: bf16 tiles at 790 x 0.62 TFLOP/s.
                if k.name.starts_with("fused_") && w.flops > 0.0 {
                    assert!((t.terms.compute_ms - w.flops / (790e12 * 0.62) * 1e3).abs() < 1e-12);
                }
            }
        }
    }
}

/// The 3-GEMM floor 6*B*C*D and SPEC 9's tensor-core limit 6*B*C*D / 790 TFLOP/s; SPEC 9
/// quotes 1.5x of it as about 0.28 ms, 2.15 ms and 12.2 ms for the face shapes (the last
/// is rounded up by 2%: 1.5 * 6 * 2048 * 512 * 1e6 / 790e12 s = 11.95 ms).
#[test]
fn three_gemm_floor() {
    let dev = h200();
    let s = shape(512, 93_431, 512);
    assert_eq!(perf_model::three_gemm_flops(s), 6.0 * 512.0 * 93_431.0 * 512.0);
    assert!(
        (perf_model::tensor_limit_ms(s, &dev) - 6.0 * 512.0 * 93_431.0 * 512.0 / 790e12 * 1e3).abs() < 1e-15
    );
    for (s, spec_ms) in [
        (shape(512, 93_431, 512), 0.28),
        (shape(1024, 360_232, 512), 2.15),
        (shape(2048, 1_000_000, 512), 12.2),
    ] {
        let lim = 1.5 * perf_model::tensor_limit_ms(s, &dev);
        assert!((lim / spec_ms - 1.0).abs() < 0.03, "{s:?}: {lim} vs SPEC {spec_ms}");
    }
}

/// `featcloud bench --model` needs no GPU: it prints every kernel of both paths for the
/// chosen shape and writes the same predictions as JSON.
#[test]
fn bench_model_cli() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("model.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_featcloud"))
        .args(["bench", "--model", "--only", "face-93k", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("PREDICTIONS"), "{text}");
    let s = shape(512, 93_431, 512);
    let (f, r) = (perf_model::fused(s, DType::BF16, &h200()), perf_model::reference(s, DType::BF16, &h200()));
    for k in f.kernels.iter().chain(&r.kernels) {
        assert!(text.contains(&k.name), "{} missing:\n{text}", k.name);
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["fused"]["kernels"].as_array().unwrap().len(), f.kernels.len());
    assert_eq!(v["device"]["sms"], 132);
}

/// Every storage dtype gives finite, positive predictions, odd D (the element-load
/// kernels) included; f32 runs the SIMT tiles at 66.9 x 0.5 TFLOP/s.
#[test]
fn every_dtype_and_odd_d() {
    let dev = h200();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for s in [shape(1, 1, 1), shape(33, 1000, 40), shape(512, 93_431, 509), shape(1024, 360_232, 512)] {
            for p in [perf_model::fused(s, dtype, &dev), perf_model::reference(s, dtype, &dev)] {
                assert!(p.total_ms().is_finite() && p.total_ms() > 0.0, "{dtype:?} {s:?} {p:?}");
                if dtype == DType::F32 && p.path == "fused" {
                    let k = kernel(&p, "fused_bwd_");
                    assert!(
                        (k.time.terms.compute_ms - k.traffic.flops / (66.9e12 * 0.5) * 1e3).abs() < 1e-12
                    );
                }
            }
        }
    }
}
