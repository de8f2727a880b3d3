//! Reading a released checkpoint folder into one shared base plus per-fold tensors.
//!
//! Layout: `DIR/fold_{k}/best_both.pt` (torch zip pickle `{"model": state_dict}`) or, as an
//! alternative with the same keys, `DIR/fold_{k}/model.safetensors`; `DIR/fold_{k}/calibration.json`
//! (`a`, `b`, `c`, optional `clip_eps`); optional `DIR/config.json` (see [`ModelConfig`];
//! absent means the ViT-B/32 release with r read from the LoRA A shapes, alpha 1) and optional
//! `DIR/prompts.json` (zero-shot prompts; absent means the built-in set).
//!
//! q/k/v weights may be stored merged (W0 + s B_k A_k) or unmerged (W0). The folds decide:
//! if every fold stores the same q/k/v weights the set is unmerged; if instead
//! `W_k - s B_k A_k` is the same for every fold it is merged, and that is the base. Equality
//! is judged to 1e-6 of the tensor's largest magnitude (f32 rounding of the merge is ~6e-8).
//! With one fold, or folds whose deltas are all equal, the folds cannot tell:
//! `config.json`'s `lora_layout` decides, default merged (checkpoints are saved in eval mode).
//! Every other base tensor must agree across folds to the same tolerance. Each fold's delta is
//! then applied exactly once, unmerged, at run time. Extra keys (loss buffers, the unused
//! `classifier_text`) are ignored.

use super::config::{LoraLayout, ModelConfig};
use super::weights::Weights;
use super::ModelError;
use crate::calibration::BetaCalibration;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Relative tolerance for "the same tensor" across folds.
const SAME_TOLERANCE: f64 = 1e-6;
/// At most this many folds are read.
const MAX_FOLDS: usize = 64;

/// What a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Frozen, identical in every fold.
    Base,
    /// A q/k/v weight: W0 or W0 + s B A depending on the layout.
    LoraWeight,
    /// Owned by each fold (LoRA factors, heads).
    Fold,
}

/// One tensor the model reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// State-dict key.
    pub key: String,
    /// Shape the config implies (`[]` for the scalar `logit_scale`).
    pub shape: Vec<usize>,
    /// Shared, q/k/v weight, or per fold.
    pub role: Role,
}

fn push(specs: &mut Vec<Spec>, key: String, shape: &[usize], role: Role) {
    specs.push(Spec {
        key,
        shape: shape.to_vec(),
        role,
    });
}

fn block_specs(specs: &mut Vec<Spec>, prefix: &str, layers: usize, d: usize, r: usize) {
    for i in 0..layers {
        let p = format!("{prefix}.resblocks.{i}");
        for ln in ["ln_1", "ln_2"] {
            push(specs, format!("{p}.{ln}.weight"), &[d], Role::Base);
            push(specs, format!("{p}.{ln}.bias"), &[d], Role::Base);
        }
        for qkv in ["q_proj", "k_proj", "v_proj"] {
            push(
                specs,
                format!("{p}.attn.{qkv}.weight"),
                &[d, d],
                Role::LoraWeight,
            );
            push(specs, format!("{p}.attn.{qkv}.bias"), &[d], Role::Base);
            push(
                specs,
                format!("{p}.attn.{qkv}.w_lora_A"),
                &[r, d],
                Role::Fold,
            );
            push(
                specs,
                format!("{p}.attn.{qkv}.w_lora_B"),
                &[d, r],
                Role::Fold,
            );
        }
        push(specs, format!("{p}.attn.proj.weight"), &[d, d], Role::Base);
        push(specs, format!("{p}.attn.proj.bias"), &[d], Role::Base);
        push(
            specs,
            format!("{p}.mlp.c_fc.weight"),
            &[4 * d, d],
            Role::Base,
        );
        push(specs, format!("{p}.mlp.c_fc.bias"), &[4 * d], Role::Base);
        push(
            specs,
            format!("{p}.mlp.c_proj.weight"),
            &[d, 4 * d],
            Role::Base,
        );
        push(specs, format!("{p}.mlp.c_proj.bias"), &[d], Role::Base);
    }
}

