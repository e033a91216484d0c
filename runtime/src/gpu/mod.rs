//! The wgpu compute backend (feature `gpu`, on by default): Vulkan (Android, Linux) and Metal
//! (iOS, macOS), checked against the CPU reference engine ([`crate::cpu`]), whose math it
//! mirrors op by op.
//!
//! - [`list_adapters`] reports what wgpu can see; [`probe_adapters`] also opens each adapter
//!   and makes the weight-path choice (the CLI's `devices` command).
//! - [`GpuEngine`] owns the device, the pipelines (created once, on first use) and the shared
//!   weights; `Send + Sync`.
//! - [`GpuSession`] uploads one submodel's FFN weight prefixes (only the segments of the levels
//!   it uses), owns a GPU-resident KV cache and records a whole decode step in one command
//!   encoder with one submit and one 4-byte readback (the argmax), or for sampling one
//!   `8k + 4`-byte readback: `topk.wgsl` applies the sampler's penalties to the logits on the
//!   device and returns the top `k` with the log-sum-exp of the whole vocabulary
//!   ([`GpuSession::decode_sample`], [`crate::sampling`]).
//!
//! A Gemma 3n file (`gemma3n.rs`) runs the CPU decoder's steps as WGSL kernels of their own
//! (AltUp, LAuReL and the fused norms, per-head norms with RoPE, the per-layer input gate,
//! Gaussian top-k, soft-cap) around the shared matrix products and attention; its per-layer
//! embedding table stays in the file mapping (each pass writes its tokens' rows), skipped
//! layers are neither run nor uploaded, and only K/V-owning layers have a cache.
//!
//! Weights stay f16 on the GPU (the file's bytes, rows zero-padded to 8 elements; f32 files
//! are uploaded as f32 and always run the packed kernels' f32 variant). Three [`WeightPath`]s
//! multiply them:
//! - packed: two f16 per `u32`, `unpack2x16float`, all arithmetic f32; runs on every adapter;
//! - f16: `enable f16;` kernels (`*_f16.wgsl`) on devices opened with `SHADER_F16` (which in
//!   wgpu includes 16-bit storage): f16 storage, activations rounded to f16, f16 products, f32
//!   accumulation ([`F16_KERNEL_TOLERANCE`], [`forward_tolerance`]);
//! - packed64: the packed path with a decode GEMV whose loads are 64 bits wide
//!   (`matmul_gemv_u64.wgsl`, needs `SHADER_INT64`), bit-identical results.
//!
//! At engine start, when more than one path runs, the decode GEMV of each is timed on a
//! 1024 x 2048 matrix (tens of ms with pipeline compilation) and the fastest taken (another
//! path than packed only when more than 5% faster); [`AdapterReport`] records the timings and
//! the reason. [`GpuOptions::weight_path`] forces a path (the library reads no environment
//! variables; the CLI maps `MATFORMER_GPU_WEIGHT_PATH` to it). On lavapipe, where every storage load is a per-lane scalar loop whose cost
//! is per component, packed64 wins (~1.2x packed) and f16 loses (~3x slower: 16-bit loads).
//!
//! Tensors larger than the device's storage-binding limit are split into row chunks. Shaders
//! live in `shaders/` (one WGSL file per op, plus `<op>_f16.wgsl` variants) and are specialised
//! with `override` constants (weight format, residual accumulation, gating, activation, GEMV
//! row groups per workgroup and rows per thread, GEMM entry point). On CPU adapters such as
//! lavapipe the GEMV runs one thread per 4 rows (each activation load serves 4 rows; on the
//! packed64 path two 8-element units per 32-byte load, `gemv_pairs`, and with 8-invocation
//! subgroups each activation loaded once per subgroup and broadcast, `matmul_gemv_u64_sg.wgsl`;
//! [`GpuOptions::subgroup_gemv`] turns that off), the transposed FFN-down
//! GEMV splits the weight rows into up to 32 slabs whose partial sums a second dispatch adds
//! (`gemv_t_split` + `gemv_t_reduce`: each thread streams 64 contiguous bytes of every row of
//! its slab; the one-pass kernel it replaced strided 4 KiB rows and took half of an xl decode
//! step), and the prefill product the shared-memory-free `gemm_rows` (a 4 x 4 block of outputs
//! per thread); on GPUs 4 rows of 16 threads, the K-split `gemv_t` and the tiled `gemm`. [`GpuOptions::gemv_rows`]
//! and [`GpuOptions::gemv_rows_per_thread`] override the GEMV shape for tuning. The residual add is fused into the
//! `wo` and FFN-down products (`ACCUMULATE`), so there is no separate residual kernel.
//!
//! ```no_run
//! use std::sync::Arc;
//! use matformer::{gpu, ModelFile, Submodel};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = Arc::new(ModelFile::open("model.matf")?);
//! let engine = gpu::GpuEngine::new(model.clone(), gpu::GpuOptions::default())?;
//! let sub = Submodel::parse("s", model.metadata(), model.view().available_levels)?;
//! let mut session = engine.session(&sub)?;
//! let mut token = session.prefill(&[1, 72, 105])?;
//! for _ in 0..16 {
//!     token = session.decode(token)?;
//! }
//! # Ok(()) }
//! ```

