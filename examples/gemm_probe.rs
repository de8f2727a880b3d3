//! GEMM throughput of candle's CPU matmul and of noduled's own AVX-512 / AVX2 GEMM (f32 and bf16,
//! `noduled::model::gemm`) at the ViT-B/32 shapes noduled runs (all folds batched: 5 folds x
//! 9 planes x 50 tokens = 2250 rows), to compare with a BLAS on the same machine
//! (scripts/gemm-vs-blas runs both). Prints one line per kernel and shape: GFLOP/s of the
//! best of 10 runs after a warm-up, GFLOP per process-CPU-second of the best run (which holds
//! on a shared machine: a thread waiting for a core does not count), and the share of the
//! peak measured at start (one thread's `vfmadd231ps` / `vdpbf16ps` rate per CPU-second times
//! the threads). The CPU-second figure is also the best of the 10 runs.
//!
//! `cargo run --release --example gemm_probe [rows] [--cold]` (`--cold`: the in-house kernel
//! on a weight not in cache at each run, as in the model, where each layer's weights are read
//! once per pass).

use candle_core::{Device, Tensor};
use noduled::model::gemm::{GemmDtype, PackedWeight};
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cold = args.iter().any(|a| a == "--cold");
    let rows: usize = args.iter().find_map(|s| s.parse().ok()).unwrap_or(2250);
    let dev = Device::Cpu;
    let threads = rayon::current_num_threads();
    let peaks = [GemmDtype::F32, GemmDtype::Bf16]
        .map(|d| noduled::model::gemm::peak_gflops(d, 200).map(|p| p * threads as f64));
    println!(
        "# threads {threads}, measured peak GFLOP/s: f32 {:.0}, bf16 {:.0} (one thread's x {threads})",
        peaks[0].unwrap_or(f64::NAN),
        peaks[1].unwrap_or(f64::NAN)
    );
    for (k, n) in [(768, 768), (768, 3072), (3072, 768)] {
        let a = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
        // Weights stored (out, in) as in the checkpoints; x @ W^T as a Linear layer does.
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let wt = w.t()?;
        a.matmul(&wt)?;
        let (mut best, mut cpu) = (f64::MAX, f64::MAX);
        for _ in 0..10 {
            let (t, cpu0) = (Instant::now(), cpu_seconds());
            let y = a.matmul(&wt)?;
            std::hint::black_box(&y);
            best = best.min(t.elapsed().as_secs_f64());
            cpu = cpu.min(cpu_seconds() - cpu0);
        }
        let gflop = 2.0 * (rows * k * n) as f64 / 1e9;
        println!(
            "candle {rows} {k} {n} {:.1} GFLOP/s wall, {:.1} GFLOP per CPU-s ({:.0}% of f32 peak)",
            gflop / best,
            gflop / cpu,
            100.0 * gflop / best / peaks[0].unwrap_or(f64::NAN)
        );
        let av = a.flatten_all()?.to_vec1::<f32>()?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        for (dtype, peak) in [GemmDtype::F32, GemmDtype::Bf16].into_iter().zip(peaks) {
            // With --cold, ten copies of the weight (past the L3 at these shapes' 2-9 MiB
            // each) taken in turn, so each run starts with its weight out of cache, as the
            // model's layers do; otherwise one copy, warm in L3 after the first run.
            let copies = if cold { 10 } else { 1 };
            let Some(packed) = (0..copies)
                .map(|_| PackedWeight::pack(&wv, n, k, dtype))
                .collect::<Option<Vec<_>>>()
            else {
                println!("in-house {} not on this CPU", dtype.name());
                continue;
            };
            let mut c = vec![0f32; rows * n];
            packed[0].matmul(&av, rows, &mut c);
            let (mut best, mut cpu) = (f64::MAX, f64::MAX);
            for p in packed.iter().cycle().skip(1).take(10) {
                let (t, cpu0) = (Instant::now(), cpu_seconds());
                p.matmul(&av, rows, &mut c);
                std::hint::black_box(&c);
                best = best.min(t.elapsed().as_secs_f64());
                cpu = cpu.min(cpu_seconds() - cpu0);
            }
            println!(
                "{}-{} {rows} {k} {n} {:.1} GFLOP/s wall, {:.1} GFLOP per CPU-s ({:.0}% of {} peak)",
                dtype.kernel_name().unwrap_or("?"),
                dtype.name(),
                gflop / best,
                gflop / cpu,
                100.0 * gflop / best / peak.unwrap_or(f64::NAN),
                dtype.name()
            );
        }
    }
    Ok(())
}
