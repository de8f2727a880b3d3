//! Model bundles: one signed, versioned directory holding everything inference needs.
//!
//! ```text
//! BUNDLE/
//!   manifest.json          identity, version, tower config, folds + calibrators, prompts,
//!                          golden self-test values, SHA-256 of every other file, provenance
//!   manifest.json.minisig  Ed25519 signature over manifest.json (see [`sign`])
//!   ...                    the weight files the manifest lists (see models/README.md)
//! ```
//! Integrity is checked in one place, [`open_verified`] ([`verify`] is it without the maps):
//! the folder is opened once (a store's `current` link is resolved once, to a descriptor),
//! the manifest is read once from it and the signature, when a public key is given, checked
//! on those bytes; every listed file is opened once beneath the folder (no symlinks), mapped
//! read-only and private, and its SHA-256 computed *from the mapping*, which is then what the
//! model loader uses: what is verified is what is served, at every load, key or no key.
//! An in-place write to a mapped file after the check would show through the mapping
//! (Linux shares unmodified private pages with the page cache): the store makes bundle files
//! 0444 in 0555 folders, the unit gives the daemon no write access to installed bundles it did
//! not create, and every reload hashes again. What the weight files hold is the model
//! loader's business.

pub mod rollback;
pub mod sign;
pub mod store;

use crate::model::mapped::SharedMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The manifest's file name inside a bundle.
pub const MANIFEST: &str = "manifest.json";
/// The signature's file name inside a bundle.
pub const SIGNATURE: &str = "manifest.json.minisig";
/// The format tag this build reads and writes.
pub const FORMAT: &str = "noduled-bundle/1";

/// Errors checking a bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The manifest is malformed or inconsistent.
    #[error("{path}: {msg}")]
    Manifest {
        /// The manifest file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// A listed file is missing.
    #[error("{path}: missing (listed in manifest.json `files`)")]
    Missing {
        /// The file.
        path: String,
    },
    /// A file's hash differs from the manifest's.
    #[error("{path}: SHA-256 {actual} does not match manifest.json `files` ({expected})")]
    Hash {
        /// The file.
        path: String,
        /// Hash in the manifest.
        expected: String,
        /// Hash of the file.
        actual: String,
    },
    /// A file is present that the manifest does not list.
    #[error("{path}: not listed in manifest.json `files`")]
    Unlisted {
        /// The file.
        path: String,
    },
    /// Signature problems.
    #[error(transparent)]
    Sign(#[from] sign::SignError),
    /// A public key is configured and the bundle has no signature.
    #[error("{path}: missing; a public key is configured, so only signed bundles are accepted")]
    Unsigned {
        /// The expected signature file.
        path: String,
    },
}

/// One fold's entry in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FoldEntry {
    /// Fold index as in the source checkpoints (fold_k).
    pub index: usize,
    /// The fold's adapter + heads file, relative to the bundle.
    pub file: String,
    /// The fold's beta calibrator.
    pub calibration: crate::calibration::BetaCalibration,
}

/// Where a bundle came from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// SHA-256 of each source file, by path relative to the source folder.
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
    /// Parent model (id, version) when this bundle was derived from another (fine-tuning).
    #[serde(default)]
    pub parent: Option<String>,
    /// The tool and version that wrote the bundle.
    pub converter: String,
    /// RFC 3339 UTC creation time.
    pub created: String,
    /// Free-form notes ("random weights, not for clinical use").
    #[serde(default)]
    pub notes: String,
}

/// The bundle manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Model identity; a model changed by training gets a new id.
    pub model_id: String,
    /// Monotonic version; installs refuse a lower one unless forced.
    pub version: u64,
    /// Tower sizes and LoRA rank/alpha, as the model loader reads them.
    pub config: serde_json::Value,
    /// Precision of the vision tower's base weights: "f32", "f16" or "q8_0".
    pub precision: String,
    /// The folds.
    pub folds: Vec<FoldEntry>,
    /// Model-specific payload (file roles, prompts, golden values), read by the loader.
    pub model: serde_json::Value,
    /// SHA-256 (hex) of every file in the bundle but the manifest and its signature.
    pub files: BTreeMap<String, String>,
    /// Where it came from.
    pub provenance: Provenance,
}

