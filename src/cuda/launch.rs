//! The launch layer: every kernel launch is data.
//!
//! A [`Launch`] names the generated [`Kernel`] constant, the grid, the block, the
//! dynamic shared memory and the kernel's one argument: a `#[repr(C)]` struct
//! from [`super::args`], mirrored field for field in `kernels/args.cuh` (sizes and
//! offsets asserted on both sides). Planning functions build launches from shapes
//! and options without touching a device, so tests can check them on the host;
//! [`super::Device::launch`] is the one executor, on a GPU or on the emulated device.

use super::Kernel;

/// A device address as a kernel argument field (`T*` in CUDA). On the emulated
/// device it is a host address.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DevPtr(pub u64);

impl DevPtr {
    /// The null pointer (an optional input or output that is absent).
    pub const NULL: DevPtr = DevPtr(0);

    /// True for [`DevPtr::NULL`].
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
}

/// A kernel's argument struct.
///
/// # Safety
/// The implementing type must be `#[repr(C)]` with exactly the layout of the CUDA
/// struct its kernels take by value (asserted in `kernels/args.cuh` and next to the
/// Rust definition), and contain no padding (`Pod` already requires that).
pub unsafe trait KernelArgs: bytemuck::Pod {}

/// One kernel launch, as data.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The entry point.
    pub kernel: Kernel,
    /// Grid (x, y, z).
    pub grid: [u32; 3],
    /// Block (x, y, z).
    pub block: [u32; 3],
    /// Dynamic shared memory bytes.
    pub smem: u32,
    /// The bytes of the argument struct (8-byte aligned storage).
    args: Vec<u64>,
    args_len: usize,
    /// The Rust type of the argument struct (its last path segment is checked against
    /// the kernel's C++ parameter type before the launch).
    args_type: &'static str,
}

impl Launch {
    /// A launch of `kernel` over `grid` x `block` with `smem` bytes of dynamic shared
    /// memory and argument struct `args`.
    pub fn new<A: KernelArgs>(kernel: Kernel, grid: [u32; 3], block: [u32; 3], smem: u32, args: &A) -> Self {
        let bytes = bytemuck::bytes_of(args);
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self {
            kernel,
            grid,
            block,
            smem,
            args: words,
            args_len: bytes.len(),
            args_type: std::any::type_name::<A>(),
        }
    }

    /// A 1-D launch: `blocks` blocks of `threads` threads, no dynamic shared memory. A
    /// block count beyond u32 saturates (and the launch check refuses it).
    pub fn linear<A: KernelArgs>(kernel: Kernel, blocks: usize, threads: u32, args: &A) -> Self {
        Self::new(kernel, [u32::try_from(blocks).unwrap_or(u32::MAX), 1, 1], [threads, 1, 1], 0, args)
    }

    /// Whether the argument struct is the one the kernel takes (by name: `RowNormsArgs`
    /// in Rust for `RowNormsArgs<T>` in CUDA; kernels without a recorded name pass).
    pub fn args_match(&self) -> bool {
        self.kernel.args.is_empty() || self.args_type.rsplit("::").next() == Some(self.kernel.args)
    }

    /// The argument block's address (8-byte aligned), for the driver's parameter array.
    pub(crate) fn arg_ptr(&self) -> *const u64 {
        self.args.as_ptr()
    }

    /// The argument struct's bytes.
    pub fn arg_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.args)[..self.args_len]
    }

    /// The argument struct back as `A` (tests: which buffers a plan passes).
    /// `None` when the size differs.
    pub fn args_as<A: KernelArgs>(&self) -> Option<A> {
        (self.args_len == std::mem::size_of::<A>()).then(|| bytemuck::pod_read_unaligned(self.arg_bytes()))
    }

    /// Threads per block.
    pub fn threads(&self) -> u32 {
        self.block[0] * self.block[1] * self.block[2]
    }
}
