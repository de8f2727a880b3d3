//! `[dicom]` and `[dicom.pacs]`: the C-STORE receiver, the series checks, the SR and the
//! PACS sender. Strict like the rest of the config (unknown keys are an error); every key
//! is documented with its default in `config/noduled.toml`.

use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

/// The smallest `dicom.max_pdu_bytes`. DICOM bounds only P-DATA PDUs by the announced
/// maximum (PS3.8 D.1), but dicom-ul 0.10 reads the scanner's A-ASSOCIATE-RQ under the same
/// bound, and a scanner proposing every storage SOP class sends a large one: dcmtk 3.6.7's
/// `storescu` sends 9,609 bytes (128 presentation contexts, 3 transfer syntaxes each) and
/// 11,273 with `-xs`. 16384 holds both, and is dcmtk's own default.
pub const MIN_PDU_BYTES: u32 = 16384;

/// The largest `dicom.max_pdu_bytes` (16 MiB).
pub const MAX_PDU_BYTES: u32 = 16 << 20;

/// `[dicom]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DicomConfig {
    /// Run the C-STORE receiver (storage SCP).
    pub enabled: bool,
    /// Address the receiver listens on (port 0 picks a free one; the port is logged).
    pub listen: String,
    /// Our AE title (called AE of the scanner, calling AE towards the PACS); 1-16 characters.
    pub ae_title: String,
    /// Calling AE titles allowed to send; empty refuses every association.
    pub allowed_calling_aes: Vec<String>,
    /// Associations served at once; more are rejected (transient).
    pub max_associations: usize,
    /// Largest PDU we accept, in bytes (announced in the association); at least
    /// [`MIN_PDU_BYTES`], since dicom-ul bounds the scanner's association request by it too.
    pub max_pdu_bytes: u32,
    /// Most bytes stored per series; instances past it are refused.
    pub max_series_bytes: u64,
    /// Most instances stored per series; instances past it are refused.
    pub max_instances_per_series: usize,
    /// A received series is complete once no instance arrived for this long, in seconds.
    pub stable_secs: u64,
    /// How long a job naming a series UID waits for it to become stable, in seconds.
    pub series_wait_secs: u64,
    /// Fewest slices a series needs to be scored.
    pub min_slices: usize,
    /// Received series older than this (last instance) are deleted, in hours.
    pub max_age_hours: u64,
    /// Past this many bytes of received series, the oldest series are deleted.
    pub max_bytes: u64,
    /// Write a DICOM SR beside each result of a job whose input was a DICOM series.
    pub write_sr: bool,
    /// The PACS the SRs go to; absent means none.
    pub pacs: Option<PacsConfig>,
}

/// `[dicom.pacs]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PacsConfig {
    /// PACS host.
    pub host: String,
    /// PACS port.
    pub port: u16,
    /// The PACS's AE title (called AE).
    pub ae_title: String,
    /// Longest wait between retries while the PACS refuses or is away, in seconds (doubles
    /// from 1 s).
    #[serde(default = "default_retry_max_secs")]
    pub retry_max_secs: u64,
    /// C-STORE failures of one SR (a failure status, or no presentation context for it)
    /// after which it moves to `pacs/refused/`; a permanent failure moves it at once.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Most SRs the queue holds; past it the oldest are dropped (logged and counted).
    #[serde(default = "default_max_queue_files")]
    pub max_queue_files: usize,
    /// Most bytes the queue holds; past it the oldest SRs are dropped (logged and counted).
    #[serde(default = "default_max_queue_bytes")]
    pub max_queue_bytes: u64,
    /// SRs queued longer than this are dropped (logged and counted), in hours.
    #[serde(default = "default_max_queue_age_hours")]
    pub max_queue_age_hours: u64,
}

fn default_retry_max_secs() -> u64 {
    60
}
fn default_max_attempts() -> u32 {
    5
}
fn default_max_queue_files() -> usize {
    10_000
}
fn default_max_queue_bytes() -> u64 {
    1 << 30
}
fn default_max_queue_age_hours() -> u64 {
    24 * 7
}

impl Default for DicomConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: "127.0.0.1:11112".into(),
            ae_title: "NODULED".into(),
            allowed_calling_aes: Vec::new(),
            max_associations: 4,
            max_pdu_bytes: 65536,
            max_series_bytes: 2 << 30,
            max_instances_per_series: 4000,
            stable_secs: 60,
            series_wait_secs: 900,
            min_slices: 20,
            max_age_hours: 24 * 7,
            max_bytes: 20 << 30,
            write_sr: true,
            pacs: None,
        }
    }
}

