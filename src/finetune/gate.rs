//! The fine-tune gate: does the new model rank malignancy at least as well as the current
//! one, on patients neither model's fold chose its epoch or fitted its calibrator with?
//!
//! Scores: each outer fold's test patients (see [`super::splits`]) are scored by that fold's
//! new model, as written to the checkpoint folder and read back by the inference model, and
//! by the current model (fold mean); both are the softmax probability before calibration
//! (AUROC within a fold does not depend on a monotone calibrator). The AUROCs are of the
//! pooled test nodules; the 95% percentile bootstrap intervals of the two AUROCs and of their
//! difference (new - current) resample test *patients*, the same draws for both models
//! ([`crate::eval::bootstrap::paired_auroc`], [`RESAMPLES`] draws, seeded by `--seed`).
//!
//! Decision: pass when new AUROC >= current AUROC - margin (point estimates; the intervals
//! say how much that rests on). Below [`MIN_PATIENTS`] test patients or
//! [`MIN_POSITIVE_PATIENTS`] of them with a malignant nodule the gate refuses to decide
//! (checked before any training) unless `--gate-margin` was given explicitly; then it
//! decides and says so. Without a current model there is nothing to compare and it passes.

use super::{data::Sample, splits::Parts, FinetuneError};
use crate::eval::bootstrap::{self, Interval};
use crate::eval::metrics;
use crate::model::NoduleModel;
use crate::nodule::Planes01;
use std::collections::BTreeMap;

/// The margin when `--gate-margin` is not given.
pub const DEFAULT_MARGIN: f64 = 0.02;
/// Fewest test patients the gate decides on without an explicit margin.
pub const MIN_PATIENTS: usize = 30;
/// Fewest test patients with a malignant nodule it decides on without an explicit margin.
pub const MIN_POSITIVE_PATIENTS: usize = 5;
/// Bootstrap resamples of the intervals.
pub const RESAMPLES: usize = 1000;
/// Confidence level of the intervals.
pub const LEVEL: f64 = 0.95;

/// What the gate measured and decided (stdout JSON of `finetune`, provenance `gate`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GateReport {
    /// Test nodules.
    pub n: usize,
    /// Of them, malignant.
    pub positives: usize,
    /// Test patients (the bootstrap's unit).
    pub patients: usize,
    /// Of them, patients with a malignant nodule.
    pub positive_patients: usize,
    /// New model AUROC on the test nodules.
    pub new_auroc: f64,
    /// New model average precision.
    pub new_auprc: f64,
    /// 95% interval of `new_auroc`.
    pub new_auroc_ci: Option<Interval>,
    /// Current model AUROC on the same nodules (absent without a current model).
    pub current_auroc: Option<f64>,
    /// Current model average precision.
    pub current_auprc: Option<f64>,
    /// 95% interval of `current_auroc`.
    pub current_auroc_ci: Option<Interval>,
    /// new_auroc - current_auroc.
    pub difference: Option<f64>,
    /// 95% interval of `difference` (paired resamples).
    pub difference_ci: Option<Interval>,
    /// Bootstrap resamples drawn, and how many were skipped for holding one class.
    pub resamples: usize,
    /// Resamples skipped (one class only).
    pub skipped_one_class: usize,
    /// The margin used.
    pub margin: f64,
    /// Whether `--gate-margin` was given.
    pub margin_explicit: bool,
    /// Below [`MIN_PATIENTS`] / [`MIN_POSITIVE_PATIENTS`] (decided only because the margin
    /// was explicit).
    pub below_minimum: bool,
    /// Passed.
    pub passed: bool,
}

/// (patients, patients with a malignant nodule) among `rows`.
fn count_patients(samples: &[Sample], rows: &[usize]) -> (usize, usize) {
    let mut patients: BTreeMap<&str, bool> = BTreeMap::new();
    for &i in rows {
        *patients.entry(samples[i].pid.as_str()).or_insert(false) |= samples[i].label;
    }
    (patients.len(), patients.values().filter(|&&p| p).count())
}

/// True when `(patients, positives)` is below the minimum.
pub fn below_minimum(patients: usize, positives: usize) -> bool {
    patients < MIN_PATIENTS || positives < MIN_POSITIVE_PATIENTS
}

/// Refuses (before training) when the test patients `test` are too few to decide on and
/// the margin is not explicit.
pub fn check_minimum(
    samples: &[Sample],
    test: &[usize],
    margin_explicit: bool,
) -> Result<(), FinetuneError> {
    let (patients, positives) = count_patients(samples, test);
    if below_minimum(patients, positives) && !margin_explicit {
        return Err(FinetuneError::GateTooSmall {
            patients,
            positives,
            min_patients: MIN_PATIENTS,
            min_positives: MIN_POSITIVE_PATIENTS,
        });
    }
    Ok(())
}

