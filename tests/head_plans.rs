//! The head's planning functions on the host (no device): which kernel, grid, block,
//! shared memory and argument struct each launch gets; and the host overhead of a
//! call, counted on the device (launches, allocations, copies, synchronizations).

use featcloud::config::HeadConfig;
use featcloud::cuda::args::HeadParams;
use featcloud::cuda::args::{FusedBwdArgs, FusedFwdArgs, NormbackArgs, RefGradArgs};
use featcloud::cuda::head::plan::{self, FORWARD_TILES, THREADS};
use featcloud::cuda::head::{CudaHead, FusedKernels, FusedTuning, GradDtype, HeadPath, HeadUpstream};
use featcloud::cuda::{test_device, CounterSnapshot, DevPtr, Tensor};
use featcloud::shape::HeadShape;
use featcloud::DType;

const SHAPE: HeadShape = HeadShape { b: 130, c: 300, d: 72 };

#[test]
fn fused_forward_grid_covers_every_class_and_row_tile() {
    let a = FusedFwdArgs { x: DevPtr(0x1000), w: DevPtr(0x2000), ..Default::default() };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for tile in FORWARD_TILES {
            for vec in [true, false] {
                let l = plan::fused_fwd(dtype, SHAPE, tile, vec, a).unwrap();
                assert_eq!(l.grid, [SHAPE.c.div_ceil(tile.1) as u32, SHAPE.b.div_ceil(tile.0) as u32, 1]);
                assert_eq!(l.block, [THREADS, 1, 1]);
                let name = l.kernel.name;
                assert!(name.ends_with(dtype.name()), "{name} for {dtype:?}");
                assert_eq!(name.contains("scalar"), !vec, "{name}");
                let tag = match tile {
                    (128, 128) => "fused_fwd_r128c128_",
                    (64, 128) => "fused_fwd_r64c128_",
                    _ => "fused_fwd_r64c64_",
                };
                assert!(name.starts_with(tag), "{name} for {tile:?}");
                let got = l.args_as::<FusedFwdArgs>().unwrap();
                assert_eq!((got.b, got.c, got.d), (130, 300, 72), "the plan fills the shape");
                assert_eq!((got.x, got.w), (a.x, a.w), "pointers pass through unchanged");
            }
        }
        assert!(plan::fused_fwd(dtype, SHAPE, (32, 32), true, a).is_err());
    }
}

#[test]
fn fused_backward_grid_smem_and_dw_destination() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (cols, g, s) in [(128, 3, 1), (64, 5, 2)] {
            let a = FusedBwdArgs { dwp: DevPtr(if s > 1 { 0x10 } else { 0 }), ..Default::default() };
            let l = plan::fused_bwd(dtype, SHAPE, (cols, g, s), true, a).unwrap();
            assert_eq!(l.grid, [g as u32, s as u32, 1]);
            assert!(l.kernel.name.starts_with(if cols == 64 { "fused_bwd_c64_" } else { "fused_bwd_c128_" }));
            // The dynamic shared memory the kernel was written for (the .cu asserts it).
            let want = match (dtype, cols) {
                (DType::F32, 128) => 98_304,
                (_, 128) => 65_536,
                (DType::F32, _) => 88_064,
                _ => 55_296,
            };
            assert_eq!(l.smem, want);
        }
        assert!(plan::fused_bwd(dtype, SHAPE, (96, 1, 1), true, FusedBwdArgs::default()).is_err());
    }
}

#[test]
fn one_warp_per_row_kernels_cover_every_row() {
    for rows in [1usize, 8, 9, 130] {
        let l = plan::normback(DType::BF16, true, rows, 40, 3, NormbackArgs::default());
        assert_eq!(l.grid[0] as usize * 8, rows.div_ceil(8) * 8);
        assert!(l.kernel.name.starts_with("head_normback_bwd_f32out_"), "f32 output of bf16 storage");
        let a = l.args_as::<NormbackArgs>().unwrap();
        assert_eq!((a.nparts, a.part_stride, a.rows, a.d), (3, (rows * 40) as i64, rows as i32, 40));
    }
    let l = plan::ref_grad(SHAPE, 1, RefGradArgs::default());
    assert_eq!(l.grid, [SHAPE.c.div_ceil(256) as u32, SHAPE.b as u32, 1]);
    // K sub-centers: one thread per column of the B x C*K cosines (SPEC 5b).
    let l = plan::ref_grad(SHAPE, 3, RefGradArgs::default());
    assert_eq!(l.grid, [(3 * SHAPE.c).div_ceil(256) as u32, SHAPE.b as u32, 1]);
    assert_eq!(
        (l.args_as::<RefGradArgs>().unwrap().c, l.args_as::<RefGradArgs>().unwrap().k),
        (SHAPE.c as i32, 3)
    );
}

