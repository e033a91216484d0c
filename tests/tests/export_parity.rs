//! The exporter on the bundled ONNX: the export verifies against tract-onnx at every width, is
//! reproducible byte for byte (the committed .matf is exactly what it writes), finds the same
//! weights by name and by graph structure, and refuses a file that disagrees with the source.

use std::path::Path;

use matformer::format::DType;
use matformer_export::mapping::{find_by_structure, find_weights, NamePreset, Strategy, WeightMap};
use matformer_export::onnx_source::SourceModel;
use matformer_export::verify::Tolerance;
use matformer_export::{export, ExportOptions, VerifyOptions};
use matformer_tests::{fixture, temp_dir};

fn opts(input: &Path, output: &Path, dtype: DType, strategy: Strategy) -> ExportOptions {
    ExportOptions {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        dtype: dtype.into(),
        widths: None,
        config: None,
        strategy,
        verify: Some(VerifyOptions::default()),
        calibration: None,
    }
}

#[test]
fn f16_export_verifies_and_reproduces_the_committed_file() {
    let dir = temp_dir("export-f16");
    let out = dir.join("matlm.matf");
    let report = export(&opts(&fixture("matlm.onnx"), &out, DType::F16, Strategy::Auto)).expect("export");
    let v = report.verification.expect("verified");
    assert!(v.passed, "{}", v.summary());
    assert_eq!(v.tolerance, Tolerance::F16_STORAGE);
    // 4 uniform widths + 1 Mix'n'Match, 2 probes each.
    assert_eq!(v.checks.len(), 10);
    let written = std::fs::read(&out).unwrap();
    let committed = std::fs::read(fixture("matlm.matf")).unwrap();
    assert!(written == committed, "export is deterministic and tests/fixtures/matlm.matf is current");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn f32_export_agrees_with_tract_to_summation_order() {
    let dir = temp_dir("export-f32");
    let out = dir.join("matlm32.matf");
    let report = export(&opts(&fixture("matlm.onnx"), &out, DType::F32, Strategy::Auto)).expect("export");
    let v = report.verification.expect("verified");
    assert!(v.passed, "{}", v.summary());
    assert_eq!(v.tolerance, Tolerance::F32_STORAGE);
    for c in &v.checks {
        assert_eq!(c.argmax_agree, c.positions, "{} probe {}", c.submodel, c.probe);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes a mapping file naming, for every canonical weight, the constant the graph-structure
/// search found for `swap(canonical)`; returns the structural map and the parsed mapping.
fn mapping_from_structure(dir: &Path, name: &str, swap: impl Fn(&str) -> &str) -> (WeightMap, NamePreset) {
    let src = SourceModel::load(&fixture("matlm.onnx")).unwrap();
    let config = src.config(None).unwrap();
    let structural = find_by_structure(&src, &config.architecture).unwrap();
    let mut names = serde_json::Map::new();
    let mut transposed = Vec::new();
    for (canonical, loc) in &structural.entries {
        let source = &structural.entries[swap(canonical)];
        names.insert(canonical.clone(), src.weight_name(&source.weight).into());
        if loc.transposed {
            transposed.push(canonical.clone());
        }
    }
    let mapping = serde_json::json!({"name": name, "names": names, "transposed": transposed});
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&mapping).unwrap()).unwrap();
    (structural, NamePreset::from_file(&path).unwrap())
}

#[test]
fn a_mapping_file_finds_what_the_structure_finds() {
    // A mapping file built from the structural result exports identical bytes.
    let dir = temp_dir("export-mapping");
    let (structural, preset) = mapping_from_structure(&dir, "from-structure", |c| c);
    let src = SourceModel::load(&fixture("matlm.onnx")).unwrap();
    let config = src.config(None).unwrap();
    let by_name = find_weights(&src, &config.architecture, &Strategy::Mapping(preset.clone())).unwrap();
    assert_eq!(by_name.entries, structural.entries);

    let a = dir.join("a.matf");
    let b = dir.join("b.matf");
    export(&opts(&fixture("matlm.onnx"), &a, DType::F16, Strategy::Structure)).unwrap();
    export(&opts(&fixture("matlm.onnx"), &b, DType::F16, Strategy::Mapping(preset))).unwrap();
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn export_refuses_a_wrong_mapping_and_leaves_no_file() {
    // Swap the FFN gate and up projections of layer 1 (same shapes, so only the verification
    // against tract can notice).
    let dir = temp_dir("export-wrong");
    let (_, preset) = mapping_from_structure(&dir, "wrong", |c| match c {
        "layers.1.ffn_gate" => "layers.1.ffn_up",
        "layers.1.ffn_up" => "layers.1.ffn_gate",
        other => other,
    });
    let out = dir.join("wrong.matf");
    let err = export(&opts(&fixture("matlm.onnx"), &out, DType::F16, Strategy::Mapping(preset))).unwrap_err();
    assert!(format!("{err:#}").contains("verification failed"), "{err:#}");
    assert!(!out.exists(), "no output file after a failed verification");
    assert!(!out.with_extension("matf.partial").exists(), "no partial file either");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hf_llama_names_and_structure_agree() {
    let onnx = fixture("hf_llama_tiny.onnx");
    let config_path = fixture("hf_llama_tiny.config.json");
    let src = SourceModel::load(&onnx).unwrap();
    let config = src.config(Some(&config_path)).unwrap();
    let by_name = NamePreset::hf_llama().resolve(&src, &config.architecture).unwrap();
    let auto = find_weights(&src, &config.architecture, &Strategy::Auto).unwrap();
    assert_eq!(auto.method, "names: hf-llama");
    let structural = find_weights(&src, &config.architecture, &Strategy::Structure).unwrap();
    for (name, loc) in &by_name.entries {
        assert_eq!(
            structural.entries.get(name).map(|l| &l.weight),
            Some(&loc.weight),
            "`{name}` is the same constant by name and by structure"
        );
    }
    let dir = temp_dir("export-hf");
    let out = dir.join("hf.matf");
    let mut o = opts(&onnx, &out, DType::F32, Strategy::Auto);
    o.config = Some(config_path);
    let report = export(&o).expect("export of the HF-named model");
    let v = report.verification.unwrap();
    assert!(v.passed, "{}", v.summary());
    std::fs::remove_dir_all(&dir).ok();
}
