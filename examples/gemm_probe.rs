//! GEMM throughput of candle's CPU matmul at the ViT-B/32 shapes noduled runs (all folds
//! batched: 5 folds x 9 planes x 50 tokens = 2250 rows), to compare with a BLAS on the same
//! machine (scripts/gemm-vs-blas runs both). Prints one line per shape: GFLOP/s of the best
//! of 10 runs after a warm-up, and GFLOP per process-CPU-second over those runs (which holds
//! on a shared machine: a thread waiting for a core does not count).
//!
//! `cargo run --release --example gemm_probe [rows]`

use candle_core::{Device, Tensor};
use std::time::Instant;

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() -> candle_core::Result<()> {
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2250);
    let dev = Device::Cpu;
    for (k, n) in [(768, 768), (768, 3072), (3072, 768)] {
        let a = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
        // Weights stored (out, in) as in the checkpoints; x @ W^T as a Linear layer does.
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let wt = w.t()?;
        a.matmul(&wt)?;
        let mut best = f64::MAX;
        let cpu0 = cpu_seconds();
        for _ in 0..10 {
            let t = Instant::now();
            let y = a.matmul(&wt)?;
            std::hint::black_box(&y);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let cpu = cpu_seconds() - cpu0;
        let gflop = 2.0 * (rows * k * n) as f64 / 1e9;
        println!(
            "candle {rows} {k} {n} {:.1} GFLOP/s wall, {:.1} GFLOP per CPU-s",
            gflop / best,
            10.0 * gflop / cpu
        );
    }
    Ok(())
}
