//! One module per CLI subcommand; each has `Args` (clap) and `run(args) -> anyhow::Result<()>`.

pub mod bench;
pub mod bundle;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod finetune;
pub mod planes;
pub mod run;
pub mod score;
pub mod synth;
