//! Bundle integrity, signatures and the model store's install/rollback rules, on bundles
//! made of real files (the weight files' contents do not matter to these checks).

use crate::util;
use noduled::bundle::{self, sign, store, Manifest, Provenance};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes a bundle with two payload files and a manifest at `version`.
fn make_bundle(dir: &Path, id: &str, version: u64) -> PathBuf {
    let b = dir.join(format!("{id}-{version}-src"));
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join("vision.safetensors"), vec![7u8; 4096]).unwrap();
    std::fs::write(
        b.join("fold_0.safetensors"),
        format!("fold zero of {version}"),
    )
    .unwrap();
    let m = Manifest {
        format: bundle::FORMAT.into(),
        model_id: id.into(),
        version,
        config: serde_json::json!({}),
        precision: "f32".into(),
        folds: vec![bundle::FoldEntry {
            index: 0,
            file: "fold_0.safetensors".into(),
            calibration: noduled::calibration::BetaCalibration {
                a: 1.0,
                b: 1.0,
                c: 0.0,
                clip_eps: 1e-7,
            },
        }],
        model: serde_json::json!({}),
        files: bundle::hash_files(&b).unwrap(),
        provenance: Provenance {
            converter: "test".into(),
            created: "2026-11-27T00:00:00Z".into(),
            ..Default::default()
        },
    };
    m.write(&b).unwrap();
    b
}

fn keys(dir: &Path) -> (sign::SecretKey, sign::PublicKey) {
    let sk = sign::SecretKey::generate();
    let pk = sk.public();
    sk.write(&dir.join("k.key")).unwrap();
    pk.write(&dir.join("k.pub")).unwrap();
    (sk, pk)
}

fn target_name(p: Option<PathBuf>) -> Option<String> {
    p.map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
}

#[test]
fn install_switches_current_and_rollback_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keys(tmp.path());
    let st = store::Store::open(&tmp.path().join("store")).unwrap();
    let opts = store::InstallOptions {
        public_key: Some(&pk),
        force: false,
    };
    for v in [1, 2] {
        let b = make_bundle(tmp.path(), "m", v);
        bundle::sign_bundle(&b, &sk).unwrap();
        st.install(&b, &opts, |_| Ok(())).unwrap();
    }
    assert_eq!(target_name(st.current()).as_deref(), Some("m-2"));
    assert_eq!(target_name(st.previous()).as_deref(), Some("m-1"));
    st.rollback(Some(&pk)).unwrap();
    assert_eq!(target_name(st.current()).as_deref(), Some("m-1"));
    assert_eq!(target_name(st.previous()).as_deref(), Some("m-2"));
    // Installed files are read-only.
    let meta = std::fs::metadata(st.root().join("m-1/vision.safetensors")).unwrap();
    assert!(meta.permissions().readonly());
}

/// Every refusal leaves `current` (and `previous`) untouched, with an error naming the cause.
#[test]
fn refusals_leave_current_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let (sk, pk) = keys(tmp.path());
    let st = store::Store::open(&tmp.path().join("store")).unwrap();
    let opts = store::InstallOptions {
        public_key: Some(&pk),
        force: false,
    };
    let b2 = make_bundle(tmp.path(), "m", 2);
    bundle::sign_bundle(&b2, &sk).unwrap();
    st.install(&b2, &opts, |_| Ok(())).unwrap();

    let check = |b: &Path, self_test_ok: bool, want: &str| {
        let err = st
            .install(b, &opts, |_| {
                if self_test_ok {
                    Ok(())
                } else {
                    Err("golden prob 0.3 vs 0.7".into())
                }
            })
            .expect_err("must refuse")
            .to_string();
        assert!(err.contains(want), "{err:?} should mention {want:?}");
        assert!(!err.contains('\n'), "one line: {err:?}");
        assert_eq!(target_name(st.current()).as_deref(), Some("m-2"));
        assert_eq!(st.previous(), None);
    };
    // A flipped byte in a payload file.
    let b = make_bundle(tmp.path(), "flip", 3);
    bundle::sign_bundle(&b, &sk).unwrap();
    let f = b.join("vision.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    check(&b, true, "vision.safetensors: SHA-256");
    // A flipped byte in the manifest breaks the signature.
    let b = make_bundle(tmp.path(), "flipm", 3);
    bundle::sign_bundle(&b, &sk).unwrap();
    let text = std::fs::read_to_string(b.join("manifest.json"))
        .unwrap()
        .replace("\"version\": 3", "\"version\": 4");
    std::fs::write(b.join("manifest.json"), text).unwrap();
    check(&b, true, "signature does not verify");
    // A missing file.
    let b = make_bundle(tmp.path(), "miss", 3);
    bundle::sign_bundle(&b, &sk).unwrap();
    std::fs::remove_file(b.join("fold_0.safetensors")).unwrap();
    check(&b, true, "fold_0.safetensors: missing");
    // Signed by another key; unsigned.
    let b = make_bundle(tmp.path(), "other", 3);
    bundle::sign_bundle(&b, &sign::SecretKey::generate()).unwrap();
    check(&b, true, "not by the configured key");
    let b = make_bundle(tmp.path(), "unsigned", 3);
    check(&b, true, "only signed bundles");
    // A lower version.
    let b = make_bundle(tmp.path(), "m", 1);
    bundle::sign_bundle(&b, &sk).unwrap();
    check(&b, true, "lower than the installed");
    // A failing self-test: refused, and the copy does not linger in the store.
    let b = make_bundle(tmp.path(), "bad", 5);
    bundle::sign_bundle(&b, &sk).unwrap();
    check(&b, false, "self-test failed");
    assert!(!st.root().join("bad-5").exists());
    // An unlisted extra file.
    let b = make_bundle(tmp.path(), "extra", 3);
    bundle::sign_bundle(&b, &sk).unwrap();
    std::fs::write(b.join("extra.bin"), b"x").unwrap();
    check(&b, true, "extra.bin: not listed");
    // A forced downgrade goes through.
    let b = make_bundle(tmp.path(), "m", 1);
    bundle::sign_bundle(&b, &sk).unwrap();
    st.install(
        &b,
        &store::InstallOptions {
            public_key: Some(&pk),
            force: true,
        },
        |_| Ok(()),
    )
    .unwrap();
    assert_eq!(target_name(st.current()).as_deref(), Some("m-1"));
}

/// The CLI: keygen, sign and verify through the real binary (verify also checks the config,
/// so this uses a real bundle converted from the fixture model); tampering fails with exit 2.
#[test]
fn cli_keygen_sign_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("cli-1");
    let run = |args: &[&str]| Command::new(util::bin()).args(args).output().unwrap();
    let model = util::reference().join("model");
    let out = run(&[
        "convert",
        "--checkpoints",
        model.to_str().unwrap(),
        "--out",
        b.to_str().unwrap(),
        "--precision",
        "f32",
        "--model-id",
        "cli",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "bundle",
        "keygen",
        "--out",
        tmp.path().join("site").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = tmp.path().join("site.key");
    let pubkey = tmp.path().join("site.pub");
    let out = run(&[
        "bundle",
        "sign",
        b.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "bundle",
        "verify",
        b.to_str().unwrap(),
        "--pubkey",
        pubkey.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["signed"], "noduled bundle cli version 1");
    std::fs::write(b.join("fold_0.safetensors"), "tampered").unwrap();
    let out = run(&["bundle", "verify", b.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fold_0.safetensors: SHA-256"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
