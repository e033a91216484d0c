//! Constants, dtypes, tensor/segment descriptions and the rules shared by the reader and the
//! writer: which tensors an architecture needs, in which order and with which shapes.

use serde::{Deserialize, Serialize};

use super::error::FormatError;
use super::meta::{names, Metadata, NormKind};

/// The four bytes every `.matf` file starts with.
pub const MAGIC: [u8; 4] = *b"MATF";
/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// `log2` of the alignment the writer uses (16 KiB: a multiple of every common page size).
pub const DEFAULT_ALIGNMENT_LOG2: u32 = 14;
/// Length of the fixed preamble at the start of the header.
pub const PREAMBLE_LEN: usize = 64;

/// Smallest `alignment_log2` a reader accepts (4 KiB).
pub const MIN_ALIGNMENT_LOG2: u32 = 12;
/// Largest `alignment_log2` a reader accepts (16 MiB).
pub const MAX_ALIGNMENT_LOG2: u32 = 24;
/// Most nesting levels a file may have.
pub const MAX_LEVELS: usize = 16;
/// Most tensors a file may have.
pub const MAX_TENSORS: usize = 65536;
/// Longest tensor name, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// Most dimensions of a tensor.
pub const MAX_NDIM: usize = 4;
/// Largest element count of one tensor (2^40); anything larger is treated as corruption.
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 40;
/// Largest header (preamble + level table + metadata + tensor table), 256 MiB.
pub const MAX_HEADER_LEN: u64 = 256 << 20;
/// Largest value of any single architecture dimension (`d_model`, `vocab_size`, an FFN width...).
pub const MAX_DIM: u32 = 1 << 24;
/// Most transformer layers.
pub const MAX_LAYERS: u32 = 4096;

/// Bytes of one segment record in the tensor table.
pub(crate) const SEGMENT_RECORD_LEN: usize = 48;
/// Offset of `header_crc32` inside the preamble.
pub(crate) const HEADER_CRC_OFFSET: usize = 48;

/// Elements per block of the block-quantised dtypes ([`DType::Q8_0`], [`DType::Q4_0`],
/// [`DType::Q4_1`]): blocks run along the row (along `d_model` for the nested FFN tensors), so a
/// quantised row is a whole number of blocks and every prefix of rows is a prefix of bytes.
pub const QK: usize = 32;

/// Element type of a tensor.
///
/// The block-quantised types use ggml's block layouts (docs/format.md 5.4): blocks of [`QK`]
/// consecutive elements of one row, each block an f16 scale `d` (and for `Q4_1` an f16 minimum
/// `m`) followed by the quantised values. [`crate::quant`] quantises and dequantises them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// IEEE-754 binary32, little-endian. Code 0.
    F32,
    /// IEEE-754 binary16, little-endian. Code 1.
    F16,
    /// 34-byte blocks of 32: f16 `d`, 32 x i8 `q`; value `d * q`. Code 2.
    Q8_0,
    /// 18-byte blocks of 32: f16 `d`, 16 bytes of 4-bit `n` (byte `j` holds element `j` in its
    /// low nibble and element `j + 16` in its high nibble); value `d * (n - 8)`. Code 3.
    Q4_0,
    /// 20-byte blocks of 32: f16 `d`, f16 `m`, 16 bytes of 4-bit `n` as in `Q4_0`; value
    /// `d * n + m`. Code 5.
    Q4_1,
}

impl DType {
    /// Every dtype a tensor may have, in code order.
    pub const ALL: [DType; 5] = [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1];

