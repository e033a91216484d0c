//! Writer -> reader round trips, the layout rules, `ModelFile`, and writer-side validation.

mod format_common;

use format_common::*;
use matformer::format::{
    self, names, plan_layout, plan_layout_with_alignment, required_tensor_specs,
    testing::{synthetic_file, synthetic_metadata},
    write_file, DType, FileView, FormatError, NormKind, TensorSpec,
};
use matformer::{ModelError, ModelFile};

fn check_roundtrip(meta: &format::Metadata, dtype: DType, log2: u32) {
    let specs = required_tensor_specs(meta, dtype);
    let bytes = write(meta, &specs, log2, 11);
    let view = FileView::parse(&bytes).expect("parse");
    view.verify(&bytes).expect("verify");

    assert_eq!(view.version, 1);
    assert_eq!(view.alignment, 1 << log2);
    assert_eq!(&view.metadata, meta);
    assert_eq!(view.available_levels, meta.n_levels());
    assert_eq!(view.file_len, bytes.len() as u64);
    assert_eq!(*view.level_ends.last().unwrap(), bytes.len() as u64);
    assert_eq!(view.tensors.len(), specs.len());

    // Same layout as planned, apart from checksums.
    let mut planned = plan_layout_with_alignment(meta, &specs, log2).unwrap();
    let mut parsed = view.clone();
    for t in planned.tensors.iter_mut().chain(parsed.tensors.iter_mut()) {
        for s in &mut t.segments {
            s.crc32 = 0;
        }
    }
    assert_eq!(planned, parsed);

    for (spec, t) in specs.iter().zip(&view.tensors) {
        assert_eq!(spec.name, t.name, "table order is spec order");
        assert_eq!(spec.shape, t.shape);
        assert_eq!(spec.dtype, t.dtype);
        assert_eq!(view.tensor(&t.name).unwrap(), t);
        // Segment bytes concatenated == the tensor's bytes.
        let mut all = Vec::new();
        for s in &t.segments {
            assert_eq!(s.offset % view.alignment, 0);
            all.extend_from_slice(view.segment_bytes(&bytes, s).unwrap());
        }
        assert_eq!(all, spec_bytes(11, spec), "{}", t.name);
        // Nested layout.
        if t.is_nested() {
            assert_eq!(t.segments.len(), meta.n_levels());
            let layer: usize = t.name.split('.').nth(1).unwrap().parse().unwrap();
            let mut prev = 0u64;
            for (j, s) in t.segments.iter().enumerate() {
                assert_eq!(s.level as usize, j);
                assert_eq!((s.row_start, s.row_end), (prev, u64::from(meta.ffn_widths[layer][j])));
                prev = s.row_end;
                let range = view.level_range(j).unwrap();
                assert!(s.offset >= range.start && s.end() <= range.end);
            }
        } else {
            assert_eq!(t.segments.len(), 1);
            assert_eq!(t.segments[0].level, 0);
            assert_eq!((t.segments[0].row_start, t.segments[0].row_end), (0, t.rows()));
        }
    }
    for j in 0..meta.n_levels() {
        assert_eq!(view.level_widths(j), meta.ffn_widths.iter().map(|w| w[j]).collect::<Vec<_>>());
    }
    assert!(view.level_widths(meta.n_levels()).is_empty());
}

#[test]
fn roundtrip_f32_and_f16_at_several_alignments() {
    let meta = small_meta();
    for dtype in [DType::F32, DType::F16] {
        for log2 in [12, 14, 16] {
            check_roundtrip(&meta, dtype, log2);
        }
    }
}

