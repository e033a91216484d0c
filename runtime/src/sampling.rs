//! Choosing the next token from logits: greedy, or seeded sampling with the usual truncations
//! and penalties, on the CPU's full logits or on a device's short candidate list.
//!
//! # The pipeline (transformers' and llama.cpp's semantics)
//!
//! For raw logits `l` and the counts `c[t]` of the tokens the [`Sampler`] was told about
//! ([`Sampler::observe`]; typically the prompt and everything generated so far):
//!
//! 1. **Penalties** on every token with `c[t] > 0`, in this order (f32 arithmetic):
//!    repetition penalty `rp` (CTRL, Keskar et al. 2019; transformers'
//!    `RepetitionPenaltyLogitsProcessor`): `l / rp` when `l > 0`, else `l * rp`; then the OpenAI
//!    frequency and presence penalties: `- c[t] * frequency_penalty - presence_penalty`.
//!    The result is the *processed* logit `v`. NaN counts as `-inf` (never drawn) and `-0.0` as
//!    `+0.0`.
//! 2. **Greedy** when `temperature == 0`: the largest `v`, ties to the lowest id (for no
//!    penalties exactly [`crate::cpu::argmax`]). No random number is used.
//! 3. Otherwise `z = v / temperature`, and the tokens are ordered by `z` descending, ties by id
//!    ascending. Then, each step restricting the previous one's set:
//!    - **top-k** (`top_k > 0`): the first `top_k` tokens;
//!    - **top-p** (nucleus, `top_p < 1`): the shortest prefix whose softmax mass (normalised
//!      over the set left by top-k) reaches `top_p`;
//!    - **min-p** (`min_p > 0`): the tokens whose probability is at least `min_p` times the
//!      largest one's, i.e. `z >= z_max + ln(min_p)`;
//!    - one uniform draw `u` in `[0, 1)` from the sampler's generator picks the token whose
//!      cumulative softmax mass over the remaining set (in the order above) first exceeds
//!      `u` times the set's mass.
//!
//! # Candidate lists (sampling on a device)
//!
//! A device need not read the whole vocabulary back. It applies the penalties of
//! [`Sampler::logit_transform`], then returns the `K` tokens with the largest processed logits
//! (ties to the lowest id) and the log-sum-exp of `v / temperature` over **all** tokens
//! ([`Sampler::sample_from_candidates`]). The candidates decide the token exactly when
//! ([`Sampler::sample_from_candidates`] returns `Some`):
//! - `temperature == 0` (greedy needs only the first candidate); or
//! - `top_k > 0` and `top_k <= K` (every later step works inside the first `top_k`); or
//! - `top_p < 1` and the nucleus closes within the `K` candidates (their mass, computed from
//!   the log-sum-exp, reaches `top_p`); or
//! - `min_p > 0` and the last candidate already falls below the min-p threshold; or
//! - with none of these cuts, the draw lands on a candidate (the mass outside the list is
//!   known from the log-sum-exp, so a draw landing there is detected).
//!
//! Otherwise it returns `None` *without consuming the random draw*; the caller then reads the
//! processed logits and calls [`Sampler::sample_processed_logits`], which uses that same draw.
//! [`Sampler::sample_logits`] (the CPU path) runs the same two stages on the full logits, so
//! a seed gives the same tokens on the CPU and on a device wherever their logits agree (up to
//! rounding at a decision boundary, which needs the draw to land within a rounding error of
//! one).

use std::sync::atomic::{AtomicU64, Ordering};

/// Candidates a device returns when `top_k` is off (enough for the nucleus or min-p set of a
/// trained model's distribution at common settings; otherwise the full logits are read once).
pub const DEFAULT_CANDIDATES: usize = 256;

/// Most candidates a device returns in one step (`top_k` above this samples from the full
/// logits).
pub const MAX_CANDIDATES: usize = 1024;

