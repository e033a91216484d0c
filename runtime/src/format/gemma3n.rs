//! Gemma 3n in a `.matf` file: the architecture fields beyond a Llama block (metadata key
//! [`GEMMA3N_KEY`]), its tensor names and shapes, and the elastic-depth rules (which layers a
//! submodel may skip). docs/format.md, "Gemma 3n", is the normative description.
//!
//! Gemma 3n (Hugging Face `Gemma3nForCausalLM`) adds to a Llama-style decoder: token embeddings
//! scaled by `sqrt(d_model)`; per-layer embeddings (a second table of `per_layer_dim` values per
//! layer per token, mixed with a projection of the main embedding and gated into every layer);
//! AltUp (`altup_inputs` residual streams with a router, predict and correct steps); LAuReL (a
//! low-rank residual branch); four RMSNorms per block; q, k and v norms and attention scale 1;
//! RoPE with separate bases for sliding-window and full layers; the last `kv_shared_layers`
//! layers reading the K/V of the last earlier layer of the same attention type; a GeGLU FFN
//! with Gaussian top-k activation sparsity on some layers; final logit soft-capping.

use serde::{Deserialize, Serialize};

use super::layout::{DType, TensorSpec};
use super::meta::{names, Activation, Metadata, NormKind};

/// Top-level metadata key of a Gemma 3n file's [`Gemma3nConfig`].
pub const GEMMA3N_KEY: &str = "gemma3n";
/// `architecture.family` of a Gemma 3n file.
pub const GEMMA3N_FAMILY: &str = "gemma3n";

/// The Gemma 3n fields of a file's architecture (metadata key `gemma3n`). The Llama-style
/// fields stay in [`Architecture`](super::Architecture): `rope_theta` there is the base of the
/// full-attention layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gemma3nConfig {
    /// Values per layer per token of the per-layer embeddings (`hidden_size_per_layer_input`).
    pub per_layer_dim: u32,
    /// Rows of the per-layer embedding table (`vocab_size_per_layer_input`); tokens at or
    /// above it read row 0.
    pub per_layer_vocab: u32,
    /// AltUp residual streams (`altup_num_inputs`), at least 1.
    pub altup_inputs: u32,
    /// Whether the corrected active stream is scaled by `altup.correct_output_scale` before
    /// the per-layer input gate (`altup_correct_scale`).
    pub altup_correct_scale: bool,
    /// Rank of the LAuReL branch (`laurel_rank`).
    pub laurel_rank: u32,
    /// Tokens a sliding-window layer attends to, itself included (`sliding_window`): query
    /// position `i` sees key positions `j` with `i - window < j <= i`.
    pub sliding_window: u32,
    /// Per layer: `true` for sliding-window attention, `false` for full attention
    /// (`layer_types`).
    pub sliding: Vec<bool>,
    /// RoPE base of the sliding-window layers (`rope_local_base_freq`).
    pub rope_local_theta: f32,
    /// The last this many layers read another layer's K/V (`num_kv_shared_layers`).
    pub kv_shared_layers: u32,
    /// Per layer: target sparsity of the Gaussian top-k on the FFN gate (0 = dense)
    /// (`activation_sparsity_pattern`).
    pub activation_sparsity: Vec<f32>,
    /// `logits = cap * tanh(logits / cap)` when set (`final_logit_softcapping`).
    pub final_logit_softcap: Option<f32>,
}

/// Tensor names of a Gemma 3n file beyond [`names`]' Llama set. Per-layer ones are suffixes
/// for [`names::layer`].
pub mod g3n_names {
    /// `[per_layer_vocab, n_layers * per_layer_dim]`: one row per token, layer after layer.
    pub const PER_LAYER_EMBEDDINGS: &str = "per_layer_embeddings";
    /// `[n_layers * per_layer_dim, d_model]`.
    pub const PER_LAYER_MODEL_PROJECTION: &str = "per_layer_model_projection";
    /// `[per_layer_dim]`.
    pub const PER_LAYER_PROJECTION_NORM: &str = "per_layer_projection_norm";

