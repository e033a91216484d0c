//! The benchmark calibration kernels: the streaming-read kernel's per-workgroup sums equal a
//! CPU sum, and both calibrations (read bandwidth, fma throughput) return finite positive
//! figures on the available adapter.
//!
//! No adapter: the tests print "skipping: no GPU adapter (...)" and pass, except in CI
//! (`CI=true`), where they fail.
#![cfg(feature = "gpu")]

mod gpu_common;

use matformer::gpu::{OpRunner, WeightPath};

fn runner_or_skip() -> Option<OpRunner> {
    gpu_common::or_skip(OpRunner::new(None), "GPU op runner")
}

/// Deterministic words covering the whole u32 range (so the sums wrap).
fn words(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u32
        })
        .collect()
}

#[test]
fn read_kernel_sums_match_cpu() {
    let Some(r) = runner_or_skip() else { return };
    let wg = OpRunner::CALIBRATE_WORKGROUP as usize;
    // Word counts that are and are not multiples of 4 / of the grid; grids of 1 to many
    // groups; both mappings (strided for GPUs, blocked for CPU adapters).
    let wides: &[bool] =
        if r.available_weight_paths().contains(&WeightPath::Packed64) { &[false, true] } else { &[false] };
    for (&wide, blocked) in wides.iter().flat_map(|w| [(w, false), (w, true)]) {
        let unit_words = if wide { 8 } else { 4 };
        for (n, workgroups) in [(1usize, 1u32), (4, 1), (1000, 1), (4099, 3), (20_000, 7), (100_003, 64), (257, 16)] {
            let data = words(n, n as u64);
            let got = r.read_sums(&data, workgroups, blocked, wide).expect("read kernel runs");
            let threads = workgroups as usize * wg;
            let units = n.div_ceil(unit_words);
            let per = units.div_ceil(threads);
            let mut want = vec![0u32; workgroups as usize];
            for (i, &w) in data.iter().enumerate() {
                let invocation = if blocked { (i / unit_words) / per } else { (i / unit_words) % threads };
                let g = invocation / wg;
                want[g] = want[g].wrapping_add(w);
            }
            assert_eq!(got, want, "{n} words on {workgroups} workgroups, blocked={blocked}, wide={wide}");
            let total = got.iter().fold(0u32, |a, &b| a.wrapping_add(b));
            assert_eq!(total, data.iter().fold(0u32, |a, &b| a.wrapping_add(b)), "{n} words: total");
        }
    }
    assert!(r.read_sums(&[], 1, false, false).is_err());
    assert!(r.read_sums(&[1], 0, true, false).is_err());
    assert!(r.read_sums(&[1], 65536, false, false).is_err());
}

#[test]
fn read_bandwidth_is_finite_and_positive() {
    let Some(r) = runner_or_skip() else { return };
    let gbps = r.read_bandwidth(64 << 20, 4).expect("read calibration runs");
    println!("read bandwidth on {}: {gbps:.2} GB/s", r.adapter().name);
    assert!(gbps.is_finite() && gbps > 0.0, "read bandwidth {gbps}");
    assert!(r.read_bandwidth(31, 1).is_err());
    assert!(r.read_bandwidth(1 << 20, 0).is_err());
}

#[test]
fn fma_throughput_is_finite_and_positive() {
    let Some(r) = runner_or_skip() else { return };
    let gflops = r.fma_throughput(2048, 4).expect("fma calibration runs");
    println!("fma throughput on {}: {gflops:.2} GFLOP/s", r.adapter().name);
    assert!(gflops.is_finite() && gflops > 0.0, "fma throughput {gflops}");
    assert!(r.fma_throughput(0, 1).is_err());
    assert!(r.fma_throughput(16, 0).is_err());
}
