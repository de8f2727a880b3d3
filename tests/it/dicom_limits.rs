//! Issue 18: the receiver's limits and the series checks end to end, with dcmtk's `storescu`
//! as the scanner against the real daemon: `max_pdu_bytes` (announced to the scanner, and
//! bounding its association request), `max_instances_per_series`, `max_associations` (one held open by a dicom-ul client),
//! `max_series_bytes`, too few slices and a LOCALIZER series refused with a clear result,
//! and received series pruned by `dicom.max_bytes` through the daemon.

use crate::daemon_support::*;
use crate::dicom_net::{
    dicom_config_with, port, series_files, stored, storescu, storescu_with, uids,
};
use std::path::{Path, PathBuf};
use std::process::Command;

fn job(id: &str, series_uid: &str, coord: [f64; 3]) -> String {
    serde_json::json!({"job_id": id, "patient_id": "P1", "series": {"uid": series_uid},
        "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]})
    .to_string()
}

fn error_of(r: &serde_json::Value) -> String {
    assert_eq!(r["status"], "error", "{r:#}");
    r["error"].as_str().unwrap_or_default().to_string()
}

/// Copies `files` into `dir`, then runs `tool args.. file` on each copy.
fn modified(files: &[PathBuf], dir: &Path, tool: &str, args: &[&str]) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    files
        .iter()
        .map(|f| {
            let to = dir.join(f.file_name().unwrap());
            let st = if tool == "dcmodify" {
                std::fs::copy(f, &to).unwrap();
                Command::new(tool).args(args).arg(&to).status()
            } else {
                Command::new(tool).args(args).arg(f).arg(&to).status()
            };
            assert!(st.unwrap().success(), "{tool} {args:?}");
            to
        })
        .collect()
}

#[test]
fn instance_limit_too_few_slices_and_association_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "max_instances_per_series = 10\nmax_associations = 1\n";
    let d = Daemon::start(tmp.path(), &dicom_config_with(tmp.path(), 1, 5, extra));
    let port = port(&d);
    let (_, dicom, coord) = ct_case("lung1");
    let files = series_files(&dicom);
    let (_, series) = uids(&files[0]);

    // The 11th instance on is refused with 0xA700 naming the limit; exactly 10 are held.
    let (_, out) = storescu(&port, "SCANNER", &files);
    assert_eq!(stored(&d).len(), 10, "{:?}", stored(&d));
    assert!(
        out.contains("DIMSE Status                  : 0xa700"),
        "{out}"
    );
    assert!(
        out.contains("series full: dicom.max_instances_per_series = 10"),
        "{out}"
    );
    assert_eq!(d.metric("noduled_dicom_instances_stored_total"), Some(10.0));
    // storescu stops at the first failure status.
    assert!(d.metric("noduled_dicom_instances_refused_total").unwrap() >= 1.0);

    // Ten slices are fewer than dicom.min_slices (20): refused with a clear result.
    d.drop_job("few.json", &job("few", &series, coord));
    let r = wait_for(60, "the too-few-slices result", || d.result_for("few"));
    let e = error_of(&r);
    assert!(
        e.contains("10 slice(s), fewer than dicom.min_slices = 20"),
        "{e}"
    );

    // One association held open: a second one (dicom.max_associations = 1) is rejected.
    let held = dicom_ul::ClientAssociationOptions::new()
        .calling_ae_title("SCANNER")
        .called_ae_title("NODULED")
        .with_abstract_syntax("1.2.840.10008.1.1")
        .establish(("127.0.0.1", port.parse::<u16>().unwrap()))
        .expect("the first association");
    let (ok, out) = storescu(&port, "SCANNER", &files[..1]);
    assert!(!ok, "a second association was accepted: {out}");
    assert!(
        out.contains("Association Rejected") || out.contains("Association Request Failed"),
        "{out}"
    );
    assert_eq!(
        d.metric("noduled_dicom_associations_rejected_total"),
        Some(1.0)
    );
    assert!(
        d.log().contains("too many associations at once"),
        "{}",
        d.log()
    );
    let _ = held.release();
    wait_for(10, "an association once the held one ended", || {
        dicom_ul::ClientAssociationOptions::new()
            .calling_ae_title("SCANNER")
            .called_ae_title("NODULED")
            .with_abstract_syntax("1.2.840.10008.1.1")
            .establish(("127.0.0.1", port.parse::<u16>().unwrap()))
            .ok()
            .map(|a| {
                let _ = a.release();
            })
    });
}

