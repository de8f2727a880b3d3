//! The C-STORE receiver (storage SCP) on dicom-ul: one thread accepts, one thread per
//! association (at most `dicom.max_associations`; more get A-ASSOCIATE-RJ transient, "local
//! limit exceeded").
//!
//! Association: the called AE must be `dicom.ae_title` and the calling AE one of
//! `dicom.allowed_calling_aes` (empty refuses all); any storage SOP class may be proposed
//! (so a non-CT instance gets a C-STORE failure status naming its modality rather than a
//! silent negotiation failure); transfer syntaxes are those the volume reader decodes
//! (others are rejected per presentation context). PDUs are bounded by `dicom.max_pdu_bytes`,
//! the association request too (dicom-ul reads it under the same bound): a longer request
//! gets A-ASSOCIATE-RJ permanent "local limit exceeded", a longer P-DATA an A-ABORT.
//!
//! Each instance is held in memory (bounded by what its series may still take), parsed,
//! checked, and only then written atomically ([`super::store`]). Failure statuses (PS3.4
//! C.4.2.1.4, with an ErrorComment naming the reason): 0xA700 out of resources (a
//! per-series limit), 0x0122 SOP class not supported (not CT Image Storage, or Modality not
//! CT), 0xA900 data set does not match (UIDs missing or invalid, Pixel Data shorter than
//! Rows x Columns x BitsAllocated/8), 0xC000 cannot understand (unparsable data set).

use super::config::DicomSettings;
use super::store::{PutError, SeriesLimits, Store};
use super::uid;
use dicom_core::{dicom_value, DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::association::server::{AccessControl, ServerAssociationOptions};
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValue, PDataValueType, UserIdentity,
};
use dicom_ul::Pdu;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// CT Image Storage and Enhanced CT Image Storage.
const CT_SOP_CLASSES: [&str; 2] = ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"];
/// Verification (C-ECHO).
const VERIFICATION: &str = "1.2.840.10008.1.1";
/// Transfer syntaxes accepted: those `crate::volume` decodes.
const TRANSFER_SYNTAXES: [&str; 8] = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.5",
];

/// Counters of the receiver, for metrics and logs.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Instances stored.
    pub stored: AtomicU64,
    /// Instances refused with a failure status.
    pub refused: AtomicU64,
    /// Associations rejected (AE not allowed, too many at once).
    pub rejected_associations: AtomicU64,
}

