//! Ed25519 signatures over a bundle's `manifest.json`, in minisign's file formats so that
//! `minisign -Vm manifest.json -p key.pub` verifies them too.
//!
//! - Public key file: an `untrusted comment:` line, then base64 of `"Ed" || key_id[8] || pk[32]`.
//! - Signature file (`manifest.json.minisig`): `untrusted comment:` line, base64 of
//!   `"Ed" || key_id[8] || sig[64]` (the legacy, non-prehashed algorithm: a manifest is
//!   small), a `trusted comment:` line, and base64 of the global signature over
//!   `sig || trusted_comment`.
//! - Secret key file: noduled's own unencrypted format (minisign's needs scrypt and
//!   BLAKE2b): an `untrusted comment:` line, then base64 of `"Ed" || key_id[8] || seed[32]`.
//!   Keep it off the edge box; only the public key is installed there.
//!
//! Written in-house over `ed25519-dalek`: the crates that speak minisign either only verify
//! (`minisign-verify`) or pull in scrypt and a CLI's worth of dependencies.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use std::path::Path;

const ALG: &[u8; 2] = b"Ed";

/// Errors reading keys or signatures, or verifying.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A key or signature file is malformed.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// The signature does not verify with the key.
    #[error("{path}: signature does not verify with key {key_id}")]
    BadSignature {
        /// The signature file.
        path: String,
        /// The public key's id (hex).
        key_id: String,
    },
}

/// A public key with its minisign key id.
#[derive(Debug, Clone)]
pub struct PublicKey {
    /// Key id (8 bytes, little-endian as minisign prints it).
    pub key_id: [u8; 8],
    key: VerifyingKey,
}

/// A secret key with its key id.
pub struct SecretKey {
    /// Key id.
    pub key_id: [u8; 8],
    key: SigningKey,
}

fn key_id_hex(id: &[u8; 8]) -> String {
    id.iter().rev().map(|b| format!("{b:02X}")).collect()
}

