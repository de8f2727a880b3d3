//! The score JSON: the contract between noduled and everything that reads its results
//! (CLI users, the daemon's outbox and MQTT subscribers, checks). Fields may be added,
//! never removed or renamed.
//!
//! ```json
//! {"model": {"id", "precision", "backend"[, "fallback"]},
//!  "nodules": [{"patient_id", "nodule_id",
//!               "folds": [{"prob", "calibrated", "attention": [9]}],
//!               "score": {"raw", "calibrated"},
//!               "descriptors": {feature: {class: p}}}],
//!  "patients": [{"patient_id", "calibrated"}]}
//! ```
//! `prob` is the softmax class-1 probability of one fold, `calibrated` its beta-calibrated
//! value; `score.raw` / `score.calibrated` are fold means; a patient's `calibrated` is, per
//! fold, the max over the patient's nodules of the calibrated score, then the fold mean.

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
