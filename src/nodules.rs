//! What a request names, turned into model-ready [`NoduleInput`]s: a planes file, a CT volume
//! (DICOM series folder, NIfTI, NRRD) with one or more LPS world coordinates, a 100^3 crop
//! file, or a manifest CSV of many nodules.

use crate::confine::Opener;
use crate::nodule::{NoduleInput, Planes01};
use crate::preprocess;
use crate::table::Table;
use crate::volume::{self, Volume};
use anyhow::Context;
use std::path::{Path, PathBuf};

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

/// Loads and preprocesses every nodule a request names, in request order. A volume is read
/// once per file, however many nodules it holds.
pub fn load(request: &NoduleRequest) -> anyhow::Result<Vec<NoduleInput>> {
    load_in(request, &Opener::unconfined())
}

/// [`load`] with every file the request names opened through `opener` (the daemon's
/// data-root confinement, see [`crate::confine`]).
pub fn load_in(request: &NoduleRequest, opener: &Opener) -> anyhow::Result<Vec<NoduleInput>> {
    match request {
        NoduleRequest::Planes {
            path,
            patient_id,
            nodule_id,
        } => {
            let planes = Planes01::read_safetensors_in(opener, path, "planes01")?;
            Ok(vec![NoduleInput {
                patient_id: patient_id.clone(),
                nodule_id: nodule_id.clone(),
                planes,
                source: serde_json::json!({ "planes": path.display().to_string() }),
                label: None,
            }])
        }
        NoduleRequest::Volume {
            path,
            series_uid,
            patient_id,
            nodules,
        } => {
            let volume = volume::read_in(opener, path, series_uid.as_deref())?;
            let patient_id = patient_id
                .clone()
                .or_else(|| volume.ids.patient_id.clone())
                .unwrap_or_else(|| file_stem(path));
            nodules
                .iter()
                .map(|(nodule_id, coord)| {
                    let (planes, source) = from_volume(&volume, *coord)?;
                    Ok(NoduleInput {
                        patient_id: patient_id.clone(),
                        nodule_id: nodule_id.clone(),
                        planes,
                        source,
                        label: None,
                    })
                })
                .collect()
        }
        NoduleRequest::Crop {
            path,
            patient_id,
            nodule_id,
        } => {
            let (planes, source) = from_crop_in(opener, path)?;
            Ok(vec![NoduleInput {
                patient_id: patient_id.clone(),
                nodule_id: nodule_id.clone(),
                planes,
                source,
                label: None,
            }])
        }
        NoduleRequest::Manifest { path } => load_manifest(path),
    }
}

/// One nodule's planes from a loaded volume, with its source identifiers.
pub fn from_volume(
    volume: &Volume,
    coord_lps: [f64; 3],
) -> anyhow::Result<(Planes01, serde_json::Value)> {
    let (_, info, planes) = preprocess::nodule_planes(volume, coord_lps)?;
    let ids = &volume.ids;
    let source = serde_json::json!({
        "volume": ids.path.display().to_string(),
        "format": ids.format.name(),
        "series_uid": ids.series_uid,
        "study_uid": ids.study_uid,
        "patient_id": ids.patient_id,
        "coord_lps_mm": coord_lps,
        "crop_centre_voxel_lps": info.centre_voxel_lps,
    });
    Ok((planes, source))
}

/// One nodule's planes from a crop file (.npy or .pt), with its source identifiers.
pub fn from_crop(path: &Path) -> anyhow::Result<(Planes01, serde_json::Value)> {
    from_crop_in(&Opener::unconfined(), path)
}

/// [`from_crop`] with the file opened through `opener`.
pub fn from_crop_in(opener: &Opener, path: &Path) -> anyhow::Result<(Planes01, serde_json::Value)> {
    let crop = volume::crop::read_in(opener, path)?;
    let planes = preprocess::nine_planes(&crop);
    Ok((
        planes,
        serde_json::json!({ "crop": path.display().to_string() }),
    ))
}

fn file_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string());
    for ext in [".nii.gz", ".nii", ".nrrd", ".nhdr", ".npy", ".pt"] {
        if let Some(stem) = name.strip_suffix(ext) {
            return stem.to_string();
        }
    }
    name
}

/// One manifest row.
struct Row {
    line: usize,
    pid: String,
    nodule_id: String,
    image: PathBuf,
    series_uid: Option<String>,
    coord: [f64; 3],
    label: Option<u8>,
}

/// Reads a manifest CSV (`pid,nodule_id,image_path,coordX,coordY,coordZ[,malignant]`, any
/// column order, extra columns ignored, optional `series_uid`); relative image paths are
/// resolved against the CSV's folder. Each image is read once; rows keep their order.
fn load_manifest(path: &Path) -> anyhow::Result<Vec<NoduleInput>> {
    Ok(load_manifest_table(path)?.0)
}

