//! A roofline model of today's CUDA head paths (fused and reference), per kernel of one
//! forward+backward at a [`HeadShape`], for a [`DeviceModel`] (H200 defaults). Everything
//! it returns is a prediction, never a measurement; `docs/PERF.md` explains each formula
//! and `featcloud bench --model` prints the table. Runs without a GPU: the launches come
//! from the dispatcher's own planning code (`head/plan.rs`), the registers and static
//! shared memory from the ptxas table [`RESOURCES`].
//!
//! The fused path has two kernel sets, and [`fused`] models the one the dispatcher runs
//! ([`fused_kernels`]): the attention form ([`attention`], `kernels/head_attn.cu`) for
//! D <= 512 where the shared memory allows, else the tiles ([`tiles`],
//! `kernels/head_fused.cu`).
//!
//! Per kernel: FLOPs (matrix products only: mma tiles as the kernel pads them, or 2*M*N*K
//! for a cuBLAS GEMM; elementwise arithmetic is not counted, those kernels are bound by
//! memory, latency or launch), L2 bytes (every global load and store: all of them pass
//! through L2), HBM bytes (the part that misses L2 by the rules in [`tiles`]), CTAs,
//! CTAs per SM, waves. Then
//!   compute = FLOPs / rate, hbm = HBM bytes / HBM bandwidth, l2 = L2 bytes / L2 bandwidth,
//!   latency = (grid of at most one CTA per SM only) the busiest CTA's share of the work
//!             at one SM's share of the chip = max(compute, hbm, l2) * SMs * busiest share,
//!   predicted = max(compute, hbm, l2, latency) + launch overhead.

use crate::cuda::args::{
    AttnBwdArgs, AttnCombineArgs, AttnFwdArgs, FusedBwdArgs, FusedCombineArgs, FusedFwdArgs, HeadReduceArgs,
    NormbackArgs, RefGradArgs, RefMarginArgs, RefNormalizeArgs, RefSoftmaxArgs,
};
use crate::cuda::head::{plan, FusedKernels};
use crate::cuda::kernels::{KernelResources, RESOURCES};
use crate::cuda::{norms, DevPtr, Launch};
use crate::{DType, HeadShape};
use serde::Serialize;

/// The device the model predicts for. [`DeviceModel::h200`] (also `Default`) holds one
/// H200 SXM; each field says where its value comes from, and which are assumptions that
/// `featcloud bench` on the GPU should confirm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DeviceModel {
    /// Streaming multiprocessors. H200 SXM: 132 (NVIDIA H200 datasheet; `featcloud info` reports it).
    pub sms: usize,
    /// Achievable HBM bandwidth, TB/s. H200: 4.8 TB/s peak (datasheet); 4.2 (~87%) is what a
    /// streaming copy reaches on HBM3 parts (assumption, to be measured).
    pub hbm_tbs: f64,
    /// L2 bandwidth, TB/s. 5.5: Chips and Cheese's measurement on an H100 PCIe (114 SMs,
    /// "Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023); the H200's 132 SMs at a
    /// higher clock likely do better (assumption, to be measured).
    pub l2_tbs: f64,
    /// L2 capacity, bytes. H200: 50 MiB (`cudaDevAttrL2CacheSize` on H100/H200).
    pub l2_bytes: f64,
    /// bf16 dense tensor-core peak, TFLOP/s: ~790 measured by cuBLAS 8192^3 on an H200 (SPEC 9).
    pub bf16_peak_tflops: f64,
    /// Fraction of [`Self::bf16_peak_tflops`] the fused kernels' mma.sync tiles reach: 0.62
    /// (assumption: mma.sync without wgmma/TMA is commonly quoted at 60-65% of Hopper's
    /// peak; to be measured).
    pub mma_efficiency: f64,
    /// FP32 (non-tensor) peak, TFLOP/s: 132 SMs x 128 FP32 lanes x 2 x 1.98 GHz = 66.9
    /// (H100/H200 SXM datasheet: 67).
    pub f32_peak_tflops: f64,
    /// Fraction of [`Self::f32_peak_tflops`] the fused f32 (exact SIMT) tiles reach: 0.5 (assumption).
    pub simt_efficiency: f64,
    /// Fraction of [`Self::f32_peak_tflops`] cuBLAS FP32 GEMMs (the reference path, no TF32)
    /// reach: 0.75 (assumption; `featcloud bench` prints the measured f32 peak).
    pub cublas_f32_efficiency: f64,
    /// Host + device overhead of one kernel launch on a busy stream, microseconds: 4 (assumption).
    pub launch_us: f64,
    /// Shared memory per SM usable by CTAs, bytes: 228 KiB (CUDA C programming guide, cc 9.0).
    pub smem_per_sm: u32,
    /// Shared memory one block may use after opting in (static + dynamic), bytes: 227 KiB =
    /// 232,448 (CUDA C programming guide, cc 9.0; `cudaDevAttrMaxSharedMemoryPerBlockOptin`,
    /// which `featcloud info` reads on the device). The dispatcher runs the attention-form
    /// kernels only where they fit ([`plan::attn_supported`]).
    pub max_smem_per_block: u32,
    /// Shared memory the system reserves per CTA, bytes: 1 KiB (CUDA C programming guide, cc 8.0+).
    pub smem_reserved_per_cta: u32,
    /// 32-bit registers per SM: 65,536 (cc 9.0).
    pub regs_per_sm: u32,
    /// Register allocation unit per warp, registers: 256 (cc 9.0, CUDA occupancy calculator).
    pub reg_alloc_unit: u32,
    /// Resident threads per SM: 2,048 (cc 9.0).
    pub max_threads_per_sm: u32,
    /// Resident CTAs per SM: 32 (cc 9.0).
    pub max_ctas_per_sm: u32,
    /// The arch whose ptxas table gives registers: 90 (sm_90).
    pub arch: u32,
}

