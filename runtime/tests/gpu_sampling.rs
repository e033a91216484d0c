//! Sampling on the GPU: the device's candidates (`topk.wgsl`: penalties in place, top-k, the
//! log-sum-exp) against the same computation on the logits it leaves behind, its penalties
//! against the CPU engine's logits, ties, one submit and one small readback per step, bad
//! arguments, and a seeded sampler picking the same tokens from GPU candidates as from CPU
//! logits on the bundled model.
//!
//! No adapter: the tests print "skipping: no GPU adapter (...)" and pass, except in CI
//! (`CI=true`), where they fail.
#![cfg(feature = "gpu")]

mod gpu_common;

use std::sync::Arc;

use matformer::cpu::{CpuEngine, Tolerance};
use matformer::format::testing::{synthetic_file, synthetic_metadata};
use matformer::format::DType;
use matformer::gpu::{GpuEngine, GpuError, GpuOptions, GpuSession, WeightPath};
use matformer::sampling::{Candidates, LogitTransform, Sampler, SamplingParams, MAX_CANDIDATES};
use matformer::{ModelFile, Submodel};

fn bundled() -> Arc<ModelFile> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/matlm.matf");
    Arc::new(ModelFile::open(&path).expect("open tests/fixtures/matlm.matf"))
}

/// A random model with a 3001-token vocabulary (more logits than the shader's 256 invocations
/// and not a multiple of it).
fn wide_vocab() -> Arc<ModelFile> {
    let meta = synthetic_metadata(32, 2, 2, 1, 16, 3001, vec![vec![16, 48]], true, false);
    Arc::new(ModelFile::from_bytes(synthetic_file(&meta, DType::F16, 11).expect("synthetic")).expect("valid model"))
}

fn engine_or_skip(model: &Arc<ModelFile>) -> Option<GpuEngine> {
    gpu_common::or_skip(GpuEngine::new(Arc::clone(model), GpuOptions::default()), "GPU engine")
}

fn largest(model: &ModelFile) -> Submodel {
    Submodel::largest(model.metadata(), model.view().available_levels)
}

fn prompt() -> Vec<u32> {
    b"Once upon a time".iter().map(|&b| u32::from(b)).collect()
}

/// The top `k` of `processed` (NaN as -inf, ties to the lowest id) in id order, and the
/// log-sum-exp of `v / temperature` in f64: what the shader must return.
fn reference(processed: &[f32], k: usize, temperature: f32) -> (Vec<(u32, f32)>, f64) {
    let mut all: Vec<(u32, f32)> = processed
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, if v.is_nan() { f32::NEG_INFINITY } else { v }))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let t = temperature as f64;
    let m = all[0].1 as f64 / t;
    let lse = m + all.iter().map(|&(_, v)| (v as f64 / t - m).exp()).sum::<f64>().ln();
    all.truncate(k.min(processed.len()));
    all.sort_by_key(|c| c.0);
    (all, lse)
}

/// The candidates equal the reference computed on the logits the same pass left behind.
fn check_exact(s: &mut GpuSession, c: &Candidates, k: usize, temperature: f32, what: &str) {
    let processed = s.processed_logits().expect("read processed logits");
    let (want, lse) = reference(&processed, k, temperature);
    let mut got = c.pairs.clone();
    got.sort_by_key(|p| p.0);
    assert_eq!(got.len(), want.len(), "{what}: candidate count");
    for (g, w) in got.iter().zip(&want) {
        assert!(g.0 == w.0 && g.1.to_bits() == w.1.to_bits(), "{what}: got {got:?}\nwant {want:?}");
    }
    // f32 exp and a 256-way f32 sum on the device against f64 here: a few f32 roundoffs of
    // the log of a sum of at most a few thousand terms <= 1 each.
    let err = (c.log_sum_exp as f64 - lse).abs();
    assert!(err <= 1e-5 * lse.abs().max(1.0), "{what}: log-sum-exp {} vs {lse} (error {err:e})", c.log_sum_exp);
}

