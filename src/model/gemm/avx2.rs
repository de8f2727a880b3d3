//! The AVX2 + FMA micro-kernel of [`super`], for x86 CPUs without AVX-512 (AMD Zen 1-3,
//! Intel Haswell to Alder Lake): f32 only, on the same packed weight panels and 12-row strips
//! as [`super::avx512`]. A call covers a 12 x 16 tile as two 6 x 16 sub-tiles: a sub-tile holds
//! 12 ymm accumulators, and per k value loads two B vectors and broadcasts six A values, which
//! with the accumulators fills the 16 ymm registers (the 6 x 16 shape BLIS uses on Haswell
//! and Zen). A call covers at most [`COLUMNS`] = 16 columns, one half of a weight panel, which
//! the packing stores as its own `[kc][16]` block (16 KiB at [`KC_BLOCK`] = 256, contiguous,
//! so it stays in L1); the driver runs every strip over one half before the other. A strips
//! are packed k-major per 6-row half ([`pack_row`]).

use super::{Tile, KC, MR};

/// Rows of one sub-tile.
const SR: usize = 6;
/// Columns of one sub-tile (two ymm of f32).
const SC: usize = 16;

/// k values per block for this kernel: a `[kc][16]` half panel is then 16 KiB and stays in
/// L1 while every strip passes over it.
pub const KC_BLOCK: usize = 256;

/// Columns of C one kernel call covers at most: one sub-tile's width, so that the driver
/// walks all strips over one 16-column half of a panel before the next (L1 reuse).
pub const COLUMNS: usize = SC;

/// Whether this CPU has AVX2 and FMA.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs one f32 tile. Only called when [`supported`] holds.
pub fn kernel(mut t: Tile<'_>) {
    super::check_tile(&t);
    assert!(t.cols <= COLUMNS && t.b.len() >= t.kc * SC * 4);
    #[cfg(target_arch = "x86_64")]
    {
        assert!(supported());
        // SAFETY: AVX2 and FMA are present (asserted); the asserts above bound every access.
        unsafe { x86::tile_f32(&mut t) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = t;
        unreachable!("no AVX2 micro-kernel on this architecture");
    }
}

/// Single-thread `vfmadd231ps` rate on ymm in GFLOP/s (12 independent chains, about `ms`
/// milliseconds), or `None` without AVX2/FMA.
pub fn peak_gflops(ms: u64) -> Option<f64> {
    if !supported() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // 12 chains x 8 lanes x 2 FLOP per iteration.
        // SAFETY: AVX2 and FMA are present (checked above).
        Some(super::measure_peak(ms, 12.0 * 8.0 * 2.0, |n| unsafe {
            x86::peak_f32(n)
        }))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ms;
        None
    }
}

/// Writes row `r` of A's k block (`src`, at most [`KC_BLOCK`] values) into the strip buffer
/// `pack` in this kernel's layout: strip `r / MR` holds two halves of [`SR`] rows, each k-major
/// (`[KC][SR]`: the six values one k step broadcasts share a cache line, one stream instead
/// of six 1 KiB-apart ones). The strip and half start where the row-major layout's would.
pub fn pack_row(src: &[f32], r: usize, pack: &mut [u32]) {
    let (strip, row) = (r / MR, r % MR);
    let base = strip * MR * KC + (row / SR) * SR * KC + row % SR;
    for (p, v) in src.iter().enumerate() {
        pack[base + p * SR] = v.to_bits();
    }
}

/// One sub-tile's outputs after the k loop, spilled for the scalar edge path.
type Spill = [[f32; SC]; SR];

/// The epilogue of one output value (scalar edge path; the vector path computes the same).
fn finish(t: &Tile<'_>, row: usize, col: usize, acc: f32) -> f32 {
    let mut v = acc;
    if t.accumulate {
        v += t.c[row * t.ldc + col];
    }
    if let Some(b) = t.epi.bias {
        v += b[col];
    }
    if let Some(r) = t.epi.residual {
        v += r[row * t.ldc + col];
    }
    if t.epi.gelu {
        v /= 1.0 + crate::model::kernels::exp(-1.702 * v);
    }
    v
}

