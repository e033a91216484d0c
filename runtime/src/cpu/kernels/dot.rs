//! Dot products and row updates: the f32 inner loops every product is built from, in the
//! canonical lane order (see the parent module), with the f16 paths that read weight bits in
//! place.

use half::f16;

use crate::cpu::weights::{f16_bits_unscaled, RowData, F16_SCALE};

/// Partial sums per dot product: four 8-wide (AVX2) or eight 4-wide (NEON) vector
/// accumulators. With one 8-wide accumulator, every multiply-add of a row waited for the
/// previous one's add (3-4 cycles): the one-token f16 GEMV then ran at 17-18 GB/s per core
/// whether its weights came from memory or from the cache, and four chains ran it at 38 GB/s
/// from the cache (a standalone copy of the loop, x86-64-v3, one core).
pub(crate) const LANES: usize = 32;
/// Whether the build has f16-to-f32 conversion instructions (x86-64 with F16C, as in the
/// workspace's `x86-64-v3` desktop builds): `half`'s `to_f32` then compiles to them
/// and vectorises, and the one-input down projection widens its weights exactly instead of
/// reading their bits with [`f16_bits_unscaled`] (fewer instructions, no infinity/NaN check).
pub(super) const HW_F16: bool = cfg!(all(any(target_arch = "x86", target_arch = "x86_64"), target_feature = "f16c"));
/// f16 elements widened at a time by the exact fallback of the one-input paths (a multiple
/// of [`LANES`]): the widened chunk stays in L1 while it is consumed.
pub(super) const CONVERT_CHUNK: usize = 256;
/// Inputs of smaller magnitude than this can be multiplied by [`F16_SCALE`] (`2^112`)
/// without overflowing f32 (whose largest finite value is just below `2^128`).
pub(super) const PRESCALE_LIMIT: f32 = 65536.0;
/// f16 bits (sign cleared) at or above this have an all-ones exponent: infinity or NaN.
pub(super) const F16_NON_FINITE: i16 = 0x7c00;
/// Tokens per micro-kernel call in the batched `x @ W^T`.
pub(super) const TOKEN_BLOCK: usize = 2;

/// Whether [`madd`] is one fused multiply-add (rounded once): when the build has FMA
/// instructions (x86-64 with FMA, as in the workspace's `x86-64-v3` builds; aarch64 always).
/// A fused multiply-add takes one instruction instead of two, which halves the arithmetic of
/// the batched products (compute-bound from a few inputs on). Every kernel accumulates
/// through [`madd`], so the paths of one build still agree bitwise.
pub(crate) const FUSED: bool = cfg!(any(target_feature = "fma", target_arch = "aarch64"));

/// `acc + a * b`: fused (one rounding) when [`FUSED`], a multiply and an add otherwise.
#[inline(always)]
pub(crate) fn madd(acc: f32, a: f32, b: f32) -> f32 {
    if FUSED {
        a.mul_add(b, acc)
    } else {
        acc + a * b
    }
}

#[inline(always)]
pub(super) fn mul_add_lanes(acc: &mut [f32; LANES], x: &[f32; LANES], w: &[f32; LANES]) {
    for i in 0..LANES {
        acc[i] = madd(acc[i], x[i], w[i]);
    }
}

/// Adds `x[k] * w[k]` to lane `k % LANES`, for `k` in increasing order; `x` and `w` must start
/// at a multiple of [`LANES`] of the full vectors for the lane assignment to be global.
#[inline(always)]
pub(super) fn accumulate(acc: &mut [f32; LANES], x: &[f32], w: &[f32]) {
    let xc = x.chunks_exact(LANES);
    let wc = w.chunks_exact(LANES);
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        if let (Ok(a), Ok(b)) = (<&[f32; LANES]>::try_from(a), <&[f32; LANES]>::try_from(b)) {
            mul_add_lanes(acc, a, b);
        }
    }
    for ((s, a), b) in acc.iter_mut().zip(xr).zip(wr) {
        *s = madd(*s, *a, *b);
    }
}

