//! The stored tokenizer (docs/format.md 5.5): a `.matf` written with [`TokenizerAssets`] opens
//! in O(header), its tokenizer and chat template load from the file, the blob is covered by
//! verification and by its own checksum on load, old files (no blobs) are unchanged, and every
//! malformed blob record gets its specific error.

use std::path::PathBuf;

use matformer::format::testing::{refresh_header_crc, synthetic_file, synthetic_file_with_blobs, synthetic_metadata};
use matformer::format::{
    plan_layout_with_blobs, required_tensor_specs, BlobSpec, DType, FileView, FormatError, Metadata,
    TOKENIZER_JSON_BLOB,
};
use matformer::tokenizer::{ChatMessage, ChatTemplate, SpecialTokens, Tokenizer, TokenizerAssets, TokenizerError};
use matformer::ModelFile;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}</s>\n{% endfor %}\
{% if add_generation_prompt %}<|assistant|>{% endif %}";

fn assets() -> TokenizerAssets {
    TokenizerAssets {
        tokenizer_json: std::fs::read(fixtures().join("tokenizers/llama_sp.tokenizer.json")).unwrap(),
        chat_template: Some(TEMPLATE.to_string()),
        special: SpecialTokens {
            bos: Some("<s>".into()),
            eos: Some("</s>".into()),
            unk: Some("<unk>".into()),
            add_bos: true,
            ..Default::default()
        },
    }
}

/// 2 layers, 3 levels, vocabulary 704 (the tokenizer has 700 ids), 4 KiB alignment.
fn meta() -> Metadata {
    synthetic_metadata(16, 2, 4, 2, 4, 704, vec![vec![8, 16, 32]], true, false)
}

fn file_with_tokenizer() -> (Metadata, Vec<u8>) {
    let mut m = meta();
    let a = assets();
    a.apply_to(&mut m).expect("assets apply");
    let bytes = synthetic_file_with_blobs(&m, DType::F16, 3, &a.blobs(), 12).expect("write");
    (m, bytes)
}

#[test]
fn tokenizer_and_template_round_trip_through_the_file() {
    let (m, bytes) = file_with_tokenizer();
    assert_eq!(m.tokenizer.kind, "huggingface");
    assert_eq!((m.tokenizer.bos_id, m.tokenizer.eos_id), (Some(1), Some(2)));
    let view = FileView::parse(&bytes).unwrap();
    view.verify(&bytes).unwrap();
    assert_eq!(view.blobs.len(), 1);
    let blob = view.blob(TOKENIZER_JSON_BLOB).unwrap();
    assert_eq!(blob.segment.level, 0);
    assert_eq!(blob.segment.offset % view.alignment, 0);
    assert!(blob.segment.end() <= view.level_ends[0], "the tokenizer is part of level 0");
    assert_eq!(view.blob_bytes(&bytes, TOKENIZER_JSON_BLOB).unwrap().unwrap(), &assets().tokenizer_json[..]);

    let model = ModelFile::from_bytes(bytes.clone()).unwrap();
    let tok = Tokenizer::from_model(&model).unwrap();
    let direct = Tokenizer::from_json(&assets().tokenizer_json, assets().special).unwrap();
    for text in ["Hello  world", "café 😀", "<s>x</s>"] {
        assert_eq!(tok.encode(text, true).unwrap(), direct.encode(text, true).unwrap());
    }
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), vec![2]);
    assert!(tok.adds_bos());
    let t = ChatTemplate::from_model(&model).unwrap().expect("a template");
    assert_eq!(t.source(), TEMPLATE);
    let out = t.render(&[ChatMessage::new("user", " hi ")], true).unwrap();
    assert_eq!(out, "<s><|user|>hi</s>\n<|assistant|>");

    // A file cut after level 0 still holds the tokenizer.
    let cut = bytes[..view.level_ends[0] as usize].to_vec();
    let small = ModelFile::from_bytes(cut).unwrap();
    assert_eq!(small.view().available_levels, 1);
    assert!(matches!(Tokenizer::from_model(&small).unwrap(), Tokenizer::Hf(_)));
}

#[test]
fn a_changed_tokenizer_byte_is_detected() {
    let (_, mut bytes) = file_with_tokenizer();
    let view = FileView::parse(&bytes).unwrap();
    let at = view.blob(TOKENIZER_JSON_BLOB).unwrap().segment.offset as usize + 100;
    bytes[at] ^= 0x20;
    // Parsing reads only the header; the blob's checksum is checked when it is read.
    let model = ModelFile::from_bytes(bytes.clone()).unwrap();
    let err = Tokenizer::from_model(&model).unwrap_err();
    assert!(matches!(err, TokenizerError::Format(FormatError::SegmentChecksum { .. })), "{err}");
    assert!(err.to_string().contains("blob.tokenizer_json"), "{err}");
    assert!(matches!(view.verify(&bytes), Err(FormatError::SegmentChecksum { .. })));
}

