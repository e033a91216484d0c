//! `matformer latency`: the per-device latency cost model of a file (loaded from the cache or
//! calibrated), and with `--check` its prediction error against real decodes.
//!
//! Also [`obtain`], used by `select --latency-ms`: the cached model of the chosen backend,
//! calibrated and cached when absent, mismatching or corrupt (the reason goes to stderr).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use matformer::cpu::CpuEngine;
use matformer::elastic::latency_calibrate::{self, LatencyCalibrationOptions};
use matformer::elastic::{
    default_cache_path, Catalog, CatalogEntry, DeviceCostModel, DeviceId, FitRun, KernelClass, LatencyModel,
    ShapeFingerprint,
};
use matformer::gpu::{GpuEngine, GpuOptions, OpRunner};
use matformer::ModelFile;
use serde::Serialize;

/// Backend a cost model is measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CostBackend {
    /// The CPU engine.
    Cpu,
    /// The GPU engine (wgpu's preferred adapter; lavapipe when it is the only one).
    Gpu,
}

/// Flags choosing and caching a cost model.
#[derive(Debug, Clone, clap::Args)]
pub struct CostArgs {
    /// Backend whose decode latency is modelled.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: CostBackend,
    /// CPU threads (default: all cores); part of the CPU cache key.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Cost-model cache file (default: $XDG_CACHE_HOME/matformer/cost-<backend>-<key>.json,
    /// else ~/.cache/matformer/).
    #[arg(long)]
    pub cost_cache: Option<PathBuf>,
    /// Recalibrate even when the cache holds a model for this device and model shape.
    #[arg(long)]
    pub refit: bool,
}

/// The engine a cost model was obtained for (kept for `--check`).
pub enum CostEngine {
    /// Not created (the model came from the cache and nothing needs decoding).
    None,
    /// CPU engine.
    Cpu(CpuEngine),
    /// GPU engine.
    Gpu(Box<GpuEngine>),
}

/// A cost model and where it came from.
pub struct Obtained {
    /// The model.
    pub model: DeviceCostModel,
    /// The cache file.
    pub cache_path: Option<PathBuf>,
    /// `"cache"` or `"calibrated"`.
    pub status: &'static str,
    /// Why the cache was not used (when calibrated).
    pub cache_miss: Option<String>,
    /// The engine, if one was created.
    pub engine: CostEngine,
}

fn threads_of(args: &CostArgs) -> usize {
    args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1)
}

fn cpu_engine(model: &Arc<ModelFile>, args: &CostArgs) -> Result<CpuEngine> {
    Ok(CpuEngine::new(model.clone())?.with_threads(threads_of(args)))
}

fn gpu_engine(model: &Arc<ModelFile>) -> Result<GpuEngine> {
    GpuEngine::new(model.clone(), GpuOptions::default()).map_err(|e| anyhow!("--backend gpu: no usable GPU: {e}"))
}

/// The device id of `args.backend` without loading any weights.
fn device_of(args: &CostArgs) -> Result<DeviceId> {
    Ok(match args.backend {
        CostBackend::Cpu => matformer::elastic::cpu_probe::cpu_device_id(threads_of(args)),
        CostBackend::Gpu => {
            let runner = OpRunner::new(None).map_err(|e| anyhow!("--backend gpu: no usable GPU: {e}"))?;
            latency_calibrate::gpu_device_id(runner.adapter())
        }
    })
}

/// The cost model of `args.backend` for `model`: from the cache when it holds one for this
/// device and shape (unless `--refit`), else calibrated now and written to the cache. Progress
/// and cache decisions go to stderr.
pub fn obtain(model: &Arc<ModelFile>, args: &CostArgs) -> Result<Obtained> {
    let shape = ShapeFingerprint::of(model);
    let device = device_of(args)?;
    let cache_path = args.cost_cache.clone().or_else(|| default_cache_path(&device, &shape));
    let cache_miss = match &cache_path {
        None => "no cache directory ($XDG_CACHE_HOME and $HOME unset)".to_string(),
        Some(_) if args.refit => "--refit".to_string(),
        Some(path) => match DeviceCostModel::load(path, &device, &shape) {
            Ok(m) => {
                eprintln!("latency model: {} (cached {})", device.describe(), path.display());
                return Ok(Obtained {
                    model: m,
                    cache_path,
                    status: "cache",
                    cache_miss: None,
                    engine: CostEngine::None,
                });
            }
            Err(miss) => {
                log::warn!("{miss}; calibrating");
                miss.to_string()
            }
        },
    };
    eprintln!("latency model: calibrating {} ({cache_miss})...", device.describe());
    let opts = LatencyCalibrationOptions::default();
    let (cost, engine) = match args.backend {
        CostBackend::Cpu => {
            let e = cpu_engine(model, args)?;
            (latency_calibrate::calibrate_cpu(&e, &opts)?, CostEngine::Cpu(e))
        }
        CostBackend::Gpu => {
            let e = gpu_engine(model)?;
            (latency_calibrate::calibrate_gpu(&e, &opts)?, CostEngine::Gpu(Box::new(e)))
        }
    };
    if cost.device != device {
        log::warn!("calibrated on {}, expected {}", cost.device.describe(), device.describe());
    }
    eprintln!("latency model: calibrated in {:.1} s", cost.calibration_seconds);
    if let Some(path) = &cache_path {
        match cost.save(path) {
            Ok(()) => eprintln!("latency model: cached in {}", path.display()),
            Err(e) => eprintln!("latency model: not cached: {e}"),
        }
    }
    Ok(Obtained { model: cost, cache_path, status: "calibrated", cache_miss: Some(cache_miss), engine })
}

