//! The emulated device's own checks, each with its negative control: a kernel (or a
//! launch) that breaks the rule must be caught, one that keeps it must pass.
//!
//! The `emu_selftest_*` kernels live in `emu/selftest.cu` (compiled only into the
//! emulator); the rest are the crate's real kernels launched wrongly on purpose.
//! Skips (with a message) when the crate was built without the `emu` feature.

use featcloud::cuda::args::{BiasActFwdArgs, RowNormsArgs};
use featcloud::cuda::kernels::{head_fused, norms};
use featcloud::cuda::norms::row_norms_launch;
use featcloud::cuda::{
    check_launch_limits, DevPtr, Device, EmuOrder, Kernel, KernelArgs, KernelResources, Launch, Module,
    Tensor,
};
use featcloud::DType;
use featcloud::Error;
use std::sync::Arc;

const POISON: u32 = 0xFFFF_FFFF;

/// The selftest kernels' module (no PTX or cubins: the emulator has them by name).
static SELFTEST: Module = Module { name: "emu_selftest", ptx: "", cubins: &[] };

fn selftest(name: &'static str) -> Kernel {
    // The test's mirrors of the selftest structs have other names: not checked by name.
    Kernel { module: &SELFTEST, name, max_threads: 1024, args: "" }
}

fn emulated() -> Option<Arc<Device>> {
    if !featcloud::cuda::emu::AVAILABLE {
        eprintln!("SKIP: built without the `emu` feature");
        return None;
    }
    let dev = featcloud::cuda::test_emulated_device(132);
    assert!(dev.is_some(), "the emulated device opens when the emu feature is built");
    dev
}

/// Runs one launch; the message of the error it gave, if any.
fn launch(dev: &Device, l: &Launch) -> Option<String> {
    // SAFETY: every pointer in the selftest argument structs below is a live emulated
    // buffer of the size the kernel's comment in emu/selftest.cu asks for (or, for the
    // negative controls, deliberately one element short: the emulator turns the overrun
    // into an error instead of touching memory outside the allocation's guard zone).
    unsafe { dev.launch(l) }.err().map(|e| e.to_string())
}

fn expect_err(dev: &Device, l: &Launch, words: &[&str]) {
    let msg = launch(dev, l).unwrap_or_else(|| panic!("{}: expected an error with {words:?}", l.kernel.name));
    for w in words {
        assert!(msg.contains(w), "{}: message {msg:?} lacks {w:?}", l.kernel.name);
    }
}

/// A `#[repr(C)]` mirror of an argument struct of emu/selftest.cu, with its size asserted.
macro_rules! selftest_args {
    ($name:ident mirrors $c:literal, $size:literal bytes { $($field:ident: $ty:ty),* $(,)? }) => {
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
        struct $name {
            $($field: $ty),*
        }
        const _: () = assert!(std::mem::size_of::<$name>() == $size, $c);
        // SAFETY: mirrors the emu/selftest.cu struct named $c field for field (same size,
        // asserted above; bytemuck::Pod rules out padding).
        unsafe impl KernelArgs for $name {}
    };
}

selftest_args!(CpAsyncArgs mirrors "EmuSelftestCpAsyncArgs", 24 bytes { src: DevPtr, out: DevPtr, mode: u32, src_bytes: u32 });
selftest_args!(OutModeArgs mirrors "EmuSelftestOutModeArgs", 16 bytes { out: DevPtr, mode: u32, _pad0: u32 });
selftest_args!(OrderArgs mirrors "EmuSelftestOrderArgs", 24 bytes { block_seq: DevPtr, last_writer: DevPtr, counter: DevPtr });

