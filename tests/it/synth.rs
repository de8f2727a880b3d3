//! `noduled synth`: determinism, geometry (the manifest's LPS coordinate is the nodule
//! centre in the written NIfTI, read back with the nifti crate through its sform), crops,
//! the manifest's semantics and the risk rule.

use std::path::Path;
use std::process::Command;

use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
use noduled::eval::metrics;
use noduled::semantics::{self, Semantics};
use noduled::synth;
use noduled::table::Table;

use crate::util::{bin, run_ok};

fn run_synth(out: &Path, n: usize, seed: u64, crops: bool) {
    let mut cmd = Command::new(bin());
    cmd.args(["synth", "--out"]).arg(out).args([
        "--n",
        &n.to_string(),
        "--seed",
        &seed.to_string(),
    ]);
    if crops {
        cmd.arg("--crops");
    }
    let run = run_ok(&mut cmd);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.starts_with(&format!("{n} cases (")), "{stdout}");
}

/// Trilinear HU at voxel coordinates (i, j, k) of a (x, y, z) array.
fn trilinear(v: &ndarray::ArrayD<f32>, at: [f64; 3]) -> f64 {
    let base = at.map(|c| c.floor() as usize);
    let frac = [0, 1, 2].map(|a| at[a] - base[a] as f64);
    let mut sum = 0.0;
    for corner in 0..8 {
        let off = [corner & 1, (corner >> 1) & 1, (corner >> 2) & 1];
        let w: f64 = (0..3)
            .map(|a| if off[a] == 1 { frac[a] } else { 1.0 - frac[a] })
            .product();
        sum += w * v[[base[0] + off[0], base[1] + off[1], base[2] + off[2]]] as f64;
    }
    sum
}

#[test]
fn same_seed_same_files_other_seed_other_cases() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    run_synth(&a, 3, 11, false);
    run_synth(&b, 3, 11, false);
    run_synth(&c, 3, 12, false);
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    assert_eq!(read(&a, "manifest.csv"), read(&b, "manifest.csv"));
    for pid in ["SYN00001", "SYN00002", "SYN00003"] {
        assert_eq!(
            read(&a, &format!("volumes/{pid}.nii.gz")),
            read(&b, &format!("volumes/{pid}.nii.gz")),
            "{pid}"
        );
    }
    assert_ne!(read(&a, "manifest.csv"), read(&c, "manifest.csv"));
    // Case i does not depend on how many cases are drawn.
    assert_eq!(synth::draw_case(11, 2), synth::draw_case(11, 2));
}

#[test]
fn manifest_coordinate_is_the_nodule_centre_in_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    run_synth(dir.path(), 12, 5, false);
    let table = Table::read(&dir.path().join("manifest.csv")).unwrap();
    let col = |name: &str| table.column(name).unwrap();
    let (cavitation, _) = semantics::feature("cavitation").unwrap();
    let mut checked = 0;
    for row in 0..table.rows.len() {
        let object = ReaderOptions::new()
            .read_file(dir.path().join(table.get(row, col("image_path"))))
            .unwrap();
        let header = object.header().clone();
        assert_eq!(header.datatype, 4, "int16");
        assert_eq!((header.sform_code, header.qform_code), (1, 1));
        let volume = object.into_volume().into_ndarray::<f32>().unwrap();
        assert_eq!(volume.shape(), &synth::VOLUME_DIMS);
        let lps = [col("coordX"), col("coordY"), col("coordZ")].map(|c| table.f64(row, c).unwrap());
        // LPS -> RAS, then the inverse of the (diagonal) sform.
        let ras = [-lps[0], -lps[1], lps[2]];
        let rows = [header.srow_x, header.srow_y, header.srow_z];
        let voxel = [0, 1, 2].map(|a| (ras[a] - rows[a][3] as f64) / rows[a][a] as f64);
        let hu = trilinear(&volume, voxel);
        let s = Semantics::from_row(&table, row).unwrap();
        if s.classes[cavitation] == Some(0) {
            continue; // the centre is the cavity
        }
        checked += 1;
        match s.class_word(semantics::CONSISTENCY).unwrap() {
            "solid" | "part-solid" => {
                assert!(hu > -400.0, "row {row}: {hu} HU at a solid nodule centre")
            }
            _ => assert!(
                (-800.0..-400.0).contains(&hu),
                "row {row}: {hu} HU at a ground-glass centre"
            ),
        }
        // The far corner on the patient's right (lowest LPS X) is lung parenchyma.
        let lung = (0..4).map(|k| volume[[0, 5 + k, 2]] as f64).sum::<f64>() / 4.0;
        assert!(
            (-950.0..-750.0).contains(&lung),
            "row {row}: {lung} HU in the lung"
        );
        // The highest LPS X (patient's left) is chest wall.
        let wall = volume[[synth::VOLUME_DIMS[0] - 1, 60, 30]] as f64;
        assert!(wall > -150.0, "row {row}: {wall} HU at the chest wall");
    }
    assert!(checked >= 8, "only {checked} nodules checked");
}

