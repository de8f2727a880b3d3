//! Converting a released checkpoint folder into a model bundle (layout in
//! [`crate::model::bundle`] and models/README.md).
//!
//! The checkpoints are read and checked by [`crate::model::checkpoint`] (every fold's base must
//! be the same tensor set; q/k/v are reduced to the frozen W0). The vision base is written at
//! the requested precision: `f32` keeps everything f32; `f16` stores the block matmul weights
//! (q/k/v, attention out-projection, MLP fc and proj) as f16; `q8_0` stores them as q8_0 except
//! the blocks named in `keep_f16` (stored f16). The patch conv, embeddings, LayerNorms, biases
//! and the final projection stay f32 at every precision. The text base is f32 for `f32`
//! bundles and f16 otherwise. Fold adapters and heads are f32; the prompts' embeddings are
//! computed from the float checkpoints once, here, and stored f64.
//!
//! After writing, the bundle is loaded as the daemon would and scores its golden input (a
//! fixed synthetic nodule crop); those outputs are recorded in the manifest for the self-test.

use crate::bundle::{self, FoldEntry, Manifest, Provenance};
use crate::model::bundle::{Golden, Payload, GOLDEN_KEY, TEXT_EMBEDDINGS_KEY};
use crate::model::mapped::quantize_q8_0;
use crate::model::{checkpoint, read_prompts, ModelError, NoduleModel};
use crate::nodule::{Planes01, N_PLANES, PLANE_SIDE};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Base weight precision of a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// Everything f32.
    F32,
    /// Block matmul weights f16.
    F16,
    /// Block matmul weights q8_0 (vision tower).
    #[value(name = "q8_0")]
    Q8_0,
}

impl Precision {
    /// The manifest's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
        }
    }
}

/// Errors converting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// Reading or building the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Writing or hashing the bundle failed.
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
    /// A file could not be written.
    #[error("{path}: {msg}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        msg: String,
    },
    /// Bad options.
    #[error("{0}")]
    Options(String),
}

/// What to convert and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base precision.
    pub precision: Precision,
    /// Monotonic version.
    pub version: u64,
    /// Model id.
    pub model_id: String,
    /// Vision blocks whose matmul weights stay f16 in a q8_0 bundle.
    pub keep_f16: Vec<usize>,
    /// Self-test tolerance recorded in the manifest.
    pub tolerance: f64,
    /// Free-form provenance notes.
    pub notes: String,
    /// The model this one was derived from (fine-tuning), recorded in the provenance.
    pub parent: Option<String>,
}

/// Converter name and version recorded in the provenance.
pub const CONVERTER: &str = concat!("noduled convert ", env!("CARGO_PKG_VERSION"));
/// File names inside a bundle.
pub const BASE_FILE: &str = "base.safetensors";
/// The text base file.
pub const TEXT_FILE: &str = "text.safetensors";
/// The golden input file.
pub const GOLDEN_FILE: &str = "golden.safetensors";

/// Fold k's file.
pub fn fold_file(k: usize) -> String {
    format!("fold_{k}.safetensors")
}

/// Whether `key` is a block matmul weight (q/k/v, out-projection, MLP) of `tower`'s block `i`.
fn block_matmul(key: &str, prefix: &str) -> Option<usize> {
    let rest = key.strip_prefix(prefix)?.strip_prefix(".resblocks.")?;
    let (i, name) = rest.split_once('.')?;
    let i = i.parse().ok()?;
    const NAMES: [&str; 6] = [
        "attn.q_proj.weight",
        "attn.k_proj.weight",
        "attn.v_proj.weight",
        "attn.proj.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    ];
    NAMES.contains(&name).then_some(i)
}

/// The fixed golden input: a smooth bright ellipsoid-like blob with a soft rim on a dim,
/// gently textured background, different in every plane; 8-bit levels.
pub fn golden_planes() -> Vec<u8> {
    let mut out = Vec::with_capacity(N_PLANES * PLANE_SIDE * PLANE_SIDE);
    let c = (PLANE_SIDE as f64 - 1.0) / 2.0;
    for p in 0..N_PLANES {
        let (rx, ry) = (30.0 + 3.0 * p as f64, 24.0 + 2.0 * (p % 4) as f64);
        for y in 0..PLANE_SIDE {
            for x in 0..PLANE_SIDE {
                let (dx, dy) = ((x as f64 - c) / rx, (y as f64 - c - p as f64) / ry);
                let r = (dx * dx + dy * dy).sqrt();
                let blob = 0.75 / (1.0 + ((r - 1.0) * 6.0).exp());
                let texture = 0.08 * ((x as f64 * 0.21 + p as f64).sin() * (y as f64 * 0.17).cos());
                let v = (0.15 + blob + texture).clamp(0.0, 1.0);
                out.push((v * 255.0).round() as u8);
            }
        }
    }
    out
}

fn write_err(path: &Path) -> impl Fn(String) -> ConvertError + '_ {
    move |msg| ConvertError::Write {
        path: path.display().to_string(),
        msg,
    }
}

