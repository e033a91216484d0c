//! The FFI layer in Rust: conversions both ways, error mapping and cancellation through the
//! exported objects (the Kotlin and Swift suites test the same through the generated code).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use matformer_ffi::*;

fn matlm() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/matlm.matf");
    p.to_string_lossy().into_owned()
}

fn cpu() -> EngineOptions {
    EngineOptions {
        backend: Some(BackendChoice::Cpu),
        threads: Some(1),
        gpu_memory_limit_bytes: None,
        cache_dir: None,
        verify: true,
    }
}

fn session_options(submodel: Option<SubmodelChoice>) -> SessionOptions {
    SessionOptions { submodel, context_length: Some(256), system_prompt: None, switch_mode: None }
}

fn greedy(max_tokens: u32) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: None,
        stop: vec![],
        stop_token_ids: vec![],
        truncate_prompt: false,
        speculative: None,
    }
}

fn text(s: &str) -> Input {
    Input::Text { text: s.into() }
}

/// Collects streamed pieces; `stop_after` pieces then asks to stop.
struct Collect {
    pieces: Arc<std::sync::Mutex<Vec<String>>>,
    stop_after: Option<usize>,
}

impl TokenListener for Collect {
    fn on_text(&self, piece: String) -> bool {
        let mut p = self.pieces.lock().unwrap();
        p.push(piece);
        self.stop_after.is_none_or(|n| p.len() < n)
    }
}

fn collect(stop_after: Option<usize>) -> (Box<Collect>, Arc<std::sync::Mutex<Vec<String>>>) {
    let pieces = Arc::new(std::sync::Mutex::new(Vec::new()));
    (Box::new(Collect { pieces: Arc::clone(&pieces), stop_after }), pieces)
}

#[test]
fn open_describe_select_generate() {
    let engine = Engine::open(matlm(), cpu()).unwrap();
    assert_eq!(engine.backend().kind, BackendKind::Cpu);
    let info = engine.model_info();
    assert_eq!(info.level_names, ["s", "m", "l", "xl"]);
    let catalog = engine.catalog();
    assert!(catalog.len() >= 4, "{} entries", catalog.len());
    assert!(catalog.iter().all(|e| e.levels.len() == info.n_layers as usize));
    assert!(catalog.iter().all(|e| e.skipped_layers.is_empty() && e.description.is_none()));
    // Elastic depth is a Gemma 3n feature: skipping a layer of this MatLM file is refused.
    let levels = vec![0; info.n_layers as usize];
    match engine
        .session(session_options(Some(SubmodelChoice::Levels { levels: levels.clone(), skipped_layers: vec![1] })))
    {
        Err(MatformerError::Model { detail }) => assert!(detail.contains("does not allow skipping layers"), "{detail}"),
        other => panic!("a skipped layer on a MatLM file: {:?}", other.map(|_| ())),
    }
    engine
        .session(session_options(Some(SubmodelChoice::Levels { levels, skipped_layers: vec![] })))
        .expect("levels without skips");

    let everything = DeviceBudget {
        available_memory_bytes: None,
        battery_percent: None,
        charging: None,
        low_power_mode: None,
        thermal_state: None,
        latency_target_ms_per_token: None,
        context_tokens: Some(256),
    };
    let plan = engine.select(everything.clone()).unwrap();
    assert_eq!(plan.entry.name, "xl");
    assert!(plan.footprint_bytes >= plan.weight_bytes + plan.kv_cache_bytes);
    let hot = DeviceBudget { thermal_state: Some(ThermalState::Critical), ..everything };
    let cool_plan = engine.select(hot).unwrap();
    assert!(cool_plan.entry.weight_bytes < plan.entry.weight_bytes, "{}", cool_plan.explanation);

    let session = engine.session(session_options(Some(SubmodelChoice::Named { name: "m".into() }))).unwrap();
    assert_eq!(session.submodel(), "m");
    let (listener, pieces) = collect(None);
    let done = session.generate(text("The "), greedy(12), listener, None).unwrap();
    assert_eq!(done.finish_reason, FinishReason::Length);
    assert_eq!(done.usage.completion_tokens, 12);
    assert_eq!(pieces.lock().unwrap().concat(), done.text);
    assert_eq!(done.stats.submodel, "m");
    // The last generated token is not in the cache yet: the next call feeds it.
    assert_eq!(session.token_count(), done.usage.prompt_tokens + 11);

    // The same greedy call on the runtime directly gives the same tokens.
    let direct = matformer::Engine::open(
        matlm(),
        matformer::EngineOptions { backend: matformer::BackendChoice::Cpu, threads: Some(1), ..Default::default() },
    )
    .unwrap();
    let ds = direct
        .session(matformer::SessionOptions {
            submodel: matformer::SubmodelChoice::Named("m".into()),
            context_length: Some(256),
            ..Default::default()
        })
        .unwrap();
    let want = ds
        .generate(
            matformer::Input::Text("The ".into()),
            &matformer::GenerateOptions { max_tokens: 12, ..Default::default() },
            &mut matformer::NoSink,
        )
        .unwrap();
    assert_eq!(done.token_ids, want.token_ids);
}