impl DeviceModel {
    /// One H200 SXM (the SPEC 9 machine).
    pub const fn h200() -> Self {
        Self {
            sms: 132,
            hbm_tbs: 4.2,
            l2_tbs: 5.5,
            l2_bytes: (50u64 << 20) as f64,
            bf16_peak_tflops: 790.0,
            mma_efficiency: 0.62,
            f32_peak_tflops: 66.9,
            simt_efficiency: 0.5,
            cublas_f32_efficiency: 0.75,
            launch_us: 4.0,
            smem_per_sm: 228 << 10,
            max_smem_per_block: 232_448,
            smem_reserved_per_cta: 1 << 10,
            regs_per_sm: 65_536,
            reg_alloc_unit: 256,
            max_threads_per_sm: 2048,
            max_ctas_per_sm: 32,
            arch: 90,
        }
    }

    /// TFLOP/s of the fused kernels' tiles (both sets) for `dtype`: mma.sync for 16-bit
    /// storage, SIMT FMAs for f32.
    pub fn tile_tflops(&self, dtype: DType) -> f64 {
        match dtype {
            DType::F32 => self.f32_peak_tflops * self.simt_efficiency,
            DType::BF16 | DType::F16 => self.bf16_peak_tflops * self.mma_efficiency,
        }
    }

    /// TFLOP/s of the reference path's cuBLAS FP32 GEMMs.
    pub fn cublas_f32_tflops(&self) -> f64 {
        self.f32_peak_tflops * self.cublas_f32_efficiency
    }

    /// CTAs of `threads` threads, `regs` registers each and `smem` bytes of shared memory
    /// (static + dynamic) that fit on one SM at once: the least of the register, shared
    /// memory, thread and CTA limits.
    pub fn ctas_per_sm(&self, threads: u32, regs: u32, smem: u32) -> u32 {
        let warps = threads.div_ceil(32).max(1);
        let per_warp = (regs.max(1) * 32).div_ceil(self.reg_alloc_unit) * self.reg_alloc_unit;
        let by_regs = self.regs_per_sm / (per_warp * warps);
        let by_smem = self.smem_per_sm / (smem + self.smem_reserved_per_cta);
        let by_threads = self.max_threads_per_sm / (warps * 32);
        by_regs.min(by_smem).min(by_threads).min(self.max_ctas_per_sm)
    }
}

impl Default for DeviceModel {
    fn default() -> Self {
        Self::h200()
    }
}

/// What limits a kernel's predicted time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Bound {
    /// Matrix-product throughput (tensor cores, SIMT FMAs or cuBLAS).
    Compute,
    /// HBM bandwidth.
    Memory,
    /// L2 bandwidth (data reused from L2 still has to move through it).
    L2,
    /// Too few CTAs: the grid under-fills the SMs and the busiest CTA sets the time.
    Latency,
    /// The launch overhead exceeds everything else.
    Launch,
}

impl Bound {
    /// Short lower-case name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Bound::Compute => "compute",
            Bound::Memory => "memory",
            Bound::L2 => "l2",
            Bound::Latency => "latency",
            Bound::Launch => "launch",
        }
    }
}

/// The prediction for one kernel launch (or one cuBLAS GEMM).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelModel {
    /// Entry point, or `cublas_sgemm (what)` for a reference GEMM.
    pub name: String,
    /// What it computes and moves.
    pub traffic: Traffic,
    /// Its grid and occupancy (`None` for cuBLAS, whose tiling is not modelled).
    pub grid: Option<GridModel>,
    /// The roofline terms and the prediction.
    pub time: TimeModel,
}

/// A kernel's work and global-memory traffic.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Traffic {
    /// Matrix-product FLOPs as executed (padded tiles included).
    pub flops: f64,
    /// Bytes that miss L2 and move to or from HBM.
    pub hbm_bytes: f64,
    /// Every byte loaded or stored (all global traffic passes through L2).
    pub l2_bytes: f64,
}

/// A kernel's grid against the SMs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GridModel {
    /// CTAs in the grid.
    pub ctas: u64,
    /// CTAs resident per SM (from ptxas registers, shared memory, threads).
    pub ctas_per_sm: u32,
    /// ceil(CTAs / (SMs x CTAs per SM)).
    pub waves: u64,
    /// Registers per thread from the ptxas table (`None`: the crate was built without
    /// NVRTC, and the occupancy assumes 255, the per-thread maximum).
    pub registers: Option<u32>,
}

/// A kernel's roofline: the bodies' terms, the launch, the bound and the prediction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimeModel {
    /// The terms whose maximum is the kernel's body.
    pub terms: Terms,
    /// Launch overhead, ms.
    pub launch_ms: f64,
    /// The largest term.
    pub bound: Bound,
    /// max(compute, hbm, l2, latency) + launch, ms.
    pub predicted_ms: f64,
}

