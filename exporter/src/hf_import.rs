//! A Hugging Face Llama-family model directory -> canonical tensors: `config.json` (read by
//! [`crate::hf_config`]),
//! `model.safetensors` (or shards listed in `model.safetensors.index.json`), `tokenizer.json`,
//! `tokenizer_config.json` or `chat_template.jinja`, and `generation_config.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use matformer::format::{names, DType};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use matformer::format::SpecialTokens;
use matformer::tokenizer::TokenizerAssets;

use crate::gguf::ImportedTokenizer;
use crate::hf_config::HfConfig;
use crate::import::{dense_metadata, SourceWeights};
use crate::onnx_source::Weight;
use crate::progress::Progress;
use crate::safetensors::{parse_safetensors, StTensor};

pub(crate) fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn read_json_opt(path: &Path) -> Result<Option<Json>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// The string of a token named by `tokenizer_config.json` (a string or an `{"content": ...}`
/// object).
fn token_str(v: Option<&Json>) -> Option<&str> {
    match v? {
        Json::String(s) => Some(s.as_str()),
        o => o.get("content")?.as_str(),
    }
}

/// The string of token `id` of a `tokenizer.json` (added tokens, then the model's vocabulary).
fn token_of_id(tok_json: &Json, id: u32) -> Option<String> {
    if let Some(added) = tok_json.get("added_tokens").and_then(Json::as_array) {
        for t in added {
            if t.get("id").and_then(Json::as_u64) == Some(u64::from(id)) {
                return t.get("content").and_then(Json::as_str).map(str::to_string);
            }
        }
    }
    let vocab = tok_json.get("model")?.get("vocab")?.as_object()?;
    vocab.iter().find(|(_, v)| v.as_u64() == Some(u64::from(id))).map(|(k, _)| k.clone())
}

/// Id of a token named by `tokenizer_config.json` (a string or an `{"content": ...}` object).
fn token_id_of(tok_json: &Json, v: Option<&Json>) -> Option<u32> {
    let content = token_str(v)?;
    if let Some(added) = tok_json.get("added_tokens").and_then(Json::as_array) {
        for t in added {
            if t.get("content").and_then(Json::as_str) == Some(content) {
                return t.get("id").and_then(Json::as_u64).and_then(|i| u32::try_from(i).ok());
            }
        }
    }
    tok_json.get("model")?.get("vocab")?.get(content)?.as_u64().and_then(|i| u32::try_from(i).ok())
}

fn ids(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().and_then(|i| u32::try_from(i).ok()).into_iter().collect(),
        Some(Json::Array(a)) => a.iter().filter_map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok())).collect(),
        _ => Vec::new(),
    }
}

/// The tokenizer, special ids and chat template of a model directory.
pub fn tokenizer_from_dir(dir: &Path, config: &Json) -> Result<ImportedTokenizer> {
    let tok_path = dir.join("tokenizer.json");
    let tokenizer_json = std::fs::read_to_string(&tok_path)
        .with_context(|| format!("cannot read {} (a Hugging Face tokenizer.json is required)", tok_path.display()))?;
    let tok: Json =
        serde_json::from_str(&tokenizer_json).with_context(|| format!("{} is not valid JSON", tok_path.display()))?;
    let tc = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let gen = read_json_opt(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);
    let chat_template = match tc.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_string),
        _ => None,
    };
    let chat_template = match chat_template {
        Some(t) => Some(t),
        None => {
            let p = dir.join("chat_template.jinja");
            if p.exists() {
                Some(std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?)
            } else {
                None
            }
        }
    };
    let bos_id = token_id_of(&tok, tc.get("bos_token")).or_else(|| ids(config.get("bos_token_id")).first().copied());
    let eos_id = token_id_of(&tok, tc.get("eos_token")).or_else(|| ids(config.get("eos_token_id")).first().copied());
    let mut extra: Vec<u32> = ids(gen.get("eos_token_id"));
    extra.extend(ids(config.get("eos_token_id")));
    extra.retain(|&e| Some(e) != eos_id);
    extra.sort_unstable();
    extra.dedup();
    // A Hugging Face tokenizer that prepends BOS does it in its post-processor; record bos only
    // then, so the runtime does not prepend a second one.
    let add_bos = tc.get("add_bos_token").and_then(Json::as_bool).unwrap_or_else(|| {
        tok.get("post_processor").is_some_and(|p| p.to_string().contains("SpecialToken")) && bos_id.is_some()
    });
    let mut vocab_len = tok.get("model").and_then(|m| m.get("vocab")).map_or(0, |v| match v {
        Json::Object(o) => o.len(),
        Json::Array(a) => a.len(),
        _ => 0,
    });
    if let Some(added) = tok.get("added_tokens").and_then(Json::as_array) {
        for t in added {
            if let Some(id) = t.get("id").and_then(Json::as_u64) {
                vocab_len = vocab_len.max(id as usize + 1);
            }
        }
    }
    let name = |key: &str, id: Option<u32>| -> Option<String> {
        token_str(tc.get(key)).map(str::to_string).or_else(|| id.and_then(|i| token_of_id(&tok, i)))
    };
    let special = SpecialTokens {
        bos: name("bos_token", bos_id),
        eos: name("eos_token", eos_id),
        pad: name("pad_token", None),
        unk: name("unk_token", None),
        end_of_turn: extra
            .iter()
            .map(|&i| {
                token_of_id(&tok, i).ok_or_else(|| {
                    anyhow!("eos_token_id {i} (config.json or generation_config.json) is not a token of tokenizer.json")
                })
            })
            .collect::<Result<_>>()?,
        add_bos: add_bos && bos_id.is_some(),
    };
    Ok(ImportedTokenizer {
        assets: TokenizerAssets { tokenizer_json: tokenizer_json.into_bytes(), chat_template, special },
        vocab_len,
    })
}