/// How the next token is chosen. [`Default`]: greedy (temperature 0) with no truncation and
/// no penalties. Check with [`SamplingParams::validate`] (done by [`Sampler::new`]).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature, finite and `>= 0`; `0` is greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns it off.
    pub top_k: u32,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    /// `top_p`, in `(0, 1]`; `1` turns it off.
    pub top_p: f32,
    /// Keep only tokens at least `min_p` times as likely as the most likely one, in `[0, 1)`;
    /// `0` turns it off.
    pub min_p: f32,
    /// Repetition penalty over the observed tokens, finite and `> 0`: positive logits divided
    /// by it, negative ones multiplied; `1` turns it off (`> 1` discourages repeats).
    pub repetition_penalty: f32,
    /// Subtracted from an observed token's logit once per occurrence (OpenAI's frequency
    /// penalty), finite; `0` turns it off.
    pub frequency_penalty: f32,
    /// Subtracted once from the logit of every observed token (OpenAI's presence penalty),
    /// finite; `0` turns it off.
    pub presence_penalty: f32,
    /// Seed of the sampler's generator: the same seed, parameters, observed tokens and logits
    /// give the same tokens. `None`: seeded from the clock (not reproducible).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

/// A sampling parameter out of its range.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("sampling parameter {name} = {value} is out of range: expected {expected}")]
pub struct SamplingError {
    /// The field of [`SamplingParams`].
    pub name: &'static str,
    /// The value given.
    pub value: f32,
    /// The allowed range, in words.
    pub expected: &'static str,
}

impl SamplingParams {
    /// Greedy decoding (the default).
    pub fn greedy() -> SamplingParams {
        SamplingParams::default()
    }

    /// `true` when the token is the argmax of the processed logits (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// `true` when a penalty changes the logits of observed tokens.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }

    /// Checks every field's range; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let check = |name, value: f32, ok: bool, expected| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(SamplingError { name, value, expected })
            }
        };
        let t = self.temperature;
        check("temperature", t, t >= 0.0, "a finite value >= 0 (0 is greedy)")?;
        let p = self.top_p;
        check("top_p", p, p > 0.0 && p <= 1.0, "a value in (0, 1] (1 turns it off)")?;
        let m = self.min_p;
        check("min_p", m, (0.0..1.0).contains(&m), "a value in [0, 1) (0 turns it off)")?;
        let r = self.repetition_penalty;
        check("repetition_penalty", r, r > 0.0, "a finite value > 0 (1 turns it off)")?;
        check("frequency_penalty", self.frequency_penalty, true, "a finite value (0 turns it off)")?;
        check("presence_penalty", self.presence_penalty, true, "a finite value (0 turns it off)")?;
        Ok(())
    }
}

/// SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
/// OOPSLA 2014; the constants of Vigna's reference `splitmix64.c`): a 64-bit state advanced by
/// a fixed odd increment and a bijective mixing function of the state. Period 2^64; passes
/// BigCrush. Small, portable and identical on every platform, which is what reproducible
/// sampling needs (not a cryptographic generator).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform value in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// What [`SplitMix64::next_f64`] would return, without advancing.
    fn peek_f64(&self) -> f64 {
        self.clone().next_f64()
    }
}

/// A seed for `seed: None`: the clock mixed with a per-process counter (two samplers created
/// in the same nanosecond still differ).
fn clock_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    SplitMix64::new(nanos ^ n.rotate_left(32)).next_u64()
}

/// What a device applies to the raw logits before choosing candidates (see the
/// [module docs](self)): the penalties of the observed tokens and the temperature of the
/// log-sum-exp.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitTransform<'a> {
    /// [`SamplingParams::repetition_penalty`].
    pub repetition_penalty: f32,
    /// [`SamplingParams::frequency_penalty`].
    pub frequency_penalty: f32,
    /// [`SamplingParams::presence_penalty`].
    pub presence_penalty: f32,
    /// The distinct observed tokens and their counts (`count >= 1`), ascending by token; empty
    /// when no penalty is set.
    pub counts: &'a [(u32, u32)],
    /// The log-sum-exp is over `v / temperature`; `1` for greedy (where it is not used).
    pub temperature: f32,
}

impl LogitTransform<'static> {
    /// No penalties, temperature 1: the candidates are the raw logits' top `K`.
    pub const IDENTITY: LogitTransform<'static> = LogitTransform {
        repetition_penalty: 1.0,
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
        counts: &[],
        temperature: 1.0,
    };
}

