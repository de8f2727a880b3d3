//! Durable per-job records in `state_dir`, so that what the daemon knows about a job
//! survives a crash, SIGKILL or power cut:
//!
//! - `attempts/<job file name>`: `{"origin": "inbox"|"mqtt", "attempts": N}`, written
//!   (atomically) before a job runs and removed once its result is out. A job found in
//!   `processing/` at start with `attempts >= jobs.max_attempts` crashed, aborted or hung
//!   the daemon that many times: it is failed instead of run again.
//! - `job-ids/<sha256(job_id), 32 hex>`: the content hashes of the jobs seen with that
//!   `job_id`, one a line, so a different job reusing an id is noticed (`job_id_reused`).

use super::input::Origin;
use super::outbox::write_atomic;
use sha2::Digest;
use std::path::{Path, PathBuf};

/// The attempts record of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attempts {
    /// Where the job came from.
    pub origin: Origin,
    /// Attempts started (including one in progress).
    pub attempts: u32,
}

/// The ledger folders.
#[derive(Debug, Clone)]
pub struct Ledger {
    attempts: PathBuf,
    job_ids: PathBuf,
}

impl Ledger {
    /// Opens (creating) the ledger under `state_dir`.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let me = Self {
            attempts: state_dir.join("attempts"),
            job_ids: state_dir.join("job-ids"),
        };
        std::fs::create_dir_all(&me.attempts)?;
        std::fs::create_dir_all(&me.job_ids)?;
        Ok(me)
    }

    /// The folders the ledger writes to (for stale-file cleanup and retention).
    pub fn dirs(&self) -> [&Path; 2] {
        [&self.attempts, &self.job_ids]
    }

    /// The record of job file `name`, when one exists and is readable.
    pub fn attempts(&self, name: &str) -> Option<Attempts> {
        let bytes = std::fs::read(self.attempts.join(name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records one more attempt of job file `name`; returns the record written.
    pub fn begin(&self, name: &str, origin: Origin) -> std::io::Result<Attempts> {
        let before = self.attempts(name).map(|a| a.attempts).unwrap_or(0);
        let rec = Attempts {
            origin,
            attempts: before + 1,
        };
        self.write(name, &rec)?;
        Ok(rec)
    }

    /// Takes back the attempt in progress (a clean interruption is not a failed attempt).
    pub fn undo(&self, name: &str, rec: Attempts) -> std::io::Result<()> {
        if rec.attempts <= 1 {
            self.clear(name)
        } else {
            self.write(
                name,
                &Attempts {
                    attempts: rec.attempts - 1,
                    ..rec
                },
            )
        }
    }

    /// Forgets job file `name` (its result is out).
    pub fn clear(&self, name: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.attempts.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn write(&self, name: &str, rec: &Attempts) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
        write_atomic(&self.attempts.join(name), &bytes)
    }

    /// Records that `job_id` names the job with `content` hash; returns whether the id
    /// named a job with other content before (a redelivery of any earlier content is not
    /// a reuse).
    pub fn note_job_id(&self, job_id: &str, content: &str) -> std::io::Result<bool> {
        let key = hex::encode(&sha2::Sha256::digest(job_id.as_bytes())[..16]);
        let path = self.job_ids.join(key);
        let prev = std::fs::read_to_string(&path).unwrap_or_default();
        if prev.lines().any(|l| l == content) {
            return Ok(false);
        }
        write_atomic(&path, format!("{prev}{content}\n").as_bytes())?;
        Ok(!prev.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_count_durably_and_undo_and_reuse_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        assert_eq!(l.attempts("a.json"), None);
        let r1 = l.begin("a.json", Origin::Mqtt).unwrap();
        let r2 = Ledger::open(dir.path())
            .unwrap()
            .begin("a.json", Origin::Mqtt)
            .unwrap();
        assert_eq!((r1.attempts, r2.attempts), (1, 2));
        l.undo("a.json", r2).unwrap();
        assert_eq!(l.attempts("a.json").unwrap().attempts, 1);
        l.clear("a.json").unwrap();
        assert_eq!(l.attempts("a.json"), None);
        assert!(!l.note_job_id("J1", "aaa").unwrap());
        assert!(!l.note_job_id("J1", "aaa").unwrap());
        assert!(l.note_job_id("J1", "bbb").unwrap());
        assert!(!l.note_job_id("J1", "aaa").unwrap());
    }
}
