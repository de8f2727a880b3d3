//! The received-instance store: `<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`
//! under `<state_dir>/dicom`. UIDs are checked ([`super::uid::check`]) before they become
//! path parts; each instance is written atomically (temporary file, fsync, rename, fsync of
//! the folder), so a folder never holds half an instance. A series is stable once its
//! newest instance file is older than `dicom.stable_secs` (file times, so this survives a
//! restart). Pruning deletes whole series, oldest last arrival first, by age and total bytes.

use super::uid;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Counts of one series held, for the per-series limits.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SeriesUse {
    /// Instances stored.
    pub instances: usize,
    /// Bytes stored.
    pub bytes: u64,
}

/// The store of received instances.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// Per series (by folder), what is held; filled from disk on first sight.
    usage: Mutex<HashMap<PathBuf, SeriesUse>>,
}

/// A series folder and when its newest instance arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldSeries {
    /// The folder.
    pub dir: PathBuf,
    /// Newest instance's modification time.
    pub last: SystemTime,
    /// Instances and bytes.
    pub usage: SeriesUse,
}

impl Store {
    /// Opens (creating) the store folder.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_path_buf(),
            usage: Mutex::new(HashMap::new()),
        })
    }

    /// The store folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of a series, the UIDs checked.
    pub fn series_dir(&self, study: &str, series: &str) -> Result<PathBuf, uid::UidError> {
        Ok(self.root.join(uid::check(study)?).join(uid::check(series)?))
    }

    /// What a series folder holds now.
    pub fn usage(&self, dir: &Path) -> SeriesUse {
        let mut map = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(dir.to_path_buf()).or_insert_with(|| scan(dir).1)
    }

    /// Writes one instance atomically; `Ok(false)` when it was held already (same SOP
    /// Instance UID: the new copy replaces it, counts unchanged).
    pub fn put(&self, dir: &Path, sop: &str, bytes: &[u8]) -> std::io::Result<bool> {
        let sop = uid::check(sop)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{sop}.dcm"));
        let old = std::fs::metadata(&path).ok().map(|m| m.len());
        crate::daemon::outbox::write_atomic(&path, bytes)?;
        let mut map = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let Some(u) = map.get_mut(dir) else {
            // First sight: the scan counts the new file too.
            map.insert(dir.to_path_buf(), scan(dir).1);
            return Ok(old.is_none());
        };
        u.bytes = u.bytes - old.unwrap_or(0).min(u.bytes) + bytes.len() as u64;
        u.instances += usize::from(old.is_none());
        Ok(old.is_none())
    }

    /// The folder holding series `series_uid` (any study), when any instance arrived.
    pub fn find(&self, series_uid: &str) -> Result<Option<PathBuf>, uid::UidError> {
        let series_uid = uid::check(series_uid)?;
        let Ok(studies) = std::fs::read_dir(&self.root) else {
            return Ok(None);
        };
        Ok(studies
            .flatten()
            .map(|s| s.path().join(series_uid))
            .find(|p| p.is_dir()))
    }

    /// Whether the series in `dir` got no instance for `stable`.
    pub fn is_stable(dir: &Path, stable: Duration) -> bool {
        let (last, usage) = scan(dir);
        usage.instances > 0 && SystemTime::now().duration_since(last).unwrap_or_default() >= stable
    }

    /// Every series held.
    pub fn list(&self) -> Vec<HeldSeries> {
        let mut out = Vec::new();
        for study in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            for series in std::fs::read_dir(study.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let dir = series.path();
                if dir.is_dir() {
                    let (last, usage) = scan(&dir);
                    out.push(HeldSeries { dir, last, usage });
                }
            }
        }
        out
    }

    /// Deletes whole series, oldest first, while any is older than `max_age` or the total
    /// is over `max_bytes`; returns how many went.
    pub fn prune(&self, max_age: Duration, max_bytes: u64) -> usize {
        let mut all = self.list();
        all.sort_by_key(|s| s.last);
        let mut total: u64 = all.iter().map(|s| s.usage.bytes).sum();
        let now = SystemTime::now();
        let mut gone = 0;
        for s in all {
            let old = now.duration_since(s.last).unwrap_or_default() > max_age;
            if !old && total <= max_bytes {
                break;
            }
            if std::fs::remove_dir_all(&s.dir).is_ok() {
                total -= s.usage.bytes.min(total);
                gone += 1;
                self.usage
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&s.dir);
                if let Some(study) = s.dir.parent() {
                    let _ = std::fs::remove_dir(study); // only when empty
                }
                tracing::info!(series = %s.dir.display(), "received series pruned");
            }
        }
        gone
    }
}

/// Newest modification time and counts of the instance files in `dir`.
fn scan(dir: &Path) -> (SystemTime, SeriesUse) {
    let mut last = SystemTime::UNIX_EPOCH;
    let mut u = SeriesUse::default();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".dcm") {
            continue;
        }
        if let Ok(m) = e.metadata() {
            u.instances += 1;
            u.bytes += m.len();
            last = last.max(m.modified().unwrap_or(SystemTime::UNIX_EPOCH));
        }
    }
    (last, u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_find_stable_and_prune() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert!(store.series_dir("1.2", "../x").is_err());
        let dir = store.series_dir("1.2", "1.2.3").unwrap();
        assert!(store.put(&dir, "1.2.3.1", b"abcd").unwrap());
        assert!(!store.put(&dir, "1.2.3.1", b"abcdef").unwrap());
        assert!(store.put(&dir, "1.2.3.2", b"xy").unwrap());
        assert!(store.put(&dir, "../../evil", b"xy").is_err());
        assert_eq!(
            store.usage(&dir),
            SeriesUse {
                instances: 2,
                bytes: 8
            }
        );
        assert_eq!(store.find("1.2.3").unwrap(), Some(dir.clone()));
        assert_eq!(store.find("1.2.4").unwrap(), None);
        assert!(!Store::is_stable(&dir, Duration::from_secs(60)));
        assert!(Store::is_stable(&dir, Duration::ZERO));
        assert_eq!(store.prune(Duration::from_secs(3600), 100), 0);
        assert_eq!(store.prune(Duration::from_secs(3600), 7), 1);
        assert!(!dir.exists());
    }
}
