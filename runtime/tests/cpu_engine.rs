//! End-to-end tests of the CPU engine on small synthetic models written with the format
//! writer: KV-cache paths, an independent dense reference forward, nested slicing against
//! physically truncated models, cut files, threads, errors and generation.

use std::sync::Arc;

use matformer::cpu::{argmax, generate_greedy, CpuEngine, EngineError, Session, Tolerance};
use matformer::format::testing::{required_tensor_specs, synthetic_file, synthetic_metadata};
use matformer::format::{write_file, Activation, DType, Metadata, NormKind};
use matformer::{ModelFile, Submodel, SubmodelError};

/// One synthetic architecture.
#[derive(Clone, Debug)]
struct Cfg {
    name: &'static str,
    dtype: DType,
    d_model: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    widths: Vec<Vec<u32>>,
    n_layers: u32,
    gated: bool,
    tied: bool,
    norm: NormKind,
    activation: Activation,
}

fn configs() -> Vec<Cfg> {
    vec![
        Cfg {
            name: "f32 gated untied rms silu gqa",
            dtype: DType::F32,
            d_model: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            widths: vec![vec![32, 64, 128], vec![48, 96, 160], vec![16, 64, 256]],
            n_layers: 3,
            gated: true,
            tied: false,
            norm: NormKind::RmsNorm,
            activation: Activation::Silu,
        },
        Cfg {
            name: "f32 plain tied layernorm gelu mha",
            dtype: DType::F32,
            d_model: 48,
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 12,
            widths: vec![vec![40, 100]],
            n_layers: 2,
            gated: false,
            tied: true,
            norm: NormKind::LayerNorm,
            activation: Activation::GeluTanh,
        },
        Cfg {
            name: "f16 gated tied rms gelu mqa 4 levels",
            dtype: DType::F16,
            d_model: 64,
            n_heads: 8,
            n_kv_heads: 1,
            head_dim: 8,
            widths: vec![vec![8, 17, 40, 100]],
            n_layers: 2,
            gated: true,
            tied: true,
            norm: NormKind::RmsNorm,
            activation: Activation::GeluTanh,
        },
        Cfg {
            name: "f16 plain untied layernorm silu odd sizes",
            dtype: DType::F16,
            d_model: 20,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 6,
            widths: vec![vec![5, 13], vec![7, 11]],
            n_layers: 2,
            gated: false,
            tied: false,
            norm: NormKind::LayerNorm,
            activation: Activation::Silu,
        },
    ]
}

fn metadata(c: &Cfg, max_context: u32) -> Metadata {
    let mut meta = synthetic_metadata(
        c.d_model,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        260,
        c.widths.clone(),
        c.gated,
        c.tied,
    );
    meta.architecture.norm = c.norm;
    meta.architecture.activation = c.activation;
    meta.architecture.max_context = max_context;
    meta
}

fn build(c: &Cfg, max_context: u32, seed: u64) -> Arc<ModelFile> {
    let meta = metadata(c, max_context);
    let bytes = synthetic_file(&meta, c.dtype, seed).expect("write synthetic model");
    Arc::new(ModelFile::from_bytes(bytes).expect("parse synthetic model"))
}

fn engine(model: &Arc<ModelFile>) -> CpuEngine {
    CpuEngine::new(model.clone()).expect("engine")
}

/// Every uniform level plus two Mix'n'Match assignments.
fn submodels(meta: &Metadata) -> Vec<Submodel> {
    let n_layers = meta.architecture.n_layers as usize;
    let n_levels = meta.n_levels();
    let mut out: Vec<Submodel> = (0..n_levels).map(|l| Submodel::uniform(l as u8, n_layers)).collect();
    out.push(Submodel::new((0..n_layers).map(|i| ((i + 1) % n_levels) as u8).collect()));
    out.push(Submodel::new((0..n_layers).map(|i| ((n_levels - 1 + i * 2) % n_levels) as u8).collect()));
    out
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    // Mix bytes and the special ids (BOS 256, EOS 257, 258, 259).
    (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(97)) >> 7) % 260).collect()
}

fn assert_close(tol: Tolerance, expected: &[f32], actual: &[f32], what: &str) {
    if let Err(m) = tol.check(expected, actual) {
        panic!("{what}: {m}");
    }
}

