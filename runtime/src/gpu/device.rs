//! Adapter enumeration and device creation: the adapter's real limits are requested (not
//! wgpu's defaults), and every wgpu error is captured into a [`GpuError`] instead of a panic.

use std::future::Future;
use std::sync::{Arc, Mutex};

use super::GpuError;

/// Backends the runtime uses: Vulkan (Android, Linux, Windows) and Metal (Apple).
const BACKENDS: wgpu::Backends = wgpu::Backends::VULKAN.union(wgpu::Backends::METAL);

/// What wgpu reports about one adapter (`matformer devices`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
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
    /// How this backend would store weights on this adapter (`"packed-f16"`: two f16 per u32,
    /// unpacked to f32; works on every adapter).
    pub weight_path: String,
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
            weight_path: "packed-f16".to_string(),
        }
    }
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = BACKENDS;
    wgpu::Instance::new(desc)
}

/// Every Vulkan/Metal adapter wgpu can see, in wgpu's order (empty when there is none).
pub fn list_adapters() -> Vec<AdapterReport> {
    let instance = instance();
    pollster::block_on(instance.enumerate_adapters(BACKENDS)).iter().map(AdapterReport::of).collect()
}

/// A device and queue with its adapter's description, plus a sink for errors raised outside
/// error scopes.
pub(crate) struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) report: AdapterReport,
    pub(crate) limits: wgpu::Limits,
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
        let report = AdapterReport::of(&adapter);
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("matformer"),
            required_features: wgpu::Features::empty(),
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
        Ok(Gpu { device, queue, report, limits, uncaptured })
    }

    /// Runs `f` inside validation and out-of-memory error scopes; a captured error becomes
    /// [`GpuError::Wgpu`] naming `during`.
    pub(crate) fn scoped<T>(&self, during: &str, f: impl FnOnce() -> T) -> Result<T, GpuError> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = block_on(validation.pop());
        let o = block_on(oom.pop());
        if let Some(e) = v.or(o) {
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
        map_read(self, &staging, bytes)
    }
}

/// Maps `buf` (already written by submitted work) and copies its first `bytes` bytes out.
pub(crate) fn map_read(gpu: &Gpu, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, GpuError> {
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
