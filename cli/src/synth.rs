//! `matformer synth`: random weights at real model shapes.

use std::path::PathBuf;

use anyhow::Result;
use matformer_export::progress::human_bytes;
use matformer_export::synth::{presets, SynthOptions};
use matformer_export::DTypePlan;

/// `matformer synth`.
pub fn run(
    preset: &str,
    output: PathBuf,
    layers: Option<u32>,
    dtype: &str,
    dtype_override: &[String],
    seed: u64,
    list: bool,
) -> Result<()> {
    if list {
        for p in presets() {
            println!("{:<14} {}", p.name, p.description);
        }
        return Ok(());
    }
    let opts =
        SynthOptions { preset: preset.to_string(), layers, dtype: DTypePlan::parse(dtype, dtype_override)?, seed };
    let planned = matformer_export::synth::planned_len(&opts)?;
    eprintln!("writing {} ({}, {planned} bytes)", output.display(), human_bytes(planned));
    let len = matformer_export::synth::synth(&opts, &output)?;
    println!("wrote {} ({}, {len} bytes)", output.display(), human_bytes(len));
    Ok(())
}
