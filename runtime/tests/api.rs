//! The app API (`Engine`, `Session`) on the bundled model: greedy parity with the engine,
//! multi-turn KV reuse, cancellation, stop strings, the sink, bad input, elastic switches and
//! concurrent sessions.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use matformer::cpu::{argmax, CpuEngine};
use matformer::elastic::{DeviceBudget, MemoryPressure};
use matformer::{
    BackendChoice, ChatMessage, Engine, EngineOptions, Error, FinishReason, GenerateOptions, Input, ModelFile, NoSink,
    SamplingParams, Session, SessionOptions, SinkControl, Submodel, SubmodelChoice, SwitchMode,
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

fn user(text: &str) -> Input {
    Input::Chat(vec![ChatMessage { role: "user".into(), content: text.into() }])
}

/// Greedy tokens straight from the CPU engine: the reference the API must reproduce.
fn engine_greedy(submodel: &str, prompt: &[u32], n: usize) -> Vec<u32> {
    let model = Arc::new(ModelFile::open(fixture()).unwrap());
    let sub = Submodel::parse(submodel, model.metadata(), model.view().available_levels).unwrap();
    let e = CpuEngine::new(model).unwrap();
    let mut s = e.session(&sub).unwrap();
    let mut out = vec![argmax(&s.prefill(prompt).unwrap())];
    while out.len() < n {
        let next = argmax(&s.decode(*out.last().unwrap()).unwrap());
        out.push(next);
    }
    out
}

#[test]
fn greedy_text_equals_the_engine_and_streams_whole_text() {
    let engine = cpu_engine();
    let tok = engine.tokenizer();
    for sub in ["s", "xl", "0,0,1,3"] {
        let s = session(&engine, sub);
        let mut streamed = String::new();
        let c = s
            .generate(Input::Text("The meaning of ".into()), &greedy(40), &mut |p: &str| {
                streamed.push_str(p);
                SinkControl::Continue
            })
            .unwrap();
        let prompt = tok.encode("The meaning of ", true).unwrap();
        let want = engine_greedy(sub, &prompt, c.token_ids.len());
        assert_eq!(c.token_ids, want, "{sub}");
        assert_eq!(streamed, c.text);
        assert_eq!(c.usage.prompt_tokens, prompt.len());
        assert_eq!(c.usage.completion_tokens, c.token_ids.len());
        assert!(matches!(c.finish_reason, FinishReason::Length | FinishReason::Eos));
        assert_eq!(c.stats.backend, "cpu");
        assert!(c.stats.time_to_first_token_ms > 0.0);
    }
}

/// Token input is the text input's tokens as they are: the same answer, appended to what the
/// session holds without a second BOS, and an id outside the vocabulary refused.
#[test]
fn token_input_equals_the_same_text() {
    let engine = cpu_engine();
    let prompt = engine.tokenizer().encode("The meaning of ", true).unwrap();
    let by_text =
        session(&engine, "l").generate(Input::Text("The meaning of ".into()), &greedy(16), &mut NoSink).unwrap();
    let s = session(&engine, "l");
    let by_ids = s.generate(Input::Tokens(prompt.clone()), &greedy(16), &mut NoSink).unwrap();
    assert_eq!(by_ids.token_ids, by_text.token_ids);
    assert_eq!(by_ids.text, by_text.text);
    assert_eq!(by_ids.usage.prompt_tokens, prompt.len());
    assert_eq!(by_ids.token_ids, engine_greedy("l", &prompt, by_ids.token_ids.len()));

    // Appended to the history: the cache is reused, and the answer's last token (emitted, not
    // yet fed) comes before the new ones; nothing else is added.
    let held = s.token_count();
    assert_eq!(held, prompt.len() + by_ids.token_ids.len() - 1);
    let more = engine.tokenizer().encode(" word", false).unwrap();
    let next = s.generate(Input::Tokens(more.clone()), &greedy(4), &mut NoSink).unwrap();
    assert_eq!(next.usage.cached_prompt_tokens, held);
    assert_eq!(next.usage.prompt_tokens, held + 1 + more.len());

    let vocab = engine.model_info().vocab_size;
    let e = s.generate(Input::Tokens(vec![1, vocab]), &greedy(4), &mut NoSink).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    let e = session(&engine, "s").generate(Input::Tokens(vec![]), &greedy(4), &mut NoSink).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
}

#[test]
fn a_second_turn_prefills_only_new_tokens_and_equals_a_fresh_session() {
    let engine = cpu_engine();
    let s = session(&engine, "m");
    let first = s.generate(user("The meaning of "), &greedy(12), &mut NoSink).unwrap();
    let held = s.token_count();
    assert_eq!(held, first.usage.prompt_tokens + first.usage.completion_tokens - 1);
    let second = s.generate(user(" A word"), &greedy(12), &mut NoSink).unwrap();
    assert_eq!(second.usage.cached_prompt_tokens, held, "the whole first turn is reused");
    assert_eq!(second.usage.prompt_tokens, held + 1 + " A word".len());

    let whole = format!("The meaning of {} A word", first.text);
    let fresh = session(&engine, "m").generate(Input::Text(whole), &greedy(12), &mut NoSink).unwrap();
    assert_eq!(second.token_ids, fresh.token_ids);
    assert_eq!(s.messages().len(), 4, "user, assistant, user, assistant");
}

/// A text or token turn continues after every token of the previous answer, the last one
/// included (emitted, not yet fed: the next turn feeds it first), as if the whole history had
/// been one prompt.
#[test]
fn a_text_turn_continues_after_the_whole_previous_answer() {
    let engine = cpu_engine();
    let s = session(&engine, "m");
    let first = s.generate(Input::Text("The meaning of ".into()), &greedy(9), &mut NoSink).unwrap();
    assert_eq!((first.finish_reason, first.token_ids.len()), (FinishReason::Length, 9));
    let more = engine.tokenizer().encode(" and", false).unwrap();
    // A refused call and a prefill cancelled before it starts keep nothing of their turn: the
    // answer's last token stays pending.
    let vocab = engine.model_info().vocab_size;
    assert!(s.generate(Input::Tokens(vec![vocab]), &greedy(9), &mut NoSink).is_err());
    let mut cancelled = MidStepOnly { flag: Arc::new(std::sync::atomic::AtomicBool::new(true)), pieces: 0, after: 0 };
    let c = s.generate(Input::Tokens(more.clone()), &greedy(9), &mut cancelled).unwrap();
    assert_eq!(c.finish_reason, FinishReason::Cancelled);
    let second = s.generate(Input::Tokens(more.clone()), &greedy(9), &mut NoSink).unwrap();
    let mut whole = engine.tokenizer().encode("The meaning of ", true).unwrap();
    whole.extend_from_slice(&first.token_ids);
    whole.extend_from_slice(&more);
    assert_eq!(second.usage.prompt_tokens, whole.len());
    assert_eq!(second.usage.cached_prompt_tokens, whole.len() - more.len() - 1);
    let fresh = session(&engine, "m").generate(Input::Tokens(whole), &greedy(9), &mut NoSink).unwrap();
    assert_eq!(second.token_ids, fresh.token_ids);
    // After a reset nothing of the old answer is carried.
    s.reset();
    let again = s.generate(Input::Text("The meaning of ".into()), &greedy(9), &mut NoSink).unwrap();
    assert_eq!(again.token_ids, first.token_ids);
}

#[test]
fn cancel_stops_within_a_step_and_the_next_turn_is_exact() {
    let engine = cpu_engine();
    let s = Arc::new(session(&engine, "xl"));
    let handle = s.cancel_handle();
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        let at = Instant::now();
        handle.cancel();
        tx.send(at).unwrap();
    });
    let c = s.generate(Input::Text("The ".into()), &greedy(100_000), &mut NoSink);
    let returned = Instant::now();
    canceller.join().unwrap();
    let c = c.unwrap();
    let cancelled_at = rx.recv().unwrap();
    assert_eq!(c.finish_reason, FinishReason::Cancelled);
    assert!(c.usage.completion_tokens < 100_000);
    // One decode step of the bundled model takes well under a millisecond; a second is a
    // bound no scheduler hiccup reaches.
    assert!(returned.duration_since(cancelled_at) < Duration::from_secs(1));

    s.reset();
    let after = s.generate(Input::Text("The ".into()), &greedy(20), &mut NoSink).unwrap();
    let fresh = session(&engine, "xl").generate(Input::Text("The ".into()), &greedy(20), &mut NoSink).unwrap();
    assert_eq!(after.token_ids, fresh.token_ids);
    s.cancel(); // idle: a no-op
    let again = s.generate(Input::Text("The ".into()), &greedy(5), &mut NoSink).unwrap();
    assert_ne!(again.finish_reason, FinishReason::Cancelled);
}

