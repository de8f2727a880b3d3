//! The durable outbox: one `<result_id>.json` per job, written atomically (temporary file,
//! fsync, rename, fsync of the folder) before anything is published, so a crash or power
//! cut leaves either no result or a whole one. Unpublished results stay at the top level;
//! once the broker acknowledged a result (and its alert) it moves to `sent/`. Without MQTT
//! the top level is the output folder. A result the broker refused `outbox.max_publish_attempts`
//! times moves to `refused/` with `<result_id>.reason.json` beside it (kept, outside the bounds).
//!
//! Bounds (age and total size of the top level plus `sent/`), in this order: sent results
//! past the age or, while over the size, oldest first; then unsent results past the age, and,
//! only once no sent result is left, the oldest unsent while still over the size. Every
//! result deleted before it was published counts as `dropped`.
//!
//! A result's DICOM SR (`<result_id>.dcm`, written just before its JSON) travels with it: its
//! bytes count in the size bound, it moves with the JSON to `sent/` or `refused/`, and it is
//! deleted with it. An SR whose JSON is missing (a crash between the two writes) is bounded
//! like a sent result.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Re-exported for the daemon modules that import them from here (defined in [`crate::fsutil`]).
pub use crate::fsutil::{move_durable, sync_dir, write_atomic};

/// The outbox folder and its bounds.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    sent: PathBuf,
    refused: PathBuf,
    max_age: Duration,
    max_bytes: u64,
    dropped: AtomicU64,
}

/// A snapshot of the outbox for status and metrics.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct OutboxStats {
    /// Results not yet acknowledged by the broker.
    pub depth: u64,
    /// Bytes held (unpublished and sent).
    pub bytes: u64,
    /// Size bound in bytes.
    pub max_bytes: u64,
    /// Age bound in hours.
    pub max_age_hours: u64,
    /// Results deleted by the bounds before they were published, since start.
    pub dropped: u64,
}

