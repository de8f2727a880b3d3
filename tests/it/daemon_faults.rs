//! Regression tests of issue 15 ("Daemon core as a typed one-way pipeline that loses nothing
//! and never stalls"): each ordinary fault that lost or stalled results, with the real
//! binary, a real inbox, a real Mosquitto (its `acl_file` for refused topics), a job far
//! longer than its deadline (a FIFO, the first stand-in for a hung read, is refused at open
//! since issue 16's confinement), SIGKILL for crashes and a small tmpfs for a full disk.

use crate::daemon_support::*;
use crate::util::time_scale;
use std::path::Path;
use std::time::{Duration, Instant};

fn mqtt_conf(port: u16, client: &str, extra: &str) -> String {
    format!(
        "[mqtt]\nenabled = true\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"{client}\"\ntopic_prefix = \"nd\"\n\
         reconnect_max_secs = 1\nstatus_interval_secs = 2\n{extra}"
    )
}

/// Nodules in [`hung_job`]: seconds of work on the real CT, far past the tests' `timeout_secs`.
const HUNG_NODULES: usize = 256;

/// A job that holds its thread far longer than the deadline, like a read from a hung share
/// (the real CT with [`HUNG_NODULES`] nodules; `jobs.max_nodules` must allow them).
fn hung_job(job_id: &str) -> String {
    ct_job(job_id, "P-hung", HUNG_NODULES)
}

/// Fault 1: a second job reusing a job_id (another patient) gets its own result, marked
/// `job_id_reused`; the same job again (a redelivery) keeps its result_id.
#[test]
fn reused_job_id_gets_its_own_result_and_a_redelivery_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &config_text(tmp.path(), &model(), "", ""));
    let first = ct_job("J1", "P-A", 1);
    d.drop_job("a.json", &first);
    let a = wait_for(30, "the first J1 result", || d.result_for("J1"));
    d.drop_job("b.json", &ct_job("J1", "P-B", 1));
    let both = wait_for(30, "two J1 results", || {
        let r: Vec<_> = d
            .results()
            .into_iter()
            .filter(|r| r["job_id"] == "J1")
            .collect();
        (r.len() == 2).then_some(r)
    });
    let b = both.iter().find(|r| r["patient_id"] == "P-B").unwrap();
    assert_ne!(a["result_id"], b["result_id"]);
    assert_eq!(b["job_id_reused"], true, "{b:#}");
    assert!(a.get("job_id_reused").is_none(), "{a:#}");
    assert!(d.log().contains("job_id reused"), "{}", d.log());

    // The first job again, byte for byte: the same result, not a third one.
    d.drop_job("a-again.json", &first);
    wait_for(30, "a-again in done/", || {
        d.files("state/done")
            .contains(&"a-again.json".to_string())
            .then_some(())
    });
    let ids: Vec<_> = d
        .results()
        .into_iter()
        .filter(|r| r["job_id"] == "J1")
        .collect();
    assert_eq!(ids.len(), 2, "{ids:#?}");
    assert_eq!(d.metric("noduled_job_ids_reused_total"), Some(1.0));
}