    /// The code stored in the tensor table.
    pub fn code(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q8_0 => 2,
            DType::Q4_0 => 3,
            DType::Q4_1 => 5,
        }
    }

    /// Elements per block: 1 for `f32` and `f16`, [`QK`] (32) for the quantised types. A row of
    /// a tensor of this dtype has a multiple of this many elements.
    pub fn block_elems(self) -> usize {
        if self.is_quantized() {
            QK
        } else {
            1
        }
    }

    /// Bytes per block: 4 (`f32`), 2 (`f16`), 34 (`q8_0`), 18 (`q4_0`), 20 (`q4_1`).
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
            DType::Q8_0 => 2 + QK,
            DType::Q4_0 => 2 + QK / 2,
            DType::Q4_1 => 4 + QK / 2,
        }
    }

    /// Bytes per element of an unquantised dtype (4 or 2); for a quantised dtype the bytes of
    /// one block of [`block_elems`](Self::block_elems) elements. Use
    /// [`row_bytes`](Self::row_bytes) for the size of a row.
    pub fn size_bytes(self) -> usize {
        self.block_bytes()
    }

    /// Whether this is a block-quantised type.
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4_0 | DType::Q4_1)
    }

    /// Bytes of a row of `row_elems` elements, or `None` when `row_elems` is not a multiple of
    /// [`block_elems`](Self::block_elems) or the size overflows.
    pub fn row_bytes(self, row_elems: u64) -> Option<u64> {
        let be = self.block_elems() as u64;
        if !row_elems.is_multiple_of(be) {
            return None;
        }
        (row_elems / be).checked_mul(self.block_bytes() as u64)
    }

    /// Bits per weight, scales included (16, 32, 8.5, 4.5, 5).
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_elems() as f64
    }

    /// Lower-case name (`"f32"`, `"f16"`, `"q8_0"`, `"q4_0"`, `"q4_1"`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
        }
    }

    /// The dtype with this table code, if this version supports it.
    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == code)
    }

    /// The dtype with this name, case-insensitive: `f32`, `f16`, `q8_0` (or `q8`), `q4_0` (or
    /// `q4`), `q4_1`.
    pub fn from_name(name: &str) -> Option<DType> {
        match name.to_ascii_lowercase().as_str() {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "q8_0" | "q8" => Some(DType::Q8_0),
            "q4_0" | "q4" => Some(DType::Q4_0),
            "q4_1" => Some(DType::Q4_1),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// [R13c] a row of `row_elems` elements can be stored in `dtype`: quantised rows are a whole
/// number of 32-element blocks (so 1-D tensors, the norms, are never quantised).
pub(crate) fn check_block_shape(name: &str, dtype: DType, row_elems: u64) -> Result<(), FormatError> {
    if dtype.row_bytes(row_elems).is_none() {
        return Err(FormatError::BlockAlignment {
            tensor: name.to_string(),
            dtype: dtype.name(),
            row_elems,
            block: dtype.block_elems() as u64,
        });
    }
    Ok(())
}

/// Table code of a blob record: raw bytes, not a tensor element type (docs/format.md 5.5).
pub const BLOB_CODE: u8 = 4;
/// Prefix of every blob record's name in the tensor table.
pub const BLOB_PREFIX: &str = "blob.";
/// Longest blob id (the part of the name after [`BLOB_PREFIX`]), in bytes.
pub const MAX_BLOB_ID_LEN: usize = 64;
/// Largest blob, in bytes (1 GiB); anything larger is treated as corruption.
pub const MAX_BLOB_LEN: u64 = 1 << 30;
/// Id of the blob holding a Hugging Face `tokenizer.json` (metadata `tokenizer.kind` is
/// `"huggingface"`).
pub const TOKENIZER_JSON_BLOB: &str = "tokenizer_json";

/// If `name` is a blob record's name (`blob.` + 1 to 64 of `[a-z0-9_]`), its id.
pub(crate) fn blob_id(name: &str) -> Option<&str> {
    let id = name.strip_prefix(BLOB_PREFIX)?;
    let ok = !id.is_empty()
        && id.len() <= MAX_BLOB_ID_LEN
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    ok.then_some(id)
}

/// A named byte string stored in level 0 next to the tensors (the tokenizer's JSON): one
/// segment with its own CRC-32, read only when asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlobInfo {
    /// The id (the record's name without the `blob.` prefix), e.g. `"tokenizer_json"`.
    pub id: String,
    /// Where the bytes are: level 0, "rows" `[0, byte_len)` of one byte each.
    pub segment: Segment,
}

/// A blob to be written: its id (without the `blob.` prefix) and its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobSpec<'a> {
    /// `[a-z0-9_]{1,64}`, unique in the file.
    pub id: &'a str,
    /// The content, 1 byte to 1 GiB.
    pub bytes: &'a [u8],
}

/// One contiguous run of rows of a tensor, stored at one level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// The level whose bytes hold this segment.
    pub level: u32,
    /// First row (inclusive).
    pub row_start: u64,
    /// End row (exclusive).
    pub row_end: u64,
    /// Absolute file offset; a multiple of the alignment.
    pub offset: u64,
    /// `(row_end - row_start) * row_bytes`.
    pub byte_len: u64,
    /// CRC-32 (IEEE, as computed by `crc32fast`) of the segment bytes.
    pub crc32: u32,
}

