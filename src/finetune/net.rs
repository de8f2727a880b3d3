//! The trainable CLIP nodule model of one fold, written on plain differentiable candle ops
//! (matmul, broadcast arithmetic, softmax, index_select) so that `Tensor::backward` reaches
//! every trainable tensor; the inference model in [`crate::model`] is not used for training,
//! so fused inference kernels there never need a backward.
//!
//! Every op here has a backward: candle-nn's fused softmax has none and silently cuts the
//! graph, so [`softmax_last`] is written from elementary ops.
//!
//! Tensors are keyed exactly as the checkpoints ([`crate::model::checkpoint::specs`]), plus
//! `classifier_text.{weight,bias}` (trained, unused at inference). Everything is f32.
//! Activations: vision `[rows, tokens, width]` with rows = nodules x 9 planes (plane order of
//! [`crate::nodule::Planes01`]); text `[reports, tokens, width]`, causal.
//! LoRA (training form): `y = x W0^T + b + s (drop(x) A^T) B^T`, s = alpha / sqrt(r), dropout
//! on the LoRA input only, in training only; masks are drawn from the caller's SplitMix64 so
//! a seed fixes every random number of a run.

use crate::model::checkpoint::{specs, Role};
use crate::model::config::ModelConfig;
use crate::nodule::N_PLANES;
use crate::rng::SplitMix64;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use std::collections::BTreeMap;

/// Which tensors are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tuning {
    /// LoRA factors on q/k/v of both towers plus the heads and the logit scale.
    Lora,
    /// Heads and the logit scale only.
    Probe,
    /// Everything except the LoRA factors (B stays 0): training from scratch.
    Full,
}

impl std::str::FromStr for Tuning {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "lora" => Ok(Self::Lora),
            "probe" => Ok(Self::Probe),
            "full" => Ok(Self::Full),
            _ => Err(format!("--tuning must be lora, probe or full, got `{s}`")),
        }
    }
}

/// Gain of the patch embedding's initial std over (3 patch^2)^-1/2. `ln_pre` normalises every
/// token: with unit-scale content a uniform patch of any density maps to one direction
/// (lung at -850 HU and ground glass at -620 HU become the same token), so density is lost
/// before the first block. At 0.1 the content is small beside the positional embedding and
/// passes `ln_pre` nearly linearly. Measured (1,000 synthetic crops, image only, lr 2e-4,
/// heads x20): validation AUROC 0.756 after 2 epochs and 0.775 after 4, against 0.725 and
/// 0.725 at gain 1 and 0.727 after 2 at gain 0.03.
pub const PATCH_EMBED_GAIN: f64 = 0.1;

/// Upper clamp of the log logit scale (scale <= 100).
pub const LOGIT_SCALE_MAX: f64 = 4.6052;
/// Dropout on the LoRA input branch.
pub const LORA_DROPOUT: f64 = 0.25;
/// Dropout inside the text projection head.
pub const HEAD_DROPOUT: f64 = 0.1;
/// LayerNorm eps.
const EPS: f64 = 1e-5;

/// Every key of one fold's model with its shape and role, plus the text classifier.
pub fn all_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Role)> {
    let mut v: Vec<_> = specs(cfg)
        .into_iter()
        .map(|s| (s.key, s.shape, s.role))
        .collect();
    v.push((
        "classifier_text.weight".into(),
        vec![2, cfg.out_dim],
        Role::Fold,
    ));
    v.push(("classifier_text.bias".into(), vec![2], Role::Fold));
    v
}

/// True when `key` is trained under `tuning`.
pub fn is_trainable(key: &str, role: Role, tuning: Tuning) -> bool {
    let lora = key.ends_with("w_lora_A") || key.ends_with("w_lora_B");
    match tuning {
        Tuning::Lora => role == Role::Fold,
        Tuning::Probe => role == Role::Fold && !lora,
        Tuning::Full => !lora,
    }
}

