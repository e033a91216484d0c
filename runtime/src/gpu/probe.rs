//! [`OpRunner`]: runs one kernel at a time on host data, for the per-op tests (each kernel
//! against the CPU reference kernels) and for calibration. Not a fast path: every call
//! uploads its inputs and reads its output back.

use half::f16;

use super::device::Gpu;
use super::engine::rope_table;
use super::ops::{
    check_gemv_rows, gemv_rows, split_2d, ActParams, ArgmaxParams, AttentionParams, CalibrateFmaParams,
    CalibrateReadParams, EmbeddingParams, Kernel, Kernels, MatmulParams, NormParams, PipeKey, RopeParams, StepParams,
    CALIBRATE_WG,
};
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
    /// f16 values, two per `u32` (the packed path).
    PackedF16,
    /// f32 values.
    F32,
}

fn bad_input(what: &str) -> GpuError {
    GpuError::Unsupported { reason: format!("OpRunner: {what}") }
}

impl OpRunner {
    /// Opens the adapter named like `adapter` (or wgpu's preferred one).
    pub fn new(adapter: Option<&str>) -> Result<OpRunner, GpuError> {
        let gpu = Gpu::open(adapter)?;
        let kernels = Kernels::new(&gpu)?;
        let rows = gemv_rows(&gpu, None)?;
        Ok(OpRunner { gpu, kernels, rows })
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
            WeightFormat::PackedF16 => {
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
        let consts = [("F32_WEIGHTS", m.f32), ("ACCUMULATE", accumulate)];
        let mut uniforms = Vec::new();
        for c in &m.chunks {
            let (pn, pk, oo, ko) =
                if transposed { (cols, c.rows, 0, c.row_start) } else { (c.rows, cols, c.row_start, 0) };
            uniforms.push(self.uniform(&MatmulParams {
                n: pn as u32,
                k: pk as u32,
                row_units: m.row_units as u32,
                x_stride: xs as u32,
                out_stride: n as u32,
                out_offset: oo as u32,
                k_offset: ko as u32,
                _pad: 0,
            })?);
        }
        let mut dispatches = Vec::new();
        for (c, ub) in m.chunks.iter().zip(&uniforms) {
            let pn = if transposed { cols } else { c.rows } as u32;
            let (key, grid) = if t == 1 {
                let entry = if transposed { "gemv_t" } else { "gemv" };
                let grid =
                    if transposed { ((m.row_units as u32).div_ceil(16), 1) } else { split_2d(pn.div_ceil(self.rows)) };
                (PipeKey::new(Kernel::MatmulGemv, entry, &consts).with("ROWS", self.rows), grid)
            } else {
                let key = PipeKey::new(Kernel::MatmulGemm, "gemm", &[consts[0], consts[1], ("TRANSPOSED", transposed)]);
                (key, (pn.div_ceil(64), (t as u32).div_ceil(16)))
            };
            dispatches.push((key, vec![ub, &step, &xb, &c.buffer, &out], grid));
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
    /// `[t, n_kv_heads * head_dim]`; returns the rotated q then k, concatenated.
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
        let p = self.uniform(&RopeParams {
            n_heads: n_heads as u32,
            n_kv_heads: n_kv_heads as u32,
            head_dim: head_dim as u32,
            half: half as u32,
            q_stride: (n_heads * head_dim) as u32,
            kv_stride: (n_kv_heads * head_dim) as u32,
            sin_offset: (ctx * half) as u32,
            _pad: 0,
        })?;
        // q and k live in one buffer pair; read both back through one output buffer.
        let step = self.step(pos0, t)?;
        let qb = self.out(q.len())?;
        let kb = self.out(k.len())?;
        self.gpu.queue.write_buffer(&qb, 0, bytemuck::cast_slice(q));
        self.gpu.queue.write_buffer(&kb, 0, bytemuck::cast_slice(k));
        let grid = (((n_heads + n_kv_heads) * half) as u32).div_ceil(64);
        let mut out = self.run(
            &[(PipeKey::new(Kernel::Rope, "main", &[]), vec![&p, &step, &qb, &kb, &table], (grid, t as u32))],
            &qb,
            q.len(),
        )?;
        let kr = self.gpu.read_back(&kb, (k.len().max(1) * 4).div_ceil(16) as u64 * 16)?;
        out.extend(kr.chunks_exact(4).take(k.len()).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
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
        let p = self.uniform(&ArgmaxParams { n: logits.len() as u32, _pad: [0; 3] })?;
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
                _pad: [0; 3],
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

    /// Calibration for benchmarks: the weight-read bandwidth (GB/s) the decode GEMV kernel
    /// reaches on a packed-f16 `[rows, cols]` matrix, from `repeats` dispatches recorded in one
    /// encoder (one submit, one wait; the best of 3 runs after a warm-up). Decode tokens/s is
    /// bounded by this figure divided by the weight bytes read per token.
    pub fn gemv_read_bandwidth(&self, rows: usize, cols: usize, repeats: usize) -> Result<f64, GpuError> {
        if rows == 0 || cols == 0 || repeats == 0 {
            return Err(bad_input("gemv_read_bandwidth: empty shape"));
        }
        let bytes = vec![0u8; rows * cols * 2];
        let m = GpuMatrix::build(&self.gpu, "w", rows, cols, DType::F16, self.gpu.max_binding(), [(0u64, &bytes[..])])?;
        let xb = self.input(&vec![0.0f32; pad8(cols)])?;
        let out = self.out(rows)?;
        let step = self.step(0, 1)?;
        let key = PipeKey::new(Kernel::MatmulGemv, "gemv", &[("F32_WEIGHTS", false), ("ACCUMULATE", false)])
            .with("ROWS", self.rows);
        let pipe = self.kernels.pipeline(&self.gpu, &key)?;
        let mut binds = Vec::new();
        let mut uniforms = Vec::new();
        for c in &m.chunks {
            uniforms.push(self.uniform(&MatmulParams {
                n: c.rows as u32,
                k: cols as u32,
                row_units: m.row_units as u32,
                x_stride: pad8(cols) as u32,
                out_stride: rows as u32,
                out_offset: c.row_start as u32,
                k_offset: 0,
                _pad: 0,
            })?);
        }
        for (c, ub) in m.chunks.iter().zip(&uniforms) {
            let bind = self.kernels.bind(&self.gpu, Kernel::MatmulGemv, &[ub, &step, &xb, &c.buffer, &out])?;
            binds.push((bind, split_2d((c.rows as u32).div_ceil(self.rows))));
        }
        let best = self.best_time(&pipe, &binds, repeats, "running the bandwidth calibration")?;
        Ok((rows * cols * 2 * repeats) as f64 / best / 1e9)
    }

    /// Workgroup size of the calibration kernels ([`read_sums`](Self::read_sums),
    /// [`read_bandwidth`](Self::read_bandwidth), [`fma_throughput`](Self::fma_throughput)).
    pub const CALIBRATE_WORKGROUP: u32 = CALIBRATE_WG;

    /// Runs the streaming-read calibration kernel (`calibrate_read.wgsl`) once over `data`
    /// (zero-padded to a multiple of 4 words) on `workgroups` workgroups (1 to 65535) and
    /// returns its per-workgroup sums: with `T = workgroups * CALIBRATE_WORKGROUP`, every word
    /// `data[i]` is added (wrapping) to the sum of workgroup `(i / 4) % T / CALIBRATE_WORKGROUP`.
    /// For checking the kernel that [`read_bandwidth`](Self::read_bandwidth) times.
    pub fn read_sums(&self, data: &[u32], workgroups: u32) -> Result<Vec<u32>, GpuError> {
        if data.is_empty() || !(1..=65535).contains(&workgroups) {
            return Err(bad_input("read_sums: empty data or workgroups outside 1..=65535"));
        }
        let mut padded = data.to_vec();
        padded.resize(data.len().div_ceil(4) * 4, 0);
        let n = u32::try_from(padded.len() / 4).map_err(|_| bad_input("read_sums: data too large"))?;
        let db = upload_bytes(&self.gpu, "data", bytemuck::cast_slice(&padded), wgpu::BufferUsages::STORAGE)?;
        let p = self.uniform(&CalibrateReadParams { n, threads: workgroups * CALIBRATE_WG, _pad: [0; 2] })?;
        let out = self.out(workgroups as usize)?;
        let key = PipeKey::new(Kernel::CalibrateRead, "main", &[]);
        let r = self.run(&[(key, vec![&p, &db, &out], (workgroups, 1))], &out, workgroups as usize)?;
        Ok(r.iter().map(|v| v.to_bits()).collect())
    }

    /// Calibration for benchmarks: the streaming read bandwidth (GB/s, 10^9 bytes/s) of the
    /// device, from a kernel that sums a storage buffer of `bytes` bytes (capped at the
    /// adapter's maximum storage binding size, rounded down to 16 bytes) with `vec4<u32>`
    /// loads, each invocation a strided slice, one `u32` written per workgroup. `repeats`
    /// dispatches are recorded in one encoder (one submit, one wait; the best of 3 runs after
    /// a warm-up). This is the ceiling [`gemv_read_bandwidth`](Self::gemv_read_bandwidth) is
    /// measured against.
    pub fn read_bandwidth(&self, bytes: u64, repeats: usize) -> Result<f64, GpuError> {
        let size = bytes.min(self.gpu.max_binding()).min(u64::from(u32::MAX) * 16) / 16 * 16;
        if size == 0 || repeats == 0 {
            return Err(bad_input("read_bandwidth: fewer than 16 bytes or no repeats"));
        }
        let n = (size / 16) as u32;
        // At least 16 vec4 loads per invocation; at most 65535 workgroups (one dimension).
        let groups = n.div_ceil(CALIBRATE_WG * 16).clamp(1, 65535);
        use wgpu::BufferUsages as U;
        let data = zeroed(&self.gpu, "calibration data", size, U::STORAGE, self.gpu.max_binding())?;
        let p = self.uniform(&CalibrateReadParams { n, threads: groups * CALIBRATE_WG, _pad: [0; 2] })?;
        let out = self.out(groups as usize)?;
        let key = PipeKey::new(Kernel::CalibrateRead, "main", &[]);
        let pipe = self.kernels.pipeline(&self.gpu, &key)?;
        let bind = self.kernels.bind(&self.gpu, Kernel::CalibrateRead, &[&p, &data, &out])?;
        let best = self.best_time(&pipe, &[(bind, (groups, 1))], repeats, "running the read calibration")?;
        Ok((size * repeats as u64) as f64 / best / 1e9)
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
        let best = self.best_time(&pipe, &[(bind, (groups, 1))], repeats, "running the fma calibration")?;
        let flops = f64::from(groups * CALIBRATE_WG) * f64::from(iterations) * 64.0 * repeats as f64;
        Ok(flops / best / 1e9)
    }

    /// Seconds for `repeats` rounds of the dispatches `binds` of `pipe`, recorded in one
    /// encoder, submitted once and waited for: the best of 3 runs after a one-round warm-up.
    fn best_time(
        &self,
        pipe: &wgpu::ComputePipeline,
        binds: &[(wgpu::BindGroup, (u32, u32))],
        repeats: usize,
        during: &str,
    ) -> Result<f64, GpuError> {
        let run = |n: usize| -> Result<f64, GpuError> {
            let t = std::time::Instant::now();
            self.gpu.scoped(during, || {
                let mut enc = self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
                {
                    let mut pass =
                        enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
                    pass.set_pipeline(pipe);
                    for _ in 0..n {
                        for (bind, (x, y)) in binds {
                            pass.set_bind_group(0, bind, &[]);
                            pass.dispatch_workgroups(*x, *y, 1);
                        }
                    }
                }
                self.gpu.queue.submit([enc.finish()]);
            })?;
            self.gpu.wait()?;
            Ok(t.elapsed().as_secs_f64())
        };
        run(1)?;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            best = best.min(run(repeats)?);
        }
        Ok(best)
    }
}
