//! CUDA side: device start-up, embedded kernels, typed device tensors and the
//! safe wrappers of each kernel family.
//!
//! Start-up never panics: the driver library is looked for before cudarc
//! touches it (cudarc's dynamic loader panics when a library is missing), a
//! machine without a device and a GPU below compute capability 8.0 each give a
//! typed [`Error`], and any panic from inside the driver bindings is caught and
//! turned into [`Error::NoDriver`].

pub mod args;
pub mod backend;
pub mod bench;
pub mod emu;
pub mod gemm_plan;
pub mod head;
pub mod kernels;
pub mod launch;
pub mod norms;
pub mod perf_model;
pub mod stats;
pub mod tensor;

use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub use emu::EmuOrder;
pub use kernels::{Kernel, KernelResources, Module};
pub use launch::{DevPtr, KernelArgs, Launch};
pub use tensor::{DeviceCopy, DeviceElem, Tensor};

/// Lowest compute capability the kernels support (mma.sync bf16 needs sm_80).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// Largest grid.y and grid.z a launch may have (grid.x may reach 2^31 - 1).
pub const MAX_GRID_YZ: u32 = 65_535;
/// 32-bit registers in one SM's register file (sm_80 .. sm_90), which bounds one block.
pub const REGISTERS_PER_SM: u32 = 65_536;

/// What is known about the device a [`Device`] runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Ordinal passed to [`Device::new`].
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Number of streaming multiprocessors.
    pub sm_count: i32,
    /// Total device memory in bytes.
    pub total_memory: usize,
    /// Driver's CUDA version, e.g. 13000 (0 on the emulated device).
    pub driver_version: i32,
    /// Which embedded code is loaded: "sm_90 cubin", "compute_80 PTX (JIT)" or the emulator.
    pub code: String,
    /// Shared memory one block may use after opting in (static + dynamic), bytes.
    pub max_smem_per_block: u32,
    /// True for the CPU-emulated device ([`Device::emulated`]).
    pub emulated: bool,
}

/// Operation counts of one [`Device`] since it was opened (cheap atomics), so tests
/// can assert a call's host overhead: launches, allocations, host copies, syncs.
#[derive(Debug, Default)]
pub struct Counters {
    launches: AtomicU64,
    allocations: AtomicU64,
    htod: AtomicU64,
    htod_pageable: AtomicU64,
    dtoh: AtomicU64,
    syncs: AtomicU64,
    gemms: AtomicU64,
}

/// A snapshot of [`Counters`]; subtract two to get what a call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Kernel launches.
    pub launches: u64,
    /// Device allocations.
    pub allocations: u64,
    /// Host-to-device copies.
    pub htod: u64,
    /// Of those, copies from pageable host memory (the driver stages them).
    pub htod_pageable: u64,
    /// Device-to-host copies (each waits for the queued work).
    pub dtoh: u64,
    /// Explicit synchronizations.
    pub syncs: u64,
    /// cuBLAS GEMM calls.
    pub gemms: u64,
}

impl std::ops::Sub for CounterSnapshot {
    type Output = CounterSnapshot;
    fn sub(self, o: Self) -> Self {
        CounterSnapshot {
            launches: self.launches - o.launches,
            allocations: self.allocations - o.allocations,
            htod: self.htod - o.htod,
            htod_pageable: self.htod_pageable - o.htod_pageable,
            dtoh: self.dtoh - o.dtoh,
            syncs: self.syncs - o.syncs,
            gemms: self.gemms - o.gemms,
        }
    }
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn allocation(&self) {
        Self::bump(&self.allocations)
    }
    pub(crate) fn htod(&self) {
        Self::bump(&self.htod)
    }
    pub(crate) fn htod_pageable(&self) {
        Self::bump(&self.htod_pageable)
    }
    pub(crate) fn dtoh(&self) {
        Self::bump(&self.dtoh)
    }
    fn snapshot(&self) -> CounterSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            launches: r(&self.launches),
            allocations: r(&self.allocations),
            htod: r(&self.htod),
            htod_pageable: r(&self.htod_pageable),
            dtoh: r(&self.dtoh),
            syncs: r(&self.syncs),
            gemms: r(&self.gemms),
        }
    }
}

/// A GPU through the CUDA driver: context, stream, loaded modules (once each) and
/// a cuBLAS handle.
struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
}