#[test]
fn cp_async_lands_only_at_its_wait() {
    let Some(dev) = emulated() else { return };
    let n = 32usize;
    let src_host: Vec<u32> = (0..8 * n as u32).map(|v| v * 7 + 1).collect();
    let run = |mode: u32, src_bytes: u32| -> (Option<String>, Vec<u32>) {
        let src = Tensor::<u32>::from_host(&dev, &src_host, &[8 * n]).unwrap();
        let out = Tensor::<u32>::zeros(&dev, &[8 * n]).unwrap();
        let args = CpAsyncArgs { src: src.ptr(), out: out.ptr(), mode, src_bytes };
        let err = launch(
            &dev,
            &Launch::new(selftest("emu_selftest_cp_async"), [1, 1, 1], [n as u32, 1, 1], 0, &args),
        );
        (err, out.to_host(&dev).unwrap())
    };
    let (a, b) = (0..4 * n, 4 * n..8 * n);
    // Read before the wait: poison; after it: the data.
    let (err, out) = run(0, 16);
    assert_eq!(err, None);
    assert!(out[a.clone()].iter().all(|&v| v == POISON), "a read before wait_group saw data");
    assert_eq!(&out[b.clone()], &src_host[a.clone()], "after the wait the copy has landed");
    // Partial copies zero-fill the rest of the 16 bytes.
    let (err, out) = run(0, 8);
    assert_eq!(err, None);
    for t in 0..n {
        assert_eq!(&out[4 * n + 4 * t..4 * n + 4 * t + 2], &src_host[4 * t..4 * t + 2]);
        assert_eq!(&out[4 * n + 4 * t + 2..4 * n + 4 * t + 4], &[0, 0]);
    }
    // wait_group 1 retires the older group only.
    let (err, out) = run(1, 16);
    assert_eq!(err, None);
    assert_eq!(&out[a.clone()], &src_host[a.clone()]);
    assert!(out[b.clone()].iter().all(|&v| v == POISON), "wait_group 1 completed the newest group too");
    // A wait retires committed groups only.
    let (err, out) = run(2, 16);
    assert_eq!(err, None);
    assert!(out[a.clone()].iter().all(|&v| v == POISON));
    for (mode, words) in [
        (3, &["exited", "cp.async"][..]),
        (4, &["written while the copy was in flight"][..]),
        (5, &["source", "changed"][..]),
        (6, &["not 16-byte aligned"][..]),
        (7, &["not in shared memory"][..]),
    ] {
        let (err, _) = run(mode, 16);
        let msg = err.unwrap_or_else(|| panic!("cp.async mode {mode}: no error"));
        assert!(words.iter().all(|w| msg.contains(w)), "cp.async mode {mode}: {msg}");
    }
}

#[test]
fn static_and_dynamic_shared_memory_are_poisoned_at_every_block() {
    let Some(dev) = emulated() else { return };
    let blocks = 3usize;
    for order in [EmuOrder::Ascending, EmuOrder::Descending, EmuOrder::Random(5)] {
        dev.set_emu_order(order, EmuOrder::Ascending);
        let out = Tensor::<u32>::zeros(&dev, &[5 * blocks]).unwrap();
        let args = OutModeArgs { out: out.ptr(), mode: 1, _pad0: 0 };
        let l =
            Launch::new(selftest("emu_selftest_smem_poison"), [blocks as u32, 1, 1], [32, 1, 1], 16, &args);
        assert_eq!(launch(&dev, &l), None);
        let v = out.to_host(&dev).unwrap();
        assert!(
            v.iter().all(|&w| w == POISON),
            "{order:?}: a block saw shared memory another block wrote: {v:x?}"
        );
    }
}

#[test]
fn syncthreads_from_two_call_sites_is_an_error() {
    let Some(dev) = emulated() else { return };
    let out = Tensor::<u32>::zeros(&dev, &[64]).unwrap();
    let one = OutModeArgs { out: out.ptr(), mode: 0, _pad0: 0 };
    let l = Launch::new(selftest("emu_selftest_sync_sites"), [1, 1, 1], [64, 1, 1], 0, &one);
    assert_eq!(launch(&dev, &l), None);
    assert_eq!(out.to_host(&dev).unwrap(), (1..=64).collect::<Vec<u32>>());
    let two = OutModeArgs { mode: 1, ..one };
    expect_err(
        &dev,
        &Launch::new(selftest("emu_selftest_sync_sites"), [1, 1, 1], [64, 1, 1], 0, &two),
        &["__syncthreads() reached from two call sites", "selftest.cu:"],
    );
}

