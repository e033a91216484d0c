//! [`Engine`]: one opened model file on one backend, shared by any number of sessions.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::session::Session;
use super::types::{BackendChoice, BackendInfo, EngineOptions, ModelInfo, SessionOptions, SubmodelChoice};
use super::Error;
use crate::backend::{Backend, BackendKind};
use crate::cpu::CpuEngine;
use crate::elastic::{self, Catalog, CatalogEntry, DeviceBudget, DeviceCostModel, LatencyEstimator, Plan, Policy};
use crate::format::Metadata;
use crate::tokenizer::{ChatTemplate, Tokenizer};
use crate::{ModelFile, Submodel};

/// A model file opened on a backend: the weights (mapped, and on the GPU uploaded once), the
/// catalog of submodels, the tokenizer and the chat template. Cheap to clone and `Send +
/// Sync`: every clone and every [`Session`] made from it share one copy of the weights.
///
/// See `docs/api.md` for a complete example.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<EngineInner>,
}

/// What an [`Engine`] shares with its sessions.
pub(crate) struct EngineInner {
    pub(crate) model: Arc<ModelFile>,
    pub(crate) backend: Backend,
    pub(crate) info: BackendInfo,
    pub(crate) catalog: Catalog,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) template: Option<ChatTemplate>,
    pub(crate) policy: Policy,
    pub(crate) options: EngineOptions,
    /// The latency cost model, once obtained (calibrated or read from the cache).
    cost_model: Mutex<Option<DeviceCostModel>>,
    pub(crate) closed: AtomicBool,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.inner.model.path())
            .field("backend", &self.inner.info)
            .field("catalog_entries", &self.inner.catalog.entries.len())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Engine {
    /// Opens `path` (memory-mapped; only the header is read unless `options.verify`), loads
    /// the tokenizer and chat template, and prepares the backend `options.backend` asks for
    /// ([`BackendInfo::reason`] says which and why).
    pub fn open(path: impl AsRef<Path>, options: EngineOptions) -> Result<Engine, Error> {
        if options.threads == Some(0) {
            return Err(Error::invalid("threads must be at least 1"));
        }
        let model = Arc::new(ModelFile::open(path)?);
        if options.verify {
            model.verify()?;
        }
        Engine::from_model(model, options)
    }

    /// [`Engine::open`] on a file already opened (or held in memory).
    pub fn from_model(model: Arc<ModelFile>, options: EngineOptions) -> Result<Engine, Error> {
        let tokenizer = Tokenizer::from_model(&model)?;
        let template = ChatTemplate::from_model(&model)?;
        let catalog = Catalog::from_metadata_extra(&model)?;
        let (backend, info) = choose_backend(&model, &options)?;
        Ok(Engine {
            inner: Arc::new(EngineInner {
                model,
                backend,
                info,
                catalog,
                tokenizer,
                template,
                policy: Policy::default(),
                options,
                cost_model: Mutex::new(None),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The backend in use and why it was chosen.
    pub fn backend(&self) -> BackendInfo {
        self.inner.info.clone()
    }

    /// The shared engine handle (for the CLI's benchmarks and advanced use).
    pub fn backend_handle(&self) -> Backend {
        self.inner.backend.clone()
    }

    /// The opened file.
    pub fn model(&self) -> Arc<ModelFile> {
        Arc::clone(&self.inner.model)
    }

    /// The model's shape, for display.
    pub fn model_info(&self) -> ModelInfo {
        let m = &self.inner.model;
        let meta = m.metadata();
        let a = &meta.architecture;
        let levels = m.view().available_levels;
        ModelInfo {
            family: a.family.clone(),
            n_layers: a.n_layers,
            d_model: a.d_model,
            vocab_size: a.vocab_size,
            max_context: a.max_context,
            level_names: meta.level_names.iter().take(levels).cloned().collect(),
            file_bytes: m.view().file_len,
            has_chat_template: self.inner.template.is_some(),
        }
    }

    /// The file's metadata (a copy).
    pub fn metadata(&self) -> Metadata {
        self.inner.model.metadata().clone()
    }

    /// Every submodel this file offers, with its exact sizes (and losses when calibrated).
    pub fn catalog(&self) -> Vec<CatalogEntry> {
        self.inner.catalog.entries.clone()
    }

    /// The best submodel for `budget` ([`elastic::select()`] with the default policy), and
    /// why. A latency target uses this device's cost model: read from
    /// [`EngineOptions::cache_dir`] when it holds one for this device and model shape, else
    /// calibrated now (seconds) and written there.
    pub fn select(&self, budget: &DeviceBudget) -> Result<Plan, Error> {
        let latency = match budget.latency_target_ms_per_token {
            Some(_) => Some(LatencyEstimator::from(self.cost_model()?)),
            None => None,
        };
        Ok(elastic::select(&self.inner.catalog, budget, &self.inner.policy, latency.as_ref())?)
    }

    /// The tokenizer (a cheap clone).
    pub fn tokenizer(&self) -> Tokenizer {
        self.inner.tokenizer.clone()
    }

    /// The chat template's source, when the file carries one.
    pub fn chat_template(&self) -> Option<String> {
        self.inner.template.as_ref().map(|t| t.source().to_string())
    }

    /// A new session (empty conversation). Sessions share the engine's weights; each holds
    /// its own KV cache.
    pub fn session(&self, options: SessionOptions) -> Result<Session, Error> {
        self.check_open()?;
        Session::new(self.clone(), options)
    }

    /// Releases the engine: sessions of it fail with [`Error::EngineClosed`] from their next
    /// token on (a generation in progress stops at the next token boundary), and the weights
    /// are freed when the last handle is dropped. Idempotent.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    pub(crate) fn check_open(&self) -> Result<(), Error> {
        if self.is_closed() {
            Err(Error::EngineClosed)
        } else {
            Ok(())
        }
    }

    /// What sessions and reports call `sub`: [`Catalog::name_of`](crate::elastic::Catalog::name_of)
    /// (the catalog entry's name, so a Gemma 3n slice opened as `"e2b"` stays `"e2b"`, else the
    /// level name or per-layer spec).
    pub(crate) fn name_of(&self, sub: &Submodel) -> String {
        self.inner.catalog.name_of(sub, self.inner.model.metadata())
    }

    /// [`name_of`](Self::name_of) for a name [`Submodel::name`] printed (switch reports).
    pub(crate) fn rename(&self, name: String) -> String {
        let m = &self.inner.model;
        match Submodel::parse(&name, m.metadata(), m.view().available_levels) {
            Ok(sub) => self.name_of(&sub),
            Err(_) => name,
        }
    }

    /// The submodel `choice` names for this file.
    pub(crate) fn resolve(&self, choice: &SubmodelChoice) -> Result<(Submodel, String), Error> {
        let m = &self.inner.model;
        let levels = m.view().available_levels;
        match choice {
            SubmodelChoice::Named(name) => {
                let sub = match self.inner.catalog.get(name) {
                    Some(e) => e.levels.clone(),
                    None => Submodel::parse(name, m.metadata(), levels)?,
                };
                Ok((sub, format!("asked for {name}")))
            }
            SubmodelChoice::Levels(l) => {
                let sub = Submodel::new(levels_u8(l)?);
                sub.validate(m.metadata(), levels)?;
                Ok((sub, "asked for these levels".into()))
            }
            SubmodelChoice::LevelsSkipping { levels: l, skipped_layers } => {
                let n = l.len();
                let mut skip = vec![false; n];
                for &i in skipped_layers {
                    match skip.get_mut(i) {
                        Some(s) => *s = true,
                        None => {
                            return Err(Error::invalid(format!(
                                "skipped layer {i} does not exist: the levels list {n} layers"
                            )))
                        }
                    }
                }
                let sub = Submodel::with_skip(levels_u8(l)?, skip);
                sub.validate(m.metadata(), levels)?;
                Ok((sub, "asked for these levels and skipped layers".into()))
            }
            SubmodelChoice::Auto(budget) => {
                let plan = self.select(budget)?;
                Ok((plan.entry.levels.clone(), plan.explanation))
            }
        }
    }

    /// The latency cost model of this backend and model shape.
    fn cost_model(&self) -> Result<DeviceCostModel, Error> {
        let mut slot = self.inner.cost_model.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let model = &self.inner.model;
        let shape = elastic::ShapeFingerprint::of(model);
        let opts = elastic::latency_calibrate::LatencyCalibrationOptions::default();
        let device = match &self.inner.backend {
            Backend::Cpu(e) => elastic::cpu_probe::cpu_device_id(e.threads()),
            #[cfg(feature = "gpu")]
            Backend::Gpu(e) => elastic::latency_calibrate::gpu_device_id(e.adapter()),
        };
        let path = self.inner.options.cache_dir.as_ref().map(|d| elastic::cache_file(d, &device, &shape));
        if let Some(p) = &path {
            if let Ok(m) = DeviceCostModel::load(p, &device, &shape) {
                *slot = Some(m.clone());
                return Ok(m);
            }
        }
        let m = match &self.inner.backend {
            Backend::Cpu(e) => elastic::latency_calibrate::calibrate_cpu(e, &opts)?,
            #[cfg(feature = "gpu")]
            Backend::Gpu(e) => elastic::latency_calibrate::calibrate_gpu(e, &opts)?,
        };
        if let Some(p) = &path {
            if let Some(dir) = p.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = m.save(p) {
                log::warn!("latency model not cached in {}: {e}", p.display());
            }
        }
        *slot = Some(m.clone());
        Ok(m)
    }
}

/// Level indices as stored (`u8`), or an error naming the first one out of range.
pub(crate) fn levels_u8(levels: &[usize]) -> Result<Vec<u8>, Error> {
    levels.iter().map(|&x| u8::try_from(x).map_err(|_| Error::invalid(format!("level {x} is out of range")))).collect()
}

/// The backend `options` asks for, with the reason.
fn choose_backend(model: &Arc<ModelFile>, options: &EngineOptions) -> Result<(Backend, BackendInfo), Error> {
    let cpu = |reason: String| -> Result<(Backend, BackendInfo), Error> {
        let mut e = CpuEngine::new(Arc::clone(model)).map_err(crate::backend::BackendError::from)?;
        if let Some(n) = options.threads {
            e = e.with_threads(n);
        }
        let device = format!("{} threads, {}", e.threads(), crate::cpu::simd_features());
        Ok((Backend::from(e), BackendInfo { kind: BackendKind::Cpu, device, reason }))
    };
    match options.backend {
        BackendChoice::Cpu => cpu("asked for the CPU engine".into()),
        #[cfg(not(feature = "gpu"))]
        BackendChoice::Gpu => Err(Error::invalid("this build has no GPU backend (feature `gpu`)")),
        #[cfg(not(feature = "gpu"))]
        BackendChoice::Auto => cpu("this build has no GPU backend".into()),
        #[cfg(feature = "gpu")]
        BackendChoice::Gpu => {
            let g = crate::gpu::GpuEngine::new(Arc::clone(model), gpu_options(options)?)
                .map_err(crate::backend::BackendError::from)?;
            let a = g.adapter();
            let device = format!("{} ({})", a.name, a.backend);
            Ok((Backend::from(g), BackendInfo { kind: BackendKind::Gpu, device, reason: "asked for the GPU".into() }))
        }
        #[cfg(feature = "gpu")]
        BackendChoice::Auto => {
            let adapters = crate::gpu::list_adapters();
            let software: Vec<String> =
                adapters.iter().filter(|a| a.device_type.eq_ignore_ascii_case("cpu")).map(|a| a.name.clone()).collect();
            if adapters.len() == software.len() {
                return cpu(if software.is_empty() {
                    "no GPU adapter was found".into()
                } else {
                    format!(
                        "only a software GPU adapter was found ({}), which runs slower than the CPU engine on the same cores",
                        software.join(", ")
                    )
                });
            }
            match crate::gpu::GpuEngine::new(Arc::clone(model), gpu_options(options)?)
                .and_then(|g| g.self_check().map(|()| g))
            {
                Ok(g) => {
                    let a = g.adapter();
                    let device = format!("{} ({})", a.name, a.backend);
                    let reason = "a hardware GPU passed the start-up self-check against the CPU engine".into();
                    Ok((Backend::from(g), BackendInfo { kind: BackendKind::Gpu, device, reason }))
                }
                Err(e) => cpu(format!("the GPU was not used: {e}")),
            }
        }
    }
}

#[cfg(feature = "gpu")]
fn gpu_options(options: &EngineOptions) -> Result<crate::gpu::GpuOptions, Error> {
    let t = &options.gpu_tuning;
    let weight_path = match &t.weight_path {
        None => None,
        Some(name) => Some(crate::gpu::WeightPath::parse(name).ok_or_else(|| {
            Error::invalid(format!("GPU weight path {name:?}: expected \"packed\", \"f16\" or \"packed64\""))
        })?),
    };
    Ok(crate::gpu::GpuOptions {
        memory_limit_bytes: options.gpu_memory_limit_bytes,
        weight_path,
        gemv_rows: t.gemv_rows,
        gemv_rows_per_thread: t.gemv_rows_per_thread,
        subgroup_gemv: t.subgroup_gemv.unwrap_or(true),
        ..Default::default()
    })
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
};
