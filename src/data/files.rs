//! Feature / label files: `.npy` (NumPy format 1.0, 2.0 and 3.0) and `.safetensors`, and a
//! stratified train / test split.
//!
//! `.npy` support: C-order arrays only (a `fortran_order: True` file is refused with a clear
//! error); little-endian, big-endian or byte-sized dtypes. Features: `f4`, `f2` or `f8`
//! (converted to f32), shape `[N, F]`. Labels: any integer dtype (`i1`..`i8`, `u1`..`u8`),
//! shape `[N]` or `[N, 1]`. Every malformed file (wrong magic, truncated header or data,
//! unsupported dtype, wrong rank) gives [`Error::Format`] naming the path; nothing panics.
//!
//! `.safetensors` support: features under the key [`FEATURES_KEY`] (F32, F16, BF16 or F64,
//! `[N, F]`), labels under [`LABELS_KEY`] (any integer dtype, `[N]` or `[N, 1]`).
//!
//! The safetensors container is parsed by the `safetensors` crate. The `.npy` header is
//! parsed here: the crates that parse it (`npyz`, `ndarray-npy`) hand the header dict to a
//! general Python-literal parser, allocate the announced header length (up to 4 GiB in
//! format 2.0) before reading it, and, in `npyz`'s case, multiply the shape's dimensions
//! unchecked; `ndarray-npy` reads no `f2`. The few lines below check every size. Each
//! parser is reachable from bytes ([`npy_features_from_bytes`], [`npy_labels_from_bytes`],
//! [`safetensors_from_bytes`], [`dataset_from_bytes`]), which the path loaders call and
//! the fuzz targets in `fuzz/` exercise (`scripts/fuzz.sh`).

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors};

use super::Dataset;
use crate::error::{Error, Result};
use crate::io::write_atomic;

/// Tensor name of the features in a `.safetensors` file read by [`load_dataset`].
pub const FEATURES_KEY: &str = "features";
/// Tensor name of the labels in a `.safetensors` file read by [`load_dataset`].
pub const LABELS_KEY: &str = "labels";

/// The most classes a data set may have: 2^24 (16.8 M, ten times the largest public face
/// data sets), given with `num_classes` or implied by the largest label.
///
/// Per-class state (W, its optimizer moments, the statistics) is allocated for every class
/// up to the largest label, so labels that are not class indices (hashes, IDs of 2e9) must
/// fail while loading, with a message, not later in a huge allocation. Two rules catch
/// them: this bound, and, when the class count is implied by the labels, more than
/// [`MAX_IMPLIED_EMPTY`] classes without a row making up most of the implied classes.
pub const MAX_CLASSES: usize = 1 << 24;

/// With the class count implied by the largest label, how many classes may have no row
/// before labels that leave most classes empty are refused as IDs (pass `num_classes` to
/// keep empty classes on purpose).
pub const MAX_IMPLIED_EMPTY: usize = 1024;

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Element type of an array, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    F2,
    F4,
    F8,
    Bf16,
    Int { bytes: usize, signed: bool },
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::F2 | Elem::Bf16 => 2,
            Elem::F4 => 4,
            Elem::F8 => 8,
            Elem::Int { bytes, .. } => bytes,
        }
    }
}

/// A parsed array: element type, byte order, shape and the raw data bytes.
struct RawArray<'a> {
    elem: Elem,
    big_endian: bool,
    shape: Vec<usize>,
    data: &'a [u8],
    /// Text of the dtype for error messages (`<f4`, `F32`, ...).
    dtype_name: String,
}

/// Reads an `.npy` file of f32, f16 (or f64) features of shape `[N, F]`, returned as f32
/// row-major with `(data, n, f)`.
pub fn load_npy_features(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    npy_features_from_bytes(&read(path)?, path)
}

/// Reads an `.npy` file of integer labels of shape `[N]` (or `[N, 1]`).
pub fn load_npy_labels(path: &Path) -> Result<Vec<i64>> {
    npy_labels_from_bytes(&read(path)?, path)
}

/// Parses the bytes of an `.npy` features file, as [`load_npy_features`] does after
/// reading the file (it calls this); errors name `source` as the file.
pub fn npy_features_from_bytes(bytes: &[u8], source: &Path) -> Result<(Vec<f32>, usize, usize)> {
    features_from_raw(source, &parse_npy(source, bytes)?)
}

/// Parses the bytes of an `.npy` labels file, as [`load_npy_labels`] does after reading
/// the file (it calls this); errors name `source` as the file.
pub fn npy_labels_from_bytes(bytes: &[u8], source: &Path) -> Result<Vec<i64>> {
    labels_from_raw(source, &parse_npy(source, bytes)?)
}

