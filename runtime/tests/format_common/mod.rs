//! Helpers shared by the `format_*` integration tests: small valid files and a map of where
//! every header field lives, so tests can patch exactly the field they target.
#![allow(dead_code)]

use matformer::format::{
    testing::{refresh_header_crc, synthetic_metadata, synthetic_value},
    write_file_with_alignment, DType, Metadata, TensorSpec,
};

/// 2 layers with different widths per layer, 3 levels, gated, untied, GQA (4 heads, 2 kv).
pub fn small_meta() -> Metadata {
    synthetic_metadata(16, 2, 4, 2, 4, 260, vec![vec![8, 16, 32], vec![4, 12, 24]], true, false)
}

/// Deterministic bytes of rows `rows` of `spec`.
pub fn spec_rows(seed: u64, spec: &TensorSpec, rows: std::ops::Range<u64>, out: &mut Vec<u8>) {
    let row_elems: u64 = spec.shape.iter().skip(1).product();
    for r in rows {
        let row: Vec<f32> = (r * row_elems..(r + 1) * row_elems).map(|idx| synthetic_value(seed, spec, idx)).collect();
        matformer::quant::encode_row(spec.dtype, &row, out).expect("whole blocks");
    }
}

/// The whole tensor's bytes.
pub fn spec_bytes(seed: u64, spec: &TensorSpec) -> Vec<u8> {
    let mut out = Vec::new();
    spec_rows(seed, spec, 0..spec.shape[0], &mut out);
    out
}

/// Writes `specs` for `meta` with alignment `2^log2`.
pub fn write(meta: &Metadata, specs: &[TensorSpec], log2: u32, seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let len = write_file_with_alignment(
        &mut out,
        meta,
        specs,
        log2,
        |ti, rows, buf| {
            spec_rows(seed, &specs[ti], rows, buf);
            Ok(())
        },
        |_, _| {},
    )
    .expect("write");
    assert_eq!(len, out.len() as u64);
    out
}

/// A small valid file (4 KiB alignment) and its specs.
pub fn small_file(dtype: DType) -> (Metadata, Vec<TensorSpec>, Vec<u8>) {
    let meta = small_meta();
    let specs = matformer::format::required_tensor_specs(&meta, dtype);
    let bytes = write(&meta, &specs, 12, 7);
    (meta, specs, bytes)
}

pub fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
pub fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
pub fn rd_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
pub fn wr_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn wr_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn wr_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Re-seals the header CRC after a patch.
pub fn reseal(b: &mut [u8]) {
    assert!(refresh_header_crc(b));
}

/// Where a tensor record's fields are (absolute offsets).
#[derive(Clone, Debug)]
pub struct Rec {
    pub name: String,
    pub start: usize,
    pub name_at: usize,
    pub dtype_at: usize,
    pub ndim_at: usize,
    pub reserved_at: usize,
    pub shape_at: usize,
    pub nseg_at: usize,
    /// Start of each 48-byte segment record.
    pub segs: Vec<usize>,
    pub end: usize,
}

/// Segment record field offsets.
pub const SEG_LEVEL: usize = 0;
pub const SEG_RES0: usize = 4;
pub const SEG_ROW_START: usize = 8;
pub const SEG_ROW_END: usize = 16;
pub const SEG_OFFSET: usize = 24;
pub const SEG_LEN: usize = 32;
pub const SEG_CRC: usize = 40;
pub const SEG_RES1: usize = 44;

/// Map of a valid file's header.
#[derive(Clone, Debug)]
pub struct Map {
    pub n_levels: usize,
    pub header_len: usize,
    pub meta_start: usize,
    pub meta_len: usize,
    pub table_start: usize,
    pub table_len: usize,
    pub recs: Vec<Rec>,
}

impl Map {
    pub fn of(b: &[u8]) -> Map {
        let n_levels = rd_u32(b, 12) as usize;
        let n_tensors = rd_u32(b, 16) as usize;
        let header_len = rd_u64(b, 24) as usize;
        let meta_len = rd_u64(b, 32) as usize;
        let table_len = rd_u64(b, 40) as usize;
        let meta_start = 64 + 8 * n_levels;
        let table_start = meta_start + meta_len;
        let mut p = table_start;
        let mut recs = Vec::new();
        for _ in 0..n_tensors {
            let start = p;
            let nl = rd_u16(b, p) as usize;
            let name = String::from_utf8(b[p + 2..p + 2 + nl].to_vec()).unwrap();
            let name_at = p + 2;
            let dtype_at = name_at + nl;
            let ndim_at = dtype_at + 1;
            let reserved_at = ndim_at + 1;
            let shape_at = reserved_at + 2;
            let ndim = b[ndim_at] as usize;
            let nseg_at = shape_at + 8 * ndim;
            let nseg = rd_u32(b, nseg_at) as usize;
            let segs: Vec<usize> = (0..nseg).map(|k| nseg_at + 4 + 48 * k).collect();
            p = nseg_at + 4 + 48 * nseg;
            recs.push(Rec { name, start, name_at, dtype_at, ndim_at, reserved_at, shape_at, nseg_at, segs, end: p });
        }
        assert_eq!(p, header_len, "map must cover the table");
        Map { n_levels, header_len, meta_start, meta_len, table_start, table_len, recs }
    }

    pub fn rec(&self, name: &str) -> &Rec {
        self.recs.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no record {name}"))
    }
}

/// Rewrites the metadata JSON in place (same length: the new JSON is padded with spaces, which
/// JSON allows) and re-seals the header. A top-level `padding` key is dropped first to make
/// room. Panics if the new JSON is longer.
pub fn with_metadata(b: &mut [u8], f: impl FnOnce(&mut serde_json::Value)) {
    let map = Map::of(b);
    let region = map.meta_start..map.meta_start + map.meta_len;
    let mut v: serde_json::Value = serde_json::from_slice(&b[region.clone()]).unwrap();
    v.as_object_mut().unwrap().remove("padding");
    f(&mut v);
    let text = serde_json::to_vec(&v).unwrap();
    set_metadata_bytes(b, &text);
}

/// Replaces the metadata bytes (padded with spaces to the original length) and re-seals.
pub fn set_metadata_bytes(b: &mut [u8], text: &[u8]) {
    let map = Map::of(b);
    assert!(text.len() <= map.meta_len, "new metadata ({}) longer than the old ({})", text.len(), map.meta_len);
    let region = &mut b[map.meta_start..map.meta_start + map.meta_len];
    region.fill(b' ');
    region[..text.len()].copy_from_slice(text);
    reseal(b);
}

/// Deterministic RNG (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Re-seals the header CRC if the stored `header_len` fits in the bytes.
pub fn reseal_if_possible(b: &mut [u8]) -> bool {
    refresh_header_crc(b)
}
