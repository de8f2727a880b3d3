//! Fused CPU kernels for the towers' memory-bound ops, over contiguous row-major f32 slices,
//! parallel over rows with rayon: LayerNorm, bias + QuickGELU, bias + LoRA low-rank update,
//! bias + residual, and multi-head attention at short sequence lengths.
//!
//! Why in-house: at 50 tokens the towers' GEMMs are near the CPU's peak, and what is left is
//! candle's one-op-per-pass elementwise chain (each pass reads and writes the whole activation
//! and allocates a fresh buffer) and attention as hundreds of tiny batched GEMMs. Each kernel
//! here does its op in one pass. Every wrapper falls back to plain candle ops for tensors that
//! are not contiguous f32 on the CPU, so other devices and dtypes keep working.
//!
//! `exp` is a branch-free polynomial (Cody-Waite reduction, degree-7 Taylor on
//! |r| <= ln2/2, relative error < 2e-7 over the clamped range) so that the loops vectorise.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Rows per rayon task: enough work to amortise scheduling, enough tasks to balance.
const ROWS_PER_TASK: usize = 16;

/// Whether the fused kernels are on: `NODULED_UNFUSED=1` turns them off (plain candle ops),
/// for A/B timing and for checking them against the unfused path.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("NODULED_UNFUSED").map_or(true, |v| v.is_empty() || v == "0"))
}

/// The tensor's data as a contiguous f32 slice, or `None` (not CPU, not f32, strided, or the
/// kernels are off).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !enabled() || t.dtype() != DType::F32 || !t.device().is_cpu() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(&v[start..end])),
        _ => None,
    }
}

fn from_vec(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, like.shape(), &Device::Cpu)
}

/// Branch-free `e^x` for f32 (see the module doc), inputs clamped to [-87, 88].
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let k = t - MAGIC;
    let r = x - k * LN2_HI - k * LN2_LO;
    let ki = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits(((ki + 127) << 23) as u32);
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    p * scale
}

/// Sum of a slice with eight independent lanes (vectorises without reassociation flags).
#[inline(always)]
fn sum8(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    let mut s: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for a in acc {
        s += a;
    }
    s
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for v in acc {
        s += v;
    }
    s
}

/// LayerNorm over the last axis (two passes per row: mean, then mean squared deviation).
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let d = xs.dim(candle_core::D::Minus1)?;
    let (Some(w), Some(b)) = (
        with_f32(weight, |w| w.to_vec()),
        with_f32(bias, |b| b.to_vec()),
    ) else {
        return Ok(None);
    };
    if w.len() != d || b.len() != d || d == 0 {
        return Ok(None);
    }
    let eps = eps as f32;
    let out = with_f32(xs, |x| {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    let mean = sum8(x, |v| v) / d as f32;
                    let var = sum8(x, |v| (v - mean) * (v - mean)) / d as f32;
                    let inv = 1.0 / (var + eps).sqrt();
                    for i in 0..d {
                        o[i] = (x[i] - mean) * inv * w[i] + b[i];
                    }
                }
            });
        out
    });
    out.map(|v| from_vec(v, xs)).transpose()
}

/// `QuickGELU(y + bias)`, QuickGELU(x) = x * sigmoid(1.702 x), bias over the last axis.
pub fn bias_quick_gelu(y: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let d = y.dim(candle_core::D::Minus1)?;
    let b = match bias {
        Some(b) => match with_f32(b, |b| b.to_vec()) {
            Some(b) if b.len() == d => b,
            _ => return Ok(None),
        },
        None => vec![0.0; d],
    };
    let out = with_f32(y, |x| {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    for i in 0..d {
                        let v = x[i] + b[i];
                        o[i] = v / (1.0 + exp(-1.702 * v));
                    }
                }
            });
        out
    });
    out.map(|v| from_vec(v, y)).transpose()
}

