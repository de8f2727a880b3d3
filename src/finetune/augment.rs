//! Training augmentations of one nodule, after the reference's recipe (method notes section 2),
//! on the 100^3 crop (axes (z, y, x), 1 mm voxels) before the nine planes are cut:
//!
//! 1. window and scale: `(clip(HU, -1000, 500) + 1000) / 1500`;
//! 2. random flip of each axis with p = 0.5, a random rotation of U(-10, 10) degrees about
//!    each axis and a scaling of U(0.9, 1.1) per axis about the crop centre (49.5), all in one
//!    trilinear resample; outside the crop the value is the crop's minimum;
//! 3. Gaussian noise, mean 0, sigma ~ U(0, 0.02);
//! 4. gamma: `sign(x) |x|^g`, g = exp(U(-0.2, 0.2));
//! 5. the nine planes ([`crate::preprocess::nine_planes`], after mapping back to HU);
//! 6. per-plane 2D jitter: each 224 px plane is shifted by a whole number of pixels drawn
//!    from -5..=4 mm of the 50 mm crop (x 224 / 50), edges repeated.
//!
//! All randomness comes from the given SplitMix64, so a seed fixes the result.

use crate::nodule::{Planes01, N_PLANES, PLANE_SIDE};
use crate::preprocess::planes::{HU_MAX, HU_MIN};
use crate::rng::SplitMix64;
use crate::volume::crop::CropHu;

/// Largest rotation about each axis, degrees.
pub const MAX_DEGREES: f64 = 10.0;
/// Scaling range per axis.
pub const SCALES: (f64, f64) = (0.9, 1.1);
/// Largest noise sigma (on the [0, 1] scale).
pub const MAX_NOISE: f64 = 0.02;
/// Log-gamma range.
pub const LOG_GAMMA: f64 = 0.2;
/// In-plane jitter, mm, drawn from `-JITTER..JITTER` (upper bound excluded).
pub const JITTER: i64 = 5;

/// Nine augmented planes of `crop` (HU, side^3, (z, y, x)).
pub fn augment(crop: &CropHu, rng: &mut SplitMix64) -> Planes01 {
    let side = crop.side;
    let img: Vec<f32> = crop
        .voxels
        .iter()
        .map(|&v| (v.clamp(HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN))
        .collect();
    let a = random_matrix(rng);
    let mut out = resample(&img, side, &a);
    let sigma = rng.range(0.0, MAX_NOISE);
    for v in out.iter_mut() {
        *v += (rng.normal() * sigma) as f32;
    }
    let gamma = rng.range(-LOG_GAMMA, LOG_GAMMA).exp() as f32;
    for v in out.iter_mut() {
        *v = v.signum() * v.abs().powf(gamma);
    }
    let hu: Vec<f32> = out
        .iter()
        .map(|&v| v * (HU_MAX - HU_MIN) + HU_MIN)
        .collect();
    let planes = crate::preprocess::nine_planes(&CropHu { side, voxels: hu });
    jitter(planes, rng)
}

/// Output index o samples input `a (o - m) + m`, m the centre: flips, rotations, scalings.
fn random_matrix(rng: &mut SplitMix64) -> [[f64; 3]; 3] {
    let flips: Vec<f64> = (0..3)
        .map(|_| if rng.bernoulli(0.5) { -1.0 } else { 1.0 })
        .collect();
    let angles: Vec<f64> = (0..3)
        .map(|_| rng.range(-MAX_DEGREES, MAX_DEGREES).to_radians())
        .collect();
    let scales: Vec<f64> = (0..3).map(|_| rng.range(SCALES.0, SCALES.1)).collect();
    let rot = |axis: usize, t: f64| -> [[f64; 3]; 3] {
        let (c, s) = (t.cos(), t.sin());
        let (p, q) = match axis {
            0 => (1, 2),
            1 => (0, 2),
            _ => (0, 1),
        };
        let mut m = [[0.0; 3]; 3];
        m[axis][axis] = 1.0;
        m[p][p] = c;
        m[p][q] = -s;
        m[q][p] = s;
        m[q][q] = c;
        m
    };
    let mul = |x: [[f64; 3]; 3], y: [[f64; 3]; 3]| -> [[f64; 3]; 3] {
        let mut m = [[0.0; 3]; 3];
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] = (0..3).map(|k| x[i][k] * y[k][j]).sum();
            }
        }
        m
    };
    let r = mul(mul(rot(0, angles[0]), rot(1, angles[1])), rot(2, angles[2]));
    let mut d = [[0.0; 3]; 3];
    for i in 0..3 {
        d[i][i] = flips[i] / scales[i];
    }
    mul(d, r)
}