#[test]
fn files_without_a_tokenizer_are_unchanged() {
    // The committed fixture: no blob, byte tokenizer, no template.
    let bytes = std::fs::read(fixtures().join("matlm.matf")).unwrap();
    let model = ModelFile::from_bytes(bytes).unwrap();
    assert!(model.view().blobs.is_empty());
    assert!(matches!(Tokenizer::from_model(&model).unwrap(), Tokenizer::Bytes(_)));
    assert!(ChatTemplate::from_model(&model).unwrap().is_none());
    assert_eq!(model.metadata().special_tokens().unwrap(), None);
    // Writing with no blobs is byte-identical to the plain writer.
    let m = meta();
    let plain = synthetic_file(&m, DType::F16, 5).unwrap();
    let with_none = synthetic_file_with_blobs(&m, DType::F16, 5, &[], 14).unwrap();
    assert_eq!(plain, with_none);
}

#[test]
fn byte_tokenizer_stream_decoder_never_splits_characters() {
    let bytes = std::fs::read(fixtures().join("matlm.matf")).unwrap();
    let model = ModelFile::from_bytes(bytes).unwrap();
    let tok = Tokenizer::from_model(&model).unwrap();
    let ids = tok.encode("é😀x", false).unwrap();
    let mut dec = tok.stream_decoder();
    let pieces: Vec<String> = ids.iter().map(|&id| dec.push(id)).collect();
    assert_eq!(pieces, ["", "é", "", "", "", "😀", "x"]);
    assert_eq!(dec.flush(), "");
}

#[test]
fn writer_rejects_bad_assets_and_blobs() {
    let m = meta();
    let specs = required_tensor_specs(&m, DType::F16);
    // Missing the tokenizer blob for kind "huggingface".
    let mut hf = m.clone();
    assets().apply_to(&mut hf).unwrap();
    assert!(matches!(plan_layout_with_blobs(&hf, &specs, &[], 12), Err(FormatError::MissingTensor { .. })));
    let b = [0u8; 3];
    for (blobs, what) in [
        (vec![BlobSpec { id: "Bad-Id", bytes: &b }], "bad id"),
        (vec![BlobSpec { id: "", bytes: &b }], "empty id"),
        (vec![BlobSpec { id: "x", bytes: &[] }], "empty blob"),
    ] {
        assert!(matches!(plan_layout_with_blobs(&m, &specs, &blobs, 12), Err(FormatError::BadBlob { .. })), "{what}");
    }
    let dup = [BlobSpec { id: "x", bytes: &b }, BlobSpec { id: "x", bytes: &b }];
    assert!(matches!(plan_layout_with_blobs(&m, &specs, &dup, 12), Err(FormatError::DuplicateTensor { .. })));
    // Assets that do not fit the model.
    let mut small_vocab = synthetic_metadata(16, 2, 4, 2, 4, 300, vec![vec![8, 16, 32]], true, false);
    let before = small_vocab.clone();
    assert!(assets().apply_to(&mut small_vocab).unwrap_err().to_string().contains("vocabulary"));
    assert_eq!(small_vocab, before, "meta unchanged on error");
    let mut bad_template = assets();
    bad_template.chat_template = Some("{% for %}".into());
    assert!(bad_template.apply_to(&mut meta()).unwrap_err().to_string().contains("invalid chat template"));
    let mut bad_special = assets();
    bad_special.special.end_of_turn = vec!["<|eot_id|>".into()];
    assert!(bad_special.apply_to(&mut meta()).unwrap_err().to_string().contains("<|eot_id|>"));
}

/// Offset of the blob record in the table: it is the last record.
fn blob_record_at(bytes: &[u8]) -> usize {
    let view = FileView::parse(bytes).unwrap();
    let name = b"blob.tokenizer_json";
    let header = &bytes[..view.header_len as usize];
    header.windows(name.len()).rposition(|w| w == name).unwrap() - 2
}

/// Patches the header at `at` (relative to the blob record), re-seals the CRC and parses.
fn patched(f: impl FnOnce(&mut Vec<u8>, usize)) -> Result<FileView, FormatError> {
    let (_, mut bytes) = file_with_tokenizer();
    let at = blob_record_at(&bytes);
    f(&mut bytes, at);
    assert!(refresh_header_crc(&mut bytes));
    FileView::parse(&bytes)
}

