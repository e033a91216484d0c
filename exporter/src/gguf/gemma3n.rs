//! Gemma 3n GGUF (`general.architecture = gemma3n`, as llama.cpp's `convert_hf_to_gguf.py`
//! writes it) -> the `.matf` Gemma 3n file the Hugging Face import writes (docs/format.md 6.1).
//!
//! What the converter (`conversion/gemma.py`, `Gemma3NModel`) does to a checkpoint, and how it
//! is undone here:
//! - `altup_projections.{0,1,2}` and `altup_unembed_projections.{0,1,2}` are stacked into one
//!   3-D tensor each (`altup_proj`, `altup_unembd_proj`, row-major `[n - 1, d, d]`): split
//!   back into `altup_proj.{j}` and `altup_unembed.{j}`.
//! - `embed_tokens_per_layer` is padded with zero rows up to `vocab_size` (for the image and
//!   audio token ids). transformers reads row 0 for every id at or above the table's own
//!   length (`vocab_size_per_layer_input`, not stored in the GGUF), so the trailing all-zero
//!   rows of a table with `vocab_size` rows are dropped and `per_layer_vocab` is the rows that
//!   remain. (A table whose real last rows were all zero would lose them too; trained weights
//!   do not have such rows.)
//! - `activation_sparsity_pattern` is stored as `Normal(0, 1).icdf(p)` per layer
//!   (`activation_sparsity_scale`, `-inf` for a dense layer): `p = Phi(z)` is recovered
//!   (exactly as an f32 for the values the converter writes).
//! - `layer_types` becomes `attention.sliding_window_pattern` (one bool per layer), the
//!   sliding RoPE base `rope.freq_base_swa`.
//! - Norm weights are stored as they are (`norm_shift` is 0 for Gemma 3n, unlike Gemma 3), and
//!   q/k rows are not permuted (Gemma rotates half-split pairs, as the runtime does).
//!
//! Rows are converted from the memory map as the writer asks for them. A `Q8_0`, `Q4_0` or
//! `Q4_1` tensor whose planned dtype is its own block type is copied block for block; the
//! down projection, stored transposed in the file, is always dequantised.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use matformer::format::{
    self, g3n_names, names, required_tensor_specs, Activation, Architecture, DType, FormatError, Gemma3nConfig,
    Metadata, NestingOrigin, NormKind, Positional, Provenance, Tokenizer, GEMMA3N_FAMILY,
};
use matformer::tokenizer::TokenizerAssets;
use sha2::{Digest, Sha256};

use super::dequant;
use super::llama::{block_dtype, keep_dtype};
use super::reader::{GgmlType, Gguf, GgufError, Value};
use crate::import::{write_specs, write_verified, ImportOptions, ImportReport, ReportSource, Written};

/// The GGUF architecture name of Gemma 3n.
pub const ARCH: &str = "gemma3n";

/// Whether the file at `path` is a GGUF whose `general.architecture` is `gemma3n`. Only the
/// start of the file is read: the metadata pairs before the first array (llama.cpp writes
/// `general.architecture` first). `false` when it cannot be told; the Llama path then reports
/// what the file is.
pub fn file_is_gemma3n(path: &Path) -> bool {
    use std::io::Read;
    let mut head = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(1 << 16).read_to_end(&mut head));
    read.is_ok() && peek_architecture(&head).as_deref() == Some(ARCH)
}

/// `general.architecture` from the first metadata pairs of a GGUF header (v2/v3), if it comes
/// before any array.
fn peek_architecture(b: &[u8]) -> Option<String> {
    let u32_at = |at: usize| Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
    if b.get(..4)? != b"GGUF" || !(2..=3).contains(&u32_at(4)?) {
        return None;
    }
    let n_kv = u64_at(16)?;
    let mut at = 24usize;
    let string = |at: &mut usize| -> Option<&[u8]> {
        let len = usize::try_from(u64_at(*at)?).ok()?;
        let s = b.get(*at + 8..(*at + 8).checked_add(len)?)?;
        *at += 8 + len;
        Some(s)
    };
    for _ in 0..n_kv.min(64) {
        let key = string(&mut at)?;
        let ty = u32_at(at)?;
        at += 4;
        let size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                let v = string(&mut at)?;
                if key == b"general.architecture" {
                    return String::from_utf8(v.to_vec()).ok();
                }
                continue;
            }
            _ => return None,
        };
        at += size;
    }
    None
}

