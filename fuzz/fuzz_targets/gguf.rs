//! Fuzz target for the GGUF reader (exporter/src/gguf/reader.rs) and ggml dequantisation
//! (dequant.rs), compiled here on their own (they need only `half` and `thiserror`), so the
//! fuzz build does not pull in tract.
//!
//! `Gguf::parse` must never panic, never read out of bounds and never allocate beyond what the
//! input can hold; on whatever it accepts, every tensor's bytes must be reachable and
//! dequantise (to a bounded buffer) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

// At the crate root, so the modules' `super::` paths resolve as in the exporter's `gguf` module.
#[allow(dead_code)]
#[path = "../../exporter/src/gguf/dequant.rs"]
mod dequant;
#[allow(dead_code)]
#[path = "../../exporter/src/gguf/reader.rs"]
mod reader;

use reader::Gguf;

/// Largest tensor the target dequantises (elements), so huge declared tensors in a small
/// input do not make the fuzzer allocate gigabytes.
const MAX_DEQUANT_ELEMS: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::parse(data) else { return };
    for t in &g.tensors {
        if let Ok((_, bytes)) = g.tensor_bytes(t) {
            assert!(bytes.len() as u64 == t.byte_len);
            if t.n_elements() <= MAX_DEQUANT_ELEMS {
                let _ = g.dequantize(t);
            }
        }
    }
    for v in g.metadata.values() {
        let _ = (v.as_u64(), v.as_f64(), v.as_str(), v.as_bool(), v.as_array().map(|a| a.len()));
    }
});
