//! CUDA side: device start-up, embedded kernels, typed device tensors and the
//! safe wrappers of each kernel family.
//!
//! Start-up never panics: the driver library is looked for before cudarc
//! touches it (cudarc's dynamic loader panics when a library is missing), a
//! machine without a device and a GPU below compute capability 8.0 each give a
//! typed [`Error`], and any panic from inside the driver bindings is caught and
//! turned into [`Error::NoDriver`].

pub mod backend;
pub mod bench;
pub mod gemm_plan;
pub mod head;
pub mod kernels;
pub mod norms;
pub mod stats;
pub mod tensor;

use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub use kernels::{Kernel, KernelResources, Module};
pub use tensor::{DeviceElem, Tensor};

/// Lowest compute capability the kernels support (mma.sync bf16 needs sm_80).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

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
    /// Driver's CUDA version, e.g. 13000.
    pub driver_version: i32,
    /// Which embedded code is loaded: "sm_90 cubin" or "compute_80 PTX (JIT)".
    pub code: String,
}

/// One GPU: context, stream, loaded modules (once each) and a cuBLAS handle.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
    info: DeviceInfo,
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
            let total_memory = ctx.total_mem().map_err(cuda_err("memory size"))?;
            let mut driver_version = 0i32;
            // SAFETY: cuDriverGetVersion writes one int through a valid pointer.
            unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }
                .result()
                .map_err(cuda_err("driver version"))?;
            let sm = (cc.0 * 10 + cc.1) as u32;
            let code = if kernels::CUBIN_ARCHS.contains(&sm) {
                format!("sm_{sm} cubin")
            } else {
                format!("compute_{} PTX (JIT)", kernels::PTX_ARCH)
            };
            // SAFETY: featcloud queues all work on this one stream, so cudarc's per-buffer
            // event tracking (which costs an event record per kernel argument) is not needed.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.default_stream();
            Ok(Arc::new(Device {
                ctx,
                stream,
                modules: Mutex::new(HashMap::new()),
                blas: OnceLock::new(),
                info: DeviceInfo {
                    ordinal,
                    name,
                    compute_capability: cc,
                    sm_count,
                    total_memory,
                    driver_version,
                    code,
                },
            }))
        })
    }

    /// What the device is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every featcloud launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }

    /// The loaded function for `k`; its module is loaded on first use and cached.
    /// Loads the cubin for this device's arch when embedded, else the PTX.
    pub fn function(&self, k: Kernel) -> Result<CudaFunction> {
        if !kernels::KERNELS_BUILT {
            return Err(Error::KernelsNotBuilt);
        }
        let module = {
            let mut cache = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(k.module.name) {
                Some(m) => m.clone(),
                None => {
                    let (maj, min) = self.info.compute_capability;
                    let sm = (maj * 10 + min) as u32;
                    let image = match k.module.cubins.iter().find(|(a, _)| *a == sm) {
                        Some((_, bytes)) => cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()),
                        None => cudarc::nvrtc::Ptx::from_src(k.module.ptx),
                    };
                    let m = self
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

    /// The cuBLAS handle bound to this device's stream (created on first use).
    pub fn cublas(&self) -> Result<&CudaBlas> {
        let r = self.blas.get_or_init(|| {
            // SAFETY: only attempts to dlopen cuBLAS by its usual names.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err("the cuBLAS library (libcublas.so) was not found".into());
            }
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                CudaBlas::new(self.stream.clone())
            })) {
                Ok(Ok(b)) => Ok(b),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("cuBLAS failed to load".into()),
            }
        });
        r.as_ref().map_err(|m| Error::Cublas { context: "cuBLAS start-up".into(), message: m.clone() })
    }
}

/// The GPU for a test, or `None` (test skipped) when there is none.
///
/// With `FEATCLOUD_REQUIRE_GPU=1` a missing GPU is a panic, so a GPU run can
/// never pass by skipping. Prints why it skipped.
pub fn test_device() -> Option<Arc<Device>> {
    match Device::new(0) {
        Ok(d) if kernels::KERNELS_BUILT => Some(d),
        Ok(_) => skip_or_fail(&Error::KernelsNotBuilt.to_string()),
        Err(e) => skip_or_fail(&e.to_string()),
    }
}

fn skip_or_fail(why: &str) -> Option<Arc<Device>> {
    if std::env::var("FEATCLOUD_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("FEATCLOUD_REQUIRE_GPU=1 but no usable GPU: {why}");
    }
    eprintln!("skipped: no GPU ({why})");
    None
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
