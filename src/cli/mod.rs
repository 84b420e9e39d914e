//! The `featcloud` command line: `train`, `eval`, `clean`, `compare`, `figure`, `smoke`, `info`, `bench`.
//!
//! Errors are one line on stderr (`error: ...`, naming the file or flag),
//! exit code non-zero, never a panic; output files are written atomically, so
//! a failed command leaves no partial file behind.

pub mod bench;
pub mod clean;
pub mod compare;
pub mod eval;
pub mod figure;
pub mod info;
pub mod smoke;
pub mod train;

use crate::config::{
    CenterMode, CloudMode, Fallback, HeadConfig, MarginGrad, Reduction, Split, SplitKind, StatsConfig,
};
use crate::cpu::CpuBackend;
use crate::cuda::backend::{CudaBackend, Precision};
use crate::data::{self, Splits, SyntheticConfig};
use crate::engine::{NonFinitePolicy, OptimizerConfig, OptimizerKind, StepInfo, TrainConfig};
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(
    name = "featcloud",
    version,
    about = "Margin heads (ArcFace/CosFace) with LEAP feature clouds for long-tailed data"
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train an embedding model + margin head; writes a checkpoint and metrics.
    Train(train::Args),
    /// Evaluate a checkpoint (closed set, open set, angular spread).
    Eval(eval::Args),
    /// Find the training samples far from their class's dominant sub-center (likely
    /// mislabeled); report them and optionally write the data without them.
    Clean(clean::Args),
    /// Train baseline and LEAP from the same seed and data; print them side by side.
    Compare(compare::Args),
    /// LEAP's motivating experiment: largest classes, some cut to a few samples, three
    /// models; writes the embedding and angular-distribution figures.
    Figure(figure::Args),
    /// Quick self-check of the kernels against the oracle.
    Smoke(smoke::Args),
    /// What was built in and which device is present.
    Info(info::Args),
    /// Benchmark the head kernels.
    Bench(bench::Args),
}

/// Runs a parsed command line.
pub fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Clean(a) => clean::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Figure(a) => figure::run(a),
        Command::Smoke(a) => smoke::run(a),
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// Entry point of the binary: parse, run, and turn every failure into one line.
pub fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string().replace('\n', " ");
        eprintln!("error: internal error (please report): {msg}");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return clap_error(e),
    };
    match std::panic::catch_unwind(|| run(&cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::from(101),
    }
}

/// An error chain as one line: `outer: inner: ...`.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// clap errors as one line (help and version are printed as usual).
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(2);
        }
        _ => {}
    }
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let extra = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("[possible values:") || l.starts_with("tip:"))
        .map(|l| format!(" {l}"))
        .unwrap_or_default();
    eprintln!("error: {first}{extra}");
    ExitCode::from(2)
}

/// `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// CUDA when a GPU and the CUDA training backend are available, else CPU.
    Auto,
    /// The CUDA backend (error if unavailable).
    Cuda,
    /// The CPU backend.
    Cpu,
}

/// `--device`: which device the CUDA code runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// GPU 0.
    #[default]
    Gpu,
    /// The CPU emulator running the same kernels and launches (slow; for checking the
    /// CUDA code path on a machine without a GPU; builds with the `emu` feature).
    Emu,
}

/// Opens the device `--device` names.
pub fn open_device(device: DeviceArg) -> crate::Result<std::sync::Arc<crate::cuda::Device>> {
    match device {
        DeviceArg::Gpu => crate::cuda::Device::new(0),
        DeviceArg::Emu => crate::cuda::Device::emulated(132),
    }
}

/// The backend a command runs on. Commands are generic over [`crate::engine::Backend`]
/// and match on this once.
pub enum SelectedBackend {
    /// The CPU backend.
    Cpu(CpuBackend),
    /// The CUDA backend on GPU 0.
    Cuda(Box<CudaBackend>),
}

fn cuda_backend(precision: Precision, device: DeviceArg) -> crate::Result<CudaBackend> {
    CudaBackend::new(open_device(device)?, precision)
}

