//! Beta calibration (Kull et al. 2017, betacal's "abm" parameterisation) of one fold's
//! malignancy probability: `sigmoid(a ln s - b ln(1 - s) + c)` with `s` clipped to
//! `[eps, 1 - eps]`; a term whose coefficient is exactly 0 is dropped (as betacal does).
//! [`fit`] fits one on a fold's validation predictions (betacal's fitting rule).

use serde::{Deserialize, Serialize};

/// One fold's fitted beta calibrator.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct BetaCalibration {
    /// Coefficient of ln(s).
    pub a: f64,
    /// Coefficient of -ln(1 - s).
    pub b: f64,
    /// Intercept.
    pub c: f64,
    /// Clip epsilon for s.
    pub clip_eps: f64,
}

impl BetaCalibration {
    /// Calibrates probability `s`.
    pub fn apply(&self, s: f64) -> f64 {
        let s = s.clamp(self.clip_eps, 1.0 - self.clip_eps);
        let mut z = self.c;
        if self.a != 0.0 {
            z += self.a * s.ln();
        }
        if self.b != 0.0 {
            z -= self.b * (1.0 - s).ln();
        }
        1.0 / (1.0 + (-z).exp())
    }
}

/// Inverse L2 strength betacal 1.1.0 passes to scikit-learn's `LogisticRegression`
/// (`C=99999999999`: practically unpenalised; the intercept is never penalised).
pub const BETACAL_C: f64 = 99_999_999_999.0;

/// Why a calibrator could not be fitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CalibrationError {
    /// Scores and labels differ in length.
    #[error("beta calibration fit: {scores} scores but {labels} labels")]
    LengthMismatch {
        /// Number of scores.
        scores: usize,
        /// Number of labels.
        labels: usize,
    },
    /// Both classes are needed.
    #[error("beta calibration fit needs both classes: {positives} positive of {n} validation predictions")]
    OneClass {
        /// Number of predictions.
        n: usize,
        /// Number of positives.
        positives: usize,
    },
    /// A score is not a probability.
    #[error("beta calibration fit: score #{index} = {value} is not a probability in [0, 1]")]
    NotProbability {
        /// 0-based index.
        index: usize,
        /// The value.
        value: f64,
    },
}

/// Fits a beta calibrator (betacal 1.1.0, `parameters="abm"`) on one fold's validation
/// predictions: scores are clipped to [eps, 1 - eps] with eps = `f64::EPSILON` (betacal uses
/// the input dtype's eps; float64 here), then a logistic regression on the features
/// `[ln s, -ln(1 - s)]` with intercept and L2 strength `1 / BETACAL_C` on the two
/// coefficients. If the ln s coefficient comes out negative, the model is refitted on
/// -ln(1 - s) alone and a = 0; else if the -ln(1 - s) coefficient is negative, it is refitted
/// on ln s alone and b = 0 (betacal's rule; the refit's sign is not checked again).
///
/// The regression is solved by Newton's method (IRLS) with step halving to the exact optimum,
/// where betacal's lbfgs stops at scikit-learn's default tol 1e-4, about 1e-2 short of it on
/// the coefficients (tests/it/eval.rs checks both: 1e-6 to the converged optimum, 2e-2 to
/// betacal's numbers). On perfectly separable data the optimum is only held
/// finite by the tiny penalty; coefficients are then very large, as betacal's would be.
pub fn fit(scores: &[f64], labels: &[bool]) -> Result<BetaCalibration, CalibrationError> {
    if scores.len() != labels.len() {
        return Err(CalibrationError::LengthMismatch {
            scores: scores.len(),
            labels: labels.len(),
        });
    }
    if let Some((index, &value)) = scores
        .iter()
        .enumerate()
        .find(|(_, s)| !(0.0..=1.0).contains(*s))
    {
        return Err(CalibrationError::NotProbability { index, value });
    }
    let positives = labels.iter().filter(|&&y| y).count();
    if positives == 0 || positives == labels.len() {
        return Err(CalibrationError::OneClass {
            n: labels.len(),
            positives,
        });
    }
    let eps = f64::EPSILON;
    let features: Vec<[f64; 2]> = scores
        .iter()
        .map(|&s| {
            let s = s.clamp(eps, 1.0 - eps);
            [s.ln(), -(1.0 - s).ln()]
        })
        .collect();
    let y: Vec<f64> = labels.iter().map(|&l| if l { 1.0 } else { 0.0 }).collect();
    let both: Vec<Vec<f64>> = features.iter().map(|f| f.to_vec()).collect();
    let w = logistic_newton(&both, &y, 1.0 / BETACAL_C);
    let (a, b, c) = if w[0] < 0.0 {
        let only_b: Vec<Vec<f64>> = features.iter().map(|f| vec![f[1]]).collect();
        let w = logistic_newton(&only_b, &y, 1.0 / BETACAL_C);
        (0.0, w[0], w[1])
    } else if w[1] < 0.0 {
        let only_a: Vec<Vec<f64>> = features.iter().map(|f| vec![f[0]]).collect();
        let w = logistic_newton(&only_a, &y, 1.0 / BETACAL_C);
        (w[0], 0.0, w[1])
    } else {
        (w[0], w[1], w[2])
    };
    Ok(BetaCalibration {
        a,
        b,
        c,
        clip_eps: eps,
    })
}

