//! Switching submodels mid-generation: [`ElasticSession`], on the CPU engine or the GPU.
//!
//! Every submodel of a MatFormer file reads a prefix of the same weights, so moving between
//! them needs no reload. On the CPU engine nothing moves at all: it reads the mapping in place.
//! On the GPU the engine keeps one store of FFN weight prefixes: a downshift uploads and copies
//! nothing, an upshift uploads only the rows the store lacks
//! ([`GpuSession::switch_to`](crate::gpu::GpuSession::switch_to)). What does change is the KV
//! cache (its keys and values depend on the FFN widths of every earlier layer), so a switch
//! re-prefills the cache from the token history with the new submodel. The output after a
//! switch is then exactly that of the new submodel on the same tokens (bitwise on the CPU).
//!
//! A submodel that skips layers (elastic depth, Gemma 3n) writes no K/V for them. A keep-KV
//! switch to a submodel that runs such a layer again would read cache entries that layer never
//! wrote for the tokens seen while it was skipped, so [`ElasticSession::switch_with`] runs
//! every switch that un-skips a layer caching its own K/V ([`unskipped_kv_layers`]) on the
//! exact re-prefill path, whatever the mode asked. Un-skipping a layer that reads another
//! layer's K/V (Gemma 3n's K/V-sharing layers, such as E2B's skipped 20-24) reads only
//! entries its owner wrote all along, and may keep the cache.
//!
//! Under memory pressure [`ElasticSession::on_memory_pressure`] downshifts, frees the GPU
//! buffers beyond the new prefixes, and tells the OS it may drop the pages of the levels no
//! longer used ([`ModelFile::release_levels_above`](crate::ModelFile::release_levels_above)).
//! On the GPU, an allocation failure ([`GpuError::OutOfMemory`]) while starting or switching
//! makes the session downshift (every layer one level down) and retry instead of failing.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{Backend, BackendError, BackendSession};
use crate::cpu::{CpuEngine, EngineError, Session};
use crate::format::gemma3n::Gemma3nConfig;
use crate::format::{Metadata, NestingOrigin};
#[cfg(feature = "gpu")]
use crate::gpu::{step_down_on_oom, GpuEngine, GpuError, GpuSession};
use crate::sampling::Sampler;
use crate::{ModelError, ModelFile, Submodel};

/// How a switch moves between two submodels, compared layer by layer (a skipped layer counts
/// as narrower than any level: skipping a layer shrinks it, running it again grows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchDirection {
    /// No layer grows and at least one shrinks.
    Downshift,
    /// No layer shrinks and at least one grows.
    Upshift,
    /// The same submodel.
    Same,
    /// Some layers grow and others shrink (Mix'n'Match to Mix'n'Match).
    Mixed,
}

impl SwitchDirection {
    /// The direction from `from` to `to` (submodels of the same model).
    pub fn between(from: &Submodel, to: &Submodel) -> SwitchDirection {
        let pairs = || layer_ranks(from).zip(layer_ranks(to));
        let grows = pairs().any(|(a, b)| b > a);
        let shrinks = pairs().any(|(a, b)| b < a);
        match (grows, shrinks) {
            (false, false) => SwitchDirection::Same,
            (false, true) => SwitchDirection::Downshift,
            (true, false) => SwitchDirection::Upshift,
            (true, true) => SwitchDirection::Mixed,
        }
    }
}

/// Per layer: 0 for a skipped layer, else 1 + its level (the order of [`SwitchDirection`]).
fn layer_ranks(s: &Submodel) -> impl Iterator<Item = u16> + '_ {
    (0..s.levels.len()).map(|i| if s.is_skipped(i) { 0 } else { 1 + u16::from(s.levels[i]) })
}

/// The layers `to` runs that `from` skips and that write their own K/V cache entries (every
/// layer of a Llama-style file; in a Gemma 3n file the layers that own their K/V). A keep-KV
/// switch from `from` to `to` would make them read entries they never wrote for the tokens
/// `from` ran, so such a switch re-prefills ([`ElasticSession::switch_with`]).
pub fn unskipped_kv_layers(from: &Submodel, to: &Submodel, meta: &Metadata) -> Vec<usize> {
    let gemma = Gemma3nConfig::from_metadata(meta).ok().flatten();
    (0..to.levels.len())
        .filter(|&i| to.runs_layer(i) && from.is_skipped(i))
        .filter(|&i| gemma.as_ref().is_none_or(|g| g.owns_kv(i)))
        .collect()
}

