//! Jobs: the JSON a scanner drops in the inbox or publishes on the job topic, checked and
//! turned into [`NoduleRequest`]s, and the result JSON written for each job.
//!
//! A job names one study's nodules (coordinates are LPS world millimetres):
//! ```json
//! {"job_id": "J1", "patient_id": "P1",
//!  "series": {"path": "/srv/ct/P1/series1", "series_uid": "1.2..."},   // a DICOM folder, or
//!  "series": {"uid": "1.2..."},          // a series received over DICOM (waits until stable), or
//!  "volume": "/srv/ct/P1.nii.gz",                                      // a NIfTI / NRRD file
//!  "nodules": [{"nodule_id": "n1", "coord_lps_mm": [-21.9, -120.5, -611.5]}]}
//! ```
//! or one crop (100^3 HU at 1 mm, axes z,y,x) with `"crop": {"path": "n1.npy"}` (relative
//! names resolve in the inbox: a crop file with its job JSON as sidecar) or
//! `"crop": {"base64": "...", "format": "npy"}`, and one nodule without a coordinate;
//! or, per nodule, `"planes": "/path/planes.safetensors"` (nine planes already made).
//! Unknown fields are an error. Every path must lie under a configured data root.
//!
//! `result_id` is a UUIDv5 of (the job's content hash, model id, model version, status): a
//! job run again after a crash, redelivered, or a result published twice carries the same
//! id (subscribers de-duplicate on it), while a different job that reuses a `job_id` gets
//! another (and `job_id_reused: true`). A job too large to read is keyed by its file name
//! and size instead.

use crate::nodules::NoduleRequest;
use crate::report::{ModelInfo, ScoreReport};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Namespace of result ids (a fixed random UUID: ids are UUIDv5 under it).
pub const RESULT_NAMESPACE: uuid::Uuid = uuid::uuid!("6f1c2b1e-4a8e-4f59-9d3c-2d1b7c5e8a10");

/// Why a job was refused or failed. Messages start with the field or file they concern.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The job file or payload is larger than `jobs.max_job_bytes`.
    #[error("{what}: {bytes} bytes is more than jobs.max_job_bytes = {max}")]
    TooLarge {
        /// File or payload.
        what: String,
        /// Its size.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The job file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid job JSON (syntax, missing or unknown fields).
    #[error("job JSON: {0}")]
    Json(String),
    /// A field has a value the daemon cannot use.
    #[error("job field `{field}`: {msg}")]
    Field {
        /// The field, dotted.
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// Reading or preprocessing the job's CT (or crop, or planes) failed.
    #[error("{0:#}")]
    Load(anyhow::Error),
    /// The model failed on a nodule.
    #[error("nodule {nodule_id}: {source:#}")]
    Score {
        /// The nodule.
        nodule_id: String,
        /// Why.
        source: anyhow::Error,
    },
    /// The model panicked.
    #[error("the model panicked on this job")]
    Panicked,
    /// An inline crop could not be written to the spool.
    #[error("{path}: {source}")]
    Spool {
        /// The spool file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The job did not finish within `jobs.timeout_secs`.
    #[error("not finished after jobs.timeout_secs = {secs} (an input read or the scoring hung); abandoned")]
    TimedOut {
        /// The deadline.
        secs: u64,
    },
    /// Earlier attempts crashed, aborted or hung the daemon.
    #[error("{attempts} attempts did not finish (crash, abort or hang) with jobs.max_attempts = {max}; not run again")]
    Abandoned {
        /// Attempts started.
        attempts: u32,
        /// The limit.
        max: u32,
    },
}

/// One job as written by its sender.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDoc {
    /// The sender's id for the job.
    pub job_id: String,
    /// Patient the nodules belong to (also the result topic's last level).
    pub patient_id: String,
    /// A DICOM series folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<SeriesRef>,
    /// A volume file (.nii, .nii.gz, .nrrd, .nhdr).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<PathBuf>,
    /// A 100^3 crop around one nodule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<CropRef>,
    /// The nodules.
    #[serde(default)]
    pub nodules: Vec<NoduleDoc>,
}

/// `series`: a DICOM folder (`path`, with `series_uid` when it holds several), or a series
/// received by the DICOM receiver (`uid`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesRef {
    /// The DICOM folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Which series when the folder holds several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series_uid: Option<String>,
    /// SeriesInstanceUID of a received series (the job waits until it is stable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// `crop`: a file, or the file's bytes inline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropRef {
    /// The crop file (.npy or .pt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The crop file's bytes, base64 (standard alphabet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base64: Option<String>,
    /// Format of inline bytes: "npy" (default) or "pt".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// One nodule of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoduleDoc {
    /// The sender's nodule id.
    pub nodule_id: String,
    /// World coordinate, LPS, millimetres (series and volume jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coord_lps_mm: Option<[f64; 3]>,
    /// A planes file (safetensors, tensor `planes01` [9,224,224]) instead of a CT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planes: Option<PathBuf>,
}

