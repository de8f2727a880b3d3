//! What the SR and the series checks need to know about a DICOM series folder: its
//! identifiers (patient, study, series, frame of reference), each instance's SOP class and
//! instance UID, and the acquisition facts (modality, ImageType, slice thickness, spacing,
//! description). Headers only (read up to Pixel Data); the voxels are `crate::volume`'s job.
//!
//! Checks before scoring ([`SeriesInfo::check`]): Modality `CT` on every instance, no
//! localizer (ImageType containing `LOCALIZER`), at least `min_slices` instances; a slice
//! spacing over [`THIN_SLICE_MM`] is a warning (the published model was trained on
//! thin-slice screening CT). The spacing is the median step between ImagePositionPatient
//! values projected on the slice normal (mm).

use super::uid;
use crate::confine::Opener;
use crate::volume::dicom::{header_in, DicomError};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, Tag};
use std::path::Path;

/// Slice spacing (mm) above which a result carries a warning.
pub const THIN_SLICE_MM: f64 = 2.5;

/// Why a series cannot be described or scored. Messages start with the folder or file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeriesError {
    /// The folder could not be listed or a file opened.
    #[error("{path}: {err}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// A file could not be parsed, or a required attribute is missing or malformed.
    #[error("{path}: {msg}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong (names the attribute).
        msg: String,
    },
    /// A member could not be opened beneath the data roots or parsed (names the file).
    #[error(transparent)]
    Read(#[from] DicomError),
    /// No instance of the series asked for (or none at all) in the folder.
    #[error("{dir}: no DICOM instances of series {uid}")]
    NotFound {
        /// The folder.
        dir: String,
        /// The series asked for, or "any".
        uid: String,
    },
    /// A check before scoring refused the series.
    #[error("series {uid}: {msg}")]
    Refused {
        /// SeriesInstanceUID.
        uid: String,
        /// Which check, with the values.
        msg: String,
    },
}

/// One instance of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// SOPClassUID.
    pub sop_class_uid: String,
    /// SOPInstanceUID.
    pub sop_instance_uid: String,
    /// ImagePositionPatient (LPS mm), when present.
    pub position: Option<[f64; 3]>,
    /// Modality.
    pub modality: String,
    /// ImageType values.
    pub image_type: Vec<String>,
}

/// Patient and study attributes copied into a derived object (empty when absent).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StudyIds {
    /// PatientName.
    pub patient_name: String,
    /// PatientID.
    pub patient_id: String,
    /// PatientBirthDate.
    pub patient_birth_date: String,
    /// PatientSex.
    pub patient_sex: String,
    /// StudyInstanceUID.
    pub study_uid: String,
    /// StudyDate.
    pub study_date: String,
    /// StudyTime.
    pub study_time: String,
    /// StudyID.
    pub study_id: String,
    /// AccessionNumber.
    pub accession_number: String,
    /// ReferringPhysicianName.
    pub referring_physician: String,
}

/// A series as the SR and the checks see it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesInfo {
    /// SeriesInstanceUID.
    pub series_uid: String,
    /// FrameOfReferenceUID (the SCOORD3D's frame), when present.
    pub frame_of_reference_uid: Option<String>,
    /// Patient and study.
    pub study: StudyIds,
    /// SeriesDescription.
    pub description: Option<String>,
    /// SliceThickness (mm).
    pub slice_thickness_mm: Option<f64>,
    /// PixelSpacing (row, column; mm).
    pub pixel_spacing_mm: Option<[f64; 2]>,
    /// Median step between slice positions along the normal (mm).
    pub slice_spacing_mm: Option<f64>,
    /// The instances, sorted by position along the normal (else by SOP Instance UID).
    pub instances: Vec<Instance>,
}

impl SeriesInfo {
    /// Reads the headers of the folder's DICOM files (not recursing, hidden files and
    /// non-Part-10 files skipped) and describes series `series_uid` (or the only series).
    pub fn read(dir: &Path, series_uid: Option<&str>) -> Result<SeriesInfo, SeriesError> {
        Self::read_in(&Opener::unconfined(), dir, series_uid)
    }

