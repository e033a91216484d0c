//! The kernels: one WGSL file per op in `shaders/`, its binding layout, its uniform struct,
//! and a pipeline cache keyed by a readable name (`matmul_gemv:gemv:f16:acc`).
//!
//! Every uniform struct here mirrors the `Params` struct of its shader field by field (all
//! `u32`/`f32`, padded to 16 bytes).

use std::collections::HashMap;
use std::sync::Mutex;

use bytemuck::{Pod, Zeroable};

use super::device::Gpu;
use super::GpuError;

/// One WGSL shader file of `shaders/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShaderSource {
    /// Op name, also the file stem (`"matmul_gemv"`).
    pub name: &'static str,
    /// The WGSL text, compiled into the library.
    pub source: &'static str,
}

macro_rules! shader {
    ($name:literal) => {
        ShaderSource { name: $name, source: include_str!(concat!("../../shaders/", $name, ".wgsl")) }
    };
}

/// How a kernel binds a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bind {
    Uniform,
    Read,
    ReadWrite,
}

/// The kernels the engine dispatches. Each one is one shader file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    Embedding,
    RmsNorm,
    LayerNorm,
    MatmulGemv,
    MatmulGemm,
    /// The native-f16 decode GEMV (`enable f16;`, needs `SHADER_F16`).
    MatmulGemvF16,
    /// The native-f16 prefill GEMM (`enable f16;`, needs `SHADER_F16`).
    MatmulGemmF16,
    /// The packed64 decode GEMV (64-bit loads, needs `SHADER_INT64`).
    MatmulGemvU64,
    MatmulGemvU64Sg,
    /// Decode GEMVs and prefill GEMMs of block-quantised weights (`q8_0`, `q4_0`, `q4_1`).
    MatmulQuant,
    Rope,
    Attention,
    FfnAct,
    Argmax,
    /// Sampling candidates: penalties, top-k and log-sum-exp of the last logits row.
    TopK,
    /// Gemma 3n AltUp predict and correct (`altup.wgsl`).
    Altup,
    /// Gemma 3n AltUp stream setup and unembedding (`altup_io.wgsl`).
    AltupIo,
    /// Gemma 3n RMSNorms fused with their residual combinations (`g3n_norm.wgsl`).
    G3nNorm,
    /// Gemma 3n q/k/v head norms, RoPE and the KV-cache append (`head_norm_rope.wgsl`).
    HeadNormRope,
    /// Gemma 3n per-layer input gate (`g3n_ple.wgsl`).
    G3nPle,
    /// Gemma 3n Gaussian top-k on the FFN gate (`gauss_topk.wgsl`).
    GaussTopk,
    /// Final logit soft-capping (`softcap.wgsl`).
    Softcap,
    /// Benchmark calibration: streaming read bandwidth.
    CalibrateRead,
    /// Benchmark calibration: streaming read bandwidth with 64-bit loads (needs `SHADER_INT64`).
    CalibrateReadU64,
    /// Benchmark calibration: fma throughput.
    CalibrateFma,
}

impl Kernel {
    const ALL: [Kernel; 25] = [
        Kernel::Embedding,
        Kernel::RmsNorm,
        Kernel::LayerNorm,
        Kernel::MatmulGemv,
        Kernel::MatmulGemm,
        Kernel::MatmulGemvF16,
        Kernel::MatmulGemmF16,
        Kernel::MatmulGemvU64,
        Kernel::MatmulGemvU64Sg,
        Kernel::MatmulQuant,
        Kernel::Rope,
        Kernel::Attention,
        Kernel::FfnAct,
        Kernel::Argmax,
        Kernel::TopK,
        Kernel::Altup,
        Kernel::AltupIo,
        Kernel::G3nNorm,
        Kernel::HeadNormRope,
        Kernel::G3nPle,
        Kernel::GaussTopk,
        Kernel::Softcap,
        Kernel::CalibrateRead,
        Kernel::CalibrateReadU64,
        Kernel::CalibrateFma,
    ];

    fn shader(self) -> ShaderSource {
        match self {
            Kernel::Embedding => shader!("embedding"),
            Kernel::RmsNorm => shader!("rmsnorm"),
            Kernel::LayerNorm => shader!("layernorm"),
            Kernel::MatmulGemv => shader!("matmul_gemv"),
            Kernel::MatmulGemm => shader!("matmul_gemm"),
            Kernel::MatmulGemvF16 => shader!("matmul_gemv_f16"),
            Kernel::MatmulGemmF16 => shader!("matmul_gemm_f16"),
            Kernel::MatmulGemvU64 => shader!("matmul_gemv_u64"),
            Kernel::MatmulGemvU64Sg => shader!("matmul_gemv_u64_sg"),
            Kernel::MatmulQuant => shader!("matmul_quant"),
            Kernel::Rope => shader!("rope"),
            Kernel::Attention => shader!("attention"),
            Kernel::FfnAct => shader!("ffn_act"),
            Kernel::Argmax => shader!("argmax"),
            Kernel::TopK => shader!("topk"),
            Kernel::Altup => shader!("altup"),
            Kernel::AltupIo => shader!("altup_io"),
            Kernel::G3nNorm => shader!("g3n_norm"),
            Kernel::HeadNormRope => shader!("head_norm_rope"),
            Kernel::G3nPle => shader!("g3n_ple"),
            Kernel::GaussTopk => shader!("gauss_topk"),
            Kernel::Softcap => shader!("softcap"),
            Kernel::CalibrateRead => shader!("calibrate_read"),
            Kernel::CalibrateReadU64 => shader!("calibrate_read_u64"),
            Kernel::CalibrateFma => shader!("calibrate_fma"),
        }
    }