#[test]
fn head_params_carry_every_option() {
    let cfg = HeadConfig { label_smoothing: 0.2, ..HeadConfig::combined() };
    let p = HeadParams::new(&cfg, SHAPE.c, 9, 4);
    assert_eq!((p.s, p.m1, p.m2, p.m3), (cfg.s, cfg.m1, cfg.m2, cfg.m3));
    assert_eq!(p.ls_over_c, 0.2 / 300.0);
    assert_eq!((p.seed, p.step), (9, 4));
}

/// The step tests' shape: 3 row tiles of 64 (so the tiles' row splits S = 2 are allowed).
const STEP: HeadShape = HeadShape { b: 140, c: 300, d: 32 };

/// x, W, sigma and labels of a [`STEP`]-shaped bf16 step on `dev`.
fn step_inputs(
    dev: &std::sync::Arc<featcloud::cuda::Device>,
) -> (Tensor<half::bf16>, Tensor<half::bf16>, Tensor<f32>, Vec<i32>) {
    let HeadShape { b, c, d } = STEP;
    let x = Tensor::<half::bf16>::from_f32(dev, &vec![0.1; b * d], &[b, d]).unwrap();
    let w = Tensor::<half::bf16>::from_f32(
        dev,
        &(0..c * d).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>(),
        &[c, d],
    )
    .unwrap();
    let sigma = Tensor::<f32>::zeros(dev, &[c]).unwrap();
    let labels: Vec<i32> = (0..b as i32).map(|i| i * 7 % c as i32).collect();
    (x, w, sigma, labels)
}

/// One fused forward+backward's device operations, and its dW (read back after counting).
fn fused_step(
    head: &CudaHead,
    x: &Tensor<half::bf16>,
    w: &Tensor<half::bf16>,
    labels: &[i32],
    sigma: &Tensor<f32>,
) -> (CounterSnapshot, Vec<f32>) {
    let dev = head.device();
    let before = dev.counters();
    let (fwd, grads) = head
        .forward_backward(x, w, labels, sigma, 1, 2, HeadUpstream::Scalar(1.0), GradDtype::Input)
        .unwrap();
    let used = dev.counters() - before;
    assert!(fwd.loss.is_finite());
    (used, grads.dw.to_f32_host(dev).unwrap())
}

#[test]
fn a_fused_step_is_seven_launches_one_upload_one_readback_and_allocates_only_its_outputs() {
    let Some(dev) = test_device() else { return };
    let (x, w, sigma, labels) = step_inputs(&dev);
    for splits in [1usize, 2] {
        let tuning = FusedTuning {
            row_splits: Some(splits),
            kernels: Some(FusedKernels::Tiles),
            ..FusedTuning::default()
        };
        let head =
            CudaHead::new(dev.clone(), HeadConfig::arcface(), HeadPath::Fused).unwrap().with_tuning(tuning);
        let (first, _) = fused_step(&head, &x, &w, &labels, &sigma);
        let (second, _) = fused_step(&head, &x, &w, &labels, &sigma);
        // Row norms of x and W, tiles, combine, reduce; backward tiles, dx normback, and
        // with row splits the dW normback.
        let launches = 7 + u64::from(splits > 1);
        // Outputs: loss, lse, c_iy, t, alpha, dt per row; dx; dW.
        let outputs = 8;
        // The labels: one copy, from pinned memory; the loss: one readback; no sync.
        let want = CounterSnapshot {
            launches,
            allocations: outputs,
            htod: 1,
            htod_pageable: 0,
            dtoh: 1,
            syncs: 0,
            gemms: 0,
        };
        assert_eq!(second, want, "S = {splits}: a second call of the same shape");
        assert_eq!(first.launches, launches);
        assert!(first.allocations > outputs, "the first call allocates the scratch too");
    }
}

