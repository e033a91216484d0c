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
fn generate_on_a_gpu_without_room_for_the_submodel_steps_down_instead_of_failing() {
    if !gpu_available() {
        return;
    }
    let gen = |backend: &str, spec: &str, limit: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_matformer"));
        cmd.args(["generate", path_str(&fixture("matlm.matf")), "--prompt", "The ", "-n", "16", "--json"]);
        cmd.args(["--submodel", spec, "--backend", backend]);
        if let Some(l) = limit {
            cmd.env("MATFORMER_GPU_MEMORY_LIMIT", l);
        }
        let out = cmd.output().expect("run matformer");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // About 2.6 MB: room for the shared weights, a session and the FFN rows of l, not of xl.
    let (v, stderr) = gen("gpu", "xl", Some("2600KiB"));
    assert!(stderr.contains("xl does not fit") && stderr.contains("running l"), "{stderr}");
    assert_eq!(v["submodel"], "l");
    assert_eq!(v["text"], gen("cpu", "l", None).0["text"]);
    assert!(v["time_to_first_token_ms"].as_f64().unwrap() >= v["open_ms"].as_f64().unwrap());
    let bad = Command::new(env!("CARGO_BIN_EXE_matformer"))
        .args(["generate", path_str(&fixture("matlm.matf")), "--prompt", "The ", "--backend", "gpu"])
        .env("MATFORMER_GPU_MEMORY_LIMIT", "lots")
        .output()
        .expect("run matformer");
    assert_clean_failure(&bad, "matformer_gpu_memory_limit");
}

