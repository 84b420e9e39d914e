//! `featcloud clean`: Sub-center ArcFace's cleaning step (SPEC 5b) on a trained
//! checkpoint. Each class's dominant sub-center is the one most of its training samples
//! are closest to; a training sample farther than `--max-angle` degrees from its class's
//! dominant sub-center is reported as a likely mislabeled sample (`outliers.json`), and
//! with `--write-cleaned` the training data without those samples is written as
//! `features.npy` / `labels.npy`, ready for `featcloud train --features ... --labels ...`.
//!
//! On the built-in benchmark with `--label-noise`, the rows whose labels the noise
//! changed are known (the clean data is the same bits without noise), so the report also
//! says how many outliers are truly mislabeled (precision) and how many of the
//! mislabeled rows were found (recall).

use crate::cli::{
    check_out_dir, ensure_dir, pct, select_backend, write_json, BackendArgs, DataArgs, SelectedBackend,
};
use crate::data::{save_npy_f32, save_npy_i64, Dataset};
use crate::engine::{Backend, Checkpoint, Trainer};
use crate::eval::{subcenter_outliers, OutlierReport};
use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `featcloud clean`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The trained checkpoint (any K; with K = 1 the class weight is the one center).
    #[arg(long, value_name = "CKPT")]
    pub checkpoint: PathBuf,
    /// Data source (the same as for training).
    #[command(flatten)]
    pub data: DataArgs,
    /// A training sample farther than this many degrees from its class's dominant
    /// sub-center is an outlier (Sub-center ArcFace uses 75).
    #[arg(long, value_name = "DEG", default_value_t = 75.0)]
    pub max_angle: f64,
    /// Output directory (outliers.json; features.npy and labels.npy with --write-cleaned).
    #[arg(long, default_value = "runs/clean")]
    pub out: PathBuf,
    /// Also write the training rows that are not outliers as features.npy / labels.npy
    /// (training rows only: with a --test-fraction split the held-out rows are not in
    /// them, so train on them with --test-features/--test-labels to keep the same test set).
    #[arg(long)]
    pub write_cleaned: bool,
    /// Backend, precision and device.
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Runs `featcloud clean`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    check_out_dir("--out", &args.out)?;
    if !(args.max_angle.is_finite() && (0.0..=180.0).contains(&args.max_angle)) {
        anyhow::bail!("--max-angle must be in [0, 180] degrees, got {}", args.max_angle);
    }
    if args.write_cleaned {
        refuse_overwriting_inputs(args)?;
    }
    let ck = Checkpoint::load(&args.checkpoint).context("--checkpoint")?;
    let (splits, file_rows) = args.data.load_with_rows()?;
    let noisy = injected_noise(&args.data, &splits.train)?;
    let train = &splits.train;
    let (report, k) = match select_backend(&args.backend)? {
        SelectedBackend::Cpu(be) => outliers_on(&be, args, &ck, train)?,
        SelectedBackend::Cuda(be) => outliers_on(&*be, args, &ck, train)?,
    };

    let n_out = report.outliers.len();
    println!(
        "checkpoint   {} (K = {k} sub-center{} per class)",
        args.checkpoint.display(),
        if k == 1 { "" } else { "s" }
    );
    println!(
        "outliers     {n_out} of {} training rows ({}) are farther than {}° from their class's dominant sub-center",
        train.n,
        pct(n_out as f64 / train.n.max(1) as f64),
        args.max_angle
    );
    let multi = report.subcenter_counts.iter().filter(|c| c.iter().filter(|&&n| n > 0).count() > 1).count();
    println!(
        "sub-centers  {multi} of {} classes have samples closest to more than one sub-center",
        train.num_classes
    );
    let file_row = |i: usize| file_rows.as_ref().map_or(i, |r| r[i]);
    for o in report.outliers.iter().take(5) {
        println!(
            "  row {:>6}  label {:>5}  {:6.1}°  closest sub-center {}",
            file_row(o.row),
            o.label,
            o.angle_deg,
            o.closest_subcenter
        );
    }
    if n_out > 5 {
        println!("  ... ({} more in outliers.json)", n_out - 5);
    }
    let noise_json = noisy.as_ref().map(|noisy| {
        let hits = report.outliers.iter().filter(|o| noisy[o.row]).count();
        let total = noisy.iter().filter(|&&b| b).count();
        let precision = if n_out == 0 { f64::NAN } else { hits as f64 / n_out as f64 };
        let recall = if total == 0 { f64::NAN } else { hits as f64 / total as f64 };
        println!(
            "label noise  {total} training rows were relabeled: {hits} of them are outliers (recall {}), {hits} of {n_out} outliers are relabeled rows (precision {})",
            pct(recall),
            pct(precision)
        );
        let f = |v: f64| if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null };
        serde_json::json!({ "relabeled_rows": total, "relabeled_outliers": hits, "precision": f(precision), "recall": f(recall) })
    });

    ensure_dir(&args.out)?;
    let rows: Vec<serde_json::Value> = report
        .outliers
        .iter()
        .map(|o| {
            serde_json::json!({ "row": file_row(o.row), "label": o.label, "angle_deg": o.angle_deg, "closest_subcenter": o.closest_subcenter })
        })
        .collect();
    let row_meaning = match &file_rows {
        Some(_) => "row of the --features file (training rows of its --test-fraction split)",
        None if args.data.features.is_some() => "row of the --features file",
        None => "row of the built-in benchmark's training split",
    };
    // The data files first and the report last: an outliers.json on disk means the run
    // finished.
    if args.write_cleaned {
        let mut drop = vec![false; train.n];
        report.outliers.iter().for_each(|o| drop[o.row] = true);
        let keep: Vec<usize> = (0..train.n).filter(|&i| !drop[i]).collect();
        let kept = train.subset(&keep);
        let (fp, lp) = (args.out.join("features.npy"), args.out.join("labels.npy"));
        save_npy_f32(&fp, &kept.features, &[kept.n, kept.f])?;
        save_npy_i64(&lp, &kept.labels.iter().map(|&y| y as i64).collect::<Vec<_>>())?;
        println!("wrote {} and {} ({} rows kept)", fp.display(), lp.display(), kept.n);
        let emptied =
            kept.class_counts().iter().zip(train.class_counts()).filter(|(&k, t)| k == 0 && *t > 0).count();
        if emptied > 0 {
            println!(
                "note: {emptied} class(es) lost all their rows; train on the cleaned files with --num-classes {} to keep the class numbering",
                train.num_classes
            );
        }
    }
    let json_path = args.out.join("outliers.json");
    write_json(
        &json_path,
        &serde_json::json!({
            "command": "clean", "checkpoint": args.checkpoint, "subcenters": k, "max_angle_deg": args.max_angle,
            "training_rows": train.n, "row": row_meaning, "outliers": rows,
            "dominant_subcenter": report.dominant, "subcenter_counts": report.subcenter_counts,
            "label_noise": noise_json,
        }),
    )?;
    println!("wrote {}", json_path.display());
    Ok(())
}

