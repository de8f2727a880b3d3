//! Weights that stay in a memory-mapped bundle file: a q8_0 matrix served to the matmul
//! straight from the mapping, never copied to the heap.
//!
//! A q8_0 matrix [out, in] is `out * in / 32` blocks of 34 bytes (ggml's layout: an f16
//! little-endian scale, then 32 signed bytes), row-major, each row `in / 32` blocks. `y = x W^T`
//! runs candle's q8_0 kernel (`k_quants::matmul`, which quantises `x` per row to q8_0 and takes
//! integer dot products) directly on the mapped blocks. candle's own `QMatMul` is not used
//! here: on x86 with AVX-512 VNNI it repacks q8_0 weights into tiles on the heap on first use,
//! which would double the resident weight memory this format exists to avoid.
//!
//! Written in-house because candle 0.11 has no tensor storage over borrowed memory.

use candle_core::quantized::k_quants::{self, BlockQ8_0, GgmlType};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use std::sync::Arc;

/// Bytes per q8_0 block.
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Values per q8_0 block.
pub const Q8_0_BLOCK_VALUES: usize = 32;

/// A read-only file mapping shared by every weight read from it.
pub type SharedMap = Arc<memmap2::Mmap>;

/// A q8_0 weight [out, in] living in a mapped file.
#[derive(Clone)]
pub struct MappedQ8 {
    map: SharedMap,
    offset: usize,
    out_dim: usize,
    in_dim: usize,
}

impl std::fmt::Debug for MappedQ8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MappedQ8([{}, {}] at byte {})",
            self.out_dim, self.in_dim, self.offset
        )
    }
}

impl MappedQ8 {
    /// The q8_0 matrix [out_dim, in_dim] stored at `map[offset..]`. Checks that `in_dim` is a
    /// whole number of blocks, that the bytes fit in the mapping and that they are 2-byte
    /// aligned (the f16 scales are read in place).
    pub fn new(map: SharedMap, offset: usize, out_dim: usize, in_dim: usize) -> Result<Self> {
        if in_dim == 0 || in_dim % Q8_0_BLOCK_VALUES != 0 {
            candle_core::bail!("q8_0 weight: in dim {in_dim} is not a multiple of 32");
        }
        let len = Self::byte_len(out_dim, in_dim);
        if offset.checked_add(len).is_none_or(|end| end > map.len()) {
            candle_core::bail!(
                "q8_0 weight: {len} bytes at {offset} exceed the {}-byte file",
                map.len()
            );
        }
        if (map.as_ptr() as usize + offset) % std::mem::align_of::<BlockQ8_0>() != 0 {
            candle_core::bail!("q8_0 weight at byte {offset} is not 2-byte aligned");
        }
        Ok(Self {
            map,
            offset,
            out_dim,
            in_dim,
        })
    }

    /// Bytes of a q8_0 matrix [out_dim, in_dim].
    pub fn byte_len(out_dim: usize, in_dim: usize) -> usize {
        out_dim * (in_dim / Q8_0_BLOCK_VALUES) * Q8_0_BLOCK_BYTES
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    fn blocks(&self) -> &[BlockQ8_0] {
        let n = self.out_dim * self.in_dim / Q8_0_BLOCK_VALUES;
        // SAFETY: `new` checked bounds and alignment; BlockQ8_0 is repr(C) {f16, [i8; 32]}
        // (34 bytes, no padding), every bit pattern is a valid value, and the mapping is
        // read-only and lives as long as `self.map`.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.offset) as *const BlockQ8_0, n)
        }
    }

