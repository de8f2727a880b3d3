//! The daemon end to end: the real binary as a child process, a real inbox folder, a real
//! Mosquitto broker (started on a free loopback port), the fixture model and CT.

use crate::daemon_support::*;
use std::time::Duration;

/// The job every test scores: the fixture's real chest CT at its lesion coordinate.
fn job(_d: &Daemon, job_id: &str, patient_id: &str, nodules: usize) -> String {
    ct_job(job_id, patient_id, nodules)
}

fn mqtt_conf(port: u16, client: &str, extra: &str) -> String {
    format!(
        "[mqtt]\nenabled = true\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"{client}\"\ntopic_prefix = \"nd\"\n\
         reconnect_max_secs = 1\nstatus_interval_secs = 2\n{extra}"
    )
}

#[test]
fn folder_jobs_good_and_bad_and_the_daemon_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        tmp.path(),
        &config_text(
            tmp.path(),
            &model(),
            "",
            "[alert]\ncalibrated_threshold = 0.01\n",
        ),
    );

    d.drop_job("good1.json", &job(&d, "good1", "P1", 1));
    let r = wait_for(30, "result of good1", || d.result_for("good1"));
    assert_eq!(r["status"], "ok", "{r:#}");
    assert_eq!(r["patient_id"], "P1");
    assert_eq!(r["nodules"].as_array().unwrap().len(), 1);
    assert!(r["result_id"].as_str().unwrap().len() == 36);
    assert!(r["model"]["id"].is_string() && r["model"]["backend"].is_string());
    assert!(r["timings"]["total_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(r["input"]["origin"], "inbox");
    let cal = r["nodules"][0]["score"]["calibrated"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&cal));
    assert!(
        r["alert"]["nodules"][0]["nodule_id"] == "n0",
        "threshold 0.01 must alert: {r:#}"
    );
    wait_for(10, "good1 in done/", || {
        d.files("state/done")
            .contains(&"good1.json".to_string())
            .then_some(())
    });

    // A job written in place is taken only once closed, never half-written.
    {
        use std::io::Write;
        let body = job(&d, "slow", "P1", 1);
        let (a, b) = body.split_at(body.len() / 2);
        let mut f = std::fs::File::create(d.dir.join("inbox/slow.json")).unwrap();
        f.write_all(a.as_bytes()).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert!(d.files("state/failed").is_empty() && d.result_for("slow").is_none());
        assert!(d.files("inbox").contains(&"slow.json".to_string()));
        f.write_all(b.as_bytes()).unwrap();
    }
    assert_eq!(
        wait_for(30, "result of slow", || d.result_for("slow"))["status"],
        "ok"
    );

    // Malformed JSON, an unknown field, a path outside the data roots, a 1 GiB job file
    // (sparse: no disk used; refused by its size before any read).
    std::fs::write(d.dir.join("bad_json.tmp"), b"{\"job_id\": \"x\", ").unwrap();
    std::fs::rename(
        d.dir.join("bad_json.tmp"),
        d.dir.join("inbox/bad_json.json"),
    )
    .unwrap();
    d.drop_job(
        "bad_field.json",
        r#"{"job_id":"bad_field","patient_id":"P1","nodules":[],"priority":"high"}"#,
    );
    d.drop_job(
        "bad_root.json",
        r#"{"job_id":"bad_root","patient_id":"P1","volume":"/etc/passwd","nodules":[{"nodule_id":"a","coord_lps_mm":[0,0,0]}]}"#,
    );
    let huge = d.dir.join("huge.tmp");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    std::fs::rename(&huge, d.dir.join("inbox/huge.json")).unwrap();

    for (name, needle) in [
        ("bad_json", "job JSON"),
        ("bad_field", "priority"),
        ("bad_root", "outside data_roots"),
        ("huge", "1073741824 bytes is more than jobs.max_job_bytes"),
    ] {
        let err_file = format!("{name}.error.json");
        let job_file = format!("{name}.json");
        wait_for(20, &err_file, || {
            let failed = d.files("state/failed");
            (failed.contains(&err_file) && failed.contains(&job_file)).then_some(())
        });
        let e: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.dir.join("state/failed").join(&err_file)).unwrap(),
        )
        .unwrap();
        assert_eq!(e["status"], "error");
        assert!(
            e["error"].as_str().unwrap().contains(needle),
            "{name}: {e:#}"
        );
        // The same error result is in the outbox for the subscribers.
        assert!(d.results().iter().any(|r| r["result_id"] == e["result_id"]));
    }
    assert!(
        std::fs::metadata(d.dir.join("state/failed/huge.json"))
            .unwrap()
            .len()
            == 1 << 30
    );

    d.drop_job("good2.json", &job(&d, "good2", "P2", 2));
    let r2 = wait_for(30, "result of good2", || d.result_for("good2"));
    assert_eq!(r2["status"], "ok");
    assert_eq!(r2["nodules"].as_array().unwrap().len(), 2);

    wait_for(10, "7 jobs counted", || {
        (d.metric("noduled_job_latency_seconds_count") == Some(7.0)).then_some(())
    });
    assert_eq!(d.metric("noduled_jobs_done_total"), Some(3.0));
    assert_eq!(d.metric("noduled_jobs_failed_total"), Some(4.0));
    assert_eq!(d.metric("noduled_queue_depth"), Some(0.0));
    assert!(d.get("/metrics").unwrap().1.contains("noduled_model_info{"));
    // A CPU build (the CI one) runs where it was asked: no fallback to report.
    if !cfg!(feature = "cuda") {
        let metrics = d.get("/metrics").unwrap().1;
        assert!(metrics.contains("\nnoduled_device_fallback{reason=\"\"} 0\n"));
        assert_eq!(d.get("/healthz").unwrap().1, "ok\n");
    }
    assert_eq!(d.get("/healthz").unwrap().0, 200);
    assert_eq!(d.get("/nope").unwrap().0, 404);
    let st = d.term(20);
    assert!(st.success(), "{st}: {}", d.log());
}

