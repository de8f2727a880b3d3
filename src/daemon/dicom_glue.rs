//! The daemon's DICOM glue, kept in one place so it moves easily: [`DicomSide`] (the store
//! of received series and the receiver, one more input), [`SeriesGate`] (the stage between
//! the inputs and the worker where a job naming a received series waits until it is stable),
//! and the worker's calls [`resolve_series`] (the job pointed at the series' folder),
//! [`check_series`] (series checks and the result's input fields, before loading) and
//! [`write_sr`] (the job's SR beside its result JSON).

use super::input::{Job, JobReceiver, JobSender, Next};
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
    /// Jobs the [`SeriesGate`] holds until their series is stable.
    pub waiting_jobs: std::sync::atomic::AtomicU64,
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
            waiting_jobs: Default::default(),
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
        let gauges = vec![
            (
                "noduled_pacs_queue_depth",
                "SRs waiting for the PACS",
                q.map(|q| q.pending().len() as u64).unwrap_or(0),
            ),
            (
                "noduled_jobs_waiting_for_series",
                "Jobs held until the received series they name is stable",
                self.waiting_jobs.load(Ordering::Relaxed),
            ),
        ];
        (counters, gauges)
    }

    /// Applies `dicom.max_age_hours` and `dicom.max_bytes` to the received series.
    pub fn prune(&self) {
        self.store
            .prune(self.settings.max_age, self.settings.max_bytes);
    }
}

/// For `"series": {"uid": ...}`: points the job at the received series' folder once it is
/// stable. The [`SeriesGate`] holds such a job until then or until its wait bound
/// (`noticed` + `dicom.series_wait_secs`), so this normally decides at once; only when an
/// instance arrived between the gate's release and now does it wait, up to that same bound.
/// Past the bound: an error naming `series.uid`. `Ok(None)`: the daemon is stopping (the
/// job stays in `processing/`).
pub fn resolve_series(
    side: &DicomSide,
    mut doc: JobDoc,
    stop: &AtomicBool,
    noticed: Instant,
) -> Result<Option<JobDoc>, JobError> {
    let Some(uid) = series_uid(&doc)? else {
        return Ok(Some(doc));
    };
    let s = &side.settings;
    let until = noticed + s.series_wait;
    loop {
        match side.series_state(&uid)? {
            SeriesState::Stable(dir) => {
                if let Some(series) = doc.series.as_mut() {
                    series.path = Some(dir);
                    series.series_uid = Some(uid);
                    series.uid = None;
                }
                return Ok(Some(doc));
            }
            state if Instant::now() >= until => {
                let what = if state == SeriesState::Missing {
                    "not received"
                } else {
                    "not stable"
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

/// The received-series UID a job names (`"series": {"uid": ...}` alone), if any.
fn series_uid(doc: &JobDoc) -> Result<Option<String>, JobError> {
    let Some(series) = &doc.series else {
        return Ok(None);
    };
    let Some(uid) = series.uid.clone() else {
        return Ok(None);
    };
    if series.path.is_some() || series.series_uid.is_some() {
        return Err(JobError::Field {
            field: "series.uid".into(),
            msg: "give `uid` alone, or `path` (with `series_uid`)".into(),
        });
    }
    Ok(Some(uid))
}

/// Where a received series stands.
#[derive(Debug, PartialEq)]
enum SeriesState {
    /// No instance of it arrived.
    Missing,
    /// Instances are still arriving (one came within `dicom.stable_secs`).
    Arriving,
    /// Complete: its folder.
    Stable(std::path::PathBuf),
}

impl DicomSide {
    fn series_state(&self, uid: &str) -> Result<SeriesState, JobError> {
        let found = self.store.find(uid).map_err(|e| JobError::Field {
            field: "series.uid".into(),
            msg: e.to_string(),
        })?;
        Ok(match found {
            None => SeriesState::Missing,
            Some(dir) if Store::is_stable(&dir, self.settings.stable) => SeriesState::Stable(dir),
            Some(_) => SeriesState::Arriving,
        })
    }
}

/// The waiting stage between the inputs and the worker: a job naming a received series
/// (`"series": {"uid": ...}`) that is not yet stable is parked here, in memory, until the
/// series is stable or the job's wait bound passes (when it was noticed +
/// `dicom.series_wait_secs`), then goes on to the worker, which resolves it at once
/// ([`resolve_series`]). Every other job (and one whose file cannot be read or parsed here:
/// the worker gives it its error result) passes straight through, so a waiting job never
/// holds the worker. A parked job is still a file in the inbox or `mqtt-jobs/`; on a
/// restart it is sent again and parked again (its wait bound restarts).
pub struct SeriesGate {
    /// Jobs from the inputs.
    pub jobs: JobReceiver,
    /// Jobs to the worker.
    pub worker: JobSender,
    /// The received series.
    pub side: Arc<DicomSide>,
    /// `jobs.max_job_bytes`: a larger file is not read here.
    pub max_job_bytes: u64,
    /// Set when the daemon stops.
    pub stop: Arc<AtomicBool>,
}

/// A job waiting in the [`SeriesGate`].
struct Parked {
    job: Job,
    uid: String,
    until: Instant,
}

impl SeriesGate {
    /// The stage loop: until the daemon stops or every input is gone (parked jobs stay
    /// files for the next start).
    pub fn run(self) {
        let mut parked: Vec<Parked> = Vec::new();
        while !self.stop.load(Ordering::SeqCst) {
            match self.jobs.recv_timeout(Duration::from_millis(250)) {
                Next::Closed => return,
                Next::Idle => {}
                Next::Job(job) => match self.waits_for(&job) {
                    Some(uid) if !parked.iter().any(|p| p.job.file == job.file) => {
                        tracing::info!(file = %job.file.display(), series = %uid, "job waits for its series to be stable");
                        let until = job.noticed + self.side.settings.series_wait;
                        parked.push(Parked { job, uid, until });
                    }
                    Some(_) => {} // the same file again (an inbox rescan): parked already
                    None => {
                        if !self.worker.send(job) {
                            return;
                        }
                    }
                },
            }
            let now = Instant::now();
            let (go, wait): (Vec<Parked>, Vec<Parked>) = parked.into_iter().partition(|p| {
                now >= p.until
                    || matches!(self.side.series_state(&p.uid), Ok(SeriesState::Stable(_)))
            });
            parked = wait;
            self.side
                .waiting_jobs
                .store(parked.len() as u64, Ordering::Relaxed);
            for p in go {
                if !self.worker.send(p.job) {
                    return;
                }
            }
        }
    }

    /// The series UID the job waits for: `Some` only for a job naming a valid received
    /// series UID that is not stable yet.
    fn waits_for(&self, job: &Job) -> Option<String> {
        use std::io::Read;
        let f = std::fs::File::open(&job.file).ok()?;
        let mut bytes = Vec::new();
        f.take(self.max_job_bytes + 1)
            .read_to_end(&mut bytes)
            .ok()?;
        if bytes.len() as u64 > self.max_job_bytes {
            return None;
        }
        let doc = super::job::parse(&bytes).ok()?;
        let uid = series_uid(&doc).ok()??;
        match self.side.series_state(&uid) {
            Ok(SeriesState::Missing | SeriesState::Arriving) => Some(uid),
            _ => None,
        }
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
