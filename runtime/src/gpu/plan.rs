//! Dispatch plans: what a pass over `t` tokens records, built once per session (pipelines,
//! uniform buffers, bind groups). The embedding gather and every layer's attention block are
//! shared by all submodels; each layer's FFN block is planned per width and cached, so a switch
//! back to a width seen before rebuilds nothing.

use std::collections::HashMap;
use std::sync::Arc;

use super::device::Gpu;
use super::engine::{GpuNorm, Inner};
use super::ffn_store::LayerFfn;
use super::gemma3n::{G3Acts, G3Engine, G3Layer, LlamaActs};
use super::ops::{quant_gemv_grid, ActParams, BufView, EmbeddingParams, Kernel, MatmulParams, NormParams, PipeKey};
use super::session::Acts;
use super::weights::{upload_bytes, GpuMatrix};
use super::GpuError;
use crate::format::{Activation, DType};

/// Workgroup counts of a single-pipeline dispatch as a function of the pass's token count `t`.
#[derive(Clone, Copy, Debug)]
pub(super) enum Grid {
    /// `(x, t)`.
    PerToken(u32),
    /// `(x, y)` whatever `t`.
    Fixed(u32, u32),
    /// `(t, 1)`: one workgroup per token row.
    Rows,
}

/// A recorded dispatch.
#[derive(Debug)]
pub(super) enum Dispatch {
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
    pub(super) fn follow_up(&self, t: u32) -> Option<(&wgpu::ComputePipeline, (u32, u32))> {
        match self {
            Dispatch::Matmul { reduce: Some((pipe, grid)), .. } if t == 1 => Some((pipe, *grid)),
            _ => None,
        }
    }

    /// Pipeline, bind group and workgroup counts for a pass over `t` tokens.
    pub(super) fn resolve(&self, t: u32) -> (&wgpu::ComputePipeline, &wgpu::BindGroup, (u32, u32)) {
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
pub(super) enum Item {
    Dispatch(Dispatch),
}

/// GPU bytes of the rows a matrix view covers.
fn view_bytes(m: &GpuMatrix) -> u64 {
    let row = m.row_bytes();
    m.chunks.iter().map(|c| c.rows as u64 * row).sum()
}

/// The FFN items of one layer at one width, with the bytes of the FFN rows they read.
pub(super) type FfnPlan = Arc<(Vec<Item>, u64)>;

/// The per-token work of a pass, in order: `embed`, then for each layer `attn[l]` and
/// `ffn[l]`. Only `ffn` depends on the submodel.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) embed: Vec<Item>,
    pub(super) attn: Vec<Vec<Item>>,
    pub(super) ffn: Vec<FfnPlan>,
    /// FFN plans built so far, by `(layer, width, runs)`: a switch back to a width seen before
    /// rebuilds nothing. Holds the chunks it reads; cleared by [`GpuSession::rebind`].
    pub(super) cache: HashMap<(usize, usize, bool), FfnPlan>,
}

impl Plan {
    pub(super) fn items(&self) -> impl Iterator<Item = &Item> {
        let layers = self.attn.iter().zip(&self.ffn).flat_map(|(a, f)| a.iter().chain(f.0.iter()));
        self.embed.iter().chain(layers)
    }

    pub(super) fn ffn_bytes(&self) -> u64 {
        self.ffn.iter().map(|f| f.1).sum()
    }

    /// The items of a pass with `ffn` as the FFN blocks instead of the plan's own (the
    /// speculative draft's steps, recorded with the verifier's plan).
    pub(super) fn items_with<'a>(&'a self, ffn: &'a [FfnPlan]) -> impl Iterator<Item = &'a Item> {
        let layers = self.attn.iter().zip(ffn).flat_map(|(a, f)| a.iter().chain(f.0.iter()));
        self.embed.iter().chain(layers)
    }

    /// Points `ffn` at the plans for `widths` over `layers`, building the missing ones.
    pub(super) fn set_ffn(
        &mut self,
        p: &Planner<'_>,
        a: &Acts,
        g3: Option<G3Ctx<'_>>,
        layers: &[Option<Arc<LayerFfn>>],
        widths: &[usize],
    ) -> Result<(), GpuError> {
        self.ffn = self.plans_for(p, a, g3, layers, widths)?;
        Ok(())
    }

