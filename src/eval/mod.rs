//! Evaluation of malignancy scores (and zero-shot semantic predictions) against the truth:
//! AUROC and average precision with bootstrap CIs, operating points, Brier score,
//! reliability bins, zero-shot AUROC per semantic feature, and PNG plots.
//!
//! Input is a list of [`EvalRecord`]s from any source: a scores CSV ([`read_scores_csv`]),
//! or the model run over a manifest. Scores are malignancy probabilities in [0, 1]; labels
//! are 1 = malignant. Zero-shot probabilities are per feature of
//! [`crate::semantics::FEATURES`], in that feature's class order.

pub mod bootstrap;
pub mod metrics;
pub mod plots;

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::semantics::FEATURES;
use crate::table::{Table, TableError};
use bootstrap::BootstrapResult;
use metrics::{MetricError, OperatingPoint, ReliabilityBin};

/// Target recalls of the reported operating points.
pub const TARGET_RECALLS: [f64; 4] = [0.6, 0.7, 0.8, 0.9];
/// Default bootstrap resamples.
pub const DEFAULT_RESAMPLES: usize = 10_000;
/// Most bootstrap resamples accepted (memory and time stay bounded).
pub const MAX_RESAMPLES: usize = 1_000_000;
/// Reliability bins.
pub const RELIABILITY_BINS: usize = 10;

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// Reading the input table failed.
    #[error(transparent)]
    Table(#[from] TableError),
    /// An option is out of range.
    #[error("{0}")]
    Invalid(String),
    /// A metric is undefined for this input (e.g. one class only).
    #[error(transparent)]
    Metric(#[from] MetricError),
}

/// A feature's zero-shot prediction for one nodule.
#[derive(Debug, Clone, PartialEq)]
pub struct ZeroShotPrediction {
    /// Probability per class, in the feature's class order.
    pub probs: Vec<f64>,
    /// The true class index, if known.
    pub truth: Option<usize>,
}

/// One evaluated nodule.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRecord {
    /// True when malignant.
    pub label: bool,
    /// Predicted malignancy probability.
    pub score: f64,
    /// Patient, for patient-level resampling.
    pub patient_id: Option<String>,
    /// Zero-shot predictions keyed by feature key.
    pub zero_shot: BTreeMap<String, ZeroShotPrediction>,
}

/// A point estimate with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// The metric on the full data.
    pub value: f64,
    /// Bootstrap lower bound; None if no resample had both classes.
    pub ci_lower: Option<f64>,
    /// Bootstrap upper bound.
    pub ci_upper: Option<f64>,
}

/// Zero-shot result for one feature.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZeroShotResult {
    /// Nodules with a known truth and a prediction.
    pub n: usize,
    /// Class words.
    pub classes: Vec<String>,
    /// Count of each class in the truth.
    pub class_counts: Vec<usize>,
    /// Weighted one-vs-rest AUROC; None when undefined (see `note`).
    pub auroc: Option<f64>,
    /// Why the AUROC is missing, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Everything `noduled eval` reports (eval.json).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Nodules.
    pub n: usize,
    /// Malignant nodules.
    pub positives: usize,
    /// Distinct patients, when ids were given.
    pub patients: Option<usize>,
    /// AUROC.
    pub auroc: Estimate,
    /// Average precision (AUPRC).
    pub average_precision: Estimate,
    /// How the intervals were obtained.
    pub bootstrap: BootstrapResult,
    /// Operating points at [`TARGET_RECALLS`].
    pub operating_points: Vec<OperatingPoint>,
    /// Brier score.
    pub brier: f64,
    /// Reliability bins.
    pub reliability: Vec<ReliabilityBin>,
    /// Zero-shot AUROC per feature key (features with any prediction only).
    pub zero_shot: BTreeMap<String, ZeroShotResult>,
}

/// Bootstrap settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalOptions {
    /// Resamples (0 skips the bootstrap).
    pub resamples: usize,
    /// Generator seed.
    pub seed: u64,
    /// Confidence level of the intervals.
    pub level: f64,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            resamples: DEFAULT_RESAMPLES,
            seed: 0,
            level: 0.95,
        }
    }
}

/// Evaluates `records`. Errors when the malignancy metrics are undefined (e.g. one class).
pub fn evaluate(records: &[EvalRecord], options: &EvalOptions) -> Result<EvalReport, EvalError> {
    if options.resamples > MAX_RESAMPLES {
        return Err(EvalError::Invalid(format!(
            "--resamples must be at most {MAX_RESAMPLES}, got {}",
            options.resamples
        )));
    }
    if !(options.level > 0.0 && options.level < 1.0) {
        return Err(EvalError::Invalid(format!(
            "confidence level must be in (0, 1), got {}",
            options.level
        )));
    }
    let labels: Vec<bool> = records.iter().map(|r| r.label).collect();
    let scores: Vec<f64> = records.iter().map(|r| r.score).collect();
    let auroc = metrics::roc_auc(&labels, &scores)?;
    let ap = metrics::average_precision(&labels, &scores)?;
    let brier = metrics::brier(&labels, &scores)?;
    let reliability = metrics::reliability(&labels, &scores, RELIABILITY_BINS)?;
    let operating_points = metrics::operating_points(&labels, &scores, &TARGET_RECALLS)?;

    let groups: Option<Vec<usize>> = if records.iter().all(|r| r.patient_id.is_some()) {
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        let ids: Vec<&str> = records
            .iter()
            .map(|r| r.patient_id.as_deref().unwrap_or_default())
            .collect();
        for id in &ids {
            let next = index.len();
            index.entry(id).or_insert(next);
        }
        Some(ids.iter().map(|id| index[id]).collect())
    } else {
        None
    };
    let boot = bootstrap::bootstrap(
        &labels,
        &scores,
        groups.as_deref(),
        options.resamples,
        options.seed,
        options.level,
    );
    let estimate = |value, ci: Option<bootstrap::Interval>| Estimate {
        value,
        ci_lower: ci.map(|c| c.lower),
        ci_upper: ci.map(|c| c.upper),
    };
    Ok(EvalReport {
        n: records.len(),
        positives: labels.iter().filter(|&&y| y).count(),
        patients: groups.as_ref().map(|g| g.iter().max().map_or(0, |m| m + 1)),
        auroc: estimate(auroc, boot.auroc),
        average_precision: estimate(ap, boot.average_precision),
        bootstrap: boot,
        operating_points,
        brier,
        reliability,
        zero_shot: zero_shot(records),
    })
}

