//! NIfTI-1 reader (`.nii`, `.nii.gz`) into a [`Volume`].
//!
//! The header is parsed by the `nifti` crate; the voxel data is read here so that sizes are
//! checked before anything is allocated (the crate reserves what the header announces).
//!
//! Geometry follows nibabel (what the reference pipeline used): the `sform` when
//! `sform_code > 0`, else the `qform` (quaternion, `pixdim`, `qfac`) when `qform_code > 0`;
//! a file with neither is refused (no world position). NIfTI world space is RAS; it is turned
//! into LPS by negating x and y. Voxel values are scaled by `scl_slope`/`scl_inter` when
//! `scl_slope` is non-zero, giving HU. Index order is the file's (i fastest), as in [`Volume`].

use super::{
    check_dims, decompose_affine, read_at_most, Format, Sample, Volume, VolumeError, VolumeIds,
};
use flate2::read::GzDecoder;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

/// Errors reading a NIfTI file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NiftiError {
    /// The header could not be parsed.
    #[error("{path}: not a readable NIfTI-1 header ({msg})")]
    Header {
        /// The file.
        path: String,
        /// The parser's message.
        msg: String,
    },
    /// A header field is unusable.
    #[error("{path}: header field `{field}`: {msg}")]
    Field {
        /// The file.
        path: String,
        /// The NIfTI field name.
        field: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// The voxel data is shorter than the header announces.
    #[error("{path}: truncated voxel data: {got} of {expected} bytes")]
    Truncated {
        /// The file.
        path: String,
        /// Bytes present.
        got: usize,
        /// Bytes announced.
        expected: usize,
    },
    /// The voxel data could not be read (a corrupt or cut gzip stream, an I/O error).
    #[error("{path}: cannot read voxel data: {what} is corrupt or truncated ({err})")]
    Data {
        /// The file.
        path: String,
        /// "gzip stream" or "file".
        what: &'static str,
        /// Why.
        err: std::io::Error,
    },
    /// Decompression or reading failed.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        err: std::io::Error,
    },
}

/// Reads a `.nii` or `.nii.gz` file.
pub fn read(path: &Path) -> Result<Volume, VolumeError> {
    let file = std::fs::File::open(path).map_err(|err| NiftiError::Io {
        path: path.display().to_string(),
        err,
    })?;
    read_file(path, file)
}

