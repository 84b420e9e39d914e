//! The host copy of the LEAP class statistics (SPEC section 5): one type for the
//! f64 oracle, the CPU backend, the engine's checkpoints, the statistics file and
//! the device statistics' snapshots.
//!
//! - [`StatsState`]: the per-class state and its configuration; its f64 update
//!   rules and the cloud std are the oracle ([`crate::oracle::stats`]); the file
//!   format is [`crate::statsfile`]; the device twin is
//!   [`ClassStats`](crate::cuda::stats::ClassStats), which converts to and from it;
//! - [`StatsSummary`]: per-class and head/tail aggregates for reports.

use crate::config::{CenterMode, Split, StatsConfig, MAX_SUBCENTERS};
use crate::error::{Error, Result};
use serde::Serialize;

pub use crate::io::safetensors::Precision;

/// The full state of the class statistics on the host.
///
/// Per class k: a unit center (EMA mode only), EMA moments mu_k = `E[a]`,
/// v_k = `E[a^2]` of the angle a to the center, a sample count n_k and an
/// initialized flag. Values are held as f64 whatever their origin; with
/// [`Precision::F32`] (a device snapshot) every value is an exact f32.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsState {
    /// Configuration (its `class_counts` included).
    pub cfg: StatsConfig,
    /// Number of classes C.
    pub c: usize,
    /// Embedding dimension D.
    pub d: usize,
    /// Sub-centers per class K (SPEC 5b; 1 for the plain head).
    pub subcenters: usize,
    /// Unit centers `[C, K, D]`, one per sub-center (center = ema; a sub-center no
    /// sample has picked yet holds zeros); empty for center = class_weight.
    pub centers: Vec<f64>,
    /// EMA mean angle per class `[C]`.
    pub mu: Vec<f64>,
    /// EMA mean squared angle per class `[C]`.
    pub v: Vec<f64>,
    /// Samples seen per class `[C]`.
    pub n: Vec<u64>,
    /// Whether class k has been seen at least once `[C]`.
    pub initialized: Vec<bool>,
    /// Update calls so far (drives the warm-up).
    pub updates: u64,
    /// Precision of the state, and of the floats in a saved statistics file.
    pub precision: Precision,
}

impl StatsState {
    /// Empty statistics for `c` classes of dimension `d` (f64 precision); errors if
    /// `cfg` is invalid or c, d = 0.
    pub fn new(c: usize, d: usize, cfg: StatsConfig) -> Result<Self> {
        Self::with_subcenters(c, 1, d, cfg)
    }

    /// Empty statistics for `c` classes of `k` sub-centers each (SPEC 5b) and
    /// dimension `d`; errors as [`StatsState::new`] and unless `k` is in
    /// `1..=MAX_SUBCENTERS`.
    pub fn with_subcenters(c: usize, k: usize, d: usize, cfg: StatsConfig) -> Result<Self> {
        let centers = match cfg.center {
            CenterMode::Ema => vec![0.0; c.saturating_mul(k).saturating_mul(d)],
            CenterMode::ClassWeight => Vec::new(),
        };
        let state = Self {
            cfg,
            c,
            d,
            subcenters: k,
            centers,
            mu: vec![0.0; c],
            v: vec![0.0; c],
            n: vec![0; c],
            initialized: vec![false; c],
            updates: 0,
            precision: Precision::F64,
        };
        state.validate()?;
        Ok(state)
    }

    /// Checks sizes, configuration, finiteness and that `initialized[k]` is `n[k] > 0`.
    pub fn validate(&self) -> Result<()> {
        let (c, d) = (self.c, self.d);
        if c == 0 || d == 0 {
            return Err(Error::Empty(format!("statistics need C > 0 and D > 0, got C={c}, D={d}")));
        }
        self.cfg.validate(c)?;
        if !(1..=MAX_SUBCENTERS as usize).contains(&self.subcenters) {
            return Err(Error::InvalidConfig(format!(
                "statistics: subcenters must be in 1..={MAX_SUBCENTERS}, got {}",
                self.subcenters
            )));
        }
        for (name, len) in [("mu", self.mu.len()), ("v", self.v.len()), ("n", self.n.len())] {
            if len != c {
                return Err(Error::Shape(format!("{name} has {len} entries, expected C = {c}")));
            }
        }
        if self.initialized.len() != c {
            return Err(Error::Shape(format!(
                "initialized has {} entries, expected C = {c}",
                self.initialized.len()
            )));
        }
        let want_centers = match self.cfg.center {
            CenterMode::Ema => c * self.subcenters * d,
            CenterMode::ClassWeight => 0,
        };
        if self.centers.len() != want_centers {
            return Err(Error::Shape(format!(
                "centers has {} entries, expected {want_centers} (C = {c}, K = {}, D = {d}, center = {:?})",
                self.centers.len(),
                self.subcenters,
                self.cfg.center
            )));
        }
        for (name, vals) in [("mu", &self.mu), ("v", &self.v), ("centers", &self.centers)] {
            if let Some(index) = vals.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFinite { what: name.into(), index });
            }
        }
        if let Some(k) = (0..c).find(|&k| self.initialized[k] != (self.n[k] > 0)) {
            return Err(Error::InvalidConfig(format!(
                "class {k}: initialized = {} but n = {}",
                self.initialized[k], self.n[k]
            )));
        }
        Ok(())
    }
}

