//! Switching submodels on the GPU ([`ElasticSession::new_gpu`]): the output after a down- or
//! upshift matches the CPU engine running the target submodel, a downshift uploads nothing, an
//! upshift uploads exactly the missing FFN rows, an allocation failure downshifts and retries,
//! and memory pressure frees the GPU buffers beyond the new prefixes.
//!
//! No adapter: the tests print "skipping: no GPU adapter (...)" and pass, except in CI
//! (`CI=true`), where they fail.
#![cfg(feature = "gpu")]

mod gpu_common;

use std::sync::Arc;

use matformer::cpu::{self, CpuEngine, Tolerance};
use matformer::elastic::{ElasticError, ElasticSession, MemoryPressure, SwitchDirection};
use matformer::format::testing::{synthetic_file, synthetic_metadata};
use matformer::format::{DType, Metadata};
use matformer::gpu::{GpuEngine, GpuError, GpuOptions};
use matformer::{ModelFile, Submodel};

/// d_model 36 (rows padded to 40 on the GPU), 3 query heads over 1 KV head of 10, vocab 300,
/// 3 layers, gated FFN widths 20/44/70/100.
fn meta() -> Metadata {
    synthetic_metadata(36, 3, 3, 1, 10, 300, vec![vec![20, 44, 70, 100]], true, false)
}

/// GPU bytes of one FFN row of every tensor of a layer (up, gate, down; f16, padded to 40).
const FFN_ROW_BYTES: u64 = 3 * 40 * 2;

fn model() -> Arc<ModelFile> {
    Arc::new(ModelFile::from_bytes(synthetic_file(&meta(), DType::F16, 21).expect("model bytes")).expect("model"))
}

fn engine_or_skip(model: &Arc<ModelFile>, opts: GpuOptions) -> Option<GpuEngine> {
    gpu_common::or_skip(GpuEngine::new(Arc::clone(model), opts), "GPU engine")
}

fn sub(model: &ModelFile, spec: &str) -> Submodel {
    Submodel::parse(spec, model.metadata(), model.view().available_levels).expect("submodel")
}

fn prompt() -> Vec<u32> {
    (0..11u32).map(|i| (i * 37 + 11) % 300).collect()
}

/// The CPU engine's logits for the last of `history` and its greedy continuation of `n`.
fn cpu_reference(model: &Arc<ModelFile>, submodel: &Submodel, history: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    let cpu = CpuEngine::new(Arc::clone(model)).expect("cpu engine");
    let mut s = cpu.session(submodel).expect("cpu session");
    let logits = s.prefill(history).expect("cpu prefill");
    let mut toks = Vec::new();
    let mut next = cpu::argmax(&logits);
    for _ in 0..n {
        toks.push(next);
        next = cpu::argmax(&s.decode(next).expect("cpu decode"));
    }
    (logits, toks)
}

/// Greedy tokens from the session: `first`, then `n - 1` decodes.
fn continue_greedy(es: &mut ElasticSession, first: u32, n: usize) -> Vec<u32> {
    let mut toks = vec![first];
    while toks.len() < n {
        let next = es.decode_greedy(*toks.last().expect("token")).expect("gpu decode");
        toks.push(next);
    }
    toks
}

/// Switches `es` to `to`, then checks the logits right after the switch and the next tokens
/// against the CPU engine running `to` on the same history. Returns the report's uploaded bytes.
fn switch_and_check(model: &Arc<ModelFile>, es: &mut ElasticSession, to: &str, direction: SwitchDirection) -> u64 {
    let target = sub(model, to);
    let history = es.history().to_vec();
    let report = es.switch_to(&target).expect("switch");
    assert_eq!(report.direction, direction, "{report:?}");
    assert_eq!(report.reprefilled_tokens, history.len());
    assert!(report.fallback.is_none());
    assert_eq!(es.submodel(), &target);
    assert_eq!(es.position(), history.len());
    let (expected, expected_toks) = cpu_reference(model, &target, &history, 5);
    let got = report.last_logits.clone().expect("logits after the switch");
    if let Err(m) = Tolerance::FORWARD_F32.check(&expected, &got) {
        panic!("after switching to {to}: GPU logits vs CPU: {m}");
    }
    let toks = continue_greedy(es, cpu::argmax(&got), 5);
    assert_eq!(toks, expected_toks, "greedy tokens after switching to {to}");
    report.uploaded_bytes
}

