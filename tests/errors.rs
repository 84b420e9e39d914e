//! The bad-input catalogue, `docs/ERRORS.md`, case by case: one test per case.
//!
//! ERRORS.md is the one source of each case's exact message: every `### Ennn` section
//! there holds it in a ```text block (with `$DIR` for the case's temporary folder), and
//! the test of that case (`ennn_...` below) produces the error, normalizes the folder to
//! `$DIR` and asserts equality with the catalogue's text. So a changed message fails
//! here until the catalogue says it too.
//!
//! Every case runs in a folder already holding what a user would not want to lose: the
//! outputs of an earlier run (`out/checkpoint.safetensors`, `out/metrics.json`), an
//! `eval.json`, a statistics file, and the input files. Each test asserts that after the
//! failure every one of those files holds the same bytes and that no file was added.
//! Command-line cases also assert one `error:` line on stderr, a non-zero exit status
//! and no panic.

#[path = "common/blobs.rs"]
mod blobs;

use featcloud::config::StatsConfig;
use featcloud::cpu::head::Upstream;
use featcloud::cuda::head::{FusedKernels, FusedTuning, GradDtype, HeadOn, HeadPath, HeadUpstream};
use featcloud::cuda::{Device, Tensor};
use featcloud::data::{save_npy_f32, save_npy_i64};
use featcloud::engine::Checkpoint;
use featcloud::oracle::HeadProblem;
use featcloud::{HeadConfig, HeadShape, Reduction, StatsState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_featcloud");
const CATALOGUE: &str = include_str!("../docs/ERRORS.md");
const THIS_FILE: &str = include_str!("errors.rs");

// ---- the catalogue ----------------------------------------------------------------------------

/// `(id, message)` of every `### Ennn` section of ERRORS.md, in order.
fn catalogue() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = CATALOGUE.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("### ") else { continue };
        let id: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        // The section's ```text block holds exactly one line, before the next section.
        let mut block = None;
        for l in lines.by_ref() {
            assert!(!l.starts_with("#"), "ERRORS.md: {id} has no ```text block");
            if l.trim() == "```text" {
                block = Some(());
                break;
            }
        }
        assert!(block.is_some(), "ERRORS.md: {id} has no ```text block");
        let message = lines.next().unwrap_or_else(|| panic!("ERRORS.md: {id}: empty ```text block"));
        assert_eq!(lines.next().map(str::trim), Some("```"), "ERRORS.md: {id}: one line per ```text block");
        out.push((id, message.to_string()));
    }
    out
}

/// Asserts that `actual` is the catalogue's message for `id`. With `FEATCLOUD_BLESS=1` it
/// appends `id<TAB>actual` to `target/errors-actual.txt` instead, for a reviewer to copy
/// into ERRORS.md after reading each message as a user would.
fn assert_message(id: &str, actual: &str) {
    if std::env::var("FEATCLOUD_BLESS").as_deref() == Ok("1") {
        use std::io::Write;
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../errors-actual.txt");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        // One write per line: O_APPEND keeps lines of concurrent tests whole.
        f.write_all(format!("{id}\t{actual}\n").as_bytes()).unwrap();
        return;
    }
    assert_eq!(actual, expected(id), "{id}: the message differs from ERRORS.md");
}

/// The catalogue's message for `id`.
fn expected(id: &str) -> String {
    let all = catalogue();
    let hits: Vec<&String> = all.iter().filter(|(i, _)| i == id).map(|(_, m)| m).collect();
    assert_eq!(hits.len(), 1, "ERRORS.md must have exactly one section {id}");
    hits[0].clone()
}

