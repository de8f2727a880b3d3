//! `noduled finetune` and `noduled eval --manifest --model` through the binary, on synthetic
//! nodule crops (`noduled synth --crops`) with the tiny-tower fixture model as the start:
//! the training forward equals the inference model, the result loads and scores through
//! eval, the gate refuses a worse model, and a killed run resumes to the same weights.
//!

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{bin, reference, run_ok, synth_crops};

/// `noduled synth --crops` of `n` cases into `out` with synth's default (drawn) labels.
fn synth_set(out: &Path, n: usize, seed: u64) -> PathBuf {
    synth_crops(out, n, seed, "drawn", "screening")
}

/// The same with the deterministic rule labels.
fn synth_rule_set(out: &Path, n: usize, seed: u64) -> PathBuf {
    synth_crops(out, n, seed, "rule", "screening")
}

fn finetune(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("finetune")
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// LoRA fine-tuning from the fixture model writes a bundle that loads, scores a held-out
/// manifest through `eval --manifest --model` (metrics, plots, zero-shot AUROC), and
/// records its parent and gate metrics.
#[test]
fn finetune_writes_a_model_that_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = synth_set(&tmp.path().join("train"), 30, 11);
    let out = tmp.path().join("model");
    let fixture = reference().join("model");
    let run = finetune(&[
        "--manifest",
        s(&manifest),
        "--model",
        s(&fixture),
        "--out",
        s(&out),
        "--folds",
        "2",
        "--epochs",
        "2",
        "--batch",
        "8",
        "--gate-margin",
        "1",
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("fold 1 epoch 2/2 step 1/1 loss"),
        "{stderr}"
    );
    assert!(stderr.contains("val_auroc"), "{stderr}");
    let gate: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    // Every patient is a test patient of exactly one fold; 30 is the minimum, but with the
    // drawn labels the malignant ones may be fewer than 5: the explicit margin decides.
    assert_eq!(gate["n"].as_u64(), Some(30));
    assert_eq!(gate["patients"].as_u64(), Some(30));
    assert_eq!(gate["margin_explicit"], true);
    assert!(gate["current_auroc"].as_f64().is_some() && gate["passed"] == true);
    assert!(gate["difference_ci"]["lower"].as_f64().is_some(), "{gate}");
    // A bundle (new id, version 1, the parent in its provenance) beside the checkpoint
    // folder it was converted from.
    for f in [
        "manifest.json",
        "base.safetensors",
        "fold_0.safetensors",
        "fold_1.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["provenance"]["parent"].as_str(), Some(s(&fixture)));
    assert_eq!(manifest["version"].as_u64(), Some(1));
    let work = PathBuf::from(format!("{}.work/checkpoint", out.display()));
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("provenance.json")).unwrap())
            .unwrap();
    assert_eq!(prov["tuning"].as_str(), Some("lora"));
    assert_eq!(manifest["model_id"], prov["model_id"]);
    assert_ne!(manifest["model_id"].as_str(), Some("model"));

    let (n2, seed2) = (16, 12);
    let held = synth_set(&tmp.path().join("held"), n2, seed2);
    let eval_out = tmp.path().join("eval");
    let run = run_ok(
        Command::new(bin())
            .args(["eval", "--resamples", "20", "--manifest"])
            .arg(&held)
            .arg("--model")
            .arg(&out)
            .arg("--out")
            .arg(&eval_out),
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["n"].as_u64(), Some(n2 as u64));
    assert!(report["auroc"]["value"].as_f64().is_some());
    assert!(report["zero_shot"]["nodule_margin"]["n"]
        .as_u64()
        .is_some_and(|n| n > 0));
    for f in [
        "scores.csv",
        "eval.json",
        "roc.png",
        "pr.png",
        "reliability.png",
    ] {
        assert!(eval_out.join(f).is_file(), "{f}");
    }
    let scores = std::fs::read_to_string(eval_out.join("scores.csv")).unwrap();
    assert_eq!(scores.lines().count(), n2 + 1);
    assert!(scores.starts_with("patient_id,nodule_id,label,score,raw,zs_"));
}

/// `finetune --tuning full --model models/demo` on `manifest` into `out`: two folds, one
/// epoch of batch 16 at `lr`, no augmentation, then `extra` arguments.
fn full_from_demo(manifest: &Path, out: &Path, lr: &str, extra: &[&str]) -> std::process::Output {
    let current = crate::util::root().join("models/demo");
    let mut args = vec![
        "--manifest",
        s(manifest),
        "--model",
        s(&current),
        "--out",
        s(out),
        "--folds",
        "2",
        "--epochs",
        "1",
        "--batch",
        "16",
        "--tuning",
        "full",
        "--no-augment",
        "--lr",
        lr,
    ];
    args.extend_from_slice(extra);
    finetune(&args)
}

