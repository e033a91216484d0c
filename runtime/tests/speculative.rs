//! Nested speculative decoding through the app API on the bundled model (CPU engine): greedy
//! output identical to the verifier alone for every draft (s, m, l, a Mix'n'Match entry) and
//! both draft caches; end-of-generation by stop token, stop string and `max_tokens` inside an
//! accepted run, with the session's next turn still exact; cancel between rounds; and
//! chi-square tests that speculative sampling keeps the verifier's distribution, on the
//! sampler with known logits and end to end on the model.

use std::path::PathBuf;
use std::sync::Arc;

use matformer::cpu::CpuEngine;
use matformer::sampling::{Sampler, SamplingParams, Verdict};
use matformer::{
    BackendChoice, DraftCache, DraftChoice, Engine, EngineOptions, Error, FinishReason, GenerateOptions, Input,
    ModelFile, NoSink, Session, SessionOptions, SinkControl, SpeculativeOptions, Submodel, SubmodelChoice,
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/matlm.matf")
}

fn cpu_engine() -> Engine {
    Engine::open(fixture(), EngineOptions { backend: BackendChoice::Cpu, ..Default::default() }).unwrap()
}

fn session(engine: &Engine, submodel: &str) -> Session {
    engine.session(SessionOptions { submodel: SubmodelChoice::Named(submodel.into()), ..Default::default() }).unwrap()
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_tokens: n, ..Default::default() }
}

fn spec(draft: DraftChoice, cache: DraftCache, k: usize, adaptive: bool) -> SpeculativeOptions {
    SpeculativeOptions { draft, cache, k, max_k: 8.max(k), adaptive, draft_vocab: None }
}

fn with_spec(o: GenerateOptions, s: SpeculativeOptions) -> GenerateOptions {
    GenerateOptions { speculative: Some(s), ..o }
}

const PROMPTS: &[&str] = &["The meaning of ", "Once upon a time", "In 1905, the ", "She said: \"", "Q"];

/// Every draft narrower than xl: the three smaller levels and a Mix'n'Match entry (levels
/// 0, 1, 2 cycling over the layers).
fn drafts(engine: &Engine) -> Vec<DraftChoice> {
    let layers = engine.model_info().n_layers as usize;
    vec![
        DraftChoice::Named("s".into()),
        DraftChoice::Named("m".into()),
        DraftChoice::Named("l".into()),
        DraftChoice::Levels((0..layers).map(|i| i % 3).collect()),
        DraftChoice::Auto,
    ]
}

#[test]
fn greedy_output_equals_the_verifier_alone_for_every_draft_and_cache() {
    let engine = cpu_engine();
    let plain = session(&engine, "xl");
    let s = session(&engine, "xl");
    let mut accepted = 0;
    for prompt in PROMPTS {
        plain.reset();
        let want = plain.generate(Input::Text((*prompt).into()), &greedy(48), &mut NoSink).unwrap();
        for draft in drafts(&engine) {
            for cache in [DraftCache::Shared, DraftCache::Own] {
                for (k, adaptive) in [(4, true), (1, false), (3, false), (8, true)] {
                    s.reset();
                    let mut streamed = String::new();
                    let o = with_spec(greedy(48), spec(draft.clone(), cache, k, adaptive));
                    let c = s
                        .generate(Input::Text((*prompt).into()), &o, &mut |p: &str| {
                            streamed.push_str(p);
                            SinkControl::Continue
                        })
                        .unwrap();
                    let what = format!("{prompt:?} draft {draft:?} {cache:?} k {k} adaptive {adaptive}");
                    assert_eq!(c.token_ids, want.token_ids, "{what}");
                    assert_eq!(c.text, want.text, "{what}");
                    assert_eq!(streamed, want.text, "{what}");
                    assert_eq!(c.finish_reason, want.finish_reason, "{what}");
                    assert_eq!(s.token_count(), plain.token_count(), "{what}: the cache holds the same tokens");
                    let st = c.stats.speculative.as_ref().expect("speculative stats");
                    assert!(st.verify_passes > 0 && st.accepted <= st.proposed, "{what}: {st:?}");
                    assert!(st.tokens_per_pass >= 1.0 && st.tokens_per_pass <= 9.0, "{what}: {st:?}");
                    assert_eq!(st.cache, cache);
                    accepted += st.accepted;
                }
            }
        }
    }
    assert!(accepted > 0, "the nested drafts agree with the verifier at least sometimes");
}

