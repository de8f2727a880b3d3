//! The daemon soak benchmark (run by `scripts/soak`; not a test): N jobs (half over MQTT,
//! half through the inbox) into the real `noduled run` with models/demo and a real
//! Mosquitto, while the broker is restarted every `--broker-every-secs` and the daemon is
//! SIGKILLed `--kills` times (and restarted). It reports unique results delivered on
//! `<prefix>/result` (must equal N), duplicates by `result_id`, jobs/minute, and the daemon's
//! RSS when it became ready after its last restart and at the end (and every 5 s, with the
//! results delivered so far), as JSON on stdout and in `--out/soak.json`.
//!
//! Arguments: `--jobs N` (1000), `--out DIR` (a fresh temp folder), `--broker-every-secs S`
//! (20), `--kills K` (3), `--timeout-secs T` (3600).

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    jobs: usize,
    out: PathBuf,
    broker_every: Duration,
    kills: usize,
    timeout: Duration,
}

fn args() -> Args {
    let mut a = Args {
        jobs: 1000,
        out: std::env::temp_dir().join(format!("noduled-soak-{}", std::process::id())),
        broker_every: Duration::from_secs(20),
        kills: 3,
        timeout: Duration::from_secs(3600),
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let val = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--jobs" => a.jobs = val.parse().expect("--jobs N"),
            "--out" => a.out = PathBuf::from(val),
            "--broker-every-secs" => {
                a.broker_every = Duration::from_secs(val.parse().expect("secs"))
            }
            "--kills" => a.kills = val.parse().expect("--kills K"),
            "--timeout-secs" => a.timeout = Duration::from_secs(val.parse().expect("secs")),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

struct Broker {
    conf: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {d}/\nautosave_interval 1\nmax_queued_messages 100000\nmax_inflight_messages 100\nlog_dest file {d}/mosquitto.log\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let mut b = Self {
            conf,
            port,
            child: None,
        };
        b.up();
        b
    }

    fn up(&mut self) {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("mosquitto (bash scripts/test installs it)");
        self.child = Some(
            Command::new(bin)
                .arg("-c")
                .arg(&self.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(c.id(), "TERM");
            let _ = c.wait();
        }
        self.up();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Daemon {
    dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn start(&mut self) -> u64 {
        let _ = std::fs::remove_file(self.dir.join("state/health.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let bin = root().join("target/release/noduled");
        self.child = Some(
            Command::new(bin)
                .args(["run", "--config"])
                .arg(self.dir.join("noduled.toml"))
                .env("NODULED_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let t = Instant::now();
        while !self.ready() {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "daemon not ready: see {}",
                self.dir.join("daemon.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.rss_kib()
    }

    fn ready(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(addr) = std::fs::read_to_string(self.dir.join("state/health.addr")) else {
            return false;
        };
        let Ok(mut s) = std::net::TcpStream::connect(addr.trim()) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(s, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.starts_with("HTTP/1.1 200")
    }

    fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn term(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(c.id(), "TERM");
            let _ = c.wait();
        }
    }
}

/// Subscribes to the result topic (persistent session) and records (job_id, result_id).
fn subscriber(port: u16, seen: Arc<Mutex<Vec<(String, String)>>>) {
    let mut o = MqttOptions::new("soak-sub", "127.0.0.1", port);
    o.set_clean_start(false)
        .set_session_expiry_interval(Some(3600))
        .set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(Some(16 << 20));
    let (client, mut conn) = Client::new(o, 100);
    std::thread::spawn(move || loop {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe("nd/result", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                        let id = |k: &str| v[k].as_str().unwrap_or("").to_string();
                        seen.lock().unwrap().push((id("job_id"), id("result_id")));
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
}

/// Publishes `payloads` QoS 1, in batches whose PUBACKs are awaited; a batch cut by a
/// broker restart is sent again (the daemon takes an identical payload once).
fn publish_all(port: u16, payloads: Vec<Vec<u8>>) {
    for batch in payloads.chunks(25) {
        loop {
            let mut o = MqttOptions::new(
                format!("soak-pub-{}", std::process::id()),
                "127.0.0.1",
                port,
            );
            o.set_keep_alive(Duration::from_secs(5));
            let (client, mut conn) = Client::new(o, batch.len() + 10);
            for p in batch {
                let _ = client.publish("nd/job", QoS::AtLeastOnce, false, p.clone());
            }
            let mut acked = 0;
            let t = Instant::now();
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                    Err(_) => break,
                    _ => {}
                }
                if acked == batch.len() || t.elapsed() > Duration::from_secs(20) {
                    break;
                }
            }
            let _ = client.disconnect();
            if acked == batch.len() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn job(i: usize, volume: &Path, coord: &serde_json::Value) -> String {
    serde_json::json!({"job_id": format!("soak-{i:05}"), "patient_id": format!("P{}", i % 17),
        "volume": volume, "nodules": [{"nodule_id": "n0", "coord_lps_mm": coord}]})
    .to_string()
}

fn main() {
    let a = args();
    std::fs::create_dir_all(&a.out).unwrap();
    let out = a.out.canonicalize().unwrap();
    let mut broker = Broker::start(&out.join("broker"));
    let example = root().join("examples");
    let ex: serde_json::Value =
        serde_json::from_slice(&std::fs::read(example.join("lung1.job.json")).unwrap()).unwrap();
    let coord = ex["nodules"][0]["coord_lps_mm"].clone();
    let volume = example.join("lung1.nii.gz");
    let d = out.join("d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("noduled.toml"),
        format!(
            "state_dir = \"{d}/state\"\nshutdown_timeout_secs = 20\n[model]\npath = \"{m}\"\n[jobs]\ndata_roots = [\"{e}\"]\n[inbox]\npath = \"{d}/inbox\"\n[outbox]\npath = \"{d}/outbox\"\n[health]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nenabled = true\nhost = \"127.0.0.1\"\nport = {p}\nclient_id = \"soak\"\ntopic_prefix = \"nd\"\nreconnect_max_secs = 2\n",
            d = d.display(), m = root().join("models/demo").display(), e = example.display(), p = broker.port
        ),
    )
    .unwrap();
    let mut daemon = Daemon {
        dir: d.clone(),
        child: None,
    };
    let rss_first = daemon.start();
    let seen = Arc::new(Mutex::new(Vec::new()));
    subscriber(broker.port, seen.clone());
    std::thread::sleep(Duration::from_millis(500));

    let t0 = Instant::now();
    let mqtt_jobs: Vec<Vec<u8>> = (0..a.jobs)
        .filter(|i| i % 2 == 0)
        .map(|i| job(i, &volume, &coord).into_bytes())
        .collect();
    let port = broker.port;
    let publisher = std::thread::spawn(move || publish_all(port, mqtt_jobs));
    for i in (0..a.jobs).filter(|i| i % 2 == 1) {
        let tmp = d.join(format!("soak-{i}.writing"));
        std::fs::write(&tmp, job(i, &volume, &coord)).unwrap();
        std::fs::rename(&tmp, d.join("inbox").join(format!("soak-{i:05}.json"))).unwrap();
    }

    let (mut kills, mut broker_restarts, mut rss_ready) = (0, 0, rss_first);
    let mut last_broker = Instant::now();
    let mut samples: Vec<serde_json::Value> = Vec::new();
    let mut last_sample = Instant::now();
    let kill_every = Duration::from_secs(45);
    let mut done_at = None;
    while t0.elapsed() < a.timeout {
        std::thread::sleep(Duration::from_millis(250));
        let unique: HashSet<String> = seen.lock().unwrap().iter().map(|p| p.0.clone()).collect();
        if unique.len() >= a.jobs {
            done_at = Some(t0.elapsed());
            break;
        }
        if last_sample.elapsed() >= Duration::from_secs(5) {
            samples.push(serde_json::json!({"t_s": t0.elapsed().as_secs(), "delivered": unique.len(), "rss_kib": daemon.rss_kib()}));
            last_sample = Instant::now();
        }
        if last_broker.elapsed() >= a.broker_every {
            broker.restart();
            broker_restarts += 1;
            last_broker = Instant::now();
        }
        if kills < a.kills && t0.elapsed() >= kill_every * (kills as u32 + 1) {
            daemon.kill9();
            kills += 1;
            rss_ready = daemon.start();
        }
    }
    let _ = publisher.join();
    let rss_end = daemon.rss_kib();
    daemon.term();

    let all = seen.lock().unwrap().clone();
    let mut by_job: HashMap<String, HashSet<String>> = HashMap::new();
    for (j, r) in &all {
        by_job.entry(j.clone()).or_default().insert(r.clone());
    }
    let unique_results: HashSet<&String> = all.iter().map(|p| &p.1).collect();
    let elapsed = done_at.unwrap_or(t0.elapsed()).as_secs_f64();
    let report = serde_json::json!({
        "jobs": a.jobs,
        "unique_results_delivered": by_job.len(),
        "unique_result_ids": unique_results.len(),
        "jobs_with_more_than_one_result_id": by_job.values().filter(|s| s.len() > 1).count(),
        "messages_received": all.len(),
        "duplicate_deliveries_by_result_id": all.len() - unique_results.len(),
        "all_delivered": by_job.len() == a.jobs,
        "elapsed_s": (elapsed * 10.0).round() / 10.0,
        "jobs_per_minute": ((a.jobs as f64) / elapsed * 60.0 * 10.0).round() / 10.0,
        "broker_restarts": broker_restarts,
        "daemon_sigkills": kills,
        "rss_kib_first_start": rss_first,
        "rss_kib_after_last_restart": rss_ready,
        "rss_kib_end": rss_end,
        "model": "models/demo",
        "rss_samples": samples,
        "out": out,
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    std::fs::write(out.join("soak.json"), &text).unwrap();
    println!("{text}");
    if by_job.len() != a.jobs {
        std::process::exit(1);
    }
}
