//! Kernel-class timing of the CPU engine at a model's real shapes, for the latency cost model
//! ([`crate::elastic::latency`]) and `matformer bench`.
//!
//! [`measure_kernels`] replays the decode step's kernels (the same calls as the engine's
//! forward pass for one token, with the engine's thread count) on the file's own weights,
//! layer after layer, once per FFN level, so the weights stream from memory as in a real
//! decode rather than staying in cache (the shared weights once per round, the FFN weights
//! once per level and round). A warm-up round touches every weight first (page
//! faults are not timed); each class's time is its mean per layer (per token for the LM head
//! and the per-token small ops) in the fastest timed round: the device's own speed, as little
//! disturbed as the rounds allow by other processes sharing the cores. Attention is timed at
//! two contexts on a synthetic f32 KV cache; the line through them gives the per-context-token
//! slope.

use std::collections::BTreeMap;
use std::time::Instant;

use super::latency::{DeviceId, KernelClass, KernelTimings, WidthCost};
use crate::cpu::kernels;
use crate::cpu::weights::Matrix;
use crate::cpu::{CpuEngine, EngineError};
use crate::format::{names, Activation, NormKind};

/// Options of [`measure_kernels`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOptions {
    /// Timed rounds after the warm-up (at least 1). Default 2.
    pub rounds: usize,
    /// Short attention context, tokens. Default 16.
    pub short_context: usize,
    /// Long attention context, tokens (capped at the model's context). Default 1024.
    pub long_context: usize,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions { rounds: 2, short_context: 16, long_context: 1024 }
    }
}

/// This CPU as a cost-model device: the `model name` of `/proc/cpuinfo` (else the
/// architecture) and the thread count.
pub fn cpu_device_id(threads: usize) -> DeviceId {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| {
                    let k = k.trim();
                    k == "model name" || k == "Model" || k == "Hardware"
                })
                .map(|(_, v)| v.trim().to_string())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    DeviceId { backend: "cpu".to_string(), name, detail: format!("{} threads", threads.max(1)) }
}

/// Per-round sums of one timed quantity.
#[derive(Default)]
struct Acc {
    rounds: Vec<(f64, usize)>,
}

impl Acc {
    fn add(&mut self, round: usize, seconds: f64) {
        if self.rounds.len() <= round {
            self.rounds.resize(round + 1, (0.0, 0));
        }
        self.rounds[round].0 += seconds;
        self.rounds[round].1 += 1;
    }

    /// Fastest round's mean per sample, milliseconds (0 without samples).
    fn best_ms(&self) -> f64 {
        let best =
            self.rounds.iter().filter(|(_, n)| *n > 0).map(|(s, n)| s / *n as f64 * 1e3).fold(f64::INFINITY, f64::min);
        if best.is_finite() {
            best
        } else {
            0.0
        }
    }
}

/// Runs `f` and adds its wall time to `*total` (seconds).
fn timed<T>(total: &mut f64, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    *total += t.elapsed().as_secs_f64();
    out
}

