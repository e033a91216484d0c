//! The one "CPU or GPU" abstraction of the runtime: [`Backend`] is a shared engine handle
//! (weights loaded once), [`BackendSession`] one generation's KV cache and position on it.
//!
//! Everything above the engines ([`ElasticSession`](crate::elastic::ElasticSession), the
//! app-facing [`Session`](crate::Session), latency calibration, the CLI) goes through these two
//! types, so a new backend is one more variant here and nowhere else.

use std::sync::Arc;

use crate::cpu::{self, argmax, CpuEngine, EngineError};
#[cfg(feature = "gpu")]
use crate::gpu::{GpuEngine, GpuError, GpuSession};
use crate::{ModelFile, Submodel};

/// Which kind of backend an engine runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The CPU engine ([`crate::cpu`]).
    Cpu,
    /// The wgpu compute backend (`crate::gpu`).
    Gpu,
}

impl BackendKind {
    /// `"cpu"` or `"gpu"`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Gpu => "gpu",
        }
    }
}

/// Errors of a backend operation: the CPU engine's or the GPU backend's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The CPU engine failed (bad submodel, context full, token out of range, ...).
    #[error(transparent)]
    Cpu(#[from] EngineError),
    /// The GPU backend failed (out of memory, device lost, ...).
    #[cfg(feature = "gpu")]
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

impl BackendError {
    /// True when the GPU could not allocate memory (the elastic layer steps down and retries).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            #[cfg(feature = "gpu")]
            BackendError::Gpu(GpuError::OutOfMemory { .. }) => true,
            _ => false,
        }
    }
}

/// A loaded engine, cheap to clone and share between threads (`Send + Sync`): sessions made
/// from it share its weights.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The CPU engine.
    Cpu(Arc<CpuEngine>),
    /// The GPU engine.
    #[cfg(feature = "gpu")]
    Gpu(Arc<GpuEngine>),
}

impl From<CpuEngine> for Backend {
    fn from(e: CpuEngine) -> Backend {
        Backend::Cpu(Arc::new(e))
    }
}

#[cfg(feature = "gpu")]
impl From<GpuEngine> for Backend {
    fn from(e: GpuEngine) -> Backend {
        Backend::Gpu(Arc::new(e))
    }
}

impl Backend {
    /// CPU or GPU.
    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Cpu(_) => BackendKind::Cpu,
            #[cfg(feature = "gpu")]
            Backend::Gpu(_) => BackendKind::Gpu,
        }
    }

    /// `"cpu"` or `"gpu"`.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// The model file.
    pub fn model(&self) -> &Arc<ModelFile> {
        match self {
            Backend::Cpu(e) => e.model(),
            #[cfg(feature = "gpu")]
            Backend::Gpu(e) => e.model(),
        }
    }

    /// The CPU engine, when this is one.
    pub fn cpu(&self) -> Option<&CpuEngine> {
        match self {
            Backend::Cpu(e) => Some(e),
            #[cfg(feature = "gpu")]
            Backend::Gpu(_) => None,
        }
    }

    /// The GPU engine, when this is one.
    #[cfg(feature = "gpu")]
    pub fn gpu(&self) -> Option<&GpuEngine> {
        match self {
            Backend::Gpu(e) => Some(e),
            Backend::Cpu(_) => None,
        }
    }

    /// An empty session running `submodel` (no out-of-memory step-down here: see
    /// [`ElasticSession`](crate::elastic::ElasticSession)).
    pub fn session(&self, submodel: &Submodel) -> Result<BackendSession, BackendError> {
        Ok(match self {
            Backend::Cpu(e) => BackendSession::Cpu(e.session(submodel)?),
            #[cfg(feature = "gpu")]
            Backend::Gpu(e) => BackendSession::Gpu(Box::new(e.session(submodel)?)),
        })
    }

    /// A new engine of the same kind and options on another mapping of the model (a file
    /// that grew by whole levels).
    pub fn reopen(&self, model: Arc<ModelFile>) -> Result<Backend, BackendError> {
        Ok(match self {
            Backend::Cpu(e) => Backend::Cpu(Arc::new(CpuEngine::new(model)?.with_threads(e.threads()))),
            #[cfg(feature = "gpu")]
            Backend::Gpu(e) => Backend::Gpu(Arc::new(GpuEngine::new(model, e.options().clone())?)),
        })
    }
}

