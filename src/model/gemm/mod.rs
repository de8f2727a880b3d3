//! The towers' weight GEMM `C = A W^T` on x86 CPUs with AVX-512: A [m, k] row-major f32
//! activations, W [n, k] a layer's weight (out, in), C [m, n] row-major f32. Weights are packed
//! once at placement ([`PackedWeight::pack`]) in f32 or bf16; activations are packed per call
//! (copied in f32, or rounded to bf16 to nearest even); accumulation is always f32.
//!
//! The micro-kernel runs on AVX-512 ([`avx512`], f32 and bf16) or, on x86 CPUs without it,
//! AVX2 + FMA ([`avx2`], f32 only); [`isa`] says which. Elsewhere (aarch64, or
//! `NODULED_GEMM=candle` for A/B runs) nothing here runs and the callers keep candle's matmul.
//!
//! # Why in-house
//! candle's `gemm` crate (0.19, x86-v4) has no bf16 kernel (it widens bf16 to f32) and runs
//! the encoder's f32 shapes well below the FMA peak (docs/performance.md has the figures and
//! commands); oneDNN and OpenBLAS are system libraries a fresh `cargo run --release -- demo`
//! must not need, and their OpenMP pools fight rayon's on two cores. What a near-peak GEMM
//! needs is small: one register-tile micro-kernel per dtype ([`avx512`]), panel packing, cache
//! blocking, and a row split over rayon's pool, the one pool candle also uses.
//!
//! # Layout and blocking
//! - The micro-kernel computes an [`MR`] x [`NR`] (12 x 32) tile of C in 24 zmm accumulators:
//!   per k it loads 32 weights (two vectors) and broadcasts one activation per row
//!   (f32: `vfmadd231ps`; bf16: `vdpbf16ps` takes two k at once).
//! - k is cut into blocks of [`KC`] (AVX2: 256); a packed weight holds, per k block and per
//!   panel of [`NR`] outputs, the block's weights k-major (`[k][32]` f32, `[k/2][32][2]`
//!   bf16), 64-byte aligned, so the micro-kernel streams a 48 KiB (bf16) or 96 KiB (f32) panel
//!   from L2 (AVX2: one 16 KiB half panel from L1).
//! - Rows of A are split into one contiguous run per task (about [`MC_MAX`] rows, a multiple of
//!   [`MR`], the same count per thread); each task copies its rows' k block into a buffer with
//!   a fixed row stride of [`KC`] values (no cache-set conflicts at k = 3072) and walks every
//!   panel over it. n and k need not be multiples of anything: padding is zero, stores masked.

// On other architectures the micro-kernels compile to stubs that are never called, so the
// items only they use would warn.
#[cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_imports, unused_mut)
)]
mod avx2;
#[cfg_attr(
    not(target_arch = "x86_64"),
    allow(dead_code, unused_imports, unused_mut)
)]
mod avx512;

use rayon::prelude::*;

/// The instruction set the f32 micro-kernel runs on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 12 x 32 tiles in 24 zmm (`avx512f`; bf16 too where `avx512bf16` is present).
    Avx512,
    /// The same tile as four 6 x 16 sub-tiles in ymm (`avx2` + `fma`; f32 only).
    Avx2,
}

/// The micro-kernels' instruction set on this CPU, or `None` (no AVX2/FMA, not x86, or
/// `NODULED_GEMM=candle`, which turns the in-house kernels off for A/B runs).
pub fn isa() -> Option<Isa> {
    static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("NODULED_GEMM").is_ok_and(|v| v == "candle") {
            None
        } else if avx512::supported(GemmDtype::F32) {
            Some(Isa::Avx512)
        } else if avx2::supported() {
            Some(Isa::Avx2)
        } else {
            None
        }
    })
}

