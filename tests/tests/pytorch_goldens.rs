//! The CPU engine on the bundled `.matf` against PyTorch goldens (float32 reference computed by
//! exporter/python/make_goldens.py): prompt logits for every width and two Mix'n'Match configs
//! within the f16-storage tolerance, and the greedy continuation token for token.

use std::sync::Arc;

use matformer::cpu::{argmax, CpuEngine};
use matformer::{ModelFile, Submodel};
use matformer_export::verify::{compare, Tolerance};
use matformer_tests::{fixture, goldens};

fn bundled() -> Arc<ModelFile> {
    Arc::new(ModelFile::open(fixture("matlm.matf")).expect("open bundled matlm.matf"))
}

#[test]
fn prompt_logits_match_pytorch_at_every_width() {
    let model = bundled();
    let g = goldens();
    let meta = model.metadata().clone();
    let vocab = meta.architecture.vocab_size as usize;
    let engine = CpuEngine::new(model.clone()).unwrap();
    assert!(g.cases.len() >= 6, "goldens cover 4 widths and 2 Mix'n'Match configs");
    for case in &g.cases {
        let sub = Submodel::new(case.levels.clone());
        assert_eq!(sub.widths(&meta), case.widths, "{}: level indices and widths agree", case.name);
        let mut session = engine.session(&sub).unwrap();
        let ours = session.forward_all(&g.prompt_ids).unwrap();
        let reference: Vec<f32> = case.logits.iter().flatten().copied().collect();
        let (max_diff, max_ref, agree, positions, ok) = compare(&reference, &ours, vocab, Tolerance::F16_STORAGE);
        eprintln!("{:<10} max|diff| {max_diff:.2e} of max|logit| {max_ref:.2}, argmax {agree}/{positions}", case.name);
        assert!(
            ok,
            "{}: logits differ from PyTorch by {max_diff} (scale {max_ref}) beyond {:?}",
            case.name,
            Tolerance::F16_STORAGE
        );
        assert_eq!(agree, positions, "{}: argmax agrees at every prompt position", case.name);
    }
}

#[test]
fn greedy_continuation_matches_pytorch_exactly() {
    let model = bundled();
    let g = goldens();
    let engine = CpuEngine::new(model.clone()).unwrap();
    for case in &g.cases {
        let sub = Submodel::new(case.levels.clone());
        let mut session = engine.session(&sub).unwrap();
        let mut logits = session.prefill(&g.prompt_ids).unwrap();
        let mut ours = Vec::new();
        for _ in 0..case.greedy_ids.len() {
            let next = argmax(&logits);
            ours.push(next);
            logits = session.decode(next).unwrap();
        }
        assert_eq!(
            ours, case.greedy_ids,
            "{}: greedy continuation of {:?} (PyTorch: {:?})",
            case.name, g.prompt, case.greedy_text
        );
    }
}
