//! What every input sends the worker: a [`Job`] (a job file already on disk, where it came
//! from, when it was noticed) over one bounded channel ([`channel`]). Any number of inputs
//! (the inbox watcher, the MQTT subscriber, a later DICOM receiver) hold a [`JobSender`];
//! the worker holds the one [`JobReceiver`] and stops when every sender is gone.
//!
//! A job is a file from the moment it is accepted, so the channel may hold the same file
//! twice (an inbox event and a rescan): the worker's claim (a rename into `processing/`)
//! takes it once and skips the other.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::telemetry::Telemetry;

/// Where a job came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Origin {
    /// Renamed into the inbox folder.
    Inbox,
    /// Published on the MQTT job topic.
    Mqtt,
}

impl Origin {
    /// The name in results (`input.origin`).
    pub fn name(self) -> &'static str {
        match self {
            Origin::Inbox => "inbox",
            Origin::Mqtt => "mqtt",
        }
    }
}

/// One job for the worker.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job file (in the inbox, `mqtt-jobs/`, or `processing/` when recovered).
    pub file: PathBuf,
    /// Where it came from.
    pub origin: Origin,
    /// When an input noticed it.
    pub noticed: Instant,
}

impl Job {
    /// A job noticed now.
    pub fn new(file: PathBuf, origin: Origin) -> Self {
        Self {
            file,
            origin,
            noticed: Instant::now(),
        }
    }
}

/// The sending half, one per input (cheap to clone).
#[derive(Debug, Clone)]
pub struct JobSender {
    tx: SyncSender<Job>,
    telemetry: Arc<Telemetry>,
}

/// The worker's half.
#[derive(Debug)]
pub struct JobReceiver {
    rx: Receiver<Job>,
    telemetry: Arc<Telemetry>,
}

/// What [`JobReceiver::recv_timeout`] found.
#[derive(Debug)]
pub enum Next {
    /// A job.
    Job(Job),
    /// Nothing within the timeout.
    Idle,
    /// Every sender is gone.
    Closed,
}

/// A bounded job channel holding at most `capacity` jobs; senders block when it is full.
pub fn channel(capacity: usize, telemetry: Arc<Telemetry>) -> (JobSender, JobReceiver) {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
    (
        JobSender {
            tx,
            telemetry: telemetry.clone(),
        },
        JobReceiver { rx, telemetry },
    )
}

impl JobSender {
    /// Sends a job, waiting while the channel is full; `false` once the worker is gone.
    pub fn send(&self, job: Job) -> bool {
        self.telemetry.queue_depth.fetch_add(1, Ordering::Relaxed);
        let ok = self.tx.send(job).is_ok();
        if !ok {
            self.telemetry.queue_depth.fetch_sub(1, Ordering::Relaxed);
        }
        ok
    }
}

impl JobSender {
    /// Sends a job unless the channel is full (or the worker gone): then hands it back.
    pub fn try_send(&self, job: Job) -> Result<(), Job> {
        self.telemetry.queue_depth.fetch_add(1, Ordering::Relaxed);
        self.tx.try_send(job).map_err(|e| {
            self.telemetry.queue_depth.fetch_sub(1, Ordering::Relaxed);
            match e {
                std::sync::mpsc::TrySendError::Full(j) => j,
                std::sync::mpsc::TrySendError::Disconnected(j) => j,
            }
        })
    }
}

impl JobReceiver {
    /// The next job, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Next {
        match self.rx.recv_timeout(timeout) {
            Ok(job) => {
                self.telemetry.queue_depth.fetch_sub(1, Ordering::Relaxed);
                Next::Job(job)
            }
            Err(RecvTimeoutError::Timeout) => Next::Idle,
            Err(RecvTimeoutError::Disconnected) => Next::Closed,
        }
    }
}