/// A sink whose cancel flag is shared with another thread (the bindings' per-call token).
struct TokenSinkWith(Arc<std::sync::atomic::AtomicBool>);

impl matformer::TokenSink for TokenSinkWith {
    fn on_text(&mut self, _piece: &str) -> SinkControl {
        SinkControl::Continue
    }
    fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[test]
fn a_sink_cancel_made_before_the_call_is_not_lost_and_reaches_no_other_call() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let engine = cpu_engine();
    let s = session(&engine, "xl");
    // Cancelled before the call starts: nothing is prefilled, nothing generated, and the
    // conversation is as before.
    let flag = Arc::new(AtomicBool::new(true));
    let c = s.generate(Input::Text("The ".into()), &greedy(100_000), &mut TokenSinkWith(flag)).unwrap();
    assert_eq!(c.finish_reason, FinishReason::Cancelled);
    assert_eq!(c.usage.completion_tokens, 0);
    assert_eq!(s.token_count(), 0);
    // Cancelled mid-way from another thread.
    let flag = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&flag);
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        f.store(true, Ordering::SeqCst);
    });
    let c = s.generate(Input::Text("The ".into()), &greedy(100_000), &mut TokenSinkWith(flag)).unwrap();
    canceller.join().unwrap();
    assert_eq!(c.finish_reason, FinishReason::Cancelled);
    assert!(c.usage.completion_tokens < 100_000);
    // The next call, with its own flag, is untouched and exact.
    s.reset();
    let after = s.generate(Input::Text("The ".into()), &greedy(20), &mut TokenSinkWith(Arc::default())).unwrap();
    let fresh = session(&engine, "xl").generate(Input::Text("The ".into()), &greedy(20), &mut NoSink).unwrap();
    assert_eq!(after.token_ids, fresh.token_ids);
    assert_eq!(after.finish_reason, FinishReason::Length);
}

