//! MQTT over TLS with mutual authentication (issue 16): a real Mosquitto with TLS listeners
//! that require client certificates and a password, certificates made here with the openssl
//! CLI, the real daemon. A wrong CA, a missing client certificate, a wrong server name and a
//! wrong password each fail with one clear line (log and /healthz) and lose nothing: once the
//! configuration is fixed, every result is delivered.

use crate::daemon_support::{config_text, ct_job, free_port, model, wait_for, Daemon, Probe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`name.pem`, `name.key`).
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// A certificate `name.pem`/`name.key` signed by CA `ca` with extensions `ext`.
fn leaf(dir: &Path, ca: &str, name: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

fn mosquitto_bin() -> PathBuf {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("mosquitto (bash scripts/test installs it)")
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Like `wait_for`, but prints the daemon's log (from byte `seen`) when it times out.
fn wait_for_or_log<T>(d: &Daemon, seen: usize, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if t0.elapsed().as_secs() > secs * crate::util::time_scale() {
            panic!(
                "no connect error line after {secs} s; log:\n{}",
                &d.log()[seen..]
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn mutual_tls_delivers_and_each_misconfiguration_is_one_line_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    ca(&pki, "ca");
    ca(&pki, "other-ca");
    leaf(
        &pki,
        "ca",
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    leaf(
        &pki,
        "ca",
        "misnamed",
        "subjectAltName=DNS:other.example\nextendedKeyUsage=serverAuth\n",
    );
    leaf(&pki, "ca", "client", "extendedKeyUsage=clientAuth\n");
    let passwd = pki.join("passwd");
    std::fs::write(&passwd, "").unwrap();
    let out = Command::new("mosquitto_passwd")
        .args(["-b", passwd.to_str().unwrap(), "noduled", "right-password"])
        .output()
        .expect("mosquitto_passwd (Debian package mosquitto)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (plain, tls, misnamed) = (free_port(), free_port(), free_port());
    let me = String::from_utf8_lossy(&Command::new("id").arg("-un").output().unwrap().stdout)
        .trim()
        .to_string();
    let p = |n: &str| pki.join(n).display().to_string();
    let tls_listener = |port: u16, cert: &str| {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\n",
            p("passwd"), p("ca.pem"), p(&format!("{cert}.pem")), p(&format!("{cert}.key"))
        )
    };
    let conf = format!(
        "user {me}\nper_listener_settings true\nlog_dest file {}\nlog_type all\n\
         listener {plain} 127.0.0.1\nallow_anonymous true\n{}{}",
        tmp.path().join("mosquitto.log").display(),
        tls_listener(tls, "server"),
        tls_listener(misnamed, "misnamed"),
    );
    std::fs::write(tmp.path().join("mosquitto.conf"), conf).unwrap();
    let _broker = Broker(
        Command::new(mosquitto_bin())
            .arg("-c")
            .arg(tmp.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for port in [plain, tls, misnamed] {
        wait_for(10, "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }
    let probe = Probe::start(plain, "tls-probe", "sec/result/#");

    // The password comes from $CREDENTIALS_DIRECTORY, as systemd's LoadCredential= gives it.
    let creds = tmp.path().join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("mqtt-password"), "wrong-password\n").unwrap();
    let env = [("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())];
    let dir = tmp.path().join("d");
    let mqtt = |port: u16, ca: &str, client: bool| {
        let client = if client {
            format!(
                "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                p("client.pem"),
                p("client.key")
            )
        } else {
            String::new()
        };
        format!(
            "[mqtt]\nenabled = true\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"nd-tls\"\ntopic_prefix = \"sec\"\n\
             reconnect_max_secs = 1\nusername = \"noduled\"\npassword_file = \"mqtt-password\"\ntls = true\n\
             ca_file = \"{}\"\n{client}",
            p(&format!("{ca}.pem"))
        )
    };
    let cases = [
        (
            "wrong-ca",
            mqtt(tls, "other-ca", true),
            "invalid peer certificate",
        ),
        ("no-client-cert", mqtt(tls, "ca", false), ""),
        (
            "wrong-name",
            mqtt(misnamed, "ca", true),
            "not valid for name",
        ),
        ("wrong-password", mqtt(tls, "ca", true), "refused"),
    ];
    let mut jobs = Vec::new();
    for (name, conf, want) in &cases {
        let seen = std::fs::read_to_string(dir.join("daemon.log")).map_or(0, |l| l.len());
        let d = Daemon::start_env(&dir, &config_text(&dir, &model(), "", conf), &env);
        d.drop_job(&format!("{name}.json"), &ct_job(name, "P1", 1));
        wait_for(60, "the result in the outbox", || d.result_for(name));
        let line = wait_for_or_log(&d, seen, 30, || {
            d.log()[seen..]
                .lines()
                .find(|l| l.contains("MQTT connect failed") && l.contains(want))
                .map(str::to_string)
        });
        assert!(line.contains(&format!("127.0.0.1:")), "{name}: {line}");
        let (_, health) = d.get("/healthz").unwrap();
        assert!(health.contains("mqtt: 127.0.0.1:"), "{name}: {health}");
        let m = d
            .metric("noduled_mqtt_connect_failures_total")
            .unwrap_or(0.0);
        assert!(m >= 1.0, "{name}: failures {m}");
        assert!(
            probe.on("sec/result").is_empty(),
            "{name}: delivered while misconfigured"
        );
        jobs.push(name.to_string());
        drop(d);
    }
    assert!(!std::fs::read_to_string(dir.join("daemon.log"))
        .unwrap()
        .contains("panicked"));

    // Fixed: right CA, client certificate, server name and password: everything is delivered.
    std::fs::write(creds.join("mqtt-password"), "right-password\n").unwrap();
    let d = Daemon::start_env(
        &dir,
        &config_text(&dir, &model(), "", &mqtt(tls, "ca", true)),
        &env,
    );
    for j in &jobs {
        probe.wait(60, "sec/result", |r| r["job_id"] == j.as_str());
    }
    let _ = d;
}

#[test]
fn plaintext_to_a_remote_broker_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = config_text(
        tmp.path(),
        &model(),
        "",
        "[mqtt]\nenabled = true\nhost = \"192.0.2.1\"\nport = 1883\n",
    );
    std::fs::create_dir_all(tmp.path()).unwrap();
    std::fs::write(tmp.path().join("noduled.toml"), conf).unwrap();
    let out = Command::new(crate::util::bin())
        .args(["run", "--config"])
        .arg(tmp.path().join("noduled.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains("mqtt.tls") && last.contains("192.0.2.1"),
        "{err}"
    );
}
