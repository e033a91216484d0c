//! [`GpuSession`]: one submodel's generation state on the GPU (KV cache, activations, dispatch
//! plan), its passes (one command encoder and one submit each) and what they read back: the
//! argmax (4 bytes), sampling candidates (`8k + 4` bytes) or logits.
//!
//! A pass over `t` tokens (`t = 1` for decode) is recorded into one command encoder from a
//! plan built once per session; only a 16-byte step uniform (`pos0`, `t`) and the token ids
//! are written per pass.
//!
//! A greedy speculative round ([`GpuSession::speculate_greedy`],
//! [`GpuSession::speculate_greedy_own`]) records several passes in one encoder: the step
//! uniform of each comes from a table copied in between the passes, and each draft step's
//! argmax is copied into the next pass's token ids on the device, so the round is one submit
//! and one readback.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::device::map_read;
use super::engine::{widths_of, Inner, StepCounters};
use super::ffn_store::LayerFfn;
use super::gemma3n::{G3Acts, G3Layer};
use super::ops::{
    split_partial_floats, ArgmaxParams, AttentionParams, Kernel, PipeKey, RopeParams, StepParams, TopkParams,
};
use super::plan::{plan_shared, record, Dispatch, FfnPlan, G3Ctx, Grid, Item, Plan, Planner};
use super::weights::{pad8, zeroed};
use super::GpuError;
use crate::sampling::{Candidates, LogitTransform, Sampler, MAX_CANDIDATES};
use crate::Submodel;

/// Session buffers.
#[derive(Debug)]
struct Buffers {
    step: wgpu::Buffer,
    tokens: wgpu::Buffer,
    logits: wgpu::Buffer,
    argmax: wgpu::Buffer,
    argmax_staging: wgpu::Buffer,
    /// Rows of the activation buffers (tokens per pass).
    t_max: usize,
    /// Padded row length of the logits.
    sv: usize,
}

/// A generation session on the GPU: one submodel, its FFN weight prefixes, a GPU-resident KV
/// cache (`f32`) and position. `Send`.
pub struct GpuSession {
    inner: Arc<Inner>,
    submodel: Submodel,
    bufs: Buffers,
    plan: Plan,
    tail_last: Vec<Item>,
    tail_all: Vec<Item>,
    /// Vocabulary entries whose logits a pass computes ([`GpuSession::set_logit_rows`]).
    logit_rows: usize,
    /// The last token's tail over the first `rows` vocabulary entries, `(rows, items)`: built
    /// by the first [`GpuSession::set_logit_rows`] (or reduced-vocabulary speculative round)
    /// for that count.
    tail_rows: Option<(usize, Vec<Item>)>,
    pos: usize,
    /// Gemma 3n's sliding-window ring-buffer caches.
    ring: RingState,
    counters: StepCounters,
    kv_bytes: u64,
    /// Activation buffers and KV cache (kept across switches).
    acts: Acts,
    /// The FFN layers the plan reads (held so the store may trim without breaking the plan).
    ffn: Vec<Option<Arc<LayerFfn>>>,
    /// A Gemma 3n file's buffers and layer weights.
    g3: Option<G3Acts>,
    /// Bytes counted in `Inner::session_bytes` for this session.
    alloc_bytes: u64,
    /// The candidate tail, created by the first candidates call.
    sampling: Option<SamplingBufs>,
    /// The speculative round's buffers, created by the first [`GpuSession::speculate_greedy`].
    spec: Option<SpecBufs>,
}

/// The ring-buffer K/V caches of Gemma 3n's sliding-window layers: position `j` at row
/// `j % rows`, so a cache holds the last `rows` positions written.
#[derive(Debug, Default)]
struct RingState {
    /// Rows of each ring cache; 0 when no cache is a ring (every other file, or a context no
    /// larger than the ring would be).
    rows: usize,
    /// The sliding window: a query at position `p` reads positions `p - window + 1 ..= p`.
    window: usize,
    /// The layers whose caches are rings (sliding-window layers that own their K/V).
    layers: Vec<usize>,
    /// One past the highest position any pass wrote since the cache was last emptied: the
    /// rows of positions below `high - rows` may have been overwritten.
    high: usize,
}

impl RingState {
    /// Whether the ring caches still hold every position a query at `position` reads.
    fn reaches(&self, position: usize) -> bool {
        self.rows == 0 || position.saturating_sub(self.window - 1) >= self.high.saturating_sub(self.rows)
    }

    /// Whether a run of `n` tokens from `start` may overwrite rows that going back to `start`
    /// needs (then [`GpuSession::save_ring`] keeps a copy first).
    fn run_overwrites(&self, start: usize, n: usize) -> bool {
        self.rows > 0 && start > 0 && (start + n).saturating_sub(self.rows) > start.saturating_sub(self.window - 1)
    }
}

/// The rows of positions `[lo, lo + n)` of every ring cache, copied by
/// [`GpuSession::save_ring`] (per ring layer: keys, values).
struct RingBackup {
    lo: usize,
    n: usize,
    copies: Vec<(wgpu::Buffer, wgpu::Buffer)>,
}

/// Buffers and plans of [`GpuSession::speculate_greedy`].
#[derive(Debug)]
struct SpecBufs {
    /// The step uniforms of a round, 16 bytes each: one per draft step, then the verify pass's
    /// (copied into the session's step uniform before each pass).
    steps: wgpu::Buffer,
    /// The round's token ids: the fed token, then the drafts (copied from the argmax of each
    /// draft step).
    ids: wgpu::Buffer,
    /// What the round reads back: the verifier's argmax of each row, then the drafts.
    staging: wgpu::Buffer,
    /// The verify pass's tail: every row's logits, then the argmax of each row.
    tail: Vec<Item>,
    /// The draft the FFN plans below are for.
    draft: Option<DraftPlan>,
}

/// The draft's FFN blocks, recorded in place of the session's own for the draft steps.
#[derive(Debug)]
struct DraftPlan {
    submodel: Submodel,
    ffn: Vec<FfnPlan>,
    /// The FFN layers those plans read (held as [`GpuSession`] holds its own).
    _layers: Vec<Option<Arc<LayerFfn>>>,
}

/// What [`GpuSession::speculate_greedy`] read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeculativeRound {
    /// The `k` drafted tokens (the draft's greedy tokens, each fed to the next draft step).
    pub drafts: Vec<u32>,
    /// The verifier's greedy token after each of the `k + 1` prefixes: after the fed token,
    /// then after each draft.
    pub verified: Vec<u32>,
}

/// Buffers and tail of [`GpuSession::decode_candidates`]: the last token's logits, then
/// `topk.wgsl` (penalties in place, top-k, log-sum-exp), then a copy of its output to
/// `staging`.
#[derive(Debug)]
struct SamplingBufs {
    params: wgpu::Buffer,
    /// `(token, count)` pairs, room for one per vocabulary entry.
    pen: wgpu::Buffer,
    /// `MAX_CANDIDATES` pairs and the log-sum-exp.
    out: wgpu::Buffer,
    staging: wgpu::Buffer,
    tail: Vec<Item>,
}

impl Drop for GpuSession {
    fn drop(&mut self) {
        self.inner.session_bytes.fetch_sub(self.alloc_bytes, Ordering::Relaxed);
    }
}

/// Bytes counted in `Inner::session_bytes` while a session is being created: given back if
/// creation fails.
struct Reservation<'a> {
    counter: &'a AtomicU64,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// What [`GpuSession::switch_to`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GpuSwitch {
    /// FFN weight bytes uploaded from the mapping (the rows the engine's store lacked; 0 for a
    /// downshift).
    pub uploaded_bytes: u64,
    /// Time spent uploading, ms.
    pub upload_ms: f64,
    /// Whole switch (upload and plan rebuild, not the re-prefill), ms.
    pub total_ms: f64,
    /// `true` when the submodel did not change and the KV cache was kept.
    pub cache_kept: bool,
}

