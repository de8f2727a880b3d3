//! The CLIP nodule model: CLIP ViT and text towers with per-fold LoRA on q/k/v, attention-MIL
//! over the nine planes, an image classifier with beta calibration per fold, and zero-shot
//! semantic descriptors from the text tower.
//!
//! All folds share one frozen base and run in one batched pass: activations are
//! `[folds * rows, ...]`, fold-major, every base matmul covers all folds at once and only the
//! rank-r LoRA paths and the heads differ per fold (see [`linear`]). The towers are written
//! here on candle-core/candle-nn because candle-transformers' CLIP has no place for LoRA.
//! Models load onto the CPU in f32; [`NoduleModel::placed`] then moves the vision tower to the
//! device and dtype [`crate::device`] chose (f16 on CUDA). The MIL pooling and heads stay on
//! the CPU: MIL in f32, and from the MIL output on (classifier, zero-shot) the heads compute
//! in f64. The text tower runs once at load, on the CPU in f32: the prompts' per-fold
//! embeddings are cached.
//!
//! # Components
//! [`config`] sizes, [`linear`] base/LoRA layers, [`encoder`] transformer blocks,
//! [`vision`] and [`text`] towers, [`mil`] and [`heads`], [`checkpoint`] reading,
//! [`tokenizer`] and [`prompts`] for zero-shot.
//!
//! # Construction: `new(cfg, vb)`
//! Every component is built by `new(cfg, vb)` from a [`vb::Vb`], candle's `VarBuilder` over a
//! [`weights::Weights`] store keyed by the checkpoint keys (`vb.pp("vision_model")`,
//! `.pp("transformer").pp("resblocks").pp(i)`, ...; fold k's own tensors through
//! `vb.fold(k)`). Base layers ask the same store for their stored form
//! ([`vb::Vb::base_weight`]: a mapped q8_0 matrix stays in the mapping). Every source fills a
//! store and goes through this one path: a checkpoint folder ([`checkpoint`], used by
//! `convert`), a bundle ([`bundle`]: mapped f32/f16/bf16/q8_0 base + per-fold adapters),
//! random weights ([`random`], `bench --random`) and fine-tuning's parameters, whose trained
//! tensors are candle `Var`s (training's `finetune::params::Params`).
//!
//! # One assembly
//! The model is the towers (batched over the store's folds) plus one [`heads::FoldHeads`] per
//! fold: [`NoduleModel::assemble`]. Scoring's [`NoduleModel`] is it over every fold (text
//! tower run once at load for the prompt embeddings); fine-tuning's [`fold::FoldModel`] is it
//! over a one-fold store, keeping the text tower for the contrastive loss. The fused CPU
//! kernels are the inference-time choice inside the same `forward`s; training turns them off
//! with [`kernels::differentiable`]. The zero-shot logit scale is applied as
//! `exp(clamp(logit_scale, 0, ln 100))` in both, as the published model's forward does.

pub mod bundle;
pub mod checkpoint;
pub mod config;
pub mod encoder;
pub mod fold;
pub mod gemm;
pub mod heads;
pub mod kernels;
pub mod linear;
pub mod mapped;
pub mod mil;
pub mod profile;
pub mod prompts;
pub mod random;
pub mod text;
pub mod tokenizer;
pub mod vb;
pub mod vision;
pub mod weights;

use crate::calibration::BetaCalibration;
use crate::nodule::{Planes01, N_PLANES};
use candle_core::{DType, Device, Module, Tensor};
use config::{LoraLayout, ModelConfig};
use heads::{l2_normalize, FoldHeads};
use prompts::ZeroShotSpec;
use std::path::{Path, PathBuf};

