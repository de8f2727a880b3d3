//! The DICOM Structured Report of one job: a Comprehensive 3D SR
//! (1.2.840.10008.5.1.4.1.1.88.34) whose content follows TID 1500 (Measurement Report),
//! built as a dicom-rs in-memory object and written as Explicit VR Little Endian Part 10.
//!
//! Content tree (concept names; `DCM`/`SCT`/`UCUM` codes, `99NODULED` private codes):
//! ```text
//! CONTAINER (126000 DCM "Imaging Measurement Report")            TID 1500
//!  HAS CONCEPT MOD  CODE (121049 "Language of Content Item and Descendants") = en-US
//!  HAS OBS CONTEXT  CODE (121005 "Observer Type") = (121007 "Device")
//!  HAS OBS CONTEXT  UIDREF (121012 "Device Observer UID") = Device UID
//!  HAS OBS CONTEXT  TEXT (121013 "Device Observer Name") = "noduled"
//!  HAS OBS CONTEXT  TEXT (121014 "Device Observer Manufacturer") / (121015 "... Model Name")
//!  HAS CONCEPT MOD  CODE (121058 "Procedure reported") = (77477000 SCT "CT")
//!  CONTAINS CONTAINER (111028 "Image Library")
//!   CONTAINS CONTAINER (126200 "Image Library Group")
//!    CONTAINS IMAGE (one per source instance)
//!  CONTAINS CONTAINER (126010 "Imaging Measurements")
//!   CONTAINS CONTAINER (125007 "Measurement Group")   one per nodule (TID 1501)
//!    HAS OBS CONTEXT TEXT (112039 "Tracking Identifier") = nodule_id
//!    HAS OBS CONTEXT UIDREF (112040 "Tracking Unique Identifier")
//!    CONTAINS CODE (121071 "Finding") = (27925004 SCT "Nodule")
//!    HAS CONCEPT MOD CODE (363698007 SCT "Finding Site") = (39607008 SCT "Lung")
//!    CONTAINS SCOORD3D (111010 "Center") POINT x,y,z (LPS mm, the series' frame of reference)
//!    CONTAINS NUM (99NODULED "calibrated-score") in (1 UCUM "no units"), [0, 1]
//!    CONTAINS CODE (99NODULED <feature key>) = (99NODULED <class word>)   per descriptor
//!       (code values from [`short`]; meanings: the feature's report name, the class word)
//!     HAS PROPERTIES NUM (99NODULED "probability") in (1 UCUM), the class's probability
//!    CONTAINS TEXT (121106 "Comment") = the summary sentence (crate::report::summary)
//! ```
//! Header: Patient and General Study copied from the source series (same Study Instance
//! UID), a new SR series "noduled AI result - NOT FOR DIAGNOSTIC USE", VerificationFlag
//! UNVERIFIED, CompletionFlag COMPLETE, Current Requested Procedure Evidence listing the
//! source instances, and IHE AIR provenance: the Contributing Equipment Sequence
//! (Manufacturer, Manufacturer's Model Name = model id, Software Versions = noduled version
//! and model version, Device UID from model id and version) and the Enhanced General
//! Equipment attributes. SOP Instance and Series UIDs derive from the result id, so a result
//! written twice gives the same SR.

use super::series::SeriesInfo;
use super::uid;
use crate::report::{most_likely, ModelInfo, ScoreReport};
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::mem::InMemElement;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{InMemDicomObject, Tag};

/// Comprehensive 3D SR Storage.
pub const COMPREHENSIVE_3D_SR: &str = "1.2.840.10008.5.1.4.1.1.88.34";
/// The manufacturer written in the SR.
pub const MANUFACTURER: &str = "noduled project";
/// The private coding scheme of the score and descriptor codes.
pub const SCHEME: &str = "99NODULED";

/// Why an SR could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SrError {
    /// The source series lacks what the SR must copy.
    #[error("series {series_uid}: {msg}")]
    Source {
        /// SeriesInstanceUID.
        series_uid: String,
        /// What is missing.
        msg: String,
    },
    /// dicom-rs could not encode the object.
    #[error("SR encoding: {0}")]
    Encode(String),
}

