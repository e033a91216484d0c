//! `matformer eval`: mean loss and perplexity on a text file.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use matformer::cpu::CpuEngine;
use matformer::tokenizer::Tokenizer;
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
    // The model's own tokenizer: bytes for the bundled model (each byte a token), the stored
    // BPE for an imported one (the whole text encoded once, then cut into chunks).
    let tok = Tokenizer::from_model(&model).context("cannot load the model's tokenizer")?;
    let (start, ids): (u32, Vec<u32>) = match &tok {
        Tokenizer::Bytes(b) => {
            let bos = b.bos_id.context("evaluation needs a tokenizer with a BOS token")?;
            (bos, bytes.iter().map(|&b| u32::from(b)).collect())
        }
        _ => {
            let text = std::str::from_utf8(&bytes).with_context(|| format!("{} is not UTF-8 text", text.display()))?;
            // Chunks start with BOS, or with the end-of-text token for a tokenizer without one.
            let start = tok
                .bos_id()
                .or_else(|| tok.eos_ids().first().copied())
                .context("evaluation needs a BOS or EOS token to start each chunk with")?;
            (start, tok.encode(text, false)?)
        }
    };
    let unit = if matches!(tok, Tokenizer::Bytes(_)) { "byte" } else { "token" };
    let engine = engine(&model, threads)?;
    // At most 1024 tokens by default: a chunk's logits are `chunk x vocab` floats (200 MB for
    // SmolLM2's 49,152 at 1024).
    let max_context = meta.architecture.max_context as usize;
    let chunk = chunk.unwrap_or(max_context.min(1024)).min(max_context);
    let specs = if specs.is_empty() { vec!["largest".to_string()] } else { specs };
    let catalog = matformer::elastic::Catalog::from_view(model.view());
    let mut rows = Vec::new();
    for s in &specs {
        let sub = Submodel::parse(s, &meta, model.view().available_levels)?;
        let t0 = Instant::now();
        let r = matformer_export::eval::mean_cross_entropy_tokens(&engine, &sub, start, &ids, chunk)?;
        let (nats, n) = (r.nats_per_token, r.predicted_tokens);
        let row = EvalRow {
            submodel: catalog.name_of(&sub, &meta),
            widths: sub.widths(&meta),
            predicted_tokens: n,
            nats_per_token: nats,
            bits_per_byte: nats * n as f64 / bytes.len().max(1) as f64 / std::f64::consts::LN_2,
            perplexity: nats.exp(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        if !json {
            println!(
                "{:<14} {:>8} {unit}s  {:.4} nats/{unit}  {:.4} bits/byte  perplexity {:.3} per {unit}  ({:.1} s)",
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
