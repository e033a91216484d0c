//! Plain scalar reference kernels: obviously correct, slow, accumulating in f64. The fast
//! kernels of the engine are property-tested against these (see the `tests` module of
//! `cpu::kernels` and [`super::Tolerance::KERNEL`]); GPU kernels can be checked the same way.
//!
//! All functions take f32 slices (weights already decoded) and return new vectors; shapes are
//! given explicitly and must match the slice lengths (they panic on inconsistent lengths, as
//! test helpers).

/// `y[r] = sum_c w[r * cols + c] * x[c]` for a row-major `[rows, cols]` matrix.
pub fn matvec(w: &[f32], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols, "matvec: weight size");
    assert_eq!(x.len(), cols, "matvec: input size");
    (0..rows)
        .map(|r| {
            let mut s = 0.0f64;
            for c in 0..cols {
                s += f64::from(w[r * cols + c]) * f64::from(x[c]);
            }
            s as f32
        })
        .collect()
}

/// `y[c] = sum_r h[r] * d[r * cols + c]`: the down projection stored transposed
/// (`ffn_down_t`, one row per neuron).
pub fn matvec_transposed(d: &[f32], rows: usize, cols: usize, h: &[f32]) -> Vec<f32> {
    assert_eq!(d.len(), rows * cols, "matvec_transposed: weight size");
    assert_eq!(h.len(), rows, "matvec_transposed: input size");
    (0..cols)
        .map(|c| {
            let mut s = 0.0f64;
            for r in 0..rows {
                s += f64::from(h[r]) * f64::from(d[r * cols + c]);
            }
            s as f32
        })
        .collect()
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    assert_eq!(x.len(), w.len(), "rms_norm: sizes");
    let n = x.len() as f64;
    let ms: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n;
    let r = 1.0 / (ms + f64::from(eps)).sqrt();
    x.iter().zip(w).map(|(&v, &g)| (f64::from(v) * r * f64::from(g)) as f32).collect()
}

/// LayerNorm: `(x - mean) / sqrt(var + eps) * w + b`, biased variance.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    assert_eq!(x.len(), w.len(), "layer_norm: sizes");
    assert_eq!(x.len(), b.len(), "layer_norm: sizes");
    let n = x.len() as f64;
    let mean: f64 = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var: f64 = x.iter().map(|&v| (f64::from(v) - mean) * (f64::from(v) - mean)).sum::<f64>() / n;
    let r = 1.0 / (var + f64::from(eps)).sqrt();
    x.iter()
        .zip(w.iter().zip(b))
        .map(|(&v, (&g, &bb))| ((f64::from(v) - mean) * r * f64::from(g) + f64::from(bb)) as f32)
        .collect()
}

/// RoPE ("rotate_half") of one head at position `pos`: pairs `(i, i + head_dim/2)` rotated by
/// `pos * theta^(-2i/head_dim)`.
pub fn rope(x: &[f32], pos: usize, theta: f32) -> Vec<f32> {
    let hd = x.len();
    assert!(hd.is_multiple_of(2), "rope: odd head_dim");
    let half = hd / 2;
    let mut out = x.to_vec();
    for i in 0..half {
        let inv_freq = f64::from(theta).powf(-(2.0 * i as f64) / hd as f64);
        let angle = pos as f64 * inv_freq;
        let (s, c) = angle.sin_cos();
        let (x1, x2) = (f64::from(x[i]), f64::from(x[i + half]));
        out[i] = (x1 * c - x2 * s) as f32;
        out[i + half] = (x2 * c + x1 * s) as f32;
    }
    out
}

/// Softmax attention of one query over `keys`/`values` (one `head_dim` vector per position),
/// scaled by `1/sqrt(head_dim)`.
pub fn attention(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f32> {
    assert_eq!(keys.len(), values.len(), "attention: cache sizes");
    let hd = q.len();
    let scale = 1.0 / (hd as f64).sqrt();
    let scores: Vec<f64> = keys
        .iter()
        .map(|k| {
            assert_eq!(k.len(), hd, "attention: key size");
            q.iter().zip(k).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() * scale
        })
        .collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    let mut out = vec![0.0f64; hd];
    for (e, v) in exps.iter().zip(values) {
        assert_eq!(v.len(), hd, "attention: value size");
        for (o, &x) in out.iter_mut().zip(v) {
            *o += e / total * f64::from(x);
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// SiLU in f64.
pub fn silu(x: f32) -> f32 {
    let x = f64::from(x);
    (x / (1.0 + (-x).exp())) as f32
}

/// tanh-approximated GELU in f64.
pub fn gelu_tanh(x: f32) -> f32 {
    let x = f64::from(x);
    let c = (2.0 / std::f64::consts::PI).sqrt();
    (0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())) as f32
}