/// One micro-kernel call: C[rows, cols] (+)= A-strip x B-panel over `kc` k values.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Tile<'a> {
    /// [`MR`] packed rows of A, row stride [`KC`] u32 (f32 bits, or two bf16 per u32); for
    /// the AVX2 kernel two k-major halves of 6 rows instead (`avx2::pack_row`).
    pub a: &'a [u32],
    /// The panel: `[kc][NR]` f32 or `[kc/2][NR][2]` bf16, 64-byte aligned; for the AVX2
    /// kernel one `[kc][16]` half of a panel (see [`f32_sub_panel`]).
    pub b: &'a [u8],
    /// k values in this block.
    pub kc: usize,
    /// C from the tile's top-left element on, row stride `ldc`.
    pub c: &'a mut [f32],
    /// C's row stride.
    pub ldc: usize,
    /// Valid rows (<= MR).
    pub rows: usize,
    /// Valid columns (<= NR).
    pub cols: usize,
    /// Add to C (later k blocks) instead of overwriting it.
    pub accumulate: bool,
    /// What to apply before the store (the caller passes one on the last k block only).
    pub epi: TileEpilogue<'a>,
}

/// The per-tile part of [`Epilogue`]: slices start at the tile's first column / element.
#[derive(Clone, Copy, Default)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct TileEpilogue<'a> {
    /// Added per column.
    pub bias: Option<&'a [f32]>,
    /// Added per element, row stride `ldc`.
    pub residual: Option<&'a [f32]>,
    /// QuickGELU (x sigmoid(1.702 x)) after the additions.
    pub gelu: bool,
}

/// The bounds every micro-kernel relies on (a caller bug if they fail, not input data).
fn check_tile(t: &Tile<'_>) {
    assert!(t.rows <= MR && t.cols <= NR && t.kc <= KC && t.a.len() >= MR * KC);
    assert!(t.rows == 0 || t.c.len() >= (t.rows - 1) * t.ldc + t.cols);
    assert!(t.epi.bias.is_none_or(|b| b.len() >= t.cols));
    assert!(t
        .epi
        .residual
        .is_none_or(|r| t.rows == 0 || r.len() >= (t.rows - 1) * t.ldc + t.cols));
}

/// Runs one tile on this CPU's micro-kernel for `dtype` (only called when it is supported).
fn kernel(dtype: GemmDtype, t: Tile<'_>) {
    match (isa(), dtype) {
        (Some(Isa::Avx2), GemmDtype::F32) => avx2::kernel(t),
        _ => avx512::kernel(dtype, t),
    }
}

/// Rows of C per micro-kernel tile.
pub const MR: usize = 12;
/// Columns of C per micro-kernel tile (two zmm of f32).
pub const NR: usize = 32;
/// Most k values per block, and the row stride of packed A strips. The AVX-512 kernels take
/// k in blocks of 768 (a bf16 panel is 48 KiB, f32 96 KiB, both L2-resident; 768 is the
/// encoder's width, so its 768-deep GEMMs write C once and the 3072-deep ones four times:
/// blocks of 256 cost 6-16% of the bf16 rate, docs/performance.md); the AVX2 kernel keeps
/// [`avx2::KC_BLOCK`] = 256 (its half panels must stay in L1).
pub const KC: usize = 768;

/// k values per block on this CPU's kernel (see [`KC`]).
fn kc_block() -> usize {
    match isa() {
        Some(Isa::Avx2) => avx2::KC_BLOCK,
        _ => KC,
    }
}
/// Most rows of A one task packs and walks.
pub const MC_MAX: usize = 240;

/// The number format a packed weight holds (and its activations are rounded to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmDtype {
    /// IEEE f32 throughout (`vfmadd231ps`).
    F32,
    /// bf16 weights and activations, f32 accumulation (`vdpbf16ps`, AVX512_BF16).
    Bf16,
}

impl GemmDtype {
    /// `"f32"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// Whether this CPU runs the micro-kernel of this dtype.
    pub fn supported(self) -> bool {
        match (isa(), self) {
            (Some(Isa::Avx512), dtype) => avx512::supported(dtype),
            (Some(Isa::Avx2), GemmDtype::F32) => true,
            _ => false,
        }
    }