/// A sink whose cancel flag only the checks inside a step read: `is_cancelled` stays false,
/// `cancel_flag` shares the flag, which `on_text` sets at the `after`-th piece.
struct MidStepOnly {
    flag: Arc<std::sync::atomic::AtomicBool>,
    pieces: usize,
    after: usize,
}

impl matformer::TokenSink for MidStepOnly {
    fn on_text(&mut self, _piece: &str) -> SinkControl {
        self.pieces += 1;
        if self.pieces == self.after {
            self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        SinkControl::Continue
    }
    fn cancel_flag(&self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        Some(Arc::clone(&self.flag))
    }
}

/// The cancel check inside a step (before every layer on the CPU, in the GPU wait): a flag
/// set before the call interrupts the prefill, one set mid-answer the next decode step; both
/// end as Cancelled with the session exactly as after the last token fed, and the next turn
/// equals a fresh session's.
fn a_cancel_stops_the_step_in_flight(engine: &Engine) {
    use std::sync::atomic::AtomicBool;
    let prompt = engine.tokenizer().encode("The ", true).unwrap();
    let s = session(engine, "xl");
    let fresh = session(engine, "xl").generate(Input::Text("The ".into()), &greedy(20), &mut NoSink).unwrap();
    assert_eq!(fresh.finish_reason, FinishReason::Length);

    let mut sink = MidStepOnly { flag: Arc::new(AtomicBool::new(true)), pieces: 0, after: 0 };
    let c = s.generate(Input::Text("The ".into()), &greedy(20), &mut sink).unwrap();
    assert_eq!(c.finish_reason, FinishReason::Cancelled, "interrupted prefill");
    assert_eq!((c.usage.completion_tokens, s.token_count()), (0, 0));

    for after in [1, 5] {
        s.reset();
        let mut sink = MidStepOnly { flag: Arc::new(AtomicBool::new(false)), pieces: 0, after };
        let c = s.generate(Input::Text("The ".into()), &greedy(20), &mut sink).unwrap();
        assert_eq!(c.finish_reason, FinishReason::Cancelled, "interrupted decode after {after}");
        let n = c.usage.completion_tokens;
        assert!(n >= after && n < 20, "{n} tokens for a cancel after {after} pieces");
        assert_eq!(c.token_ids[..], fresh.token_ids[..n]);
        // The last token was emitted, never fed: the cache holds the prompt and the others.
        assert_eq!(s.token_count(), prompt.len() + n - 1);
        // The conversation goes on after the last token emitted, exactly (it is fed first).
        let more = s.generate(Input::Text(String::new()), &greedy(20 - n), &mut NoSink);
        let more = more.unwrap_or_else(|e| panic!("continuing after a cancel: {e}"));
        assert_eq!(more.token_ids[..], fresh.token_ids[n..], "continuation after {after}");
        assert_eq!(more.usage.prompt_tokens, prompt.len() + n);
    }
    s.reset();
    let next = s.generate(Input::Text("The ".into()), &greedy(20), &mut NoSink).unwrap();
    assert_eq!(next.token_ids, fresh.token_ids);
}

#[test]
fn a_cancel_stops_the_step_in_flight_on_the_cpu() {
    a_cancel_stops_the_step_in_flight(&cpu_engine());
}

#[cfg(feature = "gpu")]
#[test]
fn a_cancel_stops_the_step_in_flight_on_the_gpu() {
    let engine = Engine::open(fixture(), EngineOptions { backend: BackendChoice::Gpu, ..Default::default() }).unwrap();
    a_cancel_stops_the_step_in_flight(&engine);
}

#[test]
fn stop_strings_end_the_answer_and_are_never_streamed() {
    let engine = cpu_engine();
    let s = session(&engine, "xl");
    let full = s.generate(Input::Text("The meaning of ".into()), &greedy(60), &mut NoSink).unwrap();
    // Stop at a word from the middle of the greedy answer.
    let words: Vec<&str> = full.text.split(' ').filter(|w| w.len() >= 3).collect();
    let stop = words[words.len() / 2].to_string();
    let cut = full.text.find(&stop).unwrap();
    s.reset();
    let mut streamed = String::new();
    let opts = GenerateOptions { stop: vec![stop.clone()], ..greedy(60) };
    let c = s
        .generate(Input::Text("The meaning of ".into()), &opts, &mut |p: &str| {
            streamed.push_str(p);
            SinkControl::Continue
        })
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.text, full.text[..cut]);
    assert_eq!(streamed, c.text, "nothing of the stop string reached the sink");

