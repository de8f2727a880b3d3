//! What the daemon reports about itself: the [`State`] enum, counters and gauges that each
//! stage updates for what it owns (worker: jobs, stuck threads and heartbeat; output:
//! outbox, refused results, retention, disk; publisher: broker, publishes and refusals;
//! main loop: state, reloads), read by the retained MQTT status, `/healthz`, `/readyz` and
//! `/metrics`. Values only flow in; no stage reads another's counters to decide anything,
//! except readiness, which is derived here.
//!
//! It is the one value the stages share (an `Arc` of atomics, as vector's internal metrics
//! or prometheus-client's metric handles are shared): routing every counter update through
//! a channel to one owner would add a hop per event and a stage to keep alive for the
//! health endpoint, for values that are only ever written by one stage and read for
//! display.
//!
//! Latency is per job, seconds, from the worker taking the job to its result being handed
//! to the output stage.

use crate::report::ModelInfo;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One metric sample: (name, help, value).
type Sample = (&'static str, &'static str, u64);

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS_S: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// The daemon's life-cycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Loading the model, opening the sources.
    Starting = 0,
    /// Taking jobs.
    Ready = 1,
    /// Loading a new model (SIGHUP); jobs keep running on the old one.
    Reloading = 2,
    /// Shutting down.
    Stopping = 3,
}

impl State {
    /// The name used in the status message and `/readyz`.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Reloading => "reloading",
            State::Stopping => "stopping",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => State::Ready,
            2 => State::Reloading,
            3 => State::Stopping,
            _ => State::Starting,
        }
    }
}

/// The outcome of the last SIGHUP reload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadOutcome {
    /// "ok" or "error".
    pub outcome: &'static str,
    /// Why it failed (absent when ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When (RFC 3339, UTC).
    pub at: String,
}