#[test]
fn crops_are_reference_layout_npy_with_the_nodule_at_50() {
    let dir = tempfile::tempdir().unwrap();
    run_synth(dir.path(), 3, 21, true);
    let table = Table::read(&dir.path().join("manifest.csv")).unwrap();
    for row in 0..3 {
        let path = dir
            .path()
            .join(table.get(row, table.column("image_path").unwrap()));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(
            header.contains("'descr': '<f4'") && header.contains("'shape': (100, 100, 100)"),
            "{header}"
        );
        assert_eq!((10 + header_len) % 64, 0);
        let data: Vec<f32> = bytes[10 + header_len..]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(data.len(), 100 * 100 * 100);
        let at = |z: usize, y: usize, x: usize| data[(z * 100 + y) * 100 + x];
        let s = Semantics::from_row(&table, row).unwrap();
        let cavitated = s.classes[semantics::feature("cavitation").unwrap().0] == Some(0);
        if !cavitated {
            assert!(
                at(50, 50, 50) > -800.0,
                "row {row}: centre {} HU",
                at(50, 50, 50)
            );
        }
        // Towards the patient's right (-X, lower x index) lies lung before the chest wall.
        let right = (0..5).map(|k| at(50, 48 + k, 2) as f64).sum::<f64>() / 5.0;
        assert!(right < -600.0, "row {row}: {right} HU at x index 2");
    }
}

#[test]
fn risk_rule_gives_a_learnable_label() {
    let cases: Vec<synth::Case> = (0..3000).map(|i| synth::draw_case(99, i)).collect();
    let labels: Vec<bool> = cases.iter().map(|c| c.malignant).collect();
    let logits: Vec<f64> = cases
        .iter()
        .map(|c| synth::risk_logit(&c.scene.spec))
        .collect();
    let prevalence = labels.iter().filter(|&&y| y).count() as f64 / cases.len() as f64;
    assert!((0.12..0.4).contains(&prevalence), "prevalence {prevalence}");
    let auc = metrics::roc_auc(&labels, &logits).unwrap();
    assert!(auc > 0.75, "noise-free risk rule AUROC {auc}");
    // Spiculated nodules are malignant more often than smooth ones.
    let rate = |m: synth::Margin| {
        let of: Vec<_> = cases.iter().filter(|c| c.scene.spec.margin == m).collect();
        of.iter().filter(|c| c.malignant).count() as f64 / of.len() as f64
    };
    assert!(rate(synth::Margin::Spiculated) > rate(synth::Margin::Smooth) + 0.15);
}

#[test]
fn synth_refuses_zero_cases_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = Command::new(bin())
        .args(["synth", "--out"])
        .arg(dir.path())
        .args(["--n", "0"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        stderr.trim_end(),
        "noduled: synth: --n must be 1..=100000, got 0"
    );
}

