//! The plain data of the app API: options, inputs, results and statistics. Every type is owned
//! (no borrowed data crosses the API), so the FFI layer maps them one to one.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::backend::BackendKind;
use crate::elastic::DeviceBudget;
pub use crate::elastic::SwitchMode;
pub use crate::sampling::SamplingParams;
pub use crate::tokenizer::ChatMessage;

/// Which backend [`Engine::open`](super::Engine::open) uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// A hardware GPU that passes the start-up self-check against the CPU engine, otherwise
    /// the CPU engine. Never a software adapter (it runs on the same cores as the CPU engine,
    /// only slower). [`BackendInfo::reason`] says what was chosen and why.
    #[default]
    Auto,
    /// The CPU engine.
    Cpu,
    /// The GPU (any adapter, software ones included), or an error.
    Gpu,
}

/// Options of [`Engine::open`](super::Engine::open). `Default`: automatic backend, all cores,
/// no GPU memory cap, no latency cache, no full verification.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineOptions {
    /// Which backend to run on.
    pub backend: BackendChoice,
    /// Threads of the CPU engine (`None`: every core).
    pub threads: Option<usize>,
    /// Cap on the GPU memory the engine allocates, bytes; a session that does not fit steps
    /// every layer one level down (reported in the stats) instead of failing.
    pub gpu_memory_limit_bytes: Option<u64>,
    /// Directory for the per-device latency cost model (created when missing). `None`: no
    /// cache; a latency target then calibrates on every [`Engine::select`](super::Engine::select).
    pub cache_dir: Option<PathBuf>,
    /// Check every segment's CRC at open (reads the whole file once; default off: open reads
    /// only the header).
    pub verify: bool,
    /// GPU kernel overrides for tuning on a new device (default: none, the engine chooses).
    pub gpu_tuning: GpuTuning,
}

/// Overrides of the GPU engine's kernel choices, for tuning on a new device; each `None` keeps
/// the engine's own choice. Invalid values make [`Engine::open`](super::Engine::open) fail with
/// [`Error::InvalidArgument`](super::Error::InvalidArgument) (or a backend error naming the value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuTuning {
    /// Weight path of the matrix products: `"packed"`, `"f16"` or `"packed64"` (`None`: the
    /// fastest the adapter runs, timed at start-up).
    pub weight_path: Option<String>,
    /// Output rows per workgroup of the decode GEMV (a power of two, 1 to 64).
    pub gemv_rows: Option<u32>,
    /// Rows per thread of the packed decode GEMV (1, 2 or 4).
    pub gemv_rows_per_thread: Option<u32>,
    /// `Some(false)` turns the subgroup decode GEMV off.
    pub subgroup_gemv: Option<bool>,
}

/// What the engine runs on and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// CPU or GPU.
    pub kind: BackendKind,
    /// The CPU's instruction sets or the GPU adapter's name and API.
    pub device: String,
    /// One sentence: why this backend (self-check result, what was not used and why).
    pub reason: String,
}

/// The model's shape, for display.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// Which submodel a session runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubmodelChoice {
    /// A name: a catalog entry's name (on a Gemma 3n E4B file the published slices `"e4b"`,
    /// `"e2b"`, `"e2.54b"`, ...), a level (`"s"`, `"xl"`), `"largest"`, per-layer level names
    /// (`"s,s,m,l"`) or indices (`"0,0,1,3"`), with `-` for a skipped layer where the file
    /// allows elastic depth (`"1,1,-,-,0"`).
    Named(String),
    /// One level index per layer.
    Levels(Vec<usize>),
    /// One level index per layer and the layers to skip (elastic depth, Gemma 3n files only;
    /// a skipped layer's level is ignored).
    LevelsSkipping {
        /// One level index per layer.
        levels: Vec<usize>,
        /// Indices of the skipped layers.
        skipped_layers: Vec<usize>,
    },
    /// What [`Engine::select`](super::Engine::select) picks for this budget.
    Auto(DeviceBudget),
}

impl Default for SubmodelChoice {
    fn default() -> Self {
        SubmodelChoice::Named("largest".into())
    }
}

/// Options of [`Engine::session`](super::Engine::session).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionOptions {
    /// The submodel to start with.
    pub submodel: SubmodelChoice,
    /// Most tokens the session holds (prompt, history and answers); `None` or more than the
    /// model's maximum: the model's maximum.
    pub context_length: Option<usize>,
    /// A system message that opens every conversation of this session (chat input).
    pub system_prompt: Option<String>,
    /// How a change of submodel in the middle of a conversation treats the KV cache. The
    /// default, [`SwitchMode::Auto`], keeps the cache unless a layer widens on a file whose
    /// levels were not trained nested.
    pub switch_mode: SwitchMode,
}

/// What to generate from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// Plain text, appended to what the session holds (completion).
    Text(String),
    /// The new messages of this chat turn (usually one user message). The session keeps the
    /// earlier turns and its own answers, renders the whole conversation with the model's
    /// chat template and prefills only the tokens its cache does not hold yet.
    Chat(Vec<ChatMessage>),
    /// Token ids of the model's vocabulary, appended to what the session holds as they are (no
    /// tokenizer, no BOS added): for a prompt tokenized elsewhere, or one that is not text.
    Tokens(Vec<u32>),
}