/// A running receiver.
#[derive(Debug)]
pub struct Receiver {
    /// The bound address (port 0 resolved).
    pub addr: SocketAddr,
    /// Counters.
    pub stats: Arc<ReceiverStats>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    /// Stops accepting (associations in progress finish on their own).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Binds `settings.listen` and serves associations on background threads.
pub fn start(settings: &DicomSettings, store: Arc<Store>) -> std::io::Result<Receiver> {
    let addr = settings
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let listener = TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(ReceiverStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st, stp) = (settings.clone(), stats.clone(), stop.clone());
    std::thread::Builder::new()
        .name("dicom-accept".into())
        .spawn(move || accept_loop(listener, s, store, st, stp))?;
    tracing::info!(%addr, ae_title = %settings.ae_title, "DICOM receiver listening");
    Ok(Receiver { addr, stats, stop })
}

/// Allows only the listed calling AEs, and only for our called AE.
struct AllowList(Vec<String>);

impl AccessControl for AllowList {
    fn check_access(
        &self,
        this_ae: &str,
        calling: &str,
        called: &str,
        _user: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called.trim() != this_ae.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if !self.0.iter().any(|a| a == calling.trim()) {
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

fn accept_loop(
    listener: TcpListener,
    settings: DicomSettings,
    store: Arc<Store>,
    stats: Arc<ReceiverStats>,
    stop: Arc<AtomicBool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(socket) = conn else { continue };
        let busy = active.fetch_add(1, Ordering::SeqCst) >= settings.max_associations;
        let (s, st, sts, act) = (
            settings.clone(),
            store.clone(),
            stats.clone(),
            active.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("dicom-assoc".into())
            .spawn(move || {
                serve(socket, &s, &st, &sts, busy);
                act.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve(
    socket: TcpStream,
    settings: &DicomSettings,
    store: &Store,
    stats: &ReceiverStats,
    busy: bool,
) {
    let peer = socket.peer_addr().ok();
    if busy {
        stats.rejected_associations.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = ?peer, reason = "too many associations at once (dicom.max_associations)", "DICOM association rejected");
        reject_local_limit(socket, AssociationRJResult::Transient);
        return;
    }
    let mut o = ServerAssociationOptions::new()
        .ae_access_control(AllowList(settings.allowed_calling_aes.clone()))
        .ae_title(settings.ae_title.clone())
        .max_pdu_length(settings.max_pdu_bytes)
        .promiscuous(true)
        .read_timeout(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(60))
        .with_abstract_syntax(VERIFICATION);
    for ts in TRANSFER_SYNTAXES {
        o = o.with_transfer_syntax(ts);
    }
    let raw = socket.try_clone().ok();
    let mut assoc = match o.establish(socket) {
        Ok(a) => a,
        Err(e) => {
            stats.rejected_associations.fetch_add(1, Ordering::Relaxed);
            let why = if let Some(len) = too_large(&e) {
                if let Some(s) = raw {
                    reject_local_limit(s, AssociationRJResult::Permanent);
                }
                format!(
                    "association request of {len} bytes exceeds dicom.max_pdu_bytes = {}",
                    settings.max_pdu_bytes
                )
            } else {
                e.to_string()
            };
            tracing::warn!(peer = ?peer, reason = %why, "DICOM association rejected");
            return;
        }
    };
    let calling = dicom_ul::association::Association::peer_ae_title(&assoc).to_string();
    tracing::info!(peer = ?peer, calling_ae = %calling, "DICOM association");
    let mut command: Option<InMemDicomObject> = None;
    let mut data: Vec<u8> = Vec::new();
    let mut overflow = false;
    loop {
        let pdu = match assoc.receive() {
            Ok(p) => p,
            Err(e) => {
                if let Some(len) = too_large(&e) {
                    tracing::warn!(calling_ae = %calling, bytes = len, max = settings.max_pdu_bytes, "a PDU over dicom.max_pdu_bytes: association aborted");
                    let _ = assoc.abort();
                    return;
                }
                tracing::info!(calling_ae = %calling, reason = %e, "DICOM association ended");
                return;
            }
        };
        match pdu {
            Pdu::PData { data: values } => {
                for v in values {
                    match v.value_type {
                        PDataValueType::Command => {
                            if !v.is_last {
                                continue;
                            }
                            let Ok(cmd) = read_command(&v.data) else {
                                tracing::warn!(calling_ae = %calling, "unreadable DIMSE command: aborting");
                                let _ = assoc.abort();
                                return;
                            };
                            if field(&cmd, tags::COMMAND_FIELD) == Some(0x0030) {
                                let rsp = response(&cmd, 0x8030, 0x0000, None);
                                if send(&mut assoc, v.presentation_context_id, rsp).is_err() {
                                    return;
                                }
                                continue;
                            }
                            command = Some(cmd);
                            data.clear();
                            overflow = false;
                        }
                        PDataValueType::Data => {
                            // Bounded: an instance may not exceed a series' byte limit.
                            if data.len() as u64 + v.data.len() as u64 > settings.max_series_bytes {
                                overflow = true;
                                data = Vec::new();
                            } else if !overflow {
                                data.extend_from_slice(&v.data);
                            }
                            if !v.is_last {
                                continue;
                            }
                            let Some(cmd) = command.take() else { continue };
                            let ts = assoc
                                .presentation_contexts()
                                .iter()
                                .find(|pc| pc.id == v.presentation_context_id)
                                .map(|pc| pc.transfer_syntax.clone())
                                .unwrap_or_default();
                            let (status, comment) = if overflow {
                                (
                                    0xA700,
                                    Some("instance larger than dicom.max_series_bytes".to_string()),
                                )
                            } else {
                                match store_instance(&data, &ts, settings, store) {
                                    Ok(()) => (0x0000, None),
                                    Err((s, c)) => (s, Some(c)),
                                }
                            };
                            data = Vec::new();
                            if status == 0 {
                                stats.stored.fetch_add(1, Ordering::Relaxed);
                            } else {
                                stats.refused.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(calling_ae = %calling, status = format!("{status:#06x}"), reason = ?comment, "C-STORE refused");
                            }
                            let rsp = response(&cmd, 0x8001, status, comment.as_deref());
                            if send(&mut assoc, v.presentation_context_id, rsp).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            Pdu::ReleaseRQ => {
                let _ = assoc.send(&Pdu::ReleaseRP);
                return;
            }
            Pdu::AbortRQ { .. } => return,
            _ => {}
        }
    }
}

/// The length of a PDU that dicom-ul refused as longer than `dicom.max_pdu_bytes`.
fn too_large(e: &dicom_ul::association::Error) -> Option<u32> {
    match e {
        dicom_ul::association::Error::ReceivePdu {
            source: dicom_ul::pdu::ReadError::PduTooLarge { pdu_length, .. },
        } => Some(*pdu_length),
        _ => None,
    }
}

/// Answers an association request with A-ASSOCIATE-RJ, service provider (presentation),
/// "local limit exceeded" (too many associations: transient; a request longer than
/// `dicom.max_pdu_bytes`, which dicom-ul stopped reading: permanent), then reads what the
/// scanner still sends (bounded in bytes and time) so the close does not reset the
/// connection before the scanner reads the rejection.
fn reject_local_limit(mut socket: TcpStream, result: AssociationRJResult) {
    use std::io::{Read, Write};
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut bytes = Vec::new();
    if dicom_ul::pdu::write_pdu(&mut bytes, &rj).is_err() || socket.write_all(&bytes).is_err() {
        return;
    }
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = std::io::copy(&mut (&socket).take(16 << 20), &mut std::io::sink());
}

/// Parses, checks and stores one instance; the error is (status, comment).
fn store_instance(
    bytes: &[u8],
    ts_uid: &str,
    settings: &DicomSettings,
    store: &Store,
) -> Result<(), (u16, String)> {
    let ts = TransferSyntaxRegistry
        .get(ts_uid.trim_end_matches('\0'))
        .ok_or((0xC000, format!("transfer syntax {ts_uid} not supported")))?;
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, ts)
        .map_err(|e| (0xC000, clip(&format!("unreadable data set: {e}"))))?;
    let text = |tag, name: &str| -> Result<String, (u16, String)> {
        obj.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| {
                s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
                    .to_string()
            })
            .filter(|s| !s.is_empty())
            .ok_or((0xA900, format!("missing {name}")))
    };
    let uid_of = |tag, name: &str| -> Result<String, (u16, String)> {
        let v = text(tag, name)?;
        uid::check(&v).map_err(|e| (0xA900, clip(&format!("{name}: {e}"))))?;
        Ok(v)
    };
    let sop_class = uid_of(tags::SOP_CLASS_UID, "SOPClassUID")?;
    let modality = text(tags::MODALITY, "Modality").unwrap_or_default();
    if !CT_SOP_CLASSES.contains(&sop_class.as_str()) || modality != "CT" {
        let what = if modality.is_empty() {
            format!("SOP class {sop_class}")
        } else {
            format!("Modality {modality}")
        };
        return Err((0x0122, clip(&format!("{what}: only CT is received"))));
    }
    let sop = uid_of(tags::SOP_INSTANCE_UID, "SOPInstanceUID")?;
    let study = uid_of(tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?;
    let series = uid_of(tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?;
    check_pixel_length(&obj, ts.is_encapsulated_pixel_data())?;
    let dir = store
        .series_dir(&study, &series)
        .map_err(|e| (0xA900, clip(&e.to_string())))?;
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class.as_str())
        .media_storage_sop_instance_uid(sop.as_str())
        .transfer_syntax(ts.uid())
        .build()
        .map_err(|e| (0xC000, clip(&e.to_string())))?;
    let mut file = Vec::with_capacity(bytes.len() + 512);
    obj.with_exact_meta(meta)
        .write_all(&mut file)
        .map_err(|e| (0xC000, clip(&e.to_string())))?;
    let limits = SeriesLimits {
        max_instances: settings.max_instances_per_series,
        max_bytes: settings.max_series_bytes,
    };
    match store.put_within(&dir, &sop, &file, limits) {
        Ok(_) => Ok(()),
        Err(PutError::Full(key, limit)) => Err((0xA700, format!("series full: {key} = {limit}"))),
        Err(PutError::Io(e)) => Err((0xA700, clip(&format!("cannot store: {e}")))),
    }
}

/// Native Pixel Data must hold Rows x Columns x frames x samples x BitsAllocated/8 bytes.
fn check_pixel_length(obj: &InMemDicomObject, encapsulated: bool) -> Result<(), (u16, String)> {
    let Some(px) = obj.element_opt(tags::PIXEL_DATA).ok().flatten() else {
        return Err((0xA900, "missing PixelData".into()));
    };
    if encapsulated {
        return Ok(());
    }
    let int = |tag| {
        obj.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_int::<u64>().ok())
    };
    let (Some(rows), Some(cols), Some(bits)) = (
        int(tags::ROWS),
        int(tags::COLUMNS),
        int(tags::BITS_ALLOCATED),
    ) else {
        return Err((0xA900, "missing Rows, Columns or BitsAllocated".into()));
    };
    let frames = int(tags::NUMBER_OF_FRAMES).unwrap_or(1);
    let samples = int(tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let need = rows * cols * frames * samples * bits.div_ceil(8);
    let have = px.to_bytes().map(|b| b.len() as u64).unwrap_or(0);
    if have < need {
        return Err((
            0xA900,
            format!("PixelData truncated: {have} bytes, {need} expected"),
        ));
    }
    Ok(())
}

fn clip(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(64)
        .collect()
}

fn read_command(bytes: &[u8]) -> Result<InMemDicomObject, dicom_object::ReadError> {
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    InMemDicomObject::read_dataset_with_ts(bytes, &ts)
}

fn field(cmd: &InMemDicomObject, tag: dicom_object::Tag) -> Option<u16> {
    cmd.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_int::<u16>().ok())
}

fn response(
    cmd: &InMemDicomObject,
    command_field: u16,
    status: u16,
    comment: Option<&str>,
) -> InMemDicomObject {
    let text = |tag| {
        cmd.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok().map(|s| s.to_string()))
            .unwrap_or_default()
    };
    let mut els = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(text(tags::AFFECTED_SOP_CLASS_UID)),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [command_field]),
        ),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [field(cmd, tags::MESSAGE_ID).unwrap_or(0)]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0101]),
        ),
        DataElement::new(tags::STATUS, VR::US, dicom_value!(U16, [status])),
    ];
    if command_field == 0x8001 {
        els.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(text(tags::AFFECTED_SOP_INSTANCE_UID)),
        ));
    }
    if let Some(c) = comment {
        els.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(c),
        ));
    }
    InMemDicomObject::command_from_element_iter(els)
}

fn send(
    assoc: &mut dicom_ul::association::server::ServerAssociation<TcpStream>,
    pc: u8,
    rsp: InMemDicomObject,
) -> Result<(), ()> {
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut bytes = Vec::new();
    rsp.write_dataset_with_ts(&mut bytes, &ts).map_err(|_| ())?;
    let pdu = Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type: PDataValueType::Command,
            is_last: true,
            data: bytes,
        }],
    };
    assoc
        .send(&pdu)
        .map_err(|e| tracing::warn!(error = %e, "could not send a DIMSE response"))
}
