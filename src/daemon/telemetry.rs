//! What the daemon reports about itself: the [`State`] enum, counters and gauges that each
//! stage updates for what it owns (worker: jobs and heartbeat; output: outbox, disk;
//! publisher: broker, refusals; main loop: state, reloads), read by the retained MQTT
//! status, `/healthz`, `/readyz` and `/metrics`. Values only flow in; no stage reads
//! another's counters to decide anything, except readiness, which is derived here.
//!
//! Latency is per job, seconds, from the worker taking the job to its result being handed
//! to the output stage.

use crate::report::ModelInfo;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Results the broker acknowledged.
    pub results_published: AtomicU64,
    /// Results moved to `outbox/refused/`.
    pub results_refused: AtomicU64,
    /// Refused publishes (each retry counts).
    pub publish_refusals: AtomicU64,
    /// Whether the broker connection is up.
    pub mqtt_connected: AtomicBool,
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
    latency: Mutex<Histogram>,
    /// The DICOM side, for its counters in `/metrics` (set once at start).
    pub dicom: std::sync::OnceLock<Arc<super::dicom_glue::DicomSide>>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS_S.len()],
    count: u64,
    sum: f64,
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
            results_published: AtomicU64::new(0),
            results_refused: AtomicU64::new(0),
            publish_refusals: AtomicU64::new(0),
            mqtt_connected: AtomicBool::new(false),
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
            latency: Mutex::new(Histogram::default()),
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
        let mut h = lock(&self.latency);
        for (i, b) in LATENCY_BUCKETS_S.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
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

    /// Prometheus text exposition (version 0.0.4).
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let b = |a: &AtomicBool| a.load(Ordering::Relaxed) as u64;
        let counters = [
            (
                "noduled_jobs_done_total",
                "Jobs that produced a score.",
                c(&self.jobs_done),
            ),
            (
                "noduled_jobs_failed_total",
                "Jobs that ended with an error result.",
                c(&self.jobs_failed),
            ),
            (
                "noduled_jobs_timed_out_total",
                "Jobs that hit jobs.timeout_secs.",
                c(&self.jobs_timed_out),
            ),
            (
                "noduled_jobs_abandoned_total",
                "Jobs failed after jobs.max_attempts unfinished attempts.",
                c(&self.jobs_abandoned),
            ),
            (
                "noduled_job_ids_reused_total",
                "Jobs whose job_id was seen before with other content.",
                c(&self.job_ids_reused),
            ),
            (
                "noduled_results_published_total",
                "Results acknowledged by the MQTT broker.",
                c(&self.results_published),
            ),
            (
                "noduled_publish_refusals_total",
                "Publishes the broker refused (each retry counts).",
                c(&self.publish_refusals),
            ),
            (
                "noduled_results_refused_total",
                "Results moved to outbox/refused/.",
                c(&self.results_refused),
            ),
            (
                "noduled_outbox_dropped_total",
                "Unpublished results deleted by the outbox bounds.",
                c(&self.outbox_dropped),
            ),
            (
                "noduled_stale_tmp_removed_total",
                "Stale temporary files removed at start.",
                c(&self.stale_tmp_removed),
            ),
            (
                "noduled_retention_pruned_total",
                "Job files deleted from done/ and failed/ by retention.",
                c(&self.retention_pruned),
            ),
            (
                "noduled_reload_failures_total",
                "Model reloads that failed (the old model was kept).",
                c(&self.reload_failures),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let last_ok = self.last_reload().map(|r| (r.outcome == "ok") as u64);
        let gauges = [
            (
                "noduled_queue_depth",
                "Jobs waiting for the worker.",
                c(&self.queue_depth),
            ),
            (
                "noduled_outbox_depth",
                "Results awaiting broker acknowledgement.",
                c(&self.outbox_depth),
            ),
            (
                "noduled_outbox_bytes",
                "Bytes held in the outbox.",
                c(&self.outbox_bytes),
            ),
            (
                "noduled_mqtt_connected",
                "1 when connected to the broker.",
                b(&self.mqtt_connected),
            ),
            (
                "noduled_disk_full",
                "1 while a write fails for lack of space and is being retried.",
                b(&self.disk_full),
            ),
            (
                "noduled_ready",
                "1 when ready to take jobs.",
                self.not_ready().is_none() as u64,
            ),
            (
                "noduled_last_reload_ok",
                "1 when the last reload succeeded (1 before any).",
                last_ok.unwrap_or(1),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        self.render_info(&mut s);
        self.render_latency(&mut s);
        if let Some(d) = self.dicom.get() {
            s.push_str(&d.render_metrics());
        }
        s
    }

    fn render_info(&self, s: &mut String) {
        use std::fmt::Write;
        let info = self.model();
        let _ = writeln!(
            s,
            "# HELP noduled_model_info The model in use.\n# TYPE noduled_model_info gauge\nnoduled_model_info{{id=\"{}\",version=\"{}\",precision=\"{}\",backend=\"{}\"}} 1",
            esc(&info.id),
            esc(&info.version.map(|v| v.to_string()).unwrap_or_default()),
            esc(&info.precision),
            esc(&info.backend)
        );
        let _ = writeln!(
            s,
            "# HELP noduled_device_fallback 1 when a CUDA build scores on the CPU because no GPU answered.\n# TYPE noduled_device_fallback gauge\nnoduled_device_fallback{{reason=\"{}\"}} {}",
            esc(info.fallback.as_deref().unwrap_or("")),
            info.fallback.is_some() as u8
        );
    }

    fn render_latency(&self, s: &mut String) {
        use std::fmt::Write;
        let h = lock(&self.latency);
        let name = "noduled_job_latency_seconds";
        let _ = writeln!(s, "# HELP {name} Time from taking a job to its result.");
        let _ = writeln!(s, "# TYPE {name} histogram");
        for (i, b) in LATENCY_BUCKETS_S.iter().enumerate() {
            let _ = writeln!(s, "{name}_bucket{{le=\"{b}\"}} {}", h.counts[i]);
        }
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(s, "{name}_sum {}", h.sum);
        let _ = writeln!(s, "{name}_count {}", h.count);
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
