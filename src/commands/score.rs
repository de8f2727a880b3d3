//! `noduled score`: score nodules and print the score JSON.

use std::path::PathBuf;

/// Arguments of `noduled score`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model: a checkpoint folder (fold_k/best_both.pt) or a bundle.
    #[arg(long)]
    pub model: PathBuf,
    /// A safetensors file with tensor `planes01` [9,224,224] in [0,1].
    #[arg(long)]
    pub planes: Option<PathBuf>,
    /// Patient id for the report.
    #[arg(long)]
    pub patient_id: Option<String>,
    /// Nodule id for the report.
    #[arg(long)]
    pub nodule_id: Option<String>,
}

/// Runs `noduled score`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("score: not implemented yet")
}
