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
//! detected, as the workspace's `x86-64-v3` builds always have it; `vpdpbusd` where the CPU has
//! AVX-VNNI, bitwise the same results; see [`x86`]) and to NEON on aarch64 (`sdot` when the CPU has the dot-product extension, detected at
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
    /// `sum(q)` per block, `[t, cols / 32]`.
    qsum: Vec<i32>,
    /// Quantised values, `[t, cols]`.
    q: Vec<i8>,
    /// The first [`qlanes::tokens_for`]`(t)` tokens again, laid out for the token-lane kernel
    /// (AVX-512 VNNI only).
    #[cfg(target_arch = "x86_64")]
    lanes: Option<Box<super::qlanes::Lanes>>,
}

/// One token's quantised activation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QAct<'a> {
    pub(crate) d: &'a [f32],
    pub(crate) s: &'a [f32],
    pub(crate) qsum: &'a [i32],
    pub(crate) q: &'a [i8],
}

impl QActs {
    /// Quantises `x` (`[t, cols]`; a trailing partial block of a row is ignored, which never
    /// happens for the block-aligned rows of a quantised matrix).
    pub(crate) fn quantize(x: &[f32], t: usize, cols: usize) -> QActs {
        let nb = cols / QK;
        let mut a = QActs {
            cols,
            d: vec![0.0; t * nb],
            s: vec![0.0; t * nb],
            qsum: vec![0; t * nb],
            q: vec![0; t * nb * QK],
            #[cfg(target_arch = "x86_64")]
            lanes: None,
        };
        #[cfg(target_arch = "x86_64")]
        let wide = x86::has_avx512();
        for i in 0..t {
            let Some(row) = x.get(i * cols..(i + 1) * cols) else { break };
            for b in 0..nb {
                let xb = &row[b * QK..(b + 1) * QK];
                let qb = &mut a.q[(i * nb + b) * QK..(i * nb + b + 1) * QK];
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: `has_avx512` checked the features; `xb` and `qb` hold 32 values.
                    if let Some((d, sum)) = unsafe { x86::quantize_block512(xb, qb) } {
                        a.d[i * nb + b] = d;
                        a.s[i * nb + b] = d * sum as f32;
                        a.qsum[i * nb + b] = sum;
                        continue;
                    }
                }
                let (d, sum) = quantize_block(xb, qb);
                a.d[i * nb + b] = d;
                a.s[i * nb + b] = d * sum as f32;
                a.qsum[i * nb + b] = sum;
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            let n = super::qlanes::tokens_for(t);
            if n > 0 {
                a.lanes = Some(Box::new(super::qlanes::Lanes::build(&a, n, nb)));
            }
        }
        a
    }

    /// The tokens laid out for the token-lane kernel, when the batch has enough of them.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn lanes(&self) -> Option<&super::qlanes::Lanes> {
        self.lanes.as_deref()
    }

    /// Token `i`.
    pub(crate) fn token(&self, i: usize) -> QAct<'_> {
        let nb = self.cols / QK;
        QAct {
            d: self.d.get(i * nb..(i + 1) * nb).unwrap_or(&[]),
            s: self.s.get(i * nb..(i + 1) * nb).unwrap_or(&[]),
            qsum: self.qsum.get(i * nb..(i + 1) * nb).unwrap_or(&[]),
            q: self.q.get(i * nb * QK..(i + 1) * nb * QK).unwrap_or(&[]),
        }
    }
}

/// One block of 32 activations to 8 bits: `qb[i] = round(xb[i] / d)` with `d = max|x| / 127`
/// (NaN skipped); returns `d` and the sum of the values.
fn quantize_block(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (qv, &xv) in qb.iter_mut().zip(xb) {
        // Within -127..=127 for finite x; `as` saturates and maps NaN to 0.
        *qv = round_half_away(xv * id) as i8;
    }
    (d, qb.iter().map(|&q| i32::from(q)).sum())
}

/// [`quantize_block`] of one block, for the tests of the x86-64 vector version.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn quantize_scalar(xb: &[f32]) -> (f32, i32, [i8; QK]) {
    let mut q = [0i8; QK];
    let (d, s) = quantize_block(xb, &mut q);
    (d, s, q)
}

/// `v.round()` (halves away from zero) for every `v` (`v.round()` is a library call on
/// x86-64; this is a truncation and a compare): `v - trunc(v)` is exact, so the half-way test
/// is exact; infinities and NaN come out as they go in.
#[inline(always)]
pub(crate) fn round_half_away(v: f32) -> f32 {
    let r = v.trunc();
    if (v - r).abs() >= 0.5 {
        r + 1.0f32.copysign(v)
    } else {
        r
    }
}