#[test]
fn listener_stop_budget_switch_and_pressure() {
    let engine = Engine::open(matlm(), cpu()).unwrap();
    let session = engine.session(session_options(None)).unwrap();
    let (listener, pieces) = collect(Some(3));
    let done = session.generate(text("Once upon a time"), greedy(50), listener, None).unwrap();
    assert_eq!(done.finish_reason, FinishReason::Stop);
    assert_eq!(pieces.lock().unwrap().len(), 3);

    let budget = DeviceBudget {
        available_memory_bytes: None,
        battery_percent: Some(5),
        charging: Some(false),
        low_power_mode: Some(true),
        thermal_state: None,
        latency_target_ms_per_token: None,
        context_tokens: Some(256),
    };
    let plan = session.set_budget(budget).unwrap();
    assert_ne!(plan.entry.name, "xl", "{}", plan.explanation);
    assert_eq!(session.submodel(), plan.entry.name);
    session.on_memory_pressure(MemoryPressure::Critical).unwrap();
    let (listener, _) = collect(None);
    let done = session.generate(text(" and"), greedy(4), listener, None).unwrap();
    assert_eq!(done.stats.submodel, "s");
    assert!(done.stats.switches.iter().any(|s| s.reason.contains("memory")), "{:?}", done.stats.switches);
}

#[test]
fn errors_map_to_their_kind_with_the_message() {
    match Engine::open("/nonexistent/model.matf".into(), cpu()) {
        Err(MatformerError::Model { detail }) => assert!(detail.contains("/nonexistent/model.matf"), "{detail}"),
        other => panic!("{other:?}"),
    }
    let engine = Engine::open(matlm(), cpu()).unwrap();
    match engine.session(session_options(Some(SubmodelChoice::Named { name: "huge".into() }))) {
        Err(MatformerError::Model { detail }) => assert!(detail.contains("huge"), "{detail}"),
        other => panic!("{other:?}"),
    }
    let tiny = DeviceBudget {
        available_memory_bytes: Some(1000),
        battery_percent: None,
        charging: None,
        low_power_mode: None,
        thermal_state: None,
        latency_target_ms_per_token: None,
        context_tokens: None,
    };
    assert!(matches!(engine.select(tiny), Err(MatformerError::NothingFits { .. })));
    let bad = GenerateOptions {
        sampling: Some(SamplingParams {
            temperature: -1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: Some(1),
        }),
        ..greedy(4)
    };
    let session = engine.session(session_options(None)).unwrap();
    let (listener, _) = collect(None);
    assert!(matches!(session.generate(text("x"), bad, listener, None), Err(MatformerError::InvalidArgument { .. })));
    let long = "a".repeat(600);
    let (listener, _) = collect(None);
    match session.generate(text(&long), greedy(4), listener, None) {
        Err(MatformerError::ContextFull { needed, limit, .. }) => assert!(needed > limit && limit == 256),
        other => panic!("{other:?}"),
    }
    // Still usable after every error.
    let (listener, _) = collect(None);
    assert_eq!(session.generate(text("ok"), greedy(2), listener, None).unwrap().usage.completion_tokens, 2);
    engine.release();
    assert!(engine.is_released());
    let (listener, _) = collect(None);
    assert!(matches!(session.generate(text("x"), greedy(2), listener, None), Err(MatformerError::EngineClosed { .. })));
}