/// Fault 2: a job whose input read blocks gets an error result at `jobs.timeout_secs`; the
/// job behind it runs, readiness holds, and SIGTERM ends the process while a read hangs.
#[test]
fn blocked_input_read_times_out_and_the_pipeline_moves_on() {
    let tmp = tempfile::tempdir().unwrap();
    // 3 s on hardware; scaled under qemu, where the good job alone takes longer than that.
    let timeout = 3 * time_scale();
    let jobs = format!("timeout_secs = {timeout}\nmax_nodules = {HUNG_NODULES}");
    let cfg = config_text(tmp.path(), &model(), &jobs, "");
    let mut d = Daemon::start(tmp.path(), &cfg);
    d.drop_job("hung.json", &hung_job("hung"));
    d.drop_job("good.json", &ct_job("good", "P1", 1));
    assert_eq!(
        wait_for(40, "the good job's result", || d.result_for("good"))["status"],
        "ok"
    );
    let h = wait_for(10, "the hung job's result", || d.result_for("hung"));
    assert_eq!(h["status"], "error");
    assert!(
        h["error"]
            .as_str()
            .unwrap()
            .contains(&format!("jobs.timeout_secs = {timeout}")),
        "{h:#}"
    );
    assert!(d.files("state/failed").contains(&"hung.json".to_string()));
    assert_eq!(d.metric("noduled_jobs_timed_out_total"), Some(1.0));
    assert_eq!(d.get("/readyz").unwrap().0, 200);

    // Another hung read in hand at SIGTERM: the process still exits.
    d.drop_job("hung2.json", &hung_job("hung2"));
    wait_for(10, "hung2 in processing/", || {
        d.files("state/processing")
            .contains(&"hung2.json".to_string())
            .then_some(())
    });
    let t0 = Instant::now();
    let st = d.term(30);
    assert!(st.success(), "{st}: {}", d.log());
    assert!(
        t0.elapsed() < Duration::from_secs(25 * time_scale()),
        "took {:?}",
        t0.elapsed()
    );
}

/// Fault 2 (crash loop): a job that takes the daemon down every time it runs is counted
/// durably and, after `jobs.max_attempts`, failed with an error result instead of run again.
#[test]
fn a_job_that_kills_the_daemon_is_failed_after_max_attempts() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = format!("max_attempts = 2\nmax_nodules = {HUNG_NODULES}");
    let cfg = config_text(tmp.path(), &model(), &jobs, "");
    let mut d = Daemon::start(tmp.path(), &cfg);
    d.drop_job("crash.json", &hung_job("crash"));
    for attempt in 1..=2 {
        wait_for(20, "the job in processing/", || {
            d.files("state/processing")
                .contains(&"crash.json".to_string())
                .then_some(())
        });
        std::thread::sleep(Duration::from_millis(500));
        d.kill9();
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.dir.join("state/attempts/crash.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(rec["attempts"], attempt, "{rec}");
        d.restart();
    }
    expect_abandoned(&d, "crash");
    assert_eq!(d.metric("noduled_jobs_abandoned_total"), Some(1.0));
    d.drop_job("next.json", &ct_job("next", "P1", 1));
    assert_eq!(
        wait_for(30, "a later job", || d.result_for("next"))["status"],
        "ok"
    );
}

/// Fault 3: results the broker refuses (Mosquitto ACL: NotAuthorized PUBACKs) do not hold
/// the in-flight slots: more of them than `max_inflight` are retried with backoff and end
/// in `outbox/refused/` with the reason; once the ACL allows it, publishing goes on.
#[test]
fn refused_publishes_back_off_then_go_to_refused_and_others_still_publish() {
    let tmp = tempfile::tempdir().unwrap();
    let deny = "topic readwrite #\ntopic deny nd/result\n";
    let broker = Broker::start_acl(&tmp.path().join("broker"), deny);
    let probe = Probe::start(broker.port, "probe-acl", "nd/#");
    let dd = tmp.path().join("d");
    let extra = mqtt_conf(broker.port, "noduled-acl", "max_inflight = 2\n")
        + "[alert]\ncalibrated_threshold = 1.0\n";
    let cfg = config_text(&dd, &model(), "", &extra)
        .replace("[outbox]\n", "[outbox]\nmax_publish_attempts = 3\n");
    let d = Daemon::start(&dd, &cfg);
    probe.wait(10, "nd/status", |s| s["state"] == "ready");
    for i in 0..5 {
        d.drop_job(&format!("r{i}.json"), &ct_job(&format!("r{i}"), "P-acl", 1));
    }
    wait_for(90, "5 refused results in outbox/refused/", || {
        let n = d
            .files("outbox/refused")
            .iter()
            .filter(|f| f.ends_with(".reason.json"))
            .count();
        (n == 5).then_some(())
    });
    let reasons: Vec<String> = d
        .files("outbox/refused")
        .iter()
        .filter(|f| f.ends_with(".reason.json"))
        .map(|f| std::fs::read_to_string(d.dir.join("outbox/refused").join(f)).unwrap())
        .collect();
    assert!(
        reasons.iter().all(|r| r.contains("NotAuthorized")),
        "{reasons:?}"
    );
    // The output stage counts a refusal once both files moved; the reason file comes first.
    wait_for(10, "5 refused results counted", || {
        (d.metric("noduled_results_refused_total") == Some(5.0)).then_some(())
    });
    assert_eq!(d.metric("noduled_publish_refusals_total"), Some(15.0));
    assert!(probe.on("nd/result").is_empty());

    broker.set_acl("topic readwrite #\n");
    std::thread::sleep(Duration::from_millis(500));
    d.drop_job("ok.json", &ct_job("ok", "P-acl", 1));
    let m = probe.wait(30, "nd/result", |r| r["job_id"] == "ok");
    assert_eq!(m.json["status"], "ok");
}

