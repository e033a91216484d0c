//! The Gemma 3n decoder on the CPU (Hugging Face `Gemma3nForCausalLM` is the reference; the
//! parity test against its float32 logits is tests/tests/gemma3n_parity.rs).
//!
//! One pass over a chunk of `t` tokens, all in f32:
//!
//! 1. `x0 = tok_embeddings[token] * sqrt(d_model)`. Per-layer inputs: the token's row of
//!    `per_layer_embeddings` (row 0 for tokens at or above `per_layer_vocab`) times
//!    `sqrt(per_layer_dim)`, plus the RMS-normalised projection
//!    `per_layer_model_projection(x0) / sqrt(d_model)`, the sum times `1/sqrt(2)`: one
//!    `per_layer_dim` vector per layer. Only the running layers' blocks are computed, so a
//!    skipped layer's projection rows are never read.
//! 2. AltUp streams: `h[0] = x0`, `h[j] = altup_proj[j-1](x0)` rescaled to `x0`'s RMS.
//! 3. Per running layer: predict (router `tanh(router(router_norm(h[0]) / d_model))`, then
//!    `pred[c] = h[c] + sum_r coef[c * n + r] * h[r]`), attention and LAuReL on the normed
//!    active prediction, the GeGLU FFN (Gaussian top-k on the gate where the layer is sparse),
//!    correct (`h[k] = pred[k] + (1 + ccoef[k]) * (out - pred[0])`), and the per-layer input
//!    gate added to streams `1..n`. A skipped layer leaves the streams as they are (MatFormer
//!    Lab's slicing removes it from the model).
//! 4. `h[j]` for `j >= 1` through `altup_unembed[j-1]`, rescaled to `h[0]`'s RMS, the streams
//!    averaged, the final norm, the LM head and the soft-cap.
//!
//! Attention: scale 1 (q and k are RMS-normalised per head), RoPE with the local base on
//! sliding-window layers and the global base on full layers; a sliding-window layer's query at
//! position `i` sees keys `i - window < j <= i`. Layers from `first_shared` on own no K/V and
//! attend over the cache of the last earlier layer of the same type; only owners cache K/V.
//! A sliding-window owner's cache starts at `PassState::kv_start` (the session drops positions
//! no query reads again, `Session::trim_windows`).

use std::sync::Arc;

use super::engine::{Head, Logits, Norm};
use super::kernels;
use super::weights::Matrix;
use super::EngineError;
use crate::dims::ModelDims;
use crate::format::{g3n_names as g3, names, Gemma3nConfig};
use crate::ModelFile;

/// Floor of the mean square in AltUp's magnitude matching (`clamp(min=1e-5)` in the reference).
const ALTUP_MIN_MEAN_SQUARE: f32 = 1e-5;

/// One layer's small tensors, decoded to f32 at engine creation (a few KiB per layer); the
/// big matrices are read in place per pass.
#[derive(Clone, Debug)]
struct G3Layer {
    attn_norm: Norm,
    post_attn_norm: Norm,
    ffn_norm: Norm,
    post_ffn_norm: Norm,
    q_norm: Vec<f32>,
    k_norm: Option<Vec<f32>>,
    laurel_norm: Norm,
    ple_norm: Norm,
    router_norm: Norm,
    /// `[altup_inputs, d_model]`.
    router: Vec<f32>,
    /// `[altup_inputs^2, altup_inputs]`.
    prediction: Vec<f32>,
    /// `[altup_inputs, altup_inputs]`.
    correction: Vec<f32>,
    /// `[d_model]`.
    correct_scale: Vec<f32>,
    /// Std multiplier of the Gaussian top-k (`Phi^-1(sparsity)`), `None` for a dense layer.
    sparsity_cutoff: Option<f32>,
    /// Whether this is a sliding-window layer.
    sliding: bool,
    /// The layer whose K/V this one attends over.
    kv_owner: usize,
}