/// Counters and gauges (see the module doc for who writes which).
#[derive(Debug)]
pub struct Telemetry {
    state: AtomicU8,
    /// Jobs that produced a score.
    pub jobs_done: AtomicU64,
    /// Jobs that ended with an error result.
    pub jobs_failed: AtomicU64,
    /// Jobs that hit `jobs.timeout_secs`.
    pub jobs_timed_out: AtomicU64,
    /// Jobs abandoned after `jobs.max_attempts` unfinished attempts.
    pub jobs_abandoned: AtomicU64,
    /// Jobs whose job_id was seen before with other content.
    pub job_ids_reused: AtomicU64,
    /// Jobs waiting in the channel to the worker.
    pub queue_depth: AtomicU64,
    /// Job threads still alive when the worker started the latest job (stuck reads).
    pub stuck_job_threads: AtomicU64,
    /// Results the broker acknowledged.
    pub results_published: AtomicU64,
    /// Results moved to `outbox/refused/`.
    pub results_refused: AtomicU64,
    /// Refused publishes (each retry counts).
    pub publish_refusals: AtomicU64,
    /// Whether the broker connection is up.
    pub mqtt_connected: AtomicBool,
    /// Failed broker connection attempts (TLS, authentication, network).
    pub mqtt_connect_failures: AtomicU64,
    /// The last broker connection error, one line (empty once connected).
    pub mqtt_last_error: Mutex<String>,
    /// Whether a write is failing for lack of space (or EIO) and being retried.
    pub disk_full: AtomicBool,
    /// Stale temporary files removed at start.
    pub stale_tmp_removed: AtomicU64,
    /// Files deleted from `done/` and `failed/` by retention.
    pub retention_pruned: AtomicU64,
    /// Failed reloads since start.
    pub reload_failures: AtomicU64,
    /// Unpublished results dropped by the outbox bounds.
    pub outbox_dropped: AtomicU64,
    /// Results awaiting acknowledgement (outbox top level).
    pub outbox_depth: AtomicU64,
    /// Bytes held by the outbox.
    pub outbox_bytes: AtomicU64,
    /// Outbox bounds (bytes, hours), for the status.
    pub outbox_bounds: (u64, u64),
    /// The job deadline, for the stall check.
    pub job_timeout: Duration,
    /// When the daemon started (RFC 3339).
    pub started_at: String,
    model: Mutex<ModelInfo>,
    last_reload: Mutex<Option<ReloadOutcome>>,
    heartbeat: Mutex<Instant>,
    latency: Histogram,
    /// The DICOM side, for its counters in `/metrics` (set once at start).
    pub dicom: std::sync::OnceLock<Arc<super::dicom_glue::DicomSide>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Telemetry {
    /// Fresh telemetry for a daemon serving `model`.
    pub fn new(model: ModelInfo, job_timeout: Duration, outbox_bounds: (u64, u64)) -> Self {
        Self {
            state: AtomicU8::new(State::Starting as u8),
            jobs_done: AtomicU64::new(0),
            jobs_failed: AtomicU64::new(0),
            jobs_timed_out: AtomicU64::new(0),
            jobs_abandoned: AtomicU64::new(0),
            job_ids_reused: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            stuck_job_threads: AtomicU64::new(0),
            results_published: AtomicU64::new(0),
            results_refused: AtomicU64::new(0),
            publish_refusals: AtomicU64::new(0),
            mqtt_connected: AtomicBool::new(false),
            mqtt_connect_failures: AtomicU64::new(0),
            mqtt_last_error: Mutex::new(String::new()),
            disk_full: AtomicBool::new(false),
            stale_tmp_removed: AtomicU64::new(0),
            retention_pruned: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            outbox_dropped: AtomicU64::new(0),
            outbox_depth: AtomicU64::new(0),
            outbox_bytes: AtomicU64::new(0),
            outbox_bounds,
            job_timeout,
            started_at: super::job::now_rfc3339(),
            model: Mutex::new(model),
            last_reload: Mutex::new(None),
            heartbeat: Mutex::new(Instant::now()),
            latency: Histogram::new(LATENCY_BUCKETS_S.iter().copied()),
            dicom: std::sync::OnceLock::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// Sets the state.
    pub fn set_state(&self, s: State) {
        self.state.store(s as u8, Ordering::SeqCst);
    }

    /// The model in use.
    pub fn model(&self) -> ModelInfo {
        lock(&self.model).clone()
    }

    /// Records the model the worker now uses.
    pub fn set_model(&self, info: ModelInfo) {
        *lock(&self.model) = info;
    }

    /// Records a reload's outcome.
    pub fn reloaded(&self, error: Option<String>) {
        if error.is_some() {
            self.reload_failures.fetch_add(1, Ordering::Relaxed);
        }
        *lock(&self.last_reload) = Some(ReloadOutcome {
            outcome: if error.is_some() { "error" } else { "ok" },
            reason: error,
            at: super::job::now_rfc3339(),
        });
    }

    /// The last reload's outcome, if any.
    pub fn last_reload(&self) -> Option<ReloadOutcome> {
        lock(&self.last_reload).clone()
    }

    /// The worker made progress (took a job, finished one, or polled an empty channel).
    pub fn beat(&self) {
        *lock(&self.heartbeat) = Instant::now();
    }

    /// Why the pipeline is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        let state = self.state();
        if state != State::Ready {
            return Some(state.name().to_string());
        }
        if self.disk_full.load(Ordering::Relaxed) {
            return Some("disk_full".into());
        }
        if self.stuck_job_threads.load(Ordering::Relaxed) >= super::worker::MAX_JOB_THREADS as u64 {
            return Some("job threads stuck in input reads".into());
        }
        if !self.worker_alive() {
            return Some("worker stalled".into());
        }
        None
    }

    /// Whether the worker loop ran within the job deadline plus a minute.
    pub fn worker_alive(&self) -> bool {
        lock(&self.heartbeat).elapsed() < self.job_timeout + Duration::from_secs(60)
    }

    /// Records one job's latency.
    pub fn observe_latency(&self, seconds: f64) {
        self.latency.observe(seconds);
    }

    /// The retained status message.
    pub fn status_json(&self) -> serde_json::Value {
        let info = self.model();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "state": self.state().name(),
            "ready": self.not_ready().is_none(),
            "not_ready_reason": self.not_ready(),
            "disk_full": self.disk_full.load(Ordering::Relaxed),
            "backend": info.backend,
            "fallback": info.fallback,
            "model": {"id": info.id, "version": info.version, "precision": info.precision},
            "queue_depth": c(&self.queue_depth),
            "outbox": {
                "depth": c(&self.outbox_depth), "bytes": c(&self.outbox_bytes),
                "max_bytes": self.outbox_bounds.0, "max_age_hours": self.outbox_bounds.1,
                "dropped": c(&self.outbox_dropped), "refused": c(&self.results_refused),
            },
            "jobs_done": c(&self.jobs_done),
            "jobs_failed": c(&self.jobs_failed),
            "jobs_timed_out": c(&self.jobs_timed_out),
            "jobs_abandoned": c(&self.jobs_abandoned),
            "last_reload": self.last_reload(),
            "started_at": self.started_at,
            "pid": std::process::id(),
            "noduled_version": env!("CARGO_PKG_VERSION"),
        })
    }