/// The CPU engine computing the first N logits only: bitwise the whole head's, -inf beyond,
/// for one token and for a batch; `None` gives the whole vocabulary again.
#[test]
fn cpu_reduced_logit_rows_are_a_prefix_of_the_whole_head() {
    let model = Arc::new(ModelFile::open(fixture()).unwrap());
    let xl = Submodel::parse("xl", model.metadata(), model.view().available_levels).unwrap();
    let cpu = CpuEngine::new(Arc::clone(&model)).unwrap();
    let prompt: Vec<u32> = "Once upon a time".bytes().map(u32::from).collect();
    let want = cpu.session(&xl).unwrap().forward_all(&prompt).unwrap();
    let vocab = want.len() / prompt.len();
    for n in [0usize, 1, 37, vocab - 1, vocab, vocab + 5] {
        let mut s = cpu.session(&xl).unwrap();
        s.set_logit_rows(Some(n));
        let rows = n.clamp(1, vocab);
        assert_eq!(s.logit_rows(), rows);
        let got = s.forward_all(&prompt).unwrap();
        for (w, g) in want.chunks_exact(vocab).zip(got.chunks_exact(vocab)) {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&g[..rows]), bits(&w[..rows]), "n = {n}");
            assert!(g[rows..].iter().all(|&x| x == f32::NEG_INFINITY), "n = {n}");
        }
        s.set_logit_rows(None);
        s.truncate(prompt.len() - 1);
        let last = s.decode(prompt[prompt.len() - 1]).unwrap();
        assert_eq!(last, want[(prompt.len() - 1) * vocab..], "n = {n}: the whole head again");
    }
}

/// A draft limited to the first N token ids: the output is still exactly the verifier's, for
/// both caches, with N = 1 (the draft always proposes id 0), a part of the byte range, the
/// whole vocabulary and more; a draft limited to one id is accepted only where the verifier
/// says that id.
#[test]
fn a_reduced_draft_vocabulary_keeps_greedy_output_exact() {
    let engine = cpu_engine();
    let vocab = engine.model_info().vocab_size as usize;
    let plain = session(&engine, "xl");
    let s = session(&engine, "xl");
    for prompt in ["The meaning of ", "Once upon a time", "She said: \""] {
        plain.reset();
        let want = plain.generate(Input::Text(prompt.into()), &greedy(40), &mut NoSink).unwrap();
        let mut accepted = Vec::new();
        for n in [Some(1), Some(100), Some(vocab), Some(vocab + 1000), None] {
            for cache in [DraftCache::Shared, DraftCache::Own] {
                s.reset();
                let sp = SpeculativeOptions { draft_vocab: n, ..spec(DraftChoice::Named("s".into()), cache, 4, true) };
                let c = s.generate(Input::Text(prompt.into()), &with_spec(greedy(40), sp), &mut NoSink).unwrap();
                let what = format!("{prompt:?} draft_vocab {n:?} {cache:?}");
                assert_eq!(c.token_ids, want.token_ids, "{what}");
                assert_eq!(s.token_count(), plain.token_count(), "{what}");
                let st = c.stats.speculative.unwrap();
                // The stats say the limit as it ran: none at or above the vocabulary.
                assert_eq!(st.draft_vocab, n.filter(|&n| n < vocab), "{what}");
                if n == Some(1) {
                    let zeros = want.token_ids.iter().filter(|&&t| t == 0).count();
                    assert!(st.accepted <= zeros, "{what}: {} accepted, id 0 said {zeros} times", st.accepted);
                }
                accepted.push((n, cache, st.accepted));
            }
        }
        // At or above the vocabulary, the draft is the unrestricted one: the same rounds.
        let by = |n: Option<usize>, c: DraftCache| accepted.iter().find(|a| a.0 == n && a.1 == c).unwrap().2;
        for cache in [DraftCache::Shared, DraftCache::Own] {
            assert_eq!(by(Some(vocab), cache), by(None, cache), "{prompt:?} {cache:?}");
            assert_eq!(by(Some(vocab + 1000), cache), by(None, cache), "{prompt:?} {cache:?}");
        }
    }
}

