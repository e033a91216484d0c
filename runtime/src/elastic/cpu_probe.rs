//! This CPU as a latency cost-model device: its identity ([`cpu_device_id`]) and its limits
//! ([`measure_limits`]: streaming-read bandwidth and multiply-add throughput at the engine's
//! thread count), the rates of the roofline in [`crate::elastic::latency`].

use std::hint::black_box;
use std::time::Instant;

use super::latency::{DeviceId, DeviceLimits};

/// Bytes streamed by [`measure_limits`]' bandwidth probe: beyond the last-level cache of
/// phones (8-16 MiB) and most desktops, small enough to allocate for a moment on a phone.
pub const LIMITS_READ_BYTES: usize = 64 << 20;

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

/// Streaming-read bandwidth of `threads` cores, GB/s: every thread sums its share of a
/// `bytes`-byte buffer; the best of 3 passes after a warm-up.
pub fn read_bandwidth(threads: usize, bytes: usize) -> f64 {
    let words = (bytes / 8).max(8);
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

/// Multiply-add throughput of `threads` cores, GFLOP/s (f32, a separate multiply and add as
/// the engine's kernels compile to, at the build's vector width): 8 independent 8-wide
/// accumulators per thread, `iterations` steps each; the best of 3.
pub fn multiply_add_gflops(threads: usize, iterations: usize) -> f64 {
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for k in 0..threads.max(1) {
                s.spawn(move || {
                    let mut acc = [[k as f32 * 1e-3; 8]; 8];
                    let m = black_box(0.999_999_f32);
                    let a = black_box(1e-7_f32);
                    for _ in 0..iterations / 8 {
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
        let flops = (iterations / 8 * 64 * 2 * threads.max(1)) as f64;
        best = best.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// This CPU's limits at `threads` threads (a fraction of a second): bandwidth over
/// [`LIMITS_READ_BYTES`], multiply-adds over 2 million steps per thread.
pub fn measure_limits(threads: usize) -> DeviceLimits {
    let gbs = read_bandwidth(threads, LIMITS_READ_BYTES);
    let gflops = multiply_add_gflops(threads, 2_000_000);
    DeviceLimits {
        read_bytes_per_second: gbs * 1e9,
        flops_per_second: gflops * 1e9,
        method: format!(
            "{threads}-thread streaming sum over {} MiB; {threads}-thread f32 multiply-add loop ({})",
            LIMITS_READ_BYTES >> 20,
            crate::cpu::simd_features()
        ),
    }
}
