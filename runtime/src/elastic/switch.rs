//! Switching submodels mid-generation: [`ElasticSession`].
//!
//! Every submodel of a MatFormer file reads a prefix of the same weights, so moving between
//! them needs no copy or reload: the CPU engine reads the mapping in place. What does change
//! is the KV cache (its keys and values depend on the FFN widths of every earlier layer), so
//! a switch re-prefills the cache from the token history with the new submodel. The output
//! after a switch is then exactly (bitwise) that of the new submodel on the same tokens.
//!
//! Under memory pressure [`ElasticSession::on_memory_pressure`] downshifts and then tells the
//! OS it may drop the pages of the levels no longer used
//! ([`ModelFile::release_levels_above`](crate::ModelFile::release_levels_above)).

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::cpu::{CpuEngine, EngineError, Session};
use crate::Submodel;

/// How a switch moves between two submodels, compared layer by layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchDirection {
    /// No layer grows and at least one shrinks.
    Downshift,
    /// No layer shrinks and at least one grows.
    Upshift,
    /// The same submodel.
    Same,
    /// Some layers grow and others shrink (Mix'n'Match to Mix'n'Match).
    Mixed,
}

impl SwitchDirection {
    /// The direction from `from` to `to` (submodels of the same model).
    pub fn between(from: &Submodel, to: &Submodel) -> SwitchDirection {
        let pairs = || from.levels.iter().zip(&to.levels);
        let grows = pairs().any(|(a, b)| b > a);
        let shrinks = pairs().any(|(a, b)| b < a);
        match (grows, shrinks) {
            (false, false) => SwitchDirection::Same,
            (false, true) => SwitchDirection::Downshift,
            (true, false) => SwitchDirection::Upshift,
            (true, true) => SwitchDirection::Mixed,
        }
    }
}

/// What [`ElasticSession::switch_to`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchReport {
    /// Name of the submodel before the switch ([`Submodel::name`]).
    pub from: String,
    /// Name of the submodel after the switch.
    pub to: String,
    /// Down, up, same or mixed.
    pub direction: SwitchDirection,
    /// Tokens of the history run through the new submodel to rebuild the KV cache (0 for
    /// [`SwitchDirection::Same`], which keeps the session).
    pub reprefilled_tokens: usize,
    /// Wall time of the switch, including the re-prefill, in milliseconds.
    pub elapsed_ms: f64,
    /// Logits (`vocab_size` values) of the last history token under the new submodel, to
    /// continue generation; `None` when the history is empty.
    pub last_logits: Option<Vec<f32>>,
}

/// What [`ElasticSession::refresh`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct RefreshReport {
    /// Levels available before the refresh.
    pub levels_before: usize,
    /// Levels available after it (equal to `levels_before` when the file did not grow).
    pub levels_after: usize,
    /// Bytes read and checked: every byte of the newly available levels (segments by CRC,
    /// padding for zero), i.e. the growth of the file; 0 when it did not grow.
    pub bytes_verified: u64,
    /// Wall time of the refresh (re-map, checks, new engine and re-prefill) in milliseconds.
    pub elapsed_ms: f64,
}

/// How urgently the OS asks for memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryPressure {
    /// Shrink every layer by one level (layers already at level 0 stay).
    Moderate,
    /// Go to the smallest uniform submodel (every layer at level 0).
    Critical,
}

/// What [`ElasticSession::on_memory_pressure`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct PressureReport {
    /// The pressure handled.
    pub pressure: MemoryPressure,
    /// The downshift (direction [`SwitchDirection::Same`] when already small enough).
    pub switch: SwitchReport,
    /// Levels above this one were released.
    pub released_above_level: usize,
    /// Bytes of the file mapping the OS was told it may drop (0 for files held in memory and
    /// on non-unix targets).
    pub bytes_advised: u64,
}

/// A generation session that can change submodel at any token boundary: a [`CpuEngine`], the
/// current [`Session`] and the token history of the current generation. `Send`.
///
/// ```no_run
/// use std::sync::Arc;
/// use matformer::elastic::{ElasticSession, MemoryPressure};
/// use matformer::{cpu, ModelFile, Submodel};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let model = Arc::new(ModelFile::open("model.matf")?);
/// let levels = model.view().available_levels;
/// let engine = cpu::CpuEngine::new(model.clone())?;
/// let mut s = ElasticSession::new(engine, &Submodel::parse("xl", model.metadata(), levels)?)?;
/// let mut logits = s.prefill(&[1, 72, 105])?;
/// logits = s.decode(cpu::argmax(&logits))?;
/// let report = s.switch_to(&Submodel::parse("s", model.metadata(), levels)?)?;
/// let next = cpu::argmax(report.last_logits.as_deref().unwrap_or(&logits));
/// s.on_memory_pressure(MemoryPressure::Critical)?;
/// # let _ = next; Ok(()) }
/// ```
pub struct ElasticSession {
    engine: CpuEngine,
    session: Session,
    history: Vec<u32>,
    last_logits: Option<Vec<f32>>,
}

impl fmt::Debug for ElasticSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ElasticSession")
            .field("engine", &self.engine)
            .field("session", &self.session)
            .field("history_len", &self.history.len())
            .finish()
    }
}

impl ElasticSession {
    /// An empty session running `submodel` (one level per layer, each present in the file).
    pub fn new(engine: CpuEngine, submodel: &Submodel) -> Result<ElasticSession, EngineError> {
        let session = engine.session(submodel)?;
        Ok(ElasticSession { engine, session, history: Vec::new(), last_logits: None })
    }