impl LogitTransform<'_> {
    /// The processed logit of a token seen `count` times whose raw logit is `logit` (step 1
    /// of the pipeline; `count == 0` returns `logit`). Devices compute the same expression.
    pub fn penalize(&self, logit: f32, count: u32) -> f32 {
        if count == 0 {
            return logit;
        }
        let v = if logit > 0.0 { logit / self.repetition_penalty } else { logit * self.repetition_penalty };
        v - count as f32 * self.frequency_penalty - self.presence_penalty
    }
}

/// A device's sampling candidates for one step (see the [module docs](self)).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Candidates {
    /// `(token, processed logit)`: the `K` largest processed logits, any order.
    pub pairs: Vec<(u32, f32)>,
    /// `ln sum exp(v / temperature)` over every token's processed logit `v`.
    pub log_sum_exp: f32,
}

/// NaN as `-inf`, `-0.0` as `+0.0`: the value the candidate order sees.
fn canonical(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else if v == 0.0 {
        0.0
    } else {
        v
    }
}

/// The candidate order: value descending, then id ascending (values canonical).
fn order(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// A seeded sampler with the penalty state of the tokens it was told about. One per
/// generation stream; `Send`.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// Distinct observed tokens and their counts, ascending by token.
    counts: Vec<(u32, u32)>,
}

impl Sampler {
    /// A sampler for `params` (validated), seeded from `params.seed` (or the clock).
    pub fn new(params: SamplingParams) -> Result<Sampler, SamplingError> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(clock_seed);
        Ok(Sampler { params, rng: SplitMix64::new(seed), counts: Vec::new() })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Restarts the generator from `seed` (the penalty state is kept).
    pub fn reseed(&mut self, seed: u64) {
        self.rng = SplitMix64::new(seed);
    }

    /// Counts `token` in the context the penalties look at.
    pub fn observe(&mut self, token: u32) {
        match self.counts.binary_search_by_key(&token, |&(t, _)| t) {
            Ok(i) => self.counts[i].1 = self.counts[i].1.saturating_add(1),
            Err(i) => self.counts.insert(i, (token, 1)),
        }
    }

    /// [`Sampler::observe`] for each of `tokens`.
    pub fn observe_all(&mut self, tokens: &[u32]) {
        for &t in tokens {
            self.observe(t);
        }
    }

    /// Forgets the observed tokens (a new conversation).
    pub fn clear_context(&mut self) {
        self.counts.clear();
    }

    /// Distinct observed tokens with their counts, ascending by token.
    pub fn context_counts(&self) -> &[(u32, u32)] {
        &self.counts
    }

    /// How many times `token` was observed.
    pub fn count_of(&self, token: u32) -> u32 {
        self.counts.binary_search_by_key(&token, |&(t, _)| t).map_or(0, |i| self.counts[i].1)
    }

