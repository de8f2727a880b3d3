//! Preprocessing against the reference fixtures: the 100^3 crop (1e-3 HU) and the nine planes
//! (1e-4) from the NIfTI and the DICOM series of each case, DICOM == NIfTI, the synthetic crop,
//! NRRD (LPS and RAS, raw and gzip) and .npy inputs, and the manifest.

use crate::util::reference;
use noduled::nodules::{self, NoduleRequest};
use noduled::preprocess;
use noduled::volume::{self, crop::CropHu, Volume};
use std::io::Write;
use std::path::Path;

pub use crate::util::expected;

/// (coord_lps_mm, crop_centre_voxel_lps) of a CT case in cases.json.
pub fn case(name: &str) -> ([f64; 3], [i64; 3]) {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference().join("cases.json")).unwrap())
            .unwrap();
    let c = cases["ct_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap();
    let coord = c["coord_lps_mm"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect::<Vec<_>>();
    let centre = c["crop_centre_voxel_lps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect::<Vec<_>>();
    (
        [coord[0], coord[1], coord[2]],
        [centre[0], centre[1], centre[2]],
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_case(name: &str, volume: &Volume, crop_tol: f32) {
    let (coord, centre) = case(name);
    let (crop, info, planes) = preprocess::nodule_planes(volume, coord).unwrap();
    assert_eq!(info.centre_voxel_lps, centre, "{name}: crop centre voxel");
    let crop_err = max_abs_diff(&crop.voxels, &expected(&format!("{name}.crop_hu")));
    assert!(
        crop_err <= crop_tol,
        "{name} ({:?}): crop max abs error {crop_err} HU",
        volume.ids.format
    );
    let planes_err = max_abs_diff(&planes.0, &expected(&format!("{name}.planes01")));
    assert!(
        planes_err <= 1e-4,
        "{name} ({:?}): planes01 max abs error {planes_err}",
        volume.ids.format
    );
    eprintln!(
        "{name} ({:?}): crop max abs error {crop_err} HU, planes01 {planes_err}",
        volume.ids.format
    );
}

#[test]
fn nifti_matches_reference() {
    for name in ["lung1", "lung2"] {
        let v = volume::read(&reference().join(format!("ct/{name}.nii.gz")), None).unwrap();
        check_case(name, &v, 1e-3);
    }
}

/// The expected crops were made from the NIfTI, whose header stores spacing and origin as
/// f32; the DICOM stores them as decimal strings (lung2: 0.6269531 vs 0.626953125 mm, origin
/// y -155.8496161 vs -155.849609375 mm). That few-micrometre shift moves the crop by up to
/// ~0.01 HU at sharp edges. So: the DICOM crop with its own geometry is held to 0.02 HU and
/// its planes to 1e-4; with the NIfTI's f32 geometry it must give the expected crop to 1e-3 HU
/// (showing the voxels, slice order and rescale are exact).
#[test]
fn dicom_matches_reference() {
    for name in ["lung1", "lung2"] {
        let mut v = volume::read(&reference().join(format!("ct/{name}_dicom")), None).unwrap();
        assert_eq!(v.ids.patient_id.as_deref(), Some(name));
        check_case(name, &v, 2e-2);
        let n = volume::read(&reference().join(format!("ct/{name}.nii.gz")), None).unwrap();
        (v.spacing, v.origin, v.direction) = (n.spacing, n.origin, n.direction);
        check_case(name, &v, 1e-3);
    }
}

#[test]
fn dicom_equals_nifti() {
    for name in ["lung1", "lung2"] {
        let n = volume::read(&reference().join(format!("ct/{name}.nii.gz")), None).unwrap();
        let d = volume::read(&reference().join(format!("ct/{name}_dicom")), None).unwrap();
        assert_eq!(n.dims, d.dims);
        assert_eq!(n.voxels, d.voxels, "{name}: HU voxels");
        for a in 0..3 {
            assert!(
                (n.spacing[a] - d.spacing[a]).abs() < 1e-6,
                "{name}: spacing {:?} vs {:?}",
                n.spacing,
                d.spacing
            );
            assert!(
                (n.origin[a] - d.origin[a]).abs() < 1e-4,
                "{name}: origin {:?} vs {:?}",
                n.origin,
                d.origin
            );
            for r in 0..3 {
                assert!(
                    (n.direction[r][a] - d.direction[r][a]).abs() < 1e-9,
                    "{name}: direction"
                );
            }
        }
        let (coord, _) = case(name);
        let (cn, _, pn) = preprocess::nodule_planes(&n, coord).unwrap();
        let (cd, _, pd) = preprocess::nodule_planes(&d, coord).unwrap();
        assert!(
            max_abs_diff(&cn.voxels, &cd.voxels) <= 2e-2,
            "{name}: crops (see dicom_matches_reference)"
        );
        assert!(max_abs_diff(&pn.0, &pd.0) <= 1e-5, "{name}: planes");
    }
}

#[test]
fn synthetic_crop_gives_reference_planes() {
    let crop = CropHu::new(100, expected("synthetic0.crop_hu")).unwrap();
    let planes = preprocess::nine_planes(&crop);
    let err = max_abs_diff(&planes.0, &expected("synthetic0.planes01"));
    assert!(err <= 1e-4, "synthetic0 planes01 max abs error {err}");
    eprintln!("synthetic0: planes01 max abs error {err}");
}

/// Writes a crop as .npy (little-endian f4, C order).
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    let dims = shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}{}), }}",
        if shape.len() == 1 { "," } else { "" }
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(b"\x93NUMPY\x01\x00").unwrap();
    f.write_all(&(header.len() as u16).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    for v in data {
        f.write_all(&v.to_le_bytes()).unwrap();
    }
}

