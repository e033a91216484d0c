//! `matformer chat`: an interactive conversation through the public API only (`Engine`,
//! `Session`), and the sampling, stop and engine flags `generate` shares.
//!
//! Lines typed are user messages; `/reset` forgets the conversation, `/stats` prints the last
//! answer's statistics, `/quit` (or end of input) leaves. Ctrl-C while an answer is being
//! written cancels that answer, not the program; Ctrl-C at the prompt leaves.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use matformer::{
    BackendChoice, CancelHandle, ChatMessage, Completion, DraftCache, DraftChoice, Engine, EngineOptions,
    GenerateOptions, GpuTuning, Input, SamplingParams, Session, SessionOptions, SinkControl, SpeculativeOptions,
    SubmodelChoice, SwitchMode,
};

/// Engine flags: backend, threads, GPU memory cap, latency cache.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Backend: auto (a hardware GPU that passes a self-check, else the CPU), cpu or gpu.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Cap on GPU memory (e.g. 1GiB); a submodel that does not fit steps down.
    #[arg(long)]
    pub gpu_memory: Option<String>,
    /// Directory of the latency cost-model cache (default: $XDG_CACHE_HOME/matformer or
    /// ~/.cache/matformer).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

/// `--backend` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// GPU if usable, else CPU.
    Auto,
    /// The CPU engine.
    Cpu,
    /// The GPU or an error.
    Gpu,
}

impl From<BackendArg> for BackendChoice {
    fn from(b: BackendArg) -> BackendChoice {
        match b {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::Cpu => BackendChoice::Cpu,
            BackendArg::Gpu => BackendChoice::Gpu,
        }
    }
}

impl EngineArgs {
    /// The engine options these flags describe.
    pub fn options(&self) -> Result<EngineOptions> {
        let gpu_memory_limit_bytes = match &self.gpu_memory {
            Some(v) => Some(crate::select::parse_bytes(v)?),
            // The harness keeps honouring the variable the earlier CLI read (the library
            // reads none).
            None => match std::env::var("MATFORMER_GPU_MEMORY_LIMIT") {
                Ok(v) => {
                    Some(crate::select::parse_bytes(&v).map_err(|e| anyhow!("MATFORMER_GPU_MEMORY_LIMIT={v:?}: {e}"))?)
                }
                Err(_) => None,
            },
        };
        Ok(EngineOptions {
            backend: self.backend.into(),
            threads: self.threads,
            gpu_memory_limit_bytes,
            cache_dir: self.cache_dir.clone().or_else(crate::latency::default_cache_dir),
            verify: false,
            gpu_tuning: gpu_tuning_from_env()?,
        })
    }
}

/// GPU kernel overrides from the harness's tuning variables (the library reads none):
/// `MATFORMER_GPU_WEIGHT_PATH` (packed, f16 or packed64), `MATFORMER_GEMV_ROWS` (a power of two,
/// 1 to 64), `MATFORMER_GEMV_RPT` (1, 2 or 4), `MATFORMER_SUBGROUP_GEMV=0`. The engine rejects
/// invalid values with an error naming them.
pub fn gpu_tuning_from_env() -> Result<GpuTuning> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let number = |name: &str| -> Result<Option<u32>> {
        var(name).map(|v| v.trim().parse::<u32>().map_err(|_| anyhow!("{name}={v:?} is not a number"))).transpose()
    };
    Ok(GpuTuning {
        weight_path: var("MATFORMER_GPU_WEIGHT_PATH").map(|v| v.trim().to_string()),
        gemv_rows: number("MATFORMER_GEMV_ROWS")?,
        gemv_rows_per_thread: number("MATFORMER_GEMV_RPT")?,
        subgroup_gemv: var("MATFORMER_SUBGROUP_GEMV").map(|v| v.trim() != "0"),
    })
}