#[test]
fn warp_collective_misuse_is_an_error_not_an_abort() {
    let Some(dev) = emulated() else { return };
    let out = Tensor::<u32>::zeros(&dev, &[128]).unwrap();
    let l = |mode| {
        Launch::new(
            selftest("emu_selftest_warp"),
            [1, 1, 1],
            [64, 1, 1],
            0,
            &OutModeArgs { out: out.ptr(), mode, _pad0: 0 },
        )
    };
    assert_eq!(launch(&dev, &l(0)), None);
    let v = out.to_host(&dev).unwrap();
    assert!(v[..64].iter().all(|&x| x == 496) && v[64..].iter().all(|&x| x == 3), "{v:?}");
    for (mode, word) in [
        (1, "only full-warp masks"),
        (2, "exited lanes"),
        (3, "different warp collectives"),
        (4, "deadlock"),
        (5, "not 16-byte aligned"),
        (6, "not in shared memory"),
    ] {
        expect_err(&dev, &l(mode), &[word]);
    }
    // After all those failures the next launch runs normally.
    assert_eq!(launch(&dev, &l(7)), None);
}

#[test]
fn blocks_and_threads_run_in_the_chosen_order() {
    let Some(dev) = emulated() else { return };
    let (g, n) = (7usize, 64u32);
    let run = |blocks: EmuOrder, threads: EmuOrder| -> (Vec<u32>, Vec<u32>) {
        dev.set_emu_order(blocks, threads);
        let seq = Tensor::<u32>::zeros(&dev, &[g]).unwrap();
        let last = Tensor::<u32>::zeros(&dev, &[g]).unwrap();
        let counter = Tensor::<u32>::zeros(&dev, &[1]).unwrap();
        let args = OrderArgs { block_seq: seq.ptr(), last_writer: last.ptr(), counter: counter.ptr() };
        let l = Launch::new(selftest("emu_selftest_order"), [g as u32, 1, 1], [n, 1, 1], 0, &args);
        assert_eq!(launch(&dev, &l), None);
        (seq.to_host(&dev).unwrap(), last.to_host(&dev).unwrap())
    };
    let (asc, last_asc) = run(EmuOrder::Ascending, EmuOrder::Ascending);
    assert_eq!(asc, (0..g as u32).collect::<Vec<_>>());
    assert!(last_asc.iter().all(|&t| t == n - 1));
    let (desc, last_desc) = run(EmuOrder::Descending, EmuOrder::Descending);
    assert_eq!(desc, (0..g as u32).rev().collect::<Vec<_>>());
    assert!(last_desc.iter().all(|&t| t == 0));
    let (r1, _) = run(EmuOrder::Random(11), EmuOrder::Random(11));
    let (r2, _) = run(EmuOrder::Random(11), EmuOrder::Random(11));
    let (r3, _) = run(EmuOrder::Random(12), EmuOrder::Random(12));
    let mut sorted = r1.clone();
    sorted.sort();
    assert_eq!(sorted, (0..g as u32).collect::<Vec<_>>(), "a permutation of the blocks");
    assert_eq!(r1, r2, "same seed, same order");
    assert_ne!(r1, r3, "another seed, another order");
    dev.set_emu_order(EmuOrder::Ascending, EmuOrder::Ascending);
}

