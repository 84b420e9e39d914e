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

/// Removes temporary files that [`write_atomic`] left next to `path` in a process that no
/// longer runs (one killed during a write), and returns how many it removed.
///
/// Only names of the form `.name.<pid>-<n>.tmp[.ext]` are touched, and only when `<pid>`
/// is not a running process; where running processes cannot be listed (no `/proc`),
/// nothing is removed. Errors (a folder that does not exist, say) count as nothing to do.
pub fn remove_stale_temps(path: &Path) -> usize {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return 0 };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    if !Path::new("/proc/self").exists() {
        return 0;
    }
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else { continue };
        let Some((pid, tail)) = rest.split_once('-') else { continue };
        let (Ok(pid), Some((n, _))) = (pid.parse::<u32>(), tail.split_once(".tmp")) else { continue };
        if n.parse::<u64>().is_err() || pid == std::process::id() {
            continue;
        }
        if !Path::new(&format!("/proc/{pid}")).exists() && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
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