/// Session activation buffers, KV cache and submodel-independent uniforms.
#[derive(Debug)]
pub(super) struct Acts {
    pub(super) x: wgpu::Buffer,
    pub(super) xn: wgpu::Buffer,
    /// q, k and v of each token in one row of `sqkv` floats: q at 0, k at `sq`, v at
    /// `sq + skv`.
    pub(super) qkv: wgpu::Buffer,
    pub(super) att: wgpu::Buffer,
    pub(super) up: wgpu::Buffer,
    pub(super) gate: wgpu::Buffer,
    pub(super) scores: wgpu::Buffer,
    /// Partial sums of the split transposed GEMV (binding 5 of every matrix product).
    pub(super) partials: wgpu::Buffer,
    pub(super) caches: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    pub(super) rope: wgpu::Buffer,
    pub(super) attn_params: wgpu::Buffer,
    pub(super) sd: usize,
    pub(super) sq: usize,
    /// `sq + 2 * pad8(kv_dim)`.
    pub(super) sqkv: usize,
    pub(super) sw: usize,
}

impl fmt::Debug for GpuSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuSession")
            .field("submodel", &self.submodel.levels)
            .field("position", &self.pos)
            .field("counters", &self.counters)
            .finish()
    }
}

/// Which logits a pass computes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tail {
    None,
    /// Last token's logits into logits row 0, then its argmax.
    Last,
    /// Last token's logits into logits row 0, then the sampling candidates (`k` of them).
    Candidates(usize),
    /// Every token's logits.
    All,
}

impl GpuSession {
    pub(super) fn new(inner: Arc<Inner>, submodel: &Submodel) -> Result<GpuSession, GpuError> {
        let model = Arc::clone(&inner.model);
        let meta = model.metadata();
        submodel.validate(meta, model.view().available_levels)?;
        let widths = widths_of(&model, submodel);
        let i = &*inner;
        let dm = &i.dims;
        let gpu = &i.gpu;
        // Activations and caches use the device limit; `max_binding` caps weight chunks.
        let limit = gpu.max_binding();
        let (sd, sq, skv) = (pad8(dm.d_model), pad8(dm.q_dim), pad8(dm.kv_dim));
        // FFN activations are sized for the widest level so that any later switch fits.
        let sw = pad8(i.max_ffn_width);
        let sv = pad8(dm.vocab);
        let sqkv = sq + 2 * skv;

        // Tokens per pass: the prefill chunk, reduced until every activation buffer fits.
        let row_max = [sd, sqkv, sw, sv, dm.n_heads * i.ctx].into_iter().max().unwrap_or(1) as u64 * 4;
        let t_max = (i.prefill_chunk as u64).min(limit / row_max).max(1) as usize;
        if row_max > limit {
            return Err(GpuError::BufferTooLarge { what: "one token's activations".into(), bytes: row_max, limit });
        }
        let f = 4u64;
        let t = t_max as u64;
        let gate_rows = if dm.gated { sw } else { 0 };
        let act_floats = 2 * sd + 2 * sq + 2 * skv + sw + gate_rows + dm.n_heads * i.ctx + sv;
        // Only a layer that computes its own K/V caches it (every layer but a Gemma 3n file's
        // K/V-sharing ones).
        let g3e = i.g3n.as_ref();
        let owns_kv = |li: usize| g3e.is_none_or(|g| g.config.owns_kv(li));
        // A Gemma 3n sliding-window layer's cache is a ring of `ring` rows when that is
        // smaller than the context (see `gemma3n::ring_rows`); other layers hold the context.
        let ring = g3e.map_or(0, |g| super::gemma3n::ring_rows(g.config.sliding_window as usize, t_max, i.ctx));
        let window = g3e.map_or(0, |g| (g.config.sliding_window as usize).max(1));
        let ring_layer = |li: usize| ring > 0 && g3e.is_some_and(|g| g.config.sliding.get(li) == Some(&true));
        let cache_rows = |li: usize| if ring_layer(li) { ring } else { i.ctx };
        let kv_bytes: u64 =
            (0..dm.n_layers).filter(|&li| owns_kv(li)).map(|li| 2 * (cache_rows(li) * skv) as u64 * f).sum();
        // Transposed products (the FFN down projection) have `d_model` output columns.
        let partials_floats = split_partial_floats(sd / 8);
        let g3_bytes = g3e.map_or(0, |g| super::gemma3n::acts_bytes(g, dm, t_max));
        let alloc_bytes =
            t * act_floats as u64 * f + 2 * t * 4 + kv_bytes + 4 * 16 + partials_floats as u64 * f + g3_bytes;
        i.check_limit(alloc_bytes, "allocating a session's KV cache and activations")?;
        // Counted from here on (so the FFN upload below sees it); given back on early return.
        i.session_bytes.fetch_add(alloc_bytes, Ordering::Relaxed);
        let reservation = Reservation { counter: &i.session_bytes, bytes: alloc_bytes };

        // FFN weight prefixes: only the rows of this submodel's levels the store lacks.
        let (ffn, _uploaded) = i.ensure_ffn(&widths)?;

        use wgpu::BufferUsages as U;
        let act = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        let buf = |label: &str, bytes: u64, usage: U| zeroed(gpu, label, bytes, usage, limit);
        let step = buf("step", 16, U::UNIFORM | U::COPY_DST)?;
        let tokens = buf("tokens", t * 4, U::STORAGE | U::COPY_DST)?;
        let logits = buf("logits", t * sv as u64 * f, act)?;
        // One u32 per row: the verify pass of a speculative round takes every row's argmax.
        let argmax = buf("argmax", (t * 4).div_ceil(16).max(1) * 16, act)?;
        let argmax_staging = buf("argmax staging", 16, U::MAP_READ | U::COPY_DST)?;
        let mut caches = Vec::with_capacity(dm.n_layers);
        for li in 0..dm.n_layers {
            let bytes = if owns_kv(li) { (cache_rows(li) * skv) as u64 * f } else { 16 };
            caches.push((
                buf(&format!("k cache {li}"), bytes, U::STORAGE | U::COPY_DST | U::COPY_SRC)?,
                buf(&format!("v cache {li}"), bytes, U::STORAGE | U::COPY_DST | U::COPY_SRC)?,
            ));
        }
        let partials = buf("split gemv partials", partials_floats as u64 * f, U::STORAGE)?;
        let p = Planner { inner: i, step: &step, partials: &partials };
        let half = dm.head_dim / 2;
        let acts = Acts {
            x: buf("x", t * sd as u64 * f, act)?,
            xn: buf("xn", t * sd as u64 * f, act)?,
            qkv: buf("qkv", t * sqkv as u64 * f, act)?,
            att: buf("att", t * sq as u64 * f, act)?,
            up: buf("ffn up", t * sw as u64 * f, act)?,
            gate: buf("ffn gate", if dm.gated { t * sw as u64 * f } else { 16 }, act)?,
            scores: buf("scores", t * (dm.n_heads * i.ctx) as u64 * f, act)?,
            partials: partials.clone(),
            caches,
            rope: p.uniform(
                "rope params",
                &RopeParams {
                    n_heads: dm.n_heads as u32,
                    n_kv_heads: dm.n_kv_heads as u32,
                    head_dim: dm.head_dim as u32,
                    half: half as u32,
                    q_stride: sqkv as u32,
                    kv_stride: skv as u32,
                    sin_offset: (i.ctx * half) as u32,
                    k_offset: sq as u32,
                    v_offset: (sq + skv) as u32,
                    _pad: [0; 3],
                },
            )?,
            attn_params: p.uniform(
                "attention params",
                &AttentionParams {
                    n_heads: dm.n_heads as u32,
                    group: (dm.n_heads / dm.n_kv_heads) as u32,
                    head_dim: dm.head_dim as u32,
                    q_stride: sqkv as u32,
                    kv_stride: skv as u32,
                    out_stride: sq as u32,
                    ctx: i.ctx as u32,
                    scale: 1.0 / (dm.head_dim as f32).sqrt(),
                    window: 0,
                    ring: 0,
                    _pad: [0; 2],
                },
            )?,
            sd,
            sq,
            sqkv,
            sw,
        };
        let g3 = match g3e {
            Some(g) => {
                let mut ga = G3Acts::new(&p, g, t_max, sqkv, sq, ring)?;
                ga.layers = g.ensure_layers(i, &skipped(submodel, dm.n_layers))?;
                Some(ga)
            }
            None => None,
        };
        let (embed, attn) = match (g3e, &g3) {
            (Some(g), Some(ga)) => {
                (super::gemma3n::plan_embed(&p, g, ga, &tokens, sd)?, (0..dm.n_layers).map(|_| Vec::new()).collect())
            }
            _ => plan_shared(&p, &tokens, &acts)?,
        };
        let mut plan = Plan { embed, attn, ffn: Vec::new(), cache: HashMap::new() };
        plan.set_ffn(&p, &acts, g3_ctx(i, g3.as_ref()), &ffn, &widths)?;

        let mut tail_last = head_items(&p, &acts, g3.as_ref(), &logits, sv, true)?;
        let am = p.uniform("argmax params", &ArgmaxParams { n: dm.vocab as u32, stride: sv as u32, _pad: [0; 2] })?;
        let pipe = i.kernels.pipeline(gpu, &PipeKey::new(Kernel::Argmax, "main", &[]))?;
        let bind = i.kernels.bind(gpu, Kernel::Argmax, &[&am, &logits, &argmax])?;
        tail_last.push(Item::Dispatch(Dispatch::Fixed { pipe, bind, grid: Grid::Fixed(1, 1) }));
        let tail_all = head_items(&p, &acts, g3.as_ref(), &logits, sv, false)?;

        gpu.take_uncaptured("creating a session")?;
        // The session's `Drop` gives the bytes back from now on.
        std::mem::forget(reservation);
        Ok(GpuSession {
            inner: Arc::clone(&inner),
            submodel: submodel.clone(),
            bufs: Buffers { step, tokens, logits, argmax, argmax_staging, t_max, sv },
            acts,
            ffn,
            g3,
            plan,
            tail_last,
            tail_all,
            logit_rows: dm.vocab,
            tail_rows: None,
            pos: 0,
            ring: RingState {
                rows: ring,
                window,
                layers: (0..dm.n_layers).filter(|&li| owns_kv(li) && ring_layer(li)).collect(),
                high: 0,
            },
            counters: StepCounters::default(),
            kv_bytes,
            alloc_bytes,
            sampling: None,
            spec: None,
        })
    }

