//! Nested speculative decoding on the GPU backend (lavapipe in CI): greedy output identical to
//! the verifier alone on the same backend for every draft and both draft caches, a greedy
//! shared-cache round in one submit and one readback, a stop inside an accepted run, a cancel
//! between rounds, and sampling that stays seeded.
//!
//! No adapter: the tests print "skipping: no GPU adapter (...)" and pass, except in CI
//! (`CI=true`), where they fail.
#![cfg(feature = "gpu")]

mod gpu_common;

use std::path::PathBuf;
use std::sync::Arc;

use matformer::backend::BackendError;
use matformer::gpu::GpuEngine;
use matformer::sampling::Sampler;
use matformer::{
    BackendChoice, DraftCache, DraftChoice, Engine, EngineOptions, Error, FinishReason, GenerateOptions, Input,
    ModelFile, NoSink, SamplingParams, Session, SessionOptions, SinkControl, SpeculativeOptions, SubmodelChoice,
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/matlm.matf")
}

/// The bundled model on the GPU, or `None` (after saying why) without an adapter.
fn gpu_engine() -> Option<Engine> {
    match Engine::open(fixture(), EngineOptions { backend: BackendChoice::Gpu, ..Default::default() }) {
        Ok(e) => Some(e),
        Err(Error::Backend(BackendError::Gpu(e))) => {
            let model = Arc::new(ModelFile::open(fixture()).unwrap());
            // Same policy as the other GPU tests: skip without an adapter (not in CI).
            gpu_common::or_skip(GpuEngine::new(model, Default::default()), "GPU engine")?;
            panic!("GPU engine creation failed: {e}");
        }
        Err(e) => panic!("GPU engine creation failed: {e}"),
    }
}

fn session(engine: &Engine, submodel: &str) -> Session {
    engine.session(SessionOptions { submodel: SubmodelChoice::Named(submodel.into()), ..Default::default() }).unwrap()
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_tokens: n, ..Default::default() }
}

fn spec(draft: DraftChoice, cache: DraftCache, k: usize) -> SpeculativeOptions {
    SpeculativeOptions { draft, cache, k, max_k: 8, adaptive: true, draft_vocab: None }
}

#[test]
fn gpu_greedy_output_equals_the_verifier_alone_for_every_draft_and_cache() {
    let Some(engine) = gpu_engine() else { return };
    let layers = engine.model_info().n_layers as usize;
    let plain = session(&engine, "xl");
    let s = session(&engine, "xl");
    let mut accepted = 0;
    for prompt in ["The meaning of ", "Once upon a time", "In 1905, the "] {
        plain.reset();
        let want = plain.generate(Input::Text(prompt.into()), &greedy(40), &mut NoSink).unwrap();
        let limited = [(DraftChoice::Named("s".into()), Some(1)), (DraftChoice::Named("m".into()), Some(100))];
        for (draft, draft_vocab) in [
            (DraftChoice::Named("s".into()), None),
            (DraftChoice::Named("m".into()), None),
            (DraftChoice::Named("l".into()), None),
            (DraftChoice::Levels((0..layers).map(|i| i % 3).collect()), None),
        ]
        .into_iter()
        .chain(limited)
        {
            for cache in [DraftCache::Shared, DraftCache::Own] {
                s.reset();
                let sp = SpeculativeOptions { draft_vocab, ..spec(draft.clone(), cache, 4) };
                let o = GenerateOptions { speculative: Some(sp), ..greedy(40) };
                let c = s.generate(Input::Text(prompt.into()), &o, &mut NoSink).unwrap();
                let what = format!("{prompt:?} {draft:?} draft_vocab {draft_vocab:?} {cache:?}");
                assert_eq!(c.token_ids, want.token_ids, "{what}");
                assert_eq!(c.text, want.text, "{what}");
                assert_eq!(s.token_count(), plain.token_count(), "{what}");
                assert_eq!(c.stats.backend, "gpu");
                accepted += c.stats.speculative.unwrap().accepted;
            }
        }
    }
    assert!(accepted > 0);
}

#[test]
fn gpu_greedy_round_is_one_submit_and_one_readback() {
    let Some(engine) = gpu_engine() else { return };
    let s = session(&engine, "xl");
    for cache in [DraftCache::Shared, DraftCache::Own] {
        for draft in ["s", "m", "l"] {
            s.reset();
            let o =
                GenerateOptions { speculative: Some(spec(DraftChoice::Named(draft.into()), cache, 4)), ..greedy(48) };
            let c = s.generate(Input::Text("The meaning of ".into()), &o, &mut NoSink).unwrap();
            let st = c.stats.speculative.unwrap();
            let what = format!("{draft} {cache:?}: {st:?}");
            assert!(st.verify_passes > 3, "{what}");
            assert_eq!(st.gpu_submits, st.verify_passes as u64, "one submit per round: {what}");
            assert_eq!(st.gpu_readbacks, st.verify_passes as u64, "one readback per round: {what}");
            assert_eq!(st.draft_steps, st.proposed, "{what}");
        }
    }
}