    /// Bindings `0..n` of group 0, in order.
    fn binds(self) -> &'static [Bind] {
        use Bind::*;
        match self {
            Kernel::Embedding | Kernel::RmsNorm => &[Uniform, Uniform, Read, Read, ReadWrite],
            // The matrix products share one layout (a session binds one group to a product's
            // GEMV and GEMM pipelines); binding 5 holds the split transposed GEMV's partials.
            Kernel::MatmulGemv
            | Kernel::MatmulGemm
            | Kernel::MatmulGemvF16
            | Kernel::MatmulGemmF16
            | Kernel::MatmulGemvU64
            | Kernel::MatmulGemvU64Sg
            | Kernel::MatmulQuant => &[Uniform, Uniform, Read, Read, ReadWrite, ReadWrite],
            Kernel::LayerNorm => &[Uniform, Uniform, Read, Read, ReadWrite, Read],
            Kernel::Rope => &[Uniform, Uniform, ReadWrite, Read, ReadWrite, ReadWrite],
            Kernel::Attention => &[Uniform, Uniform, Read, Read, Read, ReadWrite, ReadWrite],
            Kernel::FfnAct => &[Uniform, Uniform, ReadWrite, Read],
            Kernel::Argmax | Kernel::CalibrateRead | Kernel::CalibrateReadU64 => &[Uniform, Read, ReadWrite],
            Kernel::TopK => &[Uniform, Read, ReadWrite, ReadWrite],
            Kernel::CalibrateFma => &[Uniform, ReadWrite],
            Kernel::Altup => &[Uniform, Uniform, ReadWrite, ReadWrite, Read, Read, ReadWrite],
            Kernel::AltupIo => &[Uniform, Uniform, Read, Read, ReadWrite],
            Kernel::G3nNorm => &[Uniform, Uniform, ReadWrite, Read, Read, Read, ReadWrite],
            Kernel::HeadNormRope => &[Uniform, Uniform, ReadWrite, Read, ReadWrite, ReadWrite, Read],
            Kernel::G3nPle => &[Uniform, Uniform, Read, Read, Read, ReadWrite],
            Kernel::GaussTopk => &[Uniform, Uniform, ReadWrite],
            Kernel::Softcap => &[Uniform, ReadWrite],
        }
    }
}

/// How f16 weights are stored and multiplied on the GPU. Every path reads the same bytes (the
/// file's little-endian f16 rows, zero-padded to a multiple of 8 elements); only the kernels
/// differ. f32 files always use the packed kernels' f32 variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum WeightPath {
    /// Two f16 per `u32`, unpacked with `unpack2x16float`; all arithmetic f32. Runs on every
    /// adapter (`matmul_gemv.wgsl`, `matmul_gemm.wgsl`).
    Packed,
    /// `enable f16;` kernels (`matmul_gemv_f16.wgsl`, `matmul_gemm_f16.wgsl`): f16 storage,
    /// activations rounded to f16, f16 products, f32 accumulation. Needs `SHADER_F16`.
    F16,
    /// The packed path with a decode GEMV whose storage loads are 64 bits wide
    /// (`matmul_gemv_u64.wgsl`: four f16 per `u64`), same f32 arithmetic in the same order, so
    /// the same results as [`WeightPath::Packed`]; the other products are the packed ones.
    /// Needs `SHADER_INT64`. Wins on CPU adapters, where a load's cost is per component.
    Packed64,
}

impl WeightPath {
    /// Every path, packed first.
    pub const ALL: [WeightPath; 3] = [WeightPath::Packed, WeightPath::F16, WeightPath::Packed64];

    /// The name used in reports and accepted by [`WeightPath::parse`]: `"packed"`, `"f16"` or
    /// `"packed64"`.
    pub fn name(self) -> &'static str {
        match self {
            WeightPath::Packed => "packed",
            WeightPath::F16 => "f16",
            WeightPath::Packed64 => "packed64",
        }
    }

    /// The device feature the path's kernels need beyond the packed path's (none for packed).
    pub fn required_feature(self) -> wgpu::Features {
        match self {
            WeightPath::Packed => wgpu::Features::empty(),
            WeightPath::F16 => wgpu::Features::SHADER_F16,
            WeightPath::Packed64 => wgpu::Features::SHADER_INT64,
        }
    }

    /// Parses [`WeightPath::name`] (case-insensitive; `"packed-f16"` is accepted for `packed`).
    pub fn parse(s: &str) -> Option<WeightPath> {
        match s.trim().to_ascii_lowercase().as_str() {
            "packed" | "packed-f16" => Some(WeightPath::Packed),
            "f16" | "native-f16" => Some(WeightPath::F16),
            "packed64" => Some(WeightPath::Packed64),
            _ => None,
        }
    }
}

