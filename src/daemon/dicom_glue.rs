//! The daemon's DICOM glue, kept in one place so it moves easily: [`DicomSide`] (the store
//! of received series and the receiver, one more input), and the worker's calls
//! [`resolve_series`] (a job naming a received series UID waits until it is stable),
//! [`check_series`] (series checks and the result's input fields, before loading) and
//! [`write_sr`] (the job's SR beside its result JSON).

use super::job::{CheckedJob, JobDoc, JobError, JobResult};
use crate::config::Settings;
use crate::dicom::receiver::{self, Receiver};
use crate::dicom::sender::{PacsQueue, QueueLimits};
use crate::dicom::sr::{self, SrInput};
use crate::dicom::store::Store;
use crate::dicom::{DicomSettings, SeriesInfo};
use crate::nodules::NoduleRequest;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The DICOM side of the daemon: the received-series store and, when enabled, the receiver.
#[derive(Debug)]
pub struct DicomSide {
    /// `<state_dir>/dicom`.
    pub store: Arc<Store>,
    /// The C-STORE receiver when `dicom.enabled`.
    pub receiver: Option<Receiver>,
    /// The PACS queue when `[dicom.pacs]` is set (its sender runs on its own thread).
    pub pacs: Option<Arc<PacsQueue>>,
    /// `[dicom]`.
    pub settings: DicomSettings,
    stop: Arc<AtomicBool>,
}

impl DicomSide {
    /// Opens the store and starts the receiver (writing its address to `state_dir/dicom.addr`).
    pub fn start(settings: &Settings) -> std::io::Result<Self> {
        let store = Arc::new(Store::open(&settings.state_dir.join("dicom"))?);
        let receiver = match settings.dicom.listen {
            Some(_) => {
                let r = receiver::start(&settings.dicom, store.clone())?;
                crate::fsutil::write_atomic(
                    &settings.state_dir.join("dicom.addr"),
                    r.addr.to_string().as_bytes(),
                )?;
                Some(r)
            }
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let pacs = match &settings.dicom.pacs {
            Some(cfg) => {
                let q = Arc::new(PacsQueue::open(
                    &settings.state_dir.join("pacs"),
                    QueueLimits::of(cfg),
                )?);
                let (q2, cfg, ae, st) = (
                    q.clone(),
                    cfg.clone(),
                    settings.dicom.ae_title.clone(),
                    stop.clone(),
                );
                std::thread::Builder::new()
                    .name("pacs-sender".into())
                    .spawn(move || q2.run(&cfg, &ae, &st))?;
                Some(q)
            }
            None => None,
        };
        Ok(Self {
            store,
            receiver,
            pacs,
            settings: settings.dicom.clone(),
            stop,
        })
    }

    /// Stops the receiver and the PACS sender (queued SRs stay for the next start).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(r) = &self.receiver {
            r.stop();
        }
    }

    /// The DICOM counters and the PACS queue depth: (counters, gauges) as (name, help,
    /// value), registered by [`super::telemetry::Telemetry::render`].
    pub fn metrics(
        &self,
    ) -> (
        Vec<(&'static str, &'static str, u64)>,
        Vec<(&'static str, &'static str, u64)>,
    ) {
        let get = |a: Option<&std::sync::atomic::AtomicU64>| {
            a.map(|a| a.load(Ordering::Relaxed)).unwrap_or(0)
        };
        let r = self.receiver.as_ref().map(|r| &r.stats);
        let q = self.pacs.as_deref();
        let counters = vec![
            (
                "noduled_dicom_instances_stored",
                "Instances the C-STORE receiver stored",
                get(r.map(|r| &r.stored)),
            ),
            (
                "noduled_dicom_instances_refused",
                "Instances refused with a failure status",
                get(r.map(|r| &r.refused)),
            ),
            (
                "noduled_dicom_associations_rejected",
                "Associations rejected (calling AE not allowed, too many at once)",
                get(r.map(|r| &r.rejected_associations)),
            ),
            (
                "noduled_pacs_sent",
                "SRs the PACS accepted",
                get(q.map(|q| &q.stats.sent)),
            ),
            (
                "noduled_pacs_failed_attempts",
                "C-STORE attempts to the PACS that failed",
                get(q.map(|q| &q.stats.failed_attempts)),
            ),
            (
                "noduled_pacs_refused",
                "SRs the PACS refused for good (moved to pacs/refused/)",
                get(q.map(|q| &q.stats.refused)),
            ),
            (
                "noduled_pacs_dropped",
                "SRs deleted unsent by the PACS queue's bounds",
                get(q.map(|q| &q.stats.dropped)),
            ),
        ];
        let gauges = vec![(
            "noduled_pacs_queue_depth",
            "SRs waiting for the PACS",
            q.map(|q| q.pending().len() as u64).unwrap_or(0),
        )];
        (counters, gauges)
    }

    /// Applies `dicom.max_age_hours` and `dicom.max_bytes` to the received series.
    pub fn prune(&self) {
        self.store
            .prune(self.settings.max_age, self.settings.max_bytes);
    }
}

