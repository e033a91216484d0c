//! `matformer bench --speculative`: nested speculative decoding against the verifier alone,
//! through the public API (`Engine`, `Session`): for each draft (by default every uniform level
//! below the verifier) and each draft cache (shared, own), greedy generation from the same
//! prompts, with the acceptance rate, tokens per verify pass, decode speed and its ratio to
//! the verifier alone, whether the tokens are identical, and the costs behind them: the draft
//! step, the verify pass of `k + 1` tokens and the plain decode step.
//!
//! `--project-acceptance A` adds, per row, the speed-up those measured costs give at
//! acceptance rate `A` with the row's last `k` (use `--fixed-k`): `t_step E / (k t_draft +
//! t_verify)` with `E = (1 - A^(k+1)) / (1 - A)` tokens per pass (Leviathan et al. 2023, i.i.d.
//! acceptance), for shapes whose random weights accept nothing (the synth file).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use matformer::{
    BackendChoice, DraftCache, DraftChoice, Engine, EngineOptions, GenerateOptions, Input, ModelFile, NoSink,
    SessionOptions, SpeculativeOptions, SubmodelChoice,
};
use serde::Serialize;

/// Prompts for models without `--prompt`: plain English, where a trained model's drafts agree.
const DEFAULT_PROMPTS: &[&str] =
    &["The meaning of ", "Once upon a time, there was a ", "The history of the city ", "She opened the door and "];

