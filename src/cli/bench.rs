//! `featcloud bench` (being written by another helper; this placeholder only keeps the crate compiling).

/// Arguments of `featcloud bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs `featcloud bench`.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("featcloud bench is not available in this build yet")
}
