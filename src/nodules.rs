//! What a request names, turned into model-ready [`NoduleInput`]s: a planes file, a CT volume
//! (DICOM series folder, NIfTI, NRRD) with one or more LPS world coordinates, a 100^3 crop
//! file, or a manifest CSV of many nodules.

use crate::nodule::{NoduleInput, Planes01};
use std::path::PathBuf;

/// One request for nodules to score.
#[derive(Debug, Clone)]
pub enum NoduleRequest {
    /// A safetensors file with tensor `planes01` [9,224,224].
    Planes {
        /// The file.
        path: PathBuf,
        /// Patient id for the report.
        patient_id: String,
        /// Nodule id for the report.
        nodule_id: String,
    },
    /// A CT volume and nodule world coordinates (LPS, mm).
    Volume {
        /// DICOM series folder, .nii/.nii.gz, or .nrrd/.nhdr.
        path: PathBuf,
        /// Which series when a DICOM folder holds several.
        series_uid: Option<String>,
        /// Patient id; when `None`, taken from the file (DICOM PatientID) or the file name.
        patient_id: Option<String>,
        /// Nodules: (nodule id, LPS world coordinate in mm).
        nodules: Vec<(String, [f64; 3])>,
    },
    /// A 100^3 1 mm crop of HU, axes (z,y,x): .npy or the reference's .pt.
    Crop {
        /// The file.
        path: PathBuf,
        /// Patient id for the report.
        patient_id: String,
        /// Nodule id for the report.
        nodule_id: String,
    },
    /// The reference's manifest CSV: pid,nodule_id,image_path,coordX,coordY,coordZ[,malignant].
    Manifest {
        /// The CSV file; relative image paths are resolved against its folder.
        path: PathBuf,
    },
}

/// Loads and preprocesses every nodule a request names, in request order.
pub fn load(request: &NoduleRequest) -> anyhow::Result<Vec<NoduleInput>> {
    match request {
        NoduleRequest::Planes { path, patient_id, nodule_id } => {
            let planes = Planes01::read_safetensors(path, "planes01")?;
            Ok(vec![NoduleInput {
                patient_id: patient_id.clone(),
                nodule_id: nodule_id.clone(),
                planes,
                source: serde_json::json!({ "planes": path.display().to_string() }),
                label: None,
            }])
        }
        other => anyhow::bail!("input not supported yet: {other:?}"),
    }
}
