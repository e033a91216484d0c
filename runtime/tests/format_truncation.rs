//! The prefix property: a file cut at a level end is a complete smaller model; a cut anywhere
//! else is an error; appending the missing levels restores the full file.

mod format_common;

use format_common::*;
use matformer::format::{names, DType, FileView, FormatError};
use matformer::{ModelError, ModelFile};

#[test]
fn cut_at_each_level_boundary_is_a_smaller_model() {
    let (meta, _specs, bytes) = small_file(DType::F16);
    let full = FileView::parse(&bytes).unwrap();
    assert_eq!(full.n_levels(), 3);
    for j in 0..full.n_levels() {
        let end = full.level_ends[j] as usize;
        let cut = &bytes[..end];
        let view = FileView::parse(cut).unwrap();
        assert_eq!(view.available_levels, j + 1);
        assert_eq!(view.level_ends, full.level_ends, "the header always describes all levels");
        assert_eq!(view.metadata, meta);
        assert_eq!(view.file_len, end as u64);
        view.verify(cut).unwrap();
        for (t, ft) in view.tensors.iter().zip(&full.tensors) {
            assert_eq!(t, ft);
            for s in &t.segments {
                if (s.level as usize) <= j {
                    assert_eq!(view.segment_bytes(cut, s).unwrap(), full.segment_bytes(&bytes, s).unwrap());
                } else {
                    let err = view.segment_bytes(cut, s).unwrap_err();
                    assert!(
                        matches!(err, FormatError::LevelNotAvailable { level, available } if level == s.level as usize && available == j + 1),
                        "{err}"
                    );
                }
            }
        }
        // Every level region ends exactly where the next begins.
        let r = view.level_range(j).unwrap();
        assert_eq!(r.end, end as u64);
        if j > 0 {
            assert_eq!(r.start, full.level_ends[j - 1]);
        } else {
            assert_eq!(r.start, full.header_len);
        }
    }
    assert!(full.level_range(3).is_none());
}

#[test]
fn cut_anywhere_else_is_an_error() {
    let (_meta, _specs, bytes) = small_file(DType::F16);
    let full = FileView::parse(&bytes).unwrap();
    let header_len = full.header_len as usize;
    for len in 0..=bytes.len() {
        let cut = &bytes[..len];
        let res = FileView::parse(cut);
        if let Some(j) = full.level_ends.iter().position(|&e| e == len as u64) {
            assert_eq!(res.unwrap().available_levels, j + 1);
            continue;
        }
        let err = res.unwrap_err();
        match err {
            FormatError::Truncated { what: "preamble", needed: 64, .. } => assert!(len < 64),
            FormatError::Truncated { what: "header", needed, .. } => {
                assert!(len >= 64 && len < header_len && needed == full.header_len)
            }
            FormatError::Truncated { what: "level 0", needed, .. } => {
                assert!(len >= header_len && needed == full.level_ends[0])
            }
            FormatError::TruncatedInsideLevel { level, level_start, level_end, len: l } => {
                assert_eq!(l, len as u64);
                assert_eq!(level_start, full.level_ends[level - 1]);
                assert_eq!(level_end, full.level_ends[level]);
                assert!(level_start < l && l < level_end);
            }
            other => panic!("cut at {len}: unexpected error {other}"),
        }
        // The header-only entry point agrees.
        let res2 = FileView::parse_header(&bytes, len as u64);
        assert_eq!(res2.unwrap_err().to_string(), FileView::parse(cut).unwrap_err().to_string());
    }
}

#[test]
fn appending_levels_restores_the_full_file() {
    let (_meta, _specs, bytes) = small_file(DType::F32);
    let full = FileView::parse(&bytes).unwrap();
    let mut shipped = bytes[..full.level_ends[0] as usize].to_vec();
    for j in 1..full.n_levels() {
        let r = full.level_range(j).unwrap();
        shipped.extend_from_slice(&bytes[r.start as usize..r.end as usize]);
        let v = FileView::parse(&shipped).unwrap();
        assert_eq!(v.available_levels, j + 1);
        v.verify(&shipped).unwrap();
    }
    assert_eq!(shipped, bytes);
}

#[test]
fn model_file_on_a_cut_file() {
    let (_meta, _specs, bytes) = small_file(DType::F16);
    let full = FileView::parse(&bytes).unwrap();
    let cut = bytes[..full.level_ends[1] as usize].to_vec();
    let m = ModelFile::from_bytes(cut).unwrap();
    assert_eq!(m.view().available_levels, 2);
    m.verify().unwrap();
    // Layer 0 widths 8, 16, 32: rows up to 16 are present, beyond are not.
    let name = names::layer(0, names::FFN_GATE);
    let segs = m.tensor_segments(&name, 16).unwrap();
    assert_eq!(segs.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 8]);
    let err = m.tensor_segments(&name, 17).unwrap_err();
    assert!(matches!(err, ModelError::Format(FormatError::LevelNotAvailable { level: 2, available: 2 })), "{err}");
    assert!(m.tensor_f32(&name).is_err());
    assert_eq!(m.tensor_f32(names::TOK_EMBEDDINGS).unwrap().len(), 260 * 16);
    // On disk too.
    let path = std::env::temp_dir().join(format!("matf-cut-{}.matf", std::process::id()));
    std::fs::write(&path, &bytes[..full.level_ends[0] as usize]).unwrap();
    let m = ModelFile::open(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(m.view().available_levels, 1);
    m.verify().unwrap();
}
