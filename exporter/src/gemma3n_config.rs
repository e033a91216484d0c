//! Hugging Face Gemma 3n `config.json` -> the `.matf` [`Architecture`] and [`Gemma3nConfig`].
//!
//! Two layouts are read: the multimodal `Gemma3nForConditionalGeneration` (`model_type`
//! `gemma3n`, the text model's keys under `text_config`; what google/gemma-3n-E4B, -E4B-it,
//! -E2B and -E2B-it publish) and the text-only `Gemma3nForCausalLM` (`model_type`
//! `gemma3n_text`, keys at the top level). Absent keys take the defaults of transformers'
//! `Gemma3nTextConfig` (the E4B shapes), as `from_pretrained` would: `layer_types` full
//! attention where `(i + 1) % 5 == 0`, `activation_sparsity_pattern` 0.95 on the first 10
//! layers when there are more than 10, `tie_word_embeddings` true, and so on.
//!
//! Rope settings are read in both spellings: `rope_parameters` with one entry per layer type
//! (`full_attention`, `sliding_attention`; transformers 5) or `rope_theta` plus
//! `rope_local_base_freq` (transformers 4). Rope scaling of any kind, attention biases, an
//! activation other than tanh-GELU and `altup_active_idx` other than 0 are refused with one
//! line naming the key. `query_pre_attn_scalar` is not read: Gemma 3n's attention scale is 1.

use matformer::format::{Activation, Architecture, Gemma3nConfig, NormKind, Positional, GEMMA3N_FAMILY};
use serde_json::{Map, Value};

use crate::hf_config::HfConfigError;

/// Architecture names and `model_type`s of Gemma 3n checkpoints.
const GEMMA3N_NAMES: [&str; 4] = ["Gemma3nForConditionalGeneration", "Gemma3nForCausalLM", "gemma3n", "gemma3n_text"];

/// A Gemma 3n `config.json` reduced to what the `.matf` needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma3nHfConfig {
    /// `architectures[0]` (or `model_type` when there is no list).
    pub architecture_name: String,
    /// Whether the config is the multimodal one (text model under `text_config`, tensors
    /// under `model.language_model.`).
    pub multimodal: bool,
    /// Shape and numerics; `rope_theta` is the full-attention base.
    pub architecture: Architecture,
    /// The Gemma 3n fields.
    pub gemma3n: Gemma3nConfig,
    /// Full FFN width of each layer (`intermediate_size`, one number or one per layer).
    pub ffn_widths: Vec<u32>,
    /// The text model's keys (`text_config`, or the whole config for a text-only model), for
    /// the tokenizer's `bos_token_id` / `eos_token_id`.
    pub text_config: Value,
}

/// Whether a parsed `config.json` is a Gemma 3n model (multimodal or text-only).
pub fn is_gemma3n(config: &Value) -> bool {
    let Some(obj) = config.as_object() else { return false };
    let named = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| GEMMA3N_NAMES.contains(&s));
    let listed = obj
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|l| l.iter().any(|a| a.as_str().is_some_and(|s| GEMMA3N_NAMES.contains(&s))));
    listed || named(obj.get("model_type"))
}

fn invalid(key: &'static str, reason: String) -> HfConfigError {
    HfConfigError::Invalid { key, reason }
}

fn u32_or(obj: &Map<String, Value>, key: &'static str, default: u32) -> Result<u32, HfConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => as_u32(key, v),
    }
}

fn as_u32(key: &'static str, v: &Value) -> Result<u32, HfConfigError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| invalid(key, format!("is {v}, expected a whole number below 2^32")))
}

fn f64_or(obj: &Map<String, Value>, key: &'static str, default: f64) -> Result<f64, HfConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| invalid(key, format!("is {v}, expected a number"))),
    }
}

fn bool_or(obj: &Map<String, Value>, key: &'static str, default: bool) -> Result<bool, HfConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(invalid(key, format!("is {v}, expected true or false"))),
    }
}

