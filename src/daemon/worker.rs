//! The worker: one blocking thread that takes jobs from the queue, claims each into
//! `processing/`, reads its inputs, scores them nodule by nodule, writes the result to the
//! outbox and moves the job to `done/` or `failed/`. It pings the systemd watchdog from its
//! loop and checks the stop flag between nodules: on SIGTERM it finishes the nodule in hand
//! and leaves the job in `processing/`, where the next start picks it up.

use super::inbox::Pop;
use super::job::{self, CheckedJob, JobError, JobResult, PathPolicy, Timings};
use super::systemd::Watchdog;
use super::Shared;
use crate::nodule::NoduleInput;
use crate::report::{ModelInfo, NoduleReport, ScoreReport};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a job ended.
enum Outcome {
    Scored(ScoreReport, Timings),
    Interrupted,
}

/// The worker loop; returns when the queue closes or the stop flag is set.
pub fn run(shared: Arc<Shared>, policy: PathPolicy, watchdog: Arc<Watchdog>) {
    let mut last_prune = Instant::now();
    loop {
        shared.beat();
        watchdog.ping();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        if last_prune.elapsed() > Duration::from_secs(60) {
            prune(&shared);
            last_prune = Instant::now();
        }
        match shared.queue.pop_timeout(watchdog.poll_every()) {
            Pop::Closed => return,
            Pop::Empty => {}
            Pop::Job(path, noticed) => {
                shared.status_changed.notify_one();
                process(&shared, &policy, &watchdog, &path, noticed);
                prune(&shared);
                shared.status_changed.notify_one();
            }
        }
    }
}

fn prune(shared: &Shared) {
    shared.dicom.prune(&shared.settings.dicom);
    if shared.outbox.prune() > 0 {
        shared.status_changed.notify_one();
    }
}

fn process(
    shared: &Shared,
    policy: &PathPolicy,
    watchdog: &Watchdog,
    path: &Path,
    noticed: Instant,
) {
    let intake = &shared.intake;
    let claimed = if path.parent() == Some(intake.processing.as_path()) {
        path.to_path_buf()
    } else {
        match intake.claim(path) {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "could not claim a job");
                return;
            }
        }
    };
    let name = claimed
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let origin = if name.starts_with("mqtt-") {
        "mqtt"
    } else {
        "inbox"
    };
    let started = Instant::now();
    let queued_ms = started.duration_since(noticed).as_secs_f64() * 1e3;
    let mut key = format!("file:{name}");
    let mut doc_ids: (Option<String>, Option<String>) = (None, None);
    let mut input = serde_json::json!({"origin": origin, "file": name});
    let mut spooled: Vec<PathBuf> = Vec::new();
    let mut series: Option<crate::dicom::SeriesInfo> = None;
    let scorer = shared.scorer();
    let info = scorer.model_info();

    let outcome = (|| -> Result<Outcome, JobError> {
        let bytes = read_limited(&claimed, shared.settings.max_job_bytes)?;
        let doc = job::parse(&bytes)?;
        key = format!("job:{}", doc.job_id);
        doc_ids = (Some(doc.job_id.clone()), Some(doc.patient_id.clone()));
        let beat = || {
            watchdog.ping();
            shared.beat();
        };
        let Some(doc) = super::dicom_glue::resolve_series(shared, doc, &beat)? else {
            return Ok(Outcome::Interrupted);
        };
        let checked: CheckedJob = job::check(doc, &key, policy, shared.settings.max_nodules)?;
        spooled = checked.spooled.clone();
        if let (Some(dst), Some(src)) = (input.as_object_mut(), checked.input.as_object()) {
            dst.extend(src.clone());
        }
        series = super::dicom_glue::check_series(&checked, &shared.settings.dicom, &mut input)?;
        let t_load = Instant::now();
        let mut inputs: Vec<NoduleInput> = Vec::new();
        for req in &checked.requests {
            watchdog.ping();
            inputs.extend(
                crate::nodules::load(req).map_err(|e| JobError::Processing(format!("{e:#}")))?,
            );
            if shared.stop.load(Ordering::SeqCst) {
                return Ok(Outcome::Interrupted);
            }
        }
        let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
        let t_score = Instant::now();
        let mut reports: Vec<NoduleReport> = Vec::new();
        for n in &inputs {
            watchdog.ping();
            shared.beat();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                scorer.score(std::slice::from_ref(n))
            }))
            .map_err(|_| {
                JobError::Processing(format!("nodule {}: the model panicked", n.nodule_id))
            })?
            .map_err(|e| JobError::Processing(format!("nodule {}: {e:#}", n.nodule_id)))?;
            reports.extend(r.nodules);
            if shared.stop.load(Ordering::SeqCst) && reports.len() < inputs.len() {
                return Ok(Outcome::Interrupted);
            }
        }
        let score_ms = t_score.elapsed().as_secs_f64() * 1e3;
        let patients = ScoreReport::patients_from(&reports);
        let mut report = ScoreReport {
            model: info.clone(),
            nodules: reports,
            patients,
        };
        report.fill_summaries(shared.settings.alert_threshold);
        Ok(Outcome::Scored(
            report,
            Timings {
                queued_ms,
                load_ms,
                score_ms,
                total_ms: 0.0,
            },
        ))
    })();

    let (report, timings, error) = match outcome {
        Ok(Outcome::Interrupted) => {
            tracing::info!(file = %name, "stopping: job left in processing/ for the next start");
            return;
        }
        Ok(Outcome::Scored(report, timings)) => (report, timings, None),
        Err(e) => {
            let empty = ScoreReport {
                model: info.clone(),
                nodules: Vec::new(),
                patients: Vec::new(),
            };
            (
                empty,
                Timings {
                    queued_ms,
                    ..Timings::default()
                },
                Some(e.to_string()),
            )
        }
    };
    let ok = error.is_none();
    let result = JobResult {
        result_id: job::result_id(&key, &info, ok),
        job_id: doc_ids.0,
        patient_id: doc_ids.1,
        status: if ok { "ok" } else { "error" }.into(),
        error,
        alert: if ok {
            job::alert_of(&report, shared.settings.alert_threshold)
        } else {
            None
        },
        report,
        input,
        timings: Timings {
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            ..timings
        },
        created_at: job::now_rfc3339(),
        noduled_version: env!("CARGO_PKG_VERSION").into(),
    };
    super::dicom_glue::write_sr(shared, &result, series.as_ref());
    finish(shared, &claimed, &result, &info);
    for p in spooled {
        let _ = std::fs::remove_file(p);
    }
    shared
        .metrics
        .observe_latency(started.elapsed().as_secs_f64());
}

