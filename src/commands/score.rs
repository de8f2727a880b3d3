//! `noduled score`: score nodules and print the score JSON.

use crate::nodules::NoduleRequest;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `noduled score`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model: a checkpoint folder (fold_k/best_both.pt + fold_k/calibration.json), a bundle,
    /// or a model store (its `current` bundle).
    #[arg(long)]
    pub model: PathBuf,
    /// A safetensors file with tensor `planes01` [9,224,224] in [0,1].
    #[arg(long, conflicts_with_all = ["volume", "crop", "manifest"])]
    pub planes: Option<PathBuf>,
    /// CT volume: a DICOM series folder, .nii/.nii.gz or .nrrd/.nhdr (with --coord).
    #[arg(long, requires = "coord", conflicts_with_all = ["crop", "manifest"])]
    pub volume: Option<PathBuf>,
    /// Nodule centre in LPS world mm, X,Y,Z (with --volume).
    #[arg(long, allow_hyphen_values = true, value_parser = super::planes::parse_coord, requires = "volume")]
    pub coord: Option<[f64; 3]>,
    /// Which series, when the DICOM folder holds several.
    #[arg(long, requires = "volume")]
    pub series_uid: Option<String>,
    /// A 100^3 1 mm HU crop, axes (z,y,x): .npy or the reference's .pt.
    #[arg(long, conflicts_with = "manifest")]
    pub crop: Option<PathBuf>,
    /// The reference's manifest CSV: pid,nodule_id,image_path,coordX,coordY,coordZ[,malignant].
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Also write the reference's result.csv columns (pid, nodule_id, raw_k, ensemble,
    /// calibrated_k, calibrated_ensemble[, malignant]) to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Patient id for the report (default: DICOM PatientID, else the input file's name).
    #[arg(long)]
    pub patient_id: Option<String>,
    /// Nodule id for the report (default: the input file's name without extension).
    #[arg(long)]
    pub nodule_id: Option<String>,
    /// Compute device and dtype.
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
}

fn stem(path: &std::path::Path) -> String {
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "nodule".into());
    name.trim_end_matches(".gz")
        .trim_end_matches(".nii")
        .trim_end_matches(".safetensors")
        .trim_end_matches(".npy")
        .trim_end_matches(".pt")
        .to_string()
}

impl Args {
    /// The nodule requests these arguments name.
    pub fn requests(&self) -> anyhow::Result<Vec<NoduleRequest>> {
        let mut requests = Vec::new();
        if let Some(path) = &self.planes {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "nodule".into());
            requests.push(NoduleRequest::Planes {
                path: path.clone(),
                patient_id: self.patient_id.clone().unwrap_or_else(|| stem.clone()),
                nodule_id: self.nodule_id.clone().unwrap_or_else(|| stem.clone()),
            });
        }
        if let (Some(path), Some(coord)) = (&self.volume, self.coord) {
            requests.push(NoduleRequest::Volume {
                path: path.clone(),
                series_uid: self.series_uid.clone(),
                patient_id: self.patient_id.clone(),
                nodules: vec![(self.nodule_id.clone().unwrap_or_else(|| stem(path)), coord)],
            });
        }
        if let Some(path) = &self.crop {
            requests.push(NoduleRequest::Crop {
                path: path.clone(),
                patient_id: self.patient_id.clone().unwrap_or_else(|| stem(path)),
                nodule_id: self.nodule_id.clone().unwrap_or_else(|| stem(path)),
            });
        }
        if let Some(path) = &self.manifest {
            requests.push(NoduleRequest::Manifest { path: path.clone() });
        }
        if requests.is_empty() {
            anyhow::bail!(
                "nothing to score: give --planes, --volume with --coord, --crop or --manifest"
            );
        }
        Ok(requests)
    }
}

/// Runs `noduled score`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let requests = args.requests()?;
    args.device.init()?;
    let mut nodules = Vec::new();
    for request in &requests {
        nodules.extend(crate::nodules::load(request)?);
    }
    let scorer = crate::engine::load(&args.model)?;
    let report = scorer.score(&nodules)?;
    if let Some(csv) = &args.csv {
        write_result_csv(&report, csv)?;
    }
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &report)?;
    writeln!(out)?;
    Ok(())
}

/// Writes the reference's result.csv: one row per nodule, `pid,nodule_id,raw_0..raw_{K-1},
/// ensemble,calibrated_0..calibrated_{K-1},calibrated_ensemble[,malignant]`, through
/// [`crate::table::write`] (atomic, quoted where needed).
pub fn write_result_csv(
    report: &crate::report::ScoreReport,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let k = report.nodules.first().map(|n| n.folds.len()).unwrap_or(0);
    let with_label = report.nodules.iter().any(|n| n.label.is_some());
    let mut header = vec!["pid".to_string(), "nodule_id".to_string()];
    header.extend((0..k).map(|i| format!("raw_{i}")));
    header.push("ensemble".into());
    header.extend((0..k).map(|i| format!("calibrated_{i}")));
    header.push("calibrated_ensemble".into());
    if with_label {
        header.push("malignant".into());
    }
    let rows: Vec<Vec<String>> = report
        .nodules
        .iter()
        .map(|n| {
            let mut row = vec![n.patient_id.clone(), n.nodule_id.clone()];
            row.extend(n.folds.iter().map(|f| f.prob.to_string()));
            row.push(n.score.raw.to_string());
            row.extend(n.folds.iter().map(|f| f.calibrated.to_string()));
            row.push(n.score.calibrated.to_string());
            if with_label {
                row.push(n.label.map(|l| l.to_string()).unwrap_or_default());
            }
            row
        })
        .collect();
    crate::table::write(path, &header, &rows)?;
    Ok(())
}
