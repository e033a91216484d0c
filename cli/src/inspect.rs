//! `matformer inspect`: a file's architecture, levels, catalog and tensors.

use std::path::Path;

use anyhow::Result;
use matformer::ModelFile;
use matformer_export::progress::human_bytes;
use serde::Serialize;

use crate::common::{open, print_json};

#[derive(Serialize)]
struct LevelRow {
    level: usize,
    name: String,
    widths: Vec<u32>,
    end_offset: u64,
    available: bool,
    parameters: u64,
}

#[derive(Serialize)]
struct InspectOut<'a> {
    file: String,
    file_bytes: u64,
    version: u32,
    alignment: u64,
    header_bytes: u64,
    dtype: &'a str,
    /// How the levels were nested (`trained`, `post_hoc`, `unknown`): what `--switch-mode auto`
    /// decides on.
    nesting: &'static str,
    metadata: &'a matformer::format::Metadata,
    levels: Vec<LevelRow>,
    available_levels: usize,
    n_tensors: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    tensors: Option<&'a [matformer::format::TensorInfo]>,
}

/// Parameters of the uniform submodel at `level`.
fn parameters_at(model: &ModelFile, level: usize) -> u64 {
    model
        .view()
        .tensors
        .iter()
        .map(|t| {
            let rows: u64 =
                t.segments.iter().filter(|s| s.level as usize <= level).map(|s| s.row_end - s.row_start).sum();
            rows * t.row_elems()
        })
        .sum()
}

/// `matformer inspect`.
pub fn run(file: &Path, tensors: bool, json: bool) -> Result<()> {
    let model = open(file)?;
    let v = model.view();
    let meta = model.metadata();
    let levels: Vec<LevelRow> = (0..meta.n_levels())
        .map(|j| LevelRow {
            level: j,
            name: meta.level_names[j].clone(),
            widths: v.level_widths(j),
            end_offset: v.level_ends[j],
            available: j < v.available_levels,
            parameters: parameters_at(&model, j),
        })
        .collect();
    let dtype = v.tensors.first().map(|t| t.dtype.name()).unwrap_or("none");
    let out = InspectOut {
        file: file.display().to_string(),
        file_bytes: v.file_len,
        version: v.version,
        alignment: v.alignment,
        header_bytes: v.header_len,
        dtype,
        nesting: meta.nesting().as_str(),
        metadata: meta,
        levels,
        available_levels: v.available_levels,
        n_tensors: v.tensors.len(),
        tensors: tensors.then_some(v.tensors.as_slice()),
    };
    if json {
        return print_json(&out);
    }
    let a = &meta.architecture;
    println!(
        "{}: .matf v{}, {} ({} bytes), {} tensors, {dtype}",
        out.file,
        out.version,
        human_bytes(out.file_bytes),
        out.file_bytes,
        out.n_tensors
    );
    println!(
        "architecture: {} d_model {} layers {} heads {}/{} kv head_dim {} vocab {} context {}",
        a.family, a.d_model, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size, a.max_context
    );
    println!(
        "  norm {:?} eps {:e}, activation {:?}{}, rope theta {}, tied embeddings {}",
        a.norm,
        a.norm_eps,
        a.activation,
        if a.gated_ffn { " gated" } else { "" },
        a.rope_theta,
        a.tied_embeddings
    );
    println!("tokenizer: {} (bos {:?}, eos {:?})", meta.tokenizer.kind, meta.tokenizer.bos_id, meta.tokenizer.eos_id);
    println!(
        "provenance: {} sha256 {} by {}",
        meta.provenance.source_name, meta.provenance.source_sha256, meta.provenance.exporter
    );
    println!("header: {} bytes, alignment {} bytes", out.header_bytes, out.alignment);
    println!(
        "nested FFN levels ({} of {} available in this file; nesting {}):",
        out.available_levels,
        meta.n_levels(),
        out.nesting
    );
    println!(
        "  {:<5} {:<5} {:>14} {:>14}  {:<9} widths per layer",
        "level", "name", "ends at byte", "parameters", "present"
    );
    for l in &out.levels {
        let uniform = l.widths.windows(2).all(|w| w[0] == w[1]);
        let widths = if uniform && !l.widths.is_empty() {
            format!("{} x {}", l.widths[0], l.widths.len())
        } else {
            format!("{:?}", l.widths)
        };
        println!(
            "  {:<5} {:<5} {:>14} {:>14}  {:<9} {}",
            l.level,
            l.name,
            l.end_offset,
            l.parameters,
            if l.available { "yes" } else { "no" },
            widths
        );
    }
    println!(
        "  (a copy cut at a level's end offset, e.g. `head -c {} FILE`, is a valid smaller model)",
        out.levels[0].end_offset
    );
    match matformer::elastic::Catalog::from_metadata_extra(&model) {
        Ok(catalog) => {
            let frontier = catalog.pareto_frontier();
            let calibrated = catalog.calibration.is_some();
            println!(
                "submodel catalog: {} Mix'n'Match entries{}; Pareto frontier (weight bytes vs loss):",
                catalog.entries.len(),
                if calibrated { ", calibrated" } else { " (not calibrated: ordered by size)" }
            );
            let shown: Vec<&matformer::elastic::CatalogEntry> =
                if calibrated { frontier.iter().collect() } else { catalog.entries.iter().rev().take(8).collect() };
            for e in shown {
                let loss = match (e.measured_loss, e.predicted_loss) {
                    (Some(m), _) => format!("{m:.4} measured"),
                    (None, Some(p)) => format!("{p:.4} predicted"),
                    _ => "-".into(),
                };
                println!("  {:<20} {:>12} bytes  loss {loss}", e.name, e.weight_bytes);
            }
        }
        Err(e) => println!("submodel catalog: unreadable ({e})"),
    }
    let extra: Vec<&String> = meta.extra.keys().filter(|k| !matches!(k.as_str(), "catalog" | "nesting")).collect();
    if !extra.is_empty() {
        println!("other metadata: {extra:?}");
    }
    if tensors {
        println!("tensors:");
        for t in &v.tensors {
            println!("  {:<24} {:<4} {:?}", t.name, t.dtype.name(), t.shape);
            for s in &t.segments {
                println!(
                    "      level {} rows {}..{} at {} ({} bytes, crc32 {:08x})",
                    s.level, s.row_start, s.row_end, s.offset, s.byte_len, s.crc32
                );
            }
        }
    }
    Ok(())
}