/// The roofline terms of a kernel's body, ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Terms {
    /// FLOPs / rate.
    pub compute_ms: f64,
    /// HBM bytes / HBM bandwidth.
    pub hbm_ms: f64,
    /// L2 bytes / L2 bandwidth.
    pub l2_ms: f64,
    /// The under-filled grid's time (0 when the grid has more CTAs than SMs).
    pub latency_ms: f64,
}

impl Terms {
    /// The body's time: the largest term.
    pub fn body_ms(&self) -> f64 {
        self.compute_ms.max(self.hbm_ms).max(self.l2_ms).max(self.latency_ms)
    }
}

/// The prediction for one path's forward+backward.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathModel {
    /// "fused" or "reference".
    pub path: &'static str,
    /// The fused path's kernel set ("attention" or "tiles" in JSON); `None` for the reference.
    pub kernel_set: Option<FusedKernels>,
    /// Every launch, in stream order.
    pub kernels: Vec<KernelModel>,
}

impl PathModel {
    /// Sum of the kernels' predictions (they run one after another on one stream), ms.
    pub fn total_ms(&self) -> f64 {
        self.kernels.iter().map(|k| k.time.predicted_ms).sum()
    }

    /// Sum of the kernels' FLOPs.
    pub fn flops(&self) -> f64 {
        self.kernels.iter().map(|k| k.traffic.flops).sum()
    }

    /// Sum of the kernels' HBM bytes.
    pub fn hbm_bytes(&self) -> f64 {
        self.kernels.iter().map(|k| k.traffic.hbm_bytes).sum()
    }
}

/// 6*B*C*D: the FLOPs of the three B x C x D products of a forward+backward (SPEC 9's
/// "cuBLAS 3 GEMMs").
pub fn three_gemm_flops(shape: HeadShape) -> f64 {
    6.0 * shape.b as f64 * shape.c as f64 * shape.d as f64
}

/// SPEC 9's tensor-core limit 6*B*C*D / peak (bf16 peak of `dev`), ms.
pub fn tensor_limit_ms(shape: HeadShape, dev: &DeviceModel) -> f64 {
    three_gemm_flops(shape) / (dev.bf16_peak_tflops * 1e12) * 1e3
}

/// The ptxas entry of `kernel` for `arch`, if the build recorded one.
pub fn resources(kernel: &str, arch: u32) -> Option<&'static KernelResources> {
    RESOURCES.iter().find(|r| r.kernel == kernel && r.arch == arch)
}

/// Work of one kernel before the device turns it into times.
struct Work {
    flops: f64,
    tflops: f64,
    hbm: f64,
    l2: f64,
    /// Fraction of the work the busiest CTA does (1 / CTAs when all do the same).
    busiest: f64,
}

fn ms(amount: f64, per_s: f64) -> f64 {
    if amount == 0.0 {
        0.0
    } else {
        amount / per_s * 1e3
    }
}

/// The grid of `l` on `dev`: CTAs, CTAs per SM (registers and static shared memory from the
/// ptxas table, plus the launch's dynamic shared memory), waves.
fn grid_model(dev: &DeviceModel, l: &Launch) -> GridModel {
    let n = l.grid.iter().map(|&g| g as u64).product::<u64>();
    let threads = l.block.iter().product::<u32>();
    let res = resources(l.kernel.name, dev.arch);
    // Without the ptxas table: 255 registers, the per-thread maximum (lowest occupancy).
    let r = res.map_or(255, |r| r.registers);
    let smem = res.map_or(0, |r| r.shared_bytes) + l.smem;
    let k = dev.ctas_per_sm(threads, r, smem).max(1);
    GridModel {
        ctas: n,
        ctas_per_sm: k,
        waves: n.div_ceil(dev.sms as u64 * k as u64),
        registers: res.map(|r| r.registers),
    }
}

/// L2 capacity left for a kernel's re-read sets (rule 2 of [`tiles`]): sets are offered in
/// order of reuse distance, shortest first, and each one that fits takes its share.
struct L2Left(f64);

impl L2Left {
    fn new(dev: &DeviceModel) -> Self {
        Self(dev.l2_bytes)
    }

    /// Whether a set of `size` bytes fits in what is left (and if so, takes it).
    fn fits(&mut self, size: f64) -> bool {
        let ok = self.holds(size);
        if ok {
            self.0 -= size;
        }
        ok
    }

    /// Whether a set of `size` bytes fits in what is left (without taking it).
    fn holds(&self, size: f64) -> bool {
        size <= self.0
    }
}

/// Turns `w` into a [`KernelModel`]; `launch` gives grid, block and dynamic shared
/// memory (`None`: a cuBLAS GEMM with name `name`).
fn model(dev: &DeviceModel, name: String, launch: Option<&Launch>, w: Work) -> KernelModel {
    let compute_ms = ms(w.flops, w.tflops * 1e12);
    let hbm_ms = ms(w.hbm, dev.hbm_tbs * 1e12);
    let l2_ms = ms(w.l2, dev.l2_tbs * 1e12);
    let roof = compute_ms.max(hbm_ms).max(l2_ms);
    let grid = launch.map(|l| grid_model(dev, l));
    let latency_ms = match grid {
        Some(g) if g.ctas < dev.sms as u64 => roof * dev.sms as f64 * w.busiest,
        _ => 0.0,
    };
    let launch_ms = dev.launch_us * 1e-3;
    let body = roof.max(latency_ms);
    let bound = if launch_ms > body {
        Bound::Launch
    } else if latency_ms > roof {
        Bound::Latency
    } else if compute_ms >= hbm_ms && compute_ms >= l2_ms {
        Bound::Compute
    } else if hbm_ms >= l2_ms {
        Bound::Memory
    } else {
        Bound::L2
    };
    KernelModel {
        name,
        traffic: Traffic { flops: w.flops, hbm_bytes: w.hbm, l2_bytes: w.l2 },
        grid,
        time: TimeModel {
            terms: Terms { compute_ms, hbm_ms, l2_ms, latency_ms },
            launch_ms,
            bound,
            predicted_ms: body + launch_ms,
        },
    }
}

