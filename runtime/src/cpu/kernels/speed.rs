//! Micro-benchmarks (ignored): `cargo test -p matformer --release --lib speed -- --ignored --nocapture`.

use std::time::Instant;

use half::f16;

use super::matmul::*;
use crate::cpu::weights::{Matrix, Part, RowData};

fn bench(name: &str, bytes: usize, mut f: impl FnMut()) {
    f();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    eprintln!("{name:>40}: {:8.3} ms  {:6.2} GB/s", best * 1e3, bytes as f64 / best / 1e9);
}

#[test]
#[ignore = "benchmark"]
fn kernel_speed() {
    let (rows, cols) = (32768usize, 2048usize);
    let w16: Vec<f16> = (0..rows * cols).map(|i| f16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5)).collect();
    let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
    let m16 = Matrix { rows, cols, parts: vec![Part { first_row: 0, rows, data: RowData::F16(&w16) }] };
    let m32 = Matrix { rows, cols, parts: vec![Part { first_row: 0, rows, data: RowData::F32(&w32) }] };
    let x: Vec<f32> = (0..cols * 64).map(|i| (i % 13) as f32 / 13.0).collect();
    let h: Vec<f32> = (0..rows * 64).map(|i| (i % 11) as f32 / 11.0).collect();
    let mut out = vec![0.0f32; rows * 64];
    let mut out2 = vec![0.0f32; cols * 64];
    bench("widen f16 rows (half)", rows * cols * 2, || {
        let mut buf = vec![0.0f32; cols];
        for r in w16.chunks_exact(cols) {
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(r, &mut buf);
            std::hint::black_box(&buf);
        }
    });
    bench("widen f16 rows (widen_f16)", rows * cols * 2, || {
        let mut buf = vec![0.0f32; cols];
        for r in w16.chunks_exact(cols) {
            for (o, h) in buf.iter_mut().zip(r) {
                *o = super::super::weights::widen_f16(h.to_bits());
            }
            std::hint::black_box(&buf);
        }
    });
    // Small products, as in a decode step (k and v projections: 512 x 2048): the cost of
    // handing work to other threads shows here.
    let small = Matrix {
        rows: 512,
        cols,
        parts: vec![Part { first_row: 0, rows: 512, data: RowData::F16(&w16[..512 * cols]) }],
    };
    for threads in [1, 2] {
        bench(&format!("gemv f16 512x{cols} x64 th={threads}"), 64 * 512 * cols * 2, || {
            for _ in 0..64 {
                matmul(&x[..cols], 1, &small, &mut out[..512], threads);
            }
        });
    }
    // The 1B model's FFN at full width (`ffn_up`: 8192 x 2048, `ffn_down_t`: 8192 neurons
    // x 2048): four different 8192-row slices per run, so that no run reads from the
    // last-level cache what the previous one left there.
    let slices: Vec<Matrix<'_>> = w16
        .chunks_exact(8192 * cols)
        .map(|s| Matrix { rows: 8192, cols, parts: vec![Part { first_row: 0, rows: 8192, data: RowData::F16(s) }] })
        .collect();
    for threads in [1, 2] {
        bench(&format!("gemv f16 8192x{cols} x4 th={threads}"), rows * cols * 2, || {
            for m in &slices {
                matmul(&x[..cols], 1, m, &mut out[..8192], threads);
            }
        });
        bench(&format!("down f16 8192x{cols} x4 th={threads}"), rows * cols * 2, || {
            for m in &slices {
                matmul_down(&h[..8192], 1, m, &mut out2[..cols], threads);
            }
        });
    }
    // A decode step's q, k and v products (2048, 512 and 512 rows) on ten distinct sets of
    // weights: one hand-off for the three (`matmul_many`) against three calls.
    let sets: Vec<[Matrix<'_>; 3]> = w16
        .chunks_exact(3072 * cols)
        .map(|s| {
            let m = |a: usize, b: usize| Matrix {
                rows: b - a,
                cols,
                parts: vec![Part { first_row: 0, rows: b - a, data: RowData::F16(&s[a * cols..b * cols]) }],
            };
            [m(0, 2048), m(2048, 2560), m(2560, 3072)]
        })
        .collect();
    let qkv_bytes = sets.len() * 3072 * cols * 2;
    for round in 0..2 {
        bench(&format!("qkv 3 calls th=2 ({round})"), qkv_bytes, || {
            for [q, k, v] in &sets {
                matmul(&x[..cols], 1, q, &mut out[..2048], 2);
                matmul(&x[..cols], 1, k, &mut out[2048..2560], 2);
                matmul(&x[..cols], 1, v, &mut out[2560..3072], 2);
            }
        });
        bench(&format!("qkv matmul_many th=2 ({round})"), qkv_bytes, || {
            for [q, k, v] in &sets {
                let (oq, rest) = out[..3072].split_at_mut(2048);
                let (ok, ov) = rest.split_at_mut(512);
                matmul_many(&x[..cols], 1, &mut [(q, oq), (k, ok), (v, ov)], 2);
            }
        });
    }
    for threads in [1, 2] {
        bench(&format!("gemv f16 t=1 th={threads}"), rows * cols * 2, || {
            matmul(&x[..cols], 1, &m16, &mut out[..rows], threads)
        });
        bench(&format!("gemv f32 t=1 th={threads}"), rows * cols * 4, || {
            matmul(&x[..cols], 1, &m32, &mut out[..rows], threads)
        });
        bench(&format!("down f16 t=1 th={threads}"), rows * cols * 2, || {
            matmul_down(&h[..rows], 1, &m16, &mut out2[..cols], threads)
        });
        let flops = rows * cols * 2 * 64;
        let t = Instant::now();
        matmul(&x, 64, &m16, &mut out, threads);
        eprintln!(
            "{:>40}: {:.2} GFLOP/s",
            format!("matmul f16 t=64 th={threads}"),
            flops as f64 / t.elapsed().as_secs_f64() / 1e9
        );
        let t = Instant::now();
        matmul_down(&h, 64, &m16, &mut out2, threads);
        eprintln!(
            "{:>40}: {:.2} GFLOP/s",
            format!("down f16 t=64 th={threads}"),
            flops as f64 / t.elapsed().as_secs_f64() / 1e9
        );
    }
}

