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
/// for A/B timing and for checking them against the unfused path; they are also off inside
/// [`differentiable`].
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !DIFFERENTIABLE.get()
        && *ON.get_or_init(|| {
            std::env::var("NODULED_UNFUSED").map_or(true, |v| v.is_empty() || v == "0")
        })
}

thread_local! {
    static DIFFERENTIABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every model op on plain differentiable candle ops on this thread: the fused
/// kernels (which have no backward: their outputs are fresh tensors outside the graph) are
/// off and [`softmax_last`] is written from elementary ops. Training runs its forwards
/// inside this; scoring never does, so its speed is unchanged.
pub fn differentiable<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            DIFFERENTIABLE.set(self.0);
        }
    }
    let _restore = Restore(DIFFERENTIABLE.replace(true));
    f()
}

/// Softmax over the last axis: candle-nn's fused kernel for inference; inside
/// [`differentiable`] the same maths from elementary ops, because candle-nn's
/// `softmax_last_dim` has no backward and silently cuts the graph (nothing before it would
/// get a gradient: attention queries and keys, their LoRA factors, the MIL attention).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if !DIFFERENTIABLE.get() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let max = x.max_keepdim(candle_core::D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)
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

/// Defines `$name(args)`, which runs `$body::<true>(args)` compiled for AVX-512F (zmm) or
/// AVX2 + FMA, whichever the CPU has first, and `$body::<false>(args)` (baseline instructions)
/// otherwise. On a Zen 4 the AVX-512 build cut attention's CPU time by ~10%, LayerNorm's by
/// ~30% and the LoRA update's by ~20% (docs/performance.md, "Zen 4 again, quiet").
macro_rules! dispatch {
    ($name:ident => $body:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f") {
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    unsafe fn wide512($($arg: $ty),*) {
                        $body::<true>($($arg),*)
                    }
                    // SAFETY: the CPU supports AVX-512F (checked just above), hence AVX2, FMA.
                    return unsafe { wide512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn wide($($arg: $ty),*) {
                        $body::<true>($($arg),*)
                    }
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            $body::<false>($($arg),*)
        }
    };
}

/// `a * b + c`, fused where the CPU has FMA (the `FMA` paths are only called there).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Sum of `f` over a slice with eight independent lanes (vectorises without reassociation).
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

/// The bias as a Vec of length `d` (zeros when absent), or `None` when it does not fit.
fn bias_vec(bias: Option<&Tensor>, d: usize) -> Option<Vec<f32>> {
    match bias {
        Some(b) => with_f32(b, |b| b.to_vec()).filter(|b| b.len() == d),
        None => Some(vec![0.0; d]),
    }
}

#[inline(always)]
fn ln_rows<const FMA: bool>(o: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    let d = w.len();
    for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let mean = sum8(x, |v| v) / d as f32;
        let var = sum8(x, |v| (v - mean) * (v - mean)) / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for i in 0..d {
            o[i] = madd::<FMA>((x[i] - mean) * inv, w[i], b[i]);
        }
    }
}
dispatch!(ln_task => ln_rows(o: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32));

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
            .for_each(|(o, x)| ln_task(o, x, &w, &b, eps));
        out
    });
    out.map(|v| from_vec(v, xs)).transpose()
}

#[inline(always)]
fn gelu_rows<const FMA: bool>(o: &mut [f32], x: &[f32], b: &[f32]) {
    let d = b.len();
    for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        for i in 0..d {
            let v = x[i] + b[i];
            o[i] = v / (1.0 + exp(-1.702 * v));
        }
    }
}
dispatch!(gelu_task => gelu_rows(o: &mut [f32], x: &[f32], b: &[f32]));

/// `QuickGELU(y + bias)`, QuickGELU(x) = x * sigmoid(1.702 x), bias over the last axis.
pub fn bias_quick_gelu(y: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let d = y.dim(candle_core::D::Minus1)?;
    let Some(b) = bias_vec(bias, d).filter(|_| d > 0) else {
        return Ok(None);
    };
    let out = with_f32(y, |x| {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(o, x)| gelu_task(o, x, &b));
        out
    });
    out.map(|v| from_vec(v, y)).transpose()
}

