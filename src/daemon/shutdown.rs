//! One shutdown signal for every stage, and the drop guards that tell `run` the stages are
//! done (mini-redis's `notify_shutdown` / `_shutdown_complete`).
//!
//! [`Shutdown::signal`] sets a flag the threads read (the worker stops at the next job
//! boundary, disk-full retries give up) and a `watch` the async tasks await (the MQTT input
//! stops taking jobs). Each stage holds a clone of a [`DoneGuard`]; [`Drain::wait`] returns
//! once all of them are dropped, or at the deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The shutdown signal.
#[derive(Debug)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    tx: tokio::sync::watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            flag: Arc::new(AtomicBool::new(false)),
            tx: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Shutdown {
    /// The flag threads read.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// A receiver tasks await.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Signals every stage.
    pub fn signal(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.tx.send_replace(true);
    }
}

/// Held by each stage until it is done.
#[derive(Debug, Clone)]
pub struct DoneGuard(#[allow(dead_code)] tokio::sync::mpsc::Sender<()>);

/// Waits for every [`DoneGuard`] to be dropped.
#[derive(Debug)]
pub struct Drain {
    rx: tokio::sync::mpsc::Receiver<()>,
}

/// A guard to clone into each stage and the drain that waits for them.
pub fn drain() -> (DoneGuard, Drain) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    (DoneGuard(tx), Drain { rx })
}

impl Drain {
    /// Waits until every guard is dropped; false when `deadline` passed first.
    pub async fn wait(mut self, deadline: Duration) -> bool {
        tokio::time::timeout(deadline, self.rx.recv()).await.is_ok()
    }
}

/// Sets a `watch` to true when dropped: the output stage tells the publishers it is done.
#[derive(Debug)]
pub struct SetOnDrop(pub tokio::sync::watch::Sender<bool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}