#[test]
fn the_auto_draft_is_the_smallest_submodel_and_a_wider_draft_is_refused() {
    let engine = cpu_engine();
    let s = session(&engine, "l");
    let o = with_spec(greedy(8), SpeculativeOptions::default());
    let c = s.generate(Input::Text("The ".into()), &o, &mut NoSink).unwrap();
    assert_eq!(c.stats.speculative.unwrap().draft, "s");
    for bad in ["l", "xl"] {
        let o = with_spec(greedy(8), spec(DraftChoice::Named(bad.into()), DraftCache::Shared, 4, true));
        let e = s.generate(Input::Text("The ".into()), &o, &mut NoSink).expect_err("not narrower");
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    }
    let zero_k = with_spec(greedy(8), SpeculativeOptions { k: 0, ..SpeculativeOptions::default() });
    assert!(s.generate(Input::Text("The ".into()), &zero_k, &mut NoSink).is_err());
    let small_max = with_spec(greedy(8), SpeculativeOptions { k: 4, max_k: 2, ..SpeculativeOptions::default() });
    assert!(s.generate(Input::Text("The ".into()), &small_max, &mut NoSink).is_err());
    let no_vocab = with_spec(greedy(8), SpeculativeOptions { draft_vocab: Some(0), ..SpeculativeOptions::default() });
    let e = s.generate(Input::Text("The ".into()), &no_vocab, &mut NoSink).expect_err("draft_vocab 0");
    assert!(matches!(&e, Error::InvalidArgument { .. }) && e.to_string().contains("draft_vocab"), "{e}");
    // The session still works.
    assert_eq!(s.generate(Input::Text("The ".into()), &greedy(4), &mut NoSink).unwrap().usage.completion_tokens, 4);
}

/// Runs `o` with and without speculation on fresh sessions, then a second Text turn on each:
/// the answers, finish reasons, held tokens and the next turns must be equal.
fn same_with_and_without(engine: &Engine, prompt: &str, o: &GenerateOptions, cache: DraftCache, what: &str) {
    let plain = session(engine, "xl");
    let s = session(engine, "xl");
    let want = plain.generate(Input::Text(prompt.into()), o, &mut NoSink).unwrap();
    let so = with_spec(o.clone(), spec(DraftChoice::Named("s".into()), cache, 6, true));
    let mut streamed = String::new();
    let got = s
        .generate(Input::Text(prompt.into()), &so, &mut |p: &str| {
            streamed.push_str(p);
            SinkControl::Continue
        })
        .unwrap();
    assert_eq!(got.token_ids, want.token_ids, "{what}");
    assert_eq!(got.text, want.text, "{what}");
    assert_eq!(streamed, want.text, "{what}");
    assert_eq!(got.finish_reason, want.finish_reason, "{what}");
    assert_eq!(s.token_count(), plain.token_count(), "{what}");
    let next_plain = plain.generate(Input::Text(" and".into()), &greedy(16), &mut NoSink).unwrap();
    let next =
        s.generate(Input::Text(" and".into()), &with_spec(greedy(16), so.speculative.clone().unwrap()), &mut NoSink);
    assert_eq!(next.unwrap().token_ids, next_plain.token_ids, "{what}: the next turn");
}

#[test]
fn max_tokens_stop_tokens_and_stop_strings_inside_an_accepted_run() {
    let engine = cpu_engine();
    let prompt = "The meaning of ";
    let full = session(&engine, "xl").generate(Input::Text(prompt.into()), &greedy(60), &mut NoSink).unwrap();
    for cache in [DraftCache::Shared, DraftCache::Own] {
        // Every length: most end inside an accepted run of up to k + 1 tokens.
        for n in 1..=40 {
            let what = format!("{cache:?} max_tokens {n}");
            same_with_and_without(&engine, prompt, &greedy(n), cache, &what);
        }
        // A stop token at each position of the answer (its first occurrence ends it).
        for j in 1..40 {
            let t = full.token_ids[j];
            let o = GenerateOptions { stop_token_ids: vec![t], ..greedy(60) };
            same_with_and_without(&engine, prompt, &o, cache, &format!("{cache:?} stop token {t} (position {j})"));
        }
        // Stop strings starting at each character of the answer.
        let text = &full.text;
        for start in 1..text.len().min(50) {
            if !text.is_char_boundary(start) || !text.is_char_boundary((start + 3).min(text.len())) {
                continue;
            }
            let stop = text[start..(start + 3).min(text.len())].to_string();
            let o = GenerateOptions { stop: vec![stop.clone()], ..greedy(60) };
            same_with_and_without(&engine, prompt, &o, cache, &format!("{cache:?} stop string {stop:?}"));
        }
    }
}

