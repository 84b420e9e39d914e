//! The `featcloud` binary on bad inputs (one-line error, non-zero exit, no panic,
//! no partial output) and a tiny `train` on .npy files, resumed from its checkpoint.

#[path = "common/blobs.rs"]
mod blobs;

use featcloud::data::{save_npy_f32, save_npy_i64};
use featcloud::engine::{Checkpoint, NonFinitePolicy};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_featcloud");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("RAYON_NUM_THREADS", "2").output().expect("the binary runs")
}

/// Asserts a clean failure: exit code non-zero (not a panic's 101), exactly one
/// stderr line starting with `error:` that contains every `needles`.
fn assert_clean_error(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail; stderr: {err}");
    assert_ne!(out.status.code(), Some(101), "panicked: {err}");
    let lines: Vec<&str> =
        err.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("backend:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks '{n}': {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// A temporary folder holding [`write_data`]'s files, and their paths as strings.
fn data_dir() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = write_data(dir.path());
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    (dir, s(x), s(y))
}

/// A small long-tailed dataset: 6 classes of 40 down to 5 rows, 8 features.
fn write_data(dir: &Path) -> (PathBuf, PathBuf) {
    blobs::write_blobs(dir, &[40, 30, 20, 12, 8, 5], 8, 12345)
}

const TINY: &[&str] = &[
    "--epochs",
    "3",
    "--batch-size",
    "16",
    "--hidden",
    "16",
    "--embed-dim",
    "8",
    "--warmup-steps",
    "3",
    "--lr-warmup",
    "2",
    "--threshold",
    "20",
    "--scale",
    "16",
    "--backend",
    "cpu",
];

fn train_args<'a>(x: &'a str, y: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train", "--features", x, "--labels", y, "--out", out];
    v.extend_from_slice(TINY);
    v.extend_from_slice(extra);
    v
}

#[test]
fn bad_inputs_give_one_line_errors_and_no_output() {
    let (dir, xs, ys) = data_dir();
    let (xs, ys) = (xs.as_str(), ys.as_str());
    let out = dir.path().join("out");
    let outs = out.to_str().unwrap();

    // Missing file.
    let missing = dir.path().join("missing.npy");
    let o = run(&train_args(missing.to_str().unwrap(), ys, outs, &[]));
    assert_clean_error(&o, &["missing.npy"]);

    // Corrupt .npy.
    let corrupt = dir.path().join("corrupt.npy");
    std::fs::write(&corrupt, b"\x93NUMPY garbage that is not a header").unwrap();
    let o = run(&train_args(corrupt.to_str().unwrap(), ys, outs, &[]));
    assert_clean_error(&o, &["corrupt.npy"]);

    // Labels out of range for --num-classes.
    let o = run(&train_args(xs, ys, outs, &["--num-classes", "4"]));
    assert_clean_error(&o, &["label"]);

    // Labels / features length mismatch.
    let short = dir.path().join("short.npy");
    save_npy_i64(&short, &[0, 1, 2]).unwrap();
    let o = run(&train_args(xs, short.to_str().unwrap(), outs, &[]));
    assert_clean_error(&o, &[]);

    // NaN in the features.
    let nan = dir.path().join("nan.npy");
    save_npy_f32(&nan, &[0.0, 1.0, f32::NAN, 2.0], &[2, 2]).unwrap();
    let two = dir.path().join("two.npy");
    save_npy_i64(&two, &[0, 1]).unwrap();
    let o = run(&train_args(nan.to_str().unwrap(), two.to_str().unwrap(), outs, &[]));
    assert_clean_error(&o, &["nan.npy"]);

    // Unknown flag values and bad numbers.
    let o = run(&["compare", "--cloud", "banana"]);
    assert_clean_error(&o, &["--cloud", "banana"]);
    let o = run(&["train", "--backend", "tpu"]);
    assert_clean_error(&o, &["--backend"]);
    let o = run(&["train", "--epochs", "many"]);
    assert_clean_error(&o, &["--epochs"]);
    let o = run(&train_args(xs, ys, outs, &["--label-smoothing", "1.5"]));
    assert_clean_error(&o, &["--label-smoothing"]);
    let o = run(&train_args(xs, ys, outs, &["--batch-size", "0"]));
    assert_clean_error(&o, &["--batch-size"]);
    // Configuration errors name the flag, not the configuration field behind it.
    for (flag, value) in [("--scale", "0"), ("--beta", "1.5"), ("--threshold", "0"), ("--momentum", "1")] {
        let o = run(&train_args(xs, ys, outs, &[flag, value]));
        assert_clean_error(&o, &[flag]);
    }
    // The threshold also cuts head from tail in the spread report with the adaptive split.
    let o = run(&train_args(xs, ys, outs, &["--split", "adaptive", "--threshold", "0"]));
    assert_clean_error(&o, &["--threshold"]);
    let o = run(&["train", "--no-such-flag"]);
    assert_clean_error(&o, &["--no-such-flag"]);

    // A corrupt checkpoint for --resume and for eval.
    let bad_ck = dir.path().join("bad.safetensors");
    std::fs::write(&bad_ck, b"not a checkpoint").unwrap();
    let o = run(&train_args(xs, ys, outs, &["--resume", bad_ck.to_str().unwrap()]));
    assert_clean_error(&o, &["bad.safetensors"]);
    let o = run(&["eval", "--checkpoint", bad_ck.to_str().unwrap(), "--features", xs, "--labels", ys]);
    assert_clean_error(&o, &["bad.safetensors"]);

    // --backend cuda on a machine without a usable CUDA training backend.
    let o = run(&[
        "train",
        "--features",
        xs,
        "--labels",
        ys,
        "--out",
        outs,
        "--epochs",
        "1",
        "--backend",
        "cuda",
    ]);
    if !o.status.success() {
        assert_clean_error(&o, &["--backend cuda"]);
    }

    assert!(!out.exists(), "a failed command left output behind");
}

