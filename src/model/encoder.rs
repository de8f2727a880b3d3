//! The pre-LN transformer shared by both CLIP towers: blocks of
//! `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`, with multi-head self-attention whose q, k and v
//! carry per-fold LoRA, and an MLP `c_fc -> QuickGELU -> c_proj`.
//!
//! Activations are `[folds * n, tokens, width]`, fold-major (see [`super::linear`]).
//! LayerNorm is written here in two passes (mean, then the mean of squared deviations, eps
//! 1e-5), because candle-nn's fused kernel takes the variance as E[x^2] - E[x]^2 in f32,
//! which loses digits on residual streams with a large mean.
//!
//! On the CPU the memory-bound steps run as fused kernels: where the weights are packed for
//! the in-house GEMM ([`super::gemm`], AVX-512, f32 or bf16) the MLP's bias + QuickGELU and
//! both projections' bias + residual add happen in the GEMM's last store; otherwise, and for
//! the LoRA update, each bias is applied in the pass that follows its GEMM
//! ([`super::kernels`]); attention runs per batch and head without transposed copies. Elsewhere (CUDA, or
//! `NODULED_UNFUSED=1`) the same maths runs as plain candle ops.
//!
//! In f16 (the GPU default, see [`crate::device`]) weights, residual stream and GEMM outputs
//! are f16 (cuBLAS accumulates f16 GEMMs in f32); LayerNorm upcasts to f32 for its statistics
//! (squared deviations of a residual stream overflow f16 past 256) and casts back; candle's
//! softmax accumulates f16 rows in f32 after subtracting the row maximum.

use super::config::ModelConfig;
use super::kernels;
use super::linear::{Fused, Linear, LoraConfig, LoraLinear};
use super::profile::timed;
use super::vb::Vb;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Module, Result, Tensor, D};

/// LayerNorm over the last axis with affine parameters.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// LayerNorm eps used throughout CLIP and the heads.
    pub const EPS: f64 = 1e-5;

    /// Reads `weight` and `bias`, both [width], under `vb`.
    pub fn new(width: usize, vb: Vb) -> Result<Self> {
        Ok(Self {
            weight: vb.get(width, "weight")?,
            bias: vb.get(width, "bias")?,
            eps: Self::EPS,
        })
    }

    /// From explicit parameters.
    pub fn from_parts(weight: Tensor, bias: Tensor) -> Self {
        Self {
            weight,
            bias,
            eps: Self::EPS,
        }
    }

    /// These parameters on `device`, kept in f32 whatever the activations' dtype.
    pub fn placed(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_device(device)?,
            bias: self.bias.to_device(device)?,
            eps: self.eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        timed("layernorm", || {
            match kernels::layer_norm(xs, &self.weight, &self.bias, self.eps)? {
                Some(out) => Ok(out),
                None => self.forward_unfused(xs),
            }
        })
    }
}

impl LayerNorm {
    fn forward_unfused(&self, xs: &Tensor) -> Result<Tensor> {
        let half = matches!(xs.dtype(), DType::F16 | DType::BF16);
        let x = if half {
            xs.to_dtype(DType::F32)?
        } else {
            xs.clone()
        };
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let out = normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?;
        if half {
            out.to_dtype(xs.dtype())
        } else {
            Ok(out)
        }
    }
}

/// QuickGELU, x * sigmoid(1.702 x), CLIP's MLP activation.
pub fn quick_gelu(xs: &Tensor) -> Result<Tensor> {
    xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?
}

