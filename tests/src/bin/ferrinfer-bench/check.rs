//! `--check`: one short row of every kernel's bar (gather, append, decode, prefill, cascade,
//! merge), compared with a committed baseline measured on the same GPU model
//! (`bench/baseline/<gpu>.json`); any row more than [`TOLERANCE`] slower is named and fails the
//! run, so a slip shows the day it is made. `--write-baseline FILE` records the rows instead.
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::timing::BoxResult;

/// A row fails when it takes more than this fraction longer than its baseline (plus
/// [`SLACK_US`], the CUDA event timer's granularity, so µs-scale rows do not flap).
pub const TOLERANCE: f64 = 0.03;
const SLACK_US: f64 = 0.5;

/// The fields that name a row (everything else is measured).
const KEY_FIELDS: [&str; 12] = [
    "dtype",
    "page_size",
    "batch",
    "tokens_per_sequence",
    "kv_len",
    "qo_len",
    "group",
    "prefix",
    "own",
    "tokens",
    "heads",
    "head_dim",
];

/// A row's name and its time in µs (cascade: the cascade run, not plain decode's).
pub fn keyed(row: &Value) -> Option<(String, f64)> {
    let kernel = row["kernel"].as_str()?;
    let fields: Vec<String> =
        KEY_FIELDS.iter().filter_map(|&f| row.get(f).filter(|v| !v.is_null()).map(|v| format!("{f}={v}"))).collect();
    let us = if kernel == "cascade" { row["cascade_us"].as_f64()? } else { row["median_us"].as_f64()? };
    Some((format!("{kernel} {}", fields.join(" ")).replace('"', ""), us))
}

/// The GPU model as a file name: "NVIDIA H200" → "nvidia-h200".
pub fn slug(gpu: &str) -> String {
    let s: String = gpu.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    s.split('-').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("-")
}

/// Where the baseline for `gpu` is looked for: `--baseline`, else `baseline/<gpu>.json` beside
/// the executable (the GPU bundle), else `bench/baseline/<gpu>.json` in the working directory
/// (a checkout).
pub fn baseline_path(given: Option<&Path>, gpu: &str) -> PathBuf {
    if let Some(p) = given {
        return p.to_path_buf();
    }
    let file = format!("{}.json", slug(gpu));
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("baseline").join(&file)));
    match beside {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("bench/baseline").join(file),
    }
}

/// Writes `rows` as the baseline for `gpu` at `path`.
pub fn write_baseline(path: &Path, gpu: &str, commit_note: &str, rows: &[Value]) -> BoxResult<()> {
    let rows: Vec<Value> = rows.iter().filter_map(keyed).map(|(key, us)| json!({"row": key, "us": us})).collect();
    let doc = json!({"gpu": gpu, "note": commit_note, "tolerance": TOLERANCE, "rows": rows});
    std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("baseline of {} rows for {gpu} written to {}", rows.len(), path.display());
    Ok(())
}

/// Compares `rows` with the baseline at `path`: prints a table and returns the rows more than
/// the tolerance slower (an error when the baseline is missing or for another GPU).
pub fn compare(path: &Path, gpu: &str, rows: &[Value]) -> BoxResult<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "no baseline for {gpu} at {} ({e}); record one on this GPU model with --check --write-baseline FILE",
            path.display()
        )
    })?;
    let doc: Value = serde_json::from_str(&text)?;
    if doc["gpu"].as_str() != Some(gpu) {
        return Err(format!("{} is a baseline for {:?}, not {gpu}", path.display(), doc["gpu"]).into());
    }
    let base: Vec<(String, f64)> = doc["rows"]
        .as_array()
        .ok_or("the baseline has no rows")?
        .iter()
        .filter_map(|r| Some((r["row"].as_str()?.to_string(), r["us"].as_f64()?)))
        .collect();
    println!("\nAgainst the baseline {} ({}):", path.display(), doc["note"].as_str().unwrap_or(""));
    println!("| row | baseline us | now us | now / baseline | verdict |");
    println!("|---|---:|---:|---:|---|");
    let mut slower = Vec::new();
    for (key, us) in rows.iter().filter_map(keyed) {
        let Some(&(_, was)) = base.iter().find(|(k, _)| *k == key) else {
            println!("| {key} | – | {us:.1} | – | not in the baseline |");
            continue;
        };
        let verdict = if us > was * (1.0 + TOLERANCE) + SLACK_US {
            slower.push(format!("{key}: {us:.1} µs against {was:.1} µs ({:+.1}%)", 100.0 * (us / was - 1.0)));
            "SLOWER"
        } else {
            "ok"
        };
        println!("| {key} | {was:.1} | {us:.1} | {:.3} | {verdict} |", us / was);
    }
    for (key, _) in &base {
        if !rows.iter().filter_map(keyed).any(|(k, _)| k == *key) {
            slower.push(format!("{key}: in the baseline but not measured"));
        }
    }
    Ok(slower)
}

/// Each row of `first`, with the faster of its times in `first` and `second` (rows by name).
pub fn faster_of(first: &[Value], second: &[Value]) -> Vec<Value> {
    first
        .iter()
        .map(|row| {
            let Some((key, us)) = keyed(row) else { return row.clone() };
            let other = second.iter().filter_map(keyed).find(|(k, _)| *k == key).map(|(_, u)| u);
            match other {
                Some(faster) if faster < us => {
                    let mut row = row.clone();
                    let field = if row["kernel"] == "cascade" { "cascade_us" } else { "median_us" };
                    row[field] = json!(faster);
                    row
                }
                _ => row.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_named_by_their_shape_and_cascade_by_its_own_time() {
        let decode = json!({"kernel": "decode", "dtype": "f16", "page_size": 16, "batch": 64, "kv_len": 4096, "group": 4, "median_us": 250.0, "gbs": 1.0});
        assert_eq!(keyed(&decode), Some(("decode dtype=f16 page_size=16 batch=64 kv_len=4096 group=4".into(), 250.0)));
        let cascade = json!({"kernel": "cascade", "page_size": 16, "batch": 64, "prefix": 8192, "own": 256, "plain_us": 240.0, "cascade_us": 80.0});
        assert_eq!(keyed(&cascade).map(|k| k.1), Some(80.0));
        assert_eq!(slug("NVIDIA H200"), "nvidia-h200");
        assert_eq!(slug("NVIDIA H100 80GB HBM3"), "nvidia-h100-80gb-hbm3");
    }

    #[test]
    fn a_row_more_than_the_tolerance_slower_is_named() {
        let dir = std::env::temp_dir().join(format!("ferrinfer-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gpu.json");
        let row = |us: f64| json!({"kernel": "gather", "page_size": 16, "batch": 64, "tokens_per_sequence": 4096, "median_us": us});
        write_baseline(&path, "GPU", "test", &[row(100.0)]).unwrap();
        assert!(compare(&path, "GPU", &[row(103.4)]).unwrap().is_empty());
        assert_eq!(compare(&path, "GPU", &[row(104.0)]).unwrap().len(), 1);
        assert!(compare(&path, "Other GPU", &[row(100.0)]).is_err());
        // A baseline row that was not measured counts as a miss.
        assert_eq!(compare(&path, "GPU", &[]).unwrap().len(), 1);
        // A second sweep's faster time is the one compared.
        let best = faster_of(&[row(104.0)], &[row(101.0)]);
        assert!(compare(&path, "GPU", &best).unwrap().is_empty());
        assert_eq!(keyed(&faster_of(&[row(101.0)], &[row(104.0)])[0]).unwrap().1, 101.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