/// Writes the result (unless one with the same id is held already) and moves the job on.
fn finish(shared: &Shared, claimed: &Path, result: &JobResult, info: &ModelInfo) {
    let json = match serde_json::to_vec_pretty(result) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %e, "could not serialise a result");
            return;
        }
    };
    if !shared.outbox.contains(&result.result_id) {
        if let Err(e) = shared.outbox.write(&result.result_id, &json) {
            // Leave the job in processing/: it runs again at the next start.
            tracing::error!(error = %e, outbox = %shared.outbox.dir().display(), "could not write a result");
            return;
        }
    }
    shared.outbox_changed.notify_one();
    let err_value = result
        .error
        .as_ref()
        .map(|_| serde_json::to_value(result).unwrap_or_default());
    if let Err(e) = shared.intake.finish(claimed, err_value.as_ref()) {
        tracing::error!(file = %claimed.display(), error = %e, "could not move a finished job");
    }
    match &result.error {
        None => {
            shared.metrics.jobs_done.fetch_add(1, Ordering::Relaxed);
            tracing::info!(job_id = ?result.job_id, result_id = %result.result_id, model = %info.id, "job done");
        }
        Some(e) => {
            shared.metrics.jobs_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(job_id = ?result.job_id, result_id = %result.result_id, error = %e, "job failed");
        }
    }
}

/// Reads a job file, refusing it by its size before reading when it exceeds `max`.
fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, JobError> {
    let p = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|source| JobError::Read {
        path: p.clone(),
        source,
    })?;
    let len = f
        .metadata()
        .map_err(|source| JobError::Read {
            path: p.clone(),
            source,
        })?
        .len();
    if len > max {
        return Err(JobError::TooLarge {
            what: p,
            bytes: len,
            max,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| JobError::Read {
            path: p.clone(),
            source,
        })?;
    if bytes.len() as u64 > max {
        return Err(JobError::TooLarge {
            what: p,
            bytes: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}
