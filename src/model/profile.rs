//! Optional per-op wall-clock timers for the towers, for `noduled bench --profile`.
//!
//! Off by default: then [`timed`] costs one relaxed atomic load. When on, each labelled op's
//! wall seconds, process CPU seconds (all threads, user + system) and call count are summed
//! process-wide (CPU tensor ops are synchronous, so the clocks around an op time the op). On a
//! shared machine the CPU seconds are the steadier figure: they do not grow while the
//! process waits for a core, though spinning workers still count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<OpTotal>> = Mutex::new(Vec::new());

/// One op's sums.
#[derive(Debug, Clone)]
pub struct OpTotal {
    /// The op's label.
    pub label: &'static str,
    /// Wall seconds.
    pub wall_s: f64,
    /// Process CPU seconds, all threads.
    pub cpu_s: f64,
    /// Calls.
    pub calls: u64,
    /// Floating-point operations done (GEMMs only; 0 for other ops).
    pub flops: f64,
}

/// CPU seconds (user + system) this process has used so far, all threads.
pub fn process_cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

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
    timed_flops(label, 0.0, f)
}

/// [`timed`] for an op of `flops` floating-point operations (a GEMM), so that the bench can
/// report its GFLOP/s.
#[inline]
pub fn timed_flops<T>(label: &'static str, flops: f64, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let c = process_cpu_s();
    let t = Instant::now();
    let out = f();
    let wall_s = t.elapsed().as_secs_f64();
    let cpu_s = process_cpu_s() - c;
    if let Ok(mut totals) = TOTALS.lock() {
        match totals.iter_mut().find(|e| e.label == label) {
            Some(e) => {
                e.wall_s += wall_s;
                e.cpu_s += cpu_s;
                e.calls += 1;
                e.flops += flops;
            }
            None => totals.push(OpTotal {
                label,
                wall_s,
                cpu_s,
                calls: 1,
                flops,
            }),
        }
    }
    out
}

/// The sums so far, in first-seen order.
pub fn totals() -> Vec<OpTotal> {
    TOTALS.lock().map(|t| t.clone()).unwrap_or_default()
}
