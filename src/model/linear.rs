//! Affine layers `y = x W^T + b` over the last axis, with the weight either float or
//! quantised (so a bundle can hold a q8_0 base), and the per-fold LoRA layer built on them.
//!
//! LoRA is kept unmerged: `y = x W^T + b + s (x A_k^T) B_k^T`, s = alpha / sqrt(r), where W is
//! the frozen base shared by every fold and A_k [r, in], B_k [out, r] belong to fold k. The
//! input's leading axis is fold-major: rows `[k * n, (k + 1) * n)` belong to fold k, so the
//! base matmul runs once over all folds and only the rank-r paths differ per fold.

use super::gemm::{Epilogue, GemmDtype, PackedWeight};
use super::profile::{timed, timed_flops};
use super::vb::Vb;
use crate::rng::SplitMix64;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor, D};
use std::sync::{Arc, Mutex};

/// The weight of a base linear layer, [out, in].
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// A float weight [out, in].
    Float(Tensor),
    /// A quantised weight (candle's `QMatMul` computes `x W^T`).
    Quantized(QMatMul),
    /// A q8_0 weight read in place from a mapped bundle file.
    Mapped(super::mapped::MappedQ8),
    /// A q8_0 weight from a mapped bundle file, multiplied by candle's repacking kernel.
    Packed(super::mapped::PackedQ8),
    /// A weight packed for the in-house GEMM (f32 or bf16), see [`super::gemm`].
    Gemm(Arc<PackedWeight>),
    /// A q8_0 weight (mapped from a bundle, or quantised in process) multiplied by the
    /// in-house f32 GEMM on panels dequantised at each product ([`super::mapped::Q8Kernel::Gemm`]).
    Q8Gemm(super::mapped::MappedQ8),
    /// A weight rounded to bf16 but held as f32 [out, in], on CPUs without AVX512_BF16: the
    /// input is rounded to bf16 too, so the numbers are those of the bf16 kernel (slower).
    Bf16Emulated(Tensor),
}

impl BaseWeight {
    /// The weight as f32 [out, in] (dequantised or unpacked).
    pub fn to_f32(&self, out_dim: usize, in_dim: usize) -> Result<Tensor> {
        match self {
            BaseWeight::Float(w) | BaseWeight::Bf16Emulated(w) => w.to_dtype(DType::F32),
            BaseWeight::Quantized(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu),
            BaseWeight::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                w.to_dtype(DType::F32)
            }
            BaseWeight::Mapped(q) | BaseWeight::Q8Gemm(q) => q.dequantize(),
            BaseWeight::Packed(q) => q.source().dequantize(),
            BaseWeight::Gemm(p) => Tensor::from_vec(p.unpack(), (out_dim, in_dim), &Device::Cpu),
        }
    }
}

