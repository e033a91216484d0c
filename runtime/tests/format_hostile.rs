//! One hostile input per reader check. Each starts from a valid file written by the writer,
//! patches the bytes the check looks at and, where the header CRC would otherwise fire first,
//! re-seals the header so that exactly the targeted check is reached.

mod format_common;

use format_common::*;
use matformer::format::{names, DType, FileView, FormatError};
use serde_json::json;

/// A small valid file whose metadata carries a 64-byte `padding` key, which [`with_metadata`]
/// drops so that mutations may lengthen the JSON.
fn valid() -> Vec<u8> {
    let mut meta = small_meta();
    meta.extra.insert("padding".into(), json!("-".repeat(64)));
    let specs = matformer::format::required_tensor_specs(&meta, DType::F16);
    write(&meta, &specs, 12, 7)
}

fn parse_err(b: &[u8]) -> FormatError {
    match FileView::parse(b) {
        Ok(_) => panic!("hostile file parsed"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty() && !msg.contains('\n'), "one-line message: {msg:?}");
            e
        }
    }
}

/// Patches with `f`, re-seals, and returns the parse error.
fn patched(f: impl FnOnce(&mut Vec<u8>, &Map)) -> FormatError {
    let mut b = valid();
    let map = Map::of(&b);
    f(&mut b, &map);
    reseal(&mut b);
    parse_err(&b)
}

fn meta_err(f: impl FnOnce(&mut serde_json::Value)) -> FormatError {
    let mut b = valid();
    with_metadata(&mut b, f);
    parse_err(&b)
}

fn bad_metadata(err: FormatError, needle: &str) {
    match err {
        FormatError::BadMetadata { reason } => assert!(reason.contains(needle), "{reason:?} lacks {needle:?}"),
        other => panic!("expected BadMetadata({needle}), got {other}"),
    }
}

// ---- preamble ----

#[test]
fn wrong_magic() {
    let mut b = valid();
    b[..4].copy_from_slice(b"GGUF");
    assert!(matches!(parse_err(&b), FormatError::BadMagic { found } if &found == b"GGUF"));
    assert!(matches!(parse_err(b"MATX"), FormatError::BadMagic { .. }));
    assert!(matches!(parse_err(b"X"), FormatError::BadMagic { found: [b'X', 0, 0, 0] }));
}

#[test]
fn empty_and_short_inputs() {
    for len in [0usize, 1, 3, 4, 10, 63] {
        let b = valid();
        let err = parse_err(&b[..len]);
        assert!(matches!(err, FormatError::Truncated { what: "preamble", needed: 64, .. }), "{len}: {err}");
    }
}

#[test]
fn unknown_future_version() {
    let err = patched(|b, _| wr_u32(b, 4, 2));
    assert!(matches!(err, FormatError::UnsupportedVersion { found: 2, supported: 1 }), "{err}");
    let err = patched(|b, _| wr_u32(b, 4, 0));
    assert!(matches!(err, FormatError::UnsupportedVersion { found: 0, .. }), "{err}");
}

#[test]
fn bad_alignment() {
    for log2 in [0, 11, 25, u32::MAX] {
        let err = patched(|b, _| wr_u32(b, 8, log2));
        assert!(matches!(err, FormatError::BadAlignment { log2: l } if l == log2), "{err}");
    }
}

#[test]
fn bad_counts() {
    for n in [0, 17, u32::MAX] {
        let err = patched(|b, _| wr_u32(b, 12, n));
        assert!(matches!(err, FormatError::BadCount { what: "n_levels", .. }), "{err}");
    }
    for n in [0, 65537] {
        let err = patched(|b, _| wr_u32(b, 16, n));
        assert!(matches!(err, FormatError::BadCount { what: "n_tensors", .. }), "{err}");
    }
}

#[test]
fn unknown_flags() {
    let err = patched(|b, _| wr_u32(b, 20, 1 << 7));
    assert!(matches!(err, FormatError::UnknownFlags { flags: 128 }), "{err}");
}

