//! Issue 18: the DICOM SR of a series job, read back by dcmtk's `dsrdump` and validated by
//! dicom3tools' `dciodvfy`, and the summary sentence of the JSON result.

use crate::daemon_support::*;
use std::path::Path;
use std::process::Command;

/// Output of a tool (stdout + stderr), panicking with both when it could not run.
fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (scripts/test installs dcmtk and dicom3tools)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `dciodvfy` lines that are errors (it prints `Error - ...`).
pub fn dciodvfy_errors(path: &Path) -> Vec<String> {
    let (_, text) = tool("dciodvfy", &[path.to_str().unwrap()]);
    text.lines()
        .filter(|l| l.starts_with("Error"))
        .map(str::to_string)
        .collect()
}

/// Checks one SR against its JSON result: score, descriptors, summary, provenance.
pub fn check_sr(sr: &Path, result: &serde_json::Value) {
    let (ok, dump) = tool("dsrdump", &["+Pc", "+Pl", "+Pt", sr.to_str().unwrap()]);
    assert!(ok, "dsrdump failed:\n{dump}");
    let n = &result["nodules"][0];
    let score = n["score"]["calibrated"].as_f64().unwrap();
    assert!(dump.contains("Comprehensive 3D SR"), "{dump}");
    assert!(
        dump.contains("(126000,DCM,\"Imaging Measurement Report\")"),
        "{dump}"
    );
    assert!(dump.contains("TID 1500"), "{dump}");
    assert!(dump.contains("UNVERIFIED"), "{dump}");
    assert!(
        dump.contains(&format!("\"{score:.6}\"")),
        "score {score:.6} not in the SR:\n{dump}"
    );
    // Every descriptor's most likely class is a coded evaluation with its probability.
    for (feature, classes) in n["descriptors"].as_object().unwrap() {
        let (class, p) = classes
            .as_object()
            .unwrap()
            .iter()
            .map(|(c, p)| (c.clone(), p.as_f64().unwrap()))
            .fold(
                (String::new(), f64::MIN),
                |b, x| if x.1 > b.1 { x } else { b },
            );
        let code = noduled::dicom::sr::short(feature);
        let row = format!("CODE:({code},99NODULED,");
        let at = dump
            .find(&row)
            .unwrap_or_else(|| panic!("{feature} not in the SR:\n{dump}"));
        let tail = &dump[at..];
        let value = format!(
            "=({},99NODULED,\"{class}\")",
            noduled::dicom::sr::short(&class)
        );
        assert!(tail.contains(&value), "{feature}: {class} missing");
        assert!(
            tail.contains(&format!("\"{p:.6}\"")),
            "{feature}: {p:.6} missing"
        );
    }
    let summary = n["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("Model output, not for diagnostic use"),
        "{summary}"
    );
    assert!(dump.contains(summary), "summary not in the SR:\n{dump}");
    assert!(dump.contains("SCOORD3D"), "{dump}");
    let errors = dciodvfy_errors(sr);
    assert!(errors.is_empty(), "dciodvfy errors:\n{}", errors.join("\n"));
    check_provenance_and_references(sr, result);
}