fn positive_theta(key: &'static str, t: f64) -> Result<f32, HfConfigError> {
    if t.is_finite() && t > 0.0 && t < f64::from(f32::MAX) {
        Ok(t as f32)
    } else {
        Err(invalid(key, format!("has rope_theta {t}, expected a positive finite number")))
    }
}

/// One layer type's rope parameters: `rope_type` must be `default` (or absent); returns its
/// `rope_theta`, if given.
fn rope_entry(key: &'static str, params: &Value) -> Result<Option<f64>, HfConfigError> {
    let Some(p) = params.as_object() else {
        return Err(invalid(key, format!("holds {params}, expected an object")));
    };
    match p.get("rope_type").or_else(|| p.get("type")) {
        None | Some(Value::Null) => {
            if p.contains_key("factor") {
                return Err(HfConfigError::UnsupportedRopeScaling { key, kind: "unnamed (has `factor`)".into() });
            }
        }
        Some(Value::String(k)) if k == "default" => {}
        Some(Value::String(k)) => return Err(HfConfigError::UnsupportedRopeScaling { key, kind: k.clone() }),
        Some(v) => return Err(invalid(key, format!("has rope_type {v}, expected a string"))),
    }
    match p.get("rope_theta") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| invalid(key, format!("has rope_theta {v}, expected a number"))),
    }
}

/// `(full, sliding)` rope bases.
fn rope_thetas(t: &Map<String, Value>) -> Result<(f32, f32), HfConfigError> {
    let mut full = f64_or(t, "rope_theta", 1_000_000.0)?;
    let mut local = f64_or(t, "rope_local_base_freq", 10_000.0)?;
    match t.get("rope_scaling") {
        None | Some(Value::Null) => {}
        Some(v) => {
            if let Some(th) = rope_entry("rope_scaling", v)? {
                full = th;
            }
        }
    }
    match t.get("rope_parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) if p.contains_key("full_attention") || p.contains_key("sliding_attention") => {
            for (name, v) in p {
                match name.as_str() {
                    "full_attention" => {
                        if let Some(th) = rope_entry("rope_parameters", v)? {
                            full = th;
                        }
                    }
                    "sliding_attention" => {
                        if let Some(th) = rope_entry("rope_parameters", v)? {
                            local = th;
                        }
                    }
                    other => {
                        return Err(invalid(
                            "rope_parameters",
                            format!(
                                "has an entry for layer type `{other}` (expected full_attention, sliding_attention)"
                            ),
                        ))
                    }
                }
            }
        }
        Some(v @ Value::Object(_)) => {
            // One set of parameters: the full-attention layers' (as transformers reads it).
            if let Some(th) = rope_entry("rope_parameters", v)? {
                full = th;
            }
        }
        Some(v) => return Err(invalid("rope_parameters", format!("is {v}, expected an object or null"))),
    }
    Ok((positive_theta("rope_parameters", full)?, positive_theta("rope_parameters", local)?))
}