fn launch_model(dev: &DeviceModel, l: &Launch, w: Work) -> KernelModel {
    model(dev, l.kernel.name.to_string(), Some(l), w)
}

/// A memory-only kernel whose busiest CTA does the fraction `busiest` of the work.
fn mem_work(hbm: f64, l2: f64, busiest: f64) -> Work {
    Work { flops: 0.0, tflops: 1.0, hbm, l2, busiest }
}

/// The busiest CTA's share when `rows` rows go `per_cta` to a CTA (the last CTA may hold fewer).
fn rows_share(rows: usize, per_cta: usize) -> f64 {
    per_cta.min(rows) as f64 / rows.max(1) as f64
}

/// Rows per CTA of the one-warp-per-row kernels (8 warps of 256 threads).
const WARP_ROWS: usize = 8;

/// `row_norms_fwd_*` over `rows` x `d` (reads v, writes the inverse norms).
fn row_norms(dev: &DeviceModel, dtype: DType, rows: usize, d: usize) -> KernelModel {
    let l = norms::row_norms_launch(dtype, rows, d, DevPtr::NULL, DevPtr::NULL, DevPtr::NULL);
    let bytes = (rows * d * dtype.size() + rows * 4) as f64;
    launch_model(dev, &l, mem_work(bytes, bytes, rows_share(rows, WARP_ROWS)))
}

/// `head_normback_bwd_*`: sums `nparts` f32 partials [rows, d], reads v and the inverse
/// norms, writes the gradient (16-bit for 16-bit storage: `GradDtype::Input`). `parts_in_l2`:
/// the partials were just written by the previous kernel and fit in L2.
fn normback(
    dev: &DeviceModel,
    dtype: DType,
    rows: usize,
    d: usize,
    nparts: usize,
    parts_in_l2: bool,
) -> KernelModel {
    let l = plan::normback(dtype, dtype == DType::F32, rows, d, nparts, NormbackArgs::default());
    let e = dtype.size() as f64;
    let (rows_f, d_f) = (rows as f64, d as f64);
    let parts = nparts as f64 * rows_f * d_f * 4.0;
    let rest = rows_f * d_f * e + rows_f * 4.0 + rows_f * d_f * e;
    let hbm = rest + if parts_in_l2 { 0.0 } else { parts };
    launch_model(dev, &l, mem_work(hbm, parts + rest, rows_share(rows, WARP_ROWS)))
}

/// `head_reduce_fwd_f32`: one CTA sums B row losses.
fn head_reduce(dev: &DeviceModel, b: usize) -> KernelModel {
    let l = plan::head_reduce(b, HeadReduceArgs::default());
    let bytes = (b * 4 + 4) as f64;
    launch_model(dev, &l, mem_work(bytes, bytes, 1.0))
}

/// The fused path's kernel set at `shape` for storage `dtype` on `dev`, as the dispatcher
/// picks it without tuning (`HeadOn::fused_kernels`): the attention form where
/// [`plan::attn_supported`] holds for `dev.max_smem_per_block`, else the tiles.
pub fn fused_kernels(shape: HeadShape, dtype: DType, dev: &DeviceModel) -> FusedKernels {
    if plan::attn_supported(dtype, shape.d, dev.max_smem_per_block) {
        FusedKernels::Attention
    } else {
        FusedKernels::Tiles
    }
}

/// The fused path's launches of one `forward_backward`, as the dispatcher runs them: the
/// kernel set of [`fused_kernels`], modelled by [`attention`] or [`tiles`]. This is what
/// `featcloud bench` prints next to the fused path's measured time.
pub fn fused(shape: HeadShape, dtype: DType, dev: &DeviceModel) -> PathModel {
    match fused_kernels(shape, dtype, dev) {
        FusedKernels::Attention => {
            attention(shape, dtype, dev).expect("fused_kernels checked attn_supported")
        }
        FusedKernels::Tiles => tiles(shape, dtype, dev),
    }
}