fn read_text(path: &Path) -> Result<String, SignError> {
    std::fs::read_to_string(path).map_err(|source| SignError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn write_text(path: &Path, text: &str) -> Result<(), SignError> {
    std::fs::write(path, text).map_err(|source| SignError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// The base64 payload line after an `untrusted comment:` line.
fn payload(path: &Path, text: &str, line: usize, want_len: usize) -> Result<Vec<u8>, SignError> {
    let fmt = |msg: String| SignError::Format {
        path: path.display().to_string(),
        msg,
    };
    let l = text
        .lines()
        .nth(line)
        .ok_or_else(|| fmt(format!("line {} missing", line + 1)))?;
    let bytes = B64
        .decode(l.trim())
        .map_err(|e| fmt(format!("line {}: not base64 ({e})", line + 1)))?;
    if bytes.len() != want_len {
        return Err(fmt(format!(
            "line {}: {} bytes, expected {want_len}",
            line + 1,
            bytes.len()
        )));
    }
    if &bytes[..2] != ALG {
        return Err(fmt(format!(
            "line {}: algorithm {:?} is not Ed25519 (\"Ed\")",
            line + 1,
            String::from_utf8_lossy(&bytes[..2])
        )));
    }
    Ok(bytes)
}

impl SecretKey {
    /// Makes a new random key pair.
    pub fn generate() -> Self {
        let mut rng = rand::rngs::OsRng;
        let key = SigningKey::generate(&mut rng);
        let mut key_id = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rng, &mut key_id);
        Self { key_id, key }
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            key_id: self.key_id,
            key: self.key.verifying_key(),
        }
    }

    /// Writes the secret key file (mode 0600).
    pub fn write(&self, path: &Path) -> Result<(), SignError> {
        let mut raw = Vec::with_capacity(42);
        raw.extend_from_slice(ALG);
        raw.extend_from_slice(&self.key_id);
        raw.extend_from_slice(self.key.as_bytes());
        let text = format!(
            "untrusted comment: noduled secret key {}\n{}\n",
            key_id_hex(&self.key_id),
            B64.encode(raw)
        );
        write_text(path, &text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| SignError::Io {
                    path: path.display().to_string(),
                    source,
                },
            )?;
        }
        Ok(())
    }

    /// Reads a secret key file.
    pub fn read(path: &Path) -> Result<Self, SignError> {
        let raw = payload(path, &read_text(path)?, 1, 42)?;
        let key_id: [u8; 8] = raw[2..10].try_into().expect("8 bytes");
        let seed: [u8; 32] = raw[10..42].try_into().expect("32 bytes");
        Ok(Self {
            key_id,
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Signs `message`, returning the signature file's text.
    pub fn sign(&self, message: &[u8], trusted_comment: &str) -> String {
        let sig = self.key.sign(message);
        let mut raw = Vec::with_capacity(74);
        raw.extend_from_slice(ALG);
        raw.extend_from_slice(&self.key_id);
        raw.extend_from_slice(&sig.to_bytes());
        let mut global_msg = sig.to_bytes().to_vec();
        global_msg.extend_from_slice(trusted_comment.as_bytes());
        let global = self.key.sign(&global_msg);
        format!(
            "untrusted comment: signature from noduled secret key {}\n{}\ntrusted comment: {}\n{}\n",
            key_id_hex(&self.key_id),
            B64.encode(raw),
            trusted_comment,
            B64.encode(global.to_bytes())
        )
    }
}

impl PublicKey {
    /// The key id as minisign prints it.
    pub fn id_hex(&self) -> String {
        key_id_hex(&self.key_id)
    }

    /// Writes the public key file.
    pub fn write(&self, path: &Path) -> Result<(), SignError> {
        let mut raw = Vec::with_capacity(42);
        raw.extend_from_slice(ALG);
        raw.extend_from_slice(&self.key_id);
        raw.extend_from_slice(self.key.as_bytes());
        write_text(
            path,
            &format!(
                "untrusted comment: minisign public key {}\n{}\n",
                self.id_hex(),
                B64.encode(raw)
            ),
        )
    }

    /// Reads a public key file.
    pub fn read(path: &Path) -> Result<Self, SignError> {
        let raw = payload(path, &read_text(path)?, 1, 42)?;
        let key_id: [u8; 8] = raw[2..10].try_into().expect("8 bytes");
        let pk: [u8; 32] = raw[10..42].try_into().expect("32 bytes");
        let key = VerifyingKey::from_bytes(&pk).map_err(|e| SignError::Format {
            path: path.display().to_string(),
            msg: format!("not an Ed25519 public key: {e}"),
        })?;
        Ok(Self { key_id, key })
    }

    /// Verifies the signature file `sig_path` over `message`, returning the trusted comment.
    pub fn verify(&self, message: &[u8], sig_path: &Path) -> Result<String, SignError> {
        let text = read_text(sig_path)?;
        self.verify_bytes(message, text.as_bytes(), sig_path)
    }

    /// [`Self::verify`] on signature file bytes already read (`sig_path` names them).
    pub fn verify_bytes(
        &self,
        message: &[u8],
        sig: &[u8],
        sig_path: &Path,
    ) -> Result<String, SignError> {
        let p = sig_path.display().to_string();
        let text = std::str::from_utf8(sig)
            .map_err(|_| SignError::Format {
                path: p.clone(),
                msg: "not UTF-8 text".into(),
            })?
            .to_string();
        let raw = payload(sig_path, &text, 1, 74)?;
        if raw[2..10] != self.key_id {
            return Err(SignError::Format {
                path: p,
                msg: format!(
                    "signed by key {}, not by the configured key {}",
                    key_id_hex(&raw[2..10].try_into().expect("8")),
                    self.id_hex()
                ),
            });
        }
        let bad = || SignError::BadSignature {
            path: p.clone(),
            key_id: self.id_hex(),
        };
        let sig = Signature::from_bytes(&raw[10..74].try_into().expect("64 bytes"));
        self.key.verify(message, &sig).map_err(|_| bad())?;
        let comment_line = text.lines().nth(2).unwrap_or("");
        let trusted = comment_line
            .strip_prefix("trusted comment: ")
            .ok_or_else(|| SignError::Format {
                path: p.clone(),
                msg: "line 3: missing `trusted comment:`".into(),
            })?;
        let global_raw = B64
            .decode(text.lines().nth(3).unwrap_or("").trim())
            .map_err(|e| SignError::Format {
                path: p.clone(),
                msg: format!("line 4: not base64 ({e})"),
            })?;
        let global: [u8; 64] = global_raw.try_into().map_err(|_| SignError::Format {
            path: p.clone(),
            msg: "line 4: not a 64-byte signature".into(),
        })?;
        let mut global_msg = sig.to_bytes().to_vec();
        global_msg.extend_from_slice(trusted.as_bytes());
        self.key
            .verify(&global_msg, &Signature::from_bytes(&global))
            .map_err(|_| bad())?;
        Ok(trusted.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_round_trip_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let sk = SecretKey::generate();
        sk.write(&dir.path().join("k.key")).unwrap();
        sk.public().write(&dir.path().join("k.pub")).unwrap();
        let sk = SecretKey::read(&dir.path().join("k.key")).unwrap();
        let pk = PublicKey::read(&dir.path().join("k.pub")).unwrap();
        let sig = dir.path().join("m.minisig");
        std::fs::write(&sig, sk.sign(b"hello", "noduled bundle x 1")).unwrap();
        assert_eq!(pk.verify(b"hello", &sig).unwrap(), "noduled bundle x 1");
        assert!(matches!(
            pk.verify(b"hellO", &sig),
            Err(SignError::BadSignature { .. })
        ));
        let other = SecretKey::generate().public();
        assert!(other.verify(b"hello", &sig).is_err());
    }
}
