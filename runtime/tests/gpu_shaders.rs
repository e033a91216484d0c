//! Every WGSL file in `shaders/` parses and validates with naga (no GPU needed), and the set
//! of files is exactly the set of shaders the GPU backend compiles in.
#![cfg(feature = "gpu")]

use std::collections::BTreeSet;
use std::path::PathBuf;

fn shader_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("shaders")
}

#[test]
fn every_shader_parses_and_validates() {
    for s in matformer::gpu::shader_sources() {
        let module = naga::front::wgsl::parse_str(s.source)
            .unwrap_or_else(|e| panic!("{}.wgsl does not parse:\n{}", s.name, e.emit_to_string(s.source)));
        // The packed-f16 path needs only `unpack2x16float` (SHADER_FLOAT16_IN_FLOAT32, which
        // wgpu grants on every Vulkan and Metal device); no other capability is allowed.
        let caps = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}.wgsl does not validate:\n{}", s.name, e.emit_to_string(s.source)));
    }
}

#[test]
fn every_shader_file_is_used_and_up_to_date() {
    let used: BTreeSet<String> = matformer::gpu::shader_sources().iter().map(|s| s.name.to_string()).collect();
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(shader_dir()).expect("shaders/ is readable") {
        let path = entry.expect("directory entry").path();
        if path.extension().and_then(|e| e.to_str()) == Some("wgsl") {
            let stem = path.file_stem().and_then(|s| s.to_str()).expect("utf-8 file name").to_string();
            on_disk.insert(stem);
        }
    }
    let unused: Vec<_> = on_disk.difference(&used).collect();
    assert!(unused.is_empty(), "shader files not used by any op (wire them in or delete them): {unused:?}");
    let missing: Vec<_> = used.difference(&on_disk).collect();
    assert!(missing.is_empty(), "ops whose shader file is missing: {missing:?}");
    for s in matformer::gpu::shader_sources() {
        let text = std::fs::read_to_string(shader_dir().join(format!("{}.wgsl", s.name))).expect("readable shader");
        assert_eq!(text, s.source, "{}.wgsl differs from the compiled-in copy: rebuild", s.name);
    }
}
