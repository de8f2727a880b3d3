//! `noduled eval`: metrics of malignancy scores against the truth (AUROC and AUPRC with
//! bootstrap CIs, operating points, Brier, reliability, zero-shot AUROC per feature); writes
//! eval.json plus roc.png, pr.png and reliability.png into `--out`, and prints the JSON.
//! The scores come from a scores CSV (`--scores`) or from scoring a manifest with a model
//! (`--manifest` + `--model`: the calibrated fold-mean score per nodule, the zero-shot
//! descriptors against the manifest's semantic columns; `--out` then also gets scores.csv).

use std::path::PathBuf;

use crate::eval::{evaluate, metrics, plots, read_scores_csv, EvalOptions, DEFAULT_RESAMPLES};
use anyhow::Context;

/// Arguments of `noduled eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scores CSV: columns label (0/1), score (probability) and optionally patient_id
    /// (bootstrap resamples patients when present) and `zs_<feature key>_<class index>` zero-shot probabilities (truth in the feature's manifest column).
    #[arg(long, required_unless_present = "manifest", conflicts_with_all = ["manifest", "model"])]
    pub scores: Option<PathBuf>,
    /// Manifest CSV to score (pid,nodule_id,image_path,coordX,coordY,coordZ,malignant
    /// [+ semantic columns]); needs --model.
    #[arg(long, requires = "model")]
    pub manifest: Option<PathBuf>,
    /// Model (checkpoint folder) that scores --manifest.
    #[arg(long, requires = "manifest")]
    pub model: Option<PathBuf>,
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
    let (records, source) = match (&args.scores, &args.manifest, &args.model) {
        (Some(scores), _, _) => (read_scores_csv(scores)?, scores.clone()),
        (None, Some(manifest), Some(model)) => {
            let (records, csv) = score_manifest(manifest, model)?;
            if let Some(out) = &args.out {
                std::fs::create_dir_all(out)
                    .with_context(|| format!("{}: cannot create folder", out.display()))?;
                crate::table::write(&out.join("scores.csv"), &csv.header, &csv.rows)?;
            }
            (records, manifest.clone())
        }
        _ => anyhow::bail!("give --scores, or --manifest with --model"),
    };
    let options = EvalOptions {
        resamples: args.resamples,
        seed: args.seed,
        ..EvalOptions::default()
    };
    let report = evaluate(&records, &options).with_context(|| format!("{}", source.display()))?;
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

/// Scores every nodule of `manifest` with `model`: records (calibrated fold-mean score,
/// zero-shot probabilities with the truth from the semantic columns) and a scores CSV.
fn score_manifest(
    manifest: &std::path::Path,
    model: &std::path::Path,
) -> anyhow::Result<(Vec<crate::eval::EvalRecord>, ScoresCsv)> {
    use crate::eval::{EvalRecord, ZeroShotPrediction};
    use crate::semantics::{Semantics, FEATURES, SEMANTIC_COLUMNS};
    // One reading of the manifest: nodule `row` is table row `row`. Read before the model
    // is loaded, so a bad manifest fails at once.
    let (nodules, table) = crate::nodules::load_manifest_table(manifest)?;
    let scorer = crate::engine::load(model)?;
    let has_semantics = SEMANTIC_COLUMNS.iter().any(|c| {
        table
            .header
            .iter()
            .any(|h| h.trim().eq_ignore_ascii_case(c))
    });
    let report = scorer.score(&nodules)?;
    let mut header: Vec<String> = ["patient_id", "nodule_id", "label", "score", "raw"]
        .map(String::from)
        .to_vec();
    for f in FEATURES.iter() {
        for c in 0..f.classes.len() {
            header.push(format!("zs_{}_{c}", f.key));
        }
    }
    let mut rows = Vec::with_capacity(nodules.len());
    let mut records = Vec::with_capacity(nodules.len());
    for (row, n) in report.nodules.iter().enumerate() {
        let label = match n.label {
            Some(l) => l == 1,
            None => anyhow::bail!(
                "{}: nodule {} / {} has no `malignant` label",
                manifest.display(),
                n.patient_id,
                n.nodule_id
            ),
        };
        let semantics = if has_semantics {
            Some(Semantics::from_row(&table, row)?)
        } else {
            None
        };
        let mut zero_shot = std::collections::BTreeMap::new();
        let mut fields = vec![
            n.patient_id.clone(),
            n.nodule_id.clone(),
            (label as u8).to_string(),
            n.score.calibrated.to_string(),
            n.score.raw.to_string(),
        ];
        for (i, f) in FEATURES.iter().enumerate() {
            let probs: Option<Vec<f64>> = n.descriptors.get(f.key).and_then(|d| {
                f.classes
                    .iter()
                    .map(|c| d.get(*c).copied())
                    .collect::<Option<Vec<f64>>>()
            });
            match &probs {
                Some(p) => fields.extend(p.iter().map(f64::to_string)),
                None => fields.extend((0..f.classes.len()).map(|_| String::new())),
            }
            if let Some(probs) = probs {
                let truth = semantics.as_ref().and_then(|s| s.classes[i]);
                zero_shot.insert(f.key.to_string(), ZeroShotPrediction { probs, truth });
            }
        }
        rows.push(fields);
        records.push(EvalRecord {
            label,
            score: n.score.calibrated,
            patient_id: Some(n.patient_id.clone()),
            zero_shot,
        });
    }
    Ok((records, ScoresCsv { header, rows }))
}

/// The scores CSV of a scored manifest (readable by `--scores`).
struct ScoresCsv {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// Prints `text` and a newline; a closed pipe (`| head`) is not an error.
fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
