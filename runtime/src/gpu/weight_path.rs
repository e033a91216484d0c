//! The weight path of an adapter: forced, remembered for the process, or chosen by timing the
//! decode GEMV of every path the adapter runs; and the timing helpers the op runner shares.

use half::f16;

use super::device::{Gpu, PathTiming};
use super::ops::{gemv_rows, split_partial_floats, Kernels, MatmulParams, StepParams, WeightPath};
use super::weights::{pad8, upload_bytes, zeroed, GpuMatrix};
use super::{AdapterReport, GpuError};
use crate::format::DType;

/// Environment variable forcing the weight path: `packed`, `f16` or `packed64`.
pub const WEIGHT_PATH_ENV: &str = "MATFORMER_GPU_WEIGHT_PATH";

/// Shape of the GEMV timed for the weight-path choice: a 4 MiB f16 matrix (1024 x 2048, the
/// shape of a small model's projection), large enough to stream from memory rather than cache
/// on phones, small enough that both paths time in a few tens of ms on a software adapter.
const CHOICE_ROWS: usize = 1024;
const CHOICE_COLS: usize = 2048;
/// GEMV dispatches per timed submit (16 MiB of weight reads), so submit overhead is amortised.
const CHOICE_REPEATS: usize = 4;
/// The f16 path is taken only when it is at least this much faster (timing noise margin): on a
/// tie the packed path, whose arithmetic is all f32, is kept.
const CHOICE_MARGIN: f64 = 0.05;

/// The weight path forced by `forced`, else by [`WEIGHT_PATH_ENV`], else `None`. An invalid
/// environment value is an error (a typo must not silently measure).
pub(crate) fn forced_weight_path(forced: Option<WeightPath>) -> Result<Option<(WeightPath, String)>, GpuError> {
    if let Some(p) = forced {
        return Ok(Some((p, "forced by the caller".to_string())));
    }
    match std::env::var(WEIGHT_PATH_ENV) {
        Ok(v) if !v.trim().is_empty() => match WeightPath::parse(&v) {
            Some(p) => Ok(Some((p, format!("forced by {WEIGHT_PATH_ENV}={v}")))),
            None => Err(GpuError::Unsupported {
                reason: format!(
                    "{WEIGHT_PATH_ENV}={v:?} is not a weight path; use \"packed\", \"f16\" or \"packed64\""
                ),
            }),
        },
        _ => Ok(None),
    }
}

/// Chooses the weight path of `kernels` on `gpu` and records the choice (and the timings) in
/// `gpu.report`: `forced` (or [`WEIGHT_PATH_ENV`]) if set; else the choice measured earlier in
/// this process on the same adapter; the packed path when the device runs no other; otherwise
/// the decode GEMV of every path the device runs is timed on a 1024 x 2048 f16 matrix and the
/// fastest taken, a path other than packed only when more than 5% faster than packed (timing
/// noise margin: on a tie the packed path, which runs everywhere, stays).
pub(crate) fn choose_weight_path(
    gpu: &mut Gpu,
    kernels: &mut Kernels,
    forced: Option<WeightPath>,
) -> Result<WeightPath, GpuError> {
    let rows = gemv_rows(gpu, None)?;
    let available: Vec<WeightPath> = WeightPath::ALL.into_iter().filter(|p| gpu.runs(*p)).collect();
    let (path, reason, timings) = if let Some((p, reason)) = forced_weight_path(forced)? {
        if !gpu.runs(p) {
            return Err(GpuError::Unsupported {
                reason: format!(
                    "the {p} weight path ({reason}) needs {:?}, which {} lacks",
                    p.required_feature(),
                    gpu.report.name
                ),
            });
        }
        (p, reason, Vec::new())
    } else if let Some((p, reason, timings)) = cached_choice(&gpu.report) {
        (p, format!("{reason}; measured earlier in this process"), timings)
    } else if available.len() == 1 {
        (
            WeightPath::Packed,
            "the only path: the adapter has neither SHADER_F16 nor SHADER_INT64".to_string(),
            Vec::new(),
        )
    } else {
        let mut timings = Vec::new();
        for &p in &available {
            kernels.set_path(p);
            let best = time_gemv(gpu, kernels, rows, CHOICE_ROWS, CHOICE_COLS, false, 1, CHOICE_REPEATS)?;
            let ms = best * 1e3;
            let bytes = (CHOICE_ROWS * CHOICE_COLS * 2) as f64;
            timings.push(PathTiming {
                path: p.name().to_string(),
                rows: CHOICE_ROWS,
                cols: CHOICE_COLS,
                gemv_ms: ms,
                read_gb_per_s: bytes / (ms * 1e-3) / 1e9,
            });
        }
        let packed = timings[0].gemv_ms;
        let (best_i, best) = timings
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, t)| (i, t.gemv_ms))
            .fold((0, packed), |a, b| if b.1 < a.1 { b } else { a });
        let all: Vec<String> = timings.iter().map(|t| format!("{} {:.3} ms", t.path, t.gemv_ms)).collect();
        let choice = if best_i > 0 && best < packed * (1.0 - CHOICE_MARGIN) {
            (available[best_i], format!("measured fastest per GEMV: {}", all.join(", ")), timings)
        } else {
            (
                WeightPath::Packed,
                format!("measured fastest or within 5% per GEMV: {} (another path needs a >5% win)", all.join(", ")),
                timings,
            )
        };
        remember_choice(&gpu.report, &choice);
        choice
    };
    kernels.set_path(path);
    gpu.report.weight_path = path.name().to_string();
    gpu.report.weight_path_reason = reason;
    gpu.report.gemv_timings = timings;
    Ok(path)
}

