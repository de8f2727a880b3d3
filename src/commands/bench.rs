//! `noduled bench`: per-nodule scoring latency of a model, split into read (input file to
//! planes), preprocess (planes to CLIP pixels), model (vision tower, all folds) and post
//! (MIL, classifier, calibration, zero-shot), with the median and p90 over timed nodules after
//! warm-up, the peak resident memory and the backend. `--batch N` scores N nodules per
//! timed pass (in model passes of at most [`crate::model::NODULES_PER_PASS`], as scoring
//! does) and reports per pass and per nodule. On a GPU the startup costs are reported apart:
//! opening the device (`device_init_s`), loading onto it (`load_s`) and the first pass
//! (`first_pass_s`: kernel loading / JIT and cuBLAS set-up happen there).
//!
//! `--random vit-b32` builds the full-size released architecture with random weights in
//! process (speed does not depend on the values), so the bench needs no download. Times are
//! seconds of wall clock; memory is the process's peak RSS (VmHWM) in MiB, the unit of the
//! reference bench's `ru_maxrss / 1024`, so the two compare directly.

use crate::model::config::ModelConfig;
use crate::model::NoduleModel;
use crate::nodule::{Planes01, N_PLANES, PLANE_SIDE};
use crate::nodules::NoduleRequest;
use anyhow::Context;
use std::path::PathBuf;
use std::time::Instant;

/// Random architectures `--random` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RandomArch {
    /// OpenAI CLIP ViT-B/32 vision tower (768 wide, 12 blocks) with the released heads.
    #[value(name = "vit-b32")]
    VitB32,
}

/// Weight precision of the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// 32-bit float.
    F32,
    /// 16-bit float base.
    F16,
    /// 8-bit blocks of 32 with an f16 scale (ggml Q8_0).
    #[value(name = "q8_0")]
    Q8_0,
}

/// Arguments of `noduled bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model to time: a bundle folder (as stored, e.g. q8_0) or a checkpoint folder.
    #[arg(long, conflicts_with = "random", required_unless_present = "random")]
    pub model: Option<PathBuf>,
    /// Time a full-size model with random weights instead of a stored one.
    #[arg(long, value_enum)]
    pub random: Option<RandomArch>,
    /// Folds of the random model.
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// LoRA rank of the random model.
    #[arg(long, default_value_t = 2)]
    pub lora_r: usize,
    /// Base weight precision.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// Timed passes (after warm-up); each scores `--batch` nodules.
    #[arg(long, default_value_t = 5)]
    pub nodules: usize,
    /// Nodules scored together in each pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Nodules scored before timing starts.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// CPU threads (sets RAYON_NUM_THREADS and CANDLE_NUM_THREADS); 0: the default.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Time reading from this planes file (safetensors `planes01` [9,224,224]).
    #[arg(long, conflicts_with = "ct")]
    pub planes: Option<PathBuf>,
    /// Time reading and preprocessing from this CT volume (NIfTI, NRRD or DICOM folder)...
    #[arg(long, requires = "coord")]
    pub ct: Option<PathBuf>,
    /// ... at this LPS world coordinate in mm, `X,Y,Z`.
    #[arg(long, allow_hyphen_values = true, value_parser = super::planes::parse_coord, requires = "ct")]
    pub coord: Option<[f64; 3]>,
    /// Also time each op of the towers (summed over the timed nodules, per nodule).
    #[arg(long)]
    pub profile: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Compute device and dtype.
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

/// Per-stage seconds of one nodule.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    read: f64,
    preprocess: f64,
    model: f64,
    post: f64,
}

impl Sample {
    fn total(&self) -> f64 {
        self.read + self.preprocess + self.model + self.post
    }
}

/// Median and p90 (the sorted sample at index floor(0.9 (n - 1)), as the reference's bench).
fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[(0.9 * (n - 1) as f64) as usize])
}

/// Peak resident set size of this process in MiB (VmHWM), if the platform reports it.
pub fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// A memory line of /proc/self/status in MiB.
fn status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The x86 / Arm SIMD features this CPU has that noduled's kernels or candle's use.
pub fn cpu_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => {
                $(if std::is_x86_feature_detected!($name) {
                    f.push($name);
                })*
            };
        }
        probe!(
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vnni",
            "avx512bf16"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => {
                $(if std::arch::is_aarch64_feature_detected!($name) {
                    f.push($name);
                })*
            };
        }
        probe!("neon", "dotprod", "bf16", "i8mm", "sve");
    }
    f
}

