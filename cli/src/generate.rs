//! `matformer generate`: greedy generation with timings.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use matformer::tokenizer::ByteTokenizer;
use matformer_export::progress::human_bytes;
use serde::Serialize;

use crate::backend::{BackendChoice, Engine};
use crate::common::{open, print_json};
use crate::select::resolve_submodel;

#[derive(Serialize)]
struct GenerateOut {
    backend: String,
    submodel: String,
    widths: Vec<u32>,
    prompt_tokens: usize,
    generated_tokens: usize,
    tokens: Vec<u32>,
    text: String,
    prefill_ms: f64,
    decode_ms: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    /// Size of the model file.
    file_bytes: u64,
    /// `ModelFile::open` (map, parse and check the header; reads no weights), ms.
    open_ms: f64,
    /// Resident bytes of the file mapping right after opening (Linux; shows open reads
    /// nothing but the header).
    resident_after_open_bytes: Option<u64>,
    /// Engine and session creation (GPU: device, pipelines and weight upload), ms.
    load_ms: f64,
    /// From the start of `open` to the first generated token (open, load, prefill), ms.
    time_to_first_token_ms: f64,
}

/// `matformer generate`.
#[allow(clippy::too_many_arguments)] // one parameter per command-line flag
pub fn run(
    file: &Path,
    prompt: &str,
    max_tokens: usize,
    spec: &str,
    budget: &crate::select::BudgetArgs,
    backend: BackendChoice,
    threads: Option<usize>,
    json: bool,
) -> Result<()> {
    let started = Instant::now();
    let model = open(file)?;
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    let resident_after_open = crate::switch_bench::mapping_resident_bytes(file);
    let meta = model.metadata().clone();
    // A named submodel is checked before the engine loads; `auto` needs the backend (its
    // latency model).
    let named = if spec == "auto" {
        None
    } else {
        Some(resolve_submodel(&model, spec, budget, crate::latency::CostBackend::Cpu, threads)?)
    };
    let engine = Engine::load(&model, backend, threads, false)?;
    let sub = match named {
        Some(sub) => sub,
        None => {
            let cost_backend = match engine {
                Engine::Cpu(_) => crate::latency::CostBackend::Cpu,
                Engine::Gpu(_) => crate::latency::CostBackend::Gpu,
            };
            resolve_submodel(&model, spec, budget, cost_backend, threads)?
        }
    };
    let tok = ByteTokenizer::from_metadata(&meta);
    let mut session = engine.session(&sub)?;
    let sub = session.submodel().clone();
    let load_ms = started.elapsed().as_secs_f64() * 1e3 - open_ms;
    let prompt_ids = tok.encode(prompt, true);
    let room = (meta.architecture.max_context as usize).saturating_sub(prompt_ids.len());
    let max_tokens = max_tokens.min(room);
    let t0 = Instant::now();
    let mut next = session.prefill(&prompt_ids)?;
    let prefill = t0.elapsed();
    let first_token_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut out = Vec::new();
    let mut stdout = std::io::stdout();
    if !json {
        print!("{prompt}");
    }
    let t1 = Instant::now();
    let mut pending: Vec<u8> = Vec::new();
    for i in 0..max_tokens {
        if Some(next) == meta.tokenizer.eos_id {
            break;
        }
        out.push(next);
        if !json {
            pending.extend(tok.decode_bytes(&[next]));
            // Print whole UTF-8 characters as they complete.
            match std::str::from_utf8(&pending) {
                Ok(s) => {
                    print!("{s}");
                    pending.clear();
                }
                Err(e) if e.error_len().is_some() => {
                    print!("{}", String::from_utf8_lossy(&pending));
                    pending.clear();
                }
                Err(_) => {}
            }
            let _ = stdout.flush();
        }
        if i + 1 < max_tokens {
            next = session.decode(next)?;
        }
    }
    let decode = t1.elapsed();
    let text = tok.decode(&out);
    let decode_steps = out.len().saturating_sub(1).max(1);
    let res = GenerateOut {
        backend: engine.name().to_string(),
        submodel: sub.name(&meta),
        widths: sub.widths(&meta),
        prompt_tokens: prompt_ids.len(),
        generated_tokens: out.len(),
        tokens: out,
        text,
        prefill_ms: prefill.as_secs_f64() * 1e3,
        decode_ms: decode.as_secs_f64() * 1e3,
        prefill_tokens_per_s: prompt_ids.len() as f64 / prefill.as_secs_f64().max(1e-9),
        decode_tokens_per_s: decode_steps as f64 / decode.as_secs_f64().max(1e-9),
        file_bytes: model.view().file_len,
        open_ms,
        resident_after_open_bytes: resident_after_open,
        load_ms,
        time_to_first_token_ms: first_token_ms,
    };
    if json {
        return print_json(&res);
    }
    if !pending.is_empty() {
        print!("{}", String::from_utf8_lossy(&pending));
    }
    println!();
    eprintln!(
        "[{} {}: {} prompt tokens in {:.1} ms ({:.1} tok/s), {} generated in {:.1} ms ({:.1} tok/s)]",
        res.backend,
        res.submodel,
        res.prompt_tokens,
        res.prefill_ms,
        res.prefill_tokens_per_s,
        res.generated_tokens,
        res.decode_ms,
        res.decode_tokens_per_s
    );
    eprintln!(
        "[open {:.2} ms ({} file, {} resident after open), load {:.1} ms, first token after {:.1} ms]",
        res.open_ms,
        human_bytes(res.file_bytes),
        res.resident_after_open_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
        res.load_ms,
        res.time_to_first_token_ms
    );
    Ok(())
}