/// `y = x W^T + b` applied to the last axis of any-rank input.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: BaseWeight,
    bias: Option<Tensor>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    /// The layer `(in_dim, out_dim)` under `vb`: `weight` [out, in] in its stored form (see
    /// [`Vb::base_weight`]) and `bias` [out].
    pub fn new((in_dim, out_dim): (usize, usize), vb: Vb) -> Result<Self> {
        Ok(Self {
            weight: vb.base_weight(out_dim, in_dim)?,
            bias: Some(vb.get(out_dim, "bias")?),
            in_dim,
            out_dim,
        })
    }

    /// A float layer from `weight` [out, in] and an optional `bias` [out].
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        Ok(Self {
            weight: BaseWeight::Float(weight),
            bias,
            in_dim,
            out_dim,
        })
    }

    /// A layer from an already built base weight of shape [out_dim, in_dim].
    pub fn from_base(
        weight: BaseWeight,
        bias: Option<Tensor>,
        in_dim: usize,
        out_dim: usize,
    ) -> Self {
        Self {
            weight,
            bias,
            in_dim,
            out_dim,
        }
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The base weight.
    pub fn weight(&self) -> &BaseWeight {
        &self.weight
    }

    /// This layer with a float weight quantised to `dtype` (other weights are kept as they are).
    pub fn quantized(&self, dtype: GgmlDType) -> Result<Self> {
        let weight = match &self.weight {
            w @ (BaseWeight::Float(_) | BaseWeight::Gemm(_) | BaseWeight::Bf16Emulated(_)) => {
                let w = w.to_f32(self.out_dim, self.in_dim)?;
                let gemm = super::mapped::Q8Kernel::from_env() == super::mapped::Q8Kernel::Gemm;
                if dtype == GgmlDType::Q8_0 && gemm {
                    let values = w.flatten_all()?.to_vec1::<f32>()?;
                    let q = super::mapped::MappedQ8::quantize(&values, self.out_dim, self.in_dim)?;
                    BaseWeight::Q8Gemm(q)
                } else {
                    BaseWeight::Quantized(QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?)
                }
            }
            other => other.clone(),
        };
        Ok(Self::from_base(
            weight,
            self.bias.clone(),
            self.in_dim,
            self.out_dim,
        ))
    }

    /// This layer on `device` with a float weight and bias of `dtype`. On the CPU see
    /// [`Self::packed_for_cpu`]; anywhere else a quantised weight is dequantised first
    /// (candle's GPU backends have no q8_0 matmul with our mapped storage, and f16 from q8_0
    /// loses nothing: q8_0 values are 8-bit integers times an f16 scale).
    pub fn placed(&self, device: &Device, dtype: DType) -> Result<Self> {
        // The CPU's GEMM dtypes; f16 on the CPU (a test of the GPU path) takes candle's ops.
        if device.is_cpu() && matches!(dtype, DType::F32 | DType::BF16) {
            return self.packed_for_cpu(dtype);
        }
        let float = self.weight.to_f32(self.out_dim, self.in_dim)?;
        let put = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
        Ok(Self {
            weight: BaseWeight::Float(put(&float)?),
            bias: self.bias.as_ref().map(put).transpose()?,
            in_dim: self.in_dim,
            out_dim: self.out_dim,
        })
    }

    /// This layer for the CPU GEMM of `dtype` (f32 or bf16; the bias stays f32). f32: a float
    /// weight is packed for the AVX-512 kernel where the CPU has one, else kept for candle's
    /// matmul; q8_0 weights stay q8_0 (their memory is the point of them). bf16: every weight,
    /// q8_0 included, is converted to bf16 (packed, or emulated without AVX512_BF16).
    pub fn packed_for_cpu(&self, dtype: DType) -> Result<Self> {
        let gemm = if dtype == DType::BF16 {
            GemmDtype::Bf16
        } else {
            GemmDtype::F32
        };
        let keep = match &self.weight {
            BaseWeight::Gemm(p) => p.dtype() == gemm,
            BaseWeight::Bf16Emulated(_) => gemm == GemmDtype::Bf16,
            BaseWeight::Float(_) => false,
            _ => gemm == GemmDtype::F32,
        };
        if keep {
            return Ok(self.clone());
        }
        let w = self.weight.to_f32(self.out_dim, self.in_dim)?;
        // A mapped q8_0 matrix is read once here: its pages need not stay resident.
        match &self.weight {
            BaseWeight::Mapped(q) | BaseWeight::Q8Gemm(q) => q.release_pages(),
            BaseWeight::Packed(q) => q.source().release_pages(),
            _ => {}
        }
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let weight = match PackedWeight::pack(&values, self.out_dim, self.in_dim, gemm) {
            Some(p) => BaseWeight::Gemm(Arc::new(p)),
            None if gemm == GemmDtype::Bf16 => BaseWeight::Bf16Emulated(round_bf16(&w)?),
            None => BaseWeight::Float(w),
        };
        Ok(Self {
            weight,
            bias: self
                .bias
                .as_ref()
                .map(|b| b.to_dtype(DType::F32))
                .transpose()?,
            in_dim: self.in_dim,
            out_dim: self.out_dim,
        })
    }

    /// The bias [out], if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The profile label of this layer's GEMM.
    fn label(&self) -> &'static str {
        match self.out_dim.cmp(&self.in_dim) {
            std::cmp::Ordering::Equal => "gemm.square",
            std::cmp::Ordering::Greater => "gemm.up",
            std::cmp::Ordering::Less => "gemm.down",
        }
    }

    /// `x W^T + b` with `op` applied in the GEMM's last store (see [`Epilogue`]), or `None`
    /// when the weight is not packed for the in-house GEMM or the fused kernels are off
    /// (`NODULED_UNFUSED=1`): then the caller runs [`Self::forward_no_bias`] and the op.
    pub fn forward_fused(&self, xs: &Tensor, op: Fused<'_>) -> Result<Option<Tensor>> {
        if !matches!(self.weight, BaseWeight::Gemm(_) | BaseWeight::Q8Gemm(_)) {
            return Ok(None);
        }
        if !super::kernels::enabled() {
            return Ok(None);
        }
        let rows = xs.elem_count() / self.in_dim.max(1);
        let x2 = xs.reshape((rows, self.in_dim))?;
        let bias = match &self.bias {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0f32; self.out_dim],
        };
        let flops = 2.0 * (rows * self.in_dim * self.out_dim) as f64;
        let y = self.with_packed(flops, |p| match op {
            Fused::BiasQuickGelu => packed_matmul(p, &x2, |_| Epilogue::BiasQuickGelu(&bias)),
            Fused::BiasResidual(r) => {
                let r = r.to_dtype(DType::F32)?.contiguous()?.flatten_all()?;
                if r.elem_count() != rows * self.out_dim {
                    candle_core::bail!(
                        "gemm: residual of {} values, output {rows}x{}",
                        r.elem_count(),
                        self.out_dim
                    );
                }
                let (storage, layout) = r.storage_and_layout();
                let (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
                    (&*storage, layout.contiguous_offsets())
                else {
                    candle_core::bail!("gemm: the residual is not f32 on the CPU");
                };
                packed_matmul(p, &x2, |_| Epilogue::BiasResidual(&bias, &v[start..end]))
            }
        });
        let Some(y) = y else {
            return Ok(None);
        };
        let y = y?;
        let mut out_dims = xs.dims().to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.out_dim;
        Ok(Some(y.reshape(out_dims)?))
    }

    /// `x W^T` without the bias (for kernels that fuse the bias into the next op).
    pub fn forward_no_bias(&self, xs: &Tensor) -> Result<Tensor> {
        let mut out_dims = xs.dims().to_vec();
        let rows = xs.elem_count() / self.in_dim.max(1);
        let x2 = xs.reshape((rows, self.in_dim))?;
        let label = self.label();
        let flops = 2.0 * (rows * self.in_dim * self.out_dim) as f64;
        if let Some(y) = self.with_packed(flops, |p| packed_matmul(p, &x2, |_| Epilogue::None)) {
            *out_dims.last_mut().expect("rank >= 1") = self.out_dim;
            return y?.reshape(out_dims);
        }
        let y = timed_flops(label, flops, || match &self.weight {
            BaseWeight::Float(w) => x2.matmul(&w.t()?),
            BaseWeight::Quantized(q) => q.forward(&x2),
            BaseWeight::Mapped(q) => q.forward(&x2),
            BaseWeight::Packed(q) => q.forward(&x2),
            BaseWeight::Gemm(_) | BaseWeight::Q8Gemm(_) => {
                candle_core::bail!("gemm: a packed weight reached the unpacked path")
            }
            BaseWeight::Bf16Emulated(w) => round_bf16(&x2)?.matmul(&w.t()?),
        })?;
        *out_dims.last_mut().expect("rank >= 1") = self.out_dim;
        y.reshape(out_dims)
    }
}

