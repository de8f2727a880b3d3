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
    /// Run the daemon: inbox folder and MQTT in, outbox and MQTT out.
    Run(commands::run::Args),
    /// Run the daemon on embedded defaults, feed it the example CT, print the result.
    Demo(commands::demo::Args),
    /// Convert released checkpoints into a model bundle.
    Convert(commands::convert::Args),
    /// Draw the nine planes of one nodule into a PNG.
    Planes(commands::planes::Args),
    /// Evaluate malignancy scores: AUROC/AUPRC with bootstrap CIs, calibration, plots.
    Eval(commands::eval::Args),
    /// Write synthetic nodule CT volumes with known semantics and a manifest.
    Synth(commands::synth::Args),
    /// Per-nodule latency and peak memory of a model (or a random full-size one).
    Bench(commands::bench::Args),
    /// Fine-tune a model on a manifest (LoRA, probe or full) with K-fold calibration and a gate.
    Finetune(commands::finetune::Args),
}

fn main() {
    let cli = Cli::parse();
    init_logging(matches!(cli.command, Command::Run(_)));
    let result = match cli.command {
        Command::Score(args) => commands::score::run(args),
        Command::Bundle(args) => commands::bundle::run(args),
        Command::Run(args) => commands::run::run(args),
        Command::Demo(args) => commands::demo::run(args),
        Command::Convert(args) => commands::convert::run(args),
        Command::Planes(args) => commands::planes::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Synth(args) => commands::synth::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Finetune(args) => commands::finetune::run(args),
    };
    if let Err(err) = result {
        eprintln!("noduled: {err:#}");
        std::process::exit(2);
    }
}

/// Logs to journald when systemd connected stderr to the journal (JOURNAL_STREAM), else to
/// stderr. `NODULED_LOG` filters (default: info for the daemon, warn otherwise).
fn init_logging(daemon: bool) {
    use tracing_subscriber::prelude::*;
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NODULED_LOG")
        .unwrap_or_else(|_| default.into());
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    match journald {
        Some(layer) => tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .init(),
        None => tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
    }
}