#[test]
fn npy_crop_gives_reference_planes() {
    let dir = tempfile::tempdir().unwrap();
    let data = expected("synthetic0.crop_hu");
    for shape in [&[100, 100, 100][..], &[1, 1, 100, 100, 100][..]] {
        let path = dir.path().join("synthetic0.npy");
        write_npy(&path, shape, &data);
        let req = NoduleRequest::Crop {
            path: path.clone(),
            patient_id: "P2".into(),
            nodule_id: "synthetic0".into(),
        };
        let got = nodules::load(&req).unwrap();
        assert_eq!(got.len(), 1);
        let err = max_abs_diff(&got[0].planes.0, &expected("synthetic0.planes01"));
        assert!(err <= 1e-4, "npy {shape:?}: planes01 max abs error {err}");
        assert_eq!(got[0].source["crop"], path.display().to_string());
    }
}

/// Writes `v` as NRRD in LPS or RAS space, raw or gzip, from the volume's own geometry.
fn write_nrrd(path: &Path, v: &Volume, ras: bool, gzip: bool) {
    let (lin, off) = if ras { v.ras_affine() } else { v.lps_affine() };
    let dirs = (0..3)
        .map(|c| format!("({},{},{})", lin[0][c], lin[1][c], lin[2][c]))
        .collect::<Vec<_>>()
        .join(" ");
    let mut f = std::fs::File::create(path).unwrap();
    write!(
        f,
        "NRRD0004\n# written by the noduled tests\ntype: float\ndimension: 3\nspace: {}\nsizes: {} {} {}\nspace directions: {dirs}\nkinds: domain domain domain\nendian: little\nencoding: {}\nspace origin: ({},{},{})\n\n",
        if ras { "right-anterior-superior" } else { "left-posterior-superior" },
        v.dims[0],
        v.dims[1],
        v.dims[2],
        if gzip { "gzip" } else { "raw" },
        off[0],
        off[1],
        off[2]
    )
    .unwrap();
    let raw: Vec<u8> = v.voxels.iter().flat_map(|x| x.to_le_bytes()).collect();
    if gzip {
        let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        enc.write_all(&raw).unwrap();
        enc.finish().unwrap();
    } else {
        f.write_all(&raw).unwrap();
    }
}

#[test]
fn nrrd_lps_and_ras_give_the_nifti_crop() {
    let dir = tempfile::tempdir().unwrap();
    let nifti = volume::read(&reference().join("ct/lung2.nii.gz"), None).unwrap();
    let (coord, _) = case("lung2");
    let (want, _) = preprocess::crop_at(&nifti, coord).unwrap();
    for (ras, gzip) in [(false, false), (true, false), (false, true), (true, true)] {
        let path = dir.path().join(format!(
            "lung2_{}_{}.nrrd",
            if ras { "ras" } else { "lps" },
            if gzip { "gz" } else { "raw" }
        ));
        write_nrrd(&path, &nifti, ras, gzip);
        let v = volume::read(&path, None).unwrap();
        assert_eq!(v.voxels, nifti.voxels);
        let (got, _) = preprocess::crop_at(&v, coord).unwrap();
        let err = max_abs_diff(&got.voxels, &want.voxels);
        assert!(
            err <= 1e-4,
            "nrrd ras={ras} gzip={gzip}: crop differs by {err} HU"
        );
        let err = max_abs_diff(&got.voxels, &expected("lung2.crop_hu"));
        assert!(
            err <= 1e-3,
            "nrrd ras={ras} gzip={gzip}: crop vs reference {err} HU"
        );
    }
    // Detached header (.nhdr) with a gzip data file beside it, in RAS space.
    let attached = dir.path().join("lung2_ras_gz.nrrd");
    let bytes = std::fs::read(&attached).unwrap();
    let split = bytes.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
    let header = String::from_utf8(bytes[..split - 1].to_vec()).unwrap();
    std::fs::write(dir.path().join("lung2.raw.gz"), &bytes[split..]).unwrap();
    let nhdr = dir.path().join("lung2.nhdr");
    std::fs::write(&nhdr, format!("{header}data file: lung2.raw.gz\n")).unwrap();
    let v = volume::read(&nhdr, None).unwrap();
    assert_eq!(v.voxels, nifti.voxels);
    assert_eq!(
        preprocess::crop_at(&v, coord).unwrap().0.voxels,
        preprocess::crop_at(&volume::read(&attached, None).unwrap(), coord)
            .unwrap()
            .0
            .voxels
    );
}

