//! # matformer-ffi: the runtime's app API for Kotlin and Swift
//!
//! A thin [uniffi](https://mozilla.github.io/uniffi-rs/) layer (proc-macro style, library mode)
//! over [`matformer::Engine`] and [`matformer::Session`]. Every type crossing the boundary is
//! owned; the two objects are `Send + Sync`; errors become Kotlin exceptions and Swift errors
//! carrying the runtime's one-line message. The generated Kotlin and Swift sources are wrapped
//! by the idiomatic packages in `bindings/android` and `bindings/ios`.
//!
//! What maps to what:
//! - [`Engine`]: `open`, backend and model info, catalog, `select`, tokenizer count, chat
//!   template, `session`, `release` (the runtime's `close`: uniffi already gives every object
//!   a `close()`/`deinit` that frees the handle, so the name differs on purpose).
//! - [`Session`]: `generate` with a foreign [`TokenListener`] for streamed text, `cancel` from
//!   any thread, `set_budget`, `set_submodel`, `on_memory_pressure`, `reset`, state getters.
//! - Records and enums mirror the runtime's ([`EngineOptions`], [`DeviceBudget`],
//!   [`GenerateOptions`], [`Completion`], ...), with sizes as `u32`/`u64`; speculative
//!   decoding is [`GenerateOptions::speculative`] in, [`Stats::speculative`] out.

use std::sync::Arc;

use matformer::elastic as el;

uniffi::setup_scaffolding!();

// ---------------------------------------------------------------------------------------------
// Errors

/// Every failure of the API, one variant per theme of the runtime's error, each with the
/// runtime's one-line message in `detail` (not `message`: that name collides with
/// `Throwable.message` in uniffi's Kotlin, mozilla/uniffi-rs#1434). The engine and its
/// sessions stay usable after any of them.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum MatformerError {
    /// An argument is out of range or malformed (sampling values, sizes, names).
    #[error("{detail}")]
    InvalidArgument {
        /// What is wrong.
        detail: String,
    },
    /// The prompt does not fit the session's context.
    #[error("{detail}")]
    ContextFull {
        /// What is wrong.
        detail: String,
        /// Tokens the call needs in the cache.
        needed: u64,
        /// The session's context length.
        limit: u64,
    },
    /// No submodel fits the budget.
    #[error("{detail}")]
    NothingFits {
        /// What is wrong.
        detail: String,
    },
    /// The model file could not be opened or read (missing, truncated, corrupt, unknown
    /// version), or the submodel or catalog in it is unusable.
    #[error("{detail}")]
    Model {
        /// What is wrong.
        detail: String,
    },
    /// The tokenizer or the chat template failed.
    #[error("{detail}")]
    Tokenizer {
        /// What is wrong.
        detail: String,
    },
    /// The CPU engine or the GPU failed, or the latency cost model could not be used.
    #[error("{detail}")]
    Backend {
        /// What is wrong.
        detail: String,
    },
    /// The engine was released (`Engine.release()`); open it again to generate.
    #[error("{detail}")]
    EngineClosed {
        /// What is wrong.
        detail: String,
    },
    /// The foreign listener threw; its error is kept in `detail`.
    #[error("{detail}")]
    Listener {
        /// What is wrong.
        detail: String,
    },
}

impl From<matformer::Error> for MatformerError {
    fn from(e: matformer::Error) -> Self {
        use matformer::Error as E;
        let detail = e.to_string();
        match e {
            E::InvalidArgument { .. } => MatformerError::InvalidArgument { detail },
            E::ContextFull { needed, limit } => {
                MatformerError::ContextFull { detail, needed: needed as u64, limit: limit as u64 }
            }
            E::NothingFits(_) => MatformerError::NothingFits { detail },
            E::Model(_) | E::Submodel(_) | E::Catalog(_) => MatformerError::Model { detail },
            E::Tokenizer(_) | E::Template(_) => MatformerError::Tokenizer { detail },
            E::Backend(_) | E::CostModel(_) => MatformerError::Backend { detail },
            E::EngineClosed => MatformerError::EngineClosed { detail },
            _ => MatformerError::Backend { detail },
        }
    }
}

impl From<uniffi::UnexpectedUniFFICallbackError> for MatformerError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        MatformerError::Listener { detail: format!("the text listener failed: {}", e.reason) }
    }
}

type Result<T> = std::result::Result<T, MatformerError>;

fn to_usize(v: u32) -> usize {
    v as usize
}

fn to_u64(v: usize) -> u64 {
    v as u64
}

fn to_u32_saturating(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Engine options and information

/// Which backend [`Engine::open`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum BackendChoice {
    /// A hardware GPU that passes the start-up self-check, otherwise the CPU engine.
    Auto,
    /// The CPU engine.
    Cpu,
    /// The GPU (any adapter, software ones included), or an error.
    Gpu,
}

