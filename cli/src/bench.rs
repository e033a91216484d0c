//! `matformer bench`: prefill and decode speed per submodel and backend, in the manner of
//! llama-bench, with efficiencies against calibration figures measured in the same run. Each
//! row times `--repetitions` runs (default 3; llama-bench's `-r`) of the prefill and the decode
//! after one warm-up and reports their mean and standard deviation.
//!
//! Efficiency of a decode step = max(bytes read / bandwidth, flops / throughput) / measured time:
//! the fraction of the machine's own limit the engine reaches. The CPU limits come from a
//! multi-threaded streaming-read loop and a multiply-add loop; the GPU limits from two
//! calibration shaders (`shaders/calibrate_read.wgsl`, `shaders/calibrate_fma.wgsl`). The
//! machine's bandwidth drifts (other work, a shared host: 27 to 54 GB/s within minutes on the
//! development VM), so the read calibration runs just before each row, between its runs and
//! just after it: each run's decode efficiency is against the faster of the passes around it,
//! and the row's is the median over its runs. The kernel classes, timed separately, are against
//! the fastest pass of the backend.
//!
//! The same efficiency is printed per kernel class of the decode step (attention projections,
//! attention, FFN up and down, LM head, small ops; see `matformer::elastic::latency`), with
//! the class times measured in the same run: on the CPU by replaying the engine's kernels at
//! the model's shapes (`matformer::elastic::cpu_probe`), on the GPU by timing the decode GEMV kernel at
//! each GEMV class's shape and the attention, norm, RoPE, activation and argmax kernels one
//! dispatch at a time (`OpRunner::time_decode_*`). The remainder is the measured step minus the
//! timed classes (dispatch, synchronisation, the embedding gather).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use matformer::elastic::kernel_probe::KernelTimings;
use matformer::elastic::{Catalog, CatalogEntry, KernelClass, ModelSummary, ShapeFingerprint};
use matformer::{ModelFile, Submodel};
use matformer_export::progress::human_bytes;
use serde::Serialize;

use matformer::backend::Backend;
use matformer::BackendChoice;

/// Calibration figures of one backend.
#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    /// Streaming-read bandwidth, GB/s (1e9 bytes per second): the largest of
    /// [`read_passes_gb_per_s`](Self::read_passes_gb_per_s), so that a calibration pass slowed
    /// by other work on the machine cannot inflate the kernel classes' efficiencies.
    pub read_gb_per_s: f64,
    /// Every read calibration of this backend, GB/s: one before the kernel classes are timed,
    /// then each row's (before it, between its runs, after it).
    pub read_passes_gb_per_s: Vec<f64>,
    /// Multiply-add throughput, GFLOP/s (a multiply and an add count as 2 flops); None when not
    /// measured on this backend.
    pub gflops: Option<f64>,
    /// How the figures were measured.
    pub method: String,
}

