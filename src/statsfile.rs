//! The statistics file: a [`StatsState`] as safetensors, so that a training run
//! can resume its class statistics and any implementation can load what another
//! saved (the CUDA [`ClassStats`](crate::cuda::stats::ClassStats) saves f32 state,
//! the CPU oracle f64).
//!
//! File layout (safetensors):
//! - tensors `mu`, `v` \[C\] and, with `center = ema`, `centers` \[C, D\] (\[C, K, D\]
//!   with K > 1 sub-centers, SPEC 5b), in F32 or F64
//!   (the precision of the state that was saved, so a save/load round trip is exact);
//!   `n` \[C\] U64; `initialized` \[C\] U8 (0/1); `class_counts` \[C\] U64 when configured;
//! - metadata `format` = [`FORMAT`], `config` (JSON of the [`StatsConfig`] without its
//!   class counts, which are the tensor above), `c`, `d`, `updates`, and `subcenters`
//!   when K > 1 (absent means 1, so a K = 1 file is byte for byte what it was before
//!   sub-centers existed).

use crate::config::{CenterMode, StatsConfig};
use crate::error::{Error, Result};
use crate::io::safetensors::{TensorReader, TensorWriter};
use crate::stats::StatsState;
use std::path::Path;

/// Format tag stored in the file's metadata.
pub const FORMAT: &str = "featcloud-stats-v1";

impl StatsState {
    fn writer(&self) -> Result<TensorWriter> {
        self.validate()?;
        let (c, d, p) = (self.c, self.d, self.precision);
        let mut w = TensorWriter::new("statistics file", FORMAT);
        w.floats("mu", &[c], &self.mu, p);
        w.floats("v", &[c], &self.v, p);
        w.u64s("n", &[c], &self.n);
        w.bools("initialized", &[c], &self.initialized);
        if self.cfg.center == CenterMode::Ema {
            w.floats("centers", &crate::shape::subcenter_shape(c, self.subcenters, d), &self.centers, p);
        }
        if let Some(counts) = &self.cfg.class_counts {
            w.u64s("class_counts", &[c], counts);
        }
        w.meta_json("config", &StatsConfig { class_counts: None, ..self.cfg.clone() })?;
        w.meta("c", c);
        w.meta("d", d);
        w.meta("updates", self.updates);
        if self.subcenters > 1 {
            w.meta("subcenters", self.subcenters);
        }
        Ok(w)
    }

    /// Serializes to safetensors bytes (validates first).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.writer()?.to_bytes()
    }

    /// Writes the state to `path` atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.writer()?.save(path)
    }

    /// Parses bytes written by [`StatsState::to_bytes`]; errors name the source as `<memory>`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, Path::new("<memory>"))
    }

    /// Reads a statistics file; any problem with the contents is an [`Error::Format`] naming `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, path)
    }

    fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let r = TensorReader::parse(bytes, path, FORMAT)?;
        let (c, d, updates) = (r.meta_u64("c")? as usize, r.meta_u64("d")? as usize, r.meta_u64("updates")?);
        // Absent means K = 1; a stored K is 2..=MAX_SUBCENTERS (validate checks the upper end).
        let subcenters = match r.has_meta("subcenters") {
            false => 1,
            true => match r.meta_u64("subcenters")? {
                k @ 2.. => usize::try_from(k).unwrap_or(usize::MAX),
                k => {
                    return Err(
                        r.bad(format!("metadata 'subcenters' = {k}: a K of 1 is stored by leaving it out"))
                    )
                }
            },
        };
        let mut cfg: StatsConfig = r.meta_json("config")?;
        let (precision, mu) = r.floats("mu", &[c])?;
        let (pv, v) = r.floats("v", &[c])?;
        let n = r.u64s("n", &[c])?;
        let initialized = r.bools("initialized", &[c])?;
        let mut precisions = vec![pv];
        let centers = match (cfg.center, r.has("centers")) {
            (CenterMode::Ema, true) => {
                let (pc, centers) = r.floats("centers", &crate::shape::subcenter_shape(c, subcenters, d))?;
                precisions.push(pc);
                centers
            }
            (CenterMode::Ema, false) => return Err(r.bad("tensor 'centers' is missing (center = ema)")),
            (CenterMode::ClassWeight, true) => {
                return Err(r.bad("tensor 'centers' present but center = class_weight"))
            }
            (CenterMode::ClassWeight, false) => Vec::new(),
        };
        if precisions.iter().any(|&p| p != precision) {
            return Err(r.bad("mu, v and centers are stored with different float dtypes"));
        }
        if cfg.class_counts.is_some() {
            return Err(r.bad("metadata 'config' carries class_counts; they belong in the tensor"));
        }
        if r.has("class_counts") {
            cfg.class_counts = Some(r.u64s("class_counts", &[c])?);
        }
        let state = Self { cfg, c, d, subcenters, centers, mu, v, n, initialized, updates, precision };
        state.validate().map_err(|e| r.bad(e.to_string()))?;
        Ok(state)
    }
}