/// [`accumulate`] for [`TOKEN_BLOCK`] inputs against one weight row at once (the weight row
/// is loaded once per chunk), keeping the per-(input, row) order of [`accumulate`].
#[inline(always)]
pub(super) fn accumulate_block(acc: &mut [[f32; LANES]; TOKEN_BLOCK], x: [&[f32]; TOKEN_BLOCK], w: &[f32]) {
    let n = w.len();
    let n_full = n - n % LANES;
    let mut k = 0;
    while k < n_full {
        let wk = <&[f32; LANES]>::try_from(&w[k..k + LANES]);
        let x0 = <&[f32; LANES]>::try_from(&x[0][k..k + LANES]);
        let x1 = <&[f32; LANES]>::try_from(&x[1][k..k + LANES]);
        if let (Ok(wk), Ok(x0), Ok(x1)) = (wk, x0, x1) {
            let [a0, a1] = acc;
            mul_add_lanes(a0, x0, wk);
            mul_add_lanes(a1, x1, wk);
        }
        k += LANES;
    }
    for (a, xi) in acc.iter_mut().zip(x) {
        for ((s, xv), wv) in a.iter_mut().zip(&xi[n_full..n]).zip(&w[n_full..n]) {
            *s = madd(*s, *xv, *wv);
        }
    }
}

/// Sums the lanes in a fixed order: halves added lane by lane (`a[i] + a[i + LANES / 2]`,
/// then again over the first half, ...) down to one value.
#[inline(always)]
pub(crate) fn reduce(acc: &[f32; LANES]) -> f32 {
    let mut v = *acc;
    let mut half = LANES / 2;
    while half > 0 {
        for i in 0..half {
            v[i] += v[i + half];
        }
        half /= 2;
    }
    v[0]
}

/// `sum_k x[k] * w[k]` over the common length, in the canonical lane order.
#[inline]
pub(crate) fn dot(x: &[f32], w: &[f32]) -> f32 {
    let n = x.len().min(w.len());
    let mut acc = [0.0f32; LANES];
    accumulate(&mut acc, &x[..n], &w[..n]);
    reduce(&acc)
}

/// `x` scaled by `2^112` when that is exact for every element (see the module docs), so
/// that f16 rows can be read with [`f16_bits_unscaled`] alone.
pub(super) fn prescale(x: &[f32]) -> Option<Vec<f32>> {
    x.iter().all(|v| v.abs() < PRESCALE_LIMIT).then(|| x.iter().map(|v| v * F16_SCALE).collect())
}

/// [`dot`] of `x` with an f16 row given as bits, without widening the row: `x` is the input
/// times `2^112` when `PRESCALED`, the input itself otherwise. Bitwise equal to [`dot`] with
/// the exactly widened row, or `None` when the row holds an infinity or a NaN.
// Not inlined: compiled on its own, the 8-lane loop vectorises (17 GB/s per core with AVX2);
// inlined into `matmul_rows`, release builds left it scalar (2.5-3 GB/s).
#[inline(never)]
pub(super) fn dot_f16_bits<const PRESCALED: bool>(x: &[f32], w: &[u16]) -> Option<f32> {
    let n = x.len().min(w.len());
    let (x, w) = (&x[..n], &w[..n]);
    let mut acc = [0.0f32; LANES];
    let mut top = [0i16; LANES];
    let weight = |h: u16| if PRESCALED { f16_bits_unscaled(h) } else { f16_bits_unscaled(h) * F16_SCALE };
    let xc = x.chunks_exact(LANES);
    let wc = w.chunks_exact(LANES);
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        if let (Ok(a), Ok(b)) = (<&[f32; LANES]>::try_from(a), <&[u16; LANES]>::try_from(b)) {
            for i in 0..LANES {
                top[i] = top[i].max((b[i] & 0x7fff) as i16);
                acc[i] = madd(acc[i], a[i], weight(b[i]));
            }
        }
    }
    for (((s, t), &a), &b) in acc.iter_mut().zip(top.iter_mut()).zip(xr).zip(wr) {
        *t = (*t).max((b & 0x7fff) as i16);
        *s = madd(*s, a, weight(b));
    }
    top.iter().all(|&t| t < F16_NON_FINITE).then(|| reduce(&acc))
}