/// Every key the model reads, its shape and its role.
pub fn specs(cfg: &ModelConfig) -> Vec<Spec> {
    let (vw, tw, e, o, r) = (
        cfg.vision_width,
        cfg.text_width,
        cfg.embed,
        cfg.out_dim,
        cfg.lora_r,
    );
    let g = cfg.grid();
    let mut s = Vec::new();
    push(
        &mut s,
        "vision_model.conv1.weight".into(),
        &[vw, 3, cfg.patch, cfg.patch],
        Role::Base,
    );
    push(
        &mut s,
        "vision_model.class_embedding".into(),
        &[vw],
        Role::Base,
    );
    push(
        &mut s,
        "vision_model.positional_embedding".into(),
        &[g * g + 1, vw],
        Role::Base,
    );
    for ln in ["ln_pre", "ln_post"] {
        push(
            &mut s,
            format!("vision_model.{ln}.weight"),
            &[vw],
            Role::Base,
        );
        push(&mut s, format!("vision_model.{ln}.bias"), &[vw], Role::Base);
    }
    push(&mut s, "vision_model.proj".into(), &[vw, e], Role::Base);
    block_specs(&mut s, "vision_model.transformer", cfg.vision_layers, vw, r);
    push(
        &mut s,
        "token_embedding.weight".into(),
        &[cfg.vocab, tw],
        Role::Base,
    );
    push(
        &mut s,
        "positional_embedding".into(),
        &[cfg.context, tw],
        Role::Base,
    );
    block_specs(&mut s, "transformer", cfg.text_layers, tw, r);
    push(&mut s, "ln_final.weight".into(), &[tw], Role::Base);
    push(&mut s, "ln_final.bias".into(), &[tw], Role::Base);
    push(&mut s, "text_projection".into(), &[tw, e], Role::Base);
    // classifier_text is trained but unused at inference: not read.
    let heads: [(&str, &[usize]); 15] = [
        ("image_projection.projector.0.weight", &[o, e]),
        ("image_projection.projector.0.bias", &[o]),
        ("image_projection.attention.0.weight", &[o / 2, o]),
        ("image_projection.attention.0.bias", &[o / 2]),
        ("image_projection.attention.2.weight", &[1, o / 2]),
        ("image_projection.attention.2.bias", &[1]),
        ("semantic_projection.projection.weight", &[o, e]),
        ("semantic_projection.projection.bias", &[o]),
        ("semantic_projection.fc.weight", &[o, o]),
        ("semantic_projection.fc.bias", &[o]),
        ("semantic_projection.layer_norm.weight", &[o]),
        ("semantic_projection.layer_norm.bias", &[o]),
        ("classifier_image.weight", &[2, o]),
        ("classifier_image.bias", &[2]),
        ("logit_scale", &[]),
    ];
    for (key, shape) in heads {
        push(&mut s, key.to_string(), shape, Role::Fold);
    }
    s
}

/// One fold's state dict, read lazily where the format allows.
enum StateDict {
    Pth(candle_core::pickle::PthTensors),
    Safetensors(HashMap<String, Tensor>),
}