impl std::fmt::Display for WeightPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Every shader the engine uses, one per file of `shaders/` (tests check both directions).
pub fn shader_sources() -> Vec<ShaderSource> {
    Kernel::ALL.iter().map(|k| k.shader()).collect()
}

/// A pipeline variant: kernel, entry point, and override constants (`name`, value; booleans
/// as 0/1).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PipeKey {
    pub(crate) kernel: Kernel,
    pub(crate) entry: &'static str,
    pub(crate) constants: Vec<(&'static str, u32)>,
}

impl PipeKey {
    pub(crate) fn new(kernel: Kernel, entry: &'static str, flags: &[(&'static str, bool)]) -> PipeKey {
        PipeKey { kernel, entry, constants: flags.iter().map(|&(n, v)| (n, u32::from(v))).collect() }
    }

    /// Adds a numeric override constant.
    pub(crate) fn with(mut self, name: &'static str, value: u32) -> PipeKey {
        self.constants.push((name, value));
        self
    }

    /// Readable name, used as the pipeline label.
    fn label(&self) -> String {
        let mut s = format!("{}:{}", self.kernel.shader().name, self.entry);
        for (name, v) in &self.constants {
            match v {
                0 => {}
                1 => s.push_str(&format!(":{}", name.to_lowercase())),
                v => s.push_str(&format!(":{}={v}", name.to_lowercase())),
            }
        }
        s
    }
}

/// Bind group layouts (one per kernel) and the pipeline cache: each variant is compiled once,
/// on first use, and shared by every session.
pub(crate) struct Kernels {
    /// The weight path the matrix products use ([`Kernels::matmul_keys`]).
    path: WeightPath,
    /// Rows per thread of the packed decode GEMV (`RPT` of `matmul_gemv.wgsl`).
    gemv_rpt: u32,
    /// The packed products run the CPU-adapter kernels `gemm_rows` (prefill) and
    /// `gemv_t_split` + `gemv_t_reduce` (decode, transposed) instead of the tiled `gemm` and
    /// the K-split `gemv_t`.
    row_kernels: bool,
    /// The paired packed64 decode GEMV shares each activation load across an 8-invocation
    /// subgroup (`matmul_gemv_u64_sg.wgsl`): devices opened with `SUBGROUP` whose subgroups
    /// are exactly 8 invocations.
    subgroup_gemv: bool,
    layouts: HashMap<Kernel, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
    modules: Mutex<HashMap<Kernel, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipeKey, wgpu::ComputePipeline>>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.pipelines.lock().map(|p| p.len()).unwrap_or(0);
        f.debug_struct("Kernels").field("pipelines", &n).finish()
    }
}