/// Reads features `[N, F]` (as f32) and labels `[N]` from one `.safetensors` file:
/// `(features, n, f, labels)`. Errors name the path and list the keys present when one is
/// missing.
pub fn load_safetensors(
    path: &Path,
    features_key: &str,
    labels_key: &str,
) -> Result<(Vec<f32>, usize, usize, Vec<i64>)> {
    safetensors_from_bytes(&read(path)?, path, features_key, labels_key)
}

/// Parses the bytes of a `.safetensors` file holding features and labels, as
/// [`load_safetensors`] does after reading the file (it calls this); errors name `source`
/// as the file.
pub fn safetensors_from_bytes(
    bytes: &[u8],
    source: &Path,
    features_key: &str,
    labels_key: &str,
) -> Result<(Vec<f32>, usize, usize, Vec<i64>)> {
    let st = parse_safetensors(source, bytes)?;
    let (features, n, f) = features_from_raw(source, &st_tensor(source, &st, features_key)?)?;
    let labels = labels_from_raw(source, &st_tensor(source, &st, labels_key)?)?;
    if labels.len() != n {
        return Err(Error::format(
            source,
            format!("'{labels_key}' has {} labels but '{features_key}' has {n} rows", labels.len()),
        ));
    }
    Ok((features, n, f, labels))
}

/// Loads a labelled dataset from a features file and a labels file.
///
/// Each file is read by its extension: `.safetensors` (features under [`FEATURES_KEY`],
/// labels under [`LABELS_KEY`]; pass the same file twice for a single file holding both),
/// anything else as `.npy`. Checks, each failing with an error naming the offending file:
/// the row counts agree; no feature is NaN or infinite; no label is negative or
/// `>= num_classes`. `num_classes` defaults to `max label + 1`, and is at most [`MAX_CLASSES`].
pub fn load_dataset(features: &Path, labels: &Path, num_classes: Option<usize>) -> Result<Dataset> {
    let features_bytes = read(features)?;
    if features == labels {
        return dataset_from_bytes(features, &features_bytes, labels, &features_bytes, num_classes);
    }
    let labels_bytes = read(labels)?;
    dataset_from_bytes(features, &features_bytes, labels, &labels_bytes, num_classes)
}