impl Linear {
    /// Runs `gemm` on this layer's packed weight, timed under the layer's GEMM label: the
    /// resident packing, or for a q8_0 weight one dequantised into this thread's scratch
    /// (timed as `q8_0.unpack`); `None` for weights the in-house GEMM does not hold.
    fn with_packed(
        &self,
        flops: f64,
        gemm: impl FnOnce(&PackedWeight) -> Result<Tensor>,
    ) -> Option<Result<Tensor>> {
        let label = self.label();
        match &self.weight {
            BaseWeight::Gemm(p) => Some(timed_flops(label, flops, || gemm(p))),
            BaseWeight::Q8Gemm(q) => Some(
                PackedWeight::with_packed_rows(
                    q.out_dim(),
                    q.in_dim(),
                    |j, k0, out| q.segment(j, k0, out),
                    |p| timed_flops(label, flops, || gemm(p)),
                )
                .unwrap_or_else(|| candle_core::bail!("q8_0 GEMM: no f32 kernel on this CPU")),
            ),
            _ => None,
        }
    }
}

/// `t` rounded to bf16 (nearest even) and widened back to f32.
fn round_bf16(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
}

/// An op [`Linear::forward_fused`] applies in the GEMM's store.
#[derive(Debug, Clone, Copy)]
pub enum Fused<'a> {
    /// `QuickGELU(x W^T + b)` (CLIP's MLP up-projection).
    BiasQuickGelu,
    /// `residual + x W^T + b` (the projections back into the residual stream).
    BiasResidual(&'a Tensor),
}

