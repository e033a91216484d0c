//! [`CpuEngine`] and [`Session`]: the forward pass over the memory-mapped weights.

use std::fmt;
use std::sync::Arc;

use super::gemma3n::{self, G3Model};
use super::kernels;
use super::weights::Matrix;
use super::EngineError;
use crate::dims::ModelDims;
use crate::format::{names, Activation, Gemma3nConfig, NormKind};
use crate::{ModelFile, Submodel};

/// Tokens processed per batched pass of a long prefill: bounds the scratch memory (the FFN
/// activations are `[chunk, ffn_width]`) while keeping weight rows read once per chunk.
const PREFILL_CHUNK: usize = 256;

/// A normalisation's parameters (RMSNorm when there is no bias, LayerNorm otherwise).
#[derive(Clone, Debug)]
pub(super) struct Norm {
    pub(super) weight: Vec<f32>,
    pub(super) bias: Option<Vec<f32>>,
}

impl Norm {
    fn load(model: &ModelFile, kind: NormKind, weight: &str, bias: &str, d: usize) -> Result<Norm, EngineError> {
        let get = |name: &str| -> Result<Vec<f32>, EngineError> {
            let v = model.tensor_f32(name)?;
            if v.len() != d {
                return Err(EngineError::BadTensor {
                    tensor: name.to_string(),
                    reason: format!("has {} elements, d_model is {d}", v.len()),
                });
            }
            Ok(v)
        };
        Ok(Norm {
            weight: get(weight)?,
            bias: match kind {
                NormKind::RmsNorm => None,
                NormKind::LayerNorm => Some(get(bias)?),
            },
        })
    }

    /// Normalises each of the `[t, d]` rows of `x` into `out`.
    pub(super) fn apply(&self, x: &[f32], out: &mut [f32], d: usize, eps: f32) {
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            match &self.bias {
                None => kernels::rms_norm(xr, &self.weight, eps, or),
                Some(b) => kernels::layer_norm(xr, &self.weight, b, eps, or),
            }
        }
    }
}

/// Tensor names and norms of one layer.
#[derive(Clone, Debug)]
struct Layer {
    attn_norm: Norm,
    ffn_norm: Norm,
    wq: String,
    wk: String,
    wv: String,
    wo: String,
    ffn_up: String,
    ffn_gate: String,
    ffn_down_t: String,
}

/// What an engine shares with its sessions.
struct Shared {
    model: Arc<ModelFile>,
    dims: ModelDims,
    layers: Vec<Layer>,
    final_norm: Norm,
    head: &'static str,
    inv_freq: Vec<f32>,
    /// The Gemma 3n decoder's state, for a Gemma 3n file (then `layers` is empty).
    g3n: Option<G3Model>,
}

/// The CPU reference engine for one model file. Cheap to share (`Send + Sync`): it holds the
/// file and the (tiny) decoded norm weights; every [`Session`] owns its KV cache.
pub struct CpuEngine {
    shared: Arc<Shared>,
    threads: usize,
}

impl fmt::Debug for CpuEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuEngine")
            .field("path", &self.shared.model.path())
            .field("dims", &self.shared.dims)
            .field("threads", &self.threads)
            .finish()
    }
}

