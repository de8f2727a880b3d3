//! The tensors of a loaded checkpoint set, by checkpoint key: one frozen base shared by all
//! folds (q/k/v already reduced to W0), and per fold only its LoRA factors and heads.
//! A bundle may also hold base layer weights in another form than a float tensor (a q8_0
//! matrix read from a mapped file): [`super::vb::Vb::base_weight`] prefers those when present.
//! Components read a store through [`super::vb::Vb`] (candle's `VarBuilder` over it).
//! Training builds the same components from `Weights` whose trained tensors are candle
//! `Var`s, with a dropout generator set ([`Weights::with_dropout`]).

use super::linear::{BaseWeight, Dropout};
use crate::rng::SplitMix64;
use candle_core::{Result, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Base tensors plus per-fold tensors, keyed as in the checkpoints.
#[derive(Debug, Clone)]
pub struct Weights {
    base: HashMap<String, Tensor>,
    folds: Vec<HashMap<String, Tensor>>,
    /// Base layer weights not held as float tensors, by key (`{prefix}.weight`).
    special: HashMap<String, BaseWeight>,
    special_dims: HashMap<String, (usize, usize)>,
    lora_scale: f64,
    /// The masks' generator when the components are built for a training step.
    dropout: Option<Arc<Mutex<SplitMix64>>>,
}

impl Weights {
    /// From the shared base tensors, each fold's own tensors and the LoRA scaling.
    pub fn new(
        base: HashMap<String, Tensor>,
        folds: Vec<HashMap<String, Tensor>>,
        lora_scale: f64,
    ) -> Self {
        Self {
            base,
            folds,
            special: HashMap::new(),
            special_dims: HashMap::new(),
            lora_scale,
            dropout: None,
        }
    }

    /// Builds training components: LoRA inputs and the text head get dropout, masks drawn
    /// from `rng` in the order the layers run.
    pub fn with_dropout(mut self, rng: SplitMix64) -> Self {
        self.dropout = Some(Arc::new(Mutex::new(rng)));
        self
    }

    /// Dropout `p` when building for training, else none.
    pub fn dropout(&self, p: f64) -> Option<Dropout> {
        self.dropout
            .as_ref()
            .map(|rng| Dropout::new(p, rng.clone()))
    }

    /// Adds base layer weights held in another form than a float tensor, keyed
    /// `{prefix}.weight` with their [out, in] sizes; they take precedence in [`super::vb::Vb::base_weight`].
    pub fn with_special(mut self, special: HashMap<String, (BaseWeight, usize, usize)>) -> Self {
        self.special_dims = special
            .iter()
            .map(|(k, (_, o, i))| (k.clone(), (*o, *i)))
            .collect();
        self.special = special.into_iter().map(|(k, (w, _, _))| (k, w)).collect();
        self
    }

    /// The LoRA scaling s = alpha / sqrt(r).
    pub fn lora_scale(&self) -> f64 {
        self.lora_scale
    }

    /// The shared base tensors by key.
    pub fn base_tensors(&self) -> &HashMap<String, Tensor> {
        &self.base
    }

    /// Fold `k`'s own tensors by key.
    pub fn fold_tensors(&self, k: usize) -> Option<&HashMap<String, Tensor>> {
        self.folds.get(k)
    }

    /// Number of folds.
    pub fn n_folds(&self) -> usize {
        self.folds.len()
    }

    /// A base tensor.
    pub fn base(&self, key: &str) -> Result<Tensor> {
        self.base
            .get(key)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("missing base tensor `{key}`")))
    }

    /// Fold `k`'s own tensor.
    pub fn fold(&self, k: usize, key: &str) -> Result<Tensor> {
        self.folds
            .get(k)
            .and_then(|f| f.get(key))
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor `{key}` of fold {k}")))
    }

    /// A base layer weight held in another form than a float tensor, by key
    /// (`{prefix}.weight`), with its [out, in] sizes.
    pub fn special(&self, key: &str) -> Option<(&BaseWeight, (usize, usize))> {
        Some((self.special.get(key)?, *self.special_dims.get(key)?))
    }

    /// The tensor at a builder path (see [`super::vb`]): `fold{k}.{key}` is fold k's own
    /// tensor, anything else a base tensor.
    pub fn by_path(&self, path: &str) -> Result<Tensor> {
        match super::vb::split_fold(path) {
            (Some(k), key) => self.fold(k, key),
            (None, key) => self.base(key),
        }
    }
}
