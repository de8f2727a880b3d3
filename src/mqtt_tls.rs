//! MQTT transport security: the rustls client configuration behind `mqtt.tls = true`, the
//! password file (also looked up in systemd's `$CREDENTIALS_DIRECTORY`), and the refusal of
//! plaintext to a broker that is not on loopback.
//!
//! Everything is read and checked once, at start ([`TlsFiles::read`], [`read_password`]), so a
//! missing or malformed file is one line naming the file and the key before anything
//! connects. The broker's certificate is verified against `mqtt.ca_file` (else the system's
//! roots) and its name against `mqtt.host` (a DNS name or an IP address SAN): rustls's
//! verifier, never disabled. `mqtt.client_cert_file` + `mqtt.client_key_file` give mutual TLS.

use rumqttc::tokio_rustls::rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A TLS or credentials problem, naming the config key and the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("{key}: {path}: {err}")]
    Read {
        /// The config key.
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        err: std::io::Error,
    },
    /// A file holds no usable PEM item.
    #[error("{key}: {path}: {msg}")]
    Pem {
        /// The config key.
        key: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
}

/// The PEM files `mqtt.tls` names, read at start, and the client configuration built from them.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificates the broker's chain must lead to; `None`: the system's roots.
    pub ca: Option<Vec<CertificateDer<'static>>>,
    /// Client certificate chain and key (mutual TLS).
    pub client: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    config: Option<Arc<rustls::ClientConfig>>,
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let meta = std::fs::metadata(path).map_err(|err| TlsError::Read {
        key,
        path: path.display().to_string(),
        err,
    })?;
    if meta.len() > 1 << 20 {
        return Err(TlsError::Pem {
            key,
            path: path.display().to_string(),
            msg: format!("{} bytes is too large for a PEM file", meta.len()),
        });
    }
    std::fs::read(path).map_err(|err| TlsError::Read {
        key,
        path: path.display().to_string(),
        err,
    })
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let pem = |msg: String| TlsError::Pem {
        key,
        path: path.display().to_string(),
        msg,
    };
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| pem(format!("not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(pem("no `BEGIN CERTIFICATE` block".into()));
    }
    Ok(certs)
}

impl TlsFiles {
    /// Reads and parses the files (paths absolute); `cert` and `key` come together.
    pub fn read(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let ca_path = ca;
        let ca = ca.map(|p| certs("mqtt.ca_file", p)).transpose()?;
        let client = match (cert, key) {
            (Some(c), Some(k)) => {
                let chain = certs("mqtt.client_cert_file", c)?;
                let bytes = read("mqtt.client_key_file", k)?;
                let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
                    key: "mqtt.client_key_file",
                    path: k.display().to_string(),
                    msg: format!("no PKCS#8, PKCS#1 or SEC1 private key ({e})"),
                })?;
                Some((chain, Arc::new(key)))
            }
            (None, None) => None,
            (Some(c), None) | (None, Some(c)) => {
                return Err(TlsError::Pem {
                    key: "mqtt.client_cert_file",
                    path: c.display().to_string(),
                    msg: "set both mqtt.client_cert_file and mqtt.client_key_file".into(),
                })
            }
        };
        let mut files = Self {
            ca,
            client,
            config: None,
        };
        let config = files.client_config().map_err(|msg| TlsError::Pem {
            key: "mqtt.tls",
            path: cert
                .or(ca_path)
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            msg,
        })?;
        files.config = Some(Arc::new(config));
        Ok(files)
    }

    /// The rustls client configuration: server verified against the CA (or system roots),
    /// its name checked by rustls against the host connected to, client auth when given.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(ca) => {
                for c in ca {
                    roots
                        .add(c.clone())
                        .map_err(|e| format!("mqtt.ca_file: {e}"))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
            }
        }
        // The process's provider: ring, the only one compiled in (Cargo.toml).
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        match &self.client {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| format!("mqtt.client_key_file: {e}")),
            None => Ok(builder.with_no_client_auth()),
        }
    }

    /// rumqttc's transport with the configuration built by [`Self::read`].
    pub fn transport(&self) -> rumqttc::Transport {
        let config = match &self.config {
            Some(c) => c.clone(),
            None => Arc::new(self.client_config().expect("checked by TlsFiles::read")),
        };
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config))
    }
}

/// Where a password file is: an absolute path as is; a relative one in
/// `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`) when set and present there, else
/// against the config's folder `base`.
pub fn password_path(file: &Path, base: &Path, credentials_dir: Option<&Path>) -> PathBuf {
    if file.is_absolute() {
        return file.to_path_buf();
    }
    if let Some(dir) = credentials_dir {
        let p = dir.join(file);
        if p.exists() {
            return p;
        }
    }
    base.join(file)
}

/// Reads a password file: its first line, without the line end; at most 64 KiB.
pub fn read_password(path: &Path) -> Result<String, TlsError> {
    let bytes = read("mqtt.password_file", path)?;
    if bytes.len() > 64 << 10 {
        return Err(TlsError::Pem {
            key: "mqtt.password_file",
            path: path.display().to_string(),
            msg: "longer than 64 KiB".into(),
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| TlsError::Pem {
        key: "mqtt.password_file",
        path: path.display().to_string(),
        msg: "not UTF-8".into(),
    })?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// Whether `host` is the loopback interface (`localhost`, 127.0.0.0/8, ::1).
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_and_password_lookup() {
        assert!(is_loopback("localhost") && is_loopback("127.0.0.2") && is_loopback("::1"));
        assert!(!is_loopback("broker.lan") && !is_loopback("10.0.0.5"));
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("pw"), "s3cret\n").unwrap();
        let p = password_path(Path::new("pw"), Path::new("/etc/noduled"), Some(t.path()));
        assert_eq!(read_password(&p).unwrap(), "s3cret");
        let p = password_path(Path::new("pw"), t.path(), Some(Path::new("/nonexistent")));
        assert_eq!(read_password(&p).unwrap(), "s3cret");
        let e = read_password(Path::new("/nonexistent/pw"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("mqtt.password_file: /nonexistent/pw:"), "{e}");
        std::fs::write(t.path().join("bad.pem"), "hello").unwrap();
        let e = TlsFiles::read(Some(&t.path().join("bad.pem")), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mqtt.ca_file") && e.contains("BEGIN CERTIFICATE"),
            "{e}"
        );
    }
}
