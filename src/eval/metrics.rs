//! Discrimination and calibration metrics for binary malignancy scores, with the semantics of
//! scikit-learn (checked against it in tests/it/eval.rs on fixed inputs):
//!
//! - [`roc_auc`]: area under the ROC curve from ranks (Mann-Whitney U with tied scores given
//!   their average rank), equal to `roc_auc_score`.
//! - [`average_precision`]: `average_precision_score`, the step-wise AUPRC
//!   `sum_k (R_k - R_{k-1}) P_k` over distinct thresholds (no interpolation).
//! - [`roc_curve`], [`pr_curve`]: one point per distinct score, thresholds descending
//!   (`roc_curve(drop_intermediate=False)`, `precision_recall_curve`); a sample is called
//!   positive when `score >= threshold`.
//! - [`operating_points`]: the distinct threshold whose recall is closest to each target
//!   (ties to the higher threshold, i.e. the first met going down).
//! - [`brier`], [`reliability`]: `brier_score_loss`; `calibration_curve(strategy="uniform")`
//!   bins, right-closed (`(lo, hi]`, the first also holding 0) as numpy's `searchsorted`
//!   puts them, with empty bins kept.
//! - [`ovr_weighted_auroc`]: `roc_auc_score(multi_class="ovr", average="weighted")`: per class,
//!   the AUROC of that class against the rest using that class's probability, weighted by
//!   the class's count; classes absent from the truth carry weight 0 and are skipped.
//! - [`percentile`]: numpy's default (linear) percentile.
//!
//! Labels are `bool` (true = malignant / the class); scores are any finite reals for the
//! ranking metrics and probabilities in [0, 1] for the calibration ones.

use serde::Serialize;

/// Why a metric could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MetricError {
    /// No samples at all.
    #[error("{metric}: no samples")]
    Empty {
        /// The metric asked for.
        metric: &'static str,
    },
    /// Labels and scores differ in length.
    #[error("{metric}: {labels} labels but {scores} scores")]
    LengthMismatch {
        /// The metric asked for.
        metric: &'static str,
        /// Number of labels.
        labels: usize,
        /// Number of scores.
        scores: usize,
    },
    /// Only one class is present, so the metric is undefined.
    #[error("{metric} is undefined with one class: {positives} positive of {n} samples")]
    OneClass {
        /// The metric asked for.
        metric: &'static str,
        /// Number of samples.
        n: usize,
        /// Number of positives.
        positives: usize,
    },
    /// A score is NaN or infinite.
    #[error("{metric}: score #{index} is not finite ({value})")]
    NonFinite {
        /// The metric asked for.
        metric: &'static str,
        /// 0-based sample index.
        index: usize,
        /// The value.
        value: f64,
    },
    /// A probability lies outside [0, 1].
    #[error("{metric}: score #{index} = {value} is not a probability in [0, 1]")]
    NotProbability {
        /// The metric asked for.
        metric: &'static str,
        /// 0-based sample index.
        index: usize,
        /// The value.
        value: f64,
    },
    /// A multi-class input is malformed (class index out of range, ragged rows).
    #[error("{metric}: {message}")]
    BadMulticlass {
        /// The metric asked for.
        metric: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Checks lengths and finiteness; returns the number of positives.
fn check(metric: &'static str, labels: &[bool], scores: &[f64]) -> Result<usize, MetricError> {
    if labels.len() != scores.len() {
        return Err(MetricError::LengthMismatch {
            metric,
            labels: labels.len(),
            scores: scores.len(),
        });
    }
    if labels.is_empty() {
        return Err(MetricError::Empty { metric });
    }
    if let Some((index, &value)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        return Err(MetricError::NonFinite {
            metric,
            index,
            value,
        });
    }
    Ok(labels.iter().filter(|&&y| y).count())
}

/// As [`check`], and requires both classes.
fn check_two_classes(
    metric: &'static str,
    labels: &[bool],
    scores: &[f64],
) -> Result<usize, MetricError> {
    let positives = check(metric, labels, scores)?;
    if positives == 0 || positives == labels.len() {
        return Err(MetricError::OneClass {
            metric,
            n: labels.len(),
            positives,
        });
    }
    Ok(positives)
}

/// As [`check`], and requires every score in [0, 1].
fn check_probabilities(
    metric: &'static str,
    labels: &[bool],
    scores: &[f64],
) -> Result<usize, MetricError> {
    let positives = check(metric, labels, scores)?;
    if let Some((index, &value)) = scores
        .iter()
        .enumerate()
        .find(|(_, s)| !(0.0..=1.0).contains(*s))
    {
        return Err(MetricError::NotProbability {
            metric,
            index,
            value,
        });
    }
    Ok(positives)
}

/// Area under the ROC curve. Errors on one class, empty or non-finite input.
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> Result<f64, MetricError> {
    let positives = check_two_classes("AUROC", labels, scores)?;
    Ok(auc_unchecked(labels, scores, positives))
}

/// AUROC of validated input (both classes present, finite scores).
fn auc_unchecked(labels: &[bool], scores: &[f64], positives: usize) -> f64 {
    let n = labels.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        let tied_positives = order[i..=j].iter().filter(|&&k| labels[k]).count();
        rank_sum += mean_rank * tied_positives as f64;
        i = j + 1;
    }
    let p = positives as f64;
    let q = (n - positives) as f64;
    (rank_sum - p * (p + 1.0) / 2.0) / (p * q)
}

