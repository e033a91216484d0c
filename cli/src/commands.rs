//! The subcommands.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use matformer::cpu::CpuEngine;
use matformer::format::DType;
use matformer::tokenizer::ByteTokenizer;
use matformer::{ModelFile, Submodel};
use matformer_export::mapping::{NamePreset, Strategy};
use matformer_export::progress::human_bytes;
use matformer_export::synth::{presets, SynthOptions};
use matformer_export::{ExportOptions, VerifyOptions};
use serde::Serialize;

use crate::backend::{BackendChoice, Engine};

fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        other => bail!("unknown dtype `{other}` (f16 or f32)"),
    }
}

fn open(file: &Path) -> Result<Arc<ModelFile>> {
    Ok(Arc::new(ModelFile::open(file)?))
}

fn engine(model: &Arc<ModelFile>, threads: Option<usize>) -> Result<CpuEngine> {
    let e = CpuEngine::new(model.clone())?;
    Ok(match threads {
        Some(n) => e.with_threads(n),
        None => e,
    })
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `matformer export`.
#[allow(clippy::too_many_arguments)]
pub fn export(
    input: PathBuf,
    output: PathBuf,
    dtype: &str,
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
        dtype: parse_dtype(dtype)?,
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

/// `matformer synth`.
pub fn synth(preset: &str, output: PathBuf, layers: Option<u32>, dtype: &str, seed: u64, list: bool) -> Result<()> {
    if list {
        for p in presets() {
            println!("{:<14} {}", p.name, p.description);
        }
        return Ok(());
    }
    let opts = SynthOptions { preset: preset.to_string(), layers, dtype: parse_dtype(dtype)?, seed };
    let len = matformer_export::synth::synth(&opts, &output)?;
    println!("wrote {} ({}, {len} bytes)", output.display(), human_bytes(len));
    Ok(())
}

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
pub fn inspect(file: &Path, tensors: bool, json: bool) -> Result<()> {
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
    println!("nested FFN levels ({} of {} available in this file):", out.available_levels, meta.n_levels());
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
    let extra: Vec<&String> = meta.extra.keys().filter(|k| k.as_str() != "catalog").collect();
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

/// `matformer verify`.
pub fn verify(
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

/// A `--submodel` value: a level name, per-layer levels, or `auto` (the catalog entry `select`
/// picks for the budget flags, with its reason on stderr). With a latency target (`--latency-ms`)
/// the latency is predicted by `backend`'s cached cost model (calibrated and cached when absent,
/// as `matformer latency` does).
pub fn resolve_submodel(
    model: &Arc<ModelFile>,
    spec: &str,
    budget: &crate::select::BudgetArgs,
    backend: crate::latency::CostBackend,
    threads: Option<usize>,
) -> Result<Submodel> {
    if spec == "auto" {
        let catalog = matformer::elastic::Catalog::from_metadata_extra(model)?;
        let budget = budget.budget()?;
        let latency = match budget.latency_target_ms_per_token {
            Some(_) => {
                let args = crate::latency::CostArgs { backend, threads, cost_cache: None, refit: false };
                Some(matformer::elastic::LatencyEstimator::from(crate::latency::obtain(model, &args)?.model))
            }
            None => None,
        };
        let plan =
            matformer::elastic::select(&catalog, &budget, &matformer::elastic::Policy::default(), latency.as_ref())?;
        eprintln!("submodel: {} ({})", plan.entry.name, plan.explanation);
        Ok(plan.entry.levels.clone())
    } else {
        Ok(Submodel::parse(spec, model.metadata(), model.view().available_levels)?)
    }
}

/// `matformer generate`.
#[allow(clippy::too_many_arguments)] // one parameter per command-line flag
pub fn generate(
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

/// `matformer devices`.
pub fn devices(json: bool) -> Result<()> {
    // Opens each adapter and times the decode GEMV on each weight path (a fraction of a second).
    let adapters = matformer::gpu::probe_adapters();
    if json {
        return print_json(&adapters);
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("CPU engine: {threads} threads, kernels compiled for {}", matformer::cpu::simd_features());
    if adapters.is_empty() {
        println!("no GPU adapter found: `--backend auto` will use the CPU engine");
        return Ok(());
    }
    for a in &adapters {
        println!("{} ({} {}, driver {})", a.name, a.backend, a.device_type, a.driver);
        println!(
            "  max storage binding {}, max buffer {}, workgroup storage {} B, invocations/workgroup {}, storage buffers/stage {}",
            human_bytes(a.max_storage_buffer_binding_size),
            human_bytes(a.max_buffer_size),
            a.max_compute_workgroup_storage_size,
            a.max_compute_invocations_per_workgroup,
            a.max_storage_buffers_per_shader_stage
        );
        println!(
            "  shader-f16 {}, shader-int64 {}, subgroups {}, weight paths available: {}",
            a.shader_f16,
            a.shader_int64,
            a.subgroups,
            a.weight_paths.join(", ")
        );
        for t in &a.gemv_timings {
            println!(
                "  decode GEMV {} x {} on the {} path: {:.3} ms ({:.2} GB/s)",
                t.rows, t.cols, t.path, t.gemv_ms, t.read_gb_per_s
            );
        }
        println!("  weight path: {} ({})", a.weight_path, a.weight_path_reason);
    }
    Ok(())
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
pub fn eval(
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
        let r = matformer::eval::mean_cross_entropy(&engine, &sub, &tok, &bytes, chunk)?;
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