/// Cancels from the listener's thread of control on a second thread once streaming began.
#[test]
fn cancel_from_another_thread_returns_promptly_and_keeps_the_session() {
    let engine = Engine::open(matlm(), cpu()).unwrap();
    let session = engine.session(session_options(None)).unwrap();
    struct Count(Arc<AtomicUsize>);
    impl TokenListener for Count {
        fn on_text(&self, _piece: String) -> bool {
            self.0.fetch_add(1, Ordering::SeqCst);
            true
        }
    }
    let seen = Arc::new(AtomicUsize::new(0));
    let canceller = {
        let session = Arc::clone(&session);
        let seen = Arc::clone(&seen);
        std::thread::spawn(move || {
            while seen.load(Ordering::SeqCst) < 2 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let t = Instant::now();
            session.cancel();
            t
        })
    };
    let done = session.generate(text("Once"), greedy(200), Box::new(Count(Arc::clone(&seen))), None).unwrap();
    let cancelled_at = canceller.join().unwrap();
    let returned_after = cancelled_at.elapsed();
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert!(done.usage.completion_tokens < 200);
    // Generous bound: a decode step of the bundled model takes about a millisecond; under a
    // loaded CI machine it is still far below this.
    assert!(returned_after < Duration::from_secs(2), "{returned_after:?}");
    let (listener, _) = collect(None);
    assert_eq!(session.generate(text(" again"), greedy(3), listener, None).unwrap().usage.completion_tokens, 3);
}

/// A per-call token: cancelled before the call, the call ends at once with nothing generated;
/// cancelled during it, the call ends within a step; a token never reaches another call.
#[test]
fn cancel_token_before_and_during_the_call() {
    let engine = Engine::open(matlm(), cpu()).unwrap();
    let session = engine.session(session_options(None)).unwrap();
    let token = CancelToken::new();
    token.cancel();
    assert!(token.is_cancelled());
    let (listener, pieces) = collect(None);
    let done = session.generate(text("Once"), greedy(200), listener, Some(Arc::clone(&token))).unwrap();
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert_eq!(done.usage.completion_tokens, 0);
    assert!(pieces.lock().unwrap().is_empty());
    assert_eq!(session.token_count(), 0);

    let token = CancelToken::new();
    let canceller = {
        let token = Arc::clone(&token);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            token.cancel();
        })
    };
    let (listener, _) = collect(None);
    let done = session.generate(text("Once"), greedy(100_000), listener, Some(token)).unwrap();
    canceller.join().unwrap();
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    // The next call has a fresh token and runs to its length.
    let (listener, _) = collect(None);
    let next = session.generate(text(" again"), greedy(3), listener, Some(CancelToken::new())).unwrap();
    assert_eq!(next.finish_reason, FinishReason::Length);
}

fn speculative(draft: DraftChoice, cache: DraftCache, k: u32, adaptive: bool) -> SpeculativeOptions {
    SpeculativeOptions { draft: Some(draft), cache: Some(cache), k, max_k: 8.max(k), adaptive, draft_vocab: None }
}