/// Trilinear resample of `img` (side^3) through `a` about the centre; outside: the minimum.
fn resample(img: &[f32], side: usize, a: &[[f64; 3]; 3]) -> Vec<f32> {
    let m = (side as f64 - 1.0) / 2.0;
    let fill = img.iter().copied().fold(f32::INFINITY, f32::min);
    let at = |z: usize, y: usize, x: usize| img[(z * side + y) * side + x];
    let mut out = vec![fill; img.len()];
    let hi = (side - 1) as f64;
    for z in 0..side {
        for y in 0..side {
            for x in 0..side {
                let o = [z as f64 - m, y as f64 - m, x as f64 - m];
                let i: Vec<f64> = (0..3)
                    .map(|r| a[r][0] * o[0] + a[r][1] * o[1] + a[r][2] * o[2] + m)
                    .collect();
                if i.iter().any(|&v| !(0.0..=hi).contains(&v)) {
                    continue;
                }
                let f: Vec<usize> = i
                    .iter()
                    .map(|&v| (v.floor() as usize).min(side - 2))
                    .collect();
                let t: Vec<f64> = (0..3).map(|r| i[r] - f[r] as f64).collect();
                let mut acc = 0.0f64;
                for dz in 0..2 {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            let w = (if dz == 1 { t[0] } else { 1.0 - t[0] })
                                * (if dy == 1 { t[1] } else { 1.0 - t[1] })
                                * (if dx == 1 { t[2] } else { 1.0 - t[2] });
                            acc += w * at(f[0] + dz, f[1] + dy, f[2] + dx) as f64;
                        }
                    }
                }
                out[(z * side + y) * side + x] = acc as f32;
            }
        }
    }
    out
}

/// Shifts each plane by a random whole-pixel offset (edges repeated).
fn jitter(planes: Planes01, rng: &mut SplitMix64) -> Planes01 {
    let n = PLANE_SIDE;
    let px_per_mm = PLANE_SIDE as f64 / crate::preprocess::planes::PLANE_CROP as f64;
    let mut out = vec![0.0f32; planes.0.len()];
    for p in 0..N_PLANES {
        let mut shift = [0i64; 2];
        for s in shift.iter_mut() {
            let mm = rng.below(2 * JITTER as usize) as i64 - JITTER;
            *s = (mm as f64 * px_per_mm).round() as i64;
        }
        let src = &planes.0[p * n * n..(p + 1) * n * n];
        let dst = &mut out[p * n * n..(p + 1) * n * n];
        for r in 0..n {
            let sr = (r as i64 + shift[0]).clamp(0, n as i64 - 1) as usize;
            for c in 0..n {
                let sc = (c as i64 + shift[1]).clamp(0, n as i64 - 1) as usize;
                dst[r * n + c] = src[sr * n + sc];
            }
        }
    }
    Planes01(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The identity matrix resamples a crop to itself.
    #[test]
    fn identity_resample_is_exact() {
        let side = 8;
        let img: Vec<f32> = (0..side * side * side).map(|i| i as f32 / 512.0).collect();
        let eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let out = resample(&img, side, &eye);
        for (a, b) in img.iter().zip(&out) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    /// A flip of z maps voxel z to side-1-z.
    #[test]
    fn flip_mirrors() {
        let side = 6;
        let img: Vec<f32> = (0..side * side * side).map(|i| i as f32).collect();
        let flip = [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let out = resample(&img, side, &flip);
        let at = |v: &[f32], z: usize, y: usize, x: usize| v[(z * side + y) * side + x];
        assert!((at(&out, 0, 2, 3) - at(&img, 5, 2, 3)).abs() < 1e-4);
    }
}
