//! DICOM CT series folder -> [`Volume`] (dicom-rs 0.10).
//!
//! Order of operations:
//! 1. Every file in the folder (not recursing; hidden files, non-Part-10 files and DICOMDIRs
//!    skipped) is opened up to Pixel Data (headers only) and grouped by SeriesInstanceUID.
//!    A folder with several series needs the one asked for; otherwise the list is the error.
//! 2. Each slice of the series is checked: Modality `CT`, one frame, one sample, MONOCHROME,
//!    BitsAllocated 8/16/32, a transfer syntax with a pure-Rust decoder in this build, and the
//!    same Rows, Columns, PixelSpacing and ImageOrientationPatient as the others.
//! 3. Slices are sorted by ImagePositionPatient projected on the ImageOrientationPatient
//!    normal (row x column direction), never by file name or InstanceNumber. The slice
//!    spacing comes from those positions; unequal steps (gaps), duplicate positions and
//!    in-plane shifts (gantry tilt) are refused, naming the files.
//! 4. Stored values become HU with the Modality LUT: `HU = stored * RescaleSlope +
//!    RescaleIntercept` (defaults 1 and 0), computed in f64, kept as f32. No windowing here:
//!    that happens only when the planes are made.
//!
//! Index axes: `i` along a row (ImageOrientationPatient[0..3], spacing PixelSpacing[1]),
//! `j` down a column (ImageOrientationPatient[3..6], spacing PixelSpacing[0]), `k` along the
//! normal; world space is DICOM patient space (LPS, mm); origin = first slice's position.

use super::{check_dims, cross, dot, Format, Volume, VolumeError, VolumeIds};
use crate::confine::{Dir, Opener};
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions, Tag};
use dicom_pixeldata::PixelDecoder;
use rayon::prelude::*;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

/// Transfer syntaxes this build decodes (native, deflate, JPEG baseline/extended/lossless, RLE).
const SUPPORTED_TS: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2", "Implicit VR Little Endian"),
    ("1.2.840.10008.1.2.1", "Explicit VR Little Endian"),
    (
        "1.2.840.10008.1.2.1.99",
        "Deflated Explicit VR Little Endian",
    ),
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline"),
    ("1.2.840.10008.1.2.4.51", "JPEG Extended"),
    ("1.2.840.10008.1.2.4.57", "JPEG Lossless"),
    ("1.2.840.10008.1.2.4.70", "JPEG Lossless SV1"),
    ("1.2.840.10008.1.2.5", "RLE Lossless"),
];

/// Known transfer syntaxes without a decoder in this build, named in errors.
const UNSUPPORTED_TS: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian (retired)"),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless"),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless"),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000"),
    ("1.2.840.10008.1.2.4.201", "HTJ2K Lossless"),
    ("1.2.840.10008.1.2.4.202", "HTJ2K Lossless RPCL"),
    ("1.2.840.10008.1.2.4.203", "HTJ2K"),
];

/// Media Storage Directory (DICOMDIR) SOP class.
const DICOMDIR_SOP: &str = "1.2.840.10008.1.3.10";

