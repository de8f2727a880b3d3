//! `noduled demo`: runs the real daemon on embedded defaults (inbox folder only, no broker,
//! the model in `models/demo`), drops the example job (`examples/lung1.job.json`, a real
//! chest CT region with its nodule coordinate) into its inbox, waits for the result in the
//! outbox and prints it.

use crate::config::{
    Config, HealthConfig, InboxConfig, JobsConfig, ModelConfig, MqttConfig, OutboxConfig,
};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Arguments of `noduled demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model folder or bundle [default: models/demo].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Job JSON to feed; relative paths in it resolve against its folder
    /// [default: examples/lung1.job.json].
    #[arg(long)]
    pub job: Option<PathBuf>,
    /// State folder (inbox, outbox, done/); default: a fresh folder under the temp dir.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// Compute device and dtype.
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

/// Finds `rel` under the current folder, else under the source tree the binary was built from.
fn locate(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs the demo.
pub fn run(args: Args) -> anyhow::Result<()> {
    let model = args.model.unwrap_or_else(|| locate("models/demo"));
    let job_path = args
        .job
        .unwrap_or_else(|| locate("examples/lung1.job.json"));
    let job_path = job_path
        .canonicalize()
        .with_context(|| format!("{}: the example job", job_path.display()))?;
    let job_dir = job_path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut job: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&job_path).with_context(|| job_path.display().to_string())?,
    )
    .with_context(|| format!("{}: job JSON", job_path.display()))?;
    // The daemon takes absolute paths only: resolve the example's against its folder.
    if let Some(obj) = job.as_object_mut() {
        for key in ["volume"] {
            if let Some(p) = obj
                .get(key)
                .and_then(|v| v.as_str())
                .filter(|p| !Path::new(p).is_absolute())
            {
                obj.insert(key.into(), job_dir.join(p).display().to_string().into());
            }
        }
        if let Some(series) = obj.get_mut("series").and_then(|s| s.as_object_mut()) {
            if let Some(p) = series
                .get("path")
                .and_then(|v| v.as_str())
                .filter(|p| !Path::new(p).is_absolute())
            {
                series.insert("path".into(), job_dir.join(p).display().to_string().into());
            }
        }
    }
    let state = args.state_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("noduled-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&state).with_context(|| state.display().to_string())?;
    let state = state.canonicalize()?;

    let defaults = Config::default();
    let cfg = Config {
        state_dir: state.clone(),
        inbox: InboxConfig {
            enabled: true,
            path: state.join("inbox"),
        },
        outbox: OutboxConfig {
            path: state.join("outbox"),
            ..defaults.outbox
        },
        model: ModelConfig {
            path: model.clone(),
            public_key: None,
            device: args.device.device,
            dtype: args.device.dtype,
        },
        jobs: JobsConfig {
            data_roots: vec![job_dir.clone()],
            ..defaults.jobs
        },
        mqtt: MqttConfig {
            enabled: false,
            ..defaults.mqtt
        },
        health: HealthConfig {
            enabled: false,
            ..defaults.health
        },
        ..defaults
    };
    let settings = cfg.validate(&std::env::current_dir()?)?;
    let outbox = settings.outbox.clone();
    let inbox = state.join("inbox");

    eprintln!(
        "noduled demo: model {} (default: a tiny model trained on synthetic nodules only; scores are not clinical)",
        model.display()
    );
    eprintln!("noduled demo: state in {}", state.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let job_bytes = serde_json::to_vec_pretty(&job)?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let result_file = std::sync::Arc::new(std::sync::Mutex::new(None::<PathBuf>));
    let found = result_file.clone();
    let inbox_for_feed = inbox.clone();
    let feed_and_wait = async move {
        // Feed the job once the daemon watches its inbox: write elsewhere, rename in.
        while !inbox_for_feed.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let tmp = inbox_for_feed.join(".example.json.tmp");
        if std::fs::write(&tmp, &job_bytes)
            .and_then(|_| std::fs::rename(&tmp, inbox_for_feed.join("example.json")))
            .is_err()
        {
            return;
        }
        eprintln!(
            "noduled demo: job dropped into {}",
            inbox_for_feed.display()
        );
        let t0 = std::time::Instant::now();
        while t0.elapsed() < timeout {
            if let Some(p) = crate::daemon::inbox::Inbox::list(&outbox)
                .into_iter()
                .next()
            {
                *found.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let ran = rt.block_on(crate::daemon::run(settings, feed_and_wait));
    rt.shutdown_timeout(Duration::from_secs(1));
    ran?;
    let Some(file) = result_file
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    else {
        bail!(
            "no result within {} s (state in {})",
            args.timeout_secs,
            state.display()
        );
    };
    let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
    println!("{text}");
    let value: serde_json::Value = serde_json::from_str(&text)?;
    eprintln!("noduled demo: result {}", file.display());
    if value.get("status").and_then(|s| s.as_str()) != Some("ok") {
        bail!(
            "the job failed: {}",
            value
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("unknown error")
        );
    }
    for n in value
        .get("nodules")
        .and_then(|n| n.as_array())
        .into_iter()
        .flatten()
    {
        eprintln!(
            "noduled demo: nodule {}: calibrated malignancy score {:.3} (not for clinical use)",
            n.get("nodule_id").and_then(|v| v.as_str()).unwrap_or("?"),
            n.pointer("/score/calibrated")
                .and_then(|v| v.as_f64())
                .unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
