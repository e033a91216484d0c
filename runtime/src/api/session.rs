//! [`Session`]: one conversation on an [`Engine`], with streaming, stop strings, sampling,
//! cancellation, multi-turn KV reuse and elastic switching at token boundaries.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::engine::Engine;
use super::speculative::{self, Emit, OwnDraft, RoundEnd, Speculator};
use super::types::{
    Completion, FinishReason, GenerateOptions, Input, SessionOptions, SinkControl, Stats, SubmodelChoice, SwitchEvent,
    SwitchMode, TokenSink, Usage,
};
use super::Error;
use crate::elastic::{DeviceBudget, ElasticSession, MemoryPressure, Plan, SwitchReport};
use crate::sampling::Sampler;
use crate::tokenizer::{ChatMessage, StreamDecoder};
use crate::Submodel;

/// Prompt tokens prefilled per pass: a cancel during a long prefill takes effect after at
/// most one such pass.
const PREFILL_PASS: usize = 128;

/// A change asked for from outside the generation loop, applied at the next token boundary.
#[derive(Clone, Debug)]
enum Pending {
    Switch { to: Submodel, reason: String },
    Pressure(MemoryPressure),
}

/// State shared with [`CancelHandle`]s and read without the session lock.
#[derive(Debug, Default)]
struct Control {
    cancel: AtomicBool,
    generating: AtomicBool,
    pending: Mutex<Vec<Pending>>,
    /// Tokens in the KV cache (mirrors the session, readable while it generates).
    position: AtomicUsize,
    /// Name of the submodel running now.
    submodel: Mutex<String>,
}

impl Control {
    fn pending(&self) -> MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Stops a session's generation from any thread. Cheap to clone; `Send + Sync`.
#[derive(Clone, Debug)]
pub struct CancelHandle {
    control: Arc<Control>,
}

impl CancelHandle {
    /// Makes the running [`Session::generate`] return with [`FinishReason::Cancelled`]
    /// without waiting for the step in flight: the flag is read before every layer on the CPU
    /// and every 0.5 ms while waiting for the GPU, and the interrupted step (a decode step or a
    /// prefill pass of up to 128 tokens) is undone. A speculative round is not
    /// split. The session stays consistent: the next call works. A no-op when nothing is
    /// generating.
    pub fn cancel(&self) {
        if self.control.generating.load(Ordering::SeqCst) {
            self.control.cancel.store(true, Ordering::SeqCst);
        }
    }
}

/// The conversation and the elastic session behind the lock.
struct State {
    /// `None` once the engine was closed (the KV cache is freed).
    elastic: Option<ElasticSession>,
    /// Every message so far (system prompt first, then user and assistant turns).
    conversation: Vec<ChatMessage>,
    /// Switches made while idle, reported with the next call.
    idle_events: Vec<SwitchEvent>,
    /// The speculative draft's own KV cache ([`DraftCache::Own`](super::DraftCache::Own)),
    /// kept between turns.
    draft: Option<OwnDraft>,
    /// Tokens of the last answer that were emitted but never fed to the cache (the last one,
    /// or more after a speculative round): the next text or token turn continues after them.
    unfed: Vec<u32>,
}

/// One conversation on an [`Engine`]: its KV cache, token history and submodel. `Send + Sync`:
/// every method takes `&self`; [`generate`](Self::generate) holds the session for its
/// duration while [`cancel`](Self::cancel), [`set_budget`](Self::set_budget),
/// [`set_submodel`](Self::set_submodel) and [`on_memory_pressure`](Self::on_memory_pressure)
/// may be called from other threads at any time and take effect at the next token boundary.
pub struct Session {
    engine: Engine,
    context_length: usize,
    system_prompt: Option<String>,
    switch_mode: SwitchMode,
    state: Mutex<State>,
    control: Arc<Control>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("submodel", &self.submodel())
            .field("tokens", &self.token_count())
            .field("context_length", &self.context_length)
            .field("switch_mode", &self.switch_mode)
            .finish()
    }
}

