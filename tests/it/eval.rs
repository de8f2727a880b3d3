//! Evaluation metrics, bootstrap, beta calibration fitting, semantic features and the
//! `noduled eval` CLI. Expected numbers come from scikit-learn 1.9.1, betacal 1.1.0 and
//! numpy 2.4 on the inputs in tests/fixtures/eval (made by scripts/make_eval_fixtures.py).

use std::collections::BTreeMap;
use std::process::Command;

use noduled::calibration;
use noduled::eval::{self, bootstrap, metrics, EvalOptions, EvalRecord};
use noduled::semantics::{self, Semantics, FEATURES};
use noduled::table::Table;
use serde_json::Value;

use crate::util::{bin, root, run_ok};

fn expected() -> Value {
    let text = std::fs::read_to_string(root().join("tests/fixtures/eval/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol, "{what}: {a} vs {b} (tolerance {tol})");
}

fn fixture_records() -> Vec<EvalRecord> {
    eval::read_scores_csv(&root().join("tests/fixtures/eval/scores.csv")).unwrap()
}

fn labels_scores(records: &[EvalRecord]) -> (Vec<bool>, Vec<f64>) {
    (
        records.iter().map(|r| r.label).collect(),
        records.iter().map(|r| r.score).collect(),
    )
}

#[test]
fn binary_metrics_equal_sklearn() {
    let exp = &expected()["binary"];
    let (y, s) = labels_scores(&fixture_records());
    assert_eq!(y.len(), exp["n"].as_u64().unwrap() as usize);
    close(
        metrics::roc_auc(&y, &s).unwrap(),
        exp["auroc"].as_f64().unwrap(),
        1e-12,
        "AUROC",
    );
    close(
        metrics::average_precision(&y, &s).unwrap(),
        exp["average_precision"].as_f64().unwrap(),
        1e-12,
        "AP",
    );
    close(
        metrics::brier(&y, &s).unwrap(),
        exp["brier"].as_f64().unwrap(),
        1e-12,
        "Brier",
    );

    let roc = metrics::roc_curve(&y, &s).unwrap();
    let (fpr, tpr, thr) = (
        floats(&exp["roc"]["fpr"]),
        floats(&exp["roc"]["tpr"]),
        floats(&exp["roc"]["thresholds"]),
    );
    assert_eq!(roc.len(), thr.len());
    for (k, p) in roc.iter().enumerate() {
        close(p.threshold, thr[k], 0.0, "ROC threshold");
        close(p.fpr, fpr[k], 1e-12, "FPR");
        close(p.tpr, tpr[k], 1e-12, "TPR");
    }

    // sklearn lists PR points by ascending threshold and appends (recall 0, precision 1).
    let pr = metrics::pr_curve(&y, &s).unwrap();
    let (prec, rec, pthr) = (
        floats(&exp["pr"]["precision"]),
        floats(&exp["pr"]["recall"]),
        floats(&exp["pr"]["thresholds"]),
    );
    assert_eq!(pr.len(), pthr.len());
    for (k, p) in pr.iter().rev().enumerate() {
        close(p.threshold, pthr[k], 0.0, "PR threshold");
        close(p.precision, prec[k], 1e-12, "precision");
        close(p.recall, rec[k], 1e-12, "recall");
    }

    let points = metrics::operating_points(&y, &s, &eval::TARGET_RECALLS).unwrap();
    for (p, e) in points
        .iter()
        .zip(exp["operating_points"].as_array().unwrap())
    {
        close(
            p.target_recall,
            e["target_recall"].as_f64().unwrap(),
            0.0,
            "target",
        );
        close(
            p.threshold,
            e["threshold"].as_f64().unwrap(),
            0.0,
            "operating threshold",
        );
        close(
            p.recall,
            e["recall"].as_f64().unwrap(),
            1e-12,
            "operating recall",
        );
        close(p.fpr, e["fpr"].as_f64().unwrap(), 1e-12, "operating FPR");
        close(
            p.precision,
            e["precision"].as_f64().unwrap(),
            1e-12,
            "operating precision",
        );
    }

    let bins = metrics::reliability(&y, &s, 10).unwrap();
    let counts: Vec<usize> = bins.iter().map(|b| b.count).collect();
    let exp_counts: Vec<usize> = exp["reliability"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(counts, exp_counts);
    let filled: Vec<_> = bins.iter().filter(|b| b.count > 0).collect();
    let (truth, pred) = (
        floats(&exp["reliability"]["prob_true"]),
        floats(&exp["reliability"]["prob_pred"]),
    );
    assert_eq!(filled.len(), truth.len());
    for (k, b) in filled.iter().enumerate() {
        close(b.observed_rate.unwrap(), truth[k], 1e-12, "observed rate");
        close(b.mean_predicted.unwrap(), pred[k], 1e-12, "mean predicted");
    }
}

#[test]
fn tied_scores_across_classes_equal_sklearn() {
    let exp = &expected()["tiny"];
    let y: Vec<bool> = exp["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64() == Some(1))
        .collect();
    let s = floats(&exp["scores"]);
    close(
        metrics::roc_auc(&y, &s).unwrap(),
        exp["auroc"].as_f64().unwrap(),
        1e-12,
        "AUROC with ties",
    );
    close(
        metrics::average_precision(&y, &s).unwrap(),
        exp["average_precision"].as_f64().unwrap(),
        1e-12,
        "AP with ties",
    );
    close(
        metrics::brier(&y, &s).unwrap(),
        exp["brier"].as_f64().unwrap(),
        1e-12,
        "Brier",
    );
}

#[test]
fn weighted_one_vs_rest_auroc_equals_sklearn() {
    let exp = &expected()["multiclass"];
    let truth: Vec<usize> = exp["truth"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let probs: Vec<Vec<f64>> = exp["probs"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    close(
        metrics::ovr_weighted_auroc(&truth, &probs).unwrap(),
        exp["auroc_ovr_weighted"].as_f64().unwrap(),
        1e-12,
        "weighted OvR",
    );
    for (c, want) in floats(&exp["per_class_auroc"]).into_iter().enumerate() {
        let y: Vec<bool> = truth.iter().map(|&t| t == c).collect();
        let s: Vec<f64> = probs.iter().map(|p| p[c]).collect();
        close(
            metrics::roc_auc(&y, &s).unwrap(),
            want,
            1e-12,
            "per-class AUROC",
        );
    }
    // A binary feature's weighted OvR AUROC is its plain AUROC.
    let y = [0usize, 1, 0, 1, 1];
    let p: Vec<Vec<f64>> = [0.9, 0.4, 0.35, 0.2, 0.6]
        .iter()
        .map(|&a| vec![a, 1.0 - a])
        .collect();
    let plain = metrics::roc_auc(
        &[true, false, true, false, false],
        &[0.9, 0.4, 0.35, 0.2, 0.6],
    )
    .unwrap();
    close(
        metrics::ovr_weighted_auroc(&y, &p).unwrap(),
        plain,
        1e-12,
        "binary OvR",
    );
    assert!(metrics::ovr_weighted_auroc(&[1, 1], &[vec![0.5, 0.5], vec![0.2, 0.8]]).is_err());
    assert!(metrics::ovr_weighted_auroc(&[0, 3], &[vec![0.5, 0.5], vec![0.2, 0.8]]).is_err());
}

#[test]
fn one_class_input_is_a_clear_error() {
    let records: Vec<EvalRecord> = fixture_records().into_iter().filter(|r| !r.label).collect();
    let err = eval::evaluate(&records, &EvalOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "AUROC is undefined with one class: 0 positive of {} samples",
            records.len()
        )
    );
}

#[test]
fn percentile_equals_numpy() {
    let exp = &expected()["percentile"];
    let values = floats(&exp["values"]);
    for (q, want) in floats(&exp["q"]).into_iter().zip(floats(&exp["expected"])) {
        close(
            metrics::percentile(&mut values.clone(), q).unwrap(),
            want,
            1e-12,
            "percentile",
        );
    }
}

#[test]
fn bootstrap_is_deterministic_per_seed_and_agrees_with_numpy() {
    let records = fixture_records();
    let options = EvalOptions {
        resamples: 10_000,
        seed: 42,
        level: 0.95,
    };
    let a = eval::evaluate(&records, &options).unwrap();
    let b = eval::evaluate(&records, &options).unwrap();
    assert_eq!(a, b);
    let c = eval::evaluate(
        &records,
        &EvalOptions {
            seed: 43,
            ..options
        },
    )
    .unwrap();
    assert_ne!(a.auroc.ci_lower, c.auroc.ci_lower);
    assert_eq!(a.bootstrap.unit, "patient");
    assert_eq!(a.patients, Some(104));
    // Another generator (numpy's) gives another interval; 10,000 resamples agree to ~0.01.
    let numpy = &expected()["binary"]["bootstrap_patients_numpy"];
    let (auc, ap) = (floats(&numpy["auroc"]), floats(&numpy["average_precision"]));
    close(a.auroc.ci_lower.unwrap(), auc[0], 0.012, "AUROC CI lower");
    close(a.auroc.ci_upper.unwrap(), auc[1], 0.012, "AUROC CI upper");
    close(
        a.average_precision.ci_lower.unwrap(),
        ap[0],
        0.015,
        "AP CI lower",
    );
    close(
        a.average_precision.ci_upper.unwrap(),
        ap[1],
        0.015,
        "AP CI upper",
    );
}

#[test]
fn bootstrap_resamples_rows_without_patients_and_counts_one_class_draws() {
    // 1 positive in 12 rows: a row resample misses it with probability (11/12)^12 = 0.35.
    let y: Vec<bool> = (0..12).map(|i| i == 3).collect();
    let s: Vec<f64> = (0..12).map(|i| i as f64 / 12.0).collect();
    let r = bootstrap::bootstrap(&y, &s, None, 2000, 5, 0.95);
    assert_eq!(r.unit, "row");
    let rate = r.skipped_one_class as f64 / 2000.0;
    assert!(
        (rate - (11f64 / 12.0).powi(12)).abs() < 0.04,
        "skipped fraction {rate}"
    );
    let all_one = bootstrap::bootstrap(&[true, true], &[0.1, 0.2], None, 50, 5, 0.95);
    assert_eq!((all_one.skipped_one_class, all_one.auroc), (50, None));
}

#[test]
fn beta_calibration_fit_matches_betacal() {
    for (k, case) in expected()["beta_calibration"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let s = floats(&case["scores"]);
        let y: Vec<bool> = case["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64() == Some(1))
            .collect();
        let cal = calibration::fit(&s, &y).unwrap();
        let (a, b, c) = (
            case["a"].as_f64().unwrap(),
            case["b"].as_f64().unwrap(),
            case["c"].as_f64().unwrap(),
        );
        // The refit rule zeroes exactly the coefficient betacal zeroes.
        assert_eq!(
            (cal.a == 0.0, cal.b == 0.0),
            (a == 0.0, b == 0.0),
            "case {k}: a,b = {},{}",
            cal.a,
            cal.b
        );
        // The optimum itself (scikit-learn run to convergence with the same rule).
        let exact = &case["exact"];
        close(
            cal.a,
            exact["a"].as_f64().unwrap(),
            1e-6,
            &format!("case {k} exact a"),
        );
        close(
            cal.b,
            exact["b"].as_f64().unwrap(),
            1e-6,
            &format!("case {k} exact b"),
        );
        close(
            cal.c,
            exact["c"].as_f64().unwrap(),
            1e-6,
            &format!("case {k} exact c"),
        );
        // betacal stops its lbfgs at tol 1e-4, about 1e-2 short of the optimum.
        close(cal.a, a, 0.02, &format!("case {k} a"));
        close(cal.b, b, 0.02, &format!("case {k} b"));
        close(cal.c, c, 0.02, &format!("case {k} c"));
        for (g, want) in floats(&case["grid"])
            .into_iter()
            .zip(floats(&case["predicted"]))
        {
            close(
                cal.apply(g),
                want,
                2e-3,
                &format!("case {k} calibrated({g})"),
            );
        }
    }
    let err = calibration::fit(&[0.2, 0.3], &[true, true])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "beta calibration fit needs both classes: 2 positive of 2 validation predictions"
    );
}

#[test]
fn lidc_harmonisation_counts_match_python() {
    // Counts printed by scripts/lidc_harmonise_counts.py (standard-library Python) on the same file.
    let lesions = semantics::harmonise_lidc(
        &root().join("tests/fixtures/lidc/lidc_annotations_clustered.csv"),
    )
    .unwrap();
    assert_eq!(lesions.len(), 2651);
    assert_eq!(lesions.iter().filter(|l| l.n_readers >= 3).count(), 1392);
    let count = |feature: usize, class: usize| {
        lesions
            .iter()
            .filter(|l| l.semantics.classes[feature] == Some(class))
            .count()
    };
    let key = |k: &str| semantics::feature(k).unwrap().0;
    assert_eq!(count(semantics::CONSISTENCY, 1), 1973, "Solid");
    assert_eq!(count(semantics::CONSISTENCY, 4), 457, "Part-solid");
    assert_eq!(count(semantics::CONSISTENCY, 2), 221, "Pure ground glass");
    assert_eq!(count(semantics::SHAPE, 3), 1796, "Round");
    assert_eq!(count(semantics::SHAPE, 1), 855, "Ovoid");
    assert_eq!(count(semantics::CONSPICUITY, 0), 2245, "Well marginated");
    assert_eq!(count(semantics::CONSPICUITY, 1), 406, "Poorly marginated");
    assert_eq!(count(semantics::MARGIN, 1), 321, "Lobulated");
    assert_eq!(
        lesions
            .iter()
            .filter(|l| l.semantics.additional_margin == Some(2))
            .count(),
        267,
        "Spiculated"
    );
    assert_eq!(count(key("cyst_like_spaces"), 0), 4);
    assert_eq!(count(key("eccentric_calcification"), 0), 13);
    // Sampler weights: the last line of the same script.
    let samples: Vec<Semantics> = lesions.iter().map(|l| l.semantics.clone()).collect();
    let w = semantics::semantic_sampling_weights(&samples);
    close(w.iter().sum(), 296.12059056734006, 1e-9, "sum of weights");
    close(w[0], 1.1494608630166375e-07, 1e-15, "weight 0");
    close(w[1], 0.19657029538471113, 1e-12, "weight 1");
    let argmax = (0..w.len()).max_by(|&a, &b| w[a].total_cmp(&w[b])).unwrap();
    assert_eq!(argmax, 22);
    assert_eq!(w.iter().filter(|&&x| x < 1e-5).count(), 1382);
    // Features LIDC does not rate stay missing, not absent.
    assert!(lesions
        .iter()
        .all(|l| l.semantics.classes[key("cavitation")].is_none()));
}

#[test]
fn manifest_semantics_and_reports() {
    let path = root().join("tests/fixtures/eval/semantic_manifest.csv");
    let table = Table::read(&path).unwrap();
    let first = Semantics::from_row(&table, 0).unwrap();
    assert_eq!(first.class_word(semantics::MARGIN), Some("spiculated"));
    assert_eq!(first.additional_margin, Some(1));
    assert_eq!(first.class_word(semantics::SHAPE), Some("irregular"));
    let report = semantics::generate_report(&first);
    assert_eq!(
        report.impression,
        "A 19 mm, part-solid, irregular nodule, poorly marginated, with spiculated and lobulated margins. \
         The nodule demonstrates cavitation, pleural attachment and paracicatricial emphysema. \
         The level of suspicion for lung cancer is high."
    );
    assert!(report.findings.contains(&"No necrosis.".to_string()));
    assert!(report
        .findings
        .contains(&"There is cavitation.".to_string()));
    assert_eq!(report, semantics::generate_report(&first), "deterministic");
    let text = report.text();
    assert!(
        text.contains("Impression:\nA 19 mm, part solid, irregular nodule") && !text.contains('-'),
        "{text}"
    );
    // The CSV round trip keeps every value.
    assert_eq!(
        first.csv_fields()[4..21],
        table.rows[0][11..28]
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()[..]
    );

    // Missing values are skipped, not reported absent.
    let second = Semantics::from_row(&table, 1).unwrap();
    let report = semantics::generate_report(&second);
    assert_eq!(
        report.impression,
        "A 5 mm, solid, ovoid nodule, well marginated, with smooth margin."
    );
    assert!(
        !report.findings.iter().any(|f| f.starts_with("No ")),
        "{:?}",
        report.findings
    );

    let bad = Table::parse(&path, "nodule_shape\nTriangular\n").unwrap();
    let err = Semantics::from_row(&bad, 0).unwrap_err().to_string();
    assert!(err.ends_with("line 2, column `nodule_shape`: `Triangular` is not one of Complex/Irregular, Ovoid, Polygonal, Round"), "{err}");
    assert_eq!(FEATURES.len(), 16);
}

#[test]
fn zero_shot_prompts_equal_the_reference_fixtures() {
    let text = std::fs::read_to_string(crate::util::reference().join("cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    let table = cases["zero_shot"].as_object().unwrap();
    assert_eq!(table.len(), FEATURES.len());
    for f in &FEATURES {
        let entry = &table[f.key];
        let classes: Vec<&str> = entry["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let prompts: Vec<&str> = entry["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(classes, f.classes, "{}", f.key);
        assert_eq!(f.prompts(), prompts, "{}", f.key);
    }
}

#[test]
fn eval_cli_writes_json_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval");
    let run = run_ok(
        Command::new(bin())
            .args(["eval", "--scores"])
            .arg(root().join("tests/fixtures/eval/scores.csv"))
            .arg("--out")
            .arg(&out)
            .args(["--seed", "3", "--resamples", "500"]),
    );
    let printed: Value = serde_json::from_slice(&run.stdout).unwrap();
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(printed, written);
    close(
        written["auroc"]["value"].as_f64().unwrap(),
        expected()["binary"]["auroc"].as_f64().unwrap(),
        1e-12,
        "CLI AUROC",
    );
    assert_eq!(written["bootstrap"]["resamples"], 500);
    assert_eq!(written["operating_points"].as_array().unwrap().len(), 4);
    for name in ["roc.png", "pr.png", "reliability.png"] {
        let file = std::fs::File::open(out.join(name)).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap();
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), (640, 640));
        let inked = pixels
            .chunks(3)
            .filter(|p| p.iter().any(|&v| v < 128))
            .count();
        assert!(inked > 2000, "{name}: only {inked} dark pixels");
    }
}

#[test]
fn eval_cli_rejects_one_class_and_bad_rows_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let one_class = dir.path().join("one.csv");
    std::fs::write(&one_class, "label,score\n0,0.2\n0,0.7\n").unwrap();
    let bad_label = dir.path().join("bad.csv");
    std::fs::write(&bad_label, "label,score\n0,0.2\nyes,0.7\n").unwrap();
    for (path, message) in [
        (
            &one_class,
            "AUROC is undefined with one class: 0 positive of 2 samples",
        ),
        (
            &bad_label,
            "line 3, column `label`: `yes` is not a label (0 or 1)",
        ),
    ] {
        let run = Command::new(bin())
            .args(["eval", "--scores"])
            .arg(path)
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("noduled: ") && stderr.contains(message),
            "{stderr}"
        );
    }
}

#[test]
fn zero_shot_columns_are_scored_per_feature() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zs.csv");
    let mut text = String::from("label,score,cavitation,zs_cavitation_0,zs_cavitation_1\n");
    let rows = [
        (1, 0.8, "Present", 0.7),
        (0, 0.3, "Absent", 0.4),
        (1, 0.6, "Absent", 0.2),
        (0, 0.1, "Present", 0.9),
        (0, 0.2, "", 0.5),
    ];
    for (y, s, truth, p) in rows {
        text.push_str(&format!("{y},{s},{truth},{p},{}\n", 1.0 - p));
    }
    std::fs::write(&path, text).unwrap();
    let records = eval::read_scores_csv(&path).unwrap();
    let report = eval::evaluate(
        &records,
        &EvalOptions {
            resamples: 0,
            ..EvalOptions::default()
        },
    )
    .unwrap();
    let zs = &report.zero_shot["cavitation"];
    assert_eq!((zs.n, zs.class_counts.clone()), (4, vec![2, 2]));
    let plain = metrics::roc_auc(&[true, false, false, true], &[0.7, 0.4, 0.2, 0.9]).unwrap();
    close(zs.auroc.unwrap(), plain, 1e-12, "zero-shot AUROC");
    let _: BTreeMap<_, _> = report.zero_shot;
}