impl Segment {
    /// Offset one past the last byte (saturating; parsed segments never saturate).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.byte_len)
    }

    /// Rows in the segment.
    pub fn rows(&self) -> u64 {
        self.row_end.saturating_sub(self.row_start)
    }
}

/// One tensor: its name, dtype, shape and where its rows are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    /// Canonical name (see [`names`]).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Row-major shape, 1 to 4 dimensions.
    pub shape: Vec<u64>,
    /// Segments in level order; their row ranges tile `[0, rows)`.
    pub segments: Vec<Segment>,
}

impl TensorInfo {
    /// `shape[0]`.
    pub fn rows(&self) -> u64 {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Product of `shape[1..]` (1 for 1-D tensors).
    pub fn row_elems(&self) -> u64 {
        self.shape.iter().skip(1).fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Bytes of one row (saturating; `u64::MAX` for a quantised row that is not a whole
    /// number of blocks, which parsed tensors never have).
    pub fn row_bytes(&self) -> u64 {
        self.dtype.row_bytes(self.row_elems()).unwrap_or(u64::MAX)
    }

    /// Whether this is a nested FFN tensor (`layers.{i}.ffn_up|ffn_gate|ffn_down_t`), stored in
    /// one segment per level.
    pub fn is_nested(&self) -> bool {
        nested_layer(&self.name).is_some()
    }

    /// Elements in the tensor.
    pub fn n_elements(&self) -> u64 {
        self.rows().saturating_mul(self.row_elems())
    }
}

/// A tensor to be written: name, dtype and shape. Its segments follow from the metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Canonical name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<u64>,
}

/// If `name` is a nested FFN tensor `layers.{i}.{ffn_up|ffn_gate|ffn_down_t}`, its layer `i`.
pub(crate) fn nested_layer(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("layers.")?;
    let (idx, suffix) = rest.split_once('.')?;
    if !names::NESTED_SUFFIXES.contains(&suffix) {
        return None;
    }
    // Canonical decimal only: no sign, no leading zeros.
    if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) || (idx.len() > 1 && idx.starts_with('0')) {
        return None;
    }
    idx.parse().ok()
}

/// `x` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    x.checked_add(mask).map(|v| v & !mask)
}

/// The tensors an architecture requires, in canonical file order, each with `dtype`:
/// `tok_embeddings`, then per layer `attn_norm` (`attn_norm_bias`), `wq`, `wk`, `wv`, `wo`,
/// `ffn_norm` (`ffn_norm_bias`), `ffn_gate` (gated only), `ffn_up`, `ffn_down_t`, then `norm`
/// (`norm_bias`) and `lm_head` (untied only). Bias tensors appear only with LayerNorm. A Gemma 3n
/// file (metadata key `gemma3n`) has its own list (`format::gemma3n`, docs/format.md).
///
/// The reader validates a file's tensor set against this list (names and shapes); the writer,
/// the exporter and the tests build their specs from it. Never panics, even on metadata that
/// does not validate (missing widths become 0, which the validation rejects).
pub fn required_tensor_specs(meta: &Metadata, dtype: DType) -> Vec<TensorSpec> {
    if let Ok(Some(g)) = super::gemma3n::Gemma3nConfig::from_metadata(meta) {
        return super::gemma3n::gemma3n_tensor_specs(meta, &g, dtype);
    }
    let a = &meta.architecture;
    let d = u64::from(a.d_model);
    let vocab = u64::from(a.vocab_size);
    let q_dim = u64::from(a.n_heads).saturating_mul(u64::from(a.head_dim));
    let kv_dim = u64::from(a.n_kv_heads).saturating_mul(u64::from(a.head_dim));
    let layer_norm = a.norm == NormKind::LayerNorm;
    let spec = |name: String, shape: Vec<u64>| TensorSpec { name, dtype, shape };

    let mut out = Vec::new();
    out.push(spec(names::TOK_EMBEDDINGS.to_string(), vec![vocab, d]));
    for i in 0..a.n_layers as usize {
        let h = meta.ffn_widths.get(i).and_then(|w| w.last()).copied().map_or(0, u64::from);
        out.push(spec(names::layer(i, names::ATTN_NORM), vec![d]));
        if layer_norm {
            out.push(spec(names::layer(i, names::ATTN_NORM_BIAS), vec![d]));
        }
        out.push(spec(names::layer(i, names::WQ), vec![q_dim, d]));
        out.push(spec(names::layer(i, names::WK), vec![kv_dim, d]));
        out.push(spec(names::layer(i, names::WV), vec![kv_dim, d]));
        out.push(spec(names::layer(i, names::WO), vec![d, q_dim]));
        out.push(spec(names::layer(i, names::FFN_NORM), vec![d]));
        if layer_norm {
            out.push(spec(names::layer(i, names::FFN_NORM_BIAS), vec![d]));
        }
        if a.gated_ffn {
            out.push(spec(names::layer(i, names::FFN_GATE), vec![h, d]));
        }
        out.push(spec(names::layer(i, names::FFN_UP), vec![h, d]));
        out.push(spec(names::layer(i, names::FFN_DOWN_T), vec![h, d]));
    }
    out.push(spec(names::NORM.to_string(), vec![d]));
    if layer_norm {
        out.push(spec(names::NORM_BIAS.to_string(), vec![d]));
    }
    if !a.tied_embeddings {
        out.push(spec(names::LM_HEAD.to_string(), vec![vocab, d]));
    }
    out
}