#[test]
fn train_on_npy_resumes_exactly_and_evals() {
    let (dir, xs, ys) = data_dir();
    let (xs, ys) = (xs.as_str(), ys.as_str());
    let straight = dir.path().join("straight");
    let o = run(&train_args(xs, ys, straight.to_str().unwrap(), &[]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(straight.join("metrics.json")).unwrap()).unwrap();
    assert!(metrics["eval"]["top1_overall"].as_f64().unwrap() > 0.3, "{metrics}");
    let full = Checkpoint::load(&straight.join("checkpoint.safetensors")).unwrap();
    assert_eq!(full.step, full.total_steps);

    // Stop part-way, then resume from the checkpoint (model flags come from it).
    let part = dir.path().join("part");
    let o = run(&train_args(xs, ys, part.to_str().unwrap(), &["--stop-at", "5"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = part.join("checkpoint.safetensors");
    assert_eq!(Checkpoint::load(&ck).unwrap().step, 5);
    let resumed = dir.path().join("resumed");
    let o = run(&train_args(xs, ys, resumed.to_str().unwrap(), &["--resume", ck.to_str().unwrap()]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = Checkpoint::load(&resumed.join("checkpoint.safetensors")).unwrap();
    assert!(again.params == full.params, "resumed weights differ from the straight run");
    assert!(again.optim == full.optim && again.stats == full.stats);
    assert_eq!(again.config.on_nonfinite, NonFinitePolicy::Error);

    // --on-nonfinite is a run-control flag: --resume takes the one given then (the resumed
    // run's checkpoint records it), not the checkpoint's.
    let skipping = dir.path().join("skipping");
    let o = run(&train_args(
        xs,
        ys,
        skipping.to_str().unwrap(),
        &["--resume", ck.to_str().unwrap(), "--on-nonfinite", "skip-step"],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let skip_ck = Checkpoint::load(&skipping.join("checkpoint.safetensors")).unwrap();
    assert_eq!(skip_ck.config.on_nonfinite, NonFinitePolicy::SkipStep);
    assert!(skip_ck.params == full.params, "no step met a NaN: the same weights");

    // Resuming on other data is a clean error.
    let other = dir.path().join("other.npy");
    let n = full.n_train + (full.n_train as f64 * 0.25).round() as usize; // any other size
    save_npy_f32(&other, &vec![0.5; n * 8], &[n, 8]).unwrap();
    let labels = dir.path().join("other_y.npy");
    save_npy_i64(&labels, &(0..n as i64).map(|i| i % 6).collect::<Vec<_>>()).unwrap();
    let o = run(&train_args(
        other.to_str().unwrap(),
        labels.to_str().unwrap(),
        dir.path().join("o").to_str().unwrap(),
        &["--resume", ck.to_str().unwrap()],
    ));
    assert_clean_error(&o, &["--resume"]);

    // eval on the checkpoint.
    let json = dir.path().join("eval.json");
    let o = run(&[
        "eval",
        "--checkpoint",
        straight.join("checkpoint.safetensors").to_str().unwrap(),
        "--features",
        xs,
        "--labels",
        ys,
        "--json",
        json.to_str().unwrap(),
        "--backend",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("top-1") && json.exists(), "{stdout}");
}

#[test]
fn tiny_compare_writes_table_json_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let o = run(&[
        "compare",
        "--out",
        out.to_str().unwrap(),
        "--classes",
        "12",
        "--max-per-class",
        "60",
        "--imbalance",
        "20",
        "--open-classes",
        "4",
        "--open-per-class",
        "6",
        "--test-per-class",
        "5",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--hidden",
        "32",
        "--embed-dim",
        "8",
        "--warmup-steps",
        "5",
        "--threshold",
        "20",
        "--backend",
        "cpu",
        "--seeds",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("mean of 2 seeds") && stdout.contains("/2"), "{stdout}");
    for row in [
        "top-1 overall",
        "few-shot",
        "open-set Rank-1",
        "mAP",
        "TPR@FPR=1e-3",
        "head angular std",
        "tail angular std",
    ] {
        assert!(stdout.contains(row), "table lacks '{row}':\n{stdout}");
    }
    assert!(out.join("metrics.json").exists() && out.join("angular_std.png").exists());
    // Two paired runs per arm, and a summary row per metric whose means match the runs.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    let (base, leap) = (m["baseline"]["eval"].as_array().unwrap(), m["leap"]["eval"].as_array().unwrap());
    assert_eq!((base.len(), leap.len()), (2, 2));
    let row = &m["summary"][0];
    assert_eq!(row["metric"], "top-1 overall");
    let mean = |runs: &[serde_json::Value]| {
        runs.iter().map(|r| r["top1_overall"].as_f64().unwrap()).sum::<f64>() / 2.0
    };
    assert!((row["baseline_mean"].as_f64().unwrap() - mean(base)).abs() < 1e-12);
    assert!((row["leap_mean"].as_f64().unwrap() - mean(leap)).abs() < 1e-12);
    let d = row["delta_mean"].as_f64().unwrap();
    assert!((d - (mean(leap) - mean(base))).abs() < 1e-12);
}

#[test]
fn smoke_and_cuda_training_run_on_the_emulated_device() {
    if !featcloud::cuda::emu::AVAILABLE {
        eprintln!("SKIP: built without the `emu` feature");
        return;
    }
    let _logged = featcloud::cuda::test_emulated_device(132); // counted as a device test
    let dir = tempfile::tempdir().unwrap();
    // Every kernel against the oracle through the real host code: every line passes.
    let json = dir.path().join("smoke.json");
    let o = run(&["smoke", "--device", "emu", "--json", json.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("featcloud CPU emulator"), "{stdout}");
    let lines: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(lines.len() >= 60, "{} smoke lines", lines.len());
    let failed: Vec<&serde_json::Value> = lines.iter().filter(|l| l["passed"] != true).collect();
    assert!(failed.is_empty(), "failed smoke lines: {failed:?}");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The CUDA training backend (bf16 GEMMs through the GEMM stand-in, fused head, GPU
    // statistics) trains the tiny model on the emulated device.
    let (x, y) = write_data(dir.path());
    let out = dir.path().join("emu");
    let mut args = vec!["train", "--features", x.to_str().unwrap(), "--labels", y.to_str().unwrap()];
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(TINY.iter().copied().filter(|&a| a != "--backend" && a != "cpu"));
    args.extend(["--backend", "cuda", "--device", "emu"]);
    let o = run(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("backend: cuda (featcloud CPU emulator"), "{err}");
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert!(metrics["eval"]["top1_overall"].as_f64().unwrap() > 0.3, "{metrics}");
}

/// `train --subcenters 3` then `clean`: the report names rows of the user's file (through
/// the --test-fraction split), each with its label and an angle above --max-angle; the
/// cleaned files hold exactly the other training rows; the synthetic benchmark's injected
/// noise is scored; bad flags are one-line errors.
#[test]
fn clean_reports_outliers_by_file_row_and_writes_the_rest() {
    let (dir, xs, ys) = data_dir();
    let (xs, ys) = (xs.as_str(), ys.as_str());
    let run_dir = dir.path().join("k3");
    let o = run(&train_args(xs, ys, run_dir.to_str().unwrap(), &["--subcenters", "3"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck_path = run_dir.join("checkpoint.safetensors");
    let ck = Checkpoint::load(&ck_path).unwrap();
    assert_eq!(ck.config.head.subcenters, 3);
    let ck_s = ck_path.to_str().unwrap();

    let ds = featcloud::data::load_dataset(Path::new(xs), Path::new(ys), None).unwrap();
    let (train_rows, _) = featcloud::data::split_fraction_rows(&ds, 0.2, 0).unwrap();
    let clean = |out: &Path, angle: &str, extra: &[&str]| {
        let mut a = vec!["clean", "--checkpoint", ck_s, "--features", xs, "--labels", ys, "--backend", "cpu"];
        a.extend_from_slice(&["--out", out.to_str().unwrap(), "--max-angle", angle]);
        a.extend_from_slice(extra);
        run(&a)
    };
    let read =
        |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };

    // --max-angle 0: every training row not exactly on its class's dominant sub-center is an
    // outlier, so the report lists (almost) every training row, by its row in the file.
    let all = dir.path().join("all");
    let o = clean(&all, "0", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = read(all.join("outliers.json"));
    let rows: Vec<usize> =
        j["outliers"].as_array().unwrap().iter().map(|o| o["row"].as_u64().unwrap() as usize).collect();
    assert!(rows.len() + 3 >= train_rows.len() && rows.iter().all(|r| train_rows.contains(r)), "{rows:?}");
    for o in j["outliers"].as_array().unwrap() {
        let r = o["row"].as_u64().unwrap() as usize;
        assert_eq!(
            o["label"].as_i64().unwrap(),
            ds.labels[r] as i64,
            "row {r} is reported with its file label"
        );
        assert!(o["closest_subcenter"].as_u64().unwrap() < 3);
    }
    assert_eq!(j["subcenters"], 3);

    // A middle threshold with --write-cleaned: kept = training rows minus outliers, in order.
    let mid = dir.path().join("mid");
    let o = clean(&mid, "20", &["--write-cleaned"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = read(mid.join("outliers.json"));
    let out_rows: Vec<usize> =
        j["outliers"].as_array().unwrap().iter().map(|o| o["row"].as_u64().unwrap() as usize).collect();
    assert!(j["outliers"].as_array().unwrap().iter().all(|o| o["angle_deg"].as_f64().unwrap() > 20.0));
    let kept =
        featcloud::data::load_dataset(&mid.join("features.npy"), &mid.join("labels.npy"), Some(6)).unwrap();
    let want: Vec<usize> = train_rows.iter().copied().filter(|r| !out_rows.contains(r)).collect();
    assert_eq!(kept.n, want.len());
    for (i, &r) in want.iter().enumerate() {
        assert_eq!(kept.row(i), ds.row(r), "kept row {i} is file row {r}");
        assert_eq!(kept.labels[i], ds.labels[r]);
    }

    // The synthetic benchmark with --label-noise: the relabeled rows are counted and scored.
    let syn = dir.path().join("syn");
    let small = [
        "--classes",
        "6",
        "--max-per-class",
        "40",
        "--imbalance",
        "8",
        "--open-classes",
        "0",
        "--label-noise",
        "0.25",
    ];
    let mut a = vec!["train", "--out", syn.to_str().unwrap(), "--subcenters", "2"];
    a.extend_from_slice(TINY);
    a.extend_from_slice(&small);
    let o = run(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let syn_ck = syn.join("checkpoint.safetensors");
    let syn_clean = |extra: &[&str]| {
        let mut a = vec!["clean", "--checkpoint", syn_ck.to_str().unwrap(), "--out", syn.to_str().unwrap()];
        a.extend_from_slice(&["--backend", "cpu"]);
        a.extend_from_slice(&small);
        a.extend_from_slice(extra);
        run(&a)
    };
    let o = syn_clean(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = read(syn.join("outliers.json"));
    let n_train = Checkpoint::load(&syn_ck).unwrap().n_train;
    let relabeled = j["label_noise"]["relabeled_rows"].as_u64().unwrap();
    assert_eq!(relabeled, (0.25 * n_train as f64).round() as u64);
    assert!(String::from_utf8_lossy(&o.stdout).contains("recall"));
    // At 0 degrees every relabeled row not exactly on its class's dominant sub-center is
    // found: the scores count the right rows.
    assert!(syn_clean(&["--max-angle", "0"]).status.success());
    let j = read(syn.join("outliers.json"));
    let (hits, n_out) =
        (j["label_noise"]["relabeled_outliers"].as_u64().unwrap(), j["outliers"].as_array().unwrap().len());
    assert!(
        hits + 2 >= relabeled && hits <= relabeled,
        "{hits} of {relabeled} relabeled rows found at 0 degrees"
    );
    assert!((j["label_noise"]["precision"].as_f64().unwrap() - hits as f64 / n_out as f64).abs() < 1e-12);
    assert!((j["label_noise"]["recall"].as_f64().unwrap() - hits as f64 / relabeled as f64).abs() < 1e-12);

    // --write-cleaned into the folder of the inputs it would replace: refused, inputs kept.
    let xy_dir = dir.path().join("xy");
    std::fs::create_dir(&xy_dir).unwrap();
    let (xp, yp) = (xy_dir.join("features.npy"), xy_dir.join("labels.npy"));
    std::fs::copy(xs, &xp).unwrap();
    std::fs::copy(ys, &yp).unwrap();
    let before = std::fs::read(&xp).unwrap();
    let mut a = vec![
        "clean",
        "--checkpoint",
        ck_s,
        "--features",
        xp.to_str().unwrap(),
        "--labels",
        yp.to_str().unwrap(),
    ];
    a.extend_from_slice(&["--out", xy_dir.to_str().unwrap(), "--write-cleaned", "--backend", "cpu"]);
    assert_clean_error(&run(&a), &["would overwrite the input file"]);
    assert_eq!(std::fs::read(&xp).unwrap(), before);
    assert!(!xy_dir.join("outliers.json").exists());

    // Bad flags: one line, nothing written.
    let bad = dir.path().join("bad");
    assert_clean_error(&clean(&bad, "200", &[]), &["--max-angle"]);
    assert!(!bad.exists());
    let o = run(&train_args(xs, ys, bad.to_str().unwrap(), &["--subcenters", "0"]));
    assert_clean_error(&o, &["--subcenters", "1..=16"]);
}
