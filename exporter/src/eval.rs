//! Language-model evaluation: mean next-token cross-entropy of a text under a submodel.
//!
//! The text is split into chunks of `chunk - 1` bytes; each chunk is scored after a BOS token,
//! and every byte of every chunk is predicted exactly once (the BOS is never predicted). This is
//! the algorithm of the model card (tests/fixtures/README.md) and of
//! `exporter/python/eval_loss_table.py`, so `matformer eval` reproduces the PyTorch loss table.

use matformer::cpu::{CpuEngine, EngineError};
use matformer::tokenizer::ByteTokenizer;
use matformer::Submodel;

/// Result of [`mean_cross_entropy`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossReport {
    /// Mean cross-entropy in nats per predicted token (= per byte for the byte tokenizer).
    pub nats_per_token: f64,
    /// Tokens predicted.
    pub predicted_tokens: usize,
}

/// Errors of [`mean_cross_entropy`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// Nothing to score.
    #[error("the text is empty: nothing to score")]
    EmptyText,
    /// The tokenizer has no BOS token to start each chunk with.
    #[error("evaluation needs a tokenizer with a BOS token")]
    NoBos,
    /// Chunks must hold BOS and at least one byte, and fit the context.
    #[error("chunk of {chunk} tokens is outside 2..={max_context} (BOS + at least one byte, within the context)")]
    BadChunk {
        /// Requested chunk length.
        chunk: usize,
        /// Model context.
        max_context: usize,
    },
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Mean cross-entropy of `text` under `submodel`, in chunks of `chunk` tokens (BOS included).
pub fn mean_cross_entropy(
    engine: &CpuEngine,
    submodel: &Submodel,
    tokenizer: &ByteTokenizer,
    text: &[u8],
    chunk: usize,
) -> Result<LossReport, EvalError> {
    let bos = tokenizer.bos_id.ok_or(EvalError::NoBos)?;
    let ids: Vec<u32> = text.iter().map(|&b| u32::from(b)).collect();
    mean_cross_entropy_tokens(engine, submodel, bos, &ids, chunk)
}

/// Mean cross-entropy of the token sequence `ids` under `submodel`: split into pieces of
/// `chunk - 1` tokens, each scored after `bos`, every token predicted exactly once. For a
/// model's own tokenizer (`matformer eval` on an imported model) the pieces are cut at token
/// boundaries of the whole text's encoding.
pub fn mean_cross_entropy_tokens(
    engine: &CpuEngine,
    submodel: &Submodel,
    bos: u32,
    ids: &[u32],
    chunk: usize,
) -> Result<LossReport, EvalError> {
    let max_context = engine.model().metadata().architecture.max_context as usize;
    if !(2..=max_context).contains(&chunk) {
        return Err(EvalError::BadChunk { chunk, max_context });
    }
    if ids.is_empty() {
        return Err(EvalError::EmptyText);
    }
    let vocab = engine.model().metadata().architecture.vocab_size as usize;
    let mut session = engine.session(submodel)?;
    let mut total = 0f64;
    let mut count = 0usize;
    for piece in ids.chunks(chunk - 1) {
        let mut ids = Vec::with_capacity(piece.len() + 1);
        ids.push(bos);
        ids.extend_from_slice(piece);
        session.reset();
        // Logits at positions 0..n-1 predict tokens 1..n.
        let logits = session.forward_all(&ids[..ids.len() - 1])?;
        for (p, &target) in ids[1..].iter().enumerate() {
            let row = &logits[p * vocab..(p + 1) * vocab];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
            total += sum.ln() + f64::from(max) - f64::from(row[target as usize]);
            count += 1;
        }
    }
    Ok(LossReport { nats_per_token: total / count as f64, predicted_tokens: count })
}