    /// What a device applies before choosing candidates (counts empty without penalties).
    pub fn logit_transform(&self) -> LogitTransform<'_> {
        let p = &self.params;
        LogitTransform {
            repetition_penalty: p.repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            counts: if p.has_penalties() { &self.counts } else { &[] },
            temperature: if p.is_greedy() { 1.0 } else { p.temperature },
        }
    }

    /// Candidates to ask a device for: 1 when greedy, `top_k` when set (at most
    /// [`MAX_CANDIDATES`]), else [`DEFAULT_CANDIDATES`].
    pub fn candidate_count(&self) -> usize {
        let p = &self.params;
        if p.is_greedy() {
            1
        } else if p.top_k > 0 {
            (p.top_k as usize).min(MAX_CANDIDATES)
        } else {
            DEFAULT_CANDIDATES
        }
    }

    /// The next token from raw logits (the CPU path): applies the penalties, then samples as
    /// [`Sampler::sample_processed_logits`]. An empty slice gives 0.
    pub fn sample_logits(&mut self, logits: &[f32]) -> u32 {
        if !self.params.has_penalties() {
            return self.sample_processed_logits(logits);
        }
        let tr = self.logit_transform();
        let mut processed = logits.to_vec();
        for &(t, c) in tr.counts {
            if let Some(v) = processed.get_mut(t as usize) {
                *v = tr.penalize(*v, c);
            }
        }
        self.sample_processed_logits(&processed)
    }

    /// The next token from processed logits (penalties already applied, e.g. read back from a
    /// device after [`Sampler::sample_from_candidates`] returned `None`). Uses one draw of the
    /// generator unless greedy. An empty slice gives 0.
    pub fn sample_processed_logits(&mut self, processed: &[f32]) -> u32 {
        if processed.is_empty() {
            return 0;
        }
        if self.params.is_greedy() {
            let mut best = (0u32, canonical(processed[0]));
            for (i, &v) in processed.iter().enumerate().skip(1) {
                let v = canonical(v);
                if v > best.1 {
                    best = (i as u32, v);
                }
            }
            return best.0;
        }
        let mut all: Vec<(u32, f32)> = processed.iter().enumerate().map(|(i, &v)| (i as u32, canonical(v))).collect();
        let k = self.candidate_count().min(all.len());
        let u = self.rng.next_f64();
        // Stage 1: the same top-K and log-sum-exp a device computes.
        if k < all.len() {
            let lse = log_sum_exp(processed, self.params.temperature);
            let _ = all.select_nth_unstable_by(k - 1, order);
            let mut top = all[..k].to_vec();
            top.sort_unstable_by(order);
            if let Some(t) = choose(&self.params, &top, false, lse, u) {
                return t;
            }
        }
        // Stage 2: the whole vocabulary.
        all.sort_unstable_by(order);
        choose(&self.params, &all, true, 0.0, u).unwrap_or(all[0].0)
    }

    /// The next token from a device's candidates: `(token, processed logit)` pairs, the top
    /// `K` of the processed logits in any order, and the log-sum-exp of `v / temperature` over
    /// every token (see the [module docs](self) for when they suffice). `None`: they do not
    /// decide the token; no draw was used, so read the processed logits and call
    /// [`Sampler::sample_processed_logits`]. Greedy returns the first candidate (an empty list
    /// gives `None`).
    #[must_use = "None means the full logits are needed"]
    pub fn sample_from_candidates(&mut self, candidates: &[(u32, f32)], log_sum_exp_of_all: f32) -> Option<u32> {
        let mut sorted: Vec<(u32, f32)> = candidates.iter().map(|&(t, v)| (t, canonical(v))).collect();
        sorted.sort_unstable_by(order);
        if self.params.is_greedy() {
            return sorted.first().map(|c| c.0);
        }
        let r = choose(&self.params, &sorted, false, log_sum_exp_of_all as f64, self.rng.peek_f64());
        if r.is_some() {
            self.rng.next_u64();
        }
        r
    }
}

/// What [`Sampler::speculative_verdict`] decided about one drafted token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The drafted token is kept.
    Accepted,
    /// The drafted token is rejected; this token (drawn from the residual distribution) takes
    /// its place and ends the round.
    Rejected(u32),
}

impl Sampler {
    /// A sampler for a draft: the same parameters and observed tokens, and a generator seeded
    /// by one draw of this one (so the draft's draws are independent of the acceptance draws
    /// that follow, and a seed still reproduces the whole run).
    pub fn fork(&mut self) -> Sampler {
        Sampler { params: self.params, rng: SplitMix64::new(self.rng.next_u64()), counts: self.counts.clone() }
    }

    /// The raw logits with this sampler's penalties applied (step 1 of the pipeline).
    pub fn processed_logits(&self, logits: &[f32]) -> Vec<f32> {
        let mut processed = logits.to_vec();
        if self.params.has_penalties() {
            let tr = self.logit_transform();
            for &(t, c) in tr.counts {
                if let Some(v) = processed.get_mut(t as usize) {
                    *v = tr.penalize(*v, c);
                }
            }
        }
        processed
    }

