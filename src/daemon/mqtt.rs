//! MQTT in and out (rumqttc, MQTT 5, QoS 1, persistent session).
//!
//! In: job payloads on the job topic are written durably as job files (`state_dir/mqtt-jobs/`)
//! and only then acknowledged (manual acks), so a crash between receipt and the file loses
//! nothing: the broker redelivers. A payload is job JSON, or a binary form: job JSON, one
//! NUL byte, then the crop file's bytes (`"crop": {"format": "npy"}` in the JSON). Files are
//! named after a hash of the payload, so a redelivered job is not queued twice. The largest
//! packet is announced to the broker (MQTT 5 Maximum Packet Size): a broker never sends this
//! client a larger job, and rumqttc refuses one before allocating it.
//!
//! Out: results are published from the on-disk outbox, oldest first, at most
//! `mqtt.max_inflight` at a time, to `<prefix>/result/<patient_id>` (and their alert to
//! `<prefix>/alert`); a result moves to `outbox/sent/` only once every PUBACK for it arrived.
//! rumqttc keeps unacknowledged messages in memory only, so each connection gets a fresh
//! client: whatever was in flight when the connection dropped is published again from the
//! outbox (same `result_id`; at least once). The retained `<prefix>/status` is refreshed on
//! every change and every `status_interval_secs`; the Last Will sets it to `lost`.
//!
//! PUBACKs are matched to results through the order of `Outgoing::Publish(pkid)` events,
//! which follows the order of publish requests on one connection.

use super::job::file_safe;
use super::outbox::write_atomic;
use super::Shared;
use crate::config::MqttSettings;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::Outgoing;
use sha2::Digest;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// What a publish was for.
#[derive(Debug, Clone)]
enum Tag {
    Status,
    Part(PathBuf),
}

/// Per-connection bookkeeping.
#[derive(Default)]
struct Conn {
    connected: bool,
    awaiting_pkid: VecDeque<Tag>,
    inflight: HashMap<u16, Tag>,
    parts_left: HashMap<PathBuf, usize>,
    files: HashSet<PathBuf>,
}

