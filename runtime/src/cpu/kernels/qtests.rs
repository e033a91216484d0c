//! Property tests of the quantised kernels: every SIMD dot product against the scalar
//! reference on odd and wide shapes, the reference against the f32 product with the decoded
//! weights, and the bitwise batch / thread / down-projection invariances of the quantised
//! products.

use super::matmul::{matmul, matmul_down};
use super::qdot::{self, QActs};
use crate::cpu::reference;
use crate::cpu::tolerance::Tolerance;
use crate::cpu::weights::{Matrix, Part, RowData};
use crate::format::{DType, QK};
use crate::quant::{decode_row, encode_row, f16_at};

use super::tests::Rng;

const QTYPES: [DType; 3] = [DType::Q8_0, DType::Q4_0, DType::Q4_1];

impl Rng {
    /// Values of mixed magnitudes: some blocks zero, some tiny, some large, some one-sided.
    fn blocks(&mut self, n_blocks: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(n_blocks * QK);
        for _ in 0..n_blocks {
            let kind = self.below(8);
            let scale = [0.0, 1e-3, 1.0, 30.0, 1.0, 1.0, 0.2, 5.0][kind];
            let shift = if kind == 6 { 0.7 } else { 0.0 };
            for _ in 0..QK {
                v.push(self.f() * scale + shift);
            }
        }
        v
    }
}

/// Row `w` (f32) encoded in `dtype`.
fn encode(dtype: DType, w: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_row(dtype, w, &mut out).expect("whole blocks");
    out
}

/// `sum_b |term_b|` of the reference sum: the scale of the f32 rounding error.
fn magnitude(dtype: DType, w: &[u8], x: qdot::QAct<'_>) -> f32 {
    let bb = dtype.block_bytes();
    let mut m = 0.0f32;
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let mut dq = [0.0f32; QK];
        decode_row(dtype, blk, &mut dq).expect("one block");
        let xs: f32 = x.q[b * QK..(b + 1) * QK].iter().map(|&q| f32::from(q).abs()).sum();
        let min_term = if dtype == DType::Q4_1 { (f16_at(blk, 2) * x.s[b]).abs() } else { 0.0 };
        m += dq.iter().fold(0.0f32, |a, v| a.max(v.abs())) * x.d[b] * xs + min_term;
    }
    m
}

