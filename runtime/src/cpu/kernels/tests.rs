//! Property tests: each fast kernel against its scalar reference on random shapes and
//! values (named tolerances), plus the bitwise batch/thread invariances.

use half::f16;

use super::dot::*;
use super::matmul::*;
use super::ops::*;
use super::pool::*;
use crate::cpu::reference;
use crate::cpu::tolerance::Tolerance;
use crate::cpu::weights::{Matrix, Part, RowData, F16_SCALE};

/// SplitMix64: a tiny deterministic generator for test data.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n).
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// Uniform in [-1, 1).
    pub(super) fn f(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

fn check(tol: Tolerance, expected: &[f32], actual: &[f32], what: &str) {
    if let Err(m) = tol.check(expected, actual) {
        panic!("{what}: {m}");
    }
}

/// Weights as stored (f16 values are rounded first, so the reference sees the same
/// numbers), split into random parts like level segments.
pub(super) struct TestMatrix {
    rows: usize,
    cols: usize,
    f32_data: Vec<f32>,
    f16_data: Vec<f16>,
    splits: Vec<usize>,
}

impl TestMatrix {
    pub(super) fn new(rng: &mut Rng, rows: usize, cols: usize, use_f16: bool) -> TestMatrix {
        let mut f32_data = rng.vec(rows * cols);
        let f16_data: Vec<f16> = f32_data.iter().map(|&v| f16::from_f32(v)).collect();
        if use_f16 {
            f32_data = f16_data.iter().map(|v| v.to_f32()).collect();
        }
        let mut splits: Vec<usize> = (0..rng.below(4)).map(|_| rng.below(rows + 1)).collect();
        splits.push(0);
        splits.push(rows);
        splits.sort_unstable();
        splits.dedup();
        TestMatrix { rows, cols, f32_data, f16_data, splits }
    }

    pub(super) fn view(&self, use_f16: bool) -> Matrix<'_> {
        let parts = self
            .splits
            .windows(2)
            .map(|w| {
                let (a, b) = (w[0] * self.cols, w[1] * self.cols);
                Part {
                    first_row: w[0],
                    rows: w[1] - w[0],
                    data: if use_f16 { RowData::F16(&self.f16_data[a..b]) } else { RowData::F32(&self.f32_data[a..b]) },
                }
            })
            .collect();
        Matrix { rows: self.rows, cols: self.cols, parts }
    }
}

#[test]
fn dot_and_sum_match_reference() {
    let mut rng = Rng(1);
    for _ in 0..200 {
        let n = rng.below(600);
        let (x, w) = (rng.vec(n), rng.vec(n));
        let r = reference::matvec(&w, 1, n, &x);
        check(Tolerance::KERNEL, &r, &[dot(&x, &w)], "dot");
        let s: f64 = x.iter().map(|&v| f64::from(v)).sum();
        check(Tolerance::KERNEL, &[s as f32], &[sum(&x)], "sum");
    }
}

#[test]
fn matmul_matches_reference_batched_and_threaded() {
    let mut rng = Rng(2);
    for case in 0..60 {
        let use_f16 = case % 2 == 0;
        let rows = 1 + rng.below(70);
        let cols = 1 + rng.below(600);
        let t = 1 + rng.below(9);
        let m = TestMatrix::new(&mut rng, rows, cols, use_f16);
        let view = m.view(use_f16);
        let x = rng.vec(t * cols);
        let mut batched = vec![0.0; t * rows];
        matmul(&x, t, &view, &mut batched, 1);
        for i in 0..t {
            let xi = &x[i * cols..(i + 1) * cols];
            let expected = reference::matvec(&m.f32_data, rows, cols, xi);
            let got = &batched[i * rows..(i + 1) * rows];
            check(Tolerance::KERNEL, &expected, got, "matmul vs reference");
            let mut single = vec![0.0; rows];
            matmul(xi, 1, &view, &mut single, 1);
            check(Tolerance::EXACT, got, &single, "batched vs one token");
        }
    }
}