/// One class in a [`StatsSummary`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassSummary {
    /// Class index.
    pub class: usize,
    /// Samples seen so far, n_k.
    pub seen: u64,
    /// N_k used for the split: the dataset count when configured, else n_k.
    pub count: u64,
    /// Whether the class has been seen.
    pub initialized: bool,
    /// EMA mean angle mu_k (radians; 0 if never seen).
    pub mean_angle: f64,
    /// Angular std sqrt(var_k) (radians; 0 if never seen).
    pub angular_std: f64,
    /// `sigma_cloud[k]` (radians).
    pub cloud_std: f64,
    /// Counted as a head class (see [`StatsSummary`]).
    pub head: bool,
}

/// Aggregates over the head or the tail classes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GroupSummary {
    /// Classes in the group.
    pub classes: usize,
    /// Of those, classes seen at least once.
    pub seen_classes: usize,
    /// Samples seen, summed over the group.
    pub samples: u64,
    /// Mean of mu_k over the seen classes (0 if none).
    pub mean_angle: f64,
    /// Mean of sqrt(var_k) over the seen classes (0 if none).
    pub mean_angular_std: f64,
    /// Mean of sigma_cloud over all classes of the group (0 if empty).
    pub mean_cloud_std: f64,
    /// Largest sigma_cloud in the group.
    pub max_cloud_std: f64,
}

/// Per-class statistics and head/tail aggregates, for reports.
///
/// Head classes: threshold(T) mode, initialized classes with N_k >= T (those that
/// define var_h); adaptive mode, initialized classes whose var_k >= var_h (those
/// that get no cloud); none while there is no head variance. Every other class
/// is tail.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatsSummary {
    /// Update calls so far.
    pub updates: u64,
    /// The warm-up is over (`updates >= warmup_steps`).
    pub warm: bool,
    /// var_h, or `None` while no head class exists.
    pub head_variance: Option<f64>,
    /// Per class, in class order.
    pub classes: Vec<ClassSummary>,
    /// Aggregates over the head classes.
    pub head: GroupSummary,
    /// Aggregates over the tail classes.
    pub tail: GroupSummary,
}

impl StatsSummary {
    /// Summary of `snap` with the cloud std and head variance an implementation computed.
    pub fn new(snap: &StatsState, cloud_std: &[f64], head_variance: Option<f64>) -> Result<Self> {
        snap.validate()?;
        if cloud_std.len() != snap.c {
            return Err(Error::Shape(format!(
                "cloud_std has {} entries, expected C = {}",
                cloud_std.len(),
                snap.c
            )));
        }
        let counts = snap.counts();
        let variances = snap.variances();
        let classes: Vec<ClassSummary> = (0..snap.c)
            .map(|k| {
                let init = snap.initialized[k];
                let var = variances[k];
                let head = init
                    && match (snap.cfg.split, head_variance) {
                        (_, None) => false,
                        (Split::Threshold(t), Some(_)) => counts[k] >= t,
                        (Split::Adaptive, Some(var_h)) => var >= var_h,
                    };
                ClassSummary {
                    class: k,
                    seen: snap.n[k],
                    count: counts[k],
                    initialized: init,
                    mean_angle: if init { snap.mu[k] } else { 0.0 },
                    angular_std: var.sqrt(),
                    cloud_std: cloud_std[k],
                    head,
                }
            })
            .collect();
        let group = |head: bool| {
            let members: Vec<&ClassSummary> = classes.iter().filter(|s| s.head == head).collect();
            let seen: Vec<&&ClassSummary> = members.iter().filter(|s| s.initialized).collect();
            let mean = |v: Vec<f64>| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
            GroupSummary {
                classes: members.len(),
                seen_classes: seen.len(),
                samples: members.iter().map(|s| s.seen).sum(),
                mean_angle: mean(seen.iter().map(|s| s.mean_angle).collect()),
                mean_angular_std: mean(seen.iter().map(|s| s.angular_std).collect()),
                mean_cloud_std: mean(members.iter().map(|s| s.cloud_std).collect()),
                max_cloud_std: members.iter().map(|s| s.cloud_std).fold(0.0, f64::max),
            }
        };
        let (head, tail) = (group(true), group(false));
        Ok(Self {
            updates: snap.updates,
            warm: snap.updates >= snap.cfg.warmup_steps,
            head_variance,
            classes,
            head,
            tail,
        })
    }
}
