//! `noduled bench` through the binary: the fixture model, read from the fixture CT, and
//! the refusals.

use crate::util::{bin, reference, run_ok};
use std::process::Command;

fn coord() -> String {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference().join("cases.json")).unwrap())
            .unwrap();
    let case = &cases["ct_cases"][0];
    assert_eq!(case["name"], "lung1");
    let c: Vec<String> = case["coord_lps_mm"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap().to_string())
        .collect();
    format!("--coord={}", c.join(","))
}

#[test]
fn bench_times_every_stage_of_the_fixture_model_from_the_ct() {
    let out = run_ok(
        Command::new(bin())
            .args(["bench", "--model"])
            .arg(reference().join("model"))
            .args([
                "--nodules",
                "3",
                "--warmup",
                "1",
                "--threads",
                "2",
                "--json",
                "--ct",
            ])
            .arg(reference().join("ct/lung1.nii.gz"))
            .arg(coord()),
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["folds"], 5);
    assert_eq!(j["planes"], 9);
    assert_eq!(j["nodules"], 3);
    assert_eq!(j["threads"], 2);
    let stage = |k: &str| j["stages"][k]["median_s"].as_f64().unwrap();
    for k in ["read", "preprocess", "model", "post"] {
        assert!(stage(k) > 0.0, "stage {k} not timed: {j}");
        let p90 = j["stages"][k]["p90_s"].as_f64().unwrap();
        assert!(p90 > 0.0 && p90.is_finite());
    }
    let total = j["median_s_per_nodule"].as_f64().unwrap();
    assert!(total >= stage("model") && total > 0.0);
    assert!(j["peak_rss_mb"].as_f64().unwrap() > 1.0);
    // Five calibrated probabilities summed: finite and inside (0, 5).
    let check = j["check"].as_f64().unwrap();
    assert!(check > 0.0 && check < 5.0);
}

#[test]
fn bench_refuses_bad_arguments_in_one_line() {
    for args in [
        vec!["bench", "--random", "vit-b32", "--nodules", "0"],
        vec!["bench", "--random", "vit-b32", "--folds", "0"],
        vec!["bench", "--random", "vit-b32", "--precision", "f16"],
    ] {
        let out = Command::new(bin()).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("noduled: ") && err.trim_end().lines().count() == 1,
            "{err}"
        );
    }
}