    // The sink can stop generation too.
    s.reset();
    let mut pieces = 0;
    let c = s
        .generate(Input::Text("The meaning of ".into()), &greedy(60), &mut |_: &str| {
            pieces += 1;
            if pieces == 3 {
                SinkControl::Stop
            } else {
                SinkControl::Continue
            }
        })
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(pieces, 3);
    // Stop tokens.
    s.reset();
    let t = full.token_ids[5];
    let c = s
        .generate(
            Input::Text("The meaning of ".into()),
            &GenerateOptions { stop_token_ids: vec![t], ..greedy(60) },
            &mut NoSink,
        )
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(*c.token_ids.last().unwrap(), t);
}

#[test]
fn a_seed_gives_the_same_text_and_sampling_differs_from_greedy() {
    let engine = cpu_engine();
    let opts = |seed| GenerateOptions {
        max_tokens: 40,
        sampling: SamplingParams { temperature: 1.0, top_k: 40, top_p: 0.95, seed: Some(seed), ..Default::default() },
        ..Default::default()
    };
    let run = |seed| session(&engine, "l").generate(Input::Text("The ".into()), &opts(seed), &mut NoSink).unwrap();
    assert_eq!(run(7).token_ids, run(7).token_ids);
    let greedy = session(&engine, "l").generate(Input::Text("The ".into()), &greedy(40), &mut NoSink).unwrap();
    assert!([1u64, 2, 3].iter().any(|&seed| run(seed).token_ids != greedy.token_ids));
}

