//! One module per CLI subcommand; each has `Args` (clap) and `run(args) -> anyhow::Result<()>`.

pub mod bench;
pub mod bundle;
pub mod score;