/// Errors reading a DICOM series.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DicomError {
    /// The folder could not be listed or a file read.
    #[error("{path}: {err}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// The folder holds no files at all.
    #[error("{dir}: empty folder, no DICOM files")]
    Empty {
        /// The folder.
        dir: String,
    },
    /// The folder holds no DICOM Part-10 files with image data.
    #[error("{dir}: no DICOM image files ({skipped} file(s) skipped, e.g. {example}: not DICOM Part 10 or a DICOMDIR)")]
    NoDicom {
        /// The folder.
        dir: String,
        /// Files skipped.
        skipped: usize,
        /// One of them.
        example: String,
    },
    /// A file has the DICOM magic but cannot be parsed.
    #[error("{path}: unreadable DICOM file ({msg})")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        msg: String,
    },
    /// A required attribute is missing.
    #[error("{path}: missing required attribute `{tag}`")]
    Missing {
        /// The file.
        path: String,
        /// DICOM keyword.
        tag: &'static str,
    },
    /// An attribute has an unusable value.
    #[error("{path}: attribute `{tag}` {msg}")]
    Bad {
        /// The file.
        path: String,
        /// DICOM keyword.
        tag: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// Several series, none chosen.
    #[error("{dir}: holds {} series, choose one with --series-uid: {}", list.len(), list.join("; "))]
    SeveralSeries {
        /// The folder.
        dir: String,
        /// "uid (n files)" for each.
        list: Vec<String>,
    },
    /// The series asked for is not there.
    #[error("{dir}: no series {uid}; the folder holds: {}", list.join("; "))]
    SeriesNotFound {
        /// The folder.
        dir: String,
        /// The UID asked for.
        uid: String,
        /// "uid (n files)" for each.
        list: Vec<String>,
    },
    /// Slices disagree, or are missing.
    #[error("{dir}: {msg}")]
    Series {
        /// The folder.
        dir: String,
        /// What is wrong, naming files and attributes.
        msg: String,
    },
    /// The transfer syntax has no decoder in this build.
    #[error("{path}: transfer syntax {uid} ({name}) is not supported: no decoder in this build")]
    TransferSyntax {
        /// The file.
        path: String,
        /// TransferSyntaxUID.
        uid: String,
        /// Its name.
        name: String,
    },
    /// Pixel data could not be decoded.
    #[error("{path}: cannot decode pixel data ({msg})")]
    Decode {
        /// The file.
        path: String,
        /// The decoder's message.
        msg: String,
    },
}

/// Header facts of one slice.
struct Slice {
    path: PathBuf,
    /// The member as opened when its header was read; its pixels are read from it too.
    file: std::fs::File,
    series_uid: String,
    study_uid: Option<String>,
    patient_id: Option<String>,
    obj: DefaultDicomObject,
}

fn name_of(path: &Path) -> String {
    path.display().to_string()
}

/// Reads a series from a folder; `series_uid` picks one when the folder holds several.
pub fn read_series(dir: &Path, series_uid: Option<&str>) -> Result<Volume, VolumeError> {
    let opened = Opener::unconfined()
        .open_dir(dir)
        .map_err(|err| DicomError::Io {
            path: name_of(dir),
            err,
        })?;
    read_series_dir(&opened, series_uid)
}

/// [`read_series`] on a folder opened through a [`crate::confine::Opener`]: its regular-file
/// members (not symlinks, not dot files) are opened beneath it, once, and read from those
/// descriptors.
pub fn read_series_dir(opened: &Dir, series_uid: Option<&str>) -> Result<Volume, VolumeError> {
    let dir = opened.path();
    let d = name_of(dir);
    let names = opened.file_names().map_err(|err| DicomError::Io {
        path: d.clone(),
        err,
    })?;
    let files: Vec<(PathBuf, std::ffi::OsString)> = names
        .into_iter()
        .filter(|n| !n.to_string_lossy().starts_with('.'))
        .map(|n| (dir.join(&n), n))
        .collect();
    crate::confine::raise_fd_limit();
    if files.is_empty() {
        return Err(DicomError::Empty { dir: d }.into());
    }

    // 1. headers, grouped by series.
    let headers: Vec<Option<Slice>> = files
        .par_iter()
        .map(|(p, n)| read_header(opened, p, n))
        .collect::<Result<_, _>>()?;
    let skipped: Vec<&PathBuf> = files
        .iter()
        .zip(&headers)
        .filter(|(_, h)| h.is_none())
        .map(|((p, _), _)| p)
        .collect();
    let slices: Vec<Slice> = headers.into_iter().flatten().collect();
    if slices.is_empty() {
        return Err(DicomError::NoDicom {
            dir: d,
            skipped: skipped.len(),
            example: name_of(skipped[0]),
        }
        .into());
    }
    let mut series: Vec<(String, Vec<Slice>)> = Vec::new();
    for s in slices {
        match series.iter_mut().find(|(uid, _)| *uid == s.series_uid) {
            Some((_, v)) => v.push(s),
            None => series.push((s.series_uid.clone(), vec![s])),
        }
    }
    let list = || {
        series
            .iter()
            .map(|(uid, v)| format!("{uid} ({} files)", v.len()))
            .collect::<Vec<_>>()
    };
    let chosen = match series_uid {
        Some(uid) => match series.iter().position(|(u, _)| u == uid) {
            Some(i) => i,
            None => {
                return Err(DicomError::SeriesNotFound {
                    dir: d,
                    uid: uid.to_string(),
                    list: list(),
                }
                .into())
            }
        },
        None if series.len() > 1 => {
            return Err(DicomError::SeveralSeries {
                dir: d,
                list: list(),
            }
            .into())
        }
        None => 0,
    };
    let (uid, slices) = series.swap_remove(chosen);
    build_volume(dir, uid, slices)
}