    /// The short kernel name reports and status give: `"avx512f"`, `"avx512bf16"`,
    /// `"avx2"`, or `None` where candle's matmul runs (or bf16 is emulated).
    pub fn kernel_name(self) -> Option<&'static str> {
        match (self.supported(), isa(), self) {
            (false, ..) => None,
            (true, Some(Isa::Avx2), _) => Some("avx2"),
            (true, _, Self::F32) => Some("avx512f"),
            (true, _, Self::Bf16) => Some("avx512bf16"),
        }
    }
}

/// What the GEMM applies to each output element before its last store, where the tile is
/// still in registers (saves a pass over C): `j` is the column, `i` the row.
#[derive(Debug, Clone, Copy, Default)]
pub enum Epilogue<'a> {
    /// `c[i][j]` as computed.
    #[default]
    None,
    /// `QuickGELU(c[i][j] + bias[j])`, QuickGELU(x) = x sigmoid(1.702 x).
    BiasQuickGelu(&'a [f32]),
    /// `c[i][j] + bias[j] + residual[i][j]` (`residual` [m, n] row-major).
    BiasResidual(&'a [f32], &'a [f32]),
}

/// A cache line: the unit packed weights are stored in (keeps every panel 64-byte aligned).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A weight [n, k] packed for the micro-kernels (see the module doc for the layout).
pub struct PackedWeight {
    dtype: GemmDtype,
    n: usize,
    k: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedWeight({} [{}, {}])",
            self.dtype.name(),
            self.n,
            self.k
        )
    }
}

/// The k block starting at `k0` of a k-long axis: its length.
fn block_len(k: usize, k0: usize) -> usize {
    kc_block().min(k - k0)
}

/// Columns of one contiguous sub-panel of a packed f32 panel: the whole [`NR`] for the
/// AVX-512 kernel; [`avx2::COLUMNS`] (16, one 64-byte line per k) for the AVX2 kernel, which
/// walks one half of a panel at a time, so each half is its own `[kc][16]` block (16 KiB at
/// k blocks of 256, contiguous: a `[kc][32]` row stride would map the half onto half of L1's
/// sets).
fn f32_sub_panel() -> usize {
    match isa() {
        Some(Isa::Avx2) => avx2::COLUMNS,
        _ => NR,
    }
}

/// Index (in f32 values) of k row `p`, column `j` within a packed f32 panel of `kc` rows.
fn f32_index(p: usize, j: usize, kc: usize) -> usize {
    let w = f32_sub_panel();
    (j / w) * kc * w + p * w + j % w
}

impl PackedWeight {
    /// Packs `w` [n, k] row-major, or `None` when this CPU lacks the dtype's micro-kernel
    /// (the caller keeps its plain matmul) or the shape is empty.
    pub fn pack(w: &[f32], n: usize, k: usize, dtype: GemmDtype) -> Option<Self> {
        if w.len() != n * k {
            return None;
        }
        Self::pack_rows(n, k, dtype, Vec::new(), |j, k0, out| {
            out.copy_from_slice(&w[j * k + k0..j * k + k0 + out.len()])
        })
    }