/// [`load`] of a manifest, also returning the table it was read from: nodule `i` is
/// `table.rows[i]` (for the callers that read further columns, e.g. eval's semantic truth).
pub fn load_manifest_table(path: &Path) -> anyhow::Result<(Vec<NoduleInput>, Table)> {
    let table = Table::read(path)?;
    let rows = read_manifest(&table)?;
    let mut out: Vec<Option<NoduleInput>> = (0..rows.len()).map(|_| None).collect();
    let mut done = vec![false; rows.len()];
    for first in 0..rows.len() {
        if done[first] {
            continue;
        }
        let key = (&rows[first].image, &rows[first].series_uid);
        let members: Vec<usize> = (first..rows.len())
            .filter(|&i| !done[i] && (&rows[i].image, &rows[i].series_uid) == key)
            .collect();
        let ctx = |r: &Row| {
            format!(
                "{}: line {} ({} / {})",
                path.display(),
                r.line,
                r.pid,
                r.nodule_id
            )
        };
        if volume::is_crop_file(&rows[first].image) {
            for &i in &members {
                let r = &rows[i];
                let (planes, source) = from_crop(&r.image).with_context(|| ctx(r))?;
                out[i] = Some(input(path, r, planes, source));
            }
        } else {
            let r0 = &rows[first];
            let vol = volume::read(&r0.image, r0.series_uid.as_deref()).with_context(|| ctx(r0))?;
            for &i in &members {
                let r = &rows[i];
                let (planes, source) = from_volume(&vol, r.coord).with_context(|| ctx(r))?;
                out[i] = Some(input(path, r, planes, source));
            }
        }
        for &i in &members {
            done[i] = true;
        }
    }
    let nodules = out
        .into_iter()
        .map(|n| n.expect("every row loaded"))
        .collect();
    Ok((nodules, table))
}

fn input(manifest: &Path, r: &Row, planes: Planes01, mut source: serde_json::Value) -> NoduleInput {
    source["manifest"] = serde_json::json!(manifest.display().to_string());
    source["manifest_line"] = serde_json::json!(r.line);
    NoduleInput {
        patient_id: r.pid.clone(),
        nodule_id: r.nodule_id.clone(),
        planes,
        source,
        label: r.label,
    }
}

/// The manifest's rows, one per table row (so row `i` is `table.rows[i]`).
fn read_manifest(table: &Table) -> anyhow::Result<Vec<Row>> {
    let path = &table.path;
    let base = path.parent().unwrap_or(Path::new("."));
    let need = |name: &str| {
        table.find_ignore_case(name).with_context(|| {
            format!("{}: header lacks column `{name}` (expected pid,nodule_id,image_path,coordX,coordY,coordZ[,malignant])", path.display())
        })
    };
    let (c_pid, c_nid, c_img) = (need("pid")?, need("nodule_id")?, need("image_path")?);
    let c_xyz = [need("coordX")?, need("coordY")?, need("coordZ")?];
    let c_mal = table.find_ignore_case("malignant");
    let c_series = table.find_ignore_case("series_uid");
    let mut rows = Vec::new();
    for row in 0..table.rows.len() {
        let mut coord = [0.0; 3];
        for (a, &c) in c_xyz.iter().enumerate() {
            coord[a] = table.f64(row, c)?;
        }
        let label = match c_mal.map(|c| (c, table.get(row, c))) {
            None | Some((_, "")) => None,
            Some((c, v)) => match v.to_ascii_lowercase().as_str() {
                "nan" => None,
                "true" => Some(1),
                "false" => Some(0),
                _ => match v.parse::<f64>() {
                    Ok(0.0) => Some(0),
                    Ok(1.0) => Some(1),
                    _ => return Err(table.bad(row, c, format!("`{v}` is not 0 or 1")).into()),
                },
            },
        };
        let img = table.get(row, c_img);
        if img.is_empty() {
            return Err(table.bad(row, c_img, "empty").into());
        }
        let image = if Path::new(img).is_absolute() {
            PathBuf::from(img)
        } else {
            base.join(img)
        };
        let series_uid = c_series
            .map(|c| table.get(row, c))
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        rows.push(Row {
            line: table.lines[row],
            pid: table.get(row, c_pid).to_string(),
            nodule_id: table.get(row, c_nid).to_string(),
            image,
            series_uid,
            coord,
            label,
        });
    }
    if rows.is_empty() {
        anyhow::bail!("{}: the manifest has no rows", path.display());
    }
    Ok(rows)
}
