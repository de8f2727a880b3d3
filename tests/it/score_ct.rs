//! `noduled score` from CT through the real binary: a DICOM series and a NIfTI of the same
//! scan give the fixture's probabilities (issue 3's "done when"), and equal each other; a
//! manifest scores every nodule and writes the reference's result.csv.

use crate::util;
use std::process::Command;

fn expected(name: &str) -> Vec<f64> {
    util::expected(name).into_iter().map(f64::from).collect()
}

fn cases() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(util::reference().join("cases.json")).unwrap())
        .unwrap()
}

fn score(args: &[&str]) -> serde_json::Value {
    let out = Command::new(util::bin())
        .arg("score")
        .arg("--model")
        .arg(util::reference().join("model"))
        .args(["--dtype", "f32"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "score {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fold_probs(report: &serde_json::Value) -> Vec<f64> {
    report["nodules"][0]["folds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["prob"].as_f64().unwrap())
        .collect()
}

#[test]
fn dicom_and_nifti_give_the_fixture_probabilities() {
    let cases = cases();
    for case in cases["ct_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let c = case["coord_lps_mm"].as_array().unwrap();
        let coord = format!("{},{},{}", c[0], c[1], c[2]);
        let mut by_input = Vec::new();
        for key in ["dicom_dir", "nifti"] {
            let path = util::reference().join(case[key].as_str().unwrap());
            let report = score(&[
                "--volume",
                path.to_str().unwrap(),
                "--coord",
                &coord,
                "--nodule-id",
                name,
            ]);
            let probs = fold_probs(&report);
            assert_eq!(probs.len(), 5);
            for (k, p) in probs.iter().enumerate() {
                let want = expected(&format!("fold{k}.{name}.prob"))[0];
                assert!(
                    (p - want).abs() <= 1e-4,
                    "{name} {key} fold {k}: prob {p} vs {want}"
                );
            }
            let cal = report["nodules"][0]["score"]["calibrated"]
                .as_f64()
                .unwrap();
            let idx = cases["nodules"]
                .as_array()
                .unwrap()
                .iter()
                .position(|n| n == name)
                .unwrap();
            let want = expected("ensemble.calibrated")[idx];
            assert!(
                (cal - want).abs() <= 1e-4,
                "{name} {key}: calibrated {cal} vs {want}"
            );
            by_input.push(probs);
        }
        for (a, b) in by_input[0].iter().zip(&by_input[1]) {
            assert!((a - b).abs() <= 1e-5, "{name}: DICOM {a} vs NIfTI {b}");
        }
    }
}

#[test]
fn manifest_scores_every_nodule_and_writes_result_csv() {
    let cases = cases();
    let tmp = tempfile::tempdir().unwrap();
    let mut csv = String::from("pid,nodule_id,image_path,coordX,coordY,coordZ,malignant\n");
    for (i, case) in cases["ct_cases"].as_array().unwrap().iter().enumerate() {
        let c = case["coord_lps_mm"].as_array().unwrap();
        let path = util::reference().join(case["nifti"].as_str().unwrap());
        csv += &format!(
            "P1,{},{},{},{},{},{}\n",
            case["name"].as_str().unwrap(),
            path.display(),
            c[0],
            c[1],
            c[2],
            i % 2
        );
    }
    let manifest = tmp.path().join("manifest.csv");
    std::fs::write(&manifest, csv).unwrap();
    let result = tmp.path().join("result.csv");
    let report = score(&[
        "--manifest",
        manifest.to_str().unwrap(),
        "--csv",
        result.to_str().unwrap(),
    ]);
    let nodules = report["nodules"].as_array().unwrap();
    assert_eq!(nodules.len(), 2);
    // Both nodules belong to P1: its patient score is per fold the max, then the mean, equal to
    // the fixture's (whose P1 holds the same two nodules).
    let p1 = report["patients"][0]["calibrated"].as_f64().unwrap();
    assert!(
        (p1 - expected("patient.calibrated")[0]).abs() <= 1e-4,
        "P1 {p1}"
    );
    let text = std::fs::read_to_string(&result).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "pid,nodule_id,raw_0,raw_1,raw_2,raw_3,raw_4,ensemble,calibrated_0,calibrated_1,calibrated_2,calibrated_3,calibrated_4,calibrated_ensemble,malignant"
    );
    assert_eq!(lines.len(), 3);
    for (line, n) in lines[1..].iter().zip(nodules) {
        let cols: Vec<&str> = line.split(',').collect();
        assert_eq!(cols[1], n["nodule_id"].as_str().unwrap());
        let raw0: f64 = cols[2].parse().unwrap();
        assert_eq!(raw0, n["folds"][0]["prob"].as_f64().unwrap());
        let cal_ens: f64 = cols[13].parse().unwrap();
        assert_eq!(cal_ens, n["score"]["calibrated"].as_f64().unwrap());
    }
}

#[test]
fn crop_pt_gives_synthetic0_probabilities() {
    let crop = util::root().join("tests/fixtures/crops/synthetic0.pt");
    let report = score(&["--crop", crop.to_str().unwrap()]);
    for (k, p) in fold_probs(&report).iter().enumerate() {
        let want = expected(&format!("fold{k}.synthetic0.prob"))[0];
        assert!((p - want).abs() <= 1e-5, "fold {k}: {p} vs {want}");
    }
    assert_eq!(report["nodules"][0]["nodule_id"], "synthetic0");
}

#[test]
fn nothing_to_score_is_a_one_line_error() {
    let out = Command::new(util::bin())
        .args(["score", "--model"])
        .arg(util::reference().join("model"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to score"), "{err}");
}
