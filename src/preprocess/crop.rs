//! The 100^3 crop at a world point, as MONAI `Spacing(pixdim=1, mode="bilinear",
//! padding_mode="zeros", align_corners=True, diagonal=True)` + `Orientation("LPS")` + the
//! reference's seed-based crop produce it, but computing only the crop's voxels.
//!
//! The rule (tests/fixtures/reference/README.md, stage 1): `A` is the input's voxel -> RAS
//! affine, `n` its size. The output grid is RAS+, 1 mm, `N = round_half_even(extent + 1)`
//! samples per axis over the bounding box of the input's corner voxel centres, origin at its
//! smallest corner; `X = inv(A) @ A_out`. MONAI normalises `X` with align-corners=False
//! conventions but samples with align-corners=True, so output index `k` samples input index
//! `i = (X_lin (k N/(N-1) - 1/2) + X_off + 1/2) (n-1)/n` (elementwise), trilinearly, a
//! neighbour outside `[0, n-1]` counting as 0. LPS orientation reverses the x and y output
//! axes; the crop centre is `int()` (toward zero) of the world point's LPS index; the window is
//! `[c-50, c+50)` per axis, zero padded, then axes reversed to (z, y, x). Arithmetic is f64,
//! the crop is stored as f32 HU.

use crate::volume::crop::{CropHu, CROP_SIDE};
use crate::volume::Volume;
use rayon::prelude::*;

/// Where a crop was taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropInfo {
    /// Centre voxel in the 1 mm LPS grid, (x, y, z) index order (the reference's
    /// `crop_centre_voxel_lps`).
    pub centre_voxel_lps: [i64; 3],
    /// Size of the (virtual) 1 mm LPS grid, (x, y, z).
    pub grid_size: [usize; 3],
}

/// Errors of preprocessing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreprocessError {
    /// The world point lies outside the volume.
    #[error(
        "{path}: nodule coordinate ({:.2}, {:.2}, {:.2}) LPS mm lies outside the volume: {axis} is {by:.2} mm beyond the volume's {axis} extent [{lo:.2}, {hi:.2}] mm (coordinates are LPS world mm; RAS coordinates need x and y negated)",
        coord[0], coord[1], coord[2]
    )]
    Outside {
        /// The volume's path.
        path: String,
        /// The coordinate.
        coord: [f64; 3],
        /// "x", "y" or "z".
        axis: &'static str,
        /// How far outside, mm.
        by: f64,
        /// Extent along that axis, mm (LPS).
        lo: f64,
        /// Extent along that axis, mm (LPS).
        hi: f64,
    },
    /// The coordinate is not finite.
    #[error("nodule coordinate {coord:?} is not finite")]
    NotFinite {
        /// The coordinate.
        coord: [f64; 3],
    },
    /// The volume is too thin to resample to 1 mm.
    #[error("{path}: the volume spans less than 1 mm along an axis (1 mm grid size {size:?})")]
    TooThin {
        /// The volume's path.
        path: String,
        /// The 1 mm grid size.
        size: [usize; 3],
    },
}

/// The 1 mm RAS grid MONAI's `Spacing` would make of a volume, never materialised.
#[derive(Debug, Clone)]
pub struct Grid {
    /// Samples per RAS axis.
    pub size: [usize; 3],
    /// RAS position of output index (0, 0, 0), mm.
    pub origin_ras: [f64; 3],
    x_lin: [[f64; 3]; 3],
    x_off: [f64; 3],
    /// N / (N - 1) per output axis.
    out_scale: [f64; 3],
    /// (n - 1) / n per input axis.
    in_scale: [f64; 3],
}

