//! Metadata stored in a `.matf` file: the architecture, the nested FFN widths, the tokenizer
//! and provenance. Serialised as UTF-8 JSON inside the header (see docs/format.md, "Metadata").
//!
//! Unknown keys are preserved in [`Metadata::extra`], so later additions (the submodel catalog,
//! self-test vectors) need no version bump.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::FormatError;
use super::layout::{MAX_DIM, MAX_LAYERS, MAX_LEVELS};

/// Normalisation used before attention, before the FFN and at the end of the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// `x / sqrt(mean(x^2) + eps) * weight` (Llama, Gemma, our trained models).
    RmsNorm,
    /// `(x - mean) / sqrt(var + eps) * weight + bias` (GPT-2 family).
    LayerNorm,
}

/// FFN activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(x)`; with a gated FFN this is SwiGLU.
    Silu,
    /// tanh-approximated GELU; with a gated FFN this is GeGLU.
    GeluTanh,
}

/// Positional encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positional {
    /// Rotary embeddings applied to q and k, rotating pairs `(i, i + head_dim/2)`
    /// ("rotate_half", the Hugging Face Llama convention).
    Rope,
}

/// The transformer's shape and numerics. Shared by every submodel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    /// Model family, informational (`"matlm"`, `"llama"`, `"gemma3n-like"`).
    pub family: String,
    /// Residual stream width.
    pub d_model: u32,
    /// Number of transformer blocks.
    pub n_layers: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Key/value heads (grouped-query attention when < n_heads); divides n_heads.
    pub n_kv_heads: u32,
    /// Width of one head.
    pub head_dim: u32,
    /// Rows of the embedding / LM head.
    pub vocab_size: u32,
    /// Longest context the model was trained for, in tokens.
    pub max_context: u32,
    /// Normalisation kind.
    pub norm: NormKind,
    /// Normalisation epsilon.
    pub norm_eps: f32,
    /// FFN activation.
    pub activation: Activation,
    /// Gated FFN (`act(gate(x)) * up(x)`) or plain (`act(up(x))`).
    pub gated_ffn: bool,
    /// Positional encoding.
    pub positional: Positional,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// LM head shares the embedding matrix (no `lm_head` tensor in the file).
    pub tied_embeddings: bool,
}

/// `tokenizer.kind` of a byte-level tokenizer: token id `b` is byte `b` for `b < 256`, special
/// tokens follow.
pub const BYTES_TOKENIZER_KIND: &str = "bytes";
/// `tokenizer.kind` of a Hugging Face `tokenizer.json` stored in blob `blob.tokenizer_json`.
pub const HF_TOKENIZER_KIND: &str = "huggingface";
/// Top-level metadata key of the special-token strings ([`SpecialTokens`]), optional.
pub const SPECIAL_TOKENS_KEY: &str = "special_tokens";
/// Top-level metadata key of the Jinja chat template (a string), optional.
pub const CHAT_TEMPLATE_KEY: &str = "chat_template";
/// Metadata key saying how the file's levels were nested: `"trained"` or `"post_hoc"`
/// ([`NestingOrigin`]).
pub const NESTING_KEY: &str = "nesting";

/// How a file's nested levels came to be (metadata key `nesting`). It decides what a switch in
/// [`SwitchMode::Auto`](crate::elastic::SwitchMode::Auto) does with the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NestingOrigin {
    /// The levels were trained jointly (MatFormer training, or an export of such a model):
    /// every submodel agrees with the others on a shared KV cache. `"trained"`.
    Trained,
    /// A dense model whose FFN neurons were ordered and cut into levels after training
    /// (`matformer import --nest`, `export --widths` on a one-level model): narrow levels are
    /// weak on their own, and a wide level reading a narrow one's cache loses quality.
    /// `"post_hoc"`.
    PostHoc,
    /// The file does not say (written before the key existed, a plain one-level import, or a
    /// value this version does not know).
    Unknown,
}

impl NestingOrigin {
    /// The metadata value (`"trained"`, `"post_hoc"`, `"unknown"`).
    pub fn as_str(self) -> &'static str {
        match self {
            NestingOrigin::Trained => "trained",
            NestingOrigin::PostHoc => "post_hoc",
            NestingOrigin::Unknown => "unknown",
        }
    }
}

/// The tokenizer's kind and its BOS/EOS ids. With kind [`BYTES_TOKENIZER_KIND`] token id `b`
/// is byte `b` for `b < 256`, followed by special tokens; with [`HF_TOKENIZER_KIND`] the
/// vocabulary is the stored `tokenizer.json` and the special tokens' strings are in
/// [`Metadata::special_tokens`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokenizer {
    /// `"bytes"` or `"huggingface"`.
    pub kind: String,
    /// Beginning-of-sequence token, prepended to every prompt when present.
    pub bos_id: Option<u32>,
    /// End-of-sequence token: generation stops when it is produced.
    pub eos_id: Option<u32>,
}

