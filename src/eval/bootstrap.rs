//! Percentile bootstrap confidence intervals for AUROC and average precision
//! ([`bootstrap`]), and for two models' AUROCs on the same nodules and their difference,
//! resampled together ([`paired_auroc`], used by the fine-tune gate).
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
    let units = resampling_units(labels.len(), groups);
    let draws: Vec<Option<(f64, f64)>> = resample_seeds(resamples, seed)
        .par_iter()
        .map(|&s| {
            let rows = draw(&units, s)?;
            let y: Vec<bool> = rows.iter().map(|&r| labels[r]).collect();
            let x: Vec<f64> = rows.iter().map(|&r| scores[r]).collect();
            auc_and_ap_unchecked(&y, &x)
        })
        .collect();
    let (mut aucs, mut aps): (Vec<f64>, Vec<f64>) = draws.iter().flatten().copied().unzip();
    let interval = |v: &mut Vec<f64>| interval(v, level);
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

/// AUROC intervals of two score sets on the same nodules and of their difference (`a - b`),
/// each resample drawing the same units for both.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairedAuroc {
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
    /// Interval of `a`'s AUROC; None when every resample was skipped.
    pub a: Option<Interval>,
    /// Interval of `b`'s AUROC.
    pub b: Option<Interval>,
    /// Interval of AUROC(a) - AUROC(b).
    pub difference: Option<Interval>,
}

/// Paired bootstrap of AUROC for scores `a` and `b` of the same rows (see [`bootstrap`] for
/// `groups`, determinism and validation).
pub fn paired_auroc(
    labels: &[bool],
    a: &[f64],
    b: &[f64],
    groups: Option<&[usize]>,
    resamples: usize,
    seed: u64,
    level: f64,
) -> PairedAuroc {
    let units = resampling_units(labels.len(), groups);
    let draws: Vec<Option<(f64, f64)>> = resample_seeds(resamples, seed)
        .par_iter()
        .map(|&s| {
            let rows = draw(&units, s)?;
            let y: Vec<bool> = rows.iter().map(|&r| labels[r]).collect();
            let auc = |v: &[f64]| {
                let x: Vec<f64> = rows.iter().map(|&r| v[r]).collect();
                auc_and_ap_unchecked(&y, &x).map(|(auc, _)| auc)
            };
            Some((auc(a)?, auc(b)?))
        })
        .collect();
    let (mut da, mut db): (Vec<f64>, Vec<f64>) = draws.iter().flatten().copied().unzip();
    let mut diff: Vec<f64> = da.iter().zip(&db).map(|(x, y)| x - y).collect();
    PairedAuroc {
        resamples,
        seed,
        level,
        unit: if groups.is_some() { "patient" } else { "row" },
        skipped_one_class: resamples - da.len(),
        a: interval(&mut da, level),
        b: interval(&mut db, level),
        difference: interval(&mut diff, level),
    }
}

/// The rows of each resampling unit: `groups[i]`'s patient, else each row alone.
fn resampling_units(rows: usize, groups: Option<&[usize]>) -> Vec<Vec<usize>> {
    match groups {
        Some(groups) => {
            let n_units = groups.iter().max().map_or(0, |m| m + 1);
            let mut units = vec![Vec::new(); n_units];
            for (row, &g) in groups.iter().enumerate() {
                units[g].push(row);
            }
            units.retain(|u| !u.is_empty());
            units
        }
        None => (0..rows).map(|i| vec![i]).collect(),
    }
}

/// One seed per resample, from a SplitMix64 seeded with `seed`.
fn resample_seeds(resamples: usize, seed: u64) -> Vec<u64> {
    let mut master = SplitMix64::new(seed);
    (0..resamples).map(|_| master.next_u64()).collect()
}

/// The rows of one resample: as many units as there are, drawn with replacement.
fn draw(units: &[Vec<usize>], seed: u64) -> Option<Vec<usize>> {
    if units.is_empty() {
        return None;
    }
    let mut rng = SplitMix64::new(seed);
    let mut rows = Vec::new();
    for _ in 0..units.len() {
        rows.extend(&units[rng.below(units.len())]);
    }
    Some(rows)
}

/// The central `level` percentile interval of `values` (None when empty).
fn interval(values: &mut [f64], level: f64) -> Option<Interval> {
    Some(Interval {
        lower: percentile(values, 100.0 * (1.0 - level) / 2.0)?,
        upper: percentile(values, 100.0 * (1.0 + level) / 2.0)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paired intervals agree with the single-score bootstrap on the same draws, and a
    /// model compared with itself differs by exactly zero in every resample.
    #[test]
    fn paired_matches_single_and_self_difference_is_zero() {
        let labels: Vec<bool> = (0..40).map(|i| i % 3 == 0).collect();
        let a: Vec<f64> = (0..40)
            .map(|i| ((i * 37) % 41) as f64 + if i % 3 == 0 { 9.0 } else { 0.0 })
            .collect();
        let groups: Vec<usize> = (0..40).map(|i| i / 2).collect();
        let single = bootstrap(&labels, &a, Some(&groups), 300, 5, 0.95);
        let paired = paired_auroc(&labels, &a, &a, Some(&groups), 300, 5, 0.95);
        assert_eq!(paired.a, single.auroc);
        assert_eq!(paired.b, single.auroc);
        assert_eq!(
            paired.difference,
            Some(Interval {
                lower: 0.0,
                upper: 0.0
            })
        );
        assert_eq!(paired.skipped_one_class, single.skipped_one_class);
    }
}
