//! Counters the worker and the MQTT task update, read by the status message and the
//! Prometheus `/metrics` text. Latency is per job, seconds, from the worker taking the job
//! to its result being in the outbox.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS_S: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// The daemon's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Jobs that produced a score.
    pub jobs_done: AtomicU64,
    /// Jobs that ended with an error result.
    pub jobs_failed: AtomicU64,
    /// Results the broker acknowledged.
    pub results_published: AtomicU64,
    /// Whether the broker connection is up.
    pub mqtt_connected: AtomicBool,
    /// Failed broker connection attempts (TLS, authentication, network).
    pub mqtt_connect_failures: AtomicU64,
    /// The last broker connection error, one line (empty once connected).
    pub mqtt_last_error: Mutex<String>,
    latency: Mutex<Histogram>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS_S.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    /// Records one job's latency.
    pub fn observe_latency(&self, seconds: f64) {
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in LATENCY_BUCKETS_S.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    /// Prometheus text exposition (version 0.0.4).
    pub fn render(&self, gauges: &Gauges) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "noduled_jobs_done_total",
            "Jobs that produced a score.",
            self.jobs_done.load(Ordering::Relaxed),
        );
        counter(
            "noduled_mqtt_connect_failures_total",
            "Failed MQTT connection attempts (TLS, authentication, network); see /healthz.",
            self.mqtt_connect_failures.load(Ordering::Relaxed),
        );
        counter(
            "noduled_jobs_failed_total",
            "Jobs that ended with an error result.",
            self.jobs_failed.load(Ordering::Relaxed),
        );
        counter(
            "noduled_results_published_total",
            "Results acknowledged by the MQTT broker.",
            self.results_published.load(Ordering::Relaxed),
        );
        counter(
            "noduled_outbox_dropped_total",
            "Unpublished results deleted by the outbox bounds.",
            gauges.outbox_dropped,
        );
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "noduled_queue_depth",
            "Jobs waiting for the worker.",
            gauges.queue_depth,
        );
        gauge(
            "noduled_outbox_depth",
            "Results awaiting broker acknowledgement.",
            gauges.outbox_depth,
        );
        gauge(
            "noduled_outbox_bytes",
            "Bytes held in the outbox.",
            gauges.outbox_bytes,
        );
        gauge(
            "noduled_mqtt_connected",
            "1 when connected to the broker.",
            self.mqtt_connected.load(Ordering::Relaxed) as u64,
        );
        gauge(
            "noduled_ready",
            "1 when ready to take jobs.",
            gauges.ready as u64,
        );
        let _ = writeln!(
            s,
            "# HELP noduled_model_info The model in use.\n# TYPE noduled_model_info gauge\nnoduled_model_info{{id=\"{}\",version=\"{}\",precision=\"{}\",backend=\"{}\"}} 1",
            esc(&gauges.model_id),
            esc(&gauges.model_version),
            esc(&gauges.precision),
            esc(&gauges.backend)
        );
        let _ = writeln!(
            s,
            "# HELP noduled_device_fallback 1 when a CUDA build scores on the CPU because no GPU answered.\n# TYPE noduled_device_fallback gauge\nnoduled_device_fallback{{reason=\"{}\"}} {}",
            esc(gauges.fallback.as_deref().unwrap_or("")),
            gauges.fallback.is_some() as u8
        );
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(s, "# HELP noduled_job_latency_seconds Time from taking a job to its result in the outbox.");
        let _ = writeln!(s, "# TYPE noduled_job_latency_seconds histogram");
        for (i, b) in LATENCY_BUCKETS_S.iter().enumerate() {
            let _ = writeln!(
                s,
                "noduled_job_latency_seconds_bucket{{le=\"{b}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            s,
            "noduled_job_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(s, "noduled_job_latency_seconds_sum {}", h.sum);
        let _ = writeln!(s, "noduled_job_latency_seconds_count {}", h.count);
        s
    }
}

/// Values sampled when rendering.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    /// Jobs waiting.
    pub queue_depth: u64,
    /// Results awaiting acknowledgement.
    pub outbox_depth: u64,
    /// Bytes in the outbox.
    pub outbox_bytes: u64,
    /// Unpublished results dropped.
    pub outbox_dropped: u64,
    /// Ready to take jobs.
    pub ready: bool,
    /// Model id.
    pub model_id: String,
    /// Model version ("" when unknown).
    pub model_version: String,
    /// Weight precision.
    pub precision: String,
    /// Backend in use.
    pub backend: String,
    /// Why a CUDA build runs on the CPU, if it does.
    pub fallback: Option<String>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
