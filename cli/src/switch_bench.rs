//! `matformer bench --switch`: what changing submodel costs on each backend.
//!
//! Per backend, between the smallest and the largest uniform submodel:
//! - between requests (empty history) and mid-generation (the history is re-prefilled so the
//!   output is exactly the new submodel's), with the time of the switch itself (`switch_ms`:
//!   a new CPU session; on the GPU the upload of missing FFN rows and the plan rebuild) apart
//!   from the re-prefill;
//! - on the GPU, the bytes each upshift uploads (only the rows the engine's store lacks) and
//!   the upload rate;
//! - a critical memory-pressure call: resident bytes of the file mapping and GPU FFN bytes
//!   before and after, then a cold upshift that uploads the released rows again.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use matformer::elastic::{CatalogEntry, ElasticSession, MemoryPressure, SwitchReport};
use matformer::{ModelFile, Submodel};
use matformer_export::progress::human_bytes;
use serde::Serialize;

use matformer::backend::Backend;
use matformer::BackendChoice;

/// One switching measurement.
#[derive(Clone, Debug, Serialize)]
pub struct SwitchRow {
    /// `cpu` or `gpu`.
    pub backend: String,
    /// What was measured.
    pub what: String,
    /// From submodel.
    pub from: String,
    /// To submodel.
    pub to: String,
    /// Tokens whose KV cache was recomputed for the new submodel.
    pub reprefilled_tokens: usize,
    /// The switch itself (no re-prefill), ms.
    pub switch_ms: f64,
    /// Whole call including the re-prefill, ms.
    pub total_ms: f64,
    /// FFN bytes uploaded to the GPU (0 on the CPU).
    pub uploaded_bytes: u64,
    /// `uploaded_bytes / switch time`, GB/s (GPU upshifts that uploaded something).
    pub upload_gb_per_s: Option<f64>,
    /// Weight bytes the target reads per token minus the source's.
    pub extra_weight_bytes: i64,
    /// Resident bytes of the file mapping after the step (Linux).
    pub mapping_resident_bytes: Option<u64>,
    /// GPU bytes the engine holds after the step (GPU).
    pub gpu_memory_bytes: Option<u64>,
}

/// The memory-pressure measurement of one backend.
#[derive(Clone, Debug, Serialize)]
pub struct PressureRow {
    /// `cpu` or `gpu`.
    pub backend: String,
    /// Submodel after the call.
    pub to: String,
    /// Wall time of the call (downshift with re-prefill, GPU trim, madvise), ms.
    pub ms: f64,
    /// Bytes of the mapping the OS was told it may drop.
    pub bytes_advised: u64,
    /// GPU FFN buffer bytes released.
    pub gpu_bytes_released: u64,
    /// Resident bytes of the mapping before the call.
    pub mapping_resident_before: Option<u64>,
    /// Resident bytes of the mapping after.
    pub mapping_resident_after: Option<u64>,
    /// GPU bytes held by the engine before the call.
    pub gpu_memory_before: Option<u64>,
    /// GPU bytes held by the engine after.
    pub gpu_memory_after: Option<u64>,
}

