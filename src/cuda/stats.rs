//! LEAP class statistics and the feature-cloud std on the device (`kernels/stats.cu`,
//! SPEC section 5). The host twin is [`StatsState`] with the f64 rules of [`crate::oracle::stats`].
//!
//! [`ClassStats`] holds the per-class state in f32 (`centers` \[C*K, D\] only with
//! `center = ema`, one per sub-center, K = 1 without sub-centers; `mu`, `v`, `n`,
//! `initialized` \[C\]) and the cloud std `sigma_cloud` \[C\]. A training step reads
//! [`ClassStats::cloud_sigma`] (a device buffer for the head), runs the head, then calls
//! [`ClassStats::update`] (or, with sub-centers, [`ClassStats::update_subcenters`] with the
//! head's target sub-centers k*_iy, SPEC 5b) with the batch features (EMA centers) or
//! [`ClassStats::update_from_cos`] / [`ClassStats::update_from_angles`] with the head's
//! target cosines or angles (class-weight centers, O(B) work; with sub-centers the head's
//! c_iy is already its dominant sub-center's).
//!
//! Determinism: labels are host data, so [`bucket_labels`] sorts them on the host
//! into (class, rows) segments in ascending class order; each class's state is then
//! written by exactly one CTA (or one thread) with fixed-order reductions, and the
//! cloud reduces over C with a partition that depends on C only. No float atomics:
//! the same inputs give bitwise the same state, run after run.
//!
//! Limits: C*K <= 2^30 and B, D < 2^31 (i32 indexing in the kernels).

use super::args::{StatsAnglesArgs, StatsCloudArgs, StatsReduceArgs, StatsUpdateArgs};
use super::kernels::stats as k;
use super::{norms, DevPtr, Device, DeviceElem, Launch, SmokeLine, Tensor};
use crate::check::check_labels;
use crate::config::{CenterMode, Split, StatsConfig, MAX_SUBCENTERS};
use crate::error::{Error, Result};
use crate::stats::{Precision, StatsState, StatsSummary};
use crate::DType;
use std::path::Path;

/// Threads per block of every stats kernel (`STATS_THREADS` in the .cu).
const THREADS: u32 = 256;
/// Classes per block of `stats_cloud_f32` (`CLOUD_CLASSES_PER_BLOCK` in the .cu).
const CLOUD_CLASSES_PER_BLOCK: usize = 1024;
/// Smallest chunk of classes per `stats_reduce_f32` block.
const MIN_REDUCE_CHUNK: usize = 4096;
/// Most partials of `stats_reduce_f32` (the chunk grows beyond this many).
const MAX_PARTIALS: usize = 1024;
/// Largest supported C: keeps `k0 + chunk` inside i32 in the kernels.
const MAX_CLASSES: usize = 1 << 30;

/// A batch's labels grouped by class: the segments the update kernels take.
///
/// Segment s is class `classes[s]` with rows `rows[starts[s]..starts[s + 1]]`.
/// Classes are ascending and unique, rows ascending inside a class; ignored
/// rows (negative labels) appear nowhere.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments {
    /// Class of each segment \[S\], ascending.
    pub classes: Vec<i32>,
    /// Segment starts into `rows` \[S + 1\]; `starts[S] == rows.len()`.
    pub starts: Vec<i32>,
    /// Row indices grouped by class \[R\] (R = non-ignored rows).
    pub rows: Vec<i32>,
}

impl Segments {
    /// Number of segments S (distinct classes present).
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// True when no row has a class (empty batch or every label ignored).
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }

    /// The device layout `[classes | starts | rows]` (2S + 1 + R i32).
    pub fn packed(&self) -> Vec<i32> {
        let mut v = Vec::with_capacity(self.classes.len() + self.starts.len() + self.rows.len());
        v.extend_from_slice(&self.classes);
        v.extend_from_slice(&self.starts);
        v.extend_from_slice(&self.rows);
        v
    }
}

