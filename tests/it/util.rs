//! Shared helpers for the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use noduled::model::NoduleModel;
use noduled::nodule::{NoduleInput, Planes01};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// tests/fixtures/reference.
pub fn reference() -> PathBuf {
    root().join("tests/fixtures/reference")
}

/// The built noduled binary, or, when `NODULED_TEST_RUNNER` is set (e.g.
/// `qemu-aarch64 -L /usr/aarch64-linux-gnu`, by scripts/test-aarch64), a generated shell
/// script that execs the binary through that runner: tests of a cross-built binary then spawn
/// it the same way without binfmt_misc, and the child's pid is still the one to signal.
pub fn bin() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_noduled"));
    match std::env::var("NODULED_TEST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            static WRAPPER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
            WRAPPER
                .get_or_init(|| runner_wrapper(&runner, &exe))
                .clone()
        }
        _ => exe,
    }
}

/// Runs `cmd` to completion and asserts that it succeeded, showing its stderr otherwise.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let run = cmd.output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    run
}

/// `noduled synth --crops --label LABEL --population POPULATION` of `n` cases into `out`;
/// returns the manifest's path.
pub fn synth_crops(out: &Path, n: usize, seed: u64, label: &str, population: &str) -> PathBuf {
    run_ok(
        std::process::Command::new(bin())
            .args([
                "synth",
                "--crops",
                "--label",
                label,
                "--population",
                population,
            ])
            .arg("--out")
            .arg(out)
            .args(["--n", &n.to_string(), "--seed", &seed.to_string()]),
    );
    out.join("manifest.csv")
}

/// Factor for the tests' waiting deadlines: `NODULED_TEST_TIME_SCALE` (a positive integer,
/// default 1). scripts/test-aarch64 raises it: under qemu-user the binary runs one to two
/// orders of magnitude slower than on hardware.
pub fn time_scale() -> u64 {
    std::env::var("NODULED_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&k: &u64| k > 0)
        .unwrap_or(1)
}

/// Writes `exec RUNNER EXE "$@"` as an executable script under the target's tmp dir
/// (write, then rename: test processes may race).
fn runner_wrapper(runner: &str, exe: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join("noduled-via-runner");
    let tmp = dir.join(format!("noduled-via-runner.{}", std::process::id()));
    let script = format!(
        "#!/bin/sh\nexec {runner} '{}' \"$@\"\n",
        exe.display().to_string().replace('\'', "'\\''")
    );
    std::fs::write(&tmp, script).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Tensor `name` of the fixtures' expected.safetensors (float32) as f32 values.
pub fn expected(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(reference().join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("{name} in expected.safetensors"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The fixtures' expected.safetensors tensors and cases.json, for model-level tests.
pub struct Reference {
    /// Every tensor of expected.safetensors.
    pub tensors: HashMap<String, Tensor>,
    /// cases.json.
    pub cases: serde_json::Value,
}

impl Reference {
    pub fn load() -> Self {
        let tensors =
            candle_core::safetensors::load(reference().join("expected.safetensors"), &Device::Cpu)
                .unwrap();
        let cases =
            serde_json::from_str(&std::fs::read_to_string(reference().join("cases.json")).unwrap())
                .unwrap();
        Self { tensors, cases }
    }

    pub fn vec(&self, name: &str) -> Vec<f64> {
        let t = self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("expected.safetensors lacks {name}"));
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    pub fn nodules(&self) -> Vec<String> {
        self.cases["nodules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    pub fn planes(&self, nodule: &str) -> Planes01 {
        Planes01::new(
            self.vec(&format!("{nodule}.planes01"))
                .into_iter()
                .map(|v| v as f32)
                .collect(),
        )
        .unwrap()
    }

    pub fn inputs(&self) -> Vec<NoduleInput> {
        self.nodules()
            .iter()
            .map(|n| NoduleInput {
                patient_id: self.cases["patients"][n].as_str().unwrap().to_string(),
                nodule_id: n.clone(),
                planes: self.planes(n),
                source: serde_json::Value::Null,
                label: None,
            })
            .collect()
    }

    pub fn classes(&self, feature: &str) -> Vec<String> {
        let f = &self.cases["zero_shot"][feature]["classes"];
        f.as_array()
            .unwrap_or_else(|| panic!("no feature {feature}"))
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect()
    }

    /// The reference's features with their classes, in the model's feature order (the JSON
    /// reader here does not keep file order; the prompt order is checked by `text_embeds`).
    pub fn features(&self, model: &NoduleModel) -> Vec<(String, Vec<String>)> {
        let names: Vec<String> = model
            .zero_shot()
            .features
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(
            names.len(),
            self.cases["zero_shot"].as_object().unwrap().len()
        );
        names
            .into_iter()
            .map(|n| (n.clone(), self.classes(&n)))
            .collect()
    }

    /// Writes nodule `nodule`'s planes as a planes file (tensor `planes01`).
    pub fn write_planes(&self, nodule: &str, path: &Path) {
        let planes = self.tensors[&format!("{nodule}.planes01")].clone();
        candle_core::safetensors::save(&HashMap::from([("planes01".to_string(), planes)]), path)
            .unwrap();
    }
}
