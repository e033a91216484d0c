//! The CPU engine on block-quantised files (`q8_0`, `q4_0`, `q4_1`, and one dtype per tensor):
//! prefill, decode and threads agree bitwise; logits stay close to the f16 file's; a nested
//! submodel equals the file cut at its level; `Auto` backend choice does not refuse them (the
//! GPU runs them, tests/gpu_quant.rs).

use std::sync::Arc;

use matformer::cpu::{CpuEngine, Tolerance};
use matformer::format::testing::{synthetic_metadata, synthetic_specs, synthetic_value};
use matformer::format::{names, write_file, DType, Metadata, TensorSpec};
use matformer::{ModelFile, Submodel};

/// d_model 64, 2 layers, GQA, gated, untied, 3 levels.
fn meta() -> Metadata {
    let mut m = synthetic_metadata(64, 2, 4, 2, 16, 260, vec![vec![32, 96, 160], vec![64, 128, 192]], true, false);
    m.architecture.max_context = 128;
    m
}

/// Writes `specs` with the synthetic values of seed 3, each tensor encoded in its own dtype.
fn write(meta: &Metadata, specs: &[TensorSpec]) -> Arc<ModelFile> {
    let mut out = Vec::new();
    write_file(
        &mut out,
        meta,
        specs,
        |ti, rows, buf| {
            let spec = &specs[ti];
            let n: u64 = spec.shape.iter().skip(1).product();
            for r in rows {
                let row: Vec<f32> = (r * n..(r + 1) * n).map(|i| synthetic_value(3, spec, i)).collect();
                matformer::quant::encode_row(spec.dtype, &row, buf)?;
            }
            Ok(())
        },
        |_, _| {},
    )
    .expect("write");
    Arc::new(ModelFile::from_bytes(out).expect("parse"))
}

fn uniform(dtype: DType) -> Arc<ModelFile> {
    let m = meta();
    write(&m, &synthetic_specs(&m, dtype))
}

/// Embeddings and LM head q8_0, attention q4_1, FFN q4_0, norms f16.
fn mixed() -> Arc<ModelFile> {
    let m = meta();
    let mut specs = synthetic_specs(&m, DType::F16);
    for s in &mut specs {
        if s.shape.len() == 1 {
            continue;
        }
        s.dtype = if s.name == names::TOK_EMBEDDINGS || s.name == names::LM_HEAD {
            DType::Q8_0
        } else if s.name.contains("ffn") {
            DType::Q4_0
        } else {
            DType::Q4_1
        };
    }
    write(&m, &specs)
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % 260).collect()
}

fn exact(expected: &[f32], actual: &[f32], what: &str) {
    if let Err(m) = Tolerance::EXACT.check(expected, actual) {
        panic!("{what}: {m}");
    }
}

fn files() -> Vec<(&'static str, Arc<ModelFile>)> {
    vec![
        ("q8_0", uniform(DType::Q8_0)),
        ("q4_0", uniform(DType::Q4_0)),
        ("q4_1", uniform(DType::Q4_1)),
        ("mixed", mixed()),
    ]
}

#[test]
fn prefill_decode_and_threads_agree_bitwise() {
    let toks = tokens(19);
    for (name, model) in files() {
        let one = CpuEngine::new(model.clone()).expect("engine").with_threads(1);
        let three = CpuEngine::new(model.clone()).expect("engine").with_threads(3);
        for level in 0..3u8 {
            let sub = Submodel::uniform(level, 2);
            let all = one.session(&sub).unwrap().forward_all(&toks).unwrap();
            let all3 = three.session(&sub).unwrap().forward_all(&toks).unwrap();
            exact(&all, &all3, &format!("{name} level {level}: 1 vs 3 threads"));
            let mut s = one.session(&sub).unwrap();
            for (i, &t) in toks.iter().enumerate() {
                let l = s.decode(t).unwrap();
                exact(&all[i * 260..(i + 1) * 260], &l, &format!("{name} level {level}: decode {i}"));
            }
            let mut s = three.session(&sub).unwrap();
            let last = s.prefill(&toks[..7]).unwrap();
            exact(&all[6 * 260..7 * 260], &last, &format!("{name} level {level}: prefill(7)"));
        }
    }
}

