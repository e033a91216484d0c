//! [`GpuEngine`]: the device, the pipelines and the weights every submodel shares, and the
//! GPU memory accounting of the engine and its sessions. The per-pass dispatch plans are in
//! `plan.rs`, [`GpuSession`] (KV cache, decode, candidates) in `session.rs`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::device::Gpu;
use super::ffn_store::{FfnShape, FfnStore, StoredLayer};
use super::gemma3n::G3Engine;
use super::ops::{gemv_rows, rope_table, Kernels};
use super::session::GpuSession;
use super::weights::{pad8, upload_f32, GpuMatrix};
use super::{AdapterReport, GpuError};
use crate::dims::ModelDims;
use crate::format::{names, NormKind};
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
    /// Output rows per workgroup of the decode GEMV kernel (a power of two, 1 to 64; anything
    /// else is an error), for tuning on a new device. `None`: 64 on CPU adapters, 4 on GPUs.
    pub gemv_rows: Option<u32>,
    /// Rows per thread of the packed decode GEMV (1, 2 or 4; anything else is an error), for
    /// tuning. `None`: 4 on CPU adapters, 1 on GPUs.
    pub gemv_rows_per_thread: Option<u32>,
    /// Use the subgroup decode GEMV where the adapter has subgroups of 8 (default `true`;
    /// `false` compares it against the shared-memory GEMV).
    pub subgroup_gemv: bool,
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
    /// adapter cannot run it). `None`: the fastest, timed once per adapter and process.
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
            gemv_rows_per_thread: None,
            subgroup_gemv: true,
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

/// A norm's weight (and LayerNorm bias) as f32 buffers.
#[derive(Debug)]
pub(super) struct GpuNorm {
    pub(super) w: wgpu::Buffer,
    pub(super) b: Option<wgpu::Buffer>,
}

/// Weights every submodel shares.
#[derive(Debug)]
pub(super) struct LayerShared {
    pub(super) attn_norm: GpuNorm,
    pub(super) ffn_norm: GpuNorm,
    /// `wq`, `wk` and `wv` stacked (one decode dispatch for the three projections): q rows at
    /// 0, k rows at `pad8(q_dim)`, v rows at `pad8(q_dim) + pad8(kv_dim)` (zero rows pad each
    /// part), so the product writes one activation row `[q | k | v]` ([`Acts::qkv`]).
    pub(super) wqkv: GpuMatrix,
    pub(super) wo: GpuMatrix,
}

pub(super) struct Inner {
    pub(super) model: Arc<ModelFile>,
    pub(super) gpu: Gpu,
    pub(super) kernels: Kernels,
    pub(super) dims: ModelDims,
    /// Context window of sessions (KV cache rows).
    pub(super) ctx: usize,
    pub(super) max_binding: u64,
    pub(super) prefill_chunk: usize,
    /// `ROWS` of the decode GEMV kernel.
    pub(super) gemv_rows: u32,
    pub(super) embed: GpuMatrix,
    /// `None` when the LM head is tied to the embeddings.
    pub(super) head: Option<GpuMatrix>,
    pub(super) final_norm: GpuNorm,
    pub(super) layers: Vec<LayerShared>,
    /// cos then sin of `pos * inv_freq[i]`, `[ctx, head_dim / 2]` each.
    pub(super) rope_table: wgpu::Buffer,
    /// FFN weight prefixes shared by the sessions (grown on demand, trimmed under pressure).
    pub(super) ffn: Mutex<FfnStore>,
    /// [`GpuOptions::memory_limit_bytes`].
    pub(super) memory_limit: Option<u64>,
    /// Bytes of the shared weights, norms and RoPE table.
    pub(super) shared_bytes: u64,
    /// Bytes of the live sessions' buffers.
    pub(super) session_bytes: AtomicU64,
    /// Largest FFN width of any level of any layer (sizes the FFN activation buffers).
    pub(super) max_ffn_width: usize,
    /// The options the engine was created with.
    pub(super) options: GpuOptions,
    /// A Gemma 3n file's weights and store beyond the Llama fields (then `layers` is empty).
    pub(super) g3n: Option<G3Engine>,
}

impl Inner {
    /// GPU bytes allocated by the engine now: shared weights, the FFN store, live sessions.
    pub(super) fn memory_in_use(&self) -> u64 {
        let store = self.ffn.lock().map_or(0, |s| s.bytes());
        self.shared_bytes + store + self.g3n_layer_bytes() + self.session_bytes.load(Ordering::Relaxed)
    }

    /// GPU bytes of a Gemma 3n file's per-layer (non-FFN) weights uploaded so far.
    pub(super) fn g3n_layer_bytes(&self) -> u64 {
        self.g3n.as_ref().map_or(0, G3Engine::layer_bytes)
    }

    /// Fails with [`GpuError::OutOfMemory`] when allocating `extra` more bytes would exceed
    /// the memory limit.
    pub(super) fn check_limit(&self, extra: u64, during: &str) -> Result<(), GpuError> {
        if self.memory_limit.is_none() {
            return Ok(());
        }
        let store = self.ffn.lock().map_err(|_| poisoned())?.bytes();
        self.check_limit_with(extra, store, during)
    }

    /// [`Inner::check_limit`] with the FFN store's bytes given (its lock is held).
    pub(super) fn check_limit_with(&self, extra: u64, store: u64, during: &str) -> Result<(), GpuError> {
        let Some(limit) = self.memory_limit else { return Ok(()) };
        let used = self.shared_bytes + store + self.g3n_layer_bytes() + self.session_bytes.load(Ordering::Relaxed);
        if used.saturating_add(extra) > limit {
            return Err(GpuError::OutOfMemory {
                during: during.to_string(),
                reason: format!("needs {extra} more bytes with {used} in use, over the {limit}-byte memory limit"),
            });
        }
        Ok(())
    }

