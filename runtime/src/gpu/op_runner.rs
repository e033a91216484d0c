//! [`OpRunner`]: runs one kernel at a time on host data, for the per-op tests (each kernel
//! against the CPU reference kernels) and for calibration. Not a fast path: every call
//! uploads its inputs and reads its output back.

use half::f16;

use super::device::Gpu;
use super::ops::{
    check_gemv_rows, gemv_rows, rope_table, split_partial_floats, ActParams, ArgmaxParams, AttentionParams,
    CalibrateFmaParams, CalibrateReadParams, EmbeddingParams, Kernel, Kernels, MatmulParams, NormParams, PipeKey,
    RopeParams, StepParams, WeightPath, CALIBRATE_WG,
};
use super::weight_path::{best_time, choose_weight_path, time_gemv};
use super::weights::{pad8, upload_bytes, upload_f32, zeroed, GpuMatrix};
use super::{AdapterReport, GpuError};
use crate::format::DType;

/// Runs single kernels of the GPU backend on host data (tests, calibration).
pub struct OpRunner {
    gpu: Gpu,
    kernels: Kernels,
    /// `ROWS` of the decode GEMV kernel.
    rows: u32,
}

impl std::fmt::Debug for OpRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpRunner").field("adapter", &self.gpu.report.name).finish()
    }
}

/// Weight storage for [`OpRunner::matmul`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// f16 values, multiplied by the runner's [`WeightPath`] kernels (packed or native f16).
    F16,
    /// f32 values.
    F32,
}

fn bad_input(what: &str) -> GpuError {
    GpuError::Unsupported { reason: format!("OpRunner: {what}") }
}

impl OpRunner {
    /// Opens the adapter named like `adapter` (or wgpu's preferred one).
    /// The weight path is chosen as an engine with default options chooses it (measured, or
    /// remembered from earlier in this process); [`OpRunner::set_weight_path`] changes it and
    /// [`OpRunner::for_engine`] takes an engine's.
    pub fn new(adapter: Option<&str>) -> Result<OpRunner, GpuError> {
        let mut gpu = Gpu::open(adapter)?;
        let mut kernels = Kernels::new(&gpu)?;
        choose_weight_path(&mut gpu, &mut kernels, None)?;
        let rows = gemv_rows(&gpu, None)?;
        Ok(OpRunner { gpu, kernels, rows })
    }

    /// Sets the rows per thread of the packed decode GEMV kernel (1, 2 or 4; 4 on CPU adapters,
    /// 1 on GPUs by default).
    pub fn set_gemv_rows_per_thread(&mut self, rpt: u32) -> Result<(), GpuError> {
        self.kernels.set_gemv_rpt(rpt)
    }

    /// Makes the paired packed64 decode GEMV run its subgroup variant (`true`, the default on
    /// devices with 8-invocation subgroups) or not; refused where subgroups are not 8 wide.
    pub fn set_subgroup_gemv(&mut self, on: bool) -> Result<(), GpuError> {
        self.kernels.set_subgroup_gemv(&self.gpu, on)
    }

    /// Invocations per subgroup of the device (`None`: no `SUBGROUP`, or no fixed size).
    pub fn subgroup_size(&self) -> Option<u32> {
        self.gpu.subgroup_size
    }

    /// Makes the packed products of [`OpRunner::matmul`] run the CPU-adapter kernels (`true`,
    /// the default on CPU adapters): `gemm_rows` for several tokens (no shared memory) and
    /// `gemv_t_split` + `gemv_t_reduce` for one token, transposed (rows split in slabs, each
    /// thread streaming 64 contiguous bytes per row); or (`false`, the default on GPUs) the
    /// tiled `gemm` and the K-split `gemv_t`.
    pub fn set_row_kernels(&mut self, rows: bool) {
        self.kernels.set_row_kernels(rows);
    }

    /// The weight path the matrix products use.
    pub fn weight_path(&self) -> WeightPath {
        self.kernels.path()
    }

    /// Weight paths this adapter runs: packed always, f16 with `SHADER_F16`, packed64 with
    /// `SHADER_INT64`.
    pub fn available_weight_paths(&self) -> Vec<WeightPath> {
        WeightPath::ALL.into_iter().filter(|p| self.gpu.runs(*p)).collect()
    }

    /// Opens `engine`'s adapter on the weight path the engine runs (forced or chosen), so
    /// calibrations time the kernels that engine runs.
    pub fn for_engine(engine: &super::GpuEngine) -> Result<OpRunner, GpuError> {
        let adapter = engine.adapter();
        let mut runner = OpRunner::new(Some(&adapter.name))?;
        if let Some(path) = WeightPath::parse(&adapter.weight_path) {
            runner.set_weight_path(path)?;
        }
        Ok(runner)
    }