#[test]
fn bad_input_is_a_clear_error_and_the_session_stays_usable() {
    let engine = cpu_engine();
    let s = engine
        .session(SessionOptions {
            submodel: SubmodelChoice::Named("s".into()),
            context_length: Some(64),
            ..Default::default()
        })
        .unwrap();
    let bad =
        GenerateOptions { sampling: SamplingParams { temperature: -1.0, ..Default::default() }, ..Default::default() };
    let e = s.generate(Input::Text("x".into()), &bad, &mut NoSink).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    let e = s.generate(Input::Text("x".repeat(100)), &greedy(4), &mut NoSink).unwrap_err();
    assert!(matches!(e, Error::ContextFull { needed: 101, limit: 64 }), "{e}");
    assert!(e.to_string().contains("64"), "{e}");
    let truncating = GenerateOptions { truncate_prompt: true, ..greedy(4) };
    let c = s.generate(Input::Text("x".repeat(100)), &truncating, &mut NoSink).unwrap();
    assert!(c.usage.prompt_tokens <= 64);
    let e =
        s.generate(Input::Text("x".into()), &GenerateOptions { stop: vec![String::new()], ..greedy(4) }, &mut NoSink);
    assert!(matches!(e, Err(Error::InvalidArgument { .. })));
    let e = s.generate(Input::Chat(vec![]), &greedy(4), &mut NoSink).unwrap_err();
    assert!(e.to_string().contains("message"), "{e}");

    let e = engine
        .session(SessionOptions { submodel: SubmodelChoice::Named("huge".into()), ..Default::default() })
        .unwrap_err();
    assert!(e.to_string().contains("huge"), "{e}");
    let nothing = DeviceBudget { available_memory_bytes: Some(1024), ..Default::default() };
    let e =
        engine.session(SessionOptions { submodel: SubmodelChoice::Auto(nothing), ..Default::default() }).unwrap_err();
    assert!(matches!(e, Error::NothingFits(_)), "{e}");
    s.reset();
    assert!(s.generate(Input::Text("The ".into()), &greedy(4), &mut NoSink).is_ok(), "still usable");

    engine.close();
    let e = s.generate(Input::Text("The ".into()), &greedy(4), &mut NoSink).unwrap_err();
    assert!(matches!(e, Error::EngineClosed), "{e}");
    assert!(matches!(engine.session(SessionOptions::default()), Err(Error::EngineClosed)));
}

