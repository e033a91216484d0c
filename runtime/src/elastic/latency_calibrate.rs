//! Measuring a [`DeviceCostModel`]: kernel-class timings on the backend in use plus a few real
//! decodes for the fixed part (see [`super::latency`]).
//!
//! - **CPU** ([`calibrate_cpu`]): every class timed with the engine's own kernels and thread
//!   count ([`crate::elastic::cpu_probe`]); the fixed part and the scale are fitted to decodes of
//!   every uniform submodel (least squares over as many points as levels).
//! - **GPU** ([`calibrate_gpu`], feature `gpu`): the GEMV classes (attention projections, FFN
//!   up/gate and down at every width, LM head) timed with the decode GEMV kernel at their real
//!   shapes ([`OpRunner::gemv_read_bandwidth`](crate::gpu::OpRunner::gemv_read_bandwidth): many
//!   dispatches in one submit, so no per-call upload or readback is timed). The down projection
//!   runs the transposed GEMV in a real pass; it is timed as the plain GEMV over the same
//!   `[d_model, width]` bytes. For the cost model, attention and the small ops come from real
//!   decodes (`matformer bench` times them one dispatch at a time with
//!   `OpRunner::time_decode_*` for its per-class table): the smallest
//!   uniform submodel at a short and at a long context gives the attention slope, and the
//!   fitted fixed part holds the small ops, the attention intercept and the per-pass
//!   overhead. The fixed part and the scale are fitted over every uniform submodel at the
//!   short context plus the long-context decode.

use std::time::Instant;

use super::cpu_probe::{self as probe, ProbeOptions};
use super::latency::{CostModelError, DeviceCostModel, FitRun, ShapeFingerprint};
use crate::cpu::CpuEngine;
use crate::{ModelFile, Submodel};

/// Options of the calibrations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyCalibrationOptions {
    /// Kernel timing options (CPU).
    pub probe: ProbeOptions,
    /// Decode steps timed per fit decode (after one untimed step). Default 4.
    pub fit_tokens: usize,
    /// Times each fit decode is repeated, alternating between the submodels so a burst of
    /// load from other processes does not land on one of them only. Default 2.
    pub fit_repeats: usize,
    /// Prompt tokens before the short-context fit decodes. Default 4.
    pub short_prompt: usize,
    /// Prompt tokens before the long-context fit decode (GPU attention slope). Default 128.
    pub long_prompt: usize,
}

impl Default for LatencyCalibrationOptions {
    fn default() -> Self {
        LatencyCalibrationOptions {
            probe: ProbeOptions::default(),
            fit_tokens: 4,
            fit_repeats: 2,
            short_prompt: 4,
            long_prompt: 128,
        }
    }
}

/// A prompt of `n` tokens (BOS first when the model has one), deterministic.
pub fn probe_prompt(model: &ModelFile, n: usize) -> Vec<u32> {
    let meta = model.metadata();
    let vocab = meta.architecture.vocab_size.max(1);
    let mut p: Vec<u32> = meta.tokenizer.bos_id.into_iter().collect();
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    while p.len() < n.max(1) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        p.push((s % u64::from(vocab.min(256))) as u32);
    }
    p.truncate(n.max(1));
    p
}

