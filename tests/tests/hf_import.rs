//! `matformer import DIR`: a Hugging Face Llama directory (tests/fixtures/tiny_llama_hf, made by
//! scripts/tiny_llama_gguf.py) against transformers' float32 logits, and hostile directories
//! (truncated or lying safetensors, unsupported configs) refused with no output file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use matformer::cpu::CpuEngine;
use matformer::format::DType;
use matformer::tokenizer::Tokenizer;
use matformer::{ModelFile, Submodel};
use matformer_export::verify::Tolerance;
use matformer_export::{import, ImportOptions};
use matformer_tests::temp_dir;

/// A file of tests/fixtures, located from this test's own crate directory (not the shared
/// `matformer_tests` library's, which a target directory shared between clones may have
/// compiled from another checkout).
fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

#[derive(serde::Deserialize)]
struct Goldens {
    prompt_ids: Vec<u32>,
    hf_prompt_logits: Vec<Vec<f32>>,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn hf_directory_matches_transformers() {
    let g: Goldens =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_llama_goldens.json")).unwrap()).unwrap();
    let dir = temp_dir("hf-import");
    let out = dir.join("tiny.matf");
    let (report, assets) = import(&ImportOptions {
        input: fixture("tiny_llama_hf"),
        output: out.clone(),
        dtype: DType::F32.into(),
        nest: None,
    })
    .unwrap();
    assert_eq!(report.source_format, "huggingface");
    assert_eq!((report.n_layers, report.d_model, report.vocab_size), (2, 64, 261));
    assert_eq!((report.bos_id, report.eos_id), (Some(258), Some(260)));
    assert!(assets.chat_template.as_deref().is_some_and(|t| t.contains("<|im_start|>")), "chat_template.jinja");
    let model = Arc::new(ModelFile::open(&out).unwrap());
    // generation_config.json's second eos id (0) ends a generation too, as stored in the file.
    let tok = Tokenizer::from_model(&model).unwrap();
    assert_eq!(tok.eos_ids(), [260, 0]);
    assert_eq!(model.metadata().chat_template().unwrap(), assets.chat_template.as_deref());
    let sub = Submodel::largest(model.metadata(), 1);
    let engine = CpuEngine::new(model).unwrap();
    let ours = engine.session(&sub).unwrap().forward_all(&g.prompt_ids).unwrap();
    let reference: Vec<f32> = g.hf_prompt_logits.iter().flatten().copied().collect();
    let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("HF dir f32: prompt logits max|diff| {diff:.2e} (scale {scale:.2})");
    assert!(diff <= Tolerance::F32_STORAGE.bound * scale);
    let _ = std::fs::remove_dir_all(&dir);
}

fn refused(input: &Path, out: &Path) -> String {
    let e = import(&ImportOptions {
        input: input.to_path_buf(),
        output: out.to_path_buf(),
        dtype: DType::F16.into(),
        nest: None,
    })
    .expect_err("refused");
    let msg = format!("{e:#}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(!out.exists() && !out.with_extension("matf.partial").exists(), "no file left");
    msg
}

#[test]
fn hostile_hf_directories_are_refused() {
    let dir = temp_dir("hf-hostile");
    let out = dir.join("out.matf");
    let src = fixture("tiny_llama_hf");
    let st = std::fs::read(src.join("model.safetensors")).unwrap();

    // Truncated safetensors: in the header-length field, in the header, in the data.
    for cut in [4usize, 20, 200, st.len() / 2, st.len() - 1] {
        let d = dir.join(format!("cut{cut}"));
        copy_dir(&src, &d);
        std::fs::write(d.join("model.safetensors"), &st[..cut]).unwrap();
        let msg = refused(&d, &out);
        assert!(msg.contains("model.safetensors"), "cut {cut}: {msg}");
    }
    // A header length far beyond the file.
    let d = dir.join("hugeheader");
    copy_dir(&src, &d);
    let mut b = st.clone();
    b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(d.join("model.safetensors"), &b).unwrap();
    refused(&d, &out);

    // Unsupported model type and RoPE scaling, named.
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let d = dir.join("qwen2");
    copy_dir(&src, &d);
    std::fs::write(
        d.join("config.json"),
        config.replace("LlamaForCausalLM", "Qwen2ForCausalLM").replace("\"llama\"", "\"qwen2\""),
    )
    .unwrap();
    assert!(refused(&d, &out).contains("Qwen2ForCausalLM"));
    let d = dir.join("scaled");
    copy_dir(&src, &d);
    std::fs::write(d.join("config.json"), config.replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\""))
        .unwrap();
    assert!(refused(&d, &out).contains("yarn"));
    // No tokenizer.json.
    let d = dir.join("notok");
    copy_dir(&src, &d);
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    assert!(refused(&d, &out).contains("tokenizer.json"));
    // A shard index pointing outside the directory.
    let d = dir.join("escape");
    copy_dir(&src, &d);
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"lm_head.weight": "../model.safetensors"}}"#,
    )
    .unwrap();
    assert!(refused(&d, &out).contains("plain file name"));
    let _ = std::fs::remove_dir_all(&dir);
}
