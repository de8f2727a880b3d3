//! Beta calibration (Kull et al. 2017, betacal's "abm" parameterisation) of one fold's
//! malignancy probability: `sigmoid(a ln s - b ln(1 - s) + c)` with `s` clipped to
//! `[eps, 1 - eps]`; a term whose coefficient is exactly 0 is dropped (as betacal does).

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
