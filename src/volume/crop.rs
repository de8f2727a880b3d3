//! 100^3 crops of HU at 1 mm, axes (z, y, x) (z inferior->superior, y anterior->posterior,
//! x right->left: the LPS-oriented crop, axes reversed), and the two crop file formats:
//!
//! - `.npy` (NumPy): little-endian `f4`, `f8` or `i2`, C order, shape (100, 100, 100) (leading
//!   size-1 axes allowed). Read with the `npyz` crate (magic, versions 1-3, the header dict,
//!   dtype, order, typed samples). Chosen over `ndarray-npy`: `npyz` hands back the header
//!   (shape, dtype, order) before reading any sample, so the shape is checked against 100^3
//!   before anything is allocated for it, and it reads into a flat `Vec` without an ndarray
//!   round trip; `ndarray-npy`'s `read_npy` allocates the declared shape in the same call
//!   that parses it. `npyz` 0.9 still trusts three things in the header, so
//!   `npy_header` checks them first: the declared header length (it allocates it before
//!   reading; capped at 64 KiB), bracket nesting (its Python-literal parser recurses per
//!   level: 20000 levels overflowed the stack) and the digits of the shape (it multiplies
//!   the sizes unchecked: an overflow panics in debug builds). `write_npy` is the writer
//!   (synth's crops): in-house because `npyz`'s writer pads the header to 16 bytes where
//!   NumPy pads to 64, and synth's crops keep NumPy's layout byte for byte.
//! - `.pt`: the reference pipeline's crop, `torch.save` of a bare float32 tensor
//!   [1, 1, 100, 100, 100] of HU: a zip archive whose `data.pkl` pickle (read with candle's
//!   pickle reader, as the checkpoints are) points at the raw storage record. Not through
//!   candle's `PthTensors`: it lists only the tensors of a pickled dict (a state dict), so a
//!   bare tensor gives none (test `pth_tensors_sees_no_bare_tensor`), and it opens files by
//!   path, where a job's crop must be read from the file [`crate::confine`] opened. candle's
//!   pickle reader trusts the pickle, so `read_pickle` drives it one op-code at a time
//!   and refuses, before they happen: a string longer than the bytes left (it allocates the
//!   declared length, up to 4 GiB), a `LONG1` over 8 bytes (shift overflow), a stack over
//!   `MAX_PICKLE_NODES` values (memo gets clone deeply: doubling per op-code) and more
//!   than `MAX_PICKLE_PUTS` memo puts; then `check_bare_tensor` checks the arity of the
//!   tuples candle's `into_tensor_info` indexes without checking (`Vec::remove` panics).
//!
//! Both are checked for size before reading and for finite values after.

use crate::confine::Opener;
use candle_core::pickle::{Object, Stack};
use std::io::Read;
use std::path::Path;

/// Side of a crop in voxels (1 mm each).
pub const CROP_SIDE: usize = 100;

/// Largest `.npy` header text read (NumPy writes 118 bytes for a crop).
pub const MAX_NPY_HEADER: usize = 1 << 16;

/// Deepest bracket nesting accepted in a `.npy` header (a crop's nests 2: the dict and the
/// shape tuple; structured dtypes 4).
const MAX_NPY_DEPTH: usize = 8;

/// Most decimal digits in a `.npy` header: the sizes' product is then below 10^19 < 2^64
/// (a crop's header has at most 12).
const MAX_NPY_DIGITS: usize = 19;

/// Largest `data.pkl` read from a `.pt` (a bare tensor's is 178 bytes).
pub const MAX_PICKLE_BYTES: u64 = 4096;

/// Most values (nodes, counting nested ones) on the pickle stack at any op-code (a bare
/// tensor's pickle peaks near 30).
pub const MAX_PICKLE_NODES: usize = 512;

/// Most memo puts in a pickle (a bare tensor's has 12).
pub const MAX_PICKLE_PUTS: usize = 64;

/// A cubic crop of HU, axes (z, y, x), `voxels[(z * side + y) * side + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CropHu {
    /// Side in voxels.
    pub side: usize,
    /// HU values.
    pub voxels: Vec<f32>,
}

