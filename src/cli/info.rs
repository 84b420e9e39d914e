//! `featcloud info` (being written by another helper; this placeholder only keeps the crate compiling).

/// Arguments of `featcloud info`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs `featcloud info`.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("featcloud info is not available in this build yet")
}