/// A measured weight-path choice: the path, why, and the timings.
type Choice = (WeightPath, String, Vec<PathTiming>);

/// Measured choices of this process, by adapter (name, backend, driver): every engine on an
/// adapter takes the same path (and so the same numerics), and only the first pays for the
/// measurement.
fn choices() -> &'static std::sync::Mutex<std::collections::HashMap<String, Choice>> {
    static CHOICES: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Choice>>> =
        std::sync::OnceLock::new();
    CHOICES.get_or_init(Default::default)
}

fn adapter_key(report: &AdapterReport) -> String {
    format!("{}|{}|{}", report.name, report.backend, report.driver)
}

fn cached_choice(report: &AdapterReport) -> Option<Choice> {
    choices().lock().ok()?.get(&adapter_key(report)).cloned()
}

fn remember_choice(report: &AdapterReport, choice: &Choice) {
    if let Ok(mut map) = choices().lock() {
        map.entry(adapter_key(report)).or_insert_with(|| choice.clone());
    }
}

/// Weight bytes a timed decode product streams per round at least, cycling over distinct
/// copies of the weight: four times the 32 MiB last-level cache of current desktop CPUs (which
/// lavapipe runs on) and well beyond phone and GPU caches, so no copy is still cached when it
/// is read again and the timing is of memory, as in a real decode step.
const TIMED_SET_BYTES: usize = 128 << 20;

