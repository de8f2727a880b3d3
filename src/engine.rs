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
    /// Scores the model's recorded golden input (a bundle's) against its recorded outputs;
    /// `Ok` for models that carry none.
    fn golden_check(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Loads the model at `path` for scoring: a bundle directory (has `manifest.json`), a model
/// store (has a `current` link: its current bundle) or a checkpoint folder
/// (`fold_{k}/best_both.pt` + `calibration.json`). A bundle is always verified (every file's
/// SHA-256, on the mappings that are then served: see [`crate::bundle::open_verified`]).
pub fn load(path: &std::path::Path) -> anyhow::Result<Arc<dyn Scorer>> {
    load_verified(path, None)
}

/// Like [`load`], and with `public_key` the bundle's signature is checked too (on the manifest
/// bytes that are then used): unsigned or wrongly signed bundles, and anything that is not a
/// bundle, are refused.
pub fn load_verified(
    path: &std::path::Path,
    public_key: Option<&crate::bundle::sign::PublicKey>,
) -> anyhow::Result<Arc<dyn Scorer>> {
    if is_bundle(path) {
        let opened = crate::bundle::open_verified(path, public_key)?;
        return Ok(Arc::new(CheckpointScorer::from_opened(&opened)?));
    }
    if public_key.is_some() {
        anyhow::bail!(
            "{}: not a bundle; a public key is configured, so only signed bundles are loaded",
            path.display()
        );
    }
    Ok(Arc::new(CheckpointScorer::load(path)?))
}

/// Whether `path` is a bundle, or a store with a `current` bundle.
fn is_bundle(path: &std::path::Path) -> bool {
    path.join(crate::bundle::MANIFEST).is_file()
        || path
            .join(crate::bundle::store::CURRENT)
            .join(crate::bundle::MANIFEST)
            .is_file()
}

/// A checkpoint folder's or a bundle's model, on the device [`crate::device::current`] names.
pub struct CheckpointScorer {
    model: NoduleModel,
    info: ModelInfo,
    /// A bundle's golden input and recorded outputs (from the verified mapping).
    golden: Option<(crate::nodule::Planes01, crate::model::bundle::Golden)>,
}

impl CheckpointScorer {
    /// Loads the checkpoint folder at `path` onto the process's device.
    pub fn load(path: &std::path::Path) -> Result<Self, crate::model::ModelError> {
        let started = std::time::Instant::now();
        let placement = crate::device::current();
        let model = NoduleModel::load(path)?.placed(&placement)?;
        release_freed_heap();
        tracing::info!(
            model = %path.display(),
            folds = model.n_folds(),
            backend = %placement.label(),
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
            backend: placement.label(),
            fallback: placement.fallback,
            version: None,
        };
        Ok(Self {
            model,
            info,
            golden: None,
        })
    }

    /// Loads the bundle directory at `path` (verified, no key) onto the process's device.
    pub fn load_bundle(path: &std::path::Path) -> Result<Self, crate::model::ModelError> {
        Self::from_opened(&crate::bundle::open_verified(path, None)?)
    }

    /// Loads an opened, verified bundle onto the process's device (on the CPU q8_0 weights
    /// stay mapped; on a GPU they are dequantised to the tower's dtype).
    pub fn from_opened(bundle: &crate::bundle::Opened) -> Result<Self, crate::model::ModelError> {
        let path = bundle.dir.as_path();
        let started = std::time::Instant::now();
        let placement = crate::device::current();
        let (model, info) = NoduleModel::load_opened(bundle)?;
        let g = &info.payload.golden;
        let golden_planes = crate::model::bundle::golden_planes(
            &crate::model::bundle::opened_file(bundle, &g.file)?,
        )?;
        let model = model.placed(&placement)?;
        release_freed_heap();
        tracing::info!(
            model = %path.display(),
            folds = model.n_folds(),
            backend = %placement.label_for(&info.manifest.precision),
            precision = %info.manifest.precision,
            ms = started.elapsed().as_millis() as u64,
            "bundle loaded"
        );
        let info = ModelInfo {
            id: info.manifest.model_id.clone(),
            precision: info.manifest.precision.clone(),
            backend: placement.label_for(&info.manifest.precision),
            fallback: placement.fallback,
            version: Some(info.manifest.version),
        };
        Ok(Self {
            model,
            info,
            golden: Some((golden_planes, g.clone())),
        })
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

    fn golden_check(&self) -> anyhow::Result<()> {
        match &self.golden {
            Some((planes, golden)) => compare_golden(&self.model, planes, golden),
            None => Ok(()),
        }
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
                    summary: String::new(),
                }
            })
            .collect();
        let patients = ScoreReport::patients_from(&reports);
        let mut report = ScoreReport {
            model: self.info.clone(),
            nodules: reports,
            patients,
        };
        report.fill_summaries(None);
        Ok(report)
    }
}