/// Opens a file's header (up to Pixel Data). `Ok(None)` for files to skip: not DICOM Part 10,
/// or a DICOMDIR.
/// The header (up to Pixel Data) of the member `name` of a folder opened through a
/// [`crate::confine::Opener`], read once from its descriptor with every element length
/// checked against the file, with the open file; `Ok(None)` for files without the `DICM`
/// preamble and DICOMDIRs.
pub fn header_in(
    dir: &Dir,
    name: &std::ffi::OsStr,
) -> Result<Option<(std::fs::File, DefaultDicomObject)>, DicomError> {
    let p = name_of(&dir.path().join(name));
    let mut magic = [0u8; 132];
    let mut f = dir.open_file(name).map_err(|err| DicomError::Io {
        path: p.clone(),
        err,
    })?;
    let n = read_full(&mut f, &mut magic).map_err(|err| DicomError::Io {
        path: p.clone(),
        err,
    })?;
    if n < 132 || &magic[128..132] != b"DICM" {
        return Ok(None);
    }
    let bytes = read_whole(&f, &p)?;
    check_lengths(&p, &bytes)?;
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .read_preamble(ReadPreamble::Always)
        .from_reader(&bytes[..])
        .map_err(|e| DicomError::Parse {
            path: p.clone(),
            msg: one_line(&e.to_string()),
        })?;
    if obj
        .meta()
        .media_storage_sop_class_uid()
        .trim_end_matches('\0')
        == DICOMDIR_SOP
    {
        return Ok(None);
    }
    Ok(Some((f, obj)))
}

fn read_header(
    dir: &Dir,
    path: &Path,
    name: &std::ffi::OsStr,
) -> Result<Option<Slice>, DicomError> {
    let p = name_of(path);
    let Some((f, obj)) = header_in(dir, name)? else {
        return Ok(None);
    };
    let series_uid = text(&obj, tags::SERIES_INSTANCE_UID).ok_or(DicomError::Missing {
        path: p.clone(),
        tag: "SeriesInstanceUID",
    })?;
    Ok(Some(Slice {
        path: path.to_path_buf(),
        file: f,
        series_uid,
        study_uid: text(&obj, tags::STUDY_INSTANCE_UID),
        patient_id: text(&obj, tags::PATIENT_ID),
        obj,
    }))
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let m = f.read(&mut buf[n..])?;
        if m == 0 {
            break;
        }
        n += m;
    }
    Ok(n)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn text(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok().flatten()?;
    let s = e.to_str().ok()?;
    let s = s
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string();
    (!s.is_empty()).then_some(s)
}

fn floats(
    obj: &DefaultDicomObject,
    path: &str,
    tag: Tag,
    name: &'static str,
    n: usize,
) -> Result<Vec<f64>, DicomError> {
    let e = obj
        .element_opt(tag)
        .ok()
        .flatten()
        .ok_or(DicomError::Missing {
            path: path.to_string(),
            tag: name,
        })?;
    let v = e.to_multi_float64().map_err(|err| DicomError::Bad {
        path: path.to_string(),
        tag: name,
        msg: format!("is not numeric ({})", one_line(&err.to_string())),
    })?;
    if v.len() != n || v.iter().any(|x| !x.is_finite()) {
        return Err(DicomError::Bad {
            path: path.to_string(),
            tag: name,
            msg: format!("= {v:?}: expected {n} finite numbers"),
        });
    }
    Ok(v)
}

