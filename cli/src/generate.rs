//! `matformer generate`: text completion through the public API (`Engine`, `Session`), with
//! sampling and stop flags, streamed to stdout, and timings.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use matformer::{Engine, FinishReason, GenerateOptions, Input, SessionOptions, SinkControl, SpeculativeStats};
use matformer_export::progress::human_bytes;
use serde::Serialize;

use crate::chat::{speculative_line, submodel_choice, EngineArgs, SamplingArgs, SpeculativeArgs};
use crate::common::{open, print_json};

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
    /// Why generation ended: eos, stop, length or cancelled.
    finish_reason: String,
    /// Changes of submodel (a GPU out-of-memory step-down at start included).
    switches: Vec<matformer::SwitchEvent>,
    /// Speculative decoding's counts (draft, acceptance, tokens per verify pass), when on.
    speculative: Option<SpeculativeStats>,
    /// Bytes held by the session's KV caches after the answer (a speculative draft's own
    /// included).
    kv_cache_bytes: u64,
    /// Peak resident memory of the process (Linux `VmHWM`).
    peak_rss_bytes: Option<u64>,
}

/// The process's peak resident memory (`VmHWM` of `/proc/self/status`), on Linux.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `matformer generate` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// The .matf file.
    pub file: PathBuf,
    /// Prompt text.
    #[arg(short, long)]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(short = 'n', long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Submodel: a width name (s, m, l, xl), per-layer level indices (0,0,1,3), or `auto`
    /// (the catalog entry `select` picks for the budget flags below).
    #[arg(long, default_value = "largest")]
    pub submodel: String,
    #[command(flatten)]
    pub budget: crate::select::BudgetArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub speculative: SpeculativeArgs,
    /// Print the result as JSON (text, tokens, timings).
    #[arg(long)]
    pub json: bool,
}

/// `matformer generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let started = Instant::now();
    let model = open(&args.file)?;
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    let resident_after_open = crate::switch_bench::mapping_resident_bytes(&args.file);
    let engine = Engine::from_model(Arc::clone(&model), args.engine.options()?)?;
    let session = engine.session(SessionOptions {
        submodel: submodel_choice(&args.submodel, &args.budget)?,
        context_length: args.budget.context.map(|c| c as usize),
        ..SessionOptions::default()
    })?;
    // After the session: a bad submodel is then the only line on stderr.
    let b = engine.backend();
    eprintln!("backend: {} ({}; {})", b.kind.name(), b.device, b.reason);
    let load_ms = started.elapsed().as_secs_f64() * 1e3 - open_ms;
    let options = GenerateOptions { speculative: args.speculative.options(), ..args.sampling.options(args.max_tokens) };
    let mut stdout = std::io::stdout();
    if !args.json {
        print!("{}", args.prompt);
    }
    let json = args.json;
    let call_started = Instant::now();
    let c = session.generate(Input::Text(args.prompt.clone()), &options, &mut |piece: &str| {
        if !json {
            print!("{piece}");
            let _ = stdout.flush();
        }
        SinkControl::Continue
    })?;
    for s in &c.stats.switches {
        match s.reason.strip_prefix("GPU out of memory at start: ") {
            Some(why) => eprintln!("note: {} does not fit ({why}); running {}", s.from, s.to),
            None => eprintln!("switched {} -> {} at token {}: {}", s.from, s.to, s.at_token, s.reason),
        }
    }
    let meta = model.metadata();
    let sub = matformer::Submodel::parse(&c.stats.submodel, meta, model.view().available_levels)?;
    let mut tokens = c.token_ids.clone();
    if c.finish_reason == FinishReason::Eos {
        tokens.pop();
    }
    let res = GenerateOut {
        backend: c.stats.backend.clone(),
        submodel: c.stats.submodel.clone(),
        widths: sub.widths(meta),
        prompt_tokens: c.usage.prompt_tokens,
        generated_tokens: tokens.len(),
        tokens,
        text: c.text.clone(),
        prefill_ms: c.stats.prefill_ms,
        decode_ms: c.stats.decode_ms,
        prefill_tokens_per_s: c.stats.prefill_tokens_per_s,
        decode_tokens_per_s: c.stats.decode_tokens_per_s,
        file_bytes: model.view().file_len,
        open_ms,
        resident_after_open_bytes: resident_after_open,
        load_ms,
        time_to_first_token_ms: (call_started - started).as_secs_f64() * 1e3 + c.stats.time_to_first_token_ms,
        finish_reason: c.finish_reason.name().to_string(),
        switches: c.stats.switches.clone(),
        speculative: c.stats.speculative.clone(),
        kv_cache_bytes: session.kv_cache_bytes(),
        peak_rss_bytes: peak_rss(),
    };
    if args.json {
        return print_json(&res);
    }
    println!();
    eprintln!(
        "[{} {}: {} prompt tokens in {:.1} ms ({:.1} tok/s), {} generated in {:.1} ms ({:.1} tok/s), finish {}]",
        res.backend,
        res.submodel,
        res.prompt_tokens,
        res.prefill_ms,
        res.prefill_tokens_per_s,
        res.generated_tokens,
        res.decode_ms,
        res.decode_tokens_per_s,
        res.finish_reason
    );
    eprintln!(
        "[open {:.2} ms ({} file, {} resident after open), load {:.1} ms, first token after {:.1} ms]",
        res.open_ms,
        human_bytes(res.file_bytes),
        res.resident_after_open_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
        res.load_ms,
        res.time_to_first_token_ms
    );
    if let Some(s) = &res.speculative {
        eprintln!("{}", speculative_line(s));
    }
    eprintln!(
        "[KV cache {}, peak RSS {}]",
        human_bytes(res.kv_cache_bytes),
        res.peak_rss_bytes.map(human_bytes).unwrap_or_else(|| "-".into())
    );
    Ok(())
}