#[inline(always)]
fn residual_rows<const FMA: bool>(o: &mut [f32], x: &[f32], r: &[f32], b: &[f32]) {
    let d = b.len();
    for ((o, x), r) in o
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d))
        .zip(r.chunks_exact(d))
    {
        for i in 0..d {
            o[i] = r[i] + x[i] + b[i];
        }
    }
}
dispatch!(residual_task => residual_rows(o: &mut [f32], x: &[f32], r: &[f32], b: &[f32]));

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
    let Some(b) = bias_vec(bias, d).filter(|_| d > 0) else {
        return Ok(None);
    };
    let out = with_f32(residual, |r| {
        with_f32(y, |x| {
            let mut out = vec![0f32; x.len()];
            out.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(x.par_chunks(d * ROWS_PER_TASK))
                .zip(r.par_chunks(d * ROWS_PER_TASK))
                .for_each(|((o, x), r)| residual_task(o, x, r, &b));
            out
        })
    })
    .flatten();
    out.map(|v| from_vec(v, y)).transpose()
}

/// Rows `first..` of the LoRA update: `o = x + bias + u_row (s B_k^T)`, k = row / per_fold;
/// `u` holds these rows' `rank` values each, `bs` all folds' [rank, d] blocks.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lora_rows<const FMA: bool>(
    o: &mut [f32],
    x: &[f32],
    bias: &[f32],
    bs: &[f32],
    u: &[f32],
    rank: usize,
    per_fold: usize,
    first: usize,
) {
    let d = bias.len();
    for (j, (o, x)) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
        let k = (first + j) / per_fold;
        let bk = &bs[k * rank * d..(k + 1) * rank * d];
        let ur = &u[j * rank..(j + 1) * rank];
        for i in 0..d {
            o[i] = x[i] + bias[i];
        }
        for (c, &uc) in ur.iter().enumerate() {
            for (oi, &bv) in o.iter_mut().zip(&bk[c * d..(c + 1) * d]) {
                *oi = madd::<FMA>(uc, bv, *oi);
            }
        }
    }
}
dispatch!(lora_task => lora_rows(
    o: &mut [f32],
    x: &[f32],
    bias: &[f32],
    bs: &[f32],
    u: &[f32],
    rank: usize,
    per_fold: usize,
    first: usize,
));

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
    let (folds, rank, out_dim) = b_scaled.dims3()?;
    let rows = y.elem_count() / d.max(1);
    if d == 0 || out_dim != d || u.elem_count() != rows * rank || folds == 0 || rows % folds != 0 {
        return Ok(None);
    }
    let per_fold = rows / folds;
    let Some(bias) = bias_vec(bias, d) else {
        return Ok(None);
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
            .zip(uv.par_chunks(rank * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, ((o, x), u))| {
                lora_task(o, x, &bias, &bs, u, rank, per_fold, task * ROWS_PER_TASK)
            });
        out
    });
    out.map(|v| from_vec(v, y)).transpose()
}

/// In place, for each query column of `st` ([t][tqp], keys by queries, `tqp` a multiple of
/// [`QW`]): the softmax over the t keys, vectorised across [`QW`] queries at a time; `mask`
/// ([tq, t]) is added first.
#[inline(always)]
fn softmax_columns(st: &mut [f32], t: usize, tq: usize, mask: Option<&[f32]>) {
    let tqp = st.len() / t;
    if let Some(m) = mask {
        for (i, m_row) in m.chunks_exact(t).take(tq).enumerate() {
            for (j, &mv) in m_row.iter().enumerate() {
                st[j * tqp + i] += mv;
            }
        }
    }
    for ib in (0..tqp).step_by(QW) {
        let mut max = [f32::NEG_INFINITY; QW];
        for row in st.chunks_exact(tqp) {
            for (mx, &x) in max.iter_mut().zip(&row[ib..ib + QW]) {
                *mx = mx.max(x);
            }
        }
        let mut sum = [0f32; QW];
        for row in st.chunks_exact_mut(tqp) {
            for ((x, s), &mx) in row[ib..ib + QW].iter_mut().zip(&mut sum).zip(&max) {
                *x = exp(*x - mx);
                *s += *x;
            }
        }
        let inv = sum.map(|s| 1.0 / s);
        for row in st.chunks_exact_mut(tqp) {
            for (x, &iv) in row[ib..ib + QW].iter_mut().zip(&inv) {
                *x *= iv;
            }
        }
    }
}