/// Checks that a bundle's config and model payload make sense to this build's loader:
/// config sizes, payload, files named, and every weight file's tensors present with the
/// shapes the config implies (headers only; hashes are [`crate::bundle::verify`]'s job).
pub fn check_bundle_config(bundle: &std::path::Path) -> anyhow::Result<()> {
    use crate::model::bundle::{BundleInfo, MappedFile};
    use crate::model::checkpoint::{specs, Role};
    let info = BundleInfo::read(bundle)?;
    let base = MappedFile::open(&bundle.join(&info.payload.base))?;
    let text = MappedFile::open(&bundle.join(&info.payload.text))?;
    let q8: std::collections::HashSet<&str> =
        info.payload.q8_0.iter().map(String::as_str).collect();
    let all = specs(&info.config);
    for spec in all.iter().filter(|s| s.role != Role::Fold) {
        let file = if spec.key.starts_with("vision_model.") {
            &base
        } else {
            &text
        };
        if q8.contains(spec.key.as_str()) {
            if spec.shape.len() != 2 {
                anyhow::bail!("{}: `{}` cannot be q8_0", file.path(), spec.key);
            }
            file.q8_0(&spec.key, spec.shape[0], spec.shape[1])?;
        } else if !file.contains(&spec.key) {
            anyhow::bail!("{}: missing tensor `{}`", file.path(), spec.key);
        }
    }
    crate::model::bundle::read_golden(bundle, &info.payload.golden)?;
    for f in &info.manifest.folds {
        let file = MappedFile::open(&bundle.join(&f.file))?;
        for spec in all.iter().filter(|s| s.role == Role::Fold) {
            if !file.contains(&spec.key) {
                anyhow::bail!("{}: missing tensor `{}`", file.path(), spec.key);
            }
        }
    }
    Ok(())
}

/// Returns the heap freed after placement (the weights as read, before packing) to the
/// system. glibc keeps freed memory for reuse: weight-sized blocks raise its mmap threshold,
/// so later ones come from the heap and stay resident after `free` (an f32 ViT-B/32 bundle
/// held 733 MiB after load instead of 374; docs/performance.md). Elsewhere a no-op.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Loads the bundle in `dir` and scores its golden input, comparing every fold's
/// probability and zero-shot probabilities with the values recorded at convert time, within
/// the manifest's tolerance.
pub fn self_test(dir: &std::path::Path) -> anyhow::Result<()> {
    check_bundle_config(dir)?;
    let (model, info) = NoduleModel::load_bundle(dir)?;
    let golden = &info.payload.golden;
    let planes = crate::model::bundle::read_golden(dir, golden)?;
    compare_golden(&model, &planes, golden)
}

/// How far a model computing in bf16/f16 may be from the f32 outputs recorded at convert
/// time: the bound the bf16 path is held to on every fixture (tests/it/model.rs).
const REDUCED_PRECISION_TOLERANCE: f64 = 1e-2;

/// The golden check's tolerance: the manifest's, widened to
/// [`REDUCED_PRECISION_TOLERANCE`] when the model computes in a reduced dtype (the golden
/// record is made in f32).
fn golden_tolerance(recorded: f64, dtype: candle_core::DType) -> f64 {
    if dtype == candle_core::DType::F32 {
        recorded
    } else {
        recorded.max(REDUCED_PRECISION_TOLERANCE)
    }
}

/// Scores `planes` and compares with the golden record, within its tolerance.
fn compare_golden(
    model: &NoduleModel,
    planes: &crate::nodule::Planes01,
    golden: &crate::model::bundle::Golden,
) -> anyhow::Result<()> {
    let out = model.forward(&[planes])?;
    let tol = golden_tolerance(golden.tolerance, model.dtype());
    for (k, fold) in out[0].folds.iter().enumerate() {
        // NaN counts as the largest difference.
        let diff = |a: f64, b: f64| {
            let d = (a - b).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        };
        let d = diff(fold.prob, golden.probs[k]);
        if d > tol {
            anyhow::bail!(
                "golden input: fold {k} probability {:.6} differs from the recorded {:.6} by {d:.2e} (tolerance {tol:.0e})",
                fold.prob,
                golden.probs[k]
            );
        }
        let zs: Vec<f64> = fold.zero_shot.iter().flatten().copied().collect();
        let worst = zs
            .iter()
            .zip(&golden.zero_shot[k])
            .map(|(a, b)| diff(*a, *b))
            .fold(0.0, f64::max);
        if worst > tol {
            anyhow::bail!(
                "golden input: fold {k} descriptor probabilities differ from the recorded ones by up to {worst:.2e} (tolerance {tol:.0e})"
            );
        }
    }
    Ok(())
}