impl Gemma3nHfConfig {
    /// Converts a parsed Gemma 3n `config.json` (see the module documentation).
    pub fn from_value(config: &Value) -> Result<Gemma3nHfConfig, HfConfigError> {
        let top = config.as_object().ok_or_else(|| HfConfigError::NotJson { reason: "not an object".into() })?;
        if !is_gemma3n(config) {
            return Err(HfConfigError::UnsupportedArchitecture {
                name: top.get("model_type").and_then(Value::as_str).unwrap_or("?").to_string(),
                reason: Some("not a Gemma 3n config".into()),
            });
        }
        let architecture_name = match top.get("architectures").and_then(Value::as_array).and_then(|l| l.first()) {
            Some(Value::String(s)) => s.clone(),
            _ => top.get("model_type").and_then(Value::as_str).unwrap_or("gemma3n_text").to_string(),
        };
        if !GEMMA3N_NAMES.contains(&architecture_name.as_str()) {
            return Err(HfConfigError::UnsupportedArchitecture {
                name: architecture_name,
                reason: Some("a Gemma 3n config names Gemma3nForConditionalGeneration or Gemma3nForCausalLM".into()),
            });
        }
        let multimodal = top.contains_key("text_config")
            || architecture_name == "Gemma3nForConditionalGeneration"
            || architecture_name == "gemma3n";
        let text_value = if multimodal {
            match top.get("text_config") {
                Some(v @ Value::Object(_)) => v.clone(),
                None | Some(Value::Null) => return Err(HfConfigError::Missing { key: "text_config" }),
                Some(v) => return Err(invalid("text_config", format!("is {v}, expected an object"))),
            }
        } else {
            config.clone()
        };
        let t = text_value.as_object().ok_or_else(|| invalid("text_config", "is not an object".into()))?;

        let d_model = u32_or(t, "hidden_size", 2048)?;
        let n_layers = u32_or(t, "num_hidden_layers", 35)?;
        let n_heads = u32_or(t, "num_attention_heads", 8)?;
        let n_kv_heads = u32_or(t, "num_key_value_heads", 2)?;
        let head_dim = u32_or(t, "head_dim", 256)?;
        let vocab_size = u32_or(t, "vocab_size", 262_400)?;
        let max_context = u32_or(t, "max_position_embeddings", 32_768)?;
        let norm_eps = f64_or(t, "rms_norm_eps", 1e-6)? as f32;
        if n_layers == 0 || n_layers > matformer::format::MAX_LAYERS {
            return Err(invalid("num_hidden_layers", format!("is {n_layers}, expected 1..=4096")));
        }
        let n = n_layers as usize;

        match t.get("hidden_activation").or_else(|| t.get("hidden_act")) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "gelu_pytorch_tanh" || s == "gelu_tanh" => {}
            Some(v) => {
                return Err(HfConfigError::Unsupported {
                    what: format!("hidden_activation {v} (Gemma 3n in the runtime is gelu_pytorch_tanh)"),
                })
            }
        }
        if t.get("attention_bias") == Some(&Value::Bool(true)) {
            return Err(HfConfigError::Unsupported {
                what: "`attention_bias: true` (the runtime's projections have no biases)".into(),
            });
        }
        let active = u32_or(t, "altup_active_idx", 0)?;
        if active != 0 {
            return Err(HfConfigError::Unsupported {
                what: format!("altup_active_idx {active} (the runtime's AltUp computes stream 0 only)"),
            });
        }
        let (rope_full, rope_local) = rope_thetas(t)?;

