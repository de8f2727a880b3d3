//! The received-instance store: `<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`
//! under `<state_dir>/dicom`. UIDs are checked ([`super::uid::check`]) before they become
//! path parts; each instance is written atomically (temporary file, fsync, rename, fsync of
//! the folder), so a folder never holds half an instance. A series is stable once its
//! newest instance file is older than `dicom.stable_secs` (file times, so this survives a
//! restart). Pruning deletes whole series, oldest last arrival first, by age and total bytes.
//! [`Store::put_within`] checks a series' limits and writes under that series' lock, so
//! concurrent associations into one series cannot together overshoot a limit.

use super::uid;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
    /// Per series (by folder), held while its limits are checked and an instance written.
    locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
}

/// The per-series limits ([`Store::put_within`]).
#[derive(Debug, Clone, Copy)]
pub struct SeriesLimits {
    /// `dicom.max_instances_per_series`.
    pub max_instances: usize,
    /// `dicom.max_series_bytes`.
    pub max_bytes: u64,
}

/// Why [`Store::put_within`] stored nothing.
#[derive(Debug)]
pub enum PutError {
    /// The instance would take the series past a limit: the config key.
    Full(&'static str, u64),
    /// A bad SOP Instance UID or a write error.
    Io(std::io::Error),
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
            locks: Mutex::new(HashMap::new()),
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
        crate::fsutil::write_atomic(&path, bytes)?;
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

    /// Like [`Store::put`], once the series' limits allow it (a replaced instance counts
    /// once), checked and written under the series' lock.
    pub fn put_within(
        &self,
        dir: &Path,
        sop: &str,
        bytes: &[u8],
        limits: SeriesLimits,
    ) -> Result<bool, PutError> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(dir.to_path_buf()).or_default().clone()
        };
        let _series = lock.lock().unwrap_or_else(|e| e.into_inner());
        let used = self.usage(dir);
        let old = uid::check(sop)
            .ok()
            .and_then(|s| std::fs::metadata(dir.join(format!("{s}.dcm"))).ok())
            .map(|m| m.len());
        if old.is_none() && used.instances >= limits.max_instances {
            return Err(PutError::Full(
                "dicom.max_instances_per_series",
                limits.max_instances as u64,
            ));
        }
        if used.bytes - old.unwrap_or(0).min(used.bytes) + bytes.len() as u64 > limits.max_bytes {
            return Err(PutError::Full("dicom.max_series_bytes", limits.max_bytes));
        }
        self.put(dir, sop, bytes).map_err(PutError::Io)
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
                self.locks
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

    #[test]
    fn concurrent_puts_never_overshoot_a_series_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(tmp.path()).unwrap());
        let dir = store.series_dir("1.2", "1.2.3").unwrap();
        let limits = SeriesLimits {
            max_instances: 25,
            max_bytes: 1 << 20,
        };
        let stored: usize = (0..8)
            .map(|t| {
                let (store, dir) = (store.clone(), dir.clone());
                std::thread::spawn(move || {
                    (0..10)
                        .filter(|i| {
                            store
                                .put_within(&dir, &format!("1.2.3.{t}.{i}"), b"x", limits)
                                .is_ok()
                        })
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(stored, 25);
        assert_eq!(scan(&dir).1.instances, 25);
        // Bytes: 25 + 10 > 30 refused; replacing a held instance counts once.
        let bytes = SeriesLimits {
            max_instances: 100,
            max_bytes: 30,
        };
        assert!(matches!(
            store.put_within(&dir, "1.2.3.9.9", &[0; 10], bytes),
            Err(PutError::Full("dicom.max_series_bytes", 30))
        ));
        let held = std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let sop = held.file_stem().unwrap().to_string_lossy().into_owned();
        let full = SeriesLimits {
            max_instances: 25,
            ..bytes
        };
        assert!(store.put_within(&dir, &sop, &[0; 5], full).is_ok());
    }
}
