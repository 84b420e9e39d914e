//! Host copy of the LEAP class statistics (SPEC section 5): the safetensors file
//! that lets a training run resume, and the per-class summary for reports.
//!
//! One format for every implementation: the CUDA [`ClassStats`](crate::cuda::stats::ClassStats)
//! (f32 state) and the CPU [`OracleStats`] (f64 state) both save a
//! [`StatsSnapshot`], and either can load what the other saved.
//!
//! File layout (safetensors):
//! - tensors `mu`, `v` \[C\] and, with `center = ema`, `centers` \[C, D\], in F32 or F64
//!   (the precision of the state that was saved, so a save/load round trip is exact);
//!   `n` \[C\] U64; `initialized` \[C\] U8 (0/1); `class_counts` \[C\] U64 when configured;
//! - metadata `format` = [`FORMAT`], `config` (JSON of the [`StatsConfig`] without its
//!   class counts, which are the tensor above), `c`, `d`, `updates`.

use crate::config::{CenterMode, Split, StatsConfig};
use crate::error::{Error, Result};
use crate::oracle::stats::OracleStats;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// Format tag stored in the file's metadata.
pub const FORMAT: &str = "featcloud-stats-v1";

/// Float precision of the saved moments and centers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// 32-bit floats (the device state).
    F32,
    /// 64-bit floats (the CPU oracle's state).
    F64,
}

/// The full state of the class statistics on the host.
///
/// Values are held as f64 whatever their origin; with [`Precision::F32`] every
/// value is an exact f32, and the file stores them as F32.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsSnapshot {
    /// Configuration (its `class_counts` included).
    pub cfg: StatsConfig,
    /// Number of classes C.
    pub c: usize,
    /// Embedding dimension D.
    pub d: usize,
    /// Unit class centers \[C, D\] (center = ema); empty for center = class_weight.
    pub centers: Vec<f64>,
    /// EMA mean angle per class \[C\].
    pub mu: Vec<f64>,
    /// EMA mean squared angle per class \[C\].
    pub v: Vec<f64>,
    /// Samples seen per class \[C\].
    pub n: Vec<u64>,
    /// Whether each class has been seen \[C\].
    pub initialized: Vec<bool>,
    /// Update calls so far (drives the warm-up).
    pub updates: u64,
    /// Precision of the state, and of the floats in a saved file.
    pub precision: Precision,
}

impl StatsSnapshot {
    /// The oracle's state (f64 precision).
    pub fn from_oracle(o: &OracleStats) -> Self {
        Self {
            cfg: o.cfg.clone(),
            c: o.c,
            d: o.d,
            centers: o.centers.clone(),
            mu: o.mu.clone(),
            v: o.v.clone(),
            n: o.n.clone(),
            initialized: o.initialized.clone(),
            updates: o.updates,
            precision: Precision::F64,
        }
    }

    /// An oracle holding this state (f32 snapshots widen exactly).
    pub fn to_oracle(&self) -> Result<OracleStats> {
        self.validate()?;
        let mut o = OracleStats::new(self.c, self.d, self.cfg.clone())?;
        o.centers.clone_from(&self.centers);
        o.mu.clone_from(&self.mu);
        o.v.clone_from(&self.v);
        o.n.clone_from(&self.n);
        o.initialized.clone_from(&self.initialized);
        o.updates = self.updates;
        Ok(o)
    }

    /// Checks sizes, configuration, finiteness and that `initialized[k]` is `n[k] > 0`.
    pub fn validate(&self) -> Result<()> {
        let (c, d) = (self.c, self.d);
        if c == 0 || d == 0 {
            return Err(Error::Empty(format!("statistics need C > 0 and D > 0, got C={c}, D={d}")));
        }
        self.cfg.validate(c)?;
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
            CenterMode::Ema => c * d,
            CenterMode::ClassWeight => 0,
        };
        if self.centers.len() != want_centers {
            return Err(Error::Shape(format!(
                "centers has {} entries, expected {want_centers} (C = {c}, D = {d}, center = {:?})",
                self.centers.len(),
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

    /// Serializes to safetensors bytes (validates first).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let (c, d) = (self.c, self.d);
        let floats = |v: &[f64]| -> (Dtype, Vec<u8>) {
            match self.precision {
                Precision::F32 => (Dtype::F32, v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect()),
                Precision::F64 => (Dtype::F64, v.iter().flat_map(|&x| x.to_le_bytes()).collect()),
            }
        };
        let u64s = |v: &[u64]| -> Vec<u8> { v.iter().flat_map(|&x| x.to_le_bytes()).collect() };
        let mut owned: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let (dt, b) = floats(&self.mu);
        owned.push(("mu", dt, vec![c], b));
        let (dt, b) = floats(&self.v);
        owned.push(("v", dt, vec![c], b));
        owned.push(("n", Dtype::U64, vec![c], u64s(&self.n)));
        owned.push(("initialized", Dtype::U8, vec![c], self.initialized.iter().map(|&b| b as u8).collect()));
        if self.cfg.center == CenterMode::Ema {
            let (dt, b) = floats(&self.centers);
            owned.push(("centers", dt, vec![c, d], b));
        }
        if let Some(counts) = &self.cfg.class_counts {
            owned.push(("class_counts", Dtype::U64, vec![c], u64s(counts)));
        }
        let views = owned
            .iter()
            .map(|(name, dt, shape, bytes)| {
                Ok((name.to_string(), TensorView::new(*dt, shape.clone(), bytes)?))
            })
            .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| Error::Shape(format!("statistics tensor: {e}")))?;
        let cfg = StatsConfig { class_counts: None, ..self.cfg.clone() };
        let config = serde_json::to_string(&cfg).map_err(|e| {
            Error::InvalidConfig(format!("cannot serialize the statistics configuration: {e}"))
        })?;
        let meta: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("config", config),
            ("c", c.to_string()),
            ("d", d.to_string()),
            ("updates", self.updates.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize(views, Some(meta)).map_err(|e| Error::Shape(format!("statistics file: {e}")))
    }

    /// Parses bytes written by [`StatsSnapshot::to_bytes`]; errors name the source as `<memory>`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, Path::new("<memory>"))
    }

    /// Writes the snapshot to `path` atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        crate::io::write_atomic(path, &bytes)
    }

    /// Reads a snapshot; any problem with the contents is an [`Error::Format`] naming `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, path)
    }

    fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |m: String| Error::format(path, m);
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| meta.get(k).ok_or_else(|| bad(format!("metadata '{k}' is missing")));
        if get("format")? != FORMAT {
            return Err(bad(format!("format is '{}', expected '{FORMAT}'", get("format")?)));
        }
        let num = |k: &str| -> Result<u64> {
            get(k)?.parse::<u64>().map_err(|e| bad(format!("metadata '{k}' is not a number: {e}")))
        };
        let (c, d, updates) = (num("c")? as usize, num("d")? as usize, num("updates")?);
        let mut cfg: StatsConfig =
            serde_json::from_str(get("config")?).map_err(|e| bad(format!("metadata 'config': {e}")))?;

        let names = st.names();
        let has = |n: &str| names.contains(&n);
        let tensor = |name: &str, shape: &[usize]| -> Result<(Dtype, &[u8])> {
            let t = st.tensor(name).map_err(|_| bad(format!("tensor '{name}' is missing")))?;
            if t.shape() != shape {
                return Err(bad(format!("tensor '{name}' has shape {:?}, expected {shape:?}", t.shape())));
            }
            Ok((t.dtype(), t.data()))
        };
        let floats = |name: &str, shape: &[usize]| -> Result<(Precision, Vec<f64>)> {
            match tensor(name, shape)? {
                (Dtype::F32, b) => Ok((
                    Precision::F32,
                    b.chunks_exact(4).map(|w| f32::from_le_bytes(w.try_into().unwrap()) as f64).collect(),
                )),
                (Dtype::F64, b) => Ok((
                    Precision::F64,
                    b.chunks_exact(8).map(|w| f64::from_le_bytes(w.try_into().unwrap())).collect(),
                )),
                (dt, _) => Err(bad(format!("tensor '{name}' has dtype {dt:?}, expected F32 or F64"))),
            }
        };
        let u64s = |name: &str| -> Result<Vec<u64>> {
            match tensor(name, &[c])? {
                (Dtype::U64, b) => {
                    Ok(b.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect())
                }
                (dt, _) => Err(bad(format!("tensor '{name}' has dtype {dt:?}, expected U64"))),
            }
        };
        let (precision, mu) = floats("mu", &[c])?;
        let (pv, v) = floats("v", &[c])?;
        let n = u64s("n")?;
        let initialized = match tensor("initialized", &[c])? {
            (Dtype::U8, b) => {
                if let Some(i) = b.iter().position(|&x| x > 1) {
                    return Err(bad(format!("initialized[{i}] = {}, expected 0 or 1", b[i])));
                }
                b.iter().map(|&x| x == 1).collect()
            }
            (dt, _) => return Err(bad(format!("tensor 'initialized' has dtype {dt:?}, expected U8"))),
        };
        let mut precisions = vec![pv];
        let centers = match (cfg.center, has("centers")) {
            (CenterMode::Ema, true) => {
                let (pc, centers) = floats("centers", &[c, d])?;
                precisions.push(pc);
                centers
            }
            (CenterMode::Ema, false) => return Err(bad("tensor 'centers' is missing (center = ema)".into())),
            (CenterMode::ClassWeight, true) => {
                return Err(bad("tensor 'centers' present but center = class_weight".into()))
            }
            (CenterMode::ClassWeight, false) => Vec::new(),
        };
        if precisions.iter().any(|&p| p != precision) {
            return Err(bad("mu, v and centers are stored with different float dtypes".into()));
        }
        if cfg.class_counts.is_some() {
            return Err(bad("metadata 'config' carries class_counts; they belong in the tensor".into()));
        }
        if has("class_counts") {
            cfg.class_counts = Some(u64s("class_counts")?);
        }
        let snap = Self { cfg, c, d, centers, mu, v, n, initialized, updates, precision };
        snap.validate().map_err(|e| bad(e.to_string()))?;
        Ok(snap)
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
    pub fn new(snap: &StatsSnapshot, cloud_std: &[f64], head_variance: Option<f64>) -> Result<Self> {
        snap.validate()?;
        if cloud_std.len() != snap.c {
            return Err(Error::Shape(format!(
                "cloud_std has {} entries, expected C = {}",
                cloud_std.len(),
                snap.c
            )));
        }
        let counts = snap.cfg.class_counts.clone().unwrap_or_else(|| snap.n.clone());
        let classes: Vec<ClassSummary> = (0..snap.c)
            .map(|k| {
                let init = snap.initialized[k];
                let var = if init { (snap.v[k] - snap.mu[k] * snap.mu[k]).max(0.0) } else { 0.0 };
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

    /// Summary of the CPU oracle's state.
    pub fn from_oracle(o: &OracleStats) -> Result<Self> {
        Self::new(&StatsSnapshot::from_oracle(o), &o.cloud_sigma(), o.head_variance())
    }
}