/// Options of [`Engine::open`]. Defaults: automatic backend, every core, no GPU memory cap,
/// no latency cache, no full verification.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct EngineOptions {
    /// Which backend to run on (`null`: automatic).
    #[uniffi(default = None)]
    pub backend: Option<BackendChoice>,
    /// Threads of the CPU engine (`null`: every core).
    #[uniffi(default = None)]
    pub threads: Option<u32>,
    /// Cap on the GPU memory the engine allocates, bytes.
    #[uniffi(default = None)]
    pub gpu_memory_limit_bytes: Option<u64>,
    /// Directory for the per-device latency cost model (the app's cache directory).
    #[uniffi(default = None)]
    pub cache_dir: Option<String>,
    /// Check every segment's CRC at open (reads the whole file once).
    #[uniffi(default = false)]
    pub verify: bool,
}

impl From<EngineOptions> for matformer::EngineOptions {
    fn from(o: EngineOptions) -> Self {
        matformer::EngineOptions {
            backend: match o.backend.unwrap_or(BackendChoice::Auto) {
                BackendChoice::Auto => matformer::BackendChoice::Auto,
                BackendChoice::Cpu => matformer::BackendChoice::Cpu,
                BackendChoice::Gpu => matformer::BackendChoice::Gpu,
            },
            threads: o.threads.map(to_usize),
            gpu_memory_limit_bytes: o.gpu_memory_limit_bytes,
            cache_dir: o.cache_dir.map(Into::into),
            verify: o.verify,
            gpu_tuning: matformer::GpuTuning::default(),
        }
    }
}

/// CPU or GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum BackendKind {
    /// The CPU engine.
    Cpu,
    /// The wgpu compute backend.
    Gpu,
}

/// What the engine runs on and why.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct BackendInfo {
    /// CPU or GPU.
    pub kind: BackendKind,
    /// The CPU's instruction sets or the GPU adapter's name and API.
    pub device: String,
    /// One sentence: why this backend.
    pub reason: String,
}

/// The model's shape.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct ModelInfo {
    /// Model family (`"llama"`, `"matlm"`, ...).
    pub family: String,
    /// Transformer blocks.
    pub n_layers: u32,
    /// Residual stream width.
    pub d_model: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Longest context the model supports, tokens.
    pub max_context: u32,
    /// Names of the nesting levels present in the file, smallest first.
    pub level_names: Vec<String>,
    /// Size of the file, bytes.
    pub file_bytes: u64,
    /// Whether the file carries a chat template.
    pub has_chat_template: bool,
}

/// One submodel the file offers.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct CatalogEntry {
    /// Stable name (`"s"`, per-layer level names `"s,s,m,l"` with `-` for a skipped layer, or a
    /// published Gemma 3n slice such as `"e2b"`).
    pub name: String,
    /// Level index per layer (0 for a skipped layer).
    pub levels: Vec<u32>,
    /// Indices of the layers this submodel skips (elastic depth; empty: every layer runs).
    pub skipped_layers: Vec<u32>,
    /// FFN neurons per layer (0 for a skipped layer).
    pub widths: Vec<u32>,
    /// Exact bytes of the weights this submodel uses.
    pub weight_bytes: u64,
    /// Weight bytes read to decode one token.
    pub decode_bytes_per_token: u64,
    /// KV-cache bytes per token of context.
    pub kv_bytes_per_token: u64,
    /// Loss measured on the calibration text (nats per token), if evaluated.
    pub measured_loss: Option<f64>,
    /// Loss predicted by calibration (nats per token), if calibrated.
    pub predicted_loss: Option<f64>,
    /// What is known beyond the sizes: for a published Gemma 3n slice, Google's name, its
    /// effective parameters and MMLU (pretrained) as published by Google's MatFormer Lab.
    pub description: Option<String>,
}