    /// Switches this session to `submodel` without reloading anything: the FFN rows the
    /// engine's store lacks are uploaded (only those: a downshift uploads nothing and copies
    /// nothing), the dispatch plan is rebuilt for the new widths, and the session's buffers
    /// (KV cache, activations) are kept. The KV cache is emptied (its keys and values depend on
    /// the FFN widths of earlier layers), so the caller re-prefills the history to continue
    /// exactly as `submodel` would; [`ElasticSession`](crate::elastic::ElasticSession) does.
    /// Switching to the current submodel changes nothing and keeps the cache.
    ///
    /// On error (a level not in the file, [`GpuError::OutOfMemory`]) the session is unchanged.
    pub fn switch_to(&mut self, submodel: &Submodel) -> Result<GpuSwitch, GpuError> {
        let started = Instant::now();
        let inner = Arc::clone(&self.inner);
        let model = &inner.model;
        submodel.validate(model.metadata(), model.view().available_levels)?;
        if *submodel == self.submodel {
            return Ok(GpuSwitch { cache_kept: true, ..GpuSwitch::default() });
        }
        let widths = widths_of(model, submodel);
        let (ffn, uploaded_bytes) = inner.ensure_ffn(&widths)?;
        let layers = self.ensure_g3_layers(submodel)?;
        let upload_ms = started.elapsed().as_secs_f64() * 1e3;
        let p = Planner { inner: &inner, step: &self.bufs.step, partials: &self.acts.partials };
        let ctx =
            self.g3.as_ref().zip(inner.g3n.as_ref()).map(|(acts, engine)| G3Ctx { engine, acts, layers: &layers });
        self.plan.set_ffn(&p, &self.acts, ctx, &ffn, &widths)?;
        inner.gpu.take_uncaptured("switching submodel")?;
        self.ffn = ffn;
        if let Some(g) = &mut self.g3 {
            g.layers = layers;
        }
        self.submodel = submodel.clone();
        self.pos = 0;
        Ok(GpuSwitch { uploaded_bytes, upload_ms, total_ms: started.elapsed().as_secs_f64() * 1e3, cache_kept: false })
    }

    /// [`switch_to`](Self::switch_to) that keeps the KV cache and position: later tokens run
    /// `submodel` over the keys and values the previous submodel wrote (the keep-KV switch,
    /// no re-prefill). On error the session is unchanged. Refused (as by the CPU engine, whose
    /// pass fails on the missing entries) when `submodel` runs again a skipped layer that caches
    /// its own K/V while the cache holds tokens: that layer wrote no entries for them
    /// ([`unskipped_kv_layers`](crate::elastic::unskipped_kv_layers)); use `switch_to` and
    /// re-prefill.
    pub fn switch_keep_cache(&mut self, submodel: &Submodel) -> Result<GpuSwitch, GpuError> {
        let pos = self.pos;
        let missing = crate::elastic::unskipped_kv_layers(&self.submodel, submodel, self.inner.model.metadata());
        if pos > 0 && !missing.is_empty() {
            return Err(GpuError::InvalidArgument {
                what: format!(
                    "a keep-KV switch that runs layers {missing:?} again: they own their K/V and wrote none for \
                     the {pos} cached tokens; switch with a re-prefill"
                ),
            });
        }
        let mut sw = self.switch_to(submodel)?;
        self.pos = pos;
        sw.cache_kept = true;
        Ok(sw)
    }

    /// Re-reads this session's FFN layers from the engine's store (after
    /// [`GpuEngine::trim_ffn`](super::GpuEngine::trim_ffn)) so that it stops holding GPU buffers the store released.
    /// The weights are the same rows, so the KV cache and position are kept. Uploads only if
    /// the store was trimmed below this session's widths.
    pub fn rebind(&mut self) -> Result<u64, GpuError> {
        let inner = Arc::clone(&self.inner);
        let widths = widths_of(&inner.model, &self.submodel);
        let (ffn, uploaded) = inner.ensure_ffn(&widths)?;
        let layers = self.ensure_g3_layers(&self.submodel.clone())?;
        let p = Planner { inner: &inner, step: &self.bufs.step, partials: &self.acts.partials };
        self.plan.cache.clear();
        let ctx =
            self.g3.as_ref().zip(inner.g3n.as_ref()).map(|(acts, engine)| G3Ctx { engine, acts, layers: &layers });
        self.plan.set_ffn(&p, &self.acts, ctx, &ffn, &widths)?;
        self.ffn = ffn;
        if let Some(g) = &mut self.g3 {
            g.layers = layers;
        }
        if let Some(sb) = &mut self.spec {
            // The draft's plans read the store's old buffers: rebuilt by the next round.
            sb.draft = None;
        }
        Ok(uploaded)
    }

    /// The submodel this session runs.
    pub fn submodel(&self) -> &Submodel {
        &self.submodel
    }

    /// Tokens in the KV cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The context window: the KV cache holds at most this many tokens.
    pub fn max_context(&self) -> usize {
        self.inner.ctx
    }

    /// Vocabulary size (length of a logits vector).
    pub fn vocab_size(&self) -> usize {
        self.inner.dims.vocab
    }

    /// Bytes of this session's FFN weight prefixes on the GPU.
    pub fn ffn_weight_bytes(&self) -> u64 {
        self.plan.ffn_bytes()
    }

    /// Bytes of the GPU KV cache, allocated when the session is made: the whole context window
    /// per layer that owns its K/V, except a Gemma 3n sliding-window layer's ring (its window
    /// plus two prefill chunks of rows, when that is smaller).
    pub fn kv_cache_bytes(&self) -> u64 {
        self.kv_bytes
    }

    /// GPU work done so far (cumulative; see [`GpuSession::reset_counters`]).
    pub fn counters(&self) -> StepCounters {
        self.counters
    }

    /// Zeroes the counters.
    pub fn reset_counters(&mut self) {
        self.counters = StepCounters::default();
    }

    /// Empties the KV cache.
    pub fn reset(&mut self) {
        self.pos = 0;
        self.ring.high = 0;
    }

