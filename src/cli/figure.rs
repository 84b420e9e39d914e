//! `featcloud figure`: LEAP's motivating experiment (the paper's Figure 1) and the
//! angular distributions behind it, on the built-in data or the user's files.
//!
//! Protocol: take the K largest training classes (default 8); cut the M smallest of
//! them (default 3) to N training samples each (default 5; which samples is a seeded
//! shuffle, `--data-seed`); train, from the same seed, (a) the baseline on the K full
//! classes, (b) the baseline on the cut set, (c) LEAP on the cut set. The test split of
//! the K classes is the same for all three. Head/tail for the statistics and the reports
//! is the protocol's own: the uncut classes are head (the threshold is the smallest uncut
//! class size), the cut ones tail.
//!
//! Writes to `--out`: `protocol.png` (a PCA projection of each model's test embeddings;
//! in panel c the feature cloud around one tail feature, drawn with the angles the
//! head's cloud draws), `angles.png` (sample-to-center angle histograms of head and tail
//! classes for (b) and (c) with fitted normals and the statistics module's estimates),
//! `figure.json` (every number printed), and, so that `featcloud eval` reproduces each
//! number, the three checkpoints (`full/`, `cut/`, `cut_leap/`) and the data sets they
//! were trained and tested on (`data/*.npy`).

use crate::cli::{
    check_out_dir, ensure_dir, pct, select_backend, write_json, Progress, RunArgs, SelectedBackend,
};
use crate::config::{CloudMode, Split};
use crate::data::{save_npy_f32, save_npy_i64, Dataset, Splits};
use crate::engine::report::{evaluate, EvalReport};
use crate::engine::{Backend, TrainConfig, Trainer};
use crate::eval::projection::{rotate_away, Pca2};
use crate::plot::leap::{AngleGroup, AnglePanel, CloudMarks, ScatterPanel};
use crate::stats::StatsSummary;
use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Arguments of `featcloud figure`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Data source (default: the built-in benchmark) and model options, shared by the
    /// three runs (--cloud is LEAP's mode; --split and --threshold are set by the protocol).
    #[command(flatten)]
    pub run: RunArgs,
    /// Output folder.
    #[arg(long, default_value = "runs/figure")]
    pub out: PathBuf,
    /// K: how many of the largest training classes the protocol keeps.
    #[arg(long, default_value_t = 8)]
    pub top_classes: usize,
    /// M: how many of those (the smallest) are cut down to tail classes.
    #[arg(long, default_value_t = 3)]
    pub cut_classes: usize,
    /// N: training samples each cut class keeps.
    #[arg(long, default_value_t = 5)]
    pub cut_to: usize,
    /// Cloud draws drawn around the tail feature in panel c.
    #[arg(long, default_value_t = 48)]
    pub cloud_draws: usize,
}

/// The protocol's data: the K classes relabeled 0..K-1 (in order of size, largest first).
struct Protocol {
    /// Original class index of each new class.
    original: Vec<usize>,
    /// Per new class: cut to a tail class.
    tail: Vec<bool>,
    /// Smallest uncut class size: the head/tail threshold.
    threshold: u64,
    full: Dataset,
    cut: Dataset,
    test: Dataset,
    /// The test labels as class indices (what the plot takes).
    test_classes: Vec<usize>,
}

