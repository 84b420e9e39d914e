//! Optimizer configuration and the learning-rate schedule (linear warm-up, then cosine).

use crate::config::{finite_fields, invalid};
use crate::error::Result;
use serde::{Deserialize, Serialize};

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// SGD with (heavy-ball) momentum and L2 weight decay.
    #[default]
    Sgd,
    /// Adam with decoupled weight decay.
    #[value(name = "adamw")]
    AdamW,
}

/// Optimizer and schedule hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Update rule.
    pub kind: OptimizerKind,
    /// Peak learning rate.
    pub lr: f32,
    /// SGD momentum.
    pub momentum: f32,
    /// Weight decay (not applied to biases).
    pub weight_decay: f32,
    /// Adam beta1.
    pub beta1: f32,
    /// Adam beta2.
    pub beta2: f32,
    /// Adam epsilon.
    pub eps: f32,
    /// Linear learning-rate warm-up steps.
    pub warmup_steps: u64,
    /// Final learning rate as a fraction of the peak.
    pub min_lr_ratio: f32,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Sgd,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 100,
            min_lr_ratio: 0.0,
        }
    }
}

impl OptimizerConfig {
    /// Checks every option is finite and in range; errors name the field (`optim.lr`, ...).
    pub fn validate(&self) -> Result<()> {
        finite_fields(&[
            ("optim.lr", self.lr),
            ("optim.momentum", self.momentum),
            ("optim.weight_decay", self.weight_decay),
            ("optim.beta1", self.beta1),
            ("optim.beta2", self.beta2),
            ("optim.eps", self.eps),
            ("optim.min_lr_ratio", self.min_lr_ratio),
        ])?;
        if self.lr <= 0.0 {
            return Err(invalid("optim.lr", format!("must be > 0, got {}", self.lr)));
        }
        if self.weight_decay < 0.0 {
            return Err(invalid("optim.weight_decay", format!("must be >= 0, got {}", self.weight_decay)));
        }
        if self.eps <= 0.0 {
            return Err(invalid("optim.eps", format!("must be > 0, got {}", self.eps)));
        }
        let unit =
            [("optim.momentum", self.momentum), ("optim.beta1", self.beta1), ("optim.beta2", self.beta2)];
        if let Some((field, v)) = unit.iter().find(|(_, v)| !(0.0..1.0).contains(v)) {
            return Err(invalid(field, format!("must be in [0, 1), got {v}")));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(invalid(
                "optim.min_lr_ratio",
                format!("must be in [0, 1], got {}", self.min_lr_ratio),
            ));
        }
        Ok(())
    }

    /// Learning rate at 0-based `step` of `total` steps: linear warm-up from
    /// lr/warmup to lr, then cosine decay to `lr * min_lr_ratio` at the last step.
    pub fn lr_at(&self, step: u64, total: u64) -> f32 {
        let lr = self.lr as f64;
        let warm = self.warmup_steps.min(total);
        if step < warm {
            return (lr * (step + 1) as f64 / warm as f64) as f32;
        }
        let span = total.saturating_sub(warm).max(1) as f64;
        let progress = ((step - warm) as f64 / span).min(1.0);
        let min = lr * self.min_lr_ratio as f64;
        (min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let c = OptimizerConfig { warmup_steps: 10, lr: 1.0, ..Default::default() };
        assert!((c.lr_at(0, 100) - 0.1).abs() < 1e-6);
        assert!((c.lr_at(9, 100) - 1.0).abs() < 1e-6);
        assert!((c.lr_at(10, 100) - 1.0).abs() < 1e-6);
        assert!(c.lr_at(55, 100) < 0.6 && c.lr_at(55, 100) > 0.4);
        assert!(c.lr_at(99, 100) < 0.01);
    }
}