/// One generation's state on a [`Backend`]: the submodel, KV cache and position. `Send`.
#[derive(Debug)]
pub enum BackendSession {
    /// On the CPU engine.
    Cpu(cpu::Session),
    /// On the GPU (boxed: buffers, plan and bind groups).
    #[cfg(feature = "gpu")]
    Gpu(Box<GpuSession>),
}

impl BackendSession {
    /// The submodel running now.
    pub fn submodel(&self) -> &Submodel {
        match self {
            BackendSession::Cpu(s) => s.submodel(),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.submodel(),
        }
    }

    /// Tokens in the KV cache.
    pub fn position(&self) -> usize {
        match self {
            BackendSession::Cpu(s) => s.position(),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.position(),
        }
    }

    /// The most tokens the KV cache can hold.
    pub fn max_context(&self) -> usize {
        match self {
            BackendSession::Cpu(s) => s.max_context(),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.max_context(),
        }
    }

    /// Length of a logits vector.
    pub fn vocab_size(&self) -> usize {
        match self {
            BackendSession::Cpu(s) => s.vocab_size(),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.vocab_size(),
        }
    }

    /// Computes the logits of the first `rows` vocabulary entries only from the next pass on
    /// (the others are `-inf`; `None` computes all): [`cpu::Session::set_logit_rows`],
    /// `GpuSession::set_logit_rows`.
    pub fn set_logit_rows(&mut self, rows: Option<usize>) -> Result<(), BackendError> {
        match self {
            BackendSession::Cpu(s) => s.set_logit_rows(rows),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.set_logit_rows(rows)?,
        }
        Ok(())
    }

    /// Appends `tokens` (at least one) and returns the last one's logits (`vocab_size`
    /// values; read back from the GPU). On error the session is unchanged.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, BackendError> {
        Ok(match self {
            BackendSession::Cpu(s) => s.prefill(tokens)?,
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.prefill_logits(tokens)?,
        })
    }

    /// Appends one token and returns its logits.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, BackendError> {
        Ok(match self {
            BackendSession::Cpu(s) => s.decode(token)?,
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.decode_logits(token)?,
        })
    }

    /// [`prefill`](Self::prefill) returning only the greedy next token (on the GPU the argmax
    /// runs on the device and 4 bytes are read back).
    pub fn prefill_greedy(&mut self, tokens: &[u32]) -> Result<u32, BackendError> {
        Ok(match self {
            BackendSession::Cpu(s) => argmax(&s.prefill(tokens)?),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.prefill(tokens)?,
        })
    }

    /// [`decode`](Self::decode) returning only the greedy next token.
    pub fn decode_greedy(&mut self, token: u32) -> Result<u32, BackendError> {
        Ok(match self {
            BackendSession::Cpu(s) => argmax(&s.decode(token)?),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.decode(token)?,
        })
    }

    /// Bytes held by the KV cache: on the CPU engine what it has grown to (it grows with the
    /// tokens held), on the GPU the whole context window (allocated with the session).
    pub fn kv_cache_bytes(&self) -> u64 {
        match self {
            BackendSession::Cpu(s) => s.kv_cache_bytes() as u64,
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.kv_cache_bytes(),
        }
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        match self {
            BackendSession::Cpu(s) => s.reset(),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.reset(),
        }
    }

    /// Forgets every token from `position` on.
    pub fn truncate(&mut self, position: usize) {
        match self {
            BackendSession::Cpu(s) => s.truncate(position),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.truncate(position),
        }
    }

    /// The CPU session, when on the CPU engine.
    pub fn cpu(&self) -> Option<&cpu::Session> {
        match self {
            BackendSession::Cpu(s) => Some(s),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(_) => None,
        }
    }

    /// The GPU session, when on the GPU.
    #[cfg(feature = "gpu")]
    pub fn gpu(&self) -> Option<&GpuSession> {
        match self {
            BackendSession::Gpu(s) => Some(s),
            BackendSession::Cpu(_) => None,
        }
    }

    /// The GPU session, mutably.
    #[cfg(feature = "gpu")]
    pub fn gpu_mut(&mut self) -> Option<&mut GpuSession> {
        match self {
            BackendSession::Gpu(s) => Some(s),
            BackendSession::Cpu(_) => None,
        }
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    const fn assert_send<T: Send>() {}
    assert_send_sync::<Backend>();
    assert_send::<BackendSession>();
};