    /// Packs the weight [n, k] whose row `j`, values `k0..k0 + out.len()`, `segment` writes
    /// into `out` (called once per row and k block, `k0` a multiple of the block length),
    /// reusing `lines`' allocation; `None` as [`Self::pack`]. Panels are filled in parallel.
    fn pack_rows(
        n: usize,
        k: usize,
        dtype: GemmDtype,
        mut lines: Vec<Line>,
        segment: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Option<Self> {
        if !dtype.supported() || n == 0 || k == 0 {
            return None;
        }
        let panels = n.div_ceil(NR);
        let bytes: usize = (0..k)
            .step_by(kc_block())
            .map(|k0| panels * Self::panel_bytes(dtype, block_len(k, k0)))
            .sum();
        lines.clear();
        lines.resize(bytes / 64, Line([0; 64]));
        // SAFETY: `lines` is `bytes` bytes of plain data, 64-byte aligned.
        let buf = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, bytes) };
        let mut rest = buf;
        for k0 in (0..k).step_by(kc_block()) {
            let kc = block_len(k, k0);
            let size = Self::panel_bytes(dtype, kc);
            let (block, tail) = rest.split_at_mut(panels * size);
            rest = tail;
            let sub = f32_sub_panel();
            block
                .par_chunks_mut(size)
                .enumerate()
                .for_each(|(jr, panel)| {
                    let mut row = [0f32; KC];
                    for j in 0..NR.min(n - jr * NR) {
                        segment(jr * NR + j, k0, &mut row[..kc]);
                        let values = row[..kc].iter().enumerate();
                        match dtype {
                            GemmDtype::F32 => values.for_each(|(p, &v)| {
                                // f32_index(p, j, kc), with the sub-panel width read once.
                                let at = 4 * ((j / sub) * kc * sub + p * sub + j % sub);
                                panel[at..at + 4].copy_from_slice(&v.to_le_bytes());
                            }),
                            GemmDtype::Bf16 => values.for_each(|(p, &v)| {
                                let at = 2 * ((p / 2) * 2 * NR + 2 * j + p % 2);
                                let bits = half::bf16::from_f32(v).to_bits();
                                panel[at..at + 2].copy_from_slice(&bits.to_le_bytes());
                            }),
                        }
                    }
                });
        }
        Some(Self { dtype, n, k, lines })
    }

    /// Runs `f` on the weight [n, k] packed for the f32 kernel from `segment` (as in
    /// [`Self::pack_rows`]) in this thread's scratch buffer, which keeps its allocation for
    /// the next call: a weight stored in another form (q8_0 blocks) is multiplied by the f32
    /// kernel without a resident f32 copy. `None` where the f32 kernel is not available.
    pub fn with_packed_rows<R>(
        n: usize,
        k: usize,
        segment: impl Fn(usize, usize, &mut [f32]) + Sync,
        f: impl FnOnce(&PackedWeight) -> R,
    ) -> Option<R> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        with_thread_buffer(&SCRATCH, |lines| {
            let packed = super::profile::timed("q8_0.unpack", || {
                Self::pack_rows(n, k, GemmDtype::F32, std::mem::take(lines), segment)
            })?;
            let out = f(&packed);
            *lines = packed.lines;
            Some(out)
        })
    }

    /// Bytes of one packed panel of a `kc`-long k block.
    fn panel_bytes(dtype: GemmDtype, kc: usize) -> usize {
        match dtype {
            GemmDtype::F32 => kc * NR * 4,
            GemmDtype::Bf16 => kc.div_ceil(2) * NR * 2 * 2,
        }
    }

    /// Output width n.
    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// Input width k.
    pub fn in_dim(&self) -> usize {
        self.k
    }

    /// The packed number format.
    pub fn dtype(&self) -> GemmDtype {
        self.dtype
    }

    /// Bytes the packed weight holds.
    pub fn bytes(&self) -> usize {
        self.lines.len() * 64
    }

    fn bytes_slice(&self) -> &[u8] {
        // SAFETY: plain bytes of the lines.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u8, self.bytes()) }
    }

    /// The weight back as [n, k] row-major f32 (bf16 values widened exactly).
    pub fn unpack(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let buf = self.bytes_slice();
        let mut w = vec![0f32; n * k];
        let mut at = 0;
        for k0 in (0..k).step_by(kc_block()) {
            let kc = block_len(k, k0);
            let size = Self::panel_bytes(self.dtype, kc);
            for jr in 0..n.div_ceil(NR) {
                let panel = &buf[at..at + size];
                for j in 0..NR.min(n - jr * NR) {
                    for p in 0..kc {
                        let v = match self.dtype {
                            GemmDtype::F32 => {
                                let i = 4 * f32_index(p, j, kc);
                                f32::from_le_bytes(panel[i..i + 4].try_into().expect("4"))
                            }
                            GemmDtype::Bf16 => {
                                let i = 2 * ((p / 2) * 2 * NR + 2 * j + p % 2);
                                let bits = u16::from_le_bytes([panel[i], panel[i + 1]]);
                                half::bf16::from_bits(bits).to_f32()
                            }
                        };
                        w[(jr * NR + j) * k + k0 + p] = v;
                    }
                }
                at += size;
            }
        }
        w
    }

    /// `c = a W^T`: `a` [m, k] row-major, `c` [m, n] (overwritten), over rayon's pool.
    ///
    /// # Panics
    /// When the slices do not hold m rows of k and n values (a caller bug, not input data).
    pub fn matmul(&self, a: &[f32], m: usize, c: &mut [f32]) {
        self.matmul_fused(a, m, c, Epilogue::None)
    }

    /// [`Self::matmul`] with `epi` applied to every output (see [`Epilogue`]).
    ///
    /// # Panics
    /// As [`Self::matmul`], and when the bias is not n long or the residual not [m, n].
    pub fn matmul_fused(&self, a: &[f32], m: usize, c: &mut [f32], epi: Epilogue<'_>) {
        let (n, k) = (self.n, self.k);
        assert!(a.len() == m * k && c.len() == m * n, "gemm shapes");
        let (bias, residual, gelu) = match epi {
            Epilogue::None => (None, None, false),
            Epilogue::BiasQuickGelu(b) => (Some(b), None, true),
            Epilogue::BiasResidual(b, r) => (Some(b), Some(r), false),
        };
        assert!(bias.is_none_or(|b| b.len() == n), "gemm bias length");
        assert!(
            residual.is_none_or(|r| r.len() == m * n),
            "gemm residual shape"
        );
        if m == 0 {
            return;
        }
        let threads = rayon::current_num_threads().max(1);
        let tasks = m.div_ceil(MC_MAX).div_ceil(threads) * threads;
        let mc = m.div_ceil(tasks).div_ceil(MR) * MR;
        let res_chunks: Vec<Option<&[f32]>> = match residual {
            Some(r) => r.chunks(mc * n).map(Some).collect(),
            None => vec![None; m.div_ceil(mc)],
        };
        c.par_chunks_mut(mc * n)
            .zip(a.par_chunks(mc * k))
            .zip(res_chunks.into_par_iter())
            .for_each(|((c, a), residual)| {
                with_thread_buffer(&STRIPS, |pack| self.rows(a, c, bias, residual, gelu, pack))
            });
    }

    /// One task: all of C's columns for the rows in `a` (at most [`MC_MAX`] + [`MR`]), with
    /// `pack` (this thread's buffer) for the packed rows: per k block, pack the rows, then run
    /// every panel (or AVX2 half panel) over all strips.
    fn rows(
        &self,
        a: &[f32],
        c: &mut [f32],
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
        gelu: bool,
        pack: &mut Vec<u32>,
    ) {
        let (n, k) = (self.n, self.k);
        let m = a.len() / k;
        let strips = m.div_ceil(MR);
        let panels = n.div_ceil(NR);
        let buf = self.bytes_slice();
        // Old contents stay: every strip this task reads is packed first.
        if pack.len() < strips * MR * KC {
            pack.resize(strips * MR * KC, 0);
        }
        let mut at = 0;
        for k0 in (0..k).step_by(kc_block()) {
            let kc = block_len(k, k0);
            self.pack_strips(a, m, k0, kc, pack);
            let size = Self::panel_bytes(self.dtype, kc);
            // The columns one pass over all strips covers: the whole panel, or (AVX2) its
            // 16-column half, 16 KiB at k blocks of 256, which stays in L1 across the strips.
            let step = match (isa(), self.dtype) {
                (Some(Isa::Avx2), GemmDtype::F32) => avx2::COLUMNS,
                _ => NR,
            };
            for jr in 0..panels {
                let panel = &buf[at + jr * size..at + (jr + 1) * size];
                let last = k0 + kc == k;
                for c0 in (jr * NR..n.min((jr + 1) * NR)).step_by(step) {
                    let cols = step.min(n - c0);
                    // The sub-panel's own block (f32 only: bf16 passes take the whole panel).
                    let b = &panel[4 * f32_index(0, c0 - jr * NR, kc)..];
                    for s in 0..strips {
                        let epi = match last {
                            true => TileEpilogue {
                                bias: bias.map(|b| &b[c0..]),
                                residual: residual.map(|r| &r[s * MR * n + c0..]),
                                gelu,
                            },
                            false => TileEpilogue::default(),
                        };
                        let tile = Tile {
                            a: &pack[s * MR * KC..(s + 1) * MR * KC],
                            b,
                            kc,
                            c: &mut c[s * MR * n + c0..],
                            ldc: n,
                            rows: MR.min(m - s * MR),
                            cols,
                            accumulate: k0 > 0,
                            epi,
                        };
                        kernel(self.dtype, tile);
                    }
                }
            }
            at += panels * size;
        }
    }

    /// Packs k values `k0..k0 + kc` of the `m` rows of `a` ([m, k]) into `pack` strip by strip,
    /// as the micro-kernel reads them: f32 bits or bf16 pairs at a row stride of [`KC`] (the
    /// AVX2 kernel's strips k-major instead, see `avx2::pack_row`). Rows past m, the last
    /// strip's padding, are packed as zeros.
    fn pack_strips(&self, a: &[f32], m: usize, k0: usize, kc: usize, pack: &mut [u32]) {
        let k = self.k;
        let zeros = [0f32; KC];
        let k_major = isa() == Some(Isa::Avx2) && self.dtype == GemmDtype::F32;
        for r in 0..m.div_ceil(MR) * MR {
            let src = match r < m {
                true => &a[r * k + k0..r * k + k0 + kc],
                false => &zeros[..kc],
            };
            if k_major {
                avx2::pack_row(src, r, pack);
                continue;
            }
            let dst = &mut pack[r * KC..r * KC + KC];
            match self.dtype {
                GemmDtype::F32 => {
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = s.to_bits();
                    }
                }
                GemmDtype::Bf16 => avx512::to_bf16_pairs(src, &mut dst[..kc.div_ceil(2)]),
            }
        }
    }
}