    /// Per-layer tensor shapes for the FFN store.
    pub(super) fn ffn_shapes(&self) -> Vec<FfnShape<'_>> {
        (0..self.dims.n_layers)
            .map(|layer| FfnShape {
                model: &self.model,
                layer,
                cols: self.dims.d_model,
                gated: self.dims.gated,
                max_binding: self.max_binding,
                release_pages: self.options.release_uploaded_pages,
            })
            .collect()
    }

    /// Makes the FFN store hold `widths` (uploading only missing rows, within the memory
    /// limit) and returns the layers with the bytes uploaded.
    pub(super) fn ensure_ffn(&self, widths: &[usize]) -> Result<(Vec<StoredLayer>, u64), GpuError> {
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
        let dims = ModelDims::from_metadata(meta).map_err(|reason| GpuError::Unsupported { reason })?;
        let g3n_config = super::gemma3n::config_of(&model)?;
        let ctx = opts.max_context.map_or(dims.max_context, |c| c.clamp(1, dims.max_context));
        let mut gpu = Gpu::open(opts.adapter.as_deref())?;
        let max_binding = opts.max_binding_bytes.map_or(gpu.max_binding(), |m| m.clamp(256, gpu.max_binding()));
        let mut kernels = Kernels::new(&gpu)?;
        kernels.tune(opts.gemv_rows_per_thread, opts.subgroup_gemv)?;
        super::weight_path::choose_weight_path(&mut gpu, &mut kernels, opts.weight_path)?;
        let gemv_rows = gemv_rows(&gpu, opts.gemv_rows)?;

        let d = dims.d_model;
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
        // A Gemma 3n file's layers are uploaded by its layer store, when a session runs them.
        let llama_layers = if g3n_config.is_some() { 0 } else { dims.n_layers };
        for i in 0..llama_layers {
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
        let g3n = match g3n_config {
            Some(c) => Some(G3Engine::new(&gpu, &model, &dims, c, ctx, max_binding, opts.release_uploaded_pages)?),
            None => None,
        };
        let prefill_chunk = opts.prefill_chunk.max(1);
        let norm_bytes = |n: &GpuNorm| n.w.size() + n.b.as_ref().map_or(0, wgpu::Buffer::size);
        let shared_bytes = layers
            .iter()
            .map(|l| l.wqkv.bytes() + l.wo.bytes() + norm_bytes(&l.attn_norm) + norm_bytes(&l.ffn_norm))
            .sum::<u64>()
            + embed.bytes()
            + head.as_ref().map_or(0, GpuMatrix::bytes)
            + norm_bytes(&final_norm)
            + rope_table.size()
            + g3n.as_ref().map_or(0, |g| g.shared_bytes);
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
                ctx,
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
                g3n,
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

    /// Bytes of weights shared by every session (embeddings, attention, norms, LM head; on a
    /// Gemma 3n file also the per-layer weights of the layers sessions have run so far).
    pub fn shared_weight_bytes(&self) -> u64 {
        let i = &*self.inner;
        let layers: u64 = i.layers.iter().map(|l| l.wqkv.bytes() + l.wo.bytes()).sum();
        layers + i.embed.bytes() + i.head.as_ref().map_or(0, GpuMatrix::bytes) + i.g3n_layer_bytes()
    }

    /// Start-up self-check (for `--backend auto`): runs a short prompt through the smallest
    /// submodel on this GPU and on the CPU engine and compares every logit with
    /// [`forward_tolerance`](super::forward_tolerance) of the weight path (`FORWARD_F32` on the
    /// packed path), or [`QUANTIZED_FORWARD_TOLERANCE`](super::QUANTIZED_FORWARD_TOLERANCE) for a
    /// file with block-quantised tensors ([`gemma3n_f16_tolerance`](super::gemma3n_f16_tolerance)
    /// for a Gemma 3n file on the native-f16 path). Costs one small session
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
        let path = self.inner.kernels.path();
        let tol = if super::quantized_tensor(model).is_some() && path != super::WeightPath::F16 {
            super::QUANTIZED_FORWARD_TOLERANCE
        } else if self.inner.g3n.is_some() && path == super::WeightPath::F16 {
            super::gemma3n_f16_tolerance(&expected)
        } else {
            super::forward_tolerance(path)
        };
        tol.check(&expected, &actual)
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
    /// On a Gemma 3n file the layers `submodel` skips lose their per-layer weights as well.
    pub fn trim_ffn(&self, submodel: &Submodel) -> Result<u64, GpuError> {
        let inner = &*self.inner;
        let model = &inner.model;
        submodel.validate(model.metadata(), model.view().available_levels)?;
        let widths = widths_of(model, submodel);
        let shapes = inner.ffn_shapes();
        let mut store = inner.ffn.lock().map_err(|_| poisoned())?;
        let released = store.trim(&inner.gpu, &shapes, &widths)?.released_bytes;
        drop(store);
        let skip: Vec<bool> = (0..inner.dims.n_layers).map(|l| submodel.is_skipped(l)).collect();
        let layers = match &inner.g3n {
            Some(g) => g.trim_layers(&skip)?,
            None => 0,
        };
        Ok(released + layers)
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

/// FFN width per layer of `submodel` (validated against `model`).
pub(super) fn widths_of(model: &ModelFile, submodel: &Submodel) -> Vec<usize> {
    submodel.widths(model.metadata()).into_iter().map(|w| w as usize).collect()
}