/// [`load_dataset`] on file contents already read: `features_bytes` is the content of
/// the file `features`, `labels_bytes` that of `labels` (the paths pick the format by
/// extension and name the files in errors; nothing is read from disk). When `features`
/// and `labels` are the same `.safetensors` path, both tensors come from `features_bytes`.
/// [`load_dataset`] reads the files and calls this.
pub fn dataset_from_bytes(
    features: &Path,
    features_bytes: &[u8],
    labels: &Path,
    labels_bytes: &[u8],
    num_classes: Option<usize>,
) -> Result<Dataset> {
    let (x, n, f, y) = if is_safetensors(features) && features == labels {
        safetensors_from_bytes(features_bytes, features, FEATURES_KEY, LABELS_KEY)?
    } else {
        let (x, n, f) = if is_safetensors(features) {
            safetensor_from_bytes(features_bytes, features, FEATURES_KEY, features_from_raw)?
        } else {
            npy_features_from_bytes(features_bytes, features)?
        };
        let y = if is_safetensors(labels) {
            safetensor_from_bytes(labels_bytes, labels, LABELS_KEY, labels_from_raw)?
        } else {
            npy_labels_from_bytes(labels_bytes, labels)?
        };
        (x, n, f, y)
    };
    if y.len() != n {
        return Err(Error::format(
            labels,
            format!("has {} labels but {} has {n} feature rows", y.len(), features.display()),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::format(
            features,
            format!("non-finite feature {} at row {}, column {}", x[i], i / f, i % f),
        ));
    }
    if let Some(row) = y.iter().position(|&l| l < 0) {
        return Err(Error::format(labels, format!("label {} at row {row} is negative", y[row])));
    }
    let max = y.iter().copied().max();
    let c = match (num_classes, max) {
        (Some(0), _) => return Err(Error::InvalidConfig("num_classes must be >= 1".into())),
        (Some(c), _) if c > MAX_CLASSES => {
            return Err(Error::InvalidConfig(format!(
                "num_classes = {c} is above the {MAX_CLASSES} classes a data set may have"
            )))
        }
        (Some(c), _) => c,
        (None, Some(m)) if m >= MAX_CLASSES as i64 => {
            return Err(Error::format(
                labels,
                format!(
                    "largest label {m} implies {} classes, above the {MAX_CLASSES} a data set may have \
                     (labels must be class indices 0..C-1)",
                    m as i128 + 1
                ),
            ))
        }
        (None, Some(m)) => m as usize + 1,
        (None, None) => return Err(Error::format(labels, "no labels (the file holds zero rows)")),
    };
    if num_classes.is_none() {
        let mut seen = vec![false; c];
        y.iter().for_each(|&l| seen[l as usize] = true);
        let distinct = seen.iter().filter(|&&b| b).count();
        let empty = c - distinct;
        if empty > MAX_IMPLIED_EMPTY && empty > distinct {
            return Err(Error::format(
                labels,
                format!(
                    "the labels imply {c} classes (largest label {}) but only {distinct} of them have rows: \
                     they look like IDs, not class indices 0..C-1 (relabel them, or give the class count, \
                     --num-classes, to keep empty classes)",
                    c - 1
                ),
            ));
        }
    }
    if let Some(row) = y.iter().position(|&l| l as u64 >= c as u64) {
        return Err(Error::format(
            labels,
            format!("label {} at row {row} is out of range for num_classes = {c}", y[row]),
        ));
    }
    let y32 = y.into_iter().map(|l| l as i32).collect();
    Dataset::new(x, y32, f, c)
}

/// Splits `ds` into `(train, test)`, stratified per class and deterministic for `seed`.
///
/// For each class with `n_k` rows, `round(n_k * test_fraction)` rows, clamped to
/// `[0, n_k - 1]` (a class always keeps at least one training row), go to test; which rows
/// is decided by a Fisher-Yates shuffle of the class's rows with `ChaCha8Rng(seed)`,
/// classes visited in label order. Both outputs keep the original row order.
/// `test_fraction` must be in `(0, 1)`.
pub fn split_fraction(ds: &Dataset, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
    let (train, test) = split_fraction_rows(ds, test_fraction, seed)?;
    Ok((ds.subset(&train), ds.subset(&test)))
}

/// The rows of `ds` that [`split_fraction`] puts in (train, test), each ascending: how a
/// training row maps back to its row in the user's file (`featcloud clean`).
pub fn split_fraction_rows(ds: &Dataset, test_fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(Error::InvalidConfig(format!("test fraction must be in (0, 1), got {test_fraction}")));
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); ds.num_classes];
    for (i, &y) in ds.labels.iter().enumerate() {
        by_class[y as usize].push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut is_test = vec![false; ds.n];
    for rows in &mut by_class {
        let nk = rows.len();
        if nk == 0 {
            continue;
        }
        for i in (1..nk).rev() {
            let j = rng.random_range(0..=i);
            rows.swap(i, j);
        }
        let n_test = ((nk as f64 * test_fraction).round() as usize).min(nk - 1);
        for &r in &rows[..n_test] {
            is_test[r] = true;
        }
    }
    let train: Vec<usize> = (0..ds.n).filter(|&i| !is_test[i]).collect();
    let test: Vec<usize> = (0..ds.n).filter(|&i| is_test[i]).collect();
    Ok((train, test))
}

