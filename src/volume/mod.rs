//! CT readers into one [`Volume`] type, and 100^3 crop files into a [`crop::CropHu`].
//!
//! # Conventions
//! - Voxels are HU as `f32`, stored with index `i` fastest: voxel `(i, j, k)` is at
//!   `voxels[i + ni * (j + nj * k)]`. For DICOM, `i` runs along a row (column index), `j` down
//!   the columns (row index), `k` along the slice normal; for NIfTI and NRRD the file's own
//!   first, second and third axes.
//! - World space is **LPS** (DICOM / ITK patient coordinates, mm): world =
//!   `origin + direction * (spacing ⊙ index)`, where column `c` of `direction` is the unit LPS
//!   vector of index axis `c`. RAS inputs (NIfTI, NRRD in RAS space) are converted on reading
//!   by negating x and y.
//! - Reading does no resampling and no windowing: the Modality LUT (Rescale Slope/Intercept,
//!   NIfTI `scl_slope`/`scl_inter`) is applied to give HU; everything else happens in
//!   [`crate::preprocess`].
//!
//! [`read`] picks the reader by the path: a folder is a DICOM series; `.nii`/`.nii.gz` NIfTI;
//! `.nrrd`/`.nhdr` NRRD. Crop files (`.npy`, `.pt`) are read by [`crop::read`].
//!
//! Every reader checks sizes before allocating ([`MAX_VOXELS`]), and refuses non-finite voxels
//! and non-positive spacing with a one-line error naming the file and the field.

pub mod crop;
pub mod dicom;
pub mod nifti;
pub mod nrrd;

use crate::confine::Opener;
use std::path::{Path, PathBuf};

/// Largest volume accepted, in voxels (2^29: 2 GiB of f32, e.g. 512 x 512 x 2048).
pub const MAX_VOXELS: usize = 1 << 29;
/// Largest size accepted along one axis, in voxels.
pub const MAX_AXIS: usize = 1 << 16;

/// The file format a volume came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// A DICOM series folder.
    Dicom,
    /// NIfTI-1 (.nii, .nii.gz).
    Nifti,
    /// NRRD (.nrrd, .nhdr).
    Nrrd,
}

impl Format {
    /// Lower-case name, as written to reports.
    pub fn name(self) -> &'static str {
        match self {
            Format::Dicom => "dicom",
            Format::Nifti => "nifti",
            Format::Nrrd => "nrrd",
        }
    }
}

/// Identifiers of a volume that travel to the report.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeIds {
    /// The file or folder read.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// DICOM SeriesInstanceUID.
    pub series_uid: Option<String>,
    /// DICOM StudyInstanceUID.
    pub study_uid: Option<String>,
    /// DICOM PatientID.
    pub patient_id: Option<String>,
}

impl VolumeIds {
    /// Identifiers of a file with no DICOM identifiers.
    pub fn file(path: &Path, format: Format) -> Self {
        Self {
            path: path.to_path_buf(),
            format,
            series_uid: None,
            study_uid: None,
            patient_id: None,
        }
    }
}

/// A CT volume: HU voxels on a regular grid placed in LPS world space (see the module doc).
#[derive(Debug, Clone)]
pub struct Volume {
    /// Size along index axes (i, j, k).
    pub dims: [usize; 3],
    /// HU, `i` fastest.
    pub voxels: Vec<f32>,
    /// Voxel size along (i, j, k), mm, > 0.
    pub spacing: [f64; 3],
    /// LPS world position of voxel (0, 0, 0)'s centre, mm.
    pub origin: [f64; 3],
    /// `direction[row][col]`: column `col` is the unit LPS vector of index axis `col`.
    pub direction: [[f64; 3]; 3],
    /// Where the volume came from.
    pub ids: VolumeIds,
}

