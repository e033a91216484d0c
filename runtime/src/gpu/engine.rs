//! [`GpuEngine`] and [`GpuSession`]: the CPU engine's forward pass (`crate::cpu`), op for op,
//! as compute dispatches over GPU-resident weights, activations and KV cache.
//!
//! A pass over `t` tokens (`t = 1` for decode) is recorded into one command encoder from a
//! plan built once per session (pipelines, uniform buffers, bind groups); only a 16-byte step
//! uniform (`pos0`, `t`) and the token ids are written per pass.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::device::{map_read, Gpu};
use super::ffn_store::{FfnShape, FfnStore, LayerFfn};
use super::ops::rope_table;
use super::ops::{
    gemv_rows, split_partial_floats, ActParams, ArgmaxParams, AttentionParams, EmbeddingParams, Kernel, Kernels,
    MatmulParams, NormParams, PipeKey, RopeParams, StepParams, TopkParams,
};
use super::weights::{pad8, upload_bytes, upload_f32, zeroed, GpuMatrix};
use super::{AdapterReport, GpuError};
use crate::format::{names, Activation, NormKind};
use crate::sampling::{Candidates, LogitTransform, Sampler, MAX_CANDIDATES};
use crate::{ModelFile, Submodel};

/// Options of a [`GpuEngine`].
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Use the first adapter whose name contains this (case-insensitive); `None`: wgpu's
    /// preferred high-performance adapter.
    pub adapter: Option<String>,
    /// Context window of sessions (KV cache rows); `None` (or more than the model's): the
    /// model's `max_context`.
    pub max_context: Option<usize>,
    /// Tokens per prefill pass (activation buffers are sized for this; reduced automatically
    /// when a buffer would exceed the binding limit). Default 64.
    pub prefill_chunk: usize,
    /// Cap on one weight buffer (row chunk), in bytes, below the device's storage-binding
    /// limit (tests use it to force the row-chunk path). `None`: the device limit.
    pub max_binding_bytes: Option<u64>,
    /// Output rows per workgroup of the decode GEMV kernel (a power of two, 1 to 64). `None`:
    /// `MATFORMER_GEMV_ROWS` if set, else 64 on CPU adapters and 4 on GPUs.
    pub gemv_rows: Option<u32>,
    /// Cap on the GPU memory this engine allocates (shared weights, the FFN weight store and
    /// every session's KV cache and activations), bytes. An allocation beyond it fails with
    /// [`GpuError::OutOfMemory`] exactly like a device allocation failure, so elastic sessions
    /// downshift and retry. Use it to leave headroom for the app's own GPU work or to emulate a
    /// smaller device. `None`: only the device's own limit.
    pub memory_limit_bytes: Option<u64>,
    /// After every upload, tell the OS it may drop the file mapping's resident pages
    /// ([`ModelFile::release_all`]): the GPU holds the weights, so the CPU-side copies need not
    /// count in the process's resident memory (on unified-memory phones they would otherwise
    /// double the footprint). A CPU engine reading the same file stays correct and faults the
    /// pages back in. Default `true`.
    pub release_uploaded_pages: bool,
    /// Force a weight path instead of timing the available ones at start-up (an error if the
    /// adapter cannot run it). `None`: `MATFORMER_GPU_WEIGHT_PATH` if set, else the fastest.
    pub weight_path: Option<super::WeightPath>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            adapter: None,
            max_context: None,
            prefill_chunk: 64,
            max_binding_bytes: None,
            gemv_rows: None,
            memory_limit_bytes: None,
            release_uploaded_pages: true,
            weight_path: None,
        }
    }
}

/// GPU work done by a session: for the benchmark note (one submit and one 4-byte readback per
/// decode step is the target).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepCounters {
    /// Forward passes (decode steps and prefill chunks).
    pub passes: u64,
    /// `queue.submit` calls.
    pub submits: u64,
    /// Buffer readbacks (each waits for the GPU).
    pub readbacks: u64,
    /// Bytes read back.
    pub readback_bytes: u64,
    /// Compute dispatches recorded.
    pub dispatches: u64,
}

/// Architecture numbers in `usize`.
#[derive(Clone, Debug)]
struct Dims {
    d: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    q_dim: usize,
    kv_dim: usize,
    vocab: usize,
    ctx: usize,
    eps: f32,
    norm: NormKind,
    activation: Activation,
    gated: bool,
}

/// A norm's weight (and LayerNorm bias) as f32 buffers.
#[derive(Debug)]
struct GpuNorm {
    w: wgpu::Buffer,
    b: Option<wgpu::Buffer>,
}

/// Weights every submodel shares.
#[derive(Debug)]
struct LayerShared {
    attn_norm: GpuNorm,
    ffn_norm: GpuNorm,
    /// `wq`, `wk` and `wv` stacked (one decode dispatch for the three projections): q rows at
    /// 0, k rows at `pad8(q_dim)`, v rows at `pad8(q_dim) + pad8(kv_dim)` (zero rows pad each
    /// part), so the product writes one activation row `[q | k | v]` ([`Acts::qkv`]).
    wqkv: GpuMatrix,
    wo: GpuMatrix,
}

struct Inner {
    model: Arc<ModelFile>,
    gpu: Gpu,
    kernels: Kernels,
    dims: Dims,
    max_binding: u64,
    prefill_chunk: usize,
    /// `ROWS` of the decode GEMV kernel.
    gemv_rows: u32,
    embed: GpuMatrix,
    /// `None` when the LM head is tied to the embeddings.
    head: Option<GpuMatrix>,
    final_norm: GpuNorm,
    layers: Vec<LayerShared>,
    /// cos then sin of `pos * inv_freq[i]`, `[ctx, head_dim / 2]` each.
    rope_table: wgpu::Buffer,
    /// FFN weight prefixes shared by the sessions (grown on demand, trimmed under pressure).
    ffn: Mutex<FfnStore>,
    /// [`GpuOptions::memory_limit_bytes`].
    memory_limit: Option<u64>,
    /// Bytes of the shared weights, norms and RoPE table.
    shared_bytes: u64,
    /// Bytes of the live sessions' buffers.
    session_bytes: AtomicU64,
    /// Largest FFN width of any level of any layer (sizes the FFN activation buffers).
    max_ffn_width: usize,
    /// The options the engine was created with.
    options: GpuOptions,
}