impl Outbox {
    /// Opens (creating) the outbox folders.
    pub fn open(dir: &Path, max_age: Duration, max_bytes: u64) -> std::io::Result<Self> {
        let sent = dir.join("sent");
        let refused = dir.join("refused");
        std::fs::create_dir_all(&sent)?;
        std::fs::create_dir_all(&refused)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            sent,
            refused,
            max_age,
            max_bytes,
            dropped: AtomicU64::new(0),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folders this outbox writes to (for stale-file cleanup).
    pub fn dirs(&self) -> [&Path; 3] {
        [&self.dir, &self.sent, &self.refused]
    }

    /// Moves a result the broker kept refusing (or that cannot be read) to `refused/`,
    /// with `<name>.reason.json` beside it.
    pub fn refuse(&self, path: &Path, reason: &serde_json::Value) -> std::io::Result<()> {
        let Some(name) = path.file_name() else {
            return Ok(());
        };
        let stem = name.to_string_lossy();
        let stem = stem.strip_suffix(".json").unwrap_or(&stem);
        let text = serde_json::to_vec_pretty(reason).unwrap_or_default();
        write_atomic(&self.refused.join(format!("{stem}.reason.json")), &text)?;
        move_with_sr(path, &self.refused)
    }

    /// Path of an unpublished result.
    pub fn path_of(&self, result_id: &str) -> PathBuf {
        self.dir.join(format!("{result_id}.json"))
    }

    /// Whether a result with this id is already held (unpublished or sent).
    pub fn contains(&self, result_id: &str) -> bool {
        self.path_of(result_id).exists() || self.sent.join(format!("{result_id}.json")).exists()
    }

    /// Writes a result atomically; returns its path.
    pub fn write(&self, result_id: &str, json: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.path_of(result_id);
        write_atomic(&path, json)?;
        Ok(path)
    }

    /// Unpublished results, oldest first.
    pub fn pending(&self) -> Vec<PathBuf> {
        let mut files = list_results(&self.dir);
        files.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        files.into_iter().map(|f| f.0).collect()
    }

    /// Marks a result acknowledged: moves it to `sent/`.
    pub fn mark_sent(&self, path: &Path) -> std::io::Result<()> {
        move_with_sr(path, &self.sent)
    }

    /// Applies the age and size bounds in the module doc's order; returns the unpublished
    /// results it dropped.
    pub fn prune(&self) -> Vec<PathBuf> {
        let now = SystemTime::now();
        let mut sent = list_results(&self.sent);
        sent.extend(orphan_srs(&self.dir));
        let mut unsent = list_results(&self.dir);
        sent.sort_by_key(|f| f.1);
        unsent.sort_by_key(|f| f.1);
        let mut total: u64 = sent.iter().chain(unsent.iter()).map(|f| f.2).sum();
        let too_old = |t: SystemTime| now.duration_since(t).unwrap_or_default() > self.max_age;
        let mut sent_left = sent.len();
        for (p, t, len) in sent {
            if (too_old(t) || total > self.max_bytes) && remove_with_sr(&p).is_ok() {
                total -= len;
                sent_left -= 1;
            }
        }
        let mut dropped = Vec::new();
        for (p, t, len) in unsent {
            let over = total > self.max_bytes && sent_left == 0;
            if (too_old(t) || over) && remove_with_sr(&p).is_ok() {
                total -= len;
                tracing::warn!(file = %p.display(), "outbox bound reached: dropped an unpublished result");
                dropped.push(p);
            }
        }
        self.dropped
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
        dropped
    }

    /// Depth, bytes and bounds.
    pub fn stats(&self) -> OutboxStats {
        let pending = list_results(&self.dir);
        let mut held = list_results(&self.sent);
        held.extend(orphan_srs(&self.dir));
        OutboxStats {
            depth: pending.len() as u64,
            bytes: pending.iter().chain(held.iter()).map(|f| f.2).sum(),
            max_bytes: self.max_bytes,
            max_age_hours: self.max_age.as_secs() / 3600,
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// The SR that travels with a result JSON: `<result_id>.dcm` beside it.
fn sr_of(json: &Path) -> PathBuf {
    json.with_extension("dcm")
}

/// Moves a result and its SR (when there is one) into `to_dir`.
fn move_with_sr(json: &Path, to_dir: &Path) -> std::io::Result<()> {
    for p in [json.to_path_buf(), sr_of(json)] {
        let Some(name) = p.file_name() else { continue };
        match move_durable(&p, &to_dir.join(name)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

/// Deletes a result (a JSON or an orphan SR) and its SR.
fn remove_with_sr(p: &Path) -> std::io::Result<()> {
    std::fs::remove_file(p)?;
    match std::fs::remove_file(sr_of(p)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Files in `dir` ending in `ext` (not temporaries): (path, modified, length).
fn list_files(dir: &Path, ext: &str) -> Vec<(PathBuf, SystemTime, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.ends_with(ext) && !n.starts_with('.')
        })
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            m.is_file().then(|| {
                (
                    e.path(),
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                )
            })
        })
        .collect()
}

/// Result JSONs in `dir`, each length including its SR's.
fn list_results(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut v = list_files(dir, ".json");
    for (p, _, len) in &mut v {
        *len += std::fs::metadata(sr_of(p)).map(|m| m.len()).unwrap_or(0);
    }
    v
}

/// SRs in `dir` whose result JSON is not there.
fn orphan_srs(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut v = list_files(dir, ".dcm");
    v.retain(|(p, _, _)| !p.with_extension("json").exists());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_sent_then_size_bound() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path(), Duration::from_secs(3600), 25).unwrap();
        let a = ob.write("a", b"0123456789").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        ob.write("b", b"0123456789").unwrap();
        assert_eq!(ob.pending().len(), 2);
        assert_eq!(ob.pending()[0], a);
        ob.mark_sent(&a).unwrap();
        assert!(ob.contains("a"));
        assert_eq!(ob.stats().depth, 1);
        std::thread::sleep(Duration::from_millis(20));
        ob.write("c", b"0123456789").unwrap();
        // 30 bytes > 25: the oldest (a, already sent) goes, and it was not dropped unsent.
        assert_eq!(ob.prune().len(), 0);
        assert!(!ob.contains("a"));
        assert_eq!(ob.stats().bytes, 20);
        let tiny = Outbox::open(dir.path(), Duration::from_secs(3600), 5).unwrap();
        assert_eq!(tiny.prune().len(), 2);
        assert_eq!(tiny.stats().dropped, 2);
    }

    #[test]
    fn pruning_takes_sent_results_before_any_unsent_one() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path(), Duration::from_secs(3600), 25).unwrap();
        // The unsent result is the oldest; two newer ones were sent.
        ob.write("old-unsent", b"0123456789").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        for id in ["s1", "s2"] {
            let p = ob.write(id, b"0123456789").unwrap();
            ob.mark_sent(&p).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(ob.prune().len(), 0);
        assert!(
            ob.contains("old-unsent"),
            "an unsent result went while sent ones remained"
        );
        assert!(!ob.contains("s1") && ob.contains("s2"));
    }

    #[test]
    fn an_sr_counts_moves_and_goes_with_its_result() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path(), Duration::from_secs(3600), 1000).unwrap();
        std::fs::write(dir.path().join("a.dcm"), [0u8; 100]).unwrap();
        let a = ob.write("a", b"0123456789").unwrap();
        assert_eq!(ob.stats().bytes, 110);
        ob.mark_sent(&a).unwrap();
        assert!(dir.path().join("sent/a.dcm").exists());
        assert!(!dir.path().join("a.dcm").exists());
        // An SR without its JSON (crash between the writes) is held and bounded too.
        std::fs::write(dir.path().join("b.dcm"), [0u8; 50]).unwrap();
        assert_eq!(ob.stats().bytes, 160);
        std::thread::sleep(Duration::from_millis(20));
        ob.write("c", b"0123456789").unwrap();
        std::fs::write(dir.path().join("c.dcm"), [0u8; 100]).unwrap();
        // 270 bytes > 150: a (sent, with its SR) and the orphan SR go; c and its SR stay.
        let small = Outbox::open(dir.path(), Duration::from_secs(3600), 150).unwrap();
        assert_eq!(small.prune().len(), 0);
        assert!(!dir.path().join("sent/a.dcm").exists() && !dir.path().join("b.dcm").exists());
        assert_eq!(small.stats().bytes, 110);
        let tiny = Outbox::open(dir.path(), Duration::from_secs(3600), 5).unwrap();
        assert_eq!(tiny.prune().len(), 1);
        assert!(
            !dir.path().join("c.dcm").exists(),
            "an SR outlived its result"
        );
        let r = ob.write("r", b"{}").unwrap();
        std::fs::write(dir.path().join("r.dcm"), b"sr").unwrap();
        ob.refuse(&r, &serde_json::json!({"reason": "test"}))
            .unwrap();
        assert!(dir.path().join("refused/r.dcm").exists());
    }
}