mod device;
mod engine;
mod ffn_store;
mod gemma3n;
mod op_runner;
mod ops;
mod plan;
mod session;
mod weight_path;
mod weights;

pub use device::{list_adapters, probe_adapters, AdapterReport, PathTiming};
pub use engine::{step_down_on_oom, GpuEngine, GpuOptions, StepCounters};
pub use op_runner::{OpRunner, WeightFormat};
pub use ops::{shader_sources, ShaderSource, WeightPath};
pub use session::{GpuSession, GpuSwitch, SpeculativeRound};

use crate::cpu::Tolerance;
use crate::{ModelError, SubmodelError};

/// One matrix product on the native-f16 path ([`WeightPath::F16`]) against its f64 reference
/// on the same f16 weights. Each term `w * x` carries two f16 roundings (x rounded to f16, the
/// product rounded to f16; unit roundoff u = 2^-11 ~ 4.9e-4), the sums are f32. For the
/// normalised operands of the tests (|w| <= 1/sqrt(k), |x| <= 1) the rounding errors are
/// independent and zero-mean, so they add to about 2u * sqrt(sum (w x)^2) <= 2u; the tier
/// allows 4u absolute plus 4u relative (the f32 [`Tolerance::KERNEL`] tier scaled from f32's
/// 2^-24 to f16's 2^-11 roundoff would be ~4e-2 x looser; this stays within 2 roundings).
pub const F16_KERNEL_TOLERANCE: Tolerance = Tolerance { name: "kernel_f16", abs: 2e-3, rel: 2e-3 };

/// Tolerance of a whole forward pass on `path` against the f32 CPU engine (the start-up
/// self-check and the parity tests): [`Tolerance::FORWARD_F32`] on the packed and packed64
/// paths (all f32 arithmetic), [`Tolerance::REDUCED_PRECISION`] on the f16 path (f16 products: two f16
/// roundings per term in every matrix product of every layer).
pub fn forward_tolerance(path: WeightPath) -> Tolerance {
    match path {
        WeightPath::Packed | WeightPath::Packed64 => Tolerance::FORWARD_F32,
        WeightPath::F16 => Tolerance::REDUCED_PRECISION,
    }
}

/// Tolerance of a Gemma 3n forward pass on the native-f16 path ([`WeightPath::F16`]) against
/// the f32 CPU engine, given the CPU's logits: `1e-2` of their largest magnitude, absolute
/// (the `f16_storage` tier of the exporter's verification: 20 f16 unit roundoffs of the logit
/// scale). [`forward_tolerance`]'s `reduced_precision` (2e-2 absolute plus relative, per
/// logit) does not scale with the hidden state: Gemma 3n's residual streams carry embeddings
/// scaled by `sqrt(d_model)` and its logits reach the soft-cap's range, so the f16 rounding of
/// every activation before every product moves even a logit near 0 by a few 1e-2 (measured
/// up to 5.5e-2 on the tiny test checkpoint, logit scale 16-17; the packed paths 2.9e-5).
pub fn gemma3n_f16_tolerance(expected: &[f32]) -> Tolerance {
    let scale = expected.iter().fold(1f32, |m, x| m.max(x.abs()));
    Tolerance { name: "gemma3n_f16_forward", abs: 1e-2 * scale, rel: 0.0 }
}

/// Tolerance of a whole forward pass of a file with block-quantised tensors against the CPU
/// engine (the self-check and the parity tests), on the packed and packed64 paths (on the f16
/// path the f16 tensors' [`Tolerance::REDUCED_PRECISION`] is the looser and applies).
/// `matmul_quant.wgsl` computes the CPU's function: each activation is rounded to 8 bits per
/// block of 32 (step `max|x| / 127`) before a product with a quantised matrix, then integer
/// block sums are scaled in f32. But the activations entering that rounding differ between
/// the backends by f32 roundoff, so an element lying within roundoff of a rounding boundary
/// rounds the other way on one side: it moves by one step, 1/127 ≈ 7.9e-3 of its block's
/// largest magnitude, and the product by at most that times its weight (the synthetic test
/// files have `|w| ≤ 1 / sqrt(fan_in)`). The tier allows one such step: 1e-2 absolute plus
/// relative (measured on the parity tests' files before the tier was set: at most 3.3e-3).
pub const QUANTIZED_FORWARD_TOLERANCE: Tolerance = Tolerance { name: "quantized_forward", abs: 1e-2, rel: 1e-2 };