impl CropHu {
    /// Wraps a buffer of `side^3` values, checking the length and that every value is finite.
    pub fn new(side: usize, voxels: Vec<f32>) -> Result<Self, String> {
        if voxels.len() != side * side * side {
            return Err(format!("{} values for a {side}^3 crop", voxels.len()));
        }
        if let Some(n) = voxels.iter().position(|v| !v.is_finite()) {
            let count = voxels.iter().filter(|v| !v.is_finite()).count();
            let (z, y, x) = (n / (side * side), (n / side) % side, n % side);
            return Err(format!(
                "{count} value(s) are not finite (first at (z, y, x) = ({z}, {y}, {x}))"
            ));
        }
        Ok(Self { side, voxels })
    }

    /// The value at (z, y, x).
    pub fn at(&self, z: usize, y: usize, x: usize) -> f32 {
        self.voxels[(z * self.side + y) * self.side + x]
    }
}

/// Errors reading a crop file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CropError {
    /// The file could not be read.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// The file is malformed or not a 100^3 crop.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong, naming the field.
        msg: String,
    },
}

/// Reads a `.npy` or `.pt` crop, from anywhere (the command line).
pub fn read(path: &Path) -> Result<CropHu, CropError> {
    read_in(&Opener::unconfined(), path)
}

/// Reads a `.npy` or `.pt` crop opened through `opener` (see [`crate::confine`]).
pub fn read_in(opener: &Opener, path: &Path) -> Result<CropHu, CropError> {
    let open = || {
        opener.open_file(path).map_err(|err| CropError::Io {
            path: path.display().to_string(),
            err,
        })
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.ends_with(".npy") {
        read_npy_file(path, open()?)
    } else if name.ends_with(".pt") || name.ends_with(".pth") {
        read_pt_file(path, open()?)
    } else {
        Err(CropError::Format {
            path: path.display().to_string(),
            msg: "unknown crop format (expected .npy or .pt)".into(),
        })
    }
}

/// Shape with leading size-1 axes removed, checked to be CROP_SIDE^3.
fn crop_shape(shape: &[usize]) -> Result<(), String> {
    let first = shape.iter().position(|&d| d != 1).unwrap_or(shape.len());
    let core = &shape[first..];
    if core != [CROP_SIDE; 3] {
        return Err(format!("shape {shape:?}: expected ({CROP_SIDE}, {CROP_SIDE}, {CROP_SIDE}) (z, y, x), leading 1s allowed"));
    }
    Ok(())
}

/// Reads a NumPy `.npy` crop.
pub fn read_npy(path: &Path) -> Result<CropHu, CropError> {
    read_npy_file(path, open_named(path)?)
}

fn open_named(path: &Path) -> Result<std::fs::File, CropError> {
    Opener::unconfined()
        .open_file(path)
        .map_err(|err| CropError::Io {
            path: path.display().to_string(),
            err,
        })
}

fn read_npy_file(path: &Path, file: std::fs::File) -> Result<CropHu, CropError> {
    let fmt = |msg: String| CropError::Format {
        path: path.display().to_string(),
        msg,
    };
    let mut file = std::io::BufReader::new(file);
    let head = npy_header(&mut file).map_err(fmt)?;
    let npy = npyz::NpyFile::new(std::io::Cursor::new(head).chain(file))
        .map_err(|e| fmt(format!("bad header ({})", one_line(e))))?;
    if npy.order() != npyz::Order::C {
        return Err(fmt("`fortran_order` True: only C order is supported".into()));
    }
    let shape: Vec<usize> = npy
        .shape()
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
        .collect();
    crop_shape(&shape).map_err(|m| fmt(format!("`shape` {m}")))?;
    let descr = match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => other.descr(),
    };
    let voxels = match descr.as_str() {
        "<f4" => npy_samples::<f32, _>(npy, |v| v),
        "<f8" => npy_samples::<f64, _>(npy, |v| v as f32),
        "<i2" => npy_samples::<i16, _>(npy, |v| v as f32),
        other => Err(format!("`descr` {other}: expected <f4, <f8 or <i2")),
    }
    .map_err(fmt)?;
    CropHu::new(CROP_SIDE, voxels).map_err(fmt)
}

/// The crop's samples (the shape is already checked to hold CROP_SIDE^3) as f32.
fn npy_samples<T: npyz::Deserialize, R: Read>(
    npy: npyz::NpyFile<R>,
    to_f32: fn(T) -> f32,
) -> Result<Vec<f32>, String> {
    let n = CROP_SIDE.pow(3);
    let samples = npy
        .data::<T>()
        .map_err(|e| format!("`descr`: {}", one_line(e)))?;
    let mut out = Vec::with_capacity(n);
    for v in samples {
        let v = v.map_err(|e| {
            format!(
                "truncated data: {} of {n} samples ({})",
                out.len(),
                one_line(e)
            )
        })?;
        out.push(to_f32(v));
    }
    Ok(out)
}