#[test]
fn mqtt_jobs_in_results_status_and_alerts_out() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let probe = Probe::start(broker.port, "probe-io", "nd/#");
    let extra = mqtt_conf(
        broker.port,
        "noduled-io",
        "max_packet_bytes = 8192\n[alert]\ncalibrated_threshold = 0.01\n",
    );
    let dd = tmp.path().join("d");
    let mut d = Daemon::start(
        &dd,
        &config_text(&dd, &model(), "max_job_bytes = 4096", &extra),
    );

    let status = probe.wait(10, "nd/status", |s| s["state"] == "ready");
    assert!(
        status.json["model"]["id"].is_string()
            && status.json["backend"].is_string()
            && status.json.get("fallback").is_some(),
        "{:#}",
        status.json
    );
    assert!(status.json["outbox"]["max_bytes"].as_u64().unwrap() > 0);

    // By folder in, MQTT out (result and alert).
    d.drop_job("f1.json", &job(&d, "f1", "P-folder", 1));
    let m = probe.wait(30, "nd/result", |r| r["job_id"] == "f1");
    assert_eq!(m.json["status"], "ok");
    // Issue 16: no patient id in topic names; the payload keeps it.
    assert_eq!(m.topic, "nd/result");
    assert_eq!(m.json["patient_id"], "P-folder");
    let a = probe.wait(10, "nd/alert", |a| a["job_id"] == "f1");
    assert_eq!(a.json["result_id"], m.json["result_id"]);
    wait_for(10, "f1 moved to sent/", || {
        d.files("outbox/sent")
            .contains(&format!("{}.json", m.json["result_id"].as_str().unwrap()))
            .then_some(())
    });

    // By MQTT in, MQTT and outbox out.
    probe.publish("nd/job", job(&d, "m1", "P-mqtt", 1).into_bytes());
    let m1 = probe.wait(30, "nd/result", |r| r["job_id"] == "m1");
    assert_eq!(m1.json["status"], "ok");
    assert_eq!(m1.json["input"]["origin"], "mqtt");
    wait_for(5, "m1 in the outbox", || d.result_for("m1"));

    // Malformed payload: an error result; the daemon keeps serving.
    probe.publish("nd/job", b"{not json".to_vec());
    let bad = probe.wait(30, "nd/result", |r| r["status"] == "error");
    assert!(bad.json["error"].as_str().unwrap().contains("job JSON"));

    // Over the job limit (4096) but under the packet limit: an error result.
    let padded = format!(
        "{{\"job_id\":\"big\",\"patient_id\":\"P-big\",\"nodules\":[],\"pad\":\"{}\"}}",
        "x".repeat(5000)
    );
    probe.publish("nd/job", padded.into_bytes());
    // Refused by its size before parsing: no patient id in the result.
    let big = probe.wait(30, "nd/result", |r| {
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_job_bytes"))
    });
    assert!(
        big.json["error"]
            .as_str()
            .unwrap()
            .contains("more than jobs.max_job_bytes"),
        "{:#}",
        big.json
    );
    // Over the packet limit (8192, announced to the broker): never delivered, nothing
    // allocated; a later job is served.
    probe.publish(
        "nd/job",
        format!("{{\"pad\":\"{}\"}}", "y".repeat(20_000)).into_bytes(),
    );
    probe.publish("nd/job", job(&d, "m2", "P-mqtt", 1).into_bytes());
    probe.wait(30, "nd/result", |r| r["job_id"] == "m2");
    let log = d.log();
    assert!(
        !log.contains("PayloadSizeLimitExceeded") && !log.contains("MQTT connection lost"),
        "{log}"
    );

    // SIGTERM: clean exit, a retained `stopped` status (not the Will).
    let st = d.term(20);
    assert!(st.success(), "{st}: {}", d.log());
    probe.wait(10, "nd/status", |s| s["state"] == "stopped");
    std::thread::sleep(Duration::from_millis(500));
    let statuses: Vec<String> = probe
        .on("nd/status")
        .iter()
        .map(|m| m.json["state"].to_string())
        .collect();
    assert!(
        !statuses.iter().any(|s| s.contains("lost")),
        "{statuses:?}\n{}",
        d.log()
    );
}

