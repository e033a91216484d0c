//! Small ops of the forward pass: normalisation, rotary embeddings, attention over the KV
//! cache and activations.

use super::dot::*;

/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = dot(x, x) / x.len().max(1) as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, xv), wv) in out.iter_mut().zip(x).zip(w) {
        *o = xv * r * wv;
    }
}

/// LayerNorm: `out = (x - mean) / sqrt(var + eps) * w + b` (biased variance).
pub(crate) fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len().max(1) as f32;
    let mean = sum(x) / n;
    for (o, xv) in out.iter_mut().zip(x) {
        *o = xv - mean;
    }
    let var = dot(out, out) / n;
    let r = 1.0 / (var + eps).sqrt();
    for ((o, wv), bv) in out.iter_mut().zip(w).zip(b) {
        *o = *o * r * wv + bv;
    }
}

/// Rotates `x` (one head, `cos.len() * 2` elements) in place with the "rotate_half" pairing
/// `(i, i + half)`: `x1' = x1 cos - x2 sin`, `x2' = x2 cos + x1 sin`.
pub(crate) fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (a, b) = x.split_at_mut(half);
    for (((x1, x2), c), s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
        let (v1, v2) = (*x1, *x2);
        *x1 = v1 * c - v2 * s;
        *x2 = v2 * c + v1 * s;
    }
}

/// `cos` and `sin` of `pos * inv_freq[i]` (computed in f32, as PyTorch does).
pub(crate) fn rope_angles(pos: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    let p = pos as f32;
    for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let a = p * f;
        *c = a.cos();
        *s = a.sin();
    }
}

/// Causal attention of one query head over `n` cached positions: `keys` and `values` are the
/// layer's caches (`[pos, kv_dim]`), the head's slice starting at `off`. `scores` needs `n`
/// elements of scratch; `out` gets `head_dim` elements.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    kv_dim: usize,
    off: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let scores = &mut scores[..n];
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        let k = &keys[j * kv_dim + off..j * kv_dim + off + hd];
        *s = dot(q, k) * scale;
        max = max.max(*s);
    }
    let mut total = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    out.fill(0.0);
    for (j, s) in scores.iter().enumerate() {
        let v = &values[j * kv_dim + off..j * kv_dim + off + hd];
        axpy(out, *s / total, v);
    }
}

/// SiLU: `x * sigmoid(x)`.
#[inline]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// tanh-approximated GELU (PyTorch `approximate="tanh"`).
#[inline]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}