/// [`dot`] of `x` with an f16 row, widened exactly by `half`'s conversion: for builds with
/// f16 conversion instructions ([`HW_F16`]), where the loop compiles to vector conversions,
/// multiplies and adds. Bitwise equal to [`dot`] with the widened row (infinities and NaNs
/// included).
// Not inlined, for the reason given at `dot_f16_bits`.
#[inline(never)]
pub(super) fn dot_f16_exact(x: &[f32], w: &[f16]) -> f32 {
    let n = x.len().min(w.len());
    let (x, w) = (&x[..n], &w[..n]);
    let mut acc = [0.0f32; LANES];
    let xc = x.chunks_exact(LANES);
    let wc = w.chunks_exact(LANES);
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        if let (Ok(a), Ok(b)) = (<&[f32; LANES]>::try_from(a), <&[f16; LANES]>::try_from(b)) {
            for i in 0..LANES {
                acc[i] = madd(acc[i], a[i], b[i].to_f32());
            }
        }
    }
    for ((s, &a), &b) in acc.iter_mut().zip(xr).zip(wr) {
        *s = madd(*s, a, b.to_f32());
    }
    reduce(&acc)
}

/// [`dot`] against a row stored as f16 or f32; `xs` is [`prescale`]`(x)` when it exists.
/// f16 rows are read without widening; a row with an infinity or a NaN is widened exactly,
/// chunk by chunk (bitwise equal to widening the whole row first).
#[inline]
pub(super) fn dot_row(x: &[f32], xs: Option<&[f32]>, w: RowData<'_>) -> f32 {
    match w {
        RowData::F32(w) => dot(x, w),
        // Only when no quantised input was prepared (the integer kernels are the normal path).
        RowData::Quant(..) => {
            let mut acc = [0.0f32; LANES];
            let mut buf = [0.0f32; CONVERT_CHUNK];
            let mut c0 = 0;
            while c0 < x.len() {
                let c1 = (c0 + CONVERT_CHUNK).min(x.len());
                let Some(piece) = w.get(c0, c1) else { break };
                piece.widen_into(&mut buf[..c1 - c0]);
                accumulate(&mut acc, &x[c0..c1], &buf[..c1 - c0]);
                c0 = c1;
            }
            reduce(&acc)
        }
        RowData::F16(w) if HW_F16 => dot_f16_exact(x, w),
        RowData::F16(w) => {
            let bits: &[u16] = bytemuck::cast_slice(w);
            let fast = match xs {
                Some(xs) => dot_f16_bits::<true>(xs, bits),
                None => dot_f16_bits::<false>(x, bits),
            };
            fast.unwrap_or_else(|| {
                let mut acc = [0.0f32; LANES];
                let mut buf = [0.0f32; CONVERT_CHUNK];
                for (xc, wc) in x.chunks(CONVERT_CHUNK).zip(w.chunks(CONVERT_CHUNK)) {
                    let n = xc.len().min(wc.len());
                    let b = &mut buf[..n];
                    RowData::F16(&wc[..n]).widen_into(b);
                    accumulate(&mut acc, &xc[..n], b);
                }
                reduce(&acc)
            })
        }
    }
}

/// `sum_k x[k]` in the canonical lane order.
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let xc = x.chunks_exact(LANES);
    let xr = xc.remainder();
    for a in xc {
        for (s, v) in acc.iter_mut().zip(a) {
            *s += v;
        }
    }
    for (s, v) in acc.iter_mut().zip(xr) {
        *s += v;
    }
    reduce(&acc)
}

/// `y += a * x`.
#[inline(always)]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv = madd(*yv, a, *xv);
    }
}

/// Four [`axpy`]s in one pass over `y`: `y = (((y + a0 x0) + a1 x1) + a2 x2) + a3 x3`
/// elementwise, bitwise equal to the four calls in sequence but loading and storing `y` once.
#[inline(always)]
pub(super) fn axpy4(y: &mut [f32], a: [f32; 4], x: [&[f32]; 4]) {
    let n = y.len().min(x[0].len()).min(x[1].len()).min(x[2].len()).min(x[3].len());
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    for ((((yv, v0), v1), v2), v3) in y[..n].iter_mut().zip(x0).zip(x1).zip(x2).zip(x3) {
        *yv = madd(madd(madd(madd(*yv, a[0], *v0), a[1], *v1), a[2], *v2), a[3], *v3);
    }
}