/// A dot-product kernel.
type Kernel = fn(DType, &[u8], qdot::QAct<'_>) -> f32;

/// The fast kernels this machine can run, by name.
fn fast_kernels() -> Vec<(&'static str, Kernel)> {
    let mut k: Vec<(&'static str, Kernel)> = vec![("dispatch", qdot::dot)];
    #[cfg(target_arch = "x86_64")]
    if qdot::x86::available() {
        k.push(("x86", qdot::x86::dot));
        k.push(("avx2", qdot::x86::dot_avx2));
    }
    #[cfg(target_arch = "aarch64")]
    {
        k.push(("neon", |d, w, x| qdot::arm::dot(d, w, x, false)));
        if qdot::arm::has_dotprod() {
            k.push(("neon-sdot", |d, w, x| qdot::arm::dot(d, w, x, true)));
        }
    }
    k
}

#[test]
fn fast_dots_match_the_scalar_reference_on_odd_and_wide_shapes() {
    let mut rng = Rng(11);
    let kernels = fast_kernels();
    for dtype in QTYPES {
        for nb in [1usize, 2, 3, 5, 7, 8, 9, 16, 31, 33, 64, 65, 127, 256, 259] {
            for _ in 0..4 {
                let w = encode(dtype, &rng.blocks(nb));
                let x = rng.blocks(nb);
                let qx = QActs::quantize(&x, 1, nb * QK);
                let xa = qx.token(0);
                let expected = qdot::dot_scalar(dtype, &w, xa);
                let tol = magnitude(dtype, &w, xa) * 64.0 * f32::EPSILON + 1e-30;
                for (name, k) in &kernels {
                    let got = k(dtype, &w, xa);
                    assert!(
                        (got - expected).abs() <= tol,
                        "{name} {dtype} {nb} blocks: {got} vs reference {expected} (tolerance {tol})"
                    );
                }
            }
        }
    }
}

#[test]
fn kernels_read_only_whole_blocks_both_operands_hold() {
    // Short operands never read out of bounds: the product covers the common whole blocks.
    let mut rng = Rng(12);
    for dtype in QTYPES {
        let w = encode(dtype, &rng.blocks(5));
        let x = rng.blocks(3);
        let qx = QActs::quantize(&x, 1, 3 * QK);
        let expected = qdot::dot_scalar(dtype, &w[..3 * dtype.block_bytes()], qx.token(0));
        for (name, k) in fast_kernels() {
            let got = k(dtype, &w[..w.len() - 1], qx.token(0));
            assert!((got - expected).abs() <= expected.abs() * 1e-5 + 1e-6, "{name} {dtype}: {got} vs {expected}");
            assert_eq!(k(dtype, &[], qx.token(0)), 0.0);
        }
    }
}

#[test]
fn reference_dot_is_the_f32_product_up_to_the_activation_rounding() {
    let mut rng = Rng(13);
    for dtype in QTYPES {
        for nb in [1usize, 4, 17, 64] {
            let wf = rng.blocks(nb);
            let w = encode(dtype, &wf);
            let mut wd = vec![0.0f32; nb * QK];
            decode_row(dtype, &w, &mut wd).expect("decode");
            let x = rng.blocks(nb);
            let qx = QActs::quantize(&x, 1, nb * QK);
            let exact: f64 = wd.iter().zip(&x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            // Each activation moves by at most half its block's step.
            let bound: f64 = (0..nb)
                .map(|b| {
                    let half_step = f64::from(qx.token(0).d[b]) / 2.0;
                    wd[b * QK..(b + 1) * QK].iter().map(|v| f64::from(v.abs()) * half_step).sum::<f64>()
                })
                .sum();
            let got = f64::from(qdot::dot_scalar(dtype, &w, qx.token(0)));
            assert!((got - exact).abs() <= bound * 1.01 + exact.abs() * 1e-5 + 1e-6, "{dtype} {nb}: {got} vs {exact}");
        }
    }
}

/// A quantised matrix split into parts at random rows, like level segments.
struct QMatrix {
    rows: usize,
    cols: usize,
    dtype: DType,
    bytes: Vec<u8>,
    decoded: Vec<f32>,
    splits: Vec<usize>,
}

impl QMatrix {
    fn new(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> QMatrix {
        let wf = rng.blocks(rows * cols / QK);
        let bytes = encode(dtype, &wf);
        let mut decoded = vec![0.0f32; rows * cols];
        decode_row(dtype, &bytes, &mut decoded).expect("decode");
        let mut splits: Vec<usize> = (0..rng.below(4)).map(|_| rng.below(rows + 1)).collect();
        splits.extend([0, rows]);
        splits.sort_unstable();
        splits.dedup();
        QMatrix { rows, cols, dtype, bytes, decoded, splits }
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.dtype.block_bytes()
    }

    fn view(&self) -> Matrix<'_> {
        let rb = self.row_bytes();
        let parts = self
            .splits
            .windows(2)
            .map(|w| Part {
                first_row: w[0],
                rows: w[1] - w[0],
                data: RowData::Quant(self.dtype, &self.bytes[w[0] * rb..w[1] * rb]),
            })
            .collect();
        Matrix { rows: self.rows, cols: self.cols, parts }
    }

    fn f32_view(&self) -> Matrix<'_> {
        Matrix {
            rows: self.rows,
            cols: self.cols,
            parts: vec![Part { first_row: 0, rows: self.rows, data: RowData::F32(&self.decoded) }],
        }
    }
}

#[test]
fn quantised_matmul_is_batch_and_thread_invariant_and_close_to_f32() {
    let mut rng = Rng(14);
    for case in 0..36 {
        let dtype = QTYPES[case % 3];
        let rows = 1 + rng.below(70);
        let cols = QK * (1 + rng.below(20));
        let t = 1 + rng.below(9);
        let m = QMatrix::new(&mut rng, dtype, rows, cols);
        let view = m.view();
        let x: Vec<f32> = (0..t * cols).map(|_| rng.f()).collect();
        let mut batched = vec![0.0; t * rows];
        matmul(&x, t, &view, &mut batched, 1);
        let mut threaded = vec![0.0; t * rows];
        matmul(&x, t, &view, &mut threaded, 3);
        Tolerance::EXACT.check(&batched, &threaded).unwrap_or_else(|e| panic!("threads: {e}"));
        for i in 0..t {
            let xi = &x[i * cols..(i + 1) * cols];
            let mut single = vec![0.0; rows];
            matmul(xi, 1, &view, &mut single, 1);
            Tolerance::EXACT
                .check(&batched[i * rows..(i + 1) * rows], &single)
                .unwrap_or_else(|e| panic!("{dtype} batched vs one token: {e}"));
            // Against the f32 product with the decoded weights: the activation's 8-bit rounding
            // (at most half a step of 1/127 of the block maximum per element).
            let expected = reference::matvec(&m.decoded, rows, cols, xi);
            for (r, (&e, &g)) in expected.iter().zip(&single).enumerate() {
                let w = &m.decoded[r * cols..(r + 1) * cols];
                let bound: f32 = w
                    .chunks(QK)
                    .zip(xi.chunks(QK))
                    .map(|(wb, xb)| {
                        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                        wb.iter().map(|v| v.abs()).sum::<f32>() * amax / 254.0
                    })
                    .sum();
                assert!((e - g).abs() <= bound * 1.01 + 1e-5, "{dtype} row {r}: {g} vs f32 {e} (bound {bound})");
            }
        }
    }
}

#[test]
fn quantised_down_projection_is_the_f32_one_on_decoded_weights() {
    let mut rng = Rng(15);
    for case in 0..24 {
        let dtype = QTYPES[case % 3];
        let rows = 1 + rng.below(600);
        let cols = QK * (1 + rng.below(12));
        let t = [1, 2, 5, 11][case % 4];
        let m = QMatrix::new(&mut rng, dtype, rows, cols);
        let h: Vec<f32> = (0..t * rows).map(|_| rng.f()).collect();
        let mut q = vec![0.0; t * cols];
        matmul_down(&h, t, &m.view(), &mut q, 2);
        let mut f = vec![0.0; t * cols];
        matmul_down(&h, t, &m.f32_view(), &mut f, 2);
        Tolerance::EXACT.check(&f, &q).unwrap_or_else(|e| panic!("{dtype} t {t}: {e}"));
    }
}

#[test]
fn a_prefix_of_a_quantised_tensor_is_the_quantised_prefix() {
    let mut rng = Rng(16);
    for dtype in QTYPES {
        let (rows, cols) = (37, 96);
        let wf: Vec<f32> = (0..rows * cols).map(|_| rng.f()).collect();
        let full = encode(dtype, &wf);
        for k in [0, 1, 5, 36, 37] {
            let prefix = encode(dtype, &wf[..k * cols]);
            assert_eq!(&full[..prefix.len()], &prefix[..], "{dtype} first {k} rows");
            assert_eq!(prefix.len(), k * cols / QK * dtype.block_bytes());
        }
    }
}

/// Speed of the one-token quantised GEMV on one thread (not a test: `--ignored --nocapture`).
#[test]
#[ignore]
fn quantised_gemv_speed() {
    let mut rng = Rng(17);
    let (rows, cols) = (8192, 2048);
    for dtype in QTYPES {
        let m = QMatrix::new(&mut rng, dtype, rows, cols);
        let view = m.view();
        let x: Vec<f32> = (0..cols).map(|_| rng.f()).collect();
        let mut out = vec![0.0; rows];
        matmul(&x, 1, &view, &mut out, 1);
        let t0 = std::time::Instant::now();
        let reps = 20;
        for _ in 0..reps {
            matmul(&x, 1, &view, &mut out, 1);
        }
        let s = t0.elapsed().as_secs_f64() / reps as f64;
        let bytes = m.bytes.len() as f64;
        eprintln!(
            "{dtype}: {:.3} ms, {:.2} GB/s, {:.2} ns/block",
            s * 1e3,
            bytes / s / 1e9,
            s * 1e9 / (rows * cols / QK) as f64
        );
        let h: Vec<f32> = (0..rows).map(|_| rng.f()).collect();
        let mut y = vec![0.0; cols];
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            matmul_down(&h, 1, &view, &mut y, 1);
        }
        let s = t0.elapsed().as_secs_f64() / reps as f64;
        eprintln!("{dtype} down: {:.3} ms, {:.2} GB/s", s * 1e3, bytes / s / 1e9);
    }
}

/// The multi-token quantised dot products (`dot_tokens`: groups of four and two tokens
/// sharing each weight block) give bitwise the one-token [`qdot::dot`] per token, and the
/// quantised product on odd and wide batches (1 to 9, 17, 64 inputs, several parts, one and
/// two threads) gives bitwise the one-input product per input.
#[test]
fn quantised_multi_token_dots_equal_one_token_bitwise() {
    let mut rng = Rng(43);
    for (case, t) in [1usize, 2, 3, 4, 5, 6, 7, 8, 9, 17, 64].into_iter().cycle().take(33).enumerate() {
        let dtype = QTYPES[case % 3];
        let cols = QK * (1 + rng.below(70));
        let rows = 1 + rng.below(24);
        let m = QMatrix::new(&mut rng, dtype, rows, cols);
        let view = m.view();
        let x: Vec<f32> = (0..t * cols).map(|_| rng.f()).collect();
        let qx = QActs::quantize(&x, t, cols);
        let rb = m.row_bytes();
        for r in 0..rows {
            let w = &m.bytes[r * rb..(r + 1) * rb];
            let mut out = vec![f32::NAN; t * 2];
            qdot::dot_tokens(dtype, w, &qx, t, &mut out, 2);
            for i in 0..t {
                let want = qdot::dot(dtype, w, qx.token(i));
                assert_eq!(out[i * 2].to_bits(), want.to_bits(), "{dtype} t={t} row {r} token {i}");
            }
        }
        for threads in [1, 2] {
            let mut batched = vec![0.0; t * rows];
            matmul(&x, t, &view, &mut batched, threads);
            for i in 0..t {
                let mut single = vec![0.0; rows];
                matmul(&x[i * cols..(i + 1) * cols], 1, &view, &mut single, 1);
                Tolerance::EXACT
                    .check(&batched[i * rows..(i + 1) * rows], &single)
                    .unwrap_or_else(|e| panic!("{dtype} t={t} th={threads} input {i}: {e}"));
            }
        }
    }
}

/// On x86-64: the AVX-VNNI and the AVX2 kernels give the same bits (the same integer lanes,
/// then the same f32 operations), and [`qdot::x86::dot_rows`] gives bitwise [`qdot::dot`] per
/// row; without AVX-VNNI both sides are the AVX2 kernel.
#[cfg(target_arch = "x86_64")]
#[test]
fn x86_kernels_agree_bitwise_with_and_without_vnni_and_across_rows() {
    if !qdot::x86::available() {
        return;
    }
    let mut rng = Rng(71);
    const R: usize = qdot::x86::ROWS;
    for dtype in QTYPES {
        for nb in [1usize, 2, 3, 7, 64, 65, 259] {
            let rows: Vec<Vec<u8>> = (0..R).map(|_| encode(dtype, &rng.blocks(nb))).collect();
            let x = rng.blocks(nb);
            let qx = QActs::quantize(&x, 1, nb * QK);
            let xa = qx.token(0);
            let got = qdot::x86::dot_rows(dtype, std::array::from_fn(|j| &rows[j][..]), xa);
            for (j, row) in rows.iter().enumerate() {
                let one = qdot::dot(dtype, row, xa);
                assert_eq!(got[j].to_bits(), one.to_bits(), "{dtype} {nb} blocks row {j}");
                assert_eq!(qdot::x86::dot_avx2(dtype, row, xa).to_bits(), one.to_bits(), "{dtype} {nb} blocks: vnni");
            }
        }
    }
}

/// On x86-64: the AVX2 and AVX-512 one-token down-projection kernels (rows decoded in
/// registers) give bitwise the portable one, for one, four and eight rows, on blocks of every
/// magnitude.
#[cfg(target_arch = "x86_64")]
#[test]
fn x86_quantised_axpy_rows_equal_the_portable_kernel_bitwise() {
    if !qdot::x86::available() {
        return;
    }
    let mut rng = Rng(72);
    fn check<const R: usize>(rng: &mut Rng, dtype: DType, nb: usize) {
        let rows: Vec<u8> = (0..R).flat_map(|_| encode(dtype, &rng.blocks(nb))).collect();
        let a: [f32; R] = std::array::from_fn(|_| rng.f() * 3.0);
        let y0: Vec<f32> = (0..nb * QK).map(|_| rng.f()).collect();
        let mut fast = y0.clone();
        assert!(qdot::x86::axpy_rows_with::<R>(false, dtype, &mut fast, a, &rows));
        // The AVX-512 kernel where the CPU has it (the AVX2 one again otherwise).
        let mut wide = y0.clone();
        assert!(qdot::x86::axpy_rows_with::<R>(true, dtype, &mut wide, a, &rows));
        for (i, (f, w)) in fast.iter().zip(&wide).enumerate() {
            assert_eq!(f.to_bits(), w.to_bits(), "{dtype} {R} rows {nb} blocks, element {i}: AVX-512");
        }
        let mut portable = y0;
        qdot::axpy_rows_portable::<R>(dtype, &mut portable, a, &rows, dtype.block_bytes());
        for (i, (f, p)) in fast.iter().zip(&portable).enumerate() {
            assert_eq!(f.to_bits(), p.to_bits(), "{dtype} {R} rows {nb} blocks, element {i}");
        }
    }
    for dtype in QTYPES {
        for nb in [1usize, 2, 3, 7, 64, 65] {
            check::<1>(&mut rng, dtype, nb);
            check::<4>(&mut rng, dtype, nb);
            check::<8>(&mut rng, dtype, nb);
        }
        // Too few bytes for the rows: refused, nothing written.
        let mut y = vec![1.0f32; 64];
        assert!(!qdot::x86::axpy_rows::<4>(dtype, &mut y, [1.0; 4], &[0u8; 10]));
        assert!(y.iter().all(|&v| v == 1.0));
    }
}

/// On x86-64: the AVX-512 dot-product kernel (two blocks per vector) gives bitwise the AVX2
/// one for every row-by-token shape the products use, odd and even block counts (where the
/// CPU lacks AVX-512 both sides are the AVX2 kernel).
#[cfg(target_arch = "x86_64")]
#[test]
fn x86_avx512_dots_equal_the_avx2_ones_bitwise() {
    if !qdot::x86::available() {
        return;
    }
    fn check<const R: usize, const T: usize>(rng: &mut Rng, dtype: DType, nb: usize) {
        let rows: Vec<Vec<u8>> = (0..R).map(|_| encode(dtype, &rng.blocks(nb))).collect();
        let xs = rng.blocks(nb * T);
        let qx = QActs::quantize(&xs, T, nb * QK);
        let w: [&[u8]; R] = std::array::from_fn(|j| &rows[j][..]);
        let x: [qdot::QAct<'_>; T] = std::array::from_fn(|k| qx.token(k));
        let narrow = qdot::x86::dot_block_with::<R, T>(false, false, dtype, w, x);
        for vnni in [false, true] {
            let wide = qdot::x86::dot_block_with::<R, T>(vnni, true, dtype, w, x);
            for r in 0..R {
                for k in 0..T {
                    assert_eq!(
                        wide[r][k].to_bits(),
                        narrow[r][k].to_bits(),
                        "{dtype} {nb} blocks, {R}x{T}, row {r} token {k}: {} against {}",
                        wide[r][k],
                        narrow[r][k]
                    );
                }
            }
        }
    }
    let mut rng = Rng(73);
    for dtype in QTYPES {
        for nb in [1usize, 2, 3, 7, 64, 65] {
            check::<1, 1>(&mut rng, dtype, nb);
            check::<4, 1>(&mut rng, dtype, nb);
            check::<1, 4>(&mut rng, dtype, nb);
            check::<2, 4>(&mut rng, dtype, nb);
            check::<1, 2>(&mut rng, dtype, nb);
        }
    }
}

/// The register-tiled down projection of a prefill batch (x86-64 with AVX-512, from
/// `TILED_MIN_T` inputs) is bitwise the one-input path, for every block type, f16 and f32 rows,
/// several parts, groups cut short (rows not multiples of 256), tiles cut short (inputs not
/// multiples of 8), one and three threads; and the f32 product on the decoded weights.
#[test]
fn tiled_down_projection_is_bitwise_the_one_input_path() {
    #[cfg(target_arch = "x86_64")]
    const {
        assert!(super::matmul::TILED_MIN_T <= 9)
    };
    let mut rng = Rng(17);
    for (case, &(rows, cols, t)) in
        [(1usize, 32usize, 9usize), (255, 96, 16), (256, 64, 23), (300, 160, 64), (700, 1024, 12), (40, 32, 17)]
            .iter()
            .enumerate()
    {
        let h: Vec<f32> = (0..t * rows).map(|_| rng.f()).collect();
        let one_by_one = |m: &Matrix<'_>| -> Vec<f32> {
            let mut want = vec![0.0; t * cols];
            for (i, w) in want.chunks_exact_mut(cols).enumerate() {
                matmul_down(&h[i * rows..(i + 1) * rows], 1, m, w, 1);
            }
            want
        };
        for dtype in QTYPES {
            let m = QMatrix::new(&mut rng, dtype, rows, cols);
            let want = one_by_one(&m.view());
            for threads in [1, 3] {
                let mut got = vec![f32::NAN; t * cols];
                matmul_down(&h, t, &m.view(), &mut got, threads);
                Tolerance::EXACT.check(&want, &got).unwrap_or_else(|e| panic!("{dtype} case {case} th {threads}: {e}"));
                let mut f = vec![f32::NAN; t * cols];
                matmul_down(&h, t, &m.f32_view(), &mut f, threads);
                Tolerance::EXACT.check(&want, &f).unwrap_or_else(|e| panic!("{dtype} f32 case {case}: {e}"));
            }
        }
        let m = super::tests::TestMatrix::new(&mut rng, rows, cols, true);
        let want = one_by_one(&m.view(true));
        let mut got = vec![f32::NAN; t * cols];
        matmul_down(&h, t, &m.view(true), &mut got, 2);
        Tolerance::EXACT.check(&want, &got).unwrap_or_else(|e| panic!("f16 case {case}: {e}"));
    }
}

/// The few-input quantised down projection (2 to 8 inputs, a speculative verify pass; on
/// AVX-512 every row's block decoded once for all the inputs) is bitwise the one-input path, for
/// every block type, random parts, groups cut short, one and three threads; and the f32 product on
/// the decoded weights.
#[test]
fn few_input_quantised_down_projection_is_bitwise_the_one_input_path() {
    let mut rng = Rng(18);
    for (case, &(rows, cols)) in
        [(1usize, 32usize), (255, 96), (256, 64), (300, 160), (700, 1024), (513, 32)].iter().enumerate()
    {
        for t in 2..=8 {
            let h: Vec<f32> = (0..t * rows).map(|_| rng.f()).collect();
            for dtype in QTYPES {
                let m = QMatrix::new(&mut rng, dtype, rows, cols);
                let mut want = vec![0.0; t * cols];
                for (i, w) in want.chunks_exact_mut(cols).enumerate() {
                    matmul_down(&h[i * rows..(i + 1) * rows], 1, &m.view(), w, 1);
                }
                for threads in [1, 3] {
                    let mut got = vec![f32::NAN; t * cols];
                    matmul_down(&h, t, &m.view(), &mut got, threads);
                    Tolerance::EXACT
                        .check(&want, &got)
                        .unwrap_or_else(|e| panic!("{dtype} case {case} t {t} th {threads}: {e}"));
                }
                let mut f = vec![f32::NAN; t * cols];
                matmul_down(&h, t, &m.f32_view(), &mut f, 2);
                Tolerance::EXACT.check(&want, &f).unwrap_or_else(|e| panic!("{dtype} f32 case {case} t {t}: {e}"));
            }
        }
    }
}

/// On x86-64 with AVX-512 VNNI (sixteen tokens per vector) or AVX2 (eight): the token-lane
/// kernel of a prefill batch ([`super::qlanes`]) gives bitwise the one-token [`qdot::dot`] for
/// every (row, token), every block type, odd and even block counts (one block up), whole and
/// partial chunks (a last chunk of 10 to 15 of 16, or 5 to 7 of 8), one and several chunks per
/// call; and the batched product through it gives bitwise the one-input product. Without the
/// features there is nothing to compare.
#[cfg(target_arch = "x86_64")]
#[test]
fn x86_token_lane_dots_equal_one_token_bitwise() {
    use super::qlanes;
    if !qlanes::available() {
        return;
    }
    let mut rng = Rng(71);
    let sizes = [16usize, 10, 13, 15, 26, 31, 32, 33, 47, 48, 64, 75, 5, 7, 8, 21, 40];
    for (case, t) in sizes.into_iter().cycle().take(51).enumerate() {
        let dtype = QTYPES[case % 3];
        let cols = QK * (1 + rng.below(if case % 4 == 0 { 3 } else { 70 }));
        let rows = 1 + rng.below(12);
        let m = QMatrix::new(&mut rng, dtype, rows, cols);
        // Mixed-magnitude activations, some blocks zero.
        let x = rng.blocks(t * cols / QK);
        let qx = QActs::quantize(&x, t, cols);
        let n = qlanes::tokens_for(t);
        if n == 0 {
            // Fewer than MIN_REST tokens on AVX-512: all row-by-token.
            assert!(qlanes::width() == qlanes::LANES_T && t < qlanes::MIN_REST && qx.lanes().is_none());
            continue;
        }
        assert!(n <= t, "t={t}: {n} lane tokens");
        let lanes = qx.lanes().expect("lanes for a batch of a chunk or more");
        assert_eq!(lanes.tokens(), n);
        let rb = m.row_bytes();
        // AVX2 leaves q8_0 batches under MIN_Q8_TOKENS2 to the row-by-token kernels.
        let runs = qlanes::applies(dtype, rb, lanes);
        assert!(runs || (lanes.width() == qlanes::LANES_T2 && dtype == DType::Q8_0 && n < qlanes::MIN_Q8_TOKENS2));
        for r in (0..rows).filter(|_| runs) {
            let w = &m.bytes[r * rb..(r + 1) * rb];
            let mut got = vec![None; t];
            let all = 0..lanes.chunks();
            assert!(qlanes::dot_lanes(dtype, w, lanes, all, |i, v| got[i] = Some(v)));
            for (i, g) in got.iter().enumerate() {
                if i >= n {
                    assert!(g.is_none(), "{dtype} t={t}: token {i} is past the lanes");
                    continue;
                }
                let want = qdot::dot(dtype, w, qx.token(i));
                let g = g.unwrap_or_else(|| panic!("{dtype} t={t} row {r}: token {i} missing"));
                assert_eq!(g.to_bits(), want.to_bits(), "{dtype} t={t} cols={cols} row {r} token {i}: {g} vs {want}");
            }
        }
        let view = m.view();
        let mut batched = vec![0.0; t * rows];
        matmul(&x, t, &view, &mut batched, 2);
        for i in 0..t {
            let mut single = vec![0.0; rows];
            matmul(&x[i * cols..(i + 1) * cols], 1, &view, &mut single, 1);
            Tolerance::EXACT
                .check(&batched[i * rows..(i + 1) * rows], &single)
                .unwrap_or_else(|e| panic!("{dtype} t={t} input {i}: {e}"));
        }
    }
}

/// Micro-benchmark: quantising a 64-token batch of 2048-wide activations (with the token-lane
/// layout where it is built).
#[test]
#[ignore = "benchmark"]
fn activation_quantisation_speed() {
    let x: Vec<f32> = (0..64 * 2048).map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5).collect();
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let q = QActs::quantize(&x, 64, 2048);
        let a = t0.elapsed();
        std::hint::black_box(&q);
        eprintln!("quantize 64 x 2048: {a:?}");
    }
}

