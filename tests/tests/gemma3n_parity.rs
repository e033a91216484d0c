//! Gemma 3n on the CPU engine against transformers' `Gemma3nForCausalLM` (float32): the tiny
//! random checkpoint of tests/fixtures/gemma3n_tiny_hf (made by
//! exporter/python/make_gemma3n_fixture.py) imported with `matformer import`, and its goldens:
//! logits of every prompt position and 8 greedy tokens for the full model, an E2B-style slice
//! (layers 6 and 7 skipped inside the KV-sharing range, every FFN at half width), a MatFormer
//! Lab-style slice (layer 2 skipped, mixed widths) and a Mix'n'Match width pattern. The slices'
//! references are new transformers models built by MatFormer Lab's slicing of the PyTorch
//! weights (the script says how); here the same slices run on the one imported file.

use std::path::PathBuf;
use std::sync::Arc;

use matformer::cpu::CpuEngine;
use matformer::elastic::ElasticSession;
use matformer::format::DType;
use matformer::{ModelFile, Submodel};
use matformer_export::verify::Tolerance;
use matformer_export::{import, ImportOptions};
use matformer_tests::temp_dir;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

#[derive(serde::Deserialize)]
struct Variant {
    name: String,
    layers_skipped: Vec<usize>,
    /// Per original layer; 0 for a skipped layer.
    ffn_widths: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Goldens {
    prompt_ids: Vec<u32>,
    variants: Vec<Variant>,
}

fn goldens() -> Goldens {
    serde_json::from_str(&std::fs::read_to_string(fixture("gemma3n_tiny_goldens.json")).unwrap()).unwrap()
}

/// The variant as a submodel of the imported file: a skipped layer is `-`, a kept one the
/// level whose width it uses.
fn submodel_of(v: &Variant, model: &ModelFile) -> Submodel {
    let meta = model.metadata();
    let spec: Vec<String> = (0..v.ffn_widths.len())
        .map(|i| {
            if v.layers_skipped.contains(&i) {
                "-".to_string()
            } else {
                let level = meta.ffn_widths[i].iter().position(|&w| w == v.ffn_widths[i]).expect("a level's width");
                level.to_string()
            }
        })
        .collect();
    Submodel::parse(&spec.join(","), meta, model.view().available_levels).unwrap()
}

fn imported(dtype: DType, tag: &str) -> (Arc<ModelFile>, PathBuf) {
    let dir = temp_dir(tag);
    let out = dir.join("gemma3n-tiny.matf");
    import(&ImportOptions { input: fixture("gemma3n_tiny_hf"), output: out.clone(), dtype: dtype.into(), nest: None })
        .unwrap();
    (Arc::new(ModelFile::open(&out).unwrap()), dir)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits of every prompt position and 8 greedy tokens decoded one at a time through the KV
/// cache (past the sliding window of 4), for each variant. The fixture's weights are
/// f16-representable, so an f16 file holds exactly the source weights and both dtypes meet
/// the f32 bound: what remains is f32 arithmetic in another order (`Tolerance::F32_STORAGE`,
/// relative to the largest reference logit).
fn check_parity(dtype: DType, tag: &str) {
    let g = goldens();
    let (model, dir) = imported(dtype, tag);
    let engine = CpuEngine::new(Arc::clone(&model)).unwrap();
    for v in &g.variants {
        let sub = submodel_of(v, &model);
        let ours = engine.session(&sub).unwrap().forward_all(&g.prompt_ids).unwrap();
        let reference: Vec<f32> = v.logits.iter().flatten().copied().collect();
        assert_eq!(ours.len(), reference.len(), "{}", v.name);
        let scale = reference.iter().fold(1f32, |m, x| m.max(x.abs()));
        let diff = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{dtype} {:<10} {}: max|diff| {diff:.2e} (scale {scale:.2})", v.name, sub.name(model.metadata()));
        assert!(diff <= Tolerance::F32_STORAGE.bound * scale, "{}: {diff}", v.name);

        let mut s = engine.session(&sub).unwrap();
        let mut next = argmax(&s.prefill(&g.prompt_ids).unwrap());
        let mut got = Vec::new();
        for _ in 0..v.greedy.len() {
            got.push(next);
            next = argmax(&s.decode(next).unwrap());
        }
        assert_eq!(got, v.greedy, "{}: greedy tokens", v.name);
        // Only the layers that own their K/V cache it (layers 6-9 read layers 4 and 5).
        let kv_layers = (0..6).filter(|i| !v.layers_skipped.contains(i)).count();
        let tokens = g.prompt_ids.len() + v.greedy.len() - 1;
        assert!(s.kv_cache_bytes() >= kv_layers * 2 * tokens * 32 * 4, "{}", v.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gemma3n_f32_matches_transformers() {
    check_parity(DType::F32, "g3n-parity-f32");
}

#[test]
fn gemma3n_f16_matches_transformers() {
    check_parity(DType::F16, "g3n-parity-f16");
}

/// Mid-generation switches full -> E2B-style -> Lab-style -> full (exact re-prefill, no
/// reload): after each switch the greedy tokens are exactly those the target submodel alone
/// produces on the same history.
#[test]
fn gemma3n_switches_give_the_targets_tokens() {
    let g = goldens();
    let (model, dir) = imported(DType::F16, "g3n-switch");
    let by_name = |n: &str| submodel_of(g.variants.iter().find(|v| v.name == n).unwrap(), &model);
    let plan = [by_name("full"), by_name("e2b_style"), by_name("lab_style"), by_name("full")];
    let engine = CpuEngine::new(Arc::clone(&model)).unwrap();
    let mut es = ElasticSession::new(CpuEngine::new(Arc::clone(&model)).unwrap(), &plan[0]).unwrap();
    let mut next = argmax(&es.prefill(&g.prompt_ids).unwrap());
    assert_eq!(next, g.variants[0].greedy[0]);
    for (step, sub) in plan.iter().enumerate() {
        if step > 0 {
            let report = es.switch_to(sub).unwrap();
            // What the target alone says after the same tokens.
            let mut alone = engine.session(sub).unwrap();
            next = argmax(&alone.prefill(es.history()).unwrap());
            let mut expected = Vec::new();
            let mut e = next;
            for _ in 0..3 {
                expected.push(e);
                e = argmax(&alone.decode(e).unwrap());
            }
            let mut got = Vec::new();
            let logits = report.last_logits.expect("a switch re-prefills and keeps the last logits");
            assert_eq!(argmax(&logits), next, "the re-prefill's last logits");
            let mut t = next;
            for _ in 0..3 {
                got.push(t);
                t = argmax(&es.decode(t).unwrap());
            }
            assert_eq!(got, expected, "after switching to {}", sub.name(model.metadata()));
            next = t;
        } else {
            for _ in 0..3 {
                next = argmax(&es.decode(next).unwrap());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