/// The gate refuses a deliberately worse model: the current model is models/demo (trained
/// on synthetic nodules, see scripts/make-demo-model); the candidate is trained from a worse
/// start (`full` from random initialisation of models/demo-config.json, one epoch at lr
/// 1e-7). On fold 0's 60 test patients (used neither for its early stopping nor for its
/// calibration) the candidate ranks at chance while the current model does not, so at the
/// default margin (0.02) the run exits 2 with one line naming both AUROCs and the patients,
/// after a gate line with the bootstrap intervals, and nothing is written to --out.
#[test]
fn gate_refuses_a_worse_model() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = synth_rule_set(&tmp.path().join("data"), 120, 1);
    let worse = tmp.path().join("worse");
    let config = crate::util::root().join("models/demo-config.json");
    let run = full_from_demo(&manifest, &worse, "1e-7", &["--config", s(&config)]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap();
    assert!(last.starts_with("noduled: gate: new model AUROC"), "{last}");
    assert!(last.contains("on 60 held-out test patients"), "{last}");
    let gate = stderr.lines().find(|l| l.starts_with("gate: ")).unwrap();
    assert!(
        gate.contains("60 test patients") && gate.contains("95% CI"),
        "{gate}"
    );
    assert!(
        gate.contains("margin 0.02 (default)") && gate.ends_with("refused"),
        "{gate}"
    );
    assert!(!worse.exists());
}

/// Writes `manifest` again with only the first `malignant` rows malignant (synth's manifest
/// has no quoted fields).
fn relabel(manifest: &Path, out: &Path, malignant: usize) {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let col = header.split(',').position(|c| c == "malignant").unwrap();
    let mut body = format!("{header}\n");
    for (i, line) in lines.enumerate() {
        let mut f: Vec<String> = line.split(',').map(str::to_string).collect();
        f[col] = u8::from(i < malignant).to_string();
        let image = manifest.parent().unwrap().join(&f[2]);
        f[2] = image.display().to_string();
        body += &(f.join(",") + "\n");
    }
    std::fs::write(out, body).unwrap();
}

/// The minimum rule: with fewer than 30 test patients, or fewer than 5 of them with a
/// malignant nodule, and no explicit --gate-margin, finetune refuses to decide with one
/// line naming the counts, before any training; an explicit margin decides anyway (as
/// `finetune_writes_a_model_that_scores` does on 30 patients).
#[test]
fn gate_refuses_to_decide_on_too_few_patients() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = reference().join("model");
    let data = synth_rule_set(&tmp.path().join("data"), 40, 5);
    for (n, malignant, want) in [
        (
            20,
            10,
            "20 held-out test patients (10 with a malignant nodule)",
        ),
        (
            40,
            4,
            "40 held-out test patients (4 with a malignant nodule)",
        ),
    ] {
        let manifest = tmp.path().join(format!("m{n}.csv"));
        relabel(&data, &manifest, malignant);
        let text = std::fs::read_to_string(&manifest).unwrap();
        let kept: Vec<&str> = text.lines().take(n + 1).collect();
        std::fs::write(&manifest, kept.join("\n") + "\n").unwrap();
        let out = tmp.path().join(format!("out{n}"));
        let run = finetune(&[
            "--manifest",
            s(&manifest),
            "--model",
            s(&fixture),
            "--out",
            s(&out),
            "--folds",
            "2",
            "--epochs",
            "1",
        ]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{stderr}");
        let last = stderr.lines().last().unwrap();
        assert!(
            last.starts_with("noduled: gate: ") && last.contains(want),
            "{last}"
        );
        assert!(last.contains("pass --gate-margin explicitly"), "{last}");
        assert!(
            !stderr.contains(" epoch "),
            "trained before refusing: {stderr}"
        );
        assert!(!out.exists());
    }
}