#[test]
fn catalogue_has_25_cases_each_with_its_test() {
    let all = catalogue();
    assert!(all.len() >= 25, "ERRORS.md has {} cases", all.len());
    for (n, (id, _)) in all.iter().enumerate() {
        assert_eq!(*id, format!("E{:02}", n + 1), "cases are numbered E01, E02, ... in order");
        let test = format!("fn {}_", id.to_lowercase());
        assert!(THIS_FILE.contains(&test), "{id} has no test `{test}...` in tests/errors.rs");
    }
    // And no test without its case.
    let tests =
        THIS_FILE.lines().filter(|l| l.starts_with("fn e") && l.as_bytes()[4].is_ascii_digit()).count();
    assert_eq!(tests, all.len(), "tests/errors.rs has {tests} case tests, ERRORS.md {} cases", all.len());
}

// ---- the folder each case runs in --------------------------------------------------------------

/// A case's folder: a copy of [`template`] plus the case's own inputs, and a snapshot of
/// every file in it taken just before the failing call.
struct Ws {
    dir: tempfile::TempDir,
    before: BTreeMap<PathBuf, Vec<u8>>,
    folders: Vec<PathBuf>,
}

impl Ws {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(template(), dir.path());
        Ws { dir, before: BTreeMap::new(), folders: Vec::new() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, bytes: &[u8]) {
        std::fs::write(self.path(rel), bytes).unwrap();
    }

    /// Records every file's bytes and every folder; call after writing the case's inputs.
    fn snapshot(&mut self) {
        self.before = files(self.dir.path());
        self.folders = folders(self.dir.path());
        for must in ["out/checkpoint.safetensors", "out/metrics.json", "eval.json", "stats.safetensors"] {
            assert!(self.before.contains_key(&self.path(must)), "template lacks {must}");
        }
    }

    /// Asserts that no file changed, appeared or disappeared since [`Ws::snapshot`].
    fn assert_untouched(&self) {
        assert!(!self.before.is_empty(), "snapshot() was not called");
        let now = files(self.dir.path());
        for (p, bytes) in &self.before {
            match now.get(p) {
                None => panic!("{} was removed", p.display()),
                Some(b) => assert!(b == bytes, "{} was changed", p.display()),
            }
        }
        for p in now.keys() {
            assert!(self.before.contains_key(p), "{} was created", p.display());
        }
        assert_eq!(folders(self.dir.path()), self.folders, "folders were created or removed");
    }

    /// `text` with this case's folder written as `$DIR`.
    fn normalize(&self, text: &str) -> String {
        text.replace(self.dir.path().to_str().unwrap(), "$DIR")
    }

    /// Runs the binary with `args` (`$DIR` expanded), asserts a clean failure (non-zero
    /// status that is not a panic's, one `error:` line on stderr), that nothing in the
    /// folder changed, and that the line is the catalogue's message for `id`.
    fn cli(&self, id: &str, args: &[&str]) {
        let root = self.dir.path().to_str().unwrap();
        let args: Vec<String> = args.iter().map(|a| a.replace("$DIR", root)).collect();
        let out = Command::new(BIN)
            .args(&args)
            .current_dir(self.dir.path())
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .expect("the binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{id}: should fail; stderr: {err}");
        assert_ne!(out.status.code(), Some(101), "{id}: panicked: {err}");
        assert!(!err.contains("panicked"), "{id}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(lines.len(), 1, "{id}: expected one error line, got: {err}");
        self.assert_untouched();
        assert_message(id, &self.normalize(lines[0]));
    }

    /// Asserts that `r` failed, that nothing in the folder changed, and that the error's
    /// text is the catalogue's message for `id`.
    fn api<T: std::fmt::Debug>(&self, id: &str, r: featcloud::Result<T>) {
        let e = r.expect_err(&format!("{id}: should fail"));
        self.assert_untouched();
        assert_message(id, &self.normalize(&e.to_string()));
    }
}

fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Every folder under `root`, sorted.
fn folders(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.push(p.clone());
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn copy_tree(from: &Path, to: &Path) {
    for (p, bytes) in files(from) {
        let dst = to.join(p.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::write(dst, bytes).unwrap();
    }
}

/// Built once per test process: `in/x.npy` (115 rows x 8 features, 6 classes), `in/y.npy`,
/// and the outputs of a tiny run on them: `out/checkpoint.safetensors`, `out/metrics.json`,
/// `eval.json`, and a statistics file `stats.safetensors` (C = 6, D = 8).
fn template() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        // Earlier runs' templates (one per test process) are not needed any more.
        for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with("errors-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let dir = tmp.join(format!("errors-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("in")).unwrap();
        let (x, y) = (dir.join("in/x.npy"), dir.join("in/y.npy"));
        let (rows, labels) = dataset();
        save_npy_f32(&x, &rows, &[labels.len(), 8]).unwrap();
        save_npy_i64(&y, &labels).unwrap();
        let run = |args: &[&str]| {
            let o = Command::new(BIN).args(args).env("RAYON_NUM_THREADS", "2").output().unwrap();
            assert!(o.status.success(), "template: {}", String::from_utf8_lossy(&o.stderr));
        };
        let (xs, ys) = (x.to_str().unwrap(), y.to_str().unwrap());
        let out = dir.join("out");
        let mut args = vec!["train", "--features", xs, "--labels", ys, "--out", out.to_str().unwrap()];
        args.extend_from_slice(TINY);
        run(&args);
        let ck = out.join("checkpoint.safetensors");
        let json = dir.join("eval.json");
        run(&[
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--features",
            xs,
            "--labels",
            ys,
            "--json",
            json.to_str().unwrap(),
            "--backend",
            "cpu",
            "--threshold",
            "20",
        ]);
        StatsState::new(6, 8, StatsConfig::default()).unwrap().save(&dir.join("stats.safetensors")).unwrap();
        dir
    })
}