fn key_err(key: &str, problem: impl Into<String>) -> GgufError {
    GgufError::Key { key: key.into(), problem: problem.into() }
}

fn k(name: &str) -> String {
    format!("{ARCH}.{name}")
}

fn u32_key(g: &Gguf<'_>, name: &str) -> Result<u32, GgufError> {
    let key = k(name);
    let v = g.u64_key(&key)?;
    u32::try_from(v).map_err(|_| key_err(&key, format!("is {v}, too large")))
}

fn f32_key_or(g: &Gguf<'_>, name: &str, default: Option<f32>) -> Result<Option<f32>, GgufError> {
    let key = k(name);
    match g.get(&key) {
        None => Ok(default),
        Some(_) => {
            let v = g.f64_key(&key)?;
            if !v.is_finite() {
                return Err(key_err(&key, format!("is {v}, expected a finite number")));
            }
            Ok(Some(v as f32))
        }
    }
}

/// One entry per layer: an array of `n` values, or one value for every layer.
fn per_layer<'v>(g: &'v Gguf<'_>, name: &str, n: usize) -> Result<Option<Vec<&'v Value>>, GgufError> {
    let key = k(name);
    match g.get(&key) {
        None => Ok(None),
        Some(v) => match v.as_array() {
            Some(a) if a.len() == n => Ok(Some(a.iter().collect())),
            Some(a) => Err(key_err(&key, format!("lists {} values, block_count is {n}", a.len()))),
            None => Ok(Some(vec![v; n])),
        },
    }
}

/// `Phi(z)`, the standard normal distribution function, in f64: `(1 + erf(z / sqrt 2)) / 2`
/// with erf from its everywhere-convergent series of positive terms
/// `erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (1 * 3 * ... * (2n + 1))`
/// (no cancellation; about 1e-15 relative for |x| <= 6, and 1 beyond).
fn normal_cdf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    if x.abs() > 6.0 {
        return if x > 0.0 { 1.0 } else { 0.0 };
    }
    let ax = x.abs();
    let mut term = ax;
    let mut sum = ax;
    let mut n = 0.0f64;
    while term > sum * 1e-17 {
        n += 1.0;
        term *= 2.0 * ax * ax / (2.0 * n + 1.0);
        sum += term;
    }
    let erf = (2.0 / std::f64::consts::PI.sqrt()) * (-ax * ax).exp() * sum;
    let erf = if x < 0.0 { -erf } else { erf };
    0.5 * (1.0 + erf)
}

/// The target sparsity of one layer from its stored `icdf(p)` (`-inf`: dense).
fn sparsity_of(z: f64, layer: usize) -> Result<f32, GgufError> {
    let key = k("activation_sparsity_scale");
    if z == f64::NEG_INFINITY {
        return Ok(0.0);
    }
    if !z.is_finite() {
        return Err(key_err(&key, format!("holds {z} for layer {layer}, expected a finite number or -inf")));
    }
    let p = normal_cdf(z) as f32;
    if !(0.0..1.0).contains(&p) {
        return Err(key_err(
            &key,
            format!("holds {z} for layer {layer}: a sparsity of {p}, expected at least 0 and below 1"),
        ));
    }
    Ok(p)
}

/// A Gemma 3n GGUF's architecture, Gemma 3n fields and per-layer FFN widths.
struct Parsed {
    architecture: Architecture,
    gemma3n: Gemma3nConfig,
    ffn_widths: Vec<u32>,
    /// Trailing all-zero rows dropped from `per_layer_token_embd`.
    padding_rows_dropped: u64,
}

fn tensor_shape(g: &Gguf<'_>, name: &str) -> Result<Vec<u64>, GgufError> {
    Ok(g.tensor(name).ok_or_else(|| GgufError::MissingTensor(name.into()))?.shape())
}