/// `|a - b|_2 / |b|_2`.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn logits_stay_close_to_the_f16_model() {
    let toks = tokens(12);
    let reference = uniform(DType::F16);
    let sub = Submodel::uniform(2, 2);
    let want = CpuEngine::new(reference).unwrap().session(&sub).unwrap().forward_all(&toks).unwrap();
    for (name, model, bound) in [
        ("q8_0", uniform(DType::Q8_0), 0.02),
        ("q4_0", uniform(DType::Q4_0), 0.25),
        ("q4_1", uniform(DType::Q4_1), 0.2),
        ("mixed", mixed(), 0.25),
    ] {
        let got = CpuEngine::new(model).unwrap().session(&sub).unwrap().forward_all(&toks).unwrap();
        let e = rel_l2(&got, &want);
        assert!(e < bound, "{name}: relative L2 error {e} against f16 (bound {bound})");
    }
}

#[test]
fn a_nested_submodel_equals_the_file_cut_at_its_level() {
    let toks = tokens(9);
    for (name, model) in files() {
        let end = model.view().level_ends[0] as usize;
        let cut = Arc::new(ModelFile::from_bytes(model.bytes()[..end].to_vec()).expect("cut parses"));
        assert_eq!(cut.view().available_levels, 1);
        let sub = Submodel::uniform(0, 2);
        let a = CpuEngine::new(model.clone()).unwrap().session(&sub).unwrap().forward_all(&toks).unwrap();
        let b = CpuEngine::new(cut).unwrap().session(&sub).unwrap().forward_all(&toks).unwrap();
        exact(&a, &b, &format!("{name}: full file vs cut file"));
    }
}

#[test]
fn quantised_tensors_read_as_their_decoded_rows() {
    // `tensor_f32` dequantises; the rows equal decoding the rows' bytes one by one.
    let model = mixed();
    let t = model.view().tensor("layers.1.ffn_up").unwrap().clone();
    assert_eq!(t.dtype, DType::Q4_0);
    let all = model.tensor_f32(&t.name).unwrap();
    assert_eq!(all.len() as u64, t.n_elements());
    let cols = t.row_elems() as usize;
    let segs = model.tensor_segments(&t.name, t.rows()).unwrap();
    let mut row = vec![0.0f32; cols];
    let rb = t.row_bytes() as usize;
    for (first, bytes) in segs {
        for (k, chunk) in bytes.chunks_exact(rb).enumerate() {
            matformer::quant::decode_row(t.dtype, chunk, &mut row).unwrap();
            let r = first as usize + k;
            assert_eq!(&all[r * cols..(r + 1) * cols], &row[..], "row {r}");
        }
    }
}

#[cfg(feature = "gpu")]
#[test]
fn auto_backend_choice_does_not_refuse_quantised_files() {
    // The GPU runs block-quantised weights (tests/gpu_quant.rs): `Auto` decides on the adapter
    // alone, never on the dtype.
    let engine = matformer::Engine::from_model(mixed(), matformer::EngineOptions::default()).expect("auto engine");
    let b = engine.backend();
    assert!(!b.reason.contains("block-quantised") && !b.reason.contains("q8_0"), "{}", b.reason);
}

#[test]
fn catalog_footprints_use_the_real_bytes_per_dtype() {
    use matformer::elastic::{Catalog, ShapeFingerprint};
    let mut largest = Vec::new();
    for dtype in [DType::F16, DType::Q8_0, DType::Q4_1, DType::Q4_0] {
        let model = uniform(dtype);
        let catalog = Catalog::from_model(&model);
        let top = catalog.entries.iter().max_by_key(|e| e.weight_bytes).unwrap();
        // Every tensor's segments: the file's own byte counts.
        let all: u64 = model.view().tensors.iter().flat_map(|t| &t.segments).map(|s| s.byte_len).sum();
        assert_eq!(top.weight_bytes, all, "{dtype}");
        let fp = ShapeFingerprint::of(&model);
        assert_eq!(fp.dtype, dtype.name());
        assert_eq!(fp.bytes_per_weight(), dtype.bits_per_weight() / 8.0);
        largest.push(top.weight_bytes);
    }
    // f16 > q8_0 > q4_1 > q4_0, each close to its bits per weight (norms stay f16).
    assert!(largest.windows(2).all(|w| w[0] > w[1]), "{largest:?}");
    let ratio = largest[3] as f64 / largest[0] as f64;
    assert!((ratio - 4.5 / 16.0).abs() < 0.01, "q4_0 / f16 = {ratio}");
}