impl Session {
    pub(crate) fn new(engine: Engine, options: SessionOptions) -> Result<Session, Error> {
        let model_max = engine.inner.model.metadata().architecture.max_context as usize;
        let context_length = match options.context_length {
            Some(0) => return Err(Error::invalid("context_length must be at least 1")),
            Some(n) => n.min(model_max),
            None => model_max,
        };
        let (submodel, _reason) = engine.resolve(&options.submodel)?;
        let elastic = ElasticSession::on(engine.inner.backend.clone(), &submodel)?;
        let mut idle_events = Vec::new();
        if let Some(fallback) = elastic.start_fallback() {
            idle_events.push(SwitchEvent {
                from: engine.name_of(&submodel),
                to: engine.name_of(elastic.submodel()),
                reason: format!("GPU out of memory at start: {fallback}"),
                // Nothing was cached yet: the session runs the smaller submodel exactly.
                mode: SwitchMode::Exact,
                at_token: 0,
                elapsed_ms: 0.0,
            });
        }
        let control = Control { submodel: Mutex::new(engine.name_of(elastic.submodel())), ..Control::default() };
        let conversation =
            options.system_prompt.iter().map(|s| ChatMessage { role: "system".into(), content: s.clone() }).collect();
        Ok(Session {
            engine,
            context_length,
            system_prompt: options.system_prompt,
            switch_mode: options.switch_mode,
            state: Mutex::new(State {
                elastic: Some(elastic),
                conversation,
                idle_events,
                draft: None,
                unfed: Vec::new(),
            }),
            control: Arc::new(control),
        })
    }