/// Cumulative true and false positives at one distinct threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cumulative {
    threshold: f64,
    tp: usize,
    fp: usize,
}

/// One [`Cumulative`] per distinct score, thresholds descending.
fn cumulative(labels: &[bool], scores: &[f64]) -> Vec<Cumulative> {
    let mut order: Vec<usize> = (0..labels.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut out: Vec<Cumulative> = Vec::new();
    let (mut tp, mut fp) = (0, 0);
    for (k, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_tie = k + 1 == order.len() || scores[order[k + 1]] != scores[i];
        if last_of_tie {
            out.push(Cumulative {
                threshold: scores[i],
                tp,
                fp,
            });
        }
    }
    out
}

/// A point of the ROC curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RocPoint {
    /// Samples with `score >= threshold` are called positive.
    pub threshold: f64,
    /// False-positive rate.
    pub fpr: f64,
    /// True-positive rate (recall).
    pub tpr: f64,
}

/// The ROC curve, one point per distinct score, thresholds descending (the implicit
/// (0, 0) start at an infinite threshold is not listed).
pub fn roc_curve(labels: &[bool], scores: &[f64]) -> Result<Vec<RocPoint>, MetricError> {
    let positives = check_two_classes("ROC curve", labels, scores)?;
    let (p, q) = (positives as f64, (labels.len() - positives) as f64);
    Ok(cumulative(labels, scores)
        .into_iter()
        .map(|c| RocPoint {
            threshold: c.threshold,
            fpr: c.fp as f64 / q,
            tpr: c.tp as f64 / p,
        })
        .collect())
}

/// A point of the precision-recall curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PrPoint {
    /// Samples with `score >= threshold` are called positive.
    pub threshold: f64,
    /// Recall (true-positive rate).
    pub recall: f64,
    /// Precision (positive predictive value).
    pub precision: f64,
}

/// The precision-recall curve, one point per distinct score, thresholds descending (the
/// conventional (recall 0, precision 1) end point is not listed). Needs a positive.
pub fn pr_curve(labels: &[bool], scores: &[f64]) -> Result<Vec<PrPoint>, MetricError> {
    let positives = check("PR curve", labels, scores)?;
    if positives == 0 {
        return Err(MetricError::OneClass {
            metric: "PR curve",
            n: labels.len(),
            positives,
        });
    }
    let p = positives as f64;
    Ok(cumulative(labels, scores)
        .into_iter()
        .map(|c| PrPoint {
            threshold: c.threshold,
            recall: c.tp as f64 / p,
            precision: c.tp as f64 / (c.tp + c.fp) as f64,
        })
        .collect())
}

