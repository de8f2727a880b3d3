//! Training losses (method notes 3.6-3.7): class-weighted two-class cross-entropy (weighted
//! mean, as torch's `CrossEntropyLoss(weight=w)`), and the symmetric CLIP InfoNCE with label
//! smoothing 0.1 on `scale * img . txt^T` with the matching pairs on the diagonal.

use candle_core::{Result, Tensor, D};

/// Label smoothing of the CLIP loss.
pub const LABEL_SMOOTHING: f64 = 0.1;

/// Class weights `w_c ∝ 1 / n_c`, normalised to sum 1 (a class with no sample gets 0).
pub fn class_weights(labels: &[bool]) -> [f64; 2] {
    let n1 = labels.iter().filter(|&&l| l).count() as f64;
    let n0 = labels.len() as f64 - n1;
    let inv = [
        if n0 > 0.0 { 1.0 / n0 } else { 0.0 },
        if n1 > 0.0 { 1.0 / n1 } else { 0.0 },
    ];
    let s = inv[0] + inv[1];
    if s > 0.0 {
        [inv[0] / s, inv[1] / s]
    } else {
        [0.5, 0.5]
    }
}

/// `sum_i w_{y_i} (-log softmax(logits_i)[y_i]) / sum_i w_{y_i}`; `logits` [n, 2].
pub fn weighted_ce(logits: &Tensor, labels: &[bool], weights: [f64; 2]) -> Result<Tensor> {
    let dev = logits.device();
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let onehot: Vec<f32> = labels
        .iter()
        .flat_map(|&l| if l { [0.0, 1.0] } else { [1.0, 0.0] })
        .collect();
    let onehot = Tensor::from_vec(onehot, (labels.len(), 2), dev)?;
    let nll = (logp * onehot)?.sum(1)?.neg()?;
    let w: Vec<f32> = labels.iter().map(|&l| weights[l as usize] as f32).collect();
    let total: f32 = w.iter().sum();
    let w = Tensor::from_vec(w, labels.len(), dev)?;
    (nll * w)?.sum_all()? / total.max(f32::MIN_POSITIVE) as f64
}

/// Label-smoothed CE with targets on the diagonal of square `logits` [n, n].
fn smoothed_diagonal_ce(logits: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let eye = Tensor::eye(n, candle_core::DType::F32, logits.device())?;
    let nll = (logp.clone() * eye)?.sum(1)?.neg()?.mean_all()?;
    let uniform = logp.mean(1)?.neg()?.mean_all()?;
    (nll * (1.0 - LABEL_SMOOTHING))? + (uniform * LABEL_SMOOTHING)?
}

/// Symmetric CLIP loss of unit embeddings `img`, `txt` [n, d] at `scale` [1].
pub fn clip_loss(img: &Tensor, txt: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let logits = img.matmul(&txt.t()?)?.broadcast_mul(scale)?;
    let a = smoothed_diagonal_ce(&logits)?;
    let b = smoothed_diagonal_ce(&logits.t()?.contiguous()?)?;
    (a + b)? / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn weighted_ce_matches_hand_computation() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[0.0f32, 1.0], [2.0, -1.0], [0.5, 0.5]], &dev).unwrap();
        let labels = [true, false, true];
        let w = class_weights(&labels);
        assert!((w[0] - 2.0 / 3.0).abs() < 1e-12 && (w[1] - 1.0 / 3.0).abs() < 1e-12);
        let got = weighted_ce(&logits, &labels, w)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let lse = |a: f64, b: f64| (a.exp() + b.exp()).ln();
        let nll = [
            lse(0.0, 1.0) - 1.0,
            lse(2.0, -1.0) - 2.0,
            lse(0.5, 0.5) - 0.5,
        ];
        let want = (w[1] * nll[0] + w[0] * nll[1] + w[1] * nll[2]) / (2.0 * w[1] + w[0]);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