#[test]
fn roundtrip_variants_tied_ungated_layernorm_many_levels() {
    // Tied, not gated.
    let meta = synthetic_metadata(8, 3, 2, 2, 4, 256, vec![vec![4, 8]], false, true);
    check_roundtrip(&meta, DType::F16, 12);
    // LayerNorm (bias tensors), one level.
    let mut meta = synthetic_metadata(8, 1, 2, 1, 4, 300, vec![vec![12]], false, false);
    meta.architecture.norm = NormKind::LayerNorm;
    check_roundtrip(&meta, DType::F32, 12);
    let specs = required_tensor_specs(&meta, DType::F32);
    for n in
        [names::NORM_BIAS.to_string(), names::layer(0, names::ATTN_NORM_BIAS), names::layer(0, names::FFN_NORM_BIAS)]
    {
        assert!(specs.iter().any(|s| s.name == n), "{n}");
    }
    // Sixteen levels (the maximum).
    let widths: Vec<u32> = (1..=16).collect();
    let meta = synthetic_metadata(8, 2, 2, 2, 4, 256, vec![widths], true, false);
    assert_eq!(meta.level_names[15], "w15");
    check_roundtrip(&meta, DType::F16, 12);
}

#[test]
fn canonical_tensor_order() {
    let meta = small_meta();
    let names: Vec<String> = required_tensor_specs(&meta, DType::F16).into_iter().map(|s| s.name).collect();
    let mut want = vec!["tok_embeddings".to_string()];
    for i in 0..2 {
        for s in ["attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down_t"] {
            want.push(format!("layers.{i}.{s}"));
        }
    }
    want.push("norm".into());
    want.push("lm_head".into());
    assert_eq!(names, want);
    let specs = required_tensor_specs(&meta, DType::F16);
    assert_eq!(specs[1 + 1].shape, vec![16, 16]); // wq [n_heads*head_dim, d_model]
    assert_eq!(specs[1 + 2].shape, vec![8, 16]); // wk [n_kv*head_dim, d_model]
    assert_eq!(specs[1 + 4].shape, vec![16, 16]); // wo
    assert_eq!(specs[1 + 6].shape, vec![32, 16]); // layer 0 ffn_gate
    assert_eq!(specs[10 + 8].shape, vec![24, 16]); // layer 1 ffn_down_t
}

#[test]
fn extra_metadata_keys_are_preserved() {
    let mut meta = small_meta();
    meta.extra.insert("catalog".into(), serde_json::json!([{"name": "s", "levels": [0, 0]}]));
    meta.extra.insert("selftest".into(), serde_json::json!({"prompt": [1, 2, 3], "top1": 42}));
    meta.extra.insert("zz_future".into(), serde_json::json!(null));
    let specs = required_tensor_specs(&meta, DType::F16);
    let bytes = write(&meta, &specs, 12, 1);
    let view = FileView::parse(&bytes).unwrap();
    assert_eq!(view.metadata, meta);
    assert_eq!(view.metadata.extra.len(), 3);
    assert_eq!(view.metadata.extra["selftest"]["top1"], 42);
}

#[test]
fn default_alignment_and_header_only_parse() {
    let meta = small_meta();
    let bytes = synthetic_file(&meta, DType::F16, 3).unwrap();
    let view = FileView::parse(&bytes).unwrap();
    assert_eq!(view.alignment, 1 << format::DEFAULT_ALIGNMENT_LOG2);
    view.verify(&bytes).unwrap();
    // Only the header in memory: same view.
    let head = &bytes[..view.header_len as usize];
    let v2 = FileView::parse_header(head, bytes.len() as u64).unwrap();
    assert_eq!(v2, view);
    // One byte short of the header is not enough.
    let err = FileView::parse_header(&head[..head.len() - 1], bytes.len() as u64).unwrap_err();
    assert!(matches!(err, FormatError::Truncated { what: "header", .. }), "{err}");
    // Deterministic output.
    assert_eq!(synthetic_file(&meta, DType::F16, 3).unwrap(), bytes);
    assert_ne!(synthetic_file(&meta, DType::F16, 4).unwrap(), bytes);
}

#[test]
fn writer_calls_progress_and_chunks_large_segments() {
    // 8192 x 256 f32 = 8 MiB embedding: split into chunks of at most 4 MiB.
    let meta = synthetic_metadata(256, 1, 2, 2, 4, 8192, vec![vec![8, 16]], false, true);
    let specs = required_tensor_specs(&meta, DType::F32);
    let mut calls = Vec::new();
    let mut last = (0, 0);
    let len = write_file(
        std::io::sink(),
        &meta,
        &specs,
        |ti, rows, buf| {
            calls.push((ti, rows.clone()));
            let row_elems: u64 = specs[ti].shape.iter().skip(1).product();
            buf.resize(((rows.end - rows.start) * row_elems * 4) as usize, 0);
            Ok(())
        },
        |done, total| {
            assert!(done <= total && done >= last.0);
            last = (done, total);
        },
    )
    .unwrap();
    assert_eq!(last, (2 * len, 2 * len), "progress covers both passes");
    let emb: Vec<_> = calls.iter().filter(|(ti, _)| *ti == 0).collect();
    assert_eq!(emb.len(), 4, "two chunks, two passes: {emb:?}");
    assert_eq!(emb[0].1, 0..4096);
    assert_eq!(emb[1].1, 4096..8192);
}

