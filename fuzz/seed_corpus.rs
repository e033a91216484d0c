//! Writes seed corpora: for the `parse` target into `fuzz/corpus/parse/` the headers of a few
//! small synthetic models (the target also parses inputs as headers only), one whole file and a
//! file with a stored tokenizer; for `tokenizer_json` and `chat_template` the small tokenizer
//! and template fixtures of `tests/fixtures/tokenizers/`.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --bin seed_corpus`

use matformer::format::{
    testing::synthetic_metadata, testing::synthetic_value, write_file_with_alignment, DType,
    FileView, Metadata, NormKind,
};

fn write(meta: &Metadata, dtype: DType) -> Vec<u8> {
    let specs = matformer::format::testing::synthetic_specs(meta, dtype);
    let mut out = Vec::new();
    write_file_with_alignment(
        &mut out,
        meta,
        &specs,
        12,
        |ti, rows, buf| {
            let spec = &specs[ti];
            let row_elems: u64 = spec.shape.iter().skip(1).product();
            for r in rows {
                let row: Vec<f32> = (r * row_elems..(r + 1) * row_elems).map(|i| synthetic_value(1, spec, i)).collect();
                matformer::quant::encode_row(spec.dtype, &row, buf)?;
            }
            Ok(())
        },
        |_, _| {},
    )
    .expect("write seed");
    out
}

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/parse");
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    let mut ln = synthetic_metadata(8, 1, 2, 1, 4, 256, vec![vec![4, 8]], false, false);
    ln.architecture.norm = NormKind::LayerNorm;
    let models = [
        ("tiny_f32", synthetic_metadata(8, 1, 2, 2, 4, 256, vec![vec![8]], false, true), DType::F32),
        (
            "gated_f16",
            synthetic_metadata(16, 2, 4, 2, 4, 260, vec![vec![8, 16, 32], vec![4, 12, 24]], true, false),
            DType::F16,
        ),
        ("layernorm", ln, DType::F32),
        // Block-quantised tensors (norms stay f16): the parse target sees dtype codes 2 and 3.
        ("q8_0", synthetic_metadata(32, 1, 2, 1, 16, 256, vec![vec![32, 64]], true, false), DType::Q8_0),
        ("q4_0", synthetic_metadata(32, 1, 2, 1, 16, 256, vec![vec![32, 64]], true, true), DType::Q4_0),
        ("q4_1", synthetic_metadata(64, 1, 2, 1, 32, 256, vec![vec![16, 48]], false, false), DType::Q4_1),
    ];
    for (name, meta, dtype) in models {
        let bytes = write(&meta, dtype);
        let view = FileView::parse(&bytes).expect("seed parses");
        std::fs::write(dir.join(format!("{name}.header")), &bytes[..view.header_len as usize]).expect("write");
        if name == "tiny_f32" || name == "q4_1" {
            std::fs::write(dir.join(format!("{name}.matf")), &bytes).expect("write");
        }
    }
    // A file with a stored tokenizer, so the parse target sees blob records.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers");
    let json = std::fs::read(fixtures.join("llama_sp.tokenizer.json")).expect("tokenizer fixture");
    let mut meta = synthetic_metadata(8, 1, 2, 1, 4, 704, vec![vec![4, 8]], false, true);
    meta.tokenizer.kind = matformer::format::HF_TOKENIZER_KIND.to_string();
    meta.tokenizer.bos_id = None;
    meta.tokenizer.eos_id = None;
    meta.set_chat_template(Some("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"));
    let blobs = [matformer::format::BlobSpec { id: matformer::format::TOKENIZER_JSON_BLOB, bytes: &json }];
    let bytes = matformer::format::testing::synthetic_file_with_blobs(&meta, DType::F32, 1, &blobs, 12).expect("seed");
    let view = FileView::parse(&bytes).expect("seed parses");
    std::fs::write(dir.join("tokenizer_blob.header"), &bytes[..view.header_len as usize]).expect("write");
    std::fs::write(dir.join("tokenizer_blob.matf"), &bytes).expect("write");
    println!("seeds written to {}", dir.display());

    // The small tokenizer.json fixtures and the chat templates.
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, ext) in [("tokenizer_json", ".tokenizer.json"), ("chat_template", ".jinja")] {
        let out = corpus.join(target);
        std::fs::create_dir_all(&out).expect("create corpus dir");
        for entry in std::fs::read_dir(&fixtures).expect("fixtures") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            // SmolLM2's 1.5 MB tokenizer would slow every execution down; the small ones cover
            // byte-level and SentencePiece-style models.
            if name.ends_with(ext) && !name.starts_with("smollm2") {
                std::fs::copy(&path, out.join(&name)).expect("copy seed");
            }
        }
        println!("seeds written to {}", out.display());
    }
    let templates = corpus.join("chat_template");
    let goldens = std::fs::read_to_string(fixtures.join("template_goldens.json")).expect("template goldens");
    let goldens: serde_json::Value = serde_json::from_str(&goldens).expect("golden JSON");
    if let Some(map) = goldens["templates"].as_object() {
        for (name, t) in map {
            if let Some(src) = t["source"].as_str() {
                std::fs::write(templates.join(format!("{name}.jinja")), src).expect("write");
            }
        }
    }
}
