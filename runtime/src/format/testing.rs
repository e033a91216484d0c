//! Small helpers for tests, tools and the `synth` command: synthetic metadata, the canonical
//! tensor list, deterministic pseudo-random weights, and re-sealing a patched header.

use std::io::Write;

use super::error::FormatError;
use super::layout::{BlobSpec, DType, DEFAULT_ALIGNMENT_LOG2, HEADER_CRC_OFFSET, PREAMBLE_LEN};
use super::meta::{Activation, Architecture, Metadata, NormKind, Positional, Provenance, Tokenizer};
use super::parser::header_crc;
use super::writer::write_file_with_blobs;

pub use super::layout::{required_tensor_specs, TensorSpec};

/// Metadata for a synthetic model. `widths_per_layer[i]` lists layer `i`'s FFN widths, one per
/// level; a single list is repeated for every layer. Levels are named `s, m, l, xl` (first
/// `n`), or `w0, w1, ...` beyond four. RMSNorm (eps 1e-5), RoPE (theta 10000), SiLU,
/// `max_context` 512, byte tokenizer (BOS 256 and EOS 257 when the vocabulary has room).
/// The result is not validated: call [`Metadata::validate`] if the inputs are untrusted.
#[allow(clippy::too_many_arguments)]
pub fn synthetic_metadata(
    d_model: u32,
    n_layers: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    vocab: u32,
    widths_per_layer: Vec<Vec<u32>>,
    gated: bool,
    tied: bool,
) -> Metadata {
    let ffn_widths = if widths_per_layer.len() == 1 {
        vec![widths_per_layer[0].clone(); n_layers as usize]
    } else {
        widths_per_layer
    };
    let n_levels = ffn_widths.first().map_or(0, Vec::len);
    let level_names = if n_levels <= 4 {
        ["s", "m", "l", "xl"][..n_levels].iter().map(|s| s.to_string()).collect()
    } else {
        (0..n_levels).map(|j| format!("w{j}")).collect()
    };
    Metadata {
        architecture: Architecture {
            family: "synthetic".to_string(),
            d_model,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size: vocab,
            max_context: 512,
            norm: NormKind::RmsNorm,
            norm_eps: 1e-5,
            activation: Activation::Silu,
            gated_ffn: gated,
            positional: Positional::Rope,
            rope_theta: 10000.0,
            tied_embeddings: tied,
        },
        ffn_widths,
        level_names,
        tokenizer: Tokenizer {
            kind: "bytes".to_string(),
            bos_id: (vocab > 257).then_some(256),
            eos_id: (vocab > 257).then_some(257),
        },
        provenance: Provenance {
            source_sha256: "synthetic".to_string(),
            source_name: "synthetic".to_string(),
            exporter: format!("matformer {}", env!("CARGO_PKG_VERSION")),
        },
        extra: Default::default(),
    }
}

/// Metadata for a small synthetic Gemma 3n model (family `gemma3n`, key `gemma3n`): d_model
/// 64, 10 layers, 4 heads, 2 K/V heads, head_dim 16, FFN widths `[64, 128]` (levels `s`,
/// `m`), vocabulary 300, tied embeddings, GELU (tanh) gated FFN; per-layer embeddings of 16
/// values per layer over 256 rows, 4 AltUp streams, LAuReL rank 8, sliding window 4, layers 4
/// and 9 full attention (the others sliding), the last 4 layers sharing K/V (layers 6..10 read
/// layers 4 and 5's: 5 owns the sliding K/V, 4 the full), activation sparsity 0.95 on the
/// first 3 layers, logit soft-cap 30. Valid ([`Metadata::validate`]); write it with
/// [`synthetic_file`].
pub fn synthetic_gemma3n_metadata() -> Metadata {
    let n = 10usize;
    let mut meta = synthetic_metadata(64, n as u32, 4, 2, 16, 300, vec![vec![64, 128]], true, true);
    meta.architecture.activation = Activation::GeluTanh;
    meta.architecture.rope_theta = 1_000_000.0;
    let g = super::gemma3n::Gemma3nConfig {
        per_layer_dim: 16,
        per_layer_vocab: 256,
        altup_inputs: 4,
        altup_correct_scale: true,
        laurel_rank: 8,
        sliding_window: 4,
        sliding: (0..n).map(|i| i != 4 && i != 9).collect(),
        rope_local_theta: 10_000.0,
        kv_shared_layers: 4,
        activation_sparsity: (0..n).map(|i| if i < 3 { 0.95 } else { 0.0 }).collect(),
        final_logit_softcap: Some(30.0),
    };
    g.store(&mut meta);
    meta
}