impl StateDict {
    fn open(path: &Path) -> Result<Self, ModelError> {
        let read_err = |msg: String| ModelError::Read {
            path: path.display().to_string(),
            msg,
        };
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
            let map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                .map_err(|e| read_err(e.to_string()))?;
            Ok(Self::Safetensors(map))
        } else {
            let pth = candle_core::pickle::PthTensors::new(path, Some("model"))
                .map_err(|e| read_err(e.to_string()))?;
            Ok(Self::Pth(pth))
        }
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        match self {
            Self::Pth(p) => p.tensor_infos().get(key).map(|i| i.layout.dims().to_vec()),
            Self::Safetensors(m) => m.get(key).map(|t| t.dims().to_vec()),
        }
    }

    /// The tensor `key` as f32, checked against `shape` before any data is read.
    fn read(&self, path: &Path, key: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let p = path.display().to_string();
        let got = self.shape(key).ok_or_else(|| ModelError::Missing {
            path: p.clone(),
            key: key.into(),
        })?;
        let scalar_ok = shape.is_empty() && got.iter().product::<usize>() == 1;
        if got != shape && !scalar_ok {
            return Err(ModelError::Shape {
                path: p,
                key: key.into(),
                got,
                expected: shape.to_vec(),
            });
        }
        let t = match self {
            Self::Pth(pth) => pth.get(key).map_err(|e| ModelError::Read {
                path: p.clone(),
                msg: format!("`{key}`: {e}"),
            })?,
            Self::Safetensors(m) => m.get(key).cloned(),
        }
        .ok_or_else(|| ModelError::Missing {
            path: p.clone(),
            key: key.into(),
        })?;
        let t = t
            .reshape(shape)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.contiguous());
        let t = t.map_err(|e| ModelError::Read {
            path: p.clone(),
            msg: format!("`{key}`: {e}"),
        })?;
        if !all_finite(&t)? {
            return Err(ModelError::Read {
                path: p,
                msg: format!("`{key}` has non-finite values"),
            });
        }
        Ok(t)
    }
}

fn all_finite(t: &Tensor) -> Result<bool, ModelError> {
    with_values(t, |v| v.iter().all(|x| x.is_finite()))
}

/// Calls `f` on the f32 values of `t` (borrowed when `t` is a contiguous CPU tensor; these
/// checks run over every weight of every fold, so copies would dominate loading).
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, ModelError> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            if let Ok(values) = cpu.as_slice::<f32>() {
                return Ok(f(&values[start..end]));
            }
        }
    }
    Ok(f(&t
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?))
}

/// Largest |a - b| against `SAME_TOLERANCE` times the largest |b| (same shapes).
fn same(a: &Tensor, b: &Tensor) -> Result<bool, ModelError> {
    let (diff, scale) = with_values(a, |a| {
        with_values(b, |b| {
            a.iter().zip(b).fold((0f64, 0f64), |(d, s), (&x, &y)| {
                (d.max((x as f64 - y as f64).abs()), s.max((y as f64).abs()))
            })
        })
    })??;
    Ok(diff <= SAME_TOLERANCE * scale.max(f64::MIN_POSITIVE))
}

/// A fold folder and its files.
struct Fold {
    dir: PathBuf,
    state: PathBuf,
}