fn check_switching(opts: GpuOptions) {
    let model = model();
    let Some(engine) = engine_or_skip(&model, opts) else { return };
    let mut es = ElasticSession::new_gpu(engine, &sub(&model, "s")).expect("gpu elastic session");
    assert_eq!(es.backend_name(), "gpu");
    assert!(es.start_fallback().is_none());
    let first = es.prefill_greedy(&prompt()).expect("prefill");
    continue_greedy(&mut es, first, 4);
    let s_rows = 3 * 20 * FFN_ROW_BYTES;
    assert_eq!(es.gpu_engine().expect("gpu").ffn_resident_bytes(), s_rows);

    // Upshift s -> xl: exactly the rows 20..100 of every FFN tensor of every layer.
    let up = switch_and_check(&model, &mut es, "xl", SwitchDirection::Upshift);
    assert_eq!(up, 3 * (100 - 20) * FFN_ROW_BYTES);
    // Downshift xl -> m: nothing uploaded; back up to xl: the rows are still there.
    assert_eq!(switch_and_check(&model, &mut es, "m", SwitchDirection::Downshift), 0);
    assert_eq!(switch_and_check(&model, &mut es, "xl", SwitchDirection::Upshift), 0);
    // Mix'n'Match: still nothing to upload.
    let mixed = Submodel::new(vec![0, 3, 1]);
    let history = es.history().to_vec();
    let report = es.switch_to(&mixed).expect("switch to mix'n'match");
    assert_eq!((report.direction, report.uploaded_bytes), (SwitchDirection::Downshift, 0));
    let (expected, _) = cpu_reference(&model, &mixed, &history, 0);
    Tolerance::FORWARD_F32.check(&expected, report.last_logits.as_deref().expect("logits")).expect("mixed logits");
    assert_eq!(es.gpu_engine().expect("gpu").ffn_resident_bytes(), 3 * 100 * FFN_ROW_BYTES);
}

#[test]
fn gpu_switching_mid_generation_matches_the_cpu_engine_and_uploads_only_missing_rows() {
    check_switching(GpuOptions::default());
}

#[test]
fn gpu_switching_with_row_chunked_ffn_tensors() {
    // 3 rows of 80 bytes per chunk: every upload is split, and grown tensors mix chunk sizes.
    check_switching(GpuOptions { max_binding_bytes: Some(256), ..GpuOptions::default() });
}

/// GPU memory the engine uses with one session of `spec` (no limit).
fn memory_with(model: &Arc<ModelFile>, spec: &str) -> Option<u64> {
    let engine = engine_or_skip(model, GpuOptions::default())?;
    let _s = engine.session(&sub(model, spec)).expect("session");
    Some(engine.memory_in_use())
}

#[test]
fn gpu_allocation_failure_downshifts_and_retries() {
    let model = model();
    let Some(m_bytes) = memory_with(&model, "m") else { return };
    let xl_bytes = memory_with(&model, "xl").expect("xl");
    assert!(xl_bytes > m_bytes + 100, "{xl_bytes} vs {m_bytes}");
    // Room for m, not for l (which needs 26 more rows per tensor).
    let opts = GpuOptions { memory_limit_bytes: Some(m_bytes + 10), ..GpuOptions::default() };

    let engine = GpuEngine::new(Arc::clone(&model), opts.clone()).expect("engine");
    let mut es = ElasticSession::new_gpu(engine, &sub(&model, "xl")).expect("starts smaller instead of failing");
    assert_eq!(es.submodel(), &sub(&model, "m"));
    let why = es.start_fallback().expect("fallback reason");
    assert!(why.contains("xl asked") && why.contains("memory limit"), "{why}");
    let first = es.prefill_greedy(&prompt()).expect("prefill");
    let toks = continue_greedy(&mut es, first, 5);
    let (_, expected) = cpu_reference(&model, &sub(&model, "m"), &prompt(), 5);
    assert_eq!(toks, expected);

    // Switching down works; switching up again falls back to what fits (m), mid-generation.
    switch_and_check(&model, &mut es, "s", SwitchDirection::Downshift);
    let report = es.switch_to(&sub(&model, "xl")).expect("switch falls back");
    assert!(report.fallback.as_deref().is_some_and(|f| f.contains("xl asked")), "{report:?}");
    assert_eq!(es.submodel(), &sub(&model, "m"));
    assert_eq!(report.direction, SwitchDirection::Upshift);

    // Nothing fits: a clear error, not a panic.
    let tiny = GpuOptions { memory_limit_bytes: Some(m_bytes / 4), ..GpuOptions::default() };
    match GpuEngine::new(Arc::clone(&model), tiny) {
        Err(GpuError::OutOfMemory { .. }) => {}
        Ok(engine) => match ElasticSession::new_gpu(engine, &sub(&model, "xl")) {
            Err(ElasticError::Gpu(GpuError::OutOfMemory { reason, .. })) => {
                assert!(reason.contains("limit"), "{reason}")
            }
            other => panic!("expected OutOfMemory, got {other:?}"),
        },
        Err(e) => panic!("expected OutOfMemory, got {e}"),
    }
}