/// `full` with a current model and no --config continues from that model's weights: one
/// epoch at lr 1e-12 leaves models/demo as it was, so on the same held-out patients the new
/// model's AUROC equals the current one's (from random weights it ranks at chance, see
/// `gate_refuses_a_worse_model`), and the gate passes at a zero margin.
#[test]
fn full_tuning_continues_from_the_current_model() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = synth_rule_set(&tmp.path().join("data"), 60, 3);
    let out = tmp.path().join("continued");
    let run = full_from_demo(&manifest, &out, "1e-12", &["--gate-margin", "0"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let gate: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let (new, old) = (
        gate["new_auroc"].as_f64().unwrap(),
        gate["current_auroc"].as_f64().unwrap(),
    );
    assert!(old > 0.6, "models/demo should rank these nodules: {old}");
    assert!((new - old).abs() < 1e-9, "new {new}, current {old}");
    assert!(out.join("fold_0.safetensors").is_file());
}

/// Killing the binary after its first epoch checkpoint and rerunning gives the same final
/// weights as an uninterrupted run with the same seed (augmentations on).
#[test]
fn kill_and_resume_gives_identical_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = synth_set(&tmp.path().join("data"), 16, 2);
    let fixture = reference().join("model");
    let args = |out: &Path| -> Vec<String> {
        [
            "--manifest",
            s(&manifest),
            "--model",
            s(&fixture),
            "--out",
            s(out),
            "--folds",
            "2",
            "--epochs",
            "2",
            "--batch",
            "3",
            "--seed",
            "4",
            "--gate-margin",
            "1",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let whole = tmp.path().join("whole");
    let run = finetune(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let resumed = tmp.path().join("resumed");
    let state = PathBuf::from(format!("{}.work/fold_0/state.json", resumed.display()));
    let mut child = Command::new(bin())
        .arg("finetune")
        .args(args(&resumed))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !state.is_file() {
        assert!(started.elapsed().as_secs() < 600, "no checkpoint");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!resumed.exists());
    let run = finetune(
        &args(&resumed)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("fold 0: resumed after epoch 1"), "{stderr}");
    for k in 0..2 {
        let f = format!("fold_{k}.safetensors");
        let a = std::fs::read(whole.join(&f)).unwrap();
        let b = std::fs::read(resumed.join(&f)).unwrap();
        assert!(a == b, "{f} differs after resume");
    }
}

/// `finetune --device` follows scoring's rules: an explicit CUDA device in a CPU-only build
/// is refused with one line (exit 2) before any work, nothing written; an unknown device is
/// a usage error naming it.
#[cfg(not(feature = "cuda"))]
#[test]
fn finetune_device_cuda_in_a_cpu_build_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = synth_set(&tmp.path().join("data"), 6, 3);
    let out = tmp.path().join("new");
    let fixture = reference().join("model");
    let run = |device: &str| {
        finetune(&[
            "--manifest",
            s(&manifest),
            "--model",
            s(&fixture),
            "--out",
            s(&out),
            "--device",
            device,
        ])
    };
    for device in ["cuda", "cuda:1"] {
        let r = run(device);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("noduled: device cuda:") && stderr.contains("without CUDA support"),
            "{stderr}"
        );
        assert!(!out.exists() && !tmp.path().join("new.work").exists());
    }
    let r = run("gpu");
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("device `gpu`"));
}

