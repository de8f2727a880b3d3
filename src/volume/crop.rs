//! 100^3 crops of HU at 1 mm, axes (z, y, x) (z inferior->superior, y anterior->posterior,
//! x right->left: the LPS-oriented crop, axes reversed), and the two crop file formats:
//!
//! - `.npy` (NumPy): little-endian `f4`, `f8` or `i2`, C order, shape (100, 100, 100) (leading
//!   size-1 axes allowed). Parsed in-house: the format is a magic, a Python-dict text header and
//!   raw samples; no crate is needed for that.
//! - `.pt`: the reference pipeline's crop, `torch.save` of a bare float32 tensor
//!   [1, 1, 100, 100, 100] of HU: a zip archive whose `data.pkl` pickle (parsed with candle's
//!   pickle reader) points at the raw storage record.
//!
//! Both are checked for size before reading and for finite values after.

use crate::confine::Opener;
use std::io::Read;
use std::path::Path;

/// Side of a crop in voxels (1 mm each).
pub const CROP_SIDE: usize = 100;

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

fn read_npy_file(path: &Path, mut f: std::fs::File) -> Result<CropHu, CropError> {
    let p = path.display().to_string();
    let fmt = |msg: String| CropError::Format {
        path: p.clone(),
        msg,
    };
    let mut magic = [0u8; 10];
    f.read_exact(&mut magic)
        .map_err(|_| fmt("not a .npy file (too short for the header)".into()))?;
    if &magic[..6] != b"\x93NUMPY" {
        return Err(fmt("not a .npy file (no \\x93NUMPY magic)".into()));
    }
    let header_len = match magic[6] {
        1 => u16::from_le_bytes([magic[8], magic[9]]) as usize,
        2 | 3 => {
            let mut more = [0u8; 2];
            f.read_exact(&mut more)
                .map_err(|_| fmt("truncated header".into()))?;
            u32::from_le_bytes([magic[8], magic[9], more[0], more[1]]) as usize
        }
        v => return Err(fmt(format!("unsupported .npy version {v}"))),
    };
    if header_len > 1 << 16 {
        return Err(fmt(format!("header length {header_len} is implausible")));
    }
    let mut header = vec![0u8; header_len];
    f.read_exact(&mut header)
        .map_err(|_| fmt("truncated header".into()))?;
    let header = String::from_utf8_lossy(&header).to_string();
    let descr = dict_value(&header, "descr").ok_or_else(|| fmt("header has no `descr`".into()))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let (size, kind) = match descr {
        "<f4" => (4, 'f'),
        "<f8" => (8, 'd'),
        "<i2" => (2, 'h'),
        other => return Err(fmt(format!("`descr` {other}: expected <f4, <f8 or <i2"))),
    };
    match dict_value(&header, "fortran_order") {
        Some("False") => {}
        Some(v) => {
            return Err(fmt(format!(
                "`fortran_order` {v}: only C order is supported"
            )))
        }
        None => return Err(fmt("header has no `fortran_order`".into())),
    }
    let shape_txt =
        dict_value(&header, "shape").ok_or_else(|| fmt("header has no `shape`".into()))?;
    let shape = shape_txt
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<usize>()
                .map_err(|_| fmt(format!("`shape` {shape_txt} is not a tuple of sizes")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    crop_shape(&shape).map_err(|m| fmt(format!("`shape` {m}")))?;
    let n = CROP_SIDE.pow(3);
    let mut raw = Vec::with_capacity(n * size);
    f.take((n * size) as u64)
        .read_to_end(&mut raw)
        .map_err(|err| CropError::Io {
            path: p.clone(),
            err,
        })?;
    if raw.len() != n * size {
        return Err(fmt(format!(
            "truncated data: {} of {} bytes",
            raw.len(),
            n * size
        )));
    }
    let voxels: Vec<f32> = match kind {
        'f' => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        'd' => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => raw
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)
            .collect(),
    };
    CropHu::new(CROP_SIDE, voxels).map_err(fmt)
}

/// The text of `key`'s value in a Python dict literal (up to the next top-level comma).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let k1 = format!("'{key}'");
    let start = header.find(&k1)? + k1.len();
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

/// Reads the reference pipeline's `.pt` crop (a torch zip-pickle of one float tensor).
pub fn read_pt(path: &Path) -> Result<CropHu, CropError> {
    read_pt_file(path, open_named(path)?)
}

fn read_pt_file(path: &Path, file: std::fs::File) -> Result<CropHu, CropError> {
    use candle_core::pickle::{Object, Stack};
    let p = path.display().to_string();
    let fmt = |msg: String| CropError::Format {
        path: p.clone(),
        msg,
    };
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| fmt(format!("not a torch zip archive ({e})")))?;
    let pkl: String = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.to_string()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| fmt("archive has no data.pkl".into()))?;
    let pickle = {
        let mut entry = zip.by_name(&pkl).map_err(|e| fmt(format!("{pkl}: {e}")))?;
        if entry.size() > 1 << 20 {
            return Err(fmt(format!(
                "{pkl} is {} bytes, too large for a single tensor",
                entry.size()
            )));
        }
        let mut buf = Vec::new();
        entry
            .by_ref()
            .take(1 << 20)
            .read_to_end(&mut buf)
            .map_err(|e| fmt(format!("{pkl}: {e}")))?;
        buf
    };
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::Cursor::new(&pickle))
        .map_err(|e| fmt(format!("{pkl}: bad pickle ({e})")))?;
    let obj = stack
        .finalize()
        .map_err(|e| fmt(format!("{pkl}: bad pickle ({e})")))?;
    let dir = std::path::PathBuf::from(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
    let info = obj
        .into_tensor_info(Object::Unicode("crop".into()), &dir)
        .map_err(|e| fmt(format!("{pkl}: not a tensor ({e})")))?
        .ok_or_else(|| fmt(format!("{pkl}: the pickle is not a bare tensor")))?;
    crop_shape(info.layout.dims()).map_err(|m| fmt(format!("tensor {m}")))?;
    if !info.layout.is_contiguous() {
        return Err(fmt("tensor is not contiguous".into()));
    }
    let elem = match info.dtype {
        candle_core::DType::F32 => 4,
        candle_core::DType::F64 => 8,
        other => return Err(fmt(format!("tensor dtype {other:?}: expected float32"))),
    };
    let n = CROP_SIDE.pow(3);
    let offset = info.layout.start_offset();
    let mut entry = zip
        .by_name(&info.path)
        .map_err(|e| fmt(format!("storage record {}: {e}", info.path)))?;
    if entry.size() < (offset + n * elem) as u64 {
        return Err(fmt(format!(
            "storage record {} has {} bytes, the tensor needs {}",
            info.path,
            entry.size(),
            offset + n * elem
        )));
    }
    std::io::copy(
        &mut entry.by_ref().take(offset as u64),
        &mut std::io::sink(),
    )
    .map_err(|err| CropError::Io {
        path: p.clone(),
        err,
    })?;
    let mut raw = Vec::with_capacity(n * elem);
    entry
        .by_ref()
        .take((n * elem) as u64)
        .read_to_end(&mut raw)
        .map_err(|err| CropError::Io {
            path: p.clone(),
            err,
        })?;
    if raw.len() != n * elem {
        return Err(fmt(format!(
            "storage record {}: truncated ({} of {} bytes)",
            info.path,
            raw.len(),
            n * elem
        )));
    }
    let voxels: Vec<f32> = if elem == 4 {
        raw.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        raw.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect()
    };
    CropHu::new(CROP_SIDE, voxels).map_err(fmt)
}
