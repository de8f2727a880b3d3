//! The inbox folder: jobs arrive as `*.json` files renamed into it (or written and closed
//! there), are claimed by a rename into `processing/`, and end in `done/` or `failed/`
//! (with `<name>.error.json` beside a failed job). A job still in `processing/` at start was
//! interrupted (crash, SIGKILL, power cut) and runs again.
//!
//! Watching uses `notify` (inotify on Linux) and acts only on close-after-write and
//! rename-into events, never on a file still being written; inotify reports nothing about
//! files already present, so the folder is scanned at start and again whenever the kernel
//! queue overflowed. Names starting with `.` or ending in `.tmp` / `.part` are ignored.

use super::outbox::{move_durable, write_atomic};
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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

    /// Watches the inbox, pushing finished files onto `queue`. Keep the watcher alive.
    pub fn watch(&self, queue: Arc<JobQueue>) -> notify::Result<notify::RecommendedWatcher> {
        let dir = self.dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(ev) if ev.need_rescan() => {
                    tracing::warn!("inbox watch queue overflowed: rescanning");
                    for p in Inbox::list(&dir) {
                        queue.push(p);
                    }
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
                            queue.push(p.clone());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inbox watch error: rescanning");
                    for p in Inbox::list(&dir) {
                        queue.push(p);
                    }
                }
            })?;
        watcher.watch(&self.dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    }
}

/// What [`JobQueue::pop_timeout`] found.
#[derive(Debug)]
pub enum Pop {
    /// A job file and when it was noticed.
    Job(PathBuf, Instant),
    /// Nothing within the timeout.
    Empty,
    /// The queue was closed (shutdown).
    Closed,
}

/// Jobs waiting for the worker: file paths (in the inbox, or in `processing/` when
/// recovered), de-duplicated, with the time each was noticed.
#[derive(Debug, Default)]
pub struct JobQueue {
    inner: Mutex<QueueInner>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct QueueInner {
    items: VecDeque<(PathBuf, Instant)>,
    queued: HashSet<PathBuf>,
    closed: bool,
}

impl JobQueue {
    /// Adds a job unless it is queued already.
    pub fn push(&self, path: PathBuf) {
        let mut q = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !q.closed && q.queued.insert(path.clone()) {
            q.items.push_back((path, Instant::now()));
            self.ready.notify_one();
        }
    }

    /// Takes the next job (its path and when it was noticed), waiting at most `timeout`;
    /// `Pop::Closed` once closed.
    pub fn pop_timeout(&self, timeout: Duration) -> Pop {
        let mut q = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if q.items.is_empty() && !q.closed {
            q = self
                .ready
                .wait_timeout(q, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if q.closed {
            return Pop::Closed;
        }
        let item = q.items.pop_front();
        if let Some((p, _)) = &item {
            q.queued.remove(p);
        }
        match item {
            Some((p, t)) => Pop::Job(p, t),
            None => Pop::Empty,
        }
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .items
            .len()
    }

    /// Whether no job waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops the queue: pending and later pops return `Err(())`.
    pub fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_all();
    }
}