/// True for the heads: MIL image projection, classifiers, text projection head, logit scale.
pub fn is_head(key: &str) -> bool {
    key == "logit_scale"
        || key.starts_with("image_projection.")
        || key.starts_with("semantic_projection.")
        || key.starts_with("classifier_")
}

/// Random initial tensors for every key: CLIP's scales in the transformer blocks (q/k/v
/// std width^-1/2, attention output and MLP output width^-1/2 (2 layers)^-1/2, MLP input
/// (2 width)^-1/2), so that a fresh tower already mixes its tokens (with 0.02 everywhere a
/// tiny tower's class token hardly depends on the image and training from scratch stalls);
/// patch embedding std [`PATCH_EMBED_GAIN`] (3 patch^2)^-1/2; token embedding 0.02; positional
/// embedding width^-1/2 in the vision tower (CLIP's; at 0.01 the tokens hardly know where
/// they are, attention stays uniform and the class token learns little beyond the mean
/// intensity) and 0.01 in the text tower; LoRA A Kaiming-uniform, B zero; heads
/// Kaiming-normal; LayerNorm 1/0; logit scale ln(1/0.03).
pub fn random_init(cfg: &ModelConfig, rng: &mut SplitMix64) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (key, shape, _) in all_specs(cfg) {
        let n: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap_or(&1) as f64;
        let normal = |rng: &mut SplitMix64, std: f64| -> Vec<f32> {
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        };
        let values: Vec<f32> = if key == "logit_scale" {
            vec![(1.0f64 / 0.03).ln() as f32]
        } else if key.ends_with("w_lora_B") || key.ends_with(".bias") {
            vec![0.0; n]
        } else if key.ends_with("w_lora_A") {
            let bound = 1.0 / fan_in.sqrt();
            (0..n).map(|_| rng.range(-bound, bound) as f32).collect()
        } else if key.contains("ln_") || key.contains("layer_norm") {
            vec![1.0; n]
        } else if key.starts_with("image_projection")
            || key.starts_with("semantic_projection")
            || key.starts_with("classifier_")
        {
            normal(rng, (2.0 / fan_in).sqrt())
        } else if key.ends_with("class_embedding")
            || key == "vision_model.proj"
            || key == "text_projection"
        {
            normal(rng, 1.0 / (shape[0] as f64).sqrt())
        } else if key == "vision_model.positional_embedding" {
            normal(rng, 1.0 / (cfg.vision_width as f64).sqrt())
        } else if key.ends_with("positional_embedding") {
            normal(rng, 0.01)
        } else if let Some(std) = block_std(cfg, &key) {
            normal(rng, std)
        } else if key == "vision_model.conv1.weight" {
            normal(rng, PATCH_EMBED_GAIN / ((n / shape[0]) as f64).sqrt())
        } else {
            normal(rng, 0.02)
        };
        out.insert(key, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// CLIP's std of a transformer block matmul weight `key`, or None for other keys.
fn block_std(cfg: &ModelConfig, key: &str) -> Option<f64> {
    let (width, layers) = if key.starts_with("vision_model.transformer.") {
        (cfg.vision_width, cfg.vision_layers)
    } else if key.starts_with("transformer.") {
        (cfg.text_width, cfg.text_layers)
    } else {
        return None;
    };
    let w = (width as f64).powf(-0.5);
    if key.ends_with("_proj.weight")
        && key.contains(".attn.")
        && !key.ends_with(".attn.proj.weight")
    {
        Some(w)
    } else if key.ends_with(".attn.proj.weight") || key.ends_with(".mlp.c_proj.weight") {
        Some(w * (2.0 * layers as f64).powf(-0.5))
    } else if key.ends_with(".mlp.c_fc.weight") {
        Some((2.0 * width as f64).powf(-0.5))
    } else {
        None
    }
}

/// One fold's model: frozen tensors and trainable [`Var`]s under checkpoint keys.
pub struct Net {
    cfg: ModelConfig,
    tensors: BTreeMap<String, Tensor>,
    vars: BTreeMap<String, Var>,
}

/// Dropout masks and the training switch of one forward.
pub struct Mode<'a> {
    /// Training (dropout on) when set: the generator for the masks.
    pub rng: Option<&'a mut SplitMix64>,
}

impl Mode<'_> {
    /// Inference: no dropout.
    pub fn eval() -> Mode<'static> {
        Mode { rng: None }
    }

    /// `x` with dropout `p` applied (scaled by 1/(1-p)) in training; `x` otherwise.
    fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        let Some(rng) = self.rng.as_deref_mut() else {
            return Ok(x.clone());
        };
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.uniform() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
        x * mask
    }
}

