//! The output stage: takes each [`Finished`] job from the worker, writes its result to the
//! durable outbox, which it alone owns, then moves the job to `done/` or `failed/` (with
//! `<name>.error.json`), clears its attempts record, deletes its spooled crops, and counts
//! it. Writes that fail for space are retried until they succeed ([`disk::retry`]); the job
//! stays in `processing/` meanwhile and, if the daemon stops first, runs again at the next
//! start with the same `result_id`.
//!
//! Publishing is the publisher's ([`super::mqtt`]): it gets each result file, oldest first
//! (at start every unsent one), as a [`ToPublish`] over a channel, and reports back what
//! became of it ([`Published`]: acknowledged, or refused for good); this stage then moves
//! the file to `sent/` or `refused/`. A result the bounds delete before it went out is
//! reported to the publisher as [`ToPublish::Dropped`].
//!
//! It also applies the bounds once a minute and after every job: the outbox's
//! ([`Outbox::prune`]) and the retention of `done/` and `failed/` ([`prune_folder`]).
//!
//! It ends once the worker ended ([`ToOutput::WorkerDone`]; it then tells the publisher it
//! is drained) and every sender is gone (the publisher's last acknowledgements applied).

use super::disk;
use super::inbox::Inbox;
use super::ledger::Ledger;
use super::outbox::Outbox;
use super::shutdown::SetOnDrop;
use super::telemetry::Telemetry;
use super::worker::Finished;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// What the output stage receives.
#[derive(Debug)]
pub enum ToOutput {
    /// A job the worker finished.
    Finished(Finished),
    /// What the publisher did with a result.
    Published(Published),
    /// The worker ended: no more [`ToOutput::Finished`].
    WorkerDone,
}

/// A publisher's report on one result file.
#[derive(Debug)]
pub enum Published {
    /// The broker acknowledged the result and its alert: it moves to `sent/`.
    Sent(PathBuf),
    /// Refused `outbox.max_publish_attempts` times, or unreadable: it moves to `refused/`
    /// with `reason` beside it.
    Refused {
        /// The result file.
        file: PathBuf,
        /// `{"reason": .., "attempts"?: .., "at": ..}`.
        reason: serde_json::Value,
    },
}

/// What the output stage tells the publisher.
#[derive(Debug, PartialEq, Eq)]
pub enum ToPublish {
    /// A result file to publish (sent in outbox order).
    Result(PathBuf),
    /// An unsent result the outbox bounds deleted: forget it.
    Dropped(PathBuf),
}

/// The output stage's link to the publisher (absent without MQTT).
#[derive(Debug)]
pub struct PublisherLink {
    /// Result files to publish.
    pub results: tokio::sync::mpsc::UnboundedSender<ToPublish>,
    /// Set once the worker ended and every result was handed over.
    pub drained: SetOnDrop,
}

/// Age and size bounds of `done/` and `failed/` (each).
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Files older than this go.
    pub max_age: Duration,
    /// Past this many bytes the oldest go first.
    pub max_bytes: u64,
}

/// The output stage.
pub struct Output {
    /// Finished jobs and publisher reports in.
    pub rx: Receiver<ToOutput>,
    /// The outbox (this stage's own).
    pub outbox: Outbox,
    /// The publisher, when there is one.
    pub publisher: Option<PublisherLink>,
    /// The state folders.
    pub intake: Inbox,
    /// Attempts records.
    pub ledger: Ledger,
    /// Bounds of `done/` and `failed/`.
    pub retention: Retention,
    /// Counters.
    pub telemetry: Arc<Telemetry>,
    /// Set when the daemon stops (ends disk-full retries).
    pub stop: Arc<AtomicBool>,
    /// Received series, SRs and the PACS queue.
    pub dicom: Arc<super::dicom_glue::DicomSide>,
}