/// The `.npy` preamble and header text, read and checked before `npyz` parses them (see the
/// module doc): magic, a header length up to [`MAX_NPY_HEADER`], brackets nested at most
/// [`MAX_NPY_DEPTH`] deep, at most [`MAX_NPY_DIGITS`] decimal digits and no non-decimal
/// integer. Returns the bytes read, for `npyz` to read again.
fn npy_header(f: &mut impl Read) -> Result<Vec<u8>, String> {
    let mut head = vec![0u8; 10];
    f.read_exact(&mut head)
        .map_err(|_| "not a .npy file (too short for the header)".to_string())?;
    if &head[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let len = match head[6] {
        1 => u16::from_le_bytes([head[8], head[9]]) as usize,
        2 | 3 => {
            let mut more = [0u8; 2];
            f.read_exact(&mut more)
                .map_err(|_| "truncated header".to_string())?;
            head.extend_from_slice(&more);
            u32::from_le_bytes([head[8], head[9], more[0], more[1]]) as usize
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    if len > MAX_NPY_HEADER {
        return Err(format!("header length {len} is implausible"));
    }
    let start = head.len();
    head.resize(start + len, 0);
    f.read_exact(&mut head[start..])
        .map_err(|_| "truncated header".to_string())?;
    let text = &head[start..];
    let (mut depth, mut deepest, mut digits) = (0usize, 0usize, 0usize);
    for &b in text {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'0'..=b'9' => digits += 1,
            _ => {}
        }
    }
    if deepest > MAX_NPY_DEPTH {
        return Err(format!(
            "header nests brackets {deepest} deep (at most {MAX_NPY_DEPTH})"
        ));
    }
    let lower = text.to_ascii_lowercase();
    let non_decimal = ["0x", "0o", "0b"]
        .iter()
        .any(|p| lower.windows(2).any(|w| w == p.as_bytes()));
    if digits > MAX_NPY_DIGITS || non_decimal {
        return Err(format!(
            "`shape`: header has {digits} digits{}; a crop's has at most 12",
            if non_decimal {
                " or a non-decimal integer"
            } else {
                ""
            }
        ));
    }
    Ok(head)
}

/// Writes `crop` as NumPy `.npy` v1.0: `<f4`, C order, shape (side, side, side), header
/// padded with spaces to a 64-byte boundary as NumPy does.
pub fn write_npy(path: &Path, crop: &CropHu) -> std::io::Result<()> {
    let n = crop.side;
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {n}, {n}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + 4 * crop.voxels.len());
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in &crop.voxels {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes)
}

/// A crate's error message on one line: its first line, plus any `= ...` note lines (the
/// header parser's multi-line syntax errors quote the whole header between them; candle
/// appends a backtrace when `RUST_BACKTRACE` is set).
fn one_line(e: impl std::fmt::Display) -> String {
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default().to_string();
    let notes: Vec<&str> = lines.filter_map(|l| l.strip_prefix("= ")).collect();
    if notes.is_empty() {
        first
    } else {
        format!("{first} {}", notes.join("; "))
    }
}

/// Reads the reference pipeline's `.pt` crop (a torch zip-pickle of one float tensor).
pub fn read_pt(path: &Path) -> Result<CropHu, CropError> {
    read_pt_file(path, open_named(path)?)
}

fn read_pt_file(path: &Path, file: std::fs::File) -> Result<CropHu, CropError> {
    let p = path.display().to_string();
    let fmt = |msg: String| CropError::Format {
        path: p.clone(),
        msg,
    };
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| fmt(format!("not a torch zip archive ({})", one_line(e))))?;
    let pkl: String = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.to_string()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| fmt("archive has no data.pkl".into()))?;
    let pickle = {
        let mut entry = zip
            .by_name(&pkl)
            .map_err(|e| fmt(format!("{pkl}: {}", one_line(e))))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(fmt(format!(
                "{pkl}: the pickle is not a bare tensor ({} bytes; a bare tensor's is at most {MAX_PICKLE_BYTES})",
                entry.size()
            )));
        }
        let mut buf = Vec::new();
        entry
            .by_ref()
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut buf)
            .map_err(|e| fmt(format!("{pkl}: {}", one_line(e))))?;
        buf
    };
    let obj = read_pickle(&pickle).map_err(|e| fmt(format!("{pkl}: bad pickle ({e})")))?;
    check_bare_tensor(&obj).map_err(|e| fmt(format!("{pkl}: {}", one_line(e))))?;
    let dir = std::path::PathBuf::from(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
    let info = obj
        .into_tensor_info(Object::Unicode("crop".into()), &dir)
        .map_err(|e| fmt(format!("{pkl}: not a tensor ({})", one_line(e))))?
        .ok_or_else(|| fmt(format!("{pkl}: the pickle is not a bare tensor")))?;
    crop_shape(info.layout.dims()).map_err(|m| fmt(format!("tensor {m}")))?;
    if !info.layout.is_contiguous() {
        return Err(fmt("tensor is not contiguous".into()));
    }
    let entry = zip
        .by_name(&info.path)
        .map_err(|e| fmt(format!("storage record {}: {}", info.path, one_line(e))))?;
    let voxels = read_storage(entry, &info).map_err(|e| match e {
        StorageError::Io(err) => CropError::Io {
            path: p.clone(),
            err,
        },
        StorageError::Format(m) => fmt(format!("storage record {}: {m}", info.path)),
    })?;
    CropHu::new(CROP_SIDE, voxels).map_err(fmt)
}

