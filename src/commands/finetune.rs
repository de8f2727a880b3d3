//! `noduled finetune`: trains a new model from a manifest (see [`crate::finetune`]) and
//! writes it as a bundle, refusing (exit 2, nothing written to `--out`) when the
//! gate finds it worse than the current model by more than `--gate-margin` AUROC on held-out
//! test patients, or when they are too few to decide on (see [`crate::finetune::gate`]).

use crate::device::{DeviceRequest, DtypeRequest};
use crate::finetune::{self, params::Tuning, train::TrainOptions, FinetuneOptions};
use std::path::PathBuf;

/// Arguments of `noduled finetune`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Manifest CSV: pid,nodule_id,image_path,coordX,coordY,coordZ,malignant [+ semantic
    /// columns of sample_csv_with_semantic_feats.csv] [+ report].
    #[arg(long)]
    pub manifest: PathBuf,
    /// The current model (bundle, model store or checkpoint folder); required for lora and
    /// probe; with full (and no --config), training continues from its weights. The gate
    /// compares against it.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tower sizes (config.json): --tuning full from random weights of these sizes.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output bundle directory of the new model (must not exist); install it with
    /// `noduled bundle install`.
    #[arg(long)]
    pub out: PathBuf,
    /// Precision of the output bundle's vision base weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: crate::convert::Precision,
    /// Work folder for per-epoch checkpoints; a rerun with the same folder resumes.
    /// Default: `<out>.work`.
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// Patient-level folds.
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Maximum epochs per fold.
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// lora, probe or full.
    #[arg(long, default_value = "lora")]
    pub tuning: Tuning,
    /// Nodules per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Learning-rate multiplier of the heads (MIL, classifiers, text head, logit scale).
    #[arg(long, default_value_t = 1.0)]
    pub head_lr_mult: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Early-stopping patience in epochs.
    #[arg(long, default_value_t = 5)]
    pub patience: usize,
    /// Skip the training augmentations.
    #[arg(long)]
    pub no_augment: bool,
    /// Draw training nodules uniformly instead of with the reference's semantic sampler
    /// (which favours rare semantic classes; without semantic columns it is uniform anyway).
    #[arg(long)]
    pub uniform_sampler: bool,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Refuse when the new AUROC is below the current one minus this (default 0.02). Given
    /// explicitly, the gate also decides on fewer than 30 test patients / 5 with a
    /// malignant nodule (otherwise it refuses to decide).
    #[arg(long)]
    pub gate_margin: Option<f64>,
    /// Training device: auto (CUDA device 0 when built with CUDA and a GPU answers, else the
    /// CPU, said on stderr), cpu, cuda or cuda:N (an error when not available). Training
    /// computes in f32 on either.
    #[arg(long, default_value = "auto", value_parser = crate::device::parse_device)]
    pub device: DeviceRequest,
    /// Exit (code 3) after this many epochs (testing of kill and resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

/// Runs `noduled finetune`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.epochs == 0 || args.batch == 0 {
        anyhow::bail!("--epochs and --batch must be positive");
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        anyhow::bail!("--lr must be a positive number");
    }
    if !(args.head_lr_mult > 0.0 && args.head_lr_mult.is_finite()) {
        anyhow::bail!("--head-lr-mult must be a positive number");
    }
    if args.gate_margin.is_some_and(|m| !m.is_finite()) {
        anyhow::bail!("--gate-margin must be a finite number");
    }
    let work = args.work.clone().unwrap_or_else(|| {
        let mut w = args.out.clone().into_os_string();
        w.push(".work");
        PathBuf::from(w)
    });
    let placement = crate::device::select(args.device, DtypeRequest::F32)?;
    if let Some(reason) = &placement.fallback {
        eprintln!("finetune: training on the CPU: {reason}");
    }
    let opts = FinetuneOptions {
        manifest: args.manifest,
        model: args.model,
        config: args.config,
        out: args.out,
        precision: args.precision,
        work,
        folds: args.folds,
        tuning: args.tuning,
        gate_margin: args.gate_margin,
        train: TrainOptions {
            epochs: args.epochs,
            batch: args.batch,
            lr: args.lr,
            head_lr_mult: args.head_lr_mult,
            weight_decay: args.weight_decay,
            patience: args.patience.max(1),
            augment: !args.no_augment,
            semantic_sampler: !args.uniform_sampler,
            seed: args.seed,
            device: placement.device,
            stop_after: args.stop_after,
        },
    };
    let report = finetune::run(&opts)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