impl Output {
    /// Runs until the worker ended and every sender is gone.
    pub fn run(mut self) {
        let mut last_prune = Instant::now();
        self.prune();
        for file in self.outbox.pending() {
            self.to_publisher(ToPublish::Result(file));
        }
        loop {
            match self.rx.recv_timeout(Duration::from_secs(1)) {
                Ok(ToOutput::Finished(f)) => {
                    self.finish(f);
                    self.prune();
                    last_prune = Instant::now();
                }
                Ok(ToOutput::Published(p)) => self.published(p),
                // The publisher, told, finishes and lets go of its sender.
                Ok(ToOutput::WorkerDone) => drop(self.publisher.take()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if last_prune.elapsed() > Duration::from_secs(60) {
                self.prune();
                last_prune = Instant::now();
            }
        }
    }

    fn to_publisher(&self, msg: ToPublish) {
        if let Some(p) = &self.publisher {
            let _ = p.results.send(msg);
        }
    }

    /// Applies a publisher's report: the file moves to `sent/` or `refused/`.
    fn published(&self, p: Published) {
        match p {
            Published::Sent(file) => {
                if let Err(e) = self.outbox.mark_sent(&file) {
                    tracing::error!(file = %file.display(), error = %e, "could not move a sent result");
                }
            }
            Published::Refused { file, reason } => match self.outbox.refuse(&file, &reason) {
                Ok(()) => {
                    self.telemetry
                        .results_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(file = %file.display(), reason = %reason["reason"], "result moved to outbox/refused/");
                }
                Err(e) => {
                    tracing::error!(file = %file.display(), error = %e, "could not move a refused result")
                }
            },
        }
        refresh_outbox_stats(&self.outbox, &self.telemetry);
    }

    fn finish(&self, f: Finished) {
        let r = &f.result;
        let name = f
            .claimed
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let json = match serde_json::to_vec_pretty(r) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(file = %name, error = %e, "could not serialise a result; job left in processing/");
                return;
            }
        };
        super::dicom_glue::write_sr(&self.dicom, self.outbox.dir(), r, f.series.as_ref());
        // A result held already (a job run again) was handed to the publisher then.
        let written = self.outbox.contains(&r.result_id)
            || disk::retry("outbox", &self.telemetry, &self.stop, &|| {}, || {
                self.outbox.write(&r.result_id, &json)
            })
            .inspect(|file| self.to_publisher(ToPublish::Result(file.clone())))
            .inspect_err(|e| tracing::error!(file = %name, error = %e, outbox = %self.outbox.dir().display(), "could not write a result; job left in processing/"))
            .is_ok();
        if !written {
            return;
        }
        let err_value = r
            .error
            .as_ref()
            .map(|_| serde_json::to_value(r).unwrap_or_default());
        if let Err(e) = disk::retry("job move", &self.telemetry, &self.stop, &|| {}, || {
            self.intake.finish(&f.claimed, err_value.as_ref())
        }) {
            tracing::error!(file = %name, error = %e, "could not move a finished job");
        }
        let _ = self.ledger.clear(&name);
        for p in &f.spooled {
            let _ = std::fs::remove_file(p);
        }
        self.telemetry.observe_latency(f.latency_s);
        let model = &r.report.model.id;
        match &r.error {
            None => {
                self.telemetry.jobs_done.fetch_add(1, Ordering::Relaxed);
                tracing::info!(job_id = ?r.job_id, result_id = %r.result_id, model = %model, "job done");
            }
            Some(e) => {
                self.telemetry.jobs_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job_id = ?r.job_id, result_id = %r.result_id, error = %e, "job failed");
            }
        }
    }

    fn prune(&self) {
        self.dicom.prune();
        let dropped = self.outbox.prune();
        self.telemetry
            .outbox_dropped
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
        for file in dropped {
            self.to_publisher(ToPublish::Dropped(file));
        }
        let mut pruned = 0;
        for dir in [&self.intake.done, &self.intake.failed] {
            pruned += prune_folder(dir, self.retention.max_age, self.retention.max_bytes);
        }
        for dir in self.ledger.dirs().into_iter().skip(1) {
            // job-ids: kept as long as done/ (same age bound).
            prune_folder(dir, self.retention.max_age, u64::MAX);
        }
        if pruned > 0 {
            self.telemetry
                .retention_pruned
                .fetch_add(pruned, Ordering::Relaxed);
            tracing::info!(
                files = pruned,
                "retention: removed old files from done/ and failed/"
            );
        }
        refresh_outbox_stats(&self.outbox, &self.telemetry);
    }
}

/// Copies the outbox's depth and size into the telemetry.
pub fn refresh_outbox_stats(outbox: &Outbox, telemetry: &Telemetry) {
    let st = outbox.stats();
    telemetry.outbox_depth.store(st.depth, Ordering::Relaxed);
    telemetry.outbox_bytes.store(st.bytes, Ordering::Relaxed);
}

/// Deletes regular files in `dir` older than `max_age`, then the oldest while the folder
/// occupies more than `max_bytes` on disk; returns how many went.
pub fn prune_folder(dir: &Path, max_age: Duration, max_bytes: u64) -> u64 {
    let now = SystemTime::now();
    let mut files: Vec<(SystemTime, u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            // Bytes on disk (a sparse file counts what it occupies).
            let used = std::os::unix::fs::MetadataExt::blocks(&m) * 512;
            m.is_file().then(|| {
                (
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    used,
                    e.path(),
                )
            })
        })
        .collect();
    files.sort();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    let mut n = 0;
    for (t, len, p) in files {
        let too_old = now.duration_since(t).unwrap_or_default() > max_age;
        if !too_old && total <= max_bytes {
            break;
        }
        if std::fs::remove_file(&p).is_ok() {
            total -= len;
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_deletes_old_then_oldest_over_the_size() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b", "c"] {
            std::fs::write(dir.path().join(name), vec![1u8; 8192]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            prune_folder(dir.path(), Duration::from_secs(3600), 1 << 20),
            0
        );
        assert_eq!(
            prune_folder(dir.path(), Duration::from_secs(3600), 20_000),
            1
        );
        assert!(!dir.path().join("a").exists() && dir.path().join("b").exists());
        assert_eq!(prune_folder(dir.path(), Duration::ZERO, 1 << 20), 2);
    }
}