/// The fused path's tiles kernels (`kernels/head_fused.cu`, `head/fused.rs`) of one
/// `forward_backward` (gradients in the storage dtype), as the dispatcher plans them on
/// `dev.sms` SMs; the fused path runs them where the attention form does not apply
/// ([`fused_kernels`]). Every dtype and D.
///
/// L2 rules (what is counted as HBM traffic):
/// - a kernel's inputs come from HBM on first touch (a kernel does not inherit the
///   previous kernel's L2, except scratch that the previous kernel wrote and that fits
///   in L2: part -> combine, dx / dW partials -> normback);
/// - data a kernel re-reads comes from L2 when its live set fits in the L2 capacity,
///   filled greedily from the shortest reuse distance; a set that does not fit entirely
///   is re-read from HBM every time (a cyclic pattern larger than an LRU cache misses);
/// - every store reaches HBM once (write-back), re-stores to resident lines do not.
pub fn tiles(shape: HeadShape, dtype: DType, dev: &DeviceModel) -> PathModel {
    let HeadShape { b, c, d } = shape;
    let (bf, cf, df, e) = (b as f64, c as f64, d as f64, dtype.size() as f64);
    let vec = plan::fused_vectorized(dtype, d);
    let f32 = dtype == DType::F32;
    let (bk, bd) = if f32 { (16, 32) } else { (32, 64) };
    let dk = d.div_ceil(bk) * bk;
    let dbd = d.div_ceil(bd) * bd;
    let rate = dev.tile_tflops(dtype);
    let mut kernels = vec![row_norms(dev, dtype, b, d), row_norms(dev, dtype, c, d)];

    // Forward tiles: grid (class tiles, row tiles), class tiles fastest, so one pass over
    // the row tiles streams all of W; W is re-read per row tile unless it fits in L2.
    let (bm, bn) = plan::forward_tile_for(shape, dev.sms);
    let (n_ct, n_rt) = (c.div_ceil(bn), b.div_ceil(bm));
    let l = plan::fused_fwd(dtype, shape, (bm, bn), vec, FusedFwdArgs::default())
        .expect("forward_tile_for returns one of FORWARD_TILES");
    let flops = 2.0 * (n_rt * bm) as f64 * (n_ct * bn) as f64 * dk as f64;
    let (nct, nrt) = (n_ct as f64, n_rt as f64);
    let w_bytes = cf * df * e;
    let w_passes = if w_bytes + cf * 4.0 <= dev.l2_bytes { 1.0 } else { nrt };
    let part = 3.0 * nct * bf * 4.0;
    let outs = 4.0 * bf * 4.0;
    // x tile by every class tile, W (+ inv_w) by every row tile, inv_x and labels per CTA,
    // the target rows' x and W for the f64 c_iy, the partials and per-row outputs.
    let l2 = nct * bf * df * e
        + nrt * cf * (df * e + 4.0)
        + 2.0 * nct * bf * 4.0
        + 2.0 * bf * df * e
        + part
        + outs;
    let hbm = bf * df * e + w_passes * cf * (df * e + 4.0) + 2.0 * bf * 4.0 + bf * df * e + part + outs;
    // Every tile does the same (padded) work.
    let busiest = 1.0 / (n_ct * n_rt) as f64;
    kernels.push(launch_model(dev, &l, Work { flops, tflops: rate, hbm, l2, busiest }));

    let lc = plan::fused_combine(b, n_ct, FusedCombineArgs::default());
    let rows_io = 2.0 * bf * 4.0 + 2.0 * bf * 4.0;
    let part_hbm = if part <= dev.l2_bytes { 0.0 } else { part };
    kernels.push(launch_model(
        dev,
        &lc,
        mem_work(part_hbm + rows_io, part + rows_io, rows_share(b, WARP_ROWS)),
    ));
    kernels.push(head_reduce(dev, b));

    // Backward: CTA (g, s) takes class tiles g, g + G, ... and of each the row tiles
    // s, s + S, ...; per (row tile, class tile) pair it recomputes the cosine tile (64 x
    // cols x D), then dxp[g] (+)= dC . W (64 x D, K = cols) and acc (+)= dC^T . x (cols x
    // D, K = 64), both f32 read-modify-writes.
    let cols = plan::backward_cols_for(shape, dev.sms);
    let (g, s) = plan::backward_grid_for(shape, dev.sms);
    let (n_ct, n_rt) = (c.div_ceil(cols), b.div_ceil(64));
    let (nct, nrt, gf, sf, colsf) = (n_ct as f64, n_rt as f64, g as f64, s as f64, cols as f64);
    let lb = plan::fused_bwd(dtype, shape, (cols, g, s), vec, FusedBwdArgs::default())
        .expect("backward_cols_for returns 64 or 128");
    let pairs = nct * nrt;
    let flops = pairs * (2.0 * 64.0 * colsf * dk as f64 + 2.0 * 2.0 * 64.0 * colsf * dbd as f64);
    let dw32 = f32;
    // Live sets, shortest reuse distance first: each CTA's class tile (its W rows and its
    // f32 dW accumulator, reused every row tile), then x (reused every class tile), then
    // the dx partials (each CTA's B x D slice, reused once per class tile it owns).
    let acc_live = gf * sf * colsf * df * (4.0 + e);
    let x_bytes = bf * df * e;
    let dxp_live = gf * bf * df * 4.0;
    let mut left = L2Left::new(dev);
    let (acc_fit, x_fit, dxp_fit) = (left.fits(acc_live), left.fits(x_bytes), left.fits(dxp_live));
    let x_loads = 2.0 * nct * x_bytes;
    let w_loads = 2.0 * nrt * cf * df * e;
    let rows_in = nct * bf * 5.0 * 4.0 + nrt * cf * 4.0;
    let dxp_w = nct * bf * df * 4.0;
    let dxp_r = (nct - gf).max(0.0) * bf * df * 4.0;
    let acc_w = nrt * cf * df * 4.0;
    let acc_r = (nrt - sf).max(0.0) * cf * df * 4.0;
    // S = 1 finishes dW in the kernel: reads the accumulator, W twice, writes dW.
    let finish_l2 = if s == 1 {
        cf * df * 4.0 + 2.0 * cf * df * e + cf * 4.0 + cf * df * if dw32 { 4.0 } else { e }
    } else {
        0.0
    };
    let l2 = x_loads + w_loads + rows_in + dxp_w + dxp_r + acc_w + acc_r + finish_l2;
    let x_hbm = if x_fit { x_bytes } else { (nct / gf).ceil() * x_bytes };
    let w_hbm = if acc_fit { cf * df * e } else { w_loads + if s == 1 { 2.0 * cf * df * e } else { 0.0 } };
    let acc_region = if s > 1 {
        sf * cf * df * 4.0
    } else if dw32 {
        cf * df * 4.0
    } else {
        gf * colsf * df * 4.0
    };
    let acc_hbm = if acc_fit { acc_region } else { acc_w + acc_r + if s == 1 { cf * df * 4.0 } else { 0.0 } };
    let dxp_hbm = if dxp_fit { dxp_live } else { dxp_w + dxp_r };
    let dw_out = if s == 1 && !dw32 { cf * df * e } else { 0.0 };
    let hbm = x_hbm + w_hbm + bf * 5.0 * 4.0 + cf * 4.0 + acc_hbm + dxp_hbm + dw_out;
    let busiest = (nct / gf).ceil() * (nrt / sf).ceil() / pairs;
    kernels.push(launch_model(dev, &lb, Work { flops, tflops: rate, hbm, l2, busiest }));
    if s > 1 {
        kernels.push(normback(dev, dtype, c, d, s, sf * cf * df * 4.0 <= dev.l2_bytes));
    }
    // The dx partials come from the kernel just before only without row splits.
    kernels.push(normback(dev, dtype, b, d, g, s == 1 && dxp_fit));
    PathModel { path: "fused", kernel_set: Some(FusedKernels::Tiles), kernels }
}

