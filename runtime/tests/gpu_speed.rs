//! Decode speed of the GPU engine against the CPU engine, and the GPU work per decode step
//! (submits, readbacks, dispatches). Ignored by default.
//!
//! ```text
//! cargo test -p matformer --test gpu_speed -- --ignored --nocapture
//! MATF_GPU_BENCH_FILE=model.matf cargo test -p matformer --test gpu_speed -- --ignored --nocapture
//! ```
//! Without `MATF_GPU_BENCH_FILE` it runs a ~40M-parameter synthetic model built in memory
//! (d_model 512, 8 layers, 8 heads / 2 KV heads of 64, FFN 2048 nested as 256/512/1024/2048,
//! vocab 32000, f16). Reports ratios measured in one run; asserts nothing about speed.
#![cfg(feature = "gpu")]

use std::sync::Arc;
use std::time::Instant;

use matformer::cpu::{argmax, CpuEngine};
use matformer::format::testing::{synthetic_file, synthetic_metadata};
use matformer::format::DType;
use matformer::gpu::{GpuEngine, GpuError, GpuOptions};
use matformer::{ModelFile, Submodel};

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn gpu_vs_cpu_decode_speed() {
    let model = match std::env::var_os("MATF_GPU_BENCH_FILE") {
        Some(p) => Arc::new(ModelFile::open(p).expect("open bench model")),
        None => {
            let mut meta = synthetic_metadata(512, 8, 8, 2, 64, 32_000, vec![vec![256, 512, 1024, 2048]], true, false);
            meta.architecture.max_context = 512;
            Arc::new(ModelFile::from_bytes(synthetic_file(&meta, DType::F16, 5).expect("synth")).expect("model"))
        }
    };
    let gpu = match GpuEngine::new(Arc::clone(&model), GpuOptions::default()) {
        Ok(g) => g,
        Err(GpuError::NoAdapter { reason }) => {
            println!("skipping: no GPU adapter ({reason})");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let cpu = CpuEngine::new(Arc::clone(&model)).expect("cpu engine");
    let meta = model.metadata();
    let n_levels = model.view().available_levels;
    println!("adapter: {} ({}, {})", gpu.adapter().name, gpu.adapter().backend, gpu.adapter().device_type);
    let probe = matformer::gpu::OpRunner::new(None).expect("op runner");
    let bw = probe.gemv_read_bandwidth(4096, 4096, 8).expect("calibration");
    println!(
        "decode GEMV kernel reads weights at {bw:.2} GB/s ({} weight path: {}; 4096 x 4096 f16)",
        probe.weight_path(),
        probe.adapter().weight_path_reason
    );
    let prompt: Vec<u32> = (0..32u32).map(|i| (i * 31 + 7) % 256).collect();
    let steps = 32usize;
    for level in 0..n_levels {
        let sub = Submodel::uniform(level as u8, meta.architecture.n_layers as usize);
        let name = sub.name(meta);

        let mut cs = cpu.session(&sub).expect("cpu session");
        let mut tok = argmax(&cs.prefill(&prompt).expect("cpu prefill"));
        let t = Instant::now();
        for _ in 0..steps {
            tok = argmax(&cs.decode(tok).expect("cpu decode"));
        }
        let cpu_tps = steps as f64 / t.elapsed().as_secs_f64();

        let mut gs = gpu.session(&sub).expect("gpu session");
        let t = Instant::now();
        let mut gtok = gs.prefill(&prompt).expect("gpu prefill");
        let prefill_s = t.elapsed().as_secs_f64();
        gs.decode(gtok).expect("warm-up");
        gs.reset_counters();
        let t = Instant::now();
        for _ in 0..steps {
            gtok = gs.decode(gtok).expect("gpu decode");
        }
        let gpu_tps = steps as f64 / t.elapsed().as_secs_f64();
        let c = gs.counters();
        println!(
            "{name:>4}: decode CPU {cpu_tps:7.1} tok/s, GPU {gpu_tps:7.1} tok/s (GPU/CPU {:.2}); GPU prefill {} tokens {:.1} tok/s; per decode step: {} submit(s), {} readback(s) of {} bytes, {} dispatches",
            gpu_tps / cpu_tps,
            prompt.len(),
            prompt.len() as f64 / prefill_s,
            c.submits as f64 / steps as f64,
            c.readbacks as f64 / steps as f64,
            c.readback_bytes / steps as u64,
            c.dispatches / steps as u64,
        );
    }
}
