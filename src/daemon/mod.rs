//! The daemon: `run(settings, shutdown)` wires a one-way pipeline of stages, each owning
//! what it uses, joined by bounded channels:
//!
//! ```text
//! inputs            series gate      worker                output stage (owns the outbox)
//! inbox (notify) ──┐  Job  ┌──────┐ Job ┌─────────────┐Finished┌──────────────────────────────┐
//! MQTT job topic ──┼─────> │ park │ ──> │ claim, count│ ─────> │ outbox/<result_id>.json       │
//! (any later one) ─┘       │ until│     │ attempt, run│bounded │ done/ | failed/ (+.error.json)│
//!                  bounded │stable│bnd. │ with        │        │ sent/ | refused/ on reports   │
//!                          └──────┘     │ deadline    │        └──────┬───────────────▲───────┘
//!                                       └─────────────┘     ToPublish │  Published    │ (acked,
//!                                                                     ▼  (same channel│  refused)
//!                                                            MQTT publisher: result + alert
//! ```
//! The gate ([`dicom_glue::SeriesGate`]) holds a job naming a received DICOM series until
//! the series is stable, so the worker never waits for one; other jobs pass straight on.
//! [`input`]: the typed [`input::Job`] and channel; [`inbox`], [`mqtt`]: the inputs (the
//! MQTT task is also the publisher: one broker session); [`worker`]: claims, [`ledger`]
//! attempts, runs each job on a job thread within `jobs.timeout_secs`, one batched pass per
//! job; [`output`]: the outbox, job moves, retention, and the publisher's reports;
//! [`disk`]: full-disk retries; [`shutdown`]: one signal and the drain.
//!
//! Shared: only [`telemetry::Telemetry`], one `Arc` of counters and gauges (atomics, like
//! the metric handles of vector or a prometheus-client registry) into which each stage
//! writes the values it owns and which `/metrics`, `/readyz` and the MQTT status read; no
//! stage decides anything from another stage's values (readiness is derived there).
//!
//! Durability: a job is a file from the moment it is accepted (inbox rename, or MQTT payload
//! written before its PUBACK); a result is a file before it is published and leaves the
//! outbox only after the broker's PUBACK. After a crash, jobs left in `processing/` run
//! again (at most `jobs.max_attempts` attempts) and produce the same `result_id`.
//!
//! Shutdown (the injected future, SIGTERM in `noduled run`): inputs stop taking jobs, the
//! worker stops at the job's next stage boundary (the job stays in `processing/`; a job
//! stuck in a read is left after `shutdown_timeout_secs / 2`), the output stage writes what
//! it holds, then the MQTT client reports its last acknowledgements, publishes a `stopped`
//! status and disconnects; `shutdown_timeout_secs` bounds the wait.

pub mod dicom_glue;
pub mod disk;
pub mod health;
pub mod inbox;
pub mod input;
pub mod job;
pub mod ledger;
pub mod mqtt;
pub mod outbox;
pub mod output;
pub mod shutdown;
pub mod systemd;
pub mod telemetry;
pub mod worker;

use crate::config::Settings;
use crate::engine::Scorer;
use crate::nodule::{NoduleInput, Planes01, N_PLANES, PLANE_SIDE};
use inbox::Inbox;
use input::{Job, JobSender, Origin};
use ledger::Ledger;
use outbox::Outbox;
use shutdown::{DoneGuard, Shutdown};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use telemetry::{State, Telemetry};

/// Jobs the channel between the inputs and the worker holds.
pub const JOB_CHANNEL_CAPACITY: usize = 64;