#[test]
fn series_bytes_limit_localizer_refused_and_received_series_pruned() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, dicom, coord) = ct_case("lung1");
    let files = series_files(&dicom);
    let one = std::fs::metadata(&files[0]).unwrap().len();
    // Per series: room for about 30 of the 48 slices; all series: room for about 40.
    let (series_cap, store_cap) = (30 * one + one / 2, 40 * one);
    let extra = format!("max_series_bytes = {series_cap}\nmax_bytes = {store_cap}\n");
    let d = Daemon::start(tmp.path(), &dicom_config_with(tmp.path(), 1, 10, &extra));
    let port = port(&d);

    // A LOCALIZER series (the fixture with ImageType LOCALIZER and its own series UID).
    let scout_uid = "1.2.826.0.1.3680043.10.1018.1";
    let scout = modified(
        &files,
        &tmp.path().join("scout"),
        "dcmodify",
        &[
            "-nb",
            "-i",
            "(0008,0008)=ORIGINAL\\PRIMARY\\LOCALIZER",
            "-i",
            &format!("(0020,000e)={scout_uid}"),
        ],
    );
    let (_, out) = storescu(&port, "SCANNER", &scout);
    assert!(out.contains("series full: dicom.max_series_bytes"), "{out}");
    let (study, _) = uids(&scout[0]);
    let scout_dir = d.dir.join("state/dicom").join(&study).join(scout_uid);
    let held = series_files(&scout_dir);
    let bytes: u64 = held
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(bytes <= series_cap, "{bytes} > {series_cap}");
    assert!((20..48).contains(&held.len()), "{} held", held.len());

    d.drop_job("scout.json", &job("scout", scout_uid, coord));
    let e = error_of(&wait_for(60, "the localizer result", || {
        d.result_for("scout")
    }));
    assert!(e.contains("ImageType LOCALIZER"), "{e}");
    assert!(scout_dir.is_dir(), "pruned while under dicom.max_bytes");

    // 25 slices of the real series: together over dicom.max_bytes, so after the next job
    // the oldest series (the scout) is pruned and the newer one kept.
    let (ok, out) = storescu(&port, "SCANNER", &files[..25]);
    assert!(ok, "{out}");
    let (_, series) = uids(&files[0]);
    d.drop_job("part.json", &job("part", &series, coord));
    wait_for(60, "the second result", || d.result_for("part"));
    wait_for(10, "the scout series pruned", || {
        (!scout_dir.exists()).then_some(())
    });
    assert_eq!(
        series_files(&d.dir.join("state/dicom").join(&study).join(&series)).len(),
        25
    );
    assert!(d.log().contains("received series pruned"), "{}", d.log());
}

