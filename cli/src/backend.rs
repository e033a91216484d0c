//! Backend choice for the CLI: `--backend auto|gpu|cpu`.
//!
//! `auto` uses the GPU when a hardware adapter exists and passes the start-up self-check (a tiny
//! forward compared with the CPU engine), otherwise the CPU engine, and always says which and why
//! on stderr: never a silent fallback. A software adapter (lavapipe) is not chosen by `auto`: it
//! runs on the same cores as the CPU engine, several times slower. `gpu` fails with a clear error when no usable adapter exists.
//!
//! `MATFORMER_GPU_MEMORY_LIMIT` (e.g. `1GiB`) caps the GPU memory the engine allocates
//! (`GpuOptions::memory_limit_bytes`); a session that does not fit steps every layer one level
//! down and retries, with a note on stderr, instead of failing.

use std::sync::Arc;

use anyhow::{bail, Result};
use matformer::cpu::{argmax, CpuEngine, Session};
use matformer::gpu::{step_down_on_oom, GpuEngine, GpuOptions, GpuSession};
use matformer::{ModelFile, Submodel};

/// Which engine to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// GPU if usable (self-check passes), else CPU, with the reason printed.
    Auto,
    /// GPU or an error.
    Gpu,
    /// The CPU engine.
    Cpu,
}

/// A loaded engine.
pub enum Engine {
    /// CPU engine.
    Cpu(CpuEngine),
    /// GPU engine (boxed: it holds the device, pipelines and shared weights).
    Gpu(Box<GpuEngine>),
}

impl Engine {
    /// Loads the engine for `choice`. Prints the decision on stderr unless `quiet`.
    pub fn load(model: &Arc<ModelFile>, choice: BackendChoice, threads: Option<usize>, quiet: bool) -> Result<Engine> {
        let cpu = || -> Result<Engine> {
            let e = CpuEngine::new(model.clone())?;
            Ok(Engine::Cpu(match threads {
                Some(n) => e.with_threads(n),
                None => e,
            }))
        };
        match choice {
            BackendChoice::Cpu => cpu(),
            BackendChoice::Gpu => {
                let g = GpuEngine::new(model.clone(), gpu_options()?)
                    .map_err(|e| anyhow::anyhow!("--backend gpu: no usable GPU: {e}"))?;
                if !quiet {
                    eprintln!("backend: gpu ({}, {})", g.adapter().name, g.adapter().backend);
                }
                Ok(Engine::Gpu(Box::new(g)))
            }
            BackendChoice::Auto => {
                // A software adapter (lavapipe, SwiftShader) runs on the same cores as the CPU
                // engine, only slower: `auto` takes it only when asked for by `--backend gpu`.
                let software: Vec<String> = matformer::gpu::list_adapters()
                    .into_iter()
                    .filter(|a| a.device_type.eq_ignore_ascii_case("cpu"))
                    .map(|a| a.name)
                    .collect();
                let hardware_exists = matformer::gpu::list_adapters().len() > software.len();
                if !hardware_exists && !software.is_empty() {
                    if !quiet {
                        eprintln!(
                            "backend: cpu (only a software GPU adapter was found: {}; use --backend gpu to run on it)",
                            software.join(", ")
                        );
                    }
                    return cpu();
                }
                let gpu = GpuEngine::new(model.clone(), gpu_options()?).and_then(|g| g.self_check().map(|()| g));
                match gpu {
                    Ok(g) => {
                        if !quiet {
                            eprintln!(
                                "backend: gpu ({}, {}; self-check passed)",
                                g.adapter().name,
                                g.adapter().backend
                            );
                        }
                        Ok(Engine::Gpu(Box::new(g)))
                    }
                    Err(e) => {
                        if !quiet {
                            eprintln!("backend: cpu (GPU not used: {e})");
                        }
                        cpu()
                    }
                }
            }
        }
    }

    /// `cpu` or `gpu`.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Cpu(_) => "cpu",
            Engine::Gpu(_) => "gpu",
        }
    }

    /// A generation session for `sub`. On the GPU, when `sub` does not fit in GPU memory,
    /// every layer steps one level down until it does (a note on stderr names what runs).
    pub fn session(&self, sub: &Submodel) -> Result<Generator> {
        Ok(match self {
            Engine::Cpu(e) => Generator::Cpu(e.session(sub)?),
            Engine::Gpu(e) => {
                let (s, ran, oom) = step_down_on_oom(e.model(), sub, |t| e.session(t))?;
                if let Some(err) = oom {
                    let meta = e.model().metadata();
                    eprintln!("note: {} does not fit: {err}; running {}", sub.name(meta), ran.name(meta));
                }
                Generator::Gpu(Box::new(s))
            }
        })
    }
}

/// GPU options from the environment (`MATFORMER_GPU_MEMORY_LIMIT`).
fn gpu_options() -> Result<GpuOptions> {
    let mut o = GpuOptions::default();
    if let Ok(v) = std::env::var("MATFORMER_GPU_MEMORY_LIMIT") {
        o.memory_limit_bytes =
            Some(crate::select::parse_bytes(&v).map_err(|e| anyhow::anyhow!("MATFORMER_GPU_MEMORY_LIMIT={v:?}: {e}"))?);
    }
    Ok(o)
}

/// A session on either backend, greedy decoding only.
pub enum Generator {
    /// CPU session.
    Cpu(Session),
    /// GPU session.
    Gpu(Box<GpuSession>),
}

impl Generator {
    /// The submodel the session runs (smaller than asked after a GPU out-of-memory step-down).
    pub fn submodel(&self) -> &Submodel {
        match self {
            Generator::Cpu(s) => s.submodel(),
            Generator::Gpu(s) => s.submodel(),
        }
    }

    /// Prefills `tokens`; returns the greedy next token.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<u32> {
        if tokens.is_empty() {
            bail!("the prompt is empty");
        }
        Ok(match self {
            Generator::Cpu(s) => argmax(&s.prefill(tokens)?),
            Generator::Gpu(s) => s.prefill(tokens)?,
        })
    }

    /// Appends `token`; returns the greedy next token.
    pub fn decode(&mut self, token: u32) -> Result<u32> {
        Ok(match self {
            Generator::Cpu(s) => argmax(&s.decode(token)?),
            Generator::Gpu(s) => s.decode(token)?,
        })
    }

    /// Clears the cache.
    pub fn reset(&mut self) {
        match self {
            Generator::Cpu(s) => s.reset(),
            Generator::Gpu(s) => s.reset(),
        }
    }

    /// Submits and readbacks so far (GPU), for the benchmark.
    pub fn gpu_counters(&self) -> Option<(u64, u64, u64)> {
        match self {
            Generator::Cpu(_) => None,
            Generator::Gpu(s) => {
                let c = s.counters();
                Some((c.submits, c.readbacks, c.readback_bytes))
            }
        }
    }

    /// Resets the GPU step counters.
    pub fn reset_counters(&mut self) {
        if let Generator::Gpu(s) = self {
            s.reset_counters();
        }
    }
}