/// `y += x` elementwise.
pub(crate) fn add_assign(y: &mut [f32], x: &[f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += xv;
    }
}

/// `y = (...((y + a[0] w[0]) + a[1] w[1]) ...) + a[R-1] w[R-1]` elementwise, for `R` f16 rows
/// stored one after the other in `w` (`R * y.len()` elements), given as bits and read without
/// widening them: `a` is the coefficients times `2^112` when `PRESCALED`, the coefficients
/// themselves otherwise. Bitwise equal to `R` [`axpy`]s with the exactly widened rows when it
/// returns `true`; `false` means a row holds an infinity or a NaN (and `y` holds garbage).
///
/// The column loop works on [`LANES`]-wide chunks so that the compiler keeps a chunk of `y`
/// in registers while the `R` rows are added (an `R`-row register block).
#[inline(always)]
pub(super) fn axpy_rows_f16_bits<const R: usize, const PRESCALED: bool>(y: &mut [f32], a: [f32; R], w: &[u16]) -> bool {
    let n = y.len();
    let Some(w) = w.get(..R * n) else {
        return false;
    };
    let rows: [&[u16]; R] = std::array::from_fn(|r| &w[r * n..(r + 1) * n]);
    let weight = |h: u16| if PRESCALED { f16_bits_unscaled(h) } else { f16_bits_unscaled(h) * F16_SCALE };
    let mut top = [0i16; LANES];
    let mut yc = y.chunks_exact_mut(LANES);
    let mut c = 0;
    for yv in yc.by_ref() {
        if let Ok(yv) = <&mut [f32; LANES]>::try_from(yv) {
            let mut v = *yv;
            for (row, &ar) in rows.iter().zip(&a) {
                if let Some(Ok(b)) = row.get(c..c + LANES).map(<&[u16; LANES]>::try_from) {
                    for i in 0..LANES {
                        top[i] = top[i].max((b[i] & 0x7fff) as i16);
                        v[i] = madd(v[i], ar, weight(b[i]));
                    }
                }
            }
            *yv = v;
        }
        c += LANES;
    }
    // A separate maximum for the last columns: updating a lane of `top` here as well makes
    // the compiler split that lane out of the vector code above (measured 2x slower).
    let mut top_rest = 0i16;
    for (k, yv) in yc.into_remainder().iter_mut().enumerate() {
        let mut v = *yv;
        for (row, &ar) in rows.iter().zip(&a) {
            let b = row[c + k];
            top_rest = top_rest.max((b & 0x7fff) as i16);
            v = madd(v, ar, weight(b));
        }
        *yv = v;
    }
    top_rest < F16_NON_FINITE && top.iter().all(|&t| t < F16_NON_FINITE)
}

/// [`axpy_rows_f16_bits`] with exactly widened weights (`half`'s conversion): used when the
/// build has f16 conversion instructions ([`HW_F16`]), where the compiler turns the column
/// loop into vector conversions, multiplies and adds (no infinity/NaN check needed).
#[inline(always)]
pub(super) fn axpy_rows_f16_exact<const R: usize>(y: &mut [f32], a: [f32; R], w: &[f16]) {
    let n = y.len();
    let Some(w) = w.get(..R * n) else {
        return;
    };
    let rows: [&[f16]; R] = std::array::from_fn(|r| &w[r * n..(r + 1) * n]);
    for (c, yv) in y.iter_mut().enumerate() {
        let mut v = *yv;
        for (row, &ar) in rows.iter().zip(&a) {
            v = madd(v, ar, row[c].to_f32());
        }
        *yv = v;
    }
}