/// Groups `labels` \[B\] by class (O(B log B) on the host, nothing O(C)).
///
/// Errors: a label >= `c` ([`Error::LabelOutOfRange`]); B >= 2^31.
pub fn bucket_labels(labels: &[i32], c: usize) -> Result<Segments> {
    check_labels(labels, c)?;
    if labels.len() > i32::MAX as usize {
        return Err(Error::Shape(format!("batch of {} rows exceeds i32 indexing", labels.len())));
    }
    let mut pairs: Vec<(i32, i32)> =
        labels.iter().enumerate().filter(|(_, &y)| y >= 0).map(|(i, &y)| (y, i as i32)).collect();
    // (class, row) pairs are unique, so the unstable sort is deterministic.
    pairs.sort_unstable();
    let mut seg = Segments { rows: pairs.iter().map(|&(_, i)| i).collect(), ..Default::default() };
    for (p, &(y, _)) in pairs.iter().enumerate() {
        if seg.classes.last() != Some(&y) {
            seg.classes.push(y);
            seg.starts.push(p as i32);
        }
    }
    seg.starts.push(pairs.len() as i32);
    Ok(seg)
}

/// Checks `cfg` for C classes of dimension D (everything [`ClassStats::new`] checks
/// before touching the device): C, D > 0 and within the kernels' limits, beta in
/// [0, 1), T > 0 in threshold mode, class counts of length C.
pub fn check_config(c: usize, d: usize, cfg: &StatsConfig) -> Result<()> {
    check_config_subcenters(c, 1, d, cfg)
}

/// [`check_config`] for C classes of `k` sub-centers each (SPEC 5b): also k in
/// `1..=MAX_SUBCENTERS` and C*K within the kernels' limits.
pub fn check_config_subcenters(c: usize, k: usize, d: usize, cfg: &StatsConfig) -> Result<()> {
    if c == 0 || d == 0 {
        return Err(Error::Empty(format!("statistics need C > 0 and D > 0, got C={c}, D={d}")));
    }
    if !(1..=MAX_SUBCENTERS as usize).contains(&k) {
        return Err(Error::InvalidConfig(format!(
            "statistics: subcenters must be in 1..={MAX_SUBCENTERS}, got {k}"
        )));
    }
    if c.saturating_mul(k) > MAX_CLASSES || d > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "statistics for C={c}, K={k}, D={d} exceed the kernels' i32 indexing"
        )));
    }
    if cfg.center == CenterMode::Ema && (c * k).checked_mul(d).is_none() {
        return Err(Error::Shape(format!("C*K*D overflows for C={c}, K={k}, D={d}")));
    }
    cfg.validate(c)
}

/// Per-class LEAP statistics on one device (SPEC section 5).
///
/// Every method takes the [`Device`] the statistics were created on.
#[derive(Debug)]
pub struct ClassStats {
    cfg: StatsConfig,
    c: usize,
    /// Sub-centers per class K (SPEC 5b; 1 without).
    k: usize,
    d: usize,
    /// Unit centers \[C*K, D\] (class y's sub-center k is row y*K + k); `None` with
    /// `center = class_weight`.
    centers: Option<Tensor<f32>>,
    mu: Tensor<f32>,
    v: Tensor<f32>,
    n: Tensor<u64>,
    initialized: Tensor<u32>,
    /// The dataset's N_k when configured (else the cloud reads `n`).
    dataset_counts: Option<Tensor<u64>>,
    /// (num, den) per `stats_reduce_f32` block.
    partials: Tensor<f32>,
    chunk: usize,
    num_partials: usize,
    sigma: Tensor<f32>,
    /// [var_h, sum of head weights] from the last cloud launch.
    head: Tensor<f32>,
    updates: u64,
    /// sigma/head are out of date with respect to the state.
    stale: bool,
}

impl ClassStats {
    /// Empty statistics for `c` classes of dimension `d` (all classes unseen).
    ///
    /// Allocates O(C*D) only with `center = ema`. Errors: see [`check_config`].
    pub fn new(dev: &Device, c: usize, d: usize, cfg: StatsConfig) -> Result<Self> {
        Self::with_subcenters(dev, c, 1, d, cfg)
    }