/// Resident bytes of `path`'s mapping in this process (`/proc/self/smaps`), if readable.
pub fn mapping_resident_bytes(path: &Path) -> Option<u64> {
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

fn gpu_memory(es: &ElasticSession) -> Option<u64> {
    es.gpu_engine().map(|g| g.memory_in_use())
}

/// `matformer bench --switch` on each backend in `backends` (CPU when empty).
pub fn run(
    file: &Path,
    backends: &[BackendChoice],
    prompt_len: usize,
    gen_len: usize,
    threads: Option<usize>,
    json: bool,
) -> Result<()> {
    let model = Arc::new(ModelFile::open(file)?);
    let meta = model.metadata().clone();
    let n_layers = meta.architecture.n_layers as usize;
    let top = (model.view().available_levels - 1) as u8;
    let (small, large) = (Submodel::uniform(0, n_layers), Submodel::uniform(top, n_layers));
    let small_bytes = CatalogEntry::for_submodel(&model, &small)?.decode_bytes_per_token;
    let large_bytes = CatalogEntry::for_submodel(&model, &large)?.decode_bytes_per_token;
    let extra_up = large_bytes as i64 - small_bytes as i64;
    let prompt_len = prompt_len.clamp(1, meta.architecture.max_context as usize / 2);
    let mut prompt: Vec<u32> = meta.tokenizer.bos_id.into_iter().collect();
    prompt.extend(b"The meaning of a word is its use in the language. ".iter().map(|&b| u32::from(b)));
    prompt.resize(prompt_len, u32::from(b' '));
    let backends = if backends.is_empty() { vec![BackendChoice::Cpu] } else { backends.to_vec() };

    let mut rows = Vec::new();
    let mut pressures = Vec::new();
    for choice in backends {
        let engine = crate::backend::load(&model, choice, threads, json)?;
        let backend = engine.name().to_string();
        // The GPU starts small so that the first upshift shows the cost of uploading.
        let mut es = match engine {
            Backend::Cpu(_) => ElasticSession::on(engine.clone(), &large)?,
            Backend::Gpu(_) => ElasticSession::on(engine.clone(), &small)?,
        };
        let mut step = |es: &mut ElasticSession, what: &str, to: &Submodel| -> Result<()> {
            let extra = if *to == large { extra_up } else { -extra_up };
            let r: SwitchReport = es.switch_to(to)?;
            if let Some(f) = &r.fallback {
                eprintln!("note: {what}: {f}");
            }
            rows.push(SwitchRow {
                backend: backend.clone(),
                what: what.into(),
                from: r.from,
                to: r.to,
                reprefilled_tokens: r.reprefilled_tokens,
                switch_ms: r.switch_ms,
                total_ms: r.elapsed_ms,
                uploaded_bytes: r.uploaded_bytes,
                upload_gb_per_s: (r.uploaded_bytes > 0 && r.switch_ms > 0.0)
                    .then(|| r.uploaded_bytes as f64 / (r.switch_ms * 1e-3) / 1e9),
                extra_weight_bytes: extra,
                mapping_resident_bytes: mapping_resident_bytes(file),
                gpu_memory_bytes: gpu_memory(es),
            });
            Ok(())
        };
        if es.submodel() == &small {
            step(&mut es, "upshift between requests (cold)", &large)?;
        }
        step(&mut es, "downshift between requests", &small)?;
        step(&mut es, "upshift between requests", &large)?;
        let generate = |es: &mut ElasticSession| -> Result<()> {
            es.reset();
            let mut next = es.prefill_greedy(&prompt)?;
            for _ in 0..gen_len.max(1) {
                next = es.decode_greedy(next)?;
            }
            Ok(())
        };
        generate(&mut es)?;
        step(&mut es, "downshift mid-generation", &small)?;
        step(&mut es, "upshift mid-generation", &large)?;

        let (map_before, gpu_before) = (mapping_resident_bytes(file), gpu_memory(&es));
        let t = Instant::now();
        let p = es.on_memory_pressure(MemoryPressure::Critical)?;
        pressures.push(PressureRow {
            backend: backend.clone(),
            to: p.switch.to.clone(),
            ms: t.elapsed().as_secs_f64() * 1e3,
            bytes_advised: p.bytes_advised,
            gpu_bytes_released: p.gpu_bytes_released,
            mapping_resident_before: map_before,
            mapping_resident_after: mapping_resident_bytes(file),
            gpu_memory_before: gpu_before,
            gpu_memory_after: gpu_memory(&es),
        });
        if es.gpu_engine().is_some() {
            step(&mut es, "upshift mid-generation after pressure (cold)", &large)?;
        }
    }

    if json {
        let report = serde_json::json!({
            "file": file.display().to_string(),
            "smallest": small.name(&meta),
            "largest": large.name(&meta),
            "smallest_weight_bytes": small_bytes,
            "largest_weight_bytes": large_bytes,
            "prompt_tokens": prompt.len(),
            "switches": rows,
            "memory_pressure": pressures,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: smallest {} ({}), largest {} ({}), history of {} prompt + {} generated tokens",
        file.display(),
        small.name(&meta),
        human_bytes(small_bytes),
        large.name(&meta),
        human_bytes(large_bytes),
        prompt.len(),
        gen_len.max(1)
    );
    let opt = |b: Option<u64>| b.map(human_bytes).unwrap_or_else(|| "-".into());
    for r in &rows {
        println!(
            "  {} {:<46} {:>4} -> {:<4} switch {:>9.3} ms  total {:>9.3} ms  re-prefilled {:>4}  uploaded {:>10}{}  mapping {}  gpu {}",
            r.backend,
            r.what,
            r.from,
            r.to,
            r.switch_ms,
            r.total_ms,
            r.reprefilled_tokens,
            human_bytes(r.uploaded_bytes),
            r.upload_gb_per_s.map(|g| format!(" ({g:.2} GB/s)")).unwrap_or_default(),
            opt(r.mapping_resident_bytes),
            opt(r.gpu_memory_bytes)
        );
    }
    for p in &pressures {
        println!(
            "  {} memory pressure (critical) -> {} in {:.1} ms: advised {}, mapping resident {} -> {}, GPU {} -> {} ({} released)",
            p.backend,
            p.to,
            p.ms,
            human_bytes(p.bytes_advised),
            opt(p.mapping_resident_before),
            opt(p.mapping_resident_after),
            opt(p.gpu_memory_before),
            opt(p.gpu_memory_after),
            human_bytes(p.gpu_bytes_released)
        );
    }
    Ok(())
}
