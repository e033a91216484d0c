//! `matformer import DIR` for Gemma 3n: the tiny multimodal checkpoint of
//! tests/fixtures/gemma3n_tiny_hf (transformers' `Gemma3nForConditionalGeneration` layout, random
//! weights) imported in f32, f16 and q4_0, every tensor compared with its safetensors source; a
//! text-only `Gemma3nForCausalLM` directory made from it; and hostile directories (unsupported
//! AltUp index, missing tensor, wrong shape, truncated file, `--nest`) refused with no output
//! file. Logit parity against tests/fixtures/gemma3n_tiny_goldens.json needs the Gemma 3n CPU
//! forward pass and lives with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use matformer::format::{DType, Gemma3nConfig, NestingOrigin};
use matformer::tokenizer::Tokenizer;
use matformer::ModelFile;
use matformer_export::nest::NestOptions;
use matformer_export::{import, DTypePlan, ImportOptions, ImportReport};
use matformer_tests::temp_dir;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A safetensors file's tensors: name -> (dtype, shape, bytes).
type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn read_safetensors(path: &Path) -> Tensors {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let data = &b[8 + n..];
    let mut out = BTreeMap::new();
    for (k, v) in header.as_object().unwrap() {
        if k == "__metadata__" {
            continue;
        }
        let off = v["data_offsets"].as_array().unwrap();
        let (s, e) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
        let shape = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        out.insert(k.clone(), (v["dtype"].as_str().unwrap().to_string(), shape, data[s..e].to_vec()));
    }
    out
}

