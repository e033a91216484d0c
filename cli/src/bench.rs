//! `matformer bench`: prefill and decode speed per submodel and backend, in the manner of
//! llama-bench, with efficiencies against calibration figures measured in the same run.
//!
//! Efficiency of a decode step = max(bytes read / bandwidth, flops / throughput) / measured time:
//! the fraction of the machine's own limit the engine reaches. The CPU limits come from a
//! multi-threaded streaming-read loop and a multiply-add loop; the GPU limits from two
//! calibration shaders (`shaders/calibrate_read.wgsl`, `shaders/calibrate_fma.wgsl`).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use matformer::elastic::{Catalog, CatalogEntry, ModelSummary};
use matformer::{ModelFile, Submodel};
use matformer_export::progress::human_bytes;
use serde::Serialize;

use crate::backend::{BackendChoice, Engine};

/// Calibration figures of one backend.
#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    /// Streaming-read bandwidth, GB/s (1e9 bytes per second).
    pub read_gb_per_s: f64,
    /// Multiply-add throughput, GFLOP/s (a multiply and an add count as 2 flops); None when not
    /// measured on this backend.
    pub gflops: Option<f64>,
    /// How the figures were measured.
    pub method: String,
}

/// One benchmark row.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// `cpu` or `gpu`.
    pub backend: String,
    /// Submodel name.
    pub submodel: String,
    /// Weight bytes read per decoded token (shared tensors + the FFN prefixes of this submodel).
    pub weight_bytes: u64,
    /// Multiply-add flops per decoded token (matrix products, attention at the mean position).
    pub flops_per_token: f64,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prefill tokens/s.
    pub prefill_tokens_per_s: f64,
    /// Time to first token (prefill of the prompt, producing the first new token), ms.
    pub time_to_first_token_ms: f64,
    /// Decoded tokens.
    pub decode_tokens: usize,
    /// Decode tokens/s.
    pub decode_tokens_per_s: f64,
    /// max(bytes / bandwidth, flops / throughput) / measured decode time per token.
    pub decode_efficiency: f64,
    /// Which bound is the larger one: `memory` or `compute`.
    pub decode_bound: String,
    /// Prefill flops / throughput / measured prefill time (None without a throughput figure).
    pub prefill_compute_efficiency: Option<f64>,
    /// Peak resident memory of the process during this row (VmHWM after a reset), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// GPU queue submits per decode step.
    pub submits_per_step: Option<f64>,
    /// GPU readbacks per decode step.
    pub readbacks_per_step: Option<f64>,
    /// GPU bytes read back per decode step.
    pub readback_bytes_per_step: Option<f64>,
}

/// Whole report.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// File benchmarked.
    pub file: String,
    /// Calibration per backend.
    pub calibration: Vec<(String, Calibration)>,
    /// Rows.
    pub rows: Vec<BenchRow>,
    /// GPU decode tokens/s divided by CPU decode tokens/s per submodel (when both ran).
    pub gpu_over_cpu_decode: Vec<(String, f64)>,
}