/// Weight bytes each timed run reads at least (in distinct matrices) for `t <= 8`: more than
/// the test machine's last-level cache (300 MB), so the runs read the weights from memory
/// as a decode step does.
const STREAM_BYTES: usize = 512 << 20;

/// `t` in `[1, 2, 4, 5, 8, 64]` against the 1B model's shapes, f16, `q8_0` and `q4_0`, one and two
/// threads: milliseconds per product and weight GB/s, then `time(t=5) / time(t=1)`.
/// `cargo test -p matformer --release --lib small_batch_speed -- --ignored --nocapture`
/// (`MATF_SPEED_T=1,5` restricts the batch sizes).
#[test]
#[ignore = "benchmark"]
fn small_batch_speed() {
    let cols = 2048usize;
    let ts: Vec<usize> = std::env::var("MATF_SPEED_T")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 5, 8, 64]);
    let total_rows = STREAM_BYTES / (cols * 2);
    let mut seed = 1u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let w16: Vec<f16> = (0..total_rows * cols).map(|_| f16::from_f32((rnd() % 2000) as f32 / 2000.0 - 0.5)).collect();
    // q8_0 and q4_0 blocks: a small f16 scale, then random bytes.
    let mut quant = |dtype: crate::format::DType| {
        let bb = dtype.block_bytes();
        let q_rows = STREAM_BYTES / (cols / 32 * bb);
        let mut wq = vec![0u8; q_rows * cols / 32 * bb];
        for blk in wq.chunks_exact_mut(bb) {
            blk[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
            for b in &mut blk[2..] {
                *b = rnd() as u8;
            }
        }
        wq
    };
    let wq8 = quant(crate::format::DType::Q8_0);
    let wq4 = quant(crate::format::DType::Q4_0);
    let x: Vec<f32> = (0..cols * 64).map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5).collect();
    let h: Vec<f32> = (0..8192 * 64).map(|i| ((i * 53) % 97) as f32 / 97.0 - 0.5).collect();
    let mut out = vec![0.0f32; 32768 * 64];
    // Distinct matrices of `rows` rows covering the stream (one for t = 64, compute-bound).
    let f16_mats = |rows: usize, n: usize| -> Vec<Matrix<'_>> {
        w16.chunks_exact(rows * cols)
            .take(n)
            .map(|s| Matrix { rows, cols, parts: vec![Part { first_row: 0, rows, data: RowData::F16(s) }] })
            .collect()
    };
    let q_mats = |dtype: crate::format::DType, rows: usize, n: usize| -> Vec<Matrix<'_>> {
        let wq = if dtype == crate::format::DType::Q8_0 { &wq8 } else { &wq4 };
        wq.chunks_exact(rows * cols / 32 * dtype.block_bytes())
            .take(n)
            .map(|s| Matrix { rows, cols, parts: vec![Part { first_row: 0, rows, data: RowData::Quant(dtype, s) }] })
            .collect()
    };
    let time = |f: &mut dyn FnMut(), reps: usize| -> f64 {
        f();
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            f();
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    let mut ratios = Vec::new();
    for threads in [1usize, 2] {
        for (kind, rows) in [
            ("f16", 2048usize),
            ("f16", 512),
            ("f16", 8192),
            ("f16", 32768),
            ("f16 down", 8192),
            ("q8_0", 2048),
            ("q8_0", 8192),
            ("q8_0 down", 8192),
            ("q4_0", 2048),
            ("q4_0", 8192),
            ("q4_0 down", 8192),
        ] {
            let mut per_t = Vec::new();
            for &t in &ts {
                let n = if t > 8 { 1 } else { usize::MAX };
                let mats = if kind.starts_with("f16") {
                    f16_mats(rows, n)
                } else if kind.starts_with("q8_0") {
                    q_mats(crate::format::DType::Q8_0, rows, n)
                } else {
                    q_mats(crate::format::DType::Q4_0, rows, n)
                };
                let down = kind.ends_with("down");
                let mut run = || {
                    for m in &mats {
                        if down {
                            matmul_down(&h[..t * rows], t, m, &mut out[..t * cols], threads);
                        } else {
                            matmul(&x[..t * cols], t, m, &mut out[..t * rows], threads);
                        }
                    }
                };
                let s = time(&mut run, if t > 8 { 2 } else { 3 }) / mats.len() as f64;
                let bytes = mats[0].bytes();
                eprintln!(
                    "{:>28}: {:9.3} ms  {:6.2} GB/s  {:7.2} GFLOP/s",
                    format!("{kind} {rows}x{cols} t={t} th={threads}"),
                    s * 1e3,
                    bytes as f64 / s / 1e9,
                    (2 * t * rows * cols) as f64 / s / 1e9
                );
                per_t.push((t, s));
            }
            let at = |t: usize| per_t.iter().find(|p| p.0 == t).map(|p| p.1);
            if let (Some(a), Some(b)) = (at(1), at(5)) {
                ratios.push(format!("{kind} {rows}x{cols} th={threads}: t5/t1 = {:.2}", b / a));
            }
        }
    }
    for r in ratios {
        eprintln!("{r}");
    }
}