fn to_f32(t: &StTensor<'_>, name: &str) -> Result<Vec<f32>> {
    let b = t.data;
    Ok(match t.dtype.as_str() {
        "F32" => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        "F16" => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        "BF16" => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => bail!("tensor `{name}` has dtype {other}; supported: F32, F16, BF16"),
    })
}

/// The safetensors files of a model directory, mapped: the shards listed in
/// `model.safetensors.index.json`, or the single `model.safetensors`.
pub(crate) struct Shards {
    /// The directory.
    pub dir: PathBuf,
    /// `model.safetensors.index.json` (present or not).
    pub index: PathBuf,
    /// Shard file of each tensor (empty without an index).
    pub shard_of: HashMap<String, String>,
    /// The mapped files, by file name.
    pub maps: BTreeMap<String, memmap2::Mmap>,
    /// SHA-256 (hex) of the files' bytes, in file-name order.
    pub sha256: String,
}

impl Shards {
    /// Maps every safetensors file of `dir` (shard names must be plain file names).
    pub fn open(dir: &Path) -> Result<Shards> {
        let index = dir.join("model.safetensors.index.json");
        let mut shard_of: HashMap<String, String> = HashMap::new();
        let files: Vec<String> = if index.exists() {
            let idx = read_json(&index)?;
            let map = idx
                .get("weight_map")
                .and_then(Json::as_object)
                .ok_or_else(|| anyhow!("{}: no `weight_map` object", index.display()))?;
            let mut files = std::collections::BTreeSet::new();
            for (k, v) in map {
                let f = v.as_str().ok_or_else(|| anyhow!("{}: weight_map[{k}] is not a string", index.display()))?;
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    bail!("{}: shard name {f:?} is not a plain file name", index.display());
                }
                shard_of.insert(k.clone(), f.to_string());
                files.insert(f.to_string());
            }
            files.into_iter().collect()
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut maps = BTreeMap::new();
        let mut hasher = Sha256::new();
        for f in &files {
            let p = dir.join(f);
            let file = std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
            // SAFETY: read-only private map of an input file we do not modify; the safetensors
            // parser checks the header and every tensor's range against the map's length.
            let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", p.display()))?;
            hasher.update(&map[..]);
            maps.insert(f.clone(), map);
        }
        let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(Shards { dir: dir.to_path_buf(), index, shard_of, maps, sha256 })
    }

    /// Every file's tensors, by file name; errors name the file.
    pub fn parse(&self) -> Result<BTreeMap<String, BTreeMap<String, StTensor<'_>>>> {
        let mut parsed = BTreeMap::new();
        for (f, map) in &self.maps {
            let st = parse_safetensors(map).map_err(|e| anyhow!("{}: {e}", self.dir.join(f).display()))?;
            parsed.insert(f.clone(), st);
        }
        Ok(parsed)
    }
}

