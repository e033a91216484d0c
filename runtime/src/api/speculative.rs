//! Nested speculative decoding for [`Session::generate`](super::Session::generate): a narrower
//! submodel of the same file drafts `k` tokens, the verifier (the session's submodel) checks
//! them in one batched pass of `k + 1` tokens and keeps the longest agreeing prefix plus its
//! own next token.
//!
//! Greedy: a draft is kept exactly when it is the verifier's greedy token after the same
//! context, so the output is token for token that of plain decoding (on the CPU engine the
//! batched pass and a decode step agree bitwise). Sampling: the standard acceptance rule
//! ([`Sampler::speculative_verdict`]) keeps the verifier's distribution.
//!
//! The draft's KV cache is either the verifier's ([`DraftCache::Shared`]: the draft switches
//! the session's weights in place, keep-KV, writes `k` speculative entries after the accepted
//! ones, and the verify pass overwrites them) or its own ([`DraftCache::Own`]: a second
//! backend session at the draft's width, caught up on the accepted tokens each round).
//!
//! On the GPU a greedy round (no penalties) is one queue submit and one readback with either
//! cache: the draft steps and the verify pass are recorded in one command encoder, each draft
//! step's argmax is copied on the device into the next step's token ids and into the verify
//! pass's, and the verify pass ends with the argmax of every row
//! ([`GpuSession::speculate_greedy`](crate::gpu::GpuSession::speculate_greedy)). Sampling
//! reads the verifier's logits back (one pass per draft step, then the verify pass).

use std::time::Instant;

use super::types::{DraftCache, DraftChoice, FinishReason, SpeculativeOptions, SpeculativeStats};
use super::Error;
use crate::backend::BackendSession;
use crate::elastic::{ElasticSession, SwitchMode};
use crate::sampling::{Sampler, Verdict};
use crate::{ModelFile, Submodel};

/// The draft's own KV cache ([`DraftCache::Own`]), kept by the session between calls.
#[derive(Debug)]
pub(crate) struct OwnDraft {
    session: BackendSession,
    /// Tokens in `session`'s cache, in order.
    history: Vec<u32>,
}

impl OwnDraft {
    /// Bytes held by the draft's KV cache.
    pub(crate) fn kv_cache_bytes(&self) -> u64 {
        self.session.kv_cache_bytes()
    }

    /// Empties the cache (the session was reset).
    pub(crate) fn reset(&mut self) {
        self.session.reset();
        self.history.clear();
    }
}

/// Checks the options (before the session is locked).
pub(crate) fn validate(o: &SpeculativeOptions) -> Result<(), Error> {
    if o.k == 0 {
        return Err(Error::invalid("speculative k must be at least 1"));
    }
    if o.max_k < o.k {
        return Err(Error::invalid(format!("speculative max_k ({}) must be at least k ({})", o.max_k, o.k)));
    }
    if o.draft_vocab == Some(0) {
        return Err(Error::invalid("speculative draft_vocab must be at least 1 token id"));
    }
    Ok(())
}

/// `true` when `draft` is narrower than `verifier`: no layer wider, at least one narrower (a
/// skipped layer is narrower than any level, so the draft runs only layers the verifier runs,
/// and may skip more of them).
pub(crate) fn narrower(draft: &Submodel, verifier: &Submodel) -> bool {
    let rank = |s: &Submodel, i: usize| if s.is_skipped(i) { 0 } else { 1 + u16::from(s.levels[i]) };
    let n = draft.levels.len();
    n == verifier.levels.len()
        && (0..n).all(|i| rank(draft, i) <= rank(verifier, i))
        && (0..n).any(|i| rank(draft, i) < rank(verifier, i))
}