/// Metadata with Gemma 3n E4B's shape (no weights: too large for a test file): 35 layers
/// (every fifth full attention, the last 15 sharing K/V), d_model 2048, 8 heads, 2 K/V heads,
/// head_dim 256, FFN widths `[8192, 16384]` (levels `s`, `m`), vocabulary 262144, tied
/// embeddings, per-layer embeddings of 256 values per layer, 4 AltUp streams, LAuReL rank 64,
/// sliding window 512. Valid ([`Metadata::validate`]); for catalog and slice tests.
pub fn gemma3n_e4b_metadata() -> Metadata {
    let n = 35usize;
    let mut meta = synthetic_metadata(2048, n as u32, 8, 2, 256, 262_144, vec![vec![8192, 16384]], true, true);
    meta.architecture.activation = Activation::GeluTanh;
    meta.architecture.rope_theta = 1_000_000.0;
    meta.architecture.max_context = 32_768;
    let g = super::gemma3n::Gemma3nConfig {
        per_layer_dim: 256,
        per_layer_vocab: 262_144,
        altup_inputs: 4,
        altup_correct_scale: true,
        laurel_rank: 64,
        sliding_window: 512,
        sliding: (0..n).map(|i| (i + 1) % 5 != 0).collect(),
        rope_local_theta: 10_000.0,
        kv_shared_layers: 15,
        activation_sparsity: (0..n).map(|i| if i < 10 { 0.95 } else { 0.0 }).collect(),
        final_logit_softcap: Some(30.0),
    };
    g.store(&mut meta);
    meta
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

/// The deterministic value of element `index` (row-major) of tensor `spec` in
/// [`write_synthetic`]'s model: norm weights near 1, norm biases near 0, matrices uniform in
/// `±1/sqrt(fan_in)` (`fan_in` = row length, or the row count for `ffn_down_t`).
pub fn synthetic_value(seed: u64, spec: &TensorSpec, index: u64) -> f32 {
    let h = splitmix64(seed ^ name_hash(&spec.name) ^ splitmix64(index));
    let u = (h >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0; // [-1, 1)
    let row_elems: u64 = spec.shape.iter().skip(1).product();
    if spec.shape.len() == 1 {
        if spec.name.ends_with("bias") {
            0.05 * u
        } else {
            1.0 + 0.1 * u
        }
    } else {
        let fan_in = if spec.name.ends_with("ffn_down_t") { spec.shape[0] } else { row_elems };
        u / (fan_in.max(1) as f32).sqrt()
    }
}

/// Writes a complete model for `meta` with [`synthetic_value`] weights in `dtype`; returns the
/// file length. The same `(meta, dtype, seed)` always gives the same bytes. With a quantised
/// `dtype` (rows of a multiple of 32 elements), the 1-D tensors (norms) stay `f16`; use
/// [`synthetic_specs`] for the tensor list.
pub fn write_synthetic<W: Write>(out: W, meta: &Metadata, dtype: DType, seed: u64) -> Result<u64, FormatError> {
    write_synthetic_with_blobs(out, meta, dtype, seed, &[], DEFAULT_ALIGNMENT_LOG2)
}

/// [`write_synthetic`] with blobs (a stored tokenizer) and an explicit alignment.
pub fn write_synthetic_with_blobs<W: Write>(
    out: W,
    meta: &Metadata,
    dtype: DType,
    seed: u64,
    blobs: &[BlobSpec<'_>],
    alignment_log2: u32,
) -> Result<u64, FormatError> {
    let specs = synthetic_specs(meta, dtype);
    write_file_with_blobs(
        out,
        meta,
        &specs,
        blobs,
        alignment_log2,
        |ti, rows, buf| {
            let spec = &specs[ti];
            let row_elems: u64 = spec.shape.iter().skip(1).product();
            let mut row = Vec::with_capacity(row_elems as usize);
            for r in rows {
                row.clear();
                row.extend((r * row_elems..(r + 1) * row_elems).map(|idx| synthetic_value(seed, spec, idx)));
                crate::quant::encode_row(spec.dtype, &row, buf)?;
            }
            Ok(())
        },
        |_, _| {},
    )
}

/// The canonical tensor list in `dtype`, except that the 1-D tensors (norms, their biases),
/// which cannot be block-quantised, are `f16` when `dtype` is quantised.
pub fn synthetic_specs(meta: &Metadata, dtype: DType) -> Vec<TensorSpec> {
    let mut specs = required_tensor_specs(meta, dtype);
    for s in &mut specs {
        if dtype.is_quantized() && s.shape.len() == 1 {
            s.dtype = DType::F16;
        }
    }
    specs
}

/// [`write_synthetic`] into memory.
pub fn synthetic_file(meta: &Metadata, dtype: DType, seed: u64) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    write_synthetic(&mut out, meta, dtype, seed)?;
    Ok(out)
}

/// [`write_synthetic_with_blobs`] into memory.
pub fn synthetic_file_with_blobs(
    meta: &Metadata,
    dtype: DType,
    seed: u64,
    blobs: &[BlobSpec<'_>],
    alignment_log2: u32,
) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    write_synthetic_with_blobs(&mut out, meta, dtype, seed, blobs, alignment_log2)?;
    Ok(out)
}

/// Recomputes and stores `header_crc32` after the header bytes were patched (tests that craft
/// hostile files use it so that the check they target is reached). Uses the `header_len`
/// stored in the preamble; returns `false` (and changes nothing) if the bytes are too short
/// for it.
pub fn refresh_header_crc(bytes: &mut [u8]) -> bool {
    if bytes.len() < PREAMBLE_LEN {
        return false;
    }
    let mut hl = [0u8; 8];
    hl.copy_from_slice(&bytes[24..32]);
    let header_len = u64::from_le_bytes(hl);
    let Some(header) = usize::try_from(header_len).ok().filter(|&n| n >= PREAMBLE_LEN).and_then(|n| bytes.get(..n))
    else {
        return false;
    };
    let crc = header_crc(header);
    bytes[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    true
}