enum Backend {
    Gpu(Gpu),
    Emu(Arc<emu::EmuState>),
}

/// One device: a GPU, or the CPU emulator running the same kernels and launches
/// ([`Device::emulated`]). Every kernel launch of the crate goes through
/// [`Device::launch`] and every GEMM through [`Device::gemm`].
pub struct Device {
    backend: Backend,
    info: DeviceInfo,
    counters: Counters,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("info", &self.info).finish()
    }
}

/// Maps a driver error to [`Error::Cuda`] with what was being done.
pub(crate) fn cuda_err(context: impl Into<String>) -> impl FnOnce(DriverError) -> Error {
    let context = context.into();
    move |e| Error::Cuda { context, message: e.to_string() }
}

/// True when the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only attempts to dlopen the driver library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Runs `f`, turning a panic inside the driver bindings into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::NoDriver(format!("{what}: {msg}")))
        }
    }
}

/// Raises the release threshold of the device's default memory pool (which every
/// stream-ordered allocation of the crate uses) to "never", so freed scratch stays
/// in the pool for the next call instead of going back to the driver at each sync.
fn keep_pool_memory(device: cudarc::driver::sys::CUdevice) -> Result<()> {
    use cudarc::driver::sys as cu;
    let mut pool: cu::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: queries the device's default pool into a valid out-pointer.
    unsafe { cu::cuDeviceGetDefaultMemPool(&mut pool, device) }
        .result()
        .map_err(cuda_err("default memory pool"))?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: CU_MEMPOOL_ATTR_RELEASE_THRESHOLD takes a cuuint64_t through a valid pointer.
    unsafe {
        cu::cuMemPoolSetAttribute(
            pool,
            cu::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
    }
    .result()
    .map_err(cuda_err("memory pool release threshold"))
}

/// The SM architecture number of a compute capability (9.0 -> 90).
fn sm_of(cc: (i32, i32)) -> u32 {
    (cc.0 * 10 + cc.1) as u32
}

impl Device {
    /// Opens GPU `ordinal`. Errors: [`Error::NoDriver`] (no driver library),
    /// [`Error::NoDevice`] (no such device), [`Error::UnsupportedDevice`] (below sm_80).
    pub fn new(ordinal: usize) -> Result<Arc<Device>> {
        if !driver_present() {
            return Err(Error::NoDriver("the CUDA driver library (libcuda.so.1) was not found".into()));
        }
        guarded("CUDA start-up", || {
            let count = CudaContext::device_count().map_err(|e| Error::NoDevice(e.to_string()))?;
            if count <= 0 {
                return Err(Error::NoDevice("the driver reports no CUDA devices".into()));
            }
            if ordinal >= count as usize {
                return Err(Error::NoDevice(format!("device {ordinal} requested, {count} present")));
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoDevice(e.to_string()))?;
            let name = ctx.name().map_err(cuda_err("device name"))?;
            let cc = ctx.compute_capability().map_err(cuda_err("compute capability"))?;
            if cc < MIN_COMPUTE_CAPABILITY {
                return Err(Error::UnsupportedDevice { name, major: cc.0, minor: cc.1 });
            }
            use cudarc::driver::sys::CUdevice_attribute as A;
            let sm_count =
                ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(cuda_err("SM count"))?;
            let max_smem = ctx
                .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                .map_err(cuda_err("shared memory limit"))?;
            let total_memory = ctx.total_mem().map_err(cuda_err("memory size"))?;
            let mut driver_version = 0i32;
            // SAFETY: cuDriverGetVersion writes one int through a valid pointer.
            unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }
                .result()
                .map_err(cuda_err("driver version"))?;
            let sm = sm_of(cc);
            let code = if kernels::CUBIN_ARCHS.contains(&sm) {
                format!("sm_{sm} cubin")
            } else {
                format!("compute_{} PTX (JIT)", kernels::PTX_ARCH)
            };
            // SAFETY: featcloud queues all work on this one stream, so cudarc's per-buffer
            // event tracking (which costs an event record per kernel argument) is not needed.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.default_stream();
            if ctx.has_async_alloc() {
                keep_pool_memory(ctx.cu_device())?;
            }
            Ok(Arc::new(Device {
                backend: Backend::Gpu(Gpu {
                    ctx,
                    stream,
                    modules: Mutex::new(HashMap::new()),
                    blas: OnceLock::new(),
                }),
                info: DeviceInfo {
                    ordinal,
                    name,
                    compute_capability: cc,
                    sm_count,
                    total_memory,
                    driver_version,
                    code,
                    max_smem_per_block: max_smem.max(0) as u32,
                    emulated: false,
                },
                counters: Counters::default(),
            }))
        })
    }

    /// The CPU-emulated device with the limits of an H200 (sm_90, `sm_count` SMs for
    /// the dispatcher, 227 KiB of shared memory per block): every launch runs the real
    /// kernel sources on the CPU (see [`emu`]). Errors when the crate was built without
    /// the `emu` feature.
    pub fn emulated(sm_count: i32) -> Result<Arc<Device>> {
        if !emu::AVAILABLE {
            return Err(Error::NoDevice(emu::NOT_BUILT.into()));
        }
        Ok(Arc::new(Device {
            backend: Backend::Emu(Arc::new(emu::EmuState::default())),
            info: DeviceInfo {
                ordinal: 0,
                name: "featcloud CPU emulator (sm_90 limits)".into(),
                compute_capability: (9, 0),
                sm_count: sm_count.max(1),
                total_memory: 0,
                driver_version: 0,
                code: "kernels/*.cu built for the host against emu/".into(),
                max_smem_per_block: head::plan::SM90_MAX_SMEM,
                emulated: true,
            },
            counters: Counters::default(),
        }))
    }

    /// The device `FEATCLOUD_DEVICE` names: `emu` for [`Device::emulated`] (132 SMs,
    /// an H200's count), else GPU `ordinal`.
    pub fn from_env(ordinal: usize) -> Result<Arc<Device>> {
        match std::env::var("FEATCLOUD_DEVICE").as_deref() {
            Ok("emu") => Device::emulated(132),
            Ok("gpu") | Ok("") | Err(_) => Device::new(ordinal),
            Ok(other) => Err(Error::InvalidConfig(format!("FEATCLOUD_DEVICE={other}: expected emu or gpu"))),
        }
    }

    /// What the device is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// True for the CPU-emulated device.
    pub fn is_emulated(&self) -> bool {
        self.info.emulated
    }

    /// Operation counts so far (see [`Counters`]).
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// On the emulated device: run later launches' blocks and threads in these orders.
    /// No effect on a GPU.
    pub fn set_emu_order(&self, blocks: EmuOrder, threads: EmuOrder) {
        if let Backend::Emu(e) = &self.backend {
            e.set_order(blocks, threads);
        }
    }

    pub(crate) fn emu_state(&self) -> Option<&Arc<emu::EmuState>> {
        match &self.backend {
            Backend::Emu(e) => Some(e),
            Backend::Gpu(_) => None,
        }
    }

    fn gpu(&self, what: &str) -> Result<&Gpu> {
        match &self.backend {
            Backend::Gpu(g) => Ok(g),
            Backend::Emu(_) => {
                Err(Error::NoDevice(format!("{what} needs a GPU; this is the emulated device")))
            }
        }
    }

    /// The context (GPU only).
    pub fn context(&self) -> Result<&Arc<CudaContext>> {
        Ok(&self.gpu("a CUDA context")?.ctx)
    }

    /// The stream every featcloud launch goes to (GPU only).
    pub fn stream(&self) -> Result<&Arc<CudaStream>> {
        Ok(&self.gpu("a CUDA stream")?.stream)
    }

    /// Waits for all queued work (the emulated device runs everything at once).
    pub fn synchronize(&self) -> Result<()> {
        Counters::bump(&self.counters.syncs);
        match &self.backend {
            Backend::Gpu(g) => g.stream.synchronize().map_err(cuda_err("synchronize")),
            Backend::Emu(_) => Ok(()),
        }
    }

    /// The loaded function for `k` (GPU only); its module is loaded on first use and
    /// cached. Loads the cubin for this device's arch when embedded, else the PTX.
    pub fn function(&self, k: Kernel) -> Result<CudaFunction> {
        if !kernels::KERNELS_BUILT {
            return Err(Error::KernelsNotBuilt);
        }
        let gpu = self.gpu("loading a CUDA module")?;
        let module = {
            let mut cache = gpu.modules.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(k.module.name) {
                Some(m) => m.clone(),
                None => {
                    let sm = sm_of(self.info.compute_capability);
                    let image = match k.module.cubins.iter().find(|(a, _)| *a == sm) {
                        Some((_, bytes)) => cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()),
                        None => cudarc::nvrtc::Ptx::from_src(k.module.ptx),
                    };
                    let m = gpu
                        .ctx
                        .load_module(image)
                        .map_err(cuda_err(format!("loading module {}", k.module.name)))?;
                    cache.insert(k.module.name, m.clone());
                    m
                }
            }
        };
        module.load_function(k.name).map_err(cuda_err(format!("{}::{}", k.module.name, k.name)))
    }

    /// The cuBLAS handle bound to this device's stream (GPU only; created on first use).
    pub fn cublas(&self) -> Result<&CudaBlas> {
        let gpu = self.gpu("cuBLAS")?;
        let r = gpu.blas.get_or_init(|| {
            // SAFETY: only attempts to dlopen cuBLAS by its usual names.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err("the cuBLAS library (libcublas.so) was not found".into());
            }
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| CudaBlas::new(gpu.stream.clone())))
            {
                Ok(Ok(b)) => Ok(b),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("cuBLAS failed to load".into()),
            }
        });
        r.as_ref().map_err(|m| Error::Cublas { context: "cuBLAS start-up".into(), message: m.clone() })
    }

    /// Checks a launch against the kernel's and the device's limits (see
    /// [`check_launch_limits`]), with ptxas's resources for this device's arch (sm_90's
    /// on the emulated device).
    pub fn check_launch(&self, l: &Launch) -> Result<()> {
        let sm = if self.is_emulated() { 90 } else { sm_of(self.info.compute_capability) };
        let res = kernels::RESOURCES
            .iter()
            .filter(|r| r.kernel == l.kernel.name && r.module == l.kernel.module.name)
            .min_by_key(|r| r.arch.abs_diff(sm));
        check_launch_limits(l, self.info.max_smem_per_block, res)
    }

    /// Runs one [`Launch`] after [`Device::check_launch`]: queued on the GPU's stream
    /// (the dynamic shared memory opt-in is set when a launch needs more than 48 KiB),
    /// or run to completion on the emulated device, whose guard zones are checked after.
    ///
    /// # Safety
    /// Every device address in the argument struct must point to a live allocation of
    /// this device holding at least what the kernel reads and writes there at this
    /// launch's shape, outputs must not alias inputs unless the kernel allows it, and
    /// the struct must be the one the kernel takes (the planning functions pair them).
    pub unsafe fn launch(&self, l: &Launch) -> Result<()> {
        self.check_launch(l)?;
        Counters::bump(&self.counters.launches);
        match &self.backend {
            Backend::Emu(e) => e.launch(l),
            Backend::Gpu(g) => {
                // The raw launch below does not make the context current (cudarc's launch
                // builder did): a thread whose first CUDA call is a launch needs it.
                g.ctx.bind_to_thread().map_err(cuda_err("binding the CUDA context"))?;
                let f = self.function(l.kernel)?;
                if l.smem > 0 {
                    f.set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        l.smem as i32,
                    )
                    .map_err(cuda_err(format!("{}: shared-memory opt-in", l.kernel.name)))?;
                }
                // The kernel takes one parameter: the argument struct, read by the driver
                // from this pointer (the size comes from the kernel's own metadata) when
                // the launch is queued.
                let mut params = [l.arg_ptr() as *mut std::ffi::c_void];
                // SAFETY: every kernel of the crate takes exactly one by-value struct whose
                // layout the argument bytes mirror (launch::KernelArgs; the struct's name
                // was checked against the kernel's in check_launch); the device
                // addresses in it are live allocations of this context that the callers
                // keep alive until the stream reaches them (stream-ordered frees); the
                // grid, block and shared memory were checked against the kernel above.
                unsafe {
                    cudarc::driver::result::launch_kernel(
                        f.cu_function(),
                        (l.grid[0], l.grid[1], l.grid[2]),
                        (l.block[0], l.block[1], l.block[2]),
                        l.smem,
                        g.stream.cu_stream(),
                        &mut params,
                    )
                }
                .map_err(cuda_err(format!("launching {}", l.kernel.name)))
            }
        }
    }

    /// Runs the launches of a plan in order.
    ///
    /// # Safety
    /// As [`Device::launch`], for every launch.
    pub unsafe fn run(&self, plan: &[Launch]) -> Result<()> {
        // SAFETY: forwarded from the caller.
        plan.iter().try_for_each(|l| unsafe { self.launch(l) })
    }

    /// One `cublasGemmEx`: column-major `C = alpha op(A) op(B) + beta C` along `plan`,
    /// A and B of element type `T` (f32, bf16 or f16), C f32, f32 accumulation
    /// (`CUBLAS_COMPUTE_32F`, never TF32). On the emulated device a host stand-in with
    /// the same semantics runs ([`emu`]).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<T: DeviceElem>(
        &self,
        plan: &gemm_plan::ColGemm,
        a: &Tensor<T>,
        b: &Tensor<T>,
        c: &mut Tensor<f32>,
        alpha: f32,
        beta: f32,
        what: &str,
    ) -> Result<()> {
        plan.check(a.len(), b.len(), c.len())?;
        Counters::bump(&self.counters.gemms);
        let input = match T::DTYPE {
            crate::dtype::DType::F32 => emu::GemmInput::F32,
            crate::dtype::DType::BF16 => emu::GemmInput::BF16,
            crate::dtype::DType::F16 => emu::GemmInput::F16,
        };
        match &self.backend {
            Backend::Emu(e) => emu::gemm(e, plan, input, a.ptr(), b.ptr(), c.ptr(), alpha, beta),
            Backend::Gpu(_) => {
                use cudarc::cublas::sys as cb;
                let op = |t: bool| {
                    if t {
                        cb::cublasOperation_t::CUBLAS_OP_T
                    } else {
                        cb::cublasOperation_t::CUBLAS_OP_N
                    }
                };
                let ty = match input {
                    emu::GemmInput::F32 => cb::cudaDataType::CUDA_R_32F,
                    emu::GemmInput::BF16 => cb::cudaDataType::CUDA_R_16BF,
                    emu::GemmInput::F16 => cb::cudaDataType::CUDA_R_16F,
                };
                let [m, n, k, lda, ldb, ldc] = plan.ints();
                let blas = self.cublas()?;
                self.context()?.bind_to_thread().map_err(cuda_err("binding the CUDA context"))?;
                // SAFETY: plan.check above: positive dimensions within int, leading dimensions
                // at least the stored rows, and a, b, c hold at least the elements the plan
                // touches; c is a distinct allocation from a and b (every call site); alpha
                // and beta are host f32 as CUBLAS_COMPUTE_32F in host pointer mode wants.
                unsafe {
                    cudarc::cublas::result::gemm_ex(
                        *blas.handle(),
                        op(plan.trans_a),
                        op(plan.trans_b),
                        m,
                        n,
                        k,
                        &alpha as *const f32 as *const std::ffi::c_void,
                        a.ptr().0 as *const std::ffi::c_void,
                        ty,
                        lda,
                        b.ptr().0 as *const std::ffi::c_void,
                        ty,
                        ldb,
                        &beta as *const f32 as *const std::ffi::c_void,
                        c.ptr().0 as *mut std::ffi::c_void,
                        cb::cudaDataType::CUDA_R_32F,
                        ldc,
                        cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(|e| Error::Cublas { context: what.to_string(), message: e.to_string() })
            }
        }
    }
}

/// Checks a launch against the limits a GPU would refuse it for (or, worse, run it
/// wrongly): grid dimensions, block size against the kernel's `__launch_bounds__`,
/// static (`res`) + dynamic shared memory against `max_smem` (the device's opt-in
/// limit per block), and registers x threads against one SM's register file
/// (registers are allocated per thread in units of 8).
pub fn check_launch_limits(l: &Launch, max_smem: u32, res: Option<&KernelResources>) -> Result<()> {
    let refuse = |message: String| Err(Error::Launch { kernel: l.kernel.name.to_string(), message });
    if !l.args_match() {
        return refuse(format!("it takes {}, the launch carries another argument struct", l.kernel.args));
    }
    let [gx, gy, gz] = l.grid;
    if gx == 0 || gy == 0 || gz == 0 || gx > i32::MAX as u32 || gy > MAX_GRID_YZ || gz > MAX_GRID_YZ {
        return refuse(format!("grid {:?} outside 1..2^31-1 x 1..65535 x 1..65535", l.grid));
    }
    let threads = l.block.iter().map(|&v| v as u64).product::<u64>();
    if threads == 0 || l.block[2] > 64 || threads > l.kernel.max_threads as u64 {
        return refuse(format!(
            "block {:?} ({threads} threads) outside the kernel's __launch_bounds__ of {}",
            l.block, l.kernel.max_threads
        ));
    }
    let static_smem = res.map_or(0, |r| r.shared_bytes);
    if static_smem as u64 + l.smem as u64 > max_smem as u64 {
        return refuse(format!(
            "{static_smem} bytes of static + {} of dynamic shared memory exceed the device's {max_smem} per block",
            l.smem
        ));
    }
    if let Some(r) = res {
        let regs = r.registers.div_ceil(8) * 8;
        if regs as u64 * threads > REGISTERS_PER_SM as u64 {
            return refuse(format!(
                "{threads} threads x {regs} registers exceed the register file of {REGISTERS_PER_SM}"
            ));
        }
    }
    Ok(())
}

/// The device for a test, or `None` (test skipped) when there is none.
///
/// `FEATCLOUD_DEVICE=emu` gives the emulated device (CI sets it); otherwise GPU 0.
/// With `FEATCLOUD_REQUIRE_GPU=1` a missing device is a panic, so a GPU run can
/// never pass by skipping. Prints why it skipped.
///
/// With `FEATCLOUD_DEVICE_LOG` set, appends the calling test's name to that file, so a
/// run can count how many tests really executed on a device (`scripts/test.sh`
/// prints it).
pub fn test_device() -> Option<Arc<Device>> {
    match Device::from_env(0) {
        Ok(d) if kernels::KERNELS_BUILT || d.is_emulated() => {
            log_device_test();
            Some(d)
        }
        Ok(_) => skip_or_fail(&Error::KernelsNotBuilt.to_string()),
        Err(e) => skip_or_fail(&e.to_string()),
    }
}

/// The emulated device for a test that is about the emulator itself (whatever
/// `FEATCLOUD_DEVICE` says), or `None` with a message when the crate was built
/// without the `emu` feature. Logged like [`test_device`].
pub fn test_emulated_device(sm_count: i32) -> Option<Arc<Device>> {
    match Device::emulated(sm_count) {
        Ok(d) => {
            log_device_test();
            Some(d)
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Appends "<test binary>::<test name>" to `FEATCLOUD_DEVICE_LOG` (cargo test names
/// threads after tests), so a run can count the tests that really got a device.
fn log_device_test() {
    if let Some(log) = std::env::var_os("FEATCLOUD_DEVICE_LOG") {
        use std::io::Write;
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()));
        let exe =
            exe.as_deref().and_then(|s| s.rsplit_once('-').map(|(a, _)| a.to_string())).unwrap_or_default();
        let name = std::thread::current().name().unwrap_or("unnamed").to_string();
        // One write of the whole line: O_APPEND keeps concurrent tests' lines whole.
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = f.write_all(format!("{exe}::{name}\n").as_bytes());
        }
    }
}

fn skip_or_fail(why: &str) -> Option<Arc<Device>> {
    if std::env::var("FEATCLOUD_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("FEATCLOUD_REQUIRE_GPU=1 but no usable GPU: {why}");
    }
    eprintln!("skipped: no GPU ({why})");
    None
}

/// A `featcloud smoke` check of one kernel family, registered by its host wrapper next
/// to its kernels with `inventory::submit!`, so the smoke command lists nothing by hand.
pub struct SmokeCheck {
    /// The family's name; orders the smoke output.
    pub family: &'static str,
    /// Runs the family's checks at small sizes against the CPU oracle.
    pub run: fn(&Device) -> Result<Vec<SmokeLine>>,
}

inventory::collect!(SmokeCheck);

/// Every registered smoke check, ordered by family name.
pub fn smoke_checks() -> Vec<&'static SmokeCheck> {
    let mut checks: Vec<&'static SmokeCheck> = inventory::iter::<SmokeCheck>.into_iter().collect();
    checks.sort_by_key(|c| c.family);
    checks
}

/// One line of `featcloud smoke`: a kernel checked against the CPU oracle.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SmokeLine {
    /// Kernel or path checked (e.g. "head_fused fwd+bwd").
    pub kernel: String,
    /// Storage dtype.
    pub dtype: String,
    /// Option set and shape, in words.
    pub options: String,
    /// Worst error, normalised as the tolerance is (e.g. max abs err / max |grad|).
    pub max_err: f64,
    /// The SPEC tolerance it was held to.
    pub tolerance: f64,
    /// max_err <= tolerance and every output finite.
    pub passed: bool,
}