        let ffn_widths = match t.get("intermediate_size") {
            None | Some(Value::Null) => vec![16_384; n],
            Some(Value::Array(list)) => {
                if list.len() != n {
                    return Err(invalid(
                        "intermediate_size",
                        format!("lists {} widths, num_hidden_layers is {n}", list.len()),
                    ));
                }
                list.iter().map(|v| as_u32("intermediate_size", v)).collect::<Result<Vec<u32>, _>>()?
            }
            Some(v) => vec![as_u32("intermediate_size", v)?; n],
        };
        if let Some(i) = ffn_widths.iter().position(|&w| w == 0) {
            return Err(invalid("intermediate_size", format!("is 0 for layer {i}")));
        }
        let sliding = match t.get("layer_types") {
            None | Some(Value::Null) => (0..n).map(|i| (i + 1) % 5 != 0).collect(),
            Some(Value::Array(list)) => {
                if list.len() != n {
                    return Err(invalid(
                        "layer_types",
                        format!("lists {} types, num_hidden_layers is {n}", list.len()),
                    ));
                }
                list.iter()
                    .map(|v| match v.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(invalid(
                            "layer_types",
                            format!("holds {v}, expected \"sliding_attention\" or \"full_attention\""),
                        )),
                    })
                    .collect::<Result<Vec<bool>, _>>()?
            }
            Some(v) => return Err(invalid("layer_types", format!("is {v}, expected a list"))),
        };
        let activation_sparsity = match t.get("activation_sparsity_pattern") {
            None | Some(Value::Null) => {
                let sparse = if n > 10 { 10 } else { 0 };
                (0..n).map(|i| if i < sparse { 0.95 } else { 0.0 }).collect()
            }
            Some(Value::Array(list)) => {
                if list.len() != n {
                    return Err(invalid(
                        "activation_sparsity_pattern",
                        format!("lists {} values, num_hidden_layers is {n}", list.len()),
                    ));
                }
                list.iter()
                    .map(|v| {
                        v.as_f64().map(|x| x as f32).ok_or_else(|| {
                            invalid("activation_sparsity_pattern", format!("holds {v}, expected a number"))
                        })
                    })
                    .collect::<Result<Vec<f32>, _>>()?
            }
            Some(v) => {
                return Err(invalid("activation_sparsity_pattern", format!("is {v}, expected one number per layer")))
            }
        };
        let final_logit_softcap = match t.get("final_logit_softcapping") {
            None => Some(30.0),
            Some(Value::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .ok_or_else(|| invalid("final_logit_softcapping", format!("is {v}, expected a number or null")))?
                    as f32,
            ),
        };
        // The multimodal config's own `tie_word_embeddings` decides the LM head there.
        let tied = match top.get("tie_word_embeddings") {
            Some(Value::Bool(b)) if multimodal => *b,
            _ => bool_or(t, "tie_word_embeddings", true)?,
        };

        let gemma3n = Gemma3nConfig {
            per_layer_dim: u32_or(t, "hidden_size_per_layer_input", 256)?,
            per_layer_vocab: u32_or(t, "vocab_size_per_layer_input", 262_144)?,
            altup_inputs: u32_or(t, "altup_num_inputs", 4)?,
            altup_correct_scale: bool_or(t, "altup_correct_scale", true)?,
            laurel_rank: u32_or(t, "laurel_rank", 64)?,
            sliding_window: u32_or(t, "sliding_window", 512)?,
            sliding,
            rope_local_theta: rope_local,
            kv_shared_layers: u32_or(t, "num_kv_shared_layers", 15)?,
            activation_sparsity,
            final_logit_softcap,
        };
        Ok(Gemma3nHfConfig {
            architecture_name,
            multimodal,
            architecture: Architecture {
                family: GEMMA3N_FAMILY.to_string(),
                d_model,
                n_layers,
                n_heads,
                n_kv_heads,
                head_dim,
                vocab_size,
                max_context,
                norm: NormKind::RmsNorm,
                norm_eps,
                activation: Activation::GeluTanh,
                gated_ffn: true,
                positional: Positional::Rope,
                rope_theta: rope_full,
                tied_embeddings: tied,
            },
            gemma3n,
            ffn_widths,
            text_config: text_value,
        })
    }

    /// The nested FFN levels of every layer: `[w/2, w]` named `half`, `full` (Gemma 3n E4B
    /// was trained with E2B's FFN nested at half width), or one level `full` when any layer's
    /// width is odd.
    pub fn levels(&self) -> (Vec<Vec<u32>>, Vec<String>) {
        if self.ffn_widths.iter().all(|w| w % 2 == 0) {
            (self.ffn_widths.iter().map(|&w| vec![w / 2, w]).collect(), vec!["half".into(), "full".into()])
        } else {
            (self.ffn_widths.iter().map(|&w| vec![w]).collect(), vec!["full".into()])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Value {
        serde_json::json!({
            "architectures": ["Gemma3nForConditionalGeneration"],
            "model_type": "gemma3n",
            "tie_word_embeddings": true,
            "text_config": {
                "model_type": "gemma3n_text",
                "hidden_size": 64, "num_hidden_layers": 10, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
                "intermediate_size": 128, "hidden_size_per_layer_input": 16,
                "vocab_size_per_layer_input": 256, "laurel_rank": 8, "sliding_window": 4,
                "num_kv_shared_layers": 4, "max_position_embeddings": 128,
                "activation_sparsity_pattern": [0.95, 0.95, 0.95, 0, 0, 0, 0, 0, 0, 0],
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}
                }
            }
        })
    }

    fn set(mut v: Value, key: &str, x: Value) -> Value {
        v["text_config"][key] = x;
        v
    }

    #[test]
    fn multimodal_tiny_config() {
        let c = Gemma3nHfConfig::from_value(&tiny()).unwrap();
        assert!(c.multimodal);
        let a = &c.architecture;
        assert_eq!((a.d_model, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim), (64, 10, 4, 2, 16));
        assert_eq!((a.vocab_size, a.max_context, a.rope_theta), (300, 128, 1e6));
        assert_eq!(a.activation, Activation::GeluTanh);
        assert!(a.tied_embeddings);
        let g = &c.gemma3n;
        assert_eq!(g.sliding.iter().filter(|s| !**s).count(), 2);
        assert!(!g.sliding[4] && !g.sliding[9]);
        assert_eq!((g.kv_shared_layers, g.rope_local_theta, g.final_logit_softcap), (4, 1e4, Some(30.0)));
        assert_eq!(g.activation_sparsity[2], 0.95);
        let (w, names) = c.levels();
        assert_eq!(w, vec![vec![64, 128]; 10]);
        assert_eq!(names, ["half", "full"]);
    }

    #[test]
    fn defaults_are_transformers_e4b() {
        let c = Gemma3nHfConfig::from_value(&serde_json::json!({"model_type": "gemma3n_text"})).unwrap();
        assert!(!c.multimodal);
        let a = &c.architecture;
        assert_eq!((a.d_model, a.n_layers, a.vocab_size, a.rope_theta), (2048, 35, 262_400, 1e6));
        assert_eq!(c.ffn_widths, vec![16_384; 35]);
        let g = &c.gemma3n;
        assert_eq!(g.sliding.iter().filter(|s| !**s).count(), 7);
        assert_eq!(g.activation_sparsity.iter().filter(|s| **s > 0.0).count(), 10);
        assert_eq!((g.per_layer_vocab, g.kv_shared_layers, g.rope_local_theta), (262_144, 15, 1e4));
    }

    #[test]
    fn old_rope_keys_and_per_layer_widths() {
        let mut v = tiny();
        let t = v["text_config"].as_object_mut().unwrap();
        t.remove("rope_parameters");
        t.insert("rope_theta".into(), serde_json::json!(500000.0));
        t.insert("rope_local_base_freq".into(), serde_json::json!(5000.0));
        t.insert("intermediate_size".into(), serde_json::json!([128, 128, 128, 128, 128, 128, 128, 128, 128, 127]));
        let c = Gemma3nHfConfig::from_value(&v).unwrap();
        assert_eq!((c.architecture.rope_theta, c.gemma3n.rope_local_theta), (5e5, 5e3));
        assert_eq!(c.levels().1, ["full"], "an odd width gives one level");
    }

    #[test]
    fn refusals_name_the_key() {
        for (key, value, needle) in [
            ("altup_active_idx", serde_json::json!(1), "altup_active_idx 1"),
            ("hidden_activation", serde_json::json!("relu"), "hidden_activation"),
            ("attention_bias", serde_json::json!(true), "attention_bias"),
            ("layer_types", serde_json::json!(["chunked"]), "layer_types"),
            ("intermediate_size", serde_json::json!([1, 2]), "intermediate_size"),
            ("activation_sparsity_pattern", serde_json::json!(0.5), "activation_sparsity_pattern"),
            ("hidden_size", serde_json::json!(-3), "hidden_size"),
            ("rope_parameters", serde_json::json!({"full_attention": {"rope_type": "yarn", "factor": 2.0}}), "yarn"),
        ] {
            let e = Gemma3nHfConfig::from_value(&set(tiny(), key, value)).unwrap_err().to_string();
            assert!(e.contains(needle), "{key}: {e}");
        }
        let mut v = tiny();
        v.as_object_mut().unwrap().remove("text_config");
        assert!(Gemma3nHfConfig::from_value(&v).unwrap_err().to_string().contains("text_config"));
        assert!(!is_gemma3n(&serde_json::json!({"model_type": "llama"})));
    }
}