/// Messages (finished jobs, publisher reports) the channel into the output stage holds.
pub const OUTPUT_CHANNEL_CAPACITY: usize = 16;

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
    #[error("model {path}")]
    Model {
        /// The model path.
        path: String,
        /// Why.
        source: ModelError,
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
    /// A stage's thread could not be started.
    #[error("starting the {stage} thread: {source}")]
    Thread {
        /// The stage.
        stage: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a model was not taken into service, at start or on a reload (the path is the
/// caller's context: [`DaemonError::Model`], the reload's log line).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The loader refused it (files, signature, integrity).
    #[error("loading")]
    Load(#[source] anyhow::Error),
    /// The synthetic self-test input could not be built.
    #[error("self-test input: {0}")]
    SelfTestInput(String),
    /// The model returned an error on the self-test input.
    #[error("self-test")]
    SelfTestScore(#[source] anyhow::Error),
    /// The model panicked on the self-test input.
    #[error("self-test: the model panicked")]
    SelfTestPanicked,
    /// The self-test's outputs are out of range.
    #[error("self-test: {0}")]
    SelfTestOutputs(&'static str),
    /// The bundle's golden input did not give its recorded values.
    #[error("bundle self-test")]
    Golden(#[source] anyhow::Error),
    /// The anti-rollback floor refused its version.
    #[error("{0}")]
    Rollback(String),
    /// The loading task ended abnormally.
    #[error("loading task")]
    Task(#[source] tokio::task::JoinError),
}

/// An error with its sources on one line ("model /m: loading: manifest.json: ..."), for
/// log fields and status reasons.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s.replace('\n', " ")
}

/// Loads a model from a path, with the signature checked when a key is given;
/// `engine::load_verified` in the daemon, injectable for tests.
pub type ModelLoader =
    fn(&Path, Option<&crate::bundle::sign::PublicKey>) -> anyhow::Result<Arc<dyn Scorer>>;

/// Loads a model and runs its self-test: nine synthetic planes (a bright disc on lung-dark
/// background) must give finite probabilities in [0, 1] and attention summing to 1.
/// With `public_key`, the model must be a bundle signed with it (checked before loading).
pub fn load_checked(
    loader: ModelLoader,
    path: &Path,
    public_key: Option<&crate::bundle::sign::PublicKey>,
    state_dir: &Path,
) -> Result<Arc<dyn Scorer>, ModelError> {
    let scorer = loader(path, public_key).map_err(ModelError::Load)?;
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
        planes: Planes01::new(planes).map_err(ModelError::SelfTestInput)?,
        source: serde_json::Value::Null,
        label: None,
    };
    let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scorer.score(&[input])))
        .map_err(|_| ModelError::SelfTestPanicked)?
        .map_err(ModelError::SelfTestScore)?;
    let n = report
        .nodules
        .first()
        .ok_or(ModelError::SelfTestOutputs("no nodule in the report"))?;
    let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
    let folds_ok = !n.folds.is_empty()
        && n.folds.iter().all(|f| {
            unit(f.prob)
                && unit(f.calibrated)
                && (f.attention.iter().sum::<f64>() - 1.0).abs() < 1e-3
        });
    if !folds_ok || !unit(n.score.calibrated) || !unit(n.score.raw) {
        return Err(ModelError::SelfTestOutputs(
            "outputs not finite probabilities (or attention does not sum to 1)",
        ));
    }
    // A bundle also carries a golden input recorded at convert time (from the verified
    // mapping), checked at start and on reload alike.
    scorer.golden_check().map_err(ModelError::Golden)?;
    let info = scorer.model_info();
    if let Some(v) = info.version {
        crate::bundle::rollback::admit(state_dir, path, &info.id, v)
            .map_err(ModelError::Rollback)?;
    }
    Ok(scorer)
}

/// Runs the daemon until `shutdown` resolves, loading the model with
/// [`crate::engine::load_verified`].
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    run_with(settings, crate::engine::load_verified, shutdown).await
}

/// The folders the stages work in, opened (created) once at start (the outbox is the
/// output stage's own: [`open_stores`] returns it beside).
struct Stores {
    intake: Inbox,
    ledger: Ledger,
    spool: PathBuf,
    inbox_dir: PathBuf,
}

fn folder_err(p: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Folder {
        path: p.display().to_string(),
        source,
    }
}

fn open_stores(settings: &Settings) -> Result<(Stores, Outbox), DaemonError> {
    let spool = settings.state_dir.join("spool");
    std::fs::create_dir_all(&spool).map_err(folder_err(&spool))?;
    let inbox_dir = settings
        .inbox
        .clone()
        .unwrap_or_else(|| settings.state_dir.join("inbox"));
    let intake = Inbox::open(&inbox_dir, &settings.state_dir).map_err(folder_err(&inbox_dir))?;
    let ledger = Ledger::open(&settings.state_dir).map_err(folder_err(&settings.state_dir))?;
    let outbox = Outbox::open(
        &settings.outbox,
        settings.outbox_max_age,
        settings.outbox_max_bytes,
    )
    .map_err(folder_err(&settings.outbox))?;
    let spool = spool.canonicalize().unwrap_or(spool);
    let stores = Stores {
        intake,
        ledger,
        spool,
        inbox_dir,
    };
    Ok((stores, outbox))
}

/// Opens the device, loads and self-tests the model (off the async threads).
async fn load_model(
    settings: &Settings,
    loader: ModelLoader,
) -> Result<Arc<dyn Scorer>, DaemonError> {
    let model_err = |source| DaemonError::Model {
        path: settings.model_path.display().to_string(),
        source,
    };
    let join_err = |e| model_err(ModelError::Task(e));
    systemd::status("opening the compute device");
    let (device, dtype) = (settings.device, settings.dtype);
    tokio::task::spawn_blocking(move || crate::device::init(device, dtype))
        .await
        .map_err(join_err)??;
    systemd::status("loading model");
    let (path, key) = (
        settings.model_path.clone(),
        settings.model_public_key.clone(),
    );
    let state_dir = settings.state_dir.clone();
    let t = Instant::now();
    let scorer =
        tokio::task::spawn_blocking(move || load_checked(loader, &path, key.as_ref(), &state_dir))
            .await
            .map_err(join_err)?
            .map_err(model_err)?;
    let info = scorer.model_info();
    tracing::info!(model = %info.id, version = ?info.version, backend = %info.backend, ms = t.elapsed().as_millis() as u64, "model loaded and self-tested");
    Ok(scorer)
}

fn worker_limits(
    settings: &Settings,
    st: &Stores,
    dicom: &Arc<dicom_glue::DicomSide>,
) -> Result<worker::Limits, DaemonError> {
    let mut roots: Vec<PathBuf> = settings.data_roots.clone();
    for extra in [&st.inbox_dir, &st.spool, &dicom.store.root().to_path_buf()] {
        roots.push(extra.canonicalize().unwrap_or_else(|_| extra.clone()));
    }
    let opener =
        crate::confine::Opener::confined(&roots).map_err(|source| DaemonError::Folder {
            path: "jobs.data_roots".into(),
            source,
        })?;
    Ok(worker::Limits {
        policy: job::PathPolicy {
            roots,
            relative_base: settings.inbox.as_ref().map(|_| st.inbox_dir.clone()),
            spool: st.spool.clone(),
            opener: Arc::new(opener),
            own_spool: None,
        },
        max_job_bytes: settings.max_job_bytes,
        max_nodules: settings.max_nodules,
        alert_threshold: settings.alert_threshold,
        timeout: settings.job_timeout,
        max_attempts: settings.max_attempts,
        stop_grace: settings.shutdown_timeout / 2,
        dicom: dicom.clone(),
    })
}

/// Sends the jobs already on disk: interrupted ones first, then stored MQTT jobs, then the
/// inbox (on its own thread: the channel is bounded and the worker may be busy).
fn scan_at_start(st: &Stores, tx: JobSender, with_inbox: bool) {
    let (intake, ledger) = (st.intake.clone(), st.ledger.clone());
    let _ = std::thread::Builder::new()
        .name("noduled-scan".into())
        .spawn(move || {
            for p in Inbox::list(&intake.processing) {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let origin = ledger
                    .attempts(&name)
                    .map(|a| a.origin)
                    .unwrap_or(Origin::Inbox);
                tx.send(Job::new(p, origin));
            }
            for p in Inbox::list(&intake.mqtt_jobs) {
                tx.send(Job::new(p, Origin::Mqtt));
            }
            if with_inbox {
                for p in Inbox::list(&intake.dir) {
                    tx.send(Job::new(p, Origin::Inbox));
                }
            }
        });
}

fn spawn_stage(
    stage: &'static str,
    guard: DoneGuard,
    f: impl FnOnce() + Send + 'static,
) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name(format!("noduled-{stage}"))
        .spawn(move || {
            f();
            drop(guard);
        })
        .map(|_| ())
        .map_err(|source| DaemonError::Thread { stage, source })
}

/// [`run`] with the model loader given.
pub async fn run_with(
    settings: Settings,
    loader: ModelLoader,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&settings.state_dir).map_err(folder_err(&settings.state_dir))?;
    let (st, outbox) = open_stores(&settings)?;
    let dicom = dicom_glue::DicomSide::start(&settings).map_err(|source| DaemonError::Listen {
        addr: format!("dicom.listen {:?}", settings.dicom.listen),
        source,
    })?;
    let dicom = Arc::new(dicom);
    let scorer = load_model(&settings, loader).await?;
    let telemetry = Arc::new(Telemetry::new(
        scorer.model_info(),
        settings.job_timeout,
        (
            settings.outbox_max_bytes,
            settings.outbox_max_age.as_secs() / 3600,
        ),
    ));
    let _ = telemetry.dicom.set(dicom.clone());
    remove_stale_tmp(&settings, &st, &outbox, &telemetry);

    let stop = Shutdown::default();
    let (guard, drain) = shutdown::drain();
    let (jobs_tx, jobs_rx) = input::channel(JOB_CHANNEL_CAPACITY, telemetry.clone());
    let (gated_tx, gated_rx) = input::channel(JOB_CHANNEL_CAPACITY, telemetry.clone());
    let (models_tx, models_rx) = std::sync::mpsc::channel();
    let stage = Stage {
        settings: &settings,
        st: &st,
        telemetry: &telemetry,
        dicom: &dicom,
        stop: &stop,
        guard: &guard,
    };
    let mqtt_link = stage.start_pipeline(outbox, scorer, jobs_rx, models_rx)?;
    stage.start_series_gate(gated_rx, jobs_tx)?;
    let watcher = start_inputs(
        &settings, &st, &gated_tx, &telemetry, &stop, mqtt_link, &guard,
    )?;
    scan_at_start(&st, gated_tx, settings.inbox.is_some());
    let health = start_health(&settings, &telemetry).await?;

    telemetry.set_state(State::Ready);
    let info = telemetry.model();
    let ready_line = format!("ready: model {} on {}", info.id, info.backend);
    systemd::ready(&ready_line);
    tracing::info!(
        queue = telemetry.queue_depth.load(Ordering::Relaxed),
        "{ready_line}"
    );

    serve_signals(&settings, loader, &telemetry, &models_tx, shutdown).await;

    tracing::info!("stopping: finishing the job in hand");
    telemetry.set_state(State::Stopping);
    systemd::stopping();
    stop.signal();
    dicom.stop();
    drop(guard);
    if !drain.wait(settings.shutdown_timeout).await {
        tracing::warn!(
            secs = settings.shutdown_timeout.as_secs(),
            "a stage was still busy at the shutdown deadline; its job stays in processing/"
        );
    }
    drop(watcher);
    stop_health(health).await;
    tracing::info!("stopped");
    Ok(())
}

