//! Loading the model from a bundle directory (see [`crate::bundle`] and models/README.md).
//!
//! Files, all safetensors (little-endian):
//! - `base.safetensors`: the vision tower's shared base, keys as in the checkpoints, q/k/v as
//!   the frozen W0. Float tensors are F32 or F16; a q8_0 matrix [out, in] is stored as a U8
//!   tensor of shape [out, in / 32, 34] (ggml blocks) and is read in place from the mapping.
//! - `text.safetensors`: the text tower's base (F32 or F16), needed only for new prompts or
//!   fine-tuning: inference never opens it.
//! - `fold_{k}.safetensors`: fold k's LoRA factors and heads (F32) and its L2-normalised
//!   prompt embeddings `zero_shot.text_embeddings` [prompts, out_dim] (F64, prompt order).
//! - `golden.safetensors`: the self-test input `planes01` [9, 224, 224] as U8 (value / 255).
//!
//! The manifest's `model` payload ([`Payload`]) names the files and holds the prompt set and
//! the golden outputs recorded at convert time. Float tensors are copied to the heap as f32
//! (candle's CPU tensors own their storage); q8_0 matrices stay in the mapping.

use super::checkpoint::{specs, Role};
use super::config::{LoraLayout, ModelConfig};
use super::heads::FoldHeads;
use super::linear::BaseWeight;
use super::mapped::{MappedQ8, Q8Kernel, SharedMap, Q8_0_BLOCK_BYTES, Q8_0_BLOCK_VALUES};
use super::prompts::{Feature, ZeroShotSpec};
use super::weights::Weights;
use super::{ModelError, NoduleModel};
use crate::bundle::{Manifest, Opened};
use crate::nodule::{Planes01, N_PLANES, PLANE_SIDE};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Key of a fold's prompt embeddings in its fold file.
pub const TEXT_EMBEDDINGS_KEY: &str = "zero_shot.text_embeddings";
/// Key of the golden input in the golden file.
pub const GOLDEN_KEY: &str = "planes01";

/// One feature of the prompt set, as stored in the manifest (ordered list).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PromptFeature {
    /// Feature name.
    pub name: String,
    /// Class words.
    pub classes: Vec<String>,
    /// One prompt per class.
    pub prompts: Vec<String>,
}

/// The golden self-test: input file and the outputs recorded at convert time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    /// File holding `planes01`.
    pub file: String,
    /// Largest accepted |recorded - scored| for every recorded value.
    pub tolerance: f64,
    /// Per fold, the probability of class 1 scored by this bundle at convert time.
    pub probs: Vec<f64>,
    /// Per fold, the zero-shot probabilities (features in order, classes in order, flat).
    pub zero_shot: Vec<Vec<f64>>,
    /// Per fold, the probability the float source checkpoints gave the same input.
    pub source_probs: Vec<f64>,
}

/// The manifest's `model` payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// The vision base file.
    pub base: String,
    /// The text base file.
    pub text: String,
    /// Base weights stored q8_0 (checkpoint keys).
    pub q8_0: Vec<String>,
    /// Base weights stored f16 (checkpoint keys).
    pub f16: Vec<String>,
    /// How the source checkpoints stored q/k/v (the bundle always holds W0).
    pub source_layout: LoraLayout,
    /// The zero-shot prompt set, in order.
    pub prompts: Vec<PromptFeature>,
    /// The self-test.
    pub golden: Golden,
}

impl Payload {
    /// The prompt set, checked.
    pub fn zero_shot(&self) -> Result<ZeroShotSpec, String> {
        if self.prompts.is_empty() {
            return Err("`model.prompts` is empty".into());
        }
        let mut features = Vec::new();
        for f in &self.prompts {
            if f.classes.is_empty() || f.classes.len() != f.prompts.len() {
                return Err(format!(
                    "`model.prompts` feature `{}`: {} classes but {} prompts",
                    f.name,
                    f.classes.len(),
                    f.prompts.len()
                ));
            }
            features.push((
                f.name.clone(),
                Feature {
                    classes: f.classes.clone(),
                    prompts: f.prompts.clone(),
                },
            ));
        }
        Ok(ZeroShotSpec { features })
    }

    /// The payload's prompt list from a prompt set.
    pub fn prompts_of(spec: &ZeroShotSpec) -> Vec<PromptFeature> {
        spec.features
            .iter()
            .map(|(name, f)| PromptFeature {
                name: name.clone(),
                classes: f.classes.clone(),
                prompts: f.prompts.clone(),
            })
            .collect()
    }
}