#[test]
fn model_file_open_from_bytes_and_segments() {
    let (meta, specs, bytes) = small_file(DType::F16);
    let dir = std::env::temp_dir();
    let path = dir.join(format!("matf-roundtrip-{}.matf", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let opened = ModelFile::open(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let owned = ModelFile::from_bytes(bytes.clone()).unwrap();
    for m in [&opened, &owned] {
        assert_eq!(m.bytes(), &bytes[..]);
        assert_eq!(m.metadata(), &meta);
        assert_eq!(m.view().tensors.len(), specs.len());
        m.verify().unwrap();
        assert_eq!(m.bytes().as_ptr() as usize % 16, 0, "storage is aligned");
        // Shared tensor decoded.
        let spec = &specs[0];
        let got = m.tensor_f32(&spec.name).unwrap();
        let want7: Vec<f32> =
            spec_bytes(7, spec).chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        assert_eq!(got, want7);
        // Nested tensor: rows [0, 12) of layer 1 span levels 0 (4 rows) and 1 (8 rows).
        let name = names::layer(1, names::FFN_UP);
        let segs = m.tensor_segments(&name, 12).unwrap();
        assert_eq!(segs.len(), 2);
        assert_eq!((segs[0].0, segs[0].1.len()), (0, 4 * 16 * 2));
        assert_eq!((segs[1].0, segs[1].1.len()), (4, 8 * 16 * 2));
        // Cut inside a segment.
        let segs = m.tensor_segments(&name, 6).unwrap();
        assert_eq!((segs[1].0, segs[1].1.len()), (4, 2 * 16 * 2));
        assert!(m.tensor_segments(&name, 0).unwrap().is_empty());
        assert!(matches!(m.tensor_segments(&name, 25), Err(ModelError::RowsOutOfRange { .. })));
        assert!(matches!(m.tensor_segments("nope", 1), Err(ModelError::Format(FormatError::MissingTensor { .. }))));
        let full = m.tensor_f32(&name).unwrap();
        assert_eq!(full.len(), 24 * 16);
    }
    assert_eq!(opened.path(), Some(path.as_path()));
    assert_eq!(owned.path(), None);
    assert!(format!("{opened:?}").contains("ModelFile"));
}

#[test]
fn model_file_open_errors() {
    let err = ModelFile::open("/nonexistent/dir/model.matf").unwrap_err();
    assert!(matches!(err, ModelError::Open { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/dir/model.matf"));
    // An empty file is a truncated preamble, not a crash.
    let path = std::env::temp_dir().join(format!("matf-empty-{}.matf", std::process::id()));
    std::fs::write(&path, b"").unwrap();
    let err = ModelFile::open(&path).unwrap_err();
    std::fs::remove_file(&path).ok();
    assert!(matches!(err, ModelError::Format(FormatError::Truncated { what: "preamble", .. })), "{err}");
    let err = ModelFile::from_bytes(b"GGUF".to_vec()).unwrap_err();
    assert!(matches!(err, ModelError::Format(FormatError::BadMagic { .. })), "{err}");
}

// ---- writer-side validation (same checks as the reader) ----

fn write_err(meta: &format::Metadata, specs: &[TensorSpec]) -> FormatError {
    let err = plan_layout(meta, specs).unwrap_err();
    let err2 = write_file(std::io::sink(), meta, specs, |_, _, _| Ok(()), |_, _| {}).unwrap_err();
    assert_eq!(err.to_string(), err2.to_string());
    err
}

#[test]
fn writer_rejects_bad_tensor_sets() {
    let meta = small_meta();
    let specs = required_tensor_specs(&meta, DType::F16);

    let mut s = specs.clone();
    s.pop();
    assert!(matches!(write_err(&meta, &s), FormatError::MissingTensor { name } if name == "lm_head"));

    let mut s = specs.clone();
    s.push(TensorSpec { name: "layers.9.wq".into(), dtype: DType::F16, shape: vec![16, 16] });
    assert!(matches!(write_err(&meta, &s), FormatError::UnexpectedTensor { .. }));

    let mut s = specs.clone();
    s.push(specs[3].clone());
    assert!(matches!(write_err(&meta, &s), FormatError::DuplicateTensor { .. }));

    let mut s = specs.clone();
    s[2].shape = vec![16, 17];
    assert!(matches!(write_err(&meta, &s), FormatError::BadShape { .. }));

    let mut s = specs.clone();
    s[2].shape = vec![1 << 30, 1 << 30];
    assert!(matches!(write_err(&meta, &s), FormatError::AbsurdSize { .. }));

    assert!(matches!(write_err(&meta, &[]), FormatError::BadCount { what: "n_tensors", .. }));

    let mut bad = meta.clone();
    bad.ffn_widths[1] = vec![4, 4, 24];
    assert!(matches!(write_err(&bad, &specs), FormatError::BadMetadata { .. }));

    let err = plan_layout_with_alignment(&meta, &specs, 11).unwrap_err();
    assert!(matches!(err, FormatError::BadAlignment { log2: 11 }));
}

#[test]
fn writer_checks_fill() {
    let meta = small_meta();
    let specs = required_tensor_specs(&meta, DType::F16);
    // Wrong length.
    let err = write_file(
        std::io::sink(),
        &meta,
        &specs,
        |ti, rows, buf| {
            spec_rows(1, &specs[ti], rows, buf);
            if ti == 5 {
                buf.push(0);
            }
            Ok(())
        },
        |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(&err, FormatError::LengthMismatch { tensor, .. } if *tensor == specs[5].name), "{err}");
    // Different bytes on the second pass.
    let mut calls = 0u32;
    let err = write_file(
        std::io::sink(),
        &meta,
        &specs,
        |ti, rows, buf| {
            spec_rows(1, &specs[ti], rows, buf);
            if ti == 4 {
                calls += 1;
                if calls == 2 {
                    buf[0] ^= 1;
                }
            }
            Ok(())
        },
        |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, FormatError::FillNotDeterministic { .. }), "{err}");
    // Errors from fill propagate.
    let err = write_file(
        std::io::sink(),
        &meta,
        &specs,
        |_, _, _| Err(FormatError::MissingTensor { name: "from fill".into() }),
        |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, FormatError::MissingTensor { name } if name == "from fill"));
    // I/O errors.
    struct Broken;
    impl std::io::Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let err = write_file(
        Broken,
        &meta,
        &specs,
        |ti, rows, buf| {
            spec_rows(1, &specs[ti], rows, buf);
            Ok(())
        },
        |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, FormatError::Io(_)), "{err}");
    assert!(err.to_string().contains("disk full"));
}

#[test]
fn dtype_codes_and_names() {
    for d in DType::ALL {
        assert_eq!(DType::from_code(d.code()), Some(d));
        assert_eq!(DType::from_name(d.name()), Some(d));
        assert_eq!(d.to_string(), d.name());
    }
    let codes: Vec<u8> = DType::ALL.iter().map(|d| d.code()).collect();
    assert_eq!(codes, [0, 1, 2, 3, 5]);
    assert_eq!(DType::F32.size_bytes(), 4);
    assert_eq!(DType::F16.size_bytes(), 2);
    assert_eq!([DType::Q8_0, DType::Q4_0, DType::Q4_1].map(|d| d.block_bytes()), [34, 18, 20]);
    assert_eq!(DType::from_code(4), None, "the blob code is not a tensor dtype");
    assert_eq!(DType::from_code(6), None);
    assert_eq!(DType::from_name("q8"), Some(DType::Q8_0));
    assert_eq!(DType::from_name("q4"), Some(DType::Q4_0));
    assert_eq!(DType::from_name("q5_0"), None);
}
