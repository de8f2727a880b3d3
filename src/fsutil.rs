//! Durable file writes shared by the daemon's outbox, inbox and ledger and the DICOM store and
//! PACS queue: atomic replace (temporary file, fsync, rename, fsync of the folder), a durable
//! move, and a folder fsync. Temporary files are named `.<name>.<pid>.tmp` (the daemon's
//! stale-file cleanup, `daemon::disk`, removes those left by a crash).

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically and durably: `.name.tmp`, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        // Nothing half-written stays behind (a full disk, an I/O error).
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Moves `from` to `to` (same filesystem: rename; otherwise copy, fsync, remove) and makes
/// the move durable.
pub fn move_durable(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(18) => {
            // EXDEV: another filesystem.
            let bytes = std::fs::read(from)?;
            write_atomic(to, &bytes)?;
            std::fs::remove_file(from)?;
        }
        Err(e) => return Err(e),
    }
    if let Some(d) = to.parent() {
        sync_dir(d)?;
    }
    if let Some(d) = from.parent() {
        sync_dir(d)?;
    }
    Ok(())
}

/// fsyncs a folder so a rename in it survives a power cut.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