#[test]
fn attention_plans_split_by_shape_only_and_cover_every_tile() {
    use featcloud::cuda::args::{AttnBwdArgs, AttnFwdArgs};
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut shapes =
            vec![SHAPE, HeadShape { b: 1, c: 1, d: 1 }, HeadShape { b: 2048, c: 1_000_000, d: 512 }];
        if dtype == DType::BF16 {
            shapes.extend([HeadShape { b: 512, c: 1000, d: 2048 }, HeadShape { b: 3, c: 5, d: 513 }]);
        }
        for shape in shapes {
            let dp = plan::attn_dp(shape.d);
            let rm = plan::attn_rows(dtype, dp);
            let (splits, per) = plan::attn_splits(dtype, shape);
            let n_ct = shape.c.div_ceil(plan::ATTN_BT);
            // Every class tile in exactly one split, no split empty.
            assert!(
                splits * per >= n_ct && (splits - 1) * per < n_ct,
                "{shape:?}: {splits} x {per} for {n_ct}"
            );
            let ctas = shape.b.div_ceil(rm) * splits;
            assert!(
                ctas <= plan::ATTN_TARGET_CTAS.max(shape.b.div_ceil(rm)) + shape.b.div_ceil(rm),
                "{ctas}"
            );
            let fwd = plan::attn_fwd(dtype, shape, 1, (splits, per), true, AttnFwdArgs::default());
            let (rsplits, rper) = plan::attn_bwd_row_splits(dtype, shape, 1);
            let n_rt = shape.b.div_ceil(plan::ATTN_BT);
            // Every x row tile in exactly one row split, none empty; within the CTA target
            // unless one split already passes it; the dW partials within the O budget.
            assert!(rsplits * rper >= n_rt && (rsplits - 1) * rper < n_rt, "{shape:?}: {rsplits} x {rper}");
            let n_cb = shape.c.div_ceil(rm);
            assert!(rsplits == 1 || n_cb * rsplits <= plan::ATTN_BWD_TARGET_CTAS, "{shape:?}: {rsplits}");
            assert!(
                rsplits == 1
                    || rsplits * shape.c * shape.d * 4
                        <= plan::ATTN_OPART_BUDGET.max(shape.c * shape.d * dtype.size())
            );
            let bwd = plan::attn_bwd(dtype, shape, 1, (rsplits, rper), true, AttnBwdArgs::default());
            let (fwd, bwd) = (fwd.unwrap(), bwd.unwrap());
            assert_eq!(fwd.grid, [shape.b.div_ceil(rm) as u32, splits as u32, 1]);
            assert_eq!(fwd.args_as::<AttnFwdArgs>().unwrap().tiles_per_split, per as i32);
            assert_eq!(bwd.grid, [n_cb as u32, rsplits as u32, 1]);
            assert_eq!(bwd.args_as::<AttnBwdArgs>().unwrap().rtiles_per_split, rper as i32);
            assert_eq!(
                dp,
                if shape.d <= 128 {
                    128
                } else if shape.d <= 512 {
                    512
                } else {
                    2048
                }
            );
            for l in [&fwd, &bwd] {
                assert!(l.kernel.name.contains(&format!("_d{dp}_")), "{}", l.kernel.name);
                assert!(l.kernel.name.ends_with(dtype.name()), "{}", l.kernel.name);
                assert_eq!(l.smem, plan::attn_smem_bytes(dtype, dp));
            }
        }
        // D past the O accumulator is refused, not truncated (D > 512 outside bf16).
        let wide = HeadShape { b: 4, c: 4, d: if dtype == DType::BF16 { 2049 } else { 513 } };
        assert!(plan::attn_fwd(dtype, wide, 1, (1, 1), true, AttnFwdArgs::default()).is_err());
        assert!(plan::attn_fwd(dtype, wide, 1, (1, 1), false, AttnFwdArgs::default()).is_err());
        // Splits that leave a class tile out (or overlap past C) are refused.
        let (splits, per) = plan::attn_splits(dtype, SHAPE);
        assert!(
            plan::attn_fwd(
                dtype,
                SHAPE,
                1,
                (splits, per.saturating_sub(1).max(1)),
                true,
                AttnFwdArgs::default()
            )
            .is_err()
                || per == 1
        );
        assert!(plan::attn_fwd(dtype, SHAPE, 1, (splits + 1, per), true, AttnFwdArgs::default()).is_err());
        assert!(plan::attn_bwd(dtype, wide, 1, (1, 1), true, AttnBwdArgs::default()).is_err());
        // Row splits that leave a row tile out or hold an empty one are refused (B = 100:
        // 4 row tiles of 32).
        let rows = HeadShape { b: 100, c: 10, d: 64 };
        for bad in [(0, 1), (1, 3), (3, 1), (4, 2), (2, 1), (3, 2)] {
            assert!(plan::attn_bwd(dtype, rows, 1, bad, true, AttnBwdArgs::default()).is_err(), "{bad:?}");
        }
        for good in [(1, 4), (2, 2), (4, 1)] {
            assert_eq!(plan::attn_row_split_tiles(rows, good.0), good, "{good:?}");
            assert!(plan::attn_bwd(dtype, rows, 1, good, true, AttnBwdArgs::default()).is_ok(), "{good:?}");
        }
        // Three wanted: 2 tiles per split, so 2 splits (a third would be empty).
        assert_eq!(plan::attn_row_split_tiles(rows, 3), (2, 2));
    }
    // The row splits the dispatcher picks (the busiest CTA's bytes, see attn_bwd_row_splits):
    // two at LT (126 CTAs); one at re-ID (2 row tiles: the partials would cost more than the
    // rows they save) and at face-93k (1,460 class tiles fill the device).
    assert_eq!(plan::attn_bwd_row_splits(DType::BF16, HeadShape { b: 512, c: 1000, d: 2048 }, 1), (2, 8));
    assert_eq!(plan::attn_bwd_row_splits(DType::BF16, HeadShape { b: 64, c: 751, d: 2048 }, 1), (1, 2));
    assert_eq!(plan::attn_bwd_row_splits(DType::BF16, HeadShape { b: 512, c: 93_431, d: 512 }, 1), (1, 16));
    // A bf16 tile of 64 W rows at D = 512 holds a partial of 4 x tiles' worth: no split pays.
    assert_eq!(plan::attn_bwd_row_splits(DType::BF16, HeadShape { b: 512, c: 1000, d: 512 }, 1).0, 1);
    // f32 (32 resident rows, 4-byte x) at the same shape: 32 class tiles, so at most 4 splits,
    // and per column 4 x 128 + 5 x 128 bytes beat 6 x 128 + 4 x 128, 8 x 128 + 3 x 128 and 16 x 128.
    assert_eq!(plan::attn_bwd_row_splits(DType::F32, HeadShape { b: 512, c: 1000, d: 512 }, 1), (4, 4));
    // The device's SM count plays no part: the same shape gives the same grid everywhere.
    assert_eq!(plan::attn_splits(DType::BF16, SHAPE), plan::attn_splits(DType::BF16, SHAPE));
    // The shared memory the .cu file asserts.
    assert_eq!(plan::attn_smem_bytes(DType::BF16, 512), 138_240);
    assert_eq!(plan::attn_smem_bytes(DType::F32, 512), 136_704);
    assert_eq!(plan::attn_smem_bytes(DType::BF16, 2048), 198_656);
    assert_eq!(plan::attn_rows(DType::BF16, 2048), 16);
    // D > 512: bf16 only, on sm_90's shared memory.
    assert!(plan::attn_supported(DType::BF16, 2048, plan::SM90_MAX_SMEM));
    assert!(!plan::attn_supported(DType::BF16, 2049, plan::SM90_MAX_SMEM));
    assert!(!plan::attn_supported(DType::BF16, 1024, 166_912));
    assert!(!plan::attn_supported(DType::F16, 513, plan::SM90_MAX_SMEM));
    assert!(!plan::attn_supported(DType::F32, 513, plan::SM90_MAX_SMEM));
}

