//! `featcloud compare`: baseline (cloud off) and LEAP (cloud on) trained from the
//! same seed and data, evaluated, and printed side by side with the deltas;
//! writes `metrics.json` and `angular_std.png` to `--out`.
//!
//! LEAP default: symmetric cloud, EMA centers, threshold split at T = 100
//! training samples (the SPEC defaults; on the built-in benchmark, whose class
//! sizes run from 300 down to 3, that makes the 24 largest classes "head"),
//! cloud on after 100 warm-up steps.

use crate::cli::{check_out_dir, ensure_dir, select_backend, write_json, Progress, RunArgs, SelectedBackend};
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
    /// Data source (default: the built-in long-tailed benchmark), model and
    /// optimization options, shared by both runs (--cloud is LEAP's mode).
    #[command(flatten)]
    pub run: RunArgs,
    /// Output directory (metrics.json, angular_std.png).
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
    /// Paired runs: baseline and LEAP are trained from seeds seed, seed+1, ...
    /// on the same data; the table shows means and the spread of the paired deltas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub seeds: u64,
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

/// One row of the table: a metric read off a report (NaN when absent).
struct Metric {
    name: String,
    get: fn(&EvalReport) -> f64,
    /// Shown as a percentage (accuracies) rather than radians.
    percent: bool,
}

fn metrics(first: &EvalReport) -> Vec<Metric> {
    let [nm, nme, nf] = first.shot_classes;
    let m = |name: String, get: fn(&EvalReport) -> f64, percent| Metric { name, get, percent };
    vec![
        m("top-1 overall".into(), |r| r.top1_overall, true),
        m(format!("top-1 many-shot ({nm} cls)"), |r| r.top1_many, true),
        m(format!("top-1 medium-shot ({nme} cls)"), |r| r.top1_medium, true),
        m(format!("top-1 few-shot ({nf} cls)"), |r| r.top1_few, true),
        m("open-set Rank-1".into(), |r| r.rank1.unwrap_or(f64::NAN), true),
        m("open-set mAP".into(), |r| r.map.unwrap_or(f64::NAN), true),
        m("open-set TPR@FPR=1e-3".into(), |r| r.tpr_at_fpr_1e3.unwrap_or(f64::NAN), true),
        m("head angular std (rad)".into(), |r| r.head_angular_std, false),
        m("tail angular std (rad)".into(), |r| r.tail_angular_std, false),
        m("tail/head std ratio".into(), |r| r.tail_angular_std / r.head_angular_std, false),
    ]
}

/// Mean and sample standard deviation (0 for one value) of the finite values.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Per metric: mean baseline, mean LEAP, mean and std of the paired delta, seeds where LEAP is higher.
fn summarize(bases: &[EvalReport], leaps: &[EvalReport]) -> Vec<(Metric, f64, f64, f64, f64, usize)> {
    metrics(&bases[0])
        .into_iter()
        .map(|m| {
            let b: Vec<f64> = bases.iter().map(m.get).collect();
            let l: Vec<f64> = leaps.iter().map(m.get).collect();
            let d: Vec<f64> = b.iter().zip(&l).map(|(x, y)| y - x).collect();
            let higher = d.iter().filter(|x| **x > 0.0).count();
            let (mb, _) = mean_std(&b);
            let (ml, _) = mean_std(&l);
            let (md, sd) = mean_std(&d);
            (m, mb, ml, md, sd, higher)
        })
        .collect()
}

fn summary_json(bases: &[EvalReport], leaps: &[EvalReport]) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = summarize(bases, leaps)
        .into_iter()
        .map(|(m, mb, ml, md, sd, higher)| {
            let f = |v: f64| if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null };
            serde_json::json!({
                "metric": m.name, "baseline_mean": f(mb), "leap_mean": f(ml),
                "delta_mean": f(md), "delta_std": f(sd), "leap_higher_in": higher, "runs": bases.len(),
            })
        })
        .collect();
    serde_json::Value::Array(rows)
}

/// The side-by-side table: means over the paired seeds, the mean paired delta
/// with its standard deviation across seeds, and in how many seeds LEAP was higher.
pub fn table(bases: &[EvalReport], leaps: &[EvalReport]) -> String {
    let n = bases.len();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<30} {:>10} {:>10} {:>20} {:>8}",
        if n > 1 { format!("metric (mean of {n} seeds)") } else { "metric".to_string() },
        "baseline",
        "LEAP",
        if n > 1 { "delta (+- std)" } else { "delta" },
        "LEAP >"
    );
    for (m, mb, ml, md, sd, higher) in summarize(bases, leaps) {
        let (val, delta) = if m.percent {
            let v = |x: f64| if x.is_finite() { format!("{:.2}%", 100.0 * x) } else { "n/a".into() };
            let d = if md.is_finite() {
                if n > 1 {
                    format!("{:+.2} +- {:.2} pp", 100.0 * md, 100.0 * sd)
                } else {
                    format!("{:+.2} pp", 100.0 * md)
                }
            } else {
                "n/a".into()
            };
            (v(mb), (v(ml), d))
        } else {
            let v = |x: f64| if x.is_finite() { format!("{x:.4}") } else { "n/a".into() };
            let d = if md.is_finite() {
                if n > 1 {
                    format!("{md:+.4} +- {sd:.4}")
                } else {
                    format!("{md:+.4}")
                }
            } else {
                "n/a".into()
            };
            (v(mb), (v(ml), d))
        };
        let _ = writeln!(
            s,
            "{:<30} {:>10} {:>10} {:>20} {:>8}",
            m.name,
            val,
            delta.0,
            delta.1,
            format!("{higher}/{n}")
        );
    }
    s
}