/// Rows of a 2-D tensor that hold nothing but zeros, counted from the end.
fn trailing_zero_rows(g: &Gguf<'_>, name: &str) -> Result<u64, GgufError> {
    let t = g.tensor(name).ok_or_else(|| GgufError::MissingTensor(name.into()))?;
    let (ty, bytes) = g.tensor_bytes(t)?;
    let shape = t.shape();
    let (rows, cols) = (shape[0] as usize, shape.get(1).copied().unwrap_or(1) as usize);
    let rb = row_bytes(ty, cols).ok_or_else(|| GgufError::Malformed(format!("tensor `{name}`: rows of {cols}")))?;
    let mut row = vec![0f32; cols];
    let mut zero = 0u64;
    for r in (1..rows).rev() {
        let piece = bytes.get(r * rb..(r + 1) * rb).ok_or_else(|| GgufError::Malformed(format!("`{name}` short")))?;
        dequant::dequantize(ty, piece, &mut row).map_err(|e| GgufError::Malformed(format!("`{name}`: {e}")))?;
        if row.iter().any(|&v| v != 0.0) {
            break;
        }
        zero += 1;
    }
    Ok(zero)
}

fn parse(g: &Gguf<'_>) -> Result<Parsed, GgufError> {
    let d_model = u32_key(g, "embedding_length")?;
    let n_layers = u32_key(g, "block_count")?;
    if n_layers == 0 || n_layers > format::MAX_LAYERS {
        return Err(key_err(&k("block_count"), format!("is {n_layers}, expected 1..={}", format::MAX_LAYERS)));
    }
    let n = n_layers as usize;
    let n_heads = u32_key(g, "attention.head_count")?;
    let n_kv_heads = u32_key(g, "attention.head_count_kv")?;
    let head_dim = u32_key(g, "attention.key_length")?;
    if let Some(v) = g.get(&k("attention.value_length")) {
        if v.as_u64() != Some(u64::from(head_dim)) {
            return Err(key_err(&k("attention.value_length"), format!("is {v:?}, key_length is {head_dim}")));
        }
    }
    if g.get(&k("rope.scaling.type")).and_then(Value::as_str).is_some_and(|s| s != "none") {
        return Err(key_err(&k("rope.scaling.type"), "is set; RoPE scaling is not supported"));
    }
    if g.get(&k("attention.logit_softcapping")).is_some() {
        return Err(key_err(&k("attention.logit_softcapping"), "is set; Gemma 3n has no attention soft-cap"));
    }
    let active = g.get(&k("altup.active_idx")).and_then(Value::as_u64).unwrap_or(0);
    if active != 0 {
        return Err(key_err(
            &k("altup.active_idx"),
            format!("is {active}; the runtime's AltUp computes stream 0 only"),
        ));
    }
    let altup_inputs = u32_key(g, "altup.num_inputs")?;
    if !(2..=16).contains(&altup_inputs) {
        return Err(key_err(&k("altup.num_inputs"), format!("is {altup_inputs}, expected 2..=16")));
    }
    let kv_shared_layers = u32_key(g, "attention.shared_kv_layers")?;
    if kv_shared_layers >= n_layers {
        return Err(key_err(
            &k("attention.shared_kv_layers"),
            format!("is {kv_shared_layers}, but block_count is {n_layers}: at least the first layer must own its K/V"),
        ));
    }
    let sliding = match per_layer(g, "attention.sliding_window_pattern", n)? {
        None => (0..n).map(|i| (i + 1) % 5 != 0).collect(),
        Some(vals) => vals
            .iter()
            .map(|v| v.as_bool().ok_or_else(|| key_err(&k("attention.sliding_window_pattern"), "holds a non-bool")))
            .collect::<Result<Vec<bool>, _>>()?,
    };
    let activation_sparsity = match per_layer(g, "activation_sparsity_scale", n)? {
        None => return Err(key_err(&k("activation_sparsity_scale"), "is missing")),
        Some(vals) => vals
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let z = v.as_f64().ok_or_else(|| key_err(&k("activation_sparsity_scale"), "holds a non-number"))?;
                sparsity_of(z, i)
            })
            .collect::<Result<Vec<f32>, _>>()?,
    };

    // Shapes read from the tensors.
    let vocab = tensor_shape(g, "token_embd.weight")?;
    let vocab_size = u32::try_from(vocab[0]).map_err(|_| GgufError::Malformed("vocabulary too large".into()))?;
    let laurel = tensor_shape(g, "blk.0.laurel_l.weight")?;
    let laurel_rank = u32::try_from(laurel[0]).map_err(|_| GgufError::Malformed("LAuReL rank too large".into()))?;
    let per_layer_dim = u32_key(g, "embedding_length_per_layer_input")?;
    let ple = tensor_shape(g, "per_layer_token_embd.weight")?;
    let padding_rows_dropped = if ple.first() == Some(&u64::from(vocab_size)) {
        trailing_zero_rows(g, "per_layer_token_embd.weight")?
    } else {
        0
    };
    let per_layer_vocab = u32::try_from(ple[0] - padding_rows_dropped)
        .map_err(|_| GgufError::Malformed("per-layer vocabulary too large".into()))?;

    let mut ffn_widths = Vec::with_capacity(n);
    let stated = per_layer(g, "feed_forward_length", n)?;
    for i in 0..n {
        let up = format!("blk.{i}.ffn_up.weight");
        let rows = tensor_shape(g, &up)?[0];
        if let Some(s) = &stated {
            if s[i].as_u64() != Some(rows) {
                return Err(key_err(
                    &k("feed_forward_length"),
                    format!("is {:?} for layer {i} but {up} has {rows} rows", s[i]),
                ));
            }
        }
        ffn_widths.push(u32::try_from(rows).map_err(|_| GgufError::Malformed(format!("FFN width {rows}")))?);
    }

    let rope_theta = f32_key_or(g, "rope.freq_base", Some(1_000_000.0))?.unwrap_or(1_000_000.0);
    let rope_local_theta = f32_key_or(g, "rope.freq_base_swa", Some(10_000.0))?.unwrap_or(10_000.0);
    let architecture = Architecture {
        family: GEMMA3N_FAMILY.to_string(),
        d_model,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size,
        max_context: u32_key(g, "context_length")?,
        norm: NormKind::RmsNorm,
        norm_eps: g.f64_key(&k("attention.layer_norm_rms_epsilon"))? as f32,
        activation: Activation::GeluTanh,
        gated_ffn: true,
        positional: Positional::Rope,
        rope_theta,
        tied_embeddings: g.tensor("output.weight").is_none(),
    };
    let gemma3n = Gemma3nConfig {
        per_layer_dim,
        per_layer_vocab,
        altup_inputs,
        // Not stored: llama.cpp always applies `altup_correct_scale`, transformers' default.
        altup_correct_scale: true,
        laurel_rank,
        sliding_window: u32_key(g, "attention.sliding_window")?,
        sliding,
        rope_local_theta,
        kv_shared_layers,
        activation_sparsity,
        final_logit_softcap: f32_key_or(g, "final_logit_softcapping", None)?,
    };
    Ok(Parsed { architecture, gemma3n, ffn_widths, padding_rows_dropped })
}

