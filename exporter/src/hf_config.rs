//! Hugging Face `config.json` for Llama-family causal language models, read into the `.matf`
//! [`Architecture`].
//!
//! Supported: `LlamaForCausalLM` (Llama 1/2/3 without rope scaling, SmolLM, TinyLlama, ...) and
//! `MistralForCausalLM`. Everything the runtime cannot compute exactly is refused with one line
//! naming it: rope scaling of any kind (`llama3`, `linear`, `dynamic`, `yarn`, `longrope`; the
//! runtime implements plain RoPE with `rope_theta` only), attention or MLP biases (hence
//! `Qwen2ForCausalLM`, whose q/k/v projections always carry a bias), activations other than
//! SiLU and tanh-GELU, and every other architecture.
//!
//! Both spellings transformers has used are read: rope settings as `rope_theta` plus
//! `rope_scaling` (transformers 4) or as `rope_parameters` (transformers 5), and the weight dtype
//! as `torch_dtype` (4) or `dtype` (5). Keys absent from the file take transformers' defaults
//! for that architecture (e.g. `num_key_value_heads = num_attention_heads`,
//! `head_dim = hidden_size / num_attention_heads`).

use std::path::Path;

use matformer::format::{Activation, Architecture, NormKind, Positional, Tokenizer};
use serde_json::{Map, Value};

use crate::onnx_source::SourceConfig;

/// Why a `config.json` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HfConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not JSON, or not a JSON object.
    #[error("config.json is not a JSON object: {reason}")]
    NotJson {
        /// The parser's message.
        reason: String,
    },
    /// Neither `architectures` nor `model_type` names the model.
    #[error("config.json names no architecture (neither `architectures` nor `model_type`)")]
    NoArchitecture,
    /// An architecture this exporter does not convert.
    #[error(
        "unsupported architecture `{name}` (supported: LlamaForCausalLM, MistralForCausalLM; `import` also takes Gemma 3n){}",
        .reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
    )]
    UnsupportedArchitecture {
        /// As spelled in `architectures` (or `model_type`).
        name: String,
        /// Why, when it is a known near-miss.
        reason: Option<String>,
    },
    /// A required key is absent or null.
    #[error("config.json lacks `{key}`")]
    Missing {
        /// The key.
        key: &'static str,
    },
    /// A key has a value of the wrong type or out of range.
    #[error("config.json `{key}` {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Rope scaling the runtime does not implement.
    #[error(
        "config.json `{key}` asks for `{kind}` rope scaling; the runtime implements plain RoPE only \
         (rope_theta, no scaling), so this model cannot be converted exactly"
    )]
    UnsupportedRopeScaling {
        /// `rope_scaling` or `rope_parameters`.
        key: &'static str,
        /// Its `rope_type` (or `type`).
        kind: String,
    },
    /// A model feature the runtime does not implement.
    #[error("unsupported model feature: {what}")]
    Unsupported {
        /// The feature, with the key that asks for it.
        what: String,
    },
}

