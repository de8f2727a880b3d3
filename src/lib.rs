//! noduled: scores lung nodules for malignancy with the published CLIP nodule model
//! (a LoRA-tuned CLIP ViT-B/32, attention-MIL over nine planes, five folds with beta
//! calibration, zero-shot semantic descriptors), beside a CT scanner.
//!
//! # Layout
//! Every module, in the order data flows through them, in four groups. The scoring path
//! and the daemon (groups 1-3) never name the offline group (4) nor `commands`: test
//! `layout::scoring_and_daemon_never_name_training_eval_or_synth` scans `src/` for it.
//!
//! 1. Shared ground (names nothing else in the crate):
//!    - [`fsutil`]: atomic, durable file writes and moves (outbox, ledger, DICOM store, PACS queue).
//!    - [`confine`]: every file a job names opened inside the data roots (openat2 beneath a root).
//!    - [`table`]: the one CSV reader and writer (manifests, score files, LIDC ratings).
//!    - [`rng`]: the one seedable random generator (SplitMix64).
//! 2. Scoring path, volume -> preprocess -> model -> report:
//!    - [`volume`]: CT readers (DICOM series, NIfTI, NRRD) into one `Volume` (HU, f32), and
//!      100^3 crop files (`.npy`, `.pt`).
//!    - [`preprocess`]: 1 mm resample, LPS 100^3 crop at a world point, HU window, the nine planes.
//!    - [`nodule`]: the unit between preprocessing and the model: one nodule's nine planes
//!      ([`nodule::Planes01`], [`nodule::NoduleInput`]).
//!    - [`nodules`]: what a request names (planes file, volume + coordinate, crop, manifest)
//!      turned into `NoduleInput`s.
//!    - [`model`]: the CLIP towers with per-fold LoRA, MIL, heads, checkpoint reading.
//!    - [`calibration`]: beta calibration of fold probabilities.
//!    - [`semantics`]: the zero-shot descriptor vocabulary (features, classes, report text).
//!    - [`report`]: the score JSON every consumer reads (with its summary sentence).
//!    - [`device`]: the compute device and dtype (`--device auto|cpu|cuda[:N]`), chosen once.
//!    - [`convert`]: released checkpoints into a model bundle ([`bundle`]: manifest, signatures,
//!      the model store; models/README.md).
//!    - [`engine`]: a loaded model behind the [`engine::Scorer`] trait, used by the CLI and daemon.
//! 3. Daemon:
//!    - [`config`]: the daemon's strict TOML configuration, validated into `Settings`.
//!    - [`mqtt_tls`]: MQTT transport security (rustls client, password file, no plaintext
//!      off loopback).
//!    - [`dicom`]: DICOM in and out: series checks, the SR of a result, UIDs, `[dicom]` keys.
//!    - [`daemon`]: a one-way pipeline: inputs (inbox, MQTT) -> bounded job channel -> worker
//!      (per-job deadline, durable attempts) -> output stage (durable outbox, MQTT out);
//!      systemd, health.
//! 4. Offline (training, evaluation, synthetic data; may use groups 1-2):
//!    - [`synth`]: synthetic chest CTs or crops with known nodules and a manifest.
//!    - [`eval`]: metrics with bootstrap intervals, plots, from score files.
//!    - [`finetune`]: site fine-tuning (patient splits, training, calibration, the gate).
//!
//! [`commands`]: one module per CLI subcommand over all of the above; `main.rs` only parses
//! and dispatches.
//!
//! Module groups in one crate, not a workspace of crates: a crate per group would make the
//! rule above a compile error rather than a test, but splitting the crate moves every file
//! and every `crate::` path while several branches edit them, and the groups share one
//! error style and one test binary; the source-scan test enforces the same direction.
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