/// The fused path's attention-form kernels (`kernels/head_attn.cu`, `head/attn.rs`) of one
/// `forward_backward` (gradients in the storage dtype, a scalar upstream, label smoothing
/// off, as `featcloud bench` runs it), or `None` where the dispatcher does not run them on
/// `dev` ([`plan::attn_supported`] with `dev.max_smem_per_block`: D <= 512, or D <= 2048 in
/// bf16, and the shared memory).
/// Three launches: `attn_fwd_*`, `attn_combine_fwd_*`, `attn_bwd_*` (which also reduces the
/// loss: `forward_backward` queues no `head_reduce_fwd_f32`).
///
/// Both tile kernels keep RM rows of one operand resident ([`plan::attn_rows`]: 64 in
/// bf16 and f16, 32 in f32, 16 at D > 512) and stream [`plan::ATTN_BT`]-row tiles of the other, each tile feeding
/// two products of 2 * RM * BT * DP FLOPs (DP = [`plan::attn_dp`], the padded D): the
/// forward S = x . W^T and O += P . W, the backward S^T = W . x^T and dW += E . x. So the
/// FLOPs are 4 * Bp * Cp * DP per pass, 8 B*C*D in all without padding. Same L2 rules as
/// [`tiles`]; the forward's CTAs of one class split run together (row tile fastest in the
/// grid) and share its W tiles through L2, except a split whose CTAs start in different
/// waves: its later wave re-reads its W from HBM unless all the W the earlier wave streams
/// fits in L2.
pub fn attention(shape: HeadShape, dtype: DType, dev: &DeviceModel) -> Option<PathModel> {
    attention_k(shape, 1, dtype, dev)
}

