//! `noduled planes`: draws the nine planes the model sees for one nodule (a 3x3 grid of
//! 224x224 greyscale planes, [0, 1] mapped to 0..255, 4 px black gaps) into a PNG, so a person
//! can check the crop. Input: a volume (DICOM series folder, NIfTI, NRRD) and an LPS world
//! coordinate, or a 100^3 crop file.

use crate::nodule::{Planes01, N_PLANES, PLANE_SIDE};
use crate::nodules;
use anyhow::Context;
use std::path::{Path, PathBuf};

/// Gap between planes in the grid, pixels.
const GAP: usize = 4;

/// Arguments of `noduled planes`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// CT volume: a DICOM series folder, .nii/.nii.gz or .nrrd/.nhdr.
    #[arg(
        long,
        conflicts_with = "crop",
        required_unless_present = "crop",
        requires = "coord"
    )]
    pub volume: Option<PathBuf>,
    /// Nodule centre, LPS world mm: X,Y,Z.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_coord)]
    pub coord: Option<[f64; 3]>,
    /// Which series, when the DICOM folder holds several.
    #[arg(long)]
    pub series_uid: Option<String>,
    /// A 100^3 1 mm HU crop, axes (z,y,x): .npy or the reference's .pt.
    #[arg(long)]
    pub crop: Option<PathBuf>,
    /// Output PNG.
    #[arg(long)]
    pub png: PathBuf,
}

/// Parses "X,Y,Z" into three finite numbers.
pub fn parse_coord(s: &str) -> Result<[f64; 3], String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|t| {
            t.trim()
                .parse::<f64>()
                .map_err(|_| format!("`{t}` is not a number (expected X,Y,Z in LPS mm)"))
        })
        .collect::<Result<_, _>>()?;
    match v[..] {
        [x, y, z] if v.iter().all(|c| c.is_finite()) => Ok([x, y, z]),
        _ => Err(format!(
            "`{s}`: expected three finite numbers X,Y,Z (LPS mm)"
        )),
    }
}

/// Runs `noduled planes`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let planes = if let Some(crop) = &args.crop {
        nodules::from_crop(crop)?.0
    } else {
        let path = args
            .volume
            .as_ref()
            .context("--volume or --crop is required")?;
        let coord = args.coord.context("--coord is required with --volume")?;
        let volume = crate::volume::read(path, args.series_uid.as_deref())?;
        nodules::from_volume(&volume, coord)?.0
    };
    write_grid_png(&planes, &args.png)
}

/// Writes the nine planes as a 3x3 greyscale grid.
pub fn write_grid_png(planes: &Planes01, path: &Path) -> anyhow::Result<()> {
    let side = 3 * PLANE_SIDE + 2 * GAP;
    let mut img = vec![0u8; side * side];
    for p in 0..N_PLANES {
        let (gr, gc) = (p / 3, p % 3);
        for r in 0..PLANE_SIDE {
            for c in 0..PLANE_SIDE {
                let v = planes.0[(p * PLANE_SIDE + r) * PLANE_SIDE + c];
                img[(gr * (PLANE_SIDE + GAP) + r) * side + gc * (PLANE_SIDE + GAP) + c] =
                    (v.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
    let file = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), side as u32, side as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .with_context(|| format!("{}", path.display()))?;
    w.write_image_data(&img)
        .with_context(|| format!("{}", path.display()))?;
    w.finish().with_context(|| format!("{}", path.display()))?;
    Ok(())
}