fn protocol(args: &Args, splits: &Splits) -> anyhow::Result<Protocol> {
    let (k, m, n) = (args.top_classes, args.cut_classes, args.cut_to);
    let counts = splits.train.class_counts();
    if k < 2 || k > counts.len() {
        anyhow::bail!("--top-classes must be in 2..={} (the classes of the data), got {k}", counts.len());
    }
    if m < 1 || m >= k {
        anyhow::bail!("--cut-classes must be in 1..{k} (some classes must stay whole), got {m}");
    }
    if n < 2 {
        anyhow::bail!("--cut-to must be >= 2 (an angular spread needs two samples), got {n}");
    }
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let original: Vec<usize> = order[..k].to_vec();
    let tail: Vec<bool> = (0..k).map(|i| i >= k - m).collect();
    let threshold = counts[original[k - m - 1]];
    let smallest_cut = counts[original[k - 1]];
    if n as u64 >= smallest_cut {
        anyhow::bail!(
            "--cut-to {n}: the smallest class to cut has {smallest_cut} training samples, so it would not be cut \
             (take fewer --top-classes, or a smaller --cut-to)"
        );
    }
    let new_of = |c: i32| original.iter().position(|&o| o == c as usize);
    let relabel = |ds: &Dataset, keep: &dyn Fn(usize, usize) -> bool| -> anyhow::Result<Dataset> {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (i, &label) in ds.labels.iter().enumerate() {
            if let Some(c) = new_of(label) {
                if keep(i, c) {
                    x.extend_from_slice(ds.row(i));
                    y.push(c as i32);
                }
            }
        }
        Ok(Dataset::new(x, y, ds.f, k)?)
    };
    // The rows each cut class keeps: the first N of a seeded shuffle of its rows.
    let mut rng = ChaCha8Rng::seed_from_u64(args.run.data.data_seed);
    let mut kept = vec![false; splits.train.n];
    for (c, &orig) in original.iter().enumerate() {
        let mut rows: Vec<usize> =
            (0..splits.train.n).filter(|&i| splits.train.labels[i] as usize == orig).collect();
        if tail[c] {
            for i in (1..rows.len()).rev() {
                rows.swap(i, rng.random_range(0..=i));
            }
            rows.truncate(n);
        }
        rows.into_iter().for_each(|i| kept[i] = true);
    }
    let full = relabel(&splits.train, &|_, _| true)?;
    let cut = relabel(&splits.train, &|i, _| kept[i])?;
    let test = relabel(&splits.test, &|_, _| true)?;
    if test.n < 2 {
        anyhow::bail!("the test split holds {} rows of the {k} largest classes: too few to draw", test.n);
    }
    let test_classes = test.labels.iter().map(|&l| l as usize).collect();
    Ok(Protocol { original, tail, threshold, full, cut, test, test_classes })
}

/// What one setting's run gave.
#[derive(Serialize)]
struct Setting {
    /// "full", "cut" or "cut_leap".
    name: &'static str,
    /// What was trained.
    description: String,
    /// The report `featcloud eval` gives for this checkpoint and data.
    eval: EvalReport,
    /// Top-1 over the test samples of the tail (cut) classes.
    tail_top1: f64,
    /// Per class: angular std of the test embeddings (what the picture shows), radians.
    test_angular_std: Vec<f64>,
    /// The statistics module's state at the end of training.
    stats: StatsSummary,
    /// Training loss at the last step.
    final_loss: Option<f64>,
    #[serde(skip)]
    test_points: Vec<[f64; 2]>,
    /// Share of the test embeddings' variance on the two principal axes drawn.
    #[serde(skip)]
    explained: [f64; 2],
    #[serde(skip)]
    cloud: Option<CloudMarks>,
    /// Angles of the training samples to their class center minus the class's mean angle,
    /// head classes pooled.
    #[serde(skip)]
    head_angles: Vec<f64>,
    /// The same for the tail classes.
    #[serde(skip)]
    tail_angles: Vec<f64>,
}

/// Runs `featcloud figure`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    check_out_dir("--out", &args.out)?;
    let base = args.run.model.config()?;
    if base.head.cloud == CloudMode::Off {
        anyhow::bail!("--cloud off: the figure shows LEAP's cloud, so it needs symmetric or one-sided");
    }
    let splits = args.run.data.load()?;
    let p = protocol(args, &splits)?;
    // The protocol sets the split itself; say so rather than ignore the flags silently.
    let model = &args.run.model;
    if model.split != crate::config::SplitKind::Threshold || model.threshold != 100 {
        eprintln!(
            "figure: --split and --threshold are set by the protocol (threshold {}: the smallest uncut class); \
             the values given are not used",
            p.threshold
        );
    }
    match select_backend(&args.run.model.backend)? {
        SelectedBackend::Cpu(be) => run_on(&be, args, base, &p),
        SelectedBackend::Cuda(be) => run_on(&*be, args, base, &p),
    }
}

