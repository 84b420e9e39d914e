//! `featcloud eval`: evaluate a checkpoint on the data it was trained on.

use crate::cli::{check_out_file, pct, select_backend, write_json, BackendArgs, DataArgs, SelectedBackend};
use crate::data::Splits;
use crate::engine::report::evaluate;
use crate::engine::{Backend, Checkpoint, Trainer};
use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `featcloud eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The checkpoint to evaluate.
    #[arg(long, value_name = "CKPT")]
    pub checkpoint: PathBuf,
    /// Data source (the same as for training).
    #[command(flatten)]
    pub data: DataArgs,
    /// Training count at or above which a class is "head" in the spread report.
    #[arg(long, default_value_t = 100)]
    pub threshold: u64,
    /// Also write the metrics as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Backend, precision and device.
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Runs `featcloud eval`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(json) = &args.json {
        check_out_file("--json", json)?;
    }
    let ck = Checkpoint::load(&args.checkpoint).context("--checkpoint")?;
    let splits = args.data.load()?;
    match select_backend(&args.backend)? {
        SelectedBackend::Cpu(be) => run_on(&be, args, &ck, &splits),
        SelectedBackend::Cuda(be) => run_on(&*be, args, &ck, &splits),
    }
}

fn run_on<B: Backend>(backend: &B, args: &Args, ck: &Checkpoint, splits: &Splits) -> anyhow::Result<()> {
    let trainer = Trainer::from_checkpoint(backend, ck, &splits.train)
        .with_context(|| format!("--checkpoint {}", args.checkpoint.display()))?;
    let r = evaluate(&trainer, splits, args.threshold)?;
    let opt = |v: Option<f64>| v.map(pct).unwrap_or_else(|| "n/a".into());
    println!("checkpoint   {} (step {}/{})", args.checkpoint.display(), ck.step, ck.total_steps);
    println!(
        "top-1        overall {} | many {} | medium {} | few {}",
        pct(r.top1_overall),
        pct(r.top1_many),
        pct(r.top1_medium),
        pct(r.top1_few)
    );
    println!(
        "open set     Rank-1 {} | mAP {} | TPR@FPR=1e-3 {}",
        opt(r.rank1),
        opt(r.map),
        opt(r.tpr_at_fpr_1e3)
    );
    println!(
        "angular std  head {:.4} rad | tail {:.4} rad (head = >= {} samples)",
        r.head_angular_std, r.tail_angular_std, r.head_threshold
    );
    if let Some(path) = &args.json {
        write_json(
            path,
            &serde_json::json!({ "command": "eval", "checkpoint": args.checkpoint, "step": ck.step, "eval": r }),
        )?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