#[test]
fn an_out_of_bounds_write_names_the_kernel_and_the_buffer() {
    let Some(dev) = emulated() else { return };
    let (rows, d) = (10usize, 5usize);
    let x = Tensor::<f32>::from_host(&dev, &vec![1.0; rows * d], &[rows, d]).unwrap();
    let inv = Tensor::<f32>::zeros(&dev, &[rows]).unwrap();
    // Right sizes: fine, and every norm is sqrt(5).
    let ok = Tensor::<f32>::zeros(&dev, &[rows]).unwrap();
    let l = row_norms_launch(DType::F32, rows, d, x.ptr(), ok.ptr(), inv.ptr());
    assert_eq!(launch(&dev, &l), None);
    assert!(ok.to_host(&dev).unwrap().iter().all(|&v| v == 5f32.sqrt()));
    // One element short: the kernel writes norm[9] past the end.
    let short = Tensor::<f32>::zeros(&dev, &[rows - 1]).unwrap();
    let line = line!() - 1;
    let l = row_norms_launch(DType::F32, rows, d, x.ptr(), short.ptr(), inv.ptr());
    let msg = launch(&dev, &l).expect("the overrun is caught");
    assert!(msg.contains("row_norms_fwd_f32"), "{msg}");
    assert!(msg.contains("past the end"), "{msg}");
    assert!(msg.contains("[9] f32"), "{msg}");
    assert!(msg.contains(&format!("tests/emulator.rs:{line}")), "{msg} (allocated at line {line})");
}

#[test]
fn uninitialized_buffers_read_as_nan() {
    let Some(dev) = emulated() else { return };
    // SAFETY: read back on purpose: on the emulated device it holds 0xFF bytes.
    let t = unsafe { Tensor::<f32>::uninit(&dev, &[4]) }.unwrap();
    assert!(t.to_host(&dev).unwrap().iter().all(|v| v.is_nan() && v.to_bits() == POISON));
}

#[test]
fn launches_outside_the_limits_are_refused() {
    let Some(dev) = emulated() else { return };
    let x = Tensor::<f32>::zeros(&dev, &[8, 8]).unwrap();
    let inv = Tensor::<f32>::zeros(&dev, &[8]).unwrap();
    let args = RowNormsArgs { x: x.ptr(), norm: DevPtr::NULL, inv: inv.ptr(), rows: 8, d: 8 };
    let refused = |l: Launch, word: &str| {
        // SAFETY: refused before anything runs (checked by the assertion).
        match unsafe { dev.launch(&l) } {
            Err(Error::Launch { message, .. }) => assert!(message.contains(word), "{message}"),
            other => panic!("{}: expected a refused launch ({word}), got {other:?}", l.kernel.name),
        }
    };
    // __launch_bounds__(256): 512 threads refused, 256 fine.
    refused(Launch::new(norms::ROW_NORMS_FWD_F32, [1, 1, 1], [512, 1, 1], 0, &args), "__launch_bounds__");
    assert_eq!(launch(&dev, &Launch::new(norms::ROW_NORMS_FWD_F32, [1, 1, 1], [256, 1, 1], 0, &args)), None);
    refused(Launch::new(norms::ROW_NORMS_FWD_F32, [1, 70_000, 1], [256, 1, 1], 0, &args), "grid");
    refused(Launch::new(norms::ROW_NORMS_FWD_F32, [0, 1, 1], [256, 1, 1], 0, &args), "grid");
    refused(Launch::new(norms::ROW_NORMS_FWD_F32, [1, 1, 1], [256, 1, 1], 300_000, &args), "shared memory");
    // Another kernel's argument struct of the same size (32 bytes) is refused by name.
    let other = BiasActFwdArgs { y: inv.ptr(), bias: inv.ptr(), n: 8, cols: 8, act: 0 };
    assert_eq!(std::mem::size_of_val(&other), std::mem::size_of_val(&args));
    refused(Launch::new(norms::ROW_NORMS_FWD_F32, [1, 1, 1], [256, 1, 1], 0, &other), "RowNormsArgs");
}