/// What a Gemma 3n engine shares with its sessions.
#[derive(Debug)]
pub(crate) struct G3Model {
    config: Gemma3nConfig,
    layers: Vec<G3Layer>,
    ple_norm: Vec<f32>,
    inv_freq_local: Vec<f32>,
    inv_freq_global: Vec<f32>,
}

fn vec_of(model: &ModelFile, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
    let v = model.tensor_f32(name)?;
    if v.len() != len {
        return Err(EngineError::BadTensor {
            tensor: name.to_string(),
            reason: format!("has {} elements, expected {len}", v.len()),
        });
    }
    Ok(v)
}

fn inv_freq(theta: f32, hd: usize) -> Vec<f32> {
    (0..hd / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / hd as f32)).collect()
}

/// `Phi^-1(p)`, the standard normal quantile, to double precision (Acklam's rational
/// approximation refined by one Halley step on `erfc`), then rounded to f32 as the reference
/// computes it in float32.
pub(crate) fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let low = 0.024_25;
    let x = if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    // One Halley step: e = Phi(x) - p.
    let e = 0.5 * erfc(-x / std::f64::consts::SQRT_2) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

/// `erfc(x)` in f64: `1 - erf(x)` from erf's Maclaurin series below 2, the continued fraction
/// (Lentz's method) from 2 on; used only to refine [`normal_quantile`] by one Halley step.
fn erfc(x: f64) -> f64 {
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    if x < 2.0 {
        // erf series: 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1)).
        let mut sum = 0.0f64;
        let mut term = x;
        let mut n = 0.0f64;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // Continued fraction (Lentz), converges fast for x >= 2.
        let mut f = x;
        let mut c = x;
        let mut d = 0.0;
        for k in 1..200 {
            let a = k as f64 / 2.0;
            d = x + a * d;
            d = 1.0 / d;
            c = x + a / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        (-x * x).exp() / (f * std::f64::consts::PI.sqrt())
    }
}

impl G3Model {
    /// Decodes the small tensors and checks every big matrix's shape, layout and alignment.
    pub(crate) fn load(model: &ModelFile, dims: &ModelDims, config: Gemma3nConfig) -> Result<G3Model, EngineError> {
        let d = dims.d_model;
        let hd = dims.head_dim;
        let n_in = config.altup_inputs as usize;
        let ple = config.per_layer_dim as usize;
        let bad = |reason: String| EngineError::BadConfig { reason };
        if n_in == 0 {
            return Err(bad("gemma3n.altup_inputs is zero".into()));
        }
        let norm = |name: String, len: usize| -> Result<Norm, EngineError> {
            Ok(Norm { weight: vec_of(model, &name, len)?, bias: None })
        };
        let mut layers = Vec::with_capacity(dims.n_layers);
        for i in 0..dims.n_layers {
            let l = |s: &str| names::layer(i, s);
            let sparsity = config.activation_sparsity.get(i).copied().unwrap_or(0.0);
            let owns = config.owns_kv(i);
            layers.push(G3Layer {
                attn_norm: norm(l(names::ATTN_NORM), d)?,
                post_attn_norm: norm(l(g3::POST_ATTN_NORM), d)?,
                ffn_norm: norm(l(names::FFN_NORM), d)?,
                post_ffn_norm: norm(l(g3::POST_FFN_NORM), d)?,
                q_norm: vec_of(model, &l(g3::Q_NORM), hd)?,
                k_norm: if owns { Some(vec_of(model, &l(g3::K_NORM), hd)?) } else { None },
                laurel_norm: norm(l(g3::LAUREL_NORM), d)?,
                ple_norm: norm(l(g3::PLE_NORM), d)?,
                router_norm: norm(l(g3::ALTUP_ROUTER_NORM), d)?,
                router: vec_of(model, &l(g3::ALTUP_ROUTER), n_in * d)?,
                prediction: vec_of(model, &l(g3::ALTUP_PREDICTION), n_in * n_in * n_in)?,
                correction: vec_of(model, &l(g3::ALTUP_CORRECTION), n_in * n_in)?,
                correct_scale: vec_of(model, &l(g3::ALTUP_CORRECT_SCALE), d)?,
                sparsity_cutoff: (sparsity > 0.0).then(|| normal_quantile(f64::from(sparsity)) as f32),
                sliding: config.sliding.get(i).copied().unwrap_or(false),
                kv_owner: config.kv_owner(i).ok_or_else(|| bad(format!("layer {i} has no K/V owner")))?,
            });
        }
        let ple_norm = vec_of(model, g3::PER_LAYER_PROJECTION_NORM, ple)?;
        let g = G3Model {
            inv_freq_local: inv_freq(config.rope_local_theta, hd),
            inv_freq_global: inv_freq(model.metadata().architecture.rope_theta, hd),
            config,
            layers,
            ple_norm,
        };
        g.check_matrices(model, dims)?;
        Ok(g)
    }

    fn check_matrices(&self, m: &ModelFile, dm: &ModelDims) -> Result<(), EngineError> {
        let d = dm.d_model;
        let ple = self.config.per_layer_dim as usize;
        let n_layers = dm.n_layers;
        let rank = self.config.laurel_rank as usize;
        Matrix::load(m, names::TOK_EMBEDDINGS, dm.vocab, d)?;
        Matrix::load(m, g3::PER_LAYER_EMBEDDINGS, self.config.per_layer_vocab as usize, n_layers * ple)?;
        Matrix::load(m, g3::PER_LAYER_MODEL_PROJECTION, n_layers * ple, d)?;
        for j in 0..self.n_streams() - 1 {
            Matrix::load(m, &g3::altup_proj(j), d, d)?;
            Matrix::load(m, &g3::altup_unembed(j), d, d)?;
        }
        let top = m.view().available_levels.saturating_sub(1);
        for i in 0..n_layers {
            let l = |s: &str| names::layer(i, s);
            Matrix::load(m, &l(names::WQ), dm.q_dim, d)?;
            if self.config.owns_kv(i) {
                Matrix::load(m, &l(names::WK), dm.kv_dim, d)?;
                Matrix::load(m, &l(names::WV), dm.kv_dim, d)?;
            }
            Matrix::load(m, &l(names::WO), d, dm.q_dim)?;
            Matrix::load(m, &l(g3::LAUREL_LEFT), rank, d)?;
            Matrix::load(m, &l(g3::LAUREL_RIGHT), d, rank)?;
            Matrix::load(m, &l(g3::PLE_GATE), ple, d)?;
            Matrix::load(m, &l(g3::PLE_PROJ), d, ple)?;
            let w = m.metadata().ffn_widths.get(i).and_then(|w| w.get(top)).copied().unwrap_or(0) as usize;
            for s in [names::FFN_UP, names::FFN_GATE, names::FFN_DOWN_T] {
                Matrix::load(m, &l(s), w, d)?;
            }
        }
        Ok(())
    }

    fn n_streams(&self) -> usize {
        self.config.altup_inputs as usize
    }

    /// The sliding window of the local layers (at least 1).
    pub(crate) fn sliding_window(&self) -> usize {
        (self.config.sliding_window as usize).max(1)
    }

    /// Whether layer `layer` caches its own K/V and attends over a sliding window only: its
    /// cache then needs only the last `sliding_window` positions.
    pub(crate) fn caches_window(&self, layer: usize) -> bool {
        self.layers.get(layer).is_some_and(|l| l.sliding && l.k_norm.is_some())
    }
}

/// The mutable state one pass needs from its session.
pub(crate) struct PassState<'s> {
    pub keys: &'s mut [Vec<f32>],
    pub values: &'s mut [Vec<f32>],
    /// Per layer: the first position its cache holds (sliding-window layers drop old ones).
    pub kv_start: &'s [usize],
    pub widths: &'s [usize],
    pub skip: &'s [bool],
    pub pos: usize,
    pub threads: usize,
}