    /// The distribution [`Sampler::sample_logits`] draws from for these raw logits: penalties,
    /// temperature, top-k, top-p and min-p applied, normalised; zero outside the kept set.
    /// Greedy gives a one-hot vector at the greedy token. Empty logits give an empty vector.
    pub fn probabilities(&self, logits: &[f32]) -> Vec<f32> {
        let processed = self.processed_logits(logits);
        let mut probs = vec![0.0f32; processed.len()];
        if processed.is_empty() {
            return probs;
        }
        let p = &self.params;
        if p.is_greedy() {
            let mut greedy = Sampler { params: *p, rng: self.rng.clone(), counts: Vec::new() };
            probs[greedy.sample_processed_logits(&processed) as usize] = 1.0;
            return probs;
        }
        let mut sorted: Vec<(u32, f32)> =
            processed.iter().enumerate().map(|(i, &v)| (i as u32, canonical(v))).collect();
        sorted.sort_unstable_by(order);
        let t = p.temperature as f64;
        let z0 = sorted[0].1 as f64 / t;
        if !z0.is_finite() {
            // +inf: that token only; -inf: every token has probability 0 and `choose` takes
            // the first.
            probs[sorted[0].0 as usize] = 1.0;
            return probs;
        }
        let mut n = sorted.len();
        if p.top_k > 0 && (p.top_k as usize) < n {
            n = p.top_k as usize;
        }
        let w: Vec<f64> = sorted[..n].iter().map(|&(_, v)| (v as f64 / t - z0).exp()).collect();
        if p.top_p < 1.0 {
            let target = p.top_p as f64 * w.iter().sum::<f64>();
            let mut cum = 0.0;
            if let Some(i) = w.iter().position(|&wi| {
                cum += wi;
                cum >= target
            }) {
                n = i + 1;
            }
        }
        if p.min_p > 0.0 {
            let threshold = (p.min_p as f64).ln();
            let m = sorted[..n].iter().take_while(|&&(_, v)| v as f64 / t - z0 >= threshold).count();
            n = m.max(1);
        }
        let mass: f64 = w[..n].iter().sum();
        for (&(tok, _), &wi) in sorted[..n].iter().zip(&w) {
            probs[tok as usize] = (wi / mass) as f32;
        }
        probs
    }

    /// A token drawn from `probs` (non-negative weights, normalised or not) with one draw of
    /// the generator; a zero-weight token is never drawn. All zero or empty gives 0.
    pub fn sample_distribution(&mut self, probs: &[f32]) -> u32 {
        let u = self.rng.next_f64();
        draw(probs, u)
    }

    /// The standard speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023) for a
    /// token `drafted` that a draft drew from `q`, given the verifier's distribution `p` (both
    /// from [`Sampler::probabilities`]): keep it with probability `min(1, p(x) / q(x))` (one
    /// draw of this sampler's generator), otherwise draw its replacement from
    /// `norm(max(0, p - q))` (a second draw). The token that results is distributed exactly
    /// as `p`. The acceptance draw is made only when `0 < p(x) < q(x)` (otherwise the
    /// decision is certain), so for a one-hot `p` (greedy) the drafted token is kept exactly
    /// when it is the verifier's token.
    pub fn speculative_verdict(&mut self, p: &[f32], q: &[f32], drafted: u32) -> Verdict {
        let px = p.get(drafted as usize).copied().unwrap_or(0.0) as f64;
        let qx = q.get(drafted as usize).copied().unwrap_or(0.0) as f64;
        let accept = if px <= 0.0 {
            false
        } else if px >= qx {
            true
        } else {
            self.rng.next_f64() * qx < px
        };
        if accept {
            return Verdict::Accepted;
        }
        let residual: Vec<f32> = p.iter().zip(q).map(|(&a, &b)| (a - b).max(0.0)).collect();
        let token = if residual.iter().any(|&r| r > 0.0) {
            self.sample_distribution(&residual)
        } else {
            // p == q up to rounding: the residual is empty, p itself is the distribution.
            self.sample_distribution(p)
        };
        Verdict::Rejected(token)
    }
}

/// The token whose cumulative weight first exceeds `u` times the total (zero weights skipped);
/// 0 when every weight is zero.
fn draw(probs: &[f32], u: f64) -> u32 {
    let total: f64 = probs.iter().map(|&w| w.max(0.0) as f64).sum();
    if total <= 0.0 || !total.is_finite() {
        return 0;
    }
    let target = u * total;
    let mut cum = 0.0;
    let mut last = 0;
    for (i, &w) in probs.iter().enumerate() {
        let w = w.max(0.0) as f64;
        if w > 0.0 {
            cum += w;
            last = i;
            if target < cum {
                return i as u32;
            }
        }
    }
    last as u32
}