/// Removes the temporary files a crash left in the daemon's folders, counted.
fn remove_stale_tmp(settings: &Settings, st: &Stores, outbox: &Outbox, telemetry: &Telemetry) {
    let mut tmp_dirs: Vec<&Path> = outbox.dirs().to_vec();
    let i = &st.intake;
    tmp_dirs.extend([
        settings.state_dir.as_path(),
        &st.spool,
        &i.processing,
        &i.done,
        &i.failed,
        &i.mqtt_jobs,
    ]);
    tmp_dirs.extend(st.ledger.dirs());
    let stale = disk::remove_stale_tmp(&tmp_dirs);
    telemetry.stale_tmp_removed.store(stale, Ordering::Relaxed);
}

/// What starting a stage needs (borrowed from [`run_with`]).
struct Stage<'a> {
    settings: &'a Settings,
    st: &'a Stores,
    telemetry: &'a Arc<Telemetry>,
    dicom: &'a Arc<dicom_glue::DicomSide>,
    stop: &'a Shutdown,
    guard: &'a DoneGuard,
}

impl Stage<'_> {
    /// Starts the output stage (owning the outbox) and the worker; returns the MQTT
    /// publisher's links to the output stage, when MQTT is on.
    fn start_pipeline(
        &self,
        outbox: Outbox,
        scorer: Arc<dyn Scorer>,
        jobs_rx: input::JobReceiver,
        models_rx: std::sync::mpsc::Receiver<Arc<dyn Scorer>>,
    ) -> Result<Option<MqttLink>, DaemonError> {
        let (settings, st, telemetry, dicom, stop, guard) = (
            self.settings,
            self.st,
            self.telemetry,
            self.dicom,
            self.stop,
            self.guard,
        );
        let (out_tx, out_rx) = std::sync::mpsc::sync_channel(OUTPUT_CHANNEL_CAPACITY);
        let (publisher, mqtt_link) = publisher_link(settings, &out_tx);
        let out = output::Output {
            rx: out_rx,
            outbox,
            publisher,
            intake: st.intake.clone(),
            ledger: st.ledger.clone(),
            retention: output::Retention {
                max_age: settings.retention_max_age,
                max_bytes: settings.retention_max_bytes,
            },
            telemetry: telemetry.clone(),
            stop: stop.flag(),
            dicom: dicom.clone(),
        };
        spawn_stage("output", guard.clone(), move || out.run())?;
        let w = worker::Worker {
            jobs: jobs_rx,
            out: out_tx,
            models: models_rx,
            scorer,
            intake: st.intake.clone(),
            ledger: st.ledger.clone(),
            limits: Arc::new(worker_limits(settings, st, dicom)?),
            telemetry: telemetry.clone(),
            watchdog: Arc::new(systemd::Watchdog::from_env()),
            stop: stop.flag(),
            job_threads: Arc::default(),
        };
        spawn_stage("worker", guard.clone(), move || w.run())?;

        Ok(mqtt_link)
    }

    /// Starts the series gate between the inputs (`gated_rx`) and the worker (`worker`): it
    /// holds a job naming a received DICOM series until the series is stable.
    fn start_series_gate(
        &self,
        gated_rx: input::JobReceiver,
        worker: JobSender,
    ) -> Result<(), DaemonError> {
        let gate = dicom_glue::SeriesGate {
            jobs: gated_rx,
            worker,
            side: self.dicom.clone(),
            max_job_bytes: self.settings.max_job_bytes,
            stop: self.stop.flag(),
        };
        spawn_stage("series-gate", self.guard.clone(), move || gate.run())
    }
}

