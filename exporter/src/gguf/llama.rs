//! Llama-architecture GGUF -> canonical `.matf` tensors and metadata.
//!
//! GGUF stores a 2-D tensor with `ne = [in, out]` (`ne[0]` contiguous), so its row-major data is
//! already PyTorch's `[out, in]`. Two differences to undo:
//! - llama.cpp's converter permutes the rows of `attn_q` and `attn_k` so that each head's rotary
//!   pairs are adjacent (`(2j, 2j + 1)`, GPT-J style); our engine rotates pairs
//!   `(j, j + head_dim/2)` (Hugging Face `rotate_half`). Row `h*hd + 2j + i` of the GGUF tensor
//!   is row `h*hd + i*hd/2 + j` of the Hugging Face one (`i` in 0..2, `j` in 0..hd/2), which is
//!   how transformers' GGUF loader reverses it (`_reverse_permute_weights`).
//! - the file stores the FFN down projection transposed (`ffn_down_t`, `[width, d_model]`).
//!
//! Blocks kept as they are: a `Q8_0`, `Q4_0` or `Q4_1` tensor's blocks run along `ne[0]`, the
//! input features, which is along the rows of every file tensor except `ffn_down_t` (stored
//! transposed, so its blocks would run across rows). [`tensors`] returns those blocks too
//! ([`RawBlocks`], with the rotary row order of `wq`/`wk` undone row by row), so that an import
//! whose planned dtype for the tensor is the same block type copies them instead of
//! dequantising and quantising again (which would not give the same bytes).

use std::collections::HashMap;

use matformer::format::{names, Activation, Architecture, DType, NormKind, Positional};

use super::reader::{GgmlType, Gguf, GgufError, TensorInfo};

/// Raw ggml blocks of tensors whose rows are whole blocks of one of the file's block types,
/// keyed by canonical name: the dtype and the bytes in canonical row order.
pub type RawBlocks = HashMap<String, (DType, Vec<u8>)>;

/// The file dtype with the same block layout as ggml type `ty`, if any.
pub fn block_dtype(ty: GgmlType) -> Option<DType> {
    match ty {
        GgmlType::Q8_0 => Some(DType::Q8_0),
        GgmlType::Q4_0 => Some(DType::Q4_0),
        GgmlType::Q4_1 => Some(DType::Q4_1),
        _ => None,
    }
}
use crate::onnx_source::Weight;

/// Architecture parameters read from `llama.*` keys.
pub fn architecture(g: &Gguf<'_>) -> Result<Architecture, GgufError> {
    let arch = g.str_key("general.architecture")?;
    if arch != "llama" {
        return Err(GgufError::Key {
            key: "general.architecture".into(),
            problem: format!("is `{arch}`; only `llama` GGUF files can be imported"),
        });
    }
    let u32_key = |k: &str| -> Result<u32, GgufError> {
        let v = g.u64_key(k)?;
        u32::try_from(v).map_err(|_| GgufError::Key { key: k.into(), problem: format!("is {v}, too large") })
    };
    let d_model = u32_key("llama.embedding_length")?;
    let n_heads = u32_key("llama.attention.head_count")?;
    let n_kv_heads = match g.get("llama.attention.head_count_kv") {
        Some(_) => u32_key("llama.attention.head_count_kv")?,
        None => n_heads,
    };
    if n_heads == 0 || !d_model.is_multiple_of(n_heads) {
        return Err(GgufError::Key {
            key: "llama.attention.head_count".into(),
            problem: format!("is {n_heads}, which does not divide embedding_length {d_model}"),
        });
    }
    let head_dim = d_model / n_heads;
    if let Some(v) = g.get("llama.rope.dimension_count") {
        if v.as_u64() != Some(u64::from(head_dim)) {
            return Err(GgufError::Key {
                key: "llama.rope.dimension_count".into(),
                problem: format!("is {v:?}; only full-head rotary embeddings ({head_dim}) are supported"),
            });
        }
    }
    if g.get("llama.rope.scaling.type").and_then(|v| v.as_str()).is_some_and(|s| s != "none") {
        return Err(GgufError::Key {
            key: "llama.rope.scaling.type".into(),
            problem: "is set; RoPE scaling is not supported".into(),
        });
    }
    let vocab_size = match g.get("llama.vocab_size") {
        Some(_) => u32_key("llama.vocab_size")?,
        None => match g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(t) => u32::try_from(t.len()).unwrap_or(u32::MAX),
            None => return Err(GgufError::Key { key: "llama.vocab_size".into(), problem: "is missing".into() }),
        },
    };
    let rope_theta = match g.get("llama.rope.freq_base") {
        Some(_) => g.f64_key("llama.rope.freq_base")? as f32,
        None => 10_000.0,
    };
    let norm_eps = g.f64_key("llama.attention.layer_norm_rms_epsilon")? as f32;
    Ok(Architecture {
        family: "llama".into(),
        d_model,
        n_layers: u32_key("llama.block_count")?,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size,
        max_context: u32_key("llama.context_length")?,
        norm: NormKind::RmsNorm,
        norm_eps,
        activation: Activation::Silu,
        gated_ffn: true,
        positional: Positional::Rope,
        rope_theta,
        tied_embeddings: g.tensor("output.weight").is_none(),
    })
}