/// Queries per vector in attention (one zmm, or two ymm).
const QW: usize = 16;

/// One batch item of attention: `q`, `o` are [tq, d], `k`, `v` [t, d], heads side by side;
/// `mask` is [tq, t]. Per head it works on S^T (keys by queries): K's rows are read in place
/// (each step broadcasts one key value against [`QW`] queries of Q^T), the softmax runs down
/// the columns across [`QW`] queries at once, and P V broadcasts 4 adjacent
/// probabilities of a key's row; only Q is transposed.
#[inline(always)]
fn attention_item<const FMA: bool>(
    o: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    heads: usize,
    mask: Option<&[f32]>,
) {
    let d = k.len() / t;
    let tq = q.len() / d;
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // Queries padded to whole vectors; the padding stays zero and is never written out.
    let tqp = tq.div_ceil(QW) * QW;
    let mut qt = vec![0f32; hd * tqp]; // this head's (Q / sqrt(hd))^T
    let mut st = vec![0f32; t * tqp]; // S^T, then P^T
    for h in 0..heads {
        let cols = h * hd..(h + 1) * hd;
        for i in 0..tq {
            for (c, &qv) in q[i * d..][cols.clone()].iter().enumerate() {
                qt[c * tqp + i] = qv * scale;
            }
        }
        scores_t::<FMA>(&mut st, &qt, k, d, cols.clone());
        softmax_columns(&mut st, t, tq, mask);
        weighted_values::<FMA>(o, &st, v, tq, d, cols);
    }
}

