//! `matformer import DIR` for a Hugging Face Gemma 3n checkpoint (docs/exporter.md, "Gemma 3n").
//!
//! The text decoder is imported; the vision and audio towers of the multimodal checkpoints
//! (`model.vision_tower.*`, `model.audio_tower.*`, `model.embed_vision.*`,
//! `model.embed_audio.*`) are left out, and the report says so. Every tensor of
//! [`required_tensor_specs`] for the Gemma 3n metadata is looked up under the text model's
//! prefix (`model.language_model.` or, for `Gemma3nForCausalLM`, `model.`) with the exact
//! shape expected; `mlp.down_proj` is stored transposed (`ffn_down_t`, one row per neuron).
//!
//! Rows are converted from the memory-mapped safetensors as the writer asks for them, so the
//! import never holds the model in memory (E4B's per-layer embedding table alone is 2.3 billion
//! values). The FFN is written as two nested levels, `[w/2, w]` (`half`, `full`): E4B was
//! trained with E2B's FFN as its first half, so the file's nesting is `trained`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use matformer::format::{
    g3n_names, names, required_tensor_specs, DType, FormatError, Metadata, NestingOrigin, Provenance, Tokenizer,
};
use matformer::tokenizer::TokenizerAssets;
use serde_json::Value as Json;

use crate::gemma3n_config::Gemma3nHfConfig;
use crate::hf_import::{tokenizer_from_dir, Shards};
use crate::import::{write_specs, write_verified, ImportOptions, ImportReport, ReportSource, Written};
use crate::safetensors::StTensor;

/// Element type of a source tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    F32,
    F16,
    Bf16,
}

impl Elem {
    fn parse(s: &str) -> Option<Elem> {
        match s {
            "F32" => Some(Elem::F32),
            "F16" => Some(Elem::F16),
            "BF16" => Some(Elem::Bf16),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            _ => 2,
        }
    }

    /// Element `i` of `bytes` (the caller checked the length).
    fn get(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            Elem::F32 => f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]),
            Elem::F16 => half::f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
            Elem::Bf16 => half::bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
        }
    }
}

/// The Hugging Face name of a canonical Gemma 3n tensor, relative to the text model's prefix
/// (`lm_head.weight` is absolute), and whether it is stored transposed.
fn hf_name(canonical: &str) -> Option<(String, bool)> {
    use g3n_names as g3;
    let w = |s: &str| Some((format!("{s}.weight"), false));
    match canonical {
        names::TOK_EMBEDDINGS => return w("embed_tokens"),
        g3::PER_LAYER_EMBEDDINGS => return w("embed_tokens_per_layer"),
        g3::PER_LAYER_MODEL_PROJECTION => return w("per_layer_model_projection"),
        g3::PER_LAYER_PROJECTION_NORM => return w("per_layer_projection_norm"),
        names::NORM => return w("norm"),
        names::LM_HEAD => return w("lm_head"),
        _ => {}
    }
    if let Some(j) = canonical.strip_prefix("altup_proj.") {
        return w(&format!("altup_projections.{j}"));
    }
    if let Some(j) = canonical.strip_prefix("altup_unembed.") {
        return w(&format!("altup_unembed_projections.{j}"));
    }
    let rest = canonical.strip_prefix("layers.")?;
    let (i, suffix) = rest.split_once('.')?;
    let hf = match suffix {
        names::ATTN_NORM => "input_layernorm",
        g3::POST_ATTN_NORM => "post_attention_layernorm",
        names::FFN_NORM => "pre_feedforward_layernorm",
        g3::POST_FFN_NORM => "post_feedforward_layernorm",
        names::WQ => "self_attn.q_proj",
        names::WK => "self_attn.k_proj",
        names::WV => "self_attn.v_proj",
        names::WO => "self_attn.o_proj",
        g3::Q_NORM => "self_attn.q_norm",
        g3::K_NORM => "self_attn.k_norm",
        names::FFN_GATE => "mlp.gate_proj",
        names::FFN_UP => "mlp.up_proj",
        names::FFN_DOWN_T => return Some((format!("layers.{i}.mlp.down_proj.weight"), true)),
        // A bare parameter, not a module: no `.weight`.
        g3::ALTUP_CORRECT_SCALE => return Some((format!("layers.{i}.altup.correct_output_scale"), false)),
        g3::ALTUP_CORRECTION => "altup.correction_coefs",
        g3::ALTUP_PREDICTION => "altup.prediction_coefs",
        g3::ALTUP_ROUTER => "altup.modality_router",
        g3::ALTUP_ROUTER_NORM => "altup.router_norm",
        g3::LAUREL_LEFT => "laurel.linear_left",
        g3::LAUREL_RIGHT => "laurel.linear_right",
        g3::LAUREL_NORM => "laurel.post_laurel_norm",
        g3::PLE_GATE => "per_layer_input_gate",
        g3::PLE_PROJ => "per_layer_projection",
        g3::PLE_NORM => "post_per_layer_input_norm",
        _ => return None,
    };
    Some((format!("layers.{i}.{hf}.weight"), false))
}

