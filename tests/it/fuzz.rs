//! Input fuzzing on stable Rust (issue 16): fixture inputs (NIfTI, NRRD, DICOM slices, .npy
//! and .pt crops, job JSON, MQTT payloads) mutated thousands of times per format with a
//! fixed seed; every case must end in `Ok` or an error (no panic), within a per-case
//! deadline (a watchdog aborts the run naming the case), and under a memory cap: the cases run
//! in a child process (this binary, `fuzz::fuzz_cases`) limited with `ulimit -v`.
//!
//! `NODULED_FUZZ_CASES` sets the cases per format (default 2000); `NODULED_FUZZ_SEED` the
//! seed (default 16). The longer run and its counts are in docs/security.md.

use crate::util::root;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Virtual memory cap of the child, KiB: the readers must refuse, not allocate, what a small
/// file announces.
const MEMORY_CAP_KIB: u64 = 3 << 20;
/// Per-case deadline.
const DEADLINE: Duration = Duration::from_secs(20);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u32; 9] = [
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0xFFFF,
    0x7FFF_FFFF,
    0xFFFF_FFFF,
];

/// One to four mutations of `seed`; positions favour the first `head` bytes (the header).
fn mutate(seed: &[u8], head: usize, rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(0);
        }
        let span = if rng.below(10) < 7 {
            head.min(b.len())
        } else {
            b.len()
        };
        let at = rng.below(span);
        match rng.below(7) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = INTERESTING[rng.below(INTERESTING.len())] as u8,
            2 => {
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                for (i, x) in v.iter().enumerate() {
                    if let Some(y) = b.get_mut(at + i) {
                        *y = *x;
                    }
                }
            }
            3 => b.truncate(at),
            4 => {
                let len = rng.below(64).min(b.len() - at);
                let chunk = b[at..at + len].to_vec();
                let to = rng.below(b.len());
                b.splice(to..to, chunk);
            }
            5 => {
                let n = 1 + rng.below(16);
                let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(at..at, junk);
            }
            _ => {
                // Text formats: a digit run replaced by a huge, negative or odd number.
                let odd: [&[u8]; 6] = [b"99999999999", b"-1", b"0", b"nan", b"1e308", b"65536"];
                if let Some(start) = (at..b.len()).find(|&i| b[i].is_ascii_digit()) {
                    let end = (start..b.len())
                        .find(|&i| !b[i].is_ascii_digit())
                        .unwrap_or(b.len());
                    b.splice(start..end, odd[rng.below(odd.len())].iter().copied());
                }
            }
        }
    }
    b
}

/// A 16^3 HU block of the fixture CT, as little-endian i16.
fn ct_block() -> Vec<u8> {
    let (nii, _, _) = crate::daemon_support::ct_case("lung1");
    let v = noduled::volume::read(&nii, None).unwrap();
    let mut out = Vec::new();
    for k in 0..16 {
        for j in 0..16 {
            for i in 0..16 {
                let (i, j, k) = (
                    i + v.dims[0] / 2 - 8,
                    j + v.dims[1] / 2 - 8,
                    k + v.dims[2] / 2 - 8,
                );
                out.extend_from_slice(&(v.at(i, j, k).round() as i16).to_le_bytes());
            }
        }
    }
    out
}

fn nifti_seed(data: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 352];
    let put = |h: &mut Vec<u8>, off: usize, b: &[u8]| h[off..off + b.len()].copy_from_slice(b);
    put(&mut h, 0, &348i32.to_le_bytes());
    for (i, d) in [3i16, 16, 16, 16, 1, 1, 1, 1].iter().enumerate() {
        put(&mut h, 40 + 2 * i, &d.to_le_bytes());
    }
    put(&mut h, 70, &4i16.to_le_bytes());
    put(&mut h, 72, &16i16.to_le_bytes());
    for (i, p) in [1f32, 0.7, 0.7, 1.25, 1.0, 1.0, 1.0, 1.0]
        .iter()
        .enumerate()
    {
        put(&mut h, 76 + 4 * i, &p.to_le_bytes());
    }
    put(&mut h, 108, &352f32.to_le_bytes());
    put(&mut h, 112, &1f32.to_le_bytes());
    put(&mut h, 123, &[2]);
    put(&mut h, 252, &1i16.to_le_bytes());
    put(&mut h, 254, &1i16.to_le_bytes());
    let rows = [
        [-0.7f32, 0.0, 0.0, 10.0],
        [0.0, -0.7, 0.0, 20.0],
        [0.0, 0.0, 1.25, -30.0],
    ];
    for (r, row) in rows.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            put(&mut h, 280 + 16 * r + 4 * c, &v.to_le_bytes());
        }
    }
    put(&mut h, 264, &1f32.to_le_bytes());
    put(&mut h, 344, b"n+1\0");
    h.extend_from_slice(data);
    h
}

