//! The systemd unit's hardening (issue 16): `systemd-analyze security --offline=true` at 3.0 or
//! below, with the GPU left usable (no PrivateDevices=, no MemoryDenyWriteExecute=, a closed
//! device policy naming the NVIDIA and Jetson nodes) and the inbox the only group-writable
//! folder. `bash scripts/test` installs systemd-analyze where it is missing.

use crate::util::root;
use std::process::Command;

fn unit() -> std::path::PathBuf {
    root().join("systemd/noduled.service")
}

fn keys(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn unit_exposure_is_at_most_3_and_keeps_the_gpu() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit())
        .output()
        .expect("systemd-analyze not found: install the Debian package `systemd` (bash scripts/test does)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure figure in:\n{text}"));
    let figure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the figure in {line:?}"));
    assert!(figure <= 3.0, "{line}");

    let k = keys(&std::fs::read_to_string(unit()).unwrap());
    let has = |key: &str, val: &str| k.iter().any(|(a, b)| a == key && b.contains(val));
    assert!(!k
        .iter()
        .any(|(a, _)| a == "PrivateDevices" || a == "MemoryDenyWriteExecute"));
    assert!(has("DevicePolicy", "closed"));
    for node in [
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "char-nvidia-frontend",
        "/dev/nvmap",
        "/dev/nvhost-ctrl-gpu",
    ] {
        assert!(has("DeviceAllow", node), "DeviceAllow= lacks {node}");
    }
    assert!(has("CapabilityBoundingSet", "") && has("ProtectProc", "invisible"));
    assert!(has("SystemCallFilter", "@system-service") && has("MemoryMax", "G"));
    assert!(has("StateDirectoryMode", "0750"));
    assert!(has("ExecStartPre", "-m 2770") && has("ExecStartPre", "/var/lib/noduled/inbox"));
    // systemd 249 (Ubuntu 22.04, JetPack 6): no directives newer than it.
    for newer in [
        "ReloadSignal",
        "ImportCredential",
        "MemoryZSwapMax",
        "ProtectHostname=private",
    ] {
        assert!(
            !k.iter()
                .any(|(a, b)| a == newer || format!("{a}={b}") == newer),
            "{newer} needs systemd > 249"
        );
    }
}