/// Where each canonical tensor's rows come from.
struct Source<'a> {
    tensor: &'a StTensor<'a>,
    elem: Elem,
    /// `[rows, cols]` of the source (`[d_model, ffn]` for a transposed down projection).
    cols: usize,
    transposed: bool,
}

impl Source<'_> {
    /// Appends rows `rows` of the canonical tensor, in `dtype`, to `out`.
    fn fill(&self, rows: std::ops::Range<u64>, dtype: DType, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let bad = |reason: String| FormatError::BadMetadata { reason };
        let es = self.elem.size();
        let data = self.tensor.data;
        let mut row = Vec::new();
        for r in rows {
            let r = usize::try_from(r).map_err(|_| bad("row index out of range".into()))?;
            row.clear();
            if self.transposed {
                // Source [d_model, ffn]: canonical row r is source column r.
                let src_rows = data.len() / (es * self.cols.max(1));
                if r >= self.cols {
                    return Err(bad(format!("row {r} beyond the source's {} columns", self.cols)));
                }
                row.extend((0..src_rows).map(|i| self.elem.get(data, i * self.cols + r)));
            } else {
                let start = r * self.cols;
                if (start + self.cols) * es > data.len() {
                    return Err(bad(format!("row {r} beyond the source tensor")));
                }
                row.extend((start..start + self.cols).map(|i| self.elem.get(data, i)));
            }
            matformer::quant::encode_row(dtype, &row, out)?;
        }
        Ok(())
    }
}

/// Whether `tokenizer.json` (as text) has token `content` (added tokens or vocabulary).
fn has_token(tok: &Json, content: &str) -> bool {
    let added = tok
        .get("added_tokens")
        .and_then(Json::as_array)
        .is_some_and(|a| a.iter().any(|t| t.get("content").and_then(Json::as_str) == Some(content)));
    added || tok.get("model").and_then(|m| m.get("vocab")).and_then(|v| v.get(content)).is_some()
}

/// The safetensors files' tensors, by file name.
type Parsed<'s> = BTreeMap<String, BTreeMap<String, StTensor<'s>>>;

/// Tensor `key` of the mapped files (`shard_of`: the index's weight map, empty for one file).
fn find_tensor<'p, 's>(
    shard_of: &HashMap<String, String>,
    parsed: &'p Parsed<'s>,
    key: &str,
) -> Option<(&'p String, &'p StTensor<'s>)> {
    let file = match shard_of.get(key) {
        Some(f) => f.as_str(),
        None if shard_of.is_empty() => "model.safetensors",
        None => return None,
    };
    parsed.get(file)?.get_key_value(key)
}

/// Which group a tensor of the checkpoint that is not imported belongs to.
fn left_out_group(key: &str) -> Option<&'static str> {
    if key.starts_with("model.vision_tower.") || key.starts_with("model.embed_vision.") {
        Some("vision")
    } else if key.starts_with("model.audio_tower.") || key.starts_with("model.embed_audio.") {
        Some("audio")
    } else {
        None
    }
}