fn run_on<B: Backend>(backend: &B, args: &Args, base: TrainConfig, p: &Protocol) -> anyhow::Result<()> {
    let split = Split::Threshold(p.threshold);
    let leap_cfg = TrainConfig { stats: crate::config::StatsConfig { split, ..base.stats.clone() }, ..base };
    let off = |c: &TrainConfig| TrainConfig {
        head: crate::config::HeadConfig { cloud: CloudMode::Off, ..c.head },
        ..c.clone()
    };
    let (k, m, n) = (args.top_classes, args.cut_classes, args.cut_to);
    let runs = [
        ("full", format!("a) baseline, {k} classes in full"), off(&leap_cfg), &p.full),
        ("cut", format!("b) baseline, {m} of them cut to {n} samples"), off(&leap_cfg), &p.cut),
        ("cut_leap", format!("c) LEAP, {m} of them cut to {n} samples"), leap_cfg.clone(), &p.cut),
    ];
    ensure_dir(&args.out)?;
    let data_dir = args.out.join("data");
    ensure_dir(&data_dir)?;
    save_dataset(&data_dir, "full_train", &p.full)?;
    save_dataset(&data_dir, "cut_train", &p.cut)?;
    save_dataset(&data_dir, "test", &p.test)?;

    let mut settings = Vec::new();
    for (name, description, cfg, train) in runs {
        let s = run_setting(backend, args, p, name, description, cfg, train)?;
        settings.push(s);
    }

    let title_data = args.run.data.describe();
    let panels: Vec<ScatterPanel> = settings
        .iter()
        .enumerate()
        .map(|(i, s)| ScatterPanel {
            title: s.description.clone(),
            points: &s.test_points,
            classes: &p.test_classes,
            tail: &p.tail,
            cloud: s.cloud.clone(),
            class_legend: i == 0,
            explained: Some(s.explained),
        })
        .collect();
    // d) panel c around the cloud, zoomed in: a cloud of a few hundredths of a radian is a
    // dot at the scale of the classes.
    let (zoom_points, zoom_classes) = match &settings[2].cloud {
        Some(c) => {
            let reach =
                c.samples.iter().map(|q| (q[0] - c.anchor[0]).hypot(q[1] - c.anchor[1])).fold(0.0, f64::max);
            let h = (2.0 * reach).max(1e-3);
            let near = |q: &[f64; 2]| (q[0] - c.anchor[0]).abs() <= h && (q[1] - c.anchor[1]).abs() <= h;
            settings[2]
                .test_points
                .iter()
                .zip(&p.test_classes)
                .filter(|(q, _)| near(q))
                .map(|(q, &k)| (*q, k))
                .unzip()
        }
        None => (Vec::new(), Vec::new()),
    };
    let mut panels = panels;
    if let Some(c) = &settings[2].cloud {
        panels.push(ScatterPanel {
            title: "d) panel c, zoomed in: the cloud moves the angle only".into(),
            points: &zoom_points,
            classes: &zoom_classes,
            tail: &p.tail,
            cloud: Some(c.clone()),
            class_legend: false,
            explained: Some(settings[2].explained),
        });
    }
    let protocol_png = args.out.join("protocol.png");
    crate::plot::leap::protocol_figure(
        &protocol_png,
        &panels,
        &format!(
            "Test embeddings (PCA) of the {k} largest classes, {title_data}; triangles: the {m} tail classes"
        ),
    )?;
    let angles_png = args.out.join("angles.png");
    let angle_panels: Vec<AnglePanel> = settings[1..].iter().map(|s| angle_panel(s, &p.tail)).collect();
    crate::plot::leap::angle_histograms(
        &angles_png,
        &angle_panels,
        "angle to the class center minus the class's mean angle (rad)",
        "Within-class angular spread of the training samples: head vs tail classes",
    )?;
    let json = args.out.join("figure.json");
    write_json(
        &json,
        &serde_json::json!({
            "command": "figure",
            "backend": backend.name(),
            "data": title_data,
            "classes": { "original": p.original, "tail": p.tail },
            "top_classes": k, "cut_classes": m, "cut_to": n,
            "head_threshold": p.threshold,
            "settings": settings,
            "config": leap_cfg,
        }),
    )?;
    print_table(&settings, p);
    let data = |f: &str| data_dir.join(f).display().to_string();
    println!(
        "each setting's numbers are `featcloud eval --checkpoint {} --features {} --labels {} \
         --test-features {} --test-labels {} --threshold {}` (cut, cut_leap: the cut_train files)",
        args.out.join("full").join("checkpoint.safetensors").display(),
        data("full_train_x.npy"),
        data("full_train_y.npy"),
        data("test_x.npy"),
        data("test_y.npy"),
        p.threshold
    );
    println!("wrote {}, {} and {}", protocol_png.display(), angles_png.display(), json.display());
    Ok(())
}

fn save_dataset(dir: &Path, name: &str, ds: &Dataset) -> anyhow::Result<()> {
    save_npy_f32(&dir.join(format!("{name}_x.npy")), &ds.features, &[ds.n, ds.f])?;
    let y: Vec<i64> = ds.labels.iter().map(|&l| l as i64).collect();
    save_npy_i64(&dir.join(format!("{name}_y.npy")), &y)?;
    Ok(())
}

