//! `matformer export` on the ONNX current PyTorch writes (`torch.onnx.export(..., dynamo=True)`)
//! for a transformers `LlamaForCausalLM`, with a dynamic and with a static sequence axis
//! (tests/fixtures/dynamo_llama_*, made by exporter/python/export_dynamo_llama.py), read with the
//! model's Hugging Face config.json: the weights are found by graph structure, the export
//! verifies against tract-onnx, and the written file reproduces PyTorch's own logits.

use std::path::{Path, PathBuf};

use matformer::format::DType;
use matformer::ModelFile;
use matformer_export::mapping::{find_weights, Strategy};
use matformer_export::onnx_source::{SourceModel, WeightRef};
use matformer_export::tract_run;
use matformer_export::verify::{verify_against_goldens, Tolerance};
use matformer_export::{export, ExportOptions, VerifyOptions};
use matformer_tests::{fixture, temp_dir};

const CONFIG: &str = "dynamo_llama.config.json";
const GOLDENS: &str = "dynamo_llama.goldens.json";

fn opts(input: &Path, output: &Path, config: Option<PathBuf>) -> ExportOptions {
    ExportOptions {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        dtype: DType::F32.into(),
        widths: None,
        config,
        strategy: Strategy::Auto,
        verify: Some(VerifyOptions::default()),
        calibration: None,
    }
}

/// Exports `onnx` with the HF config, checks the tract verification, then checks the written
/// file against PyTorch's goldens. Returns the written file.
fn export_and_verify(onnx: &str, dir: &Path, probe_len: usize) -> PathBuf {
    let out = dir.join(onnx.replace(".onnx", ".matf"));
    let report = export(&opts(&fixture(onnx), &out, Some(fixture(CONFIG)))).expect("export with verification");
    assert_eq!(report.weights_found_by, "graph structure");
    let v = report.verification.expect("verified");
    assert_eq!(v.reference, "tract-onnx");
    assert!(v.passed, "{}", v.summary());
    assert_eq!(v.tolerance, Tolerance::F32_STORAGE);
    // One level (a dense HF model), two probes.
    assert_eq!(v.checks.len(), 2, "{v:?}");
    for c in &v.checks {
        assert_eq!(c.positions, probe_len);
        assert_eq!(c.argmax_agree, c.positions);
        assert!(c.max_abs_ref > 0.05, "the logits are not trivially zero: {c:?}");
    }
    let g = verify_against_goldens(&out, &fixture(GOLDENS), &VerifyOptions::default()).expect("goldens");
    assert!(g.passed, "{}", g.summary());
    assert_eq!(g.checks.len(), 2);
    out
}