#[test]
fn budgets_and_memory_pressure_switch_at_token_boundaries_and_show_in_the_stats() {
    let engine = cpu_engine();
    for mode in [SwitchMode::Auto, SwitchMode::Exact, SwitchMode::KeepKv] {
        let s = Arc::new(
            engine
                .session(SessionOptions {
                    submodel: SubmodelChoice::Named("xl".into()),
                    switch_mode: mode,
                    ..Default::default()
                })
                .unwrap(),
        );
        // Idle: applies now, reported with the next call.
        s.on_memory_pressure(MemoryPressure::Critical).unwrap();
        assert_eq!(s.submodel(), "s");
        let c = s.generate(Input::Text("The ".into()), &greedy(8), &mut NoSink).unwrap();
        assert_eq!(c.stats.switches.len(), 1);
        assert_eq!(c.stats.switches[0].from, "xl");
        // Auto reports the mode it ran: the bundled model is trained nested, so keep-KV.
        let ran = if mode == SwitchMode::Auto { SwitchMode::KeepKv } else { mode };
        assert_eq!(c.stats.switches[0].mode, ran);
        assert!(c.stats.switches[0].reason.contains("memory pressure"));

        // While generating: the sink asks for a bigger budget after the 4th piece.
        let s2 = Arc::clone(&s);
        let mut n = 0;
        let c = s
            .generate(Input::Text(" again".into()), &greedy(12), &mut move |_: &str| {
                n += 1;
                if n == 4 {
                    s2.set_submodel(SubmodelChoice::Named("l".into())).unwrap();
                }
                SinkControl::Continue
            })
            .unwrap();
        assert_eq!(c.stats.submodel, "l", "{mode:?}");
        assert_eq!(c.stats.switches.len(), 1);
        assert_eq!(c.stats.switches[0].at_token, 4);
        assert_eq!((c.stats.switches[0].from.as_str(), c.stats.switches[0].to.as_str()), ("s", "l"));
        assert_eq!(c.stats.switches[0].mode, ran, "an upshift on a trained file keeps the cache too");
    }

    // A budget with a memory limit picks a smaller submodel.
    let s = session(&engine, "xl");
    let plan = s
        .set_budget(DeviceBudget {
            available_memory_bytes: Some(3 << 20),
            context_tokens: Some(256),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(s.submodel(), plan.entry.name);
    assert_ne!(plan.entry.name, "xl");
}

#[test]
fn exact_switching_mid_generation_continues_as_the_new_submodel() {
    // Switch xl -> s after 6 tokens in exact mode: tokens from then on are s's greedy
    // continuation of the same history.
    let engine = cpu_engine();
    let s = Arc::new(
        engine
            .session(SessionOptions {
                submodel: SubmodelChoice::Named("xl".into()),
                switch_mode: SwitchMode::Exact,
                ..Default::default()
            })
            .unwrap(),
    );
    let s2 = Arc::clone(&s);
    let mut n = 0;
    let c = s
        .generate(Input::Text("The meaning of ".into()), &greedy(20), &mut move |_: &str| {
            n += 1;
            if n == 6 {
                s2.set_submodel(SubmodelChoice::Named("s".into())).unwrap();
            }
            SinkControl::Continue
        })
        .unwrap();
    let prompt = engine.tokenizer().encode("The meaning of ", true).unwrap();
    let xl = engine_greedy("xl", &prompt, 6);
    assert_eq!(c.token_ids[..6], xl[..]);
    let mut history = prompt.clone();
    history.extend_from_slice(&c.token_ids[..6]);
    let rest = engine_greedy("s", &history, c.token_ids.len() - 6);
    assert_eq!(c.token_ids[6..], rest[..]);
}

#[test]
fn four_sessions_on_four_threads_equal_each_alone() {
    let engine = cpu_engine();
    let prompts = ["The ", "A word ", "Of the ", "To be "];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| session(&engine, "m").generate(Input::Text((*p).into()), &greedy(24), &mut NoSink).unwrap().token_ids)
        .collect();
    let threads: Vec<_> = prompts
        .iter()
        .map(|p| {
            let engine = engine.clone();
            let p = p.to_string();
            std::thread::spawn(move || {
                session(&engine, "m").generate(Input::Text(p), &greedy(24), &mut NoSink).unwrap().token_ids
            })
        })
        .collect();
    for (t, want) in threads.into_iter().zip(alone) {
        assert_eq!(t.join().unwrap(), want);
    }
}

#[test]
fn the_engine_exposes_catalog_selection_tokenizer_and_info() {
    let engine = cpu_engine();
    let info = engine.model_info();
    assert_eq!(info.level_names, ["s", "m", "l", "xl"]);
    assert_eq!(info.n_layers, 4);
    assert!(!engine.catalog().is_empty());
    let plan = engine.select(&DeviceBudget::default()).unwrap();
    assert_eq!(plan.entry.name, "xl");
    assert_eq!(engine.tokenizer().encode("A", false).unwrap(), [65]);
    assert_eq!(engine.backend().kind, matformer::BackendKind::Cpu);
    assert!(engine.backend().reason.contains("CPU"));
}

/// For the notes: time from `cancel()` to `generate` returning, over 100 cancels at varied
/// points, and whether the next turn equals a fresh session's, on the CPU engine
/// (`cargo test -p matformer --test api -- --ignored --nocapture`).
#[test]
#[ignore = "measurement for the notes"]
fn cancel_latency_table() {
    cancel_table(&cpu_engine(), "cpu");
}

/// [`cancel_latency_table`] on the GPU engine (lavapipe here).
#[cfg(feature = "gpu")]
#[test]
#[ignore = "measurement for the notes"]
fn cancel_latency_table_gpu() {
    let engine = Engine::open(fixture(), EngineOptions { backend: BackendChoice::Gpu, ..Default::default() }).unwrap();
    cancel_table(&engine, &engine.backend().device);
}

fn cancel_table(engine: &Engine, label: &str) {
    let s = Arc::new(session(engine, "xl"));
    let fresh = session(engine, "xl").generate(Input::Text("The ".into()), &greedy(16), &mut NoSink).unwrap();
    let mut lat_us = Vec::new();
    let mut steps_ms = Vec::new();
    for i in 0..100u64 {
        s.reset();
        let h = s.cancel_handle();
        let delay = Duration::from_micros(200 + (i * 7919) % 5000);
        let (tx, rx) = std::sync::mpsc::channel::<Instant>();
        let t = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let at = Instant::now();
            h.cancel();
            tx.send(at).unwrap();
        });
        let c = s.generate(Input::Text("The ".into()), &greedy(200), &mut NoSink).unwrap();
        let back = Instant::now();
        t.join().unwrap();
        let at = rx.recv().unwrap();
        if c.finish_reason == FinishReason::Cancelled {
            lat_us.push(back.duration_since(at).as_secs_f64() * 1e6);
            if c.usage.completion_tokens > 1 {
                steps_ms.push(c.stats.decode_ms / (c.usage.completion_tokens - 1) as f64);
            }
        }
        s.reset();
        let next = s.generate(Input::Text("The ".into()), &greedy(16), &mut NoSink).unwrap();
        assert_eq!(next.token_ids, fresh.token_ids, "the turn after a cancel equals a fresh session's");
    }
    // Decode steps of uncancelled answers too (early cancels leave no step to time).
    for _ in 0..5 {
        s.reset();
        let c = s.generate(Input::Text("The ".into()), &greedy(64), &mut NoSink).unwrap();
        steps_ms.push(c.stats.decode_ms / (c.usage.completion_tokens - 1) as f64);
    }
    lat_us.sort_by(f64::total_cmp);
    steps_ms.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p) as usize];
    println!(
        "{label}: cancelled {} of 100; cancel -> return: median {:.1} us, p90 {:.1} us, max {:.1} us; decode step median {:.3} ms",
        lat_us.len(),
        pct(&lat_us, 0.5),
        pct(&lat_us, 0.9),
        lat_us.last().copied().unwrap_or(0.0),
        pct(&steps_ms, 0.5)
    );
}