impl Kernels {
    pub(crate) fn new(gpu: &Gpu) -> Result<Kernels, GpuError> {
        let layouts = gpu.scoped("creating bind group layouts", || {
            Kernel::ALL
                .iter()
                .map(|&k| {
                    let entries: Vec<wgpu::BindGroupLayoutEntry> = k
                        .binds()
                        .iter()
                        .enumerate()
                        .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                            binding: i as u32,
                            visibility: wgpu::ShaderStages::COMPUTE,
                            ty: match b {
                                Bind::Uniform => wgpu::BindingType::Buffer {
                                    ty: wgpu::BufferBindingType::Uniform,
                                    has_dynamic_offset: false,
                                    min_binding_size: None,
                                },
                                Bind::Read | Bind::ReadWrite => wgpu::BindingType::Buffer {
                                    ty: wgpu::BufferBindingType::Storage { read_only: *b == Bind::Read },
                                    has_dynamic_offset: false,
                                    min_binding_size: None,
                                },
                            },
                            count: None,
                        })
                        .collect();
                    let name = k.shader().name;
                    let bgl = gpu.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some(name),
                        entries: &entries,
                    });
                    let pl = gpu.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some(name),
                        bind_group_layouts: &[Some(&bgl)],
                        immediate_size: 0,
                    });
                    (k, (bgl, pl))
                })
                .collect()
        })?;
        Ok(Kernels {
            path: WeightPath::Packed,
            gemv_rpt: default_gemv_rpt(gpu),
            row_kernels: gpu.report.device_type == "Cpu",
            subgroup_gemv: gpu.subgroup_size == Some(8),
            layouts,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
        })
    }

    /// Applies the caller's overrides: rows per thread of the packed decode GEMV (1, 2 or 4;
    /// anything else is an error) and whether the subgroup GEMV may be used (it still needs a
    /// subgroup size of 8).
    pub(crate) fn tune(&mut self, rows_per_thread: Option<u32>, subgroup_gemv: bool) -> Result<(), GpuError> {
        if let Some(r) = rows_per_thread {
            if !matches!(r, 1 | 2 | 4) {
                return Err(GpuError::Unsupported { reason: format!("{r} GEMV rows per thread: expected 1, 2 or 4") });
            }
            self.gemv_rpt = r;
        }
        self.subgroup_gemv &= subgroup_gemv;
        Ok(())
    }

    /// The weight path of the matrix products.
    pub(crate) fn path(&self) -> WeightPath {
        self.path
    }

    /// Sets the weight path of the matrix products (before any session plans its dispatches).
    pub(crate) fn set_path(&mut self, path: WeightPath) {
        self.path = path;
    }

    /// Sets the rows per thread of the packed decode GEMV (1, 2 or 4).
    pub(crate) fn set_gemv_rpt(&mut self, rpt: u32) -> Result<(), GpuError> {
        if !matches!(rpt, 1 | 2 | 4) {
            return Err(GpuError::Unsupported { reason: format!("GEMV rows per thread must be 1, 2 or 4, got {rpt}") });
        }
        self.gemv_rpt = rpt;
        Ok(())
    }

    /// Makes the packed products run the CPU-adapter kernels `gemm_rows` and `gemv_t_split` +
    /// `gemv_t_reduce` (the default there) or the GPU ones, the tiled `gemm` and the K-split
    /// `gemv_t`.
    pub(crate) fn set_row_kernels(&mut self, rows: bool) {
        self.row_kernels = rows;
    }

    /// Makes the paired packed64 decode GEMV use the subgroup kernel (`gemv_pairs` of
    /// `matmul_gemv_u64_sg.wgsl`) or not; refused on a device without 8-invocation subgroups.
    pub(crate) fn set_subgroup_gemv(&mut self, gpu: &Gpu, on: bool) -> Result<(), GpuError> {
        if on && gpu.subgroup_size != Some(8) {
            return Err(GpuError::Unsupported {
                reason: format!(
                    "the subgroup GEMV needs subgroups of 8 invocations, the device has {:?}",
                    gpu.subgroup_size
                ),
            });
        }
        self.subgroup_gemv = on;
        Ok(())
    }

    /// True when the matrix products of an `f32_weights` matrix run the native-f16 kernels.
    fn native_f16(&self, f32_weights: bool) -> bool {
        self.path == WeightPath::F16 && !f32_weights
    }

    /// True when the decode product of a transposed matrix runs the two-pass split kernels
    /// (`gemv_t_split` then `gemv_t_reduce`, CPU adapters) rather than one `gemv_t` dispatch.
    pub(crate) fn split_transposed(&self, f32_weights: bool) -> bool {
        self.row_kernels && !self.native_f16(f32_weights)
    }

    /// Workgroup grid of the decode GEMV of [`Kernels::matmul_keys`] over `n` outputs (`gemv`)
    /// or `row_units` column units (`gemv_t`; `gemv_t_split` over `k` weight rows in
    /// [`split_slabs`]`(k)` slabs), with `rows` row groups per workgroup.
    pub(crate) fn gemv_grid(
        &self,
        f32_weights: bool,
        transposed: bool,
        n: u32,
        k: u32,
        row_units: u32,
        rows: u32,
    ) -> (u32, u32) {
        if transposed && self.split_transposed(f32_weights) {
            (split_slabs(k), row_units.div_ceil(SPLIT_UNITS))
        } else if transposed {
            (row_units.div_ceil(16), 1)
        } else if self.native_f16(f32_weights) {
            split_2d(n.div_ceil(rows))
        } else {
            split_2d(n.div_ceil(rows * self.gemv_rpt))
        }
    }

    /// Pipeline keys of one matrix's products: the decode GEMV, the reduction that follows it
    /// (only for the split transposed GEMV, [`Kernels::split_transposed`]) and the prefill
    /// GEMM. On the [`WeightPath::F16`] path the `enable f16;` kernels for f16 weights; on the
    /// [`WeightPath::Packed64`] path the 64-bit-load kernels for the decode GEMV (`gemv_pairs`
    /// when `rows` is 64 and the `row_units` units of a row are even, its subgroup variant on
    /// devices with 8-invocation subgroups; and the split transposed
    /// GEMV when they are even) of f16 weights and the packed kernels otherwise; else the
    /// packed kernels (which also serve f32 weights). `rows` is the GEMV's `ROWS`; grids come from
    /// [`Kernels::gemv_grid`] (GEMV), `ceil(row_units / 64)` workgroups (reduction) and 64
    /// outputs x 16 tokens per workgroup (GEMM).
    pub(crate) fn matmul_keys(
        &self,
        f32_weights: bool,
        accumulate: bool,
        transposed: bool,
        rows: u32,
        row_units: usize,
    ) -> MatmulKeys {
        let entry = if transposed { "gemv_t" } else { "gemv" };
        if self.native_f16(f32_weights) {
            let acc = [("ACCUMULATE", accumulate)];
            return MatmulKeys {
                gemv: PipeKey::new(Kernel::MatmulGemvF16, entry, &acc).with("ROWS", rows),
                reduce: None,
                gemm: PipeKey::new(Kernel::MatmulGemmF16, "gemm", &[acc[0], ("TRANSPOSED", transposed)]),
            };
        }
        let consts = [("F32_WEIGHTS", f32_weights), ("ACCUMULATE", accumulate)];
        let gemm = PipeKey::new(
            Kernel::MatmulGemm,
            if self.row_kernels { "gemm_rows" } else { "gemm" },
            &[consts[0], consts[1], ("TRANSPOSED", transposed)],
        );
        let wide = self.path == WeightPath::Packed64 && !f32_weights;
        // The pair-load kernels need rows of an even number of units (32-byte aligned).
        let paired = wide && row_units.is_multiple_of(2);
        if transposed && self.split_transposed(f32_weights) {
            // The split pass only writes partials; the reduction applies ACCUMULATE.
            let (split, reduce) = if paired {
                (
                    PipeKey::new(Kernel::MatmulGemvU64, "gemv_t_split", &[]),
                    // The reduction reads only the partials: the packed file's serves both.
                    PipeKey::new(Kernel::MatmulGemv, "gemv_t_reduce", &consts),
                )
            } else {
                (
                    PipeKey::new(Kernel::MatmulGemv, "gemv_t_split", &[consts[0]]),
                    PipeKey::new(Kernel::MatmulGemv, "gemv_t_reduce", &consts),
                )
            };
            return MatmulKeys { gemv: split, reduce: Some(reduce), gemm };
        }
        let gemv = if paired && !transposed && rows == 64 {
            let kernel = if self.subgroup_gemv { Kernel::MatmulGemvU64Sg } else { Kernel::MatmulGemvU64 };
            PipeKey::new(kernel, "gemv_pairs", &[consts[1]]).with("ROWS", rows)
        } else if wide && !transposed {
            PipeKey::new(Kernel::MatmulGemvU64, entry, &[consts[1]]).with("ROWS", rows)
        } else {
            PipeKey::new(Kernel::MatmulGemv, entry, &consts).with("ROWS", rows)
        };
        MatmulKeys { gemv: if transposed { gemv } else { gemv.with("RPT", self.gemv_rpt) }, reduce: None, gemm }
    }

    /// Pipeline keys of a block-quantised matrix's products (`matmul_quant.wgsl`, whatever the
    /// weight path): `gemv` / `gemv_t` for one token on [`quant_gemv_grid`], `gemm` / `gemm_t`
    /// on the GEMM grid of 64 outputs x 16 tokens per workgroup.
    pub(crate) fn quant_keys(&self, dtype: crate::format::DType, accumulate: bool, transposed: bool) -> MatmulKeys {
        use crate::format::DType;
        let qtype = match dtype {
            DType::Q8_0 => 0,
            DType::Q4_0 => 1,
            _ => 2,
        };
        let key = |entry| PipeKey::new(Kernel::MatmulQuant, entry, &[("ACCUMULATE", accumulate)]).with("QTYPE", qtype);
        let (gemv, gemm) = if transposed { ("gemv_t", "gemm_t") } else { ("gemv", "gemm") };
        MatmulKeys { gemv: key(gemv), reduce: None, gemm: key(gemm) }
    }

    /// The pipeline for `key`, compiled on first use.
    pub(crate) fn pipeline(&self, gpu: &Gpu, key: &PipeKey) -> Result<wgpu::ComputePipeline, GpuError> {
        let poisoned = || GpuError::Wgpu { during: "compiling a pipeline".into(), message: "lock poisoned".into() };
        let mut pipes = self.pipelines.lock().map_err(|_| poisoned())?;
        if let Some(p) = pipes.get(key) {
            return Ok(p.clone());
        }
        let label = key.label();
        let module = {
            let mut modules = self.modules.lock().map_err(|_| poisoned())?;
            match modules.get(&key.kernel) {
                Some(m) => m.clone(),
                None => {
                    let src = key.kernel.shader();
                    let m = gpu.scoped(&format!("compiling shader {}.wgsl", src.name), || {
                        gpu.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                            label: Some(src.name),
                            source: wgpu::ShaderSource::Wgsl(src.source.into()),
                        })
                    })?;
                    modules.insert(key.kernel, m.clone());
                    m
                }
            }
        };
        let (_, layout) = self.layouts.get(&key.kernel).ok_or_else(|| GpuError::Wgpu {
            during: format!("creating pipeline {label}"),
            message: "no bind group layout".into(),
        })?;
        let constants: Vec<(&str, f64)> = key.constants.iter().map(|&(n, v)| (n, f64::from(v))).collect();
        let pipe = gpu.scoped(&format!("creating pipeline {label}"), || {
            gpu.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: Some(layout),
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions { constants: &constants, ..Default::default() },
                cache: None,
            })
        })?;
        pipes.insert(key.clone(), pipe.clone());
        Ok(pipe)
    }

    /// A bind group for `kernel` over `buffers` (binding i = buffers\[i\], whole buffer).
    pub(crate) fn bind(
        &self,
        gpu: &Gpu,
        kernel: Kernel,
        buffers: &[&wgpu::Buffer],
    ) -> Result<wgpu::BindGroup, GpuError> {
        let whole: Vec<BufView<'_>> = buffers.iter().map(|&b| BufView::whole(b)).collect();
        self.bind_views(gpu, kernel, &whole)
    }

    /// A bind group for `kernel` over `views` (binding i = views\[i\]: a whole buffer or a
    /// range of it; range offsets must be multiples of the device's storage offset alignment).
    pub(crate) fn bind_views(
        &self,
        gpu: &Gpu,
        kernel: Kernel,
        buffers: &[BufView<'_>],
    ) -> Result<wgpu::BindGroup, GpuError> {
        let name = kernel.shader().name;
        if buffers.len() != kernel.binds().len() {
            return Err(GpuError::Wgpu {
                during: format!("binding {name}"),
                message: format!("{} buffers for {} bindings", buffers.len(), kernel.binds().len()),
            });
        }
        let (bgl, _) = self
            .layouts
            .get(&kernel)
            .ok_or_else(|| GpuError::Wgpu { during: format!("binding {name}"), message: "no layout".into() })?;
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.resource() })
            .collect();
        gpu.scoped(&format!("binding {name}"), || {
            gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(name),
                layout: bgl,
                entries: &entries,
            })
        })
    }
}