impl Net {
    /// Builds the model from `values` (every key of [`all_specs`]); the keys trained under
    /// `tuning` become variables.
    pub fn new(
        cfg: &ModelConfig,
        values: &BTreeMap<String, Tensor>,
        tuning: Tuning,
    ) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        let mut vars = BTreeMap::new();
        for (key, shape, role) in all_specs(cfg) {
            let t = values
                .get(&key)
                .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{key}`")))?
                .to_dtype(DType::F32)?
                .reshape(shape)?;
            if is_trainable(&key, role, tuning) {
                let v = Var::from_tensor(&t)?;
                tensors.insert(key.clone(), v.as_tensor().clone());
                vars.insert(key, v);
            } else {
                tensors.insert(key, t.detach());
            }
        }
        Ok(Self {
            cfg: cfg.clone(),
            tensors,
            vars,
        })
    }

    /// The trainable variables, by key (sorted).
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Every tensor's current value, by key (detached copies).
    pub fn values(&self) -> Result<BTreeMap<String, Tensor>> {
        self.tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.detach().copy()?)))
            .collect()
    }

    /// The sizes.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn t(&self, key: &str) -> Result<&Tensor> {
        self.tensors
            .get(key)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{key}`")))
    }

    fn linear(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let w = self.t(&format!("{prefix}.weight"))?;
        let b = self.t(&format!("{prefix}.bias"))?;
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&1);
        let rows = x.elem_count() / in_dim.max(1);
        let y = x
            .reshape((rows, in_dim))?
            .matmul(&w.t()?)?
            .broadcast_add(b)?;
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = w.dim(0)?;
        y.reshape(out)
    }

    fn lora_linear(&self, x: &Tensor, prefix: &str, mode: &mut Mode) -> Result<Tensor> {
        let y = self.linear(x, prefix)?;
        let a = self.t(&format!("{prefix}.w_lora_A"))?;
        let b = self.t(&format!("{prefix}.w_lora_B"))?;
        let in_dim = x.dim(D::Minus1)?;
        let rows = x.elem_count() / in_dim;
        let xd = mode.dropout(x, LORA_DROPOUT)?.reshape((rows, in_dim))?;
        let low = xd.matmul(&a.t()?)?.matmul(&b.t()?)?;
        let low = (low * self.cfg.lora_scale())?.reshape(y.shape())?;
        y + low
    }

    fn layer_norm(&self, x: &Tensor, prefix: &str) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        c.broadcast_div(&(var + EPS)?.sqrt()?)?
            .broadcast_mul(self.t(&format!("{prefix}.weight"))?)?
            .broadcast_add(self.t(&format!("{prefix}.bias"))?)
    }

    fn attention(
        &self,
        x: &Tensor,
        prefix: &str,
        heads: usize,
        mask: Option<&Tensor>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / heads;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.lora_linear(x, &format!("{prefix}.q_proj"), mode)?)?;
        let k = split(self.lora_linear(x, &format!("{prefix}.k_proj"), mode)?)?;
        let v = split(self.lora_linear(x, &format!("{prefix}.v_proj"), mode)?)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let att = softmax_last(&scores)?;
        let y = att
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, d))?;
        self.linear(&y, &format!("{prefix}.proj"))
    }

    fn encoder(
        &self,
        mut x: Tensor,
        prefix: &str,
        layers: usize,
        heads: usize,
        mask: Option<&Tensor>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        for i in 0..layers {
            let p = format!("{prefix}.resblocks.{i}");
            let h = self.layer_norm(&x, &format!("{p}.ln_1"))?;
            x = (&x + self.attention(&h, &format!("{p}.attn"), heads, mask, mode)?)?;
            let h = self.linear(
                &self.layer_norm(&x, &format!("{p}.ln_2"))?,
                &format!("{p}.mlp.c_fc"),
            )?;
            let h = (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?;
            x = (&x + self.linear(&h, &format!("{p}.mlp.c_proj"))?)?;
        }
        Ok(x)
    }

    /// CLIP-normalised pixels `[rows, 3, image, image]` -> slice features `[rows, embed]`.
    pub fn vision(&self, pixels: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (n, c, h, _) = pixels.dims4()?;
        let (p, g, w) = (cfg.patch, h / cfg.patch, cfg.vision_width);
        let patches = pixels
            .reshape((n, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n * g * g, c * p * p))?;
        let conv = self
            .t("vision_model.conv1.weight")?
            .reshape((w, c * p * p))?;
        let tokens = patches.matmul(&conv.t()?)?.reshape((n, g * g, w))?;
        let cls = self
            .t("vision_model.class_embedding")?
            .reshape((1, 1, w))?
            .broadcast_as((n, 1, w))?;
        let x = Tensor::cat(&[&cls, &tokens], 1)?
            .broadcast_add(self.t("vision_model.positional_embedding")?)?;
        let x = self.layer_norm(&x, "vision_model.ln_pre")?;
        let x = self.encoder(
            x,
            "vision_model.transformer",
            cfg.vision_layers,
            cfg.vision_heads,
            None,
            mode,
        )?;
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        self.layer_norm(&cls, "vision_model.ln_post")?
            .matmul(self.t("vision_model.proj")?)
    }

    /// Slice features `[nodules * 9, embed]` -> MIL embedding `[nodules, out_dim]`.
    pub fn mil(&self, features: &Tensor) -> Result<Tensor> {
        let rows = features.dim(0)?;
        let nodules = rows / N_PLANES;
        let h = self
            .linear(features, "image_projection.projector.0")?
            .relu()?;
        let s = self.linear(
            &self.linear(&h, "image_projection.attention.0")?.tanh()?,
            "image_projection.attention.2",
        )?;
        let att = softmax_last(&s.reshape((nodules, N_PLANES))?)?;
        let h = h.reshape((nodules, N_PLANES, self.cfg.out_dim))?;
        att.unsqueeze(1)?.matmul(&h)?.squeeze(1)
    }

    /// Token ids `[reports, context]` -> text features `[reports, embed]` (end token).
    pub fn text(&self, ids: &[Vec<u32>], mode: &mut Mode) -> Result<Tensor> {
        let cfg = &self.cfg;
        let dev = Device::Cpu;
        let rows = ids.len();
        let ends: Vec<usize> = ids
            .iter()
            .map(|r| {
                let max = r.iter().copied().max().unwrap_or(0);
                r.iter().position(|&t| t == max).unwrap_or(0)
            })
            .collect();
        let len = ends.iter().copied().max().unwrap_or(0) + 1;
        let flat: Vec<u32> = ids.iter().flat_map(|r| r[..len].iter().copied()).collect();
        let flat = Tensor::from_vec(flat, rows * len, &dev)?;
        let x = self
            .t("token_embedding.weight")?
            .index_select(&flat, 0)?
            .reshape((rows, len, cfg.text_width))?
            .broadcast_add(&self.t("positional_embedding")?.narrow(0, 0, len)?)?;
        let mask: Vec<f32> = (0..len)
            .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (len, len), &dev)?;
        let x = self.encoder(
            x,
            "transformer",
            cfg.text_layers,
            cfg.text_heads,
            Some(&mask),
            mode,
        )?;
        let picks: Vec<u32> = ends
            .iter()
            .enumerate()
            .map(|(i, &e)| (i * len + e) as u32)
            .collect();
        let x = x
            .reshape((rows * len, cfg.text_width))?
            .index_select(&Tensor::from_vec(picks, rows, &dev)?, 0)?;
        self.layer_norm(&x, "ln_final")?
            .matmul(self.t("text_projection")?)
    }

    /// Text features `[reports, embed]` -> projection head output `[reports, out_dim]`.
    pub fn text_head(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let p = self.linear(x, "semantic_projection.projection")?;
        let h = self.linear(&p.gelu_erf()?, "semantic_projection.fc")?;
        let h = mode.dropout(&h, HEAD_DROPOUT)?;
        self.layer_norm(&(&p + h)?, "semantic_projection.layer_norm")
    }

    /// Two-class logits of a classifier (`classifier_image` / `classifier_text`) on the
    /// L2-normalised embedding.
    pub fn classify(&self, unit: &Tensor, which: &str) -> Result<Tensor> {
        self.linear(unit, which)
    }

    /// Data-dependent initialisation for training from random weights: rescales the first
    /// layer of the image projection (on the slice features of `pixels`) and of the text
    /// projection head (on the text features of `ids`) so that each unit's pre-activation has
    /// mean 0 and variance 1 over these inputs. A fresh tower's features are dominated by a
    /// part common to every input (measured: between-nodule variance ~1% of the squared
    /// mean of the L2-normalised image embedding), so the classifier and the contrastive loss
    /// start with near-identical embeddings and learn very slowly; centred, the embeddings
    /// differ between nodules from the first step. Only variables are changed.
    pub fn standardise_heads(&self, pixels: &Tensor, ids: Option<&[Vec<u32>]>) -> Result<()> {
        let feats = self.vision(pixels, &mut Mode::eval())?;
        self.standardise("image_projection.projector.0", &feats)?;
        if let Some(ids) = ids {
            let text = self.text(ids, &mut Mode::eval())?;
            self.standardise("semantic_projection.projection", &text)?;
        }
        Ok(())
    }

    /// Sets linear layer `prefix` (when trainable) to `(x W^T + b - mean) / std`.
    fn standardise(&self, prefix: &str, x: &Tensor) -> Result<()> {
        let (wk, bk) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
        let (Some(w), Some(b)) = (self.vars.get(&wk), self.vars.get(&bk)) else {
            return Ok(());
        };
        let z = self.linear(&x.detach(), prefix)?.detach();
        let mean = z.mean(0)?;
        let std = (z.broadcast_sub(&mean)?.sqr()?.mean(0)? + 1e-6)?.sqrt()?;
        let new_w = w.as_tensor().detach().broadcast_div(&std.unsqueeze(1)?)?;
        let new_b = (b.as_tensor().detach() - &mean)?.div(&std)?;
        w.set(&new_w)?;
        b.set(&new_b)
    }

    /// exp(clamp(logit_scale, 0, ln 100)).
    pub fn scale(&self) -> Result<Tensor> {
        self.t("logit_scale")?
            .reshape(1)?
            .clamp(0.0, LOGIT_SCALE_MAX)?
            .exp()
    }
}

