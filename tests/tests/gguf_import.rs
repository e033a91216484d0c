//! GGUF import: dequantisation parity with gguf-py per block type, the tiny Llama GGUF against
//! transformers (logits, greedy tokens, tokenizer ids), `--nest` keeping the full-width function,
//! and hostile GGUF files refused with one-line errors and no output file.
//!
//! Fixtures (tests/fixtures/README.md): gguf_dequant.gguf (scripts/gguf_dequant_fixture.py),
//! tiny_llama.gguf and tiny_llama_goldens.json (scripts/tiny_llama_gguf.py).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use matformer::cpu::{argmax, CpuEngine};
use matformer::elastic::{ElasticSession, StoredCatalog, SwitchMode, CATALOG_KEY};
use matformer::format::{DType, NestingOrigin};
use matformer::tokenizer::Tokenizer;
use matformer::{ModelFile, Submodel};
use matformer_export::gguf::{Gguf, GgufError};
use matformer_export::nest::{tokenize, NestOptions};
use matformer_export::verify::Tolerance;
use matformer_export::{import, ImportOptions};
use matformer_tests::temp_dir;

/// A file of tests/fixtures, located from this test's own crate directory (not the shared
/// `matformer_tests` library's, which a target directory shared between clones may have
/// compiled from another checkout).
fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

#[test]
fn dequantisation_is_bit_identical_to_gguf_py_for_every_block_type() {
    let bytes = std::fs::read(fixture("gguf_dequant.gguf")).unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    let mut checked = Vec::new();
    for name in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"] {
        let t = g.tensor(name).unwrap_or_else(|| panic!("fixture has {name}"));
        let e = g.tensor(&format!("{name}.expected")).unwrap();
        let ours = g.dequantize(t).unwrap();
        let want = g.dequantize(e).unwrap();
        assert_eq!(ours.len(), 1024);
        let differing = ours.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differing, 0, "{name}: {differing} of {} values differ from gguf-py", ours.len());
        checked.push(format!("{name}: {} values bit-identical", ours.len()));
    }
    eprintln!("{}", checked.join("\n"));
}