/// Bytes read and flops per decoded token of `sub` with `context` tokens cached, from the same
/// cost model the elastic catalog uses (`CatalogEntry::for_submodel`).
fn submodel_cost(model: &ModelFile, summary: &ModelSummary, sub: &Submodel, context: u32) -> Result<(u64, f64)> {
    let entry = CatalogEntry::for_submodel(model, sub)?;
    Ok((entry.decode_bytes_per_token, entry.flops_per_token_at(summary, context) as f64))
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

/// `matformer bench`.
#[allow(clippy::too_many_arguments)] // one parameter per command-line flag
pub fn bench(
    file: &Path,
    backends: &[BackendChoice],
    specs: Vec<String>,
    budget: &crate::select::BudgetArgs,
    prompt_len: usize,
    gen_len: usize,
    threads: Option<usize>,
    json: bool,
) -> Result<()> {
    let model = Arc::new(ModelFile::open(file)?);
    let meta = model.metadata().clone();
    let a = &meta.architecture;
    let specs = if specs.is_empty() { vec!["s".to_string(), "largest".to_string()] } else { specs };
    let subs: Vec<Submodel> =
        specs.iter().map(|s| crate::commands::resolve_submodel(&model, s, budget)).collect::<Result<Vec<_>>>()?;
    let prompt_len = prompt_len.clamp(1, a.max_context as usize / 2);
    let gen_len = gen_len.clamp(1, a.max_context as usize - prompt_len);
    let mut prompt: Vec<u32> = meta.tokenizer.bos_id.into_iter().collect();
    let mut st = 0x2545_F491_4F6C_DD1Du64;
    while prompt.len() < prompt_len {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        prompt.push((st % 256) as u32);
    }

    let summary = Catalog::from_view(model.view()).model;
    let mut calibration = Vec::new();
    let mut rows = Vec::new();
    for &choice in backends {
        let engine = Engine::load(&model, choice, threads, json)?;
        let n_threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        eprintln!("calibrating {} ...", engine.name());
        let cal = match &engine {
            Engine::Cpu(_) => Calibration {
                read_gb_per_s: matformer::calibrate::cpu_read_bandwidth(n_threads),
                gflops: Some(matformer::calibrate::cpu_multiply_add_gflops(n_threads)),
                method: format!(
                    "{n_threads}-thread streaming sum over 512 MiB; {n_threads}-thread f32 multiply-add loop"
                ),
            },
            Engine::Gpu(g) => {
                let runner = matformer::gpu::OpRunner::new(Some(&g.adapter().name))?;
                Calibration {
                    read_gb_per_s: runner.read_bandwidth(128 << 20, 8)?,
                    gflops: Some(runner.fma_throughput(2048, 4)?),
                    method: "calibrate_read.wgsl streaming vec4<u32> reads of up to 128 MiB; calibrate_fma.wgsl 8 independent vec4 fma chains"
                        .into(),
                }
            }
        };
        for sub in &subs {
            let name = sub.name(&meta);
            eprintln!("bench {} {name}: prefill {prompt_len}, decode {gen_len}", engine.name());
            let mean_pos = (prompt_len + gen_len / 2) as u32;
            let (weight_bytes, flops_per_token) = submodel_cost(&model, &summary, sub, mean_pos)?;
            let rss_ok = reset_peak_rss();
            let mut session = engine.session(sub)?;
            // Warm-up: touches the weights once so both backends start from resident pages.
            session.prefill(&prompt[..prompt.len().min(4)])?;
            session.reset();
            let t0 = Instant::now();
            let mut next = session.prefill(&prompt)?;
            let prefill_s = t0.elapsed().as_secs_f64();
            session.reset_counters();
            let t1 = Instant::now();
            for _ in 0..gen_len {
                next = session.decode(next)?;
            }
            let decode_s = t1.elapsed().as_secs_f64();
            let counters = session.gpu_counters();
            let per_token_s = decode_s / gen_len as f64;
            let mem_s = weight_bytes as f64 / (cal.read_gb_per_s * 1e9);
            let compute_s = cal.gflops.map(|g| flops_per_token / (g * 1e9)).unwrap_or(0.0);
            let bound = mem_s.max(compute_s);
            rows.push(BenchRow {
                backend: engine.name().into(),
                submodel: name,
                weight_bytes,
                flops_per_token,
                prompt_tokens: prompt.len(),
                prefill_tokens_per_s: prompt.len() as f64 / prefill_s,
                time_to_first_token_ms: prefill_s * 1e3,
                decode_tokens: gen_len,
                decode_tokens_per_s: gen_len as f64 / decode_s,
                decode_efficiency: bound / per_token_s,
                decode_bound: if mem_s >= compute_s { "memory".into() } else { "compute".into() },
                prefill_compute_efficiency: cal
                    .gflops
                    .map(|g| flops_per_token * prompt.len() as f64 / (g * 1e9) / prefill_s),
                peak_rss_bytes: if rss_ok { peak_rss() } else { None },
                submits_per_step: counters.map(|c| c.0 as f64 / gen_len as f64),
                readbacks_per_step: counters.map(|c| c.1 as f64 / gen_len as f64),
                readback_bytes_per_step: counters.map(|c| c.2 as f64 / gen_len as f64),
            });
        }
        calibration.push((engine.name().to_string(), cal));
    }
    let gpu_over_cpu_decode = rows
        .iter()
        .filter(|r| r.backend == "gpu")
        .filter_map(|g| {
            rows.iter()
                .find(|c| c.backend == "cpu" && c.submodel == g.submodel)
                .map(|c| (g.submodel.clone(), g.decode_tokens_per_s / c.decode_tokens_per_s))
        })
        .collect();
    let report = BenchReport { file: file.display().to_string(), calibration, rows, gpu_over_cpu_decode };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for (b, c) in &report.calibration {
        let g = c.gflops.map(|g| format!("{g:.1} GFLOP/s")).unwrap_or_else(|| "not measured".into());
        println!("calibration {b}: read {:.2} GB/s, multiply-add {g} ({})", c.read_gb_per_s, c.method);
    }
    println!(
        "{:<4} {:<12} {:>10} {:>11} {:>9} {:>10} {:>9} {:>7} {:>10} {:>8}",
        "", "submodel", "weights", "prefill t/s", "TTFT ms", "decode t/s", "eff", "bound", "peak RSS", "sub/rb"
    );
    for r in &report.rows {
        println!(
            "{:<4} {:<12} {:>10} {:>11.1} {:>9.1} {:>10.2} {:>8.0}% {:>7} {:>10} {:>8}",
            r.backend,
            r.submodel,
            human_bytes(r.weight_bytes),
            r.prefill_tokens_per_s,
            r.time_to_first_token_ms,
            r.decode_tokens_per_s,
            r.decode_efficiency * 100.0,
            r.decode_bound,
            r.peak_rss_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
            match (r.submits_per_step, r.readbacks_per_step) {
                (Some(s), Some(b)) => format!("{s:.0}/{b:.0}"),
                _ => "-".into(),
            }
        );
    }
    for (s, ratio) in &report.gpu_over_cpu_decode {
        println!("gpu/cpu decode {s}: {ratio:.2}x");
    }
    Ok(())
}

/// Resident bytes of `path`'s mapping in this process (`/proc/self/smaps`), if readable.
fn mapping_resident_bytes(path: &Path) -> Option<u64> {
    let canonical = std::fs::canonicalize(path).ok()?;
    let target = canonical.to_str()?;
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut total = 0u64;
    let mut in_mapping = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) && !first.ends_with(':') {
            in_mapping = line.trim_end().ends_with(target);
        } else if in_mapping && first == "Rss:" {
            total += line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
        }
    }
    Some(total)
}