#[test]
fn reserved_preamble_bytes() {
    let err = patched(|b, _| b[60] = 1);
    assert!(matches!(err, FormatError::ReservedNonZero { offset: 60, .. }), "{err}");
}

#[test]
fn header_len_inconsistent() {
    let err = patched(|b, m| wr_u64(b, 24, m.header_len as u64 + 8));
    assert!(matches!(err, FormatError::HeaderLength { .. }), "{err}");
    // Overflowing lengths.
    let err = patched(|b, _| wr_u64(b, 32, u64::MAX - 10));
    assert!(matches!(err, FormatError::HeaderLength { computed: u64::MAX, .. }), "{err}");
}

#[test]
fn header_len_absurd() {
    // Consistent but absurd: a 2^40-byte metadata block.
    // Checked before the header CRC (which cannot be computed over bytes that do not exist).
    let mut b = valid();
    let m = Map::of(&b);
    let meta_len = 1u64 << 40;
    wr_u64(&mut b, 32, meta_len);
    wr_u64(&mut b, 24, 64 + 8 * m.n_levels as u64 + meta_len + m.table_len as u64);
    let err = parse_err(&b);
    assert!(matches!(err, FormatError::BadCount { what: "header_len", .. }), "{err}");
}

#[test]
fn truncated_header() {
    let b = valid();
    let m = Map::of(&b);
    for len in [64, 70, m.meta_start + 5, m.table_start + 3, m.header_len - 1] {
        let err = parse_err(&b[..len]);
        assert!(matches!(err, FormatError::Truncated { what: "header", .. }), "{len}: {err}");
    }
}

#[test]
fn header_checksum_mismatch() {
    let mut b = valid();
    let m = Map::of(&b);
    b[m.meta_start + 3] ^= 0x20; // no re-seal
    assert!(matches!(parse_err(&b), FormatError::HeaderChecksum { .. }));
    let mut b = valid();
    b[48] ^= 1; // the CRC field itself
    assert!(matches!(parse_err(&b), FormatError::HeaderChecksum { .. }));
}

// ---- level table and file length ----

#[test]
fn level_table_not_increasing() {
    let err = patched(|b, m| wr_u64(b, 64, m.header_len as u64));
    assert!(matches!(err, FormatError::BadLevelTable { .. }), "{err}");
    let err = patched(|b, _| {
        let e0 = rd_u64(b, 64);
        wr_u64(b, 64 + 8, e0);
    });
    assert!(matches!(err, FormatError::BadLevelTable { .. }), "{err}");
    // A level so short that alignment leaves no room.
    let err = patched(|b, _| {
        let e0 = rd_u64(b, 64);
        wr_u64(b, 64 + 8, e0 + 1);
    });
    assert!(matches!(err, FormatError::BadLevelTable { .. }), "{err}");
    // Overflow when aligning.
    let err = patched(|b, _| {
        wr_u64(b, 64 + 8, u64::MAX - 1);
        wr_u64(b, 64 + 16, u64::MAX);
    });
    assert!(matches!(err, FormatError::BadLevelTable { .. } | FormatError::TruncatedInsideLevel { .. }), "{err}");
}

#[test]
fn trailing_bytes() {
    let mut b = valid();
    let len = b.len() as u64;
    b.push(0);
    assert!(
        matches!(parse_err(&b), FormatError::TrailingBytes { expected, len: l } if expected == len && l == len + 1)
    );
}

#[test]
fn truncated_inside_a_level_and_before_level_0() {
    let b = valid();
    let v = FileView::parse(&b).unwrap();
    let err = parse_err(&b[..v.level_ends[1] as usize + 1]);
    assert!(matches!(err, FormatError::TruncatedInsideLevel { level: 2, .. }), "{err}");
    let err = parse_err(&b[..v.level_ends[0] as usize - 1]);
    assert!(matches!(err, FormatError::Truncated { what: "level 0", .. }), "{err}");
    let err = parse_err(&b[..v.header_len as usize]);
    assert!(matches!(err, FormatError::Truncated { what: "level 0", .. }), "{err}");
}

