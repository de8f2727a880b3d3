//! MQTT in and out over one connection (rumqttc, MQTT 5, QoS 1, persistent session).
//!
//! In (an input): job payloads on the job topic are written durably as job files
//! (`state_dir/mqtt-jobs/`) and only then acknowledged (manual acks), so a crash between
//! receipt and the file loses nothing: the broker redelivers. A payload is job JSON, or job
//! JSON, one NUL byte, then the crop file's bytes. Files are named after a hash of the
//! payload, so a redelivered job is not queued twice. When the disk is full the payload is
//! held unacknowledged and stored again every second until it fits (at most
//! [`MAX_UNSTORED`] held; beyond that the connection is renewed once space returns, so the
//! broker redelivers the rest). The largest packet is announced to the broker (MQTT 5
//! Maximum Packet Size).
//!
//! Out (the publisher of the output stage): the output stage, which owns the outbox, hands
//! over result files ([`ToPublish`], oldest first); they are read (typed, [`JobResult`]) and
//! published, at most `mqtt.max_inflight` at a time, to `mqtt.result_topic` (default
//! `<prefix>/result`; no patient id in topic names), their alert to `<prefix>/alert`. A
//! result is reported sent ([`Published::Sent`]: the output stage moves it to
//! `outbox/sent/`) only once every PUBACK for it (result and alert) arrived on the same
//! attempt, and its parts are queued whole or not at all ([`MAX_QUEUED_PUBLISHES`]). A
//! PUBACK with a failure reason code (an ACL, a quota) frees the slot at once; the result
//! waits a backoff (1 s doubling to 5 min) while the others go on, and after
//! `outbox.max_publish_attempts` refusals it is reported refused ([`Published::Refused`],
//! to `outbox/refused/` with the reason code). An unreadable result is refused at once.
//!
//! Input and publisher share one task and one connection: one client session with the
//! broker (one Last Will, one status), and the job acknowledgements and the results'
//! publishes go through the same request queue, which [`MAX_QUEUED_PUBLISHES`] shares out.
//! rumqttc keeps unacknowledged messages in memory only, so each connection gets a fresh
//! client and whatever was in flight is published again from the outbox (same
//! `result_id`; at least once). The retained `<prefix>/status` is refreshed on change and
//! every `status_interval_secs`; the Last Will sets it to `lost`.
//!
//! PUBACKs are matched to publishes through the order of `Outgoing::Publish(pkid)` events,
//! which follows the order of publish requests on one connection.

use super::input::{Job, JobSender, Origin};
use super::job::{file_safe, JobResult};
use super::outbox::write_atomic;
use super::output::{Published, ToOutput, ToPublish};
use super::telemetry::Telemetry;
use crate::config::MqttSettings;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PubAck, PubAckReason, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::Outgoing;
use sha2::Digest;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most job payloads held in memory while the disk is full.
pub const MAX_UNSTORED: usize = 16;

/// Capacity of the client's request channel (rumqttc's queue between `AsyncClient` and its
/// event loop).
const REQUEST_CAPACITY: usize = 256;

/// Most of our publishes queued in that channel at once (not yet written to the socket):
/// a result is queued only when all its parts (result and alert) fit under this, so the
/// channel never fills between a result and its alert; the other half of the capacity is
/// left for acknowledgements and subscriptions.
const MAX_QUEUED_PUBLISHES: usize = REQUEST_CAPACITY / 2;

/// Where stored MQTT jobs go and what they may hold.
#[derive(Debug, Clone)]
pub struct JobStore {
    /// `state_dir/mqtt-jobs`.
    pub dir: PathBuf,
    /// Folders a job with the same name may already be in (received before).
    pub seen_in: Vec<PathBuf>,
    /// Where binary crops are written.
    pub spool: PathBuf,
}