/// `x W^T` with the in-house GEMM and the epilogue `epi` makes: `x` [rows, in] f32 on the CPU.
fn packed_matmul<'e>(
    p: &PackedWeight,
    x: &Tensor,
    epi: impl FnOnce(()) -> Epilogue<'e>,
) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (rows, in_dim) = x.dims2()?;
    if in_dim != p.in_dim() {
        candle_core::bail!("gemm: input width {in_dim}, weight expects {}", p.in_dim());
    }
    let mut out = vec![0f32; rows * p.out_dim()];
    {
        let (storage, layout) = x.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("gemm: the input is not contiguous f32 on the CPU");
        };
        p.matmul_fused(&v[start..end], rows, &mut out, epi(()));
    }
    Tensor::from_vec(out, (rows, p.out_dim()), &Device::Cpu)
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let y = self.forward_no_bias(xs)?;
        match &self.bias {
            Some(b) => timed("bias", || y.broadcast_add(b)),
            None => Ok(y),
        }
    }
}

/// Dropout on the LoRA path's input in training.
pub const LORA_DROPOUT: f64 = 0.25;

/// Inverted dropout for training: each value is zeroed with probability `p` and the rest
/// scaled by 1/(1-p). Masks come from a SplitMix64 shared by every layer of one forward, in
/// the order the layers run, so a seed fixes every mask of a training step.
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f64,
    rng: Arc<Mutex<SplitMix64>>,
}

impl Dropout {
    /// Dropout `p` drawing its masks from `rng`.
    pub fn new(p: f64, rng: Arc<Mutex<SplitMix64>>) -> Self {
        Self { p, rng }
    }
}

impl Module for Dropout {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mask: Vec<f32> = (0..xs.elem_count())
            .map(|_| if rng.uniform() < self.p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    }
}

/// Sizes of a [`LoraLinear`].
#[derive(Debug, Clone, Copy)]
pub struct LoraConfig {
    /// Input width.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
    /// LoRA rank r.
    pub rank: usize,
    /// LoRA scaling s = alpha / sqrt(r).
    pub scale: f64,
}

/// A base linear layer plus one unmerged LoRA path per fold.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    /// A_k^T stacked over folds: [folds, in, r].
    a_t: Tensor,
    /// s B_k^T stacked over folds: [folds, r, out].
    b_t_scaled: Tensor,
    /// Dropout on the LoRA path's input (training only).
    dropout: Option<Dropout>,
}

