//! The localhost health endpoint: `GET /healthz` (the worker loop is alive; the body names a
//! CPU fallback of a CUDA build and the last reload's outcome), `GET /readyz` (model
//! loaded, sources live, not stopping, disk writable, worker not stalled; the body says
//! why not) and `GET /metrics` (OpenMetrics text from [`Telemetry::render`]).
//!
//! HTTP/1.1 through hyper (no keep-alive, 8 KiB of headers at most, 5 s per connection). At
//! most [`MAX_CONNECTIONS`] are served at once (a semaphore, as in mini-redis); the rest
//! wait in the kernel's backlog.

use super::telemetry::Telemetry;
use http_body_util::Full;
use hyper::body::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Serves until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => return,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        tokio::select! {
            _ = stop.changed() => return,
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    let telemetry = telemetry.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, telemetry)).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "health endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn answer(stream: tokio::net::TcpStream, telemetry: Arc<Telemetry>) {
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (code, ctype, body) = route(req.method().as_str(), req.uri().path(), &telemetry);
        let resp = hyper::Response::builder()
            .status(code)
            .header(hyper::header::CONTENT_TYPE, ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default();
        std::future::ready(Ok::<_, std::convert::Infallible>(resp))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(8192)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "health connection ended with an error");
    }
}

fn route(method: &str, path: &str, telemetry: &Telemetry) -> (u16, &'static str, String) {
    match (method, path) {
        ("GET", "/healthz") => {
            if !telemetry.worker_alive() {
                return (503, "text/plain", "worker stalled\n".to_string());
            }
            let mut body = match telemetry.model().fallback {
                Some(reason) => format!("ok (on the CPU: {reason})\n"),
                None => "ok\n".to_string(),
            };
            let mqtt = telemetry
                .mqtt_last_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default();
            if !mqtt.is_empty() {
                body.push_str(&format!("mqtt: {mqtt}\n"));
            }
            if let Some(r) = telemetry.last_reload() {
                body.push_str(&format!(
                    "last reload: {} at {}{}\n",
                    r.outcome,
                    r.at,
                    r.reason.map(|e| format!(": {e}")).unwrap_or_default()
                ));
            }
            (200, "text/plain", body)
        }
        ("GET", "/readyz") => match telemetry.not_ready() {
            None => (200, "text/plain", "ready\n".to_string()),
            Some(why) => (503, "text/plain", format!("{why}\n")),
        },
        ("GET", "/metrics") => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            telemetry.render(),
        ),
        ("GET", _) => (404, "text/plain", "not found\n".to_string()),
        ("", _) => (400, "text/plain", "bad request\n".to_string()),
        _ => (405, "text/plain", "method not allowed\n".to_string()),
    }
}
