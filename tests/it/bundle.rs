//! Model bundles converted from the fixture checkpoints through the real binary: f32, f16 and
//! q8_0 bundles scored with `noduled score` against the reference numbers; install into a
//! store with the real self-test, scoring through the store; and every refused install
//! (flipped byte, missing file, wrong or missing signature, lower version, failing self-test)
//! leaving `current` untouched with a one-line error.

use crate::util::{bin, reference, Reference};
use candle_core::Tensor;
use noduled::bundle::{self, sign, Manifest};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// Asserts success and parses stdout as JSON.
fn ok(out: Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Asserts a one-line error with exit code 2 that contains `needle`.
fn fails(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// Converts the fixture checkpoints into `dir/name` at `precision`.
fn convert(dir: &Path, name: &str, precision: &str) -> PathBuf {
    convert_with_kernel(dir, name, precision, "candle")
}

/// As [`convert`], with the q8_0 kernel `NODULED_Q8_KERNEL` (the golden values are recorded
/// with it).
fn convert_with_kernel(dir: &Path, name: &str, precision: &str, kernel: &str) -> PathBuf {
    let out = dir.join(name);
    let model = reference().join("model");
    ok(Command::new(bin())
        .env("NODULED_Q8_KERNEL", kernel)
        .args([
            OsStr::new("convert"),
            "--checkpoints".as_ref(),
            model.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--precision".as_ref(),
            precision.as_ref(),
            "--model-id".as_ref(),
            "fixture".as_ref(),
            "--version".as_ref(),
            "1".as_ref(),
        ])
        .output()
        .unwrap());
    out
}

/// Largest |score - reference| over the fixture nodules: [prob, calibrated, attention,
/// descriptor], per fold for the first three, fold-mean descriptors for the last.
fn worst_diffs(model: &Path, tmp: &Path) -> ([f64; 4], serde_json::Value) {
    let r = Reference::load();
    let mut worst = [0f64; 4];
    let mut last = serde_json::Value::Null;
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("{v} is no number"));
    for (idx, nodule) in r.nodules().iter().enumerate() {
        let planes = tmp.join(format!("{nodule}.safetensors"));
        if !planes.exists() {
            r.write_planes(nodule, &planes);
        }
        let doc = ok(run(&[
            OsStr::new("score"),
            "--model".as_ref(),
            model.as_os_str(),
            "--planes".as_ref(),
            planes.as_os_str(),
            "--dtype".as_ref(),
            "f32".as_ref(),
        ]));
        let n = &doc["nodules"][0];
        let folds = n["folds"].as_array().unwrap();
        assert_eq!(folds.len(), 5);
        for (k, f) in folds.iter().enumerate() {
            let name = |s: &str| format!("fold{k}.{nodule}.{s}");
            worst[0] = worst[0].max((num(&f["prob"]) - r.vec(&name("prob"))[0]).abs());
            worst[1] = worst[1].max((num(&f["calibrated"]) - r.vec(&name("calibrated"))[0]).abs());
            let want = r.vec(&name("mil_attention"));
            for (a, b) in f["attention"].as_array().unwrap().iter().zip(&want) {
                worst[2] = worst[2].max((num(a) - b).abs());
            }
        }
        let features = r.cases["zero_shot"].as_object().unwrap();
        assert_eq!(n["descriptors"].as_object().unwrap().len(), features.len());
        for (feature, spec) in features {
            let classes = spec["classes"].as_array().unwrap();
            for (c, class) in classes.iter().enumerate() {
                let want = (0..5)
                    .map(|k| r.vec(&format!("fold{k}.zeroshot.{feature}"))[idx * classes.len() + c])
                    .sum::<f64>()
                    / 5.0;
                let got = num(&n["descriptors"][feature][class.as_str().unwrap()]);
                worst[3] = worst[3].max((got - want).abs());
            }
        }
        last = doc;
    }
    (worst, last)
}

#[test]
fn f32_bundle_scores_like_the_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let b = convert(tmp.path(), "f32", "f32");
    let v = ok(run(&[
        OsStr::new("bundle"),
        "verify".as_ref(),
        b.as_os_str(),
    ]));
    assert_eq!(v["precision"], "f32");
    let (worst, doc) = worst_diffs(&b, tmp.path());
    eprintln!(
        "f32 bundle vs reference, max |diff| prob/calibrated/attention/descriptor: {worst:?}"
    );
    for w in worst {
        assert!(w <= 1e-5, "{worst:?}");
    }
    assert_eq!(doc["model"]["id"], "fixture");
    assert_eq!(doc["model"]["version"], 1);
    assert_eq!(doc["model"]["precision"], "f32");
    // Everything inference needs is in the bundle: the f32 vision base, five small fold
    // files, the text base (not read when scoring), the golden input.
    let m = Manifest::read(&b).unwrap();
    assert_eq!(m.folds.len(), 5);
    assert_eq!(m.files.len(), 8);
    assert_eq!(m.provenance.sources.len(), 16);

    // The text base and fold files are complete: the text tower rebuilt from the bundle
    // gives the stored prompt embeddings.
    let (model, info) = noduled::model::NoduleModel::load_bundle(&b).unwrap();
    let spec = info.payload.zero_shot().unwrap();
    let again = noduled::model::NoduleModel::bundle_prompt_embeddings(&b, &spec).unwrap();
    assert_eq!(again.len(), 5);
    for (k, e) in again.iter().enumerate() {
        let d: f64 = (e - model.text_embeddings(k))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d <= 1e-9, "fold {k}: {d}");
    }
}

