//! One fold's training loop: weighted sampling with replacement, augmented batches, the
//! losses, AdamW, validation each epoch, early stopping on the validation loss, and an
//! atomic checkpoint after every epoch from which a killed run resumes bit-identically.
//!
//! Determinism: every random number of epoch `e` of fold `k` comes from a SplitMix64 seeded
//! with `nth(seed, k * 1_000_000 + e)`, so resuming needs only the epoch counter besides the
//! tensors. The checkpoint (`fold_k/ckpt.safetensors` + `fold_k/state.json` in the work
//! folder) holds the variables, AdamW's moments and step, and the best variables so far.
//!
//! AdamW is written here (decoupled weight decay, bias-corrected moments, eps 1e-8,
//! betas 0.9/0.999) because candle-nn's keeps its moments private, so they could not be saved.

use super::data::Sample;
use super::losses::{class_weights, clip_loss, weighted_ce};
use super::params::Params;
use super::FinetuneError;
use crate::model::fold::FoldModel;
use crate::model::kernels::differentiable;
use crate::model::tokenizer::PromptTokenizer;
use crate::model::vision::clip_pixels;
use crate::nodule::Planes01;
use crate::rng::SplitMix64;
use candle_core::{Device, Tensor, Var};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Training settings shared by every fold.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Maximum epochs.
    pub epochs: usize,
    /// Nodules per step.
    pub batch: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Learning-rate multiplier of the heads ([`super::params::is_head`]): heads on a fresh or
    /// frozen tower need larger steps than the tower tolerates.
    pub head_lr_mult: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
    /// Apply the training augmentations.
    pub augment: bool,
    /// Draw training nodules with the reference's semantic sampler (when the manifest has
    /// semantic columns); uniformly otherwise.
    pub semantic_sampler: bool,
    /// Seed of every random draw.
    pub seed: u64,
    /// Where the tensors live and the steps run (see [`crate::device`]).
    pub device: Device,
    /// Stop the process (exit code 3) after this many epochs were checkpointed in this run
    /// (for testing kill and resume); `None` runs to the end.
    pub stop_after: Option<usize>,
}

/// Training nodules (the first of the fold's training list) used by the data-dependent
/// initialisation.
const STANDARDISE_NODULES: usize = 64;

/// A fold's result.
pub struct FoldResult {
    /// The best weights (by validation loss).
    pub values: BTreeMap<String, Tensor>,
    /// Malignancy probabilities of the validation nodules (in `val` order) under them.
    pub val_probs: Vec<f64>,
}