/// A coded concept (value, scheme, meaning).
#[derive(Debug, Clone, Copy)]
struct Code<'a>(&'a str, &'a str, &'a str);

/// What one SR is made from.
#[derive(Debug, Clone, Copy)]
pub struct SrInput<'a> {
    /// The job's scores (each nodule's `source.coord_lps_mm` gives its location).
    pub report: &'a ScoreReport,
    /// The source series.
    pub series: &'a SeriesInfo,
    /// The result id (SR UIDs derive from it).
    pub result_id: &'a str,
    /// When the result was made.
    pub created: time::OffsetDateTime,
}

/// The Device UID of a model (IHE AIR): changes whenever the model id or version does.
pub fn device_uid(model: &ModelInfo) -> String {
    let v = model.version.map(|v| v.to_string()).unwrap_or_default();
    uid::derive(&["device", &model.id, &v])
}

/// The SR's SOP Instance UID for a result id.
pub fn sop_instance_uid(result_id: &str) -> String {
    uid::derive(&["sr", result_id])
}

/// Builds the SR as Part 10 bytes.
pub fn build(input: &SrInput) -> Result<Vec<u8>, SrError> {
    let s = input.series;
    let frame = s
        .frame_of_reference_uid
        .clone()
        .ok_or_else(|| SrError::Source {
            series_uid: s.series_uid.clone(),
            msg: "missing FrameOfReferenceUID (needed for the nodule locations)".into(),
        })?;
    if s.study.study_uid.is_empty() {
        return Err(SrError::Source {
            series_uid: s.series_uid.clone(),
            msg: "missing StudyInstanceUID".into(),
        });
    }
    let mut obj = header(input);
    obj.put(seq(tags::CONTENT_SEQUENCE, content(input, &frame)));
    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .map_err(|e| SrError::Encode(e.to_string()))?;
    let mut bytes = Vec::new();
    file.write_all(&mut bytes)
        .map_err(|e| SrError::Encode(e.to_string()))?;
    Ok(bytes)
}

