//! Issue 18: the daemon's C-STORE receiver with dcmtk's `storescu` as the scanner: a series
//! received and named by UID scores as the folder does; refused calling AE, MR instance,
//! truncated Pixel Data (failure statuses, nothing stored); a series arriving slice by slice
//! over several seconds is scored once, after it is stable.

use crate::daemon_support::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The daemon config with the receiver on a free port, `SCANNER` allowed.
fn dicom_config(dir: &Path, stable_secs: u64, wait_secs: u64) -> String {
    dicom_config_with(dir, stable_secs, wait_secs, "")
}

/// [`dicom_config`] with more `[dicom]` keys (`extra`: TOML lines).
pub(crate) fn dicom_config_with(
    dir: &Path,
    stable_secs: u64,
    wait_secs: u64,
    extra: &str,
) -> String {
    config_text(
        dir,
        &model(),
        "",
        &format!(
            "[dicom]\nenabled = true\nlisten = \"127.0.0.1:0\"\nallowed_calling_aes = [\"SCANNER\"]\nstable_secs = {stable_secs}\nseries_wait_secs = {wait_secs}\n{extra}"
        ),
    )
}

pub(crate) fn port(d: &Daemon) -> String {
    let addr = wait_for(10, "dicom.addr", || {
        std::fs::read_to_string(d.dir.join("state/dicom.addr")).ok()
    });
    addr.rsplit(':').next().unwrap().to_string()
}

/// Runs storescu (calling AE `aet`) on `files`; returns (success, output).
pub(crate) fn storescu(port: &str, aet: &str, files: &[PathBuf]) -> (bool, String) {
    storescu_with(port, aet, &[], files)
}

/// [`storescu`] with more storescu options (`args`, before the host).
pub(crate) fn storescu_with(
    port: &str,
    aet: &str,
    args: &[&str],
    files: &[PathBuf],
) -> (bool, String) {
    let out = Command::new("storescu")
        .args(["-d", "-aet", aet, "-aec", "NODULED"])
        .args(args)
        .args(["127.0.0.1", port])
        .args(files)
        .output()
        .expect("storescu (dcmtk; scripts/test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub(crate) fn series_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    v.sort();
    v
}

/// (study, series) UIDs of a DICOM file.
pub(crate) fn uids(file: &Path) -> (String, String) {
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
        .open_file(file)
        .unwrap();
    let get = |t| {
        obj.element(t)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches('\0')
            .to_string()
    };
    (
        get(dicom_dictionary_std::tags::STUDY_INSTANCE_UID),
        get(dicom_dictionary_std::tags::SERIES_INSTANCE_UID),
    )
}

/// Every file stored by the receiver (hidden temporaries included).
pub(crate) fn stored(d: &Daemon) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            } else {
                out.push(e.path());
            }
        }
    }
    let mut out = Vec::new();
    walk(&d.dir.join("state/dicom"), &mut out);
    out
}

