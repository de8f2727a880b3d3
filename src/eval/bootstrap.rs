//! Percentile bootstrap confidence intervals for AUROC and average precision.
//!
//! Resampling unit: patients when patient ids are given (all of a drawn patient's nodules
//! enter the resample together, as often as the patient is drawn), else rows. A resample
//! with one class has no AUROC; it is skipped and counted. The interval is the
//! `(1 - level)/2` and `(1 + level)/2` numpy percentiles of the kept resamples.
//!
//! Determinism: resample `i` draws from its own [`SplitMix64`] stream, seeded by the i-th
//! output of a SplitMix64 seeded with the user's seed, so the result depends on the seed and
//! the input only, not on thread count or scheduling (resamples run in parallel on rayon).

use rayon::prelude::*;
use serde::Serialize;

use super::metrics::{auc_and_ap_unchecked, percentile};
use crate::rng::SplitMix64;

/// A two-sided interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    /// Lower bound.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
}

/// Bootstrap intervals and how they were obtained.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BootstrapResult {
    /// Resamples drawn.
    pub resamples: usize,
    /// Seed of the generator.
    pub seed: u64,
    /// Confidence level, e.g. 0.95.
    pub level: f64,
    /// "patient" or "row".
    pub unit: &'static str,
    /// Resamples skipped because they held one class only.
    pub skipped_one_class: usize,
    /// AUROC interval; None when every resample was skipped.
    pub auroc: Option<Interval>,
    /// Average-precision interval; None when every resample was skipped.
    pub average_precision: Option<Interval>,
}

/// Bootstraps AUROC and AP. `groups[i]` is the resampling unit (patient index, dense from 0)
/// of row i, or None to resample rows. Inputs must already be validated (equal lengths,
/// finite scores).
pub fn bootstrap(
    labels: &[bool],
    scores: &[f64],
    groups: Option<&[usize]>,
    resamples: usize,
    seed: u64,
    level: f64,
) -> BootstrapResult {
    let units: Vec<Vec<usize>> = match groups {
        Some(groups) => {
            let n_units = groups.iter().max().map_or(0, |m| m + 1);
            let mut units = vec![Vec::new(); n_units];
            for (row, &g) in groups.iter().enumerate() {
                units[g].push(row);
            }
            units.retain(|u| !u.is_empty());
            units
        }
        None => (0..labels.len()).map(|i| vec![i]).collect(),
    };
    let mut master = SplitMix64::new(seed);
    let seeds: Vec<u64> = (0..resamples).map(|_| master.next_u64()).collect();
    let draws: Vec<Option<(f64, f64)>> = seeds
        .par_iter()
        .map(|&s| {
            if units.is_empty() {
                return None;
            }
            let mut rng = SplitMix64::new(s);
            let mut y = Vec::with_capacity(labels.len());
            let mut x = Vec::with_capacity(labels.len());
            for _ in 0..units.len() {
                for &row in &units[rng.below(units.len())] {
                    y.push(labels[row]);
                    x.push(scores[row]);
                }
            }
            auc_and_ap_unchecked(&y, &x)
        })
        .collect();
    let (mut aucs, mut aps): (Vec<f64>, Vec<f64>) = draws.iter().flatten().copied().unzip();
    let lo = 100.0 * (1.0 - level) / 2.0;
    let hi = 100.0 * (1.0 + level) / 2.0;
    let interval = |v: &mut Vec<f64>| {
        Some(Interval {
            lower: percentile(v, lo)?,
            upper: percentile(v, hi)?,
        })
    };
    BootstrapResult {
        resamples,
        seed,
        level,
        unit: if groups.is_some() { "patient" } else { "row" },
        skipped_one_class: resamples - aucs.len(),
        auroc: interval(&mut aucs),
        average_precision: interval(&mut aps),
    }
}