/// A Hugging Face model config reduced to what the `.matf` needs.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    /// The architecture as named by the config (`LlamaForCausalLM`).
    pub architecture_name: String,
    /// Shape and numerics in the `.matf`'s terms (`family` is `model_type`, e.g. `llama`).
    pub architecture: Architecture,
    /// Full FFN width of every layer (`intermediate_size`).
    pub intermediate_size: u32,
    /// `bos_token_id`, if any.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`: one id or a list (Llama 3 lists several); empty when absent.
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` / `dtype` of the checkpoint (`"bfloat16"`), informational.
    pub torch_dtype: Option<String>,
}

/// Architectures converted, with their `model_type` (the `.matf` family).
const SUPPORTED: [(&str, &str); 2] = [("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "mistral")];

/// Near misses, with the reason they are refused.
fn refusal_reason(name: &str) -> Option<&'static str> {
    match name {
        "Qwen2ForCausalLM" | "qwen2" => {
            Some("its q/k/v projections carry biases, which the runtime's attention does not have")
        }
        "Qwen3ForCausalLM" | "qwen3" => {
            Some("it normalises q and k per head (q_norm/k_norm), which the runtime does not")
        }
        "GemmaForCausalLM" | "Gemma2ForCausalLM" | "Gemma3ForCausalLM" | "gemma" | "gemma2" | "gemma3" => {
            Some("Gemma scales embeddings and uses (1 + weight) norms, which the runtime does not")
        }
        "PhiForCausalLM" | "Phi3ForCausalLM" => Some("Phi uses partial rotary embeddings or fused projections"),
        _ => None,
    }
}

/// True when a JSON object looks like a Hugging Face config rather than our own keys
/// (docs/format.md): it has `architectures`, `model_type` or `num_hidden_layers`, and not our
/// `d_model`/`n_layers`.
pub fn is_hf_config(value: &Value) -> bool {
    let Some(obj) = value.as_object() else { return false };
    let ours = obj.contains_key("d_model") || obj.contains_key("n_layers");
    let hf =
        obj.contains_key("architectures") || obj.contains_key("model_type") || obj.contains_key("num_hidden_layers");
    hf && !ours
}

impl HfConfig {
    /// Reads and parses a `config.json`.
    pub fn from_path(path: &Path) -> Result<HfConfig, HfConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| HfConfigError::Io { path: path.display().to_string(), source })?;
        HfConfig::parse(&text)
    }

    /// Parses the text of a `config.json`.
    pub fn parse(text: &str) -> Result<HfConfig, HfConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| HfConfigError::NotJson { reason: e.to_string() })?;
        HfConfig::from_value(&value)
    }

    /// Converts a parsed `config.json`.
    pub fn from_value(value: &Value) -> Result<HfConfig, HfConfigError> {
        let obj = value.as_object().ok_or_else(|| HfConfigError::NotJson { reason: "not an object".into() })?;
        let arch_name = architecture_name(obj)?;
        let family = match SUPPORTED.iter().find(|(a, t)| *a == arch_name || *t == arch_name) {
            Some((_, model_type)) => *model_type,
            None => {
                return Err(HfConfigError::UnsupportedArchitecture {
                    reason: refusal_reason(&arch_name).map(str::to_string),
                    name: arch_name,
                })
            }
        };

        let d_model = req_u32(obj, "hidden_size")?;
        let n_layers = req_u32(obj, "num_hidden_layers")?;
        let n_heads = req_u32(obj, "num_attention_heads")?;
        let intermediate_size = req_u32(obj, "intermediate_size")?;
        let vocab_size = req_u32(obj, "vocab_size")?;
        let n_kv_heads = opt_u32(obj, "num_key_value_heads")?.unwrap_or(n_heads);
        let head_dim = match opt_u32(obj, "head_dim")? {
            Some(h) => h,
            None => {
                if n_heads == 0 || !d_model.is_multiple_of(n_heads) {
                    return Err(HfConfigError::Invalid {
                        key: "hidden_size",
                        reason: format!(
                            "({d_model}) is not a multiple of num_attention_heads ({n_heads}) and no head_dim is given"
                        ),
                    });
                }
                d_model / n_heads
            }
        };
        // transformers' defaults: LlamaConfig 2048, MistralConfig 4096 * 32.
        let mut max_context =
            opt_u32(obj, "max_position_embeddings")?.unwrap_or(if family == "mistral" { 4096 * 32 } else { 2048 });
        let norm_eps = opt_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6) as f32;
        let rope_theta = rope_theta(obj)?;
        let tied_embeddings = match obj.get("tie_word_embeddings") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(invalid("tie_word_embeddings", format!("is {v}, expected true or false"))),
        };
        let activation = match obj.get("hidden_act").or_else(|| obj.get("hidden_activation")) {
            None | Some(Value::Null) => Activation::Silu,
            Some(Value::String(s)) => match s.as_str() {
                "silu" | "swish" => Activation::Silu,
                "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
                other => {
                    return Err(HfConfigError::Unsupported {
                        what: format!("hidden_act `{other}` (the runtime has silu and gelu_pytorch_tanh)"),
                    })
                }
            },
            Some(v) => return Err(invalid("hidden_act", format!("is {v}, expected a string"))),
        };
        for key in ["attention_bias", "mlp_bias"] {
            if obj.get(key) == Some(&Value::Bool(true)) {
                return Err(HfConfigError::Unsupported {
                    what: format!("`{key}: true` (the runtime's projections have no biases)"),
                });
            }
        }
        if family == "mistral" {
            // Sliding-window attention equals full causal attention while the context fits in
            // the window, so the window becomes the context limit.
            if let Some(window) = opt_u32(obj, "sliding_window")? {
                max_context = max_context.min(window);
            }
        }
        if obj.get("use_sliding_window") == Some(&Value::Bool(true)) {
            return Err(HfConfigError::Unsupported { what: "`use_sliding_window: true`".into() });
        }

        let bos_token_id = opt_u32(obj, "bos_token_id")?;
        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(ids)) => {
                ids.iter().map(|v| as_u32("eos_token_id", v)).collect::<Result<Vec<u32>, HfConfigError>>()?
            }
            Some(v) => vec![as_u32("eos_token_id", v)?],
        };
        let torch_dtype = match obj.get("torch_dtype").or_else(|| obj.get("dtype")) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };

        Ok(HfConfig {
            architecture_name: arch_name,
            architecture: Architecture {
                family: family.to_string(),
                d_model,
                n_layers,
                n_heads,
                n_kv_heads,
                head_dim,
                vocab_size,
                max_context,
                norm: NormKind::RmsNorm,
                norm_eps,
                activation,
                gated_ffn: true,
                positional: Positional::Rope,
                rope_theta,
                tied_embeddings,
            },
            intermediate_size,
            bos_token_id,
            eos_token_ids,
            torch_dtype,
        })
    }

    /// The tokenizer fields the config knows: BOS and the first EOS id, with `kind`.
    pub fn tokenizer(&self, kind: &str) -> Tokenizer {
        Tokenizer { kind: kind.to_string(), bos_id: self.bos_token_id, eos_id: self.eos_token_ids.first().copied() }
    }

    /// The exporter's config for this model: a dense model is one level, the full FFN
    /// (`intermediate_size` in every layer), named `full`; `--widths` overrides the levels.
    pub fn to_source_config(&self, tokenizer: Tokenizer) -> SourceConfig {
        SourceConfig {
            architecture: self.architecture.clone(),
            ffn_widths: Some(vec![vec![self.intermediate_size]; self.architecture.n_layers as usize]),
            level_names: Some(vec!["full".to_string()]),
            tokenizer,
        }
    }
}

fn architecture_name(obj: &Map<String, Value>) -> Result<String, HfConfigError> {
    match obj.get("architectures") {
        Some(Value::Array(list)) if !list.is_empty() => {
            if list.len() > 1 {
                return Err(invalid("architectures", format!("lists {} architectures, expected one", list.len())));
            }
            match &list[0] {
                Value::String(s) => Ok(s.clone()),
                v => Err(invalid("architectures", format!("holds {v}, expected a string"))),
            }
        }
        Some(Value::Array(_)) | None | Some(Value::Null) => match obj.get("model_type") {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(HfConfigError::NoArchitecture),
        },
        Some(v) => Err(invalid("architectures", format!("is {v}, expected a list of names"))),
    }
}

/// `rope_theta` after checking that no rope scaling is asked for.
fn rope_theta(obj: &Map<String, Value>) -> Result<f32, HfConfigError> {
    let mut theta = opt_f64(obj, "rope_theta")?;
    for key in ["rope_scaling", "rope_parameters"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(params)) => {
                let kind = params.get("rope_type").or_else(|| params.get("type"));
                match kind {
                    None | Some(Value::Null) => {}
                    Some(Value::String(k)) if k == "default" => {}
                    Some(Value::String(k)) => {
                        return Err(HfConfigError::UnsupportedRopeScaling { key, kind: k.clone() })
                    }
                    Some(v) => return Err(invalid(key, format!("has rope_type {v}, expected a string"))),
                }
                if let Some(v) = params.get("rope_theta") {
                    let t = v.as_f64().ok_or_else(|| invalid(key, format!("has rope_theta {v}, expected a number")))?;
                    theta = Some(t);
                }
                if kind.is_none() && params.contains_key("factor") {
                    return Err(HfConfigError::UnsupportedRopeScaling { key, kind: "unnamed (has `factor`)".into() });
                }
            }
            Some(v) => return Err(invalid(key, format!("is {v}, expected an object or null"))),
        }
    }
    let theta = theta.unwrap_or(10000.0);
    if !(theta.is_finite() && theta > 0.0 && theta < f64::from(f32::MAX)) {
        return Err(invalid("rope_theta", format!("({theta}) is not a positive finite number")));
    }
    Ok(theta as f32)
}

fn invalid(key: &'static str, reason: String) -> HfConfigError {
    HfConfigError::Invalid { key, reason }
}

fn as_u32(key: &'static str, v: &Value) -> Result<u32, HfConfigError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| invalid(key, format!("is {v}, expected a whole number below 2^32")))
}

fn opt_u32(obj: &Map<String, Value>, key: &'static str) -> Result<Option<u32>, HfConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => as_u32(key, v).map(Some),
    }
}

fn req_u32(obj: &Map<String, Value>, key: &'static str) -> Result<u32, HfConfigError> {
    let v = opt_u32(obj, key)?.ok_or(HfConfigError::Missing { key })?;
    if v == 0 {
        return Err(invalid(key, "is zero".into()));
    }
    Ok(v)
}

fn opt_f64(obj: &Map<String, Value>, key: &'static str) -> Result<Option<f64>, HfConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| invalid(key, format!("is {v}, expected a number"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's config.json (transformers 4 spelling), abridged to the keys
    /// that matter plus a few it ignores.
    const SMOLLM2: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
      "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
      "is_llama_config": true, "max_position_embeddings": 8192, "mlp_bias": false,
      "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
      "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_interleaved": false, "rope_scaling": null, "rope_theta": 100000,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
      "use_cache": true, "vocab_size": 49152
    }"#;

    /// What transformers 5.25 writes for `LlamaConfig(...)` saved from a model.
    const TRANSFORMERS5: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 1,
      "dtype": "float32", "eos_token_id": 2, "head_dim": 16, "hidden_act": "silu",
      "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 2048,
      "mlp_bias": false, "model_type": "llama", "num_attention_heads": 4,
      "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
      "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
      "tie_word_embeddings": false, "vocab_size": 256
    }"#;

    fn with(base: &str, key: &str, value: Value) -> String {
        let mut v: Value = serde_json::from_str(base).unwrap();
        match value {
            Value::Null if key.starts_with('-') => {
                v.as_object_mut().unwrap().remove(&key[1..]);
            }
            value => {
                v.as_object_mut().unwrap().insert(key.to_string(), value);
            }
        }
        v.to_string()
    }

    #[test]
    fn smollm2_config() {
        let c = HfConfig::parse(SMOLLM2).unwrap();
        assert_eq!(c.architecture_name, "LlamaForCausalLM");
        let a = &c.architecture;
        assert_eq!(a.family, "llama");
        assert_eq!((a.d_model, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim), (576, 30, 9, 3, 64));
        assert_eq!((a.vocab_size, a.max_context), (49152, 8192));
        assert_eq!(a.norm, NormKind::RmsNorm);
        assert_eq!(a.norm_eps, 1e-5);
        assert_eq!(a.rope_theta, 100000.0);
        assert!(a.tied_embeddings && a.gated_ffn);
        assert_eq!(a.activation, Activation::Silu);
        assert_eq!(c.intermediate_size, 1536);
        assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(1), &[2][..]));
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        let sc = c.to_source_config(c.tokenizer("bytes"));
        assert_eq!(sc.ffn_widths, Some(vec![vec![1536]; 30]));
        assert_eq!(sc.level_names, Some(vec!["full".to_string()]));
        assert_eq!((sc.tokenizer.bos_id, sc.tokenizer.eos_id), (Some(1), Some(2)));
    }

    #[test]
    fn transformers5_spelling() {
        let c = HfConfig::parse(TRANSFORMERS5).unwrap();
        assert_eq!(c.architecture.rope_theta, 500000.0);
        assert_eq!(c.architecture.norm_eps, 1e-6);
        assert_eq!(c.architecture.head_dim, 16);
        assert!(!c.architecture.tied_embeddings);
        assert_eq!(c.torch_dtype.as_deref(), Some("float32"));
    }

    #[test]
    fn defaults_as_transformers() {
        let text = r#"{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 300}"#;
        let c = HfConfig::parse(text).unwrap();
        let a = &c.architecture;
        assert_eq!((a.n_kv_heads, a.head_dim, a.max_context), (4, 16, 2048));
        assert_eq!((a.rope_theta, a.norm_eps), (10000.0, 1e-6));
        assert!(!a.tied_embeddings);
        assert_eq!((c.bos_token_id, c.eos_token_ids.len()), (None, 0));
    }

    #[test]
    fn llama3_eos_list_and_mistral_window() {
        let c = HfConfig::parse(&with(TRANSFORMERS5, "eos_token_id", serde_json::json!([128001, 128008]))).unwrap();
        assert_eq!(c.eos_token_ids, vec![128001, 128008]);
        assert_eq!(c.tokenizer("bytes").eos_id, Some(128001));
        let mistral = with(
            &with(TRANSFORMERS5, "architectures", serde_json::json!(["MistralForCausalLM"])),
            "sliding_window",
            serde_json::json!(1024),
        );
        let c = HfConfig::parse(&mistral).unwrap();
        assert_eq!(c.architecture.family, "mistral");
        assert_eq!(c.architecture.max_context, 1024);
    }

    #[test]
    fn rope_scaling_is_refused_by_name() {
        let llama3 = serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 500000.0});
        let e = HfConfig::parse(&with(TRANSFORMERS5, "rope_parameters", llama3.clone())).unwrap_err();
        assert!(matches!(e, HfConfigError::UnsupportedRopeScaling { kind: ref k, .. } if k == "llama3"), "{e}");
        assert!(e.to_string().contains("rope_parameters") && e.to_string().contains("llama3"), "{e}");
        let e = HfConfig::parse(&with(SMOLLM2, "rope_scaling", llama3)).unwrap_err();
        assert!(e.to_string().contains("`rope_scaling` asks for `llama3` rope scaling"), "{e}");
        let linear = serde_json::json!({"type": "linear", "factor": 2.0});
        let e = HfConfig::parse(&with(SMOLLM2, "rope_scaling", linear)).unwrap_err();
        assert!(e.to_string().contains("`linear`"), "{e}");
        let unnamed = serde_json::json!({"factor": 2.0});
        assert!(HfConfig::parse(&with(SMOLLM2, "rope_scaling", unnamed)).is_err());
    }

    #[test]
    fn unsupported_architectures_are_named() {
        let e =
            HfConfig::parse(&with(SMOLLM2, "architectures", serde_json::json!(["GPTNeoXForCausalLM"]))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported architecture `GPTNeoXForCausalLM` (supported: LlamaForCausalLM, MistralForCausalLM; `import` also takes Gemma 3n)"
        );
        let e = HfConfig::parse(&with(SMOLLM2, "architectures", serde_json::json!(["Qwen2ForCausalLM"]))).unwrap_err();
        assert!(e.to_string().starts_with("unsupported architecture `Qwen2ForCausalLM`"), "{e}");
        assert!(e.to_string().contains("biases"), "{e}");
        assert!(!e.to_string().contains('\n'));
        let e = HfConfig::parse(&with(&with(SMOLLM2, "-architectures", Value::Null), "-model_type", Value::Null))
            .unwrap_err();
        assert!(matches!(e, HfConfigError::NoArchitecture), "{e}");
    }

    #[test]
    fn unsupported_features_are_named() {
        for (key, value, needle) in [
            ("attention_bias", serde_json::json!(true), "attention_bias"),
            ("mlp_bias", serde_json::json!(true), "mlp_bias"),
            ("hidden_act", serde_json::json!("relu"), "hidden_act `relu`"),
        ] {
            let e = HfConfig::parse(&with(SMOLLM2, key, value)).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
        let c = HfConfig::parse(&with(SMOLLM2, "hidden_act", serde_json::json!("gelu_pytorch_tanh"))).unwrap();
        assert_eq!(c.architecture.activation, Activation::GeluTanh);
    }

    #[test]
    fn bad_values_are_named() {
        for (key, value) in [
            ("hidden_size", serde_json::json!(-1)),
            ("hidden_size", serde_json::json!(0)),
            ("vocab_size", serde_json::json!("big")),
            ("num_hidden_layers", serde_json::json!(1u64 << 40)),
            ("rms_norm_eps", serde_json::json!("tiny")),
            ("rope_theta", serde_json::json!(-5.0)),
            ("tie_word_embeddings", serde_json::json!(1)),
            ("eos_token_id", serde_json::json!([1, "x"])),
            ("architectures", serde_json::json!("LlamaForCausalLM")),
        ] {
            let e = HfConfig::parse(&with(SMOLLM2, key, value.clone())).unwrap_err();
            assert!(e.to_string().contains(key), "{key}={value}: {e}");
        }
        let e = HfConfig::parse(&with(SMOLLM2, "-intermediate_size", Value::Null)).unwrap_err();
        assert_eq!(e.to_string(), "config.json lacks `intermediate_size`");
        let e = HfConfig::parse(&with(
            &with(SMOLLM2, "hidden_size", serde_json::json!(100)),
            "num_attention_heads",
            serde_json::json!(3),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("not a multiple"), "{e}");
        assert!(HfConfig::parse("[1, 2]").is_err());
        assert!(HfConfig::parse("{\"hidden_size\": ").is_err());
    }

    #[test]
    fn detection_of_hf_keys_versus_ours() {
        assert!(is_hf_config(&serde_json::from_str(SMOLLM2).unwrap()));
        assert!(is_hf_config(&serde_json::from_str(TRANSFORMERS5).unwrap()));
        let ours = include_str!("../../tests/fixtures/matlm.config.json");
        assert!(!is_hf_config(&serde_json::from_str(ours).unwrap()));
        assert!(!is_hf_config(&serde_json::json!([1])));
    }
}