#[test]
fn hostile_blob_records() {
    // Record layout: name_len u16, name (19 bytes), code u8, ndim u8, reserved u16, len u64,
    // n_segments u32, then one 48-byte segment.
    let name = 2;
    let code = name + 19;
    let ndim = code + 1;
    let reserved = ndim + 1;
    let len = reserved + 2;
    let nseg = len + 8;
    let seg = nseg + 4;
    let put_u64 = |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let put_u32 = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());

    let e = patched(|b, r| b[r + name + 5] = b'T').unwrap_err();
    assert!(matches!(e, FormatError::BadBlob { .. }), "{e}");
    let e = patched(|b, r| b[r + code] = 1).unwrap_err();
    assert!(matches!(e, FormatError::BadBlob { .. }), "{e}");
    let e = patched(|b, r| b[r + ndim] = 2).unwrap_err();
    assert!(matches!(e, FormatError::BadBlob { .. }), "{e}");
    let e = patched(|b, r| b[r + reserved] = 1).unwrap_err();
    assert!(matches!(e, FormatError::ReservedNonZero { .. }), "{e}");
    let e = patched(|b, r| put_u64(b, r + len, 0)).unwrap_err();
    assert!(matches!(e, FormatError::BadBlob { .. }), "{e}");
    let e = patched(|b, r| put_u64(b, r + len, u64::MAX)).unwrap_err();
    assert!(matches!(e, FormatError::BadBlob { .. }), "{e}");
    let e = patched(|b, r| put_u32(b, r + nseg, 2)).unwrap_err();
    assert!(matches!(e, FormatError::SegmentCount { .. }), "{e}");
    let e = patched(|b, r| put_u32(b, r + seg, 1)).unwrap_err();
    assert!(matches!(e, FormatError::SegmentRows { .. }), "{e}");
    let e = patched(|b, r| put_u64(b, r + seg + 16, 5)).unwrap_err();
    assert!(matches!(e, FormatError::SegmentRows { .. }), "{e}");
    let e = patched(|b, r| put_u64(b, r + seg + 32, 5)).unwrap_err();
    assert!(matches!(e, FormatError::LengthMismatch { .. }), "{e}");
    let e = patched(|b, r| put_u64(b, r + seg + 24, 4096 * 3 + 1)).unwrap_err();
    assert!(matches!(e, FormatError::Misaligned { .. }), "{e}");
    // Onto the first tensor's segment: overlap.
    let e = patched(|b, r| {
        let first = FileView::parse(b).unwrap().tensors[0].segments[0].offset;
        put_u64(b, r + seg + 24, first)
    })
    .unwrap_err();
    assert!(matches!(e, FormatError::Overlap { .. }), "{e}");
    // Past the end of level 0.
    let e = patched(|b, r| put_u64(b, r + seg + 24, 1 << 40)).unwrap_err();
    assert!(matches!(e, FormatError::SegmentOutOfBounds { .. }), "{e}");
    let e = patched(|b, r| put_u32(b, r + seg + 4, 9)).unwrap_err();
    assert!(matches!(e, FormatError::ReservedNonZero { .. }), "{e}");
    // Truncated inside the record (table_len shortened by moving the table end is not possible
    // without re-layout; cut the n_segments field off instead by claiming more records).
    let e = patched(|b, _| {
        let n = u32::from_le_bytes(b[16..20].try_into().unwrap());
        put_u32(b, 16, n + 1)
    })
    .unwrap_err();
    assert!(matches!(e, FormatError::BadTensorTable { .. }), "{e}");
    // A tensor record with the blob code.
    let (_, mut bytes) = file_with_tokenizer();
    let view = FileView::parse(&bytes).unwrap();
    let first = b"tok_embeddings";
    let at = bytes[..view.header_len as usize].windows(first.len()).position(|w| w == first).unwrap() + first.len();
    bytes[at] = 4;
    refresh_header_crc(&mut bytes);
    assert!(matches!(FileView::parse(&bytes), Err(FormatError::BadBlob { .. })));
}

#[test]
fn hostile_tokenizer_metadata() {
    let (m, bytes) = file_with_tokenizer();
    // Metadata whose special tokens or template have the wrong type is rejected at parse.
    let mut bad = m.clone();
    bad.extra.insert("special_tokens".into(), serde_json::json!({"bos": 5}));
    assert!(matches!(bad.validate(), Err(FormatError::BadMetadata { .. })));
    let mut bad = m.clone();
    bad.extra.insert("chat_template".into(), serde_json::json!(["x"]));
    assert!(matches!(bad.validate(), Err(FormatError::BadMetadata { .. })));
    // bos_id disagreeing with the special-token string.
    let mut bad = m.clone();
    bad.tokenizer.bos_id = Some(7);
    let json = FileView::parse(&bytes).unwrap().blob_bytes(&bytes, TOKENIZER_JSON_BLOB).unwrap();
    let err = Tokenizer::from_metadata_and_json(&bad, json).unwrap_err();
    assert!(err.to_string().contains("bos_id"), "{err}");
    let mut bad = m.clone();
    bad.tokenizer.kind = "tiktoken".into();
    let err = Tokenizer::from_metadata_and_json(&bad, json).unwrap_err();
    assert!(err.to_string().contains("tiktoken"), "{err}");
    let err = Tokenizer::from_metadata_and_json(&m, None).unwrap_err();
    assert!(matches!(err, TokenizerError::MissingTokenizerJson), "{err}");
    let err = Tokenizer::from_metadata_and_json(&m, Some(b"{\"not\": \"a tokenizer\"}")).unwrap_err();
    assert!(matches!(err, TokenizerError::Json { .. }), "{err}");
}
