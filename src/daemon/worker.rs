//! The worker: one thread that takes [`Job`]s from the input channel, claims each into
//! `processing/`, counts the attempt durably ([`Ledger`]), runs it, and sends a typed
//! [`Finished`] to the output stage.
//!
//! Each job runs on a job runner thread ([`run_job`]: read, check, load, then one batched
//! pass over all its nodules) while the worker waits for it at most `jobs.timeout_secs`. A
//! job whose input read is stuck in a system call (a hung network share, a FIFO) cannot be
//! interrupted; past the deadline the worker gives it an error result and moves on to a new
//! runner, leaving the old one blocked (it ends with the process; at most
//! [`MAX_JOB_THREADS`] alive). The worker
//! pings the systemd watchdog and the readiness heartbeat from its own loop, so they stop
//! only when the worker itself is wedged.
//!
//! On shutdown a job stops at its next stage boundary (after loading, after the pass) and
//! stays in `processing/` for the next start; that attempt is taken back.

use super::input::{Job, JobReceiver, Next, Origin};
use super::job::{self, CheckedJob, JobError, JobResult, PathPolicy, Timings};
use super::ledger::Ledger;
use super::output::ToOutput;
use super::systemd::Watchdog;
use super::telemetry::Telemetry;
use super::{disk, inbox::Inbox};
use crate::engine::Scorer;
use crate::nodule::NoduleInput;
use crate::report::ScoreReport;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Job threads that may be alive at once (one running, the rest stuck in a read past their
/// deadline). At the cap the worker waits for one to end without pinging the watchdog:
/// the pipeline is wedged, `/readyz` says so, and systemd restarts the daemon.
pub const MAX_JOB_THREADS: usize = 8;

/// A finished job for the output stage.
#[derive(Debug)]
pub struct Finished {
    /// The job file in `processing/`.
    pub claimed: PathBuf,
    /// Its result.
    pub result: JobResult,
    /// The job's spool files ([`PathPolicy::own_spool_files`]), deleted once the result is
    /// out, whatever the outcome.
    pub spooled: Vec<PathBuf>,
    /// Seconds from taking the job to its result.
    pub latency_s: f64,
    /// The source DICOM series of a scored series job (for its SR).
    pub series: Option<crate::dicom::SeriesInfo>,
}

/// What a job may contain and how long it may take (from the settings).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Where job paths may point.
    pub policy: PathPolicy,
    /// Largest job file, bytes.
    pub max_job_bytes: u64,
    /// Most nodules per job.
    pub max_nodules: usize,
    /// Alert threshold on calibrated scores.
    pub alert_threshold: Option<f64>,
    /// Per-job deadline.
    pub timeout: Duration,
    /// Unfinished attempts after which a job is failed.
    pub max_attempts: u32,
    /// How long the worker waits at shutdown for the job in hand to reach its next stage
    /// boundary; past it (a read stuck in a system call) the job stays in `processing/`
    /// with its attempt counted.
    pub stop_grace: Duration,
    /// Received DICOM series (jobs naming a series UID) and the series checks' settings.
    pub dicom: Arc<super::dicom_glue::DicomSide>,
}

/// The worker stage.
pub struct Worker {
    /// Jobs in.
    pub jobs: JobReceiver,
    /// Results out (to the output stage).
    pub out: SyncSender<ToOutput>,
    /// New models from reloads.
    pub models: Receiver<Arc<dyn Scorer>>,
    /// The model in use.
    pub scorer: Arc<dyn Scorer>,
    /// The state folders.
    pub intake: Inbox,
    /// Attempts and job ids.
    pub ledger: Ledger,
    /// Limits.
    pub limits: Arc<Limits>,
    /// Counters.
    pub telemetry: Arc<Telemetry>,
    /// systemd watchdog.
    pub watchdog: Arc<Watchdog>,
    /// Set when the daemon stops.
    pub stop: Arc<AtomicBool>,
    /// Job threads alive (see [`MAX_JOB_THREADS`]).
    pub job_threads: Arc<AtomicUsize>,
}

/// Tells the output stage that the worker ended (however it ended).
struct WorkerDone(SyncSender<ToOutput>);