impl CpuEngine {
    /// Prepares an engine: validates the architecture, decodes the norm weights, and checks
    /// that every weight matrix (FFNs at the largest level present) can be read in place
    /// with the right shape and alignment. Uses all available cores by default.
    pub fn new(model: Arc<ModelFile>) -> Result<CpuEngine, EngineError> {
        let meta = model.metadata();
        let dims = ModelDims::from_metadata(meta).map_err(|reason| EngineError::BadConfig { reason })?;
        let arch = &meta.architecture;
        let d = dims.d_model;
        let g3n_config = Gemma3nConfig::from_metadata(meta).map_err(|reason| EngineError::BadConfig { reason })?;
        let g3n = match g3n_config {
            Some(c) => Some(G3Model::load(&model, &dims, c)?),
            None => None,
        };
        let mut layers = Vec::with_capacity(dims.n_layers);
        for i in (0..dims.n_layers).filter(|_| g3n.is_none()) {
            let n = |s: &str| names::layer(i, s);
            layers.push(Layer {
                attn_norm: Norm::load(&model, dims.norm, &n(names::ATTN_NORM), &n(names::ATTN_NORM_BIAS), d)?,
                ffn_norm: Norm::load(&model, dims.norm, &n(names::FFN_NORM), &n(names::FFN_NORM_BIAS), d)?,
                wq: n(names::WQ),
                wk: n(names::WK),
                wv: n(names::WV),
                wo: n(names::WO),
                ffn_up: n(names::FFN_UP),
                ffn_gate: n(names::FFN_GATE),
                ffn_down_t: n(names::FFN_DOWN_T),
            });
        }
        let final_norm = Norm::load(&model, dims.norm, names::NORM, names::NORM_BIAS, d)?;
        let head = if arch.tied_embeddings { names::TOK_EMBEDDINGS } else { names::LM_HEAD };
        let hd = dims.head_dim;
        let inv_freq = (0..hd / 2).map(|i| 1.0 / arch.rope_theta.powf((2 * i) as f32 / hd as f32)).collect();
        let is_g3n = g3n.is_some();
        let shared = Shared { model, dims, layers, final_norm, head, inv_freq, g3n };
        if !is_g3n {
            shared.check_matrices()?;
        }
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Ok(CpuEngine { shared: Arc::new(shared), threads })
    }

    /// Uses `n` threads for the big matrix products (at least 1). Small products always run
    /// on one thread. Results do not depend on `n`. With `n > 1` a forward pass runs on a
    /// pool of `n` worker threads that is created on first use and kept for the life of the
    /// process (one pool per distinct `n`), so threads are not spawned per product.
    pub fn with_threads(mut self, n: usize) -> CpuEngine {
        self.threads = n.max(1);
        self
    }

    /// Threads used by sessions created from now on.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The model file.
    pub fn model(&self) -> &Arc<ModelFile> {
        &self.shared.model
    }

    /// A generation session (empty KV cache) running `submodel`, which must have one level
    /// per layer, each present in the file.
    pub fn session(&self, submodel: &Submodel) -> Result<Session, EngineError> {
        let model = &self.shared.model;
        submodel.validate(model.metadata(), model.view().available_levels)?;
        let widths = submodel.widths(model.metadata()).into_iter().map(|w| w as usize).collect();
        let n_layers = self.shared.dims.n_layers;
        Ok(Session {
            shared: Arc::clone(&self.shared),
            threads: self.threads,
            submodel: submodel.clone(),
            widths,
            skip: skipped_layers(submodel, n_layers),
            keys: vec![Vec::new(); n_layers],
            values: vec![Vec::new(); n_layers],
            kv_start: vec![0; n_layers],
            pos: 0,
            logit_rows: self.shared.dims.vocab,
        })
    }
}

impl Shared {
    /// Loads every matrix view once so that shape, layout and alignment errors surface at
    /// engine creation instead of mid-generation.
    fn check_matrices(&self) -> Result<(), EngineError> {
        let m = &*self.model;
        let dm = &self.dims;
        let d = dm.d_model;
        let top = m.view().available_levels.saturating_sub(1);
        Matrix::load(m, names::TOK_EMBEDDINGS, dm.vocab, d)?;
        Matrix::load(m, self.head, dm.vocab, d)?;
        for (i, l) in self.layers.iter().enumerate() {
            Matrix::load(m, &l.wq, dm.q_dim, d)?;
            Matrix::load(m, &l.wk, dm.kv_dim, d)?;
            Matrix::load(m, &l.wv, dm.kv_dim, d)?;
            Matrix::load(m, &l.wo, d, dm.q_dim)?;
            let w = m.metadata().ffn_widths.get(i).and_then(|w| w.get(top)).copied().unwrap_or(0) as usize;
            Matrix::load(m, &l.ffn_up, w, d)?;
            if dm.gated {
                Matrix::load(m, &l.ffn_gate, w, d)?;
            }
            Matrix::load(m, &l.ffn_down_t, w, d)?;
        }
        Ok(())
    }
}