fn npy_seed(values: &[f32]) -> Vec<u8> {
    let mut header =
        "{'descr': '<f4', 'fortran_order': False, 'shape': (100, 100, 100), }".to_string();
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `cases` mutations of `seed` through `check` (which writes the bytes where it needs
/// them and reads them back), under the watchdog. Returns (ok, refused) counts.
fn run_format(
    name: &str,
    seed: &[u8],
    head: usize,
    cases: u64,
    rng: &mut Rng,
    clock: &Arc<AtomicU64>,
    check: &dyn Fn(&[u8]) -> bool,
) -> (u64, u64) {
    let t0 = Instant::now();
    let (mut ok, mut refused) = (0, 0);
    std::panic::set_hook(Box::new(|_| {})); // one line per failing case, below
    for case in 0..cases {
        let bytes = mutate(seed, head, rng);
        clock.store(epoch().elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        CURRENT
            .lock()
            .unwrap()
            .clone_from(&format!("{name} case {case}"));
        CURRENT_BYTES.lock().unwrap().clone_from(&bytes);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&bytes)));
        clock.store(0, Ordering::SeqCst);
        match r {
            Ok(true) => ok += 1,
            Ok(false) => refused += 1,
            Err(_) => {
                let keep = std::env::temp_dir().join(format!("noduled-fuzz-{name}-{case}"));
                let _ = std::fs::write(&keep, &bytes);
                let _ = std::panic::take_hook();
                panic!(
                    "{name} case {case}: panic (input kept in {})",
                    keep.display()
                );
            }
        }
    }
    let _ = std::panic::take_hook(); // the default hook again
    println!(
        "fuzz {name}: {cases} cases, {ok} read, {refused} refused, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    (ok, refused)
}

static CURRENT: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// The one clock the cases and the watchdog share.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}
static CURRENT_BYTES: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// The cases themselves; run by [`inputs_never_panic_hang_or_allocate_unboundedly`] in a child
/// process under a memory cap.
#[test]
#[ignore = "child process of fuzz::inputs_never_panic_hang_or_allocate_unboundedly"]
fn fuzz_cases() {
    let cases = env_u64("NODULED_FUZZ_CASES", 2000);
    let mut rng = Rng(env_u64("NODULED_FUZZ_SEED", 16) | 1);
    let clock = Arc::new(AtomicU64::new(0));
    let t0 = epoch();
    {
        let clock = clock.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let started = clock.load(Ordering::SeqCst);
            let now = t0.elapsed().as_millis() as u64;
            if started != 0 && now.saturating_sub(started) > DEADLINE.as_millis() as u64 {
                let keep = std::env::temp_dir().join("noduled-fuzz-hang");
                let _ = std::fs::write(&keep, &*CURRENT_BYTES.lock().unwrap());
                eprintln!(
                    "fuzz: {} ran past {DEADLINE:?} (hang; input kept in {})",
                    CURRENT.lock().unwrap(),
                    keep.display()
                );
                std::process::abort();
            }
        });
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let block = ct_block();
    let nii = nifti_seed(&block);
    let nrrd = [
        b"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 16 16 16\n\
          space directions: (0.7,0,0) (0,0.7,0) (0,0,1.25)\nspace origin: (10,20,-30)\nendian: little\nencoding: raw\n\n"
            .to_vec(),
        block.clone(),
    ]
    .concat();
    let nrrd_gz = [
        b"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 16 16 16\n\
          space directions: (0.7,0,0) (0,0.7,0) (0,0,1.25)\nspace origin: (10,20,-30)\nendian: little\nencoding: gzip\n\n"
            .to_vec(),
        gzip(&block),
    ]
    .concat();
    let pt = std::fs::read(root().join("tests/fixtures/crops/synthetic0.pt")).unwrap();
    let crop =
        noduled::volume::crop::read(&root().join("tests/fixtures/crops/synthetic0.pt")).unwrap();
    let npy = npy_seed(
        &(0..100 * 100 * 100)
            .map(|i| crop.at(i / 10000, (i / 100) % 100, i % 100))
            .collect::<Vec<_>>(),
    );
    let (_, dicom_dir, _) = crate::daemon_support::ct_case("lung1");
    let mut slices: Vec<_> = std::fs::read_dir(&dicom_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    slices.sort();
    let (s0, s1) = (
        std::fs::read(&slices[0]).unwrap(),
        std::fs::read(&slices[1]).unwrap(),
    );
    let job = std::fs::read(root().join("examples/lung1.job.json")).unwrap();
    let crop_job = br#"{"job_id": "j", "patient_id": "p", "crop": {"format": "npy"}, "nodules": [{"nodule_id": "n"}]}"#;
    let mqtt = [crop_job.to_vec(), vec![0], npy.clone()].concat();

    let read_volume = |name: &str| {
        let name = name.to_string();
        move |b: &[u8]| noduled::volume::read(&file(&name, b), None).is_ok()
    };
    let dcm = tmp.path().join("series");
    std::fs::create_dir_all(&dcm).unwrap();
    std::fs::write(dcm.join("b.dcm"), &s1).unwrap();
    let read_dicom = |b: &[u8]| {
        std::fs::write(dcm.join("a.dcm"), b).unwrap();
        noduled::volume::read(&dcm, None).is_ok()
    };
    let read_crop = |name: &str| {
        let name = name.to_string();
        move |b: &[u8]| noduled::volume::crop::read(&file(&name, b)).is_ok()
    };
    let parse_job = |b: &[u8]| noduled::daemon::job::parse(b).is_ok();
    let mqtt_payload = |b: &[u8]| match b.iter().position(|x| *x == 0) {
        Some(nul) => {
            let header_ok = noduled::daemon::job::parse(&b[..nul]).is_ok();
            noduled::volume::crop::read(&file("payload.npy", &b[nul + 1..])).is_ok() && header_ok
        }
        None => noduled::daemon::job::parse(b).is_ok(),
    };
    let big = (cases / 4).max(1);
    let formats: Vec<(&str, Vec<u8>, usize, u64, Box<dyn Fn(&[u8]) -> bool>)> = vec![
        (
            "nifti",
            nii.clone(),
            352,
            cases,
            Box::new(read_volume("v.nii")),
        ),
        (
            "nifti-gz",
            gzip(&nii),
            64,
            big,
            Box::new(read_volume("v.nii.gz")),
        ),
        (
            "nrrd",
            nrrd.clone(),
            220,
            cases,
            Box::new(read_volume("v.nrrd")),
        ),
        (
            "nrrd-gz",
            nrrd_gz,
            220,
            big,
            Box::new(read_volume("w.nrrd")),
        ),
        ("dicom", s0, 1500, cases, Box::new(read_dicom)),
        ("npy", npy, 128, big, Box::new(read_crop("c.npy"))),
        ("pt", pt, 4096, big, Box::new(read_crop("c.pt"))),
        ("job-json", job, 400, cases, Box::new(parse_job)),
        ("mqtt-payload", mqtt, 200, big, Box::new(mqtt_payload)),
    ];
    for (name, seed, head, n, check) in &formats {
        let (ok, refused) = run_format(name, seed, *head, *n, &mut rng, &clock, check.as_ref());
        assert_eq!(ok + refused, *n);
        // The seed itself must read: the mutations start from valid input.
        assert!(check(seed), "{name}: the unmutated seed does not read");
    }
}

#[test]
fn inputs_never_panic_hang_or_allocate_unboundedly() {
    let exe = std::env::current_exe().unwrap();
    // Under scripts/test-aarch64 this binary is aarch64: it re-runs itself through the same
    // emulator (NODULED_TEST_RUNNER), whose own address space then counts against the cap.
    let runner = std::env::var("NODULED_TEST_RUNNER").unwrap_or_default();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {MEMORY_CAP_KIB} && exec {runner} \"$0\" \"$@\""
        ))
        .arg(&exe)
        .args([
            "fuzz::fuzz_cases",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("RAYON_NUM_THREADS", "2")
        .env("MALLOC_ARENA_MAX", "2")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fuzz child failed ({}):\n{text}",
        out.status
    );
    let lines = text.matches(" refused, ").count();
    assert_eq!(lines, 9, "one summary per format:\n{text}");
}
