//! Durable writes that survive a full disk: [`retry`] runs a filesystem operation until it
//! succeeds, waiting (100 ms doubling to 5 s) while it fails with ENOSPC, EDQUOT or EIO and
//! reporting `disk_full` meanwhile (status, `/readyz`, `/metrics`); any other error is
//! returned at once. It gives up only when the daemon stops (the work then stays where it
//! was: a job in `processing/`, an MQTT job unacknowledged), so nothing is marked done that
//! was not written. [`remove_stale_tmp`] deletes the daemon's own temporary files
//! (`.<name>.<pid>.tmp`, see [`super::outbox::write_atomic`]) left by a crash.

use super::telemetry::Telemetry;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Whether an error means the disk is full or failing (worth waiting for).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EIO)
    )
}

/// Runs `op` until it succeeds, waiting while the disk is full (see the module doc);
/// `waiting` runs before each wait (the worker keeps its watchdog pings going: a full disk
/// is reported, not a wedge).
pub fn retry<T>(
    what: &str,
    telemetry: &Telemetry,
    stop: &AtomicBool,
    waiting: &dyn Fn(),
    mut op: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let mut wait = Duration::from_millis(100);
    let mut logged = false;
    loop {
        match op() {
            Ok(v) => {
                if logged {
                    tracing::info!(what, "disk writable again");
                    telemetry.disk_full.store(false, Ordering::Relaxed);
                }
                return Ok(v);
            }
            Err(e) if is_disk_full(&e) => {
                if !logged {
                    tracing::error!(what, error = %e, "disk full: retrying until space returns");
                    logged = true;
                }
                telemetry.disk_full.store(true, Ordering::Relaxed);
                if stop.load(Ordering::SeqCst) {
                    return Err(e);
                }
                waiting();
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Removes the daemon's stale temporary files (`.*.tmp`) in `dirs`; returns how many.
pub fn remove_stale_tmp(dirs: &[&Path]) -> u64 {
    let mut n = 0;
    for dir in dirs {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") && e.path().is_file() {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => n += 1,
                    Err(err) => {
                        tracing::warn!(file = %e.path().display(), error = %err, "could not remove a stale temporary file")
                    }
                }
            }
        }
    }
    if n > 0 {
        tracing::info!(
            files = n,
            "removed stale temporary files left by an earlier run"
        );
    }
    n
}