// ---------------------------------------------------------------------------------------------
// Independent dense reference: full recompute, no KV cache, plain loops in f64 over the weights
// decoded with `tensor_f32`.

fn norm_ref(meta: &Metadata, x: &[f64], w: &[f32], b: Option<&[f32]>) -> Vec<f64> {
    let n = x.len() as f64;
    let eps = f64::from(meta.architecture.norm_eps);
    match meta.architecture.norm {
        NormKind::RmsNorm => {
            let ms = x.iter().map(|v| v * v).sum::<f64>() / n;
            let r = 1.0 / (ms + eps).sqrt();
            x.iter().zip(w).map(|(v, &g)| v * r * f64::from(g)).collect()
        }
        NormKind::LayerNorm => {
            let mean = x.iter().sum::<f64>() / n;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            let r = 1.0 / (var + eps).sqrt();
            let b = b.expect("layernorm bias");
            x.iter().zip(w.iter().zip(b)).map(|(v, (&g, &bb))| (v - mean) * r * f64::from(g) + f64::from(bb)).collect()
        }
    }
}

/// `W[rows, cols] @ x` using the first `rows` rows.
fn linear_ref(w: &[f32], rows: usize, cols: usize, x: &[f64]) -> Vec<f64> {
    (0..rows).map(|r| (0..cols).map(|c| f64::from(w[r * cols + c]) * x[c]).sum()).collect()
}

fn act_ref(meta: &Metadata, x: f64) -> f64 {
    match meta.architecture.activation {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => {
            0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        }
    }
}

