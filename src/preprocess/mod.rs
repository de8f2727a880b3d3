//! From a [`Volume`] and a nodule's LPS world point to the nine planes the model sees,
//! exactly as the published pipeline (MONAI + scipy) does it; see
//! tests/fixtures/reference/README.md stages 1-2.
//!
//! - [`crop`]: 1 mm trilinear resample (MONAI `Spacing`, align-corners quirk included), LPS
//!   orientation, 100^3 window at the truncated voxel of the world point, zero padding (0 HU),
//!   axes (z, y, x). Only the window's 10^6 voxels are ever computed.
//! - [`planes`]: HU clip to [-1000, 500], (HU + 1000) / 1500, the nine planes (three
//!   orthogonal, six through 45 degree cubic B-spline rotations), 50x50 centre crops, bilinear
//!   align-corners resize to 224x224: a [`Planes01`] in [0, 1] before CLIP normalisation.

pub mod crop;
pub mod planes;

use crate::nodule::Planes01;
use crate::volume::crop::CropHu;
use crate::volume::Volume;

pub use crop::{crop_at, CropInfo, PreprocessError};
pub use planes::nine_planes;

/// One nodule from a loaded volume: its crop (with where it was taken) and its planes.
pub fn nodule_planes(
    volume: &Volume,
    world_lps: [f64; 3],
) -> Result<(CropHu, CropInfo, Planes01), PreprocessError> {
    let (crop, info) = crop_at(volume, world_lps)?;
    let planes = nine_planes(&crop);
    Ok((crop, info, planes))
}