/// The draft submodel `choice` names (`resolve` turns names into submodels as the engine
/// does); fails unless it is narrower than `verifier`.
pub(crate) fn resolve_draft(
    model: &ModelFile,
    choice: &DraftChoice,
    verifier: &Submodel,
    resolve: impl Fn(&str) -> Result<Submodel, Error>,
) -> Result<Submodel, Error> {
    let draft = match choice {
        DraftChoice::Auto => Submodel::with_skip(vec![0; verifier.levels.len()], verifier.skip.clone()),
        DraftChoice::Named(name) => resolve(name)?,
        DraftChoice::Levels(l) => {
            let mut v = Vec::with_capacity(l.len());
            for &x in l {
                v.push(u8::try_from(x).map_err(|_| Error::invalid(format!("level {x} is out of range")))?);
            }
            let sub = Submodel::new(v);
            sub.validate(model.metadata(), model.view().available_levels)?;
            sub
        }
    };
    if !narrower(&draft, verifier) {
        let meta = model.metadata();
        return Err(Error::invalid(format!(
            "the draft {} is not narrower than the verifier {}: speculative decoding needs a smaller nested submodel",
            draft.name(meta),
            verifier.name(meta)
        )));
    }
    Ok(draft)
}

/// A round's drafts, their distributions (sampling only) and the draft passes run.
type Drafted = (Vec<u32>, Vec<Vec<f32>>, usize);

/// A round's drafts, their distributions (sampling only) and what the verifier gave.
type Round = (Vec<u32>, Vec<Vec<f32>>, Verified);

/// What the verify pass gave.
enum Verified {
    /// Every row's logits, row-major `[k + 1, vocab]`.
    Logits(Vec<f32>),
    /// The verifier's greedy token after each prefix (the GPU's one-submit round).
    #[cfg_attr(not(feature = "gpu"), allow(dead_code))]
    Greedy(Vec<u32>),
}

/// GPU queue submits and readbacks done so far by the verifier's session and the draft's own
/// (zero on the CPU engine).
fn gpu_work(elastic: &ElasticSession, own: &Option<OwnDraft>) -> (u64, u64) {
    #[cfg(feature = "gpu")]
    {
        let sessions = [elastic.gpu_session(), own.as_ref().and_then(|o| o.session.gpu())];
        sessions.into_iter().flatten().map(|s| s.counters()).fold((0, 0), |(s, r), c| (s + c.submits, r + c.readbacks))
    }
    #[cfg(not(feature = "gpu"))]
    {
        let _ = (elastic, own);
        (0, 0)
    }
}

/// How a round ended.
pub(crate) enum RoundEnd {
    /// The next token (the verifier's own: a replacement or the bonus token), not yet fed.
    Next(u32),
    /// An accepted draft ended generation (end-of-generation, stop token or string, length).
    Finished(FinishReason),
}

/// One call's speculative state: the draft, the adaptive `k`, the counts.
pub(crate) struct Speculator {
    draft: Submodel,
    cache: DraftCache,
    k: usize,
    max_k: usize,
    adaptive: bool,
    /// The draft's vocabulary: its first `draft_vocab` token ids (`None`: all).
    draft_vocab: Option<usize>,
    stats: SpeculativeStats,
    produced: usize,
}

/// What a round needs from the generation loop: taking one generated token (streams it and
/// says whether generation ends with it). The position is that of the token if it were fed.
pub(crate) trait Emit {
    fn emit(&mut self, token: u32, sampler: &mut Sampler, position: usize) -> Option<FinishReason>;
    /// Tokens generated so far.
    fn generated(&self) -> usize;
    /// Most tokens to generate.
    fn max_tokens(&self) -> usize;
}

impl Speculator {
    /// `vocab`: the model's vocabulary size (for the stats: a limit at or above it is none).
    pub(crate) fn new(o: &SpeculativeOptions, draft: Submodel, name: String, vocab: usize) -> Speculator {
        let limit = o.draft_vocab.filter(|&n| n < vocab);
        Speculator {
            draft,
            cache: o.cache,
            k: o.k,
            max_k: o.max_k,
            adaptive: o.adaptive,
            draft_vocab: o.draft_vocab,
            stats: SpeculativeStats { draft: name, cache: o.cache, draft_vocab: limit, ..SpeculativeStats::default() },
            produced: 0,
        }
    }

