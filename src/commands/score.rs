//! `noduled score`: score nodules and print the score JSON.

use crate::nodules::NoduleRequest;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `noduled score`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model: a bundle directory, a model store (its `current` bundle) or a checkpoint folder
    /// (fold_k/best_both.pt + fold_k/calibration.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A safetensors file with tensor `planes01` [9,224,224] in [0,1].
    #[arg(long)]
    pub planes: Option<PathBuf>,
    /// Patient id for the report (default: the planes file's name without extension).
    #[arg(long)]
    pub patient_id: Option<String>,
    /// Nodule id for the report (default: the planes file's name without extension).
    #[arg(long)]
    pub nodule_id: Option<String>,
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
        if requests.is_empty() {
            anyhow::bail!("nothing to score: give --planes FILE.safetensors");
        }
        Ok(requests)
    }
}

/// Runs `noduled score`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let requests = args.requests()?;
    let mut nodules = Vec::new();
    for request in &requests {
        nodules.extend(crate::nodules::load(request)?);
    }
    let scorer = crate::engine::load(&args.model)?;
    let report = scorer.score(&nodules)?;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &report)?;
    writeln!(out)?;
    Ok(())
}