enum StorageError {
    Io(std::io::Error),
    Format(String),
}

/// The crop's samples from its storage record (float32 or float64, little-endian), as f32.
fn read_storage(
    mut entry: impl Read,
    info: &candle_core::pickle::TensorInfo,
) -> Result<Vec<f32>, StorageError> {
    let elem = match info.dtype {
        candle_core::DType::F32 => 4,
        candle_core::DType::F64 => 8,
        other => {
            return Err(StorageError::Format(format!(
                "tensor dtype {other:?}: expected float32"
            )))
        }
    };
    let n = CROP_SIDE.pow(3);
    let offset = info.layout.start_offset() as u64;
    let skipped = std::io::copy(&mut entry.by_ref().take(offset), &mut std::io::sink())
        .map_err(StorageError::Io)?;
    let mut raw = Vec::with_capacity(n * elem);
    entry
        .take((n * elem) as u64)
        .read_to_end(&mut raw)
        .map_err(StorageError::Io)?;
    if skipped < offset || raw.len() != n * elem {
        return Err(StorageError::Format(format!(
            "truncated ({} of {} bytes from offset {offset})",
            raw.len(),
            n * elem
        )));
    }
    let tensor =
        candle_core::Tensor::from_raw_buffer(&raw, info.dtype, &[n], &candle_core::Device::Cpu)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| StorageError::Format(one_line(e)))?;
    Ok(tensor)
}

/// Runs candle's pickle reader over `pickle` one op-code at a time, refusing what would
/// make it allocate without bound or panic (see the module doc).
fn read_pickle(pickle: &[u8]) -> Result<Object, String> {
    let mut r = std::io::Cursor::new(pickle);
    let mut stack = Stack::empty();
    let mut puts = 0;
    loop {
        let at = r.position() as usize;
        let rest = &pickle[at.min(pickle.len())..];
        match rest.first() {
            Some(b'X') => {
                let len = rest.get(1..5).map_or(0, |b| {
                    u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize
                });
                if len > rest.len().saturating_sub(5) {
                    return Err(format!(
                        "string at byte {at} declares {len} bytes, {} remain",
                        rest.len().saturating_sub(5)
                    ));
                }
            }
            Some(0x8a) if rest.get(1).is_some_and(|&n| n > 8) => {
                return Err(format!("integer at byte {at} is over 8 bytes"));
            }
            Some(b'q' | b'r') => {
                puts += 1;
                if puts > MAX_PICKLE_PUTS {
                    return Err(format!("more than {MAX_PICKLE_PUTS} memo puts"));
                }
            }
            _ => {}
        }
        let stop = stack.read(&mut r).map_err(one_line)?;
        let nodes = stack.stack().iter().try_fold(0, |n, o| count_nodes(o, n));
        if nodes.is_none() {
            return Err(format!(
                "more than {MAX_PICKLE_NODES} values on the stack at byte {at}"
            ));
        }
        if stop {
            return stack.finalize().map_err(one_line);
        }
    }
}

