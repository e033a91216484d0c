//! Catalog calibration (`matformer_export::calibrate`) on the bundled trained model: losses
//! decrease with width, the corrected additive prediction is close to the measurements and
//! ranks them, the calibrated catalog stores and reloads, and selection then picks the best
//! loss.

use std::sync::Arc;

use matformer::cpu::CpuEngine;
use matformer::elastic::{select, Catalog, DeviceBudget, Policy, CATALOG_KEY};
use matformer::format::testing::synthetic_file;
use matformer::format::{DType, Metadata};
use matformer::ModelFile;
use matformer_export::calibrate::{calibrate, CalibrationOptions};
use matformer_tests::fixture;

/// A file with random weights and `meta` as its metadata (the stored catalog is what is read).
fn synthetic_with(meta: &Metadata) -> ModelFile {
    let bytes = synthetic_file(meta, DType::F16, 7).expect("synthetic file");
    ModelFile::from_bytes(bytes).expect("parse")
}

/// The bundled trained model and the first 4 KiB of its held-out text.
fn bundled() -> (Arc<ModelFile>, Vec<u8>) {
    let model = ModelFile::open(fixture("matlm.matf")).expect("tests/fixtures/matlm.matf");
    let mut text = std::fs::read(fixture("heldout.txt")).expect("tests/fixtures/heldout.txt");
    text.truncate(4096);
    (Arc::new(model), text)
}

#[test]
fn calibration_on_the_bundled_model() {
    let (model, text) = bundled();
    let start = std::time::Instant::now();
    let engine = CpuEngine::new(model.clone()).expect("engine");
    let catalog = Catalog::from_model(&model);
    assert_eq!(catalog.entries.len(), 35);
    // 6 frontier points keep the test within ~20 s on a loaded 2-core machine (22 evaluations).
    let options = CalibrationOptions { max_frontier_evals: 6, ..CalibrationOptions::default() };
    let report = calibrate(&engine, &catalog, &text, &options, |line| eprintln!("{line}")).expect("calibration");
    let u: Vec<f64> = report.uniform_losses.iter().map(|n| n.loss).collect();
    eprintln!("uniform losses: {:?}", report.uniform_losses);
    assert_eq!(u.len(), 4);
    assert!(u.windows(2).all(|w| w[1] < w[0]), "uniform losses decrease with width: {u:?}");
    let s = &report.summary;
    eprintln!(
        "prediction: {} checked, mean |err| {:?}, max |err| {:?}, Spearman {:?}; {} evaluations in {:.1?}",
        s.checked_points,
        s.mean_abs_error,
        s.max_abs_error,
        s.spearman,
        s.evaluations,
        start.elapsed()
    );
    for c in &report.checks {
        eprintln!("  {:<10} predicted {:.5} measured {:.5}", c.name, c.predicted_loss, c.measured_loss);
    }
    for (i, row) in report.sensitivity.iter().enumerate() {
        eprintln!("  layer {i} deltas by level: {row:?}");
    }
    eprintln!("frontier: {:?}", report.frontier);
    assert!(s.checked_points >= 3);
    assert!(s.mean_abs_error <= s.uncorrected_mean_abs_error, "the correction helps");
    assert!(s.spearman.is_some_and(|r| r > 0.8));
    assert!(s.mean_abs_error.is_some_and(|e| e.is_finite() && e < 0.05));
    assert!(report.catalog.entries.iter().all(|e| e.predicted_loss.is_some()));
    assert!(!report.frontier.is_empty());
    let best = report
        .catalog
        .entries
        .iter()
        .filter(|e| e.loss().is_some())
        .min_by(|a, b| a.loss().unwrap_or(f64::INFINITY).total_cmp(&b.loss().unwrap_or(f64::INFINITY)));
    assert_eq!(report.frontier.last(), best.map(|e| &e.name), "the frontier ends at the best loss");
    // The calibrated catalog stores and reloads into the same losses.
    let json = report.catalog.to_json();
    let mut meta = model.metadata().clone();
    meta.extra.insert(CATALOG_KEY.to_string(), json);
    let synth = synthetic_with(&meta);
    let back = Catalog::from_metadata_extra(&synth).expect("reload");
    // (serde_json parses floats to within an ulp.)
    let (a, b) = (back.calibration.as_ref().expect("stored"), report.catalog.calibration.as_ref().expect("set"));
    assert_eq!((a.evaluations, a.checked_points, a.text_bytes), (b.evaluations, b.checked_points, b.text_bytes));
    assert!((a.full_loss - b.full_loss).abs() < 1e-12);
    for e in &report.catalog.entries {
        let b = back.find_levels(&e.levels.levels).and_then(|b| b.loss()).unwrap_or(f64::NAN);
        assert!((b - e.loss().unwrap_or(f64::NAN)).abs() < 1e-12, "{}", e.name);
    }
    // Selection with losses picks the best loss that fits.
    let plan = select(&report.catalog, &DeviceBudget::default(), &Policy::default(), None).expect("plan");
    eprintln!("{}", plan.explanation);
    let best = report.catalog.entries.iter().filter_map(|e| e.loss()).fold(f64::INFINITY, f64::min);
    assert_eq!(plan.entry.loss(), Some(best));
}
