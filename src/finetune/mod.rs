//! On-device fine-tuning of the nodule model (method notes section 3): patient-level K-fold
//! splits, per fold LoRA (r, alpha from the model config; dropout 0.25) on q/k/v of both
//! towers with the heads and the logit scale trainable (`lora`), heads only (`probe`), or
//! every base tensor (`full`: from the current model's weights when `--model` is given
//! without `--config`; from random initialisation with `--config`); symmetric InfoNCE with
//! label smoothing plus class-weighted image and text cross-entropy; AdamW; the semantic
//! sampler; the reference's augmentations; early stopping on the validation loss; a beta
//! calibrator per fold fitted on its validation predictions; and a gate against the current
//! model on test patients that neither chose the epoch nor fitted the calibrator
//! ([`splits`] says how the patients are divided, [`gate`] how it decides).
//!
//! Input model: anything [`crate::engine::load`] reads (a bundle, a model store's current
//! bundle, or a checkpoint folder); a bundle's q8_0 weights are dequantised to f32.
//!
//! Output: a bundle made by [`crate::convert::convert`] (the code of `noduled convert`) from
//! a checkpoint folder written to `<work>/checkpoint`: `config.json` (q/k/v stored
//! unmerged), `fold_k/model.safetensors`, `fold_k/calibration.json`, and `provenance.json`
//! (new model id, parent, settings, gate metrics). The bundle gets the new model id (a UUID
//! v5 of the fold weights' SHA-256), version = the parent bundle's + 1 (else 1), the parent
//! (`<id>@<version>` for a bundle, the folder's model id or path otherwise) in its
//! provenance, and the settings and gate metrics in its notes; install it with
//! `noduled bundle install`. `full` trains one model on fold 0's parts and writes one fold
//! (folds of a bundle share their base); its gate rests on fold 0's test patients only.
//!
//! Submodules: [`data`] manifest reading, [`augment`], [`splits`], [`params`] the trained
//! tensors (the model is [`crate::model::fold::FoldModel`]), [`losses`], [`train`] the loop
//! with checkpoints, [`gate`].

pub mod augment;
pub mod data;
pub mod gate;
pub mod losses;
pub mod params;
pub mod splits;
pub mod train;

use crate::model::checkpoint::Role;
use crate::model::config::{LoraLayout, ModelConfig};
use crate::rng::SplitMix64;
use candle_core::Tensor;
pub use gate::GateReport;
use params::{Params, Tuning};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Errors of fine-tuning. Messages name the file and the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FinetuneError {
    /// Bad training data or settings.
    #[error("{0}")]
    Data(String),
    /// A file could not be read or written.
    #[error("{path}: {msg}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        msg: String,
    },
    /// Too few test patients for the gate to decide without an explicit margin.
    #[error("gate: {patients} held-out test patients ({positives} with a malignant nodule) are below the minimum of {min_patients} with {min_positives} malignant to decide; add labelled patients, or pass --gate-margin explicitly to decide anyway")]
    GateTooSmall {
        /// Test patients.
        patients: usize,
        /// Of them, patients with a malignant nodule.
        positives: usize,
        /// [`gate::MIN_PATIENTS`].
        min_patients: usize,
        /// [`gate::MIN_POSITIVE_PATIENTS`].
        min_positives: usize,
    },
    /// A table could not be read.
    #[error(transparent)]
    Table(#[from] crate::table::TableError),
    /// The starting model could not be loaded.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// A tensor operation failed.
    #[error("training computation: {0}")]
    Compute(#[from] candle_core::Error),
    /// Writing the bundle failed.
    #[error(transparent)]
    Convert(#[from] crate::convert::ConvertError),
    /// The new model is worse than the current one by more than the margin.
    #[error("gate: new model AUROC {new:.4} < current {current:.4} - margin {margin} on {patients} held-out test patients; no installable model written")]
    Gate {
        /// Test patients the AUROCs rest on.
        patients: usize,
        /// New model's held-out AUROC.
        new: f64,
        /// Current model's AUROC on the same nodules.
        current: f64,
        /// The margin.
        margin: f64,
    },
}

impl FinetuneError {
    fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.display().to_string(),
            msg: e.to_string(),
        }
    }
}

