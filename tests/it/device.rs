//! `--device` / `--dtype` through the binary, on the CPU (CI has no GPU and no CUDA toolkit:
//! the CUDA build's fallback is checked by scripts/test-cuda-fallback, the GPU itself by
//! scripts/device-check).

use crate::util::{bin, reference, run_ok, Reference};
use std::process::{Command, Output};

fn score(planes: &std::path::Path, extra: &[&str]) -> Output {
    Command::new(bin())
        .args(["score", "--model"])
        .arg(reference().join("model"))
        .arg("--planes")
        .arg(planes)
        .args(extra)
        .output()
        .unwrap()
}

/// The one stderr line of a refused run (exit 2), asserted to be a single line.
fn refusal(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty(), "refused runs print no JSON");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    stderr.trim_end().to_string()
}

#[test]
fn device_cpu_scores_and_the_result_names_the_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let planes = tmp.path().join("lung1.safetensors");
    let r = Reference::load();
    r.write_planes("lung1", &planes);
    let mut probs = Vec::new();
    for device in ["cpu", "auto"] {
        let out = score(&planes, &["--device", device, "--dtype", "f32"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let model = &doc["model"];
        if device == "cpu" || !cfg!(feature = "cuda") {
            let backend = model["backend"].as_str().unwrap();
            assert!(backend.starts_with("cpu f32 ("), "{model}");
            assert!(model.get("fallback").is_none(), "{model}");
        }
        probs.push(doc["nodules"][0]["score"]["raw"].as_f64().unwrap());
    }
    let want = r.vec("ensemble.raw")[0];
    assert!((probs[0] - want).abs() <= 1e-5, "{} vs {want}", probs[0]);
    if !cfg!(feature = "cuda") {
        assert_eq!(probs[0], probs[1], "auto is the CPU in a CPU-only build");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn device_cuda_in_a_cpu_build_is_one_line_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let planes = tmp.path().join("lung1.safetensors");
    Reference::load().write_planes("lung1", &planes);
    for device in ["cuda", "cuda:1"] {
        let line = refusal(&score(&planes, &["--device", device]));
        assert!(
            line.starts_with("noduled: device cuda:")
                && line.contains("built without CUDA support"),
            "{line}"
        );
    }
    let out = Command::new(bin())
        .args(["bench", "--random", "vit-b32", "--device", "cuda", "--json"])
        .output()
        .unwrap();
    assert!(refusal(&out).contains("built without CUDA support"));
}

#[test]
fn f16_on_the_cpu_and_unknown_devices_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let planes = tmp.path().join("lung1.safetensors");
    Reference::load().write_planes("lung1", &planes);
    let line = refusal(&score(&planes, &["--device", "cpu", "--dtype", "f16"]));
    assert!(line.contains("dtype f16 is for CUDA devices"), "{line}");
    // clap's usage error: exit 2, the message names the value.
    let out = score(&planes, &["--device", "gpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("device `gpu`"));
}

#[test]
fn bench_reports_backend_startup_and_batches() {
    let out = run_ok(
        Command::new(bin())
            .args(["bench", "--model"])
            .arg(reference().join("model"))
            .args([
                "--device",
                "cpu",
                "--nodules",
                "2",
                "--batch",
                "3",
                "--warmup",
                "1",
                "--threads",
                "2",
                "--json",
            ]),
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(j["backend"].as_str().unwrap().starts_with("cpu"), "{j}");
    assert!(j["fallback"].is_null(), "{j}");
    assert_eq!(j["batch"], 3);
    let num = |k: &str| j[k].as_f64().unwrap_or_else(|| panic!("{k} in {j}"));
    for k in ["device_init_s", "load_s", "first_pass_s"] {
        assert!(num(k) >= 0.0 && num(k).is_finite(), "{k}");
    }
    // A pass scores three nodules: per nodule is a third of per pass.
    let (pass, nodule) = (num("median_s_per_pass"), num("median_s_per_nodule"));
    assert!(
        pass > 0.0 && (nodule * 3.0 - pass).abs() <= 1e-9 * pass.max(1.0),
        "{j}"
    );
}