/// A tensor's little-endian bytes, ready for safetensors.
struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Raw {
    fn of(t: &Tensor) -> Result<Self, ConvertError> {
        let t = t.contiguous().map_err(ModelError::from)?;
        let shape = t.dims().to_vec();
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(ConvertError::Options("tensor is not on the CPU".into()));
        };
        let (start, end) = layout
            .contiguous_offsets()
            .expect("contiguous tensor has offsets");
        let (dtype, data) = match cpu {
            candle_core::CpuStorage::U8(v) => (safetensors::Dtype::U8, v[start..end].to_vec()),
            candle_core::CpuStorage::F16(v) => (
                safetensors::Dtype::F16,
                v[start..end]
                    .iter()
                    .flat_map(|x| x.to_bits().to_le_bytes())
                    .collect(),
            ),
            candle_core::CpuStorage::F32(v) => (
                safetensors::Dtype::F32,
                v[start..end].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            candle_core::CpuStorage::F64(v) => (
                safetensors::Dtype::F64,
                v[start..end].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            _ => {
                return Err(ConvertError::Options(format!(
                    "unexpected tensor dtype {:?}",
                    t.dtype()
                )))
            }
        };
        Ok(Self { dtype, shape, data })
    }
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn save(
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
    meta: &[(&str, &str)],
) -> Result<(), ConvertError> {
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let raw = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), Raw::of(t)?)))
        .collect::<Result<Vec<_>, ConvertError>>()?;
    safetensors::tensor::serialize_to_file(raw.iter().map(|(k, r)| (k, r)), Some(meta), path)
        .map_err(|e| write_err(path)(e.to_string()))
}