/// Which logits a pass returns.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Logits {
    None,
    Last,
    All,
}

/// A generation session: one submodel, its KV cache (`f32`, `[layer][position][kv_dim]`) and
/// position. `Send`, so it can move to a worker thread; not shared between threads.
pub struct Session {
    shared: Arc<Shared>,
    threads: usize,
    submodel: Submodel,
    widths: Vec<usize>,
    /// Per layer: whether the submodel skips it (elastic depth; all false on other files).
    skip: Vec<bool>,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Per layer: the first position `keys` and `values` hold. 0 except on Gemma 3n's
    /// sliding-window layers, whose caches keep only the window (see [`Session::trim_windows`]).
    kv_start: Vec<usize>,
    pos: usize,
    /// Vocabulary entries whose logits a pass computes ([`Session::set_logit_rows`]): the
    /// first `logit_rows` rows of the LM head; the others' logits are `-inf`.
    logit_rows: usize,
}

/// Positions a sliding-window layer's cache keeps beyond the window after a trim (at most the
/// window itself), so that rolling back this many tokens (a rejected speculative draft, an
/// edited last message) keeps the cache instead of re-running the history.
pub const WINDOW_SLACK: usize = 64;

/// Positions a sliding-window layer of window `window` keeps after a trim: the `window - 1`
/// keys the next query reads, plus the slack.
pub(crate) fn window_keep(window: usize) -> usize {
    window - 1 + WINDOW_SLACK.min(window)
}

/// The most positions a sliding-window layer's cache holds at once: twice
/// [`window_keep`] plus one prefill chunk between two trims, plus, during a call that trims,
/// the [`window_keep`] positions kept aside to restore the session if the call fails.
pub(crate) fn window_cache_positions(window: usize) -> usize {
    3 * window_keep(window) + PREFILL_CHUNK
}

/// Sliding-window cache entries a call's trims dropped, from position `first` to the call's
/// start.
#[derive(Clone, Debug)]
struct SavedWindow {
    first: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("submodel", &self.submodel)
            .field("widths", &self.widths)
            .field("position", &self.pos)
            .field("threads", &self.threads)
            .finish()
    }
}

impl Session {
    /// The submodel this session runs.
    pub fn submodel(&self) -> &Submodel {
        &self.submodel
    }

    /// FFN neuron count of every layer for this session's submodel.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// Number of tokens in the KV cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The context window: the KV cache holds at most this many tokens.
    pub fn max_context(&self) -> usize {
        self.shared.dims.max_context
    }

    /// Vocabulary size (length of a logits vector).
    pub fn vocab_size(&self) -> usize {
        self.shared.dims.vocab
    }

    /// From the next pass on, computes the logits of the first `rows` vocabulary entries only
    /// (the first `rows` rows of the LM head; the other entries' logits are `-inf`, so greedy
    /// and sampling choose among those ids); `None`, or `rows` at least the vocabulary, computes
    /// all of them. A speculative draft's reduced vocabulary
    /// ([`SpeculativeOptions::draft_vocab`](crate::SpeculativeOptions::draft_vocab)): the LM
    /// head is the largest product of a narrow draft step. The computed logits are bitwise
    /// those of the whole head. `Some(0)` counts as 1.
    pub fn set_logit_rows(&mut self, rows: Option<usize>) {
        let vocab = self.shared.dims.vocab;
        self.logit_rows = rows.map_or(vocab, |r| r.clamp(1, vocab));
    }

    /// Vocabulary entries whose logits a pass computes ([`Session::set_logit_rows`]).
    pub fn logit_rows(&self) -> usize {
        self.logit_rows
    }