/// 6 classes of 40 down to 5 rows around class means, 8 features.
fn dataset() -> (Vec<f32>, Vec<i64>) {
    blobs::blobs(&[40, 30, 20, 12, 8, 5], 8, 12345)
}

const TINY: &[&str] = &[
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--hidden",
    "16",
    "--embed-dim",
    "8",
    "--warmup-steps",
    "3",
    "--threshold",
    "20",
    "--scale",
    "16",
    "--backend",
    "cpu",
];

/// `featcloud train` on the given features and labels, writing to `$DIR/out` (where the
/// earlier run's outputs are), plus `extra`.
fn train<'a>(features: &'a str, labels: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train", "--features", features, "--labels", labels, "--out", "$DIR/out"];
    for pair in TINY.chunks(2) {
        if !extra.contains(&pair[0]) {
            v.extend_from_slice(pair);
        }
    }
    v.extend_from_slice(extra);
    v
}

/// An .npy file (format 1.0) with any header fields and raw data.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

// ---- command line ------------------------------------------------------------------------------

#[test]
fn e01_unknown_flag() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E01", &["train", "--out", "$DIR/out", "--no-such-flag"]);
}

#[test]
fn e02_value_not_among_the_choices() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E02", &["train", "--out", "$DIR/out", "--cloud", "banana"]);
}

#[test]
fn e03_not_a_number() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E03", &["train", "--out", "$DIR/out", "--epochs", "many"]);
}

#[test]
fn e04_option_out_of_range() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E04", &train("$DIR/in/x.npy", "$DIR/in/y.npy", &["--label-smoothing", "1.5"]));
}

#[test]
fn e05_zero_batch_size() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E05", &train("$DIR/in/x.npy", "$DIR/in/y.npy", &["--batch-size", "0"]));
}

#[test]
fn e06_out_is_a_file() {
    let mut w = Ws::new();
    w.snapshot();
    let mut args = train("$DIR/in/x.npy", "$DIR/in/y.npy", &[]);
    args[6] = "$DIR/eval.json";
    w.cli("E06", &args);
}

#[test]
fn e07_json_into_a_missing_folder() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli(
        "E07",
        &[
            "eval",
            "--checkpoint",
            "$DIR/out/checkpoint.safetensors",
            "--features",
            "$DIR/in/x.npy",
            "--labels",
            "$DIR/in/y.npy",
            "--json",
            "$DIR/no/such/folder/eval.json",
            "--backend",
            "cpu",
        ],
    );
}