fn uint(
    obj: &DefaultDicomObject,
    path: &str,
    tag: Tag,
    name: &'static str,
) -> Result<Option<u32>, DicomError> {
    match obj.element_opt(tag).ok().flatten() {
        None => Ok(None),
        Some(e) => e.to_int::<u32>().map(Some).map_err(|err| DicomError::Bad {
            path: path.to_string(),
            tag: name,
            msg: format!(
                "is not a non-negative integer ({})",
                one_line(&err.to_string())
            ),
        }),
    }
}

fn required_uint(
    obj: &DefaultDicomObject,
    path: &str,
    tag: Tag,
    name: &'static str,
) -> Result<u32, DicomError> {
    uint(obj, path, tag, name)?.ok_or(DicomError::Missing {
        path: path.to_string(),
        tag: name,
    })
}

/// Per-slice geometry and pixel format, checked.
struct SliceInfo {
    rows: usize,
    cols: usize,
    bits_allocated: u32,
    bits_stored: u32,
    signed: bool,
    ipp: [f64; 3],
    iop: [f64; 6],
    spacing: [f64; 2],
    slope: f64,
    intercept: f64,
}

fn slice_info(s: &Slice) -> Result<SliceInfo, DicomError> {
    let p = name_of(&s.path);
    let obj = &s.obj;
    let bad = |tag: &'static str, msg: String| DicomError::Bad {
        path: p.clone(),
        tag,
        msg,
    };
    match text(obj, tags::MODALITY) {
        Some(m) if m == "CT" => {}
        Some(m) => return Err(bad("Modality", format!("is `{m}`, only CT is accepted"))),
        None => {
            return Err(DicomError::Missing {
                path: p.clone(),
                tag: "Modality",
            })
        }
    }
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_string();
    if !SUPPORTED_TS.iter().any(|(u, _)| *u == ts) {
        let name = UNSUPPORTED_TS
            .iter()
            .find(|(u, _)| *u == ts)
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| "unknown".into());
        return Err(DicomError::TransferSyntax {
            path: p.clone(),
            uid: ts,
            name,
        });
    }
    if let Some(spp) = uint(obj, &p, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")? {
        if spp != 1 {
            return Err(bad(
                "SamplesPerPixel",
                format!("is {spp}, expected 1 (greyscale)"),
            ));
        }
    }
    if let Some(pi) = text(obj, tags::PHOTOMETRIC_INTERPRETATION) {
        if pi != "MONOCHROME2" && pi != "MONOCHROME1" {
            return Err(bad(
                "PhotometricInterpretation",
                format!("is `{pi}`, expected MONOCHROME2"),
            ));
        }
    }
    if let Some(frames) = text(obj, tags::NUMBER_OF_FRAMES) {
        if frames.trim() != "1" {
            return Err(bad(
                "NumberOfFrames",
                format!("is {frames}: multi-frame images are not supported"),
            ));
        }
    }
    let rows = required_uint(obj, &p, tags::ROWS, "Rows")? as usize;
    let cols = required_uint(obj, &p, tags::COLUMNS, "Columns")? as usize;
    if rows == 0 || cols == 0 {
        return Err(bad(
            "Rows",
            format!("Rows x Columns = {rows} x {cols}: empty image"),
        ));
    }
    let bits_allocated = required_uint(obj, &p, tags::BITS_ALLOCATED, "BitsAllocated")?;
    if ![8, 16, 32].contains(&bits_allocated) {
        return Err(bad(
            "BitsAllocated",
            format!("is {bits_allocated}, must be 8, 16 or 32"),
        ));
    }
    let bits_stored = uint(obj, &p, tags::BITS_STORED, "BitsStored")?.unwrap_or(bits_allocated);
    if bits_stored == 0 || bits_stored > bits_allocated {
        return Err(bad(
            "BitsStored",
            format!("is {bits_stored} with BitsAllocated {bits_allocated}"),
        ));
    }
    let signed = match uint(obj, &p, tags::PIXEL_REPRESENTATION, "PixelRepresentation")? {
        None | Some(0) => false,
        Some(1) => true,
        Some(v) => {
            return Err(bad(
                "PixelRepresentation",
                format!("is {v}, must be 0 or 1"),
            ))
        }
    };
    let ipp = floats(
        obj,
        &p,
        tags::IMAGE_POSITION_PATIENT,
        "ImagePositionPatient",
        3,
    )?;
    let iop = floats(
        obj,
        &p,
        tags::IMAGE_ORIENTATION_PATIENT,
        "ImageOrientationPatient",
        6,
    )?;
    let ps = floats(obj, &p, tags::PIXEL_SPACING, "PixelSpacing", 2)?;
    if ps.iter().any(|&v| v <= 0.0) {
        return Err(bad("PixelSpacing", format!("= {ps:?}: must be > 0 mm")));
    }
    let (r, c) = ([iop[0], iop[1], iop[2]], [iop[3], iop[4], iop[5]]);
    if (dot(r, r).sqrt() - 1.0).abs() > 1e-3
        || (dot(c, c).sqrt() - 1.0).abs() > 1e-3
        || dot(r, c).abs() > 1e-3
    {
        return Err(bad(
            "ImageOrientationPatient",
            format!("= {iop:?}: not two orthogonal unit vectors"),
        ));
    }
    let slope = match obj.element_opt(tags::RESCALE_SLOPE).ok().flatten() {
        None => 1.0,
        Some(e) => e
            .to_float64()
            .map_err(|_| bad("RescaleSlope", "is not numeric".into()))?,
    };
    let intercept = match obj.element_opt(tags::RESCALE_INTERCEPT).ok().flatten() {
        None => 0.0,
        Some(e) => e
            .to_float64()
            .map_err(|_| bad("RescaleIntercept", "is not numeric".into()))?,
    };
    if !(slope.is_finite() && slope != 0.0) {
        return Err(bad("RescaleSlope", format!("is {slope}")));
    }
    if !intercept.is_finite() {
        return Err(bad("RescaleIntercept", format!("is {intercept}")));
    }
    let n = |v: [f64; 3]| {
        let l = dot(v, v).sqrt();
        [v[0] / l, v[1] / l, v[2] / l]
    };
    let (r, c) = (n(r), n(c));
    Ok(SliceInfo {
        rows,
        cols,
        bits_allocated,
        bits_stored,
        signed,
        ipp: [ipp[0], ipp[1], ipp[2]],
        iop: [r[0], r[1], r[2], c[0], c[1], c[2]],
        spacing: [ps[0], ps[1]],
        slope,
        intercept,
    })
}