/// Options of one [`Session::generate`](super::Session::generate) call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How the next token is chosen (default: greedy).
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these; the stop string is not part of
    /// the answer and is never streamed.
    pub stop: Vec<String>,
    /// Generation stops when one of these tokens is produced (the model's end-of-generation
    /// tokens always stop it).
    pub stop_token_ids: Vec<u32>,
    /// Refuse a prompt that does not fit the session's context (`false`, default) or keep its
    /// last tokens (`true`, the start of the conversation is dropped).
    pub truncate_prompt: bool,
    /// Speculative decoding with a nested draft (`None`, default: off). The output is the
    /// verifier's: greedy tokens are exactly those of plain decoding, sampled ones follow the
    /// same distribution.
    pub speculative: Option<SpeculativeOptions>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            truncate_prompt: false,
            speculative: None,
        }
    }
}

/// Which submodel drafts for speculative decoding. Every choice must be narrower than the
/// submodel the session runs (the verifier): no layer wider, at least one narrower.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftChoice {
    /// The smallest submodel: every layer at the first level (the cheapest draft; on the
    /// bundled model also the fastest end to end, see `docs/api.md`).
    #[default]
    Auto,
    /// A name: a catalog entry, a level (`"s"`), per-layer level names (`"s,s,m,l"`) or
    /// indices (`"0,0,1,3"`).
    Named(String),
    /// One level index per layer.
    Levels(Vec<usize>),
}

/// Where the draft keeps its keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftCache {
    /// The draft runs on the verifier's own KV cache: attention and embeddings are shared by
    /// every nested submodel, so for every accepted token it reads the entries the verifier
    /// wrote, and it writes only its `k` speculative entries, which the verify pass
    /// overwrites. No KV memory beyond the verifier's.
    #[default]
    Shared,
    /// The textbook draft: a second KV cache, written by the draft's own weights and caught up
    /// on the accepted tokens at the start of each round (as much KV memory again, at the
    /// draft's width; it is kept between turns).
    Own,
}

impl DraftCache {
    /// `"shared"` or `"own"`.
    pub fn name(self) -> &'static str {
        match self {
            DraftCache::Shared => "shared",
            DraftCache::Own => "own",
        }
    }
}

/// Options of speculative decoding ([`GenerateOptions::speculative`]): a draft submodel
/// proposes `k` tokens, the verifier checks them in one batched pass of `k + 1` tokens and
/// keeps the longest agreeing prefix plus its own next token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpeculativeOptions {
    /// The draft submodel.
    pub draft: DraftChoice,
    /// Where the draft keeps its KV cache.
    pub cache: DraftCache,
    /// Tokens drafted in the first round (at least 1).
    pub k: usize,
    /// Most tokens drafted in a round (at least `k`).
    pub max_k: usize,
    /// Grow `k` by one after a round whose every draft was accepted and shrink it by one
    /// (not below 1) after a rejection (`true`, default), or keep `k` fixed.
    pub adaptive: bool,
    /// The draft proposes only among the first `n` token ids (`None`, default: the whole
    /// vocabulary). Its LM head then reads `n` rows instead of the vocabulary's, the largest
    /// product of a narrow draft step on a large vocabulary (a Llama-3.2-1B-shaped draft step
    /// reads the 128,256-row head). Tokenizers number their tokens roughly from the most
    /// frequent, so a draft limited to the first 16k-32k ids still proposes most of what the
    /// verifier says; a token beyond them is never drafted, the verifier supplies it. The
    /// output stays exactly the verifier's (greedy) or its distribution (sampling). At least
    /// 1; a value at or above the vocabulary is the whole vocabulary.
    pub draft_vocab: Option<usize>,
}

impl Default for SpeculativeOptions {
    fn default() -> Self {
        SpeculativeOptions {
            draft: DraftChoice::Auto,
            cache: DraftCache::Shared,
            k: 4,
            max_k: 8,
            adaptive: true,
            draft_vocab: None,
        }
    }
}

