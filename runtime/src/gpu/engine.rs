//! [`GpuEngine`] and [`GpuSession`]: the CPU engine's forward pass (`crate::cpu`), op for op,
//! as compute dispatches over GPU-resident weights, activations and KV cache.
//!
//! A pass over `t` tokens (`t = 1` for decode) is recorded into one command encoder from a
//! plan built once per session (pipelines, uniform buffers, bind groups); only a 16-byte step
//! uniform (`pos0`, `t`) and the token ids are written per pass.

use std::fmt;
use std::sync::Arc;

use super::device::{map_read, Gpu};
use super::ops::{
    gemv_rows, split_2d, ActParams, ArgmaxParams, AttentionParams, EmbeddingParams, Kernel, Kernels, MatmulParams,
    NormParams, PipeKey, RopeParams, StepParams,
};
use super::weights::{pad8, upload_bytes, upload_f32, zeroed, GpuMatrix};
use super::{AdapterReport, GpuError};
use crate::format::{names, Activation, NormKind};
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
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions { adapter: None, max_context: None, prefill_chunk: 64, max_binding_bytes: None, gemv_rows: None }
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
    wq: GpuMatrix,
    wk: GpuMatrix,
    wv: GpuMatrix,
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
        let gpu = Gpu::open(opts.adapter.as_deref())?;
        let max_binding = opts.max_binding_bytes.map_or(gpu.max_binding(), |m| m.clamp(256, gpu.max_binding()));
        let kernels = Kernels::new(&gpu)?;
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
        let mat = |name: &str, rows: usize, cols: usize| GpuMatrix::upload(&gpu, &model, name, rows, cols, max_binding);
        let mut layers = Vec::with_capacity(dims.n_layers);
        for i in 0..dims.n_layers {
            let n = |s: &str| names::layer(i, s);
            layers.push(LayerShared {
                attn_norm: norm(&n(names::ATTN_NORM), &n(names::ATTN_NORM_BIAS))?,
                ffn_norm: norm(&n(names::FFN_NORM), &n(names::FFN_NORM_BIAS))?,
                wq: mat(&n(names::WQ), dims.q_dim, d)?,
                wk: mat(&n(names::WK), dims.kv_dim, d)?,
                wv: mat(&n(names::WV), dims.kv_dim, d)?,
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
        let layers: u64 = i.layers.iter().map(|l| l.wq.bytes() + l.wk.bytes() + l.wv.bytes() + l.wo.bytes()).sum();
        layers + i.embed.bytes() + i.head.as_ref().map_or(0, GpuMatrix::bytes)
    }

    /// Start-up self-check (for `--backend auto`): runs a short prompt through the smallest
    /// submodel on this GPU and on the CPU engine and compares every logit with
    /// [`Tolerance::FORWARD_F32`](crate::cpu::Tolerance::FORWARD_F32). Costs one small session
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
        crate::cpu::Tolerance::FORWARD_F32
            .check(&expected, &actual)
            .map_err(|m| fail(format!("logits of submodel {} vs the CPU engine: {m}", sub.name(model.metadata()))))
    }

    /// A session running `submodel` (one level per layer, each present in the file): uploads
    /// the FFN weight prefixes of its levels, allocates the KV cache and activations, and
    /// builds the dispatch plan (pipelines, uniforms, bind groups) once.
    pub fn session(&self, submodel: &Submodel) -> Result<GpuSession, GpuError> {
        GpuSession::new(Arc::clone(&self.inner), submodel)
    }
}

/// cos then sin of `pos * inv_freq[i]` for positions `0..ctx`, `[ctx, head_dim / 2]` each,
/// computed exactly as the CPU engine does (f32 `inv_freq`, f32 angle), so angles match bitwise.
pub(crate) fn rope_table(theta: f32, head_dim: usize, ctx: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
    let mut table = vec![0.0f32; 2 * ctx * half];
    for pos in 0..ctx {
        for (i, f) in inv_freq.iter().enumerate() {
            let angle = pos as f32 * f;
            table[pos * half + i] = angle.cos();
            table[ctx * half + pos * half + i] = angle.sin();
        }
    }
    table
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
    /// A matrix product over `n` outputs (both pipelines share the bind group layout): the
    /// `gemv` kernel on `gemv_grid` for one token, `gemm` tiles (64 outputs x 16 tokens) for more.
    Matmul {
        gemv: wgpu::ComputePipeline,
        gemm: wgpu::ComputePipeline,
        bind: wgpu::BindGroup,
        gemv_grid: (u32, u32),
        n: u32,
    },
}