/// What `finetune` does.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    /// The training manifest.
    pub manifest: PathBuf,
    /// The current model (bundle, store or checkpoint folder); required for `lora` and
    /// `probe`.
    pub model: Option<PathBuf>,
    /// Tower sizes for `full` without a model (a `config.json`).
    pub config: Option<PathBuf>,
    /// Output bundle (must not exist).
    pub out: PathBuf,
    /// Precision of the output bundle's vision base.
    pub precision: crate::convert::Precision,
    /// Work folder for per-epoch checkpoints (resume).
    pub work: PathBuf,
    /// Folds.
    pub folds: usize,
    /// Which tensors are trained.
    pub tuning: Tuning,
    /// Gate margin on AUROC; None: [`gate::DEFAULT_MARGIN`], and the gate refuses to decide
    /// on fewer test patients than [`gate::MIN_PATIENTS`] / [`gate::MIN_POSITIVE_PATIENTS`].
    pub gate_margin: Option<f64>,
    /// Loop settings.
    pub train: train::TrainOptions,
}

/// Runs fine-tuning and writes the new model; returns the gate report.
pub fn run(opts: &FinetuneOptions) -> Result<GateReport, FinetuneError> {
    if opts.out.exists() {
        return Err(FinetuneError::Data(format!(
            "{}: exists already; choose a new bundle directory",
            opts.out.display()
        )));
    }
    let current = match &opts.model {
        Some(path) => Some(Start::read(path)?),
        None => None,
    };
    let mut samples = data::load(&opts.manifest)?;
    let mut cfg: ModelConfig = match (&current, &opts.config) {
        (_, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| FinetuneError::io(path, e))?;
            let cfg: ModelConfig = serde_json::from_str(&text)
                .map_err(|e| FinetuneError::Data(format!("{}: {e}", path.display())))?;
            cfg.validate()
                .map_err(|e| FinetuneError::Data(format!("{}: {e}", path.display())))?;
            cfg
        }
        (Some(start), None) => start.config.clone(),
        (None, None) => {
            return Err(FinetuneError::Data(
                "--model (or, with --tuning full, --config) is required".into(),
            ))
        }
    };
    if opts.tuning != Tuning::Full && current.is_none() {
        return Err(FinetuneError::Data(
            "--tuning lora/probe adapts a model: --model is required".into(),
        ));
    }
    if let (Some(start), Some(_)) = (&current, &opts.config) {
        if !same_sizes(&start.config, &cfg) && opts.tuning != Tuning::Full {
            return Err(FinetuneError::Data(format!(
                "--config differs from {}'s sizes",
                start.path.display()
            )));
        }
    }
    cfg.lora_layout = Some(LoraLayout::Unmerged);
    let texts = train::tokenise(&samples, cfg.context);
    eprintln!(
        "finetune: {} nodules, {} malignant, {}",
        samples.len(),
        samples.iter().filter(|s| s.label).count(),
        if texts.is_some() {
            "image + text"
        } else {
            "image only (no text or semantic columns)"
        }
    );
    let pids: Vec<(String, bool)> = samples.iter().map(|s| (s.pid.clone(), s.label)).collect();
    let parts = splits::train_val_test(&pids, opts.folds, opts.train.seed)?;
    let n_train = if opts.tuning == Tuning::Full {
        1
    } else {
        opts.folds
    };
    let parts = &parts[..n_train];
    check_parts(&opts.manifest, parts, &samples)?;
    let test: Vec<usize> = parts.iter().flat_map(|p| p.test.iter().copied()).collect();
    if current.is_some() {
        gate::check_minimum(&samples, &test, opts.gate_margin.is_some())?;
    }
    let planes = train::plain_planes(&samples);
    if !opts.train.augment {
        // Only the planes are used from here on: free the crops (4 MB each).
        for s in &mut samples {
            s.crop.voxels = Vec::new();
        }
    }
    // `full` continues the current model unless --config asks for fresh towers; from random
    // weights it standardises the heads on training data first.
    let from_random = opts.tuning == Tuning::Full && (current.is_none() || opts.config.is_some());
    std::fs::create_dir_all(&opts.work).map_err(|e| FinetuneError::io(&opts.work, e))?;
    let mut results = Vec::new();
    let mut epochs_here = 0;
    for (k, p) in parts.iter().enumerate() {
        let values = initial_values(&cfg, current.as_ref().filter(|_| !from_random), k, opts)?;
        let params = Params::new(&cfg, &values, opts.tuning, &opts.train.device)?;
        let r = train::train_fold(
            k,
            params,
            from_random,
            &samples,
            &planes,
            texts.as_ref(),
            &p.train,
            &p.val,
            &opts.train,
            &opts.work,
            &mut epochs_here,
        )?;
        results.push(r);
    }
    let ckpt = opts.work.join("checkpoint");
    if ckpt.exists() {
        std::fs::remove_dir_all(&ckpt).map_err(|e| FinetuneError::io(&ckpt, e))?;
    }
    let model_id = write_folds(&ckpt, &cfg, &results, parts, &samples)?;
    // The gate scores the test patients with the fold models as written (the inference
    // model, not the training one), each by the fold that never saw them.
    let new_model = crate::model::NoduleModel::load(&ckpt)?;
    let current_model = current.as_ref().map(Start::model).transpose()?;
    let report = gate::evaluate(
        &samples,
        &planes,
        parts,
        &new_model,
        current_model.as_ref(),
        opts.gate_margin,
        opts.train.seed,
    )?;
    eprintln!("{}", report.summary());
    if !report.passed {
        return Err(FinetuneError::Gate {
            new: report.new_auroc,
            current: report.current_auroc.unwrap_or(f64::NAN),
            margin: report.margin,
            patients: report.patients,
        });
    }
    let prov = write_provenance(opts, &ckpt, &model_id, current.as_ref(), &report)?;
    let tolerance = match opts.precision {
        crate::convert::Precision::Q8_0 => 1e-2,
        _ => 1e-4,
    };
    crate::convert::convert(
        &ckpt,
        &opts.out,
        &crate::convert::Options {
            precision: opts.precision,
            version: current.as_ref().and_then(|c| c.version).unwrap_or(0) + 1,
            model_id,
            keep_f16: Vec::new(),
            tolerance,
            notes: prov.to_string(),
            parent: current.as_ref().map(|c| c.id.clone()),
        },
    )?;
    eprintln!("finetune: wrote bundle {}", opts.out.display());
    Ok(report)
}