/// For the notes: the process's peak resident memory with `MATFORMER_RSS_SESSIONS` sessions
/// (default 1) on the file `MATFORMER_RSS_FILE` (a no-op without it), each holding a
/// 1,024-token KV cache and having prefilled 512 tokens and generated 16; run once per count, each in its own
/// process (`cargo test --release -p matformer --test api rss_sessions -- --ignored --nocapture`).
/// Sessions share the mapped weights, so N sessions should cost the weights once plus N caches.
#[test]
#[ignore = "measurement for the notes"]
fn rss_sessions() {
    let Some(path) = std::env::var_os("MATFORMER_RSS_FILE") else { return };
    let n: usize = std::env::var("MATFORMER_RSS_SESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let status = |key: &str| -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with(key)).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
    };
    let engine = Engine::open(&path, EngineOptions { backend: BackendChoice::Cpu, ..Default::default() }).unwrap();
    let before = status("VmRSS:");
    let sessions: Vec<Session> = (0..n)
        .map(|_| {
            engine
                .session(SessionOptions {
                    submodel: SubmodelChoice::Named("xl".into()),
                    context_length: Some(1024),
                    ..Default::default()
                })
                .unwrap()
        })
        .collect();
    // 512 prompt tokens each (the byte tokenizer of a synthetic file: one per byte), so every
    // session's cache holds real keys and values, not untouched zero pages.
    let prompt: String = "The quick brown fox jumps over the lazy dog. ".repeat(12)[..512].to_string();
    for s in &sessions {
        s.generate(Input::Text(prompt.clone()), &greedy(16), &mut NoSink).unwrap();
    }
    println!(
        "{n} session(s): RSS after open {before} MiB, peak {} MiB, now {} MiB",
        status("VmHWM:"),
        status("VmRSS:")
    );
}
