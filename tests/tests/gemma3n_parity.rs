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
        // Only the layers that own their K/V cache it (layers 6-9 read layers 4 and 5): the
        // global layer 4 every position, the sliding ones at least the window's (they keep
        // `window - 1 + slack` after a trim).
        let tokens = g.prompt_ids.len() + v.greedy.len() - 1;
        let keep = 3 + matformer::cpu::WINDOW_SLACK.min(4);
        let positions: usize =
            (0..6).filter(|i| !v.layers_skipped.contains(i)).map(|i| if i == 4 { tokens } else { keep }).sum();
        assert!(s.kv_cache_bytes() >= positions * 2 * 32 * 4, "{}", v.name);
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

/// The sliding-window layers' caches keep only the window (plus a little slack for rollbacks)
/// whatever the context, and that changes no result: token-by-token decoding past many trims
/// gives bitwise the logits of one batched pass over the whole sequence; a rollback within the
/// slack keeps the cache; one beyond it empties the CPU session, and `ElasticSession::truncate`
/// runs its history again, with the same logits after.
#[test]
fn gemma3n_sliding_window_cache_stays_bounded_and_exact() {
    let g = goldens();
    let (model, dir) = imported(DType::F32, "g3n-window");
    let full = submodel_of(&g.variants[0], &model);
    let meta = model.metadata();
    let (window, max_ctx) = (4usize, meta.architecture.max_context as usize);
    let kv_dim = (meta.architecture.n_kv_heads * meta.architecture.head_dim) as usize;
    let mut tokens = g.prompt_ids.clone();
    tokens.extend((0..72 - tokens.len()).map(|i| ((i * 37 + 11) % 300) as u32));
    assert!(tokens.len() <= max_ctx);
    let engine = CpuEngine::new(Arc::clone(&model)).unwrap();
    let vocab = engine.session(&full).unwrap().vocab_size();

    // The reference: one batched pass (nothing is trimmed inside a call).
    let all = engine.session(&full).unwrap().forward_all(&tokens).unwrap();
    let row = |i: usize| &all[i * vocab..(i + 1) * vocab];

    let np = g.prompt_ids.len();
    let mut s = engine.session(&full).unwrap();
    same_bits(row(np - 1), &s.prefill(&tokens[..np]).unwrap(), "prefill");
    for (i, &t) in tokens.iter().enumerate().skip(np) {
        let got = s.decode(t).unwrap();
        same_bits(row(i), &got, &format!("decode at position {i}"));
    }
    // Layers 0..6 own K/V (6.. share it); layer 4 is global, the other five slide. Unbounded,
    // the six would hold every position.
    let keep = window - 1 + matformer::cpu::WINDOW_SLACK.min(window);
    let bound = (tokens.len() + 5 * (2 * keep + np)) * kv_dim * 4 * 2;
    let unbounded = 6 * tokens.len() * kv_dim * 4 * 2;
    let held = s.kv_cache_bytes();
    assert!(held <= bound, "KV cache {held} bytes, bound {bound} (unbounded {unbounded})");
    assert!(held < unbounded * 6 / 10, "KV cache {held} bytes against {unbounded} unbounded");

    // Rolling back within the slack keeps the cache.
    let n = tokens.len();
    s.truncate(n - 2);
    assert_eq!(s.position(), n - 2);
    same_bits(row(n - 2), &s.decode(tokens[n - 2]).unwrap(), "after a rollback within the slack");
    // Beyond it, the CPU session empties...
    s.truncate(40);
    assert_eq!(s.position(), 0, "a cache trimmed past position 40's window cannot go back there");

    // ... and the elastic session runs its history again.
    let mut es = ElasticSession::new(CpuEngine::new(Arc::clone(&model)).unwrap(), &full).unwrap();
    es.prefill(&tokens[..np]).unwrap();
    for &t in &tokens[np..] {
        es.decode(t).unwrap();
    }
    es.truncate(40).unwrap();
    assert_eq!((es.position(), es.history().len()), (40, 40));
    same_bits(row(40), &es.decode(tokens[40]).unwrap(), "after the history ran again");
    let _ = std::fs::remove_dir_all(&dir);
}

fn same_bits(expected: &[f32], got: &[f32], what: &str) {
    assert_eq!(expected.len(), got.len(), "{what}");
    for (j, (a, b)) in expected.iter().zip(got).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: logit {j}: {b} against {a}");
    }
}

/// A prompt longer than one prefill chunk on a long-context Gemma 3n (the `gemma-3n-tiny`
/// synth preset: window 4, context 512): the sliding-window caches are trimmed between the
/// chunks and the logits are bitwise one token at a time's; a call cancelled in its second
/// chunk (after a trim) leaves the session exactly as it was, caches included.
#[test]
fn gemma3n_long_prefill_trims_between_chunks_and_a_cancel_restores_the_window() {
    use matformer_export::synth::{synth, SynthOptions};
    let dir = temp_dir("g3n-long");
    let path = dir.join("tiny.matf");
    synth(&SynthOptions { preset: "gemma-3n-tiny".into(), layers: None, dtype: DType::F32.into(), seed: 7 }, &path)
        .unwrap();
    let model = Arc::new(ModelFile::open(&path).unwrap());
    let sub = Submodel::parse("full", model.metadata(), model.view().available_levels)
        .or_else(|_| Submodel::parse("1", model.metadata(), model.view().available_levels))
        .unwrap();
    let engine = CpuEngine::new(Arc::clone(&model)).unwrap();
    let tokens: Vec<u32> = (0..340).map(|i| ((i * 53 + 7) % 300) as u32).collect();
    let vocab = engine.session(&sub).unwrap().vocab_size();

    // One token at a time: the reference.
    let mut one = engine.session(&sub).unwrap();
    let mut rows = Vec::new();
    for &t in &tokens {
        rows.push(one.decode(t).unwrap());
    }
    // 20 tokens, then 320 in one call (two chunks, trimmed in between).
    let mut s = engine.session(&sub).unwrap();
    s.prefill(&tokens[..20]).unwrap();
    let all = s.forward_all(&tokens[20..]).unwrap();
    for (i, r) in all.chunks_exact(vocab).enumerate() {
        same_bits(&rows[20 + i], r, &format!("batched position {}", 20 + i));
    }

    // Cancelled in the second chunk: the session is as it was.
    let mut s = engine.session(&sub).unwrap();
    s.prefill(&tokens[..20]).unwrap();
    let asked = std::sync::atomic::AtomicUsize::new(0);
    // Asked before each of the 10 layers of a chunk: true in the second chunk.
    let stop = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 15;
    let err = s.prefill_until(&tokens[20..], &stop).unwrap_err();
    assert!(matches!(err, matformer::cpu::EngineError::Interrupted), "{err}");
    assert_eq!(s.position(), 20);
    for (i, &t) in tokens.iter().enumerate().skip(20).take(12) {
        same_bits(&rows[i], &s.decode(t).unwrap(), &format!("after the cancel, position {i}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