/// Where job paths may point.
#[derive(Debug, Clone)]
pub struct PathPolicy {
    /// Allowed roots, canonical.
    pub roots: Vec<PathBuf>,
    /// Folder relative crop names resolve in (the inbox), when any.
    pub relative_base: Option<PathBuf>,
    /// Folder inline crops are written to (canonical).
    pub spool: PathBuf,
    /// Opens the job's files beneath the roots (see [`crate::confine`]).
    pub opener: std::sync::Arc<crate::confine::Opener>,
    /// File stem of the job's own spool files (its job file's stem): the only spool files it
    /// may name. Set per job by [`PathPolicy::for_job`].
    pub own_spool: Option<String>,
}

/// A checked job, ready to load.
#[derive(Debug, Clone)]
pub struct CheckedJob {
    /// The document.
    pub doc: JobDoc,
    /// The requests to load, in nodule order.
    pub requests: Vec<NoduleRequest>,
    /// Identifiers of the input for the result's `input` field.
    pub input: serde_json::Value,
}

/// Parses job JSON (strict) without touching the filesystem.
pub fn parse(bytes: &[u8]) -> Result<JobDoc, JobError> {
    let doc: JobDoc = serde_json::from_slice(bytes).map_err(|e| JobError::Json(e.to_string()))?;
    if doc.job_id.trim().is_empty() {
        return Err(field("job_id", "must not be empty"));
    }
    if doc.patient_id.trim().is_empty() {
        return Err(field("patient_id", "must not be empty"));
    }
    Ok(doc)
}

fn field(name: &str, msg: impl Into<String>) -> JobError {
    JobError::Field {
        field: name.to_string(),
        msg: msg.into(),
    }
}

impl PathPolicy {
    /// This policy for the job in file `job_file` (its spool files are `<stem>.*`).
    pub fn for_job(&self, job_file: &str) -> PathPolicy {
        let stem = job_file.strip_suffix(".json").unwrap_or(job_file);
        PathPolicy {
            own_spool: Some(file_safe(stem)),
            ..self.clone()
        }
    }

    /// Where this job's spool file in `format` (`npy` or `pt`) lives: `<own stem>.<format>`
    /// (`key` names it when the policy is not a job's own).
    fn spool_path(&self, key: &str, format: &str) -> PathBuf {
        let stem = self.own_spool.clone().unwrap_or_else(|| file_safe(key));
        self.spool.join(format!("{stem}.{format}"))
    }

    /// The spool files a job may own (its decoded inline crop, its binary MQTT crop), from
    /// its file name alone, so they can be deleted whatever became of the job: done, failed
    /// before or after parsing, timed out, abandoned. Empty for a policy not a job's own.
    pub fn own_spool_files(&self) -> Vec<PathBuf> {
        if self.own_spool.is_none() {
            return Vec::new();
        }
        ["npy", "pt"]
            .iter()
            .map(|f| self.spool_path("", f))
            .collect()
    }

