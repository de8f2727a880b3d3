//! The unit of work between preprocessing and the model: one nodule's nine planes.
//!
//! `Planes01` holds the nine 224x224 planes of one nodule, row-major `[plane][row][col]`,
//! values in [0, 1] (HU clipped to [-1000, 500], then (HU + 1000) / 1500), *before* CLIP
//! normalisation; the model applies the CLIP mean/std itself.

use std::path::Path;

/// Number of planes per nodule.
pub const N_PLANES: usize = 9;
/// Side of each plane in pixels.
pub const PLANE_SIDE: usize = 224;
/// Values in one `Planes01`.
pub const PLANES_LEN: usize = N_PLANES * PLANE_SIDE * PLANE_SIDE;

/// Nine 224x224 planes, `[plane][row][col]`, values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Planes01(pub Vec<f32>);

/// Errors reading a planes file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanesError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file or lacks the tensor.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
}

impl Planes01 {
    /// Wraps a buffer, checking its length and that every value is finite.
    pub fn new(values: Vec<f32>) -> Result<Self, String> {
        if values.len() != PLANES_LEN {
            return Err(format!(
                "expected {PLANES_LEN} values (9x224x224), got {}",
                values.len()
            ));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!("value {i} is not finite"));
        }
        Ok(Self(values))
    }

    /// Reads tensor `name` (f32 or f64, shape [9,224,224]) from a safetensors file.
    pub fn read_safetensors(path: &Path, name: &str) -> Result<Self, PlanesError> {
        Self::read_safetensors_in(&crate::confine::Opener::unconfined(), path, name)
    }

    /// [`Self::read_safetensors`] with the file opened through `opener` (see
    /// [`crate::confine`]).
    pub fn read_safetensors_in(
        opener: &crate::confine::Opener,
        path: &Path,
        name: &str,
    ) -> Result<Self, PlanesError> {
        use std::io::Read;
        let p = path.display().to_string();
        let io = |source| PlanesError::Io {
            path: p.clone(),
            source,
        };
        let mut bytes = Vec::new();
        opener
            .open_file(path)
            // f64 planes and a generous header; anything longer is not a planes file.
            .and_then(|f| {
                f.take((PLANES_LEN * 8 + (1 << 20)) as u64)
                    .read_to_end(&mut bytes)
            })
            .map_err(io)?;
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| PlanesError::Format {
                path: p.clone(),
                msg: format!("not a safetensors file: {e}"),
            })?;
        let t = st.tensor(name).map_err(|_| PlanesError::Format {
            path: p.clone(),
            msg: format!(
                "tensor `{name}` not found (have: {})",
                st.names().join(", ")
            ),
        })?;
        if t.shape() != [N_PLANES, PLANE_SIDE, PLANE_SIDE] {
            return Err(PlanesError::Format {
                path: p,
                msg: format!(
                    "tensor `{name}` has shape {:?}, expected [9, 224, 224]",
                    t.shape()
                ),
            });
        }
        let data = t.data();
        let values: Vec<f32> = match t.dtype() {
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F64 => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32)
                .collect(),
            other => {
                return Err(PlanesError::Format {
                    path: p,
                    msg: format!("tensor `{name}` has dtype {other:?}, expected F32 or F64"),
                })
            }
        };
        Self::new(values).map_err(|msg| PlanesError::Format {
            path: p,
            msg: format!("tensor `{name}`: {msg}"),
        })
    }
}

/// One nodule ready for the model, with the identifiers that travel to the report.
#[derive(Debug, Clone)]
pub struct NoduleInput {
    /// Patient identifier (patient scores group by it).
    pub patient_id: String,
    /// Nodule identifier, unique within the patient.
    pub nodule_id: String,
    /// The nine planes.
    pub planes: Planes01,
    /// Where the nodule came from (file, series UID, coordinate, crop centre...), copied into the report.
    pub source: serde_json::Value,
    /// Ground-truth label when known (manifest `malignant` column).
    pub label: Option<u8>,
}