/// Rescales `v` so its RMS (with AltUp's floor) matches `target_rms`.
fn match_magnitude(v: &mut [f32], target_rms: f32) {
    let ms = v.iter().map(|x| x * x).sum::<f32>() / v.len().max(1) as f32;
    let r = ms.max(ALTUP_MIN_MEAN_SQUARE).sqrt();
    for x in v.iter_mut() {
        *x = *x * target_rms / r;
    }
}

fn rms(v: &[f32]) -> f32 {
    (v.iter().map(|x| x * x).sum::<f32>() / v.len().max(1) as f32).sqrt()
}

/// `tanh(router(router_norm(x) / d))` for one token: `n` modality weights.
fn router_modalities(layer: &G3Layer, x: &[f32], d: usize, eps: f32, n: usize, scratch: &mut [f32]) -> Vec<f32> {
    kernels::rms_norm(x, &layer.router_norm.weight, eps, scratch);
    let inv_d = 1.0 / d as f32;
    (0..n)
        .map(|k| {
            let row = &layer.router[k * d..(k + 1) * d];
            let s: f32 = row.iter().zip(scratch.iter()).map(|(w, v)| w * (v * inv_d)).sum();
            s.tanh()
        })
        .collect()
}

/// One batched Gemma 3n pass over `tokens` (validated by the caller) at positions
/// `pos..pos + t`: appends the owners' K/V to the caches and returns the wanted logits.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_chunk(
    g: &G3Model,
    model: &Arc<ModelFile>,
    dm: &ModelDims,
    st: PassState<'_>,
    tokens: &[u32],
    want: Logits,
    final_norm: &Norm,
    head: Head<'_>,
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<Vec<f32>, EngineError> {
    let model = &**model;
    let cfg = &g.config;
    let (d, hd, q_dim, kv_dim) = (dm.d_model, dm.head_dim, dm.q_dim, dm.kv_dim);
    let n_layers = dm.n_layers;
    let n_in = g.n_streams();
    let ple = cfg.per_layer_dim as usize;
    let eps = dm.norm_eps;
    let t = tokens.len();
    let p0 = st.pos;
    let threads = st.threads;
    let running: Vec<usize> = (0..n_layers).filter(|&i| !st.skip.get(i).copied().unwrap_or(false)).collect();

    // 1. Embeddings, scaled by sqrt(d_model).
    let emb = Matrix::load(model, names::TOK_EMBEDDINGS, dm.vocab, d)?;
    let mut x0 = vec![0.0f32; t * d];
    let embed_scale = (d as f32).sqrt();
    for (&tok, xr) in tokens.iter().zip(x0.chunks_exact_mut(d)) {
        emb.row(tok as usize)
            .ok_or(EngineError::TokenOutOfRange { token: tok, vocab: dm.vocab as u32 })?
            .widen_into(xr);
        for v in xr.iter_mut() {
            *v *= embed_scale;
        }
    }

    // Per-layer inputs of the running layers: `ple_in[i]` is `[t, ple]`.
    let ple_table = Matrix::load(model, g3::PER_LAYER_EMBEDDINGS, cfg.per_layer_vocab as usize, n_layers * ple)?;
    let ple_proj = Matrix::load(model, g3::PER_LAYER_MODEL_PROJECTION, n_layers * ple, d)?;
    let mut ple_in: Vec<Vec<f32>> = vec![Vec::new(); n_layers];
    {
        let blocks: Vec<Matrix<'_>> = running.iter().map(|&i| ple_proj.row_range(i * ple, (i + 1) * ple)).collect();
        let mut outs: Vec<Vec<f32>> = running.iter().map(|_| vec![0.0f32; t * ple]).collect();
        {
            let mut products: Vec<(&Matrix<'_>, &mut [f32])> =
                blocks.iter().zip(outs.iter_mut()).map(|(m, o)| (m, &mut o[..])).collect();
            kernels::matmul_many(&x0, t, &mut products, threads);
        }
        let proj_scale = 1.0 / (d as f32).sqrt();
        let table_scale = (ple as f32).sqrt();
        let input_scale = std::f32::consts::FRAC_1_SQRT_2;
        let mut row = vec![0.0f32; n_layers * ple];
        let mut normed = vec![0.0f32; ple];
        for (s, &tok) in tokens.iter().enumerate() {
            let r = if tok < cfg.per_layer_vocab { tok as usize } else { 0 };
            ple_table
                .row(r)
                .ok_or_else(|| EngineError::BadTensor {
                    tensor: g3::PER_LAYER_EMBEDDINGS.into(),
                    reason: format!("no row {r}"),
                })?
                .widen_into(&mut row);
            for (k, &i) in running.iter().enumerate() {
                let p = &mut outs[k][s * ple..(s + 1) * ple];
                for v in p.iter_mut() {
                    *v *= proj_scale;
                }
                kernels::rms_norm(p, &g.ple_norm, eps, &mut normed);
                for ((o, nv), ev) in p.iter_mut().zip(&normed).zip(&row[i * ple..(i + 1) * ple]) {
                    *o = (nv + ev * table_scale) * input_scale;
                }
            }
        }
        for (k, &i) in running.iter().enumerate() {
            ple_in[i] = std::mem::take(&mut outs[k]);
        }
    }

    // 2. AltUp streams, `h[j]` is `[t, d]`.
    let mut h: Vec<Vec<f32>> = vec![x0.clone()];
    for j in 0..n_in - 1 {
        let w = Matrix::load(model, &g3::altup_proj(j), d, d)?;
        let mut out = vec![0.0f32; t * d];
        kernels::matmul(&x0, t, &w, &mut out, threads);
        for (o, xr) in out.chunks_exact_mut(d).zip(x0.chunks_exact(d)) {
            match_magnitude(o, rms(xr));
        }
        h.push(out);
    }

    // RoPE tables for both bases.
    let half = hd / 2;
    let angles = |inv: &[f32]| {
        let mut cos = vec![0.0f32; t * half];
        let mut sin = vec![0.0f32; t * half];
        for (i, (c, s)) in cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half)).enumerate() {
            kernels::rope_angles(p0 + i, inv, c, s);
        }
        (cos, sin)
    };
    let (cos_l, sin_l) = angles(&g.inv_freq_local);
    let (cos_g, sin_g) = angles(&g.inv_freq_global);

    let n_ctx = p0 + t;
    let group = dm.n_heads / dm.n_kv_heads;
    let window = g.sliding_window();
    let mut pred: Vec<Vec<f32>> = vec![vec![0.0f32; t * d]; n_in];
    let mut an = vec![0.0f32; t * d];
    let mut q = vec![0.0f32; t * q_dim];
    let mut k = vec![0.0f32; t * kv_dim];
    let mut v = vec![0.0f32; t * kv_dim];
    let mut att = vec![0.0f32; t * q_dim];
    let mut proj = vec![0.0f32; t * d];
    let mut tmp = vec![0.0f32; t * d];
    let mut scratch = vec![0.0f32; d.max(hd)];
    let rank = cfg.laurel_rank as usize;

    for &li in &running {
        if stop() {
            return Err(EngineError::Interrupted);
        }
        let layer = &g.layers[li];
        let l = |s: &str| names::layer(li, s);

        // Predict.
        let mut modal = vec![0.0f32; t * n_in];
        for s in 0..t {
            let m = router_modalities(layer, &h[0][s * d..(s + 1) * d], d, eps, n_in, &mut scratch);
            modal[s * n_in..(s + 1) * n_in].copy_from_slice(&m);
        }
        for s in 0..t {
            let m = &modal[s * n_in..(s + 1) * n_in];
            // coef[c * n + r] = prediction_coefs row (c * n + r) . modalities
            let coef: Vec<f32> = (0..n_in * n_in)
                .map(|kk| layer.prediction[kk * n_in..(kk + 1) * n_in].iter().zip(m).map(|(w, x)| w * x).sum())
                .collect();
            for c in 0..n_in {
                let (lo, hi) = (s * d, (s + 1) * d);
                let out = &mut pred[c][lo..hi];
                out.fill(0.0);
                for r in 0..n_in {
                    let cr = coef[c * n_in + r];
                    for (o, x) in out.iter_mut().zip(&h[r][lo..hi]) {
                        *o += cr * x;
                    }
                }
                for (o, x) in out.iter_mut().zip(&h[c][lo..hi]) {
                    *o += x;
                }
            }
        }

        // Attention input and LAuReL.
        layer.attn_norm.apply(&pred[0], &mut an, d, eps);
        let left = Matrix::load(model, &l(g3::LAUREL_LEFT), rank, d)?;
        let right = Matrix::load(model, &l(g3::LAUREL_RIGHT), d, rank)?;
        let mut lr = vec![0.0f32; t * rank];
        kernels::matmul(&an, t, &left, &mut lr, threads);
        kernels::matmul(&lr, t, &right, &mut tmp, threads);
        let mut laurel = vec![0.0f32; t * d];
        layer.laurel_norm.apply(&tmp, &mut laurel, d, eps);
        kernels::add_assign(&mut laurel, &an);

        // Attention.
        let (cos, sin) = if layer.sliding { (&cos_l, &sin_l) } else { (&cos_g, &sin_g) };
        let wq = Matrix::load(model, &l(names::WQ), q_dim, d)?;
        if let Some(k_norm) = &layer.k_norm {
            let wk = Matrix::load(model, &l(names::WK), kv_dim, d)?;
            let wv = Matrix::load(model, &l(names::WV), kv_dim, d)?;
            kernels::matmul_many(&an, t, &mut [(&wq, &mut q[..]), (&wk, &mut k[..]), (&wv, &mut v[..])], threads);
            let ones = vec![1.0f32; hd];
            for s in 0..t {
                let (c, sn) = (&cos[s * half..(s + 1) * half], &sin[s * half..(s + 1) * half]);
                for head in k[s * kv_dim..(s + 1) * kv_dim].chunks_exact_mut(hd) {
                    kernels::rms_norm(head, k_norm, eps, &mut scratch[..hd]);
                    head.copy_from_slice(&scratch[..hd]);
                    kernels::rope(head, c, sn);
                }
                for head in v[s * kv_dim..(s + 1) * kv_dim].chunks_exact_mut(hd) {
                    kernels::rms_norm(head, &ones, eps, &mut scratch[..hd]);
                    head.copy_from_slice(&scratch[..hd]);
                }
            }
            let keys = &mut st.keys[li];
            let values = &mut st.values[li];
            // A sliding-window cache holds at most twice the kept positions plus one chunk
            // between trims (`Session::trim_windows`).
            let limit = if g.caches_window(li) {
                (2 * super::engine::window_keep(window) + t).min(dm.max_context)
            } else {
                dm.max_context
            };
            let held = n_ctx - st.kv_start[li];
            super::engine::reserve_cache(keys, held * kv_dim, limit * kv_dim);
            super::engine::reserve_cache(values, held * kv_dim, limit * kv_dim);
            keys.extend_from_slice(&k);
            values.extend_from_slice(&v);
        } else {
            kernels::matmul(&an, t, &wq, &mut q, threads);
        }
        for s in 0..t {
            let (c, sn) = (&cos[s * half..(s + 1) * half], &sin[s * half..(s + 1) * half]);
            for head in q[s * q_dim..(s + 1) * q_dim].chunks_exact_mut(hd) {
                kernels::rms_norm(head, &layer.q_norm, eps, &mut scratch[..hd]);
                head.copy_from_slice(&scratch[..hd]);
                kernels::rope(head, c, sn);
            }
        }
        let owner = layer.kv_owner;
        let (keys, values) = (&st.keys[owner], &st.values[owner]);
        let first = st.kv_start[owner];
        let sliding = layer.sliding;
        if keys.len() < (n_ctx - first) * kv_dim || values.len() < (n_ctx - first) * kv_dim {
            return Err(EngineError::BadConfig {
                reason: format!("layer {li} reads layer {owner}'s K/V, which this submodel did not compute"),
            });
        }
        // Every query of this chunk reads keys from `p0 - window + 1` on at the earliest,
        // which a trimmed cache still holds (it keeps `window - 1` positions and more).
        if sliding && p0 + 1 < first + window.min(p0 + 1) {
            return Err(EngineError::BadConfig {
                reason: format!("layer {owner}'s sliding-window cache starts at {first}, after position {p0}'s window"),
            });
        }
        if !sliding && first != 0 {
            return Err(EngineError::BadConfig {
                reason: format!("layer {li} attends globally over layer {owner}'s trimmed cache"),
            });
        }
        let work = t.saturating_mul(dm.n_heads).saturating_mul(n_ctx).saturating_mul(hd);
        let qr = &q;
        kernels::par_units(&mut att, hd, work, threads, n_ctx, |u, out, scores| {
            let (i, hh) = (u / dm.n_heads, u % dm.n_heads);
            let qh = &qr[i * q_dim + hh * hd..i * q_dim + (hh + 1) * hd];
            let off = (hh / group) * hd;
            let end = p0 + i + 1;
            let start = if sliding { end.saturating_sub(window) } else { 0 };
            kernels::attend(
                qh,
                &keys[(start - first) * kv_dim..],
                &values[(start - first) * kv_dim..],
                end - start,
                kv_dim,
                off,
                1.0,
                scores,
                out,
            );
        });
        let wo = Matrix::load(model, &l(names::WO), d, q_dim)?;
        kernels::matmul(&att, t, &wo, &mut proj, threads);
        layer.post_attn_norm.apply(&proj, &mut tmp, d, eps);
        // attn_laurel = (active + attn + laurel) / sqrt(2), into `tmp`.
        for ((o, a), lv) in tmp.iter_mut().zip(&pred[0]).zip(&laurel) {
            *o = (*a + *o + lv) * std::f32::consts::FRAC_1_SQRT_2;
        }
        let attn_laurel = tmp.clone();

        // FFN on the first `w` neurons.
        let w = st.widths.get(li).copied().unwrap_or(0);
        let mut activated = attn_laurel.clone();
        if w > 0 {
            layer.ffn_norm.apply(&attn_laurel, &mut an, d, eps);
            let up = Matrix::load(model, &l(names::FFN_UP), w, d)?;
            let gate = Matrix::load(model, &l(names::FFN_GATE), w, d)?;
            let mut hu = vec![0.0f32; t * w];
            let mut hg = vec![0.0f32; t * w];
            kernels::matmul_many(&an, t, &mut [(&up, &mut hu[..]), (&gate, &mut hg[..])], threads);
            if let Some(mult) = layer.sparsity_cutoff {
                for gr in hg.chunks_exact_mut(w) {
                    let mean = gr.iter().sum::<f32>() / w as f32;
                    let var = gr.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / w as f32;
                    let cutoff = mean + var.sqrt() * mult;
                    for x in gr.iter_mut() {
                        *x = (*x - cutoff).max(0.0);
                    }
                }
            }
            for (u, gv) in hu.iter_mut().zip(&hg) {
                *u *= kernels::gelu_tanh(*gv);
            }
            let down = Matrix::load(model, &l(names::FFN_DOWN_T), w, d)?;
            kernels::matmul_down(&hu, t, &down, &mut proj, threads);
            layer.post_ffn_norm.apply(&proj, &mut tmp, d, eps);
            kernels::add_assign(&mut activated, &tmp);
        }

        // Correct.
        for s in 0..t {
            let (lo, hi) = (s * d, (s + 1) * d);
            let m = router_modalities(layer, &activated[lo..hi], d, eps, n_in, &mut scratch);
            for kk in 0..n_in {
                let c: f32 =
                    layer.correction[kk * n_in..(kk + 1) * n_in].iter().zip(&m).map(|(w, x)| w * x).sum::<f32>() + 1.0;
                let dst = &mut h[kk][lo..hi];
                for ((o, p), (a, p0v)) in
                    dst.iter_mut().zip(&pred[kk][lo..hi]).zip(activated[lo..hi].iter().zip(&pred[0][lo..hi]))
                {
                    *o = p + c * (a - p0v);
                }
            }
        }

        // Per-layer input gate into streams 1..n.
        let mut first = h[0].clone();
        if cfg.altup_correct_scale {
            for row in first.chunks_exact_mut(d) {
                for (x, sc) in row.iter_mut().zip(&layer.correct_scale) {
                    *x *= sc;
                }
            }
        }
        let pg = Matrix::load(model, &l(g3::PLE_GATE), ple, d)?;
        let pp = Matrix::load(model, &l(g3::PLE_PROJ), d, ple)?;
        let mut gated = vec![0.0f32; t * ple];
        kernels::matmul(&first, t, &pg, &mut gated, threads);
        for (gv, pi) in gated.iter_mut().zip(&ple_in[li]) {
            *gv = kernels::gelu_tanh(*gv) * pi;
        }
        kernels::matmul(&gated, t, &pp, &mut proj, threads);
        layer.ple_norm.apply(&proj, &mut tmp, d, eps);
        for stream in h.iter_mut().skip(1) {
            kernels::add_assign(stream, &tmp);
        }
    }

    // Final: unembed the extra streams, average, norm, head, soft-cap.
    let rows: Vec<usize> = match want {
        Logits::None => return Ok(Vec::new()),
        Logits::Last => vec![t - 1],
        Logits::All => (0..t).collect(),
    };
    let n = rows.len();
    let pick =
        |src: &[f32]| -> Vec<f32> { rows.iter().flat_map(|&s| src[s * d..(s + 1) * d].iter().copied()).collect() };
    let h0 = pick(&h[0]);
    let mut sum = h0.clone();
    for j in 0..n_in - 1 {
        let w = Matrix::load(model, &g3::altup_unembed(j), d, d)?;
        let src = pick(&h[j + 1]);
        let mut out = vec![0.0f32; n * d];
        kernels::matmul(&src, n, &w, &mut out, threads);
        for ((o, base), acc) in out.chunks_exact_mut(d).zip(h0.chunks_exact(d)).zip(sum.chunks_exact_mut(d)) {
            match_magnitude(o, rms(base));
            kernels::add_assign(acc, o);
        }
    }
    let inv_n = 1.0 / n_in as f32;
    for x in sum.iter_mut() {
        *x *= inv_n;
    }
    let mut xf = vec![0.0f32; n * d];
    final_norm.apply(&sum, &mut xf, d, eps);
    head.logits(model, dm.vocab, &xf, d, threads, cfg.final_logit_softcap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantile_matches_known_values() {
        // Phi^-1(0.95) = 1.6448536269514722, Phi^-1(0.5) = 0, Phi^-1(0.975) = 1.959963984540054.
        assert!((normal_quantile(0.95) - 1.644_853_626_951_472_2).abs() < 1e-12);
        assert!(normal_quantile(0.5).abs() < 1e-14);
        assert!((normal_quantile(0.975) - 1.959_963_984_540_054).abs() < 1e-12);
        assert!((normal_quantile(0.01) + 2.326_347_874_040_841).abs() < 1e-11);
        assert!((normal_quantile(0.999) - 3.090_232_306_167_813_5).abs() < 1e-10);
    }
}