#[test]
fn parallel_kernels_are_bitwise_thread_independent() {
    let mut rng = Rng(3);
    // The last two are above PAR_MIN_WORK multiply-adds, so they take the threaded paths.
    for &(rows, cols, t) in
        &[(700, 400, 1), (513, 520, 3), (64, 4100, 2), (1000, 300, 5), (2100, 1030, 1), (1030, 700, 3)]
    {
        for use_f16 in [false, true] {
            let m = TestMatrix::new(&mut rng, rows, cols, use_f16);
            let view = m.view(use_f16);
            let x = rng.vec(t * cols);
            let mut one = vec![0.0; t * rows];
            matmul(&x, t, &view, &mut one, 1);
            let h = rng.vec(t * rows);
            let mut down_one = vec![0.0; t * cols];
            matmul_down(&h, t, &view, &mut down_one, 1);
            for threads in [2, 3, 7] {
                let mut many = vec![0.0; t * rows];
                matmul(&x, t, &view, &mut many, threads);
                check(Tolerance::EXACT, &one, &many, "matmul threads");
                let mut down_many = vec![0.0; t * cols];
                matmul_down(&h, t, &view, &mut down_many, threads);
                check(Tolerance::EXACT, &down_one, &down_many, "down threads");
            }
            for i in 0..t {
                let expected = reference::matvec(&m.f32_data, rows, cols, &x[i * cols..(i + 1) * cols]);
                check(Tolerance::KERNEL, &expected, &one[i * rows..(i + 1) * rows], "big matmul");
            }
        }
    }
}

/// Several products of one input in one hand-off (q/k/v, gate/up) give bitwise the
/// results of separate [`matmul`] calls, for one and several inputs, f16 and f32 weights,
/// small matrices (below [`PAR_MIN_WORK`] alone) and large ones, any thread count.
#[test]
fn matmul_many_equals_separate_products_bitwise() {
    let mut rng = Rng(31);
    for &(shapes, cols, t) in &[
        (&[700usize, 90, 90][..], 400usize, 1usize),
        (&[2048, 512, 512][..], 1030, 1),
        (&[33, 7][..], 61, 1),
        (&[300, 300][..], 257, 3),
    ] {
        for use_f16 in [false, true] {
            let ms: Vec<TestMatrix> = shapes.iter().map(|&r| TestMatrix::new(&mut rng, r, cols, use_f16)).collect();
            let views: Vec<Matrix<'_>> = ms.iter().map(|m| m.view(use_f16)).collect();
            let x = rng.vec(t * cols);
            let separate: Vec<Vec<f32>> = views
                .iter()
                .map(|v| {
                    let mut out = vec![0.0; t * v.rows];
                    matmul(&x, t, v, &mut out, 1);
                    out
                })
                .collect();
            for threads in [1, 2, 3] {
                let mut outs: Vec<Vec<f32>> = views.iter().map(|v| vec![f32::NAN; t * v.rows]).collect();
                let mut products: Vec<(&Matrix<'_>, &mut [f32])> =
                    views.iter().zip(outs.iter_mut()).map(|(v, o)| (v, &mut o[..])).collect();
                matmul_many(&x, t, &mut products, threads);
                for (want, got) in separate.iter().zip(&outs) {
                    check(Tolerance::EXACT, want, got, "matmul_many");
                }
            }
        }
    }
}

#[test]
fn down_projection_matches_reference_and_batch() {
    let mut rng = Rng(4);
    for case in 0..60 {
        let use_f16 = case % 2 == 1;
        let rows = 1 + rng.below(300);
        let cols = 1 + rng.below(200);
        let t = 1 + rng.below(6);
        let m = TestMatrix::new(&mut rng, rows, cols, use_f16);
        let view = m.view(use_f16);
        let h = rng.vec(t * rows);
        let mut batched = vec![0.0; t * cols];
        matmul_down(&h, t, &view, &mut batched, 2);
        for i in 0..t {
            let hi = &h[i * rows..(i + 1) * rows];
            let expected = reference::matvec_transposed(&m.f32_data, rows, cols, hi);
            let got = &batched[i * cols..(i + 1) * cols];
            check(Tolerance::KERNEL, &expected, got, "down vs reference");
            let mut single = vec![1.0; cols];
            matmul_down(hi, 1, &view, &mut single, 1);
            check(Tolerance::EXACT, got, &single, "down batched vs one token");
        }
    }
}

#[test]
fn norms_match_reference() {
    let mut rng = Rng(5);
    for _ in 0..100 {
        let n = 1 + rng.below(500);
        let x: Vec<f32> = rng.vec(n).iter().map(|v| v * 3.0 + 0.5).collect();
        let w = rng.vec(n);
        let b = rng.vec(n);
        let mut out = vec![0.0; n];
        rms_norm(&x, &w, 1e-5, &mut out);
        check(Tolerance::KERNEL, &reference::rms_norm(&x, &w, 1e-5), &out, "rms_norm");
        layer_norm(&x, &w, &b, 1e-5, &mut out);
        check(Tolerance::KERNEL, &reference::layer_norm(&x, &w, &b, 1e-5), &out, "layer_norm");
    }
}

#[test]
fn rope_matches_reference() {
    let mut rng = Rng(6);
    for _ in 0..100 {
        let hd = 2 * (1 + rng.below(64));
        // f32 angles `pos * inv_freq` (as in PyTorch) lose ~pos ulps: keep positions
        // small here; long-context behaviour is the reference forward's business.
        let pos = rng.below(48);
        let theta = if rng.below(2) == 0 { 10000.0 } else { 500000.0 };
        let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / f32::powf(theta, (2 * i) as f32 / hd as f32)).collect();
        let mut c = vec![0.0; hd / 2];
        let mut s = vec![0.0; hd / 2];
        rope_angles(pos, &inv, &mut c, &mut s);
        let x = rng.vec(hd);
        let mut y = x.clone();
        rope(&mut y, &c, &s);
        check(Tolerance::KERNEL, &reference::rope(&x, pos, theta), &y, "rope");
    }
}