/// One checked entry.
#[derive(Clone, Debug, Serialize)]
pub struct CheckRow {
    /// Entry name.
    pub entry: String,
    /// Weight bytes.
    pub weight_bytes: u64,
    /// The measured decode (mean ms per token at its mean context).
    pub run: FitRun,
    /// Predicted ms per token at the run's mean context.
    pub predicted_ms: f64,
    /// `(predicted - measured) / measured`, percent.
    pub error_pct: f64,
    /// The entry was one of the fit decodes' submodels (in-sample for the fixed part).
    pub used_in_fit: bool,
    /// The roofline estimate (`policy.rs`) at the measured limits, ms per token.
    pub roofline_ms: f64,
    /// The roofline with its fixed part and scale fitted to the cost model's fit decodes, ms
    /// per token.
    pub roofline_fitted_ms: f64,
}

/// The roofline estimate of `policy.rs` ([`LatencyModel`]) on the same device and decodes as
/// the cost model: once at the machine's measured limits (no fixed part), once with a fixed
/// part and a scale fitted to the same fit decodes as the cost model's (two parameters each).
#[derive(Clone, Debug, Serialize)]
pub struct RooflineCheck {
    /// The roofline at the measured streaming-read bandwidth and multiply-add throughput.
    pub measured_limits: LatencyModel,
    /// The roofline fitted to the fit decodes (`fixed + scale * roofline` written as a
    /// [`LatencyModel`]: the rates divided by the scale).
    pub fitted: LatencyModel,
    /// Mean |error| of the measured-limits roofline, percent.
    pub mean_abs_error_pct: f64,
    /// Max |error| of the measured-limits roofline, percent.
    pub max_abs_error_pct: f64,
    /// Mean |error| of the fitted roofline, percent.
    pub fitted_mean_abs_error_pct: f64,
    /// Max |error| of the fitted roofline, percent.
    pub fitted_max_abs_error_pct: f64,
}

/// The `--check` report.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// Which entries were checked and why.
    pub selection: String,
    /// Prompt tokens before each timed decode.
    pub prompt_tokens: usize,
    /// Timed decode steps per entry and pass.
    pub decode_tokens: usize,
    /// Passes over the entries (each entry's figure is its fastest step over all passes).
    pub repeats: usize,
    /// Rows, catalog order.
    pub rows: Vec<CheckRow>,
    /// Mean of |error_pct|.
    pub mean_abs_error_pct: f64,
    /// Max of |error_pct|.
    pub max_abs_error_pct: f64,
    /// Mean |predicted - measured|, ms.
    pub mean_abs_error_ms: f64,
    /// Max |predicted - measured|, ms.
    pub max_abs_error_ms: f64,
    /// `/proc/loadavg` (1, 5, 15 minutes) before and after the check: other processes on the
    /// same cores move every number.
    pub load_average: [Option<[f64; 3]>; 2],
    /// The roofline estimate on the same decodes.
    pub roofline: RooflineCheck,
}

/// The roofline at this device's measured limits: streaming-read bandwidth and multiply-add
/// throughput, measured as `matformer bench` measures them.
fn measured_roofline(obtained: &Obtained, threads: usize) -> Result<LatencyModel> {
    let (gb_per_s, gflops) = match &obtained.engine {
        CostEngine::Cpu(_) => {
            (crate::calibrate::cpu_read_bandwidth(threads), crate::calibrate::cpu_multiply_add_gflops(threads))
        }
        CostEngine::Gpu(g) => {
            let runner = OpRunner::new(Some(&g.adapter().name))?;
            (runner.read_bandwidth(128 << 20, 8)?, runner.fma_throughput(2048, 4)?)
        }
        CostEngine::None => return Err(anyhow!("internal: no engine to measure the roofline on")),
    };
    Ok(LatencyModel { bytes_per_second: gb_per_s * 1e9, flops_per_second: gflops * 1e9, fixed_ms_per_token: 0.0 })
}

