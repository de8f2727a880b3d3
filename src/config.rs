//! The daemon's configuration: a strict TOML file ([`Config`], unknown keys are an error,
//! every key documented with its default in `config/noduled.toml`) validated into
//! [`Settings`], the only form the rest of the daemon sees.
//!
//! Units are in the key names (`_ms`, `_secs`, `_hours`, `_bytes`). Paths in the file may be
//! relative: they resolve against the folder holding the config file.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The config file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown / mistyped keys.
    #[error("{path}: {msg}")]
    Parse {
        /// The config file.
        path: String,
        /// The parser's message (names the key).
        msg: String,
    },
    /// A TLS or password file of `[mqtt]` is unusable.
    #[error(transparent)]
    Tls(#[from] crate::mqtt_tls::TlsError),
    /// A key has a value the daemon cannot use.
    #[error("config key `{key}`: {msg}")]
    Invalid {
        /// The key, dotted (`mqtt.port`).
        key: &'static str,
        /// What is wrong, with a hint.
        msg: String,
    },
}

/// The raw configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Folder for the daemon's state: `processing/`, `done/`, `failed/`, `spool/`.
    pub state_dir: PathBuf,
    /// Seconds to wait, after SIGTERM, for the current nodule and the last acknowledgements.
    pub shutdown_timeout_secs: u64,
    /// The model.
    pub model: ModelConfig,
    /// What jobs may contain.
    pub jobs: JobsConfig,
    /// The inbox folder source.
    pub inbox: InboxConfig,
    /// The on-disk outbox of results.
    pub outbox: OutboxConfig,
    /// The MQTT source and sink.
    pub mqtt: MqttConfig,
    /// Alerts on high calibrated scores.
    pub alert: AlertConfig,
    /// The localhost health and metrics endpoint.
    pub health: HealthConfig,
    /// Bounds of `done/` and `failed/`.
    pub retention: RetentionConfig,
    /// DICOM receiver, series checks, SR and PACS sender.
    pub dicom: crate::dicom::DicomConfig,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A checkpoint folder or a model bundle (typically a `current` link that an update
    /// switches; SIGHUP reloads whatever it points to).
    pub path: PathBuf,
    /// Ed25519 public key file (minisign format). When set, only bundles signed with it are
    /// loaded, at start and on reload; checkpoint folders and unsigned bundles are refused.
    pub public_key: Option<PathBuf>,
    /// Compute device: `auto` (CUDA device 0 in a CUDA build when it answers, else the CPU),
    /// `cpu`, `cuda` or `cuda:N` (the daemon does not start without it). See [`crate::device`].
    pub device: crate::device::DeviceRequest,
    /// Vision tower dtype: `auto` (f16 on CUDA; bf16 on a CPU with AVX512_BF16, else f32),
    /// `f32`, `bf16` (CPU: bf16 GEMMs with f32 accumulation), or `f16` (CUDA only).
    pub dtype: crate::device::DtypeRequest,
}

/// `[jobs]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Folders that job paths must lie in (after resolving links and `..`). The inbox and
    /// the spool of inline crops are always allowed.
    pub data_roots: Vec<PathBuf>,
    /// Largest job file or MQTT job payload, in bytes (inline crops included).
    pub max_job_bytes: u64,
    /// Most nodules one job may name.
    pub max_nodules: usize,
    /// Seconds a job may take (reading its input and scoring) before it gets an error
    /// result and the worker moves on.
    pub timeout_secs: u64,
    /// Attempts of a job that did not finish (the daemon crashed, was killed or aborted
    /// while running it) after which it is failed instead of run again.
    pub max_attempts: u32,
}

/// `[inbox]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboxConfig {
    /// Watch the inbox folder.
    pub enabled: bool,
    /// The folder jobs are renamed into (or written and closed in). Must be on the same
    /// filesystem as `state_dir`.
    pub path: PathBuf,
}

/// `[outbox]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Folder of result JSONs. Unpublished results live at its top level; with MQTT on,
    /// acknowledged ones move to `sent/` inside it.
    pub path: PathBuf,
    /// Results older than this are deleted (published or not), in hours.
    pub max_age_hours: u64,
    /// When the folder (with `sent/`) grows past this many bytes, the oldest results go first.
    pub max_bytes: u64,
    /// Refusals by the broker (a failure reason code in the PUBACK) after which a result
    /// moves to `refused/`.
    pub max_publish_attempts: u32,
}