/// Validated `[dicom]`.
#[derive(Debug, Clone)]
pub struct DicomSettings {
    /// Receiver address when enabled.
    pub listen: Option<SocketAddr>,
    /// Our AE title (trimmed).
    pub ae_title: String,
    /// Allowed calling AE titles (trimmed).
    pub allowed_calling_aes: Vec<String>,
    /// Associations at once.
    pub max_associations: usize,
    /// Largest PDU.
    pub max_pdu_bytes: u32,
    /// Bytes per series.
    pub max_series_bytes: u64,
    /// Instances per series.
    pub max_instances_per_series: usize,
    /// Quiet time after which a series is stable.
    pub stable: Duration,
    /// Longest wait of a job for its series.
    pub series_wait: Duration,
    /// Fewest slices.
    pub min_slices: usize,
    /// Age bound of received series.
    pub max_age: Duration,
    /// Size bound of received series.
    pub max_bytes: u64,
    /// Write SRs.
    pub write_sr: bool,
    /// PACS when set.
    pub pacs: Option<PacsConfig>,
}

/// Checks an AE title: 1-16 characters of printable ASCII without backslash.
pub fn check_ae(key: &str, ae: &str) -> Result<String, String> {
    let t = ae.trim();
    if t.is_empty() || t.len() > 16 || !t.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\') {
        return Err(format!(
            "{key}: `{ae}` is not an AE title (1-16 printable ASCII characters, no backslash)"
        ));
    }
    Ok(t.to_string())
}

impl DicomConfig {
    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<DicomSettings, (&'static str, String)> {
        let ae_title =
            check_ae("dicom.ae_title", &self.ae_title).map_err(|m| ("dicom.ae_title", m))?;
        let allowed = self
            .allowed_calling_aes
            .iter()
            .map(|a| check_ae("dicom.allowed_calling_aes", a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| ("dicom.allowed_calling_aes", m))?;
        let listen = if self.enabled {
            Some(self.listen.parse::<SocketAddr>().map_err(|e| {
                (
                    "dicom.listen",
                    format!("`{}`: {e} (e.g. 0.0.0.0:11112)", self.listen),
                )
            })?)
        } else {
            None
        };
        let positive = [
            ("dicom.max_associations", self.max_associations as u64),
            ("dicom.max_series_bytes", self.max_series_bytes),
            (
                "dicom.max_instances_per_series",
                self.max_instances_per_series as u64,
            ),
            ("dicom.min_slices", self.min_slices as u64),
        ];
        if let Some((k, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err((k, "must be > 0".into()));
        }
        if !(MIN_PDU_BYTES..=MAX_PDU_BYTES).contains(&self.max_pdu_bytes) {
            return Err((
                "dicom.max_pdu_bytes",
                format!(
                    "{} is not in {MIN_PDU_BYTES}..={MAX_PDU_BYTES} (the scanner's association request must fit too)",
                    self.max_pdu_bytes
                ),
            ));
        }
        if let Some(p) = &self.pacs {
            check_ae("dicom.pacs.ae_title", &p.ae_title).map_err(|m| ("dicom.pacs.ae_title", m))?;
            if p.host.trim().is_empty() || p.port == 0 {
                return Err(("dicom.pacs.host", "set host and a non-zero port".into()));
            }
            let positive = [
                ("dicom.pacs.max_attempts", u64::from(p.max_attempts)),
                ("dicom.pacs.max_queue_files", p.max_queue_files as u64),
                ("dicom.pacs.max_queue_bytes", p.max_queue_bytes),
                ("dicom.pacs.max_queue_age_hours", p.max_queue_age_hours),
            ];
            if let Some((k, _)) = positive.iter().find(|(_, v)| *v == 0) {
                return Err((k, "must be > 0".into()));
            }
        }
        Ok(DicomSettings {
            listen,
            ae_title,
            allowed_calling_aes: allowed,
            max_associations: self.max_associations,
            max_pdu_bytes: self.max_pdu_bytes,
            max_series_bytes: self.max_series_bytes,
            max_instances_per_series: self.max_instances_per_series,
            stable: Duration::from_secs(self.stable_secs),
            series_wait: Duration::from_secs(self.series_wait_secs),
            min_slices: self.min_slices,
            max_age: Duration::from_secs(self.max_age_hours * 3600),
            max_bytes: self.max_bytes,
            write_sr: self.write_sr,
            pacs: self.pacs.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pdu_bytes_must_hold_an_association_request() {
        let with = |n| DicomConfig {
            max_pdu_bytes: n,
            ..DicomConfig::default()
        };
        for bad in [0, 4096, MIN_PDU_BYTES - 1, MAX_PDU_BYTES + 1] {
            let (key, msg) = with(bad).validate().unwrap_err();
            assert_eq!(key, "dicom.max_pdu_bytes");
            assert!(msg.contains("association request"), "{msg}");
        }
        for good in [MIN_PDU_BYTES, 65536, MAX_PDU_BYTES] {
            assert_eq!(with(good).validate().unwrap().max_pdu_bytes, good);
        }
    }
}
