//! One training step in the LEAP order of SPEC section 5, and the loop around it.
//!
//! Model ([`crate::engine::model`]): an MLP `x [B, F] -> e [B, D]`, then the
//! head W [C*K, D] on e (K sub-centers per class, SPEC 5b). Step t:
//! 1. sigma_cloud `[C]` from the current class statistics (0 during the warm-up);
//! 2. head forward + backward with that cloud at RNG (seed, t);
//! 3. statistics update with this batch's detached embeddings (EMA centers) or
//!    its target angles (class-weight centers);
//! 4. MLP backward;
//! 5. optimizer step with the scheduled learning rate.
//!
//! Everything a step reads is a function of (config, data, step, state), and the
//! state is saved whole in checkpoints, so k steps + resume == one straight run,
//! bitwise.

use crate::config::CloudMode;
use crate::data::Dataset;
use crate::engine::backend::{Backend, HeadBatch, OptimStep};
use crate::engine::checkpoint::{Checkpoint, NamedTensor};
use crate::engine::config::{NonFinitePolicy, TrainConfig};
use crate::engine::model::Model;
use crate::engine::sampler::Sampler;
use crate::error::{Error, Result};
use crate::shape::HeadShape;
use crate::stats::{Precision, StatsState};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// What one step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// 0-based index of the step just taken.
    pub step: u64,
    /// Total steps of the run.
    pub total_steps: u64,
    /// Batch loss.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f32,
    /// Rows in the batch.
    pub rows: usize,
    /// Largest sigma_cloud used this step (0 when the cloud is off or warming up).
    pub max_sigma: f32,
    /// The step met a NaN or infinity and was left out (`NonFinitePolicy::SkipStep`); its
    /// `loss` is NaN.
    pub skipped: bool,
}

/// FNV-1a over the training labels and feature bits: resuming on other data is an error.
pub fn fingerprint(ds: &Dataset) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u32| {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(ds.n as u32);
    eat(ds.f as u32);
    eat(ds.num_classes as u32);
    ds.labels.iter().for_each(|&y| eat(y as u32));
    ds.features.iter().for_each(|&x| eat(x.to_bits()));
    h
}

/// The checkpoint tensor called `name`.
fn find_tensor<'a>(list: &'a [NamedTensor], name: &str) -> Result<&'a NamedTensor> {
    list.iter()
        .find(|n| n.name == name)
        .ok_or_else(|| Error::InvalidConfig(format!("checkpoint has no tensor {name}")))
}

/// The training state on a backend: model, optimizer state, class statistics, step.
pub struct Trainer<'b, B: Backend> {
    backend: &'b B,
    cfg: TrainConfig,
    input_dim: usize,
    num_classes: usize,
    n_train: usize,
    fingerprint: u64,
    model: Model<B>,
    stats: B::Stats,
    sampler: Sampler,
    step: u64,
    total_steps: u64,
    skipped: u64,
}

impl<'b, B: Backend> Trainer<'b, B> {
    /// A fresh model for `train` (seeded init), with the class counts of `train`
    /// as the statistics' N_k.
    pub fn new(backend: &'b B, mut cfg: TrainConfig, train: &Dataset) -> Result<Self> {
        if train.n == 0 {
            return Err(Error::Empty("training set has no rows".into()));
        }
        cfg.stats.class_counts = Some(train.class_counts());
        cfg.validate(train.num_classes)?;
        let (f, h, d, c) = (train.f, cfg.hidden, cfg.embed_dim, train.num_classes);
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let k = cfg.head.subcenters as usize;
        let model = Model::new(backend, &mut rng, [f, h, d, c], k, cfg.optim.kind.state_count())?;
        let stats = backend.stats_new(c, k, d, &cfg.stats)?;
        let sampler = Sampler::new(train.n, cfg.batch_size, cfg.seed);
        let total_steps = cfg.epochs * sampler.steps_per_epoch();
        Ok(Self {
            backend,
            input_dim: f,
            num_classes: c,
            n_train: train.n,
            fingerprint: fingerprint(train),
            model,
            stats,
            sampler,
            step: 0,
            total_steps,
            skipped: 0,
            cfg,
        })
    }

