//! `featcloud smoke`: every kernel at small sizes against the CPU oracle, one
//! pass/fail line per kernel, dtype and option set, with the worst error.

use crate::cli::{open_device, DeviceArg};
use crate::cuda::{self, SmokeLine};

/// Arguments of `featcloud smoke`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Also write the lines as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// GPU 0, or the CPU emulator running the same kernels and launches.
    #[arg(long, value_enum, default_value_t = DeviceArg::Gpu)]
    pub device: DeviceArg,
}

/// Runs `featcloud smoke`; fails (non-zero exit) when any line fails or there is no GPU.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let dev =
        open_device(args.device).map_err(|e| anyhow::anyhow!("smoke needs a GPU (or --device emu): {e}"))?;
    println!("device: {} ({})", dev.info().name, dev.info().code);
    let mut lines: Vec<SmokeLine> = Vec::new();
    // Each kernel wrapper registers its own checks (cuda::SmokeCheck).
    for check in cuda::smoke_checks() {
        lines.extend((check.run)(&dev)?);
    }
    if lines.is_empty() {
        // The checks are registered at link time; none at all means a broken build.
        anyhow::bail!("no smoke checks are registered in this build");
    }
    let mut failed = 0;
    for l in &lines {
        println!(
            "{:<4} {:<28} {:<5} {:<48} err {:.3e} (tol {:.1e})",
            if l.passed { "PASS" } else { "FAIL" },
            l.kernel,
            l.dtype,
            l.options,
            l.max_err,
            l.tolerance
        );
        failed += usize::from(!l.passed);
    }
    if let Some(path) = &args.json {
        crate::io::write_atomic(path, serde_json::to_string_pretty(&lines)?.as_bytes())?;
    }
    println!("{} passed, {} failed", lines.len() - failed, failed);
    if failed > 0 {
        anyhow::bail!("{failed} smoke check(s) failed");
    }
    Ok(())
}