/// `fixed + scale * raw` fitted to `(raw, measured)` by least squares (`fixed >= 0`; through the
/// origin when the free fit's intercept is negative or the points do not determine it),
/// returned as the [`LatencyModel`] it is: `raw`'s rates divided by the scale.
fn fit_roofline(raw: &LatencyModel, points: &[(f64, f64)]) -> LatencyModel {
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let sxx: f64 = points.iter().map(|(x, _)| x * x).sum();
    let sxy: f64 = points.iter().map(|(x, y)| x * y).sum();
    let det = n * sxx - sx * sx;
    let (mut fixed, mut scale) = (0.0, if sxx > 0.0 { sxy / sxx } else { 1.0 });
    if points.len() >= 2 && det.abs() > 1e-12 * sxx.max(1e-300) {
        let b = (n * sxy - sx * sy) / det;
        let a = (sy - b * sx) / n;
        if a >= 0.0 && b > 0.0 {
            (fixed, scale) = (a, b);
        }
    }
    let scale = if scale.is_finite() && scale > 0.0 { scale } else { 1.0 };
    LatencyModel {
        bytes_per_second: raw.bytes_per_second / scale,
        flops_per_second: raw.flops_per_second / scale,
        fixed_ms_per_token: fixed,
    }
}

/// The 1, 5 and 15-minute load averages (Linux).
fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// `k` entries evenly spaced over `entries` (first and last included).
fn even_sample(entries: &[CatalogEntry], k: usize) -> Vec<CatalogEntry> {
    let n = entries.len();
    if n <= k || k < 2 {
        return entries.iter().take(k.max(n.min(1))).cloned().collect();
    }
    let mut idx: Vec<usize> = (0..k).map(|i| (i * (n - 1) + (k - 1) / 2) / (k - 1)).collect();
    idx.dedup();
    idx.into_iter().map(|i| entries[i].clone()).collect()
}

/// The entries `--check` decodes, and a sentence saying which.
pub fn check_entries(catalog: &Catalog, max: usize) -> (Vec<CatalogEntry>, String) {
    let n = catalog.entries.len();
    let max = max.max(2);
    if n <= max {
        return (catalog.entries.clone(), format!("every catalog entry ({n})"));
    }
    let pareto = catalog.pareto_frontier();
    if pareto.len() >= 2 {
        let picked = even_sample(&pareto, max);
        let s = format!("the Pareto frontier ({} of its {} entries; catalog of {n})", picked.len(), pareto.len());
        return (picked, s);
    }
    let picked = even_sample(&catalog.entries, max);
    let s = format!(
        "{} entries evenly spaced by weight bytes over the catalog of {n} (no losses in the file, so no Pareto frontier)",
        picked.len()
    );
    (picked, s)
}