impl Inner {
    /// GPU bytes allocated by the engine now: shared weights, the FFN store, live sessions.
    fn memory_in_use(&self) -> u64 {
        let store = self.ffn.lock().map_or(0, |s| s.bytes());
        self.shared_bytes + store + self.session_bytes.load(Ordering::Relaxed)
    }

    /// Fails with [`GpuError::OutOfMemory`] when allocating `extra` more bytes would exceed
    /// the memory limit.
    fn check_limit(&self, extra: u64, during: &str) -> Result<(), GpuError> {
        if self.memory_limit.is_none() {
            return Ok(());
        }
        let store = self.ffn.lock().map_err(|_| poisoned())?.bytes();
        self.check_limit_with(extra, store, during)
    }

    /// [`Inner::check_limit`] with the FFN store's bytes given (its lock is held).
    fn check_limit_with(&self, extra: u64, store: u64, during: &str) -> Result<(), GpuError> {
        let Some(limit) = self.memory_limit else { return Ok(()) };
        let used = self.shared_bytes + store + self.session_bytes.load(Ordering::Relaxed);
        if used.saturating_add(extra) > limit {
            return Err(GpuError::OutOfMemory {
                during: during.to_string(),
                reason: format!("needs {extra} more bytes with {used} in use, over the {limit}-byte memory limit"),
            });
        }
        Ok(())
    }

    /// Per-layer tensor shapes for the FFN store.
    fn ffn_shapes(&self) -> Vec<FfnShape<'_>> {
        (0..self.dims.n_layers)
            .map(|layer| FfnShape {
                model: &self.model,
                layer,
                cols: self.dims.d,
                gated: self.dims.gated,
                max_binding: self.max_binding,
                release_pages: self.options.release_uploaded_pages,
            })
            .collect()
    }

    /// Makes the FFN store hold `widths` (uploading only missing rows, within the memory
    /// limit) and returns the layers with the bytes uploaded.
    fn ensure_ffn(&self, widths: &[usize]) -> Result<(Vec<Arc<LayerFfn>>, u64), GpuError> {
        let shapes = self.ffn_shapes();
        let mut store = self.ffn.lock().map_err(|_| poisoned())?;
        let missing = store.missing_bytes(&shapes, widths)?;
        if missing > 0 {
            self.check_limit_with(missing, store.bytes(), "uploading FFN weight prefixes")?;
        }
        let (layers, stats) = store.ensure(&self.gpu, &shapes, widths)?;
        Ok((layers, stats.uploaded_bytes))
    }
}

fn poisoned() -> GpuError {
    GpuError::Unsupported { reason: "the FFN weight store lock was poisoned by a panic in another thread".into() }
}

/// The GPU engine for one model file: device, pipelines (compiled once, on first use, shared
/// by every session) and the weights every submodel shares (embeddings, attention, norms, LM
/// head). `Send + Sync`.
pub struct GpuEngine {
    inner: Arc<Inner>,
}

impl fmt::Debug for GpuEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuEngine")
            .field("adapter", &self.inner.gpu.report.name)
            .field("dims", &self.inner.dims)
            .finish()
    }
}

