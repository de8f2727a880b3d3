//! `noduled convert`: released checkpoints -> a model bundle.

use crate::convert::{self, Precision};
use std::path::PathBuf;

/// Arguments of `noduled convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The checkpoint folder (fold_k/best_both.pt or model.safetensors + calibration.json).
    #[arg(long)]
    pub checkpoints: PathBuf,
    /// The bundle directory to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Precision of the vision tower's block matmul weights.
    #[arg(long, value_enum, default_value = "q8_0")]
    pub precision: Precision,
    /// Monotonic bundle version.
    #[arg(long, default_value_t = 1)]
    pub version: u64,
    /// Model id (default: the checkpoint folder's name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Vision blocks (0-based) whose matmul weights stay f16 in a q8_0 bundle, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub keep_f16: Vec<usize>,
    /// Self-test tolerance on every recorded probability (default 1e-4; 1e-2 for q8_0, whose
    /// kernels differ between CPUs at the quantisation noise level).
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Provenance notes.
    #[arg(long, default_value = "")]
    pub notes: String,
}

/// Runs `noduled convert`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let model_id = match args.model_id {
        Some(id) => id,
        None => args
            .checkpoints
            .canonicalize()?
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into()),
    };
    let opts = convert::Options {
        precision: args.precision,
        version: args.version,
        model_id,
        keep_f16: args.keep_f16,
        tolerance: args.tolerance.unwrap_or(match args.precision {
            Precision::Q8_0 => 1e-2,
            Precision::F32 | Precision::F16 => 1e-4,
        }),
        notes: args.notes,
        parent: None,
    };
    let m = convert::convert(&args.checkpoints, &args.out, &opts)?;
    let golden: crate::model::bundle::Payload = serde_json::from_value(m.model.clone())?;
    let max_diff = golden
        .golden
        .probs
        .iter()
        .zip(&golden.golden.source_probs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({"bundle": args.out, "model_id": m.model_id, "version": m.version,
            "precision": m.precision, "folds": m.folds.len(), "files": m.files.len(),
            "golden_max_abs_prob_diff_vs_source": max_diff})
    );
    Ok(())
}
