//! The noduled binary: parses the command line, dispatches to the library, prints the error
//! chain once and exits 2 on error.

use clap::{Parser, Subcommand};
use noduled::commands;

#[derive(Parser)]
#[command(
    name = "noduled",
    version,
    about = "Lung nodule malignancy scoring daemon (CLIP nodule model)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score nodules and print the score JSON.
    Score(commands::score::Args),
    /// Model bundles: keys, sign, verify, install, rollback.
    Bundle(commands::bundle::Args),
    /// Draw the nine planes of one nodule into a PNG.
    Planes(commands::planes::Args),
    /// Evaluate malignancy scores: AUROC/AUPRC with bootstrap CIs, calibration, plots.
    Eval(commands::eval::Args),
    /// Write synthetic nodule CT volumes with known semantics and a manifest.
    Synth(commands::synth::Args),
    /// Fine-tune a model on a manifest (LoRA, probe or full) with K-fold calibration and a gate.
    Finetune(commands::finetune::Args),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NODULED_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let result = match cli.command {
        Command::Score(args) => commands::score::run(args),
        Command::Bundle(args) => commands::bundle::run(args),
        Command::Planes(args) => commands::planes::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Synth(args) => commands::synth::run(args),
        Command::Finetune(args) => commands::finetune::run(args),
    };
    if let Err(err) = result {
        eprintln!("noduled: {err:#}");
        std::process::exit(2);
    }
}