/// Greedy speculative decoding through the FFI gives the verifier's tokens exactly, for named,
/// automatic and per-layer drafts on both caches, with sane counts in `Stats.speculative`.
#[test]
fn greedy_speculative_output_equals_plain_decoding_with_sane_stats() {
    let engine = Engine::open(matlm(), cpu()).unwrap();
    let n_layers = engine.model_info().n_layers;
    let plain = engine.session(session_options(None)).unwrap();
    let spec = engine.session(session_options(None)).unwrap();
    let drafts = [
        DraftChoice::Named { name: "s".into() },
        DraftChoice::Named { name: "m".into() },
        DraftChoice::Auto,
        DraftChoice::Levels { levels: (0..n_layers).map(|i| i % 3).collect() },
    ];
    let (mut proposed, mut accepted, mut passes, mut produced, mut tokens) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for prompt in ["The meaning of ", "Once upon a time", "She said: \""] {
        plain.reset();
        let (listener, _) = collect(None);
        let want = plain.generate(text(prompt), greedy(40), listener, None).unwrap();
        assert!(want.stats.speculative.is_none(), "no speculative stats without speculation");
        for draft in &drafts {
            for cache in [DraftCache::Shared, DraftCache::Own] {
                spec.reset();
                let what = format!("{prompt:?} {draft:?} {cache:?}");
                let o = GenerateOptions { speculative: Some(speculative(draft.clone(), cache, 4, true)), ..greedy(40) };
                let (listener, pieces) = collect(None);
                let got = spec.generate(text(prompt), o, listener, None).unwrap();
                assert_eq!(got.token_ids, want.token_ids, "{what}");
                assert_eq!(got.text, want.text, "{what}");
                assert_eq!(pieces.lock().unwrap().concat(), want.text, "{what}: streamed");
                assert_eq!(got.finish_reason, want.finish_reason, "{what}");
                assert_eq!(spec.token_count(), plain.token_count(), "{what}: the cache holds the same tokens");
                let st = got.stats.speculative.expect("speculative stats");
                assert!((0.0..=1.0).contains(&st.acceptance_rate), "{what}: {st:?}");
                assert!(st.tokens_per_pass >= 1.0, "{what}: {st:?}");
                assert!(st.verify_passes > 0 && st.accepted <= st.proposed, "{what}: {st:?}");
                assert!(st.draft_steps >= st.proposed, "{what}: {st:?}");
                assert!((1..=8).contains(&st.last_k), "{what}: {st:?}");
                assert_eq!(st.cache, cache, "{what}");
                assert_eq!(st.gpu_submits, 0, "{what}: CPU engine");
                assert_eq!(st.draft_kv_bytes == 0, cache == DraftCache::Shared, "{what}: {st:?}");
                match draft {
                    DraftChoice::Named { name } => assert_eq!(&st.draft, name, "{what}"),
                    DraftChoice::Auto => assert_eq!(st.draft, "s", "{what}: the smallest submodel"),
                    DraftChoice::Levels { .. } => assert!(st.draft.contains(','), "{what}: {}", st.draft),
                }
                if *draft == drafts[0] {
                    proposed += st.proposed;
                    accepted += st.accepted;
                    passes += st.verify_passes;
                    produced += (st.tokens_per_pass * st.verify_passes as f64).round() as u64;
                    tokens += got.usage.completion_tokens;
                }
            }
        }
    }
    assert!(accepted > 0, "the nested draft agrees with the verifier at least sometimes");
    println!(
        "ffi speculative, draft s on xl (greedy, 3 prompts x 2 caches x 40 tokens): acceptance {:.3} ({accepted}/{proposed}), {:.2} tokens per verify pass ({produced} tokens / {passes} passes; {tokens} generated, the first by the prefill)",
        accepted as f64 / proposed as f64,
        produced as f64 / passes as f64
    );
}

