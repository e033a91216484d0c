//! Dot products of block-quantised weight rows (`q8_0`, `q4_0`, `q4_1`) with activations
//! quantised to 8 bits per 32-element block, in integer arithmetic.
//!
//! The activation `x` of a product is quantised once per call ([`QActs::quantize`]): per block
//! of 32, `d = max|x| / 127`, `q = round(x / d)` in `-127..=127`, and `s = d * sum(q)`. A weight
//! block `(dw, qw)` then contributes `dw * d * sum(qw * q)` (an exact integer sum), plus
//! `mw * s` for `q4_1`'s minimum. Blocks are added in increasing order into a fixed set of f32
//! lanes, so every (row, token) product is the same sequence of operations whether it comes from
//! a one-token decode or a prefill batch, and whatever the thread count.
//!
//! Kernels: [`dot_scalar`] is the reference; [`dot`] dispatches to AVX2 on x86-64 (run-time
//! detected; `maddubs` on sign-adjusted bytes, as the workspace's `x86-64-v3` builds always
//! have it) and to NEON on aarch64 (`sdot` when the CPU has the dot-product extension, detected at
//! run time, `smull`/`sadalp` otherwise). The SIMD code is behind safe wrappers that check every
//! length; the property tests in `tests.rs` compare each with the reference on odd and wide
//! shapes.

use crate::format::{DType, QK};
use crate::quant::f16_at;

/// Activations quantised to 8 bits, `t` tokens of `cols` elements (`cols` a multiple of 32).
#[derive(Clone, Debug, Default)]
pub(crate) struct QActs {
    cols: usize,
    /// Scale per block, `[t, cols / 32]`.
    d: Vec<f32>,
    /// `d * sum(q)` per block, `[t, cols / 32]`.
    s: Vec<f32>,
    /// Quantised values, `[t, cols]`.
    q: Vec<i8>,
}

/// One token's quantised activation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QAct<'a> {
    pub(crate) d: &'a [f32],
    pub(crate) s: &'a [f32],
    pub(crate) q: &'a [i8],
}

impl QActs {
    /// Quantises `x` (`[t, cols]`; a trailing partial block of a row is ignored, which never
    /// happens for the block-aligned rows of a quantised matrix).
    pub(crate) fn quantize(x: &[f32], t: usize, cols: usize) -> QActs {
        let nb = cols / QK;
        let mut a = QActs { cols, d: vec![0.0; t * nb], s: vec![0.0; t * nb], q: vec![0; t * nb * QK] };
        for i in 0..t {
            let Some(row) = x.get(i * cols..(i + 1) * cols) else { break };
            for b in 0..nb {
                let xb = &row[b * QK..(b + 1) * QK];
                let qb = &mut a.q[(i * nb + b) * QK..(i * nb + b + 1) * QK];
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let mut sum = 0i32;
                for (qv, &xv) in qb.iter_mut().zip(xb) {
                    // Within -127..=127 for finite x; `as` saturates and maps NaN to 0.
                    *qv = (xv * id).round() as i8;
                    sum += i32::from(*qv);
                }
                a.d[i * nb + b] = d;
                a.s[i * nb + b] = d * sum as f32;
            }
        }
        a
    }

    /// Token `i`.
    pub(crate) fn token(&self, i: usize) -> QAct<'_> {
        let nb = self.cols / QK;
        QAct {
            d: self.d.get(i * nb..(i + 1) * nb).unwrap_or(&[]),
            s: self.s.get(i * nb..(i + 1) * nb).unwrap_or(&[]),
            q: self.q.get(i * nb * QK..(i + 1) * nb * QK).unwrap_or(&[]),
        }
    }
}

/// Blocks both operands hold completely.
fn n_blocks(dtype: DType, w: &[u8], x: &QAct<'_>) -> usize {
    (w.len() / dtype.block_bytes()).min(x.d.len()).min(x.s.len()).min(x.q.len() / QK)
}