/// Errors common to every volume reader, and the readers' own errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// A file or folder could not be read.
    #[error("{path}: {err}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// The path is neither a folder nor a known volume file.
    #[error("{path}: unknown volume format (expected a DICOM series folder, .nii, .nii.gz, .nrrd or .nhdr)")]
    UnknownFormat {
        /// The path.
        path: String,
    },
    /// Geometry or size is unusable.
    #[error("{path}: {msg}")]
    Geometry {
        /// The file.
        path: String,
        /// What is wrong, naming the field.
        msg: String,
    },
    /// Some voxels are NaN or infinite.
    #[error("{path}: {count} voxel(s) are not finite (first at index (i, j, k) = ({}, {}, {}))", first[0], first[1], first[2])]
    NotFinite {
        /// The file.
        path: String,
        /// How many.
        count: usize,
        /// Index of the first one.
        first: [usize; 3],
    },
    /// A DICOM series error.
    #[error(transparent)]
    Dicom(#[from] dicom::DicomError),
    /// A NIfTI error.
    #[error(transparent)]
    Nifti(#[from] nifti::NiftiError),
    /// An NRRD error.
    #[error(transparent)]
    Nrrd(#[from] nrrd::NrrdError),
}

/// Checks announced dimensions before anything is allocated: every axis in 1..=MAX_AXIS and
/// the product at most [`MAX_VOXELS`]. Returns the voxel count.
pub fn check_dims(path: &Path, field: &str, dims: &[usize]) -> Result<usize, VolumeError> {
    let geometry = |msg: String| VolumeError::Geometry {
        path: path.display().to_string(),
        msg,
    };
    let count = dims.iter().fold(1usize, |acc, &d| acc.saturating_mul(d));
    if dims.contains(&0) {
        return Err(geometry(format!("{field} {dims:?}: a size is 0")));
    }
    if count > MAX_VOXELS {
        return Err(geometry(format!(
            "{field} {dims:?} announces {count} voxels, more than the {MAX_VOXELS} accepted"
        )));
    }
    if dims.iter().any(|&d| d > MAX_AXIS) {
        return Err(geometry(format!(
            "{field} {dims:?}: each size must be at most {MAX_AXIS}"
        )));
    }
    Ok(count)
}

impl Volume {
    /// Builds a volume, checking sizes, spacing, direction and that every voxel is finite.
    pub fn new(
        dims: [usize; 3],
        voxels: Vec<f32>,
        spacing: [f64; 3],
        origin: [f64; 3],
        direction: [[f64; 3]; 3],
        ids: VolumeIds,
    ) -> Result<Self, VolumeError> {
        let path = ids.path.display().to_string();
        let geometry = |msg: String| VolumeError::Geometry {
            path: path.clone(),
            msg,
        };
        let count = check_dims(&ids.path, "size", &dims)?;
        if dims.iter().any(|&d| d < 2) {
            return Err(geometry(format!(
                "size {dims:?}: a CT volume needs at least 2 voxels along each axis"
            )));
        }
        if voxels.len() != count {
            return Err(geometry(format!(
                "{} voxels for size {dims:?}",
                voxels.len()
            )));
        }
        for (axis, &s) in spacing.iter().enumerate() {
            if !(s.is_finite() && s > 0.0) {
                return Err(geometry(format!(
                    "spacing {spacing:?}: axis {axis} is {s}, must be finite and > 0 mm"
                )));
            }
        }
        if let Some(o) = origin.iter().find(|o| !o.is_finite()) {
            return Err(geometry(format!("origin {origin:?}: {o} is not finite")));
        }
        for c in 0..3 {
            let col = [direction[0][c], direction[1][c], direction[2][c]];
            let norm = dot(col, col).sqrt();
            if !norm.is_finite() || (norm - 1.0).abs() > 1e-3 {
                return Err(geometry(format!(
                    "direction of axis {c} {col:?} is not a unit vector"
                )));
            }
        }
        let det = det3(&direction);
        if det.is_nan() || det.abs() <= 0.99 {
            return Err(geometry(format!(
                "direction cosines {direction:?} are not orthogonal (determinant {det})"
            )));
        }
        let mut bad = 0usize;
        let mut first = None;
        for (n, v) in voxels.iter().enumerate() {
            if !v.is_finite() {
                bad += 1;
                first.get_or_insert(n);
            }
        }
        if let Some(n) = first {
            let first = [
                n % dims[0],
                (n / dims[0]) % dims[1],
                n / (dims[0] * dims[1]),
            ];
            return Err(VolumeError::NotFinite {
                path,
                count: bad,
                first,
            });
        }
        Ok(Self {
            dims,
            voxels,
            spacing,
            origin,
            direction,
            ids,
        })
    }

    /// The voxel -> LPS world affine: linear part `direction * diag(spacing)` and offset `origin`.
    pub fn lps_affine(&self) -> ([[f64; 3]; 3], [f64; 3]) {
        let mut lin = [[0.0; 3]; 3];
        for (r, row) in lin.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.direction[r][c] * self.spacing[c];
            }
        }
        (lin, self.origin)
    }

    /// The voxel -> RAS world affine (the LPS one with x and y negated), as MONAI sees it.
    pub fn ras_affine(&self) -> ([[f64; 3]; 3], [f64; 3]) {
        let (mut lin, mut off) = self.lps_affine();
        for r in 0..2 {
            for v in lin[r].iter_mut() {
                *v = -*v;
            }
            off[r] = -off[r];
        }
        (lin, off)
    }

    /// The voxel at (i, j, k).
    pub fn at(&self, i: usize, j: usize, k: usize) -> f32 {
        self.voxels[i + self.dims[0] * (j + self.dims[1] * k)]
    }
}