/// Errors loading or running the model. Messages name the file and the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A folder or file could not be listed or read.
    #[error("{path}: {msg}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        msg: String,
    },
    /// No `fold_{k}` folder.
    #[error("{path}: no fold_<k> folders (expected fold_0/best_both.pt, ...)")]
    NoFolds {
        /// The model folder.
        path: String,
    },
    /// A fold folder without a state dict.
    #[error("{path}: neither best_both.pt nor model.safetensors")]
    NoStateDict {
        /// The fold folder.
        path: String,
    },
    /// A state dict that cannot be parsed or a tensor that cannot be decoded.
    #[error("{path}: {msg}")]
    Read {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A tensor the model needs is absent.
    #[error("{path}: missing tensor `{key}`")]
    Missing {
        /// The file.
        path: String,
        /// The state-dict key.
        key: String,
    },
    /// A tensor has the wrong shape for the configured sizes.
    #[error("{path}: tensor `{key}` has shape {got:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: String,
        /// The state-dict key.
        key: String,
        /// Shape found.
        got: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
    },
    /// A fold's frozen base differs from fold 0's.
    #[error("{path}: tensor `{key}` differs from the shared base in {reference} (neither the same W0 nor W0 + s*B*A)")]
    BaseMismatch {
        /// The fold's file.
        path: String,
        /// The state-dict key.
        key: String,
        /// Fold 0's file.
        reference: String,
    },
    /// Bad `config.json`.
    #[error("{path}: {msg}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Bad `calibration.json`.
    #[error("{path}: {msg}")]
    Calibration {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Bad `prompts.json`.
    #[error("{path}: {msg}")]
    Prompts {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A bundle's manifest could not be read.
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    /// A tensor operation failed.
    #[error("model computation: {0}")]
    Compute(#[from] candle_core::Error),
}

/// One fold's outputs for one nodule.
#[derive(Debug, Clone)]
pub struct FoldOutput {
    /// Vision tower output per plane, [9, embed] row-major.
    pub slice_features: Vec<f32>,
    /// MIL attention over the nine planes.
    pub attention: Vec<f64>,
    /// MIL output before L2 normalisation, [out_dim].
    pub image_embed: Vec<f32>,
    /// Softmax probability of class 1.
    pub prob: f64,
    /// Beta-calibrated `prob`.
    pub calibrated: f64,
    /// Zero-shot probabilities per feature (spec order), per class (prompt order).
    pub zero_shot: Vec<Vec<f64>>,
}

/// All folds' outputs for one nodule.
#[derive(Debug, Clone)]
pub struct NoduleOutput {
    /// In fold order.
    pub folds: Vec<FoldOutput>,
}

/// Nodules per batched pass (each is 9 planes x folds rows); bounds peak memory.
pub const NODULES_PER_PASS: usize = 8;

/// A loaded checkpoint set, ready to score.
pub struct NoduleModel {
    config: ModelConfig,
    layout: LoraLayout,
    fold_dirs: Vec<PathBuf>,
    vision: vision::VisionTower,
    heads: Vec<FoldHeads>,
    /// Per fold, the stored log logit scale (unclamped).
    log_scales: Vec<f64>,
    calibrations: Vec<BetaCalibration>,
    zero_shot: ZeroShotSpec,
    /// Per fold, the prompts' L2-normalised embeddings [prompts, out_dim], f64.
    text_embeds: Vec<Tensor>,
    device: Device,
    /// The vision tower's compute dtype (F32 unless placed in bf16 or f16).
    dtype: DType,
}

impl NoduleModel {
    /// Loads a checkpoint folder (see [`checkpoint`]) and precomputes the zero-shot text
    /// embeddings of every fold.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let started = std::time::Instant::now();
        let ckpt = checkpoint::load(dir)?;
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "checkpoints read"
        );
        Self::from_checkpoint(ckpt, read_prompts(dir)?)
    }

    /// Builds the model from a read checkpoint set and a prompt set (runs the text tower).
    pub fn from_checkpoint(
        ckpt: checkpoint::Checkpoint,
        zero_shot: ZeroShotSpec,
    ) -> Result<Self, ModelError> {
        let device = Device::Cpu;
        let cfg = &ckpt.config;
        let vb = vb::Vb::new(ckpt.weights, &device);
        let (vision, heads) = Self::assemble(cfg, &vb)?;
        let text = text::TextTower::new(cfg, vb)?;
        let started = std::time::Instant::now();
        let text_embeds = prompt_embeddings(&text, &heads, &zero_shot, cfg.context, &device)?;
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "prompt embeddings computed"
        );
        Self::new(
            cfg.clone(),
            ckpt.layout,
            ckpt.fold_dirs,
            (vision, heads),
            ckpt.calibrations,
            zero_shot,
            text_embeds,
        )
    }

    /// The assembly of the components over every fold of `vb`'s store: the vision tower
    /// (all folds batched) and each fold's heads. Scoring's model is it over all folds;
    /// fine-tuning's [`fold::FoldModel`] is it over a one-fold store, plus the text tower.
    pub fn assemble(
        cfg: &ModelConfig,
        vb: &vb::Vb,
    ) -> candle_core::Result<(vision::VisionTower, Vec<FoldHeads>)> {
        let vision = vision::VisionTower::new(cfg, vb.pp("vision_model"))?;
        let heads = (0..vb.n_folds())
            .map(|k| FoldHeads::new(cfg, vb.fold(k)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((vision, heads))
    }

    /// A model on the CPU in f32 from its assembled parts ([`Self::assemble`]; the image
    /// classifiers are cast to f64 here), calibrators, prompt set and per-fold prompt
    /// embeddings ([prompts, out_dim] f64, L2-normalised).
    pub fn new(
        config: ModelConfig,
        layout: LoraLayout,
        fold_dirs: Vec<PathBuf>,
        (vision, heads): (vision::VisionTower, Vec<FoldHeads>),
        calibrations: Vec<BetaCalibration>,
        zero_shot: ZeroShotSpec,
        text_embeds: Vec<Tensor>,
    ) -> Result<Self, ModelError> {
        let heads = heads
            .into_iter()
            .map(FoldHeads::in_f64)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let log_scales = heads
            .iter()
            .map(FoldHeads::log_scale)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            layout,
            fold_dirs,
            vision,
            heads,
            log_scales,
            calibrations,
            zero_shot,
            text_embeds,
            device: Device::Cpu,
            dtype: DType::F32,
        })
    }

    /// This model with its vision tower on `placement`'s device and dtype (a quantised base
    /// is dequantised there, see [`linear::Linear::placed`]); the CPU in f32 changes nothing.
    pub fn placed(self, placement: &crate::device::Placement) -> Result<Self, ModelError> {
        let vision = self.vision.placed(&placement.device, placement.dtype)?;
        Ok(Self {
            vision,
            device: placement.device.clone(),
            dtype: placement.dtype,
            ..self
        })
    }

    /// The device the vision tower runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The vision tower's compute dtype: F32, or BF16/F16 once placed there.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Fold `k`'s beta calibrator.
    pub fn calibration(&self, k: usize) -> &BetaCalibration {
        &self.calibrations[k]
    }

    /// Tower sizes.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// How the checkpoints stored q/k/v.
    pub fn layout(&self) -> LoraLayout {
        self.layout
    }

    /// Number of folds.
    pub fn n_folds(&self) -> usize {
        self.heads.len()
    }

    /// The fold folders, in fold order.
    pub fn fold_dirs(&self) -> &[PathBuf] {
        &self.fold_dirs
    }

    /// The zero-shot prompt set.
    pub fn zero_shot(&self) -> &ZeroShotSpec {
        &self.zero_shot
    }

    /// Fold `k`'s stored zero-shot logit scale (log space; applied clamped, see [`heads`]).
    pub fn logit_scale(&self, k: usize) -> f64 {
        self.log_scales[k]
    }

    /// Fold `k`'s L2-normalised prompt embeddings, [prompts, out_dim] f64, prompt order.
    pub fn text_embeddings(&self, k: usize) -> &Tensor {
        &self.text_embeds[k]
    }

    /// Runs every fold on `nodules`, in batched passes of a few nodules.
    pub fn forward(&self, nodules: &[&Planes01]) -> Result<Vec<NoduleOutput>, ModelError> {
        let mut out = Vec::with_capacity(nodules.len());
        for chunk in nodules.chunks(NODULES_PER_PASS) {
            out.extend(self.forward_pass(chunk)?);
        }
        Ok(out)
    }

    fn forward_pass(&self, nodules: &[&Planes01]) -> Result<Vec<NoduleOutput>, ModelError> {
        let pixels = self.pixels(nodules)?;
        let features = self.encode(&pixels)?;
        self.finish(nodules.len(), &features)
    }

    /// Stage 1 of [`Self::forward`]: nodules -> CLIP input [9 * n, 3, image, image].
    pub fn pixels(&self, nodules: &[&Planes01]) -> Result<Tensor, ModelError> {
        Ok(vision::clip_pixels(nodules, &self.device)?)
    }

    /// Stage 2: the vision tower over all folds -> slice features [folds * 9 * n, embed], f32
    /// on the CPU (copied back from a GPU, which also waits for its work to finish).
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.vision.forward(pixels)?.to_device(&Device::Cpu)?)
    }

    /// Stage 3: per fold MIL, classifier, calibration and zero-shot on `encode`'s output
    /// for `n` nodules.
    pub fn finish(&self, n: usize, features: &Tensor) -> Result<Vec<NoduleOutput>, ModelError> {
        let rows = n * N_PLANES;
        let mut outputs: Vec<NoduleOutput> =
            (0..n).map(|_| NoduleOutput { folds: Vec::new() }).collect();
        for (k, heads) in self.heads.iter().enumerate() {
            let feats_k = features.narrow(0, k * rows, rows)?;
            let (emb, att) = heads.mil.forward(&feats_k)?;
            let unit = l2_normalize(&emb.to_dtype(DType::F64)?)?;
            let logits = heads.classifier_image.forward(&unit)?.to_vec2::<f64>()?;
            let sims =
                (unit.matmul(&self.text_embeds[k].t()?)? * heads.scale_f64()?)?.to_vec2::<f64>()?;
            let feats_v = feats_k.to_vec2::<f32>()?;
            let emb_v = emb.to_vec2::<f32>()?;
            let att_v = att.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            for (i, output) in outputs.iter_mut().enumerate() {
                let prob = 1.0 / (1.0 + (logits[i][0] - logits[i][1]).exp());
                output.folds.push(FoldOutput {
                    slice_features: feats_v[i * N_PLANES..(i + 1) * N_PLANES]
                        .iter()
                        .flatten()
                        .copied()
                        .collect(),
                    attention: att_v[i].clone(),
                    image_embed: emb_v[i].clone(),
                    prob,
                    calibrated: self.calibrations[k].apply(prob),
                    zero_shot: self.zero_shot_probs(&sims[i]),
                });
            }
        }
        Ok(outputs)
    }

    /// Scaled cosine similarities to every prompt -> per feature softmax over its prompts.
    fn zero_shot_probs(&self, sims: &[f64]) -> Vec<Vec<f64>> {
        let mut off = 0;
        self.zero_shot
            .features
            .iter()
            .map(|(_, f)| {
                let s = &sims[off..off + f.prompts.len()];
                off += f.prompts.len();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.into_iter().map(|v| v / sum).collect()
            })
            .collect()
    }
}

