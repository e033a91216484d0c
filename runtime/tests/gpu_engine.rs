//! The GPU engine against the CPU reference engine on small random models: logits of every
//! level and of a Mix'n'Match submodel within tolerance, identical greedy continuations, with
//! odd sizes (not multiples of the workgroup sizes), row-chunked tensors and chunked prefill.
//!
//! No adapter: the tests print "skipping: no GPU adapter (...)" and pass, except in CI
//! (`CI=true`), where they fail.
#![cfg(feature = "gpu")]

mod gpu_common;

use std::sync::Arc;

use matformer::cpu::{self, CpuEngine, Tolerance};
use matformer::format::testing::{synthetic_file, synthetic_metadata};
use matformer::format::{Activation, DType, Metadata, NormKind};
use matformer::gpu::{forward_tolerance, GpuEngine, GpuError, GpuOptions, WeightPath};
use matformer::{ModelFile, Submodel};

/// The engine, or `None` (after printing why) when there is no adapter outside CI.
fn engine_or_skip(model: &Arc<ModelFile>, opts: GpuOptions) -> Option<GpuEngine> {
    gpu_common::or_skip(GpuEngine::new(Arc::clone(model), opts), "GPU engine")
}

fn model(meta: &Metadata, dtype: DType, seed: u64) -> Arc<ModelFile> {
    Arc::new(ModelFile::from_bytes(synthetic_file(meta, dtype, seed).expect("synthetic model")).expect("valid model"))
}

/// d_model 36, 3 query heads over 1 kv head of 10, vocab 300, 3 layers, widths 20/44/70/100.
fn gated_meta() -> Metadata {
    synthetic_metadata(36, 3, 3, 1, 10, 300, vec![vec![20, 44, 70, 100]], true, false)
}

/// LayerNorm, GELU, plain FFN, tied embeddings, per-layer widths.
fn plain_meta() -> Metadata {
    let mut m = synthetic_metadata(40, 2, 4, 2, 8, 261, vec![vec![12, 33, 96], vec![8, 40, 72]], false, true);
    m.architecture.norm = NormKind::LayerNorm;
    m.architecture.activation = Activation::GeluTanh;
    m
}

fn prompt(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % vocab).collect()
}

/// The tier for a forward pass on `gpu`'s weight path: `f32_tol` (the packed path's f32
/// arithmetic), or on the native-f16 path its own tier ([`forward_tolerance`]).
fn path_tolerance(gpu: &GpuEngine, f32_tol: Tolerance) -> Tolerance {
    match WeightPath::parse(&gpu.adapter().weight_path) {
        Some(WeightPath::F16) => forward_tolerance(WeightPath::F16),
        _ => f32_tol,
    }
}

fn check_logits(model: &Arc<ModelFile>, gpu: &GpuEngine, sub: &Submodel, tokens: &[u32], tol: Tolerance) {
    let tol = path_tolerance(gpu, tol);
    let cpu = CpuEngine::new(Arc::clone(model)).expect("cpu engine");
    let expected = cpu.session(sub).expect("cpu session").forward_all(tokens).expect("cpu forward");
    let mut s = gpu.session(sub).expect("gpu session");
    let actual = s.forward_all(tokens).expect("gpu forward");
    if let Err(m) = tol.check(&expected, &actual) {
        panic!("submodel {:?}: GPU logits vs CPU: {m}", sub.levels);
    }
}

fn check_greedy(model: &Arc<ModelFile>, gpu: &GpuEngine, sub: &Submodel, prompt: &[u32], n: usize) {
    let cpu = CpuEngine::new(Arc::clone(model)).expect("cpu engine");
    let mut cs = cpu.session(sub).expect("cpu session");
    let expected = cpu::generate_greedy(&mut cs, prompt, n, None, |_| {}).expect("cpu generate");
    let mut s = gpu.session(sub).expect("gpu session");
    let mut got = vec![s.prefill(prompt).expect("gpu prefill")];
    while got.len() < n {
        let last = *got.last().expect("non-empty");
        got.push(s.decode(last).expect("gpu decode"));
    }
    assert_eq!(got, expected, "submodel {:?}: greedy continuation differs", sub.levels);
}