/// The MQTT publisher's ends of its links with the output stage.
struct MqttLink {
    results: tokio::sync::mpsc::UnboundedReceiver<output::ToPublish>,
    out: std::sync::mpsc::SyncSender<output::ToOutput>,
    drained: tokio::sync::watch::Receiver<bool>,
}

/// The links between the output stage and the MQTT publisher, when MQTT is on.
fn publisher_link(
    settings: &Settings,
    out: &std::sync::mpsc::SyncSender<output::ToOutput>,
) -> (Option<output::PublisherLink>, Option<MqttLink>) {
    if settings.mqtt.is_none() {
        return (None, None);
    }
    let (results_tx, results) = tokio::sync::mpsc::unbounded_channel();
    let (drained_tx, drained) = tokio::sync::watch::channel(false);
    let link = output::PublisherLink {
        results: results_tx,
        drained: shutdown::SetOnDrop(drained_tx),
    };
    let mqtt = MqttLink {
        results,
        out: out.clone(),
        drained,
    };
    (Some(link), Some(mqtt))
}

/// Starts the inbox watcher (returned: keep it alive) and the MQTT client.
fn start_inputs(
    settings: &Settings,
    st: &Stores,
    jobs: &JobSender,
    telemetry: &Arc<Telemetry>,
    stop: &Shutdown,
    link: Option<MqttLink>,
    guard: &DoneGuard,
) -> Result<Option<notify::RecommendedWatcher>, DaemonError> {
    let watcher = match &settings.inbox {
        Some(dir) => Some(
            st.intake
                .watch(jobs.clone())
                .map_err(|e| DaemonError::Watch {
                    path: dir.display().to_string(),
                    msg: e.to_string(),
                })?,
        ),
        None => None,
    };
    if let (Some(m), Some(link)) = (settings.mqtt.clone(), link) {
        let i = &st.intake;
        let client = mqtt::Mqtt {
            settings: m,
            max_publish_attempts: settings.max_publish_attempts,
            results: Some(link.results),
            out: link.out,
            store: mqtt::JobStore {
                dir: i.mqtt_jobs.clone(),
                seen_in: vec![i.processing.clone(), i.done.clone(), i.failed.clone()],
                spool: st.spool.clone(),
            },
            jobs: jobs.clone(),
            telemetry: telemetry.clone(),
            shutdown: stop.subscribe(),
            drained: link.drained,
        };
        let guard = guard.clone();
        tokio::spawn(async move {
            client.run().await;
            drop(guard);
        });
    }
    Ok(watcher)
}