    /// The FFN plans for `widths` over `layers` (from the cache, building the missing ones),
    /// without changing `ffn`. On a Gemma 3n file (`g3`) each is the layer's whole block, and
    /// empty for a skipped layer.
    pub(super) fn plans_for(
        &mut self,
        p: &Planner<'_>,
        a: &Acts,
        g3: Option<G3Ctx<'_>>,
        layers: &[Option<Arc<LayerFfn>>],
        widths: &[usize],
    ) -> Result<Vec<FfnPlan>, GpuError> {
        let mut next = Vec::with_capacity(widths.len());
        for (li, (layer, &w)) in layers.iter().zip(widths).enumerate() {
            let g3_layer = g3.as_ref().and_then(|c| c.layers.get(li).cloned().flatten());
            let key = (li, w, g3.is_none() || g3_layer.is_some());
            let plan = match self.cache.get(&key) {
                Some(plan) => Arc::clone(plan),
                None => {
                    let plan = match &g3 {
                        Some(c) => {
                            let items = super::gemma3n::plan_layer(
                                p,
                                c.engine,
                                c.acts,
                                &llama_acts(a),
                                li,
                                g3_layer.as_deref(),
                                layer.as_deref(),
                                w,
                            )?;
                            let bytes = match (layer, g3_layer.is_some() && w > 0) {
                                (Some(l), true) => {
                                    let (fu, fg, fd) = l.prefix(w);
                                    view_bytes(&fu) + fg.as_ref().map_or(0, view_bytes) + view_bytes(&fd)
                                }
                                _ => 0,
                            };
                            Arc::new((items, bytes))
                        }
                        None => {
                            let layer = layer.as_ref().ok_or_else(|| GpuError::Unsupported {
                                reason: format!("internal: layer {li}'s FFN rows were not uploaded"),
                            })?;
                            Arc::new(plan_ffn(p, a, li, layer, w)?)
                        }
                    };
                    self.cache.insert(key, Arc::clone(&plan));
                    plan
                }
            };
            next.push(plan);
        }
        Ok(next)
    }
}

/// What a Gemma 3n layer plan reads beyond the Llama buffers.
#[derive(Clone, Copy)]
pub(super) struct G3Ctx<'a> {
    pub(super) engine: &'a G3Engine,
    pub(super) acts: &'a G3Acts,
    pub(super) layers: &'a [Option<Arc<G3Layer>>],
}

fn llama_acts(a: &Acts) -> LlamaActs<'_> {
    LlamaActs {
        x: &a.x,
        xn: &a.xn,
        qkv: &a.qkv,
        att: &a.att,
        up: &a.up,
        gate: &a.gate,
        scores: &a.scores,
        caches: &a.caches,
        sd: a.sd,
        sq: a.sq,
        sqkv: a.sqkv,
        sw: a.sw,
    }
}

/// The embedding gather into rows of `out` (stride `sd`), every value times `scale`: one
/// dispatch per chunk of the table.
pub(super) fn embed_items(
    p: &Planner<'_>,
    tokens: &wgpu::Buffer,
    out: &wgpu::Buffer,
    sd: usize,
    scale: f32,
) -> Result<Vec<Item>, GpuError> {
    let i = p.inner;
    let mut embed = Vec::new();
    for c in &i.embed.chunks {
        let params = EmbeddingParams {
            row_start: c.row_start as u32,
            rows: c.rows as u32,
            cols: i.dims.d_model as u32,
            row_words: i.embed.row_words() as u32,
            out_stride: sd as u32,
            scale,
            _pad: [0; 2],
        };
        let ub = p.uniform("embedding params", &params)?;
        embed.push(p.fixed(
            Kernel::Embedding,
            &[
                ("F32_WEIGHTS", i.embed.f32),
                ("Q8_0", i.embed.quant == Some(DType::Q8_0)),
                ("Q4_0", i.embed.quant == Some(DType::Q4_0)),
                ("Q4_1", i.embed.quant == Some(DType::Q4_1)),
            ],
            &[&ub, p.step, tokens, &c.buffer, out],
            Grid::PerToken((i.dims.d_model as u32).div_ceil(64)),
        )?);
    }
    Ok(embed)
}

