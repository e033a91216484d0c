//! Gemma 3n on the GPU: the weights beyond a Llama block, the session buffers of the AltUp
//! streams, and the dispatch plans of one pass. The math is the CPU decoder's
//! (`cpu/gemma3n.rs`, whose module doc lists the steps), op by op in f32:
//!
//! - embed: `tok_embeddings` gathered and scaled by `sqrt(d_model)` into `x0` and stream 0;
//!   streams `1..n` are `altup_proj[j-1](x0)` rescaled to `x0`'s RMS (`altup_io.wgsl`).
//! - per running layer: AltUp predict (`altup.wgsl`), attention norm, LAuReL (two products and
//!   `g3n_norm.wgsl` mode 0), q/k/v in one product (k and v only on layers that own their
//!   K/V), per-head norms + RoPE (local or global table) + KV append (`head_norm_rope.wgsl`),
//!   attention over the owner layer's cache (`attention.wgsl` with scale 1 and the sliding
//!   window), `wo`, the post-attention norm and `(active + attn + laurel) / sqrt(2)` (mode 1),
//!   the GeGLU FFN at the layer's width from the engine's FFN store (Gaussian top-k on the gate
//!   of a sparse layer, `gauss_topk.wgsl`; the down product accumulates into a buffer the
//!   post-FFN norm (mode 2) reads and zeroes), AltUp correct (which also writes the per-layer
//!   gate's input), the per-layer input (`g3n_ple.wgsl`: the layer's block of
//!   `per_layer_model_projection` applied to `x0`, normed, plus the token's row of
//!   `per_layer_embeddings`) gating `ple.gate`'s product, `ple.proj` and its norm added to
//!   streams `1..n` (mode 3).
//! - tail: streams `1..n` through `altup_unembed`, rescaled to stream 0's RMS and averaged
//!   with it, the final norm, the LM head and the soft-cap (`softcap.wgsl`).
//!
//! The per-layer embedding table (`[per_layer_vocab, n_layers * per_layer_dim]`, 2.3 GB in
//! f16 for E4B) stays in the file mapping: each pass reads only its tokens' rows on the host
//! and writes them (as f32) into a session buffer with the token ids, before its one submit.
//! So a speculative round, whose drafted tokens exist only on the device, cannot run a Gemma
//! 3n file.
//!
//! Skipped layers (elastic depth) record nothing, and their weights are never uploaded: the
//! engine keeps a per-layer store of the non-FFN weights (like the FFN store, filled when a
//! session first runs the layer); the FFN store holds no rows for a layer no session ran.
//! Only layers that own their K/V get a KV cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::device::Gpu;
use super::engine::{GpuNorm, Inner};
use super::ffn_store::LayerFfn;
use super::ops::{
    AltupIoParams, AltupParams, AttentionParams, BufView, G3nNormParams, G3nPleParams, GaussTopkParams,
    HeadNormRopeParams, Kernel, SoftcapParams,
};
use super::plan::{Grid, Item, Planner};
use super::weights::{pad8, upload_f32, zeroed, GpuMatrix};
use super::GpuError;
use crate::dims::ModelDims;
use crate::format::{g3n_names as g3, names, Gemma3nConfig};
use crate::ModelFile;

/// Bytes a stream's start is aligned to in the stream buffers, so a stream can be bound as a
/// buffer range (WebGPU's largest `min_storage_buffer_offset_alignment`).
const STREAM_ALIGN_FLOATS: usize = 64;

/// Largest head dimension `head_norm_rope.wgsl` holds in shared memory.
const MAX_HEAD_DIM: usize = 512;

/// Most AltUp streams (`altup.wgsl`'s arrays; the format allows at most 16).
const MAX_STREAMS: usize = 16;

/// What a Gemma 3n engine holds beyond the Llama fields of [`Inner`].
#[derive(Debug)]
pub(super) struct G3Engine {
    pub(super) config: Gemma3nConfig,
    /// AltUp streams.
    n: usize,
    /// `per_layer_dim`.
    ple: usize,
    altup_proj: Vec<GpuMatrix>,
    altup_unembed: Vec<GpuMatrix>,
    /// `per_layer_projection_norm`, `[per_layer_dim]`.
    ple_norm: wgpu::Buffer,
    /// RoPE table of the sliding-window layers (the full layers' is `Inner::rope_table`).
    rope_local: wgpu::Buffer,
    /// The layers' non-FFN weights, uploaded when a session first runs the layer.
    layers: Mutex<Vec<Option<Arc<G3Layer>>>>,
    /// GPU bytes of `layers` (kept outside the lock for the memory-limit checks).
    layer_bytes: AtomicU64,
    /// Bytes of the weights above (streams, norms, tables), counted in `Inner::shared_bytes`.
    pub(super) shared_bytes: u64,
}