/// Writes `data` with `shape` (C order) as a little-endian f32 `.npy` file, atomically.
pub fn save_npy_f32(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    let expected = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if expected != Some(data.len()) {
        return Err(Error::Shape(format!("save_npy_f32: {} values do not fill shape {shape:?}", data.len())));
    }
    let mut bytes = npy_header("<f4", shape);
    bytes.reserve(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

/// Writes `data` as a 1-D little-endian i64 `.npy` file, atomically.
pub fn save_npy_i64(path: &Path, data: &[i64]) -> Result<()> {
    let mut bytes = npy_header("<i8", &[data.len()]);
    bytes.reserve(data.len() * 8);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

/// NumPy format 1.0 header; the data starts on a 64-byte boundary as NumPy writes it.
fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let shape_txt = match shape {
        [d] => format!("({d},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    let unpadded = NPY_MAGIC.len() + 2 + 2 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = Vec::with_capacity(NPY_MAGIC.len() + 4 + dict.len());
    out.extend_from_slice(NPY_MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// Parses the header of an `.npy` file and returns its data section.
fn parse_npy<'a>(path: &Path, bytes: &'a [u8]) -> Result<RawArray<'a>> {
    let fmt = |m: String| Error::format(path, m);
    if bytes.len() < NPY_MAGIC.len() + 2 || &bytes[..NPY_MAGIC.len()] != NPY_MAGIC {
        return Err(fmt("not an .npy file (missing \\x93NUMPY magic)".into()));
    }
    let major = bytes[6];
    let (header_len, header_start) = match major {
        1 => {
            let b = bytes.get(8..10).ok_or_else(|| fmt("truncated .npy header".into()))?;
            (u16::from_le_bytes([b[0], b[1]]) as usize, 10usize)
        }
        2 | 3 => {
            let b = bytes.get(8..12).ok_or_else(|| fmt("truncated .npy header".into()))?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        v => return Err(fmt(format!("unsupported .npy format version {v}.{}", bytes[7]))),
    };
    let header_end = header_start.checked_add(header_len).filter(|&e| e <= bytes.len()).ok_or_else(|| {
        fmt(format!("truncated .npy header ({header_len} bytes announced, file has {})", bytes.len()))
    })?;
    let header = std::str::from_utf8(&bytes[header_start..header_end])
        .map_err(|_| fmt(".npy header is not valid text".into()))?;

    let descr = dict_value(header, "descr")
        .and_then(|v| quoted(v))
        .ok_or_else(|| fmt(format!("no 'descr' string in .npy header {header:?}")))?;
    let fortran = dict_value(header, "fortran_order")
        .ok_or_else(|| fmt(format!("no 'fortran_order' in .npy header {header:?}")))?;
    if fortran.starts_with("True") {
        return Err(fmt(
            "Fortran-order arrays are not supported; save a C-order array (np.ascontiguousarray)".into(),
        ));
    } else if !fortran.starts_with("False") {
        return Err(fmt(format!("bad 'fortran_order' in .npy header {header:?}")));
    }
    let shape = dict_value(header, "shape")
        .and_then(parse_shape)
        .ok_or_else(|| fmt(format!("no valid 'shape' tuple in .npy header {header:?}")))?;
    let (elem, big_endian) = parse_descr(descr).ok_or_else(|| {
        fmt(format!("unsupported dtype '{descr}' (supported: f2, f4, f8 and integer dtypes)"))
    })?;

    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|c| c.checked_mul(elem.size()))
        .ok_or_else(|| fmt(format!("shape {shape:?} is too large")))?;
    let data = &bytes[header_end..];
    if data.len() < count {
        return Err(fmt(format!(
            "truncated data: shape {shape:?} of '{descr}' needs {count} bytes, file has {}",
            data.len()
        )));
    }
    if data.len() > count {
        return Err(fmt(format!(
            "{} trailing bytes after the data of shape {shape:?} '{descr}'",
            data.len() - count
        )));
    }
    Ok(RawArray { elem, big_endian, shape, data, dtype_name: descr.to_string() })
}

/// The text after `'key':` in a Python dict literal.
fn dict_value<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let pat_single = format!("'{key}'");
    let pat_double = format!("\"{key}\"");
    let pos = header
        .find(&pat_single)
        .map(|p| p + pat_single.len())
        .or_else(|| header.find(&pat_double).map(|p| p + pat_double.len()))?;
    let rest = header[pos..].trim_start();
    Some(rest.strip_prefix(':')?.trim_start())
}

/// The content of a leading `'...'` or `"..."` string.
fn quoted(v: &str) -> Option<&str> {
    let q = v.chars().next().filter(|&c| c == '\'' || c == '"')?;
    let rest = &v[1..];
    rest.find(q).map(|end| &rest[..end])
}

/// `(3, 4)`, `(3,)` or `()` at the start of `v`.
fn parse_shape(v: &str) -> Option<Vec<usize>> {
    let inner = v.strip_prefix('(')?;
    let inner = &inner[..inner.find(')')?];
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse().ok())
        .collect()
}

/// `<f4` -> (F4, little endian). `|` and `=` (native) count as little endian; byte-sized
/// types have no order.
fn parse_descr(d: &str) -> Option<(Elem, bool)> {
    let (order, ty) = match d.chars().next()? {
        c @ ('<' | '>' | '|' | '=') => (c, &d[1..]),
        _ => ('=', d),
    };
    let big = order == '>';
    let kind = ty.chars().next()?;
    let bytes: usize = ty.get(1..)?.parse().ok()?;
    let elem = match (kind, bytes) {
        ('f', 2) => Elem::F2,
        ('f', 4) => Elem::F4,
        ('f', 8) => Elem::F8,
        ('i', 1 | 2 | 4 | 8) => Elem::Int { bytes, signed: true },
        ('u', 1 | 2 | 4 | 8) => Elem::Int { bytes, signed: false },
        ('b', 1) => Elem::Int { bytes, signed: false },
        _ => return None,
    };
    Some((elem, big))
}

/// Parses a safetensors file's bytes; the error names the file.
fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(path, crate::io::safetensors::describe_parse_error(bytes, &e)))
}