#[test]
fn level_ends_past_the_file() {
    // The last level claims to end beyond the data: the file looks cut inside it.
    let err = patched(|b, m| {
        let at = 64 + 8 * (m.n_levels - 1);
        let e = rd_u64(b, at);
        wr_u64(b, at, e + 4096);
    });
    assert!(matches!(err, FormatError::TruncatedInsideLevel { level: 2, .. }), "{err}");
}

// ---- metadata ----

#[test]
fn metadata_not_utf8_or_not_json() {
    let mut b = valid();
    set_metadata_bytes(&mut b, &[0xff, 0xfe, b'{']);
    assert!(matches!(parse_err(&b), FormatError::MetadataJson { reason } if reason.contains("UTF-8")));
    let mut b = valid();
    set_metadata_bytes(&mut b, b"{\"architecture\": ");
    assert!(matches!(parse_err(&b), FormatError::MetadataJson { .. }));
    let mut b = valid();
    set_metadata_bytes(&mut b, b"[]");
    assert!(matches!(parse_err(&b), FormatError::MetadataJson { .. }));
    // A required key is missing.
    let err = meta_err(|v| {
        v.as_object_mut().unwrap().remove("ffn_widths");
    });
    assert!(matches!(err, FormatError::MetadataJson { reason } if reason.contains("ffn_widths")));
    // Wrong type / out of range.
    let err = meta_err(|v| v["architecture"]["d_model"] = json!(-1));
    assert!(matches!(err, FormatError::MetadataJson { .. }), "{err}");
    let err = meta_err(|v| v["architecture"]["norm"] = json!("batch"));
    assert!(matches!(err, FormatError::MetadataJson { .. }), "{err}");
}

#[test]
fn heads_not_divisible_by_kv_heads() {
    bad_metadata(meta_err(|v| v["architecture"]["n_kv_heads"] = json!(3)), "not a multiple of n_kv_heads");
}

#[test]
fn widths_not_increasing() {
    bad_metadata(meta_err(|v| v["ffn_widths"][1] = json!([12, 4, 24])), "not strictly increasing");
    bad_metadata(meta_err(|v| v["ffn_widths"][0] = json!([8, 8, 32])), "not strictly increasing");
}

#[test]
fn wrong_number_of_per_layer_lists_or_widths() {
    bad_metadata(
        meta_err(|v| {
            v["ffn_widths"].as_array_mut().unwrap().pop();
        }),
        "per-layer lists",
    );
    bad_metadata(
        meta_err(|v| {
            v["ffn_widths"][0].as_array_mut().unwrap().pop();
        }),
        "widths but there are 3 levels",
    );
}

#[test]
fn zero_sizes() {
    for key in ["d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "max_context"] {
        bad_metadata(meta_err(|v| v["architecture"][key] = json!(0)), &format!("{key} is zero"));
    }
    bad_metadata(meta_err(|v| v["ffn_widths"][0] = json!([0, 16, 32])), "is zero");
    bad_metadata(meta_err(|v| v["level_names"] = json!([])), "level names");
}

#[test]
fn other_inconsistent_metadata() {
    bad_metadata(meta_err(|v| v["architecture"]["head_dim"] = json!(3)), "odd");
    bad_metadata(meta_err(|v| v["architecture"]["d_model"] = json!(1u64 << 30)), "more than");
    bad_metadata(meta_err(|v| v["architecture"]["norm_eps"] = json!(0.0)), "norm_eps");
    bad_metadata(meta_err(|v| v["architecture"]["rope_theta"] = json!(-1.0)), "rope_theta");
    bad_metadata(meta_err(|v| v["tokenizer"]["eos_id"] = json!(260)), "eos_id");
    bad_metadata(meta_err(|v| v["architecture"]["vocab_size"] = json!(200)), "vocab_size >= 256");
    bad_metadata(meta_err(|v| v["level_names"] = json!(["s", "s", "l"])), "twice");
    bad_metadata(meta_err(|v| v["level_names"] = json!(["s", "m,", "l"])), "commas");
    // Consistent metadata, but a different level count than the header.
    bad_metadata(
        meta_err(|v| {
            v["level_names"] = json!(["s", "l"]);
            v["ffn_widths"] = json!([[8, 32], [4, 24]]);
        }),
        "header has 3",
    );
}

