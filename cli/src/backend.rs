//! `--backend auto|gpu|cpu` for the benchmarks: the runtime's own choice (`Engine::open`, which
//! self-checks a hardware GPU and says why it chose what it chose), handed back as the shared
//! `matformer::backend::Backend` the benchmarks drive directly.

use std::sync::Arc;

use anyhow::Result;
use matformer::backend::{Backend, BackendSession};
use matformer::{BackendChoice, Engine, ModelFile, Submodel};

/// The engine `choice` gives for `model`; prints the decision on stderr unless `quiet`.
pub fn load(model: &Arc<ModelFile>, choice: BackendChoice, threads: Option<usize>, quiet: bool) -> Result<Backend> {
    let args = crate::chat::EngineArgs {
        backend: match choice {
            BackendChoice::Auto => crate::chat::BackendArg::Auto,
            BackendChoice::Cpu => crate::chat::BackendArg::Cpu,
            BackendChoice::Gpu => crate::chat::BackendArg::Gpu,
        },
        threads,
        gpu_memory: None,
        cache_dir: None,
    };
    let engine = Engine::from_model(Arc::clone(model), args.options()?)?;
    if !quiet {
        let b = engine.backend();
        eprintln!("backend: {} ({}; {})", b.kind.name(), b.device, b.reason);
    }
    Ok(engine.backend_handle())
}

/// A session for `sub`; on the GPU, when `sub` does not fit, every layer steps one level down
/// until it does (a note on stderr names what runs).
pub fn session(backend: &Backend, sub: &Submodel) -> Result<BackendSession> {
    Ok(match backend {
        Backend::Cpu(_) => backend.session(sub)?,
        Backend::Gpu(e) => {
            let (s, ran, oom) = matformer::gpu::step_down_on_oom(e.model(), sub, |t| e.session(t))?;
            if let Some(err) = oom {
                let (meta, catalog) = (e.model().metadata(), matformer::elastic::Catalog::from_view(e.model().view()));
                eprintln!(
                    "note: {} does not fit: {err}; running {}",
                    catalog.name_of(sub, meta),
                    catalog.name_of(&ran, meta)
                );
            }
            BackendSession::Gpu(Box::new(s))
        }
    })
}

/// `(submits, readbacks, readback bytes)` of a GPU session since its counters were reset.
pub fn gpu_counters(s: &BackendSession) -> Option<(u64, u64, u64)> {
    s.gpu().map(|g| {
        let c = g.counters();
        (c.submits, c.readbacks, c.readback_bytes)
    })
}

/// Resets a GPU session's counters.
pub fn reset_counters(s: &mut BackendSession) {
    if let Some(g) = s.gpu_mut() {
        g.reset_counters();
    }
}