/// Picks the backend for `choice` (auto: CUDA when GPU 0 starts and the kernels
/// are built, else CPU); prints which one is used.
pub fn select_backend(args: &BackendArgs) -> anyhow::Result<SelectedBackend> {
    let BackendArgs { backend: choice, precision, device } = *args;
    let cpu = |why: String| {
        let be = CpuBackend::new();
        eprintln!("backend: {}{why}", crate::engine::Backend::name(&be));
        SelectedBackend::Cpu(be)
    };
    match choice {
        BackendChoice::Cpu => Ok(cpu(String::new())),
        BackendChoice::Cuda => {
            let be = cuda_backend(precision, device).map_err(|e| anyhow::anyhow!("--backend cuda: {e}"))?;
            eprintln!("backend: {}", crate::engine::Backend::name(&be));
            Ok(SelectedBackend::Cuda(Box::new(be)))
        }
        BackendChoice::Auto => match cuda_backend(precision, device) {
            Ok(be) => {
                eprintln!("backend: {} (auto)", crate::engine::Backend::name(&be));
                Ok(SelectedBackend::Cuda(Box::new(be)))
            }
            Err(e) => Ok(cpu(format!(" (auto: {e})"))),
        },
    }
}

/// Backend options, shared by every command that trains or evaluates.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct BackendArgs {
    /// Backend.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// CUDA precision: bf16 operand copies with f32 master weights, or f32.
    #[arg(long, value_enum, default_value_t = Precision::Bf16)]
    pub precision: Precision,
    /// Device of the CUDA backend: GPU 0, or the CPU emulator of it (tiny data only).
    #[arg(long, value_enum, default_value_t = DeviceArg::Gpu)]
    pub device: DeviceArg,
}

/// Where the data comes from: the built-in synthetic benchmark (default) or files.
#[derive(Debug, Clone, clap::Args)]
pub struct DataArgs {
    /// Training features, .npy [N, F] f32/f64 or .safetensors (then also holds labels).
    #[arg(long, value_name = "PATH")]
    pub features: Option<PathBuf>,
    /// Training labels, .npy of N integers in [0, C).
    #[arg(long, value_name = "PATH", requires = "features")]
    pub labels: Option<PathBuf>,
    /// Number of classes C (default: max label + 1).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// Test features (default: a --test-fraction split of the training files).
    #[arg(long, value_name = "PATH", requires = "features")]
    pub test_features: Option<PathBuf>,
    /// Test labels.
    #[arg(long, value_name = "PATH", requires = "test_features")]
    pub test_labels: Option<PathBuf>,
    /// Fraction of the training files held out as the test set when no test files are given.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Open-set features (classes never trained on) for retrieval metrics.
    #[arg(long, value_name = "PATH", requires = "features")]
    pub open_features: Option<PathBuf>,
    /// Open-set labels.
    #[arg(long, value_name = "PATH", requires = "open_features")]
    pub open_labels: Option<PathBuf>,
    /// Seed of the synthetic benchmark and of the --test-fraction split.
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Synthetic: number of training classes.
    #[arg(long, default_value_t = 100)]
    pub classes: usize,
    /// Synthetic: input feature dimension.
    #[arg(long, default_value_t = 64)]
    pub input_dim: usize,
    /// Synthetic: training samples of the largest class.
    #[arg(long, default_value_t = 300)]
    pub max_per_class: usize,
    /// Synthetic: head/tail count ratio.
    #[arg(long, default_value_t = 100.0)]
    pub imbalance: f64,
    /// Synthetic: test samples per class.
    #[arg(long, default_value_t = 20)]
    pub test_per_class: usize,
    /// Synthetic: held-out open-set classes.
    #[arg(long, default_value_t = 20)]
    pub open_classes: usize,
    /// Synthetic: samples per open-set class.
    #[arg(long, default_value_t = 20)]
    pub open_per_class: usize,
    /// Synthetic: fraction of the training labels reassigned to a random other class
    /// (label noise; the test split stays clean).
    #[arg(long, default_value_t = 0.0)]
    pub label_noise: f64,
}

impl DataArgs {
    /// A short description of the data source.
    pub fn describe(&self) -> String {
        match &self.features {
            Some(p) => format!("files ({})", p.display()),
            None if self.label_noise > 0.0 => {
                format!("synthetic (seed {}, label noise {})", self.data_seed, self.label_noise)
            }
            None => format!("synthetic (seed {})", self.data_seed),
        }
    }

    /// Loads or generates the splits.
    pub fn load(&self) -> anyhow::Result<Splits> {
        Ok(self.load_with_rows()?.0)
    }