/// Rows of `w` (`[n_head * head_dim, cols]`) reordered from llama.cpp's interleaved rotary
/// layout back to Hugging Face's half-split layout.
/// `cols` is the length of a row in elements of `T` (bytes, for raw blocks).
pub fn unpermute_rope_rows<T: Copy + Default>(w: &[T], n_head: usize, head_dim: usize, cols: usize) -> Vec<T> {
    let half = head_dim / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let dst = (h * head_dim + i * half + j) * cols;
                let src = (h * head_dim + 2 * j + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = w[r * cols + c];
        }
    }
    out
}

/// The dtype a tensor stored as ggml type `ty` keeps under `import --dtype keep`: its own
/// where the format has it, `f16` for bfloat16, and for a k-quant the nearest block type at or
/// above its precision (`Q6_K` 6.6 bits per weight: `q8_0`; `Q4_K` 4.5: `q4_1`).
pub fn keep_dtype(ty: GgmlType) -> DType {
    match ty {
        GgmlType::F32 => DType::F32,
        GgmlType::F16 | GgmlType::Bf16 => DType::F16,
        GgmlType::Q8_0 | GgmlType::Q6K => DType::Q8_0,
        GgmlType::Q4_0 => DType::Q4_0,
        GgmlType::Q4_1 | GgmlType::Q4K => DType::Q4_1,
    }
}

/// The source dtype of each canonical tensor for `--dtype keep` ([`keep_dtype`]).
pub type SourceDTypes = HashMap<String, DType>;

