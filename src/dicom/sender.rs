//! The PACS sender: a durable queue of SR files (`<state_dir>/pacs/<result_id>.dcm`, written
//! atomically before anything is sent) and one thread that sends them oldest first by
//! C-STORE (dicom-ul SCU, Explicit or Implicit VR Little Endian). A file leaves the queue
//! when the PACS answers success (0x0000) or a warning (0x0001, 0xB...), and a restart resends
//! what is queued (a PACS receiving the same SOP Instance UID twice keeps one).
//!
//! Failures, by what resending could change ([`Failure`]):
//! - the PACS away or the association rejected (A-ASSOCIATE-RJ, any reason): nothing about
//!   this SR; it stays, and the sender backs off (1 s doubling up to `retry_max_secs`);
//! - a transient refusal of the SR (0xA7xx out of resources, 0x0110 processing failure,
//!   any status not listed below): retried with the backoff; after `max_attempts` of them
//!   it is refused for good. The count is durable: `<result_id>.attempts` beside the SR
//!   (decimal text, written atomically after each refusal, deleted with the SR), so a
//!   restart does not grant an SR `max_attempts` more;
//! - a permanent refusal (PS3.4 C.4.2.1.4 / PS3.7 C: 0xA9xx data set does not match the SOP
//!   class, 0xCxxx cannot understand, 0x0122 SOP class not supported, 0x0124 not authorized,
//!   0x0117 invalid SOP instance, 0x0211 unrecognized operation; or no presentation context
//!   accepted for the SR's SOP class): refused at once.
//!
//! A refused SR moves to `pacs/refused/` with `<result_id>.reason.json` (kept, outside the
//! bounds; the outbox keeps its own copy beside the JSON result). Bounds of the queue
//! (`max_queue_files`, `max_queue_bytes`, `max_queue_age_hours`): past them the oldest SRs
//! are deleted, each one logged and counted in `dropped`.

use super::config::PacsConfig;
use super::sr::COMPREHENSIVE_3D_SR;
use dicom_core::{dicom_value, DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use dicom_ul::{ClientAssociationOptions, Pdu};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime};

/// Counters of the sender.
#[derive(Debug, Default)]
pub struct PacsStats {
    /// SRs the PACS accepted.
    pub sent: AtomicU64,
    /// Attempts that failed (PACS away, refused, error status).
    pub failed_attempts: AtomicU64,
    /// SRs moved to `refused/` (permanent refusal, or `max_attempts` transient ones).
    pub refused: AtomicU64,
    /// SRs deleted unsent by the queue's bounds.
    pub dropped: AtomicU64,
}

/// Why one SR was not sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The PACS is away, or it rejected the association: nothing about this SR.
    Away(String),
    /// The PACS refused this SR; `permanent` when resending it cannot help.
    Refused {
        /// What the PACS said.
        reason: String,
        /// The C-STORE status, when the PACS answered one.
        status: Option<u16>,
        /// A permanent refusal (see the module doc).
        permanent: bool,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Away(m) => f.write_str(m),
            Failure::Refused {
                reason, permanent, ..
            } => {
                let kind = if *permanent { "permanent" } else { "transient" };
                write!(f, "{reason} ({kind})")
            }
        }
    }
}

/// A C-STORE response status: `Ok` when the PACS took the SR, else the refusal.
pub fn judge_status(status: u16) -> Result<(), Failure> {
    if status == 0 || status == 1 || status & 0xF000 == 0xB000 {
        return Ok(());
    }
    let permanent = matches!(status & 0xFF00, 0xA900)
        || status & 0xF000 == 0xC000
        || matches!(status, 0x0122 | 0x0124 | 0x0117 | 0x0211);
    Err(Failure::Refused {
        reason: format!("C-STORE status {status:#06x}"),
        status: Some(status),
        permanent,
    })
}

/// The durable queue of SRs for the PACS.
#[derive(Debug)]
pub struct PacsQueue {
    dir: PathBuf,
    refused_dir: PathBuf,
    /// Counters.
    pub stats: PacsStats,
    wake: (Mutex<bool>, Condvar),
    limits: QueueLimits,
}

/// The bounds of the queue and the refusals an SR may take.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// `dicom.pacs.max_attempts`.
    pub max_attempts: u32,
    /// `dicom.pacs.max_queue_files`.
    pub max_files: usize,
    /// `dicom.pacs.max_queue_bytes`.
    pub max_bytes: u64,
    /// `dicom.pacs.max_queue_age_hours`.
    pub max_age: Duration,
}

