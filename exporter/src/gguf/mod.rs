//! GGUF import: the container reader, ggml dequantisation, the Llama tensor mapping and the
//! tokenizer rebuilt from the metadata.
//!
//! The reader is our own rather than a crate: it parses from a borrowed slice (a memory map)
//! with every offset, size and count checked before use and a bounded allocation per input
//! byte, which the GGUF crates we looked at do not promise for hostile input (they read through
//! `std::io::Read` and trust counts for allocation); `reader.rs` and `dequant.rs` only need
//! `half` and `thiserror`, so the fuzz target compiles them without tract.

pub mod dequant;
pub mod gemma3n;
pub mod llama;
pub mod reader;
pub mod tokenizer;

pub use reader::{GgmlType, Gguf, GgufError, TensorInfo, Value};
pub use tokenizer::ImportedTokenizer;