#[test]
fn e08_compare_without_a_cloud() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E08", &["compare", "--out", "$DIR/out", "--cloud", "off"]);
}

#[test]
fn e09_npy_features_without_labels() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E09", &["train", "--features", "$DIR/in/x.npy", "--out", "$DIR/out"]);
}

// ---- data files --------------------------------------------------------------------------------

#[test]
fn e10_missing_features_file() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E10", &train("$DIR/in/missing.npy", "$DIR/in/y.npy", &[]));
}

#[test]
fn e11_not_an_npy_file() {
    let mut w = Ws::new();
    w.write("in/notes.npy", b"id,feature\n1,0.5\n");
    w.snapshot();
    w.cli("E11", &train("$DIR/in/notes.npy", "$DIR/in/y.npy", &[]));
}

#[test]
fn e12_truncated_npy() {
    let mut w = Ws::new();
    let full = std::fs::read(w.path("in/x.npy")).unwrap();
    w.write("in/cut.npy", &full[..full.len() - 100]);
    w.snapshot();
    w.cli("E12", &train("$DIR/in/cut.npy", "$DIR/in/y.npy", &[]));
}

#[test]
fn e13_unsupported_feature_dtype() {
    let mut w = Ws::new();
    w.write("in/complex.npy", &npy("<c8", &[2, 2], &[0u8; 32]));
    w.snapshot();
    w.cli("E13", &train("$DIR/in/complex.npy", "$DIR/in/y.npy", &[]));
}

#[test]
fn e14_features_of_three_dimensions() {
    let mut w = Ws::new();
    w.write("in/images.npy", &npy("<f4", &[2, 2, 2], &f32_bytes(&[0.5; 8])));
    w.snapshot();
    w.cli("E14", &train("$DIR/in/images.npy", "$DIR/in/y.npy", &[]));
}

#[test]
fn e15_float_labels() {
    let mut w = Ws::new();
    w.write("in/y_float.npy", &npy("<f4", &[115], &f32_bytes(&[1.0; 115])));
    w.snapshot();
    w.cli("E15", &train("$DIR/in/x.npy", "$DIR/in/y_float.npy", &[]));
}

#[test]
fn e16_negative_label() {
    let mut w = Ws::new();
    let mut y = dataset().1;
    y[7] = -1;
    w.write("in/y_neg.npy", &npy("<i8", &[115], &i64_bytes(&y)));
    w.snapshot();
    w.cli("E16", &train("$DIR/in/x.npy", "$DIR/in/y_neg.npy", &[]));
}

#[test]
fn e17_label_count_differs_from_rows() {
    let mut w = Ws::new();
    w.write("in/y_short.npy", &npy("<i8", &[3], &i64_bytes(&[0, 1, 2])));
    w.snapshot();
    w.cli("E17", &train("$DIR/in/x.npy", "$DIR/in/y_short.npy", &[]));
}

#[test]
fn e18_nan_feature() {
    let mut w = Ws::new();
    let mut x = dataset().0;
    x[8 * 3 + 5] = f32::NAN;
    w.write("in/x_nan.npy", &npy("<f4", &[115, 8], &f32_bytes(&x)));
    w.snapshot();
    w.cli("E18", &train("$DIR/in/x_nan.npy", "$DIR/in/y.npy", &[]));
}

#[test]
fn e19_label_not_below_num_classes() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E19", &train("$DIR/in/x.npy", "$DIR/in/y.npy", &["--num-classes", "4"]));
}

#[test]
fn e20_label_that_is_not_a_class_index() {
    // Found by review: such a label once loaded, then the class counts asked for 16 GiB.
    let mut w = Ws::new();
    let mut y = dataset().1;
    y[0] = 2_000_000_000;
    w.write("in/y_ids.npy", &npy("<i8", &[115], &i64_bytes(&y)));
    w.snapshot();
    w.cli("E20", &train("$DIR/in/x.npy", "$DIR/in/y_ids.npy", &[]));
}

