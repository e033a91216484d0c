//! Shared helpers of the end-to-end tests (tests/tests/*.rs): fixture paths and loaders.
//! The fixtures are described in tests/fixtures/README.md.

use std::path::PathBuf;

/// `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A fresh temporary directory under the target dir, removed by the caller's choice.
pub fn temp_dir(tag: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("matformer-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// One case of tests/fixtures/goldens.json (PyTorch float32 reference).
#[derive(Debug, serde::Deserialize)]
pub struct GoldenCase {
    /// `xl`, `s,s,m,xl`, ...
    pub name: String,
    /// FFN neurons per layer.
    pub widths: Vec<u32>,
    /// Level index per layer.
    pub levels: Vec<u8>,
    /// `logits[position][token]` of the prompt.
    pub logits: Vec<Vec<f32>>,
    /// Greedy continuation (token ids).
    pub greedy_ids: Vec<u32>,
    /// Greedy continuation as text.
    pub greedy_text: String,
}

/// tests/fixtures/goldens.json.
#[derive(Debug, serde::Deserialize)]
pub struct Goldens {
    /// Prompt text.
    pub prompt: String,
    /// BOS + prompt bytes.
    pub prompt_ids: Vec<u32>,
    /// Cases.
    pub cases: Vec<GoldenCase>,
}

/// Loads the PyTorch goldens.
pub fn goldens() -> Goldens {
    let text = std::fs::read_to_string(fixture("goldens.json")).expect("read goldens.json");
    serde_json::from_str(&text).expect("parse goldens.json")
}