    /// The counts so far.
    pub(crate) fn stats(&self) -> SpeculativeStats {
        let mut s = self.stats.clone();
        s.acceptance_rate = if s.proposed > 0 { s.accepted as f64 / s.proposed as f64 } else { 0.0 };
        s.tokens_per_pass = if s.verify_passes > 0 { self.produced as f64 / s.verify_passes as f64 } else { 0.0 };
        s
    }

    /// One round after `next` was emitted (and observed by `sampler`) and before it is fed:
    /// draft, verify, emit the accepted drafts. Leaves the verifier's cache holding every
    /// emitted token but the last (as plain decoding does). When the draft is not narrower
    /// than the verifier (it switched) or no room is left for a draft, it is one plain step.
    pub(crate) fn round(
        &mut self,
        elastic: &mut ElasticSession,
        own: &mut Option<OwnDraft>,
        next: u32,
        sampler: &mut Sampler,
        emitter: &mut dyn Emit,
        context_length: usize,
    ) -> Result<RoundEnd, Error> {
        let p0 = elastic.position();
        let verifier = elastic.submodel().clone();
        let remaining = emitter.max_tokens().saturating_sub(emitter.generated());
        // The verify pass feeds next and k drafts; every token of the round counts.
        let room = context_length.saturating_sub(p0 + 1);
        let k = self.k.min(remaining.saturating_sub(1)).min(room);
        if k == 0 || !narrower(&self.draft, &verifier) {
            return Ok(RoundEnd::Next(elastic.decode_sample(next, sampler)?));
        }
        let greedy = sampler.params().is_greedy();
        let work_before = gpu_work(elastic, own);
        let r = self.draft_and_verify(elastic, own, next, k, greedy, sampler);
        let work_after = gpu_work(elastic, own);
        // Saturating: a draft session replaced in the round starts its counters again.
        self.stats.gpu_submits += work_after.0.saturating_sub(work_before.0);
        self.stats.gpu_readbacks += work_after.1.saturating_sub(work_before.1);
        let (drafts, qs, verified) = r?;
        self.stats.verify_passes += 1;
        self.stats.proposed += k;
        self.stats.last_k = k;
        let vocab = elastic.backend_session().vocab_size();

        for (j, &d) in drafts.iter().enumerate() {
            let verdict = match &verified {
                Verified::Greedy(v) if v[j] == d => Verdict::Accepted,
                Verified::Greedy(v) => Verdict::Rejected(v[j]),
                Verified::Logits(rows) if greedy => {
                    let t = sampler.sample_logits(&rows[j * vocab..(j + 1) * vocab]);
                    if t == d {
                        Verdict::Accepted
                    } else {
                        Verdict::Rejected(t)
                    }
                }
                Verified::Logits(rows) => {
                    let p = sampler.probabilities(&rows[j * vocab..(j + 1) * vocab]);
                    sampler.speculative_verdict(&p, &qs[j], d)
                }
            };
            match verdict {
                Verdict::Accepted => {
                    self.stats.accepted += 1;
                    self.produced += 1;
                    // Fed before `d`: next and the drafts before it.
                    if let Some(f) = emitter.emit(d, sampler, p0 + 1 + j) {
                        elastic.truncate(p0 + 1 + j)?;
                        return Ok(RoundEnd::Finished(f));
                    }
                }
                Verdict::Rejected(t) => {
                    elastic.truncate(p0 + 1 + j)?;
                    self.produced += 1;
                    if self.adaptive {
                        self.k = self.k.saturating_sub(1).max(1);
                    }
                    return Ok(RoundEnd::Next(t));
                }
            }
        }
        // Every draft kept: the verifier's token after the last one comes free.
        self.produced += 1;
        if self.adaptive && k == self.k {
            self.k = (self.k + 1).min(self.max_k);
        }
        Ok(RoundEnd::Next(match &verified {
            Verified::Greedy(v) => v[k],
            Verified::Logits(rows) => sampler.sample_logits(&rows[k * vocab..(k + 1) * vocab]),
        }))
    }