#[test]
fn register_and_shared_memory_limits_follow_the_ptxas_table() {
    let res = |registers: u32, shared_bytes: u32| KernelResources {
        module: "head_fused",
        kernel: "fused_bwd_c128_bf16",
        arch: 90,
        registers,
        spill_stores: 0,
        spill_loads: 0,
        stack_bytes: 0,
        shared_bytes,
        hot: true,
    };
    let args = featcloud::cuda::args::FusedBwdArgs::default();
    let l = Launch::new(head_fused::FUSED_BWD_C128_BF16, [1, 1, 1], [256, 1, 1], 65_536, &args);
    // 256 threads x 256 registers = the whole register file: fits; 257 rounds up to 264.
    assert!(check_launch_limits(&l, 232_448, Some(&res(256, 0))).is_ok());
    assert!(check_launch_limits(&l, 232_448, Some(&res(250, 0))).is_ok());
    let err = check_launch_limits(&l, 232_448, Some(&res(257, 0))).unwrap_err().to_string();
    assert!(err.contains("register file"), "{err}");
    // Static + dynamic shared memory against the opt-in limit.
    assert!(check_launch_limits(&l, 232_448, Some(&res(128, 166_912))).is_ok());
    let err = check_launch_limits(&l, 232_448, Some(&res(128, 166_913))).unwrap_err().to_string();
    assert!(err.contains("shared memory"), "{err}");
}

selftest_args!(CvtArgs mirrors "EmuSelftestCvtArgs", 32 bytes { x: DevPtr, h: DevPtr, back: DevPtr, n: i32, _pad0: i32 });

#[test]
fn dtype_conversions_round_like_the_half_crate() {
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};
    let Some(dev) = emulated() else { return };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    // Zeros, the f16 overflow boundary (65504 max, 65520 rounds to inf), f16 subnormals and
    // their flush, specials, exact ties of f16 (1 + k/1024 + 1/2048) and of bf16, then random
    // bit patterns and random magnitudes.
    let mut x: Vec<f32> =
        vec![0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e-8, 2.98e-8, 2.99e-8, 6.1e-5, -6.0e-5];
    x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, f32::MIN_POSITIVE, 1e-45]);
    x.extend((0..16).map(|k| 1.0 + k as f32 / 1024.0 + 1.0 / 2048.0));
    x.extend((0..16).map(|k| f32::from_bits(0x3f80_0000 + (k << 16) + 0x8000)));
    x.extend((0..2000).map(|_| f32::from_bits(rng.random::<u32>())));
    x.extend((0..2000).map(|_| (rng.random::<f32>() - 0.5) * 2f32.powi(rng.random_range(-30..20))));
    let n = x.len();
    let xs = Tensor::<f32>::from_host(&dev, &x, &[n]).unwrap();
    let h = Tensor::<u16>::zeros(&dev, &[2 * n]).unwrap();
    let back = Tensor::<f32>::zeros(&dev, &[2 * n]).unwrap();
    let args = CvtArgs { x: xs.ptr(), h: h.ptr(), back: back.ptr(), n: n as i32, _pad0: 0 };
    let l = Launch::linear(selftest("emu_selftest_cvt"), n.div_ceil(256), 256, &args);
    assert_eq!(launch(&dev, &l), None);
    let (h, y) = (h.to_host(&dev).unwrap(), back.to_host(&dev).unwrap());
    for (i, &v) in x.iter().enumerate() {
        let (wf, wb) = (f16::from_f32(v), bf16::from_f32(v));
        if v.is_nan() {
            assert!(f16::from_bits(h[i]).is_nan() && bf16::from_bits(h[n + i]).is_nan());
            assert!(y[i].is_nan() && y[n + i].is_nan());
            continue;
        }
        assert_eq!(h[i], wf.to_bits(), "f16 of {v:e} ({:#010x})", v.to_bits());
        assert_eq!(h[n + i], wb.to_bits(), "bf16 of {v:e} ({:#010x})", v.to_bits());
        assert_eq!(y[i].to_bits(), wf.to_f32().to_bits(), "f16 -> f32 of {v:e}");
        assert_eq!(y[n + i].to_bits(), wb.to_f32().to_bits(), "bf16 -> f32 of {v:e}");
    }
}
