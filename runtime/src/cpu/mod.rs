//! The CPU reference engine: the correctness oracle for other backends and the fallback on
//! devices without a usable GPU.
//!
//! - Weights are read in place from the model file's bytes (f16, f32 or the block-quantised
//!   `q8_0`, `q4_0`, `q4_1`), never copied into an f32 model; a submodel touches only the FFN
//!   segments of the levels it uses. Products with quantised weights quantise the activation to
//!   8 bits per block and use integer dot products (`kernels::qdot`).
//! - Arithmetic is f32. Batched prefill, token-by-token decode and any thread count give
//!   bitwise-identical logits (every sum is computed in one fixed order, never split
//!   between threads).
//! - [`Session`] owns a KV cache for one submodel; [`CpuEngine`] is shareable (`Send + Sync`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use matformer::{cpu, ModelFile, Submodel};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = Arc::new(ModelFile::open("model.matf")?);
//! let engine = cpu::CpuEngine::new(model.clone())?;
//! let sub = Submodel::parse("s", model.metadata(), model.view().available_levels)?;
//! let mut session = engine.session(&sub)?;
//! let out = cpu::generate_greedy(&mut session, &[1, 72, 105], 16, None, |_| {})?;
//! # let _ = out; Ok(()) }
//! ```

mod engine;
mod gemma3n;
pub(crate) mod kernels;
pub mod reference;
pub mod tolerance;
pub(crate) mod weights;

pub(crate) use engine::window_cache_positions;
pub use engine::{CpuEngine, Session, WINDOW_SLACK};
#[cfg(feature = "gpu")]
pub(crate) use gemma3n::normal_quantile;
pub use tolerance::{Mismatch, Tolerance};

use crate::{ModelError, SubmodelError};

/// The vector instruction sets the CPU kernels were compiled for, e.g. `"x86_64: sse2"` for a
/// baseline x86-64 build or `"x86_64: sse2 avx avx2 fma f16c avx512f"` for a build with
/// `-C target-cpu=native` on a recent CPU; `"aarch64: neon"` on phones; followed by the kernel
/// the quantised weights' integer dot products use on this CPU (`"; int8 dot avx2"`,
/// `"neon-sdot"`, `"neon"` or `"scalar"`, detected at run time).
///
/// The kernels are plain Rust loops written to auto-vectorise (no `unsafe`, no run-time
/// dispatch), so their speed follows the target features of the build: benchmark figures
/// are only comparable between builds with the same features.
pub fn simd_features() -> String {
    let on: [(&str, bool); 10] = [
        ("sse2", cfg!(target_feature = "sse2")),
        ("sse4.1", cfg!(target_feature = "sse4.1")),
        ("avx", cfg!(target_feature = "avx")),
        ("avx2", cfg!(target_feature = "avx2")),
        ("fma", cfg!(target_feature = "fma")),
        ("f16c", cfg!(target_feature = "f16c")),
        ("avx512f", cfg!(target_feature = "avx512f")),
        ("neon", cfg!(target_feature = "neon")),
        ("fp16", cfg!(target_feature = "fp16")),
        ("sve", cfg!(target_feature = "sve")),
    ];
    let names: Vec<&str> = on.iter().filter(|(_, yes)| *yes).map(|(name, _)| *name).collect();
    let names = if names.is_empty() { "scalar".to_string() } else { names.join(" ") };
    format!("{}: {names}; int8 dot {}", std::env::consts::ARCH, kernels::qdot::kernel_name())
}

/// Errors of the CPU engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The session's KV cache would exceed the model's context window.
    #[error("context full: the model's context window is {max} tokens; reset the session or use a shorter input")]
    ContextFull {
        /// Context window (metadata `max_context`).
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
    /// The model file could not be read.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The submodel does not fit the model.
    #[error(transparent)]
    Submodel(#[from] SubmodelError),
    /// The architecture in the metadata cannot be run (inconsistent dimensions).
    #[error("unsupported architecture: {reason}")]
    BadConfig {
        /// What is wrong.
        reason: String,
    },
    /// A tensor's shape or segment layout does not match the architecture.
    #[error("tensor {tensor}: {reason}; the file is inconsistent, re-export it")]
    BadTensor {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The call's stop condition became true between two layers (a cancel): nothing was
    /// appended, the session is as it was before the call.
    #[error("interrupted: the step was cancelled before it finished; the session is unchanged")]
    Interrupted,
    /// A tensor's bytes are not aligned for their element type (the file or buffer does not
    /// honour the format's alignment).
    #[error("tensor {tensor} is not aligned for its element type ({reason}); load the file with ModelFile::open or from_bytes")]
    Misaligned {
        /// Tensor name.
        tensor: String,
        /// The cast error.
        reason: String,
    },
}

/// Index of the largest logit (the first one on ties; NaNs are ignored; 0 for an empty slice).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    u32::try_from(best).unwrap_or(u32::MAX)
}

/// Greedy generation: prefills `prompt`, then produces up to `max_new` tokens by argmax,
/// calling `on_token` for each. Returns the new tokens.
///
/// Stops early when `eos` is produced (the EOS token is neither returned nor passed to
/// `on_token`) or when the context window is full (the tokens produced so far are returned).
/// A prompt that does not fit is [`EngineError::ContextFull`]; an empty prompt is
/// [`EngineError::EmptyInput`].
pub fn generate_greedy(
    session: &mut Session,
    prompt: &[u32],
    max_new: usize,
    eos: Option<u32>,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>, EngineError> {
    let mut out = Vec::new();
    if max_new == 0 {
        // Still feed the prompt, so the session state is the same as for any other max_new.
        session.prefill(prompt)?;
        return Ok(out);
    }
    let mut logits = session.prefill(prompt)?;
    loop {
        let next = argmax(&logits);
        if eos == Some(next) {
            break;
        }
        out.push(next);
        on_token(next);
        if out.len() >= max_new || session.position() >= session.max_context() {
            break;
        }
        logits = session.decode(next)?;
    }
    Ok(out)
}

// The engine is shared across threads; a session moves to a worker thread.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    const fn assert_send<T: Send>() {}
    assert_send_sync::<CpuEngine>();
    assert_send::<Session>();
};

#[cfg(test)]
mod tests {
    #[test]
    fn simd_features_name_the_architecture() {
        let f = super::simd_features();
        eprintln!("kernels: {f}");
        assert!(f.starts_with(std::env::consts::ARCH), "{f}");
        if cfg!(target_arch = "x86_64") {
            assert!(f.contains("sse2"), "x86-64 always has SSE2: {f}");
        }
    }
}