/// Seconds per product of the best of 3 timed runs (after a one-round warm-up) of `repeats`
/// rounds of the decode product of `kernels`' weight path over a `[rows, cols]` f16 matrix
/// (`transposed`: the `ffn_down_t` product, `out = x W` over `rows` inputs), with `gemv_rows`
/// rows per workgroup. Each round runs the product once on each of `copies` distinct weight
/// buffers in turn (`copies = 0`: as many as make the round stream [`TIMED_SET_BYTES`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn time_gemv(
    gpu: &Gpu,
    kernels: &Kernels,
    gemv_rows: u32,
    rows: usize,
    cols: usize,
    transposed: bool,
    copies: usize,
    repeats: usize,
) -> Result<f64, GpuError> {
    let copies = if copies == 0 { TIMED_SET_BYTES.div_ceil(rows * cols * 2).clamp(1, 64) } else { copies };
    // Small finite f16 values (a repeating ramp), so no path meets denormals or infinities.
    let bytes: Vec<u8> =
        (0..rows * cols).flat_map(|i| f16::from_f32(((i % 61) as f32 - 30.0) / 512.0).to_le_bytes()).collect();
    let mut mats = Vec::with_capacity(copies);
    for _ in 0..copies {
        mats.push(GpuMatrix::build(
            gpu,
            "timed weight",
            rows,
            cols,
            DType::F16,
            gpu.max_binding(),
            [(0u64, &bytes[..])],
        )?);
    }
    drop(bytes);
    let (k, n) = if transposed { (rows, cols) } else { (cols, rows) };
    let xs: Vec<f32> = (0..pad8(k)).map(|i| if i < k { ((i % 7) as f32 - 3.0) / 4.0 } else { 0.0 }).collect();
    use wgpu::BufferUsages as U;
    let xb = upload_bytes(gpu, "x", bytemuck::cast_slice(&xs), U::STORAGE)?;
    let out = zeroed(gpu, "out", n as u64 * 4, U::STORAGE, gpu.max_binding())?;
    let row_units = pad8(cols) / 8;
    let partials = zeroed(gpu, "partials", split_partial_floats(row_units) as u64 * 4, U::STORAGE, gpu.max_binding())?;
    let step = upload_bytes(gpu, "step", bytemuck::bytes_of(&StepParams { pos0: 0, t: 1, _pad: [0; 2] }), U::UNIFORM)?;
    let chunked = mats[0].chunks.len() > 1;
    let keys = kernels.matmul_keys(false, transposed && chunked, transposed, gemv_rows, row_units);
    let pipe = kernels.pipeline(gpu, &keys.gemv)?;
    let reduce = keys.reduce.as_ref().map(|key| kernels.pipeline(gpu, key)).transpose()?;
    let mut binds = Vec::new();
    for m in &mats {
        for c in &m.chunks {
            let (pn, pk, oo, ko) =
                if transposed { (cols, c.rows, 0, c.row_start) } else { (c.rows, cols, c.row_start, 0) };
            let grid = kernels.gemv_grid(false, transposed, pn as u32, pk as u32, row_units as u32, gemv_rows);
            let params = MatmulParams {
                n: pn as u32,
                k: pk as u32,
                row_units: row_units as u32,
                x_stride: pad8(k) as u32,
                out_stride: n as u32,
                out_offset: oo as u32,
                k_offset: ko as u32,
                slabs: if reduce.is_some() { grid.0 } else { 0 },
            };
            let ub = upload_bytes(gpu, "params", bytemuck::bytes_of(&params), U::UNIFORM)?;
            let bind = kernels.bind(gpu, keys.gemv.kernel, &[&ub, &step, &xb, &c.buffer, &out, &partials])?;
            let follow = reduce.as_ref().map(|r| (r.clone(), (row_units as u32).div_ceil(64), 1));
            binds.push((bind, grid, follow));
        }
    }
    let best = best_time(gpu, &pipe, &binds, repeats, "timing the decode GEMV")?;
    Ok(best / (repeats * copies) as f64)
}

/// A bind group, its workgroup grid, and an optional second pipeline dispatched right after
/// with the same bind group (the split transposed GEMV's reduction) on its grid.
pub(super) type TimedBind = (wgpu::BindGroup, (u32, u32), Option<(wgpu::ComputePipeline, u32, u32)>);

/// Seconds for `repeats` rounds of the dispatches `binds` of `pipe`, recorded in one
/// encoder, submitted once and waited for: the best of 3 runs after a one-round warm-up.
pub(super) fn best_time(
    gpu: &Gpu,
    pipe: &wgpu::ComputePipeline,
    binds: &[TimedBind],
    repeats: usize,
    during: &str,
) -> Result<f64, GpuError> {
    let run = |n: usize| -> Result<f64, GpuError> {
        let t = std::time::Instant::now();
        gpu.scoped(during, || {
            let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            {
                let mut pass =
                    enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
                for _ in 0..n {
                    for (bind, (x, y), follow) in binds {
                        pass.set_pipeline(pipe);
                        pass.set_bind_group(0, bind, &[]);
                        pass.dispatch_workgroups(*x, *y, 1);
                        if let Some((p2, x2, y2)) = follow {
                            pass.set_pipeline(p2);
                            pass.dispatch_workgroups(*x2, *y2, 1);
                        }
                    }
                }
            }
            gpu.queue.submit([enc.finish()]);
        })?;
        gpu.wait()?;
        Ok(t.elapsed().as_secs_f64())
    };
    run(1)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        best = best.min(run(repeats)?);
    }
    Ok(best)
}
