//! The `matformer` binary on the bundled model: the commands work, and corrupt or truncated
//! copies get one clear line on stderr and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn matformer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_matformer")).args(args).output().expect("run matformer")
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A failing run: non-zero exit, one `error:` line naming the problem, no panic.
fn assert_clean_failure(out: &Output, must_mention: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].to_lowercase().contains(must_mention), "error mentions `{must_mention}`: {stderr}");
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn inspect_shows_four_nested_widths_and_level_ends() {
    let out = matformer(&["inspect", path_str(&fixture("matlm.matf")), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let levels = v["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 4);
    let expected = [64, 128, 256, 512];
    for (l, w) in levels.iter().zip(expected) {
        assert!(l["widths"].as_array().unwrap().iter().all(|x| x.as_u64() == Some(w)));
        assert!(l["end_offset"].as_u64().unwrap() > 0);
    }
    let human = matformer(&["inspect", path_str(&fixture("matlm.matf"))]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("ends at byte") && text.contains("xl"), "{text}");
}

#[test]
fn generate_prints_text_and_json() {
    let out = matformer(&["generate", path_str(&fixture("matlm.matf")), "--prompt", "The ", "-n", "16", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["submodel"], "xl");
    assert!(v["generated_tokens"].as_u64().unwrap() > 0);
    let mixed = matformer(&[
        "generate",
        path_str(&fixture("matlm.matf")),
        "--prompt",
        "The ",
        "-n",
        "8",
        "--submodel",
        "0,0,1,3",
    ]);
    assert!(mixed.status.success(), "{}", String::from_utf8_lossy(&mixed.stderr));
    assert!(String::from_utf8_lossy(&mixed.stdout).starts_with("The "));
}

#[test]
fn verify_checks_every_checksum() {
    let out = matformer(&["verify", path_str(&fixture("matlm.matf"))]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_flipped_byte_is_found_by_verify() {
    let mut bytes = std::fs::read(fixture("matlm.matf")).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x20;
    let p = tmp("flipped.matf");
    std::fs::write(&p, &bytes).unwrap();
    assert_clean_failure(&matformer(&["verify", path_str(&p)]), "checksum");
}

#[test]
fn a_corrupt_header_is_refused_by_every_command() {
    let mut bytes = std::fs::read(fixture("matlm.matf")).unwrap();
    bytes[200] ^= 0xFF; // inside the header: its CRC no longer matches
    let p = tmp("corrupt-header.matf");
    std::fs::write(&p, &bytes).unwrap();
    for cmd in ["inspect", "verify"] {
        assert_clean_failure(&matformer(&[cmd, path_str(&p)]), "checksum");
    }
    assert_clean_failure(&matformer(&["generate", path_str(&p), "--prompt", "x"]), "checksum");
    let mut bad_magic = std::fs::read(fixture("matlm.matf")).unwrap();
    bad_magic[0] = b'G';
    let p = tmp("bad-magic.matf");
    std::fs::write(&p, &bad_magic).unwrap();
    assert_clean_failure(&matformer(&["inspect", path_str(&p)]), "magic");
}

#[test]
fn truncated_copies_are_refused_unless_cut_at_a_level_end() {
    let bytes = std::fs::read(fixture("matlm.matf")).unwrap();
    let p = tmp("truncated.matf");
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    assert_clean_failure(&matformer(&["generate", path_str(&p), "--prompt", "x"]), "cut inside level");
    std::fs::write(&p, &bytes[..10]).unwrap();
    assert_clean_failure(&matformer(&["inspect", path_str(&p)]), "truncated");

    let v: serde_json::Value =
        serde_json::from_slice(&matformer(&["inspect", path_str(&fixture("matlm.matf")), "--json"]).stdout).unwrap();
    let end1 = v["levels"][1]["end_offset"].as_u64().unwrap() as usize;
    std::fs::write(&p, &bytes[..end1]).unwrap();
    let ok = matformer(&["generate", path_str(&p), "--prompt", "The ", "-n", "8", "--submodel", "m"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_clean_failure(&matformer(&["generate", path_str(&p), "--prompt", "x", "--submodel", "xl"]), "level");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    assert_clean_failure(&matformer(&["inspect", "/nonexistent/model.matf"]), "cannot open");
    assert_clean_failure(
        &matformer(&["generate", path_str(&fixture("matlm.matf")), "--prompt", "x", "--submodel", "huge"]),
        "huge",
    );
    assert_clean_failure(
        &matformer(&["generate", path_str(&fixture("matlm.matf")), "--prompt", "x", "--submodel", "0,1"]),
        "layer",
    );
}

/// GPU tests: when no adapter exists they fail under CI (which installs lavapipe) and skip with
/// a printed reason elsewhere.
fn gpu_available() -> bool {
    let out = matformer(&["devices", "--json"]);
    let adapters: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let found = adapters.as_array().is_some_and(|a| !a.is_empty());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but no GPU adapter was found (install mesa-vulkan-drivers)"
        );
        eprintln!("skipping: no GPU adapter (matformer devices lists none)");
    }
    found
}

#[test]
fn generate_on_the_gpu_prints_what_the_cpu_prints_at_every_width() {
    if !gpu_available() {
        return;
    }
    for spec in ["s", "m", "l", "xl", "0,0,1,3"] {
        let run = |backend: &str| {
            let out = matformer(&[
                "generate",
                path_str(&fixture("matlm.matf")),
                "--prompt",
                "The meaning of ",
                "-n",
                "32",
                "--submodel",
                spec,
                "--backend",
                backend,
                "--json",
            ]);
            assert!(out.status.success(), "{backend}: {}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["backend"], backend);
            v["text"].as_str().unwrap().to_string()
        };
        assert_eq!(run("gpu"), run("cpu"), "submodel {spec}");
    }
}

#[test]
fn bench_reports_speed_and_efficiency() {
    let mut args =
        vec!["bench", "--prompt-len", "8", "--gen-len", "4", "--submodel", "s", "--json", "--backend", "cpu"];
    let gpu = gpu_available();
    if gpu {
        args.extend(["--backend", "gpu"]);
    }
    let file = fixture("matlm.matf");
    args.insert(1, path_str(&file));
    let out = matformer(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), if gpu { 2 } else { 1 });
    for r in rows {
        assert!(r["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["decode_efficiency"].as_f64().unwrap() > 0.0);
        assert!(r["weight_bytes"].as_u64().unwrap() > 0);
    }
    if gpu {
        let g = rows.iter().find(|r| r["backend"] == "gpu").unwrap();
        assert_eq!(g["submits_per_step"].as_f64(), Some(1.0), "one submit per decode step");
        assert_eq!(g["readbacks_per_step"].as_f64(), Some(1.0), "one readback per decode step");
    }
}

#[test]
fn select_explains_the_plan_and_refuses_budgets_nothing_fits() {
    let file = fixture("matlm.matf");
    let out = matformer(&["select", path_str(&file), "--mem", "3MiB", "--context", "256", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["plan"]["footprint_bytes"].as_u64().unwrap() <= 3 * 1024 * 1024);
    assert!(v["plan"]["explanation"].as_str().unwrap().contains("memory"));
    let roomy = matformer(&["select", path_str(&file), "--mem", "1GiB", "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&roomy.stdout).unwrap();
    assert_eq!(r["plan"]["entry"]["name"], "xl", "with room to spare the largest entry runs");
    assert_clean_failure(&matformer(&["select", path_str(&file), "--mem", "100KiB"]), "nothing fits");
    assert_clean_failure(&matformer(&["select", path_str(&file), "--mem", "12parsecs"]), "unit");
}

#[test]
fn bench_switch_measures_shifts_and_memory_pressure() {
    let out = matformer(&[
        "bench",
        path_str(&fixture("matlm.matf")),
        "--switch",
        "--prompt-len",
        "16",
        "--gen-len",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let switches = v["switches"].as_array().unwrap();
    assert_eq!(switches.len(), 4);
    assert_eq!(switches[2]["reprefilled_tokens"].as_u64(), Some(20), "prompt + generated tokens are re-prefilled");
    assert!(v["memory_pressure"]["bytes_advised"].as_u64().unwrap() > 0);
}

#[test]
fn generate_picks_the_submodel_from_a_budget() {
    let out = matformer(&[
        "generate",
        path_str(&fixture("matlm.matf")),
        "--prompt",
        "The ",
        "-n",
        "4",
        "--submodel",
        "auto",
        "--mem",
        "3MiB",
        "--context",
        "256",
        "--backend",
        "cpu",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(v["submodel"], "xl", "3 MiB does not hold the largest submodel with a 256-token cache");
}
