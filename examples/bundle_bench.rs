//! Load and scoring measurements of a model (bundle, store or checkpoint folder):
//! resident memory after load and after scoring 10 nodules one by one, time from the start of
//! loading to the first score, and the outputs, as one JSON line. With `--compare OTHER.json` (an
//! earlier run's output) it adds the largest per-nodule differences to that run.
//!
//! `cargo run --release --example bundle_bench -- MODEL [--dtype auto|f32|bf16] [--save OUT.json]
//! [--compare REF.json]` (`--dtype` as `score`'s, default f32; `-- - --write-planes FILE` writes
//! the first nodule as a `score --planes` file).
//!
//! The 10 nodules: the three reference fixture crops (tests/fixtures/reference) and seven
//! flips and transposes of them and of the bundle golden input, so every run scores the same.

use noduled::nodule::{NoduleInput, Planes01, N_PLANES, PLANE_SIDE};
use std::time::Instant;

fn status() -> serde_json::Value {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| (v / 1024.0 * 10.0).round() / 10.0)
    };
    serde_json::json!({"rss_mib": kb("VmRSS:"), "anon_mib": kb("RssAnon:"),
        "file_mib": kb("RssFile:"), "peak_mib": kb("VmHWM:")})
}

fn variant(src: &[f32], kind: usize) -> Vec<f32> {
    let s = PLANE_SIDE;
    let mut out = Vec::with_capacity(src.len());
    for p in 0..N_PLANES {
        let plane = &src[p * s * s..(p + 1) * s * s];
        for y in 0..s {
            for x in 0..s {
                let (yy, xx) = match kind % 3 {
                    0 => (y, s - 1 - x),
                    1 => (s - 1 - y, x),
                    _ => (x, y),
                };
                out.push(plane[yy * s + xx]);
            }
        }
    }
    out
}

fn inputs() -> anyhow::Result<Vec<NoduleInput>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference");
    let t = candle_core::safetensors::load(
        root.join("expected.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let mut bases = Vec::new();
    for n in ["lung1", "lung2", "synthetic0"] {
        bases.push(
            t[&format!("{n}.planes01")]
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    bases.push(
        noduled::convert::golden_planes()
            .iter()
            .map(|&b| b as f32 / 255.0)
            .collect(),
    );
    let mut planes: Vec<Vec<f32>> = bases[..3].to_vec();
    for i in 0..7 {
        planes.push(variant(&bases[(i + 1) % 4], i));
    }
    planes
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(NoduleInput {
                patient_id: format!("P{i}"),
                nodule_id: format!("n{i}"),
                planes: Planes01::new(p).map_err(anyhow::Error::msg)?,
                source: serde_json::Value::Null,
                label: None,
            })
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = std::path::PathBuf::from(args.next().expect("usage: bundle_bench MODEL ..."));
    let (mut save, mut compare) = (None, None);
    let mut dtype = noduled::device::DtypeRequest::F32;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dtype" => {
                let d = args.next().unwrap_or_default();
                dtype = d.parse().map_err(|e| anyhow::anyhow!("--dtype {d}: {e}"))?;
            }
            "--save" => save = args.next(),
            "--compare" => compare = args.next(),
            "--write-planes" => {
                // Writes nodule 0's planes as a `score --planes` file and exits.
                let path = args.next().expect("--write-planes PATH");
                let t = candle_core::Tensor::from_vec(
                    inputs()?.swap_remove(0).planes.0,
                    (N_PLANES, PLANE_SIDE, PLANE_SIDE),
                    &candle_core::Device::Cpu,
                )?;
                candle_core::safetensors::save(
                    &std::collections::HashMap::from([("planes01".to_string(), t)]),
                    path,
                )?;
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    noduled::device::init(noduled::device::DeviceRequest::Cpu, dtype)?;
    let nodules = inputs()?;
    let before = status();
    let t0 = Instant::now();
    let scorer = noduled::engine::load(&model)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let after_load = status();
    let t1 = Instant::now();
    let mut reports = vec![scorer.score(&nodules[..1])?];
    let first_ms = t0.elapsed().as_secs_f64() * 1e3;
    let first_score_ms = t1.elapsed().as_secs_f64() * 1e3;
    for n in &nodules[1..] {
        reports.push(scorer.score(std::slice::from_ref(n))?);
    }
    let per_nodule_ms = t1.elapsed().as_secs_f64() * 1e3 / nodules.len() as f64;
    let after_10 = status();
    let outputs: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| serde_json::to_value(&r.nodules[0]))
        .collect::<Result<_, _>>()?;
    let mut result = serde_json::json!({
        "model": scorer.model_info(), "rss_before_load": before, "rss_after_load": after_load,
        "rss_after_10_nodules": after_10, "load_ms": load_ms.round(),
        "first_score_ms": first_score_ms.round(), "load_to_first_score_ms": first_ms.round(),
        "mean_ms_per_nodule": per_nodule_ms.round(),
    });
    if let Some(path) = compare {
        let (max, per_nodule) = differences(&outputs, &path)?;
        result["diff_max"] = max;
        result["diff_per_nodule"] = per_nodule;
    }
    if let Some(path) = save {
        std::fs::write(path, serde_json::to_string(&outputs)?)?;
    }
    println!("{result}");
    Ok(())
}

/// The largest differences of `outputs` (this run's nodules) from those saved at `path` by an
/// earlier `--save`: over all nodules, and per nodule (fold probability, calibrated, ensemble,
/// descriptor).
fn differences(
    outputs: &[serde_json::Value],
    path: &str,
) -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
    let other: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let mut rows = Vec::new();
    for (a, b) in outputs.iter().zip(&other) {
        let fold_max = |key: &str| {
            a["folds"]
                .as_array()
                .into_iter()
                .flatten()
                .zip(b["folds"].as_array().into_iter().flatten())
                .map(|(x, y)| (num(&x[key]) - num(&y[key])).abs())
                .fold(0.0, f64::max)
        };
        let mut desc = 0f64;
        for (f, classes) in a["descriptors"].as_object().into_iter().flatten() {
            for (c, v) in classes.as_object().into_iter().flatten() {
                desc = desc.max((num(v) - num(&b["descriptors"][f][c])).abs());
            }
        }
        rows.push(
            serde_json::json!({"nodule": a["nodule_id"], "prob": fold_max("prob"),
            "calibrated": fold_max("calibrated"),
            "ensemble": (num(&a["score"]["raw"]) - num(&b["score"]["raw"])).abs(),
            "descriptor": desc}),
        );
    }
    let largest = |k: &str| rows.iter().map(|r| num(&r[k])).fold(0.0, f64::max);
    let max = serde_json::json!({"prob": largest("prob"), "calibrated": largest("calibrated"),
        "ensemble": largest("ensemble"), "descriptor": largest("descriptor")});
    Ok((max, serde_json::Value::Array(rows)))
}
