//! A read stuck inside a system call (issue 15, fault 2), made real: a FUSE filesystem
//! whose server answers INIT, LOOKUP, GETATTR and OPEN but never READ, so a job reading
//! its input from it blocks in the kernel exactly like a read from a hung network share.
//! Tested with the real binary: the job gets its timeout result and the jobs behind it
//! run; at [`MAX_JOB_THREADS`] stuck threads `/readyz` says why; SIGTERM ends the process
//! promptly with a read stuck; after restarts the attempt limit sends the job to `failed/`.
//!
//! The FUSE server is written here on the raw kernel protocol (`/dev/fuse` and mount(2),
//! as root): a handful of fixed-layout replies. The `fuser` crate mounts through
//! `fusermount`/libfuse, which this machine does not have, and would add a dependency for
//! five messages. Files are opened with `FOPEN_DIRECT_IO`, so every read is a READ request
//! that the server holds. The mount is torn down by closing the server's descriptor (the
//! kernel then aborts the connection: every held read fails with ENOTCONN) and a lazy
//! unmount, so a test never leaves a hung mount behind; without root (or FUSE) the tests
//! skip with a printed reason.

use crate::daemon_support::*;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Mirrors `noduled::daemon::worker::MAX_JOB_THREADS` (one running, the rest stuck).
const MAX_JOB_THREADS: usize = noduled::daemon::worker::MAX_JOB_THREADS;

/// The one file the stuck filesystem serves (any size; its bytes never arrive).
const STUCK_FILE: &str = "stuck.planes.safetensors";

// FUSE opcodes and reply layouts (linux/fuse.h).
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const OPEN: u32 = 14;
const READ: u32 = 15;
const RELEASE: u32 = 18;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const INTERRUPT: u32 = 36;
const DESTROY: u32 = 38;
const BATCH_FORGET: u32 = 42;
const FOPEN_DIRECT_IO: u32 = 1;
/// No FLUSH request at close: a hung server would otherwise hold the closing (exiting)
/// process in an uninterruptible wait (FLUSH is a forced request).
const FOPEN_NOFLUSH: u32 = 1 << 5;
const ROOT: u64 = 1;
const FILE: u64 = 2;

/// How the filesystem hangs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hang {
    /// The server takes READ requests and never answers them. The kernel then waits for
    /// the answer uninterruptibly: even SIGKILL cannot end the reading thread, so the
    /// process cannot end until the connection is aborted (as with FUSE shares whose
    /// server hangs after taking a request).
    Read,
    /// The server stops taking requests after the first OPEN it answered (the server
    /// itself hung). The reader waits killably, as on a hard NFS or CIFS mount: a fatal
    /// signal ends it.
    Server,
}

/// A mounted FUSE filesystem whose reads never return.
pub struct StuckFs {
    mnt: PathBuf,
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicUsize>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl StuckFs {
    /// Mounts it at `mnt` (created); `None`, with the reason printed, where FUSE cannot be
    /// mounted (not root, no /dev/fuse).
    pub fn mount(mnt: &Path, hang: Hang) -> Option<Self> {
        std::fs::create_dir_all(mnt).unwrap();
        let dev = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("SKIPPED stuck-read test: cannot open /dev/fuse: {e}");
                return None;
            }
        };
        let opts = format!("fd={},rootmode=40000,user_id=0,group_id=0", dev.as_raw_fd());
        let c = |s: &str| CString::new(s).unwrap();
        let target = c(mnt.to_str().unwrap());
        // SAFETY: valid NUL-terminated strings; mount(2) reads them only.
        let rc = unsafe {
            libc::mount(
                c("noduled-stuck").as_ptr(),
                target.as_ptr(),
                c("fuse").as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c(&opts).as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            eprintln!("SKIPPED stuck-read test: cannot mount FUSE (needs root): {e}");
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicUsize::new(0));
        let (s, r) = (stop.clone(), reads.clone());
        let server = std::thread::spawn(move || serve(dev, &s, &r, hang));
        Some(Self {
            mnt: mnt.to_path_buf(),
            stop,
            reads,
            server: Some(server),
        })
    }

    /// The path of the file whose reads never return.
    pub fn file(&self) -> PathBuf {
        self.mnt.join(STUCK_FILE)
    }