/// [`attention`] with `k` sub-centers per class (SPEC 5b): W has C*K rows, streamed in
/// class-aligned tiles of floor(BT / K) classes (K times that rows, the rest of a tile masked
/// but still multiplied) in the forward and resident tiles of floor(RM / K) classes in the
/// backward, so the FLOPs and W's bytes scale with K (a bit more where K divides neither BT
/// nor RM); the forward's target cosines read K W rows per row. `None` where the fused path
/// does not take K ([`crate::cuda::head::fused_takes_subcenters`]).
pub fn attention_k(shape: HeadShape, k: usize, dtype: DType, dev: &DeviceModel) -> Option<PathModel> {
    if !crate::cuda::head::fused_takes_subcenters(dtype, shape.d, k, dev.max_smem_per_block)
        || !plan::attn_supported(dtype, shape.d, dev.max_smem_per_block)
    {
        return None;
    }
    let HeadShape { b, c, d } = shape;
    let (bf, cf, df, e, kf) = (b as f64, c as f64, d as f64, dtype.size() as f64, k as f64);
    let vec = plan::fused_vectorized(dtype, d);
    let rate = dev.tile_tflops(dtype);
    let (rm, bt, dp) = (plan::attn_rows(dtype, plan::attn_dp(d)), plan::ATTN_BT, plan::attn_dp(d));
    // One streamed tile against the resident rows: two products of RM x BT x DP.
    let tile_flops = 4.0 * (rm * bt * dp) as f64;
    let (x_bytes, w_bytes) = (bf * df * e, kf * cf * df * e);
    let supported = "attn_supported checked the dtype and D";

    // Forward: grid (row tiles, class splits), row tile fastest. CTA (r, s) loads its x tile,
    // streams split s's W tiles, computes the target cosines of its rows whose label is in
    // split s (x and W rows from global), writes (m, l, sum z) and O [D] f32 per row.
    let (splits, per) = plan::attn_splits_k(dtype, shape, k);
    let lf = plan::attn_fwd(dtype, shape, k, (splits, per), vec, AttnFwdArgs::default()).expect(supported);
    let cpt = plan::attn_tile_classes(k);
    let (n_rt, n_ct) = (b.div_ceil(rm), c.div_ceil(cpt));
    let flops = tile_flops * (n_rt * n_ct) as f64;
    let sf = splits as f64;
    // x is re-read by every split (shortest reuse distance: the CTAs of one row tile start
    // together), W by the row tiles of its split.
    let mut left = L2Left::new(dev);
    let x_fit = left.fits(x_bytes);
    // CTAs start in grid order, `slots` at a time (one wave), and take equally long. A split
    // whose CTAs fall in waves w0..w1 reads its W once from HBM, then again in each later
    // wave unless the W that the previous wave streamed (all of its splits') fits in L2.
    let split_w = |s: usize| (c.min((s + 1) * per * cpt) - s * per * cpt) as f64 * kf * df * e;
    let slots = dev.sms * grid_model(dev, &lf).ctas_per_sm as usize;
    let last_cta = n_rt * splits - 1;
    let wave_w =
        |w: usize| (w * slots / n_rt..=last_cta.min((w + 1) * slots - 1) / n_rt).map(split_w).sum::<f64>();
    let w_hbm = (0..splits)
        .map(|s| {
            let (w0, w1) = (s * n_rt / slots, (s * n_rt + n_rt - 1) / slots);
            let again = (w0..w1).filter(|&w| !left.holds(wave_w(w))).count();
            (1 + again) as f64 * split_w(s)
        })
        .sum::<f64>();
    let part = 3.0 * sf * bf * 4.0;
    let opart = sf * bf * df * 4.0;
    // c_iy, t, alpha, dt (and k*_iy with K > 1) per row; inv_x per row, inv_w per W row.
    let outs = if k > 1 { 5.0 } else { 4.0 } * bf * 4.0 + bf * 4.0 + kf * cf * 4.0;
    // x tiles by every split, W by every row tile, labels per CTA, the target rows' x row
    // and K W rows (the x row once per sub-center), the partials and outputs.
    let l2 = sf * x_bytes + n_rt as f64 * w_bytes + sf * bf * 4.0 + 2.0 * kf * x_bytes + part + opart + outs;
    let x_hbm = if x_fit { x_bytes } else { sf * x_bytes };
    // The target W rows are a first touch (HBM), the target x rows are x again (L2).
    let hbm = x_hbm + w_hbm + bf * 4.0 + kf * x_bytes + part + opart + outs;
    // Every CTA streams `per` class tiles, except the last split's.
    let busiest = per as f64 / (n_rt * n_ct) as f64;
    let mut kernels = vec![launch_model(dev, &lf, Work { flops, tflops: rate, hbm, l2, busiest })];

    // Combine: one warp per row (a block per row at DP = 2048) reads the row's split partials
    // (m twice), its O partials, labels, t, dt, inv_x, inv_w[y], the x row and the target W
    // row; writes lse, loss, u.
    let lc = plan::attn_combine(dtype, shape, k, splits, AttnCombineArgs::default()).expect(supported);
    let rows_per_cta = if dp > plan::ATTN_DMAX_ALL { 1 } else { WARP_ROWS };
    let scratch = part + opart;
    let rows_io = 5.0 * bf * 4.0 + 2.0 * bf * 4.0;
    let u_bytes = bf * df * 4.0;
    let l2 = scratch + sf * bf * 4.0 + rows_io + 2.0 * x_bytes + u_bytes;
    let hbm = if scratch <= dev.l2_bytes { 0.0 } else { scratch } + rows_io + 2.0 * x_bytes + u_bytes;
    kernels.push(launch_model(dev, &lc, mem_work(hbm, l2, rows_share(b, rows_per_cta))));

    // Backward: grid (class tiles of RM W rows, row splits). Each CTA streams its split's x
    // rows in BT-row tiles with labels, inv_x, lse, t, dt per row (row_g too under per-row
    // upstream weights: not modelled); dx = w_i u_i for its share of the rows; block 0 also
    // reduces the B row losses (forward_backward queues no head_reduce launch). One split:
    // dW written once. Row splits (small C): every CTA stores its dW-hat partial (RM x D f32,
    // L2: the partials are within the O partials' budget, far below L2) and the last CTA of
    // each class tile reads all of them back before writing dW.
    let (n_rs, per_rs) = plan::attn_bwd_row_splits(dtype, shape, k);
    let lb = plan::attn_bwd(dtype, shape, k, (n_rs, per_rs), vec, AttnBwdArgs::default()).expect(supported);
    let (n_cb, n_rt) = (plan::attn_bwd_class_tiles(dtype, shape, k), b.div_ceil(bt));
    let flops = tile_flops * (n_cb * n_rt) as f64;
    let rows_in = if k > 1 { 6.0 } else { 5.0 } * bf * 4.0;
    let dx_io = u_bytes + bf * 4.0 + x_bytes + bf * 4.0;
    // One split's dW-hat partial over every class (each split's CTAs write one, the summing
    // CTAs read all of them) and the counters (an atomic read-modify-write per CTA).
    let (dwpart, counters) = if n_rs > 1 { (kf * cf * df * 4.0, n_cb as f64 * 4.0) } else { (0.0, 0.0) };
    let l2 = n_cb as f64 * (x_bytes + rows_in)
        + w_bytes
        + kf * cf * 4.0
        + dx_io
        + w_bytes
        + 2.0 * n_rs as f64 * dwpart
        + 2.0 * n_rs as f64 * counters;
    // x is re-read by every CTA column; the CTAs of one wave stream it together, so a set
    // that does not fit comes from HBM once per wave.
    let x_hbm =
        if L2Left::new(dev).fits(x_bytes) { x_bytes } else { grid_model(dev, &lb).waves as f64 * x_bytes };
    // u was written two kernels back: HBM.
    let hbm = x_hbm + w_bytes + rows_in + kf * cf * 4.0 + dx_io + w_bytes;
    // The busiest CTA: the last of a class tile, with the most row tiles (per_rs) and the
    // sum of the splits (its RM x D partial out, n_rs partials in), as a share of the l2 bytes
    // (the largest memory term); its FLOPs' share is per_rs / (n_cb n_rt) <= that.
    let rm_d = (rm * d) as f64 * 4.0;
    let busiest_l2 = per_rs as f64 / n_rt as f64 * (x_bytes + rows_in)
        + w_bytes / n_cb as f64
        + if n_rs > 1 { (1.0 + n_rs as f64) * rm_d } else { 0.0 };
    let busiest = (busiest_l2 / l2).max(per_rs as f64 / (n_cb * n_rt) as f64);
    kernels.push(launch_model(dev, &lb, Work { flops, tflops: rate, hbm, l2, busiest }));
    Some(PathModel { path: "fused", kernel_set: Some(FusedKernels::Attention), kernels })
}