    /// Appends `tokens` to the context and returns the logits of the last one (see
    /// [`Session::prefill`]). On error nothing changes.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let logits = self.session.prefill(tokens)?;
        self.history.extend_from_slice(tokens);
        self.last_logits = Some(logits.clone());
        Ok(logits)
    }

    /// Appends one token and returns its logits. On error nothing changes.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, EngineError> {
        let logits = self.session.decode(token)?;
        self.history.push(token);
        self.last_logits = Some(logits.clone());
        Ok(logits)
    }

    /// Forgets the history and empties the KV cache (a new generation); keeps the submodel.
    pub fn reset(&mut self) {
        self.session.reset();
        self.history.clear();
        self.last_logits = None;
    }

    /// The submodel running now.
    pub fn submodel(&self) -> &Submodel {
        self.session.submodel()
    }

    /// Every token fed so far in this generation (prompt and generated tokens), in order.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// The current session (position, KV cache size, widths).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The engine.
    pub fn engine(&self) -> &CpuEngine {
        &self.engine
    }

    /// Switches to `submodel` at the current token boundary: builds a session for it and
    /// re-prefills the KV cache from the history, so every later output is exactly that of
    /// `submodel` on the same tokens. Downshifts and upshifts need no copy or reload (the
    /// engine reads the weights in place); the cost is one batched prefill of the history.
    /// Switching to the current submodel keeps the session and costs nothing.
    ///
    /// On error (a level not present in the file, a wrong layer count) the session is left
    /// unchanged.
    pub fn switch_to(&mut self, submodel: &Submodel) -> Result<SwitchReport, EngineError> {
        let started = Instant::now();
        let meta = self.engine.model().metadata();
        let from = self.session.submodel().name(meta);
        let mut report = SwitchReport {
            from,
            to: submodel.name(meta),
            direction: SwitchDirection::Same,
            reprefilled_tokens: 0,
            elapsed_ms: 0.0,
            last_logits: None,
        };
        if submodel == self.session.submodel() {
            report.last_logits = self.last_logits.clone();
            report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
            return Ok(report);
        }
        let mut session = self.engine.session(submodel)?;
        let last_logits = if self.history.is_empty() { None } else { Some(session.prefill(&self.history)?) };
        report.direction = SwitchDirection::between(self.session.submodel(), submodel);
        report.reprefilled_tokens = self.history.len();
        report.last_logits = last_logits.clone();
        self.session = session;
        self.last_logits = last_logits;
        report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(report)
    }

    /// Picks up levels appended to the model file since it was opened (a download that
    /// continued from a level boundary) without interrupting the generation: re-maps the file
    /// with [`ModelFile::reopen_grown`](crate::ModelFile::reopen_grown), which checks the
    /// header is unchanged and verifies only the new levels, then builds a new engine on it
    /// (same thread count) and a session for the current submodel, and re-prefills the
    /// history, so the next outputs are bitwise those of the session before. Larger
    /// submodels can then be chosen with [`switch_to`](Self::switch_to).
    ///
    /// A file that did not grow gives a report with equal levels and changes nothing. On
    /// error (cut inside a level, corrupt appended bytes, another model) the session is left
    /// unchanged and keeps running on the old mapping.
    pub fn refresh(&mut self) -> Result<RefreshReport, EngineError> {
        let started = Instant::now();
        let old = self.engine.model();
        let levels_before = old.view().available_levels;
        let old_len = old.view().file_len;
        let mut report =
            RefreshReport { levels_before, levels_after: levels_before, bytes_verified: 0, elapsed_ms: 0.0 };
        if let Some(grown) = old.reopen_grown()? {
            report.levels_after = grown.view().available_levels;
            report.bytes_verified = grown.view().file_len - old_len;
            let engine = CpuEngine::new(Arc::new(grown))?.with_threads(self.engine.threads());
            let mut session = engine.session(self.session.submodel())?;
            let last_logits = if self.history.is_empty() { None } else { Some(session.prefill(&self.history)?) };
            self.engine = engine;
            self.session = session;
            self.last_logits = last_logits;
        }
        report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(report)
    }

    /// Reacts to memory pressure: downshifts ([`MemoryPressure::Moderate`]: every layer one
    /// level down; [`MemoryPressure::Critical`]: every layer at level 0) with
    /// [`switch_to`](Self::switch_to), then tells the OS it may drop the pages of every level
    /// above the new submodel's largest level, so the resident memory of the mapping falls.
    ///
    /// The release concerns the whole file mapping: another session of the same file that
    /// still runs higher levels stays correct (its reads fault the pages back in) but pays
    /// for it.
    pub fn on_memory_pressure(&mut self, pressure: MemoryPressure) -> Result<PressureReport, EngineError> {
        let target = match pressure {
            MemoryPressure::Moderate => {
                Submodel { levels: self.submodel().levels.iter().map(|l| l.saturating_sub(1)).collect() }
            }
            MemoryPressure::Critical => Submodel::uniform(0, self.submodel().levels.len()),
        };
        let switch = self.switch_to(&target)?;
        let level = usize::from(self.submodel().max_level());
        let bytes_advised = self.engine.model().release_levels_above(level)?;
        Ok(PressureReport { pressure, switch, released_above_level: level, bytes_advised })
    }
}

const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<ElasticSession>();
};