impl From<el::CatalogEntry> for CatalogEntry {
    fn from(e: el::CatalogEntry) -> Self {
        CatalogEntry {
            name: e.name,
            levels: e.levels.levels.iter().map(|&l| u32::from(l)).collect(),
            skipped_layers: e.levels.skipped_layers().into_iter().map(to_u32_saturating).collect(),
            widths: e.widths,
            weight_bytes: e.weight_bytes,
            decode_bytes_per_token: e.decode_bytes_per_token,
            kv_bytes_per_token: e.kv_bytes_per_token,
            measured_loss: e.measured_loss,
            predicted_loss: e.predicted_loss,
            description: e.description,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Budget and plans

/// Device thermal pressure in iOS's four steps (Android's seven statuses map onto them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum ThermalState {
    /// No thermal pressure.
    Nominal,
    /// Slightly elevated.
    Fair,
    /// High; performance is being throttled.
    Serious,
    /// Critical; reduce work as much as possible.
    Critical,
}

/// The device's current budget; `null` fields are unknown (no constraint).
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct DeviceBudget {
    /// Memory the process may still use, bytes.
    #[uniffi(default = None)]
    pub available_memory_bytes: Option<u64>,
    /// Battery charge, 0 to 100.
    #[uniffi(default = None)]
    pub battery_percent: Option<u8>,
    /// Whether the device is charging.
    #[uniffi(default = None)]
    pub charging: Option<bool>,
    /// OS low-power / battery-saver mode.
    #[uniffi(default = None)]
    pub low_power_mode: Option<bool>,
    /// Thermal state.
    #[uniffi(default = None)]
    pub thermal_state: Option<ThermalState>,
    /// Largest acceptable decode time per token, ms (uses the latency cost model).
    #[uniffi(default = None)]
    pub latency_target_ms_per_token: Option<f64>,
    /// Context the session must hold, tokens (default: the model's maximum).
    #[uniffi(default = None)]
    pub context_tokens: Option<u32>,
}

impl From<DeviceBudget> for el::DeviceBudget {
    fn from(b: DeviceBudget) -> Self {
        el::DeviceBudget {
            available_memory_bytes: b.available_memory_bytes,
            battery_percent: b.battery_percent,
            charging: b.charging,
            low_power_mode: b.low_power_mode,
            thermal_state: b.thermal_state.map(|t| match t {
                ThermalState::Nominal => el::ThermalState::Nominal,
                ThermalState::Fair => el::ThermalState::Fair,
                ThermalState::Serious => el::ThermalState::Serious,
                ThermalState::Critical => el::ThermalState::Critical,
            }),
            latency_target_ms_per_token: b.latency_target_ms_per_token,
            context_tokens: b.context_tokens,
        }
    }
}

/// The submodel chosen for a budget, and why.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Plan {
    /// The chosen submodel.
    pub entry: CatalogEntry,
    /// Its memory footprint (weights, KV cache for the context, scratch), bytes.
    pub footprint_bytes: u64,
    /// Of which weights, bytes.
    pub weight_bytes: u64,
    /// Of which KV cache, bytes.
    pub kv_cache_bytes: u64,
    /// Estimated joules per decoded token.
    pub energy_per_token_joules: f64,
    /// Predicted ms per token (with a latency target).
    pub predicted_ms_per_token: Option<f64>,
    /// `"memory"`, `"energy"` or `"latency"`: what kept a larger submodel out (`null`: the
    /// largest was chosen).
    pub deciding_constraint: Option<String>,
    /// `false` when no fitting submodel met energy or latency and the closest was taken.
    pub constraints_met: bool,
    /// One paragraph: what was chosen, what decided, what the next larger would need.
    pub explanation: String,
}

impl From<el::Plan> for Plan {
    fn from(p: el::Plan) -> Self {
        Plan {
            footprint_bytes: p.footprint_bytes,
            weight_bytes: p.footprint.weight_bytes,
            kv_cache_bytes: p.footprint.kv_cache_bytes,
            energy_per_token_joules: p.energy_per_token_joules,
            predicted_ms_per_token: p.predicted_ms_per_token,
            deciding_constraint: p.deciding_constraint.map(|c| c.name().to_string()),
            constraints_met: p.constraints_met,
            explanation: p.explanation,
            entry: p.entry.into(),
        }
    }
}

/// How urgently the OS asks for memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum MemoryPressure {
    /// Shrink every layer by one level.
    Moderate,
    /// Go to the smallest submodel.
    Critical,
}

/// How a change of submodel in the middle of a conversation treats the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum SwitchMode {
    /// The default: keep the KV cache, except when a layer widens on a file whose levels were
    /// not trained nested (then re-prefill). Switch events report the mode that ran.
    Auto,
    /// Re-prefill the history with the new submodel (output exactly the new submodel's).
    Exact,
    /// Keep the KV cache the previous submodel wrote (microseconds, approximate).
    KeepKv,
}

impl From<SwitchMode> for matformer::SwitchMode {
    fn from(m: SwitchMode) -> Self {
        match m {
            SwitchMode::Auto => matformer::SwitchMode::Auto,
            SwitchMode::Exact => matformer::SwitchMode::Exact,
            SwitchMode::KeepKv => matformer::SwitchMode::KeepKv,
        }
    }
}

