//! Checkpoints: one safetensors file with the model, the head, the optimizer
//! state and the class statistics as tensors, and the configuration, step and
//! data fingerprint as metadata. Written atomically (temp file + rename).
//!
//! Tensors: `mlp.w1` `[H, F]`, `mlp.b1` `[H]`, `mlp.w2` `[D, H]`, `mlp.b2` `[D]`,
//! `head.w` [C, D] (f32); `optim.<param>.<i>` (f32, the optimizer's state
//! buffers); `stats.mu`, `stats.v` `[C]` (f64), `stats.n` `[C]` (u64),
//! `stats.initialized` `[C]` (u8), `stats.centers` `[C, D]` (f64, EMA mode only).

use crate::engine::backend::StatsState;
use crate::engine::train::TrainConfig;
use crate::error::{Error, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
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
    /// Class statistics.
    pub stats: StatsState,
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

impl Checkpoint {
    /// Serializes to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for t in self.params.iter().chain(&self.optim) {
            owned.push((t.name.clone(), Dtype::F32, t.shape.clone(), le_bytes(&t.data, f32::to_le_bytes)));
        }
        let s = &self.stats;
        owned.push(("stats.mu".into(), Dtype::F64, vec![s.c], le_bytes(&s.mu, f64::to_le_bytes)));
        owned.push(("stats.v".into(), Dtype::F64, vec![s.c], le_bytes(&s.v, f64::to_le_bytes)));
        owned.push(("stats.n".into(), Dtype::U64, vec![s.c], le_bytes(&s.n, u64::to_le_bytes)));
        let init: Vec<u8> = s.initialized.iter().map(|&b| b as u8).collect();
        owned.push(("stats.initialized".into(), Dtype::U8, vec![s.c], init));
        if !s.centers.is_empty() {
            owned.push((
                "stats.centers".into(),
                Dtype::F64,
                vec![s.c, s.d],
                le_bytes(&s.centers, f64::to_le_bytes),
            ));
        }
        let views = owned
            .iter()
            .map(|(n, dt, shape, bytes)| Ok((n.clone(), TensorView::new(*dt, shape.clone(), bytes)?)))
            .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| Error::Shape(format!("checkpoint tensor: {e}")))?;
        let config = serde_json::to_string(&self.config)
            .map_err(|e| Error::InvalidConfig(format!("cannot serialize the configuration: {e}")))?;
        let meta: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("config", config),
            ("step", self.step.to_string()),
            ("total_steps", self.total_steps.to_string()),
            ("seed", self.config.seed.to_string()),
            ("input_dim", self.input_dim.to_string()),
            ("num_classes", self.num_classes.to_string()),
            ("n_train", self.n_train.to_string()),
            ("fingerprint", self.fingerprint.to_string()),
            ("stats.c", s.c.to_string()),
            ("stats.d", s.d.to_string()),
            ("stats.updates", s.updates.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize(views, Some(meta)).map_err(|e| Error::Shape(format!("checkpoint: {e}")))
    }

    /// Writes the checkpoint to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        crate::io::write_atomic(path, &bytes)
    }

    /// Reads a checkpoint; any problem is an error naming `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            Error::Format { message, .. } => Error::format(path, message),
            other => Error::format(path, other.to_string()),
        })
    }

    /// Parses safetensors bytes (errors carry an empty path; [`Checkpoint::load`] fills it in).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| Error::format("", m);
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k).ok_or_else(|| bad(format!("metadata has no '{k}' (not a featcloud checkpoint?)")))
        };
        if get("format")? != FORMAT {
            return Err(bad(format!("format is '{}', expected '{FORMAT}'", get("format")?)));
        }
        let num = |k: &str| -> Result<u64> {
            get(k)?.parse::<u64>().map_err(|_| bad(format!("metadata '{k}' is not a number")))
        };
        let config: TrainConfig = serde_json::from_str(get("config")?)
            .map_err(|e| bad(format!("metadata 'config' is invalid: {e}")))?;
        let (c, d) = (num("stats.c")? as usize, num("stats.d")? as usize);
        let read = |name: &str, dtype: Dtype, elem: usize| -> Result<(Vec<usize>, &[u8])> {
            let t = st.tensor(name).map_err(|_| bad(format!("missing tensor '{name}'")))?;
            if t.dtype() != dtype {
                return Err(bad(format!("tensor '{name}' has dtype {:?}, expected {dtype:?}", t.dtype())));
            }
            let n: usize = t.shape().iter().product();
            if t.data().len() != n * elem {
                return Err(bad(format!("tensor '{name}' has the wrong byte length")));
            }
            Ok((t.shape().to_vec(), t.data()))
        };
        let f32s = |b: &[u8]| {
            b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>()
        };
        let f64s = |b: &[u8]| {
            b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect::<Vec<_>>()
        };
        let mut params = Vec::new();
        let mut optim = Vec::new();
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        for name in names
            .iter()
            .filter(|n| n.starts_with("mlp.") || n.starts_with("head.") || n.starts_with("optim."))
        {
            let (shape, b) = read(name, Dtype::F32, 4)?;
            let data = f32s(b);
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!("tensor '{name}' has a non-finite value at index {i}")));
            }
            let t = NamedTensor { name: name.clone(), shape, data };
            if name.starts_with("optim.") {
                optim.push(t)
            } else {
                params.push(t)
            }
        }
        let vec_c = |name: &str, dtype: Dtype, elem: usize| -> Result<&[u8]> {
            let (shape, b) = read(name, dtype, elem)?;
            if shape != [c] {
                return Err(bad(format!("tensor '{name}' has shape {shape:?}, expected [{c}]")));
            }
            Ok(b)
        };
        let mu = f64s(vec_c("stats.mu", Dtype::F64, 8)?);
        let v = f64s(vec_c("stats.v", Dtype::F64, 8)?);
        let n = vec_c("stats.n", Dtype::U64, 8)?
            .chunks_exact(8)
            .map(|ch| u64::from_le_bytes(ch.try_into().unwrap_or([0; 8])))
            .collect();
        let initialized = vec_c("stats.initialized", Dtype::U8, 1)?.iter().map(|&b| b != 0).collect();
        let centers = if names.iter().any(|n| n == "stats.centers") {
            let (shape, b) = read("stats.centers", Dtype::F64, 8)?;
            if shape != [c, d] {
                return Err(bad(format!("tensor 'stats.centers' has shape {shape:?}, expected [{c}, {d}]")));
            }
            f64s(b)
        } else {
            Vec::new()
        };
        Ok(Checkpoint {
            config,
            step: num("step")?,
            total_steps: num("total_steps")?,
            input_dim: num("input_dim")? as usize,
            num_classes: num("num_classes")? as usize,
            n_train: num("n_train")? as usize,
            fingerprint: num("fingerprint")?,
            params,
            optim,
            stats: StatsState { c, d, mu, v, n, initialized, centers, updates: num("stats.updates")? },
        })
    }
}