    /// Forgets every token from `position` on (no-op if `position >= self.position()`).
    ///
    /// A Gemma 3n sliding-window layer's cache is a ring that holds only the last positions
    /// (the window and two prefill chunks; [`GpuSession::kv_cache_bytes`]): going back
    /// further than its rows reach empties the cache ([`GpuSession::position`] becomes 0) and
    /// the caller runs the tokens again (`ElasticSession::truncate` does, from its history),
    /// as on the CPU engine.
    pub fn truncate(&mut self, position: usize) {
        let pos = self.pos.min(position);
        if pos < self.pos && !self.ring.reaches(pos) {
            self.reset();
            return;
        }
        self.pos = pos;
    }

    /// Before a run of `n` tokens that may overwrite ring rows that restoring the current
    /// position needs (a prefill longer than the ring's spare rows), copies them aside.
    fn save_ring(&self, n: usize) -> Result<Option<RingBackup>, GpuError> {
        let start = self.pos;
        if !self.ring.run_overwrites(start, n) {
            return Ok(None);
        }
        let lo = start.saturating_sub(self.ring.window - 1);
        let rows = start - lo;
        let gpu = &self.inner.gpu;
        let row_bytes = (pad8(self.inner.dims.kv_dim) * 4) as u64;
        let bytes = rows as u64 * row_bytes;
        self.inner.check_limit(2 * bytes * self.ring.layers.len() as u64, "saving the sliding-window caches")?;
        use wgpu::BufferUsages as U;
        let mut copies = Vec::with_capacity(self.ring.layers.len());
        for &li in &self.ring.layers {
            let b = |what: &str| {
                zeroed(gpu, &format!("{what} cache {li} saved"), bytes, U::COPY_SRC | U::COPY_DST, gpu.max_binding())
            };
            copies.push((b("k")?, b("v")?));
        }
        gpu.scoped("saving the sliding-window caches", || {
            let mut enc =
                gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("ring save") });
            for (&li, (k, v)) in self.ring.layers.iter().zip(&copies) {
                let (kc, vc) = &self.acts.caches[li];
                for (row, at, len) in ring_segments(lo, rows, self.ring.rows) {
                    enc.copy_buffer_to_buffer(
                        kc,
                        row as u64 * row_bytes,
                        k,
                        at as u64 * row_bytes,
                        len as u64 * row_bytes,
                    );
                    enc.copy_buffer_to_buffer(
                        vc,
                        row as u64 * row_bytes,
                        v,
                        at as u64 * row_bytes,
                        len as u64 * row_bytes,
                    );
                }
            }
            gpu.queue.submit([enc.finish()]);
        })?;
        Ok(Some(RingBackup { lo, n: rows, copies }))
    }

    /// After a failed run: puts back the rows [`GpuSession::save_ring`] saved (the position is
    /// already back at its start); if even that fails, empties the cache.
    fn restore_ring(&mut self, backup: Option<RingBackup>) {
        let Some(b) = backup else { return };
        let gpu = &self.inner.gpu;
        let row_bytes = (pad8(self.inner.dims.kv_dim) * 4) as u64;
        let r = gpu.scoped("restoring the sliding-window caches", || {
            let mut enc =
                gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("ring restore") });
            for (&li, (k, v)) in self.ring.layers.iter().zip(&b.copies) {
                let (kc, vc) = &self.acts.caches[li];
                for (row, at, len) in ring_segments(b.lo, b.n, self.ring.rows) {
                    enc.copy_buffer_to_buffer(
                        k,
                        at as u64 * row_bytes,
                        kc,
                        row as u64 * row_bytes,
                        len as u64 * row_bytes,
                    );
                    enc.copy_buffer_to_buffer(
                        v,
                        at as u64 * row_bytes,
                        vc,
                        row as u64 * row_bytes,
                        len as u64 * row_bytes,
                    );
                }
            }
            gpu.queue.submit([enc.finish()]);
        });
        if r.is_err() {
            self.reset();
        }
    }

    /// Appends `tokens` (batched passes of up to the prefill chunk) and returns the argmax of
    /// the last token's logits (the greedy next token). One submit per chunk and one 4-byte
    /// readback in all.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<u32, GpuError> {
        if tokens.is_empty() {
            return Err(GpuError::EmptyInput { what: "prefill" });
        }
        self.run(tokens, Tail::Last)?;
        self.read_argmax(None)
    }

    /// Appends one token and returns the argmax of its logits: the whole step is recorded in
    /// one command encoder, with one submit and one 4-byte readback.
    pub fn decode(&mut self, token: u32) -> Result<u32, GpuError> {
        self.run(&[token], Tail::Last)?;
        self.read_argmax(None)
    }

    /// Like [`GpuSession::prefill`] but returns the last token's logits (`vocab_size`
    /// values; reads them back: for tests and sampling).
    pub fn prefill_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GpuError> {
        if tokens.is_empty() {
            return Err(GpuError::EmptyInput { what: "prefill" });
        }
        self.run(tokens, Tail::Last)?;
        self.read_logits(1)
    }

    /// Like [`GpuSession::decode`] but returns the token's logits (`vocab_size` values).
    pub fn decode_logits(&mut self, token: u32) -> Result<Vec<f32>, GpuError> {
        self.run(&[token], Tail::Last)?;
        self.read_logits(1)
    }

    /// Like [`GpuSession::prefill`], but returns sampling candidates of the last token's
    /// logits instead of their argmax: on the device the logits get `transform`'s penalties
    /// (in place), then the `k` largest processed logits (ties to the lowest id; `k` at most
    /// [`MAX_CANDIDATES`], clamped to the vocabulary) come back with the log-sum-exp of
    /// `v / transform.temperature` over the whole vocabulary, for
    /// [`Sampler::sample_from_candidates`]. One submit per chunk and one readback of
    /// `8k + 4` bytes in all; the pairs are in id order.
    pub fn prefill_candidates(
        &mut self,
        tokens: &[u32],
        k: usize,
        transform: &LogitTransform<'_>,
    ) -> Result<Candidates, GpuError> {
        if tokens.is_empty() {
            return Err(GpuError::EmptyInput { what: "prefill" });
        }
        self.validate(tokens)?;
        let k = self.prepare_candidates(k, transform)?;
        self.run(tokens, Tail::Candidates(k))?;
        self.read_candidates(k, None)
    }

    /// Like [`GpuSession::decode`], but returns sampling candidates as
    /// [`GpuSession::prefill_candidates`]: one submit and one `8k + 4`-byte readback.
    pub fn decode_candidates(
        &mut self,
        token: u32,
        k: usize,
        transform: &LogitTransform<'_>,
    ) -> Result<Candidates, GpuError> {
        self.validate(&[token])?;
        let k = self.prepare_candidates(k, transform)?;
        self.run(&[token], Tail::Candidates(k))?;
        self.read_candidates(k, None)
    }

    /// The last token's logits (`vocab_size` values) as the latest pass left them: after a
    /// candidates call, with its transform's penalties applied (what
    /// [`Sampler::sample_processed_logits`] takes when the candidates did not decide).
    pub fn processed_logits(&mut self) -> Result<Vec<f32>, GpuError> {
        self.read_logits(1)
    }

    /// Appends `tokens` and chooses the next token with `sampler`: greedy without penalties
    /// runs [`GpuSession::prefill`] (a 4-byte readback); otherwise
    /// [`GpuSession::prefill_candidates`] with [`Sampler::candidate_count`] candidates, and
    /// the processed logits are read back only when the candidates do not decide. The same
    /// seed gives the tokens [`Sampler::sample_logits`] gives on the CPU engine's logits
    /// wherever the logits agree. The caller tells `sampler` the tokens
    /// ([`Sampler::observe`]).
    pub fn prefill_sample(&mut self, tokens: &[u32], sampler: &mut Sampler) -> Result<u32, GpuError> {
        self.sample_pass(tokens, sampler, None)
    }

    /// [`GpuSession::prefill_sample`] for one token: one submit and one readback per step
    /// unless the candidates do not decide.
    pub fn decode_sample(&mut self, token: u32, sampler: &mut Sampler) -> Result<u32, GpuError> {
        self.sample_pass(&[token], sampler, None)
    }

    /// [`GpuSession::prefill_sample`] that gives up with [`GpuError::Interrupted`], leaving
    /// the session as it was, as soon as `stop` returns true while it waits for the device
    /// (asked every 0.5 ms, `STOP_POLL`): a cancel does not wait for the
    /// pass to finish. The pass's work runs on and the next call queues behind it.
    pub fn prefill_sample_until(
        &mut self,
        tokens: &[u32],
        sampler: &mut Sampler,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<u32, GpuError> {
        self.sample_pass(tokens, sampler, Some(stop))
    }

    /// [`GpuSession::decode_sample`] stopping as [`GpuSession::prefill_sample_until`] does.
    pub fn decode_sample_until(
        &mut self,
        token: u32,
        sampler: &mut Sampler,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<u32, GpuError> {
        self.sample_pass(&[token], sampler, Some(stop))
    }

    /// Appends `tokens` and samples the next token (greedy without penalties: the device's
    /// argmax; otherwise candidates); on any failure, an interrupt included, the position is
    /// restored.
    fn sample_pass(
        &mut self,
        tokens: &[u32],
        sampler: &mut Sampler,
        stop: Option<&dyn Fn() -> bool>,
    ) -> Result<u32, GpuError> {
        if tokens.is_empty() {
            return Err(GpuError::EmptyInput { what: "prefill" });
        }
        let start = self.pos;
        let p = sampler.params();
        // The ring rows a long run overwrote, to put back if a later step fails.
        let mut saved = None;
        let r = if p.is_greedy() && !p.has_penalties() {
            self.run(tokens, Tail::Last).and_then(|s| {
                saved = s;
                self.read_argmax(stop)
            })
        } else {
            self.validate(tokens)
                .and_then(|()| self.prepare_candidates(sampler.candidate_count(), &sampler.logit_transform()))
                .and_then(|k| {
                    self.run(tokens, Tail::Candidates(k)).and_then(|s| {
                        saved = s;
                        self.read_candidates(k, stop)
                    })
                })
                .and_then(|c| self.finish_sample(&c, sampler))
        };
        if r.is_err() {
            self.pos = start;
            self.restore_ring(saved);
        }
        r
    }

    fn finish_sample(&mut self, c: &Candidates, sampler: &mut Sampler) -> Result<u32, GpuError> {
        match sampler.sample_from_candidates(&c.pairs, c.log_sum_exp) {
            Some(t) => Ok(t),
            None => {
                let processed = self.processed_logits()?;
                Ok(sampler.sample_processed_logits(&processed))
            }
        }
    }

    /// Checks `k` and `transform`, creates the candidate tail on first use and writes its
    /// uniforms and penalty list for the next pass. Returns `k` clamped to the vocabulary.
    fn prepare_candidates(&mut self, k: usize, transform: &LogitTransform<'_>) -> Result<usize, GpuError> {
        let vocab = self.inner.dims.vocab;
        let bad = |what: String| Err(GpuError::InvalidArgument { what });
        if k == 0 || k > MAX_CANDIDATES {
            return bad(format!("{k} sampling candidates requested; ask for 1 to {MAX_CANDIDATES}"));
        }
        let tr = transform;
        if !(tr.temperature.is_finite() && tr.temperature > 0.0) {
            return bad(format!("candidate temperature {} must be finite and > 0", tr.temperature));
        }
        if !(tr.repetition_penalty.is_finite() && tr.repetition_penalty > 0.0) {
            return bad(format!("repetition penalty {} must be finite and > 0", tr.repetition_penalty));
        }
        if !(tr.frequency_penalty.is_finite() && tr.presence_penalty.is_finite()) {
            return bad("frequency and presence penalties must be finite".into());
        }
        let mut words = Vec::with_capacity(2 * tr.counts.len());
        let mut prev = None;
        for &(token, count) in tr.counts {
            if token as usize >= vocab {
                return Err(GpuError::TokenOutOfRange { token, vocab: vocab as u32 });
            }
            if prev.is_some_and(|p| p >= token) || count == 0 {
                return bad(
                    "penalty counts must be distinct tokens in ascending order, each counted at least once".into()
                );
            }
            prev = Some(token);
            words.extend_from_slice(&[token, count]);
        }
        self.ensure_sampling()?;
        // A reduced vocabulary: the candidates and the log-sum-exp over its entries only.
        let n = self.logit_rows;
        let k = k.min(n);
        let params = TopkParams {
            n: n as u32,
            k: k as u32,
            n_pen: tr.counts.len() as u32,
            _pad0: 0,
            inv_temp: 1.0 / tr.temperature,
            rep: tr.repetition_penalty,
            freq: tr.frequency_penalty,
            presence: tr.presence_penalty,
        };
        let gpu = &self.inner.gpu;
        if let Some(sb) = &self.sampling {
            gpu.queue.write_buffer(&sb.params, 0, bytemuck::bytes_of(&params));
            if !words.is_empty() {
                gpu.queue.write_buffer(&sb.pen, 0, bytemuck::cast_slice(&words));
            }
        }
        Ok(k)
    }

    /// Creates the candidate tail and its buffers (counted against the memory limit) once.
    fn ensure_sampling(&mut self) -> Result<(), GpuError> {
        if self.sampling.is_some() {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        let i = &*inner;
        let gpu = &i.gpu;
        let limit = gpu.max_binding();
        let pen_bytes = (i.dims.vocab as u64 * 8).div_ceil(16) * 16;
        let out_bytes = candidate_bytes(MAX_CANDIDATES).div_ceil(16) * 16;
        let bytes = 32 + pen_bytes + 2 * out_bytes;
        i.check_limit(bytes, "allocating the sampling buffers")?;
        use wgpu::BufferUsages as U;
        let buf = |label: &str, bytes: u64, usage: U| zeroed(gpu, label, bytes, usage, limit);
        let params = buf("topk params", 32, U::UNIFORM | U::COPY_DST)?;
        let pen = buf("penalty counts", pen_bytes, U::STORAGE | U::COPY_DST)?;
        let out = buf("candidates", out_bytes, U::STORAGE | U::COPY_SRC)?;
        let staging = buf("candidates staging", out_bytes, U::MAP_READ | U::COPY_DST)?;
        let a = &self.acts;
        let p = Planner { inner: i, step: &self.bufs.step, partials: &a.partials };
        let mut tail = head_items(&p, a, self.g3.as_ref(), &self.bufs.logits, self.bufs.sv, true)?;
        tail.push(p.fixed(Kernel::TopK, &[], &[&params, &pen, &self.bufs.logits, &out], Grid::Fixed(1, 1))?);
        gpu.take_uncaptured("creating the sampling buffers")?;
        i.session_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.alloc_bytes += bytes;
        self.sampling = Some(SamplingBufs { params, pen, out, staging, tail });
        Ok(())
    }

    /// The candidates the last [`Tail::Candidates`] pass copied to the staging buffer.
    fn read_candidates(&mut self, k: usize, stop: Option<&dyn Fn() -> bool>) -> Result<Candidates, GpuError> {
        let Some(sb) = &self.sampling else {
            return Err(GpuError::Readback { reason: "no candidates were computed".into() });
        };
        let n = candidate_bytes(k);
        let bytes = map_read(&self.inner.gpu, &sb.staging, n, stop)?;
        self.counters.readbacks += 1;
        self.counters.readback_bytes += n;
        let word = |i: usize| u32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
        let pairs = (0..k).map(|j| (word(2 * j), f32::from_bits(word(2 * j + 1)))).collect();
        Ok(Candidates { pairs, log_sum_exp: f32::from_bits(word(2 * k)) })
    }

    /// Most tokens one pass takes (the prefill chunk, or fewer when the activations would not
    /// fit a buffer): a speculative round drafts at most one fewer.
    pub fn pass_tokens(&self) -> usize {
        self.bufs.t_max
    }

    /// A greedy speculative round over a KV cache shared by draft and verifier, in one submit
    /// and one readback: `k` decode steps of `draft` from `next` (each step's argmax, computed
    /// on the device, is copied into the next step's token ids), then the verify pass of this
    /// session's submodel over `next` and the `k` drafts (`k + 1` tokens at the positions the
    /// draft steps wrote, overwriting their cache entries) with the argmax of every row.
    /// Reads back `2k + 1` u32. Leaves `next` and the drafts appended (position `+ k + 1`):
    /// the caller truncates to the tokens it keeps. `k` is 1 to [`pass_tokens`](Self::pass_tokens)
    /// `- 1`. The drafts are any submodel of the file (the nested draft is narrower); its FFN
    /// blocks are planned once and kept. On error the position is unchanged.
    pub fn speculate_greedy(
        &mut self,
        next: u32,
        draft: &Submodel,
        k: usize,
        draft_rows: Option<usize>,
    ) -> Result<SpeculativeRound, GpuError> {
        self.refuse_speculation()?;
        if k == 0 || k + 1 > self.bufs.t_max {
            return Err(GpuError::InvalidArgument {
                what: format!("{k} drafts per round; a round takes 1 to {}", self.bufs.t_max - 1),
            });
        }
        self.validate(&vec![next; k + 1])?;
        self.ensure_spec(draft)?;
        let vocab = self.inner.dims.vocab;
        let draft_rows = draft_rows.map_or(vocab, |r| r.clamp(1, vocab));
        if draft_rows < vocab {
            self.ensure_rows_tail(draft_rows)?;
        }
        let draft_tail: &[Item] = match &self.tail_rows {
            Some((r, t)) if *r == draft_rows => t,
            _ => &self.tail_last,
        };
        let inner = Arc::clone(&self.inner);
        let gpu = &inner.gpu;
        let Some(sb) = &self.spec else {
            return Err(GpuError::InvalidArgument { what: "the speculative buffers were not created".into() });
        };
        let Some(dp) = &sb.draft else {
            return Err(GpuError::InvalidArgument { what: "the draft was not planned".into() });
        };
        let p0 = self.pos;
        let t = k + 1;
        let mut steps: Vec<StepParams> =
            (0..k).map(|j| StepParams { pos0: (p0 + j) as u32, t: 1, _pad: [0; 2] }).collect();
        steps.push(StepParams { pos0: p0 as u32, t: t as u32, _pad: [0; 2] });
        let (step, tokens, argmax) = (&self.bufs.step, &self.bufs.tokens, &self.bufs.argmax);
        let mut dispatches = 0u64;
        gpu.scoped("running a speculative round", || {
            gpu.queue.write_buffer(&sb.steps, 0, bytemuck::cast_slice(&steps));
            gpu.queue.write_buffer(&sb.ids, 0, bytemuck::bytes_of(&next));
            let mut enc =
                gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("speculative round") });
            enc.copy_buffer_to_buffer(&sb.ids, 0, tokens, 0, 4);
            for j in 0..k as u64 {
                enc.copy_buffer_to_buffer(&sb.steps, 16 * j, step, 0, 16);
                let items = self.plan.items_with(&dp.ffn).chain(draft_tail).map(|it| (it, 1));
                dispatches += record(&mut enc, items);
                enc.copy_buffer_to_buffer(argmax, 0, &sb.ids, 4 * (j + 1), 4);
                if j + 1 < k as u64 {
                    enc.copy_buffer_to_buffer(argmax, 0, tokens, 0, 4);
                }
            }
            let tb = t as u64;
            enc.copy_buffer_to_buffer(&sb.steps, 16 * k as u64, step, 0, 16);
            enc.copy_buffer_to_buffer(&sb.ids, 0, tokens, 0, 4 * tb);
            dispatches += record(&mut enc, self.plan.items().chain(&sb.tail).map(|it| (it, t)));
            enc.copy_buffer_to_buffer(argmax, 0, &sb.staging, 0, 4 * tb);
            enc.copy_buffer_to_buffer(&sb.ids, 4, &sb.staging, 4 * tb, 4 * (tb - 1));
            gpu.queue.submit([enc.finish()]);
        })?;
        let round = self.read_round(k)?;
        self.pos = p0 + t;
        self.counters.passes += t as u64;
        self.counters.submits += 1;
        self.counters.dispatches += dispatches;
        Ok(round)
    }

    /// Creates the speculative round's buffers and verify tail (counted against the memory
    /// limit) once, and plans `draft`'s FFN blocks when it is not the draft planned last.
    fn ensure_spec(&mut self, draft: &Submodel) -> Result<(), GpuError> {
        self.ensure_spec_bufs()?;
        let inner = Arc::clone(&self.inner);
        let i = &*inner;
        let Some(sb) = &mut self.spec else {
            return Ok(());
        };
        if sb.draft.as_ref().is_some_and(|d| d.submodel == *draft) {
            return Ok(());
        }
        let model = &i.model;
        draft.validate(model.metadata(), model.view().available_levels)?;
        let widths = widths_of(model, draft);
        let (layers, _uploaded) = i.ensure_ffn(&widths)?;
        let p = Planner { inner: i, step: &self.bufs.step, partials: &self.acts.partials };
        let ffn = self.plan.plans_for(&p, &self.acts, None, &layers, &widths)?;
        i.gpu.take_uncaptured("planning the speculative draft")?;
        sb.draft = Some(DraftPlan { submodel: draft.clone(), ffn, _layers: layers });
        Ok(())
    }

    /// Creates the speculative round's buffers and verify tail (counted against the memory
    /// limit) once.
    fn ensure_spec_bufs(&mut self) -> Result<(), GpuError> {
        let inner = Arc::clone(&self.inner);
        let i = &*inner;
        if self.spec.is_none() {
            let gpu = &i.gpu;
            let limit = gpu.max_binding();
            let t = self.bufs.t_max as u64;
            let (steps_bytes, ids_bytes, staging_bytes) =
                (16 * t, (4 * t).div_ceil(16) * 16, (8 * t).div_ceil(16) * 16);
            let bytes = steps_bytes + ids_bytes + staging_bytes + 16;
            i.check_limit(bytes, "allocating the speculative buffers")?;
            use wgpu::BufferUsages as U;
            let buf = |label: &str, bytes: u64, usage: U| zeroed(gpu, label, bytes, usage, limit);
            let steps = buf("speculative steps", steps_bytes, U::COPY_SRC | U::COPY_DST)?;
            let ids = buf("speculative ids", ids_bytes, U::COPY_SRC | U::COPY_DST)?;
            let staging = buf("speculative staging", staging_bytes, U::MAP_READ | U::COPY_DST)?;
            let a = &self.acts;
            let p = Planner { inner: i, step: &self.bufs.step, partials: &a.partials };
            let head = i.head.as_ref().unwrap_or(&i.embed);
            let mut tail = vec![p.norm(&i.final_norm, &a.x, &a.xn, a.sd, false)?];
            p.matmul(head, false, false, &a.xn, a.sd, &self.bufs.logits, self.bufs.sv, &mut tail)?;
            let am = ArgmaxParams { n: i.dims.vocab as u32, stride: self.bufs.sv as u32, _pad: [0; 2] };
            let am = p.uniform("verify argmax params", &am)?;
            tail.push(p.fixed(Kernel::Argmax, &[], &[&am, &self.bufs.logits, &self.bufs.argmax], Grid::Rows)?);
            gpu.take_uncaptured("creating the speculative buffers")?;
            i.session_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.alloc_bytes += bytes;
            self.spec = Some(SpecBufs { steps, ids, staging, tail, draft: None });
        }
        Ok(())
    }

    /// [`speculate_greedy`](Self::speculate_greedy) with the draft's own KV cache: `draft` (a
    /// session of the same engine) first runs `catch_up` (the tokens its cache lacks, ending
    /// with the fed token; at most [`pass_tokens`](Self::pass_tokens) of the draft) in one
    /// pass, then `k - 1` decode steps, each fed the previous step's argmax on the device; then
    /// this session's verify pass over the fed token and the `k` drafts. One submit and one
    /// readback of `2k + 1` u32 for the whole round. Leaves `catch_up` and the first `k - 1`
    /// drafts appended to `draft`, and the fed token and the `k` drafts to this session. On
    /// error both positions are unchanged.
    pub fn speculate_greedy_own(
        &mut self,
        draft: &mut GpuSession,
        catch_up: &[u32],
        k: usize,
    ) -> Result<SpeculativeRound, GpuError> {
        self.refuse_speculation()?;
        let bad = |what: String| Err(GpuError::InvalidArgument { what });
        if !Arc::ptr_eq(&self.inner, &draft.inner) {
            return bad("the draft session belongs to another engine".into());
        }
        let Some(&next) = catch_up.last() else {
            return bad("a speculative round needs the fed token".into());
        };
        if k == 0 || k + 1 > self.bufs.t_max || catch_up.len() > draft.bufs.t_max {
            return bad(format!(
                "{k} drafts after {} catch-up tokens; a round takes 1 to {} drafts after at most {}",
                catch_up.len(),
                self.bufs.t_max - 1,
                draft.bufs.t_max
            ));
        }
        self.validate(&vec![next; k + 1])?;
        draft.validate(&[catch_up, &vec![next; k - 1]].concat())?;
        self.ensure_spec_bufs()?;
        draft.ensure_spec_bufs()?;
        let inner = Arc::clone(&self.inner);
        let gpu = &inner.gpu;
        let (Some(sb), Some(db)) = (&self.spec, &draft.spec) else {
            return bad("the speculative buffers were not created".into());
        };
        let (p0, dp0, c) = (self.pos, draft.pos, catch_up.len());
        let t = k + 1;
        let mut dsteps = vec![StepParams { pos0: dp0 as u32, t: c as u32, _pad: [0; 2] }];
        dsteps.extend((1..k).map(|j| StepParams { pos0: (dp0 + c + j - 1) as u32, t: 1, _pad: [0; 2] }));
        let verify = StepParams { pos0: p0 as u32, t: t as u32, _pad: [0; 2] };
        let (step, tokens, argmax) = (&self.bufs.step, &self.bufs.tokens, &self.bufs.argmax);
        let (dstep, dtokens, dargmax) = (&draft.bufs.step, &draft.bufs.tokens, &draft.bufs.argmax);
        let mut dispatches = 0u64;
        gpu.scoped("running a speculative round", || {
            gpu.queue.write_buffer(&db.steps, 0, bytemuck::cast_slice(&dsteps));
            gpu.queue.write_buffer(dtokens, 0, bytemuck::cast_slice(catch_up));
            gpu.queue.write_buffer(&sb.steps, 0, bytemuck::bytes_of(&verify));
            gpu.queue.write_buffer(&sb.ids, 0, bytemuck::bytes_of(&next));
            let mut enc =
                gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("speculative round") });
            for j in 0..k as u64 {
                let tj = if j == 0 { c } else { 1 };
                enc.copy_buffer_to_buffer(&db.steps, 16 * j, dstep, 0, 16);
                let items = draft.plan.items().map(|it| (it, tj)).chain(draft.last_tail().iter().map(|it| (it, 1)));
                dispatches += record(&mut enc, items);
                enc.copy_buffer_to_buffer(dargmax, 0, &sb.ids, 4 * (j + 1), 4);
                if j + 1 < k as u64 {
                    enc.copy_buffer_to_buffer(dargmax, 0, dtokens, 0, 4);
                }
            }
            let tb = t as u64;
            enc.copy_buffer_to_buffer(&sb.steps, 0, step, 0, 16);
            enc.copy_buffer_to_buffer(&sb.ids, 0, tokens, 0, 4 * tb);
            dispatches += record(&mut enc, self.plan.items().chain(&sb.tail).map(|it| (it, t)));
            enc.copy_buffer_to_buffer(argmax, 0, &sb.staging, 0, 4 * tb);
            enc.copy_buffer_to_buffer(&sb.ids, 4, &sb.staging, 4 * tb, 4 * (tb - 1));
            gpu.queue.submit([enc.finish()]);
        })?;
        let round = self.read_round(k)?;
        self.pos = p0 + t;
        draft.pos = dp0 + c + k - 1;
        self.counters.passes += 1;
        self.counters.submits += 1;
        self.counters.dispatches += dispatches;
        draft.counters.passes += k as u64;
        Ok(round)
    }

    /// Whether this session runs speculative rounds ([`GpuSession::speculate_greedy`]): not on
    /// a Gemma 3n file, whose passes need their tokens' per-layer embedding rows, read on the
    /// host before the submit, while a round's drafted tokens exist only on the device.
    /// Speculative decoding there runs its draft and verify passes one submit each.
    pub fn can_speculate(&self) -> bool {
        self.g3.is_none()
    }

    /// [`GpuSession::can_speculate`] as an error.
    fn refuse_speculation(&self) -> Result<(), GpuError> {
        if !self.can_speculate() {
            return Err(GpuError::Unsupported {
                reason: "speculative rounds on a Gemma 3n file: its per-layer embedding rows are read on the host \
                         for each pass, and a round's drafts exist only on the device; decode token by token"
                    .into(),
            });
        }
        Ok(())
    }

    /// The layer weights `submodel` runs on a Gemma 3n file (uploading the ones the engine's
    /// store lacks); empty for other files.
    fn ensure_g3_layers(&self, submodel: &Submodel) -> Result<Vec<Option<Arc<G3Layer>>>, GpuError> {
        match &self.inner.g3n {
            Some(g) => g.ensure_layers(&self.inner, &skipped(submodel, self.inner.dims.n_layers)),
            None => Ok(Vec::new()),
        }
    }

    /// The drafts and verdicts a round copied to the staging buffer (one readback).
    fn read_round(&mut self, k: usize) -> Result<SpeculativeRound, GpuError> {
        let Some(sb) = &self.spec else {
            return Err(GpuError::Readback { reason: "no speculative round was run".into() });
        };
        let t = k + 1;
        let n = 4 * (2 * k + 1) as u64;
        let bytes = map_read(&self.inner.gpu, &sb.staging, n, None)?;
        self.counters.readbacks += 1;
        self.counters.readback_bytes += n;
        let words: Vec<u32> = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(SpeculativeRound { verified: words[..t].to_vec(), drafts: words[t..].to_vec() })
    }

    /// Appends `tokens` and returns the logits of every one of them, row-major
    /// `[tokens.len(), vocab_size]` (evaluation, parity tests). Empty input gives empty output.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GpuError> {
        let start = self.pos;
        let mut out = Vec::with_capacity(tokens.len() * self.inner.dims.vocab);
        self.validate(tokens)?;
        let saved = self.save_ring(tokens.len())?;
        for chunk in tokens.chunks(self.bufs.t_max) {
            let r = self.pass(chunk, Tail::All).and_then(|()| self.read_logits(chunk.len()));
            match r {
                Ok(l) => out.extend_from_slice(&l),
                Err(e) => {
                    self.pos = start;
                    self.restore_ring(saved);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn validate(&self, tokens: &[u32]) -> Result<(), GpuError> {
        let dm = &self.inner.dims;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= dm.vocab) {
            return Err(GpuError::TokenOutOfRange { token, vocab: dm.vocab as u32 });
        }
        if self.pos + tokens.len() > self.inner.ctx {
            return Err(GpuError::ContextFull { max: self.inner.ctx });
        }
        Ok(())
    }

    /// Validates, then runs `tokens` in chunks, computing `tail` on the last one; on failure
    /// the session is left as it was.
    /// Returns the ring rows saved before a long run ([`GpuSession::save_ring`]), for a
    /// caller whose later step may fail and go back to the start.
    fn run(&mut self, tokens: &[u32], tail: Tail) -> Result<Option<RingBackup>, GpuError> {
        self.validate(tokens)?;
        let start = self.pos;
        let saved = self.save_ring(tokens.len())?;
        let n_chunks = tokens.len().div_ceil(self.bufs.t_max);
        for (c, chunk) in tokens.chunks(self.bufs.t_max).enumerate() {
            let tail = if c + 1 == n_chunks { tail } else { Tail::None };
            if let Err(e) = self.pass(chunk, tail) {
                self.pos = start;
                self.restore_ring(saved);
                return Err(e);
            }
        }
        Ok(saved)
    }

    /// One pass over `tokens` (at most `t_max`, validated) at positions `pos..pos + t`:
    /// recorded in one encoder, one submit.
    fn pass(&mut self, tokens: &[u32], tail: Tail) -> Result<(), GpuError> {
        let inner = Arc::clone(&self.inner);
        let gpu = &inner.gpu;
        let t = tokens.len();
        let step = StepParams { pos0: self.pos as u32, t: t as u32, _pad: [0; 2] };
        let mut dispatches = 0u64;
        if let (Some(g), Some(ga)) = (&inner.g3n, &self.g3) {
            super::gemma3n::write_ple_rows(&inner, g, ga, tokens)?;
        }
        gpu.scoped("running a forward pass", || {
            gpu.queue.write_buffer(&self.bufs.step, 0, bytemuck::bytes_of(&step));
            gpu.queue.write_buffer(&self.bufs.tokens, 0, bytemuck::cast_slice(tokens));
            let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("pass") });
            let tail_items: &[Item] = match (tail, &self.sampling) {
                (Tail::None, _) => &[],
                (Tail::Last, _) => self.last_tail(),
                (Tail::Candidates(_), Some(sb)) => &sb.tail,
                (Tail::Candidates(_), None) => &[],
                (Tail::All, _) => &self.tail_all,
            };
            let tail_t = if tail == Tail::All { t } else { 1 };
            let items = self.plan.items().map(|it| (it, t)).chain(tail_items.iter().map(|it| (it, tail_t)));
            dispatches = record(&mut enc, items);
            match (tail, &self.sampling) {
                (Tail::Last, _) => enc.copy_buffer_to_buffer(&self.bufs.argmax, 0, &self.bufs.argmax_staging, 0, 4),
                (Tail::Candidates(k), Some(sb)) => {
                    enc.copy_buffer_to_buffer(&sb.out, 0, &sb.staging, 0, candidate_bytes(k));
                }
                _ => {}
            }
            // Counted before the submit: a pass that fails after it may have written its rows.
            self.ring.high = self.ring.high.max(self.pos + t);
            gpu.queue.submit([enc.finish()]);
        })?;
        self.pos += t;
        self.counters.passes += 1;
        self.counters.submits += 1;
        self.counters.dispatches += dispatches;
        Ok(())
    }

    fn read_argmax(&mut self, stop: Option<&dyn Fn() -> bool>) -> Result<u32, GpuError> {
        let bytes = map_read(&self.inner.gpu, &self.bufs.argmax_staging, 4, stop)?;
        self.counters.readbacks += 1;
        self.counters.readback_bytes += 4;
        let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        Ok(v)
    }

    /// Rows `[0, rows)` of the logits buffer, without padding.
    fn read_logits(&mut self, rows: usize) -> Result<Vec<f32>, GpuError> {
        let sv = self.bufs.sv;
        let vocab = self.inner.dims.vocab;
        let bytes = self.inner.gpu.read_back(&self.bufs.logits, (rows * sv * 4) as u64)?;
        self.counters.submits += 1;
        self.counters.readbacks += 1;
        self.counters.readback_bytes += bytes.len() as u64;
        let all: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        // Beyond a reduced vocabulary the buffer holds stale values: those logits are -inf.
        let n = self.logit_rows;
        let mut out = Vec::with_capacity(rows * vocab);
        for r in all.chunks_exact(sv).take(rows) {
            out.extend_from_slice(&r[..n]);
            out.resize(out.len() + vocab - n, f32::NEG_INFINITY);
        }
        Ok(out)
    }

    /// From the next pass on, computes the logits of the first `rows` vocabulary entries only,
    /// as [`crate::cpu::Session::set_logit_rows`] does: the last token's product reads the
    /// LM head's first `rows` rows, the argmax and the sampling candidates consider those
    /// entries, and logits read back are `-inf` beyond them. `None`, or at least the
    /// vocabulary, computes all of them. On a Gemma 3n file the product (and its soft-cap)
    /// still covers the whole vocabulary; the choice is limited the same way. The first call
    /// for a count plans its product (fails only as planning does).
    pub fn set_logit_rows(&mut self, rows: Option<usize>) -> Result<(), GpuError> {
        let vocab = self.inner.dims.vocab;
        let rows = rows.map_or(vocab, |r| r.clamp(1, vocab));
        if rows < vocab {
            self.ensure_rows_tail(rows)?;
        }
        self.logit_rows = rows;
        Ok(())
    }

    /// Vocabulary entries whose logits a pass computes ([`GpuSession::set_logit_rows`]).
    pub fn logit_rows(&self) -> usize {
        self.logit_rows
    }

    /// The last token's tail for the current [`GpuSession::logit_rows`].
    fn last_tail(&self) -> &[Item] {
        match &self.tail_rows {
            Some((r, t)) if *r == self.logit_rows => t,
            _ => &self.tail_last,
        }
    }

    /// Plans the last token's tail over the first `rows` vocabulary entries (once per count):
    /// the final norm, the product with the head's first `rows` rows (on a Gemma 3n file the
    /// whole head and its soft-cap), the argmax over those entries.
    fn ensure_rows_tail(&mut self, rows: usize) -> Result<(), GpuError> {
        if self.tail_rows.as_ref().is_some_and(|(r, _)| *r == rows) {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        let i = &*inner;
        let (a, sv, logits) = (&self.acts, self.bufs.sv, &self.bufs.logits);
        let p = Planner { inner: i, step: &self.bufs.step, partials: &a.partials };
        let mut tail = if self.g3.is_some() {
            head_items(&p, a, self.g3.as_ref(), logits, sv, true)?
        } else {
            let head = super::ffn_store::prefix(i.head.as_ref().unwrap_or(&i.embed), rows);
            let mut items = vec![p.norm(&i.final_norm, &a.x, &a.xn, a.sd, true)?];
            p.matmul(&head, false, false, &a.xn, a.sd, logits, sv, &mut items)?;
            items
        };
        let am =
            p.uniform("reduced argmax params", &ArgmaxParams { n: rows as u32, stride: sv as u32, _pad: [0; 2] })?;
        tail.push(p.fixed(Kernel::Argmax, &[], &[&am, logits, &self.bufs.argmax], Grid::Fixed(1, 1))?);
        i.gpu.take_uncaptured("planning a reduced vocabulary")?;
        self.tail_rows = Some((rows, tail));
        Ok(())
    }
}

