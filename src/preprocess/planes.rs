//! The nine planes of a crop, as the reference makes them with numpy/scipy
//! (tests/fixtures/reference/README.md stage 2):
//!
//! 1. `img = (clip(HU, -1000, 500) + 1000) / 1500` in f32, crop axes (z, y, x), centre index
//!    `c = side / 2` (50).
//! 2. Planes 0-2: `img[c]`, `img[:, c]`, `img[:, :, c]`.
//!    Planes 3-8: `scipy.ndimage.rotate(img, 45, axes=(a, b), reshape=False)` (cubic B-spline
//!    with prefilter) sliced at `c` along `a` and along `b`, for (a, b) = (0, 2), (0, 1),
//!    (1, 2). scipy rotates each 2-D plane spanned by (a, b) on its own: output index
//!    `o` samples input `i_a = cos (o_a - m) + sin (o_b - m) + m`,
//!    `i_b = -sin (o_a - m) + cos (o_b - m) + m`, `m = (side - 1) / 2`, on the cubic B-spline
//!    whose coefficients come from the IIR prefilter (pole sqrt(3) - 2) run along both axes of
//!    that plane. Only the samples inside the 50x50 centre crops are computed; they lie at
//!    least 13 voxels from the crop's edge, where the prefilter's boundary rule (mirror here)
//!    changes values by < 1e-7. Spline arithmetic is f64, results stored as f32 like scipy's.
//! 3. Each plane: rows/columns are its two free axes in increasing order; centre crop
//!    `[c - 25, c + 25)`; resize 50 -> 224 bilinear with align-corners sampling (scipy `zoom`
//!    order 1: output `j` samples input `j * 49 / 223`), f64 arithmetic, f32 result.

use crate::nodule::{Planes01, N_PLANES, PLANE_SIDE};
use crate::volume::crop::CropHu;
use rayon::prelude::*;

/// Lower HU bound of the window.
pub const HU_MIN: f32 = -1000.0;
/// Upper HU bound of the window.
pub const HU_MAX: f32 = 500.0;
/// Side of each plane's centre crop before the resize, voxels (= mm).
pub const PLANE_CROP: usize = 50;
/// Rotation angle of the oblique planes, degrees.
const ANGLE_DEG: f64 = 45.0;

/// The (a, b) axes of the three rotations, in plane order (planes 3-4, 5-6, 7-8).
const ROTATIONS: [(usize, usize); 3] = [(0, 2), (0, 1), (1, 2)];