/// Weighted one-vs-rest AUROC of every feature that has predictions.
fn zero_shot(records: &[EvalRecord]) -> BTreeMap<String, ZeroShotResult> {
    let mut out = BTreeMap::new();
    for feature in &FEATURES {
        let known: Vec<&ZeroShotPrediction> = records
            .iter()
            .filter_map(|r| r.zero_shot.get(feature.key))
            .filter(|p| p.truth.is_some())
            .collect();
        if known.is_empty() {
            continue;
        }
        let truth: Vec<usize> = known.iter().filter_map(|p| p.truth).collect();
        let probs: Vec<Vec<f64>> = known.iter().map(|p| p.probs.clone()).collect();
        let mut class_counts = vec![0; feature.classes.len()];
        for &t in &truth {
            if let Some(c) = class_counts.get_mut(t) {
                *c += 1;
            }
        }
        let (auroc, note) = match metrics::ovr_weighted_auroc(&truth, &probs) {
            Ok(a) => (Some(a), None),
            Err(e) => (None, Some(e.to_string())),
        };
        out.insert(
            feature.key.to_string(),
            ZeroShotResult {
                n: truth.len(),
                classes: feature.classes.iter().map(|c| c.to_string()).collect(),
                class_counts,
                auroc,
                note,
            },
        );
    }
    out
}

/// Reads a scores CSV: columns `label` (0/1) and `score` (probability), optional
/// `patient_id` (or `pid`), and optional zero-shot columns: `zs_<feature key>_<class index>`
/// probabilities with the truth in the feature's manifest column (e.g. `nodule_margins`,
/// spelled as in a manifest). Other columns are ignored.
pub fn read_scores_csv(path: &Path) -> Result<Vec<EvalRecord>, EvalError> {
    let table = Table::read(path)?;
    let label_col = table.column("label")?;
    let score_col = table.column("score")?;
    let patient_col = table.find("patient_id").or_else(|| table.find("pid"));
    // (feature index, probability columns in class order, truth column)
    let mut zs: Vec<(usize, Vec<usize>, Option<usize>)> = Vec::new();
    for (i, f) in FEATURES.iter().enumerate() {
        let names: Vec<String> = (0..f.classes.len())
            .map(|c| format!("zs_{}_{c}", f.key))
            .collect();
        if names.iter().all(|name| table.find(name).is_none()) {
            continue;
        }
        // Some of the feature's columns are present: all of them must be.
        let cols = names
            .iter()
            .map(|name| table.column(name))
            .collect::<Result<Vec<usize>, TableError>>()?;
        zs.push((i, cols, table.find(f.column)));
    }
    let mut records = Vec::with_capacity(table.rows.len());
    for row in 0..table.rows.len() {
        let label = match table.get(row, label_col) {
            "1" | "1.0" | "true" | "True" => true,
            "0" | "0.0" | "false" | "False" => false,
            other => {
                return Err(table
                    .bad(row, label_col, format!("`{other}` is not a label (0 or 1)"))
                    .into())
            }
        };
        let score = table.f64(row, score_col)?;
        if !(0.0..=1.0).contains(&score) {
            return Err(table
                .bad(
                    row,
                    score_col,
                    format!("{score} is not a probability in [0, 1]"),
                )
                .into());
        }
        let patient_id = patient_col
            .map(|c| table.get(row, c).to_string())
            .filter(|p| !p.is_empty());
        let mut zero_shot = BTreeMap::new();
        for (i, cols, truth_col) in &zs {
            let feature = &FEATURES[*i];
            let probs = cols
                .iter()
                .map(|&c| table.f64(row, c))
                .collect::<Result<Vec<f64>, _>>()?;
            let truth = match truth_col {
                Some(c) if !crate::table::is_missing(table.get(row, *c)) => {
                    let v = table.get(row, *c);
                    Some(feature.class_of(v).ok_or_else(|| {
                        table.bad(row, *c, format!("`{v}` is not a class of {}", feature.key))
                    })?)
                }
                _ => None,
            };
            zero_shot.insert(feature.key.to_string(), ZeroShotPrediction { probs, truth });
        }
        records.push(EvalRecord {
            label,
            score,
            patient_id,
            zero_shot,
        });
    }
    Ok(records)
}