/// Also with the backward's row splits (3 over STEP's 5 row tiles): their dW partials and
/// counters are scratch kept between calls (no allocation, no memset on the second call), and
/// the counters come back 0, so the second call elects the same summing CTAs and gives dW's bits
/// again (a counter left non-zero would elect none, or the wrong one, and leave dW unwritten).
#[test]
fn an_attention_step_is_three_launches_one_upload_one_readback_and_allocates_only_its_outputs() {
    let Some(dev) = test_device() else { return };
    let (x, w, sigma, labels) = step_inputs(&dev);
    let (b, c, d) = (STEP.b, STEP.c, STEP.d);
    for row_splits in [None, Some(3)] {
        let tuning = FusedTuning { attn_row_splits: row_splits, ..Default::default() };
        let head =
            CudaHead::new(dev.clone(), HeadConfig::arcface(), HeadPath::Fused).unwrap().with_tuning(tuning);
        assert_eq!(head.fused_kernels(HeadShape { b, c, d }, DType::BF16).unwrap(), FusedKernels::Attention);
        let splits = head.attention_row_splits(STEP, DType::BF16).0;
        assert_eq!(splits, if row_splits.is_some() { 3 } else { 1 });
        let (first, dw1) = fused_step(&head, &x, &w, &labels, &sigma);
        let (second, dw2) = fused_step(&head, &x, &w, &labels, &sigma);
        // Tiles (with dx), combine; backward (dW, dx scaling and the loss reduction).
        // Outputs: loss, lse, c_iy, t, alpha, dt per row; the saved dx for unit weights and the
        // two inverse norms; dx; dW.
        let want = CounterSnapshot {
            launches: 3,
            allocations: 11,
            htod: 1,
            htod_pageable: 0,
            dtoh: 1,
            syncs: 0,
            gemms: 0,
        };
        assert_eq!(second, want, "a second call of the same shape, {splits} row splits");
        assert_eq!(first.launches, 3);
        assert!(first.allocations > 11, "the first call allocates the scratch too");
        assert!(dw1.iter().all(|v| v.is_finite()) && dw1.iter().any(|&v| v != 0.0));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&dw1) == bits(&dw2), "{splits} row splits: the second call's dW differs");
    }
}

