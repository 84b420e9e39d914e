//! The emulated device: the same launches, on the CPU.
//!
//! With the `emu` cargo feature, `build/emu.rs` compiles every `kernels/*.cu` with the
//! host C++ compiler against the CUDA emulator in `emu/` (one fiber per thread,
//! real barriers and warp collectives, the PTX instructions the kernels use
//! emulated from the ISA) into a static library, and [`Device::emulated`] runs
//! every [`Launch`] through it. Device buffers are host memory: a [`DevPtr`] is a
//! host address. What this adds over running kernels by hand:
//!
//! - the host code users run (planning, dispatch, workspace sizing, argument
//!   structs, launch order, the cuBLAS calls) runs unchanged;
//! - every buffer is exactly its size with poisoned guard zones on both sides,
//!   checked after every launch: an out-of-bounds write is an error naming the
//!   kernel, the buffer and where it was allocated;
//! - uninitialized allocations are filled with 0xFF bytes (NaN in every float
//!   dtype), so a read of an element nobody wrote shows up in the results;
//! - blocks run one at a time in a chosen order (ascending, descending or seeded
//!   random; see [`EmuOrder`]), so tests can require bitwise-equal results in
//!   every order;
//! - cuBLAS is replaced by a host `gemm`: `cublasGemmEx`'s column-major semantics on
//!   the host, f32 accumulation in a fixed order.
//!
//! What it cannot show (only a GPU can): inter-block concurrency and memory
//! ordering, the tensor cores' accumulation order and rounding, libdevice's math
//! (glibc's is used), fused multiply-adds (the emulator is built with
//! `-ffp-contract=off`, NVRTC contracts), timing and occupancy.
//!
//! [`Device::emulated`]: super::Device::emulated
//! [`Launch`]: super::launch::Launch

use super::gemm_plan::ColGemm;
use super::launch::{DevPtr, Launch};
use crate::error::{Error, Result};
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::panic::Location;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Bytes of poisoned guard zone before and after every emulated buffer.
pub const GUARD_BYTES: usize = 256;
/// The guard zones' byte: NaN in every float dtype, so a read past the end shows too
/// (a write is caught unless it stores exactly these bytes).
const GUARD_BYTE: u8 = 0xFF;
/// What an uninitialized emulated allocation holds (NaN in f32, bf16 and f16).
pub const UNINIT_BYTE: u8 = 0xFF;
/// Alignment of every emulated buffer (what cudaMalloc guarantees).
const ALIGN: usize = 256;

/// The order in which the emulator runs the blocks of a grid and resumes the
/// threads of a block between barriers. A kernel whose results depend on either
/// has a race (between blocks, or between threads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EmuOrder {
    /// x fastest, ascending (the default).
    #[default]
    Ascending,
    /// The reverse.
    Descending,
    /// A fresh pseudo-random permutation from this seed.
    Random(u64),
}

impl EmuOrder {
    #[cfg_attr(not(feature = "emu"), allow(dead_code))]
    fn code(self) -> (i32, u64) {
        match self {
            EmuOrder::Ascending => (0, 0),
            EmuOrder::Descending => (1, 0),
            EmuOrder::Random(s) => (2, s),
        }
    }
}

#[cfg(feature = "emu")]
mod ffi {
    use std::os::raw::{c_char, c_int, c_uint, c_ulonglong};
    extern "C" {
        pub fn fc_emu_launch(
            kernel: *const c_char,
            grid: *const c_uint,
            block: *const c_uint,
            dyn_smem: usize,
            args: *const u8,
            args_len: usize,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn fc_emu_set_order(block_order: c_int, thread_order: c_int, seed: c_ulonglong);
    }
}

/// True when this build contains the emulator (the `emu` cargo feature).
pub const AVAILABLE: bool = cfg!(feature = "emu");

/// The emulator's globals (one grid at a time, process-wide): launches from every
/// emulated device and thread take this lock.
static EMULATOR: Mutex<()> = Mutex::new(());

/// One live emulated allocation.
#[derive(Debug)]
struct Alloc {
    /// Bytes the caller asked for.
    bytes: usize,
    /// Element type and count, for messages.
    what: String,
    /// Where it was allocated.
    site: &'static Location<'static>,
}

/// The emulated device's state: live buffers (for the guard checks) and the
/// block and thread orders.
#[derive(Debug, Default)]
pub(crate) struct EmuState {
    allocs: Mutex<BTreeMap<usize, Alloc>>,
    order: Mutex<(EmuOrder, EmuOrder)>,
}

/// Host memory standing in for a device allocation, with guard zones.
#[derive(Debug)]
pub(crate) struct EmuBuf {
    base: NonNull<u8>,
    bytes: usize,
    state: Arc<EmuState>,
}

// SAFETY: the buffer is plain heap memory owned by this value; access goes through
// the emulator lock (launches) or &self / &mut self (copies).
unsafe impl Send for EmuBuf {}
// SAFETY: as above; shared references only read.
unsafe impl Sync for EmuBuf {}

fn layout(bytes: usize) -> Layout {
    Layout::from_size_align(bytes + 2 * GUARD_BYTES, ALIGN).expect("emulated allocation size")
}

impl EmuBuf {
    /// The user region's address.
    pub(crate) fn addr(&self) -> usize {
        self.base.as_ptr() as usize + GUARD_BYTES
    }

