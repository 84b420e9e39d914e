//! `featcloud smoke` (being written by another helper; this placeholder only keeps the crate compiling).

/// Arguments of `featcloud smoke`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs `featcloud smoke`.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("featcloud smoke is not available in this build yet")
}