/// `dicom.max_pdu_bytes` at its smallest allowed value: announced to storescu (dicom-ul's own
/// default is another value, so an ignored key shows), storescu's largest default proposal
/// (`-xs`: 128 contexts, about 11 KB) associates and stores under it, and an association
/// request longer than it is answered with A-ASSOCIATE-RJ "local limit exceeded" (not a
/// dropped connection) and logged naming the key.
#[test]
fn max_pdu_bytes_is_announced_and_bounds_the_association_request() {
    use std::io::{Read, Write};
    let max = 16384u32;
    assert_ne!(max, dicom_ul::pdu::DEFAULT_MAX_PDU);
    let tmp = tempfile::tempdir().unwrap();
    let extra = format!("max_pdu_bytes = {max}\n");
    let d = Daemon::start(tmp.path(), &dicom_config_with(tmp.path(), 1, 5, &extra));
    let port = port(&d);
    let (_, dicom, _) = ct_case("lung1");
    let files = series_files(&dicom);
    let (ok, out) = storescu_with(&port, "SCANNER", &["-xs"], &files[..3]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("Their Max PDU Receive Size:  {max}")),
        "{out}"
    );
    assert_eq!(d.metric("noduled_dicom_instances_stored_total"), Some(3.0));

    // An A-ASSOCIATE-RQ (type 0x01) of max + 100 bytes.
    let len = max + 100;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut pdu = vec![0x01, 0x00];
    pdu.extend_from_slice(&len.to_be_bytes());
    pdu.resize(6 + len as usize, 0);
    s.write_all(&pdu).unwrap();
    let mut rj = [0u8; 10];
    s.read_exact(&mut rj)
        .expect("an answer to the association request");
    // A-ASSOCIATE-RJ: type 0x03, length 4, result 1 (permanent), source 3 (service provider,
    // presentation), reason 2 (local limit exceeded).
    assert_eq!(rj, [0x03, 0, 0, 0, 0, 4, 0, 1, 3, 2]);
    let line = format!("association request of {len} bytes exceeds dicom.max_pdu_bytes = {max}");
    wait_for(10, "the rejection logged", || {
        d.log().contains(&line).then_some(())
    });
    assert_eq!(
        d.metric("noduled_dicom_associations_rejected_total"),
        Some(1.0)
    );
}

/// A transfer syntax this build has no decoder for: storescu (`-R -xt`) proposes a CT
/// instance encoded JPEG-LS Lossless (dcmcjpls) in its own presentation context, beside an
/// uncompressed one. The daemon accepts the association and rejects exactly that context,
/// "transfer syntaxes not supported" in the A-ASSOCIATE-AC. (storescu then tries to convert
/// the file for the uncompressed context, has no JPEG-LS decoder either, and aborts the
/// association itself: its "Aborting Association", not the daemon's.) Nothing is stored.
#[test]
fn unsupported_transfer_syntax_is_rejected_per_presentation_context() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &dicom_config_with(tmp.path(), 1, 5, ""));
    let port = port(&d);
    let (_, dicom, _) = ct_case("lung1");
    let jls = modified(
        &series_files(&dicom)[..1],
        &tmp.path().join("jls"),
        "dcmcjpls",
        &[],
    );
    let (_, out) = storescu_with(&port, "SCANNER", &["-R", "-xt"], &jls);
    assert!(out.contains("Association Accepted"), "{out}");
    let rq = section(&out, "BEGIN A-ASSOCIATE-RQ", "END A-ASSOCIATE-RQ");
    let ac = section(&out, "BEGIN A-ASSOCIATE-AC", "END A-ASSOCIATE-AC");
    let jls_ctx = context_ids(rq)
        .into_iter()
        .find(|(_, body)| body.contains("=JPEGLSLossless"))
        .map(|(id, _)| id)
        .expect("storescu proposed JPEG-LS Lossless");
    let verdict = context_ids(ac)
        .into_iter()
        .find(|(id, _)| *id == jls_ctx)
        .map(|(_, body)| body)
        .expect("the context answered");
    assert!(
        verdict.starts_with(" (Transfer Syntaxes Not Supported)"),
        "context {jls_ctx}: {verdict}\n{out}"
    );
    assert!(!out.contains("Peer Aborted"), "{out}");
    assert!(stored(&d).is_empty(), "{:?}", stored(&d));
    assert_eq!(d.metric("noduled_dicom_instances_stored_total"), Some(0.0));
}

/// The lines of storescu's debug output between two markers.
fn section<'a>(out: &'a str, from: &str, to: &str) -> &'a str {
    let start = out.find(from).unwrap_or_else(|| panic!("{from}: {out}"));
    let end = start
        + out[start..]
            .find(to)
            .unwrap_or_else(|| panic!("{to}: {out}"));
    &out[start..end]
}

/// `(id, text up to the next context)` for each "Context ID:" in a storescu section.
fn context_ids(section: &str) -> Vec<(u32, &str)> {
    section
        .split("Context ID:")
        .skip(1)
        .filter_map(|part| {
            let t = part.trim_start();
            let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
            Some((digits.parse().ok()?, &t[digits.len()..]))
        })
        .collect()
}
