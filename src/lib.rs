//! featcloud: normalized-softmax margin heads (ArcFace / CosFace / combined) with
//! LEAP feature-cloud augmentation for long-tailed data, as hand-written CUDA
//! kernels with a CPU oracle, a CPU backend and a small training engine.
//!
//! The exact math is in `SPEC.md` (shipped as `docs/SPEC.md`); every
//! implementation in this crate computes it:
//! - [`oracle`]: plain f64 loops, the truth;
//! - [`cpu`]: the fast CPU backend;
//! - [`cuda`]: the reference and fused CUDA paths.
#![warn(missing_docs)]

pub mod check;
pub mod config;
pub mod dtype;
pub mod error;
pub mod oracle;
pub mod shape;
pub mod shard;
pub mod stats;

pub use config::{CenterMode, CloudMode, Fallback, HeadConfig, MarginGrad, Reduction, Split, StatsConfig};
pub use dtype::DType;
pub use error::{Error, Result};
pub use shape::HeadShape;
pub use stats::StatsState;
pub mod cli;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod engine;
pub mod eval;
pub mod io;
pub mod plot;
pub mod statsfile;