fn header(input: &SrInput) -> InMemDicomObject {
    let (s, model) = (input.series, &input.report.model);
    let date = fmt(
        input.created,
        time::macros::format_description!("[year][month][day]"),
    );
    let tm = fmt(
        input.created,
        time::macros::format_description!("[hour][minute][second]"),
    );
    let versions = format!(
        "noduled {}\\model {}",
        env!("CARGO_PKG_VERSION"),
        model
            .version
            .map(|v| v.to_string())
            .unwrap_or_else(|| "unversioned".into())
    );
    let st = &s.study;
    let mut o = InMemDicomObject::from_element_iter([
        str_el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
        str_el(tags::INSTANCE_CREATION_DATE, VR::DA, &date),
        str_el(tags::INSTANCE_CREATION_TIME, VR::TM, &tm),
        str_el(tags::SOP_CLASS_UID, VR::UI, COMPREHENSIVE_3D_SR),
        str_el(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            &sop_instance_uid(input.result_id),
        ),
        str_el(tags::STUDY_DATE, VR::DA, &st.study_date),
        str_el(tags::CONTENT_DATE, VR::DA, &date),
        str_el(tags::STUDY_TIME, VR::TM, &st.study_time),
        str_el(tags::CONTENT_TIME, VR::TM, &tm),
        str_el(tags::ACCESSION_NUMBER, VR::SH, &st.accession_number),
        str_el(tags::MODALITY, VR::CS, "SR"),
        str_el(tags::MANUFACTURER, VR::LO, MANUFACTURER),
        str_el(
            tags::REFERRING_PHYSICIAN_NAME,
            VR::PN,
            &st.referring_physician,
        ),
        str_el(
            tags::SERIES_DESCRIPTION,
            VR::LO,
            "noduled AI result - NOT FOR DIAGNOSTIC USE",
        ),
        str_el(tags::MANUFACTURER_MODEL_NAME, VR::LO, &model.id),
        str_el(tags::PATIENT_NAME, VR::PN, &st.patient_name),
        str_el(tags::PATIENT_ID, VR::LO, &st.patient_id),
        str_el(tags::PATIENT_BIRTH_DATE, VR::DA, &st.patient_birth_date),
        str_el(tags::PATIENT_SEX, VR::CS, &st.patient_sex),
        str_el(tags::DEVICE_SERIAL_NUMBER, VR::LO, &device_uid(model)),
        str_el(tags::SOFTWARE_VERSIONS, VR::LO, &versions),
        str_el(tags::STUDY_INSTANCE_UID, VR::UI, &st.study_uid),
        str_el(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            &uid::derive(&["sr-series", input.result_id]),
        ),
        str_el(tags::STUDY_ID, VR::SH, &st.study_id),
        str_el(tags::SERIES_NUMBER, VR::IS, "9901"),
        str_el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        str_el(tags::VALUE_TYPE, VR::CS, "CONTAINER"),
        str_el(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"),
        str_el(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"),
        str_el(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"),
    ]);
    o.put(code_seq(
        tags::CONCEPT_NAME_CODE_SEQUENCE,
        Code("126000", "DCM", "Imaging Measurement Report"),
    ));
    o.put(seq(
        tags::CONTENT_TEMPLATE_SEQUENCE,
        vec![InMemDicomObject::from_element_iter([
            str_el(tags::MAPPING_RESOURCE, VR::CS, "DCMR"),
            str_el(tags::TEMPLATE_IDENTIFIER, VR::CS, "1500"),
        ])],
    ));
    o.put(seq(
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    ));
    o.put(seq(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]));
    o.put(seq(
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![evidence(s)],
    ));
    o.put(seq(
        tags::CONTRIBUTING_EQUIPMENT_SEQUENCE,
        vec![contributing(model, &versions, input.created)],
    ));
    o.put(seq(
        tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE,
        vec![InMemDicomObject::from_element_iter([
            str_el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, SCHEME),
            str_el(tags::CODING_SCHEME_NAME, VR::ST, "noduled model outputs"),
            str_el(
                tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
                VR::ST,
                MANUFACTURER,
            ),
        ])],
    ));
    o
}

fn contributing(model: &ModelInfo, versions: &str, at: time::OffsetDateTime) -> InMemDicomObject {
    let dt = fmt(
        at,
        time::macros::format_description!("[year][month][day][hour][minute][second]"),
    );
    let mut o = InMemDicomObject::from_element_iter([
        str_el(tags::MANUFACTURER, VR::LO, MANUFACTURER),
        str_el(tags::MANUFACTURER_MODEL_NAME, VR::LO, &model.id),
        str_el(tags::SOFTWARE_VERSIONS, VR::LO, versions),
        str_el(tags::DEVICE_UID, VR::UI, &device_uid(model)),
        str_el(tags::CONTRIBUTION_DATE_TIME, VR::DT, &dt),
        str_el(
            tags::CONTRIBUTION_DESCRIPTION,
            VR::ST,
            "AI nodule malignancy scoring (CLIP nodule model); model output, not for diagnostic use",
        ),
    ]);
    o.put(code_seq(
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        Code("109102", "DCM", "Processing Equipment"),
    ));
    o
}

/// A Referenced SOP Sequence item naming one source instance (class and instance UID).
fn sop_reference(i: &crate::dicom::series::Instance) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        str_el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, &i.sop_class_uid),
        str_el(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            &i.sop_instance_uid,
        ),
    ])
}

fn evidence(s: &SeriesInfo) -> InMemDicomObject {
    let sops: Vec<InMemDicomObject> = s.instances.iter().map(sop_reference).collect();
    let series = {
        let mut o = InMemDicomObject::from_element_iter([str_el(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            &s.series_uid,
        )]);
        o.put(seq(tags::REFERENCED_SOP_SEQUENCE, sops));
        o
    };
    let mut study = InMemDicomObject::from_element_iter([str_el(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        &s.study.study_uid,
    )]);
    study.put(seq(tags::REFERENCED_SERIES_SEQUENCE, vec![series]));
    study
}

