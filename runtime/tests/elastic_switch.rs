//! Switching submodels mid-generation ([`ElasticSession`]) on a memory-mapped model file:
//! exactness of the output after a down- or upshift, resident memory after memory pressure
//! (read from `/proc/self/smaps` on Linux), and errors that leave the session unchanged.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use matformer::cpu::{argmax, CpuEngine, EngineError};
use matformer::elastic::{ElasticError, ElasticSession, MemoryPressure, SwitchDirection};
use matformer::format::testing::{synthetic_file, synthetic_metadata, write_synthetic};
use matformer::format::{DType, Metadata};
use matformer::{ModelFile, Submodel, SubmodelError};

/// d_model 256, 2 layers, FFN widths [256, 512, 1024, 2048], gated: about 6.4 MiB in f16, of
/// which about 5.6 MiB are levels 1..3.
fn big_meta() -> Metadata {
    synthetic_metadata(256, 2, 4, 2, 64, 260, vec![vec![256, 512, 1024, 2048]], true, false)
}

/// A model file on disk, removed on drop.
struct TempModel {
    path: PathBuf,
    model: Arc<ModelFile>,
}

impl TempModel {
    fn write(tag: &str) -> TempModel {
        let path = std::env::temp_dir().join(format!("matformer-elastic-switch-{}-{tag}.matf", std::process::id()));
        let file = std::fs::File::create(&path).expect("create model file");
        let mut out = std::io::BufWriter::new(file);
        write_synthetic(&mut out, &big_meta(), DType::F16, 11).expect("write model");
        out.flush().expect("flush model");
        drop(out);
        let path = path.canonicalize().expect("canonical path");
        let model = Arc::new(ModelFile::open(&path).expect("open model"));
        TempModel { path, model }
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn engine(model: &Arc<ModelFile>) -> CpuEngine {
    CpuEngine::new(model.clone()).expect("engine").with_threads(2)
}

fn sub(model: &ModelFile, spec: &str) -> Submodel {
    Submodel::parse(spec, model.metadata(), model.view().available_levels).expect("submodel")
}

fn prompt() -> Vec<u32> {
    (0..24u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) % 256).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Greedy: `n` tokens from `logits`, feeding each; returns the tokens and the logits after each.
fn greedy<E: std::fmt::Debug>(
    mut logits: Vec<f32>,
    n: usize,
    mut decode: impl FnMut(u32) -> Result<Vec<f32>, E>,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut toks = Vec::new();
    let mut all = Vec::new();
    for _ in 0..n {
        let t = argmax(&logits);
        toks.push(t);
        logits = decode(t).expect("decode");
        all.push(logits.clone());
    }
    (toks, all)
}

/// Generates 8 tokens with `from`, switches to `to`, generates 8 more, and checks tokens and
/// logits bitwise against a fresh `to` session fed the same prompt and first 8 tokens.
/// Returns the switch time in milliseconds.
fn check_switch(model: &Arc<ModelFile>, from: &str, to: &str, direction: SwitchDirection) -> f64 {
    let (from_sub, to_sub) = (sub(model, from), sub(model, to));
    let mut es = ElasticSession::new(engine(model), &from_sub).expect("elastic session");
    let p = prompt();
    let logits = es.prefill(&p).expect("prefill");
    let (first, _) = greedy(logits, 8, |t| es.decode(t));
    let mut prefix = p.clone();
    prefix.extend_from_slice(&first);
    assert_eq!(es.history(), &prefix[..]);

    let report = es.switch_to(&to_sub).expect("switch");
    assert_eq!(report.direction, direction);
    let meta = model.metadata();
    assert_eq!((report.from.clone(), report.to.clone()), (from_sub.name(meta), to_sub.name(meta)));
    assert_eq!(report.reprefilled_tokens, prefix.len());
    assert_eq!(es.submodel(), &to_sub);
    assert_eq!(es.history(), &prefix[..]);
    assert_eq!(es.position(), prefix.len());
    let switched = report.last_logits.clone().expect("logits after switch");

    let eng = engine(model);
    let mut fresh = eng.session(&to_sub).expect("fresh session");
    let fresh_logits = fresh.prefill(&prefix).expect("fresh prefill");
    assert_eq!(bits(&switched), bits(&fresh_logits), "{from} -> {to}: logits right after the switch");
    // The check means something: the old submodel gives other logits on the same prefix.
    let mut old = eng.session(&from_sub).expect("old session");
    assert_ne!(bits(&old.prefill(&prefix).expect("old prefill")), bits(&fresh_logits));

    let (second, second_logits) = greedy(switched, 8, |t| es.decode(t));
    let (expected, expected_logits) = greedy(fresh_logits, 8, |t| fresh.decode(t));
    assert_eq!(second, expected, "{from} -> {to}: tokens after the switch");
    for (i, (a, b)) in second_logits.iter().zip(&expected_logits).enumerate() {
        assert_eq!(bits(a), bits(b), "{from} -> {to}: logits of token {i} after the switch");
    }
    assert_eq!(es.history().len(), prefix.len() + 8);
    println!(
        "{from} -> {to} ({direction:?}): {:.3} ms to re-prefill {} tokens",
        report.elapsed_ms, report.reprefilled_tokens
    );
    report.elapsed_ms
}

#[test]
fn downshift_and_upshift_mid_generation_are_exact() {
    let tm = TempModel::write("exact");
    let model = &tm.model;
    check_switch(model, "xl", "s", SwitchDirection::Downshift);
    check_switch(model, "s", "xl", SwitchDirection::Upshift);
    check_switch(model, "l", "m", SwitchDirection::Downshift);
    // Mix'n'Match: layer 0 grows, layer 1 shrinks.
    check_switch(model, "0,3", "2,1", SwitchDirection::Mixed);
}

#[test]
fn switching_to_the_same_submodel_keeps_the_session() {
    let tm = TempModel::write("same");
    let model = &tm.model;
    let mut es = ElasticSession::new(engine(model), &sub(model, "m")).expect("elastic session");
    let empty = es.switch_to(&sub(model, "xl")).expect("switch with empty history");
    assert_eq!((empty.reprefilled_tokens, empty.last_logits), (0, None));
    let logits = es.prefill(&prompt()).expect("prefill");
    let logits = es.decode(argmax(&logits)).expect("decode");
    let report = es.switch_to(&sub(model, "xl")).expect("switch");
    assert_eq!(report.direction, SwitchDirection::Same);
    assert_eq!(report.reprefilled_tokens, 0);
    assert_eq!(report.last_logits.as_deref().map(bits), Some(bits(&logits)));
    assert_eq!(es.position(), prompt().len() + 1);
}

/// Resident bytes of every mapping of `path` in this process (sum of the `Rss:` lines of
/// `/proc/self/smaps`); `None` when that file cannot be read.
fn mapping_rss(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let target = path.to_str()?;
    let mut in_mapping = false;
    let mut total = 0u64;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(&first) = fields.first() else { continue };
        let is_header = first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if is_header {
            // address perms offset dev inode [pathname]
            in_mapping = fields.len() > 5 && fields[5..].join(" ") == target;
        } else if in_mapping && first == "Rss:" {
            let kb: u64 = fields.get(1).and_then(|v| v.parse().ok()).expect("Rss value");
            total += kb * 1024;
        }
    }
    Some(total)
}

/// `None` (with a printed reason) where `/proc/self/smaps` does not exist; panics on Linux if
/// it cannot be read.
fn rss_or_skip(path: &Path, test: &str) -> Option<u64> {
    match mapping_rss(path) {
        Some(v) => Some(v),
        None if cfg!(target_os = "linux") => panic!("/proc/self/smaps is unreadable on Linux"),
        None => {
            println!("{test}: skipped: /proc/self/smaps is not available on this OS");
            None
        }
    }
}

/// Runs the largest submodel, applies `pressure`, and checks that the resident bytes of the
/// mapping fall by at least 90% of the bytes above `expect_level` (rounded down to 4 KiB).
fn check_pressure(tag: &str, pressure: MemoryPressure, expect_sub: &str, expect_level: usize) {
    let tm = TempModel::write(tag);
    let model = &tm.model;
    let Some(initial) = rss_or_skip(&tm.path, tag) else { return };
    let mut es = ElasticSession::new(engine(model), &sub(model, "xl")).expect("elastic session");
    let logits = es.prefill(&prompt()).expect("prefill");
    let (_, logits) = greedy(logits, 4, |t| es.decode(t));
    let before = rss_or_skip(&tm.path, tag).expect("smaps");

    let report = es.on_memory_pressure(pressure).expect("memory pressure");
    let after = rss_or_skip(&tm.path, tag).expect("smaps");
    assert_eq!(es.submodel(), &sub(model, expect_sub));
    assert_eq!(report.switch.direction, SwitchDirection::Downshift);
    assert_eq!(report.released_above_level, expect_level);
    let file_len = model.bytes().len() as u64;
    let above = file_len - model.view().level_ends[expect_level];
    assert!(report.bytes_advised <= above && report.bytes_advised + (64 << 10) >= above, "{report:?}");

    // Generation goes on with the small submodel without faulting the released levels back.
    let last = logits.last().cloned().unwrap_or_default();
    let next = argmax(report.switch.last_logits.as_deref().unwrap_or(&last));
    es.decode(next).expect("decode after pressure");
    let after_decode = rss_or_skip(&tm.path, tag).expect("smaps");

    let need = ((above as f64 * 0.9) as u64) / 4096 * 4096;
    println!(
        "{tag}: file {file_len} B, above level {expect_level}: {above} B; mapping resident: {initial} B at open, \
         {before} B after running xl, {after} B after {pressure:?} ({} B advised, switch {:.3} ms), \
         {after_decode} B after one more token",
        report.bytes_advised, report.switch.elapsed_ms
    );
    assert!(before >= above, "running xl should have touched every level: {before} < {above}");
    assert!(before.saturating_sub(after) >= need, "resident bytes fell by {} < {need}", before - after.min(before));
    assert!(before.saturating_sub(after_decode) >= need, "released levels were faulted back: {after_decode}");
}

#[test]
fn critical_pressure_releases_every_level_above_the_smallest() {
    check_pressure("critical", MemoryPressure::Critical, "s", 0);
}

#[test]
fn moderate_pressure_shrinks_one_level_and_releases_the_top() {
    check_pressure("moderate", MemoryPressure::Moderate, "l", 2);
}

#[test]
fn release_levels_above_reports_advised_bytes() {
    let tm = TempModel::write("release");
    let model = &tm.model;
    let view = model.view();
    let file_len = model.bytes().len() as u64;
    let granule = view.alignment.max(64 << 10);
    let start = view.level_ends[0].div_ceil(granule) * granule;
    assert_eq!(model.release_levels_above(0).expect("release"), file_len - start);
    assert_eq!(model.release_levels_above(3).expect("release top"), 0);
    assert_eq!(model.release_levels_above(99).expect("release beyond"), 0);
    // Released pages read back the same bytes.
    let owned = ModelFile::from_bytes(std::fs::read(&tm.path).expect("read")).expect("owned");
    assert!(model.bytes() == owned.bytes());
    assert_eq!(owned.release_levels_above(0).expect("owned release"), 0);
}

#[test]
fn failed_switch_leaves_the_session_unchanged() {
    // A file cut after level 1: levels 2 and 3 (l, xl) are not available.
    let meta = big_meta();
    let mut bytes = synthetic_file(&meta, DType::F16, 5).expect("model bytes");
    let full = Arc::new(ModelFile::from_bytes(bytes.clone()).expect("full"));
    bytes.truncate(full.view().level_ends[1] as usize);
    let model = Arc::new(ModelFile::from_bytes(bytes).expect("cut"));
    assert_eq!(model.view().available_levels, 2);

    let start = sub(&model, "m");
    let mut es = ElasticSession::new(engine(&model), &start).expect("elastic session");
    let logits = es.prefill(&prompt()).expect("prefill");
    let (toks, _) = greedy(logits, 3, |t| es.decode(t));
    let history = es.history().to_vec();

    let xl = Submodel::uniform(3, 2);
    match es.switch_to(&xl) {
        Err(ElasticError::Cpu(EngineError::Submodel(SubmodelError::LevelNotAvailable {
            level: 3,
            available: 2,
            ..
        }))) => {}
        other => panic!("expected LevelNotAvailable, got {other:?}"),
    }
    match es.switch_to(&Submodel::new(vec![0, 0, 0])) {
        Err(ElasticError::Cpu(EngineError::Submodel(SubmodelError::WrongLayerCount { expected: 2, found: 3 }))) => {}
        other => panic!("expected WrongLayerCount, got {other:?}"),
    }
    assert!(matches!(ElasticSession::new(engine(&model), &xl), Err(ElasticError::Cpu(EngineError::Submodel(_)))));
    assert_eq!(es.submodel(), &start);
    assert_eq!(es.history(), &history[..]);
    assert_eq!(es.position(), history.len());

    // The next token is exactly what an uninterrupted session gives.
    let next = argmax(&es.decode(*toks.last().expect("token")).expect("decode"));
    let mut control = engine(&model).session(&start).expect("control");
    let mut fed = history.clone();
    fed.push(*toks.last().expect("token"));
    assert_eq!(argmax(&control.prefill(&fed).expect("control prefill")), next);

    // An available level still works.
    let report = es.switch_to(&sub(&model, "s")).expect("switch to s");
    assert_eq!(report.direction, SwitchDirection::Downshift);
    assert_eq!(report.reprefilled_tokens, history.len() + 1);
}