    /// A q8_0 matrix [out_dim, in_dim] quantised from `values` (row-major f32) into an
    /// anonymous read-only mapping (a model quantised in process, e.g. `bench --precision
    /// q8_0`, then runs exactly as a mapped bundle does).
    pub fn quantize(values: &[f32], out_dim: usize, in_dim: usize) -> Result<Self> {
        if values.len() != out_dim * in_dim || in_dim % Q8_0_BLOCK_VALUES != 0 {
            candle_core::bail!(
                "q8_0 quantise: {} values for [{out_dim}, {in_dim}]",
                values.len()
            );
        }
        let mut blocks = vec![BlockQ8_0::zeros(); values.len() / Q8_0_BLOCK_VALUES];
        BlockQ8_0::from_float(values, &mut blocks);
        let len = Self::byte_len(out_dim, in_dim);
        let mut map = memmap2::MmapMut::map_anon(len)?;
        // SAFETY: BlockQ8_0 is repr(C) {f16, [i8; 32]}, 34 bytes without padding: its bytes
        // are plain data, and `blocks` spans exactly `len` of them.
        let bytes = unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, len) };
        map.copy_from_slice(bytes);
        Self::new(Arc::new(map.make_read_only()?), 0, out_dim, in_dim)
    }

    /// Writes row `j`'s values `k0..k0 + out.len()` dequantised (scale x int8, as
    /// [`Self::dequantize`]); `k0` and `out.len()` are multiples of 32 (the packing's k
    /// blocks are).
    pub fn segment(&self, j: usize, k0: usize, out: &mut [f32]) {
        let per_row = self.in_dim / Q8_0_BLOCK_VALUES;
        let first = j * per_row + k0 / Q8_0_BLOCK_VALUES;
        let blocks = &self.blocks()[first..first + out.len() / Q8_0_BLOCK_VALUES];
        BlockQ8_0::to_float(blocks, out);
    }

    /// The weight dequantised to f32 [out, in] (for tests and accuracy reports).
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut values = vec![0f32; self.out_dim * self.in_dim];
        BlockQ8_0::to_float(self.blocks(), &mut values);
        Tensor::from_vec(
            values,
            (self.out_dim, self.in_dim),
            &candle_core::Device::Cpu,
        )
    }
}

/// How a mapped q8_0 weight is multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q8Kernel {
    /// The in-house f32 GEMM ([`crate::model::gemm`]) on panels dequantised from the mapped
    /// blocks at each product into one per-thread scratch buffer (the size of the largest
    /// weight in f32: 9 MiB at ViT-B/32): the f32 kernel's speed with the weights resident
    /// once, as q8_0. Activations stay f32, so the products are those of the dequantised
    /// weight. The default where that kernel runs (x86 with AVX2 + FMA or AVX-512).
    Gemm,
    /// candle's q8_0 row-by-row kernel directly on the mapped blocks: no copy at all.
    InPlace,
    /// candle's `QMatMul` over the mapped blocks: where candle has a repacked kernel (x86 with
    /// AVX-512 VNNI) it builds the repacked copy on the heap on first use (faster, more
    /// resident memory); elsewhere it computes on the mapping as `InPlace` does.
    Candle,
}

impl Q8Kernel {
    /// From `NODULED_Q8_KERNEL` (`gemm`, `inplace` or `candle`); by default `gemm` where the
    /// in-house f32 kernel runs, else `candle`.
    pub fn from_env() -> Self {
        let gemm = crate::model::gemm::GemmDtype::F32.supported();
        match std::env::var("NODULED_Q8_KERNEL").as_deref() {
            Ok("inplace") => Self::InPlace,
            Ok("candle") => Self::Candle,
            _ if gemm => Self::Gemm,
            _ => Self::Candle,
        }
    }

    /// The kernel's name in backend labels: `"avx2"` / `"avx512f"` for [`Self::Gemm`],
    /// else `"candle"`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Gemm => crate::model::gemm::GemmDtype::F32
                .kernel_name()
                .unwrap_or("candle"),
            Self::InPlace | Self::Candle => "candle",
        }
    }
}

impl MappedQ8 {
    /// The weight as a candle `QMatMul` whose storage is the mapping (see [`Q8Kernel`]).
    pub fn to_qmatmul(&self) -> Result<candle_core::quantized::QMatMul> {
        use candle_core::quantized::{QMatMul, QStorage, QTensor};
        let storage = QStorage::Cpu(Box::new(MappedBlocks(self.clone())));
        QMatMul::from_qtensor(QTensor::new(storage, (self.out_dim, self.in_dim))?)
    }

