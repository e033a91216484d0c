//! Calibration: losses for every catalog entry from a few exact evaluations.
//!
//! Evaluating all configurations exactly is too slow on a phone and unnecessary: the loss of a
//! Mix'n'Match submodel is close to additive in per-layer effects. [`calibrate`]:
//!
//! 1. measures the full model (every layer at the largest available level) and every uniform
//!    level (`s`, `m`, ...);
//! 2. measures each layer's sensitivity: the full model with ONE layer narrowed to each lower
//!    level, `delta[i][l] = loss(full with layer i at l) - loss(full)`
//!    (`n_layers * (levels - 1)` evaluations);
//! 3. predicts every entry additively, `D(c) = sum_i delta[i][c_i]`, corrected for the
//!    interaction between layers measured on the uniform levels: narrowing every layer costs
//!    less than the sum of narrowing each alone (on the bundled model about half), so
//!    `loss(c) = loss(full) + D(c) * r(D(c))` where `r` interpolates linearly through `(0, 1)`
//!    (a single narrowed layer is exact) and `(D(u), (loss(u) - loss(full)) / D(u))` for every
//!    uniform level `u`, constant beyond the smallest model, clamped to `[0, 4]`
//!    ([`CalibrationOptions::uniform_correction`]; without it `r = 1`);
//! 4. evaluates the predicted Pareto points (bytes against predicted loss) exactly, at most
//!    [`CalibrationOptions::max_frontier_evals`] of them (evenly spaced along the frontier);
//! 5. reports the prediction quality on every measured entry that was not used to fit the
//!    prediction (the frontier points; the uniform levels too without the correction): mean
//!    and max absolute error and the Spearman rank correlation of predicted against measured
//!    loss, and the plain additive prediction's mean error on the same points.
//!
//! Losses are mean cross-entropy in nats per token ([`crate::eval::mean_cross_entropy`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use matformer::cpu::CpuEngine;
use matformer::elastic::catalog::pareto_indices;
use matformer::elastic::{CalibrationSummary, Catalog};
use matformer::format::Metadata;
use matformer::tokenizer::ByteTokenizer;
use matformer::Submodel;

use crate::eval::{mean_cross_entropy, EvalError};

/// Knobs of [`calibrate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationOptions {
    /// Tokens per evaluation chunk, BOS included (clamped to `2..=max_context`). Default 256,
    /// the model card's chunking (255 bytes after a BOS).
    pub chunk_tokens: usize,
    /// Most predicted Pareto points evaluated exactly (step 4). Default 24.
    pub max_frontier_evals: usize,
    /// Correct the additive prediction along the uniform levels (step 3). Default `true`.
    pub uniform_correction: bool,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions { chunk_tokens: 256, max_frontier_evals: 24, uniform_correction: true }
    }
}

/// A named loss.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedLoss {
    /// Entry name.
    pub name: String,
    /// Loss, nats per token.
    pub loss: f64,
}

/// One checked point: prediction against measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PredictionCheck {
    /// Entry name.
    pub name: String,
    /// Weight bytes of the entry.
    pub weight_bytes: u64,
    /// Additive prediction.
    pub predicted_loss: f64,
    /// Exact loss.
    pub measured_loss: f64,
}

/// Everything [`calibrate`] found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationReport {
    /// The catalog with `predicted_loss` on every entry, `measured_loss` on the evaluated ones
    /// and `calibration` set; store it with [`Catalog::to_json`].
    pub catalog: Catalog,
    /// Summary (also in `catalog.calibration`).
    pub summary: CalibrationSummary,
    /// Measured loss of every uniform level, smallest first.
    pub uniform_losses: Vec<NamedLoss>,
    /// `sensitivity[layer][level]`: loss increase when only `layer` runs at `level` (0 at the
    /// largest available level).
    pub sensitivity: Vec<Vec<f64>>,
    /// Prediction against measurement on the checked points, smallest first.
    pub checks: Vec<PredictionCheck>,
    /// Names of the Pareto frontier (bytes against best known loss), smallest first.
    pub frontier: Vec<String>,
}

/// Errors of [`calibrate`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CalibrateError {
    /// The catalog was built for another model, or an entry does not run on this file.
    #[error("catalog does not match the engine's model: {reason}")]
    ModelMismatch {
        /// What differs.
        reason: String,
    },
    /// An evaluation failed (empty text, no BOS token, engine error).
    #[error(transparent)]
    Eval(#[from] EvalError),
}