thread_local! {
    /// Each thread's packed-A buffer, kept between GEMMs: a fresh 0.7 MiB per task and call
    /// came from mmap and went back with munmap, whose TLB shootdowns stall both cores.
    static STRIPS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's buffer in `slot`, which keeps its allocation for the next call
/// (taken out while `f` runs: a nested call would get a fresh one, not a borrow panic).
fn with_thread_buffer<T: Default, R>(
    slot: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut buf = slot.with(|cell| cell.take());
    let out = f(&mut buf);
    slot.with(|cell| cell.replace(buf));
    out
}

/// CPU seconds this thread has run (the peak loops divide by it, not by wall time, so a
/// core shared with other processes still gives its own rate).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Runs `slice(20_000)` (one timing slice of a peak loop, `flop_per_iter` FLOP per iteration)
/// for about `ms` milliseconds; GFLOP per second of this thread's CPU time.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn measure_peak(ms: u64, flop_per_iter: f64, slice: impl Fn(u64) -> f32) -> f64 {
    let start = std::time::Instant::now();
    let cpu0 = thread_cpu_s();
    let mut iters = 0u64;
    let mut sink = 0f32;
    while start.elapsed().as_millis() < ms as u128 || iters == 0 {
        sink += slice(20_000);
        iters += 20_000;
    }
    std::hint::black_box(sink);
    iters as f64 * flop_per_iter / (thread_cpu_s() - cpu0) / 1e9
}