#[test]
fn broker_down_while_20_jobs_arrive_then_back_all_delivered() {
    let tmp = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(&tmp.path().join("broker"));
    let probe = Probe::start(broker.port, "probe-down", "nd/result/#");
    let dd = tmp.path().join("d");
    let d = Daemon::start(
        &dd,
        &config_text(
            &dd,
            &model(),
            "",
            &mqtt_conf(broker.port, "noduled-down", ""),
        ),
    );
    wait_for(10, "daemon connected", || {
        (d.metric("noduled_mqtt_connected") == Some(1.0)).then_some(())
    });

    broker.stop();
    wait_for(10, "daemon to notice the broker is down", || {
        (d.metric("noduled_mqtt_connected") == Some(0.0)).then_some(())
    });
    let body = job(&d, "PLACEHOLDER", "P-down", 1);
    for i in 0..20 {
        d.drop_job(
            &format!("j{i:02}.json"),
            &body.replace("PLACEHOLDER", &format!("down{i:02}")),
        );
    }
    wait_for(60, "20 unpublished results in the outbox", || {
        (d.files("outbox").len() == 20).then_some(())
    });
    wait_for(5, "outbox depth 20 in the metrics", || {
        (d.metric("noduled_outbox_depth") == Some(20.0)).then_some(())
    });

    broker.restart();
    let ids = wait_for(30, "20 results on MQTT", || {
        let mut ids: Vec<(String, String)> = probe
            .on("nd/result")
            .iter()
            .map(|m| {
                (
                    m.json["job_id"].as_str().unwrap().to_string(),
                    m.json["result_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        ids.sort();
        ids.dedup();
        (ids.len() >= 20).then_some(ids)
    });
    let jobs: std::collections::BTreeSet<&str> = ids.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(jobs.len(), 20, "one result_id per job: {ids:?}");
    wait_for(10, "outbox drained to sent/", || {
        (d.files("outbox").is_empty() && d.files("outbox/sent").len() == 20).then_some(())
    });
    assert_eq!(d.metric("noduled_results_published_total"), Some(20.0));
}

#[test]
fn sigkill_mid_job_then_restart_completes_the_job_once() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start(&tmp.path().join("broker"));
    let probe = Probe::start(broker.port, "probe-kill", "nd/#");
    let dd = tmp.path().join("d");
    let mut d = Daemon::start(
        &dd,
        &config_text(
            &dd,
            &model(),
            "",
            &mqtt_conf(broker.port, "noduled-kill", ""),
        ),
    );
    probe.wait(10, "nd/status", |s| s["state"] == "ready");

    d.drop_job("long.json", &job(&d, "long", "P-kill", 12));
    wait_for(20, "the job in processing/", || {
        d.files("state/processing")
            .contains(&"long.json".to_string())
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    assert!(
        d.result_for("long").is_none(),
        "killed mid-job, before any result"
    );
    probe.wait(10, "nd/status", |s| s["state"] == "lost");

    // While the daemon is down a job arrives over MQTT: the broker keeps it in the session.
    probe.publish("nd/job", job(&d, "queued", "P-kill", 1).into_bytes());
    std::thread::sleep(Duration::from_millis(200));

    d.restart();
    let r = wait_for(60, "the long job's result", || d.result_for("long"));
    assert_eq!(r["status"], "ok");
    assert_eq!(r["nodules"].as_array().unwrap().len(), 12);
    wait_for(30, "the queued MQTT job's result", || {
        d.result_for("queued")
    });
    wait_for(10, "long in done/", || {
        d.files("state/done")
            .contains(&"long.json".to_string())
            .then_some(())
    });
    wait_for(10, "processing/ empty", || {
        d.files("state/processing").is_empty().then_some(())
    });
    assert_eq!(
        d.results().iter().filter(|r| r["job_id"] == "long").count(),
        1,
        "one result file for the job"
    );
    let m = probe.wait(20, "nd/result", |m| m["job_id"] == "long");
    let all: Vec<_> = probe
        .on("nd/result")
        .into_iter()
        .filter(|x| x.json["job_id"] == "long")
        .collect();
    assert!(all
        .iter()
        .all(|x| x.json["result_id"] == m.json["result_id"]));
    assert_eq!(m.json["result_id"], r["result_id"]);
    probe.wait(10, "nd/status", |s| s["state"] == "ready");
}

#[test]
fn systemd_notify_watchdog_reload_and_stop() {
    use std::os::unix::net::UnixDatagram;
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let msgs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let m2 = msgs.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = sock.recv(&mut buf) {
                m2.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    });
    let seen = |needle: &str| {
        msgs.lock()
            .unwrap()
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    };

    // Model path is a `current` link, as in a model store.
    let store = tmp.path().join("models");
    std::fs::create_dir_all(&store).unwrap();
    let broken = store.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("config.json"), "BROKEN: not a model config").unwrap();
    let current = store.join("current");
    std::os::unix::fs::symlink(model(), &current).unwrap();
    let dd = tmp.path().join("d");
    let mut d = Daemon::start_env(
        &dd,
        &config_text(&dd, &current, "", ""),
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    wait_for(5, "READY=1", || (seen("READY=1") == 1).then_some(()));
    wait_for(5, "two WATCHDOG=1 pings", || {
        (seen("WATCHDOG=1") >= 2).then_some(())
    });

    // A broken model installed as current: RELOADING, then READY with the old model kept.
    std::fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(&broken, &current).unwrap();
    signal(d.pid(), "HUP");
    wait_for(10, "RELOADING=1 then READY=1", || {
        (seen("RELOADING=1") == 1 && seen("READY=1") == 2).then_some(())
    });
    assert!(msgs
        .lock()
        .unwrap()
        .iter()
        .any(|m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC=")));
    assert!(
        d.log().contains("reload failed; keeping the current model"),
        "{}",
        d.log()
    );
    assert_eq!(d.get("/readyz").unwrap().0, 200);
    // The failed reload is visible beyond the journal (issue 15).
    assert_eq!(d.metric("noduled_reload_failures_total"), Some(1.0));
    assert_eq!(d.metric("noduled_last_reload_ok"), Some(0.0));
    let health = d.get("/healthz").unwrap().1;
    assert!(health.contains("last reload: error at "), "{health}");
    d.drop_job(
        "after_bad_reload.json",
        &job(&d, "after_bad_reload", "P1", 1),
    );
    assert_eq!(
        wait_for(30, "a result after the failed reload", || d
            .result_for("after_bad_reload"))["status"],
        "ok"
    );

    // A good model installed: switched.
    std::fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(model(), &current).unwrap();
    signal(d.pid(), "HUP");
    wait_for(10, "second reload", || {
        (seen("RELOADING=1") == 2 && seen("READY=1") == 3).then_some(())
    });
    assert!(d.log().contains("model reloaded"));
    assert_eq!(d.metric("noduled_last_reload_ok"), Some(1.0));
    assert_eq!(d.metric("noduled_reload_failures_total"), Some(1.0));

    let st = d.term(20);
    assert!(st.success());
    assert_eq!(seen("STOPPING=1"), 1);
}

#[test]
fn unknown_config_key_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[inbox]\nenabled = true\npaht = \"/x\"\n").unwrap();
    let out = std::process::Command::new(crate::util::bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("paht") && err.contains("bad.toml"), "{err}");

    // A wildcard job topic would take jobs it never runs: refused, naming the key (issue 15).
    std::fs::write(&cfg, "[mqtt]\nenabled = true\njob_topic = \"x/job/#\"\n").unwrap();
    let out = std::process::Command::new(crate::util::bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.trim().lines().count() == 1 && err.contains("mqtt.job_topic"),
        "{err}"
    );
}

#[test]
fn sigterm_mid_job_finishes_the_nodule_then_resumes_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(tmp.path(), &config_text(tmp.path(), &model(), "", ""));
    d.drop_job("long.json", &job(&d, "long", "P1", 12));
    wait_for(20, "the job in processing/", || {
        d.files("state/processing")
            .contains(&"long.json".to_string())
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    let st = d.term(20);
    assert!(st.success(), "{st}: {}", d.log());
    // It stopped after the nodule in hand, not after the whole job.
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    assert!(d.log().contains("job left in processing/"), "{}", d.log());
    assert!(d.result_for("long").is_none());
    assert!(d
        .files("state/processing")
        .contains(&"long.json".to_string()));

    d.restart();
    let r = wait_for(60, "the resumed job's result", || d.result_for("long"));
    assert_eq!(r["status"], "ok");
    assert_eq!(r["nodules"].as_array().unwrap().len(), 12);
}

#[test]
fn outbox_bounds_drop_results_and_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    // A 1-byte bound: every unpublished result is dropped as soon as it is written.
    let cfg = config_text(tmp.path(), &model(), "", "")
        .replace("[outbox]\n", "[outbox]\nmax_bytes = 1\n");
    let d = Daemon::start(tmp.path(), &cfg);
    d.drop_job("a.json", &job(&d, "a", "P1", 1));
    d.drop_job("b.json", &job(&d, "b", "P1", 1));
    wait_for(30, "two jobs done", || {
        (d.metric("noduled_jobs_done_total") == Some(2.0)).then_some(())
    });
    wait_for(10, "two results dropped", || {
        (d.metric("noduled_outbox_dropped_total") == Some(2.0)).then_some(())
    });
    assert!(d.results().is_empty());
    assert_eq!(d.metric("noduled_outbox_bytes"), Some(0.0));
    assert!(d.log().contains("outbox bound reached"));
}

/// With `model.public_key` set, the daemon loads only bundles signed with that key: a
/// checkpoint folder or an unsigned bundle is refused at start (exit 2, one line), a signed
/// bundle serves.
#[test]
fn public_key_admits_only_signed_bundles() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(crate::util::bin())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let bundle = tmp.path().join("bundle");
    let keybase = tmp.path().join("site");
    run(&[
        "convert",
        "--checkpoints",
        crate::util::reference().join("model").to_str().unwrap(),
        "--out",
        bundle.to_str().unwrap(),
    ]);
    run(&["bundle", "keygen", "--out", keybase.to_str().unwrap()]);
    let key_line = format!(
        "public_key = \"{}\"\n",
        tmp.path().join("site.pub").display()
    );
    let refused = |model: &std::path::Path, want: &str| {
        let dir = tmp.path().join(format!("d{}", want.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = config_text(&dir, model, "", "").replacen(
            "[model]\n",
            &format!("[model]\n{key_line}"),
            1,
        );
        let path = dir.join("noduled.toml");
        std::fs::write(&path, cfg).unwrap();
        let out = std::process::Command::new(crate::util::bin())
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("");
        assert!(last.contains(want), "{err}");
    };
    refused(&crate::util::reference().join("model"), "not a bundle");
    refused(&bundle, "only signed bundles");
    run(&[
        "bundle",
        "sign",
        bundle.to_str().unwrap(),
        "--key",
        tmp.path().join("site.key").to_str().unwrap(),
    ]);
    let dir = tmp.path().join("ok");
    let cfg = config_text(&dir, &bundle, "", "").replacen(
        "[model]\n",
        &format!("[model]\n{key_line}"),
        1,
    );
    let mut d = Daemon::start(&dir, &cfg);
    assert_eq!(d.get("/readyz").map(|(code, _)| code), Some(200));
    d.term(30);
}