/// Reads a Hugging Face Llama directory.
pub fn load_dir(dir: &Path) -> Result<SourceWeights> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let hf = HfConfig::from_value(&config).map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    let (arch, ffn) = (hf.architecture.clone(), hf.intermediate_size);
    let tokenizer = tokenizer_from_dir(dir, &config)?;
    if tokenizer.vocab_len > arch.vocab_size as usize {
        bail!("tokenizer.json has {} tokens but config.json's vocab_size is {}", tokenizer.vocab_len, arch.vocab_size);
    }

    let shards = Shards::open(dir)?;
    let parsed = shards.parse()?;
    let (index, shard_of) = (&shards.index, &shards.shard_of);
    let mut source_types = BTreeMap::new();
    let get = |name: &str| -> Result<(Weight, DType)> {
        let file = match shard_of.get(name) {
            Some(f) => f.as_str(),
            None if shard_of.is_empty() => "model.safetensors",
            None => bail!("tensor `{name}` is not in {}", index.display()),
        };
        let st = parsed.get(file).ok_or_else(|| anyhow!("shard {file} not loaded"))?;
        let t = st.get(name).ok_or_else(|| anyhow!("{}: no tensor `{name}`", dir.join(file).display()))?;
        let keep = if t.dtype == "F32" { DType::F32 } else { DType::F16 };
        Ok((Weight { shape: t.shape.clone(), data: to_f32(t, name)? }, keep))
    };

    let d = arch.d_model as usize;
    let q = (arch.n_heads * arch.head_dim) as usize;
    let kv = (arch.n_kv_heads * arch.head_dim) as usize;
    let v = arch.vocab_size as usize;
    let h = ffn as usize;
    let mut plan: Vec<(String, String, Vec<usize>, bool)> =
        vec![("model.embed_tokens.weight".into(), names::TOK_EMBEDDINGS.into(), vec![v, d], false)];
    for i in 0..arch.n_layers as usize {
        let p = |s: &str| format!("model.layers.{i}.{s}.weight");
        let l = |s: &str| names::layer(i, s);
        plan.push((p("input_layernorm"), l(names::ATTN_NORM), vec![d], false));
        plan.push((p("self_attn.q_proj"), l(names::WQ), vec![q, d], false));
        plan.push((p("self_attn.k_proj"), l(names::WK), vec![kv, d], false));
        plan.push((p("self_attn.v_proj"), l(names::WV), vec![kv, d], false));
        plan.push((p("self_attn.o_proj"), l(names::WO), vec![d, q], false));
        plan.push((p("post_attention_layernorm"), l(names::FFN_NORM), vec![d], false));
        plan.push((p("mlp.gate_proj"), l(names::FFN_GATE), vec![h, d], false));
        plan.push((p("mlp.up_proj"), l(names::FFN_UP), vec![h, d], false));
        plan.push((p("mlp.down_proj"), l(names::FFN_DOWN_T), vec![d, h], true));
    }
    plan.push(("model.norm.weight".into(), names::NORM.into(), vec![d], false));
    if !arch.tied_embeddings {
        plan.push(("lm_head.weight".into(), names::LM_HEAD.into(), vec![v, d], false));
    }
    let mut tensors = HashMap::with_capacity(plan.len());
    let mut source_dtypes = HashMap::with_capacity(plan.len());
    let mut progress = Progress::new("converting");
    let total: u64 = plan.iter().map(|p| p.2.iter().product::<usize>() as u64 * 4).sum();
    let mut done = 0u64;
    for (src, dst, shape, transpose) in plan {
        let (mut w, keep) = get(&src)?;
        source_dtypes.insert(dst.clone(), keep);
        if w.shape != shape {
            bail!("tensor `{src}` has shape {:?}, expected {shape:?}", w.shape);
        }
        if transpose {
            let (r, c) = (shape[0], shape[1]);
            let mut t = vec![0f32; r * c];
            for i in 0..r {
                for j in 0..c {
                    t[j * r + i] = w.data[i * c + j];
                }
            }
            w = Weight { shape: vec![c, r], data: t };
        }
        done += w.data.len() as u64 * 4;
        tensors.insert(dst, w);
        progress.update(done, total);
    }
    progress.finish();
    for st in parsed.values() {
        for t in st.values() {
            *source_types.entry(t.dtype.clone()).or_insert(0) += 1;
        }
    }
    let sha = shards.sha256.clone();
    let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let meta = dense_metadata(arch, ffn, sha, name);
    Ok(SourceWeights {
        meta,
        tensors,
        tokenizer,
        source_format: "huggingface".into(),
        source_types,
        raw: Default::default(),
        source_dtypes,
    })
}