    /// Bytes currently held by the KV cache.
    pub fn kv_cache_bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|v| v.capacity() * std::mem::size_of::<f32>()).sum()
    }

    /// Appends `tokens` to the context (one batched pass: every weight row is read once per
    /// chunk of up to 256 tokens) and returns the logits (`vocab_size` values) of the last one.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput { what: "prefill" });
        }
        self.run(tokens, Logits::Last, &|| false)
    }

    /// [`Session::prefill`] that gives up with [`EngineError::Interrupted`], leaving the
    /// session as it was, as soon as `stop` returns true. `stop` is asked before every layer
    /// (from a kernel worker thread), so a cancel takes effect within one layer's time instead
    /// of one pass.
    pub fn prefill_until(&mut self, tokens: &[u32], stop: &(dyn Fn() -> bool + Sync)) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput { what: "prefill" });
        }
        self.run(tokens, Logits::Last, stop)
    }

    /// Appends `tokens` and returns the logits of every one of them, row-major
    /// `[tokens.len(), vocab_size]` (evaluation, parity tests). Empty input gives empty output.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        self.run(tokens, Logits::All, &|| false)
    }

    /// Appends one token and returns its logits.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, EngineError> {
        self.run(&[token], Logits::Last, &|| false)
    }

    /// [`Session::decode`] that stops between two layers as soon as `stop` returns true, as
    /// [`Session::prefill_until`] does.
    pub fn decode_until(&mut self, token: u32, stop: &(dyn Fn() -> bool + Sync)) -> Result<Vec<f32>, EngineError> {
        self.run(&[token], Logits::Last, stop)
    }

    /// Runs `submodel` from the next token on, keeping the KV cache the previous submodel
    /// wrote (the keep-KV switch: no re-prefill; the cache's entries are an approximation of
    /// what `submodel` would have written). On error (a level not in the file) nothing
    /// changes.
    pub fn switch_keep_cache(&mut self, submodel: &Submodel) -> Result<(), EngineError> {
        let model = &self.shared.model;
        submodel.validate(model.metadata(), model.view().available_levels)?;
        self.widths = submodel.widths(model.metadata()).into_iter().map(|w| w as usize).collect();
        self.skip = skipped_layers(submodel, self.shared.dims.n_layers);
        self.submodel = submodel.clone();
        Ok(())
    }

    /// Empties the KV cache (keeps its memory for reuse).
    pub fn reset(&mut self) {
        for c in self.keys.iter_mut().chain(self.values.iter_mut()) {
            c.clear();
        }
        self.kv_start.fill(0);
        self.pos = 0;
    }

    /// Forgets every token from `position` on (no-op if `position >= self.position()`), e.g.
    /// to reuse a shared prompt prefix.
    ///
    /// Gemma 3n's sliding-window layers keep only the last `sliding_window - 1 +`
    /// [`WINDOW_SLACK`] positions (the slack at most the window): going back further than that would need keys they no longer
    /// hold, so the session then forgets everything ([`Session::position`] becomes 0) and the
    /// caller runs the tokens again (`ElasticSession::truncate` does, from its history).
    pub fn truncate(&mut self, position: usize) {
        let pos = position.min(self.pos);
        let window = self.window();
        let reachable = self.kv_start.iter().all(|&s| s == 0 || pos + 1 >= s + window);
        if !reachable {
            self.reset();
            return;
        }
        let kv = self.shared.dims.kv_dim;
        for ((k, v), &s) in self.keys.iter_mut().zip(self.values.iter_mut()).zip(&self.kv_start) {
            k.truncate((pos - s) * kv);
            v.truncate((pos - s) * kv);
        }
        self.pos = pos;
    }

    /// The sliding window of a Gemma 3n file, `usize::MAX` on other files.
    fn window(&self) -> usize {
        self.shared.g3n.as_ref().map_or(usize::MAX, |g| g.sliding_window())
    }

    /// Drops the positions a sliding-window layer will never read again (keys before
    /// `pos - window + 1`), keeping [`WINDOW_SLACK`] more; only once the cache holds twice
    /// that, so the move is amortised over `window` tokens. The cache's memory stays bounded
    /// by the window whatever the context ([`window_cache_positions`]).
    ///
    /// `start` is where the current call began: the first time a trim drops positions that
    /// restoring `start` needs (the `window_keep` before it), they are copied to `saved`.
    fn trim_windows(&mut self, start: usize, saved: &mut [Option<SavedWindow>]) {
        let Some(g) = &self.shared.g3n else { return };
        let window = g.sliding_window();
        let keep = window_keep(window);
        let kv = self.shared.dims.kv_dim;
        for li in 0..self.keys.len() {
            if !g.caches_window(li) {
                continue;
            }
            let first = self.kv_start[li];
            let held = self.pos - first;
            if self.keys[li].len() != held * kv || held < 2 * keep {
                continue;
            }
            let drop = held - keep;
            let needed = start.saturating_sub(keep).max(first);
            if let Some(slot) = saved.get_mut(li).filter(|s| s.is_none() && first + drop > needed && needed < start) {
                let (a, b) = ((needed - first) * kv, (start - first) * kv);
                *slot = Some(SavedWindow {
                    first: needed,
                    keys: self.keys[li][a..b].to_vec(),
                    values: self.values[li][a..b].to_vec(),
                });
            }
            self.keys[li].drain(..drop * kv);
            self.values[li].drain(..drop * kv);
            self.kv_start[li] += drop;
        }
    }

    /// Validates the whole input, then runs it in chunks; on failure the session is left as
    /// it was before the call.
    fn run(&mut self, tokens: &[u32], want: Logits, stop: &(dyn Fn() -> bool + Sync)) -> Result<Vec<f32>, EngineError> {
        let dims = &self.shared.dims;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= dims.vocab) {
            return Err(EngineError::TokenOutOfRange { token, vocab: dims.vocab as u32 });
        }
        if self.pos + tokens.len() > dims.max_context {
            return Err(EngineError::ContextFull { max: dims.max_context });
        }
        let start = self.pos;
        let n_chunks = tokens.len().div_ceil(PREFILL_CHUNK);
        let mut logits = Vec::new();
        // The sliding-window positions before `start` that trims during this call drop, kept
        // to restore the session on failure.
        let mut saved: Vec<Option<SavedWindow>> = vec![None; self.keys.len()];
        for (c, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let chunk_want = match want {
                Logits::All => Logits::All,
                _ if c + 1 == n_chunks => want,
                _ => Logits::None,
            };
            // On a worker of the kernels' pool: the products inside then keep unstarted work
            // for themselves instead of waiting for a sleeping or descheduled worker.
            let threads = self.threads;
            match kernels::with_workers(threads, || self.forward_chunk(chunk, chunk_want, stop)) {
                Ok(l) => {
                    logits.extend_from_slice(&l);
                    self.trim_windows(start, &mut saved);
                }
                Err(e) => {
                    for (li, w) in saved.into_iter().enumerate() {
                        if let Some(w) = w {
                            self.keys[li] = w.keys;
                            self.values[li] = w.values;
                            self.kv_start[li] = w.first;
                        }
                    }
                    self.truncate(start);
                    return Err(e);
                }
            }
        }
        Ok(logits)
    }

    /// One batched pass over `tokens` (already validated) at positions `pos..pos + t`.
    fn forward_chunk(
        &mut self,
        tokens: &[u32],
        want: Logits,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<Vec<f32>, EngineError> {
        let shared = Arc::clone(&self.shared);
        let sh = &*shared;
        if let Some(g) = &sh.g3n {
            let st = gemma3n::PassState {
                keys: &mut self.keys,
                values: &mut self.values,
                kv_start: &self.kv_start,
                widths: &self.widths,
                skip: &self.skip,
                pos: self.pos,
                threads: self.threads,
            };
            let head = Head { name: sh.head, rows: self.logit_rows };
            let logits = gemma3n::forward_chunk(g, &sh.model, &sh.dims, st, tokens, want, &sh.final_norm, head, stop)?;
            self.pos += tokens.len();
            return Ok(logits);
        }
        let model = &*sh.model;
        let dm = &sh.dims;
        let (d, hd, q_dim, kv_dim) = (dm.d_model, dm.head_dim, dm.q_dim, dm.kv_dim);
        let t = tokens.len();
        let p0 = self.pos;
        let threads = self.threads;

        // Embeddings.
        let emb = Matrix::load(model, names::TOK_EMBEDDINGS, dm.vocab, d)?;
        let mut x = vec![0.0f32; t * d];
        for (&tok, xr) in tokens.iter().zip(x.chunks_exact_mut(d)) {
            let row =
                emb.row(tok as usize).ok_or(EngineError::TokenOutOfRange { token: tok, vocab: dm.vocab as u32 })?;
            row.widen_into(xr);
        }

        // RoPE tables for the chunk's positions.
        let half = hd / 2;
        let mut cos = vec![0.0f32; t * half];
        let mut sin = vec![0.0f32; t * half];
        for (i, (c, s)) in cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half)).enumerate() {
            kernels::rope_angles(p0 + i, &sh.inv_freq, c, s);
        }

        let mut xn = vec![0.0f32; t * d];
        let mut q = vec![0.0f32; t * q_dim];
        let mut k = vec![0.0f32; t * kv_dim];
        let mut v = vec![0.0f32; t * kv_dim];
        let mut att = vec![0.0f32; t * q_dim];
        let mut proj = vec![0.0f32; t * d];
        let group = dm.n_heads / dm.n_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let n_ctx = p0 + t;

        for (li, layer) in sh.layers.iter().enumerate() {
            // A cancel stops the pass here; `run` truncates the cache rows written so far.
            if stop() {
                return Err(EngineError::Interrupted);
            }
            // Attention block.
            layer.attn_norm.apply(&x, &mut xn, d, dm.norm_eps);
            let wq = Matrix::load(model, &layer.wq, q_dim, d)?;
            let wk = Matrix::load(model, &layer.wk, kv_dim, d)?;
            let wv = Matrix::load(model, &layer.wv, kv_dim, d)?;
            kernels::matmul_many(&xn, t, &mut [(&wq, &mut q[..]), (&wk, &mut k[..]), (&wv, &mut v[..])], threads);
            for i in 0..t {
                let (c, s) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
                for head in q[i * q_dim..(i + 1) * q_dim].chunks_exact_mut(hd) {
                    kernels::rope(head, c, s);
                }
                for head in k[i * kv_dim..(i + 1) * kv_dim].chunks_exact_mut(hd) {
                    kernels::rope(head, c, s);
                }
            }
            let keys = &mut self.keys[li];
            let values = &mut self.values[li];
            reserve_cache(keys, n_ctx * kv_dim, dm.max_context * kv_dim);
            reserve_cache(values, n_ctx * kv_dim, dm.max_context * kv_dim);
            keys.extend_from_slice(&k);
            values.extend_from_slice(&v);
            let (keys, values) = (&*keys, &*values);
            let work = t.saturating_mul(dm.n_heads).saturating_mul(n_ctx).saturating_mul(hd);
            let qr = &q;
            kernels::par_units(&mut att, hd, work, threads, n_ctx, |u, out, scores| {
                let (i, h) = (u / dm.n_heads, u % dm.n_heads);
                let qh = &qr[i * q_dim + h * hd..i * q_dim + (h + 1) * hd];
                let off = (h / group) * hd;
                kernels::attend(qh, keys, values, p0 + i + 1, kv_dim, off, scale, scores, out);
            });
            let wo = Matrix::load(model, &layer.wo, d, q_dim)?;
            kernels::matmul(&att, t, &wo, &mut proj, threads);
            kernels::add_assign(&mut x, &proj);

            // FFN block: the first `w` neurons.
            let w = self.widths[li];
            if w > 0 {
                layer.ffn_norm.apply(&x, &mut xn, d, dm.norm_eps);
                let up = Matrix::load(model, &layer.ffn_up, w, d)?;
                let mut h = vec![0.0f32; t * w];
                let act = match dm.activation {
                    Activation::Silu => kernels::silu,
                    Activation::GeluTanh => kernels::gelu_tanh,
                };
                if dm.gated {
                    let gate = Matrix::load(model, &layer.ffn_gate, w, d)?;
                    let mut g = vec![0.0f32; t * w];
                    kernels::matmul_many(&xn, t, &mut [(&up, &mut h[..]), (&gate, &mut g[..])], threads);
                    for (hv, gv) in h.iter_mut().zip(&g) {
                        *hv *= act(*gv);
                    }
                } else {
                    kernels::matmul(&xn, t, &up, &mut h, threads);
                    for hv in h.iter_mut() {
                        *hv = act(*hv);
                    }
                }
                let down = Matrix::load(model, &layer.ffn_down_t, w, d)?;
                kernels::matmul_down(&h, t, &down, &mut proj, threads);
                kernels::add_assign(&mut x, &proj);
            }
        }
        self.pos = n_ctx;

        // Final norm and LM head, only for the rows whose logits are wanted.
        let rows = match want {
            Logits::None => return Ok(Vec::new()),
            Logits::Last => &x[(t - 1) * d..],
            Logits::All => &x[..],
        };
        let n = rows.len() / d;
        let mut xf = vec![0.0f32; n * d];
        sh.final_norm.apply(rows, &mut xf, d, dm.norm_eps);
        Head { name: sh.head, rows: self.logit_rows }.logits(model, dm.vocab, &xf, d, threads, None)
    }
}