impl LoraLinear {
    /// The base layer under `vb` and every fold's `w_lora_A` [r, in] and `w_lora_B`
    /// [out, r] (fold k's under `vb.fold(k)`), with training's dropout when the store has it.
    pub fn new(cfg: &LoraConfig, vb: Vb) -> Result<Self> {
        let (a, b): (Vec<_>, Vec<_>) = (0..vb.n_folds())
            .map(|k| {
                let own = vb.fold(k);
                Ok((
                    own.get((cfg.rank, cfg.in_dim), "w_lora_A")?,
                    own.get((cfg.out_dim, cfg.rank), "w_lora_B")?,
                ))
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let base = Linear::new((cfg.in_dim, cfg.out_dim), vb.clone())?;
        Ok(Self::from_parts(
            base,
            &Tensor::stack(&a, 0)?,
            &Tensor::stack(&b, 0)?,
            cfg.scale,
        )?
        .with_dropout(vb.dropout(LORA_DROPOUT)))
    }

    /// Wraps `base` with per-fold factors `a` [folds, r, in] and `b` [folds, out, r].
    pub fn from_parts(base: Linear, a: &Tensor, b: &Tensor, scale: f64) -> Result<Self> {
        let a_t = a.transpose(1, 2)?.contiguous()?;
        let b_t_scaled = (b.transpose(1, 2)? * scale)?.contiguous()?;
        Ok(Self {
            base,
            a_t,
            b_t_scaled,
            dropout: None,
        })
    }

    /// This layer with `dropout` on the LoRA path's input (training's form:
    /// `y = x W^T + b + s (drop(x) A^T) B^T`).
    pub fn with_dropout(mut self, dropout: Option<Dropout>) -> Self {
        self.dropout = dropout;
        self
    }

    /// The base layer.
    pub fn base(&self) -> &Linear {
        &self.base
    }

    /// Number of folds.
    pub fn folds(&self) -> usize {
        self.a_t.dims()[0]
    }

    /// This layer on `device` in `dtype` (see [`Linear::placed`]), LoRA factors included
    /// (on the CPU they stay f32: activations are f32 there whatever the GEMM dtype).
    pub fn placed(&self, device: &Device, dtype: DType) -> Result<Self> {
        let act = if device.is_cpu() && dtype == DType::BF16 {
            DType::F32
        } else {
            dtype
        };
        let put = |t: &Tensor| t.to_dtype(act)?.to_device(device);
        Ok(Self {
            base: self.base.placed(device, dtype)?,
            a_t: put(&self.a_t)?,
            b_t_scaled: put(&self.b_t_scaled)?,
            dropout: self.dropout.clone(),
        })
    }

    /// This layer with its base weight quantised to `dtype`; the LoRA factors stay float.
    pub fn quantized(&self, dtype: GgmlDType) -> Result<Self> {
        Ok(Self {
            base: self.base.quantized(dtype)?,
            a_t: self.a_t.clone(),
            b_t_scaled: self.b_t_scaled.clone(),
            dropout: self.dropout.clone(),
        })
    }
}

impl Module for LoraLinear {
    /// `xs` [folds * n, ..., in] (fold-major) -> [folds * n, ..., out].
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let folds = self.folds();
        let y = self.base.forward_no_bias(xs)?;
        let in_dim = xs.dim(D::Minus1)?;
        let per_fold = xs.elem_count() / (folds * in_dim);
        let x3 = match &self.dropout {
            Some(d) => d.forward(xs)?,
            None => xs.clone(),
        };
        let x3 = x3.reshape((folds, per_fold, in_dim))?;
        let u = timed("lora.low", || x3.matmul(&self.a_t))?;
        // One pass: y + bias + u s B^T (falls back to candle ops off the f32 CPU path).
        if let Some(out) = timed("lora.add", || {
            super::kernels::bias_lora(&y, self.base.bias(), &u, &self.b_t_scaled)
        })? {
            return Ok(out);
        }
        let y = match self.base.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let low = u.matmul(&self.b_t_scaled)?.reshape(y.shape())?;
        y + low
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched unmerged layer equals, fold by fold, a plain layer with W + s B_k A_k.
    #[test]
    fn batched_lora_equals_merged_weight_per_fold() {
        let dev = Device::Cpu;
        let (folds, n, d_in, d_out, r, s) = (3, 4, 6, 5, 2, 0.7);
        let w = Tensor::randn(0f64, 1.0, (d_out, d_in), &dev).unwrap();
        let bias = Tensor::randn(0f64, 1.0, d_out, &dev).unwrap();
        let a = Tensor::randn(0f64, 1.0, (folds, r, d_in), &dev).unwrap();
        let b = Tensor::randn(0f64, 1.0, (folds, d_out, r), &dev).unwrap();
        let x = Tensor::randn(0f64, 1.0, (folds * n, 2, d_in), &dev).unwrap();
        let lora = LoraLinear::from_parts(
            Linear::from_tensors(w.clone(), Some(bias.clone())).unwrap(),
            &a,
            &b,
            s,
        )
        .unwrap();
        let y = lora.forward(&x).unwrap();
        assert_eq!(y.dims(), &[folds * n, 2, d_out]);
        for k in 0..folds {
            let delta = (b.get(k).unwrap().matmul(&a.get(k).unwrap()).unwrap() * s).unwrap();
            let merged = Linear::from_tensors((&w + delta).unwrap(), Some(bias.clone())).unwrap();
            let want = merged.forward(&x.narrow(0, k * n, n).unwrap()).unwrap();
            let got = y.narrow(0, k * n, n).unwrap();
            let err = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            assert!(err.to_scalar::<f64>().unwrap() < 1e-12);
        }
    }
}