impl Dispatch {
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

/// One recorded item: a dispatch, or a copy of `t` rows of `row_bytes` from `src` into `dst`
/// at row `pos0` (the KV cache append).
#[derive(Debug)]
enum Item {
    Dispatch(Dispatch),
    CacheAppend { src: wgpu::Buffer, dst: wgpu::Buffer, row_bytes: u64 },
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
    body: Vec<Item>,
    tail_last: Vec<Item>,
    tail_all: Vec<Item>,
    pos: usize,
    counters: StepCounters,
    ffn_bytes: u64,
    kv_bytes: u64,
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
    /// Every token's logits.
    All,
}

struct Planner<'a> {
    inner: &'a Inner,
    step: &'a wgpu::Buffer,
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
        let consts = [("F32_WEIGHTS", m.f32), ("ACCUMULATE", accumulate)];
        let gemv = k.pipeline(
            self.gpu(),
            &PipeKey::new(Kernel::MatmulGemv, if transposed { "gemv_t" } else { "gemv" }, &consts)
                .with("ROWS", self.inner.gemv_rows),
        )?;
        let gemm = k.pipeline(
            self.gpu(),
            &PipeKey::new(Kernel::MatmulGemm, "gemm", &[consts[0], consts[1], ("TRANSPOSED", transposed)]),
        )?;
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
                _pad: 0,
            };
            let ub = self.uniform("matmul params", &params)?;
            let bind = k.bind(self.gpu(), Kernel::MatmulGemv, &[&ub, self.step, x, &c.buffer, out])?;
            let gemv_grid = if transposed {
                ((m.row_units as u32).div_ceil(16), 1)
            } else {
                split_2d((n as u32).div_ceil(self.inner.gemv_rows))
            };
            items.push(Item::Dispatch(Dispatch::Matmul {
                gemv: gemv.clone(),
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
        let widths: Vec<usize> = submodel.widths(meta).into_iter().map(|w| w as usize).collect();
        let i = &*inner;
        let dm = &i.dims;
        let gpu = &i.gpu;
        // Activations and caches use the device limit; `max_binding` caps weight chunks.
        let limit = gpu.max_binding();
        let (sd, sq, skv) = (pad8(dm.d), pad8(dm.q_dim), pad8(dm.kv_dim));
        let sw = pad8(widths.iter().copied().max().unwrap_or(1).max(1));
        let sv = pad8(dm.vocab);

        // Tokens per pass: the prefill chunk, reduced until every activation buffer fits.
        let row_max = [sd, sq, skv, sw, sv, dm.n_heads * dm.ctx].into_iter().max().unwrap_or(1) as u64 * 4;
        let t_max = (i.prefill_chunk as u64).min(limit / row_max).max(1) as usize;
        if row_max > limit {
            return Err(GpuError::BufferTooLarge { what: "one token's activations".into(), bytes: row_max, limit });
        }

        // FFN weight prefixes: only rows [0, width) of this submodel's levels.
        let mut ffn = Vec::with_capacity(dm.n_layers);
        let mut ffn_bytes = 0u64;
        for (li, &w) in widths.iter().enumerate() {
            let mat = |suffix: &str| GpuMatrix::upload(gpu, &model, &names::layer(li, suffix), w, dm.d, i.max_binding);
            let up = mat(names::FFN_UP)?;
            let gate = if dm.gated { Some(mat(names::FFN_GATE)?) } else { None };
            let down = mat(names::FFN_DOWN_T)?;
            ffn_bytes += up.bytes() + gate.as_ref().map_or(0, GpuMatrix::bytes) + down.bytes();
            ffn.push((up, gate, down));
        }

        use wgpu::BufferUsages as U;
        let act = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        let f = 4u64;
        let t = t_max as u64;
        let buf = |label: &str, bytes: u64, usage: U| zeroed(gpu, label, bytes, usage, limit);
        let step = buf("step", 16, U::UNIFORM | U::COPY_DST)?;
        let tokens = buf("tokens", t * 4, U::STORAGE | U::COPY_DST)?;
        let x = buf("x", t * sd as u64 * f, act)?;
        let xn = buf("xn", t * sd as u64 * f, act)?;
        let q = buf("q", t * sq as u64 * f, act)?;
        let k = buf("k", t * skv as u64 * f, act)?;
        let v = buf("v", t * skv as u64 * f, act)?;
        let att = buf("att", t * sq as u64 * f, act)?;
        let up = buf("ffn up", t * sw as u64 * f, act)?;
        let gate = buf("ffn gate", if dm.gated { t * sw as u64 * f } else { 16 }, act)?;
        let scores = buf("scores", t * (dm.n_heads * dm.ctx) as u64 * f, act)?;
        let logits = buf("logits", t * sv as u64 * f, act)?;
        let argmax = buf("argmax", 16, act)?;
        let argmax_staging = buf("argmax staging", 16, U::MAP_READ | U::COPY_DST)?;
        let mut kv_bytes = 0u64;
        let mut caches = Vec::with_capacity(dm.n_layers);
        for li in 0..dm.n_layers {
            let bytes = (dm.ctx * skv) as u64 * f;
            caches.push((
                buf(&format!("k cache {li}"), bytes, U::STORAGE | U::COPY_DST)?,
                buf(&format!("v cache {li}"), bytes, U::STORAGE | U::COPY_DST)?,
            ));
            kv_bytes += 2 * bytes;
        }

        let p = Planner { inner: i, step: &step };
        let mut body = Vec::new();
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
            body.push(p.fixed(
                Kernel::Embedding,
                &[("F32_WEIGHTS", i.embed.f32)],
                &[&ub, &step, &tokens, &c.buffer, &x],
                Grid::PerToken((dm.d as u32).div_ceil(64)),
            )?);
        }
        let half = dm.head_dim / 2;
        let rope = p.uniform(
            "rope params",
            &RopeParams {
                n_heads: dm.n_heads as u32,
                n_kv_heads: dm.n_kv_heads as u32,
                head_dim: dm.head_dim as u32,
                half: half as u32,
                q_stride: sq as u32,
                kv_stride: skv as u32,
                sin_offset: (dm.ctx * half) as u32,
                _pad: 0,
            },
        )?;
        let attn_params = p.uniform(
            "attention params",
            &AttentionParams {
                n_heads: dm.n_heads as u32,
                group: (dm.n_heads / dm.n_kv_heads) as u32,
                head_dim: dm.head_dim as u32,
                q_stride: sq as u32,
                kv_stride: skv as u32,
                out_stride: sq as u32,
                ctx: dm.ctx as u32,
                scale: 1.0 / (dm.head_dim as f32).sqrt(),
            },
        )?;
        for (li, layer) in i.layers.iter().enumerate() {
            body.push(p.norm(&layer.attn_norm, &x, &xn, sd, false)?);
            p.matmul(&layer.wq, false, false, &xn, sd, &q, sq, &mut body)?;
            p.matmul(&layer.wk, false, false, &xn, sd, &k, skv, &mut body)?;
            p.matmul(&layer.wv, false, false, &xn, sd, &v, skv, &mut body)?;
            body.push(p.fixed(
                Kernel::Rope,
                &[],
                &[&rope, &step, &q, &k, &i.rope_table],
                Grid::PerToken((((dm.n_heads + dm.n_kv_heads) * half) as u32).div_ceil(64)),
            )?);
            let (kc, vc) = &caches[li];
            let row_bytes = skv as u64 * f;
            body.push(Item::CacheAppend { src: k.clone(), dst: kc.clone(), row_bytes });
            body.push(Item::CacheAppend { src: v.clone(), dst: vc.clone(), row_bytes });
            body.push(p.fixed(
                Kernel::Attention,
                &[],
                &[&attn_params, &step, &q, kc, vc, &scores, &att],
                Grid::PerToken(dm.n_heads as u32),
            )?);
            p.matmul(&layer.wo, false, true, &att, sq, &x, sd, &mut body)?;

            let (fu, fg, fd) = &ffn[li];
            let w = widths[li];
            body.push(p.norm(&layer.ffn_norm, &x, &xn, sd, false)?);
            p.matmul(fu, false, false, &xn, sd, &up, sw, &mut body)?;
            if let Some(fg) = fg {
                p.matmul(fg, false, false, &xn, sd, &gate, sw, &mut body)?;
            }
            let ap = p.uniform("ffn act params", &ActParams { width: w as u32, stride: sw as u32, _pad: [0; 2] })?;
            body.push(p.fixed(
                Kernel::FfnAct,
                &[("GATED", dm.gated), ("GELU", dm.activation == Activation::GeluTanh)],
                &[&ap, &step, &up, &gate],
                Grid::PerToken((w as u32).div_ceil(64)),
            )?);
            p.matmul(fd, true, true, &up, sw, &x, sd, &mut body)?;
        }

        let head = i.head.as_ref().unwrap_or(&i.embed);
        let mut tail_last = vec![p.norm(&i.final_norm, &x, &xn, sd, true)?];
        p.matmul(head, false, false, &xn, sd, &logits, sv, &mut tail_last)?;
        let am = p.uniform("argmax params", &ArgmaxParams { n: dm.vocab as u32, _pad: [0; 3] })?;
        let pipe = i.kernels.pipeline(gpu, &PipeKey::new(Kernel::Argmax, "main", &[]))?;
        let bind = i.kernels.bind(gpu, Kernel::Argmax, &[&am, &logits, &argmax])?;
        tail_last.push(Item::Dispatch(Dispatch::Fixed { pipe, bind, grid: Grid::Fixed(1, 1) }));
        let mut tail_all = vec![p.norm(&i.final_norm, &x, &xn, sd, false)?];
        p.matmul(head, false, false, &xn, sd, &logits, sv, &mut tail_all)?;

        gpu.take_uncaptured("creating a session")?;
        Ok(GpuSession {
            inner: Arc::clone(&inner),
            submodel: submodel.clone(),
            bufs: Buffers { step, tokens, logits, argmax, argmax_staging, t_max, sv },
            body,
            tail_last,
            tail_all,
            pos: 0,
            counters: StepCounters::default(),
            ffn_bytes,
            kv_bytes,
        })
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
        self.ffn_bytes
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
            let tail_items: &[Item] = match tail {
                Tail::None => &[],
                Tail::Last => &self.tail_last,
                Tail::All => &self.tail_all,
            };
            let tail_t = if tail == Tail::Last { 1 } else { t };
            let items = self.body.iter().map(|it| (it, t)).chain(tail_items.iter().map(|it| (it, tail_t)));
            dispatches = record(&mut enc, items, t, self.pos);
            if tail == Tail::Last {
                enc.copy_buffer_to_buffer(&self.bufs.argmax, 0, &self.bufs.argmax_staging, 0, 4);
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

/// Records `items` (each with its token count) into `enc`, opening a compute pass per run of
/// dispatches; returns the number of dispatches.
fn record<'a>(
    enc: &mut wgpu::CommandEncoder,
    items: impl Iterator<Item = (&'a Item, usize)>,
    t: usize,
    pos0: usize,
) -> u64 {
    let mut n = 0;
    let mut pass: Option<wgpu::ComputePass<'static>> = None;
    for (item, tt) in items {
        match item {
            Item::Dispatch(d) => {
                let p = pass.get_or_insert_with(|| {
                    enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None })
                        .forget_lifetime()
                });
                let (pipe, bind, (x, y)) = d.resolve(tt as u32);
                p.set_pipeline(pipe);
                p.set_bind_group(0, bind, &[]);
                p.dispatch_workgroups(x, y, 1);
                n += 1;
            }
            Item::CacheAppend { src, dst, row_bytes } => {
                drop(pass.take());
                enc.copy_buffer_to_buffer(src, 0, dst, pos0 as u64 * row_bytes, t as u64 * row_bytes);
            }
        }
    }
    drop(pass);
    n
}