/// `[mqtt]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Connect to a broker.
    pub enabled: bool,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id; the broker keeps the persistent session under it.
    pub client_id: String,
    /// Optional user name.
    pub username: Option<String>,
    /// Optional password, inline (prefer `password_file`).
    pub password: Option<String>,
    /// File whose first line is the password; a relative name is looked up in
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) first, then the config's folder.
    pub password_file: Option<PathBuf>,
    /// Connect with TLS (rustls); the broker's certificate and name are always verified.
    pub tls: bool,
    /// PEM CA certificate(s) for the broker; absent means the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain (mutual TLS), with `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key_file: Option<PathBuf>,
    /// Allow a plaintext connection to a broker that is not on loopback.
    pub allow_plaintext: bool,
    /// Topics are `<prefix>/job`, `<prefix>/result/<patient_id>`, `<prefix>/status`,
    /// `<prefix>/alert`.
    pub topic_prefix: String,
    /// Job topic; empty means `<prefix>/job`. No wildcards.
    pub job_topic: String,
    /// Result topic; empty means `<prefix>/result`. No wildcards and no patient fields:
    /// the patient id travels in the payload only.
    pub result_topic: String,
    /// Keep-alive, in seconds.
    pub keep_alive_secs: u64,
    /// Longest wait between reconnect attempts, in seconds (backoff doubles from 0.5 s).
    pub reconnect_max_secs: u64,
    /// How long the broker keeps the session (queued jobs) while the daemon is away, seconds.
    pub session_expiry_secs: u32,
    /// Largest MQTT packet the daemon accepts, in bytes; announced to the broker (MQTT 5
    /// Maximum Packet Size) so larger job payloads are never sent to it. 0 means
    /// `jobs.max_job_bytes` + 64 KiB.
    pub max_packet_bytes: u32,
    /// Results (with their alerts) published and awaiting acknowledgement at once.
    pub max_inflight: usize,
    /// Seconds between status refreshes while the state is unchanged.
    pub status_interval_secs: u64,
}

/// `[alert]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertConfig {
    /// Publish an alert when a nodule's calibrated score is at least this; 0 < t <= 1, or
    /// absent for no alerts.
    pub calibrated_threshold: Option<f64>,
}

/// `[health]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Serve /healthz, /readyz and /metrics.
    pub enabled: bool,
    /// Listen address; keep it on loopback (port 0 picks a free one).
    pub listen: String,
    /// Accept a `listen` address other than loopback (the endpoint has no authentication).
    pub allow_remote: bool,
}

/// `[retention]`: bounds of `done/` and `failed/` (each), like the outbox's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Job files older than this are deleted, in hours.
    pub max_age_hours: u64,
    /// Past this many bytes per folder the oldest job files go first.
    pub max_bytes: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_age_hours: 24 * 30,
            max_bytes: 1 << 30,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/noduled"),
            shutdown_timeout_secs: 30,
            model: ModelConfig::default(),
            jobs: JobsConfig::default(),
            inbox: InboxConfig::default(),
            outbox: OutboxConfig::default(),
            mqtt: MqttConfig::default(),
            alert: AlertConfig::default(),
            health: HealthConfig::default(),
            retention: RetentionConfig::default(),
            dicom: crate::dicom::DicomConfig::default(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/noduled/models/current"),
            public_key: None,
            device: crate::device::DeviceRequest::Auto,
            dtype: crate::device::DtypeRequest::Auto,
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            data_roots: vec![PathBuf::from("/srv/noduled/data")],
            max_job_bytes: 64 << 20,
            max_nodules: 64,
            timeout_secs: 300,
            max_attempts: 2,
        }
    }
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: PathBuf::from("/var/lib/noduled/inbox"),
        }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/noduled/outbox"),
            max_age_hours: 24 * 30,
            max_bytes: 1 << 30,
            max_publish_attempts: 10,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            host: "localhost".into(),
            port: 1883,
            client_id: "noduled".into(),
            username: None,
            password: None,
            password_file: None,
            tls: false,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            allow_plaintext: false,
            topic_prefix: "noduled".into(),
            job_topic: String::new(),
            result_topic: String::new(),
            keep_alive_secs: 30,
            reconnect_max_secs: 30,
            session_expiry_secs: 7 * 24 * 3600,
            max_packet_bytes: 0,
            max_inflight: 8,
            status_interval_secs: 30,
        }
    }
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            calibrated_threshold: Some(0.5),
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
            allow_remote: false,
        }
    }
}

