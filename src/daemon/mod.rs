//! The daemon: `run(settings, shutdown)` wires the sources (inbox folder, MQTT job topic)
//! through one worker to the outbox and the MQTT results, with systemd notify, a health
//! endpoint and SIGHUP model reloads.
//!
//! ```text
//! inbox (notify) ─┐                                   ┌─> outbox/<result_id>.json ─> MQTT <prefix>/result/<pid>
//! MQTT job topic ─┴─> job files ─> JobQueue ─> worker ┤                               (+ <prefix>/alert)
//!   (stored, then acked)                              └─> done/ | failed/ (+ .error.json)
//! ```
//! Durability: a job is a file from the moment it is accepted (inbox rename, or MQTT payload
//! written before its PUBACK); a result is a file before it is published and leaves the
//! outbox only after the broker's PUBACK. After a crash, jobs left in `processing/` run
//! again and produce the same `result_id`.
//!
//! Shutdown (the injected future, SIGTERM in `noduled run`): the worker finishes the
//! nodule in hand and stops; the MQTT client publishes a `stopped` status and disconnects
//! cleanly; `shutdown_timeout_secs` bounds the wait.

pub mod dicom_glue;
pub mod health;
pub mod inbox;
pub mod job;
pub mod metrics;
pub mod mqtt;
pub mod outbox;
pub mod systemd;
pub mod worker;