#[test]
fn the_sink_stopping_inside_an_accepted_run_ends_the_answer_there() {
    let engine = cpu_engine();
    for cache in [DraftCache::Shared, DraftCache::Own] {
        for after in 1..20 {
            let run = |s: &Session, o: &GenerateOptions| {
                let mut pieces = 0;
                s.generate(Input::Text("Once upon a time".into()), o, &mut |_: &str| {
                    pieces += 1;
                    if pieces >= after {
                        SinkControl::Stop
                    } else {
                        SinkControl::Continue
                    }
                })
                .unwrap()
            };
            let plain = session(&engine, "xl");
            let s = session(&engine, "xl");
            let want = run(&plain, &greedy(60));
            let got = run(&s, &with_spec(greedy(60), spec(DraftChoice::Named("m".into()), cache, 5, true)));
            assert_eq!(got.token_ids, want.token_ids, "{cache:?} stop after {after} pieces");
            assert_eq!(got.finish_reason, FinishReason::Stop);
            assert_eq!(s.token_count(), plain.token_count());
        }
    }
}

#[test]
fn cancel_between_rounds_leaves_the_session_usable() {
    let engine = cpu_engine();
    for cache in [DraftCache::Shared, DraftCache::Own] {
        let s = session(&engine, "xl");
        let handle = s.cancel_handle();
        let o = with_spec(greedy(200), spec(DraftChoice::Named("s".into()), cache, 4, true));
        let mut pieces = 0;
        let c = s
            .generate(Input::Text("The meaning of ".into()), &o, &mut |_: &str| {
                pieces += 1;
                if pieces == 5 {
                    handle.cancel();
                }
                SinkControl::Continue
            })
            .unwrap();
        assert_eq!(c.finish_reason, FinishReason::Cancelled, "{cache:?}");
        let n = c.usage.completion_tokens;
        assert!((5..200).contains(&n), "{cache:?}: {n} tokens");
        // The answer so far is the verifier's, and the cache holds it (but its last token).
        let plain = session(&engine, "xl");
        let want = plain.generate(Input::Text("The meaning of ".into()), &greedy(n), &mut NoSink).unwrap();
        assert_eq!(c.token_ids, want.token_ids, "{cache:?}");
        assert_eq!(s.token_count(), plain.token_count(), "{cache:?}");
        // The next turn continues exactly, with and without speculation.
        let next = s.generate(Input::Text(" and".into()), &o, &mut NoSink).unwrap();
        let next_plain = plain.generate(Input::Text(" and".into()), &greedy(200), &mut NoSink).unwrap();
        assert_eq!(next.token_ids, next_plain.token_ids, "{cache:?}");
        s.reset();
        let fresh = s.generate(Input::Text("The ".into()), &o, &mut NoSink).unwrap();
        plain.reset();
        assert_eq!(
            fresh.token_ids,
            plain.generate(Input::Text("The ".into()), &greedy(200), &mut NoSink).unwrap().token_ids
        );
    }
}

#[test]
fn a_chat_turn_after_speculation_reuses_the_cache() {
    let engine = cpu_engine();
    let user = |t: &str| Input::Chat(vec![matformer::ChatMessage { role: "user".into(), content: t.into() }]);
    for cache in [DraftCache::Shared, DraftCache::Own] {
        let plain = session(&engine, "xl");
        let s = session(&engine, "xl");
        let o = with_spec(greedy(24), spec(DraftChoice::Auto, cache, 4, true));
        for turn in ["The meaning of ", " A word", " Then"] {
            let want = plain.generate(user(turn), &greedy(24), &mut NoSink).unwrap();
            let got = s.generate(user(turn), &o, &mut NoSink).unwrap();
            assert_eq!(got.token_ids, want.token_ids, "{cache:?} {turn:?}");
            assert_eq!(got.usage, want.usage, "{cache:?} {turn:?}");
        }
    }
}

/// Upper critical values of the chi-square distribution at significance 0.001, by degrees of
/// freedom (1 to 20; NIST/SEMATECH e-Handbook, table 1.3.6.7.4).
const CHI2_CRIT_0_001: [f64; 20] = [
    10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.125, 27.877, 29.588, 31.264, 32.909, 34.528, 36.123,
    37.697, 39.252, 40.790, 42.312, 43.820, 45.315,
];