/// Validated settings: absolute paths, resolved topics, checked numbers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// State folder (absolute).
    pub state_dir: PathBuf,
    /// Deadline after SIGTERM.
    pub shutdown_timeout: Duration,
    /// Model path (absolute).
    pub model_path: PathBuf,
    /// When set, only bundles signed with this key are loaded.
    pub model_public_key: Option<crate::bundle::sign::PublicKey>,
    /// The compute device asked for.
    pub device: crate::device::DeviceRequest,
    /// The vision tower dtype asked for.
    pub dtype: crate::device::DtypeRequest,
    /// Allowed data roots (canonical where they exist).
    pub data_roots: Vec<PathBuf>,
    /// Largest job in bytes.
    pub max_job_bytes: u64,
    /// Most nodules per job.
    pub max_nodules: usize,
    /// Per-job deadline.
    pub job_timeout: Duration,
    /// Unfinished attempts after which a job is failed.
    pub max_attempts: u32,
    /// Broker refusals after which a result moves to `outbox/refused/`.
    pub max_publish_attempts: u32,
    /// Age bound of `done/` and `failed/`.
    pub retention_max_age: Duration,
    /// Size bound of `done/` and `failed/` (each), bytes.
    pub retention_max_bytes: u64,
    /// Inbox folder when enabled (absolute).
    pub inbox: Option<PathBuf>,
    /// Outbox folder (absolute).
    pub outbox: PathBuf,
    /// Outbox age bound.
    pub outbox_max_age: Duration,
    /// Outbox size bound in bytes.
    pub outbox_max_bytes: u64,
    /// MQTT settings when enabled.
    pub mqtt: Option<MqttSettings>,
    /// Alert threshold on calibrated scores.
    pub alert_threshold: Option<f64>,
    /// Health endpoint address when enabled.
    pub health: Option<SocketAddr>,
    /// Validated `[dicom]`.
    pub dicom: crate::dicom::DicomSettings,
}

/// Validated MQTT settings.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id (non-empty).
    pub client_id: String,
    /// User name and password.
    pub credentials: Option<(String, String)>,
    /// TLS files when `mqtt.tls` is on.
    pub tls: Option<crate::mqtt_tls::TlsFiles>,
    /// Topic prefix without a trailing slash.
    pub prefix: String,
    /// Job topic.
    pub job_topic: String,
    /// Result topic.
    pub result_topic: String,
    /// Alert topic (`<prefix>/alert`).
    pub alert_topic: String,
    /// Retained status topic (`<prefix>/status`).
    pub status_topic: String,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// Longest reconnect wait.
    pub reconnect_max: Duration,
    /// Session expiry in seconds.
    pub session_expiry_secs: u32,
    /// Largest incoming packet in bytes.
    pub max_packet_bytes: u32,
    /// Results in flight at once.
    pub max_inflight: usize,
    /// Status refresh period.
    pub status_interval: Duration,
}

