//! CPU calibration kernels of `matformer bench`: the machine's own limits, measured in the same
//! run as a benchmark so efficiencies are ratios, not absolute times.

use std::hint::black_box;
use std::time::Instant;

/// Streaming-read bandwidth of this machine's CPU cores: every thread sums its share of a
/// 512 MiB buffer; best of 3 passes after a warm-up.
pub fn cpu_read_bandwidth(threads: usize) -> f64 {
    let words = (512usize << 20) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads.max(1));
    let mut best = 0f64;
    for pass in 0..4 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        let mut acc = [0u64; 8];
                        for block in c.chunks_exact(8) {
                            for (a, v) in acc.iter_mut().zip(block) {
                                *a = a.wrapping_add(*v);
                            }
                        }
                        acc.iter().fold(0u64, |x, y| x.wrapping_add(*y))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        });
        black_box(total);
        let gbs = (words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9;
        if pass > 0 {
            best = best.max(gbs);
        }
    }
    best
}

/// Multiply-add throughput of this machine's CPU cores (f32, a separate multiply and add as
/// the engine's kernels compile to, at the build's vector width): 8 independent 8-wide
/// accumulators per thread; best of 3.
pub fn cpu_multiply_add_gflops(threads: usize) -> f64 {
    const ITERS: usize = 20_000_000;
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for k in 0..threads.max(1) {
                s.spawn(move || {
                    let mut acc = [[k as f32 * 1e-3; 8]; 8];
                    let m = black_box(0.999_999_f32);
                    let a = black_box(1e-7_f32);
                    for _ in 0..ITERS / 8 {
                        for row in acc.iter_mut() {
                            for v in row.iter_mut() {
                                *v = *v * m + a;
                            }
                        }
                    }
                    black_box(acc);
                });
            }
        });
        let flops = (ITERS / 8 * 64 * 2 * threads.max(1)) as f64;
        best = best.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}
