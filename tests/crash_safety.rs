//! Crash safety (issue 13, item 6): a training run killed with SIGKILL at 20 moments,
//! half of them at random times and half while a checkpoint is being written. Every time,
//! the checkpoint on disk loads, and resuming from it (in the same folder, as a user
//! would) ends in a checkpoint bitwise equal to the one of a run that was never killed.

#[path = "common/blobs.rs"]
mod blobs;

use featcloud::engine::Checkpoint;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_featcloud");
const KILLS: usize = 20;

/// A small long-tailed dataset (6 classes, 8 features): `(x.npy, y.npy)` in `dir`.
fn write_data(dir: &Path) -> (PathBuf, PathBuf) {
    blobs::write_blobs(dir, &[40, 30, 20, 12, 8, 5], 8, 99)
}

/// `featcloud train` writing a checkpoint after every step into `out` (a 64-wide MLP, so
/// that a checkpoint write is not over in an instant), resuming from `resume` if given.
fn train(x: &Path, y: &Path, out: &Path, resume: Option<&Path>) -> Command {
    let mut c = Command::new(BIN);
    c.args(["train", "--features", x.to_str().unwrap(), "--labels", y.to_str().unwrap()]);
    c.args(["--out", out.to_str().unwrap(), "--checkpoint-every", "1"]);
    c.args(["--epochs", "6", "--batch-size", "16", "--hidden", "64", "--embed-dim", "16"]);
    c.args(["--warmup-steps", "3", "--threshold", "20", "--scale", "16", "--backend", "cpu"]);
    if let Some(r) = resume {
        c.args(["--resume", r.to_str().unwrap()]);
    }
    c.env("RAYON_NUM_THREADS", "2").stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn temps(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.contains(".tmp"))
        .collect()
}

/// How a kill is timed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Moment {
    /// After a random delay.
    Random,
    /// After a random delay, then as soon as a checkpoint's temporary file appears.
    DuringWrite,
}

/// Waits `delay`, then (for [`Moment::DuringWrite`]) polls `out` for a temporary file, and
/// kills the child with SIGKILL. Returns false if the run ended before that.
fn kill_at(child: &mut Child, out: &Path, delay: Duration, moment: Moment) -> bool {
    let until = Instant::now() + delay;
    while Instant::now() < until {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    if moment == Moment::DuringWrite {
        // Polls as fast as it can (a write of the small checkpoint lasts tens of
        // microseconds on a RAM disk), yielding so the child keeps a core.
        loop {
            if !temps(out).is_empty() {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::yield_now();
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    !status.success()
}

#[test]
fn killed_runs_resume_bitwise_equal() {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = write_data(dir.path());

    // The run that is never killed, and how long it takes.
    let straight = dir.path().join("straight");
    let t0 = Instant::now();
    let o = train(&x, &y, &straight, None).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let wall = t0.elapsed();
    let reference = std::fs::read(straight.join("checkpoint.safetensors")).unwrap();
    let full = Checkpoint::load(&straight.join("checkpoint.safetensors")).unwrap();
    assert!(full.total_steps >= 30, "{} steps: too few moments to kill at", full.total_steps);

    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let (mut kills, mut attempts, mut no_checkpoint, mut mid_write) = (0, 0, 0, 0);
    let mut steps_at_kill = Vec::new();
    while kills < KILLS {
        attempts += 1;
        assert!(attempts < 4 * KILLS, "the runs kept ending before the kill ({kills} kills)");
        let moment = if kills % 2 == 0 { Moment::Random } else { Moment::DuringWrite };
        let span = if moment == Moment::Random { 1.0 } else { 0.8 };
        let delay = wall.mul_f64(rng.random_range(0.0..span));
        let out = dir.path().join(format!("run{kills}"));
        let _ = std::fs::remove_dir_all(&out);
        let mut child = train(&x, &y, &out, None).spawn().unwrap();
        if !kill_at(&mut child, &out, delay, moment) {
            continue; // finished first: not a kill; draw another moment
        }
        kills += 1;
        if !temps(&out).is_empty() {
            mid_write += 1;
        }
        // The checkpoint on disk, if the run got to write one, is whole and loads.
        let ck = out.join("checkpoint.safetensors");
        let resume = if ck.exists() {
            let loaded = Checkpoint::load(&ck)
                .unwrap_or_else(|e| panic!("kill {kills} ({moment:?}, after {delay:?}): {e}"));
            steps_at_kill.push(loaded.step);
            Some(ck.as_path())
        } else {
            no_checkpoint += 1;
            None // killed before the first write: start again
        };
        let o = train(&x, &y, &out, resume).output().unwrap();
        assert!(o.status.success(), "kill {kills}: resume failed: {}", String::from_utf8_lossy(&o.stderr));
        let after = std::fs::read(&ck).unwrap();
        assert!(
            after == reference,
            "kill {kills} ({moment:?}, after {delay:?}, resumed from step {:?}): the final checkpoint differs from the straight run's",
            steps_at_kill.last()
        );
        // The resumed run removed the killed run's temporary file.
        assert!(temps(&out).is_empty(), "kill {kills}: temporary files left: {:?}", temps(&out));
    }
    println!(
        "{kills} SIGKILLs ({attempts} attempts; {mid_write} left a checkpoint write unfinished, {no_checkpoint} came \
         before the first checkpoint); killed runs resumed from steps {steps_at_kill:?} of {}: every final checkpoint \
         bitwise equal to the uninterrupted run's ({wall:?})",
        full.total_steps
    );
    // How many kills hit a write or came before the first checkpoint depends on the
    // machine's timing (printed above); the test needs some of each kind of moment to
    // have been tried, not a quota.
    assert!(mid_write >= 1, "no kill landed during a checkpoint write");
    assert!(no_checkpoint <= KILLS / 2, "{no_checkpoint} of {KILLS} kills came before any checkpoint");
}
