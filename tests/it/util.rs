//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// tests/fixtures/reference.
pub fn reference() -> PathBuf {
    root().join("tests/fixtures/reference")
}

/// The built noduled binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_noduled"))
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
