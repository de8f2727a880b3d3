//! The AVX-512 micro-kernels of [`super`]: a 12 x 32 tile of C in 24 zmm accumulators, f32
//! (`vfmadd231ps`) or bf16 pairs (`vdpbf16ps`), detected at run time. On other architectures
//! (and x86 CPUs without AVX-512) [`supported`] is false and nothing here runs.

use super::{GemmDtype, Tile, KC, MR, NR};

/// Whether the CPU has the instructions of `dtype`'s micro-kernel.
pub fn supported(dtype: GemmDtype) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static F32: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        static BF16: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let f32_ok = *F32.get_or_init(|| std::is_x86_feature_detected!("avx512f"));
        match dtype {
            GemmDtype::F32 => f32_ok,
            GemmDtype::Bf16 => {
                f32_ok
                    && *BF16.get_or_init(|| {
                        std::is_x86_feature_detected!("avx512bf16")
                            && std::is_x86_feature_detected!("avx512bw")
                    })
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        false
    }
}

/// Runs one tile. Only called when [`supported`] holds for `dtype`.
pub fn kernel(dtype: GemmDtype, t: Tile<'_>) {
    super::check_tile(&t);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(supported(dtype));
        match dtype {
            GemmDtype::F32 => {
                assert!(t.b.len() >= t.kc * NR * 4);
                // SAFETY: AVX-512F is present (asserted); the asserts above bound every access.
                unsafe { x86::tile_f32(&t) }
            }
            GemmDtype::Bf16 => {
                assert!(t.b.len() >= t.kc.div_ceil(2) * NR * 4);
                // SAFETY: AVX-512F/BF16/BW are present (asserted); accesses bounded as above.
                unsafe { x86::tile_bf16(&t) }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, t);
        unreachable!("no AVX-512 micro-kernel on this architecture");
    }
}

/// `src` f32 rounded to bf16 (nearest even), written as pairs (low half first) into `dst`
/// (`src.len().div_ceil(2)` values; an odd tail pairs with zero).
pub fn to_bf16_pairs(src: &[f32], dst: &mut [u32]) {
    assert_eq!(dst.len(), src.len().div_ceil(2));
    #[cfg(target_arch = "x86_64")]
    if supported(GemmDtype::Bf16) {
        // SAFETY: AVX-512F/BF16/BW are present; lengths checked above.
        return unsafe { x86::to_bf16_pairs(src, dst) };
    }
    to_bf16_pairs_scalar(src, dst);
}

fn to_bf16_pairs_scalar(src: &[f32], dst: &mut [u32]) {
    for (d, pair) in dst.iter_mut().zip(src.chunks(2)) {
        let lo = half::bf16::from_f32(pair[0]).to_bits() as u32;
        let hi = pair
            .get(1)
            .map_or(0, |&v| half::bf16::from_f32(v).to_bits() as u32);
        *d = lo | (hi << 16);
    }
}