/// Measured single-thread peak of the micro-kernel's instruction on this CPU in GFLOP/s
/// (`vfmadd231ps` or `vdpbf16ps` on zmm; `vfmadd231ps` on ymm for f32 without AVX-512;
/// independent chains, about `ms` milliseconds, per second of the thread's CPU time), or
/// `None` when the CPU lacks it. A property
/// of the hardware: `NODULED_GEMM=candle` does not change it. Multiply by the threads for the
/// machine's peak.
pub fn peak_gflops(dtype: GemmDtype, ms: u64) -> Option<f64> {
    if avx512::supported(dtype) {
        avx512::peak_gflops(dtype, ms)
    } else if dtype == GemmDtype::F32 {
        avx2::peak_gflops(ms)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Odd shapes (edges in m, n and k, k across blocks) against an f64 reference: f32 to
    /// rounding, bf16 to the bf16 rounding of both operands.
    #[test]
    fn packed_gemm_matches_the_definition_at_odd_shapes() {
        for dtype in [GemmDtype::F32, GemmDtype::Bf16] {
            if !dtype.supported() {
                eprintln!(
                    "{}: not on this CPU (the caller falls back to candle)",
                    dtype.name()
                );
                continue;
            }
            for (m, n, k) in [
                (1, 1, 1),
                (13, 33, 7),
                (50, 70, 257),
                (251, 96, 600),
                (24, 64, 512),
                (37, 40, 1700), // three AVX-512 k blocks, the last partial
            ] {
                let a = values(m * k, 1 + m as u64);
                let w = values(n * k, 2 + n as u64);
                let p = PackedWeight::pack(&w, n, k, dtype).unwrap();
                let mut c = vec![f32::NAN; m * n];
                p.matmul(&a, m, &mut c);
                let want = match dtype {
                    GemmDtype::F32 => naive(&a, &w, m, n, k),
                    GemmDtype::Bf16 => {
                        let r = |v: &[f32]| -> Vec<f32> {
                            v.iter()
                                .map(|&x| half::bf16::from_f32(x).to_f32())
                                .collect()
                        };
                        naive(&r(&a), &r(&w), m, n, k)
                    }
                };
                let worst = c
                    .iter()
                    .zip(&want)
                    .map(|(&g, &w)| (g as f64 - w).abs())
                    .fold(0f64, f64::max);
                assert!(
                    worst <= 1e-5 * (k as f64).sqrt() * 4.0,
                    "{dtype:?} {m}x{n}x{k}: {worst}"
                );
                let back = p.unpack();
                let exact = match dtype {
                    GemmDtype::F32 => w.clone(),
                    GemmDtype::Bf16 => w
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_f32())
                        .collect(),
                };
                assert_eq!(back, exact, "{dtype:?} unpack");
            }
        }
    }

    /// The fused epilogues equal the GEMM followed by the op.
    #[test]
    fn epilogues_equal_the_unfused_ops() {
        if !GemmDtype::F32.supported() {
            return eprintln!("no AVX-512: the callers keep their unfused path");
        }
        let (m, n, k) = (29, 45, 300);
        let a = values(m * k, 7);
        let w = values(n * k, 8);
        let bias = values(n, 9);
        let res = values(m * n, 10);
        let p = PackedWeight::pack(&w, n, k, GemmDtype::F32).unwrap();
        let mut plain = vec![0f32; m * n];
        p.matmul(&a, m, &mut plain);
        let mut gelu = vec![0f32; m * n];
        p.matmul_fused(&a, m, &mut gelu, Epilogue::BiasQuickGelu(&bias));
        let mut resid = vec![0f32; m * n];
        p.matmul_fused(&a, m, &mut resid, Epilogue::BiasResidual(&bias, &res));
        for i in 0..m * n {
            let v = plain[i] + bias[i % n];
            let want = v / (1.0 + (-1.702 * v as f64).exp() as f32);
            assert!(
                (gelu[i] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{i}: {} vs {want}",
                gelu[i]
            );
            assert!(
                (resid[i] - (v + res[i])).abs() <= 1e-6 * (1.0 + v.abs()),
                "{i}"
            );
        }
    }
}