/// The LM head of a pass: its tensor and the vocabulary entries computed
/// ([`Session::set_logit_rows`]).
#[derive(Clone, Copy)]
pub(super) struct Head<'a> {
    pub(super) name: &'a str,
    pub(super) rows: usize,
}

impl Head<'_> {
    /// The logits `[n, vocab]` of `n` final-normed rows `xf`: the first `self.rows` entries of
    /// each row from the head's first rows (soft-capped by `cap` when given), the others
    /// `-inf`.
    pub(super) fn logits(
        self,
        model: &ModelFile,
        vocab: usize,
        xf: &[f32],
        d: usize,
        threads: usize,
        cap: Option<f32>,
    ) -> Result<Vec<f32>, EngineError> {
        let n = xf.len() / d;
        let rows = self.rows.clamp(1, vocab);
        let head = Matrix::load(model, self.name, rows, d)?;
        let mut part = vec![0.0f32; n * rows];
        kernels::matmul(xf, n, &head, &mut part, threads);
        if let Some(cap) = cap {
            for x in part.iter_mut() {
                *x = cap * (*x / cap).tanh();
            }
        }
        if rows == vocab {
            return Ok(part);
        }
        let mut logits = vec![f32::NEG_INFINITY; n * vocab];
        for (dst, src) in logits.chunks_exact_mut(vocab).zip(part.chunks_exact(rows)) {
            dst[..rows].copy_from_slice(src);
        }
        Ok(logits)
    }
}

/// Grows a cache geometrically (at most to the context window) so long generations do not
/// copy the cache at every step, without reserving the whole window up front.
pub(super) fn reserve_cache(cache: &mut Vec<f32>, needed: usize, limit: usize) {
    if cache.capacity() >= needed {
        return;
    }
    let target = (cache.capacity() * 3 / 2).max(needed).min(limit.max(needed));
    cache.reserve_exact(target - cache.len());
}

/// Per layer: whether `submodel` skips it (elastic depth).
fn skipped_layers(submodel: &Submodel, n_layers: usize) -> Vec<bool> {
    (0..n_layers).map(|i| submodel.is_skipped(i)).collect()
}