#[test]
fn e21_empty_data_files() {
    let mut w = Ws::new();
    w.write("in/x0.npy", &npy("<f4", &[0, 8], &[]));
    w.write("in/y0.npy", &npy("<i8", &[0], &[]));
    w.snapshot();
    w.cli("E21", &train("$DIR/in/x0.npy", "$DIR/in/y0.npy", &[]));
}

/// A safetensors file with the given tensors `(name, dtype, shape, bytes)`.
fn safetensors_file(tensors: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    out
}

#[test]
fn e22_safetensors_without_labels() {
    let mut w = Ws::new();
    let x = f32_bytes(&dataset().0);
    w.write("in/emb.safetensors", &safetensors_file(&[("features", "F32", &[115, 8], x)]));
    w.snapshot();
    w.cli(
        "E22",
        &["train", "--features", "$DIR/in/emb.safetensors", "--out", "$DIR/out", "--backend", "cpu"],
    );
}

#[test]
fn e23_safetensors_header_past_the_end() {
    let mut w = Ws::new();
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    w.write("in/emb.safetensors", &bytes);
    w.snapshot();
    w.cli(
        "E23",
        &["train", "--features", "$DIR/in/emb.safetensors", "--out", "$DIR/out", "--backend", "cpu"],
    );
}

#[test]
fn e24_open_set_of_another_width() {
    let mut w = Ws::new();
    w.write("in/open_x.npy", &npy("<f4", &[4, 3], &f32_bytes(&[0.5; 12])));
    w.write("in/open_y.npy", &npy("<i8", &[4], &i64_bytes(&[0, 0, 1, 1])));
    w.snapshot();
    w.cli(
        "E24",
        &train(
            "$DIR/in/x.npy",
            "$DIR/in/y.npy",
            &["--open-features", "$DIR/in/open_x.npy", "--open-labels", "$DIR/in/open_y.npy"],
        ),
    );
}

// (E48, labels that are sparse IDs, is with the data cases below E47.)

// ---- checkpoints -------------------------------------------------------------------------------

#[test]
fn e25_resume_from_a_missing_checkpoint() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E25", &train("$DIR/in/x.npy", "$DIR/in/y.npy", &["--resume", "$DIR/out/ckpt-typo.safetensors"]));
}

#[test]
fn e26_resume_from_a_file_that_is_not_a_checkpoint() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E26", &train("$DIR/in/x.npy", "$DIR/in/y.npy", &["--resume", "$DIR/in/x.npy"]));
}

#[test]
fn e27_resume_from_a_statistics_file() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E27", &train("$DIR/in/x.npy", "$DIR/in/y.npy", &["--resume", "$DIR/stats.safetensors"]));
}

#[test]
fn e28_resume_on_other_data() {
    let mut w = Ws::new();
    let (x, y) = dataset();
    w.write("in/x_more.npy", &npy("<f4", &[122, 8], &f32_bytes(&[x.clone(), x[..56].to_vec()].concat())));
    w.write("in/y_more.npy", &npy("<i8", &[122], &i64_bytes(&[y.clone(), y[..7].to_vec()].concat())));
    w.snapshot();
    w.cli(
        "E28",
        &train("$DIR/in/x_more.npy", "$DIR/in/y_more.npy", &["--resume", "$DIR/out/checkpoint.safetensors"]),
    );
}

#[test]
fn e29_eval_on_features_of_another_width() {
    let mut w = Ws::new();
    w.write("in/x_wide.npy", &npy("<f4", &[115, 9], &f32_bytes(&vec![0.5; 115 * 9])));
    w.snapshot();
    w.cli(
        "E29",
        &[
            "eval",
            "--checkpoint",
            "$DIR/out/checkpoint.safetensors",
            "--features",
            "$DIR/in/x_wide.npy",
            "--labels",
            "$DIR/in/y.npy",
            "--backend",
            "cpu",
        ],
    );
}