/// Calibrates `catalog` for `engine`'s model on `text` (module documentation). `progress`
/// receives one line per step and per evaluation.
pub fn calibrate(
    engine: &CpuEngine,
    catalog: &Catalog,
    text: &[u8],
    options: &CalibrationOptions,
    mut progress: impl FnMut(&str),
) -> Result<CalibrationReport, CalibrateError> {
    let model = engine.model();
    let view = model.view();
    let meta = &view.metadata;
    let n_layers = meta.architecture.n_layers as usize;
    let available = view.available_levels.min(meta.n_levels());
    let mismatch = |reason: String| CalibrateError::ModelMismatch { reason };
    if catalog.model.n_layers != meta.architecture.n_layers || catalog.model.level_names != meta.level_names {
        return Err(mismatch(format!(
            "catalog has {} layers and levels [{}], the model {} and [{}]",
            catalog.model.n_layers,
            catalog.model.level_names.join(","),
            meta.architecture.n_layers,
            meta.level_names.join(",")
        )));
    }
    for e in &catalog.entries {
        e.levels.validate(meta, view.available_levels).map_err(|err| mismatch(format!("entry {}: {err}", e.name)))?;
    }
    if available == 0 || n_layers == 0 {
        return Err(mismatch("the model has no levels or no layers".to_string()));
    }
    let tokenizer = ByteTokenizer::from_metadata(meta);
    let chunk = options.chunk_tokens.clamp(2, (meta.architecture.max_context as usize).max(2));
    let top = u8::try_from(available - 1).unwrap_or(u8::MAX);

    let mut measured: BTreeMap<Vec<u8>, f64> = BTreeMap::new();
    let eval = |measured: &mut BTreeMap<Vec<u8>, f64>,
                levels: &[u8],
                progress: &mut dyn FnMut(&str)|
     -> Result<f64, CalibrateError> {
        if let Some(&l) = measured.get(levels) {
            return Ok(l);
        }
        let sub = Submodel::new(levels.to_vec());
        let report = mean_cross_entropy(engine, &sub, &tokenizer, text, chunk)?;
        let loss = report.nats_per_token;
        measured.insert(levels.to_vec(), loss);
        progress(&format!("  eval {:>3}: {:<24} {loss:.5} nats/token", measured.len(), config_name(levels, meta)));
        Ok(loss)
    };

    // 1. Full model and uniform levels.
    progress(&format!("calibrating on {} bytes, chunks of {chunk} tokens: uniform levels", text.len()));
    let full_levels = vec![top; n_layers];
    let full = eval(&mut measured, &full_levels, &mut progress)?;
    let mut uniform_losses = Vec::new();
    for l in 0..=top {
        let loss = eval(&mut measured, &vec![l; n_layers], &mut progress)?;
        uniform_losses.push(NamedLoss { name: config_name(&vec![l; n_layers], meta), loss });
    }

    // 2. Per-layer sensitivity.
    progress(&format!("sensitivity: {n_layers} layers x {top} lower levels"));
    let mut sensitivity = vec![vec![0.0f64; usize::from(top) + 1]; n_layers];
    let mut fitted: BTreeSet<Vec<u8>> = BTreeSet::new();
    fitted.insert(full_levels.clone());
    for (i, row) in sensitivity.iter_mut().enumerate() {
        for l in 0..top {
            let mut levels = full_levels.clone();
            levels[i] = l;
            row[usize::from(l)] = eval(&mut measured, &levels, &mut progress)? - full;
            fitted.insert(levels);
        }
    }

    // 3. Additive prediction, corrected along the uniform levels.
    let additive = |levels: &[u8]| -> f64 {
        levels
            .iter()
            .enumerate()
            .map(|(i, &l)| sensitivity.get(i).and_then(|r| r.get(usize::from(l))).copied().unwrap_or(0.0))
            .sum::<f64>()
    };
    let mut curve: Vec<(f64, f64)> = vec![(0.0, 1.0)];
    if options.uniform_correction {
        for l in 0..top {
            let lv = vec![l; n_layers];
            let d = additive(&lv);
            if let Some(&m) = measured.get(&lv) {
                if d > 1e-12 {
                    curve.push((d, ((m - full) / d).clamp(0.0, MAX_CORRECTION)));
                    fitted.insert(lv);
                }
            }
        }
        curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let predict = |levels: &[u8]| -> f64 {
        let d = additive(levels);
        full + d * correction(&curve, d)
    };
    let mut out = catalog.clone();
    for e in &mut out.entries {
        e.predicted_loss = Some(predict(&e.levels.levels));
        e.measured_loss = measured.get(&e.levels.levels).copied();
    }

    // 4. Exact evaluation of the predicted Pareto points.
    let frontier = pareto_indices(&out.entries, |e| e.predicted_loss);
    let pending: Vec<usize> = frontier.into_iter().filter(|&i| out.entries[i].measured_loss.is_none()).collect();
    let take = pending.len().min(options.max_frontier_evals);
    progress(&format!("predicted Pareto frontier: {} points to evaluate, {take} evaluated", pending.len()));
    let mut chosen: Vec<usize> = (0..take).map(|k| pending[k * pending.len() / take.max(1)]).collect();
    if take > 0 && !chosen.contains(&pending[pending.len() - 1]) {
        // Always include the largest pending point: the frontier's end matters most.
        chosen[take - 1] = pending[pending.len() - 1];
    }
    for i in chosen {
        let levels = out.entries[i].levels.levels.clone();
        out.entries[i].measured_loss = Some(eval(&mut measured, &levels, &mut progress)?);
    }
    for e in &mut out.entries {
        if e.measured_loss.is_none() {
            e.measured_loss = measured.get(&e.levels.levels).copied();
        }
    }

    // 5. Prediction quality on the points not used to fit.
    let checks: Vec<PredictionCheck> = out
        .entries
        .iter()
        .filter(|e| !fitted.contains(&e.levels.levels))
        .filter_map(|e| {
            Some(PredictionCheck {
                name: e.name.clone(),
                weight_bytes: e.weight_bytes,
                predicted_loss: e.predicted_loss?,
                measured_loss: e.measured_loss?,
            })
        })
        .collect();
    let errors: Vec<f64> = checks.iter().map(|c| (c.predicted_loss - c.measured_loss).abs()).collect();
    let mean_abs_error = (!errors.is_empty()).then(|| errors.iter().sum::<f64>() / errors.len() as f64);
    let max_abs_error = errors.iter().copied().reduce(f64::max);
    let predicted: Vec<f64> = checks.iter().map(|c| c.predicted_loss).collect();
    let measured_v: Vec<f64> = checks.iter().map(|c| c.measured_loss).collect();
    let spearman = spearman(&predicted, &measured_v);
    let uncorrected: Vec<f64> = out
        .entries
        .iter()
        .filter(|e| !fitted.contains(&e.levels.levels))
        .filter_map(|e| Some((full + additive(&e.levels.levels) - e.measured_loss?).abs()))
        .collect();
    let uncorrected_mean_abs_error =
        (!uncorrected.is_empty()).then(|| uncorrected.iter().sum::<f64>() / uncorrected.len() as f64);

    let summary = CalibrationSummary {
        text_bytes: text.len() as u64,
        chunk_tokens: u32::try_from(chunk).unwrap_or(u32::MAX),
        evaluations: u32::try_from(measured.len()).unwrap_or(u32::MAX),
        full_loss: full,
        checked_points: u32::try_from(checks.len()).unwrap_or(u32::MAX),
        mean_abs_error,
        max_abs_error,
        spearman,
        uncorrected_mean_abs_error,
        correction: curve.iter().skip(1).map(|&(d, r)| [d, r]).collect(),
    };
    progress(&format!(
        "done: {} evaluations; prediction on {} checked points: mean |err| {} (additive only {}), max |err| {}, Spearman {}",
        summary.evaluations,
        summary.checked_points,
        fmt_opt(mean_abs_error),
        fmt_opt(uncorrected_mean_abs_error),
        fmt_opt(max_abs_error),
        fmt_opt(spearman)
    ));
    out.calibration = Some(summary.clone());
    let frontier = out.pareto_frontier().into_iter().map(|e| e.name).collect();
    Ok(CalibrationReport { catalog: out, summary, uniform_losses, sensitivity, checks, frontier })
}

/// Largest correction ratio (the ratio is clamped to `[0, MAX_CORRECTION]`).
const MAX_CORRECTION: f64 = 4.0;

/// The correction ratio at additive delta `d`: linear between the curve's points (sorted by
/// delta, starting at `(0, 1)`), constant beyond the last one, 1 for `d <= 0`.
fn correction(curve: &[(f64, f64)], d: f64) -> f64 {
    if d <= 0.0 {
        return 1.0;
    }
    for w in curve.windows(2) {
        let ((d0, r0), (d1, r1)) = (w[0], w[1]);
        if d <= d1 {
            let t = if d1 > d0 { (d - d0) / (d1 - d0) } else { 1.0 };
            return r0 + t * (r1 - r0);
        }
    }
    curve.last().map_or(1.0, |&(_, r)| r)
}

/// The name [`Submodel::name`] gives `levels`.
fn config_name(levels: &[u8], meta: &Metadata) -> String {
    Submodel::new(levels.to_vec()).name(meta)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"))
}

/// Spearman rank correlation (average ranks for ties); `None` with fewer than two points,
/// different lengths, non-finite values or a constant series.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 || a.iter().chain(b).any(|v| !v.is_finite()) {
        return None;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

/// 1-based ranks, ties sharing their average rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut out = vec![0.0; v.len()];
    let mut k = 0;
    while k < order.len() {
        let mut end = k + 1;
        while end < order.len() && v[order[end]] == v[order[k]] {
            end += 1;
        }
        let rank = (k + 1 + end) as f64 / 2.0;
        for &i in &order[k..end] {
            out[i] = rank;
        }
        k = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_basics() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(spearman(&[1.0], &[1.0]), None);
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0, f64::NAN], &[1.0, 2.0]), None);
        assert_eq!(ranks(&[5.0, 1.0, 5.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
        let r = spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap_or(0.0);
        assert!((r - 0.8).abs() < 1e-12);
    }

    #[test]
    fn correction_interpolates() {
        let curve = [(0.0, 1.0), (1.0, 0.5), (3.0, 0.25)];
        assert_eq!(correction(&curve, -1.0), 1.0);
        assert_eq!(correction(&curve, 0.5), 0.75);
        assert_eq!(correction(&curve, 2.0), 0.375);
        assert_eq!(correction(&curve, 9.0), 0.25);
        assert_eq!(correction(&[(0.0, 1.0)], 9.0), 1.0);
    }
}
