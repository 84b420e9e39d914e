//! The roofline model (`src/cuda/perf_model.rs`, docs/PERF.md): hand-computed anchors, FLOP
//! formulas, occupancy against the ptxas table, monotonicity in C, the 3-GEMM floor, and the
//! fused prediction following the dispatcher (attention form or tiles).
//! Everything here is a prediction; no GPU is needed.

use featcloud::cuda::args::{AttnBwdArgs, AttnCombineArgs, AttnFwdArgs};
use featcloud::cuda::bench::SHAPES;
use featcloud::cuda::head::{plan, FusedKernels};
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

/// The tiles kernels at B = 64, C = 128, D = 64, bf16 on 132 SMs, by hand:
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
    let p = perf_model::tiles(s, DType::BF16, &h200());
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

/// The tiles kernels' FLOPs: 2 * Bp * Cp * Dk (forward, padded to its tile) plus, per backward
/// (row tile, class tile) pair, the recomputed tile and the dx and dW products, padded to
/// 64 rows, the class tile and the d-chunk; that is 8BCD when every dimension is a multiple.
#[test]
fn tiles_flops_formula() {
    let dev = h200();
    for s in SHAPES.iter().map(|s| shape(s.b, s.c, s.d)).chain([shape(256, 1024, 512), shape(33, 1000, 40)]) {
        let p = perf_model::tiles(s, DType::BF16, &dev);
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

/// One forward+backward of the tiles launches what `head/fused.rs` says: two row norms, the
/// tiles, the combine, the reduce; the backward tiles, a dW normback with row splits, the dx
/// normback.
#[test]
fn tiles_launch_list() {
    let dev = h200();
    for s in SHAPES.iter().map(|s| shape(s.b, s.c, s.d)) {
        let p = perf_model::tiles(s, DType::BF16, &dev);
        let (_, splits) = plan::backward_grid_for(s, dev.sms);
        assert_eq!(p.kernels.len(), 7 + usize::from(splits > 1), "{s:?}");
        let (g, sp) = plan::backward_grid_for(s, dev.sms);
        assert_eq!(kernel(&p, "fused_bwd_").grid.map(|g| g.ctas), Some((g * sp) as u64));
    }
}

/// Occupancy from the ptxas table, recomputed here: registers rounded to 256 per warp, 8 warps;
/// shared memory plus 1 KiB reserved per CTA; 2048 threads; 32 CTAs. Waves = ceil(CTAs /
/// (132 x that)). The tiles backward's ~175 registers x 256 threads allow one CTA per SM, as
/// its launch bounds (256, 1) say; the attention kernels' 138,240 bytes of dynamic shared
/// memory (bf16, D = 512) allow one too, as do the 198,656 bytes at D = 2048.
#[test]
fn occupancy_matches_ptxas_table() {
    let dev = h200();
    let mut checked = 0;
    for s in SHAPES.iter().map(|s| shape(s.b, s.c, s.d)) {
        let paths = [perf_model::fused(s, DType::BF16, &dev), perf_model::tiles(s, DType::BF16, &dev)];
        for k in paths.iter().flat_map(|p| &p.kernels) {
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
                } else if k.name.starts_with("attn_fwd_d512") || k.name.starts_with("attn_bwd_d512") {
                    138_240
                } else if k.name.starts_with("attn_fwd_d2048") || k.name.starts_with("attn_bwd_d2048") {
                    198_656
                } else {
                    0
                };
            let want = (65_536 / (per_warp * 8)).min((228 << 10) / (smem + 1024)).min(8).min(32);
            assert_eq!(occ, want, "{}", k.name);
            if k.name.starts_with("fused_bwd_")
                || k.name.starts_with("attn_fwd_")
                || k.name.starts_with("attn_bwd_")
            {
                assert_eq!(occ, 1, "{} with {} registers", k.name, r.registers);
            }
            if k.name.starts_with("attn_") && !k.name.starts_with("attn_combine") {
                // Shared memory alone allows one CTA per SM, whatever the registers.
                assert_eq!(dev.ctas_per_sm(256, 32, smem), 1, "{}", k.name);
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
/// 132 backward class tiles of 128), for both paths (the fused one with either kernel set),
/// over a sweep that crosses the dispatcher's tile, split and grid changes; and never fewer
/// FLOPs at any C. (Below that, more classes can
/// predict less time, as on the hardware: with one CTA per class tile, a second class tile
/// splits the work of a latency-bound single CTA in two.)
#[test]
fn more_classes_never_faster() {
    let dev = h200();
    for (b, d) in [(64, 2048), (512, 512), (1024, 512), (2048, 512)] {
        let mut last = (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut c = 1;
        while c <= 2_000_000 {
            let s = shape(b, c, d);
            let (f, r) =
                (perf_model::fused(s, DType::BF16, &dev), perf_model::reference(s, DType::BF16, &dev));
            let t = perf_model::tiles(s, DType::BF16, &dev);
            assert!(f.flops() >= last.2, "fused FLOPs B {b} D {d} C {c}");
            assert!(t.flops() >= last.4, "tiles FLOPs B {b} D {d} C {c}");
            if c >= 132 * 128 {
                assert!(
                    f.total_ms() >= last.0 * (1.0 - 1e-12),
                    "fused B {b} D {d} C {c}: {} < {}",
                    f.total_ms(),
                    last.0
                );
                assert!(r.total_ms() >= last.1 * (1.0 - 1e-12), "reference B {b} D {d} C {c}");
                assert!(t.total_ms() >= last.3 * (1.0 - 1e-12), "tiles B {b} D {d} C {c}");
            }
            last = (f.total_ms(), r.total_ms(), f.flops(), t.total_ms(), t.flops());
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
        for p in [
            perf_model::fused(s, DType::BF16, &dev),
            perf_model::tiles(s, DType::BF16, &dev),
            perf_model::reference(s, DType::BF16, &dev),
        ] {
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
                // compute = FLOPs / rate: bf16 tiles (both kernel sets) at 790 x 0.62 TFLOP/s.
                if (k.name.starts_with("fused_") || k.name.starts_with("attn_")) && w.flops > 0.0 {
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
/// chosen shape (at face-93k the fused path runs the attention form, so the tiles' kernels are
/// printed too, labelled "tiles"), says which kernels the fused total uses, and writes the same
/// predictions as JSON.
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
    let t = perf_model::tiles(s, DType::BF16, &h200());
    for k in &t.kernels {
        let row = format!("  tiles     {}", k.name);
        assert!(text.contains(&row), "{row:?} missing:\n{text}");
    }
    assert!(
        text.contains(&format!("fused total {:.3} ms predicted (attention kernels", f.total_ms())),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["fused"]["kernels"].as_array().unwrap().len(), f.kernels.len());
    assert_eq!(rows[0]["fused"]["kernel_set"], "attention");
    assert_eq!(rows[0]["tiles"]["kernel_set"], "tiles");
    assert_eq!(rows[0]["tiles"]["kernels"].as_array().unwrap().len(), t.kernels.len());
    assert!(rows[0]["reference"]["kernel_set"].is_null());
    assert_eq!(v["device"]["sms"], 132);
}

/// Every storage dtype gives finite, positive predictions, odd D (the element-load
/// kernels) included; f32 runs the SIMT tiles (both kernel sets) at 66.9 x 0.5 TFLOP/s.
#[test]
fn every_dtype_and_odd_d() {
    let dev = h200();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for s in [shape(1, 1, 1), shape(33, 1000, 40), shape(512, 93_431, 509), shape(1024, 360_232, 512)] {
            let paths = [
                perf_model::fused(s, dtype, &dev),
                perf_model::tiles(s, dtype, &dev),
                perf_model::reference(s, dtype, &dev),
            ];
            for p in paths {
                assert!(p.total_ms().is_finite() && p.total_ms() > 0.0, "{dtype:?} {s:?} {p:?}");
                if dtype == DType::F32 && p.path == "fused" {
                    let bwd = match p.kernel_set {
                        Some(FusedKernels::Attention) => "attn_bwd_",
                        _ => "fused_bwd_",
                    };
                    let k = kernel(&p, bwd);
                    assert!(
                        (k.time.terms.compute_ms - k.traffic.flops / (66.9e12 * 0.5) * 1e3).abs() < 1e-12
                    );
                }
            }
        }
    }
}

/// The SPEC 9 shapes and a few odd ones (D not a multiple of 8, C below one tile, B not a
/// multiple of the resident rows, D <= 128) where the attention form applies in every dtype.
fn attention_shapes() -> Vec<HeadShape> {
    SHAPES
        .iter()
        .filter(|s| s.d <= plan::ATTN_DMAX_ALL)
        .map(|s| shape(s.b, s.c, s.d))
        .chain([
            shape(64, 128, 64),
            shape(33, 1000, 40),
            shape(64, 20, 512),
            shape(100, 1000, 101),
            shape(1, 1, 1),
        ])
        .collect()
}

/// Shapes (with the dtypes) where the attention form applies: every dtype at D <= 512, bf16
/// only at 512 < D <= 2048 (re-ID, LT, D not a multiple of 8, B and C below the 16 rows).
fn attention_cases(dtypes: &[DType]) -> Vec<(DType, HeadShape)> {
    let mut v: Vec<(DType, HeadShape)> =
        dtypes.iter().flat_map(|&dt| attention_shapes().into_iter().map(move |s| (dt, s))).collect();
    if dtypes.contains(&DType::BF16) {
        let wide = SHAPES.iter().filter(|s| s.d > plan::ATTN_DMAX_ALL).map(|s| shape(s.b, s.c, s.d));
        v.extend(
            wide.chain([shape(17, 150, 600), shape(9, 40, 1100), shape(3, 5, 2048)])
                .map(|s| (DType::BF16, s)),
        );
    }
    v
}

/// The attention form launches what `head/attn.rs` runs: the forward `[attn_fwd, attn_combine,
/// head_reduce]` (one `dev.run`), the backward `[attn_bwd]`: four kernels, the names the
/// plan picks (d128 / d512, `_scalar` for element loads, the dtype), its grids and dynamic
/// shared memory, in that order.
#[test]
fn attention_launch_list() {
    let dev = h200();
    let names = |p: &PathModel| p.kernels.iter().map(|k| k.name.clone()).collect::<Vec<_>>();
    let p = perf_model::attention(shape(512, 93_431, 512), DType::BF16, &dev).unwrap();
    assert_eq!(names(&p), ["attn_fwd_d512_bf16", "attn_combine_fwd_d512_bf16", "attn_bwd_d512_bf16"]);
    let p = perf_model::attention(shape(100, 1000, 101), DType::F32, &dev).unwrap();
    assert_eq!(
        names(&p),
        ["attn_fwd_d128_scalar_f32", "attn_combine_fwd_d512_f32", "attn_bwd_d128_scalar_f32"]
    );
    let p = perf_model::attention(shape(512, 1000, 2048), DType::BF16, &dev).unwrap();
    assert_eq!(names(&p), ["attn_fwd_d2048_bf16", "attn_combine_fwd_d2048_bf16", "attn_bwd_d2048_bf16"]);
    {
        for (dtype, s) in attention_cases(&[DType::BF16, DType::F32, DType::F16]) {
            let p = perf_model::attention(s, dtype, &dev).unwrap_or_else(|| panic!("{dtype:?} {s:?}"));
            let vec = plan::fused_vectorized(dtype, s.d);
            let (splits, per) = plan::attn_splits(dtype, s);
            let want = [
                plan::attn_fwd(dtype, s, 1, (splits, per), vec, AttnFwdArgs::default()).unwrap(),
                plan::attn_combine(dtype, s, 1, splits, AttnCombineArgs::default()).unwrap(),
                plan::attn_bwd(
                    dtype,
                    s,
                    1,
                    plan::attn_bwd_row_splits(dtype, s, 1),
                    vec,
                    AttnBwdArgs::default(),
                )
                .unwrap(),
            ];
            assert_eq!(p.kernels.len(), want.len(), "{dtype:?} {s:?}");
            for (k, l) in p.kernels.iter().zip(&want) {
                assert_eq!(k.name, l.kernel.name, "{dtype:?} {s:?}");
                let ctas = l.grid.iter().map(|&g| g as u64).product::<u64>();
                assert_eq!(k.grid.map(|g| g.ctas), Some(ctas), "{} {s:?}", k.name);
            }
            // Forward grid: row tiles x class splits; backward: one CTA per class tile.
            let rm = plan::attn_rows(dtype, plan::attn_dp(s.d));
            assert_eq!(want[0].grid, [s.b.div_ceil(rm) as u32, splits as u32, 1]);
            let rs = plan::attn_bwd_row_splits(dtype, s, 1).0;
            assert_eq!(want[2].grid, [s.c.div_ceil(rm) as u32, rs as u32, 1]);
            assert_eq!(want[0].smem, plan::attn_smem_bytes(dtype, plan::attn_dp(s.d)));
        }
    }
}

/// The attention form's mma FLOPs: each streamed tile of ATTN_BT rows feeds two products
/// with the RM resident rows over DP: forward 4 * pad(B, RM) * pad(C, 32) * DP (S and O),
/// backward 4 * pad(C, RM) * pad(B, 32) * DP (S again and dW): 8 * B * C * DP when B and C
/// are multiples of RM; the combine and the reduce do none.
#[test]
fn attention_flops_formula() {
    let dev = h200();
    let pad = |v: usize, t: usize| (v.div_ceil(t) * t) as f64;
    {
        for (dtype, s) in attention_cases(&[DType::BF16, DType::F32]) {
            let p = perf_model::attention(s, dtype, &dev).unwrap();
            let (rm, dp) = (plan::attn_rows(dtype, plan::attn_dp(s.d)), plan::attn_dp(s.d) as f64);
            let fwd = 4.0 * pad(s.b, rm) * pad(s.c, 32) * dp;
            let bwd = 4.0 * pad(s.c, rm) * pad(s.b, 32) * dp;
            assert_eq!(kernel(&p, "attn_fwd_").traffic.flops, fwd, "{dtype:?} {s:?}");
            assert_eq!(kernel(&p, "attn_bwd_").traffic.flops, bwd, "{dtype:?} {s:?}");
            assert_eq!(p.flops(), fwd + bwd, "{dtype:?} {s:?}");
            if s.b % rm == 0 && s.c % rm == 0 {
                assert_eq!(p.flops(), 8.0 * (s.b * s.c) as f64 * dp, "{dtype:?} {s:?}");
            }
        }
    }
    // The face shapes (B multiples of 64, D = 512): 8 * B * Cp * D, C padded to 32 (= to 64 here).
    for s in SHAPES.iter().filter(|s| s.d == 512) {
        let p = perf_model::attention(shape(s.b, s.c, s.d), DType::BF16, &dev).unwrap();
        assert_eq!(p.flops(), 8.0 * s.b as f64 * pad(s.c, 32) * 512.0, "{}", s.name);
    }
    // C = 20 is padded to 32 in the forward (streamed) and to 64 in the backward (resident).
    let p = perf_model::attention(shape(64, 20, 512), DType::BF16, &dev).unwrap();
    assert_eq!(p.flops(), 4.0 * 64.0 * 32.0 * 512.0 + 4.0 * 64.0 * 64.0 * 512.0);
}

/// `fused()` models what the dispatcher runs (`HeadOn::fused_kernels`): the attention form
/// where `plan::attn_supported` holds for the device's shared memory per block (D <= 512;
/// D <= 2048 in bf16), else the tiles. On the SPEC 9 shapes (bf16) every shape runs the
/// attention form (the faces with the d512 kernels, re-ID and LT with the d2048 ones); f16
/// too at D = 512 but the tiles at D = 2048; a device with 99 KiB per block (sm_86) the tiles
/// at D = 512 but the attention form at D = 128.
#[test]
fn fused_follows_the_dispatcher() {
    let dev = h200();
    assert_eq!(dev.max_smem_per_block, 232_448);
    let mut sets = vec![];
    for s in SHAPES.iter() {
        let sh = shape(s.b, s.c, s.d);
        let p = perf_model::fused(sh, DType::BF16, &dev);
        sets.push((s.name, p.kernel_set));
        match p.kernel_set {
            Some(FusedKernels::Attention) => {
                assert_eq!(p, perf_model::attention(sh, DType::BF16, &dev).unwrap(), "{}", s.name);
                assert!(p.kernels.iter().all(|k| !k.name.starts_with("fused_")), "{}", s.name);
            }
            _ => {
                assert_eq!(p, perf_model::tiles(sh, DType::BF16, &dev), "{}", s.name);
                assert!(perf_model::attention(sh, DType::BF16, &dev).is_none(), "{}", s.name);
                assert!(p.kernels.iter().all(|k| !k.name.starts_with("attn_")), "{}", s.name);
            }
        }
    }
    let (a, t) = (Some(FusedKernels::Attention), Some(FusedKernels::Tiles));
    assert_eq!(sets, [("reid", a), ("lt", a), ("face-93k", a), ("face-360k", a), ("face-1m", a)]);
    for s in SHAPES.iter().filter(|s| s.d == 2048) {
        let sh = shape(s.b, s.c, s.d);
        assert_eq!(perf_model::fused(sh, DType::F16, &dev).kernel_set, t, "{}", s.name);
        assert_eq!(perf_model::fused(sh, DType::F32, &dev).kernel_set, t, "{}", s.name);
    }

    let face = shape(512, 93_431, 512);
    assert_eq!(perf_model::fused(face, DType::F16, &dev).kernel_set, a);
    assert!(perf_model::attention(shape(512, 93_431, 513), DType::F16, &dev).is_none());
    assert_eq!(perf_model::fused(face, DType::F32, &dev).kernel_set, a);
    let small = DeviceModel { max_smem_per_block: 101_376, ..h200() };
    assert_eq!(perf_model::fused(face, DType::BF16, &small).kernel_set, t);
    assert_eq!(perf_model::fused(shape(512, 93_431, 128), DType::BF16, &small).kernel_set, a);
    let sm80 = DeviceModel { max_smem_per_block: 166_912, ..h200() };
    for s in SHAPES.iter().filter(|s| s.d == 2048) {
        assert_eq!(perf_model::fused(shape(s.b, s.c, s.d), DType::BF16, &sm80).kernel_set, t, "{}", s.name);
    }

    // The same rule as the plan's, for every dtype and D up to past the limit.
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for d in (1..=600).chain([1024, 1100, 2047, 2048, 2049, 4096]) {
            for dm in [dev, small] {
                let want = plan::attn_supported(dtype, d, dm.max_smem_per_block);
                let got = perf_model::fused_kernels(shape(64, 1000, d), dtype, &dm);
                assert_eq!(got == FusedKernels::Attention, want, "{dtype:?} D {d}");
            }
        }
    }
    // And the dispatcher itself, on the emulated H200 (when the crate is built with `emu`).
    if let Ok(emu) = featcloud::cuda::Device::emulated(132) {
        let head = featcloud::cuda::head::CudaHead::new(
            emu,
            featcloud::HeadConfig::default(),
            featcloud::cuda::head::HeadPath::Fused,
        )
        .unwrap();
        for s in SHAPES.iter().map(|s| shape(s.b, s.c, s.d)).chain([
            shape(64, 100, 509),
            shape(64, 100, 513),
            shape(64, 100, 2049),
        ]) {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let want = head.fused_kernels(s, dtype).unwrap();
                assert_eq!(perf_model::fused(s, dtype, &dev).kernel_set, Some(want), "{dtype:?} {s:?}");
            }
        }
    }
}

/// face-1M (B 2048, C 10^6, D 512, bf16) forward HBM bytes by hand. 32 row tiles of 64, 31,250
/// class tiles of 32: attn_splits gives 8 splits of 3,907 tiles (125,024 classes, 128 MB of W),
/// 256 CTAs at one per SM: wave 1 holds splits 0-3 and row tiles 0-3 of split 4, wave 2 the
/// rest. Split 4's W is read by both waves and does not fit in the 50 MiB L2, so it comes
/// from HBM twice; every other split's once. HBM: x 2,097,152, W 1,024,000,000, split 4
/// again 128,024,576, labels 8,192, the target W rows 2,097,152, part 3*8*2048*4 = 196,608,
/// opart 8*2048*512*4 = 33,554,432, c_iy/t/alpha/dt 32,768, inv_x 8,192, inv_w 4,000,000:
/// 1,194,019,072 bytes in all. Between split 4's two reads, wave 1 streams the W of splits 0-4
/// (640 MB): with a 1 GiB L2 it would fit and the second read hit: 128,024,576 fewer; with
/// 256 MiB still not. face-360k: 16 splits of 704 tiles (23,068,672 bytes of W), 16 row
/// tiles, wave 1 holds splits 0-7 and 4 CTAs of split 8, which 12 CTAs of wave 2 re-read
/// (the 9 splits of wave 1 stream 207 MB); face-93k: 32 splits of 92 tiles (3,014,656
/// bytes), 8 row tiles, wave 1 streams 17 splits (51.2 MB), which fit with x (0.5 MB) in the
/// 52.4 MB: no second read. Backward: x (2 MB) fits, so HBM reads x, W once each.
#[test]
fn attention_face_1m_anchor() {
    let s = shape(2048, 1_000_000, 512);
    assert_eq!(plan::attn_splits(DType::BF16, s), (8, 3907));
    let p = perf_model::attention(s, DType::BF16, &h200()).unwrap();
    let f = kernel(&p, "attn_fwd_d512_bf16");
    assert_eq!(f.grid.map(|g| (g.ctas, g.ctas_per_sm, g.waves)), Some((256, 1, 2)));
    assert_eq!(f.traffic.hbm_bytes, 1_194_019_072.0);
    let fwd_hbm = |s: HeadShape, l2: u64| {
        let dev = DeviceModel { l2_bytes: l2 as f64, ..h200() };
        kernel(&perf_model::attention(s, DType::BF16, &dev).unwrap(), "attn_fwd_").traffic.hbm_bytes
    };
    assert_eq!(f.traffic.hbm_bytes - fwd_hbm(s, 1 << 30), 128_024_576.0);
    assert_eq!(f.traffic.hbm_bytes - fwd_hbm(s, 256 << 20), 0.0);
    let s360 = shape(1024, 360_232, 512);
    assert_eq!(plan::attn_splits(DType::BF16, s360), (16, 704));
    assert_eq!(fwd_hbm(s360, 50 << 20) - fwd_hbm(s360, 1 << 30), 23_068_672.0);
    let s93 = shape(512, 93_431, 512);
    assert_eq!(plan::attn_splits(DType::BF16, s93), (32, 92));
    assert_eq!(fwd_hbm(s93, 50 << 20) - fwd_hbm(s93, 1 << 30), 0.0);
    assert_eq!(fwd_hbm(s93, 50 << 20) - fwd_hbm(s93, 48 << 20), -3_014_656.0);
    // L2: x tile by each of the 8 splits, W by each of the 32 row tiles, plus what HBM moves
    // besides x and W (labels per CTA: 8 x).
    let x = 2048.0 * 512.0 * 2.0;
    let w = 1e6 * 512.0 * 2.0;
    let rest = 8.0 * 8192.0 + x + 196_608.0 + 33_554_432.0 + 32_768.0 + 8_192.0 + 4e6;
    assert_eq!(f.traffic.l2_bytes, 8.0 * x + 32.0 * w + x + rest);
    // Both tile kernels are compute-bound at 490 TFLOP/s: 4 * 2048 * 10^6 * 512 / 489.8e12 s each.
    for k in [f, kernel(&p, "attn_bwd_")] {
        assert_eq!(k.time.bound, Bound::Compute, "{k:?}");
        let want = 4.0 * 2048.0 * 1e6 * 512.0 / (790e12 * 0.62) * 1e3;
        assert!((k.time.terms.compute_ms - want).abs() < 1e-9, "{k:?}");
    }
    let b = kernel(&p, "attn_bwd_d512_bf16");
    assert_eq!(b.grid.map(|g| g.ctas), Some(15_625));
    // x, W, 5 per-row f32 inputs, inv_w, u (f32), labels, dx, dW, and the row losses that
    // block 0 reduces: each once.
    let hbm_b = x + w + 5.0 * 2048.0 * 4.0 + 4e6 + 2048.0 * 512.0 * 4.0 + 2048.0 * 4.0 + x + w + 2048.0 * 4.0;
    assert_eq!(b.traffic.hbm_bytes, hbm_b);
}

/// LT (512 x 2048 x 1000, bf16): the backward splits its rows in two (`attn_bwd_row_splits`):
/// 63 class tiles of 16 W rows x 2 = 126 CTAs, each streaming 8 of the 16 row tiles. L2, by
/// hand: x (2,097,152 bytes) and 5 f32 inputs per row (10,240) by each class tile column, W
/// read and dW written (4,096,000 each), inv_w (4,000), u + dx + labels + row losses
/// (6,295,552), and the split's hand-off: 2 partials of C x D f32 (8,192,000 each) written
/// and read back, 63 counters incremented by 2 CTAs each (4 bytes read and written). The
/// busiest CTA (the last of a class tile): half of the x traffic of its column, W's share,
/// and its own partial out plus 2 in (3 x 16 x 2048 x 4 bytes), at one SM's share of L2.
#[test]
fn attention_lt_row_split_anchor() {
    let s = shape(512, 1000, 2048);
    assert_eq!(plan::attn_bwd_row_splits(DType::BF16, s, 1), (2, 8));
    let dev = h200();
    let p = perf_model::attention(s, DType::BF16, &dev).unwrap();
    let b = kernel(&p, "attn_bwd_d2048_bf16");
    assert_eq!(b.grid.map(|g| (g.ctas, g.waves)), Some((126, 1)));
    let col = 2_097_152.0 + 10_240.0;
    let l2 = 63.0 * col + 4_096_000.0 + 4_000.0 + 6_295_552.0 + 4_096_000.0 + 4.0 * 8_192_000.0 + 4.0 * 252.0;
    assert_eq!(b.traffic.l2_bytes, l2);
    let busiest = (col / 2.0 + 4_096_000.0 / 63.0 + 3.0 * 16.0 * 2048.0 * 4.0) / l2;
    let want = l2 / 5.5e12 * 1e3 * 132.0 * busiest + dev.launch_us * 1e-3;
    assert_eq!(b.time.bound, Bound::Latency);
    assert!((b.time.predicted_ms - want).abs() < 1e-12, "{} against {want}", b.time.predicted_ms);
    // Below the one-split backward's 0.060 ms (63 CTAs, each streaming all 16 row tiles).
    assert!(b.time.predicted_ms < 0.041, "{}", b.time.predicted_ms);
}

/// The attention form with K sub-centers (SPEC 5b): the same three launches; the forward's
/// FLOPs scale with K times 32 / (K floor(32 / K)) (the masked rows of a class-aligned tile
/// are still multiplied), the backward's with the resident tiles of floor(RM / K) classes;
/// W's HBM bytes grow with K; K = 1 is `attention` itself; where the fused path does not take
/// K (f32 at D > 512) there is no prediction.
#[test]
fn attention_with_subcenters_scales_with_k() {
    let dev = h200();
    for s in [shape(512, 93_431, 512), shape(64, 751, 2048)] {
        let one = perf_model::attention(s, DType::BF16, &dev).unwrap();
        let same = perf_model::attention_k(s, 1, DType::BF16, &dev).unwrap();
        assert_eq!(one.total_ms(), same.total_ms());
        for k in [2usize, 3, 4] {
            let p = perf_model::attention_k(s, k, DType::BF16, &dev).unwrap();
            assert_eq!(p.kernels.len(), 3);
            let rm = plan::attn_rows(DType::BF16, plan::attn_dp(s.d));
            let (cpt, cpr) = (32 / k, rm / k);
            let fwd = |p: &PathModel| kernel(p, "attn_fwd").traffic.flops;
            let bwd = |p: &PathModel| kernel(p, "attn_bwd").traffic.flops;
            let want_f = s.c.div_ceil(cpt) as f64 / s.c.div_ceil(32) as f64;
            let want_b = s.c.div_ceil(cpr) as f64 / s.c.div_ceil(rm) as f64;
            assert!((fwd(&p) / fwd(&one) - want_f).abs() < 1e-9, "K={k} {s:?}");
            assert!((bwd(&p) / bwd(&one) - want_b).abs() < 1e-9, "K={k} {s:?}");
            // W read by the forward and the backward, dW written: at least 3 (K - 1) W more.
            let w_bytes = (s.c * s.d * 2) as f64;
            assert!(
                p.hbm_bytes() - one.hbm_bytes() >= 2.5 * (k - 1) as f64 * w_bytes,
                "K={k} {s:?}: W bytes scale with K"
            );
            println!(
                "{s:?} K={k}: {:.3} ms predicted vs {:.3} ms at K = 1 ({:.2}x; FLOPs {:.2}x)",
                p.total_ms(),
                one.total_ms(),
                p.total_ms() / one.total_ms(),
                p.flops() / one.flops()
            );
        }
    }
    assert!(perf_model::attention_k(shape(64, 100, 1024), 3, DType::F32, &dev).is_none());
}
