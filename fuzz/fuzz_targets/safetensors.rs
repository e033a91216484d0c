//! Fuzz target for the safetensors container parser (exporter/src/safetensors.rs), compiled
//! here on its own (it needs only serde_json), so the fuzz build does not pull in tract.
//!
//! `parse_safetensors` must never panic, never read out of bounds and never allocate beyond
//! what the input holds; whatever it accepts must be self-consistent: each tensor's bytes are
//! exactly its shape times its element size, inside the input, and tensors do not overlap.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../exporter/src/safetensors.rs"]
mod safetensors;

fuzz_target!(|data: &[u8]| {
    let Ok(tensors) = safetensors::parse_safetensors(data) else { return };
    let base = data.as_ptr() as usize;
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for t in tensors.values() {
        let start = t.data.as_ptr() as usize - base;
        assert!(start + t.data.len() <= data.len());
        let elems: usize = t.shape.iter().product();
        let width = match t.dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        };
        assert_eq!(elems * width, t.data.len());
        if !t.data.is_empty() {
            spans.push((start, start + t.data.len()));
        }
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "overlap");
    }
});
