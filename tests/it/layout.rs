//! The module layout rules of `src/lib.rs` ("# Layout"), checked on the source text.
//!
//! A source scan, not a compile-time rule: inside one crate every `pub` item is visible to
//! every module, so nothing in the compiler stops the daemon from naming `crate::finetune`;
//! only a crate boundary would (see lib.rs for why the crate is not split). The scan reads
//! every `.rs` file under `src/` as text, so it also catches paths in macros and doc links.

use crate::util::root;
use std::path::{Path, PathBuf};

/// Top-level modules of the offline group and the CLI: nothing in the scoring path or the
/// daemon may name them.
const OFFLINE: [&str; 4] = ["finetune", "eval", "synth", "commands"];

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`src/daemon/job.rs` -> `daemon`).
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The offline modules `text` names through `crate::` (plain paths and `crate::{..}` groups).
fn offline_names(text: &str) -> Vec<&'static str> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut found = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        let named: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            inner.split(|c: char| !ident(c)).collect()
        } else {
            vec![&rest[..rest.find(|c: char| !ident(c)).unwrap_or(rest.len())]]
        };
        for m in OFFLINE {
            if named.contains(&m) && !found.contains(&m) {
                found.push(m);
            }
        }
    }
    found
}

#[test]
fn scoring_and_daemon_never_name_training_eval_or_synth() {
    // The detector itself: it must see both spellings (else this test could not fail).
    assert_eq!(offline_names("use crate::finetune::train;"), ["finetune"]);
    assert_eq!(offline_names("use crate::{model, synth::draw};"), ["synth"]);
    assert!(offline_names("use crate::evaluation; crate::model::eval").is_empty());
    let src = root().join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut scanned = 0;
    let mut offences = Vec::new();
    for file in &files {
        let top = top_module(&src, file);
        if OFFLINE.contains(&top.as_str()) || top == "main" {
            continue;
        }
        scanned += 1;
        let text = std::fs::read_to_string(file).unwrap();
        for m in offline_names(&text) {
            offences.push(format!("{} names crate::{m}", file.display()));
        }
    }
    assert!(scanned > 50, "only {scanned} scoring/daemon files found");
    assert!(offences.is_empty(), "{offences:#?}");
}

/// `lib.rs`'s "# Layout" names every top-level module.
#[test]
fn lib_layout_lists_every_module() {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    let layout = &lib[lib.find("//! # Layout").expect("a Layout section")..];
    let modules: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(modules.len() > 20, "{modules:?}");
    let missing: Vec<&&str> = modules
        .iter()
        .filter(|m| !layout.contains(&format!("[`{m}`]")))
        .collect();
    assert!(missing.is_empty(), "Layout omits {missing:?}");
}

/// One seedable generator: only `src/rng.rs` defines one (SplitMix64's increment, a
/// `next_u64`, xorshift steps); `rand` is used only for OS entropy when signing keys are made.
#[test]
fn one_rng() {
    let src = root().join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut offences = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .to_string();
        let text = std::fs::read_to_string(file).unwrap();
        let squashed = text.to_ascii_lowercase().replace('_', "");
        if rel != "rng.rs"
            && (squashed.contains("0x9e3779b97f4a7c15")
                || text.contains("fn next_u64")
                || text.contains("<< 13;"))
        {
            offences.push(format!("{rel} defines a generator"));
        }
        if rel != "bundle/sign.rs" && text.contains("rand::") {
            offences.push(format!("{rel} uses rand"));
        }
    }
    assert!(offences.is_empty(), "{offences:#?}");
}