/// A buffer bound whole, or `size` bytes of it from `offset`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BufView<'a> {
    pub(crate) buffer: &'a wgpu::Buffer,
    pub(crate) offset: u64,
    /// `None`: to the end of the buffer.
    pub(crate) size: Option<u64>,
}

impl<'a> BufView<'a> {
    pub(crate) fn whole(buffer: &'a wgpu::Buffer) -> BufView<'a> {
        BufView { buffer, offset: 0, size: None }
    }

    fn resource(&self) -> wgpu::BindingResource<'a> {
        match self.size {
            None if self.offset == 0 => self.buffer.as_entire_binding(),
            size => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: self.buffer,
                offset: self.offset,
                size: size.and_then(wgpu::BufferSize::new),
            }),
        }
    }
}

/// Pipeline keys of one matrix's products ([`Kernels::matmul_keys`]).
#[derive(Clone, Debug)]
pub(crate) struct MatmulKeys {
    /// The decode GEMV (`gemv_t_split` for a split transposed product).
    pub(crate) gemv: PipeKey,
    /// `gemv_t_reduce`, dispatched after a split transposed GEMV.
    pub(crate) reduce: Option<PipeKey>,
    /// The prefill GEMM.
    pub(crate) gemm: PipeKey,
}

/// Workgroups of the quantised decode GEMV (`matmul_quant.wgsl`, 64 threads) over `n` outputs:
/// 4 rows a thread (`gemv`, 256 rows a workgroup), or (`gemv_t`) 4 column groups a workgroup,
/// a group being one quant word's 4 (`q8_0`) or 8 (`q4_0`, `q4_1`) output columns.
pub(crate) fn quant_gemv_grid(dtype: crate::format::DType, transposed: bool, n: u32) -> (u32, u32) {
    match (transposed, dtype) {
        (false, _) => split_2d(n.div_ceil(4 * 64)),
        (true, crate::format::DType::Q8_0) => split_2d(n.div_ceil(4 * 4)),
        (true, _) => split_2d(n.div_ceil(8 * 4)),
    }
}

