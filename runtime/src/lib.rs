//! # matformer: the on-device runtime for elastic (MatFormer) transformers
//!
//! One universal weight file (`.matf`, see `docs/format.md`) holds a MatFormer whose FFN blocks
//! are nested (Devvrit, Kudugunta, Kusupati et al., arXiv 2310.07707): the first `k` neurons of
//! every FFN form a smaller FFN. Any per-layer choice of widths ("Mix'n'Match") is a usable
//! submodel, and every submodel reads only a prefix of each FFN tensor.
//!
//! - [`format`](mod@format): parse and validate the file from a byte slice (no `unsafe`), and write it.
//! - [`ModelFile`]: the opened file (memory-mapped or owned bytes) plus its validated view.
//! - [`Submodel`]: a per-layer width assignment, parsed from `xl`, `s` or `0,0,1,3`.
//! - [`cpu`]: the reference engine: the test oracle and the fallback where no GPU is usable.
//! - `gpu` (feature `gpu`, on by default): the wgpu compute backend (Vulkan, Metal), checked
//!   against the CPU engine.
//! - [`tokenizer`]: the byte-level tokenizer.

pub mod cpu;
mod dims;
/// Elastic inference: the submodel catalog, device budget, policy, latency model and selection.
pub mod elastic;
pub mod format;
#[cfg(feature = "gpu")]
pub mod gpu;
mod mmap;
mod model;
mod submodel;
pub mod tokenizer;

pub use model::{ModelError, ModelFile};
pub use submodel::{Submodel, SubmodelError};