impl Grid {
    /// The grid of `volume`.
    pub fn of(volume: &Volume) -> Result<Self, PreprocessError> {
        let (lin, off) = volume.ras_affine();
        let n_in = volume.dims;
        let mut lo = [f64::INFINITY; 3];
        let mut hi = [f64::NEG_INFINITY; 3];
        for corner in 0..8 {
            let idx = [0, 1, 2].map(|a| {
                if corner >> a & 1 == 1 {
                    (n_in[a] - 1) as f64
                } else {
                    0.0
                }
            });
            for r in 0..3 {
                let w = lin[r][0] * idx[0] + lin[r][1] * idx[1] + lin[r][2] * idx[2] + off[r];
                lo[r] = lo[r].min(w);
                hi[r] = hi[r].max(w);
            }
        }
        let size = [0, 1, 2].map(|r| (hi[r] - lo[r] + 1.0).round_ties_even().max(0.0) as usize);
        if size.iter().any(|&s| s < 2) {
            return Err(PreprocessError::TooThin {
                path: volume.ids.path.display().to_string(),
                size,
            });
        }
        // X = inv(A) @ A_out with A_out = [I | lo]: X_lin = inv(lin), X_off = inv(lin) (lo - off).
        let inv = inv3(&lin);
        let d = [lo[0] - off[0], lo[1] - off[1], lo[2] - off[2]];
        let x_off = [0, 1, 2].map(|r| inv[r][0] * d[0] + inv[r][1] * d[1] + inv[r][2] * d[2]);
        let out_scale = size.map(|s| s as f64 / (s - 1) as f64);
        let in_scale = n_in.map(|n| (n as f64 - 1.0) / n as f64);
        Ok(Self {
            size,
            origin_ras: lo,
            x_lin: inv,
            x_off,
            out_scale,
            in_scale,
        })
    }

    /// The input index (continuous, i/j/k) that output RAS index `k` samples.
    pub fn input_index(&self, k: [f64; 3]) -> [f64; 3] {
        let kk = [0, 1, 2].map(|a| k[a] * self.out_scale[a] - 0.5);
        [0, 1, 2].map(|r| {
            let nominal = self.x_lin[r][0] * kk[0]
                + self.x_lin[r][1] * kk[1]
                + self.x_lin[r][2] * kk[2]
                + self.x_off[r];
            (nominal + 0.5) * self.in_scale[r]
        })
    }

    /// The continuous index of an LPS world point in the LPS-oriented grid, (x, y, z).
    pub fn lps_index(&self, world_lps: [f64; 3]) -> [f64; 3] {
        let ras = [-world_lps[0], -world_lps[1], world_lps[2]];
        [
            self.origin_ras[0] + (self.size[0] - 1) as f64 - ras[0],
            self.origin_ras[1] + (self.size[1] - 1) as f64 - ras[1],
            ras[2] - self.origin_ras[2],
        ]
    }

    /// LPS world extent (mm) of the grid along LPS axis `a`, half a voxel beyond the end samples.
    fn lps_extent(&self, a: usize) -> (f64, f64) {
        let n = self.size[a] as f64;
        match a {
            0 | 1 => (-(self.origin_ras[a] + n - 0.5), -(self.origin_ras[a] - 0.5)),
            _ => (self.origin_ras[2] - 0.5, self.origin_ras[2] + n - 0.5),
        }
    }
}