/// The activation rounding is `f32::round` on every value a block can produce (and on the
/// special values): a sample of every 61st f32 of magnitude up to 2^24, halves, and both zeros.
#[test]
fn activation_rounding_is_round_half_away_from_zero() {
    let check = |v: f32| {
        let (want, got) = (v.round(), qdot::round_half_away(v));
        assert!(want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()), "{v:e}: {got} vs {want}");
    };
    let top = 24.0f32.exp2().to_bits();
    for bits in (0..=top).step_by(61) {
        check(f32::from_bits(bits));
        check(-f32::from_bits(bits));
    }
    for k in -300..300 {
        check(k as f32 + 0.5);
        check(f32::from_bits((k as f32 + 0.5).to_bits() + 1));
        check(f32::from_bits((k as f32 + 0.5).to_bits().wrapping_sub(1)));
    }
    for v in [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, f32::MIN_POSITIVE, 1e30] {
        check(v);
    }
}

/// On x86-64 with AVX-512: the vector quantisation of an activation block is bitwise the
/// scalar one (scale, values, sums), on mixed magnitudes, halves, NaN, infinities, subnormal
/// and zero blocks.
#[cfg(target_arch = "x86_64")]
#[test]
fn x86_activation_quantisation_is_the_scalar_one() {
    if !qdot::x86::has_avx512() {
        return;
    }
    let mut rng = Rng(5);
    let mut blocks = vec![vec![0.0f32; QK], vec![-0.0f32; QK], vec![1e-40f32; QK]];
    for _ in 0..400 {
        blocks.push(rng.blocks(1));
    }
    let halves: Vec<f32> = (0..QK).map(|i| (i as f32 - 16.0) * 127.0 / 32.0 + 0.5).collect();
    blocks.push(halves);
    for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-39, f32::MAX] {
        let mut b = rng.blocks(1);
        b[7] = special;
        blocks.push(b);
    }
    for b in &blocks {
        let mut q = [0i8; QK];
        // The scalar loop's own result: a CPU without AVX-512 runs it for every block.
        let want = qdot::quantize_scalar(b);
        // SAFETY: `has_avx512` checked above; both hold 32 values.
        match unsafe { qdot::x86::quantize_block512(b, &mut q) } {
            Some((d, sum)) => {
                assert_eq!((d.to_bits(), sum, q), (want.0.to_bits(), want.1, want.2), "{b:?}");
            }
            None => assert!(b.iter().any(|v| v.is_infinite()) || want.0 < 1e-37, "fell back on {b:?}"),
        }
    }
}