#[test]
fn bench_reports_speed_and_efficiency() {
    let mut args = vec![
        "bench",
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--repetitions",
        "2",
        "--submodel",
        "s",
        "--json",
        "--backend",
        "cpu",
    ];
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
        assert_eq!(r["repetitions"], 2, "{r}");
        assert!(r["decode_tokens_per_s_sd"].as_f64().is_some_and(|sd| sd >= 0.0 && sd.is_finite()), "{r}");
        assert!(r["prefill_tokens_per_s_sd"].as_f64().is_some_and(|sd| sd >= 0.0 && sd.is_finite()), "{r}");
        // The row's bandwidth is the fastest of the read calibrations before, between and after
        // its runs.
        let passes: Vec<f64> =
            r["read_passes_gb_per_s"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect();
        assert_eq!(passes.len(), 3, "{r}");
        assert_eq!(r["read_gb_per_s"].as_f64().unwrap(), passes.iter().copied().fold(0.0, f64::max), "{r}");
        // One efficiency per run, each against the faster pass around it; the row's is their
        // median (the mean of the two, with two runs).
        let runs: Vec<f64> =
            r["decode_efficiency_runs"].as_array().unwrap().iter().map(|e| e.as_f64().unwrap()).collect();
        assert_eq!(runs.len(), 2, "{r}");
        let median = (runs[0] + runs[1]) / 2.0;
        assert!((r["decode_efficiency"].as_f64().unwrap() - median).abs() <= 1e-12 * median, "{r}");
        assert!(r["decode_efficiency"].as_f64().unwrap() > 0.0);
        assert!(r["weight_bytes"].as_u64().unwrap() > 0);
        // Every kernel class with its work, a time and an efficiency, on both backends.
        let classes = r["classes"].as_array().unwrap();
        let names: Vec<&str> = classes.iter().map(|c| c["class"].as_str().unwrap()).collect();
        assert_eq!(names, ["attention_projections", "attention", "ffn_up", "ffn_down", "lm_head", "small_ops"]);
        for c in classes {
            assert!(c["bytes"].as_f64().unwrap() > 0.0, "{c}");
            assert!(c["ms_per_token"].as_f64().is_some_and(|m| m > 0.0), "{c}");
            assert!(c["efficiency"].is_number(), "{c}");
            assert!(c["source"].as_str().unwrap().starts_with("timed"), "{c}");
        }
        assert!(r["remainder_ms_per_token"].is_number());
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
fn latency_command_calibrates_caches_and_checks_every_entry() {
    let file = fixture("matlm.matf");
    let cache = tmp("cost-cpu.json");
    let _ = std::fs::remove_file(&cache);
    let run = |extra: &[&str]| {
        let mut args = vec!["latency", path_str(&file), "--cost-cache", path_str(&cache), "--json", "--threads", "1"];
        args.extend_from_slice(extra);
        let out = matformer(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v, String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (v, _) = run(&["--check"]);
    assert_eq!(v["cache"]["status"], "calibrated");
    assert_eq!(v["model"]["schema"], "matformer.cost_model/2");
    assert_eq!(v["model"]["device"]["detail"], "1 threads");
    assert!(v["model"]["limits"]["read_bytes_per_second"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["model"]["limits"]["flops_per_second"].as_f64().unwrap() > 0.0, "{v}");
    let check = &v["check"];
    assert!(check["selection"].as_str().unwrap().contains("every catalog entry (35)"));
    let rows = check["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 35);
    for r in rows {
        assert!(r["predicted_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["run"]["measured_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["error_pct"].as_f64().unwrap().is_finite(), "{r}");
        assert!(r["roofline_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["roofline_fitted_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(check["max_abs_error_pct"].as_f64().unwrap() >= check["mean_abs_error_pct"].as_f64().unwrap());
    let roof = &check["roofline"];
    assert!(roof["measured_limits"]["bytes_per_second"].as_f64().unwrap() > 0.0, "{roof}");
    assert!(roof["fitted"]["fixed_ms_per_token"].as_f64().unwrap() >= 0.0, "{roof}");
    assert!(roof["fitted_max_abs_error_pct"].as_f64().unwrap() >= roof["fitted_mean_abs_error_pct"].as_f64().unwrap());

    // The second run reads the cache; a corrupt or mismatching cache is rebuilt, not fatal.
    let (v, _) = run(&[]);
    assert_eq!(v["cache"]["status"], "cache");
    assert!(v["check"].is_null());
    std::fs::write(&cache, "{ not json").unwrap();
    let (v, stderr) = run(&[]);
    assert_eq!(v["cache"]["status"], "calibrated");
    assert!(v["cache"]["miss_reason"].as_str().unwrap().contains("corrupt"), "{v}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = matformer(&["latency", path_str(&file), "--cost-cache", path_str(&cache), "--json", "--threads", "2"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cache"]["status"], "calibrated", "another thread count is another device");
    assert!(v["cache"]["miss_reason"].as_str().unwrap().contains("measured on"), "{v}");

    // select --latency-ms uses the cached model of the chosen backend.
    let out = matformer(&[
        "select",
        path_str(&file),
        "--latency-ms",
        "1000",
        "--cost-cache",
        path_str(&cache),
        "--threads",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["plan"]["predicted_ms_per_token"].as_f64().unwrap() > 0.0);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cached"), "the cache was used");
}

#[test]
fn latency_command_on_the_gpu() {
    if !gpu_available() {
        return;
    }
    let cache = tmp("cost-gpu.json");
    let _ = std::fs::remove_file(&cache);
    let out = matformer(&[
        "latency",
        path_str(&fixture("matlm.matf")),
        "--backend",
        "gpu",
        "--cost-cache",
        path_str(&cache),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"]["device"]["backend"], "gpu");
    assert!(v["model"]["fit_runs"].as_array().unwrap().len() >= 3, "short and long context decodes");
    let uniform = v["uniform_predictions"]["ms_per_token"].as_array().unwrap();
    assert_eq!(uniform.len(), 4);
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
    assert!(switches.iter().all(|s| s["uploaded_bytes"] == 0 && s["backend"] == "cpu"));
    assert!(v["memory_pressure"][0]["bytes_advised"].as_u64().unwrap() > 0);
}

#[test]
fn bench_switch_on_the_gpu_uploads_only_missing_rows() {
    if !gpu_available() {
        return;
    }
    let file = fixture("matlm.matf");
    let out = matformer(&[
        "bench",
        path_str(&file),
        "--switch",
        "--backend",
        "gpu",
        "--prompt-len",
        "8",
        "--gen-len",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["switches"].as_array().unwrap();
    let what: Vec<&str> = rows.iter().map(|r| r["what"].as_str().unwrap()).collect();
    assert_eq!(what.len(), 6, "{what:?}");
    let uploaded: Vec<u64> = rows.iter().map(|r| r["uploaded_bytes"].as_u64().unwrap()).collect();
    // Cold upshift s -> xl uploads the missing FFN rows; later shifts upload nothing until the
    // memory-pressure call frees them, and the cold upshift after it uploads them again.
    assert!(uploaded[0] > 0, "{uploaded:?}");
    assert!(uploaded[1..5].iter().all(|&b| b == 0), "{uploaded:?}");
    assert_eq!(uploaded[5], uploaded[0], "{uploaded:?}");
    let p = &v["memory_pressure"][0];
    assert_eq!(p["gpu_bytes_released"].as_u64(), Some(uploaded[0]));
    assert!(p["gpu_memory_after"].as_u64() < p["gpu_memory_before"].as_u64());
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

#[test]
fn chat_answers_one_prompt_and_runs_an_interactive_session() {
    let out = matformer(&[
        "chat",
        path_str(&fixture("matlm.matf")),
        "--prompt",
        "The meaning of ",
        "-n",
        "8",
        "--backend",
        "cpu",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["usage"]["completion_tokens"].as_u64(), Some(8));
    assert_eq!(v["finish_reason"], "length");

    let mut child = Command::new(env!("CARGO_BIN_EXE_matformer"))
        .args(["chat", path_str(&fixture("matlm.matf")), "-n", "6", "--backend", "cpu", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run matformer chat");
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(b"A word\nThe end\n/reset\nA word\n/quit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let turns: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(turns.len(), 3, "one JSON object per turn");
    assert!(turns[1]["usage"]["cached_prompt_tokens"].as_u64().unwrap() > 0, "the second turn reuses the cache");
    assert_eq!(turns[2]["usage"]["cached_prompt_tokens"].as_u64(), Some(0), "/reset forgets the conversation");
    assert_eq!(turns[2]["token_ids"], turns[0]["token_ids"], "after /reset the same question gets the same answer");
}

#[test]
fn bench_defaults_to_one_row_on_a_single_level_import() {
    // A dense import has one level: the default rows (smallest and largest) are the same one.
    let file = tmp("tiny_llama_bench.matf");
    let out = matformer(&["import", path_str(&fixture("tiny_llama.gguf")), "-o", path_str(&file)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = matformer(&[
        "bench",
        path_str(&file),
        "--backend",
        "cpu",
        "--prompt-len",
        "4",
        "--gen-len",
        "2",
        "--repetitions",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
}

#[test]
fn eval_scores_an_imported_model_with_its_own_tokenizer() {
    // An imported model's perplexity is per token of its BPE, the text encoded once and cut
    // into chunks; bits per byte divide the same total by the text's bytes.
    let file = tmp("tiny_llama_eval.matf");
    let out = matformer(&["import", path_str(&fixture("tiny_llama.gguf")), "-o", path_str(&file), "--dtype", "keep"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = tmp("eval_text.txt");
    let body = "The quick brown fox jumps over the lazy dog. Hello world, hello tokens.\n".repeat(4);
    std::fs::write(&text, &body).unwrap();
    let out = matformer(&["eval", path_str(&file), "--text", path_str(&text), "--chunk", "16", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &v[0];
    let tokens = row["predicted_tokens"].as_u64().unwrap() as usize;
    assert!(tokens > 0 && tokens < body.len(), "{tokens} tokens for {} bytes: BPE, not bytes", body.len());
    let nats = row["nats_per_token"].as_f64().unwrap();
    let bpb = row["bits_per_byte"].as_f64().unwrap();
    assert!(nats.is_finite() && nats > 0.0);
    let want = nats * tokens as f64 / body.len() as f64 / std::f64::consts::LN_2;
    assert!((bpb - want).abs() < 1e-9, "{bpb} vs {want}");
    assert!((row["perplexity"].as_f64().unwrap() - nats.exp()).abs() < 1e-6);
}