/// Multi-head self-attention with LoRA on q, k and v and a plain output projection.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    fn new(cfg: &EncoderConfig, vb: Vb) -> Result<Self> {
        let lora = LoraConfig {
            in_dim: cfg.width,
            out_dim: cfg.width,
            rank: cfg.lora_rank,
            scale: cfg.lora_scale,
        };
        Ok(Self {
            q_proj: LoraLinear::new(&lora, vb.pp("q_proj"))?,
            k_proj: LoraLinear::new(&lora, vb.pp("k_proj"))?,
            v_proj: LoraLinear::new(&lora, vb.pp("v_proj"))?,
            proj: Linear::new((cfg.width, cfg.width), vb.pp("proj"))?,
            heads: cfg.heads,
        })
    }

    /// `xs` [b, t, d]; `mask` [t, t] added to the scores (causal text mask) or none;
    /// `queries`: only the first so many tokens' outputs (all when `None`).
    /// Returns the heads' outputs side by side, [b, queries, d], before the output projection
    /// (the block fuses its bias with the residual add).
    fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        queries: Option<usize>,
    ) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let tq = queries.unwrap_or(t).min(t);
        let hd = d / self.heads;
        let split = |x: Tensor, t: usize| -> Result<Tensor> {
            timed("attn.split", || {
                x.reshape((b, t, self.heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            })
        };
        let q_in = if tq < t {
            xs.narrow(1, 0, tq)?.contiguous()?
        } else {
            xs.clone()
        };
        let mask = match mask {
            Some(m) if tq < t => Some(m.narrow(0, 0, tq)?.contiguous()?),
            m => m.cloned(),
        };
        let (q, k, v) = (
            self.q_proj.forward(&q_in)?,
            self.k_proj.forward(xs)?,
            self.v_proj.forward(xs)?,
        );
        if let Some(y) = timed("attn.fused", || {
            kernels::attention(&q, &k, &v, self.heads, mask.as_ref())
        })? {
            return Ok(y);
        }
        let (q, k, v) = (split(q, tq)?, split(k, t)?, split(v, t)?);
        let scores = timed("attn.scores", || {
            let s = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            match &mask {
                Some(m) => s.broadcast_add(m),
                None => Ok(s),
            }
        })?;
        let att = timed("attn.softmax", || kernels::softmax_last(&scores))?;
        let y = timed("attn.av", || att.matmul(&v))?;
        timed("attn.merge", || y.transpose(1, 2)?.reshape((b, tq, d)))
    }
}

/// `residual + y + bias`, fused on the f32 CPU path.
fn add_bias_residual(residual: &Tensor, y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    timed("residual", || {
        match kernels::bias_residual(residual, y, bias)? {
            Some(out) => Ok(out),
            None => match bias {
                Some(b) => residual + y.broadcast_add(b)?,
                None => residual + y,
            },
        }
    })
}

/// One residual block.
#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
}

impl Block {
    fn placed(&self, device: &Device, dtype: DType) -> Result<Self> {
        let a = &self.attn;
        Ok(Self {
            ln_1: self.ln_1.placed(device)?,
            attn: Attention {
                q_proj: a.q_proj.placed(device, dtype)?,
                k_proj: a.k_proj.placed(device, dtype)?,
                v_proj: a.v_proj.placed(device, dtype)?,
                proj: a.proj.placed(device, dtype)?,
                heads: a.heads,
            },
            ln_2: self.ln_2.placed(device)?,
            c_fc: self.c_fc.placed(device, dtype)?,
            c_proj: self.c_proj.placed(device, dtype)?,
        })
    }

    fn quantized(&self, dtype: GgmlDType) -> Result<Self> {
        let a = &self.attn;
        Ok(Self {
            ln_1: self.ln_1.clone(),
            attn: Attention {
                q_proj: a.q_proj.quantized(dtype)?,
                k_proj: a.k_proj.quantized(dtype)?,
                v_proj: a.v_proj.quantized(dtype)?,
                proj: a.proj.quantized(dtype)?,
                heads: a.heads,
            },
            ln_2: self.ln_2.clone(),
            c_fc: self.c_fc.quantized(dtype)?,
            c_proj: self.c_proj.quantized(dtype)?,
        })
    }

    fn new(cfg: &EncoderConfig, vb: Vb) -> Result<Self> {
        let (d, mlp) = (cfg.width, vb.pp("mlp"));
        Ok(Self {
            ln_1: LayerNorm::new(d, vb.pp("ln_1"))?,
            attn: Attention::new(cfg, vb.pp("attn"))?,
            ln_2: LayerNorm::new(d, vb.pp("ln_2"))?,
            c_fc: Linear::new((d, 4 * d), mlp.pp("c_fc"))?,
            c_proj: Linear::new((4 * d, d), mlp.pp("c_proj"))?,
        })
    }

