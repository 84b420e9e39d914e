//! The one safetensors writer and reader of featcloud's own files: the checkpoint
//! ([`crate::engine::checkpoint`]) and the statistics file ([`crate::statsfile`]).
//!
//! Both files are little-endian tensors plus string metadata with a `format` tag.
//! [`TensorWriter`] collects typed tensors and metadata and serializes them
//! (failures are [`Error::Serialize`] naming the file kind); [`TensorReader`]
//! parses bytes and reads typed tensors of an expected shape and metadata numbers,
//! every problem an [`Error::Format`] naming the file and the tensor or key.

use crate::error::{Error, Result};
use ::safetensors::tensor::TensorView;
use ::safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Float width of a tensor of moments or centers: the precision of the state it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// 32-bit floats (the device state).
    F32,
    /// 64-bit floats (the CPU oracle's state).
    F64,
}

/// Tensors and metadata of one file, in the order they were added.
#[derive(Debug)]
pub struct TensorWriter {
    /// What the file is (`checkpoint`, `statistics file`), for error messages.
    what: &'static str,
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

impl TensorWriter {
    /// An empty file of kind `what` with metadata `format` = `format`.
    pub fn new(what: &'static str, format: &str) -> Self {
        let meta = HashMap::from([("format".to_string(), format.to_string())]);
        Self { what, tensors: Vec::new(), meta }
    }

    fn push(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) {
        self.tensors.push((name.to_string(), dtype, shape.to_vec(), bytes));
    }

    /// An F32 tensor.
    pub fn f32s(&mut self, name: &str, shape: &[usize], v: &[f32]) {
        self.push(name, Dtype::F32, shape, le_bytes(v, f32::to_le_bytes));
    }

    /// A float tensor stored as F32 or F64 (`precision`); with F32 every value is
    /// expected to be an exact f32 (the state it came from was f32).
    pub fn floats(&mut self, name: &str, shape: &[usize], v: &[f64], precision: Precision) {
        match precision {
            Precision::F32 => self.push(name, Dtype::F32, shape, le_bytes(v, |x| (x as f32).to_le_bytes())),
            Precision::F64 => self.push(name, Dtype::F64, shape, le_bytes(v, f64::to_le_bytes)),
        }
    }

    /// A U64 tensor.
    pub fn u64s(&mut self, name: &str, shape: &[usize], v: &[u64]) {
        self.push(name, Dtype::U64, shape, le_bytes(v, u64::to_le_bytes));
    }

    /// A U8 tensor of 0/1 flags.
    pub fn bools(&mut self, name: &str, shape: &[usize], v: &[bool]) {
        self.push(name, Dtype::U8, shape, v.iter().map(|&b| b as u8).collect());
    }

    /// A metadata entry.
    pub fn meta(&mut self, key: &str, value: impl ToString) {
        self.meta.insert(key.to_string(), value.to_string());
    }

    /// A metadata entry holding `value` as JSON.
    pub fn meta_json(&mut self, key: &str, value: &impl serde::Serialize) -> Result<()> {
        let json =
            serde_json::to_string(value).map_err(|e| self.error(Some(&format!("metadata '{key}'")), e))?;
        self.meta(key, json);
        Ok(())
    }

    /// A serialization error about `part` of the file (the whole file when `None`).
    fn error(&self, part: Option<&str>, e: impl std::fmt::Display) -> Error {
        let what = match part {
            Some(part) => format!("{} {part}", self.what),
            None => self.what.to_string(),
        };
        Error::Serialize { what, message: e.to_string() }
    }

    /// The safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut views = Vec::with_capacity(self.tensors.len());
        for (name, dtype, shape, bytes) in &self.tensors {
            let view = TensorView::new(*dtype, shape.clone(), bytes)
                .map_err(|e| self.error(Some(&format!("tensor '{name}'")), e))?;
            views.push((name.clone(), view));
        }
        let bytes =
            ::safetensors::serialize(views, Some(self.meta.clone())).map_err(|e| self.error(None, e))?;
        canonical_header(&bytes).map_err(|e| self.error(Some("header"), e))
    }