#[test]
fn attention_matches_reference() {
    let mut rng = Rng(7);
    for _ in 0..100 {
        let hd = 1 + rng.below(80);
        let n_kv = 1 + rng.below(3);
        let kv_dim = hd * n_kv;
        let g = rng.below(n_kv);
        let n = 1 + rng.below(120);
        let keys: Vec<f32> = rng.vec(n * kv_dim).iter().map(|v| v * 2.0).collect();
        let values = rng.vec(n * kv_dim);
        let q: Vec<f32> = rng.vec(hd).iter().map(|v| v * 2.0).collect();
        let mut scores = vec![0.0; n];
        let mut out = vec![0.0; hd];
        let scale = 1.0 / (hd as f32).sqrt();
        attend(&q, &keys, &values, n, kv_dim, g * hd, scale, &mut scores, &mut out);
        let head = |c: &[f32]| -> Vec<Vec<f32>> {
            (0..n).map(|j| c[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd].to_vec()).collect()
        };
        let expected = reference::attention(&q, &head(&keys), &head(&values));
        check(Tolerance::KERNEL, &expected, &out, "attention");
    }
}

#[test]
fn activations_match_reference() {
    let mut rng = Rng(8);
    for _ in 0..1000 {
        let x = rng.f() * 12.0;
        check(Tolerance::KERNEL, &[reference::silu(x)], &[silu(x)], "silu");
        check(Tolerance::KERNEL, &[reference::gelu_tanh(x)], &[gelu_tanh(x)], "gelu");
    }
}

#[test]
fn par_units_covers_every_unit_once() {
    let run = |threads: usize| {
        let mut out = vec![0.0f32; 37 * 3];
        par_units(&mut out, 3, PAR_MIN_WORK * 4, threads, 2, |u, c, s| {
            assert_eq!(s.len(), 2);
            for v in c.iter_mut() {
                *v += u as f32;
            }
        });
        out
    };
    let expected: Vec<f32> = (0..37).flat_map(|u| [u as f32; 3]).collect();
    for threads in [1, 2, 5] {
        // From outside the pool, and from one of its workers (as in a forward pass).
        assert_eq!(run(threads), expected);
        assert_eq!(with_workers(threads, || run(threads)), expected);
    }
    // Fewer threads than the pool has workers, and more (no second pool is made).
    assert_eq!(with_workers(5, || run(2)), expected);
    assert_eq!(with_workers(2, || run(5)), expected);
}