/// AdamW with saved state.
struct AdamW {
    /// Learning rate per variable.
    lr: Vec<f64>,
    wd: f64,
    step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vars: &[Var], lr: Vec<f64>, wd: f64) -> candle_core::Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            lr,
            wd,
            step: 0,
            v: m.clone(),
            m,
        })
    }

    fn update(
        &mut self,
        vars: &[Var],
        grads: &candle_core::backprop::GradStore,
    ) -> candle_core::Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c1 = 1.0 - Self::B1.powi(t);
        let c2 = 1.0 - Self::B2.powi(t);
        for (i, var) in vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Gradients computed from variables carry their op graph (the whole forward of
            // the step); detached, the moments do not chain every step's graph together.
            let g = g.detach();
            let m = ((&self.m[i] * Self::B1)? + (&g * (1.0 - Self::B1))?)?.detach();
            let v = ((&self.v[i] * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?.detach();
            let denom = ((&v / c2)?.sqrt()? + Self::EPS)?;
            let upd = ((&m / c1)? / denom)?;
            let lr = self.lr[i];
            let decayed = (var.as_tensor().detach() * (1.0 - lr * self.wd))?;
            var.set(&(decayed - (upd * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    /// Epochs done.
    epoch: usize,
    step: u64,
    best_loss: f64,
    best_epoch: usize,
    stale: usize,
    stopped: bool,
}

/// Token ids of every sample's texts, in sample order.
pub struct Texts {
    /// The impression (or free-text report): validation, the gate and the head
    /// initialisation use it.
    pub impression: Vec<Vec<u32>>,
    /// The findings lines (may be empty per sample).
    pub findings: Vec<Vec<Vec<u32>>>,
}

/// Probability that a training step uses the impression rather than one findings line.
pub const IMPRESSION_SHARE: f64 = 0.5;

impl Texts {
    /// Training text of sample `i`: the impression with probability [`IMPRESSION_SHARE`]
    /// (always when it has no findings), else a findings line drawn uniformly.
    fn draw(&self, i: usize, rng: &mut SplitMix64) -> Vec<u32> {
        let findings = &self.findings[i];
        if findings.is_empty() || rng.uniform() < IMPRESSION_SHARE {
            self.impression[i].clone()
        } else {
            let j = ((rng.uniform() * findings.len() as f64) as usize).min(findings.len() - 1);
            findings[j].clone()
        }
    }
}

/// Tokenised texts of the samples (None when any sample lacks text: image-only training).
pub fn tokenise(samples: &[Sample], context: usize) -> Option<Texts> {
    if samples.iter().any(|s| s.text.is_none()) {
        return None;
    }
    let tok = PromptTokenizer::new(context);
    Some(Texts {
        impression: samples
            .iter()
            .map(|s| tok.encode(s.text.as_deref().unwrap_or("")))
            .collect(),
        findings: samples
            .iter()
            .map(|s| s.findings.iter().map(|f| tok.encode(f)).collect())
            .collect(),
    })
}

/// Planes without augmentation for every sample (validation and scoring).
pub fn plain_planes(samples: &[Sample]) -> Vec<Planes01> {
    samples
        .iter()
        .map(|s| crate::preprocess::nine_planes(&s.crop))
        .collect()
}

/// Loss and image probabilities of a batch (inside [`differentiable`] when it is to be
/// differentiated).
fn batch_loss(
    model: &FoldModel,
    planes: &[&Planes01],
    labels: &[bool],
    ids: Option<&[Vec<u32>]>,
    weights: [f64; 2],
) -> Result<(Tensor, Vec<f64>), FinetuneError> {
    let pixels = clip_pixels(planes, model.heads.logit_scale.device())?;
    let img = model.image(&pixels)?;
    let logits = model.classify_image(&img)?;
    let ce_img = weighted_ce(&logits, labels, weights)?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?
        .narrow(1, 1, 1)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let loss = match ids {
        Some(ids) => {
            let txt = model.text(ids)?;
            let ce_txt = weighted_ce(&model.classify_text(&txt)?, labels, weights)?;
            let clip = clip_loss(&img, &txt, &model.scale()?)?;
            (clip + ((ce_img + ce_txt)? / 2.0)?)?
        }
        None => ce_img,
    };
    Ok((loss, probs))
}

/// Validation loss (mean over batches, weighted by size) and probabilities.
fn validate(
    params: &Params,
    planes: &[Planes01],
    labels: &[bool],
    ids: Option<&[Vec<u32>]>,
    weights: [f64; 2],
    batch: usize,
) -> Result<(f64, Vec<f64>), FinetuneError> {
    let mut total = 0.0;
    let mut probs = Vec::with_capacity(planes.len());
    let model = params.model(None)?;
    for start in (0..planes.len()).step_by(batch) {
        let end = (start + batch).min(planes.len());
        let refs: Vec<&Planes01> = planes[start..end].iter().collect();
        // No backward here: the fused inference kernels may run.
        let (loss, p) = batch_loss(
            &model,
            &refs,
            &labels[start..end],
            ids.map(|i| &i[start..end]),
            weights,
        )?;
        total += loss.to_scalar::<f32>()? as f64 * (end - start) as f64;
        probs.extend(p);
    }
    Ok((total / planes.len().max(1) as f64, probs))
}

/// `n` indices drawn with replacement in proportion to `weights`.
fn weighted_draws(weights: &[f64], n: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let total: f64 = weights.iter().sum();
    (0..n)
        .map(|_| {
            let mut u = rng.uniform() * total;
            for (i, &w) in weights.iter().enumerate() {
                if u < w {
                    return i;
                }
                u -= w;
            }
            weights.len() - 1
        })
        .collect()
}

fn save_atomic(path: &Path, bytes: &[u8]) -> Result<(), FinetuneError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| FinetuneError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| FinetuneError::io(path, e))
}

/// Trains fold `k` on `train` (indices into `samples`), validating on `val`. With
/// `from_random` (a `full` run from random weights) the heads' first layers are first
/// standardised on training data ([`Params::standardise_heads`]). Training runs on the
/// device `params` lives on; checkpoints are written and read on the CPU.
#[allow(clippy::too_many_arguments)]
pub fn train_fold(
    k: usize,
    params: Params,
    from_random: bool,
    samples: &[Sample],
    planes: &[Planes01],
    texts: Option<&Texts>,
    train: &[usize],
    val: &[usize],
    opts: &TrainOptions,
    work: &Path,
    epochs_done_here: &mut usize,
) -> Result<FoldResult, FinetuneError> {
    let dir = work.join(format!("fold_{k}"));
    std::fs::create_dir_all(&dir).map_err(|e| FinetuneError::io(&dir, e))?;
    let device = params.device().clone();
    let (keys, vars): (Vec<String>, Vec<Var>) = params
        .vars()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .unzip();
    let train_labels: Vec<bool> = train.iter().map(|&i| samples[i].label).collect();
    let weights = class_weights(&train_labels);
    let semantics = train
        .iter()
        .map(|&i| samples[i].semantics.clone())
        .collect::<Option<Vec<_>>>();
    let sampler: Vec<f64> = match semantics {
        Some(sem) if opts.semantic_sampler => crate::semantics::semantic_sampling_weights(&sem),
        _ => vec![1.0; train.len()],
    };
    let val_planes: Vec<Planes01> = val.iter().map(|&i| planes[i].clone()).collect();
    let val_labels: Vec<bool> = val.iter().map(|&i| samples[i].label).collect();
    let ids = texts.map(|t| t.impression.as_slice());
    let val_ids: Option<Vec<Vec<u32>>> =
        ids.map(|ids| val.iter().map(|&i| ids[i].clone()).collect());

    if from_random {
        // Data-dependent initialisation (before the first snapshot; a resumed run reads
        // the variables back from its checkpoint below).
        let take: Vec<usize> = train.iter().copied().take(STANDARDISE_NODULES).collect();
        let refs: Vec<&Planes01> = take.iter().map(|&i| &planes[i]).collect();
        let pixels = clip_pixels(&refs, &device)?;
        let take_ids: Option<Vec<Vec<u32>>> =
            ids.map(|ids| take.iter().map(|&i| ids[i].clone()).collect());
        params.standardise_heads(&pixels, take_ids.as_deref())?;
    }
    let lrs: Vec<f64> = keys
        .iter()
        .map(|k| {
            if super::params::is_head(k) {
                opts.lr * opts.head_lr_mult
            } else {
                opts.lr
            }
        })
        .collect();
    let mut opt = AdamW::new(&vars, lrs, opts.weight_decay)?;
    let mut best: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().detach().copy())
        .collect::<candle_core::Result<_>>()?;
    let mut state = State {
        epoch: 0,
        step: 0,
        best_loss: f64::INFINITY,
        best_epoch: 0,
        stale: 0,
        stopped: false,
    };
    let ckpt = dir.join("ckpt.safetensors");
    let state_path = dir.join("state.json");
    if state_path.is_file() && ckpt.is_file() {
        let text =
            std::fs::read_to_string(&state_path).map_err(|e| FinetuneError::io(&state_path, e))?;
        state = serde_json::from_str(&text)
            .map_err(|e| FinetuneError::Data(format!("{}: {e}", state_path.display())))?;
        let map = candle_core::safetensors::load(&ckpt, &Device::Cpu)
            .map_err(|e| FinetuneError::Data(format!("{}: {e}", ckpt.display())))?;
        let get = |p: &str, key: &str| {
            let t = map.get(&format!("{p}/{key}")).ok_or_else(|| {
                FinetuneError::Data(format!("{}: missing `{p}/{key}`", ckpt.display()))
            })?;
            Ok::<_, FinetuneError>(t.to_device(&device)?)
        };
        for (i, key) in keys.iter().enumerate() {
            vars[i].set(&get("var", key)?)?;
            opt.m[i] = get("m", key)?;
            opt.v[i] = get("v", key)?;
            best[i] = get("best", key)?;
        }
        opt.step = state.step;
        eprintln!("fold {k}: resumed after epoch {}", state.epoch);
    }

    let steps = train.len().div_ceil(opts.batch.max(1));
    let started = Instant::now();
    let first_epoch = state.epoch;
    while state.epoch < opts.epochs && !state.stopped {
        let epoch = state.epoch;
        let mut rng = SplitMix64::new(SplitMix64::nth(seed_of(opts.seed, k), epoch as u64));
        let order = weighted_draws(&sampler, train.len(), &mut rng);
        let mut sum = 0.0;
        for step in 0..steps {
            let picks: Vec<usize> = order
                [step * opts.batch..((step + 1) * opts.batch).min(order.len())]
                .iter()
                .map(|&j| train[j])
                .collect();
            let seeds: Vec<u64> = picks.iter().map(|_| rng.next_u64()).collect();
            let batch_planes: Vec<Planes01> = picks
                .par_iter()
                .zip(seeds.par_iter())
                .map(|(&i, &s)| {
                    if opts.augment {
                        super::augment::augment(&samples[i].crop, &mut SplitMix64::new(s))
                    } else {
                        planes[i].clone()
                    }
                })
                .collect();
            let refs: Vec<&Planes01> = batch_planes.iter().collect();
            let labels: Vec<bool> = picks.iter().map(|&i| samples[i].label).collect();
            let batch_ids: Option<Vec<Vec<u32>>> =
                texts.map(|t| picks.iter().map(|&i| t.draw(i, &mut rng)).collect());
            let model = params.model(Some(SplitMix64::new(rng.next_u64())))?;
            let (loss, _) = differentiable(|| {
                batch_loss(&model, &refs, &labels, batch_ids.as_deref(), weights)
            })?;
            let grads = loss.backward()?;
            opt.update(&vars, &grads)?;
            let l = loss.to_scalar::<f32>()? as f64;
            sum += l;
            let done = (epoch - first_epoch) * steps + step + 1;
            let left = (opts.epochs - first_epoch) * steps - done;
            let eta = started.elapsed().as_secs_f64() / done as f64 * left as f64;
            eprintln!(
                "fold {k} epoch {}/{} step {}/{} loss {l:.3} eta {eta:.0}s",
                epoch + 1,
                opts.epochs,
                step + 1,
                steps
            );
        }
        let (val_loss, val_probs) = validate(
            &params,
            &val_planes,
            &val_labels,
            val_ids.as_deref(),
            weights,
            opts.batch,
        )?;
        let auroc = crate::eval::metrics::roc_auc(&val_labels, &val_probs)
            .map(|a| format!("{a:.3}"))
            .unwrap_or_else(|_| "n/a".into());
        eprintln!(
            "fold {k} epoch {}/{} train_loss {:.3} val_loss {val_loss:.3} val_auroc {auroc}",
            epoch + 1,
            opts.epochs,
            sum / steps.max(1) as f64
        );
        if val_loss < state.best_loss {
            state.best_loss = val_loss;
            state.best_epoch = epoch + 1;
            state.stale = 0;
            best = vars
                .iter()
                .map(|v| v.as_tensor().detach().copy())
                .collect::<candle_core::Result<_>>()?;
        } else {
            state.stale += 1;
            if state.stale >= opts.patience {
                state.stopped = true;
                eprintln!("fold {k}: early stop, best epoch {}", state.best_epoch);
            }
        }
        state.epoch += 1;
        state.step = opt.step;
        let mut map: std::collections::HashMap<String, Tensor> = Default::default();
        let cpu = |t: &Tensor| t.detach().to_device(&Device::Cpu);
        for (i, key) in keys.iter().enumerate() {
            map.insert(format!("var/{key}"), cpu(vars[i].as_tensor())?);
            map.insert(format!("m/{key}"), cpu(&opt.m[i])?);
            map.insert(format!("v/{key}"), cpu(&opt.v[i])?);
            map.insert(format!("best/{key}"), cpu(&best[i])?);
        }
        let tmp = ckpt.with_extension("tmp.safetensors");
        candle_core::safetensors::save(&map, &tmp)?;
        std::fs::rename(&tmp, &ckpt).map_err(|e| FinetuneError::io(&ckpt, e))?;
        save_atomic(
            &state_path,
            serde_json::to_string(&state).unwrap_or_default().as_bytes(),
        )?;
        *epochs_done_here += 1;
        if opts.stop_after.is_some_and(|n| *epochs_done_here >= n) {
            eprintln!("stopping after {} epoch(s) as asked", *epochs_done_here);
            std::process::exit(3);
        }
    }
    for (i, var) in vars.iter().enumerate() {
        var.set(&best[i])?;
    }
    let (_, val_probs) = validate(
        &params,
        &val_planes,
        &val_labels,
        val_ids.as_deref(),
        weights,
        opts.batch,
    )?;
    Ok(FoldResult {
        values: params.values()?,
        val_probs,
    })
}

fn seed_of(seed: u64, fold: usize) -> u64 {
    SplitMix64::nth(seed, 1_000_000 + fold as u64)
}
