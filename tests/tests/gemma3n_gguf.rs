//! Gemma 3n from GGUF as llama.cpp writes it: tests/fixtures/gemma3n_tiny.{f32,q8_0}.gguf are
//! tests/fixtures/gemma3n_tiny_hf converted by llama.cpp's own `convert_hf_to_gguf.py`
//! (exporter/python/make_gemma3n_gguf_fixture.py; tests/fixtures/gemma3n_tiny_gguf.README.md).
//! The import must give the Hugging Face import's file: the same metadata and tensors (bit for
//! bit from the f32 GGUF; Q8_0 blocks kept as they are from the q8_0 one), transformers'
//! logits and greedy tokens, and hostile copies must be refused with no file left.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use matformer::cpu::CpuEngine;
use matformer::format::{DType, Gemma3nConfig};
use matformer::{ModelFile, Submodel};
use matformer_export::gguf::{GgmlType, Gguf};
use matformer_export::verify::Tolerance;
use matformer_export::{import, DTypePlan, ImportOptions, ImportReport};
use matformer_tests::temp_dir;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn run(input: &Path, out: &Path, dtype: &str) -> anyhow::Result<ImportReport> {
    import(&ImportOptions {
        input: input.to_path_buf(),
        output: out.to_path_buf(),
        dtype: DTypePlan::parse(dtype, &[]).unwrap(),
        nest: None,
    })
    .map(|(r, _)| r)
}

fn raw(model: &ModelFile, name: &str) -> Vec<u8> {
    let rows = model.view().tensor(name).unwrap().rows();
    model.tensor_segments(name, rows).unwrap().into_iter().flat_map(|(_, b)| b.to_vec()).collect()
}

/// The f32 GGUF gives the Hugging Face import's file: same metadata (but provenance and the
/// tokenizer, rebuilt from the GGUF's metadata), same tensor list, dtypes and bytes.
#[test]
fn f32_gguf_gives_the_hugging_face_import_bit_for_bit() {
    let dir = temp_dir("g3n-gguf-f32");
    let (hf, gg) = (dir.join("hf.matf"), dir.join("gguf.matf"));
    run(&fixture("gemma3n_tiny_hf"), &hf, "f32").unwrap();
    let report = run(&fixture("gemma3n_tiny.f32.gguf"), &gg, "f32").unwrap();
    assert_eq!(report.source_format, "gguf");
    assert_eq!(report.family, "gemma3n");
    assert_eq!(report.level_names, ["half", "full"]);
    assert_eq!(report.ffn_widths_layer0, [64, 128]);
    assert!(report.has_chat_template);
    assert_eq!((report.bos_id, report.eos_id), (Some(2), Some(1)));
    assert!(report.end_of_turn.iter().any(|t| t == "<end_of_turn>"), "{:?}", report.end_of_turn);
    assert!(report.notes.iter().any(|n| n.contains("dropped its last 44 rows")), "{:?}", report.notes);
    let (a, b) = (ModelFile::open(&hf).unwrap(), ModelFile::open(&gg).unwrap());
    let (ma, mb) = (a.metadata(), b.metadata());
    assert_eq!(ma.architecture, mb.architecture);
    assert_eq!(ma.ffn_widths, mb.ffn_widths);
    assert_eq!(ma.level_names, mb.level_names);
    assert_eq!(ma.nesting(), mb.nesting());
    let (ga, gb) = (Gemma3nConfig::from_metadata(ma).unwrap(), Gemma3nConfig::from_metadata(mb).unwrap());
    assert_eq!(ga, gb);
    assert_eq!(gb.unwrap().per_layer_vocab, 256);
    assert_eq!(mb.chat_template().unwrap(), ma.chat_template().unwrap());
    let names = |m: &ModelFile| m.view().tensors.iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone())).collect();
    let (na, nb): (Vec<_>, Vec<_>) = (names(&a), names(&b));
    assert_eq!(na, nb);
    for (name, _, _) in &na {
        assert!(raw(&a, name) == raw(&b, name), "{name}: bytes differ");
    }
    eprintln!("{} tensors bit-identical", na.len());
    let _ = std::fs::remove_dir_all(&dir);
}