#[test]
fn f16_widening_is_exact_for_every_value() {
    for bits in 0..=u16::MAX {
        let expected = f16::from_bits(bits).to_f32();
        let got = super::super::weights::widen_f16(bits);
        if expected.is_nan() {
            assert!(got.is_nan() && got.is_sign_negative() == expected.is_sign_negative(), "{bits:#06x}");
        } else {
            assert_eq!(got.to_bits(), expected.to_bits(), "{bits:#06x}");
        }
        if expected.is_finite() {
            let unscaled = super::super::weights::f16_bits_unscaled(bits);
            assert_eq!((unscaled * F16_SCALE).to_bits(), expected.to_bits(), "unscaled {bits:#06x}");
        }
    }
}

/// The f16 fast paths (prescaled input, large input, infinite and NaN weights, subnormal
/// weights) give bitwise the results of the same kernels on the exactly widened f32
/// weights, which follow the canonical order.
#[test]
fn f16_paths_equal_widened_f32_bitwise() {
    let same = |a: &[f32], b: &[f32], what: &str| {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()), "{what}[{i}]: {x} vs {y}");
        }
    };
    let mut rng = Rng(9);
    for case in 0..48 {
        let rows = 1 + rng.below(90);
        let cols = 1 + rng.below(300);
        let mut m = TestMatrix::new(&mut rng, rows, cols, true);
        // Subnormal weights everywhere; an infinity or a NaN in some cases.
        for _ in 0..cols {
            let k = rng.below(rows * cols);
            m.f16_data[k] = f16::from_bits((rng.next_u64() as u16) & 0x83ff);
        }
        if case % 3 == 1 {
            let k = rng.below(rows * cols);
            m.f16_data[k] = if case % 2 == 0 { f16::INFINITY } else { f16::NAN };
        }
        m.f32_data = m.f16_data.iter().map(|v| v.to_f32()).collect();
        let mut x = rng.vec(cols);
        let mut h = rng.vec(rows);
        if case % 4 == 3 {
            // Inputs too large to be scaled by 2^112.
            x[rng.below(cols)] = 1.0e6;
            h[rng.below(rows)] = -3.0e5;
        }
        for threads in [1, 2] {
            let (mut a, mut b) = (vec![0.0; rows], vec![0.0; rows]);
            matmul(&x, 1, &m.view(true), &mut a, threads);
            matmul(&x, 1, &m.view(false), &mut b, threads);
            same(&a, &b, "matmul");
            let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
            matmul_down(&h, 1, &m.view(true), &mut a, threads);
            matmul_down(&h, 1, &m.view(false), &mut b, threads);
            same(&a, &b, "down");
        }
    }
}

/// Both one-input f16 dot kernels (the bit-level one used without f16 conversion
/// instructions, the exact one used with them), whichever the build uses: bitwise [`dot`]
/// with the exactly widened row, for lengths that are not multiples of [`LANES`], with
/// subnormal weights, and the bit-level kernel reports infinite and NaN weights.
#[test]
fn dot_kernels_equal_widened_dot_bitwise() {
    let mut rng = Rng(21);
    for case in 0..200 {
        let n = 1 + rng.below(200);
        let mut w: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.f())).collect();
        for _ in 0..n / 4 {
            let k = rng.below(n);
            w[k] = f16::from_bits((rng.next_u64() as u16) & 0x83ff);
        }
        let special = case % 5 == 2;
        if special {
            w[rng.below(n)] = if case % 2 == 0 { f16::NEG_INFINITY } else { f16::NAN };
        }
        let mut x = rng.vec(n);
        if case % 7 == 3 {
            x[rng.below(n)] = 2.0e5;
        }
        let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let want = dot(&x, &wide);
        let same = |got: f32, what: &str| {
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "case {case} {what}: {got} vs {want}"
            );
        };
        same(dot_f16_exact(&x, &w), "exact");
        let bits: Vec<u16> = w.iter().map(|v| v.to_bits()).collect();
        let unscaled = dot_f16_bits::<false>(&x, &bits);
        assert_eq!(unscaled.is_none(), special, "case {case}: bit kernel's infinity/NaN report");
        if let Some(got) = unscaled {
            same(got, "bits");
        }
        if let Some(xs) = prescale(&x) {
            let scaled = dot_f16_bits::<true>(&xs, &bits);
            assert_eq!(scaled.is_none(), special, "case {case}: prescaled bit kernel's report");
            if let Some(got) = scaled {
                same(got, "bits prescaled");
            }
        }
    }
}

