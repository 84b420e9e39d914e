//! File I/O of featcloud's own files.
//!
//! - [`safetensors`]: the one writer and reader of the checkpoint and the statistics
//!   file (typed tensors and metadata, errors that name the file and the field);
//! - atomic writes (below): a reader of `path` sees either the old file or the
//!   complete new one, never a partial write.
//!
//! The bytes go to a temporary file in the same directory as `path` (so the final
//! `rename` stays on one file system and is atomic on POSIX), the temporary file is
//! fsynced, then renamed over `path`; the directory is fsynced on a best-effort basis so
//! that the rename itself survives a crash. On any error the temporary file is removed.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

pub mod safetensors;

/// Distinguishes temporary files of concurrent writers inside one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync,
/// rename). Never leaves a partial file at `path`; an existing file is replaced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut file =
            OpenOptions::new().write(true).create_new(true).open(tmp).map_err(|e| Error::io(path, e))?;
        file.write_all(bytes).map_err(|e| Error::io(path, e))?;
        file.sync_all().map_err(|e| Error::io(path, e))
    })
}

/// Runs `f` with a temporary path in the same directory as `path`, then fsyncs and
/// renames the file `f` wrote there to `path`.
///
/// For writers that insist on a path of their own (e.g. an image encoder). The temporary
/// name keeps `path`'s extension, since some encoders pick the format from it. If `f`
/// fails, or does not create the file, the temporary file is removed and `path` is left
/// untouched.
pub fn write_atomic_with(path: &Path, f: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path)?;
    let result = f(&tmp).and_then(|()| {
        let file =
            File::open(&tmp).map_err(|e| Error::io(path, format!("writer did not produce a file: {e}")))?;
        file.sync_all().map_err(|e| Error::io(path, e))?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    });
    match result {
        Ok(()) => {
            sync_dir(path);
            Ok(())
        }
        Err(e) => {
            // The temporary may not exist (the writer failed before creating it).
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// `dir/.name.<pid>-<n>.tmp[.ext]` next to `path`.
fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::io(path, "not a file path (no file name)"))?
        .to_string_lossy()
        .into_owned();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = format!(".{name}.{}-{n}.tmp", std::process::id());
    if let Some(ext) = path.extension() {
        tmp_name.push('.');
        tmp_name.push_str(&ext.to_string_lossy());
    }
    Ok(path.with_file_name(tmp_name))
}

/// Best effort: fsync the directory holding `path` so the rename is durable.
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
