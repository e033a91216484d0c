//! Measuring a [`DeviceCostModel`]: the device's limits on the backend in use plus a few real
//! decodes for the fixed part and the scale (see [`super::latency`]).
//!
//! - **CPU** ([`calibrate_cpu`]): streaming-read bandwidth and multiply-add throughput at the
//!   engine's thread count ([`crate::elastic::cpu_probe::measure_limits`]); the fixed part and
//!   the scale are fitted to decodes of every uniform submodel (least squares over as many
//!   points as levels, each decode repeated).
//! - **GPU** ([`calibrate_gpu`], feature `gpu`): the adapter's streaming-read bandwidth and
//!   vec4 FMA throughput ([`OpRunner::read_bandwidth`](crate::gpu::OpRunner::read_bandwidth),
//!   [`OpRunner::fma_throughput`](crate::gpu::OpRunner::fma_throughput)); the fit decodes are
//!   every uniform submodel at a short prompt plus the smallest at a long one (so attention
//!   over the cache is in the fit).

use std::time::Instant;

use super::cpu_probe as probe;
use super::latency::{CostModelError, DeviceCostModel, FitRun, ShapeFingerprint};
use crate::cpu::CpuEngine;
use crate::{ModelFile, Submodel};

/// Options of the calibrations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyCalibrationOptions {
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
        LatencyCalibrationOptions { fit_tokens: 4, fit_repeats: 2, short_prompt: 4, long_prompt: 128 }
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
    let limits = probe::measure_limits(engine.threads());
    let mut runs = Vec::new();
    for _ in 0..opts.fit_repeats.max(1) {
        for sub in uniform_levels(model) {
            runs.push(measure_cpu_decode(engine, &sub, opts.short_prompt, opts.fit_tokens)?);
        }
    }
    let device = probe::cpu_device_id(engine.threads());
    DeviceCostModel::fit(device, ShapeFingerprint::of(model), limits, merge_runs(runs), t.elapsed().as_secs_f64())
}

#[cfg(feature = "gpu")]
pub use gpu::*;

#[cfg(feature = "gpu")]
mod gpu {
    use std::time::Instant;

    use super::{probe_prompt, time_decode, widths_of, LatencyCalibrationOptions};
    use crate::elastic::latency::{CostModelError, DeviceCostModel, DeviceId, DeviceLimits, FitRun, ShapeFingerprint};
    use crate::gpu::{AdapterReport, GpuEngine, GpuSession, OpRunner};
    use crate::Submodel;

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
        let limits = {
            let runner = OpRunner::for_engine(engine).map_err(gpu_err)?;
            let gbs = runner.read_bandwidth(64 << 20, 8).map_err(gpu_err)?;
            let gflops = runner.fma_throughput(2048, 4).map_err(gpu_err)?;
            DeviceLimits {
                read_bytes_per_second: gbs * 1e9,
                flops_per_second: gflops * 1e9,
                method: format!(
                    "calibrate_read.wgsl streaming reads of 64 MiB and calibrate_fma.wgsl vec4 FMA chains on {}",
                    runner.adapter().name
                ),
            }
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
        for _ in 0..opts.fit_repeats.max(1) {
            for session in sessions.iter_mut() {
                runs.push(measure_on(engine, session, short_prompt, opts.fit_tokens)?);
            }
            if long_prompt > short_prompt {
                if let Some(small) = sessions.first_mut() {
                    runs.push(measure_on(engine, small, long_prompt, opts.fit_tokens)?);
                }
            }
        }
        drop(sessions);
        let elapsed = t.elapsed().as_secs_f64();
        let mut model =
            DeviceCostModel::fit(gpu_device_id(engine.adapter()), shape, limits, super::merge_runs(runs), elapsed)?;
        model.calibration_seconds = t.elapsed().as_secs_f64();
        model.check().map_err(|reason| CostModelError::Invalid { reason })?;
        Ok(model)
    }
}
