//! Per-fold heads: the MIL pooling, the image classifier (Linear out_dim -> 2 on the
//! L2-normalised embedding), the text projection head
//! (`LayerNorm(p + fc(GELU_erf(p)))`, `p = projection(x)`) and the zero-shot logit scale.

use super::encoder::LayerNorm;
use super::linear::{Dropout, Linear};
use super::mil::Mil;
use super::weights::Weights;
use candle_core::{DType, Module, Result, Tensor, D};

/// Dropout inside the text projection head in training (on `fc`'s output).
pub const HEAD_DROPOUT: f64 = 0.1;

/// The text projection head (`semantic_projection.*`).
#[derive(Debug, Clone)]
pub struct ProjectionHead {
    projection: Linear,
    fc: Linear,
    layer_norm: LayerNorm,
    dropout: Option<Dropout>,
}

impl ProjectionHead {
    /// Reads fold `k`'s `semantic_projection.{projection, fc, layer_norm}`.
    pub fn new(w: &Weights, k: usize) -> Result<Self> {
        Ok(Self {
            projection: w.fold_linear(k, "semantic_projection.projection")?,
            fc: w.fold_linear(k, "semantic_projection.fc")?,
            layer_norm: LayerNorm::from_parts(
                w.fold(k, "semantic_projection.layer_norm.weight")?,
                w.fold(k, "semantic_projection.layer_norm.bias")?,
            ),
            dropout: w.dropout(HEAD_DROPOUT),
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

/// Everything fold `k` owns besides its LoRA factors.
#[derive(Debug, Clone)]
pub struct FoldHeads {
    /// MIL pooling over planes.
    pub mil: Mil,
    /// Image classifier (`classifier_image`), f64, applied to the L2-normalised embedding.
    pub classifier: Linear,
    /// Text projection head.
    pub text_head: ProjectionHead,
    /// Zero-shot logit scale, log space.
    pub logit_scale: f64,
}

impl FoldHeads {
    /// Reads fold `k`'s heads.
    pub fn new(w: &Weights, k: usize) -> Result<Self> {
        let logit_scale = w
            .fold(k, "logit_scale")?
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        Ok(Self {
            mil: Mil::new(w, k)?,
            classifier: Linear::new(
                w.fold(k, "classifier_image.weight")?.to_dtype(DType::F64)?,
                Some(w.fold(k, "classifier_image.bias")?.to_dtype(DType::F64)?),
            )?,
            text_head: ProjectionHead::new(w, k)?,
            logit_scale: logit_scale[0],
        })
    }
}

/// Rows divided by their L2 norm (last axis).
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    xs.broadcast_div(&xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}