/// Mounts a tmpfs of `mib` MiB at `dir`; `None` (with the reason printed) when not allowed.
fn tmpfs(dir: &Path, mib: u32) -> Option<TmpfsGuard> {
    std::fs::create_dir_all(dir).unwrap();
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "SKIPPED disk-full test: cannot mount a tmpfs here (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(TmpfsGuard(dir.to_path_buf()))
}

struct TmpfsGuard(std::path::PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem holding `dir` with one file; returns its path.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![0u8; 64 << 10];
    while f.write_all(&block).is_ok() {}
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    p
}

/// Fault 4: with the state and outbox filesystem full, jobs wait in `processing/` (not
/// failed, not done), `/readyz` and the metrics say disk_full, an MQTT job is held
/// unacknowledged; once space returns everything completes without a restart. A stale
/// `.tmp` in the outbox is removed at start and counted.
#[test]
fn full_disk_is_survived_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol");
    let Some(_mount) = tmpfs(&vol, 8) else {
        return;
    };
    let broker = Broker::start(&tmp.path().join("broker"));
    let probe = Probe::start(broker.port, "probe-full", "nd/#");
    // The daemon's state, inbox and outbox live on the small filesystem (through links, so
    // the helpers find them where they expect); its log and the CT do not.
    let dd = tmp.path().join("d");
    std::fs::create_dir_all(&dd).unwrap();
    for sub in ["state", "inbox", "outbox"] {
        std::fs::create_dir_all(vol.join(sub)).unwrap();
        std::os::unix::fs::symlink(vol.join(sub), dd.join(sub)).unwrap();
    }
    let cfg = config_text(
        &dd,
        &model(),
        "",
        &mqtt_conf(broker.port, "noduled-full", ""),
    );
    std::fs::write(vol.join("outbox/.stale.json.1.tmp"), b"half a result").unwrap();
    let d = Daemon::start(&dd, &cfg);
    // Subscribed (its first session) before the job is published.
    probe.wait(20, "nd/status", |s| s["state"] == "ready");
    assert!(!vol.join("outbox/.stale.json.1.tmp").exists());
    assert_eq!(d.metric("noduled_stale_tmp_removed_total"), Some(1.0));
    std::fs::create_dir_all(vol.join("stage")).unwrap();
    std::fs::write(vol.join("stage/full.json"), ct_job("full", "P-full", 1)).unwrap();

    let filler = fill(&vol);
    std::fs::rename(vol.join("stage/full.json"), vol.join("inbox/full.json")).unwrap();
    probe.publish("nd/job", ct_job("full-mqtt", "P-full", 1).into_bytes());
    wait_for(30, "/readyz to say disk_full", || {
        d.get("/readyz")
            .filter(|(c, b)| *c == 503 && b.contains("disk_full"))
    });
    assert_eq!(d.metric("noduled_disk_full"), Some(1.0));
    std::thread::sleep(Duration::from_secs(2));
    assert!(d.result_for("full").is_none());
    assert_eq!(d.metric("noduled_jobs_failed_total"), Some(0.0));
    assert!(std::fs::read_dir(vol.join("state/done"))
        .unwrap()
        .next()
        .is_none());

    std::fs::remove_file(&filler).unwrap();
    assert_eq!(
        wait_for(30, "the inbox job's result", || d.result_for("full"))["status"],
        "ok"
    );
    let t0 = Instant::now();
    while !probe
        .on("nd/result")
        .iter()
        .any(|m| m.json["job_id"] == "full-mqtt")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no MQTT result:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d
        .result_for("full-mqtt")
        .is_some_and(|r| r["status"] == "ok"));
    wait_for(10, "ready again", || {
        (d.get("/readyz").map(|r| r.0) == Some(200)).then_some(())
    });
    assert_eq!(d.metric("noduled_disk_full"), Some(0.0));
    assert_eq!(d.metric("noduled_jobs_failed_total"), Some(0.0));
}