    /// READ requests received (each one a read now blocked in the kernel).
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// Ends the server: the kernel aborts the connection and every held read fails.
    pub fn abort(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StuckFs {
    fn drop(&mut self) {
        self.abort();
        let target = CString::new(self.mnt.to_str().unwrap()).unwrap();
        // SAFETY: a valid path; a lazy unmount never blocks.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Answers requests until `stop`; then closes the device (which aborts the connection).
fn serve(mut dev: std::fs::File, stop: &AtomicBool, reads: &AtomicUsize, hang: Hang) {
    let mut buf = vec![0u8; 1 << 20];
    let mut hung = false;
    while !stop.load(Ordering::SeqCst) {
        if hung {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let mut pfd = libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let n = match dev.read(&mut buf) {
            Ok(n) if n >= 40 => n,
            Ok(_) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return, // ENODEV: unmounted
        };
        let req = &buf[..n];
        let u32_at = |o: usize| u32::from_le_bytes(req[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(req[o..o + 8].try_into().unwrap());
        let (opcode, unique, node) = (u32_at(4), u64_at(8), u64_at(16));
        let body = &req[40..];
        let reply: Option<Result<Vec<u8>, i32>> = match opcode {
            INIT => Some(Ok(init_out(u32::from_le_bytes(
                body[8..12].try_into().unwrap(),
            )))),
            LOOKUP => Some(if node == ROOT && body.starts_with(STUCK_FILE.as_bytes()) {
                Ok(entry_out())
            } else {
                Err(libc::ENOENT)
            }),
            GETATTR => Some(Ok(attr_out(node))),
            OPEN => {
                hung = hang == Hang::Server;
                Some(Ok(open_out()))
            }
            READ => {
                reads.fetch_add(1, Ordering::SeqCst);
                None
            }
            RELEASE | FLUSH => Some(Ok(Vec::new())),
            FORGET | BATCH_FORGET | INTERRUPT | DESTROY => None,
            _ => Some(Err(libc::ENOSYS)),
        };
        if let Some(r) = reply {
            let (err, payload) = match r {
                Ok(p) => (0i32, p),
                Err(e) => (-e, Vec::new()),
            };
            let mut out = Vec::with_capacity(16 + payload.len());
            out.extend(((16 + payload.len()) as u32).to_le_bytes());
            out.extend(err.to_le_bytes());
            out.extend(unique.to_le_bytes());
            out.extend(payload);
            let _ = dev.write_all(&out);
        }
    }
}

/// `fuse_init_out`, protocol 7.31, no optional features.
fn init_out(max_readahead: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [7u32, 31, max_readahead, 0] {
        v.extend(x.to_le_bytes()); // major, minor, max_readahead, flags
    }
    v.extend(16u16.to_le_bytes()); // max_background
    v.extend(12u16.to_le_bytes()); // congestion_threshold
    v.extend((64u32 << 10).to_le_bytes()); // max_write
    v.extend(1u32.to_le_bytes()); // time_gran
    v.resize(64, 0); // max_pages, map_alignment, flags2, unused
    v
}

/// `fuse_attr` of the root folder or the stuck file.
fn attr(node: u64) -> Vec<u8> {
    let (mode, nlink, size) = if node == FILE {
        (0o100444u32, 1u32, 1u64 << 20)
    } else {
        (0o040755, 2, 0)
    };
    let mut v = Vec::new();
    for x in [node, size, size / 512, 0, 0, 0] {
        v.extend(x.to_le_bytes()); // ino, size, blocks, atime, mtime, ctime
    }
    for x in [0u32, 0, 0, mode, nlink, 0, 0, 0, 4096, 0] {
        v.extend(x.to_le_bytes()); // *timensec, mode, nlink, uid, gid, rdev, blksize, flags
    }
    v
}

/// `fuse_entry_out` for the stuck file (cached for an hour).
fn entry_out() -> Vec<u8> {
    let mut v = Vec::new();
    for x in [FILE, 0, 3600, 3600] {
        v.extend(x.to_le_bytes()); // nodeid, generation, entry_valid, attr_valid
    }
    v.extend([0u8; 8]); // entry_valid_nsec, attr_valid_nsec
    v.extend(attr(FILE));
    v
}

/// `fuse_attr_out`.
fn attr_out(node: u64) -> Vec<u8> {
    let mut v = 3600u64.to_le_bytes().to_vec();
    v.extend([0u8; 8]); // attr_valid_nsec, dummy
    v.extend(attr(node));
    v
}

/// `fuse_open_out`: direct I/O, so each read is a READ request; no flush at close.
fn open_out() -> Vec<u8> {
    let mut v = 1u64.to_le_bytes().to_vec();
    v.extend((FOPEN_DIRECT_IO | FOPEN_NOFLUSH).to_le_bytes());
    v.extend([0u8; 4]);
    v
}

/// The threads of process `pid` waiting in the kernel for a FUSE answer: (name, kernel
/// stack).
fn blocked_in_fuse(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
            let (wchan, stack) = (read("wchan"), read("stack"));
            (wchan.contains("request_wait_answer") || stack.contains("fuse_simple_request"))
                .then(|| (read("comm").trim().to_string(), stack))
        })
        .collect()
}

/// A systemd notify socket: counts the `WATCHDOG=1` pings it receives.
fn watchdog_socket(path: &Path) -> Arc<AtomicUsize> {
    let sock = std::os::unix::net::UnixDatagram::bind(path).unwrap();
    let pings = Arc::new(AtomicUsize::new(0));
    let p = pings.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                p.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    pings
}

/// A job whose one nodule's planes file is the stuck file.
fn stuck_job(fs: &StuckFs, job_id: &str) -> String {
    serde_json::json!({"job_id": job_id, "patient_id": "P-stuck",
        "nodules": [{"nodule_id": "n0", "planes": fs.file()}]})
    .to_string()
}

/// Stuck reads past `jobs.timeout_secs` get their error results and the pipeline moves on
/// while threads are left behind; at [`MAX_JOB_THREADS`] of them the next job waits,
/// `/readyz` says why and the systemd watchdog pings stop (they come from the worker, which
/// is wedged); once the reads fail (connection aborted) it runs, and readiness and the
/// pings return.
#[test]
fn reads_stuck_in_the_kernel_time_out_and_the_stuck_thread_cap_shows_in_readyz() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut fs) = StuckFs::mount(&tmp.path().join("data/hang"), Hang::Read) else {
        return;
    };
    // 2 s on hardware; scaled under qemu, where a good job alone takes longer than that.
    let timeout = 2 * crate::util::time_scale();
    let cfg = config_text(
        tmp.path(),
        &model(),
        &format!("timeout_secs = {timeout}"),
        "",
    );
    let sock = tmp.path().join("notify.sock");
    let pings = watchdog_socket(&sock);
    let env = [
        ("NOTIFY_SOCKET", sock.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ];
    let d = Daemon::start_env(tmp.path(), &cfg, &env);
    d.drop_job("first.json", &stuck_job(&fs, "first"));
    d.drop_job(
        "behind.json",
        &planes_job(&tmp.path().join("data"), "behind", "P1", 1),
    );
    let first = wait_for(30, "the stuck job's result", || d.result_for("first"));
    assert_eq!(first["status"], "error");
    assert!(
        first["error"]
            .as_str()
            .unwrap()
            .contains(&format!("jobs.timeout_secs = {timeout}")),
        "{first:#}"
    );
    assert_eq!(
        wait_for(30, "the job behind it", || d.result_for("behind"))["status"],
        "ok"
    );
    assert_eq!(fs.reads(), 1, "one READ held by the filesystem");
    assert_eq!(d.get("/readyz").unwrap().0, 200);

    // Seven more: eight job threads stuck in the kernel, the cap. The next job waits.
    for i in 1..MAX_JOB_THREADS {
        d.drop_job(&format!("s{i}.json"), &stuck_job(&fs, &format!("s{i}")));
    }
    d.drop_job(
        "waits.json",
        &planes_job(&tmp.path().join("data"), "waits", "P1", 1),
    );
    let (code, body) = wait_for(60, "/readyz to report the stuck threads", || {
        d.get("/readyz").filter(|(c, _)| *c == 503)
    });
    assert!(body.contains("job threads stuck"), "{code} {body}");
    assert_eq!(fs.reads(), MAX_JOB_THREADS);
    assert_eq!(
        d.metric("noduled_jobs_timed_out_total"),
        Some(MAX_JOB_THREADS as f64)
    );
    assert_eq!(
        d.metric("noduled_job_threads_busy"),
        Some(MAX_JOB_THREADS as f64)
    );
    let before = pings.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(3));
    assert!(d.result_for("waits").is_none(), "ran past the cap");
    assert_eq!(
        pings.load(Ordering::SeqCst),
        before,
        "watchdog pinged while wedged"
    );

    // The share comes back failing: the stuck threads end, the waiting job runs.
    fs.abort();
    assert_eq!(
        wait_for(30, "the job that waited", || d.result_for("waits"))["status"],
        "ok"
    );
    wait_for(10, "ready again", || {
        (d.get("/readyz").map(|r| r.0) == Some(200)).then_some(())
    });
    let after = pings.load(Ordering::SeqCst);
    wait_for(5, "watchdog pings again", || {
        (pings.load(Ordering::SeqCst) > after).then_some(())
    });
    wait_for(10, "processing/ empty", || {
        d.files("state/processing").is_empty().then_some(())
    });
}

/// SIGTERM with a read stuck in the kernel: the daemon finishes its shutdown within the
/// bound (the job stays in `processing/`, its attempt counted). Where the kernel waits
/// killably (a hung server: [`Hang::Server`]) the process is gone at once; where it waits
/// uninterruptibly for a request the server took ([`Hang::Read`]) no process can end, and it
/// ends as soon as the share fails (connection aborted). Each restart runs the job again
/// and it sticks again; after `jobs.max_attempts` it goes to `failed/` with an error result
/// instead of running, and later jobs run.
#[test]
fn sigterm_ends_a_stuck_read_and_restarts_fail_it_after_max_attempts() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("data/hang");
    let Some(mut fs) = StuckFs::mount(&mnt, Hang::Read) else {
        return;
    };
    let cfg = config_text(
        tmp.path(),
        &model(),
        "timeout_secs = 300\nmax_attempts = 2",
        "",
    )
    .replace("shutdown_timeout_secs = 20", "shutdown_timeout_secs = 6");
    let mut d = Daemon::start(tmp.path(), &cfg);
    d.drop_job("stuck.json", &stuck_job(&fs, "stuck"));
    let attempts = |d: &Daemon| -> serde_json::Value {
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.dir.join("state/attempts/stuck.json")).unwrap(),
        )
        .unwrap();
        rec["attempts"].clone()
    };