    /// Generates an answer to `input`, streaming text pieces to `sink` as they complete, and
    /// returns the whole [`Completion`]. Blocks until the answer ends (end-of-generation
    /// token, stop string or token, `max_tokens`, a full context, [`cancel`](Self::cancel)
    /// or the sink asking to stop). Tokens the session already holds from earlier turns are
    /// not prefilled again. A text or token turn continues after the whole previous answer,
    /// its last token included (emitted but not yet fed, so it is prefilled first).
    ///
    /// On an error nothing of this turn is kept (the conversation is as before the call).
    pub fn generate(
        &self,
        input: Input,
        options: &GenerateOptions,
        sink: &mut dyn TokenSink,
    ) -> Result<Completion, Error> {
        self.engine.check_open()?;
        options.sampling.validate()?;
        if let Some(i) = options.stop.iter().position(|s| s.is_empty()) {
            return Err(Error::invalid(format!("stop string {i} is empty")));
        }
        let vocab = self.engine.inner.model.metadata().architecture.vocab_size;
        if let Some(&t) = options.stop_token_ids.iter().find(|&&t| t >= vocab) {
            return Err(Error::invalid(format!("stop token {t} is outside the vocabulary of {vocab}")));
        }
        if let Some(o) = &options.speculative {
            speculative::validate(o)?;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.control.cancel.store(false, Ordering::SeqCst);
        self.control.generating.store(true, Ordering::SeqCst);
        let (held, unfed) = (state.elastic.as_ref().map(|e| e.history().to_vec()), state.unfed.clone());
        let result = self.generate_locked(&mut state, input, options, sink);
        if result.is_err() && state.elastic.as_ref().map(|e| e.history()) == held.as_deref() {
            // Nothing of this turn is kept: the last answer's unfed tokens stay pending.
            state.unfed = unfed;
        }
        self.control.generating.store(false, Ordering::SeqCst);
        self.control.cancel.store(false, Ordering::SeqCst);
        if let Some(e) = &state.elastic {
            self.control.position.store(e.position(), Ordering::SeqCst);
        }
        if matches!(result, Err(Error::EngineClosed)) {
            state.elastic = None;
            state.draft = None;
        }
        result
    }

    fn generate_locked(
        &self,
        state: &mut State,
        input: Input,
        options: &GenerateOptions,
        sink: &mut dyn TokenSink,
    ) -> Result<Completion, Error> {
        let started = Instant::now();
        let inner = &self.engine.inner;
        let tokenizer = &inner.tokenizer;
        let mut events = std::mem::take(&mut state.idle_events);
        let State { elastic, conversation, draft, unfed, .. } = state;
        // Taken: kept only when this turn completes.
        let before = std::mem::take(unfed);
        let Some(elastic) = elastic.as_mut() else {
            return Err(Error::EngineClosed);
        };

        // The whole prompt as tokens: the rendered conversation, or the cache plus new text.
        let mut turn = conversation.clone();
        let mut full = match &input {
            Input::Chat(messages) => {
                if messages.is_empty() {
                    return Err(Error::invalid("a chat turn needs at least one message"));
                }
                turn.extend(messages.iter().cloned());
                self.render(&turn)?
            }
            Input::Text(text) => {
                let mut t = elastic.history().to_vec();
                t.extend_from_slice(&before);
                t.extend(tokenizer.encode(text, t.is_empty())?);
                t
            }
            Input::Tokens(ids) => {
                let vocab = inner.model.metadata().architecture.vocab_size;
                if let Some((i, t)) = ids.iter().enumerate().find(|(_, &t)| t >= vocab) {
                    return Err(Error::invalid(format!(
                        "token {i} of the input ({t}) is outside the vocabulary of {vocab}"
                    )));
                }
                let mut t = elastic.history().to_vec();
                t.extend_from_slice(&before);
                t.extend_from_slice(ids);
                t
            }
        };
        if full.is_empty() {
            return Err(Error::invalid("the prompt is empty"));
        }
        // Where the held history and the last answer's unfed tokens end in `full` (a text or
        // token turn): a prefill cancelled before it keeps the rest pending.
        let mut pending_end = match &input {
            Input::Chat(_) => 0,
            _ => elastic.history().len() + before.len(),
        };
        if full.len() > self.context_length {
            if !options.truncate_prompt {
                return Err(Error::ContextFull { needed: full.len(), limit: self.context_length });
            }
            // Keep the last tokens, leaving room for the answer.
            let keep = self.context_length.saturating_sub(options.max_tokens.min(self.context_length / 2)).max(1);
            full.drain(..full.len() - keep);
            pending_end = 0;
        }

        // Changes asked for while idle apply before the prefill.
        self.apply_pending(elastic, 0, &mut events)?;
        let mut speculator = match &options.speculative {
            Some(o) => {
                let model = &inner.model;
                let sub = speculative::resolve_draft(model, &o.draft, elastic.submodel(), |name| {
                    Ok(self.engine.resolve(&SubmodelChoice::Named(name.into()))?.0)
                })?;
                let name = self.engine.name_of(&sub);
                Some(Speculator::new(o, sub, name, model.metadata().architecture.vocab_size as usize))
            }
            None => None,
        };

        // Reuse the cache's common prefix; prefill the rest (at least the last token, for its
        // logits).
        let common = elastic.history().iter().zip(&full).take_while(|(a, b)| a == b).count();
        let keep = common.min(full.len() - 1);
        elastic.truncate(keep)?;
        // The sampler sees the whole context (penalties). On the GPU only its candidates are
        // read back per step (greedy: the 4-byte argmax).
        let mut sampler = Sampler::new(options.sampling)?;
        sampler.observe_all(&full[..keep]);
        let mut next = 0;
        // Asked inside a step (kernel worker threads, GPU waits): the session's cancel flag
        // and the sink's, when it has one.
        let sink_flag = sink.cancel_flag();
        let control = &*self.control;
        let stop = move || {
            control.cancel.load(Ordering::SeqCst) || sink_flag.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
        };
        let prefill_started = Instant::now();
        for pass in full[keep..].chunks(PREFILL_PASS) {
            let step = if self.cancelled(sink) {
                None
            } else {
                sampler.observe_all(pass);
                match elastic.prefill_sample_until(pass, &mut sampler, &stop) {
                    Err(e) if e.is_interrupted() => None,
                    r => Some(r?),
                }
            };
            let Some(t) = step else {
                self.control.position.store(elastic.position(), Ordering::SeqCst);
                let fed = elastic.history().len();
                if fed < pending_end && full.get(..fed) == Some(elastic.history()) {
                    *unfed = full[fed..pending_end].to_vec();
                }
                let stats = self.stats(elastic, prefill_started.elapsed().as_secs_f64() * 1e3, 0.0, 0, 0, events);
                return Ok(Completion {
                    text: String::new(),
                    token_ids: Vec::new(),
                    finish_reason: FinishReason::Cancelled,
                    usage: Usage { prompt_tokens: full.len(), cached_prompt_tokens: keep, completion_tokens: 0 },
                    stats,
                });
            };
            next = t;
            self.control.position.store(elastic.position(), Ordering::SeqCst);
        }
        let prefill_ms = prefill_started.elapsed().as_secs_f64() * 1e3;
        let prefilled = full.len() - keep;

        let mut em = Emitter {
            eos: tokenizer.eos_ids(),
            stop_ids: &options.stop_token_ids,
            decoder: tokenizer.stream_decoder(),
            stops: StopScanner::new(&options.stop),
            ids: Vec::new(),
            first_token_at: None,
            max_tokens: options.max_tokens,
            context_length: self.context_length,
            sink,
        };
        let finish;
        loop {
            let token = next;
            if let Some(f) = em.emit(token, &mut sampler, elastic.position()) {
                finish = f;
                break;
            }
            if self.cancelled(&*em.sink) {
                finish = FinishReason::Cancelled;
                break;
            }
            self.engine.check_open()?;
            self.apply_pending(elastic, em.ids.len(), &mut events)?;
            match speculator.as_mut() {
                None => match elastic.decode_sample_until(token, &mut sampler, &stop) {
                    Ok(t) => next = t,
                    Err(e) if e.is_interrupted() => {
                        finish = FinishReason::Cancelled;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                },
                Some(spec) => {
                    let end = spec.round(elastic, draft, token, &mut sampler, &mut em, self.context_length);
                    self.control.position.store(elastic.position(), Ordering::SeqCst);
                    match end? {
                        RoundEnd::Next(t) => next = t,
                        RoundEnd::Finished(f) => {
                            finish = f;
                            break;
                        }
                    }
                }
            }
            self.control.position.store(elastic.position(), Ordering::SeqCst);
        }
        let Emitter { mut decoder, mut stops, ids, first_token_at, sink, .. } = em;
        if !stops.stopped() {
            let tail = decoder.flush();
            if let Scan::Continue = stops.push(&tail, sink) {
                stops.finish(sink);
            }
        }
        let text = stops.into_text();
        let decode_ms = first_token_at.map(|t| t.elapsed().as_secs_f64() * 1e3).unwrap_or(0.0);
        let ttft_ms = first_token_at.map(|t| (t - started).as_secs_f64() * 1e3).unwrap_or(0.0);
        let mut stats = self.stats(elastic, prefill_ms, decode_ms, prefilled, ids.len(), events);
        stats.time_to_first_token_ms = ttft_ms;
        stats.speculative = speculator.map(|s| {
            let mut st = s.stats();
            if st.cache == super::DraftCache::Own {
                st.draft_kv_bytes = draft.as_ref().map_or(0, OwnDraft::kv_cache_bytes);
            }
            st
        });
        // The answer's tokens after the last one fed: the next turn prefills them first.
        let fed = elastic.history().len();
        let mut whole = full.clone();
        whole.extend_from_slice(&ids);
        if whole.get(..fed) == Some(elastic.history()) {
            *unfed = whole[fed..].to_vec();
        }
        if let Input::Chat(_) = input {
            turn.push(ChatMessage { role: "assistant".into(), content: text.clone() });
            *conversation = turn;
        }
        Ok(Completion {
            text,
            token_ids: ids.clone(),
            finish_reason: finish,
            usage: Usage { prompt_tokens: full.len(), cached_prompt_tokens: keep, completion_tokens: ids.len() },
            stats,
        })
    }

    /// The conversation `messages` as prompt tokens: the model's chat template with the
    /// generation prompt, or, for a model without one that uses the byte tokenizer (the
    /// bundled plain-text model), the messages' contents in order after BOS.
    fn render(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, Error> {
        let inner = &self.engine.inner;
        match &inner.template {
            Some(t) => {
                let text = t.render(messages, true)?;
                Ok(inner.tokenizer.encode(&text, false)?)
            }
            None if matches!(inner.tokenizer, crate::tokenizer::Tokenizer::Bytes(_)) => {
                let text: String = messages.iter().map(|m| m.content.as_str()).collect();
                Ok(inner.tokenizer.encode(&text, true)?)
            }
            None => Err(Error::invalid("this model file has no chat template: use text input")),
        }
    }

    fn stats(
        &self,
        elastic: &ElasticSession,
        prefill_ms: f64,
        decode_ms: f64,
        prefilled: usize,
        generated: usize,
        switches: Vec<SwitchEvent>,
    ) -> Stats {
        let per_s = |n: usize, ms: f64| if ms > 0.0 { n as f64 / (ms / 1e3) } else { 0.0 };
        Stats {
            time_to_first_token_ms: 0.0,
            prefill_ms,
            decode_ms,
            prefill_tokens_per_s: per_s(prefilled, prefill_ms),
            decode_tokens_per_s: per_s(generated.saturating_sub(1), decode_ms),
            submodel: self.engine.name_of(elastic.submodel()),
            backend: elastic.backend_name().to_string(),
            switches,
            speculative: None,
        }
    }

    /// Whether this generation was cancelled: through the session ([`Session::cancel`]) or
    /// through its sink ([`TokenSink::is_cancelled`]).
    fn cancelled(&self, sink: &dyn TokenSink) -> bool {
        self.control.cancel.load(Ordering::SeqCst) || sink.is_cancelled()
    }

    /// Applies the changes queued by other threads, recording each switch.
    fn apply_pending(
        &self,
        elastic: &mut ElasticSession,
        at_token: usize,
        events: &mut Vec<SwitchEvent>,
    ) -> Result<(), Error> {
        let pending = std::mem::take(&mut *self.control.pending());
        for p in pending {
            let (report, reason) = match p {
                Pending::Switch { to, reason } => (elastic.switch_with(&to, self.switch_mode)?, reason),
                Pending::Pressure(level) => {
                    let r = elastic.on_memory_pressure_with(level, self.switch_mode)?;
                    let reason = format!(
                        "memory pressure ({}): {} bytes of the mapping released",
                        match level {
                            MemoryPressure::Moderate => "moderate",
                            MemoryPressure::Critical => "critical",
                        },
                        r.bytes_advised + r.gpu_bytes_released
                    );
                    (r.switch, reason)
                }
            };
            if report.from != report.to {
                events.push(self.event(&report, reason, at_token));
            }
        }
        *self.control.submodel.lock().unwrap_or_else(|p| p.into_inner()) = self.engine.name_of(elastic.submodel());
        self.control.position.store(elastic.position(), Ordering::SeqCst);
        Ok(())
    }

    fn event(&self, r: &SwitchReport, reason: String, at_token: usize) -> SwitchEvent {
        let reason = match &r.fallback {
            Some(f) => format!("{reason}; GPU out of memory, stepped down: {f}"),
            None => reason,
        };
        let (from, to) = (self.engine.rename(r.from.clone()), self.engine.rename(r.to.clone()));
        SwitchEvent { from, to, reason, mode: r.mode, at_token, elapsed_ms: r.elapsed_ms }
    }

    /// Queues `p` and applies it now when the session is idle.
    fn queue(&self, p: Pending) -> Result<(), Error> {
        self.control.pending().push(p);
        if let Ok(mut state) = self.state.try_lock() {
            let mut events = Vec::new();
            if let Some(e) = state.elastic.as_mut() {
                self.apply_pending(e, 0, &mut events)?;
            }
            state.idle_events.extend(events);
        }
        Ok(())
    }

    /// Stops a running [`generate`](Self::generate) without waiting for the step in flight
    /// ([`CancelHandle::cancel`]); a no-op when idle.
    pub fn cancel(&self) {
        self.cancel_handle().cancel();
    }

    /// A handle that cancels this session's generation from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle { control: Arc::clone(&self.control) }
    }

    /// Picks the best submodel for `budget` ([`Engine::select`]) and switches to it at the
    /// next token boundary (now, when idle). Returns the plan.
    pub fn set_budget(&self, budget: DeviceBudget) -> Result<Plan, Error> {
        self.engine.check_open()?;
        let plan = self.engine.select(&budget)?;
        self.queue(Pending::Switch { to: plan.entry.levels.clone(), reason: format!("budget: {}", plan.explanation) })?;
        Ok(plan)
    }

    /// Switches to `choice` at the next token boundary (now, when idle).
    pub fn set_submodel(&self, choice: SubmodelChoice) -> Result<(), Error> {
        self.engine.check_open()?;
        let (to, reason) = self.engine.resolve(&choice)?;
        self.queue(Pending::Switch { to, reason })
    }

    /// The OS asks for memory: downshift (one level per layer, or to the smallest submodel
    /// when critical), free GPU buffers and hand the mapping's pages above the new levels back
    /// to the OS, at the next token boundary (now, when idle).
    pub fn on_memory_pressure(&self, pressure: MemoryPressure) -> Result<(), Error> {
        self.engine.check_open()?;
        self.queue(Pending::Pressure(pressure))
    }

    /// Forgets the conversation and empties the KV cache (the system prompt stays). Waits for
    /// a running generation to end: cancel it first.
    pub fn reset(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = state.elastic.as_mut() {
            e.reset();
        }
        if let Some(d) = state.draft.as_mut() {
            d.reset();
        }
        state.unfed.clear();
        state.conversation =
            self.system_prompt.iter().map(|s| ChatMessage { role: "system".into(), content: s.clone() }).collect();
        self.control.position.store(0, Ordering::SeqCst);
    }

    /// Name of the submodel running now (readable while generating).
    pub fn submodel(&self) -> String {
        self.control.submodel.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tokens held in the KV cache (readable while generating).
    pub fn token_count(&self) -> usize {
        self.control.position.load(Ordering::SeqCst)
    }

    /// Bytes held by this session's KV caches: the session's own (on the CPU engine what it
    /// has grown to, on the GPU the whole context window) and, after speculative decoding with
    /// [`DraftCache::Own`](super::DraftCache::Own), the draft's. Waits for a running
    /// generation.
    pub fn kv_cache_bytes(&self) -> u64 {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let own = state.elastic.as_ref().map_or(0, |e| e.backend_session().kv_cache_bytes());
        own + state.draft.as_ref().map_or(0, OwnDraft::kv_cache_bytes)
    }

    /// The most tokens this session holds.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// The conversation so far (system prompt, user and assistant messages). Waits for a
    /// running generation.
    pub fn messages(&self) -> Vec<ChatMessage> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).conversation.clone()
    }

    /// The engine this session runs on.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// The generated tokens' bookkeeping, shared by plain and speculative decoding: observing,
/// end-of-generation and stop tokens, streaming through the stop-string scanner, length.
struct Emitter<'a> {
    eos: Vec<u32>,
    stop_ids: &'a [u32],
    decoder: StreamDecoder,
    stops: StopScanner<'a>,
    ids: Vec<u32>,
    first_token_at: Option<Instant>,
    max_tokens: usize,
    context_length: usize,
    sink: &'a mut dyn TokenSink,
}

impl Emit for Emitter<'_> {
    /// Takes `token` as generated (`position`: tokens in the cache before it would be fed);
    /// `Some` when generation ends with it.
    fn emit(&mut self, token: u32, sampler: &mut Sampler, position: usize) -> Option<FinishReason> {
        sampler.observe(token);
        self.first_token_at.get_or_insert_with(Instant::now);
        self.ids.push(token);
        if self.eos.contains(&token) {
            return Some(FinishReason::Eos);
        }
        if self.stop_ids.contains(&token) {
            return Some(FinishReason::Stop);
        }
        let piece = self.decoder.push(token);
        if let Scan::Stopped = self.stops.push(&piece, self.sink) {
            return Some(FinishReason::Stop);
        }
        if self.ids.len() >= self.max_tokens || position + 1 > self.context_length {
            return Some(FinishReason::Length);
        }
        None
    }