    /// Resolves `p` (relative only when a base is set) lexically (`.`, `..`) and checks that
    /// it lies under a root, without touching the filesystem: links are resolved when the
    /// file is opened, beneath its root, by [`Self::opener`]. A spool file must be the job's
    /// own. Refusals say "outside data_roots" and nothing about the target.
    pub fn check(&self, field_name: &str, p: &Path) -> Result<PathBuf, JobError> {
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else if let Some(base) = &self.relative_base {
            base.join(p)
        } else {
            return Err(field(
                field_name,
                format!("{}: must be an absolute path", p.display()),
            ));
        };
        let outside = || {
            field(
                field_name,
                format!("{}: {}", p.display(), crate::confine::OUTSIDE),
            )
        };
        let norm = crate::confine::normalize(&joined).ok_or_else(outside)?;
        if norm.starts_with(&self.spool) {
            let own = self.own_spool.as_deref().unwrap_or("");
            let stem = norm.file_stem().map(|s| s.to_string_lossy().into_owned());
            let in_spool = norm.parent() == Some(self.spool.as_path());
            if own.is_empty() || !in_spool || stem.as_deref() != Some(own) {
                return Err(outside());
            }
            return Ok(norm);
        }
        if self.roots.iter().any(|r| norm.starts_with(r)) {
            Ok(norm)
        } else {
            Err(outside())
        }
    }
}