/// Parses a safetensors file's bytes and converts its tensor `key` with `conv`.
fn safetensor_from_bytes<R>(
    bytes: &[u8],
    path: &Path,
    key: &str,
    conv: fn(&Path, &RawArray) -> Result<R>,
) -> Result<R> {
    conv(path, &st_tensor(path, &parse_safetensors(path, bytes)?, key)?)
}

/// Looks up `key` in a safetensors file as a raw array.
fn st_tensor<'a>(path: &Path, st: &'a SafeTensors<'a>, key: &str) -> Result<RawArray<'a>> {
    let view = st.tensor(key).map_err(|_| {
        let mut names: Vec<_> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        Error::format(path, format!("no tensor '{key}' (tensors present: {})", names.join(", ")))
    })?;
    let dtype = view.dtype();
    let elem = match dtype {
        Dtype::F16 => Elem::F2,
        Dtype::BF16 => Elem::Bf16,
        Dtype::F32 => Elem::F4,
        Dtype::F64 => Elem::F8,
        Dtype::I8 => Elem::Int { bytes: 1, signed: true },
        Dtype::I16 => Elem::Int { bytes: 2, signed: true },
        Dtype::I32 => Elem::Int { bytes: 4, signed: true },
        Dtype::I64 => Elem::Int { bytes: 8, signed: true },
        Dtype::U8 | Dtype::BOOL => Elem::Int { bytes: 1, signed: false },
        Dtype::U16 => Elem::Int { bytes: 2, signed: false },
        Dtype::U32 => Elem::Int { bytes: 4, signed: false },
        Dtype::U64 => Elem::Int { bytes: 8, signed: false },
        other => return Err(Error::format(path, format!("tensor '{key}' has unsupported dtype {other:?}"))),
    };
    Ok(RawArray {
        elem,
        big_endian: false,
        shape: view.shape().to_vec(),
        data: view.data(),
        dtype_name: format!("{dtype:?} (tensor '{key}')"),
    })
}

/// Element `i` of a floating-point array as f32.
fn read_float(arr: &RawArray, i: usize) -> f32 {
    let s = arr.elem.size();
    let mut b = [0u8; 8];
    b[..s].copy_from_slice(&arr.data[i * s..(i + 1) * s]);
    if arr.big_endian {
        b[..s].reverse();
    }
    match arr.elem {
        Elem::F2 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        Elem::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        Elem::F4 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        Elem::F8 => f64::from_le_bytes(b) as f32,
        Elem::Int { .. } => unreachable!("read_float on an integer array"),
    }
}

/// Element `i` of an integer array as i64 (`None` for a u64 above i64::MAX).
fn read_int(arr: &RawArray, i: usize, bytes: usize, signed: bool) -> Option<i64> {
    let mut b = [0u8; 8];
    b[..bytes].copy_from_slice(&arr.data[i * bytes..(i + 1) * bytes]);
    if arr.big_endian {
        b[..bytes].reverse();
    }
    let raw = u64::from_le_bytes(b);
    if signed {
        let shift = 64 - 8 * bytes as u32;
        Some(((raw << shift) as i64) >> shift)
    } else {
        i64::try_from(raw).ok()
    }
}

fn features_from_raw(path: &Path, arr: &RawArray) -> Result<(Vec<f32>, usize, usize)> {
    if matches!(arr.elem, Elem::Int { .. }) {
        return Err(Error::format(
            path,
            format!("features must be floating point (f4, f2, f8, bf16), got {}", arr.dtype_name),
        ));
    }
    let (n, f) = match arr.shape[..] {
        [n, f] => (n, f),
        _ => {
            return Err(Error::format(
                path,
                format!("features must be a 2-D [N, F] array, got shape {:?}", arr.shape),
            ))
        }
    };
    if f == 0 {
        return Err(Error::format(path, format!("features have shape {:?}: F must be >= 1", arr.shape)));
    }
    Ok(((0..n * f).map(|i| read_float(arr, i)).collect(), n, f))
}

fn labels_from_raw(path: &Path, arr: &RawArray) -> Result<Vec<i64>> {
    let Elem::Int { bytes, signed } = arr.elem else {
        return Err(Error::format(
            path,
            format!("labels must have an integer dtype, got {}", arr.dtype_name),
        ));
    };
    let n = match arr.shape[..] {
        [n] | [n, 1] => n,
        _ => {
            return Err(Error::format(
                path,
                format!("labels must be a 1-D [N] (or [N, 1]) array, got shape {:?}", arr.shape),
            ))
        }
    };
    (0..n)
        .map(|i| {
            read_int(arr, i, bytes, signed)
                .ok_or_else(|| Error::format(path, format!("label at row {i} does not fit in i64")))
        })
        .collect()
}