/// Sampling and stop flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs {
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Repetition penalty (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Frequency penalty (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Presence penalty (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Random seed (the same seed gives the same text).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Stop when this token id is produced (repeatable).
    #[arg(long)]
    pub stop_token: Vec<u32>,
}

impl SamplingArgs {
    /// The generate options for `max_tokens`.
    pub fn options(&self, max_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                frequency_penalty: self.frequency_penalty,
                presence_penalty: self.presence_penalty,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token.clone(),
            truncate_prompt: false,
            speculative: None,
        }
    }
}

/// Speculative decoding flags (`generate` and `chat`).
#[derive(Debug, Clone, clap::Args)]
pub struct SpeculativeArgs {
    /// Speculative decoding: a narrower nested submodel drafts, the running one verifies
    /// (the output is the verifier's).
    #[arg(long)]
    pub speculative: bool,
    /// The draft: `auto` (the smallest submodel), a level name (s, m, l), per-layer levels
    /// (s,s,m,l or 0,0,1,3) or a catalog entry. Implies --speculative.
    #[arg(long)]
    pub draft: Option<String>,
    /// Where the draft keeps its KV cache: shared (the verifier's, no extra memory) or own.
    #[arg(long, value_enum, default_value = "shared")]
    pub draft_cache: DraftCacheArg,
    /// Tokens drafted in the first round.
    #[arg(long, default_value_t = 4)]
    pub draft_k: usize,
    /// Most tokens drafted in a round.
    #[arg(long, default_value_t = 8)]
    pub draft_max_k: usize,
    /// Keep k fixed (default: grow it after a fully accepted round, shrink after a rejection).
    #[arg(long)]
    pub fixed_k: bool,
    /// The draft proposes only among the first N token ids (its LM head reads N rows; the
    /// answer is still the verifier's). Default: the whole vocabulary.
    #[arg(long, value_name = "N")]
    pub draft_vocab: Option<usize>,
}

/// `--draft-cache` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DraftCacheArg {
    /// The verifier's KV cache.
    Shared,
    /// A second KV cache for the draft.
    Own,
}

impl From<DraftCacheArg> for DraftCache {
    fn from(c: DraftCacheArg) -> DraftCache {
        match c {
            DraftCacheArg::Shared => DraftCache::Shared,
            DraftCacheArg::Own => DraftCache::Own,
        }
    }
}

impl SpeculativeArgs {
    /// The speculative options these flags describe (`None`: off).
    pub fn options(&self) -> Option<SpeculativeOptions> {
        if !self.speculative && self.draft.is_none() {
            return None;
        }
        let draft = match self.draft.as_deref() {
            None | Some("auto") => DraftChoice::Auto,
            Some(name) => DraftChoice::Named(name.to_string()),
        };
        Some(SpeculativeOptions {
            draft,
            cache: self.draft_cache.into(),
            k: self.draft_k,
            max_k: self.draft_max_k.max(self.draft_k),
            adaptive: !self.fixed_k,
            draft_vocab: self.draft_vocab,
        })
    }
}

/// `[speculative: draft s (shared KV, 0 B of its own), 37 verify passes, ...]`; the draft is
/// `s/16384` when it proposed among the first 16,384 token ids only.
pub fn speculative_line(s: &matformer::SpeculativeStats) -> String {
    format!(
        "[speculative: draft {}{} ({} KV, {} of its own), {} verify passes, {} of {} drafts accepted ({:.1}%), {:.2} tokens per pass, draft {:.1} ms, verify {:.1} ms, {} GPU submits]",
        s.draft,
        s.draft_vocab.map(|n| format!("/{n}")).unwrap_or_default(),
        s.cache.name(),
        matformer_export::progress::human_bytes(s.draft_kv_bytes),
        s.verify_passes,
        s.accepted,
        s.proposed,
        s.acceptance_rate * 100.0,
        s.tokens_per_pass,
        s.draft_ms,
        s.verify_ms,
        s.gpu_submits
    )
}

/// `--switch-mode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SwitchModeArg {
    /// Keep the KV cache, except when a layer widens on a file not trained nested.
    Auto,
    /// Re-prefill the history with the new submodel (exact output).
    Exact,
    /// Keep the KV cache (no re-prefill).
    KeepKv,
}

impl From<SwitchModeArg> for SwitchMode {
    fn from(m: SwitchModeArg) -> SwitchMode {
        match m {
            SwitchModeArg::Auto => SwitchMode::Auto,
            SwitchModeArg::Exact => SwitchMode::Exact,
            SwitchModeArg::KeepKv => SwitchMode::KeepKv,
        }
    }
}

/// The submodel a `--submodel` value and the budget flags name.
pub fn submodel_choice(spec: &str, budget: &crate::select::BudgetArgs) -> Result<SubmodelChoice> {
    Ok(if spec == "auto" { SubmodelChoice::Auto(budget.budget()?) } else { SubmodelChoice::Named(spec.to_string()) })
}

/// Opens the engine, saying on stderr which backend runs and why.
pub fn open_engine(file: &Path, args: &EngineArgs, quiet: bool) -> Result<Engine> {
    let engine = Engine::open(file, args.options()?)?;
    if !quiet {
        let b = engine.backend();
        eprintln!("backend: {} ({}; {})", b.kind.name(), b.device, b.reason);
    }
    Ok(engine)
}