    // 1. A READ the server took: the daemon shuts down; the kernel keeps the process
    //    until the share fails.
    wait_for(30, "the job's read to be held", || {
        (fs.reads() == 1).then_some(())
    });
    let pid = d.pid();
    let mut child = d.take_child();
    let t0 = Instant::now();
    signal(pid, "TERM");
    wait_for(10, "the daemon to log that it stopped", || {
        d.log().contains("stopped").then_some(())
    });
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        !blocked_in_fuse(pid).is_empty(),
        "the read was not held in the kernel"
    );
    fs.abort();
    let st = wait_for(10, "the process to end once the share failed", || {
        child.try_wait().unwrap()
    });
    assert!(st.success(), "{st}: {}", d.log());
    assert_eq!(attempts(&d), 1);
    assert!(d
        .files("state/processing")
        .contains(&"stuck.json".to_string()));
    drop(fs);

    // 2. A hung server (killable wait): SIGTERM ends the process within the bound.
    let fs = StuckFs::mount(&mnt, Hang::Server).unwrap();
    d.restart();
    wait_for(30, "the job's input to be held", || {
        (!blocked_in_fuse(d.pid()).is_empty()).then_some(())
    });
    let t0 = Instant::now();
    let st = d.term(20);
    let took = t0.elapsed();
    assert!(st.success(), "{st}: {}", d.log());
    assert!(took < Duration::from_secs(6), "SIGTERM took {took:?}");
    assert_eq!(attempts(&d), 2);

    // 3. The attempt limit: failed without running (nothing read from the share).
    d.restart();
    expect_abandoned(&d, "stuck");
    let blocked = blocked_in_fuse(d.pid());
    assert!(blocked.is_empty(), "{blocked:?}");
    d.drop_job(
        "next.json",
        &planes_job(&tmp.path().join("data"), "next", "P1", 1),
    );
    assert_eq!(
        wait_for(30, "a later job", || d.result_for("next"))["status"],
        "ok"
    );
    drop(d);
    drop(fs);
}
