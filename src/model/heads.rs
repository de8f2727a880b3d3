//! Per-fold heads: the MIL pooling, the image classifier (Linear out_dim -> 2 on the
//! L2-normalised embedding), the text classifier (trained, unused at inference: present only
//! in training's store), the text projection head (`LayerNorm(p + fc(GELU_erf(p)))`,
//! `p = projection(x)`) and the zero-shot logit scale.
//!
//! The logit scale is stored in log space and applied as `exp(clamp(logit_scale, 0, ln 100))`,
//! the published model's forward (clamped on every forward) in training and scoring alike.

use super::config::ModelConfig;
use super::encoder::LayerNorm;
use super::linear::{BaseWeight, Dropout, Linear};
use super::mil::Mil;
use super::vb::Vb;
use candle_core::{DType, Module, Result, Tensor, D};

/// Dropout inside the text projection head in training (on `fc`'s output).
pub const HEAD_DROPOUT: f64 = 0.1;

/// Upper clamp of the log logit scale (scale <= 100).
pub const LOGIT_SCALE_MAX: f64 = 4.6052;

/// The text projection head (`semantic_projection.*`).
#[derive(Debug, Clone)]
pub struct ProjectionHead {
    projection: Linear,
    fc: Linear,
    layer_norm: LayerNorm,
    dropout: Option<Dropout>,
}

impl ProjectionHead {
    /// Reads `projection` (embed -> out_dim), `fc` and `layer_norm` under `vb` (a fold's
    /// `semantic_projection`), with training's dropout when the store has it.
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        let (e, o) = (cfg.embed, cfg.out_dim);
        Ok(Self {
            projection: Linear::new((e, o), vb.pp("projection"))?,
            fc: Linear::new((o, o), vb.pp("fc"))?,
            layer_norm: LayerNorm::new(o, vb.pp("layer_norm"))?,
            dropout: vb.dropout(HEAD_DROPOUT),
        })
    }
}

impl Module for ProjectionHead {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let p = self.projection.forward(xs)?;
        let residual = &p;
        let h = self.fc.forward(&p.gelu_erf()?)?;
        let h = match &self.dropout {
            Some(d) => d.forward(&h)?,
            None => h,
        };
        self.layer_norm.forward(&(residual + h)?)
    }
}

/// Everything one fold owns besides its LoRA factors.
#[derive(Debug, Clone)]
pub struct FoldHeads {
    /// MIL pooling over planes (`image_projection`).
    pub mil: Mil,
    /// Image classifier (`classifier_image`) on the L2-normalised MIL embedding; it computes
    /// in its weights' dtype (scoring casts it to f64 with [`Self::in_f64`]).
    pub classifier_image: Linear,
    /// Text classifier (`classifier_text`), when the store has it (training's does).
    pub classifier_text: Option<Linear>,
    /// Text projection head (`semantic_projection`).
    pub text_head: ProjectionHead,
    /// Zero-shot logit scale, log space, [1].
    pub logit_scale: Tensor,
}

impl FoldHeads {
    /// Reads one fold's heads under `vb` (`vb.fold(k)`: the fold's own tensors).
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        let o = cfg.out_dim;
        let classifier_text = if vb.pp("classifier_text").contains_tensor("weight") {
            Some(Linear::new((o, 2), vb.pp("classifier_text"))?)
        } else {
            None
        };
        Ok(Self {
            mil: Mil::new(cfg, vb.pp("image_projection"))?,
            classifier_image: Linear::new((o, 2), vb.pp("classifier_image"))?,
            classifier_text,
            text_head: ProjectionHead::new(cfg, vb.pp("semantic_projection"))?,
            logit_scale: vb.get_unchecked("logit_scale")?.reshape(1)?,
        })
    }

    /// These heads with the image classifier in f64 (scoring's classifier and zero-shot
    /// compute in f64 from the MIL output on).
    pub fn in_f64(self) -> Result<Self> {
        let c = &self.classifier_image;
        let weight = match c.weight() {
            BaseWeight::Float(w) => w.to_dtype(DType::F64)?,
            other => other
                .to_f32(c.out_dim(), c.in_dim())?
                .to_dtype(DType::F64)?,
        };
        let bias = c.bias().map(|b| b.to_dtype(DType::F64)).transpose()?;
        Ok(Self {
            classifier_image: Linear::from_tensors(weight, bias)?,
            ..self
        })
    }

    /// exp(clamp(logit_scale, 0, ln 100)), [1], differentiable (training's form).
    pub fn scale(&self) -> Result<Tensor> {
        self.logit_scale.clamp(0.0, LOGIT_SCALE_MAX)?.exp()
    }

    /// The same scale as an f64 (scoring's form): clamp and exp in f64.
    pub fn scale_f64(&self) -> Result<f64> {
        Ok(self.log_scale()?.clamp(0.0, LOGIT_SCALE_MAX).exp())
    }

    /// The stored log logit scale (unclamped).
    pub fn log_scale(&self) -> Result<f64> {
        let v = self.logit_scale.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok(v[0])
    }
}

/// Rows divided by their L2 norm (last axis).
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    xs.broadcast_div(&xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}
