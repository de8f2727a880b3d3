//! Optional per-op wall-clock timers for the towers, for `noduled bench --profile`.
//!
//! Off by default: then [`timed`] costs one relaxed atomic load. When on, each labelled op's
//! seconds and call count are summed process-wide (CPU tensor ops are synchronous, so the
//! wall clock around an op is the op's time).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<(&'static str, f64, u64)>> = Mutex::new(Vec::new());

/// Turns the timers on or off (and clears them).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
    reset();
}

/// Clears the sums.
pub fn reset() {
    if let Ok(mut t) = TOTALS.lock() {
        t.clear();
    }
}

/// Runs `f`, adding its wall time to `label` when the timers are on.
#[inline]
pub fn timed<T>(label: &'static str, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let t = Instant::now();
    let out = f();
    let s = t.elapsed().as_secs_f64();
    if let Ok(mut totals) = TOTALS.lock() {
        match totals.iter_mut().find(|(l, _, _)| *l == label) {
            Some(e) => {
                e.1 += s;
                e.2 += 1;
            }
            None => totals.push((label, s, 1)),
        }
    }
    out
}

/// The sums so far: (label, seconds, calls), in first-seen order.
pub fn totals() -> Vec<(&'static str, f64, u64)> {
    TOTALS.lock().map(|t| t.clone()).unwrap_or_default()
}