#[test]
fn f16_and_q8_0_bundles_stay_close_to_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    for (precision, bound) in [("f16", 1e-3), ("q8_0", 1e-2)] {
        let b = convert(tmp.path(), precision, precision);
        let (worst, doc) = worst_diffs(&b, tmp.path());
        eprintln!(
            "{precision} bundle vs reference, max |diff| prob/calibrated/attention/descriptor: {worst:?}"
        );
        assert!(worst[0] <= bound && worst[3] <= bound, "{worst:?}");
        assert!(worst[0] > 0.0, "{precision} changed nothing: {worst:?}");
        assert_eq!(doc["model"]["precision"], precision);
        let m = Manifest::read(&b).unwrap();
        let payload: noduled::model::bundle::Payload = serde_json::from_value(m.model).unwrap();
        let cfg: noduled::model::config::ModelConfig = serde_json::from_value(m.config).unwrap();
        // Six block matmuls per vision block are stored at the bundle's precision.
        let stored = if precision == "q8_0" {
            &payload.q8_0
        } else {
            &payload.f16
        };
        let vision: Vec<_> = stored
            .iter()
            .filter(|k| k.starts_with("vision_model."))
            .collect();
        assert_eq!(vision.len(), 6 * cfg.vision_layers);
    }
}

/// Copies bundle `src` to `dst` with `version`, lets `edit` change files, rehashes, and signs
/// with `key` when given.
fn variant(
    src: &Path,
    dst: &Path,
    version: u64,
    key: Option<&sign::SecretKey>,
    edit: impl FnOnce(&Path),
) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_name() != bundle::SIGNATURE {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    let mut m = Manifest::read(dst).unwrap();
    m.version = version;
    m.write(dst).unwrap();
    edit(dst);
    let mut m = Manifest::read(dst).unwrap();
    m.files = bundle::hash_files(dst).unwrap();
    m.write(dst).unwrap();
    if let Some(k) = key {
        bundle::sign_bundle(dst, k).unwrap();
    }
    dst.to_path_buf()
}

fn install(b: &Path, store: &Path, pubkey: &Path, force: bool) -> Output {
    let mut args: Vec<&OsStr> = vec![
        "bundle".as_ref(),
        "install".as_ref(),
        b.as_os_str(),
        "--store".as_ref(),
        store.as_os_str(),
        "--pubkey".as_ref(),
        pubkey.as_os_str(),
    ];
    if force {
        args.push("--force".as_ref());
    }
    run(&args)
}