    /// `altup_proj.{j}`, `[d_model, d_model]`, `j` in `0..altup_inputs - 1`.
    pub fn altup_proj(j: usize) -> String {
        format!("altup_proj.{j}")
    }

    /// `altup_unembed.{j}`, `[d_model, d_model]`, `j` in `0..altup_inputs - 1`.
    pub fn altup_unembed(j: usize) -> String {
        format!("altup_unembed.{j}")
    }

    /// `[d_model]` norm of the attention output (`post_attention_layernorm`).
    pub const POST_ATTN_NORM: &str = "post_attn_norm";
    /// `[d_model]` norm of the FFN output (`post_feedforward_layernorm`).
    pub const POST_FFN_NORM: &str = "post_ffn_norm";
    /// `[head_dim]` query norm.
    pub const Q_NORM: &str = "q_norm";
    /// `[head_dim]` key norm (layers that own their K/V only; the value norm has no weight).
    pub const K_NORM: &str = "k_norm";
    /// `[d_model]`.
    pub const ALTUP_CORRECT_SCALE: &str = "altup.correct_output_scale";
    /// `[altup_inputs, altup_inputs]`.
    pub const ALTUP_CORRECTION: &str = "altup.correction_coefs";
    /// `[altup_inputs * altup_inputs, altup_inputs]`.
    pub const ALTUP_PREDICTION: &str = "altup.prediction_coefs";
    /// `[altup_inputs, d_model]`.
    pub const ALTUP_ROUTER: &str = "altup.router";
    /// `[d_model]`.
    pub const ALTUP_ROUTER_NORM: &str = "altup.router_norm";
    /// `[laurel_rank, d_model]`.
    pub const LAUREL_LEFT: &str = "laurel.left";
    /// `[d_model, laurel_rank]`.
    pub const LAUREL_RIGHT: &str = "laurel.right";
    /// `[d_model]`.
    pub const LAUREL_NORM: &str = "laurel.norm";
    /// `[per_layer_dim, d_model]`.
    pub const PLE_GATE: &str = "ple.gate";
    /// `[d_model, per_layer_dim]`.
    pub const PLE_PROJ: &str = "ple.proj";
    /// `[d_model]`.
    pub const PLE_NORM: &str = "ple.norm";
}