    /// Empty statistics for `c` classes of `k` sub-centers each (SPEC 5b) and dimension `d`:
    /// with `center = ema` one center per sub-center (\[C*K, D\]), the moments per class.
    /// Errors: see [`check_config_subcenters`].
    pub fn with_subcenters(dev: &Device, c: usize, k: usize, d: usize, cfg: StatsConfig) -> Result<Self> {
        check_config_subcenters(c, k, d, &cfg)?;
        let centers = match cfg.center {
            CenterMode::Ema => Some(Tensor::zeros(dev, &[c * k, d])?),
            CenterMode::ClassWeight => None,
        };
        let chunk = MIN_REDUCE_CHUNK.max(c.div_ceil(MAX_PARTIALS));
        let num_partials = c.div_ceil(chunk);
        let dataset_counts = match &cfg.class_counts {
            Some(counts) => Some(Tensor::from_host(dev, counts, &[counts.len()])?),
            None => None,
        };
        Ok(Self {
            centers,
            mu: Tensor::zeros(dev, &[c])?,
            v: Tensor::zeros(dev, &[c])?,
            n: Tensor::zeros(dev, &[c])?,
            initialized: Tensor::zeros(dev, &[c])?,
            dataset_counts,
            partials: Tensor::zeros(dev, &[2 * num_partials])?,
            chunk,
            num_partials,
            sigma: Tensor::zeros(dev, &[c])?,
            head: Tensor::zeros(dev, &[2])?,
            updates: 0,
            stale: true,
            cfg,
            c,
            k,
            d,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StatsConfig {
        &self.cfg
    }

    /// Number of classes C.
    pub fn num_classes(&self) -> usize {
        self.c
    }

    /// Embedding dimension D.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// Sub-centers per class K (SPEC 5b; 1 without).
    pub fn subcenters(&self) -> usize {
        self.k
    }

    /// Update calls so far (the warm-up counter).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Unit centers \[C*K, D\] (`None` with `center = class_weight`).
    pub fn centers(&self) -> Option<&Tensor<f32>> {
        self.centers.as_ref()
    }

    /// EMA mean angle per class \[C\].
    pub fn mu(&self) -> &Tensor<f32> {
        &self.mu
    }

    /// EMA mean squared angle per class \[C\].
    pub fn v(&self) -> &Tensor<f32> {
        &self.v
    }

    /// EMA-center update from the batch features `x` \[B, D\] (any storage dtype,
    /// normalized here) and host labels \[B\] (negative = ignored). Only for
    /// `center = ema` and one center per class (with sub-centers see
    /// [`ClassStats::update_subcenters`]). Every call counts as one step of the warm-up, even
    /// a batch whose rows are all ignored. O(B*D) work; `x` must be finite.
    pub fn update<T: DeviceElem>(&mut self, dev: &Device, x: &Tensor<T>, labels: &[i32]) -> Result<()> {
        if self.k != 1 {
            return Err(Error::InvalidConfig(format!(
                "stats update: {} sub-centers per class need the head's target sub-centers \
                 (ClassStats::update_subcenters, SPEC 5b)",
                self.k
            )));
        }
        self.check_update(x, labels)?;
        let seg = bucket_labels(labels, self.c)?;
        self.launch_update(dev, x, &seg, None)?;
        self.updates += 1;
        self.stale = true;
        Ok(())
    }

    /// EMA-center update with sub-centers (SPEC 5b): as [`ClassStats::update`], where row i of
    /// class y updates and is measured from center (y, `k_iy[i]`), its target's dominant
    /// sub-center in the head forward (`HeadForward::k_iy`); the class's flag decides new vs
    /// EMA for all its sub-centers, and the class's moments take one EMA step from all its
    /// rows' angles. `k_iy` of ignored rows is not read; a valid row's must be < K (else an
    /// error, nothing changed). With K = 1 this is [`ClassStats::update`] (same kernels, same bits).
    pub fn update_subcenters<T: DeviceElem>(
        &mut self,
        dev: &Device,
        x: &Tensor<T>,
        labels: &[i32],
        k_iy: &[u32],
    ) -> Result<()> {
        self.check_update(x, labels)?;
        if k_iy.len() != labels.len() {
            return Err(Error::Shape(format!(
                "stats update: k_iy has {} entries, expected B = {}",
                k_iy.len(),
                labels.len()
            )));
        }
        check_labels(labels, self.c)?;
        let kk = self.k;
        if let Some(i) = (0..labels.len()).find(|&i| labels[i] >= 0 && k_iy[i] as usize >= kk) {
            return Err(Error::InvalidConfig(format!(
                "stats update: row {i}: target sub-center {} is outside 0..{kk}",
                k_iy[i]
            )));
        }
        if kk == 1 {
            let seg = bucket_labels(labels, self.c)?;
            self.launch_update(dev, x, &seg, None)?;
        } else {
            // Keys y*K + k*_iy: one segment (one CTA) per (class, sub-center), ascending.
            let keys: Vec<i32> = labels
                .iter()
                .zip(k_iy)
                .map(|(&y, &k)| if y < 0 { -1 } else { y * kk as i32 + k as i32 })
                .collect();
            let key_seg = bucket_labels(&keys, self.c * kk)?;
            if !key_seg.is_empty() {
                // SAFETY: stats_update writes ang[i] for every row i listed in key_seg, and
                // stats_angles reads only the rows listed in class_seg: the same rows.
                let ang = unsafe { Tensor::<f32>::uninit(dev, &[labels.len()]) }?;
                self.launch_update(dev, x, &key_seg, Some(&ang))?;
                let class_seg = bucket_labels(labels, self.c)?;
                self.launch_angles(dev, &class_seg, &ang, false)?;
            }
        }
        self.updates += 1;
        self.stale = true;
        Ok(())
    }

    /// x is \[B, D\] for B = `labels.len()`, and the statistics keep EMA centers.
    fn check_update<T: DeviceElem>(&self, x: &Tensor<T>, labels: &[i32]) -> Result<()> {
        self.cfg.require_center(CenterMode::Ema)?;
        if x.shape() != [labels.len(), self.d] {
            return Err(Error::Shape(format!(
                "stats update: x has shape {:?}, expected [B, D] = [{}, {}]",
                x.shape(),
                labels.len(),
                self.d
            )));
        }
        Ok(())
    }

    /// `stats_update_<T>` over `seg` (classes, or keys y*K + k when `ang` is given: then the
    /// rows' angles go to `ang` \[B\] and the moments are left to [`Self::launch_angles`]).
    fn launch_update<T: DeviceElem>(
        &self,
        dev: &Device,
        x: &Tensor<T>,
        seg: &Segments,
        ang: Option<&Tensor<f32>>,
    ) -> Result<()> {
        if seg.is_empty() {
            return Ok(());
        }
        let (_, inv) = norms::row_norms(dev, x)?;
        let packed = seg.packed();
        let seg_dev = Tensor::from_host(dev, &packed, &[packed.len()])?;
        let centers = self.centers.as_ref().ok_or_else(|| Error::InvalidConfig("no centers".into()))?;
        let args = StatsUpdateArgs {
            x: x.ptr(),
            inv: inv.ptr(),
            seg: seg_dev.ptr(),
            centers: centers.ptr(),
            mu: self.mu.ptr(),
            v: self.v.ptr(),
            n: self.n.ptr(),
            init: self.initialized.ptr(),
            ang: ang.map_or(DevPtr::NULL, |a| a.ptr()),
            num_seg: seg.len() as i32,
            d: self.d as i32,
            beta: self.cfg.beta,
            k: self.k as i32,
        };
        let l = Launch::linear(k::STATS_UPDATE[T::DTYPE], seg.len(), THREADS, &args);
        // SAFETY: x holds B*D elements of T and inv B f32 (row_norms of x); seg_dev holds
        // 2S+1+R i32 laid out as the kernel reads them, with unique ids in [0, C*K) (classes
        // when K = 1, keys y*K + k otherwise; bucket_labels checked them) and rows in [0, B);
        // centers [C*K, D], mu, v, n, initialized [C] are separate allocations of this struct,
        // ang (when given) a separate [B] buffer. One CTA per segment.
        unsafe { dev.launch(&l) }
    }

    /// Class-weight update from the head's target angles theta \[B\] (device f32,
    /// radians) and host labels \[B\]. Only for `center = class_weight`; O(B) work.
    /// Angles of ignored rows are not read.
    pub fn update_from_angles(&mut self, dev: &Device, labels: &[i32], theta: &Tensor<f32>) -> Result<()> {
        self.update_angles(dev, labels, theta, false)
    }

    /// Class-weight update from the head's clamped target cosines c_iy \[B\] (device
    /// f32); the angle is theta_i = acos(clamp(c_iy, -1 + 1e-7, 1 - 1e-7)) (SPEC 3).
    /// Only for `center = class_weight`; O(B) work.
    pub fn update_from_cos(&mut self, dev: &Device, labels: &[i32], c_iy: &Tensor<f32>) -> Result<()> {
        self.update_angles(dev, labels, c_iy, true)
    }

    fn update_angles(&mut self, dev: &Device, labels: &[i32], ang: &Tensor<f32>, is_cos: bool) -> Result<()> {
        self.cfg.check_angle_update(ang.len(), labels.len())?;
        let seg = bucket_labels(labels, self.c)?;
        self.launch_angles(dev, &seg, ang, is_cos)?;
        self.updates += 1;
        self.stale = true;
        Ok(())
    }

    /// `stats_angles_f32` over the class segments `seg`: each class's moments from the angles
    /// (or cosines, `is_cos`) `ang` \[B\] of its rows.
    fn launch_angles(&self, dev: &Device, seg: &Segments, ang: &Tensor<f32>, is_cos: bool) -> Result<()> {
        if seg.is_empty() {
            return Ok(());
        }
        let packed = seg.packed();
        let seg_dev = Tensor::from_host(dev, &packed, &[packed.len()])?;
        let args = StatsAnglesArgs {
            ang: ang.ptr(),
            seg: seg_dev.ptr(),
            mu: self.mu.ptr(),
            v: self.v.ptr(),
            n: self.n.ptr(),
            init: self.initialized.ptr(),
            num_seg: seg.len() as i32,
            is_cos: is_cos as i32,
            beta: self.cfg.beta,
            ..Default::default()
        };
        let l = Launch::linear(k::STATS_ANGLES_F32, seg.len().div_ceil(THREADS as usize), THREADS, &args);
        // SAFETY: ang holds B f32 (every row listed in seg written); seg_dev is the packed
        // segments (unique classes in [0, C), rows in [0, B)); mu, v, n, initialized hold C
        // entries each and are separate allocations. Threads past S return before touching memory.
        unsafe { dev.launch(&l) }
    }

    /// Recomputes sigma_cloud and var_h when the state changed since the last call.
    fn refresh(&mut self, dev: &Device) -> Result<()> {
        if !self.stale {
            return Ok(());
        }
        let (adaptive, thresh) = match self.cfg.split {
            Split::Threshold(t) => (0i32, t),
            Split::Adaptive => (1i32, 0u64),
        };
        let warm = (self.updates >= self.cfg.warmup_steps) as i32;
        let counts = self.dataset_counts.as_ref().unwrap_or(&self.n).ptr();
        let reduce = Launch::linear(
            k::STATS_REDUCE_F32,
            self.num_partials,
            THREADS,
            &StatsReduceArgs {
                mu: self.mu.ptr(),
                v: self.v.ptr(),
                init: self.initialized.ptr(),
                counts,
                partial: self.partials.ptr(),
                thresh,
                c: self.c as i32,
                chunk: self.chunk as i32,
                adaptive,
                ..Default::default()
            },
        );
        let cloud = Launch::linear(
            k::STATS_CLOUD_F32,
            self.c.div_ceil(CLOUD_CLASSES_PER_BLOCK),
            THREADS,
            &StatsCloudArgs {
                partial: self.partials.ptr(),
                mu: self.mu.ptr(),
                v: self.v.ptr(),
                init: self.initialized.ptr(),
                counts,
                sigma: self.sigma.ptr(),
                head: self.head.ptr(),
                thresh,
                num_partial: self.num_partials as i32,
                c: self.c as i32,
                adaptive,
                warm,
            },
        );
        // SAFETY: mu, v, initialized, counts hold C entries; reduce block b reads classes
        // [b*chunk, min(C, (b+1)*chunk)) and writes partials[2b], [2b+1] of 2P (grid P =
        // ceil(C / chunk)); cloud reads those partials (same stream: ordered), writes
        // sigma[b*1024 .. min(C, (b+1)*1024)) and, block 0 alone, head [2]. No aliasing.
        unsafe { dev.run(&[reduce, cloud]) }?;
        self.stale = false;
        Ok(())
    }

    /// sigma_cloud \[C\] (f32, radians) from the current state, ready for the head.
    ///
    /// 0 everywhere during the warm-up and while no head class exists. Recomputed
    /// (two small launches, O(C)) only when an update or load changed the state.
    pub fn cloud_sigma(&mut self, dev: &Device) -> Result<&Tensor<f32>> {
        self.refresh(dev)?;
        Ok(&self.sigma)
    }

    /// var_h as computed on the device (ignores the warm-up), or `None` while no head class exists.
    pub fn head_variance(&mut self, dev: &Device) -> Result<Option<f32>> {
        self.refresh(dev)?;
        let h = self.head.to_host(dev)?;
        Ok((h[1] > 0.0).then_some(h[0]))
    }

    /// Copies the whole state to the host (f32 precision).
    pub fn snapshot(&self, dev: &Device) -> Result<StatsState> {
        let widen = |t: &Tensor<f32>| -> Result<Vec<f64>> {
            Ok(t.to_host(dev)?.into_iter().map(f64::from).collect())
        };
        let n = self.n.to_host(dev)?;
        let init = self.initialized.to_host(dev)?;
        Ok(StatsState {
            cfg: self.cfg.clone(),
            c: self.c,
            d: self.d,
            subcenters: self.k,
            centers: match &self.centers {
                Some(t) => widen(t)?,
                None => Vec::new(),
            },
            mu: widen(&self.mu)?,
            v: widen(&self.v)?,
            n: n[..self.c].to_vec(),
            initialized: init[..self.c].iter().map(|&b| b != 0).collect(),
            updates: self.updates,
            precision: Precision::F32,
        })
    }

    /// Statistics holding `snap`'s state (f64 values are rounded to f32).
    pub fn from_snapshot(dev: &Device, snap: &StatsState) -> Result<Self> {
        snap.validate()?;
        let mut s = Self::with_subcenters(dev, snap.c, snap.subcenters, snap.d, snap.cfg.clone())?;
        let narrow = |v: &[f64]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
        if let Some(t) = s.centers.as_mut() {
            *t = Tensor::from_host(dev, &narrow(&snap.centers), &[snap.c * snap.subcenters, snap.d])?;
        }
        s.mu = Tensor::from_host(dev, &narrow(&snap.mu), &[snap.c])?;
        s.v = Tensor::from_host(dev, &narrow(&snap.v), &[snap.c])?;
        s.n.copy_from_host(dev, &snap.n)?;
        let init: Vec<u32> = snap.initialized.iter().map(|&b| b as u32).collect();
        s.initialized.copy_from_host(dev, &init)?;
        s.updates = snap.updates;
        s.stale = true;
        Ok(s)
    }

    /// Saves the state to a safetensors file (see [`crate::statsfile`]), atomically.
    pub fn save(&self, dev: &Device, path: &Path) -> Result<()> {
        self.snapshot(dev)?.save(path)
    }

    /// Loads statistics saved by [`ClassStats::save`] (or by the CPU side through
    /// [`StatsState::save`]).
    pub fn load(dev: &Device, path: &Path) -> Result<Self> {
        Self::from_snapshot(dev, &StatsState::load(path)?)
    }

    /// Per-class count, mean angle, angular std and cloud std, with head/tail aggregates.
    pub fn summary(&mut self, dev: &Device) -> Result<StatsSummary> {
        let var_h = self.head_variance(dev)?.map(f64::from);
        let sigma: Vec<f64> = self.sigma.to_host(dev)?.into_iter().map(f64::from).collect();
        StatsSummary::new(&self.snapshot(dev)?, &sigma, var_h)
    }
}

/// Worst differences between a [`ClassStats`] and the f64 [`StatsState`] fed the same batches.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsErrors {
    /// Max |center diff| (0 in class-weight mode).
    pub centers: f64,
    /// Max |mu diff| (radians).
    pub mu: f64,
    /// Max |v diff| (radians^2).
    pub v: f64,
    /// Max |sigma_gpu^2 - sigma_oracle^2| (radians^2): sigma itself is sqrt of a difference
    /// and amplifies rounding near 0, its square does not.
    pub sigma_sq: f64,
    /// |var_h diff|, 0 when both have no head, infinite when only one has.
    pub head_variance: f64,
    /// Counts, initialized flags and the update counter agree exactly.
    pub exact_fields_equal: bool,
}

impl StatsErrors {
    /// The largest float error.
    pub fn max(&self) -> f64 {
        [self.centers, self.mu, self.v, self.sigma_sq, self.head_variance].into_iter().fold(0.0, f64::max)
    }

    /// All float errors <= `tol`, every value finite, exact fields equal.
    pub fn passes(&self, tol: f64) -> bool {
        self.exact_fields_equal && self.max().is_finite() && self.max() <= tol
    }
}

/// Default tolerance of the statistics against the oracle (absolute, radians or radians^2).
pub const STATS_TOLERANCE: f64 = 1e-4;

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| if x.is_finite() { (x - y).abs() } else { f64::INFINITY })
        .fold(0.0, f64::max)
}

