//! GEMM throughput of candle's CPU matmul at the ViT-B/32 shapes noduled runs (all folds
//! batched: 5 folds x 9 planes x 50 tokens = 2250 rows), to compare with a BLAS on the same
//! machine (scripts/gemm-vs-blas runs both). Prints one line per shape: GFLOP/s of the best
//! of 10 runs after a warm-up.
//!
//! `cargo run --release --example gemm_probe [rows]`

use candle_core::{Device, Tensor};
use std::time::Instant;

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
        for _ in 0..10 {
            let t = Instant::now();
            let y = a.matmul(&wt)?;
            std::hint::black_box(&y);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let gflops = 2.0 * (rows * k * n) as f64 / best / 1e9;
        println!("candle {rows} {k} {n} {gflops:.1} GFLOP/s");
    }
    Ok(())
}