/// Tower sizes equal (the q/k/v layout aside).
fn same_sizes(a: &ModelConfig, b: &ModelConfig) -> bool {
    let mut a = a.clone();
    a.lora_layout = b.lora_layout;
    &a == b
}

/// The starting model's tensors, as a bundle or a checkpoint folder holds them.
enum StartWeights {
    /// A checkpoint folder.
    Checkpoint(crate::model::checkpoint::Checkpoint),
    /// A bundle: shared tensors (vision base dequantised, text base) and per-fold tensors.
    Bundle {
        base: BTreeMap<String, Tensor>,
        folds: Vec<BTreeMap<String, Tensor>>,
    },
}

/// The model fine-tuning starts from (and the gate compares with).
struct Start {
    /// The path as given, resolved (a store's current bundle).
    path: PathBuf,
    config: ModelConfig,
    weights: StartWeights,
    /// Identity recorded as the new bundle's parent.
    id: String,
    /// The bundle's version.
    version: Option<u64>,
}

impl Start {
    /// Reads what `engine::load` reads: a bundle, a store (its current bundle) or a
    /// checkpoint folder.
    fn read(path: &Path) -> Result<Self, FinetuneError> {
        use crate::bundle::{store::CURRENT, MANIFEST};
        let current = path.join(CURRENT);
        let path = if !path.join(MANIFEST).is_file() && current.join(MANIFEST).is_file() {
            current.canonicalize().unwrap_or(current)
        } else {
            path.to_path_buf()
        };
        if !path.join(MANIFEST).is_file() {
            let ck = crate::model::checkpoint::load(&path)?;
            return Ok(Self {
                id: read_model_id(&path).unwrap_or_else(|| path.display().to_string()),
                config: ck.config.clone(),
                weights: StartWeights::Checkpoint(ck),
                version: None,
                path,
            });
        }
        use crate::model::bundle::{BundleInfo, MappedFile};
        let info = BundleInfo::read(&path)?;
        let cfg = info.config.clone();
        let vision = MappedFile::open(&path.join(&info.payload.base))?;
        let text = MappedFile::open(&path.join(&info.payload.text))?;
        let q8: std::collections::HashSet<&str> =
            info.payload.q8_0.iter().map(String::as_str).collect();
        let specs = crate::model::checkpoint::specs(&cfg);
        let mut base = BTreeMap::new();
        for s in specs.iter().filter(|s| s.role != Role::Fold) {
            let t = if !s.key.starts_with("vision_model.") {
                text.float(&s.key, &s.shape, candle_core::DType::F32)?
            } else if q8.contains(s.key.as_str()) {
                vision.q8_0(&s.key, s.shape[0], s.shape[1])?.dequantize()?
            } else {
                vision.float(&s.key, &s.shape, candle_core::DType::F32)?
            };
            base.insert(s.key.clone(), t);
        }
        let mut folds = Vec::new();
        for entry in &info.manifest.folds {
            let f = MappedFile::open(&path.join(&entry.file))?;
            let mut own = BTreeMap::new();
            for s in specs.iter().filter(|s| s.role == Role::Fold) {
                own.insert(
                    s.key.clone(),
                    f.float(&s.key, &s.shape, candle_core::DType::F32)?,
                );
            }
            folds.push(own);
        }
        Ok(Self {
            id: format!("{}@{}", info.manifest.model_id, info.manifest.version),
            version: Some(info.manifest.version),
            config: cfg,
            weights: StartWeights::Bundle { base, folds },
            path,
        })
    }

