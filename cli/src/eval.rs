//! `matformer eval`: mean loss and perplexity on a text file.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use matformer::cpu::CpuEngine;
use matformer::tokenizer::ByteTokenizer;
use matformer::{ModelFile, Submodel};
use serde::Serialize;

use crate::common::{open, print_json};

fn engine(model: &Arc<ModelFile>, threads: Option<usize>) -> Result<CpuEngine> {
    let e = CpuEngine::new(model.clone())?;
    Ok(match threads {
        Some(n) => e.with_threads(n),
        None => e,
    })
}

#[derive(Serialize)]
struct EvalRow {
    submodel: String,
    widths: Vec<u32>,
    predicted_tokens: usize,
    nats_per_token: f64,
    bits_per_byte: f64,
    perplexity: f64,
    seconds: f64,
}

/// `matformer eval`.
pub fn run(
    file: &Path,
    text: &Path,
    specs: Vec<String>,
    chunk: Option<usize>,
    threads: Option<usize>,
    json: bool,
) -> Result<()> {
    let model = open(file)?;
    let meta = model.metadata().clone();
    let bytes = std::fs::read(text).with_context(|| format!("cannot read {}", text.display()))?;
    let tok = ByteTokenizer::from_metadata(&meta);
    let engine = engine(&model, threads)?;
    let chunk = chunk.unwrap_or(meta.architecture.max_context as usize).min(meta.architecture.max_context as usize);
    let specs = if specs.is_empty() { vec!["largest".to_string()] } else { specs };
    let mut rows = Vec::new();
    for s in &specs {
        let sub = Submodel::parse(s, &meta, model.view().available_levels)?;
        let t0 = Instant::now();
        let r = matformer_export::eval::mean_cross_entropy(&engine, &sub, &tok, &bytes, chunk)?;
        let (nats, n) = (r.nats_per_token, r.predicted_tokens);
        let row = EvalRow {
            submodel: sub.name(&meta),
            widths: sub.widths(&meta),
            predicted_tokens: n,
            nats_per_token: nats,
            bits_per_byte: nats / std::f64::consts::LN_2,
            perplexity: nats.exp(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        if !json {
            println!(
                "{:<14} {:>8} bytes  {:.4} nats/byte  {:.4} bits/byte  perplexity {:.3}  ({:.1} s)",
                row.submodel, row.predicted_tokens, row.nats_per_token, row.bits_per_byte, row.perplexity, row.seconds
            );
        }
        rows.push(row);
    }
    if json {
        print_json(&rows)?;
    }
    Ok(())
}