    /// Drops this matrix's whole pages from the process's resident set (`MADV_DONTNEED`).
    /// The mapping stays valid: the file is read-only and mapped privately without writes,
    /// so a later read faults the same bytes back in from the page cache. Pages shared with a
    /// neighbouring tensor are kept.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let page = if page > 0 { page as usize } else { 4096 };
            let begin = self.map.as_ptr() as usize + self.offset;
            let end = begin + Self::byte_len(self.out_dim, self.in_dim);
            let first = begin.div_ceil(page) * page;
            let last = end / page * page;
            if last > first {
                // SAFETY: [first, last) lies inside the live mapping `self.map`; DONTNEED on
                // a clean private file mapping only discards page-table entries, it never
                // changes what a later read sees. Failure only leaves the pages resident.
                unsafe {
                    libc::madvise(
                        first as *mut libc::c_void,
                        last - first,
                        libc::MADV_DONTNEED,
                    );
                }
            }
        }
    }

    /// The weight as a [`PackedQ8`]: candle's `QMatMul` over the mapping that, after its first
    /// product, releases the mapped pages (see [`PackedQ8`]).
    pub fn to_packed(&self) -> Result<PackedQ8> {
        Ok(PackedQ8 {
            matmul: self.to_qmatmul()?,
            source: self.clone(),
            released: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }
}

/// A mapped q8_0 weight multiplied by candle's `QMatMul`. Where candle repacks q8_0 into its
/// own tiles (x86 with AVX-512 VNNI) the repacked copy on the heap serves every later product,
/// so the mapped pages of the matrix are released after the first product: the weights are
/// then resident once, not twice (measured in docs/performance.md, "q8_0 memory"). Where
/// candle multiplies the mapped blocks directly, a released page is faulted back on the next
/// product and stays.
#[derive(Debug, Clone)]
pub struct PackedQ8 {
    matmul: candle_core::quantized::QMatMul,
    source: MappedQ8,
    released: Arc<std::sync::atomic::AtomicBool>,
}

impl PackedQ8 {
    /// The mapped matrix this product reads.
    pub fn source(&self) -> &MappedQ8 {
        &self.source
    }
}

impl Module for PackedQ8 {
    /// `xs` [rows, in] f32 -> [rows, out].
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let y = self.matmul.forward(xs)?;
        if !self
            .released
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.source.release_pages();
        }
        Ok(y)
    }
}

/// A mapped q8_0 matrix as candle quantised storage (read-only: the `from_float` methods,
/// which only quantisation calls, leave it unchanged).
struct MappedBlocks(MappedQ8);

impl candle_core::quantized::QuantizedType for MappedBlocks {
    fn dtype(&self) -> candle_core::quantized::GgmlDType {
        candle_core::quantized::GgmlDType::Q8_0
    }
    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        k_quants::matmul(mkn, lhs, self.0.blocks(), dst)
    }
    fn matmul_t_f16(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[half::f16],
        dst: &mut [half::f16],
    ) -> Result<()> {
        k_quants::matmul_f16(mkn, lhs, self.0.blocks(), dst)
    }
    fn embedding(&self, _ids: &[u32], _rows: usize, _hidden: usize) -> Result<CpuStorage> {
        candle_core::bail!("mapped q8_0 weights are not embeddings")
    }
    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        let mut ys = vec![0f32; elem_count];
        BlockQ8_0::to_float(self.0.blocks(), &mut ys);
        Ok(CpuStorage::F32(ys))
    }
    fn storage_size_in_bytes(&self) -> usize {
        self.0.blocks().len() * Q8_0_BLOCK_BYTES
    }
    fn as_ptr(&self) -> *const u8 {
        self.0.blocks().as_ptr() as *const u8
    }
    fn block_size(&self) -> usize {
        Q8_0_BLOCK_VALUES
    }
    fn from_float(&mut self, _xs: &[f32]) {}
    fn from_float_imatrix(&mut self, _xs: &[f32], _w: &[f32], _n: usize) {}
    fn size(&self) -> usize {
        self.storage_size_in_bytes()
    }
}

/// Quantises a float matrix [out, in] to q8_0 bytes in the layout [`MappedQ8`] reads.
pub fn quantize_q8_0(weight: &Tensor) -> Result<Vec<u8>> {
    let (out_dim, in_dim) = weight.dims2()?;
    if in_dim % Q8_0_BLOCK_VALUES != 0 {
        candle_core::bail!("q8_0: in dim {in_dim} is not a multiple of 32");
    }
    let values = weight
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut blocks = vec![BlockQ8_0::zeros(); out_dim * in_dim / Q8_0_BLOCK_VALUES];
    BlockQ8_0::from_float(&values, &mut blocks);
    let len = blocks.len() * Q8_0_BLOCK_BYTES;
    // SAFETY: repr(C) 34-byte blocks without padding, viewed as bytes.
    let bytes = unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, len) };
    Ok(bytes.to_vec())
}

impl CustomOp1 for MappedQ8 {
    fn name(&self) -> &'static str {
        "mapped-q8_0-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        if k != self.in_dim {
            candle_core::bail!(
                "q8_0 matmul: input width {k}, weight expects {}",
                self.in_dim
            );
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("q8_0 matmul: input is not contiguous");
        };
        let lhs = &storage.as_slice::<f32>()?[start..end];
        let mut dst = vec![0f32; m * self.out_dim];
        k_quants::matmul((m, k, self.out_dim), lhs, self.blocks(), &mut dst)?;
        Ok((CpuStorage::F32(dst), Shape::from((m, self.out_dim))))
    }
}