/// Every tensor in canonical layout (f32), keyed by canonical name, the raw blocks of the
/// tensors that can keep them ([`RawBlocks`]), the FFN width read from the tensors (checked
/// against `llama.feed_forward_length` when present), and each tensor's source dtype
/// ([`SourceDTypes`]). `on_progress(done, total)` reports progress in bytes of GGUF tensor data.
pub fn tensors(
    g: &Gguf<'_>,
    a: &Architecture,
    mut on_progress: impl FnMut(u64, u64),
) -> Result<(HashMap<String, Weight>, RawBlocks, u32, SourceDTypes), GgufError> {
    let d = a.d_model as u64;
    let q_dim = u64::from(a.n_heads) * u64::from(a.head_dim);
    let kv_dim = u64::from(a.n_kv_heads) * u64::from(a.head_dim);
    let vocab = u64::from(a.vocab_size);
    let ffn =
        g.tensor("blk.0.ffn_up.weight").ok_or_else(|| GgufError::MissingTensor("blk.0.ffn_up.weight".into()))?.shape()
            [0];
    if let Some(v) = g.get("llama.feed_forward_length") {
        if v.as_u64() != Some(ffn) {
            return Err(GgufError::Key {
                key: "llama.feed_forward_length".into(),
                problem: format!("is {v:?} but blk.0.ffn_up.weight has {ffn} rows"),
            });
        }
    }
    let ffn32 = u32::try_from(ffn).map_err(|_| GgufError::Malformed(format!("FFN width {ffn} too large")))?;

    // (gguf name, canonical name, expected row-major shape, transform)
    #[derive(Clone, Copy)]
    enum Fix {
        None,
        RopeQ,
        RopeK,
        Transpose,
    }
    let mut plan: Vec<(String, String, Vec<u64>, Fix)> = Vec::new();
    plan.push(("token_embd.weight".into(), names::TOK_EMBEDDINGS.into(), vec![vocab, d], Fix::None));
    for i in 0..a.n_layers as usize {
        let b = |s: &str| format!("blk.{i}.{s}.weight");
        let l = |s: &str| names::layer(i, s);
        plan.push((b("attn_norm"), l(names::ATTN_NORM), vec![d], Fix::None));
        plan.push((b("attn_q"), l(names::WQ), vec![q_dim, d], Fix::RopeQ));
        plan.push((b("attn_k"), l(names::WK), vec![kv_dim, d], Fix::RopeK));
        plan.push((b("attn_v"), l(names::WV), vec![kv_dim, d], Fix::None));
        plan.push((b("attn_output"), l(names::WO), vec![d, q_dim], Fix::None));
        plan.push((b("ffn_norm"), l(names::FFN_NORM), vec![d], Fix::None));
        plan.push((b("ffn_gate"), l(names::FFN_GATE), vec![ffn, d], Fix::None));
        plan.push((b("ffn_up"), l(names::FFN_UP), vec![ffn, d], Fix::None));
        plan.push((b("ffn_down"), l(names::FFN_DOWN_T), vec![d, ffn], Fix::Transpose));
    }
    plan.push(("output_norm.weight".into(), names::NORM.into(), vec![d], Fix::None));
    if !a.tied_embeddings {
        plan.push(("output.weight".into(), names::LM_HEAD.into(), vec![vocab, d], Fix::None));
    }
    let known: std::collections::HashSet<&str> = plan.iter().map(|p| p.0.as_str()).collect();
    // Rotary frequency tables some converters add are derived data, not weights.
    if let Some(extra) = g.tensors.iter().find(|t| !known.contains(t.name.as_str()) && t.name != "rope_freqs.weight") {
        return Err(GgufError::Malformed(format!(
            "tensor `{}` is not part of the Llama architecture this importer supports",
            extra.name
        )));
    }

    let total: u64 = plan.iter().filter_map(|p| g.tensor(&p.0)).map(|t| t.byte_len).sum();
    let mut done = 0u64;
    let mut out = HashMap::with_capacity(plan.len());
    let mut raw = RawBlocks::new();
    let mut source = SourceDTypes::new();
    for (src, dst, shape, fix) in plan {
        let t: &TensorInfo = g.tensor(&src).ok_or_else(|| GgufError::MissingTensor(src.clone()))?;
        if t.shape() != shape {
            return Err(GgufError::Malformed(format!("tensor `{src}` has shape {:?}, expected {shape:?}", t.shape())));
        }
        let data = g.dequantize(t)?;
        if let Ok((ty, _)) = g.tensor_bytes(t) {
            source.insert(dst.clone(), keep_dtype(ty));
        }
        let (rows, cols) = (shape[0] as usize, shape.get(1).copied().unwrap_or(1) as usize);
        if let (Some(dtype), true) = (g.tensor_bytes(t).ok().and_then(|(ty, _)| block_dtype(ty)), shape.len() == 2) {
            let (_, bytes) = g.tensor_bytes(t)?;
            let row_bytes = bytes.len() / rows.max(1);
            let kept = match fix {
                Fix::None => Some(bytes.to_vec()),
                Fix::RopeQ => Some(unpermute_rope_rows(bytes, a.n_heads as usize, a.head_dim as usize, row_bytes)),
                Fix::RopeK => Some(unpermute_rope_rows(bytes, a.n_kv_heads as usize, a.head_dim as usize, row_bytes)),
                Fix::Transpose => None,
            };
            if let Some(kept) = kept.filter(|k| k.len() == rows * row_bytes) {
                raw.insert(dst.clone(), (dtype, kept));
            }
        }
        let (data, shape) = match fix {
            Fix::None => (data, shape),
            Fix::RopeQ => (unpermute_rope_rows(&data, a.n_heads as usize, a.head_dim as usize, cols), shape),
            Fix::RopeK => (unpermute_rope_rows(&data, a.n_kv_heads as usize, a.head_dim as usize, cols), shape),
            Fix::Transpose => (transpose(&data, rows, cols), vec![shape[1], shape[0]]),
        };
        out.insert(dst, Weight { shape: shape.iter().map(|&s| s as usize).collect(), data });
        done += t.byte_len;
        on_progress(done, total);
    }
    Ok((out, raw, ffn32, source))
}