/// Runs `featcloud compare`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    check_out_dir("--out", &args.out)?;
    if args.run.model.cloud == CloudMode::Off {
        anyhow::bail!(
            "--cloud off: compare trains baseline (off) against LEAP, so LEAP needs symmetric or one-sided"
        );
    }
    let leap_cfg = args.run.model.config()?;
    let base_cfg = TrainConfig {
        head: crate::config::HeadConfig { cloud: CloudMode::Off, ..leap_cfg.head },
        ..leap_cfg.clone()
    };
    let splits = args.run.data.load()?;
    match select_backend(&args.run.model.backend)? {
        SelectedBackend::Cpu(be) => run_on(&be, args, base_cfg, leap_cfg, &splits),
        SelectedBackend::Cuda(be) => run_on(&*be, args, base_cfg, leap_cfg, &splits),
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
    let threshold = args.run.model.threshold;
    let (mut bases, mut leaps) = (Vec::new(), Vec::new());
    let (mut base_secs, mut leap_secs, mut steps) = (0.0, 0.0, 0);
    let (mut base_losses, mut leap_losses) = (Vec::new(), Vec::new());
    for i in 0..args.seeds {
        let seed = leap_cfg.seed + i;
        let tag = |arm: &str| if args.seeds > 1 { format!("{arm} (seed {seed})") } else { arm.to_string() };
        let b = TrainConfig { seed, ..base_cfg.clone() };
        let l = TrainConfig { seed, ..leap_cfg.clone() };
        let (base, secs, loss, n) = train_one(backend, &tag("baseline"), b, splits, threshold)?;
        bases.push(base);
        base_losses.push(loss);
        base_secs += secs;
        steps = n;
        let (leap, secs, loss, _) = train_one(backend, &tag("LEAP"), l, splits, threshold)?;
        leaps.push(leap);
        leap_losses.push(loss);
        leap_secs += secs;
    }
    let wall = start.elapsed().as_secs_f64();
    if steps <= leap_cfg.stats.warmup_steps {
        eprintln!(
            "warning: the run has {steps} steps but the cloud warms up for {}: LEAP never turned on",
            leap_cfg.stats.warmup_steps
        );
    }

    ensure_dir(&args.out)?;
    let png = args.out.join("angular_std.png");
    let over_seeds = |runs: &[EvalReport]| {
        crate::plot::spread_over_seeds(&runs.iter().map(EvalReport::spread_points).collect::<Vec<_>>())
    };
    let (bp, lp) = (over_seeds(&bases), over_seeds(&leaps));
    let seeds = if args.seeds > 1 {
        format!("{} seeds: mean, bar = range", args.seeds)
    } else {
        format!("seed {}", leap_cfg.seed)
    };
    let split_at = match leap_cfg.stats.split {
        crate::config::Split::Threshold(t) => Some(t),
        crate::config::Split::Adaptive => None,
    };
    crate::plot::angular_std_vs_size(
        &png,
        &[("baseline", &bp[..]), ("LEAP", &lp[..])],
        split_at.or(Some(threshold)),
        &format!("Angular std per class (training embeddings) vs class size, {seeds}"),
    )?;
    let t = &splits.train;
    let metrics = serde_json::json!({
        "command": "compare",
        "backend": backend.name(),
        "data": args.run.data.describe(),
        "train_rows": t.n, "input_dim": t.f, "num_classes": t.num_classes,
        "test_rows": splits.test.n,
        "open_rows": splits.open_set.as_ref().map(|o| o.n),
        "steps_per_run": steps,
        "wall_seconds": wall,
        "seeds": (0..args.seeds).map(|i| leap_cfg.seed + i).collect::<Vec<_>>(),
        "summary": summary_json(&bases, &leaps),
        "baseline": { "seconds": base_secs, "final_loss": base_losses, "eval": &bases },
        "leap": { "seconds": leap_secs, "final_loss": leap_losses, "eval": &leaps },
        "config": leap_cfg,
    });
    let json = args.out.join("metrics.json");
    write_json(&json, &metrics)?;

    let h = &leap_cfg.head;
    println!(
        "featcloud compare | backend {} | data {}: train {} x {}, {} classes, test {}, open set {}",
        backend.name(),
        args.run.data.describe(),
        t.n,
        t.f,
        t.num_classes,
        splits.test.n,
        splits.open_set.as_ref().map_or("none".to_string(), |o| format!("{} rows", o.n)),
    );
    println!(
        "model {} -> {} -> {} + head [{} x {}{}] | s={} m=({}, {}, {}) | LEAP cloud {:?}, split {:?}, warm-up {} | {} steps per run ({} epochs, batch {}), {} paired seed(s) | wall {:.1}s",
        t.f,
        leap_cfg.hidden,
        leap_cfg.embed_dim,
        t.num_classes,
        if h.subcenters > 1 { format!("{} x ", h.subcenters) } else { String::new() },
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
        args.seeds,
        wall
    );
    println!();
    print!("{}", table(&bases, &leaps));
    println!();
    println!("wrote {} and {}", json.display(), png.display());
    Ok(())
}
