//! The prefix property on the bundled model: a copy cut at a level boundary is a valid smaller
//! model that generates exactly what the full file generates at that width; a cut anywhere else
//! is a clear error.

use std::sync::Arc;

use matformer::cpu::{generate_greedy, CpuEngine};
use matformer::{ModelFile, Submodel};
use matformer_tests::fixture;

fn greedy(model: Arc<ModelFile>, sub: &Submodel, prompt: &[u32]) -> Vec<u32> {
    let engine = CpuEngine::new(model).unwrap();
    let mut s = engine.session(sub).unwrap();
    generate_greedy(&mut s, prompt, 32, None, |_| {}).unwrap()
}

#[test]
fn a_cut_at_each_level_boundary_is_the_smaller_model() {
    let bytes = std::fs::read(fixture("matlm.matf")).unwrap();
    let full = Arc::new(ModelFile::from_bytes(bytes.clone()).unwrap());
    let n_levels = full.metadata().n_levels();
    let n_layers = full.metadata().architecture.n_layers as usize;
    let prompt: Vec<u32> = [256u32].into_iter().chain(b"A dictionary ".iter().map(|&b| b as u32)).collect();
    for j in 0..n_levels {
        let end = full.view().level_ends[j] as usize;
        let cut = Arc::new(ModelFile::from_bytes(bytes[..end].to_vec()).expect("a cut at a level end opens"));
        assert_eq!(cut.view().available_levels, j + 1);
        cut.verify().expect("the cut copy verifies");
        let sub = Submodel::uniform(j as u8, n_layers);
        assert_eq!(greedy(cut.clone(), &sub, &prompt), greedy(full.clone(), &sub, &prompt), "level {j}");
        // Larger submodels are not available in the cut copy.
        if j + 1 < n_levels {
            let too_big = Submodel::uniform(j as u8 + 1, n_layers);
            let engine = CpuEngine::new(cut.clone()).unwrap();
            assert!(engine.session(&too_big).is_err(), "level {} is not in a copy cut after level {j}", j + 1);
        }
    }
}

#[test]
fn a_cut_anywhere_else_is_an_error() {
    let bytes = std::fs::read(fixture("matlm.matf")).unwrap();
    let full = ModelFile::from_bytes(bytes.clone()).unwrap();
    let ends = full.view().level_ends.clone();
    let header = full.view().header_len as usize;
    for len in [
        0,
        3,
        64,
        header - 1,
        header,
        ends[0] as usize - 1,
        ends[0] as usize + 1,
        ends[1] as usize + 4096,
        bytes.len() - 1,
    ] {
        let err = ModelFile::from_bytes(bytes[..len].to_vec()).err();
        assert!(err.is_some(), "a copy cut at {len} bytes must be refused");
        let msg = err.unwrap().to_string();
        assert!(!msg.is_empty() && !msg.contains('\n'), "one-line error: {msg}");
    }
}