impl From<matformer::SwitchMode> for SwitchMode {
    fn from(m: matformer::SwitchMode) -> Self {
        match m {
            matformer::SwitchMode::Auto => SwitchMode::Auto,
            matformer::SwitchMode::Exact => SwitchMode::Exact,
            matformer::SwitchMode::KeepKv => SwitchMode::KeepKv,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions and generation

/// Which submodel a session runs.
#[derive(Clone, Debug, PartialEq, uniffi::Enum)]
pub enum SubmodelChoice {
    /// A name: a catalog entry (on a Gemma 3n E4B file `"e4b"`, `"e2b"`, `"e2.54b"`, ...), a
    /// level (`"s"`, `"xl"`), `"largest"`, or per-layer level names or indices (`-` for a
    /// skipped layer where the file allows it).
    Named {
        /// The name.
        name: String,
    },
    /// One level index per layer, and the layers to skip (elastic depth: Gemma 3n files only;
    /// empty: every layer runs).
    Levels {
        /// The levels.
        levels: Vec<u32>,
        /// Indices of the skipped layers (their levels are ignored).
        #[uniffi(default)]
        skipped_layers: Vec<u32>,
    },
    /// What `Engine.select` picks for this budget.
    Auto {
        /// The budget.
        budget: DeviceBudget,
    },
}

impl From<SubmodelChoice> for matformer::SubmodelChoice {
    fn from(c: SubmodelChoice) -> Self {
        match c {
            SubmodelChoice::Named { name } => matformer::SubmodelChoice::Named(name),
            SubmodelChoice::Levels { levels, skipped_layers } if skipped_layers.is_empty() => {
                matformer::SubmodelChoice::Levels(levels.into_iter().map(to_usize).collect())
            }
            SubmodelChoice::Levels { levels, skipped_layers } => matformer::SubmodelChoice::LevelsSkipping {
                levels: levels.into_iter().map(to_usize).collect(),
                skipped_layers: skipped_layers.into_iter().map(to_usize).collect(),
            },
            SubmodelChoice::Auto { budget } => matformer::SubmodelChoice::Auto(budget.into()),
        }
    }
}

/// Options of [`Engine::session`].
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct SessionOptions {
    /// The submodel to start with (`null`: the largest).
    #[uniffi(default = None)]
    pub submodel: Option<SubmodelChoice>,
    /// Most tokens the session holds (`null`: the model's maximum).
    #[uniffi(default = None)]
    pub context_length: Option<u32>,
    /// A system message that opens every conversation of this session.
    #[uniffi(default = None)]
    pub system_prompt: Option<String>,
    /// How a switch in the middle of a conversation treats the KV cache (`null`: auto).
    #[uniffi(default = None)]
    pub switch_mode: Option<SwitchMode>,
}

/// One message of a chat.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct ChatMessage {
    /// `"system"`, `"user"` or `"assistant"`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// What to generate from.
#[derive(Clone, Debug, PartialEq, uniffi::Enum)]
pub enum Input {
    /// Plain text appended to what the session holds (completion).
    Text {
        /// The text.
        text: String,
    },
    /// The new messages of this chat turn, rendered with the model's chat template.
    Chat {
        /// Usually one user message.
        messages: Vec<ChatMessage>,
    },
    /// Token ids of the model's vocabulary appended as they are (no tokenizer, no BOS added): a
    /// prompt tokenized elsewhere. An id outside the vocabulary fails with `InvalidArgument`.
    Tokens {
        /// The ids.
        ids: Vec<u32>,
    },
}

impl From<Input> for matformer::Input {
    fn from(i: Input) -> Self {
        match i {
            Input::Text { text } => matformer::Input::Text(text),
            Input::Chat { messages } => matformer::Input::Chat(
                messages.into_iter().map(|m| matformer::ChatMessage { role: m.role, content: m.content }).collect(),
            ),
            Input::Tokens { ids } => matformer::Input::Tokens(ids),
        }
    }
}

/// How the next token is chosen. Defaults: greedy.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct SamplingParams {
    /// Softmax temperature, `>= 0`; `0` is greedy.
    #[uniffi(default = 0.0)]
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns it off.
    #[uniffi(default = 0)]
    pub top_k: u32,
    /// Nucleus sampling threshold in `(0, 1]`; `1` turns it off.
    #[uniffi(default = 1.0)]
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, `[0, 1)`; `0` turns it off.
    #[uniffi(default = 0.0)]
    pub min_p: f32,
    /// Repetition penalty, `> 0`; `1` turns it off.
    #[uniffi(default = 1.0)]
    pub repetition_penalty: f32,
    /// Frequency penalty; `0` turns it off.
    #[uniffi(default = 0.0)]
    pub frequency_penalty: f32,
    /// Presence penalty; `0` turns it off.
    #[uniffi(default = 0.0)]
    pub presence_penalty: f32,
    /// Seed (`null`: from the clock, not reproducible).
    #[uniffi(default = None)]
    pub seed: Option<u64>,
}

/// Options of one [`Session::generate`] call.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    #[uniffi(default = 256)]
    pub max_tokens: u32,
    /// Sampling (`null`: greedy).
    #[uniffi(default = None)]
    pub sampling: Option<SamplingParams>,
    /// Generation stops when the text contains one of these (not part of the answer).
    #[uniffi(default)]
    pub stop: Vec<String>,
    /// Generation stops when one of these tokens is produced.
    #[uniffi(default)]
    pub stop_token_ids: Vec<u32>,
    /// Keep the last tokens of a prompt that does not fit (`false`: refuse it).
    #[uniffi(default = false)]
    pub truncate_prompt: bool,
    /// Speculative decoding with a nested draft submodel (`null`: off). The output is the
    /// verifier's: greedy tokens are exactly those of plain decoding, sampled ones follow the
    /// same distribution. Its counts come back in `Stats.speculative`.
    #[uniffi(default = None)]
    pub speculative: Option<SpeculativeOptions>,
}

/// Which submodel drafts for speculative decoding. It must be narrower than the submodel the
/// session runs (the verifier): no layer wider, at least one narrower; otherwise `generate`
/// fails with `InvalidArgument` (an unknown name fails like an unknown submodel, with `Model`).
#[derive(Clone, Debug, Default, PartialEq, Eq, uniffi::Enum)]
pub enum DraftChoice {
    /// The smallest submodel: every layer at the first level.
    #[default]
    Auto,
    /// A name: a catalog entry, a level (`"s"`), per-layer level names (`"s,s,m,l"`) or
    /// indices (`"0,0,1,3"`).
    Named {
        /// The name.
        name: String,
    },
    /// One level index per layer.
    Levels {
        /// The levels.
        levels: Vec<u32>,
    },
}

impl From<DraftChoice> for matformer::DraftChoice {
    fn from(c: DraftChoice) -> Self {
        match c {
            DraftChoice::Auto => matformer::DraftChoice::Auto,
            DraftChoice::Named { name } => matformer::DraftChoice::Named(name),
            DraftChoice::Levels { levels } => {
                matformer::DraftChoice::Levels(levels.into_iter().map(to_usize).collect())
            }
        }
    }
}

impl From<matformer::DraftChoice> for DraftChoice {
    fn from(c: matformer::DraftChoice) -> Self {
        match c {
            matformer::DraftChoice::Auto => DraftChoice::Auto,
            matformer::DraftChoice::Named(name) => DraftChoice::Named { name },
            matformer::DraftChoice::Levels(levels) => {
                DraftChoice::Levels { levels: levels.into_iter().map(to_u32_saturating).collect() }
            }
        }
    }
}

/// Where the speculative draft keeps its keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, uniffi::Enum)]
pub enum DraftCache {
    /// The draft runs on the verifier's own KV cache (attention and embeddings are shared by
    /// every nested submodel): no KV memory beyond the verifier's.
    #[default]
    Shared,
    /// A second KV cache written by the draft's own weights (as much KV memory again, at the
    /// draft's width; kept between turns).
    Own,
}

impl From<DraftCache> for matformer::DraftCache {
    fn from(c: DraftCache) -> Self {
        match c {
            DraftCache::Shared => matformer::DraftCache::Shared,
            DraftCache::Own => matformer::DraftCache::Own,
        }
    }
}

impl From<matformer::DraftCache> for DraftCache {
    fn from(c: matformer::DraftCache) -> Self {
        match c {
            matformer::DraftCache::Shared => DraftCache::Shared,
            matformer::DraftCache::Own => DraftCache::Own,
        }
    }
}

/// Options of speculative decoding (`GenerateOptions.speculative`): a draft submodel proposes
/// `k` tokens, the verifier checks them in one batched pass of `k + 1` tokens and keeps the
/// longest agreeing prefix plus its own next token. Defaults: the smallest submodel drafts on
/// the shared cache, `k` 4 growing up to 8. `k` 0 or `max_k` below `k` fail with
/// `InvalidArgument`.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct SpeculativeOptions {
    /// The draft submodel (`null`: `Auto`, the smallest).
    #[uniffi(default = None)]
    pub draft: Option<DraftChoice>,
    /// Where the draft keeps its KV cache (`null`: `Shared`).
    #[uniffi(default = None)]
    pub cache: Option<DraftCache>,
    /// Tokens drafted in the first round (at least 1).
    #[uniffi(default = 4)]
    pub k: u32,
    /// Most tokens drafted in a round (at least `k`).
    #[uniffi(default = 8)]
    pub max_k: u32,
    /// Grow `k` by one after a round whose every draft was accepted and shrink it by one (not
    /// below 1) after a rejection (`true`), or keep `k` fixed.
    #[uniffi(default = true)]
    pub adaptive: bool,
    /// The draft proposes only among the first `draft_vocab` token ids (`null`: the whole
    /// vocabulary): its LM head reads that many rows, a large saving on a large vocabulary.
    /// The answer stays the verifier's. 0 fails with `InvalidArgument`.
    #[uniffi(default = None)]
    pub draft_vocab: Option<u32>,
}