/// For `"series": {"uid": ...}`: waits until the received series exists and is stable, at
/// most `dicom.series_wait_secs` (and the job's own `jobs.timeout_secs`), then points the
/// job at its folder. `Ok(None)`: the daemon is stopping (the job stays in `processing/`).
pub fn resolve_series(
    side: &DicomSide,
    mut doc: JobDoc,
    stop: &AtomicBool,
) -> Result<Option<JobDoc>, JobError> {
    let Some(series) = doc.series.as_mut() else {
        return Ok(Some(doc));
    };
    let Some(uid) = series.uid.clone() else {
        return Ok(Some(doc));
    };
    if series.path.is_some() || series.series_uid.is_some() {
        return Err(JobError::Field {
            field: "series.uid".into(),
            msg: "give `uid` alone, or `path` (with `series_uid`)".into(),
        });
    }
    let s = &side.settings;
    let store = &side.store;
    let started = Instant::now();
    loop {
        let found = store.find(&uid).map_err(|e| JobError::Field {
            field: "series.uid".into(),
            msg: e.to_string(),
        })?;
        match found {
            Some(dir) if Store::is_stable(&dir, s.stable) => {
                series.path = Some(dir);
                series.series_uid = Some(uid);
                series.uid = None;
                return Ok(Some(doc));
            }
            _ if started.elapsed() >= s.series_wait => {
                let what = if found.is_some() {
                    "not stable"
                } else {
                    "not received"
                };
                return Err(JobError::Field {
                    field: "series.uid".into(),
                    msg: format!(
                        "series {uid} {what} after dicom.series_wait_secs = {}",
                        s.series_wait.as_secs()
                    ),
                });
            }
            _ => {}
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// For a job naming a DICOM series folder: reads its headers through the job's `opener`
/// (beneath the data roots, like every file a job names), runs the checks (an error
/// refuses the job), and adds description, thickness, spacing and warnings to `input`.
pub fn check_series(
    checked: &CheckedJob,
    settings: &DicomSettings,
    opener: &crate::confine::Opener,
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
    let info = SeriesInfo::read_in(opener, path, series_uid.as_deref())
        .map_err(|e| JobError::Load(e.into()))?;
    let warnings = info
        .check(settings.min_slices)
        .map_err(|e| JobError::Load(e.into()))?;
    if let (Some(dst), Some(src)) = (input.as_object_mut(), info.input_fields().as_object()) {
        dst.extend(src.clone());
        dst.insert("warnings".into(), serde_json::json!(warnings));
    }
    Ok(Some(info))
}

/// Writes `<result_id>.dcm` into the PACS queue when `[dicom.pacs]` is set, then into the
/// outbox, for an ok result of a series job (before its JSON, so a result in the outbox has
/// its SR queued). Failures are logged: the JSON result still goes.
pub fn write_sr(
    side: &DicomSide,
    outbox: &std::path::Path,
    result: &JobResult,
    series: Option<&SeriesInfo>,
) {
    let Some(series) = series else { return };
    if !side.settings.write_sr || result.status != "ok" {
        return;
    }
    let input = SrInput {
        report: &result.report,
        series,
        result_id: &result.result_id,
        created: time::OffsetDateTime::now_utc(),
    };
    let path = outbox.join(format!("{}.dcm", result.result_id));
    if path.exists() {
        return;
    }
    let written = sr::build(&input)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            if let Some(q) = &side.pacs {
                q.enqueue(&result.result_id, &bytes)
                    .map_err(|e| format!("PACS queue: {e}"))?;
            }
            crate::fsutil::write_atomic(&path, &bytes)
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
