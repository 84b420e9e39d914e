//! `featcloud compare`: baseline (cloud off) and LEAP (cloud on) trained from the
//! same seed and data, evaluated, and printed side by side with the deltas;
//! writes `metrics.json` and `angular_std.png` to `--out`.
//!
//! LEAP default: symmetric cloud, EMA centers, threshold split at T = 100
//! training samples (the SPEC defaults; on the built-in benchmark, whose class
//! sizes run from 300 down to 3, that makes the 24 largest classes "head"),
//! cloud on after 100 warm-up steps.

use crate::cli::{
    cloud_mode, ensure_dir, pct, select_backend, write_json, CloudArg, DataArgs, ModelArgs, Progress,
    SelectedBackend,
};
use crate::config::CloudMode;
use crate::data::Splits;
use crate::engine::report::{evaluate, EvalReport};
use crate::engine::{Backend, TrainConfig, Trainer};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `featcloud compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Data source (default: the built-in long-tailed benchmark).
    #[command(flatten)]
    pub data: DataArgs,
    /// Model and optimization options, shared by both runs (--cloud is LEAP's mode).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory (metrics.json, angular_std.png).
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
}

fn train_one<B: Backend>(
    backend: &B,
    label: &str,
    cfg: TrainConfig,
    splits: &Splits,
    threshold: u64,
) -> anyhow::Result<(EvalReport, f64, Option<f64>, u64)> {
    let start = Instant::now();
    let mut t = Trainer::new(backend, cfg, &splits.train)?;
    let total = t.total_steps();
    let mut progress = Progress::new(label, 0, total);
    t.run(&splits.train, total, |info| progress.step(info))?;
    progress.finish();
    let report = evaluate(&t, splits, threshold)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!("{label}: {total} steps, loss {:.4}, {secs:.1}s", progress.loss().unwrap_or(f64::NAN));
    Ok((report, secs, progress.loss(), total))
}

/// The side-by-side table.
pub fn table(base: &EvalReport, leap: &EvalReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{:<30} {:>10} {:>10} {:>10}", "metric", "baseline", "LEAP", "delta");
    let [nm, nme, nf] = base.shot_classes;
    let acc_rows = [
        ("top-1 overall".to_string(), base.top1_overall, leap.top1_overall),
        (format!("top-1 many-shot ({nm} cls)"), base.top1_many, leap.top1_many),
        (format!("top-1 medium-shot ({nme} cls)"), base.top1_medium, leap.top1_medium),
        (format!("top-1 few-shot ({nf} cls)"), base.top1_few, leap.top1_few),
    ];
    let delta_pp = |a: f64, b: f64| {
        if a.is_finite() && b.is_finite() {
            format!("{:+.2} pp", 100.0 * (b - a))
        } else {
            "n/a".into()
        }
    };
    for (name, a, b) in acc_rows {
        let _ = writeln!(s, "{name:<30} {:>10} {:>10} {:>10}", pct(a), pct(b), delta_pp(a, b));
    }
    let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
    for (name, a, b) in [
        ("open-set Rank-1", nan(base.rank1), nan(leap.rank1)),
        ("open-set mAP", nan(base.map), nan(leap.map)),
        ("open-set TPR@FPR=1e-3", nan(base.tpr_at_fpr_1e3), nan(leap.tpr_at_fpr_1e3)),
    ] {
        let _ = writeln!(s, "{name:<30} {:>10} {:>10} {:>10}", pct(a), pct(b), delta_pp(a, b));
    }
    let rad = |v: f64| if v.is_finite() { format!("{v:.4}") } else { "n/a".into() };
    let drad =
        |a: f64, b: f64| if a.is_finite() && b.is_finite() { format!("{:+.4}", b - a) } else { "n/a".into() };
    for (name, a, b) in [
        ("head angular std (rad)", base.head_angular_std, leap.head_angular_std),
        ("tail angular std (rad)", base.tail_angular_std, leap.tail_angular_std),
    ] {
        let _ = writeln!(s, "{name:<30} {:>10} {:>10} {:>10}", rad(a), rad(b), drad(a, b));
    }
    let ratio = |r: &EvalReport| r.tail_angular_std / r.head_angular_std;
    let _ = writeln!(
        s,
        "{:<30} {:>10} {:>10} {:>10}",
        "tail/head std ratio",
        rad(ratio(base)),
        rad(ratio(leap)),
        drad(ratio(base), ratio(leap))
    );
    s
}

/// Runs `featcloud compare`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.model.cloud == CloudArg::Off {
        anyhow::bail!(
            "--cloud off: compare trains baseline (off) against LEAP, so LEAP needs symmetric or one-sided"
        );
    }
    let leap_cfg = args.model.config(cloud_mode(args.model.cloud))?;
    let base_cfg = TrainConfig {
        head: crate::config::HeadConfig { cloud: CloudMode::Off, ..leap_cfg.head },
        ..leap_cfg.clone()
    };
    let splits = args.data.load()?;
    match select_backend(args.model.backend, args.model.precision)? {
        SelectedBackend::Cpu(be) => run_on(&be, args, base_cfg, leap_cfg, &splits),
        SelectedBackend::Cuda(be) => run_on(&be, args, base_cfg, leap_cfg, &splits),
    }
}

fn run_on<B: Backend>(
    backend: &B,
    args: &Args,
    base_cfg: TrainConfig,
    leap_cfg: TrainConfig,
    splits: &Splits,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let threshold = args.model.threshold;
    let (base, base_secs, base_loss, steps) = train_one(backend, "baseline", base_cfg, splits, threshold)?;
    let (leap, leap_secs, leap_loss, _) = train_one(backend, "LEAP", leap_cfg.clone(), splits, threshold)?;
    let wall = start.elapsed().as_secs_f64();
    if steps <= leap_cfg.stats.warmup_steps {
        eprintln!(
            "warning: the run has {steps} steps but the cloud warms up for {}: LEAP never turned on",
            leap_cfg.stats.warmup_steps
        );
    }

    ensure_dir(&args.out)?;
    let png = args.out.join("angular_std.png");
    let (bp, lp) = (base.spread_points(), leap.spread_points());
    crate::plot::angular_std_vs_size(
        &png,
        &[("baseline", &bp[..]), ("LEAP", &lp[..])],
        "Per-class angular std of the training embeddings vs class size",
    )?;
    let t = &splits.train;
    let metrics = serde_json::json!({
        "command": "compare",
        "backend": backend.name(),
        "data": args.data.describe(),
        "train_rows": t.n, "input_dim": t.f, "num_classes": t.num_classes,
        "test_rows": splits.test.n,
        "open_rows": splits.open_set.as_ref().map(|o| o.n),
        "steps_per_run": steps,
        "wall_seconds": wall,
        "baseline": { "seconds": base_secs, "final_loss": base_loss, "eval": &base },
        "leap": { "seconds": leap_secs, "final_loss": leap_loss, "eval": &leap },
        "config": leap_cfg,
    });
    let json = args.out.join("metrics.json");
    write_json(&json, &metrics)?;

    let h = &leap_cfg.head;
    println!(
        "featcloud compare | backend {} | data {}: train {} x {}, {} classes, test {}, open set {}",
        backend.name(),
        args.data.describe(),
        t.n,
        t.f,
        t.num_classes,
        splits.test.n,
        splits.open_set.as_ref().map_or("none".to_string(), |o| format!("{} rows", o.n)),
    );
    println!(
        "model {} -> {} -> {} + head [{} x {}] | s={} m=({}, {}, {}) | LEAP cloud {:?}, split {:?}, warm-up {} | {} steps per run ({} epochs, batch {}) | wall {:.1}s",
        t.f,
        leap_cfg.hidden,
        leap_cfg.embed_dim,
        t.num_classes,
        leap_cfg.embed_dim,
        h.s,
        h.m1,
        h.m2,
        h.m3,
        h.cloud,
        leap_cfg.stats.split,
        leap_cfg.stats.warmup_steps,
        steps,
        leap_cfg.epochs,
        leap_cfg.batch_size,
        wall
    );
    println!();
    print!("{}", table(&base, &leap));
    println!();
    println!("wrote {} and {}", json.display(), png.display());
    Ok(())
}