fn find_folds(dir: &Path) -> Result<Vec<Fold>, ModelError> {
    let io = |e: std::io::Error| ModelError::Io {
        path: dir.display().to_string(),
        msg: e.to_string(),
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(k) = name
            .strip_prefix("fold_")
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if entry.path().is_dir() {
            found.push((k, entry.path()));
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(ModelError::NoFolds {
            path: dir.display().to_string(),
        });
    }
    if found.len() > MAX_FOLDS {
        return Err(ModelError::Io {
            path: dir.display().to_string(),
            msg: format!("more than {MAX_FOLDS} fold folders"),
        });
    }
    found
        .into_iter()
        .map(|(_, d)| {
            let state = ["best_both.pt", "model.safetensors"]
                .iter()
                .map(|f| d.join(f))
                .find(|p| p.is_file())
                .ok_or_else(|| ModelError::NoStateDict {
                    path: d.display().to_string(),
                })?;
            Ok(Fold { dir: d, state })
        })
        .collect()
}

fn read_calibration(fold_dir: &Path) -> Result<BetaCalibration, ModelError> {
    #[derive(serde::Deserialize)]
    struct Raw {
        #[serde(default)]
        method: Option<String>,
        a: f64,
        b: f64,
        c: f64,
        #[serde(default)]
        clip_eps: Option<f64>,
    }
    let path = fold_dir.join("calibration.json");
    let err = |msg: String| ModelError::Calibration {
        path: path.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    let raw: Raw = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    if let Some(m) = raw.method.as_deref().filter(|m| *m != "beta") {
        return Err(err(format!(
            "`method` is \"{m}\", only \"beta\" is supported"
        )));
    }
    let clip_eps = raw.clip_eps.unwrap_or(f64::EPSILON);
    for (key, v) in [
        ("a", raw.a),
        ("b", raw.b),
        ("c", raw.c),
        ("clip_eps", clip_eps),
    ] {
        if !v.is_finite() {
            return Err(err(format!("`{key}` is not finite")));
        }
    }
    if !(0.0..0.5).contains(&clip_eps) {
        return Err(err(format!("`clip_eps` = {clip_eps} is outside [0, 0.5)")));
    }
    Ok(BetaCalibration {
        a: raw.a,
        b: raw.b,
        c: raw.c,
        clip_eps,
    })
}

fn read_config(
    dir: &Path,
    fold0: &StateDict,
    fold0_path: &Path,
) -> Result<ModelConfig, ModelError> {
    let path = dir.join("config.json");
    let cfg = if path.is_file() {
        let err = |msg: String| ModelError::Config {
            path: path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let cfg: ModelConfig = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.validate().map_err(err)?;
        cfg
    } else {
        let key = "vision_model.transformer.resblocks.0.attn.q_proj.w_lora_A";
        let shape = fold0.shape(key).ok_or_else(|| ModelError::Missing {
            path: fold0_path.display().to_string(),
            key: key.into(),
        })?;
        let cfg = ModelConfig::vit_b32(shape.first().copied().unwrap_or(0));
        cfg.validate().map_err(|msg| ModelError::Config {
            path: fold0_path.display().to_string(),
            msg: format!("`{key}`: {msg}"),
        })?;
        cfg
    };
    Ok(cfg)
}

/// Per q/k/v key: whether every fold stores the same weight (`unmerged`), and whether
/// `W_k - s B_k A_k` is the same for every fold (`merged`); the first fold that breaks each.
struct LayoutEvidence {
    raw0: Tensor,
    merged0: Tensor,
    unmerged_breaks: Option<usize>,
    merged_breaks: Option<usize>,
}

/// A loaded checkpoint set.
pub struct Checkpoint {
    /// Sizes.
    pub config: ModelConfig,
    /// Base and per-fold tensors.
    pub weights: Weights,
    /// One calibrator per fold.
    pub calibrations: Vec<BetaCalibration>,
    /// The q/k/v layout found.
    pub layout: LoraLayout,
    /// The fold folders, in fold order.
    pub fold_dirs: Vec<PathBuf>,
}

/// Reads and checks a checkpoint folder.
pub fn load(dir: &Path) -> Result<Checkpoint, ModelError> {
    let folds = find_folds(dir)?;
    let first = StateDict::open(&folds[0].state)?;
    let cfg = read_config(dir, &first, &folds[0].state)?;
    for (prefix, layers) in [
        ("vision_model.transformer", cfg.vision_layers),
        ("transformer", cfg.text_layers),
    ] {
        let extra = format!("{prefix}.resblocks.{layers}.attn.q_proj.weight");
        if first.shape(&extra).is_some() {
            return Err(ModelError::Config {
                path: folds[0].state.display().to_string(),
                msg: format!("has `{extra}`: more blocks than the config's {layers}"),
            });
        }
    }
    let specs = specs(&cfg);
    let scale = cfg.lora_scale();

    let mut base: HashMap<String, Tensor> = HashMap::new();
    let mut evidence: Vec<(String, LayoutEvidence)> = Vec::new();
    let mut fold_maps = Vec::with_capacity(folds.len());
    let mut calibrations = Vec::with_capacity(folds.len());
    let mut first = Some(first);
    for (k, fold) in folds.iter().enumerate() {
        let sd = match first.take() {
            Some(sd) => sd,
            None => StateDict::open(&fold.state)?,
        };
        let path = fold.state.as_path();
        let mut own: HashMap<String, Tensor> = HashMap::new();
        let mut lora_weights: Vec<(String, Tensor)> = Vec::new();
        for spec in &specs {
            let t = sd.read(path, &spec.key, &spec.shape)?;
            match spec.role {
                Role::Fold => {
                    own.insert(spec.key.clone(), t);
                }
                Role::LoraWeight => lora_weights.push((spec.key.clone(), t)),
                Role::Base if k == 0 => {
                    base.insert(spec.key.clone(), t);
                }
                Role::Base => {
                    if !same(&t, &base[&spec.key])? {
                        return Err(ModelError::BaseMismatch {
                            path: path.display().to_string(),
                            key: spec.key.clone(),
                            reference: folds[0].state.display().to_string(),
                        });
                    }
                }
            }
        }
        for (i, (key, w)) in lora_weights.into_iter().enumerate() {
            let prefix = key.strip_suffix(".weight").unwrap_or(&key);
            let a = own[&format!("{prefix}.w_lora_A")].to_dtype(DType::F64)?;
            let b = own[&format!("{prefix}.w_lora_B")].to_dtype(DType::F64)?;
            let delta = (b.matmul(&a)? * scale)?;
            let without = (w.to_dtype(DType::F64)? - delta)?.to_dtype(DType::F32)?;
            if k == 0 {
                evidence.push((
                    key,
                    LayoutEvidence {
                        raw0: w,
                        merged0: without,
                        unmerged_breaks: None,
                        merged_breaks: None,
                    },
                ));
            } else {
                let ev = &mut evidence[i].1;
                if ev.unmerged_breaks.is_none() && !same(&w, &ev.raw0)? {
                    ev.unmerged_breaks = Some(k);
                }
                if ev.merged_breaks.is_none() && !same(&without, &ev.merged0)? {
                    ev.merged_breaks = Some(k);
                }
            }
        }
        fold_maps.push(own);
        calibrations.push(read_calibration(&fold.dir)?);
    }

    let all_unmerged = evidence.iter().all(|(_, e)| e.unmerged_breaks.is_none());
    let all_merged = evidence.iter().all(|(_, e)| e.merged_breaks.is_none());
    let layout = match (all_unmerged, all_merged) {
        (true, true) => cfg.lora_layout.unwrap_or(LoraLayout::Merged),
        (true, false) => LoraLayout::Unmerged,
        (false, true) => LoraLayout::Merged,
        (false, false) => {
            // Name the first tensor that fits neither layout, else the first that breaks the
            // merged reading (the set mixes layouts).
            let (key, ev) = evidence
                .iter()
                .find(|(_, e)| e.unmerged_breaks.is_some() && e.merged_breaks.is_some())
                .or_else(|| evidence.iter().find(|(_, e)| e.merged_breaks.is_some()))
                .expect("some tensor breaks the merged reading");
            let k = ev.merged_breaks.or(ev.unmerged_breaks).unwrap_or(0);
            return Err(ModelError::BaseMismatch {
                path: folds[k].state.display().to_string(),
                key: key.clone(),
                reference: folds[0].state.display().to_string(),
            });
        }
    };
    for (key, ev) in evidence {
        let w0 = match layout {
            LoraLayout::Merged => ev.merged0,
            LoraLayout::Unmerged => ev.raw0,
        };
        base.insert(key, w0);
    }
    Ok(Checkpoint {
        config: cfg,
        weights: Weights::new(base, fold_maps, scale),
        calibrations,
        layout,
        fold_dirs: folds.into_iter().map(|f| f.dir).collect(),
    })
}