/// Errors when `--write-cleaned` would replace the input files (`--out` being their folder).
fn refuse_overwriting_inputs(args: &Args) -> anyhow::Result<()> {
    let inputs: Vec<PathBuf> = [&args.data.features, &args.data.labels]
        .into_iter()
        .flatten()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    for name in ["features.npy", "labels.npy"] {
        let out = args.out.join(name);
        if std::fs::canonicalize(&out).is_ok_and(|o| inputs.contains(&o)) {
            anyhow::bail!(
                "--out {}: --write-cleaned would overwrite the input file {}",
                args.out.display(),
                out.display()
            );
        }
    }
    Ok(())
}

/// The outlier report of the checkpoint's model on the training rows, and its K.
fn outliers_on<B: Backend>(
    backend: &B,
    args: &Args,
    ck: &Checkpoint,
    train: &Dataset,
) -> anyhow::Result<(OutlierReport, usize)> {
    let t = Trainer::from_checkpoint(backend, ck, train)
        .with_context(|| format!("--checkpoint {}", args.checkpoint.display()))?;
    let emb = t.embed(&train.features)?;
    let w = t.head_weights()?;
    let k = t.subcenters();
    let report =
        subcenter_outliers(&emb, &train.labels, t.embed_dim(), &w, t.num_classes(), k, args.max_angle)?;
    Ok((report, k))
}

/// On the built-in benchmark with `--label-noise`: which training rows the noise
/// relabeled (their labels differ from the same benchmark generated without noise).
fn injected_noise(data: &DataArgs, train: &Dataset) -> anyhow::Result<Option<Vec<bool>>> {
    if data.features.is_some() || data.label_noise == 0.0 {
        return Ok(None);
    }
    let clean = DataArgs { label_noise: 0.0, ..data.clone() }.load()?;
    Ok(Some(train.labels.iter().zip(&clean.train.labels).map(|(a, b)| a != b).collect()))
}
