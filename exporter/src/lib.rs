//! # matformer-export: the offline side of the MatFormer runtime
//!
//! Turns a trained MatFormer in ONNX (read with tract-onnx) into one universal `.matf` weight
//! file (docs/format.md) and proves the file reproduces the source: tract-onnx runs the source
//! graph, with its FFN weights sliced to each nested width, and the runtime's CPU engine runs the
//! written file; the export is refused when they disagree beyond a named tolerance.
//!
//! Imports pretrained models too ([`import`]): a GGUF file ([`gguf`]) or a Hugging Face Llama
//! directory ([`hf_import`]; Gemma 3n: [`gemma3n_import`]), optionally nested by measured neuron importance ([`nest`]).
//!
//! Also estimates the loss of every catalog entry on a calibration text ([`calibrate`], stored in
//! the file's catalog), scores a text under a submodel ([`eval`]), and makes synthetic files
//! with random weights at real model shapes (`synth`) for benchmarks.

pub mod calibrate;
pub mod dtype_plan;
pub mod eval;
pub mod export;
pub mod gemma3n_config;
pub mod gemma3n_import;
pub mod gguf;
pub mod hf_config;
pub mod hf_import;
pub mod import;
pub mod mapping;
pub mod nest;
pub mod onnx_source;
pub mod progress;
mod safetensors;
pub mod synth;
pub mod tract_run;
pub mod verify;

pub use dtype_plan::DTypePlan;
pub use export::{export, ExportOptions, ExportReport};
pub use hf_config::{HfConfig, HfConfigError};
pub use import::{import, ImportOptions, ImportReport};
pub use mapping::{NamePreset, Strategy};
pub use verify::{Tolerance, VerifyOptions, VerifyReport};