#[test]
fn gpu_memory_pressure_frees_the_ffn_rows_beyond_the_new_prefixes() {
    let model = model();
    let Some(engine) = engine_or_skip(&model, GpuOptions::default()) else { return };
    let mut es = ElasticSession::new_gpu(engine, &sub(&model, "xl")).expect("gpu elastic session");
    let first = es.prefill_greedy(&prompt()).expect("prefill");
    continue_greedy(&mut es, first, 3);
    let gpu = es.gpu_engine().expect("gpu");
    let (store_before, used_before) = (gpu.ffn_resident_bytes(), gpu.memory_in_use());
    assert_eq!(store_before, 3 * 100 * FFN_ROW_BYTES);

    let report = es.on_memory_pressure(MemoryPressure::Moderate).expect("moderate");
    assert_eq!(es.submodel(), &sub(&model, "l"));
    // The xl upload was one chunk per tensor: it is re-uploaded with rows 0..70 kept.
    assert_eq!(report.gpu_bytes_released, store_before);
    let gpu = es.gpu_engine().expect("gpu");
    assert_eq!(gpu.ffn_resident_bytes(), 3 * 70 * FFN_ROW_BYTES);
    assert_eq!(gpu.memory_in_use(), used_before - 3 * 30 * FFN_ROW_BYTES);

    let report = es.on_memory_pressure(MemoryPressure::Critical).expect("critical");
    assert_eq!(report.switch.direction, SwitchDirection::Downshift);
    assert_eq!(es.gpu_engine().expect("gpu").ffn_resident_bytes(), 3 * 20 * FFN_ROW_BYTES);
    // Generation continues exactly as the smallest submodel would.
    let history = es.history().to_vec();
    let (_, expected) = cpu_reference(&model, &sub(&model, "s"), &history, 4);
    let next = cpu::argmax(report.switch.last_logits.as_deref().expect("logits"));
    assert_eq!(continue_greedy(&mut es, next, 4), expected);
}

#[test]
fn gpu_refresh_picks_up_appended_levels_mid_generation() {
    let full = synthetic_file(&meta(), DType::F16, 21).expect("model bytes");
    let ends = ModelFile::from_bytes(full.clone()).expect("parse").view().level_ends.clone();
    let guard =
        TempPath(std::env::temp_dir().join(format!("matformer-elastic-gpu-refresh-{}.matf", std::process::id())));
    let path = guard.0.clone();
    std::fs::write(&path, &full[..ends[1] as usize]).expect("write cut file");
    let cut = Arc::new(ModelFile::open(&path).expect("open cut file"));
    assert_eq!(cut.view().available_levels, 2);
    let Some(engine) = engine_or_skip(&cut, GpuOptions::default()) else { return };
    let mut es = ElasticSession::new_gpu(engine, &sub(&cut, "m")).expect("gpu elastic session");
    let first = es.prefill_greedy(&prompt()).expect("prefill");
    let before = continue_greedy(&mut es, first, 3);

    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).expect("open for append");
        f.write_all(&full[ends[1] as usize..]).expect("append levels");
    }
    let report = es.refresh().expect("refresh");
    assert_eq!((report.levels_before, report.levels_after), (2, 4));
    assert_eq!(report.bytes_verified, full.len() as u64 - ends[1]);
    assert_eq!(es.backend_name(), "gpu");
    assert_eq!(es.submodel(), &sub(&cut, "m"));

    // The generation continues as m would on the same history, and xl is available now.
    let model = model();
    let history = es.history().to_vec();
    let (_, expected) = cpu_reference(&model, &sub(&model, "m"), &history, 3);
    let last = *before.last().expect("token");
    assert_eq!(continue_greedy(&mut es, last, 3), expected, "tokens after the refresh");
    switch_and_check(&model, &mut es, "xl", SwitchDirection::Upshift);
}

/// A file removed on drop (also when the test fails).
struct TempPath(std::path::PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