/// One switching measurement.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchRow {
    /// What was measured.
    pub what: String,
    /// From submodel.
    pub from: String,
    /// To submodel.
    pub to: String,
    /// Tokens whose KV cache was recomputed for the new submodel.
    pub reprefilled_tokens: usize,
    /// Wall time, ms.
    pub ms: f64,
    /// Weight bytes the target needs beyond the source's (what an upshift must bring in).
    pub extra_weight_bytes: i64,
    /// Resident bytes of the file mapping after the step.
    pub mapping_resident_bytes: Option<u64>,
}

/// `matformer bench --switch` (CPU engine): downshift and upshift between the smallest and the
/// largest submodel, mid-generation (re-prefill of the history, exact output) and between
/// requests (empty history), then a critical memory-pressure call.
pub fn switch_bench(file: &Path, prompt_len: usize, gen_len: usize, threads: Option<usize>, json: bool) -> Result<()> {
    use matformer::elastic::{ElasticSession, MemoryPressure};
    let model = Arc::new(ModelFile::open(file)?);
    let meta = model.metadata().clone();
    let n_layers = meta.architecture.n_layers as usize;
    let top = (model.view().available_levels - 1) as u8;
    let (small, large) = (Submodel::uniform(0, n_layers), Submodel::uniform(top, n_layers));
    let small_bytes = CatalogEntry::for_submodel(&model, &small)?.decode_bytes_per_token;
    let large_bytes = CatalogEntry::for_submodel(&model, &large)?.decode_bytes_per_token;
    let mut engine = matformer::cpu::CpuEngine::new(model.clone())?;
    if let Some(n) = threads {
        engine = engine.with_threads(n);
    }
    let mut es = ElasticSession::new(engine, &large)?;
    let prompt_len = prompt_len.clamp(1, meta.architecture.max_context as usize / 2);
    let mut prompt: Vec<u32> = meta.tokenizer.bos_id.into_iter().collect();
    prompt.extend(b"The meaning of a word is its use in the language. ".iter().map(|&b| u32::from(b)));
    prompt.resize(prompt_len, u32::from(b' '));
    let mut rows = Vec::new();
    let mut step = |es: &mut ElasticSession, what: &str, to: &Submodel, extra: i64| -> Result<()> {
        let r = es.switch_to(to)?;
        rows.push(SwitchRow {
            what: what.into(),
            from: r.from,
            to: r.to,
            reprefilled_tokens: r.reprefilled_tokens,
            ms: r.elapsed_ms,
            extra_weight_bytes: extra,
            mapping_resident_bytes: mapping_resident_bytes(file),
        });
        Ok(())
    };
    let extra_up = large_bytes as i64 - small_bytes as i64;
    // Between requests: nothing to re-prefill.
    step(&mut es, "downshift between requests", &small, -extra_up)?;
    step(&mut es, "upshift between requests", &large, extra_up)?;
    // Mid-generation.
    let mut next = matformer::cpu::argmax(&es.prefill(&prompt)?);
    for _ in 0..gen_len.max(1) {
        next = matformer::cpu::argmax(&es.decode(next)?);
    }
    let before = mapping_resident_bytes(file);
    step(&mut es, "downshift mid-generation", &small, -extra_up)?;
    step(&mut es, "upshift mid-generation", &large, extra_up)?;
    let t = Instant::now();
    let p = es.on_memory_pressure(MemoryPressure::Critical)?;
    let pressure_ms = t.elapsed().as_secs_f64() * 1e3;
    let after = mapping_resident_bytes(file);
    let report = serde_json::json!({
        "file": file.display().to_string(),
        "smallest": small.name(&meta),
        "largest": large.name(&meta),
        "smallest_weight_bytes": small_bytes,
        "largest_weight_bytes": large_bytes,
        "switches": rows,
        "memory_pressure": {
            "to": p.switch.to,
            "ms": pressure_ms,
            "bytes_advised": p.bytes_advised,
            "mapping_resident_before": before,
            "mapping_resident_after": after,
        },
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: smallest {} ({}), largest {} ({})",
        file.display(),
        small.name(&meta),
        human_bytes(small_bytes),
        large.name(&meta),
        human_bytes(large_bytes)
    );
    for r in &rows {
        println!(
            "  {:<28} {:>4} -> {:<4} {:>9.3} ms  re-prefilled {:>4} tokens  weights {:+}  mapping resident {}",
            r.what,
            r.from,
            r.to,
            r.ms,
            r.reprefilled_tokens,
            r.extra_weight_bytes,
            r.mapping_resident_bytes.map(human_bytes).unwrap_or_else(|| "-".into())
        );
    }
    println!(
        "  memory pressure (critical) -> {} in {pressure_ms:.1} ms: advised {}, mapping resident {} -> {}",
        p.switch.to,
        human_bytes(p.bytes_advised),
        before.map(human_bytes).unwrap_or_else(|| "-".into()),
        after.map(human_bytes).unwrap_or_else(|| "-".into())
    );
    Ok(())
}