/// A bundle's manifest with its parsed config and payload.
#[derive(Debug, Clone)]
pub struct BundleInfo {
    /// The manifest.
    pub manifest: Manifest,
    /// Tower sizes.
    pub config: ModelConfig,
    /// The model payload.
    pub payload: Payload,
}

impl BundleInfo {
    /// Reads `dir/manifest.json` and checks config and payload against each other.
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        Self::from_manifest(Manifest::read(dir)?, dir)
    }

    /// Checks an already read manifest (of the bundle in `dir`, named in messages).
    pub fn from_manifest(manifest: Manifest, dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(crate::bundle::MANIFEST).display().to_string();
        let err = |msg: String| ModelError::Config {
            path: path.clone(),
            msg,
        };
        let config: ModelConfig = serde_json::from_value(manifest.config.clone())
            .map_err(|e| err(format!("`config`: {e}")))?;
        config
            .validate()
            .map_err(|m| err(format!("`config`: {m}")))?;
        let payload: Payload = serde_json::from_value(manifest.model.clone())
            .map_err(|e| err(format!("`model`: {e}")))?;
        let zero_shot = payload.zero_shot().map_err(&err)?;
        let n_folds = manifest.folds.len();
        let g = &payload.golden;
        if g.probs.len() != n_folds || g.zero_shot.len() != n_folds {
            return Err(err(format!(
                "`model.golden` has {} probs for {n_folds} folds",
                g.probs.len()
            )));
        }
        let n_prompts = zero_shot.prompts().len();
        if g.zero_shot.iter().any(|z| z.len() != n_prompts) {
            return Err(err(format!(
                "`model.golden.zero_shot` rows are not {n_prompts} long"
            )));
        }
        if !(g.tolerance.is_finite() && g.tolerance >= 0.0 && g.tolerance < 1.0) {
            return Err(err("`model.golden.tolerance` is not in [0, 1)".into()));
        }
        if !["f32", "f16", "q8_0"].contains(&manifest.precision.as_str()) {
            return Err(err(format!(
                "`precision` is {:?}, expected f32, f16 or q8_0",
                manifest.precision
            )));
        }
        let mut files: Vec<&str> = vec![&payload.base, &payload.text, &g.file];
        files.extend(manifest.folds.iter().map(|f| f.file.as_str()));
        for f in files {
            if !manifest.files.contains_key(f) {
                return Err(err(format!("{f:?} is used but not listed in `files`")));
            }
        }
        Ok(Self {
            manifest,
            config,
            payload,
        })
    }
}

/// A mapped safetensors file.
pub struct MappedFile {
    path: String,
    map: SharedMap,
    /// key -> (dtype, shape, byte offset in the file, byte length).
    entries: HashMap<String, (safetensors::Dtype, Vec<usize>, usize, usize)>,
}