/// `residual + y + bias` (bias over the last axis).
pub fn bias_residual(
    residual: &Tensor,
    y: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let d = y.dim(candle_core::D::Minus1)?;
    if residual.shape() != y.shape() {
        return Ok(None);
    }
    let b = match bias {
        Some(b) => match with_f32(b, |b| b.to_vec()) {
            Some(b) if b.len() == d => b,
            _ => return Ok(None),
        },
        None => vec![0.0; d],
    };
    let out = with_f32(residual, |r| {
        with_f32(y, |x| {
            let mut out = vec![0f32; x.len()];
            out.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(x.par_chunks(d * ROWS_PER_TASK))
                .zip(r.par_chunks(d * ROWS_PER_TASK))
                .for_each(|((o, x), r)| {
                    for ((o, x), r) in o
                        .chunks_exact_mut(d)
                        .zip(x.chunks_exact(d))
                        .zip(r.chunks_exact(d))
                    {
                        for i in 0..d {
                            o[i] = r[i] + x[i] + b[i];
                        }
                    }
                });
            out
        })
    })
    .flatten();
    out.map(|v| from_vec(v, y)).transpose()
}

/// `y + bias + u_k B_k` per row, where row block k (fold-major, `rows / folds` rows each)
/// uses fold k's `b_scaled` [r, out] (B_k^T already times the LoRA scale) and `u` [rows, r]
/// is `x A_k^T`.
pub fn bias_lora(
    y: &Tensor,
    bias: Option<&Tensor>,
    u: &Tensor,
    b_scaled: &Tensor,
) -> Result<Option<Tensor>> {
    let d = y.dim(candle_core::D::Minus1)?;
    let (folds, r, out_dim) = b_scaled.dims3()?;
    let rows = y.elem_count() / d.max(1);
    if out_dim != d || u.elem_count() != rows * r || folds == 0 || rows % folds != 0 {
        return Ok(None);
    }
    let per_fold = rows / folds;
    let bias = match bias {
        Some(b) => match with_f32(b, |b| b.to_vec()) {
            Some(b) if b.len() == d => b,
            _ => return Ok(None),
        },
        None => vec![0.0; d],
    };
    let (Some(bs), Some(uv)) = (
        with_f32(b_scaled, |b| b.to_vec()),
        with_f32(u, |u| u.to_vec()),
    ) else {
        return Ok(None);
    };
    let out = with_f32(y, |x| {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, (o, x))| {
                for (j, (o, x)) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
                    let row = task * ROWS_PER_TASK + j;
                    let k = row / per_fold;
                    let bk = &bs[k * r * d..(k + 1) * r * d];
                    let ur = &uv[row * r..(row + 1) * r];
                    for i in 0..d {
                        o[i] = x[i] + bias[i];
                    }
                    for (c, &uc) in ur.iter().enumerate() {
                        let brow = &bk[c * d..(c + 1) * d];
                        for i in 0..d {
                            o[i] += uc * brow[i];
                        }
                    }
                }
            });
        out
    });
    out.map(|v| from_vec(v, y)).transpose()
}