fn build_volume(dir: &Path, series_uid: String, slices: Vec<Slice>) -> Result<Volume, VolumeError> {
    let d = name_of(dir);
    let series_err = |msg: String| DicomError::Series {
        dir: d.clone(),
        msg,
    };
    let infos: Vec<SliceInfo> = slices.iter().map(slice_info).collect::<Result<_, _>>()?;
    if slices.len() < 2 {
        return Err(series_err(format!(
            "series {series_uid} has {} slice: a volume needs at least 2",
            slices.len()
        ))
        .into());
    }
    let first = &infos[0];
    let f0 = name_of(&slices[0].path);
    for (s, info) in slices.iter().zip(&infos).skip(1) {
        let p = name_of(&s.path);
        let differs = |tag: &str, a: String, b: String| {
            series_err(format!(
                "`{tag}` differs between slices: {f0} has {a}, {p} has {b}"
            ))
        };
        if info.rows != first.rows || info.cols != first.cols {
            return Err(differs(
                "Rows/Columns",
                format!("{}x{}", first.rows, first.cols),
                format!("{}x{}", info.rows, info.cols),
            )
            .into());
        }
        if (0..2)
            .any(|a| (info.spacing[a] - first.spacing[a]).abs() > 1e-4 * first.spacing[a].max(1.0))
        {
            return Err(differs(
                "PixelSpacing",
                format!("{:?}", first.spacing),
                format!("{:?}", info.spacing),
            )
            .into());
        }
        if (0..6).any(|a| (info.iop[a] - first.iop[a]).abs() > 1e-4) {
            return Err(differs(
                "ImageOrientationPatient",
                format!("{:?}", first.iop),
                format!("{:?}", info.iop),
            )
            .into());
        }
        if info.bits_allocated != first.bits_allocated {
            return Err(differs(
                "BitsAllocated",
                first.bits_allocated.to_string(),
                info.bits_allocated.to_string(),
            )
            .into());
        }
    }

    // Sort along the normal.
    let row = [first.iop[0], first.iop[1], first.iop[2]];
    let col = [first.iop[3], first.iop[4], first.iop[5]];
    let normal = cross(row, col);
    let mut order: Vec<usize> = (0..slices.len()).collect();
    let pos: Vec<f64> = infos.iter().map(|i| dot(i.ipp, normal)).collect();
    order.sort_by(|&a, &b| pos[a].total_cmp(&pos[b]));
    let steps: Vec<f64> = order.windows(2).map(|w| pos[w[1]] - pos[w[0]]).collect();
    let mut sorted_steps = steps.clone();
    sorted_steps.sort_by(|a, b| a.total_cmp(b));
    let median = sorted_steps[sorted_steps.len() / 2];
    let file = |k: usize| name_of(&slices[order[k]].path);
    for (k, &step) in steps.iter().enumerate() {
        if step < 1e-3 {
            return Err(series_err(format!(
                "`ImagePositionPatient`: {} and {} are at the same position ({:.3} mm along the normal)",
                file(k),
                file(k + 1),
                pos[order[k]]
            ))
            .into());
        }
    }
    if median <= 0.0 {
        return Err(series_err(
            "`ImagePositionPatient`: slices are not spaced along the normal".into(),
        )
        .into());
    }
    let tol = (0.01 * median).max(0.02);
    for (k, &step) in steps.iter().enumerate() {
        if (step - median).abs() > tol {
            let what = if step > 1.5 * median {
                "gap (missing slices?)"
            } else {
                "inconsistent slice spacing"
            };
            return Err(series_err(format!(
                "`ImagePositionPatient`: {what} between {} and {}: {step:.3} mm where the series steps {median:.3} mm",
                file(k),
                file(k + 1)
            ))
            .into());
        }
    }
    let nk = slices.len();
    let dz = (pos[order[nk - 1]] - pos[order[0]]) / (nk - 1) as f64;
    let origin = infos[order[0]].ipp;
    let in_plane_tol = 0.1 * first.spacing[0].min(first.spacing[1]);
    for (k, &idx) in order.iter().enumerate() {
        let expect = [0, 1, 2].map(|a| origin[a] + normal[a] * (pos[idx] - pos[order[0]]));
        let shift = [0, 1, 2].map(|a| infos[idx].ipp[a] - expect[a]);
        let off = dot(shift, shift).sqrt();
        if off > in_plane_tol {
            return Err(series_err(format!(
                "`ImagePositionPatient` of {} is shifted {off:.3} mm in-plane from the stack (gantry tilt is not supported)",
                file(k)
            ))
            .into());
        }
    }

    let (ni, nj) = (first.cols, first.rows);
    check_dims(dir, "Columns x Rows x slices", &[ni, nj, nk])?;
    // 2-3. pixel data, slice by slice, in parallel.
    // Each slice is decoded straight into its place in the volume.
    let mut voxels = vec![0.0f32; ni * nj * nk];
    voxels
        .par_chunks_mut(ni * nj)
        .zip(order.par_iter())
        .try_for_each(|(dst, &idx)| {
            let plane = read_pixels(&slices[idx], &infos[idx])?;
            dst.copy_from_slice(&plane);
            Ok::<(), DicomError>(())
        })?;
    let direction = [
        [row[0], col[0], normal[0]],
        [row[1], col[1], normal[1]],
        [row[2], col[2], normal[2]],
    ];
    let spacing = [first.spacing[1], first.spacing[0], dz];
    let ids = VolumeIds {
        path: dir.to_path_buf(),
        format: Format::Dicom,
        series_uid: Some(series_uid),
        study_uid: slices[0].study_uid.clone(),
        patient_id: slices[0].patient_id.clone(),
    };
    Volume::new([ni, nj, nk], voxels, spacing, origin, direction, ids)
}