/// The nine planes of a crop (HU, (z, y, x)), values in [0, 1].
pub fn nine_planes(crop: &CropHu) -> Planes01 {
    let side = crop.side;
    let img: Vec<f32> = crop
        .voxels
        .iter()
        .map(|&v| (v.clamp(HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN))
        .collect();
    let small = centre_crops(&img, side);
    let mut out = vec![0.0f32; N_PLANES * PLANE_SIDE * PLANE_SIDE];
    out.par_chunks_mut(PLANE_SIDE * PLANE_SIDE)
        .zip(small.par_iter())
        .for_each(|(dst, src)| resize_bilinear(src, PLANE_CROP, dst, PLANE_SIDE));
    Planes01(out)
}

/// The nine 50x50 centre crops (before the resize), `[plane][row][col]`, f32 like scipy's.
pub fn centre_crops(img: &[f32], side: usize) -> Vec<Vec<f32>> {
    let c = side / 2;
    let lo = c - PLANE_CROP / 2;
    let at = |o: [usize; 3]| img[(o[0] * side + o[1]) * side + o[2]];
    let mut planes: Vec<Vec<f32>> = Vec::with_capacity(N_PLANES);
    // Orthogonal planes: fixed axis f at c; rows/cols the free axes in increasing order.
    for f in 0..3 {
        let (p, q) = free_axes(f);
        let mut plane = vec![0.0f32; PLANE_CROP * PLANE_CROP];
        for r in 0..PLANE_CROP {
            for col in 0..PLANE_CROP {
                let mut o = [c; 3];
                o[p] = lo + r;
                o[q] = lo + col;
                plane[r * PLANE_CROP + col] = at(o);
            }
        }
        planes.push(plane);
    }
    // Oblique planes: for each rotation (a, b) and each index o_t of the third axis, prefilter
    // the (a, b) plane once and sample the two crops' lines through it.
    let (s, co) = ANGLE_DEG.to_radians().sin_cos();
    let m = (side as f64 - 1.0) / 2.0;
    let jobs: Vec<(usize, usize)> = (0..ROTATIONS.len())
        .flat_map(|r| (0..PLANE_CROP).map(move |t| (r, t)))
        .collect();
    let lines: Vec<[Vec<f32>; 2]> = jobs
        .par_iter()
        .map(|&(r, ti)| {
            let (a, b) = ROTATIONS[r];
            let t = 3 - a - b;
            let o_t = lo + ti;
            // Coefficient plane C[u][v], u along a, v along b.
            let mut coef = vec![0.0f64; side * side];
            for u in 0..side {
                for v in 0..side {
                    let mut o = [0usize; 3];
                    o[a] = u;
                    o[b] = v;
                    o[t] = o_t;
                    coef[u * side + v] = at(o) as f64;
                }
            }
            prefilter_2d(&mut coef, side);
            let sample = |oa: f64, ob: f64| -> f32 {
                let ia = co * (oa - m) + s * (ob - m) + m;
                let ib = -s * (oa - m) + co * (ob - m) + m;
                bspline3(&coef, side, ia, ib) as f32
            };
            // Plane fixed at o_a = c (free: b); plane fixed at o_b = c (free: a).
            let fixed_a: Vec<f32> = (0..PLANE_CROP)
                .map(|g| sample(c as f64, (lo + g) as f64))
                .collect();
            let fixed_b: Vec<f32> = (0..PLANE_CROP)
                .map(|g| sample((lo + g) as f64, c as f64))
                .collect();
            [fixed_a, fixed_b]
        })
        .collect();
    for (r, &(a, b)) in ROTATIONS.iter().enumerate() {
        let t = 3 - a - b;
        for (which, g) in [b, a].into_iter().enumerate() {
            // Plane `which` fixes a (0) or b (1) at c; its free axes are t and g, rows = the smaller.
            let mut plane = vec![0.0f32; PLANE_CROP * PLANE_CROP];
            for ti in 0..PLANE_CROP {
                let line = &lines[r * PLANE_CROP + ti][which];
                for gi in 0..PLANE_CROP {
                    let (row, col) = if t < g { (ti, gi) } else { (gi, ti) };
                    plane[row * PLANE_CROP + col] = line[gi];
                }
            }
            planes.push(plane);
        }
    }
    planes
}

/// The two axes other than `f`, in increasing order.
fn free_axes(f: usize) -> (usize, usize) {
    match f {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    }
}

/// Cubic B-spline interpolation coefficients of a `side x side` plane, in place: the IIR
/// prefilter along every row, then every column.
fn prefilter_2d(c: &mut [f64], side: usize) {
    let mut line = vec![0.0f64; side];
    for u in 0..side {
        prefilter_line(&mut c[u * side..(u + 1) * side]);
    }
    for v in 0..side {
        for u in 0..side {
            line[u] = c[u * side + v];
        }
        prefilter_line(&mut line);
        for u in 0..side {
            c[u * side + v] = line[u];
        }
    }
}

/// Cubic B-spline prefilter of one line (Unser's recursive filter, pole z = sqrt(3) - 2,
/// gain 6, mirror-symmetric boundary).
fn prefilter_line(c: &mut [f64]) {
    let n = c.len();
    if n < 2 {
        return;
    }
    let z = 3f64.sqrt() - 2.0;
    let gain = (1.0 - z) * (1.0 - 1.0 / z);
    for v in c.iter_mut() {
        *v *= gain;
    }
    // Causal initial value: sum_k z^k c[k] over the mirrored signal, truncated where z^k
    // falls below 1e-17.
    let horizon = ((1e-17f64).ln() / z.abs().ln()).ceil() as usize;
    let mut sum = c[0];
    let mut zk = z;
    if horizon < n {
        for v in c.iter().take(horizon).skip(1) {
            sum += zk * v;
            zk *= z;
        }
    } else {
        // Exact mirror-symmetric sum for short lines.
        let iz = 1.0 / z;
        let mut z2k = z.powi(n as i32 - 1);
        sum = c[0] + z2k * c[n - 1];
        z2k = z2k * z2k * iz; // z^(2n - 3)
        for v in c.iter().take(n - 1).skip(1) {
            sum += (zk + z2k) * v;
            zk *= z;
            z2k *= iz;
        }
        sum /= 1.0 - zk * zk;
    }
    c[0] = sum;
    for k in 1..n {
        c[k] += z * c[k - 1];
    }
    c[n - 1] = (z / (z * z - 1.0)) * (z * c[n - 2] + c[n - 1]);
    for k in (0..n - 1).rev() {
        c[k] = z * (c[k + 1] - c[k]);
    }
}

/// Cubic B-spline weights of the four samples `floor(x) - 1 ..= floor(x) + 2`.
fn weights3(x: f64) -> (i64, [f64; 4]) {
    let f = x.floor();
    let t = x - f;
    let u = 1.0 - t;
    let w = [
        u * u * u / 6.0,
        (3.0 * t * t * t - 6.0 * t * t + 4.0) / 6.0,
        (-3.0 * t * t * t + 3.0 * t * t + 3.0 * t + 1.0) / 6.0,
        t * t * t / 6.0,
    ];
    (f as i64 - 1, w)
}

/// Value of the cubic B-spline with coefficients `c` (side x side, u rows) at (u, v); the
/// coefficient index is mirrored at the edges (never reached by the nine planes' samples).
fn bspline3(c: &[f64], side: usize, u: f64, v: f64) -> f64 {
    let (u0, wu) = weights3(u);
    let (v0, wv) = weights3(v);
    let mirror = |i: i64| -> usize {
        let n = side as i64;
        let period = 2 * (n - 1);
        let mut i = i.rem_euclid(period.max(1));
        if i >= n {
            i = period - i;
        }
        i as usize
    };
    let mut acc = 0.0;
    for (du, wu) in wu.iter().enumerate() {
        let row = mirror(u0 + du as i64) * side;
        let mut s = 0.0;
        for (dv, wv) in wv.iter().enumerate() {
            s += wv * c[row + mirror(v0 + dv as i64)];
        }
        acc += wu * s;
    }
    acc
}

/// Bilinear resize of an `n x n` plane to `m x m` with align-corners sampling: output `j`
/// samples input `j (n - 1) / (m - 1)`.
pub fn resize_bilinear(src: &[f32], n: usize, dst: &mut [f32], m: usize) {
    let scale = (n as f64 - 1.0) / (m as f64 - 1.0);
    let taps: Vec<(usize, f64)> = (0..m)
        .map(|j| {
            let x = j as f64 * scale;
            let mut i = x.floor() as usize;
            let mut t = x - i as f64;
            if i >= n - 1 {
                i = n - 2;
                t = 1.0;
            }
            (i, t)
        })
        .collect();
    for (r, &(ir, tr)) in taps.iter().enumerate() {
        for (c, &(ic, tc)) in taps.iter().enumerate() {
            let v00 = src[ir * n + ic] as f64;
            let v01 = src[ir * n + ic + 1] as f64;
            let v10 = src[(ir + 1) * n + ic] as f64;
            let v11 = src[(ir + 1) * n + ic + 1] as f64;
            let v = (1.0 - tr) * ((1.0 - tc) * v00 + tc * v01) + tr * ((1.0 - tc) * v10 + tc * v11);
            dst[r * m + c] = v as f32;
        }
    }
}