fn run_check(
    model: &Arc<ModelFile>,
    args: &CostArgs,
    obtained: &mut Obtained,
    check_max: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    repeats: usize,
) -> Result<CheckReport> {
    let catalog = Catalog::from_metadata_extra(model)?;
    let (entries, selection) = check_entries(&catalog, check_max);
    if matches!(obtained.engine, CostEngine::None) {
        obtained.engine = match args.backend {
            CostBackend::Cpu => CostEngine::Cpu(cpu_engine(model, args)?),
            CostBackend::Gpu => CostEngine::Gpu(Box::new(gpu_engine(model)?)),
        };
    }
    let fit_names: Vec<&str> = obtained.model.fit_runs.iter().map(|r| r.entry.as_str()).collect();
    let load_before = load_average();
    // Passes over every entry in turn: a burst of load from other processes then spreads over
    // several entries' samples instead of deciding one entry's number.
    let mut samples: Vec<Vec<FitRun>> = vec![Vec::new(); entries.len()];
    for pass in 0..repeats.max(1) {
        for (i, e) in entries.iter().enumerate() {
            eprintln!("check pass {}/{}, entry {}/{}: {}", pass + 1, repeats.max(1), i + 1, entries.len(), e.name);
            let run = match &obtained.engine {
                CostEngine::Cpu(c) => {
                    latency_calibrate::measure_cpu_decode(c, &e.levels, prompt_tokens, decode_tokens)?
                }
                CostEngine::Gpu(g) => {
                    latency_calibrate::measure_gpu_decode(g, &e.levels, prompt_tokens, decode_tokens)?
                }
                CostEngine::None => return Err(anyhow!("internal: no engine to run the check on")),
            };
            samples[i].push(run);
        }
    }
    eprintln!("check: measuring the roofline's limits (read bandwidth, multiply-add throughput)");
    let raw_roofline = measured_roofline(obtained, threads_of(args))?;
    let roofline_at = |m: &LatencyModel, e: &CatalogEntry, context: f64| {
        m.ms_per_token(e, &catalog.model, context.round().max(0.0) as u32)
    };
    let fit_points: Vec<(f64, f64)> = obtained
        .model
        .fit_runs
        .iter()
        .filter_map(|r| {
            let e = catalog.entries.iter().find(|e| e.name == r.entry)?;
            Some((roofline_at(&raw_roofline, e, r.context), r.measured_ms))
        })
        .collect();
    let fitted_roofline = fit_roofline(&raw_roofline, &fit_points);
    let mut rows = Vec::new();
    for (e, runs) in entries.iter().zip(samples) {
        let run = latency_calibrate::merge_runs(runs)
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("internal: no decode of {}", e.name))?;
        let predicted_ms = obtained.model.predict_run(&run)?;
        rows.push(CheckRow {
            entry: e.name.clone(),
            weight_bytes: e.weight_bytes,
            error_pct: (predicted_ms - run.measured_ms) / run.measured_ms * 100.0,
            predicted_ms,
            used_in_fit: fit_names.contains(&e.name.as_str()),
            roofline_ms: roofline_at(&raw_roofline, e, run.context),
            roofline_fitted_ms: roofline_at(&fitted_roofline, e, run.context),
            run,
        });
    }
    let n = rows.len().max(1) as f64;
    let abs_pct = rows.iter().map(|r| r.error_pct.abs());
    let abs_ms: Vec<f64> = rows.iter().map(|r| (r.predicted_ms - r.run.measured_ms).abs()).collect();
    let pct = |f: fn(&CheckRow) -> f64| -> Vec<f64> {
        rows.iter().map(|r| ((f(r) - r.run.measured_ms) / r.run.measured_ms * 100.0).abs()).collect()
    };
    let (raw_pct, fitted_pct) = (pct(|r| r.roofline_ms), pct(|r| r.roofline_fitted_ms));
    let roofline = RooflineCheck {
        measured_limits: raw_roofline,
        fitted: fitted_roofline,
        mean_abs_error_pct: raw_pct.iter().sum::<f64>() / n,
        max_abs_error_pct: raw_pct.iter().copied().fold(0.0, f64::max),
        fitted_mean_abs_error_pct: fitted_pct.iter().sum::<f64>() / n,
        fitted_max_abs_error_pct: fitted_pct.iter().copied().fold(0.0, f64::max),
    };
    Ok(CheckReport {
        roofline,
        selection,
        prompt_tokens,
        decode_tokens,
        repeats: repeats.max(1),
        load_average: [load_before, load_average()],
        mean_abs_error_pct: abs_pct.clone().sum::<f64>() / n,
        max_abs_error_pct: abs_pct.fold(0.0, f64::max),
        mean_abs_error_ms: abs_ms.iter().sum::<f64>() / n,
        max_abs_error_ms: abs_ms.iter().copied().fold(0.0, f64::max),
        rows,
    })
}