/// The SR read with dicom-rs: IHE AIR provenance (Contributing Equipment with the model's
/// Device UID, UNVERIFIED, "NOT FOR DIAGNOSTIC USE"), every source instance referenced, and
/// the SCOORD3D point at the job's LPS coordinate.
fn check_provenance_and_references(sr: &Path, result: &serde_json::Value) {
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;
    let obj = dicom_object::open_file(sr).unwrap();
    let text = |o: &InMemDicomObject, t| {
        o.element(t)
            .unwrap_or_else(|_| panic!("{t} missing"))
            .to_str()
            .unwrap()
            .trim_end_matches(['\0', ' '])
            .to_string()
    };
    let items = |o: &InMemDicomObject, t| -> Vec<InMemDicomObject> {
        o.element(t)
            .ok()
            .and_then(|e| e.items())
            .map(|i| i.to_vec())
            .unwrap_or_default()
    };
    let model: noduled::report::ModelInfo =
        serde_json::from_value(result["model"].clone()).unwrap();
    let eq = items(&obj, tags::CONTRIBUTING_EQUIPMENT_SEQUENCE);
    assert_eq!(eq.len(), 1);
    assert_eq!(
        text(&eq[0], tags::DEVICE_UID),
        noduled::dicom::sr::device_uid(&model)
    );
    assert_eq!(text(&eq[0], tags::MANUFACTURER_MODEL_NAME), model.id);
    assert_eq!(
        text(&eq[0], tags::MANUFACTURER),
        noduled::dicom::sr::MANUFACTURER
    );
    assert_eq!(text(&obj, tags::VERIFICATION_FLAG), "UNVERIFIED");
    assert!(text(&obj, tags::SERIES_DESCRIPTION).contains("NOT FOR DIAGNOSTIC USE"));
    let mut referenced = 0;
    for study in items(&obj, tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE) {
        for series in items(&study, tags::REFERENCED_SERIES_SEQUENCE) {
            referenced += items(&series, tags::REFERENCED_SOP_SEQUENCE).len();
        }
    }
    assert_eq!(
        referenced as u64,
        result["input"]["slices"].as_u64().unwrap()
    );
    fn points(o: &InMemDicomObject, out: &mut Vec<Vec<f64>>) {
        if let Ok(g) = o.element(dicom_dictionary_std::tags::GRAPHIC_DATA) {
            out.push(g.to_multi_float64().unwrap());
        }
        if let Some(children) = o
            .element(dicom_dictionary_std::tags::CONTENT_SEQUENCE)
            .ok()
            .and_then(|e| e.items())
        {
            for c in children {
                points(c, out);
            }
        }
    }
    let mut found = Vec::new();
    points(&obj, &mut found);
    let coord: Vec<f64> = result["nodules"][0]["source"]["coord_lps_mm"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    for (a, b) in found[0].iter().zip(&coord) {
        assert!((a - b).abs() < 1e-3, "SCOORD3D {found:?} vs {coord:?}");
    }
}

#[test]
fn series_job_writes_a_valid_tid1500_sr_and_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &config_text(tmp.path(), &model(), "", ""));
    let (nifti, dicom, coord) = ct_case("lung1");
    let job = serde_json::json!({"job_id": "sr", "patient_id": "P1", "series": {"path": dicom},
        "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
    d.drop_job("sr.json", &job.to_string());
    let vol = serde_json::json!({"job_id": "vol", "patient_id": "P1", "volume": nifti,
        "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
    d.drop_job("vol.json", &vol.to_string());
    let r = wait_for(90, "the series result", || d.result_for("sr"));
    let v = wait_for(90, "the volume result", || d.result_for("vol"));
    assert_eq!(r["status"], "ok", "{r:#}");
    let input = &r["input"];
    assert_eq!(input["slices"], 48, "{input:#}");
    assert_eq!(input["slice_thickness_mm"], 5.0, "{input:#}");
    assert!(
        input["slice_spacing_mm"].as_f64().unwrap() > 2.5,
        "{input:#}"
    );
    assert!(
        input["warnings"][0]
            .as_str()
            .unwrap()
            .contains("thin-slice"),
        "{input:#}"
    );
    let id = r["result_id"].as_str().unwrap();
    let sr = d.dir.join(format!("outbox/{id}.dcm"));
    assert!(sr.exists(), "no SR in the outbox: {:?}", d.files("outbox"));
    check_sr(&sr, &r);
    // No SR for a NIfTI job (no DICOM study to attach it to), but a summary all the same.
    let vid = v["result_id"].as_str().unwrap();
    assert!(!d.dir.join(format!("outbox/{vid}.dcm")).exists());
    assert!(v["nodules"][0]["summary"]
        .as_str()
        .unwrap()
        .contains("alert threshold 0.50"));
}
