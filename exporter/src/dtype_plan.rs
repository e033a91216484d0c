//! Which dtype each tensor of a written file gets: one default (`--dtype`) plus per-tensor
//! overrides (`--dtype-override embed=q8`), for `export`, `import` and `synth`.
//!
//! `import --dtype keep` gives every tensor the dtype its source stored it in
//! ([`DTypePlan::for_source`]): GGUF `Q8_0`, `Q4_0`, `Q4_1` stay so (their blocks byte for
//! byte where the rows allow, see `import`), `F16` and `BF16` become `f16`, `F32` stays `f32`,
//! and the k-quants, which have no block layout here, take the nearest one at or above their
//! precision (`Q6_K` becomes `q8_0`, `Q4_K` `q4_1`). Overrides still apply on top.
//!
//! Override keys, matched against the canonical tensor name (the last matching override wins):
//!
//! | key | tensors |
//! |---|---|
//! | `embed` (or `tok_embeddings`) | `tok_embeddings` (also the LM head when tied) and Gemma 3n's `per_layer_embeddings` |
//! | `lm_head` (or `head`) | `lm_head` |
//! | `attn` | `wq`, `wk`, `wv`, `wo` of every layer |
//! | `ffn` | `ffn_gate`, `ffn_up`, `ffn_down_t` of every layer |
//! | `wq`, `wk`, `wv`, `wo`, `ffn_gate`, `ffn_up`, `ffn_down_t` | that matrix of every layer |
//! | a full name (`layers.3.ffn_up`, `per_layer_embeddings`, `altup_proj.0`) | that tensor |
//!
//! The 1-D tensors (norm weights and biases) cannot be block-quantised (a block is 32 elements
//! of one row): they are stored `f16` when the planned dtype is quantised. A matrix whose rows
//! are not a multiple of 32 elements cannot be quantised either; asking for it is an error
//! naming the tensor.
//!
//! Gemma 3n's small auxiliary tensors are never block-quantised: the AltUp coefficient
//! matrices (`altup.correction_coefs` `[n, n]`, `altup.prediction_coefs` `[n*n, n]`) and router
//! (`altup.router` `[n, d_model]`) are a few thousand values that steer every stream, and a
//! LAuReL or per-layer-input matrix whose rows are not whole 32-element blocks (`laurel.right`
//! `[d_model, laurel_rank]` of a small model) cannot be. Under a quantised dtype they are
//! stored `f16`, like the norms.

use anyhow::{bail, Result};
use matformer::format::{g3n_names, names, testing::required_tensor_specs, DType, Metadata, TensorSpec};

/// A default dtype plus per-tensor overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DTypePlan {
    /// Dtype of every tensor no override names.
    pub default: DType,
    /// `(key, dtype)` in command-line order; see the module documentation for the keys.
    pub overrides: Vec<(String, DType)>,
    /// `--dtype keep`: each tensor keeps its source's dtype ([`DTypePlan::for_source`];
    /// `default` is then the dtype of a tensor the source did not describe).
    pub keep: bool,
}

impl From<DType> for DTypePlan {
    fn from(default: DType) -> DTypePlan {
        DTypePlan { default, overrides: Vec::new(), keep: false }
    }
}

/// Layer-wise matrix names an override key may name.
const MATRICES: [&str; 7] =
    [names::WQ, names::WK, names::WV, names::WO, names::FFN_GATE, names::FFN_UP, names::FFN_DOWN_T];

/// Whether a Gemma 3n tensor stays unquantised: the AltUp coefficients and router, and a
/// LAuReL, per-layer-input or AltUp matrix whose rows are not whole 32-element blocks.
fn gemma3n_keeps_precision(name: &str, shape: &[u64]) -> bool {
    use g3n_names as g3;
    let suffix = name.strip_prefix("layers.").and_then(|r| r.split_once('.')).map(|(_, s)| s);
    if let Some(s) = suffix {
        if [g3::ALTUP_CORRECTION, g3::ALTUP_PREDICTION, g3::ALTUP_ROUTER].contains(&s) {
            return true;
        }
    }
    let auxiliary = suffix
        .is_some_and(|s| s.starts_with("laurel.") || s.starts_with("ple.") || s.starts_with("altup."))
        || name.starts_with("altup_")
        || name == g3::PER_LAYER_MODEL_PROJECTION;
    let row: u64 = shape.iter().skip(1).product();
    auxiliary && !row.is_multiple_of(matformer::format::QK as u64)
}

/// A dtype flag: `f32`, `f16`, `q8` (`q8_0`), `q4` (`q4_0`), `q4_1`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match DType::from_name(s) {
        Some(d) => Ok(d),
        None => bail!("unknown dtype `{s}` (f32, f16, q8 = q8_0, q4 = q4_0, q4_1)"),
    }
}