/// Both row-block kernels of the one-input down projection (the bit-level one used without
/// f16 conversion instructions, the exact one used with them), whichever the build uses:
/// bitwise the sequential `axpy`s with exactly widened rows, for every block size, with
/// column counts that are not multiples of [`LANES`], and the bit-level kernel reports
/// infinite and NaN weights (in the vector part and in the last columns).
#[test]
fn down_row_blocks_equal_sequential_axpy_bitwise() {
    fn check_blocks<const R: usize>(rng: &mut Rng) {
        for case in 0..40 {
            let n = 1 + rng.below(70);
            let mut w: Vec<f16> = rng.vec(R * n).iter().map(|&v| f16::from_f32(v * 4.0)).collect();
            // Subnormal weights in some cases.
            if case % 2 == 0 {
                let k = rng.below(R * n);
                w[k] = f16::from_bits((rng.next_u64() as u16) & 0x83ff);
            }
            let mut a: [f32; R] = std::array::from_fn(|_| rng.f());
            if case % 5 == 4 {
                // A coefficient too large to be scaled by 2^112.
                a[rng.below(R)] = 1.0e6;
            }
            let y0 = rng.vec(n);
            let mut expected = y0.clone();
            for (r, &ar) in a.iter().enumerate() {
                let row: Vec<f32> = w[r * n..(r + 1) * n].iter().map(|v| v.to_f32()).collect();
                axpy(&mut expected, ar, &row);
            }
            let bits: &[u16] = bytemuck::cast_slice(&w);
            let mut exact = y0.clone();
            axpy_rows_f16_exact::<R>(&mut exact, a, &w);
            let mut fast = y0.clone();
            let finite = if a.iter().all(|v| v.abs() < PRESCALE_LIMIT) {
                axpy_rows_f16_bits::<R, true>(&mut fast, a.map(|v| v * F16_SCALE), bits)
            } else {
                axpy_rows_f16_bits::<R, false>(&mut fast, a, bits)
            };
            assert!(finite, "R={R} n={n}: finite weights reported as non-finite");
            let mut dispatched = y0.clone();
            assert!(axpy_rows_f16::<R>(&mut dispatched, &a, &w));
            for (what, got) in [("exact", &exact), ("bits", &fast), ("dispatched", &dispatched)] {
                let same = expected.iter().zip(got.iter()).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "R={R} n={n} {what}: {got:?} vs {expected:?}");
            }
            // One infinite or NaN weight anywhere (vector part or last columns) is reported.
            let k = rng.below(R * n);
            let mut bad = w.clone();
            bad[k] = if case % 2 == 0 { f16::NEG_INFINITY } else { f16::NAN };
            let bad_bits: &[u16] = bytemuck::cast_slice(&bad);
            let mut y = y0.clone();
            assert!(!axpy_rows_f16_bits::<R, false>(&mut y, a, bad_bits), "R={R} n={n} k={k}");
        }
    }
    let mut rng = Rng(10);
    check_blocks::<1>(&mut rng);
    check_blocks::<4>(&mut rng);
    check_blocks::<DOWN_ROWS>(&mut rng);
}

#[test]
fn split_ranges_partition() {
    for n in 0..50 {
        for parts in 1..6 {
            for align in [1, 4, 8] {
                let r = split_ranges(n, parts, align);
                assert!(r.len() <= parts);
                let mut next = 0;
                for &(s, e) in &r {
                    assert_eq!(s, next);
                    assert!(e > s);
                    assert!(s % align == 0);
                    next = e;
                }
                assert_eq!(next, n);
            }
        }
    }
}