/// What [`ElasticSession::switch_to`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchReport {
    /// Name of the submodel before the switch ([`Submodel::name`]).
    pub from: String,
    /// Name of the submodel after the switch.
    pub to: String,
    /// Down, up, same or mixed.
    pub direction: SwitchDirection,
    /// The mode the switch ran in: [`SwitchMode::Exact`] or [`SwitchMode::KeepKv`]
    /// ([`SwitchMode::Auto`] resolved, see [`SwitchMode::resolve`]).
    pub mode: SwitchMode,
    /// Tokens of the history run through the new submodel to rebuild the KV cache (0 for
    /// [`SwitchDirection::Same`], which keeps the session).
    pub reprefilled_tokens: usize,
    /// Wall time of the switch, including the re-prefill, in milliseconds.
    pub elapsed_ms: f64,
    /// Wall time of the switch itself (GPU: uploading missing rows and rebuilding the dispatch
    /// plan; CPU: a new session), without the re-prefill, in milliseconds.
    pub switch_ms: f64,
    /// FFN weight bytes uploaded to the GPU (0 on the CPU engine and for a GPU downshift).
    pub uploaded_bytes: u64,
    /// When a GPU allocation failure made the session run a smaller submodel than the one
    /// asked for: the requested submodel's name and the error (`to` names what runs now).
    pub fallback: Option<String>,
    /// Logits (`vocab_size` values) of the last history token under the new submodel, to
    /// continue generation; `None` when the history is empty.
    pub last_logits: Option<Vec<f32>>,
}

/// What [`ElasticSession::refresh`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct RefreshReport {
    /// Levels available before the refresh.
    pub levels_before: usize,
    /// Levels available after it (equal to `levels_before` when the file did not grow).
    pub levels_after: usize,
    /// Bytes read and checked: every byte of the newly available levels (segments by CRC,
    /// padding for zero), i.e. the growth of the file; 0 when it did not grow.
    pub bytes_verified: u64,
    /// Wall time of the refresh (re-map, checks, new engine and re-prefill) in milliseconds.
    pub elapsed_ms: f64,
}

/// How urgently the OS asks for memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryPressure {
    /// Shrink every layer by one level (layers already at level 0 stay).
    Moderate,
    /// Go to the smallest uniform submodel (every layer at level 0).
    Critical,
}

/// What [`ElasticSession::on_memory_pressure`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct PressureReport {
    /// The pressure handled.
    pub pressure: MemoryPressure,
    /// The downshift (direction [`SwitchDirection::Same`] when already small enough).
    pub switch: SwitchReport,
    /// Levels above this one were released.
    pub released_above_level: usize,
    /// Bytes of the file mapping the OS was told it may drop (0 for files held in memory and
    /// on non-unix targets).
    pub bytes_advised: u64,
    /// GPU buffer bytes freed (the FFN rows beyond the new prefixes; 0 on the CPU engine).
    pub gpu_bytes_released: u64,
}

/// Errors of an [`ElasticSession`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ElasticError {
    /// The CPU engine failed (bad submodel, context full, ...).
    #[error(transparent)]
    Cpu(#[from] EngineError),
    /// The GPU backend failed (out of memory even at the smallest submodel, device lost, ...).
    #[cfg(feature = "gpu")]
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The model file could not be re-read (refresh).
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl ElasticError {
    /// True when the call gave up because its stop condition became true (a cancel, through
    /// [`ElasticSession::prefill_sample_until`] or [`ElasticSession::decode_sample_until`]):
    /// the session is as it was before the call.
    pub fn is_interrupted(&self) -> bool {
        match self {
            ElasticError::Cpu(EngineError::Interrupted) => true,
            #[cfg(feature = "gpu")]
            ElasticError::Gpu(GpuError::Interrupted) => true,
            _ => false,
        }
    }
}

impl From<BackendError> for ElasticError {
    fn from(e: BackendError) -> ElasticError {
        match e {
            BackendError::Cpu(e) => ElasticError::Cpu(e),
            #[cfg(feature = "gpu")]
            BackendError::Gpu(e) => ElasticError::Gpu(e),
        }
    }
}

/// How a switch treats the KV cache the previous submodel wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchMode {
    /// Chooses per switch from the file's nesting origin ([`Metadata::nesting`](crate::format::Metadata::nesting)) and the
    /// direction, by [`SwitchMode::resolve`]: keep-KV, except when some layer widens on a file
    /// whose levels were not trained nested (there the wide submodel would read a weak narrow
    /// one's cache: +3.3 nats per token measured on SmolLM2 `--nest`), which re-prefills
    /// exactly. The default: on a trained MatFormer keep-KV stayed within 0.015 nats of exact
    /// in every switch measured while exact re-prefill takes seconds at chat lengths
    /// (docs/api.md, "What a switch costs").
    #[default]
    Auto,
    /// Re-prefill the history with the new submodel: every later output is exactly the new
    /// submodel's on the same tokens. Costs one batched prefill of the whole history.
    Exact,
    /// Keep the KV cache the previous submodel wrote and continue on it (attention and
    /// embeddings are shared by every submodel and nested submodels are trained to agree):
    /// no re-prefill, so the switch costs microseconds whatever the history length, and the
    /// output is an approximation of the new submodel's until the old entries scroll out.
    KeepKv,
}