    /// [`DataArgs::load`], and for each training row its row in the `--features` file (the
    /// rows a `--test-fraction` split kept for training); `None` when training rows are the
    /// file's rows (test files given) or the data is the synthetic benchmark.
    pub fn load_with_rows(&self) -> anyhow::Result<(Splits, Option<Vec<usize>>)> {
        let Some(features) = &self.features else {
            let cfg = SyntheticConfig {
                num_classes: self.classes,
                input_dim: self.input_dim,
                max_per_class: self.max_per_class,
                imbalance: self.imbalance,
                test_per_class: self.test_per_class,
                open_classes: self.open_classes,
                open_per_class: self.open_per_class,
                seed: self.data_seed,
                label_noise: self.label_noise,
                ..SyntheticConfig::default()
            };
            return Ok((data::generate(&cfg).context("synthetic benchmark")?, None));
        };
        let labels = labels_for(features, self.labels.as_deref(), "--labels")?;
        let ds = data::load_dataset(features, labels, self.num_classes)?;
        let (train, test, rows) = match &self.test_features {
            Some(tf) => {
                let tl = labels_for(tf, self.test_labels.as_deref(), "--test-labels")?;
                let test = data::load_dataset(tf, tl, Some(ds.num_classes))?;
                if test.f != ds.f {
                    anyhow::bail!(
                        "{}: test features have {} columns, training features {}",
                        tf.display(),
                        test.f,
                        ds.f
                    );
                }
                (ds, test, None)
            }
            None => {
                if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
                    anyhow::bail!("--test-fraction must be in (0, 1), got {}", self.test_fraction);
                }
                let (train_rows, test_rows) =
                    data::split_fraction_rows(&ds, self.test_fraction, self.data_seed)?;
                (ds.subset(&train_rows), ds.subset(&test_rows), Some(train_rows))
            }
        };
        let open_set = match &self.open_features {
            Some(of) => {
                let ol = labels_for(of, self.open_labels.as_deref(), "--open-labels")?;
                let open = data::load_dataset(of, ol, None)?;
                if open.f != train.f {
                    anyhow::bail!(
                        "{}: open-set features have {} columns, training features {}",
                        of.display(),
                        open.f,
                        train.f
                    );
                }
                Some(open)
            }
            None => None,
        };
        Ok((Splits { train, test, open_set }, rows))
    }
}

/// The labels file for `features`: the given one, or the same file when it is a
/// `.safetensors` holding both (an `.npy` needs its own labels file).
fn labels_for<'a>(features: &'a Path, labels: Option<&'a Path>, flag: &str) -> anyhow::Result<&'a Path> {
    match labels {
        Some(l) => Ok(l),
        None if features.extension().is_some_and(|e| e == "safetensors") => Ok(features),
        None => anyhow::bail!(
            "{flag} is required with {} (only a .safetensors file holds both)",
            features.display()
        ),
    }
}

/// `--margin` presets (SPEC section 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MarginPreset {
    /// (m1, m2, m3) = (1, 0.5, 0).
    Arcface,
    /// (1, 0, 0.35).
    Cosface,
    /// (1, 0.3, 0.2).
    Combined,
}