/// The reference: `sum_b (dw_b * d_b) * sum_i qw_i q_i (+ mw_b * s_b)` over the blocks both
/// hold, blocks added in order into one f32. Unquantised dtypes give 0 (never called with them).
pub(crate) fn dot_scalar(dtype: DType, w: &[u8], x: QAct<'_>) -> f32 {
    let nb = n_blocks(dtype, w, &x);
    let bb = dtype.block_bytes();
    let mut acc = 0.0f32;
    for b in 0..nb {
        let blk = &w[b * bb..(b + 1) * bb];
        let q = &x.q[b * QK..(b + 1) * QK];
        let dw = f16_at(blk, 0);
        let (isum, min_term) = match dtype {
            DType::Q8_0 => (blk[2..].iter().zip(q).map(|(&a, &c)| i32::from(a as i8) * i32::from(c)).sum(), 0.0),
            DType::Q4_0 => (nibble_dot(&blk[2..], q, 8), 0.0),
            DType::Q4_1 => (nibble_dot(&blk[4..], q, 0), f16_at(blk, 2) * x.s[b]),
            DType::F32 | DType::F16 => return 0.0,
        };
        acc += dw * x.d[b] * isum as f32 + min_term;
    }
    acc
}

/// `sum_j (lo_j - off) q_j + (hi_j - off) q_{j+16}` for 16 bytes of nibbles.
fn nibble_dot(nib: &[u8], q: &[i8], off: i32) -> i32 {
    let (q_lo, q_hi) = q.split_at(QK / 2);
    nib.iter()
        .zip(q_lo.iter().zip(q_hi))
        .map(|(&n, (&a, &b))| (i32::from(n & 0x0f) - off) * i32::from(a) + (i32::from(n >> 4) - off) * i32::from(b))
        .sum()
}

/// The dot product of a quantised weight row with a quantised activation, with the fastest
/// kernel this CPU runs (the same kernel for every call in a process).
#[inline]
pub(crate) fn dot(dtype: DType, w: &[u8], x: QAct<'_>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() {
            return x86::dot(dtype, w, x);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return arm::dot(dtype, w, x, arm::has_dotprod());
    }
    #[allow(unreachable_code)]
    dot_scalar(dtype, w, x)
}

/// `out[i * ld] = dot(dtype, w, x.token(i))` for the `t` tokens of `x`: bitwise [`dot`] per
/// token. On x86-64 with AVX2 the row's blocks are loaded and their scales widened once for
/// up to four tokens at a time (the row stays in L1 between the groups); elsewhere one [`dot`]
/// per token.
pub(crate) fn dot_tokens(dtype: DType, w: &[u8], x: &QActs, t: usize, out: &mut [f32], ld: usize) {
    let done = dot_tokens_simd(dtype, w, x, t, out, ld);
    for i in done..t {
        out[i * ld] = dot(dtype, w, x.token(i));
    }
}

/// The first tokens of [`dot_tokens`] in groups of four, then two, with the AVX2 multi-token
/// kernels; returns how many it did (0 without AVX2).
#[cfg(target_arch = "x86_64")]
fn dot_tokens_simd(dtype: DType, w: &[u8], x: &QActs, t: usize, out: &mut [f32], ld: usize) -> usize {
    if !x86::available() {
        return 0;
    }
    let mut i = 0;
    while i + 4 <= t {
        let r = x86::dot_many::<4>(dtype, w, std::array::from_fn(|q| x.token(i + q)));
        for (q, v) in r.into_iter().enumerate() {
            out[(i + q) * ld] = v;
        }
        i += 4;
    }
    if t - i >= 2 {
        let r = x86::dot_many::<2>(dtype, w, std::array::from_fn(|q| x.token(i + q)));
        for (q, v) in r.into_iter().enumerate() {
            out[(i + q) * ld] = v;
        }
        i += 2;
    }
    i
}

/// No multi-token kernel on this architecture: [`dot_tokens`] takes one [`dot`] per token.
#[cfg(not(target_arch = "x86_64"))]
fn dot_tokens_simd(_dtype: DType, _w: &[u8], _x: &QActs, _t: usize, _out: &mut [f32], _ld: usize) -> usize {
    0
}

/// Which kernel [`dot`] uses on this CPU (for `bench` and `devices`).
pub(crate) fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() {
            return "avx2";
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return if arm::has_dotprod() { "neon-sdot" } else { "neon" };
    }
    #[allow(unreachable_code)]
    "scalar"
}

