//! noduled: scores lung nodules for malignancy with the published CLIP nodule model
//! (a LoRA-tuned CLIP ViT-B/32, attention-MIL over nine planes, five folds with beta
//! calibration, zero-shot semantic descriptors), beside a CT scanner.
//!
//! # Layout
//! Data flows one way, top to bottom:
//!
//! - [`fsutil`]: atomic, durable file writes and moves (outbox, ledger, DICOM store, PACS queue).
//! - [`confine`]: every file a job names opened inside the data roots (openat2 beneath a root).
//! - [`volume`]: CT readers (DICOM series, NIfTI, NRRD, crop files) into one `Volume` (HU, f32).
//! - [`preprocess`]: 1 mm resample, LPS 100^3 crop at a world point, HU window, the nine planes.
//! - [`nodules`]: what a request names (planes file, volume + coordinate, crop, manifest)
//!   turned into [`nodule::NoduleInput`]s.
//! - [`model`]: the CLIP towers with per-fold LoRA, MIL, heads, checkpoint reading.
//! - [`calibration`]: beta calibration of fold probabilities.
//! - [`report`]: the score JSON every consumer reads (with its summary sentence).
//! - [`dicom`]: DICOM in and out: series checks, the SR of a result, UIDs, `[dicom]` keys.
//! - [`convert`]: released checkpoints into a model bundle ([`bundle`]: manifest, signatures,
//!   the model store; models/README.md).
//! - [`device`]: the compute device and dtype (`--device auto|cpu|cuda[:N]`), chosen once.
//! - [`engine`]: a loaded model behind the [`engine::Scorer`] trait, used by the CLI and daemon.
//! - [`config`]: the daemon's strict TOML configuration, validated into `Settings`.
//! - [`daemon`]: a one-way pipeline: inputs (inbox, MQTT) -> bounded job channel -> worker
//!   (per-job deadline, durable attempts) -> output stage (durable outbox, MQTT out); systemd, health.
//! - [`commands`]: one module per CLI subcommand; `main.rs` only parses and dispatches.
#![deny(missing_docs)]

pub mod bundle;
pub mod calibration;
pub mod commands;
pub mod config;
pub mod confine;
pub mod convert;
pub mod daemon;
pub mod device;
pub mod dicom;
pub mod engine;
pub mod eval;
pub mod finetune;
pub mod fsutil;
pub mod model;
pub mod mqtt_tls;
pub mod nodule;
pub mod nodules;
pub mod preprocess;
pub mod report;
pub mod rng;
pub mod semantics;
pub mod synth;
pub mod table;
pub mod volume;