/// One layer's weights besides its FFN rows.
#[derive(Debug)]
pub(super) struct G3Layer {
    attn_norm: GpuNorm,
    ffn_norm: GpuNorm,
    post_attn_norm: wgpu::Buffer,
    post_ffn_norm: wgpu::Buffer,
    laurel_norm: wgpu::Buffer,
    ple_norm: wgpu::Buffer,
    /// `q_norm` then `k_norm` (zeros on a layer that reads another layer's K/V).
    qk_norms: wgpu::Buffer,
    /// router_norm, router, prediction, correction, correct_scale (see `altup.wgsl`).
    altup: wgpu::Buffer,
    laurel_left: GpuMatrix,
    laurel_right: GpuMatrix,
    /// `wq`, `wk`, `wv` stacked (q at row 0, k at `pad8(q_dim)`, v after `pad8(kv_dim)` more)
    /// on an owner layer; `wq` alone otherwise.
    wqkv: GpuMatrix,
    wo: GpuMatrix,
    ple_gate: GpuMatrix,
    ple_proj: GpuMatrix,
    /// Rows `[i * per_layer_dim, (i + 1) * per_layer_dim)` of `per_layer_model_projection`.
    ple_model: GpuMatrix,
    /// `Phi^-1(sparsity)` of a sparse layer.
    sparsity: Option<f32>,
    sliding: bool,
    owns_kv: bool,
    bytes: u64,
}

fn vec_of(model: &ModelFile, name: &str, len: usize) -> Result<Vec<f32>, GpuError> {
    let v = model.tensor_f32(name)?;
    if v.len() != len {
        return Err(GpuError::BadTensor {
            tensor: name.to_string(),
            reason: format!("has {} elements, expected {len}", v.len()),
        });
    }
    Ok(v)
}

/// The Gemma 3n fields of `model`, if it is a Gemma 3n file.
pub(super) fn config_of(model: &ModelFile) -> Result<Option<Gemma3nConfig>, GpuError> {
    Gemma3nConfig::from_metadata(model.metadata()).map_err(|reason| GpuError::Unsupported { reason })
}

impl G3Engine {
    /// Uploads the AltUp stream matrices, the projection norm and the local RoPE table; the
    /// per-layer weights come with the first session that runs each layer.
    pub(super) fn new(
        gpu: &Gpu,
        model: &ModelFile,
        dims: &ModelDims,
        config: Gemma3nConfig,
        ctx: usize,
        max_binding: u64,
        release: bool,
    ) -> Result<G3Engine, GpuError> {
        let d = dims.d_model;
        let n = config.altup_inputs as usize;
        let ple = config.per_layer_dim as usize;
        let unsupported = |reason: String| GpuError::Unsupported { reason };
        if n == 0 || n > MAX_STREAMS {
            return Err(unsupported(format!("{n} AltUp streams; the GPU backend runs 1 to {MAX_STREAMS}")));
        }
        if dims.head_dim > MAX_HEAD_DIM || !dims.head_dim.is_multiple_of(2) {
            return Err(unsupported(format!(
                "head_dim {}; the GPU backend runs even head dims up to {MAX_HEAD_DIM}",
                dims.head_dim
            )));
        }
        let mat = |name: &str| GpuMatrix::upload(gpu, model, name, d, d, max_binding, release);
        let altup_proj = (0..n - 1).map(|j| mat(&g3::altup_proj(j))).collect::<Result<Vec<_>, _>>()?;
        let altup_unembed = (0..n - 1).map(|j| mat(&g3::altup_unembed(j))).collect::<Result<Vec<_>, _>>()?;
        let ple_norm =
            upload_f32(gpu, g3::PER_LAYER_PROJECTION_NORM, &vec_of(model, g3::PER_LAYER_PROJECTION_NORM, ple)?)?;
        let rope_local =
            upload_f32(gpu, "local rope table", &super::ops::rope_table(config.rope_local_theta, dims.head_dim, ctx))?;
        let shared_bytes = altup_proj.iter().chain(&altup_unembed).map(GpuMatrix::bytes).sum::<u64>()
            + ple_norm.size()
            + rope_local.size();
        Ok(G3Engine {
            layers: Mutex::new(vec![None; dims.n_layers]),
            layer_bytes: AtomicU64::new(0),
            config,
            n,
            ple,
            altup_proj,
            altup_unembed,
            ple_norm,
            rope_local,
            shared_bytes,
        })
    }

    /// GPU bytes of the per-layer weights uploaded so far.
    pub(super) fn layer_bytes(&self) -> u64 {
        self.layer_bytes.load(Ordering::Relaxed)
    }

    /// The weights of the layers `skip` runs (uploading the ones no session ran before, within
    /// the memory limit); `None` for a skipped layer.
    pub(super) fn ensure_layers(&self, inner: &Inner, skip: &[bool]) -> Result<Vec<Option<Arc<G3Layer>>>, GpuError> {
        let mut store = self.layers.lock().map_err(|_| poisoned())?;
        let mut next = store.clone();
        for (i, slot) in next.iter_mut().enumerate() {
            if slot.is_none() && !skip.get(i).copied().unwrap_or(false) {
                inner.check_limit(self.layer_upload_bytes(inner, i)?, "uploading a Gemma 3n layer's weights")?;
                let layer = self.upload_layer(inner, i)?;
                self.layer_bytes.fetch_add(layer.bytes, Ordering::Relaxed);
                *slot = Some(Arc::new(layer));
            }
        }
        let out = next.iter().enumerate().map(|(i, s)| if skip[i] { None } else { s.clone() }).collect();
        *store = next;
        Ok(out)
    }