/// Deterministic values in `[-scale, scale)`.
fn filler(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Times every kernel class of `engine`'s decode step on its model (module documentation).
/// Takes about `(rounds + 1)` passes over every FFN level's weights plus the shared weights
/// once per level.
pub fn measure_kernels(engine: &CpuEngine, opts: &ProbeOptions) -> Result<KernelTimings, EngineError> {
    let model = &**engine.model();
    let threads = engine.threads();
    let meta = model.metadata();
    let a = &meta.architecture;
    let u = |v: u32| v as usize;
    let (d, n_layers, n_heads, hd) = (u(a.d_model), u(a.n_layers), u(a.n_heads), u(a.head_dim));
    let (q_dim, kv_dim, vocab) = (n_heads * hd, u(a.n_kv_heads) * hd, u(a.vocab_size));
    let group = n_heads / u(a.n_kv_heads).max(1);
    let max_ctx = u(a.max_context).max(1);
    let short = opts.short_context.clamp(1, max_ctx);
    let long = opts.long_context.clamp(short, max_ctx);
    let levels = model.view().available_levels.max(1);
    let act = match a.activation {
        Activation::Silu => kernels::silu,
        Activation::GeluTanh => kernels::gelu_tanh,
    };
    let ones = vec![1.0f32; d];
    let zeros = vec![0.0f32; d];
    let norm = |x: &[f32], out: &mut [f32]| match a.norm {
        NormKind::RmsNorm => kernels::rms_norm(x, &ones, a.norm_eps, out),
        NormKind::LayerNorm => kernels::layer_norm(x, &ones, &zeros, a.norm_eps, out),
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let inv_freq: Vec<f32> =
        (0..hd / 2).map(|i| 1.0 / a.rope_theta.powf((2 * i) as f32 / hd as f32)).collect::<Vec<_>>();

    struct LayerW<'a> {
        wq: Matrix<'a>,
        wk: Matrix<'a>,
        wv: Matrix<'a>,
        wo: Matrix<'a>,
        keys: Vec<f32>,
        values: Vec<f32>,
    }
    let mut layers = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let n = |s: &str| names::layer(i, s);
        layers.push(LayerW {
            wq: Matrix::load(model, &n(names::WQ), q_dim, d)?,
            wk: Matrix::load(model, &n(names::WK), kv_dim, d)?,
            wv: Matrix::load(model, &n(names::WV), kv_dim, d)?,
            wo: Matrix::load(model, &n(names::WO), d, q_dim)?,
            keys: filler(long * kv_dim, 2 * i as u64 + 1, 0.5),
            values: filler(long * kv_dim, 2 * i as u64 + 2, 0.5),
        });
    }
    let head_name = if a.tied_embeddings { names::TOK_EMBEDDINGS } else { names::LM_HEAD };
    let head = Matrix::load(model, head_name, vocab, d)?;
    let emb = Matrix::load(model, names::TOK_EMBEDDINGS, vocab, d)?;

    let (mut proj, mut att_short, mut att_long, mut small_layer, mut small_token, mut lm_head) =
        (Acc::default(), Acc::default(), Acc::default(), Acc::default(), Acc::default(), Acc::default());
    let mut ffn: BTreeMap<usize, (Acc, Acc, Acc)> = BTreeMap::new();

    let x0 = filler(d, 99, 1.0);
    let (mut xn, mut q, mut k, mut v) =
        (vec![0.0f32; d], vec![0.0f32; q_dim], vec![0.0f32; kv_dim], vec![0.0f32; kv_dim]);
    let (mut att, mut out) = (vec![0.0f32; q_dim], vec![0.0f32; d]);
    let (mut cos, mut sin) = (vec![0.0f32; hd / 2], vec![0.0f32; hd / 2]);
    let mut logits = vec![0.0f32; vocab];
    kernels::rope_angles(short, &inv_freq, &mut cos, &mut sin);

    for r in 0..=opts.rounds.max(1) {
        // Round 0 is the warm-up: it pages every weight in and is not recorded.
        let record = |acc: &mut Acc, secs: f64| {
            if r > 0 {
                acc.add(r - 1, secs);
            }
        };
        for level in 0..levels {
            for (li, lw) in layers.iter().enumerate() {
                let mut x = x0.clone();
                let (mut t_small, mut t_proj) = (0.0, 0.0);
                // The shared weights once per round; the FFN at every level.
                if level == 0 {
                    timed(&mut t_small, || norm(&x, &mut xn));
                    timed(&mut t_proj, || {
                        kernels::matmul(&xn, 1, &lw.wq, &mut q, threads);
                        kernels::matmul(&xn, 1, &lw.wk, &mut k, threads);
                        kernels::matmul(&xn, 1, &lw.wv, &mut v, threads);
                    });
                    timed(&mut t_small, || {
                        for h in q.chunks_exact_mut(hd) {
                            kernels::rope(h, &cos, &sin);
                        }
                        for h in k.chunks_exact_mut(hd) {
                            kernels::rope(h, &cos, &sin);
                        }
                    });
                    for (n_ctx, acc) in [(short, &mut att_short), (long, &mut att_long)] {
                        let (keys, values, qr) = (&lw.keys[..n_ctx * kv_dim], &lw.values[..n_ctx * kv_dim], &q);
                        let work = n_heads.saturating_mul(n_ctx).saturating_mul(hd);
                        let mut t_att = 0.0;
                        timed(&mut t_att, || {
                            kernels::par_units(&mut att, hd, work, threads, n_ctx, |h, o, scores| {
                                let qh = &qr[h * hd..(h + 1) * hd];
                                kernels::attend(qh, keys, values, n_ctx, kv_dim, (h / group) * hd, scale, scores, o);
                            });
                        });
                        record(acc, t_att);
                    }
                    timed(&mut t_proj, || kernels::matmul(&att, 1, &lw.wo, &mut out, threads));
                    timed(&mut t_small, || {
                        kernels::add_assign(&mut x, &out);
                        norm(&x, &mut xn);
                    });
                }
                let w = meta.ffn_widths.get(li).and_then(|ws| ws.get(level)).copied().unwrap_or(0) as usize;
                if w > 0 {
                    let n = |s: &str| names::layer(li, s);
                    let up = Matrix::load(model, &n(names::FFN_UP), w, d)?;
                    let down = Matrix::load(model, &n(names::FFN_DOWN_T), w, d)?;
                    let gate = if a.gated_ffn { Some(Matrix::load(model, &n(names::FFN_GATE), w, d)?) } else { None };
                    let mut h = vec![0.0f32; w];
                    let mut g = vec![0.0f32; if gate.is_some() { w } else { 0 }];
                    let (mut t_up, mut t_act, mut t_down) = (0.0, 0.0, 0.0);
                    timed(&mut t_up, || {
                        kernels::matmul(&xn, 1, &up, &mut h, threads);
                        if let Some(gate) = &gate {
                            kernels::matmul(&xn, 1, gate, &mut g, threads);
                        }
                    });
                    timed(&mut t_act, || {
                        if gate.is_some() {
                            for (hv, gv) in h.iter_mut().zip(&g) {
                                *hv *= act(*gv);
                            }
                        } else {
                            for hv in h.iter_mut() {
                                *hv = act(*hv);
                            }
                        }
                    });
                    timed(&mut t_down, || kernels::matmul_down(&h, 1, &down, &mut out, threads));
                    timed(&mut t_small, || kernels::add_assign(&mut x, &out));
                    let (up_acc, act_acc, down_acc) = ffn.entry(w).or_default();
                    record(up_acc, t_up);
                    record(act_acc, t_act);
                    record(down_acc, t_down);
                }
                if level == 0 {
                    record(&mut proj, t_proj);
                    record(&mut small_layer, t_small);
                }
                std::hint::black_box(&x);
            }
        }
        let token = (r * 7919) % vocab;
        let (mut t_tok, mut t_head) = (0.0, 0.0);
        timed(&mut t_tok, || -> Result<(), EngineError> {
            let row =
                emb.row(token).ok_or(EngineError::TokenOutOfRange { token: token as u32, vocab: vocab as u32 })?;
            row.widen_into(&mut out);
            kernels::rope_angles(short + r, &inv_freq, &mut cos, &mut sin);
            norm(&out, &mut xn);
            Ok(())
        })?;
        timed(&mut t_head, || kernels::matmul(&xn, 1, &head, &mut logits, threads));
        timed(&mut t_tok, || std::hint::black_box(crate::cpu::argmax(&logits)));
        record(&mut lm_head, t_head);
        record(&mut small_token, t_tok);
    }

    // Attention is linear in the context: the line through the two measured points.
    let (t_short, t_long) = (att_short.best_ms(), att_long.best_ms());
    let slope = if long > short { ((t_long - t_short) / (long - short) as f64).max(0.0) } else { 0.0 };
    let at_zero = (t_short - slope * short as f64).max(0.0);
    let how = format!("timed: CPU kernels, {threads} threads, fastest of {} rounds", opts.rounds.max(1));
    Ok(KernelTimings {
        attention_projections_ms: proj.best_ms(),
        attention_ms_at_zero: at_zero,
        attention_ms_per_context_token: slope,
        ffn: ffn
            .iter()
            .map(|(&w, (up, act, down))| WidthCost {
                width: w as u32,
                up_ms: up.best_ms(),
                down_ms: down.best_ms(),
                act_ms: act.best_ms(),
            })
            .collect(),
        lm_head_ms: lm_head.best_ms(),
        small_ms_per_layer: small_layer.best_ms(),
        small_ms_per_token: small_token.best_ms(),
        sources: vec![
            (KernelClass::AttentionProjections, how.clone()),
            (KernelClass::Attention, format!("{how}, at {short} and {long} tokens of context")),
            (KernelClass::FfnUp, how.clone()),
            (KernelClass::FfnDown, how.clone()),
            (KernelClass::LmHead, how.clone()),
            (KernelClass::SmallOps, how),
        ],
    })
}