#[test]
fn candidates_are_the_exact_top_k_of_the_processed_logits() {
    for model in [bundled(), wide_vocab()] {
        let Some(gpu) = engine_or_skip(&model) else { return };
        let vocab = model.metadata().architecture.vocab_size as usize;
        let counts: Vec<(u32, u32)> = vec![(10, 1), (32, 3), (101, 2), (110, 1), (259, 4)];
        let penalised = LogitTransform {
            repetition_penalty: 1.3,
            frequency_penalty: 0.2,
            presence_penalty: 0.5,
            counts: &counts,
            temperature: 0.7,
        };
        let boosting = LogitTransform {
            repetition_penalty: 0.5,
            frequency_penalty: -0.3,
            presence_penalty: -1.0,
            counts: &counts,
            temperature: 1.6,
        };
        for (tr, name) in
            [(LogitTransform::IDENTITY, "identity"), (penalised, "penalties"), (boosting, "boosting penalties")]
        {
            for k in [1, 7, 64, 300, MAX_CANDIDATES] {
                let what = format!("vocab {vocab}, {name}, k {k}");
                let mut s = gpu.session(&largest(&model)).expect("session");
                let c = s.prefill_candidates(&prompt(), k, &tr).expect("prefill candidates");
                check_exact(&mut s, &c, k, tr.temperature, &format!("{what}, prefill"));
                let mut next = c.pairs.iter().max_by(|a, b| a.1.total_cmp(&b.1)).expect("a candidate").0;
                for step in 0..3 {
                    let c = s.decode_candidates(next, k, &tr).expect("decode candidates");
                    check_exact(&mut s, &c, k, tr.temperature, &format!("{what}, decode {step}"));
                    next = c.pairs[step % c.pairs.len()].0;
                }
            }
        }
    }
}

#[test]
fn device_penalties_match_the_cpu_engine() {
    let model = bundled();
    let Some(gpu) = engine_or_skip(&model) else { return };
    let sub = largest(&model);
    let tol = match WeightPath::parse(&gpu.adapter().weight_path) {
        Some(WeightPath::F16) => matformer::gpu::forward_tolerance(WeightPath::F16),
        _ => Tolerance::FORWARD_F32,
    };
    let counts: Vec<(u32, u32)> = prompt().iter().fold(Vec::new(), |mut acc: Vec<(u32, u32)>, &t| {
        match acc.binary_search_by_key(&t, |c| c.0) {
            Ok(i) => acc[i].1 += 1,
            Err(i) => acc.insert(i, (t, 1)),
        }
        acc
    });
    let tr = LogitTransform {
        repetition_penalty: 1.4,
        frequency_penalty: 0.3,
        presence_penalty: 0.6,
        counts: &counts,
        temperature: 0.9,
    };
    let cpu = CpuEngine::new(Arc::clone(&model)).expect("cpu engine");
    let mut want = cpu.session(&sub).expect("cpu session").prefill(&prompt()).expect("cpu prefill");
    for &(t, c) in &counts {
        want[t as usize] = tr.penalize(want[t as usize], c);
    }
    let mut s = gpu.session(&sub).expect("session");
    let _ = s.prefill_candidates(&prompt(), 16, &tr).expect("candidates");
    let got = s.processed_logits().expect("processed logits");
    if let Err(m) = tol.check(&want, &got) {
        panic!("penalised logits, GPU vs CPU: {m}");
    }
}

#[test]
fn ties_go_to_the_lowest_ids() {
    let model = wide_vocab();
    let Some(gpu) = engine_or_skip(&model) else { return };
    // A presence penalty of 1e30 sends every listed token to exactly -1e30 (its logit is far
    // below 1e30's rounding unit): 2990 tied values, of which the top 10 keep the lowest ids.
    let free = [5u32, 700, 2999];
    let counts: Vec<(u32, u32)> = (0..3001u32).filter(|t| !free.contains(t)).map(|t| (t, 1)).collect();
    let tr = LogitTransform { presence_penalty: 1e30, counts: &counts, ..LogitTransform::IDENTITY };
    let mut s = gpu.session(&largest(&model)).expect("session");
    let c = s.prefill_candidates(&prompt(), 10, &tr).expect("candidates");
    let mut ids: Vec<u32> = c.pairs.iter().map(|p| p.0).collect();
    ids.sort_unstable();
    assert_eq!(ids, [0, 1, 2, 3, 4, 5, 6, 7, 700, 2999], "{c:?}");
    assert!(c.pairs.iter().filter(|p| !free.contains(&p.0)).all(|p| p.1 == -1e30));
    check_exact(&mut s, &c, 10, 1.0, "ties");
}