/// Reads a `.nii` or `.nii.gz` file from its opened descriptor (`path` names it in messages).
pub fn read_file(path: &Path, mut file: std::fs::File) -> Result<Volume, VolumeError> {
    let p = path.display().to_string();
    let io = |err: std::io::Error| NiftiError::Io {
        path: p.clone(),
        err,
    };
    let field = |field: &'static str, msg: String| NiftiError::Field {
        path: p.clone(),
        field,
        msg,
    };
    let file_len = file.metadata().map_err(io)?.len();
    let mut gz_magic = [0u8; 2];
    {
        let mut f = &file;
        let n = f.read(&mut gz_magic).map_err(io)?;
        if n < 2 {
            gz_magic = [0, 0];
        }
    }
    file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
    let gz = gz_magic == [0x1f, 0x8b];
    let mut reader: Box<dyn Read> = if gz {
        Box::new(GzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };

    let mut head = [0u8; 348];
    reader
        .read_exact(&mut head)
        .map_err(|e| NiftiError::Header {
            path: p.clone(),
            msg: e.to_string(),
        })?;
    let h = ::nifti::NiftiHeader::from_reader(&head[..]).map_err(|e| NiftiError::Header {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    if &h.magic != b"n+1\0" {
        return Err(field(
            "magic",
            "only single-file NIfTI-1 (n+1) is supported, not a .hdr/.img pair".into(),
        )
        .into());
    }
    let ndim = h.dim[0] as usize;
    if !(3..=7).contains(&ndim) || h.dim[4..=ndim].iter().any(|&d| d != 1) {
        return Err(field(
            "dim",
            format!("{:?}: expected a 3-D volume", &h.dim[..=ndim.min(7)]),
        )
        .into());
    }
    let dims = [h.dim[1] as usize, h.dim[2] as usize, h.dim[3] as usize];
    let count = check_dims(path, "dim", &dims)?;
    let sample = match h.datatype {
        2 => Sample::U8,
        4 => Sample::I16,
        8 => Sample::I32,
        16 => Sample::F32,
        64 => Sample::F64,
        256 => Sample::I8,
        512 => Sample::U16,
        768 => Sample::U32,
        1024 => Sample::I64,
        1280 => Sample::U64,
        other => {
            return Err(field(
                "datatype",
                format!("{other} is not a supported scalar type"),
            )
            .into())
        }
    };
    let nbytes = count * sample.size();
    let vox_offset = h.vox_offset;
    if !(348.0..1e9).contains(&vox_offset) {
        return Err(field(
            "vox_offset",
            format!("{vox_offset} is not a valid data offset"),
        )
        .into());
    }
    let skip = vox_offset as usize - 348;
    if !gz && file_len < (vox_offset as u64).saturating_add(nbytes as u64) {
        return Err(NiftiError::Truncated {
            path: p.clone(),
            got: file_len.saturating_sub(vox_offset as u64) as usize,
            expected: nbytes,
        }
        .into());
    }

    // Geometry: voxel -> RAS.
    let (lin_ras, off_ras) = if h.sform_code > 0 {
        let rows = [h.srow_x, h.srow_y, h.srow_z];
        let mut lin = [[0.0; 3]; 3];
        let mut off = [0.0; 3];
        for r in 0..3 {
            for c in 0..3 {
                lin[r][c] = rows[r][c] as f64;
            }
            off[r] = rows[r][3] as f64;
        }
        (lin, off)
    } else if h.qform_code > 0 {
        qform_affine(&h).map_err(|msg| field("pixdim", msg))?
    } else {
        return Err(field(
            "sform_code",
            "neither sform_code nor qform_code is set: the file has no world geometry".into(),
        )
        .into());
    };
    if lin_ras
        .iter()
        .flatten()
        .chain(off_ras.iter())
        .any(|v| !v.is_finite())
    {
        return Err(field(
            if h.sform_code > 0 { "srow" } else { "quatern" },
            "affine is not finite".into(),
        )
        .into());
    }
    let mut lin = lin_ras;
    let mut off = off_ras;
    for r in 0..2 {
        for v in lin[r].iter_mut() {
            *v = -*v;
        }
        off[r] = -off[r];
    }
    let (spacing, direction, origin) = decompose_affine(
        path,
        if h.sform_code > 0 {
            "srow_x/y/z"
        } else {
            "pixdim"
        },
        lin,
        off,
    )?;

    // Voxel data.
    let mut skipped = 0usize;
    let mut buf = [0u8; 4096];
    while skipped < skip {
        let want = (skip - skipped).min(buf.len());
        let n = reader.read(&mut buf[..want]).map_err(io)?;
        if n == 0 {
            return Err(NiftiError::Truncated {
                path: p.clone(),
                got: 0,
                expected: nbytes,
            }
            .into());
        }
        skipped += n;
    }
    let raw = read_at_most(&mut reader, nbytes).map_err(|err| NiftiError::Data {
        path: p.clone(),
        what: if gz { "gzip stream" } else { "file" },
        err,
    })?;
    if raw.len() != nbytes {
        return Err(NiftiError::Truncated {
            path: p.clone(),
            got: raw.len(),
            expected: nbytes,
        }
        .into());
    }
    let big_endian = h.endianness == ::nifti::Endianness::Big;
    let (slope, inter) = if h.scl_slope != 0.0 && h.scl_slope.is_finite() {
        (
            h.scl_slope as f64,
            if h.scl_inter.is_finite() {
                h.scl_inter as f64
            } else {
                0.0
            },
        )
    } else {
        (1.0, 0.0)
    };
    let voxels = sample.decode(&raw, big_endian, slope, inter);
    drop(raw);
    Volume::new(
        dims,
        voxels,
        spacing,
        origin,
        direction,
        VolumeIds::file(path, Format::Nifti),
    )
}

/// The qform voxel -> RAS affine (NIfTI-1 method 2): rotation from the quaternion (b, c, d),
/// voxel sizes `pixdim[1..4]`, `qfac = pixdim[0]` (-1 flips k), offset `quatern_x/y/z`.
fn qform_affine(h: &::nifti::NiftiHeader) -> Result<([[f64; 3]; 3], [f64; 3]), String> {
    let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
    let a2 = 1.0 - (b * b + c * c + d * d);
    let (a, b, c, d) = if a2 < 1e-7 {
        // 180 degree rotation: renormalise (b, c, d), a = 0.
        let n = (b * b + c * c + d * d).sqrt();
        (0.0, b / n, c / n, d / n)
    } else {
        (a2.sqrt(), b, c, d)
    };
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let s = [
        h.pixdim[1] as f64,
        h.pixdim[2] as f64,
        h.pixdim[3] as f64 * qfac,
    ];
    for (axis, &v) in [h.pixdim[1], h.pixdim[2], h.pixdim[3]].iter().enumerate() {
        if !(v.is_finite() && v > 0.0) {
            return Err(format!(
                "pixdim[{}] = {v}: voxel size must be finite and > 0 mm",
                axis + 1
            ));
        }
    }
    let mut lin = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            lin[i][j] = r[i][j] * s[j];
        }
    }
    Ok((
        lin,
        [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64],
    ))
}