#[test]
fn metadata_consistent_with_tensors() {
    // A valid architecture that disagrees with the stored shapes: caught by the shape check.
    let err = meta_err(|v| v["architecture"]["vocab_size"] = json!(270));
    assert!(matches!(&err, FormatError::BadShape { tensor, .. } if tensor == "tok_embeddings"), "{err}");
    let err = meta_err(|v| v["ffn_widths"][1] = json!([4, 12, 25]));
    assert!(matches!(&err, FormatError::BadShape { tensor, .. } if tensor == "layers.1.ffn_gate"), "{err}");
    // Middle width changed: shapes agree, the segment rows do not.
    let err = meta_err(|v| v["ffn_widths"][1] = json!([4, 13, 24]));
    assert!(
        matches!(&err, FormatError::SegmentRows { tensor, index: 1, .. } if tensor == "layers.1.ffn_gate"),
        "{err}"
    );
    // Untied in the file but tied in the metadata: lm_head is now unexpected.
    let err = meta_err(|v| v["architecture"]["tied_embeddings"] = json!(true));
    assert!(matches!(&err, FormatError::UnexpectedTensor { name } if name == "lm_head"), "{err}");
    // Not gated: ffn_gate unexpected.
    let err = meta_err(|v| v["architecture"]["gated_ffn"] = json!(false));
    assert!(matches!(&err, FormatError::UnexpectedTensor { name } if name == "layers.0.ffn_gate"), "{err}");
    // LayerNorm: bias tensors missing.
    let err = meta_err(|v| v["architecture"]["norm"] = json!("layer_norm"));
    assert!(matches!(&err, FormatError::MissingTensor { name } if name == "layers.0.attn_norm_bias"), "{err}");
}

// ---- tensor table ----

#[test]
fn bad_tensor_names() {
    let err = patched(|b, m| wr_u16(b, m.recs[0].start, 0));
    assert!(matches!(err, FormatError::BadTensorName { index: 0, .. }), "{err}");
    let err = patched(|b, m| wr_u16(b, m.recs[0].start, 300));
    assert!(matches!(err, FormatError::BadTensorName { index: 0, .. }), "{err}");
    let err = patched(|b, m| b[m.recs[3].name_at + 1] = 0xff);
    assert!(matches!(&err, FormatError::BadTensorName { index: 3, reason } if reason.contains("UTF-8")), "{err}");
}

#[test]
fn unknown_tensor_name() {
    let err = patched(|b, m| b[m.rec("norm").name_at + 1] = b'a');
    assert!(matches!(&err, FormatError::UnexpectedTensor { name } if name == "narm"), "{err}");
    // A layer the architecture does not have.
    let err = patched(|b, m| {
        let r = m.rec(&names::layer(1, names::WQ));
        b[r.name_at + 7] = b'9';
    });
    assert!(matches!(&err, FormatError::UnexpectedTensor { name } if name == "layers.9.wq"), "{err}");
}

#[test]
fn duplicate_tensor() {
    let err = patched(|b, m| {
        let r = m.rec(&names::layer(0, names::WK));
        b[r.name_at + 10] = b'q'; // layers.0.wk -> layers.0.wq
    });
    assert!(matches!(&err, FormatError::DuplicateTensor { name } if name == "layers.0.wq"), "{err}");
}