#[test]
fn a_candidate_step_is_one_submit_and_one_small_readback() {
    let model = bundled();
    let Some(gpu) = engine_or_skip(&model) else { return };
    let mut s = gpu.session(&largest(&model)).expect("session");
    let first = s.prefill(&prompt()).expect("prefill");
    let before = s.counters();
    let k = 40;
    let c = s.decode_candidates(first, k, &LogitTransform::IDENTITY).expect("decode candidates");
    let after = s.counters();
    assert_eq!(after.submits - before.submits, 1, "{after:?}");
    assert_eq!(after.readbacks - before.readbacks, 1, "{after:?}");
    assert_eq!(after.readback_bytes - before.readback_bytes, (2 * k as u64 + 1) * 4, "{after:?}");
    assert_eq!(c.pairs.len(), k);
    // The argmax path is unchanged: 4 bytes.
    let before = s.counters();
    s.decode(c.pairs[0].0).expect("decode");
    assert_eq!(s.counters().readback_bytes - before.readback_bytes, 4);
}

#[test]
fn bad_candidate_arguments_are_errors_and_leave_the_session_usable() {
    let model = bundled();
    let Some(gpu) = engine_or_skip(&model) else { return };
    let mut s = gpu.session(&largest(&model)).expect("session");
    let id = LogitTransform::IDENTITY;
    let invalid = |r: Result<Candidates, GpuError>, what: &str| match r {
        Err(GpuError::InvalidArgument { what: m }) => assert!(!m.contains('\n'), "{m}"),
        other => panic!("{what}: expected InvalidArgument, got {other:?}"),
    };
    invalid(s.prefill_candidates(&prompt(), 0, &id), "k 0");
    invalid(s.prefill_candidates(&prompt(), MAX_CANDIDATES + 1, &id), "k too large");
    invalid(s.prefill_candidates(&prompt(), 4, &LogitTransform { temperature: 0.0, ..id }), "temperature 0");
    invalid(s.prefill_candidates(&prompt(), 4, &LogitTransform { repetition_penalty: f32::NAN, ..id }), "rp NaN");
    invalid(s.prefill_candidates(&prompt(), 4, &LogitTransform { counts: &[(3, 1), (2, 1)], ..id }), "unsorted");
    invalid(s.prefill_candidates(&prompt(), 4, &LogitTransform { counts: &[(3, 0)], ..id }), "count 0");
    match s.prefill_candidates(&prompt(), 4, &LogitTransform { counts: &[(100_000, 1)], ..id }) {
        Err(GpuError::TokenOutOfRange { token: 100_000, .. }) => {}
        other => panic!("expected TokenOutOfRange, got {other:?}"),
    }
    assert!(matches!(s.prefill_candidates(&[], 4, &id), Err(GpuError::EmptyInput { .. })));
    assert!(matches!(s.decode_candidates(9999, 4, &id), Err(GpuError::TokenOutOfRange { .. })));
    assert_eq!(s.position(), 0, "a rejected call must not advance the session");
    let c = s.prefill_candidates(&prompt(), 4, &id).expect("still usable");
    assert_eq!(c.pairs.len(), 4);
    assert_eq!(s.position(), prompt().len());
}

/// Generates `n` tokens on the CPU engine (full logits) and on the GPU (candidates) with the
/// same seed.
fn both_ways(model: &Arc<ModelFile>, gpu: &GpuEngine, p: SamplingParams, n: usize) -> (Vec<u32>, Vec<u32>, u64) {
    let sub = largest(model);
    let cpu = CpuEngine::new(Arc::clone(model)).expect("cpu engine");
    let mut cs = cpu.session(&sub).expect("cpu session");
    let mut sampler = Sampler::new(p).expect("valid params");
    sampler.observe_all(&prompt());
    let mut tok = sampler.sample_logits(&cs.prefill(&prompt()).expect("cpu prefill"));
    let mut on_cpu = vec![tok];
    for _ in 1..n {
        sampler.observe(tok);
        tok = sampler.sample_logits(&cs.decode(tok).expect("cpu decode"));
        on_cpu.push(tok);
    }
    let mut gs = gpu.session(&sub).expect("gpu session");
    let mut sampler = Sampler::new(p).expect("valid params");
    sampler.observe_all(&prompt());
    let mut tok = gs.prefill_sample(&prompt(), &mut sampler).expect("gpu prefill");
    let mut on_gpu = vec![tok];
    let before = gs.counters().readback_bytes;
    for _ in 1..n {
        sampler.observe(tok);
        tok = gs.decode_sample(tok, &mut sampler).expect("gpu decode");
        on_gpu.push(tok);
    }
    (on_cpu, on_gpu, (gs.counters().readback_bytes - before) / (n as u64 - 1))
}

