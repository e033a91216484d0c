//! Growing a model file by appending levels to a file cut at a level boundary, and picking
//! them up mid-generation with [`ElasticSession::refresh`]: exactness of the continued
//! generation, verification of only the appended bytes, and errors that leave the session
//! unchanged.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use matformer::cpu::{argmax, CpuEngine};
use matformer::elastic::{ElasticError, ElasticSession};
use matformer::format::testing::{synthetic_file, synthetic_metadata};
use matformer::format::{DType, FormatError, Metadata};
use matformer::{ModelError, ModelFile, Submodel};

/// d_model 256, 2 layers, FFN widths [256, 512, 1024, 2048], gated, f16.
fn meta() -> Metadata {
    synthetic_metadata(256, 2, 4, 2, 64, 260, vec![vec![256, 512, 1024, 2048]], true, false)
}

/// A file on disk, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn write(tag: &str, bytes: &[u8]) -> TempFile {
        let path = std::env::temp_dir().join(format!("matformer-elastic-refresh-{}-{tag}.matf", std::process::id()));
        std::fs::write(&path, bytes).expect("write file");
        TempFile(path)
    }

    fn append(&self, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new().append(true).open(&self.0).expect("open for append");
        f.write_all(bytes).expect("append");
        f.flush().expect("flush");
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The full file and its level ends.
fn full_file() -> (Vec<u8>, Vec<u64>) {
    let bytes = synthetic_file(&meta(), DType::F16, 7).expect("synthetic file");
    let ends = ModelFile::from_bytes(bytes.clone()).expect("parse").view().level_ends.clone();
    (bytes, ends)
}

fn open_session(path: &PathBuf, level: u8) -> ElasticSession {
    let model = Arc::new(ModelFile::open(path).expect("open"));
    let n_layers = model.metadata().ffn_widths.len();
    let engine = CpuEngine::new(model).expect("engine").with_threads(2);
    ElasticSession::new(engine, &Submodel::uniform(level, n_layers)).expect("session")
}

fn prompt() -> Vec<u32> {
    (0..16u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 9) % 256).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Prefills the prompt and generates `n` greedy tokens; returns the last logits.
fn generate(s: &mut ElasticSession, n: usize) -> Vec<f32> {
    let mut logits = s.prefill(&prompt()).expect("prefill");
    for _ in 0..n {
        logits = s.decode(argmax(&logits)).expect("decode");
    }
    logits
}

/// Greedy continuation of `n` tokens from `logits`; returns every logits vector.
fn continue_greedy(
    mut logits: Vec<f32>,
    n: usize,
    mut decode: impl FnMut(u32) -> Result<Vec<f32>, ElasticError>,
) -> Vec<Vec<u32>> {
    let mut all = Vec::new();
    for _ in 0..n {
        logits = decode(argmax(&logits)).expect("decode");
        all.push(bits(&logits));
    }
    all
}

#[test]
fn refresh_picks_up_appended_levels_mid_generation() {
    let (full, ends) = full_file();
    let n_levels = ends.len();
    let cut = ends[1] as usize;
    let file = TempFile::write("grow", &full[..cut]);
    let mut s = open_session(&file.0, 1);
    assert_eq!(s.model().view().available_levels, 2);
    let logits = generate(&mut s, 4);

    file.append(&full[cut..]);
    let report = s.refresh().expect("refresh");
    println!("refresh of {} appended bytes: {:.2} ms", report.bytes_verified, report.elapsed_ms);
    assert_eq!(report.levels_before, 2);
    assert_eq!(report.levels_after, n_levels);
    assert_eq!(report.bytes_verified, full.len() as u64 - ends[1]);
    assert_eq!(s.model().view().available_levels, n_levels);
    assert_eq!(s.cpu_engine().expect("cpu").threads(), 2);
    assert_eq!(s.submodel(), &Submodel::uniform(1, 2));

    // The generation continues exactly as a session on the full file with the same history.
    let full_file = TempFile::write("grow-ref", &full);
    let mut r = open_session(&full_file.0, 1);
    let ref_logits = r.prefill(s.history()).expect("reference prefill");
    assert_eq!(bits(&ref_logits), bits(&logits));
    let ours = continue_greedy(logits.clone(), 4, |t| s.decode(t));
    let theirs = continue_greedy(ref_logits, 4, |t| r.decode(t));
    assert_eq!(ours, theirs);

    // The largest submodel is available now, and equals the reference's.
    let largest = Submodel::uniform((n_levels - 1) as u8, 2);
    let a = s.switch_to(&largest).expect("switch to largest");
    let b = r.switch_to(&largest).expect("reference switch");
    assert_eq!(a.last_logits.as_deref().map(bits), b.last_logits.as_deref().map(bits));

    // Nothing more appended: a no-op.
    let again = s.refresh().expect("second refresh");
    assert_eq!((again.levels_before, again.levels_after, again.bytes_verified), (n_levels, n_levels, 0));
}

#[test]
fn refresh_of_unchanged_file_is_a_noop() {
    let (full, ends) = full_file();
    let file = TempFile::write("same", &full[..ends[1] as usize]);
    let mut s = open_session(&file.0, 1);
    let logits = generate(&mut s, 2);
    let report = s.refresh().expect("refresh");
    assert_eq!((report.levels_before, report.levels_after, report.bytes_verified), (2, 2, 0));
    assert_eq!(s.position(), prompt().len() + 2);
    let next = s.decode(argmax(&logits)).expect("decode after no-op");
    assert_eq!(next.len(), 260);
}

#[test]
fn refresh_rejects_corrupt_appended_bytes_and_keeps_the_session() {
    let (full, ends) = full_file();
    let cut = ends[1] as usize;
    let file = TempFile::write("corrupt", &full[..cut]);
    let mut s = open_session(&file.0, 1);
    let logits = generate(&mut s, 3);
    let history = s.history().to_vec();

    // Flip one byte inside the first segment of level 2.
    let model = ModelFile::from_bytes(full.clone()).expect("parse");
    let seg_offset = model
        .view()
        .tensors
        .iter()
        .flat_map(|t| &t.segments)
        .filter(|seg| seg.level == 2)
        .map(|seg| seg.offset)
        .min()
        .expect("a level-2 segment");
    let mut grown = full[cut..].to_vec();
    grown[(seg_offset as usize - cut) + 5] ^= 0x40;
    file.append(&grown);

    let err = s.refresh().expect_err("corrupt bytes must be rejected");
    assert!(
        matches!(err, ElasticError::Model(ModelError::Format(FormatError::SegmentChecksum { level: 2, .. }))),
        "{err:?}"
    );
    assert!(err.to_string().contains("checksum mismatch"), "{err}");

    // Unchanged: same model, same size, same history, and it still decodes exactly.
    assert_eq!(s.model().view().available_levels, 2);
    assert_eq!(s.history(), &history[..]);
    let next = s.decode(argmax(&logits)).expect("decode after failed refresh");
    let mut r = open_session(&TempFile::write("corrupt-ref", &full).0, 1);
    r.prefill(&history).expect("reference prefill");
    let expected = r.decode(argmax(&logits)).expect("reference decode");
    assert_eq!(bits(&next), bits(&expected));
    assert!(s.switch_to(&Submodel::uniform(3, 2)).is_err());
}

#[test]
fn refresh_rejects_a_partial_level() {
    let (full, ends) = full_file();
    let cut = ends[1] as usize;
    let file = TempFile::write("partial", &full[..cut]);
    let mut s = open_session(&file.0, 1);
    let logits = generate(&mut s, 2);

    // Half of level 2.
    let half = cut + (ends[2] as usize - cut) / 2;
    file.append(&full[cut..half]);
    let err = s.refresh().expect_err("cut inside a level");
    assert!(
        matches!(err, ElasticError::Model(ModelError::Format(FormatError::TruncatedInsideLevel { level: 2, .. }))),
        "{err:?}"
    );
    assert_eq!(s.model().view().available_levels, 2);
    s.decode(argmax(&logits)).expect("decode after failed refresh");

    // The rest of the download arrives: now it works.
    file.append(&full[half..]);
    let report = s.refresh().expect("refresh after completing");
    assert_eq!(report.levels_after, ends.len());
    assert_eq!(report.bytes_verified, full.len() as u64 - ends[1]);
}

#[test]
fn refresh_rejects_another_model() {
    let (full, ends) = full_file();
    let file = TempFile::write("other", &full[..ends[1] as usize]);
    let mut s = open_session(&file.0, 0);
    generate(&mut s, 1);
    let other = synthetic_file(&meta(), DType::F16, 8).expect("other model");
    std::fs::write(&file.0, &other).expect("replace file");
    let err = s.refresh().expect_err("another model");
    assert!(matches!(err, ElasticError::Model(ModelError::GrownFileMismatch { .. })), "{err:?}");
    assert_eq!(s.model().view().available_levels, 2);
}

#[test]
fn reopen_grown_needs_a_path() {
    let (full, _) = full_file();
    let model = ModelFile::from_bytes(full).expect("parse");
    assert!(matches!(model.reopen_grown(), Err(ModelError::GrownFileMismatch { .. })));
}

#[test]
fn verify_levels_checks_only_the_given_levels() {
    let (full, ends) = full_file();
    let model = ModelFile::from_bytes(full.clone()).expect("parse");
    let view = model.view();
    assert_eq!(view.verify_levels(&full, 2..2).expect("empty"), 0);
    assert_eq!(view.verify_levels(&full, 1..ends.len()).expect("levels 1.."), full.len() as u64 - ends[0]);
    // Corrupt level 0: checking levels 1.. does not read it, checking 0..1 finds it.
    let mut bad = full.clone();
    bad[view.header_len as usize + 4096] ^= 1;
    view.verify_levels(&bad, 1..ends.len()).expect("level 0 not read");
    assert!(view.verify_levels(&bad, 0..1).is_err());
}