/// Minimises `sum_i logloss(y_i, x_i.w + w0) + lambda/2 |w|^2` (intercept unpenalised) by
/// Newton steps with halving; returns `[w..., w0]`.
fn logistic_newton(x: &[Vec<f64>], y: &[f64], lambda: f64) -> Vec<f64> {
    // Rows with a trailing 1 for the intercept.
    let rows: Vec<Vec<f64>> = x
        .iter()
        .map(|r| r.iter().copied().chain([1.0]).collect())
        .collect();
    let d = rows[0].len();
    let linear = |row: &[f64], w: &[f64]| -> f64 { row.iter().zip(w).map(|(a, b)| a * b).sum() };
    let loss = |w: &[f64]| -> f64 {
        let data: f64 = rows
            .iter()
            .zip(y)
            .map(|(row, &yi)| {
                let z = linear(row, w);
                // log(1 + e^z) - y z, computed stably.
                z.max(0.0) + (-z.abs()).exp().ln_1p() - yi * z
            })
            .sum();
        data + 0.5 * lambda * w[..d - 1].iter().map(|v| v * v).sum::<f64>()
    };
    let mut w = vec![0.0; d];
    let mut current = loss(&w);
    for _ in 0..200 {
        let mut grad = vec![0.0; d];
        let mut hess = vec![vec![0.0; d]; d];
        for (row, &yi) in rows.iter().zip(y) {
            let p = 1.0 / (1.0 + (-linear(row, &w)).exp());
            let h = p * (1.0 - p);
            for (j, hess_row) in hess.iter_mut().enumerate() {
                grad[j] += (p - yi) * row[j];
                for (cell, &rk) in hess_row.iter_mut().zip(row) {
                    *cell += h * row[j] * rk;
                }
            }
        }
        for j in 0..d - 1 {
            grad[j] += lambda * w[j];
            hess[j][j] += lambda;
        }
        let Some(step) = solve(hess, grad) else { break };
        let mut t = 1.0;
        let mut improved = false;
        while t > 1e-10 {
            let trial: Vec<f64> = w.iter().zip(&step).map(|(wi, si)| wi - t * si).collect();
            let l = loss(&trial);
            if l <= current {
                let moved = step.iter().map(|s| (t * s).abs()).fold(0.0, f64::max);
                w = trial;
                improved = current - l > 0.0 || moved > 0.0;
                current = l;
                if moved < 1e-12 {
                    return w;
                }
                break;
            }
            t *= 0.5;
        }
        if !improved {
            break;
        }
    }
    w
}

/// Solves the small dense system `a x = b` by Gaussian elimination with partial pivoting;
/// None when singular.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for (offset, row) in lower.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (cell, &p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *cell -= f * p;
            }
            b[col + 1 + offset] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|c| a[r][c] * x[c]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_like_calibrator_is_monotone_and_bounded() {
        let cal = BetaCalibration {
            a: 1.0,
            b: 1.0,
            c: 0.0,
            clip_eps: 1e-7,
        };
        // a = b = 1, c = 0 is the identity map.
        for s in [0.01, 0.3, 0.5, 0.9] {
            assert!((cal.apply(s) - s).abs() < 1e-12);
        }
        assert!(cal.apply(0.0) > 0.0 && cal.apply(1.0) < 1.0);
    }
}
