//! The universal weight file (`.matf`): layout, parser and writer. The normative description is
//! `docs/format.md`; this module implements it.
//!
//! The parser takes a byte slice, never maps files itself, uses no `unsafe` and checks every
//! offset, length, shape and dtype with checked arithmetic before anything is read.
//!
//! - [`FileView::parse`] validates the header (O(header)); [`FileView::verify`] checks every
//!   segment checksum and every padding byte (O(file)).
//! - [`plan_layout`] and [`write_file`] compute the layout and stream a file out.
//! - [`required_tensor_specs`] is the canonical tensor list of an architecture.
//! - [`testing`] builds synthetic models for tests and tools.

mod error;
pub mod gemma3n;
mod layout;
mod meta;
mod parser;
pub mod testing;
mod writer;

pub use error::FormatError;
pub use gemma3n::{g3n_names, Gemma3nConfig, GEMMA3N_FAMILY, GEMMA3N_KEY};
pub use layout::{
    required_tensor_specs, BlobInfo, BlobSpec, DType, Segment, TensorInfo, TensorSpec, BLOB_CODE, BLOB_PREFIX,
    DEFAULT_ALIGNMENT_LOG2, MAGIC, MAX_ALIGNMENT_LOG2, MAX_BLOB_ID_LEN, MAX_BLOB_LEN, MAX_DIM, MAX_HEADER_LEN,
    MAX_LAYERS, MAX_LEVELS, MAX_NAME_LEN, MAX_NDIM, MAX_TENSORS, MAX_TENSOR_ELEMENTS, MIN_ALIGNMENT_LOG2, PREAMBLE_LEN,
    QK, TOKENIZER_JSON_BLOB, VERSION,
};
pub use meta::*;
pub use parser::FileView;
pub use writer::{
    plan_layout, plan_layout_with_alignment, plan_layout_with_blobs, write_file, write_file_with_alignment,
    write_file_with_blobs,
};
