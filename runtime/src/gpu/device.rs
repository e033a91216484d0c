//! Adapter enumeration and device creation: the adapter's real limits are requested (not
//! wgpu's defaults), and every wgpu error is captured into a [`GpuError`] instead of a panic.

use std::future::Future;
use std::sync::{Arc, Mutex};

use super::{GpuError, WeightPath};

/// Backends the runtime uses: Vulkan (Android, Linux, Windows) and Metal (Apple).
const BACKENDS: wgpu::Backends = wgpu::Backends::VULKAN.union(wgpu::Backends::METAL);

/// One timing of the weight-path choice: the decode GEMV kernel of `path` on a
/// `[rows, cols]` f16 weight.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PathTiming {
    /// `"packed"` or `"f16"` ([`WeightPath::name`](super::WeightPath::name)).
    pub path: String,
    /// Weight rows of the timed GEMV.
    pub rows: usize,
    /// Weight columns of the timed GEMV.
    pub cols: usize,
    /// Best time of one GEMV dispatch, milliseconds.
    pub gemv_ms: f64,
    /// The weight bytes it reads per second, GB/s (10^9 bytes).
    pub read_gb_per_s: f64,
}

/// What wgpu reports about one adapter (`matformer devices`), and which weight path this
/// backend uses on it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AdapterReport {
    /// Adapter name (`"llvmpipe (LLVM 15.0.6, 256 bits)"`, `"Adreno (TM) 740"`).
    pub name: String,
    /// `"Vulkan"` or `"Metal"`.
    pub backend: String,
    /// `"DiscreteGpu"`, `"IntegratedGpu"`, `"Cpu"` (software, e.g. lavapipe), ...
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Largest storage-buffer binding in bytes: bigger tensors are split into row chunks.
    pub max_storage_buffer_binding_size: u64,
    /// Largest buffer in bytes.
    pub max_buffer_size: u64,
    /// Shared memory per workgroup in bytes.
    pub max_compute_workgroup_storage_size: u32,
    /// Invocations per workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// Storage buffers per shader stage (the attention kernel needs 5).
    pub max_storage_buffers_per_shader_stage: u32,
    /// Native f16 arithmetic in shaders (`SHADER_F16`, which implies 16-bit storage).
    pub shader_f16: bool,
    /// Subgroup operations (`SUBGROUP`).
    pub subgroups: bool,
    /// 64-bit integers in shaders (`SHADER_INT64`: the packed64 weight path).
    pub shader_int64: bool,
    /// Weight paths that can run on this adapter: `"packed"` always, `"f16"` with `shader_f16`,
    /// `"packed64"` with `shader_int64`.
    pub weight_paths: Vec<String>,
    /// The decode GEMV timed on each available path when the choice was measured (empty when
    /// not measured: [`list_adapters`] does not measure, [`probe_adapters`] and engines do).
    pub gemv_timings: Vec<PathTiming>,
    /// The weight path in use (`"packed"` or `"f16"`); before the choice is made (see
    /// [`list_adapters`]), `"packed"`.
    pub weight_path: String,
    /// Why that path: measured faster, the only one available, or forced.
    pub weight_path_reason: String,
}

impl AdapterReport {
    fn of(adapter: &wgpu::Adapter) -> AdapterReport {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let features = adapter.features();
        AdapterReport {
            name: info.name,
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_storage_buffers_per_shader_stage: limits.max_storage_buffers_per_shader_stage,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            shader_int64: features.contains(wgpu::Features::SHADER_INT64),
            weight_paths: WeightPath::ALL
                .iter()
                .filter(|p| features.contains(p.required_feature()))
                .map(|p| p.name().to_string())
                .collect(),
            gemv_timings: Vec::new(),
            weight_path: WeightPath::Packed.name().to_string(),
            weight_path_reason: "not measured yet (chosen when an engine starts)".to_string(),
        }
    }
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = BACKENDS;
    wgpu::Instance::new(desc)
}