#[test]
fn gpu_matches_cpu_every_level_and_mix_n_match_f16() {
    let meta = gated_meta();
    let model = model(&meta, DType::F16, 7);
    let Some(gpu) = engine_or_skip(&model, GpuOptions::default()) else { return };
    let tokens = prompt(23, 300);
    for level in 0..4u8 {
        let sub = Submodel::uniform(level, 3);
        check_logits(&model, &gpu, &sub, &tokens, Tolerance::FORWARD_F32);
    }
    let mix = Submodel::parse("0,3,1", &meta, 4).expect("mix");
    check_logits(&model, &gpu, &mix, &tokens, Tolerance::FORWARD_F32);
    check_greedy(&model, &gpu, &mix, &tokens[..9], 12);
    check_greedy(&model, &gpu, &Submodel::uniform(3, 3), &tokens[..5], 12);
}

#[test]
fn gpu_matches_cpu_layernorm_gelu_tied_f32_chunked() {
    let meta = plain_meta();
    let model = model(&meta, DType::F32, 3);
    // Tiny bindings force every matrix into many row chunks; a small prefill chunk forces
    // several passes per prompt.
    // GEMV with 4 rows per workgroup: the GPU choice, exercised here on any adapter.
    let opts =
        GpuOptions { prefill_chunk: 5, max_binding_bytes: Some(2048), gemv_rows: Some(4), ..GpuOptions::default() };
    let Some(gpu) = engine_or_skip(&model, opts) else { return };
    let tokens = prompt(17, 261);
    for level in 0..3u8 {
        check_logits(&model, &gpu, &Submodel::uniform(level, 2), &tokens, Tolerance::FORWARD_F32);
    }
    let mix = Submodel::parse("2,0", &meta, 3).expect("mix");
    check_logits(&model, &gpu, &mix, &tokens, Tolerance::FORWARD_F32);
    check_greedy(&model, &gpu, &mix, &tokens[..7], 10);
}

#[test]
fn self_check_passes_and_bad_input_is_an_error_not_a_panic() {
    let meta = gated_meta();
    let model = model(&meta, DType::F16, 11);
    let opts = GpuOptions { max_context: Some(12), ..GpuOptions::default() };
    let Some(gpu) = engine_or_skip(&model, opts) else { return };
    gpu.self_check().expect("self-check");
    let mut s = gpu.session(&Submodel::uniform(1, 3)).expect("session");
    assert!(matches!(s.prefill(&[]), Err(GpuError::EmptyInput { .. })));
    assert!(matches!(s.decode(300), Err(GpuError::TokenOutOfRange { token: 300, vocab: 300 })));
    assert!(matches!(s.prefill(&[1; 13]), Err(GpuError::ContextFull { max: 12 })));
    assert_eq!(s.position(), 0, "a failed call leaves the session unchanged");
    s.prefill(&[1; 12]).expect("fills the context exactly");
    assert!(matches!(s.decode(1), Err(GpuError::ContextFull { max: 12 })));
    s.truncate(4);
    assert_eq!(s.position(), 4);
    s.decode(5).expect("decode after truncate");
    // A submodel the file does not have is rejected.
    assert!(matches!(gpu.session(&Submodel::uniform(4, 3)), Err(GpuError::Submodel(_))));
    assert!(matches!(gpu.session(&Submodel::uniform(0, 2)), Err(GpuError::Submodel(_))));
}

#[test]
fn decode_step_is_one_submit_and_one_4_byte_readback() {
    let meta = gated_meta();
    let model = model(&meta, DType::F16, 13);
    let Some(gpu) = engine_or_skip(&model, GpuOptions::default()) else { return };
    let mut s = gpu.session(&Submodel::uniform(2, 3)).expect("session");
    let mut tok = s.prefill(&prompt(6, 300)).expect("prefill");
    s.reset_counters();
    for _ in 0..5 {
        tok = s.decode(tok).expect("decode");
    }
    let c = s.counters();
    assert_eq!((c.passes, c.submits, c.readbacks, c.readback_bytes), (5, 5, 5, 20), "{c:?}");
    // Dispatches per decode step, pinned: the embedding gather (one chunk here); per layer the
    // attention block (norm, q/k/v as one stacked product, RoPE writing K and V into the cache,
    // attention, wo with the residual add) and the gated FFN block (norm, up, gate, activation,
    // down with the residual add, plus the reduction pass of the split down projection that CPU
    // adapters run off the native-f16 path); then the final norm, the LM head and the argmax.
    let split_down =
        gpu.adapter().device_type == "Cpu" && WeightPath::parse(&gpu.adapter().weight_path) != Some(WeightPath::F16);
    let layers = u64::from(meta.architecture.n_layers);
    let per_step = 1 + layers * (5 + 5 + u64::from(split_down)) + 3;
    assert_eq!(c.dispatches, 5 * per_step, "{c:?}: {per_step} dispatches per decode step expected");
}