/// Compares the device state, sigma_cloud and var_h with the oracle's.
pub fn compare_with_oracle(dev: &Device, gpu: &mut ClassStats, oracle: &StatsState) -> Result<StatsErrors> {
    let sigma: Vec<f64> = gpu.cloud_sigma(dev)?.to_host(dev)?.into_iter().map(f64::from).collect();
    let var_h = gpu.head_variance(dev)?.map(f64::from);
    let snap = gpu.snapshot(dev)?;
    let sq = |v: &[f64]| -> Vec<f64> { v.iter().map(|s| s * s).collect() };
    let head_variance = match (var_h, oracle.head_variance()) {
        (None, None) => 0.0,
        (Some(a), Some(b)) => (a - b).abs(),
        _ => f64::INFINITY,
    };
    let mask = |v: &[f64]| -> Vec<f64> {
        // Unseen classes hold zeros in the oracle; compare only what is defined.
        v.iter().zip(&snap.initialized).map(|(x, &i)| if i { *x } else { 0.0 }).collect()
    };
    Ok(StatsErrors {
        centers: max_abs_diff(&snap.centers, &oracle.centers),
        mu: max_abs_diff(&mask(&snap.mu), &mask(&oracle.mu)),
        v: max_abs_diff(&mask(&snap.v), &mask(&oracle.v)),
        sigma_sq: max_abs_diff(&sq(&sigma), &sq(&oracle.cloud_sigma())),
        head_variance,
        exact_fields_equal: snap.n == oracle.n
            && snap.initialized == oracle.initialized
            && snap.updates == oracle.updates,
    })
}