/// S^T = K Q^T for one head (columns `cols` of K's rows, d wide) into `st` ([t][tqp]), from
/// `qt` ([hd][tqp]), in blocks of 4 keys x [`QW`] queries held in registers.
#[inline(always)]
fn scores_t<const FMA: bool>(
    st: &mut [f32],
    qt: &[f32],
    k: &[f32],
    d: usize,
    cols: std::ops::Range<usize>,
) {
    const KR: usize = 4;
    let (t, hd) = (k.len() / d, cols.len());
    let tqp = st.len() / t;
    let zeros = vec![0f32; hd]; // keys past t, read but not stored
    for jb in (0..t).step_by(KR) {
        let k_rows: [&[f32]; KR] = std::array::from_fn(|r| match jb + r < t {
            true => &k[(jb + r) * d..][cols.clone()],
            false => &zeros[..],
        });
        for ib in (0..tqp).step_by(QW) {
            let mut acc = [[0f32; QW]; KR];
            for (c, q_row) in qt.chunks_exact(tqp).enumerate() {
                let qv: &[f32; QW] = q_row[ib..ib + QW].try_into().expect("QW");
                for (a, k_row) in acc.iter_mut().zip(&k_rows) {
                    let kv = k_row[c];
                    for l in 0..QW {
                        a[l] = madd::<FMA>(kv, qv[l], a[l]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(t - jb) {
                st[(jb + r) * tqp + ib..][..QW].copy_from_slice(a);
            }
        }
    }
}

/// O = P V for one head: rows of `o` ([tq, d]), columns `cols`, from `pt` ([t][tqp], P^T) and
/// `v` ([t, d]), in blocks of 4 queries x 16 columns held in registers (a plain loop where
/// the head width is not a multiple of 16).
#[inline(always)]
fn weighted_values<const FMA: bool>(
    o: &mut [f32],
    pt: &[f32],
    v: &[f32],
    tq: usize,
    d: usize,
    cols: std::ops::Range<usize>,
) {
    const QB: usize = 4;
    const CB: usize = 16;
    let tqp = pt.len() / (v.len() / d);
    if cols.len() % CB != 0 {
        for i in 0..tq {
            let oi = &mut o[i * d..][cols.clone()];
            oi.fill(0.0);
            for (p_row, v_row) in pt.chunks_exact(tqp).zip(v.chunks_exact(d)) {
                for (oc, &vc) in oi.iter_mut().zip(&v_row[cols.clone()]) {
                    *oc = madd::<FMA>(p_row[i], vc, *oc);
                }
            }
        }
        return;
    }
    for ib in (0..tq).step_by(QB) {
        for c0 in cols.clone().step_by(CB) {
            let mut acc = [[0f32; CB]; QB];
            for (p_row, v_row) in pt.chunks_exact(tqp).zip(v.chunks_exact(d)) {
                let pv: &[f32; QB] = p_row[ib..ib + QB].try_into().expect("QB");
                let vv: &[f32; CB] = v_row[c0..c0 + CB].try_into().expect("CB");
                for (a, &pw) in acc.iter_mut().zip(pv) {
                    for l in 0..CB {
                        a[l] = madd::<FMA>(pw, vv[l], a[l]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(tq - ib) {
                o[(ib + r) * d + c0..][..CB].copy_from_slice(a);
            }
        }
    }
}
dispatch!(attention_task => attention_item(
    o: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    heads: usize,
    mask: Option<&[f32]>,
));

/// Multi-head attention on q `[b, tq, d]` and k, v `[b, t, d]` (heads side by side along d,
/// as the projections produce them): per batch and head, `softmax(q k^T / sqrt(hd) + mask) v`,
/// written back as `[b, tq, d]`. `mask` is `[tq, t]`, added to the scores.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (b, t, d) = k.dims3()?;
    let (bq, tq, dq) = q.dims3()?;
    if (bq, dq) != (b, d)
        || v.dims() != k.dims()
        || heads == 0
        || d % heads != 0
        || t == 0
        || tq == 0
        || d == 0
    {
        return Ok(None);
    }
    let mask = match mask {
        Some(m) => match with_f32(m, |m| m.to_vec()) {
            Some(m) if m.len() == tq * t => Some(m),
            _ => return Ok(None),
        },
        None => None,
    };
    let out = with_f32(q, |q| {
        with_f32(k, |k| {
            with_f32(v, |v| {
                let mut out = vec![0f32; b * tq * d];
                let (n, nq) = (t * d, tq * d);
                out.par_chunks_mut(nq)
                    .zip(q.par_chunks(nq))
                    .zip(k.par_chunks(n).zip(v.par_chunks(n)))
                    .for_each(|((o, q), (k, v))| {
                        attention_task(o, q, k, v, t, heads, mask.as_deref())
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
        // hd 8: the plain P V path; hd 16, 32: the register-blocked one; t 2, 21, 50: key
        // blocks of 4 with a remainder; queries padded to 16.
        for (b, t, heads, hd) in [(3, 7, 4, 8), (2, 50, 2, 32), (1, 2, 1, 16), (1, 21, 3, 16)] {
            check_attention(b, t, heads, hd);
        }
        // No queries: left to the caller's candle ops.
        let k = randn(&[1, 5, 8], 1.0);
        let q0 = Tensor::zeros((1, 0, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(attention(&q0, &k, &k, 2, None).unwrap().is_none());
    }

    fn check_attention(b: usize, t: usize, heads: usize, hd: usize) {
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
            // The first two queries only.
            let m2 = m.map(|m| m.narrow(0, 0, 2).unwrap().contiguous().unwrap());
            let q2 = q.narrow(1, 0, 2).unwrap().contiguous().unwrap();
            let got2 = attention(&q2, &k, &v, heads, m2.as_ref()).unwrap().unwrap();
            assert!(max_diff(&got2, &want.narrow(1, 0, 2).unwrap()) < 1e-5);
        }
    }
}