/// Average precision (AUPRC, step-wise). Needs at least one positive.
pub fn average_precision(labels: &[bool], scores: &[f64]) -> Result<f64, MetricError> {
    let curve = pr_curve(labels, scores).map_err(|e| match e {
        MetricError::OneClass { n, positives, .. } => MetricError::OneClass {
            metric: "average precision",
            n,
            positives,
        },
        other => other,
    })?;
    let mut ap = 0.0;
    let mut previous_recall = 0.0;
    for point in curve {
        ap += (point.recall - previous_recall) * point.precision;
        previous_recall = point.recall;
    }
    Ok(ap)
}

/// The operating point chosen for one target recall.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OperatingPoint {
    /// The recall asked for.
    pub target_recall: f64,
    /// The threshold chosen (`score >= threshold` is positive).
    pub threshold: f64,
    /// Recall at that threshold.
    pub recall: f64,
    /// False-positive rate at that threshold.
    pub fpr: f64,
    /// Precision at that threshold.
    pub precision: f64,
}

/// For each target recall, the distinct threshold whose recall is closest to it (ties to the
/// higher threshold).
pub fn operating_points(
    labels: &[bool],
    scores: &[f64],
    targets: &[f64],
) -> Result<Vec<OperatingPoint>, MetricError> {
    let positives = check_two_classes("operating points", labels, scores)?;
    let (p, q) = (positives as f64, (labels.len() - positives) as f64);
    let curve = cumulative(labels, scores);
    Ok(targets
        .iter()
        .map(|&target| {
            let mut best = curve[0];
            for c in &curve[1..] {
                if (c.tp as f64 / p - target).abs() < (best.tp as f64 / p - target).abs() {
                    best = *c;
                }
            }
            OperatingPoint {
                target_recall: target,
                threshold: best.threshold,
                recall: best.tp as f64 / p,
                fpr: best.fp as f64 / q,
                precision: best.tp as f64 / (best.tp + best.fp) as f64,
            }
        })
        .collect())
}

/// Brier score: mean squared difference between probability and label.
pub fn brier(labels: &[bool], scores: &[f64]) -> Result<f64, MetricError> {
    check_probabilities("Brier score", labels, scores)?;
    let sum: f64 = labels
        .iter()
        .zip(scores)
        .map(|(&y, &s)| (s - if y { 1.0 } else { 0.0 }).powi(2))
        .sum();
    Ok(sum / labels.len() as f64)
}

/// One reliability-diagram bin.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReliabilityBin {
    /// Lower edge (exclusive, except 0 for the first bin).
    pub lower: f64,
    /// Upper edge (inclusive).
    pub upper: f64,
    /// Samples in the bin.
    pub count: usize,
    /// Mean predicted probability; None when empty.
    pub mean_predicted: Option<f64>,
    /// Fraction of positives; None when empty.
    pub observed_rate: Option<f64>,
}

/// `n_bins` equal-width reliability bins over [0, 1] (edges `i / n_bins` as numpy's linspace
/// computes them).
pub fn reliability(
    labels: &[bool],
    scores: &[f64],
    n_bins: usize,
) -> Result<Vec<ReliabilityBin>, MetricError> {
    check_probabilities("reliability", labels, scores)?;
    let n_bins = n_bins.max(1);
    let step = 1.0 / n_bins as f64;
    let edges: Vec<f64> = (0..=n_bins)
        .map(|i| if i == n_bins { 1.0 } else { i as f64 * step })
        .collect();
    let mut sums = vec![(0usize, 0.0f64, 0usize); n_bins];
    for (&y, &s) in labels.iter().zip(scores) {
        // Number of inner edges strictly below s (numpy searchsorted, side="left").
        let bin = edges[1..n_bins].iter().filter(|&&e| e < s).count();
        sums[bin].0 += 1;
        sums[bin].1 += s;
        sums[bin].2 += y as usize;
    }
    Ok(sums
        .into_iter()
        .enumerate()
        .map(|(i, (count, sum, pos))| ReliabilityBin {
            lower: edges[i],
            upper: edges[i + 1],
            count,
            mean_predicted: (count > 0).then(|| sum / count as f64),
            observed_rate: (count > 0).then(|| pos as f64 / count as f64),
        })
        .collect())
}