impl DTypePlan {
    /// A plan from `--dtype` and `--dtype-override KEY=DTYPE` flags.
    pub fn parse(default: &str, overrides: &[String]) -> Result<DTypePlan> {
        let mut plan = if default.trim() == "keep" {
            DTypePlan { keep: true, ..DTypePlan::from(DType::F16) }
        } else {
            DTypePlan::from(parse_dtype(default)?)
        };
        for o in overrides {
            let Some((key, dtype)) = o.split_once('=') else {
                bail!("--dtype-override `{o}`: expected KEY=DTYPE, e.g. embed=q8");
            };
            let key = key.trim();
            if !Self::key_is_known(key) {
                bail!(
                    "--dtype-override `{o}`: unknown key `{key}` (embed, lm_head, attn, ffn, wq, wk, wv, wo, \
                     ffn_gate, ffn_up, ffn_down_t, or a tensor name such as layers.0.ffn_up)"
                );
            }
            plan.overrides.push((key.to_string(), parse_dtype(dtype.trim())?));
        }
        Ok(plan)
    }

    fn key_is_known(key: &str) -> bool {
        matches!(key, "embed" | "lm_head" | "head" | "attn" | "ffn" | "ffn_down")
            || key == names::TOK_EMBEDDINGS
            || key == g3n_names::PER_LAYER_EMBEDDINGS
            || key == g3n_names::PER_LAYER_MODEL_PROJECTION
            || key.starts_with("altup_proj.")
            || key.starts_with("altup_unembed.")
            || MATRICES.contains(&key)
            || key.starts_with("layers.")
    }

    /// Whether override `key` names tensor `name`.
    fn matches(key: &str, name: &str) -> bool {
        let layer_suffix = name.strip_prefix("layers.").and_then(|r| r.split_once('.')).map(|(_, s)| s);
        match key {
            "embed" => name == names::TOK_EMBEDDINGS || name == g3n_names::PER_LAYER_EMBEDDINGS,
            "tok_embeddings" => name == names::TOK_EMBEDDINGS,
            "lm_head" | "head" => name == names::LM_HEAD,
            "attn" => layer_suffix.is_some_and(|s| [names::WQ, names::WK, names::WV, names::WO].contains(&s)),
            "ffn" => layer_suffix.is_some_and(|s| [names::FFN_GATE, names::FFN_UP, names::FFN_DOWN_T].contains(&s)),
            "ffn_down" => layer_suffix == Some(names::FFN_DOWN_T),
            k if MATRICES.contains(&k) => layer_suffix == Some(k),
            k => k == name,
        }
    }

    /// The dtype tensor `name` of `shape` gets: the last matching override or the default; a
    /// quantised choice for a 1-D tensor, or for one of Gemma 3n's small auxiliary tensors
    /// (see the module documentation), becomes `f16`.
    pub fn dtype_for(&self, name: &str, shape: &[u64]) -> DType {
        let d = self.overrides.iter().rev().find(|(k, _)| Self::matches(k, name)).map_or(self.default, |(_, d)| *d);
        if d.is_quantized() && (shape.len() < 2 || gemma3n_keeps_precision(name, shape)) {
            DType::F16
        } else {
            d
        }
    }

    /// The canonical tensor list of `meta` with each tensor's planned dtype. Errors, naming
    /// the tensor, when a quantised dtype is asked for rows that are not whole 32-element
    /// blocks.
    pub fn specs(&self, meta: &Metadata) -> Result<Vec<TensorSpec>> {
        let mut specs = required_tensor_specs(meta, self.default);
        for s in &mut specs {
            s.dtype = self.dtype_for(&s.name, &s.shape);
            let row: u64 = s.shape.iter().skip(1).product();
            if s.dtype.row_bytes(row).is_none() {
                bail!(
                    "tensor {} has {row}-element rows, not a multiple of 32: it cannot be stored as {} \
                     (use --dtype-override {}=f16)",
                    s.name,
                    s.dtype,
                    s.name
                );
            }
        }
        Ok(specs)
    }

    /// Whether any tensor may be quantised.
    pub fn any_quantized(&self) -> bool {
        self.keep || self.default.is_quantized() || self.overrides.iter().any(|(_, d)| d.is_quantized())
    }

    /// The plan to write with, given the dtype each source tensor keeps under `--dtype keep`
    /// (`source`, by canonical name): for a `keep` plan, those dtypes, then this plan's own
    /// overrides on top (the last match wins); any other plan as it is.
    pub fn for_source(&self, source: &std::collections::HashMap<String, DType>) -> DTypePlan {
        if !self.keep {
            return self.clone();
        }
        let mut kept: Vec<(String, DType)> = source.iter().map(|(n, d)| (n.clone(), *d)).collect();
        kept.sort_by(|a, b| a.0.cmp(&b.0));
        kept.extend(self.overrides.iter().cloned());
        DTypePlan { default: self.default, overrides: kept, keep: false }
    }

