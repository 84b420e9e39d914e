//! The configuration of a training run: model sizes, head, statistics, optimizer.
//!
//! Its own module so that the loop ([`crate::engine::train`]) and the checkpoint
//! ([`crate::engine::checkpoint`]), which both need it, do not need each other.

use crate::config::{invalid, HeadConfig, StatsConfig};
use crate::engine::optim::OptimizerConfig;
use crate::error::Result;
use serde::{Deserialize, Serialize};

/// Everything that defines a training run (saved in checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Seed of model init, sampler and cloud RNG.
    pub seed: u64,
    /// Passes over the training set.
    pub epochs: u64,
    /// Rows per step.
    pub batch_size: usize,
    /// Hidden width H of the MLP.
    pub hidden: usize,
    /// Embedding dimension D.
    pub embed_dim: usize,
    /// Margin head options.
    pub head: HeadConfig,
    /// LEAP statistics options (class counts are filled from the training set).
    pub stats: StatsConfig,
    /// Optimizer and learning-rate schedule.
    pub optim: OptimizerConfig,
    /// What a step that meets a NaN or infinity does (checkpoints older than this option
    /// load with the default, `error`).
    #[serde(default)]
    pub on_nonfinite: NonFinitePolicy,
}

/// What a training step does when the head reports a NaN or infinity (in its input, the
/// embeddings of valid rows; in its weights; or in the loss).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NonFinitePolicy {
    /// Stop with [`crate::Error::NonFiniteStep`], naming the step and what was non-finite.
    #[default]
    Error,
    /// Leave the step out (no statistics update, no optimizer step: the model stays as it
    /// was), count it, and go on with the next batch.
    SkipStep,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            epochs: 30,
            batch_size: 128,
            hidden: 256,
            embed_dim: 64,
            head: HeadConfig::default(),
            stats: StatsConfig::default(),
            optim: OptimizerConfig::default(),
            on_nonfinite: NonFinitePolicy::default(),
        }
    }
}

impl TrainConfig {
    /// Checks every option that does not depend on the data; errors name the
    /// field (`train.batch_size`, `head.s`, `stats.beta`, `optim.lr`, ...).
    pub fn validate_options(&self) -> Result<()> {
        let sizes = [
            ("train.epochs", self.epochs as usize),
            ("train.batch_size", self.batch_size),
            ("train.hidden", self.hidden),
            ("train.embed_dim", self.embed_dim),
        ];
        if let Some((field, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(field, "must be > 0"));
        }
        self.head.validate()?;
        self.stats.validate_options()?;
        self.optim.validate()
    }

    /// Checks every option for `num_classes` classes.
    pub fn validate(&self, num_classes: usize) -> Result<()> {
        self.validate_options()?;
        self.stats.validate(num_classes)
    }
}