/// Bytes of a row of `cols` elements of `ty`, if whole blocks.
fn row_bytes(ty: GgmlType, cols: usize) -> Option<usize> {
    let be = ty.block_elems() as usize;
    cols.is_multiple_of(be).then(|| cols / be * ty.block_bytes() as usize)
}

/// The GGUF tensor of a canonical Gemma 3n tensor, the index of its slice along the outermost
/// axis of a stacked 3-D tensor, and whether it is stored transposed (the down projection).
fn gguf_name(canonical: &str) -> Option<(String, Option<usize>, bool)> {
    use g3n_names as g3;
    let w = |s: &str| Some((format!("{s}.weight"), None, false));
    match canonical {
        names::TOK_EMBEDDINGS => return w("token_embd"),
        g3::PER_LAYER_EMBEDDINGS => return w("per_layer_token_embd"),
        g3::PER_LAYER_MODEL_PROJECTION => return w("per_layer_model_proj"),
        g3::PER_LAYER_PROJECTION_NORM => return w("per_layer_proj_norm"),
        names::NORM => return w("output_norm"),
        names::LM_HEAD => return w("output"),
        _ => {}
    }
    if let Some(j) = canonical.strip_prefix("altup_proj.") {
        return Some(("altup_proj.weight".into(), Some(j.parse().ok()?), false));
    }
    if let Some(j) = canonical.strip_prefix("altup_unembed.") {
        return Some(("altup_unembd_proj.weight".into(), Some(j.parse().ok()?), false));
    }
    let rest = canonical.strip_prefix("layers.")?;
    let (i, suffix) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let name = match suffix {
        names::ATTN_NORM => "attn_norm",
        g3::POST_ATTN_NORM => "post_attention_norm",
        names::FFN_NORM => "ffn_norm",
        g3::POST_FFN_NORM => "post_ffw_norm",
        names::WQ => "attn_q",
        names::WK => "attn_k",
        names::WV => "attn_v",
        names::WO => "attn_output",
        g3::Q_NORM => "attn_q_norm",
        g3::K_NORM => "attn_k_norm",
        names::FFN_GATE => "ffn_gate",
        names::FFN_UP => "ffn_up",
        names::FFN_DOWN_T => return Some((format!("blk.{i}.ffn_down.weight"), None, true)),
        g3::ALTUP_CORRECT_SCALE => "altup_correct_scale",
        g3::ALTUP_CORRECTION => "altup_correct_coef",
        g3::ALTUP_PREDICTION => "altup_predict_coef",
        g3::ALTUP_ROUTER => "altup_router",
        g3::ALTUP_ROUTER_NORM => "altup_router_norm",
        g3::LAUREL_LEFT => "laurel_l",
        g3::LAUREL_RIGHT => "laurel_r",
        g3::LAUREL_NORM => "laurel_post_norm",
        g3::PLE_GATE => "inp_gate",
        g3::PLE_PROJ => "proj",
        g3::PLE_NORM => "post_norm",
        _ => return None,
    };
    Some((format!("blk.{i}.{name}.weight"), None, false))
}