impl QueueLimits {
    /// The limits of `[dicom.pacs]`.
    pub fn of(pacs: &PacsConfig) -> Self {
        Self {
            max_attempts: pacs.max_attempts.max(1),
            max_files: pacs.max_queue_files,
            max_bytes: pacs.max_queue_bytes,
            max_age: Duration::from_secs(pacs.max_queue_age_hours.saturating_mul(3600)),
        }
    }
}

impl PacsQueue {
    /// Opens (creating) the queue folder and its `refused/`.
    pub fn open(dir: &Path, limits: QueueLimits) -> std::io::Result<Self> {
        let refused_dir = dir.join("refused");
        std::fs::create_dir_all(&refused_dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            refused_dir,
            stats: PacsStats::default(),
            wake: (Mutex::new(false), Condvar::new()),
            limits,
        })
    }

    /// Queues an SR (atomic write; an SR queued already is kept), applies the bounds and
    /// wakes the sender.
    pub fn enqueue(&self, result_id: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.dir.join(format!("{result_id}.dcm"));
        if !path.exists() {
            crate::fsutil::write_atomic(&path, bytes)?;
        }
        self.prune();
        *self.wake.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.1.notify_all();
        Ok(())
    }

    /// Queued SRs, oldest first: (path, modified, bytes).
    fn held(&self) -> Vec<(PathBuf, SystemTime, u64)> {
        let mut v: Vec<(PathBuf, SystemTime, u64)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.ends_with(".dcm") && !n.starts_with('.')
            })
            .filter_map(|e| {
                let m = e.metadata().ok().filter(|m| m.is_file())?;
                Some((e.path(), m.modified().ok()?, m.len()))
            })
            .collect();
        v.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        v
    }

    /// Queued SRs, oldest first.
    pub fn pending(&self) -> Vec<PathBuf> {
        self.held().into_iter().map(|f| f.0).collect()
    }

    /// SRs refused for good (in `refused/`).
    pub fn refused(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.refused_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
            .collect();
        v.sort();
        v
    }

    /// Deletes the oldest SRs while the queue is over a bound; returns how many went.
    pub fn prune(&self) -> u64 {
        let held = self.held();
        let now = SystemTime::now();
        let mut files = held.len();
        let mut bytes: u64 = held.iter().map(|f| f.2).sum();
        let mut dropped = 0;
        for (p, t, len) in held {
            let old = now.duration_since(t).unwrap_or_default() > self.limits.max_age;
            let over = files > self.limits.max_files || bytes > self.limits.max_bytes;
            if !old && !over {
                break;
            }
            if std::fs::remove_file(&p).is_ok() {
                files -= 1;
                bytes -= len.min(bytes);
                dropped += 1;
                let why = if old {
                    "max_queue_age_hours"
                } else {
                    "max_queue_files / max_queue_bytes"
                };
                tracing::warn!(file = %p.display(), bound = why, "PACS queue bound reached: dropped an unsent SR (the outbox keeps its copy)");
            }
        }
        self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
        self.remove_orphan_counts();
        dropped
    }

    /// Moves an SR to `refused/` with `<result_id>.reason.json` beside it.
    fn refuse(&self, file: &Path, failure: &Failure, attempts: u32) {
        let (Some(name), Some(stem)) = (file.file_name(), file.file_stem()) else {
            return;
        };
        let (reason, status) = match failure {
            Failure::Refused { reason, status, .. } => (reason.clone(), *status),
            Failure::Away(m) => (m.clone(), None),
        };
        let note = serde_json::json!({
            "result_id": stem.to_string_lossy(),
            "reason": reason,
            "status": status.map(|s| format!("{s:#06x}")),
            "attempts": attempts,
            "refused_at": time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        });
        let reason_path = self
            .refused_dir
            .join(format!("{}.reason.json", stem.to_string_lossy()));
        let moved = crate::fsutil::write_atomic(
            &reason_path,
            &serde_json::to_vec_pretty(&note).unwrap_or_default(),
        )
        .and_then(|()| crate::fsutil::move_durable(file, &self.refused_dir.join(name)));
        match moved {
            Ok(()) => {
                let _ = std::fs::remove_file(attempts_path(file));
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(file = %file.display(), reason = %failure, attempts, "the PACS refused the SR: moved to pacs/refused/");
            }
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "could not move a refused SR")
            }
        }
    }

    /// Notes one failure of `file` in its `.attempts` file; `Some(attempts)` once it is
    /// refused for good. (A count that cannot be written is logged: the SR is then retried
    /// like one refused fewer times, still bounded by the queue's age and size.)
    fn note_refusal(&self, file: &Path, failure: &Failure) -> Option<u32> {
        let Failure::Refused { permanent, .. } = failure else {
            return None;
        };
        let n = attempts_of(file) + 1;
        if *permanent || n >= self.limits.max_attempts {
            return Some(n);
        }
        if let Err(e) = crate::fsutil::write_atomic(&attempts_path(file), n.to_string().as_bytes())
        {
            tracing::warn!(file = %file.display(), error = %e, "could not record the SR's attempt count");
        }
        None
    }

    /// Deletes `.attempts` files whose SR is gone (sent, refused, dropped, or a crash
    /// between deleting the SR and its count).
    fn remove_orphan_counts(&self) {
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "attempts")
                && !e.file_name().to_string_lossy().starts_with('.')
                && !p.with_extension("dcm").exists()
            {
                let _ = std::fs::remove_file(&p);
            }
        }
    }

    /// Sends until `stop` is set; waits on new SRs or the backoff in between.
    pub fn run(&self, pacs: &PacsConfig, our_ae: &str, stop: &AtomicBool) {
        let max = Duration::from_secs(pacs.retry_max_secs.max(1));
        let mut backoff = Duration::from_secs(1);
        while !stop.load(Ordering::SeqCst) {
            self.prune();
            let mut failed = false;
            for file in self.pending() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                match send(pacs, our_ae, &file) {
                    Ok(()) => {
                        // Counted before the queue file goes: whoever sees the queue empty
                        // also sees the count.
                        self.stats.sent.fetch_add(1, Ordering::Relaxed);
                        let _ = std::fs::remove_file(&file);
                        let _ = std::fs::remove_file(attempts_path(&file));
                        tracing::info!(file = %file.display(), pacs = %pacs.ae_title, "SR sent to the PACS");
                        backoff = Duration::from_secs(1);
                    }
                    Err(failure) => {
                        self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                        if let Some(attempts) = self.note_refusal(&file, &failure) {
                            self.refuse(&file, &failure, attempts);
                            continue;
                        }
                        tracing::warn!(file = %file.display(), pacs = %format!("{}@{}:{}", pacs.ae_title, pacs.host, pacs.port), error = %failure, retry_secs = backoff.as_secs(), "SR not sent; kept for a retry");
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                sleep_unless(stop, backoff);
                backoff = (backoff * 2).min(max);
                continue;
            }
            let guard = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            let (mut woken, _) = self
                .wake
                .1
                .wait_timeout_while(guard, Duration::from_secs(1), |w| !*w)
                .unwrap_or_else(|e| e.into_inner());
            *woken = false;
        }
    }
}

