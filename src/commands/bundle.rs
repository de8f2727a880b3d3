//! `noduled bundle ...`: keys, signing, verification, install into the model store, rollback.

use crate::bundle::{self, sign, store};
use std::path::{Path, PathBuf};

/// Arguments of `noduled bundle`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Make an Ed25519 key pair: OUT.key (secret, keep off the box) and OUT.pub.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign BUNDLE/manifest.json, writing manifest.json.minisig.
    Sign {
        /// The bundle directory.
        bundle: PathBuf,
        /// The secret key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a bundle's hashes, config and (with --pubkey) signature.
    Verify {
        /// The bundle directory.
        bundle: PathBuf,
        /// Public key; when given, an unsigned or wrongly signed bundle fails.
        #[arg(long)]
        pubkey: Option<PathBuf>,
    },
    /// Install a bundle into the store after verification and a self-test; switch `current`.
    Install {
        /// The bundle directory.
        bundle: PathBuf,
        /// The model store.
        #[arg(long, default_value = "/var/lib/noduled/models")]
        store: PathBuf,
        /// Public key; when given, only bundles it signed are installed.
        #[arg(long)]
        pubkey: Option<PathBuf>,
        /// Install even when the version is lower than the current one.
        #[arg(long)]
        force: bool,
    },
    /// Switch `current` back to `previous`.
    Rollback {
        /// The model store.
        #[arg(long, default_value = "/var/lib/noduled/models")]
        store: PathBuf,
        /// Public key; when given, the previous bundle's signature is checked again.
        #[arg(long)]
        pubkey: Option<PathBuf>,
    },
}

fn read_key(path: &Option<PathBuf>) -> anyhow::Result<Option<sign::PublicKey>> {
    Ok(match path {
        Some(p) => Some(sign::PublicKey::read(p)?),
        None => None,
    })
}

/// Runs `noduled bundle`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.action {
        Action::Keygen { out } => {
            let sk = sign::SecretKey::generate();
            let (key, public) = (with_ext(&out, "key"), with_ext(&out, "pub"));
            if key.exists() || public.exists() {
                anyhow::bail!(
                    "{}: key files exist already; refusing to overwrite",
                    out.display()
                );
            }
            sk.write(&key)?;
            sk.public().write(&public)?;
            println!(
                "{}",
                serde_json::json!({"secret_key": key, "public_key": public, "key_id": sk.public().id_hex()})
            );
        }
        Action::Sign { bundle, key } => {
            let sk = sign::SecretKey::read(&key)?;
            bundle::verify(&bundle, None)?;
            let sig = bundle::sign_bundle(&bundle, &sk)?;
            println!(
                "{}",
                serde_json::json!({"signature": sig, "key_id": sk.public().id_hex()})
            );
        }
        Action::Verify { bundle, pubkey } => {
            let key = read_key(&pubkey)?;
            let v = bundle::verify(&bundle, key.as_ref())?;
            crate::engine::check_bundle_config(&bundle)?;
            println!(
                "{}",
                serde_json::json!({"ok": true, "model_id": v.manifest.model_id, "version": v.manifest.version,
                    "precision": v.manifest.precision, "folds": v.manifest.folds.len(), "signed": v.signed})
            );
        }
        Action::Install {
            bundle,
            store,
            pubkey,
            force,
        } => {
            let key = read_key(&pubkey)?;
            let st = store::Store::open(&store)?;
            let opts = store::InstallOptions {
                public_key: key.as_ref(),
                force,
            };
            let dest = st.install(&bundle, &opts, |dir| {
                crate::engine::self_test(dir).map_err(|e| format!("{e:#}"))
            })?;
            println!(
                "{}",
                serde_json::json!({"installed": dest, "current": st.current(), "previous": st.previous()})
            );
        }
        Action::Rollback { store, pubkey } => {
            let key = read_key(&pubkey)?;
            let st = store::Store::open(&store)?;
            let from = st
                .current()
                .and_then(|c| bundle::Manifest::read(&c).ok())
                .map(|m| m.version)
                .unwrap_or(0);
            let cur = st.rollback(key.as_ref())?;
            // The daemon serves a version below the highest it served only after this record.
            let to = bundle::Manifest::read(&cur)?;
            let rec = bundle::rollback::record(&store, from, &to).map_err(anyhow::Error::msg)?;
            tracing::warn!(from = rec.from_version, to = %rec.to, "rollback recorded for the daemon");
            println!(
                "{}",
                serde_json::json!({"current": cur, "previous": st.previous()})
            );
        }
    }
    Ok(())
}

fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}
