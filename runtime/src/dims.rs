//! [`ModelDims`]: a file's architecture numbers in `usize`, validated once, shared by the CPU
//! and GPU engines.

use crate::format::{Activation, Metadata, NormKind};

/// The architecture of a model as the engines use it: every count in `usize`, every derived
/// size computed with checked arithmetic. Built only by [`ModelDims::from_metadata`], so holding
/// one means the invariants below hold:
///
/// - `d_model`, `n_layers`, `n_heads`, `n_kv_heads`, `vocab` and `max_context` are positive;
/// - `n_heads` is a multiple of `n_kv_heads` (grouped-query attention);
/// - `head_dim` is positive and even (RoPE rotates pairs);
/// - `q_dim = n_heads * head_dim` and `kv_dim = n_kv_heads * head_dim` fit in `usize`;
/// - `norm_eps` is finite and non-negative; the file's `rope_theta` is finite and positive;
/// - the file has one FFN width list per layer.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ModelDims {
    /// Hidden size.
    pub d_model: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Elements of one token's queries: `n_heads * head_dim`.
    pub q_dim: usize,
    /// Elements of one token's keys (or values): `n_kv_heads * head_dim`.
    pub kv_dim: usize,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab: usize,
    /// Longest context the model was trained for, tokens.
    pub max_context: usize,
    /// Epsilon of every normalisation.
    pub norm_eps: f32,
    /// RMSNorm or LayerNorm.
    pub norm: NormKind,
    /// FFN activation.
    pub activation: Activation,
    /// Whether the FFN is gated (`act(gate) * up`).
    pub gated: bool,
}

impl ModelDims {
    /// Validates `meta`'s architecture; the error is the reason, in one line, for the engine to
    /// wrap in its own error type.
    pub fn from_metadata(meta: &Metadata) -> Result<ModelDims, String> {
        let a = &meta.architecture;
        let u = |v: u32| v as usize;
        if a.d_model == 0 || a.n_layers == 0 || a.n_heads == 0 || a.n_kv_heads == 0 {
            return Err("d_model, n_layers, n_heads and n_kv_heads must be positive".into());
        }
        if !a.n_heads.is_multiple_of(a.n_kv_heads) {
            return Err(format!("n_heads {} is not a multiple of n_kv_heads {}", a.n_heads, a.n_kv_heads));
        }
        if a.head_dim == 0 || !a.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be positive and even (RoPE rotates pairs)", a.head_dim));
        }
        if a.vocab_size == 0 || a.max_context == 0 {
            return Err("vocab_size and max_context must be positive".into());
        }
        if !(a.norm_eps.is_finite() && a.norm_eps >= 0.0) {
            return Err(format!("norm_eps {} is not a finite non-negative number", a.norm_eps));
        }
        if !(a.rope_theta.is_finite() && a.rope_theta > 0.0) {
            return Err(format!("rope_theta {} is not a positive number", a.rope_theta));
        }
        if meta.ffn_widths.len() != u(a.n_layers) {
            return Err(format!("ffn_widths has {} layers, n_layers is {}", meta.ffn_widths.len(), a.n_layers));
        }
        let q_dim = u(a.n_heads).checked_mul(u(a.head_dim)).ok_or("n_heads * head_dim overflows")?;
        let kv_dim = u(a.n_kv_heads).checked_mul(u(a.head_dim)).ok_or("n_kv_heads * head_dim overflows")?;
        Ok(ModelDims {
            d_model: u(a.d_model),
            n_layers: u(a.n_layers),
            n_heads: u(a.n_heads),
            n_kv_heads: u(a.n_kv_heads),
            head_dim: u(a.head_dim),
            q_dim,
            kv_dim,
            vocab: u(a.vocab_size),
            max_context: u(a.max_context),
            norm_eps: a.norm_eps,
            norm: a.norm,
            activation: a.activation,
            gated: a.gated_ffn,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::testing::synthetic_metadata;

    fn meta() -> Metadata {
        synthetic_metadata(32, 3, 4, 2, 8, 260, vec![vec![16, 32]], true, true)
    }

    #[test]
    fn derived_sizes() {
        let d = ModelDims::from_metadata(&meta()).expect("valid");
        assert_eq!((d.q_dim, d.kv_dim), (32, 16));
        assert_eq!(d.n_layers, meta().ffn_widths.len());
    }

    /// A needle expected in the error, and how to break the metadata.
    type Case = (&'static str, fn(&mut Metadata));

    #[test]
    fn each_invariant_is_checked() {
        let cases: [Case; 7] = [
            ("positive", |m| m.architecture.d_model = 0),
            ("multiple", |m| m.architecture.n_kv_heads = 3),
            ("even", |m| m.architecture.head_dim = 7),
            ("vocab_size", |m| m.architecture.vocab_size = 0),
            ("norm_eps", |m| m.architecture.norm_eps = f32::NAN),
            ("rope_theta", |m| m.architecture.rope_theta = 0.0),
            ("ffn_widths", |m| {
                m.ffn_widths.pop();
            }),
        ];
        for (needle, break_it) in cases {
            let mut m = meta();
            break_it(&mut m);
            let err = ModelDims::from_metadata(&m).expect_err(needle);
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