/// Decodes one slice to HU (row-major, column index fastest).
fn read_pixels(slice: &Slice, info: &SliceInfo) -> Result<Vec<f32>, DicomError> {
    let p = name_of(&slice.path);
    let bytes_per = info.bits_allocated as usize / 8;
    let expected = info.rows * info.cols * bytes_per;
    let bytes = read_whole(&slice.file, &p)?;
    check_lengths(&p, &bytes)?;
    check_pixel_data_length(&p, &bytes)?;
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(&bytes[..])
        .map_err(|e| DicomError::Parse {
            path: p.clone(),
            msg: one_line(&e.to_string()),
        })?;
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        return Err(DicomError::Missing {
            path: p,
            tag: "PixelData",
        });
    }
    let decoded = obj.decode_pixel_data().map_err(|e| DicomError::Decode {
        path: p.clone(),
        msg: one_line(&e.to_string()),
    })?;
    let data = decoded.data();
    if data.len() < expected {
        return Err(DicomError::Decode {
            path: p,
            msg: format!(
                "{} bytes of pixel data, Rows x Columns needs {expected}",
                data.len()
            ),
        });
    }
    let data = &data[..expected];
    let stored = info.bits_stored;
    let (slope, intercept) = (info.slope, info.intercept);
    let value = |raw: u32| -> f64 {
        // Keep the stored bits; sign-extend them when PixelRepresentation is 1.
        let masked = if stored == 32 {
            raw
        } else {
            raw & ((1u32 << stored) - 1)
        };
        if info.signed {
            (((masked << (32 - stored)) as i32) >> (32 - stored)) as f64
        } else {
            masked as f64
        }
    };
    let out = match bytes_per {
        1 => data
            .iter()
            .map(|&b| (value(b as u32) * slope + intercept) as f32)
            .collect(),
        2 => data
            .chunks_exact(2)
            .map(|c| (value(u16::from_le_bytes([c[0], c[1]]) as u32) * slope + intercept) as f32)
            .collect(),
        _ => data
            .chunks_exact(4)
            .map(|c| {
                (value(u32::from_le_bytes([c[0], c[1], c[2], c[3]])) * slope + intercept) as f32
            })
            .collect(),
    };
    Ok(out)
}