    /// [`SeriesInfo::read`] through `opener`: the folder and each member opened beneath the
    /// data roots (like the volume reader, [`crate::volume::dicom::header_in`]).
    pub fn read_in(
        opener: &Opener,
        dir: &Path,
        series_uid: Option<&str>,
    ) -> Result<SeriesInfo, SeriesError> {
        let opened = opener.open_dir(dir).map_err(|err| SeriesError::Io {
            path: dir.display().to_string(),
            err,
        })?;
        let mut names = opened.file_names().map_err(|err| SeriesError::Io {
            path: dir.display().to_string(),
            err,
        })?;
        names.retain(|n| !n.to_string_lossy().starts_with('.'));
        names.sort();
        let mut first: Option<DefaultDicomObject> = None;
        let mut instances = Vec::new();
        let mut chosen: Option<String> = series_uid.map(str::to_string);
        for name in names {
            let path = dir.join(&name);
            let Some((_, obj)) = header_in(&opened, &name)? else {
                continue;
            };
            let p = path.display().to_string();
            let uid = required(&obj, &p, tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?;
            match &chosen {
                Some(c) if *c != uid => continue,
                None => chosen = Some(uid.clone()),
                _ => {}
            }
            instances.push(instance(&obj, &p)?);
            if first.is_none() {
                first = Some(obj);
            }
        }
        let (Some(obj), Some(series_uid)) = (first, chosen.clone()) else {
            return Err(SeriesError::NotFound {
                dir: dir.display().to_string(),
                uid: chosen.unwrap_or_else(|| "any".into()),
            });
        };
        Ok(describe(&obj, series_uid, instances))
    }

    /// The checks before scoring; returns the warnings (one line each).
    pub fn check(&self, min_slices: usize) -> Result<Vec<String>, SeriesError> {
        let refuse = |msg: String| SeriesError::Refused {
            uid: self.series_uid.clone(),
            msg,
        };
        if let Some(i) = self.instances.iter().find(|i| i.modality != "CT") {
            return Err(refuse(format!(
                "Modality `{}` (instance {}): only CT is scored",
                i.modality, i.sop_instance_uid
            )));
        }
        if let Some(i) = self
            .instances
            .iter()
            .find(|i| i.image_type.iter().any(|t| t == "LOCALIZER"))
        {
            return Err(refuse(format!(
                "ImageType LOCALIZER (instance {}): a localizer/scout is not a CT volume",
                i.sop_instance_uid
            )));
        }
        if self.instances.len() < min_slices {
            return Err(refuse(format!(
                "{} slice(s), fewer than dicom.min_slices = {min_slices}",
                self.instances.len()
            )));
        }
        let mut warnings = Vec::new();
        if let Some(s) = self.slice_spacing_mm.filter(|s| *s > THIN_SLICE_MM) {
            warnings.push(format!(
                "slice spacing {s:.2} mm is over {THIN_SLICE_MM} mm: the model was trained on thin-slice screening CT"
            ));
        }
        Ok(warnings)
    }

    /// The result's input fields (series description, thickness, spacing, slices).
    pub fn input_fields(&self) -> serde_json::Value {
        serde_json::json!({
            "series_uid": self.series_uid,
            "study_uid": self.study.study_uid,
            "series_description": self.description,
            "slice_thickness_mm": self.slice_thickness_mm,
            "slice_spacing_mm": self.slice_spacing_mm,
            "pixel_spacing_mm": self.pixel_spacing_mm,
            "slices": self.instances.len(),
        })
    }
}

fn instance(obj: &DefaultDicomObject, p: &str) -> Result<Instance, SeriesError> {
    let uid_of = |tag, name| -> Result<String, SeriesError> {
        let v = required(obj, p, tag, name)?;
        uid::check(&v).map_err(|e| SeriesError::Bad {
            path: p.to_string(),
            msg: format!("{name}: {e}"),
        })?;
        Ok(v)
    };
    Ok(Instance {
        sop_class_uid: uid_of(tags::SOP_CLASS_UID, "SOPClassUID")?,
        sop_instance_uid: uid_of(tags::SOP_INSTANCE_UID, "SOPInstanceUID")?,
        position: floats(obj, tags::IMAGE_POSITION_PATIENT).and_then(|v| v.try_into().ok()),
        modality: text(obj, tags::MODALITY).unwrap_or_default(),
        image_type: text(obj, tags::IMAGE_TYPE)
            .map(|s| {
                s.split('\\')
                    .map(|t| t.trim().to_ascii_uppercase())
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn describe(
    obj: &DefaultDicomObject,
    series_uid: String,
    mut instances: Vec<Instance>,
) -> SeriesInfo {
    let t = |tag| text(obj, tag).unwrap_or_default();
    let orientation = floats(obj, tags::IMAGE_ORIENTATION_PATIENT).filter(|v| v.len() == 6);
    let normal = orientation.map(|o| {
        [
            o[1] * o[5] - o[2] * o[4],
            o[2] * o[3] - o[0] * o[5],
            o[0] * o[4] - o[1] * o[3],
        ]
    });
    let along = |i: &Instance| -> Option<f64> {
        let (n, p) = (normal?, i.position?);
        Some(n[0] * p[0] + n[1] * p[1] + n[2] * p[2])
    };
    instances.sort_by(|a, b| {
        along(a)
            .partial_cmp(&along(b))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.sop_instance_uid.cmp(&b.sop_instance_uid))
    });
    let mut steps: Vec<f64> = instances
        .windows(2)
        .filter_map(|w| Some((along(&w[1])? - along(&w[0])?).abs()))
        .collect();
    steps.sort_by(|a, b| a.total_cmp(b));
    SeriesInfo {
        series_uid,
        frame_of_reference_uid: text(obj, tags::FRAME_OF_REFERENCE_UID),
        study: StudyIds {
            patient_name: t(tags::PATIENT_NAME),
            patient_id: t(tags::PATIENT_ID),
            patient_birth_date: t(tags::PATIENT_BIRTH_DATE),
            patient_sex: t(tags::PATIENT_SEX),
            study_uid: t(tags::STUDY_INSTANCE_UID),
            study_date: t(tags::STUDY_DATE),
            study_time: t(tags::STUDY_TIME),
            study_id: t(tags::STUDY_ID),
            accession_number: t(tags::ACCESSION_NUMBER),
            referring_physician: t(tags::REFERRING_PHYSICIAN_NAME),
        },
        description: text(obj, tags::SERIES_DESCRIPTION),
        slice_thickness_mm: floats(obj, tags::SLICE_THICKNESS).and_then(|v| v.first().copied()),
        pixel_spacing_mm: floats(obj, tags::PIXEL_SPACING).and_then(|v| v.try_into().ok()),
        slice_spacing_mm: steps
            .get(steps.len() / 2)
            .copied()
            .filter(|_| !steps.is_empty()),
        instances,
    }
}

fn required(
    obj: &DefaultDicomObject,
    p: &str,
    tag: Tag,
    name: &str,
) -> Result<String, SeriesError> {
    text(obj, tag).ok_or_else(|| SeriesError::Bad {
        path: p.to_string(),
        msg: format!("missing required attribute `{name}`"),
    })
}

/// An attribute as trimmed text; None when absent or empty.
pub fn text(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok().flatten()?;
    let s = e.to_str().ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    (!s.is_empty()).then(|| s.to_string())
}

fn floats(obj: &DefaultDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let v = obj
        .element_opt(tag)
        .ok()
        .flatten()?
        .to_multi_float64()
        .ok()?;
    (!v.is_empty() && v.iter().all(|x| x.is_finite())).then_some(v)
}
