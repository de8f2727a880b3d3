//! One fold's whole model, as fine-tuning trains it: the towers over a one-fold store plus
//! that fold's [`FoldHeads`] (with the text classifier and the logit scale as a tensor).
//!
//! There is one assembly of the components, [`super::NoduleModel::assemble`]: the vision
//! tower (batched over the store's folds) and one [`FoldHeads`] per fold. Scoring's
//! [`super::NoduleModel`] is that assembly over all folds (the text tower runs once at load
//! to cache the prompt embeddings); a `FoldModel` is it over a one-fold store, with the text
//! tower kept for the contrastive loss. Both are built by `new(cfg, vb)` from a [`Vb`].
//!
//! Training builds it at each step from a store whose trained tensors are candle `Var`s
//! (with [`super::weights::Weights::with_dropout`] for the step's dropout masks) and runs its
//! forwards inside [`super::kernels::differentiable`], so the fused CPU kernels, which have
//! no backward, are off there.
//! Shapes: pixels `[nodules * 9, 3, image, image]` (plane order of [`crate::nodule::Planes01`]),
//! token ids `[reports][context]`, embeddings `[nodules or reports, out_dim]`.

use super::config::ModelConfig;
use super::heads::{l2_normalize, FoldHeads};
use super::text::TextTower;
use super::vb::Vb;
use super::vision::VisionTower;
use candle_core::{Module, Result, Tensor};

/// One fold as one trainable model.
pub struct FoldModel {
    /// The vision tower (the fold's LoRA).
    pub vision: VisionTower,
    /// The text tower (the fold's LoRA).
    pub text: TextTower,
    /// The fold's heads.
    pub heads: FoldHeads,
}

impl FoldModel {
    /// Builds the model of a store holding exactly one fold.
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        if vb.n_folds() != 1 {
            candle_core::bail!("a fold model needs one fold, got {}", vb.n_folds());
        }
        let (vision, mut heads) = super::NoduleModel::assemble(cfg, &vb)?;
        Ok(Self {
            vision,
            text: TextTower::new(cfg, vb)?,
            heads: heads.remove(0),
        })
    }

    /// Pixels `[nodules * 9, 3, image, image]` -> unit image embeddings `[nodules, out_dim]`.
    pub fn image(&self, pixels: &Tensor) -> Result<Tensor> {
        let (pooled, _attention) = self.heads.mil.forward(&self.vision.forward(pixels)?)?;
        l2_normalize(&pooled)
    }

    /// Token ids -> unit text embeddings `[reports, out_dim]`.
    pub fn text(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let device = self.heads.logit_scale.device();
        let pooled = self.text.forward(ids, device)?;
        l2_normalize(&self.heads.text_head.forward(&pooled)?)
    }

    /// Image logits `[nodules, 2]` of unit image embeddings.
    pub fn classify_image(&self, unit: &Tensor) -> Result<Tensor> {
        self.heads.classifier_image.forward(unit)
    }

    /// Text logits `[reports, 2]` of unit text embeddings.
    pub fn classify_text(&self, unit: &Tensor) -> Result<Tensor> {
        match &self.heads.classifier_text {
            Some(c) => c.forward(unit),
            None => candle_core::bail!("the store has no `classifier_text`"),
        }
    }

    /// exp(clamp(logit_scale, 0, ln 100)), [1].
    pub fn scale(&self) -> Result<Tensor> {
        self.heads.scale()
    }
}