impl GpuEngine {
    /// Opens the adapter, validates the architecture and uploads the shared weights.
    pub fn new(model: Arc<ModelFile>, opts: GpuOptions) -> Result<GpuEngine, GpuError> {
        if cfg!(target_endian = "big") {
            return Err(GpuError::Unsupported {
                reason: "weights are uploaded in place and need a little-endian CPU".into(),
            });
        }
        let meta = model.metadata();
        let a = &meta.architecture;
        let u = |v: u32| v as usize;
        let unsupported = |reason: String| Err(GpuError::Unsupported { reason });
        if a.n_heads == 0 || a.n_kv_heads == 0 || !a.n_heads.is_multiple_of(a.n_kv_heads) {
            return unsupported(format!(
                "n_heads {} must be a positive multiple of n_kv_heads {}",
                a.n_heads, a.n_kv_heads
            ));
        }
        if a.head_dim == 0 || !a.head_dim.is_multiple_of(2) || a.d_model == 0 || a.vocab_size == 0 || a.max_context == 0
        {
            return unsupported("d_model, vocab_size, max_context and an even head_dim must be positive".into());
        }
        if meta.ffn_widths.len() != u(a.n_layers) {
            return unsupported(format!("ffn_widths has {} layers, n_layers is {}", meta.ffn_widths.len(), a.n_layers));
        }
        let ctx = opts.max_context.map_or(u(a.max_context), |c| c.clamp(1, u(a.max_context)));
        let dims = Dims {
            d: u(a.d_model),
            n_layers: u(a.n_layers),
            n_heads: u(a.n_heads),
            n_kv_heads: u(a.n_kv_heads),
            head_dim: u(a.head_dim),
            q_dim: u(a.n_heads) * u(a.head_dim),
            kv_dim: u(a.n_kv_heads) * u(a.head_dim),
            vocab: u(a.vocab_size),
            ctx,
            eps: a.norm_eps,
            norm: a.norm,
            activation: a.activation,
            gated: a.gated_ffn,
        };
        let mut gpu = Gpu::open(opts.adapter.as_deref())?;
        let max_binding = opts.max_binding_bytes.map_or(gpu.max_binding(), |m| m.clamp(256, gpu.max_binding()));
        let mut kernels = Kernels::new(&gpu)?;
        super::weight_path::choose_weight_path(&mut gpu, &mut kernels, opts.weight_path)?;
        let gemv_rows = gemv_rows(&gpu, opts.gemv_rows)?;

        let d = dims.d;
        let norm = |w: &str, b: &str| -> Result<GpuNorm, GpuError> {
            let load = |name: &str| -> Result<wgpu::Buffer, GpuError> {
                let v = model.tensor_f32(name)?;
                if v.len() != d {
                    return Err(GpuError::BadTensor {
                        tensor: name.to_string(),
                        reason: format!("has {} elements, d_model is {d}", v.len()),
                    });
                }
                upload_f32(&gpu, name, &v)
            };
            Ok(GpuNorm {
                w: load(w)?,
                b: match dims.norm {
                    NormKind::RmsNorm => None,
                    NormKind::LayerNorm => Some(load(b)?),
                },
            })
        };
        let release = opts.release_uploaded_pages;
        let mat = |name: &str, rows: usize, cols: usize| {
            GpuMatrix::upload(&gpu, &model, name, rows, cols, max_binding, release)
        };
        let (sq, skv) = (pad8(dims.q_dim), pad8(dims.kv_dim));
        let mut layers = Vec::with_capacity(dims.n_layers);
        for i in 0..dims.n_layers {
            let n = |s: &str| names::layer(i, s);
            let (wq, wk, wv) = (n(names::WQ), n(names::WK), n(names::WV));
            let parts =
                [(wq.as_str(), dims.q_dim, 0), (wk.as_str(), dims.kv_dim, sq), (wv.as_str(), dims.kv_dim, sq + skv)];
            layers.push(LayerShared {
                attn_norm: norm(&n(names::ATTN_NORM), &n(names::ATTN_NORM_BIAS))?,
                ffn_norm: norm(&n(names::FFN_NORM), &n(names::FFN_NORM_BIAS))?,
                wqkv: GpuMatrix::upload_stacked(
                    &gpu,
                    &model,
                    &format!("layer {i} wq/wk/wv"),
                    &parts,
                    sq + 2 * skv,
                    d,
                    max_binding,
                    release,
                )?,
                wo: mat(&n(names::WO), d, dims.q_dim)?,
            });
        }
        let final_norm = norm(names::NORM, names::NORM_BIAS)?;
        let embed = mat(names::TOK_EMBEDDINGS, dims.vocab, d)?;
        let head = if a.tied_embeddings { None } else { Some(mat(names::LM_HEAD, dims.vocab, d)?) };

        // RoPE table, computed exactly as the CPU engine does (f32 inv_freq, f32 angle).
        let table = rope_table(a.rope_theta, dims.head_dim, ctx);
        let rope_table = upload_f32(&gpu, "rope table", &table)?;
        let prefill_chunk = opts.prefill_chunk.max(1);
        let norm_bytes = |n: &GpuNorm| n.w.size() + n.b.as_ref().map_or(0, wgpu::Buffer::size);
        let shared_bytes = layers
            .iter()
            .map(|l| l.wqkv.bytes() + l.wo.bytes() + norm_bytes(&l.attn_norm) + norm_bytes(&l.ffn_norm))
            .sum::<u64>()
            + embed.bytes()
            + head.as_ref().map_or(0, GpuMatrix::bytes)
            + norm_bytes(&final_norm)
            + rope_table.size();
        if let Some(limit) = opts.memory_limit_bytes.filter(|&l| shared_bytes > l) {
            return Err(GpuError::OutOfMemory {
                during: "uploading the shared weights".into(),
                reason: format!("they need {shared_bytes} bytes, over the {limit}-byte memory limit"),
            });
        }
        if opts.release_uploaded_pages {
            model.release_all()?;
        }
        let n_layers = dims.n_layers;
        let max_ffn_width = meta.ffn_widths.iter().flatten().copied().max().unwrap_or(1).max(1) as usize;
        Ok(GpuEngine {
            inner: Arc::new(Inner {
                model,
                gpu,
                kernels,
                dims,
                max_binding,
                prefill_chunk,
                gemv_rows,
                embed,
                head,
                final_norm,
                layers,
                rope_table,
                ffn: Mutex::new(FfnStore::new(n_layers)),
                memory_limit: opts.memory_limit_bytes,
                shared_bytes,
                session_bytes: AtomicU64::new(0),
                max_ffn_width,
                options: opts,
            }),
        })
    }

    /// The adapter this engine runs on.
    pub fn adapter(&self) -> &AdapterReport {
        &self.inner.gpu.report
    }

    /// The model file.
    pub fn model(&self) -> &Arc<ModelFile> {
        &self.inner.model
    }

    /// Bytes of weights shared by every session (embeddings, attention, norms, LM head).
    pub fn shared_weight_bytes(&self) -> u64 {
        let i = &*self.inner;
        let layers: u64 = i.layers.iter().map(|l| l.wqkv.bytes() + l.wo.bytes()).sum();
        layers + i.embed.bytes() + i.head.as_ref().map_or(0, GpuMatrix::bytes)
    }

    /// Start-up self-check (for `--backend auto`): runs a short prompt through the smallest
    /// submodel on this GPU and on the CPU engine and compares every logit with
    /// [`forward_tolerance`](super::forward_tolerance) of the weight path (`FORWARD_F32` on the
    /// packed path). Costs one small session
    /// and a CPU forward of a few tokens. An error means: do not use this GPU.
    pub fn self_check(&self) -> Result<(), GpuError> {
        let model = &self.inner.model;
        let n_layers = self.inner.dims.n_layers;
        let vocab = self.inner.dims.vocab as u32;
        let sub = Submodel::uniform(0, n_layers);
        let tokens: Vec<u32> = [1u32, 72, 105, 33, 10].iter().map(|t| t % vocab).collect();
        let fail = |reason: String| GpuError::SelfCheck { reason };
        let cpu = crate::cpu::CpuEngine::new(Arc::clone(model)).map_err(|e| fail(format!("CPU engine: {e}")))?;
        let expected = cpu
            .session(&sub)
            .and_then(|mut s| s.forward_all(&tokens))
            .map_err(|e| fail(format!("CPU forward: {e}")))?;
        let actual = self.session(&sub)?.forward_all(&tokens)?;
        super::forward_tolerance(self.inner.kernels.path())
            .check(&expected, &actual)
            .map_err(|m| fail(format!("logits of submodel {} vs the CPU engine: {m}", sub.name(model.metadata()))))
    }

    /// The options this engine was created with.
    pub fn options(&self) -> &GpuOptions {
        &self.inner.options
    }

    /// Bytes of FFN weight rows the engine's store holds on the GPU (shared by every session).
    pub fn ffn_resident_bytes(&self) -> u64 {
        self.inner.ffn.lock().map_or(0, |s| s.bytes())
    }

    /// GPU bytes this engine has allocated: shared weights, the FFN store and every live
    /// session's KV cache and activations (what [`GpuOptions::memory_limit_bytes`] caps).
    pub fn memory_in_use(&self) -> u64 {
        self.inner.memory_in_use()
    }

