//! The score JSON: the contract between noduled and everything that reads its results
//! (CLI users, the daemon's outbox and MQTT subscribers, checks). Fields may be added,
//! never removed or renamed.
//!
//! ```json
//! {"model": {"id", "precision", "backend"[, "fallback"]},
//!  "nodules": [{"patient_id", "nodule_id",
//!               "folds": [{"prob", "calibrated", "attention": [9]}],
//!               "score": {"raw", "calibrated"},
//!               "descriptors": {feature: {class: p}}, "summary"}],
//!  "patients": [{"patient_id", "calibrated"}]}
//! ```
//! `prob` is the softmax class-1 probability of one fold, `calibrated` its beta-calibrated
//! value; `score.raw` / `score.calibrated` are fold means; a patient's `calibrated` is, per
//! fold, the max over the patient's nodules of the calibrated score, then the fold mean.
//! `summary` is the one plain-language sentence of [`summary`], also the DICOM SR's text.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which model produced a report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    /// Model identifier (bundle id, or the checkpoint folder's name).
    pub id: String,
    /// Weight precision in use: "f32", "f16", "q8_0".
    pub precision: String,
    /// Compute backend in use: "cpu", or "cuda:N f16" / "cuda:N f32" (device and the vision
    /// tower's dtype).
    pub backend: String,
    /// Why a CUDA build scores on the CPU (no GPU answered); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Model version when known (bundles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// One fold's outputs for one nodule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FoldScore {
    /// Softmax probability of class 1 (malignant).
    pub prob: f64,
    /// Beta-calibrated probability.
    pub calibrated: f64,
    /// MIL attention weights over the nine planes (sum to 1).
    pub attention: Vec<f64>,
}

/// Fold-mean scores of one nodule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnsembleScore {
    /// Mean of the folds' `prob`.
    pub raw: f64,
    /// Mean of the folds' `calibrated`.
    pub calibrated: f64,
}

/// Zero-shot descriptor probabilities: feature -> class word (as written in the prompts) -> p.
pub type Descriptors = BTreeMap<String, BTreeMap<String, f64>>;

/// Everything computed for one nodule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NoduleReport {
    /// Patient identifier.
    pub patient_id: String,
    /// Nodule identifier.
    pub nodule_id: String,
    /// Per-fold outputs, in fold order.
    pub folds: Vec<FoldScore>,
    /// Fold means.
    pub score: EnsembleScore,
    /// Zero-shot descriptors averaged over folds.
    pub descriptors: Descriptors,
    /// Where the nodule came from (file, series, coordinate...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub source: serde_json::Value,
    /// Ground-truth label when the request carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<u8>,
    /// Plain-language summary of score and descriptors ([`summary`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
}

/// Patient-level score.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PatientReport {
    /// Patient identifier.
    pub patient_id: String,
    /// Per fold the max over the patient's nodules of the calibrated score, then the fold mean.
    pub calibrated: f64,
}

/// The whole score document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoreReport {
    /// The model that produced it.
    pub model: ModelInfo,
    /// One entry per nodule, in request order.
    pub nodules: Vec<NoduleReport>,
    /// One entry per patient, in order of first appearance.
    pub patients: Vec<PatientReport>,
}

impl ScoreReport {
    /// Sets every nodule's `summary` against `alert_threshold` (the daemon's
    /// `alert.calibrated_threshold`; None where there is none, as on the command line).
    pub fn fill_summaries(&mut self, alert_threshold: Option<f64>) {
        for n in &mut self.nodules {
            n.summary = summary(n, alert_threshold);
        }
    }

    /// Builds the patient scores from the nodules (per fold max of calibrated, then fold mean),
    /// patients in order of first appearance.
    pub fn patients_from(nodules: &[NoduleReport]) -> Vec<PatientReport> {
        let mut order: Vec<&str> = Vec::new();
        for n in nodules {
            if !order.contains(&n.patient_id.as_str()) {
                order.push(&n.patient_id);
            }
        }
        order
            .into_iter()
            .map(|pid| {
                let mine: Vec<&NoduleReport> =
                    nodules.iter().filter(|n| n.patient_id == pid).collect();
                let n_folds = mine[0].folds.len();
                let mean = (0..n_folds)
                    .map(|k| {
                        mine.iter()
                            .map(|n| n.folds[k].calibrated)
                            .fold(f64::NEG_INFINITY, f64::max)
                    })
                    .sum::<f64>()
                    / n_folds as f64;
                PatientReport {
                    patient_id: pid.to_string(),
                    calibrated: mean,
                }
            })
            .collect()
    }
}