fn content(input: &SrInput, frame: &str) -> Vec<InMemDicomObject> {
    let model = &input.report.model;
    let images: Vec<InMemDicomObject> = input
        .series
        .instances
        .iter()
        .map(|i| {
            let mut o = item("CONTAINS", "IMAGE", None);
            o.put(seq(tags::REFERENCED_SOP_SEQUENCE, vec![sop_reference(i)]));
            o
        })
        .collect();
    let group = container(
        "CONTAINS",
        Code("126200", "DCM", "Image Library Group"),
        images,
    );
    let groups: Vec<InMemDicomObject> = input
        .report
        .nodules
        .iter()
        .map(|n| nodule_group(input, n, frame))
        .collect();
    vec![
        code(
            "HAS CONCEPT MOD",
            Code("121049", "DCM", "Language of Content Item and Descendants"),
            Code("en-US", "RFC5646", "English (United States)"),
        ),
        code(
            "HAS OBS CONTEXT",
            Code("121005", "DCM", "Observer Type"),
            Code("121007", "DCM", "Device"),
        ),
        uidref(
            "HAS OBS CONTEXT",
            Code("121012", "DCM", "Device Observer UID"),
            &device_uid(model),
        ),
        text(
            "HAS OBS CONTEXT",
            Code("121013", "DCM", "Device Observer Name"),
            "noduled",
        ),
        text(
            "HAS OBS CONTEXT",
            Code("121014", "DCM", "Device Observer Manufacturer"),
            MANUFACTURER,
        ),
        text(
            "HAS OBS CONTEXT",
            Code("121015", "DCM", "Device Observer Model Name"),
            &model.id,
        ),
        code(
            "HAS CONCEPT MOD",
            Code("121058", "DCM", "Procedure reported"),
            Code("77477000", "SCT", "CT"),
        ),
        container(
            "CONTAINS",
            Code("111028", "DCM", "Image Library"),
            vec![group],
        ),
        container(
            "CONTAINS",
            Code("126010", "DCM", "Imaging Measurements"),
            groups,
        ),
    ]
}

fn nodule_group(input: &SrInput, n: &crate::report::NoduleReport, frame: &str) -> InMemDicomObject {
    let mut rows = vec![
        text(
            "HAS OBS CONTEXT",
            Code("112039", "DCM", "Tracking Identifier"),
            &n.nodule_id,
        ),
        uidref(
            "HAS OBS CONTEXT",
            Code("112040", "DCM", "Tracking Unique Identifier"),
            &uid::derive(&["nodule", input.result_id, &n.nodule_id]),
        ),
        code(
            "CONTAINS",
            Code("121071", "DCM", "Finding"),
            Code("27925004", "SCT", "Nodule"),
        ),
        code(
            "HAS CONCEPT MOD",
            Code("363698007", "SCT", "Finding Site"),
            Code("39607008", "SCT", "Lung"),
        ),
    ];
    if let Some(c) = coord(n) {
        let mut p = item(
            "CONTAINS",
            "SCOORD3D",
            Some(Code("111010", "DCM", "Center")),
        );
        p.put(str_el(tags::GRAPHIC_TYPE, VR::CS, "POINT"));
        p.put(DataElement::new(
            tags::GRAPHIC_DATA,
            VR::FL,
            PrimitiveValue::F32(c.iter().map(|v| *v as f32).collect()),
        ));
        p.put(str_el(
            tags::REFERENCED_FRAME_OF_REFERENCE_UID,
            VR::UI,
            frame,
        ));
        rows.push(p);
    }
    rows.push(num(
        "CONTAINS",
        Code("calibrated-score", SCHEME, "Calibrated malignancy score"),
        n.score.calibrated,
    ));
    for (feature, classes) in &n.descriptors {
        let Some((class, p)) = most_likely(classes) else {
            continue;
        };
        let meaning = crate::semantics::feature(feature)
            .map(|(_, f)| f.name.to_string())
            .unwrap_or_else(|| feature.replace('_', " "));
        let mut c = code(
            "CONTAINS",
            Code(&short(feature), SCHEME, &meaning),
            Code(&short(class), SCHEME, class),
        );
        c.put(seq(
            tags::CONTENT_SEQUENCE,
            vec![num(
                "HAS PROPERTIES",
                Code("probability", SCHEME, "Probability"),
                p,
            )],
        ));
        rows.push(c);
    }
    rows.push(text(
        "CONTAINS",
        Code("121106", "DCM", "Comment"),
        &n.summary,
    ));
    container("CONTAINS", Code("125007", "DCM", "Measurement Group"), rows)
}