impl SwitchMode {
    /// The mode a switch from `from` to `to` runs in: `Exact` and `KeepKv` as they are;
    /// `Auto` gives `KeepKv` when the levels were trained nested ([`NestingOrigin::Trained`])
    /// or when no layer widens, and `Exact` when some layer widens (a skipped layer that runs
    /// again counts as widening) on a file nested after training or of unknown origin.
    ///
    /// This is the choice by levels only: [`ElasticSession::switch_with`] further forces
    /// `Exact` when the switch runs again a skipped layer that caches its own K/V
    /// ([`unskipped_kv_layers`]), since no mode may read entries that layer never wrote.
    pub fn resolve(self, from: &Submodel, to: &Submodel, nesting: NestingOrigin) -> SwitchMode {
        match self {
            SwitchMode::Exact | SwitchMode::KeepKv => self,
            SwitchMode::Auto => {
                let widens = layer_ranks(from).zip(layer_ranks(to)).any(|(a, b)| b > a);
                if nesting == NestingOrigin::Trained || !widens {
                    SwitchMode::KeepKv
                } else {
                    SwitchMode::Exact
                }
            }
        }
    }
}

/// A generation session that can change submodel at any token boundary, on the CPU engine
/// ([`ElasticSession::new`]) or the GPU ([`ElasticSession::new_gpu`]): the engine, the current
/// session and the token history of the current generation. `Send`.
///
/// ```no_run
/// use std::sync::Arc;
/// use matformer::elastic::{ElasticSession, MemoryPressure};
/// use matformer::{cpu, ModelFile, Submodel};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let model = Arc::new(ModelFile::open("model.matf")?);
/// let levels = model.view().available_levels;
/// let engine = cpu::CpuEngine::new(model.clone())?;
/// let mut s = ElasticSession::new(engine, &Submodel::parse("xl", model.metadata(), levels)?)?;
/// let mut logits = s.prefill(&[1, 72, 105])?;
/// logits = s.decode(cpu::argmax(&logits))?;
/// let report = s.switch_to(&Submodel::parse("s", model.metadata(), levels)?)?;
/// let next = cpu::argmax(report.last_logits.as_deref().unwrap_or(&logits));
/// s.on_memory_pressure(MemoryPressure::Critical)?;
/// # let _ = next; Ok(()) }
/// ```
pub struct ElasticSession {
    backend: Backend,
    session: BackendSession,
    history: Vec<u32>,
    last_logits: Option<Vec<f32>>,
    /// Set when an allocation failure made the session start smaller than asked.
    start_fallback: Option<String>,
}

impl fmt::Debug for ElasticSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ElasticSession")
            .field("backend", &self.backend_name())
            .field("submodel", &self.submodel().levels)
            .field("position", &self.position())
            .field("history_len", &self.history.len())
            .finish()
    }
}

impl ElasticSession {
    /// An empty session running `submodel` (one level per layer, each present in the file) on
    /// the CPU engine.
    pub fn new(engine: CpuEngine, submodel: &Submodel) -> Result<ElasticSession, ElasticError> {
        ElasticSession::on(Backend::from(engine), submodel)
    }

    /// An empty session running `submodel` on the GPU. If the GPU cannot allocate it
    /// ([`GpuError::OutOfMemory`], from the device or from
    /// [`GpuOptions::memory_limit_bytes`](crate::gpu::GpuOptions::memory_limit_bytes)), every
    /// layer steps one level down and it retries; [`ElasticSession::start_fallback`] then
    /// says what was asked and why. Fails only when even level 0 does not fit, or for other
    /// errors.
    #[cfg(feature = "gpu")]
    pub fn new_gpu(engine: GpuEngine, submodel: &Submodel) -> Result<ElasticSession, ElasticError> {
        ElasticSession::on(Backend::from(engine), submodel)
    }

    /// An empty session running `submodel` on a shared engine of either kind (many sessions
    /// may share one engine's weights). On the GPU an allocation failure steps down as
    /// [`ElasticSession::new_gpu`] describes.
    pub fn on(backend: Backend, submodel: &Submodel) -> Result<ElasticSession, ElasticError> {
        let (session, start_fallback) = match &backend {
            Backend::Cpu(_) => (backend.session(submodel)?, None),
            #[cfg(feature = "gpu")]
            Backend::Gpu(engine) => {
                let meta = engine.model().metadata();
                let (session, _, oom) = step_down_on_oom(engine.model(), submodel, |s| engine.session(s))?;
                let fallback = oom.map(|e| format!("{} asked: {e}", submodel.name(meta)));
                (BackendSession::Gpu(Box::new(session)), fallback)
            }
        };
        Ok(ElasticSession { backend, session, history: Vec::new(), last_logits: None, start_fallback })
    }