/// The MQTT client task.
pub struct Mqtt {
    /// Settings.
    pub settings: MqttSettings,
    /// Attempts before a refused result moves to `refused/`.
    pub max_publish_attempts: u32,
    /// Result files to publish, from the output stage (taken by [`Mqtt::run`]).
    pub results: Option<tokio::sync::mpsc::UnboundedReceiver<ToPublish>>,
    /// Reports to the output stage.
    pub out: SyncSender<ToOutput>,
    /// Where jobs are stored.
    pub store: JobStore,
    /// Jobs to the worker.
    pub jobs: JobSender,
    /// Counters.
    pub telemetry: Arc<Telemetry>,
    /// Turns true on shutdown: take no more jobs.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Turns true once the output stage finished: final status, disconnect.
    pub drained: tokio::sync::watch::Receiver<bool>,
}

/// What a publish was for.
#[derive(Debug, Clone)]
enum Tag {
    Status,
    Part { file: PathBuf, attempt: u64 },
}

/// One result being published on this connection.
#[derive(Debug)]
struct InFlight {
    attempt: u64,
    parts_left: usize,
}

/// A result the broker refused: when to try again.
#[derive(Debug, Default)]
struct Backoff {
    refusals: u32,
    next: Option<Instant>,
}

/// Per-connection bookkeeping.
#[derive(Default)]
struct Conn {
    connected: bool,
    awaiting_pkid: VecDeque<Tag>,
    inflight: HashMap<u16, Tag>,
    files: HashMap<PathBuf, InFlight>,
    attempts: u64,
    last_status: String,
}

/// State kept across connections.
#[derive(Default)]
struct Held {
    /// Result files not yet sent or refused, oldest first.
    queue: VecDeque<PathBuf>,
    /// Reports the output stage has not taken yet (its channel was full).
    outcomes: VecDeque<Published>,
    backoff: HashMap<PathBuf, Backoff>,
    unstored: VecDeque<Publish>,
    lost_unstored: bool,
    backlog: VecDeque<Job>,
}