    /// The user region.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: [addr, addr + bytes) lies inside the allocation made in `alloc`.
        unsafe { std::slice::from_raw_parts(self.addr() as *const u8, self.bytes) }
    }

    /// The user region, writable.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.addr() as *mut u8, self.bytes) }
    }
}

impl Drop for EmuBuf {
    fn drop(&mut self) {
        self.state.allocs.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.addr());
        // SAFETY: allocated in `EmuState::alloc` with this layout.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), layout(self.bytes)) };
    }
}

fn guards_intact(addr: usize, bytes: usize) -> Option<&'static str> {
    // SAFETY: addr is the user region of a live EmuBuf (registered in `allocs` until its
    // drop, which takes the same lock as the caller), so both guard zones are mapped.
    let (before, after) = unsafe {
        (
            std::slice::from_raw_parts((addr - GUARD_BYTES) as *const u8, GUARD_BYTES),
            std::slice::from_raw_parts((addr + bytes) as *const u8, GUARD_BYTES),
        )
    };
    if before.iter().any(|&b| b != GUARD_BYTE) {
        Some("before the start")
    } else if after.iter().any(|&b| b != GUARD_BYTE) {
        Some("past the end")
    } else {
        None
    }
}

impl EmuState {
    /// A buffer of `bytes` (at least 1), zeroed or filled with [`UNINIT_BYTE`].
    pub(crate) fn alloc(
        self: &Arc<Self>,
        bytes: usize,
        zeroed: bool,
        what: String,
        site: &'static Location<'static>,
    ) -> Result<EmuBuf> {
        let n = bytes.max(1);
        // SAFETY: the layout has a non-zero size.
        let base = NonNull::new(unsafe { std::alloc::alloc(layout(n)) }).ok_or_else(|| Error::Emulator {
            kernel: "allocation".into(),
            message: format!("out of host memory for {n} bytes"),
        })?;
        // SAFETY: the allocation holds GUARD + n + GUARD bytes.
        unsafe {
            std::ptr::write_bytes(base.as_ptr(), GUARD_BYTE, GUARD_BYTES);
            std::ptr::write_bytes(base.as_ptr().add(GUARD_BYTES), if zeroed { 0 } else { UNINIT_BYTE }, n);
            std::ptr::write_bytes(base.as_ptr().add(GUARD_BYTES + n), GUARD_BYTE, GUARD_BYTES);
        }
        let buf = EmuBuf { base, bytes: n, state: self.clone() };
        self.allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(buf.addr(), Alloc { bytes: n, what, site });
        Ok(buf)
    }

    pub(crate) fn set_order(&self, blocks: EmuOrder, threads: EmuOrder) {
        *self.order.lock().unwrap_or_else(|p| p.into_inner()) = (blocks, threads);
    }

