//! `matformer verify`: checksums, and logits against the source ONNX.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use matformer_export::mapping::{NamePreset, Strategy};
use matformer_export::progress::human_bytes;
use matformer_export::VerifyOptions;

use crate::common::{open, print_json};

/// `matformer verify`.
pub fn run(
    file: &Path,
    against: Option<PathBuf>,
    mapping: Option<PathBuf>,
    submodels: Vec<String>,
    json: bool,
) -> Result<()> {
    let model = open(file)?;
    let t0 = Instant::now();
    model.verify().with_context(|| format!("{} is corrupt", file.display()))?;
    let crc_ms = t0.elapsed().as_secs_f64() * 1e3;
    let v = model.view();
    let mut report = serde_json::json!({
        "file": file.display().to_string(),
        "checksums": "ok",
        "bytes_checked": v.file_len,
        "available_levels": v.available_levels,
        "checksum_ms": crc_ms,
    });
    if !json {
        println!(
            "{}: header and {} segment checksums ok ({} in {crc_ms:.0} ms), {} of {} levels present",
            file.display(),
            v.tensors
                .iter()
                .map(|t| t.segments.iter().filter(|s| (s.level as usize) < v.available_levels).count())
                .sum::<usize>(),
            human_bytes(v.file_len),
            v.available_levels,
            model.metadata().n_levels()
        );
    }
    if let Some(onnx) = against {
        let src = matformer_export::onnx_source::SourceModel::load(&onnx)?;
        let meta = model.metadata();
        if src.sha256 != meta.provenance.source_sha256 {
            eprintln!(
                "note: {} has sha256 {}, the file was exported from {}",
                onnx.display(),
                src.sha256,
                meta.provenance.source_sha256
            );
        }
        let strategy = match mapping {
            Some(m) => Strategy::Mapping(NamePreset::from_file(&m)?),
            None => Strategy::Auto,
        };
        let map = matformer_export::mapping::find_weights(&src, &meta.architecture, &strategy)?;
        let opts = VerifyOptions { submodels, ..VerifyOptions::default() };
        let r = matformer_export::verify::verify_against_onnx(&src, &map, file, &opts)?;
        if json {
            report["against"] = serde_json::to_value(&r)?;
            print_json(&report)?;
        } else {
            println!("against {} (weights found by {}):", onnx.display(), map.method);
            for c in &r.checks {
                println!(
                    "  {:<12} probe {}  max|diff| {:.3e}  relative {:.2e}  argmax {}/{}  {}",
                    c.submodel,
                    c.probe,
                    c.max_abs_diff,
                    c.relative,
                    c.argmax_agree,
                    c.positions,
                    if c.passed { "ok" } else { "FAIL" }
                );
            }
            println!("{}", r.summary());
        }
        if !r.passed {
            bail!("{} does not reproduce {}: {}", file.display(), onnx.display(), r.summary());
        }
        return Ok(());
    }
    if json {
        print_json(&report)?;
    }
    Ok(())
}