    /// Drops the weights of the layers `skip` skips (memory pressure); returns the bytes the
    /// store released (freed once no session holds them).
    pub(super) fn trim_layers(&self, skip: &[bool]) -> Result<u64, GpuError> {
        let mut store = self.layers.lock().map_err(|_| poisoned())?;
        let mut released = 0;
        for (slot, &s) in store.iter_mut().zip(skip) {
            if s {
                if let Some(l) = slot.take() {
                    released += l.bytes;
                }
            }
        }
        self.layer_bytes.fetch_sub(released, Ordering::Relaxed);
        Ok(released)
    }

    /// GPU bytes [`G3Engine::upload_layer`] allocates for layer `i` (checked against the memory
    /// limit before uploading): its matrices' padded or repacked rows, and its f32 vectors.
    fn layer_upload_bytes(&self, inner: &Inner, i: usize) -> Result<u64, GpuError> {
        let (model, dm) = (&*inner.model, &inner.dims);
        let (d, hd, n, ple) = (dm.d_model, dm.head_dim, self.n, self.ple);
        let l = |s: &str| names::layer(i, s);
        let rows = |name: &str, rows: usize, cols: usize| -> Result<u64, GpuError> {
            let info = model.view().tensor(name).map_err(crate::ModelError::from)?;
            Ok(super::weights::gpu_row_bytes(info.dtype, cols) * rows as u64)
        };
        let f32s = |len: usize| (len as u64 * 4).max(16).div_ceil(16) * 16;
        let rank = self.config.laurel_rank as usize;
        let mut bytes = 6 * f32s(d) + f32s(2 * hd) + f32s(2 * d + n * d + n * n * n + n * n);
        bytes += rows(&l(g3::LAUREL_LEFT), rank, d)? + rows(&l(g3::LAUREL_RIGHT), d, rank)?;
        bytes += rows(&l(names::WQ), dm.q_dim, d)? + rows(&l(names::WO), d, dm.q_dim)?;
        if self.config.owns_kv(i) {
            let (sq, skv) = (pad8(dm.q_dim), pad8(dm.kv_dim));
            bytes += rows(&l(names::WK), sq + 2 * skv - dm.q_dim, d)?;
        }
        bytes += rows(&l(g3::PLE_GATE), ple, d)? + rows(&l(g3::PLE_PROJ), d, ple)?;
        bytes += rows(g3::PER_LAYER_MODEL_PROJECTION, ple, d)?;
        Ok(bytes)
    }