/// Settings of `bench --speculative`.
#[derive(Clone, Debug)]
pub struct SpecBenchArgs {
    /// The verifier (default: the largest submodel).
    pub verifier: Option<String>,
    /// Drafts (default: every uniform level below the verifier's).
    pub drafts: Vec<String>,
    /// Prompts (default: [`DEFAULT_PROMPTS`]).
    pub prompts: Vec<String>,
    /// Tokens generated per prompt.
    pub gen_len: usize,
    /// Runs of every prompt per row.
    pub repetitions: usize,
    /// Tokens drafted in the first round.
    pub k: usize,
    /// Most tokens drafted per round.
    pub max_k: usize,
    /// Keep `k` fixed.
    pub fixed_k: bool,
    /// The drafts' vocabularies (`None`: the whole); every draft is measured with each.
    pub draft_vocabs: Vec<Option<usize>>,
    /// Acceptance rates to project the measured costs at.
    pub project: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
struct Row {
    backend: String,
    verifier: String,
    /// `None` for the verifier alone.
    draft: Option<String>,
    cache: Option<String>,
    /// The draft proposes among the first this many token ids (`None`: all of them).
    draft_vocab: Option<usize>,
    generated_tokens: usize,
    decode_tokens_per_s: f64,
    /// Decode tokens/s over the verifier alone's.
    speedup: f64,
    /// Every prompt's tokens equal the verifier alone's.
    identical: bool,
    acceptance_rate: Option<f64>,
    tokens_per_pass: Option<f64>,
    /// Plain decode step (the verifier alone), ms.
    decode_step_ms: f64,
    /// One draft pass, ms.
    draft_step_ms: Option<f64>,
    /// One verify pass (`k + 1` tokens), ms.
    verify_pass_ms: Option<f64>,
    /// Tokens drafted in the last round.
    last_k: Option<usize>,
    /// Mean tokens drafted per round.
    mean_k: Option<f64>,
    /// Peak resident memory during the row (VmHWM after a reset), bytes.
    peak_rss_bytes: Option<u64>,
    /// Most bytes the session's KV caches (the verifier's and a draft's own) held after a
    /// generation of the row.
    kv_cache_bytes: u64,
    /// Of which the draft's own cache.
    draft_kv_bytes: Option<u64>,
    /// GPU queue submits per round (0 on the CPU engine).
    submits_per_round: Option<f64>,
    /// GPU readbacks per round.
    readbacks_per_round: Option<f64>,
    /// `(acceptance, speed-up)` the measured costs give at that acceptance with `last_k`.
    projected: Vec<(f64, f64)>,
}

struct Measured {
    tokens: Vec<Vec<u32>>,
    generated: usize,
    decode_ms: f64,
    passes: usize,
    proposed: usize,
    accepted: usize,
    produced: f64,
    draft_ms: f64,
    draft_steps: usize,
    verify_ms: f64,
    last_k: usize,
    kv_bytes: u64,
    draft_kv_bytes: u64,
    submits: u64,
    readbacks: u64,
}

fn measure(
    engine: &Engine,
    verifier: &str,
    prompts: &[String],
    a: &SpecBenchArgs,
    spec: Option<SpeculativeOptions>,
) -> Result<Measured> {
    let session = engine.session(SessionOptions {
        submodel: SubmodelChoice::Named(verifier.to_string()),
        ..SessionOptions::default()
    })?;
    let options = GenerateOptions { max_tokens: a.gen_len, speculative: spec, ..GenerateOptions::default() };
    // Warm-up (pages, GPU pipelines, the draft's plan).
    session.generate(Input::Text(prompts[0].clone()), &options, &mut NoSink)?;
    let mut m = Measured {
        tokens: Vec::new(),
        generated: 0,
        decode_ms: 0.0,
        passes: 0,
        proposed: 0,
        accepted: 0,
        produced: 0.0,
        draft_ms: 0.0,
        draft_steps: 0,
        verify_ms: 0.0,
        last_k: 0,
        kv_bytes: 0,
        draft_kv_bytes: 0,
        submits: 0,
        readbacks: 0,
    };
    for rep in 0..a.repetitions {
        for p in prompts {
            session.reset();
            let c = session.generate(Input::Text(p.clone()), &options, &mut NoSink)?;
            if rep == 0 {
                m.tokens.push(c.token_ids.clone());
            }
            m.generated += c.usage.completion_tokens.saturating_sub(1);
            m.kv_bytes = m.kv_bytes.max(session.kv_cache_bytes());
            m.decode_ms += c.stats.decode_ms;
            if let Some(s) = &c.stats.speculative {
                m.passes += s.verify_passes;
                m.proposed += s.proposed;
                m.accepted += s.accepted;
                m.produced += s.tokens_per_pass * s.verify_passes as f64;
                m.draft_ms += s.draft_ms;
                m.draft_steps += s.draft_steps;
                m.verify_ms += s.verify_ms;
                m.last_k = s.last_k;
                m.draft_kv_bytes = m.draft_kv_bytes.max(s.draft_kv_bytes);
                m.submits += s.gpu_submits;
                m.readbacks += s.gpu_readbacks;
            }
        }
    }
    Ok(m)
}

fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Speed-up at acceptance `alpha` with `k` drafts per round, a draft pass of `t_draft`, a
/// verify pass of `t_verify` and a plain step of `t_step` (ms).
fn projected(alpha: f64, k: usize, t_draft: f64, t_verify: f64, t_step: f64) -> f64 {
    let e = if (1.0 - alpha).abs() < 1e-12 { (k + 1) as f64 } else { (1.0 - alpha.powi(k as i32 + 1)) / (1.0 - alpha) };
    e * t_step / (k as f64 * t_draft + t_verify)
}

/// `matformer bench --speculative`.
pub fn run(
    file: &Path,
    backends: &[BackendChoice],
    threads: Option<usize>,
    a: &SpecBenchArgs,
    json: bool,
) -> Result<()> {
    let model = Arc::new(ModelFile::open(file)?);
    let meta = model.metadata().clone();
    let levels = model.view().available_levels;
    let verifier_name = a.verifier.clone().unwrap_or_else(|| "largest".into());
    let verifier = matformer::Submodel::parse(&verifier_name, &meta, levels)?;
    let drafts: Vec<String> = if a.drafts.is_empty() {
        let top = verifier.max_level();
        (0..top).map(|l| meta.level_names.get(usize::from(l)).cloned().unwrap_or_else(|| l.to_string())).collect()
    } else {
        a.drafts.clone()
    };
    if drafts.is_empty() {
        bail!("the verifier {} has no narrower level to draft with", verifier.name(&meta));
    }
    let prompts: Vec<String> =
        if a.prompts.is_empty() { DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect() } else { a.prompts.clone() };
    let mut rows = Vec::new();
    for &backend in backends {
        let engine =
            Engine::from_model(Arc::clone(&model), EngineOptions { backend, threads, ..EngineOptions::default() })?;
        let bname = engine.backend().kind.name().to_string();
        let vname = matformer::elastic::Catalog::from_view(model.view()).name_of(&verifier, &meta);
        eprintln!(
            "bench --speculative {bname}: verifier {vname} alone, {} prompts x {} tokens",
            prompts.len(),
            a.gen_len
        );
        reset_peak_rss();
        let base = measure(&engine, &verifier_name, &prompts, a, None)?;
        let base_rss = peak_rss();
        let base_tps = base.generated as f64 / (base.decode_ms / 1e3);
        let step_ms = base.decode_ms / base.generated.max(1) as f64;
        rows.push(Row {
            backend: bname.clone(),
            verifier: vname.clone(),
            draft: None,
            cache: None,
            draft_vocab: None,
            generated_tokens: base.generated,
            decode_tokens_per_s: base_tps,
            speedup: 1.0,
            identical: true,
            acceptance_rate: None,
            tokens_per_pass: None,
            decode_step_ms: step_ms,
            draft_step_ms: None,
            verify_pass_ms: None,
            last_k: None,
            mean_k: None,
            peak_rss_bytes: base_rss,
            kv_cache_bytes: base.kv_bytes,
            draft_kv_bytes: None,
            submits_per_round: None,
            readbacks_per_round: None,
            projected: Vec::new(),
        });
        let runs = drafts.iter().flat_map(|d| {
            a.draft_vocabs.iter().flat_map(move |&v| [DraftCache::Shared, DraftCache::Own].map(|c| (d, v, c)))
        });
        for (draft, draft_vocab, cache) in runs {
            let vocab_note = draft_vocab.map(|v| format!(", vocabulary {v}")).unwrap_or_default();
            eprintln!("bench --speculative {bname}: draft {draft}, {} KV{vocab_note}", cache.name());
            let spec = SpeculativeOptions {
                draft: DraftChoice::Named(draft.clone()),
                cache,
                k: a.k,
                max_k: a.max_k.max(a.k),
                adaptive: !a.fixed_k,
                draft_vocab,
            };
            reset_peak_rss();
            let m = measure(&engine, &verifier_name, &prompts, a, Some(spec))?;
            let rss = peak_rss();
            let tps = m.generated as f64 / (m.decode_ms / 1e3);
            let t_draft = m.draft_ms / m.draft_steps.max(1) as f64;
            let t_verify = m.verify_ms / m.passes.max(1) as f64;
            let proj = a.project.iter().map(|&al| (al, projected(al, m.last_k, t_draft, t_verify, step_ms))).collect();
            rows.push(Row {
                backend: bname.clone(),
                verifier: vname.clone(),
                draft: Some(draft.clone()),
                cache: Some(cache.name().to_string()),
                draft_vocab,
                generated_tokens: m.generated,
                decode_tokens_per_s: tps,
                speedup: tps / base_tps,
                identical: m.tokens == base.tokens,
                acceptance_rate: Some(if m.proposed > 0 { m.accepted as f64 / m.proposed as f64 } else { 0.0 }),
                tokens_per_pass: Some(if m.passes > 0 { m.produced / m.passes as f64 } else { 0.0 }),
                decode_step_ms: step_ms,
                draft_step_ms: Some(t_draft),
                verify_pass_ms: Some(t_verify),
                last_k: Some(m.last_k),
                mean_k: Some(m.proposed as f64 / m.passes.max(1) as f64),
                peak_rss_bytes: rss,
                kv_cache_bytes: m.kv_bytes,
                draft_kv_bytes: Some(m.draft_kv_bytes),
                submits_per_round: Some(m.submits as f64 / m.passes.max(1) as f64),
                readbacks_per_round: Some(m.readbacks as f64 / m.passes.max(1) as f64),
                projected: proj,
            });
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<4} {:<8} {:<14} {:<7} {:>7} {:>8} {:>9} {:>7} {:>9} {:>8} {:>9} {:>9} {:>6} {:>9} {:>9} {:>7}",
        "be",
        "verifier",
        "draft[/vocab]",
        "cache",
        "accept",
        "tok/pass",
        "tok/s",
        "speedup",
        "identical",
        "step ms",
        "draft ms",
        "verify ms",
        "mean k",
        "peak RSS",
        "KV",
        "sub/rnd"
    );
    let opt = |v: Option<f64>, prec: usize| v.map(|x| format!("{x:.prec$}")).unwrap_or_else(|| "-".into());
    for r in &rows {
        println!(
            "{:<4} {:<8} {:<14} {:<7} {:>7} {:>8} {:>9.1} {:>6.2}x {:>9} {:>8.3} {:>9} {:>9} {:>6} {:>9} {:>9} {:>7}",
            r.backend,
            r.verifier,
            match (&r.draft, r.draft_vocab) {
                (None, _) => "(alone)".to_string(),
                (Some(d), None) => d.clone(),
                (Some(d), Some(v)) => format!("{d}/{v}"),
            },
            r.cache.as_deref().unwrap_or("-"),
            r.acceptance_rate.map(|x| format!("{:.1}%", x * 100.0)).unwrap_or_else(|| "-".into()),
            opt(r.tokens_per_pass, 2),
            r.decode_tokens_per_s,
            r.speedup,
            if r.identical { "yes" } else { "NO" },
            r.decode_step_ms,
            opt(r.draft_step_ms, 3),
            opt(r.verify_pass_ms, 3),
            opt(r.mean_k, 2),
            r.peak_rss_bytes.map(matformer_export::progress::human_bytes).unwrap_or_else(|| "-".into()),
            matformer_export::progress::human_bytes(r.kv_cache_bytes),
            opt(r.submits_per_round, 2),
        );
        for (al, sp) in &r.projected {
            println!("       projected at acceptance {:.1}% with k = {}: {sp:.2}x", al * 100.0, r.last_k.unwrap_or(0));
        }
    }
    Ok(())
}