/// `R` rows of f16 weights added into `y` (`y += sum_r a[r] * w[r]`, rows in order); `false`
/// when a weight is infinite or NaN (see [`axpy_rows_f16_bits`]).
#[inline(always)]
pub(super) fn axpy_rows_f16<const R: usize>(y: &mut [f32], a: &[f32], w: &[f16]) -> bool {
    let Some(Ok(a)) = a.get(..R).map(<[f32; R]>::try_from) else {
        return false;
    };
    if HW_F16 {
        axpy_rows_f16_exact::<R>(y, a, w);
        return true;
    }
    let bits: &[u16] = bytemuck::cast_slice(w);
    if a.iter().all(|v| v.abs() < PRESCALE_LIMIT) {
        axpy_rows_f16_bits::<R, true>(y, a.map(|v| v * F16_SCALE), bits)
    } else {
        axpy_rows_f16_bits::<R, false>(y, a, bits)
    }
}

/// `acc[i]` (all [`LANES`] lanes of `T` dot products) `+=` the products of `T` inputs with
/// one f16 row, `L` lanes per pass over the row: each pass widens its `L` weights of a
/// [`LANES`]-wide chunk once in registers and multiplies them into the `T` inputs' partial
/// sums, which stay in registers (`T * L / 8` AVX2 accumulators). Every lane gets exactly the
/// operations of [`accumulate`] with the exactly widened row, in the same order, so the
/// result is bitwise [`dot`] of each input with the widened row. Weights are widened by
/// `half` when the build has f16 conversion instructions ([`HW_F16`]), from their bits
/// ([`f16_bits_unscaled`] times `2^112`, exact for finite values) otherwise; then the
/// function returns `false` when the row holds an infinity or a NaN (and `acc` holds garbage).
#[inline(always)]
fn accumulate_tokens_f16<const T: usize, const L: usize>(
    acc: &mut [[f32; LANES]; T],
    x: [&[f32]; T],
    w: &[f16],
) -> bool {
    let n = w.len();
    let n_full = n - n % LANES;
    let bits: &[u16] = bytemuck::cast_slice(w);
    let mut top = [0i16; L];
    let mut g = 0;
    while g < LANES {
        let mut a = [[0.0f32; L]; T];
        let mut k = g;
        while k < n_full {
            let Some(Ok(wb)) = bits.get(k..k + L).map(<&[u16; L]>::try_from) else { break };
            let mut wv = [0.0f32; L];
            for i in 0..L {
                wv[i] = if HW_F16 {
                    f16::from_bits(wb[i]).to_f32()
                } else {
                    top[i] = top[i].max((wb[i] & 0x7fff) as i16);
                    f16_bits_unscaled(wb[i]) * F16_SCALE
                };
            }
            for (at, xt) in a.iter_mut().zip(&x) {
                if let Some(Ok(xv)) = xt.get(k..k + L).map(<&[f32; L]>::try_from) {
                    for i in 0..L {
                        at[i] = madd(at[i], xv[i], wv[i]);
                    }
                }
            }
            k += LANES;
        }
        for (dst, at) in acc.iter_mut().zip(&a) {
            dst[g..g + L].copy_from_slice(at);
        }
        g += L;
    }
    let mut top_rest = 0i16;
    for (j, &b) in bits[n_full..n].iter().enumerate() {
        let wv = if HW_F16 {
            f16::from_bits(b).to_f32()
        } else {
            top_rest = top_rest.max((b & 0x7fff) as i16);
            f16_bits_unscaled(b) * F16_SCALE
        };
        for (dst, xt) in acc.iter_mut().zip(&x) {
            dst[j] = madd(dst[j], xt[n_full + j], wv);
        }
    }
    HW_F16 || (top_rest < F16_NON_FINITE && top.iter().all(|&t| t < F16_NON_FINITE))
}

/// `out[i * ld] = dot(x[i], widen(w))` for the `T` inputs `x` (each `w.len()` long), with
/// [`accumulate_tokens_f16`]: bitwise [`dot_row`] of each input with the row.
#[inline(never)]
fn dot_tokens_f16<const T: usize, const L: usize>(x: [&[f32]; T], w: &[f16], out: &mut [f32], ld: usize) {
    let mut acc = [[0.0f32; LANES]; T];
    if accumulate_tokens_f16::<T, L>(&mut acc, x, w) {
        for (i, a) in acc.iter().enumerate() {
            out[i * ld] = reduce(a);
        }
    } else {
        // An infinite or NaN weight (builds without f16 instructions): the exact path.
        for (i, xi) in x.iter().enumerate() {
            out[i * ld] = dot_row(xi, None, RowData::F16(w));
        }
    }
}

