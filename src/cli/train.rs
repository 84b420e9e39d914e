//! `featcloud train`: train on the built-in benchmark or on user files; writes
//! `checkpoint.safetensors` and `metrics.json` to `--out`, resumes with `--resume`.

use crate::cli::{
    check_out_dir, ensure_dir, pct, select_backend, write_json, Progress, RunArgs, SelectedBackend,
};
use crate::data::Splits;
use crate::engine::report::evaluate;
use crate::engine::{Backend, Checkpoint, TrainConfig, Trainer};
use anyhow::Context;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `featcloud train`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Data source, model and optimization options (the latter ignored with
    /// --resume: the checkpoint's are used).
    #[command(flatten)]
    pub run: RunArgs,
    /// Output directory (checkpoint.safetensors, metrics.json).
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Continue from this checkpoint (same data flags as the original run).
    #[arg(long, value_name = "CKPT")]
    pub resume: Option<PathBuf>,
    /// Stop after this many steps in total (a checkpoint is written; resume later).
    #[arg(long, value_name = "STEPS")]
    pub stop_at: Option<u64>,
    /// Also write the checkpoint every N steps.
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<u64>,
}

/// Runs `featcloud train`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    check_out_dir("--out", &args.out)?;
    let cfg = args.run.model.config()?;
    let checkpoint = match &args.resume {
        Some(p) => Some(Checkpoint::load(p).with_context(|| "--resume".to_string())?),
        None => None,
    };
    let splits = args.run.data.load()?;
    match select_backend(&args.run.model.backend)? {
        SelectedBackend::Cpu(be) => run_on(&be, args, cfg, checkpoint.as_ref(), &splits),
        SelectedBackend::Cuda(be) => run_on(&*be, args, cfg, checkpoint.as_ref(), &splits),
    }
}

fn run_on<B: Backend>(
    backend: &B,
    args: &Args,
    cfg: TrainConfig,
    checkpoint: Option<&Checkpoint>,
    splits: &Splits,
) -> anyhow::Result<()> {
    let mut trainer = match checkpoint {
        Some(ck) => Trainer::from_checkpoint(backend, ck, &splits.train)
            .with_context(|| format!("--resume {}", args.resume.clone().unwrap_or_default().display()))?,
        None => Trainer::new(backend, cfg.clone(), &splits.train)?,
    };
    // A run-control flag: --resume takes the one given now (the checkpoint's would repeat a stop).
    trainer.set_on_nonfinite(cfg.on_nonfinite);
    let total = trainer.total_steps();
    let until = args.stop_at.unwrap_or(total).min(total);
    eprintln!(
        "train: {} | {} rows x {} features, {} classes | steps {} -> {} of {}",
        args.run.data.describe(),
        splits.train.n,
        splits.train.f,
        splits.train.num_classes,
        trainer.step(),
        until,
        total
    );
    let ckpt_path = args.out.join("checkpoint.safetensors");
    // A run killed during a write leaves its temporary file; the next run in the folder
    // removes it (the checkpoint itself is always whole: writes are atomic).
    for file in [&ckpt_path, &args.out.join("metrics.json")] {
        crate::io::remove_stale_temps(file);
    }
    let start = Instant::now();
    let mut progress = Progress::new("train", trainer.step(), total);
    let every = args.checkpoint_every.filter(|&n| n > 0);
    while trainer.step() < until {
        let next = match every {
            Some(n) => ((trainer.step() / n + 1) * n).min(until),
            None => until,
        };
        trainer.run(&splits.train, next, |info| progress.step(info))?;
        if trainer.step() < until {
            ensure_dir(&args.out)?;
            trainer.to_checkpoint()?.save(&ckpt_path)?;
        }
    }
    progress.finish();
    let train_secs = start.elapsed().as_secs_f64();
    let threshold = args.run.model.threshold;
    let report = evaluate(&trainer, splits, threshold)?;
    ensure_dir(&args.out)?;
    trainer.to_checkpoint()?.save(&ckpt_path)?;
    let metrics = serde_json::json!({
        "command": "train",
        "backend": backend.name(),
        "step": trainer.step(),
        "total_steps": total,
        "train_seconds": train_secs,
        "final_loss": progress.loss(),
        "config": trainer.config(),
        "eval": report,
    });
    write_json(&args.out.join("metrics.json"), &metrics)?;
    println!(
        "step {}/{} | loss {:.4} | top-1 {} (many {}, medium {}, few {}) | head/tail angular std {:.4}/{:.4} | {:.1}s",
        trainer.step(),
        total,
        progress.loss().unwrap_or(f64::NAN),
        pct(report.top1_overall),
        pct(report.top1_many),
        pct(report.top1_medium),
        pct(report.top1_few),
        report.head_angular_std,
        report.tail_angular_std,
        train_secs
    );
    println!("wrote {} and {}", ckpt_path.display(), args.out.join("metrics.json").display());
    Ok(())
}