/// The one-submit round at the `GpuSession` level: its drafts are the draft's greedy tokens
/// and its verdicts the verifier's greedy tokens after each prefix, as separate decode steps
/// give them, and the counters say one submit, one readback, `k + 1` passes.
#[test]
fn gpu_speculate_greedy_matches_separate_steps() {
    let model = Arc::new(ModelFile::open(fixture()).unwrap());
    let Some(engine) = gpu_common::or_skip(GpuEngine::new(Arc::clone(&model), Default::default()), "GPU engine") else {
        return;
    };
    let meta = model.metadata();
    let levels = model.view().available_levels;
    let xl = matformer::Submodel::parse("xl", meta, levels).unwrap();
    let prompt: Vec<u32> = "Once upon a time".bytes().map(u32::from).collect();
    for draft_name in ["s", "m"] {
        let draft = matformer::Submodel::parse(draft_name, meta, levels).unwrap();
        // The draft on the whole vocabulary, and limited to its first 100 ids.
        for (k, rows) in [(1usize, None), (3, None), (6, None), (3, Some(100)), (6, Some(100))] {
            let mut fused = engine.session(&xl).unwrap();
            let next = fused.prefill(&prompt).unwrap();
            let before = fused.counters();
            let round = fused.speculate_greedy(next, &draft, k, rows).unwrap();
            let after = fused.counters();
            assert_eq!(after.submits - before.submits, 1, "{draft_name} k={k}");
            assert_eq!(after.readbacks - before.readbacks, 1, "{draft_name} k={k}");
            assert_eq!(after.passes - before.passes, k as u64 + 1, "{draft_name} k={k}");
            assert_eq!(fused.position(), prompt.len() + k + 1);

            // The draft alone, keep-KV on the verifier's cache: its greedy tokens.
            let mut d = engine.session(&xl).unwrap();
            d.prefill(&prompt).unwrap();
            d.switch_keep_cache(&draft).unwrap();
            d.set_logit_rows(rows).unwrap();
            let mut want_drafts = Vec::new();
            let mut feed = next;
            for _ in 0..k {
                feed = d.decode(feed).unwrap();
                want_drafts.push(feed);
            }
            assert_eq!(round.drafts, want_drafts, "{draft_name} k={k} rows {rows:?}");
            if let Some(n) = rows {
                assert!(round.drafts.iter().all(|&t| (t as usize) < n), "{draft_name} k={k}: {:?}", round.drafts);
            }

            // The verifier over next and the drafts: its greedy token after each prefix.
            let mut v = engine.session(&xl).unwrap();
            v.prefill(&prompt).unwrap();
            let mut fed = vec![next];
            fed.extend_from_slice(&round.drafts);
            let rows = v.forward_all(&fed).unwrap();
            let vocab = v.vocab_size();
            let want: Vec<u32> = rows.chunks_exact(vocab).map(matformer::cpu::argmax).collect();
            assert_eq!(round.verified, want, "{draft_name} k={k}");

            // The cache the round left is the verifier's: truncated to the accepted tokens,
            // decoding continues as the verifier alone.
            let accepted = round.drafts.iter().zip(&round.verified).take_while(|(d, v)| d == v).count();
            fused.truncate(prompt.len() + 1 + accepted);
            let mut plain = engine.session(&xl).unwrap();
            plain.prefill(&prompt).unwrap();
            let mut t = next;
            for &dd in &round.drafts[..accepted] {
                assert_eq!(plain.decode(t).unwrap(), dd);
                t = dd;
            }
            let bonus = round.verified[accepted];
            assert_eq!(plain.decode(t).unwrap(), bonus);
            assert_eq!(fused.decode(bonus).unwrap(), plain.decode(bonus).unwrap(), "{draft_name} k={k}");
        }
    }
}