    /// The round's draft steps and verify pass: the drafts, their distributions (sampling
    /// only) and what the verifier gave. Greedy without penalties with a shared cache on the
    /// GPU is one submit ([`ElasticSession::speculate_greedy_gpu`]). Leaves `next` and the
    /// drafts fed to the verifier.
    fn draft_and_verify(
        &mut self,
        elastic: &mut ElasticSession,
        own: &mut Option<OwnDraft>,
        next: u32,
        k: usize,
        greedy: bool,
        sampler: &mut Sampler,
    ) -> Result<Round, Error> {
        let started = Instant::now();
        let p0 = elastic.position();
        #[cfg(feature = "gpu")]
        if greedy && !sampler.params().has_penalties() {
            // One submit per round on the GPU: the draft steps' time is inside it, counted as
            // the verify pass's.
            let fused = match self.cache {
                DraftCache::Shared => elastic.speculate_greedy_gpu(next, &self.draft, k, self.draft_vocab),
                DraftCache::Own => {
                    let (o, catch_up) = self.own_catch_up(elastic, own, next)?;
                    o.session.set_logit_rows(self.draft_vocab)?;
                    let r = elastic.speculate_greedy_gpu_own(&mut o.session, &catch_up, k);
                    if let Some(Ok(r)) = &r {
                        o.history.extend_from_slice(&catch_up);
                        o.history.extend_from_slice(&r.drafts[..k - 1]);
                    }
                    r
                }
            };
            if let Some(r) = fused {
                let r = r?;
                self.stats.verify_ms += started.elapsed().as_secs_f64() * 1e3;
                self.stats.draft_steps += k;
                return Ok((r.drafts, Vec::new(), Verified::Greedy(r.verified)));
            }
        }
        let verifier = elastic.submodel().clone();
        let mut drafter = sampler.fork();
        let (drafts, qs) = match self.cache {
            DraftCache::Shared => {
                elastic.switch_with(&self.draft, SwitchMode::KeepKv)?;
                let r = elastic.set_logit_rows(self.draft_vocab).map_err(Error::from).and_then(|()| {
                    let r = draft_shared(elastic, next, k, greedy, &mut drafter);
                    // The whole vocabulary again, whatever happened.
                    elastic.set_logit_rows(None)?;
                    r
                });
                // The speculative entries go; the verifier's weights come back, whatever happened.
                let cut = elastic.truncate(p0);
                elastic.switch_with(&verifier, SwitchMode::KeepKv)?;
                cut?;
                let (d, q, steps) = r?;
                self.stats.draft_steps += steps;
                (d, q)
            }
            DraftCache::Own => {
                let (d, q, steps) = self.draft_own(elastic, own, next, k, greedy, &mut drafter)?;
                self.stats.draft_steps += steps;
                (d, q)
            }
        };
        let verify_started = Instant::now();
        self.stats.draft_ms += (verify_started - started).as_secs_f64() * 1e3;
        let mut feed = Vec::with_capacity(k + 1);
        feed.push(next);
        feed.extend_from_slice(&drafts);
        let rows = elastic.forward_all(&feed)?;
        self.stats.verify_ms += verify_started.elapsed().as_secs_f64() * 1e3;
        Ok((drafts, qs, Verified::Logits(rows)))
    }