/// Pearson's chi-square of `counts` against `probs` (cells whose expected count is under 5
/// are pooled into one); returns the statistic and the degrees of freedom.
fn chi_square(counts: &[u64], probs: &[f64]) -> (f64, usize) {
    let n: u64 = counts.iter().sum();
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let mut pooled = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(probs) {
        let e = p * n as f64;
        if e >= 5.0 {
            cells.push((c as f64, e));
        } else {
            assert!(p > 0.0 || c == 0, "a token of probability 0 was drawn");
            pooled.0 += c as f64;
            pooled.1 += e;
        }
    }
    if pooled.1 > 0.0 {
        cells.push(pooled);
    }
    let stat = cells.iter().map(|&(o, e)| (o - e) * (o - e) / e).sum();
    (stat, cells.len() - 1)
}

fn softmax_of(logits: &[f32], params: SamplingParams) -> Vec<f64> {
    Sampler::new(params).unwrap().probabilities(logits).iter().map(|&p| p as f64).collect()
}

/// Speculative sampling with known verifier and draft logits: over many seeded trials the
/// token that results (the kept draft or its replacement) follows the verifier's
/// distribution, at significance 0.001, for several temperatures and truncations, including
/// drafts that put mass where the verifier has none.
#[test]
fn speculative_sampling_keeps_the_verifier_distribution_chi_square() {
    let p_logits = [2.0f32, 1.5, 0.3, -0.5, 1.0, -2.0, 0.8, 0.0];
    let q_logits = [0.5f32, 2.2, 1.0, 0.7, -1.0, 0.3, 0.8, -0.4];
    let cases = [
        SamplingParams { temperature: 1.0, seed: Some(1), ..Default::default() },
        SamplingParams { temperature: 0.7, top_k: 4, seed: Some(2), ..Default::default() },
        SamplingParams { temperature: 1.3, top_p: 0.8, seed: Some(3), ..Default::default() },
        SamplingParams { temperature: 1.0, min_p: 0.2, seed: Some(4), ..Default::default() },
    ];
    let trials = 200_000;
    // Each case also with a draft limited to the first 5 ids (a reduced draft vocabulary: the
    // other ids' logits are -inf, so the draft never proposes them and the residual supplies
    // them).
    let mut reduced = q_logits;
    reduced[5..].fill(f32::NEG_INFINITY);
    for (params, q_logits) in cases.into_iter().flat_map(|c| [(c, q_logits), (c, reduced)]) {
        let verifier = Sampler::new(params).unwrap();
        let p = verifier.probabilities(&p_logits);
        // The draft samples with no truncation, so it proposes tokens the verifier excludes.
        let q = Sampler::new(SamplingParams { top_k: 0, top_p: 1.0, min_p: 0.0, ..params })
            .unwrap()
            .probabilities(&q_logits);
        let mut main = Sampler::new(params).unwrap();
        let mut counts = vec![0u64; p.len()];
        let mut accepted = 0;
        for _ in 0..trials {
            let mut draft = main.fork();
            let x = draft.sample_distribution(&q);
            let t = match main.speculative_verdict(&p, &q, x) {
                Verdict::Accepted => {
                    accepted += 1;
                    x
                }
                Verdict::Rejected(t) => t,
            };
            counts[t as usize] += 1;
        }
        let probs: Vec<f64> = p.iter().map(|&v| v as f64).collect();
        let (stat, df) = chi_square(&counts, &probs);
        let crit = CHI2_CRIT_0_001[df - 1];
        println!("{params:?}: chi2 = {stat:.2}, df = {df}, critical {crit} at 0.001; accepted {accepted} of {trials}");
        assert!(stat < crit, "{params:?}: chi2 {stat:.2} >= {crit} (df {df})");
        for (t, &c) in counts.iter().enumerate() {
            if p[t] == 0.0 {
                assert_eq!(c, 0, "token {t} is outside the verifier's set");
            }
        }
        // The acceptance rate is sum(min(p, q)) (Leviathan et al., eq. 1), within 5 standard errors.
        let alpha: f64 = p.iter().zip(&q).map(|(&a, &b)| a.min(b) as f64).sum();
        let rate = accepted as f64 / trials as f64;
        let se = (alpha * (1.0 - alpha) / trials as f64).sqrt();
        assert!((rate - alpha).abs() < 5.0 * se, "acceptance {rate} against {alpha}");
    }
}