/// A deterministic long-tailed batch: labels \[B\] (class ~ C * u^3, a few ignored
/// rows, the last class always once) and features \[B, D\] with a per-class offset so
/// that angles are neither 0 nor pi/2, rounded to `dtype`. For tests and smoke.
pub fn synthetic_batch(seed: u64, b: usize, c: usize, d: usize, dtype: DType) -> (Vec<f32>, Vec<i32>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut labels: Vec<i32> = (0..b)
        .map(|_| {
            if rng.random::<f32>() < 0.05 {
                -1
            } else {
                ((c as f64 * rng.random::<f64>().powi(3)) as usize).min(c - 1) as i32
            }
        })
        .collect();
    if let Some(last) = labels.last_mut() {
        *last = (c - 1) as i32;
    }
    let mut x = vec![0.0f32; b * d];
    for (i, &y) in labels.iter().enumerate() {
        let cls = y.max(0) as usize;
        for j in 0..d {
            // A class direction (hash of (class, j)) plus noise of class-dependent size.
            let h = ((cls * 7919 + j * 104_729) % 1009) as f32 / 1009.0 - 0.5;
            let noise = (rng.random::<f32>() - 0.5) * (0.3 + (cls % 5) as f32 * 0.2);
            x[i * d + j] = dtype.round(h + noise);
        }
    }
    (x, labels)
}