/// Stores the sub-tile at row `row0` of the tile through [`finish`], valid part only.
fn store_edge(t: &mut Tile<'_>, row0: usize, acc: &Spill) {
    let rows = SR.min(t.rows.saturating_sub(row0));
    for (r, acc_row) in acc.iter().enumerate().take(rows) {
        for (j, &a) in acc_row.iter().enumerate().take(t.cols) {
            let v = finish(t, row0 + r, j, a);
            t.c[(row0 + r) * t.ldc + j] = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Spill, Tile, KC, MR, SC, SR};
    use std::arch::x86_64::*;

    /// `e^x` on 8 lanes, the same operations as `kernels::exp` (so the vector and scalar
    /// epilogues agree bit for bit): clamp to [-87, 88], round x log2(e) with the 1.5 x 2^23
    /// trick, Cody-Waite reduction by ln 2, degree-7 Taylor, scale by 2^k in the exponent.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let magic = _mm256_set1_ps(12_582_912.0);
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let t = _mm256_add_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            magic,
        );
        let k = _mm256_sub_ps(t, magic);
        let r = _mm256_sub_ps(x, _mm256_mul_ps(k, _mm256_set1_ps(0.693_145_75)));
        let r = _mm256_sub_ps(r, _mm256_mul_ps(k, _mm256_set1_ps(1.428_606_8e-6)));
        let ki = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            ki,
            _mm256_set1_epi32(127),
        )));
        // Horner from the innermost term, `1/720 + r/5040`, as the scalar code groups it.
        let mut p = _mm256_add_ps(
            _mm256_set1_ps(1.0 / 720.0),
            _mm256_div_ps(r, _mm256_set1_ps(5040.0)),
        );
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_add_ps(_mm256_set1_ps(c), _mm256_mul_ps(r, p));
        }
        _mm256_mul_ps(p, scale)
    }

    /// The two 6-row sub-tiles of one call (at most 16 columns): full ones stored with vector
    /// epilogues, edge ones (fewer valid rows or columns) through the scalar path.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_f32(t: &mut Tile<'_>) {
        let (rows, cols) = (t.rows, t.cols);
        for row0 in (0..MR).step_by(SR).take_while(|&r| r < rows) {
            let acc = sub_tile(t, row0);
            if rows - row0 >= SR && cols == SC {
                store_full(t, row0, &acc);
            } else {
                let mut spill: Spill = [[0.0; SC]; SR];
                for (s, a) in spill.iter_mut().zip(&acc) {
                    _mm256_storeu_ps(s.as_mut_ptr(), a[0]);
                    _mm256_storeu_ps(s.as_mut_ptr().add(8), a[1]);
                }
                super::store_edge(t, row0, &spill);
            }
        }
    }

    /// The k loop of the sub-tile at row `row0`: 12 accumulators, 2 B loads and 6
    /// broadcasts per k value (the half's `[KC][SR]` values, see [`super::pack_row`]). Rows
    /// past the valid ones read the zero padding of the strip.
    #[inline(always)]
    unsafe fn sub_tile(t: &Tile<'_>, row0: usize) -> [[__m256; 2]; SR] {
        let a = (t.a.as_ptr() as *const f32).add(row0 * KC);
        let b = t.b.as_ptr() as *const f32;
        let mut c = [[_mm256_setzero_ps(); 2]; SR];
        for p in 0..t.kc {
            let b0 = _mm256_load_ps(b.add(p * SC));
            let b1 = _mm256_load_ps(b.add(p * SC + 8));
            for (r, acc) in c.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(p * SR + r));
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
        }
        c
    }

    /// Stores a full 6 x 16 sub-tile: add C (later k blocks), bias, residual, then GELU.
    #[inline(always)]
    unsafe fn store_full(t: &mut Tile<'_>, row0: usize, acc: &[[__m256; 2]; SR]) {
        let ldc = t.ldc;
        let c = t.c.as_mut_ptr();
        let epi = t.epi;
        for (r, pair) in acc.iter().enumerate() {
            let at = (row0 + r) * ldc;
            for (h, &v) in pair.iter().enumerate() {
                let mut v = v;
                let p = c.add(at + 8 * h);
                if t.accumulate {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(p));
                }
                if let Some(b) = epi.bias {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(b.as_ptr().add(8 * h)));
                }
                if let Some(res) = epi.residual {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(res.as_ptr().add(at + 8 * h)));
                }
                if epi.gelu {
                    let e = exp8(_mm256_mul_ps(v, _mm256_set1_ps(-1.702)));
                    v = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                }
                _mm256_storeu_ps(p, v);
            }
        }
    }

    /// `iters` rounds of 12 independent FMA chains on ymm.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn peak_f32(iters: u64) -> f32 {
        let x = std::hint::black_box(_mm256_set1_ps(0.999_999));
        let mut acc = std::hint::black_box([_mm256_set1_ps(1.0); 12]);
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, x, x);
            }
            // Keeps the chains in registers but opaque, so nothing folds them.
            std::arch::asm!("/* {0} */", in(ymm_reg) acc[0], options(nomem, nostack));
        }
        let mut out = [0f32; 8];
        let mut sum = _mm256_setzero_ps();
        for a in acc {
            sum = _mm256_add_ps(sum, a);
        }
        _mm256_storeu_ps(out.as_mut_ptr(), sum);
        out.iter().sum()
    }
}