/// The prompt set of a checkpoint folder: its `prompts.json`, else the built-in set.
pub fn read_prompts(dir: &Path) -> Result<ZeroShotSpec, ModelError> {
    let path = dir.join("prompts.json");
    if !path.is_file() {
        return Ok(ZeroShotSpec::builtin());
    }
    let err = |msg: String| ModelError::Prompts {
        path: path.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    ZeroShotSpec::parse(&text).map_err(err)
}

/// Runs the text tower once over the distinct prompts for all folds, then each fold's head.
pub(crate) fn prompt_embeddings(
    text: &text::TextTower,
    heads: &[FoldHeads],
    spec: &ZeroShotSpec,
    context: usize,
    device: &Device,
) -> Result<Vec<Tensor>, ModelError> {
    let prompts = spec.prompts();
    let mut distinct: Vec<&str> = Vec::new();
    let index: Vec<u32> = prompts
        .iter()
        .map(|p| {
            let i = distinct.iter().position(|d| d == p).unwrap_or_else(|| {
                distinct.push(p);
                distinct.len() - 1
            });
            i as u32
        })
        .collect();
    let tokenizer = tokenizer::PromptTokenizer::new(context);
    let ids: Vec<Vec<u32>> = distinct.iter().map(|p| tokenizer.encode(p)).collect();
    let pooled = text.forward(&ids, device)?;
    let index = Tensor::from_vec(index, prompts.len(), device)?;
    let u = distinct.len();
    heads
        .iter()
        .enumerate()
        .map(|(k, h)| {
            let e = h
                .text_head
                .forward(&pooled.narrow(0, k * u, u)?)?
                .to_dtype(DType::F64)?;
            Ok(l2_normalize(&e)?.index_select(&index, 0)?)
        })
        .collect()
}

/// Descriptor probabilities averaged over folds: feature -> class -> p.
pub fn descriptors(spec: &ZeroShotSpec, output: &NoduleOutput) -> crate::report::Descriptors {
    let folds = output.folds.len().max(1) as f64;
    spec.features
        .iter()
        .enumerate()
        .map(|(fi, (name, f))| {
            let classes = f
                .classes
                .iter()
                .enumerate()
                .map(|(ci, c)| {
                    (
                        c.clone(),
                        output
                            .folds
                            .iter()
                            .map(|fo| fo.zero_shot[fi][ci])
                            .sum::<f64>()
                            / folds,
                    )
                })
                .collect();
            (name.clone(), classes)
        })
        .collect()
}