fn smoke_update<T: DeviceElem>(dev: &Device, cfg: &StatsConfig, what: &str) -> Result<SmokeLine> {
    let (b, c, d, steps) = (97, 41, 70, 4);
    let mut gpu = ClassStats::new(dev, c, d, cfg.clone())?;
    let mut oracle = StatsState::new(c, d, cfg.clone())?;
    for step in 0..steps {
        let (x, labels) = synthetic_batch(1000 + step, b, c, d, T::DTYPE);
        gpu.update(dev, &Tensor::<T>::from_f32(dev, &x, &[b, d])?, &labels)?;
        oracle.update(&x, &labels)?;
    }
    let e = compare_with_oracle(dev, &mut gpu, &oracle)?;
    Ok(SmokeLine {
        kernel: "stats_update + stats_reduce + stats_cloud".into(),
        dtype: T::DTYPE.name().into(),
        options: format!("center=ema {what} B={b} C={c} D={d} x{steps} steps"),
        max_err: e.max(),
        tolerance: STATS_TOLERANCE,
        passed: e.passes(STATS_TOLERANCE),
    })
}

/// Target sub-centers for a batch: row i's k*_iy from a hash of (i, seed), in 0..k-1 only, so
/// that sub-center k-1 is never picked (its center stays zero, SPEC 5b).
pub fn synthetic_subcenters(seed: u64, b: usize, k: usize) -> Vec<u32> {
    (0..b).map(|i| ((i as u64 * 2_654_435_761 + seed * 97) % (k.max(2) as u64 - 1)) as u32).collect()
}