impl Mqtt {
    /// Runs the client until the output stage drained (after shutdown); then publishes a
    /// final `stopped` status, waits briefly for acknowledgements and disconnects cleanly.
    pub async fn run(mut self) {
        let mut held = Held::default();
        let mut results = self.results.take();
        self.serve(&mut held, &mut results).await;
        // The last reports (acknowledgements during the final wait) to the output stage.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !held.outcomes.is_empty() && Instant::now() < deadline {
            self.flush_outcomes(&mut held);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Connects, and reconnects with backoff, until the output stage drained.
    async fn serve(
        &mut self,
        held: &mut Held,
        results: &mut Option<tokio::sync::mpsc::UnboundedReceiver<ToPublish>>,
    ) {
        let mut backoff = Duration::from_millis(500);
        loop {
            if *self.drained.borrow() {
                return;
            }
            let (client, el) = AsyncClient::new(self.options(), REQUEST_CAPACITY);
            let mut events = spawn_poller(el);
            let mut conn = Conn::default();
            let finished = self
                .connection(&client, &mut events, &mut conn, held, results)
                .await;
            let was_connected = conn.connected;
            self.telemetry
                .mqtt_connected
                .store(false, Ordering::Relaxed);
            if finished {
                if was_connected {
                    self.finish(&client, &mut events, &mut conn, held).await;
                }
                return;
            }
            if was_connected {
                backoff = Duration::from_millis(500);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.drained.changed() => return,
            }
            backoff = (backoff * 2).min(self.settings.reconnect_max);
        }
    }

    /// One connection; returns true when the daemon finished, false to reconnect.
    async fn connection(
        &self,
        client: &AsyncClient,
        events: &mut Events,
        conn: &mut Conn,
        held: &mut Held,
        results: &mut Option<tokio::sync::mpsc::UnboundedReceiver<ToPublish>>,
    ) -> bool {
        let mut drained = self.drained.clone();
        let mut status_tick = tokio::time::interval(self.settings.status_interval);
        let mut second = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                ev = events.recv() => {
                    let ev = ev.unwrap_or(Err(rumqttc::v5::ConnectionError::RequestsDone));
                    if !self.on_event(client, conn, held, ev) {
                        return false;
                    }
                }
                msg = recv_result(results) => match msg {
                    Some(m) => {
                        take(held, m);
                        if conn.connected {
                            self.fill(client, conn, held);
                        }
                    }
                    None => *results = None,
                },
                _ = second.tick() => {
                    self.forward_backlog(held);
                    self.flush_outcomes(held);
                    if conn.connected {
                        if !self.store_unstored(client, held) {
                            tracing::info!("space is back: reconnecting so the broker redelivers the jobs not held");
                            return false;
                        }
                        self.publish_status(client, conn, false);
                        self.fill(client, conn, held);
                    }
                }
                _ = status_tick.tick() => if conn.connected { self.publish_status(client, conn, true) },
                _ = drained.changed() => return true,
            }
        }
    }

    /// Handles one event; false when the connection ended.
    fn on_event(
        &self,
        client: &AsyncClient,
        conn: &mut Conn,
        held: &mut Held,
        ev: Result<Event, rumqttc::v5::ConnectionError>,
    ) -> bool {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let m = &self.settings;
                tracing::info!(host = %m.host, port = m.port, session_present = ack.session_present, "MQTT connected");
                conn.connected = true;
                self.telemetry.mqtt_connected.store(true, Ordering::Relaxed);
                if let Ok(mut last) = self.telemetry.mqtt_last_error.lock() {
                    last.clear();
                }
                if let Err(e) = client.try_subscribe(m.job_topic.clone(), QoS::AtLeastOnce) {
                    tracing::warn!(error = %e, "MQTT subscribe request failed");
                }
                self.publish_status(client, conn, true);
                self.fill(client, conn, held);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => self.on_publish(client, held, p),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                if let Some(tag) = conn.awaiting_pkid.pop_front() {
                    conn.inflight.insert(pkid, tag);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if self.on_puback(conn, held, &ack) {
                    self.fill(client, conn, held);
                }
            }
            Ok(_) => {}
            Err(e) => {
                if conn.connected {
                    tracing::warn!(error = %e, "MQTT connection lost");
                } else {
                    connect_failed(&self.telemetry, &self.settings, &e);
                }
                return false;
            }
        }
        true
    }

    /// An incoming message: a job is stored, then acknowledged and queued.
    fn on_publish(&self, client: &AsyncClient, held: &mut Held, p: Publish) {
        if p.topic.as_ref() != self.settings.job_topic.as_bytes() {
            let _ = client.try_ack(&p);
            return;
        }
        if *self.shutdown.borrow() {
            // Not acknowledged: the broker keeps it for the next start.
            return;
        }
        if !held.unstored.is_empty() {
            self.hold(held, p);
            return;
        }
        match store_job(&self.store, &p.payload) {
            Ok(job) => {
                let _ = client.try_ack(&p);
                if let Some(job) = job {
                    held.backlog.push_back(job);
                    self.forward_backlog(held);
                }
            }
            Err(e) if super::disk::is_disk_full(&e) => {
                tracing::error!(error = %e, "disk full: holding an MQTT job unacknowledged until space returns");
                self.telemetry.disk_full.store(true, Ordering::Relaxed);
                self.hold(held, p);
            }
            // Not acknowledged: the broker redelivers after reconnecting.
            Err(e) => tracing::error!(error = %e, "could not store an MQTT job"),
        }
    }

    fn hold(&self, held: &mut Held, p: Publish) {
        if held.unstored.len() < MAX_UNSTORED {
            held.unstored.push_back(p);
        } else {
            held.lost_unstored = true;
        }
    }

    /// Retries storing held jobs; false when all are stored but some were not held (the
    /// connection is then renewed so the broker redelivers them).
    fn store_unstored(&self, client: &AsyncClient, held: &mut Held) -> bool {
        let had = !held.unstored.is_empty();
        while let Some(p) = held.unstored.front() {
            match store_job(&self.store, &p.payload) {
                Ok(job) => {
                    let _ = client.try_ack(p);
                    held.backlog.extend(job);
                    held.unstored.pop_front();
                }
                Err(_) => return true,
            }
        }
        self.forward_backlog(held);
        if had {
            tracing::info!("disk writable again: held MQTT jobs stored");
            self.telemetry.disk_full.store(false, Ordering::Relaxed);
        }
        if held.lost_unstored {
            held.lost_unstored = false;
            return false;
        }
        true
    }

    /// Sends stored jobs to the worker without blocking (the rest wait for the next tick).
    fn forward_backlog(&self, held: &mut Held) {
        while let Some(job) = held.backlog.pop_front() {
            if let Err(job) = self.jobs.try_send(job) {
                held.backlog.push_front(job);
                return;
            }
        }
    }

    /// A PUBACK; true when a slot was freed (publish more).
    fn on_puback(&self, conn: &mut Conn, held: &mut Held, ack: &PubAck) -> bool {
        let Some(Tag::Part { file, attempt }) = conn.inflight.remove(&ack.pkid) else {
            return false;
        };
        let Some(f) = conn.files.get_mut(&file).filter(|f| f.attempt == attempt) else {
            return false;
        };
        if !matches!(
            ack.reason,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        ) {
            conn.files.remove(&file);
            self.refused(held, &file, &format!("{:?}", ack.reason));
            return true;
        }
        f.parts_left -= 1;
        if f.parts_left > 0 {
            return false;
        }
        conn.files.remove(&file);
        self.telemetry
            .results_published
            .fetch_add(1, Ordering::Relaxed);
        self.report(held, Published::Sent(file));
        true
    }

    /// Reports what became of a result to the output stage; it leaves the queue.
    fn report(&self, held: &mut Held, p: Published) {
        let file = match &p {
            Published::Sent(f) | Published::Refused { file: f, .. } => f.clone(),
        };
        held.backoff.remove(&file);
        held.queue.retain(|q| *q != file);
        held.outcomes.push_back(p);
        self.flush_outcomes(held);
    }

    /// Hands the reports to the output stage without blocking (the rest wait for the next
    /// second).
    fn flush_outcomes(&self, held: &mut Held) {
        while let Some(p) = held.outcomes.pop_front() {
            match self.out.try_send(ToOutput::Published(p)) {
                Ok(()) => {}
                Err(TrySendError::Full(ToOutput::Published(p))) => {
                    held.outcomes.push_front(p);
                    return;
                }
                Err(_) => {
                    held.outcomes.clear();
                    return;
                }
            }
        }
    }

    /// A refused publish: back off, or give up after `max_publish_attempts`.
    fn refused(&self, held: &mut Held, file: &Path, reason: &str) {
        self.telemetry
            .publish_refusals
            .fetch_add(1, Ordering::Relaxed);
        let b = held.backoff.entry(file.to_path_buf()).or_default();
        b.refusals += 1;
        if b.refusals < self.max_publish_attempts {
            let wait =
                Duration::from_secs(1 << (b.refusals - 1).min(8)).min(Duration::from_secs(300));
            b.next = Some(Instant::now() + wait);
            tracing::warn!(file = %file.display(), reason, refusals = b.refusals, wait_s = wait.as_secs(), "broker refused a result; retrying after a backoff");
            return;
        }
        let why = serde_json::json!({"reason": reason, "attempts": self.max_publish_attempts, "at": super::job::now_rfc3339()});
        self.report(
            held,
            Published::Refused {
                file: file.to_path_buf(),
                reason: why,
            },
        );
    }

    fn options(&self) -> MqttOptions {
        let m = &self.settings;
        let mut o = MqttOptions::new(m.client_id.clone(), m.host.clone(), m.port);
        o.set_keep_alive(m.keep_alive)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(m.session_expiry_secs))
            .set_manual_acks(true)
            .set_max_packet_size(Some(m.max_packet_bytes))
            .set_connection_timeout(5);
        let mut will = self.telemetry.status_json();
        will["state"] = "lost".into();
        let will = serde_json::to_vec(&will).unwrap_or_default();
        o.set_last_will(LastWill::new(
            m.status_topic.clone(),
            will,
            QoS::AtLeastOnce,
            true,
            None,
        ));
        if let Some((u, p)) = &m.credentials {
            o.set_credentials(u.clone(), p.clone());
        }
        if let Some(tls) = &m.tls {
            o.set_transport(tls.transport());
        }
        o
    }

    /// Publishes the retained status when it changed (or always when `force`).
    fn publish_status(&self, client: &AsyncClient, conn: &mut Conn, force: bool) {
        let text = serde_json::to_string(&self.telemetry.status_json()).unwrap_or_default();
        if !force && text == conn.last_status {
            return;
        }
        let topic = self.settings.status_topic.clone();
        if client
            .try_publish(topic, QoS::AtLeastOnce, true, text.clone())
            .is_ok()
        {
            conn.awaiting_pkid.push_back(Tag::Status);
            conn.last_status = text;
        }
    }

    /// Publishes queued results (oldest first, skipping those backing off) until
    /// `max_inflight` are in flight.
    fn fill(&self, client: &AsyncClient, conn: &mut Conn, held: &mut Held) {
        let now = Instant::now();
        let free = self.settings.max_inflight.saturating_sub(conn.files.len());
        let ready: Vec<PathBuf> = held
            .queue
            .iter()
            .filter(|f| {
                let waiting = held
                    .backoff
                    .get(*f)
                    .and_then(|b| b.next)
                    .is_some_and(|t| t > now);
                !conn.files.contains_key(*f) && !waiting
            })
            .take(free)
            .cloned()
            .collect();
        for file in ready {
            let parts = match std::fs::read(&file)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<JobResult>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => self.parts(&r),
                Err(e) => {
                    let reason = serde_json::json!({"reason": format!("unreadable: {e}"), "at": super::job::now_rfc3339()});
                    self.report(held, Published::Refused { file, reason });
                    continue;
                }
            };
            if conn.awaiting_pkid.len() + parts.len() > MAX_QUEUED_PUBLISHES {
                // The client's queue is busy (a broker with a small Receive Maximum): the
                // result goes whole with a later fill (a completion or the next second).
                return;
            }
            conn.attempts += 1;
            let attempt = conn.attempts;
            conn.files.insert(
                file.clone(),
                InFlight {
                    attempt,
                    parts_left: parts.len(),
                },
            );
            for (topic, payload) in parts {
                if client
                    .try_publish(topic, QoS::AtLeastOnce, false, payload)
                    .is_err()
                {
                    // Request queue full all the same (acknowledgements took it): this
                    // attempt is void (its acks are ignored); the whole result goes again later.
                    tracing::warn!(file = %file.display(), "MQTT request queue full: result attempt voided, to be published whole later");
                    conn.files.remove(&file);
                    return;
                }
                conn.awaiting_pkid.push_back(Tag::Part {
                    file: file.clone(),
                    attempt,
                });
            }
        }
    }

    /// The messages of one result: the result (compact), then its alert if any.
    fn parts(&self, r: &JobResult) -> Vec<(String, Vec<u8>)> {
        let mut parts = vec![(
            self.settings.result_topic.clone(),
            serde_json::to_vec(r).unwrap_or_default(),
        )];
        if let Some(alert) = &r.alert {
            let msg = serde_json::json!({
                "result_id": r.result_id, "job_id": r.job_id, "patient_id": r.patient_id,
                "model": r.report.model, "threshold": alert.threshold, "nodules": alert.nodules,
                "created_at": r.created_at,
            });
            parts.push((
                self.settings.alert_topic.clone(),
                serde_json::to_vec(&msg).unwrap_or_default(),
            ));
        }
        parts
    }

    /// Final status, outstanding acknowledgements (bounded wait), clean disconnect (no Will).
    async fn finish(
        &self,
        client: &AsyncClient,
        events: &mut Events,
        conn: &mut Conn,
        held: &mut Held,
    ) {
        let mut status = self.telemetry.status_json();
        status["state"] = "stopped".into();
        let _ = client.try_publish(
            self.settings.status_topic.clone(),
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(&status).unwrap_or_default(),
        );
        conn.awaiting_pkid.push_back(Tag::Status);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut disconnecting = false;
        loop {
            if conn.inflight.is_empty() && conn.awaiting_pkid.is_empty() && !disconnecting {
                let _ = client.try_disconnect();
                disconnecting = true;
            }
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(Ok(Event::Outgoing(Outgoing::Disconnect)))) => {
                    // Let the DISCONNECT reach the socket.
                    let _ = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
                    return;
                }
                Ok(Some(Ok(Event::Incoming(Packet::Publish(_))))) => {}
                Ok(Some(Ok(ev))) => {
                    self.on_event(client, conn, held, Ok(ev));
                }
                Ok(Some(Err(_))) | Ok(None) | Err(_) => return,
            }
        }
    }
}

