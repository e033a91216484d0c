//! Gemma 3n on the CPU engine against transformers' `Gemma3nForCausalLM` (float32): the tiny
//! random checkpoint of tests/fixtures/gemma3n_tiny_hf (made by
//! exporter/python/make_gemma3n_fixture.py) imported with `matformer import`, and its goldens:
//! logits of every prompt position and 8 greedy tokens for the full model, an E2B-style slice
//! (layers 6 and 7 skipped inside the KV-sharing range, every FFN at half width), a MatFormer
//! Lab-style slice (layer 2 skipped, mixed widths) and a Mix'n'Match width pattern. The slices'
//! references are new transformers models built by MatFormer Lab's slicing of the PyTorch
//! weights (the script says how); here the same slices run on the one imported file.

use std::path::PathBuf;
use std::sync::Arc;

use matformer::cpu::CpuEngine;
use matformer::elastic::ElasticSession;
use matformer::format::DType;
use matformer::gpu::{GpuEngine, GpuError, GpuOptions, WeightPath};
use matformer::sampling::LogitTransform;
use matformer::{ModelFile, Submodel};
use matformer_export::verify::Tolerance;
use matformer_export::{import, ImportOptions};
use matformer_tests::temp_dir;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

#[derive(serde::Deserialize)]
struct Variant {
    name: String,
    layers_skipped: Vec<usize>,
    /// Per original layer; 0 for a skipped layer.
    ffn_widths: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Goldens {
    prompt_ids: Vec<u32>,
    variants: Vec<Variant>,
}

fn goldens() -> Goldens {
    serde_json::from_str(&std::fs::read_to_string(fixture("gemma3n_tiny_goldens.json")).unwrap()).unwrap()
}

/// The variant as a submodel of the imported file: a skipped layer is `-`, a kept one the
/// level whose width it uses.
fn submodel_of(v: &Variant, model: &ModelFile) -> Submodel {
    let meta = model.metadata();
    let spec: Vec<String> = (0..v.ffn_widths.len())
        .map(|i| {
            if v.layers_skipped.contains(&i) {
                "-".to_string()
            } else {
                let level = meta.ffn_widths[i].iter().position(|&w| w == v.ffn_widths[i]).expect("a level's width");
                level.to_string()
            }
        })
        .collect();
    Submodel::parse(&spec.join(","), meta, model.view().available_levels).unwrap()
}

fn imported(dtype: DType, tag: &str) -> (Arc<ModelFile>, PathBuf) {
    let dir = temp_dir(tag);
    let out = dir.join("gemma3n-tiny.matf");
    import(&ImportOptions { input: fixture("gemma3n_tiny_hf"), output: out.clone(), dtype: dtype.into(), nest: None })
        .unwrap();
    (Arc::new(ModelFile::open(&out).unwrap()), dir)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits of every prompt position and 8 greedy tokens decoded one at a time through the KV
/// cache (past the sliding window of 4), for each variant. The fixture's weights are
/// f16-representable, so an f16 file holds exactly the source weights and both dtypes meet
/// the f32 bound: what remains is f32 arithmetic in another order (`Tolerance::F32_STORAGE`,
/// relative to the largest reference logit).
fn check_parity(dtype: DType, tag: &str) {
    let g = goldens();
    let (model, dir) = imported(dtype, tag);
    let engine = CpuEngine::new(Arc::clone(&model)).unwrap();
    for v in &g.variants {
        let sub = submodel_of(v, &model);
        let ours = engine.session(&sub).unwrap().forward_all(&g.prompt_ids).unwrap();
        let reference: Vec<f32> = v.logits.iter().flatten().copied().collect();
        assert_eq!(ours.len(), reference.len(), "{}", v.name);
        let scale = reference.iter().fold(1f32, |m, x| m.max(x.abs()));
        let diff = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{dtype} {:<10} {}: max|diff| {diff:.2e} (scale {scale:.2})", v.name, sub.name(model.metadata()));
        assert!(diff <= Tolerance::F32_STORAGE.bound * scale, "{}: {diff}", v.name);

        let mut s = engine.session(&sub).unwrap();
        let mut next = argmax(&s.prefill(&g.prompt_ids).unwrap());
        let mut got = Vec::new();
        for _ in 0..v.greedy.len() {
            got.push(next);
            next = argmax(&s.decode(next).unwrap());
        }
        assert_eq!(got, v.greedy, "{}: greedy tokens", v.name);
        // Only the layers that own their K/V cache it (layers 6-9 read layers 4 and 5): the
        // global layer 4 every position, the sliding ones at least the window's (they keep
        // `window - 1 + slack` after a trim).
        let tokens = g.prompt_ids.len() + v.greedy.len() - 1;
        let keep = 3 + matformer::cpu::WINDOW_SLACK.min(4);
        let positions: usize =
            (0..6).filter(|i| !v.layers_skipped.contains(i)).map(|i| if i == 4 { tokens } else { keep }).sum();
        assert!(s.kv_cache_bytes() >= positions * 2 * 32 * 4, "{}", v.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gemma3n_f32_matches_transformers() {
    check_parity(DType::F32, "g3n-parity-f32");
}

#[test]
fn gemma3n_f16_matches_transformers() {
    check_parity(DType::F16, "g3n-parity-f16");
}

/// Mid-generation switches full -> E2B-style -> Lab-style -> full (exact re-prefill, no
/// reload): after each switch the greedy tokens are exactly those the target submodel alone
/// produces on the same history.
#[test]
fn gemma3n_switches_give_the_targets_tokens() {
    let g = goldens();
    let (model, dir) = imported(DType::F16, "g3n-switch");
    let by_name = |n: &str| submodel_of(g.variants.iter().find(|v| v.name == n).unwrap(), &model);
    let plan = [by_name("full"), by_name("e2b_style"), by_name("lab_style"), by_name("full")];
    let engine = CpuEngine::new(Arc::clone(&model)).unwrap();
    let mut es = ElasticSession::new(CpuEngine::new(Arc::clone(&model)).unwrap(), &plan[0]).unwrap();
    let mut next = argmax(&es.prefill(&g.prompt_ids).unwrap());
    assert_eq!(next, g.variants[0].greedy[0]);
    for (step, sub) in plan.iter().enumerate() {
        if step > 0 {
            let report = es.switch_to(sub).unwrap();
            // What the target alone says after the same tokens.
            let mut alone = engine.session(sub).unwrap();
            next = argmax(&alone.prefill(es.history()).unwrap());
            let mut expected = Vec::new();
            let mut e = next;
            for _ in 0..3 {
                expected.push(e);
                e = argmax(&alone.decode(e).unwrap());
            }
            let mut got = Vec::new();
            let logits = report.last_logits.expect("a switch re-prefills and keeps the last logits");
            assert_eq!(argmax(&logits), next, "the re-prefill's last logits");
            let mut t = next;
            for _ in 0..3 {
                got.push(t);
                t = argmax(&es.decode(t).unwrap());
            }
            assert_eq!(got, expected, "after switching to {}", sub.name(model.metadata()));
            next = t;
        } else {
            for _ in 0..3 {
                next = argmax(&es.decode(next).unwrap());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sliding-window layers' caches keep only the window (plus a little slack for rollbacks)
/// whatever the context, and that changes no result: token-by-token decoding past many trims
/// gives bitwise the logits of one batched pass over the whole sequence; a rollback within the
/// slack keeps the cache; one beyond it empties the CPU session, and `ElasticSession::truncate`
/// runs its history again, with the same logits after.
#[test]
fn gemma3n_sliding_window_cache_stays_bounded_and_exact() {
    let g = goldens();
    let (model, dir) = imported(DType::F32, "g3n-window");
    let full = submodel_of(&g.variants[0], &model);
    let meta = model.metadata();
    let (window, max_ctx) = (4usize, meta.architecture.max_context as usize);
    let kv_dim = (meta.architecture.n_kv_heads * meta.architecture.head_dim) as usize;
    let mut tokens = g.prompt_ids.clone();
    tokens.extend((0..72 - tokens.len()).map(|i| ((i * 37 + 11) % 300) as u32));
    assert!(tokens.len() <= max_ctx);
    let engine = CpuEngine::new(Arc::clone(&model)).unwrap();
    let vocab = engine.session(&full).unwrap().vocab_size();

    // The reference: one batched pass (nothing is trimmed inside a call).
    let all = engine.session(&full).unwrap().forward_all(&tokens).unwrap();
    let row = |i: usize| &all[i * vocab..(i + 1) * vocab];

    let np = g.prompt_ids.len();
    let mut s = engine.session(&full).unwrap();
    same_bits(row(np - 1), &s.prefill(&tokens[..np]).unwrap(), "prefill");
    for (i, &t) in tokens.iter().enumerate().skip(np) {
        let got = s.decode(t).unwrap();
        same_bits(row(i), &got, &format!("decode at position {i}"));
    }
    // Layers 0..6 own K/V (6.. share it); layer 4 is global, the other five slide. Unbounded,
    // the six would hold every position.
    let keep = window - 1 + matformer::cpu::WINDOW_SLACK.min(window);
    let bound = (tokens.len() + 5 * (2 * keep + np)) * kv_dim * 4 * 2;
    let unbounded = 6 * tokens.len() * kv_dim * 4 * 2;
    let held = s.kv_cache_bytes();
    assert!(held <= bound, "KV cache {held} bytes, bound {bound} (unbounded {unbounded})");
    assert!(held < unbounded * 6 / 10, "KV cache {held} bytes against {unbounded} unbounded");

    // Rolling back within the slack keeps the cache.
    let n = tokens.len();
    s.truncate(n - 2);
    assert_eq!(s.position(), n - 2);
    same_bits(row(n - 2), &s.decode(tokens[n - 2]).unwrap(), "after a rollback within the slack");
    // Beyond it, the CPU session empties...
    s.truncate(40);
    assert_eq!(s.position(), 0, "a cache trimmed past position 40's window cannot go back there");

    // ... and the elastic session runs its history again.
    let mut es = ElasticSession::new(CpuEngine::new(Arc::clone(&model)).unwrap(), &full).unwrap();
    es.prefill(&tokens[..np]).unwrap();
    for &t in &tokens[np..] {
        es.decode(t).unwrap();
    }
    es.truncate(40).unwrap();
    assert_eq!((es.position(), es.history().len()), (40, 40));
    same_bits(row(40), &es.decode(tokens[40]).unwrap(), "after the history ran again");
    let _ = std::fs::remove_dir_all(&dir);
}

fn same_bits(expected: &[f32], got: &[f32], what: &str) {
    assert_eq!(expected.len(), got.len(), "{what}");
    for (j, (a, b)) in expected.iter().zip(got).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: logit {j}: {b} against {a}");
    }
}

/// A prompt longer than one prefill chunk on a long-context Gemma 3n (the `gemma-3n-tiny`
/// synth preset: window 4, context 512): the sliding-window caches are trimmed between the
/// chunks and the logits are bitwise one token at a time's; a call cancelled in its second
/// chunk (after a trim) leaves the session exactly as it was, caches included.
#[test]
fn gemma3n_long_prefill_trims_between_chunks_and_a_cancel_restores_the_window() {
    use matformer_export::synth::{synth, SynthOptions};
    let dir = temp_dir("g3n-long");
    let path = dir.join("tiny.matf");
    synth(&SynthOptions { preset: "gemma-3n-tiny".into(), layers: None, dtype: DType::F32.into(), seed: 7 }, &path)
        .unwrap();
    let model = Arc::new(ModelFile::open(&path).unwrap());
    let sub = Submodel::parse("full", model.metadata(), model.view().available_levels)
        .or_else(|_| Submodel::parse("1", model.metadata(), model.view().available_levels))
        .unwrap();
    let engine = CpuEngine::new(Arc::clone(&model)).unwrap();
    let tokens: Vec<u32> = (0..340).map(|i| ((i * 53 + 7) % 300) as u32).collect();
    let vocab = engine.session(&sub).unwrap().vocab_size();

    // One token at a time: the reference.
    let mut one = engine.session(&sub).unwrap();
    let mut rows = Vec::new();
    for &t in &tokens {
        rows.push(one.decode(t).unwrap());
    }
    // 20 tokens, then 320 in one call (two chunks, trimmed in between).
    let mut s = engine.session(&sub).unwrap();
    s.prefill(&tokens[..20]).unwrap();
    let all = s.forward_all(&tokens[20..]).unwrap();
    for (i, r) in all.chunks_exact(vocab).enumerate() {
        same_bits(&rows[20 + i], r, &format!("batched position {}", 20 + i));
    }

    // Cancelled in the second chunk: the session is as it was.
    let mut s = engine.session(&sub).unwrap();
    s.prefill(&tokens[..20]).unwrap();
    let asked = std::sync::atomic::AtomicUsize::new(0);
    // Asked before each of the 10 layers of a chunk: true in the second chunk.
    let stop = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 15;
    let err = s.prefill_until(&tokens[20..], &stop).unwrap_err();
    assert!(matches!(err, matformer::cpu::EngineError::Interrupted), "{err}");
    assert_eq!(s.position(), 20);
    for (i, &t) in tokens.iter().enumerate().skip(20).take(12) {
        same_bits(&rows[i], &s.decode(t).unwrap(), &format!("after the cancel, position {i}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GPU engine on the test machine's adapter (lavapipe in CI and here): these tests never
/// skip, a missing adapter fails them.
fn gpu_engine(model: &Arc<ModelFile>) -> GpuEngine {
    let opts = GpuOptions { max_context: Some(64), ..GpuOptions::default() };
    GpuEngine::new(Arc::clone(model), opts)
        .unwrap_or_else(|e| panic!("GPU engine ({e}): install a Vulkan driver such as mesa-vulkan-drivers (lavapipe)"))
}

/// The bound of the GPU's logits against transformers' float32 ones, relative to the largest
/// reference logit: the CPU's `F32_STORAGE` on the packed and packed64 weight paths (every
/// product and sum in f32, only the order differs); on the native-f16 path (activations and
/// products rounded to f16, only where the adapter runs it faster) the f16 rounding tier.
fn gpu_reference_bound(engine: &GpuEngine) -> Tolerance {
    if engine.adapter().weight_path == WeightPath::F16.name() {
        Tolerance::F16_STORAGE
    } else {
        Tolerance::F32_STORAGE
    }
}

/// The CPU parity checks of `check_parity` on the GPU backend: every variant's logits against
/// transformers (the same bound as the CPU on the f32 weight paths) and against the CPU
/// engine (`gpu::forward_tolerance` of the weight path), its greedy tokens decoded through the
/// GPU KV cache (past the sliding window), and only the K/V-owning layers holding a cache.
fn check_gpu_parity(dtype: DType, tag: &str) {
    let g = goldens();
    let (model, dir) = imported(dtype, tag);
    let engine = gpu_engine(&model);
    let cpu = CpuEngine::new(Arc::clone(&model)).unwrap();
    let path = engine.adapter().weight_path.clone();
    let bound = gpu_reference_bound(&engine);
    let path_kind = WeightPath::parse(&path).unwrap();
    for v in &g.variants {
        let sub = submodel_of(v, &model);
        let ours = engine.session(&sub).unwrap().forward_all(&g.prompt_ids).unwrap();
        let reference: Vec<f32> = v.logits.iter().flatten().copied().collect();
        assert_eq!(ours.len(), reference.len(), "{}", v.name);
        let scale = reference.iter().fold(1f32, |m, x| m.max(x.abs()));
        let diff = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let on_cpu = cpu.session(&sub).unwrap().forward_all(&g.prompt_ids).unwrap();
        let diff_cpu = ours.iter().zip(&on_cpu).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!(
            "GPU ({path}) {dtype} {:<10} {}: max|diff| vs transformers {diff:.2e} (scale {scale:.2}), vs CPU {diff_cpu:.2e}",
            v.name,
            sub.name(model.metadata())
        );
        assert!(diff <= bound.bound * scale, "{}: {diff} against transformers ({})", v.name, bound.name);
        let vs_cpu = match path_kind {
            WeightPath::F16 => matformer::gpu::gemma3n_f16_tolerance(&on_cpu),
            p => matformer::gpu::forward_tolerance(p),
        };
        vs_cpu.check(&on_cpu, &ours).unwrap_or_else(|m| panic!("{}: GPU vs CPU: {m}", v.name));

        let mut s = engine.session(&sub).unwrap();
        let mut next = s.prefill(&g.prompt_ids).unwrap();
        let mut got = Vec::new();
        for _ in 0..v.greedy.len() {
            got.push(next);
            next = s.decode(next).unwrap();
        }
        assert_eq!(got, v.greedy, "{}: greedy tokens on the GPU", v.name);
        // The counters: one submit per decode step (the prompt fits one pass).
        assert_eq!(s.counters().submits, 1 + v.greedy.len() as u64, "{}", v.name);
        // KV caches only for the layers that own their K/V (layers 6-9 read layers 4 and 5).
        assert_eq!(s.kv_cache_bytes(), 6 * 2 * 64 * 32 * 4, "{}", v.name);

        // Sampling candidates come from the same soft-capped logits: the top one is the greedy
        // token, its logit the CPU's.
        let mut s = engine.session(&sub).unwrap();
        let c = s.prefill_candidates(&g.prompt_ids, 8, &LogitTransform::IDENTITY).unwrap();
        let (top, logit) = c.pairs.iter().copied().fold((0, f32::MIN), |a, b| if b.1 > a.1 { b } else { a });
        assert_eq!(top, v.greedy[0], "{}: top candidate", v.name);
        let cpu_last = &on_cpu[on_cpu.len() - 300..];
        vs_cpu.check(&[cpu_last[top as usize]], &[logit]).unwrap_or_else(|m| panic!("{}: top candidate: {m}", v.name));
        // A speculative round's drafts exist only on the device, where the per-layer
        // embedding rows are not: refused, with the session unchanged.
        let pos = s.position();
        assert!(matches!(s.speculate_greedy(top, &sub, 2, None), Err(GpuError::Unsupported { .. })));
        assert_eq!(s.position(), pos);
    }
    // The start-up self-check (what `BackendChoice::Auto` runs before taking a GPU) passes.
    engine.self_check().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gemma3n_gpu_f32_matches_transformers() {
    check_gpu_parity(DType::F32, "g3n-gpu-parity-f32");
}

#[test]
fn gemma3n_gpu_f16_matches_transformers() {
    check_gpu_parity(DType::F16, "g3n-gpu-parity-f16");
}

/// `gemma3n_switches_give_the_targets_tokens` on the GPU backend: one GPU session switched
/// full -> E2B-style -> Lab-style -> full (no reload, exact re-prefill); after each switch the
/// greedy tokens are those the target alone gives, on the GPU and on the CPU engine.
#[test]
fn gemma3n_gpu_switches_give_the_targets_tokens() {
    let g = goldens();
    let (model, dir) = imported(DType::F16, "g3n-gpu-switch");
    let by_name = |n: &str| submodel_of(g.variants.iter().find(|v| v.name == n).unwrap(), &model);
    let plan = [by_name("full"), by_name("e2b_style"), by_name("lab_style"), by_name("full")];
    let engine = gpu_engine(&model);
    let cpu = CpuEngine::new(Arc::clone(&model)).unwrap();
    let mut es = ElasticSession::new_gpu(gpu_engine(&model), &plan[0]).unwrap();
    let mut next = argmax(&es.prefill(&g.prompt_ids).unwrap());
    assert_eq!(next, g.variants[0].greedy[0]);
    for (step, sub) in plan.iter().enumerate() {
        if step > 0 {
            let report = es.switch_to(sub).unwrap();
            // What the target alone says after the same tokens, on the GPU and on the CPU.
            let mut alone = engine.session(sub).unwrap();
            let mut on_cpu = cpu.session(sub).unwrap();
            next = alone.prefill(es.history()).unwrap();
            assert_eq!(argmax(&on_cpu.prefill(es.history()).unwrap()), next, "CPU and GPU after the same history");
            let mut expected = Vec::new();
            let mut e = next;
            for _ in 0..3 {
                expected.push(e);
                let cpu_next = argmax(&on_cpu.decode(e).unwrap());
                e = alone.decode(e).unwrap();
                assert_eq!(e, cpu_next, "CPU and GPU decode of {}", sub.name(model.metadata()));
            }
            let logits = report.last_logits.expect("a switch re-prefills and keeps the last logits");
            assert_eq!(argmax(&logits), next, "the re-prefill's last logits");
            let mut got = Vec::new();
            let mut t = next;
            for _ in 0..3 {
                got.push(t);
                t = argmax(&es.decode(t).unwrap());
            }
            assert_eq!(got, expected, "after switching to {} on the GPU", sub.name(model.metadata()));
            next = t;
        } else {
            for _ in 0..3 {
                next = argmax(&es.decode(next).unwrap());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Keep-KV switches on the GPU follow the CPU engine's: full -> E2B-style keeps the cache
/// (E2B skips only K/V-sharing layers), E2B-style -> full keeps it (running a sharing layer
/// again reads its owner's entries), full -> Lab-style keeps it, and Lab-style -> full
/// re-prefills (layer 2 owns its K/V and wrote none while skipped). After each switch both
/// backends decode the same greedy tokens.
#[test]
fn gemma3n_gpu_keep_kv_switches_follow_the_cpu() {
    use matformer::elastic::SwitchMode;
    let g = goldens();
    let (model, dir) = imported(DType::F32, "g3n-gpu-keepkv");
    let by_name = |n: &str| submodel_of(g.variants.iter().find(|v| v.name == n).unwrap(), &model);
    let plan = [by_name("e2b_style"), by_name("full"), by_name("lab_style"), by_name("full")];
    let start = by_name("full");
    let mut gpu = ElasticSession::new_gpu(gpu_engine(&model), &start).unwrap();
    let mut cpu = ElasticSession::new(CpuEngine::new(Arc::clone(&model)).unwrap(), &start).unwrap();
    let mut next = argmax(&gpu.prefill(&g.prompt_ids).unwrap());
    assert_eq!(argmax(&cpu.prefill(&g.prompt_ids).unwrap()), next);
    // A GPU session refuses a keep-KV switch that runs again a skipped layer owning its K/V.
    let mut lab = gpu_engine(&model).session(&by_name("lab_style")).unwrap();
    lab.prefill(&g.prompt_ids).unwrap();
    assert!(matches!(lab.switch_keep_cache(&start), Err(GpuError::InvalidArgument { .. })));
    assert_eq!(lab.position(), g.prompt_ids.len());
    assert!(lab.switch_keep_cache(&by_name("e2b_style")).is_err(), "e2b_style runs layer 2 again");
    // No fused speculative round on a Gemma 3n file: the caller's unfused path runs instead.
    assert!(gpu.speculate_greedy_gpu(next, &plan[0], 2, None).is_none());
    assert!(gpu.gpu_session().is_some_and(|s| !s.can_speculate()));
    for (sub, reprefills) in plan.iter().zip([false, false, false, true]) {
        let rg = gpu.switch_with(sub, SwitchMode::KeepKv).unwrap();
        let rc = cpu.switch_with(sub, SwitchMode::KeepKv).unwrap();
        let name = sub.name(model.metadata());
        assert_eq!(rg.reprefilled_tokens > 0, reprefills, "{name}: GPU re-prefill");
        assert_eq!(rg.reprefilled_tokens, rc.reprefilled_tokens, "{name}");
        for _ in 0..3 {
            let (a, b) = (argmax(&gpu.decode(next).unwrap()), argmax(&cpu.decode(next).unwrap()));
            assert_eq!(a, b, "{name}: greedy token after a keep-KV switch");
            next = a;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The per-layer embedding table stays in the file mapping: after an E2B-style session ran (and
/// was dropped), the engine's GPU memory is exactly what it uploads besides the table (every
/// other tensor of the running layers, the FFN rows of their widths, the running layers'
/// blocks of `per_layer_model_projection`, the global tensors and the two RoPE tables), within
/// a few hundred bytes of 16-byte rounding and the K/V-sharing layers' zero key norms. The
/// skipped layers' weights are not uploaded either.
#[test]
fn gemma3n_gpu_keeps_the_per_layer_table_on_the_host() {
    use matformer::format::gemma3n::layer_of;
    use matformer::format::{g3n_names, names, Gemma3nConfig, TensorInfo};
    let g = goldens();
    let (model, dir) = imported(DType::F32, "g3n-gpu-ple-host");
    let v = g.variants.iter().find(|v| v.name == "e2b_style").unwrap();
    let sub = submodel_of(v, &model);
    let meta = model.metadata();
    let view = model.view();
    let bytes = |t: &TensorInfo| t.rows() * t.row_bytes();
    let a = &meta.architecture;
    let d = u64::from(a.d_model);
    let cfg = Gemma3nConfig::from_metadata(meta).unwrap().unwrap();
    let p = u64::from(cfg.per_layer_dim);
    let widths = sub.widths(meta);
    let running = (0..a.n_layers as usize).filter(|&i| sub.runs_layer(i)).count() as u64;
    assert_eq!(running, 8);
    let table = bytes(view.tensor(g3n_names::PER_LAYER_EMBEDDINGS).unwrap());
    let mut expected = 0u64;
    let mut skipped = 0u64;
    for t in &view.tensors {
        let name = t.name.as_str();
        let ffn = [names::FFN_UP, names::FFN_GATE, names::FFN_DOWN_T].iter().any(|s| name.ends_with(&format!(".{s}")));
        match layer_of(name) {
            Some(i) if sub.is_skipped(i) => skipped += bytes(t),
            Some(i) if ffn => expected += u64::from(widths[i]) * d * 4,
            Some(_) => expected += bytes(t),
            None if name == g3n_names::PER_LAYER_EMBEDDINGS => {}
            None if name == g3n_names::PER_LAYER_MODEL_PROJECTION => expected += running * p * d * 4,
            None => expected += bytes(t),
        }
    }
    // cos and sin tables of both RoPE bases for the 64-token context.
    expected += 2 * 2 * 64 * u64::from(a.head_dim / 2) * 4;
    let engine = gpu_engine(&model);
    let mut s = engine.session(&sub).unwrap();
    assert_eq!(s.prefill(&g.prompt_ids).unwrap(), v.greedy[0]);
    drop(s);
    let used = engine.memory_in_use();
    let slack = 1024;
    eprintln!(
        "GPU memory {used} bytes, expected {expected} without the {table}-byte per-layer table \
         and the skipped layers' {skipped} bytes"
    );
    assert!(table > 16 * slack && skipped > 16 * slack, "the fixture's table and layers are large enough to tell");
    assert!(used <= expected + slack && used + slack >= expected, "GPU memory {used}, expected {expected}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Block-quantised files (`q8_0`, `q4_0`: every matrix whose rows are whole 32-element blocks;
/// the GPU multiplies them with `matmul_quant.wgsl`) on the GPU against the CPU engine on the
/// same file: the same greedy tokens, and logits within the dtype's storage tier relative to
/// the logit scale (`Q8_STORAGE`, `Q4_STORAGE`, the bounds the exporter's verification allows
/// the CPU engine against the unquantised source). Why not `gpu::QUANTIZED_FORWARD_TOLERANCE`
/// (1e-2 absolute, one 8-bit activation step on the Llama test files): both backends round
/// each activation block to 8 bits before a quantised product, and an activation lying within
/// f32 roundoff of a rounding boundary rounds the other way on one of them. On this model one
/// such step moves a logit by up to ~0.1 (its tied embeddings, the LM head, are O(1), not the
/// synthetic files' `1 / sqrt(fan_in)`), and a step in an early K/V-owning layer reaches every
/// later position through attention. Measured (q8_0, q4_0): 4.8e-6 on the rows where no
/// activation flips, single rows at 9.4e-2 (q8_0, Lab-style) and rows up to 2.7e-1 (q4_0,
/// width-only) on a logit scale of ~16: each a rounding event, not a drift (the same layers'
/// weights at the same widths agree to 5e-6 in the other variants).
#[test]
fn gemma3n_gpu_quantized_matches_the_cpu() {
    let g = goldens();
    for dtype in [DType::Q8_0, DType::Q4_0] {
        let (model, dir) = imported(dtype, &format!("g3n-gpu-{dtype}"));
        let bound = if dtype == DType::Q8_0 { Tolerance::Q8_STORAGE } else { Tolerance::Q4_STORAGE };
        assert!(matformer::gpu::quantized_tensor(&model).is_some(), "{dtype}: the file holds quantised tensors");
        let engine = gpu_engine(&model);
        let cpu = CpuEngine::new(Arc::clone(&model)).unwrap();
        for v in &g.variants {
            let sub = submodel_of(v, &model);
            let ours = engine.session(&sub).unwrap().forward_all(&g.prompt_ids).unwrap();
            let theirs = cpu.session(&sub).unwrap().forward_all(&g.prompt_ids).unwrap();
            let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let scale = theirs.iter().fold(1f32, |m, x| m.max(x.abs()));
            eprintln!("GPU {dtype} {:<10}: max|diff| vs CPU {diff:.2e} (scale {scale:.2})", v.name);
            assert!(diff <= bound.bound * scale, "{dtype} {}: GPU vs CPU {diff} ({})", v.name, bound.name);
            let mut s = engine.session(&sub).unwrap();
            let mut c = cpu.session(&sub).unwrap();
            let mut next = s.prefill(&g.prompt_ids).unwrap();
            assert_eq!(argmax(&c.prefill(&g.prompt_ids).unwrap()), next, "{dtype} {}", v.name);
            for _ in 0..6 {
                let cpu_next = argmax(&c.decode(next).unwrap());
                next = s.decode(next).unwrap();
                assert_eq!(next, cpu_next, "{dtype} {}: greedy tokens", v.name);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Every weight path the adapter runs (packed, packed64, native f16), forced, with prefill
/// passes of 5 tokens (the prompt spans three passes, and a pass's sliding window reaches into
/// the previous one): every variant's logits against the CPU engine within the path's
/// `gpu::forward_tolerance` (`gpu::gemma3n_f16_tolerance` on the native-f16 path) and against
/// transformers (as `check_gpu_parity`), the CPU's greedy tokens, and the start-up self-check.
#[test]
fn gemma3n_gpu_every_weight_path_matches_the_cpu() {
    let g = goldens();
    let (model, dir) = imported(DType::F16, "g3n-gpu-paths");
    let cpu = CpuEngine::new(Arc::clone(&model)).unwrap();
    let paths: Vec<WeightPath> =
        gpu_engine(&model).adapter().weight_paths.iter().map(|p| WeightPath::parse(p).unwrap()).collect();
    assert!(paths.contains(&WeightPath::Packed));
    for path in paths {
        let opts =
            GpuOptions { max_context: Some(64), prefill_chunk: 5, weight_path: Some(path), ..GpuOptions::default() };
        let engine = GpuEngine::new(Arc::clone(&model), opts).unwrap();
        for v in &g.variants {
            let sub = submodel_of(v, &model);
            let ours = engine.session(&sub).unwrap().forward_all(&g.prompt_ids).unwrap();
            let theirs = cpu.session(&sub).unwrap().forward_all(&g.prompt_ids).unwrap();
            let tol = match path {
                WeightPath::F16 => matformer::gpu::gemma3n_f16_tolerance(&theirs),
                _ => matformer::gpu::forward_tolerance(path),
            };
            let diff = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let reference: Vec<f32> = v.logits.iter().flatten().copied().collect();
            let scale = reference.iter().fold(1f32, |m, x| m.max(x.abs()));
            let diff_ref = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let bound = if path == WeightPath::F16 { Tolerance::F16_STORAGE } else { Tolerance::F32_STORAGE };
            eprintln!(
                "GPU {path:<8} {:<10}: max|diff| vs CPU {diff:.2e} ({}), vs transformers {diff_ref:.2e} (scale {scale:.2})",
                v.name, tol.name
            );
            tol.check(&theirs, &ours).unwrap_or_else(|m| panic!("{path} {}: {m}", v.name));
            assert!(diff_ref <= bound.bound * scale, "{path} {}: {diff_ref} against transformers", v.name);
            let mut s = engine.session(&sub).unwrap();
            let mut next = s.prefill(&g.prompt_ids).unwrap();
            let mut got = Vec::new();
            for _ in 0..v.greedy.len() {
                got.push(next);
                next = s.decode(next).unwrap();
            }
            assert_eq!(got, v.greedy, "{path} {}: greedy tokens", v.name);
        }
        engine.self_check().unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// On the GPU (the `gemma-3n-tiny` synth preset: window 4, context 512, prefill chunk 16) the
/// sliding-window layers' caches are rings of `4 + 2 * 16 = 36` rows instead of 512, and the
/// logits stay the CPU engine's: a 180-token call (twelve passes, so the rings wrap many
/// times) and decoding past it, one token at a time. A call interrupted after its passes ran
/// leaves the session where it was, the overwritten ring rows put back; going back within the
/// rings keeps the cache, further back empties it, and `ElasticSession::truncate` runs its
/// history again.
#[test]
fn gemma3n_gpu_sliding_window_caches_are_rings_and_match_the_cpu() {
    use matformer::sampling::{Sampler, SamplingParams};
    use matformer_export::synth::{synth, SynthOptions};
    let dir = temp_dir("g3n-gpu-ring");
    let path = dir.join("tiny.matf");
    synth(&SynthOptions { preset: "gemma-3n-tiny".into(), layers: None, dtype: DType::F32.into(), seed: 7 }, &path)
        .unwrap();
    let model = Arc::new(ModelFile::open(&path).unwrap());
    let sub = Submodel::parse("full", model.metadata(), model.view().available_levels)
        .or_else(|_| Submodel::parse("1", model.metadata(), model.view().available_levels))
        .unwrap();
    let cpu = CpuEngine::new(Arc::clone(&model)).unwrap();
    let tokens: Vec<u32> = (0..240).map(|i| ((i * 53 + 7) % 300) as u32).collect();
    let vocab = cpu.session(&sub).unwrap().vocab_size();
    let mut one = cpu.session(&sub).unwrap();
    let rows: Vec<Vec<f32>> = tokens.iter().map(|&t| one.decode(t).unwrap()).collect();

    let opts = || GpuOptions { max_context: Some(512), prefill_chunk: 16, ..GpuOptions::default() };
    let gpu = GpuEngine::new(Arc::clone(&model), opts())
        .unwrap_or_else(|e| panic!("GPU engine ({e}): install a Vulkan driver such as mesa-vulkan-drivers (lavapipe)"));
    let path_kind = WeightPath::parse(&gpu.adapter().weight_path).unwrap();
    let close = |expected: &[f32], got: &[f32], what: &str| {
        let tol = match path_kind {
            WeightPath::F16 => matformer::gpu::gemma3n_f16_tolerance(expected),
            p => matformer::gpu::forward_tolerance(p),
        };
        tol.check(expected, got).unwrap_or_else(|m| panic!("{what}: GPU vs CPU: {m}"));
    };

    let mut s = gpu.session(&sub).unwrap();
    s.prefill(&tokens[..20]).unwrap();
    let all = s.forward_all(&tokens[20..200]).unwrap();
    for (i, r) in all.chunks_exact(vocab).enumerate() {
        close(&rows[20 + i], r, &format!("batched position {}", 20 + i));
    }
    for (i, &t) in tokens.iter().enumerate().skip(200) {
        close(&rows[i], &s.decode_logits(t).unwrap(), &format!("decode at position {i}"));
    }
    // Layers 0..6 own K/V; layer 4 is global (512 rows), the other five slide (36 rows).
    let meta = model.metadata();
    let kv_row = 4 * 2 * (meta.architecture.n_kv_heads * meta.architecture.head_dim).next_multiple_of(8) as u64;
    assert_eq!(s.kv_cache_bytes(), (512 + 5 * 36) * kv_row, "ring caches");

    // Rolling back within the rings keeps the cache; further back empties it.
    s.truncate(238);
    assert_eq!(s.position(), 238);
    close(&rows[238], &s.decode_logits(tokens[238]).unwrap(), "after a rollback within the ring");
    s.truncate(100);
    assert_eq!(s.position(), 0, "the rings no longer hold position 100's window");

    // Interrupted after a 180-token call ran (at its readback): the session is as it was.
    let mut s = gpu.session(&sub).unwrap();
    s.prefill(&tokens[..20]).unwrap();
    let mut sampler = Sampler::new(SamplingParams::greedy()).unwrap();
    let err = s.prefill_sample_until(&tokens[20..200], &mut sampler, &|| true).unwrap_err();
    assert!(matches!(err, GpuError::Interrupted), "{err}");
    assert_eq!(s.position(), 20);
    for (i, &t) in tokens.iter().enumerate().skip(20).take(12) {
        close(&rows[i], &s.decode_logits(t).unwrap(), &format!("after the interrupt, position {i}"));
    }

    // The elastic session runs its history again after going back past the rings.
    let mut es = ElasticSession::new_gpu(GpuEngine::new(Arc::clone(&model), opts()).unwrap(), &sub).unwrap();
    es.prefill(&tokens[..200]).unwrap();
    es.truncate(100).unwrap();
    assert_eq!((es.position(), es.history().len()), (100, 100));
    close(&rows[100], &es.decode(tokens[100]).unwrap(), "after the history ran again");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reduced vocabulary (a speculative draft's) on a Gemma 3n file: the first N logits are
/// bitwise the whole head's, soft-capped the same way; the rest are -inf (not the cap's
/// -30). On the GPU the device's argmax keeps to the first N ids and the logits read back
/// are -inf beyond them.
#[test]
fn gemma3n_reduced_logit_rows_are_a_prefix_of_the_whole_head() {
    let g = goldens();
    let (model, dir) = imported(DType::F32, "g3n-logit-rows");
    let engine = CpuEngine::new(Arc::clone(&model)).unwrap();
    let sub = submodel_of(&g.variants[0], &model);
    let want = engine.session(&sub).unwrap().prefill(&g.prompt_ids).unwrap();
    let vocab = want.len();
    for n in [1usize, 100, 299] {
        let mut s = engine.session(&sub).unwrap();
        s.set_logit_rows(Some(n));
        let got = s.prefill(&g.prompt_ids).unwrap();
        same_bits(&want[..n], &got[..n], &format!("the first {n} logits"));
        assert!(got[n..].iter().all(|&x| x == f32::NEG_INFINITY), "n = {n}: -inf beyond");
    }
    let gpu = gpu_engine(&model);
    for n in [1usize, 100] {
        let mut s = gpu.session(&sub).unwrap();
        s.set_logit_rows(Some(n)).unwrap();
        let logits = s.prefill_logits(&g.prompt_ids).unwrap();
        assert_eq!(logits.len(), vocab);
        assert!(logits[n..].iter().all(|&x| x == f32::NEG_INFINITY), "GPU n = {n}: -inf beyond");
        let top = s.decode(argmax(&logits)).unwrap();
        assert!((top as usize) < n, "GPU n = {n}: argmax {top}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
