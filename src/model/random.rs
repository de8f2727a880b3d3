//! A full-size nodule model with random weights, generated in-process, for benchmarks: the
//! vision tower, every fold's LoRA factors and heads at the configured sizes, identity
//! calibrations and random (unit-norm) zero-shot prompt embeddings. No text tower is built:
//! inference only needs the prompts' embeddings, which a real model computes once at load.
//!
//! Values are uniform with the standard deviation CLIP's initialisation uses (0.02 for
//! weights, 0.05 for the LoRA factors as the reference benchmark draws them; LayerNorm gains
//! 1, biases 0), so activations stay in a realistic range. The generator is the project's
//! [`SplitMix64`] seeded by the caller: the same seed gives the same model.

use super::checkpoint::{specs, Role};
use super::config::{LoraLayout, ModelConfig};
use super::heads::l2_normalize;
use super::prompts::ZeroShotSpec;
use super::vb::Vb;
use super::weights::Weights;
use super::{ModelError, NoduleModel};
use crate::calibration::BetaCalibration;
use crate::rng::SplitMix64;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// `n` values uniform on [-a, a] with standard deviation `std` (a = std * sqrt(3)), two per
/// 64-bit draw (24 high bits of each half), so that ~88 M values are drawn quickly.
fn uniform(rng: &mut SplitMix64, n: usize, std: f32) -> Vec<f32> {
    let a = std * 3f32.sqrt();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.div_ceil(2) {
        let r = rng.next_u64();
        for half in [r as u32, (r >> 32) as u32] {
            if out.len() < n {
                // 24 high bits -> [0, 1).
                let u = (half >> 8) as f32 * (1.0 / 16_777_216.0);
                out.push((2.0 * u - 1.0) * a);
            }
        }
    }
    out
}

/// True for the keys only the text tower reads.
fn text_only(key: &str) -> bool {
    !key.starts_with("vision_model.")
        && !key.starts_with("image_projection.")
        && !key.starts_with("semantic_projection.")
        && !key.starts_with("classifier_image.")
        && key != "logit_scale"
}

fn values(rng: &mut SplitMix64, key: &str, n: usize) -> Vec<f32> {
    let last = key.rsplit('.').next().unwrap_or(key);
    let is_norm = key.contains("ln_") || key.contains("layer_norm");
    match last {
        "bias" => vec![0.0; n],
        "weight" if is_norm => vec![1.0; n],
        "w_lora_A" | "w_lora_B" => uniform(rng, n, 0.05),
        "logit_scale" => vec![(1.0f32 / 0.07).ln(); n],
        _ => uniform(rng, n, 0.02),
    }
}

/// The vision tower's base tensors and `folds` folds' LoRA factors and heads (no text tower),
/// keyed as in the checkpoints, q/k/v unmerged.
pub fn vision_weights(cfg: &ModelConfig, folds: usize, seed: u64) -> candle_core::Result<Weights> {
    let mut rng = SplitMix64::new(seed);
    let dev = Device::Cpu;
    let mut base = HashMap::new();
    let mut fold_maps: Vec<HashMap<String, Tensor>> = (0..folds).map(|_| HashMap::new()).collect();
    for spec in specs(cfg).into_iter().filter(|s| !text_only(&s.key)) {
        let n: usize = spec.shape.iter().product();
        match spec.role {
            Role::Base | Role::LoraWeight => {
                let t = Tensor::from_vec(values(&mut rng, &spec.key, n), spec.shape, &dev)?;
                base.insert(spec.key, t);
            }
            Role::Fold => {
                for map in fold_maps.iter_mut() {
                    let v = values(&mut rng, &spec.key, n);
                    map.insert(
                        spec.key.clone(),
                        Tensor::from_vec(v, spec.shape.clone(), &dev)?,
                    );
                }
            }
        }
    }
    Ok(Weights::new(base, fold_maps, cfg.lora_scale()))
}