    /// The run's configuration (with the class counts filled in).
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Steps of the whole run (epochs x batches per epoch).
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        self.backend
    }

    /// Embedding dimension D.
    pub fn embed_dim(&self) -> usize {
        self.cfg.embed_dim
    }

    /// Number of classes C.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Sub-centers per class K (SPEC 5b; 1 for the plain head).
    pub fn subcenters(&self) -> usize {
        self.cfg.head.subcenters as usize
    }

    fn check_data(&self, train: &Dataset) -> Result<()> {
        if train.f != self.input_dim || train.num_classes != self.num_classes || train.n != self.n_train {
            return Err(Error::Shape(format!(
                "training data is [{} x {}] with {} classes, the model expects [{} x {}] with {} classes",
                train.n, train.f, train.num_classes, self.n_train, self.input_dim, self.num_classes
            )));
        }
        if fingerprint(train) != self.fingerprint {
            return Err(Error::InvalidConfig(
                "training data differs from the data this run started on (fingerprint mismatch)".into(),
            ));
        }
        Ok(())
    }

    /// One training step on `train` (SPEC section 5 order).
    pub fn train_step(&mut self, train: &Dataset) -> Result<StepInfo> {
        let be = self.backend;
        let (f, d, c) = (self.input_dim, self.cfg.embed_dim, self.num_classes);
        let step = self.step;
        let idx = self.sampler.batch(step);
        let rows = idx.len();
        let mut xs = Vec::with_capacity(rows * f);
        let mut labels = Vec::with_capacity(rows);
        for &i in &idx {
            xs.extend_from_slice(train.row(i));
            labels.push(train.labels[i]);
        }
        let x = be.upload(&xs)?;
        let (hid, emb) = self.model.mlp_forward(be, &x, rows)?;

        // 1. The cloud from the statistics as they are before this batch.
        let mut sigma = be.zeros(c)?;
        let mut max_sigma = 0.0f32;
        if self.cfg.head.cloud != CloudMode::Off {
            be.stats_cloud_sigma(&self.stats, &mut sigma)?;
            max_sigma = be.download(&sigma)?.into_iter().fold(0.0, f32::max);
        }
        // 2. Head forward + backward at RNG (seed, step).
        let mut demb = be.zeros(rows * d)?;
        let shape = HeadShape { b: rows, c, d };
        let head_w = &mut self.model.head;
        let batch = HeadBatch {
            shape,
            x: &emb,
            w: &head_w.value,
            labels: &labels,
            sigma_cloud: &sigma,
            seed: self.cfg.seed,
            step,
        };
        // The head reports a NaN or infinity in its inputs (the CPU backend checks them, the
        // CUDA head looks when its loss is not finite) or its loss.
        let out = match be.head_forward_backward(&self.cfg.head, batch, &mut demb, &mut head_w.grad) {
            Ok(out) if out.loss.is_finite() => out,
            Ok(_) => {
                return self.non_finite(step, rows, Error::NonFinite { what: "the loss".into(), index: 0 })
            }
            Err(e @ Error::NonFinite { .. }) => return self.non_finite(step, rows, e),
            Err(e) => return Err(e),
        };
        // 3. Statistics with this batch (detached embeddings / target cosines).
        be.stats_update(&mut self.stats, &emb, &labels, &out)?;

        // 4. MLP backward.
        self.model.mlp_backward(be, &x, &hid, &emb, &mut demb, rows)?;

        // 5. Optimizer.
        let lr = self.cfg.optim.lr_at(step, self.total_steps);
        for p in self.model.params_mut() {
            let hp = OptimStep {
                lr,
                weight_decay: if p.decay { self.cfg.optim.weight_decay } else { 0.0 },
                t: step + 1,
            };
            be.optimizer_step(&self.cfg.optim, hp, &mut p.value, &p.grad, &mut p.state)?;
        }
        self.step += 1;
        Ok(StepInfo {
            step,
            total_steps: self.total_steps,
            loss: out.loss,
            lr,
            rows,
            max_sigma,
            skipped: false,
        })
    }

    /// Step `step` met `e` (an [`Error::NonFinite`]) before it changed anything: an error, or
    /// under `NonFinitePolicy::SkipStep` the step left out.
    fn non_finite(&mut self, step: u64, rows: usize, e: Error) -> Result<StepInfo> {
        match self.cfg.on_nonfinite {
            NonFinitePolicy::Error => Err(Error::NonFiniteStep { step, cause: Box::new(e) }),
            NonFinitePolicy::SkipStep => {
                // Skipping helps only while the model itself is finite (a NaN weight would make
                // every later step skip too, and the run end on a NaN checkpoint).
                if let Some(p) =
                    self.parameters()?.into_iter().find(|p| p.data.iter().any(|v| !v.is_finite()))
                {
                    let index = p.data.iter().position(|v| !v.is_finite()).unwrap_or(0);
                    let what = format!("the model's weights ('{}'; skipping steps cannot recover)", p.name);
                    return Err(Error::NonFiniteStep {
                        step,
                        cause: Box::new(Error::NonFinite { what, index }),
                    });
                }
                self.step += 1;
                self.skipped += 1;
                let lr = self.cfg.optim.lr_at(step, self.total_steps);
                Ok(StepInfo {
                    step,
                    total_steps: self.total_steps,
                    loss: f64::NAN,
                    lr,
                    rows,
                    max_sigma: 0.0,
                    skipped: true,
                })
            }
        }
    }

    /// Sets what a step that meets a NaN or infinity does from now on. A run-control option, not
    /// part of the model: `featcloud train --resume` applies the flag given then, not the
    /// checkpoint's (so a run stopped by a non-finite step can resume with `skip-step`).
    pub fn set_on_nonfinite(&mut self, policy: NonFinitePolicy) {
        self.cfg.on_nonfinite = policy;
    }

    /// Steps this trainer left out under `NonFinitePolicy::SkipStep` (since it was made or
    /// loaded).
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// Trains until `until` steps (capped at the run's total), calling `on_step` after each.
    pub fn run(&mut self, train: &Dataset, until: u64, mut on_step: impl FnMut(&StepInfo)) -> Result<()> {
        self.check_data(train)?;
        let until = until.min(self.total_steps);
        while self.step < until {
            let info = self.train_step(train)?;
            on_step(&info);
        }
        Ok(())
    }

    /// Embeddings [n, D] of `features` [n, F] (no cloud, no gradient), in chunks.
    pub fn embed(&self, features: &[f32]) -> Result<Vec<f32>> {
        let f = self.input_dim;
        if features.len() % f != 0 {
            return Err(Error::Shape(format!(
                "features have {} values, not a multiple of F = {f}",
                features.len()
            )));
        }
        let mut out = Vec::with_capacity(features.len() / f * self.cfg.embed_dim);
        for chunk in features.chunks(1024 * f) {
            let x = self.backend.upload(chunk)?;
            let (_, emb) = self.model.mlp_forward(self.backend, &x, chunk.len() / f)?;
            out.extend(self.backend.download(&emb)?);
        }
        Ok(out)
    }

    /// Head weights W `[C*K, D]` on the host (K = [`Trainer::subcenters`]; class j's
    /// sub-center k is row j*K + k).
    pub fn head_weights(&self) -> Result<Vec<f32>> {
        self.backend.download(&self.model.head.value)
    }

    /// Every parameter on the host, (name, shape, values), in a fixed order.
    pub fn parameters(&self) -> Result<Vec<NamedTensor>> {
        self.model
            .params()
            .into_iter()
            .map(|p| {
                Ok(NamedTensor {
                    name: p.name.to_string(),
                    shape: p.shape.clone(),
                    data: self.backend.download(&p.value)?,
                })
            })
            .collect()
    }

    /// The whole training state as a checkpoint.
    pub fn to_checkpoint(&self) -> Result<Checkpoint> {
        let mut optim = Vec::new();
        for p in self.model.params() {
            for (i, s) in p.state.iter().enumerate() {
                optim.push(NamedTensor {
                    name: format!("optim.{}.{i}", p.name),
                    shape: p.shape.clone(),
                    data: self.backend.download(s)?,
                });
            }
        }
        // Sorted by name, the order in which a loaded checkpoint lists them.
        optim.sort_by(|a, b| a.name.cmp(&b.name));
        let mut params = self.parameters()?;
        params.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Checkpoint {
            config: self.cfg.clone(),
            step: self.step,
            total_steps: self.total_steps,
            input_dim: self.input_dim,
            num_classes: self.num_classes,
            n_train: self.n_train,
            fingerprint: self.fingerprint,
            params,
            optim,
            // A checkpoint stores the moments in f64 (what `Checkpoint::load` reports),
            // whatever precision the backend keeps them in, so a saved and reloaded
            // checkpoint equals the one that was saved.
            stats: StatsState { precision: Precision::F64, ..self.backend.stats_export(&self.stats)? },
        })
    }

    /// Restores a run from a checkpoint; `train` must be the data it was trained on.
    pub fn from_checkpoint(backend: &'b B, ck: &Checkpoint, train: &Dataset) -> Result<Self> {
        if (ck.n_train, ck.input_dim, ck.num_classes) != (train.n, train.f, train.num_classes) {
            return Err(Error::Shape(format!(
                "the checkpoint was trained on {} rows x {} features with {} classes, this training data is {} x {} with {}",
                ck.n_train, ck.input_dim, ck.num_classes, train.n, train.f, train.num_classes
            )));
        }
        let mut t = Self::new(backend, ck.config.clone(), train)?;
        if ck.fingerprint != t.fingerprint {
            return Err(Error::InvalidConfig(
                "the training data has the checkpoint's shape but other values than the data it was trained on".into(),
            ));
        }
        if ck.step > t.total_steps {
            return Err(Error::InvalidConfig(format!(
                "checkpoint step {} > total steps {}",
                ck.step, t.total_steps
            )));
        }
        for p in t.model.params_mut() {
            let src = find_tensor(&ck.params, p.name)?;
            if src.shape != p.shape {
                return Err(Error::Shape(format!(
                    "checkpoint tensor {} has shape {:?}, expected {:?}",
                    p.name, src.shape, p.shape
                )));
            }
            p.value = backend.upload(&src.data)?;
            for (i, s) in p.state.iter_mut().enumerate() {
                let name = format!("optim.{}.{i}", p.name);
                let src = find_tensor(&ck.optim, &name)?;
                if src.data.len() != backend.len(s) {
                    return Err(Error::Shape(format!("checkpoint tensor {name} has the wrong size")));
                }
                *s = backend.upload(&src.data)?;
            }
        }
        t.stats = backend.stats_import(&StatsState { cfg: t.cfg.stats.clone(), ..ck.stats.clone() })?;
        t.step = ck.step;
        Ok(t)
    }
}
