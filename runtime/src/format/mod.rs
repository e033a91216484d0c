//! The universal weight file (`.matf`): layout, parser and writer. The normative description is
//! `docs/format.md`; this module implements it.
//!
//! The parser takes a byte slice, never maps files itself, uses no `unsafe` and checks every
//! offset, length, shape and dtype with checked arithmetic before anything is read.

mod meta;

pub use meta::*;