impl Config {
    /// Reads and parses a config file (unknown keys are an error naming the key).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            msg: e
                .to_string()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join(" "),
        })
    }

    /// Checks every value and resolves relative paths against `base` (the config file's folder).
    pub fn validate(self, base: &Path) -> Result<Settings, ConfigError> {
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let invalid = |key: &'static str, msg: String| ConfigError::Invalid { key, msg };
        if self.jobs.max_job_bytes == 0 {
            return Err(invalid("jobs.max_job_bytes", "must be > 0".into()));
        }
        if self.jobs.max_nodules == 0 {
            return Err(invalid("jobs.max_nodules", "must be > 0".into()));
        }
        if self.jobs.timeout_secs == 0 {
            return Err(invalid("jobs.timeout_secs", "must be > 0".into()));
        }
        if self.jobs.max_attempts == 0 {
            return Err(invalid("jobs.max_attempts", "must be > 0".into()));
        }
        if self.outbox.max_publish_attempts == 0 {
            return Err(invalid("outbox.max_publish_attempts", "must be > 0".into()));
        }
        if let Some(t) = self.alert.calibrated_threshold {
            if !(t > 0.0 && t <= 1.0) {
                return Err(invalid(
                    "alert.calibrated_threshold",
                    format!("{t} is not in (0, 1]"),
                ));
            }
        }
        let data_roots = self
            .jobs
            .data_roots
            .iter()
            .map(|r| abs(r))
            .map(|r| r.canonicalize().unwrap_or(r))
            .collect();
        let mqtt = if self.mqtt.enabled {
            let m = &self.mqtt;
            if m.client_id.is_empty() {
                return Err(invalid(
                    "mqtt.client_id",
                    "must not be empty (the broker keeps the session under it)".into(),
                ));
            }
            let prefix = m.topic_prefix.trim_end_matches('/').to_string();
            if prefix.is_empty() || prefix.contains(['+', '#']) {
                return Err(invalid(
                    "mqtt.topic_prefix",
                    format!("`{}` is not a topic prefix, e.g. noduled", m.topic_prefix),
                ));
            }
            let job_topic = topic_or(&m.job_topic, &prefix, "job", "mqtt.job_topic")?;
            let result_topic = topic_or(&m.result_topic, &prefix, "result", "mqtt.result_topic")?;
            let password = match (&m.password, &m.password_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "mqtt.password_file",
                        "set either mqtt.password or mqtt.password_file, not both".into(),
                    ))
                }
                (_, Some(f)) => {
                    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
                    let path = crate::mqtt_tls::password_path(f, base, creds.as_deref());
                    Some(crate::mqtt_tls::read_password(&path)?)
                }
                (p, None) => p.clone(),
            };
            let tls_files = [&m.ca_file, &m.client_cert_file, &m.client_key_file];
            if !m.tls && tls_files.iter().any(|f| f.is_some()) {
                return Err(invalid(
                    "mqtt.tls",
                    "TLS files are set but mqtt.tls = false; set mqtt.tls = true".into(),
                ));
            }
            if !m.tls && !m.allow_plaintext && !crate::mqtt_tls::is_loopback(&m.host) {
                return Err(invalid(
                    "mqtt.tls",
                    format!(
                        "broker `{}` is not on loopback: set mqtt.tls = true (or mqtt.allow_plaintext = true to send patient data in clear)",
                        m.host
                    ),
                ));
            }
            let tls = if m.tls {
                let a = |p: &Option<PathBuf>| p.as_deref().map(abs);
                Some(crate::mqtt_tls::TlsFiles::read(
                    a(&m.ca_file).as_deref(),
                    a(&m.client_cert_file).as_deref(),
                    a(&m.client_key_file).as_deref(),
                )?)
            } else {
                None
            };
            let credentials = match (&m.username, &password) {
                (Some(u), p) => Some((u.clone(), p.clone().unwrap_or_default())),
                (None, Some(_)) => {
                    return Err(invalid("mqtt.password", "set `mqtt.username` too".into()))
                }
                (None, None) => None,
            };
            let max_packet_bytes = if m.max_packet_bytes > 0 {
                m.max_packet_bytes
            } else {
                u32::try_from(self.jobs.max_job_bytes + (64 << 10)).unwrap_or(u32::MAX)
            };
            if m.max_inflight == 0 {
                return Err(invalid("mqtt.max_inflight", "must be > 0".into()));
            }
            Some(MqttSettings {
                host: m.host.clone(),
                port: m.port,
                client_id: m.client_id.clone(),
                credentials,
                tls,
                job_topic,
                result_topic,
                alert_topic: format!("{prefix}/alert"),
                status_topic: format!("{prefix}/status"),
                prefix,
                keep_alive: Duration::from_secs(m.keep_alive_secs.max(5)),
                reconnect_max: Duration::from_secs(m.reconnect_max_secs.max(1)),
                session_expiry_secs: m.session_expiry_secs,
                max_packet_bytes,
                max_inflight: m.max_inflight,
                status_interval: Duration::from_secs(m.status_interval_secs.max(1)),
            })
        } else {
            None
        };
        let health = if self.health.enabled {
            let addr = self.health.listen.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "health.listen",
                    format!("`{}`: {e} (e.g. 127.0.0.1:9464)", self.health.listen),
                )
            })?;
            if !addr.ip().is_loopback() && !self.health.allow_remote {
                return Err(invalid(
                    "health.listen",
                    format!(
                        "`{addr}` is not a loopback address; set health.allow_remote = true to serve the unauthenticated endpoint there"
                    ),
                ));
            }
            Some(addr)
        } else {
            None
        };
        let model_public_key = match &self.model.public_key {
            Some(p) => Some(
                crate::bundle::sign::PublicKey::read(&abs(p))
                    .map_err(|e| invalid("model.public_key", e.to_string()))?,
            ),
            None => None,
        };
        let dicom = self
            .dicom
            .validate()
            .map_err(|(key, msg)| invalid(key, msg))?;
        Ok(Settings {
            dicom,
            model_public_key,
            device: self.model.device,
            dtype: self.model.dtype,
            state_dir: abs(&self.state_dir),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            model_path: abs(&self.model.path),
            data_roots,
            max_job_bytes: self.jobs.max_job_bytes,
            max_nodules: self.jobs.max_nodules,
            job_timeout: Duration::from_secs(self.jobs.timeout_secs),
            max_attempts: self.jobs.max_attempts,
            max_publish_attempts: self.outbox.max_publish_attempts,
            retention_max_age: Duration::from_secs(self.retention.max_age_hours * 3600),
            retention_max_bytes: self.retention.max_bytes,
            inbox: self.inbox.enabled.then(|| abs(&self.inbox.path)),
            outbox: abs(&self.outbox.path),
            outbox_max_age: Duration::from_secs(self.outbox.max_age_hours * 3600),
            outbox_max_bytes: self.outbox.max_bytes,
            mqtt,
            alert_threshold: self.alert.calibrated_threshold,
            health,
        })
    }
}

