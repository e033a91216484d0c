//! Every WGSL file in `runtime/shaders/` (the top-level `shaders/` is a link to it) parses and
//! validates with naga (no GPU needed), and the set of files is exactly the set of shaders the
//! GPU backend compiles in.
#![cfg(feature = "gpu")]

use std::collections::BTreeSet;
use std::path::PathBuf;

/// The shaders live inside the runtime crate so that a packaged `matformer` carries them.
fn shader_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("shaders")
}

/// The workspace's top-level `shaders/` (the design card's place for them) is a link to the
/// runtime's directory, so there is one copy of every shader.
#[test]
fn top_level_shaders_is_the_runtime_directory() {
    let top = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("shaders");
    if !PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml").exists() {
        println!("skipping: not inside the workspace (a packaged crate)");
        return;
    }
    let canonical = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(canonical(&top), canonical(&shader_dir()), "shaders/ must link to runtime/shaders/");
}

#[test]
fn every_shader_parses_and_validates() {
    for s in matformer::gpu::shader_sources() {
        let module = naga::front::wgsl::parse_str(s.source)
            .unwrap_or_else(|e| panic!("{}.wgsl does not parse:\n{}", s.name, e.emit_to_string(s.source)));
        // The packed-f16 path needs only `unpack2x16float` (SHADER_FLOAT16_IN_FLOAT32, which
        // wgpu grants on every Vulkan and Metal device). The native-f16 kernels (files that
        // start with `enable f16;`, run only when the device has SHADER_F16) also get
        // SHADER_FLOAT16. No other capability is allowed.
        // The packed64 kernels (`<op>_u64.wgsl`, run only when the device has SHADER_INT64)
        // get SHADER_INT64.
        // The subgroup variants (`<op>_sg.wgsl`, run only on devices opened with SUBGROUP) get
        // SUBGROUP.
        let f16 = s.source.starts_with("enable f16;");
        let sg = s.name.ends_with("_sg");
        let u64 = s.name.ends_with("_u64") || s.name.ends_with("_u64_sg");
        let mut caps = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
        if f16 {
            caps |= naga::valid::Capabilities::SHADER_FLOAT16;
        }
        if u64 {
            caps |= naga::valid::Capabilities::SHADER_INT64;
        }
        if sg {
            caps |= naga::valid::Capabilities::SUBGROUP;
        }
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}.wgsl does not validate:\n{}", s.name, e.emit_to_string(s.source)));
        // An `enable f16;` file is the f16 variant of an op and is named after it.
        assert_eq!(
            f16,
            s.name.ends_with("_f16"),
            "{}.wgsl: f16 variants are named <op>_f16 and start with `enable f16;`",
            s.name
        );
        if !f16 && !u64 && !sg {
            let strict = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
            )
            .validate(&module);
            assert!(strict.is_ok(), "{}.wgsl needs a capability beyond unpack2x16float", s.name);
        }
    }
}

#[test]
fn f16_variants_need_the_f16_capability() {
    // Without SHADER_FLOAT16 the native-f16 kernels must fail validation (so they can never
    // be compiled by accident on an adapter without SHADER_F16), and there is one per
    // weight-reading kernel: the decode GEMV and the prefill GEMM.
    let f16: Vec<_> = matformer::gpu::shader_sources().into_iter().filter(|s| s.name.ends_with("_f16")).collect();
    let names: BTreeSet<&str> = f16.iter().map(|s| s.name).collect();
    assert!(names.contains("matmul_gemv_f16") && names.contains("matmul_gemm_f16"), "f16 variants: {names:?}");
    for s in f16 {
        let module = naga::front::wgsl::parse_str(s.source).expect("parses");
        let without = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        )
        .validate(&module);
        assert!(without.is_err(), "{}.wgsl validates without the f16 capability", s.name);
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

#[test]
fn u64_variants_need_the_int64_capability() {
    // Without SHADER_INT64 the packed64 kernels must fail validation (they are compiled only on
    // devices opened with SHADER_INT64): the decode GEMV and the read calibration.
    let u64: Vec<_> = matformer::gpu::shader_sources().into_iter().filter(|s| s.name.ends_with("_u64")).collect();
    assert!(
        u64.iter().any(|s| s.name == "matmul_gemv_u64") && u64.iter().any(|s| s.name == "calibrate_read_u64"),
        "u64 variants: {:?}",
        u64.iter().map(|s| s.name).collect::<Vec<_>>()
    );
    for s in u64 {
        let module = naga::front::wgsl::parse_str(s.source).expect("parses");
        let without = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        )
        .validate(&module);
        assert!(without.is_err(), "{}.wgsl validates without the int64 capability", s.name);
    }
}

#[test]
fn subgroup_variants_need_the_subgroup_capability() {
    // Without SUBGROUP the subgroup kernels must fail validation (they are compiled only on
    // devices opened with SUBGROUP and 8-invocation subgroups): the packed64 decode GEMV.
    let sg: Vec<_> = matformer::gpu::shader_sources().into_iter().filter(|s| s.name.ends_with("_sg")).collect();
    assert!(
        sg.iter().any(|s| s.name == "matmul_gemv_u64_sg"),
        "subgroup variants: {:?}",
        sg.iter().map(|s| s.name).collect::<Vec<_>>()
    );
    for s in sg {
        let module = naga::front::wgsl::parse_str(s.source).expect("parses");
        let without = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32 | naga::valid::Capabilities::SHADER_INT64,
        )
        .validate(&module);
        assert!(without.is_err(), "{}.wgsl validates without the subgroup capability", s.name);
    }
}
