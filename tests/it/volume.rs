//! Volume readers on small hand-made files, and the bad-input corpus (tests/corpus) through the
//! real binary: every file ends in a one-line `noduled: ...` error with exit code 2.
//!
//! The corpus is written by [`write_corpus`] (plain byte writers below, independent of the
//! readers' crates); `corpus_is_reproducible` checks the committed files equal its output.
//! Regenerate: `cargo test --release --test it -- volume::regenerate_corpus --ignored`.

use crate::preprocess::write_npy;
use crate::util::{bin, root, run_ok};
use noduled::volume;
use std::io::Write;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Byte writers: explicit VR little endian DICOM, NIfTI-1, NRRD.

/// One DICOM data element (tag, VR, value bytes before padding).
type Elem = ((u16, u16), &'static str, Vec<u8>);

fn ds(values: &[f64]) -> Vec<u8> {
    values
        .iter()
        .map(|v| format!("{v}"))
        .collect::<Vec<_>>()
        .join("\\")
        .into_bytes()
}

fn us(v: u16) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn encode_elems(out: &mut Vec<u8>, elems: &mut [Elem]) {
    encode_elems_as(out, elems, true)
}

/// Encodes elements in tag order, explicit or implicit VR little endian.
fn encode_elems_as(out: &mut Vec<u8>, elems: &mut [Elem], explicit: bool) {
    elems.sort_by_key(|e| e.0);
    for ((g, e), vr, value) in elems.iter() {
        let mut value = value.clone();
        if value.len() % 2 == 1 {
            value.push(if *vr == "UI" || *vr == "OB" { 0 } else { b' ' });
        }
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        if !explicit {
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(&value);
            continue;
        }
        out.extend_from_slice(vr.as_bytes());
        if ["OB", "OW", "SQ", "UN", "UT", "OF"].contains(vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(&value);
    }
}

/// A small CT slice description; `dicom_file` turns it into bytes.
#[derive(Clone)]
struct Slice {
    series: &'static str,
    modality: &'static str,
    z: f64,
    instance: u32,
    size: u16,
    spacing: [f64; 2],
    position: bool,
    ts: &'static str,
}

impl Slice {
    fn ct(z: f64) -> Self {
        Slice {
            series: "1.2.826.0.1.3680043.10.1.1",
            modality: "CT",
            z,
            instance: 1,
            size: 8,
            spacing: [0.5, 0.5],
            position: true,
            ts: "1.2.840.10008.1.2.1",
        }
    }
}

/// A CT Image Storage file, explicit VR little endian (or an encapsulated transfer syntax with
/// one fragment), 16-bit stored = HU + 1024, RescaleIntercept -1024. Pixel (r, c) = 10 r + c + z.
fn dicom_file(s: &Slice) -> Vec<u8> {
    let sop = format!("{}.{}", s.series, s.instance);
    let n = s.size as usize;
    let mut pixels = Vec::with_capacity(n * n * 2);
    for r in 0..n {
        for c in 0..n {
            pixels.extend_from_slice(
                &((1024.0 + 10.0 * r as f64 + c as f64 + s.z) as u16).to_le_bytes(),
            );
        }
    }
    const IMPLICIT: &str = "1.2.840.10008.1.2";
    const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
    let encapsulated = ![IMPLICIT, DEFLATED, "1.2.840.10008.1.2.1"].contains(&s.ts);
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    let mut meta_body = Vec::new();
    encode_elems(
        &mut meta_body,
        &mut vec![
            ((0x0002, 0x0001), "OB", vec![0, 1]),
            (
                (0x0002, 0x0002),
                "UI",
                b"1.2.840.10008.5.1.4.1.1.2".to_vec(),
            ),
            ((0x0002, 0x0003), "UI", sop.clone().into_bytes()),
            ((0x0002, 0x0010), "UI", s.ts.as_bytes().to_vec()),
        ],
    );
    encode_elems(
        &mut out,
        &mut vec![(
            (0x0002, 0x0000),
            "UL",
            (meta_body.len() as u32).to_le_bytes().to_vec(),
        )],
    );
    out.extend_from_slice(&meta_body);
    let mut elems: Vec<Elem> = vec![
        (
            (0x0008, 0x0016),
            "UI",
            b"1.2.840.10008.5.1.4.1.1.2".to_vec(),
        ),
        ((0x0008, 0x0018), "UI", sop.into_bytes()),
        ((0x0008, 0x0060), "CS", s.modality.as_bytes().to_vec()),
        ((0x0010, 0x0020), "LO", b"CORPUS".to_vec()),
        ((0x0018, 0x0050), "DS", ds(&[2.0])),
        ((0x0020, 0x000D), "UI", b"1.2.826.0.1.3680043.10.1".to_vec()),
        ((0x0020, 0x000E), "UI", s.series.as_bytes().to_vec()),
        ((0x0020, 0x0013), "IS", s.instance.to_string().into_bytes()),
        ((0x0020, 0x0037), "DS", ds(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0])),
        ((0x0028, 0x0002), "US", us(1)),
        ((0x0028, 0x0004), "CS", b"MONOCHROME2".to_vec()),
        ((0x0028, 0x0010), "US", us(s.size)),
        ((0x0028, 0x0011), "US", us(s.size)),
        ((0x0028, 0x0030), "DS", ds(&s.spacing)),
        ((0x0028, 0x0100), "US", us(16)),
        ((0x0028, 0x0101), "US", us(16)),
        ((0x0028, 0x0102), "US", us(15)),
        ((0x0028, 0x0103), "US", us(0)),
        ((0x0028, 0x1052), "DS", ds(&[-1024.0])),
        ((0x0028, 0x1053), "DS", ds(&[1.0])),
    ];
    if s.position {
        elems.push(((0x0020, 0x0032), "DS", ds(&[-2.0, -2.0, s.z])));
    }
    if !encapsulated {
        elems.push(((0x7FE0, 0x0010), "OW", pixels));
    }
    if s.ts == IMPLICIT || s.ts == DEFLATED {
        let mut data = Vec::new();
        encode_elems_as(&mut data, &mut elems, s.ts == DEFLATED);
        if s.ts == DEFLATED {
            let mut enc =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(&data).unwrap();
            data = enc.finish().unwrap();
        }
        out.extend_from_slice(&data);
        return out;
    }
    encode_elems(&mut out, &mut elems);
    if encapsulated {
        // Pixel Data, undefined length: empty offset table item, one fragment, delimiter.
        out.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]);
        let frag = noise(64, 7);
        out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        out.extend_from_slice(&(frag.len() as u32).to_le_bytes());
        out.extend_from_slice(&frag);
        out.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A NIfTI-1 single file: `dims`, datatype code, sform (RAS rows) or qform-only with `pixdim`.
struct Nii {
    dims: [u16; 3],
    datatype: i16,
    pixdim: [f32; 3],
    sform: bool,
    data: Vec<u8>,
}

fn nifti_file(n: &Nii) -> Vec<u8> {
    let mut h = vec![0u8; 352];
    let put = |h: &mut Vec<u8>, off: usize, b: &[u8]| h[off..off + b.len()].copy_from_slice(b);
    put(&mut h, 0, &348i32.to_le_bytes());
    let dim: [i16; 8] = [
        3,
        n.dims[0] as i16,
        n.dims[1] as i16,
        n.dims[2] as i16,
        1,
        1,
        1,
        1,
    ];
    for (i, d) in dim.iter().enumerate() {
        put(&mut h, 40 + 2 * i, &(*d as u16).to_le_bytes());
    }
    let bitpix: i16 = match n.datatype {
        4 => 16,
        16 => 32,
        _ => 8,
    };
    put(&mut h, 70, &n.datatype.to_le_bytes());
    put(&mut h, 72, &bitpix.to_le_bytes());
    let pixdim = [
        1.0f32,
        n.pixdim[0],
        n.pixdim[1],
        n.pixdim[2],
        1.0,
        1.0,
        1.0,
        1.0,
    ];
    for (i, p) in pixdim.iter().enumerate() {
        put(&mut h, 76 + 4 * i, &p.to_le_bytes());
    }
    put(&mut h, 108, &352f32.to_le_bytes());
    put(&mut h, 112, &1f32.to_le_bytes()); // scl_slope
    put(&mut h, 123, &[2]); // xyzt_units: mm
    put(&mut h, 252, &1i16.to_le_bytes()); // qform_code
    put(&mut h, 254, &(if n.sform { 1i16 } else { 0 }).to_le_bytes());
    let rows = [
        [-n.pixdim[0], 0.0, 0.0, 10.0],
        [0.0, -n.pixdim[1], 0.0, 20.0],
        [0.0, 0.0, n.pixdim[2], -30.0],
    ];
    for (r, row) in rows.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            put(&mut h, 280 + 16 * r + 4 * c, &v.to_le_bytes());
        }
    }
    // qform: 180 degrees about z (RAS x and y negated): quatern_d = 1.
    put(&mut h, 264, &1f32.to_le_bytes());
    put(&mut h, 268, &10f32.to_le_bytes());
    put(&mut h, 272, &20f32.to_le_bytes());
    put(&mut h, 276, &(-30f32).to_le_bytes());
    put(&mut h, 344, b"n+1\0");
    h.extend_from_slice(&n.data);
    h
}