/// Multi-head attention on `[b, t, d]` q, k, v (heads side by side along d, as the
/// projections produce them): per batch and head, `softmax(q k^T / sqrt(hd) + mask) v`,
/// written back as `[b, t, d]`. `mask` is `[t, t]`, added to the scores.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (b, t, d) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() || heads == 0 || d % heads != 0 {
        return Ok(None);
    }
    let mask = match mask {
        Some(m) => match with_f32(m, |m| m.to_vec()) {
            Some(m) if m.len() == t * t => Some(m),
            _ => return Ok(None),
        },
        None => None,
    };
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let out = with_f32(q, |q| {
        with_f32(k, |k| {
            with_f32(v, |v| {
                let mut out = vec![0f32; b * t * d];
                out.par_chunks_mut(t * d).enumerate().for_each(|(bi, o)| {
                    let base = bi * t * d;
                    let (q, k, v) = (
                        &q[base..base + t * d],
                        &k[base..base + t * d],
                        &v[base..base + t * d],
                    );
                    let mut p = vec![0f32; t];
                    for h in 0..heads {
                        let cols = h * hd..(h + 1) * hd;
                        for i in 0..t {
                            let qi = &q[i * d..][cols.clone()];
                            let mut max = f32::NEG_INFINITY;
                            for (j, pj) in p.iter_mut().enumerate() {
                                let mut s = dot(qi, &k[j * d..][cols.clone()]) * scale;
                                if let Some(m) = &mask {
                                    s += m[i * t + j];
                                }
                                *pj = s;
                                max = max.max(s);
                            }
                            let mut sum = 0.0;
                            for pj in p.iter_mut() {
                                *pj = exp(*pj - max);
                                sum += *pj;
                            }
                            let inv = 1.0 / sum;
                            let oi = &mut o[i * d..][cols.clone()];
                            oi.fill(0.0);
                            for (j, &pj) in p.iter().enumerate() {
                                let w = pj * inv;
                                let vj = &v[j * d..][cols.clone()];
                                for c in 0..hd {
                                    oi[c] += w * vj[c];
                                }
                            }
                        }
                    }
                });
                out
            })
        })
    })
    .flatten()
    .flatten();
    out.map(|o| from_vec(o, q)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::D;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn randn(shape: &[usize], std: f32) -> Tensor {
        Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn exp_is_accurate_over_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp(-1000.0), exp(-87.0));
    }

    #[test]
    fn layer_norm_matches_the_formula() {
        let x = (randn(&[37, 96], 1.0) + 3.0).unwrap();
        let w = randn(&[96], 1.0);
        let b = randn(&[96], 1.0);
        let got = layer_norm(&x, &w, &b, 1e-5).unwrap().unwrap();
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let c = x.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let want = c
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn bias_gelu_residual_and_lora_match_candle_ops() {
        let y = randn(&[6, 5, 40], 2.0);
        let bias = randn(&[40], 1.0);
        let got = bias_quick_gelu(&y, Some(&bias)).unwrap().unwrap();
        let z = y.broadcast_add(&bias).unwrap();
        let want = (&z * candle_nn::ops::sigmoid(&(&z * 1.702).unwrap()).unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);

        let r = randn(&[6, 5, 40], 1.0);
        let got = bias_residual(&r, &y, Some(&bias)).unwrap().unwrap();
        let want = (&r + y.broadcast_add(&bias).unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);

        // 3 folds of 2 rows each, rank 2.
        let u = randn(&[6, 5, 2], 1.0);
        let bs = randn(&[3, 2, 40], 1.0);
        let got = bias_lora(&y, Some(&bias), &u, &bs).unwrap().unwrap();
        let low = u
            .reshape((3, 10, 2))
            .unwrap()
            .matmul(&bs)
            .unwrap()
            .reshape((6, 5, 40))
            .unwrap();
        let want = (y.broadcast_add(&bias).unwrap() + low).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn attention_matches_the_textbook_form() {
        let (b, t, heads, hd) = (3, 7, 4, 8);
        let d = heads * hd;
        let q = randn(&[b, t, d], 1.0);
        let k = randn(&[b, t, d], 1.0);
        let v = randn(&[b, t, d], 1.0);
        let mask = randn(&[t, t], 1.0);
        for m in [None, Some(&mask)] {
            let got = attention(&q, &k, &v, heads, m).unwrap().unwrap();
            let split = |x: &Tensor| {
                x.reshape((b, t, heads, hd))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let (qs, ks, vs) = (split(&q), split(&k), split(&v));
            let mut s = (qs.matmul(&ks.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
            if let Some(m) = m {
                s = s.broadcast_add(m).unwrap();
            }
            let a = candle_nn::ops::softmax_last_dim(&s).unwrap();
            let want = a
                .matmul(&vs)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, d))
                .unwrap();
            assert!(max_diff(&got, &want) < 1e-5);
        }
    }
}