/// Every Vulkan/Metal adapter wgpu can see, in wgpu's order (empty when there is none).
/// Cheap: opens no device, so the weight path is not measured (see [`probe_adapters`]).
pub fn list_adapters() -> Vec<AdapterReport> {
    let instance = instance();
    pollster::block_on(instance.enumerate_adapters(BACKENDS)).iter().map(AdapterReport::of).collect()
}

/// Every adapter as [`list_adapters`] reports it, plus the weight-path choice an engine would
/// make on it: opens a device on each adapter and times the decode GEMV on every available
/// path (see [`GpuOptions::weight_path`](super::GpuOptions::weight_path)). An adapter
/// that fails to open or to run the kernels keeps its [`list_adapters`] entry, with the error
/// as `weight_path_reason`. Takes a fraction of a second per adapter (pipeline compilation).
pub fn probe_adapters() -> Vec<AdapterReport> {
    let instance = instance();
    pollster::block_on(instance.enumerate_adapters(BACKENDS))
        .into_iter()
        .map(|adapter| {
            let fallback = AdapterReport::of(&adapter);
            let probed = Gpu::from_adapter(adapter).and_then(|mut gpu| {
                let mut kernels = super::ops::Kernels::new(&gpu)?;
                super::weight_path::choose_weight_path(&mut gpu, &mut kernels, None)?;
                Ok(gpu.report)
            });
            probed.unwrap_or_else(|e| AdapterReport { weight_path_reason: format!("probe failed: {e}"), ..fallback })
        })
        .collect()
}

/// A device and queue with its adapter's description, plus a sink for errors raised outside
/// error scopes.
pub(crate) struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) report: AdapterReport,
    pub(crate) limits: wgpu::Limits,
    /// Invocations per subgroup when the device was opened with `SUBGROUP` and the adapter's
    /// subgroups have one fixed size (8 on lavapipe); `None` otherwise.
    pub(crate) subgroup_size: Option<u32>,
    uncaptured: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("adapter", &self.report.name).finish()
    }
}

