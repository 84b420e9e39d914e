//! Options of the margin head and of the LEAP statistics (SPEC sections 2 and 5).
//!
//! These types are shared by every implementation (oracle, CPU backend, CUDA
//! paths) so that one configuration means the same math everywhere.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// How the feature cloud perturbs the target angle (SPEC section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CloudMode {
    /// No augmentation: alpha_i = 0.
    Off,
    /// `alpha_i = sigma_cloud[y_i] * eps_i`.
    #[default]
    Symmetric,
    /// `alpha_i = sigma_cloud[y_i] * |eps_i|` (only ever makes the target harder).
    OneSided,
}

/// How per-row losses are combined (SPEC section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// Mean over non-ignored rows.
    #[default]
    Mean,
    /// Sum over non-ignored rows.
    Sum,
    /// Per-row losses; the backward takes a per-row upstream gradient.
    None,
}

/// Gradient of the margin-transformed target logit (SPEC section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MarginGrad {
    /// d t_i / d c_iy exactly as the forward defines it.
    #[default]
    Exact,
    /// dt_i = 1 everywhere (current insightface).
    StraightThrough,
}

/// What happens when phi_i leaves [0, pi] (SPEC section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Classic ArcFace linear fallback `c - m3 - delta*sin(delta)` above pi.
    #[default]
    Linear,
    /// Clamp phi_i to [0, pi] (zero gradient outside).
    Clamp,
}

/// Configuration of the margin head: `t = cos(m1*theta + m2 + alpha) - m3`, logits scaled by `s`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    /// Logit scale s (default 64).
    pub s: f32,
    /// Multiplicative angular margin m1 (default 1.0).
    pub m1: f32,
    /// Additive angular margin m2 (default 0.5).
    pub m2: f32,
    /// Additive cosine margin m3 (default 0.0).
    pub m3: f32,
    /// Feature-cloud mode (default symmetric).
    pub cloud: CloudMode,
    /// Loss reduction (default mean).
    pub reduction: Reduction,
    /// Label smoothing ls in [0, 1) (default 0).
    pub label_smoothing: f32,
    /// Margin gradient mode (default exact).
    pub margin_grad: MarginGrad,
    /// Fallback mode (default linear).
    pub fallback: Fallback,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            s: 64.0,
            m1: 1.0,
            m2: 0.5,
            m3: 0.0,
            cloud: CloudMode::Symmetric,
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
            margin_grad: MarginGrad::Exact,
            fallback: Fallback::Linear,
        }
    }
}

impl HeadConfig {
    /// ArcFace: (m1, m2, m3) = (1, 0.5, 0).
    pub fn arcface() -> Self {
        Self::default()
    }

    /// CosFace: (m1, m2, m3) = (1, 0, 0.35).
    pub fn cosface() -> Self {
        Self { m2: 0.0, m3: 0.35, ..Self::default() }
    }

    /// Combined margin: (m1, m2, m3) = (1, 0.3, 0.2).
    pub fn combined() -> Self {
        Self { m2: 0.3, m3: 0.2, ..Self::default() }
    }

    /// Checks that every option is finite and in range.
    pub fn validate(&self) -> Result<()> {
        let finite = [self.s, self.m1, self.m2, self.m3, self.label_smoothing];
        if finite.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidConfig("head options must be finite".into()));
        }
        if self.s <= 0.0 {
            return Err(Error::InvalidConfig(format!("scale s must be > 0, got {}", self.s)));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(Error::InvalidConfig(format!(
                "label smoothing must be in [0, 1), got {}",
                self.label_smoothing
            )));
        }
        Ok(())
    }
}

/// Which vector is the class center for the angular statistics (SPEC section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CenterMode {
    /// EMA of the normalized batch features ([C, D] state).
    #[default]
    Ema,
    /// The normalized class weight wh_k (angle = theta_i from the forward).
    ClassWeight,
}

/// How head and tail classes are told apart (SPEC section 5).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Head = classes with count >= T; only tail classes get a cloud.
    Threshold(u64),
    /// var_h is the count-weighted mean variance; every class below it gets a cloud.
    Adaptive,
}

impl Default for Split {
    fn default() -> Self {
        Split::Threshold(100)
    }
}

/// Configuration of the LEAP class statistics (SPEC section 5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsConfig {
    /// EMA momentum beta in [0, 1) (default 0.9).
    pub beta: f32,
    /// Center used for the angles.
    pub center: CenterMode,
    /// Head/tail split.
    pub split: Split,
    /// Steps during which sigma_cloud is 0 everywhere (default 100).
    pub warmup_steps: u64,
    /// The dataset's class counts N_k, when known; else the running counts n_k are used.
    pub class_counts: Option<Vec<u64>>,
}

impl Default for StatsConfig {
    fn default() -> Self {
        Self {
            beta: 0.9,
            center: CenterMode::Ema,
            split: Split::default(),
            warmup_steps: 100,
            class_counts: None,
        }
    }
}

impl StatsConfig {
    /// Checks the configuration against the number of classes.
    pub fn validate(&self, num_classes: usize) -> Result<()> {
        if !(self.beta.is_finite() && (0.0..1.0).contains(&self.beta)) {
            return Err(Error::InvalidConfig(format!("beta must be in [0, 1), got {}", self.beta)));
        }
        if let Split::Threshold(0) = self.split {
            return Err(Error::InvalidConfig("threshold T must be > 0".into()));
        }
        if let Some(counts) = &self.class_counts {
            if counts.len() != num_classes {
                return Err(Error::InvalidConfig(format!(
                    "class_counts has {} entries, expected C = {}",
                    counts.len(),
                    num_classes
                )));
            }
        }
        Ok(())
    }
}

/// Storage dtype of x and W on the device (all accumulation is f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    /// 32-bit float.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Lower-case name used in kernel entry points and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// Rounds an f32 value to this dtype and back (what the device sees).
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::BF16 => half::bf16::from_f32(v).to_f32(),
            DType::F16 => half::f16::from_f32(v).to_f32(),
        }
    }
}
