//! Evaluation of a trained model: closed-set top-1 (overall, many/medium/few
//! shot) on the test split with the head as the cosine classifier, open-set
//! retrieval on held-out classes, and the per-class angular spread of the
//! training embeddings (head vs tail), the quantity LEAP equalizes.

use crate::data::{Dataset, Splits};
use crate::engine::backend::Backend;
use crate::engine::train::Trainer;
use crate::error::Result;
use crate::eval;
use serde::{Deserialize, Serialize};

/// One class's angular spread.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassSpread {
    /// Class index.
    pub class: usize,
    /// Training samples of the class.
    pub train_count: u64,
    /// Std of the angles to the class mean direction, radians (NaN/null below 2 samples).
    pub angular_std: f64,
}

/// Everything `eval` reports for one model (NaN is written as JSON null).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Closed-set top-1, all test samples.
    pub top1_overall: f64,
    /// Top-1 over many-shot classes (>= 100 training samples).
    pub top1_many: f64,
    /// Top-1 over medium-shot classes (20..=99).
    pub top1_medium: f64,
    /// Top-1 over few-shot classes (< 20).
    pub top1_few: f64,
    /// Classes per shot group (many, medium, few).
    pub shot_classes: [usize; 3],
    /// Open-set Rank-1 (None without an open set).
    pub rank1: Option<f64>,
    /// Open-set mAP.
    pub map: Option<f64>,
    /// Open-set TPR at FPR = 1e-3.
    pub tpr_at_fpr_1e3: Option<f64>,
    /// Mean angular std of head classes (training embeddings).
    pub head_angular_std: f64,
    /// Mean angular std of tail classes.
    pub tail_angular_std: f64,
    /// Training count at or above which a class is "head" for the spread.
    pub head_threshold: u64,
    /// Per-class spread.
    pub per_class: Vec<ClassSpread>,
}

impl EvalReport {
    /// `(train count, angular std)` of every class in class order, NaN stds included, so
    /// that the lists of several seeds pair class by class ([`crate::plot::spread_over_seeds`]).
    pub fn spread_points(&self) -> Vec<(u64, f64)> {
        self.per_class.iter().map(|c| (c.train_count, c.angular_std)).collect()
    }
}

/// Evaluates `trainer`'s model on `splits`; classes with at least
/// `head_threshold` training samples count as head for the spread.
pub fn evaluate<B: Backend>(
    trainer: &Trainer<B>,
    splits: &Splits,
    head_threshold: u64,
) -> Result<EvalReport> {
    let d = trainer.embed_dim();
    let c = trainer.num_classes();
    let counts = splits.train.class_counts();
    let w = trainer.head_weights()?;
    let test_emb = trainer.embed(&splits.test.features)?;
    let closed = eval::closed_set(&test_emb, &splits.test.labels, d, &w, c, trainer.subcenters(), &counts)?;
    let (rank1, map, tpr) = match &splits.open_set {
        Some(open) if open.n >= 2 => {
            let emb = trainer.embed(&open.features)?;
            let r = eval::open_set(&emb, &open.labels, d)?;
            (Some(r.rank1), Some(r.map), Some(r.tpr_at_fpr_1e3))
        }
        _ => (None, None, None),
    };
    let train_emb = trainer.embed(&splits.train.features)?;
    let spread = eval::angular_spread(&train_emb, &splits.train.labels, d, c, &counts, head_threshold)?;
    let per_class = spread
        .per_class_std
        .iter()
        .enumerate()
        .map(|(k, &s)| ClassSpread { class: k, train_count: counts[k], angular_std: s })
        .collect();
    Ok(EvalReport {
        top1_overall: closed.overall,
        top1_many: closed.many,
        top1_medium: closed.medium,
        top1_few: closed.few,
        shot_classes: [closed.n_many, closed.n_medium, closed.n_few],
        rank1,
        map,
        tpr_at_fpr_1e3: tpr,
        head_angular_std: spread.head_mean,
        tail_angular_std: spread.tail_mean,
        head_threshold,
        per_class,
    })
}

/// Whether a dataset can be evaluated as an open set (at least 2 rows).
pub fn usable_open_set(ds: &Option<Dataset>) -> bool {
    ds.as_ref().is_some_and(|d| d.n >= 2)
}