/// Blocks both operands hold completely.
fn n_blocks(dtype: DType, w: &[u8], x: &QAct<'_>) -> usize {
    (w.len() / dtype.block_bytes()).min(x.d.len()).min(x.s.len()).min(x.qsum.len()).min(x.q.len() / QK)
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
        if x86::has_vnni() {
            return "avx-vnni";
        }
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

/// [`axpy_rows_q`] for a run-time `dtype` (nothing for the f32/f16 types).
pub(super) fn axpy_rows_portable<const R: usize>(dtype: DType, y: &mut [f32], a: [f32; R], w: &[u8], bb: usize) {
    match dtype {
        DType::Q8_0 => axpy_rows_q::<R, 2>(y, a, w, bb),
        DType::Q4_0 => axpy_rows_q::<R, 3>(y, a, w, bb),
        DType::Q4_1 => axpy_rows_q::<R, 5>(y, a, w, bb),
        DType::F32 | DType::F16 => {}
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
                #[cfg(target_arch = "x86_64")]
                let done = x86::axpy_rows::<$r>(dtype, y, arr, w);
                #[cfg(not(target_arch = "x86_64"))]
                let done = false;
                if !done {
                    axpy_rows_portable::<$r>(dtype, y, arr, w, bb);
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
    //! AVX2 + FMA kernels, with AVX-VNNI where the CPU has it. Per 32-element block the
    //! integer dot product is formed in eight i32 lanes, each the sum of four neighbouring
    //! byte products:
    //!
    //! - `q8_0`: `|w|` (unsigned) times `sign(q, w)` (no saturation: `q` is never -128, so a
    //!   pair sums to at most 2 * 128 * 127);
    //! - `q4_0`: the unsigned nibbles `n = w + 8` times `q`, with `8 * sum(q)` (kept per block
    //!   in [`QActs`](super::QActs)) subtracted from lane 0, so the lanes add up to exactly
    //!   `sum(w * q)` without unpacking the signed values;
    //! - `q4_1`: the unsigned nibbles times `q`.
    //!
    //! With AVX-VNNI the lanes come from one `vpdpbusd`; without it from `maddubs` (pairs to
    //! i16) then `madd` with ones (to i32): the same four products in each lane, so the same
    //! integers, and every later operation is the same. The lanes are converted to f32 and
    //! multiplied into two accumulators (even and odd blocks) by the block's combined scale;
    //! `q4_1` adds `m * s` per block into two scalar sums. So a (row, token) product is the same
    //! sequence of f32 operations in every kernel shape here (one row, [`ROWS`] rows, several
    //! tokens), with or without VNNI.

    use std::arch::x86_64::*;

    use super::{n_blocks, QAct};
    use crate::format::{DType, QK};

    /// Bytes ahead of the current block that the kernels ask the cache for.
    const PREFETCH: usize = 640;

    /// Rows of a one-token product computed together by [`dot_rows`].
    pub(crate) const ROWS: usize = 4;

    /// Whether this CPU runs the AVX2 kernels (AVX2, FMA and F16C) (always true in `x86-64-v3` builds, where the
    /// check is resolved at compile time).
    #[inline]
    pub(crate) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// Whether this CPU also has AVX-VNNI (`vpdpbusd` on 256-bit vectors).
    #[inline]
    pub(crate) fn has_vnni() -> bool {
        available() && std::arch::is_x86_feature_detected!("avxvnni")
    }

    /// One token's blocks, cut to the `nb` blocks every operand holds.
    #[derive(Clone, Copy)]
    struct Act<'a> {
        d: &'a [f32],
        s: &'a [f32],
        qsum: &'a [i32],
        q: &'a [u8],
    }

    fn act<'a>(x: &QAct<'a>, nb: usize) -> Act<'a> {
        Act { d: &x.d[..nb], s: &x.s[..nb], qsum: &x.qsum[..nb], q: bytemuck::cast_slice(&x.q[..nb * QK]) }
    }

    /// `R` rows times `T` tokens: `out[r][k] = dot(w[r], x[k])`, each bitwise the one-row,
    /// one-token kernel. Falls back to the scalar reference without AVX2, FMA and F16C. Every row and
    /// token is cut to the blocks all of them hold.
    pub(crate) fn dot_block<const R: usize, const T: usize>(
        dtype: DType,
        w: [&[u8]; R],
        x: [QAct<'_>; T],
    ) -> [[f32; T]; R] {
        dot_block_with(has_vnni(), true, dtype, w, x)
    }

    /// [`dot`] without AVX-VNNI and AVX-512 even where the CPU has them (the tests compare).
    #[cfg(test)]
    pub(crate) fn dot_avx2(dtype: DType, w: &[u8], x: QAct<'_>) -> f32 {
        dot_block_with::<1, 1>(false, false, dtype, [w], [x])[0][0]
    }

    /// [`dot_block`] on the 256-bit kernels only (`wide` false) or with the AVX-512 one where
    /// the CPU has it (the tests compare the two).
    pub(crate) fn dot_block_with<const R: usize, const T: usize>(
        vnni: bool,
        wide: bool,
        dtype: DType,
        w: [&[u8]; R],
        x: [QAct<'_>; T],
    ) -> [[f32; T]; R] {
        if !available() {
            return w.map(|w| x.map(|x| super::dot_scalar(dtype, w, x)));
        }
        let nb = w.iter().flat_map(|w| x.iter().map(move |x| n_blocks(dtype, w, x))).min().unwrap_or(0);
        let bb = dtype.block_bytes();
        let w = w.map(|w| &w[..nb * bb]);
        let a = x.map(|x| act(&x, nb));
        if matches!(dtype, DType::F32 | DType::F16) {
            return [[0.0; T]; R];
        }
        if wide && has_avx512() {
            // SAFETY: AVX-512 F/BW/VL (and VNNI for that kernel) with AVX2, FMA and F16C are
            // available (checked here); the kernel reads only through the slices it is given,
            // each holding `nb` whole blocks.
            unsafe {
                if has_avx512_vnni() {
                    kernel512_vnni::<R, T>(dtype, w, a, nb)
                } else {
                    kernel512::<R, T>(dtype, w, a, nb)
                }
            }
        } else if vnni && has_vnni() {
            // SAFETY: AVX2, FMA and AVX-VNNI are available (checked here); the kernel reads
            // only through the slices it is given, each holding `nb` whole blocks.
            unsafe { kernel_vnni::<R, T>(dtype, w, a, nb) }
        } else {
            // SAFETY: AVX2, FMA and F16C are available (checked above); as above.
            unsafe { kernel_avx2::<R, T>(dtype, w, a, nb) }
        }
    }

    /// The AVX2 dot product of one row with one token; [`super::dot_scalar`] up to the f32
    /// summation order. Falls back to the scalar kernel on a CPU without AVX2, FMA and F16C.
    pub(crate) fn dot(dtype: DType, w: &[u8], x: QAct<'_>) -> f32 {
        dot_block::<1, 1>(dtype, [w], [x])[0][0]
    }

    /// [`dot`] for `T` tokens at once (bitwise [`dot`] per token): each weight block is loaded
    /// (and its nibbles unpacked) once for the `T` tokens.
    pub(crate) fn dot_many<const T: usize>(dtype: DType, w: &[u8], x: [QAct<'_>; T]) -> [f32; T] {
        dot_block::<1, T>(dtype, [w], x)[0]
    }

    /// [`dot`] for [`ROWS`] rows and one token (bitwise [`dot`] per row): each activation
    /// block is loaded once for the rows, and the rows' independent sums keep the core busy.
    pub(crate) fn dot_rows(dtype: DType, w: [&[u8]; ROWS], x: QAct<'_>) -> [f32; ROWS] {
        dot_block::<ROWS, 1>(dtype, w, [x]).map(|r| r[0])
    }

    /// Calls `$body::<R, T, VNNI, D>` with `D` the [`DType::code`] of `$dtype` (zeros for the
    /// f32/f16 types, which never get here): one copy of the body per block type, so its inner
    /// loop has no branch on the type. With the type a run-time value LLVM kept a compare and
    /// jump per row and block: `small_batch_speed` q4_0 8192 x 2048, one token, one thread, on
    /// an AVX2-only AMD EPYC (Zen 3), 2.86 -> 2.20 ms.
    macro_rules! by_type {
        ($dtype:expr, $body:ident, $r:ident, $t:ident, $vnni:literal, $w:expr, $x:expr, $nb:expr) => {
            match $dtype {
                DType::Q8_0 => $body::<$r, $t, $vnni, 2>($w, $x, $nb),
                DType::Q4_0 => $body::<$r, $t, $vnni, 3>($w, $x, $nb),
                DType::Q4_1 => $body::<$r, $t, $vnni, 5>($w, $x, $nb),
                DType::F32 | DType::F16 => [[0.0; $t]; $r],
            }
        };
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn kernel_avx2<const R: usize, const T: usize>(
        dtype: DType,
        w: [&[u8]; R],
        x: [Act<'_>; T],
        nb: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: the caller guarantees AVX2, FMA and F16C and passes `nb` whole blocks per operand.
        unsafe { by_type!(dtype, body, R, T, false, w, x, nb) }
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    unsafe fn kernel_vnni<const R: usize, const T: usize>(
        dtype: DType,
        w: [&[u8]; R],
        x: [Act<'_>; T],
        nb: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: the caller guarantees AVX2, FMA, F16C and AVX-VNNI and passes `nb` whole blocks.
        unsafe { by_type!(dtype, body, R, T, true, w, x, nb) }
    }

    /// One block of [`QActs::quantize`](super::QActs::quantize) on 16 lanes: the same scale,
    /// the same values (rounded half away from zero, NaN to 0) and their sum; `None` (nothing
    /// written) when the block holds an infinity or its scale's inverse overflows, which the
    /// scalar loop then takes.
    ///
    /// Safety: AVX-512 F/BW/VL with AVX2, FMA and F16C are available; `xb` and `qb` hold 32
    /// values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn quantize_block512(xb: &[f32], qb: &mut [i8]) -> Option<(f32, i32)> {
        debug_assert!(xb.len() >= QK && qb.len() >= QK);
        // SAFETY: reads of `xb[0 .. 32]`, writes of `qb[0 .. 32]` (the caller's lengths); the
        // rest are register intrinsics.
        unsafe {
            let v = [_mm512_loadu_ps(xb.as_ptr()), _mm512_loadu_ps(xb.as_ptr().add(16))];
            // `fold(0, max(|x|))` skips NaN: zero them first.
            let abs = v.map(|v| {
                let a = _mm512_abs_ps(v);
                _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(a, a), a)
            });
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs[0], abs[1]));
            if !amax.is_finite() {
                return None;
            }
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            if !id.is_finite() {
                return None;
            }
            let (idv, half, one, sign) = (
                _mm512_set1_ps(id),
                _mm512_set1_ps(0.5),
                _mm512_set1_epi32(1.0f32.to_bits() as i32),
                _mm512_set1_epi32(i32::MIN),
            );
            let mut sum = 0;
            for (h, v) in v.into_iter().enumerate() {
                let p = _mm512_mul_ps(v, idv);
                let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
                let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(p, r)), half);
                let step = _mm512_castsi512_ps(_mm512_or_si512(one, _mm512_and_si512(_mm512_castps_si512(p), sign)));
                let q = _mm512_mask_add_ps(r, away, r, step);
                let q = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(p, p), q);
                let qi = _mm512_cvttps_epi32(q);
                _mm_storeu_si128(qb.as_mut_ptr().add(16 * h).cast(), _mm512_cvtepi32_epi8(qi));
                sum += _mm512_reduce_add_epi32(qi);
            }
            Some((d, sum))
        }
    }

    /// Whether this CPU also has AVX-512 VNNI (`vpdpbusd` on 512-bit vectors).
    #[inline]
    pub(crate) fn has_avx512_vnni() -> bool {
        has_avx512() && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn kernel512<const R: usize, const T: usize>(
        dtype: DType,
        w: [&[u8]; R],
        x: [Act<'_>; T],
        nb: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: the caller guarantees these features and passes `nb` whole blocks.
        unsafe { by_type!(dtype, body512, R, T, false, w, x, nb) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn kernel512_vnni<const R: usize, const T: usize>(
        dtype: DType,
        w: [&[u8]; R],
        x: [Act<'_>; T],
        nb: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: the caller guarantees these features and passes `nb` whole blocks.
        unsafe { by_type!(dtype, body512, R, T, true, w, x, nb) }
    }

    /// Sixteen i32 lanes of `acc + sum of four u8 * i8 products each`.
    #[inline(always)]
    unsafe fn dp512<const VNNI: bool>(acc: __m512i, u: __m512i, s: __m512i) -> __m512i {
        // SAFETY: register-only intrinsics; the callers run with AVX-512 F/BW (and VNNI when
        // `VNNI`) enabled.
        unsafe {
            if VNNI {
                _mm512_dpbusd_epi32(acc, u, s)
            } else {
                _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)))
            }
        }
    }

    /// [`body`] on 512-bit vectors, two blocks at a time: the even block in the low eight
    /// lanes, the odd one in the high eight, so each accumulator is `body`'s even and odd
    /// accumulators side by side and every lane gets the same integer sum and the same f32
    /// operations (q8_0's sign trick becomes `|w|` times `q` negated where `w < 0`: the same
    /// products). An odd last block goes through the low half alone. Bitwise [`body`].
    ///
    /// Safety: as [`body`], with AVX-512 F/BW/VL (and VNNI when `VNNI`) enabled.
    #[inline(always)]
    unsafe fn body512<const R: usize, const T: usize, const VNNI: bool, const D: u8>(
        w: [&[u8]; R],
        x: [Act<'_>; T],
        nb: usize,
    ) -> [[f32; T]; R] {
        let (q8, q40, min) = (D == 2, D == 3, D == 5);
        let bb = if q8 {
            DType::Q8_0
        } else if q40 {
            DType::Q4_0
        } else {
            DType::Q4_1
        }
        .block_bytes();
        debug_assert!(w.iter().all(|w| w.len() >= nb * bb));
        debug_assert!(x
            .iter()
            .all(|x| x.d.len() >= nb && x.s.len() >= nb && x.qsum.len() >= nb && x.q.len() >= nb * QK));
        let wp = w.map(|w| w.as_ptr());
        // SAFETY: as in `body`: reads of blocks `b` and `b + 1 < nb` at offsets inside a block
        // from the rows, of entries `b`, `b + 1` and values `b * 32 .. b * 32 + 64` from the
        // tokens' arrays; the rest are register intrinsics.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            let mut mins0 = [[0.0f32; T]; R];
            let mut mins1 = mins0;
            let f16 =
                |p: *const u8| half::f16::from_bits(u16::from_le(std::ptr::read_unaligned(p.cast::<u16>()))).to_f32();
            // Lanes 0..8 take element 0, lanes 8..16 element 1.
            let pair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
            let nib = _mm512_set1_epi8(0x0f);
            let shifts = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4);
            let mut b = 0;
            while b + 1 < nb {
                for p in wp {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(b * bb + PREFETCH).cast());
                }
                let qv: [__m512i; T] = std::array::from_fn(|k| _mm512_loadu_si512(x[k].q.as_ptr().add(b * QK).cast()));
                let dx: [__m512; T] = std::array::from_fn(|k| {
                    let two = _mm_castpd_ps(_mm_load_sd(x[k].d.as_ptr().add(b).cast()));
                    _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(two))
                });
                // q4_0's `-8 * sum(q)` in lane 0 of each half.
                let off: [__m512i; T] = std::array::from_fn(|k| {
                    if q40 {
                        let two =
                            _mm_mullo_epi32(_mm_loadl_epi64(x[k].qsum.as_ptr().add(b).cast()), _mm_set1_epi32(-8));
                        _mm512_maskz_permutexvar_epi32(0x0101, pair, _mm512_castsi128_si512(two))
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                for r in 0..R {
                    let (b0, b1) = (wp[r].add(b * bb), wp[r].add((b + 1) * bb));
                    let dw = _mm512_cvtph_ps(_mm256_set_m128i(
                        _mm_set1_epi16(std::ptr::read_unaligned(b1.cast::<i16>())),
                        _mm_set1_epi16(std::ptr::read_unaligned(b0.cast::<i16>())),
                    ));
                    let (u, neg) = if q8 {
                        let v = _mm512_inserti64x4(
                            _mm512_castsi256_si512(_mm256_loadu_si256(b0.add(2).cast())),
                            _mm256_loadu_si256(b1.add(2).cast()),
                            1,
                        );
                        (_mm512_abs_epi8(v), _mm512_movepi8_mask(v))
                    } else {
                        // [raw0, raw0 >> 4, raw1, raw1 >> 4] by 128-bit lane, then the nibbles.
                        let both = _mm512_mask_broadcast_i32x4(
                            _mm512_broadcast_i32x4(_mm_loadu_si128(b0.add(bb - QK / 2).cast())),
                            0xff00,
                            _mm_loadu_si128(b1.add(bb - QK / 2).cast()),
                        );
                        (_mm512_and_si512(_mm512_srlv_epi64(both, shifts), nib), 0)
                    };
                    let (mw0, mw1) = if min { (f16(b0.add(2)), f16(b1.add(2))) } else { (0.0, 0.0) };
                    for k in 0..T {
                        let p = if q8 {
                            let s = _mm512_mask_sub_epi8(qv[k], neg, _mm512_setzero_si512(), qv[k]);
                            dp512::<VNNI>(_mm512_setzero_si512(), u, s)
                        } else {
                            dp512::<VNNI>(off[k], u, qv[k])
                        };
                        acc[r][k] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx[k]), _mm512_cvtepi32_ps(p), acc[r][k]);
                        if min {
                            mins0[r][k] += mw0 * *x[k].s.get_unchecked(b);
                            mins1[r][k] += mw1 * *x[k].s.get_unchecked(b + 1);
                        }
                    }
                }
                b += 2;
            }
            if b < nb {
                // The odd last block, into the low (even) half: `body`'s 256-bit operations.
                for r in 0..R {
                    let blk = wp[r].add(b * bb);
                    let dw = _mm256_cvtph_ps(_mm_set1_epi16(std::ptr::read_unaligned(blk.cast::<i16>())));
                    let (u, v) = if q8 {
                        let v = _mm256_loadu_si256(blk.add(2).cast());
                        (_mm256_sign_epi8(v, v), v)
                    } else {
                        let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(bb - QK / 2).cast()));
                        let both = _mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4));
                        (_mm256_and_si256(both, _mm256_set1_epi8(0x0f)), _mm256_setzero_si256())
                    };
                    let mw = if min { f16(blk.add(2)) } else { 0.0 };
                    for k in 0..T {
                        let qv = _mm256_loadu_si256(x[k].q.as_ptr().add(b * QK).cast());
                        let dx = _mm256_broadcast_ss(x[k].d.get_unchecked(b));
                        let p = if q8 {
                            dp::<false>(_mm256_setzero_si256(), u, _mm256_sign_epi8(qv, v))
                        } else if q40 {
                            let off = _mm256_setr_epi32(-8 * *x[k].qsum.get_unchecked(b), 0, 0, 0, 0, 0, 0, 0);
                            dp::<false>(off, u, qv)
                        } else {
                            dp::<false>(_mm256_setzero_si256(), u, qv)
                        };
                        let lo = _mm512_castps512_ps256(acc[r][k]);
                        let lo = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(p), lo);
                        acc[r][k] = _mm512_mask_mov_ps(acc[r][k], 0x00ff, _mm512_castps256_ps512(lo));
                        if min {
                            mins0[r][k] += mw * *x[k].s.get_unchecked(b);
                        }
                    }
                }
            }
            let mut out = [[0.0f32; T]; R];
            for r in 0..R {
                for k in 0..T {
                    let a = acc[r][k];
                    let (a0, a1) =
                        (_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
                    out[r][k] = hsum(_mm256_add_ps(a0, a1)) + (mins0[r][k] + mins1[r][k]);
                }
            }
            out
        }
    }

    /// Eight i32 lanes of `acc + sum of four u8 * i8 products each`.
    #[inline(always)]
    unsafe fn dp<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: register-only intrinsics; the callers run with AVX2 (and AVX-VNNI when
        // `VNNI`) enabled.
        unsafe {
            if VNNI {
                _mm256_dpbusd_avx_epi32(acc, u, s)
            } else {
                _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
            }
        }
    }

    /// The shared body: for each block, each row's weights are widened once, each token's
    /// values loaded once, and every (row, token) pair gets the per-block operations listed in
    /// the module documentation, in block order.
    ///
    /// `D` is the rows' [`DType::code`] (2, 3 or 5).
    ///
    /// Safety: AVX2, FMA and F16C (and AVX-VNNI when `VNNI`) are enabled in the caller; every `w[r]`
    /// holds at least `nb` blocks of type `D` and every `x[k]` at least `nb`
    /// blocks (`d`, `s`, `qsum`) and `nb * 32` values (`q`).
    #[inline(always)]
    unsafe fn body<const R: usize, const T: usize, const VNNI: bool, const D: u8>(
        w: [&[u8]; R],
        x: [Act<'_>; T],
        nb: usize,
    ) -> [[f32; T]; R] {
        let (q8, q40, min) = (D == 2, D == 3, D == 5);
        let bb = if q8 {
            DType::Q8_0
        } else if q40 {
            DType::Q4_0
        } else {
            DType::Q4_1
        }
        .block_bytes();
        debug_assert!(w.iter().all(|w| w.len() >= nb * bb));
        debug_assert!(x
            .iter()
            .all(|x| x.d.len() >= nb && x.s.len() >= nb && x.qsum.len() >= nb && x.q.len() >= nb * QK));
        let wp = w.map(|w| w.as_ptr());
        // SAFETY: register intrinsics, and reads at `b * bb + o` for `b < nb` and offsets `o`
        // inside a block (`o + len <= bb`) from the rows, at `b` (`b * 32 .. + 32`) from the
        // tokens' arrays: all inside the lengths the caller guarantees (checked above in debug
        // builds; `dot_block` cuts every slice to `nb` whole blocks).
        unsafe {
            // Even blocks go to `acc0`/`mins0`, odd ones to `acc1`/`mins1` (two independent
            // chains per pair); the loop takes the blocks two at a time so that both stay in
            // registers.
            let mut acc0 = [[_mm256_setzero_ps(); T]; R];
            let mut acc1 = acc0;
            let mut mins0 = [[0.0f32; T]; R];
            let mut mins1 = mins0;
            let f16 =
                |p: *const u8| half::f16::from_bits(u16::from_le(std::ptr::read_unaligned(p.cast::<u16>()))).to_f32();
            macro_rules! block {
                ($b:expr, $acc:ident, $mins:ident) => {{
                    let b = $b;
                    let qv: [__m256i; T] =
                        std::array::from_fn(|k| _mm256_loadu_si256(x[k].q.as_ptr().add(b * QK).cast()));
                    let dx: [__m256; T] = std::array::from_fn(|k| _mm256_broadcast_ss(x[k].d.get_unchecked(b)));
                    // q4_0's lane-0 correction `-8 * sum(q)`, per token (the same for every row).
                    let off: [__m256i; T] = std::array::from_fn(|k| {
                        if q40 {
                            _mm256_setr_epi32(-8 * *x[k].qsum.get_unchecked(b), 0, 0, 0, 0, 0, 0, 0)
                        } else {
                            _mm256_setzero_si256()
                        }
                    });
                    for r in 0..R {
                        let blk = wp[r].add(b * bb);
                        // The weight scale widened in all lanes (the same value as `f16`).
                        let dw = _mm256_cvtph_ps(_mm_set1_epi16(std::ptr::read_unaligned(blk.cast::<i16>())));
                        let (u, v) = if q8 {
                            let v = _mm256_loadu_si256(blk.add(2).cast());
                            (_mm256_sign_epi8(v, v), v)
                        } else {
                            // The 16 bytes in both halves, the upper half shifted down by a
                            // nibble: low nibbles then high nibbles (no cross-lane shuffle).
                            let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(bb - QK / 2).cast()));
                            let both = _mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4));
                            (_mm256_and_si256(both, _mm256_set1_epi8(0x0f)), _mm256_setzero_si256())
                        };
                        let mw = if min { f16(blk.add(2)) } else { 0.0 };
                        for k in 0..T {
                            let p = if q8 {
                                dp::<VNNI>(_mm256_setzero_si256(), u, _mm256_sign_epi8(qv[k], v))
                            } else {
                                dp::<VNNI>(off[k], u, qv[k])
                            };
                            $acc[r][k] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx[k]), _mm256_cvtepi32_ps(p), $acc[r][k]);
                            if min {
                                $mins[r][k] += mw * *x[k].s.get_unchecked(b);
                            }
                        }
                    }
                }};
            }
            let ahead = R * nb * bb;
            let mut b = 0;
            while b + 1 < nb {
                // Ask for the next call's weights (a hint: the address may lie past the rows,
                // it is never dereferenced): where the rows are consecutive, as in every
                // product, the same block of the row `R` rows on, so each call streams in the
                // next one's rows while it computes. A row is only a few kilobytes, too short
                // for the hardware prefetcher to ramp up on its own; prefetching within the row
                // (640 bytes ahead) left each row's first bytes to wait for memory. Measured
                // with `small_batch_speed`, one token, on an AVX2-only AMD EPYC (Zen 3):
                // q4_0 8192 x 2048 one thread 2.20 -> 1.29 ms, two threads 1.28 -> 0.85 ms;
                // q8_0 two threads 1.59 -> 1.18 ms.
                for p in wp {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead + b * bb).cast());
                }
                block!(b, acc0, mins0);
                block!(b + 1, acc1, mins1);
                b += 2;
            }
            if b < nb {
                block!(b, acc0, mins0);
            }
            let mut out = [[0.0f32; T]; R];
            for r in 0..R {
                for k in 0..T {
                    out[r][k] = hsum(_mm256_add_ps(acc0[r][k], acc1[r][k])) + (mins0[r][k] + mins1[r][k]);
                }
            }
            out
        }
    }

    /// `y = (...((y + a[0] w[0]) + a[1] w[1]) ...) + a[R-1] w[R-1]` elementwise for `R`
    /// quantised rows one after the other in `rows` (each `y.len() / 32` blocks), each block
    /// decoded in registers with the operations of `super::decode_block` (`d * (q - 8)`,
    /// `d * q`, or `d * q` then `+ m`) and added with the same multiply-add as
    /// [`madd`](crate::cpu::kernels::dot::madd) (fused when the build fuses): bitwise the
    /// portable `axpy_rows_q`. `false` (nothing written) without AVX2, FMA and F16C, for the f32/f16
    /// types, or when `rows` is shorter than `R` rows.
    pub(crate) fn axpy_rows<const R: usize>(dtype: DType, y: &mut [f32], a: [f32; R], rows: &[u8]) -> bool {
        axpy_rows_with::<R>(has_avx512(), dtype, y, a, rows)
    }

    /// Whether this CPU also runs the AVX-512 down-projection kernel (`avx512f`, `avx512bw`,
    /// `avx512vl`): the same operations on 16 lanes, so the same bits.
    #[inline]
    pub(crate) fn has_avx512() -> bool {
        available()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }

    /// [`axpy_rows`], with the AVX-512 kernel only when `wide` (and the CPU has it): the tests
    /// compare the two.
    pub(crate) fn axpy_rows_with<const R: usize>(
        wide: bool,
        dtype: DType,
        y: &mut [f32],
        a: [f32; R],
        rows: &[u8],
    ) -> bool {
        let bb = dtype.block_bytes();
        let nb = y.len() / QK;
        if !available() || matches!(dtype, DType::F32 | DType::F16) || rows.len() < R * nb * bb {
            return false;
        }
        let y = &mut y[..nb * QK];
        let fused = crate::cpu::kernels::dot::FUSED;
        // SAFETY: AVX2, FMA and F16C are available (checked above), and AVX-512 F/BW/VL where
        // that kernel is called (checked here); `rows` holds `R` rows of `nb` blocks and `y`
        // holds `nb` blocks of values (checked above): the only memory the kernels touch.
        unsafe {
            match (wide && has_avx512(), fused) {
                (true, true) => axpy_kernel512::<R, true>(dtype, y, a, rows, nb),
                (true, false) => axpy_kernel512::<R, false>(dtype, y, a, rows, nb),
                (false, true) => match dtype {
                    DType::Q8_0 => axpy_kernel::<R, true, 2>(y, a, rows, nb),
                    DType::Q4_0 => axpy_kernel::<R, true, 3>(y, a, rows, nb),
                    _ => axpy_kernel::<R, true, 5>(y, a, rows, nb),
                },
                (false, false) => match dtype {
                    DType::Q8_0 => axpy_kernel::<R, false, 2>(y, a, rows, nb),
                    DType::Q4_0 => axpy_kernel::<R, false, 3>(y, a, rows, nb),
                    _ => axpy_kernel::<R, false, 5>(y, a, rows, nb),
                },
            }
        }
        true
    }

    /// [`axpy_kernel`] on 16 lanes: a block's 32 values are two vectors (its low nibbles
    /// then its high ones for the 4-bit types), decoded and added with the same operations.
    ///
    /// Safety: AVX2, FMA, F16C and AVX-512 F/BW/VL are available; `rows` holds `R * nb` blocks
    /// of `dtype` and `y` holds `nb * 32` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn axpy_kernel512<const R: usize, const FUSED: bool>(
        dtype: DType,
        y: &mut [f32],
        a: [f32; R],
        rows: &[u8],
        nb: usize,
    ) {
        let bb = dtype.block_bytes();
        let (q8, q41) = (dtype == DType::Q8_0, dtype == DType::Q4_1);
        debug_assert!(rows.len() >= R * nb * bb && y.len() >= nb * QK);
        let rp = rows.as_ptr();
        let yp = y.as_mut_ptr();
        // SAFETY: as in `axpy_kernel`: reads of block `r * nb + b` inside the block for
        // `r < R`, `b < nb`, reads and writes of `y[b * 32 .. b * 32 + 32]`; the rest are
        // register intrinsics.
        unsafe {
            let av: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(a[r]));
            // The 4-bit values as f32: `k` and `k - 8` for `k` in 0..16.
            let levels = _mm512_cvtepi32_ps(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
            let centred = _mm512_sub_ps(levels, _mm512_set1_ps(8.0));
            for b in 0..nb {
                if q8 && b % 2 == 0 {
                    for r in 0..R {
                        _mm_prefetch::<_MM_HINT_T0>(rp.wrapping_add((r * nb + b) * bb + PREFETCH).cast());
                    }
                }
                let yb = yp.add(b * QK);
                let mut v = [_mm512_loadu_ps(yb), _mm512_loadu_ps(yb.add(16))];
                for (r, ar) in av.iter().enumerate() {
                    let blk = rp.add((r * nb + b) * bb);
                    let d = scale512(blk);
                    let w: [__m512; 2] = if q8 {
                        let q = [
                            _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2).cast())),
                            _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(18).cast())),
                        ];
                        q.map(|q| _mm512_mul_ps(d, _mm512_cvtepi32_ps(q)))
                    } else {
                        // A 4-bit block has 16 possible weights: the table of all of them
                        // (`d * (k - 8)`, or `d * k + m` for q4_1: the same operations, so the
                        // same values), then one lookup per weight; `vpermps` reads only the
                        // index's low four bits, so each byte widened to 32 bits indexes by its
                        // low nibble, and the bytes shifted right by four by their high one.
                        let mut table = _mm512_mul_ps(d, if q41 { levels } else { centred });
                        if q41 {
                            table = _mm512_add_ps(table, scale512(blk.add(2)));
                        }
                        nibble_lookup(blk.add(bb - QK / 2), table)
                    };
                    for (vg, w) in v.iter_mut().zip(w) {
                        *vg = if FUSED {
                            _mm512_fmadd_ps(*ar, w, *vg)
                        } else {
                            _mm512_add_ps(*vg, _mm512_mul_ps(*ar, w))
                        };
                    }
                }
                _mm512_storeu_ps(yb, v[0]);
                _mm512_storeu_ps(yb.add(16), v[1]);
            }
        }
    }

    /// The down projection for `t` inputs (2 to [`MULTI_MAX_T`]) over `nrows` quantised rows:
    /// `y[i] = (...((y[i] + h[i, 0] W[0]) + h[i, 1] W[1]) ...) + h[i, nrows-1] W[nrows-1]` for
    /// each input `i`, where `y[i]` is `y[i * n .. (i + 1) * n]` and `h[i, r]` is `h[i * hw + r]`.
    /// Each 32-column block of every input's output stays in registers for all the rows, and
    /// each row's block is decoded once for all the inputs, with the operations of
    /// [`axpy_kernel512`] (the same multiply-add in the same row order): bitwise `t` one-input
    /// passes. Without AVX-512, [`multi_kernel`] on AVX2 in groups of at most
    /// [`MULTI_MAX_T_AVX2`] inputs. `false` (nothing written) without AVX2, FMA and F16C, for
    /// the f32/f16 types, for another `t`, or when a slice is too short.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn axpy_rows_multi(
        dtype: DType,
        t: usize,
        y: &mut [f32],
        n: usize,
        h: &[f32],
        hw: usize,
        rows: &[u8],
        nrows: usize,
    ) -> bool {
        let bb = dtype.block_bytes();
        let nb = n / QK;
        let fits = (2..=MULTI_MAX_T).contains(&t)
            && n.is_multiple_of(QK)
            && nrows <= hw
            && y.len() >= t * n
            && h.len() >= (t - 1) * hw + nrows
            && rows.len() >= nrows * nb * bb;
        if !fits || !available() || matches!(dtype, DType::F32 | DType::F16) {
            return false;
        }
        let fused = crate::cpu::kernels::dot::FUSED;
        let (y, h, w) = (y.as_mut_ptr(), h.as_ptr(), rows.as_ptr());
        if !has_avx512() {
            // AVX2: groups of at most MULTI_MAX_T_AVX2 inputs (6 = 3 + 3, 7 = 4 + 3, 8 = 4 + 4),
            // each a pass over the rows. Against the dequantise-then-f32 path it replaces,
            // `small_batch_speed` down 8192 x 2048, five inputs, AVX2-only AMD EPYC: q4_0 one
            // thread 8.80 -> 4.66 ms, two threads 4.98 -> 3.53 ms; q8_0 two threads 6.01 ->
            // 3.36 ms.
            let mut i = 0;
            while i < t {
                let g = match t - i {
                    n if n <= MULTI_MAX_T_AVX2 => n,
                    n => n.div_ceil(2),
                };
                macro_rules! go {
                    ($t:literal) => {
                        // SAFETY: AVX2, FMA and F16C are available (checked above); inputs `i`
                        // to `i + $t` of `y` (`n` values each) and `h` (stride `hw`, `nrows`
                        // coefficients each) and the `nrows` rows of `nb` blocks are inside the
                        // slices (checked above): the only memory the kernel touches.
                        unsafe {
                            let (yi, hi) = (y.add(i * n), h.add(i * hw));
                            match (dtype, fused) {
                                (DType::Q8_0, true) => multi_kernel::<$t, 0, true>(yi, n, hi, hw, w, nrows, nb),
                                (DType::Q8_0, false) => multi_kernel::<$t, 0, false>(yi, n, hi, hw, w, nrows, nb),
                                (DType::Q4_0, true) => multi_kernel::<$t, 1, true>(yi, n, hi, hw, w, nrows, nb),
                                (DType::Q4_0, false) => multi_kernel::<$t, 1, false>(yi, n, hi, hw, w, nrows, nb),
                                (_, true) => multi_kernel::<$t, 2, true>(yi, n, hi, hw, w, nrows, nb),
                                (_, false) => multi_kernel::<$t, 2, false>(yi, n, hi, hw, w, nrows, nb),
                            }
                        }
                    };
                }
                match g {
                    1 => go!(1),
                    2 => go!(2),
                    3 => go!(3),
                    4 => go!(4),
                    _ => go!(5),
                }
                i += g;
            }
            return true;
        }
        macro_rules! go {
            ($t:literal) => {
                // SAFETY: AVX-512 F/BW/VL, AVX2, FMA and F16C are available (checked above);
                // `y` holds `t` outputs of `n = nb * 32` values, `h` holds `t` inputs at stride
                // `hw` with `nrows` coefficients each, and `rows` holds `nrows` rows of `nb`
                // blocks (checked above): the only memory the kernel touches.
                unsafe {
                    match (dtype, fused) {
                        (DType::Q8_0, true) => multi_kernel512::<$t, 0, true>(y, n, h, hw, w, nrows, nb),
                        (DType::Q8_0, false) => multi_kernel512::<$t, 0, false>(y, n, h, hw, w, nrows, nb),
                        (DType::Q4_0, true) => multi_kernel512::<$t, 1, true>(y, n, h, hw, w, nrows, nb),
                        (DType::Q4_0, false) => multi_kernel512::<$t, 1, false>(y, n, h, hw, w, nrows, nb),
                        (_, true) => multi_kernel512::<$t, 2, true>(y, n, h, hw, w, nrows, nb),
                        (_, false) => multi_kernel512::<$t, 2, false>(y, n, h, hw, w, nrows, nb),
                    }
                }
            };
        }
        match t {
            2 => go!(2),
            3 => go!(3),
            4 => go!(4),
            5 => go!(5),
            6 => go!(6),
            7 => go!(7),
            _ => go!(8),
        }
        true
    }

    /// The f16 at `p` widened to f32 in all sixteen lanes (`vpbroadcastw` then `vcvtph2ps`:
    /// exact, the value `half` gives).
    ///
    /// Safety: AVX-512 F with F16C is available; `p` points at two readable bytes.
    #[inline(always)]
    unsafe fn scale512(p: *const u8) -> __m512 {
        // SAFETY: a two-byte unaligned read the caller guarantees; the rest are register
        // intrinsics.
        unsafe { _mm512_cvtph_ps(_mm256_set1_epi16(std::ptr::read_unaligned(p.cast::<i16>()))) }
    }

    /// A 4-bit block's 32 weights from its 16 packed bytes at `q` by `table` (the block's 16
    /// possible weights): each byte widened to 32 bits indexes by its low nibble (`vpermps`
    /// reads only the index's low four bits) and, shifted right by four, by its high one.
    ///
    /// Safety: AVX-512 F is available; `q` points at 16 readable bytes.
    #[inline(always)]
    unsafe fn nibble_lookup(q: *const u8, table: __m512) -> [__m512; 2] {
        // SAFETY: a 16-byte unaligned read the caller guarantees; the rest are register
        // intrinsics.
        unsafe {
            let lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.cast()));
            [_mm512_permutexvar_ps(lo, table), _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(lo), table)]
        }
    }

    /// Most inputs [`axpy_rows_multi`] takes: two accumulators per input, sixteen registers.
    pub(crate) const MULTI_MAX_T: usize = 8;

    /// [`axpy_rows_multi`]'s kernel; `D`: 0 for q8_0, 1 for q4_0, 2 for q4_1.
    ///
    /// Safety: AVX2, FMA, F16C and AVX-512 F/BW/VL are available; `y` holds `T * n` values
    /// (`n = nb * 32`), `h` holds `(T - 1) * hw + nrows` values, `rows` holds `nrows * nb`
    /// blocks of the type `D` names.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn multi_kernel512<const T: usize, const D: u8, const FUSED: bool>(
        y: *mut f32,
        n: usize,
        h: *const f32,
        hw: usize,
        rows: *const u8,
        nrows: usize,
        nb: usize,
    ) {
        let bb = match D {
            0 => DType::Q8_0.block_bytes(),
            1 => DType::Q4_0.block_bytes(),
            _ => DType::Q4_1.block_bytes(),
        };
        let stride = nb * bb;
        // SAFETY: reads of block `r * nb + b` inside the block for `r < nrows`, `b < nb`;
        // reads of `h[i * hw + r]` for `i < T`, `r < nrows`; reads and writes of
        // `y[i * n + b * 32 .. i * n + b * 32 + 32]`: inside the lengths the caller guarantees
        // (prefetches are hints and never dereferenced). The rest are register intrinsics.
        unsafe {
            let levels = _mm512_cvtepi32_ps(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
            let centred = _mm512_sub_ps(levels, _mm512_set1_ps(8.0));
            let mut r0 = 0;
            while r0 < nrows {
                let r1 = (r0 + MULTI_ROWS).min(nrows);
                for b in 0..nb {
                    let mut acc: [[__m512; 2]; T] = std::array::from_fn(|i| {
                        let yb = y.add(i * n + b * QK);
                        [_mm512_loadu_ps(yb), _mm512_loadu_ps(yb.add(16))]
                    });
                    let mut blk = rows.add(r0 * stride + b * bb);
                    for r in r0..r1 {
                        if b % 2 == 0 {
                            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH).cast());
                        }
                        let d = scale512(blk);
                        let w: [__m512; 2] = if D == 0 {
                            let q = [
                                _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2).cast())),
                                _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(18).cast())),
                            ];
                            q.map(|q| _mm512_mul_ps(d, _mm512_cvtepi32_ps(q)))
                        } else {
                            // As in `axpy_kernel512`: the block's 16 possible weights, then one
                            // lookup per weight.
                            let mut table = _mm512_mul_ps(d, if D == 2 { levels } else { centred });
                            if D == 2 {
                                table = _mm512_add_ps(table, scale512(blk.add(2)));
                            }
                            nibble_lookup(blk.add(bb - QK / 2), table)
                        };
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let a = _mm512_set1_ps(*h.add(i * hw + r));
                            for (vg, w) in acc.iter_mut().zip(w) {
                                *vg = if FUSED {
                                    _mm512_fmadd_ps(a, w, *vg)
                                } else {
                                    _mm512_add_ps(*vg, _mm512_mul_ps(a, w))
                                };
                            }
                        }
                        blk = blk.wrapping_add(stride);
                    }
                    for (i, acc) in acc.iter().enumerate() {
                        let yb = y.add(i * n + b * QK);
                        _mm512_storeu_ps(yb, acc[0]);
                        _mm512_storeu_ps(yb.add(16), acc[1]);
                    }
                }
                r0 = r1;
            }
        }
    }

    /// Rows [`multi_kernel512`] adds per pass over the outputs: as many sequential streams as
    /// the hardware prefetcher follows, and the outputs loaded and stored once per this many
    /// rows.
    const MULTI_ROWS: usize = 16;

    /// Most inputs one pass of [`multi_kernel`] takes: two accumulators per input (16 columns
    /// at a time), fifteen of the sixteen 256-bit registers with the weights, the coefficient
    /// and the constants.
    pub(crate) const MULTI_MAX_T_AVX2: usize = 5;

    /// [`multi_kernel512`] on 256-bit vectors (AVX2), for the `T` (at most
    /// [`MULTI_MAX_T_AVX2`]) inputs at `y` and `h`: 16 columns of every input's output in
    /// registers for [`MULTI_ROWS`] rows, each row's 16 weights decoded once for all the inputs
    /// with the operations of [`axpy_kernel`] (`d * (n - 8)`, `d * q`, or `d * n` then `+ m`),
    /// and added with the same multiply-add in the same row order: bitwise `T` one-input
    /// passes. The first 16 columns of a block are its low nibbles (q4), the last 16 its high
    /// ones. `D`: 0 for q8_0, 1 for q4_0, 2 for q4_1.
    ///
    /// Safety: AVX2, FMA and F16C are available; `y` holds `T * n` values (`n = nb * 32`), `h`
    /// holds `(T - 1) * hw + nrows` values, `rows` holds `nrows * nb` blocks of the type `D`
    /// names.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn multi_kernel<const T: usize, const D: u8, const FUSED: bool>(
        y: *mut f32,
        n: usize,
        h: *const f32,
        hw: usize,
        rows: *const u8,
        nrows: usize,
        nb: usize,
    ) {
        let bb = match D {
            0 => DType::Q8_0.block_bytes(),
            1 => DType::Q4_0.block_bytes(),
            _ => DType::Q4_1.block_bytes(),
        };
        let stride = nb * bb;
        // SAFETY: reads of block `r * nb + b` inside the block for `r < nrows`, `b < nb`;
        // reads of `h[i * hw + r]` for `i < T`, `r < nrows`; reads and writes of
        // `y[i * n + b * 32 .. i * n + b * 32 + 32]`: inside the lengths the caller guarantees
        // (prefetches are hints and never dereferenced). The rest are register intrinsics.
        unsafe {
            let nib = _mm256_set1_epi32(0x0f);
            let eight = _mm256_set1_epi32(8);
            let mut r0 = 0;
            while r0 < nrows {
                let r1 = (r0 + MULTI_ROWS).min(nrows);
                for b in 0..nb {
                    for half in 0..2 {
                        let col = b * QK + half * 16;
                        let mut acc: [[__m256; 2]; T] = std::array::from_fn(|i| {
                            let yb = y.add(i * n + col);
                            [_mm256_loadu_ps(yb), _mm256_loadu_ps(yb.add(8))]
                        });
                        let mut blk = rows.add(r0 * stride + b * bb);
                        for r in r0..r1 {
                            if half == 0 && b % 2 == 0 {
                                // The same block of the row MULTI_ROWS on (the next pass's),
                                // as in `body`.
                                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(MULTI_ROWS * stride).cast());
                            }
                            let d = _mm256_cvtph_ps(_mm_set1_epi16(std::ptr::read_unaligned(blk.cast::<i16>())));
                            let q: [__m256i; 2] = if D == 0 {
                                let p = blk.add(2 + half * 16);
                                [
                                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())),
                                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8).cast())),
                                ]
                            } else {
                                // As in `axpy_kernel`: the bytes widened from memory, then
                                // their low or high nibbles.
                                let p = blk.add(bb - QK / 2);
                                let b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()));
                                let b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8).cast()));
                                let q = if half == 0 {
                                    [_mm256_and_si256(b0, nib), _mm256_and_si256(b1, nib)]
                                } else {
                                    [_mm256_srli_epi32(b0, 4), _mm256_srli_epi32(b1, 4)]
                                };
                                if D == 1 {
                                    q.map(|q| _mm256_sub_epi32(q, eight))
                                } else {
                                    q
                                }
                            };
                            let mut w = q.map(|q| _mm256_mul_ps(d, _mm256_cvtepi32_ps(q)));
                            if D == 2 {
                                let m =
                                    _mm256_cvtph_ps(_mm_set1_epi16(std::ptr::read_unaligned(blk.add(2).cast::<i16>())));
                                w = w.map(|w| _mm256_add_ps(w, m));
                            }
                            for (i, acc) in acc.iter_mut().enumerate() {
                                let a = _mm256_set1_ps(*h.add(i * hw + r));
                                for (vg, w) in acc.iter_mut().zip(w) {
                                    *vg = if FUSED {
                                        _mm256_fmadd_ps(a, w, *vg)
                                    } else {
                                        _mm256_add_ps(*vg, _mm256_mul_ps(a, w))
                                    };
                                }
                            }
                            blk = blk.add(stride);
                        }
                        for (i, acc) in acc.iter().enumerate() {
                            let yb = y.add(i * n + col);
                            _mm256_storeu_ps(yb, acc[0]);
                            _mm256_storeu_ps(yb.add(8), acc[1]);
                        }
                    }
                }
                r0 = r1;
            }
        }
    }

    /// `D` is the rows' [`DType::code`] (2, 3 or 5): one copy per block type, no branch on it
    /// in the loop.
    ///
    /// Safety: AVX2, FMA and F16C are available; `rows` holds `R * nb` blocks of type `D` and
    /// `y` holds `nb * 32` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpy_kernel<const R: usize, const FUSED: bool, const D: u8>(
        y: &mut [f32],
        a: [f32; R],
        rows: &[u8],
        nb: usize,
    ) {
        let (q8, q41) = (D == 2, D == 5);
        let bb = if q8 {
            DType::Q8_0
        } else if q41 {
            DType::Q4_1
        } else {
            DType::Q4_0
        }
        .block_bytes();
        debug_assert!(rows.len() >= R * nb * bb && y.len() >= nb * QK);
        let rp = rows.as_ptr();
        let yp = y.as_mut_ptr();
        // SAFETY: reads of block `r * nb + b` at offsets inside the block (`< bb`) for `r < R`
        // and `b < nb`, reads and writes of `y[b * 32 .. b * 32 + 32]`: inside the lengths the
        // caller guarantees. The rest are register intrinsics.
        unsafe {
            let av: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(a[r]));
            let f16 =
                |p: *const u8| half::f16::from_bits(u16::from_le(std::ptr::read_unaligned(p.cast::<u16>()))).to_f32();
            let nib = _mm256_set1_epi32(0x0f);
            let eight = _mm256_set1_epi32(8);
            for b in 0..nb {
                if b % 2 == 0 {
                    // As in `body`: the same blocks of the next `R` rows, the next call's
                    // (a hint; the address may lie past the rows and is never dereferenced).
                    // `small_batch_speed` down, one token, AVX2-only AMD EPYC: q4_0 one thread
                    // 3.90 -> 2.88 ms, two threads 2.71 -> 1.74 ms; q8_0 two threads 2.03 ->
                    // 1.63 ms (before, only q8_0 prefetched, within the row).
                    for r in 0..R {
                        _mm_prefetch::<_MM_HINT_T0>(rp.wrapping_add(((R + r) * nb + b) * bb).cast());
                    }
                }
                let yb = yp.add(b * QK);
                let mut v: [__m256; 4] = std::array::from_fn(|g| _mm256_loadu_ps(yb.add(8 * g)));
                for (r, ar) in av.iter().enumerate() {
                    let blk = rp.add((r * nb + b) * bb);
                    let d = _mm256_set1_ps(f16(blk));
                    let q: [__m256i; 4] = if q8 {
                        std::array::from_fn(|g| _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(2 + 8 * g).cast())))
                    } else {
                        // Each packed byte widened to 32 bits straight from memory (two
                        // `vpmovzxbd`), then its low nibble (elements 0..16) and its high one
                        // (elements 16..32): the same integers as unpacking the bytes first,
                        // in 6 instructions instead of 10 (`small_batch_speed` q4_0 down
                        // 8192 x 2048, one token, AVX2-only AMD EPYC: one thread 2.89 -> 2.29
                        // ms, two threads 1.80 -> 1.39 ms).
                        let p = blk.add(bb - QK / 2);
                        let b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()));
                        let b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8).cast()));
                        let q = [
                            _mm256_and_si256(b0, nib),
                            _mm256_and_si256(b1, nib),
                            _mm256_srli_epi32(b0, 4),
                            _mm256_srli_epi32(b1, 4),
                        ];
                        if q41 {
                            q
                        } else {
                            q.map(|q| _mm256_sub_epi32(q, eight))
                        }
                    };
                    let m = if q41 { _mm256_set1_ps(f16(blk.add(2))) } else { _mm256_setzero_ps() };
                    for (vg, qg) in v.iter_mut().zip(q) {
                        let mut w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(qg));
                        if q41 {
                            w = _mm256_add_ps(w, m);
                        }
                        *vg = if FUSED {
                            _mm256_fmadd_ps(*ar, w, *vg)
                        } else {
                            _mm256_add_ps(*vg, _mm256_mul_ps(*ar, w))
                        };
                    }
                }
                for (g, vg) in v.iter().enumerate() {
                    _mm256_storeu_ps(yb.add(8 * g), *vg);
                }
            }
        }
    }

    /// Sum of the eight lanes, in a fixed order.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: register-only intrinsics; the callers run with AVX2 enabled.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
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