/// Scores the test parts with the new fold models (fold k on part k) and the current model,
/// and decides.
pub fn evaluate(
    samples: &[Sample],
    planes: &[Planes01],
    parts: &[Parts],
    new_model: &NoduleModel,
    current: Option<&NoduleModel>,
    margin: Option<f64>,
    seed: u64,
) -> Result<GateReport, FinetuneError> {
    let mut test: Vec<usize> = Vec::new();
    let mut new_scores: Vec<f64> = Vec::new();
    for (k, p) in parts.iter().enumerate() {
        let refs: Vec<&Planes01> = p.test.iter().map(|&i| &planes[i]).collect();
        new_scores.extend(new_model.forward(&refs)?.iter().map(|o| o.folds[k].prob));
        test.extend(&p.test);
    }
    let labels: Vec<bool> = test.iter().map(|&i| samples[i].label).collect();
    let metric = |s: &[f64]| -> Result<(f64, f64), FinetuneError> {
        let a = metrics::roc_auc(&labels, s)
            .map_err(|e| FinetuneError::Data(format!("gate: test AUROC: {e}")))?;
        let p = metrics::average_precision(&labels, s)
            .map_err(|e| FinetuneError::Data(format!("gate: test AUPRC: {e}")))?;
        Ok((a, p))
    };
    let (new_auroc, new_auprc) = metric(&new_scores)?;
    let current_scores = match current {
        Some(model) => {
            let refs: Vec<&Planes01> = test.iter().map(|&i| &planes[i]).collect();
            let out = model.forward(&refs)?;
            Some(
                out.iter()
                    .map(|o| o.folds.iter().map(|f| f.prob).sum::<f64>() / o.folds.len() as f64)
                    .collect::<Vec<f64>>(),
            )
        }
        None => None,
    };
    let groups = patient_groups(samples, &test);
    let (patients, positive_patients) = count_patients(samples, &test);
    let margin_explicit = margin.is_some();
    let margin = margin.unwrap_or(DEFAULT_MARGIN);
    let mut report = GateReport {
        n: test.len(),
        positives: labels.iter().filter(|&&y| y).count(),
        patients,
        positive_patients,
        new_auroc,
        new_auprc,
        new_auroc_ci: None,
        current_auroc: None,
        current_auprc: None,
        current_auroc_ci: None,
        difference: None,
        difference_ci: None,
        resamples: RESAMPLES,
        skipped_one_class: 0,
        margin,
        margin_explicit,
        below_minimum: below_minimum(patients, positive_patients),
        passed: true,
    };
    match current_scores {
        Some(cur) => {
            let (a, p) = metric(&cur)?;
            let boot = bootstrap::paired_auroc(
                &labels,
                &new_scores,
                &cur,
                Some(&groups),
                RESAMPLES,
                seed,
                LEVEL,
            );
            report.current_auroc = Some(a);
            report.current_auprc = Some(p);
            report.difference = Some(new_auroc - a);
            report.new_auroc_ci = boot.a;
            report.current_auroc_ci = boot.b;
            report.difference_ci = boot.difference;
            report.skipped_one_class = boot.skipped_one_class;
            report.passed = new_auroc >= a - margin;
        }
        None => {
            let boot =
                bootstrap::bootstrap(&labels, &new_scores, Some(&groups), RESAMPLES, seed, LEVEL);
            report.new_auroc_ci = boot.auroc;
            report.skipped_one_class = boot.skipped_one_class;
        }
    }
    Ok(report)
}

/// Dense patient index of each of `rows` (the bootstrap's resampling unit).
fn patient_groups(samples: &[Sample], rows: &[usize]) -> Vec<usize> {
    let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
    rows.iter()
        .map(|&i| {
            let next = ids.len();
            *ids.entry(samples[i].pid.as_str()).or_insert(next)
        })
        .collect()
}

impl GateReport {
    /// The one-line stderr summary.
    pub fn summary(&self) -> String {
        let ci = |c: Option<Interval>| {
            c.map_or(String::new(), |c| {
                format!(" [95% CI {:.3}, {:.3}]", c.lower, c.upper)
            })
        };
        let current = match (self.current_auroc, self.current_auprc, self.difference) {
            (Some(a), Some(p), Some(d)) => format!(
                "current AUROC {a:.4}{} AUPRC {p:.4}; difference {d:+.4}{}",
                ci(self.current_auroc_ci),
                ci(self.difference_ci)
            ),
            _ => "no current model".into(),
        };
        let decision = match (self.current_auroc, self.passed) {
            (None, _) => "nothing to compare",
            (Some(_), true) => "passed",
            (Some(_), false) => "refused",
        };
        format!(
            "gate: {} test patients ({} with a malignant nodule), {} nodules ({} malignant), never used for early stopping or calibration; new AUROC {:.4}{} AUPRC {:.4}; {current}; margin {} ({}){}: {decision}",
            self.patients,
            self.positive_patients,
            self.n,
            self.positives,
            self.new_auroc,
            ci(self.new_auroc_ci),
            self.new_auprc,
            self.margin,
            if self.margin_explicit { "explicit" } else { "default" },
            if self.below_minimum {
                format!(
                    ", below the minimum of {MIN_PATIENTS} patients with {MIN_POSITIVE_PATIENTS} malignant"
                )
            } else {
                String::new()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_rule_counts_patients_not_nodules() {
        assert!(below_minimum(29, 10));
        assert!(below_minimum(100, 4));
        assert!(!below_minimum(30, 5));
    }
}
