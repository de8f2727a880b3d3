//! `noduled eval`: metrics of malignancy scores against the truth (AUROC and AUPRC with
//! bootstrap CIs, operating points, Brier, reliability, zero-shot AUROC per feature); writes
//! eval.json plus roc.png, pr.png and reliability.png into `--out`, and prints the JSON.

use std::path::PathBuf;

use crate::eval::{evaluate, metrics, plots, read_scores_csv, EvalOptions, DEFAULT_RESAMPLES};
use anyhow::Context;

/// Arguments of `noduled eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scores CSV: columns label (0/1), score (probability) and optionally patient_id
    /// (bootstrap resamples patients when present) and `zs_<feature key>_<class index>` zero-shot probabilities (truth in the feature's manifest column).
    #[arg(long)]
    pub scores: PathBuf,
    /// Output folder for eval.json and the PNG plots (created if needed).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Bootstrap resamples (0 skips the intervals).
    #[arg(long, default_value_t = DEFAULT_RESAMPLES)]
    pub resamples: usize,
}

/// Runs `noduled eval`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let records = read_scores_csv(&args.scores)?;
    let options = EvalOptions {
        resamples: args.resamples,
        seed: args.seed,
        ..EvalOptions::default()
    };
    let report =
        evaluate(&records, &options).with_context(|| format!("{}", args.scores.display()))?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)
            .with_context(|| format!("{}: cannot create folder", out.display()))?;
        let path = out.join("eval.json");
        std::fs::write(&path, format!("{json}\n"))
            .with_context(|| format!("{}: cannot write", path.display()))?;
        let labels: Vec<bool> = records.iter().map(|r| r.label).collect();
        let scores: Vec<f64> = records.iter().map(|r| r.score).collect();
        let roc = metrics::roc_curve(&labels, &scores)?;
        let pr = metrics::pr_curve(&labels, &scores)?;
        plots::roc_png(
            &out.join("roc.png"),
            &roc,
            report.auroc.value,
            &report.operating_points,
        )?;
        let prevalence = report.positives as f64 / report.n as f64;
        plots::pr_png(
            &out.join("pr.png"),
            &pr,
            report.average_precision.value,
            prevalence,
        )?;
        plots::reliability_png(
            &out.join("reliability.png"),
            &report.reliability,
            report.brier,
        )?;
    }
    print_stdout(&json)
}

/// Prints `text` and a newline; a closed pipe (`| head`) is not an error.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