use crate::config::Settings;
use crate::engine::Scorer;
use crate::nodule::{NoduleInput, Planes01, N_PLANES, PLANE_SIDE};
use inbox::{Inbox, JobQueue};
use metrics::{Gauges, Metrics};
use outbox::Outbox;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Errors that stop the daemon (startup and configuration); a failing job never does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// A state folder could not be created.
    #[error("{path}: {source}")]
    Folder {
        /// The folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The model could not be loaded or failed its self-test.
    #[error("model {path}: {msg}")]
    Model {
        /// The model path.
        path: String,
        /// Why.
        msg: String,
    },
    /// The inbox could not be watched.
    #[error("inbox {path}: {msg}")]
    Watch {
        /// The inbox.
        path: String,
        /// Why.
        msg: String,
    },
    /// The configured compute device is not available.
    #[error("model.device")]
    Device(#[from] crate::device::DeviceError),
    /// The health endpoint could not listen.
    #[error("health.listen {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Loads a model from a path; `engine::load` in the daemon, injectable for tests.
pub type ModelLoader = fn(&Path) -> anyhow::Result<Arc<dyn Scorer>>;

/// State shared by the daemon's tasks.
pub struct Shared {
    /// The settings.
    pub settings: Settings,
    /// Jobs waiting for the worker.
    pub queue: Arc<JobQueue>,
    /// The inbox and the state folders jobs move through.
    pub intake: Inbox,
    /// Where inline crops are written.
    pub spool: PathBuf,
    /// Results.
    pub outbox: Outbox,
    /// Counters.
    pub metrics: Metrics,
    /// Set on shutdown: the worker stops after the nodule in hand.
    pub stop: AtomicBool,
    /// Wakes the MQTT task when a result was written.
    pub outbox_changed: tokio::sync::Notify,
    /// Wakes the MQTT task when the status may have changed.
    pub status_changed: tokio::sync::Notify,
    /// When the daemon started (RFC 3339).
    pub started_at: String,
    /// Received DICOM series and the receiver.
    pub dicom: dicom_glue::DicomSide,
    model: RwLock<Arc<dyn Scorer>>,
    state: Mutex<&'static str>,
    heartbeat: Mutex<Instant>,
}

impl Shared {
    /// The model in use (a reload swaps it; jobs in hand keep theirs).
    pub fn scorer(&self) -> Arc<dyn Scorer> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// "starting", "ready", "reloading", "stopping".
    pub fn state(&self) -> &'static str {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, s: &'static str) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
        self.status_changed.notify_one();
    }

    /// Records that the worker loop is alive.
    pub fn beat(&self) {
        *self.heartbeat.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Whether the worker loop ran recently (within 10 minutes: one long job may take a while).
    pub fn worker_alive(&self) -> bool {
        self.heartbeat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            < Duration::from_secs(600)
    }

    /// Values for `/metrics`.
    pub fn gauges(&self) -> Gauges {
        let info = self.scorer().model_info();
        let ob = self.outbox.stats();
        Gauges {
            queue_depth: self.queue.len() as u64,
            outbox_depth: ob.depth,
            outbox_bytes: ob.bytes,
            outbox_dropped: ob.dropped,
            ready: self.state() == "ready",
            model_id: info.id,
            model_version: info.version.map(|v| v.to_string()).unwrap_or_default(),
            precision: info.precision,
            backend: info.backend,
            fallback: info.fallback,
        }
    }

    /// The retained status message.
    pub fn status_json(&self) -> serde_json::Value {
        let info = self.scorer().model_info();
        serde_json::json!({
            "state": self.state(),
            "backend": info.backend,
            "fallback": info.fallback,
            "model": {"id": info.id, "version": info.version, "precision": info.precision},
            "queue_depth": self.queue.len(),
            "outbox": self.outbox.stats(),
            "jobs_done": self.metrics.jobs_done.load(Ordering::Relaxed),
            "jobs_failed": self.metrics.jobs_failed.load(Ordering::Relaxed),
            "started_at": self.started_at,
            "pid": std::process::id(),
            "noduled_version": env!("CARGO_PKG_VERSION"),
        })
    }
}

/// Loads a model and runs its self-test: nine synthetic planes (a bright disc on lung-dark
/// background) must give finite probabilities in [0, 1] and attention summing to 1.
/// With `public_key`, the model must be a bundle signed with it (checked before loading).
pub fn load_checked(
    loader: ModelLoader,
    path: &Path,
    public_key: Option<&crate::bundle::sign::PublicKey>,
) -> Result<Arc<dyn Scorer>, DaemonError> {
    let err = |msg: String| DaemonError::Model {
        path: path.display().to_string(),
        msg,
    };
    if public_key.is_some() {
        crate::engine::verify_signed(path, public_key).map_err(|e| err(format!("{e:#}")))?;
    }
    let scorer = loader(path).map_err(|e| err(format!("{e:#}")))?;
    let mut planes = vec![0.1f32; N_PLANES * PLANE_SIDE * PLANE_SIDE];
    let c = PLANE_SIDE as f32 / 2.0;
    for (i, v) in planes.iter_mut().enumerate() {
        let (y, x) = (
            ((i / PLANE_SIDE) % PLANE_SIDE) as f32,
            (i % PLANE_SIDE) as f32,
        );
        if (y - c).powi(2) + (x - c).powi(2) < 400.0 {
            *v = 0.7;
        }
    }
    let input = NoduleInput {
        patient_id: "self-test".into(),
        nodule_id: "self-test".into(),
        planes: Planes01::new(planes).map_err(err)?,
        source: serde_json::Value::Null,
        label: None,
    };
    let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scorer.score(&[input])))
        .map_err(|_| err("self-test: the model panicked".into()))?
        .map_err(|e| err(format!("self-test: {e:#}")))?;
    let n = report
        .nodules
        .first()
        .ok_or_else(|| err("self-test: no nodule in the report".into()))?;
    let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
    let folds_ok = !n.folds.is_empty()
        && n.folds.iter().all(|f| {
            unit(f.prob)
                && unit(f.calibrated)
                && (f.attention.iter().sum::<f64>() - 1.0).abs() < 1e-3
        });
    if !folds_ok || !unit(n.score.calibrated) || !unit(n.score.raw) {
        return Err(err(
            "self-test: outputs not finite probabilities (or attention does not sum to 1)".into(),
        ));
    }
    Ok(scorer)
}

