//! `matformer export`: ONNX -> `.matf`, verified against tract-onnx.

use std::path::PathBuf;

use anyhow::Result;
use matformer_export::mapping::{NamePreset, Strategy};
use matformer_export::progress::human_bytes;
use matformer_export::{DTypePlan, ExportOptions, VerifyOptions};

use crate::common::print_json;

/// `matformer export`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    input: PathBuf,
    output: PathBuf,
    dtype: &str,
    dtype_override: &[String],
    widths: Option<Vec<u32>>,
    config: Option<PathBuf>,
    mapping: Option<PathBuf>,
    by_structure: bool,
    no_verify: bool,
    verify_goldens: Option<PathBuf>,
    calibration: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let strategy = match (mapping, by_structure) {
        (Some(m), _) => Strategy::Mapping(NamePreset::from_file(&m)?),
        (None, true) => Strategy::Structure,
        (None, false) => Strategy::Auto,
    };
    let opts = ExportOptions {
        input,
        output,
        dtype: DTypePlan::parse(dtype, dtype_override)?,
        widths,
        config,
        strategy,
        verify: if no_verify {
            None
        } else {
            Some(VerifyOptions { goldens: verify_goldens, ..VerifyOptions::default() })
        },
        calibration,
    };
    let report = matformer_export::export(&opts)?;
    if json {
        return print_json(&report);
    }
    println!("wrote {} ({}, {} bytes)", report.output, human_bytes(report.bytes), report.bytes);
    println!("weights found by {}", report.weights_found_by);
    for (j, end) in report.level_ends.iter().enumerate() {
        println!("  level {j} ends at byte {end}");
    }
    match &report.verification {
        Some(v) => {
            println!("verified against {}: {}", v.reference, v.summary());
            for c in &v.checks {
                println!(
                    "  {:<12} probe {}  max|diff| {:.3e}  max|logit| {:.2}  relative {:.2e}  argmax {}/{}",
                    c.submodel, c.probe, c.max_abs_diff, c.max_abs_ref, c.relative, c.argmax_agree, c.positions
                );
            }
        }
        None => println!("NOT verified (--no-verify)"),
    }
    if let Some(c) = &report.calibration {
        println!(
            "catalog calibrated on {} bytes: {} evaluations, prediction error mean {} max {}, Spearman {}",
            c.text_bytes,
            c.evaluations,
            c.mean_abs_error.map(|e| format!("{e:.4}")).unwrap_or_else(|| "-".into()),
            c.max_abs_error.map(|e| format!("{e:.4}")).unwrap_or_else(|| "-".into()),
            c.spearman.map(|e| format!("{e:.3}")).unwrap_or_else(|| "-".into())
        );
        println!("  stored Pareto frontier: {}", report.frontier.join("  "));
    }
    Ok(())
}