/// Column units per workgroup of `gemv_t_split` (`SPLIT_UNITS` of `matmul_gemv.wgsl`).
pub(crate) const SPLIT_UNITS: u32 = 256;

/// Most K slabs of `gemv_t_split` (sizes the partials buffer).
pub(crate) const SPLIT_MAX_SLABS: u32 = 32;

/// Weight rows per slab of `gemv_t_split` at least: a slab streams at least 128 rows, so the
/// partials written and summed (8 floats per column unit and slab) stay a few percent of the
/// weight bytes read, while an 8192-row down projection still splits 32 ways across cores.
const SPLIT_MIN_ROWS: u32 = 128;

/// K slabs of `gemv_t_split` over `k` weight rows: `ceil(k / 128)`, 1 to 32.
pub(crate) fn split_slabs(k: u32) -> u32 {
    k.div_ceil(SPLIT_MIN_ROWS).clamp(1, SPLIT_MAX_SLABS)
}

/// Floats of the partials buffer (binding 5 of the matrix products) for column rows of up to
/// `row_units` units: [`SPLIT_MAX_SLABS`] slabs of 8 floats per unit (at least 4 floats).
pub(crate) fn split_partial_floats(row_units: usize) -> usize {
    (SPLIT_MAX_SLABS as usize * row_units * 8).max(4)
}