    fn n_folds(&self) -> usize {
        match &self.weights {
            StartWeights::Checkpoint(ck) => ck.weights.n_folds(),
            StartWeights::Bundle { folds, .. } => folds.len(),
        }
    }

    /// Fold `k`'s tensor `key` of `role`, when the model has it.
    fn tensor(&self, k: usize, key: &str, role: Role) -> Option<Tensor> {
        match (&self.weights, role) {
            (StartWeights::Checkpoint(ck), Role::Fold) => ck.weights.fold(k, key).ok(),
            (StartWeights::Checkpoint(ck), _) => ck.weights.base(key).ok(),
            (StartWeights::Bundle { folds, .. }, Role::Fold) => folds[k].get(key).cloned(),
            (StartWeights::Bundle { base, .. }, _) => base.get(key).cloned(),
        }
    }

    /// The inference model, for the gate.
    fn model(&self) -> Result<crate::model::NoduleModel, FinetuneError> {
        Ok(match self.weights {
            StartWeights::Checkpoint(_) => crate::model::NoduleModel::load(&self.path)?,
            StartWeights::Bundle { .. } => crate::model::NoduleModel::load_bundle(&self.path)?.0,
        })
    }
}

/// Fold `k`'s starting tensors: the current model's fold `k mod K'` (base W0 + its LoRA and
/// heads; a missing text classifier drawn fresh), or random for `full`.
fn initial_values(
    cfg: &ModelConfig,
    current: Option<&Start>,
    k: usize,
    opts: &FinetuneOptions,
) -> Result<BTreeMap<String, Tensor>, FinetuneError> {
    let mut rng = SplitMix64::new(SplitMix64::nth(opts.train.seed, 77 + k as u64));
    let mut values = params::random_init(cfg, &mut rng)?;
    let Some(start) = current else {
        return Ok(values);
    };
    let kk = k % start.n_folds();
    for (key, _, role) in params::all_specs(cfg) {
        if let Some(t) = start.tensor(kk, &key, role) {
            values.insert(key, t);
        } else if !key.starts_with("classifier_text") {
            return Err(FinetuneError::Data(format!(
                "current model lacks tensor `{key}`"
            )));
        }
    }
    Ok(values)
}

