//! `noduled synth`: writes synthetic chest CT volumes (or 100^3 crops) of nodules with known
//! semantics and a malignancy label from a documented risk rule (drawn, or the rule itself), plus manifest.csv
//! (see [`crate::synth`]).

use std::path::PathBuf;

/// Arguments of `noduled synth`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output folder (volumes/ or crops/ and manifest.csv are written into it).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of cases (one nodule each).
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// Seed; the same seed gives the same files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write 100^3 float32 .npy crops at 1 mm instead of NIfTI volumes.
    #[arg(long)]
    pub crops: bool,
    /// `drawn`: malignant ~ Bernoulli(risk rule + noise); `rule`: malignant = noise-free
    /// rule logit > -1.5 (deterministic; see the synth module doc).
    #[arg(long, default_value = "drawn")]
    pub label: crate::synth::Labeling,
    /// Whose risk rule sets the labels: `screening` (the documented rule) or `subsolid`
    /// (subsolid nodules carry most of the risk); the images are the same in both.
    #[arg(long, default_value = "screening")]
    pub population: crate::synth::Population,
}

/// Runs `noduled synth`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let summary = crate::synth::generate(
        &args.out,
        args.n,
        args.seed,
        args.crops,
        args.label,
        args.population,
    )?;
    println!(
        "{} cases ({} malignant), manifest {}",
        summary.cases,
        summary.malignant,
        summary.manifest.display()
    );
    Ok(())
}