    /// Writes the file to `path` atomically ([`crate::io::write_atomic`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_atomic(path, &self.to_bytes()?)
    }
}

/// A parsed safetensors file; every error is an [`Error::Format`] naming `path`.
pub struct TensorReader<'a> {
    st: SafeTensors<'a>,
    meta: HashMap<String, String>,
    path: PathBuf,
}

impl<'a> TensorReader<'a> {
    /// Parses `bytes` read from `path` and checks that metadata `format` is `format`.
    pub fn parse(bytes: &'a [u8], path: &Path, format: &str) -> Result<Self> {
        let bad = |e| Error::format(path, describe_parse_error(bytes, &e));
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(bad)?;
        let st = SafeTensors::deserialize(bytes).map_err(bad)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let r = Self { st, meta, path: path.to_path_buf() };
        let found = r.meta.get("format").ok_or_else(|| {
            r.bad(format!("metadata 'format' is missing (expected '{format}'; not a featcloud file?)"))
        })?;
        if found != format {
            return Err(r.bad(format!("format is '{found}', expected '{format}'")));
        }
        Ok(r)
    }

    /// A format error about this file.
    pub fn bad(&self, message: impl Into<String>) -> Error {
        Error::format(&self.path, message)
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names = self.st.names();
        names.sort_unstable();
        names
    }

    /// Whether tensor `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.st.names().contains(&name)
    }

    /// Metadata `key`.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.meta.get(key).map(String::as_str).ok_or_else(|| self.bad(format!("metadata '{key}' is missing")))
    }

    /// Whether metadata `key` exists.
    pub fn has_meta(&self, key: &str) -> bool {
        self.meta.contains_key(key)
    }

    /// Metadata `key` as a number.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        let v = self.meta(key)?;
        v.parse::<u64>().map_err(|e| self.bad(format!("metadata '{key}' = '{v}' is not a number: {e}")))
    }

    /// Metadata `key` parsed from JSON.
    pub fn meta_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        serde_json::from_str(self.meta(key)?)
            .map_err(|e| self.bad(format!("metadata '{key}' is invalid: {e}")))
    }

    /// Tensor `name` with its dtype checked against `dtypes`, and its shape against
    /// `shape` when given; returns (dtype, shape, bytes).
    fn raw(
        &self,
        name: &str,
        dtypes: &[Dtype],
        shape: Option<&[usize]>,
    ) -> Result<(Dtype, Vec<usize>, &[u8])> {
        let t = self.st.tensor(name).map_err(|_| self.bad(format!("tensor '{name}' is missing")))?;
        if !dtypes.contains(&t.dtype()) {
            let want = dtypes.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>().join(" or ");
            return Err(self.bad(format!("tensor '{name}' has dtype {:?}, expected {want}", t.dtype())));
        }
        if let Some(shape) = shape.filter(|s| *s != t.shape()) {
            return Err(self.bad(format!("tensor '{name}' has shape {:?}, expected {shape:?}", t.shape())));
        }
        Ok((t.dtype(), t.shape().to_vec(), t.data()))
    }

    /// An F32 tensor of any shape; every value must be finite. Returns (shape, values).
    pub fn f32s(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (_, shape, b) = self.raw(name, &[Dtype::F32], None)?;
        let v: Vec<f32> = b.chunks_exact(4).map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
        self.finite(name, v.iter().map(|&x| x as f64))?;
        Ok((shape, v))
    }

    /// A finite float tensor of `shape` stored as F32 or F64, widened to f64, with its precision.
    pub fn floats(&self, name: &str, shape: &[usize]) -> Result<(Precision, Vec<f64>)> {
        let (dtype, _, b) = self.raw(name, &[Dtype::F32, Dtype::F64], Some(shape))?;
        let (precision, v) = if dtype == Dtype::F32 {
            (
                Precision::F32,
                b.chunks_exact(4).map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]) as f64).collect(),
            )
        } else {
            (Precision::F64, b.chunks_exact(8).map(|w| f64::from_le_bytes(eight(w))).collect::<Vec<_>>())
        };
        self.finite(name, v.iter().copied())?;
        Ok((precision, v))
    }

    /// A U64 tensor of `shape`.
    pub fn u64s(&self, name: &str, shape: &[usize]) -> Result<Vec<u64>> {
        let (_, _, b) = self.raw(name, &[Dtype::U64], Some(shape))?;
        Ok(b.chunks_exact(8).map(|w| u64::from_le_bytes(eight(w))).collect())
    }

    /// A U8 tensor of 0/1 flags of `shape`.
    pub fn bools(&self, name: &str, shape: &[usize]) -> Result<Vec<bool>> {
        let (_, _, b) = self.raw(name, &[Dtype::U8], Some(shape))?;
        if let Some(i) = b.iter().position(|&x| x > 1) {
            return Err(self.bad(format!("{name}[{i}] = {}, expected 0 or 1", b[i])));
        }
        Ok(b.iter().map(|&x| x == 1).collect())
    }

    fn finite(&self, name: &str, mut v: impl Iterator<Item = f64>) -> Result<()> {
        match v.position(|x| !x.is_finite()) {
            Some(i) => Err(self.bad(format!("tensor '{name}' has a non-finite value at index {i}"))),
            None => Ok(()),
        }
    }
}