    fn generated(&self) -> usize {
        self.ids.len()
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}

/// What [`StopScanner::push`] decided.
enum Scan {
    Continue,
    Stopped,
}

/// Streams text to the sink while watching for stop strings: text that may be the start of a
/// stop string is held back until it is known not to be; text from a stop string on is never
/// streamed nor kept.
struct StopScanner<'a> {
    stops: &'a [String],
    text: String,
    /// Bytes of `text` already given to the sink.
    sent: usize,
    stopped: bool,
    sink_stopped: bool,
}

impl<'a> StopScanner<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopScanner { stops, text: String::new(), sent: 0, stopped: false, sink_stopped: false }
    }

    fn stopped(&self) -> bool {
        self.stopped
    }

    fn push(&mut self, piece: &str, sink: &mut dyn TokenSink) -> Scan {
        if self.stopped || piece.is_empty() {
            return if self.stopped { Scan::Stopped } else { Scan::Continue };
        }
        let before = self.text.len();
        self.text.push_str(piece);
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A stop string ending in the new piece starts at most `longest - 1` bytes before it.
        let mut from = before.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(at) = hit {
            self.text.truncate(at);
            self.stopped = true;
            self.emit(at, sink);
            return Scan::Stopped;
        }
        // Hold back the longest suffix that is a prefix of a stop string.
        let held = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.text.len() + 1))
                    .rev()
                    .find(|&n| s.is_char_boundary(n) && self.text.ends_with(&s[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let safe = self.text.len() - held;
        if self.emit(safe, sink) {
            self.stopped = true;
            self.sink_stopped = true;
            return Scan::Stopped;
        }
        Scan::Continue
    }

    /// Sends `text[sent..end]`; true when the sink asked to stop.
    fn emit(&mut self, end: usize, sink: &mut dyn TokenSink) -> bool {
        if end <= self.sent || self.sink_stopped {
            return false;
        }
        let piece = &self.text[self.sent..end];
        self.sent = end;
        sink.on_text(piece) == SinkControl::Stop
    }

    /// At the end of generation: whatever was held back is not a stop string; send it.
    fn finish(&mut self, sink: &mut dyn TokenSink) {
        if !self.stopped {
            let end = self.text.len();
            self.emit(end, sink);
        }
    }

    fn into_text(self) -> String {
        self.text
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Session>();
    assert_send_sync::<CancelHandle>();
};