#[test]
fn missing_tensor() {
    // Drop the last record (lm_head) from the table.
    let err = patched(|b, m| {
        let last = m.recs.last().unwrap();
        let rec_len = (last.end - last.start) as u64;
        wr_u32(b, 16, m.recs.len() as u32 - 1);
        wr_u64(b, 40, m.table_len as u64 - rec_len);
        wr_u64(b, 24, m.header_len as u64 - rec_len);
    });
    assert!(matches!(&err, FormatError::MissingTensor { name } if name == "lm_head"), "{err}");
}

#[test]
fn block_and_unknown_dtypes() {
    // The block-quantised codes (q8_0, q4_0, q4_1) on this 16-wide model: rows are not whole
    // 32-element blocks (tests/format_quant.rs covers valid quantised files).
    for code in [2u8, 3, 5] {
        let err = patched(|b, m| b[m.recs[2].dtype_at] = code);
        assert!(matches!(err, FormatError::BlockAlignment { block: 32, .. }), "{code}: {err}");
    }
    for code in [6u8, 9, 255] {
        let err = patched(|b, m| b[m.recs[2].dtype_at] = code);
        assert!(matches!(err, FormatError::UnknownDType { code: c, .. } if c == code), "{err}");
    }
}

#[test]
fn bad_ndim_and_reserved_record_bytes() {
    for ndim in [0u8, 5, 255] {
        let err = patched(|b, m| b[m.recs[1].ndim_at] = ndim);
        assert!(matches!(err, FormatError::BadShape { .. }), "{ndim}: {err}");
    }
    let err = patched(|b, m| wr_u16(b, m.recs[1].reserved_at, 7));
    assert!(matches!(err, FormatError::ReservedNonZero { what: "tensor record reserved u16", .. }), "{err}");
    let err = patched(|b, m| wr_u32(b, m.recs[1].segs[0] + SEG_RES0, 1));
    assert!(matches!(err, FormatError::ReservedNonZero { what: "segment record reserved u32", .. }), "{err}");
    let err = patched(|b, m| wr_u32(b, m.recs[1].segs[0] + SEG_RES1, 1));
    assert!(matches!(err, FormatError::ReservedNonZero { .. }), "{err}");
}

#[test]
fn zero_dimension() {
    let err = patched(|b, m| wr_u64(b, m.recs[0].shape_at + 8, 0));
    assert!(matches!(&err, FormatError::BadShape { reason, .. } if reason.contains("zero")), "{err}");
}

#[test]
fn absurd_sizes() {
    // 2^60 elements.
    let err = patched(|b, m| wr_u64(b, m.recs[0].shape_at, 1 << 60));
    assert!(matches!(err, FormatError::AbsurdSize { limit, .. } if limit == 1 << 40), "{err}");
    // Product overflows u64.
    let err = patched(|b, m| {
        wr_u64(b, m.recs[0].shape_at, u64::MAX);
        wr_u64(b, m.recs[0].shape_at + 8, u64::MAX);
    });
    assert!(matches!(err, FormatError::AbsurdSize { .. }), "{err}");
}

#[test]
fn shape_mismatch_with_architecture() {
    let err = patched(|b, m| wr_u64(b, m.rec(&names::layer(0, names::WQ)).shape_at + 8, 17));
    assert!(
        matches!(&err, FormatError::BadShape { tensor, reason } if tensor == "layers.0.wq" && reason.contains("expected")),
        "{err}"
    );
}

#[test]
fn wrong_segment_count() {
    let err = patched(|b, m| wr_u32(b, m.rec(&names::layer(0, names::WQ)).nseg_at, 0));
    assert!(matches!(err, FormatError::SegmentCount { found: 0, expected: 1, .. }), "{err}");
    let err = patched(|b, m| wr_u32(b, m.rec(&names::layer(0, names::FFN_UP)).nseg_at, 99));
    assert!(matches!(err, FormatError::SegmentCount { found: 99, expected: 3, .. }), "{err}");
    // A nested tensor claims fewer segments: the record is re-parsed shorter, so the rest of
    // the table is misread; the reader reports a table error, never a panic.
    let err = patched(|b, m| wr_u32(b, m.rec(&names::layer(0, names::FFN_UP)).nseg_at, 2));
    assert!(!err.to_string().is_empty());
    // The last tensor claims two segments: the record overruns the table.
    let err = patched(|b, m| wr_u32(b, m.recs.last().unwrap().nseg_at, 2));
    assert!(matches!(err, FormatError::BadTensorTable { .. }), "{err}");
}