/// One cuBLAS FP32 GEMM of M x N x K: 2*M*N*K FLOPs at the cuBLAS rate; operands and
/// output moved once (`a_in_l2`: the first operand was just written and fits in L2).
/// cuBLAS's own operand re-reads are not modelled, so its memory terms are lower bounds.
fn sgemm(dev: &DeviceModel, what: &str, (m, n, k): (usize, usize, usize), a_in_l2: bool) -> KernelModel {
    let (m, n, k) = (m as f64, n as f64, k as f64);
    let (a, bb, out) = (m * k * 4.0, n * k * 4.0, m * n * 4.0);
    let hbm = if a_in_l2 { 0.0 } else { a } + bb + out;
    let w =
        Work { flops: 2.0 * m * n * k, tflops: dev.cublas_f32_tflops(), hbm, l2: a + bb + out, busiest: 0.0 };
    model(dev, format!("cublas_sgemm ({what})"), None, w)
}

/// The reference path's launches of one `forward_backward` (`head/reference.rs`): f32
/// normalized copies, three FP32 cuBLAS GEMMs plus a recomputed cosine GEMM in the
/// backward, the B x C cosines and dC materialized. Same L2 rules as [`tiles`].
pub fn reference(shape: HeadShape, dtype: DType, dev: &DeviceModel) -> PathModel {
    let HeadShape { b, c, d } = shape;
    let (bf, cf, df, e) = (b as f64, c as f64, d as f64, dtype.size() as f64);
    let normalize = |rows: usize| {
        let l = plan::ref_normalize(dtype, rows, d, RefNormalizeArgs::default());
        let r = rows as f64;
        let bytes = r * df * e + r * df * 4.0 + r * 4.0;
        launch_model(dev, &l, mem_work(bytes, bytes, rows_share(rows, WARP_ROWS)))
    };
    let cos_bytes = bf * cf * 4.0;
    let cos_fits = cos_bytes <= dev.l2_bytes;
    let mut kernels = vec![normalize(b), normalize(c), sgemm(dev, "cos", (b, c, d), false)];
    let lm = plan::ref_margin(dtype, shape, 1, RefMarginArgs::default());
    // Per valid row: its x row and W row (c_iy), labels, sigma, four outputs.
    let margin = 2.0 * bf * df * e + 6.0 * bf * 4.0;
    kernels.push(launch_model(dev, &lm, mem_work(margin, margin, rows_share(b, plan::THREADS as usize))));
    let ls = plan::ref_softmax(shape, 1, RefSoftmaxArgs::default());
    let rows = 5.0 * bf * 4.0;
    let hbm = rows + if cos_fits { 0.0 } else { cos_bytes };
    kernels.push(launch_model(dev, &ls, mem_work(hbm, cos_bytes + rows, 1.0 / bf)));
    kernels.push(head_reduce(dev, b));
    kernels.extend([normalize(b), normalize(c), sgemm(dev, "cos again", (b, c, d), false)]);
    let lg = plan::ref_grad(shape, 1, RefGradArgs::default());
    let rows = 5.0 * bf * 4.0 * (c.div_ceil(plan::THREADS as usize)) as f64;
    let hbm = rows + cos_bytes + if cos_fits { 0.0 } else { cos_bytes };
    kernels.push(launch_model(
        dev,
        &lg,
        mem_work(hbm, 2.0 * cos_bytes + rows, rows_share(c, plan::THREADS as usize) / bf),
    ));
    kernels.push(sgemm(dev, "dx", (b, d, c), cos_fits));
    kernels.push(sgemm(dev, "dW", (c, d, b), false));
    // dxh was written two kernels back (by the dx GEMM); dwh by the kernel just before.
    kernels.push(normback(dev, dtype, b, d, 1, false));
    kernels.push(normback(dev, dtype, c, d, 1, cf * df * 4.0 <= dev.l2_bytes));
    PathModel { path: "reference", kernel_set: None, kernels }
}
