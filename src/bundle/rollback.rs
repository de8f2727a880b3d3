//! Anti-rollback: the daemon never serves a bundle version below the highest it has served,
//! except once after an explicit `noduled bundle rollback`.
//!
//! - `STATE_DIR/served.json` (the *floor*): the highest version served, written (tmp +
//!   rename) each time a model passes its self-tests and is swapped in.
//! - `STORE/rollback.json` (the *record*): written by `noduled bundle rollback`: the version
//!   rolled back from, the bundle rolled back to, and when.
//!
//! A version below the floor is admitted only when a record names exactly that bundle and was
//! made from a version at or above the floor, and that record has not been used before (the
//! floor keeps the last record it accepted). Each acceptance is logged as a warning. An
//! attacker who only switches `current` (or `model.path`) to an older signed bundle is refused;
//! one who can also write the store could forge a record, which is why the store is writable by
//! the daemon's user alone (see systemd/noduled.service).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The floor's file name in the state dir.
pub const FLOOR: &str = "served.json";
/// The rollback record's file name in the store.
pub const RECORD: &str = "rollback.json";

/// What the daemon has served.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Floor {
    /// The highest bundle version served (or, after a rollback, the version rolled back to).
    pub highest_version: u64,
    /// Its model id.
    pub model_id: String,
    /// The last rollback record accepted (its `at`), so it is not accepted twice.
    #[serde(default)]
    pub used_record: Option<String>,
}

/// A field engineer's rollback, written by `noduled bundle rollback`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Version that was current before.
    pub from_version: u64,
    /// Store name (`model_id-version`) of the bundle made current.
    pub to: String,
    /// Its version.
    pub to_version: u64,
    /// RFC 3339 time of the rollback.
    pub at: String,
}

/// The store a model path belongs to: the path itself when it holds `current`, its parent
/// when it is the `current` link; `None` for a bare bundle.
pub fn store_of(model_path: &Path) -> Option<PathBuf> {
    if model_path.join(super::store::CURRENT).exists() {
        Some(model_path.to_path_buf())
    } else if model_path
        .file_name()
        .is_some_and(|n| n == super::store::CURRENT)
    {
        model_path.parent().map(Path::to_path_buf)
    } else {
        None
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Records a rollback in `store` (called by `noduled bundle rollback`).
pub fn record(store: &Path, from_version: u64, to: &super::Manifest) -> Result<Record, String> {
    let rec = Record {
        from_version,
        to: to.store_name(),
        to_version: to.version,
        at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    };
    let path = store.join(RECORD);
    let text = serde_json::to_vec_pretty(&rec).expect("serialises");
    write_atomic(&path, &text)?;
    Ok(rec)
}

/// Admits version `v` of bundle `model_id` loaded from `model_path` against the floor in
/// `state_dir`, and on success raises (or, after an accepted rollback, lowers) and persists
/// the floor.
pub fn admit(state_dir: &Path, model_path: &Path, model_id: &str, v: u64) -> Result<(), String> {
    let floor_path = state_dir.join(FLOOR);
    let floor: Floor = read_json(&floor_path)?.unwrap_or_default();
    let store_name = format!("{model_id}-{v}");
    let mut next = Floor {
        highest_version: v.max(floor.highest_version),
        model_id: model_id.to_string(),
        used_record: floor.used_record.clone(),
    };
    if v < floor.highest_version {
        let record: Option<Record> = match store_of(model_path) {
            Some(store) => read_json(&store.join(RECORD))?,
            None => None,
        };
        let ok = record.as_ref().filter(|r| {
            r.to == store_name
                && r.to_version == v
                && r.from_version >= floor.highest_version
                && floor.used_record.as_deref() != Some(r.at.as_str())
        });
        let Some(r) = ok else {
            return Err(format!(
                "version {v} of {} is below version {} already served (anti-rollback, {}); \
                 go back on purpose with `noduled bundle rollback`",
                model_id,
                floor.highest_version,
                floor_path.display()
            ));
        };
        tracing::warn!(
            from = r.from_version,
            to = %r.to,
            recorded_at = %r.at,
            "serving an older bundle after `noduled bundle rollback`"
        );
        next.highest_version = v;
        next.used_record = Some(r.at.clone());
    }
    if next != floor {
        let text = serde_json::to_vec_pretty(&next).expect("serialises");
        write_atomic(&floor_path, &text)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` through a synced temporary file and rename(2).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