    /// The own-cache draft: catch the draft's cache up on the accepted tokens and `next` (one
    /// batched pass), then draft. Returns the drafts, their distributions (sampling only) and
    /// the draft passes run.
    fn draft_own(
        &mut self,
        elastic: &ElasticSession,
        own: &mut Option<OwnDraft>,
        next: u32,
        k: usize,
        greedy: bool,
        drafter: &mut Sampler,
    ) -> Result<Drafted, Error> {
        let (o, catch_up) = self.own_catch_up(elastic, own, next)?;
        o.session.set_logit_rows(self.draft_vocab)?;
        let mut drafts = Vec::with_capacity(k);
        let mut qs = Vec::new();
        let mut feed = catch_up;
        for _ in 0..k {
            let d = draft_step(&mut o.session, &feed, greedy, drafter, &mut qs)?;
            o.history.extend_from_slice(&feed);
            drafts.push(d);
            feed = vec![d];
        }
        Ok((drafts, qs, k))
    }
}

impl Speculator {
    /// The draft's own session (created, or recreated for another draft) truncated to the
    /// longest prefix of its history that the verifier's history and `next` share, and the
    /// tokens it lacks (at least `next`, whose logits give the first draft).
    fn own_catch_up<'o>(
        &self,
        elastic: &ElasticSession,
        own: &'o mut Option<OwnDraft>,
        next: u32,
    ) -> Result<(&'o mut OwnDraft, Vec<u32>), Error> {
        if own.as_ref().is_none_or(|o| *o.session.submodel() != self.draft) {
            let session = elastic.backend().session(&self.draft)?;
            *own = Some(OwnDraft { session, history: Vec::new() });
        }
        let Some(o) = own.as_mut() else {
            return Err(Error::invalid("the draft session could not be created"));
        };
        let history = elastic.history();
        let want_len = history.len() + 1;
        let token_at = |i: usize| if i < history.len() { history[i] } else { next };
        let mut common = o.history.iter().enumerate().take_while(|&(i, &t)| i < want_len && t == token_at(i)).count();
        // At least the last token is run, for its logits.
        common = common.min(want_len - 1);
        o.session.truncate(common);
        // A sliding-window cache that cannot go back that far starts again from 0.
        common = o.session.position();
        o.history.truncate(common);
        let catch_up: Vec<u32> = (common..want_len).map(token_at).collect();
        Ok((o, catch_up))
    }
}

/// The shared-cache draft: `k` decode steps on the verifier's cache with the draft's weights
/// (the caller switched them in and truncates afterwards).
fn draft_shared(
    elastic: &mut ElasticSession,
    next: u32,
    k: usize,
    greedy: bool,
    drafter: &mut Sampler,
) -> Result<Drafted, Error> {
    let mut drafts = Vec::with_capacity(k);
    let mut qs = Vec::new();
    let mut feed = next;
    for _ in 0..k {
        let d = if greedy {
            elastic.decode_sample(feed, drafter)?
        } else {
            let q = drafter.probabilities(&elastic.decode(feed)?);
            let d = drafter.sample_distribution(&q);
            qs.push(q);
            d
        };
        drafter.observe(d);
        drafts.push(d);
        feed = d;
    }
    Ok((drafts, qs, k))
}

/// One draft pass over `feed` on the draft's own session: the drafted token (greedy: the
/// sampler's choice, on the GPU the device's argmax; sampling: drawn from the distribution,
/// which is pushed to `qs`).
fn draft_step(
    session: &mut BackendSession,
    feed: &[u32],
    greedy: bool,
    drafter: &mut Sampler,
    qs: &mut Vec<Vec<f32>>,
) -> Result<u32, Error> {
    let d = if greedy && !drafter.params().has_penalties() {
        if feed.len() == 1 {
            session.decode_greedy(feed[0])?
        } else {
            session.prefill_greedy(feed)?
        }
    } else {
        let logits = if feed.len() == 1 { session.decode(feed[0])? } else { session.prefill(feed)? };
        if greedy {
            drafter.sample_logits(&logits)
        } else {
            let q = drafter.probabilities(&logits);
            let d = drafter.sample_distribution(&q);
            qs.push(q);
            d
        }
    };
    drafter.observe(d);
    Ok(d)
}