/// `ln sum exp(v / temperature)` over `processed` (NaN as `-inf`), in f64.
fn log_sum_exp(processed: &[f32], temperature: f32) -> f64 {
    let t = temperature as f64;
    let max = processed.iter().map(|&v| canonical(v) as f64 / t).fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = processed.iter().map(|&v| (canonical(v) as f64 / t - max).exp()).sum();
    max + sum.ln()
}

/// Steps 3 of the pipeline on `sorted` (canonical, in candidate order): the token for draw
/// `u`, or `None` when `sorted` is a strict prefix of the vocabulary (`complete == false`)
/// that cannot decide it. `lse`: log-sum-exp of `z` over the whole vocabulary (used only when
/// `complete == false`).
fn choose(p: &SamplingParams, sorted: &[(u32, f32)], complete: bool, lse: f64, u: f64) -> Option<u32> {
    let first = sorted.first()?;
    let t = p.temperature as f64;
    let z0 = first.1 as f64 / t;
    if z0 == f64::INFINITY {
        return Some(first.0);
    }
    if z0 == f64::NEG_INFINITY {
        // Every listed token has probability 0.
        return complete.then_some(first.0);
    }
    // `bounded`: the set `sorted[..n]` is known to hold every token still in play.
    let mut n = sorted.len();
    let mut bounded = complete;
    if p.top_k > 0 {
        if p.top_k as usize <= n {
            n = p.top_k as usize;
            bounded = true;
        } else if !complete {
            return None;
        }
    }
    // Weights relative to the first token: w = exp(z - z0) <= 1.
    let w: Vec<f64> = sorted[..n].iter().map(|&(_, v)| (v as f64 / t - z0).exp()).collect();
    let mass = |n: usize, bounded: bool| -> Option<f64> {
        if bounded {
            Some(w[..n].iter().sum())
        } else {
            let m = (lse - z0).exp();
            m.is_finite().then_some(m)
        }
    };
    if p.top_p < 1.0 {
        let target = p.top_p as f64 * mass(n, bounded)?;
        let mut cum = 0.0;
        match w.iter().position(|&wi| {
            cum += wi;
            cum >= target
        }) {
            Some(i) => {
                n = i + 1;
                bounded = true;
            }
            // A complete set that never reaches the target (rounding) keeps every token.
            None if !bounded => return None,
            None => {}
        }
    }
    if p.min_p > 0.0 {
        let threshold = (p.min_p as f64).ln();
        let m = sorted[..n].iter().take_while(|&&(_, v)| v as f64 / t - z0 >= threshold).count();
        if m == n && !bounded {
            return None;
        }
        n = m.max(1);
        bounded = true;
    }
    let target = u * mass(n, bounded)?;
    let mut cum = 0.0;
    let mut last = 0;
    for (i, &wi) in w[..n].iter().enumerate() {
        cum += wi;
        if wi > 0.0 {
            last = i;
        }
        if target < cum {
            return Some(sorted[i].0);
        }
    }
    // The draw fell past the listed mass: outside the list, or rounding in a bounded set.
    bounded.then_some(sorted[last].0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // First outputs of Vigna's splitmix64.c seeded with 1234567.
        let mut g = SplitMix64::new(1234567);
        let got: Vec<u64> = (0..3).map(|_| g.next_u64()).collect();
        assert_eq!(got, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn probabilities_are_the_kept_set_normalised() {
        let logits = [1.0f32, 3.0, 2.0, f32::NAN, 0.0];
        let p = |params: SamplingParams| Sampler::new(params).unwrap().probabilities(&logits);
        let g = p(SamplingParams::greedy());
        assert_eq!(g, vec![0.0, 1.0, 0.0, 0.0, 0.0]);
        let full = p(SamplingParams { temperature: 1.0, ..Default::default() });
        let z: f64 = [1.0f64, 3.0, 2.0, 0.0].iter().map(|v| v.exp()).sum();
        assert!((full[1] as f64 - 3.0f64.exp() / z).abs() < 1e-6);
        assert_eq!(full[3], 0.0, "NaN is never drawn");
        let top2 = p(SamplingParams { temperature: 1.0, top_k: 2, ..Default::default() });
        assert_eq!(top2.iter().filter(|&&v| v > 0.0).count(), 2);
        assert!((top2.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((top2[1] / top2[2] - 1.0f32.exp()).abs() < 1e-5);
        // min-p 0.5: only tokens within ln 2 of the best.
        let minp = p(SamplingParams { temperature: 1.0, min_p: 0.5, ..Default::default() });
        assert_eq!(minp, vec![0.0, 1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn probabilities_apply_the_penalties_of_observed_tokens() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 4.0, ..Default::default() }).unwrap();
        s.observe(1);
        // 3.0 / 4 < 2.0: the greedy token moves to 2.
        assert_eq!(s.probabilities(&[1.0, 3.0, 2.0]), vec![0.0, 0.0, 1.0]);
        assert_eq!(s.processed_logits(&[1.0, 3.0, 2.0]), vec![1.0, 0.75, 2.0]);
    }

    #[test]
    fn fork_is_reproducible_and_independent_of_the_parent_stream() {
        let params = SamplingParams { temperature: 1.0, seed: Some(5), ..Default::default() };
        let mut a = Sampler::new(params).unwrap();
        let mut b = Sampler::new(params).unwrap();
        a.observe(3);
        b.observe(3);
        let (mut fa, mut fb) = (a.fork(), b.fork());
        assert_eq!(fa.context_counts(), &[(3, 1)]);
        let da: Vec<u64> = (0..4).map(|_| fa.rng.next_u64()).collect();
        let db: Vec<u64> = (0..4).map(|_| fb.rng.next_u64()).collect();
        assert_eq!(da, db, "same seed, same fork");
        let parent: Vec<u64> = (0..4).map(|_| a.rng.next_u64()).collect();
        assert_ne!(da, parent, "the fork does not replay the parent's draws");
    }

    #[test]
    fn sample_distribution_never_draws_a_zero_weight() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: Some(1), ..Default::default() }).unwrap();
        for _ in 0..1000 {
            let t = s.sample_distribution(&[0.0, 0.3, 0.0, 0.7, 0.0]);
            assert!(t == 1 || t == 3);
        }
        assert_eq!(s.sample_distribution(&[0.0, 0.0]), 0);
        assert_eq!(s.sample_distribution(&[]), 0);
    }

    #[test]
    fn speculative_verdict_cases() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: Some(2), ..Default::default() }).unwrap();
        let before = s.rng.clone();
        // One-hot p (greedy): kept exactly when it is the verifier's token, with no draw.
        assert_eq!(s.speculative_verdict(&[0.0, 1.0, 0.0], &[0.0, 1.0, 0.0], 1), Verdict::Accepted);
        assert_eq!(s.rng, before, "a certain acceptance uses no draw");
        assert_eq!(s.speculative_verdict(&[0.0, 1.0, 0.0], &[1.0, 0.0, 0.0], 0), Verdict::Rejected(1));
        // p(x) >= q(x): always kept.
        for _ in 0..100 {
            assert_eq!(s.speculative_verdict(&[0.5, 0.5], &[0.2, 0.8], 0), Verdict::Accepted);
        }
        // A rejection's replacement comes from max(0, p - q): here only token 0.
        for _ in 0..100 {
            match s.speculative_verdict(&[0.5, 0.5], &[0.2, 0.8], 1) {
                Verdict::Accepted => {}
                Verdict::Rejected(t) => assert_eq!(t, 0),
            }
        }
    }

    #[test]
    fn penalize_follows_the_documented_order() {
        let tr = LogitTransform {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            counts: &[],
            temperature: 1.0,
        };
        assert_eq!(tr.penalize(3.0, 2), 3.0 / 2.0 - 1.0 - 0.25);
        assert_eq!(tr.penalize(-3.0, 1), -6.0 - 0.5 - 0.25);
        assert_eq!(tr.penalize(-3.0, 0), -3.0);
    }
}