    /// Makes the matrix products ([`OpRunner::matmul`], [`OpRunner::gemv_read_bandwidth`]) use
    /// `path`; an error when the adapter cannot run it.
    pub fn set_weight_path(&mut self, path: WeightPath) -> Result<(), GpuError> {
        if !self.gpu.runs(path) {
            return Err(GpuError::Unsupported {
                reason: format!(
                    "the {path} weight path needs {:?}, which {} lacks",
                    path.required_feature(),
                    self.gpu.report.name
                ),
            });
        }
        self.kernels.set_path(path);
        Ok(())
    }

    /// The adapter.
    pub fn adapter(&self) -> &AdapterReport {
        &self.gpu.report
    }

    /// Sets the output rows per workgroup of the decode GEMV kernel (a power of two, 1 to 64;
    /// see [`GpuOptions::gemv_rows`](super::GpuOptions::gemv_rows)).
    pub fn set_gemv_rows(&mut self, rows: u32) -> Result<(), GpuError> {
        self.rows = check_gemv_rows(rows)?;
        Ok(())
    }

    fn step(&self, pos0: usize, t: usize) -> Result<wgpu::Buffer, GpuError> {
        let s = StepParams { pos0: pos0 as u32, t: t as u32, _pad: [0; 2] };
        upload_bytes(&self.gpu, "step", bytemuck::bytes_of(&s), wgpu::BufferUsages::UNIFORM)
    }

    fn uniform<T: bytemuck::Pod>(&self, p: &T) -> Result<wgpu::Buffer, GpuError> {
        upload_bytes(&self.gpu, "params", bytemuck::bytes_of(p), wgpu::BufferUsages::UNIFORM)
    }

    fn out(&self, floats: usize) -> Result<wgpu::Buffer, GpuError> {
        use wgpu::BufferUsages as U;
        zeroed(&self.gpu, "out", floats as u64 * 4, U::STORAGE | U::COPY_SRC | U::COPY_DST, self.gpu.max_binding())
    }

    fn input(&self, data: &[f32]) -> Result<wgpu::Buffer, GpuError> {
        use wgpu::BufferUsages as U;
        upload_bytes(&self.gpu, "input", bytemuck::cast_slice(data), U::STORAGE | U::COPY_SRC)
    }