/// The plain-language summary of one nodule, deterministic (two decimals, features in the
/// order of [`crate::semantics::FEATURES`], then any other feature alphabetically), labelled
/// as model output:
///
/// "Model output, not for diagnostic use: calibrated malignancy score 0.88 (at or above the
/// alert threshold 0.80). Most likely descriptors: spiculated margin (0.56), solid (0.42),
/// round shape (0.40), well marginated (0.71). More likely present than absent: pleural
/// attachment (0.62)."
///
/// Categorical features give their most likely class; present/absent features are listed
/// only when "present" is the more likely class. One generator for the JSON result and the
/// DICOM SR text.
pub fn summary(n: &NoduleReport, alert_threshold: Option<f64>) -> String {
    let c = n.score.calibrated;
    let mut s = format!("Model output, not for diagnostic use: calibrated malignancy score {c:.2}");
    if let Some(t) = alert_threshold {
        let side = if c >= t { "at or above" } else { "below" };
        s.push_str(&format!(" ({side} the alert threshold {t:.2})"));
    }
    s.push('.');
    let (likely, present) = top_descriptors(&n.descriptors);
    if !likely.is_empty() {
        s.push_str(&format!(" Most likely descriptors: {}.", likely.join(", ")));
    }
    if !present.is_empty() {
        s.push_str(&format!(
            " More likely present than absent: {}.",
            present.join(", ")
        ));
    }
    s
}

/// One feature's most likely class and its probability (ties: the first class in name order).
pub fn most_likely(classes: &BTreeMap<String, f64>) -> Option<(&str, f64)> {
    classes.iter().filter(|(_, p)| p.is_finite()).fold(
        None,
        |best: Option<(&str, f64)>, (k, &p)| match best {
            Some((_, bp)) if bp >= p => best,
            _ => Some((k.as_str(), p)),
        },
    )
}

/// Phrases of the categorical descriptors' top classes, and of present findings.
fn top_descriptors(d: &Descriptors) -> (Vec<String>, Vec<String>) {
    use crate::semantics::{feature, CONSISTENCY, CONSPICUITY, FEATURES};
    let mut keys: Vec<&String> = d.keys().collect();
    let rank = |k: &str| feature(k).map(|(i, _)| i).unwrap_or(FEATURES.len());
    keys.sort_by_key(|k| rank(k));
    let (mut likely, mut present) = (Vec::new(), Vec::new());
    for key in keys {
        let classes = &d[key];
        let Some((class, p)) = most_likely(classes) else {
            continue;
        };
        let known = feature(key);
        let name = known
            .map(|(_, f)| f.name.to_string())
            .unwrap_or_else(|| key.replace('_', " "));
        let binary =
            classes.len() == 2 && classes.contains_key("present") && classes.contains_key("absent");
        if binary {
            if class == "present" {
                present.push(format!("{name} ({p:.2})"));
            }
        } else if matches!(known, Some((i, _)) if i == CONSISTENCY || i == CONSPICUITY) {
            likely.push(format!("{class} ({p:.2})"));
        } else {
            likely.push(format!("{class} {name} ({p:.2})"));
        }
    }
    (likely, present)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodule(calibrated: f64, d: &[(&str, &[(&str, f64)])]) -> NoduleReport {
        NoduleReport {
            patient_id: "p".into(),
            nodule_id: "n".into(),
            folds: Vec::new(),
            score: EnsembleScore {
                raw: calibrated,
                calibrated,
            },
            descriptors: d
                .iter()
                .map(|(f, cs)| {
                    let m = cs.iter().map(|(c, p)| (c.to_string(), *p)).collect();
                    (f.to_string(), m)
                })
                .collect(),
            source: serde_json::Value::Null,
            label: None,
            summary: String::new(),
        }
    }

    #[test]
    fn summary_names_score_threshold_and_top_classes_in_feature_order() {
        let n = nodule(
            0.876,
            &[
                ("pleural_attachment", &[("present", 0.62), ("absent", 0.38)]),
                ("cavitation", &[("present", 0.2), ("absent", 0.8)]),
                (
                    "nodule_consistency",
                    &[("solid", 0.42), ("part-solid", 0.3)],
                ),
                ("nodule_margin", &[("smooth", 0.1), ("spiculated", 0.56)]),
            ],
        );
        assert_eq!(
            summary(&n, Some(0.8)),
            "Model output, not for diagnostic use: calibrated malignancy score 0.88 \
             (at or above the alert threshold 0.80). Most likely descriptors: spiculated \
             margin (0.56), solid (0.42). More likely present than absent: pleural attachment (0.62)."
        );
        let low = nodule(0.1, &[]);
        assert_eq!(
            summary(&low, Some(0.5)),
            "Model output, not for diagnostic use: calibrated malignancy score 0.10 (below the alert threshold 0.50)."
        );
        assert!(!summary(&low, None).contains("threshold"));
    }
}