/// Converts the checkpoint folder `src` into a new bundle directory `out` (must not exist).
pub fn convert(src: &Path, out: &Path, opts: &Options) -> Result<Manifest, ConvertError> {
    if out.exists() {
        return Err(ConvertError::Options(format!(
            "{}: exists already; choose a new bundle directory",
            out.display()
        )));
    }
    if opts.version == 0 {
        return Err(ConvertError::Options("--version must be at least 1".into()));
    }
    let ok_id = !opts.model_id.is_empty()
        && opts
            .model_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok_id {
        return Err(ConvertError::Options(format!(
            "model id {:?}: use letters, digits, '.', '_' and '-'",
            opts.model_id
        )));
    }
    let started = std::time::Instant::now();
    let ckpt = checkpoint::load(src)?;
    let cfg = ckpt.config.clone();
    let layout = ckpt.layout;
    let weights = ckpt.weights.clone();
    let calibrations = ckpt.calibrations.clone();
    let fold_dirs = ckpt.fold_dirs.clone();
    let zero_shot = read_prompts(src)?;
    let source = NoduleModel::from_checkpoint(ckpt, zero_shot.clone())?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        "checkpoints read"
    );
    if let Some(&b) = opts.keep_f16.iter().find(|&&b| b >= cfg.vision_layers) {
        return Err(ConvertError::Options(format!(
            "--keep-f16 {b}: the vision tower has {} blocks",
            cfg.vision_layers
        )));
    }

    let staging = out.with_extension("partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| write_err(&staging)(e.to_string()))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| write_err(&staging)(e.to_string()))?;

    // Base: vision to BASE_FILE, text to TEXT_FILE.
    let mut vision = BTreeMap::new();
    let mut text = BTreeMap::new();
    let (mut q8_keys, mut f16_keys) = (Vec::new(), Vec::new());
    let text_dtype = match opts.precision {
        Precision::F32 => DType::F32,
        _ => DType::F16,
    };
    let mut keys: Vec<&String> = weights.base_tensors().keys().collect();
    keys.sort();
    for key in keys {
        let t = &weights.base_tensors()[key];
        if !key.starts_with("vision_model.") {
            if text_dtype == DType::F16 {
                f16_keys.push(key.clone());
            }
            text.insert(
                key.clone(),
                t.to_dtype(text_dtype).map_err(ModelError::from)?,
            );
            continue;
        }
        let block = block_matmul(key, "vision_model.transformer");
        let stored = match (opts.precision, block) {
            (Precision::Q8_0, Some(b)) if !opts.keep_f16.contains(&b) => {
                let (o, i) = t.dims2().map_err(ModelError::from)?;
                let bytes = quantize_q8_0(t).map_err(ModelError::from)?;
                q8_keys.push(key.clone());
                Tensor::from_vec(bytes, (o, i / 32, 34), &Device::Cpu).map_err(ModelError::from)?
            }
            (Precision::Q8_0 | Precision::F16, Some(_)) => {
                f16_keys.push(key.clone());
                t.to_dtype(DType::F16).map_err(ModelError::from)?
            }
            _ => t.clone(),
        };
        vision.insert(key.clone(), stored);
    }
    let meta = [
        ("format", "noduled-base/1"),
        ("precision", opts.precision.name()),
    ];
    save(&vision, &staging.join(BASE_FILE), &meta)?;
    drop(vision);
    save(&text, &staging.join(TEXT_FILE), &meta)?;
    drop(text);

    // Folds.
    let mut folds = Vec::new();
    for (k, dir) in fold_dirs.iter().enumerate() {
        let own = weights.fold_tensors(k).expect("a fold per fold folder");
        let mut map: BTreeMap<String, Tensor> =
            own.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        map.insert(
            TEXT_EMBEDDINGS_KEY.to_string(),
            source.text_embeddings(k).clone(),
        );
        let file = fold_file(k);
        save(&map, &staging.join(&file), &[("format", "noduled-fold/1")])?;
        let index = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("fold_"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(k);
        folds.push(FoldEntry {
            index,
            file,
            calibration: calibrations[k],
        });
    }

    // Golden input and the source model's outputs on it.
    let golden_bytes = golden_planes();
    let planes = Planes01::new(golden_bytes.iter().map(|&b| b as f32 / 255.0).collect())
        .map_err(ConvertError::Options)?;
    let golden_t = Tensor::from_vec(
        golden_bytes,
        (N_PLANES, PLANE_SIDE, PLANE_SIDE),
        &Device::Cpu,
    )
    .map_err(ModelError::from)?;
    save(
        &BTreeMap::from([(GOLDEN_KEY.to_string(), golden_t)]),
        &staging.join(GOLDEN_FILE),
        &[("format", "noduled-golden/1")],
    )?;
    let source_out = source.forward(&[&planes])?;
    let source_probs: Vec<f64> = source_out[0].folds.iter().map(|f| f.prob).collect();
    drop(source);
    drop(weights);

    let mut manifest = Manifest {
        format: bundle::FORMAT.into(),
        model_id: opts.model_id.clone(),
        version: opts.version,
        config: serde_json::to_value(&cfg).expect("config serialises"),
        precision: opts.precision.name().into(),
        folds,
        model: serde_json::Value::Null,
        files: bundle::hash_files(&staging)?,
        provenance: Provenance {
            sources: source_hashes(src)?,
            parent: opts.parent.clone(),
            converter: CONVERTER.into(),
            created: now_rfc3339(),
            notes: opts.notes.clone(),
        },
    };
    let mut payload = Payload {
        base: BASE_FILE.into(),
        text: TEXT_FILE.into(),
        q8_0: q8_keys,
        f16: f16_keys,
        source_layout: layout,
        prompts: Payload::prompts_of(&zero_shot),
        golden: Golden {
            file: GOLDEN_FILE.into(),
            tolerance: opts.tolerance,
            probs: source_probs.clone(),
            // Placeholders of the right size until the bundle has scored the golden input.
            zero_shot: vec![vec![0.0; zero_shot.prompts().len()]; source_probs.len()],
            source_probs,
        },
    };
    manifest.model = serde_json::to_value(&payload).expect("payload serialises");
    manifest.write(&staging)?;

    // Score the golden input with the bundle as written; record what it gives.
    let (model, _) = NoduleModel::load_bundle(&staging)?;
    let out_g = model.forward(&[&planes])?;
    payload.golden.probs = out_g[0].folds.iter().map(|f| f.prob).collect();
    payload.golden.zero_shot = out_g[0]
        .folds
        .iter()
        .map(|f| f.zero_shot.iter().flatten().copied().collect())
        .collect();
    manifest.model = serde_json::to_value(&payload).expect("payload serialises");
    manifest.write(&staging)?;
    std::fs::rename(&staging, out).map_err(|e| write_err(out)(e.to_string()))?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        bundle = %out.display(),
        "bundle written"
    );
    Ok(manifest)
}

/// SHA-256 of every file of the source folder the conversion read, by relative path.
fn source_hashes(src: &Path) -> Result<BTreeMap<String, String>, ConvertError> {
    let mut out = BTreeMap::new();
    let mut files: Vec<PathBuf> = Vec::new();
    for name in ["config.json", "prompts.json"] {
        files.push(PathBuf::from(name));
    }
    let entries = std::fs::read_dir(src).map_err(|e| write_err(src)(e.to_string()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("fold_") && e.path().is_dir() {
            for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let fname = f.file_name().to_string_lossy().to_string();
                files.push(PathBuf::from(&name).join(fname));
            }
        }
    }
    for rel in files {
        let path = src.join(&rel);
        if path.is_file() {
            out.insert(
                rel.to_string_lossy().replace('\\', "/"),
                bundle::sha256_file(&path)?,
            );
        }
    }
    Ok(out)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