fn run_setting<B: Backend>(
    backend: &B,
    args: &Args,
    p: &Protocol,
    name: &'static str,
    description: String,
    cfg: TrainConfig,
    train: &Dataset,
) -> anyhow::Result<Setting> {
    let mut t = Trainer::new(backend, cfg.clone(), train)?;
    let total = t.total_steps();
    let mut progress = Progress::new(name, 0, total);
    t.run(train, total, |info| progress.step(info)).with_context(|| description.clone())?;
    progress.finish();
    let dir = args.out.join(name);
    ensure_dir(&dir)?;
    let ck = t.to_checkpoint()?;
    ck.save(&dir.join("checkpoint.safetensors"))?;
    // The same evaluation as `featcloud eval` on the saved data (no open set here).
    let splits = Splits { train: train.clone(), test: p.test.clone(), open_set: None };
    let eval = evaluate(&t, &splits, p.threshold)?;
    let d = t.embed_dim();
    let w = t.head_weights()?;
    let test_emb = t.embed(&p.test.features)?;
    let pred = crate::eval::predict(&test_emb, d, &w, p.tail.len(), t.subcenters())?;
    let tail_rows: Vec<usize> = (0..p.test.n).filter(|&i| p.tail[p.test.labels[i] as usize]).collect();
    let tail_top1 = if tail_rows.is_empty() {
        f64::NAN
    } else {
        tail_rows.iter().filter(|&&i| pred[i] == p.test.labels[i] as usize).count() as f64
            / tail_rows.len() as f64
    };
    let counts = train.class_counts();
    let test_spread =
        crate::eval::angular_spread(&test_emb, &p.test.labels, d, p.tail.len(), &counts, p.threshold)?;
    let pca = Pca2::fit(&test_emb, d)?;
    let test_points = pca.project_rows(&test_emb);
    let train_emb = t.embed(&train.features)?;
    // Each class's angles minus its mean angle, pooled per group: the within-class spread
    // the statistics module estimates (pooling raw angles would mix in how far apart the
    // classes' mean angles are).
    let by_class = crate::eval::class_angles(&train_emb, &train.labels, d, p.tail.len())?;
    let pooled = |want: bool| -> Vec<f64> {
        let groups = by_class.iter().zip(&p.tail).filter(|(a, &t)| t == want && !a.is_empty());
        groups
            .flat_map(|(a, _)| {
                let mean = a.iter().sum::<f64>() / a.len() as f64;
                a.iter().map(move |v| v - mean)
            })
            .collect()
    };
    let (head_angles, tail_angles) = (pooled(false), pooled(true));
    let stats = ck.stats.summary()?;
    let cloud = if cfg.head.cloud == CloudMode::Off {
        None
    } else {
        cloud_marks(args, p, &cfg, train, &train_emb, &w, d, &ck.stats.cloud_sigma(), total, &pca)
    };
    Ok(Setting {
        name,
        description,
        eval,
        tail_top1,
        test_angular_std: test_spread.per_class_std,
        stats,
        final_loss: progress.loss(),
        test_points,
        explained: pca.explained,
        cloud,
        head_angles,
        tail_angles,
    })
}

