//! The nodule model against the reference fixtures, stage by stage, at the README's
//! tolerances; checkpoint layouts (merged, unmerged, other fold counts); load errors; and the
//! `score` CLI.

use crate::util::{bin, reference, Reference};
use candle_core::{DType, Device, Tensor};
use noduled::engine::{CheckpointScorer, Scorer};
use noduled::model::config::LoraLayout;
use noduled::model::tokenizer::PromptTokenizer;
use noduled::model::{ModelError, NoduleModel};
use noduled::nodule::Planes01;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const REL_L2: f64 = 1e-4;
const ABS_P: f64 = 1e-5;

fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

fn max_abs(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Checks every per-fold stage of `model` (fold i) against reference fold `ref_folds[i]`.
fn check_stages(model: &NoduleModel, r: &Reference, ref_folds: &[usize]) {
    assert_eq!(model.n_folds(), ref_folds.len());
    let nodules = r.nodules();
    let planes: Vec<Planes01> = nodules.iter().map(|n| r.planes(n)).collect();
    let outputs = model.forward(&planes.iter().collect::<Vec<_>>()).unwrap();
    let features = r.features(model);
    let mut worst = [0f64; 6];
    for (i, &k) in ref_folds.iter().enumerate() {
        let text = model
            .text_embeddings(i)
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let e = rel_l2(&text, &r.vec(&format!("fold{k}.text_embeds")));
        assert!(e <= REL_L2, "fold{k}.text_embeds rel L2 {e:e}");
        let ls = (model.logit_scale(i) - r.vec(&format!("fold{k}.logit_scale"))[0]).abs();
        assert!(ls <= 1e-6, "fold{k}.logit_scale off by {ls:e}");
        for (n, nodule) in nodules.iter().enumerate() {
            let f = &outputs[n].folds[i];
            let name = |s: &str| format!("fold{k}.{nodule}.{s}");
            let checks = [
                (
                    "slice_features",
                    rel_l2(&f64s(&f.slice_features), &r.vec(&name("slice_features"))),
                    REL_L2,
                ),
                (
                    "image_embed",
                    rel_l2(&f64s(&f.image_embed), &r.vec(&name("image_embed"))),
                    REL_L2,
                ),
                (
                    "mil_attention",
                    max_abs(&f.attention, &r.vec(&name("mil_attention"))),
                    ABS_P,
                ),
                ("prob", (f.prob - r.vec(&name("prob"))[0]).abs(), ABS_P),
                (
                    "calibrated",
                    (f.calibrated - r.vec(&name("calibrated"))[0]).abs(),
                    ABS_P,
                ),
            ];
            for (j, (stage, err, tol)) in checks.into_iter().enumerate() {
                assert!(err <= tol, "{}: error {err:e} > {tol:e}", name(stage));
                worst[j] = worst[j].max(err);
            }
            for (fi, (feature, classes)) in features.iter().enumerate() {
                let want = r.vec(&format!("fold{k}.zeroshot.{feature}"));
                let want = &want[n * classes.len()..(n + 1) * classes.len()];
                let err = max_abs(&f.zero_shot[fi], want);
                assert!(
                    err <= ABS_P,
                    "fold{k}.zeroshot.{feature}[{nodule}]: error {err:e}"
                );
                worst[5] = worst[5].max(err);
            }
        }
    }
    eprintln!("worst errors (features, embed, attention, prob, calibrated, zero-shot): {worst:?}");
}

/// Checks the engine's ensemble, descriptors and patient scores against the reference
/// per-fold values of `ref_folds`.
fn check_report(scorer: &CheckpointScorer, r: &Reference, ref_folds: &[usize]) {
    let report = scorer.score(&r.inputs()).unwrap();
    let nodules = r.nodules();
    let nf = ref_folds.len() as f64;
    let fold_mean = |f: &dyn Fn(usize) -> f64| ref_folds.iter().map(|&k| f(k)).sum::<f64>() / nf;
    for (n, (nodule, got)) in nodules.iter().zip(&report.nodules).enumerate() {
        assert_eq!(&got.nodule_id, nodule);
        let raw = fold_mean(&|k| r.vec(&format!("fold{k}.{nodule}.prob"))[0]);
        let cal = fold_mean(&|k| r.vec(&format!("fold{k}.{nodule}.calibrated"))[0]);
        assert!((got.score.raw - raw).abs() <= ABS_P, "{nodule} raw");
        assert!(
            (got.score.calibrated - cal).abs() <= ABS_P,
            "{nodule} calibrated"
        );
        if ref_folds.len() == 5 {
            assert!(
                (got.score.raw - r.vec("ensemble.raw")[n]).abs() <= ABS_P,
                "ensemble.raw[{nodule}]"
            );
            assert!(
                (got.score.calibrated - r.vec("ensemble.calibrated")[n]).abs() <= ABS_P,
                "ensemble.calibrated[{nodule}]"
            );
        }
        for (feature, classes) in r.features(scorer.model()) {
            for (c, class) in classes.iter().enumerate() {
                let want = fold_mean(&|k| {
                    r.vec(&format!("fold{k}.zeroshot.{feature}"))[n * classes.len() + c]
                });
                let p = got.descriptors[&feature][class];
                assert!(
                    (p - want).abs() <= ABS_P,
                    "{nodule} {feature}/{class}: {p} vs {want}"
                );
            }
        }
    }
    let order: Vec<&str> = r.cases["patient_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(report.patients.len(), order.len());
    for (i, pid) in order.iter().enumerate() {
        let got = report
            .patients
            .iter()
            .find(|p| p.patient_id == *pid)
            .unwrap();
        let members: Vec<&String> = nodules
            .iter()
            .filter(|n| r.cases["patients"][n.as_str()] == *pid)
            .collect();
        let want = fold_mean(&|k| {
            members
                .iter()
                .map(|n| r.vec(&format!("fold{k}.{n}.calibrated"))[0])
                .fold(f64::NEG_INFINITY, f64::max)
        });
        assert!((got.calibrated - want).abs() <= ABS_P, "patient {pid}");
        if ref_folds.len() == 5 {
            assert!(
                (got.calibrated - r.vec("patient.calibrated")[i]).abs() <= ABS_P,
                "patient.calibrated[{pid}]"
            );
        }
    }
}

#[test]
fn tokenizer_ids_are_exact() {
    let r = Reference::load();
    let texts = r.cases["tokenizer_cases"].as_array().unwrap();
    let want = r.tensors["tokenizer.ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    assert_eq!(texts.len(), want.len());
    let tok = PromptTokenizer::new(77);
    for (text, want) in texts.iter().zip(want) {
        let got: Vec<i64> = tok
            .encode(text.as_str().unwrap())
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(got, want, "{text}");
    }
}

#[test]
fn released_layout_matches_every_stage() {
    let r = Reference::load();
    let scorer = CheckpointScorer::load(&reference().join("model")).unwrap();
    assert_eq!(scorer.model().layout(), LoraLayout::Merged);
    check_stages(scorer.model(), &r, &[0, 1, 2, 3, 4]);
    check_report(&scorer, &r, &[0, 1, 2, 3, 4]);
}

/// Edits fold i's state dict.
type Edit<'a> = &'a dyn Fn(usize, &mut HashMap<String, Tensor>);

/// Reads a fixture fold's state dict.
fn fixture_fold(k: usize) -> HashMap<String, Tensor> {
    let path = reference().join(format!("model/fold_{k}/best_both.pt"));
    candle_core::pickle::read_all_with_key(path, Some("model"))
        .unwrap()
        .into_iter()
        .collect()
}

/// Writes a checkpoint folder: fold i from fixture fold `ref_folds[i]`, edited by `edit`,
/// as model.safetensors (or a copy of best_both.pt when `edit` is None).
fn write_set(dir: &Path, ref_folds: &[usize], edit: Option<Edit>) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(
        reference().join("model/config.json"),
        model.join("config.json"),
    )
    .unwrap();
    for (i, &k) in ref_folds.iter().enumerate() {
        let src = reference().join(format!("model/fold_{k}"));
        let dst = model.join(format!("fold_{i}"));
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::copy(src.join("calibration.json"), dst.join("calibration.json")).unwrap();
        match edit {
            None => {
                std::fs::copy(src.join("best_both.pt"), dst.join("best_both.pt")).unwrap();
            }
            Some(edit) => {
                let mut sd = fixture_fold(k);
                edit(i, &mut sd);
                candle_core::safetensors::save(&sd, dst.join("model.safetensors")).unwrap();
            }
        }
    }
    model
}

/// Replaces every merged q/k/v weight by W0 = W - s B A (computed in f64).
fn unmerge(sd: &mut HashMap<String, Tensor>) {
    let scale = 1.0 / 2f64.sqrt(); // fixture config: alpha 1, r 2
    let keys: Vec<String> = sd
        .keys()
        .filter(|k| {
            [
                "attn.q_proj.weight",
                "attn.k_proj.weight",
                "attn.v_proj.weight",
            ]
            .iter()
            .any(|s| k.ends_with(s))
        })
        .cloned()
        .collect();
    assert!(!keys.is_empty());
    for key in keys {
        let prefix = key.strip_suffix(".weight").unwrap();
        let a = sd[&format!("{prefix}.w_lora_A")]
            .to_dtype(DType::F64)
            .unwrap();
        let b = sd[&format!("{prefix}.w_lora_B")]
            .to_dtype(DType::F64)
            .unwrap();
        let w = sd[&key].to_dtype(DType::F64).unwrap();
        let w0 = (w - (b.matmul(&a).unwrap() * scale).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        sd.insert(key, w0);
    }
}

#[test]
fn unmerged_layout_gives_the_same_numbers() {
    let r = Reference::load();
    let tmp = tempfile::tempdir().unwrap();
    let model = write_set(tmp.path(), &[0, 1, 2, 3, 4], Some(&|_, sd| unmerge(sd)));
    let scorer = CheckpointScorer::load(&model).unwrap();
    assert_eq!(scorer.model().layout(), LoraLayout::Unmerged);
    check_stages(scorer.model(), &r, &[0, 1, 2, 3, 4]);
    check_report(&scorer, &r, &[0, 1, 2, 3, 4]);
}

#[test]
fn three_folds_work() {
    let r = Reference::load();
    let tmp = tempfile::tempdir().unwrap();
    let model = write_set(tmp.path(), &[1, 3, 4], None);
    let scorer = CheckpointScorer::load(&model).unwrap();
    assert_eq!(scorer.model().layout(), LoraLayout::Merged);
    check_stages(scorer.model(), &r, &[1, 3, 4]);
    check_report(&scorer, &r, &[1, 3, 4]);
}

#[test]
fn one_fold_follows_the_configured_layout() {
    let r = Reference::load();
    // Merged by default.
    let tmp = tempfile::tempdir().unwrap();
    let model = write_set(tmp.path(), &[2], None);
    let m = NoduleModel::load(&model).unwrap();
    assert_eq!(m.layout(), LoraLayout::Merged);
    check_stages(&m, &r, &[2]);
    // Unmerged when config.json says so.
    let tmp = tempfile::tempdir().unwrap();
    let model = write_set(tmp.path(), &[2], Some(&|_, sd| unmerge(sd)));
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap();
    let cfg = cfg.trim_end().strip_suffix('}').unwrap().to_string()
        + ",\n  \"lora_layout\": \"unmerged\"\n}\n";
    std::fs::write(model.join("config.json"), cfg).unwrap();
    let m = NoduleModel::load(&model).unwrap();
    assert_eq!(m.layout(), LoraLayout::Unmerged);
    check_stages(&m, &r, &[2]);
}

fn load_err(model: &Path) -> String {
    match NoduleModel::load(model) {
        Ok(_) => panic!("{} loaded", model.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "one line: {msg}");
            msg
        }
    }
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "transformer.resblocks.1.attn.v_proj.w_lora_B";
    let model = write_set(
        tmp.path(),
        &[0, 1],
        Some(&|i, sd| {
            if i == 1 {
                sd.remove(key);
            }
        }),
    );
    let msg = load_err(&model);
    assert!(
        msg.contains(key) && msg.contains("fold_1") && msg.contains("missing"),
        "{msg}"
    );
    let e = NoduleModel::load(&model).err().unwrap();
    assert!(matches!(e, ModelError::Missing { .. }), "{e:?}");
}

#[test]
fn misshapen_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "image_projection.attention.0.weight";
    let model = write_set(
        tmp.path(),
        &[0, 1],
        Some(&|i, sd| {
            if i == 0 {
                let t = sd[key].t().unwrap().contiguous().unwrap();
                sd.insert(key.to_string(), t);
            }
        }),
    );
    let msg = load_err(&model);
    assert!(
        msg.contains(key) && msg.contains("fold_0") && msg.contains("[256, 128]"),
        "{msg}"
    );
}

#[test]
fn disagreeing_bases_are_refused() {
    // A frozen tensor that differs in one fold.
    let tmp = tempfile::tempdir().unwrap();
    let key = "vision_model.transformer.resblocks.0.mlp.c_fc.weight";
    let model = write_set(
        tmp.path(),
        &[0, 1, 2],
        Some(&|i, sd| {
            if i == 2 {
                let t = (&sd[key] * 1.001).unwrap();
                sd.insert(key.to_string(), t);
            }
        }),
    );
    let msg = load_err(&model);
    assert!(msg.contains(key) && msg.contains("fold_2"), "{msg}");
    // A q/k/v weight that is neither the shared W0 nor W0 + s B A.
    let tmp = tempfile::tempdir().unwrap();
    let key = "transformer.resblocks.0.attn.k_proj.weight";
    let model = write_set(
        tmp.path(),
        &[0, 1, 2],
        Some(&|i, sd| {
            if i == 1 {
                let t = (&sd[key] + 0.01).unwrap();
                sd.insert(key.to_string(), t);
            }
        }),
    );
    let msg = load_err(&model);
    assert!(msg.contains(key) && msg.contains("fold_1"), "{msg}");
}

/// Writes `{nodule}.planes01` of the reference as a planes file (tensor `planes01`).

/// Runs `noduled score --model MODEL --planes PLANES EXTRA...`.
fn run_score(model: &Path, planes: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .args(["score", "--model"])
        .arg(model)
        .arg("--planes")
        .arg(planes)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn cli_prints_the_score_json() {
    let r = Reference::load();
    let tmp = tempfile::tempdir().unwrap();
    let nodule = "lung2";
    let planes_file = tmp.path().join("lung2.safetensors");
    r.write_planes(nodule, &planes_file);
    let extra = [
        "--patient-id",
        "P1",
        "--nodule-id",
        nodule,
        "--dtype",
        "f32",
    ];
    let out = run_score(&reference().join("model"), &planes_file, &extra);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["model"]["id"], "model");
    assert_eq!(doc["model"]["precision"], "f32");
    let backend = doc["model"]["backend"].as_str().unwrap();
    assert!(backend.starts_with("cpu f32 ("), "{backend}");
    let n = &doc["nodules"][0];
    assert_eq!(n["patient_id"], "P1");
    assert_eq!(n["nodule_id"], nodule);
    let idx = r.nodules().iter().position(|x| x == nodule).unwrap();
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{v} is no number"));
    let folds = n["folds"].as_array().unwrap();
    assert_eq!(folds.len(), 5);
    for (k, f) in folds.iter().enumerate() {
        let name = |s: &str| format!("fold{k}.{nodule}.{s}");
        assert!((num(&f["prob"]) - r.vec(&name("prob"))[0]).abs() <= ABS_P);
        assert!((num(&f["calibrated"]) - r.vec(&name("calibrated"))[0]).abs() <= ABS_P);
        let att: Vec<f64> = f["attention"].as_array().unwrap().iter().map(num).collect();
        assert!(max_abs(&att, &r.vec(&name("mil_attention"))) <= ABS_P);
    }
    assert!((num(&n["score"]["raw"]) - r.vec("ensemble.raw")[idx]).abs() <= ABS_P);
    let cal = r.vec("ensemble.calibrated")[idx];
    assert!((num(&n["score"]["calibrated"]) - cal).abs() <= ABS_P);
    let descriptors = n["descriptors"].as_object().unwrap();
    let features = r.cases["zero_shot"].as_object().unwrap();
    assert_eq!(descriptors.len(), features.len());
    for feature in features.keys() {
        let classes = r.classes(feature);
        assert_eq!(
            descriptors[feature].as_object().unwrap().len(),
            classes.len()
        );
        for (c, class) in classes.iter().enumerate() {
            let want = (0..5)
                .map(|k| r.vec(&format!("fold{k}.zeroshot.{feature}"))[idx * classes.len() + c])
                .sum::<f64>()
                / 5.0;
            let got = num(&descriptors[feature][class]);
            assert!(
                (got - want).abs() <= ABS_P,
                "{feature}/{class}: {got} vs {want}"
            );
        }
    }
    // One nodule: the patient's score is its calibrated fold mean.
    assert_eq!(doc["patients"][0]["patient_id"], "P1");
    assert!((num(&doc["patients"][0]["calibrated"]) - cal).abs() <= ABS_P);
}

/// `--dtype bf16` (bf16 GEMMs, f32 accumulation; emulated on CPUs without AVX512_BF16) stays
/// within 0.01 of the reference on every fixture nodule: each fold's probability, calibrated
/// probability and MIL attention, the ensemble (raw and calibrated) and every descriptor.
#[test]
fn cli_bf16_is_within_0_01_of_the_reference_on_every_fixture_nodule() {
    let r = Reference::load();
    let tmp = tempfile::tempdir().unwrap();
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{v} is no number"));
    let mut worst = 0f64;
    let mut worst_at = String::new();
    let mut check = |got: f64, want: f64, what: String| {
        let d = (got - want).abs();
        if d > worst {
            worst = d;
            worst_at = what;
        }
    };
    let mut exact = 0f64;
    for (idx, nodule) in r.nodules().iter().enumerate() {
        let planes = tmp.path().join(format!("{nodule}.safetensors"));
        r.write_planes(nodule, &planes);
        let out = run_score(&reference().join("model"), &planes, &["--dtype", "bf16"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let backend = doc["model"]["backend"].as_str().unwrap();
        assert!(backend.starts_with("cpu bf16 ("), "{backend}");
        let n = &doc["nodules"][0];
        for (k, f) in n["folds"].as_array().unwrap().iter().enumerate() {
            let name = |s: &str| format!("fold{k}.{nodule}.{s}");
            let want = r.vec(&name("prob"))[0];
            exact = exact.max((num(&f["prob"]) - want).abs());
            check(num(&f["prob"]), want, name("prob"));
            check(
                num(&f["calibrated"]),
                r.vec(&name("calibrated"))[0],
                name("calibrated"),
            );
            let att = r.vec(&name("mil_attention"));
            for (a, b) in f["attention"].as_array().unwrap().iter().zip(&att) {
                check(num(a), *b, name("mil_attention"));
            }
        }
        check(
            num(&n["score"]["raw"]),
            r.vec("ensemble.raw")[idx],
            format!("{nodule} ensemble.raw"),
        );
        check(
            num(&n["score"]["calibrated"]),
            r.vec("ensemble.calibrated")[idx],
            format!("{nodule} ensemble.calibrated"),
        );
        let features = r.cases["zero_shot"].as_object().unwrap();
        for feature in features.keys() {
            let classes = r.classes(feature);
            for (c, class) in classes.iter().enumerate() {
                let want = (0..5)
                    .map(|k| r.vec(&format!("fold{k}.zeroshot.{feature}"))[idx * classes.len() + c])
                    .sum::<f64>()
                    / 5.0;
                check(
                    num(&n["descriptors"][feature][class]),
                    want,
                    format!("{nodule} {feature}/{class}"),
                );
            }
        }
    }
    eprintln!("bf16 vs reference: worst |diff| {worst:.2e} at {worst_at}; fold prob {exact:.2e}");
    assert!(worst <= 0.01, "worst |diff| {worst} at {worst_at}");
    // bf16 really ran: its rounding shows (f32 matches to 1e-5, see cli_prints_the_score_json).
    assert!(exact > 1e-7, "bf16 probabilities equal f32's to {exact}");
}

#[test]
fn cli_load_error_is_one_line_with_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "vision_model.ln_post.bias";
    let model = write_set(
        tmp.path(),
        &[0, 1],
        Some(&|_, sd| {
            sd.remove(key);
        }),
    );
    let planes_file = tmp.path().join("p.safetensors");
    Reference::load().write_planes("lung1", &planes_file);
    let out = run_score(&model, &planes_file, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let named = err.contains(key) && err.contains("fold_0");
    assert!(err.starts_with("noduled: ") && named, "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn absent_config_means_the_vit_b32_release() {
    // Without config.json the ViT-B/32 preset applies, so the small fixture towers misfit.
    let tmp = tempfile::tempdir().unwrap();
    let model = write_set(tmp.path(), &[0], None);
    std::fs::remove_file(model.join("config.json")).unwrap();
    let msg = load_err(&model);
    assert!(
        msg.contains("`vision_model.conv1.weight`") && msg.contains("[768, 3, 32, 32]"),
        "{msg}"
    );
}

#[test]
fn bad_calibration_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_set(tmp.path(), &[0, 1], None);
    std::fs::write(
        model.join("fold_1/calibration.json"),
        r#"{"method": "beta", "a": 1.0, "c": 0.0}"#,
    )
    .unwrap();
    let msg = load_err(&model);
    assert!(
        msg.contains("fold_1/calibration.json") && msg.contains("`b`"),
        "{msg}"
    );
    std::fs::remove_file(model.join("fold_1/calibration.json")).unwrap();
    let msg = load_err(&model);
    assert!(msg.contains("fold_1/calibration.json"), "{msg}");
}

#[test]
fn more_blocks_than_configured_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_set(tmp.path(), &[0], None);
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap();
    std::fs::write(
        model.join("config.json"),
        cfg.replace("\"text_layers\": 2", "\"text_layers\": 1"),
    )
    .unwrap();
    let msg = load_err(&model);
    assert!(
        msg.contains("transformer.resblocks.1.attn.q_proj.weight"),
        "{msg}"
    );
}

/// A release-sized set (ViT-B/32, r 2, no config.json, q/k/v stored merged, random weights)
/// loads through the preset, is found merged, and scores; prints load and scoring times:
/// `cargo test --release --test it -- --ignored release_size --nocapture` (writes ~1.2 GB).
#[test]
#[ignore]
fn release_size_set_loads_and_scores() {
    use noduled::model::checkpoint::{specs, Role};
    use noduled::model::config::ModelConfig;
    let cfg = ModelConfig::vit_b32(2);
    let folds = 2;
    let dev = Device::Cpu;
    let rnd = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &dev).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("release");
    let specs = specs(&cfg);
    let base: HashMap<String, Tensor> = specs
        .iter()
        .filter(|s| s.role != Role::Fold)
        .map(|s| {
            let is_ln_weight = s.key.ends_with("weight") && s.shape.len() == 1;
            let t = if is_ln_weight {
                (rnd(&s.shape, 0.05) + 1.0).unwrap()
            } else {
                rnd(&s.shape, 0.02)
            };
            (s.key.clone(), t)
        })
        .collect();
    for k in 0..folds {
        let mut sd = base.clone();
        for s in specs.iter().filter(|s| s.role == Role::Fold) {
            let t = if s.key == "logit_scale" {
                Tensor::new(3.5f32, &dev).unwrap()
            } else if s.key.ends_with("layer_norm.weight") {
                Tensor::ones(s.shape.as_slice(), DType::F32, &dev).unwrap()
            } else {
                rnd(&s.shape, 0.1)
            };
            sd.insert(s.key.clone(), t);
        }
        for s in specs.iter().filter(|s| s.role == Role::LoraWeight) {
            let prefix = s.key.strip_suffix(".weight").unwrap();
            let a = &sd[&format!("{prefix}.w_lora_A")];
            let b = &sd[&format!("{prefix}.w_lora_B")];
            let delta = (b.matmul(a).unwrap() * cfg.lora_scale()).unwrap();
            sd.insert(s.key.clone(), (&sd[&s.key] + delta).unwrap());
        }
        let dir = model.join(format!("fold_{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        candle_core::safetensors::save(&sd, dir.join("model.safetensors")).unwrap();
        std::fs::copy(
            reference().join(format!("model/fold_{k}/calibration.json")),
            dir.join("calibration.json"),
        )
        .unwrap();
    }
    drop(base);
    let started = std::time::Instant::now();
    let scorer = CheckpointScorer::load(&model).unwrap();
    eprintln!(
        "load, {folds} folds: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(scorer.model().layout(), LoraLayout::Merged);
    assert_eq!(scorer.model().config(), &cfg);
    let r = Reference::load();
    let inputs = r.inputs();
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let report = scorer.score(&inputs[..1]).unwrap();
        let ms = started.elapsed().as_secs_f64() * 1e3;
        eprintln!("score 1 nodule x {folds} folds: {ms:.0} ms");
        let f = &report.nodules[0].folds[0];
        assert!(f.prob > 0.0 && f.prob < 1.0 && f.attention.len() == 9);
    }
}
