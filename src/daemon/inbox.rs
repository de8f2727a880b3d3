//! The inbox folder: jobs arrive as `*.json` files renamed into it (or written and closed
//! there), are claimed by a rename into `processing/`, and end in `done/` or `failed/`
//! (with `<name>.error.json` beside a failed job). A job still in `processing/` at start was
//! interrupted (crash, SIGKILL, power cut) and runs again.
//!
//! Watching uses `notify` (inotify on Linux) and acts only on close-after-write and
//! rename-into events, never on a file still being written; inotify reports nothing about
//! files already present, so the folder is scanned at start and again whenever the kernel
//! queue overflowed. Names starting with `.` or ending in `.tmp` / `.part` are ignored.

use super::input::{Job, JobSender, Origin};
use super::outbox::{move_durable, write_atomic};
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};

/// The inbox and the state folders jobs move through.
#[derive(Debug, Clone)]
pub struct Inbox {
    /// Where jobs arrive.
    pub dir: PathBuf,
    /// Jobs being worked on.
    pub processing: PathBuf,
    /// Finished jobs.
    pub done: PathBuf,
    /// Failed jobs, each with `<name>.error.json`.
    pub failed: PathBuf,
    /// Jobs received over MQTT, stored before they are acknowledged.
    pub mqtt_jobs: PathBuf,
}

/// Whether a file name is a job to act on.
pub fn is_job_name(name: &str) -> bool {
    name.ends_with(".json") && !name.starts_with('.') && !name.ends_with(".error.json")
}

impl Inbox {
    /// Opens the inbox, creating the folders.
    pub fn open(dir: &Path, state_dir: &Path) -> std::io::Result<Self> {
        let me = Self {
            dir: dir.to_path_buf(),
            processing: state_dir.join("processing"),
            done: state_dir.join("done"),
            failed: state_dir.join("failed"),
            mqtt_jobs: state_dir.join("mqtt-jobs"),
        };
        for d in [&me.dir, &me.processing, &me.done, &me.failed, &me.mqtt_jobs] {
            std::fs::create_dir_all(d)?;
        }
        Ok(me)
    }

    /// Job files in `dir`, oldest first.
    pub fn list(dir: &Path) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
            .filter_map(|e| e.ok())
            .filter(|e| is_job_name(&e.file_name().to_string_lossy()))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file()
                    .then(|| (m.modified().unwrap_or(std::time::UNIX_EPOCH), e.path()))
            })
            .collect();
        files.sort();
        files.into_iter().map(|f| f.1).collect()
    }

    /// Moves a job from the inbox into `processing/`; `None` when it is gone already.
    pub fn claim(&self, path: &Path) -> std::io::Result<Option<PathBuf>> {
        let Some(name) = path.file_name() else {
            return Ok(None);
        };
        let to = self.processing.join(name);
        match move_durable(path, &to) {
            Ok(()) => Ok(Some(to)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Moves a claimed job to `done/`, or to `failed/` with an error JSON beside it.
    pub fn finish(&self, claimed: &Path, error: Option<&serde_json::Value>) -> std::io::Result<()> {
        let Some(name) = claimed.file_name() else {
            return Ok(());
        };
        match error {
            None => move_durable(claimed, &self.done.join(name)),
            Some(err) => {
                let stem = name.to_string_lossy();
                let stem = stem.strip_suffix(".json").unwrap_or(&stem);
                let text = serde_json::to_vec_pretty(err).unwrap_or_default();
                write_atomic(&self.failed.join(format!("{stem}.error.json")), &text)?;
                move_durable(claimed, &self.failed.join(name))
            }
        }
    }

    /// Watches the inbox, sending finished files to the worker. Keep the watcher alive;
    /// dropping it drops its sender.
    pub fn watch(&self, tx: JobSender) -> notify::Result<notify::RecommendedWatcher> {
        let dir = self.dir.clone();
        let send_all = move |tx: &JobSender, dir: &Path| {
            for p in Inbox::list(dir) {
                tx.send(Job::new(p, Origin::Inbox));
            }
        };
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(ev) if ev.need_rescan() => {
                    tracing::warn!("inbox watch queue overflowed: rescanning");
                    send_all(&tx, &dir);
                }
                Ok(ev) => {
                    let path = match ev.kind {
                        EventKind::Access(AccessKind::Close(AccessMode::Write)) => ev.paths.first(),
                        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => ev.paths.first(),
                        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => ev.paths.get(1),
                        _ => None,
                    };
                    if let Some(p) = path {
                        if p.parent() == Some(dir.as_path())
                            && p.file_name()
                                .is_some_and(|n| is_job_name(&n.to_string_lossy()))
                        {
                            tx.send(Job::new(p.clone(), Origin::Inbox));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inbox watch error: rescanning");
                    send_all(&tx, &dir);
                }
            })?;
        watcher.watch(&self.dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    }
}