    /// `q4_0`, `q4_0 (embed=q8_0, lm_head=q8_0)` or `keep (embed=q8_0)`.
    pub fn describe(&self) -> String {
        let base = if self.keep { "keep" } else { self.default.name() };
        if self.overrides.is_empty() {
            return base.to_string();
        }
        let o: Vec<String> = self.overrides.iter().map(|(k, d)| format!("{k}={d}")).collect();
        format!("{base} ({})", o.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matformer::format::testing::synthetic_metadata;

    #[test]
    fn overrides_pick_tensors_and_norms_stay_f16() {
        let plan =
            DTypePlan::parse("q4", &["embed=q8".into(), "attn=q4_1".into(), "layers.1.ffn_up=f16".into()]).unwrap();
        assert_eq!(plan.dtype_for("tok_embeddings", &[300, 64]), DType::Q8_0);
        assert_eq!(plan.dtype_for("layers.0.wq", &[64, 64]), DType::Q4_1);
        assert_eq!(plan.dtype_for("layers.0.ffn_up", &[128, 64]), DType::Q4_0);
        assert_eq!(plan.dtype_for("layers.1.ffn_up", &[128, 64]), DType::F16);
        assert_eq!(plan.dtype_for("layers.1.ffn_norm", &[64]), DType::F16);
        assert_eq!(plan.dtype_for("lm_head", &[300, 64]), DType::Q4_0);
        assert_eq!(plan.describe(), "q4_0 (embed=q8_0, attn=q4_1, layers.1.ffn_up=f16)");
        let meta = synthetic_metadata(64, 2, 4, 2, 16, 300, vec![vec![64, 128]], true, false);
        let specs = plan.specs(&meta).unwrap();
        assert!(specs.iter().filter(|s| s.shape.len() == 1).all(|s| s.dtype == DType::F16));
    }

    #[test]
    fn keep_takes_the_source_dtypes_then_the_overrides() {
        let plan = DTypePlan::parse("keep", &["embed=q8".into()]).unwrap();
        assert!(plan.keep && plan.any_quantized());
        assert_eq!(plan.describe(), "keep (embed=q8_0)");
        let source: std::collections::HashMap<String, DType> = [
            ("tok_embeddings", DType::Q4_1),
            ("layers.0.ffn_up", DType::Q4_0),
            ("layers.0.wq", DType::F32),
            ("layers.0.attn_norm", DType::F32),
        ]
        .into_iter()
        .map(|(n, d)| (n.to_string(), d))
        .collect();
        let p = plan.for_source(&source);
        assert!(!p.keep);
        assert_eq!(p.dtype_for("tok_embeddings", &[300, 64]), DType::Q8_0, "the override wins");
        assert_eq!(p.dtype_for("layers.0.ffn_up", &[128, 64]), DType::Q4_0);
        assert_eq!(p.dtype_for("layers.0.wq", &[64, 64]), DType::F32);
        assert_eq!(p.dtype_for("layers.0.attn_norm", &[64]), DType::F32);
        assert_eq!(p.dtype_for("layers.0.wk", &[64, 64]), DType::F16, "not in the source: f16");
        let plain = DTypePlan::parse("q8", &[]).unwrap();
        assert_eq!(plain.for_source(&source), plain);
    }

    #[test]
    fn gemma3n_small_tensors_stay_f16_and_embed_covers_per_layer_embeddings() {
        let plan = DTypePlan::parse("q4", &["embed=q8".into()]).unwrap();
        assert_eq!(plan.dtype_for("layers.0.altup.correction_coefs", &[4, 4]), DType::F16);
        assert_eq!(plan.dtype_for("layers.0.altup.prediction_coefs", &[16, 4]), DType::F16);
        assert_eq!(plan.dtype_for("layers.0.altup.router", &[4, 2048]), DType::F16);
        assert_eq!(plan.dtype_for("layers.0.laurel.right", &[64, 8]), DType::F16);
        assert_eq!(plan.dtype_for("layers.0.laurel.right", &[2048, 64]), DType::Q4_0);
        assert_eq!(plan.dtype_for("layers.0.ple.proj", &[64, 16]), DType::F16);
        assert_eq!(plan.dtype_for("layers.0.ple.gate", &[16, 64]), DType::Q4_0);
        assert_eq!(plan.dtype_for("per_layer_embeddings", &[256, 160]), DType::Q8_0);
        assert_eq!(plan.dtype_for("tok_embeddings", &[300, 64]), DType::Q8_0);
        assert_eq!(plan.dtype_for("altup_proj.0", &[64, 64]), DType::Q4_0);
        assert!(DTypePlan::parse("q4", &["per_layer_embeddings=f16".into(), "altup_unembed.1=q8".into()]).is_ok());
        let f32_plan = DTypePlan::from(DType::F32);
        assert_eq!(f32_plan.dtype_for("layers.0.altup.router", &[4, 64]), DType::F32);
    }

    #[test]
    fn bad_flags_and_unquantisable_rows_are_errors() {
        assert!(DTypePlan::parse("q3", &[]).is_err());
        assert!(DTypePlan::parse("q4", &["embed".into()]).is_err());
        assert!(DTypePlan::parse("q4", &["bogus=q8".into()]).is_err());
        let meta = synthetic_metadata(20, 1, 2, 1, 10, 300, vec![vec![32]], true, true);
        let err = DTypePlan::from(DType::Q8_0).specs(&meta).unwrap_err().to_string();
        assert!(err.contains("tok_embeddings") && err.contains("multiple of 32"), "{err}");
    }
}
