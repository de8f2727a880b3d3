//! Writes a release-size checkpoint set with random weights for measurements:
//! `OUT/fold_{k}/model.safetensors` (OpenAI CLIP ViT-B/32 sizes, LoRA rank 2, q/k/v stored
//! merged as released) and `OUT/fold_{k}/calibration.json`.
//!
//! `cargo run --release --example random_release -- OUT [FOLDS]` (5 folds: ~3 GB).
//! Weights are N(0, 0.02) (LayerNorm gains 1 + N(0, 0.05)); per-fold LoRA factors and heads
//! N(0, 0.1). Not a model: numbers for size, speed and quantisation error only.

use candle_core::{DType, Device, Tensor};
use noduled::model::checkpoint::{specs, Role};
use noduled::model::config::ModelConfig;
use std::collections::HashMap;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().expect("usage: random_release OUT [FOLDS]"));
    let folds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let cfg = ModelConfig::vit_b32(2);
    let dev = Device::Cpu;
    let rnd = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &dev);
    let specs = specs(&cfg);
    let mut base: HashMap<String, Tensor> = HashMap::new();
    for s in specs.iter().filter(|s| s.role != Role::Fold) {
        let ln_gain = s.key.ends_with("weight") && s.shape.len() == 1;
        let t = if ln_gain {
            (rnd(&s.shape, 0.05)? + 1.0)?
        } else {
            rnd(&s.shape, 0.02)?
        };
        base.insert(s.key.clone(), t);
    }
    for k in 0..folds {
        let mut sd = base.clone();
        for s in specs.iter().filter(|s| s.role == Role::Fold) {
            let t = if s.key == "logit_scale" {
                Tensor::new(3.5f32, &dev)?
            } else if s.key.ends_with("layer_norm.weight") {
                Tensor::ones(s.shape.as_slice(), DType::F32, &dev)?
            } else {
                rnd(&s.shape, 0.1)?
            };
            sd.insert(s.key.clone(), t);
        }
        for s in specs.iter().filter(|s| s.role == Role::LoraWeight) {
            let prefix = s.key.strip_suffix(".weight").expect("weight key");
            let a = &sd[&format!("{prefix}.w_lora_A")];
            let b = &sd[&format!("{prefix}.w_lora_B")];
            let merged = (&sd[&s.key] + (b.matmul(a)? * cfg.lora_scale())?)?;
            sd.insert(s.key.clone(), merged);
        }
        let dir = out.join(format!("fold_{k}"));
        std::fs::create_dir_all(&dir)?;
        candle_core::safetensors::save(&sd, dir.join("model.safetensors"))?;
        let cal = serde_json::json!({"method": "beta", "a": 1.0 + 0.1 * k as f64, "b": 1.0, "c": 0.05 * k as f64});
        std::fs::write(dir.join("calibration.json"), cal.to_string())?;
        eprintln!("wrote {}", dir.display());
    }
    Ok(())
}