impl Drop for WorkerDone {
    fn drop(&mut self) {
        let _ = self.0.send(ToOutput::WorkerDone);
    }
}

/// Decrements the live job-thread count when a job thread ends.
struct ThreadCount(Arc<AtomicUsize>);

impl Drop for ThreadCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The job runner: a long-lived thread that runs one job at a time (no thread, and no new
/// malloc arena, per job); replaced only when a job on it passes its deadline.
struct Runner {
    tasks: Sender<Task>,
    msgs: Receiver<Msg>,
}

/// One job for the runner.
struct Task {
    file: PathBuf,
    noticed: Instant,
    ids_only: bool,
    scorer: Arc<dyn Scorer>,
    /// Set by the worker when it stopped waiting (deadline, shutdown): the job thread then
    /// stops at its next step and writes nothing more to the spool.
    gave_up: Arc<AtomicBool>,
}

/// What the worker saw while waiting for the runner.
enum Waited {
    /// The job thread ended the job (or died: `Ran` says so).
    Ran(Ran),
    /// `jobs.timeout_secs` passed first.
    TimedOut,
    /// The daemon stops and the job did not reach a boundary within `stop_grace`.
    Stopped,
}

/// The identity of a job, known once its file was read.
#[derive(Debug, Clone, Default)]
struct Ids {
    key: Option<String>,
    job_id: Option<String>,
    patient_id: Option<String>,
}

/// What a job thread reports.
enum Msg {
    Identified(Ids),
    Done(Ran),
}

/// A job thread's outcome.
struct Ran {
    input: serde_json::Value,
    series: Option<crate::dicom::SeriesInfo>,
    outcome: Result<Option<Scored>, JobError>,
}

/// A scored job (`None` in [`Ran::outcome`] means interrupted by shutdown).
struct Scored {
    report: ScoreReport,
    load_ms: f64,
    score_ms: f64,
}

impl Worker {
    /// The worker loop; returns when every input is gone or the daemon stops.
    pub fn run(mut self) {
        let _done = WorkerDone(self.out.clone());
        let mut runner = None;
        loop {
            self.telemetry.beat();
            self.watchdog.ping();
            while let Ok(s) = self.models.try_recv() {
                self.telemetry.set_model(s.model_info());
                self.scorer = s;
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            match self.jobs.recv_timeout(self.watchdog.poll_every()) {
                Next::Closed => return,
                Next::Idle => {}
                Next::Job(job) => self.handle(job, &mut runner),
            }
        }
    }

    fn handle(&self, job: Job, runner: &mut Option<Runner>) {
        let Some(claimed) = self.claim(&job.file) else {
            return;
        };
        let name = file_name(&claimed);
        let started = Instant::now();
        let queued_ms = started.duration_since(job.noticed).as_secs_f64() * 1e3;
        let rec = match disk::retry(
            "attempts ledger",
            &self.telemetry,
            &self.stop,
            &|| self.alive(),
            || self.ledger.begin(&name, job.origin),
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(file = %name, error = %e, "could not record the attempt; job left in processing/");
                return;
            }
        };
        let abandoned = rec.attempts > self.limits.max_attempts;
        let (ids, waited) = self.run_with_deadline(runner, &claimed, job.noticed, abandoned);
        let spooled = self.limits.policy.for_job(&name).own_spool_files();
        let series = match &waited {
            Waited::Ran(r) => r.series.clone(),
            _ => None,
        };
        let (input, outcome) = match waited {
            Waited::TimedOut => (serde_json::Value::Null, Err(self.timed_out(&name))),
            Waited::Stopped => {
                tracing::warn!(file = %name, "stopping: the job did not reach a step boundary in time (a stuck read?); left in processing/ with its attempt counted");
                return;
            }
            Waited::Ran(r) if abandoned => {
                self.telemetry
                    .jobs_abandoned
                    .fetch_add(1, Ordering::Relaxed);
                let err = JobError::Abandoned {
                    attempts: rec.attempts - 1,
                    max: self.limits.max_attempts,
                };
                (r.input, Err(err))
            }
            Waited::Ran(r) => match r.outcome {
                Ok(None) => {
                    tracing::info!(file = %name, "stopping: job left in processing/ for the next start");
                    let _ = self.ledger.undo(&name, rec);
                    return;
                }
                Ok(Some(scored)) => (r.input, Ok(scored)),
                Err(e) => (r.input, Err(e)),
            },
        };
        let result = self.result(&name, job.origin, ids, input, outcome, queued_ms, started);
        let finished = Finished {
            claimed,
            result,
            spooled,
            latency_s: started.elapsed().as_secs_f64(),
            series,
        };
        self.hand_over(finished, &name);
    }

    fn timed_out(&self, name: &str) -> JobError {
        self.telemetry
            .jobs_timed_out
            .fetch_add(1, Ordering::Relaxed);
        let secs = self.limits.timeout.as_secs();
        tracing::error!(file = %name, secs, "job deadline passed; giving it an error result and moving on");
        JobError::TimedOut { secs }
    }

    /// The worker made progress or waits on something reported (a full disk).
    fn alive(&self) {
        self.telemetry.beat();
        self.watchdog.ping();
    }

    /// Sends a finished job to the output stage, waiting (alive) while it is busy.
    fn hand_over(&self, finished: Finished, name: &str) {
        let mut msg = ToOutput::Finished(finished);
        loop {
            match self.out.try_send(msg) {
                Ok(()) => return,
                Err(TrySendError::Full(m)) => {
                    msg = m;
                    self.alive();
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(TrySendError::Disconnected(_)) => {
                    tracing::error!(file = %name, "output stage gone; job left in processing/");
                    return;
                }
            }
        }
    }

    /// Moves an inbox or MQTT job into `processing/` (a recovered one is there already);
    /// `None` when another copy of the job took it first.
    fn claim(&self, file: &Path) -> Option<PathBuf> {
        if file.parent() == Some(self.intake.processing.as_path()) {
            return file.exists().then(|| file.to_path_buf());
        }
        match self.intake.claim(file) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "could not claim a job");
                None
            }
        }
    }

    /// Starts a job runner, waiting while [`MAX_JOB_THREADS`] are alive (stuck reads).
    fn spawn_runner(&self) -> Option<Runner> {
        loop {
            let alive = self.job_threads.load(Ordering::SeqCst);
            self.telemetry
                .stuck_job_threads
                .store(alive as u64, Ordering::Relaxed);
            if alive < MAX_JOB_THREADS || self.stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let (task_tx, task_rx) = std::sync::mpsc::channel::<Task>();
        let (msg_tx, msgs) = std::sync::mpsc::channel();
        self.job_threads.fetch_add(1, Ordering::SeqCst);
        let count = ThreadCount(self.job_threads.clone());
        let (limits, stop) = (self.limits.clone(), self.stop.clone());
        let spawned = std::thread::Builder::new()
            .name("noduled-job".into())
            .spawn(move || {
                let _count = count;
                for t in task_rx {
                    run_job(
                        &t.file,
                        t.noticed,
                        &limits,
                        t.scorer.as_ref(),
                        &stop,
                        t.ids_only,
                        &t.gave_up,
                        &msg_tx,
                    );
                }
            });
        match spawned {
            Ok(_) => Some(Runner {
                tasks: task_tx,
                msgs,
            }),
            Err(e) => {
                tracing::error!(error = %e, "could not start a job thread");
                None
            }
        }
    }

    /// Runs the job on the runner and waits at most the deadline (and at shutdown at most
    /// `stop_grace`); past either the runner, blocked, is left behind and a new one starts
    /// with the next job.
    fn run_with_deadline(
        &self,
        runner: &mut Option<Runner>,
        claimed: &Path,
        noticed: Instant,
        ids_only: bool,
    ) -> (Ids, Waited) {
        let died = || {
            Waited::Ran(Ran {
                input: serde_json::Value::Null,
                series: None,
                outcome: Err(JobError::Panicked),
            })
        };
        if runner.is_none() {
            *runner = self.spawn_runner();
        }
        let Some(r) = runner.as_ref() else {
            return (Ids::default(), died());
        };
        let gave_up = Arc::new(AtomicBool::new(false));
        let task = Task {
            file: claimed.to_path_buf(),
            noticed,
            ids_only,
            scorer: self.scorer.clone(),
            gave_up: gave_up.clone(),
        };
        if r.tasks.send(task).is_err() {
            *runner = None;
            return (Ids::default(), died());
        }
        let deadline = Instant::now() + self.limits.timeout;
        let mut stop_deadline = None;
        let mut ids = Ids::default();
        let waited = loop {
            self.alive();
            let now = Instant::now();
            if stop_deadline.is_none() && self.stop.load(Ordering::SeqCst) {
                stop_deadline = Some(now + self.limits.stop_grace);
            }
            let end = stop_deadline.map_or(deadline, |s| s.min(deadline));
            let left = end.saturating_duration_since(now);
            match r.msgs.recv_timeout(left.min(self.watchdog.poll_every())) {
                Ok(Msg::Identified(i)) => ids = i,
                Ok(Msg::Done(ran)) => return (ids, Waited::Ran(ran)),
                Err(RecvTimeoutError::Timeout) if left.is_zero() && end == deadline => {
                    break Waited::TimedOut
                }
                Err(RecvTimeoutError::Timeout) if left.is_zero() => break Waited::Stopped,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break died(),
            }
        };
        gave_up.store(true, Ordering::SeqCst);
        *runner = None;
        (ids, waited)
    }

    #[allow(clippy::too_many_arguments)]
    fn result(
        &self,
        name: &str,
        origin: Origin,
        ids: Ids,
        input: serde_json::Value,
        outcome: Result<Scored, JobError>,
        queued_ms: f64,
        started: Instant,
    ) -> JobResult {
        let info = self.scorer.model_info();
        let key = ids.key.clone().unwrap_or_else(|| format!("file:{name}"));
        let job_id_reused = self.note_job_id(&ids, &key);
        let mut input_doc = serde_json::json!({"origin": origin.name(), "file": name});
        if let (Some(dst), Some(src)) = (input_doc.as_object_mut(), input.as_object()) {
            dst.extend(src.clone());
        }
        let (report, timings, error) = match outcome {
            Ok(s) => (
                s.report,
                Timings {
                    queued_ms,
                    load_ms: s.load_ms,
                    score_ms: s.score_ms,
                    total_ms: 0.0,
                },
                None,
            ),
            Err(e) => (
                ScoreReport {
                    model: info.clone(),
                    nodules: Vec::new(),
                    patients: Vec::new(),
                },
                Timings {
                    queued_ms,
                    ..Timings::default()
                },
                Some(e.to_string()),
            ),
        };
        let ok = error.is_none();
        JobResult {
            result_id: job::result_id(&key, &info, ok),
            job_id: ids.job_id,
            patient_id: ids.patient_id,
            status: if ok { "ok" } else { "error" }.into(),
            job_id_reused,
            error,
            alert: if ok {
                job::alert_of(&report, self.limits.alert_threshold)
            } else {
                None
            },
            report,
            input: input_doc,
            timings: Timings {
                total_ms: started.elapsed().as_secs_f64() * 1e3,
                ..timings
            },
            created_at: job::now_rfc3339(),
            noduled_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn note_job_id(&self, ids: &Ids, key: &str) -> bool {
        let Some(job_id) = &ids.job_id else {
            return false;
        };
        let reused = disk::retry(
            "job-id ledger",
            &self.telemetry,
            &self.stop,
            &|| self.alive(),
            || self.ledger.note_job_id(job_id, key),
        )
        .unwrap_or(false);
        if reused {
            self.telemetry
                .job_ids_reused
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(job_id = %job_id, "job_id reused by a job with other content: scored as a new job (job_id_reused)");
        }
        reused
    }
}

/// One job, on its own thread: read and check the file, report its identity, then (unless
/// `ids_only`) load every nodule and score them in one batched pass.
fn run_job(
    file: &Path,
    noticed: Instant,
    limits: &Limits,
    scorer: &dyn Scorer,
    stop: &AtomicBool,
    ids_only: bool,
    gave_up: &AtomicBool,
    tx: &Sender<Msg>,
) {
    let mut ran = Ran {
        input: serde_json::Value::Null,
        series: None,
        outcome: Ok(None),
    };
    // Stop at the next step when the daemon stops or the worker stopped waiting.
    let halt = || stop.load(Ordering::SeqCst) || gave_up.load(Ordering::SeqCst);
    let mut wrote = Vec::new();
    let outcome = (|| {
        let mut ids = Ids::default();
        let bytes = match read_limited(file, limits.max_job_bytes) {
            Ok(b) => b,
            Err(e) => {
                let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
                ids.key = Some(format!("file:{}:{len}", file_name(file)));
                let _ = tx.send(Msg::Identified(ids));
                return Err(e);
            }
        };
        ids.key = Some(job::content_key(&bytes));
        let parsed = job::parse(&bytes);
        if let Ok(doc) = &parsed {
            ids.job_id = Some(doc.job_id.clone());
            ids.patient_id = Some(doc.patient_id.clone());
        }
        let key = ids.key.clone().unwrap_or_default();
        let _ = tx.send(Msg::Identified(ids));
        let doc = parsed?;
        if ids_only || halt() {
            return Ok(None);
        }
        let Some(doc) = super::dicom_glue::resolve_series(&limits.dicom, doc, stop, noticed)?
        else {
            return Ok(None);
        };
        let policy = limits.policy.for_job(&file_name(file));
        let checked = job::check(doc, &key, &policy, limits.max_nodules);
        wrote = spool_identities(&policy);
        let checked: CheckedJob = checked?;
        ran.input = checked.input.clone();
        ran.series = super::dicom_glue::check_series(
            &checked,
            &limits.dicom.settings,
            &policy.opener,
            &mut ran.input,
        )?;
        let mut scored = score_job(&checked, &policy.opener, scorer, &halt)?;
        if let Some(s) = scored.as_mut() {
            s.report.fill_summaries(limits.alert_threshold);
        }
        Ok(scored)
    })();
    ran.outcome = outcome;
    if tx.send(Msg::Done(ran)).is_err() {
        // The worker gave up on this job at its deadline and its output stage may have
        // deleted the spool files before this thread wrote one: those this thread wrote are
        // its own to delete, unless a newer job of the same name replaced them since.
        for (p, id) in wrote {
            if file_identity(&p) == Some(id) {
                let _ = std::fs::remove_file(p);
            }
        }
        tracing::info!(file = %file_name(file), "a job that passed its deadline ended; its own spool files were removed");
    }
}

/// The job's spool files as they are now, with their identity (device, inode).
fn spool_identities(policy: &PathPolicy) -> Vec<(PathBuf, (u64, u64))> {
    policy
        .own_spool_files()
        .into_iter()
        .filter_map(|p| file_identity(&p).map(|id| (p, id)))
        .collect()
}

/// A file's (device, inode), `None` when it is gone.
fn file_identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Loads a checked job's nodules and scores them all in one pass.
fn score_job(
    checked: &CheckedJob,
    opener: &crate::confine::Opener,
    scorer: &dyn Scorer,
    halt: &dyn Fn() -> bool,
) -> Result<Option<Scored>, JobError> {
    let t_load = Instant::now();
    let mut inputs: Vec<NoduleInput> = Vec::new();
    for req in &checked.requests {
        inputs.extend(crate::nodules::load_in(req, opener).map_err(JobError::Load)?);
    }
    if halt() {
        return Ok(None);
    }
    let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
    let t_score = Instant::now();
    let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scorer.score(&inputs)))
        .map_err(|_| JobError::Panicked)?
        .map_err(|source| JobError::Score {
            nodule_id: inputs
                .iter()
                .map(|n| n.nodule_id.as_str())
                .collect::<Vec<_>>()
                .join(","),
            source,
        })?;
    if halt() {
        return Ok(None);
    }
    Ok(Some(Scored {
        report,
        load_ms,
        score_ms: t_score.elapsed().as_secs_f64() * 1e3,
    }))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads a job file, refusing it by its size before reading when it exceeds `max`.
fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, JobError> {
    let p = path.display().to_string();
    let read_err = |source| JobError::Read {
        path: p.clone(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read_err)?;
    let len = f.metadata().map_err(read_err)?.len();
    if len > max {
        return Err(JobError::TooLarge {
            what: p,
            bytes: len,
            max,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > max {
        return Err(JobError::TooLarge {
            what: p,
            bytes: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}