    fn upload_layer(&self, inner: &Inner, i: usize) -> Result<G3Layer, GpuError> {
        let (gpu, model, dm) = (&inner.gpu, &*inner.model, &inner.dims);
        let cfg = &self.config;
        let (d, hd, n, ple) = (dm.d_model, dm.head_dim, self.n, self.ple);
        let rank = cfg.laurel_rank as usize;
        let (mb, release) = (inner.max_binding, inner.options.release_uploaded_pages);
        let l = |s: &str| names::layer(i, s);
        let f32buf = |name: String, len: usize| -> Result<wgpu::Buffer, GpuError> {
            upload_f32(gpu, &name, &vec_of(model, &name, len)?)
        };
        let norm = |name: String| -> Result<GpuNorm, GpuError> { Ok(GpuNorm { w: f32buf(name, d)?, b: None }) };
        let mat =
            |name: String, rows: usize, cols: usize| GpuMatrix::upload(gpu, model, &name, rows, cols, mb, release);
        let owns_kv = cfg.owns_kv(i);
        let mut qk = vec_of(model, &l(g3::Q_NORM), hd)?;
        if owns_kv {
            qk.extend(vec_of(model, &l(g3::K_NORM), hd)?);
        } else {
            qk.extend(std::iter::repeat_n(0.0, hd));
        }
        let mut small = vec_of(model, &l(g3::ALTUP_ROUTER_NORM), d)?;
        small.extend(vec_of(model, &l(g3::ALTUP_ROUTER), n * d)?);
        small.extend(vec_of(model, &l(g3::ALTUP_PREDICTION), n * n * n)?);
        small.extend(vec_of(model, &l(g3::ALTUP_CORRECTION), n * n)?);
        small.extend(vec_of(model, &l(g3::ALTUP_CORRECT_SCALE), d)?);
        let wqkv = if owns_kv {
            let (sq, skv) = (pad8(dm.q_dim), pad8(dm.kv_dim));
            let (wq, wk, wv) = (l(names::WQ), l(names::WK), l(names::WV));
            let parts = [(wq.as_str(), dm.q_dim, 0), (wk.as_str(), dm.kv_dim, sq), (wv.as_str(), dm.kv_dim, sq + skv)];
            GpuMatrix::upload_stacked(gpu, model, &format!("layer {i} wq/wk/wv"), &parts, sq + 2 * skv, d, mb, release)?
        } else {
            mat(l(names::WQ), dm.q_dim, d)?
        };
        let sparsity = cfg.activation_sparsity.get(i).copied().unwrap_or(0.0);
        let layer = G3Layer {
            attn_norm: norm(l(names::ATTN_NORM))?,
            ffn_norm: norm(l(names::FFN_NORM))?,
            post_attn_norm: f32buf(l(g3::POST_ATTN_NORM), d)?,
            post_ffn_norm: f32buf(l(g3::POST_FFN_NORM), d)?,
            laurel_norm: f32buf(l(g3::LAUREL_NORM), d)?,
            ple_norm: f32buf(l(g3::PLE_NORM), d)?,
            qk_norms: upload_f32(gpu, &format!("layer {i} q/k norms"), &qk)?,
            altup: upload_f32(gpu, &format!("layer {i} altup"), &small)?,
            laurel_left: mat(l(g3::LAUREL_LEFT), rank, d)?,
            laurel_right: mat(l(g3::LAUREL_RIGHT), d, rank)?,
            wqkv,
            wo: mat(l(names::WO), d, dm.q_dim)?,
            ple_gate: mat(l(g3::PLE_GATE), ple, d)?,
            ple_proj: mat(l(g3::PLE_PROJ), d, ple)?,
            ple_model: GpuMatrix::upload_rows(
                gpu,
                model,
                g3::PER_LAYER_MODEL_PROJECTION,
                i * ple,
                (i + 1) * ple,
                d,
                mb,
                release,
            )?,
            sparsity: (sparsity > 0.0).then(|| crate::cpu::normal_quantile(f64::from(sparsity)) as f32),
            sliding: cfg.sliding.get(i).copied().unwrap_or(false),
            owns_kv,
            bytes: 0,
        };
        let buffers = [
            &layer.attn_norm.w,
            &layer.ffn_norm.w,
            &layer.post_attn_norm,
            &layer.post_ffn_norm,
            &layer.laurel_norm,
            &layer.ple_norm,
            &layer.qk_norms,
            &layer.altup,
        ];
        let mats = [
            &layer.laurel_left,
            &layer.laurel_right,
            &layer.wqkv,
            &layer.wo,
            &layer.ple_gate,
            &layer.ple_proj,
            &layer.ple_model,
        ];
        let bytes = buffers.iter().map(|b| b.size()).sum::<u64>() + mats.iter().map(|m| m.bytes()).sum::<u64>();
        if release {
            model.release_all()?;
        }
        Ok(G3Layer { bytes, ..layer })
    }
}

fn poisoned() -> GpuError {
    GpuError::Unsupported { reason: "the Gemma 3n layer store lock was poisoned by a panic in another thread".into() }
}

/// A Gemma 3n session's buffers beyond the Llama ones of `Acts` (which hold `xn`, `x` (the
/// attention-plus-LAuReL and then activated row), q/k/v, the attention output, the FFN
/// activations, the scores and the owners' KV caches).
#[derive(Debug)]
pub(super) struct G3Acts {
    /// Rows of the sliding-window layers' ring-buffer caches (0: caches of the whole context).
    ring: usize,
    /// Scaled embeddings `[t, sd]`.
    x0: wgpu::Buffer,
    /// The AltUp streams, stream `j` at `j * stream` floats, `[t, sd]` each.
    hs: wgpu::Buffer,
    /// The predictions, laid out as `hs` (also the last rows gathered for the tail).
    pred: wgpu::Buffer,
    laurel: wgpu::Buffer,
    /// LAuReL's low-rank activations `[t, sr]`.
    lr: wgpu::Buffer,
    /// Outputs of `wo`, `ple.proj` and the unembedding `[t, sd]`.
    proj: wgpu::Buffer,
    /// The FFN-down product `[t, sd]`, kept zero between passes.
    ffn_out: wgpu::Buffer,
    /// The pass's tokens' rows of `per_layer_embeddings` `[t, n_layers * per_layer_dim]`,
    /// written by the host.
    pub(super) ple_rows: wgpu::Buffer,
    /// `[t, sp]`.
    ple_proj: wgpu::Buffer,
    /// `[t, sp]`.
    ple_gate: wgpu::Buffer,
    /// The per-layer gate's input `[t, sd]`.
    first: wgpu::Buffer,
    attn_local: wgpu::Buffer,
    attn_global: wgpu::Buffer,
    /// Floats between streams.
    stream: usize,
    /// Padded LAuReL rank.
    sr: usize,
    /// Padded `per_layer_dim`.
    sp: usize,
    /// Rows of the activation buffers.
    t_max: usize,
    /// The layer weights of the session's submodel (`None` for skipped layers).
    pub(super) layers: Vec<Option<Arc<G3Layer>>>,
}