/// The nodule's LPS coordinate, from its source record.
fn coord(n: &crate::report::NoduleReport) -> Option<[f64; 3]> {
    let v = n.source.get("coord_lps_mm")?.as_array()?;
    let c: Vec<f64> = v.iter().filter_map(|x| x.as_f64()).collect();
    c.try_into().ok()
}

/// A code value (SH, at most 16 characters) from a word: other characters than ASCII
/// letters, digits and `-` become `-`; a longer word keeps 11 characters, `-`, and 4 hex
/// digits of its SHA-256, so distinct words keep distinct codes.
pub fn short(word: &str) -> String {
    use sha2::Digest;
    let clean: String = word
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.len() <= 16 {
        return clean;
    }
    let h = sha2::Sha256::digest(word.as_bytes());
    format!("{}-{}", &clean[..11], hex::encode(&h[..2]))
}

fn fmt(t: time::OffsetDateTime, f: &[time::format_description::FormatItem<'_>]) -> String {
    t.format(f).unwrap_or_default()
}

fn str_el(tag: Tag, vr: VR, v: &str) -> InMemElement {
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> InMemElement {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn code_seq(tag: Tag, c: Code) -> InMemElement {
    seq(
        tag,
        vec![InMemDicomObject::from_element_iter([
            str_el(tags::CODE_VALUE, VR::SH, c.0),
            str_el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, c.1),
            str_el(tags::CODE_MEANING, VR::LO, c.2),
        ])],
    )
}

fn item(rel: &str, value_type: &str, concept: Option<Code>) -> InMemDicomObject {
    let mut o = InMemDicomObject::from_element_iter([
        str_el(tags::RELATIONSHIP_TYPE, VR::CS, rel),
        str_el(tags::VALUE_TYPE, VR::CS, value_type),
    ]);
    if let Some(c) = concept {
        o.put(code_seq(tags::CONCEPT_NAME_CODE_SEQUENCE, c));
    }
    o
}

fn container(rel: &str, concept: Code, children: Vec<InMemDicomObject>) -> InMemDicomObject {
    let mut o = item(rel, "CONTAINER", Some(concept));
    o.put(str_el(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    if !children.is_empty() {
        o.put(seq(tags::CONTENT_SEQUENCE, children));
    }
    o
}

fn text(rel: &str, concept: Code, v: &str) -> InMemDicomObject {
    let mut o = item(rel, "TEXT", Some(concept));
    o.put(str_el(tags::TEXT_VALUE, VR::UT, v));
    o
}

fn uidref(rel: &str, concept: Code, v: &str) -> InMemDicomObject {
    let mut o = item(rel, "UIDREF", Some(concept));
    o.put(str_el(tags::UID, VR::UI, v));
    o
}

fn code(rel: &str, concept: Code, value: Code) -> InMemDicomObject {
    let mut o = item(rel, "CODE", Some(concept));
    o.put(code_seq(tags::CONCEPT_CODE_SEQUENCE, value));
    o
}

fn num(rel: &str, concept: Code, v: f64) -> InMemDicomObject {
    let mut o = item(rel, "NUM", Some(concept));
    let mut mv = InMemDicomObject::from_element_iter([str_el(
        tags::NUMERIC_VALUE,
        VR::DS,
        &format!("{v:.6}"),
    )]);
    mv.put(code_seq(
        tags::MEASUREMENT_UNITS_CODE_SEQUENCE,
        Code("1", "UCUM", "no units"),
    ));
    o.put(seq(tags::MEASURED_VALUE_SEQUENCE, vec![mv]));
    o
}