#[test]
fn dynamic_sequence_export_verifies() {
    let dir = temp_dir("dynamo-dynamic");
    export_and_verify("dynamo_llama_dynamic.onnx", &dir, 24);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn static_sequence_export_verifies_at_its_length() {
    let src = SourceModel::load(&fixture("dynamo_llama_static.onnx")).unwrap();
    assert_eq!(tract_run::fixed_sequence_len(&src.proto).unwrap(), Some(7));
    let Err(e) = tract_run::runnable(&src.proto, 9) else { panic!("a static graph refuses another length") };
    assert!(format!("{e:#}").contains("static sequence length of 7"), "{e:#}");
    let dir = temp_dir("dynamo-static");
    export_and_verify("dynamo_llama_static.onnx", &dir, 7);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn both_exports_give_the_same_weights() {
    let dir = temp_dir("dynamo-same");
    let a = dir.join("a.matf");
    let b = dir.join("b.matf");
    let mut o = opts(&fixture("dynamo_llama_dynamic.onnx"), &a, Some(fixture(CONFIG)));
    o.verify = None;
    export(&o).unwrap();
    let mut o = opts(&fixture("dynamo_llama_static.onnx"), &b, Some(fixture(CONFIG)));
    o.verify = None;
    export(&o).unwrap();
    let (a, b) = (ModelFile::open(&a).unwrap(), ModelFile::open(&b).unwrap());
    let names: Vec<String> = a.view().tensors.iter().map(|t| t.name.clone()).collect();
    assert_eq!(names.len(), 2 + 1 + 2 * 9, "embeddings, lm_head, norm, 9 per layer");
    for name in &names {
        assert_eq!(a.tensor_f32(name).unwrap(), b.tensor_f32(name).unwrap(), "`{name}`");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn structure_finds_the_named_parameters() {
    // The dynamo exporter keeps the HF names of parameters it uses as they are (embedding,
    // norm gains) and stores Linear weights transposed as anonymous `val_N` constants: the
    // structural mapping must land on the named ones and take the others as [in, out].
    let src = SourceModel::load(&fixture("dynamo_llama_dynamic.onnx")).unwrap();
    let config = src.config(Some(&fixture(CONFIG))).unwrap();
    let map = find_weights(&src, &config.architecture, &Strategy::Structure).unwrap();
    let name_of = |canonical: &str| {
        let loc = map.get(canonical).unwrap();
        assert!(matches!(loc.weight, WeightRef::Initializer(_)));
        (src.weight_name(&loc.weight), loc.transposed)
    };
    assert_eq!(name_of("tok_embeddings").0, "model.embed_tokens.weight");
    assert_eq!(name_of("norm").0, "model.norm.weight");
    for i in 0..2 {
        assert_eq!(name_of(&format!("layers.{i}.attn_norm")).0, format!("model.layers.{i}.input_layernorm.weight"));
        assert_eq!(
            name_of(&format!("layers.{i}.ffn_norm")).0,
            format!("model.layers.{i}.post_attention_layernorm.weight")
        );
        for m in ["wq", "wk", "wv", "wo", "ffn_gate", "ffn_up", "ffn_down"] {
            let (name, transposed) = name_of(&format!("layers.{i}.{m}"));
            assert!(name.starts_with("val_") && transposed, "layers.{i}.{m}: `{name}`, transposed {transposed}");
        }
    }
    let (lm_head, transposed) = name_of("lm_head");
    assert!(lm_head.starts_with("val_") && transposed);
}

#[test]
fn nested_widths_verify_on_the_dynamic_export() {
    let dir = temp_dir("dynamo-widths");
    let out = dir.join("w.matf");
    let mut o = opts(&fixture("dynamo_llama_dynamic.onnx"), &out, Some(fixture(CONFIG)));
    o.widths = Some(vec![32, 64, 128]);
    let v = export(&o).expect("export").verification.unwrap();
    assert!(v.passed, "{}", v.summary());
    // 3 uniform levels + 1 Mix'n'Match, 2 probes each; the sliced graphs differ.
    assert_eq!(v.checks.len(), 8);
    let widths: Vec<&Vec<u32>> = v.checks.iter().map(|c| &c.widths).collect();
    assert!(widths.contains(&&vec![32, 32]) && widths.contains(&&vec![32, 64]) && widths.contains(&&vec![128, 128]));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn config_json_next_to_the_onnx_is_found() {
    let dir = temp_dir("dynamo-next-to");
    let onnx = dir.join("model.onnx");
    std::fs::copy(fixture("dynamo_llama_dynamic.onnx"), &onnx).unwrap();
    std::fs::copy(fixture(CONFIG), dir.join("config.json")).unwrap();
    let out = dir.join("m.matf");
    let report = export(&opts(&onnx, &out, None)).expect("export with config.json next to the ONNX");
    assert!(report.verification.unwrap().passed);
    let meta = ModelFile::open(&out).unwrap().metadata().clone();
    let a = &meta.architecture;
    assert_eq!(
        (a.family.as_str(), a.d_model, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim),
        ("llama", 32, 2, 4, 2, 8)
    );
    assert_eq!((a.vocab_size, a.max_context, a.rope_theta, a.norm_eps), (260, 128, 10000.0, 1e-5));
    assert_eq!(meta.ffn_widths, vec![vec![128], vec![128]]);
    assert_eq!(meta.level_names, vec!["full".to_string()]);
    assert_eq!((meta.tokenizer.bos_id, meta.tokenizer.eos_id), (Some(256), Some(257)));

    // Without it, the error says what to pass.
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = export(&opts(&onnx, &out, None)).unwrap_err();
    assert!(format!("{e:#}").contains("--config"), "{e:#}");
    // A Hugging Face config the runtime cannot run is refused by name.
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(CONFIG)).unwrap()).unwrap();
    cfg["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = export(&opts(&onnx, &out, None)).unwrap_err();
    assert!(format!("{e:#}").contains("`llama3` rope scaling"), "{e:#}");
    assert!(!out.exists() && !dir.join("m.matf.partial").exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn goldens_replace_tract_when_asked() {
    let dir = temp_dir("dynamo-goldens");
    let out = dir.join("g.matf");
    let mut o = opts(&fixture("dynamo_llama_dynamic.onnx"), &out, Some(fixture(CONFIG)));
    o.dtype = DType::F16.into();
    o.verify = Some(VerifyOptions { goldens: Some(fixture(GOLDENS)), ..VerifyOptions::default() });
    let v = export(&o).expect("export verified by goldens").verification.unwrap();
    assert!(v.reference.starts_with("goldens "), "{}", v.reference);
    assert_eq!(v.tolerance, Tolerance::F16_STORAGE);
    assert!(v.passed, "{}", v.summary());

    // Goldens that do not fit the model are refused, and nothing is written.
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"probes": [{"ids": [256, 1], "logits": [[0.0]]}]}"#).unwrap();
    o.verify = Some(VerifyOptions { goldens: Some(bad.clone()), ..VerifyOptions::default() });
    std::fs::remove_file(&out).unwrap();
    let e = export(&o).unwrap_err();
    assert!(format!("{e:#}").contains("2 positions x 260 tokens"), "{e:#}");
    std::fs::write(&bad, r#"{"probes": [{"ids": [999], "logits": [[]]}]}"#).unwrap();
    assert!(format!("{:#}", export(&o).unwrap_err()).contains("outside the vocabulary"));
    std::fs::write(&bad, r#"{"probes": []}"#).unwrap();
    assert!(format!("{:#}", export(&o).unwrap_err()).contains("no probes"));
    std::fs::write(&bad, "not json").unwrap();
    assert!(export(&o).is_err());
    assert!(!out.exists());

    // Goldens of another model fail verification.
    let mut g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(GOLDENS)).unwrap()).unwrap();
    g["probes"][0]["logits"][3][5] = serde_json::json!(40.0);
    std::fs::write(&bad, g.to_string()).unwrap();
    let e = export(&o).unwrap_err();
    assert!(format!("{e:#}").contains("verification failed"), "{e:#}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_op_tract_lacks_is_named() {
    let src = SourceModel::load(&fixture("dynamo_llama_dynamic.onnx")).unwrap();
    let mut proto = src.proto.clone();
    let graph = proto.graph.as_mut().unwrap();
    let sin = graph.node.iter_mut().find(|n| n.op_type == "Sin").unwrap();
    sin.op_type = "SinPlusPlus".into();
    let node = graph.node.iter_mut().find(|n| n.op_type == "Cos").unwrap();
    node.domain = "com.example".into();
    let Err(e) = tract_run::runnable(&proto, 5) else { panic!("refused") };
    let e = format!("{e:#}");
    assert!(e.contains("SinPlusPlus") && e.contains("com.example:Cos") && e.contains("--verify-goldens"), "{e}");
}
