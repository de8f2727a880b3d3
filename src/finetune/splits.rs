//! Patient-level K-fold splits: every nodule of a patient lands in the same fold. Patients
//! (sorted by id) are stratified by whether any of their nodules is malignant, shuffled with
//! the seed (Fisher-Yates on SplitMix64) and dealt round-robin to the folds; fold k's
//! validation set is its patients' nodules, its training set the rest (manifest order).

use super::FinetuneError;
use crate::rng::SplitMix64;
use std::collections::BTreeMap;

/// One fold: (training indices, validation indices).
pub type Split = (Vec<usize>, Vec<usize>);

/// Per fold (train indices, validation indices) into `nodules` (pid, malignant).
pub fn patient_folds(
    nodules: &[(String, bool)],
    k: usize,
    seed: u64,
) -> Result<Vec<Split>, FinetuneError> {
    let mut patients: BTreeMap<&str, bool> = BTreeMap::new();
    for (pid, label) in nodules {
        *patients.entry(pid.as_str()).or_insert(false) |= *label;
    }
    if k < 2 || k > patients.len() {
        return Err(FinetuneError::Data(format!(
            "--folds {k}: needs 2..={} (the number of patients)",
            patients.len()
        )));
    }
    let mut rng = SplitMix64::new(seed);
    let mut fold_of: BTreeMap<&str, usize> = BTreeMap::new();
    let mut next = 0;
    for class in [true, false] {
        let mut group: Vec<&str> = patients
            .iter()
            .filter(|(_, &l)| l == class)
            .map(|(p, _)| *p)
            .collect();
        for i in (1..group.len()).rev() {
            group.swap(i, rng.below(i + 1));
        }
        for p in group {
            fold_of.insert(p, next % k);
            next += 1;
        }
    }
    Ok((0..k)
        .map(|f| {
            let (va, tr): (Vec<usize>, Vec<usize>) =
                (0..nodules.len()).partition(|&i| fold_of[nodules[i].0.as_str()] == f);
            (tr, va)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patients_never_straddle_folds_and_classes_spread() {
        let nodules: Vec<(String, bool)> = (0..40)
            .map(|i| (format!("P{}", i / 2), i % 10 == 0))
            .collect();
        let folds = patient_folds(&nodules, 4, 9).unwrap();
        let mut seen = vec![0; nodules.len()];
        for (tr, va) in &folds {
            for &i in va {
                seen[i] += 1;
                assert!(tr.iter().all(|&j| nodules[j].0 != nodules[i].0));
            }
            assert!(va.iter().any(|&i| nodules[i].1));
        }
        assert!(seen.iter().all(|&s| s == 1));
    }
}
