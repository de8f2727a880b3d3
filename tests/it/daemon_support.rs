//! Real parts for the daemon tests: a Mosquitto broker on a free loopback port (with
//! persistence, so a restart keeps queued QoS 1 messages), the noduled binary as a child
//! process with its own state folder, an MQTT probe client, and job files.
#![allow(dead_code)]

use crate::util::{bin, reference};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Polls `f` every 50 ms until it returns `Some` or `secs` (times `util::time_scale()`) pass
/// (then panics with `what`).
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let secs = secs * crate::util::time_scale();
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            panic!("timed out after {secs} s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn mosquitto_bin() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("mosquitto not found: install the Debian package `mosquitto` (bash scripts/test does)");
}

/// A Mosquitto broker the test owns.
pub struct Broker {
    /// Its port on 127.0.0.1.
    pub port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Starts a broker with persistence in `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_conf(dir, "")
    }

    /// Starts a broker whose Mosquitto ACL file (`acl_file`) holds `acl`.
    pub fn start_acl(dir: &Path, acl: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let acl_path = dir.join("acl");
        std::fs::write(&acl_path, acl).unwrap();
        Self::start_conf(dir, &format!("acl_file {}\n", acl_path.display()))
    }

    /// Rewrites the ACL file and makes the broker reload it (SIGHUP).
    pub fn set_acl(&self, acl: &str) {
        let dir = self.conf.parent().unwrap();
        std::fs::write(dir.join("acl"), acl).unwrap();
        signal(self.child.as_ref().unwrap().id(), "HUP");
    }

    /// Starts a broker with `extra` lines appended to its configuration.
    pub fn start_conf(dir: &Path, extra: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        // Run as root, mosquitto switches to user `mosquitto`, which cannot write here.
        let me = Command::new("id")
            .arg("-un")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        std::fs::write(
            &conf,
            format!(
                "user {me}\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 autosave_interval 1\nmax_queued_messages 10000\nlog_dest file {}/mosquitto.log\nlog_type all\n{extra}",
                dir.display(),
                dir.display(),
                me = if me.is_empty() { "root".to_string() } else { me },
            ),
        )
        .unwrap();
        let mut b = Self {
            port,
            conf,
            child: None,
        };
        b.restart();
        b
    }

    /// Starts it again (same port, same persistence).
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        wait_for(10, "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    /// Stops it with SIGTERM (it saves its persistence) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let _ = c.wait();
        }
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

/// Sends a signal by name to one process.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// One MQTT message the probe saw.
#[derive(Debug, Clone)]
pub struct Msg {
    /// Topic.
    pub topic: String,
    /// Payload as JSON (Null when not JSON).
    pub json: serde_json::Value,
    /// Retained flag.
    pub retain: bool,
}

/// An MQTT client that subscribes to everything under a prefix (persistent session) and
/// records what it receives; reconnects on its own.
pub struct Probe {
    client: Client,
    /// Every message received, in order.
    pub msgs: Arc<Mutex<Vec<Msg>>>,
}

impl Probe {
    /// Connects to `port` and subscribes to `filter`.
    pub fn start(port: u16, id: &str, filter: &str) -> Self {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_start(false)
            .set_session_expiry_interval(Some(600))
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(Some(16 << 20));
        let (client, mut conn) = Client::new(o, 1000);
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let (m, c, f) = (msgs.clone(), client.clone(), filter.to_string());
        let connected = Arc::new(Mutex::new(false));
        let conn_flag = connected.clone();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c.try_subscribe(f.clone(), QoS::AtLeastOnce);
                        *conn_flag.lock().unwrap() = true;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {}
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let json =
                            serde_json::from_slice(&p.payload).unwrap_or(serde_json::Value::Null);
                        m.lock().unwrap().push(Msg {
                            topic: String::from_utf8_lossy(&p.topic).into(),
                            json,
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(rumqttc::v5::ConnectionError::RequestsDone) => return,
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        wait_for(10, "the probe to connect", || {
            connected.lock().unwrap().then_some(())
        });
        std::thread::sleep(Duration::from_millis(200));
        Self { client, msgs }
    }

    /// Publishes `payload` on `topic`, QoS 1.
    pub fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .unwrap();
    }

    /// Messages seen so far on topics starting with `prefix`.
    pub fn on(&self, prefix: &str) -> Vec<Msg> {
        self.msgs
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.topic.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Waits for a message on a topic starting with `prefix` whose JSON satisfies `pred`.
    pub fn wait(&self, secs: u64, prefix: &str, pred: impl Fn(&serde_json::Value) -> bool) -> Msg {
        wait_for(secs, &format!("a message on {prefix}"), || {
            self.on(prefix).into_iter().find(|m| pred(&m.json))
        })
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// A noduled daemon child process with its own folders.
pub struct Daemon {
    /// Root of its folders.
    pub dir: PathBuf,
    /// The config file.
    pub config: PathBuf,
    child: Option<Child>,
    env: Vec<(String, String)>,
}

/// Test config: folders under `dir`, data roots = `dir/data` and the fixtures, `jobs` keys
/// added to `[jobs]`, the `extra` tables appended.
pub fn config_text(dir: &Path, model: &Path, jobs: &str, extra: &str) -> String {
    format!(
        "state_dir = \"{d}/state\"\nshutdown_timeout_secs = 20\n[model]\npath = \"{m}\"\n[jobs]\ndata_roots = [\"{d}/data\", \"{r}\"]\n{jobs}\n\
         [inbox]\npath = \"{d}/inbox\"\n[outbox]\npath = \"{d}/outbox\"\n[health]\nlisten = \"127.0.0.1:0\"\n{extra}",
        d = dir.display(),
        m = model.display(),
        r = reference().display()
    )
}

impl Daemon {
    /// Writes the config and starts the daemon; waits until /readyz answers 200.
    pub fn start(dir: &Path, config: &str) -> Self {
        Self::start_env(dir, config, &[])
    }

    /// As [`Daemon::start`] with extra environment variables.
    pub fn start_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let path = dir.join("noduled.toml");
        std::fs::write(&path, config).unwrap();
        let mut d = Self {
            dir: dir.to_path_buf(),
            config: path,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.restart();
        d
    }

    /// Starts the process again and waits until ready.
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let _ = std::fs::remove_file(self.dir.join("state/health.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("NODULED_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
        wait_for(60, "the daemon to be ready", || {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early ({st}):\n{}", self.log());
            }
            (self.get("/readyz").map(|r| r.0) == Some(200)).then_some(())
        });
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// GET on the health endpoint: (status code, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let addr = std::fs::read_to_string(self.dir.join("state/health.addr")).ok()?;
        let mut s = std::net::TcpStream::connect(addr.trim()).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((
            code,
            text.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
        ))
    }

    /// A Prometheus sample value from /metrics.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Hands over the child process (the caller signals and reaps it); `restart` starts
    /// a new one.
    pub fn take_child(&mut self) -> Child {
        self.child.take().unwrap()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM; waits (at most `secs`) and returns the exit status.
    pub fn term(&mut self, secs: u64) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        signal(c.id(), "TERM");
        wait_for(secs, "the daemon to exit after SIGTERM", || {
            c.try_wait().unwrap()
        })
    }

    /// Drops a job file into the inbox the way a scanner should: write beside, rename in.
    pub fn drop_job(&self, name: &str, json: &str) {
        let tmp = self.dir.join(format!("{name}.writing"));
        std::fs::write(&tmp, json).unwrap();
        std::fs::rename(&tmp, self.dir.join("inbox").join(name)).unwrap();
    }

    /// Result JSONs in the outbox (`sent/` too), parsed; a file moving to `sent/` while
    /// listed counts once.
    pub fn results(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for d in [self.dir.join("outbox"), self.dir.join("outbox/sent")] {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".json") && !n.starts_with('.') && seen.insert(n.clone()) {
                    let Ok(bytes) = std::fs::read(e.path()) else {
                        continue;
                    };
                    out.push(serde_json::from_slice(&bytes).unwrap());
                }
            }
        }
        out
    }

    /// The result for `job_id`, when written.
    pub fn result_for(&self, job_id: &str) -> Option<serde_json::Value> {
        self.results().into_iter().find(|r| r["job_id"] == job_id)
    }

    /// Files in a folder under the daemon's root.
    pub fn files(&self, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.join(sub))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_file() && !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The fixture checkpoint folder (random weights, five folds): the daemon tests' model.
pub fn model() -> PathBuf {
    crate::util::reference().join("model")
}

/// Writes the planes of fixture nodule `name` (lung1, lung2, synthetic0) as a planes file
/// (tensor `planes01`) under `dir`; returns its path.
pub fn planes_file(dir: &Path, name: &str) -> PathBuf {
    let bytes = std::fs::read(reference().join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(&format!("{name}.planes01")).unwrap();
    let dtype = format!("{:?}", t.dtype());
    let mut header = serde_json::json!({"planes01": {"dtype": dtype, "shape": t.shape(), "data_offsets": [0, t.data().len()]}})
        .to_string()
        .into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let path = dir.join(format!("{name}.planes.safetensors"));
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&header).unwrap();
    f.write_all(t.data()).unwrap();
    path
}

/// The fixture CT case `name`: (NIfTI path, DICOM folder, LPS coordinate in mm).
pub fn ct_case(name: &str) -> (PathBuf, PathBuf, [f64; 3]) {
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference().join("cases.json")).unwrap()).unwrap();
    let case = cases["ct_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap();
    let c: Vec<f64> = case["coord_lps_mm"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    (
        reference().join(case["nifti"].as_str().unwrap()),
        reference().join(case["dicom_dir"].as_str().unwrap()),
        [c[0], c[1], c[2]],
    )
}

/// A job JSON scoring `n` nodules of the fixture planes (`lung1` planes file in `data`).
pub fn planes_job(data: &Path, job_id: &str, patient_id: &str, n: usize) -> String {
    let p = planes_file(data, "lung1");
    let nodules: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"nodule_id": format!("n{i}"), "planes": p}))
        .collect();
    serde_json::json!({"job_id": job_id, "patient_id": patient_id, "nodules": nodules}).to_string()
}

/// A job JSON scoring the real CT `lung1` (NIfTI) at its lesion coordinate, `n` times.
pub fn ct_job(job_id: &str, patient_id: &str, n: usize) -> String {
    let (nifti, _, c) = ct_case("lung1");
    let nodules: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"nodule_id": format!("n{i}"), "coord_lps_mm": c}))
        .collect();
    serde_json::json!({"job_id": job_id, "patient_id": patient_id, "volume": nifti, "nodules": nodules}).to_string()
}

/// Waits for the error result of job `stem` (inbox file `<stem>.json`) that ran out of
/// attempts (a config with `jobs.max_attempts = 2`), then for its file in `failed/`
/// (the result is written before the job file moves).
pub fn expect_abandoned(d: &Daemon, stem: &str) {
    let r = wait_for(30, "the abandoned job's result", || d.result_for(stem));
    assert_eq!(r["status"], "error");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("jobs.max_attempts = 2"),
        "{r:#}"
    );
    let file = format!("{stem}.json");
    wait_for(10, "the job file in failed/", || {
        d.files("state/failed").contains(&file).then_some(())
    });
}