fn folds(r: &serde_json::Value) -> Vec<f64> {
    r["nodules"][0]["folds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["calibrated"].as_f64().unwrap())
        .collect()
}

#[test]
fn received_series_by_uid_scores_as_the_folder_and_gets_an_sr() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &dicom_config(tmp.path(), 1, 60));
    let port = port(&d);
    let (_, dicom, coord) = ct_case("lung1");
    let files = series_files(&dicom);
    let (ok, out) = storescu(&port, "SCANNER", &files);
    assert!(ok, "storescu: {out}");
    let (study, series) = uids(&files[0]);
    let held = d.dir.join("state/dicom").join(&study).join(&series);
    assert_eq!(series_files(&held).len(), files.len(), "{:?}", stored(&d));

    let by_uid = serde_json::json!({"job_id": "uid", "patient_id": "P1", "series": {"uid": series},
        "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
    let by_path = serde_json::json!({"job_id": "path", "patient_id": "P1", "series": {"path": dicom},
        "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
    d.drop_job("uid.json", &by_uid.to_string());
    d.drop_job("path.json", &by_path.to_string());
    let u = wait_for(120, "the series-UID result", || d.result_for("uid"));
    let p = wait_for(120, "the folder result", || d.result_for("path"));
    assert_eq!(u["status"], "ok", "{u:#}");
    assert_eq!(p["status"], "ok", "{p:#}");
    assert_eq!(folds(&u), folds(&p), "series by UID vs folder");
    assert_eq!(
        u["nodules"][0]["descriptors"],
        p["nodules"][0]["descriptors"]
    );
    assert_eq!(u["input"]["slices"], 48);
    let id = u["result_id"].as_str().unwrap();
    crate::dicom_sr::check_sr(&d.dir.join(format!("outbox/{id}.dcm")), &u);

    let unknown = serde_json::json!({"job_id": "unknown", "patient_id": "P1",
        "series": {"uid": "1.2.3.4.5"}, "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
    let bad = serde_json::json!({"job_id": "bad", "patient_id": "P1",
        "series": {"uid": "../../etc"}, "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
    d.drop_job("bad.json", &bad.to_string());
    let b = wait_for(30, "the bad-UID result", || d.result_for("bad"));
    assert_eq!(b["status"], "error");
    assert!(b["error"].as_str().unwrap().contains("series.uid"), "{b:#}");
    assert!(
        b["error"].as_str().unwrap().contains("not a DICOM UID"),
        "{b:#}"
    );
    let _ = unknown; // the unknown-UID wait is covered in received_series_waits (short wait)
}

#[test]
fn refused_ae_mr_and_truncated_instances_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &dicom_config(tmp.path(), 1, 3));
    let port = port(&d);
    let (_, dicom, coord) = ct_case("lung1");
    let files = series_files(&dicom);

    // A calling AE not on the list: the association is rejected, nothing stored.
    let (ok, out) = storescu(&port, "INTRUDER", &files[..2]);
    assert!(!ok, "an unknown calling AE was accepted: {out}");
    assert!(
        out.to_lowercase()
            .contains("calling ae title not recognized"),
        "{out}"
    );
    assert!(stored(&d).is_empty(), "{:?}", stored(&d));

    // An MR instance: C-STORE failure status naming the modality.
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mr = work.join("mr.dcm");
    std::fs::copy(&files[0], &mr).unwrap();
    let st = Command::new("dcmodify")
        .args([
            "-nb",
            "-m",
            "(0008,0060)=MR",
            "-m",
            "(0008,0016)=1.2.840.10008.5.1.4.1.1.4",
        ])
        .arg(&mr)
        .status()
        .unwrap();
    assert!(st.success());
    let (_, out) = storescu(&port, "SCANNER", &[mr]);
    assert!(
        out.contains("DIMSE Status                  : 0x0122"),
        "{out}"
    );
    assert!(out.contains("Modality MR: only CT is received"), "{out}");
    assert!(stored(&d).is_empty(), "{:?}", stored(&d));

    // Pixel Data cut short: failure status, nothing stored, not even a temporary.
    let short = work.join("short.dcm");
    let mut obj = dicom_object::open_file(&files[1]).unwrap();
    let px = obj
        .element(dicom_dictionary_std::tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .to_vec();
    obj.put(dicom_core::DataElement::new(
        dicom_dictionary_std::tags::PIXEL_DATA,
        dicom_core::VR::OW,
        dicom_core::PrimitiveValue::from(px[..px.len() / 3 & !1].to_vec()),
    ));
    obj.write_to_file(&short).unwrap();
    let (_, out) = storescu(&port, "SCANNER", &[short]);
    assert!(
        out.contains("DIMSE Status                  : 0xa900"),
        "{out}"
    );
    assert!(out.contains("PixelData truncated"), "{out}");
    assert!(stored(&d).is_empty(), "{:?}", stored(&d));

    assert_eq!(
        d.metric("noduled_dicom_associations_rejected_total"),
        Some(1.0)
    );
    assert_eq!(d.metric("noduled_dicom_instances_refused_total"), Some(2.0));
    assert_eq!(d.metric("noduled_dicom_instances_stored_total"), Some(0.0));

    // A job naming a series never received: a clear error after the bounded wait.
    let job = serde_json::json!({"job_id": "missing", "patient_id": "P1",
        "series": {"uid": "1.2.3.4.5"}, "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
    d.drop_job("missing.json", &job.to_string());
    let r = wait_for(30, "the missing-series result", || d.result_for("missing"));
    assert_eq!(r["status"], "error");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("1.2.3.4.5 not received"),
        "{r:#}"
    );
}

/// The series-UID job comes first and waits for its series, which arrives slowly; an
/// ordinary job dropped after it must not wait behind it (the waiting job is parked before
/// the worker, in the daemon's series gate): its result comes first.
#[test]
fn series_sent_slice_by_slice_is_scored_once_after_it_is_stable() {
    let tmp = tempfile::tempdir().unwrap();
    let stable = 4;
    let d = Daemon::start(tmp.path(), &dicom_config(tmp.path(), stable, 120));
    let port = port(&d);
    let (_, dicom, coord) = ct_case("lung1");
    let (_, other_dicom, other_coord) = ct_case("lung2");
    let files = series_files(&dicom);
    let (_, series) = uids(&files[0]);
    // The job comes first: it waits for the series.
    let job = serde_json::json!({"job_id": "slow", "patient_id": "P1", "series": {"uid": series},
        "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
    d.drop_job("slow.json", &job.to_string());
    wait_for(10, "the job parked", || {
        (d.metric("noduled_jobs_waiting_for_series") == Some(1.0)).then_some(())
    });
    let other = serde_json::json!({"job_id": "other", "patient_id": "P2",
        "series": {"path": other_dicom}, "nodules": [{"nodule_id": "n0", "coord_lps_mm": other_coord}]});
    d.drop_job("other.json", &other.to_string());
    // Six bursts of 8 slices, 1.5 s apart (well under the 4 s quiet time): about 8 s.
    let mut last_sent = std::time::Instant::now();
    for chunk in files.chunks(8) {
        let (ok, out) = storescu(&port, "SCANNER", chunk);
        assert!(ok, "{out}");
        last_sent = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert!(
            d.result_for("slow").is_none(),
            "scored before the series was stable"
        );
    }
    // The first result to appear is the ordinary job's.
    let first = wait_for(180, "a result", || {
        let other = d.result_for("other").map(|_| "other");
        let slow = d.result_for("slow").map(|_| "slow");
        other.or(slow).map(|f| (f, slow.is_some()))
    });
    assert_eq!(
        first,
        ("other", false),
        "the ordinary job waited behind the series job"
    );
    assert_eq!(d.result_for("other").unwrap()["status"], "ok");
    let r = wait_for(120, "the result", || d.result_for("slow"));
    assert_eq!(r["status"], "ok", "{r:#}");
    assert_eq!(r["input"]["slices"], 48, "{r:#}");
    assert!(last_sent.elapsed().as_secs() >= stable - 1);
    assert_eq!(d.metric("noduled_jobs_waiting_for_series"), Some(0.0));
    std::thread::sleep(std::time::Duration::from_secs(3));
    let n = d.results().iter().filter(|x| x["job_id"] == "slow").count();
    assert_eq!(n, 1);
}