/// Checks one tensor's dimensions: 1..=4 dims, none zero, element count at most
/// [`MAX_TENSOR_ELEMENTS`]. Returns `(rows, row_elems)`.
pub(crate) fn check_shape(name: &str, shape: &[u64]) -> Result<(u64, u64), FormatError> {
    if shape.is_empty() || shape.len() > MAX_NDIM {
        return Err(FormatError::BadShape {
            tensor: name.to_string(),
            reason: format!("{} dimensions, expected 1..={MAX_NDIM}", shape.len()),
        });
    }
    if let Some(pos) = shape.iter().position(|&d| d == 0) {
        return Err(FormatError::BadShape { tensor: name.to_string(), reason: format!("dimension {pos} is zero") });
    }
    let absurd =
        || FormatError::AbsurdSize { tensor: name.to_string(), shape: shape.to_vec(), limit: MAX_TENSOR_ELEMENTS };
    let mut total: u64 = 1;
    for &d in shape {
        total = total.checked_mul(d).ok_or_else(absurd)?;
        if total > MAX_TENSOR_ELEMENTS {
            return Err(absurd());
        }
    }
    let rows = shape[0];
    Ok((rows, total / rows))
}

/// The row ranges `[start, end)` of a tensor's segments, one per level for nested tensors and a
/// single level-0 range for shared ones. `meta` must already be validated.
pub(crate) fn expected_row_ranges(meta: &Metadata, name: &str, rows: u64) -> Vec<(u32, u64, u64)> {
    match nested_layer(name).and_then(|i| meta.ffn_widths.get(i)) {
        Some(widths) => {
            let mut prev = 0u64;
            widths
                .iter()
                .enumerate()
                .map(|(j, &w)| {
                    let r = (j as u32, prev, u64::from(w));
                    prev = u64::from(w);
                    r
                })
                .collect()
        }
        None => vec![(0, 0, rows)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_names() {
        assert_eq!(nested_layer("layers.0.ffn_up"), Some(0));
        assert_eq!(nested_layer("layers.12.ffn_down_t"), Some(12));
        assert_eq!(nested_layer("layers.3.ffn_gate"), Some(3));
        for n in
            ["layers.0.wq", "layers.01.ffn_up", "layers.+1.ffn_up", "layers..ffn_up", "ffn_up", "layers.1.ffn_up.x"]
        {
            assert_eq!(nested_layer(n), None, "{n}");
        }
        assert_eq!(nested_layer("layers.99999999999999999999999.ffn_up"), None);
    }

    #[test]
    fn align() {
        assert_eq!(align_up(0, 4096), Some(0));
        assert_eq!(align_up(1, 4096), Some(4096));
        assert_eq!(align_up(4096, 4096), Some(4096));
        assert_eq!(align_up(u64::MAX - 10, 4096), None);
        assert_eq!(align_up(5, 0), None);
    }

    #[test]
    fn shapes() {
        assert_eq!(check_shape("t", &[3, 4, 5]).unwrap(), (3, 20));
        assert_eq!(check_shape("t", &[7]).unwrap(), (7, 1));
        assert!(matches!(check_shape("t", &[]), Err(FormatError::BadShape { .. })));
        assert!(matches!(check_shape("t", &[1, 1, 1, 1, 1]), Err(FormatError::BadShape { .. })));
        assert!(matches!(check_shape("t", &[1 << 20, 1 << 21]), Err(FormatError::AbsurdSize { .. })));
        assert!(check_shape("t", &[1 << 20, 1 << 20]).is_ok());
    }
}