#[test]
fn a_seed_gives_the_same_tokens_on_cpu_and_gpu() {
    let model = bundled();
    let Some(gpu) = engine_or_skip(&model) else { return };
    let base = SamplingParams { temperature: 1.0, seed: Some(2024), ..SamplingParams::default() };
    for p in [
        base,
        SamplingParams { temperature: 0.8, top_p: 0.9, ..base },
        SamplingParams { top_k: 20, temperature: 1.2, ..base },
        SamplingParams { min_p: 0.05, ..base },
        SamplingParams { repetition_penalty: 1.3, frequency_penalty: 0.2, presence_penalty: 0.1, top_p: 0.95, ..base },
        SamplingParams { temperature: 0.0, repetition_penalty: 1.5, ..base },
        SamplingParams { temperature: 0.0, ..base },
    ] {
        let (cpu, gpu_tokens, bytes) = both_ways(&model, &gpu, p, 48);
        println!("{p:?}: {bytes} bytes read back per decode step on average");
        assert_eq!(cpu, gpu_tokens, "{p:?}");
    }
}

/// Per-step time and readback of greedy argmax decoding against candidate decoding (not a
/// test of speed; run with `--ignored --nocapture`). Uses `/var/tmp/llama1b.matf` too when it
/// exists (`matformer synth --preset llama-3.2-1b -o /var/tmp/llama1b.matf`).
#[test]
#[ignore]
fn candidate_decode_cost() {
    let mut files = vec![bundled()];
    let big = std::path::Path::new("/var/tmp/llama1b.matf");
    if big.exists() {
        files.push(Arc::new(ModelFile::open(big).expect("open llama1b.matf")));
    }
    for model in files {
        let Some(gpu) = engine_or_skip(&model) else { return };
        let sub = largest(&model);
        let steps = if model.metadata().architecture.vocab_size > 1000 { 16 } else { 128 };
        let vocab = model.metadata().architecture.vocab_size;
        let mut rows = Vec::new();
        for k in [0usize, 1, 40, 256] {
            let mut s = gpu.session(&sub).expect("session");
            let mut tok = s.prefill(&prompt()).expect("prefill");
            // Warm-up (pipeline creation).
            if k > 0 {
                tok = s.decode_candidates(tok, k, &LogitTransform::IDENTITY).expect("warm-up").pairs[0].0;
            } else {
                tok = s.decode(tok).expect("warm-up");
            }
            let before = s.counters();
            let t0 = std::time::Instant::now();
            for _ in 0..steps {
                tok = if k == 0 {
                    s.decode(tok).expect("decode")
                } else {
                    s.decode_candidates(tok, k, &LogitTransform::IDENTITY).expect("decode").pairs[0].0
                };
            }
            let ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
            let bytes = (s.counters().readback_bytes - before.readback_bytes) / steps as u64;
            rows.push((k, ms, bytes));
        }
        // The full-logits readback the candidates replace.
        let mut s = gpu.session(&sub).expect("session");
        let tok = s.prefill(&prompt()).expect("prefill");
        let t0 = std::time::Instant::now();
        let before = s.counters();
        for _ in 0..steps {
            s.decode_logits(tok).expect("decode logits");
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
        let bytes = (s.counters().readback_bytes - before.readback_bytes) / steps as u64;
        println!("vocab {vocab}, {} on {}:", sub.name(model.metadata()), gpu.adapter().name);
        for (k, ms, bytes) in rows {
            let what = if k == 0 { "argmax".to_string() } else { format!("candidates k={k}") };
            println!("  {what:<16} {ms:8.3} ms/step  {bytes:7} bytes/step");
        }
        println!("  {:<16} {ms:8.3} ms/step  {bytes:7} bytes/step", "full logits");
    }
}