/// The first block-quantised tensor of `model` (name and dtype), if any: the GPU runs its
/// products with `matmul_quant.wgsl`, and a forward pass of such a file is compared with the
/// CPU engine at [`QUANTIZED_FORWARD_TOLERANCE`] (the self-check).
pub fn quantized_tensor(model: &crate::ModelFile) -> Option<(String, crate::format::DType)> {
    model.view().tensors.iter().find(|t| t.dtype.is_quantized()).map(|t| (t.name.clone(), t.dtype))
}

/// Errors of the GPU backend. Messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// No usable adapter (no Vulkan/Metal driver, or none matching the requested name).
    #[error("no GPU adapter: {reason}; use the CPU backend or install a Vulkan driver (e.g. mesa-vulkan-drivers)")]
    NoAdapter {
        /// Why none was found.
        reason: String,
    },
    /// The adapter refused to create a device.
    #[error("GPU adapter {adapter} refused to create a device: {reason}")]
    DeviceRequest {
        /// Adapter name.
        adapter: String,
        /// The driver's error.
        reason: String,
    },
    /// A buffer would exceed the device's limits even after splitting into row chunks.
    #[error("{what} needs a {bytes}-byte GPU buffer but the device allows {limit} bytes; use a smaller context or the CPU backend")]
    BufferTooLarge {
        /// Which buffer.
        what: String,
        /// Bytes needed.
        bytes: u64,
        /// The device limit.
        limit: u64,
    },
    /// The device (or the engine's `GpuOptions::memory_limit_bytes`) could not provide the
    /// memory `during` needed. Elastic sessions react by downshifting and retrying.
    #[error("GPU out of memory while {during}: {reason}; use a smaller submodel or context")]
    OutOfMemory {
        /// What the backend was allocating.
        during: String,
        /// The driver's message, or the limit that was hit.
        reason: String,
    },
    /// wgpu reported an error (validation, out of memory, internal) while doing `during`.
    #[error("GPU error while {during}: {message}")]
    Wgpu {
        /// What the backend was doing.
        during: String,
        /// wgpu's description.
        message: String,
    },
    /// The call's stop condition became true while it waited for the device (a cancel):
    /// nothing was appended, the session is as it was before the call. The step's work may
    /// still be running; the next call queues behind it.
    #[error("interrupted: the step was cancelled before it finished; the session is unchanged")]
    Interrupted,
    /// Reading results back from the GPU failed (device lost, map failure, timeout).
    #[error("GPU readback failed: {reason}")]
    Readback {
        /// What failed.
        reason: String,
    },
    /// The architecture cannot be run by this backend.
    #[error("GPU backend cannot run this model: {reason}")]
    Unsupported {
        /// What is not supported.
        reason: String,
    },
    /// A tensor's shape or segments do not match the architecture.
    #[error("tensor {tensor}: {reason}; the file is inconsistent, re-export it")]
    BadTensor {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The session's KV cache would exceed its context window.
    #[error("context full: this GPU session holds {max} tokens; reset the session or use a shorter input")]
    ContextFull {
        /// Context window of the session.
        max: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token {token} is outside the vocabulary (0..{vocab})")]
    TokenOutOfRange {
        /// The offending token.
        token: u32,
        /// Vocabulary size.
        vocab: u32,
    },
    /// An argument out of its range (candidate count, sampling transform).
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What is wrong.
        what: String,
    },
    /// An operation that needs at least one token was given none.
    #[error("empty input: {what} needs at least one token")]
    EmptyInput {
        /// The operation.
        what: &'static str,
    },
    /// The start-up self-check found the GPU disagreeing with the CPU engine.
    #[error("GPU self-check failed: {reason}; use the CPU backend")]
    SelfCheck {
        /// What disagreed (or why the CPU side could not run).
        reason: String,
    },
    /// The model file could not be read.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The submodel does not fit the model.
    #[error(transparent)]
    Submodel(#[from] SubmodelError),
}

// The engine is shared across threads; a session moves to a worker thread.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    const fn assert_send<T: Send>() {}
    assert_send_sync::<GpuEngine>();
    assert_send::<GpuSession>();
};