/// `<result_id>.attempts` beside a queued `<result_id>.dcm`.
fn attempts_path(sr: &Path) -> PathBuf {
    sr.with_extension("attempts")
}

/// Transient refusals recorded for a queued SR (0 when none, or unreadable).
fn attempts_of(sr: &Path) -> u32 {
    std::fs::read_to_string(attempts_path(sr))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let until = std::time::Instant::now() + d;
    while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One C-STORE of a Part-10 file to the PACS.
pub fn send(pacs: &PacsConfig, our_ae: &str, file: &Path) -> Result<(), Failure> {
    let unreadable = |e: String| Failure::Refused {
        reason: e,
        status: None,
        permanent: true,
    };
    let away = Failure::Away;
    let obj = dicom_object::open_file(file)
        .map_err(|e| unreadable(format!("{}: {e}", file.display())))?;
    let sop_class = obj
        .meta()
        .media_storage_sop_class_uid()
        .trim_end_matches('\0')
        .to_string();
    let sop = obj
        .meta()
        .media_storage_sop_instance_uid()
        .trim_end_matches('\0')
        .to_string();
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title(our_ae)
        .called_ae_title(pacs.ae_title.as_str())
        .with_presentation_context(
            if sop_class.is_empty() {
                COMPREHENSIVE_3D_SR.to_string()
            } else {
                sop_class.clone()
            },
            vec![
                uids::EXPLICIT_VR_LITTLE_ENDIAN.to_string(),
                uids::IMPLICIT_VR_LITTLE_ENDIAN.to_string(),
            ],
        )
        .connection_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(60))
        .establish((pacs.host.as_str(), pacs.port))
        .map_err(|e| match e {
            dicom_ul::association::Error::NoAcceptedPresentationContexts { .. } => {
                Failure::Refused {
                    reason: format!(
                        "the PACS accepted no presentation context for SOP class {sop_class}"
                    ),
                    status: None,
                    permanent: true,
                }
            }
            dicom_ul::association::Error::Rejected { association_rj, .. } => {
                Failure::Away(format!(
                    "association rejected ({:?}): {:?}",
                    association_rj.result, association_rj.source
                ))
            }
            e => Failure::Away(format!("association: {e}")),
        })?;
    let pc = assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == dicom_ul::pdu::PresentationContextResultReason::Acceptance)
        .cloned()
        .ok_or_else(|| Failure::Refused {
            reason: format!("the PACS accepted no presentation context for SOP class {sop_class}"),
            status: None,
            permanent: true,
        })?;
    let ts = TransferSyntaxRegistry
        .get(pc.transfer_syntax.trim_end_matches('\0'))
        .ok_or_else(|| unreadable(format!("transfer syntax {} unknown", pc.transfer_syntax)))?;
    let mut data = Vec::new();
    obj.write_dataset_with_ts(&mut data, ts)
        .map_err(|e| unreadable(e.to_string()))?;
    let cmd = InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class.as_str()),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x0001])),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [1])),
        DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0x0000])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0000]),
        ),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop.as_str()),
        ),
    ]);
    let implicit = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut cmd_bytes = Vec::new();
    cmd.write_dataset_with_ts(&mut cmd_bytes, &implicit)
        .map_err(|e| unreadable(e.to_string()))?;
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc.id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: cmd_bytes,
            }],
        })
        .map_err(|e| away(format!("sending the command: {e}")))?;
    {
        let mut w = assoc.send_pdata(pc.id);
        w.write_all(&data)
            .map_err(|e| away(format!("sending the SR: {e}")))?;
        w.finish()
            .map_err(|e| away(format!("sending the SR: {e}")))?;
    }
    let status = loop {
        match assoc
            .receive()
            .map_err(|e| away(format!("waiting for the response: {e}")))?
        {
            Pdu::PData { data } => {
                let Some(v) = data
                    .into_iter()
                    .find(|v| v.value_type == PDataValueType::Command && v.is_last)
                else {
                    continue;
                };
                let rsp = InMemDicomObject::read_dataset_with_ts(v.data.as_slice(), &implicit)
                    .map_err(|e| away(format!("response: {e}")))?;
                break rsp
                    .element_opt(tags::STATUS)
                    .ok()
                    .flatten()
                    .and_then(|e| e.to_int::<u16>().ok())
                    .ok_or_else(|| away("response without Status".into()))?;
            }
            Pdu::AbortRQ { .. } => return Err(away("the PACS aborted the association".into())),
            _ => continue,
        }
    };
    let _ = assoc.release();
    judge_status(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_judged_by_what_a_resend_could_change() {
        assert!(judge_status(0x0000).is_ok() && judge_status(0xB007).is_ok());
        let permanent = |s| {
            matches!(
                judge_status(s),
                Err(Failure::Refused {
                    permanent: true,
                    ..
                })
            )
        };
        for s in [0xA900, 0xA9FF, 0xC000, 0xC123, 0x0122, 0x0124] {
            assert!(permanent(s), "{s:#06x}");
        }
        for s in [0xA700, 0xA7FF, 0x0110, 0xFE00] {
            assert!(
                matches!(
                    judge_status(s),
                    Err(Failure::Refused {
                        permanent: false,
                        ..
                    })
                ),
                "{s:#06x}"
            );
        }
    }

    #[test]
    fn bounds_drop_the_oldest_and_count_them() {
        let tmp = tempfile::tempdir().unwrap();
        let limits = QueueLimits {
            max_attempts: 2,
            max_files: 2,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(3600),
        };
        let q = PacsQueue::open(tmp.path(), limits).unwrap();
        for id in ["a", "b", "c"] {
            q.enqueue(id, b"sr").unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        let names: Vec<String> = q
            .pending()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["b.dcm", "c.dcm"]);
        assert_eq!(q.stats.dropped.load(Ordering::Relaxed), 1);
        let aged = PacsQueue::open(
            tmp.path(),
            QueueLimits {
                max_age: Duration::ZERO,
                ..limits
            },
        )
        .unwrap();
        assert_eq!(aged.prune(), 2);
        // Transient refusals: refused for good at max_attempts; a permanent one at once.
        let t = Failure::Refused {
            reason: "x".into(),
            status: Some(0xA700),
            permanent: false,
        };
        let f = tmp.path().join("b.dcm");
        assert_eq!(q.note_refusal(&f, &t), None);
        // The count is on disk: a queue opened again (a restart) goes on from it.
        let again = PacsQueue::open(tmp.path(), limits).unwrap();
        assert_eq!(again.note_refusal(&f, &t), Some(2));
        // A count whose SR is gone is deleted by the next prune.
        assert!(tmp.path().join("b.attempts").is_file());
        q.prune();
        assert!(!tmp.path().join("b.attempts").exists());
        assert_eq!(q.note_refusal(&f, &Failure::Away("down".into())), None);
        let p = Failure::Refused {
            reason: "x".into(),
            status: Some(0xA900),
            permanent: true,
        };
        assert_eq!(q.note_refusal(&f, &p), Some(1));
    }
}