    /// `xs` [b, t, d] -> [b, queries, d]: the block's output for the first `queries` tokens
    /// (all when `None`).
    fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        queries: Option<usize>,
    ) -> Result<Tensor> {
        let t = xs.dim(1)?;
        let residual = match queries {
            Some(q) if q < t => &xs.narrow(1, 0, q)?.contiguous()?,
            _ => xs,
        };
        let a = self.attn.forward(&self.ln_1.forward(xs)?, mask, queries)?;
        let xs = match self
            .attn
            .proj
            .forward_fused(&a, Fused::BiasResidual(residual))?
        {
            Some(xs) => xs,
            None => {
                let a = self.attn.proj.forward_no_bias(&a)?;
                add_bias_residual(residual, &a, self.attn.proj.bias())?
            }
        };
        let x2 = self.ln_2.forward(&xs)?;
        let h = match self.c_fc.forward_fused(&x2, Fused::BiasQuickGelu)? {
            Some(h) => h,
            None => self.mlp_up_unfused(&x2)?,
        };
        drop(x2);
        if let Some(out) = self.c_proj.forward_fused(&h, Fused::BiasResidual(&xs))? {
            return Ok(out);
        }
        let m = self.c_proj.forward_no_bias(&h)?;
        drop(h);
        add_bias_residual(&xs, &m, self.c_proj.bias())
    }

    /// `QuickGELU(x W^T + b)` as a GEMM, then the fused bias + QuickGELU kernel (or candle ops).
    fn mlp_up_unfused(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.c_fc.forward_no_bias(x)?;
        timed("gelu", || {
            match kernels::bias_quick_gelu(&f, self.c_fc.bias())? {
                Some(h) => Ok(h),
                None => quick_gelu(&match self.c_fc.bias() {
                    Some(b) => f.broadcast_add(b)?,
                    None => f,
                }),
            }
        })
    }
}

/// Sizes of an [`Encoder`].
#[derive(Debug, Clone, Copy)]
pub struct EncoderConfig {
    /// Residual stream width d (the MLP is 4d wide).
    pub width: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// LoRA rank on q/k/v.
    pub lora_rank: usize,
    /// LoRA scaling s = alpha / sqrt(r).
    pub lora_scale: f64,
}

impl EncoderConfig {
    /// The vision tower's encoder.
    pub fn vision(cfg: &ModelConfig) -> Self {
        Self {
            width: cfg.vision_width,
            layers: cfg.vision_layers,
            heads: cfg.vision_heads,
            lora_rank: cfg.lora_r,
            lora_scale: cfg.lora_scale(),
        }
    }

    /// The text tower's encoder.
    pub fn text(cfg: &ModelConfig) -> Self {
        Self {
            width: cfg.text_width,
            layers: cfg.text_layers,
            heads: cfg.text_heads,
            lora_rank: cfg.lora_r,
            lora_scale: cfg.lora_scale(),
        }
    }
}

/// A stack of residual blocks, `resblocks.{i}` (the checkpoint's `transformer`).
#[derive(Debug, Clone)]
pub struct Encoder {
    blocks: Vec<Block>,
}

impl Encoder {
    /// Reads `cfg.layers` blocks under `vb.pp("resblocks")`.
    pub fn new(cfg: &EncoderConfig, vb: Vb) -> Result<Self> {
        let vb = vb.pp("resblocks");
        let blocks = (0..cfg.layers)
            .map(|i| Block::new(cfg, vb.pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self { blocks })
    }

    /// The same blocks with every base weight (q/k/v, projections, MLP) quantised to `dtype`;
    /// LayerNorms, biases and LoRA factors stay f32.
    pub fn quantized(&self, dtype: GgmlDType) -> Result<Self> {
        let blocks = self
            .blocks
            .iter()
            .map(|b| b.quantized(dtype))
            .collect::<Result<_>>()?;
        Ok(Self { blocks })
    }

    /// The same blocks on `device`, weights in `dtype` (LayerNorms in f32); on the CPU in f32
    /// unchanged.
    pub fn placed(&self, device: &Device, dtype: DType) -> Result<Self> {
        let blocks = self
            .blocks
            .iter()
            .map(|b| b.placed(device, dtype))
            .collect::<Result<_>>()?;
        Ok(Self { blocks })
    }

    /// `xs` [folds * n, t, d] -> same shape.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for block in &self.blocks {
            xs = block.forward(&xs, mask, None)?;
        }
        Ok(xs)
    }

    /// The final output of the first token only, [folds * n, d] (the vision tower's class
    /// token). Equal to `forward(xs)[:, 0]`, but the last block computes its query, attention
    /// output and MLP for that token alone (its keys and values still cover every token):
    /// at ViT-B/32 sizes that skips 10/12 of one block's GEMM work, ~7% of the tower.
    pub fn forward_first_token(&self, xs: &Tensor) -> Result<Tensor> {
        let Some((last, rest)) = self.blocks.split_last() else {
            return xs.narrow(1, 0, 1)?.squeeze(1);
        };
        let mut xs = xs.clone();
        for block in rest {
            xs = block.forward(&xs, None, None)?;
        }
        last.forward(&xs, None, Some(1))?.squeeze(1)
    }
}
