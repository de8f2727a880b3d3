//! Issue 18: SRs to the PACS with dcmtk's `storescp` playing the PACS: while it is down,
//! five results are made and their SRs wait in the durable queue; once it is up, all five
//! arrive, each a valid SR of its result.

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
    std::fs::create_dir_all(out).unwrap();
    let child = Command::new("storescp")
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
    assert_eq!(d.metric("noduled_pacs_sent_total"), Some(5.0));
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
