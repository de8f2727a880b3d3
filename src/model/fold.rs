//! One fold's whole model, as fine-tuning trains it: the scoring components ([`VisionTower`],
//! [`TextTower`], [`Mil`], [`ProjectionHead`], [`Linear`] classifiers) built from one
//! fold's [`Weights`] plus the text classifier (`classifier_text.*`, trained, unused at
//! inference) and the logit scale as a tensor.
//!
//! Training builds it at each step from weights whose trained tensors are candle `Var`s
//! (with [`Weights::with_dropout`] for the step's dropout masks) and runs its forwards inside
//! [`super::kernels::differentiable`], so the fused CPU kernels, which have no backward, are
//! off there; scoring builds the same components into [`super::NoduleModel`].
//! Shapes: pixels `[nodules * 9, 3, image, image]` (plane order of [`crate::nodule::Planes01`]),
//! token ids `[reports][context]`, embeddings `[nodules or reports, out_dim]`.

use super::config::ModelConfig;
use super::heads::{l2_normalize, ProjectionHead};
use super::linear::Linear;
use super::mil::Mil;
use super::text::TextTower;
use super::vision::VisionTower;
use super::weights::Weights;
use candle_core::{Module, Result, Tensor};

/// Upper clamp of the log logit scale (scale <= 100).
pub const LOGIT_SCALE_MAX: f64 = 4.6052;

/// Fold 0 of `Weights` as one trainable model.
pub struct FoldModel {
    /// The vision tower (one fold's LoRA).
    pub vision: VisionTower,
    /// The text tower (one fold's LoRA).
    pub text: TextTower,
    /// MIL pooling over the nine planes.
    pub mil: Mil,
    /// The text projection head.
    pub text_head: ProjectionHead,
    /// Image classifier on the L2-normalised MIL embedding.
    pub classifier_image: Linear,
    /// Text classifier on the L2-normalised text embedding.
    pub classifier_text: Linear,
    /// Log logit scale, [1].
    pub logit_scale: Tensor,
}

impl FoldModel {
    /// Builds the model of fold 0 of `w` (which must hold exactly one fold).
    pub fn new(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        if w.n_folds() != 1 {
            candle_core::bail!("a fold model needs one fold, got {}", w.n_folds());
        }
        Ok(Self {
            vision: VisionTower::new(cfg, w)?,
            text: TextTower::new(cfg, w)?,
            mil: Mil::new(w, 0)?,
            text_head: ProjectionHead::new(w, 0)?,
            classifier_image: w.fold_linear(0, "classifier_image")?,
            classifier_text: w.fold_linear(0, "classifier_text")?,
            logit_scale: w.fold(0, "logit_scale")?.reshape(1)?,
        })
    }

    /// Pixels `[nodules * 9, 3, image, image]` -> unit image embeddings `[nodules, out_dim]`.
    pub fn image(&self, pixels: &Tensor) -> Result<Tensor> {
        let (pooled, _attention) = self.mil.forward(&self.vision.forward(pixels)?)?;
        l2_normalize(&pooled)
    }

    /// Token ids -> unit text embeddings `[reports, out_dim]`.
    pub fn text(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let device = self.logit_scale.device();
        l2_normalize(&self.text_head.forward(&self.text.forward(ids, device)?)?)
    }

    /// exp(clamp(logit_scale, 0, ln 100)), [1].
    pub fn scale(&self) -> Result<Tensor> {
        self.logit_scale.clamp(0.0, LOGIT_SCALE_MAX)?.exp()
    }
}