/// The bundled trained model, when it has been exported (`tests/fixtures/matlm.matf`): GPU
/// logits of every level against the CPU engine.
#[test]
fn bundled_model_matches_cpu_when_present() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/matlm.matf");
    if !path.exists() {
        println!("skipping: {} not present", path.display());
        return;
    }
    let model = Arc::new(ModelFile::open(&path).expect("open matlm.matf"));
    let Some(gpu) = engine_or_skip(&model, GpuOptions::default()) else { return };
    let meta = model.metadata().clone();
    let n_layers = meta.architecture.n_layers as usize;
    let tokens: Vec<u32> = b"The cat sat on the mat.".iter().map(|&b| u32::from(b)).collect();
    for level in 0..model.view().available_levels {
        check_logits(&model, &gpu, &Submodel::uniform(level as u8, n_layers), &tokens, Tolerance::FORWARD_F32);
    }
    check_greedy(&model, &gpu, &Submodel::largest(&meta, model.view().available_levels), &tokens, 16);
}

/// The engine on every weight path the adapter runs (native f16 with `SHADER_F16`, packed64
/// with `SHADER_INT64`, packed), forced through [`GpuOptions::weight_path`]: logits of every
/// level and a Mix'n'Match submodel within the path's tier and identical greedy continuations,
/// on an f16 file (and an f32 file, which runs the packed kernels' f32 variant whatever the
/// path).
#[test]
fn gpu_matches_cpu_on_every_weight_path() {
    let Some(runner) = gpu_common::or_skip(matformer::gpu::OpRunner::new(None), "GPU op runner") else { return };
    let paths = runner.available_weight_paths();
    drop(runner);
    let meta = gated_meta();
    let model16 = model(&meta, DType::F16, 7);
    let plain = plain_meta();
    let model32 = model(&plain, DType::F32, 3);
    for path in paths {
        let forced = GpuOptions { weight_path: Some(path), ..GpuOptions::default() };
        let Some(gpu) = engine_or_skip(&model16, forced.clone()) else { return };
        assert_eq!(gpu.adapter().weight_path, path.name(), "{}", gpu.adapter().weight_path_reason);
        gpu.self_check().expect("self-check on the forced path");
        let tokens = prompt(23, 300);
        for level in 0..4u8 {
            check_logits(&model16, &gpu, &Submodel::uniform(level, 3), &tokens, Tolerance::FORWARD_F32);
        }
        let mix = Submodel::parse("0,3,1", &meta, 4).expect("mix");
        check_logits(&model16, &gpu, &mix, &tokens, Tolerance::FORWARD_F32);
        check_greedy(&model16, &gpu, &mix, &tokens[..9], 12);
        check_greedy(&model16, &gpu, &Submodel::uniform(3, 3), &tokens[..5], 12);
        let Some(gpu32) = engine_or_skip(&model32, forced) else { return };
        for level in 0..3u8 {
            check_logits(&model32, &gpu32, &Submodel::uniform(level, 2), &prompt(17, 261), Tolerance::FORWARD_F32);
        }
        println!("ran on the {path} path");
    }
}

/// Invalid tuning values are errors naming the value, never a silent default.
#[test]
fn invalid_gpu_tuning_is_an_error() {
    if gpu_common::or_skip(matformer::gpu::OpRunner::new(None), "GPU op runner").is_none() {
        return;
    }
    let meta = plain_meta();
    let model32 = model(&meta, DType::F32, 3);
    for opts in [
        GpuOptions { gemv_rows: Some(3), ..GpuOptions::default() },
        GpuOptions { gemv_rows_per_thread: Some(3), ..GpuOptions::default() },
    ] {
        match GpuEngine::new(Arc::clone(&model32), opts.clone()) {
            Ok(_) => panic!("{opts:?} was accepted"),
            Err(e) => assert!(e.to_string().contains('3'), "{e}"),
        }
    }
}
