//! The daemon's DICOM glue, kept to two calls of the worker so it moves easily:
//! [`check_series`] (series checks and the result's input fields, before loading) and
//! [`write_sr`] (the job's SR beside its result JSON, queued for the PACS when one is set).

use super::job::{CheckedJob, JobError, JobResult};
use super::Shared;
use crate::dicom::sr::{self, SrInput};
use crate::dicom::{DicomSettings, SeriesInfo};
use crate::nodules::NoduleRequest;

/// For a job naming a DICOM series folder: reads its headers, runs the checks (an error
/// refuses the job), and adds description, thickness, spacing and warnings to `input`.
pub fn check_series(
    checked: &CheckedJob,
    settings: &DicomSettings,
    input: &mut serde_json::Value,
) -> Result<Option<SeriesInfo>, JobError> {
    if checked.input.get("kind").and_then(|k| k.as_str()) != Some("series") {
        return Ok(None);
    }
    let Some(NoduleRequest::Volume {
        path, series_uid, ..
    }) = checked.requests.first()
    else {
        return Ok(None);
    };
    let info = SeriesInfo::read(path, series_uid.as_deref())
        .map_err(|e| JobError::Processing(e.to_string()))?;
    let warnings = info
        .check(settings.min_slices)
        .map_err(|e| JobError::Processing(e.to_string()))?;
    if let (Some(dst), Some(src)) = (input.as_object_mut(), info.input_fields().as_object()) {
        dst.extend(src.clone());
        dst.insert("warnings".into(), serde_json::json!(warnings));
    }
    Ok(Some(info))
}

/// Writes `<result_id>.dcm` into the outbox for an ok result of a series job (and into the
/// PACS queue when `[dicom.pacs]` is set). Failures are logged: the JSON result still goes.
pub fn write_sr(shared: &Shared, result: &JobResult, series: Option<&SeriesInfo>) {
    let Some(series) = series else { return };
    if !shared.settings.dicom.write_sr || result.status != "ok" {
        return;
    }
    let input = SrInput {
        report: &result.report,
        series,
        result_id: &result.result_id,
        created: time::OffsetDateTime::now_utc(),
    };
    let path = shared
        .outbox
        .dir()
        .join(format!("{}.dcm", result.result_id));
    if path.exists() {
        return;
    }
    let written = sr::build(&input)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            super::outbox::write_atomic(&path, &bytes)
                .map_err(|e| format!("{}: {e}", path.display()))
        });
    match written {
        Ok(()) => {
            tracing::info!(result_id = %result.result_id, file = %path.display(), "SR written")
        }
        Err(e) => {
            tracing::error!(result_id = %result.result_id, error = %e, "could not write the SR")
        }
    }
}