/// Imports a Gemma 3n directory (`config` is its parsed `config.json`).
pub fn import_dir(opts: &ImportOptions, config: &Json, started: Instant) -> Result<(ImportReport, TokenizerAssets)> {
    let dir = &opts.input;
    let config_path = dir.join("config.json");
    let hf = Gemma3nHfConfig::from_value(config).map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    if opts.nest.is_some() {
        bail!(
            "--nest does not apply to Gemma 3n: the checkpoint is already nested (E2B's FFN is the first half of \
             E4B's, trained so); the import writes its levels `half` and `full` itself. Run it without --nest"
        );
    }
    let mut tokenizer = tokenizer_from_dir(dir, &hf.text_config)?;
    let arch = hf.architecture.clone();
    if tokenizer.vocab_len > arch.vocab_size as usize {
        bail!("tokenizer.json has {} tokens but config.json's vocab_size is {}", tokenizer.vocab_len, arch.vocab_size);
    }
    // Gemma's chat turns end with <end_of_turn>: it ends a generation even when
    // generation_config.json does not list it.
    let tok_json: Json = serde_json::from_slice(&tokenizer.assets.tokenizer_json).unwrap_or(Json::Null);
    let special = &mut tokenizer.assets.special;
    if has_token(&tok_json, "<end_of_turn>")
        && special.eos.as_deref() != Some("<end_of_turn>")
        && !special.end_of_turn.iter().any(|t| t == "<end_of_turn>")
    {
        special.end_of_turn.push("<end_of_turn>".to_string());
    }

    let shards = Shards::open(dir)?;
    let parsed = shards.parse()?;
    let lookup = |key: &str| find_tensor(&shards.shard_of, &parsed, key);
    let prefix = ["model.language_model.", "model."]
        .into_iter()
        .find(|p| lookup(&format!("{p}embed_tokens.weight")).is_some())
        .ok_or_else(|| {
            anyhow!(
                "{}: no text model found (neither `model.language_model.embed_tokens.weight` nor \
                 `model.embed_tokens.weight`)",
                dir.display()
            )
        })?;

    // Metadata.
    let (ffn_widths, level_names) = hf.levels();
    let mut meta = Metadata {
        architecture: arch.clone(),
        ffn_widths,
        level_names,
        tokenizer: Tokenizer { kind: "bytes".to_string(), bos_id: None, eos_id: None },
        provenance: Provenance {
            source_sha256: shards.sha256.clone(),
            source_name: dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            exporter: format!("matformer-export {} (import)", env!("CARGO_PKG_VERSION")),
        },
        extra: Default::default(),
    };
    hf.gemma3n.store(&mut meta);
    if meta.n_levels() > 1 {
        meta.set_nesting(NestingOrigin::Trained);
    }
    let assets = tokenizer.assets;
    assets.apply_to(&mut meta).map_err(|e| anyhow!("the model's tokenizer cannot be stored: {e}"))?;
    meta.validate().map_err(|e| anyhow!("{}: the imported model is not valid: {e}", config_path.display()))?;

    // Every tensor, found with its exact shape.
    let mut sources: HashMap<String, Source<'_>> = HashMap::new();
    let mut used: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut source_dtypes = HashMap::new();
    for spec in required_tensor_specs(&meta, DType::F32) {
        let (rel, transposed) =
            hf_name(&spec.name).ok_or_else(|| anyhow!("no Hugging Face name for tensor {}", spec.name))?;
        let key = if spec.name == names::LM_HEAD { rel } else { format!("{prefix}{rel}") };
        let (key_ref, t) = lookup(&key).ok_or_else(|| {
            anyhow!("{}: no tensor `{key}` (needed for {}, shape {:?})", dir.display(), spec.name, spec.shape)
        })?;
        let want: Vec<usize> = if transposed {
            spec.shape.iter().rev().map(|&d| d as usize).collect()
        } else {
            spec.shape.iter().map(|&d| d as usize).collect()
        };
        if t.shape != want {
            bail!("tensor `{key}` ({}) has shape {:?}, expected {want:?}", spec.name, t.shape);
        }
        let elem = Elem::parse(&t.dtype)
            .ok_or_else(|| anyhow!("tensor `{key}` has dtype {}; supported: F32, F16, BF16", t.dtype))?;
        source_dtypes.insert(spec.name.clone(), if elem == Elem::F32 { DType::F32 } else { DType::F16 });
        let cols = want.get(1).copied().unwrap_or(1);
        used.insert(key_ref.as_str());
        sources.insert(spec.name.clone(), Source { tensor: t, elem, cols, transposed });
    }

    // What is left out, said on stderr and in the report.
    let mut source_types = BTreeMap::new();
    let mut groups: BTreeMap<&str, usize> = BTreeMap::new();
    let mut kv_shared_ignored = 0usize;
    let mut other: Vec<&str> = Vec::new();
    for st in parsed.values() {
        for (k, t) in st {
            *source_types.entry(t.dtype.clone()).or_insert(0) += 1;
            if used.contains(k.as_str()) {
                continue;
            }
            if let Some(g) = left_out_group(k) {
                *groups.entry(g).or_insert(0) += 1;
            } else if k.starts_with(prefix)
                && ["self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.", "self_attn.v_norm."]
                    .iter()
                    .any(|s| k.contains(s))
            {
                kv_shared_ignored += 1;
            } else {
                other.push(k.as_str());
            }
        }
    }
    let mut notes = Vec::new();
    if !groups.is_empty() {
        let parts: Vec<String> = groups.iter().map(|(g, n)| format!("{g} tower ({n} tensors)")).collect();
        notes.push(format!(
            "text model only: the {} of the multimodal checkpoint are left out (image and audio input are not supported)",
            parts.join(" and ")
        ));
    }
    if kv_shared_ignored > 0 {
        notes.push(format!(
            "ignored {kv_shared_ignored} k/v projection or norm tensors of the last {} layers, which read an earlier layer's K/V",
            hf.gemma3n.kv_shared_layers
        ));
    }
    if !other.is_empty() {
        other.sort_unstable();
        let shown: Vec<&str> = other.iter().take(5).copied().collect();
        notes.push(format!(
            "ignored {} other tensors not used by the text model: {}{}",
            other.len(),
            shown.join(", "),
            if other.len() > 5 { ", ..." } else { "" }
        ));
    }
    for n in &notes {
        eprintln!("note: {n}");
    }

    // Write under a temporary name, verify, rename.
    let plan = opts.dtype.for_source(&source_dtypes);
    let specs = plan.specs(&meta)?;
    let source = ReportSource { source_format: "huggingface".into(), source_types, notes };
    write_verified(opts, started, meta, assets, source, |tmp, meta, assets| {
        let bytes = write_specs(tmp, meta, &specs, assets, |spec, rows, out| {
            let src = sources.get(&spec.name).ok_or_else(|| FormatError::MissingTensor { name: spec.name.clone() })?;
            src.fill(rows, spec.dtype, out)
        })?;
        Ok(Written { bytes, kept_source_blocks: Vec::new(), nest: None })
    })
}