/// Where a canonical tensor's rows come from.
struct Source<'a> {
    ty: GgmlType,
    /// The whole GGUF tensor's data.
    bytes: &'a [u8],
    /// Elements in a source row.
    cols: usize,
    /// Bytes in a source row.
    row_bytes: usize,
    /// First source row of canonical row 0 (a slice of a stacked tensor).
    row_offset: usize,
    /// Source rows, for a transposed tensor (canonical row `r` is source column `r`).
    transposed: Option<usize>,
}

impl Source<'_> {
    fn src_row(&self, r: usize, out: &mut [f32]) -> Result<(), FormatError> {
        let bad = |reason: String| FormatError::BadMetadata { reason };
        let piece = self
            .bytes
            .get(r * self.row_bytes..(r + 1) * self.row_bytes)
            .ok_or_else(|| bad(format!("row {r} beyond the source tensor")))?;
        dequant::dequantize(self.ty, piece, out).map_err(|e| bad(e.to_string()))
    }

    /// Appends canonical rows `rows`, in `dtype`, to `out`.
    fn fill(&self, rows: std::ops::Range<u64>, dtype: DType, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let bad = |reason: String| FormatError::BadMetadata { reason };
        let (start, end) = (
            usize::try_from(rows.start).map_err(|_| bad("row out of range".into()))?,
            usize::try_from(rows.end).map_err(|_| bad("row out of range".into()))?,
        );
        if let Some(src_rows) = self.transposed {
            // Source [d_model, ffn]: dequantise each source row once per chunk and gather.
            if end > self.cols {
                return Err(bad(format!("row {end} beyond the source's {} columns", self.cols)));
            }
            let width = end - start;
            let mut gathered = vec![0f32; width * src_rows];
            let mut row = vec![0f32; self.cols];
            for i in 0..src_rows {
                self.src_row(i, &mut row)?;
                for (c, &v) in row[start..end].iter().enumerate() {
                    gathered[c * src_rows + i] = v;
                }
            }
            for r in gathered.chunks_exact(src_rows.max(1)) {
                matformer::quant::encode_row(dtype, r, out)?;
            }
            return Ok(());
        }
        let same_blocks = block_dtype(self.ty) == Some(dtype) || (self.ty == GgmlType::F32 && dtype == DType::F32);
        if same_blocks {
            let piece = self
                .bytes
                .get((self.row_offset + start) * self.row_bytes..(self.row_offset + end) * self.row_bytes)
                .ok_or_else(|| bad(format!("rows {start}..{end} beyond the source tensor")))?;
            out.extend_from_slice(piece);
            return Ok(());
        }
        let mut row = vec![0f32; self.cols];
        for r in start..end {
            self.src_row(self.row_offset + r, &mut row)?;
            matformer::quant::encode_row(dtype, &row, out)?;
        }
        Ok(())
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Imports a Gemma 3n GGUF file (`opts.input`).
pub fn import_gguf(opts: &ImportOptions, started: Instant) -> Result<(ImportReport, TokenizerAssets)> {
    let path = &opts.input;
    if opts.nest.is_some() {
        bail!(
            "--nest does not apply to Gemma 3n: the checkpoint is already nested (E2B's FFN is the first half of \
             E4B's, trained so); the import writes its levels `half` and `full` itself. Run it without --nest"
        );
    }
    // Read into memory (no `unsafe` map here): the file's size in RAM while it is converted.
    let map = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let at = |e: GgufError| anyhow!("{}: {e}", path.display());
    let g = Gguf::parse(&map).map_err(at)?;
    let parsed = parse(&g).map_err(at)?;
    let mut tokenizer = super::tokenizer::from_gguf(&g).map_err(at)?;
    if tokenizer.vocab_len > parsed.architecture.vocab_size as usize {
        bail!(
            "{}: the tokenizer has {} tokens but token_embd.weight has {} rows",
            path.display(),
            tokenizer.vocab_len,
            parsed.architecture.vocab_size
        );
    }
    // Gemma's chat turns end with <end_of_turn>, as in the Hugging Face import.
    let has_eot = g
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .is_some_and(|t| t.iter().any(|v| v.as_str() == Some("<end_of_turn>")));
    let special = &mut tokenizer.assets.special;
    if has_eot
        && special.eos.as_deref() != Some("<end_of_turn>")
        && !special.end_of_turn.iter().any(|t| t == "<end_of_turn>")
    {
        special.end_of_turn.push("<end_of_turn>".to_string());
    }

    let ffn_widths = &parsed.ffn_widths;
    let (levels, level_names) = if ffn_widths.iter().all(|w| w % 2 == 0) {
        (ffn_widths.iter().map(|&w| vec![w / 2, w]).collect(), vec!["half".to_string(), "full".to_string()])
    } else {
        (ffn_widths.iter().map(|&w| vec![w]).collect(), vec!["full".to_string()])
    };
    let mut meta = Metadata {
        architecture: parsed.architecture.clone(),
        ffn_widths: levels,
        level_names,
        tokenizer: Tokenizer { kind: "bytes".to_string(), bos_id: None, eos_id: None },
        provenance: Provenance {
            source_sha256: sha256_hex(&map),
            source_name: path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            exporter: format!("matformer-export {} (import)", env!("CARGO_PKG_VERSION")),
        },
        extra: Default::default(),
    };
    parsed.gemma3n.store(&mut meta);
    if meta.n_levels() > 1 {
        meta.set_nesting(NestingOrigin::Trained);
    }
    let assets = tokenizer.assets;
    assets.apply_to(&mut meta).map_err(|e| anyhow!("the model's tokenizer cannot be stored: {e}"))?;
    meta.validate().map_err(|e| anyhow!("{}: the imported model is not valid: {e}", path.display()))?;

    // Every tensor, found with its exact shape.
    let mut sources: HashMap<String, Source<'_>> = HashMap::new();
    let mut used: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut source_dtypes = HashMap::new();
    for spec in required_tensor_specs(&meta, DType::F32) {
        let (gname, slice, transposed) =
            gguf_name(&spec.name).ok_or_else(|| anyhow!("no GGUF name for tensor {}", spec.name))?;
        let t = g.tensor(&gname).ok_or_else(|| {
            anyhow!("{}: no tensor `{gname}` (needed for {}, shape {:?})", path.display(), spec.name, spec.shape)
        })?;
        let shape = t.shape();
        let want: Vec<u64> = match (slice, transposed) {
            (_, true) => spec.shape.iter().rev().copied().collect(),
            (Some(_), _) => {
                let mut s = vec![u64::from(parsed.gemma3n.altup_inputs - 1)];
                s.extend(&spec.shape);
                s
            }
            _ if spec.name == g3n_names::PER_LAYER_EMBEDDINGS => {
                vec![spec.shape[0] + parsed.padding_rows_dropped, spec.shape[1]]
            }
            _ => spec.shape.clone(),
        };
        if shape != want {
            bail!("{}: tensor `{gname}` ({}) has shape {shape:?}, expected {want:?}", path.display(), spec.name);
        }
        let (ty, bytes) = g.tensor_bytes(t).map_err(at)?;
        // A row of a 1-D tensor is one element (as the writer counts rows).
        let cols = if shape.len() >= 2 { *shape.last().unwrap_or(&1) as usize } else { 1 };
        let rb = row_bytes(ty, cols).ok_or_else(|| {
            anyhow!("{}: tensor `{gname}` has rows of {cols}, not whole {ty:?} blocks", path.display())
        })?;
        let rows_per_slice = spec.shape.first().copied().unwrap_or(1) as usize;
        source_dtypes.insert(spec.name.clone(), keep_dtype(ty));
        used.insert(gname);
        sources.insert(
            spec.name.clone(),
            Source {
                ty,
                bytes,
                cols,
                row_bytes: rb,
                row_offset: slice.unwrap_or(0) * rows_per_slice,
                transposed: transposed.then(|| shape[0] as usize),
            },
        );
    }

    let mut source_types = BTreeMap::new();
    for t in &g.tensors {
        *source_types.entry(GgmlType::code_name(t.type_code).to_string()).or_insert(0) += 1;
    }
    let mut notes = Vec::new();
    if parsed.padding_rows_dropped > 0 {
        notes.push(format!(
            "per_layer_token_embd: dropped its last {} rows, all zero (the converter's padding to the vocabulary; ids \
             from {} on read row 0, as in transformers)",
            parsed.padding_rows_dropped, parsed.gemma3n.per_layer_vocab
        ));
    }
    let mut other: Vec<&str> =
        g.tensors.iter().map(|t| t.name.as_str()).filter(|n| !used.contains(*n) && *n != "rope_freqs.weight").collect();
    if !other.is_empty() {
        other.sort_unstable();
        let shown: Vec<&str> = other.iter().take(5).copied().collect();
        notes.push(format!(
            "ignored {} tensors not used by the text model: {}{}",
            other.len(),
            shown.join(", "),
            if other.len() > 5 { ", ..." } else { "" }
        ));
    }
    for n in &notes {
        eprintln!("note: {n}");
    }

    let plan = opts.dtype.for_source(&source_dtypes);
    let specs = plan.specs(&meta)?;
    let mut kept: Vec<String> = specs
        .iter()
        .filter(|s| {
            sources.get(&s.name).is_some_and(|src| src.transposed.is_none() && block_dtype(src.ty) == Some(s.dtype))
        })
        .map(|s| s.name.clone())
        .collect();
    kept.sort();
    let source = ReportSource { source_format: "gguf".into(), source_types, notes };
    write_verified(opts, started, meta, assets, source, |tmp, meta, assets| {
        let bytes = write_specs(tmp, meta, &specs, assets, |spec, rows, out| {
            let src = sources.get(&spec.name).ok_or_else(|| FormatError::MissingTensor { name: spec.name.clone() })?;
            src.fill(rows, spec.dtype, out)
        })?;
        Ok(Written { bytes, kept_source_blocks: kept, nest: None })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_inverts_torch_icdf() {
        // torch.distributions.Normal(0, 1).icdf(tensor(0.95)) in float32, as the converter stores it.
        assert_eq!(normal_cdf(1.644_853_591_918_945_3) as f32, 0.95f32);
        assert_eq!(sparsity_of(f64::NEG_INFINITY, 0).unwrap(), 0.0);
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-15);
        assert!((normal_cdf(-1.959_963_984_540_054) - 0.025).abs() < 1e-13);
        assert!((normal_cdf(3.090_232_306_167_813_5) - 0.999).abs() < 1e-13);
        assert!(sparsity_of(f64::NAN, 3).is_err());
        assert!(sparsity_of(40.0, 3).is_err());
    }

    #[test]
    fn architecture_is_peeked_from_the_header() {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        for (k, v) in [("general.type", "model"), ("general.architecture", "gemma3n")] {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
            b.extend(8u32.to_le_bytes());
            b.extend((v.len() as u64).to_le_bytes());
            b.extend(v.as_bytes());
        }
        assert_eq!(peek_architecture(&b).as_deref(), Some("gemma3n"));
        assert_eq!(peek_architecture(&b[..b.len() - 1]), None);
        assert_eq!(peek_architecture(b"GGUF"), None);
    }

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(gguf_name("per_layer_embeddings"), Some(("per_layer_token_embd.weight".into(), None, false)));
        assert_eq!(gguf_name("altup_unembed.2"), Some(("altup_unembd_proj.weight".into(), Some(2), false)));
        assert_eq!(gguf_name("layers.3.ffn_down_t"), Some(("blk.3.ffn_down.weight".into(), None, true)));
        assert_eq!(gguf_name("layers.7.ple.norm"), Some(("blk.7.post_norm.weight".into(), None, false)));
        assert_eq!(gguf_name("layers.1.bogus"), None);
    }
}