fn write_safetensors(path: &Path, tensors: &Tensors) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (k, (dtype, shape, bytes)) in tensors {
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    let h = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn run(input: &Path, out: &Path, dtype: &str) -> anyhow::Result<(ImportReport, matformer::tokenizer::TokenizerAssets)> {
    import(&ImportOptions {
        input: input.to_path_buf(),
        output: out.to_path_buf(),
        dtype: DTypePlan::parse(dtype, &[]).unwrap(),
        nest: None,
    })
}

/// The Hugging Face source of a canonical tensor name (prefix `p`), and whether it is transposed.
fn source_of(name: &str, p: &str) -> (String, bool) {
    let plain = [
        ("tok_embeddings", "embed_tokens"),
        ("per_layer_embeddings", "embed_tokens_per_layer"),
        ("per_layer_model_projection", "per_layer_model_projection"),
        ("per_layer_projection_norm", "per_layer_projection_norm"),
        ("norm", "norm"),
    ];
    if let Some((_, hf)) = plain.iter().find(|(c, _)| *c == name) {
        return (format!("{p}{hf}.weight"), false);
    }
    if let Some(j) = name.strip_prefix("altup_proj.") {
        return (format!("{p}altup_projections.{j}.weight"), false);
    }
    if let Some(j) = name.strip_prefix("altup_unembed.") {
        return (format!("{p}altup_unembed_projections.{j}.weight"), false);
    }
    let (i, suffix) = name.strip_prefix("layers.").unwrap().split_once('.').unwrap();
    let hf = match suffix {
        "attn_norm" => "input_layernorm",
        "post_attn_norm" => "post_attention_layernorm",
        "ffn_norm" => "pre_feedforward_layernorm",
        "post_ffn_norm" => "post_feedforward_layernorm",
        "wq" => "self_attn.q_proj",
        "wk" => "self_attn.k_proj",
        "wv" => "self_attn.v_proj",
        "wo" => "self_attn.o_proj",
        "q_norm" => "self_attn.q_norm",
        "k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down_t" => return (format!("{p}layers.{i}.mlp.down_proj.weight"), true),
        "altup.correct_output_scale" => return (format!("{p}layers.{i}.altup.correct_output_scale"), false),
        "altup.correction_coefs" => "altup.correction_coefs",
        "altup.prediction_coefs" => "altup.prediction_coefs",
        "altup.router" => "altup.modality_router",
        "altup.router_norm" => "altup.router_norm",
        "laurel.left" => "laurel.linear_left",
        "laurel.right" => "laurel.linear_right",
        "laurel.norm" => "laurel.post_laurel_norm",
        "ple.gate" => "per_layer_input_gate",
        "ple.proj" => "per_layer_projection",
        "ple.norm" => "post_per_layer_input_norm",
        other => panic!("unexpected tensor {name} ({other})"),
    };
    (format!("{p}layers.{i}.{hf}.weight"), false)
}

/// Every tensor of `out` equals its source (transposed for the down projection), exactly for
/// f32 and within f16 rounding for f16.
fn check_tensors(out: &Path, src: &Tensors, prefix: &str, dtype: DType) -> usize {
    let model = ModelFile::open(out).unwrap();
    let mut n = 0;
    for t in &model.view().tensors {
        let (key, transposed) = source_of(&t.name, prefix);
        let (_, shape, bytes) = src.get(&key).unwrap_or_else(|| panic!("{} has no source {key}", t.name));
        let mut want = f32s(bytes);
        if transposed {
            let (r, c) = (shape[0], shape[1]);
            let mut tr = vec![0f32; r * c];
            for i in 0..r {
                for j in 0..c {
                    tr[j * r + i] = want[i * c + j];
                }
            }
            want = tr;
            assert_eq!(t.shape, [c as u64, r as u64], "{}", t.name);
        } else {
            assert_eq!(t.shape, shape.iter().map(|&d| d as u64).collect::<Vec<_>>(), "{}", t.name);
        }
        let got = model.tensor_f32(&t.name).unwrap();
        assert_eq!(got.len(), want.len(), "{}", t.name);
        for (g, w) in got.iter().zip(&want) {
            let ok = match dtype {
                DType::F32 => g == w,
                _ => (g - w).abs() <= 1e-3 * w.abs() + 1e-7,
            };
            assert!(ok, "{}: {g} vs {w}", t.name);
        }
        n += 1;
    }
    n
}

#[test]
fn tiny_multimodal_checkpoint_imports_exactly() {
    let dir = temp_dir("g3n-import");
    let src = read_safetensors(&fixture("gemma3n_tiny_hf").join("model.safetensors"));
    for (dtype, flag) in [(DType::F32, "f32"), (DType::F16, "f16")] {
        let out = dir.join(format!("tiny-{flag}.matf"));
        let (report, assets) = run(&fixture("gemma3n_tiny_hf"), &out, flag).unwrap();
        assert_eq!(report.family, "gemma3n");
        assert_eq!((report.n_layers, report.d_model, report.vocab_size), (10, 64, 300));
        assert_eq!(report.level_names, ["half", "full"]);
        assert_eq!(report.ffn_widths_layer0, [64, 128]);
        assert!(report.has_chat_template && assets.chat_template.is_some());
        assert!(report.end_of_turn.contains(&"<end_of_turn>".to_string()), "{:?}", report.end_of_turn);
        let towers = report.notes.iter().find(|n| n.contains("vision tower")).expect("a note on the towers");
        assert!(towers.contains("audio tower"), "{towers}");

        let model = ModelFile::open(&out).unwrap();
        model.verify().unwrap();
        let meta = model.metadata();
        assert!(meta.extra.contains_key("gemma3n"));
        let g = Gemma3nConfig::from_metadata(meta).unwrap().unwrap();
        let full: Vec<usize> = g.sliding.iter().enumerate().filter(|(_, s)| !**s).map(|(i, _)| i).collect();
        assert_eq!(full, [4, 9]);
        assert_eq!((g.kv_shared_layers, g.per_layer_dim, g.per_layer_vocab), (4, 16, 256));
        assert_eq!((g.altup_inputs, g.laurel_rank, g.sliding_window), (4, 8, 4));
        assert_eq!(g.activation_sparsity[..4], [0.95, 0.95, 0.95, 0.0]);
        assert_eq!((g.rope_local_theta, g.final_logit_softcap), (10_000.0, Some(30.0)));
        assert_eq!(meta.architecture.rope_theta, 1_000_000.0);
        assert_eq!(meta.architecture.max_context, 128);
        assert!(meta.architecture.tied_embeddings);
        assert_eq!(meta.ffn_widths, vec![vec![64, 128]; 10]);
        assert_eq!(meta.nesting(), NestingOrigin::Trained);
        assert!(meta.chat_template().unwrap().is_some_and(|t| t.contains("<start_of_turn>")));
        let tok = Tokenizer::from_model(&model).unwrap();
        assert_eq!(tok.eos_ids(), [1, 5], "<eos> and <end_of_turn>");
        assert!(model.view().tensor("layers.6.wk").is_err(), "layer 6 reads layer 4's or 5's K/V");
        assert!(model.view().tensor("lm_head").is_err(), "tied");
        for t in &model.view().tensors {
            assert_eq!(t.dtype, dtype, "{}", t.name);
        }
        drop(model);
        let n = check_tensors(&out, &src, "model.language_model.", dtype);
        // 4 globals + 6 AltUp projections + 10 layers x 21 (+3 for the 6 K/V owners) + norm.
        assert_eq!(n, 4 + 6 + 10 * 21 + 6 * 3 + 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quantised_import_keeps_the_small_tensors_precise() {
    let dir = temp_dir("g3n-import-q4");
    let out = dir.join("tiny-q4.matf");
    run(&fixture("gemma3n_tiny_hf"), &out, "q4").unwrap();
    let model = ModelFile::open(&out).unwrap();
    let v = model.view();
    for (name, dtype) in [
        ("layers.0.ffn_up", DType::Q4_0),
        ("layers.0.ffn_down_t", DType::Q4_0),
        ("layers.0.wq", DType::Q4_0),
        ("tok_embeddings", DType::Q4_0),
        ("per_layer_embeddings", DType::Q4_0),
        ("layers.0.altup.correction_coefs", DType::F16),
        ("layers.0.altup.prediction_coefs", DType::F16),
        ("layers.0.altup.router", DType::F16),
        ("layers.0.laurel.right", DType::F16),
        ("layers.0.ple.proj", DType::F16),
        ("layers.0.attn_norm", DType::F16),
        ("per_layer_projection_norm", DType::F16),
    ] {
        assert_eq!(v.tensor(name).unwrap().dtype, dtype, "{name}");
    }
    drop(model);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn text_only_causal_lm_directory_imports() {
    let dir = temp_dir("g3n-import-text");
    let hf = dir.join("text");
    copy_dir(&fixture("gemma3n_tiny_hf"), &hf);
    let config: Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    let mut text = config["text_config"].clone();
    text["architectures"] = serde_json::json!(["Gemma3nForCausalLM"]);
    std::fs::write(hf.join("config.json"), serde_json::to_string_pretty(&text).unwrap()).unwrap();
    let src = read_safetensors(&hf.join("model.safetensors"));
    let renamed: Tensors = src
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("model.language_model.").map(|r| (format!("model.{r}"), v)))
        .collect();
    write_safetensors(&hf.join("model.safetensors"), &renamed);
    let out = dir.join("text.matf");
    let (report, _) = run(&hf, &out, "f32").unwrap();
    assert_eq!((report.n_layers, report.d_model, report.vocab_size), (10, 64, 300));
    assert!(report.notes.is_empty(), "{:?}", report.notes);
    check_tensors(&out, &renamed, "model.", DType::F32);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Imports a modified copy of the fixture; the import must fail with a message containing
/// `needle` and leave no output (nor partial) file.
fn refused(tag: &str, needle: &str, modify: impl FnOnce(&Path), nest: bool) {
    let dir = temp_dir(&format!("g3n-hostile-{tag}"));
    let hf = dir.join("hf");
    copy_dir(&fixture("gemma3n_tiny_hf"), &hf);
    modify(&hf);
    let out = dir.join("out.matf");
    let e = import(&ImportOptions {
        input: hf.clone(),
        output: out.clone(),
        dtype: DType::F16.into(),
        nest: nest.then(|| NestOptions::new(fixture("heldout.txt"))),
    })
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains(needle), "{tag}: {msg}");
    assert!(!out.exists(), "{tag}: output left behind");
    assert!(!out.with_extension("matf.partial").exists(), "{tag}: partial file left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

fn edit_config(hf: &Path, f: impl FnOnce(&mut Value)) {
    let p = hf.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

fn edit_tensors(hf: &Path, f: impl FnOnce(&mut Tensors)) {
    let p = hf.join("model.safetensors");
    let mut t = read_safetensors(&p);
    f(&mut t);
    write_safetensors(&p, &t);
}

#[test]
fn hostile_directories_are_refused_with_no_output() {
    refused(
        "altup-idx",
        "altup_active_idx 1",
        |hf| edit_config(hf, |v| v["text_config"]["altup_active_idx"] = serde_json::json!(1)),
        false,
    );
    refused(
        "missing",
        "model.language_model.layers.3.laurel.linear_left.weight",
        |hf| {
            edit_tensors(hf, |t| {
                t.remove("model.language_model.layers.3.laurel.linear_left.weight");
            })
        },
        false,
    );
    refused(
        "shape",
        "model.language_model.layers.0.altup.correction_coefs.weight",
        |hf| {
            edit_tensors(hf, |t| {
                t.get_mut("model.language_model.layers.0.altup.correction_coefs.weight").unwrap().1 = vec![2, 8];
            })
        },
        false,
    );
    refused(
        "down-not-transposed",
        "mlp.down_proj",
        |hf| {
            edit_tensors(hf, |t| {
                t.get_mut("model.language_model.layers.2.mlp.down_proj.weight").unwrap().1 = vec![128, 64];
            })
        },
        false,
    );
    refused(
        "truncated",
        "model.safetensors",
        |hf| {
            let p = hf.join("model.safetensors");
            let len = std::fs::metadata(&p).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(len - 1000).unwrap();
        },
        false,
    );
    refused(
        "kv-shared",
        "shares K/V",
        |hf| edit_config(hf, |v| v["text_config"]["num_kv_shared_layers"] = serde_json::json!(9)),
        false,
    );
    refused("nest", "--nest", |_| {}, true);
}