/// `topic`, or `<prefix>/<leaf>` when empty; a topic with an MQTT wildcard (`+`, `#`) or an
/// empty level is refused naming `key`.
fn topic_or(
    topic: &str,
    prefix: &str,
    leaf: &str,
    key: &'static str,
) -> Result<String, ConfigError> {
    let t = if topic.is_empty() {
        format!("{prefix}/{leaf}")
    } else {
        topic.to_string()
    };
    if t.contains(['+', '#']) || t.split('/').any(str::is_empty) {
        return Err(ConfigError::Invalid {
            key,
            msg: format!(
                "`{t}` is not a plain topic (no `+`, `#` or empty levels), e.g. {prefix}/{leaf}"
            ),
        });
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/noduled.toml");
        assert_eq!(Config::read(&path).unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = toml::from_str::<Config>("[mqtt]\nhots = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("hots"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let cfg: Config =
            toml::from_str("state_dir = \"state\"\n[inbox]\npath = \"in\"\n").unwrap();
        let s = cfg.validate(Path::new("/etc/noduled")).unwrap();
        assert_eq!(s.state_dir, Path::new("/etc/noduled/state"));
        assert_eq!(s.inbox.unwrap(), Path::new("/etc/noduled/in"));
    }

    #[test]
    fn device_and_dtype_parse_and_bad_ones_name_the_value() {
        let cfg: Config =
            toml::from_str("[model]\ndevice = \"cuda:1\"\ndtype = \"f32\"\n").unwrap();
        assert_eq!(cfg.model.device, crate::device::DeviceRequest::Cuda(1));
        assert_eq!(cfg.model.dtype, crate::device::DtypeRequest::F32);
        let err = toml::from_str::<Config>("[model]\ndevice = \"gpu\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("device `gpu`"), "{err}");
    }

    #[test]
    fn health_binds_to_loopback_unless_allow_remote() {
        let cfg: Config = toml::from_str("[health]\nlisten = \"0.0.0.0:0\"\n").unwrap();
        let err = cfg.validate(Path::new("/")).unwrap_err().to_string();
        assert!(
            err.contains("health.listen") && err.contains("allow_remote"),
            "{err}"
        );
        let cfg: Config =
            toml::from_str("[health]\nlisten = \"0.0.0.0:0\"\nallow_remote = true\n").unwrap();
        assert!(cfg.validate(Path::new("/")).unwrap().health.is_some());
        let cfg: Config = toml::from_str("[health]\nlisten = \"[::1]:0\"\n").unwrap();
        assert!(cfg.validate(Path::new("/")).is_ok());
    }

    #[test]
    fn wildcard_topics_are_refused_naming_the_key() {
        for (key, line) in [
            ("mqtt.job_topic", "job_topic = \"x/job/#\""),
            ("mqtt.result_topic", "result_topic = \"x/+/result\""),
            ("mqtt.topic_prefix", "topic_prefix = \"x/#\""),
        ] {
            let cfg: Config = toml::from_str(&format!("[mqtt]\nenabled = true\n{line}\n")).unwrap();
            let err = cfg.validate(Path::new("/")).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn bad_threshold_is_refused() {
        let cfg: Config = toml::from_str("[alert]\ncalibrated_threshold = 1.5\n").unwrap();
        let err = cfg.validate(Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("alert.calibrated_threshold"), "{err}");
    }
}