/// Weighted one-vs-rest AUROC of a multi-class prediction: `truth[i]` is the class index of
/// sample i, `probs[i][c]` its probability of class c. Needs two classes present.
pub fn ovr_weighted_auroc(truth: &[usize], probs: &[Vec<f64>]) -> Result<f64, MetricError> {
    let metric = "weighted one-vs-rest AUROC";
    if truth.len() != probs.len() {
        return Err(MetricError::LengthMismatch {
            metric,
            labels: truth.len(),
            scores: probs.len(),
        });
    }
    if truth.is_empty() {
        return Err(MetricError::Empty { metric });
    }
    let n_classes = probs[0].len();
    if let Some(i) = probs.iter().position(|row| row.len() != n_classes) {
        let message = format!(
            "sample #{i} has {} class probabilities, sample #0 has {n_classes}",
            probs[i].len()
        );
        return Err(MetricError::BadMulticlass { metric, message });
    }
    if let Some(i) = truth.iter().position(|&t| t >= n_classes) {
        let message = format!(
            "sample #{i} has class {} but there are {n_classes} classes",
            truth[i]
        );
        return Err(MetricError::BadMulticlass { metric, message });
    }
    let mut counts = vec![0usize; n_classes];
    for &t in truth {
        counts[t] += 1;
    }
    let present = counts.iter().filter(|&&c| c > 0).count();
    if present < 2 {
        return Err(MetricError::OneClass {
            metric,
            n: truth.len(),
            positives: truth.len(),
        });
    }
    let mut total = 0.0;
    for (class, &count) in counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let labels: Vec<bool> = truth.iter().map(|&t| t == class).collect();
        let scores: Vec<f64> = probs.iter().map(|row| row[class]).collect();
        total += roc_auc(&labels, &scores)? * count as f64;
    }
    Ok(total / truth.len() as f64)
}

/// numpy's default percentile (`q` in [0, 100], linear interpolation between order
/// statistics) of `values`, which it sorts. None when empty.
pub fn percentile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable_by(f64::total_cmp);
    let position = (values.len() - 1) as f64 * q.clamp(0.0, 100.0) / 100.0;
    let below = position.floor() as usize;
    let above = (below + 1).min(values.len() - 1);
    let fraction = position - below as f64;
    Some(values[below] + (values[above] - values[below]) * fraction)
}

/// AUROC and average precision of validated two-class input, for the bootstrap loop.
pub(crate) fn auc_and_ap_unchecked(labels: &[bool], scores: &[f64]) -> Option<(f64, f64)> {
    let positives = labels.iter().filter(|&&y| y).count();
    if positives == 0 || positives == labels.len() {
        return None;
    }
    let auc = auc_unchecked(labels, scores, positives);
    let ap = average_precision(labels, scores).ok()?;
    Some((auc, ap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_inverted_and_tied_rankings() {
        let y = [false, false, true, true];
        assert_eq!(roc_auc(&y, &[0.1, 0.2, 0.8, 0.9]).unwrap(), 1.0);
        assert_eq!(roc_auc(&y, &[0.9, 0.8, 0.2, 0.1]).unwrap(), 0.0);
        assert_eq!(roc_auc(&y, &[0.5; 4]).unwrap(), 0.5);
        assert_eq!(average_precision(&y, &[0.5; 4]).unwrap(), 0.5);
    }

    #[test]
    fn one_class_is_an_error_not_a_number() {
        let err = roc_auc(&[true, true], &[0.1, 0.2]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "AUROC is undefined with one class: 2 positive of 2 samples"
        );
        assert!(matches!(roc_auc(&[], &[]), Err(MetricError::Empty { .. })));
        assert!(matches!(
            roc_auc(&[true, false], &[f64::NAN, 0.1]),
            Err(MetricError::NonFinite { index: 0, .. })
        ));
        assert!(matches!(
            brier(&[true], &[1.5]),
            Err(MetricError::NotProbability { .. })
        ));
    }
}
