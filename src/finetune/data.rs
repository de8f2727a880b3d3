//! Training data from the reference's manifest CSV: `pid, nodule_id, image_path, coordX,
//! coordY, coordZ, malignant` (coordinates LPS world mm; the image a CT volume or a 100^3 HU
//! crop, resolved against the manifest's folder), plus optionally the semantic columns of
//! `sample_csv_with_semantic_feats.csv` and/or a free-text `report` column.
//!
//! The text of a nodule is its `report` when given, else the impression of the template
//! report made from its semantic columns ([`crate::semantics::generate_report`]), whose
//! findings lines are kept too: training draws, per step, the impression or one findings
//! line (the paper's "randomly selected findings/impression"). Without a report or semantic
//! columns, training is image-only. Crops are kept as HU in (z, y, x) order.

use super::FinetuneError;
use crate::semantics::{generate_report, Semantics, SEMANTIC_COLUMNS};
use crate::table::Table;
use crate::volume::crop::CropHu;
use std::path::{Path, PathBuf};

/// One training nodule.
pub struct Sample {
    /// Patient id (splits are by patient).
    pub pid: String,
    /// Nodule id.
    pub nodule_id: String,
    /// Malignant.
    pub label: bool,
    /// The 100^3 HU crop, (z, y, x).
    pub crop: CropHu,
    /// Semantic features, when the manifest has semantic columns.
    pub semantics: Option<Semantics>,
    /// Report text: the impression (see the module doc).
    pub text: Option<String>,
    /// Findings lines of the template report (empty with a free-text `report`).
    pub findings: Vec<String>,
}

/// Reads every row of `path` and crops its nodule.
pub fn load(path: &Path) -> Result<Vec<Sample>, FinetuneError> {
    let table = Table::read(path)?;
    let col = |name: &str| {
        table
            .header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
    };
    let need = |name: &str| {
        col(name).ok_or_else(|| {
            FinetuneError::Data(format!(
                "{}: header lacks column `{name}` (expected pid,nodule_id,image_path,coordX,coordY,coordZ,malignant)",
                path.display()
            ))
        })
    };
    let (c_pid, c_nid, c_img, c_mal) = (
        need("pid")?,
        need("nodule_id")?,
        need("image_path")?,
        need("malignant")?,
    );
    let c_xyz = [need("coordX")?, need("coordY")?, need("coordZ")?];
    let c_report = col("report");
    let has_semantics = SEMANTIC_COLUMNS.iter().any(|c| col(c).is_some());
    let base = path.parent().unwrap_or(Path::new("."));
    let mut volume: Option<(PathBuf, crate::volume::Volume)> = None;
    let mut out = Vec::with_capacity(table.rows.len());
    for row in 0..table.rows.len() {
        let at = |msg: String| {
            FinetuneError::Data(format!(
                "{}: line {}: {msg}",
                path.display(),
                table.lines[row]
            ))
        };
        let label = match table.get(row, c_mal).trim() {
            "1" | "1.0" | "true" | "True" => true,
            "0" | "0.0" | "false" | "False" => false,
            v => return Err(at(format!("`malignant` = `{v}` is not 0 or 1"))),
        };
        let mut coord = [0.0; 3];
        for (a, &c) in c_xyz.iter().enumerate() {
            coord[a] = table.f64(row, c)?;
        }
        let img = table.get(row, c_img).trim();
        if img.is_empty() {
            return Err(at("`image_path` is empty".into()));
        }
        let image = if Path::new(img).is_absolute() {
            PathBuf::from(img)
        } else {
            base.join(img)
        };
        let crop = if crate::volume::is_crop_file(&image) {
            crate::volume::crop::read(&image).map_err(|e| at(e.to_string()))?
        } else {
            if volume.as_ref().map(|(p, _)| p != &image).unwrap_or(true) {
                let v = crate::volume::read(&image, None).map_err(|e| at(e.to_string()))?;
                volume = Some((image.clone(), v));
            }
            let (_, v) = volume.as_ref().expect("volume just read");
            crate::preprocess::crop_at(v, coord)
                .map_err(|e| at(e.to_string()))?
                .0
        };
        let semantics = if has_semantics {
            Some(Semantics::from_row(&table, row)?)
        } else {
            None
        };
        let (text, findings) = match c_report.map(|c| table.get(row, c).trim().to_string()) {
            Some(t) if !t.is_empty() => (Some(t), Vec::new()),
            _ => match semantics.as_ref().map(generate_report) {
                Some(report) => (Some(report.impression), report.findings),
                None => (None, Vec::new()),
            },
        };
        out.push(Sample {
            pid: table.get(row, c_pid).trim().to_string(),
            nodule_id: table.get(row, c_nid).trim().to_string(),
            label,
            crop,
            semantics,
            text,
            findings,
        });
    }
    if out.is_empty() {
        return Err(FinetuneError::Data(format!(
            "{}: the manifest has no rows",
            path.display()
        )));
    }
    Ok(out)
}
