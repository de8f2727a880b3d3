//! How every component gets its weights: [`Vb`], candle's [`VarBuilder`] over a
//! [`Weights`] store, whose keys are the checkpoint keys.
//!
//! - Plain tensors come through candle's `VarBuilder` (`vb.pp("ln_1").get(width, "weight")`):
//!   [`Weights`] implements candle-nn's `SimpleBackend` (shape checked, cast to the builder's
//!   dtype and device). A shared base tensor is found under its checkpoint key; fold `k`'s own
//!   tensors (LoRA factors, heads) under `fold{k}.` + its checkpoint key, reached with
//!   [`Vb::fold`] (`vb.fold(k).get((r, d), "w_lora_A")` at `...attn.q_proj`).
//! - A base layer's weight may be stored in another form than a float tensor (a q8_0 matrix
//!   computed on the bundle's mapping, see [`super::mapped`]): candle's `VarBuilder` returns
//!   tensors only, so [`Vb::base_weight`] asks the same store, keyed by the builder's prefix,
//!   for the stored form first ([`Weights::with_special`]) and falls back to `get`.
//! - Training's store holds candle `Var`s for the trained tensors (LoRA factors and heads)
//!   and frozen tensors for the rest (training's `finetune::params::Params`, candle's `VarMap`
//!   shape: key -> `Var`); gradients reach them through the built components. Its dropout
//!   generator ([`Weights::with_dropout`]) is what [`Vb::dropout`] hands to the layers.
//!
//! One construction path serves scoring (checkpoint folder, bundle: f32/f16/bf16/q8_0 base
//! + per-fold adapters), `convert`, `bench --random` and `finetune`: build a [`Weights`],
//! then `Component::new(cfg, Vb::new(weights, device))`.

use super::linear::{BaseWeight, Dropout};
use super::weights::Weights;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::sync::Arc;

/// A `VarBuilder` over a [`Weights`] store, with the store itself for base layer weights in
/// their stored form, the fold count, and training's dropout.
#[derive(Clone)]
pub struct Vb {
    vb: VarBuilder<'static>,
    store: Arc<Weights>,
}

/// `SimpleBackend` over a shared store (an `Arc` of a foreign trait's implementor).
struct Backend(Arc<Weights>);

impl Vb {
    /// The root builder over `weights` (f32 tensors on `device`).
    pub fn new(weights: Weights, device: &Device) -> Self {
        let store = Arc::new(weights);
        let vb =
            VarBuilder::from_backend(Box::new(Backend(store.clone())), DType::F32, device.clone());
        Self { vb, store }
    }

    /// The builder one key segment down (candle's `pp`).
    pub fn pp(&self, name: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(name),
            store: self.store.clone(),
        }
    }

    /// The same path in fold `k`'s own tensors (`fold{k}.` + this prefix).
    pub fn fold(&self, k: usize) -> Self {
        let prefix = self.vb.prefix();
        let root = self.vb.root().pp(format!("fold{k}"));
        let vb = if prefix.is_empty() {
            root
        } else {
            root.pp(prefix)
        };
        Self {
            vb,
            store: self.store.clone(),
        }
    }

    /// The path so far (dot-joined checkpoint key prefix).
    pub fn prefix(&self) -> String {
        self.vb.prefix()
    }

    /// The device tensors are put on.
    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    /// The tensor `name` under this prefix, checked to have shape `s`.
    pub fn get<S: Into<Shape>>(&self, s: S, name: &str) -> Result<Tensor> {
        self.vb.get(s, name)
    }

    /// The tensor `name` under this prefix, whatever its shape.
    pub fn get_unchecked(&self, name: &str) -> Result<Tensor> {
        self.vb.get_unchecked(name)
    }

    /// True when `name` exists under this prefix.
    pub fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    /// The base layer weight `weight` [out_dim, in_dim] under this prefix, in its stored form
    /// (a mapped q8_0 matrix stays one) or else a float tensor.
    pub fn base_weight(&self, out_dim: usize, in_dim: usize) -> Result<BaseWeight> {
        let key = format!("{}.weight", self.prefix());
        if let Some((w, dims)) = self.store.special(&key) {
            if dims != (out_dim, in_dim) {
                candle_core::bail!(
                    "tensor `{key}` has shape {:?}, expected {:?}",
                    [dims.0, dims.1],
                    [out_dim, in_dim]
                );
            }
            return Ok(w.clone());
        }
        Ok(BaseWeight::Float(self.get((out_dim, in_dim), "weight")?))
    }

    /// Number of folds in the store.
    pub fn n_folds(&self) -> usize {
        self.store.n_folds()
    }

    /// Dropout `p` when the store was built for a training step, else none.
    pub fn dropout(&self, p: f64) -> Option<Dropout> {
        self.store.dropout(p)
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.0.by_path(name)?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor `{}` has shape {:?}, expected {:?}",
                key_of(name),
                t.dims(),
                s.dims()
            );
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.by_path(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.by_path(name).is_ok()
    }
}

/// `fold{k}.key` -> (Some(k), key); a base key -> (None, key).
pub(crate) fn split_fold(path: &str) -> (Option<usize>, &str) {
    if let Some((head, key)) = path
        .strip_prefix("fold")
        .and_then(|rest| rest.split_once('.'))
    {
        if let Ok(k) = head.parse::<usize>() {
            return (Some(k), key);
        }
    }
    (None, path)
}

/// The checkpoint key of a builder path, for messages.
fn key_of(path: &str) -> String {
    match split_fold(path) {
        (Some(k), key) => format!("{key}` of fold `{k}"),
        (None, key) => key.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn base_and_fold_keys_resolve_and_shapes_are_checked() {
        let dev = Device::Cpu;
        let t = |v: f32, n: usize| Tensor::full(v, n, &dev).unwrap();
        let base = HashMap::from([("a.b.weight".to_string(), t(1.0, 3))]);
        let folds = (0..2)
            .map(|k| HashMap::from([("a.b.w_lora_A".to_string(), t(k as f32, 2))]))
            .collect();
        let vb = Vb::new(Weights::new(base, folds, 1.0), &dev)
            .pp("a")
            .pp("b");
        assert_eq!(vb.get(3, "weight").unwrap().dims(), &[3]);
        let a1 = vb.fold(1).get(2, "w_lora_A").unwrap();
        assert_eq!(a1.to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
        assert!(vb.fold(2).get(2, "w_lora_A").is_err());
        let err = vb.get(4, "weight").unwrap_err().to_string();
        assert!(err.contains("a.b.weight") && err.contains("[3]"), "{err}");
        assert!(vb.fold(0).contains_tensor("w_lora_A"));
        assert!(!vb.contains_tensor("w_lora_A"));
    }
}