fn current(store: &Path) -> String {
    std::fs::read_link(store.join("current"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn install_self_test_store_scoring_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Golden values recorded with the copy-free kernel, self-tests run with candle's (what a
    // bundle converted on one CPU and installed on another sees).
    let q8 = convert_with_kernel(t, "q8", "q8_0", "inplace");
    let sk = sign::SecretKey::generate();
    let pubkey = t.join("site.pub");
    sk.public().write(&pubkey).unwrap();
    let store = t.join("store");
    std::fs::create_dir_all(&store).unwrap();

    // v1 and v3 install (self-test on the real model), the store scores as v3.
    let v1 = variant(&q8, &t.join("v1"), 1, Some(&sk), |_| {});
    ok(install(&v1, &store, &pubkey, false));
    assert_eq!(current(&store), "fixture-1");
    let v3 = variant(&q8, &t.join("v3"), 3, Some(&sk), |_| {});
    let doc = ok(install(&v3, &store, &pubkey, false));
    assert!(doc["previous"].as_str().unwrap().ends_with("fixture-1"));
    assert_eq!(current(&store), "fixture-3");
    let planes = t.join("lung1.safetensors");
    Reference::load().write_planes("lung1", &planes);
    let scored = ok(run(&[
        OsStr::new("score"),
        "--model".as_ref(),
        store.as_os_str(),
        "--planes".as_ref(),
        planes.as_os_str(),
    ]));
    assert_eq!(scored["model"]["id"], "fixture");
    assert_eq!(scored["model"]["version"], 3);
    assert_eq!(scored["model"]["precision"], "q8_0");

    // Refusals: each leaves current at fixture-3.
    let flipped = variant(&q8, &t.join("flip"), 4, Some(&sk), |_| {});
    let base = flipped.join("base.safetensors");
    let mut bytes = std::fs::read(&base).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&base, bytes).unwrap();
    fails(
        install(&flipped, &store, &pubkey, false),
        "base.safetensors: SHA-256",
    );

    let missing = variant(&q8, &t.join("missing"), 4, Some(&sk), |_| {});
    std::fs::remove_file(missing.join("fold_3.safetensors")).unwrap();
    fails(
        install(&missing, &store, &pubkey, false),
        "fold_3.safetensors: missing",
    );

    let other = sign::SecretKey::generate();
    let wrong = variant(&q8, &t.join("wrong"), 4, Some(&other), |_| {});
    fails(
        install(&wrong, &store, &pubkey, false),
        "manifest.json.minisig",
    );

    let unsigned = variant(&q8, &t.join("unsigned"), 4, None, |_| {});
    fails(
        install(&unsigned, &store, &pubkey, false),
        "a public key is configured",
    );

    let v2 = variant(&q8, &t.join("v2"), 2, Some(&sk), |_| {});
    fails(
        install(&v2, &store, &pubkey, false),
        "lower than the installed",
    );

    // Two folds' files swapped, hashes recomputed and re-signed: only the self-test can tell.
    let swapped = variant(&q8, &t.join("swapped"), 5, Some(&sk), |d| {
        let (a, b) = (d.join("fold_0.safetensors"), d.join("fold_1.safetensors"));
        let tmp = d.join("swap.tmp");
        std::fs::rename(&a, &tmp).unwrap();
        std::fs::rename(&b, &a).unwrap();
        std::fs::rename(&tmp, &b).unwrap();
    });
    ok(run(&[
        OsStr::new("bundle"),
        "verify".as_ref(),
        swapped.as_os_str(),
        "--pubkey".as_ref(),
        pubkey.as_os_str(),
    ]));
    fails(
        install(&swapped, &store, &pubkey, false),
        "self-test failed, `current` left unchanged: golden input: fold 0 probability",
    );
    assert_eq!(current(&store), "fixture-3");

    // A downgrade goes through with --force; rollback returns to v3.
    ok(install(&v2, &store, &pubkey, true));
    assert_eq!(current(&store), "fixture-2");
    ok(run(&[
        OsStr::new("bundle"),
        "rollback".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
    ]));
    assert_eq!(current(&store), "fixture-3");
}

#[test]
fn verify_checks_the_config_against_the_weight_files() {
    let tmp = tempfile::tempdir().unwrap();
    let b = convert(tmp.path(), "q8", "q8_0");
    // A config with a wider vision tower than the files hold: verify names the file and key.
    let bad = variant(&b, &tmp.path().join("bad"), 1, None, |d| {
        let mut m = Manifest::read(d).unwrap();
        m.config["vision_width"] = serde_json::json!(96);
        m.config["vision_heads"] = serde_json::json!(4);
        m.write(d).unwrap();
    });
    fails(
        run(&[OsStr::new("bundle"), "verify".as_ref(), bad.as_os_str()]),
        "base.safetensors",
    );
}

/// A set whose folds do not share one base is refused, naming the file and the tensor, and no
/// bundle directory is left behind.
#[test]
fn convert_refuses_folds_with_different_bases() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("model");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(
        reference().join("model/config.json"),
        src.join("config.json"),
    )
    .unwrap();
    let key = "vision_model.ln_post.bias";
    for k in 0..3 {
        let from = reference().join(format!("model/fold_{k}"));
        let to = src.join(format!("fold_{k}"));
        std::fs::create_dir_all(&to).unwrap();
        std::fs::copy(from.join("calibration.json"), to.join("calibration.json")).unwrap();
        let mut sd: HashMap<String, Tensor> =
            candle_core::pickle::read_all_with_key(from.join("best_both.pt"), Some("model"))
                .unwrap()
                .into_iter()
                .collect();
        if k == 2 {
            let t = (&sd[key] + 0.01).unwrap();
            sd.insert(key.to_string(), t);
        }
        candle_core::safetensors::save(&sd, to.join("model.safetensors")).unwrap();
    }
    let out = tmp.path().join("b");
    fails(
        run(&[
            OsStr::new("convert"),
            "--checkpoints".as_ref(),
            src.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]),
        &format!("fold_2/model.safetensors: tensor `{key}` differs from the shared base"),
    );
    assert!(!out.exists());
}