/// `seen` plus the values in `obj` (itself and nested), or None past `MAX_PICKLE_NODES`
/// (strings count one per 64 bytes).
fn count_nodes(obj: &Object, seen: usize) -> Option<usize> {
    let seen = seen + 1;
    if seen > MAX_PICKLE_NODES {
        return None;
    }
    match obj {
        Object::Unicode(s) => Some(seen + s.len() / 64).filter(|&n| n <= MAX_PICKLE_NODES),
        Object::Class {
            module_name,
            class_name,
        } => Some(seen + (module_name.len() + class_name.len()) / 64)
            .filter(|&n| n <= MAX_PICKLE_NODES),
        Object::Tuple(v) | Object::List(v) => v.iter().try_fold(seen, |n, o| count_nodes(o, n)),
        Object::Dict(kv) => kv
            .iter()
            .try_fold(seen, |n, (k, v)| count_nodes(v, count_nodes(k, n)?)),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            count_nodes(args, count_nodes(callable, seen)?)
        }
        Object::PersistentLoad(o) => count_nodes(o, seen),
        _ => Some(seen),
    }
}

/// Checks `obj` is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` with
/// a 5-tuple persistent storage id and an offset in 0..2^31: the tuples and values candle's
/// `into_tensor_info` indexes and multiplies without checking.
fn check_bare_tensor(obj: &Object) -> Result<(), String> {
    let not_bare = || "the pickle is not a bare tensor (torch.save of one tensor)".to_string();
    let Object::Reduce { callable, args } = obj else {
        return Err(not_bare());
    };
    match callable.as_ref() {
        Object::Class {
            module_name,
            class_name,
        } if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2" => {}
        _ => return Err(not_bare()),
    }
    let Object::Tuple(args) = args.as_ref() else {
        return Err(not_bare());
    };
    if args.len() < 4 {
        return Err(format!(
            "_rebuild_tensor_v2 has {} arguments, expected at least 4",
            args.len()
        ));
    }
    match &args[0] {
        Object::PersistentLoad(id) if matches!(id.as_ref(), Object::Tuple(t) if t.len() >= 5) => {}
        _ => return Err("the tensor's storage is not a 5-tuple persistent id".into()),
    }
    match &args[1] {
        Object::Int(o) if *o >= 0 => Ok(()),
        Object::Long(o) if (0..1 << 31).contains(o) => Ok(()),
        other => Err(format!("storage offset {other:?} is not in 0..2^31")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// `.npy` v1.0 bytes with header dict `dict` (padded to 64 bytes) followed by `data`.
    fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut h = dict.to_string();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn read_bytes(name: &str, bytes: &[u8]) -> Result<CropHu, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        read(&path).map_err(|e| e.to_string())
    }

    fn values() -> Vec<f32> {
        (0..CROP_SIDE.pow(3))
            .map(|i| (i % 2001) as f32 - 1000.0)
            .collect()
    }

    /// f4 (written by `write_npy`), f8 and i2 give the same voxels, leading 1s allowed.
    #[test]
    fn npy_dtypes_and_shapes_read_the_same_voxels() {
        let v = values();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.npy");
        let crop = CropHu::new(CROP_SIDE, v.clone()).unwrap();
        write_npy(&path, &crop).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 128 + 4 * v.len(), "64-byte aligned header");
        assert_eq!(read(&path).unwrap(), crop);
        let f8: Vec<u8> = v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect();
        let i2: Vec<u8> = v.iter().flat_map(|&x| (x as i16).to_le_bytes()).collect();
        for (descr, shape, data) in [
            ("<f8", "(100, 100, 100)", &f8),
            ("<i2", "(1, 1, 100, 100, 100)", &i2),
        ] {
            let dict =
                format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
            assert_eq!(
                read_bytes("c.npy", &npy(&dict, data)).unwrap(),
                crop,
                "{descr}"
            );
        }
    }

    /// Hostile or malformed headers: one line naming the file and the field, refused before
    /// npyz allocates or recurses (a 4 GiB header length, 20000 nested brackets, a shape
    /// whose product overflows u64, hex sizes).
    #[test]
    fn npy_hostile_headers_give_one_line_errors() {
        let ok =
            |shape: &str| format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        let mut v2 = b"\x93NUMPY\x02\x00\xff\xff\xff\xff".to_vec();
        v2.extend_from_slice(&[b' '; 100]);
        let deep = ok(&format!("{}100{}", "(".repeat(20000), ")".repeat(20000)));
        let mut deep_bytes = b"\x93NUMPY\x02\x00".to_vec();
        deep_bytes.extend_from_slice(&(deep.len() as u32).to_le_bytes());
        deep_bytes.extend_from_slice(deep.as_bytes());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (v2, "header length 4294967295 is implausible"),
            (deep_bytes, "header nests brackets 20001 deep"),
            (
                npy(&ok("(4294967296, 4294967296, 2)"), &[]),
                "`shape`: header has 22 digits",
            ),
            (
                npy(&ok("(0x100000000, 0x100000000, 2)"), &[]),
                "non-decimal integer",
            ),
            (
                npy(&ok("(100000, 100000, 100000)"), &[]),
                "`shape` shape [100000, 100000, 100000]",
            ),
            (
                npy("{'fortran_order': False, 'shape': (100, 100, 100), }", &[]),
                "dict is missing key 'descr'",
            ),
            (
                npy(
                    "{'descr': '<f4', 'fortran_order': True, 'shape': (100, 100, 100), }",
                    &[],
                ),
                "`fortran_order` True",
            ),
            (
                npy(&ok("(100, 100, 100)").replace("<f4", "<i4"), &[]),
                "`descr` <i4: expected <f4, <f8 or <i2",
            ),
            (
                npy(&ok("(100, 100, 100)"), &[0; 4000]),
                "truncated data: 1000 of 1000000 samples",
            ),
            (
                b"\x93NUMPY\x01\x00\x10\x00{'descr'".to_vec(),
                "truncated header",
            ),
            (
                npy(&ok("(100, 100 100)"), &[]),
                "bad header (could not parse Python expression",
            ),
            (
                b"\x93NUMPX\x01\x00\x10\x00{'descr'".to_vec(),
                "no \\x93NUMPY magic",
            ),
        ];
        for (bytes, want) in cases {
            let err = read_bytes("h.npy", &bytes).unwrap_err();
            assert!(
                err.contains("h.npy: ") && err.contains(want),
                "{err:?} lacks {want:?}"
            );
            assert!(!err.contains('\n'), "{err:?}");
        }
    }

    fn fixture_pt() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crops/synthetic0.pt")
    }

    /// Why `.pt` crops are not read with `PthTensors`: it lists only a pickled dict's
    /// tensors, so the reference's bare-tensor crop shows none (if candle learns bare
    /// tensors, this fails and the reader can move onto it).
    #[test]
    fn pth_tensors_sees_no_bare_tensor() {
        let pth = candle_core::pickle::PthTensors::new(fixture_pt(), None).unwrap();
        assert!(pth.tensor_infos().is_empty());
        assert_eq!(read(&fixture_pt()).unwrap().voxels.len(), CROP_SIDE.pow(3));
    }

    /// The fixture `.pt` with `data.pkl` replaced by `pickle`.
    fn pt_with(pickle: &[u8]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        w.start_file("synthetic0/data.pkl", opts).unwrap();
        w.write_all(pickle).unwrap();
        w.finish().unwrap().into_inner()
    }

    /// Pickles that would make candle's reader allocate 4 GiB, double a value per op-code
    /// (2^40 values), nest 3000 deep, overflow a shift or index a short tuple (a panic) are
    /// refused with one line naming the file and `data.pkl`.
    #[test]
    fn pt_hostile_pickles_give_one_line_errors() {
        let mut laughs = b"\x80\x02)q\x00".to_vec();
        for _ in 0..40 {
            laughs.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        laughs.push(b'.');
        let mut deep = b"\x80\x02)".to_vec();
        deep.extend(std::iter::repeat_n(0x85u8, 3000));
        deep.push(b'.');
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"\x80\x02X\xff\xff\xff\xffabc.".to_vec(),
                "declares 4294967295 bytes, 4 remain",
            ),
            (laughs, "more than 512 values on the stack"),
            (deep, "more than 512 values on the stack"),
            (
                b"\x80\x02\x8a\xc8\x00.".to_vec(),
                "integer at byte 2 is over 8 bytes",
            ),
            (
                b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(K\x01tR.".to_vec(),
                "has 1 arguments",
            ),
            (b"\x80\x02K\x01.".to_vec(), "not a bare tensor"),
            (
                vec![b'('; 5000],
                "the pickle is not a bare tensor (5000 bytes",
            ),
        ];
        for (pickle, want) in cases {
            let err = read_bytes("h.pt", &pt_with(&pickle)).unwrap_err();
            assert!(
                err.contains("h.pt: ") && err.contains(want),
                "{err:?} lacks {want:?}"
            );
            assert!(!err.contains('\n'), "{err:?}");
        }
    }
}
