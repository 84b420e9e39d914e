//! LEAP angular statistics and the per-class cloud std, in f64 (SPEC section 5).
//!
//! The rules are methods of the host state [`StatsState`] (see [`crate::stats`]):
//! per class k a unit center (EMA mode only), EMA moments mu_k = `E[a]`,
//! v_k = `E[a^2]` of the angle a between a normalized feature and the center, a
//! sample count n_k and an initialized flag. From the moments,
//! var_k = max(v_k - mu_k^2, 0), a head variance var_h and the cloud std
//! `sigma_cloud[k]` = sqrt(max(var_h - var_k, 0)) for the classes that get a cloud.
//!
//! Order inside a training step: [`StatsState::cloud_sigma`] from the current
//! state, then the head forward/backward with that cloud, then
//! [`StatsState::update`] (or [`StatsState::update_from_angles`]) with the batch.
//!
//! Conventions that the SPEC leaves to the implementation:
//! - classes of a batch are processed in ascending class order;
//! - the EMA-mode angle is `acos(clamp(xh_i . center_k, -1, 1))` with the
//!   center already updated by this batch;
//! - every successful update call counts as one step for the warm-up, even a
//!   batch whose rows are all ignored;
//! - in adaptive mode "a head class exists" means some initialized class has N_k > 0.

use crate::check::{check_finite_rows, check_labels};
use crate::config::{CenterMode, Split};
use crate::error::{Error, Result};
use crate::oracle::head::NORM_EPS;
use crate::stats::{StatsState, StatsSummary};

impl StatsState {
    /// EMA-center update from a batch of features x `[B, D]` (row-normalized here)
    /// and labels `[B]` (negative labels skipped). Only for `CenterMode::Ema` with
    /// one center per class; with sub-centers use [`StatsState::update_subcenters`].
    pub fn update(&mut self, x: &[f32], labels: &[i32]) -> Result<()> {
        if self.subcenters != 1 {
            return Err(Error::InvalidConfig(format!(
                "the statistics have {} sub-centers per class: update them with each row's target sub-center (update_subcenters)",
                self.subcenters
            )));
        }
        self.update_subcenters(x, labels, &vec![0; labels.len()])
    }

    /// EMA-center update with sub-centers (SPEC 5b): as [`StatsState::update`], where
    /// row i of class y updates and is measured from center `(y, k_iy[i])`, its
    /// target's dominant sub-center in the head forward. Sub-centers of a class are
    /// updated in ascending k, all before its angles are taken; the class's moments
    /// take one EMA step from all its rows. `k_iy` of ignored rows is not read.
    pub fn update_subcenters(&mut self, x: &[f32], labels: &[i32], k_iy: &[u32]) -> Result<()> {
        self.cfg.require_center(CenterMode::Ema)?;
        let (d, kk) = (self.d, self.subcenters);
        if x.len() != labels.len() * d {
            return Err(Error::Shape(format!(
                "x has {} elements, expected B*D = {}*{d}",
                x.len(),
                labels.len()
            )));
        }
        if k_iy.len() != labels.len() {
            return Err(Error::Shape(format!(
                "k_iy has {} entries, expected B = {}",
                k_iy.len(),
                labels.len()
            )));
        }
        check_labels(labels, self.c)?;
        if let Some(i) = (0..labels.len()).find(|&i| labels[i] >= 0 && k_iy[i] as usize >= kk) {
            return Err(Error::InvalidConfig(format!(
                "row {i}: target sub-center {} is outside 0..{kk}",
                k_iy[i]
            )));
        }
        check_finite_rows("x", x, d, labels)?;

        let beta = self.cfg.beta as f64;
        for (y, rows) in rows_by_class(labels, self.c) {
            let xh: Vec<Vec<f64>> = rows.iter().map(|&i| unit(&x[i * d..(i + 1) * d])).collect();
            let sub: Vec<usize> = rows.iter().map(|&i| k_iy[i] as usize).collect();
            // A sub-center no row has picked holds zeros, so the EMA branch gives
            // normalize((1 - beta) mbar) = normalize(mbar) for it: the class's flag
            // decides (SPEC 5b), and with K = 1 this is section 5's rule.
            let was_init = self.initialized[y];
            for k in 0..kk {
                let members: Vec<&Vec<f64>> =
                    xh.iter().zip(&sub).filter(|(_, &s)| s == k).map(|(v, _)| v).collect();
                if members.is_empty() {
                    continue;
                }
                let count = members.len() as f64;
                let mut mbar = vec![0.0; d];
                for v in &members {
                    for (m, a) in mbar.iter_mut().zip(v.iter()) {
                        *m += a / count;
                    }
                }
                let center = &mut self.centers[(y * kk + k) * d..(y * kk + k + 1) * d];
                let blended: Vec<f64> = if was_init {
                    center.iter().zip(&mbar).map(|(c, m)| beta * c + (1.0 - beta) * m).collect()
                } else {
                    mbar
                };
                let norm = blended.iter().map(|a| a * a).sum::<f64>().sqrt().max(NORM_EPS);
                for (c, b) in center.iter_mut().zip(&blended) {
                    *c = b / norm;
                }
            }
            // The angles use the centers just updated with this batch (SPEC section 5).
            let angles: Vec<f64> = xh
                .iter()
                .zip(&sub)
                .map(|(v, &k)| {
                    let center = &self.centers[(y * kk + k) * d..(y * kk + k + 1) * d];
                    v.iter().zip(center).map(|(a, b)| a * b).sum::<f64>().clamp(-1.0, 1.0).acos()
                })
                .collect();
            self.accumulate(y, &angles);
        }
        self.updates += 1;
        Ok(())
    }