#[test]
fn table_has_leftover_bytes() {
    // Grow table_len by 8: the first 8 padding bytes of level 0 become part of the table.
    let err = patched(|b, m| {
        wr_u64(b, 40, m.table_len as u64 + 8);
        wr_u64(b, 24, m.header_len as u64 + 8);
    });
    assert!(
        matches!(&err, FormatError::BadTensorTable { index, reason } if *index == 21 && reason.contains("8 bytes left")),
        "{err}"
    );
}

#[test]
fn segment_rows_and_levels() {
    let up = names::layer(1, names::FFN_UP);
    let err = patched(|b, m| wr_u64(b, m.rec(&up).segs[1] + SEG_ROW_START, 5));
    assert!(
        matches!(&err, FormatError::SegmentRows { tensor, index: 1, expected_start: 4, .. } if *tensor == up),
        "{err}"
    );
    let err = patched(|b, m| wr_u32(b, m.rec(&up).segs[2] + SEG_LEVEL, 1));
    assert!(matches!(err, FormatError::SegmentRows { level: 1, expected_level: 2, .. }), "{err}");
    let err = patched(|b, m| wr_u32(b, m.rec("norm").segs[0] + SEG_LEVEL, 1));
    assert!(matches!(err, FormatError::SegmentRows { level: 1, expected_level: 0, .. }), "{err}");
    let err = patched(|b, m| wr_u64(b, m.rec("norm").segs[0] + SEG_ROW_END, 15));
    assert!(matches!(err, FormatError::SegmentRows { row_end: 15, expected_end: 16, .. }), "{err}");
}

#[test]
fn segment_length_mismatch() {
    let err = patched(|b, m| {
        let at = m.rec(&names::layer(0, names::WV)).segs[0] + SEG_LEN;
        let l = rd_u64(b, at);
        wr_u64(b, at, l - 2);
    });
    assert!(matches!(err, FormatError::LengthMismatch { expected: 256, found: 254, .. }), "{err}");
}

#[test]
fn misaligned_segment() {
    let err = patched(|b, m| {
        let at = m.rec(&names::layer(0, names::WV)).segs[0] + SEG_OFFSET;
        let o = rd_u64(b, at);
        wr_u64(b, at, o + 2);
    });
    assert!(matches!(err, FormatError::Misaligned { offset, alignment: 4096, .. } if offset % 4096 == 2), "{err}");
}

#[test]
fn segment_out_of_bounds() {
    // Past the end of the file.
    let err = patched(|b, m| wr_u64(b, m.rec("lm_head").segs[0] + SEG_OFFSET, 1 << 40));
    assert!(matches!(err, FormatError::SegmentOutOfBounds { .. }), "{err}");
    // Offset + length overflows.
    let err = patched(|b, m| wr_u64(b, m.rec("lm_head").segs[0] + SEG_OFFSET, u64::MAX - 4095));
    assert!(matches!(err, FormatError::SegmentOutOfBounds { .. }), "{err}");
    // Inside the file, but in another level's bytes.
    let err = patched(|b, m| {
        let up = m.rec(&names::layer(0, names::FFN_UP));
        let off2 = rd_u64(b, up.segs[2] + SEG_OFFSET);
        wr_u64(b, m.rec("norm").segs[0] + SEG_OFFSET, off2);
    });
    assert!(matches!(&err, FormatError::SegmentOutOfBounds { tensor, level: 0, .. } if tensor == "norm"), "{err}");
    // Inside the header.
    let err = patched(|b, m| wr_u64(b, m.rec("norm").segs[0] + SEG_OFFSET, 0));
    assert!(matches!(err, FormatError::SegmentOutOfBounds { .. }), "{err}");
}