/// The special tokens of a Hugging Face tokenizer, as strings of its vocabulary (metadata key
/// `special_tokens`; from `tokenizer_config.json`, `generation_config.json` or GGUF
/// `tokenizer.ggml.*_token_id`). Every field is optional in the JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpecialTokens {
    /// Beginning of sequence (`<s>`, `<|begin_of_text|>`, `<bos>`); `bos_token` in templates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos: Option<String>,
    /// End of sequence (`</s>`, `<|end_of_text|>`, `<eos>`); `eos_token` in templates. Ends
    /// generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos: Option<String>,
    /// Further tokens that end a generation (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`; the
    /// other ids of `generation_config.json`'s `eos_token_id` list).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub end_of_turn: Vec<String>,
    /// Padding token; `pad_token` in templates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad: Option<String>,
    /// Unknown-token token; `unk_token` in templates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unk: Option<String>,
    /// Whether the model's own tokenizer prepends BOS to plain text (`add_bos_token` of
    /// `tokenizer_config.json`, GGUF `tokenizer.ggml.add_bos_token`). Chat templates write
    /// their BOS themselves.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub add_bos: bool,
}

impl SpecialTokens {
    /// Every token string named here (bos, eos, end of turn, pad, unk), each once.
    pub fn all(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let named = [&self.bos, &self.eos, &self.pad, &self.unk].into_iter().flatten().map(String::as_str);
        for t in named.chain(self.end_of_turn.iter().map(String::as_str)) {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }
}

/// Where the file came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// SHA-256 (hex) of the source model file (and its external data, if any), or `"synthetic"`.
    pub source_sha256: String,
    /// Source file name, informational.
    pub source_name: String,
    /// `matformer-export x.y.z`.
    pub exporter: String,
}