impl Default for SpeculativeOptions {
    fn default() -> Self {
        matformer::SpeculativeOptions::default().into()
    }
}

impl From<SpeculativeOptions> for matformer::SpeculativeOptions {
    fn from(o: SpeculativeOptions) -> Self {
        matformer::SpeculativeOptions {
            draft: o.draft.map(Into::into).unwrap_or_default(),
            cache: o.cache.map(Into::into).unwrap_or_default(),
            k: to_usize(o.k),
            max_k: to_usize(o.max_k),
            adaptive: o.adaptive,
            draft_vocab: o.draft_vocab.map(to_usize),
        }
    }
}

impl From<matformer::SpeculativeOptions> for SpeculativeOptions {
    fn from(o: matformer::SpeculativeOptions) -> Self {
        SpeculativeOptions {
            draft: Some(o.draft.into()),
            cache: Some(o.cache.into()),
            k: to_u32_saturating(o.k),
            max_k: to_u32_saturating(o.max_k),
            adaptive: o.adaptive,
            draft_vocab: o.draft_vocab.map(to_u32_saturating),
        }
    }
}

impl From<GenerateOptions> for matformer::GenerateOptions {
    fn from(o: GenerateOptions) -> Self {
        let sampling = match o.sampling {
            None => matformer::SamplingParams::default(),
            Some(s) => matformer::SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                min_p: s.min_p,
                repetition_penalty: s.repetition_penalty,
                frequency_penalty: s.frequency_penalty,
                presence_penalty: s.presence_penalty,
                seed: s.seed,
            },
        };
        matformer::GenerateOptions {
            max_tokens: to_usize(o.max_tokens),
            sampling,
            stop: o.stop,
            stop_token_ids: o.stop_token_ids,
            truncate_prompt: o.truncate_prompt,
            speculative: o.speculative.map(Into::into),
        }
    }
}