/// A draft that is unknown, not narrower than the verifier or out of range, and bad `k`s, are
/// errors with a clear message; the session stays usable, speculative or not.
#[test]
fn bad_speculative_options_are_errors_and_the_session_stays_usable() {
    let engine = Engine::open(matlm(), cpu()).unwrap();
    let session = engine.session(session_options(Some(SubmodelChoice::Named { name: "l".into() }))).unwrap();
    let with = |s: SpeculativeOptions| GenerateOptions { speculative: Some(s), ..greedy(8) };
    let named = |name: &str| speculative(DraftChoice::Named { name: name.into() }, DraftCache::Shared, 4, true);

    let (listener, pieces) = collect(None);
    match session.generate(text("The "), with(named("nonesuch")), listener, None) {
        Err(MatformerError::Model { detail }) => {
            assert!(detail.contains("nonesuch") && !detail.contains('\n'), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    assert!(pieces.lock().unwrap().is_empty(), "nothing streamed");
    for wide in ["l", "xl"] {
        let (listener, _) = collect(None);
        let e = session.generate(text("The "), with(named(wide)), listener, None).expect_err("not narrower");
        match e {
            MatformerError::InvalidArgument { detail } => assert!(detail.contains("not narrower"), "{detail}"),
            other => panic!("{other:?}"),
        }
    }
    let out_of_range = DraftChoice::Levels { levels: vec![9; engine.model_info().n_layers as usize] };
    let too_few = DraftChoice::Levels { levels: vec![0] };
    for draft in [out_of_range, too_few] {
        let (listener, _) = collect(None);
        let e = session
            .generate(text("The "), with(speculative(draft.clone(), DraftCache::Own, 4, true)), listener, None)
            .expect_err("a bad level list");
        assert!(!e.to_string().is_empty(), "{draft:?}: {e:?}");
    }
    let zero_k = SpeculativeOptions { k: 0, ..SpeculativeOptions::default() };
    let small_max = SpeculativeOptions { k: 4, max_k: 2, ..SpeculativeOptions::default() };
    let no_vocab = SpeculativeOptions { draft_vocab: Some(0), ..SpeculativeOptions::default() };
    for (o, want) in [(zero_k, "at least 1"), (small_max, "at least k"), (no_vocab, "draft_vocab")] {
        let (listener, _) = collect(None);
        match session.generate(text("The "), with(o), listener, None) {
            Err(MatformerError::InvalidArgument { detail }) => assert!(detail.contains(want), "{detail}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(session.token_count(), 0, "a refused call holds nothing");

    // Still usable: plain, then speculative with the default options (the smallest draft).
    let (listener, _) = collect(None);
    let plain = session.generate(text("The "), greedy(8), listener, None).unwrap();
    assert_eq!(plain.usage.completion_tokens, 8);
    session.reset();
    let (listener, _) = collect(None);
    let spec = session.generate(text("The "), with(SpeculativeOptions::default()), listener, None).unwrap();
    assert_eq!(spec.token_ids, plain.token_ids);
    assert_eq!(spec.stats.speculative.unwrap().draft, "s");
}

/// The records convert both ways and default like the runtime's.
#[test]
fn speculative_options_convert_both_ways() {
    let d = SpeculativeOptions::default();
    assert_eq!(matformer::SpeculativeOptions::from(d.clone()), matformer::SpeculativeOptions::default());
    assert_eq!(
        (d.draft, d.cache, d.k, d.max_k, d.adaptive),
        (Some(DraftChoice::Auto), Some(DraftCache::Shared), 4, 8, true)
    );
    assert_eq!(d.draft_vocab, None);
    let none = SpeculativeOptions { draft: None, cache: None, k: 2, max_k: 3, adaptive: false, draft_vocab: None };
    let r = matformer::SpeculativeOptions::from(none);
    assert_eq!(
        (r.draft, r.cache, r.k, r.max_k, r.adaptive, r.draft_vocab),
        (matformer::DraftChoice::Auto, matformer::DraftCache::Shared, 2, 3, false, None)
    );
    let limited = SpeculativeOptions { draft_vocab: Some(32768), ..SpeculativeOptions::default() };
    assert_eq!(matformer::SpeculativeOptions::from(limited.clone()).draft_vocab, Some(32768));
    assert_eq!(SpeculativeOptions::from(matformer::SpeculativeOptions::from(limited.clone())), limited);
    for draft in [
        DraftChoice::Auto,
        DraftChoice::Named { name: "s,s,m,l".into() },
        DraftChoice::Levels { levels: vec![0, 1, 2, 0] },
    ] {
        for cache in [DraftCache::Shared, DraftCache::Own] {
            let o = speculative(draft.clone(), cache, 3, false);
            assert_eq!(SpeculativeOptions::from(matformer::SpeculativeOptions::from(o.clone())), o);
        }
    }
}