/// Checks a parsed job against the limits and the path policy and builds its requests.
/// Inline crops are decoded into `policy.spool` under `key`.
pub fn check(
    doc: JobDoc,
    key: &str,
    policy: &PathPolicy,
    max_nodules: usize,
) -> Result<CheckedJob, JobError> {
    if doc.nodules.is_empty() {
        return Err(field("nodules", "must name at least one nodule"));
    }
    if doc.nodules.len() > max_nodules {
        return Err(field(
            "nodules",
            format!(
                "{} nodules is more than jobs.max_nodules = {max_nodules}",
                doc.nodules.len()
            ),
        ));
    }
    let sources = [
        doc.series.is_some(),
        doc.volume.is_some(),
        doc.crop.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    let with_planes = doc.nodules.iter().filter(|n| n.planes.is_some()).count();
    if sources > 1 || (sources == 1 && with_planes > 0) {
        return Err(field(
            "series",
            "give exactly one of `series`, `volume`, `crop`, or `planes` per nodule",
        ));
    }
    let pid = doc.patient_id.clone();
    let (requests, input) = if let Some(series) = &doc.series {
        let Some(p) = &series.path else {
            return Err(field(
                "series",
                "give `path` (a DICOM folder) or `uid` (a received series)",
            ));
        };
        let path = policy.check("series.path", p)?;
        let nodules = coords(&doc)?;
        let input =
            serde_json::json!({"kind": "series", "path": path, "series_uid": series.series_uid});
        (
            vec![NoduleRequest::Volume {
                path,
                series_uid: series.series_uid.clone(),
                patient_id: Some(pid),
                nodules,
            }],
            input,
        )
    } else if let Some(volume) = &doc.volume {
        let path = policy.check("volume", volume)?;
        let nodules = coords(&doc)?;
        let input = serde_json::json!({"kind": "volume", "path": path});
        (
            vec![NoduleRequest::Volume {
                path,
                series_uid: None,
                patient_id: Some(pid),
                nodules,
            }],
            input,
        )
    } else if let Some(crop) = &doc.crop {
        crop_request(&doc, crop, key, policy)?
    } else {
        planes_requests(&doc, policy)?
    };
    Ok(CheckedJob {
        doc,
        requests,
        input,
    })
}

/// The request of a crop job (one nodule): a crop file, or an inline crop decoded into
/// the job's spool file.
fn crop_request(
    doc: &JobDoc,
    crop: &CropRef,
    key: &str,
    policy: &PathPolicy,
) -> Result<(Vec<NoduleRequest>, serde_json::Value), JobError> {
    if doc.nodules.len() != 1 {
        return Err(field("nodules", "a crop job names exactly one nodule"));
    }
    let path = match (&crop.path, &crop.base64) {
        // A spool path (a binary MQTT crop) must be the job's own (see `check`).
        (Some(p), None) => policy.check("crop.path", p)?,
        (None, Some(b64)) => {
            let format = crop.format.as_deref().unwrap_or("npy");
            if !matches!(format, "npy" | "pt") {
                return Err(field(
                    "crop.format",
                    format!("`{format}`: expected npy or pt"),
                ));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| field("crop.base64", e.to_string()))?;
            let path = policy.spool_path(key, format);
            super::outbox::write_atomic(&path, &bytes).map_err(|source| JobError::Spool {
                path: path.display().to_string(),
                source,
            })?;
            path
        }
        _ => return Err(field("crop", "give `path` or `base64`")),
    };
    let input = serde_json::json!({"kind": "crop", "path": path});
    let request = NoduleRequest::Crop {
        path,
        patient_id: doc.patient_id.clone(),
        nodule_id: doc.nodules[0].nodule_id.clone(),
    };
    Ok((vec![request], input))
}

/// The requests of a job whose nodules each name a planes file.
fn planes_requests(
    doc: &JobDoc,
    policy: &PathPolicy,
) -> Result<(Vec<NoduleRequest>, serde_json::Value), JobError> {
    let mut requests = Vec::new();
    for (i, n) in doc.nodules.iter().enumerate() {
        let Some(p) = &n.planes else {
            return Err(field(
                "series",
                "give one of `series`, `volume`, `crop`, or `planes` per nodule",
            ));
        };
        let path = policy.check(&format!("nodules[{i}].planes"), p)?;
        requests.push(NoduleRequest::Planes {
            path,
            patient_id: doc.patient_id.clone(),
            nodule_id: n.nodule_id.clone(),
        });
    }
    Ok((requests, serde_json::json!({"kind": "planes"})))
}

fn coords(doc: &JobDoc) -> Result<Vec<(String, [f64; 3])>, JobError> {
    doc.nodules
        .iter()
        .enumerate()
        .map(|(i, n)| match n.coord_lps_mm {
            Some(c) if c.iter().all(|v| v.is_finite()) => Ok((n.nodule_id.clone(), c)),
            Some(_) => Err(field(
                &format!("nodules[{i}].coord_lps_mm"),
                "must be three finite numbers",
            )),
            None => Err(field(
                &format!("nodules[{i}].coord_lps_mm"),
                "missing (LPS world millimetres)",
            )),
        })
        .collect()
}

/// A name safe for files and topic levels: keeps `[A-Za-z0-9._-]`, replaces the rest by `_`,
/// at most 100 characters.
pub fn file_safe(s: &str) -> String {
    let out: String = s
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with('.') {
        format!("_{out}")
    } else {
        out
    }
}

/// The content key of a job: SHA-256 of its bytes, hex.
pub fn content_key(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The stable id of a job's result, from the job's content key (see the module doc).
pub fn result_id(key: &str, model: &ModelInfo, ok: bool) -> String {
    let name = format!(
        "{key}\n{}\n{}\n{}",
        model.id,
        model.version.map(|v| v.to_string()).unwrap_or_default(),
        if ok { "ok" } else { "error" }
    );
    uuid::Uuid::new_v5(&RESULT_NAMESPACE, name.as_bytes()).to_string()
}

/// Time spent on a job, milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    /// From the job being noticed to the worker taking it.
    pub queued_ms: f64,
    /// Reading the CT and making the planes.
    pub load_ms: f64,
    /// Model forward passes.
    pub score_ms: f64,
    /// From the worker taking the job to the result written.
    pub total_ms: f64,
}

/// An alert: the nodules whose calibrated score reached the threshold.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Alert {
    /// The configured threshold.
    pub threshold: f64,
    /// (nodule id, calibrated score) of each nodule at or above it.
    pub nodules: Vec<AlertNodule>,
}

/// One alerting nodule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AlertNodule {
    /// Nodule id.
    pub nodule_id: String,
    /// Its fold-mean calibrated score.
    pub calibrated: f64,
}