#[test]
fn gpu_stop_inside_a_run_and_cancel_between_rounds() {
    let Some(engine) = gpu_engine() else { return };
    let prompt = "The meaning of ";
    let full = session(&engine, "xl").generate(Input::Text(prompt.into()), &greedy(40), &mut NoSink).unwrap();
    for cache in [DraftCache::Shared, DraftCache::Own] {
        for j in [3usize, 7, 12, 20] {
            let o = GenerateOptions { stop_token_ids: vec![full.token_ids[j]], ..greedy(40) };
            let plain = session(&engine, "xl");
            let s = session(&engine, "xl");
            let want = plain.generate(Input::Text(prompt.into()), &o, &mut NoSink).unwrap();
            let so = GenerateOptions { speculative: Some(spec(DraftChoice::Auto, cache, 6)), ..o.clone() };
            let got = s.generate(Input::Text(prompt.into()), &so, &mut NoSink).unwrap();
            assert_eq!(got.token_ids, want.token_ids, "{cache:?} stop at {j}");
            assert_eq!(s.token_count(), plain.token_count());
            let next_plain = plain.generate(Input::Text(" and".into()), &greedy(12), &mut NoSink).unwrap();
            let next_o = GenerateOptions { speculative: so.speculative.clone(), ..greedy(12) };
            let next = s.generate(Input::Text(" and".into()), &next_o, &mut NoSink).unwrap();
            assert_eq!(next.token_ids, next_plain.token_ids, "{cache:?} stop at {j}: the next turn");
        }

        let s = session(&engine, "xl");
        let handle = s.cancel_handle();
        let o = GenerateOptions { speculative: Some(spec(DraftChoice::Auto, cache, 4)), ..greedy(200) };
        let mut pieces = 0;
        let c = s
            .generate(Input::Text(prompt.into()), &o, &mut |_: &str| {
                pieces += 1;
                if pieces == 4 {
                    handle.cancel();
                }
                SinkControl::Continue
            })
            .unwrap();
        assert_eq!(c.finish_reason, FinishReason::Cancelled);
        s.reset();
        let after =
            s.generate(Input::Text(prompt.into()), &GenerateOptions { max_tokens: 40, ..o.clone() }, &mut NoSink);
        assert_eq!(after.unwrap().token_ids, full.token_ids, "{cache:?}: the turn after a cancel is exact");
    }
}

#[test]
fn gpu_speculative_sampling_is_seeded() {
    let Some(engine) = gpu_engine() else { return };
    let s = session(&engine, "xl");
    let o = GenerateOptions {
        max_tokens: 30,
        sampling: SamplingParams { temperature: 0.8, top_k: 8, seed: Some(42), ..Default::default() },
        speculative: Some(spec(DraftChoice::Named("m".into()), DraftCache::Shared, 4)),
        ..Default::default()
    };
    let a = s.generate(Input::Text("Once upon a time".into()), &o, &mut NoSink).unwrap();
    s.reset();
    let b = s.generate(Input::Text("Once upon a time".into()), &o, &mut NoSink).unwrap();
    assert_eq!(a.token_ids, b.token_ids);
    let st = a.stats.speculative.unwrap();
    assert!(st.verify_passes > 0 && st.proposed > 0);
}

/// A GPU session computing the first N logits only: they are bitwise those of the whole head,
/// the rest read back as -inf, the device's argmax and sampling candidates keep to the first
/// N ids, and `None` gives the whole vocabulary again.
#[test]
fn gpu_reduced_logit_rows_are_a_prefix_of_the_whole_head() {
    let model = Arc::new(ModelFile::open(fixture()).unwrap());
    let Some(engine) = gpu_common::or_skip(GpuEngine::new(Arc::clone(&model), Default::default()), "GPU engine") else {
        return;
    };
    let xl = matformer::Submodel::parse("xl", model.metadata(), model.view().available_levels).unwrap();
    let prompt: Vec<u32> = "Once upon a time".bytes().map(u32::from).collect();
    let mut whole = engine.session(&xl).unwrap();
    let want = whole.prefill_logits(&prompt).unwrap();
    let vocab = want.len();
    for n in [1usize, 37, 100, vocab - 1] {
        let mut s = engine.session(&xl).unwrap();
        s.set_logit_rows(Some(n)).unwrap();
        assert_eq!(s.logit_rows(), n);
        let got = s.prefill_logits(&prompt).unwrap();
        assert_eq!(got.len(), vocab);
        assert_eq!(&got[..n], &want[..n], "n = {n}: the first n logits");
        assert!(got[n..].iter().all(|&x| x == f32::NEG_INFINITY), "n = {n}: -inf beyond");
        s.truncate(prompt.len() - 1);
        let top = s.prefill(&prompt[prompt.len() - 1..]).unwrap();
        assert_eq!(top, matformer::cpu::argmax(&want[..n]), "n = {n}: the device's argmax");
        s.truncate(prompt.len() - 1);
        let params = SamplingParams { temperature: 1.0, top_k: 8, ..Default::default() };
        let sampler = Sampler::new(params).unwrap();
        let c = s.prefill_candidates(&prompt[prompt.len() - 1..], 8, &sampler.logit_transform()).unwrap();
        assert_eq!(c.pairs.len(), 8.min(n), "n = {n}");
        assert!(c.pairs.iter().all(|&(t, _)| (t as usize) < n), "n = {n}: {:?}", c.pairs);
        s.set_logit_rows(None).unwrap();
        assert_eq!(s.logit_rows(), vocab);
        // The same pass shape as `want`'s (a one-token pass runs other kernels).
        s.reset();
        assert_eq!(s.prefill_logits(&prompt).unwrap(), want, "n = {n}: the whole head again");
    }
}