    /// Class-weight update from the target angles theta_i of the head forward
    /// (see [`crate::oracle::head::target_angles`]) and labels `[B]`. Only for
    /// `CenterMode::ClassWeight`. Angles of ignored rows are not read.
    pub fn update_from_angles(&mut self, labels: &[i32], theta: &[f64]) -> Result<()> {
        self.cfg.check_angle_update(theta.len(), labels.len())?;
        check_labels(labels, self.c)?;
        if let Some(index) = labels.iter().zip(theta).position(|(&y, t)| y >= 0 && !t.is_finite()) {
            return Err(Error::NonFinite { what: "theta".into(), index });
        }
        for (k, rows) in rows_by_class(labels, self.c) {
            let angles: Vec<f64> = rows.iter().map(|&i| theta[i]).collect();
            self.accumulate(k, &angles);
        }
        self.updates += 1;
        Ok(())
    }

    /// Moments of class k from this batch's angles: set if new, else EMA with beta.
    fn accumulate(&mut self, k: usize, angles: &[f64]) {
        let count = angles.len() as f64;
        let mean_a = angles.iter().sum::<f64>() / count;
        let mean_a2 = angles.iter().map(|a| a * a).sum::<f64>() / count;
        if self.initialized[k] {
            let beta = self.cfg.beta as f64;
            self.mu[k] = beta * self.mu[k] + (1.0 - beta) * mean_a;
            self.v[k] = beta * self.v[k] + (1.0 - beta) * mean_a2;
        } else {
            self.mu[k] = mean_a;
            self.v[k] = mean_a2;
            self.initialized[k] = true;
        }
        self.n[k] += angles.len() as u64;
    }

    /// Per-class and head/tail summary with this state's f64 cloud std and head variance.
    pub fn summary(&self) -> Result<StatsSummary> {
        StatsSummary::new(self, &self.cloud_sigma(), self.head_variance())
    }

    /// var_k = max(v_k - mu_k^2, 0) per class; 0 for classes never seen.
    pub fn variances(&self) -> Vec<f64> {
        (0..self.c)
            .map(|k| if self.initialized[k] { (self.v[k] - self.mu[k] * self.mu[k]).max(0.0) } else { 0.0 })
            .collect()
    }

    /// N_k: the dataset's class counts when configured, else the running counts n_k.
    pub fn counts(&self) -> Vec<u64> {
        match &self.cfg.class_counts {
            Some(counts) => counts.clone(),
            None => self.n.clone(),
        }
    }

    /// Head variance var_h, or `None` while no head class exists.
    ///
    /// Threshold(T): unweighted mean of var_k over initialized classes with N_k >= T.
    /// Adaptive: sum N_k var_k / sum N_k over initialized classes (None if that sum is 0).
    pub fn head_variance(&self) -> Option<f64> {
        let (num, den) = self.head_variance_parts();
        (den > 0.0).then(|| num / den)
    }

    /// The two sums whose ratio is var_h (SPEC 5): threshold, (sum of var_k over the head
    /// classes, their count); adaptive, (sum N_k var_k, sum N_k) over initialized classes; in
    /// class order. A class-parallel head (SPEC 5c) adds them over its shards' states.
    pub fn head_variance_parts(&self) -> (f64, f64) {
        let var = self.variances();
        let counts = self.counts();
        let (mut num, mut den) = (0.0, 0.0);
        for k in (0..self.c).filter(|&k| self.initialized[k]) {
            match self.cfg.split {
                Split::Threshold(t) if counts[k] >= t => {
                    num += var[k];
                    den += 1.0;
                }
                Split::Threshold(_) => {}
                Split::Adaptive => {
                    num += counts[k] as f64 * var[k];
                    den += counts[k] as f64;
                }
            }
        }
        (num, den)
    }

    /// sigma_cloud `[C]` from the current state (SPEC section 5).
    ///
    /// 0 everywhere while `updates < warmup_steps` or no head class exists.
    /// Threshold(T): sqrt(max(var_h - var_k, 0)) for classes with N_k < T, else 0.
    /// Adaptive: sqrt(max(var_h - var_k, 0)) for every class.
    pub fn cloud_sigma(&self) -> Vec<f64> {
        self.cloud_sigma_with(self.head_variance())
    }

    /// [`Self::cloud_sigma`] with the head variance given: a class-parallel head's shard
    /// (SPEC 5c) takes var_h from every shard's [`Self::head_variance_parts`].
    pub fn cloud_sigma_with(&self, head_variance: Option<f64>) -> Vec<f64> {
        if self.updates < self.cfg.warmup_steps {
            return vec![0.0; self.c];
        }
        let Some(var_h) = head_variance else {
            return vec![0.0; self.c];
        };
        let var = self.variances();
        let counts = self.counts();
        (0..self.c)
            .map(|k| {
                let gets_cloud = match self.cfg.split {
                    Split::Threshold(t) => counts[k] < t,
                    Split::Adaptive => true,
                };
                if gets_cloud {
                    (var_h - var[k]).max(0.0).sqrt()
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// x / max(||x||, eps) in f64.
fn unit(x: &[f32]) -> Vec<f64> {
    let v: Vec<f64> = x.iter().map(|&a| a as f64).collect();
    let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(NORM_EPS);
    v.iter().map(|a| a / norm).collect()
}

/// (class, its row indices) for every class present, in ascending class order.
fn rows_by_class(labels: &[i32], c: usize) -> Vec<(usize, Vec<usize>)> {
    let mut rows = vec![Vec::new(); c];
    for (i, &y) in labels.iter().enumerate() {
        if let Ok(k) = usize::try_from(y) {
            rows[k].push(i);
        }
    }
    rows.into_iter().enumerate().filter(|(_, r)| !r.is_empty()).collect()
}