impl Module for MappedQ8 {
    /// `xs` [rows, in] f32 -> [rows, out].
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.contiguous()?.apply_op1_no_bwd(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Device};
    use std::io::Write;

    /// Blocks written by `quantize_q8_0` and read from a mapping equal candle's own q8_0
    /// quantisation, and the in-place matmul matches x W^T on the dequantised weight to the
    /// q8_0 rounding of x.
    #[test]
    fn mapped_blocks_match_candle_q8_0_and_matmul() {
        let dev = Device::Cpu;
        let (out_dim, in_dim, rows) = (40, 96, 7);
        let w = Tensor::randn(0f32, 0.05, (out_dim, in_dim), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (rows, in_dim), &dev).unwrap();
        let bytes = quantize_q8_0(&w).unwrap();
        assert_eq!(bytes.len(), MappedQ8::byte_len(out_dim, in_dim));
        let mut file = tempfile_in_target();
        file.1.write_all(&[0u8; 2]).unwrap();
        file.1.write_all(&bytes).unwrap();
        file.1.flush().unwrap();
        let reader = std::fs::File::open(&file.0).unwrap();
        let map = Arc::new(unsafe { memmap2::Mmap::map(&reader).unwrap() });
        let q = MappedQ8::new(map.clone(), 2, out_dim, in_dim).unwrap();
        assert!(MappedQ8::new(map.clone(), 1, out_dim, in_dim).is_err());
        assert!(MappedQ8::new(map, 4, out_dim, in_dim).is_err());
        let deq = q.dequantize().unwrap();
        let candle = QTensor::quantize(&w, GgmlDType::Q8_0)
            .unwrap()
            .dequantize(&dev)
            .unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert_eq!(diff(&deq, &candle), 0.0);
        let y = q.forward(&x).unwrap();
        let want = x.matmul(&deq.t().unwrap()).unwrap();
        let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff(&y, &want) <= 0.02 * scale, "{}", diff(&y, &want));
        std::fs::remove_file(&file.0).ok();
    }

    /// The in-house GEMM on panels dequantised per product equals the same GEMM on the
    /// dequantised weight packed once, bit for bit, at shapes with edges in n and a k past one
    /// block (320 = 256 + 64); the blocks quantised in process equal candle's.
    #[test]
    fn q8_gemm_equals_the_packed_dequantised_weight() {
        use crate::model::gemm::{Epilogue, GemmDtype, PackedWeight};
        let dev = Device::Cpu;
        for (out_dim, in_dim, rows) in [(40, 96, 7), (77, 320, 29)] {
            let w = Tensor::randn(0f32, 0.05, (out_dim, in_dim), &dev).unwrap();
            let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = MappedQ8::quantize(&values, out_dim, in_dim).unwrap();
            let deq = q.dequantize().unwrap();
            let candle = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
            let candle = candle.dequantize(&dev).unwrap();
            let (a, b) = (deq.flatten_all().unwrap(), candle.flatten_all().unwrap());
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            let Some(once) =
                PackedWeight::pack(&a.to_vec1().unwrap(), out_dim, in_dim, GemmDtype::F32)
            else {
                return eprintln!("no in-house f32 GEMM on this CPU: Q8Kernel::Gemm is not chosen");
            };
            let x = Tensor::randn(0f32, 1.0, (rows, in_dim), &dev).unwrap();
            let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bias: Vec<f32> = (0..out_dim).map(|j| j as f32 * 0.01).collect();
            let mut want = vec![0f32; rows * out_dim];
            once.matmul_fused(&x, rows, &mut want, Epilogue::BiasQuickGelu(&bias));
            let mut got = vec![0f32; rows * out_dim];
            for _ in 0..2 {
                // Twice: the second product reuses the thread's scratch.
                PackedWeight::with_packed_rows(
                    out_dim,
                    in_dim,
                    |j, k0, out| q.segment(j, k0, out),
                    |p| p.matmul_fused(&x, rows, &mut got, Epilogue::BiasQuickGelu(&bias)),
                )
                .unwrap();
                assert_eq!(got, want, "[{out_dim}, {in_dim}]");
            }
        }
    }

    fn tempfile_in_target() -> (std::path::PathBuf, std::fs::File) {
        let path = std::env::temp_dir().join(format!("mapped-q8-{}.bin", std::process::id()));
        (path.clone(), std::fs::File::create(&path).unwrap())
    }
}
