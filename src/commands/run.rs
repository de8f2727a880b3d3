//! `noduled run --config FILE`: the daemon (see [`crate::daemon`]); SIGTERM or Ctrl-C stops it
//! cleanly, SIGHUP reloads the model.

use crate::config::Config;
use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `noduled run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file (every key and its default: config/noduled.toml).
    #[arg(long)]
    pub config: PathBuf,
}

/// Runs the daemon until SIGTERM / SIGINT.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::read(&args.config)?;
    let base = args
        .config
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("."));
    let settings = config.validate(&base)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(crate::daemon::run(settings, termination()));
    // A job thread stuck in a system call (a hung share) must not keep the process alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
