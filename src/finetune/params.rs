//! The trained parameters of one fold: which tensors `--tuning` trains ([`Tuning`]), their
//! random initialisation for training from scratch ([`random_init`]), and [`Params`], every
//! tensor of the fold under its checkpoint key with the trained ones as candle [`Var`]s.
//! The model itself is [`crate::model::fold::FoldModel`], built from these tensors at every
//! step (the same components scoring runs), so there is one definition of the model.
//!
//! Keys are those of the checkpoints ([`crate::model::checkpoint::specs`]) plus
//! `classifier_text.{weight,bias}` (trained, unused at inference). Tensors are f32 on the
//! training device.

use crate::model::checkpoint::{specs, Role};
use crate::model::config::ModelConfig;
use crate::model::fold::FoldModel;
use crate::model::vb::Vb;
use crate::model::weights::Weights;
use crate::rng::SplitMix64;
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::{BTreeMap, HashMap};

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

/// Every tensor of one fold under its checkpoint key; the trained ones are variables.
pub struct Params {
    cfg: ModelConfig,
    tensors: BTreeMap<String, Tensor>,
    fold_keys: Vec<String>,
    vars: BTreeMap<String, Var>,
    device: Device,
}

impl Params {
    /// From `values` (every key of [`all_specs`]) on `device`; the keys trained under
    /// `tuning` become variables.
    pub fn new(
        cfg: &ModelConfig,
        values: &BTreeMap<String, Tensor>,
        tuning: Tuning,
        device: &Device,
    ) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        let mut vars = BTreeMap::new();
        let mut fold_keys = Vec::new();
        for (key, shape, role) in all_specs(cfg) {
            let t = values
                .get(&key)
                .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{key}`")))?
                .to_dtype(DType::F32)?
                .reshape(shape)?
                .to_device(device)?;
            if role == Role::Fold {
                fold_keys.push(key.clone());
            }
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
            fold_keys,
            vars,
            device: device.clone(),
        })
    }

    /// The trainable variables, by key (sorted).
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Every tensor's current value, by key (detached copies on the CPU).
    pub fn values(&self) -> Result<BTreeMap<String, Tensor>> {
        self.tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.detach().to_device(&Device::Cpu)?.copy()?)))
            .collect()
    }

    /// The device the tensors (and so training) live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The sizes.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The model over the current values: with `dropout` (a training step's generator) its
    /// LoRA inputs and text head drop out; without, it is the inference forward.
    /// Variables are shared, not copied: gradients of its outputs reach [`Self::vars`].
    /// Build it again after the variables change (derived tensors such as the transposed
    /// LoRA factors are taken when it is built).
    pub fn model(&self, dropout: Option<SplitMix64>) -> Result<FoldModel> {
        let mut base = HashMap::new();
        let mut fold = HashMap::new();
        for (key, t) in &self.tensors {
            if self.fold_keys.contains(key) {
                fold.insert(key.clone(), t.clone());
            } else {
                base.insert(key.clone(), t.clone());
            }
        }
        let mut w = Weights::new(base, vec![fold], self.cfg.lora_scale());
        if let Some(rng) = dropout {
            w = w.with_dropout(rng);
        }
        FoldModel::new(&self.cfg, Vb::new(w, &self.device))
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
        let m = self.model(None)?;
        let feats = crate::model::kernels::differentiable(|| m.vision.forward(pixels))?;
        self.standardise("image_projection.projector.0", &feats)?;
        if let Some(ids) = ids {
            let text =
                crate::model::kernels::differentiable(|| m.text.forward(ids, pixels.device()))?;
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
        let (w0, b0) = (w.as_tensor().detach(), b.as_tensor().detach());
        let z = x.detach().matmul(&w0.t()?)?.broadcast_add(&b0)?;
        let mean = z.mean(0)?;
        let std = (z.broadcast_sub(&mean)?.sqr()?.mean(0)? + 1e-6)?.sqrt()?;
        w.set(&w0.broadcast_div(&std.unsqueeze(1)?)?)?;
        b.set(&(b0 - &mean)?.div(&std)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodule::N_PLANES;

    /// A tiny model config with `layers` vision blocks.
    fn tiny_config(layers: usize) -> ModelConfig {
        serde_json::from_str(&format!(
            r#"{{"vision_width": 16, "vision_layers": {layers}, "vision_heads": 2, "patch": 56,
            "image": 224, "embed": 8, "text_width": 8, "text_layers": 1, "text_heads": 2,
            "vocab": 49408, "context": 16, "out_dim": 8, "lora_r": 2, "lora_alpha": 1.0}}"#
        ))
        .unwrap()
    }

    /// Random initial weights are those of the code before the model was unified
    /// (fingerprint taken from it): FNV-1a over keys and f32 bits in key order.
    #[test]
    fn random_init_is_unchanged() {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
            }
        };
        let values = random_init(&tiny_config(2), &mut SplitMix64::new(77)).unwrap();
        for (key, t) in &values {
            eat(key.as_bytes());
            for x in t.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
                eat(&x.to_bits().to_le_bytes());
            }
        }
        assert_eq!(h, 11702912072732096460);
    }

    /// Image-path loss of `params` (inside `differentiable`, as training runs it).
    fn image_loss(params: &Params, pixels: &Tensor, square: bool) -> Tensor {
        crate::model::kernels::differentiable(|| {
            let m = params.model(None).unwrap();
            let logits = m.classify_image(&m.image(pixels).unwrap()).unwrap();
            if square {
                logits.sqr().unwrap().sum_all().unwrap()
            } else {
                crate::finetune::losses::weighted_ce(&logits, &[true, false], [0.5, 0.5]).unwrap()
            }
        })
    }

    fn random_pixels(rng: &mut SplitMix64) -> Tensor {
        let n = 2 * N_PLANES * 3 * 224 * 224;
        let pixels: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(pixels, (2 * N_PLANES, 3, 224, 224), &Device::Cpu).unwrap()
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
        let params = Params::new(&cfg, &values, Tuning::Lora, &Device::Cpu).unwrap();
        let pixels = random_pixels(&mut rng);
        let grads = image_loss(&params, &pixels, true).backward().unwrap();
        for key in [
            "vision_model.transformer.resblocks.0.attn.q_proj.w_lora_A",
            "vision_model.transformer.resblocks.0.attn.k_proj.w_lora_B",
            "vision_model.transformer.resblocks.0.attn.v_proj.w_lora_B",
            "image_projection.attention.0.weight",
        ] {
            let g = grads.get(params.vars()[key].as_tensor()).expect(key);
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
    /// on sampled entries of every trained tensor: a wrong backward (or a fused kernel that
    /// cuts the graph) would train slowly or not at all without any error.
    #[test]
    fn image_loss_gradients_equal_finite_differences() {
        let cfg = tiny_config(2);
        let mut rng = SplitMix64::new(5);
        let values = random_init(&cfg, &mut rng).unwrap();
        let params = Params::new(&cfg, &values, Tuning::Full, &Device::Cpu).unwrap();
        let pixels = random_pixels(&mut rng);
        params.standardise_heads(&pixels, None).unwrap();
        let grads = image_loss(&params, &pixels, false).backward().unwrap();
        let mut checked = 0;
        for (key, var) in params.vars() {
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
                image_loss(&params, &pixels, false)
                    .to_scalar::<f32>()
                    .unwrap() as f64
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

    /// Outside training the same model gives the same numbers with and without the fused
    /// kernels (the inference choice does not change the maths).
    #[test]
    fn fused_and_differentiable_forwards_agree() {
        let cfg = tiny_config(2);
        let mut rng = SplitMix64::new(9);
        let values = random_init(&cfg, &mut rng).unwrap();
        let params = Params::new(&cfg, &values, Tuning::Lora, &Device::Cpu).unwrap();
        let pixels = random_pixels(&mut rng);
        let m = params.model(None).unwrap();
        let fused = m.image(&pixels).unwrap();
        let plain = crate::model::kernels::differentiable(|| m.image(&pixels)).unwrap();
        let diff = (fused - plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "max difference {diff}");
    }
}