#[test]
fn e30_checkpoint_with_an_invalid_configuration() {
    // The fuzzer's find: a checkpoint whose config holds eps = 1e78 once loaded.
    let mut w = Ws::new();
    let bad = include_bytes!("fuzz_regressions/checkpoint/config-eps-1e78.safetensors");
    w.write("in/fuzzed.safetensors", bad);
    w.snapshot();
    w.cli(
        "E30",
        &[
            "eval",
            "--checkpoint",
            "$DIR/in/fuzzed.safetensors",
            "--features",
            "$DIR/in/x.npy",
            "--labels",
            "$DIR/in/y.npy",
            "--backend",
            "cpu",
        ],
    );
}

#[test]
fn e31_checkpoint_cut_short() {
    let mut w = Ws::new();
    let full = std::fs::read(w.path("out/checkpoint.safetensors")).unwrap();
    w.write("in/cut.safetensors", &full[..full.len() / 2]);
    w.snapshot();
    w.cli("E31", &train("$DIR/in/x.npy", "$DIR/in/y.npy", &["--resume", "$DIR/in/cut.safetensors"]));
}

// ---- statistics files (Rust API) ---------------------------------------------------------------

#[test]
fn e32_statistics_file_that_is_a_checkpoint() {
    let mut w = Ws::new();
    w.snapshot();
    w.api("E32", StatsState::load(&w.path("out/checkpoint.safetensors")));
}

#[test]
fn e33_statistics_file_cut_short() {
    let mut w = Ws::new();
    let full = std::fs::read(w.path("stats.safetensors")).unwrap();
    w.write("in/stats_cut.safetensors", &full[..full.len() - 9]);
    w.snapshot();
    w.api("E33", StatsState::load(&w.path("in/stats_cut.safetensors")));
}

#[test]
fn e34_saving_invalid_statistics_keeps_the_old_file() {
    let mut w = Ws::new();
    w.snapshot();
    let mut s = StatsState::new(6, 8, StatsConfig::default()).unwrap();
    s.mu[2] = f64::NAN;
    w.api("E34", s.save(&w.path("stats.safetensors")));
}

#[test]
fn e35_loading_a_checkpoint_that_is_a_statistics_file() {
    let mut w = Ws::new();
    w.snapshot();
    w.api("E35", Checkpoint::load(&w.path("stats.safetensors")));
}

// ---- the head's Rust API -----------------------------------------------------------------------

/// A valid problem: B = 2, C = 3, D = 4.
struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    labels: Vec<i32>,
    sigma: Vec<f32>,
}

fn inputs() -> Inputs {
    Inputs {
        x: (0..8).map(|i| (i as f32 * 0.37).sin()).collect(),
        w: (0..12).map(|i| (i as f32 * 0.91).cos()).collect(),
        labels: vec![0, 2],
        sigma: vec![0.1; 3],
    }
}

fn problem(i: &Inputs) -> HeadProblem<'_> {
    HeadProblem {
        shape: HeadShape { b: 2, c: 3, d: 4 },
        x: &i.x,
        w: &i.w,
        labels: &i.labels,
        sigma_cloud: &i.sigma,
        seed: 1,
        step: 0,
    }
}

#[test]
fn e36_head_x_of_the_wrong_length() {
    let mut w = Ws::new();
    w.snapshot();
    let mut i = inputs();
    i.x.pop();
    w.api("E36", featcloud::cpu::head::forward(&HeadConfig::default(), &problem(&i)));
}

#[test]
fn e37_head_label_out_of_range() {
    let mut w = Ws::new();
    w.snapshot();
    let mut i = inputs();
    i.labels[1] = 3;
    w.api("E37", featcloud::cpu::head::forward(&HeadConfig::default(), &problem(&i)));
}

#[test]
fn e38_head_nan_in_w() {
    let mut w = Ws::new();
    w.snapshot();
    let mut i = inputs();
    i.w[5] = f32::NAN;
    let up = Upstream::Scalar(1.0);
    w.api("E38", featcloud::cpu::head::forward_backward(&HeadConfig::default(), &problem(&i), up));
}