/// Rows of a sliding-window layer's ring-buffer K/V cache for passes of up to `t_max` tokens
/// in a context of `ctx` positions (position `j` at row `j % rows`): the `window` positions a
/// query reads, a pass's new rows, and as many again so that going back up to `t_max`
/// positions (a rejected speculative draft, a cancelled pass) finds its rows. 0 (a cache of
/// `ctx` rows) when that is not smaller.
pub(super) fn ring_rows(window: usize, t_max: usize, ctx: usize) -> usize {
    let rows = window.max(1) + 2 * t_max;
    if rows < ctx {
        rows
    } else {
        0
    }
}

/// Bytes of the buffers [`G3Acts::new`] allocates for `t_max` tokens.
pub(super) fn acts_bytes(g: &G3Engine, dm: &ModelDims, t_max: usize) -> u64 {
    let (sd, t) = (pad8(dm.d_model), t_max);
    let stream = stream_floats(t, sd);
    let (sr, sp) = (pad8(g.config.laurel_rank as usize), pad8(g.ple));
    let floats = 2 * g.n * stream + t * (5 * sd + sr + 2 * sp + dm.n_layers * g.ple);
    floats as u64 * 4 + 2 * 48
}

fn stream_floats(t_max: usize, sd: usize) -> usize {
    (t_max * sd).div_ceil(STREAM_ALIGN_FLOATS) * STREAM_ALIGN_FLOATS
}

impl G3Acts {
    pub(super) fn new(
        p: &Planner<'_>,
        g: &G3Engine,
        t_max: usize,
        sqkv: usize,
        sq: usize,
        ring: usize,
    ) -> Result<G3Acts, GpuError> {
        let i = p.inner;
        let (gpu, dm) = (&i.gpu, &i.dims);
        let limit = gpu.max_binding();
        let sd = pad8(dm.d_model);
        let stream = stream_floats(t_max, sd);
        let (sr, sp) = (pad8(g.config.laurel_rank as usize), pad8(g.ple));
        use wgpu::BufferUsages as U;
        let act = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        let f = |label: &str, floats: usize| zeroed(gpu, label, floats as u64 * 4, act, limit);
        let attn = |sliding: bool| {
            p.uniform(
                "gemma3n attention params",
                &AttentionParams {
                    n_heads: dm.n_heads as u32,
                    group: (dm.n_heads / dm.n_kv_heads) as u32,
                    head_dim: dm.head_dim as u32,
                    q_stride: sqkv as u32,
                    kv_stride: pad8(dm.kv_dim) as u32,
                    out_stride: sq as u32,
                    ctx: i.ctx as u32,
                    scale: 1.0,
                    window: if sliding { g.config.sliding_window } else { 0 },
                    ring: if sliding { ring as u32 } else { 0 },
                    _pad: [0; 2],
                },
            )
        };
        Ok(G3Acts {
            x0: f("gemma3n x0", t_max * sd)?,
            hs: f("altup streams", g.n * stream)?,
            pred: f("altup predictions", g.n * stream)?,
            laurel: f("laurel", t_max * sd)?,
            lr: f("laurel rank", t_max * sr)?,
            proj: f("gemma3n proj", t_max * sd)?,
            ffn_out: f("ffn out", t_max * sd)?,
            ple_rows: f("per-layer embedding rows", t_max * dm.n_layers * g.ple)?,
            ple_proj: f("per-layer projection", t_max * sp)?,
            ple_gate: f("per-layer gate", t_max * sp)?,
            first: f("per-layer gate input", t_max * sd)?,
            ring,
            attn_local: attn(true)?,
            attn_global: attn(false)?,
            stream,
            sr,
            sp,
            t_max,
            layers: Vec::new(),
        })
    }

    /// Stream `j` of `buf` (`hs` or `pred`) as a binding.
    fn stream_view<'a>(&self, buf: &'a wgpu::Buffer, j: usize, sd: usize) -> BufView<'a> {
        BufView { buffer: buf, offset: (j * self.stream * 4) as u64, size: Some((self.t_max * sd * 4) as u64) }
    }
}

/// Writes the rows of `per_layer_embeddings` of `tokens` (validated against the vocabulary)
/// into the session's row buffer: the only reads of the table, from the file mapping.
pub(super) fn write_ple_rows(inner: &Inner, g: &G3Engine, acts: &G3Acts, tokens: &[u32]) -> Result<(), GpuError> {
    let cfg = &g.config;
    let width = inner.dims.n_layers * g.ple;
    let table =
        crate::cpu::weights::Matrix::load(&inner.model, g3::PER_LAYER_EMBEDDINGS, cfg.per_layer_vocab as usize, width)
            .map_err(|e| GpuError::BadTensor { tensor: g3::PER_LAYER_EMBEDDINGS.into(), reason: e.to_string() })?;
    let mut rows = vec![0.0f32; tokens.len() * width];
    for (&tok, out) in tokens.iter().zip(rows.chunks_exact_mut(width)) {
        let r = if tok < cfg.per_layer_vocab { tok as usize } else { 0 };
        table
            .row(r)
            .ok_or_else(|| GpuError::BadTensor {
                tensor: g3::PER_LAYER_EMBEDDINGS.into(),
                reason: format!("no row {r}"),
            })?
            .widen_into(out);
    }
    inner.gpu.queue.write_buffer(&acts.ple_rows, 0, bytemuck::cast_slice(&rows));
    Ok(())
}