    #[cfg_attr(not(feature = "emu"), allow(dead_code))]
    pub(crate) fn order(&self) -> (EmuOrder, EmuOrder) {
        *self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks every live buffer's guard zones; `who` names the launch for the message.
    fn check_guards(&self, who: &str) -> Result<()> {
        let allocs = self.allocs.lock().unwrap_or_else(|p| p.into_inner());
        for (&addr, a) in allocs.iter() {
            if let Some(side) = guards_intact(addr, a.bytes) {
                return Err(Error::Emulator {
                    kernel: who.to_string(),
                    message: format!(
                        "out-of-bounds write {side} of the buffer {} allocated at {}:{}",
                        a.what,
                        a.site.file(),
                        a.site.line()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks that `[ptr, ptr + bytes)` lies inside one live buffer (for host-side
    /// operations such as the GEMM stand-in, which read through raw addresses).
    fn check_range(&self, who: &str, ptr: DevPtr, bytes: usize) -> Result<()> {
        let allocs = self.allocs.lock().unwrap_or_else(|p| p.into_inner());
        let p = ptr.0 as usize;
        let inside = allocs.range(..=p).next_back().is_some_and(|(&a, al)| p + bytes <= a + al.bytes);
        if inside {
            Ok(())
        } else {
            Err(Error::Emulator {
                kernel: who.to_string(),
                message: format!("{bytes} bytes at {p:#x} are not inside one live buffer"),
            })
        }
    }

    /// Runs one launch on the emulator, then checks every guard zone.
    pub(crate) fn launch(&self, l: &Launch) -> Result<()> {
        let _emulator = EMULATOR.lock().unwrap_or_else(|p| p.into_inner());
        self.run(l)?;
        self.check_guards(l.kernel.name)
    }

    #[cfg(feature = "emu")]
    fn run(&self, l: &Launch) -> Result<()> {
        let (blocks, threads) = self.order();
        let (bo, bs) = blocks.code();
        let (to, ts) = threads.code();
        let name = std::ffi::CString::new(l.kernel.name).expect("kernel names have no NUL");
        let mut err = vec![0u8; 1024];
        let args = l.arg_bytes();
        // SAFETY: the emulator reads `args_len` bytes of args, writes at most err_len bytes
        // of message, and runs the kernel on the buffers whose addresses the argument struct
        // holds: live EmuBufs (the caller keeps them alive through the call, which returns
        // only when the grid has finished). The EMULATOR lock serializes its globals.
        let rc = unsafe {
            ffi::fc_emu_set_order(bo, to, bs ^ ts.rotate_left(32));
            ffi::fc_emu_launch(
                name.as_ptr(),
                l.grid.as_ptr(),
                l.block.as_ptr(),
                l.smem as usize,
                args.as_ptr(),
                args.len(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        Err(Error::Emulator {
            kernel: l.kernel.name.to_string(),
            message: String::from_utf8_lossy(&err[..end]).into_owned(),
        })
    }

    #[cfg(not(feature = "emu"))]
    fn run(&self, l: &Launch) -> Result<()> {
        Err(Error::Emulator { kernel: l.kernel.name.to_string(), message: NOT_BUILT.into() })
    }
}

/// Why an emulated device cannot be opened in this build.
pub const NOT_BUILT: &str =
    "featcloud was built without the CPU emulator (cargo feature `emu`; needs a C++17 compiler)";

/// The element types the GEMM stand-in reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmInput {
    F32,
    BF16,
    F16,
}

impl GemmInput {
    fn size(self) -> usize {
        match self {
            GemmInput::F32 => 4,
            _ => 2,
        }
    }
    /// Element `i` of the array at `base` as f32 (exact widening).
    ///
    /// # Safety
    /// `base + i * size` must be readable.
    unsafe fn read(self, base: usize, i: usize) -> f32 {
        // SAFETY: per the contract.
        unsafe {
            match self {
                GemmInput::F32 => std::ptr::read_unaligned((base as *const f32).add(i)),
                GemmInput::BF16 => {
                    half::bf16::from_bits(std::ptr::read_unaligned((base as *const u16).add(i))).to_f32()
                }
                GemmInput::F16 => {
                    half::f16::from_bits(std::ptr::read_unaligned((base as *const u16).add(i))).to_f32()
                }
            }
        }
    }
}

/// `cublasGemmEx` with f32 output and compute on the emulated device:
/// `C = alpha op(A) op(B) + beta C` column-major along `plan` (see
/// [`ColGemm::eval_host`]), each dot product accumulated in f32 in ascending `l`
/// (cuBLAS's order is its own: results agree to rounding, not bitwise). With
/// `beta == 0` C is not read (cuBLAS's rule: NaN in C does not propagate).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    state: &EmuState,
    plan: &ColGemm,
    input: GemmInput,
    a: DevPtr,
    b: DevPtr,
    c: DevPtr,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let _emulator = EMULATOR.lock().unwrap_or_else(|p| p.into_inner());
    state.check_range("cuBLAS GemmEx stand-in (A)", a, plan.a_len() * input.size())?;
    state.check_range("cuBLAS GemmEx stand-in (B)", b, plan.b_len() * input.size())?;
    state.check_range("cuBLAS GemmEx stand-in (C)", c, plan.c_len() * 4)?;
    let (pa, pb, pc) = (a.0 as usize, b.0 as usize, c.0 as usize as *mut f32);
    for j in 0..plan.n {
        for i in 0..plan.m {
            let mut s = 0.0f32;
            for l in 0..plan.k {
                let ai = if plan.trans_a { l + i * plan.lda } else { i + l * plan.lda };
                let bi = if plan.trans_b { j + l * plan.ldb } else { l + j * plan.ldb };
                // SAFETY: ai < a_len and bi < b_len for every (i, j, l) of the plan, and both
                // ranges were checked to lie inside live buffers.
                s += unsafe { input.read(pa, ai) * input.read(pb, bi) };
            }
            let ci = i + j * plan.ldc;
            // SAFETY: ci < c_len, checked to lie inside a live buffer; C does not alias A or B
            // in any call site (each is a distinct allocation).
            unsafe {
                let old = if beta == 0.0 { 0.0 } else { beta * *pc.add(ci) };
                *pc.add(ci) = alpha * s + old;
            }
        }
    }
    state.check_guards("cuBLAS GemmEx stand-in")
}