#[derive(serde::Deserialize)]
struct Variant {
    name: String,
    layers_skipped: Vec<usize>,
    ffn_widths: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Goldens {
    prompt_ids: Vec<u32>,
    variants: Vec<Variant>,
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

fn submodel_of(v: &Variant, model: &ModelFile) -> Submodel {
    let meta = model.metadata();
    let spec: Vec<String> = (0..v.ffn_widths.len())
        .map(|i| {
            if v.layers_skipped.contains(&i) {
                "-".to_string()
            } else {
                meta.ffn_widths[i].iter().position(|&w| w == v.ffn_widths[i]).unwrap().to_string()
            }
        })
        .collect();
    Submodel::parse(&spec.join(","), meta, model.view().available_levels).unwrap()
}

/// Every variant's prompt logits against transformers, within `tol` of the largest reference
/// logit; greedy tokens (decoded through the KV cache) identical when `greedy`. Returns the
/// largest difference.
fn check_goldens(path: &Path, tol: Tolerance, greedy: bool) -> f32 {
    let g: Goldens =
        serde_json::from_str(&std::fs::read_to_string(fixture("gemma3n_tiny_goldens.json")).unwrap()).unwrap();
    let model = Arc::new(ModelFile::open(path).unwrap());
    let engine = CpuEngine::new(Arc::clone(&model)).unwrap();
    let mut worst = 0f32;
    for v in &g.variants {
        let sub = submodel_of(v, &model);
        let ours = engine.session(&sub).unwrap().forward_all(&g.prompt_ids).unwrap();
        let reference: Vec<f32> = v.logits.iter().flatten().copied().collect();
        assert_eq!(ours.len(), reference.len(), "{}", v.name);
        let scale = reference.iter().fold(1f32, |m, x| m.max(x.abs()));
        let diff = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("{:<10}: max|diff| {diff:.2e} (scale {scale:.2}, {})", v.name, tol.name);
        assert!(diff <= tol.bound * scale, "{}: {diff}", v.name);
        worst = worst.max(diff);
        let mut s = engine.session(&sub).unwrap();
        let mut next = argmax(&s.prefill(&g.prompt_ids).unwrap());
        let mut got = Vec::new();
        for _ in 0..v.greedy.len() {
            got.push(next);
            next = argmax(&s.decode(next).unwrap());
        }
        if greedy {
            assert_eq!(got, v.greedy, "{}: greedy tokens", v.name);
        } else {
            eprintln!("{:<10}: greedy {got:?}, transformers {:?}", v.name, v.greedy);
        }
    }
    worst
}

/// The f32 GGUF's import against transformers' goldens: the tolerance of
/// tests/tests/gemma3n_parity.rs (`Tolerance::F32_STORAGE`), greedy tokens identical.
#[test]
fn f32_gguf_matches_transformers() {
    let dir = temp_dir("g3n-gguf-parity");
    let out = dir.join("gguf.matf");
    run(&fixture("gemma3n_tiny.f32.gguf"), &out, "f32").unwrap();
    let worst = check_goldens(&out, Tolerance::F32_STORAGE, true);
    eprintln!("f32 GGUF: max|diff| over all variants {worst:.2e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The q8_0 GGUF (what `convert_hf_to_gguf.py --outtype q8_0` writes: Q8_0 matrices, F16 where
/// rows are not whole blocks, F32 vectors and small matrices): under `--dtype keep` every Q8_0
/// tensor but the down projections is stored block for block (the AltUp slices as their part
/// of the stacked tensor), everything else holds exactly the GGUF's dequantised values; the
/// logits stay within the 8-bit tolerance.
#[test]
fn q8_0_gguf_keeps_its_blocks() {
    let dir = temp_dir("g3n-gguf-q8");
    let out = dir.join("gguf-q8.matf");
    let src = fixture("gemma3n_tiny.q8_0.gguf");
    let report = run(&src, &out, "keep").unwrap();
    let bytes = std::fs::read(&src).unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    let model = ModelFile::open(&out).unwrap();
    let mut n_kept = 0;
    for t in &model.view().tensors {
        let (gname, slice) = gguf_source(&t.name);
        let gt = g.tensor(&gname).unwrap_or_else(|| panic!("{gname}"));
        let (ty, src_bytes) = g.tensor_bytes(gt).unwrap();
        let mut want = g.dequantize(gt).unwrap();
        let rows = t.rows() as usize;
        let row_elems = (t.shape.iter().product::<u64>() / t.rows()) as usize;
        let down = t.name.ends_with("ffn_down_t");
        // A stacked AltUp tensor holds `n` slices; the canonical tensor is slice `j`.
        let n_slices = if slice.is_some() { gt.shape()[0] as usize } else { 1 };
        let (piece, byte_piece) = (want.len() / n_slices, src_bytes.len() / n_slices);
        if down {
            let (r, c) = (gt.shape()[0] as usize, gt.shape()[1] as usize);
            want = (0..c).flat_map(|j| (0..r).map(move |i| (i, j))).map(|(i, j)| want[i * c + j]).collect();
        } else if let Some(j) = slice {
            want = want[j * piece..(j + 1) * piece].to_vec();
        } else {
            want.truncate(rows * row_elems); // the per-layer table's padding rows
        }
        let kept = report.kept_source_blocks.contains(&t.name);
        let is_q8 = ty == GgmlType::Q8_0;
        // The plan keeps the small AltUp router ([4, d]) in f16 whatever the dtype.
        let small = t.name.ends_with("altup.router");
        assert_eq!(kept, is_q8 && !down && !small, "{}: kept {kept}, source {ty:?}", t.name);
        if kept {
            assert_eq!(t.dtype, DType::Q8_0, "{}", t.name);
            let ours = raw(&model, &t.name);
            let start = slice.unwrap_or(0) * byte_piece;
            assert!(ours == src_bytes[start..start + ours.len()], "{}: blocks differ", t.name);
            n_kept += 1;
        }
        if !down {
            let got = model.tensor_f32(&t.name).unwrap();
            if small {
                // f16 of the Q8_0 values.
                assert_eq!(t.dtype, DType::F16);
                assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-3 * w.abs()), "{}", t.name);
            } else {
                assert_eq!(got, want, "{}: values", t.name);
            }
        }
    }
    assert!(n_kept >= 60, "{n_kept} kept");
    eprintln!("{n_kept} tensors kept block for block");
    drop(model);
    let worst = check_goldens(&out, Tolerance::Q8_STORAGE, false);
    eprintln!("q8_0 GGUF (--dtype keep): max|diff| over all variants {worst:.2e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The GGUF tensor of a `.matf` tensor (and its slice of a stacked AltUp tensor).
fn gguf_source(name: &str) -> (String, Option<usize>) {
    let plain = [
        ("tok_embeddings", "token_embd"),
        ("per_layer_embeddings", "per_layer_token_embd"),
        ("per_layer_model_projection", "per_layer_model_proj"),
        ("per_layer_projection_norm", "per_layer_proj_norm"),
        ("norm", "output_norm"),
    ];
    if let Some((_, g)) = plain.iter().find(|(c, _)| *c == name) {
        return (format!("{g}.weight"), None);
    }
    if let Some(j) = name.strip_prefix("altup_proj.") {
        return ("altup_proj.weight".into(), Some(j.parse().unwrap()));
    }
    if let Some(j) = name.strip_prefix("altup_unembed.") {
        return ("altup_unembd_proj.weight".into(), Some(j.parse().unwrap()));
    }
    let (i, suffix) = name.strip_prefix("layers.").unwrap().split_once('.').unwrap();
    let g = match suffix {
        "attn_norm" => "attn_norm",
        "post_attn_norm" => "post_attention_norm",
        "ffn_norm" => "ffn_norm",
        "post_ffn_norm" => "post_ffw_norm",
        "wq" => "attn_q",
        "wk" => "attn_k",
        "wv" => "attn_v",
        "wo" => "attn_output",
        "q_norm" => "attn_q_norm",
        "k_norm" => "attn_k_norm",
        "ffn_gate" => "ffn_gate",
        "ffn_up" => "ffn_up",
        "ffn_down_t" => "ffn_down",
        "altup.correct_output_scale" => "altup_correct_scale",
        "altup.correction_coefs" => "altup_correct_coef",
        "altup.prediction_coefs" => "altup_predict_coef",
        "altup.router" => "altup_router",
        "altup.router_norm" => "altup_router_norm",
        "laurel.left" => "laurel_l",
        "laurel.right" => "laurel_r",
        "laurel.norm" => "laurel_post_norm",
        "ple.gate" => "inp_gate",
        "ple.proj" => "proj",
        "ple.norm" => "post_norm",
        other => panic!("unexpected tensor {name} ({other})"),
    };
    (format!("blk.{i}.{g}.weight"), None)
}

/// Byte offset just after the GGUF string `s` (its u64 length prefix included) in `b`.
fn after(b: &[u8], s: &str) -> usize {
    let mut pat = (s.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(s.as_bytes());
    b.windows(pat.len()).position(|w| w == pat).unwrap_or_else(|| panic!("{s} not in the fixture")) + pat.len()
}

fn refused(tag: &str, needle: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let dir = temp_dir(tag);
    let mut b = std::fs::read(fixture("gemma3n_tiny.f32.gguf")).unwrap();
    edit(&mut b);
    let input = dir.join("bad.gguf");
    std::fs::write(&input, &b).unwrap();
    let out = dir.join("out.matf");
    let err = format!("{:#}", run(&input, &out, "f32").expect_err(tag));
    eprintln!("{tag}: {err}");
    assert!(err.contains(needle), "{tag}: {err}");
    assert!(!out.exists() && !out.with_extension("matf.partial").exists(), "{tag}: a file was left");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_gemma3n_ggufs_are_refused_with_no_output() {
    // A tensor renamed: the one it replaced is missing.
    refused("g3n-gguf-missing", "no tensor `blk.3.laurel_l.weight`", |b| {
        let at = after(b, "blk.3.laurel_l.weight");
        b[at - 8..at - 7].copy_from_slice(b"x");
    });
    // A tensor's two dimensions swapped (same byte size).
    refused("g3n-gguf-shape", "tensor `blk.2.laurel_l.weight` (layers.2.laurel.left) has shape [64, 8]", |b| {
        let at = after(b, "blk.2.laurel_l.weight") + 4;
        let (ne0, ne1) = (b[at..at + 8].to_vec(), b[at + 8..at + 16].to_vec());
        b[at..at + 8].copy_from_slice(&ne1);
        b[at + 8..at + 16].copy_from_slice(&ne0);
    });
    // As many KV-shared layers as layers.
    refused("g3n-gguf-kvshared", "gemma3n.attention.shared_kv_layers", |b| {
        let at = after(b, "gemma3n.attention.shared_kv_layers") + 4;
        b[at..at + 4].copy_from_slice(&10u32.to_le_bytes());
    });
    // A sparsity that is not a probability's quantile.
    refused("g3n-gguf-sparsity", "gemma3n.activation_sparsity_scale", |b| {
        let at = after(b, "gemma3n.activation_sparsity_scale") + 4 + 4 + 8;
        b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    // Truncated: the data section ends early.
    refused("g3n-gguf-truncated", "truncated", |b| {
        let n = b.len() / 2;
        b.truncate(n);
    });
    // Gemma 3n GGUFs are nested already.
    let dir = temp_dir("g3n-gguf-nest");
    let out = dir.join("out.matf");
    let err = import(&ImportOptions {
        input: fixture("gemma3n_tiny.f32.gguf"),
        output: out.clone(),
        dtype: DTypePlan::parse("f32", &[]).unwrap(),
        nest: Some(matformer_export::nest::NestOptions::new(fixture("heldout.txt"))),
    })
    .expect_err("--nest");
    assert!(format!("{err:#}").contains("--nest does not apply to Gemma 3n"), "{err:#}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
