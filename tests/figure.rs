//! `featcloud figure` (LEAP's motivating experiment): its numbers are the ones `featcloud
//! eval` gives for the checkpoints and data it writes, its figures decode at their sizes
//! and are written atomically, it runs on the user's own .npy files, and the same seed
//! gives the same bytes.

#[path = "common/blobs.rs"]
mod blobs;

use featcloud::plot::leap::{ANGLES_SIZE, PROTOCOL_SIZE};
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_featcloud");

/// The tests of this file one at a time: each runs the binary with two threads, and one
/// of them measures the wall time of the default protocol.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(args: &[&str]) -> Output {
    let o = Command::new(BIN).args(args).env("RAYON_NUM_THREADS", "2").output().expect("the binary runs");
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// A small built-in benchmark: 12 classes of 80 down to 4 samples, 10 test samples each.
const SMALL: &[&str] = &[
    "--classes",
    "12",
    "--max-per-class",
    "80",
    "--imbalance",
    "20",
    "--test-per-class",
    "10",
    "--open-classes",
    "0",
    "--epochs",
    "6",
    "--batch-size",
    "32",
    "--hidden",
    "32",
    "--embed-dim",
    "16",
    "--warmup-steps",
    "10",
    "--backend",
    "cpu",
    "--top-classes",
    "6",
    "--cut-classes",
    "2",
    "--cut-to",
    "4",
];

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Width and height of a PNG, decoded.
fn png_size(path: &Path) -> (u32, u32) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    (info.width, info.height)
}

#[test]
fn figure_numbers_are_the_numbers_eval_gives() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fig");
    let mut args = vec!["figure", "--out", out.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    let o = run(&args);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("c) LEAP, 2 of them cut to 4 samples"), "{stdout}");

    let fig = json(&out.join("figure.json"));
    let threshold = fig["head_threshold"].as_u64().unwrap().to_string();
    assert_eq!(fig["classes"]["tail"], serde_json::json!([false, false, false, false, true, true]));
    let data = |f: &str| out.join("data").join(f).to_str().unwrap().to_string();
    for (i, (name, train)) in
        [("full", "full_train"), ("cut", "cut_train"), ("cut_leap", "cut_train")].iter().enumerate()
    {
        let setting = &fig["settings"][i];
        assert_eq!(setting["name"], *name);
        let e = dir.path().join(format!("{name}.json"));
        let ck = out.join(name).join("checkpoint.safetensors");
        run(&[
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--features",
            &data(&format!("{train}_x.npy")),
            "--labels",
            &data(&format!("{train}_y.npy")),
            "--test-features",
            &data("test_x.npy"),
            "--test-labels",
            &data("test_y.npy"),
            "--threshold",
            &threshold,
            "--backend",
            "cpu",
            "--json",
            e.to_str().unwrap(),
        ]);
        // Every number of the report, bit for bit (JSON round trip of the same f64s).
        assert_eq!(json(&e)["eval"], setting["eval"], "{name}: figure and eval disagree");
        if *name != "full" {
            // The cut classes are the few-shot classes (< 20 samples), the rest are not:
            // eval's few-shot top-1 is the figure's tail top-1.
            assert_eq!(setting["eval"]["top1_few"], setting["tail_top1"], "{name}");
            let per_class = setting["eval"]["per_class"].as_array().unwrap();
            assert_eq!(per_class[5]["train_count"], 4, "{name}: a cut class keeps --cut-to samples");
        }
    }
    // The cloud std the figure reports per tail class is SPEC 5's sqrt(max(var_h - var_k, 0))
    // of the statistics it reports, and the head classes get none.
    let stats = &fig["settings"][2]["stats"];
    let var_h = stats["head_variance"].as_f64().unwrap();
    for c in stats["classes"].as_array().unwrap() {
        let var_k = c["angular_std"].as_f64().unwrap().powi(2);
        let want = if c["head"] == true { 0.0 } else { (var_h - var_k).max(0.0).sqrt() };
        assert!((c["cloud_std"].as_f64().unwrap() - want).abs() < 1e-12, "{c}");
    }

    // The figures decode at their sizes; nothing else (no temporary file) is left.
    assert_eq!(png_size(&out.join("protocol.png")), PROTOCOL_SIZE);
    assert_eq!(png_size(&out.join("angles.png")), ANGLES_SIZE);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["angles.png", "cut", "cut_leap", "data", "figure.json", "full", "protocol.png"]);

    // The same seed gives the same bytes: figures and numbers.
    let again = dir.path().join("again");
    let mut args = vec!["figure", "--out", again.to_str().unwrap()];
    args.extend_from_slice(SMALL);
    run(&args);
    for f in ["protocol.png", "angles.png", "figure.json"] {
        assert!(std::fs::read(out.join(f)).unwrap() == std::fs::read(again.join(f)).unwrap(), "{f} differs");
    }
}

#[test]
fn figure_runs_on_npy_files_and_refuses_bad_protocols() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    // 5 classes of 60 down to 20 rows, 6 features.
    let (xp, yp) = blobs::write_blobs(dir.path(), &[60, 50, 40, 30, 20], 6, 7);
    let out = dir.path().join("fig");
    let base = [
        "figure",
        "--features",
        xp.to_str().unwrap(),
        "--labels",
        yp.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--hidden",
        "16",
        "--embed-dim",
        "8",
        "--warmup-steps",
        "5",
        "--backend",
        "cpu",
        "--top-classes",
        "4",
    ];
    let mut args = base.to_vec();
    args.extend(["--cut-classes", "2", "--cut-to", "3", "--threshold", "7"]);
    let o = run(&args);
    assert!(String::from_utf8_lossy(&o.stdout).contains("head/tail threshold"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--split and --threshold are set by the protocol (threshold 40"), "{err}");
    let fig = json(&out.join("figure.json"));
    // The 4 largest classes, the 2 smallest of them cut.
    assert_eq!(fig["classes"]["original"], serde_json::json!([0, 1, 2, 3]));
    assert_eq!(fig["head_threshold"], 40); // class 1, the smallest uncut: 50 rows less the 20% test split

    let refusals: [(&[&str], &str); 2] = [
        (&["--cut-classes", "4"], "--cut-classes must be in 1..4"),
        (
            &["--cut-classes", "2", "--cut-to", "24"],
            "--cut-to 24: the smallest class to cut has 24 training samples",
        ),
    ];
    for (extra, needle) in refusals {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let o = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{err}");
    }
}

/// Issue 17: the protocol at its default size (built-in benchmark, 8 classes, 3 cut to 5,
/// the default model and 100 epochs) runs in under a minute on the CPU.
#[test]
fn default_protocol_runs_in_under_a_minute() {
    let _one_at_a_time = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fig");
    let t0 = std::time::Instant::now();
    run(&["figure", "--backend", "cpu", "--out", out.to_str().unwrap()]);
    let secs = t0.elapsed().as_secs_f64();
    println!("default protocol: {secs:.1} s");
    assert!(secs < 60.0, "the default protocol took {secs:.1} s");
    let fig = json(&out.join("figure.json"));
    assert_eq!(
        fig["classes"]["tail"],
        serde_json::json!([false, false, false, false, false, true, true, true])
    );
}