/// Per-dispatch dynamic values, one 16-byte uniform shared by every kernel of a session and
/// written before each submit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct StepParams {
    /// Position of the first token of this pass.
    pub(crate) pos0: u32,
    /// Tokens in this pass.
    pub(crate) t: u32,
    pub(crate) _pad: [u32; 2],
}

/// `embedding.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct EmbeddingParams {
    pub(crate) row_start: u32,
    pub(crate) rows: u32,
    pub(crate) cols: u32,
    pub(crate) row_words: u32,
    pub(crate) out_stride: u32,
    /// Multiplies every value (`sqrt(d_model)` for Gemma 3n, 1 otherwise).
    pub(crate) scale: f32,
    pub(crate) _pad: [u32; 2],
}

/// `rmsnorm.wgsl` and `layernorm.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct NormParams {
    pub(crate) cols: u32,
    pub(crate) in_stride: u32,
    pub(crate) out_stride: u32,
    pub(crate) last_only: u32,
    pub(crate) eps: f32,
    pub(crate) _pad: [u32; 3],
}

/// `matmul_gemv.wgsl` and `matmul_gemm.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct MatmulParams {
    pub(crate) n: u32,
    pub(crate) k: u32,
    pub(crate) row_units: u32,
    pub(crate) x_stride: u32,
    pub(crate) out_stride: u32,
    pub(crate) out_offset: u32,
    pub(crate) k_offset: u32,
    /// K slabs summed by `gemv_t_reduce` (0 for the other kernels, which ignore it).
    pub(crate) slabs: u32,
}

/// `rope.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct RopeParams {
    pub(crate) n_heads: u32,
    pub(crate) n_kv_heads: u32,
    pub(crate) head_dim: u32,
    pub(crate) half: u32,
    /// Row stride of the q/k/v activations (one row holds q, k and v).
    pub(crate) q_stride: u32,
    /// Row stride of the KV cache.
    pub(crate) kv_stride: u32,
    pub(crate) sin_offset: u32,
    /// Offset of k in a q/k/v row.
    pub(crate) k_offset: u32,
    /// Offset of v in a q/k/v row.
    pub(crate) v_offset: u32,
    pub(crate) _pad: [u32; 3],
}

/// `attention.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct AttentionParams {
    pub(crate) n_heads: u32,
    pub(crate) group: u32,
    pub(crate) head_dim: u32,
    pub(crate) q_stride: u32,
    pub(crate) kv_stride: u32,
    pub(crate) out_stride: u32,
    pub(crate) ctx: u32,
    pub(crate) scale: f32,
    /// Keys a query sees with a sliding window (0: every earlier position).
    pub(crate) window: u32,
    /// Rows of a ring-buffer cache: position `j` lives at row `j % ring` (0: row `j`).
    pub(crate) ring: u32,
    pub(crate) _pad: [u32; 2],
}

/// `ffn_act.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct ActParams {
    pub(crate) width: u32,
    pub(crate) stride: u32,
    pub(crate) _pad: [u32; 2],
}

/// `altup.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct AltupParams {
    pub(crate) d: u32,
    pub(crate) n: u32,
    /// Floats between streams.
    pub(crate) stream: u32,
    /// Floats between rows.
    pub(crate) stride: u32,
    pub(crate) o_router: u32,
    pub(crate) o_pred: u32,
    pub(crate) o_corr: u32,
    pub(crate) o_scale: u32,
    pub(crate) eps: f32,
    pub(crate) inv_d: f32,
    pub(crate) _pad: [u32; 2],
}

/// `altup_io.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct AltupIoParams {
    pub(crate) d: u32,
    pub(crate) n: u32,
    pub(crate) stream: u32,
    pub(crate) stride: u32,
    /// The stream `match_rms` rescales.
    pub(crate) j: u32,
    /// Factor of `accumulate`'s sum.
    pub(crate) scale: f32,
    pub(crate) _pad: [u32; 2],
}

/// `g3n_norm.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct G3nNormParams {
    pub(crate) cols: u32,
    pub(crate) stride: u32,
    pub(crate) n_streams: u32,
    pub(crate) stream: u32,
    pub(crate) eps: f32,
    pub(crate) _pad: [u32; 3],
}