/// Times `tokens` decode steps after prefilling `prompt` and one untimed step, with any
/// backend's `prefill` and `decode` (both return the next token). The measured time is the
/// fastest step (the device's own speed, as little disturbed by other processes sharing it
/// as the steps allow; the kernel timings are taken the same way); the mean is kept too.
pub fn time_decode<E: std::fmt::Display>(
    entry: String,
    widths: Vec<u32>,
    prompt: &[u32],
    tokens: usize,
    mut prefill: impl FnMut(&[u32]) -> Result<u32, E>,
    mut decode: impl FnMut(u32) -> Result<u32, E>,
) -> Result<FitRun, CostModelError> {
    let fail = |e: E| CostModelError::Calibration { reason: format!("decoding {entry}: {e}") };
    let tokens = tokens.max(1);
    let mut next = prefill(prompt).map_err(fail)?;
    next = decode(next).map_err(fail)?;
    let mut steps = Vec::with_capacity(tokens);
    for _ in 0..tokens {
        let t = Instant::now();
        next = decode(next).map_err(fail)?;
        steps.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mean_ms = steps.iter().sum::<f64>() / tokens as f64;
    let measured_ms = steps.iter().copied().fold(f64::INFINITY, f64::min);
    // Step k (0-based) attends over prompt + 2 + k positions.
    let context = prompt.len() as f64 + 2.0 + (tokens as f64 - 1.0) / 2.0;
    Ok(FitRun { entry, widths, context, tokens, measured_ms, mean_ms })
}

/// Merges runs of the same submodel at the same context into one: the fastest step of all
/// of them, the mean of their means, their tokens summed; first-seen order. With the default
/// options a fit decode and a `--check` entry are then both the fastest of 8 steps, so the
/// fastest-step estimator carries the same small bias in both.
pub fn merge_runs(runs: Vec<FitRun>) -> Vec<FitRun> {
    let mut out: Vec<FitRun> = Vec::new();
    for r in runs {
        match out.iter_mut().find(|o| o.entry == r.entry && o.context == r.context && o.widths == r.widths) {
            Some(o) => {
                let total = (o.tokens + r.tokens).max(1) as f64;
                o.mean_ms = (o.mean_ms * o.tokens as f64 + r.mean_ms * r.tokens as f64) / total;
                o.measured_ms = o.measured_ms.min(r.measured_ms);
                o.tokens += r.tokens;
            }
            None => out.push(r),
        }
    }
    out
}

/// Every uniform submodel of the levels present in `model`, smallest first.
fn uniform_levels(model: &ModelFile) -> Vec<Submodel> {
    let n = model.metadata().architecture.n_layers as usize;
    let levels = u8::try_from(model.view().available_levels.max(1)).unwrap_or(u8::MAX);
    (0..levels).map(|l| Submodel::uniform(l, n)).collect()
}

fn widths_of(model: &ModelFile, sub: &Submodel) -> Vec<u32> {
    sub.widths(model.metadata())
}

/// One timed decode of `sub` on the CPU engine.
pub fn measure_cpu_decode(
    engine: &CpuEngine,
    sub: &Submodel,
    prompt_len: usize,
    tokens: usize,
) -> Result<FitRun, CostModelError> {
    let model = engine.model();
    let session = engine.session(sub).map_err(|e| CostModelError::Calibration { reason: e.to_string() })?;
    let prompt = probe_prompt(model, prompt_len);
    let name = sub.name(model.metadata());
    let widths = widths_of(model, sub);
    let s = std::cell::RefCell::new(session);
    time_decode(
        name,
        widths,
        &prompt,
        tokens,
        |p| s.borrow_mut().prefill(p).map(|l| crate::cpu::argmax(&l)),
        |t| s.borrow_mut().decode(t).map(|l| crate::cpu::argmax(&l)),
    )
}

/// Measures the CPU engine's cost model for its model (module documentation): a few seconds
/// on a 1B-parameter file.
pub fn calibrate_cpu(engine: &CpuEngine, opts: &LatencyCalibrationOptions) -> Result<DeviceCostModel, CostModelError> {
    let t = Instant::now();
    let model = engine.model();
    let kernels = probe::measure_kernels(engine, &opts.probe)
        .map_err(|e| CostModelError::Calibration { reason: e.to_string() })?;
    let mut runs = Vec::new();
    for _ in 0..opts.fit_repeats.max(1) {
        for sub in uniform_levels(model) {
            runs.push(measure_cpu_decode(engine, &sub, opts.short_prompt, opts.fit_tokens)?);
        }
    }
    let device = probe::cpu_device_id(engine.threads());
    DeviceCostModel::fit(device, ShapeFingerprint::of(model), kernels, merge_runs(runs), t.elapsed().as_secs_f64())
}

#[cfg(feature = "gpu")]
pub use gpu::*;

#[cfg(feature = "gpu")]
mod gpu {
    use std::time::Instant;

    use super::{probe_prompt, time_decode, widths_of, LatencyCalibrationOptions};
    use crate::elastic::latency::{
        CostModelError, DeviceCostModel, DeviceId, FitRun, KernelClass, KernelTimings, ShapeFingerprint, WidthCost,
    };
    use crate::gpu::{AdapterReport, GpuEngine, GpuSession, OpRunner};
    use crate::Submodel;

    /// Bytes of weights read per timed GEMV run at least (repeats are raised until then), so
    /// each timing spans well over the submit and wait overhead; also the size a weight is
    /// stacked up to, beyond the last-level caches of current GPUs and CPUs (lavapipe).
    const GEMV_TIMED_BYTES: usize = 64 << 20;

    /// A GPU adapter as a cost-model device: its name and driver.
    pub fn gpu_device_id(adapter: &AdapterReport) -> DeviceId {
        DeviceId {
            backend: "gpu".to_string(),
            name: adapter.name.clone(),
            detail: format!("{} {}", adapter.backend, adapter.driver).trim().to_string(),
        }
    }

    fn gpu_err(e: crate::gpu::GpuError) -> CostModelError {
        CostModelError::Calibration { reason: e.to_string() }
    }

    /// Milliseconds of one decode GEMV over a `[rows, cols]` weight of the shape's dtype. A
    /// weight smaller than [`GEMV_TIMED_BYTES`] is timed as up to `max_stack` copies stacked
    /// into one taller matrix (as the layers of a pass follow each other), so repeated
    /// dispatches stream it from memory instead of finding it in the cache.
    fn gemv_ms(
        runner: &OpRunner,
        rows: usize,
        cols: usize,
        elem_bytes: u64,
        max_stack: usize,
    ) -> Result<f64, CostModelError> {
        product_ms(runner, rows, cols, false, elem_bytes, max_stack)
    }

    /// [`gemv_ms`], or with `transposed` the engine's `ffn_down_t` product over a
    /// `[rows, cols]` weight (`out = x W`). The runner streams distinct weight copies, so the
    /// weights come from memory, as in a decode step.
    fn product_ms(
        runner: &OpRunner,
        rows: usize,
        cols: usize,
        transposed: bool,
        elem_bytes: u64,
        max_stack: usize,
    ) -> Result<f64, CostModelError> {
        let f16_bytes = rows * cols * 2;
        let stack = GEMV_TIMED_BYTES.div_ceil(f16_bytes.max(1)).clamp(1, max_stack.max(1));
        let repeats = GEMV_TIMED_BYTES.div_ceil(f16_bytes.max(1) * stack).clamp(2, 256);
        let gbs = runner.decode_product_read_bandwidth(rows * stack, cols, transposed, repeats).map_err(gpu_err)?;
        if !(gbs.is_finite() && gbs > 0.0) {
            return Err(CostModelError::Calibration {
                reason: format!("GEMV bandwidth {gbs} GB/s at [{rows}, {cols}]"),
            });
        }
        // The packed-f16 kernel is timed; an f32 file reads twice the bytes.
        Ok((rows * cols) as f64 * elem_bytes as f64 / (gbs * 1e9) * 1e3)
    }

    /// The GEMV classes of `shape` timed on `runner`'s adapter; attention and the small ops
    /// are left at 0 with a source saying they are not separately measured (module
    /// documentation).
    pub fn measure_gpu_gemv_classes(
        runner: &OpRunner,
        shape: &ShapeFingerprint,
    ) -> Result<KernelTimings, CostModelError> {
        let (d, q, kv) = (
            shape.d_model as usize,
            (shape.n_heads * shape.head_dim) as usize,
            (shape.n_kv_heads * shape.head_dim) as usize,
        );
        let eb = shape.weight_bytes();
        let l = shape.n_layers as usize;
        let proj = gemv_ms(runner, q, d, eb, l)? + 2.0 * gemv_ms(runner, kv, d, eb, l)? + gemv_ms(runner, d, q, eb, l)?;
        let mut ffn = Vec::new();
        for w in shape.distinct_widths() {
            let w_us = w as usize;
            let (n_up, stack) = if shape.gated_ffn { (2.0, 2 * l) } else { (1.0, l) };
            let up = gemv_ms(runner, w_us, d, eb, stack)? * n_up;
            let down = product_ms(runner, w_us, d, true, eb, l)?;
            ffn.push(WidthCost { width: w, up_ms: up, down_ms: down, act_ms: 0.0 });
        }
        let head = gemv_ms(runner, shape.vocab_size as usize, d, eb, 1)?;
        let how = format!("timed: decode GEMV kernel on {} (best of 3)", runner.adapter().name);
        Ok(KernelTimings {
            attention_projections_ms: proj,
            attention_ms_at_zero: 0.0,
            attention_ms_per_context_token: 0.0,
            ffn,
            lm_head_ms: head,
            small_ms_per_layer: 0.0,
            small_ms_per_token: 0.0,
            sources: vec![
                (KernelClass::AttentionProjections, how.clone()),
                (KernelClass::Attention, "not measured separately".to_string()),
                (KernelClass::FfnUp, how.clone()),
                (KernelClass::FfnDown, format!("{how}; the transposed product over ffn_down_t [width, d_model]")),
                (KernelClass::LmHead, how),
                (KernelClass::SmallOps, "not measured separately".to_string()),
            ],
        })
    }

    /// One timed decode of `sub` on the GPU engine.
    pub fn measure_gpu_decode(
        engine: &GpuEngine,
        sub: &Submodel,
        prompt_len: usize,
        tokens: usize,
    ) -> Result<FitRun, CostModelError> {
        let mut session = engine.session(sub).map_err(gpu_err)?;
        measure_on(engine, &mut session, prompt_len, tokens)
    }

    /// One timed decode on an existing session (reset first: creating a session uploads the
    /// submodel's FFN weights, which on a 1B model costs seconds).
    fn measure_on(
        engine: &GpuEngine,
        session: &mut GpuSession,
        prompt_len: usize,
        tokens: usize,
    ) -> Result<FitRun, CostModelError> {
        let model = engine.model();
        session.reset();
        let sub = session.submodel().clone();
        let prompt = probe_prompt(model, prompt_len);
        let s = std::cell::RefCell::new(session);
        time_decode(
            sub.name(model.metadata()),
            widths_of(model, &sub),
            &prompt,
            tokens,
            |p| s.borrow_mut().prefill(p),
            |t| s.borrow_mut().decode(t),
        )
    }

    /// Measures the GPU engine's cost model for its model (module documentation). Opens a
    /// second device on the engine's adapter for the kernel timings.
    pub fn calibrate_gpu(
        engine: &GpuEngine,
        opts: &LatencyCalibrationOptions,
    ) -> Result<DeviceCostModel, CostModelError> {
        let t = Instant::now();
        let model = engine.model();
        let shape = ShapeFingerprint::of(model);
        let mut kernels = {
            let runner = OpRunner::new(Some(&engine.adapter().name)).map_err(gpu_err)?;
            measure_gpu_gemv_classes(&runner, &shape)?
        };
        let uniform = super::uniform_levels(model);
        let max_ctx = model.metadata().architecture.max_context as usize;
        let short_prompt = opts.short_prompt.max(1);
        let long_prompt = opts.long_prompt.clamp(short_prompt, max_ctx.saturating_sub(opts.fit_tokens + 3).max(1));
        // Every session lives through the fit, so the decodes can alternate without uploading
        // the weights again.
        let mut sessions = Vec::new();
        for sub in &uniform {
            sessions.push(engine.session(sub).map_err(gpu_err)?);
        }
        let mut runs = Vec::new();
        let mut short_small = Vec::new();
        for _ in 0..opts.fit_repeats.max(1) {
            for (k, session) in sessions.iter_mut().enumerate() {
                let r = measure_on(engine, session, short_prompt, opts.fit_tokens)?;
                if k == 0 {
                    short_small.push(r.measured_ms);
                }
                runs.push(r);
            }
        }
        sessions.truncate(1);
        let short_ms = short_small.iter().copied().fold(f64::INFINITY, f64::min);
        let long_run = match (long_prompt > short_prompt, sessions.first_mut()) {
            (true, Some(small_s)) => Some(measure_on(engine, small_s, long_prompt, opts.fit_tokens)?),
            _ => None,
        };
        drop(sessions);
        for (class, source) in &mut kernels.sources {
            match class {
                KernelClass::Attention => {
                    *source = format!(
                        "fitted: slope of two real decodes at {short_prompt} and {long_prompt} prompt tokens; intercept in the fixed part"
                    )
                }
                KernelClass::SmallOps => *source = "fitted: part of the fixed part".to_string(),
                _ => {}
            }
        }
        // Fixed part and scale from the short-context decodes (attention there is part of the
        // fixed part), then the attention slope measured inside a pass, expressed in timed-
        // kernel units (divided by the scale) and taken out of the fixed part at the short
        // context, so the short-context predictions do not change.
        let short_runs = super::merge_runs(runs);
        let short_context = short_runs.first().map_or(0.0, |r| r.context);
        let elapsed = t.elapsed().as_secs_f64();
        let mut model = DeviceCostModel::fit(gpu_device_id(engine.adapter()), shape, kernels, short_runs, elapsed)?;
        if let Some(long) = long_run {
            let layers = f64::from(model.shape.n_layers.max(1));
            let in_pass = ((long.measured_ms - short_ms) / (long.context - short_context) / layers).max(0.0);
            if in_pass.is_finite() {
                model.kernels.attention_ms_per_context_token = in_pass / model.scale;
                model.fixed_ms_per_token -= in_pass * layers * short_context;
            }
            model.fit_runs.push(long);
        }
        model.calibration_seconds = t.elapsed().as_secs_f64();
        model.check().map_err(|reason| CostModelError::Invalid { reason })?;
        Ok(model)
    }
}