/// Sub-centers (SPEC 5b) in the attention-form plans: class-aligned tiles of floor(32 / K)
/// classes streamed in the forward (the splits cover ceil(C / that) tiles) and floor(RM / K)
/// resident in the backward (its grid); K reaches every launch's arguments; a K larger than a
/// tile's rows (16 at D > 512) is refused; the fused path takes K > 1 only where the attention
/// form runs.
#[test]
fn attention_plans_with_subcenters_use_class_aligned_tiles() {
    use featcloud::cuda::args::{AttnBwdArgs, AttnCombineArgs, AttnFwdArgs};
    use featcloud::cuda::head::fused_takes_subcenters;
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut shapes = vec![SHAPE, HeadShape { b: 1, c: 1, d: 8 }, HeadShape { b: 512, c: 93_431, d: 512 }];
        if dtype == DType::BF16 {
            shapes.push(HeadShape { b: 64, c: 751, d: 2048 });
        }
        for shape in shapes {
            let rm = plan::attn_rows(dtype, plan::attn_dp(shape.d));
            for k in [1usize, 2, 3, 4, 16] {
                let (splits, per) = plan::attn_splits_k(dtype, shape, k);
                let n_ct = shape.c.div_ceil(32 / k);
                assert_eq!(plan::attn_tile_classes(k), 32 / k);
                assert!(
                    splits * per >= n_ct && (splits - 1) * per < n_ct,
                    "{shape:?} K={k}: {splits} x {per} for {n_ct}"
                );
                let fwd =
                    plan::attn_fwd(dtype, shape, k, (splits, per), true, AttnFwdArgs::default()).unwrap();
                let comb = plan::attn_combine(dtype, shape, k, splits, AttnCombineArgs::default()).unwrap();
                let rs = plan::attn_bwd_row_splits(dtype, shape, k);
                let bwd = plan::attn_bwd(dtype, shape, k, rs, true, AttnBwdArgs::default()).unwrap();
                assert_eq!(fwd.args_as::<AttnFwdArgs>().unwrap().k, k as i32);
                assert_eq!(comb.args_as::<AttnCombineArgs>().unwrap().k, k as i32);
                assert_eq!(bwd.args_as::<AttnBwdArgs>().unwrap().k, k as i32);
                assert_eq!(bwd.grid, [shape.c.div_ceil(rm / k) as u32, rs.0 as u32, 1], "{shape:?} K={k}");
                assert!(fused_takes_subcenters(dtype, shape.d, k, plan::SM90_MAX_SMEM));
                // A split count set by hand covers the same class-aligned tiles.
                let (s2, p2) = plan::attn_split_tiles_k(shape, k, 2);
                assert!(plan::attn_fwd(dtype, shape, k, (s2, p2), true, AttnFwdArgs::default()).is_ok());
            }
            for k in [0usize, rm.min(32) + 1] {
                assert!(
                    plan::attn_bwd(dtype, shape, k, (1, shape.b.div_ceil(32)), true, AttnBwdArgs::default())
                        .is_err(),
                    "K={k}"
                );
                assert!(!fused_takes_subcenters(dtype, shape.d, k, plan::SM90_MAX_SMEM) || k == 0);
            }
        }
        // Where the attention form does not run, the fused path takes K = 1 only.
        let d = if dtype == DType::BF16 { 4096 } else { 1024 };
        assert!(fused_takes_subcenters(dtype, d, 1, plan::SM90_MAX_SMEM));
        assert!(!fused_takes_subcenters(dtype, d, 2, plan::SM90_MAX_SMEM));
    }
}