/// `out[i * ld] = x[i] . w` for the `t` inputs `x` (`[t, w.len()]`) and one f16 row, reading
/// the row once from memory and widening it in registers, a group of inputs per pass (the
/// row stays in L1 between the groups): groups of four inputs, and of three or two for the
/// rest (five inputs: three then two). Larger groups measured slower: eight inputs with eight
/// lanes per pass 2x slower than two groups of four, and five or six inputs in one group were
/// not vectorised with fused multiply-adds. Bitwise
/// [`dot_row`] of each input with the row, whatever `t`.
pub(super) fn dot_many_f16(x: &[f32], t: usize, w: &[f16], out: &mut [f32], ld: usize) {
    let n = w.len();
    let xi = |i: usize| &x[i * n..(i + 1) * n];
    let mut i = 0;
    while i < t {
        let o = &mut out[i * ld..];
        // (inputs per group, lanes per pass): at most 8 accumulators and 4 weight vectors.
        let step = match t - i {
            1 => {
                o[0] = dot_row(xi(i), None, RowData::F16(w));
                1
            }
            2 => {
                dot_tokens_f16::<2, 32>([xi(i), xi(i + 1)], w, o, ld);
                2
            }
            3 | 5 | 6 => {
                dot_tokens_f16::<3, 16>(std::array::from_fn(|q| xi(i + q)), w, o, ld);
                3
            }
            _ => {
                dot_tokens_f16::<4, 16>(std::array::from_fn(|q| xi(i + q)), w, o, ld);
                4
            }
        };
        i += step;
    }
}

/// `y = (...((y + a[0] w[0]) + a[1] w[1]) ...) + a[R-1] w[R-1]` elementwise for `R` f16 rows
/// given as slices of `y.len()` elements (pieces of rows of a wider matrix), widened in
/// registers: by `half` with f16 conversion instructions ([`HW_F16`]), from their bits
/// otherwise (exact for finite values; `false` when a weight is infinite or NaN, and `y` then
/// holds garbage). Bitwise `R` [`axpy`]s with the exactly widened rows.
#[inline(never)]
pub(super) fn axpy_rows_f16_slices<const R: usize>(y: &mut [f32], a: [f32; R], rows: [&[f16]; R]) -> bool {
    let n = y.len();
    if rows.iter().any(|r| r.len() < n) {
        return false;
    }
    let rows: [&[u16]; R] = rows.map(|r| bytemuck::cast_slice(&r[..n]));
    let mut top = [0i16; LANES];
    let mut yc = y.chunks_exact_mut(LANES);
    let mut c = 0;
    for yv in yc.by_ref() {
        if let Ok(yv) = <&mut [f32; LANES]>::try_from(yv) {
            let mut v = *yv;
            for (row, &ar) in rows.iter().zip(&a) {
                if let Some(Ok(b)) = row.get(c..c + LANES).map(<&[u16; LANES]>::try_from) {
                    for i in 0..LANES {
                        let w = if HW_F16 {
                            f16::from_bits(b[i]).to_f32()
                        } else {
                            top[i] = top[i].max((b[i] & 0x7fff) as i16);
                            f16_bits_unscaled(b[i]) * F16_SCALE
                        };
                        v[i] = madd(v[i], ar, w);
                    }
                }
            }
            *yv = v;
        }
        c += LANES;
    }
    let mut top_rest = 0i16;
    for (k, yv) in yc.into_remainder().iter_mut().enumerate() {
        let mut v = *yv;
        for (row, &ar) in rows.iter().zip(&a) {
            let b = row[c + k];
            let w = if HW_F16 {
                f16::from_bits(b).to_f32()
            } else {
                top_rest = top_rest.max((b & 0x7fff) as i16);
                f16_bits_unscaled(b) * F16_SCALE
            };
            v = madd(v, ar, w);
        }
        *yv = v;
    }
    HW_F16 || (top_rest < F16_NON_FINITE && top.iter().all(|&t| t < F16_NON_FINITE))
}