/// The pass's first items: the scaled embeddings into `x0` and stream 0, the other streams
/// from `altup_proj`.
pub(super) fn plan_embed(
    p: &Planner<'_>,
    g: &G3Engine,
    a: &G3Acts,
    tokens: &wgpu::Buffer,
    sd: usize,
) -> Result<Vec<Item>, GpuError> {
    let i = p.inner;
    let d = i.dims.d_model;
    let mut items = Vec::new();
    for target in [&a.x0, &a.hs] {
        items.extend(super::plan::embed_items(p, tokens, target, sd, (d as f32).sqrt())?);
    }
    for (j, m) in g.altup_proj.iter().enumerate() {
        let out = a.stream_view(&a.hs, j + 1, sd);
        p.matmul_views(m, false, false, BufView::whole(&a.x0), sd, out, sd, &mut items)?;
        let params = io_params(g, a, sd, d, j + 1, 1.0);
        let ub = p.uniform("altup match params", &params)?;
        let views = [
            BufView::whole(&ub),
            BufView::whole(p.step),
            BufView::whole(&a.x0),
            BufView::whole(&a.proj),
            BufView::whole(&a.hs),
        ];
        items.push(p.fixed_views(Kernel::AltupIo, "match_rms", &[], &[], &views, Grid::Rows)?);
    }
    Ok(items)
}

fn io_params(g: &G3Engine, a: &G3Acts, sd: usize, d: usize, j: usize, scale: f32) -> AltupIoParams {
    AltupIoParams {
        d: d as u32,
        n: g.n as u32,
        stream: a.stream as u32,
        stride: sd as u32,
        j: j as u32,
        scale,
        _pad: [0; 2],
    }
}

/// The Llama buffers a Gemma 3n layer plan uses.
pub(super) struct LlamaActs<'a> {
    pub(super) x: &'a wgpu::Buffer,
    pub(super) xn: &'a wgpu::Buffer,
    pub(super) qkv: &'a wgpu::Buffer,
    pub(super) att: &'a wgpu::Buffer,
    pub(super) up: &'a wgpu::Buffer,
    pub(super) gate: &'a wgpu::Buffer,
    pub(super) scores: &'a wgpu::Buffer,
    /// The KV cache of each layer that owns one (a small placeholder for the others).
    pub(super) caches: &'a [(wgpu::Buffer, wgpu::Buffer)],
    pub(super) sd: usize,
    pub(super) sq: usize,
    pub(super) sqkv: usize,
    pub(super) sw: usize,
}