/// The result JSON of one job: the score JSON plus the job's identity, timings and input.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    /// Stable id (see the module doc).
    pub result_id: String,
    /// The job's id (absent when the job JSON could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The patient (absent when unreadable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_id: Option<String>,
    /// "ok" or "error".
    pub status: String,
    /// True when this job_id named a job with other content before (a rescan, a counter
    /// reset): this result is not a duplicate of the earlier one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub job_id_reused: bool,
    /// The one-line error when `status` is "error".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The score JSON (`model`, `nodules`, `patients`); empty nodules on error.
    #[serde(flatten)]
    pub report: ScoreReport,
    /// Present when a calibrated score reached the threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<Alert>,
    /// Where the job came from and what it named.
    pub input: serde_json::Value,
    /// Time spent.
    pub timings: Timings,
    /// When the result was made (RFC 3339, UTC).
    pub created_at: String,
    /// noduled version.
    pub noduled_version: String,
}

/// Builds the alert of a report, if any nodule reached `threshold`.
pub fn alert_of(report: &ScoreReport, threshold: Option<f64>) -> Option<Alert> {
    let t = threshold?;
    let nodules: Vec<AlertNodule> = report
        .nodules
        .iter()
        .filter(|n| n.score.calibrated >= t)
        .map(|n| AlertNodule {
            nodule_id: n.nodule_id.clone(),
            calibrated: n.score.calibrated,
        })
        .collect();
    (!nodules.is_empty()).then_some(Alert {
        threshold: t,
        nodules,
    })
}

/// Now as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(root: &Path) -> PathPolicy {
        let root = root.canonicalize().unwrap();
        PathPolicy {
            roots: vec![root.clone()],
            relative_base: None,
            spool: root.join("spool"),
            opener: std::sync::Arc::new(crate::confine::Opener::confined(&[root]).unwrap()),
            own_spool: None,
        }
    }

    #[test]
    fn unknown_field_is_refused() {
        let err = parse(br#"{"job_id":"a","patient_id":"p","nodules":[],"colour":"red"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn paths_outside_roots_and_dotdot_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("secret.nii.gz"), b"x").unwrap();
        std::fs::write(root.join("ok.nii.gz"), b"x").unwrap();
        let p = policy(&root);
        let sneaky = root.join("../secret.nii.gz");
        assert!(p
            .check("volume", &sneaky)
            .unwrap_err()
            .to_string()
            .contains("outside data_roots"));
        assert!(p
            .check("volume", Path::new("ok.nii.gz"))
            .unwrap_err()
            .to_string()
            .contains("absolute"));
        assert!(p.check("volume", &root.join("ok.nii.gz")).is_ok());
    }

    #[test]
    fn volume_job_becomes_one_request_with_all_nodules() {
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("ct.nii.gz");
        std::fs::write(&v, b"x").unwrap();
        let doc = parse(
            format!(
                r#"{{"job_id":"j","patient_id":"p","volume":"{}","nodules":[{{"nodule_id":"a","coord_lps_mm":[1,2,3]}},{{"nodule_id":"b","coord_lps_mm":[4,5,6]}}]}}"#,
                v.display()
            )
            .as_bytes(),
        )
        .unwrap();
        let job = check(doc, "j", &policy(dir.path()), 8).unwrap();
        match &job.requests[..] {
            [NoduleRequest::Volume {
                nodules,
                patient_id,
                ..
            }] => {
                assert_eq!(nodules.len(), 2);
                assert_eq!(patient_id.as_deref(), Some("p"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn result_id_is_stable_and_model_dependent() {
        let m = ModelInfo {
            id: "m".into(),
            precision: "f32".into(),
            backend: "cpu".into(),
            fallback: None,
            version: Some(1),
        };
        let mut m2 = m.clone();
        m2.version = Some(2);
        assert_eq!(result_id("j", &m, true), result_id("j", &m, true));
        assert_ne!(result_id("j", &m, true), result_id("j", &m2, true));
        assert_ne!(result_id("j", &m, true), result_id("k", &m, true));
    }
}