    /// Records the dispatches (pipeline key, buffers, grid), submits, reads `floats` f32 of
    /// `out` back.
    fn run(
        &self,
        dispatches: &[(PipeKey, Vec<&wgpu::Buffer>, (u32, u32))],
        out: &wgpu::Buffer,
        floats: usize,
    ) -> Result<Vec<f32>, GpuError> {
        let mut binds = Vec::new();
        for (key, buffers, grid) in dispatches {
            let pipe = self.kernels.pipeline(&self.gpu, key)?;
            let bind = self.kernels.bind(&self.gpu, key.kernel, buffers)?;
            binds.push((pipe, bind, *grid));
        }
        self.gpu.scoped("running a single op", || {
            let mut enc = self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("op") });
            {
                let mut pass =
                    enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
                for (pipe, bind, (x, y)) in &binds {
                    pass.set_pipeline(pipe);
                    pass.set_bind_group(0, bind, &[]);
                    pass.dispatch_workgroups(*x, *y, 1);
                }
            }
            self.gpu.queue.submit([enc.finish()]);
        })?;
        let bytes = self.gpu.read_back(out, (floats.max(1) * 4).div_ceil(16) as u64 * 16)?;
        Ok(bytes.chunks_exact(4).take(floats).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Matrix product of `t` token rows `x` with a row-major `[rows, cols]` weight `w` (values
    /// stored as `format`; f16 rounds them): `[t, rows]` = x `[t, cols]` W^T, or with
    /// `transposed` `[t, cols]` = x `[t, rows]` W (the `ffn_down_t` product). One token runs
    /// the decode GEMV kernel, more the tiled GEMM. `max_binding` bytes per weight chunk
    /// (`None`: the device limit) exercises the row-chunk path.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        w: &[f32],
        rows: usize,
        cols: usize,
        format: WeightFormat,
        x: &[f32],
        t: usize,
        transposed: bool,
        max_binding: Option<u64>,
    ) -> Result<Vec<f32>, GpuError> {
        let (k, n) = if transposed { (rows, cols) } else { (cols, rows) };
        if w.len() != rows * cols || x.len() != t * k || t == 0 || rows == 0 || cols == 0 {
            return Err(bad_input("matmul: inconsistent sizes"));
        }
        let (bytes, dtype): (Vec<u8>, DType) = match format {
            WeightFormat::F16 => {
                let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
                (bytemuck::cast_slice(&h).to_vec(), DType::F16)
            }
            WeightFormat::F32 => (bytemuck::cast_slice(w).to_vec(), DType::F32),
        };
        let limit = max_binding.map_or(self.gpu.max_binding(), |m| m.clamp(64, self.gpu.max_binding()));
        let m = GpuMatrix::build(&self.gpu, "w", rows, cols, dtype, limit, [(0u64, &bytes[..])])?;
        let xs = pad8(k);
        let mut xp = vec![0.0f32; t * xs];
        for (dst, src) in xp.chunks_exact_mut(xs).zip(x.chunks_exact(k)) {
            dst[..k].copy_from_slice(src);
        }
        let xb = self.input(&xp)?;
        let out = self.out(t * n)?;
        let step = self.step(0, t)?;
        let accumulate = transposed && m.chunks.len() > 1;
        let keys = self.kernels.matmul_keys(m.f32, accumulate, transposed, self.rows, m.row_units);
        let partials = self.out(split_partial_floats(m.row_units))?;
        let mut uniforms = Vec::new();
        let mut grids = Vec::new();
        for c in &m.chunks {
            let (pn, pk, oo, ko) =
                if transposed { (cols, c.rows, 0, c.row_start) } else { (c.rows, cols, c.row_start, 0) };
            let grid = if t == 1 {
                self.kernels.gemv_grid(m.f32, transposed, pn as u32, pk as u32, m.row_units as u32, self.rows)
            } else {
                ((pn as u32).div_ceil(64), (t as u32).div_ceil(16))
            };
            uniforms.push(self.uniform(&MatmulParams {
                n: pn as u32,
                k: pk as u32,
                row_units: m.row_units as u32,
                x_stride: xs as u32,
                out_stride: n as u32,
                out_offset: oo as u32,
                k_offset: ko as u32,
                slabs: if t == 1 && keys.reduce.is_some() { grid.0 } else { 0 },
            })?);
            grids.push(grid);
        }
        let mut dispatches = Vec::new();
        for ((c, ub), &grid) in m.chunks.iter().zip(&uniforms).zip(&grids) {
            let bufs = vec![ub, &step, &xb, &c.buffer, &out, &partials];
            if t == 1 {
                dispatches.push((keys.gemv.clone(), bufs.clone(), grid));
                if let Some(reduce) = &keys.reduce {
                    dispatches.push((reduce.clone(), bufs, ((m.row_units as u32).div_ceil(64), 1)));
                }
            } else {
                dispatches.push((keys.gemm.clone(), bufs, grid));
            }
        }
        self.run(&dispatches, &out, t * n)
    }

    /// RMSNorm (`bias` `None`) or LayerNorm of each of the `rows` rows of `x` (`w.len()`
    /// columns).
    pub fn norm(&self, x: &[f32], w: &[f32], bias: Option<&[f32]>, eps: f32) -> Result<Vec<f32>, GpuError> {
        let cols = w.len();
        if cols == 0 || !x.len().is_multiple_of(cols) || x.is_empty() || bias.is_some_and(|b| b.len() != cols) {
            return Err(bad_input("norm: inconsistent sizes"));
        }
        let rows = x.len() / cols;
        let p = self.uniform(&NormParams {
            cols: cols as u32,
            in_stride: cols as u32,
            out_stride: cols as u32,
            last_only: 0,
            eps,
            _pad: [0; 3],
        })?;
        let (step, xb, wb, out) =
            (self.step(0, rows)?, self.input(x)?, upload_f32(&self.gpu, "w", w)?, self.out(x.len())?);
        let bb = bias.map(|b| upload_f32(&self.gpu, "b", b)).transpose()?;
        let (kernel, buffers) = match &bb {
            None => (Kernel::RmsNorm, vec![&p, &step, &xb, &wb, &out]),
            Some(b) => (Kernel::LayerNorm, vec![&p, &step, &xb, &wb, &out, b]),
        };
        self.run(&[(PipeKey::new(kernel, "main", &[]), buffers, (rows as u32, 1))], &out, x.len())
    }

    /// RoPE of `t` tokens at positions `pos0..` on q `[t, n_heads * head_dim]` and k
    /// `[t, n_kv_heads * head_dim]`, with the fused KV-cache append (k is also passed as the
    /// values): returns the rotated q, then the key-cache rows `pos0..pos0 + t` (rotated k),
    /// then the value-cache rows `pos0..pos0 + t` (k unchanged), concatenated.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        q: &[f32],
        k: &[f32],
        t: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<Vec<f32>, GpuError> {
        if head_dim == 0
            || !head_dim.is_multiple_of(2)
            || q.len() != t * n_heads * head_dim
            || k.len() != t * n_kv_heads * head_dim
        {
            return Err(bad_input("rope: inconsistent sizes"));
        }
        let ctx = pos0 + t;
        let half = head_dim / 2;
        let table = upload_f32(&self.gpu, "rope table", &rope_table(theta, head_dim, ctx))?;
        let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
        let stride = q_dim + 2 * kv_dim;
        let p = self.uniform(&RopeParams {
            n_heads: n_heads as u32,
            n_kv_heads: n_kv_heads as u32,
            head_dim: head_dim as u32,
            half: half as u32,
            q_stride: stride as u32,
            kv_stride: kv_dim as u32,
            sin_offset: (ctx * half) as u32,
            k_offset: q_dim as u32,
            v_offset: (q_dim + kv_dim) as u32,
            _pad: [0; 3],
        })?;
        let step = self.step(pos0, t)?;
        // Rows [q | k | v] as the engine lays them out, with k as the values.
        let rows: Vec<f32> = (0..t)
            .flat_map(|tok| {
                let kr = &k[tok * kv_dim..(tok + 1) * kv_dim];
                q[tok * q_dim..(tok + 1) * q_dim].iter().chain(kr).chain(kr).copied()
            })
            .collect();
        let qkv = self.out(rows.len())?;
        let cache_floats = ctx * kv_dim;
        let (kc, vc) = (self.out(cache_floats)?, self.out(cache_floats)?);
        self.gpu.queue.write_buffer(&qkv, 0, bytemuck::cast_slice(&rows));
        let grid = (((n_heads + n_kv_heads) * half) as u32).div_ceil(64);
        let bufs = vec![&p, &step, &qkv, &table, &kc, &vc];
        let all = self.run(&[(PipeKey::new(Kernel::Rope, "main", &[]), bufs, (grid, t as u32))], &qkv, rows.len())?;
        let mut out: Vec<f32> = all.chunks_exact(stride).flat_map(|r| r[..q_dim].iter().copied()).collect();
        let skip = pos0 * n_kv_heads * head_dim;
        for cache in [&kc, &vc] {
            let bytes = self.gpu.read_back(cache, (cache_floats.max(1) * 4).div_ceil(16) as u64 * 16)?;
            let rows = bytes.chunks_exact(4).skip(skip).take(k.len());
            out.extend(rows.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        }
        Ok(out)
    }

    /// Causal attention of `t` query tokens at positions `pos0..pos0 + t` (q `[t, n_heads *
    /// head_dim]`) over a cache of `pos0 + t` positions (keys, values `[pos, n_kv_heads *
    /// head_dim]`); returns `[t, n_heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        t: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        pos0: usize,
    ) -> Result<Vec<f32>, GpuError> {
        let ctx = pos0 + t;
        let kv = n_kv_heads * head_dim;
        if n_kv_heads == 0
            || !n_heads.is_multiple_of(n_kv_heads)
            || q.len() != t * n_heads * head_dim
            || keys.len() != ctx * kv
            || values.len() != ctx * kv
        {
            return Err(bad_input("attention: inconsistent sizes"));
        }
        let p = self.uniform(&AttentionParams {
            n_heads: n_heads as u32,
            group: (n_heads / n_kv_heads) as u32,
            head_dim: head_dim as u32,
            q_stride: (n_heads * head_dim) as u32,
            kv_stride: kv as u32,
            out_stride: (n_heads * head_dim) as u32,
            ctx: ctx as u32,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: 0,
            ring: 0,
            _pad: [0; 2],
        })?;
        let (step, qb, kb, vb) = (self.step(pos0, t)?, self.input(q)?, self.input(keys)?, self.input(values)?);
        let scores = self.out(t * n_heads * ctx)?;
        let out = self.out(q.len())?;
        let bufs = vec![&p, &step, &qb, &kb, &vb, &scores, &out];
        self.run(&[(PipeKey::new(Kernel::Attention, "main", &[]), bufs, (n_heads as u32, t as u32))], &out, q.len())
    }

    /// FFN activation of `up` (`[t, width]`): `up * act(gate)` when `gate` is given, else
    /// `act(up)`; act is SiLU, or tanh-GELU when `gelu`.
    pub fn ffn_act(&self, up: &[f32], gate: Option<&[f32]>, width: usize, gelu: bool) -> Result<Vec<f32>, GpuError> {
        if width == 0 || !up.len().is_multiple_of(width) || up.is_empty() || gate.is_some_and(|g| g.len() != up.len()) {
            return Err(bad_input("ffn_act: inconsistent sizes"));
        }
        let t = up.len() / width;
        let p = self.uniform(&ActParams { width: width as u32, stride: width as u32, _pad: [0; 2] })?;
        let step = self.step(0, t)?;
        let ub = self.out(up.len())?;
        self.gpu.queue.write_buffer(&ub, 0, bytemuck::cast_slice(up));
        let gb = self.input(gate.unwrap_or(&[0.0; 4]))?;
        let key = PipeKey::new(Kernel::FfnAct, "main", &[("GATED", gate.is_some()), ("GELU", gelu)]);
        self.run(&[(key, vec![&p, &step, &ub, &gb], ((width as u32).div_ceil(64), t as u32))], &ub, up.len())
    }

    /// Index of the largest logit (the CPU engine's `argmax` semantics).
    pub fn argmax(&self, logits: &[f32]) -> Result<u32, GpuError> {
        if logits.is_empty() {
            return Err(bad_input("argmax: no logits"));
        }
        let p = self.uniform(&ArgmaxParams { n: logits.len() as u32, stride: 0, _pad: [0; 2] })?;
        let lb = self.input(logits)?;
        let out = self.out(4)?;
        let r = self.run(&[(PipeKey::new(Kernel::Argmax, "main", &[]), vec![&p, &lb, &out], (1, 1))], &out, 1)?;
        Ok(r.first().map_or(0, |v| v.to_bits()))
    }

    /// Embedding rows `tokens` of a row-major f16 table `[rows, cols]` (values rounded to f16),
    /// with the table split into chunks of at most `max_binding` bytes.
    pub fn embedding(
        &self,
        table: &[f32],
        rows: usize,
        cols: usize,
        tokens: &[u32],
        max_binding: Option<u64>,
    ) -> Result<Vec<f32>, GpuError> {
        if table.len() != rows * cols || tokens.is_empty() || tokens.iter().any(|&t| t as usize >= rows) {
            return Err(bad_input("embedding: inconsistent sizes or token out of range"));
        }
        let h: Vec<f16> = table.iter().map(|&v| f16::from_f32(v)).collect();
        let limit = max_binding.map_or(self.gpu.max_binding(), |m| m.clamp(64, self.gpu.max_binding()));
        let m =
            GpuMatrix::build(&self.gpu, "table", rows, cols, DType::F16, limit, [(0u64, bytemuck::cast_slice(&h))])?;
        let t = tokens.len();
        let step = self.step(0, t)?;
        let tb = upload_bytes(&self.gpu, "tokens", bytemuck::cast_slice(tokens), wgpu::BufferUsages::STORAGE)?;
        let out = self.out(t * cols)?;
        let mut uniforms = Vec::new();
        for c in &m.chunks {
            uniforms.push(self.uniform(&EmbeddingParams {
                row_start: c.row_start as u32,
                rows: c.rows as u32,
                cols: cols as u32,
                row_words: (m.row_units * 4) as u32,
                out_stride: cols as u32,
                scale: 1.0,
                _pad: [0; 2],
            })?);
        }
        let key = PipeKey::new(Kernel::Embedding, "main", &[("F32_WEIGHTS", false)]);
        let dispatches: Vec<_> = m
            .chunks
            .iter()
            .zip(&uniforms)
            .map(|(c, ub)| (key.clone(), vec![ub, &step, &tb, &c.buffer, &out], ((cols as u32).div_ceil(64), t as u32)))
            .collect();
        self.run(&dispatches, &out, t * cols)
    }

    /// Milliseconds of one dispatch of `key` over `buffers` on `grid`: `repeats` dispatches
    /// recorded in one encoder (one submit, one wait; the best of 3 runs after a warm-up),
    /// divided by `repeats`.
    fn time_dispatch(
        &self,
        key: PipeKey,
        buffers: &[&wgpu::Buffer],
        grid: (u32, u32),
        repeats: usize,
    ) -> Result<f64, GpuError> {
        let repeats = repeats.max(1);
        let pipe = self.kernels.pipeline(&self.gpu, &key)?;
        let bind = self.kernels.bind(&self.gpu, key.kernel, buffers)?;
        let best = best_time(&self.gpu, &pipe, &[(bind, grid, None)], repeats, "timing a kernel")?;
        Ok(best / repeats as f64 * 1e3)
    }

    /// Benchmarks: milliseconds of one decode-step attention dispatch (one query token at
    /// position `ctx - 1` over `ctx` cached keys and values, the engine's kernel and grid).
    pub fn time_decode_attention(
        &self,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        ctx: usize,
        repeats: usize,
    ) -> Result<f64, GpuError> {
        if n_kv_heads == 0 || head_dim == 0 || ctx == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(bad_input("time_decode_attention: inconsistent sizes"));
        }
        let (q, kv) = (n_heads * head_dim, n_kv_heads * head_dim);
        let p = self.uniform(&AttentionParams {
            n_heads: n_heads as u32,
            group: (n_heads / n_kv_heads) as u32,
            head_dim: head_dim as u32,
            q_stride: q as u32,
            kv_stride: kv as u32,
            out_stride: q as u32,
            ctx: ctx as u32,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: 0,
            ring: 0,
            _pad: [0; 2],
        })?;
        let (step, qb, kb, vb) = (self.step(ctx - 1, 1)?, self.out(q)?, self.out(ctx * kv)?, self.out(ctx * kv)?);
        let (scores, out) = (self.out(n_heads * ctx)?, self.out(q)?);
        let bufs = [&p, &step, &qb, &kb, &vb, &scores, &out];
        self.time_dispatch(PipeKey::new(Kernel::Attention, "main", &[]), &bufs, (n_heads as u32, 1), repeats)
    }

    /// Benchmarks: milliseconds of the decode step's small per-layer ops (two RMSNorms over
    /// `d_model` and RoPE of one token; `layer_norm` times LayerNorm instead) and per-token ops
    /// (the final norm and the argmax over `vocab` logits), as `(per_layer, per_token)`.
    #[allow(clippy::too_many_arguments)]
    pub fn time_decode_small_ops(
        &self,
        d_model: usize,
        layer_norm: bool,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        vocab: usize,
        repeats: usize,
    ) -> Result<(f64, f64), GpuError> {
        if d_model == 0 || head_dim == 0 || !head_dim.is_multiple_of(2) || vocab == 0 {
            return Err(bad_input("time_decode_small_ops: inconsistent sizes"));
        }
        let step = self.step(0, 1)?;
        let np = self.uniform(&NormParams {
            cols: d_model as u32,
            in_stride: d_model as u32,
            out_stride: d_model as u32,
            last_only: 0,
            eps: 1e-5,
            _pad: [0; 3],
        })?;
        let (xb, wb, nb, out) = (self.out(d_model)?, self.out(d_model)?, self.out(d_model)?, self.out(d_model)?);
        let norm_ms = if layer_norm {
            let bufs = [&np, &step, &xb, &wb, &out, &nb];
            self.time_dispatch(PipeKey::new(Kernel::LayerNorm, "main", &[]), &bufs, (1, 1), repeats)?
        } else {
            let bufs = [&np, &step, &xb, &wb, &out];
            self.time_dispatch(PipeKey::new(Kernel::RmsNorm, "main", &[]), &bufs, (1, 1), repeats)?
        };
        let half = head_dim / 2;
        let table = self.out(2 * half)?;
        let rp = self.uniform(&RopeParams {
            n_heads: n_heads as u32,
            n_kv_heads: n_kv_heads as u32,
            head_dim: head_dim as u32,
            half: half as u32,
            q_stride: ((n_heads + 2 * n_kv_heads) * head_dim) as u32,
            kv_stride: (n_kv_heads * head_dim) as u32,
            sin_offset: half as u32,
            k_offset: (n_heads * head_dim) as u32,
            v_offset: ((n_heads + n_kv_heads) * head_dim) as u32,
            _pad: [0; 3],
        })?;
        let qkv = self.out((n_heads + 2 * n_kv_heads) * head_dim)?;
        // One-row caches: the step uniform's position is 0.
        let (kc, vc) = (self.out(n_kv_heads * head_dim)?, self.out(n_kv_heads * head_dim)?);
        let grid = (((n_heads + n_kv_heads) * half) as u32).div_ceil(64);
        let rope_ms = self.time_dispatch(
            PipeKey::new(Kernel::Rope, "main", &[]),
            &[&rp, &step, &qkv, &table, &kc, &vc],
            (grid, 1),
            repeats,
        )?;
        let ap = self.uniform(&ArgmaxParams { n: vocab as u32, stride: 0, _pad: [0; 2] })?;
        let (lb, ab) = (self.out(vocab)?, self.out(4)?);
        let argmax_ms =
            self.time_dispatch(PipeKey::new(Kernel::Argmax, "main", &[]), &[&ap, &lb, &ab], (1, 1), repeats)?;
        Ok((2.0 * norm_ms + rope_ms, norm_ms + argmax_ms))
    }

    /// Benchmarks: milliseconds of one decode-step FFN activation dispatch at `width` (SiLU, or
    /// tanh-GELU when `gelu`; gated when `gated`).
    pub fn time_decode_ffn_act(&self, width: usize, gated: bool, gelu: bool, repeats: usize) -> Result<f64, GpuError> {
        if width == 0 {
            return Err(bad_input("time_decode_ffn_act: zero width"));
        }
        let p = self.uniform(&ActParams { width: width as u32, stride: width as u32, _pad: [0; 2] })?;
        let (step, ub, gb) = (self.step(0, 1)?, self.out(width)?, self.out(width)?);
        let key = PipeKey::new(Kernel::FfnAct, "main", &[("GATED", gated), ("GELU", gelu)]);
        self.time_dispatch(key, &[&p, &step, &ub, &gb], ((width as u32).div_ceil(64), 1), repeats)
    }

    /// Calibration for benchmarks: the weight-read bandwidth (GB/s) the decode GEMV kernel
    /// reaches on a packed-f16 `[rows, cols]` matrix
    /// ([`decode_product_read_bandwidth`](Self::decode_product_read_bandwidth), not
    /// transposed: distinct weight copies streamed from memory, `repeats` rounds). Decode
    /// tokens/s is bounded by this figure divided by the weight bytes read per token.
    pub fn gemv_read_bandwidth(&self, rows: usize, cols: usize, repeats: usize) -> Result<f64, GpuError> {
        if rows == 0 || cols == 0 || repeats == 0 {
            return Err(bad_input("gemv_read_bandwidth: empty shape"));
        }
        self.decode_product_read_bandwidth(rows, cols, false, repeats)
    }

    /// Calibration for benchmarks: the weight-read bandwidth (GB/s) of the decode product the
    /// engine runs on a packed-f16 `[rows, cols]` matrix: the GEMV (`out = W x`), or with
    /// `transposed` the `ffn_down_t` product (`out = x W`, the split kernels on CPU adapters).
    /// Each timed round runs the product once on each of several distinct copies of the
    /// weight, together at least 128 MiB, so the weights stream from memory as in a decode step
    /// rather than from the last-level cache; `repeats` rounds are recorded in one encoder
    /// (one submit, one wait; the best of 3 runs after a warm-up).
    pub fn decode_product_read_bandwidth(
        &self,
        rows: usize,
        cols: usize,
        transposed: bool,
        repeats: usize,
    ) -> Result<f64, GpuError> {
        if rows == 0 || cols == 0 || repeats == 0 {
            return Err(bad_input("decode_product_read_bandwidth: empty shape"));
        }
        let per_product = time_gemv(&self.gpu, &self.kernels, self.rows, rows, cols, transposed, 0, repeats)?;
        Ok((rows * cols * 2) as f64 / per_product / 1e9)
    }

    /// Workgroup size of the calibration kernels ([`read_sums`](Self::read_sums),
    /// [`read_bandwidth`](Self::read_bandwidth), [`fma_throughput`](Self::fma_throughput)).
    pub const CALIBRATE_WORKGROUP: u32 = CALIBRATE_WG;

    /// Runs a streaming-read calibration kernel once over `data` on `workgroups` workgroups (1
    /// to 65535) and returns its per-workgroup sums (wrapping): `calibrate_read.wgsl`
    /// (`vec4<u32>` loads, units of 4 words) or, with `wide`, `calibrate_read_u64.wgsl`
    /// (`vec4<u64>` loads, units of 8 words; needs `SHADER_INT64`). `data` is zero-padded to
    /// whole units. With `T = workgroups * CALIBRATE_WORKGROUP` invocations and `n` units,
    /// unit `u` (holding word `data[i]`, `u = i / 4` or `i / 8`) is read by invocation `u % T`
    /// when not `blocked`, and by invocation `u / ceil(n / T)` when `blocked`; invocation `g`
    /// belongs to workgroup `g / CALIBRATE_WORKGROUP`. For checking the kernels that
    /// [`read_bandwidth`](Self::read_bandwidth) times.
    pub fn read_sums(&self, data: &[u32], workgroups: u32, blocked: bool, wide: bool) -> Result<Vec<u32>, GpuError> {
        if data.is_empty() || !(1..=65535).contains(&workgroups) {
            return Err(bad_input("read_sums: empty data or workgroups outside 1..=65535"));
        }
        if wide && !self.gpu.runs(WeightPath::Packed64) {
            return Err(bad_input("read_sums: 64-bit loads need SHADER_INT64"));
        }
        let words = if wide { 8 } else { 4 };
        let mut padded = data.to_vec();
        padded.resize(data.len().div_ceil(words) * words, 0);
        let n = u32::try_from(padded.len() / words).map_err(|_| bad_input("read_sums: data too large"))?;
        let db = upload_bytes(&self.gpu, "data", bytemuck::cast_slice(&padded), wgpu::BufferUsages::STORAGE)?;
        let p = self.uniform(&CalibrateReadParams { n, threads: workgroups * CALIBRATE_WG, _pad: [0; 2] })?;
        let out = self.out(workgroups as usize)?;
        let kernel = if wide { Kernel::CalibrateReadU64 } else { Kernel::CalibrateRead };
        let key = PipeKey::new(kernel, "main", &[("BLOCKED", blocked)]);
        let r = self.run(&[(key, vec![&p, &db, &out], (workgroups, 1))], &out, workgroups as usize)?;
        Ok(r.iter().map(|v| v.to_bits()).collect())
    }

    /// Calibration for benchmarks: the streaming read bandwidth (GB/s, 10^9 bytes/s) of the
    /// device, from a kernel that sums a storage buffer of `bytes` bytes (capped at the
    /// adapter's maximum storage binding size, rounded down to 32 bytes), one `u32` written per
    /// workgroup: with `vec4<u32>` loads, and also with `vec4<u64>` loads when the device has
    /// `SHADER_INT64` (the packed64 GEMV's loads; on lavapipe a load costs per component, so
    /// wider loads stream faster); the faster of the two. On GPUs every invocation reads a
    /// strided slice (coalesced) on up to 65535 workgroups; on CPU adapters (lavapipe) each
    /// invocation streams one contiguous block on 64 workgroups (the strided mapping measured
    /// half the bandwidth there: each core's loop touched 128 bytes per 64 KiB, defeating the
    /// prefetcher, and thousands of tiny workgroups paid the barrier cost). `repeats`
    /// dispatches are recorded in one encoder (one submit, one wait; the best of 3 runs after
    /// a warm-up). This is the ceiling [`gemv_read_bandwidth`](Self::gemv_read_bandwidth) is
    /// measured against.
    pub fn read_bandwidth(&self, bytes: u64, repeats: usize) -> Result<f64, GpuError> {
        let size = bytes.min(self.gpu.max_binding()).min(u64::from(u32::MAX) * 16) / 32 * 32;
        if size == 0 || repeats == 0 {
            return Err(bad_input("read_bandwidth: fewer than 32 bytes or no repeats"));
        }
        let cpu = self.gpu.report.device_type == "Cpu";
        use wgpu::BufferUsages as U;
        let data = zeroed(&self.gpu, "calibration data", size, U::STORAGE, self.gpu.max_binding())?;
        let mut kernels = vec![(Kernel::CalibrateRead, 16u64)];
        if self.gpu.runs(WeightPath::Packed64) {
            kernels.push((Kernel::CalibrateReadU64, 32));
        }
        let mut best_gbs = 0.0f64;
        for (kernel, unit) in kernels {
            let n = (size / unit) as u32;
            // GPUs: at least 16 loads per invocation, at most 65535 workgroups (one dimension).
            let groups =
                if cpu { 64.min(n.div_ceil(CALIBRATE_WG)) } else { n.div_ceil(CALIBRATE_WG * 16).clamp(1, 65535) };
            let p = self.uniform(&CalibrateReadParams { n, threads: groups * CALIBRATE_WG, _pad: [0; 2] })?;
            let out = self.out(groups as usize)?;
            let key = PipeKey::new(kernel, "main", &[("BLOCKED", cpu)]);
            let pipe = self.kernels.pipeline(&self.gpu, &key)?;
            let bind = self.kernels.bind(&self.gpu, kernel, &[&p, &data, &out])?;
            let best =
                best_time(&self.gpu, &pipe, &[(bind, (groups, 1), None)], repeats, "running the read calibration")?;
            best_gbs = best_gbs.max((size * repeats as u64) as f64 / best / 1e9);
        }
        Ok(best_gbs)
    }

    /// Calibration for benchmarks: the f32 arithmetic throughput (GFLOP/s, one fma = 2 flops)
    /// of the device, from a kernel where each invocation runs `iterations` rounds of `fma` on
    /// 8 independent `vec4<f32>` accumulators (64 flops per round). The grid is 1024
    /// workgroups of 64 invocations (64 workgroups on CPU adapters, where more only adds
    /// time). `repeats` dispatches are recorded in one encoder (one submit, one wait; the best
    /// of 3 runs after a warm-up); prefill (GEMM) efficiency is measured against this figure.
    pub fn fma_throughput(&self, iterations: u32, repeats: usize) -> Result<f64, GpuError> {
        if iterations == 0 || repeats == 0 {
            return Err(bad_input("fma_throughput: no iterations or no repeats"));
        }
        let groups: u32 = if self.gpu.report.device_type == "Cpu" { 64 } else { 1024 };
        let p = self.uniform(&CalibrateFmaParams { iterations, _pad: [0; 3] })?;
        let out = self.out((groups * CALIBRATE_WG) as usize)?;
        let key = PipeKey::new(Kernel::CalibrateFma, "main", &[]);
        let pipe = self.kernels.pipeline(&self.gpu, &key)?;
        let bind = self.kernels.bind(&self.gpu, Kernel::CalibrateFma, &[&p, &out])?;
        let best = best_time(&self.gpu, &pipe, &[(bind, (groups, 1), None)], repeats, "running the fma calibration")?;
        let flops = f64::from(groups * CALIBRATE_WG) * f64::from(iterations) * 64.0 * repeats as f64;
        Ok(flops / best / 1e9)
    }
}
