//! Fuzz target for the stored tokenizer: arbitrary bytes as a `tokenizer.json`, loaded both
//! directly and through a `.matf` that stores them as `blob.tokenizer_json` (written with the
//! real writer, then opened, parsed and CRC-checked as an app would). Loading must fail with an
//! error or succeed; a loaded tokenizer must encode, decode and stream-decode without panicking,
//! and streaming must equal the full decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matformer::format::testing::{synthetic_file_with_blobs, synthetic_metadata};
use matformer::format::{BlobSpec, DType, HF_TOKENIZER_KIND, TOKENIZER_JSON_BLOB};
use matformer::tokenizer::{SpecialTokens, Tokenizer};
use matformer::ModelFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(tok) = Tokenizer::from_json(data, SpecialTokens::default()) {
        exercise(&tok, data);
    }
    through_the_format(data);
});

fn exercise(tok: &Tokenizer, data: &[u8]) {
    let text = String::from_utf8_lossy(&data[..data.len().min(64)]);
    for s in ["", "Hello  world\n", "café 😀 <s>", text.as_ref()] {
        if let Ok(ids) = tok.encode(s, true) {
            let _ = tok.decode(&ids, false);
            stream_equals_full(tok, &ids);
        }
    }
    // Arbitrary ids, in and out of the vocabulary.
    let ids: Vec<u32> =
        data.chunks(2).take(64).map(|c| u32::from(c[0]) | (u32::from(*c.get(1).unwrap_or(&0)) << 8)).collect();
    stream_equals_full(tok, &ids);
    let _ = (tok.vocab_size(), tok.eos_ids(), tok.bos_id(), ids.iter().map(|&i| tok.is_special(i)).count());
}

fn stream_equals_full(tok: &Tokenizer, ids: &[u32]) {
    let full = tok.decode(ids, true);
    let mut dec = tok.stream_decoder();
    let mut out = String::new();
    for &id in ids {
        out.push_str(&dec.push(id));
    }
    out.push_str(&dec.flush());
    assert_eq!(out, full, "stream decode differs from full decode for {ids:?}");
}

fn through_the_format(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    // The smallest model (d_model 2, one layer) with room for 2048 ids keeps each execution
    // about writing, parsing and loading the blob, not about synthetic weights.
    let mut meta = synthetic_metadata(2, 1, 1, 1, 2, 2048, vec![vec![2]], false, true);
    meta.tokenizer.kind = HF_TOKENIZER_KIND.to_string();
    meta.tokenizer.bos_id = None;
    meta.tokenizer.eos_id = None;
    let blobs = [BlobSpec { id: TOKENIZER_JSON_BLOB, bytes: data }];
    let bytes = synthetic_file_with_blobs(&meta, DType::F32, 1, &blobs, 12).expect("a valid file is written");
    let model = ModelFile::from_bytes(bytes).expect("the written file parses");
    assert_eq!(model.blob(TOKENIZER_JSON_BLOB).expect("checksum holds"), Some(data));
    if let Ok(tok) = Tokenizer::from_model(&model) {
        assert!(tok.vocab_size() <= 2048);
        exercise(&tok, data);
    }
}
