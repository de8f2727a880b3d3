//! The daemon on the fixture's real CT: NIfTI and DICOM series jobs (same nodule, same
//! score), crops by inbox sidecar, inline base64 and binary MQTT payloads, and the README's
//! main command `noduled demo`.

use crate::daemon_support::*;
use base64::Engine as _;

/// `.npy` (v1.0, little-endian f4, C order) bytes of fixture nodule `name`'s 100^3 HU crop.
fn crop_npy(name: &str) -> Vec<u8> {
    let bytes = std::fs::read(crate::util::reference().join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(&format!("{name}.crop_hu")).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': {:?}, }}",
        (t.shape()[0], t.shape()[1], t.shape()[2])
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(t.data());
    out
}

fn calibrated(r: &serde_json::Value) -> f64 {
    r["nodules"][0]["score"]["calibrated"].as_f64().unwrap()
}

#[test]
fn ct_jobs_by_folder_nifti_dicom_and_crop_sidecar() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &config_text(tmp.path(), &model(), "", ""));
    let (_, dicom, coord) = ct_case("lung1");

    d.drop_job("nifti.json", &ct_job("nifti", "P1", 1));
    let series = serde_json::json!({"job_id": "dicom", "patient_id": "P1", "series": {"path": dicom},
        "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
    d.drop_job("dicom.json", &series.to_string());
    // A crop file first, then its sidecar job naming it relative to the inbox.
    std::fs::write(d.dir.join("inbox/lung1_crop.npy"), crop_npy("lung1")).unwrap();
    d.drop_job(
        "crop.json",
        r#"{"job_id":"crop","patient_id":"P1","crop":{"path":"lung1_crop.npy"},"nodules":[{"nodule_id":"n0"}]}"#,
    );

    let n = wait_for(60, "NIfTI result", || d.result_for("nifti"));
    let s = wait_for(60, "DICOM result", || d.result_for("dicom"));
    let c = wait_for(60, "crop result", || d.result_for("crop"));
    for r in [&n, &s, &c] {
        assert_eq!(r["status"], "ok", "{r:#}");
        assert!((0.0..=1.0).contains(&calibrated(r)));
    }
    assert_eq!(n["input"]["kind"], "volume");
    assert_eq!(s["input"]["kind"], "series");
    // The same voxels as NIfTI, as a DICOM series, and as the reference crop: one score.
    assert!(
        (calibrated(&n) - calibrated(&s)).abs() < 1e-3,
        "NIfTI {} vs DICOM {}",
        calibrated(&n),
        calibrated(&s)
    );
    assert!(
        (calibrated(&n) - calibrated(&c)).abs() < 1e-2,
        "NIfTI {} vs crop {}",
        calibrated(&n),
        calibrated(&c)
    );
}

#[test]
fn mqtt_inline_crops_base64_and_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let probe = Probe::start(broker.port, "probe-crop", "nd/result/#");
    let dd = tmp.path().join("d");
    let mqtt = format!("[mqtt]\nenabled = true\nhost = \"127.0.0.1\"\nport = {}\nclient_id = \"noduled-crop\"\ntopic_prefix = \"nd\"\n", broker.port);
    let d = Daemon::start(&dd, &config_text(&dd, &model(), "", &mqtt));
    let npy = crop_npy("lung1");

    let b64 = serde_json::json!({"job_id": "b64", "patient_id": "P-crop",
        "crop": {"base64": base64::engine::general_purpose::STANDARD.encode(&npy), "format": "npy"},
        "nodules": [{"nodule_id": "n0"}]});
    probe.publish("nd/job", b64.to_string().into_bytes());
    let mut binary = br#"{"job_id":"bin","patient_id":"P-crop","crop":{"format":"npy"},"nodules":[{"nodule_id":"n0"}]}"#.to_vec();
    binary.push(0);
    binary.extend(&npy);
    probe.publish("nd/job", binary);

    let a = probe.wait(60, "nd/result", |r| r["job_id"] == "b64");
    let b = probe.wait(60, "nd/result", |r| r["job_id"] == "bin");
    assert_eq!(a.json["status"], "ok", "{:#}", a.json);
    assert_eq!(b.json["status"], "ok", "{:#}", b.json);
    assert!((calibrated(&a.json) - calibrated(&b.json)).abs() < 1e-9);
    // Spooled crops are removed once their job is done.
    wait_for(10, "empty spool", || {
        d.files("state/spool").is_empty().then_some(())
    });
}

#[test]
fn demo_prints_a_result_for_the_example_ct() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(crate::util::bin())
        .current_dir(crate::util::root())
        .args(["demo", "--state-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status"], "ok");
    assert_eq!(r["job_id"], "example-lung1");
    assert_eq!(r["nodules"][0]["nodule_id"], "lung1");
    assert!((0.0..=1.0).contains(&calibrated(&r)));
    assert!(stderr.contains("not for clinical use"), "{stderr}");
}