#[derive(serde::Deserialize)]
struct Encoding {
    text: String,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct TinyGoldens {
    prompt_ids: Vec<u32>,
    prompt_logits: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
    encodings: Vec<Encoding>,
}

fn tiny_goldens() -> TinyGoldens {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny_llama_goldens.json")).unwrap()).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn prompt_logits(path: &Path, levels: Option<Vec<u8>>, prompt: &[u32]) -> Vec<f32> {
    let model = Arc::new(ModelFile::open(path).unwrap());
    let sub = match levels {
        Some(l) => Submodel::new(l),
        None => Submodel::largest(model.metadata(), model.view().available_levels),
    };
    let engine = CpuEngine::new(model).unwrap();
    let mut s = engine.session(&sub).unwrap();
    s.forward_all(prompt).unwrap()
}

#[test]
fn tiny_llama_gguf_matches_transformers() {
    let g = tiny_goldens();
    let dir = temp_dir("gguf-tiny");
    for dtype in [DType::F32, DType::F16] {
        let out = dir.join(format!("tiny-{}.matf", dtype.name()));
        let (report, assets) = import(&ImportOptions {
            input: fixture("tiny_llama.gguf"),
            output: out.clone(),
            dtype: dtype.into(),
            nest: None,
        })
        .unwrap();
        assert_eq!(report.level_names, ["full"]);
        assert_eq!((report.n_layers, report.d_model, report.vocab_size), (2, 64, 261));
        assert_eq!((report.bos_id, report.eos_id, report.add_bos), (Some(258), Some(260), false));
        assert_eq!(report.tokenizer, "huggingface");
        assert!(assets.chat_template.as_deref().is_some_and(|t| t.contains("add_generation_prompt")));
        // The tokenizer as stored in the file (blob and metadata), not the importer's copy.
        let model = ModelFile::open(&out).unwrap();
        let tok = Tokenizer::from_model(&model).unwrap();
        assert_eq!(tok.eos_ids(), [260]);
        let stored = model.metadata().chat_template().unwrap().map(str::to_string);
        assert_eq!(stored, assets.chat_template);
        drop(model);
        for e in &g.encodings {
            assert_eq!(tokenize(&tok, &e.text).unwrap(), e.ids, "tokenizer ids of {:?}", e.text);
        }

        let ours = prompt_logits(&out, None, &g.prompt_ids);
        let reference: Vec<f32> = g.prompt_logits.iter().flatten().copied().collect();
        let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
        let tol = Tolerance::for_dtype(dtype);
        let diff = max_abs_diff(&ours, &reference);
        eprintln!("{}: prompt logits max|diff| {diff:.2e} (scale {scale:.2}, {})", dtype.name(), tol.name);
        assert!(diff <= tol.bound * scale, "{}: logits differ by {diff}", dtype.name());

        if dtype == DType::F32 {
            let model = Arc::new(ModelFile::open(&out).unwrap());
            let sub = Submodel::largest(model.metadata(), 1);
            let engine = CpuEngine::new(model).unwrap();
            let mut s = engine.session(&sub).unwrap();
            let mut logits = s.prefill(&g.prompt_ids).unwrap();
            let mut got = Vec::new();
            for _ in 0..g.greedy_ids.len() {
                let t = argmax(&logits);
                got.push(t);
                logits = s.decode(t).unwrap();
            }
            assert_eq!(got, g.greedy_ids, "greedy continuation");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn matching_gguf_blocks_are_stored_as_they_are() {
    // tiny_llama.gguf holds Q8_0, Q4_0 and Q4_1 tensors: importing with a block dtype keeps every
    // tensor of that ggml type byte for byte, except the down projection (stored transposed,
    // its blocks run across the file's rows), and the logits stay near transformers'.
    let g = tiny_goldens();
    let bytes = std::fs::read(fixture("tiny_llama.gguf")).unwrap();
    let gguf = Gguf::parse(&bytes).unwrap();
    let dir = temp_dir("gguf-blocks");
    for (dtype, ggml) in [(DType::Q8_0, "Q8_0"), (DType::Q4_0, "Q4_0"), (DType::Q4_1, "Q4_1")] {
        let out = dir.join(format!("tiny-{}.matf", dtype.name()));
        let (report, _) = import(&ImportOptions {
            input: fixture("tiny_llama.gguf"),
            output: out.clone(),
            dtype: dtype.into(),
            nest: None,
        })
        .unwrap();
        let of_type: Vec<&str> = gguf
            .tensors
            .iter()
            .filter(|t| matformer_export::gguf::GgmlType::code_name(t.type_code) == ggml && t.shape().len() == 2)
            .map(|t| t.name.as_str())
            .collect();
        assert!(!of_type.is_empty(), "the fixture has {ggml} tensors");
        let model = ModelFile::open(&out).unwrap();
        for name in &of_type {
            let canonical = canonical_name(name);
            let kept = report.kept_source_blocks.contains(&canonical);
            assert_eq!(kept, !name.contains("ffn_down"), "{name} ({ggml}): kept {kept}");
            assert_eq!(model.view().tensor(&canonical).unwrap().dtype, dtype);
            if kept && !name.contains("attn_q") && !name.contains("attn_k") {
                // Same row order: the bytes are the GGUF tensor's bytes.
                let t = gguf.tensor(name).unwrap();
                let (_, src) = gguf.tensor_bytes(t).unwrap();
                let ours: Vec<u8> = model
                    .tensor_segments(&canonical, t.shape()[0])
                    .unwrap()
                    .into_iter()
                    .flat_map(|(_, b)| b.to_vec())
                    .collect();
                assert_eq!(ours, src, "{name}");
            }
            if kept {
                // Decoding the kept blocks gives exactly the importer's dequantised values.
                let t = gguf.tensor(name).unwrap();
                let mut want = gguf.dequantize(t).unwrap();
                if name.contains("attn_q") || name.contains("attn_k") {
                    let heads = if name.contains("attn_q") { 4 } else { 2 };
                    want = matformer_export::gguf::llama::unpermute_rope_rows(&want, heads, 16, 64);
                }
                assert_eq!(model.tensor_f32(&canonical).unwrap(), want, "{name}");
            }
        }
        drop(model);
        let ours = prompt_logits(&out, None, &g.prompt_ids);
        let reference: Vec<f32> = g.prompt_logits.iter().flatten().copied().collect();
        let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
        let tol = Tolerance::for_dtype(dtype);
        let diff = max_abs_diff(&ours, &reference);
        eprintln!("{}: prompt logits max|diff| {diff:.2e} (scale {scale:.2}, {})", dtype.name(), tol.name);
        assert!(diff <= tol.bound * scale, "{}: logits differ by {diff}", dtype.name());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dtype_keep_stores_every_tensor_in_its_source_dtype() {
    // `--dtype keep` on tiny_llama.gguf (Q8_0, Q4_0, Q4_1 and float tensors): every matrix keeps
    // its ggml type's dtype (the blocks byte for byte where the rows allow: all but the down
    // projection), floats f16 or f32 as stored, and an override still wins.
    let bytes = std::fs::read(fixture("tiny_llama.gguf")).unwrap();
    let gguf = Gguf::parse(&bytes).unwrap();
    let dir = temp_dir("gguf-keep");
    let out = dir.join("tiny-keep.matf");
    let plan = matformer_export::DTypePlan::parse("keep", &["lm_head=q8".into()]).unwrap();
    let (report, _) =
        import(&ImportOptions { input: fixture("tiny_llama.gguf"), output: out.clone(), dtype: plan, nest: None })
            .unwrap();
    assert_eq!(report.dtype, "keep (lm_head=q8_0)");
    let model = ModelFile::open(&out).unwrap();
    let mut kinds = std::collections::BTreeSet::new();
    for t in &gguf.tensors {
        let canonical = match t.name.as_str() {
            "output_norm.weight" => "norm".to_string(),
            n if n.ends_with("_norm.weight") => {
                let (i, k) = n.strip_prefix("blk.").unwrap().split_once('.').unwrap();
                format!("layers.{i}.{}", k.trim_end_matches(".weight"))
            }
            n => canonical_name(n),
        };
        let ty = matformer_export::gguf::GgmlType::from_code(t.type_code).unwrap();
        let want = if canonical == "lm_head" { DType::Q8_0 } else { matformer_export::gguf::llama::keep_dtype(ty) };
        let got = model.view().tensor(&canonical).unwrap_or_else(|e| panic!("{canonical}: {e}")).dtype;
        assert_eq!(got, want, "{} ({ty:?})", t.name);
        kinds.insert(format!("{ty:?}"));
        let blocks = want.is_quantized() && canonical != "lm_head";
        assert_eq!(report.kept_source_blocks.contains(&canonical), blocks && !canonical.ends_with("ffn_down_t"));
    }
    for k in ["Q8_0", "Q4_0", "Q4_1"] {
        assert!(kinds.contains(k), "the fixture has {k} tensors: {kinds:?}");
    }
    drop(model);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The file name of a GGUF Llama tensor (`blk.1.attn_q.weight` -> `layers.1.wq`).
fn canonical_name(gguf_name: &str) -> String {
    let base = gguf_name.trim_end_matches(".weight");
    match base {
        "token_embd" => "tok_embeddings".into(),
        "output" => "lm_head".into(),
        _ => {
            let rest = base.strip_prefix("blk.").unwrap();
            let (i, t) = rest.split_once('.').unwrap();
            let t = match t {
                "attn_q" => "wq",
                "attn_k" => "wk",
                "attn_v" => "wv",
                "attn_output" => "wo",
                "ffn_down" => "ffn_down_t",
                other => other,
            };
            format!("layers.{i}.{t}")
        }
    }
}

#[test]
fn nest_orders_neurons_without_changing_the_full_width_function() {
    let g = tiny_goldens();
    let dir = temp_dir("gguf-nest");
    let cal = dir.join("calibration.txt");
    std::fs::write(&cal, "the theory of the thing: the other three, then the rest. ".repeat(8)).unwrap();
    let dense = dir.join("dense.matf");
    let nested = dir.join("nested.matf");
    import(&ImportOptions {
        input: fixture("tiny_llama.gguf"),
        output: dense.clone(),
        dtype: DType::F32.into(),
        nest: None,
    })
    .unwrap();
    let mut n = NestOptions::new(cal);
    n.chunk_tokens = 64;
    let (report, _) = import(&ImportOptions {
        input: fixture("tiny_llama.gguf"),
        output: nested.clone(),
        dtype: DType::F32.into(),
        nest: Some(n),
    })
    .unwrap();
    assert_eq!(report.level_names, ["s", "m", "l", "xl"]);
    assert_eq!(report.ffn_widths_layer0, [16, 32, 64, 128]);
    let nest = report.nest.expect("nest report");
    assert_eq!(nest.levels.len(), 4);
    for l in &nest.levels {
        eprintln!("level {} width {}: {:.4} nats/token", l.name, l.width, l.loss_nats_per_token);
        assert!(l.loss_nats_per_token.is_finite() && l.loss_nats_per_token > 0.0);
    }

    // Full width: the same function (a sum over the same neurons in another order).
    let a = prompt_logits(&dense, None, &g.prompt_ids);
    let b = prompt_logits(&nested, None, &g.prompt_ids);
    let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&a, &b);
    eprintln!("dense vs nested full width: max|diff| {diff:.2e} (scale {scale:.2})");
    assert!(diff <= Tolerance::F32_STORAGE.bound * scale);
    // And the nesting is real: the smallest level computes something else.
    let s = prompt_logits(&nested, Some(vec![0, 0]), &g.prompt_ids);
    assert!(max_abs_diff(&a, &s) > 1e-3);

    // The stored catalog holds each level's measured loss.
    let model = ModelFile::open(&nested).unwrap();
    let stored: StoredCatalog =
        serde_json::from_value(model.metadata().extra.get(CATALOG_KEY).expect("catalog stored").clone()).unwrap();
    assert_eq!(stored.entries.len(), 4);
    for (e, l) in stored.entries.iter().zip(&nest.levels) {
        assert_eq!(e.measured_loss, Some(l.loss_nats_per_token));
    }

    // The file says its levels were nested after training, and the plain import says nothing
    // (one level). So the default switch mode re-prefills an upshift and keeps the cache on a
    // downshift.
    assert_eq!(model.metadata().nesting(), NestingOrigin::PostHoc);
    assert_eq!(ModelFile::open(&dense).unwrap().metadata().nesting(), NestingOrigin::Unknown);
    let model = Arc::new(model);
    let levels = model.view().available_levels;
    let sub = |spec: &str| Submodel::parse(spec, model.metadata(), levels).unwrap();
    let mut es = ElasticSession::new(CpuEngine::new(model.clone()).unwrap(), &sub("s")).unwrap();
    es.prefill(&g.prompt_ids).unwrap();
    let up = es.switch_with(&sub("xl"), SwitchMode::Auto).unwrap();
    assert_eq!(up.mode, SwitchMode::Exact);
    assert_eq!(up.reprefilled_tokens, g.prompt_ids.len());
    let down = es.switch_with(&sub("m"), SwitchMode::Auto).unwrap();
    assert_eq!(down.mode, SwitchMode::KeepKv);
    assert_eq!(down.reprefilled_tokens, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Hostile input.

/// A minimal GGUF writer for crafting hostile files.
#[derive(Default)]
struct Writer {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
}

impl Writer {
    fn string(buf: &mut Vec<u8>, s: &str) {
        buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    }
    fn kv_str(mut self, k: &str, v: &str) -> Self {
        Self::string(&mut self.kv, k);
        self.kv.extend_from_slice(&8u32.to_le_bytes());
        Self::string(&mut self.kv, v);
        self.n_kv += 1;
        self
    }
    fn kv_raw(mut self, k: &str, ty: u32, raw: &[u8]) -> Self {
        Self::string(&mut self.kv, k);
        self.kv.extend_from_slice(&ty.to_le_bytes());
        self.kv.extend_from_slice(raw);
        self.n_kv += 1;
        self
    }
    fn tensor(mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> Self {
        Self::string(&mut self.infos, name);
        self.infos.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for d in ne {
            self.infos.extend_from_slice(&d.to_le_bytes());
        }
        self.infos.extend_from_slice(&ty.to_le_bytes());
        self.infos.extend_from_slice(&offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }
    fn build(&self, data_len: usize) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&self.n_tensors.to_le_bytes());
        out.extend_from_slice(&self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kv);
        out.extend_from_slice(&self.infos);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.resize(out.len() + data_len, 0);
        out
    }
}

fn parse_err(bytes: &[u8]) -> String {
    match Gguf::parse(bytes) {
        Ok(_) => panic!("hostile GGUF accepted"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "one-line error: {msg}");
            msg
        }
    }
}

#[test]
fn hostile_gguf_headers_are_refused_with_one_line_errors() {
    let ok = Writer::default().kv_str("general.architecture", "llama").tensor("t", &[32, 2], 0, 0).build(256);
    assert!(Gguf::parse(&ok).is_ok());

    let mut bad_magic = ok.clone();
    bad_magic[0] = b'X';
    assert!(parse_err(&bad_magic).contains("not a GGUF file"));
    let mut v9 = ok.clone();
    v9[4] = 9;
    assert!(parse_err(&v9).contains("unsupported GGUF version 9"));

    // Every truncation of the header and data is refused, never a panic.
    for cut in 0..ok.len() {
        let e = Gguf::parse(&ok[..cut]);
        assert!(e.is_err(), "truncated at {cut} accepted");
    }
    // Counts that lie.
    let mut many = ok.clone();
    many[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(parse_err(&many).contains("tensors"));
    let mut kvs = ok.clone();
    kvs[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(parse_err(&kvs).contains("metadata"));
    // A string length beyond the file.
    let long = Writer::default().kv_raw("k", 8, &(u64::MAX / 2).to_le_bytes()).build(0);
    parse_err(&long);
    // An array claiming 2^60 elements.
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(parse_err(&Writer::default().kv_raw("a", 9, &arr).build(0)).contains("truncated"));
    // Arrays nested too deep.
    let mut nested = Vec::new();
    for _ in 0..8 {
        nested.extend_from_slice(&9u32.to_le_bytes());
        nested.extend_from_slice(&1u64.to_le_bytes());
    }
    nested.extend_from_slice(&4u32.to_le_bytes());
    nested.extend_from_slice(&0u64.to_le_bytes());
    assert!(parse_err(&Writer::default().kv_raw("n", 9, &nested).build(0)).contains("nested"));
    // Unknown value type, bad bool, invalid UTF-8, duplicate key.
    assert!(parse_err(&Writer::default().kv_raw("x", 77, &[0; 8]).build(0)).contains("unknown value type 77"));
    assert!(parse_err(&Writer::default().kv_raw("b", 7, &[2]).build(0)).contains("boolean"));
    let mut bad_utf8 = 2u64.to_le_bytes().to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    assert!(parse_err(&Writer::default().kv_raw("s", 8, &bad_utf8).build(0)).contains("UTF-8"));
    assert!(parse_err(&Writer::default().kv_str("k", "a").kv_str("k", "b").build(0)).contains("twice"));
    // Tensor table: data outside the file, overlap, misalignment, zero/too many dims,
    // element-count overflow, a row not a whole number of blocks, duplicate names.
    assert!(parse_err(&Writer::default().tensor("t", &[32, 100], 0, 0).build(64)).contains("truncated"));
    assert!(parse_err(&Writer::default().tensor("t", &[8], 0, u64::MAX - 31).build(64)).contains("truncated"));
    assert!(
        parse_err(&Writer::default().tensor("a", &[16], 0, 0).tensor("b", &[16], 0, 32).build(128)).contains("overlap")
    );
    assert!(parse_err(&Writer::default().tensor("t", &[8], 0, 4).build(64)).contains("multiple of 32"));
    assert!(parse_err(&Writer::default().tensor("t", &[], 0, 0).build(64)).contains("dimensions"));
    assert!(parse_err(&Writer::default().tensor("t", &[1, 1, 1, 1, 1], 0, 0).build(64)).contains("dimensions"));
    assert!(parse_err(&Writer::default().tensor("t", &[0], 0, 0).build(64)).contains("zero"));
    assert!(parse_err(&Writer::default().tensor("t", &[1 << 32, 1 << 32], 0, 0).build(64)).contains("elements"));
    assert!(parse_err(&Writer::default().tensor("t", &[33], 8, 0).build(64)).contains("block size"));
    assert!(parse_err(&Writer::default().tensor("t", &[8], 0, 0).tensor("t", &[8], 0, 32).build(64)).contains("twice"));
    let al = Writer::default().kv_raw("general.alignment", 4, &3u32.to_le_bytes()).build(0);
    assert!(parse_err(&al).contains("alignment"));

    // An unsupported tensor type parses (it may be unused) but is refused when read, by name.
    let q5 = Writer::default().tensor("w", &[32], 6, 0).build(64);
    let g = Gguf::parse(&q5).unwrap();
    let e = g.dequantize(&g.tensors[0]).unwrap_err();
    assert!(matches!(e, GgufError::UnsupportedType { .. }));
    assert!(e.to_string().contains("Q5_0"), "{e}");
}

fn import_err(input: PathBuf, out: &Path) -> String {
    let e = import(&ImportOptions { input, output: out.to_path_buf(), dtype: DType::F16.into(), nest: None })
        .expect_err("hostile import refused");
    let msg = format!("{e:#}");
    assert!(!msg.contains('\n'), "one-line error: {msg}");
    assert!(!out.exists(), "no output file after a failed import");
    assert!(!out.with_extension("matf.partial").exists(), "no partial file left");
    msg
}

#[test]
fn hostile_and_unsupported_gguf_models_leave_no_file() {
    let dir = temp_dir("gguf-hostile");
    let out = dir.join("out.matf");
    let tiny = std::fs::read(fixture("tiny_llama.gguf")).unwrap();
    // Truncations of the real file at a spread of lengths (header, tokenizer, tensor data).
    for cut in [0, 3, 8, 23, 100, 1000, 5000, 20_000, 60_000, tiny.len() - 1] {
        let p = dir.join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &tiny[..cut]).unwrap();
        let msg = import_err(p, &out);
        assert!(msg.contains("truncated") || msg.contains("not a GGUF"), "cut {cut}: {msg}");
    }
    // Another architecture, another tokenizer model: named in the error (the value is the
    // string right after its key: type u32, length u64, bytes).
    let p = dir.join("arch.gguf");
    let mut b = tiny.clone();
    let key = b"general.architecture";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 8;
    b[at..at + 5].copy_from_slice(b"gemma");
    std::fs::write(&p, &b).unwrap();
    assert!(import_err(p, &out).contains("`gemma`"));
    let p = dir.join("tok.gguf");
    let mut b = tiny.clone();
    let key = b"tokenizer.ggml.model";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 8;
    b[at..at + 4].copy_from_slice(b"rwkv");
    std::fs::write(&p, &b).unwrap();
    assert!(import_err(p, &out).contains("`rwkv`"));
    // A tensor of a type we do not dequantise: change ffn_gate of block 0 to Q5_0 (same block
    // size as Q4_0, so the table still parses).
    let p = dir.join("type.gguf");
    let mut b = tiny.clone();
    let name = b"blk.0.ffn_gate.weight";
    let at = b.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
    assert_eq!(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()), 2, "Q4_0 in fixture");
    b[at..at + 4].copy_from_slice(&6u32.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let msg = import_err(p, &out);
    assert!(msg.contains("Q5_0") && msg.contains("blk.0.ffn_gate.weight"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}