/// Spacing, direction and origin of a volume, as [`Volume`] holds them.
pub type Geometry = ([f64; 3], [[f64; 3]; 3], [f64; 3]);

/// Splits a general voxel -> LPS affine (linear part, offset) into spacing, direction, origin.
/// Fails (naming `field`) when an axis has zero length or the numbers are not finite.
pub fn decompose_affine(
    path: &Path,
    field: &str,
    lin: [[f64; 3]; 3],
    off: [f64; 3],
) -> Result<Geometry, VolumeError> {
    let mut spacing = [0.0; 3];
    let mut direction = [[0.0; 3]; 3];
    for c in 0..3 {
        let col = [lin[0][c], lin[1][c], lin[2][c]];
        let s = dot(col, col).sqrt();
        if !(s.is_finite() && s > 0.0) {
            return Err(VolumeError::Geometry {
                path: path.display().to_string(),
                msg: format!(
                    "{field}: axis {c} has spacing {s} mm (column {col:?}), must be finite and > 0"
                ),
            });
        }
        spacing[c] = s;
        for r in 0..3 {
            direction[r][c] = col[r] / s;
        }
    }
    Ok((spacing, direction, off))
}

/// Reads a CT volume: a DICOM series folder (`series_uid` picks one when it holds several),
/// a NIfTI file or an NRRD file, from anywhere (the command line).
pub fn read(path: &Path, series_uid: Option<&str>) -> Result<Volume, VolumeError> {
    read_in(&Opener::unconfined(), path, series_uid)
}

/// [`read`] with every file (folder members and NRRD data files included) opened through
/// `opener` (see [`crate::confine`]).
pub fn read_in(
    opener: &Opener,
    path: &Path,
    series_uid: Option<&str>,
) -> Result<Volume, VolumeError> {
    let io = |err| VolumeError::Io {
        path: path.display().to_string(),
        err,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        nifti::read_file(path, opener.open_file(path).map_err(io)?)
    } else if name.ends_with(".nrrd") || name.ends_with(".nhdr") {
        nrrd::read_file(opener, path, opener.open_file(path).map_err(io)?)
    } else {
        match opener.open_dir(path) {
            Ok(dir) => dicom::read_series_dir(&dir, series_uid),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Err(VolumeError::UnknownFormat {
                path: path.display().to_string(),
            }),
            Err(e) => Err(io(e)),
        }
    }
}

/// Whether `path` names a crop file (`.npy` or `.pt`) rather than a volume.
pub fn is_crop_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    name.ends_with(".npy") || name.ends_with(".pt") || name.ends_with(".pth")
}

pub(crate) fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

pub(crate) fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub(crate) fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// A scalar sample type of NIfTI / NRRD voxel data; [`Sample::decode`] turns raw little- or
/// big-endian bytes into f32 HU with `value * slope + intercept` computed in f64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sample {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl Sample {
    pub(crate) fn size(self) -> usize {
        match self {
            Sample::I8 | Sample::U8 => 1,
            Sample::I16 | Sample::U16 => 2,
            Sample::I32 | Sample::U32 | Sample::F32 => 4,
            Sample::I64 | Sample::U64 | Sample::F64 => 8,
        }
    }

    /// Decodes `bytes` into f32, applying `v * slope + intercept` (computed in f64).
    pub(crate) fn decode(
        self,
        bytes: &[u8],
        big_endian: bool,
        slope: f64,
        intercept: f64,
    ) -> Vec<f32> {
        let n = self.size();
        let identity = slope == 1.0 && intercept == 0.0;
        bytes
            .chunks_exact(n)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..n].copy_from_slice(c);
                if big_endian {
                    b[..n].reverse();
                }
                let v: f64 = match self {
                    Sample::I8 => b[0] as i8 as f64,
                    Sample::U8 => b[0] as f64,
                    Sample::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
                    Sample::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
                    Sample::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                    Sample::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                    Sample::I64 => i64::from_le_bytes(b) as f64,
                    Sample::U64 => u64::from_le_bytes(b) as f64,
                    Sample::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                    Sample::F64 => f64::from_le_bytes(b),
                };
                if identity {
                    v as f32
                } else {
                    (v * slope + intercept) as f32
                }
            })
            .collect()
    }
}

/// Reads at most `limit` bytes from `reader` without reserving `limit` up front (a lying
/// header cannot make us allocate more than the data actually present).
pub(crate) fn read_at_most(
    reader: &mut impl std::io::Read,
    limit: usize,
) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(limit.min(64 << 20));
    reader.take(limit as u64).read_to_end(&mut out)?;
    Ok(out)
}
