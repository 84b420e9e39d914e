//! The crate's error type: every fallible public function returns [`Result`].

use thiserror::Error;

/// Everything that can go wrong in featcloud, typed so callers can react.
#[derive(Debug, Error)]
pub enum Error {
    /// Tensor shapes do not fit together (message names the tensors).
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A dimension that must be positive is zero.
    #[error("empty input: {0}")]
    Empty(String),
    /// A label is >= C (negative labels mark ignored rows and are allowed).
    #[error("label {label} at row {row} is out of range for C = {classes}")]
    LabelOutOfRange {
        /// Row index.
        row: usize,
        /// The offending label.
        label: i64,
        /// Number of classes.
        classes: usize,
    },
    /// A NaN or infinity where finite values are required.
    #[error("non-finite value in {what} at index {index}")]
    NonFinite {
        /// Which tensor.
        what: String,
        /// Flat index of the first bad value.
        index: usize,
    },
    /// A training step met a NaN or infinity (`NonFinitePolicy::Error`): the step was not
    /// applied, so the model is as the step before left it, and a checkpoint on disk is the
    /// last one written before it.
    #[error(
        "training step {step}: {cause}; the step was not applied (--on-nonfinite skip-step skips such steps)"
    )]
    NonFiniteStep {
        /// 0-based index of the step.
        step: u64,
        /// What was non-finite (an [`Error::NonFinite`]).
        cause: Box<Error>,
    },
    /// An option is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The CUDA driver library could not be loaded.
    #[error("no CUDA driver: {0}")]
    NoDriver(String),
    /// The driver loaded but there is no usable device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// The device is older than the kernels support.
    #[error("GPU {name} has compute capability {major}.{minor}; featcloud kernels need 8.0 or newer")]
    UnsupportedDevice {
        /// Device name.
        name: String,
        /// Compute capability major.
        major: i32,
        /// Compute capability minor.
        minor: i32,
    },
    /// The crate was built without NVRTC, so no kernels are embedded.
    #[error("featcloud was built without CUDA kernels (NVRTC was not found at build time); rebuild with NVRTC available, see README")]
    KernelsNotBuilt,
    /// A CUDA driver call failed.
    #[error("CUDA error in {context}: {message}")]
    Cuda {
        /// What was being done (module/kernel name).
        context: String,
        /// The driver's message.
        message: String,
    },
    /// cuBLAS failed.
    #[error("cuBLAS error in {context}: {message}")]
    Cublas {
        /// What was being done.
        context: String,
        /// The library's message.
        message: String,
    },
    /// A launch was refused before it reached the device: its grid, block, shared
    /// memory or registers are outside what the kernel or the device allows.
    #[error("launch of {kernel} refused: {message}")]
    Launch {
        /// The entry point.
        kernel: String,
        /// Which limit was broken.
        message: String,
    },
    /// The emulated device caught a fault a GPU might not report: an out-of-bounds
    /// write into a guard zone, a divergent barrier, a misaligned async copy, ...
    #[error("emulated device: {kernel}: {message}")]
    Emulator {
        /// The entry point (or operation) that faulted.
        kernel: String,
        /// What the emulator saw.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A value could not be serialized (a tensor or metadata of a file being written).
    #[error("cannot serialize the {what}: {message}")]
    Serialize {
        /// What was being serialized (file kind and part, e.g. `checkpoint tensor 'head.w'`).
        what: String,
        /// The serializer's message.
        message: String,
    },
    /// A file exists but its contents are not what was expected.
    #[error("{path}: invalid file: {message}")]
    Format {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// Shorthand for `std::result::Result<T, featcloud::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl AsRef<std::path::Path>, err: impl std::fmt::Display) -> Self {
        Error::Io { path: path.as_ref().display().to_string(), message: err.to_string() }
    }

    /// A format error for a file.
    pub fn format(path: impl AsRef<std::path::Path>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.as_ref().display().to_string(), message: msg.into() }
    }
}