/// Every fold's training and validation parts hold both classes (the class weights, the
/// validation loss and the calibrator need both); the test parts are the gate's concern.
fn check_parts(
    manifest: &Path,
    parts: &[splits::Parts],
    samples: &[data::Sample],
) -> Result<(), FinetuneError> {
    for (k, p) in parts.iter().enumerate() {
        for (name, idx) in [("training", &p.train), ("validation", &p.val)] {
            let pos = idx.iter().filter(|&&i| samples[i].label).count();
            if pos == 0 || pos == idx.len() {
                return Err(FinetuneError::Data(format!(
                    "{}: fold {k}'s {name} patients are all one class ({pos} malignant of {} nodules); use fewer folds or more data",
                    manifest.display(),
                    idx.len()
                )));
            }
        }
    }
    Ok(())
}

/// Writes the checkpoint folder `out` (config, per fold weights and the beta calibrator
/// fitted on the fold's validation part); returns the new model id.
fn write_folds(
    out: &Path,
    cfg: &ModelConfig,
    results: &[train::FoldResult],
    parts: &[splits::Parts],
    samples: &[data::Sample],
) -> Result<String, FinetuneError> {
    std::fs::create_dir_all(out).map_err(|e| FinetuneError::io(out, e))?;
    let mut fold_hashes = Vec::new();
    for (k, r) in results.iter().enumerate() {
        let dir = out.join(format!("fold_{k}"));
        std::fs::create_dir_all(&dir).map_err(|e| FinetuneError::io(&dir, e))?;
        let labels: Vec<bool> = parts[k].val.iter().map(|&i| samples[i].label).collect();
        let cal = crate::calibration::fit(&r.val_probs, &labels)
            .map_err(|e| FinetuneError::Data(format!("fold {k}: {e}")))?;
        let cal_json = serde_json::json!({"method": "beta", "a": cal.a, "b": cal.b, "c": cal.c, "clip_eps": cal.clip_eps});
        let path = dir.join("calibration.json");
        std::fs::write(&path, format!("{cal_json:#}\n"))
            .map_err(|e| FinetuneError::io(&path, e))?;
        let path = dir.join("model.safetensors");
        let map: std::collections::HashMap<String, Tensor> = r.values.clone().into_iter().collect();
        candle_core::safetensors::save(&map, &path)?;
        let bytes = std::fs::read(&path).map_err(|e| FinetuneError::io(&path, e))?;
        use sha2::Digest;
        fold_hashes.push(hex::encode(sha2::Sha256::digest(&bytes)));
    }
    let path = out.join("config.json");
    let text = serde_json::json!({
        "vision_width": cfg.vision_width, "vision_layers": cfg.vision_layers,
        "vision_heads": cfg.vision_heads, "patch": cfg.patch, "image": cfg.image,
        "embed": cfg.embed, "text_width": cfg.text_width, "text_layers": cfg.text_layers,
        "text_heads": cfg.text_heads, "vocab": cfg.vocab, "context": cfg.context,
        "out_dim": cfg.out_dim, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
        "lora_layout": "unmerged",
    });
    std::fs::write(&path, format!("{text:#}\n")).map_err(|e| FinetuneError::io(&path, e))?;
    let model_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, fold_hashes.join(",").as_bytes());
    Ok(model_id.to_string())
}

/// Writes `out/provenance.json` (model id, parent, settings, gate report) and returns it.
fn write_provenance(
    opts: &FinetuneOptions,
    out: &Path,
    model_id: &str,
    current: Option<&Start>,
    gate: &GateReport,
) -> Result<serde_json::Value, FinetuneError> {
    let parent = current.map(|c| c.id.clone());
    let prov = serde_json::json!({
        "model_id": model_id,
        "parent": parent,
        "tuning": opts.tuning,
        "manifest": opts.manifest.display().to_string(),
        "folds": opts.folds,
        "split": "per outer fold: test (gate only) / inner validation (early stopping, calibration) / training, patient-level",
        "epochs": opts.train.epochs,
        "lr": opts.train.lr,
        "head_lr_mult": opts.train.head_lr_mult,
        "batch": opts.train.batch,
        "seed": opts.train.seed,
        "augment": opts.train.augment,
        "gate": gate,
        "note": "trained by noduled finetune; not for clinical use unless validated",
    });
    let path = out.join("provenance.json");
    std::fs::write(&path, format!("{prov:#}\n")).map_err(|e| FinetuneError::io(&path, e))?;
    Ok(prov)
}

fn read_model_id(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("provenance.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("model_id")?.as_str().map(str::to_string)
}