/// Samples `volume` trilinearly at continuous index `i`; neighbours outside the volume count 0.
fn trilinear(volume: &Volume, i: [f64; 3]) -> f64 {
    let n = volume.dims;
    let f = [i[0].floor(), i[1].floor(), i[2].floor()];
    let t = [i[0] - f[0], i[1] - f[1], i[2] - f[2]];
    let v = &volume.voxels;
    if f.iter()
        .zip(&n)
        .all(|(&fa, &na)| fa >= 0.0 && fa + 1.0 <= (na - 1) as f64)
    {
        // All eight neighbours inside: no bounds checks per neighbour.
        let (x, y, z) = (f[0] as usize, f[1] as usize, f[2] as usize);
        let (sy, sz) = (n[0], n[0] * n[1]);
        let b = x + sy * y + sz * z;
        let lerp = |a: f32, c: f32, w: f64| a as f64 * (1.0 - w) + c as f64 * w;
        let c00 = lerp(v[b], v[b + 1], t[0]);
        let c10 = lerp(v[b + sy], v[b + sy + 1], t[0]);
        let c01 = lerp(v[b + sz], v[b + sz + 1], t[0]);
        let c11 = lerp(v[b + sz + sy], v[b + sz + sy + 1], t[0]);
        let c0 = c00 * (1.0 - t[1]) + c10 * t[1];
        let c1 = c01 * (1.0 - t[1]) + c11 * t[1];
        return c0 * (1.0 - t[2]) + c1 * t[2];
    }
    let mut acc = 0.0;
    for dz in 0..2 {
        let zk = f[2] + dz as f64;
        let wz = if dz == 0 { 1.0 - t[2] } else { t[2] };
        if zk < 0.0 || zk > (n[2] - 1) as f64 || wz == 0.0 {
            continue;
        }
        for dy in 0..2 {
            let yj = f[1] + dy as f64;
            let wy = if dy == 0 { 1.0 - t[1] } else { t[1] };
            if yj < 0.0 || yj > (n[1] - 1) as f64 || wy == 0.0 {
                continue;
            }
            let row = n[0] * (yj as usize + n[1] * zk as usize);
            for dx in 0..2 {
                let xi = f[0] + dx as f64;
                let wx = if dx == 0 { 1.0 - t[0] } else { t[0] };
                if xi < 0.0 || xi > (n[0] - 1) as f64 || wx == 0.0 {
                    continue;
                }
                acc += wz * wy * wx * v[row + xi as usize] as f64;
            }
        }
    }
    acc
}

/// The 100^3 (z, y, x) HU crop centred at an LPS world point (mm).
pub fn crop_at(
    volume: &Volume,
    world_lps: [f64; 3],
) -> Result<(CropHu, CropInfo), PreprocessError> {
    if world_lps.iter().any(|v| !v.is_finite()) {
        return Err(PreprocessError::NotFinite { coord: world_lps });
    }
    let grid = Grid::of(volume)?;
    let cf = grid.lps_index(world_lps);
    for a in 0..3 {
        if cf[a] < -0.5 || cf[a] > grid.size[a] as f64 - 0.5 {
            let (lo, hi) = grid.lps_extent(a);
            let v = world_lps[a];
            let by = if v < lo { lo - v } else { v - hi };
            return Err(PreprocessError::Outside {
                path: volume.ids.path.display().to_string(),
                coord: world_lps,
                axis: ["x", "y", "z"][a],
                by,
                lo,
                hi,
            });
        }
    }
    let centre = cf.map(|v| v.trunc() as i64);
    let side = CROP_SIDE;
    let half = (side / 2) as i64;
    let size = grid.size;
    let mut voxels = vec![0.0f32; side * side * side];
    voxels
        .par_chunks_mut(side * side)
        .enumerate()
        .for_each(|(z, plane)| {
            let lz = centre[2] - half + z as i64;
            if lz < 0 || lz >= size[2] as i64 {
                return;
            }
            for y in 0..side {
                let ly = centre[1] - half + y as i64;
                if ly < 0 || ly >= size[1] as i64 {
                    continue;
                }
                for x in 0..side {
                    let lx = centre[0] - half + x as i64;
                    if lx < 0 || lx >= size[0] as i64 {
                        continue;
                    }
                    let k = [
                        (size[0] as i64 - 1 - lx) as f64,
                        (size[1] as i64 - 1 - ly) as f64,
                        lz as f64,
                    ];
                    plane[y * side + x] = trilinear(volume, grid.input_index(k)) as f32;
                }
            }
        });
    let crop = CropHu { side, voxels };
    Ok((
        crop,
        CropInfo {
            centre_voxel_lps: centre,
            grid_size: size,
        },
    ))
}

fn inv3(m: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let det = crate::volume::det3(m);
    let c =
        |r0: usize, c0: usize, r1: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    [
        [
            c(1, 1, 2, 2) / det,
            -c(0, 1, 2, 2) / det,
            c(0, 1, 1, 2) / det,
        ],
        [
            -c(1, 0, 2, 2) / det,
            c(0, 0, 2, 2) / det,
            -c(0, 0, 1, 2) / det,
        ],
        [
            c(1, 0, 2, 1) / det,
            -c(0, 0, 2, 1) / det,
            c(0, 0, 1, 1) / det,
        ],
    ]
}