fn smoke_subcenters(dev: &Device, cfg: &StatsConfig, what: &str) -> Result<SmokeLine> {
    let (b, c, kk, d, steps) = (97, 41, 3, 70, 4);
    let mut gpu = ClassStats::with_subcenters(dev, c, kk, d, cfg.clone())?;
    let mut oracle = StatsState::with_subcenters(c, kk, d, cfg.clone())?;
    for step in 0..steps {
        let (x, labels) = synthetic_batch(3000 + step, b, c, d, DType::F32);
        let k_iy = synthetic_subcenters(step, b, kk);
        gpu.update_subcenters(dev, &Tensor::<f32>::from_f32(dev, &x, &[b, d])?, &labels, &k_iy)?;
        oracle.update_subcenters(&x, &labels, &k_iy)?;
    }
    let e = compare_with_oracle(dev, &mut gpu, &oracle)?;
    Ok(SmokeLine {
        kernel: "stats_update + stats_angles + stats_reduce + stats_cloud".into(),
        dtype: "f32".into(),
        options: format!("center=ema subcenters={kk} {what} B={b} C={c} D={d} x{steps} steps"),
        max_err: e.max(),
        tolerance: STATS_TOLERANCE,
        passed: e.passes(STATS_TOLERANCE),
    })
}