/// The cloud around the first training feature of the tail class with the widest cloud
/// (the lowest such class among ties): the head's own
/// draws alpha = `cloud_alpha(cfg, sigma, y, seed, step, row 0)` over the run's last
/// `--cloud-draws` steps, each applied as a rotation of the feature's angle to its class
/// weight (the target angle theta + alpha of SPEC 3), projected with the panel's PCA.
#[allow(clippy::too_many_arguments)]
fn cloud_marks(
    args: &Args,
    p: &Protocol,
    cfg: &TrainConfig,
    train: &Dataset,
    train_emb: &[f32],
    w: &[f32],
    d: usize,
    sigma: &[f64],
    total_steps: u64,
    pca: &Pca2,
) -> Option<CloudMarks> {
    // The tail class with the widest cloud (the lowest index among ties).
    let y = (0..p.tail.len()).filter(|&k| p.tail[k]).fold(None, |best: Option<usize>, k| match best {
        Some(b) if sigma[b] >= sigma[k] => Some(b),
        _ => Some(k),
    })?;
    let row = train.labels.iter().position(|&l| l as usize == y)?;
    let x: Vec<f64> = train_emb[row * d..(row + 1) * d].iter().map(|&v| v as f64).collect();
    // The cloud moves the angle to the target's dominant sub-center (SPEC 5b): class y's
    // closest of its K rows (K = 1: row y).
    let k = cfg.head.subcenters as usize;
    let cos = |r: usize| {
        let wr = &w[r * d..(r + 1) * d];
        let n = wr.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt().max(1e-12);
        wr.iter().zip(&x).map(|(&a, b)| a as f64 * b).sum::<f64>() / n
    };
    let ry = (y * k + 1..(y + 1) * k).fold(y * k, |best, r| if cos(r) > cos(best) { r } else { best });
    let wy: Vec<f64> = w[ry * d..(ry + 1) * d].iter().map(|&v| v as f64).collect();
    let sigma32: Vec<f32> = sigma.iter().map(|&s| s as f32).collect();
    let first = total_steps.saturating_sub(args.cloud_draws as u64);
    let samples = (first..total_steps)
        .filter_map(|step| {
            let alpha = crate::oracle::head::cloud_alpha(&cfg.head, &sigma32, y, cfg.seed, step, 0);
            rotate_away(&x, &wy, alpha).map(|v| pca.project(&v))
        })
        .collect();
    Some(CloudMarks {
        anchor: pca.project(&x),
        samples,
        label: format!("cloud, class {y} (sigma {:.3})", sigma[y]),
    })
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    (m, (v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / n).sqrt())
}

fn angle_panel<'a>(s: &'a Setting, tail: &[bool]) -> AnglePanel<'a> {
    let (head, tails) = (&s.head_angles[..], &s.tail_angles[..]);
    let st = &s.stats;
    let sigma_h = st.head_variance.map(f64::sqrt);
    let cloud: Vec<(usize, f64)> =
        st.classes.iter().filter(|c| tail[c.class]).map(|c| (c.class, c.cloud_std)).collect();
    let mut notes = vec![match sigma_h {
        Some(h) => format!("statistics module: sigma_h {h:.3}, sigma_t {:.3} rad", st.tail.mean_angular_std),
        None => "statistics module: no head variance yet".to_string(),
    }];
    notes.push(format!(
        "cloud sigma per tail class: {}",
        cloud.iter().map(|(k, c)| format!("{k}: {c:.3}")).collect::<Vec<_>>().join(", ")
    ));
    let (mt, sd_t) = mean_std(tails);
    let mean_cloud = if cloud.is_empty() {
        0.0
    } else {
        cloud.iter().map(|c| c.1 * c.1).sum::<f64>() / cloud.len() as f64
    };
    let extra = (mean_cloud > 0.0 && s.name == "cut_leap")
        .then(|| ("tail with its cloud".to_string(), mt, (sd_t * sd_t + mean_cloud).sqrt()));
    AnglePanel {
        title: s.description.clone(),
        groups: vec![
            AngleGroup { name: "head".into(), angles: head, fit: mean_std(head) },
            AngleGroup { name: "tail".into(), angles: tails, fit: mean_std(tails) },
        ],
        extra_curve: extra,
        notes,
    }
}

fn print_table(settings: &[Setting], p: &Protocol) {
    let k = p.tail.len();
    println!(
        "featcloud figure | classes {:?} (original indices), tail {:?}, head/tail threshold {}",
        p.original,
        (0..k).filter(|&c| p.tail[c]).collect::<Vec<_>>(),
        p.threshold
    );
    println!(
        "{:<44} {:>10} {:>10} {:>14} {:>14}",
        "setting", "top-1", "tail top-1", "head std (tr)", "tail std (tr)"
    );
    for s in settings {
        println!(
            "{:<44} {:>10} {:>10} {:>14.4} {:>14.4}",
            s.description,
            pct(s.eval.top1_overall),
            pct(s.tail_top1),
            s.eval.head_angular_std,
            s.eval.tail_angular_std
        );
    }
    println!(
        "per-class angular std, rad (training embeddings as `eval` reports them | test embeddings as drawn):"
    );
    print!("{:<8} {:>7}", "class", "tail");
    for s in settings {
        print!(" {:>19}", s.name);
    }
    println!();
    for c in 0..k {
        print!("{:<8} {:>7}", c, if p.tail[c] { "yes" } else { "" });
        for s in settings {
            print!(" {:>9.4} | {:<7.4}", s.eval.per_class[c].angular_std, s.test_angular_std[c]);
        }
        println!();
    }
}