/// The training forward (eval mode) gives the inference model's fold probabilities.
#[test]
fn training_forward_equals_inference() {
    use noduled::finetune::params::{self, Params, Tuning};
    let dir = reference().join("model");
    let ck = noduled::model::checkpoint::load(&dir).unwrap();
    let model = noduled::model::NoduleModel::load(&dir).unwrap();
    let crop = noduled::volume::crop::read(
        &crate::util::root().join("tests/fixtures/crops/synthetic0.pt"),
    )
    .unwrap();
    let planes = noduled::preprocess::nine_planes(&crop);
    let want = model.forward(&[&planes]).unwrap();
    for k in 0..ck.weights.n_folds() {
        let mut values = std::collections::BTreeMap::new();
        for (key, _, role) in params::all_specs(&ck.config) {
            let t = match role {
                noduled::model::checkpoint::Role::Fold => ck.weights.fold(k, &key),
                _ => ck.weights.base(&key),
            };
            if let Ok(t) = t {
                values.insert(key, t);
            }
        }
        let zeros = candle_core::Tensor::zeros(
            (2, ck.config.out_dim),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        values.insert("classifier_text.weight".into(), zeros.clone());
        values.insert(
            "classifier_text.bias".into(),
            zeros.narrow(1, 0, 1).unwrap().flatten_all().unwrap(),
        );
        let p = Params::new(&ck.config, &values, Tuning::Lora, &candle_core::Device::Cpu).unwrap();
        let pixels =
            noduled::model::vision::clip_pixels(&[&planes], &candle_core::Device::Cpu).unwrap();
        // As training computes it: the plain differentiable ops, no dropout.
        let logits = noduled::model::kernels::differentiable(|| {
            let m = p.model(None).unwrap();
            m.classify_image(&m.image(&pixels).unwrap())
        })
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        let p = 1.0 / (1.0 + ((logits[0][0] - logits[0][1]) as f64).exp());
        let w = want[0].folds[k].prob;
        assert!((p - w).abs() < 1e-4, "fold {k}: {p} vs {w}");
    }
}

fn eval_json(manifest: &Path, model: &Path, out: Option<&Path>) -> serde_json::Value {
    let mut cmd = Command::new(bin());
    cmd.args(["eval", "--resamples", "200", "--manifest"])
        .arg(manifest)
        .arg("--model")
        .arg(model);
    if let Some(out) = out {
        cmd.arg("--out").arg(out);
    }
    let run = run_ok(&mut cmd);
    serde_json::from_slice(&run.stdout).unwrap()
}

/// What the site-adaptation scenario measured: held-out AUROC of the starting model and of
/// the tuned one (scored through the store), and the tuned model's zero-shot AUROCs.
struct SiteAdaptation {
    start_auroc: f64,
    auroc: f64,
    margin: f64,
    consistency: f64,
    report: serde_json::Value,
    stderr: String,
}

/// The learning scenario, as a site would run it: the box's current model is
/// models/demo (trained on the screening population's synthetic nodules); the site's
/// patients are the `subsolid` population (the same kind of images, but subsolid nodules
/// carry most cancers). `finetune --tuning lora` (the paper's recipe: LoRA on q/k/v of both
/// towers, heads trained) on `n_train` labelled site nodules writes a bundle that
/// `bundle install` accepts; `eval` scores it through the store on 120 unseen site patients.
fn site_adaptation(n_train: usize) -> SiteAdaptation {
    let tmp = tempfile::tempdir().unwrap();
    let train = synth_crops(&tmp.path().join("train"), n_train, 31, "rule", "subsolid");
    let held = synth_crops(&tmp.path().join("held"), 120, 32, "rule", "subsolid");
    let start = crate::util::root().join("models/demo");
    let start_auroc = eval_json(&held, &start, None)["auroc"]["value"]
        .as_f64()
        .unwrap();

    let out = tmp.path().join("tuned");
    let started = std::time::Instant::now();
    let run = finetune(&[
        "--manifest",
        s(&train),
        "--model",
        s(&start),
        "--tuning",
        "lora",
        "--out",
        s(&out),
        "--folds",
        "3",
        "--epochs",
        LORA_EPOCHS,
        "--batch",
        "16",
        "--lr",
        "1e-3",
        "--patience",
        LORA_EPOCHS,
        "--no-augment",
        "--seed",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stderr}");
    eprintln!("finetune took {:.0} s", started.elapsed().as_secs_f64());

    let store = tmp.path().join("store");
    run_ok(
        Command::new(bin())
            .args(["bundle", "install"])
            .arg(&out)
            .arg("--store")
            .arg(&store),
    );

    let report = eval_json(&held, &store, None);
    let auroc = report["auroc"]["value"].as_f64().unwrap();
    let zs = |k: &str| report["zero_shot"][k]["auroc"].as_f64().unwrap();
    let (margin, consistency) = (zs("nodule_margin"), zs("nodule_consistency"));
    eprintln!(
        "{n_train} site nodules: held-out AUROC start {start_auroc:.3} -> {auroc:.3}; \
         zero-shot margin {margin:.3} consistency {consistency:.3}"
    );
    SiteAdaptation {
        start_auroc,
        auroc,
        margin,
        consistency,
        report,
        stderr,
    }
}

/// The targets: with 480 site nodules the tuned model ranks unseen site patients
/// with AUROC >= 0.9, at least [`ADAPTATION_GAIN`] above the current model's, and predicts
/// margin and consistency zero-shot with weighted one-vs-rest AUROC > 0.75 (measured 0.881
/// -> 0.946, margin 0.778, consistency 0.991; docs/finetune.md). About 3 min on 2 cores. It
/// also guards training, LoRA, calibration, install and eval against regressions.
#[test]
fn finetune_learns_synthetic_malignancy_and_semantics() {
    let r = site_adaptation(480);
    assert!(
        r.auroc >= r.start_auroc + ADAPTATION_GAIN,
        "start {}, tuned {}",
        r.start_auroc,
        r.auroc
    );
    assert!(r.auroc >= 0.9, "held-out AUROC {}\n{}", r.auroc, r.stderr);
    assert!(r.margin > 0.75, "{}", r.report["zero_shot"]);
    assert!(r.consistency > 0.75, "{}", r.report["zero_shot"]);
}

/// Least AUROC gain over the current model the target test accepts (measured 0.065).
const ADAPTATION_GAIN: f64 = 0.05;

/// Epochs of the site-adaptation runs (16 nodules a step; 3 folds, so 2/3 of the site
/// nodules train each fold).
const LORA_EPOCHS: &str = "8";