    /// The counters: (name, help, value).
    fn counters(&self) -> [Sample; 13] {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            (
                "noduled_jobs_done",
                "Jobs that produced a score",
                c(&self.jobs_done),
            ),
            (
                "noduled_jobs_failed",
                "Jobs that ended with an error result",
                c(&self.jobs_failed),
            ),
            (
                "noduled_jobs_timed_out",
                "Jobs that hit jobs.timeout_secs",
                c(&self.jobs_timed_out),
            ),
            (
                "noduled_jobs_abandoned",
                "Jobs failed after jobs.max_attempts unfinished attempts",
                c(&self.jobs_abandoned),
            ),
            (
                "noduled_job_ids_reused",
                "Jobs whose job_id was seen before with other content",
                c(&self.job_ids_reused),
            ),
            (
                "noduled_results_published",
                "Results acknowledged by the MQTT broker",
                c(&self.results_published),
            ),
            (
                "noduled_publish_refusals",
                "Publishes the broker refused (each retry counts)",
                c(&self.publish_refusals),
            ),
            (
                "noduled_results_refused",
                "Results moved to outbox/refused/",
                c(&self.results_refused),
            ),
            (
                "noduled_outbox_dropped",
                "Unpublished results deleted by the outbox bounds",
                c(&self.outbox_dropped),
            ),
            (
                "noduled_stale_tmp_removed",
                "Stale temporary files removed at start",
                c(&self.stale_tmp_removed),
            ),
            (
                "noduled_retention_pruned",
                "Job files deleted from done/ and failed/ by retention",
                c(&self.retention_pruned),
            ),
            (
                "noduled_reload_failures",
                "Model reloads that failed (the old model was kept)",
                c(&self.reload_failures),
            ),
            (
                "noduled_mqtt_connect_failures",
                "Failed MQTT connection attempts (TLS, authentication, network); see /healthz",
                c(&self.mqtt_connect_failures),
            ),
        ]
    }

    /// The gauges: (name, help, value).
    fn gauges(&self) -> [Sample; 8] {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let b = |a: &AtomicBool| a.load(Ordering::Relaxed) as u64;
        let last_ok = self.last_reload().map(|r| (r.outcome == "ok") as u64);
        [
            (
                "noduled_queue_depth",
                "Jobs waiting for the worker",
                c(&self.queue_depth),
            ),
            (
                "noduled_job_threads_busy",
                "Job threads alive when the latest job started (stuck reads)",
                c(&self.stuck_job_threads),
            ),
            (
                "noduled_outbox_depth",
                "Results awaiting broker acknowledgement",
                c(&self.outbox_depth),
            ),
            (
                "noduled_outbox_bytes",
                "Bytes held in the outbox",
                c(&self.outbox_bytes),
            ),
            (
                "noduled_mqtt_connected",
                "1 when connected to the broker",
                b(&self.mqtt_connected),
            ),
            (
                "noduled_disk_full",
                "1 while a write fails for lack of space and is being retried",
                b(&self.disk_full),
            ),
            (
                "noduled_ready",
                "1 when ready to take jobs",
                self.not_ready().is_none() as u64,
            ),
            (
                "noduled_last_reload_ok",
                "1 when the last reload succeeded (1 before any)",
                last_ok.unwrap_or(1),
            ),
        ]
    }

    /// The metrics as OpenMetrics text (prometheus-client), sampled now.
    pub fn render(&self) -> String {
        let (counters, gauges) = (self.counters(), self.gauges());
        let mut reg = Registry::default();
        for (name, help, v) in counters {
            reg.register(name, help, ConstCounter::new(v));
        }
        for (name, help, v) in gauges {
            reg.register(name, help, ConstGauge::new(v as i64));
        }
        if let Some(d) = self.dicom.get() {
            let (counters, gauges) = d.metrics();
            for (name, help, v) in counters {
                reg.register(name, help, ConstCounter::new(v));
            }
            for (name, help, v) in gauges {
                reg.register(name, help, ConstGauge::new(v as i64));
            }
        }
        self.register_info(&mut reg);
        reg.register(
            "noduled_job_latency_seconds",
            "Time from taking a job to its result",
            self.latency.clone(),
        );
        let mut s = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &reg) {
            tracing::warn!(error = %e, "could not encode the metrics");
        }
        s
    }

    fn register_info(&self, reg: &mut Registry) {
        type Labelled = Family<Vec<(String, String)>, Gauge>;
        let info = self.model();
        let model = Labelled::default();
        model
            .get_or_create(&vec![
                ("id".into(), info.id.clone()),
                (
                    "version".into(),
                    info.version.map(|v| v.to_string()).unwrap_or_default(),
                ),
                ("precision".into(), info.precision.clone()),
                ("backend".into(), info.backend.clone()),
            ])
            .set(1);
        reg.register("noduled_model_info", "The model in use", model);
        let fallback = Labelled::default();
        fallback
            .get_or_create(&vec![(
                "reason".into(),
                info.fallback.clone().unwrap_or_default(),
            )])
            .set(info.fallback.is_some() as i64);
        reg.register(
            "noduled_device_fallback",
            "1 when a CUDA build scores on the CPU because no GPU answered",
            fallback,
        );
    }
}