/// Spool leak: a job's spool files go with it whatever its outcome. A crash-looped job
/// found in `processing/` at start (its inline crop already decoded by an earlier attempt)
/// is abandoned, a binary MQTT crop whose JSON fails to parse (no patient_id) and one that
/// fails its checks (two nodules for one crop) fail: each leaves nothing in the spool.
#[test]
fn spool_files_go_with_abandoned_and_failed_jobs() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let probe = Probe::start(broker.port, "probe-spool", "nd/#");
    let dd = tmp.path().join("d");
    for sub in ["state/processing", "state/attempts", "state/spool"] {
        std::fs::create_dir_all(dd.join(sub)).unwrap();
    }
    let left = r#"{"job_id":"left","patient_id":"P-spool","crop":{"base64":"AAAA","format":"npy"},"nodules":[{"nodule_id":"n0"}]}"#;
    std::fs::write(dd.join("state/processing/left.json"), left).unwrap();
    std::fs::write(
        dd.join("state/spool/left.npy"),
        b"decoded by the attempt that crashed",
    )
    .unwrap();
    std::fs::write(
        dd.join("state/attempts/left.json"),
        r#"{"origin":"inbox","attempts":2}"#,
    )
    .unwrap();
    let mqtt = mqtt_conf(broker.port, "noduled-spool", "");
    let d = Daemon::start(&dd, &config_text(&dd, &model(), "max_attempts = 2", &mqtt));
    probe.wait(20, "nd/status", |s| s["state"] == "ready");
    let l = wait_for(20, "the abandoned job's result", || d.result_for("left"));
    assert!(
        l["error"]
            .as_str()
            .unwrap()
            .contains("jobs.max_attempts = 2"),
        "{l:#}"
    );

    for header in [
        r#"{"job_id":"spool-nopid","crop":{"format":"npy"},"nodules":[{"nodule_id":"a"}]}"#,
        r#"{"job_id":"spool-two","patient_id":"P-spool","crop":{"format":"npy"},"nodules":[{"nodule_id":"a"},{"nodule_id":"b"}]}"#,
    ] {
        let mut binary = header.as_bytes().to_vec();
        binary.push(0);
        binary.extend(b"\x93NUMPY not really a crop");
        probe.publish("nd/job", binary);
    }
    wait_for(30, "three failed jobs", || {
        (d.metric("noduled_jobs_failed_total") == Some(3.0)).then_some(())
    });
    // The output stage deletes a job's spool files before it counts the job.
    assert_eq!(d.files("state/spool"), Vec::<String>::new());
    let failed_mqtt = d
        .files("state/failed")
        .into_iter()
        .filter(|f| f.starts_with("mqtt-") && f.ends_with(".error.json"))
        .count();
    assert_eq!(failed_mqtt, 2);
}

