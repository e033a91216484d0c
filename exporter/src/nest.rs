//! `matformer import --nest`: turns a dense model into a nested one.
//!
//! Every FFN's neurons are ordered by an importance score measured on calibration text, the
//! mean over the text's tokens of `|act(gate_j . x) * (up_j . x)|` (the magnitude of neuron
//! `j`'s contribution before the down projection), largest first. Gate and up rows and down
//! columns (rows of `ffn_down_t`) are permuted together, so the full-width function is
//! unchanged (a sum over neurons in another order). Levels then keep the first `h/2^k` neurons.
//!
//! A dense model was not trained to be nested: the smaller levels lose quality, often a lot.
//! Each level's loss on the calibration text is measured with the CPU engine on the written
//! file and stored in the catalog as it is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use matformer::elastic::{StoredCatalog, StoredEntry, CATALOG_KEY, CATALOG_SCHEMA};
use matformer::format::{names, Activation, Architecture, Metadata, NestingOrigin};
use matformer::tokenizer::{Tokenizer, TokenizerAssets};
use matformer::Submodel;

use crate::onnx_source::{default_level_names, Weight};

/// Settings of `--nest`.
#[derive(Clone, Debug)]
pub struct NestOptions {
    /// Number of nested levels (widths `h/2^(levels-1)`, ..., `h/2`, `h`).
    pub levels: usize,
    /// Calibration text (UTF-8).
    pub calibration: PathBuf,
    /// Most calibration tokens used (the text is cut after this many).
    pub max_tokens: usize,
    /// Tokens per forward chunk (at most the model's context).
    pub chunk_tokens: usize,
}

impl NestOptions {
    /// Four levels, 1024 tokens in chunks of 256.
    pub fn new(calibration: PathBuf) -> NestOptions {
        NestOptions { levels: 4, calibration, max_tokens: 1024, chunk_tokens: 256 }
    }
}

/// One level's measured loss.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LevelLoss {
    /// Level name.
    pub name: String,
    /// FFN neurons per layer (layer 0; every layer has the same widths).
    pub width: u32,
    /// Mean next-token cross-entropy on the calibration text, nats per token.
    pub loss_nats_per_token: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
}

/// What `--nest` measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NestReport {
    /// Calibration tokens used for the importance scores and the losses.
    pub calibration_tokens: usize,
    /// Losses, smallest level first.
    pub levels: Vec<LevelLoss>,
}

/// Nested widths for a full width `h`: `h/2^(levels-1), ..., h/2, h` (rounded down).
pub fn nested_widths(h: u32, levels: usize) -> Result<Vec<u32>> {
    if !(1..=matformer::format::MAX_LEVELS).contains(&levels) {
        bail!("--levels must be 1 to {}, got {levels}", matformer::format::MAX_LEVELS);
    }
    let w: Vec<u32> = (0..levels).map(|j| h >> (levels - 1 - j)).collect();
    if w[0] == 0 || w.windows(2).any(|p| p[0] >= p[1]) {
        bail!("an FFN of width {h} cannot be split into {levels} halving levels");
    }
    Ok(w)
}

/// Tokenises `text` as the model's tokenizer does for plain text (BOS prepended when the
/// model's tokenizer adds it).
pub fn tokenize(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    tok.encode(text, tok.adds_bos()).map_err(|e| anyhow!("cannot tokenise the calibration text: {e}"))
}

