//! Tower sizes and LoRA settings of a nodule model, read from a checkpoint folder's
//! `config.json` or taken from the ViT-B/32 preset of the released model.
//!
//! Widths are channel counts, `patch` and `image` are pixels, `context` is tokens.

use serde::{Deserialize, Serialize};

/// How the q/k/v weights of a checkpoint set are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraLayout {
    /// `weight` = W0 + s B A (a model saved in eval mode, as released).
    Merged,
    /// `weight` = W0, the frozen base.
    Unmerged,
}

/// Sizes of both towers and the heads, plus the LoRA rank and alpha.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vision transformer width.
    pub vision_width: usize,
    /// Vision transformer blocks.
    pub vision_layers: usize,
    /// Vision attention heads.
    pub vision_heads: usize,
    /// Patch side in pixels (conv kernel and stride).
    pub patch: usize,
    /// Input image side in pixels.
    pub image: usize,
    /// Joint embedding width (output of `proj` and `text_projection`).
    pub embed: usize,
    /// Text transformer width.
    pub text_width: usize,
    /// Text transformer blocks.
    pub text_layers: usize,
    /// Text attention heads.
    pub text_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Text context length in tokens.
    pub context: usize,
    /// Width of the MIL output and the text projection head.
    pub out_dim: usize,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA alpha; the scaling is alpha / sqrt(r).
    pub lora_alpha: f64,
    /// How q/k/v are stored when the folds cannot tell (one fold, or identical folds);
    /// absent means merged (the released checkpoints were saved in eval mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_layout: Option<LoraLayout>,
}

impl ModelConfig {
    /// The released model: OpenAI CLIP ViT-B/32 (vision 768 wide, 12 blocks, 12 heads, patch
    /// 32 at 224 px; text 512 wide, 12 blocks, 8 heads, vocabulary 49408, context 77; joint
    /// embedding 512) with MIL/head width 256 and LoRA alpha 1 at rank `lora_r`.
    pub fn vit_b32(lora_r: usize) -> Self {
        Self {
            vision_width: 768,
            vision_layers: 12,
            vision_heads: 12,
            patch: 32,
            image: 224,
            embed: 512,
            text_width: 512,
            text_layers: 12,
            text_heads: 8,
            vocab: 49408,
            context: 77,
            out_dim: 256,
            lora_r,
            lora_alpha: 1.0,
            lora_layout: None,
        }
    }

    /// The LoRA scaling s = alpha / sqrt(r).
    pub fn lora_scale(&self) -> f64 {
        self.lora_alpha / (self.lora_r as f64).sqrt()
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image / self.patch
    }

    /// Checks that the sizes are usable; the error names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vision_width", self.vision_width),
            ("vision_layers", self.vision_layers),
            ("vision_heads", self.vision_heads),
            ("patch", self.patch),
            ("image", self.image),
            ("embed", self.embed),
            ("text_width", self.text_width),
            ("text_layers", self.text_layers),
            ("text_heads", self.text_heads),
            ("vocab", self.vocab),
            ("context", self.context),
            ("out_dim", self.out_dim),
            ("lora_r", self.lora_r),
        ];
        for (key, v) in positive {
            if v == 0 || v > 1 << 20 {
                return Err(format!("`{key}` = {v} is out of range"));
            }
        }
        if self.vision_width % self.vision_heads != 0 {
            return Err(format!(
                "`vision_heads` = {} does not divide `vision_width` = {}",
                self.vision_heads, self.vision_width
            ));
        }
        if self.text_width % self.text_heads != 0 {
            return Err(format!(
                "`text_heads` = {} does not divide `text_width` = {}",
                self.text_heads, self.text_width
            ));
        }
        if self.image % self.patch != 0 {
            return Err(format!(
                "`patch` = {} does not divide `image` = {}",
                self.patch, self.image
            ));
        }
        if self.image != crate::nodule::PLANE_SIDE {
            return Err(format!(
                "`image` = {} but planes are {} px",
                self.image,
                crate::nodule::PLANE_SIDE
            ));
        }
        if self.context < 3 {
            return Err(format!("`context` = {} is too short", self.context));
        }
        if self.out_dim < 2 {
            return Err(format!("`out_dim` = {} is too small", self.out_dim));
        }
        if !(self.lora_alpha.is_finite()) {
            return Err("`lora_alpha` is not finite".into());
        }
        Ok(())
    }
}