/// Runs the daemon until `shutdown` resolves, loading the model with [`crate::engine::load`].
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    run_with(settings, crate::engine::load, shutdown).await
}

/// [`run`] with the model loader given.
pub async fn run_with(
    settings: Settings,
    loader: ModelLoader,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let folder = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| DaemonError::Folder {
            path: p.display().to_string(),
            source,
        })
    };
    folder(&settings.state_dir)?;
    let spool = settings.state_dir.join("spool");
    folder(&spool)?;
    let inbox_dir = settings
        .inbox
        .clone()
        .unwrap_or_else(|| settings.state_dir.join("inbox"));
    let intake =
        Inbox::open(&inbox_dir, &settings.state_dir).map_err(|source| DaemonError::Folder {
            path: inbox_dir.display().to_string(),
            source,
        })?;
    let outbox = Outbox::open(
        &settings.outbox,
        settings.outbox_max_age,
        settings.outbox_max_bytes,
    )
    .map_err(|source| DaemonError::Folder {
        path: settings.outbox.display().to_string(),
        source,
    })?;

    systemd::status("opening the compute device");
    let (device, dtype) = (settings.device, settings.dtype);
    tokio::task::spawn_blocking(move || crate::device::init(device, dtype))
        .await
        .map_err(|e| DaemonError::Model {
            path: settings.model_path.display().to_string(),
            msg: e.to_string(),
        })??;
    systemd::status("loading model");
    let model_path = settings.model_path.clone();
    let model_key = settings.model_public_key.clone();
    let t = Instant::now();
    let scorer =
        tokio::task::spawn_blocking(move || load_checked(loader, &model_path, model_key.as_ref()))
            .await
            .map_err(|e| DaemonError::Model {
                path: settings.model_path.display().to_string(),
                msg: e.to_string(),
            })??;
    let info = scorer.model_info();
    tracing::info!(model = %info.id, version = ?info.version, backend = %info.backend, ms = t.elapsed().as_millis() as u64, "model loaded and self-tested");

    let dicom = dicom_glue::DicomSide::start(&settings).map_err(|source| DaemonError::Listen {
        addr: format!("dicom.listen {:?}", settings.dicom.listen),
        source,
    })?;
    let mut roots: Vec<PathBuf> = settings.data_roots.clone();
    for extra in [&inbox_dir, &spool, &dicom.store.root().to_path_buf()] {
        roots.push(extra.canonicalize().unwrap_or_else(|_| extra.clone()));
    }
    let spool = spool.canonicalize().unwrap_or(spool);
    let policy = job::PathPolicy {
        roots,
        relative_base: settings.inbox.as_ref().map(|_| inbox_dir.clone()),
        spool: spool.clone(),
    };

    let shared = Arc::new(Shared {
        queue: Arc::new(JobQueue::default()),
        intake,
        spool,
        outbox,
        metrics: Metrics::default(),
        stop: AtomicBool::new(false),
        outbox_changed: tokio::sync::Notify::new(),
        status_changed: tokio::sync::Notify::new(),
        started_at: job::now_rfc3339(),
        dicom,
        model: RwLock::new(scorer),
        state: Mutex::new("starting"),
        heartbeat: Mutex::new(Instant::now()),
        settings,
    });

    // Sources: jobs interrupted last time first, then stored MQTT jobs, then the inbox.
    let _watcher = match &shared.settings.inbox {
        Some(dir) => {
            Some(
                shared
                    .intake
                    .watch(shared.queue.clone())
                    .map_err(|e| DaemonError::Watch {
                        path: dir.display().to_string(),
                        msg: e.to_string(),
                    })?,
            )
        }
        None => None,
    };
    for dir in [&shared.intake.processing, &shared.intake.mqtt_jobs] {
        for p in Inbox::list(dir) {
            shared.queue.push(p);
        }
    }
    if shared.settings.inbox.is_some() {
        for p in Inbox::list(&shared.intake.dir) {
            shared.queue.push(p);
        }
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let health = match shared.settings.health {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Listen {
                    addr: addr.to_string(),
                    source,
                })?;
            let bound = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(addr = %bound, "health endpoint listening");
            write_marker(&shared.settings.state_dir, "health.addr", &bound);
            Some(tokio::spawn(health::serve(
                listener,
                shared.clone(),
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    let (mqtt_stop_tx, mqtt_stop_rx) = tokio::sync::watch::channel(false);
    let mqtt = shared
        .settings
        .mqtt
        .clone()
        .map(|m| tokio::spawn(mqtt::run(shared.clone(), m, mqtt_stop_rx)));

    let watchdog = Arc::new(systemd::Watchdog::from_env());
    let worker = {
        let (shared, policy, watchdog) = (shared.clone(), policy, watchdog.clone());
        std::thread::Builder::new()
            .name("noduled-worker".into())
            .spawn(move || worker::run(shared, policy, watchdog))
            .map_err(|source| DaemonError::Folder {
                path: "worker thread".into(),
                source,
            })?
    };

    shared.set_state("ready");
    let ready_line = format!("ready: model {} on {}", info.id, info.backend);
    systemd::ready(&ready_line);
    tracing::info!(queue = shared.queue.len(), "{ready_line}");

    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                reload(&shared, loader).await;
            }
        }
    }

    tracing::info!("stopping: finishing the nodule in hand");
    shared.set_state("stopping");
    systemd::stopping();
    shared.stop.store(true, Ordering::SeqCst);
    shared.dicom.stop();
    shared.queue.close();
    let deadline = shared.settings.shutdown_timeout;
    let joined =
        tokio::time::timeout(deadline, tokio::task::spawn_blocking(move || worker.join())).await;
    if joined.is_err() {
        tracing::warn!(
            secs = deadline.as_secs(),
            "worker still busy at the shutdown deadline; its job stays in processing/"
        );
    }
    let _ = mqtt_stop_tx.send(true);
    if let Some(m) = mqtt {
        let _ = tokio::time::timeout(Duration::from_secs(5), m).await;
    }
    let _ = stop_tx.send(true);
    if let Some(h) = health {
        let _ = h.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: load the model the config points to, self-test it, swap it in; keep the old one
/// when anything fails.
async fn reload(shared: &Arc<Shared>, loader: ModelLoader) {
    shared.set_state("reloading");
    systemd::reloading();
    let path = shared.settings.model_path.clone();
    let key = shared.settings.model_public_key.clone();
    tracing::info!(model = %path.display(), "reloading the model");
    let loaded = tokio::task::spawn_blocking(move || {
        let scorer = load_checked(loader, &path, key.as_ref())?;
        // A bundle also carries a golden input recorded at convert time: check it too.
        if path.join(crate::bundle::MANIFEST).exists() {
            crate::engine::self_test(&path).map_err(|e| DaemonError::Model {
                path: path.display().to_string(),
                msg: format!("bundle self-test: {e:#}"),
            })?;
        }
        Ok::<_, DaemonError>(scorer)
    })
    .await;
    match loaded {
        Ok(Ok(scorer)) => {
            let info = scorer.model_info();
            *shared.model.write().unwrap_or_else(|e| e.into_inner()) = scorer;
            tracing::info!(model = %info.id, version = ?info.version, "model reloaded");
        }
        Ok(Err(e)) => tracing::error!(error = %e, "reload failed; keeping the current model"),
        Err(e) => tracing::error!(error = %e, "reload failed; keeping the current model"),
    }
    shared.set_state("ready");
    let info = shared.scorer().model_info();
    systemd::ready(&format!("ready: model {} on {}", info.id, info.backend));
}

fn write_marker(dir: &Path, name: &str, text: &str) {
    if let Err(e) = outbox::write_atomic(&dir.join(name), text.as_bytes()) {
        tracing::warn!(error = %e, "could not write {name}");
    }
}