/// `y[t][o] = dot(w[o], x[t])` for `x: [n, cols]`, `w: [rows, cols]`; rows split over threads.
fn matmul(x: &[f32], n: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * rows];
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get()).min(rows.max(1));
    let per = rows.div_ceil(threads);
    let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                s.spawn(move || {
                    let (r0, r1) = (k * per, ((k + 1) * per).min(rows));
                    let mut part = vec![0f32; n * (r1.saturating_sub(r0))];
                    for o in r0..r1 {
                        let wr = &w[o * cols..(o + 1) * cols];
                        for t in 0..n {
                            part[t * (r1 - r0) + (o - r0)] = dot(wr, &x[t * cols..(t + 1) * cols]);
                        }
                    }
                    part
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    for (k, part) in parts.iter().enumerate() {
        let (r0, r1) = (k * per, ((k + 1) * per).min(rows));
        if r1 <= r0 {
            continue;
        }
        for t in 0..n {
            y[t * rows + r0..t * rows + r1].copy_from_slice(&part[t * (r1 - r0)..(t + 1) * (r1 - r0)]);
        }
    }
    y
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, xi), yi) in acc.iter_mut().zip(x).zip(y) {
            *s += xi * yi;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The FFN gate's activation, as the CPU engine defines it.
fn activation(kind: Activation, x: f32) -> f32 {
    match kind {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => {
            const SQRT_2_OVER_PI: f32 = 0.797_884_6;
            0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
        }
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((oi, ri), wi) in o.iter_mut().zip(row).zip(w) {
            *oi = ri * inv * wi;
        }
    }
    out
}

/// Rotates pairs `(i, i + hd/2)` of every head of `x: [n, heads * hd]` at positions `0..n`.
fn rope(x: &mut [f32], n: usize, heads: usize, hd: usize, theta: f32) {
    let half = hd / 2;
    for t in 0..n {
        for h in 0..heads {
            let base = t * heads * hd + h * hd;
            for i in 0..half {
                let freq = 1.0 / theta.powf(2.0 * i as f32 / hd as f32);
                let (sin, cos) = (t as f32 * freq).sin_cos();
                let (a, b) = (x[base + i], x[base + i + half]);
                x[base + i] = a * cos - b * sin;
                x[base + i + half] = b * cos + a * sin;
            }
        }
    }
}

/// A plain f32 forward pass over one chunk (positions `0..n`) that adds every layer's
/// per-neuron `|act(gate) * up|` to `scores[layer]`; returns the final hidden states `[n, d]`.
pub fn forward_scores(
    a: &Architecture,
    t: &HashMap<String, Weight>,
    tokens: &[u32],
    scores: &mut [Vec<f64>],
) -> Result<Vec<f32>> {
    let get = |name: &str| -> Result<&[f32]> {
        t.get(name).map(|w| w.data.as_slice()).ok_or_else(|| anyhow!("tensor `{name}` missing"))
    };
    let (d, n) = (a.d_model as usize, tokens.len());
    let (nh, nkv, hd) = (a.n_heads as usize, a.n_kv_heads as usize, a.head_dim as usize);
    let emb = get(names::TOK_EMBEDDINGS)?;
    let mut x = vec![0f32; n * d];
    for (i, &tok) in tokens.iter().enumerate() {
        let row =
            emb.get(tok as usize * d..(tok as usize + 1) * d).ok_or_else(|| anyhow!("token {tok} out of range"))?;
        x[i * d..(i + 1) * d].copy_from_slice(row);
    }
    let scale = 1.0 / (hd as f32).sqrt();
    for (l, layer_scores) in scores.iter_mut().enumerate().take(a.n_layers as usize) {
        let name = |s: &str| names::layer(l, s);
        let h = rms_norm(&x, get(&name(names::ATTN_NORM))?, a.norm_eps, d);
        let mut q = matmul(&h, n, get(&name(names::WQ))?, nh * hd, d);
        let mut k = matmul(&h, n, get(&name(names::WK))?, nkv * hd, d);
        let v = matmul(&h, n, get(&name(names::WV))?, nkv * hd, d);
        rope(&mut q, n, nh, hd, a.rope_theta);
        rope(&mut k, n, nkv, hd, a.rope_theta);
        let mut att = vec![0f32; n * nh * hd];
        let group = nh / nkv;
        let mut p = vec![0f32; n];
        for ti in 0..n {
            for hh in 0..nh {
                let kvh = hh / group;
                let qv = &q[ti * nh * hd + hh * hd..][..hd];
                let mut m = f32::NEG_INFINITY;
                for (tj, pj) in p.iter_mut().enumerate().take(ti + 1) {
                    *pj = dot(qv, &k[tj * nkv * hd + kvh * hd..][..hd]) * scale;
                    m = m.max(*pj);
                }
                let mut sum = 0f32;
                for pj in p.iter_mut().take(ti + 1) {
                    *pj = (*pj - m).exp();
                    sum += *pj;
                }
                let out = &mut att[ti * nh * hd + hh * hd..][..hd];
                for (tj, pj) in p.iter().enumerate().take(ti + 1) {
                    let vv = &v[tj * nkv * hd + kvh * hd..][..hd];
                    let wgt = pj / sum;
                    for (o, ve) in out.iter_mut().zip(vv) {
                        *o += wgt * ve;
                    }
                }
            }
        }
        let o = matmul(&att, n, get(&name(names::WO))?, d, nh * hd);
        for (xi, oi) in x.iter_mut().zip(&o) {
            *xi += oi;
        }
        let h = rms_norm(&x, get(&name(names::FFN_NORM))?, a.norm_eps, d);
        let width = t.get(&name(names::FFN_UP)).map_or(0, |w| w.shape[0]);
        let g = matmul(&h, n, get(&name(names::FFN_GATE))?, width, d);
        let u = matmul(&h, n, get(&name(names::FFN_UP))?, width, d);
        let act: Vec<f32> = g.iter().zip(&u).map(|(&gi, &ui)| activation(a.activation, gi) * ui).collect();
        for row in act.chunks_exact(width.max(1)) {
            for (s, a) in layer_scores.iter_mut().zip(row) {
                *s += f64::from(a.abs());
            }
        }
        // down_t is [width, d]: x[t] += sum_j act[t][j] * down_t[j].
        let down_t = get(&name(names::FFN_DOWN_T))?;
        for ti in 0..n {
            let xr = &mut x[ti * d..(ti + 1) * d];
            for (j, &aj) in act[ti * width..(ti + 1) * width].iter().enumerate() {
                for (xe, de) in xr.iter_mut().zip(&down_t[j * d..(j + 1) * d]) {
                    *xe += aj * de;
                }
            }
        }
    }
    Ok(x)
}

/// Reorders the rows of a `[rows, cols]` tensor: new row `i` is old row `perm[i]`.
fn permute_rows(w: &mut Weight, perm: &[usize]) {
    let cols = w.shape[1];
    let mut out = vec![0f32; w.data.len()];
    for (i, &p) in perm.iter().enumerate() {
        out[i * cols..(i + 1) * cols].copy_from_slice(&w.data[p * cols..(p + 1) * cols]);
    }
    w.data = out;
}

/// Permutes layer `l`'s FFN neurons: gate and up rows and `ffn_down_t` rows together.
pub fn permute_ffn(t: &mut HashMap<String, Weight>, layer: usize, perm: &[usize]) -> Result<()> {
    for s in [names::FFN_GATE, names::FFN_UP, names::FFN_DOWN_T] {
        let name = names::layer(layer, s);
        let w = t.get_mut(&name).ok_or_else(|| anyhow!("tensor `{name}` missing"))?;
        if w.shape.len() != 2 || w.shape[0] != perm.len() {
            bail!("tensor `{name}` has shape {:?}, expected {} rows", w.shape, perm.len());
        }
        permute_rows(w, perm);
    }
    Ok(())
}

/// Mean next-token cross-entropy (nats) of `submodel` over `chunks`.
fn measure_loss(model: &std::sync::Arc<matformer::ModelFile>, sub: &Submodel, chunks: &[&[u32]]) -> Result<f64> {
    let engine = matformer::cpu::CpuEngine::new(model.clone())?;
    let mut session = engine.session(sub)?;
    let vocab = session.vocab_size();
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in chunks {
        session.reset();
        let logits = session.forward_all(chunk)?;
        for i in 0..chunk.len().saturating_sub(1) {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = f64::from(m) + row.iter().map(|&v| f64::from(v - m).exp()).sum::<f64>().ln();
            total += lse - f64::from(row[chunk[i + 1] as usize]);
            count += 1;
        }
    }
    if count == 0 {
        bail!("the calibration text gives fewer than two tokens");
    }
    Ok(total / count as f64)
}

/// Orders every FFN by importance on the calibration text, writes the nested file to
/// `scratch` to measure each level's loss, and returns the nested metadata (catalog stored
/// under `catalog`) and the report. `tensors` are permuted in place.
pub fn nest(
    meta: &Metadata,
    tensors: &mut HashMap<String, Weight>,
    tok: &Tokenizer,
    assets: &TokenizerAssets,
    opts: &NestOptions,
    dtype: &crate::dtype_plan::DTypePlan,
    scratch: &Path,
) -> Result<(Metadata, NestReport)> {
    let a = &meta.architecture;
    let text = std::fs::read_to_string(&opts.calibration)
        .with_context(|| format!("cannot read calibration text {}", opts.calibration.display()))?;
    let mut ids = tokenize(tok, &text)?;
    ids.truncate(opts.max_tokens);
    if ids.len() < 2 {
        bail!("calibration text {} gives {} tokens; at least 2 are needed", opts.calibration.display(), ids.len());
    }
    let chunk = opts.chunk_tokens.clamp(2, a.max_context as usize);
    let chunks: Vec<&[u32]> = ids.chunks(chunk).filter(|c| c.len() >= 2).collect();
    let n_layers = a.n_layers as usize;
    let mut scores = vec![Vec::new(); n_layers];
    for (l, s) in scores.iter_mut().enumerate() {
        let h = meta.ffn_widths.get(l).and_then(|w| w.last()).copied().unwrap_or(0) as usize;
        *s = vec![0f64; h];
    }
    eprintln!("nest: scoring FFN neurons on {} calibration tokens ({} chunks)", ids.len(), chunks.len());
    for (k, c) in chunks.iter().enumerate() {
        forward_scores(a, tensors, c, &mut scores)?;
        eprintln!("nest: chunk {}/{}", k + 1, chunks.len());
    }
    let mut widths = Vec::with_capacity(n_layers);
    for (l, s) in scores.iter().enumerate() {
        let mut perm: Vec<usize> = (0..s.len()).collect();
        // Largest score first; ties keep the original order.
        perm.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
        permute_ffn(tensors, l, &perm)?;
        widths.push(nested_widths(s.len() as u32, opts.levels)?);
    }
    let mut nested = meta.clone();
    nested.ffn_widths = widths;
    nested.level_names = default_level_names(opts.levels);
    nested.validate().map_err(|e| anyhow!("nested metadata: {e}"))?;

    crate::import::write_model(scratch, &nested, tensors, dtype, assets)?;
    let model = std::sync::Arc::new(matformer::ModelFile::open(scratch)?);
    let mut levels = Vec::new();
    let mut entries = Vec::new();
    for (j, name) in nested.level_names.iter().enumerate() {
        let sub = Submodel::uniform(j as u8, n_layers);
        let loss = measure_loss(&model, &sub, &chunks)?;
        eprintln!("nest: level {name} (width {}): {loss:.4} nats/token", nested.ffn_widths[0][j]);
        levels.push(LevelLoss {
            name: name.clone(),
            width: nested.ffn_widths[0][j],
            loss_nats_per_token: loss,
            perplexity: loss.exp(),
        });
        entries.push(StoredEntry {
            name: name.clone(),
            levels: sub.levels.clone(),
            skip: Vec::new(),
            predicted_loss: None,
            measured_loss: Some(loss),
        });
    }
    drop(model);
    let stored = StoredCatalog {
        schema: CATALOG_SCHEMA.to_string(),
        loss_unit: "nats_per_token".to_string(),
        calibration: None,
        entries,
    };
    nested.extra.insert(CATALOG_KEY.to_string(), serde_json::to_value(stored)?);
    nested.set_nesting(NestingOrigin::PostHoc);
    Ok((nested, NestReport { calibration_tokens: ids.len(), levels }))
}