/// Decodes one block of type `D` (a [`DType::code`]) into `w`, with exactly the operations
/// of [`crate::quant::decode_blocks`] (so the values are bitwise the same).
#[inline(always)]
fn decode_block<const D: u8>(blk: &[u8], w: &mut [f32; QK]) {
    let d = f16_at(blk, 0);
    if D == 2 {
        for (v, &q) in w.iter_mut().zip(&blk[2..2 + QK]) {
            *v = d * f32::from(q as i8);
        }
    } else if D == 3 {
        let (lo, hi) = w.split_at_mut(QK / 2);
        for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&blk[2..2 + QK / 2]) {
            *l = d * f32::from(i16::from(q & 0x0f) - 8);
            *h = d * f32::from(i16::from(q >> 4) - 8);
        }
    } else {
        let m = f16_at(blk, 2);
        let (lo, hi) = w.split_at_mut(QK / 2);
        for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&blk[4..4 + QK / 2]) {
            *l = d * f32::from(q & 0x0f) + m;
            *h = d * f32::from(q >> 4) + m;
        }
    }
}

/// `y = (...((y + a[0] w[0]) + a[1] w[1]) ...) + a[R-1] w[R-1]` elementwise for `R` quantised
/// rows (`rows`: `R` rows of `y.len() / 32` blocks each, one after the other), decoding each
/// block in registers: bitwise `R` [`axpy`](super::dot::axpy)s with the decoded rows, without
/// writing them to memory (the one-token down projection).
#[inline(never)]
fn axpy_rows_q<const R: usize, const D: u8>(y: &mut [f32], a: [f32; R], rows: &[u8], bb: usize) {
    let nb = y.len() / QK;
    let Some(rows) = rows.get(..R * nb * bb) else { return };
    for (b, yc) in y.chunks_exact_mut(QK).enumerate() {
        let Ok(yc) = <&mut [f32; QK]>::try_from(yc) else { continue };
        let mut v = *yc;
        for (r, &ar) in a.iter().enumerate() {
            let at = (r * nb + b) * bb;
            let mut w = [0.0f32; QK];
            decode_block::<D>(&rows[at..at + bb], &mut w);
            for i in 0..QK {
                v[i] = super::dot::madd(v[i], ar, w[i]);
            }
        }
        *yc = v;
    }
}