/// A scoring-ready model with random weights: `folds` folds over one shared base.
pub fn model(cfg: &ModelConfig, folds: usize, seed: u64) -> Result<NoduleModel, ModelError> {
    model_with_base(cfg, folds, seed, None)
}

/// As [`model`], with the vision encoder's base weights quantised to `base` when given.
pub fn model_with_base(
    cfg: &ModelConfig,
    folds: usize,
    seed: u64,
    base: Option<GgmlDType>,
) -> Result<NoduleModel, ModelError> {
    cfg.validate().map_err(|msg| ModelError::Config {
        path: "random model".into(),
        msg,
    })?;
    let device = Device::Cpu;
    let vb = Vb::new(vision_weights(cfg, folds, seed)?, &device);
    let (mut vision, heads) = NoduleModel::assemble(cfg, &vb)?;
    if let Some(dtype) = base {
        vision.quantize_encoder(dtype)?;
    }
    let zero_shot = ZeroShotSpec::builtin();
    let n_prompts = zero_shot.prompts().len();
    let mut rng = SplitMix64::new(seed ^ 0x5EED);
    let text_embeds = (0..folds)
        .map(|_| {
            let e = Tensor::from_vec(
                uniform(&mut rng, n_prompts * cfg.out_dim, 1.0),
                (n_prompts, cfg.out_dim),
                &device,
            )?
            .to_dtype(DType::F64)?;
            l2_normalize(&e)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let identity = BetaCalibration {
        a: 1.0,
        b: 1.0,
        c: 0.0,
        clip_eps: 1e-12,
    };
    NoduleModel::new(
        cfg.clone(),
        LoraLayout::Unmerged,
        (0..folds)
            .map(|k| PathBuf::from(format!("random/fold_{k}")))
            .collect(),
        (vision, heads),
        vec![identity; folds],
        zero_shot,
        text_embeds,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_has_the_asked_spread() {
        let v = uniform(&mut SplitMix64::new(1), 100_001, 0.02);
        assert_eq!(v.len(), 100_001);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "std {}", var.sqrt());
    }

    /// FNV-1a over every weight's key and f32 bits, in key order.
    fn fingerprint(w: &Weights) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
            }
        };
        let mut maps = vec![w.base_tensors().clone()];
        maps.extend((0..w.n_folds()).map(|k| w.fold_tensors(k).unwrap().clone()));
        for map in maps {
            let mut keys: Vec<_> = map.keys().cloned().collect();
            keys.sort();
            for key in keys {
                eat(key.as_bytes());
                let v = map[&key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for x in v {
                    eat(&x.to_bits().to_le_bytes());
                }
            }
        }
        h
    }

    /// The random weights and prompt embeddings are those of the generator this module had
    /// before it used `crate::rng::SplitMix64` (fingerprints taken from that code).
    #[test]
    fn random_model_is_unchanged() {
        let cfg = small_config();
        let w = vision_weights(&cfg, 3, 7).unwrap();
        let m = model(&cfg, 2, 11).unwrap();
        let e: Vec<f64> = m.text_embeds[1].flatten_all().unwrap().to_vec1().unwrap();
        let bits = e.iter().fold(0u64, |h, x| h.rotate_left(5) ^ x.to_bits());
        assert_eq!(
            (fingerprint(&w), bits),
            (12883585774537634546, 2759258183851267780)
        );
    }

    /// ViT-B/32's layout with a 64-wide, 2-block tower and small heads.
    fn small_config() -> ModelConfig {
        let mut cfg = ModelConfig::vit_b32(2);
        cfg.vision_width = 64;
        cfg.vision_layers = 2;
        cfg.vision_heads = 4;
        cfg.embed = 32;
        cfg.out_dim = 16;
        cfg
    }

    #[test]
    fn small_random_model_scores_every_fold() {
        let cfg = small_config();
        let m = model(&cfg, 3, 7).unwrap();
        let planes = crate::nodule::Planes01(vec![0.5; 9 * 224 * 224]);
        let out = m.forward(&[&planes]).unwrap();
        assert_eq!(out[0].folds.len(), 3);
        for f in &out[0].folds {
            assert!(f.prob.is_finite() && f.prob > 0.0 && f.prob < 1.0);
            assert_eq!(f.slice_features.len(), 9 * 32);
        }
        // The same model with a q8_0 encoder base stays close.
        let q = model_with_base(&cfg, 3, 7, Some(GgmlDType::Q8_0)).unwrap();
        let out_q = q.forward(&[&planes]).unwrap();
        for (f, g) in out[0].folds.iter().zip(&out_q[0].folds) {
            let (a, b) = (&f.slice_features, &g.slice_features);
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
            let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(dot / (na * nb) > 0.99, "cosine {}", dot / (na * nb));
            assert!(a != b, "quantisation changed nothing");
        }
    }

    /// The GPU code path (plain candle ops, f16 tower, LayerNorm statistics in f32, a q8_0
    /// base dequantised at placement) run on the CPU, where CI can check it against f32.
    #[test]
    fn f16_placement_stays_close_to_f32() {
        let cfg = small_config();
        let half = crate::device::Placement {
            dtype: DType::F16,
            ..crate::device::Placement::cpu()
        };
        let planes = crate::nodule::Planes01(
            (0..9 * 224 * 224)
                .map(|i| 0.5 + 0.4 * ((i % 211) as f32 * 0.05).sin())
                .collect(),
        );
        for base in [None, Some(GgmlDType::Q8_0)] {
            let full = model_with_base(&cfg, 3, 7, base).unwrap();
            let want = full.forward(&[&planes]).unwrap();
            let got = model_with_base(&cfg, 3, 7, base)
                .unwrap()
                .placed(&half)
                .unwrap()
                .forward(&[&planes])
                .unwrap();
            for (f, g) in want[0].folds.iter().zip(&got[0].folds) {
                let (a, b) = (&f.slice_features, &g.slice_features);
                let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
                let norm: f32 = a.iter().map(|x| x * x).sum();
                let rel = (diff / norm).sqrt();
                assert!(rel < 1e-2, "{base:?}: relative L2 error {rel}");
                assert!(rel > 0.0, "{base:?}: f16 changed nothing");
                assert!((f.prob - g.prob).abs() < 1e-2, "{} vs {}", f.prob, g.prob);
            }
        }
    }

    /// Scoring applies the logit scale as training does, exp(clamp(s, 0, ln 100)): a stored
    /// log scale above the clamp scores as the clamp, one below it as itself.
    #[test]
    fn zero_shot_applies_the_clamped_logit_scale() {
        let cfg = small_config();
        let planes = crate::nodule::Planes01(vec![0.5; 9 * 224 * 224]);
        let reference = model(&cfg, 1, 5).unwrap();
        let zero_shot = |log_scale: f32| {
            let w = vision_weights(&cfg, 1, 5).unwrap();
            let mut fold = w.fold_tensors(0).unwrap().clone();
            fold.insert(
                "logit_scale".into(),
                Tensor::new(log_scale, &Device::Cpu).unwrap(),
            );
            let w = Weights::new(w.base_tensors().clone(), vec![fold], cfg.lora_scale());
            let vb = Vb::new(w, &Device::Cpu);
            let m = NoduleModel::new(
                cfg.clone(),
                LoraLayout::Unmerged,
                vec![PathBuf::from("random/fold_0")],
                NoduleModel::assemble(&cfg, &vb).unwrap(),
                vec![*reference.calibration(0)],
                ZeroShotSpec::builtin(),
                vec![reference.text_embeddings(0).clone()],
            )
            .unwrap();
            assert_eq!(m.logit_scale(0), log_scale as f64);
            m.forward(&[&planes]).unwrap()[0].folds[0].zero_shot.clone()
        };
        // Both above ln 100 = 4.6052: the same scale 100; below it the scale is exp(s).
        assert_eq!(zero_shot(6.0), zero_shot(5.0));
        assert_ne!(zero_shot(4.5), zero_shot(5.0));
        assert_eq!(zero_shot(-1.0), zero_shot(-2.0));
    }
}