fn rope_ref(x: &mut [f64], pos: usize, theta: f64) {
    let hd = x.len();
    let half = hd / 2;
    for i in 0..half {
        let angle = pos as f64 * theta.powf(-(2.0 * i as f64) / hd as f64);
        let (s, c) = angle.sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

/// Logits of every position of `toks` for the submodel with FFN `widths`.
fn dense_forward(model: &ModelFile, widths: &[u32], toks: &[u32]) -> Vec<f32> {
    let meta = model.metadata();
    let a = &meta.architecture;
    let (d, nh, nkv, hd) = (a.d_model as usize, a.n_heads as usize, a.n_kv_heads as usize, a.head_dim as usize);
    let vocab = a.vocab_size as usize;
    let t = |name: &str| model.tensor_f32(name).expect(name);
    let opt = |name: &str| (a.norm == NormKind::LayerNorm).then(|| t(name));
    let emb = t("tok_embeddings");
    let mut xs: Vec<Vec<f64>> =
        toks.iter().map(|&tok| (0..d).map(|c| f64::from(emb[tok as usize * d + c])).collect()).collect();
    for (l, &w) in widths.iter().enumerate() {
        let w = w as usize;
        let n = |s: &str| format!("layers.{l}.{s}");
        let (wq, wk, wv, wo) = (t(&n("wq")), t(&n("wk")), t(&n("wv")), t(&n("wo")));
        let (an, anb) = (t(&n("attn_norm")), opt(&n("attn_norm_bias")));
        let (fnw, fnb) = (t(&n("ffn_norm")), opt(&n("ffn_norm_bias")));
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let xn = norm_ref(meta, x, &an, anb.as_deref());
            let mut q = linear_ref(&wq, nh * hd, d, &xn);
            let mut k = linear_ref(&wk, nkv * hd, d, &xn);
            for h in q.chunks_mut(hd).chain(k.chunks_mut(hd)) {
                rope_ref(h, pos, f64::from(a.rope_theta));
            }
            qs.push(q);
            ks.push(k);
            vs.push(linear_ref(&wv, nkv * hd, d, &xn));
        }
        let (up, down) = (t(&n("ffn_up")), t(&n("ffn_down_t")));
        let gate = a.gated_ffn.then(|| t(&n("ffn_gate")));
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0.0f64; nh * hd];
            for h in 0..nh {
                let g = h / (nh / nkv);
                let q = &qs[pos][h * hd..(h + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let k = &ks[j][g * hd..(g + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for c in 0..hd {
                        att[h * hd + c] += ej / z * vs[j][g * hd + c];
                    }
                }
            }
            let o = linear_ref(&wo, d, nh * hd, &att);
            for (xv, ov) in x.iter_mut().zip(&o) {
                *xv += ov;
            }
            let xn = norm_ref(meta, x, &fnw, fnb.as_deref());
            let u = linear_ref(&up, w, d, &xn);
            let hidden: Vec<f64> = match &gate {
                Some(gw) => {
                    let g = linear_ref(gw, w, d, &xn);
                    g.iter().zip(&u).map(|(&gv, &uv)| act_ref(meta, gv) * uv).collect()
                }
                None => u.iter().map(|&uv| act_ref(meta, uv)).collect(),
            };
            for c in 0..d {
                let mut s = 0.0;
                for (nrn, hv) in hidden.iter().enumerate() {
                    s += hv * f64::from(down[nrn * d + c]);
                }
                x[c] += s;
            }
        }
    }
    let head = if a.tied_embeddings { emb.clone() } else { t("lm_head") };
    let (fw, fb) = (t("norm"), opt("norm_bias"));
    let mut out = Vec::with_capacity(toks.len() * vocab);
    for x in &xs {
        let xn = norm_ref(meta, x, &fw, fb.as_deref());
        out.extend(linear_ref(&head, vocab, d, &xn).into_iter().map(|v| v as f32));
    }
    out
}

// ---------------------------------------------------------------------------------------------

#[test]
fn batched_prefill_and_token_by_token_decode_agree_bitwise() {
    for c in configs() {
        let model = build(&c, 512, 11);
        let eng = engine(&model);
        let vocab = 260;
        for sub in submodels(model.metadata()) {
            let toks = tokens(23, 3);
            let mut s = eng.session(&sub).unwrap();
            let all = s.forward_all(&toks).unwrap();
            assert_eq!(all.len(), toks.len() * vocab);
            assert_eq!(s.position(), toks.len());

            let mut s = eng.session(&sub).unwrap();
            for (i, &tok) in toks.iter().enumerate() {
                let l = s.decode(tok).unwrap();
                let what = format!("{}: {sub:?} decode vs forward_all at {i}", c.name);
                assert_close(Tolerance::EXACT, &all[i * vocab..(i + 1) * vocab], &l, &what);
            }

            for split in [1, 9, 22] {
                let mut s = eng.session(&sub).unwrap();
                let last = s.prefill(&toks[..split]).unwrap();
                let what = format!("{}: {sub:?} prefill({split})", c.name);
                assert_close(Tolerance::EXACT, &all[(split - 1) * vocab..split * vocab], &last, &what);
                let rest = s.forward_all(&toks[split..]).unwrap();
                assert_close(Tolerance::EXACT, &all[split * vocab..], &rest, &what);
            }
        }
    }
}

#[test]
fn long_prefill_spans_chunks_and_matches_decode() {
    let c = &configs()[2];
    let model = build(c, 512, 5);
    let eng = engine(&model).with_threads(2);
    let sub = Submodel::uniform(1, c.n_layers as usize);
    let toks = tokens(300, 9); // more than one 256-token prefill chunk
    let mut s = eng.session(&sub).unwrap();
    let all = s.forward_all(&toks).unwrap();
    let mut s2 = eng.session(&sub).unwrap();
    let last = s2.prefill(&toks).unwrap();
    assert_close(Tolerance::EXACT, &all[299 * 260..], &last, "prefill across chunks");
    let mut s3 = eng.session(&sub).unwrap();
    for (i, &tok) in toks.iter().enumerate() {
        let l = s3.decode(tok).unwrap();
        if i % 37 == 0 || i == 299 {
            assert_close(Tolerance::EXACT, &all[i * 260..(i + 1) * 260], &l, "decode vs chunked");
        }
    }
}

#[test]
fn matches_dense_reference_forward_for_every_level_and_mix() {
    for c in configs() {
        let model = build(&c, 512, 21);
        let eng = engine(&model);
        let toks = tokens(12, 1);
        for sub in submodels(model.metadata()) {
            let widths = sub.widths(model.metadata());
            let expected = dense_forward(&model, &widths, &toks);
            let got = eng.session(&sub).unwrap().forward_all(&toks).unwrap();
            let what = format!("{}: {sub:?} vs dense reference", c.name);
            assert_close(Tolerance::FORWARD_F32, &expected, &got, &what);
        }
    }
}

/// Writes a one-level model whose nested tensors are physically cut to `widths` (copying the
/// leading rows of every tensor of `model`).
fn physically_truncated(model: &ModelFile, widths: &[u32], dtype: DType) -> Arc<ModelFile> {
    let mut meta = model.metadata().clone();
    meta.ffn_widths = widths.iter().map(|&w| vec![w]).collect();
    meta.level_names = vec!["only".to_string()];
    let specs = required_tensor_specs(&meta, dtype);
    let data: Vec<Vec<f32>> = specs.iter().map(|s| model.tensor_f32(&s.name).expect("source tensor")).collect();
    let mut bytes = Vec::new();
    write_file(
        &mut bytes,
        &meta,
        &specs,
        |ti, rows, out| {
            let re: u64 = specs[ti].shape.iter().skip(1).product();
            matformer::quant::encode_row(dtype, &data[ti][(rows.start * re) as usize..(rows.end * re) as usize], out)
        },
        |_, _| {},
    )
    .expect("write truncated model");
    Arc::new(ModelFile::from_bytes(bytes).expect("parse truncated model"))
}

#[test]
fn nested_slice_equals_physically_truncated_model() {
    for c in configs() {
        let model = build(&c, 512, 31);
        let eng = engine(&model);
        let toks = tokens(15, 4);
        for sub in submodels(model.metadata()) {
            let widths = sub.widths(model.metadata());
            let small = physically_truncated(&model, &widths, c.dtype);
            assert_eq!(small.view().available_levels, 1);
            let small_eng = engine(&small);
            let full = Submodel::parse("full", small.metadata(), 1).unwrap();
            let expected = small_eng.session(&full).unwrap().forward_all(&toks).unwrap();
            let got = eng.session(&sub).unwrap().forward_all(&toks).unwrap();
            let what = format!("{}: {sub:?} vs truncated file {widths:?}", c.name);
            assert_close(Tolerance::EXACT, &expected, &got, &what);
        }
    }
}

#[test]
fn file_cut_at_a_level_boundary_runs_the_smaller_submodels() {
    let c = &configs()[2]; // four levels
    let model = build(c, 512, 41);
    let eng = engine(&model);
    let toks = tokens(10, 2);
    let n_layers = c.n_layers as usize;
    for keep in 1..model.view().level_ends.len() {
        let end = model.view().level_ends[keep - 1] as usize;
        let cut = Arc::new(ModelFile::from_bytes(model.bytes()[..end].to_vec()).unwrap());
        assert_eq!(cut.view().available_levels, keep);
        let cut_eng = engine(&cut);
        for level in 0..keep as u8 {
            let sub = Submodel::uniform(level, n_layers);
            let a = cut_eng.session(&sub).unwrap().forward_all(&toks).unwrap();
            let b = eng.session(&sub).unwrap().forward_all(&toks).unwrap();
            assert_close(Tolerance::EXACT, &b, &a, "cut file vs full file");
        }
        let too_big = Submodel::uniform(keep as u8, n_layers);
        match cut_eng.session(&too_big) {
            Err(EngineError::Submodel(SubmodelError::LevelNotAvailable { layer: 0, level, available })) => {
                assert_eq!((level, available), (keep, keep));
            }
            other => panic!("expected LevelNotAvailable, got {other:?}"),
        }
        let largest = Submodel::parse("full", cut.metadata(), keep).unwrap();
        assert_eq!(largest, Submodel::uniform(keep as u8 - 1, n_layers));
    }
}

#[test]
fn thread_count_does_not_change_results() {
    // Big enough for every kernel to split across threads (>= 256K multiply-adds per call).
    let c = Cfg {
        name: "medium",
        dtype: DType::F16,
        d_model: 256,
        n_heads: 8,
        n_kv_heads: 4,
        head_dim: 32,
        widths: vec![vec![256, 1024]],
        n_layers: 2,
        gated: true,
        tied: false,
        norm: NormKind::RmsNorm,
        activation: Activation::Silu,
    };
    let model = build(&c, 512, 51);
    let toks = tokens(70, 5);
    let sub = Submodel::new(vec![1, 0]);
    let run = |threads: usize| {
        let eng = engine(&model).with_threads(threads);
        assert_eq!(eng.threads(), threads);
        let mut s = eng.session(&sub).unwrap();
        let mut out = s.forward_all(&toks).unwrap();
        out.extend(s.decode(7).unwrap());
        out.extend(s.decode(300 % 260).unwrap());
        out
    };
    let one = run(1);
    for threads in [2, 3, 8] {
        assert_close(Tolerance::EXACT, &one, &run(threads), &format!("1 vs {threads} threads"));
    }
    let expected = dense_forward(&model, &sub.widths(model.metadata()), &toks[..20]);
    assert_close(Tolerance::FORWARD_F32, &expected, &one[..20 * 260], "medium vs dense");
}

#[test]
fn context_full_is_an_error_and_leaves_the_session_intact() {
    let c = &configs()[0];
    let model = build(c, 8, 61);
    let eng = engine(&model);
    let sub = Submodel::uniform(0, c.n_layers as usize);
    let mut s = eng.session(&sub).unwrap();
    assert_eq!(s.max_context(), 8);
    match s.prefill(&tokens(9, 1)) {
        Err(EngineError::ContextFull { max: 8 }) => {}
        other => panic!("expected ContextFull, got {other:?}"),
    }
    assert_eq!(s.position(), 0);
    s.prefill(&tokens(6, 1)).unwrap();
    assert!(matches!(s.forward_all(&[1, 2, 3]), Err(EngineError::ContextFull { max: 8 })));
    assert_eq!(s.position(), 6);
    let l7 = s.decode(1).unwrap();
    s.decode(2).unwrap();
    assert_eq!(s.position(), 8);
    assert!(matches!(s.decode(3), Err(EngineError::ContextFull { .. })));
    // The failed calls changed nothing: rewinding and replaying gives the same logits.
    s.truncate(6);
    assert_eq!(s.position(), 6);
    assert_close(Tolerance::EXACT, &l7, &s.decode(1).unwrap(), "after truncate");
    let msg = EngineError::ContextFull { max: 8 }.to_string();
    assert!(msg.contains("8 tokens"), "{msg}");
}

#[test]
fn token_out_of_range_and_empty_input_are_errors() {
    let c = &configs()[1];
    let model = build(c, 64, 71);
    let eng = engine(&model);
    let mut s = eng.session(&Submodel::uniform(1, 2)).unwrap();
    match s.prefill(&[1, 2, 260]) {
        Err(EngineError::TokenOutOfRange { token: 260, vocab: 260 }) => {}
        other => panic!("expected TokenOutOfRange, got {other:?}"),
    }
    assert!(matches!(s.decode(u32::MAX), Err(EngineError::TokenOutOfRange { .. })));
    assert_eq!(s.position(), 0);
    assert!(matches!(s.prefill(&[]), Err(EngineError::EmptyInput { .. })));
    assert_eq!(s.forward_all(&[]).unwrap(), Vec::<f32>::new());
    assert!(matches!(generate_greedy(&mut s, &[], 3, None, |_| {}), Err(EngineError::EmptyInput { .. })));
    assert_eq!(s.position(), 0);
    s.decode(259).unwrap();
    assert_eq!(s.position(), 1);
}

#[test]
fn session_rejects_submodels_that_do_not_fit() {
    let c = &configs()[0];
    let model = build(c, 64, 81);
    let eng = engine(&model);
    assert!(matches!(
        eng.session(&Submodel::uniform(0, 2)),
        Err(EngineError::Submodel(SubmodelError::WrongLayerCount { expected: 3, found: 2 }))
    ));
    assert!(matches!(
        eng.session(&Submodel::new(vec![0, 3, 0])),
        Err(EngineError::Submodel(SubmodelError::BadIndex { layer: 1, .. }))
    ));
    let s = eng.session(&Submodel::new(vec![2, 0, 1])).unwrap();
    assert_eq!(s.widths(), &[128, 48, 64]);
}

#[test]
fn generate_greedy_follows_argmax_and_stops() {
    let c = &configs()[0];
    let model = build(c, 40, 91);
    let eng = engine(&model);
    let sub = Submodel::parse("0,2,1", model.metadata(), 3).unwrap();
    let prompt = tokens(5, 7);

    let mut seen = Vec::new();
    let mut s = eng.session(&sub).unwrap();
    let out = generate_greedy(&mut s, &prompt, 10, None, |t| seen.push(t)).unwrap();
    assert_eq!(out.len(), 10);
    assert_eq!(out, seen);
    // The last token is returned but not fed back.
    assert_eq!(s.position(), prompt.len() + 9);

    let mut m = eng.session(&sub).unwrap();
    let mut logits = m.prefill(&prompt).unwrap();
    for &t in &out {
        assert_eq!(argmax(&logits), t);
        logits = m.decode(t).unwrap();
    }

    // EOS: stop before emitting it.
    let mut s = eng.session(&sub).unwrap();
    let out_eos = generate_greedy(&mut s, &prompt, 10, Some(out[3]), |_| {}).unwrap();
    let first = out.iter().position(|&t| t == out[3]).unwrap();
    assert_eq!(out_eos, out[..first]);

    // Context window (40): the prompt (5) plus at most 36 generated tokens (35 fed back).
    let mut s = eng.session(&sub).unwrap();
    let long = generate_greedy(&mut s, &prompt, 1000, None, |_| {}).unwrap();
    assert_eq!(long.len(), 36);
    assert_eq!(s.position(), 40);
    assert_eq!(long[..10], out[..]);

    // max_new = 0 still consumes the prompt.
    let mut s = eng.session(&sub).unwrap();
    assert!(generate_greedy(&mut s, &prompt, 0, None, |_| {}).unwrap().is_empty());
    assert_eq!(s.position(), 5);
}

#[test]
fn argmax_edge_cases() {
    assert_eq!(argmax(&[]), 0);
    assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN, 0.7]), 3);
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
}