/// `matformer chat` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// The .matf file.
    pub file: PathBuf,
    /// Ask this one question, print the answer and exit (no interactive prompt).
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens per answer at most.
    #[arg(short = 'n', long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Submodel: a level name (s, m, l, xl), `largest`, per-layer levels, or `auto` (chosen
    /// for the budget flags).
    #[arg(long, default_value = "largest")]
    pub submodel: String,
    /// How a change of submodel treats the KV cache.
    #[arg(long, value_enum, default_value = "auto")]
    pub switch_mode: SwitchModeArg,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub speculative: SpeculativeArgs,
    #[command(flatten)]
    pub budget: crate::select::BudgetArgs,
    /// One JSON object per turn on stdout (the answer is not streamed).
    #[arg(long)]
    pub json: bool,
}

/// `matformer chat`.
pub fn run(args: &ChatArgs) -> Result<()> {
    let engine = open_engine(&args.file, &args.engine, true)?;
    let session = engine.session(SessionOptions {
        submodel: submodel_choice(&args.submodel, &args.budget)?,
        context_length: args.budget.context.map(|c| c as usize),
        system_prompt: args.system.clone(),
        switch_mode: args.switch_mode.into(),
    })?;
    if !args.json {
        let b = engine.backend();
        eprintln!("backend: {} ({}; {})", b.kind.name(), b.device, b.reason);
    }
    let options = GenerateOptions { speculative: args.speculative.options(), ..args.sampling.options(args.max_tokens) };
    if !args.json {
        eprintln!("submodel: {} ({} tokens of context)", session.submodel(), session.context_length());
    }
    if let Some(p) = &args.prompt {
        let c = turn(&session, p, &options, args.json)?;
        if !args.json {
            eprintln!("{}", stats_line(&c));
        }
        return Ok(());
    }
    let generating: Arc<Mutex<Option<CancelHandle>>> = Arc::new(Mutex::new(None));
    let g = Arc::clone(&generating);
    ctrlc::set_handler(move || match g.lock().ok().and_then(|h| h.clone()) {
        Some(h) => h.cancel(),
        None => std::process::exit(130),
    })
    .map_err(|e| anyhow!("cannot install the Ctrl-C handler: {e}"))?;
    let stdin = std::io::stdin();
    let mut last: Option<Completion> = None;
    loop {
        if !args.json {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                session.reset();
                eprintln!("(conversation forgotten)");
                continue;
            }
            "/stats" => {
                match &last {
                    Some(c) if args.json => println!("{}", serde_json::to_string(&c.stats)?),
                    Some(c) => eprintln!("{}", stats_line(c)),
                    None => eprintln!("(no answer yet)"),
                }
                continue;
            }
            _ => {}
        }
        *generating.lock().map_err(|_| anyhow!("poisoned"))? = Some(session.cancel_handle());
        let result = turn(&session, line, &options, args.json);
        *generating.lock().map_err(|_| anyhow!("poisoned"))? = None;
        match result {
            Ok(c) => last = Some(c),
            // A bad turn (say, a prompt longer than the context) is reported; the session
            // goes on.
            Err(e) => eprintln!("error: {e:#}"),
        }
    }
    Ok(())
}

/// One user turn: streams the answer (or prints one JSON object) and returns it.
fn turn(session: &Session, text: &str, options: &GenerateOptions, json: bool) -> Result<Completion> {
    let input = Input::Chat(vec![ChatMessage { role: "user".into(), content: text.to_string() }]);
    let mut stdout = std::io::stdout();
    let c = if json {
        session.generate(input, options, &mut matformer::NoSink)?
    } else {
        let c = session.generate(input, options, &mut |piece: &str| {
            print!("{piece}");
            let _ = stdout.flush();
            SinkControl::Continue
        })?;
        println!();
        c
    };
    if json {
        println!("{}", serde_json::to_string(&c)?);
    } else if c.finish_reason == matformer::FinishReason::Cancelled {
        eprintln!("(cancelled)");
    }
    for s in &c.stats.switches {
        if !json {
            eprintln!("switched {} -> {} at token {} ({:.1} ms): {}", s.from, s.to, s.at_token, s.elapsed_ms, s.reason);
        }
    }
    Ok(c)
}

/// `[cpu s: 12 prompt tokens (8 cached) ..., finish eos]` (and the speculative line).
pub fn stats_line(c: &Completion) -> String {
    let s = &c.stats;
    let line = format!(
        "[{} {}: {} prompt tokens ({} cached) in {:.1} ms ({:.1} tok/s), first token after {:.1} ms, {} generated ({:.1} tok/s), finish {}]",
        s.backend,
        s.submodel,
        c.usage.prompt_tokens,
        c.usage.cached_prompt_tokens,
        s.prefill_ms,
        s.prefill_tokens_per_s,
        s.time_to_first_token_ms,
        c.usage.completion_tokens,
        s.decode_tokens_per_s,
        c.finish_reason.name()
    );
    match &s.speculative {
        Some(sp) => format!("{line}\n{}", speculative_line(sp)),
        None => line,
    }
}
