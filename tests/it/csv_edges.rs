//! CSV edge cases through every reader of the project: quoted fields, a quoted comma and
//! line break (in an extra column every reader ignores), a UTF-8 BOM, CRLF line ends and
//! blank lines give the same result as the plain file; a short row gives one error naming
//! the file and the line. Readers: the scoring manifest (`nodules`, also `noduled score
//! --manifest` and `noduled eval --manifest`), score files (`noduled eval --scores`), LIDC
//! ratings (`semantics::harmonise_lidc`) and the fine-tune manifest (`finetune::data`).

use crate::util::{bin, root};
use noduled::volume::crop::{self, CropHu};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `plain` (no quotes, `\n` ends, header first) in each edge-case spelling, by name.
fn variants(plain: &str) -> Vec<(&'static str, String)> {
    let lines: Vec<&str> = plain.lines().collect();
    let quote_all = |l: &&str| {
        l.split(',')
            .map(|f| format!("\"{f}\""))
            .collect::<Vec<_>>()
            .join(",")
    };
    let note = |(i, l): (usize, &&str)| {
        if i == 0 {
            format!("{l},note")
        } else {
            format!("{l},\"a, \"\"b\"\"\r\nc\nd\"")
        }
    };
    vec![
        ("plain", plain.to_string()),
        ("bom_crlf", format!("\u{feff}{}\r\n", lines.join("\r\n"))),
        (
            "quoted",
            lines.iter().map(quote_all).collect::<Vec<_>>().join("\n"),
        ),
        (
            "blank_lines",
            format!("{}\n\n{}\n\n", lines[0], lines[1..].join("\n\n")),
        ),
        (
            "multiline_note",
            lines
                .iter()
                .enumerate()
                .map(note)
                .collect::<Vec<_>>()
                .join("\n")
                + "\n",
        ),
    ]
}

/// `plain` with the last field of its second data row (file line 3) cut off.
fn short_row(plain: &str) -> String {
    let mut lines: Vec<String> = plain.lines().map(str::to_string).collect();
    let cut = lines[2].rfind(',').unwrap();
    lines[2].truncate(cut);
    lines.join("\n") + "\n"
}

/// Runs `read` on every variant of `plain` (written as `dir/<variant>/<name>`), checks each
/// gives the plain result, and that the short row gives one line naming file and line 3.
fn check_reader<T: PartialEq + std::fmt::Debug, E: std::fmt::Display>(
    dir: &Path,
    name: &str,
    plain: &str,
    read: impl Fn(&Path) -> Result<T, E>,
) {
    let write = |variant: &str, text: &str| -> PathBuf {
        let sub = dir.join(variant);
        std::fs::create_dir_all(&sub).unwrap();
        let path = sub.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let mut expected = None;
    for (variant, text) in variants(plain) {
        let got = read(&write(variant, &text)).unwrap_or_else(|e| panic!("{name} {variant}: {e}"));
        match &expected {
            None => expected = Some(got),
            Some(want) => assert_eq!(&got, want, "{name} {variant}"),
        }
    }
    let short = write("short_row", &short_row(plain));
    let err = read(&short).map(|_| ()).unwrap_err().to_string();
    let want = format!("{}: line 3: ", short.display());
    assert!(
        err.contains(&want) && err.contains("fields, header has"),
        "{name}: {err}"
    );
    assert!(!err.contains('\n'), "{name}: {err}");
}

/// Two 100^3 crops in `dir`, for the manifests.
fn crops(dir: &Path) {
    for (name, hu) in [("a.npy", -700.0), ("b.npy", 40.0)] {
        let voxels = (0..crop::CROP_SIDE.pow(3))
            .map(|i| hu + (i % 97) as f32)
            .collect();
        let crop = CropHu::new(crop::CROP_SIDE, voxels).unwrap();
        crop::write_npy(&dir.join(name), &crop).unwrap();
    }
}

const MANIFEST: &str = "pid,nodule_id,image_path,coordX,coordY,coordZ,malignant\n\
    P1,n1,PATH/a.npy,0,0,0,1\n\
    P2,n2,PATH/b.npy,0,0,0,0\n\
    P3,n3,PATH/a.npy,0,0,0,0\n";

#[test]
fn scoring_manifest_reader() {
    let dir = tempfile::tempdir().unwrap();
    crops(dir.path());
    let manifest = MANIFEST.replace("PATH", &dir.path().display().to_string());
    check_reader(dir.path(), "manifest.csv", &manifest, |p| {
        noduled::nodules::load_manifest_table(p).map(|(nodules, _)| {
            nodules
                .iter()
                .map(|n| {
                    (
                        n.patient_id.clone(),
                        n.nodule_id.clone(),
                        n.label,
                        n.planes.0.clone(),
                    )
                })
                .collect::<Vec<_>>()
        })
    });
    // The real commands: the short row stops them before any model is loaded.
    let short = dir.path().join("short_row/manifest.csv");
    for args in [
        vec!["score", "--model", "/nonexistent", "--manifest"],
        vec!["eval", "--model", "/nonexistent", "--manifest"],
    ] {
        let run = Command::new(bin())
            .args(&args)
            .arg(&short)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "{}: line 3: 6 fields, header has 7",
                short.display()
            )),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn finetune_manifest_reader() {
    let dir = tempfile::tempdir().unwrap();
    crops(dir.path());
    let manifest = MANIFEST.replace("PATH", &dir.path().display().to_string());
    check_reader(dir.path(), "manifest.csv", &manifest, |p| {
        noduled::finetune::data::load(p).map(|samples| {
            samples
                .iter()
                .map(|s| {
                    (
                        s.pid.clone(),
                        s.nodule_id.clone(),
                        s.label,
                        s.crop.clone(),
                        s.text.clone(),
                    )
                })
                .collect::<Vec<_>>()
        })
    });
}

#[test]
fn score_file_reader_and_eval_cli() {
    let dir = tempfile::tempdir().unwrap();
    let plain = std::fs::read_to_string(root().join("tests/fixtures/eval/scores.csv")).unwrap();
    check_reader(dir.path(), "scores.csv", &plain, |p| {
        noduled::eval::read_scores_csv(p)
    });
    // `noduled eval --scores` prints the same report for every spelling (the source path
    // aside) and one line for the short row.
    let report = |variant: &str| {
        let path = dir.path().join(variant).join("scores.csv");
        let run = Command::new(bin())
            .args(["eval", "--resamples", "50", "--scores"])
            .arg(&path)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&run.stdout).replace(&path.display().to_string(), "");
        (
            run.status.code(),
            out,
            String::from_utf8_lossy(&run.stderr).to_string(),
        )
    };
    let plain_report = report("plain");
    assert_eq!(plain_report.0, Some(0), "{}", plain_report.2);
    for variant in ["bom_crlf", "quoted", "multiline_note"] {
        assert_eq!(report(variant).1, plain_report.1, "{variant}");
    }
    let (code, _, stderr) = report("short_row");
    assert_eq!(code, Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("scores.csv: line 3: 2 fields, header has 3"),
        "{stderr}"
    );
}

#[test]
fn lidc_ratings_reader() {
    let dir = tempfile::tempdir().unwrap();
    let full =
        std::fs::read_to_string(root().join("tests/fixtures/lidc/lidc_annotations_clustered.csv"))
            .unwrap();
    let plain: String = full.lines().take(200).map(|l| format!("{l}\n")).collect();
    check_reader(dir.path(), "lidc.csv", &plain, |p| {
        noduled::semantics::harmonise_lidc(p)
    });
}
