//! One module per CLI subcommand; each has `Args` (clap) and `run(args) -> anyhow::Result<()>`.

pub mod bundle;
pub mod eval;
pub mod finetune;
pub mod planes;
pub mod score;
pub mod synth;
