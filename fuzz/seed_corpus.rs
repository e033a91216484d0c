//! Writes a seed corpus for the `parse` target into `fuzz/corpus/parse/`: the headers of a few
//! small synthetic models (the target also parses inputs as headers only) and one whole file.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --bin seed_corpus`

use matformer::format::{
    required_tensor_specs, testing::synthetic_metadata, testing::synthetic_value, write_file_with_alignment, DType,
    FileView, Metadata, NormKind,
};

fn write(meta: &Metadata, dtype: DType) -> Vec<u8> {
    let specs = required_tensor_specs(meta, dtype);
    let mut out = Vec::new();
    write_file_with_alignment(
        &mut out,
        meta,
        &specs,
        12,
        |ti, rows, buf| {
            let spec = &specs[ti];
            let row_elems: u64 = spec.shape.iter().skip(1).product();
            for idx in rows.start * row_elems..rows.end * row_elems {
                let v = synthetic_value(1, spec, idx);
                match dtype {
                    DType::F32 => buf.extend_from_slice(&v.to_le_bytes()),
                    DType::F16 => buf.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                }
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
    ];
    for (name, meta, dtype) in models {
        let bytes = write(&meta, dtype);
        let view = FileView::parse(&bytes).expect("seed parses");
        std::fs::write(dir.join(format!("{name}.header")), &bytes[..view.header_len as usize]).expect("write");
        if name == "tiny_f32" {
            std::fs::write(dir.join(format!("{name}.matf")), &bytes).expect("write");
        }
    }
    println!("seeds written to {}", dir.display());
}