    /// Under memory pressure: the FFN store keeps only the rows `submodel` needs (per layer),
    /// dropping the chunks beyond and re-uploading the kept rows of a chunk that straddles the
    /// new width. Returns the bytes the store released; the GPU memory is freed once no session
    /// holds those chunks (switch or [`GpuSession::rebind`] the sessions). Sessions running a
    /// wider layer stay correct: they keep their chunks, or re-upload on their next switch.
    pub fn trim_ffn(&self, submodel: &Submodel) -> Result<u64, GpuError> {
        let inner = &*self.inner;
        let model = &inner.model;
        submodel.validate(model.metadata(), model.view().available_levels)?;
        let widths = widths_of(model, submodel);
        let shapes = inner.ffn_shapes();
        let mut store = inner.ffn.lock().map_err(|_| poisoned())?;
        Ok(store.trim(&inner.gpu, &shapes, &widths)?.released_bytes)
    }

    /// A session running `submodel` (one level per layer, each present in the file): makes the
    /// engine's FFN store hold the weight prefixes of its levels (uploading only the rows it
    /// lacks), allocates the KV cache and activations, and builds the dispatch plan
    /// (pipelines, uniforms, bind groups) once.
    pub fn session(&self, submodel: &Submodel) -> Result<GpuSession, GpuError> {
        GpuSession::new(Arc::clone(&self.inner), submodel)
    }
}