impl Manifest {
    /// Reads and parses `BUNDLE/manifest.json` (no hash checks: see [`verify`]).
    pub fn read(bundle: &Path) -> Result<Self, BundleError> {
        let path = bundle.join(MANIFEST);
        let bytes = std::fs::read(&path).map_err(|source| BundleError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes, &path)
    }

    /// Parses manifest bytes read from `path` (named in messages).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, BundleError> {
        let p = path.display().to_string();
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| BundleError::Manifest {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        if m.format != FORMAT {
            return Err(BundleError::Manifest {
                path: p,
                msg: format!("`format` is {:?}, this build reads {FORMAT:?}", m.format),
            });
        }
        if m.folds.is_empty() {
            return Err(BundleError::Manifest {
                path: p,
                msg: "`folds` is empty".into(),
            });
        }
        for name in m.files.keys() {
            if name.contains("..")
                || name.starts_with('/')
                || name.contains('\\')
                || name == MANIFEST
                || name == SIGNATURE
            {
                return Err(BundleError::Manifest {
                    path: p,
                    msg: format!("`files` names {name:?}: not a plain file name inside the bundle"),
                });
            }
        }
        Ok(m)
    }

    /// Writes the manifest (pretty JSON) into `bundle`.
    pub fn write(&self, bundle: &Path) -> Result<(), BundleError> {
        let path = bundle.join(MANIFEST);
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        std::fs::write(&path, text + "\n").map_err(|source| BundleError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// `model_id-version`, the bundle's directory name in the store.
    pub fn store_name(&self) -> String {
        format!("{}-{}", self.model_id, self.version)
    }
}

/// SHA-256 of a file, hex, streamed.
pub fn sha256_file(path: &Path) -> Result<String, BundleError> {
    let io = |source| BundleError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Hashes every file in `bundle` except the manifest and signature (flat directory).
pub fn hash_files(bundle: &Path) -> Result<BTreeMap<String, String>, BundleError> {
    let mut out = BTreeMap::new();
    for name in list_files(bundle)? {
        if name != MANIFEST && name != SIGNATURE {
            out.insert(name.clone(), sha256_file(&bundle.join(&name))?);
        }
    }
    Ok(out)
}

fn list_files(dir: &Path) -> Result<Vec<String>, BundleError> {
    let io = |source| BundleError::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// What [`verify`] found.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The manifest.
    pub manifest: Manifest,
    /// The signature's trusted comment when a key checked it.
    pub signed: Option<String>,
}

/// Checks a bundle: manifest, every file's SHA-256, no extra files, and the signature when
/// `public_key` is given (then an unsigned bundle is refused). See [`open_verified`].
pub fn verify(
    bundle: &Path,
    public_key: Option<&sign::PublicKey>,
) -> Result<Verified, BundleError> {
    let o = open_verified(bundle, public_key)?;
    Ok(Verified {
        manifest: o.manifest,
        signed: o.signed,
    })
}

/// A bundle opened and verified once; its files' mappings are what was hashed.
pub struct Opened {
    /// The bundle folder as resolved when opened (a store's `current` target), for messages.
    pub dir: PathBuf,
    /// The manifest, parsed from the bytes the signature was checked on.
    pub manifest: Manifest,
    /// The signature's trusted comment when a key checked it.
    pub signed: Option<String>,
    maps: BTreeMap<String, SharedMap>,
}

impl Opened {
    /// The verified mapping of listed file `name`.
    pub fn map(&self, name: &str) -> Result<SharedMap, BundleError> {
        self.maps
            .get(name)
            .cloned()
            .ok_or_else(|| BundleError::Missing {
                path: self.dir.join(name).display().to_string(),
            })
    }

    /// `dir/name`, for messages.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Opens `bundle` (a bundle folder, or a store whose `current` it resolves once), reads the
/// manifest once, checks the signature on those bytes when `public_key` is given, maps every
/// listed file opened beneath the folder and checks the SHA-256 of the mapping; refuses
/// unlisted entries.
pub fn open_verified(
    bundle: &Path,
    public_key: Option<&sign::PublicKey>,
) -> Result<Opened, BundleError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| BundleError::Io { path, source }
    };
    let mut dir = bundle.to_path_buf();
    if !bundle.join(MANIFEST).exists() && bundle.join(store::CURRENT).exists() {
        dir = bundle.join(store::CURRENT);
    }
    let dir = dir.canonicalize().map_err(io(&dir))?;
    let opener = crate::confine::Opener::confined(std::slice::from_ref(&dir)).map_err(io(&dir))?;
    let folder = opener.open_dir(&dir).map_err(io(&dir))?;
    let read_member = |name: &str| -> Result<Vec<u8>, BundleError> {
        let mut bytes = Vec::new();
        folder
            .open_file(std::ffi::OsStr::new(name))
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io(&dir.join(name)))?;
        Ok(bytes)
    };
    let manifest_bytes = read_member(MANIFEST)?;
    let manifest = Manifest::parse(&manifest_bytes, &dir.join(MANIFEST))?;
    let signed = match public_key {
        Some(key) => {
            let sig_path = dir.join(SIGNATURE);
            let sig = match read_member(SIGNATURE) {
                Err(BundleError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Err(BundleError::Unsigned {
                        path: sig_path.display().to_string(),
                    })
                }
                other => other?,
            };
            Some(key.verify_bytes(&manifest_bytes, &sig, &sig_path)?)
        }
        None => None,
    };
    let mut maps = BTreeMap::new();
    for (name, expected) in &manifest.files {
        let path = dir.join(name);
        let file = match folder.open_file(std::ffi::OsStr::new(name)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BundleError::Missing {
                    path: path.display().to_string(),
                })
            }
            Err(e) => return Err(io(&path)(e)),
        };
        // SAFETY: a private read-only mapping of a file whose bytes are hashed below; see the
        // module doc for in-place writes.
        let map =
            unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) }.map_err(io(&path))?;
        let actual = hex::encode(Sha256::digest(&map[..]));
        if &actual != expected {
            return Err(BundleError::Hash {
                path: path.display().to_string(),
                expected: expected.clone(),
                actual,
            });
        }
        maps.insert(name.clone(), std::sync::Arc::new(map));
    }
    for name in list_files(&dir)? {
        if name != MANIFEST && name != SIGNATURE && !manifest.files.contains_key(&name) {
            return Err(BundleError::Unlisted {
                path: dir.join(name).display().to_string(),
            });
        }
    }
    Ok(Opened {
        dir,
        manifest,
        signed,
        maps,
    })
}

/// Signs `BUNDLE/manifest.json` with `key`, writing `manifest.json.minisig`.
pub fn sign_bundle(bundle: &Path, key: &sign::SecretKey) -> Result<PathBuf, BundleError> {
    let manifest = Manifest::read(bundle)?;
    let msg_path = bundle.join(MANIFEST);
    let msg = std::fs::read(&msg_path).map_err(|source| BundleError::Io {
        path: msg_path.display().to_string(),
        source,
    })?;
    let comment = format!(
        "noduled bundle {} version {}",
        manifest.model_id, manifest.version
    );
    let sig_path = bundle.join(SIGNATURE);
    std::fs::write(&sig_path, key.sign(&msg, &comment)).map_err(|source| BundleError::Io {
        path: sig_path.display().to_string(),
        source,
    })?;
    Ok(sig_path)
}