fn i16_ramp(count: usize) -> Vec<u8> {
    (0..count)
        .flat_map(|i| ((i % 200) as i16 - 100).to_le_bytes())
        .collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn nrrd_file(fields: &str, data: &[u8]) -> Vec<u8> {
    let mut out = format!("NRRD0004\n{fields}\n").into_bytes();
    out.extend_from_slice(data);
    out
}

const NRRD_LPS: &str = "type: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 8 8 8\nendian: little\nencoding: raw\n";

// ---------------------------------------------------------------------------------------------
// The corpus: file (relative to tests/corpus), how it is passed, and what the error must say.

/// How a corpus entry is given to `noduled planes`.
enum Input {
    Volume,
    VolumeSeries(&'static str),
    Crop,
}

/// (path, input kind, coordinate, expected substring of the error).
const CORPUS: &[(&str, Input, &str, &str)] = &[
    (
        "random.nii.gz",
        Input::Volume,
        "0,0,0",
        "not a readable NIfTI-1 header",
    ),
    (
        "truncated.nii",
        Input::Volume,
        "0,0,0",
        "truncated voxel data",
    ),
    (
        "truncated.nii.gz",
        Input::Volume,
        "0,0,0",
        "truncated.nii.gz:",
    ),
    ("huge_dims.nii", Input::Volume, "0,0,0", "more than the"),
    (
        "huge_dims.nrrd",
        Input::Volume,
        "0,0,0",
        "announces 1000000000000000 voxels",
    ),
    ("inf.nii", Input::Volume, "0,0,0", "not finite"),
    ("nan.nrrd", Input::Volume, "0,0,0", "not finite"),
    ("zero_spacing.nrrd", Input::Volume, "0,0,0", "spacing 0 mm"),
    (
        "negative_spacings.nrrd",
        Input::Volume,
        "0,0,0",
        "spacing must be finite and > 0",
    ),
    (
        "negative_pixdim.nii",
        Input::Volume,
        "0,0,0",
        "pixdim[1] = -0.7",
    ),
    (
        "far_away.nrrd",
        Input::Volume,
        "0,0,0",
        "outside the volume: x is",
    ),
    ("truncated.nrrd", Input::Volume, "0,0,0", "truncated data"),
    ("random.nrrd", Input::Volume, "0,0,0", "not an NRRD file"),
    (
        "volume.mha",
        Input::Volume,
        "0,0,0",
        "unknown volume format",
    ),
    ("empty_dicom", Input::Volume, "0,0,0", "empty folder"),
    ("not_dicom", Input::Volume, "0,0,0", "no DICOM image files"),
    (
        "dicom_random",
        Input::Volume,
        "0,0,0",
        "unreadable DICOM file",
    ),
    (
        "dicom_mr",
        Input::Volume,
        "0,0,0",
        "attribute `Modality` is `MR`",
    ),
    ("dicom_gap", Input::Volume, "0,0,4", "gap (missing slices?)"),
    (
        "dicom_j2k",
        Input::Volume,
        "0,0,0",
        "JPEG 2000 Lossless) is not supported",
    ),
    ("dicom_truncated", Input::Volume, "0,0,0", "IM0001.dcm"),
    (
        "dicom_no_position",
        Input::Volume,
        "0,0,0",
        "missing required attribute `ImagePositionPatient`",
    ),
    (
        "dicom_spacing_mismatch",
        Input::Volume,
        "0,0,0",
        "`PixelSpacing` differs between slices",
    ),
    (
        "dicom_zero_spacing",
        Input::Volume,
        "0,0,0",
        "`PixelSpacing` = [0.0, 0.5]",
    ),
    (
        "dicom_two_series",
        Input::Volume,
        "0,0,0",
        "choose one with --series-uid",
    ),
    (
        "dicom_two_series",
        Input::VolumeSeries("1.2.3.4"),
        "0,0,0",
        "no series 1.2.3.4",
    ),
    (
        "dicom_single_slice",
        Input::Volume,
        "0,0,0",
        "needs at least 2",
    ),
    (
        "dicom_lying_length",
        Input::Volume,
        "0,0,0",
        "`PixelData` declares 4294967280 bytes but only 128 remain",
    ),
    ("random.npy", Input::Crop, "", "not a .npy file"),
    (
        "huge_shape.npy",
        Input::Crop,
        "",
        "`shape` shape [100000, 100000, 100000]",
    ),
    ("truncated.npy", Input::Crop, "", "truncated data"),
    ("random.pt", Input::Crop, "", "not a torch zip archive"),
];

/// Writes every corpus file under `dir`.
fn write_corpus(dir: &Path) {
    let w = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    };
    let ok_nii = |dims: [u16; 3]| Nii {
        dims,
        datatype: 4,
        pixdim: [0.7, 0.7, 2.0],
        sform: true,
        data: i16_ramp(dims.iter().map(|&d| d as usize).product()),
    };
    w("random.nii.gz", &noise(600, 1));
    let full = nifti_file(&ok_nii([16, 16, 8]));
    w("truncated.nii", &full[..full.len() - 1000]);
    let gz = gzip(&nifti_file(&ok_nii([16, 16, 8])));
    w("truncated.nii.gz", &gz[..gz.len() * 2 / 3]);
    w(
        "huge_dims.nii",
        &nifti_file(&Nii {
            dims: [65535; 3],
            datatype: 4,
            pixdim: [0.7, 0.7, 2.0],
            sform: true,
            data: vec![],
        }),
    );
    let mut inf = Nii {
        datatype: 16,
        data: vec![0u8; 4 * 8 * 8 * 8],
        ..ok_nii([8, 8, 8])
    };
    inf.data[4 * 100..4 * 101].copy_from_slice(&f32::INFINITY.to_le_bytes());
    w("inf.nii", &nifti_file(&inf));
    w(
        "negative_pixdim.nii",
        &nifti_file(&Nii {
            pixdim: [-0.7, 0.7, 2.0],
            sform: false,
            ..ok_nii([8, 8, 8])
        }),
    );
    w(
        "huge_dims.nrrd",
        &nrrd_file("type: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 100000 100000 100000\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\nencoding: raw\n", &i16_ramp(64)),
    );
    let mut nan: Vec<u8> = (0..512).flat_map(|i| (i as f32).to_le_bytes()).collect();
    nan[4 * 77..4 * 78].copy_from_slice(&f32::NAN.to_le_bytes());
    w("nan.nrrd", &nrrd_file("type: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 8 8 8\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\nencoding: raw\n", &nan));
    w(
        "zero_spacing.nrrd",
        &nrrd_file(
            &format!("{NRRD_LPS}space directions: (1,0,0) (0,0,0) (0,0,1)\n"),
            &i16_ramp(512),
        ),
    );
    w("negative_spacings.nrrd", &nrrd_file("type: short\ndimension: 3\nsizes: 8 8 8\nspacings: -1 1 1\nendian: little\nencoding: raw\n", &i16_ramp(512)));
    w("far_away.nrrd", &nrrd_file(&format!("{NRRD_LPS}space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (1000,1000,1000)\n"), &i16_ramp(512)));
    w(
        "truncated.nrrd",
        &nrrd_file(
            &format!("{NRRD_LPS}space directions: (1,0,0) (0,1,0) (0,0,1)\n"),
            &i16_ramp(300),
        ),
    );
    w("random.nrrd", &noise(300, 2));
    w("volume.mha", b"ObjectType = Image\nNDims = 3\n");
    w("empty_dicom/.gitkeep", b"");
    w("not_dicom/readme.txt", b"not a DICOM file\n");
    let mut fake = vec![0u8; 128];
    fake.extend_from_slice(b"DICM");
    fake.extend_from_slice(&noise(200, 3));
    w("dicom_random/IM0000.dcm", &fake);
    let series = |name: &str, slices: &[Slice]| {
        for (i, s) in slices.iter().enumerate() {
            w(&format!("{name}/IM{i:04}.dcm"), &dicom_file(s));
        }
    };
    series(
        "dicom_mr",
        &[0.0, 2.0, 4.0].map(|z| Slice {
            modality: "MR",
            ..Slice::ct(z)
        }),
    );
    series("dicom_gap", &[0.0, 2.0, 4.0, 8.0].map(Slice::ct));
    series(
        "dicom_j2k",
        &[0.0, 2.0].map(|z| Slice {
            ts: "1.2.840.10008.1.2.4.90",
            ..Slice::ct(z)
        }),
    );
    series("dicom_truncated", &[0.0, 2.0, 4.0].map(Slice::ct));
    let t = dicom_file(&Slice::ct(2.0));
    w("dicom_truncated/IM0001.dcm", &t[..t.len() - 50]);
    series(
        "dicom_no_position",
        &[0.0, 2.0].map(|z| Slice {
            position: false,
            ..Slice::ct(z)
        }),
    );
    series(
        "dicom_spacing_mismatch",
        &[
            Slice::ct(0.0),
            Slice::ct(2.0),
            Slice {
                spacing: [0.6, 0.5],
                ..Slice::ct(4.0)
            },
        ],
    );
    series(
        "dicom_zero_spacing",
        &[0.0, 2.0].map(|z| Slice {
            spacing: [0.0, 0.5],
            ..Slice::ct(z)
        }),
    );
    series(
        "dicom_two_series",
        &[
            Slice::ct(0.0),
            Slice::ct(2.0),
            Slice {
                series: "1.2.826.0.1.3680043.10.1.2",
                ..Slice::ct(0.0)
            },
            Slice {
                series: "1.2.826.0.1.3680043.10.1.2",
                ..Slice::ct(2.0)
            },
        ],
    );
    series("dicom_single_slice", &[Slice::ct(0.0)]);
    // Pixel Data declaring 4 GB in a small file.
    series("dicom_lying_length", &[0.0, 2.0].map(Slice::ct));
    let mut lying = dicom_file(&Slice::ct(2.0));
    let at = lying
        .windows(4)
        .position(|w| w == [0xE0, 0x7F, 0x10, 0x00])
        .unwrap();
    lying[at + 8..at + 12].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    w("dicom_lying_length/IM0001.dcm", &lying);
    w("random.npy", &noise(500, 4));
    let hdr = |shape: &str, pad_to: usize| {
        let mut h = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % pad_to != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out
    };
    w("huge_shape.npy", &hdr("(100000, 100000, 100000)", 64));
    let mut t = hdr("(100, 100, 100)", 64);
    t.extend_from_slice(&vec![0u8; 4000]);
    w("truncated.npy", &t);
    w("random.pt", &noise(700, 5));
}

fn corpus() -> PathBuf {
    root().join("tests/corpus")
}

#[test]
#[ignore = "writes tests/corpus; run by hand after changing the generator"]
fn regenerate_corpus() {
    write_corpus(&corpus());
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn corpus_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    write_corpus(tmp.path());
    let want = tree(tmp.path());
    let mut have = tree(&corpus());
    have.retain(|p| p.file_name().unwrap() != "README.md");
    assert_eq!(
        have, want,
        "tests/corpus differs from write_corpus(): regenerate it"
    );
    for p in &want {
        assert_eq!(
            std::fs::read(corpus().join(p)).unwrap(),
            std::fs::read(tmp.path().join(p)).unwrap(),
            "{}",
            p.display()
        );
    }
}

#[test]
fn corpus_gives_one_line_errors_with_exit_code_2() {
    let out_dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (n, (name, input, coord, want)) in CORPUS.iter().enumerate() {
        let png = out_dir.path().join(format!("{n}.png"));
        let path = corpus().join(name);
        let mut cmd = std::process::Command::new(bin());
        cmd.arg("planes").arg("--png").arg(&png);
        match input {
            Input::Crop => cmd.arg("--crop").arg(&path),
            Input::Volume => cmd
                .arg("--volume")
                .arg(&path)
                .arg(format!("--coord={coord}")),
            Input::VolumeSeries(uid) => cmd
                .arg("--volume")
                .arg(&path)
                .arg(format!("--coord={coord}"))
                .arg("--series-uid")
                .arg(uid),
        };
        let t = std::time::Instant::now();
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let lines: Vec<&str> = stderr.lines().collect();
        let ok = out.status.code() == Some(2)
            && lines.len() == 1
            && lines[0].starts_with("noduled: ")
            && lines[0].contains(name)
            && lines[0].contains(want)
            && !png.exists()
            && t.elapsed().as_secs() < 10;
        if !ok {
            failures.push(format!(
                "{name}: exit {:?}, stderr {stderr:?} (want {want:?})",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Readers on small valid files.

#[test]
fn dicom_sorts_by_position_not_name_or_instance() {
    let dir = tempfile::tempdir().unwrap();
    // Names and InstanceNumbers run against the positions.
    for (i, z) in [6.0, 2.0, 4.0, 0.0].into_iter().enumerate() {
        let s = Slice {
            instance: (i + 1) as u32,
            ..Slice::ct(z)
        };
        std::fs::write(dir.path().join(format!("a{i}.dcm")), dicom_file(&s)).unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
    let v = volume::read(dir.path(), None).unwrap();
    assert_eq!(v.dims, [8, 8, 4]);
    assert_eq!(v.spacing, [0.5, 0.5, 2.0]);
    assert_eq!(v.origin, [-2.0, -2.0, 0.0]);
    for k in 0..4 {
        // HU = 10 r + c + z with z = 2k.
        assert_eq!(v.at(3, 5, k), (50 + 3 + 2 * k) as f32, "slice {k}");
    }
    assert_eq!(v.ids.patient_id.as_deref(), Some("CORPUS"));
}

#[test]
fn dicom_series_uid_picks_one_of_several() {
    let dir = corpus().join("dicom_two_series");
    let v = volume::read(&dir, Some("1.2.826.0.1.3680043.10.1.2")).unwrap();
    assert_eq!(
        v.ids.series_uid.as_deref(),
        Some("1.2.826.0.1.3680043.10.1.2")
    );
    assert_eq!(v.dims, [8, 8, 2]);
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("two.png");
    run_ok(
        std::process::Command::new(bin())
            .args(["planes", "--volume"])
            .arg(&dir)
            .args([
                "--series-uid",
                "1.2.826.0.1.3680043.10.1.1",
                "--coord=0,0,1",
                "--png",
            ])
            .arg(&png),
    );
    assert!(png.exists());
}

#[test]
fn nifti_qform_and_sform_agree() {
    let dir = tempfile::tempdir().unwrap();
    let s = Nii {
        dims: [8, 8, 4],
        datatype: 4,
        pixdim: [0.7, 0.7, 2.0],
        sform: true,
        data: i16_ramp(8 * 8 * 4),
    };
    let q = Nii {
        dims: [8, 8, 4],
        datatype: 4,
        pixdim: [0.7, 0.7, 2.0],
        sform: false,
        data: i16_ramp(8 * 8 * 4),
    };
    std::fs::write(dir.path().join("s.nii"), nifti_file(&s)).unwrap();
    std::fs::write(dir.path().join("q.nii.gz"), gzip(&nifti_file(&q))).unwrap();
    let a = volume::read(&dir.path().join("s.nii"), None).unwrap();
    let b = volume::read(&dir.path().join("q.nii.gz"), None).unwrap();
    assert_eq!(a.voxels, b.voxels);
    for i in 0..3 {
        assert!((a.spacing[i] - b.spacing[i]).abs() < 1e-6);
        assert!(
            (a.origin[i] - b.origin[i]).abs() < 1e-6,
            "{:?} {:?}",
            a.origin,
            b.origin
        );
        for j in 0..3 {
            assert!((a.direction[i][j] - b.direction[i][j]).abs() < 1e-6);
        }
    }
    // RAS (10, 20, -30) is LPS (-10, -20, -30); RAS x and y run against the index axes.
    assert_eq!(a.origin, [-10.0, -20.0, -30.0]);
    assert_eq!(
        a.direction,
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    );
}

#[test]
fn planes_png_is_a_three_by_three_grid() {
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("syn.npy");
    write_npy(
        &npy,
        &[100, 100, 100],
        &crate::preprocess::expected("synthetic0.crop_hu"),
    );
    let png = dir.path().join("syn.png");
    run_ok(
        std::process::Command::new(bin())
            .args(["planes", "--crop"])
            .arg(&npy)
            .arg("--png")
            .arg(&png),
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!((info.width, info.height), (3 * 224 + 8, 3 * 224 + 8));
    assert_eq!(info.color_type, png::ColorType::Grayscale);
}

/// A real crop in the reference's format (`torch.save` of a float32 [1,1,100,100,100] tensor,
/// written by scripts/make-pt-crop.py from the fixture's synthetic0 crop) reads back exactly
/// and gives synthetic0's planes.
#[test]
fn pt_crop_written_by_torch_reads_exactly() {
    let path = crate::util::root().join("tests/fixtures/crops/synthetic0.pt");
    let crop = volume::crop::read(&path).unwrap();
    let want = crate::util::expected;
    let expected_crop = want("synthetic0.crop_hu");
    for (i, e) in expected_crop.iter().enumerate() {
        let (z, y, x) = (i / 10_000, (i / 100) % 100, i % 100);
        assert_eq!(crop.at(z, y, x), *e, "voxel ({z},{y},{x})");
    }
    let planes = noduled::preprocess::nine_planes(&crop);
    let err = planes
        .0
        .iter()
        .zip(want("synthetic0.planes01"))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err <= 1e-4, "planes01 max abs error {err}");
}

/// Other real torch archives are refused: the fixture checkpoints (a state dict, not a tensor)
/// must be opened (zip + pickle) and refused with a clear error, by the library and the binary.
#[test]
fn pt_reader_opens_real_torch_archives_and_refuses_a_state_dict() {
    let ckpt = crate::util::reference().join("model/fold_0/best_both.pt");
    let err = volume::crop::read(&ckpt).unwrap_err().to_string();
    assert!(
        err.contains("data.pkl: the pickle is not a bare tensor"),
        "{err}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("x.png");
    let out = std::process::Command::new(bin())
        .args(["planes", "--crop"])
        .arg(&ckpt)
        .arg("--png")
        .arg(&png)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    assert!(!png.exists());
}

/// Times a full-size series: 300 slices of 512x512 (150 MB), read and one nodule preprocessed.
/// Ignored by default (writes the series to a temporary folder); run with --ignored --nocapture.
#[test]
#[ignore = "timing of a 512x512x300 series"]
fn timing_full_size_series() {
    let dir = tempfile::tempdir().unwrap();
    for k in 0..300 {
        let s = Slice {
            size: 512,
            spacing: [0.7, 0.7],
            instance: k + 1,
            ..Slice::ct(k as f64 * 1.25)
        };
        std::fs::write(dir.path().join(format!("{k:04}.dcm")), dicom_file(&s)).unwrap();
    }
    let t = std::time::Instant::now();
    let v = volume::read(dir.path(), None).unwrap();
    let read = t.elapsed();
    assert_eq!(v.dims, [512, 512, 300]);
    let t = std::time::Instant::now();
    let (_, _, planes) = noduled::preprocess::nodule_planes(&v, [150.0, 150.0, 180.0]).unwrap();
    eprintln!(
        "512x512x300 series: read {read:?}, preprocess one nodule {:?}",
        t.elapsed()
    );
    assert!(planes.0.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn dicom_implicit_and_deflated_transfer_syntaxes_read_alike() {
    let dir = tempfile::tempdir().unwrap();
    let mut volumes = Vec::new();
    for ts in [
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1.99",
    ] {
        let sub = dir.path().join(ts);
        std::fs::create_dir(&sub).unwrap();
        for (i, z) in [0.0, 2.0, 4.0].into_iter().enumerate() {
            let s = Slice { ts, ..Slice::ct(z) };
            std::fs::write(sub.join(format!("{i}.dcm")), dicom_file(&s)).unwrap();
        }
        volumes.push(volume::read(&sub, None).unwrap_or_else(|e| panic!("{ts}: {e}")));
    }
    for v in &volumes[1..] {
        assert_eq!(v.voxels, volumes[0].voxels);
        assert_eq!(
            (v.spacing, v.origin, v.direction),
            (volumes[0].spacing, volumes[0].origin, volumes[0].direction)
        );
    }
    assert_eq!(volumes[0].at(2, 1, 2), (10 + 2 + 4) as f32);
}