#[test]
fn overlapping_segments() {
    let err = patched(|b, m| {
        let up = m.rec(&names::layer(0, names::FFN_UP)).segs[0];
        let down = m.rec(&names::layer(0, names::FFN_DOWN_T)).segs[0];
        let off = rd_u64(b, up + SEG_OFFSET);
        wr_u64(b, down + SEG_OFFSET, off);
    });
    assert!(matches!(&err, FormatError::Overlap { a, b, .. } if a.contains("ffn_up") || b.contains("ffn_up")), "{err}");
}

// ---- verify ----

#[test]
fn segment_checksum_mismatch() {
    let mut b = valid();
    let v = FileView::parse(&b).unwrap();
    let t = v.tensor(&names::layer(1, names::FFN_DOWN_T)).unwrap();
    b[t.segments[2].offset as usize + 5] ^= 0x40;
    let v = FileView::parse(&b).expect("data is not read at parse");
    let err = v.verify(&b).unwrap_err();
    assert!(
        matches!(&err, FormatError::SegmentChecksum { tensor, level: 2, .. } if tensor == "layers.1.ffn_down_t"),
        "{err}"
    );
}

#[test]
fn stored_crc_changed_is_caught_by_verify() {
    let mut b = valid();
    let m = Map::of(&b);
    let at = m.rec("norm").segs[0] + SEG_CRC;
    let c = rd_u32(&b, at);
    wr_u32(&mut b, at, c ^ 1);
    reseal(&mut b);
    let v = FileView::parse(&b).unwrap();
    assert!(matches!(v.verify(&b).unwrap_err(), FormatError::SegmentChecksum { tensor, .. } if tensor == "norm"));
}

#[test]
fn nonzero_padding() {
    let mut b = valid();
    let v = FileView::parse(&b).unwrap();
    // Right after the header (alignment padding before level 0).
    let at = v.header_len as usize + 1;
    b[at] = 1;
    let err = FileView::parse(&b).unwrap().verify(&b).unwrap_err();
    assert!(matches!(err, FormatError::NonZeroPadding { offset } if offset == at as u64), "{err}");
    // Between two segments.
    let mut b = valid();
    let norm = v.tensor("layers.0.attn_norm").unwrap().segments[0].clone();
    let at = norm.end() as usize + 3;
    b[at] = 0x80;
    let err = FileView::parse(&b).unwrap().verify(&b).unwrap_err();
    assert!(matches!(err, FormatError::NonZeroPadding { offset } if offset == at as u64), "{err}");
}

#[test]
fn verify_with_other_bytes() {
    let b = valid();
    let v = FileView::parse(&b).unwrap();
    let err = v.verify(&b[..b.len() - 1]).unwrap_err();
    assert!(matches!(err, FormatError::FileLengthChanged { .. }), "{err}");
    // Same length, header changed.
    let mut c = b.clone();
    c[70] ^= 1;
    assert!(matches!(v.verify(&c).unwrap_err(), FormatError::HeaderChecksum { .. }));
    // segment_bytes on a too-short slice errors instead of panicking.
    let seg = &v.tensors.last().unwrap().segments[0];
    assert!(matches!(v.segment_bytes(&b[..100], seg), Err(FormatError::SegmentOutOfBounds { .. })));
}

#[test]
fn every_error_message_is_one_line() {
    // Smoke-check Display on a few constructed variants (the rest are exercised above).
    let errs = [
        FormatError::TruncatedInsideLevel { level: 2, level_start: 10, level_end: 20, len: 15 },
        FormatError::Overlap { a: "a".into(), b: "b".into(), offset: 3 },
        FormatError::FillNotDeterministic { tensor: "t".into(), row_start: 0, row_end: 1 },
    ];
    for e in errs {
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s}");
    }
}
