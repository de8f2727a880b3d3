//! Issue 18: SRs to the PACS with dcmtk's `storescp` playing the PACS: while it is down,
//! five results are made and their SRs wait in the durable queue; once it is up, all five
//! arrive, each a valid SR of its result. A PACS that refuses: a permanent refusal (no
//! presentation context for the SR class: storescp with a CT-only profile) moves the SR to
//! `pacs/refused/` at once; a transient one (0xA700: storescp cannot write its output
//! folder) after `max_attempts`.

use crate::daemon_support::*;
use std::process::{Child, Command, Stdio};

struct Pacs(Child);

impl Drop for Pacs {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_pacs(port: u16, out: &std::path::Path) -> Pacs {
    start_pacs_with(port, out, &[])
}

fn start_pacs_with(port: u16, out: &std::path::Path, args: &[&str]) -> Pacs {
    std::fs::create_dir_all(out).unwrap();
    let child = Command::new("storescp")
        .args(args)
        .args(["-aet", "PACS", "-od"])
        .arg(out)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("storescp (dcmtk; scripts/test installs it)");
    Pacs(child)
}

#[test]
fn pacs_down_for_five_results_then_up_gets_five_srs() {
    let tmp = tempfile::tempdir().unwrap();
    let pacs_port = free_port();
    let extra = format!(
        "[dicom]\n[dicom.pacs]\nhost = \"127.0.0.1\"\nport = {pacs_port}\nae_title = \"PACS\"\nretry_max_secs = 1\n"
    );
    let d = Daemon::start(tmp.path(), &config_text(tmp.path(), &model(), "", &extra));
    let (_, dicom, coord) = ct_case("lung1");
    for i in 0..5 {
        let job = serde_json::json!({"job_id": format!("p{i}"), "patient_id": "P1",
            "series": {"path": dicom}, "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
        d.drop_job(&format!("p{i}.json"), &job.to_string());
    }
    let results: Vec<serde_json::Value> = (0..5)
        .map(|i| wait_for(180, "a result", || d.result_for(&format!("p{i}"))))
        .collect();
    assert!(results.iter().all(|r| r["status"] == "ok"));
    // Down: all five SRs wait in the queue, and the failures were noticed.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        d.files("state/pacs").len(),
        5,
        "{:?}\n{}",
        d.files("state/pacs"),
        d.log()
    );
    assert!(
        d.log().contains("SR not sent; kept for a retry"),
        "{}",
        d.log()
    );

    let received = tmp.path().join("pacs");
    let _pacs = start_pacs(pacs_port, &received);
    wait_for(60, "five SRs at the PACS", || {
        (std::fs::read_dir(&received).unwrap().count() == 5 && d.files("state/pacs").is_empty())
            .then_some(())
    });
    // storescp writes a file before it answers the C-STORE: the count may follow a moment later.
    wait_for(10, "five SRs counted as sent", || {
        (d.metric("noduled_pacs_sent_total") == Some(5.0)).then_some(())
    });
    assert_eq!(d.metric("noduled_pacs_queue_depth"), Some(0.0));
    assert!(d.metric("noduled_pacs_failed_attempts_total").unwrap() >= 1.0);
    for r in &results {
        let sop = noduled::dicom::sr::sop_instance_uid(r["result_id"].as_str().unwrap());
        let file = std::fs::read_dir(&received)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().contains(&sop))
            .unwrap_or_else(|| panic!("SR {sop} not received"));
        crate::dicom_sr::check_sr(&file, r);
    }
}

/// A storescp association profile that takes CT images only (no SR).
const CT_ONLY: &str =
    "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n\
TransferSyntax2 = LittleEndianImplicit\n[[PresentationContexts]]\n[CTOnly]\n\
PresentationContext1 = VerificationSOPClass\\Uncompressed\n\
PresentationContext2 = CTImageStorage\\Uncompressed\n[[Profiles]]\n[CTOnly]\n\
PresentationContexts = CTOnly\n";

fn reason(d: &Daemon, result_id: &str) -> serde_json::Value {
    let p = d
        .dir
        .join(format!("state/pacs/refused/{result_id}.reason.json"));
    let text = wait_for(60, "the refusal reason", || {
        std::fs::read_to_string(&p).ok()
    });
    serde_json::from_str(&text).unwrap()
}

#[test]
fn pacs_refusals_move_the_sr_to_refused_permanent_at_once_transient_after_max_attempts() {
    let tmp = tempfile::tempdir().unwrap();
    let pacs_port = free_port();
    let cfg = tmp.path().join("ct-only.cfg");
    std::fs::write(&cfg, CT_ONLY).unwrap();
    let pacs = start_pacs_with(
        pacs_port,
        &tmp.path().join("pacs"),
        &["-xf", cfg.to_str().unwrap(), "CTOnly"],
    );
    let extra = format!(
        "[dicom]\n[dicom.pacs]\nhost = \"127.0.0.1\"\nport = {pacs_port}\nae_title = \"PACS\"\nretry_max_secs = 1\nmax_attempts = 3\n"
    );
    let d = Daemon::start(tmp.path(), &config_text(tmp.path(), &model(), "", &extra));
    let (_, dicom, coord) = ct_case("lung1");
    let make = |id: &str| {
        let job = serde_json::json!({"job_id": id, "patient_id": "P1",
            "series": {"path": dicom}, "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
        d.drop_job(&format!("{id}.json"), &job.to_string());
        let r = wait_for(180, "a result", || d.result_for(id));
        assert_eq!(r["status"], "ok", "{r:#}");
        r["result_id"].as_str().unwrap().to_string()
    };

    // Permanent: no presentation context for the SR class. Refused on the first attempt.
    let first = make("perm");
    let why = reason(&d, &first);
    assert!(
        why["reason"]
            .as_str()
            .unwrap()
            .contains("no presentation context"),
        "{why:#}"
    );
    assert_eq!(why["attempts"], 1, "{why:#}");
    assert!(d
        .dir
        .join(format!("state/pacs/refused/{first}.dcm"))
        .is_file());
    assert!(
        d.files("state/pacs").is_empty(),
        "{:?}",
        d.files("state/pacs")
    );
    assert_eq!(d.metric("noduled_pacs_refused_total"), Some(1.0));
    drop(pacs);

    // Transient: a PACS that cannot write (its output folder gone) answers 0xA700 out of
    // resources; the SR is retried, then refused after max_attempts = 3.
    let out = tmp.path().join("pacs2");
    let _pacs = start_pacs(pacs_port, &out);
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::fs::remove_dir_all(&out).unwrap();
    let second = make("trans");
    let why = reason(&d, &second);
    assert_eq!(why["status"], "0xa700", "{why:#}");
    assert_eq!(why["attempts"], 3, "{why:#}");
    assert!(
        d.log().contains("SR not sent; kept for a retry"),
        "{}",
        d.log()
    );
    assert!(
        d.files("state/pacs").is_empty(),
        "{:?}",
        d.files("state/pacs")
    );
    assert_eq!(d.metric("noduled_pacs_refused_total"), Some(2.0));
    assert_eq!(d.metric("noduled_pacs_sent_total"), Some(0.0));
    // The outbox keeps its own copy of each SR beside the result.
    for id in [&first, &second] {
        assert!(d.dir.join(format!("outbox/{id}.dcm")).is_file());
    }
}

/// `max_attempts` holds across restarts: the daemon is killed (SIGKILL) after the PACS
/// refused the SR transiently n times (0xA700, its output folder gone), n read from the
/// durable `<result_id>.attempts`; after the restart the SR is refused for good after the
/// remaining max_attempts - n attempts, not max_attempts more.
#[test]
fn pacs_attempt_counts_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let pacs_port = free_port();
    let out = tmp.path().join("pacs");
    let _pacs = start_pacs(pacs_port, &out);
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::fs::remove_dir_all(&out).unwrap();
    let max = 4;
    let extra = format!(
        "[dicom]\n[dicom.pacs]\nhost = \"127.0.0.1\"\nport = {pacs_port}\nae_title = \"PACS\"\nretry_max_secs = 1\nmax_attempts = {max}\n"
    );
    let mut d = Daemon::start(tmp.path(), &config_text(tmp.path(), &model(), "", &extra));
    let (_, dicom, coord) = ct_case("lung1");
    let job = serde_json::json!({"job_id": "a", "patient_id": "P1",
        "series": {"path": dicom}, "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]});
    d.drop_job("a.json", &job.to_string());
    let r = wait_for(180, "a result", || d.result_for("a"));
    let id = r["result_id"].as_str().unwrap().to_string();
    let count = d.dir.join(format!("state/pacs/{id}.attempts"));
    wait_for(60, "a first refusal counted", || {
        count.is_file().then_some(())
    });
    d.kill9();
    let n: u32 = std::fs::read_to_string(&count)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((1..max).contains(&n), "{n} attempts before the restart");

    d.restart();
    let why = reason(&d, &id);
    assert_eq!(why["attempts"], max, "{why:#}");
    assert_eq!(why["status"], "0xa700", "{why:#}");
    assert_eq!(
        d.metric("noduled_pacs_failed_attempts_total"),
        Some(f64::from(max - n)),
        "attempts after the restart"
    );
    // The reason file is written first, then the SR moved and its count deleted.
    wait_for(10, "the SR and its count gone from the queue", || {
        d.files("state/pacs").is_empty().then_some(())
    });
}
