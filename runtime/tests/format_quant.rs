//! Block-quantised tensors in the file: a dtype per tensor round-trips and verifies, every level
//! prefix of a quantised nested tensor is the quantised prefix rows, and hostile dtype fields
//! (a quantised 1-D tensor, rows that are not whole blocks, a block type whose size does not
//! match the segment lengths, unknown codes) are refused with specific errors.

mod format_common;

use format_common::*;
use matformer::format::testing::{synthetic_metadata, synthetic_value};
use matformer::format::{names, plan_layout, DType, FileView, FormatError, Metadata, TensorSpec};
use matformer::quant::encode_row;
use matformer::ModelFile;

/// d_model 64, 2 layers, 3 levels, gated, untied.
fn meta() -> Metadata {
    synthetic_metadata(64, 2, 4, 2, 16, 260, vec![vec![16, 48, 96], vec![32, 64, 128]], true, false)
}

/// Embeddings q8_0, attention q4_1, FFN q4_0, LM head q8_0, norms f16.
fn mixed_specs(meta: &Metadata) -> Vec<TensorSpec> {
    let mut specs = matformer::format::required_tensor_specs(meta, DType::F16);
    for s in &mut specs {
        if s.shape.len() == 2 {
            s.dtype = match s.name.as_str() {
                names::TOK_EMBEDDINGS | names::LM_HEAD => DType::Q8_0,
                n if n.contains("ffn") => DType::Q4_0,
                _ => DType::Q4_1,
            };
        }
    }
    specs
}

fn valid() -> (Metadata, Vec<TensorSpec>, Vec<u8>) {
    let m = meta();
    let specs = mixed_specs(&m);
    let bytes = write(&m, &specs, 12, 5);
    (m, specs, bytes)
}

#[test]
fn a_dtype_per_tensor_round_trips_and_verifies() {
    let (_, specs, bytes) = valid();
    let view = FileView::parse(&bytes).expect("parse");
    view.verify(&bytes).expect("verify");
    for s in &specs {
        let t = view.tensor(&s.name).unwrap();
        assert_eq!(t.dtype, s.dtype, "{}", s.name);
        let row = s.shape.iter().skip(1).product::<u64>();
        assert_eq!(t.row_bytes(), s.dtype.row_bytes(row).unwrap());
        let total: u64 = t.segments.iter().map(|g| g.byte_len).sum();
        assert_eq!(total, t.rows() * t.row_bytes(), "{}", s.name);
    }
    // Codes in the table: 2 (q8_0), 3 (q4_0), 5 (q4_1), 1 (f16).
    let map = Map::of(&bytes);
    assert_eq!(bytes[map.rec(names::TOK_EMBEDDINGS).dtype_at], 2);
    assert_eq!(bytes[map.rec("layers.0.ffn_up").dtype_at], 3);
    assert_eq!(bytes[map.rec("layers.0.wq").dtype_at], 5);
    assert_eq!(bytes[map.rec("layers.0.attn_norm").dtype_at], 1);
}

#[test]
fn each_level_prefix_of_a_quantised_tensor_is_the_quantised_prefix() {
    let (m, specs, bytes) = valid();
    let model = ModelFile::from_bytes(bytes.clone()).unwrap();
    for name in ["layers.0.ffn_up", "layers.1.ffn_down_t", "layers.1.ffn_gate"] {
        let spec = specs.iter().find(|s| s.name == name).unwrap();
        let cols = spec.shape[1];
        for k in [1u64, 16, 17, 32, 64, spec.shape[0]] {
            // The first k rows as the reader returns them, across level segments.
            let got: Vec<u8> =
                model.tensor_segments(name, k).unwrap().into_iter().flat_map(|(_, b)| b.to_vec()).collect();
            // The k-row tensor quantised on its own.
            let mut want = Vec::new();
            for r in 0..k {
                let row: Vec<f32> = (r * cols..(r + 1) * cols).map(|i| synthetic_value(5, spec, i)).collect();
                encode_row(spec.dtype, &row, &mut want).unwrap();
            }
            assert_eq!(got, want, "{name}: first {k} rows");
        }
    }
    // A file cut after level 0 is a valid smaller model holding the same bytes.
    let view = FileView::parse(&bytes).unwrap();
    let cut = &bytes[..view.level_ends[0] as usize];
    let small = FileView::parse(cut).expect("cut parses");
    assert_eq!(small.available_levels, 1);
    small.verify(cut).expect("cut verifies");
    let _ = m;
}

/// Patches one record's dtype code (re-sealed) and returns the parse error.
fn with_code(name: &str, code: u8) -> FormatError {
    let (_, _, mut b) = valid();
    let map = Map::of(&b);
    b[map.rec(name).dtype_at] = code;
    reseal(&mut b);
    FileView::parse(&b).expect_err("hostile file parsed")
}

#[test]
fn hostile_dtype_fields_are_refused() {
    // A norm (1-D: one-element rows) claiming a block type.
    for code in [2u8, 3, 5] {
        let err = with_code("layers.0.attn_norm", code);
        assert!(matches!(err, FormatError::BlockAlignment { row_elems: 1, block: 32, .. }), "{code}: {err}");
    }
    // A block type of another size than the one the segment lengths were written for.
    for (name, code) in [("layers.0.ffn_up", 5u8), ("layers.0.ffn_up", 2), ("layers.0.wq", 3), ("tok_embeddings", 1)] {
        let err = with_code(name, code);
        assert!(matches!(&err, FormatError::LengthMismatch { tensor, .. } if tensor == name), "{name} {code}: {err}");
    }
    // Unknown and blob codes.
    for code in [6u8, 7, 200, 255] {
        assert!(matches!(with_code("layers.0.wk", code), FormatError::UnknownDType { .. }), "{code}");
    }
    assert!(matches!(with_code("layers.0.wk", 4), FormatError::BadBlob { .. }));
    // Rows that are not whole blocks: a 16-wide model whose matrices claim q8_0.
    let (_, _, mut b) = small_file(DType::F16);
    let map = Map::of(&b);
    b[map.rec("layers.0.wq").dtype_at] = 2;
    reseal(&mut b);
    let err = FileView::parse(&b).expect_err("parsed");
    assert!(matches!(err, FormatError::BlockAlignment { row_elems: 16, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("q8_0") && msg.contains("multiple of the 32-element block"), "{msg}");
}

#[test]
fn the_writer_refuses_what_the_reader_would() {
    let m = meta();
    let mut specs = mixed_specs(&m);
    let norm = specs.iter_mut().find(|s| s.name == "norm").unwrap();
    norm.dtype = DType::Q4_0;
    assert!(matches!(plan_layout(&m, &specs), Err(FormatError::BlockAlignment { .. })));
    let small = synthetic_metadata(16, 1, 2, 1, 8, 256, vec![vec![8]], false, true);
    let specs = matformer::format::required_tensor_specs(&small, DType::Q8_0);
    assert!(matches!(plan_layout(&small, &specs), Err(FormatError::BlockAlignment { .. })));
}
