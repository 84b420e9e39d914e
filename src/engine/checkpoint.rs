//! Checkpoints: one safetensors file with the model, the head, the optimizer
//! state and the class statistics as tensors, and the configuration, step and
//! data fingerprint as metadata. Written atomically (temp file + rename).
//!
//! Tensors: `mlp.w1` `[H, F]`, `mlp.b1` `[H]`, `mlp.w2` `[D, H]`, `mlp.b2` `[D]`,
//! `head.w` [C, D] (f32; `[C, K, D]` with K sub-centers per class, SPEC 5b); `optim.<param>.<i>` (f32, the optimizer's state
//! buffers); `stats.mu`, `stats.v` `[C]` (f64), `stats.n` `[C]` (u64),
//! `stats.initialized` `[C]` (u8), `stats.centers` `[C, D]` (f64, EMA mode only; `[C, K, D]` with K sub-centers,
//! K being the configuration's `head.subcenters`).

use crate::engine::config::TrainConfig;
use crate::error::{Error, Result};
use crate::io::safetensors::{Precision, TensorReader, TensorWriter};
use crate::stats::StatsState;
use std::path::Path;

/// Format tag stored in the metadata.
pub const FORMAT: &str = "featcloud-checkpoint-v1";

/// A named f32 tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Tensor name, e.g. `head.w`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Everything needed to continue a run exactly.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The run's configuration.
    pub config: TrainConfig,
    /// Steps taken.
    pub step: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
    /// Input dimension F.
    pub input_dim: usize,
    /// Classes C.
    pub num_classes: usize,
    /// Training rows.
    pub n_train: usize,
    /// Fingerprint of the training data ([`crate::engine::train::fingerprint`]).
    pub fingerprint: u64,
    /// Model parameters.
    pub params: Vec<NamedTensor>,
    /// Optimizer state buffers.
    pub optim: Vec<NamedTensor>,
    /// Class statistics (their configuration is `config.stats`).
    pub stats: StatsState,
}

/// Prefixes of the f32 tensors: model parameters and optimizer state.
const PARAM_PREFIXES: [&str; 2] = ["mlp.", "head."];
const OPTIM_PREFIX: &str = "optim.";

impl Checkpoint {
    fn writer(&self) -> Result<TensorWriter> {
        let mut w = TensorWriter::new("checkpoint", FORMAT);
        for t in self.params.iter().chain(&self.optim) {
            w.f32s(&t.name, &t.shape, &t.data);
        }
        // The statistics are always stored as f64 (exact for f32 device state too).
        let s = &self.stats;
        w.floats("stats.mu", &[s.c], &s.mu, Precision::F64);
        w.floats("stats.v", &[s.c], &s.v, Precision::F64);
        w.u64s("stats.n", &[s.c], &s.n);
        w.bools("stats.initialized", &[s.c], &s.initialized);
        if !s.centers.is_empty() {
            w.floats(
                "stats.centers",
                &crate::shape::subcenter_shape(s.c, s.subcenters, s.d),
                &s.centers,
                Precision::F64,
            );
        }
        w.meta_json("config", &self.config)?;
        let numbers = [
            ("step", self.step),
            ("total_steps", self.total_steps),
            ("seed", self.config.seed),
            ("input_dim", self.input_dim as u64),
            ("num_classes", self.num_classes as u64),
            ("n_train", self.n_train as u64),
            ("fingerprint", self.fingerprint),
            ("stats.c", s.c as u64),
            ("stats.d", s.d as u64),
            ("stats.updates", s.updates),
        ];
        for (key, v) in numbers {
            w.meta(key, v);
        }
        Ok(w)
    }

    /// Serializes to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.writer()?.to_bytes()
    }

    /// Writes the checkpoint to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.writer()?.save(path)
    }

    /// Reads a checkpoint; any problem is an error naming `path`. The configuration must
    /// pass [`TrainConfig::validate`] for the checkpoint's number of classes.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, path)
    }

    /// Parses safetensors bytes; errors name the source as `<memory>`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, Path::new("<memory>"))
    }

    fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let r = TensorReader::parse(bytes, path, FORMAT)?;
        let config: TrainConfig = r.meta_json("config")?;
        let num_classes = r.meta_u64("num_classes")? as usize;
        // A saved configuration passed this check when its run started (`Trainer::new`);
        // one that does not (a JSON number out of f32 range reads as infinity, say) is
        // refused here rather than trained with.
        config.validate(num_classes).map_err(|e| r.bad(format!("metadata 'config' is invalid: {e}")))?;
        let (c, d) = (r.meta_u64("stats.c")? as usize, r.meta_u64("stats.d")? as usize);
        let (mut params, mut optim) = (Vec::new(), Vec::new());
        for name in r.names() {
            let is_param = PARAM_PREFIXES.iter().any(|p| name.starts_with(p));
            if !is_param && !name.starts_with(OPTIM_PREFIX) {
                continue;
            }
            let (shape, data) = r.f32s(name)?;
            let t = NamedTensor { name: name.to_string(), shape, data };
            if is_param {
                params.push(t)
            } else {
                optim.push(t)
            }
        }
        let f64s = |name: &str, shape: &[usize]| r.floats(name, shape).map(|(_, v)| v);
        let k = config.head.subcenters as usize;
        let centers = match r.has("stats.centers") {
            true => f64s("stats.centers", &crate::shape::subcenter_shape(c, k, d))?,
            false => Vec::new(),
        };
        let stats = StatsState {
            cfg: config.stats.clone(),
            c,
            d,
            subcenters: k,
            mu: f64s("stats.mu", &[c])?,
            v: f64s("stats.v", &[c])?,
            n: r.u64s("stats.n", &[c])?,
            initialized: r.bools("stats.initialized", &[c])?,
            centers,
            updates: r.meta_u64("stats.updates")?,
            precision: Precision::F64,
        };
        Ok(Checkpoint {
            step: r.meta_u64("step")?,
            total_steps: r.meta_u64("total_steps")?,
            input_dim: r.meta_u64("input_dim")? as usize,
            num_classes,
            n_train: r.meta_u64("n_train")? as usize,
            fingerprint: r.meta_u64("fingerprint")?,
            config,
            params,
            optim,
            stats,
        })
    }
}