/// The token-lane kernel ([`super::qlanes`]) against the row-by-token kernels on the same
/// batches, alternated: q4_0 and q8_0, 8192 x 2048 (one matrix, compute-bound), ms per
/// product. `MATF_SPEED_T` picks the batch sizes.
#[cfg(target_arch = "x86_64")]
#[test]
#[ignore = "benchmark"]
fn token_lane_speed() {
    use std::sync::atomic::Ordering;
    if !super::qlanes::available() {
        eprintln!("no token-lane kernel on this CPU");
        return;
    }
    let (rows, cols) = (8192usize, 2048usize);
    let ts: Vec<usize> = std::env::var("MATF_SPEED_T")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![5, 8, 13, 16, 32, 64]);
    let mut seed = 7u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let x: Vec<f32> = (0..cols * 64).map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5).collect();
    let mut out = vec![0.0f32; rows * 64];
    for dtype in [crate::format::DType::Q4_0, crate::format::DType::Q8_0] {
        let bb = dtype.block_bytes();
        let mut wq = vec![0u8; rows * cols / 32 * bb];
        for blk in wq.chunks_exact_mut(bb) {
            blk[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
            for b in &mut blk[2..] {
                *b = rnd() as u8;
            }
        }
        let m = Matrix { rows, cols, parts: vec![Part { first_row: 0, rows, data: RowData::Quant(dtype, &wq) }] };
        for threads in [1usize, 2] {
            for &t in &ts {
                let mut best = [f64::MAX; 2];
                for round in 0..6 {
                    let off = round % 2 == 1;
                    super::qlanes::OFF.store(off, Ordering::Relaxed);
                    let t0 = Instant::now();
                    matmul(&x[..t * cols], t, &m, &mut out[..t * rows], threads);
                    let s = t0.elapsed().as_secs_f64();
                    best[usize::from(off)] = best[usize::from(off)].min(s);
                }
                super::qlanes::OFF.store(false, Ordering::Relaxed);
                eprintln!(
                    "{dtype} {rows}x{cols} t={t} th={threads}: token-lane {:.3} ms ({:.1} GFLOP/s), row-by-token {:.3} ms ({:.1} GFLOP/s), ratio {:.2}",
                    best[0] * 1e3,
                    (2 * t * rows * cols) as f64 / best[0] / 1e9,
                    best[1] * 1e3,
                    (2 * t * rows * cols) as f64 / best[1] / 1e9,
                    best[1] / best[0]
                );
            }
        }
    }
}