/// Model, head, statistics and optimizer options (every SPEC option has a flag).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Seed of model init, batch order and the cloud RNG.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Passes over the training set.
    #[arg(long, default_value_t = 100)]
    pub epochs: u64,
    /// Rows per step.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Hidden width of the MLP.
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// Embedding dimension D.
    #[arg(long, default_value_t = 64)]
    pub embed_dim: usize,
    /// Margin preset; --m1/--m2/--m3 override its values.
    #[arg(long, value_enum, default_value_t = MarginPreset::Arcface)]
    pub margin: MarginPreset,
    /// Logit scale s.
    #[arg(long, default_value_t = 64.0)]
    pub scale: f32,
    /// Multiplicative angular margin m1.
    #[arg(long)]
    pub m1: Option<f32>,
    /// Additive angular margin m2.
    #[arg(long)]
    pub m2: Option<f32>,
    /// Additive cosine margin m3.
    #[arg(long)]
    pub m3: Option<f32>,
    /// Feature-cloud mode (compare: the LEAP run's mode).
    #[arg(long, value_enum, default_value_t = CloudMode::Symmetric)]
    pub cloud: CloudMode,
    /// Loss reduction.
    #[arg(long, value_enum, default_value_t = Reduction::Mean)]
    pub reduction: Reduction,
    /// Label smoothing in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f32,
    /// Gradient of the margin.
    #[arg(long, value_enum, default_value_t = MarginGrad::Exact)]
    pub margin_grad: MarginGrad,
    /// What happens when the margin pushes the angle past pi.
    #[arg(long, value_enum, default_value_t = Fallback::Linear)]
    pub fallback: Fallback,
    /// Sub-centers per class K (Sub-center ArcFace, SPEC 5b): each class gets K weight
    /// rows and a sample is scored against its closest one; K > 1 absorbs mislabeled
    /// samples (see `featcloud clean`).
    #[arg(long, default_value_t = 1)]
    pub subcenters: u32,
    /// EMA momentum of the class statistics.
    #[arg(long, default_value_t = 0.9)]
    pub beta: f32,
    /// Center of the angular statistics.
    #[arg(long, value_enum, default_value_t = CenterMode::Ema)]
    pub center: CenterMode,
    /// Head/tail split of the statistics.
    #[arg(long, value_enum, default_value_t = SplitKind::Threshold)]
    pub split: SplitKind,
    /// Head threshold T (training samples), for --split threshold and the spread report.
    #[arg(long, default_value_t = 100)]
    pub threshold: u64,
    /// Steps before the cloud turns on.
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: u64,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    pub optimizer: OptimizerKind,
    /// Peak learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub lr: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    /// Weight decay (not on biases).
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f32,
    /// Linear learning-rate warm-up steps (then cosine decay).
    #[arg(long, default_value_t = 100)]
    pub lr_warmup: u64,
    /// A step that meets a NaN or infinity (in the embeddings, the head weights or the
    /// loss): stop with an error naming the step (the last checkpoint written stays), or
    /// skip the step and go on (while the weights themselves are finite). Applies to
    /// --resume too: the flag given then, not the checkpoint's.
    #[arg(long, value_enum, default_value_t = NonFinitePolicy::Error)]
    pub on_nonfinite: NonFinitePolicy,
    /// Backend, precision and device.
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// The arguments of a training run, shared by `train` and `compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Data source.
    #[command(flatten)]
    pub data: DataArgs,
    /// Model and optimization options.
    #[command(flatten)]
    pub model: ModelArgs,
}

impl ModelArgs {
    /// The training configuration these flags describe, validated (errors name the flags).
    pub fn config(&self) -> anyhow::Result<TrainConfig> {
        let preset = match self.margin {
            MarginPreset::Arcface => HeadConfig::arcface(),
            MarginPreset::Cosface => HeadConfig::cosface(),
            MarginPreset::Combined => HeadConfig::combined(),
        };
        let cfg = TrainConfig {
            seed: self.seed,
            epochs: self.epochs,
            batch_size: self.batch_size,
            hidden: self.hidden,
            embed_dim: self.embed_dim,
            head: HeadConfig {
                s: self.scale,
                m1: self.m1.unwrap_or(preset.m1),
                m2: self.m2.unwrap_or(preset.m2),
                m3: self.m3.unwrap_or(preset.m3),
                cloud: self.cloud,
                reduction: self.reduction,
                label_smoothing: self.label_smoothing,
                margin_grad: self.margin_grad,
                fallback: self.fallback,
                subcenters: self.subcenters,
            },
            stats: StatsConfig {
                beta: self.beta,
                center: self.center,
                split: Split::new(self.split, self.threshold),
                warmup_steps: self.warmup_steps,
                class_counts: None,
            },
            on_nonfinite: self.on_nonfinite,
            optim: OptimizerConfig {
                kind: self.optimizer,
                lr: self.lr,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                warmup_steps: self.lr_warmup,
                ..OptimizerConfig::default()
            },
        };
        // With --split adaptive the threshold is not part of the configuration, but the
        // spread report still cuts head from tail with it.
        if self.threshold == 0 {
            anyhow::bail!("--threshold must be > 0, got 0");
        }
        cfg.validate_options().map_err(config_error)?;
        Ok(cfg)
    }
}

/// The flag of each configuration field that has one (`validate` names fields).
const FIELD_FLAGS: [(&str, &str); 18] = [
    ("train.seed", "--seed"),
    ("train.epochs", "--epochs"),
    ("train.batch_size", "--batch-size"),
    ("train.hidden", "--hidden"),
    ("train.embed_dim", "--embed-dim"),
    ("head.s", "--scale"),
    ("head.m1", "--m1"),
    ("head.m2", "--m2"),
    ("head.m3", "--m3"),
    ("head.label_smoothing", "--label-smoothing"),
    ("head.subcenters", "--subcenters"),
    ("stats.beta", "--beta"),
    ("stats.split.threshold", "--threshold"),
    ("stats.warmup_steps", "--warmup-steps"),
    ("optim.lr", "--lr"),
    ("optim.momentum", "--momentum"),
    ("optim.weight_decay", "--weight-decay"),
    ("optim.warmup_steps", "--lr-warmup"),
];