/// Runs `attempt` on `submodel` and, while it fails with [`GpuError::OutOfMemory`], on the
/// next smaller submodel ([`Submodel::step_down`]) until one fits. Returns the value, the
/// submodel that fitted, and the first out-of-memory error when it had to step down. Other
/// errors, and running out of memory at level 0, are returned as they are.
pub fn step_down_on_oom<T>(
    model: &ModelFile,
    submodel: &Submodel,
    mut attempt: impl FnMut(&Submodel) -> Result<T, GpuError>,
) -> Result<(T, Submodel, Option<GpuError>), GpuError> {
    let meta = model.metadata();
    let mut target = submodel.clone();
    let mut first_oom = None;
    loop {
        match attempt(&target) {
            Ok(v) => return Ok((v, target, first_oom)),
            Err(e @ GpuError::OutOfMemory { .. }) => match target.step_down() {
                Some(smaller) => {
                    log::warn!("GPU: {} does not fit ({e}); trying {}", target.name(meta), smaller.name(meta));
                    first_oom.get_or_insert(e);
                    target = smaller;
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

/// Workgroup counts of a single-pipeline dispatch as a function of the pass's token count `t`.
#[derive(Clone, Copy, Debug)]
enum Grid {
    /// `(x, t)`.
    PerToken(u32),
    /// `(x, y)` whatever `t`.
    Fixed(u32, u32),
    /// `(t, 1)`: one workgroup per token row.
    Rows,
}

/// A recorded dispatch.
#[derive(Debug)]
enum Dispatch {
    /// One pipeline, grid from `t`.
    Fixed { pipe: wgpu::ComputePipeline, bind: wgpu::BindGroup, grid: Grid },
    /// A matrix product over `n` outputs (the pipelines share the bind group layout): the
    /// `gemv` kernel on `gemv_grid` for one token, followed by `reduce` on its grid when the
    /// GEMV is the split transposed one; `gemm` tiles (64 outputs x 16 tokens) for more tokens.
    Matmul {
        gemv: wgpu::ComputePipeline,
        reduce: Option<(wgpu::ComputePipeline, (u32, u32))>,
        gemm: wgpu::ComputePipeline,
        bind: wgpu::BindGroup,
        gemv_grid: (u32, u32),
        n: u32,
    },
}

impl Dispatch {
    /// The dispatch that follows [`Dispatch::resolve`]'s in a pass over `t` tokens, if any
    /// (the reduction of a split transposed GEMV; same bind group).
    fn follow_up(&self, t: u32) -> Option<(&wgpu::ComputePipeline, (u32, u32))> {
        match self {
            Dispatch::Matmul { reduce: Some((pipe, grid)), .. } if t == 1 => Some((pipe, *grid)),
            _ => None,
        }
    }

    /// Pipeline, bind group and workgroup counts for a pass over `t` tokens.
    fn resolve(&self, t: u32) -> (&wgpu::ComputePipeline, &wgpu::BindGroup, (u32, u32)) {
        match self {
            Dispatch::Fixed { pipe, bind, grid } => {
                let g = match *grid {
                    Grid::PerToken(x) => (x, t),
                    Grid::Fixed(x, y) => (x, y),
                    Grid::Rows => (t, 1),
                };
                (pipe, bind, g)
            }
            Dispatch::Matmul { gemv, bind, gemv_grid, .. } if t == 1 => (gemv, bind, *gemv_grid),
            Dispatch::Matmul { gemm, bind, n, .. } => (gemm, bind, (n.div_ceil(64), t.div_ceil(16))),
        }
    }
}

/// One recorded item of a plan (every item is a dispatch: the KV-cache append is fused into
/// the RoPE dispatch, so a step is one compute pass).
#[derive(Debug)]
enum Item {
    Dispatch(Dispatch),
}

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
    pos: usize,
    counters: StepCounters,
    kv_bytes: u64,
    /// Activation buffers and KV cache (kept across switches).
    acts: Acts,
    /// The FFN layers the plan reads (held so the store may trim without breaking the plan).
    ffn: Vec<Arc<LayerFfn>>,
    /// Bytes counted in `Inner::session_bytes` for this session.
    alloc_bytes: u64,
    /// The candidate tail, created by the first candidates call.
    sampling: Option<SamplingBufs>,
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
struct Acts {
    x: wgpu::Buffer,
    xn: wgpu::Buffer,
    /// q, k and v of each token in one row of `sqkv` floats: q at 0, k at `sq`, v at
    /// `sq + skv`.
    qkv: wgpu::Buffer,
    att: wgpu::Buffer,
    up: wgpu::Buffer,
    gate: wgpu::Buffer,
    scores: wgpu::Buffer,
    /// Partial sums of the split transposed GEMV (binding 5 of every matrix product).
    partials: wgpu::Buffer,
    caches: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    rope: wgpu::Buffer,
    attn_params: wgpu::Buffer,
    sd: usize,
    sq: usize,
    /// `sq + 2 * pad8(kv_dim)`.
    sqkv: usize,
    sw: usize,
}

/// FFN width per layer of `submodel` (validated against `model`).
fn widths_of(model: &ModelFile, submodel: &Submodel) -> Vec<usize> {
    submodel.widths(model.metadata()).into_iter().map(|w| w as usize).collect()
}

/// GPU bytes of the rows a matrix view covers.
fn view_bytes(m: &GpuMatrix) -> u64 {
    let row = (m.row_units * 8 * if m.f32 { 4 } else { 2 }) as u64;
    m.chunks.iter().map(|c| c.rows as u64 * row).sum()
}

/// The FFN items of one layer at one width, with the bytes of the FFN rows they read.
type FfnPlan = Arc<(Vec<Item>, u64)>;

/// The per-token work of a pass, in order: `embed`, then for each layer `attn[l]` and
/// `ffn[l]`. Only `ffn` depends on the submodel.
#[derive(Debug)]
struct Plan {
    embed: Vec<Item>,
    attn: Vec<Vec<Item>>,
    ffn: Vec<FfnPlan>,
    /// FFN plans built so far, by `(layer, width)`: a switch back to a width seen before
    /// rebuilds nothing. Holds the chunks it reads; cleared by [`GpuSession::rebind`].
    cache: HashMap<(usize, usize), FfnPlan>,
}

impl Plan {
    fn items(&self) -> impl Iterator<Item = &Item> {
        let layers = self.attn.iter().zip(&self.ffn).flat_map(|(a, f)| a.iter().chain(f.0.iter()));
        self.embed.iter().chain(layers)
    }

    fn ffn_bytes(&self) -> u64 {
        self.ffn.iter().map(|f| f.1).sum()
    }

    /// Points `ffn` at the plans for `widths` over `layers`, building the missing ones.
    fn set_ffn(
        &mut self,
        p: &Planner<'_>,
        a: &Acts,
        layers: &[Arc<LayerFfn>],
        widths: &[usize],
    ) -> Result<(), GpuError> {
        let mut next = Vec::with_capacity(widths.len());
        for (li, (layer, &w)) in layers.iter().zip(widths).enumerate() {
            let plan = match self.cache.get(&(li, w)) {
                Some(plan) => Arc::clone(plan),
                None => {
                    let plan = Arc::new(plan_ffn(p, a, li, layer, w)?);
                    self.cache.insert((li, w), Arc::clone(&plan));
                    plan
                }
            };
            next.push(plan);
        }
        self.ffn = next;
        Ok(())
    }
}

/// The submodel-independent items: the embedding gather and every layer's attention block.
fn plan_shared(p: &Planner<'_>, tokens: &wgpu::Buffer, a: &Acts) -> Result<(Vec<Item>, Vec<Vec<Item>>), GpuError> {
    let i = p.inner;
    let dm = &i.dims;
    let (sd, sq) = (a.sd, a.sq);
    let mut embed = Vec::new();
    for c in &i.embed.chunks {
        let params = EmbeddingParams {
            row_start: c.row_start as u32,
            rows: c.rows as u32,
            cols: dm.d as u32,
            row_words: (i.embed.row_units * if i.embed.f32 { 8 } else { 4 }) as u32,
            out_stride: sd as u32,
            _pad: [0; 3],
        };
        let ub = p.uniform("embedding params", &params)?;
        embed.push(p.fixed(
            Kernel::Embedding,
            &[("F32_WEIGHTS", i.embed.f32)],
            &[&ub, p.step, tokens, &c.buffer, &a.x],
            Grid::PerToken((dm.d as u32).div_ceil(64)),
        )?);
    }
    let half = dm.head_dim / 2;
    let mut attn = Vec::with_capacity(dm.n_layers);
    for (li, layer) in i.layers.iter().enumerate() {
        let mut body = vec![p.norm(&layer.attn_norm, &a.x, &a.xn, sd, false)?];
        p.matmul(&layer.wqkv, false, false, &a.xn, sd, &a.qkv, a.sqkv, &mut body)?;
        // RoPE writes the rotated keys and the values straight into the cache rows
        // `pos0..pos0 + t` (no copy command between the dispatches).
        let (kc, vc) = &a.caches[li];
        body.push(p.fixed(
            Kernel::Rope,
            &[],
            &[&a.rope, p.step, &a.qkv, &i.rope_table, kc, vc],
            Grid::PerToken((((dm.n_heads + dm.n_kv_heads) * half) as u32).div_ceil(64)),
        )?);
        body.push(p.fixed(
            Kernel::Attention,
            &[],
            &[&a.attn_params, p.step, &a.qkv, kc, vc, &a.scores, &a.att],
            Grid::PerToken(dm.n_heads as u32),
        )?);
        p.matmul(&layer.wo, false, true, &a.att, sq, &a.x, sd, &mut body)?;
        attn.push(body);
    }
    Ok((embed, attn))
}

/// Layer `li`'s FFN block at width `w` (rows read from `layer`): norm, up (and gate),
/// activation, down with the residual add.
fn plan_ffn(p: &Planner<'_>, a: &Acts, li: usize, layer: &LayerFfn, w: usize) -> Result<(Vec<Item>, u64), GpuError> {
    let i = p.inner;
    let dm = &i.dims;
    let (sd, sw) = (a.sd, a.sw);
    let (fu, fg, fd) = layer.prefix(w);
    let bytes = view_bytes(&fu) + fg.as_ref().map_or(0, view_bytes) + view_bytes(&fd);
    let mut body = vec![p.norm(&i.layers[li].ffn_norm, &a.x, &a.xn, sd, false)?];
    p.matmul(&fu, false, false, &a.xn, sd, &a.up, sw, &mut body)?;
    if let Some(fg) = &fg {
        p.matmul(fg, false, false, &a.xn, sd, &a.gate, sw, &mut body)?;
    }
    let ap = p.uniform("ffn act params", &ActParams { width: w as u32, stride: sw as u32, _pad: [0; 2] })?;
    body.push(p.fixed(
        Kernel::FfnAct,
        &[("GATED", dm.gated), ("GELU", dm.activation == Activation::GeluTanh)],
        &[&ap, p.step, &a.up, &a.gate],
        Grid::PerToken((w as u32).div_ceil(64)),
    )?);
    p.matmul(&fd, true, true, &a.up, sw, &a.x, sd, &mut body)?;
    Ok((body, bytes))
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

struct Planner<'a> {
    inner: &'a Inner,
    step: &'a wgpu::Buffer,
    /// The session's split-GEMV partials ([`Acts::partials`]).
    partials: &'a wgpu::Buffer,
}

impl Planner<'_> {
    fn gpu(&self) -> &Gpu {
        &self.inner.gpu
    }

    fn uniform<T: bytemuck::Pod>(&self, label: &str, params: &T) -> Result<wgpu::Buffer, GpuError> {
        upload_bytes(self.gpu(), label, bytemuck::bytes_of(params), wgpu::BufferUsages::UNIFORM)
    }

    fn fixed(
        &self,
        kernel: Kernel,
        constants: &[(&'static str, bool)],
        buffers: &[&wgpu::Buffer],
        grid: Grid,
    ) -> Result<Item, GpuError> {
        let pipe = self.inner.kernels.pipeline(self.gpu(), &PipeKey::new(kernel, "main", constants))?;
        let bind = self.inner.kernels.bind(self.gpu(), kernel, buffers)?;
        Ok(Item::Dispatch(Dispatch::Fixed { pipe, bind, grid }))
    }

    /// `out (+)= x W^T` (or `x W` when `transposed`, for `ffn_down_t`), one dispatch per chunk.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        m: &GpuMatrix,
        transposed: bool,
        accumulate: bool,
        x: &wgpu::Buffer,
        x_stride: usize,
        out: &wgpu::Buffer,
        out_stride: usize,
        items: &mut Vec<Item>,
    ) -> Result<(), GpuError> {
        if transposed && !accumulate && m.chunks.len() > 1 {
            return Err(GpuError::Unsupported { reason: "a chunked transposed product must accumulate".into() });
        }
        let k = &self.inner.kernels;
        let keys = k.matmul_keys(m.f32, accumulate, transposed, self.inner.gemv_rows, m.row_units);
        let gemv = k.pipeline(self.gpu(), &keys.gemv)?;
        let gemm = k.pipeline(self.gpu(), &keys.gemm)?;
        let reduce = keys.reduce.as_ref().map(|key| k.pipeline(self.gpu(), key)).transpose()?;
        for c in &m.chunks {
            let (n, kk, out_offset, k_offset) =
                if transposed { (m.cols, c.rows, 0, c.row_start) } else { (c.rows, m.cols, c.row_start, 0) };
            let params = MatmulParams {
                n: n as u32,
                k: kk as u32,
                row_units: m.row_units as u32,
                x_stride: x_stride as u32,
                out_stride: out_stride as u32,
                out_offset: out_offset as u32,
                k_offset: k_offset as u32,
                slabs: 0,
            };
            let gemv_grid =
                k.gemv_grid(m.f32, transposed, n as u32, kk as u32, m.row_units as u32, self.inner.gemv_rows);
            let params = MatmulParams { slabs: if reduce.is_some() { gemv_grid.0 } else { 0 }, ..params };
            let ub = self.uniform("matmul params", &params)?;
            let bind = k.bind(self.gpu(), keys.gemv.kernel, &[&ub, self.step, x, &c.buffer, out, self.partials])?;
            items.push(Item::Dispatch(Dispatch::Matmul {
                gemv: gemv.clone(),
                reduce: reduce.clone().map(|r| (r, ((m.row_units as u32).div_ceil(64), 1))),
                gemm: gemm.clone(),
                bind,
                gemv_grid,
                n: n as u32,
            }));
        }
        Ok(())
    }

    /// Norm of rows of `x` into `out` (`last_only`: row t-1 into row 0).
    fn norm(
        &self,
        norm: &GpuNorm,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
        stride: usize,
        last_only: bool,
    ) -> Result<Item, GpuError> {
        let dm = &self.inner.dims;
        let params = NormParams {
            cols: dm.d as u32,
            in_stride: stride as u32,
            out_stride: stride as u32,
            last_only: u32::from(last_only),
            eps: dm.eps,
            _pad: [0; 3],
        };
        let ub = self.uniform("norm params", &params)?;
        let grid = if last_only { Grid::Fixed(1, 1) } else { Grid::Rows };
        match &norm.b {
            None => self.fixed(Kernel::RmsNorm, &[], &[&ub, self.step, x, &norm.w, out], grid),
            Some(b) => self.fixed(Kernel::LayerNorm, &[], &[&ub, self.step, x, &norm.w, out, b], grid),
        }
    }
}

impl GpuSession {
    fn new(inner: Arc<Inner>, submodel: &Submodel) -> Result<GpuSession, GpuError> {
        let model = Arc::clone(&inner.model);
        let meta = model.metadata();
        submodel.validate(meta, model.view().available_levels)?;
        let widths = widths_of(&model, submodel);
        let i = &*inner;
        let dm = &i.dims;
        let gpu = &i.gpu;
        // Activations and caches use the device limit; `max_binding` caps weight chunks.
        let limit = gpu.max_binding();
        let (sd, sq, skv) = (pad8(dm.d), pad8(dm.q_dim), pad8(dm.kv_dim));
        // FFN activations are sized for the widest level so that any later switch fits.
        let sw = pad8(i.max_ffn_width);
        let sv = pad8(dm.vocab);
        let sqkv = sq + 2 * skv;

        // Tokens per pass: the prefill chunk, reduced until every activation buffer fits.
        let row_max = [sd, sqkv, sw, sv, dm.n_heads * dm.ctx].into_iter().max().unwrap_or(1) as u64 * 4;
        let t_max = (i.prefill_chunk as u64).min(limit / row_max).max(1) as usize;
        if row_max > limit {
            return Err(GpuError::BufferTooLarge { what: "one token's activations".into(), bytes: row_max, limit });
        }
        let f = 4u64;
        let t = t_max as u64;
        let gate_rows = if dm.gated { sw } else { 0 };
        let act_floats = 2 * sd + 2 * sq + 2 * skv + sw + gate_rows + dm.n_heads * dm.ctx + sv;
        let kv_bytes = 2 * dm.n_layers as u64 * (dm.ctx * skv) as u64 * f;
        // Transposed products (the FFN down projection) have `d_model` output columns.
        let partials_floats = split_partial_floats(sd / 8);
        let alloc_bytes = t * act_floats as u64 * f + t * 4 + kv_bytes + 4 * 16 + partials_floats as u64 * f;
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
        let argmax = buf("argmax", 16, act)?;
        let argmax_staging = buf("argmax staging", 16, U::MAP_READ | U::COPY_DST)?;
        let mut caches = Vec::with_capacity(dm.n_layers);
        for li in 0..dm.n_layers {
            let bytes = (dm.ctx * skv) as u64 * f;
            caches.push((
                buf(&format!("k cache {li}"), bytes, U::STORAGE | U::COPY_DST)?,
                buf(&format!("v cache {li}"), bytes, U::STORAGE | U::COPY_DST)?,
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
            scores: buf("scores", t * (dm.n_heads * dm.ctx) as u64 * f, act)?,
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
                    sin_offset: (dm.ctx * half) as u32,
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
                    ctx: dm.ctx as u32,
                    scale: 1.0 / (dm.head_dim as f32).sqrt(),
                },
            )?,
            sd,
            sq,
            sqkv,
            sw,
        };
        let (embed, attn) = plan_shared(&p, &tokens, &acts)?;
        let mut plan = Plan { embed, attn, ffn: Vec::new(), cache: HashMap::new() };
        plan.set_ffn(&p, &acts, &ffn, &widths)?;

        let head = i.head.as_ref().unwrap_or(&i.embed);
        let (x, xn) = (&acts.x, &acts.xn);
        let mut tail_last = vec![p.norm(&i.final_norm, x, xn, sd, true)?];
        p.matmul(head, false, false, xn, sd, &logits, sv, &mut tail_last)?;
        let am = p.uniform("argmax params", &ArgmaxParams { n: dm.vocab as u32, _pad: [0; 3] })?;
        let pipe = i.kernels.pipeline(gpu, &PipeKey::new(Kernel::Argmax, "main", &[]))?;
        let bind = i.kernels.bind(gpu, Kernel::Argmax, &[&am, &logits, &argmax])?;
        tail_last.push(Item::Dispatch(Dispatch::Fixed { pipe, bind, grid: Grid::Fixed(1, 1) }));
        let mut tail_all = vec![p.norm(&i.final_norm, x, xn, sd, false)?];
        p.matmul(head, false, false, xn, sd, &logits, sv, &mut tail_all)?;

        gpu.take_uncaptured("creating a session")?;
        // The session's `Drop` gives the bytes back from now on.
        std::mem::forget(reservation);
        Ok(GpuSession {
            inner: Arc::clone(&inner),
            submodel: submodel.clone(),
            bufs: Buffers { step, tokens, logits, argmax, argmax_staging, t_max, sv },
            acts,
            ffn,
            plan,
            tail_last,
            tail_all,
            pos: 0,
            counters: StepCounters::default(),
            kv_bytes,
            alloc_bytes,
            sampling: None,
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
        let upload_ms = started.elapsed().as_secs_f64() * 1e3;
        let p = Planner { inner: &inner, step: &self.bufs.step, partials: &self.acts.partials };
        self.plan.set_ffn(&p, &self.acts, &ffn, &widths)?;
        inner.gpu.take_uncaptured("switching submodel")?;
        self.ffn = ffn;
        self.submodel = submodel.clone();
        self.pos = 0;
        Ok(GpuSwitch { uploaded_bytes, upload_ms, total_ms: started.elapsed().as_secs_f64() * 1e3, cache_kept: false })
    }

    /// [`switch_to`](Self::switch_to) that keeps the KV cache and position: later tokens run
    /// `submodel` over the keys and values the previous submodel wrote (the keep-KV switch,
    /// no re-prefill). On error the session is unchanged.
    pub fn switch_keep_cache(&mut self, submodel: &Submodel) -> Result<GpuSwitch, GpuError> {
        let pos = self.pos;
        let mut sw = self.switch_to(submodel)?;
        self.pos = pos;
        sw.cache_kept = true;
        Ok(sw)
    }

    /// Re-reads this session's FFN layers from the engine's store (after
    /// [`GpuEngine::trim_ffn`]) so that it stops holding GPU buffers the store released.
    /// The weights are the same rows, so the KV cache and position are kept. Uploads only if
    /// the store was trimmed below this session's widths.
    pub fn rebind(&mut self) -> Result<u64, GpuError> {
        let inner = Arc::clone(&self.inner);
        let widths = widths_of(&inner.model, &self.submodel);
        let (ffn, uploaded) = inner.ensure_ffn(&widths)?;
        let p = Planner { inner: &inner, step: &self.bufs.step, partials: &self.acts.partials };
        self.plan.cache.clear();
        self.plan.set_ffn(&p, &self.acts, &ffn, &widths)?;
        self.ffn = ffn;
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
        self.inner.dims.ctx
    }

    /// Vocabulary size (length of a logits vector).
    pub fn vocab_size(&self) -> usize {
        self.inner.dims.vocab
    }

    /// Bytes of this session's FFN weight prefixes on the GPU.
    pub fn ffn_weight_bytes(&self) -> u64 {
        self.plan.ffn_bytes()
    }

    /// Bytes of the GPU KV cache (allocated for the whole context window).
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
    }

    /// Forgets every token from `position` on (no-op if `position >= self.position()`).
    pub fn truncate(&mut self, position: usize) {
        self.pos = self.pos.min(position);
    }

    /// Appends `tokens` (batched passes of up to the prefill chunk) and returns the argmax of
    /// the last token's logits (the greedy next token). One submit per chunk and one 4-byte
    /// readback in all.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<u32, GpuError> {
        if tokens.is_empty() {
            return Err(GpuError::EmptyInput { what: "prefill" });
        }
        self.run(tokens, Tail::Last)?;
        self.read_argmax()
    }

    /// Appends one token and returns the argmax of its logits: the whole step is recorded in
    /// one command encoder, with one submit and one 4-byte readback.
    pub fn decode(&mut self, token: u32) -> Result<u32, GpuError> {
        self.run(&[token], Tail::Last)?;
        self.read_argmax()
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
        self.read_candidates(k)
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
        self.read_candidates(k)
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
        let p = sampler.params();
        if p.is_greedy() && !p.has_penalties() {
            return self.prefill(tokens);
        }
        let c = self.prefill_candidates(tokens, sampler.candidate_count(), &sampler.logit_transform())?;
        self.finish_sample(&c, sampler)
    }

    /// [`GpuSession::prefill_sample`] for one token: one submit and one readback per step
    /// unless the candidates do not decide.
    pub fn decode_sample(&mut self, token: u32, sampler: &mut Sampler) -> Result<u32, GpuError> {
        let p = sampler.params();
        if p.is_greedy() && !p.has_penalties() {
            return self.decode(token);
        }
        let c = self.decode_candidates(token, sampler.candidate_count(), &sampler.logit_transform())?;
        self.finish_sample(&c, sampler)
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
        let k = k.min(vocab);
        let params = TopkParams {
            n: vocab as u32,
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
        let head = i.head.as_ref().unwrap_or(&i.embed);
        let mut tail = vec![p.norm(&i.final_norm, &a.x, &a.xn, a.sd, true)?];
        p.matmul(head, false, false, &a.xn, a.sd, &self.bufs.logits, self.bufs.sv, &mut tail)?;
        tail.push(p.fixed(Kernel::TopK, &[], &[&params, &pen, &self.bufs.logits, &out], Grid::Fixed(1, 1))?);
        gpu.take_uncaptured("creating the sampling buffers")?;
        i.session_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.alloc_bytes += bytes;
        self.sampling = Some(SamplingBufs { params, pen, out, staging, tail });
        Ok(())
    }

    /// The candidates the last [`Tail::Candidates`] pass copied to the staging buffer.
    fn read_candidates(&mut self, k: usize) -> Result<Candidates, GpuError> {
        let Some(sb) = &self.sampling else {
            return Err(GpuError::Readback { reason: "no candidates were computed".into() });
        };
        let n = candidate_bytes(k);
        let bytes = map_read(&self.inner.gpu, &sb.staging, n)?;
        self.counters.readbacks += 1;
        self.counters.readback_bytes += n;
        let word = |i: usize| u32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
        let pairs = (0..k).map(|j| (word(2 * j), f32::from_bits(word(2 * j + 1)))).collect();
        Ok(Candidates { pairs, log_sum_exp: f32::from_bits(word(2 * k)) })
    }

    /// Appends `tokens` and returns the logits of every one of them, row-major
    /// `[tokens.len(), vocab_size]` (evaluation, parity tests). Empty input gives empty output.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GpuError> {
        let start = self.pos;
        let mut out = Vec::with_capacity(tokens.len() * self.inner.dims.vocab);
        self.validate(tokens)?;
        for chunk in tokens.chunks(self.bufs.t_max) {
            let r = self.pass(chunk, Tail::All).and_then(|()| self.read_logits(chunk.len()));
            match r {
                Ok(l) => out.extend_from_slice(&l),
                Err(e) => {
                    self.pos = start;
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
        if self.pos + tokens.len() > dm.ctx {
            return Err(GpuError::ContextFull { max: dm.ctx });
        }
        Ok(())
    }

    /// Validates, then runs `tokens` in chunks, computing `tail` on the last one; on failure
    /// the session is left as it was.
    fn run(&mut self, tokens: &[u32], tail: Tail) -> Result<(), GpuError> {
        self.validate(tokens)?;
        let start = self.pos;
        let n_chunks = tokens.len().div_ceil(self.bufs.t_max);
        for (c, chunk) in tokens.chunks(self.bufs.t_max).enumerate() {
            let tail = if c + 1 == n_chunks { tail } else { Tail::None };
            if let Err(e) = self.pass(chunk, tail) {
                self.pos = start;
                return Err(e);
            }
        }
        Ok(())
    }

    /// One pass over `tokens` (at most `t_max`, validated) at positions `pos..pos + t`:
    /// recorded in one encoder, one submit.
    fn pass(&mut self, tokens: &[u32], tail: Tail) -> Result<(), GpuError> {
        let inner = Arc::clone(&self.inner);
        let gpu = &inner.gpu;
        let t = tokens.len();
        let step = StepParams { pos0: self.pos as u32, t: t as u32, _pad: [0; 2] };
        let mut dispatches = 0u64;
        gpu.scoped("running a forward pass", || {
            gpu.queue.write_buffer(&self.bufs.step, 0, bytemuck::bytes_of(&step));
            gpu.queue.write_buffer(&self.bufs.tokens, 0, bytemuck::cast_slice(tokens));
            let mut enc = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("pass") });
            let tail_items: &[Item] = match (tail, &self.sampling) {
                (Tail::None, _) => &[],
                (Tail::Last, _) => &self.tail_last,
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
            gpu.queue.submit([enc.finish()]);
        })?;
        self.pos += t;
        self.counters.passes += 1;
        self.counters.submits += 1;
        self.counters.dispatches += dispatches;
        Ok(())
    }

    fn read_argmax(&mut self) -> Result<u32, GpuError> {
        let bytes = map_read(&self.inner.gpu, &self.bufs.argmax_staging, 4)?;
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
        Ok(all.chunks_exact(sv).take(rows).flat_map(|r| r[..vocab].iter().copied()).collect())
    }
}

/// Bytes of `k` candidates and the log-sum-exp in `topk.wgsl`'s output.
fn candidate_bytes(k: usize) -> u64 {
    (2 * k as u64 + 1) * 4
}

/// Records `items` (each with its token count) into `enc` as one compute pass; returns the
/// number of dispatches.
fn record<'a>(enc: &mut wgpu::CommandEncoder, items: impl Iterator<Item = (&'a Item, usize)>) -> u64 {
    let mut n = 0;
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
    for (item, tt) in items {
        let Item::Dispatch(d) = item;
        let (pipe, bind, (x, y)) = d.resolve(tt as u32);
        pass.set_pipeline(pipe);
        pass.set_bind_group(0, bind, &[]);
        pass.dispatch_workgroups(x, y, 1);
        n += 1;
        if let Some((pipe, (x, y))) = d.follow_up(tt as u32) {
            pass.set_pipeline(pipe);
            pass.dispatch_workgroups(x, y, 1);
            n += 1;
        }
    }
    drop(pass);
    n
}
