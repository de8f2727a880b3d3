//! Every file a job names is opened inside `jobs.data_roots` (issue 16): real files, symlinks,
//! a folder swapped for a symlink, a FIFO, NRRD data files named inside the header, another
//! job's spool file; the real daemon as a child process.

use crate::daemon_support::{config_text, model, planes_file, wait_for, Daemon};
use std::os::unix::fs::symlink;
use std::path::Path;

/// A detached NRRD header naming `data_file`, 8^3 shorts.
fn nhdr(path: &Path, data_file: &str) {
    std::fs::write(
        path,
        format!(
            "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 8 8 8\n\
             space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nencoding: raw\n\
             endian: little\ndata file: {data_file}\n\n"
        ),
    )
    .unwrap();
}

fn error_of(d: &Daemon, job_id: &str) -> String {
    let r = wait_for(60, job_id, || d.result_for(job_id));
    assert_eq!(r["status"], "error", "{job_id}: {r:#}");
    r["error"].as_str().unwrap().to_string()
}

fn volume_job(id: &str, path: &Path) -> String {
    serde_json::json!({"job_id": id, "patient_id": "P", "volume": path,
        "nodules": [{"nodule_id": "n", "coord_lps_mm": [4.0, 4.0, 4.0]}]})
    .to_string()
}

fn planes_job(id: &str, path: &Path) -> String {
    serde_json::json!({"job_id": id, "patient_id": "P",
        "nodules": [{"nodule_id": "n", "planes": path}]})
    .to_string()
}

#[test]
fn files_outside_data_roots_are_never_read_nor_described() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, out) = (tmp.path().join("data"), tmp.path().join("out"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(out.join("case")).unwrap();
    // Outside: a real volume's raw data (8^3 shorts) and a real planes file.
    std::fs::write(out.join("vol.raw"), vec![0u8; 1024]).unwrap();
    let outside_planes = planes_file(&out.join("case"), "lung1");
    let inside_planes = planes_file(&data, "lung1");

    // NRRD headers inside the root whose data file lies outside, by absolute and by `..` name.
    nhdr(
        &data.join("abs.nhdr"),
        &out.join("vol.raw").display().to_string(),
    );
    nhdr(&data.join("rel.nhdr"), "../out/vol.raw");
    nhdr(
        &data.join("missing.nhdr"),
        &out.join("nothing.raw").display().to_string(),
    );
    // A symlink in the root to an outside file; a folder of the root replaced by a symlink
    // after the job was written (the check is on what is opened, not on the name).
    symlink(&outside_planes, data.join("link.safetensors")).unwrap();
    std::fs::create_dir_all(data.join("case")).unwrap();
    std::fs::copy(&inside_planes, data.join("case/lung1.planes.safetensors")).unwrap();
    // A FIFO: refused without blocking the worker.
    let fifo = std::ffi::CString::new(data.join("pipe.safetensors").to_str().unwrap()).unwrap();
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    // A DICOM folder whose members are symlinks to outside slices.
    let (_, dicom_dir, _) = crate::daemon_support::ct_case("lung1");
    std::fs::create_dir_all(data.join("dcm")).unwrap();
    for e in std::fs::read_dir(&dicom_dir).unwrap().take(3) {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
        symlink(
            out.join(e.file_name()),
            data.join("dcm").join(e.file_name()),
        )
        .unwrap();
    }

    let conf = config_text(tmp.path(), &model(), "", "");
    let conf = conf.replacen(
        &format!("\"{}\"", crate::util::reference().display()),
        &format!("\"{}\"", data.display()),
        1,
    );
    let d = Daemon::start(tmp.path(), &conf);

    d.drop_job("abs.json", &volume_job("abs", &data.join("abs.nhdr")));
    d.drop_job("rel.json", &volume_job("rel", &data.join("rel.nhdr")));
    d.drop_job(
        "missing.json",
        &volume_job("missing", &data.join("missing.nhdr")),
    );
    let abs = error_of(&d, "abs");
    let rel = error_of(&d, "rel");
    let missing = error_of(&d, "missing");
    for e in [&abs, &rel, &missing] {
        assert!(e.contains("outside data_roots"), "{e}");
        assert!(
            !e.contains("1024") && !e.contains("bytes"),
            "size leaked: {e}"
        );
    }
    // An existing and a missing outside file read the same, but for the name.
    assert_eq!(
        abs.replace(&out.join("vol.raw").display().to_string(), "X")
            .replace("abs.nhdr", "H"),
        missing
            .replace(&out.join("nothing.raw").display().to_string(), "X")
            .replace("missing.nhdr", "H")
    );

    d.drop_job(
        "link.json",
        &planes_job("link", &data.join("link.safetensors")),
    );
    assert!(error_of(&d, "link").contains("outside data_roots"));

    std::fs::rename(data.join("case"), tmp.path().join("case.moved")).unwrap();
    symlink(out.join("case"), data.join("case")).unwrap();
    d.drop_job(
        "swap.json",
        &planes_job("swap", &data.join("case/lung1.planes.safetensors")),
    );
    assert!(error_of(&d, "swap").contains("outside data_roots"));

    d.drop_job(
        "fifo.json",
        &planes_job("fifo", &data.join("pipe.safetensors")),
    );
    assert!(error_of(&d, "fifo").contains("not a regular file"));

    d.drop_job("dcm.json", &volume_job("dcm", &data.join("dcm")));
    let e = error_of(&d, "dcm");
    assert!(
        !e.contains("PixelData") && !e.contains("Series"),
        "read a member: {e}"
    );

    // Another job's spooled crop may not be named, and is not deleted by the naming job.
    let spool = tmp.path().join("state/spool");
    let theirs = spool.join("mqtt-0123456789abcdef01234567.npy");
    std::fs::write(&theirs, b"\x93NUMPY").unwrap();
    let steal = serde_json::json!({"job_id": "steal", "patient_id": "P",
        "crop": {"path": theirs}, "nodules": [{"nodule_id": "n"}]});
    d.drop_job("steal.json", &steal.to_string());
    assert!(error_of(&d, "steal").contains("outside data_roots"));
    assert!(theirs.exists());

    // The daemon still serves files inside the roots.
    d.drop_job("good.json", &planes_job("good", &inside_planes));
    let r = wait_for(60, "good", || d.result_for("good"));
    assert_eq!(r["status"], "ok", "{r:#}");
}