/// Everything in the metadata block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Shape and numerics.
    pub architecture: Architecture,
    /// `ffn_widths[layer][level]`: number of FFN neurons of that layer at nesting level
    /// `level`. Strictly increasing per layer; every layer has `n_levels` entries; the last
    /// entry is the full FFN width of that layer.
    pub ffn_widths: Vec<Vec<u32>>,
    /// Human names of the levels, smallest first (`["s", "m", "l", "xl"]`).
    pub level_names: Vec<String>,
    /// Tokenizer.
    pub tokenizer: Tokenizer,
    /// Provenance.
    pub provenance: Provenance,
    /// Keys this version does not interpret (catalog, self-test vectors, ...), kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Metadata {
    /// Number of nesting levels (widths per layer).
    pub fn n_levels(&self) -> usize {
        self.level_names.len()
    }

    /// Checks that the metadata describes a possible model: non-zero sizes within
    /// [`MAX_DIM`](super::MAX_DIM), `n_kv_heads` dividing `n_heads`, an even `head_dim` (RoPE),
    /// positive finite `norm_eps` and `rope_theta`, 1 to 16 uniquely named levels, one width
    /// list per layer with one strictly increasing, non-zero width per level, and token ids
    /// inside the vocabulary. Run by the reader after decoding and by the writer before
    /// writing (`docs/format.md`, reader requirement 11).
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |reason: String| Err(FormatError::BadMetadata { reason });
        let a = &self.architecture;
        for (what, v) in [
            ("d_model", a.d_model),
            ("n_layers", a.n_layers),
            ("n_heads", a.n_heads),
            ("n_kv_heads", a.n_kv_heads),
            ("head_dim", a.head_dim),
            ("vocab_size", a.vocab_size),
            ("max_context", a.max_context),
        ] {
            if v == 0 {
                return bad(format!("architecture.{what} is zero"));
            }
            if v > MAX_DIM && what != "max_context" {
                return bad(format!("architecture.{what} is {v}, more than {MAX_DIM}"));
            }
        }
        if a.n_layers > MAX_LAYERS {
            return bad(format!("architecture.n_layers is {}, more than {MAX_LAYERS}", a.n_layers));
        }
        if !a.n_heads.is_multiple_of(a.n_kv_heads) {
            return bad(format!("n_heads ({}) is not a multiple of n_kv_heads ({})", a.n_heads, a.n_kv_heads));
        }
        if !a.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) is odd; rotary embeddings need an even head_dim", a.head_dim));
        }
        match u64::from(a.n_heads).checked_mul(u64::from(a.head_dim)) {
            Some(q) if q <= u64::from(MAX_DIM) => {}
            _ => return bad(format!("n_heads * head_dim ({} * {}) is more than {MAX_DIM}", a.n_heads, a.head_dim)),
        }
        if !(a.norm_eps.is_finite() && a.norm_eps > 0.0) {
            return bad(format!("norm_eps ({}) is not a positive finite number", a.norm_eps));
        }
        if !(a.rope_theta.is_finite() && a.rope_theta > 0.0) {
            return bad(format!("rope_theta ({}) is not a positive finite number", a.rope_theta));
        }

        let n_levels = self.level_names.len();
        if n_levels == 0 || n_levels > MAX_LEVELS {
            return bad(format!("{n_levels} level names, expected 1..={MAX_LEVELS}"));
        }
        for (j, name) in self.level_names.iter().enumerate() {
            if name.is_empty() || name.len() > 32 || name.contains(',') || name.chars().any(char::is_whitespace) {
                return bad(format!("level name {j} ({name:?}) must be 1 to 32 bytes without commas or spaces"));
            }
            if self.level_names[..j].contains(name) {
                return bad(format!("level name {name:?} appears twice"));
            }
        }

        if self.ffn_widths.len() != a.n_layers as usize {
            return bad(format!(
                "ffn_widths has {} per-layer lists but n_layers is {}",
                self.ffn_widths.len(),
                a.n_layers
            ));
        }
        for (i, widths) in self.ffn_widths.iter().enumerate() {
            if widths.len() != n_levels {
                return bad(format!("ffn_widths[{i}] has {} widths but there are {n_levels} levels", widths.len()));
            }
            let mut prev = 0u32;
            for (j, &w) in widths.iter().enumerate() {
                if w == 0 {
                    return bad(format!("ffn_widths[{i}][{j}] is zero"));
                }
                if w <= prev {
                    return bad(format!("ffn_widths[{i}] is not strictly increasing: {prev} then {w} at level {j}"));
                }
                if w > MAX_DIM {
                    return bad(format!("ffn_widths[{i}][{j}] is {w}, more than {MAX_DIM}"));
                }
                prev = w;
            }
        }

        match super::gemma3n::Gemma3nConfig::from_metadata(self) {
            Err(reason) => return bad(reason),
            Ok(Some(g)) => g.validate(self).or_else(bad)?,
            Ok(None) if a.family == super::gemma3n::GEMMA3N_FAMILY => {
                return bad(format!("family {:?} needs the {} key", a.family, super::gemma3n::GEMMA3N_KEY));
            }
            Ok(None) => {}
        }
        self.special_tokens()?;
        self.chat_template()?;
        if self.tokenizer.kind == BYTES_TOKENIZER_KIND && a.vocab_size < 256 {
            return bad(format!("byte tokenizer needs vocab_size >= 256, found {}", a.vocab_size));
        }
        for (what, id) in [("bos_id", self.tokenizer.bos_id), ("eos_id", self.tokenizer.eos_id)] {
            if let Some(id) = id {
                if id >= a.vocab_size {
                    return bad(format!("tokenizer.{what} {id} is outside the vocabulary ({})", a.vocab_size));
                }
            }
        }
        Ok(())
    }

    /// The special-token strings (metadata key `special_tokens`), if stored. Errors if the key
    /// holds something else than a [`SpecialTokens`] object.
    pub fn special_tokens(&self) -> Result<Option<SpecialTokens>, FormatError> {
        match self.extra.get(SPECIAL_TOKENS_KEY) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => SpecialTokens::deserialize(v).map(Some).map_err(|e| FormatError::BadMetadata {
                reason: format!("{SPECIAL_TOKENS_KEY} is not an object of token strings: {e}"),
            }),
        }
    }

    /// Stores (or, with `None`, removes) the special-token strings.
    pub fn set_special_tokens(&mut self, special: Option<&SpecialTokens>) -> Result<(), FormatError> {
        match special {
            None => {
                self.extra.remove(SPECIAL_TOKENS_KEY);
            }
            Some(s) => {
                let v = serde_json::to_value(s).map_err(|e| FormatError::BadMetadata {
                    reason: format!("cannot serialise special tokens: {e}"),
                })?;
                self.extra.insert(SPECIAL_TOKENS_KEY.to_string(), v);
            }
        }
        Ok(())
    }

    /// The Jinja chat template (metadata key `chat_template`), if stored. Errors if the key
    /// holds something else than a string.
    pub fn chat_template(&self) -> Result<Option<&str>, FormatError> {
        match self.extra.get(CHAT_TEMPLATE_KEY) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(FormatError::BadMetadata { reason: format!("{CHAT_TEMPLATE_KEY} is not a string") }),
        }
    }

    /// Stores (or, with `None`, removes) the chat template.
    pub fn set_chat_template(&mut self, template: Option<&str>) {
        match template {
            None => self.extra.remove(CHAT_TEMPLATE_KEY),
            Some(t) => self.extra.insert(CHAT_TEMPLATE_KEY.to_string(), serde_json::Value::String(t.to_string())),
        };
    }

    /// How the levels were nested (metadata key `nesting`). A missing key or a value this
    /// version does not know reads as [`NestingOrigin::Unknown`]: the key only tunes the
    /// default switch mode, so an unfamiliar value must not make a file unreadable.
    pub fn nesting(&self) -> NestingOrigin {
        match self.extra.get(NESTING_KEY).and_then(serde_json::Value::as_str) {
            Some("trained") => NestingOrigin::Trained,
            Some("post_hoc") => NestingOrigin::PostHoc,
            _ => NestingOrigin::Unknown,
        }
    }

    /// Records how the levels were nested; [`NestingOrigin::Unknown`] removes the key.
    pub fn set_nesting(&mut self, nesting: NestingOrigin) {
        match nesting {
            NestingOrigin::Unknown => self.extra.remove(NESTING_KEY),
            n => self.extra.insert(NESTING_KEY.to_string(), serde_json::Value::String(n.as_str().to_string())),
        };
    }

    /// The metadata as compact JSON, exactly as the writer stores it.
    pub fn to_json_bytes(&self) -> Result<Vec<u8>, FormatError> {
        serde_json::to_vec(self).map_err(|e| FormatError::BadMetadata { reason: format!("cannot serialise: {e}") })
    }
}