/// Softmax over the last axis from differentiable ops. candle-nn's `softmax_last_dim` is a
/// fused kernel without a backward (it cuts the graph: nothing before it would get a
/// gradient, so attention queries and keys, their LoRA factors and the MIL attention
/// would never train).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rows divided by their L2 norm.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny model config with `layers` vision blocks.
    fn tiny_config(layers: usize) -> ModelConfig {
        serde_json::from_str(&format!(
            r#"{{"vision_width": 16, "vision_layers": {layers}, "vision_heads": 2, "patch": 56,
            "image": 224, "embed": 8, "text_width": 8, "text_layers": 1, "text_heads": 2,
            "vocab": 49408, "context": 16, "out_dim": 8, "lora_r": 2, "lora_alpha": 1.0}}"#
        ))
        .unwrap()
    }

    /// Every trainable tensor of a LoRA fold gets a non-zero gradient from the image loss
    /// through attention (queries, keys, their LoRA factors) and the MIL attention.
    #[test]
    fn gradients_reach_attention_lora_and_mil() {
        let cfg = tiny_config(1);
        let mut rng = SplitMix64::new(3);
        let mut values = random_init(&cfg, &mut rng).unwrap();
        // Non-zero B so that A gets a gradient too.
        for (k, v) in values.iter_mut() {
            if k.ends_with("w_lora_B") {
                *v = (v.ones_like().unwrap() * 0.1).unwrap();
            }
        }
        let net = Net::new(&cfg, &values, Tuning::Lora).unwrap();
        let n = 2 * N_PLANES * 3 * 224 * 224;
        let pixels: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let pixels = Tensor::from_vec(pixels, (2 * N_PLANES, 3, 224, 224), &Device::Cpu).unwrap();
        let feats = net.vision(&pixels, &mut Mode::eval()).unwrap();
        let unit = l2_normalize(&net.mil(&feats).unwrap()).unwrap();
        let loss = net
            .classify(&unit, "classifier_image")
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        for key in [
            "vision_model.transformer.resblocks.0.attn.q_proj.w_lora_A",
            "vision_model.transformer.resblocks.0.attn.k_proj.w_lora_B",
            "vision_model.transformer.resblocks.0.attn.v_proj.w_lora_B",
            "image_projection.attention.0.weight",
        ] {
            let g = grads.get(net.vars()[key].as_tensor()).expect(key);
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{key}: zero gradient");
        }
    }

    /// The backward of the whole image path (patch embedding, attention, QuickGELU MLP,
    /// LayerNorms, MIL, L2 norm, classifier, weighted CE) equals central finite differences
    /// on sampled entries of every trained tensor: a wrong backward would train slowly or
    /// not at all without any error.
    #[test]
    fn image_loss_gradients_equal_finite_differences() {
        let cfg = tiny_config(2);
        let mut rng = SplitMix64::new(5);
        let values = random_init(&cfg, &mut rng).unwrap();
        let net = Net::new(&cfg, &values, Tuning::Full).unwrap();
        let n = 2 * N_PLANES * 3 * 224 * 224;
        let pixels: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let pixels = Tensor::from_vec(pixels, (2 * N_PLANES, 3, 224, 224), &Device::Cpu).unwrap();
        net.standardise_heads(&pixels, None).unwrap();
        let labels = [true, false];
        let loss = || {
            let feats = net.vision(&pixels, &mut Mode::eval()).unwrap();
            let unit = l2_normalize(&net.mil(&feats).unwrap()).unwrap();
            let logits = net.classify(&unit, "classifier_image").unwrap();
            crate::finetune::losses::weighted_ce(&logits, &labels, [0.5, 0.5]).unwrap()
        };
        let grads = loss().backward().unwrap();
        let mut checked = 0;
        for (key, var) in net.vars() {
            if key.contains("lora")
                || !(key.starts_with("vision")
                    || key.starts_with("image")
                    || key.starts_with("classifier_image"))
            {
                continue;
            }
            let g = grads
                .get(var.as_tensor())
                .expect(key)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let orig = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // The entry with the largest gradient (a tiny one would be all rounding noise).
            let (j, &gj) = g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let eps = 1e-4f32 * orig[j].abs().max(1.0);
            let at = |x: f32| {
                let mut v = orig.clone();
                v[j] = x;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss().to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(orig[j] + eps) - at(orig[j] - eps)) / (2.0 * eps as f64);
            at(orig[j]);
            // Relative 10% (the MIL ReLU has kinks within eps), or absolute 2e-3 (f32 rounding
            // of the loss over 2 eps).
            let err = (fd - gj as f64).abs();
            assert!(
                err < 0.1 * gj.abs() as f64 + 2e-3,
                "{key}[{j}]: backward {gj} vs finite difference {fd}"
            );
            checked += 1;
        }
        assert!(checked >= 20, "checked {checked} tensors");
    }
}