/// `--label rule` writes the noise-free rule (logit > threshold) as `malignant`; the images
/// and semantic columns are those of `--label drawn` with the same seed.
#[test]
fn rule_label_is_the_noise_free_rule_on_the_same_cases() {
    let dir = tempfile::tempdir().unwrap();
    let (drawn, rule) = (dir.path().join("drawn"), dir.path().join("rule"));
    run_synth(&drawn, 40, 8, true);
    run_ok(
        Command::new(bin())
            .args(["synth", "--crops", "--label", "rule", "--out"])
            .arg(&rule)
            .args(["--n", "40", "--seed", "8"]),
    );
    let (a, b) = (
        Table::read(&drawn.join("manifest.csv")).unwrap(),
        Table::read(&rule.join("manifest.csv")).unwrap(),
    );
    let col = |t: &Table, name: &str| t.header.iter().position(|h| h == name).unwrap();
    let (ma, mb) = (col(&a, "malignant"), col(&b, "malignant"));
    let mut differ = 0;
    for (i, case) in (0..40).map(|i| (i, synth::draw_case(8, i))) {
        let want = synth::risk_logit(&case.scene.spec) > synth::RULE_THRESHOLD;
        assert_eq!(b.get(i, mb) == "1", want, "row {i}");
        assert_eq!(a.get(i, ma) == "1", case.malignant, "row {i}");
        differ += (case.malignant != want) as usize;
        for c in 0..a.header.len() {
            if c != ma {
                assert_eq!(a.get(i, c), b.get(i, c), "row {i} column {}", a.header[c]);
            }
        }
    }
    assert!(differ > 0, "drawn and rule labels never differ on 40 cases");
    let file = "crops/SYN00007_0.npy";
    assert!(std::fs::read(drawn.join(file)).unwrap() == std::fs::read(rule.join(file)).unwrap());
}

/// `--population subsolid` labels the same cases (same crops, same semantic columns but the
/// suspicion level) by the subsolid rule, and the labels differ from the screening ones.
#[test]
fn subsolid_population_relabels_the_same_cases() {
    let dir = tempfile::tempdir().unwrap();
    let run = |population: &str| {
        let out = dir.path().join(population);
        let manifest = crate::util::synth_crops(&out, 60, 9, "rule", population);
        (Table::read(&manifest).unwrap(), out)
    };
    let ((a, a_dir), (b, b_dir)) = (run("screening"), run("subsolid"));
    let col = |t: &Table, name: &str| t.header.iter().position(|h| h == name).unwrap();
    let (m, level) = (
        col(&a, "malignant"),
        col(&a, "level_of_suspicion_of_lung_cancer"),
    );
    let mut differ = 0;
    for i in 0..60 {
        let case = synth::draw_case(9, i);
        let screening =
            synth::Population::Screening.logit(&case.scene.spec) > synth::RULE_THRESHOLD;
        let subsolid = synth::Population::Subsolid.logit(&case.scene.spec) > synth::RULE_THRESHOLD;
        assert_eq!(a.get(i, m) == "1", screening, "row {i}");
        assert_eq!(b.get(i, m) == "1", subsolid, "row {i}");
        assert_eq!(
            case.label(synth::Population::Subsolid, synth::Labeling::Rule),
            subsolid
        );
        differ += (screening != subsolid) as usize;
        for c in (0..a.header.len()).filter(|&c| c != m && c != level) {
            assert_eq!(a.get(i, c), b.get(i, c), "row {i} column {}", a.header[c]);
        }
    }
    assert!(differ > 0, "the populations never disagree on 60 cases");
    let file = "crops/SYN00003_0.npy";
    assert!(std::fs::read(a_dir.join(file)).unwrap() == std::fs::read(b_dir.join(file)).unwrap());
    let bad = Command::new(bin())
        .args(["synth", "--population", "rural", "--out"])
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--population must be screening or subsolid")
    );
}