/// `"cpu x2 bf16 (avx512bf16)"`: threads, GEMM dtype and kernel of a base stored in
/// `precision` (see [`crate::device::Placement::label_for`]).
fn backend(placement: &crate::device::Placement, threads: usize, precision: &str) -> String {
    let label = placement.label_for(precision);
    match label.strip_prefix("cpu ") {
        Some(rest) => format!("cpu x{threads} {rest}"),
        None => label,
    }
}

/// Runs `noduled bench`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.nodules == 0 {
        anyhow::bail!("--nodules must be at least 1");
    }
    if args.batch == 0 || args.batch > 1024 {
        anyhow::bail!("--batch {} is out of range (1..=1024)", args.batch);
    }
    let started = Instant::now();
    let placement = args.device.init()?;
    let device_init_s = started.elapsed().as_secs_f64();
    if args.threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", args.threads.to_string());
        // Ignore the error of a pool already built: the variable still rules candle's kernels.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(args.threads)
            .build_global();
    }
    let threads = candle_core::utils::get_num_threads();
    let base = match args.precision {
        Precision::F32 => None,
        Precision::Q8_0 => Some(candle_core::quantized::GgmlDType::Q8_0),
        Precision::F16 => anyhow::bail!(
            "--precision f16: the CPU has no f16 GEMM faster than f32 (candle dequantises f16 \
             weights to f32); use f32 or q8_0 (on CUDA, --dtype f16 computes in f16)"
        ),
    };
    if args.model.is_some() && base.is_some() {
        anyhow::bail!("--precision applies to --random; a stored model runs as stored");
    }

    let started = Instant::now();
    // The stored precision of the base weights, for the backend label.
    let (model, name, stored) = match (&args.model, args.random) {
        (Some(path), _) if path.join(crate::bundle::MANIFEST).is_file() => {
            let (model, info) = NoduleModel::load_bundle(path)?;
            let stored = info.manifest.precision.clone();
            (model, format!("bundle {}", path.display()), stored)
        }
        (Some(path), _) => (
            NoduleModel::load(path)?,
            path.display().to_string(),
            "f32".to_string(),
        ),

        (None, Some(RandomArch::VitB32)) => {
            if args.folds == 0 || args.folds > 64 {
                anyhow::bail!("--folds {} is out of range (1..=64)", args.folds);
            }
            let cfg = ModelConfig::vit_b32(args.lora_r);
            (
                crate::model::random::model_with_base(&cfg, args.folds, 0, base)?,
                "random vit-b32".to_string(),
                format!("{:?}", args.precision).to_lowercase(),
            )
        }
        (None, None) => anyhow::bail!("give --model DIR or --random vit-b32"),
    };
    let model = model.placed(&placement)?;
    let load_s = started.elapsed().as_secs_f64();
    let load_peak = peak_rss_mib();
    // Peak RSS from here on: the random generator stages f32 weights that a loaded model
    // does not hold (resetting VmHWM needs Linux >= 4.0; elsewhere the figure stays whole).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let loaded_rss = status_mib("VmRSS:");

    let request = match (&args.planes, &args.ct, &args.coord) {
        (Some(path), _, _) => Some(NoduleRequest::Planes {
            path: path.clone(),
            patient_id: "bench".into(),
            nodule_id: "bench".into(),
        }),
        (None, Some(path), Some(c)) => Some(NoduleRequest::Volume {
            path: path.clone(),
            series_uid: None,
            patient_id: Some("bench".into()),
            nodules: vec![("bench".into(), *c)],
        }),
        _ => None,
    };
    // Without an input file: a fixed smooth pattern in [0, 1].
    let synthetic = Planes01(
        (0..N_PLANES * PLANE_SIDE * PLANE_SIDE)
            .map(|i| 0.5 + 0.5 * ((i % 997) as f32 * 0.013).sin())
            .collect(),
    );

    let mut samples = Vec::with_capacity(args.nodules);
    crate::model::profile::enable(false);
    let mut check = 0.0;
    let mut cpu_start = 0.0;
    let mut first_pass_s = None;
    for i in 0..args.warmup + args.nodules {
        if i == args.warmup {
            crate::model::profile::enable(args.profile);
            cpu_start = crate::model::profile::process_cpu_s();
        }
        let t = Instant::now();
        let loaded;
        let planes = match &request {
            Some(r) => {
                loaded = crate::nodules::load(r).context("reading the bench input")?;
                &loaded
                    .first()
                    .context("the bench input holds no nodule")?
                    .planes
            }
            None => &synthetic,
        };
        let read = t.elapsed().as_secs_f64();
        let batch = vec![planes; args.batch];
        let mut sample = Sample {
            read,
            ..Sample::default()
        };
        for chunk in batch.chunks(crate::model::NODULES_PER_PASS) {
            let t = Instant::now();
            let pixels = model.pixels(chunk)?;
            sample.preprocess += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let features = model.encode(&pixels)?;
            sample.model += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let out = model.finish(chunk.len(), &features)?;
            sample.post += t.elapsed().as_secs_f64();
            check = out[0].folds.iter().map(|f| f.prob).sum::<f64>();
        }
        first_pass_s.get_or_insert(sample.total());
        if i >= args.warmup {
            samples.push(sample);
        }
    }

    let per_pass = summary(samples.iter().map(Sample::total).collect());
    let b = args.batch as f64;
    let stage = |f: fn(&Sample) -> f64| summary(samples.iter().map(|s| f(s) / b).collect());
    let total = stage(Sample::total);
    let stages = [
        ("read", stage(|s| s.read)),
        ("preprocess", stage(|s| s.preprocess)),
        ("model", stage(|s| s.model)),
        ("post", stage(|s| s.post)),
    ];
    let cpu_s = crate::model::profile::process_cpu_s() - cpu_start;
    let per_nodule = 1.0 / (args.nodules * args.batch) as f64;
    let mut ops = crate::model::profile::totals();
    crate::model::profile::enable(false);
    ops.sort_by(|a, b| b.cpu_s.total_cmp(&a.cpu_s));
    let model_total: f64 = samples.iter().map(|s| s.model).sum();
    let rss = peak_rss_mib();
    let backend = if placement.is_gpu() {
        placement.label()
    } else {
        backend(&placement, threads, &stored)
    };
    let features = cpu_features();
    // The GEMM peak of this run's dtype: one thread's measured instruction rate x threads.
    let gemm_dtype = if placement.dtype == candle_core::DType::BF16 {
        crate::model::gemm::GemmDtype::Bf16
    } else {
        crate::model::gemm::GemmDtype::F32
    };
    let peak = (args.profile && !placement.is_gpu())
        .then(|| crate::model::gemm::peak_gflops(gemm_dtype, 300))
        .flatten()
        .map(|p| p * threads as f64);
    let gflops = |o: &crate::model::profile::OpTotal| {
        (o.flops > 0.0 && o.wall_s > 0.0).then(|| o.flops / o.wall_s / 1e9)
    };
    // GFLOP per CPU second: the rate each busy core ran at, which holds on a shared machine
    // (a thread waiting for a core spends wall time but no CPU time); against one core's peak.
    let gflop_per_cpu_s = |o: &crate::model::profile::OpTotal| {
        (o.flops > 0.0 && o.cpu_s > 0.0).then(|| o.flops / o.cpu_s / 1e9)
    };
    let core_peak = peak.map(|p| p / threads as f64);
    let precision = match args.model {
        Some(_) => "as stored".to_string(),
        None => format!("{:?}", args.precision).to_lowercase(),
    };
    let folds = model.n_folds();
    if args.json {
        let stages_json: serde_json::Map<String, serde_json::Value> = stages
            .iter()
            .map(|(k, (m, p))| {
                (
                    k.to_string(),
                    serde_json::json!({ "median_s": m, "p90_s": p }),
                )
            })
            .collect();
        let j = serde_json::json!({
            "impl": "noduled",
            "model": name,
            "precision": precision,
            "backend": backend,
            "dtype": if placement.is_gpu() { format!("{:?}", placement.dtype).to_lowercase() } else { gemm_dtype.name().to_string() },
            "cpu_features": features,
            "gemm_peak_gflops": peak,
            "threads": threads,
            "folds": folds,
            "planes": N_PLANES,
            "nodules": args.nodules,
            "batch": args.batch,
            "warmup": args.warmup,
            "fallback": placement.fallback,
            "device_init_s": device_init_s,
            "load_s": load_s,
            "first_pass_s": first_pass_s,
            "median_s_per_pass": per_pass.0,
            "p90_s_per_pass": per_pass.1,
            "median_s_per_nodule": total.0,
            "p90_s_per_nodule": total.1,
            "stages": stages_json,
            "peak_rss_mb": load_peak.zip(rss).map(|(a, b)| a.max(b)),
            "scoring_peak_rss_mb": rss,
            "loaded_rss_mb": loaded_rss,
            "check": check,
            "cpu_s_per_nodule": cpu_s * per_nodule,
            "ops": ops.iter().map(|o| serde_json::json!({
                "op": o.label,
                "wall_s_per_nodule": o.wall_s * per_nodule,
                "cpu_s_per_nodule": o.cpu_s * per_nodule,
                "calls_per_nodule": o.calls as f64 * per_nodule,
                "gflops": gflops(o),
                "share_of_peak": gflops(o).zip(peak).map(|(g, p)| g / p),
                "gflop_per_cpu_s": gflop_per_cpu_s(o),
                "cpu_share_of_core_peak": gflop_per_cpu_s(o).zip(core_peak).map(|(g, p)| g / p),
            })).collect::<Vec<_>>(),
        });
        println!("{j}");
    } else {
        println!("model      {name} ({folds} folds x {N_PLANES} planes, {precision})");
        println!("backend    {backend}");
        println!("cpu        {}", features.join(","));
        if let Some(reason) = &placement.fallback {
            println!("fallback   {reason}");
        }
        println!("device     {device_init_s:.2} s to open");
        println!("load       {load_s:.2} s");
        println!(
            "first pass {:.3} s (warm-up)",
            first_pass_s.unwrap_or(f64::NAN)
        );
        println!(
            "nodules    {} passes of {} timed after {} warm-up (median {:.4} s per pass)",
            args.nodules, args.batch, args.warmup, per_pass.0
        );
        println!("{:<11}{:>10}{:>10}", "stage", "median s", "p90 s");
        for (k, (m, p)) in stages.iter().chain([("total", total)].iter()) {
            println!("{k:<11}{m:>10.4}{p:>10.4}");
        }
        match (load_peak, rss) {
            (Some(l), Some(r)) => println!(
                "peak RSS   {r:.0} MiB while scoring ({:.0} MiB over the whole run, {:.0} MiB \
                 resident after load)",
                l.max(r),
                loaded_rss.unwrap_or(f64::NAN)
            ),
            _ => println!("peak RSS   unknown"),
        }
        println!(
            "CPU        {:.2} s per nodule (all threads)",
            cpu_s * per_nodule
        );
        if !ops.is_empty() {
            if let Some(p) = peak {
                println!(
                    "gemm peak  {p:.0} GFLOP/s ({:.0} per core x {threads} threads, FMA rate per \
                     CPU-second, measured now)",
                    p / threads as f64
                );
            }
            println!(
                "{:<14}{:>10}{:>10}{:>8}{:>8}{:>9}{:>7}{:>10}{:>7}",
                "op",
                "wall ms",
                "CPU ms",
                "calls",
                "% CPU",
                "GFLOP/s",
                "% peak",
                "GF/CPU-s",
                "% core"
            );
            let cpu_sum: f64 = ops.iter().map(|o| o.cpu_s).sum();
            let rate = |g: Option<f64>, p: Option<f64>| match g {
                Some(g) => (
                    format!("{g:.0}"),
                    p.map_or(String::new(), |p| format!("{:.0}", 100.0 * g / p)),
                ),
                None => (String::new(), String::new()),
            };
            for o in &ops {
                let (g, share) = rate(gflops(o), peak);
                let (gc, core) = rate(gflop_per_cpu_s(o), core_peak);
                println!(
                    "{:<14}{:>10.1}{:>10.1}{:>8.0}{:>8.1}{g:>9}{share:>7}{gc:>10}{core:>7}",
                    o.label,
                    o.wall_s * per_nodule * 1e3,
                    o.cpu_s * per_nodule * 1e3,
                    o.calls as f64 * per_nodule,
                    100.0 * o.cpu_s / cpu_sum
                );
            }
            let wall: f64 = ops.iter().map(|o| o.wall_s).sum();
            println!(
                "{:<14}{:>10.1}{:>10.1}   (per nodule, model {:.1} ms wall)",
                "(sum)",
                wall * per_nodule * 1e3,
                cpu_sum * per_nodule * 1e3,
                model_total * per_nodule * 1e3
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::summary;

    #[test]
    fn median_and_p90_follow_the_reference_convention() {
        assert_eq!(summary(vec![3.0, 1.0, 2.0]), (2.0, 2.0));
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(summary(v), (5.5, 9.0));
    }
}