/// The submodel-independent items: the embedding gather and every layer's attention block.
pub(super) fn plan_shared(
    p: &Planner<'_>,
    tokens: &wgpu::Buffer,
    a: &Acts,
) -> Result<(Vec<Item>, Vec<Vec<Item>>), GpuError> {
    let i = p.inner;
    let dm = &i.dims;
    let (sd, sq) = (a.sd, a.sq);
    let embed = embed_items(p, tokens, &a.x, sd, 1.0)?;
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

pub(super) struct Planner<'a> {
    pub(super) inner: &'a Inner,
    pub(super) step: &'a wgpu::Buffer,
    /// The session's split-GEMV partials ([`Acts::partials`]).
    pub(super) partials: &'a wgpu::Buffer,
}

impl Planner<'_> {
    pub(super) fn gpu(&self) -> &Gpu {
        &self.inner.gpu
    }

    pub(super) fn uniform<T: bytemuck::Pod>(&self, label: &str, params: &T) -> Result<wgpu::Buffer, GpuError> {
        upload_bytes(self.gpu(), label, bytemuck::bytes_of(params), wgpu::BufferUsages::UNIFORM)
    }

    pub(super) fn fixed(
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

    /// [`Planner::fixed`] over views of buffers.
    pub(super) fn fixed_views(
        &self,
        kernel: Kernel,
        entry: &'static str,
        constants: &[(&'static str, bool)],
        numbers: &[(&'static str, u32)],
        views: &[BufView<'_>],
        grid: Grid,
    ) -> Result<Item, GpuError> {
        let mut key = PipeKey::new(kernel, entry, constants);
        for &(name, v) in numbers {
            key = key.with(name, v);
        }
        let pipe = self.inner.kernels.pipeline(self.gpu(), &key)?;
        let bind = self.inner.kernels.bind_views(self.gpu(), kernel, views)?;
        Ok(Item::Dispatch(Dispatch::Fixed { pipe, bind, grid }))
    }

    /// `out (+)= x W^T` (or `x W` when `transposed`, for `ffn_down_t`), one dispatch per chunk.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul(
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
        let (x, out) = (BufView::whole(x), BufView::whole(out));
        self.matmul_views(m, transposed, accumulate, x, x_stride, out, out_stride, items)
    }

    /// [`Planner::matmul`] reading and writing views of buffers (a Gemma 3n AltUp stream).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_views(
        &self,
        m: &GpuMatrix,
        transposed: bool,
        accumulate: bool,
        x: BufView<'_>,
        x_stride: usize,
        out: BufView<'_>,
        out_stride: usize,
        items: &mut Vec<Item>,
    ) -> Result<(), GpuError> {
        if transposed && !accumulate && m.chunks.len() > 1 {
            return Err(GpuError::Unsupported { reason: "a chunked transposed product must accumulate".into() });
        }
        let k = &self.inner.kernels;
        let keys = match m.quant {
            Some(q) => k.quant_keys(q, accumulate, transposed),
            None => k.matmul_keys(m.f32, accumulate, transposed, self.inner.gemv_rows, m.row_units),
        };
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
            let gemv_grid = match m.quant {
                Some(q) => quant_gemv_grid(q, transposed, n as u32),
                None => k.gemv_grid(m.f32, transposed, n as u32, kk as u32, m.row_units as u32, self.inner.gemv_rows),
            };
            let params = MatmulParams { slabs: if reduce.is_some() { gemv_grid.0 } else { 0 }, ..params };
            let ub = self.uniform("matmul params", &params)?;
            let views = [
                BufView::whole(&ub),
                BufView::whole(self.step),
                x,
                BufView::whole(&c.buffer),
                out,
                BufView::whole(self.partials),
            ];
            let bind = k.bind_views(self.gpu(), keys.gemv.kernel, &views)?;
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
    pub(super) fn norm(
        &self,
        norm: &GpuNorm,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
        stride: usize,
        last_only: bool,
    ) -> Result<Item, GpuError> {
        let dm = &self.inner.dims;
        let params = NormParams {
            cols: dm.d_model as u32,
            in_stride: stride as u32,
            out_stride: stride as u32,
            last_only: u32::from(last_only),
            eps: dm.norm_eps,
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

/// Records `items` (each with its token count) into `enc` as one compute pass; returns the
/// number of dispatches.
pub(super) fn record<'a>(enc: &mut wgpu::CommandEncoder, items: impl Iterator<Item = (&'a Item, usize)>) -> u64 {
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
