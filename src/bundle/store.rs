//! The model store on the box: immutable installed bundles and two links.
//!
//! ```text
//! STORE/
//!   <model_id>-<version>/   one installed bundle, files and directory read-only
//!   current -> <name>       what the daemon loads; switched only by rename(2)
//!   previous -> <name>      what `rollback` returns to
//! ```
//! An install verifies the bundle (hashes, signature when a key is configured), refuses a
//! version lower than the current one unless forced, copies it under a staging name, fsyncs,
//! renames it into place, verifies the copy, runs the caller's self-test on it, and only
//! then moves `previous` to the old target and `current` to the new one. Any failure before
//! the switch leaves `current` and `previous` exactly as they were. Links are relative, so
//! a store can be moved as a whole.

use super::{verify, BundleError, Manifest};
use std::path::{Path, PathBuf};

/// Name of the link to the serving bundle.
pub const CURRENT: &str = "current";
/// Name of the link to the bundle before it.
pub const PREVIOUS: &str = "previous";

/// Errors from store operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The bundle failed verification.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The bundle's version is lower than the installed one.
    #[error("{bundle}: version {new} is lower than the installed {id} version {current}; refusing (use --force to downgrade)")]
    Downgrade {
        /// The bundle.
        bundle: String,
        /// Its version.
        new: u64,
        /// Installed model id.
        id: String,
        /// Installed version.
        current: u64,
    },
    /// The bundle is already the current one.
    #[error("{name}: already installed and current")]
    AlreadyCurrent {
        /// Store name.
        name: String,
    },
    /// The self-test failed; nothing was switched.
    #[error("{name}: self-test failed, `current` left unchanged: {reason}")]
    SelfTest {
        /// Store name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Nothing to roll back to.
    #[error("{path}: no previous bundle to roll back to")]
    NoPrevious {
        /// The previous link.
        path: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A model store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Options for [`Store::install`].
#[derive(Debug, Default)]
pub struct InstallOptions<'a> {
    /// When set, only bundles signed with this key are accepted.
    pub public_key: Option<&'a super::sign::PublicKey>,
    /// Accept a lower version (a deliberate downgrade).
    pub force: bool,
}

impl Store {
    /// Opens (creating if needed) a store at `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The store's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn link_target(&self, link: &str) -> Option<PathBuf> {
        let path = self.root.join(link);
        let target = std::fs::read_link(&path).ok()?;
        Some(self.root.join(target))
    }

    /// The serving bundle's directory, if any.
    pub fn current(&self) -> Option<PathBuf> {
        self.link_target(CURRENT)
    }

    /// The bundle before it, if any.
    pub fn previous(&self) -> Option<PathBuf> {
        self.link_target(PREVIOUS)
    }

    /// Points `link` at `name` atomically (symlink to a temporary name, then rename(2)).
    fn switch(&self, link: &str, name: &str) -> Result<(), StoreError> {
        let tmp = self.root.join(format!(".{link}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp).map_err(io(&tmp))?;
        let dst = self.root.join(link);
        std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
        sync_dir(&self.root)
    }

    /// Installs `bundle` (see the module doc); `self_test` gets the installed directory and
    /// returns an error message when the bundle must not serve.
    pub fn install(
        &self,
        bundle: &Path,
        opts: &InstallOptions<'_>,
        self_test: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<PathBuf, StoreError> {
        let verified = verify(bundle, opts.public_key)?;
        let manifest = verified.manifest;
        let name = manifest.store_name();
        if let Some(cur) = self.current() {
            if cur
                .file_name()
                .map(|n| n.to_string_lossy() == name.as_str())
                .unwrap_or(false)
            {
                return Err(StoreError::AlreadyCurrent { name });
            }
            if let Ok(cur_manifest) = Manifest::read(&cur) {
                if manifest.version < cur_manifest.version && !opts.force {
                    return Err(StoreError::Downgrade {
                        bundle: bundle.display().to_string(),
                        new: manifest.version,
                        id: cur_manifest.model_id,
                        current: cur_manifest.version,
                    });
                }
            }
        }
        let dest = self.root.join(&name);
        let fresh = !dest.exists();
        if fresh {
            let staging = self
                .root
                .join(format!(".staging-{name}-{}", std::process::id()));
            let _ = remove_tree(&staging);
            std::fs::create_dir(&staging).map_err(io(&staging))?;
            let mut names: Vec<&String> = manifest.files.keys().collect();
            let manifest_name = super::MANIFEST.to_string();
            let sig_name = super::SIGNATURE.to_string();
            names.push(&manifest_name);
            if bundle.join(super::SIGNATURE).exists() {
                names.push(&sig_name);
            }
            for file in names {
                let (src, dst) = (bundle.join(file), staging.join(file));
                std::fs::copy(&src, &dst).map_err(io(&src))?;
                let f = std::fs::File::open(&dst).map_err(io(&dst))?;
                f.sync_all().map_err(io(&dst))?;
                set_mode(&dst, 0o444)?;
            }
            set_mode(&staging, 0o555)?;
            sync_dir(&staging)?;
            std::fs::rename(&staging, &dest).map_err(io(&dest))?;
            sync_dir(&self.root)?;
        }
        // The copy must verify as the source did.
        if let Err(e) = verify(&dest, opts.public_key) {
            if fresh {
                let _ = remove_tree(&dest);
            }
            return Err(e.into());
        }
        if let Err(reason) = self_test(&dest) {
            if fresh {
                let _ = remove_tree(&dest);
            }
            return Err(StoreError::SelfTest { name, reason });
        }
        if let Some(cur) = self.current() {
            let old = cur
                .file_name()
                .expect("link target has a name")
                .to_string_lossy()
                .into_owned();
            self.switch(PREVIOUS, &old)?;
        }
        self.switch(CURRENT, &name)?;
        Ok(dest)
    }

    /// Makes `previous` current again (and the current one `previous`), after verifying it.
    pub fn rollback(
        &self,
        public_key: Option<&super::sign::PublicKey>,
    ) -> Result<PathBuf, StoreError> {
        let prev = self.previous().ok_or_else(|| StoreError::NoPrevious {
            path: self.root.join(PREVIOUS).display().to_string(),
        })?;
        verify(&prev, public_key)?;
        let prev_name = prev
            .file_name()
            .expect("link target has a name")
            .to_string_lossy()
            .into_owned();
        if let Some(cur) = self.current() {
            let cur_name = cur
                .file_name()
                .expect("link target has a name")
                .to_string_lossy()
                .into_owned();
            self.switch(PREVIOUS, &cur_name)?;
        }
        self.switch(CURRENT, &prev_name)?;
        Ok(prev)
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let f = std::fs::File::open(dir).map_err(io(dir))?;
    f.sync_all().map_err(io(dir))
}

/// Removes a store directory whose files and directory are read-only.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.exists() {
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::remove_dir_all(dir)
}