/// Accepted (not merely queued in the kernel's backlog) TCP connections to local `port`,
/// from /proc/net/tcp: established entries whose socket has an inode (a process holds it),
/// counted by inode: the file is read in chunks while sockets change, so a line can repeat.
fn accepted_connections(port: u16) -> usize {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f
                .get(1)?
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let inode = *f.get(9)?;
            (local_port == Some(port) && f[3] == "01" && inode != "0").then(|| inode.to_string())
        })
        .collect::<std::collections::HashSet<String>>()
        .len()
}

/// The health endpoint holds at most its cap of connections: 40 idle clients fill its 16
/// slots (never more accepted at once), and once they go a new request is answered at once.
#[test]
fn health_endpoint_holds_at_most_its_connection_cap_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &config_text(tmp.path(), &model(), "", ""));
    let addr = std::fs::read_to_string(tmp.path().join("state/health.addr")).unwrap();
    let addr = addr.trim().to_string();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let idle: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let t0 = Instant::now();
    let mut most = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        most = most.max(accepted_connections(port));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(most, 16, "most connections accepted at once");
    drop(idle);
    let t1 = Instant::now();
    let (code, body) = d
        .get("/healthz")
        .expect("healthz after the idle clients went");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert!(
        t1.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t1.elapsed()
    );
}

