//! The PACS sender: a durable queue of SR files (`<state_dir>/pacs/<result_id>.dcm`, written
//! atomically before anything is sent) and one thread that sends them oldest first by
//! C-STORE (dicom-ul SCU, Explicit or Implicit VR Little Endian). A file leaves the queue only
//! when the PACS answers success (0x0000) or a warning (0x0001, 0xB...); otherwise it stays
//! and the sender backs off (1 s doubling up to `dicom.pacs.retry_max_secs`). A restart
//! resends what is queued (a PACS receiving the same SOP Instance UID twice keeps one).

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
}

/// The durable queue of SRs for the PACS.
#[derive(Debug)]
pub struct PacsQueue {
    dir: PathBuf,
    /// Counters.
    pub stats: PacsStats,
    wake: (Mutex<bool>, Condvar),
}

impl PacsQueue {
    /// Opens (creating) the queue folder.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            stats: PacsStats::default(),
            wake: (Mutex::new(false), Condvar::new()),
        })
    }

    /// Queues an SR (atomic write; an SR queued already is kept) and wakes the sender.
    pub fn enqueue(&self, result_id: &str, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.dir.join(format!("{result_id}.dcm"));
        if !path.exists() {
            crate::daemon::outbox::write_atomic(&path, bytes)?;
        }
        *self.wake.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.1.notify_all();
        Ok(())
    }

    /// Queued SRs, oldest first.
    pub fn pending(&self) -> Vec<PathBuf> {
        let mut v: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.ends_with(".dcm") && !n.starts_with('.')
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// Sends until `stop` is set; waits on new SRs or the backoff in between.
    pub fn run(&self, pacs: &PacsConfig, our_ae: &str, stop: &AtomicBool) {
        let max = Duration::from_secs(pacs.retry_max_secs.max(1));
        let mut backoff = Duration::from_secs(1);
        while !stop.load(Ordering::SeqCst) {
            let mut failed = false;
            for file in self.pending() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                match send(pacs, our_ae, &file) {
                    Ok(()) => {
                        let _ = std::fs::remove_file(&file);
                        self.stats.sent.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(file = %file.display(), pacs = %pacs.ae_title, "SR sent to the PACS");
                        backoff = Duration::from_secs(1);
                    }
                    Err(e) => {
                        self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(file = %file.display(), pacs = %format!("{}@{}:{}", pacs.ae_title, pacs.host, pacs.port), error = %e, retry_secs = backoff.as_secs(), "SR not sent; kept for a retry");
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

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let until = std::time::Instant::now() + d;
    while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One C-STORE of a Part-10 file to the PACS.
pub fn send(pacs: &PacsConfig, our_ae: &str, file: &Path) -> Result<(), String> {
    let obj = dicom_object::open_file(file).map_err(|e| format!("{}: {e}", file.display()))?;
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
        .map_err(|e| format!("association: {e}"))?;
    let pc = assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == dicom_ul::pdu::PresentationContextResultReason::Acceptance)
        .cloned()
        .ok_or("the PACS accepted no presentation context for the SR")?;
    let ts = TransferSyntaxRegistry
        .get(pc.transfer_syntax.trim_end_matches('\0'))
        .ok_or_else(|| format!("transfer syntax {} unknown", pc.transfer_syntax))?;
    let mut data = Vec::new();
    obj.write_dataset_with_ts(&mut data, ts)
        .map_err(|e| e.to_string())?;
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
        .map_err(|e| e.to_string())?;
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc.id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: cmd_bytes,
            }],
        })
        .map_err(|e| format!("sending the command: {e}"))?;
    {
        let mut w = assoc.send_pdata(pc.id);
        w.write_all(&data)
            .map_err(|e| format!("sending the SR: {e}"))?;
        w.finish().map_err(|e| format!("sending the SR: {e}"))?;
    }
    let status = loop {
        match assoc
            .receive()
            .map_err(|e| format!("waiting for the response: {e}"))?
        {
            Pdu::PData { data } => {
                let Some(v) = data
                    .into_iter()
                    .find(|v| v.value_type == PDataValueType::Command && v.is_last)
                else {
                    continue;
                };
                let rsp = InMemDicomObject::read_dataset_with_ts(v.data.as_slice(), &implicit)
                    .map_err(|e| format!("response: {e}"))?;
                break rsp
                    .element_opt(tags::STATUS)
                    .ok()
                    .flatten()
                    .and_then(|e| e.to_int::<u16>().ok())
                    .ok_or("response without Status")?;
            }
            Pdu::AbortRQ { .. } => return Err("the PACS aborted the association".into()),
            _ => continue,
        }
    };
    let _ = assoc.release();
    if status == 0 || status == 1 || status & 0xF000 == 0xB000 {
        Ok(())
    } else {
        Err(format!("C-STORE status {status:#06x}"))
    }
}