#[test]
fn e39_head_scale_zero() {
    let mut w = Ws::new();
    w.snapshot();
    let cfg = HeadConfig { s: 0.0, ..HeadConfig::default() };
    w.api("E39", featcloud::oracle::forward(&cfg, &problem(&inputs())));
}

#[test]
fn e40_head_negative_cloud_std() {
    let mut w = Ws::new();
    w.snapshot();
    let mut i = inputs();
    i.sigma[1] = -0.1;
    w.api("E40", featcloud::cpu::head::forward(&HeadConfig::default(), &problem(&i)));
}

// ---- the device layer --------------------------------------------------------------------------

/// The emulated device, or `None` (the case is skipped, with a message) without `emu`.
fn emulated() -> Option<std::sync::Arc<Device>> {
    if !featcloud::cuda::emu::AVAILABLE {
        eprintln!("SKIP: built without the `emu` feature");
        return None;
    }
    featcloud::cuda::test_emulated_device(132)
}

#[test]
fn e41_cuda_backend_without_a_gpu() {
    let mut w = Ws::new();
    w.snapshot();
    // On a machine with a GPU this command works, and on one with a driver but no device
    // the message is the driver's: the case is the no-driver machine (CI, laptops).
    if let Err(featcloud::Error::NoDriver(_)) = Device::new(0) {
        w.cli("E41", &train("$DIR/in/x.npy", "$DIR/in/y.npy", &["--backend", "cuda"]));
    } else {
        eprintln!("SKIP E41: this machine has a CUDA driver");
    }
}

#[test]
fn e42_device_tensor_of_the_wrong_size() {
    let Some(dev) = emulated() else { return };
    let mut w = Ws::new();
    w.snapshot();
    w.api("E42", Tensor::<f32>::from_host(&dev, &[1.0; 5], &[2, 3]));
}

#[test]
fn e43_cuda_head_x_and_w_of_other_widths() {
    let Some(dev) = emulated() else { return };
    let mut w = Ws::new();
    w.snapshot();
    let head = HeadOn::new(&*dev, HeadConfig::default(), HeadPath::Fused).unwrap();
    let x = Tensor::<f32>::from_host(&dev, &[0.5; 16], &[2, 8]).unwrap();
    let wt = Tensor::<f32>::from_host(&dev, &[0.5; 12], &[3, 4]).unwrap();
    let sigma = Tensor::<f32>::from_host(&dev, &[0.1; 3], &[3]).unwrap();
    w.api("E43", head.forward(&x, &wt, &[0, 1], &sigma, 1, 0));
}

#[test]
fn e44_cuda_head_nan_in_w() {
    let Some(dev) = emulated() else { return };
    let mut w = Ws::new();
    w.snapshot();
    let i = inputs();
    let mut wv = i.w.clone();
    wv[7] = f32::NAN;
    let head = HeadOn::new(&*dev, HeadConfig::default(), HeadPath::Fused).unwrap();
    let x = Tensor::<f32>::from_host(&dev, &i.x, &[2, 4]).unwrap();
    let wt = Tensor::<f32>::from_host(&dev, &wv, &[3, 4]).unwrap();
    let sigma = Tensor::<f32>::from_host(&dev, &i.sigma, &[3]).unwrap();
    let r =
        head.forward_backward(&x, &wt, &i.labels, &sigma, 1, 0, HeadUpstream::Scalar(1.0), GradDtype::Input);
    w.api("E44", r.map(|_| ()));
}