/// Receives the answer as it is generated (implemented in Kotlin or Swift). Each piece is
/// complete text: never a split UTF-8 character, never part of a stop string.
#[uniffi::export(callback_interface)]
pub trait TokenListener: Send + Sync {
    /// A new piece of text; return `false` to stop generating (finish reason `Stop`).
    fn on_text(&self, piece: String) -> bool;
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// A stop string or token was produced, or the listener asked to stop.
    Stop,
    /// `max_tokens` were generated, or the context is full.
    Length,
    /// `Session.cancel()` was called.
    Cancelled,
}

/// Token counts of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Record)]
pub struct Usage {
    /// Tokens of the whole prompt this turn.
    pub prompt_tokens: u64,
    /// Of those, tokens the cache already held.
    pub cached_prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
}

/// A change of submodel, and why.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct SwitchEvent {
    /// The submodel before.
    pub from: String,
    /// The submodel after.
    pub to: String,
    /// Why: budget, memory pressure, GPU out of memory, or an explicit request.
    pub reason: String,
    /// Exact or keep-KV.
    pub mode: SwitchMode,
    /// Generated tokens before the switch.
    pub at_token: u64,
    /// Wall time of the switch, ms.
    pub elapsed_ms: f64,
}

/// Timing and elastic behaviour of one call.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Stats {
    /// From the call to the first generated token, ms.
    pub time_to_first_token_ms: f64,
    /// Prefill wall time, ms.
    pub prefill_ms: f64,
    /// Decode wall time, ms.
    pub decode_ms: f64,
    /// Prompt tokens prefilled per second.
    pub prefill_tokens_per_s: f64,
    /// Tokens decoded per second after the first.
    pub decode_tokens_per_s: f64,
    /// The submodel that produced the last token.
    pub submodel: String,
    /// `"cpu"` or `"gpu"`.
    pub backend: String,
    /// Switches made during the call.
    pub switches: Vec<SwitchEvent>,
    /// Speculative decoding's counts, when `GenerateOptions.speculative` was set.
    pub speculative: Option<SpeculativeStats>,
}

/// What speculative decoding did in one call (`Stats.speculative`).
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct SpeculativeStats {
    /// The draft submodel's name (`"s"`, or per-layer level names).
    pub draft: String,
    /// Where the draft kept its KV cache.
    pub cache: DraftCache,
    /// The draft proposed among the first this many token ids (`null`: among all of them, with
    /// no limit or a limit at or above the vocabulary).
    pub draft_vocab: Option<u32>,
    /// Verify passes (rounds).
    pub verify_passes: u64,
    /// Tokens drafted.
    pub proposed: u64,
    /// Drafted tokens the verifier kept.
    pub accepted: u64,
    /// `accepted / proposed`, in `[0, 1]` (0 when nothing was proposed).
    pub acceptance_rate: f64,
    /// Tokens produced per verify pass: the accepted drafts plus the verifier's own token
    /// (at least 1; plain decoding is 1 per pass).
    pub tokens_per_pass: f64,
    /// Wall time of the draft steps (own cache: catch-up included), ms.
    pub draft_ms: f64,
    /// Wall time of the verify passes, ms.
    pub verify_ms: f64,
    /// Draft passes run: one per drafted token (with its own cache, a round's first pass also
    /// catches the draft up on the tokens accepted since its last round).
    pub draft_steps: u64,
    /// Tokens drafted in the last round (where the adaptive `k` ended).
    pub last_k: u64,
    /// GPU queue submits of the rounds (0 on the CPU engine).
    pub gpu_submits: u64,
    /// GPU readbacks of the rounds (each waits for the device; 0 on the CPU engine).
    pub gpu_readbacks: u64,
    /// Bytes of the draft's own KV cache at the end of the call (0 with `DraftCache.Shared`).
    pub draft_kv_bytes: u64,
}

impl From<matformer::SpeculativeStats> for SpeculativeStats {
    fn from(s: matformer::SpeculativeStats) -> Self {
        SpeculativeStats {
            draft: s.draft,
            cache: s.cache.into(),
            draft_vocab: s.draft_vocab.map(to_u32_saturating),
            verify_passes: to_u64(s.verify_passes),
            proposed: to_u64(s.proposed),
            accepted: to_u64(s.accepted),
            acceptance_rate: s.acceptance_rate,
            tokens_per_pass: s.tokens_per_pass,
            draft_ms: s.draft_ms,
            verify_ms: s.verify_ms,
            draft_steps: to_u64(s.draft_steps),
            last_k: to_u64(s.last_k),
            gpu_submits: s.gpu_submits,
            gpu_readbacks: s.gpu_readbacks,
            draft_kv_bytes: s.draft_kv_bytes,
        }
    }
}