/// What speculative decoding did in one call ([`Stats::speculative`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpeculativeStats {
    /// The draft submodel's name.
    pub draft: String,
    /// Where the draft kept its KV cache.
    pub cache: DraftCache,
    /// The draft's vocabulary ([`SpeculativeOptions::draft_vocab`]) as it ran: it proposed
    /// among the first this many token ids; `None` when among all of them (no limit, or a limit
    /// at or above the vocabulary).
    pub draft_vocab: Option<usize>,
    /// Verify passes (rounds).
    pub verify_passes: usize,
    /// Tokens drafted.
    pub proposed: usize,
    /// Drafted tokens the verifier kept.
    pub accepted: usize,
    /// `accepted / proposed` (0 when nothing was proposed).
    pub acceptance_rate: f64,
    /// Tokens produced per verify pass: the accepted drafts plus the verifier's own token.
    pub tokens_per_pass: f64,
    /// Wall time of the draft steps (own cache: catch-up included), ms.
    pub draft_ms: f64,
    /// Wall time of the verify passes, ms.
    pub verify_ms: f64,
    /// Draft passes run: one per drafted token (with its own cache, a round's first pass also
    /// catches the draft up on the tokens accepted since its last round).
    pub draft_steps: usize,
    /// Tokens drafted in the last round (the adaptive `k` where it ended).
    pub last_k: usize,
    /// GPU queue submits of the rounds (draft steps and verify passes, the draft's own session
    /// included; 0 on the CPU engine). Greedy with a shared cache: one per round.
    pub gpu_submits: u64,
    /// GPU readbacks of the rounds (each waits for the device). Greedy with a shared cache: one
    /// per round.
    pub gpu_readbacks: u64,
    /// Bytes of the draft's own KV cache at the end of the call (0 with
    /// [`DraftCache::Shared`]: the draft writes its `k` entries into the verifier's cache,
    /// where the verify pass overwrites them).
    pub draft_kv_bytes: u64,
}

/// What a [`TokenSink`] wants after a piece of text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SinkControl {
    /// Keep generating.
    Continue,
    /// Stop now (finish reason [`FinishReason::Stop`]).
    Stop,
}

/// Receives the answer as it is generated: each piece is complete text (never a split UTF-8
/// character, never a prefix of a stop string that may still complete).
pub trait TokenSink: Send {
    /// A new piece of text.
    fn on_text(&mut self, piece: &str) -> SinkControl;

    /// Polled before every prefill pass and decode step: `true` ends the generation as
    /// [`FinishReason::Cancelled`], exactly as [`Session::cancel`](super::Session::cancel) does.
    /// Unlike that call, which is a no-op while the session is idle, this belongs to one
    /// generation: a cancel made before the call starts (while it waits for the session, say)
    /// is not lost, and it can never stop another generation. The bindings' per-call cancel
    /// tokens use it.
    fn is_cancelled(&self) -> bool {
        false
    }

    /// The flag behind [`is_cancelled`](Self::is_cancelled), when it is one: the generation
    /// then also reads it in the middle of a step (before every layer on the CPU, every
    /// 0.5 ms while waiting for the GPU), so that a cancel does not wait for the step to end,
    /// as with [`Session::cancel`](super::Session::cancel). Without it (the default) the sink
    /// is asked between steps only.
    fn cancel_flag(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
        None
    }
}

impl<F: FnMut(&str) -> SinkControl + Send> TokenSink for F {
    fn on_text(&mut self, piece: &str) -> SinkControl {
        self(piece)
    }
}

/// A sink that drops the text (the [`Completion`] still holds it).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSink;

impl TokenSink for NoSink {
    fn on_text(&mut self, _piece: &str) -> SinkControl {
        SinkControl::Continue
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// A stop string or stop token was produced, or the sink asked to stop.
    Stop,
    /// `max_tokens` were generated, or the context is full.
    Length,
    /// [`Session::cancel`](super::Session::cancel) was called.
    Cancelled,
}

impl FinishReason {
    /// Lower-case name (`"eos"`).
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Token counts of one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the whole prompt this turn (conversation so far, rendered).
    pub prompt_tokens: usize,
    /// Of those, tokens the cache already held from earlier turns (not prefilled again).
    pub cached_prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// A change of submodel during a call, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwitchEvent {
    /// The submodel before.
    pub from: String,
    /// The submodel after.
    pub to: String,
    /// Why: the budget's plan, a memory-pressure signal, a GPU out-of-memory step-down, or
    /// an explicit request.
    pub reason: String,
    /// The mode the switch ran in: exact (re-prefill) or keep-KV, never `Auto` (which
    /// resolves per switch, see [`SwitchMode::resolve`]).
    pub mode: SwitchMode,
    /// Generated tokens before the switch (0: before the first token).
    pub at_token: usize,
    /// Wall time of the switch, re-prefill included, ms.
    pub elapsed_ms: f64,
}

/// Timing and elastic behaviour of one call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// From the call to the first generated token, ms (prefill included).
    pub time_to_first_token_ms: f64,
    /// Prefill wall time, ms.
    pub prefill_ms: f64,
    /// Decode wall time (every token after the first), ms.
    pub decode_ms: f64,
    /// Prompt tokens prefilled per second (tokens taken from the cache excluded).
    pub prefill_tokens_per_s: f64,
    /// Tokens decoded per second after the first.
    pub decode_tokens_per_s: f64,
    /// The submodel that produced the last token.
    pub submodel: String,
    /// `"cpu"` or `"gpu"`.
    pub backend: String,
    /// Switches made during the call.
    pub switches: Vec<SwitchEvent>,
    /// Speculative decoding's counts, when it was on.
    pub speculative: Option<SpeculativeStats>,
}

/// The result of [`Session::generate`](super::Session::generate).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The answer (stop string excluded).
    pub text: String,
    /// The generated token ids (end-of-generation token included when it ended the call).
    pub token_ids: Vec<u32>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Timing and switches.
    pub stats: Stats,
}