/// `y += sum_r a[r] * W[r]` over the rows of `rows` (whole quantised rows of `y.len()`
/// elements, `a.len()` of them), rows in increasing order: eight rows per pass over `y`, then
/// four, then one. Bitwise the f32 down projection over the decoded rows.
pub(crate) fn axpy_quant_rows(dtype: DType, y: &mut [f32], a: &[f32], rows: &[u8]) {
    let bb = dtype.block_bytes();
    let rb = y.len() / QK * bb;
    let mut j = 0;
    while j < a.len() {
        let step = match a.len() - j {
            n if n >= 8 => 8,
            n if n >= 4 => 4,
            _ => 1,
        };
        let (Some(w), Some(aj)) = (rows.get(j * rb..(j + step) * rb), a.get(j..j + step)) else { return };
        macro_rules! go {
            ($r:literal) => {{
                let mut arr = [0.0f32; $r];
                arr.copy_from_slice(aj);
                match dtype {
                    DType::Q8_0 => axpy_rows_q::<$r, 2>(y, arr, w, bb),
                    DType::Q4_0 => axpy_rows_q::<$r, 3>(y, arr, w, bb),
                    DType::Q4_1 => axpy_rows_q::<$r, 5>(y, arr, w, bb),
                    DType::F32 | DType::F16 => {}
                }
            }};
        }
        match step {
            8 => go!(8),
            4 => go!(4),
            _ => go!(1),
        }
        j += step;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! AVX2 + FMA kernels. Each weight block's values are widened to 32 signed bytes; the
    //! product with the activation's 32 bytes is `maddubs(|w|, sign(q, w))` (unsigned times
    //! signed, pairs summed to i16: at most 2 * 128 * 127, no saturation since `q` is never
    //! -128), then `madd` with ones to eight i32, converted to f32 and multiplied into eight f32
    //! accumulators by the block's combined scale.

    use std::arch::x86_64::*;

    use super::{n_blocks, QAct};
    use crate::format::{DType, QK};
    use crate::quant::f16_at;

    /// Whether this CPU runs the AVX2 kernels (always true in `x86-64-v3` builds, where the
    /// check is resolved at compile time).
    #[inline]
    pub(crate) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    /// The AVX2 dot product; [`super::dot_scalar`] up to the f32 summation order. Falls back
    /// to the scalar kernel on a CPU without AVX2 and FMA.
    pub(crate) fn dot(dtype: DType, w: &[u8], x: QAct<'_>) -> f32 {
        if !available() {
            return super::dot_scalar(dtype, w, x);
        }
        let nb = n_blocks(dtype, w, &x);
        let bb = dtype.block_bytes();
        let (w, d, s, q) = (&w[..nb * bb], &x.d[..nb], &x.s[..nb], &x.q[..nb * QK]);
        match dtype {
            // SAFETY: AVX2 and FMA are available (checked above); the kernels read only
            // through the slices they are given, whose lengths hold `nb` whole blocks.
            DType::Q8_0 => unsafe { dot_q8_0(w, d, q) },
            // SAFETY: as above.
            DType::Q4_0 => unsafe { dot_q4::<false>(w, d, s, q) },
            // SAFETY: as above.
            DType::Q4_1 => unsafe { dot_q4::<true>(w, d, s, q) },
            DType::F32 | DType::F16 => 0.0,
        }
    }

    /// [`dot`] for `T` tokens at once (bitwise [`dot`] per token): each weight block is loaded
    /// (and its nibbles unpacked) once, its scale widened once, then multiplied with the `T`
    /// tokens' blocks into their own even/odd accumulators. Falls back to [`dot`] per token on
    /// a CPU without AVX2 and FMA.
    pub(crate) fn dot_many<const T: usize>(dtype: DType, w: &[u8], x: [QAct<'_>; T]) -> [f32; T] {
        if !available() {
            return x.map(|x| super::dot_scalar(dtype, w, x));
        }
        let nb = x.iter().fold(usize::MAX, |m, x| m.min(n_blocks(dtype, w, x)));
        let bb = dtype.block_bytes();
        let w = &w[..nb * bb];
        let d = x.map(|x| &x.d[..nb]);
        let s = x.map(|x| &x.s[..nb]);
        let q = x.map(|x| &x.q[..nb * QK]);
        match dtype {
            // SAFETY: AVX2 and FMA are available (checked above); the kernels read only
            // through the slices they are given, each holding `nb` whole blocks.
            DType::Q8_0 => unsafe { dot_q8_0_many::<T>(w, d, q) },
            // SAFETY: as above.
            DType::Q4_0 => unsafe { dot_q4_many::<T, false>(w, d, s, q) },
            // SAFETY: as above.
            DType::Q4_1 => unsafe { dot_q4_many::<T, true>(w, d, s, q) },
            DType::F32 | DType::F16 => [0.0; T],
        }
    }

    /// [`dot_q8_0`] for `T` tokens: the same operations per token, in the same order.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q8_0_many<const T: usize>(w: &[u8], d: [&[f32]; T], q: [&[i8]; T]) -> [f32; T] {
        const BB: usize = 2 + QK;
        let q: [&[u8]; T] = q.map(bytemuck::cast_slice);
        let nb = w.len() / BB;
        // SAFETY: AVX2/FMA guaranteed by the caller; every load goes through `load32` on a
        // 32-byte sub-slice of a block or of a token's values (`nb` blocks each).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; T];
            for b in 0..nb {
                let blk = &w[b * BB..(b + 1) * BB];
                let wv = load32(&blk[2..BB]);
                let aw = _mm256_sign_epi8(wv, wv);
                let dw = f16_at(blk, 0);
                for k in 0..T {
                    let qv = load32(&q[k][b * QK..(b + 1) * QK]);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(qv, wv)), _mm256_set1_epi16(1));
                    let a = &mut acc[k][b & 1];
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(dw * d[k][b]), _mm256_cvtepi32_ps(p), *a);
                }
            }
            let mut out = [0.0f32; T];
            for (o, a) in out.iter_mut().zip(&acc) {
                *o = hsum(_mm256_add_ps(a[0], a[1]));
            }
            out
        }
    }

    /// [`dot_q4`] for `T` tokens: the same operations per token, in the same order.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q4_many<const T: usize, const MIN: bool>(
        w: &[u8],
        d: [&[f32]; T],
        s: [&[f32]; T],
        q: [&[i8]; T],
    ) -> [f32; T] {
        let bb = if MIN { 4 + QK / 2 } else { 2 + QK / 2 };
        let q: [&[u8]; T] = q.map(bytemuck::cast_slice);
        let nb = w.len() / bb;
        // SAFETY: AVX2/FMA guaranteed by the caller; loads go through `load32` and
        // `unpack_nibbles` on sub-slices of exactly their length.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; T];
            let mut min = [[0.0f32; 2]; T];
            let eight = _mm256_set1_epi8(8);
            let ones = _mm256_set1_epi16(1);
            for b in 0..nb {
                let blk = &w[b * bb..(b + 1) * bb];
                let nib = unpack_nibbles(&blk[bb - QK / 2..bb]);
                let (wv, aw) = if MIN {
                    (nib, nib)
                } else {
                    let v = _mm256_sub_epi8(nib, eight);
                    (v, _mm256_sign_epi8(v, v))
                };
                let dw = f16_at(blk, 0);
                let mw = if MIN { f16_at(blk, 2) } else { 0.0 };
                for k in 0..T {
                    let qv = load32(&q[k][b * QK..(b + 1) * QK]);
                    let p = if MIN {
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wv, qv), ones)
                    } else {
                        _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(qv, wv)), ones)
                    };
                    let a = &mut acc[k][b & 1];
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(dw * d[k][b]), _mm256_cvtepi32_ps(p), *a);
                    if MIN {
                        min[k][b & 1] += mw * s[k][b];
                    }
                }
            }
            let mut out = [0.0f32; T];
            for ((o, a), m) in out.iter_mut().zip(&acc).zip(&min) {
                *o = hsum(_mm256_add_ps(a[0], a[1])) + (m[0] + m[1]);
            }
            out
        }
    }

    /// Sum of the eight lanes, in a fixed order.
    #[target_feature(enable = "avx2,fma")]
    #[allow(unused_unsafe)] // register-only intrinsics are safe here from Rust 1.87 on
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: register-only intrinsics; the caller guarantees AVX2.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// Eight i32 partial sums of `w * q` over 32 signed bytes each.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(unused_unsafe)] // register-only intrinsics are safe here from Rust 1.87 on
    unsafe fn mul_sum_i8(w: __m256i, q: __m256i) -> __m256i {
        // SAFETY: register-only intrinsics; the caller guarantees AVX2.
        unsafe {
            let aw = _mm256_sign_epi8(w, w);
            let sq = _mm256_sign_epi8(q, w);
            _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sq), _mm256_set1_epi16(1))
        }
    }

    /// 32 bytes of `b` (exactly 32 long) as a vector.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load32(b: &[u8]) -> __m256i {
        debug_assert_eq!(b.len(), 32);
        // SAFETY: the caller passes a 32-byte slice; `loadu` has no alignment requirement.
        unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
    }

    /// 16 bytes of nibbles (exactly 16 long) widened to 32 bytes: the low nibbles (elements
    /// 0..16) in the low half, the high nibbles (16..32) in the high half.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn unpack_nibbles(b: &[u8]) -> __m256i {
        debug_assert_eq!(b.len(), 16);
        // SAFETY: the caller passes a 16-byte slice; `loadu` has no alignment requirement.
        unsafe {
            let raw = _mm_loadu_si128(b.as_ptr().cast());
            let m4 = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(raw, m4);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
            _mm256_set_m128i(hi, lo)
        }
    }

    /// `w` is `d.len()` blocks of 34 bytes, `q` 32 bytes per block. Two blocks per step into
    /// two accumulators (even and odd blocks), so consecutive blocks do not wait on each
    /// other's multiply-add.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q8_0(w: &[u8], d: &[f32], q: &[i8]) -> f32 {
        let q: &[u8] = bytemuck::cast_slice(q);
        const BB: usize = 2 + QK;
        // SAFETY: AVX2/FMA guaranteed by the caller; every load goes through `load32` on a
        // 32-byte sub-slice of the chunks.
        unsafe {
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let block = |blk: &[u8], qb: &[u8], dx: f32, acc: __m256| {
                let p = mul_sum_i8(load32(&blk[2..BB]), load32(qb));
                _mm256_fmadd_ps(_mm256_set1_ps(f16_at(blk, 0) * dx), _mm256_cvtepi32_ps(p), acc)
            };
            let (wp, qp, dp) = (w.chunks_exact(2 * BB), q.chunks_exact(2 * QK), d.chunks_exact(2));
            let (wr, qr, dr) = (wp.remainder(), qp.remainder(), dp.remainder());
            for ((w2, q2), d2) in wp.zip(qp).zip(dp) {
                acc0 = block(&w2[..BB], &q2[..QK], d2[0], acc0);
                acc1 = block(&w2[BB..], &q2[QK..], d2[1], acc1);
            }
            if let (Some(&dx), true, true) = (dr.first(), wr.len() == BB, qr.len() == QK) {
                acc0 = block(wr, qr, dx, acc0);
            }
            hsum(_mm256_add_ps(acc0, acc1))
        }
    }

    /// `q4_0` (`MIN == false`: 18-byte blocks, values `n - 8`) or `q4_1` (`MIN == true`:
    /// 20-byte blocks, values `n`, plus `m * s` per block). Two blocks per step, as in
    /// [`dot_q8_0`].
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q4<const MIN: bool>(w: &[u8], d: &[f32], s: &[f32], q: &[i8]) -> f32 {
        let q: &[u8] = bytemuck::cast_slice(q);
        let bb = if MIN { 4 + QK / 2 } else { 2 + QK / 2 };
        // SAFETY: AVX2/FMA guaranteed by the caller; loads go through `load32` and
        // `unpack_nibbles` on sub-slices of exactly their length.
        unsafe {
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let (mut min0, mut min1) = (0.0f32, 0.0f32);
            let eight = _mm256_set1_epi8(8);
            let ones = _mm256_set1_epi16(1);
            let block = |blk: &[u8], qb: &[u8], dx: f32, acc: __m256| {
                let nib = unpack_nibbles(&blk[bb - QK / 2..bb]);
                let qx = load32(qb);
                let p = if MIN {
                    _mm256_madd_epi16(_mm256_maddubs_epi16(nib, qx), ones)
                } else {
                    mul_sum_i8(_mm256_sub_epi8(nib, eight), qx)
                };
                _mm256_fmadd_ps(_mm256_set1_ps(f16_at(blk, 0) * dx), _mm256_cvtepi32_ps(p), acc)
            };
            let (wp, qp) = (w.chunks_exact(2 * bb), q.chunks_exact(2 * QK));
            let (dp, sp) = (d.chunks_exact(2), s.chunks_exact(2));
            let (wr, qr, dr, sr) = (wp.remainder(), qp.remainder(), dp.remainder(), sp.remainder());
            for (((w2, q2), d2), s2) in wp.zip(qp).zip(dp).zip(sp) {
                acc0 = block(&w2[..bb], &q2[..QK], d2[0], acc0);
                acc1 = block(&w2[bb..], &q2[QK..], d2[1], acc1);
                if MIN {
                    min0 += f16_at(w2, 2) * s2[0];
                    min1 += f16_at(w2, bb + 2) * s2[1];
                }
            }
            if let (Some(&dx), Some(&sx), true, true) = (dr.first(), sr.first(), wr.len() == bb, qr.len() == QK) {
                acc0 = block(wr, qr, dx, acc0);
                if MIN {
                    min0 += f16_at(wr, 2) * sx;
                }
            }
            hsum(_mm256_add_ps(acc0, acc1)) + (min0 + min1)
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod arm {
    //! NEON kernels. Each weight block is two 16-byte signed vectors (nibbles widened first);
    //! the integer products go through `sdot` (four i32 lanes, the dot-product extension,
    //! emitted with inline assembly as its intrinsic is not stable Rust) or, without the
    //! extension, `smull` + `sadalp`. Both give the same integer total per block (spread
    //! differently over the four lanes), so the two paths agree up to f32 rounding; a process
    //! always uses the same one.

    use std::arch::aarch64::*;
    use std::arch::asm;

    use super::{n_blocks, QAct};
    use crate::format::{DType, QK};
    use crate::quant::f16_at;

    /// Whether the CPU has the dot-product extension (`sdot`).
    #[inline]
    pub(crate) fn has_dotprod() -> bool {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }

    /// The NEON dot product with (`use_sdot`, only honoured when the CPU has it) or without
    /// `sdot`; [`super::dot_scalar`] up to the f32 summation order.
    pub(crate) fn dot(dtype: DType, w: &[u8], x: QAct<'_>, use_sdot: bool) -> f32 {
        let nb = n_blocks(dtype, w, &x);
        let bb = dtype.block_bytes();
        let (w, d, s, q) = (&w[..nb * bb], &x.d[..nb], &x.s[..nb], &x.q[..nb * QK]);
        if use_sdot && has_dotprod() {
            // SAFETY: the CPU has NEON (aarch64 baseline) and dotprod (checked); the kernel
            // reads only through slices of whole blocks.
            unsafe { dot_dotprod(dtype, w, d, s, q) }
        } else {
            // SAFETY: NEON is the aarch64 baseline; reads go through slices of whole blocks.
            unsafe { dot_neon(dtype, w, d, s, q) }
        }
    }

    /// `acc + sdot(a, b)`: four lanes, each the sum of four byte products.
    #[target_feature(enable = "neon,dotprod")]
    #[inline]
    unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: a register-only instruction of the dot-product extension, which the caller
        // guarantees.
        unsafe {
            asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.16b", inout(vreg) acc, in(vreg) a, in(vreg) b,
                options(pure, nomem, nostack));
        }
        acc
    }

    /// `acc + sum of byte products` without `sdot` (pairs of `smull` halves, `sadalp`).
    #[target_feature(enable = "neon")]
    #[inline]
    #[allow(unused_unsafe)] // register-only intrinsics are safe here from Rust 1.87 on
    unsafe fn smull_dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: register-only NEON intrinsics.
        unsafe {
            let acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
            vpadalq_s16(acc, vmull_high_s8(a, b))
        }
    }

    /// 16 bytes (exactly 16 long) as a signed vector.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn load16(b: &[u8]) -> int8x16_t {
        debug_assert_eq!(b.len(), 16);
        // SAFETY: the caller passes a 16-byte slice; `vld1q` has no alignment requirement.
        unsafe { vld1q_s8(b.as_ptr().cast()) }
    }

    /// The weight block's 32 values as two signed vectors (elements 0..16, 16..32).
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn weights(dtype: DType, blk: &[u8]) -> (int8x16_t, int8x16_t) {
        // SAFETY: loads through `load16` on 16-byte sub-slices of the block.
        unsafe {
            match dtype {
                DType::Q8_0 => (load16(&blk[2..18]), load16(&blk[18..34])),
                _ => {
                    let off = if dtype == DType::Q4_1 { 4 } else { 2 };
                    let raw = vreinterpretq_u8_s8(load16(&blk[off..off + 16]));
                    let lo = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0f)));
                    let hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
                    if dtype == DType::Q4_0 {
                        (vsubq_s8(lo, vdupq_n_s8(8)), vsubq_s8(hi, vdupq_n_s8(8)))
                    } else {
                        (lo, hi)
                    }
                }
            }
        }
    }

    macro_rules! kernel {
        ($name:ident, $features:literal, $dot:ident) => {
            #[target_feature(enable = $features)]
            unsafe fn $name(dtype: DType, w: &[u8], d: &[f32], s: &[f32], q: &[i8]) -> f32 {
                let q: &[u8] = bytemuck::cast_slice(q);
                let bb = dtype.block_bytes();
                // SAFETY: the caller guarantees the features; loads go through `load16`
                // and `weights` on sub-slices of whole blocks.
                unsafe {
                    let mut acc = [vdupq_n_f32(0.0); 2];
                    let mut min_sum = 0.0f32;
                    for (k, ((blk, qb), (&dx, &sx))) in
                        w.chunks_exact(bb).zip(q.chunks_exact(QK)).zip(d.iter().zip(s)).enumerate()
                    {
                        let (w0, w1) = weights(dtype, blk);
                        let p = $dot($dot(vdupq_n_s32(0), w0, load16(&qb[..16])), w1, load16(&qb[16..]));
                        let scale = vdupq_n_f32(f16_at(blk, 0) * dx);
                        acc[k & 1] = vfmaq_f32(acc[k & 1], scale, vcvtq_f32_s32(p));
                        if dtype == DType::Q4_1 {
                            min_sum += f16_at(blk, 2) * sx;
                        }
                    }
                    vaddvq_f32(vaddq_f32(acc[0], acc[1])) + min_sum
                }
            }
        };
    }

    kernel!(dot_dotprod, "neon,dotprod", sdot);
    kernel!(dot_neon, "neon", smull_dot);
}