/// A configuration error in the command line's words: field names become flags.
fn config_error(e: crate::Error) -> anyhow::Error {
    let crate::Error::InvalidConfig(msg) = e else { return e.into() };
    let msg = FIELD_FLAGS.iter().fold(msg, |m, (field, flag)| replace_field(&m, field, flag));
    anyhow::anyhow!("{msg}")
}

/// `msg` with every whole occurrence of `field` replaced by `flag` (not inside a longer
/// name: `head.s` is not the start of `head.subcenters`).
fn replace_field(msg: &str, field: &str, flag: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(at) = rest.find(field) {
        let after = &rest[at + field.len()..];
        let whole = !after.starts_with(|ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == '.');
        out.push_str(&rest[..at]);
        out.push_str(if whole { flag } else { field });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// A progress bar (hidden when stderr is not a terminal) showing loss and throughput.
pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    rows: u64,
    loss_ema: Option<f64>,
}

impl Progress {
    /// A bar for `total` steps starting at `done`, labelled `label`.
    pub fn new(label: &str, done: u64, total: u64) -> Self {
        let bar = ProgressBar::new(total);
        let style =
            ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        bar.set_position(done);
        Self { bar, start: Instant::now(), rows: 0, loss_ema: None }
    }

    /// Records one step.
    pub fn step(&mut self, info: &StepInfo) {
        self.rows += info.rows as u64;
        if info.skipped {
            // --on-nonfinite skip-step: say so, and keep the NaN out of the loss average.
            self.bar.suspend(|| {
                eprintln!("{}: step {} met a NaN or infinity and was skipped", self.bar.prefix(), info.step)
            });
            self.bar.set_position(info.step + 1);
            return;
        }
        let ema = match self.loss_ema {
            Some(e) => 0.95 * e + 0.05 * info.loss,
            None => info.loss,
        };
        self.loss_ema = Some(ema);
        self.bar.set_position(info.step + 1);
        let quarter = (info.total_steps / 4).max(1);
        // Without a terminal the bar is hidden: log a line at each quarter instead.
        let log_line = self.bar.is_hidden() && (info.step + 1) % quarter == 0;
        if info.step % 10 == 0 || info.step + 1 == info.total_steps || log_line {
            let rate = self.rows as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
            let msg = format!("loss {ema:.4} | {rate:.0} rows/s | sigma_max {:.3}", info.max_sigma);
            if log_line {
                eprintln!("{}: step {}/{} | {msg}", self.bar.prefix(), info.step + 1, info.total_steps);
            }
            self.bar.set_message(msg);
        }
    }

    /// Smoothed loss so far.
    pub fn loss(&self) -> Option<f64> {
        self.loss_ema
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Creates `dir` (and parents) for output files.
/// Refuses, before any work is done, an output folder (`flag`'s value) that cannot be one:
/// a path that exists and is not a folder. Hours of training must not end in this error.
pub fn check_out_dir(flag: &str, dir: &Path) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("{flag} {}: exists and is not a folder", dir.display());
    }
    Ok(())
}

/// Refuses, before any work is done, an output file path (`flag`'s value) that cannot be
/// written: an existing folder, or a path whose parent folder does not exist.
pub fn check_out_file(flag: &str, file: &Path) -> anyhow::Result<()> {
    if file.is_dir() {
        anyhow::bail!("{flag} {}: is a folder, not a file", file.display());
    }
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        anyhow::bail!("{flag} {}: the folder {} does not exist", file.display(), parent.display());
    }
    Ok(())
}

/// Creates the output folder `dir` (and its parents) if needed.
pub fn ensure_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create the output directory", dir.display()))
}

/// Writes pretty JSON atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("serializing metrics")?;
    crate::io::write_atomic(path, format!("{text}\n").as_bytes())?;
    Ok(())
}

/// Percent with two decimals, or "n/a" for NaN.
pub fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.2}%", 100.0 * v)
    } else {
        "n/a".into()
    }
}