type HealthTask = (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
);

async fn stop_health(health: Option<HealthTask>) {
    if let Some((tx, task)) = health {
        let _ = tx.send(true);
        let _ = task.await;
    }
}

async fn start_health(
    settings: &Settings,
    telemetry: &Arc<Telemetry>,
) -> Result<Option<HealthTask>, DaemonError> {
    let Some(addr) = settings.health else {
        return Ok(None);
    };
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
    if let Err(e) = outbox::write_atomic(&settings.state_dir.join("health.addr"), bound.as_bytes())
    {
        tracing::warn!(error = %e, "could not write health.addr");
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    Ok(Some((
        tx,
        tokio::spawn(health::serve(listener, telemetry.clone(), rx)),
    )))
}

/// Waits for `shutdown`, reloading the model on each SIGHUP meanwhile.
async fn serve_signals(
    settings: &Settings,
    loader: ModelLoader,
    telemetry: &Telemetry,
    models: &std::sync::mpsc::Sender<Arc<dyn Scorer>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                reload(settings, loader, telemetry, models).await;
            }
        }
    }
}

/// SIGHUP: load the model the config points to, self-test it, hand it to the worker; keep
/// the old one when anything fails. The outcome goes to status, `/healthz` and `/metrics`.
async fn reload(
    settings: &Settings,
    loader: ModelLoader,
    telemetry: &Telemetry,
    models: &std::sync::mpsc::Sender<Arc<dyn Scorer>>,
) {
    telemetry.set_state(State::Reloading);
    systemd::reloading();
    let (path, key) = (
        settings.model_path.clone(),
        settings.model_public_key.clone(),
    );
    tracing::info!(model = %path.display(), "reloading the model");
    let state_dir = settings.state_dir.clone();
    let loaded =
        tokio::task::spawn_blocking(move || load_checked(loader, &path, key.as_ref(), &state_dir))
            .await
            .map_err(ModelError::Task)
            .and_then(|r| r);
    let outcome = match loaded {
        Ok(scorer) => {
            let info = scorer.model_info();
            telemetry.set_model(info.clone());
            let _ = models.send(scorer);
            telemetry.reloaded(None);
            Ok(info)
        }
        Err(e) => {
            let reason = one_line(&e);
            telemetry.reloaded(Some(reason.clone()));
            Err(reason)
        }
    };
    // Ready before the outcome is logged: whoever reads the log line and then asks
    // `/readyz` sees the state that follows it.
    telemetry.set_state(State::Ready);
    match outcome {
        Ok(info) => tracing::info!(model = %info.id, version = ?info.version, "model reloaded"),
        Err(reason) => {
            tracing::error!(model = %settings.model_path.display(), error = %reason, "reload failed; keeping the current model")
        }
    }
    let info = telemetry.model();
    systemd::ready(&format!("ready: model {} on {}", info.id, info.backend));
}