/// `file` (safetensors bytes) with its JSON header's keys in sorted order, so that the same
/// tensors and metadata always give the same bytes.
///
/// The safetensors crate writes the metadata from a `HashMap`, whose order changes from
/// process to process: a checkpoint saved twice differed in its header (found by the crash
/// test, which compares the checkpoint of a resumed run with an uninterrupted one's byte
/// for byte). Data offsets are relative to the end of the header, so only the header is
/// rewritten (padded with spaces to a multiple of 8 bytes, as the format wants).
fn canonical_header(file: &[u8]) -> serde_json::Result<Vec<u8>> {
    use std::collections::BTreeMap;
    // The crate wrote `file` a moment ago: 8 bytes of header length, then the header.
    let n = u64::from_le_bytes(eight(&file[..8])) as usize;
    let (header, data) = file[8..].split_at(n);
    let mut top: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header)?;
    if let Some(meta) = top.get_mut("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> = serde_json::from_value(meta.take())?;
        *meta = serde_json::to_value(sorted)?;
    }
    let mut json = serde_json::to_vec(&top)?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    Ok(out)
}

/// Why `bytes` did not parse as safetensors (the crate's error `e`), in a user's words:
/// the crate's messages for a file cut short ("incomplete metadata, file not fully
/// covered") or for a file that is not safetensors at all ("header too large") do not say
/// what is wrong with the file.
pub fn describe_parse_error(bytes: &[u8], e: &::safetensors::SafeTensorError) -> String {
    use ::safetensors::SafeTensorError as E;
    let len = bytes.len();
    match e {
        _ if len < 8 => {
            format!("not a safetensors file (it has {len} bytes, fewer than the 8 of a header length)")
        }
        E::HeaderTooLarge | E::InvalidHeaderLength | E::HeaderTooSmall => {
            let n = u64::from_le_bytes(eight(&bytes[..8]));
            format!(
                "not a safetensors file (its first 8 bytes give a header of {n} bytes; the file has {len})"
            )
        }
        E::MetadataIncompleteBuffer => format!(
            "not a complete safetensors file: the tensors its header lists do not fill the {len} bytes \
             (cut short, or bytes appended)"
        ),
        e => format!("not a safetensors file ({e})"),
    }
}

/// The first 8 bytes of a `chunks_exact(8)` chunk.
fn eight(w: &[u8]) -> [u8; 8] {
    let mut a = [0; 8];
    a.copy_from_slice(w);
    a
}