/// `matformer latency`.
#[allow(clippy::too_many_arguments)] // one parameter per command-line flag
pub fn run(
    file: &Path,
    args: &CostArgs,
    check: bool,
    check_max: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    repeats: usize,
    context: Option<u32>,
    json: bool,
) -> Result<()> {
    let model = Arc::new(ModelFile::open(file).with_context(|| format!("opening {}", file.display()))?);
    let mut obtained = obtain(&model, args)?;
    let catalog = Catalog::from_metadata_extra(&model)?;
    let ctx = context.unwrap_or(prompt_tokens as u32 + 2).min(catalog.model.max_context);
    let report = if check {
        Some(run_check(&model, args, &mut obtained, check_max, prompt_tokens.max(1), decode_tokens.max(1), repeats)?)
    } else {
        None
    };
    let cost = &obtained.model;
    let mut uniform: Vec<(String, f64)> = Vec::new();
    let n_layers = catalog.model.n_layers as usize;
    for l in 0..catalog.model.available_levels as u8 {
        let sub = matformer::Submodel::uniform(l, n_layers);
        let e = CatalogEntry::for_submodel(&model, &sub)?;
        uniform.push((e.name.clone(), cost.ms_per_token(&e, ctx)?));
    }
    if json {
        let v = serde_json::json!({
            "file": file.display().to_string(),
            "backend": args.backend,
            "cache": {
                "path": obtained.cache_path.as_ref().map(|p| p.display().to_string()),
                "status": obtained.status,
                "miss_reason": obtained.cache_miss,
            },
            "model": cost,
            "uniform_predictions": { "context": ctx, "ms_per_token": uniform },
            "check": report,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "latency model of {} on {}: {} ({}), calibrated in {:.1} s",
        file.display(),
        cost.device.describe(),
        obtained.status,
        obtained.cache_path.as_ref().map_or_else(|| "not cached".to_string(), |p| p.display().to_string()),
        cost.calibration_seconds
    );
    let k = &cost.kernels;
    println!(
        "  attention projections {:.4} ms/layer [{}]",
        k.attention_projections_ms,
        k.source(KernelClass::AttentionProjections)
    );
    println!(
        "  attention             {:.4} ms/layer + {:.3e} ms/layer/context token [{}]",
        k.attention_ms_at_zero,
        k.attention_ms_per_context_token,
        k.source(KernelClass::Attention)
    );
    for w in &k.ffn {
        println!(
            "  ffn width {:>6}      up {:.4}  down {:.4}  act {:.4} ms/layer",
            w.width, w.up_ms, w.down_ms, w.act_ms
        );
    }
    println!("  lm head               {:.4} ms/token [{}]", k.lm_head_ms, k.source(KernelClass::LmHead));
    println!(
        "  small ops             {:.4} ms/layer + {:.4} ms/token [{}]",
        k.small_ms_per_layer,
        k.small_ms_per_token,
        k.source(KernelClass::SmallOps)
    );
    println!(
        "  in a pass             {:.4} ms/token + {:.3} x the kernels (fitted to the decodes below)",
        cost.fixed_ms_per_token, cost.scale
    );
    for r in &cost.fit_runs {
        println!(
            "  fit decode {:<12} {:>9.3} ms/token measured at context {:.1} ({} tokens)",
            r.entry, r.measured_ms, r.context, r.tokens
        );
    }
    println!(
        "  predicted at context {ctx}: {}",
        uniform.iter().map(|(n, ms)| format!("{n} {ms:.3} ms")).collect::<Vec<_>>().join(", ")
    );
    if let Some(r) = report {
        println!(
            "check: {}; prompt {} tokens, {} passes of {} timed decode steps per entry (fastest step)",
            r.selection, r.prompt_tokens, r.repeats, r.decode_tokens
        );
        let width = r.rows.iter().map(|row| row.entry.len()).max().unwrap_or(5).max(5);
        println!(
            "  {:<width$} {:>10} {:>12} {:>12} {:>9} {:>12} {:>12}",
            "entry", "weights", "predicted ms", "measured ms", "error", "roofline ms", "fitted roof"
        );
        for row in &r.rows {
            println!(
                "  {:<width$} {:>10} {:>12.3} {:>12.3} {:>+8.1}% {:>12.3} {:>12.3}{}",
                row.entry,
                matformer_export::progress::human_bytes(row.weight_bytes),
                row.predicted_ms,
                row.run.measured_ms,
                row.error_pct,
                row.roofline_ms,
                row.roofline_fitted_ms,
                if row.used_in_fit { "  (fit)" } else { "" }
            );
        }
        println!(
            "  cost model: mean |error| {:.1}% ({:.3} ms), max |error| {:.1}% ({:.3} ms)",
            r.mean_abs_error_pct, r.mean_abs_error_ms, r.max_abs_error_pct, r.max_abs_error_ms
        );
        let rf = &r.roofline;
        println!(
            "  roofline at measured limits ({:.1} GB/s, {:.1} GFLOP/s): mean |error| {:.1}%, max |error| {:.1}%",
            rf.measured_limits.bytes_per_second / 1e9,
            rf.measured_limits.flops_per_second / 1e9,
            rf.mean_abs_error_pct,
            rf.max_abs_error_pct
        );
        println!(
            "  roofline fitted to the fit decodes ({:.4} ms + {:.3} x): mean |error| {:.1}%, max |error| {:.1}%",
            rf.fitted.fixed_ms_per_token,
            rf.measured_limits.bytes_per_second / rf.fitted.bytes_per_second,
            rf.fitted_mean_abs_error_pct,
            rf.fitted_max_abs_error_pct
        );
        let fmt =
            |l: Option<[f64; 3]>| l.map_or_else(|| "-".to_string(), |l| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]));
        println!("  load average before {}, after {}", fmt(r.load_average[0]), fmt(r.load_average[1]));
    }
    Ok(())
}