/// The parsed `dir/config.json` when it describes a Gemma 3n model; `None` otherwise, or when
/// it cannot be read (the Llama path then reports that).
pub fn dir_config_if_gemma3n(dir: &Path) -> Option<Json> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: Json = serde_json::from_str(&text).ok()?;
    crate::gemma3n_config::is_gemma3n(&v).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(hf_name("tok_embeddings"), Some(("embed_tokens.weight".into(), false)));
        assert_eq!(hf_name("per_layer_embeddings"), Some(("embed_tokens_per_layer.weight".into(), false)));
        assert_eq!(hf_name("altup_unembed.2"), Some(("altup_unembed_projections.2.weight".into(), false)));
        assert_eq!(hf_name("layers.3.ffn_down_t"), Some(("layers.3.mlp.down_proj.weight".into(), true)));
        assert_eq!(
            hf_name("layers.0.altup.correct_output_scale"),
            Some(("layers.0.altup.correct_output_scale".into(), false))
        );
        assert_eq!(hf_name("layers.7.ple.norm"), Some(("layers.7.post_per_layer_input_norm.weight".into(), false)));
        assert_eq!(hf_name("layers.1.altup.router"), Some(("layers.1.altup.modality_router.weight".into(), false)));
        assert_eq!(hf_name("layers.1.bogus"), None);
    }

    #[test]
    fn transposed_rows_are_source_columns() {
        // Source [2, 3]: rows (1 2 3), (4 5 6); canonical row r = column r.
        let data: Vec<u8> = [1f32, 2., 3., 4., 5., 6.].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = StTensor { dtype: "F32".into(), shape: vec![2, 3], data: &data };
        let s = Source { tensor: &t, elem: Elem::F32, cols: 3, transposed: true };
        let mut out = Vec::new();
        s.fill(1..3, DType::F32, &mut out).unwrap();
        let got: Vec<f32> = out.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(got, [2., 5., 3., 6.]);
        assert!(s.fill(3..4, DType::F32, &mut out).is_err());
    }
}
