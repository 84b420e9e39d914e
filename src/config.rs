//! Options of the margin head and of the LEAP statistics (SPEC sections 2 and 5).
//!
//! These types are shared by every implementation (oracle, CPU backend, CUDA
//! paths) so that one configuration means the same math everywhere. The enums
//! are also the command line's option values (`clap::ValueEnum`, kebab-case
//! spellings: `one-sided`, `straight-through`, ...), and `validate` is the only
//! place options are checked: errors name the field (`head.s`), which the CLI
//! translates to its flag.

use crate::error::{Error, Result};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// How the feature cloud perturbs the target angle (SPEC section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum MarginGrad {
    /// d t_i / d c_iy exactly as the forward defines it.
    #[default]
    Exact,
    /// dt_i = 1 everywhere (current insightface).
    StraightThrough,
}

/// What happens when phi_i leaves [0, pi] (SPEC section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Classic ArcFace linear fallback `c - m3 - delta*sin(delta)` above pi.
    #[default]
    Linear,
    /// Clamp phi_i to [0, pi] (zero gradient outside).
    Clamp,
    /// No fallback: `cos(phi) - m3` for every phi, with its exact derivative, as
    /// current insightface (`CombinedMarginLoss`) and pytorch-metric-learning's
    /// `ArcFaceLoss` compute it; past pi the target logit grows again as theta grows.
    None,
}

impl Fallback {
    /// Every fallback, for tests and tools that cover them all (clap's `value_variants`
    /// lists the same set; the test below checks that they agree).
    pub const ALL: [Fallback; 3] = [Fallback::Linear, Fallback::Clamp, Fallback::None];
}

/// The most sub-centers per class [`HeadConfig::subcenters`] takes (Sub-center ArcFace
/// uses 3; more than a few only splits the data of a class further).
pub const MAX_SUBCENTERS: u32 = 16;

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
    /// Sub-centers per class K (SPEC 5b; default 1, today's head): W is `[C, K, D]` and each
    /// class's cosine is its closest sub-center's. Left out of serialized configurations
    /// when it is 1, so K = 1 checkpoints are byte for byte what they were before it existed.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub subcenters: u32,
}

/// The serde default of [`HeadConfig::subcenters`] (configurations saved before it existed).
fn one() -> u32 {
    1
}

/// Whether [`HeadConfig::subcenters`] is the default 1 (then it is not serialized).
fn is_one(k: &u32) -> bool {
    *k == 1
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
            subcenters: 1,
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

    /// Checks that every option is finite and in range; errors name the field
    /// (`head.s`, `head.label_smoothing`, ...).
    pub fn validate(&self) -> Result<()> {
        finite_fields(&[
            ("head.s", self.s),
            ("head.m1", self.m1),
            ("head.m2", self.m2),
            ("head.m3", self.m3),
            ("head.label_smoothing", self.label_smoothing),
        ])?;
        if self.s <= 0.0 {
            return Err(invalid("head.s", format!("must be > 0, got {}", self.s)));
        }
        if !(1..=MAX_SUBCENTERS).contains(&self.subcenters) {
            return Err(invalid(
                "head.subcenters",
                format!("must be in 1..={MAX_SUBCENTERS}, got {}", self.subcenters),
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(invalid(
                "head.label_smoothing",
                format!("must be in [0, 1), got {}", self.label_smoothing),
            ));
        }
        Ok(())
    }
}

/// The first non-finite `(field, value)` as an [`invalid`] error.
pub fn finite_fields(fields: &[(&str, f32)]) -> Result<()> {
    match fields.iter().find(|(_, v)| !v.is_finite()) {
        Some((field, v)) => Err(invalid(field, format!("must be finite, got {v}"))),
        None => Ok(()),
    }
}

/// An [`Error::InvalidConfig`] that names the configuration field it is about
/// (`<section>.<field>`, e.g. `head.s`), so that a front end (the CLI) can say
/// which of its own options that is.
pub fn invalid(field: &str, rule: impl std::fmt::Display) -> Error {
    Error::InvalidConfig(format!("{field} {rule}"))
}

/// Which vector is the class center for the angular statistics (SPEC section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
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

/// The kind of a [`Split`] without its threshold (the `--split` option; the
/// threshold is its own option).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SplitKind {
    /// Head = classes with at least T samples; only tail classes get a cloud.
    Threshold,
    /// Count-weighted head variance; every class below it gets a cloud.
    Adaptive,
}

impl Split {
    /// The split of `kind`, with head threshold `threshold` for [`SplitKind::Threshold`].
    pub fn new(kind: SplitKind, threshold: u64) -> Self {
        match kind {
            SplitKind::Threshold => Split::Threshold(threshold),
            SplitKind::Adaptive => Split::Adaptive,
        }
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
    /// Checks every option that does not depend on the number of classes.
    pub fn validate_options(&self) -> Result<()> {
        if !(self.beta.is_finite() && (0.0..1.0).contains(&self.beta)) {
            return Err(invalid("stats.beta", format!("must be in [0, 1), got {}", self.beta)));
        }
        if let Split::Threshold(0) = self.split {
            return Err(invalid("stats.split.threshold", "must be > 0"));
        }
        Ok(())
    }

    /// Errors unless the statistics' center is `center`: an EMA-center update
    /// needs the batch features, a class-weight update the head's target angles.
    pub fn require_center(&self, center: CenterMode) -> Result<()> {
        if self.center == center {
            return Ok(());
        }
        Err(Error::InvalidConfig(
            match self.center {
                CenterMode::Ema => {
                    "center = ema: update the statistics from the batch features, not the head's target angles"
                }
                CenterMode::ClassWeight => {
                    "center = class_weight: update the statistics from the head's target angles, not the batch features"
                }
            }
            .into(),
        ))
    }

    /// Errors unless a class-weight update from target angles is allowed (the
    /// center is `class_weight`) and there is one angle per label.
    pub fn check_angle_update(&self, n_angles: usize, n_labels: usize) -> Result<()> {
        self.require_center(CenterMode::ClassWeight)?;
        if n_angles != n_labels {
            return Err(Error::Shape(format!(
                "stats update: {n_angles} target angles for B = {n_labels} labels"
            )));
        }
        Ok(())
    }

    /// Checks the configuration against the number of classes.
    pub fn validate(&self, num_classes: usize) -> Result<()> {
        self.validate_options()?;
        if let Some(counts) = &self.class_counts {
            if counts.len() != num_classes {
                return Err(invalid(
                    "stats.class_counts",
                    format!("has {} entries, expected C = {num_classes}", counts.len()),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_all_is_every_variant() {
        assert_eq!(Fallback::ALL.as_slice(), Fallback::value_variants());
    }
}