#[test]
fn volume_request_reads_once_and_names_its_sources() {
    let (c1, centre) = case("lung1");
    let path = reference().join("ct/lung1_dicom");
    let req = NoduleRequest::Volume {
        path: path.clone(),
        series_uid: None,
        patient_id: None,
        nodules: vec![
            ("n1".into(), c1),
            ("n2".into(), [c1[0] + 3.0, c1[1], c1[2]]),
        ],
    };
    let got = nodules::load(&req).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0].patient_id, "lung1",
        "patient id from the DICOM PatientID"
    );
    assert_eq!(got[0].nodule_id, "n1");
    assert!(max_abs_diff(&got[0].planes.0, &expected("lung1.planes01")) <= 1e-4);
    assert_ne!(got[0].planes, got[1].planes);
    let s = &got[0].source;
    assert_eq!(s["format"], "dicom");
    assert_eq!(s["patient_id"], "lung1");
    assert!(s["series_uid"].as_str().unwrap().starts_with("1.2."));
    assert_eq!(s["crop_centre_voxel_lps"], serde_json::json!(centre));
    assert_eq!(s["coord_lps_mm"][2].as_f64().unwrap(), c1[2]);
}

#[test]
fn manifest_resolves_paths_groups_volumes_and_reads_labels() {
    let dir = tempfile::tempdir().unwrap();
    let ct = dir.path().join("ct");
    std::fs::create_dir(&ct).unwrap();
    std::fs::copy(reference().join("ct/lung1.nii.gz"), ct.join("lung1.nii.gz")).unwrap();
    write_npy(
        &ct.join("syn.npy"),
        &[100, 100, 100],
        &expected("synthetic0.crop_hu"),
    );
    let (c1, _) = case("lung1");
    let (c2, _) = case("lung2");
    let lung2 = reference().join("ct/lung2_dicom");
    let csv = format!(
        "pid,nodule_id,image_path,coordX,coordY,coordZ,malignant\nP1,lung1,ct/lung1.nii.gz,{},{},{},1\nP1,lung2,{},{},{},{},0\nP2,synthetic0,\"ct/syn.npy\",0,0,0,\nP1,lung1b,ct/lung1.nii.gz,{},{},{},0\n",
        c1[0],
        c1[1],
        c1[2],
        lung2.display(),
        c2[0],
        c2[1],
        c2[2],
        c1[0],
        c1[1],
        c1[2] + 2.0
    );
    let path = dir.path().join("manifest.csv");
    std::fs::write(&path, csv).unwrap();
    let got = nodules::load(&NoduleRequest::Manifest { path: path.clone() }).unwrap();
    let ids: Vec<&str> = got.iter().map(|n| n.nodule_id.as_str()).collect();
    assert_eq!(ids, ["lung1", "lung2", "synthetic0", "lung1b"]);
    assert_eq!(
        got.iter().map(|n| n.label).collect::<Vec<_>>(),
        [Some(1), Some(0), None, Some(0)]
    );
    assert_eq!(got[2].patient_id, "P2");
    for (n, name) in [(0, "lung1"), (1, "lung2"), (2, "synthetic0")] {
        let err = max_abs_diff(&got[n].planes.0, &expected(&format!("{name}.planes01")));
        assert!(err <= 1e-4, "{name}: {err}");
    }
    assert_eq!(got[1].source["format"], "dicom");
    assert_eq!(got[3].source["manifest_line"], 5);
}

#[test]
fn coordinate_outside_names_axis_and_distance() {
    let v = volume::read(&reference().join("ct/lung1.nii.gz"), None).unwrap();
    let (c, _) = case("lung1");
    let err = preprocess::crop_at(&v, [c[0], c[1], c[2] + 500.0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the volume: z is"), "{err}");
    let err = preprocess::crop_at(&v, [-c[0] + 300.0, c[1], c[2]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("x is"), "{err}");
}

/// Times reading lung1_dicom and preprocessing one nodule (printed; run with --nocapture).
#[test]
fn timing_read_and_preprocess() {
    let t = std::time::Instant::now();
    let v = volume::read(&reference().join("ct/lung1_dicom"), None).unwrap();
    let read = t.elapsed();
    let (c, _) = case("lung1");
    let _ = preprocess::nodule_planes(&v, c).unwrap();
    let t = std::time::Instant::now();
    let runs = 5;
    for _ in 0..runs {
        let _ = preprocess::nodule_planes(&v, c).unwrap();
    }
    let per = t.elapsed() / runs;
    let t = std::time::Instant::now();
    let (crop, _) = preprocess::crop_at(&v, c).unwrap();
    let crop_time = t.elapsed();
    let t = std::time::Instant::now();
    let _ = preprocess::nine_planes(&crop);
    eprintln!("crop {crop_time:?}, planes {:?}", t.elapsed());
    eprintln!("read lung1_dicom: {read:?}; preprocess one nodule: {per:?}");
    assert!(per.as_millis() < 2000);
}