fn smoke_angles(dev: &Device, cfg: &StatsConfig, what: &str) -> Result<SmokeLine> {
    let (b, c, steps) = (97, 41, 4);
    let mut gpu = ClassStats::new(dev, c, 1, cfg.clone())?;
    let mut oracle = StatsState::new(c, 1, cfg.clone())?;
    for step in 0..steps {
        let (x, labels) = synthetic_batch(2000 + step, b, c, 1, DType::F32);
        let cos: Vec<f32> = x.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
        gpu.update_from_cos(dev, &labels, &Tensor::from_host(dev, &cos, &[b])?)?;
        let theta: Vec<f64> = cos.iter().map(|&c| (c as f64).clamp(-1.0 + 1e-7, 1.0 - 1e-7).acos()).collect();
        oracle.update_from_angles(&labels, &theta)?;
    }
    let e = compare_with_oracle(dev, &mut gpu, &oracle)?;
    Ok(SmokeLine {
        kernel: "stats_angles + stats_reduce + stats_cloud".into(),
        dtype: "f32".into(),
        options: format!("center=class_weight {what} B={b} C={c} x{steps} steps"),
        max_err: e.max(),
        tolerance: STATS_TOLERANCE,
        passed: e.passes(STATS_TOLERANCE),
    })
}

inventory::submit! { super::SmokeCheck { family: "stats", run: smoke } }

/// `featcloud smoke` lines for the statistics: every stats kernel and dtype against
/// the oracle after a few long-tailed batches, in threshold and adaptive mode.
pub fn smoke(dev: &Device) -> Result<Vec<SmokeLine>> {
    let threshold = StatsConfig { split: Split::Threshold(6), warmup_steps: 2, ..StatsConfig::default() };
    let adaptive = StatsConfig { split: Split::Adaptive, warmup_steps: 2, ..StatsConfig::default() };
    let mut lines = vec![
        smoke_update::<f32>(dev, &threshold, "threshold(6)")?,
        smoke_update::<half::bf16>(dev, &threshold, "threshold(6)")?,
        smoke_update::<half::f16>(dev, &threshold, "threshold(6)")?,
        smoke_update::<f32>(dev, &adaptive, "adaptive")?,
        smoke_subcenters(dev, &threshold, "threshold(6)")?,
    ];
    let cw = |cfg: &StatsConfig| StatsConfig { center: CenterMode::ClassWeight, ..cfg.clone() };
    lines.push(smoke_angles(dev, &cw(&threshold), "threshold(6)")?);
    lines.push(smoke_angles(dev, &cw(&adaptive), "adaptive")?);
    Ok(lines)
}