impl MappedFile {
    /// Maps `path` and parses its safetensors header.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let p = path.display().to_string();
        let read_err = |msg: String| ModelError::Read {
            path: p.clone(),
            msg,
        };
        let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
        // SAFETY: bundle files are immutable once installed (read-only store directories);
        // a file truncated under the mapping would fault, which the store's rules prevent.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| read_err(e.to_string()))?;
        Self::from_map(path, Arc::new(map))
    }

    /// Parses the safetensors header of a mapping already made (and verified: see
    /// [`crate::bundle::open_verified`]) of the file at `path` (named in messages).
    pub fn from_map(path: &Path, map: SharedMap) -> Result<Self, ModelError> {
        let p = path.display().to_string();
        let read_err = |msg: String| ModelError::Read {
            path: p.clone(),
            msg,
        };
        let st = safetensors::SafeTensors::deserialize(&map[..])
            .map_err(|e| read_err(format!("safetensors header: {e}")))?;
        let base = map.as_ptr() as usize;
        let entries = st
            .tensors()
            .into_iter()
            .map(|(k, v)| {
                let off = v.data().as_ptr() as usize - base;
                (k, (v.dtype(), v.shape().to_vec(), off, v.data().len()))
            })
            .collect();
        Ok(Self {
            path: p,
            map,
            entries,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    fn entry(
        &self,
        key: &str,
    ) -> Result<&(safetensors::Dtype, Vec<usize>, usize, usize), ModelError> {
        self.entries.get(key).ok_or_else(|| ModelError::Missing {
            path: self.path.clone(),
            key: key.into(),
        })
    }

    /// The float tensor `key` (F64, F32 or F16 in the file) of `shape`, as `dtype`, copied.
    pub fn float(&self, key: &str, shape: &[usize], dtype: DType) -> Result<Tensor, ModelError> {
        let (dt, got, off, len) = self.entry(key)?;
        let scalar_ok = shape.is_empty() && got.iter().product::<usize>() == 1;
        if got.as_slice() != shape && !scalar_ok {
            return Err(ModelError::Shape {
                path: self.path.clone(),
                key: key.into(),
                got: got.clone(),
                expected: shape.to_vec(),
            });
        }
        let src = match dt {
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            other => {
                return Err(ModelError::Read {
                    path: self.path.clone(),
                    msg: format!("`{key}` has dtype {other:?}, expected a float"),
                })
            }
        };
        let bytes = &self.map[*off..off + len];
        let t = Tensor::from_raw_buffer(bytes, src, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| ModelError::Read {
                path: self.path.clone(),
                msg: format!("`{key}`: {e}"),
            })?;
        if !all_finite(&t)? {
            return Err(ModelError::Read {
                path: self.path.clone(),
                msg: format!("`{key}` has non-finite values"),
            });
        }
        Ok(t)
    }

    /// The q8_0 matrix `key` [out, in] (a U8 tensor [out, in / 32, 34]), in place.
    pub fn q8_0(&self, key: &str, out_dim: usize, in_dim: usize) -> Result<MappedQ8, ModelError> {
        let (dt, got, off, len) = self.entry(key)?;
        let want = vec![out_dim, in_dim / Q8_0_BLOCK_VALUES, Q8_0_BLOCK_BYTES];
        if *dt != safetensors::Dtype::U8 || *got != want || in_dim % Q8_0_BLOCK_VALUES != 0 {
            return Err(ModelError::Shape {
                path: self.path.clone(),
                key: format!("{key} (q8_0, {dt:?})"),
                got: got.clone(),
                expected: want,
            });
        }
        debug_assert_eq!(*len, MappedQ8::byte_len(out_dim, in_dim));
        MappedQ8::new(self.map.clone(), *off, out_dim, in_dim).map_err(|e| ModelError::Read {
            path: self.path.clone(),
            msg: format!("`{key}`: {e}"),
        })
    }

    /// The U8 tensor `key` of `shape`, as bytes (borrowed from the mapping).
    pub fn bytes(&self, key: &str, shape: &[usize]) -> Result<&[u8], ModelError> {
        let (dt, got, off, len) = self.entry(key)?;
        if *dt != safetensors::Dtype::U8 || got.as_slice() != shape {
            return Err(ModelError::Shape {
                path: self.path.clone(),
                key: format!("{key} ({dt:?})"),
                got: got.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(&self.map[*off..off + len])
    }
}

/// Whether every value of a contiguous CPU tensor is finite, read in place.
fn all_finite(t: &Tensor) -> Result<bool, ModelError> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("tensor is not contiguous".into()))?;
    Ok(match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            v[start..end].iter().all(|x| x.is_finite())
        }
        candle_core::Storage::Cpu(candle_core::CpuStorage::F64(v)) => {
            v[start..end].iter().all(|x| x.is_finite())
        }
        _ => {
            return Err(candle_core::Error::Msg("expected an f32 or f64 CPU tensor".into()).into())
        }
    })
}

/// Reads the golden input `planes01` (U8, value / 255) from `dir/<golden.file>`.
pub fn read_golden(dir: &Path, golden: &Golden) -> Result<Planes01, ModelError> {
    golden_planes(&MappedFile::open(&dir.join(&golden.file))?)
}

/// The verified bundle's member `name`, mapped (see [`crate::bundle::open_verified`]).
pub fn opened_file(bundle: &Opened, name: &str) -> Result<MappedFile, ModelError> {
    MappedFile::from_map(&bundle.path_of(name), bundle.map(name)?)
}

/// The golden input `planes01` (U8, value / 255) of an opened golden file.
pub fn golden_planes(f: &MappedFile) -> Result<Planes01, ModelError> {
    let bytes = f.bytes(GOLDEN_KEY, &[N_PLANES, PLANE_SIDE, PLANE_SIDE])?;
    Planes01::new(bytes.iter().map(|&b| b as f32 / 255.0).collect()).map_err(|e| ModelError::Read {
        path: f.path().to_string(),
        msg: format!("`{GOLDEN_KEY}`: {e}"),
    })
}

impl NoduleModel {
    /// Loads a bundle directory after verifying it (hashes; no key): see [`Self::load_opened`].
    pub fn load_bundle(dir: &Path) -> Result<(Self, BundleInfo), ModelError> {
        Self::load_opened(&crate::bundle::open_verified(dir, None)?)
    }

    /// Loads an opened, verified bundle from its verified mappings: the vision base (q8_0
    /// weights stay in the mapping), every fold's adapters, heads and prompt embeddings.
    pub fn load_opened(bundle: &Opened) -> Result<(Self, BundleInfo), ModelError> {
        let dir = bundle.dir.as_path();
        let info = BundleInfo::from_manifest(bundle.manifest.clone(), dir)?;
        let cfg = &info.config;
        let payload = &info.payload;
        let base = opened_file(bundle, &payload.base)?;
        let q8: std::collections::HashSet<&str> = payload.q8_0.iter().map(String::as_str).collect();
        let all_specs = specs(cfg);
        let kernel = Q8Kernel::from_env();
        let mut base_tensors = HashMap::new();
        let mut special = HashMap::new();
        for spec in all_specs
            .iter()
            .filter(|s| s.role != Role::Fold && s.key.starts_with("vision_model."))
        {
            if q8.contains(spec.key.as_str()) {
                let (o, i) = (spec.shape[0], spec.shape[1]);
                let w = base.q8_0(&spec.key, o, i)?;
                let w = match kernel {
                    Q8Kernel::Gemm => BaseWeight::Q8Gemm(w),
                    Q8Kernel::InPlace => BaseWeight::Mapped(w),
                    Q8Kernel::Candle => BaseWeight::Packed(w.to_packed()?),
                };
                special.insert(spec.key.clone(), (w, o, i));
            } else {
                base_tensors.insert(
                    spec.key.clone(),
                    base.float(&spec.key, &spec.shape, DType::F32)?,
                );
            }
        }
        let zero_shot = payload.zero_shot().map_err(|msg| ModelError::Config {
            path: dir.join(crate::bundle::MANIFEST).display().to_string(),
            msg,
        })?;
        let n_prompts = zero_shot.prompts().len();
        let mut folds = Vec::new();
        let mut text_embeds = Vec::new();
        let mut fold_dirs = Vec::new();
        for entry in &info.manifest.folds {
            let path = dir.join(&entry.file);
            let f = opened_file(bundle, &entry.file)?;
            let mut own = HashMap::new();
            for spec in all_specs.iter().filter(|s| s.role == Role::Fold) {
                own.insert(
                    spec.key.clone(),
                    f.float(&spec.key, &spec.shape, DType::F32)?,
                );
            }
            text_embeds.push(f.float(
                TEXT_EMBEDDINGS_KEY,
                &[n_prompts, cfg.out_dim],
                DType::F64,
            )?);
            folds.push(own);
            fold_dirs.push(path);
        }
        let weights = Weights::new(base_tensors, folds, cfg.lora_scale()).with_special(special);
        let vb = super::vb::Vb::new(weights, &Device::Cpu);
        let model = NoduleModel::new(
            cfg.clone(),
            LoraLayout::Unmerged,
            fold_dirs,
            NoduleModel::assemble(cfg, &vb)?,
            info.manifest.folds.iter().map(|f| f.calibration).collect(),
            zero_shot,
            text_embeds,
        )?;
        Ok((model, info))
    }
}

impl NoduleModel {
    /// Computes every fold's L2-normalised embeddings of `spec`'s prompts from the bundle's
    /// text tower (`text.safetensors` plus each fold's text LoRA and head), as f64
    /// [prompts, out_dim] per fold: what a new prompt set needs. Scoring never calls this.
    pub fn bundle_prompt_embeddings(
        dir: &Path,
        spec: &ZeroShotSpec,
    ) -> Result<Vec<Tensor>, ModelError> {
        let info = BundleInfo::read(dir)?;
        let cfg = &info.config;
        let text = MappedFile::open(&dir.join(&info.payload.text))?;
        let all_specs = specs(cfg);
        let mut base = HashMap::new();
        for s in all_specs
            .iter()
            .filter(|s| s.role != Role::Fold && !s.key.starts_with("vision_model."))
        {
            base.insert(s.key.clone(), text.float(&s.key, &s.shape, DType::F32)?);
        }
        let mut folds = Vec::new();
        for entry in &info.manifest.folds {
            let f = MappedFile::open(&dir.join(&entry.file))?;
            let mut own = HashMap::new();
            for s in all_specs.iter().filter(|s| s.role == Role::Fold) {
                own.insert(s.key.clone(), f.float(&s.key, &s.shape, DType::F32)?);
            }
            folds.push(own);
        }
        let vb = super::vb::Vb::new(Weights::new(base, folds, cfg.lora_scale()), &Device::Cpu);
        let tower = super::text::TextTower::new(cfg, vb.clone())?;
        let heads = (0..vb.n_folds())
            .map(|k| FoldHeads::new(cfg, vb.fold(k)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        super::prompt_embeddings(&tower, &heads, spec, cfg.context, &Device::Cpu)
    }
}