/// Layer `li`'s items at FFN width `w` (rows from `ffn`): nothing for a skipped layer
/// (`layer` is `None`).
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_layer(
    p: &Planner<'_>,
    g: &G3Engine,
    a: &G3Acts,
    la: &LlamaActs<'_>,
    li: usize,
    layer: Option<&G3Layer>,
    ffn: Option<&LayerFfn>,
    w: usize,
) -> Result<Vec<Item>, GpuError> {
    let Some(layer) = layer else { return Ok(Vec::new()) };
    let i = p.inner;
    let dm = &i.dims;
    let (d, sd, n) = (dm.d_model, la.sd, g.n);
    let eps = dm.norm_eps;
    let mut items = Vec::new();

    // Predict.
    let ap = p.uniform(
        "altup params",
        &AltupParams {
            d: d as u32,
            n: n as u32,
            stream: a.stream as u32,
            stride: sd as u32,
            o_router: d as u32,
            o_pred: (d + n * d) as u32,
            o_corr: (d + n * d + n * n * n) as u32,
            o_scale: (d + n * d + n * n * n + n * n) as u32,
            eps,
            inv_d: 1.0 / d as f32,
            _pad: [0; 2],
        },
    )?;
    let scale = [("SCALE", g.config.altup_correct_scale)];
    let altup_views = [
        BufView::whole(&ap),
        BufView::whole(p.step),
        BufView::whole(&a.hs),
        BufView::whole(&a.pred),
        BufView::whole(la.x),
        BufView::whole(&layer.altup),
        BufView::whole(&a.first),
    ];
    items.push(p.fixed_views(Kernel::Altup, "predict", &scale, &[], &altup_views, Grid::Rows)?);

    // Attention input and LAuReL.
    items.push(p.norm(&layer.attn_norm, &a.pred, la.xn, sd, false)?);
    p.matmul(&layer.laurel_left, false, false, la.xn, sd, &a.lr, a.sr, &mut items)?;
    p.matmul(&layer.laurel_right, false, false, &a.lr, a.sr, &a.proj, sd, &mut items)?;
    items.push(g3_norm(p, 0, &a.proj, &layer.laurel_norm, la.xn, la.xn, &a.laurel, sd, n, a.stream)?);

    // Attention.
    p.matmul(&layer.wqkv, false, false, la.xn, sd, la.qkv, la.sqkv, &mut items)?;
    let owner = g
        .config
        .kv_owner(li)
        .ok_or_else(|| GpuError::Unsupported { reason: format!("layer {li} reads the K/V of no earlier layer") })?;
    let (kc, vc) = &la.caches[owner];
    let half = dm.head_dim / 2;
    let (sq, skv) = (la.sq, pad8(dm.kv_dim));
    let n_kv = if layer.owns_kv { dm.n_kv_heads } else { 0 };
    let hp = p.uniform(
        "head norm rope params",
        &HeadNormRopeParams {
            n_heads: dm.n_heads as u32,
            n_kv_heads: n_kv as u32,
            head_dim: dm.head_dim as u32,
            half: half as u32,
            q_stride: la.sqkv as u32,
            kv_stride: skv as u32,
            sin_offset: (i.ctx * half) as u32,
            k_offset: sq as u32,
            v_offset: (sq + skv) as u32,
            eps,
            ring: if layer.sliding { a.ring as u32 } else { 0 },
            _pad: 0,
        },
    )?;
    let table = if layer.sliding { &g.rope_local } else { &i.rope_table };
    items.push(p.fixed(
        Kernel::HeadNormRope,
        &[],
        &[&hp, p.step, la.qkv, table, kc, vc, &layer.qk_norms],
        Grid::PerToken((dm.n_heads + 2 * n_kv) as u32),
    )?);
    let attn_params = if layer.sliding { &a.attn_local } else { &a.attn_global };
    items.push(p.fixed(
        Kernel::Attention,
        &[],
        &[attn_params, p.step, la.qkv, kc, vc, la.scores, la.att],
        Grid::PerToken(dm.n_heads as u32),
    )?);
    p.matmul(&layer.wo, false, false, la.att, sq, &a.proj, sd, &mut items)?;
    items.push(g3_norm(p, 1, &a.proj, &layer.post_attn_norm, &a.pred, &a.laurel, la.x, sd, n, a.stream)?);

    // FFN on the first `w` neurons.
    if let (Some(ffn), true) = (ffn, w > 0) {
        let (fu, fg, fd) = ffn.prefix(w);
        items.push(p.norm(&layer.ffn_norm, la.x, la.xn, sd, false)?);
        p.matmul(&fu, false, false, la.xn, sd, la.up, la.sw, &mut items)?;
        let fg = fg.ok_or_else(|| GpuError::Unsupported { reason: "Gemma 3n's FFN is gated".into() })?;
        p.matmul(&fg, false, false, la.xn, sd, la.gate, la.sw, &mut items)?;
        if let Some(mult) = layer.sparsity {
            let tp = p.uniform(
                "gaussian top-k params",
                &GaussTopkParams { width: w as u32, stride: la.sw as u32, mult, _pad: 0 },
            )?;
            items.push(p.fixed(Kernel::GaussTopk, &[], &[&tp, p.step, la.gate], Grid::Rows)?);
        }
        let act = super::ops::ActParams { width: w as u32, stride: la.sw as u32, _pad: [0; 2] };
        let act = p.uniform("ffn act params", &act)?;
        items.push(p.fixed(
            Kernel::FfnAct,
            &[("GATED", true), ("GELU", true)],
            &[&act, p.step, la.up, la.gate],
            Grid::PerToken((w as u32).div_ceil(64)),
        )?);
        p.matmul(&fd, true, true, la.up, la.sw, &a.ffn_out, sd, &mut items)?;
        items.push(g3_norm(p, 2, &a.ffn_out, &layer.post_ffn_norm, &a.proj, &a.proj, la.x, sd, n, a.stream)?);
    }

    // Correct (also writes the per-layer gate's input).
    items.push(p.fixed_views(Kernel::Altup, "correct", &scale, &[], &altup_views, Grid::Rows)?);

    // Per-layer input gate into streams 1..n.
    let ple = g.ple;
    p.matmul(&layer.ple_model, false, false, &a.x0, sd, &a.ple_proj, a.sp, &mut items)?;
    p.matmul(&layer.ple_gate, false, false, &a.first, sd, &a.ple_gate, a.sp, &mut items)?;
    let pp = p.uniform(
        "per-layer input params",
        &G3nPleParams {
            dim: ple as u32,
            stride: a.sp as u32,
            row_stride: (dm.n_layers * ple) as u32,
            row_offset: (li * ple) as u32,
            proj_scale: 1.0 / (d as f32).sqrt(),
            table_scale: (ple as f32).sqrt(),
            input_scale: std::f32::consts::FRAC_1_SQRT_2,
            eps,
        },
    )?;
    items.push(p.fixed(
        Kernel::G3nPle,
        &[],
        &[&pp, p.step, &a.ple_proj, &a.ple_rows, &g.ple_norm, &a.ple_gate],
        Grid::Rows,
    )?);
    p.matmul(&layer.ple_proj, false, false, &a.ple_gate, a.sp, &a.proj, sd, &mut items)?;
    items.push(g3_norm(p, 3, &a.proj, &layer.ple_norm, &a.x0, &a.x0, &a.hs, sd, n, a.stream)?);
    Ok(items)
}

