//! `matformer eval`'s loss on the held-out text reproduces the model card's PyTorch loss table
//! (tests/fixtures/loss_table.json) for every uniform width and every Mix'n'Match config in it.

use std::sync::Arc;

use matformer::cpu::CpuEngine;
use matformer::tokenizer::ByteTokenizer;
use matformer::{ModelFile, Submodel};
use matformer_export::eval::mean_cross_entropy;
use matformer_tests::fixture;

/// f16 storage moves logits by at most ~3e-4 of their scale (export verification), which moves a
/// mean cross-entropy by far less than 1e-3 nats; a wrong width or layer moves it by > 1e-2.
const LOSS_TOLERANCE_NATS: f64 = 1e-3;

#[test]
fn eval_reproduces_the_pytorch_loss_table() {
    let model = Arc::new(ModelFile::open(fixture("matlm.matf")).unwrap());
    let meta = model.metadata().clone();
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("loss_table.json")).unwrap()).unwrap();
    let text = std::fs::read(fixture("heldout.txt")).unwrap();
    let chunk = table["chunk_bytes"].as_u64().unwrap() as usize + 1;
    let tok = ByteTokenizer::from_metadata(&meta);
    let engine = CpuEngine::new(model.clone()).unwrap();
    let rows = table["results"].as_array().unwrap();
    assert!(rows.len() >= 7, "4 widths and at least 3 Mix'n'Match configs");
    let mut previous = f64::INFINITY;
    for row in rows {
        let levels: Vec<u8> = row["levels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
        let expected = row["nats_per_byte"].as_f64().unwrap();
        let sub = Submodel::new(levels.clone());
        let got = mean_cross_entropy(&engine, &sub, &tok, &text, chunk).unwrap();
        assert_eq!(got.predicted_tokens, text.len());
        eprintln!("{:<10} ours {:.6}  pytorch {expected:.6}", row["name"].as_str().unwrap(), got.nats_per_token);
        assert!(
            (got.nats_per_token - expected).abs() <= LOSS_TOLERANCE_NATS,
            "{}: {} vs PyTorch {expected}",
            row["name"],
            got.nats_per_token
        );
        // Uniform widths come first in the table: loss falls as the width grows.
        if levels.iter().all(|&l| l == levels[0]) {
            assert!(got.nats_per_token < previous, "wider is better");
            previous = got.nats_per_token;
        }
    }
}