/// The result of [`Session::generate`].
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Completion {
    /// The answer (stop string excluded).
    pub text: String,
    /// The generated token ids.
    pub token_ids: Vec<u32>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Timing and switches.
    pub stats: Stats,
}

impl From<matformer::SwitchEvent> for SwitchEvent {
    fn from(e: matformer::SwitchEvent) -> Self {
        SwitchEvent {
            from: e.from,
            to: e.to,
            reason: e.reason,
            mode: e.mode.into(),
            at_token: to_u64(e.at_token),
            elapsed_ms: e.elapsed_ms,
        }
    }
}

impl From<matformer::Completion> for Completion {
    fn from(c: matformer::Completion) -> Self {
        let s = c.stats;
        Completion {
            text: c.text,
            token_ids: c.token_ids,
            finish_reason: match c.finish_reason {
                matformer::FinishReason::Eos => FinishReason::Eos,
                matformer::FinishReason::Stop => FinishReason::Stop,
                matformer::FinishReason::Length => FinishReason::Length,
                matformer::FinishReason::Cancelled => FinishReason::Cancelled,
            },
            usage: Usage {
                prompt_tokens: to_u64(c.usage.prompt_tokens),
                cached_prompt_tokens: to_u64(c.usage.cached_prompt_tokens),
                completion_tokens: to_u64(c.usage.completion_tokens),
            },
            stats: Stats {
                time_to_first_token_ms: s.time_to_first_token_ms,
                prefill_ms: s.prefill_ms,
                decode_ms: s.decode_ms,
                prefill_tokens_per_s: s.prefill_tokens_per_s,
                decode_tokens_per_s: s.decode_tokens_per_s,
                submodel: s.submodel,
                backend: s.backend,
                switches: s.switches.into_iter().map(Into::into).collect(),
                speculative: s.speculative.map(Into::into),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Objects

/// One model file on one backend, shared by its sessions. Thread-safe.
#[derive(Debug, uniffi::Object)]
pub struct Engine {
    inner: matformer::Engine,
}

#[uniffi::export]
impl Engine {
    /// Opens `path` (a `.matf` file): maps it, checks its header and chooses the backend.
    /// Blocking (a GPU self-check may take a second): call it off the UI thread.
    #[uniffi::constructor]
    pub fn open(path: String, options: EngineOptions) -> Result<Arc<Self>> {
        Ok(Arc::new(Engine { inner: matformer::Engine::open(path, options.into())? }))
    }

    /// What the engine runs on and why.
    pub fn backend(&self) -> BackendInfo {
        let b = self.inner.backend();
        BackendInfo {
            kind: match b.kind {
                matformer::BackendKind::Cpu => BackendKind::Cpu,
                matformer::BackendKind::Gpu => BackendKind::Gpu,
            },
            device: b.device,
            reason: b.reason,
        }
    }

    /// The model's shape.
    pub fn model_info(&self) -> ModelInfo {
        let m = self.inner.model_info();
        ModelInfo {
            family: m.family,
            n_layers: m.n_layers,
            d_model: m.d_model,
            vocab_size: m.vocab_size,
            max_context: m.max_context,
            level_names: m.level_names,
            file_bytes: m.file_bytes,
            has_chat_template: m.has_chat_template,
        }
    }

    /// Every submodel the file offers, smallest first.
    pub fn catalog(&self) -> Vec<CatalogEntry> {
        self.inner.catalog().into_iter().map(Into::into).collect()
    }

    /// The best submodel for `budget`, and why.
    pub fn select(&self, budget: DeviceBudget) -> Result<Plan> {
        Ok(self.inner.select(&budget.into())?.into())
    }

    /// Tokens `text` encodes to with this model's tokenizer (no BOS).
    pub fn count_tokens(&self, text: String) -> Result<u32> {
        let ids = self.inner.tokenizer().encode(&text, false).map_err(matformer::Error::from)?;
        Ok(u32::try_from(ids.len()).unwrap_or(u32::MAX))
    }

    /// The chat template's source, when the file carries one.
    pub fn chat_template(&self) -> Option<String> {
        self.inner.chat_template()
    }

    /// A new session (empty conversation) sharing the engine's weights.
    pub fn session(&self, options: SessionOptions) -> Result<Arc<Session>> {
        let options = matformer::SessionOptions {
            submodel: options.submodel.map(Into::into).unwrap_or_default(),
            context_length: options.context_length.map(to_usize),
            system_prompt: options.system_prompt,
            switch_mode: options.switch_mode.unwrap_or(SwitchMode::Auto).into(),
        };
        Ok(Arc::new(Session { inner: self.inner.session(options)? }))
    }

    /// Releases the engine: its sessions fail with `EngineClosed` from their next token on (a
    /// generation in progress stops at the next token boundary with that error) and the
    /// weights are unmapped when the last handle goes. Idempotent.
    pub fn release(&self) {
        self.inner.close();
    }

    /// Whether [`release`](Self::release) was called.
    pub fn is_released(&self) -> bool {
        self.inner.is_closed()
    }
}

/// One conversation: its KV cache, history and submodel. Thread-safe: `generate` holds the
/// session while `cancel`, `set_budget`, `set_submodel` and `on_memory_pressure` may be called
/// from any other thread and apply at the next token boundary.
#[derive(Debug, uniffi::Object)]
pub struct Session {
    inner: matformer::Session,
}

/// Cancels one generation: made by the caller before `Session.generate` and passed to it, then
/// cancelled from any thread. Unlike `Session.cancel()`, which is a no-op while the session is
/// idle, a token cancelled before the call starts (the call waiting for the session, or its
/// thread not yet scheduled) ends that call at once, and it never stops another generation.
/// The Kotlin Flow and the Swift Task cancellation use one per call.
#[derive(Debug, Default, uniffi::Object)]
pub struct CancelToken {
    /// Shared with the runtime (`TokenSink::cancel_flag`), which reads it inside a step too.
    cancelled: Arc<std::sync::atomic::AtomicBool>,
}

#[uniffi::export]
impl CancelToken {
    /// A token not yet cancelled.
    #[uniffi::constructor]
    pub fn new() -> Arc<Self> {
        Arc::new(CancelToken::default())
    }

    /// Ends the generation given this token, stopping the step in flight (finish reason
    /// `Cancelled`), or at once if it has not started. Idempotent.
    pub fn cancel(&self) {
        self.cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Adapts the foreign listener (and the call's cancel token) to the runtime's sink.
struct ListenerSink {
    listener: Box<dyn TokenListener>,
    cancel: Option<Arc<CancelToken>>,
}

impl matformer::TokenSink for ListenerSink {
    fn on_text(&mut self, piece: &str) -> matformer::SinkControl {
        if self.listener.on_text(piece.to_string()) {
            matformer::SinkControl::Continue
        } else {
            matformer::SinkControl::Stop
        }
    }

    fn is_cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.is_cancelled())
    }

    fn cancel_flag(&self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        self.cancel.as_ref().map(|c| Arc::clone(&c.cancelled))
    }
}

#[uniffi::export]
impl Session {
    /// Generates an answer to `input`, streaming text pieces to `listener`, and returns the
    /// whole completion. Blocks until the answer ends; call it off the UI thread. `cancel`, when
    /// given, ends this call (finish reason `Cancelled`) once cancelled, even if that happened
    /// before the call began.
    pub fn generate(
        &self,
        input: Input,
        options: GenerateOptions,
        listener: Box<dyn TokenListener>,
        cancel: Option<Arc<CancelToken>>,
    ) -> Result<Completion> {
        let mut sink = ListenerSink { listener, cancel };
        Ok(self.inner.generate(input.into(), &options.into(), &mut sink)?.into())
    }

    /// Stops a running `generate`, stopping the step in flight (finish reason `Cancelled`); the
    /// session stays usable. A no-op when idle.
    pub fn cancel(&self) {
        self.inner.cancel();
    }

    /// Picks the best submodel for `budget` and switches to it at the next token boundary.
    pub fn set_budget(&self, budget: DeviceBudget) -> Result<Plan> {
        Ok(self.inner.set_budget(budget.into())?.into())
    }

    /// Switches to `choice` at the next token boundary.
    pub fn set_submodel(&self, choice: SubmodelChoice) -> Result<()> {
        Ok(self.inner.set_submodel(choice.into())?)
    }

    /// The OS asks for memory (Android `onTrimMemory`, iOS memory warning): downshift and
    /// release memory at the next token boundary.
    pub fn on_memory_pressure(&self, pressure: MemoryPressure) -> Result<()> {
        let p = match pressure {
            MemoryPressure::Moderate => el::MemoryPressure::Moderate,
            MemoryPressure::Critical => el::MemoryPressure::Critical,
        };
        Ok(self.inner.on_memory_pressure(p)?)
    }

    /// Forgets the conversation (the system prompt stays). Waits for a running generation.
    pub fn reset(&self) {
        self.inner.reset();
    }

    /// Name of the submodel running now.
    pub fn submodel(&self) -> String {
        self.inner.submodel()
    }

    /// Tokens held in the KV cache.
    pub fn token_count(&self) -> u64 {
        to_u64(self.inner.token_count())
    }

    /// The most tokens this session holds.
    pub fn context_length(&self) -> u64 {
        to_u64(self.inner.context_length())
    }

    /// The conversation so far.
    pub fn messages(&self) -> Vec<ChatMessage> {
        self.inner.messages().into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect()
    }
}

/// The runtime's version (`major.minor.patch`).
#[uniffi::export]
pub fn matformer_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}
