//! Integrity at every load and anti-rollback (issue 16), with the real binary: a tampered
//! bundle is refused at start and on reload with no key set; a signed lower version is
//! refused on SIGHUP; `noduled bundle rollback` makes it servable, once.

use crate::daemon_support::{config_text, signal, wait_for, Daemon};
use crate::util::{bin, reference};
use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn convert(out: &Path, version: u64) {
    run(&[
        "convert",
        "--checkpoints",
        reference().join("model").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--version",
        &version.to_string(),
    ]);
}

/// Flips one byte in the middle of the bundle's largest weight file.
fn tamper(bundle: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::read_dir(bundle)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    std::fs::set_permissions(bundle, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() - 64;
    bytes[mid] ^= 0x01;
    // A new file renamed over the old one (a running daemon's mapping keeps the old inode).
    let tmp = f.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, &f).unwrap();
}

/// The served model's version, from `noduled_model_info{..,version="N",..}` in /metrics.
fn version(d: &Daemon) -> String {
    let (_, body) = d.get("/metrics").unwrap();
    let line = body
        .lines()
        .find(|l| l.starts_with("noduled_model_info{"))
        .unwrap_or_else(|| panic!("no model info in {body}"));
    let v = line.split("version=\"").nth(1).unwrap();
    v[..v.find('"').unwrap()].to_string()
}

fn reload(d: &Daemon, n: usize) {
    signal(d.pid(), "HUP");
    wait_for(60, "reload", || {
        let log = d.log();
        (log.matches("reload failed").count() + log.matches("model reloaded").count() >= n)
            .then_some(())
    });
}

#[test]
fn tampered_bundle_is_refused_at_start_and_reload_without_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("b1");
    convert(&bundle, 1);
    let bad = tmp.path().join("bad");
    convert(&bad, 1);
    tamper(&bad);

    // Start: exit 2, one line naming the file and the hash.
    let dir = tmp.path().join("start");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("noduled.toml"), config_text(&dir, &bad, "", "")).unwrap();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(dir.join("noduled.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .last()
            .unwrap_or("")
            .contains("does not match manifest.json"),
        "{err}"
    );

    // Reload: the good bundle serves, is tampered in place, SIGHUP keeps the old model.
    let dir = tmp.path().join("reload");
    let d = Daemon::start(&dir, &config_text(&dir, &bundle, "", ""));
    tamper(&bundle);
    reload(&d, 1);
    let log = d.log();
    assert!(
        log.contains("reload failed") && log.contains("does not match manifest.json"),
        "{log}"
    );
    assert_eq!(d.get("/readyz").unwrap().0, 200);
}

#[test]
fn signed_lower_version_is_refused_on_reload_until_bundle_rollback() {
    let tmp = tempfile::tempdir().unwrap();
    let (b1, b2) = (tmp.path().join("b1"), tmp.path().join("b2"));
    convert(&b1, 1);
    convert(&b2, 2);
    let keybase = tmp.path().join("site");
    run(&["bundle", "keygen", "--out", keybase.to_str().unwrap()]);
    let (key, pubkey) = (tmp.path().join("site.key"), tmp.path().join("site.pub"));
    let store = tmp.path().join("store");
    for b in [&b1, &b2] {
        run(&[
            "bundle",
            "sign",
            b.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ]);
        run(&[
            "bundle",
            "install",
            b.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--pubkey",
            pubkey.to_str().unwrap(),
        ]);
    }
    let dir = tmp.path().join("d");
    let cfg = config_text(&dir, &store.join("current"), "", "").replacen(
        "[model]\n",
        &format!("[model]\npublic_key = \"{}\"\n", pubkey.display()),
        1,
    );
    let d = Daemon::start(&dir, &cfg);
    assert_eq!(version(&d), "2");
    let floor: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state/served.json")).unwrap()).unwrap();
    assert_eq!(floor["highest_version"], 2);

    // An attacker's switch of `current` to the older signed bundle: refused, v2 kept.
    let current = store.join("current");
    let v1_dir = std::fs::read_link(store.join("previous")).unwrap();
    let v2_dir = std::fs::read_link(&current).unwrap();
    std::fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(&v1_dir, &current).unwrap();
    reload(&d, 1);
    let log = d.log();
    assert!(log.contains("below version 2 already served"), "{log}");
    assert_eq!(version(&d), "2");

    // The field engineer's rollback: put v2 back as current, then roll back on purpose.
    std::fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(&v2_dir, &current).unwrap();
    let _ = std::fs::remove_file(store.join("previous"));
    std::os::unix::fs::symlink(&v1_dir, store.join("previous")).unwrap();
    run(&["bundle", "rollback", "--store", store.to_str().unwrap()]);
    let first = std::fs::read(store.join("rollback.json")).unwrap();
    reload(&d, 2);
    assert_eq!(version(&d), "1", "{}", d.log());
    assert!(d
        .log()
        .contains("serving an older bundle after `noduled bundle rollback`"));

    // The record is used once: v2 again, then the same switch back to v1 is refused.
    run(&["bundle", "rollback", "--store", store.to_str().unwrap()]);
    reload(&d, 3);
    assert_eq!(version(&d), "2");
    // Replaying the first record (copied back as it was) with current switched by hand.
    std::fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(&v1_dir, &current).unwrap();
    std::fs::write(store.join("rollback.json"), first).unwrap();
    reload(&d, 4);
    assert_eq!(version(&d), "2");
    assert_eq!(d.log().matches("below version 2 already served").count(), 2);
}
