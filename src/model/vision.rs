//! CLIP vision tower (ViT): patch embedding (a stride-`patch` conv without bias, computed as a
//! matmul over flattened patches), class token, learned positions, `ln_pre`, the shared
//! encoder with per-fold LoRA, `ln_post` on the class token, then `proj` ([width, embed],
//! applied as x @ proj).
//!
//! Input pixels `[n, 3, image, image]` (CLIP-normalised RGB); output `[folds * n, embed]`,
//! fold-major. Everything before the first block is fold-independent and computed once.
//! The tower may live on another device or dtype than the CPU's f32 ([`VisionTower::placed`]):
//! pixels are cast to the tower's dtype on the way in and the output is f32.

use super::config::ModelConfig;
use super::encoder::{Encoder, EncoderConfig, LayerNorm};
use super::profile::timed;
use super::vb::Vb;
use crate::nodule::{Planes01, N_PLANES, PLANE_SIDE};
use candle_core::{DType, Device, Module, Result, Tensor};

/// CLIP's RGB normalisation mean.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's RGB normalisation standard deviation (digits as published; f32 rounds them).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// The vision tower.
#[derive(Debug, Clone)]
pub struct VisionTower {
    /// conv1 weight flattened to [width, 3 * patch * patch].
    patch_weight: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    encoder: Encoder,
    ln_post: LayerNorm,
    proj: Tensor,
    patch: usize,
    width: usize,
    folds: usize,
}

impl VisionTower {
    /// Reads the tower under `vb` (the checkpoints' `vision_model`) with every fold of the
    /// store's LoRA.
    pub fn new(cfg: &ModelConfig, vb: Vb) -> Result<Self> {
        let (width, p, g) = (cfg.vision_width, cfg.patch, cfg.grid());
        let conv = vb.pp("conv1").get((width, 3, p, p), "weight")?;
        Ok(Self {
            patch_weight: conv.reshape((width, 3 * p * p))?,
            class_embedding: vb.get(width, "class_embedding")?.reshape((1, 1, width))?,
            positional_embedding: vb.get((g * g + 1, width), "positional_embedding")?,
            ln_pre: LayerNorm::new(width, vb.pp("ln_pre"))?,
            encoder: Encoder::new(&EncoderConfig::vision(cfg), vb.pp("transformer"))?,
            ln_post: LayerNorm::new(width, vb.pp("ln_post"))?,
            proj: vb.get((width, cfg.embed), "proj")?,
            patch: p,
            width,
            folds: vb.n_folds(),
        })
    }

    /// Quantises the encoder's base weights to `dtype` (patch embedding, class token,
    /// positions, LayerNorms and `proj` stay f32: they are ~1% of the weights).
    pub fn quantize_encoder(&mut self, dtype: candle_core::quantized::GgmlDType) -> Result<()> {
        self.encoder = self.encoder.quantized(dtype)?;
        Ok(())
    }

    /// This tower on `device` with weights and activations in `dtype` (LayerNorm parameters
    /// stay f32); on the CPU the encoder's weights are packed for the GEMM of `dtype` (f32 or
    /// bf16, see [`super::linear::Linear::packed_for_cpu`]) and activations stay f32.
    pub fn placed(&self, device: &Device, dtype: DType) -> Result<Self> {
        // On the CPU activations stay f32 whatever the GEMM dtype (bf16 is the GEMMs' input).
        let act = if device.is_cpu() && dtype == DType::BF16 {
            DType::F32
        } else {
            dtype
        };
        let put = |t: &Tensor| t.to_dtype(act)?.to_device(device);
        Ok(Self {
            patch_weight: put(&self.patch_weight)?,
            class_embedding: put(&self.class_embedding)?,
            positional_embedding: put(&self.positional_embedding)?,
            ln_pre: self.ln_pre.placed(device)?,
            encoder: self.encoder.placed(device, dtype)?,
            ln_post: self.ln_post.placed(device)?,
            proj: put(&self.proj)?,
            patch: self.patch,
            width: self.width,
            folds: self.folds,
        })
    }

    /// `pixels` [n, 3, image, image] (f32, on the tower's device) -> slice features
    /// [folds * n, embed] in f32, fold-major.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let n = pixels.dim(0)?;
        let pixels = &pixels.to_dtype(self.patch_weight.dtype())?;
        let tokens = timed("patch_embed", || self.patch_embed(pixels))?;
        let xs = timed("embed", || {
            let cls = self.class_embedding.broadcast_as((n, 1, self.width))?;
            Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.positional_embedding)
        })?;
        let xs = self.ln_pre.forward(&xs)?;
        let xs = timed("repeat", || xs.repeat((self.folds, 1, 1)))?;
        let cls = self.encoder.forward_first_token(&xs)?;
        timed("head", || {
            self.ln_post
                .forward(&cls)?
                .matmul(&self.proj)?
                .to_dtype(DType::F32)
        })
    }

    fn patch_embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (n, c, h, _w) = pixels.dims4()?;
        let (p, g) = (self.patch, h / self.patch);
        let patches = pixels
            .reshape((n, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n * g * g, c * p * p))?;
        let tokens = patches
            .matmul(&self.patch_weight.t()?)?
            .reshape((n, g * g, self.width))?;
        Ok(tokens)
    }
}

/// Nine-plane nodules -> CLIP input [9 * nodules, 3, 224, 224]: grey repeated to RGB,
/// minus CLIP mean, over CLIP std (f32, as the reference computes it).
pub fn clip_pixels(nodules: &[&Planes01], device: &Device) -> Result<Tensor> {
    let plane = PLANE_SIDE * PLANE_SIDE;
    let mut out = Vec::with_capacity(nodules.len() * N_PLANES * 3 * plane);
    for planes in nodules {
        for grey in planes.0.chunks_exact(plane) {
            for ch in 0..3 {
                out.extend(grey.iter().map(|&v| (v - CLIP_MEAN[ch]) / CLIP_STD[ch]));
            }
        }
    }
    Tensor::from_vec(
        out,
        (nodules.len() * N_PLANES, 3, PLANE_SIDE, PLANE_SIDE),
        device,
    )
}