/// Retention of `done/` and `failed/`: a job file older than `max_age_hours` goes, and past
/// `max_bytes` per folder (on disk) the oldest go first; each deletion is counted.
#[test]
fn done_and_failed_are_kept_within_retention() {
    let tmp = tempfile::tempdir().unwrap();
    let failed = tmp.path().join("state/failed");
    std::fs::create_dir_all(&failed).unwrap();
    let old = std::fs::File::create(failed.join("old.json")).unwrap();
    old.set_modified(std::time::SystemTime::now() - Duration::from_secs(2 * 3600))
        .unwrap();
    drop(old);
    // One small job file occupies one 4 KiB block: two exceed 6000 bytes.
    let cfg = config_text(tmp.path(), &model(), "", "")
        + "[retention]\nmax_age_hours = 1\nmax_bytes = 6000\n";
    let d = Daemon::start(tmp.path(), &cfg);
    for i in 0..3 {
        let id = format!("kept{i}");
        d.drop_job(&format!("{id}.json"), &ct_job(&id, "P-ret", 1));
        wait_for(30, "the job in done/", || {
            d.files("state/done")
                .contains(&format!("{id}.json"))
                .then_some(())
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for(10, "three files pruned", || {
        (d.metric("noduled_retention_pruned_total") == Some(3.0)).then_some(())
    });
    assert_eq!(d.files("state/done"), vec!["kept2.json".to_string()]);
    assert!(!failed.join("old.json").exists());
}

/// Fault 4, MQTT only: with no inbox job to make the worker write, an MQTT job refused for
/// space is held unacknowledged and `disk_full` shows; once space returns the MQTT side
/// stores the job itself, clears `disk_full` and the job gets its result (no restart).
#[test]
fn full_disk_with_only_an_mqtt_job_clears_once_it_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol");
    let Some(_mount) = tmpfs(&vol, 8) else {
        return;
    };
    let broker = Broker::start(&tmp.path().join("broker"));
    let probe = Probe::start(broker.port, "probe-full-mqtt", "nd/#");
    let dd = tmp.path().join("d");
    std::fs::create_dir_all(&dd).unwrap();
    for sub in ["state", "inbox", "outbox"] {
        std::fs::create_dir_all(vol.join(sub)).unwrap();
        std::os::unix::fs::symlink(vol.join(sub), dd.join(sub)).unwrap();
    }
    let mqtt = mqtt_conf(broker.port, "noduled-full-mqtt", "");
    let d = Daemon::start(&dd, &config_text(&dd, &model(), "", &mqtt));
    probe.wait(20, "nd/status", |s| s["state"] == "ready");

    let filler = fill(&vol);
    probe.publish("nd/job", ct_job("only-mqtt", "P-full", 1).into_bytes());
    wait_for(30, "/readyz to say disk_full", || {
        d.get("/readyz")
            .filter(|(c, b)| *c == 503 && b.contains("disk_full"))
    });
    assert!(d.files("state/mqtt-jobs").is_empty());
    std::fs::remove_file(&filler).unwrap();
    let m = probe.wait(60, "nd/result", |r| r["job_id"] == "only-mqtt");
    assert_eq!(m.json["status"], "ok");
    wait_for(10, "ready again", || {
        (d.get("/readyz").map(|r| r.0) == Some(200)).then_some(())
    });
    assert_eq!(d.metric("noduled_disk_full"), Some(0.0));
    assert_eq!(d.metric("noduled_jobs_failed_total"), Some(0.0));
}

/// Alerts are durable like results (fault 7): the broker refuses the alert topic (ACL) after
/// taking the result, then the daemon is SIGKILLed. The result stays unsent in the outbox
/// (a result leaves it only once its alert is acknowledged too), and after the restart,
/// with the ACL allowing it, the alert arrives with the same result_id.
#[test]
fn an_alert_refused_then_cut_off_by_a_crash_still_reaches_the_broker() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start_acl(
        &tmp.path().join("broker"),
        "topic readwrite #\ntopic deny nd/alert\n",
    );
    let probe = Probe::start(broker.port, "probe-alert", "nd/#");
    let dd = tmp.path().join("d");
    let extra =
        mqtt_conf(broker.port, "noduled-alert", "") + "[alert]\ncalibrated_threshold = 0.000001\n";
    let cfg = config_text(&dd, &model(), "", &extra)
        .replace("[outbox]\n", "[outbox]\nmax_publish_attempts = 100\n");
    let mut d = Daemon::start(&dd, &cfg);
    probe.wait(10, "nd/status", |s| s["state"] == "ready");
    d.drop_job("al.json", &ct_job("al", "P-alert", 1));
    let r = wait_for(30, "the result", || d.result_for("al"));
    let rid = r["result_id"].as_str().unwrap().to_string();
    assert!(r["alert"].is_object(), "{r:#}");
    wait_for(20, "the alert refused", || {
        (d.metric("noduled_publish_refusals_total") >= Some(1.0)).then_some(())
    });
    let name = format!("{rid}.json");
    assert!(d.files("outbox").contains(&name), "{:?}", d.files("outbox"));
    assert!(!d.files("outbox/sent").contains(&name));
    assert!(probe.on("nd/alert").is_empty());

    d.kill9();
    broker.set_acl("topic readwrite #\n");
    std::thread::sleep(Duration::from_millis(500));
    d.restart();
    let a = probe.wait(30, "nd/alert", |m| m["result_id"] == rid.as_str());
    assert_eq!(a.json["job_id"], "al");
    assert_eq!(a.json["nodules"], r["alert"]["nodules"]);
    wait_for(10, "the result in outbox/sent/", || {
        d.files("outbox/sent").contains(&name).then_some(())
    });
}

/// Alerts are never split from their results when the client's request queue is pressed
/// (fault 7): a broker that takes one message at a time (Mosquitto
/// `max_inflight_messages 1`, sent as Receive Maximum) and 301 alerting results waiting in
/// the outbox, far more than the queue holds: every result and its alert arrive, each
/// result once, and no attempt was voided half-queued.
#[test]
fn every_alert_goes_out_with_its_result_when_the_broker_takes_one_message_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().join("d");
    let alert = "[alert]\ncalibrated_threshold = 0.000001\n";
    let mut d = Daemon::start(&dd, &config_text(&dd, &model(), "", alert));
    d.drop_job("al.json", &ct_job("al", "P-alert", 1));
    let real = wait_for(30, "a real alerting result", || d.result_for("al"));
    assert!(real["alert"].is_object(), "{real:#}");
    assert!(d.term(30).success());
    // 300 more unsent results, copies of the real one under their own result ids.
    for i in 0..300 {
        let mut r = real.clone();
        let rid = format!("00000000-0000-4000-8000-{i:012}");
        r["result_id"] = rid.clone().into();
        r["job_id"] = format!("al{i}").into();
        std::fs::write(
            dd.join("outbox").join(format!("{rid}.json")),
            serde_json::to_vec(&r).unwrap(),
        )
        .unwrap();
    }
    let broker = Broker::start_conf(&tmp.path().join("broker"), "max_inflight_messages 1\n");
    let probe = Probe::start(broker.port, "probe-queue", "nd/#");
    let mqtt = mqtt_conf(broker.port, "noduled-queue", "max_inflight = 400\n");
    let d = Daemon::start(&dd, &config_text(&dd, &model(), "", &(mqtt + alert)));
    let ids = |topic: &str| -> Vec<String> {
        probe
            .on(topic)
            .iter()
            .map(|m| m.json["result_id"].as_str().unwrap_or("").to_string())
            .collect()
    };
    wait_for(120, "301 alerts", || {
        let mut a = ids("nd/alert");
        a.sort();
        a.dedup();
        (a.len() == 301).then_some(())
    });
    wait_for(30, "every result in outbox/sent/", || {
        (d.files("outbox/sent").len() == 301).then_some(())
    });
    let results = ids("nd/result");
    let unique: std::collections::HashSet<_> = results.iter().collect();
    assert_eq!(unique.len(), 301);
    assert_eq!(results.len(), 301, "a result was published more than once");
    for a in ids("nd/alert") {
        assert!(unique.contains(&a), "alert {a} without its result");
    }
    assert!(!d.log().contains("result attempt voided"), "{}", d.log());
}