#[test]
fn e45_cuda_head_per_row_reduction_with_a_scalar_upstream() {
    let Some(dev) = emulated() else { return };
    let mut w = Ws::new();
    w.snapshot();
    let i = inputs();
    let cfg = HeadConfig { reduction: Reduction::None, ..HeadConfig::default() };
    let head = HeadOn::new(&*dev, cfg, HeadPath::Fused).unwrap();
    let x = Tensor::<f32>::from_host(&dev, &i.x, &[2, 4]).unwrap();
    let wt = Tensor::<f32>::from_host(&dev, &i.w, &[3, 4]).unwrap();
    let sigma = Tensor::<f32>::from_host(&dev, &i.sigma, &[3]).unwrap();
    let r =
        head.forward_backward(&x, &wt, &i.labels, &sigma, 1, 0, HeadUpstream::Scalar(1.0), GradDtype::Input);
    w.api("E45", r.map(|_| ()));
}

#[test]
fn e46_attention_kernels_forced_past_their_width() {
    let Some(dev) = emulated() else { return };
    let mut w = Ws::new();
    w.snapshot();
    let tuning = FusedTuning { kernels: Some(FusedKernels::Attention), ..Default::default() };
    let head = HeadOn::new(&*dev, HeadConfig::default(), HeadPath::Fused).unwrap().with_tuning(tuning);
    let x = Tensor::<f32>::from_host(&dev, &vec![0.5; 2 * 1024], &[2, 1024]).unwrap();
    let wt = Tensor::<f32>::from_host(&dev, &vec![0.5; 3 * 1024], &[3, 1024]).unwrap();
    let sigma = Tensor::<f32>::from_host(&dev, &[0.1; 3], &[3]).unwrap();
    w.api("E46", head.forward(&x, &wt, &[0, 1], &sigma, 1, 0));
}

#[test]
fn e47_backward_at_another_shape_than_its_forward() {
    let Some(dev) = emulated() else { return };
    let mut w = Ws::new();
    w.snapshot();
    let i = inputs();
    let head = HeadOn::new(&*dev, HeadConfig::default(), HeadPath::Fused).unwrap();
    let x = Tensor::<f32>::from_host(&dev, &i.x, &[2, 4]).unwrap();
    let wt = Tensor::<f32>::from_host(&dev, &i.w, &[3, 4]).unwrap();
    let sigma = Tensor::<f32>::from_host(&dev, &i.sigma, &[3]).unwrap();
    let fwd = head.forward(&x, &wt, &i.labels, &sigma, 1, 0).unwrap();
    let x1 = Tensor::<f32>::from_host(&dev, &i.x[..4], &[1, 4]).unwrap();
    let r =
        head.backward(&x1, &wt, &i.labels[..1], &sigma, &fwd, HeadUpstream::Scalar(1.0), GradDtype::Input);
    w.api("E47", r.map(|_| ()));
}

// ---- data files, added later ---------------------------------------------------------------

#[test]
fn e48_labels_that_are_sparse_ids() {
    // Below the 2^24 class bound, but 6 labels spread over 500001 implied classes.
    let mut w = Ws::new();
    let y: Vec<i64> = dataset().1.iter().map(|&l| l * 100_000).collect();
    w.write("in/y_sparse.npy", &npy("<i8", &[115], &i64_bytes(&y)));
    w.snapshot();
    w.cli("E48", &train("$DIR/in/x.npy", "$DIR/in/y_sparse.npy", &[]));
}

// ---- sub-centers and clean ------------------------------------------------------------------

#[test]
fn e49_subcenters_out_of_range() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E49", &train("$DIR/in/x.npy", "$DIR/in/y.npy", &["--subcenters", "0"]));
}

/// `featcloud clean` of the workspace's checkpoint on its data, with `extra` flags.
fn clean_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "clean",
        "--checkpoint",
        "$DIR/out/checkpoint.safetensors",
        "--features",
        "$DIR/in/x.npy",
        "--labels",
        "$DIR/in/y.npy",
        "--out",
        out,
        "--backend",
        "cpu",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn e50_clean_angle_out_of_range() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E50", &clean_args("$DIR/clean", &["--max-angle", "200"]));
}

#[test]
fn e51_clean_out_is_a_file() {
    let mut w = Ws::new();
    w.snapshot();
    w.cli("E51", &clean_args("$DIR/eval.json", &[]));
}
