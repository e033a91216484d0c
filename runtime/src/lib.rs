//! # matformer: the on-device runtime for elastic (MatFormer) transformers
//!
//! One universal weight file (`.matf`, see `docs/format.md`) holds a MatFormer whose FFN blocks
//! are nested (Devvrit, Kudugunta, Kusupati et al., arXiv 2310.07707): the first `k` neurons of
//! every FFN form a smaller FFN. Any per-layer choice of widths ("Mix'n'Match") is a usable
//! submodel, and every submodel reads only a prefix of each FFN tensor.
//!
//! - [`Engine`] and [`Session`]: the app API (open, select, chat, stream, cancel, switch).
//! - [`format`](mod@format): parse and validate the file from a byte slice (no `unsafe`), and write it.
//! - [`quant`]: the block-quantised weight types (`q8_0`, `q4_0`, `q4_1`): encode and decode rows.
//! - [`ModelFile`]: the opened file (memory-mapped or owned bytes) plus its validated view.
//! - [`Submodel`]: a per-layer width assignment, parsed from `xl`, `s` or `0,0,1,3`.
//! - [`cpu`]: the reference engine: the test oracle and the fallback where no GPU is usable.
//! - `gpu` (feature `gpu`, on by default): the wgpu compute backend (Vulkan, Metal), checked
//!   against the CPU engine.
//! - [`tokenizer`]: tokenizers (byte-level, Hugging Face `tokenizer.json`), streaming
//!   detokenisation and chat templates.
//! - [`sampling`]: greedy and seeded sampling (temperature, top-k, top-p, min-p, penalties)
//!   on full logits or on a device's candidate list.
//! - [`backend`]: the one CPU-or-GPU abstraction the layers above use.

mod api;
pub mod backend;
pub mod cpu;
mod dims;
/// Elastic inference: the submodel catalog, device budget, policy, latency model and selection.
pub mod elastic;
pub mod format;
#[cfg(feature = "gpu")]
pub mod gpu;
mod mmap;
mod model;
pub mod quant;
pub mod sampling;
mod submodel;
pub mod tokenizer;

pub use api::{
    BackendChoice, BackendInfo, BackendKind, CancelHandle, ChatMessage, Completion, DraftCache, DraftChoice, Engine,
    EngineOptions, Error, FinishReason, GenerateOptions, GpuTuning, Input, ModelInfo, NoSink, SamplingParams, Session,
    SessionOptions, SinkControl, SpeculativeOptions, SpeculativeStats, Stats, SubmodelChoice, SwitchEvent, SwitchMode,
    TokenSink, Usage,
};
pub use model::{ModelError, ModelFile};
pub use submodel::{Submodel, SubmodelError};

/// `docs/api.md` ("Using the runtime from Rust"): its example runs as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../../docs/api.md")]
struct ApiPageExample;
