//! The wgpu compute backend (feature `gpu`, on by default): Vulkan (Android, Linux) and Metal
//! (iOS, macOS), checked against the CPU reference engine ([`crate::cpu`]), whose math it
//! mirrors op by op.
//!
//! - [`list_adapters`] reports what wgpu can see (the CLI's `devices` command).
//! - [`GpuEngine`] owns the device, the pipelines (created once, on first use) and the shared
//!   weights; `Send + Sync`.
//! - [`GpuSession`] uploads one submodel's FFN weight prefixes (only the segments of the levels
//!   it uses), owns a GPU-resident KV cache and records a whole decode step in one command
//!   encoder with one submit and one 4-byte readback (the argmax).
//!
//! Weights stay f16 on the GPU, two per `u32` (`unpack2x16float`), with f32 arithmetic: this
//! path needs no `SHADER_F16` and runs everywhere (f32 files are uploaded as f32). Tensors larger
//! than the device's storage-binding limit are split into row chunks. Shaders live in
//! `shaders/` (one WGSL file per op) and are specialised with `override` constants (weight
//! format, residual accumulation, gating, activation, GEMV rows per workgroup: one thread per
//! row on CPU adapters such as lavapipe, 4 rows of 16 threads on GPUs; the environment
//! variable `MATFORMER_GEMV_ROWS` overrides it for tuning). The residual add is fused into the
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
mod ops;
mod probe;
mod weights;

pub use device::{list_adapters, AdapterReport};
pub use engine::{GpuEngine, GpuOptions, GpuSession, StepCounters};
pub use ops::{shader_sources, ShaderSource};
pub use probe::{OpRunner, WeightFormat};

use crate::{ModelError, SubmodelError};

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
    /// wgpu reported an error (validation, out of memory, internal) while doing `during`.
    #[error("GPU error while {during}: {message}")]
    Wgpu {
        /// What the backend was doing.
        during: String,
        /// wgpu's description.
        message: String,
    },
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