/// Largest DICOM file read, bytes (one slice: 512 x 512 x 2 bytes is 0.5 MiB).
const MAX_FILE_BYTES: u64 = 256 << 20;

/// The whole file from its descriptor (from the start), at most [`MAX_FILE_BYTES`].
fn read_whole(f: &std::fs::File, p: &str) -> Result<Vec<u8>, DicomError> {
    let io = |err| DicomError::Io {
        path: p.to_string(),
        err,
    };
    let len = f.metadata().map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(DicomError::Parse {
            path: p.to_string(),
            msg: format!("{len} bytes is more than the {MAX_FILE_BYTES} read for one slice"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    let mut r = f;
    r.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
    r.take(MAX_FILE_BYTES).read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

/// Refuses a file in which an element declares more bytes than remain in the file, before
/// the parser would allocate that many (it reserves a declared length before reading it).
/// Walks the meta group and a dataset in explicit or implicit VR little endian, into
/// sequences and items; other transfer syntaxes (deflated, big endian) are left to the
/// parser. Every step advances at least 8 bytes.
fn check_lengths(p: &str, b: &[u8]) -> Result<(), DicomError> {
    const LONG: [&[u8; 2]; 13] = [
        b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR", b"SV", b"UV",
    ];
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut pos = 132;
    let mut explicit = true;
    while pos + 8 <= b.len() {
        let (group, elem) = (u16_at(pos), u16_at(pos + 2));
        let meta = group == 0x0002;
        let (header, len) = if group == 0xFFFE {
            (8, u32_at(pos + 4)) // item and delimiters: tag + length
        } else if explicit || meta {
            let vr: &[u8; 2] = b[pos + 4..pos + 6].try_into().expect("2 bytes");
            if LONG.contains(&vr) {
                if pos + 12 > b.len() {
                    break;
                }
                (12, u32_at(pos + 8))
            } else {
                (8, u16_at(pos + 6) as u32)
            }
        } else {
            (8, u32_at(pos + 4))
        };
        let remaining = b.len() - (pos + header).min(b.len());
        if len != 0xFFFF_FFFF && len as usize > remaining && (group, elem) == (0x7FE0, 0x0010) {
            return Err(DicomError::Bad {
                path: p.to_string(),
                tag: "PixelData",
                msg: format!(
                    "declares {len} bytes but only {remaining} remain in the file (truncated?)"
                ),
            });
        }
        if len != 0xFFFF_FFFF && len as usize > remaining {
            return Err(DicomError::Parse {
                path: p.to_string(),
                msg: format!(
                    "element ({group:04X},{elem:04X}) declares {len} bytes but only {remaining} remain in the file (truncated?)"
                ),
            });
        }
        if meta && elem == 0x0010 {
            let ts = String::from_utf8_lossy(&b[pos + header..pos + header + len as usize]);
            let ts = ts.trim_end_matches(['\0', ' ']);
            match ts {
                "1.2.840.10008.1.2" => explicit = false,
                "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.2" => return Ok(()),
                _ => {}
            }
        }
        let undefined = len == 0xFFFF_FFFF;
        let sq = (explicit || meta) && group != 0xFFFE && &b[pos + 4..pos + 6] == b"SQ";
        pos += header;
        if group == 0x7FE0 && elem == 0x0010 && undefined {
            // Encapsulated pixel data: fragments are items of raw bytes, skipped by length.
            while pos + 8 <= b.len() && u16_at(pos) == 0xFFFE && u16_at(pos + 2) == 0xE000 {
                let n = u32_at(pos + 4) as usize;
                if n > b.len() - (pos + 8) {
                    return Err(DicomError::Parse {
                        path: p.to_string(),
                        msg: format!(
                            "a Pixel Data fragment declares {n} bytes but only {} remain in the file (truncated?)",
                            b.len() - (pos + 8)
                        ),
                    });
                }
                pos += 8 + n;
            }
        } else if group == 0xFFFE || sq || (undefined && !explicit) {
            // Items and sequences are entered: their contents are elements.
        } else if undefined {
            // An undefined length on another VR (UN...): left to the parser.
            return Ok(());
        } else {
            pos += len as usize;
        }
    }
    Ok(())
}

/// Refuses a file whose (explicit VR) Pixel Data element declares more bytes than the file
/// holds, before the parser would allocate that many. Encapsulated (undefined length) data and
/// implicit VR files are left to the parser, whose allocations are then bounded by Rows x
/// Columns checks and the file size.
fn check_pixel_data_length(p: &str, bytes: &[u8]) -> Result<(), DicomError> {
    let at = bytes.windows(8).position(|w| {
        w[..4] == [0xE0, 0x7F, 0x10, 0x00] && (w[4..] == *b"OW\0\0" || w[4..] == *b"OB\0\0")
    });
    if let Some(at) = at {
        if let Some(len) = bytes.get(at + 8..at + 12) {
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let remaining = bytes.len() - (at + 12).min(bytes.len());
            if len != 0xFFFF_FFFF && len > remaining {
                return Err(DicomError::Bad {
                    path: p.to_string(),
                    tag: "PixelData",
                    msg: format!(
                        "declares {len} bytes but only {remaining} remain in the file (truncated?)"
                    ),
                });
            }
        }
    }
    Ok(())
}