/// One kernel class of a decode step, for one backend and submodel.
#[derive(Clone, Debug, Serialize)]
pub struct ClassRow {
    /// The class.
    pub class: KernelClass,
    /// Time per decoded token from the in-run kernel timing, ms (None: not separately
    /// measured on this backend).
    pub ms_per_token: Option<f64>,
    /// Bytes read per token.
    pub bytes: f64,
    /// FLOPs per token.
    pub flops: f64,
    /// max(bytes / bandwidth, flops / throughput) / time.
    pub efficiency: Option<f64>,
    /// `memory` or `compute`: the larger bound.
    pub bound: String,
    /// How the time was measured.
    pub source: String,
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
    /// Timed runs (prefill of the prompt, then the decode), after one warm-up.
    pub repetitions: usize,
    /// Prefill tokens/s, mean over the runs.
    pub prefill_tokens_per_s: f64,
    /// Standard deviation of the runs' prefill tokens/s (0 with one run).
    pub prefill_tokens_per_s_sd: f64,
    /// Time to first token (prefill of the prompt, producing the first new token), ms, mean.
    pub time_to_first_token_ms: f64,
    /// Decoded tokens per run.
    pub decode_tokens: usize,
    /// Decode tokens/s, mean over the runs.
    pub decode_tokens_per_s: f64,
    /// Standard deviation of the runs' decode tokens/s (0 with one run).
    pub decode_tokens_per_s_sd: f64,
    /// Decode-step efficiency: the median of
    /// [`decode_efficiency_runs`](Self::decode_efficiency_runs).
    pub decode_efficiency: f64,
    /// Per run, max(bytes / bandwidth, flops / throughput) / its decode time per token, with
    /// the bandwidth the faster of the read calibrations just before and just after the run.
    pub decode_efficiency_runs: Vec<f64>,
    /// The fastest of [`read_passes_gb_per_s`](Self::read_passes_gb_per_s), GB/s (which bound,
    /// memory or compute, is reported against it).
    pub read_gb_per_s: f64,
    /// The read calibrations run just before this row, between its runs and just after it,
    /// GB/s (`repetitions + 1` passes).
    pub read_passes_gb_per_s: Vec<f64>,
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
    /// Per kernel class, at the mean decode context.
    pub classes: Vec<ClassRow>,
    /// Measured decode step minus the sum of the measured classes, ms per token (dispatch,
    /// allocation, synchronisation).
    pub remainder_ms_per_token: f64,
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

/// The GPU classes that are not matrix products, timed one dispatch at a time on the engine's
/// kernels: attention at 16 and 1,024 tokens of context (a straight line through both), the
/// per-layer norms and RoPE, the per-token final norm and argmax, and the FFN activation at
/// every width (the embedding gather is not timed).
fn time_gpu_small_classes(
    runner: &matformer::gpu::OpRunner,
    meta: &matformer::format::Metadata,
    t: &mut KernelTimings,
) -> Result<()> {
    const REPEATS: usize = 20;
    let a = &meta.architecture;
    let (h, kvh, hd) = (a.n_heads as usize, a.n_kv_heads as usize, a.head_dim as usize);
    let (c0, c1) = (16usize.min(a.max_context as usize), 1024usize.min(a.max_context as usize));
    let at0 = runner.time_decode_attention(h, kvh, hd, c0, REPEATS)?;
    let at1 = runner.time_decode_attention(h, kvh, hd, c1, REPEATS)?;
    let slope = if c1 > c0 { ((at1 - at0) / (c1 - c0) as f64).max(0.0) } else { 0.0 };
    t.attention_ms_per_context_token = slope;
    t.attention_ms_at_zero = (at0 - slope * c0 as f64).max(0.0);
    let layer_norm = a.norm == matformer::format::NormKind::LayerNorm;
    let (per_layer, per_token) =
        runner.time_decode_small_ops(a.d_model as usize, layer_norm, h, kvh, hd, a.vocab_size as usize, REPEATS)?;
    t.small_ms_per_layer = per_layer;
    t.small_ms_per_token = per_token;
    let gelu = a.activation == matformer::format::Activation::GeluTanh;
    for w in &mut t.ffn {
        w.act_ms = runner.time_decode_ffn_act(w.width as usize, a.gated_ffn, gelu, REPEATS)?;
    }
    let how = format!("timed: the engine's kernel, one dispatch at a time on {}", runner.adapter().name);
    for (class, source) in &mut t.sources {
        match class {
            KernelClass::Attention => *source = format!("{how}, at {c0} and {c1} tokens of context"),
            KernelClass::SmallOps => *source = format!("{how} (norms, RoPE, activation, argmax; not the embedding)"),
            _ => {}
        }
    }
    Ok(())
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
/// What one row times: a prompt of `prompt_len` tokens, then `gen_len` decoded tokens,
/// `repetitions` times.
#[derive(Clone, Copy, Debug)]
pub struct RunShape {
    pub prompt_len: usize,
    pub gen_len: usize,
    pub repetitions: usize,
}

/// Median (the mean of the two middle values for an even count; 0 for none).
fn median_of(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Mean and (sample) standard deviation.
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

pub fn bench(
    file: &Path,
    backends: &[BackendChoice],
    specs: Vec<String>,
    budget: &crate::select::BudgetArgs,
    run: RunShape,
    threads: Option<usize>,
    json: bool,
) -> Result<()> {
    let RunShape { prompt_len, gen_len, repetitions } = run;
    let repetitions = repetitions.max(1);
    let model = Arc::new(ModelFile::open(file)?);
    let meta = model.metadata().clone();
    let a = &meta.architecture;
    // Default: the smallest level and the largest (one row when the file has a single level).
    let specs = if specs.is_empty() {
        let mut d = vec!["0".to_string(), "largest".to_string()];
        d.truncate(if meta.n_levels() > 1 { 2 } else { 1 });
        d
    } else {
        specs
    };
    // A latency target is checked with the cost model of the first backend benchmarked.
    let cost_backend = match backends.first() {
        Some(BackendChoice::Gpu) => crate::latency::CostBackend::Gpu,
        _ => crate::latency::CostBackend::Cpu,
    };
    let subs: Vec<Submodel> = specs
        .iter()
        .map(|s| crate::select::resolve_submodel(&model, s, budget, cost_backend, threads))
        .collect::<Result<Vec<_>>>()?;
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

    let catalog = Catalog::from_view(model.view());
    let summary = catalog.model.clone();
    let shape = ShapeFingerprint::of(&model);
    let mut calibration = Vec::new();
    let mut rows = Vec::new();
    for &choice in backends {
        let engine = crate::backend::load(&model, choice, threads, json)?;
        let n_threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        eprintln!("calibrating {} ...", engine.name());
        let read_bandwidth = || -> Result<f64> {
            Ok(match &engine {
                Backend::Cpu(_) => matformer::elastic::cpu_probe::read_bandwidth(n_threads, 512 << 20),
                Backend::Gpu(g) => matformer::gpu::OpRunner::for_engine(g)?.read_bandwidth(128 << 20, 8)?,
            })
        };
        let read_before = read_bandwidth()?;
        let (gflops, method) = match &engine {
            Backend::Cpu(_) => (
                matformer::elastic::cpu_probe::multiply_add_gflops(n_threads, 20_000_000),
                format!(
                    "{n_threads}-thread streaming sum over 512 MiB; {n_threads}-thread f32 multiply-add loop; kernels compiled for {}",
                    matformer::cpu::simd_features()
                ),
            ),
            Backend::Gpu(g) => (
                matformer::gpu::OpRunner::for_engine(g)?.fma_throughput(2048, 4)?,
                "calibrate_read.wgsl / calibrate_read_u64.wgsl streaming reads of 128 MiB (vec4<u32> or 64-bit loads, the faster); calibrate_fma.wgsl 8 independent vec4 fma chains"
                    .into(),
            ),
        };
        let mut cal = Calibration {
            read_gb_per_s: read_before,
            read_passes_gb_per_s: vec![read_before],
            gflops: Some(gflops),
            method,
        };
        // The kernel classes are those of a Llama block; a Gemma 3n file's rows report the
        // whole step only (its AltUp, LAuReL and per-layer-input products are not classes).
        let timings: Option<KernelTimings> = if meta.extra.contains_key(matformer::format::GEMMA3N_KEY) {
            eprintln!("kernel classes: not timed for a Gemma 3n file (rows report the whole step)");
            None
        } else {
            eprintln!("timing kernel classes on {} ...", engine.name());
            Some(match &engine {
                Backend::Cpu(c) => {
                    let opts = matformer::elastic::kernel_probe::ProbeOptions::default();
                    matformer::elastic::kernel_probe::measure_kernels(c, &opts)?
                }
                Backend::Gpu(g) => {
                    let runner = matformer::gpu::OpRunner::for_engine(g)?;
                    let mut t = matformer::elastic::kernel_probe::measure_gpu_gemv_classes(&runner, &shape)?;
                    time_gpu_small_classes(&runner, &meta, &mut t)?;
                    t
                }
            })
        };
        // Rows whose kernel classes are filled in after the last read pass.
        let mut pending = Vec::with_capacity(subs.len());
        for sub in &subs {
            let name = catalog.name_of(sub, &meta);
            eprintln!("bench {} {name}: prefill {prompt_len}, decode {gen_len}, {repetitions} runs", engine.name());
            let mean_pos = (prompt_len + gen_len / 2) as u32;
            let (weight_bytes, flops_per_token) = submodel_cost(&model, &summary, sub, mean_pos)?;
            // Earlier rows and the kernel-class timings left other levels' pages resident: hand
            // them back so the peak below is this submodel's own.
            model.release_all()?;
            // The machine's bandwidth drifts (other work, a shared host): each row's decode
            // efficiency is against the fastest of read calibrations run just before it,
            // between its runs and just after it.
            let mut passes = vec![read_bandwidth()?];
            let rss_ok = reset_peak_rss();
            let mut peak_rss_bytes = None;
            let mut session = crate::backend::session(&engine, sub)?;
            // Warm-up: touches the weights once so both backends start from resident pages.
            session.prefill_greedy(&prompt[..prompt.len().min(4)])?;
            let (mut prefill_times, mut decode_times) = (Vec::new(), Vec::new());
            let mut counters = None;
            for rep in 0..repetitions {
                if rep > 0 {
                    passes.push(read_bandwidth()?);
                }
                session.reset();
                let t0 = Instant::now();
                let mut next = session.prefill_greedy(&prompt)?;
                prefill_times.push(t0.elapsed().as_secs_f64());
                crate::backend::reset_counters(&mut session);
                let t1 = Instant::now();
                for _ in 0..gen_len {
                    next = session.decode_greedy(next)?;
                }
                decode_times.push(t1.elapsed().as_secs_f64());
                counters = crate::backend::gpu_counters(&session);
                if rep == 0 && rss_ok {
                    // Before the next calibration pass allocates its buffer.
                    peak_rss_bytes = peak_rss();
                }
            }
            let prefill_s = mean_sd(&prefill_times).0;
            let decode_s = mean_sd(&decode_times).0;
            let prefill_rates: Vec<f64> = prefill_times.iter().map(|s| prompt.len() as f64 / s).collect();
            let decode_rates: Vec<f64> = decode_times.iter().map(|s| gen_len as f64 / s).collect();
            let (prefill_tps, prefill_sd) = mean_sd(&prefill_rates);
            let (decode_tps, decode_sd) = mean_sd(&decode_rates);
            drop(session);
            passes.push(read_bandwidth()?);
            let per_token_s = decode_s / gen_len as f64;
            let row_read = passes.iter().copied().fold(0.0, f64::max);
            let mem_s = weight_bytes as f64 / (row_read * 1e9);
            let compute_s = cal.gflops.map(|g| flops_per_token / (g * 1e9)).unwrap_or(0.0);
            // Run i lies between passes i and i + 1: its efficiency is against the faster of the
            // two, and the row's is the median over the runs (a single fast or slow pass, or
            // run, moves it little).
            let run_efficiency: Vec<f64> = decode_times
                .iter()
                .zip(passes.windows(2))
                .map(|(t, w)| {
                    let mem = weight_bytes as f64 / (w[0].max(w[1]) * 1e9);
                    mem.max(compute_s) / (t / gen_len as f64)
                })
                .collect();
            let decode_efficiency = median_of(&run_efficiency);
            cal.read_passes_gb_per_s.extend(&passes);
            pending.push((rows.len(), sub, mean_pos, per_token_s));
            rows.push(BenchRow {
                backend: engine.name().into(),
                submodel: name,
                weight_bytes,
                flops_per_token,
                prompt_tokens: prompt.len(),
                repetitions,
                prefill_tokens_per_s: prefill_tps,
                prefill_tokens_per_s_sd: prefill_sd,
                time_to_first_token_ms: prefill_s * 1e3,
                decode_tokens: gen_len,
                decode_tokens_per_s: decode_tps,
                decode_tokens_per_s_sd: decode_sd,
                decode_efficiency,
                decode_efficiency_runs: run_efficiency,
                read_gb_per_s: row_read,
                read_passes_gb_per_s: passes,
                decode_bound: if mem_s >= compute_s { "memory".into() } else { "compute".into() },
                prefill_compute_efficiency: cal
                    .gflops
                    .map(|g| flops_per_token * prompt.len() as f64 / (g * 1e9) / prefill_s),
                peak_rss_bytes,
                submits_per_step: counters.map(|c| c.0 as f64 / gen_len as f64),
                readbacks_per_step: counters.map(|c| c.1 as f64 / gen_len as f64),
                readback_bytes_per_step: counters.map(|c| c.2 as f64 / gen_len as f64),
                // Filled in below, against the fastest read pass of the backend.
                classes: Vec::new(),
                remainder_ms_per_token: 0.0,
            });
        }
        // The kernel classes (timed after the first pass) are against the fastest pass of all.
        cal.read_gb_per_s = cal.read_passes_gb_per_s.iter().copied().fold(0.0, f64::max);
        for (i, sub, mean_pos, per_token_s) in pending {
            let Some(timings) = &timings else { continue };
            let classes = class_rows(&shape, timings, &sub.widths(&meta), mean_pos, &cal)?;
            let measured_sum: f64 = classes.iter().filter_map(|c| c.ms_per_token).sum();
            rows[i].remainder_ms_per_token = per_token_s * 1e3 - measured_sum;
            rows[i].classes = classes;
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
        let passes: Vec<String> = c.read_passes_gb_per_s.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "calibration {b}: read {:.2} GB/s (passes {}), multiply-add {g} ({})",
            c.read_gb_per_s,
            passes.join(" / "),
            c.method
        );
    }
    println!(
        "{:<4} {:<12} {:>10} {:>19} {:>9} {:>19} {:>9} {:>9} {:>7} {:>10} {:>8}",
        "",
        "submodel",
        "weights",
        "prefill t/s",
        "TTFT ms",
        "decode t/s",
        "eff",
        "vs GB/s",
        "bound",
        "peak RSS",
        "sub/rb"
    );
    for r in &report.rows {
        println!(
            "{:<4} {:<12} {:>10} {:>19} {:>9.1} {:>19} {:>8.0}% {:>9.2} {:>7} {:>10} {:>8}",
            r.backend,
            r.submodel,
            human_bytes(r.weight_bytes),
            format!("{:.1} ± {:.1}", r.prefill_tokens_per_s, r.prefill_tokens_per_s_sd),
            r.time_to_first_token_ms,
            format!("{:.2} ± {:.2}", r.decode_tokens_per_s, r.decode_tokens_per_s_sd),
            r.decode_efficiency * 100.0,
            r.read_gb_per_s,
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
    println!("(decode eff: median over the runs, each against the faster read calibration around it; `vs GB/s`:");
    println!("the fastest calibration of the row)");
    println!("per kernel class (decode, at the mean context; efficiency against the fastest read calibration");
    println!("of the backend; small tensors that stay in cache can exceed 100% of the streaming bandwidth):");
    for r in &report.rows {
        println!(
            "  {} {}: step {:.3} ms/token, {:.0}% efficient; remainder {:.3} ms",
            r.backend,
            r.submodel,
            1e3 / r.decode_tokens_per_s,
            r.decode_efficiency * 100.0,
            r.remainder_ms_per_token
        );
        println!("    {:<22} {:>10} {:>10} {:>12} {:>6} {:>7}", "class", "ms/token", "bytes", "flops", "eff", "bound");
        for c in &r.classes {
            println!(
                "    {:<22} {:>10} {:>10} {:>12} {:>6} {:>7}",
                c.class.name(),
                c.ms_per_token.map_or_else(|| "-".to_string(), |m| format!("{m:.3} ms")),
                human_bytes(c.bytes as u64),
                fmt_flops(c.flops),
                c.efficiency.map_or_else(|| "-".to_string(), |e| format!("{:.0}%", e * 100.0)),
                c.bound
            );
        }
    }
    Ok(())
}

/// `1.23 GFLOP`, `4.56 MFLOP`, `789 FLOP`.
fn fmt_flops(f: f64) -> String {
    if f >= 1e9 {
        format!("{:.2} GFLOP", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2} MFLOP", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.2} kFLOP", f / 1e3)
    } else {
        format!("{f:.0} FLOP")
    }
}

/// Per-class rows of one submodel (`widths`) at `context` from the in-run kernel timings.
fn class_rows(
    shape: &ShapeFingerprint,
    timings: &KernelTimings,
    widths: &[u32],
    context: u32,
    cal: &Calibration,
) -> Result<Vec<ClassRow>> {
    let ms = timings.class_ms(widths, context)?;
    Ok(KernelClass::ALL
        .iter()
        .zip(ms)
        .map(|(&class, ms)| {
            let (bytes, flops) = shape.class_work(class, widths, f64::from(context));
            let unmeasured = timings.source(class).starts_with("not measured");
            let mem_s = bytes / (cal.read_gb_per_s * 1e9);
            let compute_s = cal.gflops.map_or(0.0, |g| flops / (g * 1e9));
            let ms_per_token = (!unmeasured).then_some(ms);
            ClassRow {
                class,
                ms_per_token,
                bytes,
                flops,
                efficiency: ms_per_token.filter(|&m| m > 0.0).map(|m| mem_s.max(compute_s) / (m * 1e-3)),
                bound: if mem_s >= compute_s { "memory".into() } else { "compute".into() },
                source: timings.source(class).to_string(),
            }
        })
        .collect())
}