#[test]
fn reset_gives_a_fresh_session() {
    let c = &configs()[3];
    let model = build(c, 64, 101);
    let eng = engine(&model);
    let sub = Submodel::uniform(1, 2);
    let toks = tokens(9, 3);
    let mut s = eng.session(&sub).unwrap();
    let a = s.forward_all(&toks).unwrap();
    assert!(s.kv_cache_bytes() > 0);
    s.reset();
    assert_eq!(s.position(), 0);
    let b = s.forward_all(&toks).unwrap();
    assert_close(Tolerance::EXACT, &a, &b, "after reset");
    assert_eq!(s.submodel(), &sub);
    assert_eq!(s.vocab_size(), 260);
}

fn assert_send<T: Send>(_: &T) {}

#[test]
fn sessions_run_concurrently_on_a_shared_engine() {
    let c = &configs()[0];
    let model = build(c, 64, 111);
    let eng = Arc::new(engine(&model).with_threads(2));
    let toks = tokens(11, 8);
    let subs = submodels(model.metadata());
    let sequential: Vec<Vec<f32>> = subs.iter().map(|s| eng.session(s).unwrap().forward_all(&toks).unwrap()).collect();
    let sessions: Vec<Session> = subs.iter().map(|s| eng.session(s).unwrap()).collect();
    assert_send(&sessions[0]);
    let parallel: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sessions
            .into_iter()
            .map(|mut s| {
                let toks = &toks;
                scope.spawn(move || s.forward_all(toks).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, b) in sequential.iter().zip(&parallel) {
        assert_close(Tolerance::EXACT, a, b, "concurrent sessions");
    }
}

#[test]
fn memory_mapped_file_gives_the_same_logits() {
    let c = &configs()[2];
    let model = build(c, 64, 121);
    let dir = std::env::temp_dir().join(format!("matformer-cpu-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.matf");
    std::fs::write(&path, model.bytes()).unwrap();
    let mapped = Arc::new(ModelFile::open(&path).unwrap());
    let toks = tokens(8, 1);
    let sub = Submodel::parse("s,xl", model.metadata(), 4).unwrap();
    let a = engine(&model).session(&sub).unwrap().forward_all(&toks).unwrap();
    let b = engine(&mapped).session(&sub).unwrap().forward_all(&toks).unwrap();
    assert_close(Tolerance::EXACT, &a, &b, "mmap vs owned");
    assert_eq!(engine(&mapped).model().path(), Some(path.as_path()));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn logits_are_finite_and_depend_on_the_submodel() {
    let c = &configs()[0];
    let model = build(c, 64, 131);
    let eng = engine(&model);
    let toks = tokens(6, 2);
    let subs = submodels(model.metadata());
    let outs: Vec<Vec<f32>> = subs.iter().map(|s| eng.session(s).unwrap().forward_all(&toks).unwrap()).collect();
    for o in &outs {
        assert!(o.iter().all(|v| v.is_finite()));
    }
    for i in 0..outs.len() {
        for j in i + 1..outs.len() {
            assert_ne!(outs[i], outs[j], "{:?} vs {:?}", subs[i], subs[j]);
        }
    }
}