    /// `"cpu"` or `"gpu"`.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The engine this session runs on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The backend session (KV cache, position).
    pub fn backend_session(&self) -> &BackendSession {
        &self.session
    }

    /// When the session started smaller than asked because the GPU could not allocate the
    /// requested submodel: what was asked and the error.
    pub fn start_fallback(&self) -> Option<&str> {
        self.start_fallback.as_deref()
    }

    /// The model file.
    pub fn model(&self) -> &Arc<ModelFile> {
        self.backend.model()
    }

    /// Appends `tokens` to the context and returns the logits of the last one (on the GPU they
    /// are read back: `vocab_size` floats). On error nothing changes.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ElasticError> {
        let logits = self.session.prefill(tokens)?;
        self.history.extend_from_slice(tokens);
        self.last_logits = Some(logits.clone());
        Ok(logits)
    }

    /// Appends one token and returns its logits. On error nothing changes.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, ElasticError> {
        let logits = self.session.decode(token)?;
        self.history.push(token);
        self.last_logits = Some(logits.clone());
        Ok(logits)
    }

    /// Appends `tokens` and returns the logits of every one of them, row-major
    /// `[tokens.len(), vocab_size]`, in one batched pass (on the GPU one submit per chunk of
    /// the prefill size and one readback): the verify pass of speculative decoding. On error
    /// nothing changes.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ElasticError> {
        let logits = match &mut self.session {
            BackendSession::Cpu(s) => s.forward_all(tokens)?,
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.forward_all(tokens)?,
        };
        self.history.extend_from_slice(tokens);
        self.last_logits = None;
        Ok(logits)
    }

    /// A greedy speculative round with the KV cache shared by `draft` and this session's
    /// submodel, in one GPU submit and one readback ([`GpuSession::speculate_greedy`]): `None`
    /// on the CPU engine, on a Gemma 3n file ([`GpuSession::can_speculate`]) or when `k + 1`
    /// tokens do not fit one pass. Appends `next` and the `k`
    /// drafts to the history (the verify pass fed them); the caller truncates to the tokens
    /// it keeps. On error nothing changes.
    #[cfg(feature = "gpu")]
    pub fn speculate_greedy_gpu(
        &mut self,
        next: u32,
        draft: &Submodel,
        k: usize,
        draft_rows: Option<usize>,
    ) -> Option<Result<crate::gpu::SpeculativeRound, ElasticError>> {
        let BackendSession::Gpu(s) = &mut self.session else {
            return None;
        };
        if k == 0 || k + 1 > s.pass_tokens() || !s.can_speculate() {
            return None;
        }
        Some(s.speculate_greedy(next, draft, k, draft_rows).map_err(ElasticError::from).inspect(|r| {
            self.history.push(next);
            self.history.extend_from_slice(&r.drafts);
            self.last_logits = None;
        }))
    }

    /// [`speculate_greedy_gpu`](Self::speculate_greedy_gpu) with the draft's own KV cache in
    /// `draft` (a session of this session's engine; [`GpuSession::speculate_greedy_own`]):
    /// the draft runs `catch_up` (ending with the fed token) and `k - 1` steps, this session
    /// the verify pass, in one submit. `None` unless both sessions are on the GPU and the
    /// round fits one pass each (and the file is not a Gemma 3n one). Appends the fed token and
    /// the `k` drafts to the history.
    #[cfg(feature = "gpu")]
    pub fn speculate_greedy_gpu_own(
        &mut self,
        draft: &mut BackendSession,
        catch_up: &[u32],
        k: usize,
    ) -> Option<Result<crate::gpu::SpeculativeRound, ElasticError>> {
        let (BackendSession::Gpu(s), BackendSession::Gpu(d)) = (&mut self.session, draft) else {
            return None;
        };
        if k == 0
            || k + 1 > s.pass_tokens()
            || catch_up.is_empty()
            || catch_up.len() > d.pass_tokens()
            || !s.can_speculate()
        {
            return None;
        }
        let next = catch_up[catch_up.len() - 1];
        Some(s.speculate_greedy_own(d, catch_up, k).map_err(ElasticError::from).inspect(|r| {
            self.history.push(next);
            self.history.extend_from_slice(&r.drafts);
            self.last_logits = None;
        }))
    }

    /// Computes the logits of the first `rows` vocabulary entries only from the next pass on
    /// (the others are `-inf`; `None` computes all): [`crate::cpu::Session::set_logit_rows`],
    /// `GpuSession::set_logit_rows`. Kept across keep-KV switches; a switch that replaces the
    /// backend session computes all of them again.
    pub fn set_logit_rows(&mut self, rows: Option<usize>) -> Result<(), ElasticError> {
        Ok(self.session.set_logit_rows(rows)?)
    }

    /// [`ElasticSession::prefill`] returning the greedy next token only (on the GPU the argmax
    /// runs on the device and 4 bytes are read back).
    pub fn prefill_greedy(&mut self, tokens: &[u32]) -> Result<u32, ElasticError> {
        let t = self.session.prefill_greedy(tokens)?;
        self.history.extend_from_slice(tokens);
        self.last_logits = None;
        Ok(t)
    }

    /// [`ElasticSession::decode`] returning the greedy next token only.
    pub fn decode_greedy(&mut self, token: u32) -> Result<u32, ElasticError> {
        let t = self.session.decode_greedy(token)?;
        self.history.push(token);
        self.last_logits = None;
        Ok(t)
    }

    /// [`ElasticSession::prefill`] choosing the next token with `sampler` (which must have
    /// observed the context for its penalties). On the GPU only the sampler's candidates are
    /// read back (the full logits only when they do not suffice); greedy without penalties
    /// reads back the 4-byte argmax.
    pub fn prefill_sample(&mut self, tokens: &[u32], sampler: &mut Sampler) -> Result<u32, ElasticError> {
        self.prefill_sample_until(tokens, sampler, &|| false)
    }

    /// [`ElasticSession::prefill_sample`] that gives up, leaving the session as it was
    /// ([`ElasticError::is_interrupted`]), as soon as `stop` returns true: on the CPU `stop` is
    /// asked before every layer (from a kernel worker thread), on the GPU while waiting for the
    /// device (every 0.5 ms). A cancel then takes effect within a layer's time (CPU) or half
    /// a millisecond (GPU) instead of a whole pass.
    pub fn prefill_sample_until(
        &mut self,
        tokens: &[u32],
        sampler: &mut Sampler,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<u32, ElasticError> {
        let t = match &mut self.session {
            BackendSession::Cpu(s) => sampler.sample_logits(&s.prefill_until(tokens, stop)?),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.prefill_sample_until(tokens, sampler, stop)?,
        };
        self.history.extend_from_slice(tokens);
        self.last_logits = None;
        Ok(t)
    }

    /// [`ElasticSession::decode`] choosing the next token with `sampler`.
    pub fn decode_sample(&mut self, token: u32, sampler: &mut Sampler) -> Result<u32, ElasticError> {
        self.decode_sample_until(token, sampler, &|| false)
    }

    /// [`ElasticSession::decode_sample`] that stops as
    /// [`ElasticSession::prefill_sample_until`] does.
    pub fn decode_sample_until(
        &mut self,
        token: u32,
        sampler: &mut Sampler,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<u32, ElasticError> {
        let t = match &mut self.session {
            BackendSession::Cpu(s) => sampler.sample_logits(&s.decode_until(token, stop)?),
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(s) => s.decode_sample_until(token, sampler, stop)?,
        };
        self.history.push(token);
        self.last_logits = None;
        Ok(t)
    }

    /// Forgets the history and empties the KV cache (a new generation); keeps the submodel.
    pub fn reset(&mut self) {
        self.session.reset();
        self.history.clear();
        self.last_logits = None;
    }

    /// Forgets every token from `position` on (history and KV cache), e.g. to keep the common
    /// prefix of a conversation and prefill only what changed. No-op beyond the end.
    ///
    /// When the cache cannot go back that far (Gemma 3n's sliding-window layers keep only the
    /// window and a little more, see [`crate::cpu::WINDOW_SLACK`]), the history up to
    /// `position` is run again, so the result is the same. If that pass fails (cancelled), the
    /// history is cut to what the cache still holds and the error returned.
    pub fn truncate(&mut self, position: usize) -> Result<(), ElasticError> {
        if position < self.history.len() {
            self.session.truncate(position);
            self.history.truncate(position);
            self.last_logits = None;
            let at = self.session.position();
            if at < position {
                let rest = self.history[at..].to_vec();
                if let Err(e) = self.session.prefill(&rest) {
                    self.history.truncate(self.session.position());
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// The submodel running now.
    pub fn submodel(&self) -> &Submodel {
        self.session.submodel()
    }

    /// Tokens in the KV cache.
    pub fn position(&self) -> usize {
        self.session.position()
    }

    /// Every token fed so far in this generation (prompt and generated tokens), in order.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// The CPU engine, when running on it.
    pub fn cpu_engine(&self) -> Option<&CpuEngine> {
        self.backend.cpu()
    }

    /// The CPU session (KV cache size, widths), when running on the CPU engine.
    pub fn cpu_session(&self) -> Option<&Session> {
        self.session.cpu()
    }

    /// The GPU engine (memory in use, FFN store), when running on the GPU.
    #[cfg(feature = "gpu")]
    pub fn gpu_engine(&self) -> Option<&GpuEngine> {
        self.backend.gpu()
    }

    /// The GPU session (counters, bytes), when running on the GPU.
    #[cfg(feature = "gpu")]
    pub fn gpu_session(&self) -> Option<&GpuSession> {
        self.session.gpu()
    }

    /// Switches to `submodel` at the current token boundary and re-prefills the KV cache from
    /// the history, so every later output is exactly that of `submodel` on the same tokens.
    /// CPU: a new session over the same mapping (no copy, no reload). GPU: the rows the
    /// engine's FFN store lacks are uploaded (none for a downshift) and the dispatch plan is
    /// rebuilt; if that allocation fails, every layer steps one level down and it retries
    /// ([`SwitchReport::fallback`]). Switching to the current submodel keeps the session and
    /// costs nothing.
    ///
    /// On error (a level not present in the file, a wrong layer count, the GPU out of memory
    /// even at level 0) the session is left unchanged.
    pub fn switch_to(&mut self, submodel: &Submodel) -> Result<SwitchReport, ElasticError> {
        self.switch_with(submodel, SwitchMode::Exact)
    }

    /// [`switch_to`](Self::switch_to) with a choice of what happens to the KV cache:
    /// [`SwitchMode::Exact`] re-prefills the history, [`SwitchMode::KeepKv`] keeps the cache
    /// the previous submodel wrote and only changes the weights later tokens use (no
    /// re-prefill; `reprefilled_tokens` is 0), [`SwitchMode::Auto`] picks one of the two by
    /// [`SwitchMode::resolve`]. [`SwitchReport::mode`] says which ran.
    ///
    /// Elastic depth: a switch that runs again a skipped layer which caches its own K/V
    /// ([`unskipped_kv_layers`]) always re-prefills ([`SwitchMode::Exact`]), whatever `mode`
    /// asks: that layer wrote no cache entries while it was skipped.
    pub fn switch_with(&mut self, submodel: &Submodel, mode: SwitchMode) -> Result<SwitchReport, ElasticError> {
        let started = Instant::now();
        let model = Arc::clone(self.model());
        let meta = model.metadata();
        let old = self.submodel().clone();
        let mode = if unskipped_kv_layers(&old, submodel, meta).is_empty() {
            mode.resolve(&old, submodel, meta.nesting())
        } else {
            SwitchMode::Exact
        };
        let mut report = SwitchReport {
            from: old.name(meta),
            to: submodel.name(meta),
            direction: SwitchDirection::Same,
            mode,
            reprefilled_tokens: 0,
            elapsed_ms: 0.0,
            switch_ms: 0.0,
            uploaded_bytes: 0,
            fallback: None,
            last_logits: None,
        };
        if *submodel == old {
            report.last_logits = self.last_logits.clone();
            report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            report.switch_ms = report.elapsed_ms;
            return Ok(report);
        }
        let history = std::mem::take(&mut self.history);
        let result = match mode {
            SwitchMode::KeepKv => self.switch_keep_kv(submodel, &mut report, started),
            SwitchMode::Exact | SwitchMode::Auto => self.switch_backend(submodel, &history, &mut report, started),
        };
        self.history = history;
        let last_logits = result?;
        report.direction = SwitchDirection::between(&old, self.submodel());
        report.to = self.submodel().name(meta);
        report.last_logits = last_logits.clone();
        self.last_logits = last_logits;
        report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(report)
    }

    /// The keep-KV switch: new weights, same cache. The last logits are those the previous
    /// submodel produced (the next token is the first one the new submodel computes).
    fn switch_keep_kv(
        &mut self,
        submodel: &Submodel,
        report: &mut SwitchReport,
        started: Instant,
    ) -> Result<Option<Vec<f32>>, ElasticError> {
        match &mut self.session {
            BackendSession::Cpu(session) => session.switch_keep_cache(submodel)?,
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(session) => {
                let meta = self.backend.model().metadata();
                let (sw, _, oom) = step_down_on_oom(self.backend.model(), submodel, |s| session.switch_keep_cache(s))?;
                report.fallback = oom.map(|e| format!("{} asked: {e}", submodel.name(meta)));
                report.uploaded_bytes = sw.uploaded_bytes;
            }
        }
        report.switch_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(self.last_logits.clone())
    }

    /// The backend part of [`ElasticSession::switch_to`]: returns the last history token's
    /// logits under the new submodel.
    fn switch_backend(
        &mut self,
        submodel: &Submodel,
        history: &[u32],
        report: &mut SwitchReport,
        started: Instant,
    ) -> Result<Option<Vec<f32>>, ElasticError> {
        match &mut self.session {
            BackendSession::Cpu(_) => {
                let mut next = self.backend.session(submodel)?;
                report.switch_ms = started.elapsed().as_secs_f64() * 1e3;
                let logits = if history.is_empty() { None } else { Some(next.prefill(history)?) };
                report.reprefilled_tokens = history.len();
                self.session = next;
                Ok(logits)
            }
            #[cfg(feature = "gpu")]
            BackendSession::Gpu(session) => {
                let model = self.backend.model();
                let meta = model.metadata();
                let previous = session.submodel().clone();
                let (sw, _, oom) = step_down_on_oom(model, submodel, |s| session.switch_to(s))?;
                report.fallback = oom.map(|e| format!("{} asked: {e}", submodel.name(meta)));
                report.switch_ms = started.elapsed().as_secs_f64() * 1e3;
                report.uploaded_bytes = sw.uploaded_bytes;
                if sw.cache_kept {
                    // The fallback landed on the submodel already running.
                    return Ok(self.last_logits.clone());
                }
                if history.is_empty() {
                    return Ok(None);
                }
                match session.prefill_logits(history) {
                    Ok(l) => {
                        report.reprefilled_tokens = history.len();
                        Ok(Some(l))
                    }
                    Err(e) => {
                        // Put the previous submodel back (its rows are still in the store).
                        if session.switch_to(&previous).is_ok() {
                            let _ = session.prefill(history);
                        }
                        Err(e.into())
                    }
                }
            }
        }
    }

    /// Picks up levels appended to the model file since it was opened (a download that
    /// continued from a level boundary) without interrupting the generation: re-maps the file
    /// with [`ModelFile::reopen_grown`](crate::ModelFile::reopen_grown), which checks the
    /// header is unchanged and verifies only the new levels, then builds a new engine on it
    /// (same thread count, or the same GPU options: on the GPU the shared weights are uploaded
    /// again) and a session for the current submodel, and re-prefills the history, so the next
    /// outputs are those of the session before. Larger submodels can then be chosen with
    /// [`switch_to`](Self::switch_to).
    ///
    /// A file that did not grow gives a report with equal levels and changes nothing. On
    /// error (cut inside a level, corrupt appended bytes, another model) the session is left
    /// unchanged and keeps running on the old mapping.
    pub fn refresh(&mut self) -> Result<RefreshReport, ElasticError> {
        let started = Instant::now();
        let old = Arc::clone(self.model());
        let levels_before = old.view().available_levels;
        let old_len = old.view().file_len;
        let mut report =
            RefreshReport { levels_before, levels_after: levels_before, bytes_verified: 0, elapsed_ms: 0.0 };
        let Some(grown) = old.reopen_grown()? else {
            report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            return Ok(report);
        };
        report.levels_after = grown.view().available_levels;
        report.bytes_verified = grown.view().file_len - old_len;
        let backend = self.backend.reopen(Arc::new(grown))?;
        let mut session = backend.session(self.submodel())?;
        let logits = if self.history.is_empty() { None } else { Some(session.prefill(&self.history)?) };
        self.backend = backend;
        self.session = session;
        self.last_logits = logits;
        report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(report)
    }

    /// Reacts to memory pressure: downshifts ([`MemoryPressure::Moderate`]: every running
    /// layer one level down, skipped layers stay skipped; [`MemoryPressure::Critical`]: every
    /// running layer at level 0, skipped layers stay skipped) with
    /// [`switch_to`](Self::switch_to); on the GPU frees the FFN buffers beyond the new
    /// prefixes ([`GpuEngine::trim_ffn`](crate::gpu::GpuEngine::trim_ffn)); then tells the OS
    /// it may drop the pages of every level above the new submodel's largest level, so the
    /// resident memory of the mapping falls.
    ///
    /// The release concerns the whole file mapping: another session of the same file that
    /// still runs higher levels stays correct (its reads fault the pages back in) but pays
    /// for it.
    pub fn on_memory_pressure(&mut self, pressure: MemoryPressure) -> Result<PressureReport, ElasticError> {
        self.on_memory_pressure_with(pressure, SwitchMode::Exact)
    }

    /// [`on_memory_pressure`](Self::on_memory_pressure) with the downshift made in `mode`.
    pub fn on_memory_pressure_with(
        &mut self,
        pressure: MemoryPressure,
        mode: SwitchMode,
    ) -> Result<PressureReport, ElasticError> {
        let target = match pressure {
            MemoryPressure::Moderate => self.submodel().step_down().unwrap_or_else(|| self.submodel().clone()),
            MemoryPressure::Critical => {
                let now = self.submodel();
                Submodel::with_skip(vec![0; now.levels.len()], now.skip.clone())
            }
        };
        let switch = self.switch_with(&target, mode)?;
        let gpu_bytes_released = match (&self.backend, &mut self.session) {
            #[cfg(feature = "gpu")]
            (Backend::Gpu(engine), BackendSession::Gpu(session)) => {
                let released = engine.trim_ffn(session.submodel())?;
                session.rebind()?;
                released
            }
            _ => 0,
        };
        let level = usize::from(self.submodel().max_level());
        let bytes_advised = self.model().release_levels_above(level)?;
        Ok(PressureReport { pressure, switch, released_above_level: level, bytes_advised, gpu_bytes_released })
    }
}

const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<ElasticSession>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(levels: &[u8]) -> Submodel {
        Submodel::new(levels.to_vec())
    }

    #[test]
    fn auto_keeps_the_cache_unless_a_layer_widens_on_a_file_not_trained_nested() {
        let (xl, s, mixed) = (sub(&[3, 3]), sub(&[0, 0]), sub(&[0, 3]));
        for nesting in [NestingOrigin::Trained, NestingOrigin::PostHoc, NestingOrigin::Unknown] {
            // Explicit modes are kept whatever the file says.
            assert_eq!(SwitchMode::Exact.resolve(&s, &xl, nesting), SwitchMode::Exact);
            assert_eq!(SwitchMode::KeepKv.resolve(&xl, &s, nesting), SwitchMode::KeepKv);
            // No layer widens: the narrow submodel reads a cache at least as good as its own.
            assert_eq!(SwitchMode::Auto.resolve(&xl, &s, nesting), SwitchMode::KeepKv);
            assert_eq!(SwitchMode::Auto.resolve(&xl, &xl, nesting), SwitchMode::KeepKv);
        }
        assert_eq!(SwitchMode::Auto.resolve(&s, &xl, NestingOrigin::Trained), SwitchMode::KeepKv);
        assert_eq!(SwitchMode::Auto.resolve(&s, &mixed, NestingOrigin::Trained), SwitchMode::KeepKv);
        for nesting in [NestingOrigin::PostHoc, NestingOrigin::Unknown] {
            assert_eq!(SwitchMode::Auto.resolve(&s, &xl, nesting), SwitchMode::Exact);
            // Mix'n'Match: one layer widening is enough to re-prefill.
            assert_eq!(SwitchMode::Auto.resolve(&xl, &sub(&[0, 3]), nesting), SwitchMode::KeepKv);
            assert_eq!(SwitchMode::Auto.resolve(&sub(&[3, 0]), &mixed, nesting), SwitchMode::Exact);
        }
        assert_eq!(SwitchMode::default(), SwitchMode::Auto);
    }

    #[test]
    fn skipping_is_narrowing_and_unskipping_an_owner_needs_exact() {
        let meta = crate::format::testing::synthetic_gemma3n_metadata();
        let all = sub(&[1; 10]);
        let mut skip = vec![false; 10];
        skip[2] = true;
        skip[7] = true;
        let skipped = Submodel::with_skip(vec![1; 10], skip);
        assert_eq!(SwitchDirection::between(&all, &skipped), SwitchDirection::Downshift);
        assert_eq!(SwitchDirection::between(&skipped, &all), SwitchDirection::Upshift);
        assert_eq!(SwitchDirection::between(&skipped, &sub(&[0; 10])), SwitchDirection::Mixed);
        // Layer 2 owns its K/V, layer 7 reads layer 5's (the last 4 layers share).
        assert_eq!(unskipped_kv_layers(&skipped, &all, &meta), vec![2]);
        assert!(unskipped_kv_layers(&all, &skipped, &meta).is_empty());
        let only_shared = Submodel::with_skip(vec![1; 10], (0..10).map(|i| i == 7).collect());
        assert!(unskipped_kv_layers(&only_shared, &all, &meta).is_empty());
        // Un-skipping widens for Auto on a file not trained nested.
        assert_eq!(SwitchMode::Auto.resolve(&only_shared, &all, NestingOrigin::PostHoc), SwitchMode::Exact);
        assert_eq!(SwitchMode::Auto.resolve(&all, &only_shared, NestingOrigin::PostHoc), SwitchMode::KeepKv);
        // A Llama-style file: every layer caches K/V.
        let llama = crate::format::testing::synthetic_metadata(16, 10, 2, 1, 8, 300, vec![vec![8, 16]], true, false);
        assert_eq!(unskipped_kv_layers(&only_shared, &all, &llama), vec![7]);
    }
}