/// The small-batch and prefill f16 paths (rows widened in registers, inputs in groups) on
/// odd and wide shapes: every batch size from 1 to 9, 17 and 64, widths that are not a
/// multiple of [`LANES`], several parts; each output within [`Tolerance::KERNEL`] of the
/// reference and bitwise the one-input product, on one and two threads. Also with subnormal,
/// infinite and NaN weights (bitwise, NaN for NaN).
#[test]
fn batched_f16_paths_match_reference_and_one_token_bitwise() {
    let same = |a: &[f32], b: &[f32], what: &str| {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()), "{what}[{i}]: {x} vs {y}");
        }
    };
    let mut rng = Rng(41);
    let ts = [1usize, 2, 3, 4, 5, 6, 7, 8, 9, 17, 64];
    for (case, &cols) in [1usize, 31, 32, 33, 95, 257, 640, 1030].iter().cycle().take(24).enumerate() {
        let t = ts[case % ts.len()];
        let rows = 1 + rng.below(40);
        let mut m = TestMatrix::new(&mut rng, rows, cols, true);
        if case % 4 == 3 {
            for _ in 0..cols {
                let k = rng.below(rows * cols);
                m.f16_data[k] = f16::from_bits((rng.next_u64() as u16) & 0x83ff);
            }
            let k = rng.below(rows * cols);
            m.f16_data[k] = if case % 8 == 3 { f16::INFINITY } else { f16::NAN };
            m.f32_data = m.f16_data.iter().map(|v| v.to_f32()).collect();
        }
        let view = m.view(true);
        let x = rng.vec(t * cols);
        let h = rng.vec(t * rows);
        for threads in [1, 2] {
            let mut batched = vec![0.0; t * rows];
            matmul(&x, t, &view, &mut batched, threads);
            let mut down = vec![0.0; t * cols];
            matmul_down(&h, t, &view, &mut down, threads);
            for i in 0..t {
                let xi = &x[i * cols..(i + 1) * cols];
                let got = &batched[i * rows..(i + 1) * rows];
                let mut single = vec![0.0; rows];
                matmul(xi, 1, &view, &mut single, 1);
                same(got, &single, &format!("matmul t={t} cols={cols} th={threads} input {i}"));
                let hi = &h[i * rows..(i + 1) * rows];
                let mut down_single = vec![0.0; cols];
                matmul_down(hi, 1, &view, &mut down_single, 1);
                same(&down[i * cols..(i + 1) * cols], &down_single, &format!("down t={t} cols={cols} input {i}"));
                if case % 4 != 3 {
                    check(
                        Tolerance::KERNEL,
                        &reference::matvec(&m.f32_data, rows, cols, xi),
                        got,
                        "matmul vs reference",
                    );
                    let expected = reference::matvec_transposed(&m.f32_data, rows, cols, hi);
                    check(Tolerance::KERNEL, &expected, &down[i * cols..(i + 1) * cols], "down vs reference");
                }
            }
        }
    }
}

/// The multi-input f16 dot product against the widened one-input [`dot`], lane group by lane
/// group, for every group size the dispatcher uses and lengths around multiples of [`LANES`].
#[test]
fn dot_many_f16_equals_dot_bitwise() {
    let mut rng = Rng(42);
    for n in [0usize, 1, 7, 31, 32, 33, 64, 65, 200, 511] {
        for t in 1..=9 {
            let x = rng.vec(t * n);
            let w: Vec<f16> = rng.vec(n).into_iter().map(f16::from_f32).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let mut out = vec![f32::NAN; t * 3];
            dot_many_f16(&x, t, &w, &mut out, 3);
            for i in 0..t {
                let want = dot(&x[i * n..(i + 1) * n], &wf);
                assert_eq!(out[i * 3].to_bits(), want.to_bits(), "n={n} t={t} input {i}");
            }
        }
    }
}
