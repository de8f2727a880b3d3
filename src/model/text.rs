//! CLIP text tower: token + position embeddings, the shared encoder with a causal mask and
//! per-fold LoRA, `ln_final`, the feature at the end token (the position of the largest id,
//! as CLIP's `argmax`), then `text_projection` ([width, embed], applied as x @ W).
//!
//! Because attention is causal, the end-token feature depends only on the tokens up to it:
//! the batch is cut to the longest prompt's end token + 1, which gives the same numbers as
//! the full context for a fraction of the work.

use super::config::ModelConfig;
use super::encoder::{Encoder, EncoderConfig, LayerNorm};
use super::vb::Vb;
use candle_core::{Device, Module, Result, Tensor};

/// The text tower.
#[derive(Debug, Clone)]
pub struct TextTower {
    token_embedding: Tensor,
    positional_embedding: Tensor,
    encoder: Encoder,
    ln_final: LayerNorm,
    text_projection: Tensor,
    vocab: usize,
    context: usize,
    width: usize,
    folds: usize,
}

impl TextTower {
    /// Reads the tower under `vb` (the checkpoints' top level: `token_embedding`,
    /// `transformer`, ...) with every fold of the store's LoRA.
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        let width = cfg.text_width;
        Ok(Self {
            token_embedding: vb.pp("token_embedding").get((cfg.vocab, width), "weight")?,
            positional_embedding: vb.get((cfg.context, width), "positional_embedding")?,
            encoder: Encoder::new(&EncoderConfig::text(cfg), vb.pp("transformer"))?,
            ln_final: LayerNorm::new(width, vb.pp("ln_final"))?,
            text_projection: vb.get((width, cfg.embed), "text_projection")?,
            vocab: cfg.vocab,
            context: cfg.context,
            width,
            folds: vb.n_folds(),
        })
    }

    /// Token ids, each row `context` long -> [folds * rows, embed], fold-major.
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let rows = ids.len();
        let mut ends = Vec::with_capacity(rows);
        for (i, row) in ids.iter().enumerate() {
            if row.len() != self.context {
                candle_core::bail!(
                    "prompt {i}: {} tokens, expected {}",
                    row.len(),
                    self.context
                );
            }
            if let Some(bad) = row.iter().find(|&&t| t as usize >= self.vocab) {
                candle_core::bail!(
                    "prompt {i}: token {bad} outside the vocabulary of {}",
                    self.vocab
                );
            }
            let max = row.iter().copied().max().unwrap_or(0);
            ends.push(row.iter().position(|&t| t == max).unwrap_or(0));
        }
        let len = ends.iter().copied().max().unwrap_or(0) + 1;
        let flat: Vec<u32> = ids.iter().flat_map(|r| r[..len].iter().copied()).collect();
        let flat = Tensor::from_vec(flat, rows * len, device)?;
        let xs = self
            .token_embedding
            .index_select(&flat, 0)?
            .reshape((rows, len, self.width))?;
        let xs = xs.broadcast_add(&self.positional_embedding.narrow(0, 0, len)?)?;
        let xs = xs.repeat((self.folds, 1, 1))?;
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (len, len), device)?;
        let xs = self.encoder.forward(&xs, Some(&mask))?;
        let picks: Vec<u32> = (0..self.folds)
            .flat_map(|f| {
                ends.iter()
                    .enumerate()
                    .map(move |(p, &e)| ((f * rows + p) * len + e) as u32)
            })
            .collect();
        let picks = Tensor::from_vec(picks, self.folds * rows, device)?;
        let xs = xs
            .reshape((self.folds * rows * len, self.width))?
            .index_select(&picks, 0)?;
        self.ln_final.forward(&xs)?.matmul(&self.text_projection)
    }
}