/// Fault 3's other half: result files in the outbox that cannot be read as results (not
/// JSON, cut short, empty) move to `outbox/refused/` at once with an "unreadable" reason
/// instead of holding a publish slot, and the result behind them is still published.
#[test]
fn unreadable_outbox_files_are_refused_at_once_and_others_still_publish() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start_acl(&tmp.path().join("broker"), "topic readwrite #\n");
    let probe = Probe::start(broker.port, "probe-unreadable", "nd/#");
    let dd = tmp.path().join("d");
    let extra = mqtt_conf(broker.port, "noduled-unreadable", "max_inflight = 1\n");
    let mut d = Daemon::start(&dd, &config_text(&dd, &model(), "", &extra));
    probe.wait(10, "nd/status", |s| s["state"] == "ready");
    d.kill9();
    let outbox = dd.join("outbox");
    let bad = [
        ("0001-not-json.json", "{not json at all"),
        (
            "0002-cut-short.json",
            "{\"result_id\": \"0002\", \"job_id\": \"J\", \"nod",
        ),
        ("0003-empty.json", ""),
    ];
    for (name, text) in bad {
        std::fs::write(outbox.join(name), text).unwrap();
    }
    d.restart();
    d.drop_job("after.json", &ct_job("after", "P-unreadable", 1));
    let m = probe.wait(60, "nd/result", |r| r["job_id"] == "after");
    assert_eq!(m.json["status"], "ok");
    wait_for(20, "the 3 unreadable files in outbox/refused/", || {
        let refused = d.files("outbox/refused");
        bad.iter()
            .all(|(name, _)| {
                let stem = name.trim_end_matches(".json");
                refused.iter().any(|f| f == name)
                    && refused.iter().any(|f| f == &format!("{stem}.reason.json"))
            })
            .then_some(())
    });
    for (name, _) in bad {
        let stem = name.trim_end_matches(".json");
        let reason = std::fs::read_to_string(outbox.join(format!("refused/{stem}.reason.json")));
        assert!(reason.unwrap().contains("unreadable"), "{name}");
        assert!(!outbox.join(name).exists(), "{name} left in the outbox");
    }
}