/// Canonical tensor names. Linear weights are stored `[out_features, in_features]` row-major
/// (PyTorch `nn.Linear.weight` layout), so a GEMV reads one contiguous row per output.
pub mod names {
    /// `[vocab_size, d_model]`.
    pub const TOK_EMBEDDINGS: &str = "tok_embeddings";
    /// `[d_model]` final norm weight.
    pub const NORM: &str = "norm";
    /// `[d_model]` final norm bias (LayerNorm only).
    pub const NORM_BIAS: &str = "norm_bias";
    /// `[vocab_size, d_model]`, absent when embeddings are tied.
    pub const LM_HEAD: &str = "lm_head";

    /// Per-layer tensor name: `layers.{i}.{suffix}`.
    pub fn layer(i: usize, suffix: &str) -> String {
        format!("layers.{i}.{suffix}")
    }

    /// `[d_model]` pre-attention norm weight.
    pub const ATTN_NORM: &str = "attn_norm";
    /// `[d_model]` pre-attention norm bias (LayerNorm only).
    pub const ATTN_NORM_BIAS: &str = "attn_norm_bias";
    /// `[n_heads * head_dim, d_model]`.
    pub const WQ: &str = "wq";
    /// `[n_kv_heads * head_dim, d_model]`.
    pub const WK: &str = "wk";
    /// `[n_kv_heads * head_dim, d_model]`.
    pub const WV: &str = "wv";
    /// `[d_model, n_heads * head_dim]`.
    pub const WO: &str = "wo";
    /// `[d_model]` pre-FFN norm weight.
    pub const FFN_NORM: &str = "ffn_norm";
    /// `[d_model]` pre-FFN norm bias (LayerNorm only).
    pub const FFN_NORM_BIAS: &str = "ffn_norm_bias";
    /// Nested, `[ffn_width, d_model]`: one row per neuron.
    pub const FFN_UP: &str = "ffn_up";
    /// Nested, `[ffn_width, d_model]`: one row per neuron (gated FFNs only).
    pub const FFN_GATE: &str = "ffn_gate";
    /// Nested, `[ffn_width, d_model]`: the TRANSPOSED down projection, one row per neuron.
    pub const FFN_DOWN_T: &str = "ffn_down_t";

    /// Suffixes of the nested (per-neuron, level-segmented) tensors.
    pub const NESTED_SUFFIXES: [&str; 3] = [FFN_UP, FFN_GATE, FFN_DOWN_T];
}

#[cfg(test)]
mod nesting_tests {
    use super::*;

    #[test]
    fn nesting_reads_known_values_and_treats_anything_else_as_unknown() {
        let mut m = crate::format::testing::synthetic_metadata(16, 2, 2, 1, 8, 300, vec![vec![8, 16]], true, false);
        assert_eq!(m.nesting(), NestingOrigin::Unknown);
        for n in [NestingOrigin::Trained, NestingOrigin::PostHoc] {
            m.set_nesting(n);
            assert_eq!(m.extra.get(NESTING_KEY).and_then(|v| v.as_str()), Some(n.as_str()));
            assert_eq!(m.nesting(), n);
        }
        m.set_nesting(NestingOrigin::Unknown);
        assert!(!m.extra.contains_key(NESTING_KEY));
        for odd in [serde_json::json!("distilled"), serde_json::json!(3), serde_json::Value::Null] {
            m.extra.insert(NESTING_KEY.into(), odd);
            assert_eq!(m.nesting(), NestingOrigin::Unknown);
            m.validate().unwrap();
        }
    }
}
