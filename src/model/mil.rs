//! Attention-MIL pooling over the nine planes of a nodule (Ilse et al., non-gated):
//! `h = ReLU(projector.0(x))`, `a = softmax over planes of attention.2(tanh(attention.0(h)))`,
//! output `sum_i a_i h_i`. One per fold (its `image_projection.*`).

use super::config::ModelConfig;
use super::linear::Linear;
use super::vb::Vb;
use crate::nodule::N_PLANES;
use candle_core::{Module, Result, Tensor};

/// One fold's MIL pooling (`image_projection.*`).
#[derive(Debug, Clone)]
pub struct Mil {
    projector: Linear,
    attention_hidden: Linear,
    attention_out: Linear,
}

impl Mil {
    /// Reads `projector.0` (embed -> out_dim), `attention.0` (out_dim -> out_dim / 2) and
    /// `attention.2` (out_dim / 2 -> 1) under `vb` (a fold's `image_projection`).
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        let (e, o) = (cfg.embed, cfg.out_dim);
        let attention = vb.pp("attention");
        Ok(Self {
            projector: Linear::new((e, o), vb.pp("projector").pp(0))?,
            attention_hidden: Linear::new((o, o / 2), attention.pp(0))?,
            attention_out: Linear::new((o / 2, 1), attention.pp(2))?,
        })
    }

    /// `features` [nodules * 9, embed] -> (embedding [nodules, out_dim], attention [nodules, 9]).
    pub fn forward(&self, features: &Tensor) -> Result<(Tensor, Tensor)> {
        let (rows, _embed) = features.dims2()?;
        let nodules = rows / N_PLANES;
        let h = self.projector.forward(features)?.relu()?;
        let scores = self
            .attention_out
            .forward(&self.attention_hidden.forward(&h)?.tanh()?)?;
        let att = super::kernels::softmax_last(&scores.reshape((nodules, N_PLANES))?)?;
        let h = h.reshape((nodules, N_PLANES, self.projector.out_dim()))?;
        let pooled = att.unsqueeze(1)?.matmul(&h)?.squeeze(1)?;
        Ok((pooled, att))
    }
}