impl Gpu {
    /// Opens the first adapter whose name contains `name` (case-insensitive), or wgpu's
    /// preferred high-performance adapter when `name` is `None`, with the adapter's own limits.
    pub(crate) fn open(name: Option<&str>) -> Result<Gpu, GpuError> {
        let instance = instance();
        let adapter = match name {
            Some(want) => {
                let all = pollster::block_on(instance.enumerate_adapters(BACKENDS));
                let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
                let want_l = want.to_lowercase();
                all.into_iter().find(|a| a.get_info().name.to_lowercase().contains(&want_l)).ok_or_else(|| {
                    GpuError::NoAdapter { reason: format!("no adapter named like {want:?} among {names:?}") }
                })?
            }
            None => pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                // Real limits, not bucketed ones (no untrusted content here).
                apply_limit_buckets: false,
            }))
            .map_err(|e| GpuError::NoAdapter { reason: e.to_string() })?,
        };
        Gpu::from_adapter(adapter)
    }

    /// Opens a device on `adapter` with its own limits and, when it has them, `SHADER_F16`
    /// (f16 arithmetic and 16-bit storage: the [`WeightPath::F16`] kernels),
    /// `SHADER_INT64` (the [`WeightPath::Packed64`] kernel) and `SUBGROUP` (its subgroup
    /// variant, `matmul_gemv_u64_sg.wgsl`).
    pub(crate) fn from_adapter(adapter: wgpu::Adapter) -> Result<Gpu, GpuError> {
        let report = AdapterReport::of(&adapter);
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("matformer"),
            required_features: adapter.features()
                & (wgpu::Features::SHADER_F16 | wgpu::Features::SHADER_INT64 | wgpu::Features::SUBGROUP),
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| GpuError::DeviceRequest { adapter: report.name.clone(), reason: e.to_string() })?;
        let uncaptured = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&uncaptured);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            log::error!("uncaptured GPU error: {e}");
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert_with(|| e.to_string());
            }
        }));
        let info = adapter.get_info();
        let subgroup_size = (device.features().contains(wgpu::Features::SUBGROUP)
            && info.subgroup_min_size == info.subgroup_max_size)
            .then_some(info.subgroup_min_size);
        Ok(Gpu { device, queue, report, limits, subgroup_size, uncaptured })
    }

    /// True when the device was opened with what `path`'s kernels need.
    pub(crate) fn runs(&self, path: WeightPath) -> bool {
        self.device.features().contains(path.required_feature())
    }

    /// Runs `f` inside validation and out-of-memory error scopes; a captured error becomes
    /// [`GpuError::Wgpu`] naming `during`.
    pub(crate) fn scoped<T>(&self, during: &str, f: impl FnOnce() -> T) -> Result<T, GpuError> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = block_on(validation.pop());
        let o = block_on(oom.pop());
        if let Some(e) = o {
            return Err(GpuError::OutOfMemory { during: during.to_string(), reason: e.to_string() });
        }
        if let Some(e) = v {
            return Err(GpuError::Wgpu { during: during.to_string(), message: e.to_string() });
        }
        self.take_uncaptured(during)?;
        Ok(out)
    }

    /// Reports (once) an error raised outside any scope, e.g. during an earlier submit.
    pub(crate) fn take_uncaptured(&self, during: &str) -> Result<(), GpuError> {
        let taken = self.uncaptured.lock().ok().and_then(|mut slot| slot.take());
        match taken {
            Some(message) => Err(GpuError::Wgpu { during: during.to_string(), message }),
            None => Ok(()),
        }
    }

    /// Largest binding (and so buffer) this backend creates: the storage-binding limit capped
    /// by the buffer-size limit.
    pub(crate) fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// Waits for all submitted work.
    pub(crate) fn wait(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map(|_| ())
            .map_err(|e| GpuError::Readback { reason: e.to_string() })
    }

    /// Waits for all submitted work like [`Gpu::wait`], but in slices of [`STOP_POLL`],
    /// asking `stop` before each: when it returns true this gives up with
    /// [`GpuError::Interrupted`] while the work runs on (later submissions queue behind it).
    pub(crate) fn wait_until(&self, stop: &dyn Fn() -> bool) -> Result<(), GpuError> {
        loop {
            if stop() {
                return Err(GpuError::Interrupted);
            }
            match self.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: Some(STOP_POLL) }) {
                Ok(_) => return Ok(()),
                Err(wgpu::PollError::Timeout) => {}
                Err(e) => return Err(GpuError::Readback { reason: e.to_string() }),
            }
        }
    }

    /// Copies `bytes` bytes of `src` (from offset 0) into a fresh mappable buffer after the
    /// work submitted so far, waits, and returns them.
    pub(crate) fn read_back(&self, src: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, GpuError> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("readback") });
        enc.copy_buffer_to_buffer(src, 0, &staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        map_read(self, &staging, bytes, None)
    }
}

/// Longest a device wait lasts before [`Gpu::wait_until`] asks its stop condition again: the
/// most a cancel waits for a step in flight (a completed step ends the wait at once).
pub(crate) const STOP_POLL: std::time::Duration = std::time::Duration::from_micros(500);

/// Maps `buf` (already written by submitted work) and copies its first `bytes` bytes out.
/// With `stop`, the wait for that work is [`Gpu::wait_until`]: it is given up before the
/// buffer is mapped, so nothing is left pending on it.
pub(crate) fn map_read(
    gpu: &Gpu,
    buf: &wgpu::Buffer,
    bytes: u64,
    stop: Option<&dyn Fn() -> bool>,
) -> Result<Vec<u8>, GpuError> {
    if let Some(stop) = stop {
        gpu.wait_until(stop)?;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    buf.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
        let _ = tx.send(r);
    });
    gpu.wait()?;
    match rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(GpuError::Readback { reason: e.to_string() }),
        Err(_) => return Err(GpuError::Readback { reason: "map callback was dropped".into() }),
    }
    let out = {
        let view = buf.get_mapped_range(0..bytes).map_err(|e| GpuError::Readback { reason: e.to_string() })?;
        view.to_vec()
    };
    buf.unmap();
    gpu.take_uncaptured("running a GPU step")?;
    Ok(out)
}

fn block_on<F: Future>(f: F) -> F::Output {
    pollster::block_on(f)
}