impl Gemma3nConfig {
    /// The file's Gemma 3n fields: `Ok(None)` when the metadata has no `gemma3n` key, an
    /// error naming the problem when the key is malformed.
    pub fn from_metadata(meta: &Metadata) -> Result<Option<Gemma3nConfig>, String> {
        match meta.extra.get(GEMMA3N_KEY) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => Gemma3nConfig::deserialize(v).map(Some).map_err(|e| format!("{GEMMA3N_KEY} is malformed: {e}")),
        }
    }

    /// Stores `self` under the `gemma3n` key and sets the family.
    pub fn store(&self, meta: &mut Metadata) {
        meta.architecture.family = GEMMA3N_FAMILY.to_string();
        meta.extra.insert(GEMMA3N_KEY.to_string(), serde_json::to_value(self).unwrap_or(serde_json::Value::Null));
    }

    /// Checks the fields against each other and against `meta`'s architecture (run by
    /// [`Metadata::validate`]); the error is one line naming the field.
    pub fn validate(&self, meta: &Metadata) -> Result<(), String> {
        let a = &meta.architecture;
        let n = a.n_layers as usize;
        if a.family != GEMMA3N_FAMILY {
            return Err(format!(
                "the {GEMMA3N_KEY} key needs architecture.family {GEMMA3N_FAMILY:?}, found {:?}",
                a.family
            ));
        }
        if a.norm != NormKind::RmsNorm || !a.gated_ffn || a.activation != Activation::GeluTanh {
            return Err("Gemma 3n uses RMSNorm and a gated GELU (tanh) FFN".into());
        }
        for (what, v) in [
            ("per_layer_dim", self.per_layer_dim),
            ("per_layer_vocab", self.per_layer_vocab),
            ("altup_inputs", self.altup_inputs),
            ("laurel_rank", self.laurel_rank),
            ("sliding_window", self.sliding_window),
        ] {
            if v == 0 || v > super::MAX_DIM {
                return Err(format!("{GEMMA3N_KEY}.{what} is {v}, expected 1..={}", super::MAX_DIM));
            }
        }
        if self.altup_inputs > 16 {
            return Err(format!("{GEMMA3N_KEY}.altup_inputs is {}, at most 16", self.altup_inputs));
        }
        if u64::from(self.per_layer_dim) * n as u64 > u64::from(super::MAX_DIM) {
            return Err(format!("{GEMMA3N_KEY}.per_layer_dim * n_layers is more than {}", super::MAX_DIM));
        }
        if self.sliding.len() != n {
            return Err(format!("{GEMMA3N_KEY}.sliding has {} entries, n_layers is {n}", self.sliding.len()));
        }
        if self.activation_sparsity.len() != n {
            return Err(format!(
                "{GEMMA3N_KEY}.activation_sparsity has {} entries, n_layers is {n}",
                self.activation_sparsity.len()
            ));
        }
        if let Some((i, s)) =
            self.activation_sparsity.iter().enumerate().find(|(_, s)| !(s.is_finite() && (0.0..1.0).contains(*s)))
        {
            return Err(format!("{GEMMA3N_KEY}.activation_sparsity[{i}] is {s}, expected 0 <= s < 1"));
        }
        if !(self.rope_local_theta.is_finite() && self.rope_local_theta > 0.0) {
            return Err(format!("{GEMMA3N_KEY}.rope_local_theta {} is not a positive number", self.rope_local_theta));
        }
        if let Some(c) = self.final_logit_softcap {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!("{GEMMA3N_KEY}.final_logit_softcap {c} is not a positive number"));
            }
        }
        if self.kv_shared_layers as usize >= n {
            return Err(format!(
                "{GEMMA3N_KEY}.kv_shared_layers is {}, but at least one of the {n} layers must own its K/V",
                self.kv_shared_layers
            ));
        }
        for i in self.first_shared()..n {
            if self.kv_owner(i).is_none() {
                let kind = if self.sliding[i] { "sliding-window" } else { "full-attention" };
                return Err(format!(
                    "layer {i} shares K/V but no earlier {kind} layer before layer {} owns its K/V",
                    self.first_shared()
                ));
            }
        }
        Ok(())
    }

    /// The first layer that reads another layer's K/V (`n_layers` when none does).
    pub fn first_shared(&self) -> usize {
        self.sliding.len().saturating_sub(self.kv_shared_layers as usize)
    }

    /// Whether layer `i` computes and caches its own K/V.
    pub fn owns_kv(&self, i: usize) -> bool {
        i < self.first_shared()
    }

    /// The layer whose K/V layer `i` attends over: `i` itself when it owns its K/V, else the
    /// last layer before the shared range with the same attention type (`None` when there is
    /// no such layer, which [`Gemma3nConfig::validate`] rejects).
    pub fn kv_owner(&self, i: usize) -> Option<usize> {
        let first = self.first_shared();
        if i < first {
            return Some(i);
        }
        let kind = *self.sliding.get(i)?;
        (0..first).rev().find(|&j| self.sliding[j] == kind)
    }

    /// The layers whose K/V other layers read (Gemma 3n E4B: 18 and 19), ascending.
    pub fn kv_producers(&self) -> Vec<usize> {
        let mut out: Vec<usize> = (self.first_shared()..self.sliding.len()).filter_map(|i| self.kv_owner(i)).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Checks a set of skipped layers (`skip[i]` true: layer `i` is not run): at least one
    /// layer runs, and no skipped layer holds K/V that a running layer reads. This is the rule
    /// of MatFormer Lab's slicing (the producers are "reserved"); the error names it.
    pub fn check_skip(&self, skip: &[bool]) -> Result<(), String> {
        let n = self.sliding.len();
        if skip.len() != n {
            return Err(format!("the skip list has {} entries, the model has {n} layers", skip.len()));
        }
        if skip.iter().all(|&s| s) {
            return Err("every layer is skipped: a submodel must run at least one layer".into());
        }
        for i in 0..n {
            if skip[i] {
                continue;
            }
            if let Some(owner) = self.kv_owner(i) {
                if owner != i && skip[owner] {
                    return Err(format!(
                        "layer {owner} cannot be skipped: it holds the K/V that layer {i} reads \
                         (Gemma 3n's KV-sharing layers {:?} stay in every slice that runs a layer from {} on)",
                        self.kv_producers(),
                        self.first_shared()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The tensors of a Gemma 3n file, in canonical order, each with `dtype` (see
/// [`required_tensor_specs`](super::required_tensor_specs), which calls this for Gemma 3n
/// metadata). Never panics.
pub(crate) fn gemma3n_tensor_specs(meta: &Metadata, g: &Gemma3nConfig, dtype: DType) -> Vec<TensorSpec> {
    use g3n_names as g3;
    let a = &meta.architecture;
    let d = u64::from(a.d_model);
    let vocab = u64::from(a.vocab_size);
    let hd = u64::from(a.head_dim);
    let q_dim = u64::from(a.n_heads).saturating_mul(hd);
    let kv_dim = u64::from(a.n_kv_heads).saturating_mul(hd);
    let n_layers = a.n_layers as usize;
    let ple = u64::from(g.per_layer_dim);
    let ple_all = ple.saturating_mul(n_layers as u64);
    let n_in = u64::from(g.altup_inputs);
    let rank = u64::from(g.laurel_rank);
    let spec = |name: String, shape: Vec<u64>| TensorSpec { name, dtype, shape };

    let mut out = vec![
        spec(names::TOK_EMBEDDINGS.to_string(), vec![vocab, d]),
        spec(g3::PER_LAYER_EMBEDDINGS.to_string(), vec![u64::from(g.per_layer_vocab), ple_all]),
        spec(g3::PER_LAYER_MODEL_PROJECTION.to_string(), vec![ple_all, d]),
        spec(g3::PER_LAYER_PROJECTION_NORM.to_string(), vec![ple]),
    ];
    for j in 0..(g.altup_inputs as usize).saturating_sub(1) {
        out.push(spec(g3::altup_proj(j), vec![d, d]));
    }
    for i in 0..n_layers {
        let h = meta.ffn_widths.get(i).and_then(|w| w.last()).copied().map_or(0, u64::from);
        let l = |s: &str| names::layer(i, s);
        out.push(spec(l(g3::ALTUP_CORRECT_SCALE), vec![d]));
        out.push(spec(l(g3::ALTUP_CORRECTION), vec![n_in, n_in]));
        out.push(spec(l(g3::ALTUP_PREDICTION), vec![n_in.saturating_mul(n_in), n_in]));
        out.push(spec(l(g3::ALTUP_ROUTER), vec![n_in, d]));
        out.push(spec(l(g3::ALTUP_ROUTER_NORM), vec![d]));
        out.push(spec(l(names::ATTN_NORM), vec![d]));
        out.push(spec(l(g3::LAUREL_LEFT), vec![rank, d]));
        out.push(spec(l(g3::LAUREL_RIGHT), vec![d, rank]));
        out.push(spec(l(g3::LAUREL_NORM), vec![d]));
        out.push(spec(l(names::WQ), vec![q_dim, d]));
        out.push(spec(l(g3::Q_NORM), vec![hd]));
        if g.owns_kv(i) {
            out.push(spec(l(names::WK), vec![kv_dim, d]));
            out.push(spec(l(names::WV), vec![kv_dim, d]));
            out.push(spec(l(g3::K_NORM), vec![hd]));
        }
        out.push(spec(l(names::WO), vec![d, q_dim]));
        out.push(spec(l(g3::POST_ATTN_NORM), vec![d]));
        out.push(spec(l(names::FFN_NORM), vec![d]));
        out.push(spec(l(names::FFN_GATE), vec![h, d]));
        out.push(spec(l(names::FFN_UP), vec![h, d]));
        out.push(spec(l(names::FFN_DOWN_T), vec![h, d]));
        out.push(spec(l(g3::POST_FFN_NORM), vec![d]));
        out.push(spec(l(g3::PLE_GATE), vec![ple, d]));
        out.push(spec(l(g3::PLE_PROJ), vec![d, ple]));
        out.push(spec(l(g3::PLE_NORM), vec![d]));
    }
    for j in 0..(g.altup_inputs as usize).saturating_sub(1) {
        out.push(spec(g3::altup_unembed(j), vec![d, d]));
    }
    out.push(spec(names::NORM.to_string(), vec![d]));
    if !a.tied_embeddings {
        out.push(spec(names::LM_HEAD.to_string(), vec![vocab, d]));
    }
    out
}

/// The layer a per-layer Gemma 3n tensor name belongs to (`layers.{i}.…`), for any suffix.
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("layers.")?;
    let (idx, _) = rest.split_once('.')?;
    if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) || (idx.len() > 1 && idx.starts_with('0')) {
        return None;
    }
    idx.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma 3n E4B's attention pattern: 35 layers, every fifth full, the last 15 sharing.
    fn e4b() -> Gemma3nConfig {
        Gemma3nConfig {
            per_layer_dim: 256,
            per_layer_vocab: 262_144,
            altup_inputs: 4,
            altup_correct_scale: true,
            laurel_rank: 64,
            sliding_window: 512,
            sliding: (0..35).map(|i| (i + 1) % 5 != 0).collect(),
            rope_local_theta: 10_000.0,
            kv_shared_layers: 15,
            activation_sparsity: (0..35).map(|i| if i < 10 { 0.95 } else { 0.0 }).collect(),
            final_logit_softcap: Some(30.0),
        }
    }

    #[test]
    fn e4b_kv_sharing() {
        let g = e4b();
        assert_eq!(g.first_shared(), 20);
        assert_eq!(g.kv_producers(), vec![18, 19]);
        assert_eq!(g.kv_owner(20), Some(18));
        assert_eq!(g.kv_owner(24), Some(19));
        assert_eq!(g.kv_owner(34), Some(19));
        assert_eq!(g.kv_owner(7), Some(7));
    }

    #[test]
    fn skip_rules() {
        let g = e4b();
        let mut skip = vec![false; 35];
        for s in &mut skip[20..25] {
            *s = true;
        }
        g.check_skip(&skip).expect("E2B's skip set is valid");
        skip[19] = true;
        let e = g.check_skip(&skip).unwrap_err();
        assert!(e.contains("layer 19 cannot be skipped"), "{e}");
        // Once no running layer reads layer 19's K/V, it may go too.
        let mut tail = vec![false; 35];
        for s in &mut tail[19..] {
            *s = true;
        }
        tail[18] = false;
        g.check_skip(&tail).expect("no running layer reads layer 19");
        let e = g.check_skip(&[true; 35]).unwrap_err();
        assert!(e.contains("at least one layer"), "{e}");
        assert!(g.check_skip(&[false; 3]).is_err());
    }

    #[test]
    fn layer_names() {
        assert_eq!(layer_of("layers.12.altup.router"), Some(12));
        assert_eq!(layer_of("layers.01.wq"), None);
        assert_eq!(layer_of("per_layer_embeddings"), None);
    }
}