/// `head_norm_rope.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct HeadNormRopeParams {
    pub(crate) n_heads: u32,
    /// 0 on a layer that reads another layer's K/V (only the queries are processed).
    pub(crate) n_kv_heads: u32,
    pub(crate) head_dim: u32,
    pub(crate) half: u32,
    pub(crate) q_stride: u32,
    pub(crate) kv_stride: u32,
    pub(crate) sin_offset: u32,
    pub(crate) k_offset: u32,
    pub(crate) v_offset: u32,
    pub(crate) eps: f32,
    /// Rows of a ring-buffer cache: position `j` is written at row `j % ring` (0: row `j`).
    pub(crate) ring: u32,
    pub(crate) _pad: u32,
}

/// `g3n_ple.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct G3nPleParams {
    pub(crate) dim: u32,
    pub(crate) stride: u32,
    pub(crate) row_stride: u32,
    pub(crate) row_offset: u32,
    pub(crate) proj_scale: f32,
    pub(crate) table_scale: f32,
    pub(crate) input_scale: f32,
    pub(crate) eps: f32,
}

/// `gauss_topk.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct GaussTopkParams {
    pub(crate) width: u32,
    pub(crate) stride: u32,
    /// `Phi^-1(sparsity)`.
    pub(crate) mult: f32,
    pub(crate) _pad: u32,
}

/// `softcap.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct SoftcapParams {
    pub(crate) n: u32,
    pub(crate) stride: u32,
    pub(crate) cap: f32,
    pub(crate) _pad: u32,
}

/// `argmax.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct ArgmaxParams {
    pub(crate) n: u32,
    /// Floats between rows (workgroup `r` takes row `r`).
    pub(crate) stride: u32,
    pub(crate) _pad: [u32; 2],
}

/// `topk.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct TopkParams {
    /// Logits in row 0 (vocabulary size).
    pub(crate) n: u32,
    /// Candidates, `1..=n`.
    pub(crate) k: u32,
    /// `(token, count)` entries of the penalty list.
    pub(crate) n_pen: u32,
    pub(crate) _pad0: u32,
    /// `1 / temperature` of the log-sum-exp.
    pub(crate) inv_temp: f32,
    /// Repetition penalty.
    pub(crate) rep: f32,
    /// Frequency penalty.
    pub(crate) freq: f32,
    /// Presence penalty.
    pub(crate) presence: f32,
}

/// `calibrate_read.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct CalibrateReadParams {
    /// `vec4<u32>` units in the data buffer.
    pub(crate) n: u32,
    /// Invocations in the grid (workgroups * `CALIBRATE_WG`).
    pub(crate) threads: u32,
    pub(crate) _pad: [u32; 2],
}

/// `calibrate_fma.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub(crate) struct CalibrateFmaParams {
    pub(crate) iterations: u32,
    pub(crate) _pad: [u32; 3],
}

/// Workgroup size (`WG`) of `calibrate_read.wgsl` and `calibrate_fma.wgsl`.
pub(crate) const CALIBRATE_WG: u32 = 64;

/// Output rows per workgroup of the decode GEMV (`ROWS` override of `matmul_gemv.wgsl`): one
/// thread per row on CPU adapters (software Vulkan runs a workgroup as SIMD loops, where
/// shared-memory reductions and barriers are expensive), 4 rows of 16 threads on GPUs.
/// `requested` ([`GpuOptions::gemv_rows`](super::GpuOptions::gemv_rows)) overrides the
/// choice, for tuning on a new device; an invalid value is an error.
pub(crate) fn gemv_rows(gpu: &Gpu, requested: Option<u32>) -> Result<u32, GpuError> {
    if let Some(r) = requested {
        return check_gemv_rows(r);
    }
    Ok(if gpu.report.device_type == "Cpu" { 64 } else { 4 })
}

/// Rows per thread of the packed decode GEMV (`RPT` of `matmul_gemv.wgsl`): 4 on CPU adapters
/// (lavapipe: each storage load is a per-lane scalar loop, so sharing every x load among 4
/// rows halves the loads per weight unit; measured ~2x on a 8192 x 2048 GEMV), 1 on GPUs.
/// [`GpuOptions::gemv_rows_per_thread`](super::GpuOptions::gemv_rows_per_thread) overrides it
/// (for tuning) through [`Kernels::tune`].
pub(crate) fn default_gemv_rpt(gpu: &Gpu) -> u32 {
    if gpu.report.device_type == "Cpu" {
        4
    } else {
        1
    }
}

/// `rows` if it is a valid GEMV `ROWS` (a power of two from 1 to 64).
pub(crate) fn check_gemv_rows(rows: u32) -> Result<u32, GpuError> {
    if rows.is_power_of_two() && rows <= 64 {
        Ok(rows)
    } else {
        Err(GpuError::Unsupported {
            reason: format!("GEMV rows per workgroup must be a power of two from 1 to 64, got {rows}"),
        })
    }
}

/// Rows of workgroups for `n` workgroups in one dimension (at most 65535 per dimension).
pub(crate) fn split_2d(n: u32) -> (u32, u32) {
    const MAX: u32 = 32768;
    if n <= MAX {
        (n.max(1), 1)
    } else {
        (MAX, n.div_ceil(MAX))
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