/// See [`super::peak_gflops`].
pub fn peak_gflops(dtype: GemmDtype, ms: u64) -> Option<f64> {
    if !supported(dtype) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // 12 chains x 16 lanes x 2 FLOP (bf16: x 2 products per lane) per iteration.
        let per_iter = 12.0 * 16.0 * 2.0 * if dtype == GemmDtype::Bf16 { 2.0 } else { 1.0 };
        // SAFETY: the instructions are present (checked above).
        Some(super::measure_peak(ms, per_iter, |n| unsafe {
            x86::peak_loop(dtype, n)
        }))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ms;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, KC, MR, NR};
    use std::arch::x86_64::*;

    /// Masks of the valid lanes in the tile's two column vectors.
    #[inline(always)]
    fn masks(cols: usize) -> (__mmask16, __mmask16) {
        let m = |c: usize| {
            if c >= 16 {
                0xffff
            } else {
                ((1u32 << c) - 1) as u16
            }
        };
        (m(cols.min(16)), m(cols.saturating_sub(16)))
    }

    /// `e^x` on 16 lanes: Cody-Waite reduction by ln 2, degree-7 Taylor on |r| <= ln2/2,
    /// then `vscalefps` (relative error < 2e-7 over the clamp [-87, 88], as `kernels::exp`).
    #[inline(always)]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
            _mm512_set1_ps(88.0),
        );
        let k =
            _mm512_roundscale_ps::<0>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, k)
    }

    /// QuickGELU, x / (1 + e^(-1.702 x)).
    #[inline(always)]
    unsafe fn quick_gelu16(x: __m512) -> __m512 {
        let e = exp16(_mm512_mul_ps(x, _mm512_set1_ps(-1.702)));
        _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e))
    }

    /// Writes (or adds) the accumulators into C, then applies the tile's epilogue (the
    /// caller gives one on the last k block only).
    #[inline(always)]
    unsafe fn store(t: &Tile<'_>, c0: &[__m512; MR], c1: &[__m512; MR]) {
        let (m0, m1) = masks(t.cols);
        let c = t.c.as_ptr() as *mut f32;
        let epi = t.epi;
        let (b0, b1) = match epi.bias {
            Some(b) => (
                _mm512_maskz_loadu_ps(m0, b.as_ptr()),
                _mm512_maskz_loadu_ps(m1, b.as_ptr().add(16)),
            ),
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        for r in 0..t.rows {
            let p = c.add(r * t.ldc);
            let (mut v0, mut v1) = (c0[r], c1[r]);
            if t.accumulate {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p.add(16)));
            }
            if epi.bias.is_some() {
                v0 = _mm512_add_ps(v0, b0);
                v1 = _mm512_add_ps(v1, b1);
            }
            if let Some(res) = epi.residual {
                let q = res.as_ptr().add(r * t.ldc);
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, q));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, q.add(16)));
            }
            if epi.gelu {
                v0 = quick_gelu16(v0);
                v1 = quick_gelu16(v1);
            }
            _mm512_mask_storeu_ps(p, m0, v0);
            _mm512_mask_storeu_ps(p.add(16), m1, v1);
        }
    }

    /// Asks for the tile's C rows (and residual rows) in L1 while the k loop runs: at the
    /// encoder's widths C's rows are 3-12 KiB apart, no prefetcher predicts them, and the
    /// store (a read for ownership, plus a load on later k blocks) would otherwise wait on
    /// L2/L3 at the end of every tile.
    #[inline(always)]
    unsafe fn prefetch_c(t: &Tile<'_>) {
        let c = t.c.as_ptr();
        let last = t.cols.saturating_sub(1);
        for r in 0..t.rows {
            let p = c.add(r * t.ldc) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.add(4 * last));
            if let Some(res) = t.epi.residual {
                let q = res.as_ptr().add(r * t.ldc) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(q);
                _mm_prefetch::<_MM_HINT_T0>(q.add(4 * last));
            }
        }
        if t.cols > 16 {
            for r in 0..t.rows {
                _mm_prefetch::<_MM_HINT_T0>(c.add(r * t.ldc + 16) as *const i8);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_f32(t: &Tile<'_>) {
        let a = t.a.as_ptr() as *const f32;
        let b = t.b.as_ptr() as *const f32;
        prefetch_c(t);
        let mut c0 = [_mm512_setzero_ps(); MR];
        let mut c1 = [_mm512_setzero_ps(); MR];
        for p in 0..t.kc {
            let b0 = _mm512_load_ps(b.add(p * NR));
            let b1 = _mm512_load_ps(b.add(p * NR + 16));
            for r in 0..MR {
                let av = _mm512_set1_ps(*a.add(r * KC + p));
                c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
                c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
            }
        }
        store(t, &c0, &c1);
    }

    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub unsafe fn tile_bf16(t: &Tile<'_>) {
        let a = t.a.as_ptr() as *const i32;
        let b = t.b.as_ptr() as *const __m512i;
        prefetch_c(t);
        let mut c0 = [_mm512_setzero_ps(); MR];
        let mut c1 = [_mm512_setzero_ps(); MR];
        for p in 0..t.kc.div_ceil(2) {
            let b0: __m512bh = std::mem::transmute(_mm512_load_si512(b.add(2 * p)));
            let b1: __m512bh = std::mem::transmute(_mm512_load_si512(b.add(2 * p + 1)));
            for r in 0..MR {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * KC + p)));
                c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
                c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
            }
        }
        store(t, &c0, &c1);
    }

    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub unsafe fn to_bf16_pairs(src: &[f32], dst: &mut [u32]) {
        let mut i = 0;
        while i + 32 <= src.len() {
            let lo = _mm512_loadu_ps(src.as_ptr().add(i));
            let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
            // Lower 16 bf16 from the second operand.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(i / 2) as *mut __m512i, v);
            i += 32;
        }
        super::to_bf16_pairs_scalar(&src[i..], &mut dst[i / 2..]);
    }

    /// `iters` rounds of 12 independent FMA (or bf16 dot) chains on zmm.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn peak_bf16(iters: u64) -> f32 {
        let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80));
        let mut acc = std::hint::black_box([_mm512_setzero_ps(); 12]);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, x, x);
            }
            // Keeps the chains in registers but opaque, so nothing folds them.
            std::arch::asm!("/* {0} */", in(zmm_reg) acc[0], options(nomem, nostack));
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn peak_f32(iters: u64) -> f32 {
        let x = std::hint::black_box(_mm512_set1_ps(0.999_999));
        let mut acc = std::hint::black_box([_mm512_set1_ps(1.0); 12]);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, x, x);
            }
            std::arch::asm!("/* {0} */", in(zmm_reg) acc[0], options(nomem, nostack));
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// One timing slice of [`super::peak_gflops`].
    pub unsafe fn peak_loop(dtype: super::GemmDtype, iters: u64) -> f32 {
        match dtype {
            super::GemmDtype::F32 => peak_f32(iters),
            super::GemmDtype::Bf16 => peak_bf16(iters),
        }
    }
}