/// A `g3n_norm.wgsl` dispatch in `mode` over rows of `x`.
#[allow(clippy::too_many_arguments)]
fn g3_norm(
    p: &Planner<'_>,
    mode: u32,
    x: &wgpu::Buffer,
    w: &wgpu::Buffer,
    y: &wgpu::Buffer,
    z: &wgpu::Buffer,
    out: &wgpu::Buffer,
    sd: usize,
    n: usize,
    stream: usize,
) -> Result<Item, GpuError> {
    let dm = &p.inner.dims;
    let params = G3nNormParams {
        cols: dm.d_model as u32,
        stride: sd as u32,
        n_streams: n as u32,
        stream: stream as u32,
        eps: dm.norm_eps,
        _pad: [0; 3],
    };
    let ub = p.uniform("gemma3n norm params", &params)?;
    let views = [ub, p.step.clone(), x.clone(), w.clone(), y.clone(), z.clone(), out.clone()];
    let views: Vec<BufView<'_>> = views.iter().map(BufView::whole).collect();
    p.fixed_views(Kernel::G3nNorm, "main", &[], &[("MODE", mode)], &views, Grid::Rows)
}

/// The logits of a pass: `last` (the last token into row 0; the pass's tail runs on one row)
/// or every row. Streams `1..n` unembedded, rescaled and averaged with stream 0 into `x`, the
/// final norm into `xn`, the LM head into `logits`, the soft-cap.
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_head(
    p: &Planner<'_>,
    g: &G3Engine,
    a: &G3Acts,
    x: &wgpu::Buffer,
    xn: &wgpu::Buffer,
    sd: usize,
    logits: &wgpu::Buffer,
    sv: usize,
    last: bool,
) -> Result<Vec<Item>, GpuError> {
    let i = p.inner;
    let d = i.dims.d_model;
    let mut items = Vec::new();
    let src = if last {
        let ub = p.uniform("altup gather params", &io_params(g, a, sd, d, 0, 1.0))?;
        let views = [
            BufView::whole(&ub),
            BufView::whole(p.step),
            BufView::whole(&a.hs),
            BufView::whole(&a.proj),
            BufView::whole(&a.pred),
        ];
        let grid = Grid::Fixed((d as u32).div_ceil(64), g.n as u32);
        items.push(p.fixed_views(Kernel::AltupIo, "gather", &[], &[], &views, grid)?);
        &a.pred
    } else {
        &a.hs
    };
    let n = g.n;
    if n == 1 {
        let ub = p.uniform("altup accumulate params", &io_params(g, a, sd, d, 0, 1.0))?;
        let views = [
            BufView::whole(&ub),
            BufView::whole(p.step),
            BufView::whole(src),
            BufView::whole(&a.proj),
            BufView::whole(x),
        ];
        let flags = [("FIRST", true), ("HAS_U", false)];
        items.push(p.fixed_views(Kernel::AltupIo, "accumulate", &flags, &[], &views, Grid::Rows)?);
    }
    for (j, m) in g.altup_unembed.iter().enumerate() {
        let input = a.stream_view(src, j + 1, sd);
        p.matmul_views(m, false, false, input, sd, BufView::whole(&a.proj), sd, &mut items)?;
        let scale = if j + 2 == n { 1.0 / n as f32 } else { 1.0 };
        let ub = p.uniform("altup accumulate params", &io_params(g, a, sd, d, j + 1, scale))?;
        let views = [
            BufView::whole(&ub),
            BufView::whole(p.step),
            BufView::whole(src),
            BufView::whole(&a.proj),
            BufView::whole(x),
        ];
        let flags = [("FIRST", j == 0), ("HAS_U", true)];
        items.push(p.fixed_views(Kernel::AltupIo, "accumulate", &flags, &[], &views, Grid::Rows)?);
    }
    items.push(p.norm(&i.final_norm, x, xn, sd, false)?);
    let head = i.head.as_ref().unwrap_or(&i.embed);
    p.matmul(head, false, false, xn, sd, logits, sv, &mut items)?;
    if let Some(cap) = g.config.final_logit_softcap {
        let vocab = i.dims.vocab as u32;
        let ub = p.uniform("softcap params", &SoftcapParams { n: vocab, stride: sv as u32, cap, _pad: 0 })?;
        items.push(p.fixed(Kernel::Softcap, &[], &[&ub, logits], Grid::PerToken(vocab.div_ceil(64)))?);
    }
    Ok(items)
}