/// [`Sampler::probabilities`] is the distribution [`Sampler::sample_logits`] draws from.
#[test]
fn probabilities_match_what_the_sampler_draws_chi_square() {
    let logits = [2.0f32, 1.5, 0.3, -0.5, 1.0, -2.0, 0.8, 0.0];
    for params in [
        SamplingParams { temperature: 0.9, seed: Some(7), ..Default::default() },
        SamplingParams { temperature: 1.0, top_k: 3, seed: Some(8), ..Default::default() },
        SamplingParams { temperature: 1.0, top_p: 0.7, min_p: 0.1, seed: Some(9), ..Default::default() },
    ] {
        let mut s = Sampler::new(params).unwrap();
        let probs = softmax_of(&logits, params);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        let mut counts = vec![0u64; logits.len()];
        for _ in 0..100_000 {
            counts[s.sample_logits(&logits) as usize] += 1;
        }
        let (stat, df) = chi_square(&counts, &probs);
        assert!(stat < CHI2_CRIT_0_001[df - 1], "{params:?}: chi2 {stat:.2} df {df}");
    }
    let g = Sampler::new(SamplingParams::greedy()).unwrap().probabilities(&logits);
    assert_eq!(g[0], 1.0);
    assert_eq!(g.iter().sum::<f32>(), 1.0);
}

/// End to end on the bundled model: the second token of speculative sampling (the first is
/// the prefill's, the second the verdict on one drafted token) over many seeds follows
/// `p(t1) p(t2 | t1)` computed from the CPU engine's logits, at significance 0.001.
#[test]
fn speculative_sampling_end_to_end_chi_square() {
    let engine = cpu_engine();
    let params = SamplingParams { temperature: 1.0, top_k: 4, ..Default::default() };
    let prompt = "Once upon a time";
    let tokens = engine.tokenizer().encode(prompt, true).unwrap();
    // Exact probabilities of the first two tokens under xl.
    let model = Arc::new(ModelFile::open(fixture()).unwrap());
    let xl = Submodel::parse("xl", model.metadata(), model.view().available_levels).unwrap();
    let cpu = CpuEngine::new(Arc::clone(&model)).unwrap();
    let mut e = cpu.session(&xl).unwrap();
    let first = Sampler::new(params).unwrap().probabilities(&e.prefill(&tokens).unwrap());
    let mut joint = Vec::new();
    for (t1, &p1) in first.iter().enumerate() {
        if p1 == 0.0 {
            continue;
        }
        e.truncate(tokens.len());
        let second = Sampler::new(params).unwrap().probabilities(&e.decode(t1 as u32).unwrap());
        for (t2, &p2) in second.iter().enumerate() {
            if p2 > 0.0 {
                joint.push(((t1 as u32, t2 as u32), p1 as f64 * p2 as f64));
            }
        }
    }
    for cache in [DraftCache::Shared, DraftCache::Own] {
        let s = session(&engine, "xl");
        let runs = 6000u64;
        let mut counts = vec![0u64; joint.len()];
        let mut accepted = 0;
        for seed in 0..runs {
            s.reset();
            let o = GenerateOptions {
                max_tokens: 3,
                sampling: SamplingParams { seed: Some(seed), ..params },
                speculative: Some(spec(DraftChoice::Named("s".into()), cache, 4, true)),
                ..Default::default()
            };
            let c = s.generate(Input::Text(prompt.into()), &o, &mut NoSink).unwrap();
            let pair = (c.token_ids[0], c.token_ids[1]);
            let i = joint.iter().position(|&(p, _)| p == pair).expect("a pair of positive probability");
            counts[i] += 1;
            accepted += c.stats.speculative.unwrap().accepted;
        }
        let probs: Vec<f64> = joint.iter().map(|&(_, p)| p).collect();
        let (stat, df) = chi_square(&counts, &probs);
        let crit = CHI2_CRIT_0_001[df - 1];
        println!(
            "{cache:?}: chi2 = {stat:.2}, df = {df}, critical {crit} at 0.001; drafts accepted {accepted} of {runs}"
        );
        assert!(stat < crit, "{cache:?}: chi2 {stat:.2} >= {crit} (df {df})");
        assert!(accepted > 0 && accepted < runs as usize, "both verdicts occur");
    }
}