/// The next message from the output stage; never ready once its channel closed.
async fn recv_result(
    results: &mut Option<tokio::sync::mpsc::UnboundedReceiver<ToPublish>>,
) -> Option<ToPublish> {
    match results {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Queues a result file, or forgets one the outbox bounds deleted.
fn take(held: &mut Held, msg: ToPublish) {
    match msg {
        ToPublish::Result(file) => held.queue.push_back(file),
        ToPublish::Dropped(file) => {
            held.queue.retain(|q| *q != file);
            held.backoff.remove(&file);
        }
    }
}

/// Events of one connection, in order; ends after the first error.
type Events = tokio::sync::mpsc::Receiver<Result<Event, rumqttc::v5::ConnectionError>>;

/// Polls the event loop on its own task: `EventLoop::poll` must not be cancelled (a
/// cancelled connect drops the fresh connection and fires the Last Will), and the
/// client's loop selects over several sources.
fn spawn_poller(mut el: rumqttc::v5::EventLoop) -> Events {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let ev = el.poll().await;
            let failed = ev.is_err();
            if tx.send(ev).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Stores one job payload durably as a job file; `None` when it was received before.
fn store_job(store: &JobStore, payload: &[u8]) -> std::io::Result<Option<Job>> {
    let hash = hex::encode(&sha2::Sha256::digest(payload)[..12]);
    let name = format!("mqtt-{hash}.json");
    for dir in std::iter::once(&store.dir).chain(store.seen_in.iter()) {
        if dir.join(&name).exists() {
            tracing::info!(file = %name, "MQTT job already received; acknowledging again");
            return Ok(None);
        }
    }
    let path = store.dir.join(&name);
    let job_bytes = split_binary(payload, &store.spool, &hash)?;
    write_atomic(&path, job_bytes.as_deref().unwrap_or(payload))?;
    tracing::info!(file = %name, bytes = payload.len(), "MQTT job received");
    Ok(Some(Job::new(path, Origin::Mqtt)))
}

/// For the binary form (JSON, NUL, crop bytes): writes the crop to the spool and returns
/// the JSON with `crop.path` set. `None` for a plain JSON payload. A header that is not a
/// JSON object is passed on as is, so the worker reports the error.
fn split_binary(payload: &[u8], spool: &Path, hash: &str) -> std::io::Result<Option<Vec<u8>>> {
    let Some(nul) = payload.iter().position(|b| *b == 0) else {
        return Ok(None);
    };
    let (header, crop) = (&payload[..nul], &payload[nul + 1..]);
    let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(header) else {
        return Ok(Some(header.to_vec()));
    };
    let Some(c) = doc.get_mut("crop").and_then(|c| c.as_object_mut()) else {
        return Ok(Some(header.to_vec()));
    };
    let format = c
        .remove("format")
        .and_then(|f| f.as_str().map(str::to_string))
        .unwrap_or_else(|| "npy".into());
    let format = if format == "pt" { "pt" } else { "npy" };
    let crop_path = spool.join(format!("mqtt-{}.{format}", file_safe(hash)));
    write_atomic(&crop_path, crop)?;
    c.insert("path".into(), crop_path.display().to_string().into());
    Ok(Some(serde_json::to_vec(&doc).unwrap_or_default()))
}

/// A failed connection attempt: one warning line per distinct error (TLS, authentication,
/// network), counted and shown in /healthz until the next connection.
fn connect_failed(
    telemetry: &super::telemetry::Telemetry,
    m: &MqttSettings,
    e: &rumqttc::v5::ConnectionError,
) {
    let msg = format!("{}:{}: {}", m.host, m.port, super::one_line(e));
    telemetry
        .mqtt_connect_failures
        .fetch_add(1, Ordering::Relaxed);
    let mut last = telemetry
        .mqtt_last_error
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if *last != msg {
        tracing::warn!(error = %msg, "MQTT connect failed; retrying with backoff");
        *last = msg;
    } else {
        tracing::debug!(error = %msg, "MQTT connect failed");
    }
}