/// Runs the MQTT client until `stop` turns true; then publishes a final `stopped` status,
/// waits briefly for outstanding acknowledgements and disconnects cleanly.
pub async fn run(
    shared: Arc<Shared>,
    m: MqttSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if *stop.borrow() {
            return;
        }
        let (client, el) = AsyncClient::new(options(&shared, &m), 256);
        let mut events = spawn_poller(el);
        let mut conn = Conn::default();
        let mut tick = tokio::time::interval(m.status_interval);
        let mut last_status = String::new();
        let stopping = loop {
            tokio::select! {
                ev = events.recv() => match ev.unwrap_or(Err(rumqttc::v5::ConnectionError::RequestsDone)) {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        tracing::info!(host = %m.host, port = m.port, session_present = ack.session_present, "MQTT connected");
                        if let Ok(mut last) = shared.metrics.mqtt_last_error.lock() {
                            last.clear();
                        }
                        conn.connected = true;
                        shared.metrics.mqtt_connected.store(true, Ordering::Relaxed);
                        backoff = Duration::from_millis(500);
                        if let Err(e) = client.try_subscribe(m.job_topic.clone(), QoS::AtLeastOnce) {
                            tracing::warn!(error = %e, "MQTT subscribe request failed");
                        }
                        publish_status(&client, &shared, &m, &mut conn, &mut last_status, true);
                        fill(&client, &shared, &m, &mut conn);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic.as_ref() == m.job_topic.as_bytes() {
                            match receive_job(&shared, &p.payload) {
                                Ok(()) => {
                                    if let Err(e) = client.try_ack(&p) {
                                        tracing::warn!(error = %e, "MQTT ack request failed");
                                    }
                                }
                                // Not acknowledged: the broker redelivers after reconnecting.
                                Err(e) => tracing::error!(error = %e, "could not store an MQTT job"),
                            }
                        } else if let Err(e) = client.try_ack(&p) {
                            tracing::warn!(error = %e, "MQTT ack request failed");
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                        if let Some(tag) = conn.awaiting_pkid.pop_front() {
                            conn.inflight.insert(pkid, tag);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let ok = matches!(ack.reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers);
                        if let Some(Tag::Part(file)) = conn.inflight.remove(&ack.pkid) {
                            if !ok {
                                tracing::warn!(file = %file.display(), reason = ?ack.reason, "broker refused a result; retrying after reconnect");
                                continue;
                            }
                            let left = conn.parts_left.entry(file.clone()).or_insert(1);
                            *left -= 1;
                            if *left == 0 {
                                conn.parts_left.remove(&file);
                                conn.files.remove(&file);
                                match shared.outbox.mark_sent(&file) {
                                    Ok(()) => {
                                        shared.metrics.results_published.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(e) => tracing::error!(file = %file.display(), error = %e, "could not move a sent result"),
                                }
                                shared.status_changed.notify_one();
                                fill(&client, &shared, &m, &mut conn);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if conn.connected {
                            tracing::warn!(error = %e, "MQTT connection lost");
                        } else {
                            connect_failed(&shared, &m, &e);
                        }
                        break false;
                    }
                },
                _ = shared.outbox_changed.notified() => if conn.connected { fill(&client, &shared, &m, &mut conn) },
                _ = shared.status_changed.notified() => if conn.connected {
                    publish_status(&client, &shared, &m, &mut conn, &mut last_status, false)
                },
                _ = tick.tick() => if conn.connected {
                    publish_status(&client, &shared, &m, &mut conn, &mut last_status, true);
                    fill(&client, &shared, &m, &mut conn);
                },
                _ = stop.changed() => break true,
            }
        };
        shared
            .metrics
            .mqtt_connected
            .store(false, Ordering::Relaxed);
        if stopping {
            if conn.connected {
                finish(&client, &mut events, &shared, &m, &mut conn).await;
            }
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(m.reconnect_max);
    }
}

/// Events of one connection, in order; ends after the first error.
type Events = tokio::sync::mpsc::Receiver<Result<Event, rumqttc::v5::ConnectionError>>;

/// Polls the event loop on its own task: `EventLoop::poll` must not be cancelled (a
/// cancelled connect drops the fresh connection and fires the Last Will), and the
/// daemon's loop selects over several sources.
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

/// A failed connection attempt: one warning line per distinct error (TLS, authentication,
/// network), counted and shown in /healthz until the next connection.
fn connect_failed(shared: &Shared, m: &MqttSettings, e: &rumqttc::v5::ConnectionError) {
    let msg = format!("{}:{}: {}", m.host, m.port, one_line_error(e));
    shared
        .metrics
        .mqtt_connect_failures
        .fetch_add(1, Ordering::Relaxed);
    let mut last = shared
        .metrics
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

/// The error with its sources, on one line ("TLS: ... : invalid peer certificate: ...").
fn one_line_error(e: &dyn std::error::Error) -> String {
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

fn options(shared: &Shared, m: &MqttSettings) -> MqttOptions {
    let mut o = MqttOptions::new(m.client_id.clone(), m.host.clone(), m.port);
    o.set_keep_alive(m.keep_alive)
        .set_clean_start(false)
        .set_session_expiry_interval(Some(m.session_expiry_secs))
        .set_manual_acks(true)
        .set_max_packet_size(Some(m.max_packet_bytes))
        .set_connection_timeout(5);
    let mut will = shared.status_json();
    will["state"] = "lost".into();
    let will = serde_json::to_vec(&will).unwrap_or_default();
    o.set_last_will(LastWill::new(
        format!("{}/status", m.prefix),
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
fn publish_status(
    client: &AsyncClient,
    shared: &Shared,
    m: &MqttSettings,
    conn: &mut Conn,
    last: &mut String,
    force: bool,
) {
    let status = serde_json::to_string(&shared.status_json()).unwrap_or_default();
    if !force && status == *last {
        return;
    }
    if client
        .try_publish(
            format!("{}/status", m.prefix),
            QoS::AtLeastOnce,
            true,
            status.clone(),
        )
        .is_ok()
    {
        conn.awaiting_pkid.push_back(Tag::Status);
        *last = status;
    }
}

/// Publishes outbox results (oldest first) until `max_inflight` are in flight.
fn fill(client: &AsyncClient, shared: &Shared, m: &MqttSettings, conn: &mut Conn) {
    if conn.files.len() >= m.max_inflight {
        return;
    }
    for file in shared.outbox.pending() {
        if conn.files.len() >= m.max_inflight {
            break;
        }
        if conn.files.contains(&file) {
            continue;
        }
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let value: serde_json::Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "unreadable result in the outbox; leaving it");
                conn.files.insert(file);
                continue;
            }
        };
        let patient = value
            .get("patient_id")
            .and_then(|v| v.as_str())
            .map(file_safe)
            .unwrap_or_else(|| "unknown".into());
        // Compact on the wire (the outbox copy is pretty-printed for people).
        let compact = serde_json::to_vec(&value).unwrap_or(bytes);
        let mut parts = vec![(format!("{}/result/{patient}", m.prefix), compact)];
        if let Some(alert) = value.get("alert").filter(|a| !a.is_null()) {
            let msg = serde_json::json!({
                "result_id": value.get("result_id"), "job_id": value.get("job_id"),
                "patient_id": value.get("patient_id"), "model": value.get("model"),
                "threshold": alert.get("threshold"), "nodules": alert.get("nodules"),
                "created_at": value.get("created_at"),
            });
            parts.push((
                format!("{}/alert", m.prefix),
                serde_json::to_vec(&msg).unwrap_or_default(),
            ));
        }
        let n = parts.len();
        let mut sent = 0;
        for (topic, payload) in parts {
            if client
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                break;
            }
            conn.awaiting_pkid.push_back(Tag::Part(file.clone()));
            sent += 1;
        }
        if sent < n {
            // Request channel full: the parts that went out will be sent again with the rest.
            break;
        }
        conn.parts_left.insert(file.clone(), n);
        conn.files.insert(file);
    }
}

/// Final status, outstanding acknowledgements (bounded wait), clean disconnect (no Will).
async fn finish(
    client: &AsyncClient,
    events: &mut Events,
    shared: &Shared,
    m: &MqttSettings,
    conn: &mut Conn,
) {
    let mut status = shared.status_json();
    status["state"] = "stopped".into();
    let _ = client.try_publish(
        format!("{}/status", m.prefix),
        QoS::AtLeastOnce,
        true,
        serde_json::to_vec(&status).unwrap_or_default(),
    );
    conn.awaiting_pkid.push_back(Tag::Status);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut disconnecting = false;
    loop {
        let settled = conn.inflight.is_empty() && conn.awaiting_pkid.is_empty();
        if settled && !disconnecting {
            let _ = client.try_disconnect();
            disconnecting = true;
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Ok(Event::Outgoing(Outgoing::Publish(pkid))))) if pkid != 0 => {
                if let Some(tag) = conn.awaiting_pkid.pop_front() {
                    conn.inflight.insert(pkid, tag);
                }
            }
            Ok(Some(Ok(Event::Incoming(Packet::PubAck(ack))))) => {
                if let Some(Tag::Part(file)) = conn.inflight.remove(&ack.pkid) {
                    let left = conn.parts_left.entry(file.clone()).or_insert(1);
                    *left -= 1;
                    if *left == 0 && shared.outbox.mark_sent(&file).is_ok() {
                        shared
                            .metrics
                            .results_published
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Some(Ok(Event::Outgoing(Outgoing::Disconnect)))) => {
                // Let the DISCONNECT reach the socket.
                let _ = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
                return;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) | Err(_) => return,
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
    }
}

/// Stores one job payload durably as a job file and queues it.
fn receive_job(shared: &Shared, payload: &[u8]) -> std::io::Result<()> {
    let hash = hex::encode(&sha2::Sha256::digest(payload)[..12]);
    let name = format!("mqtt-{hash}.json");
    let intake = &shared.intake;
    for dir in [
        &intake.mqtt_jobs,
        &intake.processing,
        &intake.done,
        &intake.failed,
    ] {
        if dir.join(&name).exists() {
            tracing::info!(file = %name, "MQTT job already received; acknowledging again");
            return Ok(());
        }
    }
    let path = intake.mqtt_jobs.join(&name);
    let job_bytes = split_binary(payload, &shared.spool, &hash)?;
    write_atomic(&path, job_bytes.as_deref().unwrap_or(payload))?;
    tracing::info!(file = %name, bytes = payload.len(), "MQTT job received");
    shared.queue.push(path);
    shared.status_changed.notify_one();
    Ok(())
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
    let crop_path = spool.join(format!("mqtt-{hash}.{format}"));
    write_atomic(&crop_path, crop)?;
    c.insert("path".into(), crop_path.display().to_string().into());
    Ok(Some(serde_json::to_vec(&doc).unwrap_or_default()))
}
