//! Fuzz target for the `.matf` reader: `FileView::parse` and `verify` must never panic, never
//! read out of bounds, and uphold their guarantees on whatever they accept.
//!
//! Block-quantised tensors (`q8_0`, `q4_0`, `q4_1`) must be whole blocks per row and decode.
//!
//! Each input is tried three ways:
//! 1. as a whole file;
//! 2. with its header CRC re-sealed, so mutations reach the checks behind the checksum;
//! 3. as a header only (`parse_header`) with the file length taken from its own level table, so
//!    small inputs exercise the table and placement checks without carrying megabytes of data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matformer::format::{testing::refresh_header_crc, FileView};
use matformer::ModelFile;

fuzz_target!(|data: &[u8]| {
    whole_file(data);
    if data.len() >= 64 {
        let mut sealed = data.to_vec();
        if refresh_header_crc(&mut sealed) {
            whole_file(&sealed);
            header_only(&sealed);
        }
    }
});

fn whole_file(data: &[u8]) {
    let Ok(view) = FileView::parse(data) else {
        return;
    };
    // What a successful parse promises.
    assert!(view.available_levels >= 1 && view.available_levels <= view.level_ends.len());
    assert_eq!(view.level_ends[view.available_levels - 1], data.len() as u64);
    assert!(view.header_len <= data.len() as u64);
    assert_eq!(view.metadata.n_levels(), view.level_ends.len());
    for t in &view.tensors {
        assert_eq!(view.tensor(&t.name).map(|x| x.name.as_str()).ok(), Some(t.name.as_str()));
        for s in &t.segments {
            assert_eq!(s.offset % view.alignment, 0);
            if (s.level as usize) < view.available_levels {
                let bytes = view.segment_bytes(data, s).expect("validated segment is in bounds");
                assert_eq!(bytes.len() as u64, s.byte_len);
            } else {
                assert!(view.segment_bytes(data, s).is_err());
            }
        }
    }
    let _ = view.verify(data);
    // The header-only entry point agrees with the whole-file one.
    let head = &data[..view.header_len as usize];
    assert_eq!(FileView::parse_header(head, data.len() as u64).ok().as_ref(), Some(&view));
    // ModelFile goes through the same checks.
    let model = ModelFile::from_bytes(data.to_vec()).expect("parsed once, parses again");
    for t in &view.tensors {
        let _ = model.tensor_segments(&t.name, t.rows());
        // Block-quantised tensors: whole 32-element blocks per row, and every row decodes
        // (hostile scales and nibbles give any f32, never a panic).
        if t.dtype.is_quantized() {
            assert!(t.shape.len() >= 2 && t.row_elems() % 32 == 0, "{}: {:?}", t.name, t.shape);
            assert_eq!(Some(t.row_bytes()), t.dtype.row_bytes(t.row_elems()));
        }
        if t.n_elements() <= 1 << 16 && t.segments.iter().all(|s| (s.level as usize) < view.available_levels) {
            let v = model.tensor_f32(&t.name).expect("available tensor decodes");
            assert_eq!(v.len() as u64, t.n_elements());
        }
    }
}

fn header_only(data: &[u8]) {
    let n_levels = u32::from_le_bytes([data[12], data[13], data[14], data[15]]) as usize;
    if n_levels == 0 {
        return;
    }
    // Claim the file ends at one of the level ends listed in the header.
    let j = (data.len() + usize::from(data[data.len() - 1])) % n_levels.min(16);
    let at = 64 + 8 * j;
    let Some(end) = data.get(at..at + 8) else {
        return;
    };
    let file_len = u64::from_le_bytes(end.try_into().unwrap_or([0; 8]));
    if let Ok(view) = FileView::parse_header(data, file_len) {
        assert_eq!(view.available_levels, j + 1);
        assert_eq!(view.file_len, file_len);
        assert!(view.header_len <= data.len() as u64);
    }
}
