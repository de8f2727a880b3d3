//! The localhost health endpoint: `GET /healthz` (the worker loop is alive; the body names a
//! CPU fallback of a CUDA build and the last reload's outcome), `GET /readyz` (model
//! loaded, sources live, not stopping, disk writable, worker not stalled; the body says
//! why not) and `GET /metrics` (Prometheus text).
//!
//! Written in-house on a tokio `TcpListener`: three GET routes with no bodies, keep-alive
//! or TLS do not justify a web framework and its dependency tree. At most
//! [`MAX_CONNECTIONS`] are served at once (a semaphore, as in mini-redis; the rest wait in
//! the kernel's backlog); each is read up to 8 KiB within 5 s; anything else gets
//! 404 / 405 / 400 and the connection is closed.

use super::telemetry::Telemetry;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
                        let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &telemetry)).await;
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

async fn answer(mut stream: tokio::net::TcpStream, telemetry: &Telemetry) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while n < buf.len() {
        let got = stream.read(&mut buf[n..]).await?;
        if got == 0 {
            break;
        }
        n += got;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
            || buf[..n].windows(2).any(|w| w == b"\n\n")
        {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (code, ctype, body) = route(method, path, telemetry);
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
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
        ("GET", "/metrics") => (200, "text/plain; version=0.0.4", telemetry.render()),
        ("GET", _) => (404, "text/plain", "not found\n".to_string()),
        ("", _) => (400, "text/plain", "bad request\n".to_string()),
        _ => (405, "text/plain", "method not allowed\n".to_string()),
    }
}
