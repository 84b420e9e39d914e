//! The training engine: one loop, generic over a compute [`Backend`].
//!
//! - [`backend`]: the trait a backend implements (GEMM, bias/activation, head
//!   forward+backward, class statistics, optimizer step);
//! - [`config`]: [`TrainConfig`], everything that defines a run;
//! - [`model`]: the MLP + head parameters by name;
//! - [`train`]: the LEAP step order and the loop;
//! - [`optim`]: SGD with momentum / AdamW and the warm-up + cosine schedule;
//! - [`sampler`]: the seeded shuffling sampler;
//! - [`checkpoint`]: safetensors checkpoints for exact resume;
//! - [`report`]: evaluation of a trained model (closed set, open set, spread).

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod model;
pub mod optim;
pub mod report;
pub mod sampler;
pub mod train;

pub use crate::stats::StatsState;
pub use backend::{Activation, Backend, Gemm, HeadBatch, HeadStep, OptimStep};
pub use checkpoint::{Checkpoint, NamedTensor};
pub use config::{NonFinitePolicy, TrainConfig};
pub use optim::{OptimizerConfig, OptimizerKind};
pub use sampler::Sampler;
pub use train::{StepInfo, Trainer};