/// Bytes of `k` candidates and the log-sum-exp in `topk.wgsl`'s output.
fn candidate_bytes(k: usize) -> u64 {
    (2 * k as u64 + 1) * 4
}

/// Per layer: whether `submodel` skips it.
fn skipped(submodel: &Submodel, n_layers: usize) -> Vec<bool> {
    (0..n_layers).map(|l| submodel.is_skipped(l)).collect()
}

/// The Gemma 3n context of a session's plans (`None` on other files).
fn g3_ctx<'a>(i: &'a Inner, g3: Option<&'a G3Acts>) -> Option<G3Ctx<'a>> {
    let (engine, acts) = (i.g3n.as_ref()?, g3?);
    Some(G3Ctx { engine, acts, layers: &acts.layers })
}

/// The logits items of a pass: `last` (the last token's, into logits row 0; run on one row)
/// or every row's.
fn head_items(
    p: &Planner<'_>,
    a: &Acts,
    g3: Option<&G3Acts>,
    logits: &wgpu::Buffer,
    sv: usize,
    last: bool,
) -> Result<Vec<Item>, GpuError> {
    let i = p.inner;
    if let (Some(g), Some(ga)) = (&i.g3n, g3) {
        return super::gemma3n::plan_head(p, g, ga, &a.x, &a.xn, a.sd, logits, sv, last);
    }
    let head = i.head.as_ref().unwrap_or(&i.embed);
    let mut items = vec![p.norm(&i.final_norm, &a.x, &a.xn, a.sd, last)?];
    p.matmul(head, false, false, &a.xn, a.sd, logits, sv, &mut items)?;
    Ok(items)
}

/// The ring rows of positions `[lo, lo + n)` as contiguous pieces `(first row, offset in
/// the run, rows)`: at most two (the run may wrap around the end of the ring).
fn ring_segments(lo: usize, n: usize, rows: usize) -> Vec<(usize, usize, usize)> {
    let r0 = lo % rows.max(1);
    let first = n.min(rows - r0);
    let mut v = vec![(r0, 0, first)];
    if first < n {
        v.push((0, first, n - first));
    }
    v
}
