//! Patient-level splits: every nodule of a patient lands in the same part. Patients (sorted
//! by id) are stratified by whether any of their nodules is malignant, shuffled with the seed
//! (Fisher-Yates on SplitMix64) and dealt round-robin to the folds ([`patient_folds`]).
//!
//! The fine-tune gate must not be scored on patients that chose the epoch or fitted the
//! calibrator, so [`train_val_test`] nests two of these splits: outer fold k's patients are
//! its **test** set (scored only by the gate); the other patients are split again, into
//! max(K-1, 2) inner folds with a seed of their own, and inner fold 0 is the **validation**
//! set (early stopping, calibration), the rest **training**. For K >= 3 the three parts are
//! about 1/K, 1/K and (K-2)/K of the patients (for K = 2: 1/2, 1/4, 1/4). Every patient is
//! in exactly one test set, so the pooled test sets are all patients, each scored by the one
//! fold model that never saw it. Nested K-fold proper (K inner models per outer fold) would
//! cost K times the training, too much for a fine-tune on the device; the price of this
//! scheme is one fold's worth less training data per model.

use super::FinetuneError;
use crate::rng::SplitMix64;
use std::collections::BTreeMap;

/// One fold: (training indices, validation indices).
pub type Split = (Vec<usize>, Vec<usize>);

/// One outer fold of [`train_val_test`]: indices into the nodules, manifest order.
#[derive(Debug, Clone, PartialEq)]
pub struct Parts {
    /// Trained on.
    pub train: Vec<usize>,
    /// Early stopping and calibration.
    pub val: Vec<usize>,
    /// Held out for the gate only.
    pub test: Vec<usize>,
}

/// Per outer fold the (train, validation, test) parts of `nodules` (pid, malignant); see
/// the module doc.
pub fn train_val_test(
    nodules: &[(String, bool)],
    k: usize,
    seed: u64,
) -> Result<Vec<Parts>, FinetuneError> {
    let outer = patient_folds(nodules, k, seed)?;
    let inner_k = (k - 1).max(2);
    outer
        .into_iter()
        .enumerate()
        .map(|(f, (rest, test))| {
            let sub: Vec<(String, bool)> = rest.iter().map(|&i| nodules[i].clone()).collect();
            let inner = patient_folds(&sub, inner_k, SplitMix64::nth(seed, 500 + f as u64))
                .map_err(|_| {
                    FinetuneError::Data(format!(
                        "--folds {k}: fold {f} leaves too few patients for a training and a validation part; use fewer folds or more data"
                    ))
                })?;
            let (tr, va) = &inner[0];
            Ok(Parts {
                train: tr.iter().map(|&j| rest[j]).collect(),
                val: va.iter().map(|&j| rest[j]).collect(),
                test,
            })
        })
        .collect()
}

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

    /// The three parts never share a patient, and each patient is tested exactly once.
    #[test]
    fn train_val_test_keep_patients_apart() {
        let nodules: Vec<(String, bool)> = (0..60)
            .map(|i| (format!("P{}", i / 3), i % 7 == 0))
            .collect();
        for k in [2, 3, 5] {
            let parts = train_val_test(&nodules, k, 4).unwrap();
            let mut tested = vec![0; nodules.len()];
            for p in &parts {
                let pids = |v: &[usize]| -> std::collections::BTreeSet<String> {
                    v.iter().map(|&i| nodules[i].0.clone()).collect()
                };
                let (tr, va, te) = (pids(&p.train), pids(&p.val), pids(&p.test));
                assert!(tr.is_disjoint(&va) && tr.is_disjoint(&te) && va.is_disjoint(&te));
                assert_eq!(p.train.len() + p.val.len() + p.test.len(), nodules.len());
                assert!(p.val.iter().any(|&i| nodules[i].1), "k={k}");
                p.test.iter().for_each(|&i| tested[i] += 1);
            }
            assert!(tested.iter().all(|&t| t == 1), "k={k}");
        }
    }
}
