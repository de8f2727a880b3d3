//! The systemd notify protocol (`Type=notify`), through the pure-Rust `sd-notify`: READY
//! once the model is loaded and the sources are live, RELOADING (with MONOTONIC_USEC) ...
//! READY around a SIGHUP reload, STOPPING on shutdown, STATUS lines, and WATCHDOG pings from
//! the worker loop at most every half `WATCHDOG_USEC`. Without `NOTIFY_SOCKET` every call
//! is a no-op.

use sd_notify::NotifyState;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sends READY=1 with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Sends RELOADING=1 with the monotonic time systemd 253+ asks for.
pub fn reloading() {
    let mut states = vec![
        NotifyState::Reloading,
        NotifyState::Status("reloading model"),
    ];
    if let Ok(m) = NotifyState::monotonic_usec_now() {
        states.push(m);
    }
    send(&states);
}

/// Sends STOPPING=1.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Sends a STATUS= line.
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

/// Rate-limited WATCHDOG=1 pings: at most every half of `WATCHDOG_USEC`.
#[derive(Debug)]
pub struct Watchdog {
    every: Option<Duration>,
    last: Mutex<Option<Instant>>,
}

impl Watchdog {
    /// Reads `WATCHDOG_USEC` / `WATCHDOG_PID`; a no-op watchdog when unset.
    pub fn from_env() -> Self {
        Self {
            every: sd_notify::watchdog_enabled().map(|d| d / 2),
            last: Mutex::new(None),
        }
    }

    /// Pings when half the watchdog interval has passed since the last ping.
    pub fn ping(&self) {
        let Some(every) = self.every else { return };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= every) {
            send(&[NotifyState::Watchdog]);
            *last = Some(Instant::now());
        }
    }

    /// The longest the worker may wait between pings.
    pub fn poll_every(&self) -> Duration {
        self.every
            .map(|d| d.min(Duration::from_secs(1)))
            .unwrap_or(Duration::from_secs(1))
    }
}
